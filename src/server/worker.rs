//! One worker per model: a thread that owns the weights, a bounded queue in front of it, and
//! the batcher between the two.
//!
//! The handle (`ModelWorker`) is what the HTTP layer holds. `submit` either admits a request
//! at once or refuses it at once (queue full, model not loaded); an admitted request is
//! answered on a oneshot channel. The HTTP handler awaits that channel, so when a client
//! disconnects the handler future is dropped, the receiver closes, and the worker sees
//! `is_closed()`: such requests are dropped before compute, and a batch whose clients have
//! all gone is abandoned between denoising steps.

use crate::adapters::cache::AdapterState;
use super::compute::run_batch;
use super::progress::{ProgressSender, Stage};
use super::stats::WorkerStats;
use super::task::{BatchKey, GenerationTask, ModelInfo, TaskOutput};
use crate::config::ModelSpec;
use crate::models::pipeline_model::LoadOptions;
use crate::models::DiffusionModel;
use crate::pipelines::PipelineError;
use crate::schedulers::SchedulerError;
use std::collections::VecDeque;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use tokio::sync::{oneshot, watch};
use tracing::{error, info, warn};

#[derive(Debug, Clone)]
pub struct WorkerSettings {
    pub max_batch: usize,
    pub wait: Duration,
    pub queue_size: usize,
    pub retry_after_s: u64,
    pub adapter_cache: usize,
}

/// Called on the worker thread just before a batch computes, inside the panic guard. The
/// server itself sets none; tests use it to inject failures and to hold a batch open.
pub type BatchHook = Arc<dyn Fn(&[&GenerationTask]) + Send + Sync>;

#[derive(Debug, Clone)]
pub enum LoadStatus {
    Loading,
    Ready(Arc<ModelInfo>),
    Failed(String),
}

/// Why a worker did not produce images. Cloneable because one failure answers a whole batch.
#[derive(Debug, Clone, thiserror::Error)]
pub enum WorkerError {
    #[error("the queue for model '{model}' is full")]
    QueueFull { model: String, retry_after_s: u64 },
    #[error("model '{model}' is still loading")]
    Loading { model: String, retry_after_s: u64 },
    #[error("model '{model}' failed to load: {reason}")]
    Unavailable { model: String, reason: String },
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    Unsupported(String),
    #[error("{0}")]
    Adapter(String),
    #[error("cancelled: every client of the batch disconnected")]
    Cancelled,
    #[error("inference failed: {0}")]
    Failed(String),
    #[error("the worker panicked while computing this batch: {0}")]
    Panicked(String),
    #[error("the worker for model '{0}' has stopped")]
    Stopped(String),
}

impl From<PipelineError> for WorkerError {
    fn from(e: PipelineError) -> Self {
        match e {
            PipelineError::Invalid(m) => WorkerError::Invalid(m),
            // Validation builds the scheduler first, so these mean a step count it let through.
            e @ PipelineError::Scheduler(
                SchedulerError::Config(_) | SchedulerError::Steps { .. },
            ) => WorkerError::Invalid(e.to_string()),
            e @ PipelineError::Unsupported(..) => WorkerError::Unsupported(e.to_string()),
            PipelineError::Cancelled => WorkerError::Cancelled,
            e => WorkerError::Failed(e.to_string()),
        }
    }
}

pub type Reply = Result<TaskOutput, WorkerError>;

/// A place in the queue; dropping it (request computed, dropped or refused) frees the place.
struct QueueSlot(Arc<AtomicUsize>);

impl Drop for QueueSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A generation request admitted to the queue (not a fine-tuning job: those are `jobs::`).
struct Queued {
    task: GenerationTask,
    key: BatchKey,
    reply: oneshot::Sender<Reply>,
    admitted: Instant,
    request_id: String,
    slot: Option<QueueSlot>,
    /// Held until the request is answered or dropped: the worker's load.
    _in_flight: QueueSlot,
    progress: Option<ProgressSender>,
}

impl Queued {
    fn client_gone(&self) -> bool {
        self.reply.is_closed()
    }
}

