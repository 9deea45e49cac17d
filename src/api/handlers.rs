//! Endpoint handlers: parse, validate, hand the task to the model's worker, await the answer,
//! encode. They never touch a model.

use super::auth::Caller;
use super::error::{ApiError, ErrorResponse};
use super::generations::{self, Tracked};
use super::images;
use super::types::*;
use super::validate;
use super::AppState;
use crate::schedulers::SchedulerKind;
use crate::server::{GenerationTask, LoadStatus, Mode, ModelWorker};
use axum::extract::rejection::JsonRejection;
use axum::extract::{FromRequest, FromRequestParts, Multipart, Request, State};
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use base64::Engine;
use std::sync::Arc;
use std::time::Instant;

pub const REQUEST_ID_HEADER: &str = "x-request-id";

/// A body whose declared `Content-Length` is over the limit is refused from the headers, before
/// any of it is read (and without a `100 Continue`): the client learns at once, and no
/// connection sits waiting for gigabytes that would be refused anyway.
pub async fn refuse_declared_oversize(
    axum::extract::State(limit): axum::extract::State<usize>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    let declared = req
        .headers()
        .get(axum::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    match declared {
        Some(n) if n > limit as u64 => ApiError::PayloadTooLarge(format!(
            "the body is {n} bytes; the limit is {limit} (limits.max_body_bytes)"
        ))
        .into_response(),
        _ => next.run(req).await,
    }
}

/// Which `Host` values a server accepts (see `server.allowed_hosts`).
#[derive(Clone, Debug)]
pub struct HostRule {
    /// Only loopback-bound servers check.
    pub enforce: bool,
    pub allowed: Vec<String>,
}

/// The host part of a `Host` header value, lower-cased, without port or IPv6 brackets.
fn host_name(value: &str) -> String {
    let v = value.trim().to_ascii_lowercase();
    if let Some(rest) = v.strip_prefix('[') {
        return rest.split(']').next().unwrap_or_default().to_string();
    }
    match v.rsplit_once(':') {
        Some((h, port)) if port.chars().all(|c| c.is_ascii_digit()) => h.to_string(),
        _ => v,
    }
}

/// Refuses (403 host_not_allowed) a request to a loopback-bound server whose `Host` is neither a
/// loopback name nor allowed: how a browser page on another domain would reach it after
/// re-pointing its domain at 127.0.0.1.
pub async fn check_host(
    axum::extract::State(rule): axum::extract::State<std::sync::Arc<HostRule>>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    if rule.enforce {
        if let Some(host) = req.headers().get(axum::http::header::HOST).and_then(|v| v.to_str().ok()) {
            let name = host_name(host);
            let loopback = name == "localhost"
                || name.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback());
            if !loopback && !rule.allowed.iter().any(|a| a.eq_ignore_ascii_case(&name)) {
                return ApiError::HostNotAllowed(format!(
                    "Host '{name}' is not a loopback name; a server on a loopback address \
                     answers only to those and to server.allowed_hosts"
                ))
                .into_response();
            }
        }
    }
    next.run(req).await
}

/// A client's request id is kept (and logged, and echoed) only when it is 1-128 characters of
/// letters, digits and `-_.:`; anything else (spaces and quotes forge log fields, an 8 KB id
/// floods the log) is replaced by a fresh UUID as if none had been sent.
pub async fn drop_unsafe_request_id(mut req: axum::extract::Request) -> axum::extract::Request {
    let ok = req.headers().get(REQUEST_ID_HEADER).is_none_or(|v| {
        let b = v.as_bytes();
        !b.is_empty()
            && b.len() <= 128
            && b.iter().all(|c| c.is_ascii_alphanumeric() || b"-_.:".contains(c))
    });
    if !ok {
        req.headers_mut().remove(REQUEST_ID_HEADER);
    }
    req
}

/// The request id the request-id layer put in the headers (a fresh one if it is missing).
pub struct RequestId(pub String);

impl<S: Send + Sync> FromRequestParts<S> for RequestId {
    type Rejection = std::convert::Infallible;
    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        let id = parts
            .headers
            .get(REQUEST_ID_HEADER)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
            .unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
        Ok(RequestId(id))
    }
}

