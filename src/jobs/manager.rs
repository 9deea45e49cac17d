//! The job manager: a persistent queue of fine-tuning jobs run one at a time on a dedicated
//! thread, with progress events, cancellation, restart recovery and adapter registration.
//!
//! The HTTP layer only calls the methods here; training code knows nothing about jobs.

use super::fetch::{fetch_dataset, FetchConfig};
use super::sql::Engine;
use super::store::Store;
use super::types::{
    AdapterInfo, FinetuneDefaults, JobError, JobErrorBody, JobRecord, JobSpec, JobStatus, Progress,
    WebhookEvent,
};
use super::webhook;
use crate::adapters::{valid_name, AdapterDir};
use crate::training::trainer::Trainer;
use crate::training::{Hyperparameters, Method, StepMetrics, TrainConfig, TrainError};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// Resolves a request's `base_model` (None = the default) to (served name, local directory).
pub type ModelResolver = Arc<dyn Fn(Option<&str>) -> Option<(String, PathBuf)> + Send + Sync>;
/// True while inference requests are waiting or computing (or just finished): training then
/// pauses between steps.
pub type BusyProbe = Arc<dyn Fn() -> bool + Send + Sync>;

#[derive(Clone)]
pub struct JobsConfig {
    pub data_dir: PathBuf,
    pub fetch: FetchConfig,
    /// The `whsec_...` key webhooks are signed with; webhooks are refused without one.
    pub webhook_secret: Option<String>,
    pub webhook_retries: usize,
    /// Training-progress webhooks of one job come at most this often.
    pub webhook_progress_interval: Duration,
    /// Fine-tuning defaults per served model name; `default` for the rest.
    pub defaults: HashMap<String, FinetuneDefaults>,
    pub device: String,
    /// Empty: jobs in `<data_dir>/jobs.sqlite`. A `postgres://` URL: jobs in that database,
    /// shared by every replica given the same URL (and the same data directory, for
    /// checkpoints and adapters).
    pub database_url: String,
    /// How long a replica's claim on a running job holds without renewal (it renews every
    /// third of it); a job whose replica stopped renewing is taken over after this.
    pub lease: Duration,
    /// How often an idle replica looks for jobs queued elsewhere.
    pub poll: Duration,
    /// This server's id among replicas.
    pub replica: String,
    /// Data-parallel jobs: one rank per device (empty or one: `device` alone).
    pub devices: Vec<String>,
    /// The largest job a request may ask for: steps, pairs per optimiser step, LoRA rank.
    pub max_steps: usize,
    pub max_pairs_per_step: usize,
    pub max_lora_rank: usize,
    /// Queued or running jobs one API key may have (0: no limit).
    pub max_active_jobs_per_key: usize,
    /// Keep a finished job's dataset copy and checkpoints (for inspection); otherwise they are
    /// removed when it ends, and only the registered adapter and the job record remain.
    pub keep_job_files: bool,
}

impl JobsConfig {
    /// The job layer's settings from the server's configuration: dataset fetching, webhooks,
    /// the training device, and the fine-tuning defaults of each served model (`NAME`,
    /// `SOURCE` pairs): `[finetune]`, overridden by the `finetune` section of a local model
    /// directory's `dspo_server.json`.
    pub fn from_config(
        config: &crate::config::Config,
        served: &[(String, String)],
    ) -> Result<Self, JobError> {
        let invalid = |m: String| JobError::Invalid(m);
        let mut jc = JobsConfig::new(&config.server.data_dir);
        let d = &config.datasets;
        jc.fetch.allow_private_networks = d.allow_private_networks;
        jc.fetch.max_bytes = d.max_bytes;
        jc.fetch.timeout = Duration::from_secs(d.timeout_s);
        jc.fetch.file_roots = d.file_roots.clone();
        jc.webhook_secret = Some(config.jobs.webhook_secret.clone()).filter(|s| !s.is_empty());
        jc.webhook_retries = config.jobs.webhook_retries;
        jc.webhook_progress_interval =
            Duration::from_secs(config.jobs.webhook_progress_interval_secs);
        jc.device = config.models.device.clone();
        jc.devices = config.jobs.devices.clone();
        jc.database_url = config.jobs.database_url.clone();
        let lease = config.jobs.lease_secs;
        if !(lease > 0.0 && lease.is_finite()) {
            return Err(invalid(format!("jobs.lease_secs must be a positive number, got {lease}")));
        }
        jc.lease = Duration::from_secs_f64(lease);
        jc.max_steps = config.jobs.max_steps;
        jc.max_pairs_per_step = config.jobs.max_pairs_per_step;
        jc.max_lora_rank = config.jobs.max_lora_rank;
        jc.max_active_jobs_per_key = config.auth.max_active_jobs_per_key;
        jc.keep_job_files = config.jobs.keep_job_files;
        let f = &config.finetune;
        let method: crate::training::Method = f
            .method
            .parse()
            .map_err(|e: String| invalid(format!("finetune.method: {e}")))?;
        let defaults = FinetuneDefaults {
            method,
            hyperparameters: Hyperparameters {
                learning_rate: Some(f.learning_rate),
                max_steps: f.max_steps,
                batch_size: f.batch_size,
                gradient_accumulation_steps: f.gradient_accumulation_steps,
                warmup_steps: f.warmup_steps,
                checkpoint_every: f.checkpoint_every,
                ..Default::default()
            },
            lora: crate::training::lora::LoraSpec {
                rank: f.lora_rank,
                alpha: f.lora_alpha,
                ..Default::default()
            },
            by_method: Default::default(),
        };
        for (name, source) in served {
            let mut d = defaults.clone();
            if let crate::models::ModelSource::Local(dir) = crate::models::ModelSource::parse(source)
            {
                let own = crate::models::defaults::ModelDefaults::load(&dir)
                    .map_err(|e| invalid(e.to_string()))?;
                if let Some(f) = own.finetune {
                    d = d.merged(&f).map_err(|e| {
                        invalid(format!(
                            "{}: finetune: {e}",
                            dir.join(crate::models::defaults::FILE_NAME).display()
                        ))
                    })?;
                }
            }
            jc.defaults.insert(name.clone(), d);
        }
        Ok(jc)
    }

