//! A whole diffusers pipeline directory (`model_index.json` + component folders) loaded into
//! memory once and shared read-only by every request.

use super::clip::ClipTextModel;
use super::tokenizer::ClipTokenizer;
use super::unet::UNet2DConditionModel;
use super::vae::AutoencoderKL;
use super::weights::Weights;
use super::{ModelError, Result};
use crate::schedulers::{SchedulerConfig, SchedulerKind};
use candle_core::{DType, Device};
use serde_json::Value;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Architecture {
    /// SD 1.x / 2.x text-to-image (also serves img2img).
    StableDiffusion,
    StableDiffusionXl,
    InstructPix2Pix,
}

impl Architecture {
    /// The name clients see (snake_case would split "Pix2Pix" into "pix2_pix").
    pub fn name(&self) -> &'static str {
        match self {
            Architecture::StableDiffusion => "stable_diffusion",
            Architecture::StableDiffusionXl => "stable_diffusion_xl",
            Architecture::InstructPix2Pix => "instruct_pix2pix",
        }
    }
}

/// Where a model comes from: a local diffusers directory, a hub repository id, or a
/// single-file checkpoint with the directory or repository its configuration comes from.
#[derive(Debug, Clone)]
pub enum ModelSource {
    Local(PathBuf),
    Hub {
        repo: String,
        revision: Option<String>,
    },
    /// `FILE.safetensors[,config=DIR_OR_HUB_ID]`; without `config`, the reference repository
    /// of the family the file's keys show (see `single_file`).
    SingleFile {
        file: PathBuf,
        config: Option<String>,
    },
}

impl ModelSource {
    /// `*.safetensors` (optionally `,config=...`) is a single file; a path that exists is
    /// local; `owner/name[@rev]` otherwise is a hub id.
    pub fn parse(s: &str) -> Self {
        let (path, config) = match s.split_once(",config=") {
            Some((p, c)) => (p, Some(c.to_string())),
            None => (s, None),
        };
        if path.to_ascii_lowercase().ends_with(".safetensors") {
            return ModelSource::SingleFile {
                file: PathBuf::from(path),
                config,
            };
        }
        let p = PathBuf::from(s);
        if p.exists() || s.starts_with('/') || s.starts_with('.') {
            return ModelSource::Local(p);
        }
        match s.split_once('@') {
            Some((repo, rev)) => ModelSource::Hub {
                repo: repo.to_string(),
                revision: Some(rev.to_string()),
            },
            None => ModelSource::Hub {
                repo: s.to_string(),
                revision: None,
            },
        }
    }

    /// A local directory holding the pipeline, downloading it first for hub ids.
    pub fn resolve(&self, variant: Option<&str>) -> Result<PathBuf> {
        match self {
            ModelSource::Local(p) => {
                if !p.join("model_index.json").exists() {
                    return Err(ModelError::MissingFile(p.join("model_index.json")));
                }
                Ok(p.clone())
            }
            ModelSource::Hub { repo, revision } => {
                super::hub::download_pipeline(repo, revision.as_deref(), variant)
            }
            ModelSource::SingleFile { file, .. } => Err(ModelError::Config(format!(
                "{} is a single-file checkpoint, not a pipeline directory",
                file.display()
            ))),
        }
    }

    /// The directory whose configuration and tokenizers a single-file checkpoint uses: the
    /// given one, or the family's reference repository's (configuration files only).
    fn single_file_config(file: &Path, config: Option<&str>) -> Result<PathBuf> {
        let source = match config {
            Some(c) => ModelSource::parse(c),
            None => {
                let (family, in_channels) = super::single_file::inspect(file)?;
                ModelSource::parse(family.reference_repo(in_channels))
            }
        };
        match source {
            ModelSource::Local(p) => ModelSource::Local(p).resolve(None),
            ModelSource::Hub { repo, revision } => {
                super::hub::download_configs(&repo, revision.as_deref())
            }
            ModelSource::SingleFile { file, .. } => Err(ModelError::Config(format!(
                "config={}: name a diffusers directory or hub repository",
                file.display()
            ))),
        }
    }
}

#[derive(Debug, Clone)]
pub struct LoadOptions {
    pub device: Device,
    pub dtype: DType,
    /// e.g. `fp16` for `*.fp16.safetensors`
    pub variant: Option<String>,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            device: Device::Cpu,
            dtype: DType::F32,
            variant: None,
        }
    }
}

