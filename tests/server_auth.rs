//! API keys end to end, a real server on 127.0.0.1 and a real HTTP client: 401 without a
//! valid key, 403 for a key without the route's scope, per-key job ownership and limits, the
//! per-key request rate, CORS preflights without a key, and the refusal to listen on a
//! network address without keys.

mod common;

use common::{agent, temp_dir, Reply};
use dspo_server::api::running::RunningServer;
use serde_json::{json, Value};
use std::process::Command;
use std::time::Duration;

const FULL_A: &str = "full-key-a-0123456789";
const FULL_B: &str = "full-key-b-0123456789";
const GENERATE: &str = "generate-key-0123456789";

/// A request with an optional API key, as `Authorization: Bearer`.
fn call(server: &RunningServer, method: &str, path: &str, key: Option<&str>, body: Option<&Value>) -> Reply {
    let auth = key.map(|k| format!("Bearer {k}"));
    let headers: Vec<(&str, &str)> = auth.iter().map(|a| ("authorization", a.as_str())).collect();
    common::request(server, method, path, &headers, body)
}

fn config() -> dspo_server::config::Config {
    let mut c = common::tiny_config();
    c.models.serve = vec![format!(
        "tiny={}",
        common::models_dir().join("tiny-sd15").display()
    )];
    c.auth.api_keys = vec![FULL_A.into(), FULL_B.into(), format!("{GENERATE}:generate")];
    c.datasets.allow_private_networks = true;
    c.datasets.timeout_s = 3;
    c
}

/// A dataset server that accepts connections and never answers: a job fetching from it stays
/// active (downloading, then queued behind it) for the length of the test.
fn silent_dataset_url() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for s in listener.incoming().map_while(Result::ok) {
            held.push(s);
        }
    });
    format!("http://{addr}/prefs.parquet")
}

fn job(url: &str, name: &str) -> Value {
    json!({"dataset_url": url, "method": "dspo", "adapter_name": name,
           "hyperparameters": {"max_steps": 2, "batch_size": 1, "resolution": 64}})
}

#[test]
fn keys_and_scopes_decide_who_may_call_what() {
    let server = common::start(config());
    // Open without a key: health, readiness, the API document.
    for path in ["/health", "/ready", "/openapi.json"] {
        let r = call(&server, "GET", path, None, None);
        assert!(r.status == 200 || (path == "/ready" && r.status == 503), "{path}: {}", r.status);
    }
    // No key, a wrong key: 401 with the scheme to use.
    let gen = json!({"prompt": "a red circle", "steps": 2, "width": 64, "height": 64, "seed": 1});
    for key in [None, Some("not-a-key-0123456789")] {
        let r = call(&server, "POST", "/generate", key, Some(&gen));
        assert_eq!(r.status, 401, "{:?}", r.json());
        assert_eq!(r.code(), "unauthorized");
        assert!(r.header("www-authenticate").unwrap_or_default().starts_with("Bearer"));
    }
    // A generate key runs inference and lists models and adapters ...
    let r = call(&server, "POST", "/generate", Some(GENERATE), Some(&gen));
    assert_eq!(r.status, 200, "{:?}", r.json());
    assert_eq!(call(&server, "GET", "/models", Some(GENERATE), None).status, 200);
    assert_eq!(call(&server, "GET", "/adapters", Some(GENERATE), None).status, 200);
    // ... and nothing else.
    let url = silent_dataset_url();
    for (method, path, body) in [
        ("POST", "/finetune", Some(job(&url, "x"))),
        ("GET", "/finetune", None),
        ("DELETE", "/adapters/x", None),
        ("GET", "/adapters/x/weights", None),
    ] {
        let r = call(&server, method, path, Some(GENERATE), body.as_ref());
        assert_eq!(r.status, 403, "{method} {path}: {:?}", r.json());
        assert_eq!(r.code(), "forbidden");
    }
    assert_eq!(call(&server, "GET", "/finetune", Some(FULL_A), None).status, 200);
}

