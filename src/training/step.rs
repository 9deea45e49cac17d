//! The loss of one training batch, shared by the trainer and the conformance runner.

use super::losses::{self, Method};
use super::noise::NoiseSchedule;
use crate::models::nn::LoraDelta;
use crate::models::unet::{AddedCond, UNet2DConditionModel};
use candle_core::{DType, Result, Tensor};

/// A batch as the official trainers build it: for pair methods `2B` rows (winners, then
/// losers) sharing noise, timestep and text per pair; for SFT the winner half is used. Unpaired
/// data (Diffusion-KTO) has one row per image and its label.
pub struct Batch {
    pub x0: Tensor,
    pub noise: Tensor,
    pub timesteps: Vec<usize>,
    pub encoder_hidden_states: Tensor,
    /// SDXL: pooled text embeddings and time ids per row.
    pub added: Option<(Tensor, Tensor)>,
    /// InstructPix2Pix: the source image's latents per row (after conditioning dropout),
    /// concatenated to the noisy latents as the UNet's extra input channels.
    pub image_latents: Option<Tensor>,
    /// Unpaired rows: whether each image is desirable.
    pub labels: Option<Vec<bool>>,
}

/// InstructPix2Pix's conditioning dropout (its training script's rule, drawn once per pair so
/// both images of a pair see the same conditioning): with `u` uniform in [0, 1) and
/// probability `p`, the instruction is dropped when `u < 2p` and the source image when
/// `p <= u < 3p`, so each alone and both together are each dropped with probability `p`,
/// which classifier-free guidance on both conditions needs at inference.
/// Returns (instruction kept, image kept) per pair.
pub fn conditioning_dropout(u: &[f64], p: f64) -> Vec<(bool, bool)> {
    u.iter()
        .map(|&u| (u >= 2.0 * p, !(u >= p && u < 3.0 * p)))
        .collect()
}

/// Applies `keep` (from `conditioning_dropout`) to a pair batch's conditioning: `ehs` and
/// `image_latents` hold one row per pair; a dropped instruction becomes `null_ehs` (the
/// encoding of the empty prompt, one row), a dropped image zeros. Returns both, per pair.
pub fn apply_conditioning_dropout(
    ehs: &Tensor,
    null_ehs: &Tensor,
    image_latents: &Tensor,
    keep: &[(bool, bool)],
) -> Result<(Tensor, Tensor)> {
    let mut e = Vec::with_capacity(keep.len());
    let mut img_mask = Vec::with_capacity(keep.len());
    for (i, &(text, image)) in keep.iter().enumerate() {
        e.push(if text { ehs.narrow(0, i, 1)? } else { null_ehs.narrow(0, 0, 1)?.to_dtype(ehs.dtype())? });
        img_mask.push(if image { 1f32 } else { 0.0 });
    }
    let mut shape = vec![1usize; image_latents.rank()];
    shape[0] = keep.len();
    let mask = Tensor::from_vec(img_mask, shape, image_latents.device())?
        .to_dtype(image_latents.dtype())?;
    Ok((Tensor::cat(&e, 0)?, image_latents.broadcast_mul(&mask)?))
}

/// How the frozen reference prediction is obtained.
pub enum Reference<'a> {
    /// A separate frozen UNet (full fine-tuning).
    Model(&'a UNet2DConditionModel),
    /// The policy UNet with its LoRA adapters detached for the pass (no second model).
    AdaptersOff,
}

pub struct StepLoss {
    pub loss: Tensor,
    /// Pair methods: the implicit-reward margin `u` per pair.
    pub u: Option<Tensor>,
    pub model_pred: Tensor,
    /// With a data anchor: the plain denoising MSE over every row (winners and losers), before
    /// its weight, detached (for the step's metrics).
    pub anchor_mse: Option<Tensor>,
}

/// Runs `f` with every LoRA slot of `unet` holding `swap` of its delta, then puts the deltas
/// back.
fn with_adapters_as<T>(
    unet: &UNet2DConditionModel,
    swap: impl Fn(&LoraDelta) -> Option<LoraDelta>,
    f: impl FnOnce() -> T,
) -> T {
    let saved: Vec<_> = unet
        .linears()
        .all()
        .into_iter()
        .map(|(_, s, _, _)| (s.clone(), s.get()))
        .collect();
    for (s, d) in &saved {
        s.set(d.as_ref().and_then(&swap));
    }
    let out = f();
    for (s, d) in saved {
        s.set(d);
    }
    out
}

/// Runs `f` with every LoRA slot of `unet` empty (the base model), then puts them back.
pub fn with_adapters_off<T>(unet: &UNet2DConditionModel, f: impl FnOnce() -> T) -> T {
    with_adapters_as(unet, |_| None, f)
}