pub struct ModelWorker {
    name: String,
    source: String,
    /// The device this replica runs on, as configured (`cpu`, `cuda:1`).
    device: String,
    status: watch::Receiver<LoadStatus>,
    tx: Mutex<Option<mpsc::Sender<Queued>>>,
    queued: Arc<AtomicUsize>,
    /// Requests admitted and not yet answered (queued or computing).
    in_flight: Arc<AtomicUsize>,
    stats: Arc<WorkerStats>,
    settings: WorkerSettings,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl ModelWorker {
    /// Starts the thread, which loads the model and then serves its queue. `spec` is one
    /// replica's: its `devices` names the one device `load` opens.
    pub fn spawn(
        spec: ModelSpec,
        load: LoadOptions,
        settings: WorkerSettings,
        hook: Option<BatchHook>,
    ) -> Self {
        let (status_tx, status) = watch::channel(LoadStatus::Loading);
        let (tx, rx) = mpsc::channel();
        let queued = Arc::new(AtomicUsize::new(0));
        let stats = Arc::new(WorkerStats::default());
        let inner = Inner {
            name: spec.name.clone(),
            settings: settings.clone(),
            queued: queued.clone(),
            stats: stats.clone(),
            hook,
        };
        let (name, source) = (spec.name.clone(), spec.source.clone());
        let device = spec.devices.first().cloned().unwrap_or_else(|| "cpu".into());
        let thread = std::thread::Builder::new()
            .name(format!("model-{}@{device}", spec.name))
            .spawn(move || inner.run(spec, load, status_tx, rx))
            .expect("spawning a worker thread");
        Self {
            name,
            source,
            device,
            status,
            tx: Mutex::new(Some(tx)),
            queued,
            in_flight: Arc::new(AtomicUsize::new(0)),
            stats,
            settings,
            thread: Mutex::new(Some(thread)),
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn source(&self) -> &str {
        &self.source
    }

    pub fn device(&self) -> &str {
        &self.device
    }

    pub fn status(&self) -> LoadStatus {
        self.status.borrow().clone()
    }

    /// Waits until the model has loaded or failed to.
    pub async fn wait_loaded(&self) -> Result<Arc<ModelInfo>, String> {
        let mut rx = self.status.clone();
        let status = rx
            .wait_for(|s| !matches!(s, LoadStatus::Loading))
            .await
            .map(|s| s.clone())
            .unwrap_or_else(|_| {
                LoadStatus::Failed("the worker thread exited while loading".into())
            });
        match status {
            LoadStatus::Ready(info) => Ok(info),
            LoadStatus::Failed(e) => Err(e),
            LoadStatus::Loading => Err("still loading".into()),
        }
    }

    /// The model's facts, or why requests cannot be taken now.
    pub fn info(&self) -> Result<Arc<ModelInfo>, WorkerError> {
        match self.status() {
            LoadStatus::Ready(info) => Ok(info),
            LoadStatus::Loading => Err(WorkerError::Loading {
                model: self.name.clone(),
                retry_after_s: self.settings.retry_after_s,
            }),
            LoadStatus::Failed(reason) => Err(WorkerError::Unavailable {
                model: self.name.clone(),
                reason,
            }),
        }
    }

    pub fn queue_depth(&self) -> usize {
        self.queued.load(Ordering::SeqCst)
    }

    /// Requests admitted and not yet answered, queued or computing: what the pool balances
    /// replicas by.
    pub fn load(&self) -> usize {
        self.in_flight.load(Ordering::SeqCst)
    }

    pub fn stats(&self) -> &WorkerStats {
        &self.stats
    }

    /// Admits the task or refuses it at once. The returned receiver yields the result; dropping
    /// it tells the worker nobody wants the result any more.
    pub fn submit(
        &self,
        task: GenerationTask,
        request_id: &str,
    ) -> Result<oneshot::Receiver<Reply>, WorkerError> {
        self.submit_tracked(task, request_id, None)
    }

    /// `submit`, with the worker reporting the request's stage and denoising steps to
    /// `progress` as it goes.
    pub fn submit_tracked(
        &self,
        task: GenerationTask,
        request_id: &str,
        progress: Option<ProgressSender>,
    ) -> Result<oneshot::Receiver<Reply>, WorkerError> {
        self.info()?;
        let before = self.queued.fetch_add(1, Ordering::SeqCst);
        let slot = QueueSlot(self.queued.clone());
        if before >= self.settings.queue_size {
            drop(slot);
            WorkerStats::bump(&self.stats.rejected_queue_full);
            warn!(model = %self.name, queue_depth = before, "queue full, request refused");
            return Err(WorkerError::QueueFull {
                model: self.name.clone(),
                retry_after_s: self.settings.retry_after_s,
            });
        }
        let (reply, rx) = oneshot::channel();
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        let job = Queued {
            _in_flight: QueueSlot(self.in_flight.clone()),
            key: task.batch_key(),
            task,
            reply,
            admitted: Instant::now(),
            request_id: request_id.to_string(),
            slot: Some(slot),
            progress,
        };
        let sender = self.tx.lock().unwrap_or_else(|p| p.into_inner());
        let sent = sender.as_ref().is_some_and(|s| s.send(job).is_ok());
        if sent {
            Ok(rx)
        } else {
            Err(WorkerError::Stopped(self.name.clone()))
        }
    }

    /// Stops taking requests; the thread finishes everything already queued, then exits.
    pub fn close(&self) {
        self.tx.lock().unwrap_or_else(|p| p.into_inner()).take();
    }

    /// Closes the queue and waits for the thread to finish its work.
    pub fn shutdown(&self) {
        self.close();
        if let Some(t) = self.thread.lock().unwrap_or_else(|p| p.into_inner()).take() {
            let _ = t.join();
        }
    }
}

impl Drop for ModelWorker {
    fn drop(&mut self) {
        // Without a sender the thread's recv fails and it exits on its own; it is not joined
        // here so that dropping a server never blocks on a running batch.
        self.close();
    }
}

/// What the worker thread owns besides the model.
struct Inner {
    name: String,
    settings: WorkerSettings,
    queued: Arc<AtomicUsize>,
    stats: Arc<WorkerStats>,
    hook: Option<BatchHook>,
}

fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into())
}

impl Inner {
    fn run(
        self,
        spec: ModelSpec,
        load: LoadOptions,
        status: watch::Sender<LoadStatus>,
        rx: mpsc::Receiver<Queued>,
    ) {
        let started = Instant::now();
        info!(model = %spec.name, source = %spec.source, "loading model");
        let loaded = catch_unwind(AssertUnwindSafe(|| -> Result<DiffusionModel, String> {
            DiffusionModel::load_source(&spec.source, &load).map_err(|e| e.to_string())
        }))
        .unwrap_or_else(|p| {
            Err(format!(
                "panic while loading: {}",
                panic_message(p.as_ref())
            ))
        });
        let model = match loaded {
            Ok(m) => m,
            Err(e) => {
                error!(model = %spec.name, error = %e, "model failed to load");
                let _ = status.send(LoadStatus::Failed(e));
                return;
            }
        };
        let info = Arc::new(ModelInfo::from_model(&spec.name, &spec.source, &model));
        info!(
            model = %spec.name,
            architecture = ?info.architecture,
            load_ms = started.elapsed().as_millis() as u64,
            "model ready"
        );
        let _ = status.send(LoadStatus::Ready(info));
        self.serve(&model, rx);
        info!(model = %spec.name, "worker stopped");
    }

