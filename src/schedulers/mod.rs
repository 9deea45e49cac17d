//! Noise schedulers, configured from diffusers' `scheduler_config.json`.
//!
//! A scheduler instance is created per request (`make_scheduler`) and owns all per-call state
//! (DPM-Solver history, PNDM buffers). Nothing mutable is shared between requests, which is
//! the thread-safety bug of diffusers' shared pipelines that we avoid by construction.
//!
//! Schedule constants (betas, alphas_cumprod, sigmas) are computed in f64; model tensors stay
//! in whatever dtype the caller uses.

mod common;
mod config;
mod ddim;
mod dpmpp_2m;
mod euler;
mod euler_ancestral;
mod pndm;

pub use config::{BetaSchedule, PredictionType, SchedulerConfig, TimestepSpacing};

use crate::rng::NoiseRng;
use candle_core::Tensor;
use std::str::FromStr;

#[derive(Debug, thiserror::Error)]
pub enum SchedulerError {
    #[error("unsupported scheduler config: {0}")]
    Config(String),
    #[error(
        "unknown scheduler '{0}' (known: ddim, euler, euler_a, dpmpp_2m, dpmpp_2m_karras, pndm)"
    )]
    Unknown(String),
    #[error("num_inference_steps must be between 1 and {max}, got {got}")]
    Steps { got: usize, max: usize },
    #[error(transparent)]
    Tensor(#[from] candle_core::Error),
    #[error("reading scheduler config: {0}")]
    Io(String),
}

pub type Result<T> = std::result::Result<T, SchedulerError>;

/// The sampling algorithms we serve. Names follow diffusers' class names and the short names
/// that A1111/ComfyUI users know.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SchedulerKind {
    Ddim,
    Euler,
    EulerA,
    #[serde(rename = "dpmpp_2m")]
    DpmPp2M,
    #[serde(rename = "dpmpp_2m_karras")]
    DpmPp2MKarras,
    Pndm,
}

impl SchedulerKind {
    pub const ALL: [SchedulerKind; 6] = [
        SchedulerKind::Ddim,
        SchedulerKind::Euler,
        SchedulerKind::EulerA,
        SchedulerKind::DpmPp2M,
        SchedulerKind::DpmPp2MKarras,
        SchedulerKind::Pndm,
    ];

    pub fn name(&self) -> &'static str {
        match self {
            SchedulerKind::Ddim => "ddim",
            SchedulerKind::Euler => "euler",
            SchedulerKind::EulerA => "euler_a",
            SchedulerKind::DpmPp2M => "dpmpp_2m",
            SchedulerKind::DpmPp2MKarras => "dpmpp_2m_karras",
            SchedulerKind::Pndm => "pndm",
        }
    }

    /// The sampler name AUTOMATIC1111 writes into PNG `parameters`.
    pub fn a1111_name(&self) -> &'static str {
        match self {
            SchedulerKind::Ddim => "DDIM",
            SchedulerKind::Euler => "Euler",
            SchedulerKind::EulerA => "Euler a",
            SchedulerKind::DpmPp2M => "DPM++ 2M",
            SchedulerKind::DpmPp2MKarras => "DPM++ 2M Karras",
            SchedulerKind::Pndm => "PLMS",
        }
    }

    /// The kind a checkpoint's own `scheduler_config.json` names (`_class_name`).
    pub fn from_class_name(class: &str, cfg: &SchedulerConfig) -> Option<Self> {
        Some(match class {
            "DDIMScheduler" => SchedulerKind::Ddim,
            "EulerDiscreteScheduler" => SchedulerKind::Euler,
            "EulerAncestralDiscreteScheduler" => SchedulerKind::EulerA,
            "DPMSolverMultistepScheduler" if cfg.use_karras_sigmas => SchedulerKind::DpmPp2MKarras,
            "DPMSolverMultistepScheduler" => SchedulerKind::DpmPp2M,
            "PNDMScheduler" => SchedulerKind::Pndm,
            _ => return None,
        })
    }
}

