//! What a training run is asked to do and what it reports: the config (`dspo-server train
//! --config FILE`, and what POST /finetune builds), its hyperparameters and modes, and the
//! per-step metrics and outcome. The trainers, the checkpoint loop and the job layer all read
//! these; keeping them apart from the loops is what lets each loop import only this.

use super::dataset::DatasetStats;
use super::losses::Method;
use super::lora::LoraSpec;
use super::noise::TimestepBias;
use super::TrainError;
use candle_core::{DType, Device};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Hyperparameters {
    /// Preference strength. Defaults: dspo / dspo_e 0.001 (the paper's SD1.5 value),
    /// diffusion_dpo and dspo_sdxl 5000, diffusion_kto 1000; unused by sft.
    pub beta: Option<f64>,
    /// Peak learning rate; default: the official scaling 1e-8 x pairs per optimiser step.
    pub learning_rate: Option<f64>,
    /// Optimiser steps.
    pub max_steps: usize,
    /// Pairs per micro-batch.
    pub batch_size: usize,
    pub gradient_accumulation_steps: usize,
    /// Linear warmup from 0 (diffusers' constant_with_warmup).
    pub warmup_steps: usize,
    /// Training image side; default: the model's native size.
    pub resolution: Option<usize>,
    /// Probability that a pair's caption is replaced by "". Text-to-image models only; edit
    /// models take `conditioning_dropout`.
    pub caption_dropout: f64,
    /// InstructPix2Pix models: InstructPix2Pix's conditioning dropout, per pair: the
    /// instruction alone, the source image alone, and both are each dropped with this
    /// probability (at most 1/3), which the model's two guidance scales need. Default 0.05
    /// (the InstructPix2Pix recipe).
    pub conditioning_dropout: Option<f64>,
    /// Standard deviation of a per-channel constant added to the training noise (diffusers'
    /// `--noise_offset`), for a base model pretrained with offset noise: fine-tuning under
    /// another noise process than the model learned shifts what it reads from x_t's mean,
    /// i.e. flat colours. 0 (default): plain Gaussian noise, as the official trainers.
    /// Fine-tuning only; the text_to_image mode takes `pretrain.noise_offset`.
    pub noise_offset: f64,
    /// Weight of a data anchor added to the pair losses: the plain denoising MSE on both images
    /// of every pair. DSPO regresses the winners toward an extrapolated target (gain
    /// 1 / (1 - beta / 2) at the reference) and Diffusion-DPO only their margin, so nothing holds
    /// what the two images of a pair share, the caption's colour and background, where the data
    /// has it; the anchor does, and its loser half pulls against the preference only where the
    /// pair differs. 0 (default): the published losses. Not for sft, which is this loss already.
    pub anchor_weight: f64,
    pub seed: u64,
    /// Write a checkpoint every N optimiser steps (0: only at the end).
    pub checkpoint_every: usize,
    pub max_grad_norm: f64,
    pub weight_decay: f64,
    pub adam_beta1: f64,
    pub adam_beta2: f64,
    pub adam_eps: f64,
    pub random_crop: bool,
    /// SDXL: use the real image size as time ids (diffusers' script) instead of the official
    /// trainer's fixed [res, res, 0, 0, res, res].
    pub sdxl_real_time_ids: bool,
    /// Use only the first N usable pairs of the dataset (quick experiments, tests).
    pub max_pairs: Option<usize>,
    /// Recompute each UNet ResNet and transformer block in the backward pass instead of keeping
    /// its activations (diffusers' `gradient_checkpointing`): a step holds one block's
    /// activations at a time instead of the whole network's, for about one more forward pass
    /// of compute. Gradients are the same. Default: on for GPUs, where activations are what
    /// limits the batch; off on the CPU, where the fused kernels already keep less than PyTorch
    /// does without it and the recompute would cost 25-40% more time per step.
    pub gradient_checkpointing: Option<bool>,
    /// The drift guard checks every N optimiser steps (and after the last) how far the tuned
    /// model's images have moved from the base model's on a fixed probe: the first captions
    /// of the dataset, fixed seeds, a short sampling run. Default (null): every tenth of the
    /// run; 0 turns it off.
    pub drift_every: Option<usize>,
    /// Stop the job (error `drift_exceeded`) once the drift passes this: the mean absolute
    /// pixel difference from the base model's probe images, in [0, 1]. Default: report only.
    pub drift_limit: Option<f64>,
}