/// Runs `f` with every LoRA slot of `unet` holding a detached copy of its delta: the same
/// function, but nothing `f` computes records an autograd graph back to the trainable
/// matrices (a sampling run would otherwise keep every step's activations alive).
pub fn with_adapters_detached<T>(unet: &UNet2DConditionModel, f: impl FnOnce() -> T) -> T {
    with_adapters_as(
        unet,
        |d| {
            Some(LoraDelta {
                down: d.down.detach(),
                up: d.up.detach(),
                scale: d.scale,
            })
        },
        f,
    )
}

fn t_tensor(t: &[usize], like: &Tensor) -> Result<Tensor> {
    let v: Vec<f32> = t.iter().map(|&x| x as f32).collect();
    Tensor::from_vec(v, t.len(), like.device())
}

pub fn batch_loss(
    policy: &UNet2DConditionModel,
    reference: Reference<'_>,
    schedule: &NoiseSchedule,
    batch: &Batch,
    method: Method,
    beta: f64,
    anchor_weight: f64,
) -> Result<StepLoss> {
    if batch.labels.is_some() && method != Method::DiffusionKto {
        candle_core::bail!("unpaired rows train with diffusion_kto, not {}", method.name());
    }
    let _training = crate::models::nn::training_mode();
    let dtype = policy.dtype();
    let x0 = batch.x0.to_dtype(dtype)?;
    let noise = batch.noise.to_dtype(dtype)?;
    let ehs = batch.encoder_hidden_states.to_dtype(dtype)?;
    let noisy = schedule.add_noise(&x0, &noise, &batch.timesteps)?;
    let noisy = match &batch.image_latents {
        Some(c) => Tensor::cat(&[&noisy, &c.to_dtype(dtype)?], 1)?,
        None => noisy,
    };
    let target = schedule
        .target(&x0, &noise, &batch.timesteps)?
        .to_dtype(DType::F32)?;
    let added = match &batch.added {
        Some((te, ids)) => Some((te.to_dtype(dtype)?, ids.to_dtype(dtype)?)),
        None => None,
    };
    let cond = |rows: Option<usize>| -> Result<Option<(Tensor, Tensor)>> {
        Ok(match (&added, rows) {
            (Some((te, ids)), Some(b)) => Some((te.narrow(0, 0, b)?, ids.narrow(0, 0, b)?)),
            (Some((te, ids)), None) => Some((te.clone(), ids.clone())),
            (None, _) => None,
        })
    };
    if method == Method::Sft {
        // Pair batches (2B rows) train on their winner half, as the suite's SFT step does.
        let n = x0.dim(0)?;
        let b = if n % 2 == 0 { n / 2 } else { n };
        let c = cond(Some(b))?;
        let pred = policy.forward(
            &noisy.narrow(0, 0, b)?,
            &t_tensor(&batch.timesteps[..b], &x0)?,
            &ehs.narrow(0, 0, b)?,
            c.as_ref().map(|(te, ids)| AddedCond {
                text_embeds: te,
                time_ids: ids,
            }),
        )?;
        let loss = losses::sft(&pred.to_dtype(DType::F32)?, &target.narrow(0, 0, b)?)?;
        return Ok(StepLoss {
            loss,
            u: None,
            model_pred: pred,
            anchor_mse: None,
        });
    }
    let t = t_tensor(&batch.timesteps, &x0)?;
    let c = cond(None)?;
    let ac = || {
        c.as_ref().map(|(te, ids)| AddedCond {
            text_embeds: te,
            time_ids: ids,
        })
    };
    let model_pred = policy.forward(&noisy, &t, &ehs, ac())?;
    let ref_pred = match reference {
        Reference::Model(r) => r.forward(&noisy, &t, &ehs, ac())?.detach(),
        Reference::AdaptersOff => with_adapters_off(policy, || {
            policy
                .forward(&noisy.detach(), &t, &ehs.detach(), ac())
                .map(|r| r.detach())
        })?,
    };
    let pred32 = model_pred.to_dtype(DType::F32)?;
    let ref32 = ref_pred.to_dtype(DType::F32)?;
    let pl = match &batch.labels {
        Some(labels) => losses::kto(&pred32, &ref32, &target, beta, labels)?,
        None => losses::preference(method, &pred32, &ref32, &target, beta, 1.0)?,
    };
    let (loss, anchor_mse) = if anchor_weight > 0.0 {
        let a = losses::sft(&pred32, &target)?;
        ((pl.loss + (&a * anchor_weight)?)?, Some(a.detach()))
    } else {
        (pl.loss, None)
    };
    Ok(StepLoss {
        loss,
        u: Some(pl.u),
        model_pred,
        anchor_mse,
    })
}
