//! StableDiffusionInstructPix2PixPipeline: an 8-channel UNet conditioned on the input image's
//! latents, with text and image guidance.

use super::{
    decode_latents, encode_sd, timestep_tensor, Notes, PipelineError, Progress, PromptPair, Result,
    SamplingParams,
};
use crate::models::{Architecture, DiffusionModel};
use crate::rng::NoiseRng;
use crate::schedulers::make_scheduler;
use candle_core::Tensor;

#[allow(clippy::too_many_arguments)]
pub(super) fn run(
    model: &DiffusionModel,
    prompts: &[PromptPair],
    params: &SamplingParams,
    image_guidance_scale: f64,
    image: &Tensor,
    noise: &Tensor,
    rng: &mut NoiseRng,
    progress: Progress<'_>,
    notes: &mut Notes,
) -> Result<Tensor> {
    if model.architecture != Architecture::InstructPix2Pix {
        return Err(PipelineError::Unsupported(
            model.architecture,
            "instruct_pix2pix (it needs an 8-channel UNet)",
        ));
    }
    if !image_guidance_scale.is_finite() {
        return Err(PipelineError::Invalid(
            "image_guidance_scale must be finite".into(),
        ));
    }
    params.validate(model)?;
    let n = prompts.len();
    let g = params.guidance_scale;
    let ig = image_guidance_scale;
    let cfg = g > 1.0 && ig >= 1.0;
    let pos: Vec<&str> = prompts.iter().map(|p| p.prompt.as_str()).collect();
    // Batch layout under guidance: [text, uncond, uncond] x image latents [img, img, 0].
    let embeds = if cfg {
        let neg: Vec<&str> = prompts
            .iter()
            .map(|p| p.negative_prompt.as_deref().unwrap_or(""))
            .collect();
        let all: Vec<&str> = pos
            .iter()
            .chain(neg.iter())
            .chain(neg.iter())
            .copied()
            .collect();
        encode_sd(model, &all, notes)?
    } else {
        encode_sd(model, &pos, notes)?
    };
    let image_latents = model
        .vae
        .encode(&((image * 2.0)? - 1.0)?)?
        .mode()
        .to_dtype(model.dtype)?;
    let image_latents = if cfg {
        Tensor::cat(
            &[&image_latents, &image_latents, &image_latents.zeros_like()?],
            0,
        )?
    } else {
        image_latents
    };
    let mut sched = make_scheduler(params.scheduler, &model.scheduler_config, params.steps)?;
    let mut x = (noise.to_dtype(model.dtype)? * sched.init_noise_sigma())?;
    let timesteps = sched.timesteps().to_vec();
    let total = timesteps.len();
    for (i, &t) in timesteps.iter().enumerate() {
        let x_in = if cfg {
            Tensor::cat(&[&x, &x, &x], 0)?
        } else {
            x.clone()
        };
        let x_in = sched.scale_model_input(&x_in, i)?;
        let x_in = Tensor::cat(&[&x_in, &image_latents], 1)?;
        let eps = model
            .unet
            .forward(&x_in, &timestep_tensor(t, model)?, &embeds, None)?;
        let eps = if cfg {
            let e_text = eps.narrow(0, 0, n)?;
            let e_img = eps.narrow(0, n, n)?;
            let e_unc = eps.narrow(0, 2 * n, n)?;
            ((&e_unc + ((e_text - &e_img)? * g)?)? + ((e_img - &e_unc)? * ig)?)?
        } else {
            eps
        };
        x = sched.step(&eps, i, &x, rng)?;
        if !progress(i + 1, total) {
            return Err(PipelineError::Cancelled);
        }
    }
    decode_latents(model, &x)
}
