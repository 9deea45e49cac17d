//! Fine-tuning jobs through the JobManager: real HTTP downloads from a file server on
//! 127.0.0.1, real SQLite, real training of the tiny model, webhooks to a loopback receiver.

use dspo_server::jobs::{JobManager, JobSpec, JobStatus, JobsConfig};
use dspo_server::training::dataset::{read_all_rows, write_pairs_parquet, PairRow};
use dspo_server::training::Method;
mod common;

use common::fileserver::FileServer;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A Standard Webhooks secret (24 bytes, base64).
const WEBHOOK_SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

fn shared() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared")
}

/// A fresh directory per call: the tests run in parallel and several serve their own copy of
/// the same files (a name shared per process let one test delete another's while it copied).
fn tmp(name: &str) -> PathBuf {
    common::temp_dir(&format!("jobs-{name}"))
}

fn manager(data: &Path, allow_private: bool) -> Arc<JobManager> {
    let mut cfg = JobsConfig::new(data);
    cfg.fetch.allow_private_networks = allow_private;
    cfg.webhook_secret = Some(WEBHOOK_SECRET.into());
    cfg.webhook_retries = 2;
    cfg.webhook_progress_interval = Duration::ZERO;
    start_tiny(cfg)
}

/// A manager whose only model is the tiny SD1.5 of the conformance suite.
fn start_tiny(cfg: JobsConfig) -> Arc<JobManager> {
    let tiny = shared().join("conformance/models/tiny-sd15");
    JobManager::start(
        cfg,
        Arc::new(move |name: Option<&str>| match name {
            None | Some("tiny") => Some(("tiny".to_string(), tiny.clone())),
            _ => None,
        }),
        None,
    )
    .unwrap()
}

/// Config for a manager on loopback datasets where the tiny model's directory carries `own`
/// as its dspo_server.json `finetune` section.
fn with_model_defaults(data: &Path, own: serde_json::Value) -> JobsConfig {
    let mut cfg = JobsConfig::new(data);
    cfg.fetch.allow_private_networks = true;
    let defaults = dspo_server::jobs::FinetuneDefaults::default()
        .merged(&own)
        .unwrap();
    cfg.defaults.insert("tiny".into(), defaults);
    cfg
}

fn spec(url: &str, steps: usize) -> JobSpec {
    JobSpec {
        dataset_url: url.to_string(),
        base_model: None,
        method: Method::Dspo,
        adapter_name: None,
        lora: None,
        full_finetune: false,
        hyperparameters: Some(serde_json::json!({
            "max_steps": steps, "batch_size": 2, "max_pairs": 16, "resolution": 64,
            "learning_rate": 1e-3, "warmup_steps": 0, "checkpoint_every": 2
        })),
        webhook_url: None,
        webhook_events_filter: None,
        evaluation: None,
    }
}

