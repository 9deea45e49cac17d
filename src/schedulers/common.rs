//! What the schedulers share: the numpy-compatible arithmetic every `set_timesteps` relies on
//! (matching diffusers timestep for timestep means matching numpy's rounding and float
//! `arange`, not just the formulas), the sigma-space schedule of the Euler family and the
//! interpolation / Karras helpers DPM-Solver also uses, and the test harness that reads the
//! conformance suite.

use super::{PredictionType, Result, SchedulerConfig, SchedulerError, TimestepSpacing};
use candle_core::{DType, Tensor};

/// numpy's `round`: ties go to the even neighbour (`np.round(166.5) == 166`), where
/// `f64::round` would give 167 and shift a linspace timestep.
pub(super) fn np_round(x: f64) -> f64 {
    x.round_ties_even()
}

/// `np.linspace(start, stop, n)`: `i * step + start`, with the endpoint stored exactly.
pub(super) fn np_linspace(start: f64, stop: f64, n: usize) -> Vec<f64> {
    match n {
        0 => Vec::new(),
        1 => vec![start],
        _ => {
            let step = (stop - start) / (n - 1) as f64;
            let mut v: Vec<f64> = (0..n).map(|i| i as f64 * step + start).collect();
            v[n - 1] = stop;
            v
        }
    }
}

/// `np.arange(start, 0, -step)` for floats. numpy sizes the result as
/// `ceil((stop - start) / step)`, which for some step counts (e.g. 1000 / 61) is one more than
/// intended and yields a trailing element of ~1e-13; diffusers' "trailing" schedules inherit
/// that extra timestep, so we must too.
pub(super) fn np_arange_down(start: f64, step: f64) -> Vec<f64> {
    let len = ((0.0 - start) / -step).ceil();
    let len = if len > 0.0 { len as usize } else { 0 };
    let mut v = Vec::with_capacity(len);
    if len > 0 {
        v.push(start);
    }
    if len > 1 {
        // numpy stores `start + step` and then fills the rest from the difference of the first
        // two elements, which is not always bit-identical to `step`.
        let second = start - step;
        v.push(second);
        let delta = second - start;
        v.extend((2..len).map(|i| start + i as f64 * delta));
    }
    v
}

/// The integer timestep schedule of DDIM (and, reversed, PNDM), in denoising order.
pub(super) fn discrete_timesteps(cfg: &SchedulerConfig, n: usize) -> Vec<i64> {
    let t = cfg.num_train_timesteps;
    match cfg.timestep_spacing {
        TimestepSpacing::Leading => {
            let ratio = t / n;
            (0..n)
                .rev()
                .map(|i| (i * ratio + cfg.steps_offset) as i64)
                .collect()
        }
        TimestepSpacing::Trailing => np_arange_down(t as f64, t as f64 / n as f64)
            .into_iter()
            .map(|x| np_round(x) as i64 - 1)
            .collect(),
        TimestepSpacing::Linspace => np_linspace(0.0, (t - 1) as f64, n)
            .into_iter()
            .rev()
            .map(|x| np_round(x) as i64)
            .collect(),
    }
}

/// `alphas_cumprod` as DDIM/PNDM see it. `SchedulerConfig::alphas_cumprod` nudges the last value
/// to 2^-24 for zero-terminal-SNR schedules, but only the sigma-based schedulers do that in
/// diffusers; DDIM and PNDM keep the exact 0 (it is the point of zero SNR for them).
pub(super) fn plain_alphas_cumprod(cfg: &SchedulerConfig) -> Vec<f64> {
    let mut acc = 1.0;
    cfg.betas()
        .iter()
        .map(|b| {
            acc *= 1.0 - b;
            acc
        })
        .collect()
}

/// `alphas_cumprod[t]` with Python's indexing: the extra trailing timestep of
/// `np_arange_down` becomes -1, which torch reads as the last entry.
pub(super) fn acp_at(acp: &[f64], t: i64) -> Result<f64> {
    let len = acp.len() as i64;
    let idx = if t < 0 { t + len } else { t };
    if idx < 0 || idx >= len {
        return Err(SchedulerError::Config(format!(
            "timestep {t} is outside the {len} training timesteps (steps_offset too large for this step count?)"
        )));
    }
    Ok(acp[idx as usize])
}

