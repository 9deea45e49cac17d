//! The `dspo-server` binary itself: `serve` end to end (flags, environment, graceful shutdown
//! on SIGTERM), its refusal to start without a model, and `openapi`.

mod common;

use common::*;
use serde_json::json;
use std::process::{Child, Command};
use std::sync::mpsc;

const BIN: &str = env!("CARGO_BIN_EXE_dspo-server");

/// Starts `serve` and returns the child and its address, read from the "listening on" line.
fn spawn_serve(args: &[&str], env: &[(&str, &str)]) -> (Child, String, mpsc::Receiver<String>) {
    let mut cmd = Command::new(BIN);
    cmd.arg("serve").args(args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    spawn_server_process(cmd)
}

fn http(addr: &str) -> String {
    format!("http://{addr}")
}

fn call(r: Result<ureq::Response, ureq::Error>) -> (u16, serde_json::Value) {
    match r {
        Ok(r) => (r.status(), r.into_json().unwrap()),
        Err(ureq::Error::Status(s, r)) => (s, r.into_json().unwrap()),
        Err(e) => panic!("{e}"),
    }
}

#[test]
fn sigterm_finishes_in_flight_work_then_exits_0() {
    let sd15 = models_dir().join("tiny-sd15");
    let data = temp_dir("proc");
    let model = format!("tiny={}", sd15.display());
    let (mut child, addr, _log) = spawn_serve(
        &[
            "--listen",
            "127.0.0.1:0",
            "--model",
            &model,
            "--data-dir",
            data.to_str().unwrap(),
        ],
        &[
            ("DSPO_LIMITS_MAX_STEPS", "400"),
            ("DSPO_BATCHING_QUEUE_SIZE", "7"),
        ],
    );
    let base = http(&addr);
    wait_until(60, "ready", || {
        ureq::get(&format!("{base}/ready")).call().is_ok()
    });
    let (status, models) = call(ureq::get(&format!("{base}/models")).call());
    assert_eq!(status, 200);
    assert_eq!(models["models"][0]["name"], "tiny");
    // The environment reached the config: 400 steps are accepted, 401 are not.
    let (status, err) = call(
        ureq::post(&format!("{base}/generate")).send_json(json!({"prompt": "x", "steps": 401})),
    );
    assert_eq!(
        (status, err["error"]["code"].as_str().unwrap()),
        (422, "invalid_steps")
    );

    // A slow request is in flight when SIGTERM arrives; it still completes.
    let url = format!("{base}/generate");
    let in_flight = std::thread::spawn(move || {
        call(ureq::post(&url).send_json(json!({"prompt": "slow", "steps": 400, "seed": 1})))
    });
    wait_until(30, "the slow batch to start", || {
        let (_, h) = call(ureq::get(&format!("{base}/health")).call());
        h["models"][0]["batches"] == 1
    });
    let killed = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let (status, body) = in_flight.join().unwrap();
    assert_eq!(status, 200, "the in-flight request finished: {body}");
    assert_eq!(body["images"].as_array().unwrap().len(), 1);
    let exit = child.wait().unwrap();
    assert!(exit.success(), "graceful shutdown exits 0, got {exit:?}");
    assert!(
        std::net::TcpStream::connect(&addr).is_err(),
        "no longer listening"
    );
}

#[test]
fn serve_without_a_model_says_how_to_name_one() {
    let empty = temp_dir("nomodel");
    let out = Command::new(BIN)
        .arg("serve")
        .arg("--listen")
        .arg("127.0.0.1:0")
        .current_dir(&empty)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--model NAME=DIR_OR_HUB_ID"), "{err}");
    assert!(err.contains("models/shapes"), "{err}");
}

#[test]
fn a_model_that_fails_to_load_stops_the_server() {
    let empty = temp_dir("badmodel");
    let model = format!("broken={}", empty.display());
    let out = Command::new(BIN)
        .args(["serve", "--listen", "127.0.0.1:0", "--model", &model])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("broken") && err.contains("model_index.json"),
        "{err}"
    );
}

#[test]
fn openapi_subcommand_prints_the_committed_document() {
    let out = Command::new(BIN).arg("openapi").output().unwrap();
    assert!(out.status.success());
    let committed =
        std::fs::read(concat!(env!("CARGO_MANIFEST_DIR"), "/openapi/openapi.json")).unwrap();
    assert!(
        out.stdout == committed,
        "`dspo-server openapi` differs from openapi/openapi.json: regenerate and review it"
    );
}