impl Default for Hyperparameters {
    fn default() -> Self {
        Self {
            beta: None,
            learning_rate: None,
            max_steps: 100,
            batch_size: 1,
            gradient_accumulation_steps: 1,
            warmup_steps: 500,
            resolution: None,
            caption_dropout: 0.2,
            conditioning_dropout: None,
            noise_offset: 0.0,
            anchor_weight: 0.0,
            seed: 0,
            checkpoint_every: 0,
            max_grad_norm: 1.0,
            weight_decay: 1e-2,
            adam_beta1: 0.9,
            adam_beta2: 0.999,
            adam_eps: 1e-8,
            random_crop: false,
            sdxl_real_time_ids: false,
            max_pairs: None,
            gradient_checkpointing: None,
            drift_every: None,
            drift_limit: None,
        }
    }
}

/// A training run (`dspo-server train --config FILE`, and what POST /finetune builds).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    /// Base model: a diffusers directory or a hub id.
    pub model: String,
    /// A Pick-a-Pic v2 schema parquet file.
    pub dataset: PathBuf,
    pub output_dir: PathBuf,
    pub method: Method,
    #[serde(default)]
    pub lora: Option<LoraSpec>,
    #[serde(default)]
    pub full_finetune: bool,
    #[serde(default)]
    pub hyperparameters: Hyperparameters,
    #[serde(default = "default_device")]
    pub device: String,
    /// Data-parallel training over these devices (e.g. `["cuda:0", "cuda:1"]`), one rank
    /// each, instead of `device`: every micro-batch of `batch_size` pairs is split evenly
    /// between the ranks, so the run computes the same weights for any number of them.
    /// Preference mode only.
    #[serde(default)]
    pub devices: Vec<String>,
    /// What is trained: preference pairs (default), or a model from image–caption rows.
    #[serde(default)]
    pub mode: TrainMode,
    /// Options of the `text_to_image` and `autoencoder` modes.
    #[serde(default)]
    pub pretrain: PretrainOptions,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TrainMode {
    /// Pick-a-Pic v2 pairs through `method` (LoRA or full UNet).
    #[default]
    Preference,
    /// Plain denoising on an image–caption parquet (`image`, `caption`): the whole UNet and
    /// optionally the text encoder, from whatever weights `model` holds (random ones included).
    TextToImage,
    /// The VAE alone on the images of an image–caption parquet (reconstruction + KL).
    Autoencoder,
}

fn default_device() -> String {
    "cpu".into()
}

impl TrainConfig {
    pub fn beta(&self) -> f64 {
        self.hyperparameters.beta.unwrap_or(match self.method {
            // The official launchers' values (DSPO's SDXL launcher included).
            Method::DiffusionDpo | Method::DspoSdxl => 5000.0,
            // The official Diffusion-KTO trainer's default.
            Method::DiffusionKto => 1000.0,
            _ => 0.001,
        })
    }

    /// How often the drift guard checks, in optimiser steps (0: never).
    pub fn drift_every(&self) -> usize {
        self.hyperparameters
            .drift_every
            .unwrap_or((self.hyperparameters.max_steps / 10).max(1))
    }

    pub fn pairs_per_step(&self) -> usize {
        self.hyperparameters.batch_size * self.hyperparameters.gradient_accumulation_steps
    }

    pub fn learning_rate(&self) -> f64 {
        self.hyperparameters
            .learning_rate
            .unwrap_or(1e-8 * self.pairs_per_step() as f64)
    }

