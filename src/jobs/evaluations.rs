//! Evaluation jobs (POST /evaluate): a queue run by one thread, persisted in SQLite
//! (`<data_dir>/evaluations.sqlite`), with progress, cancel and a restart that re-queues
//! unfinished work. What an evaluation does is the caller's runner (the server builds the
//! images with its model workers and scores them with its reward models); this module only
//! keeps its lifecycle, like the fine-tuning job manager does for training.

use super::types::JobErrorBody;
use crate::evaluation::run::{Outcome, Row};
use rusqlite::{params, Connection, OptionalExtension};
use serde::{Deserialize, Serialize};
use std::collections::{HashMap, VecDeque};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EvalStatus {
    Queued,
    Running,
    Completed,
    Failed,
    Cancelled,
}

impl EvalStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            EvalStatus::Queued => "queued",
            EvalStatus::Running => "running",
            EvalStatus::Completed => "completed",
            EvalStatus::Failed => "failed",
            EvalStatus::Cancelled => "cancelled",
        }
    }

    fn parse(s: &str) -> Self {
        match s {
            "running" => EvalStatus::Running,
            "completed" => EvalStatus::Completed,
            "failed" => EvalStatus::Failed,
            "cancelled" => EvalStatus::Cancelled,
            _ => EvalStatus::Queued,
        }
    }

    pub fn is_terminal(self) -> bool {
        matches!(self, EvalStatus::Completed | EvalStatus::Failed | EvalStatus::Cancelled)
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EvalRecord {
    pub id: String,
    pub status: EvalStatus,
    /// The request as submitted.
    pub spec: serde_json::Value,
    pub created_at: f64,
    pub updated_at: f64,
    /// Images generated and scored so far, of `total`.
    pub done: usize,
    pub total: usize,
    /// Per reward: win rates, intervals and means (see `evaluation::run::RewardResult`).
    pub result: Option<serde_json::Value>,
    pub error: Option<JobErrorBody>,
}

/// Runs one evaluation: its spec, and `progress(done, total)` that returns false to stop.
/// Ok(None) means it stopped because asked to.
pub type EvalRunner = Arc<
    dyn Fn(&serde_json::Value, &mut dyn FnMut(usize, usize) -> bool) -> Result<Option<Outcome>, JobErrorBody>
        + Send
        + Sync,
>;

pub struct EvaluationManager {
    conn: Mutex<Connection>,
    queue: Mutex<VecDeque<String>>,
    wake: Condvar,
    cancels: Mutex<HashMap<String, Arc<AtomicBool>>>,
    stop: AtomicBool,
    runner: EvalRunner,
}

fn now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

fn db(e: rusqlite::Error) -> String {
    format!("evaluation store: {e}")
}

fn record(r: &rusqlite::Row<'_>) -> rusqlite::Result<EvalRecord> {
    let spec: String = r.get(2)?;
    let result: Option<String> = r.get(7)?;
    let error: Option<String> = r.get(8)?;
    Ok(EvalRecord {
        id: r.get(0)?,
        status: EvalStatus::parse(&r.get::<_, String>(1)?),
        spec: serde_json::from_str(&spec).unwrap_or_default(),
        created_at: r.get(3)?,
        updated_at: r.get(4)?,
        done: r.get::<_, i64>(5)? as usize,
        total: r.get::<_, i64>(6)? as usize,
        result: result.and_then(|s| serde_json::from_str(&s).ok()),
        error: error.and_then(|s| serde_json::from_str(&s).ok()),
    })
}

const COLUMNS: &str = "id, status, spec, created_at, updated_at, done, total, result, error";

impl EvaluationManager {
    /// Opens (or creates) the store, re-queues unfinished evaluations and starts the thread.
    pub fn start(data_dir: &Path, runner: EvalRunner) -> Result<Arc<Self>, String> {
        std::fs::create_dir_all(data_dir).map_err(|e| format!("{}: {e}", data_dir.display()))?;
        let conn = Connection::open(data_dir.join("evaluations.sqlite")).map_err(db)?;
        conn.execute_batch(
            "PRAGMA journal_mode=WAL;
             CREATE TABLE IF NOT EXISTS evaluations (
               id TEXT PRIMARY KEY, status TEXT NOT NULL, spec TEXT NOT NULL,
               created_at REAL NOT NULL, updated_at REAL NOT NULL,
               done INTEGER NOT NULL, total INTEGER NOT NULL,
               result TEXT, error TEXT, rows TEXT, owner TEXT, job_id TEXT);",
        )
        .map_err(db)?;
        let m = Arc::new(Self {
            conn: Mutex::new(conn),
            queue: Mutex::new(VecDeque::new()),
            wake: Condvar::new(),
            cancels: Mutex::new(HashMap::new()),
            stop: AtomicBool::new(false),
            runner,
        });
        let unfinished: Vec<String> = m
            .list(None)?
            .into_iter()
            .filter(|e| !e.status.is_terminal())
            .map(|e| e.id)
            .collect();
        for id in unfinished {
            // Images are not kept between runs: an interrupted evaluation starts over.
            m.set_progress(&id, EvalStatus::Queued, 0)?;
            m.enqueue(&id);
        }
        let worker = m.clone();
        std::thread::Builder::new()
            .name("evaluations".into())
            .spawn(move || worker.run_worker())
            .map_err(|e| e.to_string())?;
        Ok(m)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Connection> {
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn enqueue(&self, id: &str) {
        self.cancels
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id.to_string(), Arc::new(AtomicBool::new(false)));
        self.queue.lock().unwrap_or_else(|p| p.into_inner()).push_back(id.to_string());
        self.wake.notify_one();
    }

    /// Records a queued evaluation of `total` images for `owner` (an API key id); `job_id` when
    /// it is a fine-tuning job's own evaluation.
    pub fn submit(
        &self,
        spec: serde_json::Value,
        total: usize,
        owner: Option<&str>,
        job_id: Option<&str>,
    ) -> Result<EvalRecord, String> {
        let id = uuid::Uuid::new_v4().to_string();
        let t = now();
        self.lock()
            .execute(
                "INSERT INTO evaluations (id, status, spec, created_at, updated_at, done, total, owner, job_id)
                 VALUES (?1, 'queued', ?2, ?3, ?3, 0, ?4, ?5, ?6)",
                params![id, spec.to_string(), t, total as i64, owner, job_id],
            )
            .map_err(db)?;
        self.enqueue(&id);
        self.get(&id)?.ok_or_else(|| "the evaluation vanished".into())
    }

    pub fn get(&self, id: &str) -> Result<Option<EvalRecord>, String> {
        self.lock()
            .query_row(
                &format!("SELECT {COLUMNS} FROM evaluations WHERE id = ?1"),
                params![id],
                record,
            )
            .optional()
            .map_err(db)
    }

    /// The evaluation a fine-tuning job submitted for its adapter, if any.
    pub fn of_job(&self, job_id: &str) -> Result<Option<EvalRecord>, String> {
        self.lock()
            .query_row(
                &format!("SELECT {COLUMNS} FROM evaluations WHERE job_id = ?1 ORDER BY created_at DESC"),
                params![job_id],
                record,
            )
            .optional()
            .map_err(db)
    }

    /// The API key id that submitted an evaluation (outer None: no such evaluation).
    pub fn owner(&self, id: &str) -> Result<Option<Option<String>>, String> {
        self.lock()
            .query_row("SELECT owner FROM evaluations WHERE id = ?1", params![id], |r| r.get(0))
            .optional()
            .map_err(db)
    }

    /// Evaluations, oldest first; with `owner`, only that key's and those without a key.
    pub fn list(&self, owner: Option<&str>) -> Result<Vec<EvalRecord>, String> {
        let conn = self.lock();
        let mut st = conn
            .prepare(&format!(
                "SELECT {COLUMNS} FROM evaluations WHERE ?1 IS NULL OR owner IS NULL OR owner = ?1 \
                 ORDER BY created_at"
            ))
            .map_err(db)?;
        let rows = st.query_map(params![owner], record).map_err(db)?;
        rows.collect::<rusqlite::Result<Vec<_>>>().map_err(db)
    }

    /// The per-image scores of a completed evaluation.
    pub fn rows(&self, id: &str) -> Result<Option<Vec<Row>>, String> {
        let text: Option<Option<String>> = self
            .lock()
            .query_row("SELECT rows FROM evaluations WHERE id = ?1", params![id], |r| r.get(0))
            .optional()
            .map_err(db)?;
        Ok(text.flatten().and_then(|t| serde_json::from_str(&t).ok()))
    }

    /// Cancels a queued or running evaluation (a running one stops after its current task).
    pub fn cancel(&self, id: &str) -> Result<Option<EvalRecord>, String> {
        let Some(rec) = self.get(id)? else {
            return Ok(None);
        };
        if rec.status.is_terminal() {
            return Ok(Some(rec));
        }
        if let Some(flag) = self.cancels.lock().unwrap_or_else(|p| p.into_inner()).get(id) {
            flag.store(true, Ordering::SeqCst);
        }
        let was_queued = {
            let mut q = self.queue.lock().unwrap_or_else(|p| p.into_inner());
            let before = q.len();
            q.retain(|j| j != id);
            before != q.len()
        };
        if was_queued {
            self.finish(id, EvalStatus::Cancelled, None, None)?;
        }
        self.get(id)
    }

    pub fn shutdown(&self) {
        self.stop.store(true, Ordering::SeqCst);
        for flag in self.cancels.lock().unwrap_or_else(|p| p.into_inner()).values() {
            flag.store(true, Ordering::SeqCst);
        }
        self.wake.notify_all();
    }

    fn set_progress(&self, id: &str, status: EvalStatus, done: usize) -> Result<(), String> {
        self.lock()
            .execute(
                "UPDATE evaluations SET status = ?2, done = ?3, updated_at = ?4 WHERE id = ?1",
                params![id, status.as_str(), done as i64, now()],
            )
            .map_err(db)?;
        Ok(())
    }

    fn finish(
        &self,
        id: &str,
        status: EvalStatus,
        outcome: Option<&Outcome>,
        error: Option<&JobErrorBody>,
    ) -> Result<(), String> {
        let result = outcome.map(|o| serde_json::to_string(&o.rewards).unwrap_or_default());
        let rows = outcome.map(|o| serde_json::to_string(&o.rows).unwrap_or_default());
        let error = error.map(|e| serde_json::to_string(e).unwrap_or_default());
        self.lock()
            .execute(
                "UPDATE evaluations SET status = ?2, result = ?3, rows = ?4, error = ?5, updated_at = ?6,
                 done = CASE WHEN ?2 = 'completed' THEN total ELSE done END WHERE id = ?1",
                params![id, status.as_str(), result, rows, error, now()],
            )
            .map_err(db)?;
        self.cancels.lock().unwrap_or_else(|p| p.into_inner()).remove(id);
        Ok(())
    }

    fn run_worker(&self) {
        loop {
            let id = {
                let mut q = self.queue.lock().unwrap_or_else(|p| p.into_inner());
                loop {
                    if self.stop.load(Ordering::SeqCst) {
                        return;
                    }
                    if let Some(id) = q.pop_front() {
                        break id;
                    }
                    q = self.wake.wait(q).unwrap_or_else(|p| p.into_inner());
                }
            };
            if let Err(e) = self.run_one(&id) {
                tracing::error!(evaluation = %id, "evaluation bookkeeping failed: {e}");
            }
        }
    }

    fn run_one(&self, id: &str) -> Result<(), String> {
        let Some(rec) = self.get(id)? else {
            return Ok(());
        };
        let flag = self
            .cancels
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(id)
            .cloned()
            .unwrap_or_default();
        self.set_progress(id, EvalStatus::Running, 0)?;
        tracing::info!(evaluation = %id, images = rec.total, "evaluation started");
        let mut last_write = std::time::Instant::now();
        let mut progress = |done: usize, _total: usize| {
            // Progress is written at most twice a second: SQLite writes are not free.
            if last_write.elapsed().as_millis() >= 500 {
                last_write = std::time::Instant::now();
                let _ = self.set_progress(id, EvalStatus::Running, done);
            }
            !flag.load(Ordering::SeqCst)
        };
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            (self.runner)(&rec.spec, &mut progress)
        }))
        .unwrap_or_else(|_| {
            Err(JobErrorBody {
                code: "internal_error".into(),
                message: "the evaluation panicked".into(),
            })
        });
        match outcome {
            Ok(Some(o)) => {
                tracing::info!(evaluation = %id, "evaluation completed");
                self.finish(id, EvalStatus::Completed, Some(&o), None)
            }
            // Shutting down (the model workers may already refuse work): left queued, it starts
            // over at the next start.
            Ok(None) | Err(_) if self.stop.load(Ordering::SeqCst) => {
                self.set_progress(id, EvalStatus::Queued, 0)
            }
            Ok(None) => self.finish(id, EvalStatus::Cancelled, None, None),
            Err(e) => {
                tracing::warn!(evaluation = %id, code = %e.code, "evaluation failed: {}", e.message);
                self.finish(id, EvalStatus::Failed, None, Some(&e))
            }
        }
    }
}
