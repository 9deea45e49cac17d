//! PNDMScheduler in its PLMS form (`skip_prk_steps = true`, what Stable Diffusion ships).
//!
//! A config with `skip_prk_steps = false` (diffusers' class default, which would start with
//! Runge-Kutta steps) still gets PLMS here: `SchedulerConfig` does not carry that field, and the
//! Stable Diffusion checkpoints we serve all set it to true.

use super::common::{acp_at, discrete_timesteps, lincomb, plain_alphas_cumprod, step_out_of_range};
use super::{PredictionType, Result, Scheduler, SchedulerConfig, SchedulerError};
use crate::rng::NoiseRng;
use candle_core::Tensor;

pub struct Pndm {
    timesteps: Vec<f64>,
    discrete: Vec<i64>,
    alphas_cumprod: Vec<f64>,
    final_alpha_cumprod: f64,
    step_ratio: i64,
    prediction_type: PredictionType,
    /// Number of `step` calls so far; the first two are special (see `step`).
    counter: usize,
    /// Past model outputs, oldest first, at most four.
    ets: Vec<Tensor>,
    /// The sample of the first call, which the second call steps from again.
    cur_sample: Option<Tensor>,
}

impl Pndm {
    pub fn new(cfg: &SchedulerConfig, n: usize) -> Result<Self> {
        if n == 0 || n > cfg.num_train_timesteps {
            return Err(SchedulerError::Steps {
                got: n,
                max: cfg.num_train_timesteps,
            });
        }
        let alphas_cumprod = plain_alphas_cumprod(cfg);
        // diffusers' `_timesteps` is the DDIM schedule in ascending order; PLMS repeats the
        // second-largest timestep so its first step can be redone as a two-point average.
        let ascending: Vec<i64> = discrete_timesteps(cfg, n).into_iter().rev().collect();
        let len = ascending.len();
        let mut plms: Vec<i64> = ascending[..len - 1].to_vec();
        if len >= 2 {
            plms.push(ascending[len - 2]);
        }
        plms.push(ascending[len - 1]);
        plms.reverse();
        for &t in &plms {
            acp_at(&alphas_cumprod, t)?;
        }
        let final_alpha_cumprod = if cfg.set_alpha_to_one {
            1.0
        } else {
            alphas_cumprod[0]
        };
        Ok(Self {
            timesteps: plms.iter().map(|&t| t as f64).collect(),
            discrete: plms,
            alphas_cumprod,
            final_alpha_cumprod,
            step_ratio: (cfg.num_train_timesteps / n) as i64,
            prediction_type: cfg.prediction_type,
            counter: 0,
            ets: Vec::with_capacity(4),
            cur_sample: None,
        })
    }

    /// Formula (9) of the PNDM paper: the DDIM-like transfer from `t` to `prev_t` with the
    /// (combined) noise estimate `eps`.
    fn prev_sample(
        &self,
        sample: &Tensor,
        t: i64,
        prev_t: i64,
        model_output: &Tensor,
    ) -> Result<Tensor> {
        let a = acp_at(&self.alphas_cumprod, t)?;
        let a_prev = if prev_t >= 0 {
            acp_at(&self.alphas_cumprod, prev_t)?
        } else {
            self.final_alpha_cumprod
        };
        let (b, b_prev) = (1.0 - a, 1.0 - a_prev);
        let sample_coeff = (a_prev / a).sqrt();
        let denom = a * b_prev.sqrt() + (a * b * a_prev).sqrt();
        let eps_coeff = -(a_prev - a) / denom;
        match self.prediction_type {
            PredictionType::Epsilon => {
                lincomb(&[(sample, sample_coeff), (model_output, eps_coeff)])
            }
            // eps = sqrt(a) v + sqrt(1-a) x, folded into the two coefficients.
            PredictionType::VPrediction => lincomb(&[
                (sample, sample_coeff + eps_coeff * b.sqrt()),
                (model_output, eps_coeff * a.sqrt()),
            ]),
        }
    }
}

impl Scheduler for Pndm {
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
        let mut t = *self
            .discrete
            .get(step_index)
            .ok_or_else(|| step_out_of_range(step_index, self.discrete.len()))?;
        let mut prev_t = t - self.step_ratio;
        if self.counter != 1 {
            if self.ets.len() > 3 {
                self.ets.remove(0);
            }
            self.ets.push(model_output.clone());
        } else {
            // The second call re-runs the first transfer (same start, same target) with the
            // average of both noise estimates: a Heun-like bootstrap for the multistep history.
            prev_t = t;
            t += self.step_ratio;
        }

