//! The request and response bodies of /finetune and /adapters, owned by the API so that
//! changing a job or training type cannot change the public document by accident: each is a
//! mirror of its `jobs`/`training` counterpart with the same JSON shape (a test checks), and
//! conversions at the boundary.

use crate::jobs;
use crate::training;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Method {
    /// Official DSPO (SD1.5 branch): score matching toward the preference-tilted score.
    Dspo,
    /// Diffusion-DPO: `-log sigmoid(u)`.
    DiffusionDpo,
    /// Plain denoising loss on the winners.
    Sft,
    /// The paper's energy-based variant (Eq. 45), constant weight, losers unused.
    DspoE,
    /// Diffusion-KTO: every image judged on its own (winners desirable, losers undesirable),
    /// `1 - sigmoid(±beta * (implicit reward - reference point))`.
    DiffusionKto,
    /// Official DSPO's SDXL branch: the winners' policy-reference difference weighted by
    /// `1 - sigmoid(u)` (no denoising target), or `(1 - sigmoid(u))^2` once that difference is
    /// small. Default beta 5000.
    DspoSdxl,
}

/// Which job events a webhook receives (`webhook_events_filter`), as Replicate's filter does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum WebhookEvent {
    /// The job left the queue (its dataset download began).
    Start,
    /// Training progress, at most once per `jobs.webhook_progress_interval_secs`.
    Progress,
    /// The job ended: completed, failed or cancelled (the job object says which).
    Completed,
}

/// Reads a string enum from any JSON value, so a value of the wrong type (`"method": 1`) is
/// a data error (422 invalid_request) like an unknown name, not a syntax error (400).
fn string_enum<'de, D, T>(d: D, names: &[(&str, T)]) -> Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Copy,
{
    let v = serde_json::Value::deserialize(d)?;
    let known = || names.iter().map(|(n, _)| *n).collect::<Vec<_>>().join(", ");
    v.as_str()
        .and_then(|s| names.iter().find(|(n, _)| *n == s).map(|(_, t)| *t))
        .ok_or_else(|| serde::de::Error::custom(format!("expected one of {}, got {v}", known())))
}

impl<'de> Deserialize<'de> for Method {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        string_enum(
            d,
            &[
                ("dspo", Method::Dspo),
                ("diffusion_dpo", Method::DiffusionDpo),
                ("sft", Method::Sft),
                ("dspo_e", Method::DspoE),
                ("diffusion_kto", Method::DiffusionKto),
                ("dspo_sdxl", Method::DspoSdxl),
            ],
        )
    }
}

impl<'de> Deserialize<'de> for WebhookEvent {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        string_enum(
            d,
            &[
                ("start", WebhookEvent::Start),
                ("progress", WebhookEvent::Progress),
                ("completed", WebhookEvent::Completed),
            ],
        )
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
    /// Default: the base model's fine-tuning method (`dspo_server.json`, else `[finetune]`).
    #[serde(default)]
    pub method: Option<Method>,
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
    pub hyperparameters: Option<Hyperparameters>,
    /// Receives Standard Webhooks (signed `{"type", "timestamp", "data": <job>}` POSTs, see
    /// docs/api.md) for the events in `webhook_events_filter`.
    #[serde(default)]
    pub webhook_url: Option<String>,
    /// Which events reach `webhook_url`: any of start, progress, completed. Default:
    /// completed only.
    #[serde(default)]
    pub webhook_events_filter: Option<Vec<WebhookEvent>>,
    /// Evaluate the adapter against the base model once it is registered (POST /evaluate's
    /// protocol); GET /finetune/{id} then carries the evaluation and its win rates.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub evaluation: Option<JobEvaluation>,
}

/// The `evaluation` block of a POST /finetune body: the adapter (side A) against its base
/// model (side B).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct JobEvaluation {
    pub prompts: Vec<String>,
    /// Reward names the server offers (GET /evaluate/rewards).
    pub rewards: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seeds: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub steps: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guidance_scale: Option<f64>,
}

