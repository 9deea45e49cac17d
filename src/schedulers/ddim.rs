//! DDIMScheduler (deterministic, eta = 0).
//!
//! This file also holds the numpy-compatible helpers that every scheduler's `set_timesteps`
//! relies on: matching diffusers timestep-for-timestep means matching numpy's rounding and
//! float `arange`, not just the formulas.

use super::{PredictionType, Result, Scheduler, SchedulerConfig, SchedulerError, TimestepSpacing};
use crate::rng::NoiseRng;
use candle_core::Tensor;

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

pub struct Ddim {
    timesteps: Vec<f64>,
    discrete: Vec<i64>,
    alphas_cumprod: Vec<f64>,
    final_alpha_cumprod: f64,
    /// diffusers steps back by `T // N` whatever the spacing, even where the actual spacing
    /// differs ("trailing" with N not dividing T).
    step_ratio: i64,
    prediction_type: PredictionType,
    clip_range: Option<f64>,
}

impl Ddim {
    pub fn new(cfg: &SchedulerConfig, n: usize) -> Result<Self> {
        if n == 0 || n > cfg.num_train_timesteps {
            return Err(SchedulerError::Steps {
                got: n,
                max: cfg.num_train_timesteps,
            });
        }
        let alphas_cumprod = plain_alphas_cumprod(cfg);
        let discrete = discrete_timesteps(cfg, n);
        for &t in &discrete {
            acp_at(&alphas_cumprod, t)?;
        }
        let final_alpha_cumprod = if cfg.set_alpha_to_one {
            1.0
        } else {
            alphas_cumprod[0]
        };
        Ok(Self {
            timesteps: discrete.iter().map(|&t| t as f64).collect(),
            discrete,
            alphas_cumprod,
            final_alpha_cumprod,
            step_ratio: (cfg.num_train_timesteps / n) as i64,
            prediction_type: cfg.prediction_type,
            clip_range: cfg.clip_sample.then_some(cfg.clip_sample_range),
        })
    }

    fn timestep(&self, step_index: usize) -> Result<i64> {
        self.discrete
            .get(step_index)
            .copied()
            .ok_or_else(|| step_out_of_range(step_index, self.discrete.len()))
    }
}

impl Scheduler for Ddim {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn step(
        &mut self,
        model_output: &Tensor,
        step_index: usize,
        sample: &Tensor,
        _rng: &mut NoiseRng,
    ) -> Result<Tensor> {
        let t = self.timestep(step_index)?;
        let prev_t = t - self.step_ratio;
        let a = acp_at(&self.alphas_cumprod, t)?;
        let a_prev = if prev_t >= 0 {
            acp_at(&self.alphas_cumprod, prev_t)?
        } else {
            self.final_alpha_cumprod
        };
        let (sa, sb) = (a.sqrt(), (1.0 - a).sqrt());
        let (pred_x0, pred_eps) = match self.prediction_type {
            PredictionType::Epsilon => (
                lincomb(&[(sample, 1.0 / sa), (model_output, -sb / sa)])?,
                model_output.clone(),
            ),
            PredictionType::VPrediction => (
                lincomb(&[(sample, sa), (model_output, -sb)])?,
                lincomb(&[(model_output, sa), (sample, sb)])?,
            ),
        };
        // Clipping changes only x0: diffusers keeps the unclipped epsilon for the direction term
        // (use_clipped_model_output is off in the pipelines).
        let pred_x0 = match self.clip_range {
            Some(r) => pred_x0.clamp(-r, r)?,
            None => pred_x0,
        };
        lincomb(&[
            (&pred_x0, a_prev.sqrt()),
            (&pred_eps, (1.0 - a_prev).sqrt()),
        ])
    }

