//! The HTTP API: an axum router built by `ApiBuilder`, which another axum app can also nest.
//!
//! Layering: handlers (`handlers`) parse and validate (`validate`) into tasks for the model
//! workers (`crate::server`); every error becomes a response in one place (`error`).

pub mod auth;
pub mod docs;
pub mod error;
pub mod evaluate;
pub mod finetune;
pub mod generations;
pub mod handlers;
pub mod images;
pub mod job_types;
pub mod metrics;
pub mod openai;
pub mod a1111;
pub mod running;
pub mod types;
pub mod ui;
pub mod validate;

use crate::config::{Config, ConfigError};
use crate::server::{BatchHook, ModelPool};
use axum::extract::DefaultBodyLimit;
use axum::http::{HeaderName, Request};
use axum::routing::{get, post};
use axum::Router;
use std::future::Future;
use std::sync::Arc;
use std::time::Instant;
use tower::ServiceBuilder;
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::trace::{DefaultOnResponse, TraceLayer};
use tracing::Level;
use utoipa::OpenApi;

#[derive(OpenApi)]
#[openapi(
    info(
        title = "dspo-server",
        description = "Stable Diffusion serving: text-to-image, InstructPix2Pix and img2img edits, with \
                       per-model queues and dynamic batching, and preference fine-tuning jobs (DSPO, \
                       Diffusion-DPO, SFT) whose adapters later requests use. Every error is \
                       `{\"error\": {\"code\": \"invalid_steps\", \"message\": \"...\"}}`: a \
                       machine-readable code and a message for people."
    ),
    paths(
        handlers::generate,
        handlers::edit,
        handlers::models,
        handlers::health,
        handlers::ready,
        handlers::openapi_json,
        generations::list,
        generations::get,
        generations::cancel,
        evaluate::create,
        evaluate::list,
        evaluate::rewards,
        evaluate::get,
        evaluate::cancel,
        evaluate::rows,
        finetune::create,
        finetune::list,
        finetune::get_job,
        finetune::cancel,
        finetune::metrics,
        finetune::events,
        finetune::adapters,
        finetune::upload_adapter,
        finetune::adapter_weights,
        finetune::delete_adapter
    ),
    components(schemas(
        types::Scheduler,
        types::EditMode,
        types::EditForm,
        types::PngFile,
        types::ImageFile,
        types::OutputFormat,
        types::BinaryFile,
        error::ErrorResponse,
        job_types::JobSpec,
        job_types::JobRecord,
        job_types::JobStatus,
        job_types::Progress,
        job_types::JobErrorBody,
        job_types::AdapterInfo,
        job_types::StepMetrics,
        job_types::Method,
        job_types::LoraRequest,
        job_types::Hyperparameters,
        job_types::JobEvaluation,
        finetune::JobCreated,
        finetune::AdapterUpload
    )),
    tags(
        (name = "images", description = "Generate and edit images"),
        (name = "finetune", description = "Preference fine-tuning jobs (DSPO, Diffusion-DPO, SFT) and the adapters they produce"),
        (name = "evaluate", description = "Win rates of one adapter over another (or the base model) under reward models"),
        (name = "service", description = "Models, health and this document")
    )
)]
pub struct ApiDoc;

/// The OpenAPI document the server describes itself with.
pub fn openapi() -> utoipa::openapi::OpenApi {
    use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityRequirement, SecurityScheme};
    let mut doc = ApiDoc::openapi();
    // API keys as bearer tokens, so generated clients carry them. Operations that need none
    // (/health, /ready, and the document itself unless auth.protect_docs) say so.
    let mut bearer = Http::new(HttpAuthScheme::Bearer);
    bearer.description = Some(
        "An API key from the server's [auth] settings. Servers without keys accept requests \
         without this header."
            .into(),
    );
    doc.components
        .get_or_insert_with(Default::default)
        .add_security_scheme("api_key", SecurityScheme::Http(bearer));
    doc.security = Some(vec![SecurityRequirement::new("api_key", Vec::<String>::new())]);
    let open = ["/health", "/ready", "/openapi.json"];
    for (path, item) in doc.paths.paths.iter_mut() {
        let ops = [&mut item.get, &mut item.post, &mut item.put, &mut item.delete, &mut item.patch];
        for op in ops.into_iter().flatten() {
            if open.contains(&path.as_str()) {
                op.security = Some(vec![SecurityRequirement::default()]);
                continue;
            }
            // Declared, so generated clients parse these errors like every other.
            for (status, what) in [
                ("401", "No API key, or not a valid one (unauthorized)"),
                ("403", "The key lacks the scope, or the resource is another key's (forbidden)"),
                ("429", "Past the key's request rate or job limit (rate_limited), or the queue is full (queue_full); see Retry-After"),
            ] {
                op.responses.responses.entry(status.to_string()).or_insert_with(|| {
                    utoipa::openapi::ResponseBuilder::new()
                        .description(what)
                        .content(
                            "application/json",
                            utoipa::openapi::ContentBuilder::new()
                                .schema(Some(utoipa::openapi::Ref::from_schema_name("ErrorResponse")))
                                .build(),
                        )
                        .build()
                        .into()
                });
            }
        }
    }
    // /edit's body is marked optional although the server requires one: openapi-python-client
    // (0.29, issue #1451) generates code that does not import for a *required* body with
    // several content types. An absent body is answered 415 all the same.
    if let Some(body) = doc
        .paths
        .paths
        .get_mut("/edit")
        .and_then(|item| item.post.as_mut())
        .and_then(|op| op.request_body.as_mut())
    {
        body.required = Some(utoipa::openapi::Required::False);
    }
    doc
}