/// The training settings of a POST /finetune body. Every field is optional: one left out takes
/// the base model's fine-tuning default (GET /models does not list them; docs/fine-tuning.md
/// does).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Hyperparameters {
    /// Preference strength (> 0). Defaults: dspo / dspo_e 0.001 (the paper's SD1.5 value),
    /// diffusion_dpo and dspo_sdxl 5000, diffusion_kto 1000; unused by sft.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub beta: Option<f64>,
    /// Peak learning rate; default: 1e-8 x pairs per optimiser step (the official scaling).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub learning_rate: Option<f64>,
    /// Optimiser steps.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_steps: Option<usize>,
    /// Pairs per micro-batch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub batch_size: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gradient_accumulation_steps: Option<usize>,
    /// Linear warmup from 0, in optimiser steps.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub warmup_steps: Option<usize>,
    /// Training image side; default: the model's native size.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resolution: Option<usize>,
    /// Probability that a pair's caption is replaced by "" (text-to-image models).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub caption_dropout: Option<f64>,
    /// InstructPix2Pix models: the probability with which the instruction alone, the source
    /// image alone, and both are dropped per pair (at most 1/3). Default 0.05.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub conditioning_dropout: Option<f64>,
    /// Standard deviation of a per-channel constant added to the training noise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub noise_offset: Option<f64>,
    /// Weight of the plain denoising loss on both images of every pair, added to the pair loss.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub anchor_weight: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
    /// Write a checkpoint every N optimiser steps (0: only at the end).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkpoint_every: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_grad_norm: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight_decay: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub adam_beta1: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub adam_beta2: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub adam_eps: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub random_crop: Option<bool>,
    /// SDXL: the real image size as time ids instead of the official trainer's fixed ones.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sdxl_real_time_ids: Option<bool>,
    /// Use only the first N usable pairs of the dataset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_pairs: Option<usize>,
    /// Recompute activations in the backward pass (less memory, about one more forward pass).
    /// Default: on for GPUs, off on the CPU.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gradient_checkpointing: Option<bool>,
    /// The drift guard checks every N steps (and after the last) how far the tuned model's
    /// probe images have moved from the base model's. Default: every tenth of the run; 0: off.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drift_every: Option<usize>,
    /// Fail the job (drift_exceeded) once the drift (mean absolute pixel difference, 0-1)
    /// passes this. Default: report only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drift_limit: Option<f64>,
}

/// The LoRA part of a POST /finetune body. Fields left out keep the base model's defaults, so
/// `{"target_modules": ["attn1.to_q"]}` changes where the adapter goes, not its rank.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
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
    #[schema(value_type = Option<Object>)]
    pub dataset: Option<serde_json::Value>,
    /// While it runs: the server replica running it (its `replica` in /health).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replica: Option<String>,
    /// With an `evaluation` block: its evaluation, once the job has completed and submitted it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub evaluation: Option<JobEvaluationStatus>,
}

/// Win rates of A over B under one reward.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct RewardResult {
    pub n: usize,
    pub wins: usize,
    pub ties: usize,
    pub losses: usize,
    /// (wins + ties / 2) / n
    pub winrate: f64,
    /// Half-width of the 95% interval (normal approximation); null for n < 2.
    pub ci95: Option<f64>,
    pub mean_a: f64,
    pub mean_b: f64,
    /// A's image of seed k against B's of seed k + 1 (independent draws); with 2+ seeds.
    #[schema(no_recursion)]
    pub unpaired: Option<Box<RewardResult>>,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum EvaluationStatus {
    Queued,
    Running,
    Completed,
    Failed,
    Cancelled,
}

/// A fine-tuning job's evaluation (its `evaluation` block), as GET /finetune/{id} shows it.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct JobEvaluationStatus {
    /// GET /evaluate/{evaluation_id} for everything, /rows for the per-image scores.
    pub evaluation_id: String,
    pub status: EvaluationStatus,
    pub done: usize,
    pub total: usize,
    /// Per reward, the adapter's win rate over the base model once completed.
    pub result: Option<std::collections::BTreeMap<String, RewardResult>>,
}

/// GET /adapters
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct AdapterInfo {
    pub name: String,
    pub base_model: String,
    pub method: String,
    #[schema(value_type = Object)]
    pub hyperparameters: serde_json::Value,
    #[schema(value_type = Option<Object>)]
    pub final_metrics: Option<serde_json::Value>,
    pub job_id: Option<String>,
    pub created_at: f64,
}

/// What every optimiser step reports.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct StepMetrics {
    pub step: usize,
    pub total_steps: usize,
    pub loss: f64,
    /// Share of pairs with u > 0 (model prefers the winner more than the reference does).
    pub implicit_accuracy: Option<f64>,
    /// With `anchor_weight` > 0: the plain denoising MSE on both images of the step's pairs,
    /// before its weight (how far the model has left the data).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub anchor_mse: Option<f64>,
    pub learning_rate: f64,
    pub grad_norm: f64,
    pub seconds: f64,
    /// At the drift guard's checks: the mean absolute pixel difference (0-1) between the tuned
    /// and the base model's images of a fixed probe (`hyperparameters.drift_every`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drift: Option<f64>,
}

// Conversions at the boundary. Enums map variant by variant, so a variant added on one side
// only fails to compile until it is added on the other.

