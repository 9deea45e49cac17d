//! DPMSolverMultistepScheduler with `algorithm_type = "dpmsolver++"`, `solver_type = "midpoint"`
//! (DPM-Solver++(2M)), optionally with Karras sigmas. `SchedulerConfig::from_json` refuses the
//! other algorithm/solver types; solver_order 3 is refused here.

use super::common::{
    karras_sigmas, lincomb, np_arange_down, np_interp, np_linspace, np_round, sigma_to_t,
    step_out_of_range, training_sigmas, upcast,
};
use super::{
    BetaSchedule, PredictionType, Result, Scheduler, SchedulerConfig, SchedulerError,
    TimestepSpacing,
};
use crate::rng::NoiseRng;
use candle_core::Tensor;

pub struct DpmPp2M {
    timesteps: Vec<f64>,
    /// One more than `timesteps`: the sigma each step lands on.
    sigmas: Vec<f64>,
    prediction_type: PredictionType,
    solver_order: usize,
    lower_order_final: bool,
    euler_at_final: bool,
    final_sigmas_zero: bool,
    /// The previous step's x0 prediction (`model_outputs[-2]` in diffusers). Per instance, so
    /// img2img's first step (at a later index) starts without history, as in diffusers.
    prev_x0: Option<Tensor>,
    lower_order_nums: usize,
}

/// `(alpha_t, sigma_t)` of the VP process at the sigma-space noise level `sigma`.
fn alpha_sigma(sigma: f64) -> (f64, f64) {
    let alpha = 1.0 / (sigma * sigma + 1.0).sqrt();
    (alpha, sigma * alpha)
}

fn lambda(sigma: f64) -> f64 {
    let (a, s) = alpha_sigma(sigma);
    a.ln() - s.ln()
}

impl DpmPp2M {
    pub fn new(cfg: &SchedulerConfig, n: usize, karras: bool) -> Result<Self> {
        let t = cfg.num_train_timesteps;
        if n == 0 || n > t {
            return Err(SchedulerError::Steps { got: n, max: t });
        }
        if !(1..=2).contains(&cfg.solver_order) {
            return Err(SchedulerError::Config(format!(
                "solver_order = {} is not supported (DPM-Solver++ 2M supports 1 and 2)",
                cfg.solver_order
            )));
        }
        // diffusers derives the last usable timestep from lambda_min_clipped; with its default
        // of -inf (the only value SchedulerConfig accepts) that is num_train_timesteps.
        let last_timestep = t;
        let mut timesteps: Vec<f64> = match cfg.timestep_spacing {
            // N+1 points with the final (t = 0) one dropped: the last model call is not at 0.
            TimestepSpacing::Linspace => {
                let mut v: Vec<f64> = np_linspace(0.0, (last_timestep - 1) as f64, n + 1)
                    .into_iter()
                    .rev()
                    .map(np_round)
                    .collect();
                v.pop();
                v
            }
            TimestepSpacing::Leading => {
                let ratio = last_timestep / (n + 1);
                (1..=n)
                    .rev()
                    .map(|i| (i * ratio + cfg.steps_offset) as f64)
                    .collect()
            }
            TimestepSpacing::Trailing => np_arange_down(last_timestep as f64, t as f64 / n as f64)
                .into_iter()
                .map(|x| np_round(x) - 1.0)
                .collect(),
        };

        let train = training_sigmas(cfg);
        let mut sigmas: Vec<f64> = if karras {
            // Unlike Euler, DPM-Solver takes the Karras range from the whole training table.
            let ks = karras_sigmas(train[0], train[t - 1], n);
            let log_sigmas: Vec<f64> = train.iter().map(|s| s.ln()).collect();
            timesteps = ks
                .iter()
                .map(|&s| {
                    let ft = sigma_to_t(s, &log_sigmas);
                    // diffusers skips the rounding for squaredcos_cap_v2, and the int64 cast
                    // then truncates.
                    if cfg.beta_schedule == BetaSchedule::SquaredcosCapV2 {
                        ft.trunc()
                    } else {
                        np_round(ft)
                    }
                })
                .collect();
            ks
        } else {
            timesteps.iter().map(|&ts| np_interp(ts, &train)).collect()
        };
        sigmas.push(if cfg.final_sigmas_type_zero {
            0.0
        } else {
            train[0]
        });

        Ok(Self {
            timesteps,
            sigmas,
            prediction_type: cfg.prediction_type,
            solver_order: cfg.solver_order,
            lower_order_final: cfg.lower_order_final,
            euler_at_final: cfg.euler_at_final,
            final_sigmas_zero: cfg.final_sigmas_type_zero,
            prev_x0: None,
            lower_order_nums: 0,
        })
    }

