//! EulerDiscreteScheduler.

use super::common::{derivative_coeffs, lincomb, upcast, SigmaSchedule};
use super::{PredictionType, Result, Scheduler, SchedulerConfig};
use crate::rng::NoiseRng;
use candle_core::Tensor;

pub struct Euler {
    schedule: SigmaSchedule,
    prediction_type: PredictionType,
}

impl Euler {
    pub fn new(cfg: &SchedulerConfig, n: usize) -> Result<Self> {
        Ok(Self {
            schedule: SigmaSchedule::new(
                cfg,
                n,
                cfg.use_karras_sigmas,
                cfg.final_sigmas_type_zero,
            )?,
            prediction_type: cfg.prediction_type,
        })
    }

    #[cfg(test)]
    pub(super) fn sigmas(&self) -> &[f64] {
        &self.schedule.sigmas
    }
}

impl Scheduler for Euler {
    fn timesteps(&self) -> &[f64] {
        &self.schedule.timesteps
    }

    fn init_noise_sigma(&self) -> f64 {
        self.schedule.init_noise_sigma
    }

    fn scale_model_input(&self, sample: &Tensor, step_index: usize) -> Result<Tensor> {
        self.schedule.scale_model_input(sample, step_index)
    }

    fn step(
        &mut self,
        model_output: &Tensor,
        step_index: usize,
        sample: &Tensor,
        _rng: &mut NoiseRng,
    ) -> Result<Tensor> {
        let (sigma, sigma_next) = self.schedule.pair(step_index)?;
        let (x, m) = (upcast(sample)?, upcast(model_output)?);
        let dt = sigma_next - sigma;
        let (cx, cm) = derivative_coeffs(self.prediction_type, sigma);
        let prev = lincomb(&[(&x, 1.0 + dt * cx), (&m, dt * cm)])?;
        Ok(prev.to_dtype(sample.dtype())?)
    }

    fn add_noise(&self, original: &Tensor, noise: &Tensor, step_index: usize) -> Result<Tensor> {
        self.schedule.add_noise(original, noise, step_index)
    }
}

#[cfg(test)]
mod tests {
    use super::super::common::test_support::*;
    use super::super::common::*;
    use super::super::TimestepSpacing;
    use candle_core::DType;
    use super::*;

    /// diffusers builds the schedule in float32 (README section 4); ours is float64.
    pub(crate) fn close(a: f64, b: f64) -> bool {
        (a - b).abs() <= 1e-7 + 2e-5 * b.abs()
    }

    #[test]
    fn schedule_matches_reference_cases() {
        let cases = cases("euler");
        assert!(!cases.is_empty(), "no euler cases in the conformance suite");
        for case in &cases {
            let s = Euler::new(&case.cfg, case.steps).unwrap();
            assert_eq!(s.timesteps().len(), case.steps, "{}", case.name);
            assert_eq!(
                &s.timesteps()[case.t_start..],
                &case.timesteps[..],
                "{}",
                case.name
            );
            assert!(
                close(s.init_noise_sigma(), case.init_noise_sigma),
                "{}: init_noise_sigma {} vs {}",
                case.name,
                s.init_noise_sigma(),
                case.init_noise_sigma
            );
            let reference = case.f64s("debug", "sigmas");
            assert_eq!(s.sigmas().len(), reference.len(), "{}", case.name);
            for (k, (a, b)) in s.sigmas().iter().zip(&reference).enumerate() {
                assert!(close(*a, *b), "{} sigma[{k}]: {a} vs {b}", case.name);
            }
        }
    }

    #[test]
    fn add_noise_matches_img2img_reference() {
        let mut checked = 0;
        for case in cases("euler")
            .iter()
            .filter(|c| c.json["kind"] == "img2img")
        {
            let s = Euler::new(&case.cfg, case.steps).unwrap();
            let init = case.tensor("debug", "init_latents");
            let noise = case.tensor("inputs", "noise");
            let out = s.add_noise(&init, &noise, case.t_start).unwrap();
            let tol = &case.json["tolerance"];
            assert_within(
                &case.name,
                &values(&out),
                &case.f64s("debug", "noised_latents"),
                tol["max_abs"].as_f64().unwrap(),
                tol["rel_l2"].as_f64().unwrap(),
            );
            checked += 1;
        }
        assert!(checked > 0);
    }

    #[test]
    fn epsilon_step_by_hand() {
        let cfg = SchedulerConfig::default();
        let acp = cfg.alphas_cumprod();
        let sigma = |t: usize| ((1.0 - acp[t]) / acp[t]).sqrt();
        let mut s = Euler::new(&cfg, 8).unwrap();
        assert_eq!(&s.timesteps()[..2], &[876.0, 751.0]);
        let x = scalar_tensor(&[1.0]);
        let eps = scalar_tensor(&[0.5]);
        let out = values(&s.step(&eps, 0, &x, &mut NoiseRng::new(0)).unwrap())[0];
        let want = 1.0 + 0.5 * (sigma(751) - sigma(876));
        assert!((out - want).abs() < 1e-6, "{out} vs {want}");
        // Worked out independently in plain Python: sigma(876) = 7.371844, sigma(751) = 4.116696.
        assert!((out - -0.6275738).abs() < 1e-5);
        // scale_model_input divides by sqrt(sigma^2 + 1) of the current step.
        let scaled = values(&s.scale_model_input(&x, 0).unwrap())[0];
        assert!((scaled - 1.0 / (sigma(876).powi(2) + 1.0).sqrt()).abs() < 1e-7);
        // Last step goes to sigma 0: the result is the x0 prediction.
        let out = values(&s.step(&eps, 7, &x, &mut NoiseRng::new(0)).unwrap())[0];
        assert!((out - (1.0 - sigma(1) * 0.5)).abs() < 1e-6);
    }

