//! Where one generation request stands while it waits and computes. The worker thread writes
//! it, clients read it (a progress endpoint, a server-sent event stream); a `watch` channel
//! because readers only ever want the newest value and the writer must never block.

use std::time::Instant;
use tokio::sync::watch;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// Admitted, waiting for its batch.
    Queued,
    /// In a batch on the model: `step` of `steps` denoising steps are done.
    Denoising,
    /// Its images are computed (or it failed); the reply follows.
    Finished,
}

impl Stage {
    pub fn name(self) -> &'static str {
        match self {
            Stage::Queued => "queued",
            Stage::Denoising => "denoising",
            Stage::Finished => "finished",
        }
    }
}

#[derive(Debug, Clone)]
pub struct Progress {
    pub stage: Stage,
    pub step: usize,
    /// Denoising steps this request runs (img2img runs a `strength` share of the requested
    /// steps); 0 until its batch starts.
    pub steps: usize,
    /// Images in the batch it runs in; 0 until its batch starts.
    pub batch_size: usize,
    pub admitted: Instant,
    pub started: Option<Instant>,
}

impl Progress {
    pub fn queued() -> Self {
        Progress {
            stage: Stage::Queued,
            step: 0,
            steps: 0,
            batch_size: 0,
            admitted: Instant::now(),
            started: None,
        }
    }

    /// Share of the denoising done, 0 to 1.
    pub fn fraction(&self) -> f64 {
        match self.stage {
            Stage::Queued => 0.0,
            Stage::Finished => 1.0,
            Stage::Denoising if self.steps == 0 => 0.0,
            Stage::Denoising => self.step as f64 / self.steps as f64,
        }
    }

    /// Seconds left, extrapolated from the steps done so far; None before the first step.
    pub fn eta_s(&self) -> Option<f64> {
        let started = self.started?;
        if self.stage != Stage::Denoising || self.step == 0 {
            return None;
        }
        let per_step = started.elapsed().as_secs_f64() / self.step as f64;
        Some(per_step * (self.steps - self.step.min(self.steps)) as f64)
    }
}

/// The writing end the worker holds for one request.
pub type ProgressSender = watch::Sender<Progress>;

/// A fresh channel for a request about to be submitted.
pub fn channel() -> (ProgressSender, watch::Receiver<Progress>) {
    watch::channel(Progress::queued())
}
