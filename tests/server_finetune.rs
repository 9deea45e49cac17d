//! POST /finetune end to end: a real server on 127.0.0.1 fine-tunes the tiny model on the
//! shapes pairs served by a loopback file server; the adapter it registers changes /generate;
//! the job survives a kill -9 of the server process.

mod common;

use common::fileserver::FileServer;
use common::{get, post_json, temp_dir};
use serde_json::{json, Value};
use std::io::BufRead;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn shapes_server() -> FileServer {
    let root = temp_dir("www");
    std::fs::copy(
        common::models_dir().join("../../shapes/prefs_centered.parquet"),
        root.join("prefs.parquet"),
    )
    .unwrap();
    FileServer::start(root)
}

fn config() -> dspo_server::config::Config {
    let mut c = common::tiny_config();
    c.models.serve = vec![format!(
        "tiny={}",
        common::models_dir().join("tiny-sd15").display()
    )];
    c.datasets.allow_private_networks = true;
    c.jobs.webhook_secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw".into();
    c
}

fn job_body(url: &str, name: &str, steps: usize) -> Value {
    json!({
        "dataset_url": url,
        "method": "dspo",
        "adapter_name": name,
        "lora": {"rank": 4, "alpha": 8.0, "target_modules": ["to_q", "to_k", "to_v", "to_out.0"]},
        "hyperparameters": {"max_steps": steps, "batch_size": 2, "max_pairs": 16, "learning_rate": 1e-2,
                            "resolution": 64, "warmup_steps": 0, "checkpoint_every": 2, "beta": 1.0}
    })
}

