//! Jobs, their metrics history and the adapter registry: in SQLite under the data directory
//! (one server), or in PostgreSQL shared by replicas (`jobs.database_url`). Every state change
//! is one statement or one transaction, so a kill -9 leaves a consistent database.
//!
//! Jobs are claimed, not handed out: a replica takes the oldest queued job (or one whose
//! runner's lease ran out) in one statement, holds a lease on it that it renews while the job
//! runs, and another replica takes the job over, resuming from its newest checkpoint, once the
//! lease lapses. On PostgreSQL the claim skips rows another replica is claiming
//! (`FOR UPDATE SKIP LOCKED`), so two replicas never take the same job.

use super::sql::{Db, Engine, Postgres, Row, Value};
use super::types::{AdapterInfo, JobError, JobErrorBody, JobRecord, JobSpec, JobStatus, Progress};
use crate::training::StepMetrics;
use rusqlite::Connection;
use std::path::Path;
use std::sync::Mutex;

pub struct Store {
    db: Db,
}

/// What a lease renewal learnt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lease {
    /// The job is still this replica's (false: it ended, or another replica took it over).
    pub held: bool,
    /// Someone asked for the job to be cancelled (on any replica).
    pub cancel_requested: bool,
}

fn now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

fn text(s: &str) -> Value {
    Value::text(s)
}

fn real(v: f64) -> Value {
    Value::Real(Some(v))
}

fn int(v: i64) -> Value {
    Value::Int(Some(v))
}

const JOB_COLUMNS: &str =
    "id, status, spec, created_at, updated_at, progress, error, adapter, dataset_stats, lease_owner";

/// The columns of every table, in the types each engine names them with.
fn schema(engine: Engine) -> String {
    let (real, int) = match engine {
        Engine::Sqlite => ("REAL", "INTEGER"),
        Engine::Postgres => ("DOUBLE PRECISION", "BIGINT"),
    };
    format!(
        "CREATE TABLE IF NOT EXISTS jobs (
           id TEXT PRIMARY KEY,
           status TEXT NOT NULL,
           spec TEXT NOT NULL,
           created_at {real} NOT NULL,
           updated_at {real} NOT NULL,
           progress TEXT,
           error TEXT,
           adapter TEXT,
           dataset_stats TEXT
         );
         CREATE TABLE IF NOT EXISTS metrics (
           job_id TEXT NOT NULL,
           step {int} NOT NULL,
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
           created_at {real} NOT NULL
         );"
    )
}

/// Columns added since the first schema: (table, column, type per engine). Databases written
/// before them gain them at open (NULL or the default for existing rows).
const ADDED_COLUMNS: [(&str, &str, &str, &str); 5] = [
    // Jobs had no owners at first (NULL: no owner).
    ("jobs", "owner", "TEXT", "TEXT"),
    // Uploaded adapters keep their uploader's key id.
    ("adapters", "owner", "TEXT", "TEXT"),
    // The replica running a job, and until when its claim holds without renewal.
    ("jobs", "lease_owner", "TEXT", "TEXT"),
    ("jobs", "lease_expires", "REAL", "DOUBLE PRECISION"),
    ("jobs", "cancel_requested", "INTEGER NOT NULL DEFAULT 0", "BIGINT NOT NULL DEFAULT 0"),
];

