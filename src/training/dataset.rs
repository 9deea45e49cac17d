//! Preference pairs in the Pick-a-Pic v2 schema (`caption`, `jpg_0`, `jpg_1`, `label_0`; other
//! columns ignored), read from parquet one row group at a time: the real dataset is ~335 GB,
//! so only the label column is scanned up front and images are read when a batch needs them.
//!
//! Edit pairs (InstructPix2Pix preference data) add one column, `input_image`: the source image
//! both edits start from; `caption` then holds the edit instruction.
//!
//! Unpaired data (Diffusion-KTO's per-image judgements) is `caption`, `jpg_0` and `label`: 1 for
//! a desirable image, 0 for an undesirable one.
//!
//! Order is a seeded block shuffle (row groups shuffled, rows shuffled within each), a pure
//! function of (seed, epoch): a resumed run sees exactly the batches it would have seen.

use super::TrainError;
use candle_core::{Device, Tensor};
use parquet::file::reader::{FileReader, SerializedFileReader};
use parquet::record::Field;
use parquet::schema::types::Type;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub const REQUIRED_COLUMNS: [&str; 4] = ["caption", "jpg_0", "jpg_1", "label_0"];

/// The column of edit pairs that holds the source image.
pub const SOURCE_COLUMN: &str = "input_image";

/// The columns of unpaired data.
pub const UNPAIRED_COLUMNS: [&str; 3] = ["caption", "jpg_0", "label"];

/// One usable comparison, winner first.
#[derive(Clone)]
pub struct RawPair {
    pub caption: String,
    pub winner: Arc<Vec<u8>>,
    pub loser: Arc<Vec<u8>>,
    /// Edit pairs: the image both edits were made from.
    pub source: Option<Arc<Vec<u8>>>,
    /// Unpaired data: whether `winner`, the one image, is desirable (`loser` is empty).
    pub desirable: Option<bool>,
}

/// One row of a pairs file as written (`write_pairs_parquet`) and read back (`read_all_rows`).
#[derive(Debug, Clone, PartialEq)]
pub struct PairRow {
    pub caption: String,
    pub jpg_0: Vec<u8>,
    pub jpg_1: Vec<u8>,
    pub label_0: f64,
    pub input_image: Option<Vec<u8>>,
}

impl PairRow {
    pub fn new(caption: impl Into<String>, jpg_0: Vec<u8>, jpg_1: Vec<u8>, label_0: f64) -> Self {
        Self {
            caption: caption.into(),
            jpg_0,
            jpg_1,
            label_0,
            input_image: None,
        }
    }
}

#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct DatasetStats {
    pub rows: usize,
    pub kept: usize,
    pub ties_dropped: usize,
    pub invalid_labels: usize,
    /// Pairs skipped at training time because an image did not decode.
    pub undecodable_skipped: usize,
}

pub struct ParquetPairs {
    path: PathBuf,
    reader: SerializedFileReader<File>,
    /// Usable (row group, row) positions and whether image 0 is the winner.
    index: Vec<(usize, usize, bool)>,
    by_group: Vec<Vec<usize>>,
    pub stats: DatasetStats,
    /// Whether rows carry a source image (edit pairs).
    pub has_source: bool,
    /// Whether rows are single images with a desirable/undesirable `label`.
    pub unpaired: bool,
    /// Rows of the cached groups as stored: `winner` is `jpg_0`.
    cache: HashMap<usize, Arc<Vec<Option<RawPair>>>>,
    order: Option<(usize, u64, Vec<usize>)>,
}

/// Opens a parquet file, with errors naming it.
pub(crate) fn open_parquet(path: &Path) -> Result<SerializedFileReader<File>, TrainError> {
    let file =
        File::open(path).map_err(|e| TrainError::Dataset(format!("{}: {e}", path.display())))?;
    SerializedFileReader::new(file).map_err(|e| {
        TrainError::Dataset(format!(
            "{} is not a readable parquet file: {e}",
            path.display()
        ))
    })
}

