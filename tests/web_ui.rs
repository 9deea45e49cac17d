//! The web UI at `/`: its files are served without a key, it type-checks against the OpenAPI
//! document the server serves (openapi-typescript and tsc from tests/web), and headless
//! Chromium drives it through generate, edit, fine-tune, the adapter list and an evaluation of
//! the new adapter against the base model (tests/web/ui.test.mjs) against a real server with an
//! API key.
//!
//! Needs Debian's chromium and `npm ci --prefix tests/web` (.ci/run installs both); without
//! them the browser test says SKIPPED, except under CI, where a skipped browser test would let
//! a broken page land.

mod common;

use common::fileserver::FileServer;
use common::{agent, get, temp_dir};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

const KEY: &str = "web-ui-test-key-0123456789";
const CHROMIUM: &str = "/usr/bin/chromium";

fn web_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/web")
}

fn config() -> dspo_server::config::Config {
    let mut c = common::tiny_config();
    c.models.serve.truncate(2); // tiny-sd15 and tiny-ip2p
    c.auth.api_keys = vec![KEY.into()];
    c.datasets.allow_private_networks = true;
    // The Evaluate tab scores images with the tiny reward models of the fixtures.
    let rewards = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/rewards/models");
    c.rewards.clip_score = rewards.join("tiny-clip").display().to_string();
    c.rewards.aesthetic = rewards.join("tiny-aesthetic").display().to_string();
    c
}

#[test]
fn the_page_and_its_files_are_served_without_a_key() {
    let server = common::start(config());
    let page = get(&server, "/");
    assert_eq!(page.status, 200);
    assert!(page
        .header("content-type")
        .unwrap()
        .starts_with("text/html"));
    let html = String::from_utf8_lossy(&page.body);
    assert!(html.contains(r#"src="/ui/app.js""#), "{html}");
    for (file, mime) in [("app.js", "text/javascript"), ("style.css", "text/css")] {
        let r = get(&server, &format!("/ui/{file}"));
        assert_eq!(r.status, 200, "/ui/{file}");
        assert!(
            r.header("content-type").unwrap().starts_with(mime),
            "/ui/{file}"
        );
        let on_disk = std::fs::read(
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("static/ui")
                .join(file),
        )
        .unwrap();
        assert_eq!(r.body, on_disk, "/ui/{file} is the file in static/ui");
    }
    assert!(page.header("content-security-policy").is_some());
    let missing = get(&server, "/ui/nope.js");
    assert_eq!(
        (missing.status, missing.code().as_str()),
        (404, "not_found")
    );
    // The page is public; what it calls is not.
    assert_eq!(get(&server, "/models").status, 401);
}

/// Runs `cmd` in the repository root, killed after `limit`.
fn run(cmd: &mut Command, limit: Duration) -> Output {
    let mut child = cmd
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    // Drained on threads, so a chatty child never blocks on a full pipe while we wait.
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let out = std::thread::spawn(move || {
        let mut b = Vec::new();
        std::io::Read::read_to_end(&mut out, &mut b).ok();
        b
    });
    let err = std::thread::spawn(move || {
        let mut b = Vec::new();
        std::io::Read::read_to_end(&mut err, &mut b).ok();
        b
    });
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            break child.wait().unwrap();
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    Output {
        status,
        stdout: out.join().unwrap(),
        stderr: err.join().unwrap(),
    }
}

fn show(o: &Output) -> String {
    format!(
        "exit: {}\n--- stdout\n{}\n--- stderr\n{}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// What the browser test needs that is not here, if anything.
fn missing_tools() -> Option<String> {
    let node = Command::new("node")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !node {
        return Some("node".into());
    }
    if !Path::new(CHROMIUM).exists() {
        return Some(format!("{CHROMIUM} (apt-get install chromium)"));
    }
    if !web_dir().join("node_modules/playwright-core").exists() {
        return Some("tests/web/node_modules (npm ci --prefix tests/web)".into());
    }
    None
}

#[test]
fn a_browser_generates_edits_and_fine_tunes_through_the_page() {
    if let Some(missing) = missing_tools() {
        if std::env::var_os("CI").is_some() {
            panic!("the web UI test needs {missing}; .ci/run installs it");
        }
        eprintln!("SKIPPED the web UI test: no {missing} (.ci/run installs it)");
        return;
    }
    let www_root = temp_dir("www");
    std::fs::copy(
        common::models_dir().join("../../shapes/prefs_centered.parquet"),
        www_root.join("prefs.parquet"),
    )
    .unwrap();
    let www = FileServer::start(www_root);
    let server = common::start(config());

    // The page's types, from the document this server serves: a change of the API that the
    // page does not follow fails here, before any browser starts.
    let doc = agent()
        .get(&server.url("/openapi.json"))
        .set("authorization", &format!("Bearer {KEY}"))
        .call()
        .unwrap()
        .into_string()
        .unwrap();
    // openapi-typescript keys its `operations` type by operationId, and the OpenAPI
    // specification requires them unique: a repeated one (two handlers named `list`) makes
    // the generated file fail to compile, which is said here in plain words.
    let parsed: serde_json::Value = serde_json::from_str(&doc).unwrap();
    let mut seen = std::collections::BTreeMap::new();
    for (path, item) in parsed["paths"].as_object().unwrap() {
        for (method, op) in item.as_object().unwrap() {
            if let Some(id) = op["operationId"].as_str() {
                if let Some(other) = seen.insert(id.to_string(), format!("{method} {path}")) {
                    panic!("operationId {id} names both {other} and {method} {path}: give one an operation_id");
                }
            }
        }
    }
    let spec = temp_dir("openapi").join("openapi.json");
    std::fs::write(&spec, doc).unwrap();
    let generated = web_dir().join("generated");
    std::fs::create_dir_all(&generated).unwrap();
    let web = web_dir();
    let types = run(
        Command::new("node")
            .arg(web.join("node_modules/openapi-typescript/bin/cli.js"))
            .arg(&spec)
            // The document's free-form objects (an adapter's final_metrics, a job's dataset
            // counts) declare no properties; openapi-typescript would type them as objects
            // that admit none.
            .arg("--empty-objects-unknown")
            .arg("-o")
            .arg(generated.join("api.d.ts")),
        Duration::from_secs(120),
    );
    assert!(
        types.status.success(),
        "openapi-typescript: {}",
        show(&types)
    );
    let tsc = run(
        Command::new("node")
            .arg(web.join("node_modules/typescript/bin/tsc"))
            .arg("-p")
            .arg(web.join("tsconfig.json")),
        Duration::from_secs(180),
    );
    assert!(
        tsc.status.success(),
        "static/ui/app.js does not type-check against the served /openapi.json: {}",
        show(&tsc)
    );

    let shots = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("web-ui-screenshots");
    let ui = run(
        Command::new("node")
            .arg(web.join("ui.test.mjs"))
            .arg(format!("http://{}", server.addr))
            .arg(KEY)
            .arg(www.url("prefs.parquet"))
            .arg(&shots)
            .env("CHROMIUM", CHROMIUM),
        Duration::from_secs(600),
    );
    let stdout = String::from_utf8_lossy(&ui.stdout);
    assert!(
        ui.status.success() && stdout.contains("web ui ok"),
        "the browser test failed (screenshots in {}): {}",
        shots.display(),
        show(&ui)
    );
    eprintln!("web UI screenshots: {}", shots.display());
}