/// The OpenAPI document exactly as served and committed (`openapi/openapi.json`).
pub fn openapi_json() -> String {
    let mut s = openapi()
        .to_pretty_json()
        .expect("the OpenAPI document serialises");
    s.push('\n');
    s
}

/// What every handler shares.
#[derive(Clone)]
pub struct AppState {
    pub pool: Arc<ModelPool>,
    pub config: Arc<Config>,
    pub started: Instant,
    /// None when `jobs.enabled` is false.
    pub jobs: Option<Arc<crate::jobs::JobManager>>,
    pub keys: Arc<auth::KeyRing>,
    pub generations: Arc<generations::Registry>,
    /// None when `jobs.enabled` is false.
    pub evaluations: Option<Arc<crate::jobs::evaluations::EvaluationManager>>,
}

pub struct ApiBuilder {
    config: Config,
    hook: Option<BatchHook>,
}

impl ApiBuilder {
    pub fn new(config: Config) -> Self {
        Self { config, hook: None }
    }

    /// Runs on each worker thread before every batch (see `BatchHook`).
    pub fn batch_hook(mut self, hook: BatchHook) -> Self {
        self.hook = Some(hook);
        self
    }

    /// Starts the model workers (they load in the background) and builds the API.
    pub fn build(self) -> Result<Api, ConfigError> {
        metrics::handle();
        let keys = Arc::new(
            auth::KeyRing::from_config(&self.config.auth)
                .map_err(|e| ConfigError::Invalid(e.to_string()))?,
        );
        let pool = Arc::new(ModelPool::start(&self.config, self.hook)?);
        let jobs = if self.config.jobs.enabled {
            Some(start_jobs(&self.config, &pool)?)
        } else {
            None
        };
        let config = Arc::new(self.config);
        let evaluations = if config.jobs.enabled {
            Some(
                crate::jobs::evaluations::EvaluationManager::start(
                    &config.server.data_dir,
                    evaluate::runner(pool.clone(), config.clone()),
                )
                .map_err(|e| ConfigError::Invalid(format!("evaluations: {e}")))?,
            )
        } else {
            None
        };
        if let (Some(j), Some(e)) = (&jobs, &evaluations) {
            evaluate::follow_jobs(j.clone(), e.clone(), pool.clone(), config.clone());
        }
        Ok(Api {
            state: AppState {
                pool,
                config,
                started: Instant::now(),
                jobs,
                keys,
                generations: Arc::default(),
                evaluations,
            },
        })
    }
}