/// The schema restricted to `cols` (a row iterator reads only those columns).
pub(crate) fn projection(
    reader: &SerializedFileReader<File>,
    cols: &[&str],
) -> Result<Type, TrainError> {
    let root = reader
        .metadata()
        .file_metadata()
        .schema_descr()
        .root_schema();
    let fields: Vec<_> = root
        .get_fields()
        .iter()
        .filter(|f| cols.contains(&f.name()))
        .cloned()
        .collect();
    Type::group_type_builder("schema")
        .with_fields(fields)
        .build()
        .map_err(|e| TrainError::Dataset(format!("parquet schema: {e}")))
}

impl ParquetPairs {
    pub fn open(path: &Path) -> Result<Self, TrainError> {
        let reader = open_parquet(path)?;
        let root = reader
            .metadata()
            .file_metadata()
            .schema_descr()
            .root_schema();
        let names: Vec<&str> = root.get_fields().iter().map(|f| f.name()).collect();
        let unpaired = names.contains(&"label") && !names.contains(&"jpg_1");
        let (required, schema) = if unpaired {
            (&UNPAIRED_COLUMNS[..], "unpaired: caption, jpg_0, label")
        } else {
            (&REQUIRED_COLUMNS[..], "Pick-a-Pic v2 schema: caption, jpg_0, jpg_1, label_0")
        };
        let missing: Vec<&str> = required
            .iter()
            .copied()
            .filter(|c| !names.contains(c))
            .collect();
        if !missing.is_empty() {
            return Err(TrainError::Dataset(format!(
                "dataset is missing required column(s) {} ({schema})",
                missing.join(", ")
            )));
        }
        let proj = projection(&reader, &[if unpaired { "label" } else { "label_0" }])?;
        let mut stats = DatasetStats::default();
        let mut index = Vec::new();
        let mut by_group = Vec::new();
        for g in 0..reader.num_row_groups() {
            let rg = reader
                .get_row_group(g)
                .map_err(|e| TrainError::Dataset(format!("row group {g}: {e}")))?;
            let mut rows = Vec::new();
            for (i, row) in rg
                .get_row_iter(Some(proj.clone()))
                .map_err(|e| TrainError::Dataset(e.to_string()))?
                .enumerate()
            {
                let row = row.map_err(|e| TrainError::Dataset(format!("row group {g}: {e}")))?;
                stats.rows += 1;
                let label = row.get_column_iter().next().and_then(|(_, f)| match f {
                    Field::Double(v) => Some(*v),
                    Field::Float(v) => Some(*v as f64),
                    Field::Long(v) => Some(*v as f64),
                    Field::Int(v) => Some(*v as f64),
                    Field::Bool(v) => Some(if *v { 1.0 } else { 0.0 }),
                    _ => None,
                });
                // Pairs: whether image 0 wins; unpaired: whether the image is desirable.
                match label {
                    Some(l) if l == 1.0 || l == 0.0 => {
                        rows.push(index.len());
                        index.push((g, i, l == 1.0));
                    }
                    Some(l) if l == 0.5 && !unpaired => stats.ties_dropped += 1,
                    _ => stats.invalid_labels += 1,
                }
            }
            by_group.push(rows);
        }
        stats.kept = index.len();
        let has_source = names.contains(&SOURCE_COLUMN);
        if index.is_empty() {
            return Err(TrainError::Dataset(format!(
                "no usable {} in {} ({} rows: {} ties, {} without a 0/1 label)",
                if unpaired { "images" } else { "pairs" },
                path.display(),
                stats.rows,
                stats.ties_dropped,
                stats.invalid_labels
            )));
        }
        Ok(Self {
            path: path.to_path_buf(),
            reader,
            index,
            by_group,
            stats,
            has_source,
            unpaired,
            cache: HashMap::new(),
            order: None,
        })
    }

    /// Keeps the first `n` usable pairs (file order).
    pub fn truncate(&mut self, n: usize) {
        if n == 0 || n >= self.index.len() {
            return;
        }
        self.index.truncate(n);
        for rows in &mut self.by_group {
            rows.retain(|&i| i < n);
        }
        self.stats.kept = n;
        self.order = None;
    }

    pub fn len(&self) -> usize {
        self.index.len()
    }