    fn drop_if_gone(&self, job: &Queued) -> bool {
        if job.client_gone() {
            WorkerStats::bump(&self.stats.dropped_disconnected);
            info!(model = %self.name, request_id = %job.request_id, "client disconnected while queued; dropped");
            true
        } else {
            false
        }
    }

    fn serve(&self, model: &DiffusionModel, rx: mpsc::Receiver<Queued>) {
        let max_batch = self.settings.max_batch;
        let mut pending: VecDeque<Queued> = VecDeque::new();
        let mut adapters = AdapterState::new(self.settings.adapter_cache);
        loop {
            while let Ok(job) = rx.try_recv() {
                pending.push_back(job);
            }
            // Earlier arrivals go first; block only when nothing is waiting. With the sender
            // closed (shutdown) the queue is drained before the loop ends.
            let first = match pending.pop_front() {
                Some(job) => job,
                None => match rx.recv() {
                    Ok(job) => job,
                    Err(_) => return,
                },
            };
            if self.drop_if_gone(&first) {
                continue;
            }
            let key = first.key.clone();
            let mut images = first.task.num_images();
            let mut batch = vec![first];
            let mut rest = VecDeque::with_capacity(pending.len());
            for job in pending.drain(..) {
                if self.drop_if_gone(&job) {
                    continue;
                }
                if max_batch > 1 && job.key == key && images + job.task.num_images() <= max_batch {
                    images += job.task.num_images();
                    batch.push(job);
                } else {
                    rest.push_back(job);
                }
            }
            pending = rest;
            // Requests that queued behind the previous batch are already here; the window only
            // helps the first of a burst find company.
            if max_batch > 1 && images < max_batch {
                let deadline = Instant::now() + self.settings.wait;
                while images < max_batch {
                    let now = Instant::now();
                    if now >= deadline {
                        break;
                    }
                    match rx.recv_timeout(deadline - now) {
                        Ok(job) => {
                            if self.drop_if_gone(&job) {
                                continue;
                            }
                            if job.key == key && images + job.task.num_images() <= max_batch {
                                images += job.task.num_images();
                                batch.push(job);
                            } else {
                                pending.push_back(job);
                            }
                        }
                        Err(RecvTimeoutError::Timeout) | Err(RecvTimeoutError::Disconnected) => {
                            break
                        }
                    }
                }
            }
            // A last look before spending compute on someone who left during the window.
            batch.retain(|job| !self.drop_if_gone(job));
            if batch.is_empty() {
                continue;
            }
            self.compute(model, batch, &mut adapters);
        }
    }

