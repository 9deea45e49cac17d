//! `dspo-server train --config FILE`: a training run from the command line with a progress
//! line per step and a final summary (the same Trainer that POST /finetune runs).

use crate::training::dataset::DatasetStats;
use crate::training::pretrain::Pretrainer;
use crate::training::config::load_config;
use crate::training::trainer::Trainer;
use crate::training::{StepMetrics, TrainConfig, TrainError, TrainMode, TrainOutcome};
use std::io::Write;
use std::path::Path;
use std::time::Instant;

pub fn run_train(config: &Path, overrides: &[String]) -> anyhow::Result<()> {
    let mut cfg = load_config(config)?;
    for o in overrides {
        apply_override(&mut cfg, o)?;
    }
    let started = Instant::now();
    let mut trainer = if cfg.mode == TrainMode::Preference {
        Run::Preference(Box::new(Trainer::new(cfg.clone())?))
    } else {
        Run::Pretrain(Box::new(Pretrainer::new(cfg.clone())?))
    };
    let stats = trainer.dataset_stats().clone();
    eprintln!(
        "dataset {}: {} rows, {} pairs kept, {} ties dropped, {} without a 0/1 label",
        cfg.dataset.display(),
        stats.rows,
        stats.kept,
        stats.ties_dropped,
        stats.invalid_labels
    );
    eprintln!(
        "{} beta {} lr {:.3e} ({} rows per step), {} steps{}",
        match cfg.mode {
            TrainMode::Preference => format!("method {}", cfg.method.name()),
            m => format!("mode {}", serde_json::to_value(m)?.as_str().unwrap_or("?")),
        },
        cfg.beta(),
        cfg.hyperparameters
            .learning_rate
            .unwrap_or_else(|| cfg.learning_rate()),
        cfg.pairs_per_step(),
        cfg.hyperparameters.max_steps,
        if trainer.step() > 0 {
            format!(", resuming at step {}", trainer.step())
        } else {
            String::new()
        }
    );
    let first = trainer.step();
    let loop_start = Instant::now();
    let outcome = trainer.run(&mut |m| {
        let done = (m.step - first) as f64;
        let eta =
            loop_start.elapsed().as_secs_f64() / done.max(1.0) * (m.total_steps - m.step) as f64;
        eprint!(
            "\rstep {}/{}  loss {:.5}  acc {}  lr {:.2e}  |g| {:.3}  eta {:.0}s   ",
            m.step,
            m.total_steps,
            m.loss,
            m.implicit_accuracy
                .map(|a| format!("{a:.2}"))
                .unwrap_or_else(|| "-".into()),
            m.learning_rate,
            m.grad_norm,
            eta
        );
        let _ = std::io::stderr().flush();
        true
    })?;
    eprintln!();
    let mean = |f: &dyn Fn(&StepMetrics) -> Option<f64>| outcome.mean_of_last(10, f);
    let summary = serde_json::json!({
        "artifact": outcome.artifact,
        "steps": outcome.metrics.len(),
        "resumed_from": outcome.resumed_from,
        "final_loss_mean_last10": mean(&|m| Some(m.loss)),
        "implicit_accuracy_mean_last10": mean(&|m| m.implicit_accuracy),
        "dataset": outcome.dataset,
        "seconds": started.elapsed().as_secs_f64(),
    });
    std::fs::write(
        cfg.output_dir.join("summary.json"),
        serde_json::to_vec_pretty(&summary)?,
    )?;
    println!("{}", serde_json::to_string_pretty(&summary)?);
    Ok(())
}

/// `--set path=value`: the same rule as `serve --set` (crate::util::set_override) on the
/// training config, where a bare name is a hyperparameter (`--set max_steps=10`, the same as
/// `--set hyperparameters.max_steps=10`) unless it is a top-level key (`model`, `dataset`,
/// `output_dir`, `method`, ...); nested options by dotted path (`pretrain.snr_gamma=5`).
fn apply_override(cfg: &mut TrainConfig, kv: &str) -> anyhow::Result<()> {
    let (k, v) = kv
        .split_once('=')
        .ok_or_else(|| anyhow::anyhow!("--set expects key=value, got {kv}"))?;
    let k = k.trim();
    let mut tree = serde_json::to_value(&*cfg)?;
    let path = if k.contains('.') || tree.get(k).is_some() {
        k.to_string()
    } else {
        format!("hyperparameters.{k}")
    };
    crate::util::set_override(&mut tree, &path, v).map_err(|e| anyhow::anyhow!("--set {kv}: {e}"))?;
    *cfg = serde_json::from_value(tree).map_err(|e| anyhow::anyhow!("--set {kv}: {e}"))?;
    Ok(())
}

/// The two loops behind `train`: preference pairs, or image–caption pretraining.
enum Run {
    Preference(Box<Trainer>),
    Pretrain(Box<Pretrainer>),
}

impl Run {
    fn dataset_stats(&self) -> &DatasetStats {
        match self {
            Run::Preference(t) => t.dataset_stats(),
            Run::Pretrain(t) => t.dataset_stats(),
        }
    }
    fn step(&self) -> usize {
        match self {
            Run::Preference(t) => t.step(),
            Run::Pretrain(t) => t.step(),
        }
    }
    fn run(
        &mut self,
        control: &mut dyn FnMut(&StepMetrics) -> bool,
    ) -> Result<TrainOutcome, TrainError> {
        match self {
            Run::Preference(t) => t.run(control),
            Run::Pretrain(t) => t.run(control),
        }
    }
}