    pub fn is_empty(&self) -> bool {
        self.index.is_empty()
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn load_group(&mut self, g: usize) -> Result<Arc<Vec<Option<RawPair>>>, TrainError> {
        if let Some(c) = self.cache.get(&g) {
            return Ok(c.clone());
        }
        let proj = projection(&self.reader, &["caption", "jpg_0", "jpg_1", SOURCE_COLUMN])?;
        let rg = self
            .reader
            .get_row_group(g)
            .map_err(|e| TrainError::Dataset(format!("row group {g}: {e}")))?;
        let mut rows = Vec::new();
        for row in rg
            .get_row_iter(Some(proj))
            .map_err(|e| TrainError::Dataset(e.to_string()))?
        {
            let row = row.map_err(|e| TrainError::Dataset(format!("row group {g}: {e}")))?;
            let mut caption = None;
            let mut j0 = None;
            let mut j1 = None;
            let mut source = None;
            for (name, f) in row.get_column_iter() {
                match (name.as_str(), f) {
                    ("caption", Field::Str(s)) => caption = Some(s.clone()),
                    ("jpg_0", Field::Bytes(b)) => j0 = Some(Arc::new(b.data().to_vec())),
                    ("jpg_1", Field::Bytes(b)) => j1 = Some(Arc::new(b.data().to_vec())),
                    (SOURCE_COLUMN, Field::Bytes(b)) => source = Some(Arc::new(b.data().to_vec())),
                    _ => {}
                }
            }
            // An edit pair without its source cannot be trained on: skipped like a bad image.
            let complete = !self.has_source || source.is_some();
            let j1 = if self.unpaired { Some(Arc::default()) } else { j1 };
            rows.push(match (caption, j0, j1) {
                (Some(caption), Some(winner), Some(loser)) if complete => Some(RawPair {
                    caption,
                    winner,
                    loser,
                    source,
                    desirable: None,
                }),
                _ => None,
            });
        }
        // Two row groups at a time: a block-shuffled epoch walks one group after another.
        if self.cache.len() >= 2 {
            self.cache.clear();
        }
        let rows = Arc::new(rows);
        self.cache.insert(g, rows.clone());
        Ok(rows)
    }

    /// Position `k` of the epoch order for `seed`.
    fn ordered(&mut self, seed: u64, epoch: usize, k: usize) -> usize {
        let stale = match &self.order {
            Some((e, s, _)) => *e != epoch || *s != seed,
            None => true,
        };
        if stale {
            let mut rng = ChaCha8Rng::seed_from_u64(
                seed ^ (0x9E37_79B9_7F4A_7C15u64.wrapping_mul(epoch as u64 + 1)),
            );
            let mut groups: Vec<usize> = (0..self.by_group.len()).collect();
            groups.shuffle(&mut rng);
            let mut order = Vec::with_capacity(self.index.len());
            for g in groups {
                let mut rows = self.by_group[g].clone();
                rows.shuffle(&mut rng);
                order.extend(rows);
            }
            self.order = Some((epoch, seed, order));
        }
        self.order.as_ref().unwrap().2[k]
    }

    /// The `n`-th pair of the infinite seeded stream (epochs back to back).
    pub fn pair(&mut self, seed: u64, n: usize) -> Result<Option<RawPair>, TrainError> {
        let len = self.index.len();
        let idx = self.ordered(seed, n / len, n % len);
        let (g, i, zero_wins) = self.index[idx];
        let rows = self.load_group(g)?;
        let unpaired = self.unpaired;
        Ok(rows.get(i).cloned().flatten().map(|mut p| {
            if unpaired {
                p.desirable = Some(zero_wins);
            } else if !zero_wins {
                std::mem::swap(&mut p.winner, &mut p.loser);
            }
            p
        }))
    }
}

/// Image preprocessing of the official trainers: resize the shorter side to `resolution`
/// (bilinear), crop (center, or random), optional horizontal flip, scale to [-1, 1].
pub struct Preprocess {
    pub resolution: usize,
    pub random_crop: bool,
}

impl Preprocess {
    /// Decodes and transforms one image; `None` when the bytes are not an image.
    pub fn apply(
        &self,
        bytes: &[u8],
        flip: bool,
        crop_u: (f64, f64),
        device: &Device,
    ) -> Option<candle_core::Result<Tensor>> {
        let img = image::load_from_memory(bytes).ok()?.to_rgb8();
        Some(self.tensor(img, flip, crop_u, device))
    }