#[test]
fn each_key_sees_and_limits_only_its_own_jobs() {
    let mut c = config();
    c.auth.max_active_jobs_per_key = 1;
    let server = common::start(c);
    let url = silent_dataset_url();
    let a = call(&server, "POST", "/finetune", Some(FULL_A), Some(&job(&url, "from-a")));
    assert_eq!(a.status, 202, "{:?}", a.json());
    let id = a.json()["job_id"].as_str().unwrap().to_string();

    // A second active job of the same key is refused; another key may still submit.
    let again = call(&server, "POST", "/finetune", Some(FULL_A), Some(&job(&url, "from-a-2")));
    assert_eq!(again.status, 429, "{:?}", again.json());
    assert_eq!(again.code(), "rate_limited");
    assert!(again.header("retry-after").is_some());
    let b = call(&server, "POST", "/finetune", Some(FULL_B), Some(&job(&url, "from-b")));
    assert_eq!(b.status, 202, "{:?}", b.json());
    let b_id = b.json()["job_id"].as_str().unwrap().to_string();

    // B cannot see, read or cancel A's job: to B it does not exist.
    for (method, path) in [
        ("GET", format!("/finetune/{id}")),
        ("GET", format!("/finetune/{id}/metrics")),
        ("GET", format!("/finetune/{id}/events")),
        ("DELETE", format!("/finetune/{id}")),
    ] {
        let r = call(&server, method, &path, Some(FULL_B), None);
        assert_eq!(r.status, 404, "{method} {path}: {:?}", r.json());
        assert_eq!(r.code(), "job_not_found");
    }
    let ids = |key| -> Vec<String> {
        call(&server, "GET", "/finetune", Some(key), None)
            .json()
            .as_array()
            .unwrap()
            .iter()
            .map(|j| j["id"].as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(ids(FULL_A), vec![id.clone()]);
    assert_eq!(ids(FULL_B), vec![b_id.clone()]);
    // The owner reads and cancels its own.
    assert_eq!(call(&server, "GET", &format!("/finetune/{id}"), Some(FULL_A), None).status, 200);
    for (key, job) in [(FULL_A, &id), (FULL_B, &b_id)] {
        let r = call(&server, "DELETE", &format!("/finetune/{job}"), Some(key), None);
        // 409 if its download already timed out (datasets.timeout_s) and ended the job.
        assert!(r.status == 200 || r.code() == "job_finished", "{:?}", r.json());
    }
}

#[test]
fn a_key_past_its_request_rate_gets_429_with_retry_after() {
    let mut c = config();
    c.auth.requests_per_minute = 3;
    let server = common::start(c);
    for _ in 0..3 {
        assert_eq!(call(&server, "GET", "/models", Some(FULL_A), None).status, 200);
    }
    let r = call(&server, "GET", "/models", Some(FULL_A), None);
    assert_eq!(r.status, 429, "{:?}", r.json());
    assert_eq!(r.code(), "rate_limited");
    let wait: u64 = r.header("retry-after").unwrap().parse().unwrap();
    assert!((1..=60).contains(&wait), "{wait}");
    // The limit is per key.
    assert_eq!(call(&server, "GET", "/models", Some(FULL_B), None).status, 200);
}

#[test]
fn cors_preflight_needs_no_key_and_names_the_origin() {
    let mut c = config();
    c.server.cors_origins = vec!["https://app.example.com".into()];
    let server = common::start(c);
    let r = agent()
        .request("OPTIONS", &server.url("/generate"))
        .set("origin", "https://app.example.com")
        .set("access-control-request-method", "POST")
        .set("access-control-request-headers", "authorization,content-type")
        .call()
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.header("access-control-allow-origin"),
        Some("https://app.example.com")
    );
    // The real request still needs its key.
    let r = call(&server, "GET", "/models", None, None);
    assert_eq!(r.status, 401);
}

#[test]
fn keys_from_a_file_may_be_stored_as_digests() {
    use sha2::Digest;
    let dir = temp_dir("keys");
    let file = dir.join("keys.txt");
    let digest = hex::encode(sha2::Sha256::digest(FULL_A.as_bytes()));
    std::fs::write(&file, format!("# operators\nsha256:{digest}\n\n{GENERATE}:generate\n")).unwrap();
    let mut c = config();
    c.auth.api_keys = vec![];
    c.auth.api_keys_file = file.display().to_string();
    let server = common::start(c);
    assert_eq!(call(&server, "GET", "/finetune", Some(FULL_A), None).status, 200);
    assert_eq!(call(&server, "GET", "/finetune", Some(GENERATE), None).status, 403);
    assert_eq!(call(&server, "GET", "/finetune", Some(FULL_B), None).status, 401);
}

#[test]
fn without_keys_a_network_address_needs_insecure_no_auth() {
    let bin = env!("CARGO_BIN_EXE_dspo-server");
    let model = format!("tiny={}", common::models_dir().join("tiny-sd15").display());
    let data = temp_dir("noauth");
    let out = Command::new(bin)
        .args(["serve", "--listen", "0.0.0.0:0", "--model", &model])
        .arg("--data-dir")
        .arg(&data)
        .env_remove("DSPO_AUTH_API_KEYS")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--insecure-no-auth") && err.contains("api_keys"), "{err}");

    let mut cmd = Command::new(bin);
    cmd.args(["serve", "--listen", "0.0.0.0:0", "--model", &model, "--insecure-no-auth"])
        .arg("--data-dir")
        .arg(&data)
        .env_remove("DSPO_AUTH_API_KEYS");
    let (mut child, _addr, logs) = common::spawn_server_process(cmd);
    let warned = std::iter::from_fn(|| logs.recv_timeout(Duration::from_millis(200)).ok())
        .take(50)
        .any(|l| l.contains("without API keys"));
    child.kill().unwrap();
    let _ = child.wait();
    assert!(warned, "no warning about serving without keys");

    // With keys from the environment it starts without the flag.
    let mut cmd = Command::new(bin);
    cmd.args(["serve", "--listen", "0.0.0.0:0", "--model", &model])
        .arg("--data-dir")
        .arg(&data)
        .env("DSPO_AUTH_API_KEYS", format!("{FULL_A},{GENERATE}:generate"));
    let (mut child, _addr, _logs) = common::spawn_server_process(cmd);
    child.kill().unwrap();
    let _ = child.wait();
}
