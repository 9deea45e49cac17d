//! Generations in flight: each admitted /generate, /edit or compatible-route request is
//! registered under its request id (the `x-request-id` header, which a client may choose), so
//! that another connection can read its progress or cancel it, and A1111 clients can poll
//! /sdapi/v1/progress and call /sdapi/v1/interrupt.

use super::auth::Caller;
use super::error::ApiError;
use super::AppState;
use crate::server::{progress, Progress, ProgressSender};
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::{Extension, Json};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;
use tokio::sync::{watch, Notify};
use utoipa::ToSchema;

struct Entry {
    owner: Option<String>,
    model: String,
    progress: watch::Receiver<Progress>,
    cancel: Arc<Notify>,
    arrived: Instant,
}

#[derive(Default)]
pub struct Registry {
    entries: Mutex<HashMap<String, Arc<Entry>>>,
}

/// A registered request. Dropping it (the request answered, failed or its client gone)
/// removes the entry.
pub struct Tracked {
    registry: Arc<Registry>,
    id: String,
    pub progress: Option<ProgressSender>,
    cancel: Arc<Notify>,
    receiver: watch::Receiver<Progress>,
}

impl Tracked {
    /// Resolves when someone cancels this request.
    pub async fn cancelled(&self) {
        self.cancel.notified().await
    }

    pub fn subscribe(&self) -> watch::Receiver<Progress> {
        self.receiver.clone()
    }

    pub fn id(&self) -> &str {
        &self.id
    }
}

impl Drop for Tracked {
    fn drop(&mut self) {
        self.registry.lock().remove(&self.id);
    }
}

impl Registry {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<Entry>>> {
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers request `id`. Request ids are client-chosen, so two live requests could
    /// claim one; the second is refused rather than made uncancellable.
    pub fn register(
        self: &Arc<Self>,
        id: &str,
        caller: &Caller,
        model: &str,
    ) -> Result<Tracked, ApiError> {
        let (tx, rx) = progress::channel();
        let cancel = Arc::new(Notify::new());
        let mut map = self.lock();
        if map.contains_key(id) {
            return Err(ApiError::RequestIdInUse(format!(
                "a generation with request id '{id}' is still running; use another x-request-id"
            )));
        }
        map.insert(
            id.to_string(),
            Arc::new(Entry {
                owner: caller.key_id.clone(),
                model: model.to_string(),
                progress: rx.clone(),
                cancel: cancel.clone(),
                arrived: Instant::now(),
            }),
        );
        Ok(Tracked {
            registry: self.clone(),
            id: id.to_string(),
            progress: Some(tx),
            cancel,
            receiver: rx,
        })
    }

    fn visible(&self, caller: &Caller, id: &str) -> Result<Arc<Entry>, ApiError> {
        self.lock()
            .get(id)
            .filter(|e| caller.owns(e.owner.as_deref()))
            .cloned()
            .ok_or_else(|| {
                ApiError::GenerationNotFound(format!(
                    "no generation with request id '{id}' is queued or running"
                ))
            })
    }

    /// The caller's generations in flight, oldest first.
    pub fn list(&self, caller: &Caller) -> Vec<GenerationStatus> {
        let map = self.lock();
        let mut out: Vec<(Instant, GenerationStatus)> = map
            .iter()
            .filter(|(_, e)| caller.owns(e.owner.as_deref()))
            .map(|(id, e)| (e.arrived, status(id, e)))
            .collect();
        out.sort_by_key(|(t, _)| *t);
        out.into_iter().map(|(_, s)| s).collect()
    }

    pub fn cancel(&self, caller: &Caller, id: &str) -> Result<GenerationStatus, ApiError> {
        let e = self.visible(caller, id)?;
        e.cancel.notify_one();
        Ok(status(id, &e))
    }

    /// Cancels every generation of the caller; returns how many.
    pub fn cancel_all(&self, caller: &Caller) -> usize {
        let map = self.lock();
        let mine: Vec<&Arc<Entry>> = map
            .values()
            .filter(|e| caller.owns(e.owner.as_deref()))
            .collect();
        for e in &mine {
            e.cancel.notify_one();
        }
        mine.len()
    }
}

/// Where a generation stands.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct GenerationStatus {
    /// The request id (`x-request-id`).
    pub id: String,
    pub model: String,
    /// queued, denoising or finished (encoding; the response follows).
    pub stage: String,
    /// Denoising steps done.
    pub step: u32,
    /// Denoising steps this request runs; 0 while queued.
    pub steps: u32,
    /// Share of the denoising done, 0 to 1.
    pub progress: f64,
    /// Seconds of denoising left, extrapolated from the steps so far; null before the first.
    pub eta_s: Option<f64>,
    /// Seconds since the request was admitted.
    pub elapsed_s: f64,
    /// Images in the batch it runs in; 0 while queued.
    pub batch_size: u32,
}

pub fn snapshot(id: &str, model: &str, p: &Progress, arrived: Instant) -> GenerationStatus {
    GenerationStatus {
        id: id.to_string(),
        model: model.to_string(),
        stage: p.stage.name().to_string(),
        step: p.step as u32,
        steps: p.steps as u32,
        progress: p.fraction(),
        eta_s: p.eta_s(),
        elapsed_s: arrived.elapsed().as_secs_f64(),
        batch_size: p.batch_size as u32,
    }
}

fn status(id: &str, e: &Entry) -> GenerationStatus {
    snapshot(id, &e.model, &e.progress.borrow(), e.arrived)
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct GenerationList {
    pub generations: Vec<GenerationStatus>,
}

/// The caller's generations that are queued or running.
#[utoipa::path(get, path = "/generations", operation_id = "list_generations", tag = "images",
    responses((status = 200, body = GenerationList)))]
pub async fn list(
    State(app): State<AppState>,
    Extension(caller): Extension<Caller>,
) -> Json<GenerationList> {
    Json(GenerationList {
        generations: app.generations.list(&caller),
    })
}

/// Progress of one generation, by its request id.
///
/// Send your own `x-request-id` with /generate or /edit to know it in advance. Finished
/// generations are gone (404): their response carries the result.
#[utoipa::path(get, path = "/generations/{id}", operation_id = "get_generation", tag = "images",
    params(("id" = String, Path, description = "The request id")),
    responses(
        (status = 200, body = GenerationStatus),
        (status = 404, description = "Not queued or running (generation_not_found)", body = super::error::ErrorResponse),
    ))]
pub async fn get(
    State(app): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Result<Json<GenerationStatus>, ApiError> {
    let e = app.generations.visible(&caller, &id)?;
    Ok(Json(status(&id, &e)))
}

/// Cancels a queued or running generation.
///
/// Its request is answered 409 generation_cancelled; a batch whose every request is cancelled
/// stops between denoising steps.
#[utoipa::path(post, path = "/generations/{id}/cancel", operation_id = "cancel_generation", tag = "images",
    params(("id" = String, Path, description = "The request id")),
    responses(
        (status = 202, description = "Cancelled; the status as it was", body = GenerationStatus),
        (status = 404, description = "Not queued or running (generation_not_found)", body = super::error::ErrorResponse),
    ))]
pub async fn cancel(
    State(app): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Result<(StatusCode, Json<GenerationStatus>), ApiError> {
    let s = app.generations.cancel(&caller, &id)?;
    Ok((StatusCode::ACCEPTED, Json(s)))
}