    pub fn new(data_dir: &Path) -> Self {
        Self {
            data_dir: data_dir.to_path_buf(),
            fetch: FetchConfig::default(),
            webhook_secret: None,
            webhook_retries: 5,
            webhook_progress_interval: Duration::from_secs(5),
            defaults: HashMap::new(),
            device: "cpu".into(),
            database_url: String::new(),
            lease: Duration::from_secs(30),
            poll: Duration::from_secs(1),
            replica: uuid::Uuid::new_v4().to_string(),
            devices: Vec::new(),
            max_steps: 100_000,
            max_pairs_per_step: 4096,
            max_lora_rank: 256,
            max_active_jobs_per_key: 0,
            keep_job_files: false,
        }
    }
    pub fn adapters(&self) -> AdapterDir {
        AdapterDir::in_data_dir(&self.data_dir)
    }
    fn defaults_for(&self, model: &str) -> FinetuneDefaults {
        self.defaults.get(model).cloned().unwrap_or_default()
    }
}

/// One message of GET /finetune/{id}/events.
#[derive(Debug, Clone, serde::Serialize)]
pub struct JobEvent {
    pub job_id: String,
    /// `status` (the whole job object) or `progress`.
    pub event: &'static str,
    pub data: serde_json::Value,
}

/// Wakes the worker early when this replica queued a job (it also polls the store, which is
/// where jobs queued by other replicas appear).
struct Wake {
    pending: Mutex<bool>,
    cv: Condvar,
}

pub struct JobManager {
    cfg: JobsConfig,
    store: Store,
    models: ModelResolver,
    busy: Option<BusyProbe>,
    wake: Wake,
    /// The cancel flag of the job this replica runs.
    cancels: Mutex<HashMap<String, Arc<AtomicBool>>>,
    events: tokio::sync::broadcast::Sender<JobEvent>,
    stop: AtomicBool,
    /// Held from the adapter-name check to the insert, so that two submissions cannot both
    /// take one name.
    submitting: Mutex<()>,
    /// None without a webhook secret (jobs with a webhook_url are then refused).
    webhooks: Option<webhook::Dispatcher>,
}

/// A file-system error: a full or read-only disk is a storage problem (503), anything else an
/// internal one.
fn storage_or_store(e: std::io::Error, what: &str) -> JobError {
    use std::io::ErrorKind::*;
    match e.kind() {
        StorageFull | ReadOnlyFilesystem | PermissionDenied | QuotaExceeded => {
            JobError::Storage(format!("{what}: {e}"))
        }
        _ => JobError::Store(format!("{what}: {e}")),
    }
}

fn err_body(code: &str, message: impl Into<String>) -> JobErrorBody {
    JobErrorBody {
        code: code.into(),
        message: message.into(),
    }
}

fn train_error_body(e: &TrainError) -> JobErrorBody {
    match e {
        TrainError::Dataset(m) => err_body("dataset_error", m.clone()),
        TrainError::Config(m) => err_body("invalid_job", m.clone()),
        TrainError::Checkpoint(m) => err_body("checkpoint_error", m.clone()),
        TrainError::Cancelled => err_body("cancelled", "cancelled"),
        TrainError::Drift(m) => err_body("drift_exceeded", m.clone()),
        other => err_body("training_error", other.to_string()),
    }
}

