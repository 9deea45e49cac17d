//! The fine-tuning job API's data types (also the OpenAPI schemas of /finetune and /adapters).

use crate::training::lora::LoraSpec;
use crate::training::{Hyperparameters, Method};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

#[derive(Debug, thiserror::Error)]
pub enum JobError {
    #[error("invalid job: {0}")]
    Invalid(String),
    #[error("job {0} not found")]
    NotFound(String),
    #[error("adapter {0} not found")]
    AdapterNotFound(String),
    #[error("adapter name {0} is taken")]
    AdapterExists(String),
    #[error("dataset: {0}")]
    Dataset(String),
    #[error("store: {0}")]
    Store(String),
}

impl JobError {
    /// Machine-readable code (the same names the HTTP error bodies use).
    pub fn code(&self) -> &'static str {
        match self {
            JobError::Invalid(_) => "invalid_job",
            JobError::NotFound(_) => "job_not_found",
            JobError::AdapterNotFound(_) => "adapter_not_found",
            JobError::AdapterExists(_) => "adapter_exists",
            JobError::Dataset(_) => "dataset_error",
            JobError::Store(_) => "internal_error",
        }
    }
}

/// POST /finetune body.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct JobSpec {
    /// `http(s)://` parquet (Pick-a-Pic v2 schema) or JSONL manifest, `hf://datasets/<owner>/<name>[/<file>]`,
    /// or `file://` under a directory allowed by the server's config.
    pub dataset_url: String,
    /// A served model's name; default: the server's default model.
    #[serde(default)]
    pub base_model: Option<String>,
    pub method: Method,
    /// Name of the adapter to register; default: `<method>-<job id prefix>`.
    #[serde(default)]
    pub adapter_name: Option<String>,
    #[serde(default)]
    pub lora: Option<LoraSpec>,
    #[serde(default)]
    pub full_finetune: bool,
    /// Any subset; missing fields take the server's per-model fine-tuning defaults.
    #[serde(default)]
    #[schema(value_type = Object)]
    pub hyperparameters: Option<serde_json::Value>,
    /// POSTed the final job object (signed, see README) when the job ends.
    #[serde(default)]
    pub webhook_url: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum JobStatus {
    Queued,
    Downloading,
    Training,
    Completed,
    Failed,
    Cancelled,
}

impl JobStatus {
    pub fn as_str(&self) -> &'static str {
        match self {
            JobStatus::Queued => "queued",
            JobStatus::Downloading => "downloading",
            JobStatus::Training => "training",
            JobStatus::Completed => "completed",
            JobStatus::Failed => "failed",
            JobStatus::Cancelled => "cancelled",
        }
    }
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "queued" => JobStatus::Queued,
            "downloading" => JobStatus::Downloading,
            "training" => JobStatus::Training,
            "completed" => JobStatus::Completed,
            "failed" => JobStatus::Failed,
            "cancelled" => JobStatus::Cancelled,
            _ => return None,
        })
    }
    pub fn is_terminal(&self) -> bool {
        matches!(self, JobStatus::Completed | JobStatus::Failed | JobStatus::Cancelled)
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
pub struct Progress {
    pub step: usize,
    pub total_steps: usize,
    pub loss: Option<f64>,
    pub implicit_accuracy: Option<f64>,
    pub eta_seconds: Option<f64>,
    /// While downloading: bytes received and expected (if known).
    pub downloaded_bytes: Option<u64>,
    pub total_bytes: Option<u64>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct JobErrorBody {
    pub code: String,
    pub message: String,
}

/// GET /finetune/{id}
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct JobRecord {
    pub id: String,
    pub status: JobStatus,
    pub spec: JobSpec,
    pub created_at: f64,
    pub updated_at: f64,
    pub progress: Option<Progress>,
    pub error: Option<JobErrorBody>,
    /// The registered adapter's name once completed.
    pub adapter: Option<String>,
    /// Rows read, pairs kept, ties dropped, undecodable images skipped.
    #[schema(value_type = Object)]
    pub dataset: Option<serde_json::Value>,
}

/// GET /adapters
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct AdapterInfo {
    pub name: String,
    pub base_model: String,
    pub method: String,
    #[schema(value_type = Object)]
    pub hyperparameters: serde_json::Value,
    #[schema(value_type = Object)]
    pub final_metrics: Option<serde_json::Value>,
    pub job_id: Option<String>,
    pub created_at: f64,
}

/// Fine-tuning defaults of one base model, used for fields a request leaves out.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FinetuneDefaults {
    pub method: Method,
    pub hyperparameters: Hyperparameters,
    pub lora: LoraSpec,
}

impl Default for FinetuneDefaults {
    /// Sized for the tiny and demo models on a 2-core CPU (minutes): LoRA rank 4 with a
    /// learning rate LoRA tolerates, short warmup.
    fn default() -> Self {
        Self {
            method: Method::Dspo,
            hyperparameters: Hyperparameters {
                learning_rate: Some(1e-4),
                max_steps: 200,
                batch_size: 4,
                gradient_accumulation_steps: 1,
                warmup_steps: 10,
                checkpoint_every: 50,
                ..Default::default()
            },
            lora: LoraSpec::default(),
        }
    }
}
