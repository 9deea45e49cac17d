//! The drift guard of fine-tuning jobs: every `drift_every` steps the job samples a fixed probe
//! (the dataset's first captions, fixed seeds) with the tuned and the base model and reports the
//! mean absolute pixel difference in the step's metrics; past `drift_limit` the job fails with
//! `drift_exceeded`, the measured drift in its message.

mod common;

use serde_json::{json, Value};

fn run(server: &dspo_server::api::running::RunningServer, url: &str, hyper: Value) -> (Value, Vec<Value>) {
    let mut h = json!({"max_steps": 3, "batch_size": 2, "max_pairs": 8, "learning_rate": 5e-2,
                       "resolution": 64, "warmup_steps": 0});
    for (k, v) in hyper.as_object().unwrap() {
        h[k] = v.clone();
    }
    common::finetune(server, &json!({
        "dataset_url": url, "method": "dspo", "lora": {"rank": 2, "alpha": 2.0}, "hyperparameters": h}))
}

#[test]
fn drift_is_reported_and_bounded() {
    let www = common::shapes_pairs_server();
    let mut c = common::tiny_config();
    c.models.serve.truncate(1);
    c.datasets.allow_private_networks = true;
    let server = common::start(c);
    let url = www.url("prefs.parquet");

    // Reported at every check (here every step), growing from zero as the adapter learns.
    let (job, metrics) = run(&server, &url, json!({"drift_every": 1}));
    assert_eq!(job["status"], "completed", "{job}");
    let drift: Vec<f64> = metrics.iter().map(|m| m["drift"].as_f64().unwrap()).collect();
    assert_eq!(drift.len(), 3);
    assert!(drift.iter().all(|d| (0.0..=1.0).contains(d)), "{drift:?}");
    assert!(drift[2] > 0.0, "the tuned model's probe images never moved: {drift:?}");

    // Past the bound the job stops with a reason, the measured step in its metrics.
    let (job, metrics) = run(&server, &url, json!({"drift_every": 1, "drift_limit": 1e-9}));
    assert_eq!(job["status"], "failed", "{job}");
    assert_eq!(job["error"]["code"], "drift_exceeded", "{job}");
    let message = job["error"]["message"].as_str().unwrap();
    assert!(message.contains("drift_limit") && message.contains("after step 1"), "{message}");
    // The step that passed the bound is recorded with its drift, and none after it.
    assert_eq!(metrics.len(), 1, "the job went on past the bound: {metrics:?}");
    assert!(metrics[0]["drift"].as_f64().unwrap() > 1e-9, "{metrics:?}");

    // Off: no drift in the metrics.
    let (job, metrics) = run(&server, &url, json!({"drift_every": 0}));
    assert_eq!(job["status"], "completed");
    assert!(metrics.iter().all(|m| m.get("drift").is_none()), "{metrics:?}");
}