impl Store {
    /// The SQLite store at `path`, created if missing.
    pub fn open(path: &Path) -> Result<Self, JobError> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)
                .map_err(|e| JobError::Store(format!("{}: {e}", dir.display())))?;
        }
        let opened = Connection::open(path)
            .map_err(super::sql::sqlite_err)
            .map(|c| Store {
                db: Db::Sqlite(Mutex::new(c)),
            })
            .and_then(|s| s.prepare().map(|()| s));
        match opened {
            Ok(s) => Ok(s),
            // A read-only (or full) data directory holding a database: serve what it records,
            // read-only, so the server runs and reports the storage problem per request and
            // on /ready instead of refusing to start.
            Err(JobError::Storage(why)) if path.exists() => {
                tracing::warn!("{why}; opening {} read-only", path.display());
                let uri = format!(
                    "file:{}?immutable=1",
                    path.display().to_string().replace('%', "%25").replace('?', "%3f").replace('#', "%23")
                );
                let c = Connection::open_with_flags(
                    uri,
                    rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_URI,
                )
                .map_err(super::sql::sqlite_err)?;
                Ok(Store {
                    db: Db::Sqlite(Mutex::new(c)),
                })
            }
            Err(e) => Err(e),
        }
    }

    /// The PostgreSQL store at `url` (`postgres://user:password@host:port/database`), its
    /// tables created if missing.
    pub fn connect(url: &str) -> Result<Self, JobError> {
        let s = Store {
            db: Db::Postgres(Postgres::connect(url)?),
        };
        s.prepare()?;
        Ok(s)
    }

    pub fn engine(&self) -> Engine {
        self.db.engine()
    }

    /// The schema, on a connection that can write.
    fn prepare(&self) -> Result<(), JobError> {
        let engine = self.db.engine();
        match engine {
            Engine::Sqlite => self.db.batch(&format!(
                "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL; {}",
                schema(engine)
            ))?,
            // Replicas starting together would race to create the same tables: one at a time.
            Engine::Postgres => self.db.batch(&format!(
                "BEGIN; SELECT pg_advisory_xact_lock(7246508261); {}
                 {} COMMIT;",
                schema(engine),
                ADDED_COLUMNS
                    .iter()
                    .map(|(t, c, _, ty)| format!("ALTER TABLE {t} ADD COLUMN IF NOT EXISTS {c} {ty};"))
                    .collect::<String>()
            ))?,
        }
        if engine == Engine::Sqlite {
            for (table, column, ty, _) in ADDED_COLUMNS {
                let present = !self
                    .db
                    .query(
                        &format!("SELECT 1 FROM pragma_table_info('{table}') WHERE name = ?1"),
                        &[text(column)],
                    )?
                    .is_empty();
                if !present {
                    self.db
                        .batch(&format!("ALTER TABLE {table} ADD COLUMN {column} {ty}"))?;
                }
            }
        }
        Ok(())
    }

    /// Records a queued job; `owner` is the submitting API key's id (None without keys).
    /// Returns the record as inserted.
    pub fn insert(
        &self,
        id: &str,
        spec: &JobSpec,
        owner: Option<&str>,
    ) -> Result<JobRecord, JobError> {
        let spec = serde_json::to_string(spec).map_err(|e| JobError::Store(e.to_string()))?;
        let rows = self.db.query(
            &format!(
                "INSERT INTO jobs (id, status, spec, created_at, updated_at, owner)
                 VALUES (?1, ?2, ?3, ?4, ?4, ?5) RETURNING {JOB_COLUMNS}"
            ),
            &[text(id), text(JobStatus::Queued.as_str()), text(&spec), real(now()), Value::opt_text(owner)],
        )?;
        rows.first()
            .map(Self::row_to_job)
            .unwrap_or_else(|| Err(JobError::Store("the insert returned no row".into())))
    }

    /// The owner of a job: None if there is no such job, Some(None) if it has no owner.
    pub fn owner(&self, id: &str) -> Result<Option<Option<String>>, JobError> {
        Ok(self
            .db
            .query("SELECT owner FROM jobs WHERE id = ?1", &[text(id)])?
            .first()
            .map(|r| r[0].as_text()))
    }

    /// Jobs per status, counted by the database (a metrics scrape must not read every record).
    pub fn count_by_status(&self) -> Result<std::collections::HashMap<String, usize>, JobError> {
        Ok(self
            .db
            .query("SELECT status, COUNT(*) FROM jobs GROUP BY status", &[])?
            .into_iter()
            .map(|r| {
                (
                    r[0].as_text().unwrap_or_default(),
                    r[1].as_int().unwrap_or(0) as usize,
                )
            })
            .collect())
    }

    /// How many of an owner's jobs are queued or running.
    pub fn active_jobs_of(&self, owner: &str) -> Result<usize, JobError> {
        let rows = self.db.query(
            "SELECT COUNT(*) FROM jobs WHERE owner = ?1 AND status IN (?2, ?3, ?4)",
            &[
                text(owner),
                text(JobStatus::Queued.as_str()),
                text(JobStatus::Downloading.as_str()),
                text(JobStatus::Training.as_str()),
            ],
        )?;
        Ok(rows.first().and_then(|r| r[0].as_int()).unwrap_or(0) as usize)
    }

    /// Sets a job's status (and error, if given). A terminal status also ends its lease.
    pub fn set_status(
        &self,
        id: &str,
        status: JobStatus,
        error: Option<&JobErrorBody>,
    ) -> Result<(), JobError> {
        let err = error.map(|e| serde_json::to_string(e).unwrap_or_default());
        let sql = if status.is_terminal() {
            "UPDATE jobs SET status = ?2, error = COALESCE(?3, error), updated_at = ?4,
               lease_owner = NULL, lease_expires = NULL WHERE id = ?1"
        } else {
            "UPDATE jobs SET status = ?2, error = COALESCE(?3, error), updated_at = ?4 WHERE id = ?1"
        };
        self.db.execute(
            sql,
            &[text(id), text(status.as_str()), Value::Text(err), real(now())],
        )?;
        Ok(())
    }

    /// Claims the oldest job that is queued, or whose runner's lease has lapsed (its replica
    /// died), for `replica` until `lease_secs` from now: the job becomes `downloading` and its
    /// id is returned. At most one replica gets each job.
    pub fn claim(&self, replica: &str, lease_secs: f64) -> Result<Option<String>, JobError> {
        let t = now();
        let skip_locked = match self.db.engine() {
            Engine::Postgres => "FOR UPDATE SKIP LOCKED",
            Engine::Sqlite => "",
        };
        let sql = format!(
            "UPDATE jobs SET status = ?1, lease_owner = ?2, lease_expires = ?3, updated_at = ?4
             WHERE id = (
               SELECT id FROM jobs
               WHERE status = ?5
                  OR (status IN (?1, ?6) AND (lease_expires IS NULL OR lease_expires < ?4))
               ORDER BY created_at, id
               LIMIT 1 {skip_locked})
             RETURNING id"
        );
        let rows = self.db.query(
            &sql,
            &[
                text(JobStatus::Downloading.as_str()),
                text(replica),
                real(t + lease_secs),
                real(t),
                text(JobStatus::Queued.as_str()),
                text(JobStatus::Training.as_str()),
            ],
        )?;
        Ok(rows.first().and_then(|r| r[0].as_text()))
    }

    /// Extends `replica`'s lease on a running job and reports whether it still holds it and
    /// whether a cancel was asked for.
    pub fn renew(&self, id: &str, replica: &str, lease_secs: f64) -> Result<Lease, JobError> {
        let rows = self.db.query(
            "UPDATE jobs SET lease_expires = ?3 WHERE id = ?1 AND lease_owner = ?2
             RETURNING cancel_requested",
            &[text(id), text(replica), real(now() + lease_secs)],
        )?;
        Ok(match rows.first() {
            Some(r) => Lease {
                held: true,
                cancel_requested: r[0].as_int().unwrap_or(0) != 0,
            },
            None => Lease {
                held: false,
                cancel_requested: false,
            },
        })
    }

    /// Puts a job its replica is giving up (the server is stopping) back in the queue, for
    /// any replica to take at once.
    pub fn release(&self, id: &str, replica: &str) -> Result<(), JobError> {
        self.db.execute(
            "UPDATE jobs SET status = ?3, lease_owner = NULL, lease_expires = NULL, updated_at = ?4
             WHERE id = ?1 AND lease_owner = ?2",
            &[text(id), text(replica), text(JobStatus::Queued.as_str()), real(now())],
        )?;
        Ok(())
    }

    /// Every unfinished job back to `queued`, unclaimed: what a lone server does at start with
    /// the jobs its previous run left.
    pub fn requeue_unfinished(&self) -> Result<Vec<String>, JobError> {
        let rows = self.db.query(
            "UPDATE jobs SET status = ?1, lease_owner = NULL, lease_expires = NULL
             WHERE status IN (?1, ?2, ?3) RETURNING id",
            &[
                text(JobStatus::Queued.as_str()),
                text(JobStatus::Downloading.as_str()),
                text(JobStatus::Training.as_str()),
            ],
        )?;
        Ok(rows.into_iter().filter_map(|r| r[0].as_text()).collect())
    }

    /// Cancels a job that no replica has claimed yet; false if it was claimed (or is not
    /// queued).
    pub fn cancel_if_queued(&self, id: &str) -> Result<bool, JobError> {
        let n = self.db.execute(
            "UPDATE jobs SET status = ?2, updated_at = ?3 WHERE id = ?1 AND status = ?4",
            &[
                text(id),
                text(JobStatus::Cancelled.as_str()),
                real(now()),
                text(JobStatus::Queued.as_str()),
            ],
        )?;
        Ok(n == 1)
    }

    /// Asks whichever replica runs a job to cancel it (it sees the request when it renews its
    /// lease).
    pub fn request_cancel(&self, id: &str) -> Result<(), JobError> {
        self.db
            .execute("UPDATE jobs SET cancel_requested = 1 WHERE id = ?1", &[text(id)])?;
        Ok(())
    }

    pub fn set_progress(&self, id: &str, p: &Progress) -> Result<(), JobError> {
        let s = serde_json::to_string(p).unwrap_or_default();
        self.db.execute(
            "UPDATE jobs SET progress = ?2, updated_at = ?3 WHERE id = ?1",
            &[text(id), text(&s), real(now())],
        )?;
        Ok(())
    }

    pub fn set_dataset_stats(&self, id: &str, stats: &serde_json::Value) -> Result<(), JobError> {
        self.db.execute(
            "UPDATE jobs SET dataset_stats = ?2 WHERE id = ?1",
            &[text(id), text(&stats.to_string())],
        )?;
        Ok(())
    }

    /// Appends one step's metrics and the progress in the same transaction.
    pub fn record_step(&self, id: &str, m: &StepMetrics, p: &Progress) -> Result<(), JobError> {
        self.db.transaction(&[
            (
                "INSERT INTO metrics (job_id, step, data) VALUES (?1, ?2, ?3)
                 ON CONFLICT (job_id, step) DO UPDATE SET data = excluded.data",
                vec![
                    text(id),
                    int(m.step as i64),
                    text(&serde_json::to_string(m).unwrap_or_default()),
                ],
            ),
            (
                "UPDATE jobs SET progress = ?2, updated_at = ?3 WHERE id = ?1",
                vec![
                    text(id),
                    text(&serde_json::to_string(p).unwrap_or_default()),
                    real(now()),
                ],
            ),
        ])
    }

    /// Drops metrics past `step` (a resumed run recomputes them from its checkpoint).
    pub fn truncate_metrics(&self, id: &str, step: usize) -> Result<(), JobError> {
        self.db.execute(
            "DELETE FROM metrics WHERE job_id = ?1 AND step > ?2",
            &[text(id), int(step as i64)],
        )?;
        Ok(())
    }

    pub fn metrics(&self, id: &str) -> Result<Vec<StepMetrics>, JobError> {
        Ok(self
            .db
            .query(
                "SELECT data FROM metrics WHERE job_id = ?1 ORDER BY step",
                &[text(id)],
            )?
            .into_iter()
            .filter_map(|r| serde_json::from_str(&r[0].as_text()?).ok())
            .collect())
    }

    pub fn set_adapter(&self, id: &str, name: &str) -> Result<(), JobError> {
        self.db.execute(
            "UPDATE jobs SET adapter = ?2 WHERE id = ?1",
            &[text(id), text(name)],
        )?;
        Ok(())
    }

    fn row_to_job(r: &Row) -> Result<JobRecord, JobError> {
        fn json<T: serde::de::DeserializeOwned>(v: &Value) -> Option<T> {
            v.as_text().and_then(|s| serde_json::from_str(&s).ok())
        }
        let spec = r[2].as_text().unwrap_or_default();
        Ok(JobRecord {
            id: r[0].as_text().unwrap_or_default(),
            status: r[1]
                .as_text()
                .and_then(|s| JobStatus::parse(&s))
                .unwrap_or(JobStatus::Failed),
            spec: serde_json::from_str(&spec)
                .map_err(|e| JobError::Store(format!("a stored job spec does not parse: {e}")))?,
            created_at: r[3].as_real().unwrap_or(0.0),
            updated_at: r[4].as_real().unwrap_or(0.0),
            progress: json(&r[5]),
            error: json(&r[6]),
            adapter: r[7].as_text(),
            dataset: json(&r[8]),
            replica: r[9].as_text(),
        })
    }

    pub fn get(&self, id: &str) -> Result<Option<JobRecord>, JobError> {
        self.db
            .query(
                &format!("SELECT {JOB_COLUMNS} FROM jobs WHERE id = ?1"),
                &[text(id)],
            )?
            .first()
            .map(Self::row_to_job)
            .transpose()
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
        self.db
            .query(
                &format!(
                    "SELECT {JOB_COLUMNS} FROM jobs
                     WHERE (CAST(?1 AS TEXT) IS NULL OR status = ?1)
                       AND (CAST(?2 AS TEXT) IS NULL OR owner IS NULL OR owner = ?2)
                     ORDER BY created_at, id"
                ),
                &[
                    Value::opt_text(status.map(|s| s.as_str())),
                    Value::opt_text(owner),
                ],
            )?
            .iter()
            .map(Self::row_to_job)
            .collect()
    }

    pub fn register_adapter(&self, a: &AdapterInfo) -> Result<(), JobError> {
        self.db.execute(
            "INSERT INTO adapters (name, base_model, method, hyperparameters, final_metrics, job_id, created_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
             ON CONFLICT (name) DO UPDATE SET base_model = excluded.base_model,
               method = excluded.method, hyperparameters = excluded.hyperparameters,
               final_metrics = excluded.final_metrics, job_id = excluded.job_id,
               created_at = excluded.created_at, owner = NULL",
            &[
                text(&a.name),
                text(&a.base_model),
                text(&a.method),
                text(&a.hyperparameters.to_string()),
                Value::opt_text(a.final_metrics.as_ref().map(|m| m.to_string())),
                Value::opt_text(a.job_id.clone()),
                real(a.created_at),
            ],
        )?;
        Ok(())
    }

    pub fn adapters(&self) -> Result<Vec<AdapterInfo>, JobError> {
        Ok(self
            .db
            .query(
                "SELECT name, base_model, method, hyperparameters, final_metrics, job_id, created_at
                 FROM adapters ORDER BY created_at, name",
                &[],
            )?
            .into_iter()
            .map(|r| AdapterInfo {
                name: r[0].as_text().unwrap_or_default(),
                base_model: r[1].as_text().unwrap_or_default(),
                method: r[2].as_text().unwrap_or_default(),
                hyperparameters: r[3]
                    .as_text()
                    .and_then(|h| serde_json::from_str(&h).ok())
                    .unwrap_or_default(),
                final_metrics: r[4].as_text().and_then(|f| serde_json::from_str(&f).ok()),
                job_id: r[5].as_text(),
                created_at: r[6].as_real().unwrap_or(0.0),
            })
            .collect())
    }

    /// Records an uploaded adapter with its uploader's key id, refusing a name already
    /// registered (the check and the insert are one statement, so two uploads cannot race).
    pub fn register_uploaded_adapter(
        &self,
        a: &AdapterInfo,
        owner: Option<&str>,
    ) -> Result<bool, JobError> {
        let n = self.db.execute(
            "INSERT INTO adapters (name, base_model, method, hyperparameters, final_metrics, job_id, created_at, owner)
             VALUES (?1, ?2, ?3, ?4, ?5, NULL, ?6, ?7)
             ON CONFLICT DO NOTHING",
            &[
                text(&a.name),
                text(&a.base_model),
                text(&a.method),
                text(&a.hyperparameters.to_string()),
                Value::opt_text(a.final_metrics.as_ref().map(|m| m.to_string())),
                real(a.created_at),
                Value::opt_text(owner),
            ],
        )?;
        Ok(n == 1)
    }

    /// The uploader of an uploaded adapter (None for others, or uploads without keys).
    pub fn adapter_uploader(&self, name: &str) -> Result<Option<String>, JobError> {
        Ok(self
            .db
            .query("SELECT owner FROM adapters WHERE name = ?1", &[text(name)])?
            .first()
            .and_then(|r| r[0].as_text()))
    }

    pub fn delete_adapter(&self, name: &str) -> Result<bool, JobError> {
        Ok(self
            .db
            .execute("DELETE FROM adapters WHERE name = ?1", &[text(name)])?
            > 0)
    }
}
