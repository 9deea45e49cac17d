//! /finetune (asynchronous fine-tuning jobs) and /adapters (their results). Handlers only
//! translate HTTP to `JobManager` calls; the manager owns queueing, training and persistence.

use super::auth::Caller;
use super::error::ApiError;
use super::AppState;
use super::job_types::{AdapterInfo, JobRecord, JobSpec, JobStatus, StepMetrics};
use crate::jobs::JobError;
use axum::extract::rejection::JsonRejection;
use axum::extract::{Extension, Path, Query, State};
use axum::http::{header, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::{Deserialize, Serialize};
use std::convert::Infallible;
use std::sync::Arc;
use utoipa::{IntoParams, ToSchema};

impl From<JobError> for ApiError {
    fn from(e: JobError) -> Self {
        match e {
            JobError::Invalid(m) => ApiError::InvalidJob(m),
            JobError::NotFound(id) => ApiError::JobNotFound(format!("job {id} not found")),
            JobError::AdapterNotFound(n) => {
                ApiError::AdapterNotFound(format!("adapter {n} not found"))
            }
            JobError::AdapterExists(n) => {
                ApiError::AdapterExists(format!("adapter name {n} is taken"))
            }
            JobError::Dataset(m) => ApiError::InvalidJob(m),
            JobError::Store(m) => ApiError::Internal(m),
            JobError::Storage(m) => ApiError::StorageUnavailable(format!(
                "{m}; the server's data directory is full or read-only"
            )),
            JobError::TooManyJobs(m) => ApiError::RateLimited {
                message: m,
                retry_after_s: 60,
            },
        }
    }
}

fn jobs(state: &AppState) -> Result<&std::sync::Arc<crate::jobs::JobManager>, ApiError> {
    state
        .jobs
        .as_ref()
        .ok_or_else(|| ApiError::Internal("fine-tuning jobs are not enabled on this server".into()))
}

/// A job exists for this caller only if it owns it; another key's job is a 404, as if it did
/// not exist, so job ids cannot be probed.
fn check_job_owner(state: &AppState, caller: &Caller, id: &str) -> Result<(), ApiError> {
    let owner = jobs(state)?.owner(id)?;
    if caller.owns(owner.as_deref()) {
        Ok(())
    } else {
        Err(JobError::NotFound(id.to_string()).into())
    }
}

/// Only the key whose job made an adapter may download or delete it (403 for others).
fn check_adapter_owner(state: &AppState, caller: &Caller, name: &str) -> Result<(), ApiError> {
    let owner = match jobs(state)?.adapter_owner(name) {
        Ok(o) => o,
        // Not in the registry (e.g. copied into the data directory by hand): nobody's; the
        // handler answers for a name that does not exist at all.
        Err(JobError::AdapterNotFound(_)) => None,
        Err(e) => return Err(e.into()),
    };
    if caller.owns(owner.as_deref()) {
        Ok(())
    } else {
        Err(ApiError::Forbidden(format!(
            "adapter {name} was made by another API key's job"
        )))
    }
}

/// 202 body of POST /finetune.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct JobCreated {
    pub job_id: String,
    /// GET this URL for status and progress.
    pub status_url: String,
    pub job: JobRecord,
}