pub struct DiffusionModel {
    pub dir: PathBuf,
    pub architecture: Architecture,
    pub tokenizer: ClipTokenizer,
    pub text_encoder: ClipTextModel,
    pub tokenizer_2: Option<ClipTokenizer>,
    pub text_encoder_2: Option<ClipTextModel>,
    pub unet: UNet2DConditionModel,
    pub vae: AutoencoderKL,
    pub scheduler_config: SchedulerConfig,
    /// The scheduler the checkpoint ships with.
    pub default_scheduler: SchedulerKind,
    /// SDXL: a missing negative prompt means all-zero negative embeddings.
    pub force_zeros_for_empty_prompt: bool,
    /// The model directory's own defaults (`dspo_server.json`), if it ships them.
    pub defaults: super::defaults::ModelDefaults,
    pub device: Device,
    pub dtype: DType,
}

fn read_json(path: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => ModelError::MissingFile(path.to_path_buf()),
        _ => ModelError::Io(path.to_path_buf(), e.to_string()),
    })?;
    serde_json::from_str(&text)
        .map_err(|e| ModelError::Corrupt(path.display().to_string(), e.to_string()))
}

/// Where a pipeline's weights are read from.
enum WeightSource<'a> {
    /// The component folders of the pipeline directory.
    Folders,
    /// A single-file checkpoint, renamed to the folders' names.
    Converted(&'a mut super::single_file::Components),
}

impl WeightSource<'_> {
    fn component(
        &mut self,
        dir: &Path,
        name: &str,
        stem: &str,
        opts: &LoadOptions,
        dtype: DType,
    ) -> Result<Weights> {
        match self {
            WeightSource::Folders => {
                let files =
                    Weights::resolve_files(&dir.join(name), stem, opts.variant.as_deref())?;
                Weights::from_files(&files, &opts.device, dtype)
            }
            WeightSource::Converted(c) => {
                let map = match name {
                    "unet" => &mut c.unet,
                    "vae" => &mut c.vae,
                    "text_encoder" => &mut c.text_encoder,
                    _ => &mut c.text_encoder_2,
                };
                if map.is_empty() {
                    return Err(ModelError::Config(format!(
                        "the single-file checkpoint has no {name} weights"
                    )));
                }
                Ok(Weights::from_map(std::mem::take(map), &opts.device, dtype))
            }
        }
    }
}

impl DiffusionModel {
    /// A model from any source: a pipeline directory, a hub id, or a single-file checkpoint.
    pub fn load_source(source: &str, opts: &LoadOptions) -> Result<Self> {
        match ModelSource::parse(source) {
            ModelSource::SingleFile { file, config } => {
                let dir = ModelSource::single_file_config(&file, config.as_deref())?;
                Self::load_single_file(&file, &dir, opts)
            }
            other => Self::load(&other.resolve(opts.variant.as_deref())?, opts),
        }
    }

    /// A single-file checkpoint, configured by the pipeline directory `config_dir` (whose own
    /// weights, if any, are not read).
    pub fn load_single_file(file: &Path, config_dir: &Path, opts: &LoadOptions) -> Result<Self> {
        let unet = UNet2DConditionModel::load_config(&config_dir.join("unet"))?;
        let vae = AutoencoderKL::load_config(&config_dir.join("vae"))?;
        let layers = match unet.layers_per_block.as_slice() {
            [first, rest @ ..] if rest.iter().all(|l| l == first) => *first,
            other => {
                return Err(ModelError::Config(format!(
                    "single-file checkpoints need one layers_per_block for every level, the \
                     configuration has {other:?}"
                )))
            }
        };
        let mut parts = super::single_file::load(
            file,
            layers,
            vae.block_out_channels.len(),
            &opts.device,
        )?;
        Self::load_from(config_dir, opts, WeightSource::Converted(&mut parts))
    }

    pub fn load(dir: &Path, opts: &LoadOptions) -> Result<Self> {
        Self::load_from(dir, opts, WeightSource::Folders)
    }

