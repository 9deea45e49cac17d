//! Reward models that score an image against its prompt, as the paper's evaluation does: CLIP
//! score, PickScore, LAION aesthetics and HPSv2, all on one CLIP implementation
//! (`clip_model`) and CLIP's preprocessing (`image_processor`).
//!
//! * `clip_score`: `100 * max(cos(image, text), 0)` (torchmetrics' CLIPScore), a CLIP model
//!   in transformers' layout (openai/clip-vit-large-patch14).
//! * `pickscore`: `exp(logit_scale) * cos(image, text)`, PickScore_v1's inference (a CLIPModel,
//!   yuvalkirstain/PickScore_v1).
//! * `aesthetic`: the LAION improved aesthetic predictor, an MLP on the normalised CLIP ViT-L/14
//!   image embedding; its directory holds the MLP (`model.safetensors`, `layers.{0,2,4,6,7}`) and
//!   a `config.json` naming the CLIP model (`clip_model`, a directory relative to it or a hub id).
//! * `hpsv2`: `cos(image, text)` of HPSv2's open_clip ViT-H-14 (`open_clip_config.json` and
//!   `open_clip_model.safetensors`; see `open_clip` for the key names).

use super::clip_model::ClipModel;
use super::image_processor::ImageProcessor;
use super::nn::Linear;
use super::tokenizer::ClipTokenizer;
use super::weights::Weights;
use super::{ModelError, Result};
use candle_core::{DType, Device, Module, Tensor};
use image::RgbImage;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RewardKind {
    ClipScore,
    PickScore,
    Aesthetic,
    HpsV2,
}

impl RewardKind {
    pub const ALL: [RewardKind; 4] = [
        RewardKind::ClipScore,
        RewardKind::PickScore,
        RewardKind::Aesthetic,
        RewardKind::HpsV2,
    ];

    pub fn name(self) -> &'static str {
        match self {
            RewardKind::ClipScore => "clip_score",
            RewardKind::PickScore => "pickscore",
            RewardKind::Aesthetic => "aesthetic",
            RewardKind::HpsV2 => "hpsv2",
        }
    }

    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.name() == name)
    }

    /// Where users download the weights from (a hub id; HPSv2 and the aesthetic head need the
    /// conversions docs/evaluation.md gives).
    pub fn reference_source(self) -> &'static str {
        match self {
            RewardKind::ClipScore => "openai/clip-vit-large-patch14",
            RewardKind::PickScore => "yuvalkirstain/PickScore_v1",
            RewardKind::Aesthetic => "a directory with the converted LAION aesthetic MLP",
            RewardKind::HpsV2 => "a directory with HPSv2's converted open_clip checkpoint",
        }
    }
}

/// The LAION aesthetic MLP: 1024-128-64-16-1 linear layers (dropouts are inactive at
/// inference and its published model has no activations between them).
struct AestheticHead {
    layers: Vec<Linear>,
}

impl AestheticHead {
    fn load(dir: &Path, input_dim: usize, device: &Device) -> Result<Self> {
        let files = Weights::resolve_files(dir, "model", None)?;
        let w = Weights::from_files(&files, device, DType::F32)?;
        let dims = [(0, input_dim, 1024), (2, 1024, 128), (4, 128, 64), (6, 64, 16), (7, 16, 1)];
        let layers = dims
            .iter()
            .map(|&(i, a, b)| Linear::new(&w.pp(format!("layers.{i}")), a, b, true, None))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self { layers })
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.layers.iter().try_fold(x.clone(), |h, l| l.forward(&h))
    }
}

pub struct RewardModel {
    pub kind: RewardKind,
    clip: ClipModel,
    tokenizer: ClipTokenizer,
    processor: ImageProcessor,
    head: Option<AestheticHead>,
    device: Device,
}

fn normalise(x: &Tensor) -> candle_core::Result<Tensor> {
    x.broadcast_div(&x.sqr()?.sum_keepdim(1)?.sqrt()?)
}

