//! POST /evaluate: the paper's protocol as an asynchronous job. Side A and side B (adapters of
//! one served model, or an adapter against the base model) draw every prompt with the same
//! seeds through the model's worker (the pipeline requests use), reward models score each image
//! against its prompt, and the job reports per reward the win rate of A over B with its 95%
//! interval, paired and unpaired, the mean scores, and downloadable per-image rows.

use super::auth::Caller;
use super::error::{ApiError, ErrorResponse};
use super::job_types::{EvaluationStatus, RewardResult};
use super::types::{EditRequest, GenerateRequest};
use super::{validate, AppState};
use crate::config::Config;
use crate::evaluation::run::{self, Plan};
use crate::jobs::evaluations::{EvalRecord, EvalRunner, EvaluationManager};
use crate::jobs::types::JobErrorBody;
use crate::models::rewards::{RewardKind, RewardModel};
use crate::server::{GenerationTask, ModelPool, WorkerError};
use axum::extract::rejection::JsonRejection;
use axum::extract::{Extension, Path, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use utoipa::ToSchema;

/// POST /evaluate body.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct EvaluateRequest {
    /// A served model; default: the default model.
    #[serde(default)]
    pub model: Option<String>,
    /// Side A's adapter; left out: the base model.
    #[serde(default)]
    pub adapter_a: Option<String>,
    /// Side B's adapter; left out: the base model.
    #[serde(default)]
    pub adapter_b: Option<String>,
    /// Both sides' adapter strength; default from the server's configuration.
    #[serde(default)]
    pub adapter_scale: Option<f64>,
    /// The prompts (instructions for an edit model), 1 to rewards.max_prompts; or give
    /// `prompts_url`.
    #[serde(default)]
    pub prompts: Vec<String>,
    /// A prompt set to fetch instead of `prompts`: parquet (a `caption`, `prompt` or `text`
    /// column, as Pick-a-Pic, PartiPrompts and the HPSv2 benchmark ship), JSON lines with one of
    /// those fields, or text with one prompt per line; repeats are kept once. `http(s)://`, or
    /// `file://` under datasets.file_roots; private addresses as for datasets.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompts_url: Option<String>,
    /// Edits: one input image per prompt, base64 (PNG, JPEG or WebP).
    #[serde(default)]
    pub images: Option<Vec<String>>,
    /// Edits: instruct_pix2pix or img2img (default: the model's).
    #[serde(default)]
    pub mode: Option<String>,
    #[serde(default)]
    pub strength: Option<f64>,
    #[serde(default)]
    pub image_guidance_scale: Option<f64>,
    /// Reward models by name (clip_score, pickscore, aesthetic, hpsv2): the ones the server
    /// configures (GET /evaluate/rewards).
    pub rewards: Vec<String>,
    /// Images per prompt and side: prompt i takes seeds i*1000 + 0..seeds. Default 1.
    #[serde(default)]
    pub seeds: Option<i64>,
    #[serde(default)]
    pub negative_prompt: Option<String>,
    #[serde(default)]
    pub steps: Option<i64>,
    #[serde(default)]
    pub guidance_scale: Option<f64>,
    #[serde(default)]
    #[schema(value_type = Option<super::types::Scheduler>)]
    pub scheduler: Option<String>,
    #[serde(default)]
    pub width: Option<i64>,
    #[serde(default)]
    pub height: Option<i64>,
    /// |score difference| at or below this counts as a tie (half a win). Default 0.
    #[serde(default)]
    pub tie_eps: Option<f64>,
}

/// GET /evaluate/{id}
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct EvaluationRecord {
    pub id: String,
    pub status: EvaluationStatus,
    pub spec: EvaluateRequest,
    pub created_at: f64,
    pub updated_at: f64,
    /// Images generated so far, of `total` (both sides).
    pub done: usize,
    pub total: usize,
    /// Per reward, once completed.
    pub result: Option<BTreeMap<String, RewardResult>>,
    pub error: Option<super::job_types::JobErrorBody>,
}

/// One prompt and seed, both sides' scores.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct EvaluationRow {
    pub prompt_index: usize,
    pub prompt: String,
    pub seed: u64,
    /// reward -> [A's score, B's score]
    pub scores: BTreeMap<String, Vec<f64>>,
}

