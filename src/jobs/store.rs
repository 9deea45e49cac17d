//! Jobs, their metrics history and the adapter registry, persisted in SQLite under the data
//! directory. Every state change is one transaction, so a kill -9 leaves a consistent file.

use super::types::{AdapterInfo, JobError, JobErrorBody, JobRecord, JobSpec, JobStatus, Progress};
use crate::training::StepMetrics;
use rusqlite::{params, Connection, OptionalExtension};
use std::path::Path;
use std::sync::Mutex;

pub struct Store {
    conn: Mutex<Connection>,
}

fn now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

fn db(e: rusqlite::Error) -> JobError {
    use rusqlite::ErrorCode::*;
    match e.sqlite_error_code() {
        Some(DiskFull | ReadOnly | CannotOpen | SystemIoFailure | PermissionDenied) => {
            JobError::Storage(format!("the job database cannot be written: {e}"))
        }
        _ => JobError::Store(e.to_string()),
    }
}

impl Store {
    pub fn open(path: &Path) -> Result<Self, JobError> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)
                .map_err(|e| JobError::Store(format!("{}: {e}", dir.display())))?;
        }
        let conn = match Connection::open(path).map_err(db).and_then(|c| Self::prepare(c)) {
            Ok(c) => c,
            // A read-only (or full) data directory holding a database: serve what it records,
            // read-only, so the server runs and reports the storage problem per request and
            // on /ready instead of refusing to start.
            Err(JobError::Storage(why)) if path.exists() => {
                tracing::warn!("{why}; opening {} read-only", path.display());
                let uri = format!(
                    "file:{}?immutable=1",
                    path.display().to_string().replace('%', "%25").replace('?', "%3f").replace('#', "%23")
                );
                Connection::open_with_flags(
                    uri,
                    rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_URI,
                )
                .map_err(db)?
            }
            Err(e) => return Err(e),
        };
        Ok(Self {
            conn: Mutex::new(conn),
        })
    }

    /// The schema, on a connection that can write.
    fn prepare(conn: Connection) -> Result<Connection, JobError> {
        conn.execute_batch(
            "PRAGMA journal_mode=WAL;
             PRAGMA synchronous=NORMAL;
             CREATE TABLE IF NOT EXISTS jobs (
               id TEXT PRIMARY KEY,
               status TEXT NOT NULL,
               spec TEXT NOT NULL,
               created_at REAL NOT NULL,
               updated_at REAL NOT NULL,
               progress TEXT,
               error TEXT,
               adapter TEXT,
               dataset_stats TEXT
             );
             CREATE TABLE IF NOT EXISTS metrics (
               job_id TEXT NOT NULL,
               step INTEGER NOT NULL,
               data TEXT NOT NULL,
               PRIMARY KEY (job_id, step)
             );
             CREATE TABLE IF NOT EXISTS adapters (
               name TEXT PRIMARY KEY,
               base_model TEXT NOT NULL,
               method TEXT NOT NULL,
               hyperparameters TEXT NOT NULL,
               final_metrics TEXT,
               job_id TEXT,
               created_at REAL NOT NULL
             );",
        )
        .map_err(db)?;
        // Databases written before jobs had owners gain the column (NULL: no owner).
        let has_owner = conn
            .prepare("SELECT 1 FROM pragma_table_info('jobs') WHERE name = 'owner'")
            .and_then(|mut st| st.exists([]))
            .map_err(db)?;
        if !has_owner {
            conn.execute_batch("ALTER TABLE jobs ADD COLUMN owner TEXT").map_err(db)?;
        }
        // Uploaded adapters have no job to take an owner from; they keep the uploader's.
        let adapters_have_owner = conn
            .prepare("SELECT 1 FROM pragma_table_info('adapters') WHERE name = 'owner'")
            .and_then(|mut st| st.exists([]))
            .map_err(db)?;
        if !adapters_have_owner {
            conn.execute_batch("ALTER TABLE adapters ADD COLUMN owner TEXT").map_err(db)?;
        }
        Ok(conn)
    }

    /// Records a queued job; `owner` is the submitting API key's id (None without keys).
    pub fn insert(&self, id: &str, spec: &JobSpec, owner: Option<&str>) -> Result<(), JobError> {
        let t = now();
        let spec = serde_json::to_string(spec).map_err(|e| JobError::Store(e.to_string()))?;
        self.conn
            .lock()
            .unwrap()
            .execute(
                "INSERT INTO jobs (id, status, spec, created_at, updated_at, owner) VALUES (?1, ?2, ?3, ?4, ?4, ?5)",
                params![id, JobStatus::Queued.as_str(), spec, t, owner],
            )
            .map_err(db)?;
        Ok(())
    }

    /// The owner of a job: None if there is no such job, Some(None) if it has no owner.
    pub fn owner(&self, id: &str) -> Result<Option<Option<String>>, JobError> {
        let conn = self.conn.lock().unwrap();
        conn.query_row("SELECT owner FROM jobs WHERE id = ?1", params![id], |r| r.get(0))
            .optional()
            .map_err(db)
    }

    /// Jobs per status, counted by the database (a metrics scrape must not read every record).
    pub fn count_by_status(&self) -> Result<std::collections::HashMap<String, usize>, JobError> {
        let conn = self.conn.lock().unwrap();
        let mut st = conn
            .prepare("SELECT status, COUNT(*) FROM jobs GROUP BY status")
            .map_err(db)?;
        let rows = st
            .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)? as usize)))
            .map_err(db)?;
        rows.collect::<rusqlite::Result<_>>().map_err(db)
    }

    /// How many of an owner's jobs are queued or running.
    pub fn active_jobs_of(&self, owner: &str) -> Result<usize, JobError> {
        let conn = self.conn.lock().unwrap();
        conn.query_row(
            "SELECT COUNT(*) FROM jobs WHERE owner = ?1 AND status IN (?2, ?3, ?4)",
            params![
                owner,
                JobStatus::Queued.as_str(),
                JobStatus::Downloading.as_str(),
                JobStatus::Training.as_str()
            ],
            |r| r.get::<_, i64>(0),
        )
        .map(|n| n as usize)
        .map_err(db)
    }

    pub fn set_status(
        &self,
        id: &str,
        status: JobStatus,
        error: Option<&JobErrorBody>,
    ) -> Result<(), JobError> {
        let err = error.map(|e| serde_json::to_string(e).unwrap_or_default());
        self.conn
            .lock()
            .unwrap()
            .execute(
                "UPDATE jobs SET status = ?2, error = COALESCE(?3, error), updated_at = ?4 WHERE id = ?1",
                params![id, status.as_str(), err, now()],
            )
            .map_err(db)?;
        Ok(())
    }

    pub fn set_progress(&self, id: &str, p: &Progress) -> Result<(), JobError> {
        let s = serde_json::to_string(p).unwrap_or_default();
        self.conn
            .lock()
            .unwrap()
            .execute(
                "UPDATE jobs SET progress = ?2, updated_at = ?3 WHERE id = ?1",
                params![id, s, now()],
            )
            .map_err(db)?;
        Ok(())
    }

    pub fn set_dataset_stats(&self, id: &str, stats: &serde_json::Value) -> Result<(), JobError> {
        self.conn
            .lock()
            .unwrap()
            .execute(
                "UPDATE jobs SET dataset_stats = ?2 WHERE id = ?1",
                params![id, stats.to_string()],
            )
            .map_err(db)?;
        Ok(())
    }

    /// Appends one step's metrics and the progress in the same transaction.
    pub fn record_step(&self, id: &str, m: &StepMetrics, p: &Progress) -> Result<(), JobError> {
        let mut conn = self.conn.lock().unwrap();
        let tx = conn.transaction().map_err(db)?;
        tx.execute(
            "INSERT OR REPLACE INTO metrics (job_id, step, data) VALUES (?1, ?2, ?3)",
            params![
                id,
                m.step as i64,
                serde_json::to_string(m).unwrap_or_default()
            ],
        )
        .map_err(db)?;
        tx.execute(
            "UPDATE jobs SET progress = ?2, updated_at = ?3 WHERE id = ?1",
            params![id, serde_json::to_string(p).unwrap_or_default(), now()],
        )
        .map_err(db)?;
        tx.commit().map_err(db)
    }

    /// Drops metrics past `step` (a resumed run recomputes them from its checkpoint).
    pub fn truncate_metrics(&self, id: &str, step: usize) -> Result<(), JobError> {
        self.conn
            .lock()
            .unwrap()
            .execute(
                "DELETE FROM metrics WHERE job_id = ?1 AND step > ?2",
                params![id, step as i64],
            )
            .map_err(db)?;
        Ok(())
    }

    pub fn metrics(&self, id: &str) -> Result<Vec<StepMetrics>, JobError> {
        let conn = self.conn.lock().unwrap();
        let mut st = conn
            .prepare("SELECT data FROM metrics WHERE job_id = ?1 ORDER BY step")
            .map_err(db)?;
        let rows = st
            .query_map(params![id], |r| r.get::<_, String>(0))
            .map_err(db)?;
        let mut out = Vec::new();
        for r in rows {
            if let Ok(m) = serde_json::from_str(&r.map_err(db)?) {
                out.push(m);
            }
        }
        Ok(out)
    }

    pub fn set_adapter(&self, id: &str, name: &str) -> Result<(), JobError> {
        self.conn
            .lock()
            .unwrap()
            .execute(
                "UPDATE jobs SET adapter = ?2 WHERE id = ?1",
                params![id, name],
            )
            .map_err(db)?;
        Ok(())
    }

    fn row_to_job(r: &rusqlite::Row<'_>) -> rusqlite::Result<JobRecord> {
        let status: String = r.get(1)?;
        let spec: String = r.get(2)?;
        let progress: Option<String> = r.get(5)?;
        let error: Option<String> = r.get(6)?;
        let stats: Option<String> = r.get(8)?;
        Ok(JobRecord {
            id: r.get(0)?,
            status: JobStatus::parse(&status).unwrap_or(JobStatus::Failed),
            spec: serde_json::from_str(&spec).map_err(|e| {
                rusqlite::Error::FromSqlConversionFailure(
                    2,
                    rusqlite::types::Type::Text,
                    Box::new(e),
                )
            })?,
            created_at: r.get(3)?,
            updated_at: r.get(4)?,
            progress: progress.and_then(|p| serde_json::from_str(&p).ok()),
            error: error.and_then(|e| serde_json::from_str(&e).ok()),
            adapter: r.get(7)?,
            dataset: stats.and_then(|s| serde_json::from_str(&s).ok()),
        })
    }

    pub fn get(&self, id: &str) -> Result<Option<JobRecord>, JobError> {
        let conn = self.conn.lock().unwrap();
        conn.query_row(
            "SELECT id, status, spec, created_at, updated_at, progress, error, adapter, dataset_stats FROM jobs WHERE id = ?1",
            params![id],
            Self::row_to_job,
        )
        .optional()
        .map_err(db)
    }

    pub fn list(&self, status: Option<JobStatus>) -> Result<Vec<JobRecord>, JobError> {
        self.list_visible(status, None)
    }

    /// Jobs (optionally of one status) that `owner` may see: its own and those without an
    /// owner; every job when `owner` is None.
    pub fn list_visible(
        &self,
        status: Option<JobStatus>,
        owner: Option<&str>,
    ) -> Result<Vec<JobRecord>, JobError> {
        let conn = self.conn.lock().unwrap();
        let mut st = conn
            .prepare(
                "SELECT id, status, spec, created_at, updated_at, progress, error, adapter, dataset_stats FROM jobs
                 WHERE (?1 IS NULL OR status = ?1) AND (?2 IS NULL OR owner IS NULL OR owner = ?2)
                 ORDER BY created_at, id",
            )
            .map_err(db)?;
        let rows = st
            .query_map(params![status.map(|s| s.as_str()), owner], Self::row_to_job)
            .map_err(db)?;
        rows.collect::<rusqlite::Result<Vec<_>>>().map_err(db)
    }

    pub fn register_adapter(&self, a: &AdapterInfo) -> Result<(), JobError> {
        self.conn
            .lock()
            .unwrap()
            .execute(
                "INSERT OR REPLACE INTO adapters (name, base_model, method, hyperparameters, final_metrics, job_id, created_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                params![
                    a.name,
                    a.base_model,
                    a.method,
                    a.hyperparameters.to_string(),
                    a.final_metrics.as_ref().map(|m| m.to_string()),
                    a.job_id,
                    a.created_at
                ],
            )
            .map_err(db)?;
        Ok(())
    }

    pub fn adapters(&self) -> Result<Vec<AdapterInfo>, JobError> {
        let conn = self.conn.lock().unwrap();
        let mut st = conn
            .prepare("SELECT name, base_model, method, hyperparameters, final_metrics, job_id, created_at FROM adapters ORDER BY created_at, name")
            .map_err(db)?;
        let rows = st
            .query_map([], |r| {
                let hp: String = r.get(3)?;
                let fm: Option<String> = r.get(4)?;
                Ok(AdapterInfo {
                    name: r.get(0)?,
                    base_model: r.get(1)?,
                    method: r.get(2)?,
                    hyperparameters: serde_json::from_str(&hp).unwrap_or_default(),
                    final_metrics: fm.and_then(|f| serde_json::from_str(&f).ok()),
                    job_id: r.get(5)?,
                    created_at: r.get(6)?,
                })
            })
            .map_err(db)?;
        rows.collect::<rusqlite::Result<Vec<_>>>().map_err(db)
    }

    /// Records an uploaded adapter with its uploader's key id, refusing a name already
    /// registered (the check and the insert are one statement, so two uploads cannot race).
    pub fn register_uploaded_adapter(
        &self,
        a: &AdapterInfo,
        owner: Option<&str>,
    ) -> Result<bool, JobError> {
        let n = self
            .conn
            .lock()
            .unwrap()
            .execute(
                "INSERT OR IGNORE INTO adapters (name, base_model, method, hyperparameters, final_metrics, job_id, created_at, owner)
                 VALUES (?1, ?2, ?3, ?4, ?5, NULL, ?6, ?7)",
                params![
                    a.name,
                    a.base_model,
                    a.method,
                    a.hyperparameters.to_string(),
                    a.final_metrics.as_ref().map(|m| m.to_string()),
                    a.created_at,
                    owner
                ],
            )
            .map_err(db)?;
        Ok(n == 1)
    }

    /// The uploader of an uploaded adapter (None for others, or uploads without keys).
    pub fn adapter_uploader(&self, name: &str) -> Result<Option<String>, JobError> {
        let conn = self.conn.lock().unwrap();
        conn.query_row(
            "SELECT owner FROM adapters WHERE name = ?1",
            params![name],
            |r| r.get::<_, Option<String>>(0),
        )
        .optional()
        .map(Option::flatten)
        .map_err(db)
    }

    pub fn delete_adapter(&self, name: &str) -> Result<bool, JobError> {
        let n = self
            .conn
            .lock()
            .unwrap()
            .execute("DELETE FROM adapters WHERE name = ?1", params![name])
            .map_err(db)?;
        Ok(n > 0)
    }
}