pub(crate) fn find_model<'a>(app: &'a AppState, name: Option<&str>) -> Result<&'a Arc<ModelWorker>, ApiError> {
    app.pool.get(name).ok_or_else(|| {
        let known: Vec<&str> = app.pool.models().iter().map(|w| w.name()).collect();
        ApiError::ModelNotFound(format!(
            "no model named '{}'; served: {}",
            name.unwrap_or_default(),
            known.join(", ")
        ))
    })
}

/// What a /generate or /edit response body is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum BodyKind {
    Json,
    /// The image file itself (one image), in the request's output format.
    File,
    /// Server-sent events: progress while it runs, then the JSON result.
    Events,
}

/// Content negotiation for the response body: the image file itself when the client prefers
/// an image type over JSON and asked for one image (the type picks `output_format` when the
/// body names none); a stream of progress events for `text/event-stream`. A client that
/// accepts only files but asked for several images, or only a type other than the format it
/// asked for, gets 406 before any compute is spent.
pub(crate) fn negotiate(
    headers: &HeaderMap,
    num_images: usize,
    output_format: &mut Option<String>,
) -> Result<BodyKind, ApiError> {
    let Some(accept) = headers.get(header::ACCEPT).and_then(|v| v.to_str().ok()) else {
        return Ok(BodyKind::Json);
    };
    let requested = output_format
        .as_deref()
        .and_then(|f| images::OutputFormat::parse(f, 0))
        .map(|f| f.name());
    // (kind, image format, q) in the header's order; the first of equal q wins.
    let mut best: Option<(BodyKind, Option<&'static str>, f64)> = None;
    let mut json_q = 0.0f64;
    for part in accept.split(',') {
        let mut it = part.split(';');
        let media = it.next().unwrap_or("").trim().to_ascii_lowercase();
        let q = it
            .filter_map(|p| {
                p.trim()
                    .strip_prefix("q=")
                    .and_then(|q| q.trim().parse::<f64>().ok())
            })
            .next()
            .unwrap_or(1.0);
        let candidate = match media.as_str() {
            "application/json" | "application/*" | "*/*" => {
                json_q = json_q.max(q);
                (BodyKind::Json, None)
            }
            "text/event-stream" => (BodyKind::Events, None),
            "image/*" => (BodyKind::File, Some(requested.unwrap_or("png"))),
            "image/png" => (BodyKind::File, Some("png")),
            "image/jpeg" => (BodyKind::File, Some("jpeg")),
            "image/webp" => (BodyKind::File, Some("webp")),
            _ => continue,
        };
        if q > 0.0 && best.is_none_or(|(_, _, b)| q > b) {
            best = Some((candidate.0, candidate.1, q));
        }
    }
    let Some((kind, format, _)) = best else {
        return Err(ApiError::NotAcceptable(format!(
            "Accept: {accept}; this route answers application/json, text/event-stream, or one image/png, image/jpeg or image/webp"
        )));
    };
    if kind != BodyKind::File {
        return Ok(kind);
    }
    let format = format.unwrap_or("png");
    if num_images != 1 || requested.is_some_and(|r| r != format) {
        if json_q > 0.0 {
            return Ok(BodyKind::Json);
        }
        return Err(ApiError::NotAcceptable(if num_images != 1 {
            format!("Accept: {accept} returns one image file, but num_images is {num_images}; accept application/json for several images")
        } else {
            format!("Accept: {accept} does not take output_format {}; accept application/json or image/{}", requested.unwrap_or(""), requested.unwrap_or(""))
        }));
    }
    output_format.get_or_insert_with(|| format.to_string());
    Ok(BodyKind::File)
}

/// A text-to-image request validated into a task for its model's worker (every route that
/// generates, native or compatible, comes through here).
pub(crate) fn generate_task<'a>(
    app: &'a AppState,
    req: GenerateRequest,
) -> Result<(&'a Arc<ModelWorker>, GenerationTask, Parameters), ApiError> {
    let worker = find_model(app, req.model.as_deref())?;
    let info = worker.info()?;
    let (task, params) = validate::generate(req, &info, &app.config)?;
    Ok((worker, task, params))
}