/// 202 body of POST /evaluate.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct EvaluationCreated {
    pub evaluation_id: String,
    pub status_url: String,
    pub evaluation: EvaluationRecord,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct RewardsAvailable {
    /// Reward names POST /evaluate accepts on this server.
    pub rewards: Vec<String>,
}

fn record_of(r: EvalRecord) -> Result<EvaluationRecord, ApiError> {
    use crate::jobs::evaluations::EvalStatus as S;
    let internal = |e: serde_json::Error| ApiError::Internal(format!("stored evaluation: {e}"));
    Ok(EvaluationRecord {
        id: r.id,
        status: match r.status {
            S::Queued => EvaluationStatus::Queued,
            S::Running => EvaluationStatus::Running,
            S::Completed => EvaluationStatus::Completed,
            S::Failed => EvaluationStatus::Failed,
            S::Cancelled => EvaluationStatus::Cancelled,
        },
        spec: serde_json::from_value(r.spec).map_err(internal)?,
        created_at: r.created_at,
        updated_at: r.updated_at,
        done: r.done,
        total: r.total,
        result: r.result.map(serde_json::from_value).transpose().map_err(internal)?,
        error: r.error.map(|e| super::job_types::JobErrorBody {
            code: e.code,
            message: e.message,
        }),
    })
}

/// The evaluation plan of a request: validated like a /generate (or /edit) request of its
/// model, the adapters checked, and the rewards configured.
fn plan(req: &EvaluateRequest, pool: &ModelPool, config: &Config) -> Result<(Plan, Vec<String>), ApiError> {
    let worker = pool.get(req.model.as_deref()).ok_or_else(|| {
        ApiError::ModelNotFound(format!("no model named '{}'", req.model.as_deref().unwrap_or_default()))
    })?;
    let info = worker.info()?;
    let limits = &config.rewards;
    if req.prompts.is_empty() || req.prompts.len() > limits.max_prompts {
        return Err(ApiError::InvalidRequest(format!(
            "{} prompts; an evaluation takes 1 to {} (rewards.max_prompts)",
            req.prompts.len(),
            limits.max_prompts
        )));
    }
    let seeds = req.seeds.unwrap_or(1);
    if seeds < 1 || seeds as usize > limits.max_seeds {
        return Err(ApiError::InvalidRequest(format!(
            "seeds is {seeds}; it must be between 1 and {} (rewards.max_seeds)",
            limits.max_seeds
        )));
    }
    if req.rewards.is_empty() {
        return Err(ApiError::UnknownReward("rewards is empty: name at least one".into()));
    }
    for r in &req.rewards {
        if limits.source(r).is_none() {
            let known = limits.available();
            return Err(ApiError::UnknownReward(format!(
                "reward '{r}' is not available on this server; available: {}",
                if known.is_empty() { "none (see [rewards] in the configuration)".to_string() } else { known.join(", ") }
            )));
        }
    }
    // One validated request per side: the same checks /generate and /edit make.
    let side = |adapter: &Option<String>| -> Result<(GenerationTask, Option<Vec<Arc<image::RgbImage>>>), ApiError> {
        match &req.images {
            None => {
                let g = GenerateRequest {
                    prompt: req.prompts[0].clone(),
                    negative_prompt: req.negative_prompt.clone(),
                    model: req.model.clone(),
                    adapter: adapter.clone(),
                    adapter_scale: adapter.as_ref().and(req.adapter_scale),
                    width: req.width,
                    height: req.height,
                    steps: req.steps,
                    guidance_scale: req.guidance_scale,
                    scheduler: req.scheduler.clone(),
                    seed: Some(0),
                    num_images: Some(1),
                    output_format: None,
                    output_quality: None,
                };
                Ok((validate::generate(g, &info, config)?.0, None))
            }
            Some(images) => {
                if images.len() != req.prompts.len() {
                    return Err(ApiError::InvalidRequest(format!(
                        "{} images for {} prompts: an edit evaluation takes one input image per prompt",
                        images.len(),
                        req.prompts.len()
                    )));
                }
                let mut template = None;
                let mut inputs = Vec::with_capacity(images.len());
                for (i, b64) in images.iter().enumerate() {
                    let e = EditRequest {
                        image: String::new(),
                        prompt: req.prompts[i].clone(),
                        mode: req.mode.clone(),
                        image_guidance_scale: req.image_guidance_scale,
                        strength: req.strength,
                        negative_prompt: req.negative_prompt.clone(),
                        model: req.model.clone(),
                        adapter: adapter.clone(),
                        adapter_scale: adapter.as_ref().and(req.adapter_scale),
                        width: req.width,
                        height: req.height,
                        steps: req.steps,
                        guidance_scale: req.guidance_scale,
                        scheduler: req.scheduler.clone(),
                        seed: Some(0),
                        num_images: Some(1),
                        output_format: None,
                        output_quality: None,
                    };
                    let bytes = super::images::decode_base64(b64)?;
                    let (task, _) = validate::edit(e, &bytes, &info, config)?;
                    let first: &GenerationTask = template.get_or_insert(task.clone());
                    if (task.width, task.height) != (first.width, first.height) {
                        return Err(ApiError::InvalidSize(format!(
                            "image {i} is {}x{} after rounding, image 0 {}x{}: give width and height, or inputs of one size",
                            task.width, task.height, first.width, first.height
                        )));
                    }
                    inputs.push(task.image.clone().ok_or_else(|| ApiError::Internal("an edit without its image".into()))?);
                }
                let template = template.ok_or_else(|| ApiError::InvalidRequest("no prompts".into()))?;
                Ok((template, Some(inputs)))
            }
        }
    };
    let (template, images) = side(&req.adapter_a)?;
    let a = template.adapter.clone();
    let b = side(&req.adapter_b)?.0.adapter;
    let tie_eps = req.tie_eps.unwrap_or(0.0);
    if !tie_eps.is_finite() || tie_eps < 0.0 {
        return Err(ApiError::InvalidRequest(format!("tie_eps is {tie_eps}; it must be >= 0")));
    }
    Ok((
        Plan {
            template: GenerationTask { adapter: None, warnings: Vec::new(), ..template },
            prompts: req.prompts.clone(),
            images,
            seeds: seeds as usize,
            a,
            b,
            tie_eps,
        },
        req.rewards.clone(),
    ))
}

