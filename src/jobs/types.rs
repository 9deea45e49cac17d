//! The fine-tuning job layer's data types (the API mirrors the public ones in
//! `api::job_types`, which own the OpenAPI schemas).

use crate::training::lora::LoraSpec;
use crate::training::{Hyperparameters, Method};
use serde::{Deserialize, Serialize};

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
    /// The data directory cannot be written (full, read-only): the operator's problem, not the
    /// request's, and it may pass.
    #[error("{0}")]
    Storage(String),
    /// The submitting key has as many active jobs as it may.
    #[error("{0}")]
    TooManyJobs(String),
}

impl JobError {
    /// Machine-readable code (the same names the HTTP error bodies use).
    pub fn code(&self) -> &'static str {
        match self {
            JobError::Invalid(_) => "invalid_job",
            JobError::NotFound(_) => "job_not_found",
            JobError::TooManyJobs(_) => "rate_limited",
            JobError::AdapterNotFound(_) => "adapter_not_found",
            JobError::AdapterExists(_) => "adapter_exists",
            JobError::Dataset(_) => "dataset_error",
            JobError::Store(_) => "internal_error",
            JobError::Storage(_) => "storage_unavailable",
        }
    }
}

/// POST /finetune body.
#[derive(Debug, Clone, Serialize, Deserialize)]
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
    /// Any subset; missing fields take the base model's LoRA defaults.
    #[serde(default)]
    pub lora: Option<LoraRequest>,
    #[serde(default)]
    pub full_finetune: bool,
    /// Any subset; missing fields take the server's per-model fine-tuning defaults.
    #[serde(default)]
    pub hyperparameters: Option<serde_json::Value>,
    /// Receives Standard Webhooks (signed `{"type", "timestamp", "data": <job>}` POSTs, see
    /// docs/api.md) for the events in `webhook_events_filter`.
    #[serde(default)]
    pub webhook_url: Option<String>,
    /// Which events reach `webhook_url`: any of start, progress, completed. Default:
    /// completed only.
    #[serde(default)]
    pub webhook_events_filter: Option<Vec<WebhookEvent>>,
    /// An evaluation to run once the adapter is registered (its settings, opaque to the job:
    /// the server submits it as an evaluation of the adapter against the base model).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub evaluation: Option<serde_json::Value>,
}

/// Which job events a webhook receives (`webhook_events_filter`), as Replicate's filter does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WebhookEvent {
    /// The job left the queue (its dataset download began).
    Start,
    /// Training progress, at most once per `jobs.webhook_progress_interval_secs`.
    Progress,
    /// The job ended: completed, failed or cancelled (the job object says which).
    Completed,
}

/// The LoRA part of a POST /finetune body. Fields left out keep the base model's defaults, so
/// `{"target_modules": ["attn1.to_q"]}` changes where the adapter goes, not its rank.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoraRequest {
    /// Rank of the low-rank update (>= 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rank: Option<usize>,
    /// The update is scaled by `alpha / rank` (PEFT's `lora_alpha`; > 0).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub alpha: Option<f64>,
    /// UNet modules to adapt, by PEFT's rule: an entry matches a module whose name equals it or
    /// ends with `.<entry>` (`to_q` every attention query, `attn1.to_q` self-attention only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_modules: Option<Vec<String>>,
}

