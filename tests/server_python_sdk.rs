//! The generated-SDK path users take: a Python client generated from the committed
//! openapi/openapi.json by `openapi-python-client` calls every operation of the document
//! (images, service, a fine-tuning job through to its adapter) against a real server with API
//! keys, authenticating as the document's bearer scheme says. Skipped, saying so, only when the generator is not installed;
//! `.ci/run` installs it, so CI always runs this.

mod common;

use common::*;
use std::process::Command;

const SCRIPT: &str = r#"
import base64, io, sys, time
from dspo_client import AuthenticatedClient, Client
from dspo_client.api.images import (generate, edit, list_generations, get_generation,
                                    cancel_generation)
from dspo_client.api.service import health, ready, list_models, openapi_json
from dspo_client.api.finetune import (create_job, list_jobs, get_job, cancel_job, get_job_metrics,
                                      stream_job_events, list_adapters, download_adapter,
                                      upload_adapter, delete_adapter)
from dspo_client.api.evaluate import (create_evaluation, list_evaluations, get_evaluation,
                                      cancel_evaluation, get_evaluation_rows, list_rewards)
from dspo_client.models import (GenerateRequest, GenerateResponse, EditForm, EditMode, Scheduler,
                                JobSpec, JobStatus, OutputFormat, AdapterUpload, Hyperparameters,
                                EvaluateRequest, EvaluationStatus)
from dspo_client.types import File

base, full_key, generate_key, dataset_url = sys.argv[1:5]
anon = Client(base_url=base, timeout=120.0)
client = AuthenticatedClient(base_url=base, token=full_key, timeout=120.0)
inference = AuthenticatedClient(base_url=base, token=generate_key, timeout=120.0)

# Service: open without a key.
assert health.sync_detailed(client=anon).status_code == 200
for _ in range(1200):
    r = ready.sync_detailed(client=anon)
    if r.status_code == 200:
        break
    time.sleep(0.1)
assert r.status_code == 200, r.content[:300]
assert openapi_json.sync_detailed(client=anon).status_code == 200
m = list_models.sync_detailed(client=inference)
assert m.status_code == 200 and {x.name for x in m.parsed.models} >= {"tiny-sd15", "tiny-ip2p"}, m.content[:300]

# Images, with the inference-only key; none at all is a 401.
no_key = generate.sync_detailed(client=anon, body=GenerateRequest(prompt="x", model="tiny-sd15", steps=2))
assert no_key.status_code == 401 and no_key.parsed.error.code == "unauthorized", no_key.content
r = generate.sync_detailed(client=inference, body=GenerateRequest(
    prompt="a red circle", model="tiny-sd15", steps=3, seed=5, scheduler=Scheduler("euler_a")))
assert r.status_code == 200, (r.status_code, r.content[:300])
assert isinstance(r.parsed, GenerateResponse), type(r.parsed)
png = base64.b64decode(r.parsed.images[0].png_base64)
assert png[:8] == b"\x89PNG\r\n\x1a\n"
assert r.parsed.images[0].seed == 5
assert r.parsed.parameters.scheduler == "euler_a"

e = edit.sync_detailed(client=inference, body=EditForm(
    image=File(payload=io.BytesIO(png), file_name="in.png", mime_type="image/png"),
    prompt="make it blue", model="tiny-ip2p", mode=EditMode("instruct_pix2pix"), steps=2, seed=9))
assert e.status_code == 200, (e.status_code, e.content[:300])
assert e.parsed.parameters.mode == "instruct_pix2pix"
assert (e.parsed.parameters.width, e.parsed.parameters.height) == (64, 64)

bad = generate.sync_detailed(client=inference, body=GenerateRequest(prompt="x", model="tiny-sd15", steps=0))
assert bad.status_code == 422 and bad.parsed.error.code == "invalid_steps", bad.content
j = generate.sync(client=inference, body=GenerateRequest(
    prompt="a red circle", model="tiny-sd15", steps=2, seed=5, output_format=OutputFormat.JPEG, output_quality=80))
assert j.images[0].mime_type == "image/jpeg" and base64.b64decode(j.images[0].image_base64)[:2] == b"\xff\xd8"
assert j.parameters.output_format == "jpeg" and j.parameters.output_quality == 80

# Generations in flight: none now; an unknown id is a 404 for progress and cancel alike.
assert list_generations.sync(client=inference).generations == []
g = get_generation.sync_detailed("no-such-request", client=inference)
assert g.status_code == 404 and g.parsed.error.code == "generation_not_found", g.content
g = cancel_generation.sync_detailed("no-such-request", client=inference)
assert g.status_code == 404 and g.parsed.error.code == "generation_not_found", g.content

# Fine-tuning: a job from submission to a registered adapter, then every job and adapter call.
spec = JobSpec.from_dict({
    "dataset_url": dataset_url, "method": "dspo", "base_model": "tiny-sd15", "adapter_name": "sdk-adapter",
    "lora": {"rank": 4, "alpha": 8.0, "target_modules": ["to_q", "to_k", "to_v", "to_out.0"]},
    "hyperparameters": {"max_steps": 2, "batch_size": 2, "max_pairs": 8, "learning_rate": 1e-2,
                        "resolution": 64, "warmup_steps": 0, "checkpoint_every": 2, "beta": 1.0}})
forbidden = create_job.sync_detailed(client=inference, body=spec)
assert forbidden.status_code == 403 and forbidden.parsed.error.code == "forbidden", forbidden.content
c = create_job.sync_detailed(client=client, body=spec)
assert c.status_code == 202, c.content[:500]
assert isinstance(c.parsed.job.spec.hyperparameters, Hyperparameters)
assert c.parsed.job.spec.hyperparameters.max_steps == 2
job_id = c.parsed.job_id
for _ in range(1200):
    job = get_job.sync(job_id, client=client)
    if job.status in (JobStatus.COMPLETED, JobStatus.FAILED, JobStatus.CANCELLED):
        break
    time.sleep(0.1)
