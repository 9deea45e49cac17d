//! DDIMScheduler (deterministic, eta = 0).

use super::{PredictionType, Result, Scheduler, SchedulerConfig, SchedulerError};
use super::common::{
    acp_at, discrete_timesteps, lincomb, plain_alphas_cumprod, step_out_of_range,
};
use crate::rng::NoiseRng;
use candle_core::Tensor;

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

#[cfg(test)]
mod tests {
    use super::super::common::test_support::*;
    use super::super::common::*;
    use super::super::TimestepSpacing;
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