impl LoraRequest {
    /// The spec a job trains with: these fields laid over the model's `base`.
    pub fn over(&self, base: &LoraSpec) -> LoraSpec {
        LoraSpec {
            rank: self.rank.unwrap_or(base.rank),
            alpha: self.alpha.unwrap_or(base.alpha),
            target_modules: self
                .target_modules
                .clone()
                .unwrap_or_else(|| base.target_modules.clone()),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
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
        matches!(
            self,
            JobStatus::Completed | JobStatus::Failed | JobStatus::Cancelled
        )
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
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

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JobErrorBody {
    pub code: String,
    pub message: String,
}

/// GET /finetune/{id}
#[derive(Debug, Clone, Serialize, Deserialize)]
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
    pub dataset: Option<serde_json::Value>,
    /// While it runs: the server replica running it (its `replica` in /health).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replica: Option<String>,
}

/// GET /adapters
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AdapterInfo {
    pub name: String,
    pub base_model: String,
    pub method: String,
    pub hyperparameters: serde_json::Value,
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
    /// Hyperparameters per method (method name -> any subset), laid over `hyperparameters` for
    /// a job of that method: a model's good β depends on the method (Diffusion-DPO's scale is
    /// ~10^6 times DSPO's), and so can its learning rate. The file's `beta_by_method`
    /// (`{"dspo": 1.75}`) is shorthand for `{"dspo": {"beta": 1.75}}`.
    #[serde(default)]
    pub by_method: std::collections::BTreeMap<String, serde_json::Map<String, serde_json::Value>>,
}

impl FinetuneDefaults {
    /// These defaults with a model's own `finetune` section (any subset of `method`,
    /// `hyperparameters` and `lora`) laid over them.
    pub fn merged(&self, own: &serde_json::Value) -> Result<Self, String> {
        let obj = own.as_object().ok_or("must be a JSON object")?;
        let mut out = self.clone();
        for (k, v) in obj {
            match k.as_str() {
                "method" => out.method = v.as_str().ok_or("method must be a string")?.parse()?,
                // Both land in `by_method`; the check after the loop validates every entry.
                "beta_by_method" => {
                    for (m, b) in v.as_object().ok_or("beta_by_method must be an object")? {
                        let method: Method = m.parse()?;
                        out.by_method
                            .entry(method.name().to_string())
                            .or_default()
                            .insert("beta".into(), b.clone());
                    }
                }
                "by_method" => {
                    for (m, h) in v.as_object().ok_or("by_method must be an object")? {
                        let method: Method = m.parse()?;
                        let h = h
                            .as_object()
                            .ok_or_else(|| format!("by_method.{m} must be an object"))?;
                        out.by_method
                            .entry(method.name().to_string())
                            .or_default()
                            .extend(h.clone());
                    }
                }
                "hyperparameters" | "lora" => {
                    let mut base = if k == "lora" {
                        serde_json::to_value(&out.lora).map_err(|e| e.to_string())?
                    } else {
                        serde_json::to_value(&out.hyperparameters).map_err(|e| e.to_string())?
                    };
                    for (hk, hv) in v
                        .as_object()
                        .ok_or_else(|| format!("{k} must be an object"))?
                    {
                        base[hk] = hv.clone();
                    }
                    if k == "lora" {
                        out.lora =
                            serde_json::from_value(base).map_err(|e| format!("lora: {e}"))?;
                    } else {
                        out.hyperparameters = serde_json::from_value(base)
                            .map_err(|e| format!("hyperparameters: {e}"))?;
                    }
                }
                o => {
                    return Err(format!(
                    "unknown key '{o}' (method, hyperparameters, lora, by_method, beta_by_method)"
                ))
                }
            }
        }
        // Every method's hyperparameters must make sense now, not when a job is submitted.
        for m in out.by_method.keys() {
            let h = out.hyperparameters_for(m)?;
            if let Some(b) = h.beta.filter(|b| !(*b > 0.0 && b.is_finite())) {
                return Err(format!("{m}: beta must be a positive number, got {b}"));
            }
        }
        Ok(out)
    }

    /// The hyperparameters a job of `method` (its canonical name) starts from: the general
    /// ones with that method's overrides laid over them.
    pub fn hyperparameters_for(&self, method: &str) -> Result<Hyperparameters, String> {
        let mut base = serde_json::to_value(&self.hyperparameters).map_err(|e| e.to_string())?;
        for (k, v) in self.by_method.get(method).into_iter().flatten() {
            if base.get(k).is_none() {
                return Err(format!("by_method.{method}: unknown hyperparameter '{k}'"));
            }
            base[k] = v.clone();
        }
        serde_json::from_value(base).map_err(|e| format!("by_method.{method}: {e}"))
    }
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
            by_method: Default::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lora_request_overrides_only_what_it_names() {
        let base = LoraSpec {
            rank: 8,
            alpha: 16.0,
            target_modules: vec!["to_q".into(), "to_v".into()],
        };
        let only_targets: LoraRequest =
            serde_json::from_str(r#"{"target_modules": ["attn1.to_q"]}"#).unwrap();
        let l = only_targets.over(&base);
        assert_eq!(
            (l.rank, l.alpha, l.target_modules),
            (8, 16.0, vec!["attn1.to_q".to_string()])
        );
        let l = LoraRequest::default().over(&base);
        assert_eq!(
            (l.rank, l.alpha, l.target_modules),
            (8, 16.0, base.target_modules.clone())
        );
        let full: LoraRequest =
            serde_json::from_str(r#"{"rank": 2, "alpha": 1.0, "target_modules": ["to_k"]}"#)
                .unwrap();
        let l = full.over(&base);
        assert_eq!(
            (l.rank, l.alpha, l.target_modules),
            (2, 1.0, vec!["to_k".to_string()])
        );
        // A misspelt field is an error, not silently the model's default.
        assert!(serde_json::from_str::<LoraRequest>(r#"{"ranks": 2}"#).is_err());
    }

    #[test]
    fn a_models_finetune_section_overrides_only_what_it_names() {
        let base = FinetuneDefaults::default();
        let own = serde_json::json!({
            "hyperparameters": {"max_steps": 7, "batch_size": 3},
            "lora": {"rank": 2},
            "beta_by_method": {"dspo": 0.5, "dpo": 2000.0}
        });
        let m = base.merged(&own).unwrap();
        assert_eq!(
            (m.hyperparameters.max_steps, m.hyperparameters.batch_size),
            (7, 3)
        );
        assert_eq!(
            m.hyperparameters.learning_rate,
            base.hyperparameters.learning_rate
        );
        assert_eq!((m.lora.rank, m.lora.alpha), (2, base.lora.alpha));
        assert_eq!(
            m.hyperparameters_for("diffusion_dpo").unwrap().beta,
            Some(2000.0)
        );
        assert_eq!(m.hyperparameters_for("sft").unwrap().beta, None);
        assert_eq!(m.method, base.method);
        for bad in [
            serde_json::json!({"nope": 1}),
            serde_json::json!({"hyperparameters": {"max_steps": "many"}}),
            serde_json::json!({"beta_by_method": {"dspo": -1}}),
            serde_json::json!({"by_method": {"dspo": {"beta": 0}}}),
            serde_json::json!({"by_method": {"dspo": {"nope": 1}}}),
            serde_json::json!({"by_method": {"dspo": {"learning_rate": "fast"}}}),
            serde_json::json!({"by_method": {"magic": {"beta": 1}}}),
            serde_json::json!({"method": "magic"}),
        ] {
            assert!(base.merged(&bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_methods_own_hyperparameters_win_over_the_general_ones_for_that_method_only() {
        let own = serde_json::json!({
            "hyperparameters": {"learning_rate": 1e-4, "batch_size": 32},
            "by_method": {"dspo": {"beta": 1.75, "learning_rate": 3e-4}},
            "beta_by_method": {"diffusion_dpo": 5000.0}
        });
        let m = FinetuneDefaults::default().merged(&own).unwrap();
        let dspo = m.hyperparameters_for("dspo").unwrap();
        assert_eq!(
            (dspo.beta, dspo.learning_rate, dspo.batch_size),
            (Some(1.75), Some(3e-4), 32)
        );
        let dpo = m.hyperparameters_for("diffusion_dpo").unwrap();
        assert_eq!(
            (dpo.beta, dpo.learning_rate, dpo.batch_size),
            (Some(5000.0), Some(1e-4), 32)
        );
        let sft = m.hyperparameters_for("sft").unwrap();
        assert_eq!((sft.beta, sft.learning_rate), (None, Some(1e-4)));
    }
}
