//! StableDiffusionImg2ImgPipeline: noise an encoded image to `strength`, then denoise.

use super::{
    decode_latents, denoise, encode_sd_cfg, Notes, PipelineError, Progress, PromptPair, Result,
    SamplingParams,
};
use crate::models::{Architecture, DiffusionModel};
use crate::rng::NoiseRng;
use crate::schedulers::make_scheduler;
use candle_core::Tensor;

/// `image`: `[N, 3, H, W]` in [0, 1]. `vae_noise` and `noise` are the two normal draws of the
/// pipeline (posterior sample, then forward noising), each `[N, C, h, w]`.
#[allow(clippy::too_many_arguments)]
pub(super) fn run(
    model: &DiffusionModel,
    prompts: &[PromptPair],
    params: &SamplingParams,
    strength: f64,
    image: &Tensor,
    vae_noise: &Tensor,
    noise: &Tensor,
    rng: &mut NoiseRng,
    progress: Progress<'_>,
    notes: &mut Notes,
) -> Result<Tensor> {
    if model.architecture != Architecture::StableDiffusion {
        return Err(PipelineError::Unsupported(model.architecture, "img2img"));
    }
    if !(0.0..=1.0).contains(&strength) {
        return Err(PipelineError::Invalid(format!(
            "strength must be in [0, 1], got {strength}"
        )));
    }
    params.validate(model)?;
    let cfg = params.guidance_scale > 1.0;
    let embeds = encode_sd_cfg(model, prompts, cfg, notes)?;
    let mut sched = make_scheduler(params.scheduler, &model.scheduler_config, params.steps)?;
    let steps = params.steps;
    let init_timestep = ((steps as f64 * strength) as usize).min(steps);
    let t_start = steps - init_timestep;
    let begin = t_start * sched.order();
    let timesteps = sched.timesteps().to_vec();
    if begin >= timesteps.len() {
        return Err(PipelineError::Invalid(format!(
            "strength {strength} with {steps} steps leaves no denoising step; raise strength or steps"
        )));
    }
    let posterior = model.vae.encode(&((image * 2.0)? - 1.0)?)?;
    let init = (posterior.sample_with(&vae_noise.to_dtype(model.vae.dtype())?)?
        * model.vae.config.scaling_factor)?
        .to_dtype(model.dtype)?;
    let x = sched.add_noise(&init, &noise.to_dtype(model.dtype)?, begin)?;
    let guidance = cfg.then_some(params.guidance_scale);
    let x = denoise(
        model,
        sched.as_mut(),
        x,
        begin,
        guidance,
        &embeds,
        None,
        rng,
        progress,
    )?;
    decode_latents(model, &x)
}