    fn load_from(dir: &Path, opts: &LoadOptions, mut weights: WeightSource<'_>) -> Result<Self> {
        let index = read_json(&dir.join("model_index.json"))?;
        let class = index
            .get("_class_name")
            .and_then(|c| c.as_str())
            .unwrap_or("StableDiffusionPipeline");
        let dt = opts.dtype;
        let unet = UNet2DConditionModel::new(
            UNet2DConditionModel::load_config(&dir.join("unet"))?,
            &weights.component(dir, "unet", "diffusion_pytorch_model", opts, dt)?,
        )?;
        let latent_channels = AutoencoderKL::load_config(&dir.join("vae"))?.latent_channels;
        let architecture = match class {
            "StableDiffusionXLPipeline" | "StableDiffusionXLImg2ImgPipeline" => {
                Architecture::StableDiffusionXl
            }
            "StableDiffusionInstructPix2PixPipeline" => Architecture::InstructPix2Pix,
            "StableDiffusionPipeline" | "StableDiffusionImg2ImgPipeline" => {
                if unet.config.in_channels == 2 * latent_channels {
                    Architecture::InstructPix2Pix
                } else {
                    Architecture::StableDiffusion
                }
            }
            o => {
                return Err(ModelError::Config(format!(
                    "model_index.json: pipeline class {o} is not supported"
                )))
            }
        };
        // The UNet reads latents (InstructPix2Pix: latents and the encoded input image).
        let expected_in = if architecture == Architecture::InstructPix2Pix {
            2 * latent_channels
        } else {
            latent_channels
        };
        if unet.config.in_channels != expected_in {
            return Err(ModelError::Config(format!(
                "unet in_channels is {}, a {class} needs {expected_in}",
                unet.config.in_channels
            )));
        }
        // The SDXL VAE overflows in f16 (diffusers' force_upcast); keep it in f32 then.
        let vae_dtype = if dt == DType::F16 && architecture == Architecture::StableDiffusionXl {
            DType::F32
        } else {
            dt
        };
        let vae = AutoencoderKL::new(
            AutoencoderKL::load_config(&dir.join("vae"))?,
            &weights.component(dir, "vae", "diffusion_pytorch_model", opts, vae_dtype)?,
        )?;
        let tokenizer = ClipTokenizer::load(&dir.join("tokenizer"))?;
        let text_encoder = ClipTextModel::new(
            ClipTextModel::load_config(&dir.join("text_encoder"))?,
            &weights.component(dir, "text_encoder", "model", opts, dt)?,
        )?;
        let (tokenizer_2, text_encoder_2) = if architecture == Architecture::StableDiffusionXl {
            (
                Some(ClipTokenizer::load(&dir.join("tokenizer_2"))?),
                Some(ClipTextModel::new(
                    ClipTextModel::load_config(&dir.join("text_encoder_2"))?,
                    &weights.component(dir, "text_encoder_2", "model", opts, dt)?,
                )?),
            )
        } else {
            (None, None)
        };
        let sched_json = read_json(&dir.join("scheduler").join("scheduler_config.json"))?;
        let scheduler_config = SchedulerConfig::from_json(&sched_json)
            .map_err(|e| ModelError::Config(e.to_string()))?;
        let default_scheduler = scheduler_config
            .class_name
            .as_deref()
            .and_then(|c| SchedulerKind::from_class_name(c, &scheduler_config))
            .unwrap_or(SchedulerKind::Ddim);
        let defaults = super::defaults::ModelDefaults::load(dir)?;
        let default_scheduler = match &defaults.generate.scheduler {
            Some(s) => s.parse().map_err(|e| {
                ModelError::Config(format!("{}: scheduler: {e}", super::defaults::FILE_NAME))
            })?,
            None => default_scheduler,
        };
        let force_zeros_for_empty_prompt = index
            .get("force_zeros_for_empty_prompt")
            .and_then(|v| v.as_bool())
            .unwrap_or(architecture == Architecture::StableDiffusionXl);
        Ok(Self {
            dir: dir.to_path_buf(),
            architecture,
            tokenizer,
            text_encoder,
            tokenizer_2,
            text_encoder_2,
            unet,
            vae,
            scheduler_config,
            default_scheduler,
            force_zeros_for_empty_prompt,
            defaults,
            device: opts.device.clone(),
            dtype: dt,
        })
    }

    /// Attaches every part of `adapter` (UNet and text encoders) at `scale`; checks it all
    /// fits before anything changes. Layers the adapter does not name are cleared.
    pub fn attach_adapter(&self, adapter: &super::lora::LoraAdapter, scale: f64) -> Result<()> {
        adapter.attach(self.unet.linears(), scale, self.unet.dtype())?;
        adapter.attach_text(
            [
                Some(self.text_encoder.linears()),
                self.text_encoder_2.as_ref().map(|t| t.linears()),
            ],
            scale,
            self.dtype,
        )
    }

    /// Detaches every adapter: the UNet's and the text encoders' layers.
    pub fn detach_adapters(&self) {
        self.unet.linears().clear_all();
        self.text_encoder.linears().clear_all();
        if let Some(t) = &self.text_encoder_2 {
            t.linears().clear_all();
        }
    }

    pub fn vae_scale_factor(&self) -> usize {
        1 << (self.vae.config.block_out_channels.len() - 1)
    }

    pub fn latent_channels(&self) -> usize {
        self.vae.config.latent_channels
    }
}
