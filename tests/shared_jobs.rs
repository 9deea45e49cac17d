//! Replicas sharing a PostgreSQL job store and a data directory: a job submitted to one is
//! visible from both and run by one; kill -9 of the replica running it, and the other takes it
//! over from its newest checkpoint and finishes it; a cancel given to either replica reaches
//! the job wherever it runs; the adapter is served by every replica; a replica's event stream
//! follows a job another replica runs.
//!
//! Needs a PostgreSQL server: `eval "$(scripts/test-postgres.sh)"` starts one and exports
//! DSPO_TEST_POSTGRES_URL (what `.ci/run` does). Without it the test is skipped, except under
//! CI=true, where it fails.

mod common;

use serde_json::{json, Value};
use std::process::{Child, Command};
use std::sync::mpsc::Receiver;
use std::time::Duration;

struct Replica {
    child: Child,
    base: String,
    log: Receiver<String>,
}

impl Drop for Replica {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Replica {
    fn start(data: &std::path::Path, database_url: &str) -> Replica {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_dspo-server"));
        cmd.args(["serve", "--listen", "127.0.0.1:0", "--allow-private-dataset-urls"])
            .arg("--model")
            .arg(format!("tiny={}", common::models_dir().join("tiny-sd15").display()))
            .arg("--data-dir")
            .arg(data)
            .env("DSPO_JOBS_DATABASE_URL", database_url)
            .env("DSPO_JOBS_LEASE_SECS", "2");
        let (child, addr, log) = common::spawn_server_process(cmd);
        let r = Replica {
            child,
            base: format!("http://{addr}"),
            log,
        };
        common::wait_until(60, "the replica to be ready", || r.get("/ready").is_some());
        r
    }

    fn get(&self, path: &str) -> Option<Value> {
        common::agent()
            .get(&format!("{}{path}", self.base))
            .call()
            .ok()?
            .into_json()
            .ok()
    }

    fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        let r = match common::agent().post(&format!("{}{path}", self.base)).send_json(body) {
            Ok(r) => r,
            Err(ureq::Error::Status(_, r)) => r,
            Err(e) => panic!("{e}"),
        };
        (r.status(), r.into_json().unwrap_or(Value::Null))
    }

    fn id(&self) -> String {
        self.get("/health").unwrap()["replica"].as_str().unwrap().to_string()
    }

    /// Whether the log said the trainer resumed from a checkpoint (drains what is there).
    fn resumed(&self) -> bool {
        self.log.try_iter().any(|l| l.contains("resumed from checkpoint"))
    }
}

/// Reads a job's event stream on `replica` until it ends: its `event:` and `data:` lines.
fn stream(replica: &Replica, path: &str) -> std::thread::JoinHandle<Vec<String>> {
    let url = format!("{}{path}/events", replica.base);
    std::thread::spawn(move || {
        use std::io::BufRead;
        let r = common::agent().get(&url).call().unwrap();
        std::io::BufReader::new(r.into_reader())
            .lines()
            .map_while(Result::ok)
            .filter(|l| l.starts_with("event:") || l.starts_with("data:"))
            .collect()
    })
}

/// A fresh database on the test server, for this test alone.
fn database() -> Option<String> {
    let admin = match std::env::var("DSPO_TEST_POSTGRES_URL") {
        Ok(u) => u,
        Err(_) if std::env::var("CI").is_ok_and(|v| v == "true") => {
            panic!("DSPO_TEST_POSTGRES_URL is not set (eval \"$(scripts/test-postgres.sh)\")")
        }
        Err(_) => {
            eprintln!("SKIPPED: no DSPO_TEST_POSTGRES_URL (eval \"$(scripts/test-postgres.sh)\")");
            return None;
        }
    };
    let name = format!("dspo_test_{}", uuid::Uuid::new_v4().simple());
    let mut client = postgres::Client::connect(&admin, postgres::NoTls).expect("the test database server");
    client.batch_execute(&format!("CREATE DATABASE {name}")).unwrap();
    let (base, _) = admin.rsplit_once('/').unwrap();
    Some(format!("{base}/{name}"))
}