/// An edit request and its image file validated into a task for its model's worker. Decoding
/// and resizing are CPU work proportional to the upload, so they run off the async threads.
pub(crate) async fn edit_task<'a>(
    app: &'a AppState,
    req: EditRequest,
    image: Vec<u8>,
) -> Result<(&'a Arc<ModelWorker>, GenerationTask, Parameters), ApiError> {
    let worker = find_model(app, req.model.as_deref())?;
    let info = worker.info()?;
    let config = app.config.clone();
    let (task, params) =
        tokio::task::spawn_blocking(move || validate::edit(req, &image, &info, &config))
            .await
            .map_err(|e| ApiError::Internal(format!("validation panicked: {e}")))??;
    Ok((worker, task, params))
}

/// A finished task: its image files (with their seeds) and what the response reports about it.
pub(crate) struct Computed {
    pub files: Vec<Vec<u8>>,
    pub format: images::OutputFormat,
    pub seeds: Vec<u64>,
    pub timings: Timings,
    pub warnings: Vec<String>,
}

/// Registers a request among the generations in flight, where its progress can be read and
/// it can be cancelled (see `generations`).
pub(crate) fn track(
    app: &AppState,
    caller: &Caller,
    id: &str,
    worker: &ModelWorker,
) -> Result<Tracked, ApiError> {
    app.generations.register(id, caller, worker.name())
}

/// Submits a validated task and awaits its images. If the client disconnects, this future is
/// dropped with the reply receiver, which is how the worker learns to skip it; a cancel by id
/// drops the receiver the same way.
pub(crate) async fn compute(
    tracked: &mut Tracked,
    worker: &ModelWorker,
    task: GenerationTask,
    params: &Parameters,
    arrived: Instant,
) -> Result<Computed, ApiError> {
    let sampler = task.scheduler.a1111_name();
    let seeds = task.seeds.clone();
    let format = images::OutputFormat::of(params);
    let sender = tracked.progress.take();
    let reply = worker.submit_tracked(task, tracked.id(), sender)?;
    let mut output = tokio::select! {
        r = reply => r.map_err(|_| ApiError::Internal("the worker dropped the request".into()))??,
        _ = tracked.cancelled() => return Err(ApiError::GenerationCancelled(format!(
            "generation '{}' was cancelled", tracked.id()
        ))),
    };
    let encode_start = Instant::now();
    let rgb = std::mem::take(&mut output.images);
    let p = params.clone();
    let s = seeds.clone();
    // Encoding is CPU work; off the async threads so it never stalls other connections.
    let files = tokio::task::spawn_blocking(move || -> Result<Vec<Vec<u8>>, String> {
        rgb.iter()
            .zip(&s)
            .map(|(img, &seed)| {
                images::encode(img, &images::a1111_parameters(&p, seed, sampler), format)
            })
            .collect()
    })
    .await
    .map_err(|e| ApiError::Internal(format!("image encoding panicked: {e}")))?
    .map_err(|e| ApiError::Internal(format!("image encoding failed: {e}")))?;
    let encode_ms = encode_start.elapsed().as_secs_f64() * 1e3;
    Ok(Computed {
        files,
        format,
        seeds,
        timings: Timings {
            queue_ms: output.queue_ms,
            inference_ms: output.compute_ms,
            encode_ms,
            total_ms: arrived.elapsed().as_secs_f64() * 1e3,
            batch_size: output.batch_size as u32,
        },
        warnings: output.warnings,
    })
}

fn json_body(id: String, params: Parameters, done: Computed) -> GenerateResponse {
    let b64 = base64::engine::general_purpose::STANDARD;
    let png = done.format == images::OutputFormat::Png;
    GenerateResponse {
        id,
        model: params.model.clone(),
        images: done
            .files
            .iter()
            .zip(&done.seeds)
            .map(|(bytes, &seed)| {
                let data = b64.encode(bytes);
                GeneratedImage {
                    seed,
                    mime_type: done.format.mime().to_string(),
                    png_base64: png.then(|| data.clone()),
                    image_base64: (!png).then_some(data),
                }
            })
            .collect(),
        parameters: params,
        timings: done.timings,
        warnings: done.warnings,
    }
}