impl From<Method> for training::Method {
    fn from(m: Method) -> Self {
        match m {
            Method::Dspo => Self::Dspo,
            Method::DiffusionDpo => Self::DiffusionDpo,
            Method::Sft => Self::Sft,
            Method::DspoE => Self::DspoE,
            Method::DiffusionKto => Self::DiffusionKto,
            Method::DspoSdxl => Self::DspoSdxl,
        }
    }
}

impl From<training::Method> for Method {
    fn from(m: training::Method) -> Self {
        match m {
            training::Method::Dspo => Self::Dspo,
            training::Method::DiffusionDpo => Self::DiffusionDpo,
            training::Method::Sft => Self::Sft,
            training::Method::DspoE => Self::DspoE,
            training::Method::DiffusionKto => Self::DiffusionKto,
            training::Method::DspoSdxl => Self::DspoSdxl,
        }
    }
}

impl From<WebhookEvent> for jobs::types::WebhookEvent {
    fn from(e: WebhookEvent) -> Self {
        match e {
            WebhookEvent::Start => Self::Start,
            WebhookEvent::Progress => Self::Progress,
            WebhookEvent::Completed => Self::Completed,
        }
    }
}

impl From<jobs::types::WebhookEvent> for WebhookEvent {
    fn from(e: jobs::types::WebhookEvent) -> Self {
        use jobs::types::WebhookEvent as E;
        match e {
            E::Start => Self::Start,
            E::Progress => Self::Progress,
            E::Completed => Self::Completed,
        }
    }
}

impl From<JobStatus> for jobs::JobStatus {
    fn from(s: JobStatus) -> Self {
        match s {
            JobStatus::Queued => Self::Queued,
            JobStatus::Downloading => Self::Downloading,
            JobStatus::Training => Self::Training,
            JobStatus::Completed => Self::Completed,
            JobStatus::Failed => Self::Failed,
            JobStatus::Cancelled => Self::Cancelled,
        }
    }
}

impl From<jobs::JobStatus> for JobStatus {
    fn from(s: jobs::JobStatus) -> Self {
        use jobs::JobStatus as S;
        match s {
            S::Queued => Self::Queued,
            S::Downloading => Self::Downloading,
            S::Training => Self::Training,
            S::Completed => Self::Completed,
            S::Failed => Self::Failed,
            S::Cancelled => Self::Cancelled,
        }
    }
}

impl From<LoraRequest> for jobs::types::LoraRequest {
    fn from(l: LoraRequest) -> Self {
        Self {
            rank: l.rank,
            alpha: l.alpha,
            target_modules: l.target_modules,
        }
    }
}

impl From<jobs::types::LoraRequest> for LoraRequest {
    fn from(l: jobs::types::LoraRequest) -> Self {
        Self {
            rank: l.rank,
            alpha: l.alpha,
            target_modules: l.target_modules,
        }
    }
}

impl JobSpec {
    /// The job layer's spec, with `default_method` where the request named none.
    pub fn into_job_spec(self, default_method: training::Method) -> jobs::JobSpec {
        let s = self;
        jobs::JobSpec {
            dataset_url: s.dataset_url,
            base_model: s.base_model,
            method: s.method.map_or(default_method, Into::into),
            adapter_name: s.adapter_name,
            lora: s.lora.map(Into::into),
            full_finetune: s.full_finetune,
            hyperparameters: s
                .hyperparameters
                .and_then(|h| serde_json::to_value(h).ok()),
            webhook_url: s.webhook_url,
            webhook_events_filter: s
                .webhook_events_filter
                .map(|f| f.into_iter().map(Into::into).collect()),
            evaluation: s.evaluation.and_then(|e| serde_json::to_value(e).ok()),
        }
    }
}

impl From<jobs::JobSpec> for JobSpec {
    fn from(s: jobs::JobSpec) -> Self {
        Self {
            dataset_url: s.dataset_url,
            base_model: s.base_model,
            method: Some(s.method.into()),
            adapter_name: s.adapter_name,
            lora: s.lora.map(Into::into),
            full_finetune: s.full_finetune,
            // Stored specs passed the same schema when they were submitted.
            hyperparameters: s
                .hyperparameters
                .and_then(|h| serde_json::from_value(h).ok()),
            webhook_url: s.webhook_url,
            webhook_events_filter: s
                .webhook_events_filter
                .map(|f| f.into_iter().map(Into::into).collect()),
            evaluation: s.evaluation.and_then(|e| serde_json::from_value(e).ok()),
        }
    }
}

impl From<jobs::Progress> for Progress {
    fn from(p: jobs::Progress) -> Self {
        Self {
            step: p.step,
            total_steps: p.total_steps,
            loss: p.loss,
            implicit_accuracy: p.implicit_accuracy,
            eta_seconds: p.eta_seconds,
            downloaded_bytes: p.downloaded_bytes,
            total_bytes: p.total_bytes,
        }
    }
}