    #[cfg(test)]
    pub(super) fn sigmas(&self) -> &[f64] {
        &self.sigmas
    }

    /// DPM-Solver++ first-order update (DDIM in data-prediction form).
    fn first_order(&self, x: &Tensor, x0: &Tensor, sigma_s: f64, sigma_t: f64) -> Result<Tensor> {
        // sigma_t = 0 makes lambda_t infinite and exp(-h) = 0: the update is exactly x0.
        // Spelled out so no inf/NaN arithmetic is involved.
        if sigma_t == 0.0 {
            return Ok(x0.clone());
        }
        let (alpha_t, s_t) = alpha_sigma(sigma_t);
        let (_, s_s) = alpha_sigma(sigma_s);
        let h = lambda(sigma_t) - lambda(sigma_s);
        lincomb(&[(x, s_t / s_s), (x0, -alpha_t * ((-h).exp() - 1.0))])
    }

    /// Multistep second-order midpoint update from x0 predictions m0 (now) and m1 (previous).
    fn second_order(
        &self,
        x: &Tensor,
        m0: &Tensor,
        m1: &Tensor,
        sigma_s1: f64,
        sigma_s0: f64,
        sigma_t: f64,
    ) -> Result<Tensor> {
        if sigma_t == 0.0 {
            return self.first_order(x, m0, sigma_s0, sigma_t);
        }
        let (alpha_t, s_t) = alpha_sigma(sigma_t);
        let (_, s_s0) = alpha_sigma(sigma_s0);
        let (l_t, l_s0, l_s1) = (lambda(sigma_t), lambda(sigma_s0), lambda(sigma_s1));
        let (h, h_0) = (l_t - l_s0, l_s0 - l_s1);
        let r0 = h_0 / h;
        // x_t = (s_t/s_s0) x + c0 D0 + c1 D1 with D0 = m0, D1 = (m0 - m1)/r0.
        let c0 = -alpha_t * ((-h).exp() - 1.0);
        let c1 = 0.5 * c0;
        lincomb(&[(x, s_t / s_s0), (m0, c0 + c1 / r0), (m1, -c1 / r0)])
    }
}

impl Scheduler for DpmPp2M {
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
        let n = self.timesteps.len();
        if step_index >= n {
            return Err(step_out_of_range(step_index, n));
        }
        let (x, m) = (upcast(sample)?, upcast(model_output)?);
        let sigma_s = self.sigmas[step_index];
        let sigma_t = self.sigmas[step_index + 1];
        let (alpha_s, s_s) = alpha_sigma(sigma_s);
        let x0 = match self.prediction_type {
            PredictionType::Epsilon => lincomb(&[(&x, 1.0 / alpha_s), (&m, -s_s / alpha_s)])?,
            PredictionType::VPrediction => lincomb(&[(&x, alpha_s), (&m, -s_s)])?,
        };
        let final_step = step_index == n - 1;
        let lower_order_final = final_step
            && (self.euler_at_final
                || (self.lower_order_final && n < 15)
                || self.final_sigmas_zero);
        let prev = match &self.prev_x0 {
            Some(m1)
                if self.solver_order == 2
                    && self.lower_order_nums >= 1
                    && !lower_order_final
                    && step_index >= 1 =>
            {
                self.second_order(&x, &x0, m1, self.sigmas[step_index - 1], sigma_s, sigma_t)?
            }
            _ => self.first_order(&x, &x0, sigma_s, sigma_t)?,
        };
        self.prev_x0 = Some(x0);
        self.lower_order_nums = (self.lower_order_nums + 1).min(self.solver_order);
        Ok(prev.to_dtype(sample.dtype())?)
    }

    fn add_noise(&self, original: &Tensor, noise: &Tensor, step_index: usize) -> Result<Tensor> {
        let sigma = *self
            .sigmas
            .get(step_index)
            .filter(|_| step_index < self.timesteps.len())
            .ok_or_else(|| step_out_of_range(step_index, self.timesteps.len()))?;
        let (alpha, s) = alpha_sigma(sigma);
        lincomb(&[(original, alpha), (noise, s)])
    }
}

#[cfg(test)]
mod tests {
    use super::super::common::test_support::*;
    use super::*;

