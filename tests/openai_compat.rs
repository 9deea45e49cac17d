//! OpenAI's own Python client (the `openai` package, which .ci/run installs) against the
//! OpenAI-compatible routes: generations as b64_json and as data: URLs, an edit from a file,
//! API keys passed the way that client passes them, and its error types for a bad key and an
//! unknown model.

mod common;

use common::*;
use std::process::Command;

const KEY: &str = "openai-client-key-0123456789";

const SCRIPT: &str = r#"
import base64, sys
import openai
from openai import OpenAI

base, key = sys.argv[1], sys.argv[2]
client = OpenAI(base_url=base + "/v1", api_key=key, max_retries=0)
PNG = b"\x89PNG\r\n\x1a\n"

r = client.images.generate(model="tiny-sd15", prompt="a red circle", n=2, size="64x64",
                           response_format="b64_json", quality="standard")
assert len(r.data) == 2 and r.created > 0
png = base64.b64decode(r.data[0].b64_json)
assert png[:8] == PNG

u = client.images.generate(model="tiny-sd15", prompt="a red circle", size="64x64", response_format="url")
assert u.data[0].url.startswith("data:image/png;base64,")
assert base64.b64decode(u.data[0].url.split(",", 1)[1])[:8] == PNG

e = client.images.edit(model="tiny-ip2p", image=("in.png", png, "image/png"), prompt="make it blue",
                       response_format="b64_json")
assert base64.b64decode(e.data[0].b64_json)[:8] == PNG

try:
    client.images.generate(model="dall-e-3", prompt="x")
    raise SystemExit("an unknown model was accepted")
except openai.NotFoundError as err:
    assert "dall-e-3" in str(err), err

try:
    OpenAI(base_url=base + "/v1", api_key="wrong-key-0123456789", max_retries=0).images.generate(prompt="x")
    raise SystemExit("a wrong key was accepted")
except openai.AuthenticationError:
    pass
print("openai client ok")
"#;

#[test]
fn openais_client_generates_and_edits_through_the_compatible_routes() {
    let installed = Command::new("python3")
        .args(["-c", "import openai"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !installed {
        eprintln!("SKIPPED the OpenAI client test: pip install openai (.ci/run does)");
        return;
    }
    let mut config = tiny_config();
    config.models.serve.truncate(2);
    config.auth.api_keys = vec![KEY.into()];
    let server = start(config);
    let run = Command::new("python3")
        .args(["-c", SCRIPT, &format!("http://{}", server.addr), KEY])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(
        run.status.success() && stdout.contains("openai client ok"),
        "{stdout}\n{}",
        String::from_utf8_lossy(&run.stderr)
    );
}