    /// With `x = x0 + sigma * eps` and an exact model, each step lands on `x0 + sigma' * eps`.
    #[test]
    fn exact_model_follows_the_forward_process() {
        for pred in [PredictionType::Epsilon, PredictionType::VPrediction] {
            for spacing in [
                TimestepSpacing::Leading,
                TimestepSpacing::Linspace,
                TimestepSpacing::Trailing,
            ] {
                let cfg = SchedulerConfig {
                    prediction_type: pred,
                    timestep_spacing: spacing,
                    ..Default::default()
                };
                let mut s = Euler::new(&cfg, 7).unwrap();
                let (x0, eps) = (0.7f64, -0.4f64);
                for i in 0..7 {
                    let (sg, next) = (s.sigmas()[i], s.sigmas()[i + 1]);
                    let x = x0 + sg * eps;
                    let (alpha, sigma_t) =
                        (1.0 / (sg * sg + 1.0).sqrt(), sg / (sg * sg + 1.0).sqrt());
                    let out = match pred {
                        PredictionType::Epsilon => eps,
                        PredictionType::VPrediction => alpha * eps - sigma_t * x0,
                    };
                    let got = values(
                        &s.step(
                            &scalar_tensor(&[out as f32]),
                            i,
                            &scalar_tensor(&[x as f32]),
                            &mut NoiseRng::new(0),
                        )
                        .unwrap(),
                    )[0];
                    let want = x0 + next * eps;
                    assert!(
                        (got - want).abs() < 2e-5 * (1.0 + x.abs()),
                        "{pred:?} {spacing:?} {i}: {got} vs {want}"
                    );
                }
            }
        }
    }

    #[test]
    fn linspace_timesteps_are_not_rounded() {
        let cfg = SchedulerConfig {
            timestep_spacing: TimestepSpacing::Linspace,
            ..Default::default()
        };
        let s = Euler::new(&cfg, 4).unwrap();
        assert_eq!(s.timesteps(), &[999.0, 666.0, 333.0, 0.0]);
        let s = Euler::new(&cfg, 7).unwrap();
        assert_eq!(s.timesteps()[1], 832.5);
        // linspace / trailing start at the largest sigma itself.
        assert_eq!(s.init_noise_sigma(), s.sigmas()[0]);
        let train = training_sigmas(&cfg);
        assert!((s.sigmas()[1] - 0.5 * (train[832] + train[833])).abs() < 1e-12);
    }

    #[test]
    fn final_sigma_min() {
        let cfg = SchedulerConfig {
            final_sigmas_type_zero: false,
            ..Default::default()
        };
        let s = Euler::new(&cfg, 5).unwrap();
        assert_eq!(*s.sigmas().last().unwrap(), training_sigmas(&cfg)[0]);
    }

    #[test]
    fn karras_schedule() {
        let cfg = SchedulerConfig {
            use_karras_sigmas: true,
            ..Default::default()
        };
        let plain = Euler::new(&SchedulerConfig::default(), 10).unwrap();
        let s = Euler::new(&cfg, 10).unwrap();
        let (sig, ps) = (s.sigmas(), plain.sigmas());
        assert_eq!(sig.len(), 11);
        assert!((sig[0] - ps[0]).abs() < 1e-12 && (sig[9] - ps[9]).abs() < 1e-9);
        assert!(sig.windows(2).all(|w| w[0] > w[1]));
        // The Karras ramp is linear in sigma^(1/7).
        let r: Vec<f64> = sig[..10].iter().map(|x| x.powf(1.0 / 7.0)).collect();
        for k in 1..9 {
            assert!(((r[k + 1] - r[k]) - (r[k] - r[k - 1])).abs() < 1e-9);
        }
        // Timesteps are where the training sigmas (log-interpolated) reach those sigmas.
        let train = training_sigmas(&cfg);
        assert_eq!(s.timesteps()[0], 901.0);
        for (t, sg) in s.timesteps().iter().zip(sig) {
            let j = t.floor() as usize;
            let w = t - j as f64;
            let ls = (1.0 - w) * train[j].ln() + w * train[(j + 1).min(999)].ln();
            assert!((ls - sg.ln()).abs() < 1e-4, "t {t}: {} vs {}", ls.exp(), sg);
        }
    }

    #[test]
    fn sigma_to_t_inverts_training_sigmas() {
        let train = training_sigmas(&SchedulerConfig::default());
        let logs: Vec<f64> = train.iter().map(|s| s.ln()).collect();
        for k in [0usize, 1, 17, 500, 998, 999] {
            assert!((sigma_to_t(train[k], &logs) - k as f64).abs() < 1e-9, "{k}");
        }
        assert_eq!(sigma_to_t(1e-3, &logs), 0.0);
        assert_eq!(sigma_to_t(1e3, &logs), 999.0);
        assert!((sigma_to_t((train[10] * train[11]).sqrt(), &logs) - 10.5).abs() < 1e-9);
    }

    #[test]
    fn half_precision_step_keeps_dtype() {
        let cfg = SchedulerConfig::default();
        let mut s = Euler::new(&cfg, 8).unwrap();
        let x = scalar_tensor(&[1.0, 2.0]).to_dtype(DType::F16).unwrap();
        let out = s.step(&x, 0, &x, &mut NoiseRng::new(0)).unwrap();
        assert_eq!(out.dtype(), DType::F16);
    }
}