/// Computes a validated task and answers in this API's format: JSON, the image file itself,
/// or a stream of progress events ending with the JSON result.
pub(crate) async fn run_task(
    app: &AppState,
    caller: &Caller,
    id: String,
    worker: &Arc<ModelWorker>,
    task: GenerationTask,
    params: Parameters,
    kind: BodyKind,
    arrived: Instant,
) -> Result<Response, ApiError> {
    let mut tracked = track(app, caller, &id, worker)?;
    match kind {
        BodyKind::Events => return Ok(event_stream(tracked, worker.clone(), task, params, arrived)),
        BodyKind::File => {
            let done = compute(&mut tracked, worker, task, &params, arrived).await?;
            let mut response = (
                StatusCode::OK,
                [(header::CONTENT_TYPE, done.format.mime())],
                done.files.into_iter().next().unwrap_or_default(),
            )
                .into_response();
            response
                .headers_mut()
                .insert("x-seed", HeaderValue::from(done.seeds[0]));
            Ok(response)
        }
        BodyKind::Json => {
            let done = compute(&mut tracked, worker, task, &params, arrived).await?;
            Ok(Json(json_body(id, params, done)).into_response())
        }
    }
}

/// `text/event-stream`: a `progress` event (GenerationStatus) whenever the request moves on,
/// then one `result` (GenerateResponse) or `error` (ErrorResponse) event. The computation runs
/// in its own task that stops as soon as the client is gone, which cancels the request like a
/// disconnect from a plain request does.
fn event_stream(
    mut tracked: Tracked,
    worker: Arc<ModelWorker>,
    task: GenerationTask,
    params: Parameters,
    arrived: Instant,
) -> Response {
    use axum::response::sse::{Event, KeepAlive, Sse};
    let (tx, rx) = tokio::sync::mpsc::channel::<Event>(16);
    let id = tracked.id().to_string();
    let mut progress = tracked.subscribe();
    let model = params.model.clone();
    tokio::spawn(async move {
        let work = async {
            let run = compute(&mut tracked, &worker, task, &params, arrived);
            tokio::pin!(run);
            let mut last = None;
            loop {
                let status = {
                    let p = progress.borrow_and_update();
                    generations::snapshot(&id, &model, &p, arrived)
                };
                let key = (status.stage.clone(), status.step);
                if last.as_ref() != Some(&key) {
                    last = Some(key);
                    let ev = Event::default().event("progress").json_data(&status);
                    if tx.send(ev.unwrap_or_default()).await.is_err() {
                        return;
                    }
                }
                let last_event = |done: Result<Computed, ApiError>| {
                    match done {
                        Ok(done) => Event::default()
                            .event("result")
                            .json_data(json_body(id.clone(), params.clone(), done)),
                        Err(e) => Event::default().event("error").json_data(e.body()),
                    }
                    .unwrap_or_default()
                };
                tokio::select! {
                    done = &mut run => {
                        let _ = tx.send(last_event(done)).await;
                        return;
                    }
                    changed = progress.changed() => {
                        if changed.is_err() {
                            // The worker let go of the request; its reply is on the way.
                            let _ = tx.send(last_event(run.await)).await;
                            return;
                        }
                    }
                }
            }
        };
        tokio::select! {
            _ = work => {}
            _ = tx.closed() => {}
        }
    });
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv()
            .await
            .map(|ev| (Ok::<_, std::convert::Infallible>(ev), rx))
    });
    Sse::new(stream)
        .keep_alive(KeepAlive::default())
        .into_response()
}