    #[test]
    fn schedule_matches_reference_cases() {
        let cases = cases("dpmpp_2m");
        assert!(
            !cases.is_empty(),
            "no dpmpp_2m cases in the conformance suite"
        );
        for case in &cases {
            let s = DpmPp2M::new(&case.cfg, case.steps, case.cfg.use_karras_sigmas).unwrap();
            assert_eq!(s.timesteps().len(), case.steps, "{}", case.name);
            assert_eq!(
                &s.timesteps()[case.t_start..],
                &case.timesteps[..],
                "{}",
                case.name
            );
            assert_eq!(s.init_noise_sigma(), case.init_noise_sigma, "{}", case.name);
            let reference = case.f64s("debug", "sigmas");
            assert_eq!(s.sigmas().len(), reference.len(), "{}", case.name);
            for (k, (a, b)) in s.sigmas().iter().zip(&reference).enumerate() {
                assert!(
                    (a - b).abs() <= 1e-7 + 2e-5 * b.abs(),
                    "{} sigma[{k}]: {a} vs {b}",
                    case.name
                );
            }
        }
    }

    #[test]
    fn other_spacings() {
        let mut cfg = SchedulerConfig {
            timestep_spacing: TimestepSpacing::Linspace,
            ..Default::default()
        };
        // round(linspace(0, 999, 5)) = 0, 250 (249.75), 500 (499.5, half to even), 749, 999.
        assert_eq!(
            DpmPp2M::new(&cfg, 4, false).unwrap().timesteps(),
            &[999.0, 749.0, 500.0, 250.0]
        );
        cfg.timestep_spacing = TimestepSpacing::Trailing;
        assert_eq!(
            DpmPp2M::new(&cfg, 4, false).unwrap().timesteps(),
            &[999.0, 749.0, 499.0, 249.0]
        );
        let s = DpmPp2M::new(&cfg, 4, false).unwrap();
        let train = training_sigmas(&cfg);
        assert_eq!(
            s.sigmas(),
            &[train[999], train[749], train[499], train[249], 0.0]
        );
    }

    #[test]
    fn karras_schedule() {
        let cfg = SchedulerConfig::default();
        let s = DpmPp2M::new(&cfg, 20, true).unwrap();
        let train = training_sigmas(&cfg);
        let sig = s.sigmas();
        assert_eq!(sig.len(), 21);
        assert_eq!(sig[20], 0.0);
        assert!((sig[0] - train[999]).abs() < 1e-9 && (sig[19] - train[0]).abs() < 1e-12);
        assert!(sig.windows(2).all(|w| w[0] > w[1]));
        assert_eq!(s.timesteps()[0], 999.0);
        assert_eq!(s.timesteps()[19], 0.0);
        let logs: Vec<f64> = train.iter().map(|x| x.ln()).collect();
        for (t, sg) in s.timesteps().iter().zip(sig) {
            assert_eq!(*t, sigma_to_t(*sg, &logs).round_ties_even());
            assert_eq!(t.fract(), 0.0);
        }
        let cfg = SchedulerConfig {
            final_sigmas_type_zero: false,
            ..Default::default()
        };
        let s = DpmPp2M::new(&cfg, 20, true).unwrap();
        assert_eq!(s.sigmas()[20], train[0]);
    }

    #[test]
    fn solver_order_three_is_refused() {
        let cfg = SchedulerConfig {
            solver_order: 3,
            ..Default::default()
        };
        assert!(DpmPp2M::new(&cfg, 10, false).is_err());
    }

    fn run(s: &mut DpmPp2M, outputs: &[f64], x: f64, start: usize) -> Vec<f64> {
        let mut xs = vec![x];
        let mut x = x;
        for (k, o) in outputs.iter().enumerate() {
            let out = s
                .step(
                    &scalar_tensor(&[*o as f32]),
                    start + k,
                    &scalar_tensor(&[x as f32]),
                    &mut NoiseRng::new(0),
                )
                .unwrap();
            x = values(&out)[0];
            xs.push(x);
        }
        xs
    }