/// The runner the evaluation manager calls: the plan re-derived from the stored request, the
/// reward models loaded once and kept, images from the model's worker.
pub fn runner(pool: Arc<ModelPool>, config: Arc<Config>) -> EvalRunner {
    let loaded: Arc<Mutex<HashMap<String, Arc<RewardModel>>>> = Arc::default();
    Arc::new(move |spec, progress| {
        let fail = |code: &str, message: String| JobErrorBody { code: code.into(), message };
        let req: EvaluateRequest = serde_json::from_value(spec.clone())
            .map_err(|e| fail("invalid_request", e.to_string()))?;
        let (plan, reward_names) = plan(&req, &pool, &config).map_err(|e| fail(e.code(), e.to_string()))?;
        let worker = pool
            .get(req.model.as_deref())
            .ok_or_else(|| fail("model_not_found", "the model is no longer served".into()))?;
        let mut models = Vec::new();
        for name in &reward_names {
            let model = {
                let mut cache = loaded.lock().unwrap_or_else(|p| p.into_inner());
                match cache.get(name) {
                    Some(m) => m.clone(),
                    None => {
                        let kind = RewardKind::parse(name)
                            .ok_or_else(|| fail("unknown_reward", name.clone()))?;
                        let source = config.rewards.source(name).unwrap_or_default();
                        let dir = crate::models::rewards::resolve_source(source)
                            .map_err(|e| fail("reward_unavailable", format!("{name}: {e}")))?;
                        let m = Arc::new(
                            RewardModel::load(kind, &dir, &candle_core::Device::Cpu)
                                .map_err(|e| fail("reward_unavailable", format!("{name}: {e}")))?,
                        );
                        cache.insert(name.clone(), m.clone());
                        m
                    }
                }
            };
            models.push((name.clone(), model));
        }
        let generate = |task: GenerationTask| -> Result<Vec<image::RgbImage>, String> {
            loop {
                let id = format!("evaluation-{}", uuid::Uuid::new_v4());
                match worker.submit(task.clone(), &id) {
                    Ok(rx) => {
                        return rx
                            .blocking_recv()
                            .map_err(|_| "the model worker dropped the request".to_string())?
                            .map(|out| out.images)
                            .map_err(|e| e.to_string())
                    }
                    // Requests come first: an evaluation waits for room in the queue.
                    Err(WorkerError::QueueFull { retry_after_s, .. }) => {
                        std::thread::sleep(std::time::Duration::from_secs(retry_after_s.max(1)))
                    }
                    Err(e) => return Err(e.to_string()),
                }
            }
        };
        let refs: Vec<(String, &RewardModel)> = models.iter().map(|(n, m)| (n.clone(), m.as_ref())).collect();
        run::run(&plan, &generate, &refs, progress).map_err(|e| fail("evaluation_error", e))
    })
}

