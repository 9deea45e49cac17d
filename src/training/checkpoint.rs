//! Atomic training checkpoints shared by every training mode: `checkpoints/step-N/` holds the
//! trainable parameters, the AdamW moments and a `state.json`; a temporary directory is renamed
//! into place, so a crash mid-write never leaves a half checkpoint that resume would pick.

use super::optim::AdamW;
use super::TrainError;
use candle_core::{Device, Tensor};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

pub fn save(
    dir: &Path,
    step: usize,
    opt: &AdamW,
    state: serde_json::Value,
) -> Result<PathBuf, TrainError> {
    std::fs::create_dir_all(dir).map_err(|e| TrainError::Io(e.to_string()))?;
    let final_dir = dir.join(format!("step-{step:08}"));
    let tmp = dir.join(format!(".tmp-step-{step:08}"));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).map_err(|e| TrainError::Io(e.to_string()))?;
    let mut params = HashMap::new();
    let mut moments = HashMap::new();
    for (i, (name, var)) in opt.params.iter().enumerate() {
        params.insert(name.clone(), var.as_tensor().detach());
        moments.insert(format!("exp_avg.{name}"), opt.exp_avg[i].clone());
        moments.insert(format!("exp_avg_sq.{name}"), opt.exp_avg_sq[i].clone());
    }
    candle_core::safetensors::save(&params, tmp.join("params.safetensors"))?;
    candle_core::safetensors::save(&moments, tmp.join("optimizer.safetensors"))?;
    let mut state = state;
    state["step"] = step.into();
    state["optimizer_step"] = opt.step.into();
    std::fs::write(
        tmp.join("state.json"),
        serde_json::to_vec_pretty(&state).unwrap_or_default(),
    )
    .map_err(|e| TrainError::Io(e.to_string()))?;
    let _ = std::fs::remove_dir_all(&final_dir);
    std::fs::rename(&tmp, &final_dir).map_err(|e| TrainError::Io(e.to_string()))?;
    Ok(final_dir)
}

/// Restores the newest complete checkpoint under `dir` into `opt` (parameters and moments);
/// returns its step and `state.json`, or `None` when there is none.
pub fn load_latest(
    dir: &Path,
    opt: &mut AdamW,
    device: &Device,
) -> Result<Option<(usize, serde_json::Value)>, TrainError> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Ok(None);
    };
    let mut steps: Vec<usize> = entries
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().to_str()?.strip_prefix("step-")?.parse().ok())
        .collect();
    steps.sort();
    let Some(&step) = steps.last() else {
        return Ok(None);
    };
    let cdir = dir.join(format!("step-{step:08}"));
    let read = |name: &str| -> Result<HashMap<String, Tensor>, TrainError> {
        candle_core::safetensors::load(cdir.join(name), device)
            .map_err(|e| TrainError::Checkpoint(format!("{}: {e}", cdir.join(name).display())))
    };
    let params = read("params.safetensors")?;
    let moments = read("optimizer.safetensors")?;
    let state: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(cdir.join("state.json"))
            .map_err(|e| TrainError::Checkpoint(e.to_string()))?,
    )
    .map_err(|e| TrainError::Checkpoint(e.to_string()))?;
    for (i, (name, var)) in opt.params.iter().enumerate() {
        let missing =
            || TrainError::Checkpoint(format!("{name} missing from checkpoint step {step}"));
        var.set(
            &params
                .get(name)
                .ok_or_else(missing)?
                .to_dtype(var.dtype())?,
        )?;
        opt.exp_avg[i] = moments
            .get(&format!("exp_avg.{name}"))
            .ok_or_else(missing)?
            .clone();
        opt.exp_avg_sq[i] = moments
            .get(&format!("exp_avg_sq.{name}"))
            .ok_or_else(missing)?
            .clone();
    }
    opt.step = state["optimizer_step"].as_u64().unwrap_or(step as u64) as usize;
    Ok(Some((step, state)))
}

/// What the shared training loop needs from a trainer (preference fine-tuning or pretraining).
pub(crate) trait StepLoop {
    /// Optimiser steps taken so far (after a resume, those of the checkpoint).
    fn steps_done(&self) -> usize;
    fn step(&mut self) -> Result<super::config::StepMetrics, TrainError>;
    fn save_checkpoint(&self) -> Result<PathBuf, TrainError>;
    /// Writes the final artifact and reports the run.
    fn finish(&self) -> Result<super::config::TrainOutcome, TrainError>;
}

/// Steps until `max_steps`, checkpointing every `checkpoint_every` steps (the last step's state
/// is the artifact itself) and asking `control` after every step whether to go on.
pub(crate) fn run_loop(
    t: &mut impl StepLoop,
    output_dir: &Path,
    h: &super::config::Hyperparameters,
    control: &mut dyn FnMut(&super::config::StepMetrics) -> bool,
) -> Result<super::config::TrainOutcome, TrainError> {
    std::fs::create_dir_all(output_dir).map_err(|e| TrainError::Io(e.to_string()))?;
    while t.steps_done() < h.max_steps {
        let m = t.step()?;
        let n = t.steps_done();
        if h.checkpoint_every > 0 && n % h.checkpoint_every == 0 && n < h.max_steps {
            t.save_checkpoint()?;
        }
        if !control(&m) {
            return Err(TrainError::Cancelled);
        }
    }
    t.finish()
}
