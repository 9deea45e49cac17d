//! EulerAncestralDiscreteScheduler ("Euler a"): an Euler step down to `sigma_down`, then fresh
//! noise of `sigma_up` so that the marginal noise level is `sigma_{i+1}` again.
//!
//! diffusers' class has neither Karras sigmas nor `final_sigmas_type`: it always ends at 0, so
//! those config fields are ignored here as they are there.

use super::common::{derivative_coeffs, lincomb, upcast, SigmaSchedule};
use super::{PredictionType, Result, Scheduler, SchedulerConfig};
use crate::rng::NoiseRng;
use candle_core::Tensor;

pub struct EulerAncestral {
    schedule: SigmaSchedule,
    prediction_type: PredictionType,
}

impl EulerAncestral {
    pub fn new(cfg: &SchedulerConfig, n: usize) -> Result<Self> {
        Ok(Self {
            schedule: SigmaSchedule::new(cfg, n, false, true)?,
            prediction_type: cfg.prediction_type,
        })
    }

    #[cfg(test)]
    pub(super) fn sigmas(&self) -> &[f64] {
        &self.schedule.sigmas
    }
}

/// `(sigma_up, sigma_down)` for a step from `from` to `to`.
fn ancestral_sigmas(from: f64, to: f64) -> (f64, f64) {
    let up = (to * to * (from * from - to * to) / (from * from)).sqrt();
    // sqrt(to^2 - up^2) simplifies to to^2/from, which cannot go negative through rounding.
    let down = to * to / from;
    (up, down)
}

impl Scheduler for EulerAncestral {
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
        rng: &mut NoiseRng,
    ) -> Result<Tensor> {
        let (sigma, sigma_next) = self.schedule.pair(step_index)?;
        let (up, down) = ancestral_sigmas(sigma, sigma_next);
        let (x, m) = (upcast(sample)?, upcast(model_output)?);
        let dt = down - sigma;
        let (cx, cm) = derivative_coeffs(self.prediction_type, sigma);
        // Drawn on every step, the last one (sigma_up = 0) included, like diffusers, so the
        // generator's position after a run does not depend on the step count's special cases.
        let noise = upcast(&rng.randn(sample.shape(), sample.device(), sample.dtype())?)?;
        let prev = lincomb(&[(&x, 1.0 + dt * cx), (&m, dt * cm), (&noise, up)])?;
        Ok(prev.to_dtype(sample.dtype())?)
    }

    fn add_noise(&self, original: &Tensor, noise: &Tensor, step_index: usize) -> Result<Tensor> {
        self.schedule.add_noise(original, noise, step_index)
    }
}

#[cfg(test)]
mod tests {
    use super::super::common::test_support::*;
    use super::super::euler::Euler;
    use super::super::TimestepSpacing;
    use super::*;

    /// The suite has no Euler-a case; its schedule is EulerDiscrete's, so check against the
    /// Euler cases' tables (timesteps, sigmas, init_noise_sigma).
    #[test]
    fn schedule_matches_euler_reference_cases() {
        let cases = cases("euler");
        assert!(!cases.is_empty());
        for case in &cases {
            let s = EulerAncestral::new(&case.cfg, case.steps).unwrap();
            assert_eq!(
                &s.timesteps()[case.t_start..],
                &case.timesteps[..],
                "{}",
                case.name
            );
            assert!(
                (s.init_noise_sigma() - case.init_noise_sigma).abs() < 2e-5 * case.init_noise_sigma
            );
            let reference = case.f64s("debug", "sigmas");
            assert_eq!(s.sigmas().len(), reference.len());
            for (a, b) in s.sigmas().iter().zip(&reference) {
                assert!(
                    (a - b).abs() <= 1e-7 + 2e-5 * b.abs(),
                    "{}: {a} vs {b}",
                    case.name
                );
            }
        }
    }

    #[test]
    fn same_schedule_as_euler_for_every_spacing() {
        for spacing in [
            TimestepSpacing::Leading,
            TimestepSpacing::Linspace,
            TimestepSpacing::Trailing,
        ] {
            let cfg = SchedulerConfig {
                timestep_spacing: spacing,
                ..Default::default()
            };
            let (a, e) = (
                EulerAncestral::new(&cfg, 9).unwrap(),
                Euler::new(&cfg, 9).unwrap(),
            );
            assert_eq!(a.timesteps(), e.timesteps());
            assert_eq!(a.sigmas(), e.sigmas());
            assert_eq!(a.init_noise_sigma(), e.init_noise_sigma());
        }
    }

    #[test]
    fn step_by_hand() {
        let cfg = SchedulerConfig::default();
        let mut s = EulerAncestral::new(&cfg, 8).unwrap();
        let (from, to) = (s.sigmas()[2], s.sigmas()[3]);
        let x = scalar_tensor(&[1.5, -0.25, 0.0]);
        let eps = scalar_tensor(&[0.5, 0.1, -2.0]);
        let out = values(&s.step(&eps, 2, &x, &mut NoiseRng::new(42)).unwrap());
        let noise = values(
            &NoiseRng::new(42)
                .randn(3, &candle_core::Device::Cpu, candle_core::DType::F32)
                .unwrap(),
        );
        let up = (to * to * (from * from - to * to) / (from * from)).sqrt();
        let down = (to * to - up * up).sqrt();
        for (k, (xv, ev)) in [(1.5, 0.5), (-0.25, 0.1), (0.0, -2.0)]
            .into_iter()
            .enumerate()
        {
            let x0 = xv - from * ev;
            let d = (xv - x0) / from;
            let want = xv + d * (down - from) + noise[k] * up;
            assert!((out[k] - want).abs() < 1e-5, "{k}: {} vs {want}", out[k]);
        }
    }

    #[test]
    fn last_step_is_deterministic_x0() {
        let cfg = SchedulerConfig {
            prediction_type: PredictionType::VPrediction,
            ..Default::default()
        };
        let mut s = EulerAncestral::new(&cfg, 6).unwrap();
        let sigma = s.sigmas()[5];
        let x = scalar_tensor(&[0.8]);
        let v = scalar_tensor(&[0.3]);
        let out = values(&s.step(&v, 5, &x, &mut NoiseRng::new(1)).unwrap())[0];
        let x0 = 0.3 * (-sigma / (sigma * sigma + 1.0).sqrt()) + 0.8 / (sigma * sigma + 1.0);
        assert!((out - x0).abs() < 1e-6, "{out} vs {x0}");
    }

    #[test]
    fn ancestral_sigmas_preserve_the_noise_level() {
        for (f, t) in [(14.6, 9.1), (1.0, 0.5), (0.04, 0.0)] {
            let (up, down) = ancestral_sigmas(f, t);
            assert!((up * up + down * down - t * t).abs() < 1e-12);
        }
    }
}