impl From<jobs::JobRecord> for JobRecord {
    fn from(j: jobs::JobRecord) -> Self {
        Self {
            id: j.id,
            status: j.status.into(),
            spec: j.spec.into(),
            created_at: j.created_at,
            updated_at: j.updated_at,
            progress: j.progress.map(Into::into),
            error: j.error.map(|e| JobErrorBody {
                code: e.code,
                message: e.message,
            }),
            adapter: j.adapter,
            dataset: j.dataset,
            replica: j.replica,
            evaluation: None,
        }
    }
}

impl From<jobs::AdapterInfo> for AdapterInfo {
    fn from(a: jobs::AdapterInfo) -> Self {
        Self {
            name: a.name,
            base_model: a.base_model,
            method: a.method,
            hyperparameters: a.hyperparameters,
            final_metrics: a.final_metrics,
            job_id: a.job_id,
            created_at: a.created_at,
        }
    }
}

impl From<training::StepMetrics> for StepMetrics {
    fn from(m: training::StepMetrics) -> Self {
        Self {
            step: m.step,
            total_steps: m.total_steps,
            loss: m.loss,
            implicit_accuracy: m.implicit_accuracy,
            anchor_mse: m.anchor_mse,
            learning_rate: m.learning_rate,
            grad_norm: m.grad_norm,
            seconds: m.seconds,
            drift: m.drift,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The mirrors serialise exactly as the types they mirror (what the SSE stream and the
    /// webhooks send, from the `jobs` side, must read as the documented schemas).
    #[test]
    fn mirrors_have_the_same_json_shape() {
        let spec: jobs::JobSpec = serde_json::from_value(serde_json::json!({
            "dataset_url": "https://example.com/p.parquet", "method": "diffusion_dpo",
            "adapter_name": "a", "lora": {"rank": 8, "target_modules": ["to_q"]},
            "hyperparameters": {"beta": 2.0}, "webhook_url": "https://example.com/h",
            "webhook_events_filter": ["start", "completed"]}))
        .unwrap();
        let record = jobs::JobRecord {
            id: "j".into(),
            status: jobs::JobStatus::Training,
            spec: spec.clone(),
            created_at: 1.0,
            updated_at: 2.0,
            progress: Some(jobs::Progress {
                step: 3,
                total_steps: 9,
                loss: Some(0.5),
                ..Default::default()
            }),
            error: Some(jobs::types::JobErrorBody {
                code: "c".into(),
                message: "m".into(),
            }),
            adapter: None,
            dataset: Some(serde_json::json!({"rows": 4})),
            replica: Some("r1".into()),
        };
        let mirrored = serde_json::to_value(JobRecord::from(record.clone())).unwrap();
        assert_eq!(serde_json::to_value(&record).unwrap(), mirrored);
        let back = JobSpec::from(spec.clone()).into_job_spec(training::Method::Sft);
        assert_eq!(serde_json::to_value(&back).unwrap(), serde_json::to_value(&spec).unwrap());
        let m = training::StepMetrics {
            step: 1,
            total_steps: 2,
            loss: 0.1,
            implicit_accuracy: Some(0.5),
            anchor_mse: None,
            learning_rate: 1e-5,
            grad_norm: 3.0,
            seconds: 0.2,
            drift: Some(0.01),
        };
        assert_eq!(
            serde_json::to_value(&m).unwrap(),
            serde_json::to_value(StepMetrics::from(m.clone())).unwrap()
        );
    }

    /// The typed request names every training setting and no other: each field of the
    /// trainer's Hyperparameters is accepted, and a request naming all of them reads back
    /// into the trainer's type.
    #[test]
    fn hyperparameters_mirror_the_trainers_fields() {
        let trainer = serde_json::to_value(training::Hyperparameters::default()).unwrap();
        let all: serde_json::Map<String, serde_json::Value> = trainer
            .as_object()
            .unwrap()
            .iter()
            .map(|(k, v)| {
                let v = match k.as_str() {
                    "beta" | "learning_rate" => serde_json::json!(0.5),
                    "resolution" | "max_pairs" | "drift_every" => serde_json::json!(64),
                    "drift_limit" => serde_json::json!(0.25),
                    "conditioning_dropout" => serde_json::json!(0.1),
                    "gradient_checkpointing" => serde_json::json!(true),
                    _ => v.clone(),
                };
                (k.clone(), v)
            })
            .collect();
        let api: Hyperparameters = serde_json::from_value(all.clone().into()).unwrap();
        let back = serde_json::to_value(&api).unwrap();
        assert_eq!(back, serde_json::Value::Object(all.clone()));
        let _: training::Hyperparameters = serde_json::from_value(back).unwrap();
        assert!(serde_json::from_value::<Hyperparameters>(serde_json::json!({"lr": 1})).is_err());
    }
}