/// The prompts of a prompt-set URL, fetched under the dataset limits (at most 64 MiB).
fn fetch_prompts(url: &str, config: &Config) -> Result<Vec<String>, ApiError> {
    let d = &config.datasets;
    let cfg = crate::jobs::fetch::FetchConfig {
        max_bytes: d.max_bytes.min(64 << 20),
        timeout: std::time::Duration::from_secs(d.timeout_s),
        allow_private_networks: d.allow_private_networks,
        file_roots: d.file_roots.clone(),
        ..Default::default()
    };
    let scratch = std::env::temp_dir().join(format!("dspo-prompts-{}", uuid::Uuid::new_v4()));
    let result = crate::jobs::fetch::fetch_file(url, &scratch, &cfg, cfg.max_bytes)
        .map_err(|e| ApiError::InvalidRequest(format!("prompts_url: {e}")))
        .and_then(|path| {
            crate::evaluation::prompts::read_prompts(&path)
                .map_err(|e| ApiError::InvalidRequest(format!("prompts_url {url}: {e}")))
        });
    let _ = std::fs::remove_file(&scratch);
    result
}

/// Checks a fine-tuning job's `evaluation` block when the job is submitted (its adapter does
/// not exist yet, so only what does not depend on it).
pub fn check_job_evaluation(e: &super::job_types::JobEvaluation, config: &Config) -> Result<(), ApiError> {
    let limits = &config.rewards;
    if e.prompts.is_empty() || e.prompts.len() > limits.max_prompts {
        return Err(ApiError::InvalidJob(format!(
            "evaluation: {} prompts; 1 to {} (rewards.max_prompts)",
            e.prompts.len(),
            limits.max_prompts
        )));
    }
    if let Some(s) = e.seeds.filter(|s| *s < 1 || *s as usize > limits.max_seeds) {
        return Err(ApiError::InvalidJob(format!(
            "evaluation: seeds is {s}; 1 to {} (rewards.max_seeds)",
            limits.max_seeds
        )));
    }
    if e.rewards.is_empty() {
        return Err(ApiError::UnknownReward("evaluation: rewards is empty".into()));
    }
    for r in &e.rewards {
        if limits.source(r).is_none() {
            return Err(ApiError::UnknownReward(format!(
                "evaluation: reward '{r}' is not available on this server; available: {}",
                limits.available().join(", ")
            )));
        }
    }
    Ok(())
}

/// Submits the evaluations of fine-tuning jobs as they complete: a thread following the job
/// events. (An evaluation whose job completed while the server was down is not submitted.)
pub fn follow_jobs(
    jobs: Arc<crate::jobs::JobManager>,
    evaluations: Arc<EvaluationManager>,
    pool: Arc<ModelPool>,
    config: Arc<Config>,
) {
    let mut rx = jobs.subscribe();
    let spawned = std::thread::Builder::new()
        .name("job-evaluations".into())
        .spawn(move || loop {
            let ev = match rx.blocking_recv() {
                Ok(ev) => ev,
                Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                    tracing::warn!(missed = n, "job events lagged; some job evaluations may not be submitted");
                    continue;
                }
                Err(_) => return,
            };
            if ev.event != "status" || ev.data["status"] != "completed" {
                continue;
            }
            let Some(block) = ev.data["spec"].get("evaluation").filter(|e| !e.is_null()) else {
                continue;
            };
            if let Err(e) = submit_job_evaluation(&ev.job_id, &ev.data, block, &jobs, &evaluations, &pool, &config) {
                tracing::warn!(job = %ev.job_id, "the job's evaluation was not submitted: {e}");
            }
        });
    if let Err(e) = spawned {
        tracing::error!("cannot follow job completions for their evaluations: {e}");
    }
}