impl RewardModel {
    /// A reward model from its directory (see the module's description of each layout).
    pub fn load(kind: RewardKind, dir: &Path, device: &Device) -> Result<Self> {
        let (clip_dir, head) = if kind == RewardKind::Aesthetic {
            let path = dir.join("config.json");
            let text = std::fs::read_to_string(&path)
                .map_err(|e| ModelError::Io(path.clone(), e.to_string()))?;
            let cfg: serde_json::Value = serde_json::from_str(&text)
                .map_err(|e| ModelError::Corrupt(path.display().to_string(), e.to_string()))?;
            let clip = cfg.get("clip_model").and_then(|c| c.as_str()).ok_or_else(|| {
                ModelError::Config(format!("{}: clip_model is missing", path.display()))
            })?;
            let input_dim = cfg.get("input_dim").and_then(|d| d.as_u64()).unwrap_or(768) as usize;
            let clip_dir = resolve_clip(dir, clip)?;
            (clip_dir, Some(AestheticHead::load(dir, input_dim, device)?))
        } else {
            (dir.to_path_buf(), None)
        };
        Ok(Self {
            kind,
            clip: ClipModel::load(&clip_dir, device, DType::F32)?,
            tokenizer: ClipTokenizer::load(&clip_dir)?,
            processor: ImageProcessor::load(&clip_dir)?,
            head,
            device: device.clone(),
        })
    }

    /// The preprocessed pixels of `images`, `[N, 3, S, S]`.
    pub fn pixel_values(&self, images: &[RgbImage]) -> Result<Tensor> {
        let rows = images
            .iter()
            .map(|i| self.processor.preprocess(i, &self.device))
            .collect::<Result<Vec<_>>>()?;
        Ok(Tensor::cat(&rows, 0)?)
    }

    /// Padded token ids `[N, 77]` of `prompts`.
    pub fn input_ids(&self, prompts: &[&str]) -> Result<Tensor> {
        let rows = prompts
            .iter()
            .map(|p| Ok(self.tokenizer.encode(p)?.ids))
            .collect::<Result<Vec<_>>>()?;
        let n = rows.len();
        let flat: Vec<u32> = rows.concat();
        Ok(Tensor::from_vec(flat, (n, self.tokenizer.max_len()), &self.device)?)
    }

    pub fn clip(&self) -> &ClipModel {
        &self.clip
    }

    /// One score per (image, prompt) pair.
    pub fn score(&self, images: &[RgbImage], prompts: &[&str]) -> Result<Vec<f64>> {
        if images.len() != prompts.len() {
            return Err(ModelError::Config(format!(
                "{} images and {} prompts: a reward scores pairs",
                images.len(),
                prompts.len()
            )));
        }
        if images.is_empty() {
            return Ok(Vec::new());
        }
        let image = normalise(&self.clip.image_embeds(&self.pixel_values(images)?)?)?;
        let scores = match self.kind {
            RewardKind::Aesthetic => {
                let head = self.head.as_ref().ok_or_else(|| {
                    ModelError::Config("the aesthetic reward has no MLP head".into())
                })?;
                head.forward(&image)?.squeeze(1)?
            }
            kind => {
                let text = normalise(&self.clip.text_embeds(&self.input_ids(prompts)?)?)?;
                let cos = (image * text)?.sum(1)?;
                match kind {
                    RewardKind::ClipScore => (cos.relu()? * 100.0)?,
                    RewardKind::PickScore => (cos * self.clip.logit_scale.exp())?,
                    _ => cos,
                }
            }
        };
        Ok(scores
            .to_dtype(DType::F64)?
            .to_vec1::<f64>()?)
    }
}

/// The aesthetic head's CLIP model: a directory relative to the head's, or a hub id.
fn resolve_clip(dir: &Path, clip: &str) -> Result<PathBuf> {
    let local = dir.join(clip);
    if local.exists() {
        return Ok(local);
    }
    resolve_source(clip)
}

/// A reward model's source: a local directory, or a hub repository whose files the loader
/// reads are downloaded into the cache.
pub fn resolve_source(source: &str) -> Result<PathBuf> {
    let local = PathBuf::from(source);
    if local.exists() {
        return Ok(local);
    }
    super::hub::download_files(
        source,
        &[
            "config.json",
            "model.safetensors",
            "preprocessor_config.json",
            "tokenizer.json",
            "tokenizer_config.json",
            "special_tokens_map.json",
            "vocab.json",
            "merges.txt",
        ],
    )
}