        let e = &self.ets;
        let mut from = sample.clone();
        let eps = match (e.len(), self.counter) {
            (1, 0) => {
                self.cur_sample = Some(sample.clone());
                model_output.clone()
            }
            (1, 1) => {
                if let Some(s) = self.cur_sample.take() {
                    from = s;
                }
                lincomb(&[(model_output, 0.5), (&e[0], 0.5)])?
            }
            (2, _) => lincomb(&[(&e[1], 1.5), (&e[0], -0.5)])?,
            (3, _) => lincomb(&[
                (&e[2], 23.0 / 12.0),
                (&e[1], -16.0 / 12.0),
                (&e[0], 5.0 / 12.0),
            ])?,
            (_, _) => lincomb(&[
                (&e[3], 55.0 / 24.0),
                (&e[2], -59.0 / 24.0),
                (&e[1], 37.0 / 24.0),
                (&e[0], -9.0 / 24.0),
            ])?,
        };
        let prev = self.prev_sample(&from, t, prev_t, &eps)?;
        self.counter += 1;
        Ok(prev)
    }

    fn add_noise(&self, original: &Tensor, noise: &Tensor, step_index: usize) -> Result<Tensor> {
        let t = *self
            .discrete
            .get(step_index)
            .ok_or_else(|| step_out_of_range(step_index, self.discrete.len()))?;
        let a = acp_at(&self.alphas_cumprod, t)?;
        lincomb(&[(original, a.sqrt()), (noise, (1.0 - a).sqrt())])
    }
}

#[cfg(test)]
mod tests {
    use super::super::common::test_support::*;
    use super::super::ddim::Ddim;
    use super::super::TimestepSpacing;
    use super::*;

    fn step(s: &mut Pndm, out: f64, i: usize, x: f64) -> f64 {
        values(
            &s.step(
                &scalar_tensor(&[out as f32]),
                i,
                &scalar_tensor(&[x as f32]),
                &mut NoiseRng::new(0),
            )
            .unwrap(),
        )[0]
    }

    /// The suite has no PNDM case; PLMS timesteps are the DDIM ones with the second entry
    /// repeated, so check against the full-length DDIM cases' tables.
    #[test]
    fn timesteps_from_reference_ddim_cases() {
        let cases: Vec<_> = cases("ddim")
            .into_iter()
            .filter(|c| c.t_start == 0)
            .collect();
        assert!(!cases.is_empty());
        for case in &cases {
            let s = Pndm::new(&case.cfg, case.steps).unwrap();
            let mut want = case.timesteps.clone();
            want.insert(1, want[1]);
            assert_eq!(s.timesteps(), &want[..], "{}", case.name);
            assert_eq!(s.init_noise_sigma(), case.init_noise_sigma);
        }
    }

    #[test]
    fn other_spacings_follow_ddim() {
        for spacing in [
            TimestepSpacing::Leading,
            TimestepSpacing::Linspace,
            TimestepSpacing::Trailing,
        ] {
            let cfg = SchedulerConfig {
                timestep_spacing: spacing,
                ..Default::default()
            };
            let d = Ddim::new(&cfg, 7).unwrap();
            let p = Pndm::new(&cfg, 7).unwrap();
            let mut want = d.timesteps().to_vec();
            want.insert(1, want[1]);
            assert_eq!(p.timesteps(), &want[..], "{spacing:?}");
        }
        let p = Pndm::new(&SchedulerConfig::default(), 1).unwrap();
        assert_eq!(p.timesteps(), &[1.0]);
    }

    /// With the same noise estimate at every call every Adams-Bashforth combination is that
    /// estimate, and the repeated second call redoes the first transfer: PLMS then reproduces
    /// DDIM exactly, one call later.
    #[test]
    fn constant_model_output_reproduces_ddim() {
        for set_alpha_to_one in [false, true] {
            let cfg = SchedulerConfig {
                set_alpha_to_one,
                ..Default::default()
            };
            let n = 9;
            let mut d = Ddim::new(&cfg, n).unwrap();
            let mut p = Pndm::new(&cfg, n).unwrap();
            let out = 0.35;
            let mut ddim = vec![1.2];
            for i in 0..n {
                let x = *ddim.last().unwrap();
                ddim.push(
                    values(
                        &d.step(
                            &scalar_tensor(&[out as f32]),
                            i,
                            &scalar_tensor(&[x as f32]),
                            &mut NoiseRng::new(0),
                        )
                        .unwrap(),
                    )[0],
                );
            }
            let mut plms = vec![1.2];
            for i in 0..=n {
                let x = *plms.last().unwrap();
                plms.push(step(&mut p, out, i, x));
            }
            // plms[1] is DDIM's first step, plms[2] redoes it, then one call per DDIM step.
            assert!((plms[1] - ddim[1]).abs() < 1e-5);
            for k in 1..=n {
                assert!(
                    (plms[k + 1] - ddim[k]).abs() < 1e-5 * (1.0 + ddim[k].abs()),
                    "{k}: {} vs {}",
                    plms[k + 1],
                    ddim[k]
                );
            }
        }
    }

