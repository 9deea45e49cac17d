//! What a worker computes: a validated request, and what it knows about its model.
//!
//! A `GenerationTask` is only built by the HTTP layer's validation, so the worker never
//! re-checks input: past this type boundary every value is in range for the model.

pub use crate::adapters::AdapterChoice;
use crate::models::lora::LoraLayout;
use crate::models::{Architecture, DiffusionModel};
pub use crate::pipelines::{Mode, TaskParams};
use crate::pipelines::PromptPair;
use crate::schedulers::SchedulerKind;
use std::sync::Arc;

/// What a worker publishes once its model is loaded; validation reads it without touching
/// the weights (which only the worker thread may use).
#[derive(Debug, Clone)]
pub struct ModelInfo {
    pub name: String,
    pub source: String,
    pub architecture: Architecture,
    /// The size the UNet was trained at (`sample_size * vae_scale_factor`).
    pub native_size: usize,
    pub vae_scale_factor: usize,
    pub default_scheduler: SchedulerKind,
    pub num_train_timesteps: usize,
    /// Kept so validation can build a request's scheduler (cheap, no weights) and refuse a
    /// step count the schedule cannot produce before it reaches the worker.
    pub scheduler_config: crate::schedulers::SchedulerConfig,
    /// The model's own sampling defaults (steps, guidance), before the server's `[defaults]`.
    pub generate_defaults: crate::models::defaults::GenerateDefaults,
    /// What the model knows to draw, if its directory says.
    pub vocabulary: Option<serde_json::Value>,
    /// The layers a LoRA adapter may attach to, so an uploaded file is checked against the
    /// model before it is stored.
    pub lora_layout: Arc<LoraLayout>,
}

impl ModelInfo {
    pub fn from_model(name: &str, source: &str, model: &DiffusionModel) -> Self {
        Self {
            name: name.to_string(),
            source: source.to_string(),
            architecture: model.architecture,
            native_size: model.unet.config.sample_size * model.vae_scale_factor(),
            vae_scale_factor: model.vae_scale_factor(),
            default_scheduler: model.default_scheduler,
            num_train_timesteps: model.scheduler_config.num_train_timesteps,
            scheduler_config: model.scheduler_config.clone(),
            generate_defaults: model.defaults.generate.clone(),
            vocabulary: model.defaults.vocabulary.clone(),
            lora_layout: Arc::new(LoraLayout {
                unet: model.unet.linears().shapes(),
                text_encoders: std::iter::once(&model.text_encoder)
                    .chain(model.text_encoder_2.as_ref())
                    .map(|t| t.linears().shapes())
                    .collect(),
            }),
        }
    }

    pub fn modes(&self) -> &'static [Mode] {
        Mode::supported_by(self.architecture)
    }

    pub fn supports(&self, mode: Mode) -> bool {
        self.modes().contains(&mode)
    }
}

#[derive(Debug, Clone)]
pub struct GenerationTask {
    pub task: TaskParams,
    pub prompt: PromptPair,
    pub width: usize,
    pub height: usize,
    pub steps: usize,
    pub guidance_scale: f64,
    pub scheduler: SchedulerKind,
    pub adapter: Option<AdapterChoice>,
    /// One image per seed.
    pub seeds: Vec<u64>,
    /// Edits: the input, already at `width` x `height`.
    pub image: Option<Arc<image::RgbImage>>,
    /// What validation noticed but let through (e.g. a parameter this mode ignores); returned
    /// to the client with the images.
    pub warnings: Vec<String>,
}

/// Requests with equal keys can share one UNet batch: everything the pipelines take once per
/// batch (and the adapter, which is attached to the model as a whole) must agree. Floats are
/// compared by bits, so only identical values batch together.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchKey {
    mode: Mode,
    mode_param: u64,
    width: usize,
    height: usize,
    steps: usize,
    guidance_bits: u64,
    scheduler: SchedulerKind,
    adapter: Option<(String, u64)>,
}

impl GenerationTask {
    pub fn batch_key(&self) -> BatchKey {
        let mode_param = match self.task {
            TaskParams::Txt2Img => 0,
            TaskParams::Img2Img { strength } => strength.to_bits(),
            TaskParams::InstructPix2Pix {
                image_guidance_scale,
            } => image_guidance_scale.to_bits(),
        };
        BatchKey {
            mode: self.task.mode(),
            mode_param,
            width: self.width,
            height: self.height,
            steps: self.steps,
            guidance_bits: self.guidance_scale.to_bits(),
            scheduler: self.scheduler,
            adapter: self
                .adapter
                .as_ref()
                .map(|a| (a.name.clone(), a.scale.to_bits())),
        }
    }

    pub fn num_images(&self) -> usize {
        self.seeds.len()
    }
}

/// A finished request, in the order of its seeds.
#[derive(Debug, Clone)]
pub struct TaskOutput {
    pub images: Vec<image::RgbImage>,
    pub warnings: Vec<String>,
    /// From admission to the start of its batch.
    pub queue_ms: f64,
    /// The whole batch's compute time (shared by its requests).
    pub compute_ms: f64,
    /// Images in the batch this request ran in.
    pub batch_size: usize,
}
