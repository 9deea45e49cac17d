//! StableDiffusionXLPipeline: two text encoders (penultimate hidden states, pooled
//! projection) and micro-conditioning time ids.

use super::{
    decode_latents, denoise, Notes, PipelineError, Progress, PromptPair, Result, SamplingParams,
};
use crate::models::{Architecture, DiffusionModel};
use crate::rng::NoiseRng;
use crate::schedulers::make_scheduler;
use candle_core::Tensor;

pub(super) struct SdxlEmbeds {
    /// `[N, 77, d1 + d2]`
    pub prompt_embeds: Tensor,
    /// `[N, proj]`
    pub pooled: Tensor,
}

/// Encodes prompts with both encoders: concat of the penultimate layers, pooled from the second.
pub(super) fn encode(model: &DiffusionModel, prompts: &[&str], notes: &mut Notes) -> Result<SdxlEmbeds> {
    let (tok2, enc2) = match (&model.tokenizer_2, &model.text_encoder_2) {
        (Some(t), Some(e)) => (t, e),
        _ => {
            return Err(PipelineError::Unsupported(
                model.architecture,
                "SDXL text encoding",
            ))
        }
    };
    let mut hidden = Vec::new();
    let mut pooled = None;
    for (tok, enc, second) in [
        (&model.tokenizer, &model.text_encoder, false),
        (tok2, enc2, true),
    ] {
        // The second tokenizer cuts the same prompts: one warning, from the first, is enough.
        let ids = super::token_ids(tok, prompts, &model.device, (!second).then_some(&mut *notes))?;
        let out = enc.forward(&ids)?;
        hidden.push(out.penultimate);
        if second {
            pooled = Some(out.pooled);
        }
    }
    Ok(SdxlEmbeds {
        prompt_embeds: Tensor::cat(&hidden, 2)?,
        pooled: pooled.expect("second encoder ran"),
    })
}

pub(super) fn run(
    model: &DiffusionModel,
    prompts: &[PromptPair],
    params: &SamplingParams,
    noise: &Tensor,
    rng: &mut NoiseRng,
    progress: Progress<'_>,
    notes: &mut Notes,
) -> Result<Tensor> {
    if model.architecture != Architecture::StableDiffusionXl {
        return Err(PipelineError::Unsupported(
            model.architecture,
            "the SDXL pipeline",
        ));
    }
    params.validate(model)?;
    let n = prompts.len();
    let cfg = params.guidance_scale > 1.0;
    let pos: Vec<&str> = prompts.iter().map(|p| p.prompt.as_str()).collect();
    let pos_e = encode(model, &pos, notes)?;
    let (embeds, pooled) = if cfg {
        // Negatives: each item either encodes its text or (None + force_zeros) uses zeros.
        let mut neg_e = Vec::with_capacity(n);
        let mut neg_p = Vec::with_capacity(n);
        for (i, p) in prompts.iter().enumerate() {
            match (&p.negative_prompt, model.force_zeros_for_empty_prompt) {
                (None, true) => {
                    neg_e.push(pos_e.prompt_embeds.get(i)?.zeros_like()?);
                    neg_p.push(pos_e.pooled.get(i)?.zeros_like()?);
                }
                (neg, _) => {
                    let e = encode(model, &[neg.as_deref().unwrap_or("")], notes)?;
                    neg_e.push(e.prompt_embeds.get(0)?);
                    neg_p.push(e.pooled.get(0)?);
                }
            }
        }
        let neg_e = Tensor::stack(&neg_e, 0)?;
        let neg_p = Tensor::stack(&neg_p, 0)?;
        (
            Tensor::cat(&[&neg_e, &pos_e.prompt_embeds], 0)?,
            Tensor::cat(&[&neg_p, &pos_e.pooled], 0)?,
        )
    } else {
        (pos_e.prompt_embeds, pos_e.pooled)
    };
    let rows = embeds.dim(0)?;
    let (h, w) = (params.height as f32, params.width as f32);
    let ids: Vec<f32> = (0..rows).flat_map(|_| [h, w, 0.0, 0.0, h, w]).collect();
    let time_ids = Tensor::from_vec(ids, (rows, 6), &model.device)?.to_dtype(model.dtype)?;

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
        Some((&pooled, &time_ids)),
        rng,
        progress,
    )?;
    decode_latents(model, &x)
}
