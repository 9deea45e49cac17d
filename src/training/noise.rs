//! The forward (training) noise process of DDPMScheduler, from the model's scheduler config.

use crate::schedulers::{PredictionType, SchedulerConfig};
use candle_core::{Result, Tensor};
use std::path::Path;

pub struct NoiseSchedule {
    pub alphas_cumprod: Vec<f64>,
    pub prediction_type: PredictionType,
}

impl NoiseSchedule {
    pub fn new(cfg: &SchedulerConfig) -> Self {
        // DDPMScheduler.from_config: absent keys take the class defaults (same betas as DDIM).
        let cfg = cfg.for_kind(crate::schedulers::SchedulerKind::Ddim);
        Self {
            alphas_cumprod: cfg.alphas_cumprod(),
            prediction_type: cfg.prediction_type,
        }
    }

    pub fn from_model_dir(dir: &Path) -> anyhow::Result<Self> {
        let cfg = SchedulerConfig::from_file(&dir.join("scheduler").join("scheduler_config.json"))?;
        Ok(Self::new(&cfg))
    }

    pub fn num_train_timesteps(&self) -> usize {
        self.alphas_cumprod.len()
    }

    fn coef(&self, x: &Tensor, t: &[usize], f: impl Fn(f64) -> f64) -> Result<Tensor> {
        let n = x.dim(0)?;
        if t.len() != n {
            candle_core::bail!("{} timesteps for a batch of {n}", t.len());
        }
        let mut v = Vec::with_capacity(n);
        for &ti in t {
            let a = *self
                .alphas_cumprod
                .get(ti)
                .ok_or_else(|| candle_core::Error::Msg(format!("timestep {ti} out of range")))?;
            v.push(f(a) as f32);
        }
        let mut shape = vec![1usize; x.rank()];
        shape[0] = n;
        Tensor::from_vec(v, shape, x.device())?.to_dtype(x.dtype())
    }

    /// `sqrt(acp[t]) * x0 + sqrt(1 - acp[t]) * noise`, one `t` per row.
    pub fn add_noise(&self, x0: &Tensor, noise: &Tensor, t: &[usize]) -> Result<Tensor> {
        let a = self.coef(x0, t, f64::sqrt)?;
        let s = self.coef(x0, t, |a| (1.0 - a).sqrt())?;
        x0.broadcast_mul(&a)? + noise.broadcast_mul(&s)?
    }

    /// `sqrt(acp[t]) * noise - sqrt(1 - acp[t]) * x0`: the v-prediction target.
    pub fn velocity(&self, x0: &Tensor, noise: &Tensor, t: &[usize]) -> Result<Tensor> {
        let a = self.coef(x0, t, f64::sqrt)?;
        let s = self.coef(x0, t, |a| (1.0 - a).sqrt())?;
        noise.broadcast_mul(&a)? - x0.broadcast_mul(&s)?
    }

    /// Min-SNR-γ loss weights, one per timestep, as diffusers' train_text_to_image.py
    /// (`--snr_gamma`): SNR(t) = acp / (1 − acp); min(SNR, γ) / SNR for ε-prediction,
    /// min(SNR, γ) / (SNR + 1) for v-prediction.
    pub fn min_snr_weights(&self, t: &[usize], gamma: f64) -> Vec<f64> {
        t.iter()
            .map(|&ti| {
                let a = self.alphas_cumprod[ti];
                let snr = a / (1.0 - a);
                match self.prediction_type {
                    PredictionType::Epsilon => snr.min(gamma) / snr,
                    PredictionType::VPrediction => snr.min(gamma) / (snr + 1.0),
                }
            })
            .collect()
    }

    /// The regression target for the model's prediction type.
    pub fn target(&self, x0: &Tensor, noise: &Tensor, t: &[usize]) -> Result<Tensor> {
        match self.prediction_type {
            PredictionType::Epsilon => Ok(noise.clone()),
            PredictionType::VPrediction => self.velocity(x0, noise, t),
        }
    }
}
