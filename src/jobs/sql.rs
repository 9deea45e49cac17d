//! The two databases the job store runs on: SQLite in the data directory (one server), or
//! PostgreSQL shared by several replicas. Statements are written once, with `?N` placeholders
//! and the syntax both engines share (`ON CONFLICT` upserts, `RETURNING`, `CAST`); on
//! PostgreSQL the placeholders are renumbered `$N`. Values cross as three nullable kinds, which
//! is all the store's columns hold.

use super::types::JobError;
use std::sync::Mutex;

#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Text(Option<String>),
    Real(Option<f64>),
    Int(Option<i64>),
}

impl Value {
    pub fn text(s: impl Into<String>) -> Self {
        Value::Text(Some(s.into()))
    }

    pub fn opt_text(s: Option<impl Into<String>>) -> Self {
        Value::Text(s.map(Into::into))
    }

    pub fn as_text(&self) -> Option<String> {
        match self {
            Value::Text(s) => s.clone(),
            _ => None,
        }
    }

    pub fn as_real(&self) -> Option<f64> {
        match self {
            Value::Real(v) => *v,
            Value::Int(v) => v.map(|v| v as f64),
            Value::Text(_) => None,
        }
    }

    pub fn as_int(&self) -> Option<i64> {
        match self {
            Value::Int(v) => *v,
            Value::Real(v) => v.map(|v| v as i64),
            Value::Text(_) => None,
        }
    }
}

pub type Row = Vec<Value>;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Engine {
    Sqlite,
    Postgres,
}

pub enum Db {
    Sqlite(Mutex<rusqlite::Connection>),
    Postgres(Postgres),
}

/// A PostgreSQL connection, reopened when it breaks (a database restart or failover), used
/// from a thread of its own: the synchronous client drives its own runtime, which may not run
/// inside the server's async one.
pub struct Postgres {
    url: String,
    client: Mutex<Option<postgres::Client>>,
}

pub(crate) fn sqlite_err(e: rusqlite::Error) -> JobError {
    use rusqlite::ErrorCode::*;
    match e.sqlite_error_code() {
        Some(DiskFull | ReadOnly | CannotOpen | SystemIoFailure | PermissionDenied) => {
            JobError::Storage(format!("the job database cannot be written: {e}"))
        }
        _ => JobError::Store(e.to_string()),
    }
}

fn pg_err(e: postgres::Error) -> JobError {
    if e.is_closed() || e.as_db_error().is_none() {
        // The server could not be reached: the store is unavailable, not wrong.
        JobError::Storage(format!("the job database is unreachable: {e}"))
    } else {
        JobError::Store(e.to_string())
    }
}

/// `?N` placeholders renumbered as PostgreSQL's `$N` (the statements hold no `?` otherwise).
fn dollar(sql: &str) -> String {
    sql.replace('?', "$")
}

impl Postgres {
    pub fn connect(url: &str) -> Result<Self, JobError> {
        let pg = Postgres {
            url: url.to_string(),
            client: Mutex::new(None),
        };
        pg.with(|_| Ok(()))?;
        Ok(pg)
    }

    fn with<T: Send>(
        &self,
        f: impl FnOnce(&mut postgres::Client) -> Result<T, postgres::Error> + Send,
    ) -> Result<T, JobError> {
        std::thread::scope(|s| {
            s.spawn(|| {
                let mut guard = self.client.lock().unwrap_or_else(|p| p.into_inner());
                if guard.as_ref().is_none_or(|c| c.is_closed()) {
                    *guard = Some(postgres::Client::connect(&self.url, postgres::NoTls).map_err(pg_err)?);
                }
                let client = guard.as_mut().expect("connected above");
                f(client).map_err(pg_err)
            })
            .join()
            .unwrap_or_else(|_| Err(JobError::Store("the database thread panicked".into())))
        })
    }
}

fn pg_params(params: &[Value]) -> Vec<Box<dyn postgres::types::ToSql + Sync + Send>> {
    params
        .iter()
        .map(|v| -> Box<dyn postgres::types::ToSql + Sync + Send> {
            match v {
                Value::Text(s) => Box::new(s.clone()),
                Value::Real(r) => Box::new(*r),
                Value::Int(i) => Box::new(*i),
            }
        })
        .collect()
}

fn pg_row(row: &postgres::Row) -> Result<Row, postgres::Error> {
    use postgres::types::Type;
    let mut out = Vec::with_capacity(row.len());
    for (i, c) in row.columns().iter().enumerate() {
        out.push(match *c.type_() {
            Type::FLOAT8 => Value::Real(row.try_get(i)?),
            Type::FLOAT4 => Value::Real(row.try_get::<_, Option<f32>>(i)?.map(f64::from)),
            Type::INT8 => Value::Int(row.try_get(i)?),
            Type::INT4 => Value::Int(row.try_get::<_, Option<i32>>(i)?.map(i64::from)),
            _ => Value::Text(row.try_get(i)?),
        });
    }
    Ok(out)
}

