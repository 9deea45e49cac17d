//! Orchestration only: encode prompts, run the denoising loop with a per-request scheduler,
//! decode. The maths lives in `models` and `schedulers`. Two entry points: [`run`] for a batch
//! whose noise and inputs are already tensors (conformance, benchmarks), and [`generate`] for
//! seeded requests (the server and `eval`), which draws the noise and calls `run`.
//!
//! Every pipeline takes a batch of requests that share shape, steps, scheduler and guidance
//! (what the server's batcher groups), each with its own prompt and its own noise.

mod img2img;
mod instruct_pix2pix;
mod requests;
mod sdxl;
mod txt2img;

pub use requests::{generate, Mode, SeededRequest, TaskParams};

use crate::models::{Architecture, DiffusionModel, ModelError};
use crate::rng::NoiseRng;
use crate::schedulers::{SchedulerError, SchedulerKind};
use candle_core::{DType, Tensor};

#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    #[error("invalid request: {0}")]
    Invalid(String),
    #[error("this model ({0:?}) does not support {1}")]
    Unsupported(Architecture, &'static str),
    #[error("cancelled")]
    Cancelled,
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Scheduler(#[from] SchedulerError),
    #[error(transparent)]
    Tensor(#[from] candle_core::Error),
}

pub type Result<T> = std::result::Result<T, PipelineError>;

/// Called after every denoising step with (steps done, total); returning false cancels.
pub type Progress<'a> = &'a mut dyn FnMut(usize, usize) -> bool;

/// Parameters shared by every item of a batch.
#[derive(Debug, Clone)]
pub struct SamplingParams {
    pub height: usize,
    pub width: usize,
    pub steps: usize,
    pub guidance_scale: f64,
    pub scheduler: SchedulerKind,
}

/// One prompt of a batch.
#[derive(Debug, Clone)]
pub struct PromptPair {
    pub prompt: String,
    /// `None` is diffusers' `negative_prompt=None` (SD: encode ""; SDXL: zeros).
    pub negative_prompt: Option<String>,
}

impl SamplingParams {
    pub fn validate(&self, model: &DiffusionModel) -> Result<(usize, usize)> {
        let f = model.vae_scale_factor();
        if self.height == 0 || self.width == 0 || self.height % f != 0 || self.width % f != 0 {
            return Err(PipelineError::Invalid(format!(
                "width and height must be positive multiples of {f}, got {}x{}",
                self.width, self.height
            )));
        }
        if !(self.guidance_scale.is_finite()) {
            return Err(PipelineError::Invalid(
                "guidance_scale must be finite".into(),
            ));
        }
        Ok((self.height / f, self.width / f))
    }
}

/// What a batch asks of the model, with the inputs the task needs besides prompts and noise.
#[derive(Debug, Clone, Copy)]
pub enum Task<'a> {
    Txt2Img,
    /// `image`: `[N, 3, H, W]` in [0, 1]; `vae_noise`: the posterior sample's noise, drawn
    /// before the forward noise as diffusers does.
    Img2Img {
        strength: f64,
        image: &'a Tensor,
        vae_noise: &'a Tensor,
    },
    /// `image`: the images to edit, `[N, 3, H, W]` in [0, 1].
    InstructPix2Pix {
        image_guidance_scale: f64,
        image: &'a Tensor,
    },
}

/// The one way to run a model: dispatches on the task and the model's architecture, and
/// returns the images `[N, 3, H, W]` in [0, 1]. `noise` is the initial latent noise, one row
/// per prompt; `progress` is called after every denoising step.
#[allow(clippy::too_many_arguments)]
pub fn run(
    model: &DiffusionModel,
    task: Task<'_>,
    prompts: &[PromptPair],
    params: &SamplingParams,
    noise: &Tensor,
    rng: &mut NoiseRng,
    progress: Progress<'_>,
    notes: &mut Notes,
) -> Result<Tensor> {
    match (task, model.architecture) {
        (Task::Txt2Img, Architecture::StableDiffusionXl) => {
            sdxl::run(model, prompts, params, noise, rng, progress, notes)
        }
        (Task::Txt2Img, _) => txt2img::run(model, prompts, params, noise, rng, progress, notes),
        (
            Task::Img2Img {
                strength,
                image,
                vae_noise,
            },
            _,
        ) => img2img::run(
            model, prompts, params, strength, image, vae_noise, noise, rng, progress, notes,
        ),
        (
            Task::InstructPix2Pix {
                image_guidance_scale,
                image,
            },
            _,
        ) => instruct_pix2pix::run(
            model,
            prompts,
            params,
            image_guidance_scale,
            image,
            noise,
            rng,
            progress,
            notes,
        ),
    }
}

/// A model's text conditioning of a batch of prompts.
pub struct Conditioning {
    /// `[N, 77, D]`: the text encoder's last hidden state (SD 1.x/2.x), or both encoders'
    /// penultimate states side by side (SDXL).
    pub embeds: Tensor,
    /// SDXL: the second encoder's pooled projection `[N, P]`.
    pub pooled: Option<Tensor>,
}

/// The one prompt-encoding path, for any architecture (the pipelines, training, evaluation).
pub fn encode_prompts(
    model: &DiffusionModel,
    prompts: &[&str],
    notes: &mut Notes,
) -> Result<Conditioning> {
    if model.architecture == Architecture::StableDiffusionXl {
        let e = sdxl::encode(model, prompts, notes)?;
        Ok(Conditioning {
            embeds: e.prompt_embeds,
            pooled: Some(e.pooled),
        })
    } else {
        Ok(Conditioning {
            embeds: encode_sd(model, prompts, notes)?,
            pooled: None,
        })
    }
}

/// Token ids of a batch of prompts as one `[N, L]` tensor, with a warning in `notes` for
/// each prompt cut at the tokenizer's limit.
pub(crate) fn token_ids(
    tokenizer: &crate::models::tokenizer::ClipTokenizer,
    prompts: &[&str],
    device: &candle_core::Device,
    notes: Option<&mut Notes>,
) -> Result<Tensor> {
    let mut ids = Vec::with_capacity(prompts.len());
    let mut cut = Vec::new();
    for p in prompts {
        let t = tokenizer.encode(p)?;
        if t.truncated > 0 {
            cut.push(t.truncated);
        }
        ids.push(t.ids);
    }
    if let Some(notes) = notes {
        for n in cut {
            notes.warnings.push(format!(
                "prompt truncated: the last {n} tokens exceed CLIP's {} token limit",
                tokenizer.max_len()
            ));
        }
    }
    let l = ids.first().map_or(tokenizer.max_len(), Vec::len);
    Ok(Tensor::from_vec(ids.concat(), (prompts.len(), l), device)?)
}

/// Warnings diffusers would log (prompt truncation).
#[derive(Debug, Default, Clone)]
pub struct Notes {
    pub warnings: Vec<String>,
}

/// CLIP-L style conditioning: `last_hidden_state` of `text_encoder` for each prompt, `[N,77,D]`.
pub(crate) fn encode_sd(
    model: &DiffusionModel,
    prompts: &[&str],
    notes: &mut Notes,
) -> Result<Tensor> {
    let ids = token_ids(&model.tokenizer, prompts, &model.device, Some(notes))?;
    Ok(model.text_encoder.forward(&ids)?.last_hidden_state)
}

/// Text conditioning for a batch: `[neg..., pos...]` under classifier-free guidance (the
/// diffusers batch order; a missing negative prompt encodes ""), else the prompts alone.
pub(crate) fn encode_sd_cfg(
    model: &DiffusionModel,
    prompts: &[PromptPair],
    cfg: bool,
    notes: &mut Notes,
) -> Result<Tensor> {
    let pos = prompts.iter().map(|p| p.prompt.as_str());
    if cfg {
        let neg = prompts
            .iter()
            .map(|p| p.negative_prompt.as_deref().unwrap_or(""));
        let all: Vec<&str> = neg.chain(pos).collect();
        encode_sd(model, &all, notes)
    } else {
        encode_sd(model, &pos.collect::<Vec<_>>(), notes)
    }
}

/// The denoising loop shared by txt2img, img2img and SDXL: steps `begin..` of the scheduler,
/// each `x_in = scale(cat([x, x]))` under guidance, one UNet call, CFG combine, scheduler step.
#[allow(clippy::too_many_arguments)]
pub(crate) fn denoise(
    model: &DiffusionModel,
    sched: &mut dyn crate::schedulers::Scheduler,
    mut x: Tensor,
    begin: usize,
    guidance: Option<f64>,
    embeds: &Tensor,
    added: Option<(&Tensor, &Tensor)>,
    rng: &mut crate::rng::NoiseRng,
    progress: Progress<'_>,
) -> Result<Tensor> {
    let n = x.dim(0)?;
    let timesteps = sched.timesteps().to_vec();
    let total = timesteps.len().saturating_sub(begin);
    for (k, i) in (begin..timesteps.len()).enumerate() {
        let x_in = if guidance.is_some() {
            Tensor::cat(&[&x, &x], 0)?
        } else {
            x.clone()
        };
        let x_in = sched.scale_model_input(&x_in, i)?;
        let cond = added.map(|(te, ids)| crate::models::unet::AddedCond {
            text_embeds: te,
            time_ids: ids,
        });
        let eps =
            model
                .unet
                .forward(&x_in, &timestep_tensor(timesteps[i], model)?, embeds, cond)?;
        let eps = match guidance {
            Some(g) => cfg_combine(&eps, n, g)?,
            None => eps,
        };
        x = sched.step(&eps, i, &x, rng)?;
        if !progress(k + 1, total) {
            return Err(PipelineError::Cancelled);
        }
    }
    Ok(x)
}

/// Final image in [0, 1], `[N, 3, H, W]` f32.
pub(crate) fn decode_latents(model: &DiffusionModel, latents: &Tensor) -> Result<Tensor> {
    let sf = model.vae.config.scaling_factor;
    let mut z = (latents.to_dtype(DType::F32)? / sf)?;
    if let Some(shift) = model.vae.config.shift_factor {
        z = (z + shift)?;
    }
    let img = model.vae.decode(&z)?.to_dtype(DType::F32)?;
    Ok(((img / 2.0)? + 0.5)?.clamp(0f32, 1f32)?)
}

/// `eps_u + g * (eps_c - eps_u)` for a batch laid out `[uncond..., cond...]`.
pub(crate) fn cfg_combine(eps: &Tensor, n: usize, g: f64) -> Result<Tensor> {
    let u = eps.narrow(0, 0, n)?;
    let c = eps.narrow(0, n, n)?;
    Ok((&u + ((c - &u)? * g)?)?)
}

pub(crate) fn timestep_tensor(t: f64, model: &DiffusionModel) -> Result<Tensor> {
    Ok(Tensor::new(&[t as f32], &model.device)?)
}

/// Converts `[N, 3, H, W]` images in [0, 1] to 8-bit RGB buffers (row-major HWC).
pub fn to_rgb8(images: &Tensor) -> Result<Vec<(usize, usize, Vec<u8>)>> {
    let (n, _, h, w) = images.dims4()?;
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let img = images
            .get(i)?
            .permute((1, 2, 0))?
            .contiguous()?
            .to_dtype(DType::F32)?;
        let data: Vec<f32> = img.flatten_all()?.to_vec1()?;
        // diffusers' numpy_to_pil: (x * 255).round()
        out.push((
            w,
            h,
            data.iter()
                .map(|v| (v * 255.0).round().clamp(0.0, 255.0) as u8)
                .collect(),
        ));
    }
    Ok(out)
}