/// Text to image.
///
/// With `Accept: image/png` and one image the body is the PNG itself (seed in `x-seed`).
/// Every PNG carries AUTOMATIC1111-style `parameters` text.
#[utoipa::path(
    post,
    path = "/generate",
    tag = "images",
    request_body = GenerateRequest,
    responses(
        (status = 200, description = "Generated images", content(
            (GenerateResponse = "application/json"),
            (PngFile = "image/png"),
            (ImageFile = "image/jpeg"),
            (ImageFile = "image/webp"),
            (String = "text/event-stream"),
        )),
        (status = 400, description = "Malformed JSON", body = ErrorResponse),
        (status = 404, description = "Unknown model or adapter (model_not_found, adapter_not_found)", body = ErrorResponse),
        (status = 406, description = "Accept: only image files, with num_images > 1 or another output_format", body = ErrorResponse),
        (status = 409, description = "Cancelled through /generations/{id}/cancel (generation_cancelled), or x-request-id names a generation still running (request_id_in_use)", body = ErrorResponse),
        (status = 413, description = "Body over the size limit", body = ErrorResponse),
        (status = 415, description = "Not application/json", body = ErrorResponse),
        (status = 422, description = "A field is out of range or unknown (invalid_size, invalid_steps, ...)", body = ErrorResponse),
        (status = 429, description = "The model's queue is full; retry after Retry-After seconds", body = ErrorResponse,
            headers(("Retry-After" = u64, description = "Seconds to wait"))),
        (status = 500, description = "Inference failed", body = ErrorResponse),
        (status = 503, description = "Model still loading (Retry-After) or unavailable", body = ErrorResponse),
    )
)]
pub async fn generate(
    State(app): State<AppState>,
    Extension(caller): Extension<Caller>,
    RequestId(id): RequestId,
    headers: HeaderMap,
    body: Result<Json<GenerateRequest>, JsonRejection>,
) -> Result<Response, ApiError> {
    let arrived = Instant::now();
    let Json(mut req) = body?;
    find_model(&app, req.model.as_deref())?.info()?;
    let n = requested_images(&app, req.num_images);
    let kind = negotiate(&headers, n, &mut req.output_format)?;
    let (worker, task, params) = generate_task(&app, req)?;
    run_task(&app, &caller, id, worker, task, params, kind, arrived).await
}

/// num_images as negotiation sees it; validation reports values out of range.
fn requested_images(app: &AppState, n: Option<i64>) -> usize {
    let max = app.config.limits.max_num_images as i64;
    n.unwrap_or(1).clamp(1, max.max(1)) as usize
}

/// Reads a multipart /edit body into the JSON request's fields and the raw image file.
async fn read_multipart(mut form: Multipart) -> Result<(EditRequest, Vec<u8>), ApiError> {
    let mut image = None;
    let mut text = std::collections::HashMap::new();
    loop {
        let field = form.next_field().await.map_err(multipart_error)?;
        let Some(field) = field else { break };
        let name = field.name().unwrap_or_default().to_string();
        if name == "image" {
            image = Some(field.bytes().await.map_err(multipart_error)?.to_vec());
        } else {
            let value = field.text().await.map_err(multipart_error)?;
            text.insert(name, value);
        }
    }
    let image = image
        .ok_or_else(|| ApiError::InvalidRequest("missing field `image` (a file part)".into()))?;
    let mut take = |k: &str| text.remove(k);
    fn num<T: std::str::FromStr>(k: &str, v: Option<String>) -> Result<Option<T>, ApiError> {
        v.map(|v| {
            v.trim().parse::<T>().map_err(|_| {
                ApiError::InvalidRequest(format!("field `{k}`: '{v}' is not a valid number"))
            })
        })
        .transpose()
    }
    let req = EditRequest {
        image: String::new(),
        prompt: take("prompt")
            .ok_or_else(|| ApiError::InvalidRequest("missing field `prompt`".into()))?,
        mode: take("mode"),
        image_guidance_scale: num("image_guidance_scale", take("image_guidance_scale"))?,
        strength: num("strength", take("strength"))?,
        negative_prompt: take("negative_prompt"),
        model: take("model"),
        adapter: take("adapter"),
        adapter_scale: num("adapter_scale", take("adapter_scale"))?,
        width: num("width", take("width"))?,
        height: num("height", take("height"))?,
        steps: num("steps", take("steps"))?,
        guidance_scale: num("guidance_scale", take("guidance_scale"))?,
        scheduler: take("scheduler"),
        seed: num("seed", take("seed"))?,
        num_images: num("num_images", take("num_images"))?,
        output_format: take("output_format"),
        output_quality: num("output_quality", take("output_quality"))?,
    };
    if let Some(k) = text.keys().next() {
        return Err(ApiError::InvalidRequest(format!("unknown field `{k}`")));
    }
    Ok((req, image))
}

fn multipart_error(e: axum::extract::multipart::MultipartError) -> ApiError {
    if super::error::body_timed_out(&e) {
        super::error::body_timeout()
    } else if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
        ApiError::PayloadTooLarge(e.body_text())
    } else {
        ApiError::MalformedMultipart(e.body_text())
    }
}

