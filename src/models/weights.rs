//! Loading parameters from safetensors files in diffusers/transformers layouts.
//!
//! A `Weights` handle reads tensors lazily from memory-mapped files, converts them to the
//! requested dtype and device, and checks every shape against what the config implies, so a
//! wrong config or a truncated file is an error naming the tensor, never a silent mismatch.
//! In trainable mode each parameter becomes a candle `Var` registered under its full name,
//! which is how the trainer finds and updates them.

use super::{ModelError, Result};
use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Shape, Tensor, Var};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

#[derive(Clone, Default)]
pub struct VarRegistry {
    vars: Arc<Mutex<BTreeMap<String, Var>>>,
}

impl VarRegistry {
    pub fn insert(&self, name: String, var: Var) {
        self.vars.lock().unwrap().insert(name, var);
    }
    /// All trainable parameters, sorted by name (deterministic order for optimisers).
    pub fn all(&self) -> Vec<(String, Var)> {
        self.vars
            .lock()
            .unwrap()
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }
    pub fn len(&self) -> usize {
        self.vars.lock().unwrap().len()
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[derive(Clone)]
enum Source {
    Mmap(Arc<MmapedSafetensors>),
    /// Tensors already in memory (e.g. a training checkpoint or a conformance case's theta0).
    Map(Arc<HashMap<String, Tensor>>),
    /// Whatever the model asks for, freshly drawn; see `Weights::random`.
    Random(Arc<RandomSource>),
}

/// Parameters made up on request. Each tensor's values depend only on the seed and its full
/// name, so the order in which a model asks for its parameters cannot change the weights, and
/// the same seed always writes byte-identical files.
pub struct RandomSource {
    seed: u64,
    std: f64,
    /// PyTorch's default layer initialisation instead of small normals (see `Weights::random_torch`).
    torch: bool,
    drawn: Mutex<BTreeMap<String, Tensor>>,
}

impl RandomSource {
    fn draw(&self, full: &str, shape: &Shape, device: &Device, dtype: DType) -> Result<Tensor> {
        if let Some(t) = self.drawn.lock().unwrap().get(full) {
            if t.dims() == shape.dims() {
                return Ok(t.clone());
            }
            return Err(ModelError::ShapeMismatch {
                name: full.to_string(),
                expected: shape.dims().to_vec(),
                found: t.dims().to_vec(),
            });
        }
        use rand::SeedableRng;
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed_for(self.seed, full));
        let uniform = |bound: f64, rng: &mut rand_chacha::ChaCha8Rng| -> Result<Tensor> {
            use rand_distr::Distribution;
            let u = rand_distr::Uniform::new_inclusive(-bound as f32, bound as f32)
                .map_err(|e| ModelError::Config(format!("random weights: bound {bound}: {e}")))?;
            let data: Vec<f32> = (0..shape.elem_count()).map(|_| u.sample(rng)).collect();
            Ok(Tensor::from_vec(data, shape.clone(), &Device::Cpu)?)
        };
        let (module, leaf) = full.rsplit_once('.').unwrap_or(("", full));
        let kind = random_init(full);
        let torch_layer = self.torch && !full.contains("embedding");
        let t = match kind {
            // torch.nn.Linear / Conv2d: weights kaiming_uniform(a=sqrt(5)), i.e. U(+-1/sqrt(fan_in)),
            // and biases U(+-1/sqrt(fan_in)) of their weight.
            RandomInit::Normal if torch_layer && shape.rank() >= 2 => {
                let fan_in = shape.elem_count() / shape.dims()[0];
                uniform(1.0 / (fan_in as f64).sqrt(), &mut rng)?
            }
            RandomInit::Zeros if torch_layer && leaf == "bias" => {
                let sibling = self
                    .drawn
                    .lock()
                    .unwrap()
                    .get(&format!("{module}.weight"))
                    .map(|w| w.dims().to_vec());
                match sibling {
                    Some(d) if d.len() >= 2 => uniform(
                        1.0 / ((d.iter().product::<usize>() / d[0]) as f64).sqrt(),
                        &mut rng,
                    )?,
                    _ => Tensor::zeros(shape, DType::F32, &Device::Cpu)?,
                }
            }
            RandomInit::Ones => Tensor::ones(shape, DType::F32, &Device::Cpu)?,
            RandomInit::Zeros => Tensor::zeros(shape, DType::F32, &Device::Cpu)?,
            RandomInit::Normal => {
                use rand_distr::Distribution;
                let normal = rand_distr::Normal::new(0f32, self.std as f32).map_err(|e| {
                    ModelError::Config(format!("random weights: std {}: {e}", self.std))
                })?;
                let data: Vec<f32> = (0..shape.elem_count())
                    .map(|_| normal.sample(&mut rng))
                    .collect();
                Tensor::from_vec(data, shape.clone(), &Device::Cpu)?
            }
        }
        .to_dtype(dtype)?
        .to_device(device)?;
        self.drawn
            .lock()
            .unwrap()
            .insert(full.to_string(), t.clone());
        Ok(t)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RandomInit {
    Ones,
    Zeros,
    Normal,
}

/// How a random parameter is initialised, from its name alone: normalisation layers start as
/// the identity (weight 1, bias 0) and every other bias at 0, as PyTorch's norm layers and
/// transformers' `_init_weights` do; everything else is a small normal, which keeps
/// activations finite through dozens of residual blocks.
pub fn random_init(full_name: &str) -> RandomInit {
    let (module, leaf) = full_name.rsplit_once('.').unwrap_or(("", full_name));
    let module_leaf = module.rsplit('.').next().unwrap_or(module);
    match leaf {
        "weight" if module_leaf.contains("norm") => RandomInit::Ones,
        "bias" => RandomInit::Zeros,
        _ => RandomInit::Normal,
    }
}

/// FNV-1a of the name folded into the seed (std's hasher is not stable across releases).
pub(crate) fn seed_for(seed: u64, name: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325 ^ seed.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    for b in name.bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

#[derive(Clone)]
pub struct Weights {
    st: Source,
    files: Arc<Vec<PathBuf>>,
    prefix: String,
    device: Device,
    dtype: DType,
    trainable: Option<VarRegistry>,
}

impl Weights {
    pub fn from_files(files: &[PathBuf], device: &Device, dtype: DType) -> Result<Self> {
        for f in files {
            if !f.exists() {
                return Err(ModelError::MissingFile(f.clone()));
            }
        }
        // Safety: the files are memory-mapped read-only; we never write to them while mapped.
        let st = unsafe { MmapedSafetensors::multi(files) }
            .map_err(|e| ModelError::Corrupt(describe(files), e.to_string()))?;
        Ok(Self {
            st: Source::Mmap(Arc::new(st)),
            files: Arc::new(files.to_vec()),
            prefix: String::new(),
            device: device.clone(),
            dtype,
            trainable: None,
        })
    }

    /// Finds the weight files of one component directory: `<stem>[.<variant>].safetensors`
    /// or a sharded `<stem>[.<variant>].safetensors.index.json`. A missing variant falls back
    /// to the plain files, as diffusers does with a warning.
    pub fn resolve_files(dir: &Path, stem: &str, variant: Option<&str>) -> Result<Vec<PathBuf>> {
        let mut candidates = Vec::new();
        if let Some(v) = variant {
            candidates.push(format!("{stem}.{v}.safetensors"));
        }
        candidates.push(format!("{stem}.safetensors"));
        for name in &candidates {
            let single = dir.join(name);
            if single.exists() {
                return Ok(vec![single]);
            }
            let index = dir.join(format!("{name}.index.json"));
            if index.exists() {
                return shard_files(&index);
            }
        }
        Err(ModelError::MissingFile(dir.join(&candidates[0])))
    }

    /// Weights from named in-memory tensors.
    pub fn from_map(tensors: HashMap<String, Tensor>, device: &Device, dtype: DType) -> Self {
        Self {
            st: Source::Map(Arc::new(tensors)),
            files: Arc::new(vec![PathBuf::from("<memory>")]),
            prefix: String::new(),
            device: device.clone(),
            dtype,
            trainable: None,
        }
    }

    /// Weights that invent every parameter the model asks for (see `random_init` for the
    /// values) and remember them: build a model from this, then `drawn()` is its complete
    /// state dict under the exact names the loaders read.
    pub fn random(seed: u64, std: f64, device: &Device, dtype: DType) -> Self {
        Self::random_source(
            RandomSource {
                seed,
                std,
                torch: false,
                drawn: Mutex::new(BTreeMap::new()),
            },
            device,
            dtype,
        )
    }

    /// Random weights for training from scratch, initialised as PyTorch's layers are by
    /// default: Linear/Conv2d weights and biases U(+-1/sqrt(fan_in)), norms identity,
    /// embeddings N(0, std). The non-zero biases matter: with zero biases every layer is linear
    /// in a flat image's colour up to the first GroupNorm, which then divides the scale out,
    /// and an autoencoder trained from there confused white with light blue and black with
    /// dark green for hundreds of steps.
    pub fn random_torch(seed: u64, std: f64, device: &Device, dtype: DType) -> Self {
        Self::random_source(
            RandomSource {
                seed,
                std,
                torch: true,
                drawn: Mutex::new(BTreeMap::new()),
            },
            device,
            dtype,
        )
    }

    fn random_source(source: RandomSource, device: &Device, dtype: DType) -> Self {
        Self {
            st: Source::Random(Arc::new(source)),
            files: Arc::new(vec![PathBuf::from("<random>")]),
            prefix: String::new(),
            device: device.clone(),
            dtype,
            trainable: None,
        }
    }

    /// Every tensor handed out so far by random weights (empty for file or map weights).
    pub fn drawn(&self) -> BTreeMap<String, Tensor> {
        match &self.st {
            Source::Random(r) => r.drawn.lock().unwrap().clone(),
            _ => BTreeMap::new(),
        }
    }

    pub fn trainable(mut self, registry: VarRegistry) -> Self {
        self.trainable = Some(registry);
        self
    }

    pub fn device(&self) -> &Device {
        &self.device
    }
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn pp(&self, name: impl std::fmt::Display) -> Self {
        let mut w = self.clone();
        w.prefix = if self.prefix.is_empty() {
            name.to_string()
        } else {
            format!("{}.{}", self.prefix, name)
        };
        w
    }

    fn full(&self, name: &str) -> String {
        if self.prefix.is_empty() {
            name.to_string()
        } else {
            format!("{}.{}", self.prefix, name)
        }
    }

    /// The module path this handle points at (its prefix).
    pub fn prefix_name(&self) -> String {
        self.prefix.clone()
    }

    pub fn contains(&self, name: &str) -> bool {
        let full = self.full(name);
        match &self.st {
            Source::Mmap(st) => st.get(&full).is_ok(),
            Source::Map(m) => m.contains_key(&full),
            // Optional parameters stay absent, so a random model has only what it must have.
            Source::Random(r) => r.drawn.lock().unwrap().contains_key(&full),
        }
    }

    fn shape_of(&self, full: &str) -> Option<Vec<usize>> {
        match &self.st {
            Source::Mmap(st) => st.get(full).ok().map(|v| v.shape().to_vec()),
            Source::Map(m) => m.get(full).map(|t| t.dims().to_vec()),
            Source::Random(r) => r.drawn.lock().unwrap().get(full).map(|t| t.dims().to_vec()),
        }
    }

    /// A parameter of the given shape.
    pub fn get<S: Into<Shape>>(&self, shape: S, name: &str) -> Result<Tensor> {
        let full = self.full(name);
        let shape = shape.into();
        let t = match &self.st {
            Source::Mmap(st) => {
                self.check_stored_shape(&full, &shape)?;
                st.load(&full, &self.device)
                    .map_err(|e| {
                        ModelError::Corrupt(describe(&self.files), format!("{full}: {e}"))
                    })?
                    .to_dtype(self.dtype)?
            }
            Source::Map(m) => {
                self.check_stored_shape(&full, &shape)?;
                m[&full].to_device(&self.device)?.to_dtype(self.dtype)?
            }
            Source::Random(r) => r.draw(&full, &shape, &self.device, self.dtype)?,
        };
        self.register(full, t)
    }

    fn check_stored_shape(&self, full: &str, shape: &Shape) -> Result<()> {
        let found = self
            .shape_of(full)
            .ok_or_else(|| ModelError::MissingTensor {
                name: full.to_string(),
                file: describe(&self.files),
            })?;
        if found != shape.dims() {
            return Err(ModelError::ShapeMismatch {
                name: full.to_string(),
                expected: shape.dims().to_vec(),
                found,
            });
        }
        Ok(())
    }

    fn register(&self, full: String, t: Tensor) -> Result<Tensor> {
        match &self.trainable {
            Some(reg) => {
                let var = Var::from_tensor(&t)?;
                let tensor = var.as_tensor().clone();
                reg.insert(full, var);
                Ok(tensor)
            }
            None => Ok(t),
        }
    }

    /// Every tensor name in the files (for loaders that map foreign layouts).
    pub fn names(&self) -> Vec<String> {
        match &self.st {
            Source::Mmap(st) => st.tensors().into_iter().map(|(k, _)| k).collect(),
            Source::Map(m) => m.keys().cloned().collect(),
            Source::Random(r) => r.drawn.lock().unwrap().keys().cloned().collect(),
        }
    }
}

fn describe(files: &[PathBuf]) -> String {
    files
        .iter()
        .map(|f| f.display().to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

fn shard_files(index: &Path) -> Result<Vec<PathBuf>> {
    let text = std::fs::read_to_string(index)
        .map_err(|e| ModelError::Io(index.to_path_buf(), e.to_string()))?;
    let v: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| ModelError::Corrupt(index.display().to_string(), e.to_string()))?;
    let map = v
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| ModelError::Corrupt(index.display().to_string(), "no weight_map".into()))?;
    let dir = index.parent().unwrap_or(Path::new("."));
    let mut files: Vec<PathBuf> = map
        .values()
        .filter_map(|f| f.as_str())
        .map(|f| dir.join(f))
        .collect();
    files.sort();
    files.dedup();
    Ok(files)
}
