//! StableDiffusionPipeline: text to image with classifier-free guidance.

use super::{
    decode_latents, denoise, encode_sd_cfg, Notes, PipelineError, Progress, PromptPair, Result,
    SamplingParams,
};
use crate::models::{Architecture, DiffusionModel};
use crate::rng::NoiseRng;
use crate::schedulers::make_scheduler;
use candle_core::Tensor;

/// `noise`: the initial latents `[N, C, h, w]` before `init_noise_sigma` (what diffusers takes
/// as `latents=`). Returns images `[N, 3, H, W]` in [0, 1].
pub(super) fn run(
    model: &DiffusionModel,
    prompts: &[PromptPair],
    params: &SamplingParams,
    noise: &Tensor,
    rng: &mut NoiseRng,
    progress: Progress<'_>,
    notes: &mut Notes,
) -> Result<Tensor> {
    if model.architecture != Architecture::StableDiffusion {
        return Err(PipelineError::Unsupported(
            model.architecture,
            "txt2img with the SD 1.x/2.x pipeline",
        ));
    }
    params.validate(model)?;
    let cfg = params.guidance_scale > 1.0;
    let embeds = encode_sd_cfg(model, prompts, cfg, notes)?;
    let mut sched = make_scheduler(params.scheduler, &model.scheduler_config, params.steps)?;
    let x = (noise.to_dtype(model.dtype)? * sched.init_noise_sigma())?;
    let guidance = cfg.then_some(params.guidance_scale);
    let x = denoise(
        model,
        sched.as_mut(),
        x,
        0,
        guidance,
        &embeds,
        None,
        rng,
        progress,
    )?;
    decode_latents(model, &x)
}