    /// Everything that can be checked without loading the model.
    pub fn validate(&self) -> Result<(), TrainError> {
        let h = &self.hyperparameters;
        let bad = |m: String| Err(TrainError::Config(m));
        let ranks = self.devices.len();
        if ranks > 1 && h.batch_size % ranks != 0 {
            return bad(format!(
                "batch_size {} does not split evenly over {ranks} devices",
                h.batch_size
            ));
        }
        if ranks > 1 && self.mode != TrainMode::Preference {
            return bad("data-parallel training (devices) is for preference fine-tuning".into());
        }
        if self.method != Method::Sft && !(self.beta() > 0.0 && self.beta().is_finite()) {
            return bad(format!(
                "beta must be a positive number, got {}",
                self.beta()
            ));
        }
        if let Some(lr) = h.learning_rate {
            if !(lr > 0.0 && lr.is_finite()) {
                return bad(format!("learning_rate must be positive, got {lr}"));
            }
        }
        if h.max_steps == 0 {
            return bad("max_steps must be at least 1".into());
        }
        if let Some(d) = h.drift_limit {
            if !(d > 0.0 && d.is_finite()) {
                return bad(format!("drift_limit must be a positive number, got {d}"));
            }
        }
        if h.batch_size == 0 || h.gradient_accumulation_steps == 0 {
            return bad("batch_size and gradient_accumulation_steps must be at least 1".into());
        }
        if !(h.noise_offset >= 0.0 && h.noise_offset.is_finite()) {
            return bad(format!(
                "noise_offset must be a number >= 0, got {}",
                h.noise_offset
            ));
        }
        if !(h.anchor_weight >= 0.0 && h.anchor_weight.is_finite()) {
            return bad(format!(
                "anchor_weight must be a number >= 0, got {}",
                h.anchor_weight
            ));
        }
        if self.method == Method::Sft && h.anchor_weight != 0.0 {
            return bad(
                "anchor_weight is for the pair methods (dspo, diffusion_dpo, dspo_e): sft's loss \
                 already is the plain denoising MSE"
                    .into(),
            );
        }
        if !(0.0..=1.0).contains(&h.caption_dropout) {
            return bad(format!(
                "caption_dropout must be in [0, 1], got {}",
                h.caption_dropout
            ));
        }
        if let Some(p) = h.conditioning_dropout {
            if !(0.0..=1.0 / 3.0).contains(&p) {
                return bad(format!(
                    "conditioning_dropout must be in [0, 1/3] (the instruction, the image and \
                     both are each dropped with it), got {p}"
                ));
            }
        }
        if !(h.max_grad_norm > 0.0) {
            return bad("max_grad_norm must be positive".into());
        }
        if self.full_finetune && self.lora.is_some() {
            return bad("choose either lora or full_finetune, not both".into());
        }
        if let Some(l) = &self.lora {
            if l.rank == 0 {
                return bad("lora rank must be at least 1".into());
            }
            if !(l.alpha > 0.0) {
                return bad("lora alpha must be positive".into());
            }
        }
        if let Some(r) = h.resolution {
            if r == 0 || r % 8 != 0 {
                return bad(format!(
                    "resolution must be a positive multiple of 8, got {r}"
                ));
            }
        }
        Ok(())
    }
}

/// What every optimiser step reports.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StepMetrics {
    pub step: usize,
    pub total_steps: usize,
    pub loss: f64,
    /// Share of pairs with u > 0 (model prefers the winner more than the reference does).
    pub implicit_accuracy: Option<f64>,
    /// With `anchor_weight` > 0: the plain denoising MSE on both images of the step's pairs,
    /// before its weight (how far the model has left the data).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub anchor_mse: Option<f64>,
    pub learning_rate: f64,
    pub grad_norm: f64,
    pub seconds: f64,
    /// At the drift guard's checks: the mean absolute pixel difference (0-1) between the tuned
    /// and the base model's images of the probe.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drift: Option<f64>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainOutcome {
    /// The adapter (LoRA) or UNet directory (full fine-tuning) written.
    pub artifact: PathBuf,
    pub metrics: Vec<StepMetrics>,
    pub dataset: DatasetStats,
    pub resumed_from: Option<usize>,
}