/// Start a fine-tuning job.
#[utoipa::path(
    post,
    path = "/finetune", operation_id = "create_job",
    tag = "finetune",
    request_body = JobSpec,
    responses(
        (status = 202, description = "Queued", body = JobCreated),
        (status = 400, description = "Malformed JSON", body = super::error::ErrorResponse),
        (status = 409, description = "Adapter name taken", body = super::error::ErrorResponse),
        (status = 422, description = "Invalid job (method, beta, rank, hyperparameters, dataset_url, base_model)", body = super::error::ErrorResponse),
    )
)]
pub async fn create(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    body: Result<Json<JobSpec>, JsonRejection>,
) -> Result<Response, ApiError> {
    let Json(spec) = body.map_err(ApiError::from)?;
    if let Some(e) = &spec.evaluation {
        if state.evaluations.is_none() {
            return Err(ApiError::InvalidJob("evaluation: this server runs no evaluations".into()));
        }
        super::evaluate::check_job_evaluation(e, &state.config)?;
    }
    let m = jobs(&state)?.clone();
    let job: JobRecord =
        tokio::task::spawn_blocking(move || {
            let method = m.default_method(spec.base_model.as_deref());
            m.submit_as(spec.into_job_spec(method), caller.key_id.as_deref())
        })
            .await
            .map_err(|e| ApiError::Internal(e.to_string()))??
            .into();
    let status_url = format!("/finetune/{}", job.id);
    let body = JobCreated {
        job_id: job.id.clone(),
        status_url: status_url.clone(),
        job,
    };
    Ok((
        StatusCode::ACCEPTED,
        [(header::LOCATION, status_url)],
        Json(body),
    )
        .into_response())
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ListQuery {
    /// Only jobs in this state.
    pub status: Option<JobStatus>,
}

/// List jobs (oldest first), optionally by status.
#[utoipa::path(get, path = "/finetune", operation_id = "list_jobs", tag = "finetune", params(ListQuery), responses((status = 200, body = Vec<JobRecord>)))]
pub async fn list(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    q: Result<Query<ListQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Vec<JobRecord>>, ApiError> {
    // A bad query string gets the JSON error envelope like every other bad input.
    let Query(q) = q.map_err(|e| ApiError::InvalidRequest(e.body_text()))?;
    let records = jobs(&state)?.list_visible(q.status.map(Into::into), caller.key_id.as_deref())?;
    Ok(Json(records.into_iter().map(Into::into).collect()))
}

/// A job: status, progress {step, total_steps, loss, implicit_accuracy, eta_seconds}, error, adapter.
#[utoipa::path(
    get,
    path = "/finetune/{id}",
    tag = "finetune",
    params(("id" = String, Path, description = "job id")),
    responses((status = 200, body = JobRecord), (status = 404, body = super::error::ErrorResponse))
)]
pub async fn get_job(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Result<Json<JobRecord>, ApiError> {
    check_job_owner(&state, &caller, &id)?;
    let mut job: JobRecord = jobs(&state)?.get(&id)?.into();
    job.evaluation = super::evaluate::job_evaluation_status(&state, &id)?;
    Ok(Json(job))
}

/// Cancel this job (and no other). A queued job ends at once, a running one at its next step;
/// a job that has already ended is a 409 (job_finished).
#[utoipa::path(
    delete,
    path = "/finetune/{id}", operation_id = "cancel_job",
    tag = "finetune",
    params(("id" = String, Path, description = "job id")),
    responses(
        (status = 200, body = JobRecord),
        (status = 404, body = super::error::ErrorResponse),
        (status = 409, description = "The job had already ended", body = super::error::ErrorResponse)
    )
)]
pub async fn cancel(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Result<Json<JobRecord>, ApiError> {
    check_job_owner(&state, &caller, &id)?;
    let m = jobs(&state)?;
    let job = m.get(&id)?;
    if job.status.is_terminal() {
        return Err(ApiError::JobFinished(format!(
            "job {id} already ended ({}); there is nothing to cancel",
            job.status.as_str()
        )));
    }
    Ok(Json(m.cancel(&id)?.into()))
}

/// The metrics history: one entry per optimiser step.
#[utoipa::path(
    get,
    path = "/finetune/{id}/metrics", operation_id = "get_job_metrics",
    tag = "finetune",
    params(("id" = String, Path, description = "job id")),
    responses((status = 200, body = Vec<StepMetrics>), (status = 404, body = super::error::ErrorResponse))
)]
pub async fn metrics(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Result<Json<Vec<StepMetrics>>, ApiError> {
    check_job_owner(&state, &caller, &id)?;
    Ok(Json(jobs(&state)?.metrics(&id)?.into_iter().map(Into::into).collect()))
}

/// Server-Sent Events: `status` (the job object) on every state change, `progress` at most
/// every 500 ms; the stream ends after the job's final status. With a shared job database, a
/// job another replica runs is followed through the store, once a second.
#[utoipa::path(
    get,
    path = "/finetune/{id}/events", operation_id = "stream_job_events",
    tag = "finetune",
    params(("id" = String, Path, description = "job id")),
    responses((status = 200, description = "Server-sent events: `status` (a JobRecord), `progress` and `metrics` (StepMetrics); the stream ends after the final status", body = String, content_type = "text/event-stream"), (status = 404, body = super::error::ErrorResponse))
)]
pub async fn events(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    check_job_owner(&state, &caller, &id)?;
    let m = jobs(&state)?.clone();
    // Subscribe before reading the current state, so no transition falls in between.
    let rx = m.subscribe();
    let current = m.get(&id)?;
    let first = Event::default()
        .event("status")
        .json_data(&current)
        .map_err(|e| ApiError::Internal(e.to_string()))?;
    let done = current.status.is_terminal();
    let follow = Follow {
        manager: m.clone(),
        id,
        status: current.status,
        step: current.progress.as_ref().map(|p| p.step),
    };
    let stream = futures_util::stream::unfold(
        (Some(first), rx, done, follow),
        |(first, mut rx, done, mut follow)| async move {
            if let Some(ev) = first {
                return Some((Ok::<Event, Infallible>(ev), (None, rx, done, follow)));
            }
            if done {
                return None;
            }
            let shared = follow.manager.shared();
            loop {
                tokio::select! {
                    got = rx.recv() => match got {
                        Ok(ev) if ev.job_id == follow.id => {
                            let status = (ev.event == "status")
                                .then(|| ev.data.get("status").and_then(|s| s.as_str()))
                                .flatten()
                                .and_then(crate::jobs::JobStatus::parse);
                            if let Some(s) = status {
                                follow.status = s;
                            }
                            let terminal = status.is_some_and(|s| s.is_terminal());
                            let out = Event::default().event(ev.event).data(ev.data.to_string());
                            return Some((Ok(out), (None, rx, terminal, follow)));
                        }
                        Ok(_) => continue,
                        Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
                        Err(_) => return None,
                    },
                    _ = tokio::time::sleep(std::time::Duration::from_secs(1)), if shared => {
                        if let Some((out, terminal)) = follow.poll().await {
                            return Some((Ok(out), (None, rx, terminal, follow)));
                        }
                    }
                }
            }
        },
    );
    Ok(Sse::new(stream)
        .keep_alive(KeepAlive::default())
        .into_response())
}

