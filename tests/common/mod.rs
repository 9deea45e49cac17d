//! Shared helpers of the end-to-end server tests: a real server on 127.0.0.1 serving the tiny
//! conformance models, and a real HTTP client (ureq) talking to it.
#![allow(dead_code)]

pub mod fileserver;

use base64::Engine;
use dspo_server::api::running::RunningServer;
use dspo_server::config::Config;
use dspo_server::server::{BatchHook, GenerationTask};
use serde_json::Value;
use std::path::PathBuf;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

pub fn models_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/conformance/models")
}

/// A configuration serving tiny-sd15, tiny-ip2p and tiny-sdxl on a free loopback port, with
/// a fresh data dir.
pub fn tiny_config() -> Config {
    let mut c = Config::default();
    c.server.listen = "127.0.0.1:0".into();
    let m = models_dir();
    c.models.serve = ["tiny-sd15", "tiny-ip2p", "tiny-sdxl"]
        .iter()
        .map(|n| format!("{n}={}", m.join(n).display()))
        .collect();
    c.server.data_dir = temp_dir("data");
    c
}

pub fn temp_dir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!(
        "dspo-test-{tag}-{}-{}",
        std::process::id(),
        uuid::Uuid::new_v4()
    ));
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A loopback file server holding the shapes world's preference pairs as `prefs.parquet`.
pub fn shapes_pairs_server() -> fileserver::FileServer {
    let root = temp_dir("www");
    std::fs::copy(
        models_dir().join("../../shapes/prefs_centered.parquet"),
        root.join("prefs.parquet"),
    )
    .unwrap();
    fileserver::FileServer::start(root)
}

pub fn start(config: Config) -> RunningServer {
    RunningServer::start(config, None).expect("server starts")
}

pub fn start_with_hook(config: Config, hook: BatchHook) -> RunningServer {
    RunningServer::start(config, Some(hook)).expect("server starts")
}