impl JobManager {
    /// Opens the store, re-queues what a previous process left unfinished (a lone server;
    /// replicas sharing a database leave that to the leases), starts the worker.
    pub fn start(
        cfg: JobsConfig,
        models: ModelResolver,
        busy: Option<BusyProbe>,
    ) -> Result<Arc<Self>, JobError> {
        let store = if cfg.database_url.is_empty() {
            Store::open(&cfg.data_dir.join("jobs.sqlite"))?
        } else {
            Store::connect(&cfg.database_url)?
        };
        let (events, _) = tokio::sync::broadcast::channel(1024);
        let webhooks = match &cfg.webhook_secret {
            Some(s) => {
                let secret = webhook::WebhookSecret::parse(s)
                    .map_err(|e| JobError::Invalid(format!("jobs.webhook_secret: {e}")))?;
                Some(webhook::Dispatcher::start(
                    secret,
                    cfg.webhook_retries,
                    cfg.fetch.allow_private_networks,
                ))
            }
            None => None,
        };
        let m = Arc::new(Self {
            cfg,
            store,
            models,
            busy,
            wake: Wake {
                pending: Mutex::new(false),
                cv: Condvar::new(),
            },
            cancels: Mutex::new(HashMap::new()),
            events,
            stop: AtomicBool::new(false),
            submitting: Mutex::new(()),
            webhooks,
        });
        if m.store.engine() == Engine::Sqlite {
            // Unfinished work resumes: downloads restart, training continues from its newest
            // checkpoint (the trainer finds it in the job's output directory).
            match m.store.requeue_unfinished() {
                Ok(ids) => {
                    for id in ids {
                        tracing::info!(job = %id, "re-queued after restart");
                    }
                }
                // Read-only storage: the jobs stay as recorded; they resume once the
                // directory takes writes and the server restarts.
                Err(e) => tracing::warn!("cannot re-queue unfinished jobs: {e}"),
            }
        }
        let worker = m.clone();
        std::thread::Builder::new()
            .name("finetune-jobs".into())
            .spawn(move || worker.run_worker())
            .map_err(|e| JobError::Store(e.to_string()))?;
        Ok(m)
    }

    /// Stops taking new jobs after the current one (the running job is cancelled and stays
    /// resumable: it is re-queued at the next start).
    pub fn shutdown(&self) {
        self.stop.store(true, Ordering::SeqCst);
        for flag in self.cancels.lock().unwrap().values() {
            flag.store(true, Ordering::SeqCst);
        }
        self.wake.cv.notify_all();
    }

    /// Tells the worker a job was queued here, so it claims it without waiting for its poll.
    fn wake_worker(&self) {
        *self.wake.pending.lock().unwrap() = true;
        self.wake.cv.notify_one();
    }

    /// This server's id among replicas sharing a job database (in /health and in a running
    /// job's record).
    pub fn replica(&self) -> &str {
        &self.cfg.replica
    }

    /// Whether other replicas may run this store's jobs (a shared database): their progress
    /// reaches this one through the store, not through its own events.
    pub fn shared(&self) -> bool {
        self.store.engine() == Engine::Postgres
    }

    pub fn subscribe(&self) -> tokio::sync::broadcast::Receiver<JobEvent> {
        self.events.subscribe()
    }

    fn emit_status(&self, id: &str) {
        if let Ok(Some(job)) = self.store.get(id) {
            let _ = self.events.send(JobEvent {
                job_id: id.to_string(),
                event: "status",
                data: serde_json::to_value(&job).unwrap_or_default(),
            });
        }
    }

    /// Merged hyperparameters: the model's defaults (its per-method ones over its general
    /// ones), then the request's fields.
    fn hyperparameters(&self, model: &str, spec: &JobSpec) -> Result<Hyperparameters, JobError> {
        let defaults = self
            .cfg
            .defaults_for(model)
            .hyperparameters_for(spec.method.name())
            .map_err(JobError::Invalid)?;
        let mut base = serde_json::to_value(&defaults).unwrap_or_default();
        if let Some(h) = &spec.hyperparameters {
            let obj = h
                .as_object()
                .ok_or_else(|| JobError::Invalid("hyperparameters must be an object".into()))?;
            for (k, v) in obj {
                if base.get(k).is_none() {
                    return Err(JobError::Invalid(format!("unknown hyperparameter '{k}'")));
                }
                base[k] = v.clone();
            }
        }
        serde_json::from_value(base).map_err(|e| JobError::Invalid(format!("hyperparameters: {e}")))
    }

    fn train_config(
        &self,
        id: &str,
        spec: &JobSpec,
        dataset: PathBuf,
    ) -> Result<TrainConfig, JobError> {
        let (name, dir) = (self.models)(spec.base_model.as_deref()).ok_or_else(|| {
            JobError::Invalid(format!("unknown base_model {:?}", spec.base_model))
        })?;
        let defaults = self.cfg.defaults_for(&name);
        Ok(TrainConfig {
            model: dir.display().to_string(),
            dataset,
            output_dir: self.job_dir(id).join("train"),
            method: spec.method,
            lora: if spec.full_finetune {
                None
            } else {
                Some(spec.lora.clone().unwrap_or_default().over(&defaults.lora))
            },
            full_finetune: spec.full_finetune,
            hyperparameters: self.hyperparameters(&name, spec)?,
            device: self.cfg.device.clone(),
            devices: self.cfg.devices.clone(),
            mode: Default::default(),
            pretrain: Default::default(),
        })
    }

