//! Asynchronous fine-tuning jobs: queue, persistence (SQLite, or PostgreSQL shared by
//! replicas), progress, cancellation, dataset fetching, adapter registry, webhooks.

pub mod evaluations;
pub mod fetch;
pub mod manager;
pub mod sql;
pub mod store;
pub mod types;
pub mod webhook;

pub use manager::{JobEvent, JobManager, JobsConfig};
pub use types::{AdapterInfo, FinetuneDefaults, JobError, JobRecord, JobSpec, JobStatus, Progress};