/// What an event stream last told its client about a job, to follow one another replica runs.
struct Follow {
    manager: Arc<crate::jobs::JobManager>,
    id: String,
    status: crate::jobs::JobStatus,
    step: Option<usize>,
}

impl Follow {
    /// The job's record from the store: a `status` event if its status moved, else a
    /// `progress` event if its step did; nothing for a job this replica runs (its own events
    /// carry it). Returns the event and whether the job has ended.
    async fn poll(&mut self) -> Option<(Event, bool)> {
        let (m, id) = (self.manager.clone(), self.id.clone());
        let job = tokio::task::spawn_blocking(move || m.get(&id)).await.ok()?.ok()?;
        if job.replica.as_deref() == Some(self.manager.replica()) {
            return None;
        }
        if job.status != self.status {
            self.status = job.status;
            let terminal = job.status.is_terminal();
            let record = JobRecord::from(job);
            return Some((Event::default().event("status").json_data(&record).ok()?, terminal));
        }
        let progress = job.progress?;
        if Some(progress.step) == self.step {
            return None;
        }
        self.step = Some(progress.step);
        let progress = super::job_types::Progress::from(progress);
        Some((Event::default().event("progress").json_data(&progress).ok()?, false))
    }
}

/// Registered adapters (name, base model, method, hyperparameters, final metrics, created).
#[utoipa::path(get, path = "/adapters", operation_id = "list_adapters", tag = "finetune", responses((status = 200, body = Vec<AdapterInfo>)))]
pub async fn adapters(State(state): State<AppState>) -> Result<Json<Vec<AdapterInfo>>, ApiError> {
    Ok(Json(jobs(&state)?.adapters()?.into_iter().map(Into::into).collect()))
}

/// The adapter's safetensors file (diffusers LoRA format: `pipe.load_lora_weights` reads it).
#[utoipa::path(
    get,
    path = "/adapters/{name}/weights", operation_id = "download_adapter",
    tag = "finetune",
    params(("name" = String, Path, description = "adapter name")),
    responses((status = 200, description = "safetensors file", content_type = "application/octet-stream", body = super::types::BinaryFile), (status = 404, body = super::error::ErrorResponse))
)]
pub async fn adapter_weights(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    check_adapter_owner(&state, &caller, &name)?;
    let path = jobs(&state)?.adapter_file(&name)?;
    let bytes = tokio::task::spawn_blocking(move || std::fs::read(&path))
        .await
        .map_err(|e| ApiError::Internal(e.to_string()))?
        .map_err(|e| ApiError::Internal(e.to_string()))?;
    Ok((
        [
            (header::CONTENT_TYPE, "application/octet-stream".to_string()),
            (
                header::CONTENT_DISPOSITION,
                format!("attachment; filename=\"{name}.safetensors\""),
            ),
        ],
        bytes,
    )
        .into_response())
}