fn submit_job_evaluation(
    job_id: &str,
    job: &serde_json::Value,
    block: &serde_json::Value,
    jobs: &crate::jobs::JobManager,
    evaluations: &EvaluationManager,
    pool: &ModelPool,
    config: &Config,
) -> Result<(), String> {
    let e: super::job_types::JobEvaluation =
        serde_json::from_value(block.clone()).map_err(|e| e.to_string())?;
    let req = EvaluateRequest {
        model: job["spec"]["base_model"].as_str().map(String::from),
        adapter_a: job["adapter"].as_str().map(String::from),
        adapter_b: None,
        adapter_scale: None,
        prompts: e.prompts,
        prompts_url: None,
        images: None,
        mode: None,
        strength: None,
        image_guidance_scale: None,
        rewards: e.rewards,
        seeds: e.seeds,
        negative_prompt: None,
        steps: e.steps,
        guidance_scale: e.guidance_scale,
        scheduler: None,
        width: None,
        height: None,
        tie_eps: None,
    };
    let (p, _) = plan(&req, pool, config).map_err(|e| e.to_string())?;
    let owner = jobs.owner(job_id).map_err(|e| e.to_string())?;
    let spec = serde_json::to_value(&req).map_err(|e| e.to_string())?;
    let rec = evaluations.submit(spec, p.total_images(), owner.as_deref(), Some(job_id))?;
    tracing::info!(job = %job_id, evaluation = %rec.id, "job evaluation submitted");
    Ok(())
}

/// What GET /finetune/{id} shows of a job's evaluation.
pub fn job_evaluation_status(
    state: &AppState,
    job_id: &str,
) -> Result<Option<super::job_types::JobEvaluationStatus>, ApiError> {
    let Some(m) = state.evaluations.as_ref() else {
        return Ok(None);
    };
    let Some(rec) = m.of_job(job_id).map_err(ApiError::Internal)? else {
        return Ok(None);
    };
    let r = record_of(rec)?;
    Ok(Some(super::job_types::JobEvaluationStatus {
        evaluation_id: r.id,
        status: r.status,
        done: r.done,
        total: r.total,
        result: r.result,
    }))
}

fn manager(state: &AppState) -> Result<&Arc<EvaluationManager>, ApiError> {
    state
        .evaluations
        .as_ref()
        .ok_or_else(|| ApiError::Internal("evaluations need jobs.enabled".into()))
}

fn check_owner(m: &EvaluationManager, caller: &Caller, id: &str) -> Result<(), ApiError> {
    match m.owner(id).map_err(ApiError::Internal)? {
        Some(owner) if caller.owns(owner.as_deref()) => Ok(()),
        _ => Err(ApiError::EvaluationNotFound(format!("no evaluation {id}"))),
    }
}

/// Start an evaluation.
#[utoipa::path(post, path = "/evaluate", operation_id = "create_evaluation", tag = "evaluate",
    request_body = EvaluateRequest,
    responses(
        (status = 202, description = "Queued", body = EvaluationCreated),
        (status = 400, description = "Malformed JSON", body = ErrorResponse),
        (status = 404, description = "Unknown model or adapter", body = ErrorResponse),
        (status = 422, description = "Invalid request, or a reward the server does not offer (unknown_reward)", body = ErrorResponse),
        (status = 503, description = "Model still loading", body = ErrorResponse),
    ))]
pub async fn create(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    body: Result<Json<serde_json::Value>, JsonRejection>,
) -> Result<Response, ApiError> {
    let Json(raw) = body?;
    let mut req: EvaluateRequest =
        serde_json::from_value(raw).map_err(|e| ApiError::InvalidRequest(e.to_string()))?;
    let m = manager(&state)?.clone();
    let (pool, config) = (state.pool.clone(), state.config.clone());
    let rec = tokio::task::spawn_blocking(move || -> Result<EvalRecord, ApiError> {
        if let Some(url) = &req.prompts_url {
            if !req.prompts.is_empty() {
                return Err(ApiError::InvalidRequest("give prompts or prompts_url, not both".into()));
            }
            req.prompts = fetch_prompts(url, &config)?;
        }
        let spec = serde_json::to_value(&req).map_err(|e| ApiError::Internal(e.to_string()))?;
        let (p, _) = plan(&req, &pool, &config)?;
        m.submit(spec, p.total_images(), caller.key_id.as_deref(), None)
            .map_err(ApiError::Internal)
    })
    .await
    .map_err(|e| ApiError::Internal(e.to_string()))??;
    let status_url = format!("/evaluate/{}", rec.id);
    let body = EvaluationCreated {
        evaluation_id: rec.id.clone(),
        status_url: status_url.clone(),
        evaluation: record_of(rec)?,
    };
    Ok((StatusCode::ACCEPTED, [(header::LOCATION, status_url)], Json(body)).into_response())
}