    fn add_noise(&self, original: &Tensor, noise: &Tensor, step_index: usize) -> Result<Tensor> {
        let a = acp_at(&self.alphas_cumprod, self.timestep(step_index)?)?;
        lincomb(&[(original, a.sqrt()), (noise, (1.0 - a).sqrt())])
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

#[cfg(test)]
mod tests {
    use super::test_support::*;
    use super::*;

    fn rng() -> NoiseRng {
        NoiseRng::new(0)
    }

    #[test]
    fn timesteps_match_reference_cases() {
        let cases = cases("ddim");
        assert!(!cases.is_empty(), "no ddim cases in the conformance suite");
        for case in &cases {
            let s = Ddim::new(&case.cfg, case.steps).unwrap();
            assert_eq!(s.timesteps().len(), case.steps, "{}", case.name);
            assert_eq!(
                &s.timesteps()[case.t_start..],
                &case.timesteps[..],
                "{}",
                case.name
            );
            assert_eq!(s.init_noise_sigma(), case.init_noise_sigma, "{}", case.name);
        }
    }

    /// img2img's noising step against the stored intermediate (same pass rule as the suite).
    #[test]
    fn add_noise_matches_img2img_reference() {
        let mut checked = 0;
        for case in cases("ddim").iter().filter(|c| c.json["kind"] == "img2img") {
            let s = Ddim::new(&case.cfg, case.steps).unwrap();
            let init = case.tensor("debug", "init_latents");
            let noise = case.tensor("inputs", "noise");
            let out = s.add_noise(&init, &noise, case.t_start).unwrap();
            let reference = case.f64s("debug", "noised_latents");
            let tol = &case.json["tolerance"];
            assert_within(
                &case.name,
                &values(&out),
                &reference,
                tol["max_abs"].as_f64().unwrap(),
                tol["rel_l2"].as_f64().unwrap(),
            );
            checked += 1;
        }
        assert!(checked > 0);
    }

    #[test]
    fn trailing_and_linspace_spacing() {
        let mut cfg = SchedulerConfig {
            timestep_spacing: TimestepSpacing::Trailing,
            ..Default::default()
        };
        let s = Ddim::new(&cfg, 10).unwrap();
        let expect: Vec<f64> = (0..10).rev().map(|i| (i * 100 + 99) as f64).collect();
        assert_eq!(s.timesteps(), &expect[..]);
        // round(1000 - k*1000/3) - 1
        assert_eq!(
            Ddim::new(&cfg, 3).unwrap().timesteps(),
            &[999.0, 666.0, 332.0]
        );

        cfg.timestep_spacing = TimestepSpacing::Linspace;
        assert_eq!(
            Ddim::new(&cfg, 4).unwrap().timesteps(),
            &[999.0, 666.0, 333.0, 0.0]
        );
        // linspace(0, 999, 7) has 166.5, 499.5 and 832.5: numpy rounds half to even.
        assert_eq!(
            Ddim::new(&cfg, 7).unwrap().timesteps(),
            &[999.0, 832.0, 666.0, 500.0, 333.0, 166.0, 0.0]
        );
    }

    #[test]
    fn numpy_float_arange_quirk() {
        // 1000 / (1000 / 61) rounds to 61.00000000000001, so numpy makes 62 elements.
        let v = np_arange_down(1000.0, 1000.0 / 61.0);
        assert_eq!(v.len(), 62);
        assert!(v[61].abs() < 1e-9);
        assert_eq!(np_arange_down(1000.0, 100.0).len(), 10);
    }

    #[test]
    fn epsilon_step_by_hand() {
        let cfg = SchedulerConfig::default();
        let acp = cfg.alphas_cumprod();
        let mut s = Ddim::new(&cfg, 10).unwrap();
        assert_eq!(s.timesteps()[0], 901.0);
        let x = scalar_tensor(&[1.0, -0.5]);
        let eps = scalar_tensor(&[0.5, 2.0]);
        let out = values(&s.step(&eps, 0, &x, &mut rng()).unwrap());
        let (a, ap) = (acp[901], acp[801]);
        for (k, (xv, ev)) in [(1.0, 0.5), (-0.5, 2.0)].into_iter().enumerate() {
            let x0 = (xv - (1.0 - a).sqrt() * ev) / a.sqrt();
            let want = ap.sqrt() * x0 + (1.0 - ap).sqrt() * ev;
            assert!((out[k] - want).abs() < 1e-5, "{} vs {want}", out[k]);
        }
        // The same first value worked out independently (plain Python, float64 schedule:
        // acp[901] = 0.0140049, acp[801] = 0.0365465).
        assert!((out[0] - 1.3041598).abs() < 1e-5, "{}", out[0]);

        // Last step: t = 1, prev = -99 -> alphas_cumprod[0] (set_alpha_to_one = false).
        let out = values(&s.step(&eps, 9, &x, &mut rng()).unwrap());
        let (a, ap) = (acp[1], acp[0]);
        let x0 = (1.0 - (1.0 - a).sqrt() * 0.5) / a.sqrt();
        assert!((out[0] - (ap.sqrt() * x0 + (1.0 - ap).sqrt() * 0.5)).abs() < 1e-6);
    }

    #[test]
    fn set_alpha_to_one_lands_on_x0() {
        let cfg = SchedulerConfig {
            set_alpha_to_one: true,
            ..Default::default()
        };
        let acp = cfg.alphas_cumprod();
        let mut s = Ddim::new(&cfg, 10).unwrap();
        let x = scalar_tensor(&[0.3]);
        let eps = scalar_tensor(&[-1.2]);
        let out = values(&s.step(&eps, 9, &x, &mut rng()).unwrap())[0];
        let a = acp[1];
        let want = (0.3 - (1.0 - a).sqrt() * -1.2) / a.sqrt();
        assert!((out - want).abs() < 1e-6);
    }

    /// A sample that really is `sqrt(a) x0 + sqrt(1-a) eps` and a model that predicts exactly
    /// lands on `sqrt(a') x0 + sqrt(1-a') eps`, for both parametrisations.
    #[test]
    fn exact_model_follows_the_forward_process() {
        for pred in [PredictionType::Epsilon, PredictionType::VPrediction] {
            let cfg = SchedulerConfig {
                prediction_type: pred,
                ..Default::default()
            };
            let acp = cfg.alphas_cumprod();
            let mut s = Ddim::new(&cfg, 8).unwrap();
            let (x0, eps) = (0.7f64, -0.4f64);
            for i in 0..8 {
                let t = s.timesteps()[i] as usize;
                let a = acp[t];
                let x = a.sqrt() * x0 + (1.0 - a).sqrt() * eps;
                let out = match pred {
                    PredictionType::Epsilon => eps,
                    PredictionType::VPrediction => a.sqrt() * eps - (1.0 - a).sqrt() * x0,
                };
                let got = values(
                    &s.step(
                        &scalar_tensor(&[out as f32]),
                        i,
                        &scalar_tensor(&[x as f32]),
                        &mut rng(),
                    )
                    .unwrap(),
                )[0];
                let ap = if t >= 125 { acp[t - 125] } else { acp[0] };
                let want = ap.sqrt() * x0 + (1.0 - ap).sqrt() * eps;
                assert!(
                    (got - want).abs() < 1e-5,
                    "{pred:?} step {i}: {got} vs {want}"
                );
            }
        }
    }

    #[test]
    fn clip_sample_clamps_x0_only() {
        let cfg = SchedulerConfig {
            clip_sample: true,
            clip_sample_range: 1.0,
            ..Default::default()
        };
        let acp = cfg.alphas_cumprod();
        let mut s = Ddim::new(&cfg, 10).unwrap();
        let (x, e) = (3.0f64, 0.1f64);
        let got = values(
            &s.step(
                &scalar_tensor(&[e as f32]),
                0,
                &scalar_tensor(&[x as f32]),
                &mut rng(),
            )
            .unwrap(),
        )[0];
        let ap = acp[801];
        // x0 = (3 - sqrt(1-a)*0.1)/sqrt(a) is ~29, clipped to 1.
        let want = ap.sqrt() * 1.0 + (1.0 - ap).sqrt() * e;
        assert!((got - want).abs() < 1e-6);
    }

    #[test]
    fn steps_offset_past_the_schedule_is_an_error() {
        let cfg = SchedulerConfig::default();
        assert!(Ddim::new(&cfg, 1000).is_err());
        assert!(Ddim::new(&cfg, 0).is_err());
        let mut s = Ddim::new(&cfg, 4).unwrap();
        let x = scalar_tensor(&[0.0]);
        assert!(s.step(&x, 4, &x, &mut rng()).is_err());
    }
}
