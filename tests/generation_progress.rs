//! One generation's progress and cancel, by request id, against a real server on 127.0.0.1:
//! GET /generations/{id} while it is queued and while it runs, POST .../cancel answering the
//! waiting request 409, a second key that cannot see or cancel it, A1111's /sdapi/v1/progress
//! and /interrupt, and /generate as a stream of server-sent progress events whose result is
//! the same image as the plain request's. A batch hook holds the worker inside a batch (prompt
//! "hold"), so "running" and "queued" are states, not timings.

mod common;

use common::*;
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Write};

const KEY_A: &str = "progress-key-a-0123456789";
const KEY_B: &str = "progress-key-b-0123456789";

fn config() -> dspo_server::config::Config {
    let mut c = tiny_config();
    c.models.serve.truncate(1);
    c.batching.max_batch = 1;
    c.auth.api_keys = vec![KEY_A.into(), KEY_B.into()];
    c
}

fn call(
    server: &dspo_server::api::running::RunningServer,
    method: &str,
    path: &str,
    key: &str,
    extra: &[(&str, &str)],
    body: Option<&Value>,
) -> Reply {
    let auth = format!("Bearer {key}");
    let mut headers = vec![("authorization", auth.as_str())];
    headers.extend_from_slice(extra);
    request(server, method, path, &headers, body)
}

#[test]
fn a_generation_reports_its_stage_and_is_cancelled_by_id() {
    let gate = Gate::default();
    let server = start_with_hook(config(), gate.hook());
    std::thread::scope(|s| {
        let server = &server;
        let running = s.spawn(move || {
            call(server, "POST", "/generate", KEY_A, &[("x-request-id", "gen-running")],
                 Some(&json!({"prompt": "hold", "steps": 3, "seed": 1})))
        });
        gate.wait_holding();
        let queued = s.spawn(move || {
            call(server, "POST", "/generate", KEY_A, &[("x-request-id", "gen-queued")],
                 Some(&json!({"prompt": "a red circle", "steps": 3, "seed": 2})))
        });
        wait_until(30, "the second request to be registered", || {
            call(server, "GET", "/generations/gen-queued", KEY_A, &[], None).status == 200
        });

        let r = call(server, "GET", "/generations/gen-running", KEY_A, &[], None);
        assert_eq!(r.status, 200, "{:?}", r.json());
        assert_eq!(r.json()["stage"], "denoising");
        assert_eq!(r.json()["model"], "tiny-sd15");
        assert_eq!(r.json()["batch_size"], 1);
        let q = call(server, "GET", "/generations/gen-queued", KEY_A, &[], None).json();
        assert_eq!(q["stage"], "queued");
        assert_eq!(q["progress"], 0.0);
        let list = call(server, "GET", "/generations", KEY_A, &[], None).json();
        let ids: Vec<&str> = list["generations"]
            .as_array()
            .unwrap()
            .iter()
            .map(|g| g["id"].as_str().unwrap())
            .collect();
        assert_eq!(ids, ["gen-running", "gen-queued"]);

        // Another key sees none of it and cannot cancel it.
        let other = call(server, "GET", "/generations/gen-running", KEY_B, &[], None);
        assert_eq!((other.status, other.code().as_str()), (404, "generation_not_found"));
        let other = call(server, "POST", "/generations/gen-queued/cancel", KEY_B, &[], None);
        assert_eq!(other.status, 404);
        let none = call(server, "GET", "/generations", KEY_B, &[], None).json();
        assert_eq!(none["generations"], json!([]));
        let a1111 = call(server, "GET", "/sdapi/v1/progress", KEY_B, &[], None).json();
        assert_eq!(a1111["state"]["job_count"], 0);

        // A request id still in flight cannot be claimed twice.
        let dup = call(server, "POST", "/generate", KEY_A, &[("x-request-id", "gen-running")],
                       Some(&json!({"prompt": "x", "steps": 1})));
        assert_eq!((dup.status, dup.code().as_str()), (409, "request_id_in_use"));

        // A1111's view: the running one is the current job, two in flight.
        let a1111 = call(server, "GET", "/sdapi/v1/progress", KEY_A, &[], None).json();
        assert_eq!(a1111["state"]["job"], "gen-running");
        assert_eq!(a1111["state"]["job_count"], 2);
        assert!(a1111["progress"].as_f64().unwrap() < 1.0);

        let c = call(server, "POST", "/generations/gen-queued/cancel", KEY_A, &[], None);
        assert_eq!(c.status, 202, "{:?}", c.json());
        assert_eq!(c.json()["stage"], "queued");
        let r = queued.join().unwrap();
        assert_eq!((r.status, r.code().as_str()), (409, "generation_cancelled"));
        assert_eq!(
            call(server, "GET", "/generations/gen-queued", KEY_A, &[], None).status,
            404
        );

        // A1111's interrupt cancels the caller's running generation too.
        let i = call(server, "POST", "/sdapi/v1/interrupt", KEY_A, &[], Some(&json!({})));
        assert_eq!(i.status, 200);
        let r = running.join().unwrap();
        assert_eq!((r.status, r.code().as_str()), (409, "generation_cancelled"));
        gate.release();
    });
    // The held batch lost its only client and is abandoned; the worker serves the next one.
    wait_until(30, "the abandoned batch to be counted", || {
        call(&server, "GET", "/health", KEY_A, &[], None).json()["models"][0]["cancelled_in_compute"] == 1
    });
    let after = call(&server, "POST", "/generate", KEY_A, &[],
                     Some(&json!({"prompt": "a red circle", "steps": 2, "seed": 3})));
    assert_eq!(after.status, 200);
    assert_eq!(call(&server, "GET", "/generations", KEY_A, &[], None).json()["generations"], json!([]));
    let missing = call(&server, "POST", "/generations/nope/cancel", KEY_A, &[], None);
    assert_eq!((missing.status, missing.code().as_str()), (404, "generation_not_found"));
}