fn sqlite_row(row: &rusqlite::Row<'_>, n: usize) -> rusqlite::Result<Row> {
    use rusqlite::types::ValueRef;
    (0..n)
        .map(|i| {
            Ok(match row.get_ref(i)? {
                ValueRef::Null => Value::Text(None),
                ValueRef::Integer(v) => Value::Int(Some(v)),
                ValueRef::Real(v) => Value::Real(Some(v)),
                ValueRef::Text(t) => Value::Text(Some(String::from_utf8_lossy(t).into_owned())),
                ValueRef::Blob(b) => Value::Text(Some(String::from_utf8_lossy(b).into_owned())),
            })
        })
        .collect()
}

fn sqlite_params(params: &[Value]) -> Vec<rusqlite::types::Value> {
    use rusqlite::types::Value as V;
    params
        .iter()
        .map(|v| match v {
            Value::Text(Some(s)) => V::Text(s.clone()),
            Value::Real(Some(r)) => V::Real(*r),
            Value::Int(Some(i)) => V::Integer(*i),
            _ => V::Null,
        })
        .collect()
}

impl Db {
    pub fn engine(&self) -> Engine {
        match self {
            Db::Sqlite(_) => Engine::Sqlite,
            Db::Postgres(_) => Engine::Postgres,
        }
    }

    /// Runs a statement; returns the rows it changed.
    pub fn execute(&self, sql: &str, params: &[Value]) -> Result<u64, JobError> {
        match self {
            Db::Sqlite(c) => {
                let c = c.lock().unwrap_or_else(|p| p.into_inner());
                c.execute(sql, rusqlite::params_from_iter(sqlite_params(params)))
                    .map(|n| n as u64)
                    .map_err(sqlite_err)
            }
            Db::Postgres(pg) => {
                let (sql, p) = (dollar(sql), pg_params(params));
                pg.with(move |c| {
                    let refs: Vec<&(dyn postgres::types::ToSql + Sync)> =
                        p.iter().map(|b| b.as_ref() as _).collect();
                    c.execute(sql.as_str(), &refs)
                })
            }
        }
    }

    /// Runs a query (or a statement with `RETURNING`); returns its rows.
    pub fn query(&self, sql: &str, params: &[Value]) -> Result<Vec<Row>, JobError> {
        match self {
            Db::Sqlite(c) => {
                let c = c.lock().unwrap_or_else(|p| p.into_inner());
                let mut st = c.prepare(sql).map_err(sqlite_err)?;
                let n = st.column_count();
                let rows = st
                    .query_map(rusqlite::params_from_iter(sqlite_params(params)), |r| {
                        sqlite_row(r, n)
                    })
                    .map_err(sqlite_err)?;
                rows.collect::<rusqlite::Result<Vec<_>>>().map_err(sqlite_err)
            }
            Db::Postgres(pg) => {
                let (sql, p) = (dollar(sql), pg_params(params));
                pg.with(move |c| {
                    let refs: Vec<&(dyn postgres::types::ToSql + Sync)> =
                        p.iter().map(|b| b.as_ref() as _).collect();
                    c.query(sql.as_str(), &refs)?.iter().map(pg_row).collect()
                })
            }
        }
    }

    /// Runs statements in one transaction: all of them take effect or none.
    pub fn transaction(&self, statements: &[(&str, Vec<Value>)]) -> Result<(), JobError> {
        match self {
            Db::Sqlite(c) => {
                let mut c = c.lock().unwrap_or_else(|p| p.into_inner());
                let tx = c.transaction().map_err(sqlite_err)?;
                for (sql, params) in statements {
                    tx.execute(sql, rusqlite::params_from_iter(sqlite_params(params)))
                        .map_err(sqlite_err)?;
                }
                tx.commit().map_err(sqlite_err)
            }
            Db::Postgres(pg) => {
                let statements: Vec<(String, Vec<Box<dyn postgres::types::ToSql + Sync + Send>>)> =
                    statements
                        .iter()
                        .map(|(sql, p)| (dollar(sql), pg_params(p)))
                        .collect();
                pg.with(move |c| {
                    let mut tx = c.transaction()?;
                    for (sql, p) in &statements {
                        let refs: Vec<&(dyn postgres::types::ToSql + Sync)> =
                            p.iter().map(|b| b.as_ref() as _).collect();
                        tx.execute(sql.as_str(), &refs)?;
                    }
                    tx.commit()
                })
            }
        }
    }

    /// Runs a script of statements without parameters (the schema).
    pub fn batch(&self, script: &str) -> Result<(), JobError> {
        match self {
            Db::Sqlite(c) => c
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .execute_batch(script)
                .map_err(sqlite_err),
            Db::Postgres(pg) => {
                let script = script.to_string();
                pg.with(move |c| c.batch_execute(&script))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_are_renumbered_for_postgres() {
        assert_eq!(
            dollar("UPDATE jobs SET a = ?2 WHERE id = ?1 AND (CAST(?3 AS TEXT) IS NULL)"),
            "UPDATE jobs SET a = $2 WHERE id = $1 AND (CAST($3 AS TEXT) IS NULL)"
        );
    }
}