/// `sum(c_i * t_i)` with the coefficients computed on the host, so a scheduler step is a few
/// scalar-times-tensor kernels and never reads the tensors back.
pub(super) fn lincomb(terms: &[(&Tensor, f64)]) -> Result<Tensor> {
    let scaled = |t: &Tensor, c: f64| -> Result<Tensor> {
        Ok(if c == 1.0 {
            t.clone()
        } else {
            t.affine(c, 0.0)?
        })
    };
    let (first, rest) = terms
        .split_first()
        .ok_or_else(|| SchedulerError::Config("empty linear combination".into()))?;
    let mut acc = scaled(first.0, first.1)?;
    for (t, c) in rest {
        acc = (acc + scaled(t, *c)?)?;
    }
    Ok(acc)
}

pub(super) fn step_out_of_range(step_index: usize, len: usize) -> SchedulerError {
    SchedulerError::Config(format!(
        "step index {step_index} is out of range for {len} timesteps"
    ))
}

/// Training sigmas `sqrt((1 - acp) / acp)`, indexed by training timestep.
pub(super) fn training_sigmas(cfg: &SchedulerConfig) -> Vec<f64> {
    cfg.alphas_cumprod()
        .iter()
        .map(|a| ((1.0 - a) / a).sqrt())
        .collect()
}

/// `np.interp(x, arange(len(fp)), fp)`: linear in between, clamped to the end values outside.
pub(super) fn np_interp(x: f64, fp: &[f64]) -> f64 {
    let last = fp.len() - 1;
    if x.is_nan() {
        return f64::NAN;
    }
    if x <= 0.0 {
        return fp[0];
    }
    if x >= last as f64 {
        return fp[last];
    }
    let j = x.floor() as usize;
    (fp[j + 1] - fp[j]) * (x - j as f64) + fp[j]
}

/// diffusers' `_sigma_to_t`: the fractional training timestep whose log-sigma (linearly
/// interpolated between neighbours) equals `ln(sigma)`.
pub(super) fn sigma_to_t(sigma: f64, log_sigmas: &[f64]) -> f64 {
    let log_sigma = sigma.max(1e-10).ln();
    let n = log_sigmas.len();
    // `argmax(cumsum(dists >= 0))` is the last index at or below log_sigma, or 0 if none.
    let low = log_sigmas
        .iter()
        .rposition(|&l| log_sigma - l >= 0.0)
        .unwrap_or(0)
        .min(n.saturating_sub(2));
    let high = (low + 1).min(n - 1);
    let (lo, hi) = (log_sigmas[low], log_sigmas[high]);
    let w = ((lo - log_sigma) / (lo - hi)).clamp(0.0, 1.0);
    (1.0 - w) * low as f64 + w * high as f64
}

/// Karras et al. (2022) sigmas, rho = 7, from `sigma_max` down to `sigma_min` in `n` steps.
pub(super) fn karras_sigmas(sigma_min: f64, sigma_max: f64, n: usize) -> Vec<f64> {
    let rho = 7.0;
    let (min_inv, max_inv) = (sigma_min.powf(1.0 / rho), sigma_max.powf(1.0 / rho));
    np_linspace(0.0, 1.0, n)
        .into_iter()
        .map(|r| (max_inv + r * (min_inv - max_inv)).powf(rho))
        .collect()
}

/// The float32 values diffusers stores: the UNet sees f32 timesteps, and the sigma
/// interpolation runs on them, so we round the same way to feed identical inputs.
fn as_f32(x: f64) -> f64 {
    x as f32 as f64
}

/// Half-precision models: diffusers upcasts the sample to float32 for Euler/DPM steps, because
/// `x + d * dt` with sigmas of order 10 loses visible precision in f16/bf16.
pub(super) fn upcast(t: &Tensor) -> Result<Tensor> {
    Ok(match t.dtype() {
        DType::F16 | DType::BF16 => t.to_dtype(DType::F32)?,
        _ => t.clone(),
    })
}

/// Timesteps and sigmas (one more sigma than timesteps) of the Euler-family schedulers.
pub(super) struct SigmaSchedule {
    pub timesteps: Vec<f64>,
    pub sigmas: Vec<f64>,
    pub init_noise_sigma: f64,
}