    fn job_dir(&self, id: &str) -> PathBuf {
        self.cfg.data_dir.join("jobs").join(id)
    }

    /// The method a job on `base_model` trains with when its request names none: the model's
    /// own default (its `dspo_server.json`), else the server's `[finetune] method`.
    pub fn default_method(&self, base_model: Option<&str>) -> Method {
        let name = (self.models)(base_model).map(|(n, _)| n).unwrap_or_default();
        self.cfg.defaults_for(&name).method
    }

    /// Validates and queues a job. Errors here are the client's (422 / 404).
    pub fn submit(&self, spec: JobSpec) -> Result<JobRecord, JobError> {
        self.submit_as(spec, None)
    }

    /// [`submit`](Self::submit) on behalf of an API key (its id), which then owns the job and
    /// counts it against `max_active_jobs_per_key`.
    pub fn submit_as(&self, mut spec: JobSpec, owner: Option<&str>) -> Result<JobRecord, JobError> {
        let (model_name, _) = (self.models)(spec.base_model.as_deref()).ok_or_else(|| {
            JobError::Invalid(format!("unknown base_model {:?}", spec.base_model))
        })?;
        spec.base_model = Some(model_name.clone());
        let url = spec.dataset_url.trim();
        if !["http://", "https://", "hf://datasets/", "file://"]
            .iter()
            .any(|p| url.starts_with(p))
        {
            return Err(JobError::Invalid(format!(
                "dataset_url must start with http://, https://, hf://datasets/ or file://, got {url:?}"
            )));
        }
        if url.starts_with("file://") {
            super::fetch::file_url_path(url, &self.cfg.fetch)?;
        }
        if spec.full_finetune {
            return Err(JobError::Invalid(
                "full fine-tuning jobs are not served (their result is a whole UNet, not an adapter); use `dspo-server train` with full_finetune = true".into(),
            ));
        }
        if let Some(w) = &spec.webhook_url {
            if !(w.starts_with("http://") || w.starts_with("https://")) {
                return Err(JobError::Invalid(
                    "webhook_url must be an http(s) URL".into(),
                ));
            }
            if self.webhooks.is_none() {
                return Err(JobError::Invalid(
                    "this server has no webhook secret configured (jobs.webhook_secret)".into(),
                ));
            }
        }
        if spec.webhook_events_filter.as_ref().is_some_and(|f| f.is_empty()) {
            return Err(JobError::Invalid(
                "webhook_events_filter is empty; leave it out for [\"completed\"]".into(),
            ));
        }
        let id = uuid::Uuid::new_v4().to_string();
        let name = match &spec.adapter_name {
            Some(n) => n.clone(),
            None => format!("{}-{}", spec.method.name(), &id[..8]),
        };
        if !valid_name(&name) {
            return Err(JobError::Invalid(format!(
                "adapter_name {name:?}: use 1-64 characters of letters, digits, '-', '_' and '.'"
            )));
        }
        let _reserving = self.submitting.lock().unwrap_or_else(|e| e.into_inner());
        self.check_name_free(&name)?;
        if let Some(o) = owner.filter(|_| self.cfg.max_active_jobs_per_key > 0) {
            let active = self.store.active_jobs_of(o)?;
            if active >= self.cfg.max_active_jobs_per_key {
                return Err(JobError::TooManyJobs(format!(
                    "this key has {active} jobs queued or running, the most it may \
                     (auth.max_active_jobs_per_key); submit again when one has ended"
                )));
            }
        }
        spec.adapter_name = Some(name);
        // Validate the whole training config now, so a typo fails the request, not the job.
        let cfg = self.train_config(&id, &spec, PathBuf::from("<dataset>"))?;
        cfg.validate()
            .map_err(|e| JobError::Invalid(e.to_string()))?;
        let h = &cfg.hyperparameters;
        let over = |what: &str, got: usize, max: usize, key: &str| {
            JobError::Invalid(format!(
                "{what} is {got}; this server takes at most {max} (jobs.{key})"
            ))
        };
        if h.max_steps > self.cfg.max_steps {
            return Err(over("max_steps", h.max_steps, self.cfg.max_steps, "max_steps"));
        }
        let pairs = h.batch_size.saturating_mul(h.gradient_accumulation_steps);
        if pairs > self.cfg.max_pairs_per_step {
            return Err(over(
                "batch_size x gradient_accumulation_steps",
                pairs,
                self.cfg.max_pairs_per_step,
                "max_pairs_per_step",
            ));
        }
        if let Some(l) = cfg.lora.as_ref().filter(|l| l.rank > self.cfg.max_lora_rank) {
            return Err(over("lora rank", l.rank, self.cfg.max_lora_rank, "max_lora_rank"));
        }
        if let Some(l) = &cfg.lora {
            l.validate().map_err(JobError::Invalid)?;
            // A typo in a target is a 422 now rather than a job failing after its download.
            // Only for a local diffusers UNet (a hub model is not here yet); the trainer checks
            // again against its Linear layers.
            let unet = Path::new(&cfg.model).join("unet");
            if let Ok(modules) = crate::models::unet::UNet2DConditionModel::module_names(&unet) {
                let bad = crate::training::lora::unmatched_targets(&modules, &l.target_modules);
                if !bad.is_empty() {
                    return Err(JobError::Invalid(format!(
                        "lora target_modules {bad:?} match no module of the base model's UNet"
                    )));
                }
            }
        }
        // The record as submitted (queued), returned by the insert itself: read afterwards, a
        // worker claiming the job in between made it "downloading" in the reply to the POST.
        let record = self.store.insert(&id, &spec, owner)?;
        self.emit_status(&id);
        self.wake_worker();
        Ok(record)
    }