/// The job manager, resolving `base_model` through the served models and pausing training
/// between steps while any model has queued inference requests.
fn start_jobs(
    config: &Config,
    pool: &Arc<ModelPool>,
) -> Result<Arc<crate::jobs::JobManager>, ConfigError> {
    let served: Vec<(String, String)> = pool
        .models()
        .into_iter()
        .map(|w| (w.name().to_string(), w.source().to_string()))
        .collect();
    let jc = crate::jobs::JobsConfig::from_config(config, &served)
        .map_err(|e| ConfigError::Invalid(e.to_string()))?;
    let variant = Some(config.models.variant.clone()).filter(|v| !v.is_empty());
    let p = pool.clone();
    let resolver: crate::jobs::manager::ModelResolver = Arc::new(move |name: Option<&str>| {
        let w = p.get(name)?;
        // A single-file checkpoint is handed to the trainer as its source string, which
        // resolves it the way the worker did.
        let dir = match crate::models::ModelSource::parse(w.source()) {
            crate::models::ModelSource::SingleFile { .. } => std::path::PathBuf::from(w.source()),
            other => other.resolve(variant.as_deref()).ok()?,
        };
        Some((w.name().to_string(), dir))
    });
    let p = pool.clone();
    let busy: crate::jobs::manager::BusyProbe = Arc::new(move || {
        p.workers()
            .iter()
            .any(|w| w.queue_depth() > 0 || w.stats().recently_busy(250))
    });
    crate::jobs::JobManager::start(jc, resolver, Some(busy))
        .map_err(|e| ConfigError::Invalid(format!("jobs: {e}")))
}

pub struct Api {
    state: AppState,
}

impl Api {
    pub fn pool(&self) -> &Arc<ModelPool> {
        &self.state.pool
    }

    /// Whether requests need an API key (any key configured).
    pub fn auth_enabled(&self) -> bool {
        self.state.keys.enabled()
    }

    pub fn listens_on_loopback(&self) -> bool {
        self.state.config.server.listens_on_loopback()
    }

    /// The complete router: routes, body limit, request ids and tracing.
    pub fn router(&self) -> Router {
        let request_id = HeaderName::from_static(handlers::REQUEST_ID_HEADER);
        let trace = TraceLayer::new_for_http()
            .make_span_with(|req: &Request<_>| {
                let id = req.headers().get(handlers::REQUEST_ID_HEADER).and_then(|v| v.to_str().ok()).unwrap_or("-");
                tracing::info_span!("request", method = %req.method(), path = %req.uri().path(), request_id = %id)
            })
            .on_response(DefaultOnResponse::new().level(Level::INFO));
        Router::new()
            .route("/generate", post(handlers::generate))
            .route("/edit", post(handlers::edit))
            .route("/models", get(handlers::models))
            .route("/health", get(handlers::health))
            .route("/ready", get(handlers::ready))
            .route("/openapi.json", get(handlers::openapi_json))
            .route("/metrics", get(metrics::metrics))
            .route("/v1/images/generations", post(openai::generations))
            .route("/v1/images/edits", post(openai::edits))
            .route("/sdapi/v1/txt2img", post(a1111::txt2img))
            .route("/sdapi/v1/img2img", post(a1111::img2img))
            .route("/sdapi/v1/samplers", get(a1111::samplers))
            .route("/sdapi/v1/sd-models", get(a1111::sd_models))
            .route("/sdapi/v1/loras", get(a1111::loras))
            .route("/sdapi/v1/progress", get(a1111::progress))
            .route("/sdapi/v1/interrupt", post(a1111::interrupt))
            .route("/evaluate", post(evaluate::create).get(evaluate::list))
            .route("/evaluate/rewards", get(evaluate::rewards))
            .route("/evaluate/{id}", get(evaluate::get).delete(evaluate::cancel))
            .route("/evaluate/{id}/rows", get(evaluate::rows))
            .route("/generations", get(generations::list))
            .route("/generations/{id}", get(generations::get))
            .route("/generations/{id}/cancel", post(generations::cancel))
            .route("/finetune", post(finetune::create).get(finetune::list))
            .route(
                "/finetune/{id}",
                get(finetune::get_job).delete(finetune::cancel),
            )
            .route("/finetune/{id}/metrics", get(finetune::metrics))
            .route("/finetune/{id}/events", get(finetune::events))
            .route("/adapters", get(finetune::adapters).post(finetune::upload_adapter))
            .route("/adapters/{name}/weights", get(finetune::adapter_weights))
            .route(
                "/adapters/{name}",
                axum::routing::delete(finetune::delete_adapter),
            )
            .route("/docs", get(docs::index))
            .route("/docs/", get(docs::index))
            .route("/docs/{file}", get(docs::file))
            .route("/", get(ui::index))
            .route("/ui/{file}", get(ui::file))
            .fallback(handlers::not_found)
            .method_not_allowed_fallback(handlers::method_not_allowed)
            .layer(axum::middleware::from_fn(metrics::record))
            .layer(DefaultBodyLimit::max(
                self.state.config.limits.max_body_bytes,
            ))
            .layer(axum::middleware::from_fn_with_state(
                self.state.config.limits.max_body_bytes,
                handlers::refuse_declared_oversize,
            ))
            .layer(axum::middleware::from_fn_with_state(
                Arc::new(handlers::HostRule {
                    // With keys, a page that rebinds a domain to 127.0.0.1 has no key to send.
                    enforce: self.state.config.server.listens_on_loopback()
                        && !self.state.keys.enabled(),
                    allowed: self.state.config.server.allowed_hosts.clone(),
                }),
                handlers::check_host,
            ))
            .layer(axum::middleware::from_fn_with_state(
                self.state.keys.clone(),
                auth::require_key,
            ))
            .layer(
                ServiceBuilder::new()
                    .layer(axum::middleware::map_request(handlers::drop_unsafe_request_id))
                    .layer(SetRequestIdLayer::new(request_id.clone(), MakeRequestUuid))
                    .layer(trace)
                    .layer(PropagateRequestIdLayer::new(request_id)),
            )
            .layer(cors(&self.state.config.server.cors_origins))
            .with_state(self.state.clone())
    }