impl SigmaSchedule {
    pub fn new(cfg: &SchedulerConfig, n: usize, karras: bool, final_zero: bool) -> Result<Self> {
        let t = cfg.num_train_timesteps;
        if n == 0 || n > t {
            return Err(SchedulerError::Steps { got: n, max: t });
        }
        let mut timesteps: Vec<f64> = match cfg.timestep_spacing {
            // Unlike DDIM, Euler does not round linspace timesteps: the UNet gets fractions.
            TimestepSpacing::Linspace => np_linspace(0.0, (t - 1) as f64, n)
                .into_iter()
                .rev()
                .collect(),
            TimestepSpacing::Leading => {
                let ratio = t / n;
                (0..n)
                    .rev()
                    .map(|i| (i * ratio) as f64 + cfg.steps_offset as f64)
                    .collect()
            }
            TimestepSpacing::Trailing => np_arange_down(t as f64, t as f64 / n as f64)
                .into_iter()
                .map(|x| np_round(x) - 1.0)
                .collect(),
        };
        timesteps.iter_mut().for_each(|x| *x = as_f32(*x));

        let train = training_sigmas(cfg);
        let mut sigmas: Vec<f64> = timesteps.iter().map(|&ts| np_interp(ts, &train)).collect();
        if karras {
            // diffusers' Euler takes the Karras range from the interpolated inference sigmas
            // (first and last), not from the full training table as DPM-Solver does.
            let (max, min) = (sigmas[0], sigmas[sigmas.len() - 1]);
            sigmas = karras_sigmas(min, max, n);
            let log_sigmas: Vec<f64> = train.iter().map(|s| s.ln()).collect();
            timesteps = sigmas
                .iter()
                .map(|&s| as_f32(sigma_to_t(s, &log_sigmas)))
                .collect();
        }
        sigmas.push(if final_zero { 0.0 } else { train[0] });

        let max = sigmas.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        // "leading" starts from pure noise at a sigma that is not the largest training sigma,
        // and diffusers scales the initial noise to unit-variance-plus-signal for it.
        let init_noise_sigma = match cfg.timestep_spacing {
            TimestepSpacing::Linspace | TimestepSpacing::Trailing => max,
            TimestepSpacing::Leading => (max * max + 1.0).sqrt(),
        };
        Ok(Self {
            timesteps,
            sigmas,
            init_noise_sigma,
        })
    }

    /// `(sigma_i, sigma_{i+1})`.
    pub fn pair(&self, step_index: usize) -> Result<(f64, f64)> {
        if step_index >= self.timesteps.len() {
            return Err(step_out_of_range(step_index, self.timesteps.len()));
        }
        Ok((self.sigmas[step_index], self.sigmas[step_index + 1]))
    }

    pub fn scale_model_input(&self, sample: &Tensor, step_index: usize) -> Result<Tensor> {
        let (sigma, _) = self.pair(step_index)?;
        Ok(sample.affine(1.0 / (sigma * sigma + 1.0).sqrt(), 0.0)?)
    }

    pub fn add_noise(
        &self,
        original: &Tensor,
        noise: &Tensor,
        step_index: usize,
    ) -> Result<Tensor> {
        let (sigma, _) = self.pair(step_index)?;
        lincomb(&[(original, 1.0), (noise, sigma)])
    }
}

/// The ODE derivative `(x - x0) / sigma` as `cx * x + cm * model_output`. For epsilon it is the
/// model output itself; writing it out avoids the `x - (x - sigma*eps)` cancellation at small
/// sigma.
pub(super) fn derivative_coeffs(prediction: PredictionType, sigma: f64) -> (f64, f64) {
    match prediction {
        PredictionType::Epsilon => (0.0, 1.0),
        // x0 = -sigma/sqrt(s2) * v + x / s2 with s2 = sigma^2 + 1.
        PredictionType::VPrediction => {
            let s2 = sigma * sigma + 1.0;
            (sigma / s2, 1.0 / s2.sqrt())
        }
    }
}

/// Reading the conformance suite (`../shared/conformance`, diffusers 0.39.0 reference runs).
#[cfg(test)]
pub(crate) mod test_support {
    use super::super::SchedulerConfig;
    use candle_core::{Device, Tensor};
    use serde_json::Value;
    use std::collections::HashMap;
    use std::path::PathBuf;

