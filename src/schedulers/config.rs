//! `scheduler_config.json` and the training noise schedule it defines.

use super::{Result, SchedulerError};
use serde_json::Value;
use std::path::Path;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BetaSchedule {
    Linear,
    ScaledLinear,
    SquaredcosCapV2,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PredictionType {
    Epsilon,
    VPrediction,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimestepSpacing {
    Leading,
    Trailing,
    Linspace,
}

/// The fields of diffusers' scheduler configs that change the maths. Fields that only some
/// classes read keep diffusers' per-class defaults where the file leaves them out.
#[derive(Debug, Clone)]
pub struct SchedulerConfig {
    pub class_name: Option<String>,
    pub num_train_timesteps: usize,
    pub beta_start: f64,
    pub beta_end: f64,
    pub beta_schedule: BetaSchedule,
    pub trained_betas: Option<Vec<f64>>,
    pub prediction_type: PredictionType,
    pub timestep_spacing: TimestepSpacing,
    pub steps_offset: usize,
    pub set_alpha_to_one: bool,
    pub clip_sample: bool,
    pub clip_sample_range: f64,
    pub use_karras_sigmas: bool,
    pub rescale_betas_zero_snr: bool,
    /// DPM-Solver / Euler: sigma appended after the last step ("zero" or "sigma_min").
    pub final_sigmas_type_zero: bool,
    pub lower_order_final: bool,
    pub euler_at_final: bool,
    pub solver_order: usize,
    /// Keys present in the file: a scheduler class built `from_config` takes its own default
    /// for every key the file lacks (SD1.5's PNDM config has no `timestep_spacing`, so
    /// diffusers runs Euler on it with Euler's default, linspace).
    pub present: std::collections::BTreeSet<String>,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        Self {
            class_name: None,
            num_train_timesteps: 1000,
            beta_start: 0.00085,
            beta_end: 0.012,
            beta_schedule: BetaSchedule::ScaledLinear,
            trained_betas: None,
            prediction_type: PredictionType::Epsilon,
            timestep_spacing: TimestepSpacing::Leading,
            steps_offset: 1,
            set_alpha_to_one: false,
            clip_sample: false,
            clip_sample_range: 1.0,
            use_karras_sigmas: false,
            rescale_betas_zero_snr: false,
            final_sigmas_type_zero: true,
            lower_order_final: true,
            euler_at_final: false,
            solver_order: 2,
            present: Default::default(),
        }
    }
}

fn bad(field: &str, v: &Value) -> SchedulerError {
    SchedulerError::Config(format!("{field} = {v} is not supported"))
}

impl SchedulerConfig {
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| SchedulerError::Io(format!("{}: {e}", path.display())))?;
        let v: Value = crate::util::parse_lenient_json(&text)
            .map_err(|e| SchedulerError::Io(format!("{}: {e}", path.display())))?;
        Self::from_json(&v)
    }

    pub fn from_json(v: &Value) -> Result<Self> {
        let mut c = SchedulerConfig::default();
        if let Some(obj) = v.as_object() {
            c.present = obj
                .iter()
                .filter(|(_, x)| !x.is_null())
                .map(|(k, _)| k.clone())
                .collect();
        }
        let get = |k: &str| v.get(k).filter(|x| !x.is_null());
        if let Some(x) = get("_class_name") {
            c.class_name = x.as_str().map(str::to_string);
        }
        if let Some(x) = get("num_train_timesteps") {
            c.num_train_timesteps =
                x.as_u64().ok_or_else(|| bad("num_train_timesteps", x))? as usize;
        }
        if let Some(x) = get("beta_start") {
            c.beta_start = x.as_f64().ok_or_else(|| bad("beta_start", x))?;
        }
        if let Some(x) = get("beta_end") {
            c.beta_end = x.as_f64().ok_or_else(|| bad("beta_end", x))?;
        }
        if let Some(x) = get("beta_schedule") {
            c.beta_schedule = match x.as_str() {
                Some("linear") => BetaSchedule::Linear,
                Some("scaled_linear") => BetaSchedule::ScaledLinear,
                Some("squaredcos_cap_v2") => BetaSchedule::SquaredcosCapV2,
                _ => return Err(bad("beta_schedule", x)),
            };
        }
        if let Some(x) = get("trained_betas") {
            let arr = x.as_array().ok_or_else(|| bad("trained_betas", x))?;
            let betas: Option<Vec<f64>> = arr.iter().map(Value::as_f64).collect();
            c.trained_betas = Some(betas.ok_or_else(|| bad("trained_betas", x))?);
        }
        if let Some(x) = get("prediction_type") {
            c.prediction_type = match x.as_str() {
                Some("epsilon") => PredictionType::Epsilon,
                Some("v_prediction") => PredictionType::VPrediction,
                _ => return Err(bad("prediction_type", x)),
            };
        }
        if let Some(x) = get("timestep_spacing") {
            c.timestep_spacing = match x.as_str() {
                Some("leading") => TimestepSpacing::Leading,
                Some("trailing") => TimestepSpacing::Trailing,
                Some("linspace") => TimestepSpacing::Linspace,
                _ => return Err(bad("timestep_spacing", x)),
            };
        }
        if let Some(x) = get("steps_offset") {
            c.steps_offset = x.as_u64().ok_or_else(|| bad("steps_offset", x))? as usize;
        }
        if let Some(x) = get("set_alpha_to_one") {
            c.set_alpha_to_one = x.as_bool().ok_or_else(|| bad("set_alpha_to_one", x))?;
        }
        if let Some(x) = get("clip_sample") {
            c.clip_sample = x.as_bool().ok_or_else(|| bad("clip_sample", x))?;
        }
        if let Some(x) = get("clip_sample_range") {
            c.clip_sample_range = x.as_f64().ok_or_else(|| bad("clip_sample_range", x))?;
        }
        if let Some(x) = get("use_karras_sigmas") {
            c.use_karras_sigmas = x.as_bool().ok_or_else(|| bad("use_karras_sigmas", x))?;
        }
        if let Some(x) = get("rescale_betas_zero_snr") {
            c.rescale_betas_zero_snr = x
                .as_bool()
                .ok_or_else(|| bad("rescale_betas_zero_snr", x))?;
        }
        if let Some(x) = get("final_sigmas_type") {
            c.final_sigmas_type_zero = match x.as_str() {
                Some("zero") => true,
                Some("sigma_min") => false,
                _ => return Err(bad("final_sigmas_type", x)),
            };
        }
        if let Some(x) = get("lower_order_final") {
            c.lower_order_final = x.as_bool().ok_or_else(|| bad("lower_order_final", x))?;
        }
        if let Some(x) = get("euler_at_final") {
            c.euler_at_final = x.as_bool().ok_or_else(|| bad("euler_at_final", x))?;
        }
        if let Some(x) = get("solver_order") {
            c.solver_order = x.as_u64().ok_or_else(|| bad("solver_order", x))? as usize;
        }
        // Options that change the maths and that we do not implement: refuse loudly rather
        // than sample something else than the user asked for.
        for (field, ok) in [
            ("thresholding", Value::Bool(false)),
            ("use_exponential_sigmas", Value::Bool(false)),
            ("use_beta_sigmas", Value::Bool(false)),
            ("use_lu_lambdas", Value::Bool(false)),
            ("use_flow_sigmas", Value::Bool(false)),
        ] {
            if let Some(x) = get(field) {
                if *x != ok {
                    return Err(bad(field, x));
                }
            }
        }
        if let Some(x) = get("algorithm_type") {
            if x.as_str() != Some("dpmsolver++") {
                return Err(bad("algorithm_type", x));
            }
        }
        if let Some(x) = get("solver_type") {
            if x.as_str() != Some("midpoint") {
                return Err(bad("solver_type", x));
            }
        }
        if let Some(x) = get("interpolation_type") {
            if x.as_str() != Some("linear") {
                return Err(bad("interpolation_type", x));
            }
        }
        for field in [
            "sigma_min",
            "sigma_max",
            "lambda_min_clipped",
            "variance_type",
        ] {
            // Only their defaults (null / -inf) are implemented.
            if let Some(x) = get(field) {
                return Err(bad(field, x));
            }
        }
        if let Some(x) = get("timestep_type") {
            if x.as_str() != Some("discrete") {
                return Err(bad("timestep_type", x));
            }
        }
        if c.num_train_timesteps == 0 {
            return Err(SchedulerError::Config(
                "num_train_timesteps must be > 0".into(),
            ));
        }
        Ok(c)
    }

    /// The config as diffusers' `<Class>.from_config` would see it: keys absent from the file
    /// take the defaults of the scheduler class that runs.
    pub fn for_kind(&self, kind: super::SchedulerKind) -> Self {
        use super::SchedulerKind as K;
        let mut c = self.clone();
        let absent = |k: &str| !self.present.contains(k);
        if absent("beta_schedule") {
            c.beta_schedule = BetaSchedule::Linear;
        }
        if absent("beta_start") {
            c.beta_start = 0.0001;
        }
        if absent("beta_end") {
            c.beta_end = 0.02;
        }
        if absent("steps_offset") {
            c.steps_offset = 0;
        }
        if absent("timestep_spacing") {
            c.timestep_spacing = match kind {
                K::Ddim | K::Pndm => TimestepSpacing::Leading,
                _ => TimestepSpacing::Linspace,
            };
        }
        if absent("set_alpha_to_one") {
            c.set_alpha_to_one = matches!(kind, K::Ddim);
        }
        if absent("clip_sample") {
            c.clip_sample = matches!(kind, K::Ddim);
        }
        if absent("final_sigmas_type") {
            c.final_sigmas_type_zero = true;
        }
        c
    }

    /// The training betas. diffusers computes these in float32; we use f64 (the conformance
    /// tolerances admit either, see the suite's README section 4).
    pub fn betas(&self) -> Vec<f64> {
        let n = self.num_train_timesteps;
        let mut betas = if let Some(b) = &self.trained_betas {
            b.clone()
        } else {
            match self.beta_schedule {
                BetaSchedule::Linear => linspace(self.beta_start, self.beta_end, n),
                BetaSchedule::ScaledLinear => {
                    linspace(self.beta_start.sqrt(), self.beta_end.sqrt(), n)
                        .into_iter()
                        .map(|b| b * b)
                        .collect()
                }
                BetaSchedule::SquaredcosCapV2 => {
                    let f = |t: f64| {
                        ((t + 0.008) / 1.008 * std::f64::consts::PI / 2.0)
                            .cos()
                            .powi(2)
                    };
                    (0..n)
                        .map(|i| {
                            let t1 = i as f64 / n as f64;
                            let t2 = (i + 1) as f64 / n as f64;
                            (1.0 - f(t2) / f(t1)).min(0.999)
                        })
                        .collect()
                }
            }
        };
        if self.rescale_betas_zero_snr {
            betas = rescale_zero_terminal_snr(&betas);
        }
        betas
    }

    pub fn alphas_cumprod(&self) -> Vec<f64> {
        let mut acc = 1.0;
        let mut out: Vec<f64> = self
            .betas()
            .iter()
            .map(|b| {
                acc *= 1.0 - b;
                acc
            })
            .collect();
        if self.rescale_betas_zero_snr {
            // diffusers nudges the last value off zero so sigmas stay finite.
            if let Some(last) = out.last_mut() {
                *last = 2f64.powi(-24);
            }
        }
        out
    }
}

pub(crate) fn linspace(start: f64, end: f64, n: usize) -> Vec<f64> {
    if n == 1 {
        return vec![start];
    }
    let step = (end - start) / (n - 1) as f64;
    (0..n).map(|i| start + step * i as f64).collect()
}

fn rescale_zero_terminal_snr(betas: &[f64]) -> Vec<f64> {
    let mut acc = 1.0;
    let mut sqrt_acp: Vec<f64> = betas
        .iter()
        .map(|b| {
            acc *= 1.0 - b;
            f64::sqrt(acc)
        })
        .collect();
    let first = sqrt_acp[0];
    let last = *sqrt_acp.last().unwrap();
    for v in sqrt_acp.iter_mut() {
        *v = (*v - last) * first / (first - last);
    }
    let acp: Vec<f64> = sqrt_acp.iter().map(|v| v * v).collect();
    let mut out = Vec::with_capacity(acp.len());
    for i in 0..acp.len() {
        let alpha = if i == 0 { acp[0] } else { acp[i] / acp[i - 1] };
        out.push(1.0 - alpha);
    }
    out
}