    /// The first call is a plain transfer, so v-prediction's conversion can be checked
    /// against DDIM's.
    #[test]
    fn v_prediction_first_step_matches_ddim() {
        let cfg = SchedulerConfig {
            prediction_type: PredictionType::VPrediction,
            ..Default::default()
        };
        let mut d = Ddim::new(&cfg, 10).unwrap();
        let mut p = Pndm::new(&cfg, 10).unwrap();
        let want = values(
            &d.step(
                &scalar_tensor(&[0.6]),
                0,
                &scalar_tensor(&[-0.8]),
                &mut NoiseRng::new(0),
            )
            .unwrap(),
        )[0];
        let got = step(&mut p, 0.6, 0, -0.8);
        assert!((got - want).abs() < 1e-5, "{got} vs {want}");
    }

    /// The 2-, 3- and 4-term combinations with varying outputs, checked through the DDIM-form
    /// transfer `sqrt(a') x0 + sqrt(1-a') eps` that formula (9) equals.
    #[test]
    fn adams_bashforth_weights_by_hand() {
        let cfg = SchedulerConfig::default();
        let acp = cfg.alphas_cumprod();
        let mut p = Pndm::new(&cfg, 10).unwrap();
        let ts: Vec<usize> = p.timesteps().iter().map(|&t| t as usize).collect();
        let e = [0.3, -0.1, 0.45, 0.2, -0.35, 0.05];
        let transfer = |x: f64, t: usize, tp: usize, eps: f64| {
            let (a, ap) = (acp[t], acp[tp]);
            let x0 = (x - (1.0 - a).sqrt() * eps) / a.sqrt();
            ap.sqrt() * x0 + (1.0 - ap).sqrt() * eps
        };
        let x0 = 0.9;
        let x1 = step(&mut p, e[0], 0, x0);
        assert!((x1 - transfer(x0, ts[0], ts[0] - 100, e[0])).abs() < 1e-5);
        let x2 = step(&mut p, e[1], 1, x1);
        assert!((x2 - transfer(x0, ts[0], ts[1], 0.5 * (e[0] + e[1]))).abs() < 1e-5);
        // e[1] was only used for the average: the history is e[0], e[2], ...
        let x3 = step(&mut p, e[2], 2, x2);
        assert!((x3 - transfer(x2, ts[2], ts[2] - 100, (3.0 * e[2] - e[0]) / 2.0)).abs() < 1e-5);
        let x4 = step(&mut p, e[3], 3, x3);
        let w3 = (23.0 * e[3] - 16.0 * e[2] + 5.0 * e[0]) / 12.0;
        assert!((x4 - transfer(x3, ts[3], ts[3] - 100, w3)).abs() < 1e-5);
        let x5 = step(&mut p, e[4], 4, x4);
        let w4 = (55.0 * e[4] - 59.0 * e[3] + 37.0 * e[2] - 9.0 * e[0]) / 24.0;
        assert!((x5 - transfer(x4, ts[4], ts[4] - 100, w4)).abs() < 1e-5);
        let x6 = step(&mut p, e[5], 5, x5);
        let w4 = (55.0 * e[5] - 59.0 * e[4] + 37.0 * e[3] - 9.0 * e[2]) / 24.0;
        assert!((x6 - transfer(x5, ts[5], ts[5] - 100, w4)).abs() < 1e-5);
    }

    #[test]
    fn add_noise_at_step_timestep() {
        let cfg = SchedulerConfig::default();
        let p = Pndm::new(&cfg, 10).unwrap();
        let acp = cfg.alphas_cumprod();
        let out = values(
            &p.add_noise(&scalar_tensor(&[1.0]), &scalar_tensor(&[-1.0]), 2)
                .unwrap(),
        )[0];
        let t = p.timesteps()[2] as usize;
        assert!((out - (acp[t].sqrt() - (1.0 - acp[t]).sqrt())).abs() < 1e-6);
    }
}