pub struct Reply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Reply {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
    /// `error.code` of an error body.
    pub fn code(&self) -> String {
        self.json()["error"]["code"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    }
}

fn read(resp: ureq::Response) -> Reply {
    let status = resp.status();
    let headers = resp
        .headers_names()
        .into_iter()
        .map(|k| {
            let v = resp.header(&k).unwrap_or_default().to_string();
            (k, v)
        })
        .collect();
    let mut body = Vec::new();
    std::io::Read::read_to_end(&mut resp.into_reader(), &mut body).unwrap();
    Reply {
        status,
        headers,
        body,
    }
}

fn finish(r: Result<ureq::Response, ureq::Error>) -> Reply {
    match r {
        Ok(resp) => read(resp),
        Err(ureq::Error::Status(_, resp)) => read(resp),
        Err(e) => panic!("transport error: {e}"),
    }
}

pub fn agent() -> ureq::Agent {
    ureq::AgentBuilder::new()
        .timeout(Duration::from_secs(120))
        .build()
}

/// Any method, with headers and an optional JSON body.
pub fn request(
    server: &RunningServer,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    json_body: Option<&Value>,
) -> Reply {
    let mut req = agent().request(method, &server.url(path));
    for (k, v) in headers {
        req = req.set(k, v);
    }
    finish(match json_body {
        Some(b) => req
            .set("content-type", "application/json")
            .send_bytes(b.to_string().as_bytes()),
        None => req.call(),
    })
}

pub fn get(server: &RunningServer, path: &str) -> Reply {
    finish(agent().get(&server.url(path)).call())
}

pub fn post_json(server: &RunningServer, path: &str, body: &Value) -> Reply {
    finish(
        agent()
            .post(&server.url(path))
            .set("content-type", "application/json")
            .send_bytes(body.to_string().as_bytes()),
    )
}

pub fn post_raw(
    server: &RunningServer,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Reply {
    let mut req = agent().post(&server.url(path));
    for (k, v) in headers {
        req = req.set(k, v);
    }
    finish(req.send_bytes(body))
}

/// A POST sent the way curl sends large bodies: headers with `Expect: 100-continue` first,
/// the body only once the server asks for it. A server that refuses from the headers alone
/// (413 from Content-Length) answers before any body byte is sent, so the test never races a
/// half-written upload against the server closing the connection.
pub fn post_expect_continue(
    server: &RunningServer,
    path: &str,
    content_type: &str,
    body: &[u8],
) -> (u16, Value) {
    use std::io::{BufRead, BufReader, Write};
    let mut sock = std::net::TcpStream::connect(server.addr).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    write!(
        sock,
        "POST {path} HTTP/1.1\r\nHost: {}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nExpect: 100-continue\r\nConnection: close\r\n\r\n",
        server.addr,
        body.len()
    )
    .unwrap();
    let mut reader = BufReader::new(sock.try_clone().unwrap());
    let read_head = |reader: &mut BufReader<std::net::TcpStream>| -> (u16, usize) {
        let mut line = String::new();
        reader.read_line(&mut line).unwrap();
        let status: u16 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
        let mut len = 0;
        loop {
            let mut h = String::new();
            reader.read_line(&mut h).unwrap();
            if h.trim().is_empty() {
                break;
            }
            if let Some(v) = h.to_ascii_lowercase().strip_prefix("content-length:") {
                len = v.trim().parse().unwrap();
            }
        }
        (status, len)
    };
    let (mut status, mut len) = read_head(&mut reader);
    if status == 100 {
        sock.write_all(body).unwrap();
        (status, len) = read_head(&mut reader);
    }
    let mut buf = vec![0u8; len];
    std::io::Read::read_exact(&mut reader, &mut buf).unwrap();
    (status, serde_json::from_slice(&buf).unwrap_or(Value::Null))
}

/// multipart/form-data with text fields and one `image` file part.
pub fn multipart(fields: &[(&str, &str)], image: &[u8]) -> (String, Vec<u8>) {
    multipart_file(fields, "image", "in.png", image)
}

/// multipart/form-data with text fields and one file part named `field`.
pub fn multipart_file(
    fields: &[(&str, &str)],
    field: &str,
    filename: &str,
    file: &[u8],
) -> (String, Vec<u8>) {
    let boundary = format!("dspo-{}", uuid::Uuid::new_v4().simple());
    let mut body = Vec::new();
    for (k, v) in fields {
        body.extend(
            format!("--{boundary}\r\nContent-Disposition: form-data; name=\"{k}\"\r\n\r\n{v}\r\n")
                .as_bytes(),
        );
    }
    body.extend(
        format!("--{boundary}\r\nContent-Disposition: form-data; name=\"{field}\"; filename=\"{filename}\"\r\nContent-Type: application/octet-stream\r\n\r\n")
            .as_bytes(),
    );
    body.extend(file);
    body.extend(format!("\r\n--{boundary}--\r\n").as_bytes());
    (format!("multipart/form-data; boundary={boundary}"), body)
}

pub fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

pub fn unb64(s: &str) -> Vec<u8> {
    base64::engine::general_purpose::STANDARD.decode(s).unwrap()
}

/// The PNG bytes of every image of a 200 JSON response.
pub fn pngs(reply: &Reply) -> Vec<Vec<u8>> {
    assert_eq!(
        reply.status,
        200,
        "{}",
        String::from_utf8_lossy(&reply.body)
    );
    reply.json()["images"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| unb64(i["png_base64"].as_str().unwrap()))
        .collect()
}

/// Decoded RGB pixels, for comparing images whose PNG text differs.
pub fn pixels(png: &[u8]) -> Vec<u8> {
    image::load_from_memory(png).unwrap().to_rgb8().into_raw()
}

pub fn png_size(png: &[u8]) -> (u32, u32) {
    let img = image::load_from_memory(png).unwrap();
    (img.width(), img.height())
}

/// A PNG test input: a gradient, so edits have something to work with.
pub fn test_png(w: u32, h: u32) -> Vec<u8> {
    let img =
        image::RgbImage::from_fn(w, h, |x, y| image::Rgb([(x * 3) as u8, (y * 3) as u8, 128]));
    let mut out = Vec::new();
    img.write_to(&mut std::io::Cursor::new(&mut out), image::ImageFormat::Png)
        .unwrap();
    out
}

/// The `/health` entry of one model.
pub fn health_of(server: &RunningServer, model: &str) -> Value {
    let h = get(server, "/health").json();
    h["models"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["name"] == model)
        .cloned()
        .expect("model in /health")
}

/// Polls until `f` holds (or panics after `secs`).
pub fn wait_until(secs: u64, what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Submits a fine-tuning job, expects 202, waits (up to 300 s) for it to end, and returns the
/// job as it ended and its metrics.
pub fn finetune(server: &RunningServer, body: &Value) -> (Value, Vec<Value>) {
    let r = post_json(server, "/finetune", body);
    assert_eq!(r.status, 202, "{:?}", r.json());
    let id = r.json()["job_id"].as_str().unwrap().to_string();
    let mut job = Value::Null;
    wait_until(300, "the job to end", || {
        job = get(server, &format!("/finetune/{id}")).json();
        ["completed", "failed", "cancelled"].contains(&job["status"].as_str().unwrap_or(""))
    });
    let metrics = get(server, &format!("/finetune/{id}/metrics")).json();
    (job, metrics.as_array().cloned().unwrap_or_default())
}

/// Holds the worker inside a batch whose prompt is `hold` until released, so tests can queue
/// requests behind a busy worker deterministically.
#[derive(Clone, Default)]
pub struct Gate(Arc<(Mutex<GateState>, Condvar)>);

#[derive(Default)]
struct GateState {
    open: bool,
    holding: bool,
}

impl Gate {
    pub fn hook(&self) -> BatchHook {
        let gate = self.clone();
        Arc::new(move |tasks: &[&GenerationTask]| {
            if tasks.iter().any(|t| t.prompt.prompt == "panic") {
                panic!("injected failure");
            }
            if tasks.iter().any(|t| t.prompt.prompt == "hold") {
                let (lock, cv) = &*gate.0;
                let mut s = lock.lock().unwrap();
                s.holding = true;
                cv.notify_all();
                let deadline = Instant::now() + Duration::from_secs(60);
                while !s.open && Instant::now() < deadline {
                    s = cv.wait_timeout(s, Duration::from_millis(50)).unwrap().0;
                }
                s.holding = false;
            }
        })
    }

    /// Blocks until the worker is inside the held batch.
    pub fn wait_holding(&self) {
        let (lock, cv) = &*self.0;
        let mut s = lock.lock().unwrap();
        let deadline = Instant::now() + Duration::from_secs(60);
        while !s.holding {
            assert!(
                Instant::now() < deadline,
                "the worker never reached the held batch"
            );
            s = cv.wait_timeout(s, Duration::from_millis(50)).unwrap().0;
        }
    }

    pub fn release(&self) {
        let (lock, cv) = &*self.0;
        lock.lock().unwrap().open = true;
        cv.notify_all();
    }
}

/// Spawns a prepared `dspo-server serve` command (args, env and working directory set by the
/// caller) with stderr captured, and waits for its "listening on" line. Returns the child, its
/// address and the rest of its log lines.
pub fn spawn_server_process(
    mut cmd: std::process::Command,
) -> (
    std::process::Child,
    String,
    std::sync::mpsc::Receiver<String>,
) {
    use std::io::{BufRead, BufReader};
    cmd.stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .env("RUST_LOG", "info");
    let mut child = cmd.spawn().expect("binary starts");
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let addr = loop {
        let line = rx
            .recv_timeout(Duration::from_secs(60))
            .expect("a 'listening on' line");
        if let Some(rest) = line.split("listening on http://").nth(1) {
            break rest
                .split_whitespace()
                .next()
                .unwrap()
                .trim_end_matches(|c: char| !c.is_ascii_digit())
                .to_string();
        }
    };
    (child, addr, rx)
}