    fn tensor(
        &self,
        img: image::RgbImage,
        flip: bool,
        crop_u: (f64, f64),
        device: &Device,
    ) -> candle_core::Result<Tensor> {
        let r = self.resolution as u32;
        let (w, h) = img.dimensions();
        let img = if w.min(h) != r {
            let (nw, nh) = if w <= h {
                (
                    r,
                    ((h as f64) * r as f64 / w as f64).round().max(r as f64) as u32,
                )
            } else {
                (
                    ((w as f64) * r as f64 / h as f64).round().max(r as f64) as u32,
                    r,
                )
            };
            image::imageops::resize(&img, nw, nh, image::imageops::FilterType::Triangle)
        } else {
            img
        };
        let (w, h) = img.dimensions();
        let (x0, y0) = if self.random_crop {
            (
                ((w - r) as f64 * crop_u.0).floor() as u32,
                ((h - r) as f64 * crop_u.1).floor() as u32,
            )
        } else {
            // torchvision CenterCrop: round((size - crop) / 2)
            (
                (((w - r) as f64) / 2.0).round() as u32,
                (((h - r) as f64) / 2.0).round() as u32,
            )
        };
        let mut data = vec![0f32; 3 * (r * r) as usize];
        let plane = (r * r) as usize;
        for y in 0..r {
            for x in 0..r {
                let sx = if flip { r - 1 - x } else { x };
                let p = img.get_pixel(x0 + sx, y0 + y);
                for c in 0..3 {
                    data[c * plane + (y * r + x) as usize] = p[c] as f32 / 127.5 - 1.0;
                }
            }
        }
        Tensor::from_vec(data, (3, r as usize, r as usize), device)
    }
}

/// One column of a file being written: its values by row index.
enum Column<'a> {
    Bytes(Box<dyn Fn(usize) -> Vec<u8> + 'a>),
    Double(Box<dyn Fn(usize) -> f64 + 'a>),
}

/// Writes `rows` rows of `columns` (in the order of `schema`, a parquet message type),
/// snappy-compressed, `rows_per_group` rows per row group.
fn write_parquet(
    path: &Path,
    schema: &str,
    rows: usize,
    rows_per_group: usize,
    columns: &[Column<'_>],
) -> Result<(), TrainError> {
    use parquet::basic::Compression;
    use parquet::data_type::{ByteArray, ByteArrayType, DoubleType};
    use parquet::file::properties::WriterProperties;
    use parquet::file::writer::SerializedFileWriter;
    let io = |e: parquet::errors::ParquetError| TrainError::Io(e.to_string());
    let schema = Arc::new(parquet::schema::parser::parse_message_type(schema).map_err(io)?);
    let props = Arc::new(
        WriterProperties::builder()
            .set_compression(Compression::SNAPPY)
            .build(),
    );
    let file =
        File::create(path).map_err(|e| TrainError::Io(format!("{}: {e}", path.display())))?;
    let mut w = SerializedFileWriter::new(file, schema, props).map_err(io)?;
    let per = rows_per_group.max(1);
    for first in (0..rows).step_by(per) {
        let range = first..(first + per).min(rows);
        let mut rg = w.next_row_group().map_err(io)?;
        for column in columns {
            let mut cw = rg
                .next_column()
                .map_err(io)?
                .ok_or_else(|| TrainError::Io("missing column writer".into()))?;
            match column {
                Column::Bytes(f) => {
                    let vals: Vec<ByteArray> = range.clone().map(|i| ByteArray::from(f(i))).collect();
                    cw.typed::<ByteArrayType>().write_batch(&vals, None, None).map_err(io)?;
                }
                Column::Double(f) => {
                    let vals: Vec<f64> = range.clone().map(f).collect();
                    cw.typed::<DoubleType>().write_batch(&vals, None, None).map_err(io)?;
                }
            }
            cw.close().map_err(io)?;
        }
        rg.close().map_err(io)?;
    }
    w.close().map_err(io)?;
    Ok(())
}

/// Writes pairs with the four columns trainers read (`caption`, `jpg_0`, `jpg_1`, `label_0`),
/// and `input_image` when any row has a source image (edit pairs; a row without one is stored
/// empty and skipped by the trainer), snappy-compressed, `rows_per_group` rows per row group.
/// Used to export subsets, by the JSONL manifest import, and by tests.
pub fn write_pairs_parquet(
    path: &Path,
    rows: &[PairRow],
    rows_per_group: usize,
) -> Result<(), TrainError> {
    let with_source = rows.iter().any(|r| r.input_image.is_some());
    let mut columns = vec![
        Column::Bytes(Box::new(|i| rows[i].caption.as_bytes().to_vec())),
        Column::Bytes(Box::new(|i| rows[i].jpg_0.clone())),
        Column::Bytes(Box::new(|i| rows[i].jpg_1.clone())),
        Column::Double(Box::new(|i| rows[i].label_0)),
    ];
    if with_source {
        columns.push(Column::Bytes(Box::new(|i| {
            rows[i].input_image.clone().unwrap_or_default()
        })));
    }
    let schema = format!(
        "message schema {{ REQUIRED BYTE_ARRAY caption (UTF8); REQUIRED BYTE_ARRAY jpg_0; \
         REQUIRED BYTE_ARRAY jpg_1; REQUIRED DOUBLE label_0; {}}}",
        if with_source {
            format!("REQUIRED BYTE_ARRAY {SOURCE_COLUMN}; ")
        } else {
            String::new()
        }
    );
    write_parquet(path, &schema, rows.len(), rows_per_group, &columns)
}

/// Writes unpaired rows (`caption`, `jpg_0`, `label`: 1 desirable, 0 undesirable),
/// snappy-compressed, `rows_per_group` rows per row group.
pub fn write_unpaired_parquet(
    path: &Path,
    rows: &[(String, Vec<u8>, f64)],
    rows_per_group: usize,
) -> Result<(), TrainError> {
    write_parquet(
        path,
        "message schema { REQUIRED BYTE_ARRAY caption (UTF8); REQUIRED BYTE_ARRAY jpg_0; \
         REQUIRED DOUBLE label; }",
        rows.len(),
        rows_per_group,
        &[
            Column::Bytes(Box::new(|i| rows[i].0.as_bytes().to_vec())),
            Column::Bytes(Box::new(|i| rows[i].1.clone())),
            Column::Double(Box::new(|i| rows[i].2)),
        ],
    )
}

/// Reads every row (with `input_image` where the file has it) — small files only (tests,
/// exports).
pub fn read_all_rows(path: &Path) -> Result<Vec<PairRow>, TrainError> {
    let file =
        File::open(path).map_err(|e| TrainError::Dataset(format!("{}: {e}", path.display())))?;
    let reader = SerializedFileReader::new(file).map_err(|e| TrainError::Dataset(e.to_string()))?;
    let mut cols = REQUIRED_COLUMNS.to_vec();
    cols.push(SOURCE_COLUMN);
    let proj = projection(&reader, &cols)?;
    let mut out = Vec::new();
    for row in reader
        .get_row_iter(Some(proj))
        .map_err(|e| TrainError::Dataset(e.to_string()))?
    {
        let row = row.map_err(|e| TrainError::Dataset(e.to_string()))?;
        let mut r = PairRow::new(String::new(), Vec::new(), Vec::new(), f64::NAN);
        for (name, f) in row.get_column_iter() {
            match (name.as_str(), f) {
                ("caption", Field::Str(s)) => r.caption = s.clone(),
                ("jpg_0", Field::Bytes(x)) => r.jpg_0 = x.data().to_vec(),
                ("jpg_1", Field::Bytes(x)) => r.jpg_1 = x.data().to_vec(),
                ("label_0", Field::Double(v)) => r.label_0 = *v,
                (SOURCE_COLUMN, Field::Bytes(x)) => r.input_image = Some(x.data().to_vec()),
                _ => {}
            }
        }
        out.push(r);
    }
    Ok(out)
}
