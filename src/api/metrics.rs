//! Prometheus metrics at GET /metrics, named in the style of text-generation-inference
//! (`<prefix>_<what>_<unit>`): request counts and durations by route and status (recorded
//! here), batch sizes and generated images per model (recorded by the workers), training steps
//! (recorded by the job manager), and gauges read at scrape time (queue depth per model, jobs
//! per state). Recording goes through the `metrics` facade; the exporter renders text.

use super::AppState;
use axum::extract::{MatchedPath, Request, State};
use axum::http::header;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use std::sync::OnceLock;
use std::time::Instant;

/// The process's one recorder (a global, as the `metrics` macros are): several servers in one
/// process, as in tests, share it.
pub fn handle() -> &'static PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE.get_or_init(|| {
        let seconds = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0];
        let builder = PrometheusBuilder::new()
            .set_buckets_for_metric(Matcher::Full("dspo_request_duration_seconds".into()), &seconds)
            .and_then(|b| {
                b.set_buckets_for_metric(
                    Matcher::Full("dspo_batch_size".into()),
                    &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0],
                )
            })
            .expect("bucket lists are not empty");
        let recorder = builder.build_recorder();
        let handle = recorder.handle();
        if metrics::set_global_recorder(recorder).is_err() {
            tracing::warn!("a metrics recorder was already installed; /metrics shows only gauges");
        }
        handle
    })
}

/// Counts and times every request under its route template (`/finetune/{id}`, not the id), so
/// the label set stays small.
pub async fn record(req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "unmatched".into());
    let method = req.method().to_string();
    let start = Instant::now();
    let response = next.run(req).await;
    let labels = [
        ("route", route),
        ("method", method),
        ("status", response.status().as_u16().to_string()),
    ];
    metrics::counter!("dspo_requests_total", &labels).increment(1);
    metrics::histogram!("dspo_request_duration_seconds", &labels)
        .record(start.elapsed().as_secs_f64());
    response
}

/// GET /metrics: Prometheus text format.
pub async fn metrics(State(app): State<AppState>) -> Response {
    let handle = handle();
    for w in app.pool.workers() {
        let (model, device) = (w.name().to_string(), w.device().to_string());
        metrics::gauge!("dspo_queue_size", "model" => model.clone(), "device" => device.clone())
            .set(w.queue_depth() as f64);
        let loaded = matches!(w.status(), crate::server::LoadStatus::Ready(_));
        metrics::gauge!("dspo_model_loaded", "model" => model, "device" => device)
            .set(if loaded { 1.0 } else { 0.0 });
    }
    if let Some(jobs) = &app.jobs {
        let m = jobs.clone();
        if let Ok(Ok(counts)) = tokio::task::spawn_blocking(move || m.count_by_status()).await {
            for (status, n) in counts {
                metrics::gauge!("dspo_finetune_jobs", "status" => status).set(n as f64);
            }
        }
    }
    handle.run_upkeep();
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        handle.render(),
    )
        .into_response()
}