/// Checks one webhook delivery with the Standard Webhooks reference library (PyPI
/// `standardwebhooks`, which .ci/run installs); says so and skips that part without it.
fn verify_with_standardwebhooks(headers: &std::collections::HashMap<String, String>, body: &[u8]) {
    const SCRIPT: &str = r#"
import json, sys
from standardwebhooks.webhooks import Webhook
secret, headers = sys.argv[1], json.loads(sys.argv[2])
payload = Webhook(secret).verify(sys.stdin.buffer.read(), headers)
print("verified", payload["type"])
"#;
    let installed = std::process::Command::new("python3")
        .args(["-c", "import standardwebhooks"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !installed {
        eprintln!("SKIPPED the standardwebhooks check: pip install standardwebhooks (.ci/run does)");
        return;
    }
    let wanted: std::collections::HashMap<&str, &str> = ["webhook-id", "webhook-timestamp", "webhook-signature"]
        .iter()
        .map(|k| (*k, headers.get(*k).map(String::as_str).unwrap_or_default()))
        .collect();
    let mut child = std::process::Command::new("python3")
        .args(["-c", SCRIPT, WEBHOOK_SECRET, &serde_json::to_string(&wanted).unwrap()])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(&mut child.stdin.take().unwrap(), body).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success() && String::from_utf8_lossy(&out.stdout).starts_with("verified"),
        "standardwebhooks refused a delivery: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn wait_for(
    m: &JobManager,
    id: &str,
    pred: impl Fn(&dspo_server::jobs::JobRecord) -> bool,
    secs: u64,
) -> dspo_server::jobs::JobRecord {
    let t0 = Instant::now();
    loop {
        let j = m.get(id).unwrap();
        if pred(&j) {
            return j;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(secs),
            "timed out waiting; job is {:?}",
            j
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn served_dir() -> (PathBuf, FileServer) {
    let root = tmp("www");
    std::fs::copy(
        shared().join("shapes/prefs_centered.parquet"),
        root.join("prefs.parquet"),
    )
    .unwrap();
    std::fs::copy(
        shared().join("shapes/prefs_centered_meta.parquet"),
        root.join("meta.parquet"),
    )
    .unwrap();
    std::fs::write(root.join("junk.bin"), b"certainly not a dataset \x00\x01").unwrap();
    std::fs::write(root.join("empty.parquet"), b"").unwrap();
    // A JSONL manifest with images as relative paths.
    let rows = read_all_rows(&shared().join("shapes/prefs_centered.parquet")).unwrap();
    std::fs::create_dir_all(root.join("img")).unwrap();
    let mut jsonl = String::new();
    for (i, r) in rows.iter().filter(|r| r.label_0 != 0.5).take(8).enumerate() {
        std::fs::write(root.join(format!("img/{i}_0.jpg")), &r.jpg_0).unwrap();
        std::fs::write(root.join(format!("img/{i}_1.jpg")), &r.jpg_1).unwrap();
        jsonl.push_str(&serde_json::json!({"caption": r.caption, "image_0": format!("img/{i}_0.jpg"), "image_1": format!("img/{i}_1.jpg"), "label_0": r.label_0}).to_string());
        jsonl.push('\n');
    }
    std::fs::write(root.join("pairs.jsonl"), jsonl).unwrap();
    // Corrupt JPEG rows only.
    let bad: Vec<_> = rows
        .iter()
        .filter(|r| r.label_0 != 0.5)
        .take(4)
        .map(|r| PairRow::new(r.caption.clone(), b"\xff\xd8junk".to_vec(), b"nope".to_vec(), r.label_0))
        .collect();
    write_pairs_parquet(&root.join("corrupt.parquet"), &bad, 2).unwrap();
    let server = FileServer::start(root.clone());
    (root, server)
}

#[test]
fn a_job_completes_registers_its_adapter_and_calls_the_webhook() {
    let (_root, www) = served_dir();
    let data = tmp("complete");
    let m = manager(&data, true);
    let mut s = spec(&www.url("prefs.parquet"), 3);
    s.adapter_name = Some("centred-v1".into());
    s.webhook_url = Some(www.url("hook"));
    s.webhook_events_filter = Some(vec![
        dspo_server::jobs::types::WebhookEvent::Start,
        dspo_server::jobs::types::WebhookEvent::Progress,
        dspo_server::jobs::types::WebhookEvent::Completed,
    ]);
    let job = m.submit(s).unwrap();
    assert_eq!(job.status, JobStatus::Queued);
    let done = wait_for(&m, &job.id, |j| j.status.is_terminal(), 300);
    assert_eq!(done.status, JobStatus::Completed, "{:?}", done.error);
    assert_eq!(done.adapter.as_deref(), Some("centred-v1"));
    let stats = done.dataset.unwrap();
    assert_eq!(stats["rows"], 4000);
    assert_eq!(stats["ties_dropped"], 200);
    assert_eq!(m.metrics(&job.id).unwrap().len(), 3);
    let adapters = m.adapters().unwrap();
    assert_eq!(adapters.len(), 1);
    assert_eq!(adapters[0].method, "dspo");
    let file = m.adapter_file("centred-v1").unwrap();
    dspo_server::models::lora::LoraAdapter::load(&file, &candle_core::Device::Cpu).unwrap();
    // The same name cannot be taken twice.
    let mut again = spec(&www.url("prefs.parquet"), 1);
    again.adapter_name = Some("centred-v1".into());
    assert!(matches!(
        m.submit(again),
        Err(dspo_server::jobs::JobError::AdapterExists(_))
    ));

    // Every event the filter asked for arrives, signed; the last says the job completed.
    let t0 = Instant::now();
    let types = || -> Vec<String> {
        www.posts
            .lock()
            .unwrap()
            .iter()
            .map(|(_, b)| serde_json::from_slice::<serde_json::Value>(b).unwrap()["type"].as_str().unwrap().to_string())
            .collect()
    };
    while !types().iter().any(|t| t == "job.completed") && t0.elapsed() < Duration::from_secs(30) {
        std::thread::sleep(Duration::from_millis(50));
    }
    let seen = types();
    for t in ["job.started", "job.progress", "job.completed"] {
        assert!(seen.iter().any(|s| s == t), "no {t} webhook among {seen:?}");
    }
    let secret = dspo_server::jobs::webhook::WebhookSecret::parse(WEBHOOK_SECRET).unwrap();
    let other = dspo_server::jobs::webhook::WebhookSecret::parse(
        "whsec_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
    )
    .unwrap();
    let posts = www.posts.lock().unwrap();
    let mut ids = std::collections::HashSet::new();
    for (headers, body) in posts.iter() {
        let (id, ts, sig) = (
            headers.get("webhook-id").expect("webhook-id"),
            headers.get("webhook-timestamp").expect("webhook-timestamp"),
            headers.get("webhook-signature").expect("webhook-signature"),
        );
        let ts: u64 = ts.parse().unwrap();
        assert!(secret.verify(id, ts, body, sig), "bad signature {sig}");
        assert!(!other.verify(id, ts, body, sig));
        assert!(ids.insert(id.clone()), "webhook-id {id} used for two events");
        verify_with_standardwebhooks(headers, body);
    }
    let last: serde_json::Value =
        serde_json::from_slice(&posts.iter().rev().find(|(_, b)| b.windows(13).any(|w| w == b"job.completed")).unwrap().1).unwrap();
    assert_eq!(last["data"]["id"], job.id.as_str());
    assert_eq!(last["data"]["status"], "completed");
    assert!(last["timestamp"].as_str().unwrap().ends_with('Z'));
    drop(posts);

    m.delete_adapter("centred-v1").unwrap();
    assert!(m.adapter_file("centred-v1").is_err());
    assert!(m.adapters().unwrap().is_empty());
    m.shutdown();
}

#[test]
fn cancel_stops_only_its_job_and_jsonl_manifests_work() {
    let (_root, www) = served_dir();
    let data = tmp("cancel");
    let m = manager(&data, true);
    let mut held = spec(&www.url("prefs.parquet"), 1000);
    held.adapter_name = Some("held".into());
    let long = m.submit(held.clone()).unwrap();
    // Requests past the server's limits are refused up front, each naming its setting.
    for (key, value, setting) in [
        ("max_steps", serde_json::json!(1_000_000_000_000u64), "jobs.max_steps"),
        ("batch_size", serde_json::json!(100_000), "jobs.max_pairs_per_step"),
    ] {
        let mut big = spec(&www.url("prefs.parquet"), 2);
        big.hyperparameters.as_mut().unwrap()[key] = value;
        match m.submit(big) {
            Err(dspo_server::jobs::JobError::Invalid(e)) => assert!(e.contains(setting), "{e}"),
            other => panic!("{key}: {other:?}"),
        }
    }
    let mut big = spec(&www.url("prefs.parquet"), 2);
    big.lora = Some(serde_json::from_value(serde_json::json!({"rank": 100_000})).unwrap());
    match m.submit(big) {
        Err(dspo_server::jobs::JobError::Invalid(e)) => assert!(e.contains("jobs.max_lora_rank"), "{e}"),
        other => panic!("lora rank: {other:?}"),
    }
    // A queued or running job reserves its adapter name: a second job may not take it.
    assert!(matches!(
        m.submit(held.clone()),
        Err(dspo_server::jobs::JobError::AdapterExists(n)) if n == "held"
    ));
    // ... in any case, since a case-insensitive filesystem would make them one directory.
    let mut upper = held.clone();
    upper.adapter_name = Some("HELD".into());
    assert!(matches!(m.submit(upper), Err(dspo_server::jobs::JobError::AdapterExists(_))));
    let queued = m.submit(spec(&www.url("pairs.jsonl"), 2)).unwrap();
    let third = m.submit(spec(&www.url("pairs.jsonl"), 2)).unwrap();
    wait_for(
        &m,
        &long.id,
        |j| {
            j.status == JobStatus::Training
                && j.progress.as_ref().map(|p| p.step >= 1).unwrap_or(false)
        },
        120,
    );
    // Cancelling a queued job leaves the running one alone.
    let c = m.cancel(&third.id).unwrap();
    assert_eq!(c.status, JobStatus::Cancelled);
    assert_eq!(m.get(&long.id).unwrap().status, JobStatus::Training);
    let c = m.cancel(&long.id).unwrap();
    assert!(!c.status.is_terminal() || c.status == JobStatus::Cancelled);
    let l = wait_for(&m, &long.id, |j| j.status.is_terminal(), 60);
    assert_eq!(l.status, JobStatus::Cancelled);
    // A cancelled job registers nothing: its name is free again.
    let again = m.submit(held).unwrap();
    assert_eq!(m.cancel(&again.id).unwrap().status, JobStatus::Cancelled);
    // The JSONL job then runs to completion.
    let q = wait_for(&m, &queued.id, |j| j.status.is_terminal(), 300);
    assert_eq!(q.status, JobStatus::Completed, "{:?}", q.error);
    assert_eq!(q.dataset.unwrap()["kept"], 8);
    assert_eq!(m.get(&third.id).unwrap().status, JobStatus::Cancelled);
    m.shutdown();
}

#[test]
fn malformed_datasets_fail_the_job_with_a_clear_error() {
    let (_root, www) = served_dir();
    let data = tmp("malformed");
    let m = manager(&data, true);
    let cases = [
        ("meta.parquet", "missing required column"),
        ("junk.bin", "neither parquet nor"),
        ("empty.parquet", "empty"),
        ("missing.parquet", "HTTP 404"),
        ("corrupt.parquet", "undecodable"),
    ];
    let ids: Vec<_> = cases
        .iter()
        .map(|(f, _)| m.submit(spec(&www.url(f), 1)).unwrap().id)
        .collect();
    for ((file, needle), id) in cases.iter().zip(&ids) {
        let j = wait_for(&m, id, |j| j.status.is_terminal(), 120);
        assert_eq!(j.status, JobStatus::Failed, "{file}");
        let e = j.error.unwrap();
        assert!(e.message.contains(needle), "{file}: {}", e.message);
        assert!(e.code == "dataset_error", "{file}: {}", e.code);
    }
    // Bad requests are refused before queueing.
    let mut s = spec("ftp://example.com/x.parquet", 1);
    assert!(m.submit(s.clone()).is_err());
    s.dataset_url = www.url("prefs.parquet");
    s.hyperparameters = Some(serde_json::json!({"beta": -1}));
    assert!(m
        .submit(s.clone())
        .unwrap_err()
        .to_string()
        .contains("beta"));
    s.hyperparameters = Some(serde_json::json!({"max_stepz": 3}));
    assert!(m
        .submit(s.clone())
        .unwrap_err()
        .to_string()
        .contains("max_stepz"));
    s.hyperparameters = None;
    s.base_model = Some("nope".into());
    assert!(m.submit(s.clone()).is_err());
    m.shutdown();
}

#[test]
fn private_addresses_are_refused_unless_allowed() {
    let (_root, www) = served_dir();
    let data = tmp("ssrf");
    let m = manager(&data, false);
    let j = m.submit(spec(&www.url("prefs.parquet"), 1)).unwrap();
    let j = wait_for(&m, &j.id, |j| j.status.is_terminal(), 60);
    assert_eq!(j.status, JobStatus::Failed);
    assert!(j.error.unwrap().message.contains("private"));
    m.shutdown();
}

#[test]
fn a_restart_resumes_training_from_the_last_checkpoint() {
    let (_root, www) = served_dir();
    let data = tmp("restart");
    let m = manager(&data, true);
    let job = m.submit(spec(&www.url("prefs.parquet"), 6)).unwrap();
    wait_for(
        &m,
        &job.id,
        |j| j.progress.as_ref().map(|p| p.step >= 3).unwrap_or(false),
        120,
    );
    m.shutdown();
    // Let the worker notice the shutdown at its next step boundary.
    std::thread::sleep(Duration::from_secs(2));
    let j = m.get(&job.id).unwrap();
    assert!(
        !j.status.is_terminal(),
        "an interrupted job stays resumable: {:?}",
        j.status
    );
    drop(m);
    // What resuming reads: the newest checkpoint of the interrupted run.
    let checkpoints = data.join(format!("jobs/{}/train/checkpoints", job.id));
    assert!(checkpoints.join("step-00000002").exists());

    let m2 = manager(&data, true);
    let done = wait_for(&m2, &job.id, |j| j.status.is_terminal(), 300);
    assert_eq!(done.status, JobStatus::Completed, "{:?}", done.error);
    let steps: Vec<usize> = m2
        .metrics(&job.id)
        .unwrap()
        .iter()
        .map(|s| s.step)
        .collect();
    assert_eq!(steps, vec![1, 2, 3, 4, 5, 6]);
    // Once it ended, only the adapter and the record remain (jobs.keep_job_files = false).
    assert!(!data.join(format!("jobs/{}", job.id)).exists());
    m2.shutdown();
}

#[test]
fn a_models_per_method_defaults_reach_only_jobs_of_that_method() {
    // As a model directory's dspo_server.json would say it: one learning rate for every method,
    // DSPO's own beta and learning rate on top (models/shapes ships this shape of defaults).
    let (_root, www) = served_dir();
    let data = tmp("by-method");
    let own = serde_json::json!({
        "hyperparameters": {"learning_rate": 1e-3, "batch_size": 2, "max_pairs": 16,
                            "resolution": 64, "warmup_steps": 0},
        "by_method": {"dspo": {"beta": 0.5, "learning_rate": 2e-3}},
        "beta_by_method": {"diffusion_dpo": 2500.0}
    });
    let m = start_tiny(with_model_defaults(&data, own));
    let mut used = std::collections::BTreeMap::new();
    for method in [Method::Dspo, Method::DiffusionDpo, Method::Sft] {
        let mut s = spec(&www.url("prefs.parquet"), 1);
        s.method = method;
        // Only the step count: everything else comes from the model's defaults.
        s.hyperparameters = Some(serde_json::json!({"max_steps": 1}));
        s.adapter_name = Some(format!("m-{}", method.name()));
        let job = m.submit(s).unwrap();
        let done = wait_for(&m, &job.id, |j| j.status.is_terminal(), 300);
        assert_eq!(done.status, JobStatus::Completed, "{:?}", done.error);
        let info = m
            .adapters()
            .unwrap()
            .into_iter()
            .find(|a| a.name == format!("m-{}", method.name()))
            .unwrap();
        used.insert(method.name(), info.hyperparameters);
    }
    assert_eq!(used["dspo"]["beta"], 0.5);
    assert_eq!(used["dspo"]["learning_rate"], 2e-3);
    assert_eq!(used["diffusion_dpo"]["beta"], 2500.0);
    assert_eq!(used["diffusion_dpo"]["learning_rate"], 1e-3);
    assert_eq!(used["sft"]["learning_rate"], 1e-3);
    assert_eq!(used["sft"]["batch_size"], 2);
    m.shutdown();
}

#[test]
fn a_partial_lora_request_keeps_the_models_rank_and_alpha() {
    // The model says rank 2 / alpha 4; the request only moves the adapter to the
    // self-attention queries. The adapter file must have exactly those modules, at rank 2 and
    // alpha 4.
    let (_root, www) = served_dir();
    let data = tmp("partial-lora");
    let cfg = with_model_defaults(
        &data,
        serde_json::json!({"lora": {"rank": 2, "alpha": 4.0}}),
    );
    let m = start_tiny(cfg.clone());
    let mut s = spec(&www.url("prefs.parquet"), 1);
    s.adapter_name = Some("self-q".into());
    s.lora = Some(
        serde_json::from_value(serde_json::json!({"target_modules": ["attn1.to_q"]})).unwrap(),
    );
    let job = m.submit(s).unwrap();
    let done = wait_for(&m, &job.id, |j| j.status.is_terminal(), 300);
    assert_eq!(done.status, JobStatus::Completed, "{:?}", done.error);
    let file = cfg.adapters().weights("self-q");
    let adapter =
        dspo_server::models::lora::LoraAdapter::load(&file, &candle_core::Device::Cpu).unwrap();
    assert!(!adapter.modules.is_empty());
    for (name, module) in &adapter.modules {
        assert!(name.ends_with(".attn1.to_q"), "unexpected module {name}");
        assert_eq!((module.rank(), module.alpha), (2, 4.0), "{name}");
    }
    // Every self-attention query of the UNet, not a subset.
    let queries = adapter.modules.len();
    let mut s = spec(&www.url("prefs.parquet"), 1);
    s.adapter_name = Some("all".into());
    let job = m.submit(s).unwrap();
    let done = wait_for(&m, &job.id, |j| j.status.is_terminal(), 300);
    assert_eq!(done.status, JobStatus::Completed, "{:?}", done.error);
    let all = dspo_server::models::lora::LoraAdapter::load(
        &cfg.adapters().weights("all"),
        &candle_core::Device::Cpu,
    )
    .unwrap();
    assert_eq!(
        all.modules
            .keys()
            .filter(|k| k.ends_with(".attn1.to_q"))
            .count(),
        queries
    );
    // The model's default targets: every attention projection (q, k, v, out of attn1 and attn2).
    assert_eq!(all.modules.len(), 8 * queries);
    m.shutdown();
}

#[test]
fn file_urls_outside_the_roots_are_refused_at_submission_without_probing_the_filesystem() {
    let data = tmp("fileurl");
    let m = manager(&data, true);
    let mut words = Vec::new();
    for url in ["file:///etc/passwd", "file:///etc/no-such-file", "file://localhost/../etc/passwd"] {
        match m.submit(spec(url, 1)) {
            Err(dspo_server::jobs::JobError::Invalid(msg)) => words.push(msg.replace(url, "<url>")),
            other => panic!("{url}: {other:?}"),
        }
    }
    assert!(words.iter().all(|w| w == &words[0]), "{words:?}");
    assert!(m.list(None).unwrap().is_empty(), "a refused job must not be queued");
}