assert job.status == JobStatus.COMPLETED, job.to_dict()
assert job.adapter == "sdk-adapter"
assert [j.id for j in list_jobs.sync(client=client, status=JobStatus.COMPLETED)] == [job_id]
assert list_jobs.sync(client=client, status=JobStatus.FAILED) == []
steps = get_job_metrics.sync(job_id, client=client)
assert [s.step for s in steps] == [1, 2], [s.to_dict() for s in steps]
ev = stream_job_events.sync(job_id, client=client)  # the whole stream of an ended job, as text
assert isinstance(ev, str) and "event: status" in ev and '"completed"' in ev, ev[:300]
assert "sdk-adapter" in [a.name for a in list_adapters.sync(client=inference)]
w = download_adapter.sync("sdk-adapter", client=client)  # a File: the bytes of the download
data = w.payload.read()
header_len = int.from_bytes(data[:8], "little")
assert data[8:9] == b"{" and 8 + header_len <= len(data)  # a safetensors file
# Evaluation: the trained adapter against the base model under the CLIP score.
assert list_rewards.sync(client=client).rewards == ["clip_score"]
ev = create_evaluation.sync_detailed(client=client, body=EvaluateRequest(
    model="tiny-sd15", adapter_a="sdk-adapter", prompts=["a red circle", "a blue square"], seeds=1, steps=2,
    rewards=["clip_score"]))
assert ev.status_code == 202, ev.content[:300]
ev_id = ev.parsed.evaluation_id
premature = get_evaluation_rows.sync_detailed(ev_id, client=client)
assert premature.status_code in (200, 409), premature.content[:300]
for _ in range(1200):
    e = get_evaluation.sync(ev_id, client=client)
    if e.status in (EvaluationStatus.COMPLETED, EvaluationStatus.FAILED, EvaluationStatus.CANCELLED):
        break
    time.sleep(0.1)
assert e.status == EvaluationStatus.COMPLETED, e.to_dict()
r = e.result["clip_score"]
assert r.n == 2 and 0.0 <= r.winrate <= 1.0 and r.wins + r.ties + r.losses == 2, r.to_dict()
rows = get_evaluation_rows.sync(ev_id, client=client)
assert [x.prompt_index for x in rows] == [0, 1] and len(rows[0].scores["clip_score"]) == 2
assert ev_id in [x.id for x in list_evaluations.sync(client=client)]
ended_eval = cancel_evaluation.sync(ev_id, client=client)
assert ended_eval.status == EvaluationStatus.COMPLETED
bad = create_evaluation.sync_detailed(client=client, body=EvaluateRequest(prompts=["x"], rewards=["hpsv2"]))
assert bad.status_code == 422 and bad.parsed.error.code == "unknown_reward", bad.content
up = upload_adapter.sync_detailed(client=client, body=AdapterUpload(
    name="sdk-uploaded", model="tiny-sd15",
    file=File(payload=io.BytesIO(data), file_name="lora.safetensors", mime_type="application/octet-stream")))
assert up.status_code == 201 and up.parsed.method == "uploaded", up.content[:300]
taken = upload_adapter.sync_detailed(client=client, body=AdapterUpload(
    name="sdk-uploaded", file=File(payload=io.BytesIO(data), file_name="lora.safetensors")))
assert taken.status_code == 409 and taken.parsed.error.code == "adapter_exists", taken.content[:300]
assert delete_adapter.sync_detailed("sdk-uploaded", client=client).status_code == 204
ended = cancel_job.sync_detailed(job_id, client=client)
assert ended.status_code == 409 and ended.parsed.error.code == "job_finished", ended.content[:300]
tuned = generate.sync_detailed(client=inference, body=GenerateRequest.from_dict(
    {"prompt": "a red circle", "model": "tiny-sd15", "steps": 3, "seed": 5, "adapter": "sdk-adapter"}))
assert tuned.status_code == 200, tuned.content[:300]
d = delete_adapter.sync_detailed("sdk-adapter", client=client)
assert d.status_code == 204, (d.status_code, d.content)
assert "sdk-adapter" not in [a.name for a in list_adapters.sync(client=client)]
gone = get_job.sync_detailed("00000000-0000-0000-0000-000000000000", client=client)
assert gone.status_code == 404 and gone.parsed.error.code == "job_not_found"
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
fn generated_python_client_drives_every_operation() {
    if !generator_installed() {
        eprintln!(
            "SKIPPED generated_python_client_drives_every_operation: openapi-python-client is not installed \
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
    let www = common::fileserver::FileServer::start({
        let root = temp_dir("www");
        std::fs::copy(
            models_dir().join("../../shapes/prefs_centered.parquet"),
            root.join("prefs.parquet"),
        )
        .unwrap();
        root
    });
    const FULL: &str = "sdk-full-key-0123456789";
    const GENERATE: &str = "sdk-generate-key-0123456789";
    let mut config = tiny_config();
    config.models.serve.truncate(2);
    config.auth.api_keys = vec![FULL.into(), format!("{GENERATE}:generate")];
    config.datasets.allow_private_networks = true;
    config.rewards.clip_score = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/rewards/models/tiny-clip")
        .display()
        .to_string();
    let server = start(config);
    let run = Command::new("python3")
        .arg("-c")
        .arg(SCRIPT)
        .arg(format!("http://{}", server.addr))
        .args([FULL, GENERATE, &www.url("prefs.parquet")])
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
