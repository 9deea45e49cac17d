//! The forward (training) noise process of DDPMScheduler, from the model's scheduler config.

use crate::schedulers::{PredictionType, SchedulerConfig};
use candle_core::{Result, Tensor};
use std::path::Path;

/// Training noise for latents of `(b, c, h, w)`: standard normal, plus, when `offset > 0`, a
/// per-(image, channel) constant of standard deviation `offset` (diffusers' `--noise_offset`).
/// Plain normal noise does not move an image's mean far, so a model trained on it alone keeps
/// flat colours (backgrounds) near the data average; a fine-tune of a model pretrained with
/// offset noise should see the same process. No extra draw is made at offset 0, so runs
/// without it reproduce the noise they always had.
pub fn training_noise(
    rng: &mut crate::rng::NoiseRng,
    (b, c, h, w): (usize, usize, usize, usize),
    offset: f64,
    device: &candle_core::Device,
) -> Result<Tensor> {
    let noise = rng.randn((b, c, h, w), device, candle_core::DType::F32)?;
    if offset > 0.0 {
        let shift = rng.randn((b, c, 1, 1), device, candle_core::DType::F32)?;
        return noise.broadcast_add(&(shift * offset)?);
    }
    Ok(noise)
}

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

    /// The distribution training draws timesteps from (uniform unless a bias is set).
    pub fn timestep_sampler(
        &self,
        bias: &TimestepBias,
    ) -> std::result::Result<TimestepSampler, String> {
        TimestepSampler::new(&bias.weights(self.num_train_timesteps())?)
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

/// diffusers' `--timestep_bias_*` options (train_text_to_image_sdxl.py), same names and
/// semantics: the timesteps a strategy selects get `multiplier` times the sampling weight of
/// the others. `earlier` / `later` select the first / last `portion` of the schedule, `range`
/// selects `[begin, end)`. Used to spend a training budget on the noise levels where a model
/// is weak (ours: shape is lost between t ≈ 300 and 650, docs/SHAPES.md).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TimestepBias {
    /// "none", "earlier", "later" or "range".
    pub strategy: String,
    pub multiplier: f64,
    pub portion: f64,
    pub begin: usize,
    pub end: usize,
}

impl Default for TimestepBias {
    fn default() -> Self {
        // diffusers' argparse defaults.
        Self {
            strategy: "none".into(),
            multiplier: 1.0,
            portion: 0.25,
            begin: 0,
            end: 1000,
        }
    }
}

impl TimestepBias {
    /// Unnormalised sampling weight of every timestep in `0..n`.
    pub fn weights(&self, n: usize) -> std::result::Result<Vec<f64>, String> {
        let mut w = vec![1.0; n];
        let selected = match self.strategy.as_str() {
            "none" => return Ok(w),
            "earlier" | "later" => {
                if !(self.portion > 0.0 && self.portion <= 1.0) {
                    return Err(format!(
                        "timestep_bias.portion must be in (0, 1], got {}",
                        self.portion
                    ));
                }
                let k = (self.portion * n as f64) as usize;
                if self.strategy == "earlier" {
                    0..k
                } else {
                    n - k..n
                }
            }
            "range" => {
                if self.begin >= self.end || self.end > n {
                    return Err(format!(
                        "timestep_bias begin..end must satisfy begin < end <= {n} (the schedule's \
                         num_train_timesteps), got {}..{}",
                        self.begin, self.end
                    ));
                }
                self.begin..self.end
            }
            o => {
                return Err(format!(
                    "timestep_bias.strategy must be none, earlier, later or range, got '{o}'"
                ))
            }
        };
        if !(self.multiplier.is_finite() && self.multiplier > 0.0) {
            return Err(format!(
                "timestep_bias.multiplier must be a finite number > 0, got {}",
                self.multiplier
            ));
        }
        for x in &mut w[selected] {
            *x *= self.multiplier;
        }
        Ok(w)
    }
}

/// Draws timesteps from fixed weights by inverting their cumulative distribution.
pub struct TimestepSampler {
    cdf: Vec<f64>,
}

impl TimestepSampler {
    pub fn new(weights: &[f64]) -> std::result::Result<Self, String> {
        let total: f64 = weights.iter().sum();
        if weights.is_empty() || !(total.is_finite() && total > 0.0) {
            return Err("timestep weights must be finite with a positive sum".into());
        }
        let mut acc = 0.0;
        let cdf = weights
            .iter()
            .map(|w| {
                acc += w / total;
                acc
            })
            .collect();
        Ok(Self { cdf })
    }

    /// The timestep for a uniform draw `u` in [0, 1).
    pub fn sample(&self, u: f64) -> usize {
        self.cdf
            .partition_point(|&c| c <= u)
            .min(self.cdf.len() - 1)
    }

    /// Probability of timestep `t`.
    pub fn probability(&self, t: usize) -> f64 {
        self.cdf[t] - if t == 0 { 0.0 } else { self.cdf[t - 1] }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// Per-(image, channel) means over `[b, c, h, w]`, flattened.
    fn channel_means(x: &Tensor) -> Vec<f32> {
        x.mean_keepdim(3)
            .unwrap()
            .mean_keepdim(2)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    }

    fn variance(v: &[f32]) -> f64 {
        let m = v.iter().map(|&x| x as f64).sum::<f64>() / v.len() as f64;
        v.iter().map(|&x| (x as f64 - m).powi(2)).sum::<f64>() / v.len() as f64
    }

    #[test]
    fn offset_noise_moves_each_channels_mean_by_the_offset() {
        // 512 images x 4 channels of 8x8: a channel mean of plain noise has variance 1/64; the
        // offset adds its own variance o^2 = 0.25 on top.
        let dev = Device::Cpu;
        let shape = (512, 4, 8, 8);
        let plain = training_noise(&mut crate::rng::NoiseRng::new(7), shape, 0.0, &dev).unwrap();
        let offset = training_noise(&mut crate::rng::NoiseRng::new(7), shape, 0.5, &dev).unwrap();
        let (vp, vo) = (
            variance(&channel_means(&plain)),
            variance(&channel_means(&offset)),
        );
        assert!((vp - 1.0 / 64.0).abs() < 0.004, "plain: {vp}");
        assert!((vo - (0.25 + 1.0 / 64.0)).abs() < 0.04, "offset: {vo}");
        // The same per-pixel draws underneath: offset 0 is exactly the noise it always was.
        let d = (offset - &plain).unwrap();
        let spread = variance(&d.flatten_all().unwrap().to_vec1::<f32>().unwrap());
        assert!((spread - 0.25).abs() < 0.04, "{spread}");
        let within = (d.broadcast_sub(&d.mean_keepdim(3).unwrap().mean_keepdim(2).unwrap()))
            .unwrap()
            .abs()
            .unwrap()
            .max_keepdim(0)
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(
            within < 1e-5,
            "the offset must be constant over each image's pixels: {within}"
        );
    }
}