impl TrainOutcome {
    /// The mean of a per-step figure over the last `n` steps that report it (what a run's
    /// summary and a registered adapter quote as its final loss and implicit accuracy).
    pub fn mean_of_last(&self, n: usize, f: impl Fn(&StepMetrics) -> Option<f64>) -> Option<f64> {
        let tail = &self.metrics[self.metrics.len().saturating_sub(n)..];
        let v: Vec<f64> = tail.iter().filter_map(f).collect();
        (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64)
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PretrainOptions {
    /// text_to_image: train the text encoder jointly with the UNet (a random CLIP trained
    /// with the UNet beats a frozen random one by far on a small caption language).
    pub train_text_encoder: bool,
    /// text_to_image: diffusers' `--noise_offset`, a per-channel constant added to the noise.
    /// Without it the model cannot move an image's mean far from the noise's mean at sampling
    /// time, and flat white or black backgrounds come out grey.
    pub noise_offset: f64,
    /// text_to_image: diffusers' `--snr_gamma` (Min-SNR-γ, Hang et al. 2023; 0 = off): each
    /// sample's loss is weighted by min(SNR(t), γ) / SNR(t) (/ (SNR(t) + 1) for v-prediction).
    /// Read as an error in x0, the ε-loss weights timestep t by SNR(t), so the low-noise steps
    /// (fine detail) dominate the gradient; capping the weight at γ moves it toward the noise
    /// levels where the layout is decided. The paper reports ~3x faster convergence at γ = 5.
    pub snr_gamma: f64,
    /// text_to_image: diffusers' `--timestep_bias_*` (strategy none / earlier / later / range,
    /// multiplier, portion, begin, end): draw some timesteps more often than uniform.
    pub timestep_bias: TimestepBias,
    /// autoencoder: weight of the KL term (per-element means, like the reconstruction term).
    pub kl_weight: f64,
    /// Decay the learning rate to zero on a cosine after warmup (else constant).
    pub cosine_decay: bool,
    /// Exponential moving average of the weights (0 = off); the written model holds the EMA.
    pub ema_decay: f64,
    /// dtype of the written weights: "f32", "f16" or "bf16".
    pub save_dtype: String,
    /// autoencoder: images whose latents set the VAE's `scaling_factor` (1 / their std).
    pub scaling_samples: usize,
    /// autoencoder: decode a posterior sample (a KL autoencoder, as SD's) rather than its mean.
    /// With `false` the model is a plain autoencoder whose latents are kept small by
    /// `kl_weight * mean(latent^2)`; it is written as an AutoencoderKL with a zero-variance
    /// posterior (logvar rows of quant_conv set to the clamp floor), so every pipeline that
    /// samples the posterior gets the mean. From random weights the sampled variant first has
    /// to learn to shrink a unit-variance posterior that drowns the signal, which stalled a
    /// small CPU budget at the "predict the mean image" loss.
    pub sample_posterior: bool,
    /// autoencoder: the reconstruction loss is taken in an orthonormal opponent colour basis
    /// (luma (R+G+B)/sqrt3, chroma (R-B)/sqrt2 and (R-2G+B)/sqrt6) with both chroma axes
    /// multiplied by this (1 = plain RGB for L2). Luma carries most of the pixel variance, so
    /// an autoencoder learns it first and hue much later: ours reconstructed white, light blue
    /// and beige as one colour after 400 steps. Weighting chroma up makes hue learnable on a
    /// CPU budget.
    pub chroma_weight: f64,
}

impl Default for PretrainOptions {
    fn default() -> Self {
        Self {
            train_text_encoder: false,
            noise_offset: 0.0,
            snr_gamma: 0.0,
            timestep_bias: Default::default(),
            kl_weight: 1e-6,
            cosine_decay: false,
            ema_decay: 0.0,
            save_dtype: "f32".into(),
            scaling_samples: 512,
            sample_posterior: true,
            chroma_weight: 1.0,
        }
    }
}

impl PretrainOptions {
    pub fn save_dtype(&self) -> Result<DType, TrainError> {
        crate::models::device::parse_dtype(&self.save_dtype)
            .map_err(|e| TrainError::Config(format!("pretrain.save_dtype: {e}")))
    }
}

pub(crate) fn parse_device(s: &str) -> Result<Device, TrainError> {
    crate::models::device::parse_device(s).map_err(TrainError::Config)
}

/// Seeds of independent streams derived from the run seed (splitmix64).
pub(crate) fn mix(seed: u64, k: u64) -> u64 {
    let mut z = seed.wrapping_add(0x9E37_79B9_7F4A_7C15u64.wrapping_mul(k.wrapping_add(1)));
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Loads a train config from TOML or JSON (by extension).
pub fn load_config(path: &Path) -> Result<TrainConfig, TrainError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| TrainError::Io(format!("{}: {e}", path.display())))?;
    if path.extension().and_then(|e| e.to_str()) == Some("json") {
        serde_json::from_str(&text)
            .map_err(|e| TrainError::Config(format!("{}: {e}", path.display())))
    } else {
        toml::from_str(&text).map_err(|e| TrainError::Config(format!("{}: {e}", path.display())))
    }
}
