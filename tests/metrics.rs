//! GET /metrics: Prometheus text that a Prometheus parser (the `prometheus_client` package's
//! own) reads, with request counts and durations by route template and status, batch sizes,
//! generated images, queue depth per model and fine-tuning jobs by state.

mod common;

use common::*;
use serde_json::json;
use std::process::Command;

const PARSE: &str = r#"
import json, sys
from prometheus_client.parser import text_string_to_metric_families
out = {}
for fam in text_string_to_metric_families(sys.stdin.read()):
    out[fam.name] = {"type": fam.type, "samples": [[s.name, s.labels, s.value] for s in fam.samples]}
print(json.dumps(out))
"#;

#[test]
fn metrics_parse_as_prometheus_text_and_count_what_happened() {
    let installed = Command::new("python3")
        .args(["-c", "import prometheus_client"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !installed {
        eprintln!("SKIPPED the metrics test: pip install prometheus_client (.ci/run does)");
        return;
    }
    let mut config = tiny_config();
    config.models.serve.truncate(1);
    let server = start(config);
    let r = post_json(&server, "/generate", &json!({"prompt": "a red circle", "steps": 2, "num_images": 2}));
    assert_eq!(r.status, 200);
    assert_eq!(get(&server, "/finetune/not-a-job").status, 404);
    let text = get(&server, "/metrics");
    assert_eq!(text.status, 200);
    assert!(text.header("content-type").unwrap().starts_with("text/plain"));

    let mut child = Command::new("python3")
        .args(["-c", PARSE])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(&mut child.stdin.take().unwrap(), &text.body).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "not Prometheus text: {}", String::from_utf8_lossy(&out.stderr));
    let fams: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let samples = |fam: &str| fams[fam]["samples"].as_array().cloned().unwrap_or_default();
    let has = |fam: &str, pred: &dyn Fn(&serde_json::Value) -> bool| samples(fam).iter().any(pred);

    assert_eq!(fams["dspo_requests"]["type"], "counter", "{fams}");
    assert!(has("dspo_requests", &|s| s[1]["route"] == "/generate" && s[1]["status"] == "200" && s[2].as_f64() >= Some(1.0)));
    // Route templates, not raw paths: ids do not multiply the series.
    assert!(has("dspo_requests", &|s| s[1]["route"] == "/finetune/{id}" && s[1]["status"] == "404"));
    assert_eq!(fams["dspo_request_duration_seconds"]["type"], "histogram");
    assert!(has("dspo_batch_size", &|s| s[0] == "dspo_batch_size_count" && s[2].as_f64() >= Some(1.0)));
    assert!(has("dspo_images_generated", &|s| s[1]["model"] == "tiny-sd15" && s[2].as_f64() >= Some(2.0)));
    assert!(has("dspo_queue_size", &|s| s[1]["model"] == "tiny-sd15"));
    assert!(has("dspo_finetune_jobs", &|s| s[1]["status"] == "queued"));
}