/// `POST /adapters` as multipart/form-data (schema only).
#[derive(ToSchema)]
#[allow(dead_code)]
pub struct AdapterUpload {
    /// 1-64 letters, digits, '-', '_' and '.'; not taken by another adapter or a running job.
    pub name: String,
    /// The served model the adapter is for (default: the default model); the file must fit it.
    pub model: Option<String>,
    /// A LoRA safetensors file: diffusers / PEFT (`load_lora_weights`' format) or kohya /
    /// AUTOMATIC1111 (`lora_unet_*`, `lora_te_*`, alpha tensors).
    #[schema(value_type = String, format = Binary)]
    pub file: Vec<u8>,
}

/// Upload a LoRA adapter.
///
/// The file is checked against the model before it is stored: every module must name one of
/// the model's layers with that layer's shape. It is then listed and served like a trained
/// adapter, and only the uploading key may download or delete it. Uploads are bounded by
/// limits.max_body_bytes.
#[utoipa::path(
    post,
    path = "/adapters", operation_id = "upload_adapter",
    tag = "finetune",
    request_body(content = AdapterUpload, content_type = "multipart/form-data"),
    responses(
        (status = 201, description = "Stored", body = AdapterInfo),
        (status = 400, description = "Malformed multipart body", body = super::error::ErrorResponse),
        (status = 404, description = "Unknown model", body = super::error::ErrorResponse),
        (status = 409, description = "The name is taken (adapter_exists)", body = super::error::ErrorResponse),
        (status = 413, description = "Over limits.max_body_bytes", body = super::error::ErrorResponse),
        (status = 422, description = "Not a LoRA file, or it does not fit the model (invalid_adapter); bad name (invalid_job)", body = super::error::ErrorResponse),
        (status = 503, description = "Model still loading, or storage unavailable", body = super::error::ErrorResponse),
    )
)]
pub async fn upload_adapter(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    form: Result<axum::extract::Multipart, axum::extract::multipart::MultipartRejection>,
) -> Result<Response, ApiError> {
    let mut form = form.map_err(|e| ApiError::MalformedMultipart(e.body_text()))?;
    let (mut name, mut model, mut file) = (None, None, None);
    let malformed = |e: axum::extract::multipart::MultipartError| {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::PayloadTooLarge(e.body_text())
        } else {
            ApiError::MalformedMultipart(e.body_text())
        }
    };
    while let Some(field) = form.next_field().await.map_err(malformed)? {
        match field.name().unwrap_or_default() {
            "file" => file = Some(field.bytes().await.map_err(malformed)?.to_vec()),
            "name" => name = Some(field.text().await.map_err(malformed)?),
            "model" => model = Some(field.text().await.map_err(malformed)?),
            other => {
                return Err(ApiError::InvalidRequest(format!(
                    "unknown field `{other}`; POST /adapters takes name, model and file"
                )))
            }
        }
    }
    let name = name.ok_or_else(|| ApiError::InvalidRequest("missing field `name`".into()))?;
    let file = file.ok_or_else(|| ApiError::InvalidRequest("missing field `file` (a file part)".into()))?;
    let worker = super::handlers::find_model(&state, model.as_deref().filter(|m| !m.is_empty()))?;
    let info = worker.info()?;
    let m = jobs(&state)?.clone();
    let record = tokio::task::spawn_blocking(move || -> Result<_, ApiError> {
        crate::models::lora::LoraAdapter::from_bytes(&file, &candle_core::Device::Cpu)
            .and_then(|a| a.check_fits(&info.lora_layout))
            .map_err(|e| ApiError::InvalidAdapter(format!("{e} (model '{}')", info.name)))?;
        Ok(m.upload_adapter(&name, &info.name, &file, caller.key_id.as_deref())?)
    })
    .await
    .map_err(|e| ApiError::Internal(e.to_string()))??;
    Ok((StatusCode::CREATED, Json(AdapterInfo::from(record))).into_response())
}

/// Delete an adapter (its file and registry entry).
#[utoipa::path(
    delete,
    path = "/adapters/{name}",
    tag = "finetune",
    params(("name" = String, Path, description = "adapter name")),
    responses((status = 204, description = "Deleted"), (status = 404, body = super::error::ErrorResponse))
)]
pub async fn delete_adapter(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiError> {
    check_adapter_owner(&state, &caller, &name)?;
    let m = jobs(&state)?.clone();
    tokio::task::spawn_blocking(move || m.delete_adapter(&name))
        .await
        .map_err(|e| ApiError::Internal(e.to_string()))??;
    Ok(StatusCode::NO_CONTENT)
}