/// Edit an image: InstructPix2Pix instructions or img2img.
///
/// JSON with a base64 `image`, or multipart/form-data with an `image` file part and the other
/// fields as form fields. The output keeps the input's size rounded down to a multiple of 8
/// unless width/height are given (`parameters.resized` tells).
#[utoipa::path(
    post,
    path = "/edit",
    tag = "images",
    request_body(content(
        (EditRequest = "application/json"),
        (EditForm = "multipart/form-data"),
    )),
    responses(
        (status = 200, description = "Edited images", content(
            (GenerateResponse = "application/json"),
            (PngFile = "image/png"),
            (ImageFile = "image/jpeg"),
            (ImageFile = "image/webp"),
            (String = "text/event-stream"),
        )),
        (status = 400, description = "Malformed JSON or multipart body", body = ErrorResponse),
        (status = 404, description = "Unknown model or adapter", body = ErrorResponse),
        (status = 406, description = "Accept: only image files, with num_images > 1 or another output_format", body = ErrorResponse),
        (status = 409, description = "Cancelled through /generations/{id}/cancel (generation_cancelled), or x-request-id names a generation still running (request_id_in_use)", body = ErrorResponse),
        (status = 413, description = "Body over the size limit", body = ErrorResponse),
        (status = 415, description = "Neither JSON nor multipart/form-data", body = ErrorResponse),
        (status = 422, description = "Invalid field, undecodable or oversized image, or a mode the model lacks (unsupported_mode)", body = ErrorResponse),
        (status = 429, description = "The model's queue is full", body = ErrorResponse,
            headers(("Retry-After" = u64, description = "Seconds to wait"))),
        (status = 500, description = "Inference failed", body = ErrorResponse),
        (status = 503, description = "Model still loading or unavailable", body = ErrorResponse),
    )
)]
pub async fn edit(
    State(app): State<AppState>,
    RequestId(id): RequestId,
    request: Request,
) -> Result<Response, ApiError> {
    let arrived = Instant::now();
    let headers = request.headers().clone();
    let caller = request
        .extensions()
        .get::<Caller>()
        .cloned()
        .unwrap_or_else(Caller::anonymous);
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_ascii_lowercase();
    let (mut req, image) = if content_type.starts_with("multipart/form-data") {
        let form = Multipart::from_request(request, &app)
            .await
            .map_err(|e| ApiError::MalformedMultipart(e.body_text()))?;
        read_multipart(form).await?
    } else if content_type.starts_with("application/json") || content_type.contains("+json") {
        let Json(req) = Json::<EditRequest>::from_request(request, &app).await?;
        let image = images::decode_base64(&req.image)?;
        (req, image)
    } else {
        return Err(ApiError::UnsupportedMediaType(format!(
            "Content-Type '{content_type}': /edit takes application/json or multipart/form-data"
        )));
    };
    // Unknown or unloaded model first, then Accept, then the body's values (edit_task).
    find_model(&app, req.model.as_deref())?.info()?;
    let n = requested_images(&app, req.num_images);
    let kind = negotiate(&headers, n, &mut req.output_format)?;
    let (worker, task, params) = edit_task(&app, req, image).await?;
    run_task(&app, &caller, id, worker, task, params, kind, arrived).await
}

/// The served models, what each can do and its defaults.
#[utoipa::path(get, path = "/models", operation_id = "list_models", tag = "service", responses((status = 200, body = ModelsResponse)))]
pub async fn models(State(app): State<AppState>) -> Json<ModelsResponse> {
    let d = &app.config.defaults;
    let models = app
        .pool
        .models()
        .into_iter()
        .map(|w| {
            let status = w.status();
            let (info, error) = match &status {
                LoadStatus::Ready(i) => (Some(i.clone()), None),
                LoadStatus::Failed(e) => (None, Some(e.clone())),
                LoadStatus::Loading => (None, None),
            };
            ModelEntry {
                name: w.name().to_string(),
                source: w.source().to_string(),
                architecture: info
                    .as_ref()
                    .map(|i| i.architecture.name().to_string()),
                devices: app.pool.devices(w.name()),
                loaded: info.is_some(),
                error,
                default: w.name() == app.pool.default_model(),
                modes: info
                    .as_ref()
                    .map(|i| i.modes().iter().map(|m| m.name().to_string()).collect())
                    .unwrap_or_default(),
                schedulers: SchedulerKind::ALL
                    .iter()
                    .map(|k| k.name().to_string())
                    .collect(),
                defaults: info.as_ref().map(|i| ModelDefaults {
                    width: i.native_size as u32,
                    height: i.native_size as u32,
                    steps: i
                        .generate_defaults
                        .steps
                        .map(|s| s as u32)
                        .unwrap_or(d.steps)
                        .min(app.config.limits.max_steps),
                    guidance_scale: i
                        .generate_defaults
                        .guidance_scale
                        .unwrap_or(d.guidance_scale),
                    scheduler: i.default_scheduler.name().to_string(),
                    image_guidance_scale: i
                        .supports(Mode::InstructPix2Pix)
                        .then_some(d.image_guidance_scale),
                    strength: i.supports(Mode::Img2Img).then_some(d.strength),
                }),
                vocabulary: info.as_ref().and_then(|i| i.vocabulary.clone()),
            }
        })
        .collect();
    Json(ModelsResponse { models })
}