    pub fn get(&self, id: &str) -> Result<JobRecord, JobError> {
        self.store
            .get(id)?
            .ok_or_else(|| JobError::NotFound(id.to_string()))
    }

    pub fn list(&self, status: Option<JobStatus>) -> Result<Vec<JobRecord>, JobError> {
        self.store.list(status)
    }

    /// Jobs `owner` may see (see [`Store::list_visible`]).
    pub fn list_visible(
        &self,
        status: Option<JobStatus>,
        owner: Option<&str>,
    ) -> Result<Vec<JobRecord>, JobError> {
        self.store.list_visible(status, owner)
    }

    /// A name is taken by a registered adapter, by whatever holds its directory, and by a
    /// queued or running job that will register it (else the second job's adapter would
    /// silently replace the first's). Names compare without case, as they would on a
    /// case-insensitive filesystem. Callers hold `submitting`.
    fn check_name_free(&self, name: &str) -> Result<(), JobError> {
        let mut pending = false;
        for status in [JobStatus::Queued, JobStatus::Downloading, JobStatus::Training] {
            pending |= self.store.list(Some(status))?.iter().any(|j| {
                j.spec.adapter_name.as_deref().is_some_and(|n| n.eq_ignore_ascii_case(name))
            });
        }
        if pending
            || self.store.adapters()?.iter().any(|a| a.name.eq_ignore_ascii_case(name))
            || self.cfg.adapters().taken(name)
        {
            return Err(JobError::AdapterExists(name.to_string()));
        }
        Ok(())
    }