    /// Direct transcription of the update rules, in scalars, for a whole 6-step run with a
    /// varying model output (first order, then 2M midpoint, final first order to sigma 0).
    #[test]
    fn steps_by_hand() {
        let cfg = SchedulerConfig::default();
        let mut s = DpmPp2M::new(&cfg, 6, false).unwrap();
        let sig = s.sigmas().to_vec();
        let eps = [0.3, -0.2, 0.5, 0.1, -0.4, 0.25];
        let got = run(&mut s, &eps, 2.0, 0);
        let ab = |sg: f64| (1.0 / (sg * sg + 1.0).sqrt(), sg / (sg * sg + 1.0).sqrt());
        let lam = |sg: f64| {
            let (a, s) = ab(sg);
            a.ln() - s.ln()
        };
        let mut x = 2.0f64;
        let mut prev_x0: Option<f64> = None;
        for i in 0..6 {
            let (a_s, s_s) = ab(sig[i]);
            let x0 = (x - s_s * eps[i]) / a_s;
            let (a_t, s_t) = ab(sig[i + 1]);
            x = if i == 5 {
                assert_eq!(sig[6], 0.0);
                x0
            } else {
                let h = lam(sig[i + 1]) - lam(sig[i]);
                match prev_x0 {
                    None => (s_t / s_s) * x - a_t * ((-h).exp() - 1.0) * x0,
                    Some(m1) => {
                        let r0 = (lam(sig[i]) - lam(sig[i - 1])) / h;
                        let d1 = (x0 - m1) / r0;
                        (s_t / s_s) * x
                            - a_t * ((-h).exp() - 1.0) * x0
                            - 0.5 * a_t * ((-h).exp() - 1.0) * d1
                    }
                }
            };
            prev_x0 = Some(x0);
            assert!(
                (got[i + 1] - x).abs() < 1e-5 * (1.0 + x.abs()),
                "step {i}: {} vs {x}",
                got[i + 1]
            );
        }
    }

    /// Starting mid-schedule (img2img) the first call has no history and is first order.
    #[test]
    fn img2img_start_is_first_order() {
        let cfg = SchedulerConfig::default();
        let mut mid = DpmPp2M::new(&cfg, 10, false).unwrap();
        let got = run(&mut mid, &[0.4], 1.0, 5)[1];
        let sig = mid.sigmas();
        let (a_t, s_t) = alpha_sigma(sig[6]);
        let (a_s, s_s) = alpha_sigma(sig[5]);
        let x0 = (1.0 - s_s * 0.4) / a_s;
        let h = lambda(sig[6]) - lambda(sig[5]);
        let want = (s_t / s_s) * 1.0 - a_t * ((-h).exp() - 1.0) * x0;
        assert!((got - want).abs() < 1e-6, "{got} vs {want}");
    }

    /// An exact model of a single data point keeps the sample on `alpha x0 + sigma eps` for both
    /// orders (D1 = 0) and both parametrisations, with and without Karras sigmas.
    #[test]
    fn exact_model_follows_the_forward_process() {
        for pred in [PredictionType::Epsilon, PredictionType::VPrediction] {
            for karras in [false, true] {
                for final_zero in [true, false] {
                    let cfg = SchedulerConfig {
                        prediction_type: pred,
                        final_sigmas_type_zero: final_zero,
                        ..Default::default()
                    };
                    let mut s = DpmPp2M::new(&cfg, 16, karras).unwrap();
                    let (x0, eps) = (0.7f64, -0.4f64);
                    for i in 0..16 {
                        let (a, sg) = alpha_sigma(s.sigmas()[i]);
                        let x = a * x0 + sg * eps;
                        let out = match pred {
                            PredictionType::Epsilon => eps,
                            PredictionType::VPrediction => a * eps - sg * x0,
                        };
                        let got = run(&mut s, &[out], x, i)[1];
                        let (a2, s2) = alpha_sigma(s.sigmas()[i + 1]);
                        let want = a2 * x0 + s2 * eps;
                        assert!(
                            (got - want).abs() < 2e-5,
                            "{pred:?} karras={karras} {i}: {got} vs {want}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn add_noise_uses_the_step_sigma() {
        let cfg = SchedulerConfig::default();
        let s = DpmPp2M::new(&cfg, 10, false).unwrap();
        let acp = cfg.alphas_cumprod();
        let t = s.timesteps()[3] as usize;
        let out = values(
            &s.add_noise(&scalar_tensor(&[1.0]), &scalar_tensor(&[0.5]), 3)
                .unwrap(),
        )[0];
        let want = acp[t].sqrt() + (1.0 - acp[t]).sqrt() * 0.5;
        assert!((out - want).abs() < 1e-6);
        assert!(s
            .add_noise(&scalar_tensor(&[1.0]), &scalar_tensor(&[0.5]), 10)
            .is_err());
    }

    #[test]
    fn order_is_one() {
        let s = DpmPp2M::new(&SchedulerConfig::default(), 10, false).unwrap();
        assert_eq!(s.order(), 1);
    }
}