/// Reads a server-sent event stream to its end: (event, data) pairs.
fn read_events(server: &dspo_server::api::running::RunningServer, path: &str, body: &Value) -> Vec<(String, Value)> {
    let mut sock = std::net::TcpStream::connect(server.addr).unwrap();
    let body = body.to_string();
    write!(
        sock,
        "POST {path} HTTP/1.1\r\nHost: {}\r\nAuthorization: Bearer {KEY_A}\r\nAccept: text/event-stream\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        server.addr,
        body.len()
    )
    .unwrap();
    let reader = BufReader::new(sock);
    let mut lines = reader.lines().map(Result::unwrap);
    let status = lines.next().unwrap();
    assert!(status.contains(" 200 "), "{status}");
    let mut headers = Vec::new();
    for l in lines.by_ref() {
        if l.is_empty() {
            break;
        }
        headers.push(l.to_ascii_lowercase());
    }
    assert!(headers.iter().any(|h| h.starts_with("content-type: text/event-stream")), "{headers:?}");
    // Chunked transfer: chunk-size lines interleave with the event lines; keep the event lines.
    let (mut out, mut event) = (Vec::new(), String::new());
    for l in lines {
        if let Some(e) = l.strip_prefix("event: ").or_else(|| l.strip_prefix("event:")) {
            event = e.trim().to_string();
        } else if let Some(d) = l.strip_prefix("data: ").or_else(|| l.strip_prefix("data:")) {
            out.push((event.clone(), serde_json::from_str(d.trim()).unwrap()));
            if event == "result" || event == "error" {
                break;
            }
        }
    }
    out
}

#[test]
fn generate_streams_progress_events_then_the_same_result() {
    let server = start(config());
    let body = json!({"prompt": "a blue square", "steps": 4, "seed": 11});
    let events = read_events(&server, "/generate", &body);
    let (last, result) = events.last().unwrap();
    assert_eq!(last, "result", "{events:?}");
    let progress: Vec<&Value> = events.iter().filter(|(e, _)| e == "progress").map(|(_, d)| d).collect();
    assert!(!progress.is_empty());
    let mut prev = 0;
    for p in &progress {
        let step = p["step"].as_u64().unwrap();
        assert!(step >= prev && step <= 4, "{progress:?}");
        assert!(["queued", "denoising", "finished"].contains(&p["stage"].as_str().unwrap()));
        prev = step;
    }
    let plain = call(&server, "POST", "/generate", KEY_A, &[], Some(&body));
    let streamed = unb64(result["images"][0]["png_base64"].as_str().unwrap());
    assert_eq!(pixels(&streamed), pixels(&pngs(&plain)[0]));

    // A validation error is a plain 422 before any stream starts.
    let bad = call(&server, "POST", "/generate", KEY_A, &[("accept", "text/event-stream")],
                   Some(&json!({"prompt": "x", "steps": 0})));
    assert_eq!((bad.status, bad.code().as_str()), (422, "invalid_steps"));
}