    /// Registers an uploaded LoRA file (already checked against `base_model` by the caller)
    /// under `name`, owned by `owner`. The file appears complete or not at all.
    pub fn upload_adapter(
        &self,
        name: &str,
        base_model: &str,
        bytes: &[u8],
        owner: Option<&str>,
    ) -> Result<AdapterInfo, JobError> {
        if !valid_name(name) {
            return Err(JobError::Invalid(format!(
                "adapter name {name:?}: use 1-64 characters of letters, digits, '-', '_' and '.'"
            )));
        }
        let _reserving = self.submitting.lock().unwrap_or_else(|e| e.into_inner());
        self.check_name_free(name)?;
        let staging = self.cfg.data_dir.join(format!(".upload-{}", uuid::Uuid::new_v4()));
        let written = std::fs::write(&staging, bytes)
            .and_then(|()| self.cfg.adapters().install(name, &staging));
        let _ = std::fs::remove_file(&staging);
        written.map_err(|e| storage_or_store(e, "storing the uploaded adapter"))?;
        let info = AdapterInfo {
            name: name.to_string(),
            base_model: base_model.to_string(),
            method: "uploaded".into(),
            hyperparameters: serde_json::json!({}),
            final_metrics: None,
            job_id: None,
            created_at: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs_f64())
                .unwrap_or(0.0),
        };
        match self.store.register_uploaded_adapter(&info, owner) {
            Ok(true) => Ok(info),
            Ok(false) => Err(JobError::AdapterExists(name.to_string())),
            Err(e) => {
                let _ = self.cfg.adapters().remove(name);
                Err(e)
            }
        }
    }

    /// The API key id whose job or upload made an adapter (None: made without keys).
    pub fn adapter_owner(&self, name: &str) -> Result<Option<String>, JobError> {
        let a = self
            .store
            .adapters()?
            .into_iter()
            .find(|a| a.name == name)
            .ok_or_else(|| JobError::AdapterNotFound(name.to_string()))?;
        Ok(match a.job_id {
            Some(j) => self.store.owner(&j)?.flatten(),
            None => self.store.adapter_uploader(name)?,
        })
    }

    /// How many jobs are in each state (every state listed, zeros included).
    pub fn count_by_status(&self) -> Result<Vec<(&'static str, usize)>, JobError> {
        let counts = self.store.count_by_status()?;
        Ok([
            JobStatus::Queued,
            JobStatus::Downloading,
            JobStatus::Training,
            JobStatus::Completed,
            JobStatus::Failed,
            JobStatus::Cancelled,
        ]
        .into_iter()
        .map(|s| (s.as_str(), counts.get(s.as_str()).copied().unwrap_or(0)))
        .collect())
    }

    /// The API key id that submitted a job (None: submitted without keys).
    pub fn owner(&self, id: &str) -> Result<Option<String>, JobError> {
        self.store
            .owner(id)?
            .ok_or_else(|| JobError::NotFound(id.to_string()))
    }

    pub fn metrics(&self, id: &str) -> Result<Vec<StepMetrics>, JobError> {
        self.get(id)?;
        self.store.metrics(id)
    }

    /// Cancels this job and no other. A queued job ends at once; a running one at its next
    /// step boundary (or download chunk). Ended jobs are returned unchanged.
    pub fn cancel(&self, id: &str) -> Result<JobRecord, JobError> {
        let job = self.get(id)?;
        if job.status.is_terminal() {
            return Ok(job);
        }
        if self.store.cancel_if_queued(id)? {
            // No replica had claimed it: it ends here.
            self.finish(id, JobStatus::Cancelled, None);
            return self.get(id);
        }
        // Running: here (its flag), or on another replica, which sees the request when it
        // renews its lease.
        if let Some(flag) = self.cancels.lock().unwrap().get(id) {
            flag.store(true, Ordering::SeqCst);
        }
        self.store.request_cancel(id)?;
        self.get(id)
    }

    /// Registered adapters, then files placed in the adapters directory by hand (they serve
    /// requests too; listed with method "file" and the file's modification time).
    pub fn adapters(&self) -> Result<Vec<AdapterInfo>, JobError> {
        let mut out = self.store.adapters()?;
        let dir = self.cfg.adapters();
        for name in dir.names() {
            if out.iter().any(|a| a.name == name) {
                continue;
            }
            let created_at = std::fs::metadata(dir.weights(&name))
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                .map(|d| d.as_secs_f64())
                .unwrap_or(0.0);
            out.push(AdapterInfo {
                name,
                base_model: String::new(),
                method: "file".into(),
                hyperparameters: serde_json::json!({}),
                final_metrics: None,
                job_id: None,
                created_at,
            });
        }
        Ok(out)
    }

    pub fn adapter_file(&self, name: &str) -> Result<PathBuf, JobError> {
        self.cfg
            .adapters()
            .find(name)
            .ok_or_else(|| JobError::AdapterNotFound(name.to_string()))
    }

    pub fn delete_adapter(&self, name: &str) -> Result<(), JobError> {
        self.adapter_file(name)?;
        self.store.delete_adapter(name)?;
        self.cfg
            .adapters()
            .remove(name)
            .map_err(|e| storage_or_store(e, "removing the adapter's files"))?;
        Ok(())
    }

    /// Whether the data directory takes writes now (what /ready reports): a few bytes written,
    /// synced and removed, so a full disk shows as well as a read-only one.
    pub fn storage_writable(&self) -> Result<(), String> {
        use std::io::Write;
        let probe = self.cfg.data_dir.join(".write-probe");
        let result = std::fs::File::create(&probe)
            .and_then(|mut f| f.write_all(b"probe").and_then(|_| f.sync_all()));
        let _ = std::fs::remove_file(&probe);
        result.map_err(|e| format!("{}: {e}", self.cfg.data_dir.display()))
    }

    fn finish(&self, id: &str, status: JobStatus, error: Option<JobErrorBody>) {
        // A finished job's dataset copy and checkpoints are only needed to resume it: removed
        // first, which is also what frees the space when the job failed on a full disk, so
        // that its final state can be recorded.
        if !self.cfg.keep_job_files {
            let dir = self.job_dir(id);
            if let Err(e) = std::fs::remove_dir_all(&dir) {
                if e.kind() != std::io::ErrorKind::NotFound {
                    tracing::warn!(job = id, "removing {}: {e}", dir.display());
                }
            }
        }
        if let Err(e) = self.store.set_status(id, status, error.as_ref()) {
            tracing::error!(job = id, "persisting job state: {e}");
        }
        self.cancels.lock().unwrap().remove(id);
        self.emit_status(id);
        self.webhook(id, WebhookEvent::Completed);
    }

    /// Sends a webhook about a job if it has a URL and its filter takes the event.
    fn webhook(&self, id: &str, event: WebhookEvent) {
        let Some(dispatcher) = &self.webhooks else { return };
        let Ok(job) = self.get(id) else { return };
        let wanted = match &job.spec.webhook_events_filter {
            Some(f) => f.contains(&event),
            None => event == WebhookEvent::Completed,
        };
        if let (Some(url), true) = (&job.spec.webhook_url, wanted) {
            dispatcher.send(url, event, &job);
        }
    }

    /// The next job to run: claimed from the store, which is where every replica's queued
    /// jobs and the jobs of dead replicas are. None once the manager stops.
    fn next_job(&self) -> Option<String> {
        // A store that cannot be written (a read-only disk) fails every poll: said once a
        // minute, not every second.
        let mut warned: Option<Instant> = None;
        loop {
            if self.stop.load(Ordering::SeqCst) {
                return None;
            }
            match self.store.claim(&self.cfg.replica, self.cfg.lease.as_secs_f64()) {
                Ok(Some(id)) => return Some(id),
                Ok(None) => {}
                Err(e) => {
                    if warned.is_none_or(|t| t.elapsed() >= Duration::from_secs(60)) {
                        tracing::warn!("claiming a job: {e}");
                        warned = Some(Instant::now());
                    }
                }
            }
            let mut pending = self.wake.pending.lock().unwrap();
            if !*pending {
                pending = self
                    .wake
                    .cv
                    .wait_timeout(pending, self.cfg.poll)
                    .unwrap()
                    .0;
            }
            *pending = false;
        }
    }

    /// Renews the lease on `id` every third of its length until `done`; raises `cancel` when
    /// someone asks for the job to be cancelled, and `lost` too when another replica has taken
    /// the job over (this one was taken for dead, e.g. paused past its lease).
    fn hold_lease(&self, id: &str, done: &AtomicBool, cancel: &AtomicBool, lost: &AtomicBool) {
        let every = self.cfg.lease / 3;
        let mut last = Instant::now();
        while !done.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(50).min(every));
            if last.elapsed() < every {
                continue;
            }
            last = Instant::now();
            match self.store.renew(id, &self.cfg.replica, self.cfg.lease.as_secs_f64()) {
                Ok(lease) => {
                    if lease.cancel_requested {
                        cancel.store(true, Ordering::SeqCst);
                    }
                    if !lease.held && !done.load(Ordering::SeqCst) {
                        lost.store(true, Ordering::SeqCst);
                        cancel.store(true, Ordering::SeqCst);
                        return;
                    }
                }
                Err(e) => tracing::warn!(job = id, "renewing the job's lease: {e}"),
            }
        }
    }

    fn run_worker(self: Arc<Self>) {
        while let Some(id) = self.next_job() {
            let flag = Arc::new(AtomicBool::new(false));
            self.cancels
                .lock()
                .unwrap()
                .insert(id.clone(), flag.clone());
            let (done, lost) = (AtomicBool::new(false), AtomicBool::new(false));
            let outcome = std::thread::scope(|s| {
                s.spawn(|| self.hold_lease(&id, &done, &flag, &lost));
                // A panic in training must fail this job, not the worker.
                let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    self.run_job(&id, &flag)
                }));
                done.store(true, Ordering::SeqCst);
                outcome
            });
            if lost.load(Ordering::SeqCst) {
                tracing::warn!(job = %id, "another replica took the job over; stopped here");
                self.cancels.lock().unwrap().remove(&id);
                continue;
            }
            match outcome {
                Ok(Ok(())) => {}
                Ok(Err((status, body))) => {
                    if self.stop.load(Ordering::SeqCst) && status == JobStatus::Cancelled {
                        // Shutdown interrupted it: back in the queue, resumable here at the
                        // next start or at once by another replica.
                        let _ = self.store.release(&id, &self.cfg.replica);
                        self.cancels.lock().unwrap().remove(&id);
                    } else {
                        self.finish(&id, status, body);
                    }
                }
                Err(_) => self.finish(
                    &id,
                    JobStatus::Failed,
                    Some(err_body("internal_error", "the training thread panicked")),
                ),
            }
        }
    }

    fn run_job(
        &self,
        id: &str,
        cancel: &AtomicBool,
    ) -> Result<(), (JobStatus, Option<JobErrorBody>)> {
        let fail = |b: JobErrorBody| (JobStatus::Failed, Some(b));
        let job = self
            .get(id)
            .map_err(|e| fail(err_body("internal_error", e.to_string())))?;
        let spec = job.spec.clone();
        let cancelled = || (JobStatus::Cancelled, None);

        self.store
            .set_status(id, JobStatus::Downloading, None)
            .map_err(|e| fail(err_body("internal_error", e.to_string())))?;
        self.emit_status(id);
        self.webhook(id, WebhookEvent::Start);
        let mut last_emit = Instant::now() - Duration::from_secs(1);
        let dataset = fetch_dataset(
            &spec.dataset_url,
            &self.job_dir(id).join("dataset"),
            &self.cfg.fetch,
            &mut |n, total| {
                if last_emit.elapsed() >= Duration::from_millis(500) {
                    last_emit = Instant::now();
                    let p = Progress {
                        downloaded_bytes: Some(n),
                        total_bytes: total,
                        ..Default::default()
                    };
                    let _ = self.store.set_progress(id, &p);
                    let _ = self.events.send(JobEvent {
                        job_id: id.into(),
                        event: "progress",
                        data: serde_json::to_value(&p).unwrap_or_default(),
                    });
                }
                !cancel.load(Ordering::SeqCst)
            },
        );
        if cancel.load(Ordering::SeqCst) {
            return Err(cancelled());
        }
        let dataset = dataset.map_err(|e| fail(err_body(e.code(), e.to_string())))?;

        let cfg = self
            .train_config(id, &spec, dataset)
            .map_err(|e| fail(err_body(e.code(), e.to_string())))?;
        let mut trainer = Trainer::new(cfg.clone()).map_err(|e| fail(train_error_body(&e)))?;
        let stats = serde_json::to_value(trainer.dataset_stats()).unwrap_or_default();
        let _ = self.store.set_dataset_stats(id, &stats);
        let _ = self.store.truncate_metrics(id, trainer.step());
        self.store
            .set_status(id, JobStatus::Training, None)
            .map_err(|e| fail(err_body("internal_error", e.to_string())))?;
        self.emit_status(id);

        let started = Instant::now();
        let first = trainer.step();
        let mut last_emit = Instant::now() - Duration::from_secs(1);
        let mut last_hook: Option<Instant> = None;
        let result = trainer.run(&mut |m| {
            let done = (m.step - first).max(1) as f64;
            let eta = started.elapsed().as_secs_f64() / done * (m.total_steps - m.step) as f64;
            let p = Progress {
                step: m.step,
                total_steps: m.total_steps,
                loss: Some(m.loss),
                implicit_accuracy: m.implicit_accuracy,
                eta_seconds: Some(eta),
                ..Default::default()
            };
            metrics::counter!("dspo_finetune_steps_total").increment(1);
            if let Err(e) = self.store.record_step(id, m, &p) {
                tracing::error!(job = id, "recording metrics: {e}");
            }
            if last_emit.elapsed() >= Duration::from_millis(500) || m.step == m.total_steps {
                last_emit = Instant::now();
                let _ = self.events.send(JobEvent {
                    job_id: id.into(),
                    event: "progress",
                    data: serde_json::to_value(&p).unwrap_or_default(),
                });
            }
            if last_hook.is_none_or(|t| t.elapsed() >= self.cfg.webhook_progress_interval) {
                last_hook = Some(Instant::now());
                self.webhook(id, WebhookEvent::Progress);
            }
            // Inference first: wait (bounded) while requests are queued.
            if let Some(busy) = &self.busy {
                let t0 = Instant::now();
                while busy()
                    && t0.elapsed() < Duration::from_secs(5)
                    && !cancel.load(Ordering::SeqCst)
                {
                    std::thread::sleep(Duration::from_millis(5));
                }
            }
            !cancel.load(Ordering::SeqCst)
        });
        let outcome = match result {
            Ok(o) => o,
            Err(TrainError::Cancelled) => return Err(cancelled()),
            Err(e @ TrainError::Drift(_)) => {
                // The step that passed the limit is in the history too, with its drift.
                if let Some(m) = trainer.metrics.last() {
                    let p = Progress {
                        step: m.step,
                        total_steps: m.total_steps,
                        loss: Some(m.loss),
                        implicit_accuracy: m.implicit_accuracy,
                        ..Default::default()
                    };
                    let _ = self.store.record_step(id, m, &p);
                }
                return Err(fail(train_error_body(&e)));
            }
            Err(e) => return Err(fail(train_error_body(&e))),
        };
        let _ = self.store.set_dataset_stats(
            id,
            &serde_json::to_value(&outcome.dataset).unwrap_or_default(),
        );

        // Register the adapter: copy into the adapters directory, visible only once complete.
        let name = spec.adapter_name.clone().unwrap_or_else(|| id.to_string());
        let io =
            |e: std::io::Error| fail(err_body("internal_error", format!("saving adapter: {e}")));
        self.cfg
            .adapters()
            .install(&name, &outcome.artifact)
            .map_err(io)?;
        let mean = |f: &dyn Fn(&StepMetrics) -> Option<f64>| outcome.mean_of_last(10, f);
        let info = AdapterInfo {
            name: name.clone(),
            base_model: spec.base_model.clone().unwrap_or_default(),
            method: spec.method.name().to_string(),
            hyperparameters: serde_json::to_value(&cfg.hyperparameters).unwrap_or_default(),
            final_metrics: Some(serde_json::json!({
                "steps": outcome.metrics.len(),
                "loss_mean_last10": mean(&|m| Some(m.loss)),
                "implicit_accuracy_mean_last10": mean(&|m| m.implicit_accuracy),
                "anchor_mse_mean_last10": mean(&|m| m.anchor_mse),
            })),
            job_id: Some(id.to_string()),
            created_at: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs_f64())
                .unwrap_or(0.0),
        };
        self.store
            .register_adapter(&info)
            .map_err(|e| fail(err_body("internal_error", e.to_string())))?;
        let _ = self.store.set_adapter(id, &name);
        self.finish(id, JobStatus::Completed, None);
        Ok(())
    }
}
