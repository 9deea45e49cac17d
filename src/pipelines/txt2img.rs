//! StableDiffusionPipeline: text to image with classifier-free guidance.

use super::{cfg_combine, decode_latents, encode_sd, timestep_tensor, Notes, PipelineError, Progress, PromptPair, Result, SamplingParams};
use crate::models::{Architecture, DiffusionModel};
use crate::rng::NoiseRng;
use crate::schedulers::make_scheduler;
use candle_core::Tensor;

/// `noise`: the initial latents `[N, C, h, w]` before `init_noise_sigma` (what diffusers takes
/// as `latents=`). Returns images `[N, 3, H, W]` in [0, 1].
pub fn run(
    model: &DiffusionModel,
    prompts: &[PromptPair],
    params: &SamplingParams,
    noise: &Tensor,
    rng: &mut NoiseRng,
    progress: Progress<'_>,
    notes: &mut Notes,
) -> Result<Tensor> {
    if model.architecture != Architecture::StableDiffusion {
        return Err(PipelineError::Unsupported(model.architecture, "txt2img with the SD 1.x/2.x pipeline"));
    }
    params.validate(model)?;
    let n = prompts.len();
    let cfg = params.guidance_scale > 1.0;
    let pos: Vec<&str> = prompts.iter().map(|p| p.prompt.as_str()).collect();
    let embeds = if cfg {
        let neg: Vec<&str> = prompts.iter().map(|p| p.negative_prompt.as_deref().unwrap_or("")).collect();
        let all: Vec<&str> = neg.iter().chain(pos.iter()).copied().collect();
        encode_sd(model, &all, notes)?
    } else {
        encode_sd(model, &pos, notes)?
    };
    let mut sched = make_scheduler(params.scheduler, &model.scheduler_config, params.steps)?;
    let mut x = (noise.to_dtype(model.dtype)? * sched.init_noise_sigma())?;
    let timesteps = sched.timesteps().to_vec();
    let total = timesteps.len();
    for (i, &t) in timesteps.iter().enumerate() {
        let x_in = if cfg { Tensor::cat(&[&x, &x], 0)? } else { x.clone() };
        let x_in = sched.scale_model_input(&x_in, i)?;
        let eps = model.unet.forward(&x_in, &timestep_tensor(t, model)?, &embeds, None)?;
        let eps = if cfg { cfg_combine(&eps, n, params.guidance_scale)? } else { eps };
        x = sched.step(&eps, i, &x, rng)?;
        if !progress(i + 1, total) {
            return Err(PipelineError::Cancelled);
        }
    }
    decode_latents(model, &x)
}