/// Liveness and counters: queue depth, computed, dropped and refused requests, batch sizes.
#[utoipa::path(get, path = "/health", tag = "service", responses((status = 200, body = HealthResponse)))]
pub async fn health(State(app): State<AppState>) -> Json<HealthResponse> {
    let models = app
        .pool
        .workers()
        .iter()
        .map(|w| {
            let s = w.stats().snapshot();
            ModelHealth {
                name: w.name().to_string(),
                device: w.device().to_string(),
                loaded: matches!(w.status(), LoadStatus::Ready(_)),
                queue_depth: w.queue_depth() as u32,
                requests_computed: s.requests_computed,
                images_computed: s.images_computed,
                dropped_disconnected: s.dropped_disconnected,
                cancelled_in_compute: s.cancelled_in_compute,
                rejected_queue_full: s.rejected_queue_full,
                batches: s.batches,
                failed_batches: s.failed_batches,
                batch_sizes: s
                    .batch_sizes
                    .into_iter()
                    .map(|(k, v)| (k.to_string(), v))
                    .collect(),
            }
        })
        .collect();
    Json(HealthResponse {
        status: "ok".into(),
        version: env!("CARGO_PKG_VERSION").into(),
        uptime_s: app.started.elapsed().as_secs_f64(),
        models,
        replica: app.jobs.as_ref().map(|j| j.replica().to_string()),
    })
}

/// Readiness: 200 once every model is loaded, 503 before (or when one failed).
#[utoipa::path(get, path = "/ready", tag = "service", responses(
    (status = 200, body = ReadyResponse), (status = 503, body = ReadyResponse)
))]
pub async fn ready(State(app): State<AppState>) -> Response {
    let models: Vec<ModelReadiness> = app
        .pool
        .workers()
        .iter()
        .map(|w| {
            let (status, error) = match w.status() {
                LoadStatus::Loading => ("loading", None),
                LoadStatus::Ready(_) => ("ready", None),
                LoadStatus::Failed(e) => ("failed", Some(e)),
            };
            ModelReadiness {
                name: w.name().to_string(),
                device: w.device().to_string(),
                status: status.into(),
                error,
            }
        })
        .collect();
    let storage_error = match &app.jobs {
        Some(m) => {
            let m = m.clone();
            tokio::task::spawn_blocking(move || m.storage_writable())
                .await
                .unwrap_or_else(|e| Err(e.to_string()))
                .err()
        }
        None => None,
    };
    let ready = app.pool.is_ready() && storage_error.is_none();
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        status,
        Json(ReadyResponse {
            ready,
            models,
            storage_error,
        }),
    )
        .into_response()
}

/// This API's OpenAPI 3.1 document (the committed `openapi/openapi.json`).
#[utoipa::path(get, path = "/openapi.json", tag = "service", responses((status = 200, description = "OpenAPI document", content_type = "application/json")))]
pub async fn openapi_json() -> Response {
    (
        [(header::CONTENT_TYPE, "application/json")],
        super::openapi_json(),
    )
        .into_response()
}

pub async fn not_found(request: Request) -> ApiError {
    ApiError::RouteNotFound(format!(
        "no route for {} {}",
        request.method(),
        request.uri().path()
    ))
}

pub async fn method_not_allowed(request: Request) -> ApiError {
    ApiError::MethodNotAllowed(format!(
        "{} is not allowed on {}",
        request.method(),
        request.uri().path()
    ))
}