/// The caller's evaluations, oldest first.
#[utoipa::path(get, path = "/evaluate", operation_id = "list_evaluations", tag = "evaluate",
    responses((status = 200, body = Vec<EvaluationRecord>)))]
pub async fn list(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
) -> Result<Json<Vec<EvaluationRecord>>, ApiError> {
    let records = manager(&state)?
        .list(caller.key_id.as_deref())
        .map_err(ApiError::Internal)?;
    Ok(Json(records.into_iter().map(record_of).collect::<Result<_, _>>()?))
}

/// An evaluation: status, progress, and per reward its result once completed.
#[utoipa::path(get, path = "/evaluate/{id}", operation_id = "get_evaluation", tag = "evaluate",
    params(("id" = String, Path, description = "evaluation id")),
    responses((status = 200, body = EvaluationRecord), (status = 404, body = ErrorResponse)))]
pub async fn get(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Result<Json<EvaluationRecord>, ApiError> {
    owned(&state, &caller, &id, EvaluationManager::get)
}

/// `op` on the caller's evaluation `id`, as its API record; 404 for another key's.
fn owned(
    state: &AppState,
    caller: &Caller,
    id: &str,
    op: impl FnOnce(&EvaluationManager, &str) -> Result<Option<EvalRecord>, String>,
) -> Result<Json<EvaluationRecord>, ApiError> {
    let m = manager(state)?;
    check_owner(m, caller, id)?;
    let rec = op(m, id)
        .map_err(ApiError::Internal)?
        .ok_or_else(|| ApiError::EvaluationNotFound(format!("no evaluation {id}")))?;
    Ok(Json(record_of(rec)?))
}

/// Cancel an evaluation (a running one stops after its current prompt).
#[utoipa::path(delete, path = "/evaluate/{id}", operation_id = "cancel_evaluation", tag = "evaluate",
    params(("id" = String, Path, description = "evaluation id")),
    responses((status = 200, body = EvaluationRecord), (status = 404, body = ErrorResponse)))]
pub async fn cancel(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Result<Json<EvaluationRecord>, ApiError> {
    owned(&state, &caller, &id, EvaluationManager::cancel)
}

/// Per image: the prompt, the seed and both sides' scores under every reward.
#[utoipa::path(get, path = "/evaluate/{id}/rows", operation_id = "get_evaluation_rows", tag = "evaluate",
    params(("id" = String, Path, description = "evaluation id")),
    responses(
        (status = 200, body = Vec<EvaluationRow>),
        (status = 404, body = ErrorResponse),
        (status = 409, description = "Not completed (evaluation_not_finished)", body = ErrorResponse),
    ))]
pub async fn rows(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Result<Json<Vec<EvaluationRow>>, ApiError> {
    let m = manager(&state)?;
    check_owner(m, &caller, &id)?;
    let rows = m.rows(&id).map_err(ApiError::Internal)?.ok_or_else(|| {
        ApiError::EvaluationNotFinished(format!("evaluation {id} has not completed"))
    })?;
    Ok(Json(
        rows.into_iter()
            .map(|r| EvaluationRow {
                prompt_index: r.prompt_index,
                prompt: r.prompt,
                seed: r.seed,
                scores: r.scores.into_iter().map(|(k, v)| (k, v.to_vec())).collect(),
            })
            .collect(),
    ))
}

/// The rewards this server offers.
#[utoipa::path(get, path = "/evaluate/rewards", operation_id = "list_rewards", tag = "evaluate",
    responses((status = 200, body = RewardsAvailable)))]
pub async fn rewards(State(state): State<AppState>) -> Json<RewardsAvailable> {
    Json(RewardsAvailable {
        rewards: state.config.rewards.available().into_iter().map(String::from).collect(),
    })
}
