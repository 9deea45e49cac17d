//! The serving backend: one worker thread per model replica (a model is served on one or
//! more devices), each with its own bounded queue and batcher. Nothing here knows about
//! HTTP; `crate::api` turns requests into `GenerationTask`s and worker errors into responses.

pub mod compute;
pub mod progress;
pub mod stats;
pub mod task;
pub mod worker;

pub use progress::{Progress, ProgressSender, Stage};
pub use stats::StatsSnapshot;
pub use task::{AdapterChoice, GenerationTask, Mode, ModelInfo, TaskOutput, TaskParams};
pub use worker::{BatchHook, LoadStatus, ModelWorker, WorkerError, WorkerSettings};

use crate::config::{Config, ConfigError, ModelSpec};
use crate::models::device::parse_device;
use crate::models::pipeline_model::LoadOptions;
use std::sync::Arc;
use std::time::Duration;

/// Every served model's workers (one per replica), in configuration order.
pub struct ModelPool {
    workers: Vec<Arc<ModelWorker>>,
    default: String,
}

impl ModelPool {
    /// Spawns one worker per configured model; loading runs in the background (see
    /// `wait_loaded`), so the listener can answer `/health` and `/ready` meanwhile.
    pub fn start(config: &Config, hook: Option<BatchHook>) -> Result<Self, ConfigError> {
        let specs = config.model_specs()?;
        let (dtype, variant) = (config.dtype()?, config.variant());
        let settings = WorkerSettings {
            max_batch: config.batching.max_batch,
            wait: Duration::from_millis(config.batching.wait_ms),
            queue_size: config.batching.queue_size,
            retry_after_s: config.batching.retry_after_s,
            adapter_cache: config.adapters.cache_size,
        };
        let default = if config.models.default.is_empty() {
            specs[0].name.clone()
        } else {
            config.models.default.clone()
        };
        // Every device is opened before any worker starts, so a bad placement fails start-up
        // with its reason instead of leaving a replica that never loads.
        let mut replicas = Vec::new();
        for spec in specs {
            for device in &spec.devices {
                let opened = parse_device(device)
                    .map_err(|e| ConfigError::Invalid(format!("model '{}': {e}", spec.name)))?;
                let load = LoadOptions {
                    device: opened,
                    dtype,
                    variant: variant.clone(),
                };
                let one = ModelSpec {
                    devices: vec![device.clone()],
                    ..spec.clone()
                };
                replicas.push((one, load));
            }
        }
        let workers = replicas
            .into_iter()
            .map(|(spec, load)| {
                Arc::new(ModelWorker::spawn(spec, load, settings.clone(), hook.clone()))
            })
            .collect();
        Ok(Self { workers, default })
    }

    /// A worker of the named model (the default one for `None`): the least-loaded of its
    /// loaded replicas (fewest requests queued or computing; the first on a tie), else the
    /// first, whose status then answers for the model.
    pub fn get(&self, name: Option<&str>) -> Option<&Arc<ModelWorker>> {
        let name = name.unwrap_or(&self.default);
        let mut replicas = self.workers.iter().filter(|w| w.name() == name);
        let first = replicas.next()?;
        std::iter::once(first)
            .chain(replicas)
            .filter(|w| matches!(w.status(), LoadStatus::Ready(_)))
            .min_by_key(|w| w.load())
            .or(Some(first))
    }

    /// Every replica of every model.
    pub fn workers(&self) -> &[Arc<ModelWorker>] {
        &self.workers
    }

    /// One worker per served model (its first replica), in configuration order: what lists
    /// models by name.
    pub fn models(&self) -> Vec<&Arc<ModelWorker>> {
        let mut seen = std::collections::HashSet::new();
        self.workers
            .iter()
            .filter(|w| seen.insert(w.name().to_string()))
            .collect()
    }

    /// The devices the named model is served on, one per replica.
    pub fn devices(&self, name: &str) -> Vec<String> {
        self.workers
            .iter()
            .filter(|w| w.name() == name)
            .map(|w| w.device().to_string())
            .collect()
    }

    pub fn default_model(&self) -> &str {
        &self.default
    }

    /// Resolves when every model is loaded; the first failure is returned.
    pub async fn wait_loaded(&self) -> Result<(), String> {
        for w in &self.workers {
            w.wait_loaded()
                .await
                .map_err(|e| format!("model '{}': {e}", w.name()))?;
        }
        Ok(())
    }

    pub fn is_ready(&self) -> bool {
        self.workers
            .iter()
            .all(|w| matches!(w.status(), LoadStatus::Ready(_)))
    }

    /// Stops admitting requests and waits until every queued request has been computed.
    pub fn shutdown(&self) {
        for w in &self.workers {
            w.close();
        }
        for w in &self.workers {
            w.shutdown();
        }
    }
}