    fn compute(&self, model: &DiffusionModel, mut batch: Vec<Queued>, adapters: &mut AdapterState) {
        let images: usize = batch.iter().map(|j| j.task.num_images()).sum();
        let start = Instant::now();
        for job in &mut batch {
            job.slot = None; // computing, no longer queued
            if let Some(p) = &job.progress {
                p.send_modify(|p| {
                    p.stage = Stage::Denoising;
                    p.batch_size = images;
                    p.started = Some(start);
                });
            }
        }
        self.stats.record_batch(images);
        self.stats.computing.store(1, Ordering::SeqCst);
        let ids: Vec<&str> = batch.iter().map(|j| j.request_id.as_str()).collect();
        info!(
            model = %self.name,
            batch_size = images,
            requests = batch.len(),
            queue_depth = self.queued.load(Ordering::SeqCst),
            request_ids = ?ids,
            "batch start"
        );
        let result = {
            let tasks: Vec<&GenerationTask> = batch.iter().map(|j| &j.task).collect();
            let mut keep_going = |step: usize, steps: usize| {
                for p in batch.iter().filter_map(|j| j.progress.as_ref()) {
                    p.send_modify(|p| {
                        p.step = step;
                        p.steps = steps;
                    });
                }
                !batch.iter().all(Queued::client_gone)
            };
            catch_unwind(AssertUnwindSafe(|| {
                if let Some(hook) = &self.hook {
                    hook(&tasks);
                }
                adapters
                    .apply(tasks[0].adapter.as_ref(), model)
                    .map_err(WorkerError::Adapter)?;
                run_batch(model, &tasks, &mut keep_going).map_err(WorkerError::from)
            }))
        };
        let compute_ms = start.elapsed().as_secs_f64() * 1e3;
        self.stats
            .last_done_ms
            .store(super::stats::now_ms(), Ordering::SeqCst);
        self.stats.computing.store(0, Ordering::SeqCst);
        for p in batch.iter().filter_map(|j| j.progress.as_ref()) {
            p.send_modify(|p| p.stage = Stage::Finished);
        }
        let result = match result {
            Ok(r) => r,
            Err(payload) => {
                let msg = panic_message(payload.as_ref());
                error!(model = %self.name, panic = %msg, "worker panicked; the batch fails and the worker goes on");
                // The panic may have struck mid-attach: start the next batch from clean slots.
                adapters.reset(model);
                Err(WorkerError::Panicked(msg))
            }
        };
        match result {
            Ok(out) => {
                info!(model = %self.name, batch_size = images, compute_ms = compute_ms as u64, "batch done");
                metrics::histogram!("dspo_batch_size", "model" => self.name.clone()).record(images as f64);
                metrics::counter!("dspo_images_generated_total", "model" => self.name.clone())
                    .increment(images as u64);
                metrics::histogram!("dspo_batch_inference_duration_seconds", "model" => self.name.clone())
                    .record(compute_ms / 1e3);
                for ((job, imgs), warnings) in batch.into_iter().zip(out.images).zip(out.warnings) {
                    WorkerStats::bump(&self.stats.requests_computed);
                    self.stats
                        .images_computed
                        .fetch_add(imgs.len() as u64, Ordering::Relaxed);
                    let output = TaskOutput {
                        images: imgs,
                        warnings,
                        queue_ms: (start - job.admitted).as_secs_f64() * 1e3,
                        compute_ms,
                        batch_size: images,
                    };
                    let _ = job.reply.send(Ok(output));
                }
            }
            Err(e) => {
                if matches!(e, WorkerError::Cancelled) {
                    WorkerStats::bump(&self.stats.cancelled_in_compute);
                    info!(model = %self.name, "every client of the batch left; abandoned mid-denoising");
                } else {
                    WorkerStats::bump(&self.stats.failed_batches);
                    warn!(model = %self.name, error = %e, "batch failed");
                }
                for job in batch {
                    let _ = job.reply.send(Err(e.clone()));
                }
            }
        }
    }
}