    pub struct Case {
        pub name: String,
        pub json: Value,
        pub cfg: SchedulerConfig,
        pub steps: usize,
        /// diffusers img2img: the loop starts at `N - min(int(N * strength), N)`.
        pub t_start: usize,
        /// Timesteps of the loop (img2img: only those from `t_start`).
        pub timesteps: Vec<f64>,
        pub init_noise_sigma: f64,
        dir: PathBuf,
    }

    impl Case {
        pub fn tensors(&self) -> HashMap<String, Tensor> {
            let path = self.dir.join(format!("{}.safetensors", self.name));
            candle_core::safetensors::load(&path, &Device::Cpu)
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        }

        pub fn tensor(&self, role_group: &str, role: &str) -> Tensor {
            let name = self.json[role_group][role]
                .as_str()
                .unwrap_or_else(|| panic!("{}: no {role_group}.{role}", self.name));
            self.tensors()
                .remove(name)
                .unwrap_or_else(|| panic!("{}: tensor {name} missing", self.name))
        }

        pub fn f64s(&self, role_group: &str, role: &str) -> Vec<f64> {
            let t = self
                .tensor(role_group, role)
                .to_dtype(candle_core::DType::F64)
                .unwrap();
            t.flatten_all().unwrap().to_vec1::<f64>().unwrap()
        }
    }

    pub fn suite_dir() -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/conformance")
    }

    /// Every pipeline case run with `scheduler` (the `params.scheduler` name).
    pub fn cases(scheduler: &str) -> Vec<Case> {
        let dir = suite_dir().join("cases");
        let entries = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("conformance suite not found at {}: {e}", dir.display()));
        let mut out = Vec::new();
        for entry in entries {
            let path = entry.unwrap().path();
            if path.extension().and_then(|e| e.to_str()) != Some("json") {
                continue;
            }
            // Python's json writes -Infinity (DPM-Solver's lambda_min_clipped), which is not JSON.
            let text = std::fs::read_to_string(&path)
                .unwrap()
                .replace(": -Infinity", ": null")
                .replace(": Infinity", ": null")
                .replace(": NaN", ": null");
            let json: Value =
                serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            if json["params"]["scheduler"].as_str() != Some(scheduler) {
                continue;
            }
            let info = &json["info"];
            let cfg = SchedulerConfig::from_json(&info["scheduler_config"])
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            let steps = json["params"]["num_inference_steps"].as_u64().unwrap() as usize;
            let t_start = match json["params"]["strength"].as_f64() {
                Some(s) => steps - ((steps as f64 * s) as usize).min(steps),
                None => 0,
            };
            out.push(Case {
                name: path.file_stem().unwrap().to_str().unwrap().to_string(),
                cfg,
                steps,
                t_start,
                timesteps: info["timesteps"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|v| v.as_f64().unwrap())
                    .collect(),
                init_noise_sigma: info["init_noise_sigma"].as_f64().unwrap(),
                dir: dir.clone(),
                json,
            });
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }

    pub fn scalar_tensor(v: &[f32]) -> Tensor {
        Tensor::new(v, &Device::Cpu).unwrap()
    }

    pub fn values(t: &Tensor) -> Vec<f64> {
        t.to_dtype(candle_core::DType::F64)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f64>()
            .unwrap()
    }

    /// The suite's pass rule (README section 3) for one tensor.
    pub fn assert_within(name: &str, out: &[f64], reference: &[f64], max_abs: f64, rel_l2: f64) {
        assert_eq!(out.len(), reference.len(), "{name}: length");
        let mut worst = 0f64;
        let (mut num, mut den) = (0f64, 0f64);
        for (o, r) in out.iter().zip(reference) {
            worst = worst.max((o - r).abs());
            num += (o - r) * (o - r);
            den += r * r;
        }
        let rel = (num / den.max(f64::MIN_POSITIVE)).sqrt();
        assert!(worst <= max_abs, "{name}: max_abs {worst:e} > {max_abs:e}");
        assert!(rel <= rel_l2, "{name}: rel_l2 {rel:e} > {rel_l2:e}");
    }
}