#[test]
fn a_finetune_job_produces_an_adapter_that_changes_generation() {
    let www = shapes_server();
    let server = common::start(config());
    let r = post_json(
        &server,
        "/finetune",
        &job_body(&www.url("prefs.parquet"), "centred", 3),
    );
    assert_eq!(r.status, 202, "{:?}", r.json());
    let id = r.json()["job_id"].as_str().unwrap().to_string();
    assert_eq!(r.json()["status_url"], format!("/finetune/{id}"));

    // Server-Sent Events until the job ends.
    let resp = common::agent()
        .get(&server.url(&format!("/finetune/{id}/events")))
        .call()
        .unwrap();
    assert!(resp
        .header("content-type")
        .unwrap_or_default()
        .starts_with("text/event-stream"));
    let mut events = Vec::new();
    for line in std::io::BufReader::new(resp.into_reader()).lines() {
        let line = line.unwrap();
        if let Some(e) = line.strip_prefix("event: ") {
            events.push(e.to_string());
        }
        if line.starts_with("data: ") && line.contains("\"status\":\"completed\"") {
            break;
        }
        if line.starts_with("data: ") && line.contains("\"status\":\"failed\"") {
            panic!("job failed: {line}");
        }
    }
    assert!(events.iter().any(|e| e == "status"));
    assert!(events.iter().any(|e| e == "progress"), "{events:?}");

    let job = get(&server, &format!("/finetune/{id}")).json();
    assert_eq!(job["status"], "completed");
    assert_eq!(job["adapter"], "centred");
    assert_eq!(job["progress"]["step"], 3);
    assert_eq!(
        get(&server, &format!("/finetune/{id}/metrics"))
            .json()
            .as_array()
            .unwrap()
            .len(),
        3
    );
    let listed = get(&server, "/finetune?status=completed").json();
    assert!(listed
        .as_array()
        .unwrap()
        .iter()
        .any(|j| j["id"] == id.as_str()));
    assert_eq!(
        get(&server, "/finetune?status=failed")
            .json()
            .as_array()
            .unwrap()
            .len(),
        0
    );
    let adapters = get(&server, "/adapters").json();
    assert_eq!(adapters[0]["name"], "centred");
    assert_eq!(adapters[0]["method"], "dspo");

    let weights = common::agent()
        .get(&server.url("/adapters/centred/weights"))
        .call()
        .unwrap();
    let mut bytes = Vec::new();
    std::io::Read::read_to_end(&mut weights.into_reader(), &mut bytes).unwrap();
    let adapter =
        dspo_server::models::lora::LoraAdapter::from_bytes(&bytes, &candle_core::Device::Cpu)
            .unwrap();
    assert!(!adapter.modules.is_empty());

    let gen = |adapter: Option<&str>| {
        let mut b = json!({"prompt": "a red circle on a white background", "seed": 5, "steps": 4});
        if let Some(a) = adapter {
            b["adapter"] = json!(a);
        }
        let r = post_json(&server, "/generate", &b);
        assert_eq!(r.status, 200, "{:?}", r.json());
        common::pngs(&r)[0].clone()
    };
    let base = gen(None);
    let tuned = gen(Some("centred"));
    assert_ne!(
        common::pixels(&base),
        common::pixels(&tuned),
        "the adapter must change the image"
    );
    assert_eq!(
        gen(Some("centred")),
        tuned,
        "same seed, same adapter, same bytes"
    );

    // Errors.
    let r = post_json(
        &server,
        "/finetune",
        &job_body(&www.url("prefs.parquet"), "centred", 1),
    );
    assert_eq!((r.status, r.code()), (409, "adapter_exists".to_string()));
    let mut bad = job_body(&www.url("prefs.parquet"), "x", 1);
    bad["hyperparameters"]["beta"] = json!(-1);
    let r = post_json(&server, "/finetune", &bad);
    assert_eq!((r.status, r.code()), (422, "invalid_job".to_string()));
    let mut bad = job_body(&www.url("prefs.parquet"), "x", 1);
    bad["method"] = json!("dpso");
    assert_eq!(post_json(&server, "/finetune", &bad).status, 422);
    let mut bad = job_body(&www.url("prefs.parquet"), "x", 1);
    bad["lora"]["rank"] = json!(0);
    assert_eq!(post_json(&server, "/finetune", &bad).code(), "invalid_job");
    let mut bad = job_body(&www.url("prefs.parquet"), "x", 1);
    bad["lora"] = json!({"alpha": 0.0});
    assert_eq!(post_json(&server, "/finetune", &bad).code(), "invalid_job");
    // A target that names no module of the model's UNet: refused now, not after the download.
    let mut bad = job_body(&www.url("prefs.parquet"), "x", 1);
    bad["lora"] = json!({"target_modules": ["to_q", "to_qq"]});
    let r = post_json(&server, "/finetune", &bad);
    assert_eq!((r.status, r.code()), (422, "invalid_job".to_string()));
    let message = r.json()["error"]["message"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(
        message.contains("[\"to_qq\"]"),
        "only the unknown target is named: {message}"
    );
    // The data anchor is a pair-loss term: with sft (already that loss) it is refused.
    let mut bad = job_body(&www.url("prefs.parquet"), "x", 1);
    bad["method"] = json!("sft");
    bad["hyperparameters"]["anchor_weight"] = json!(0.1);
    let r = post_json(&server, "/finetune", &bad);
    assert_eq!((r.status, r.code()), (422, "invalid_job".to_string()));
    assert!(r.json()["error"]["message"]
        .as_str()
        .unwrap_or_default()
        .contains("anchor_weight"));
    let mut bad = job_body(&www.url("prefs.parquet"), "x", 1);
    bad["hyperparameters"]["anchor_weight"] = json!(-1.0);
    assert_eq!(post_json(&server, "/finetune", &bad).code(), "invalid_job");
    let mut bad = job_body(&www.url("prefs.parquet"), "x", 1);
    bad["lora"] = json!({"ranks": 2});
    let r = post_json(&server, "/finetune", &bad);
    assert_eq!((r.status, r.code()), (422, "invalid_request".to_string()));
    let r = common::post_raw(
        &server,
        "/finetune",
        &[("content-type", "application/json")],
        b"{not json",
    );
    assert_eq!((r.status, r.code()), (400, "malformed_json".to_string()));
    let r = get(&server, "/finetune/00000000-0000-0000-0000-000000000000");
    assert_eq!((r.status, r.code()), (404, "job_not_found".to_string()));
    let r = common::agent()
        .delete(&server.url("/adapters/centred"))
        .call()
        .unwrap();
    assert_eq!(r.status(), 204);
    assert_eq!(get(&server, "/adapters/centred/weights").status, 404);
    let r = post_json(
        &server,
        "/generate",
        &json!({"prompt": "x", "adapter": "centred", "steps": 2}),
    );
    assert_eq!(r.status, 404);

    // Cancel a running job: it ends cancelled, the server stays healthy.
    let r = post_json(
        &server,
        "/finetune",
        &job_body(&www.url("prefs.parquet"), "long", 10_000),
    );
    let id2 = r.json()["job_id"].as_str().unwrap().to_string();
    common::wait_until(60, "job training", || {
        get(&server, &format!("/finetune/{id2}")).json()["status"] == "training"
    });
    let r = common::agent()
        .delete(&server.url(&format!("/finetune/{id2}")))
        .call()
        .unwrap();
    assert_eq!(r.status(), 200);
    common::wait_until(60, "job cancelled", || {
        get(&server, &format!("/finetune/{id2}")).json()["status"] == "cancelled"
    });
    assert_eq!(
        get(&server, &format!("/finetune/{id}")).json()["status"],
        "completed"
    );
    assert_eq!(get(&server, "/health").status, 200);
}

struct Proc(Child);
impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn_server(data: &PathBuf, port: u16) -> Proc {
    let child = Command::new(env!("CARGO_BIN_EXE_dspo-server"))
        .args([
            "serve",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--allow-private-dataset-urls",
        ])
        .arg("--model")
        .arg(format!(
            "tiny={}",
            common::models_dir().join("tiny-sd15").display()
        ))
        .arg("--data-dir")
        .arg(data)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    while common::agent()
        .get(&format!("http://127.0.0.1:{port}/ready"))
        .call()
        .is_err()
    {
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "server did not become ready"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    Proc(child)
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[test]
fn a_job_survives_kill_9_and_resumes_from_its_checkpoint() {
    let www = shapes_server();
    let data = temp_dir("kill9");
    let port = free_port();
    let base = format!("http://127.0.0.1:{port}");
    let mut server = spawn_server(&data, port);
    let r = common::agent()
        .post(&format!("{base}/finetune"))
        .send_json(job_body(&www.url("prefs.parquet"), "survivor", 8))
        .unwrap();
    let id = r.into_json::<Value>().unwrap()["job_id"]
        .as_str()
        .unwrap()
        .to_string();
    let status = |base: &str| -> Value {
        common::agent()
            .get(&format!("{base}/finetune/{id}"))
            .call()
            .unwrap()
            .into_json()
            .unwrap()
    };
    common::wait_until(120, "step 3", || {
        status(&base)["progress"]["step"].as_u64().unwrap_or(0) >= 3
    });
    // SIGKILL: no graceful anything.
    server.0.kill().unwrap();
    server.0.wait().unwrap();
    drop(server);

    let port2 = free_port();
    let base2 = format!("http://127.0.0.1:{port2}");
    let _server2 = spawn_server(&data, port2);
    common::wait_until(300, "job completed after restart", || {
        let s = status(&base2);
        assert_ne!(s["status"], "failed", "{s}");
        s["status"] == "completed"
    });
    let metrics: Value = common::agent()
        .get(&format!("{base2}/finetune/{id}/metrics"))
        .call()
        .unwrap()
        .into_json()
        .unwrap();
    let steps: Vec<u64> = metrics
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["step"].as_u64().unwrap())
        .collect();
    assert_eq!(steps, (1..=8).collect::<Vec<_>>());
    let adapters: Value = common::agent()
        .get(&format!("{base2}/adapters"))
        .call()
        .unwrap()
        .into_json()
        .unwrap();
    assert_eq!(adapters[0]["name"], "survivor");
}
