//! The generated-SDK path users take: a Python client generated from the committed
//! openapi/openapi.json by `openapi-python-client` drives /generate and /edit (multipart)
//! against a real server. Skipped, saying so, only when the generator is not installed;
//! `.ci/run` installs it, so CI always runs this.

mod common;

use common::*;
use std::process::Command;

const SCRIPT: &str = r#"
import base64, io, sys
from dspo_client import Client
from dspo_client.api.images import generate, edit
from dspo_client.models import GenerateRequest, GenerateResponse, EditForm, EditMode, Scheduler
from dspo_client.types import File

client = Client(base_url=sys.argv[1], timeout=120.0)

r = generate.sync_detailed(client=client, body=GenerateRequest(
    prompt="a red circle", model="tiny-sd15", steps=3, seed=5, scheduler=Scheduler("euler_a")))
assert r.status_code == 200, (r.status_code, r.content[:300])
assert isinstance(r.parsed, GenerateResponse), type(r.parsed)
png = base64.b64decode(r.parsed.images[0].png_base64)
assert png[:8] == b"\x89PNG\r\n\x1a\n"
assert r.parsed.images[0].seed == 5
assert r.parsed.parameters.scheduler == "euler_a"

e = edit.sync_detailed(client=client, body=EditForm(
    image=File(payload=io.BytesIO(png), file_name="in.png", mime_type="image/png"),
    prompt="make it blue", model="tiny-ip2p", mode=EditMode("instruct_pix2pix"), steps=2, seed=9))
assert e.status_code == 200, (e.status_code, e.content[:300])
assert e.parsed.parameters.mode == "instruct_pix2pix"
assert (e.parsed.parameters.width, e.parsed.parameters.height) == (64, 64)

bad = generate.sync_detailed(client=client, body=GenerateRequest(prompt="x", model="tiny-sd15", steps=0))
assert bad.status_code == 422 and bad.parsed.error.code == "invalid_steps", bad.content
print("python sdk ok")
"#;

/// Run as a module so the test finds it wherever pip put the console script.
fn generator() -> Command {
    let mut c = Command::new("python3");
    c.args(["-m", "openapi_python_client"]);
    c
}

fn generator_installed() -> bool {
    generator()
        .arg("--version")
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

#[test]
fn generated_python_client_drives_generate_and_edit() {
    if !generator_installed() {
        eprintln!(
            "SKIPPED generated_python_client_drives_generate_and_edit: openapi-python-client is not installed \
             (pip install openapi-python-client; .ci/run installs it)"
        );
        return;
    }
    let dir = temp_dir("pysdk");
    let spec = concat!(env!("CARGO_MANIFEST_DIR"), "/openapi/openapi.json");
    let out = generator()
        .args([
            "generate",
            "--path",
            spec,
            "--meta",
            "none",
            "--output-path",
        ])
        .arg(dir.join("dspo_client"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "openapi-python-client failed on openapi/openapi.json:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let mut config = tiny_config();
    config.models.serve.truncate(2);
    let server = start(config);
    let run = Command::new("python3")
        .arg("-c")
        .arg(SCRIPT)
        .arg(format!("http://{}", server.addr))
        .env("PYTHONPATH", &dir)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(
        run.status.success() && stdout.contains("python sdk ok"),
        "the generated client failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let _ = std::fs::remove_dir_all(&dir);
}