    /// Serves until `shutdown` resolves, then stops accepting, lets in-flight requests finish,
    /// and waits for the workers to drain their queues.
    pub async fn serve(
        self,
        listener: tokio::net::TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        let router = self.router().layer(tower_http::timeout::RequestBodyTimeoutLayer::new(
            std::time::Duration::from_secs(self.state.config.server.body_timeout_secs),
        ));
        accept_loop(listener, router, &self.state.config.server, shutdown).await;
        tracing::info!("listener closed; waiting for the model workers to finish");
        if let Some(jobs) = &self.state.jobs {
            // The running job stops at its next step and is resumed at the next start.
            jobs.shutdown();
        }
        if let Some(evaluations) = &self.state.evaluations {
            // A running evaluation stops at its next prompt and starts over at the next start.
            evaluations.shutdown();
        }
        let pool = self.state.pool.clone();
        tokio::task::spawn_blocking(move || pool.shutdown())
            .await
            .map_err(std::io::Error::other)?;
        Ok(())
    }
}

/// CORS for the configured origins (none: no CORS headers at all). Preflights are answered
/// here, before routing, so an OPTIONS request no longer meets 405.
fn cors(origins: &[String]) -> tower_http::cors::CorsLayer {
    use tower_http::cors::{AllowOrigin, Any, CorsLayer};
    if origins.is_empty() {
        return CorsLayer::new();
    }
    let allow = if origins.iter().any(|o| o == "*") {
        AllowOrigin::any()
    } else {
        AllowOrigin::list(origins.iter().filter_map(|o| o.parse().ok()))
    };
    CorsLayer::new()
        .allow_origin(allow)
        .allow_methods(Any)
        .allow_headers(Any)
        .expose_headers(Any)
        .max_age(std::time::Duration::from_secs(600))
}

/// Accepts connections until `shutdown`, then waits for the open ones to finish. Each connection
/// must deliver a request's headers within `header_timeout_secs` (hyper closes it otherwise),
/// and connections past `max_connections` are closed as soon as they are accepted: what
/// `axum::serve` does not limit, and what let idle and trickling connections exhaust the
/// process's file descriptors.
async fn accept_loop(
    listener: tokio::net::TcpListener,
    router: Router,
    cfg: &crate::config::ServerConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) {
    use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
    use hyper_util::server::conn::auto::Builder;
    use hyper_util::service::TowerToHyperService;
    let mut builder = Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(std::time::Duration::from_secs(cfg.header_timeout_secs));
    builder.http2().timer(TokioTimer::new());
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let first_byte = std::time::Duration::from_secs(cfg.header_timeout_secs);
    let slots = Arc::new(tokio::sync::Semaphore::new(cfg.max_connections));
    tokio::pin!(shutdown);
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = &mut shutdown => break,
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            tracing::warn!(limit = cfg.max_connections, "connection refused: server.max_connections open");
            continue;
        };
        let service = TowerToHyperService::new(router.clone());
        let builder = builder.clone();
        let watcher = graceful.watcher();
        tokio::spawn(async move {
            // hyper's header timeout starts at a request's first byte; a connection that sends
            // nothing at all is closed here, on the same timeout.
            let mut probe = [0u8; 1];
            match tokio::time::timeout(first_byte, stream.peek(&mut probe)).await {
                Ok(Ok(n)) if n > 0 => {}
                _ => return,
            }
            let conn = builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
            let _ = watcher.watch(conn.into_owned()).await;
            drop(slot);
        });
    }
    drop(listener);
    graceful.shutdown().await;
}