fn job(url: &str, name: &str, steps: usize) -> Value {
    json!({
        "dataset_url": url, "method": "dspo", "adapter_name": name,
        "lora": {"rank": 2, "alpha": 2.0},
        "hyperparameters": {"max_steps": steps, "batch_size": 2, "max_pairs": 16, "learning_rate": 1e-2,
                            "resolution": 64, "warmup_steps": 0, "checkpoint_every": 2, "beta": 1.0,
                            "drift_every": 0}
    })
}

#[test]
fn replicas_share_jobs_and_take_over_a_dead_replicas_job() {
    let Some(db) = database() else { return };
    let www = common::shapes_pairs_server();
    let data = common::temp_dir("replicas");
    let a = Replica::start(&data, &db);
    let b = Replica::start(&data, &db);
    assert_ne!(a.id(), b.id());

    let (status, reply) = a.post("/finetune", &job(&www.url("prefs.parquet"), "shared", 40));
    assert_eq!(status, 202, "{reply}");
    let id = reply["job_id"].as_str().unwrap().to_string();
    let path = format!("/finetune/{id}");
    // Visible from both, run by one of them.
    let mut running = Value::Null;
    common::wait_until(120, "the job to reach step 4", || {
        running = b.get(&path).unwrap();
        running["progress"]["step"].as_u64().unwrap_or(0) >= 4
    });
    assert_eq!(a.get(&path).unwrap()["id"], json!(id));
    let runner = running["replica"].as_str().expect("a running job names its replica").to_string();
    let (mut dead, survivor) = if runner == a.id() { (a, b) } else { (b, a) };
    assert_eq!(runner, dead.id());
    // The survivor's event stream for a job the other replica runs (until it takes it over).
    let events = stream(&survivor, &path);

    // kill -9 of the runner: the survivor claims the job once the lease lapses and resumes it.
    dead.child.kill().unwrap();
    dead.child.wait().unwrap();
    let dead_id = runner;
    let mut done = Value::Null;
    common::wait_until(300, "the survivor to finish the job", || {
        done = survivor.get(&path).unwrap();
        assert_ne!(done["status"], "failed", "{done}");
        done["status"] == "completed"
    });
    assert!(survivor.resumed(), "the survivor resumed from a checkpoint instead of starting over");
    let events = events.join().unwrap();
    assert!(events.last().unwrap().contains("\"status\":\"completed\""), "{events:?}");
    let steps: Vec<u64> = survivor
        .get(&format!("{path}/metrics"))
        .unwrap()
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["step"].as_u64().unwrap())
        .collect();
    assert_eq!(steps, (1..=40).collect::<Vec<_>>());
    drop(dead);

    // A new replica in the dead one's place: the adapter is served by both.
    let fresh = Replica::start(&data, &db);
    assert_ne!(fresh.id(), dead_id);
    for r in [&survivor, &fresh] {
        let (status, body) = r.post("/generate", &json!({"prompt": "a red circle", "steps": 2, "adapter": "shared"}));
        assert_eq!(status, 200, "{body}");
        let adapters = r.get("/adapters").unwrap();
        assert!(adapters.as_array().unwrap().iter().any(|x| x["name"] == "shared"), "{adapters}");
    }

    // A cancel given to one replica reaches the job wherever it runs.
    let (status, reply) = fresh.post("/finetune", &job(&www.url("prefs.parquet"), "cancelled", 400));
    assert_eq!(status, 202, "{reply}");
    let id = reply["job_id"].as_str().unwrap().to_string();
    let path = format!("/finetune/{id}");
    let mut running = Value::Null;
    common::wait_until(120, "the second job to train", || {
        running = survivor.get(&path).unwrap();
        running["status"] == "training"
    });
    let other = if running["replica"] == json!(survivor.id()) { &fresh } else { &survivor };
    // The other replica's event stream follows the job through the store.
    let events = stream(other, &path);
    std::thread::sleep(Duration::from_millis(2500));
    let r = common::agent().delete(&format!("{}{path}", other.base)).call().unwrap();
    assert_eq!(r.status(), 200);
    common::wait_until(60, "the job to be cancelled", || {
        fresh.get(&path).unwrap()["status"] == "cancelled"
    });
    let events = events.join().unwrap();
    assert!(events.iter().any(|l| l.ends_with("progress")), "progress from the other replica: {events:?}");
    assert!(events.last().unwrap().contains("\"status\":\"cancelled\""), "{events:?}");
    std::thread::sleep(Duration::from_millis(100));
    let _ = std::fs::remove_dir_all(&data);
}