impl FromStr for SchedulerKind {
    type Err = SchedulerError;
    fn from_str(s: &str) -> Result<Self> {
        let k = s.trim().to_ascii_lowercase().replace(['-', ' ', '+'], "_");
        Ok(match k.as_str() {
            "ddim" | "ddimscheduler" => SchedulerKind::Ddim,
            "euler" | "eulerdiscretescheduler" => SchedulerKind::Euler,
            "euler_a" | "euler_ancestral" | "eulerancestraldiscretescheduler" => {
                SchedulerKind::EulerA
            }
            "dpmpp_2m" | "dpm__2m" | "dpmsolvermultistepscheduler" | "dpmsolver__" => {
                SchedulerKind::DpmPp2M
            }
            "dpmpp_2m_karras" | "dpm__2m_karras" => SchedulerKind::DpmPp2MKarras,
            "pndm" | "plms" | "pndmscheduler" => SchedulerKind::Pndm,
            _ => return Err(SchedulerError::Unknown(s.to_string())),
        })
    }
}

/// One denoising run's scheduler. `step_index` is the index into `timesteps()` of the current
/// step; img2img starts at a later index, which is why it is explicit rather than an internal
/// counter.
pub trait Scheduler: Send {
    /// Timesteps fed to the UNet, in order (floats: Euler-family schedulers interpolate).
    fn timesteps(&self) -> &[f64];
    /// The factor applied to the initial noise of txt2img (1 for schedulers that work in
    /// alpha space; Euler-family schedulers scale by their largest sigma).
    fn init_noise_sigma(&self) -> f64 {
        1.0
    }
    /// diffusers' `scheduler.order` (img2img skips `t_start * order` timesteps).
    fn order(&self) -> usize {
        1
    }
    /// What the UNet sees at this step; only sigma-space schedulers rescale.
    fn scale_model_input(&self, sample: &Tensor, _step_index: usize) -> Result<Tensor> {
        Ok(sample.clone())
    }
    /// One update from `sample` at `timesteps()[step_index]` using the model output.
    /// `rng` is only drawn from by ancestral samplers.
    fn step(
        &mut self,
        model_output: &Tensor,
        step_index: usize,
        sample: &Tensor,
        rng: &mut NoiseRng,
    ) -> Result<Tensor>;
    /// img2img noising of a clean latent to the level of `timesteps()[step_index]`.
    fn add_noise(&self, original: &Tensor, noise: &Tensor, step_index: usize) -> Result<Tensor>;
}

/// Maximum inference steps we accept; diffusers would accept up to num_train_timesteps.
pub fn make_scheduler(
    kind: SchedulerKind,
    config: &SchedulerConfig,
    num_inference_steps: usize,
) -> Result<Box<dyn Scheduler>> {
    if num_inference_steps == 0 || num_inference_steps > config.num_train_timesteps {
        return Err(SchedulerError::Steps {
            got: num_inference_steps,
            max: config.num_train_timesteps,
        });
    }
    let config = &config.for_kind(kind);
    Ok(match kind {
        SchedulerKind::Ddim => Box::new(ddim::Ddim::new(config, num_inference_steps)?),
        SchedulerKind::Euler => Box::new(euler::Euler::new(config, num_inference_steps)?),
        SchedulerKind::EulerA => Box::new(euler_ancestral::EulerAncestral::new(
            config,
            num_inference_steps,
        )?),
        SchedulerKind::DpmPp2M => {
            Box::new(dpmpp_2m::DpmPp2M::new(config, num_inference_steps, false)?)
        }
        SchedulerKind::DpmPp2MKarras => {
            Box::new(dpmpp_2m::DpmPp2M::new(config, num_inference_steps, true)?)
        }
        SchedulerKind::Pndm => Box::new(pndm::Pndm::new(config, num_inference_steps)?),
    })
}
