//! Admission control, batching, disconnects and worker panics, against a real server on
//! 127.0.0.1. A batch hook holds the worker inside a batch (prompt "hold") so requests can be
//! queued behind it deterministically instead of by timing.

mod common;

use common::*;
use serde_json::json;
use std::io::{Read, Write};
use std::time::Duration;

fn only_sd15(mut c: dspo_server::config::Config) -> dspo_server::config::Config {
    c.models.serve.truncate(1);
    c
}

#[test]
fn twelve_parallel_requests_end_200_or_429_never_5xx() {
    let mut config = only_sd15(tiny_config());
    config.batching.queue_size = 3;
    config.batching.max_batch = 4;
    config.batching.retry_after_s = 2;
    let gate = Gate::default();
    let server = start_with_hook(config, gate.hook());
    let statuses: Vec<(u16, Option<String>, String)> = std::thread::scope(|s| {
        let server = &server;
        let hold = s.spawn(move || {
            post_json(
                server,
                "/generate",
                &json!({"prompt": "hold", "steps": 2, "seed": 0}),
            )
        });
        gate.wait_holding();
        let others: Vec<_> = (1..12)
            .map(|i| {
                s.spawn(move || {
                    post_json(
                        server,
                        "/generate",
                        &json!({"prompt": format!("p{i}"), "steps": 2, "seed": i}),
                    )
                })
            })
            .collect();
        // Refusals come back at once; admitted requests wait for the gate.
        wait_until(30, "three admitted and eight refused", || {
            let h = health_of(server, "tiny-sd15");
            h["queue_depth"] == 3 && h["rejected_queue_full"] == 8
        });
        gate.release();
        std::iter::once(hold)
            .chain(others)
            .map(|h| {
                let r = h.join().unwrap();
                (
                    r.status,
                    r.header("retry-after").map(str::to_string),
                    r.code(),
                )
            })
            .collect()
    });
    let ok = statuses.iter().filter(|s| s.0 == 200).count();
    let refused: Vec<_> = statuses.iter().filter(|s| s.0 == 429).collect();
    assert_eq!(ok + refused.len(), 12, "only 200 or 429: {statuses:?}");
    assert_eq!(ok, 4, "the held request plus a queue of three");
    for r in refused {
        assert_eq!(r.1.as_deref(), Some("2"), "429 carries Retry-After");
        assert_eq!(r.2, "queue_full");
    }
    let h = health_of(&server, "tiny-sd15");
    assert_eq!(h["requests_computed"], 4);
    assert_eq!(h["queue_depth"], 0);
    // The three that queued behind the held batch were compatible: one batch of three.
    assert_eq!(h["batch_sizes"]["3"], 1, "{h}");

    // Without a full queue every one of 12 parallel requests succeeds.
    let results: Vec<u16> = std::thread::scope(|s| {
        let server = &server;
        let hs: Vec<_> = (0..12)
            .map(|i| {
                s.spawn(move || {
                    post_json(
                        server,
                        "/generate",
                        &json!({"prompt": format!("q{i}"), "steps": 2, "seed": i}),
                    )
                    .status
                })
            })
            .collect();
        // Twelve clients against a queue of three: some may be refused, none may fail.
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert!(
        results.iter().all(|s| *s == 200 || *s == 429),
        "{results:?}"
    );
    assert!(results.contains(&200));
}

#[test]
fn batched_images_equal_images_computed_alone() {
    let mut config = only_sd15(tiny_config());
    config.batching.max_batch = 8;
    let gate = Gate::default();
    let server = start_with_hook(config, gate.hook());
    // euler_a draws fresh noise at every step: the per-row generators must follow each image.
    let req = |prompt: &str, seed: u64| json!({"prompt": prompt, "steps": 3, "seed": seed, "scheduler": "euler_a"});
    let alone: Vec<Vec<u8>> = [("a", 1u64), ("b", 2), ("c", 3)]
        .iter()
        .map(|(p, s)| pngs(&post_json(&server, "/generate", &req(p, *s)))[0].clone())
        .collect();
    let batched: Vec<(u64, Vec<u8>)> = std::thread::scope(|s| {
        let server = &server;
        let hold = s.spawn(move || {
            post_json(
                server,
                "/generate",
                &json!({"prompt": "hold", "steps": 1, "seed": 0}),
            )
        });
        gate.wait_holding();
        let hs: Vec<_> = [("a", 1u64), ("b", 2), ("c", 3)]
            .into_iter()
            .map(|(p, seed)| s.spawn(move || post_json(server, "/generate", &req(p, seed))))
            .collect();
        wait_until(30, "three queued", || {
            health_of(server, "tiny-sd15")["queue_depth"] == 3
        });
        gate.release();
        assert_eq!(hold.join().unwrap().status, 200);
        hs.into_iter()
            .map(|h| {
                let r = h.join().unwrap();
                (
                    r.json()["timings"]["batch_size"].as_u64().unwrap(),
                    pngs(&r)[0].clone(),
                )
            })
            .collect()
    });
    for (i, (batch_size, png)) in batched.iter().enumerate() {
        assert_eq!(
            *batch_size, 3,
            "the three compatible requests ran as one batch"
        );
        assert!(
            png == &alone[i],
            "request {i}: batched and alone must be the same bytes"
        );
    }
}

#[test]
fn incompatible_requests_are_not_batched_together() {
    let mut config = only_sd15(tiny_config());
    config.batching.max_batch = 8;
    let gate = Gate::default();
    let server = start_with_hook(config, gate.hook());
    let sizes: Vec<u64> = std::thread::scope(|s| {
        let server = &server;
        let hold =
            s.spawn(move || post_json(server, "/generate", &json!({"prompt": "hold", "steps": 1})));
        gate.wait_holding();
        let bodies = [
            json!({"prompt": "a", "steps": 2, "seed": 1}),
            json!({"prompt": "b", "steps": 3, "seed": 1}),
            json!({"prompt": "c", "steps": 2, "seed": 1, "guidance_scale": 5.0}),
            json!({"prompt": "d", "steps": 2, "seed": 2}),
        ];
        let hs: Vec<_> = bodies
            .into_iter()
            .map(|b| s.spawn(move || post_json(server, "/generate", &b)))
            .collect();
        wait_until(30, "four queued", || {
            health_of(server, "tiny-sd15")["queue_depth"] == 4
        });
        gate.release();
        hold.join().unwrap();
        hs.into_iter()
            .map(|h| {
                h.join().unwrap().json()["timings"]["batch_size"]
                    .as_u64()
                    .unwrap()
            })
            .collect()
    });
    assert_eq!(
        sizes,
        vec![2, 1, 1, 2],
        "only a and d share steps and guidance"
    );
}

/// A client that disconnects while its request waits in the queue is never computed.
#[test]
fn disconnect_while_queued_is_not_computed() {
    let mut config = only_sd15(tiny_config());
    config.batching.max_batch = 1;
    let gate = Gate::default();
    let server = start_with_hook(config, gate.hook());
    std::thread::scope(|s| {
        let server = &server;
        let hold =
            s.spawn(move || post_json(server, "/generate", &json!({"prompt": "hold", "steps": 1})));
        gate.wait_holding();
        let body = json!({"prompt": "nobody waits for me", "steps": 2}).to_string();
        let mut sock = std::net::TcpStream::connect(server.addr).unwrap();
        write!(
            sock,
            "POST /generate HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{}",
            server.addr,
            body.len(),
            body
        )
        .unwrap();
        wait_until(30, "the request to queue", || {
            health_of(server, "tiny-sd15")["queue_depth"] == 1
        });
        drop(sock);
        // The handler is dropped when the connection closes, which closes its reply channel;
        // the worker sees that when it looks at the queue, after the held batch.
        std::thread::sleep(Duration::from_millis(200));
        gate.release();
        assert_eq!(hold.join().unwrap().status, 200);
    });
    wait_until(30, "the queue to drain", || {
        health_of(&server, "tiny-sd15")["queue_depth"] == 0
    });
    let h = health_of(&server, "tiny-sd15");
    assert_eq!(h["dropped_disconnected"], 1, "{h}");
    assert_eq!(
        h["requests_computed"], 1,
        "only the held request was computed: {h}"
    );
    assert_eq!(h["batches"], 1, "{h}");
    // The server still answers.
    assert_eq!(
        post_json(&server, "/generate", &json!({"prompt": "x", "steps": 1})).status,
        200
    );
}

#[test]
fn a_panicking_batch_is_a_500_and_the_server_goes_on() {
    let server = start_with_hook(only_sd15(tiny_config()), Gate::default().hook());
    let r = post_json(
        &server,
        "/generate",
        &json!({"prompt": "panic", "steps": 1}),
    );
    assert_eq!((r.status, r.code().as_str()), (500, "internal_error"));
    assert!(r.json()["error"]["message"]
        .as_str()
        .unwrap()
        .contains("injected failure"));
    let ok = post_json(&server, "/generate", &json!({"prompt": "fine", "steps": 1}));
    assert_eq!(ok.status, 200);
    let h = health_of(&server, "tiny-sd15");
    assert_eq!(h["failed_batches"], 1);
    assert_eq!(h["requests_computed"], 1);
}

/// A half-sent body or a client that just connects and leaves does not disturb the server.
#[test]
fn abandoned_connections_are_harmless() {
    let server = start(only_sd15(tiny_config()));
    let mut sock = std::net::TcpStream::connect(server.addr).unwrap();
    write!(sock, "POST /generate HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{{\"pro").unwrap();
    drop(sock);
    let mut sock = std::net::TcpStream::connect(server.addr).unwrap();
    write!(
        sock,
        "GET /health HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut reply = String::new();
    sock.read_to_string(&mut reply).unwrap();
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
    assert_eq!(
        post_json(&server, "/generate", &json!({"prompt": "x", "steps": 1})).status,
        200
    );
}

/// When every client of a running batch has gone, the worker stops between denoising steps
/// instead of finishing work nobody will read.
#[test]
fn a_batch_whose_clients_all_left_is_abandoned_mid_denoising() {
    let mut config = only_sd15(tiny_config());
    config.limits.max_steps = 500;
    let server = start(config);
    let body = json!({"prompt": "long", "steps": 500}).to_string();
    let mut sock = std::net::TcpStream::connect(server.addr).unwrap();
    write!(
        sock,
        "POST /generate HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{}",
        server.addr,
        body.len(),
        body
    )
    .unwrap();
    wait_until(30, "the batch to start", || {
        health_of(&server, "tiny-sd15")["batches"] == 1
    });
    drop(sock);
    wait_until(60, "the batch to end", || {
        let h = health_of(&server, "tiny-sd15");
        h["cancelled_in_compute"] == 1 || h["requests_computed"] == 1
    });
    let h = health_of(&server, "tiny-sd15");
    assert_eq!(
        (
            h["cancelled_in_compute"].as_u64(),
            h["requests_computed"].as_u64()
        ),
        (Some(1), Some(0)),
        "{h}"
    );
    assert_eq!(
        post_json(&server, "/generate", &json!({"prompt": "x", "steps": 1})).status,
        200
    );
}

/// Reads until the server closes the connection (or `limit` passes): what it sent, and how
/// long that took.
fn read_until_closed(sock: &mut std::net::TcpStream, limit: Duration, what: &str) -> (String, Duration) {
    let start = std::time::Instant::now();
    sock.set_read_timeout(Some(limit)).unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match sock.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break,
            Err(e) => panic!("{what}: connection still open after {limit:?} ({e})"),
        }
    }
    (String::from_utf8_lossy(&got).into_owned(), start.elapsed())
}

/// Slowloris: connections that send nothing, trickle their headers or stall in their body are
/// closed on the configured timeouts, and connections past the limit are closed at once; the
/// server keeps serving throughout.
#[test]
fn idle_and_trickling_connections_are_cut_off() {
    let mut config = only_sd15(tiny_config());
    config.server.header_timeout_secs = 1;
    config.server.body_timeout_secs = 1;
    config.server.max_connections = 4;
    let server = start(config);
    let limit = Duration::from_secs(10);
    // Nothing sent at all.
    let mut silent = std::net::TcpStream::connect(server.addr).unwrap();
    // Headers that never finish.
    let mut partial = std::net::TcpStream::connect(server.addr).unwrap();
    write!(partial, "GET /health HTTP/1.1\r\nHost: local").unwrap();
    // A body that stalls: 408 once the body timeout passes.
    let mut stalled = std::net::TcpStream::connect(server.addr).unwrap();
    write!(stalled, "POST /generate HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{{\"pro").unwrap();
    // Three connections are open: a fourth is served, a fifth is closed at once.
    let mut fifth_holder = std::net::TcpStream::connect(server.addr).unwrap();
    std::thread::sleep(Duration::from_millis(200));
    let mut fifth = std::net::TcpStream::connect(server.addr).unwrap();
    let (sent, took) = read_until_closed(&mut fifth, limit, "fifth");
    assert!(sent.is_empty() && took < Duration::from_millis(900), "{sent:?} after {took:?}");
    let (sent, took) = read_until_closed(&mut silent, limit, "silent");
    assert!(sent.is_empty() && took < Duration::from_secs(5), "silent: {sent:?} {took:?}");
    let (_, took) = read_until_closed(&mut partial, limit, "partial");
    assert!(took < Duration::from_secs(5), "partial headers: {took:?}");
    let (sent, took) = read_until_closed(&mut stalled, limit, "stalled");
    assert!(sent.starts_with("HTTP/1.1 408"), "stalled body: {sent:?} after {took:?}");
    let (_, took) = read_until_closed(&mut fifth_holder, limit, "fifth_holder");
    assert!(took < Duration::from_secs(5), "{took:?}");
    // Every slot is free again, and the server serves.
    assert_eq!(get(&server, "/health").status, 200);
    assert_eq!(
        post_json(&server, "/generate", &json!({"prompt": "x", "steps": 1})).status,
        200
    );
}
