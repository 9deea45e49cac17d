//! The serving backend: one worker thread per model, each with its own bounded queue and
//! batcher. Nothing here knows about HTTP; `crate::api` turns requests into
//! `GenerationTask`s and worker errors into responses.

pub mod compute;
pub mod progress;
pub mod stats;
pub mod task;
pub mod worker;

pub use progress::{Progress, ProgressSender, Stage};
pub use stats::StatsSnapshot;
pub use task::{AdapterChoice, GenerationTask, Mode, ModelInfo, TaskOutput, TaskParams};
pub use worker::{BatchHook, LoadStatus, ModelWorker, WorkerError, WorkerSettings};

use crate::config::{Config, ConfigError};
use crate::models::device::parse_device;
use crate::models::pipeline_model::LoadOptions;
use std::sync::Arc;
use std::time::Duration;

/// Every served model's worker, in configuration order.
pub struct ModelPool {
    workers: Vec<Arc<ModelWorker>>,
    default: String,
}

impl ModelPool {
    /// Spawns one worker per configured model; loading runs in the background (see
    /// `wait_loaded`), so the listener can answer `/health` and `/ready` meanwhile.
    pub fn start(config: &Config, hook: Option<BatchHook>) -> Result<Self, ConfigError> {
        let specs = config.model_specs()?;
        let device = parse_device(&config.models.device).map_err(ConfigError::Invalid)?;
        let load = LoadOptions {
            device,
            dtype: config.dtype()?,
            variant: config.variant(),
        };
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
        let workers = specs
            .into_iter()
            .map(|spec| {
                Arc::new(ModelWorker::spawn(
                    spec,
                    load.clone(),
                    settings.clone(),
                    hook.clone(),
                ))
            })
            .collect();
        Ok(Self { workers, default })
    }

    /// The named model, or the default one for `None`.
    pub fn get(&self, name: Option<&str>) -> Option<&Arc<ModelWorker>> {
        let name = name.unwrap_or(&self.default);
        self.workers.iter().find(|w| w.name() == name)
    }

    pub fn workers(&self) -> &[Arc<ModelWorker>] {
        &self.workers
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
