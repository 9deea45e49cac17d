//! Model placement: a model served on several devices has one worker per replica; /models
//! lists its devices, /health and /ready each replica, and a request goes to the
//! least-loaded replica, so one held busy does not stall the next request. A bad placement
//! fails start-up with its reason.

mod common;

use common::{get, post_json, Gate};
use dspo_server::api::running::RunningServer;
use serde_json::json;

#[test]
fn replicas_share_a_model_and_requests_go_to_the_least_loaded() {
    let gate = Gate::default();
    let mut c = common::tiny_config();
    let dir = common::models_dir();
    c.models.serve = vec![
        format!("tiny-sd15={}@cpu,cpu", dir.join("tiny-sd15").display()),
        format!("tiny-ip2p={}", dir.join("tiny-ip2p").display()),
    ];
    let server = common::start_with_hook(c, gate.hook());

    let models = get(&server, "/models").json();
    let entries = models["models"].as_array().unwrap();
    assert_eq!(entries.len(), 2, "one entry per model, not per replica: {models}");
    assert_eq!(entries[0]["devices"], json!(["cpu", "cpu"]));
    assert_eq!(entries[1]["devices"], json!(["cpu"]));
    let ready = get(&server, "/ready").json();
    assert_eq!(ready["models"].as_array().unwrap().len(), 3, "{ready}");

    // One replica is held inside a batch; the next request must be computed by the other.
    let held = {
        let addr = server.url("/generate");
        std::thread::spawn(move || {
            common::agent()
                .post(&addr)
                .send_json(json!({"prompt": "hold", "steps": 2, "model": "tiny-sd15"}))
                .map(|r| r.status())
        })
    };
    gate.wait_holding();
    let r = post_json(&server, "/generate", &json!({"prompt": "a red circle", "steps": 2, "model": "tiny-sd15"}));
    assert_eq!(r.status, 200, "the free replica answers while the other is held");
    gate.release();
    assert_eq!(held.join().unwrap().unwrap(), 200);

    let health = get(&server, "/health").json();
    let replicas: Vec<_> = health["models"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| m["name"] == "tiny-sd15")
        .collect();
    assert_eq!(replicas.len(), 2, "{health}");
    for r in &replicas {
        assert_eq!(r["device"], "cpu");
        assert_eq!(r["requests_computed"], 1, "each replica computed one request: {health}");
    }
}

#[test]
fn a_bad_placement_fails_start_up_with_its_reason() {
    let mut c = common::tiny_config();
    c.models.serve.truncate(1);
    c.models.devices.insert("tiny-sd15".into(), vec!["cuda:7".into()]);
    let err = RunningServer::start(c.clone(), None).err().expect("no CUDA in this build or machine");
    assert!(err.to_string().contains("cuda:7"), "{err}");

    c.models.devices.clear();
    c.models.devices.insert("nonexistent".into(), vec!["cpu".into()]);
    let err = RunningServer::start(c, None).err().expect("an unknown model name is refused");
    assert!(err.to_string().contains("nonexistent"), "{err}");
}
