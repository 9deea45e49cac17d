//! POST /evaluate end to end against a real server on 127.0.0.1: a kohya adapter against the
//! base tiny SD 1.5 model under three reward models (the tiny CLIP, aesthetic and HPSv2 models
//! of tests/fixtures/rewards). The win rates are consistent with the per-image rows, and each
//! row's score is the reward of the image /generate returns for the same prompt, seed and
//! adapter, scored here through the library: the evaluation ran the serving pipeline.

mod common;

use candle_core::Device;
use common::*;
use dspo_server::models::rewards::{RewardKind, RewardModel};
use serde_json::{json, Value};
use std::path::PathBuf;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn config() -> dspo_server::config::Config {
    let mut c = tiny_config();
    c.models.serve.truncate(1);
    let models = fixtures().join("rewards/models");
    c.rewards.clip_score = models.join("tiny-clip").display().to_string();
    c.rewards.aesthetic = models.join("tiny-aesthetic").display().to_string();
    c.rewards.hpsv2 = models.join("tiny-hps").display().to_string();
    let adapter = c.server.data_dir.join("adapters/kohya-style");
    std::fs::create_dir_all(&adapter).unwrap();
    std::fs::copy(fixtures().join("lora/kohya_sd15.safetensors"), adapter.join("adapter.safetensors")).unwrap();
    c
}

fn wait_done(server: &dspo_server::api::running::RunningServer, id: &str) -> Value {
    let mut last = Value::Null;
    wait_until(300, "the evaluation to end", || {
        last = get(server, &format!("/evaluate/{id}")).json();
        ["completed", "failed", "cancelled"].contains(&last["status"].as_str().unwrap_or(""))
    });
    last
}

#[test]
fn an_adapter_is_evaluated_against_the_base_model_under_three_rewards() {
    let server = start(config());
    assert_eq!(
        get(&server, "/evaluate/rewards").json()["rewards"],
        json!(["clip_score", "aesthetic", "hpsv2"])
    );
    let prompts = ["a red circle", "a blue square on a green background", "a yellow triangle"];
    let body = json!({"model": "tiny-sd15", "adapter_a": "kohya-style", "prompts": prompts, "seeds": 2,
                      "steps": 2, "rewards": ["clip_score", "aesthetic", "hpsv2"]});
    let r = post_json(&server, "/evaluate", &body);
    assert_eq!(r.status, 202, "{:?}", r.json());
    let id = r.json()["evaluation_id"].as_str().unwrap().to_string();
    assert_eq!(r.json()["evaluation"]["total"], 12);
    let done = wait_done(&server, &id);
    assert_eq!(done["status"], "completed", "{done}");
    assert_eq!(done["done"], 12);

    let rows = get(&server, &format!("/evaluate/{id}/rows")).json();
    let rows = rows.as_array().unwrap();
    assert_eq!(rows.len(), 6);
    for (reward, result) in done["result"].as_object().unwrap() {
        let (n, w, t, l) = (
            result["n"].as_u64().unwrap(),
            result["wins"].as_u64().unwrap(),
            result["ties"].as_u64().unwrap(),
            result["losses"].as_u64().unwrap(),
        );
        assert_eq!((n, w + t + l), (6, 6), "{reward}: {result}");
        let from_rows = rows
            .iter()
            .filter(|row| {
                let s = &row["scores"][reward];
                s[0].as_f64().unwrap() > s[1].as_f64().unwrap()
            })
            .count() as u64;
        assert_eq!(from_rows, w, "{reward}: wins differ from the rows");
        let wr = result["winrate"].as_f64().unwrap();
        assert!((wr - (w as f64 + 0.5 * t as f64) / 6.0).abs() < 1e-12);
        assert_eq!(result["unpaired"]["n"], 6, "two seeds: every image has an unpaired partner");
        let mean_a: f64 = rows.iter().map(|r| r["scores"][reward][0].as_f64().unwrap()).sum::<f64>() / 6.0;
        assert!((result["mean_a"].as_f64().unwrap() - mean_a).abs() < 1e-9);
    }

    // Row scores are the rewards of the images the serving path makes for the same request.
    let clip = RewardModel::load(
        RewardKind::ClipScore,
        &fixtures().join("rewards/models/tiny-clip"),
        &Device::Cpu,
    )
    .unwrap();
    for row in rows.iter().filter(|r| r["prompt_index"] == 1) {
        let seed = row["seed"].as_u64().unwrap();
        assert_eq!(seed / 1000, 1);
        for (side, adapter) in [(0, Some("kohya-style")), (1, None)] {
            let mut g = json!({"model": "tiny-sd15", "prompt": prompts[1], "seed": seed, "steps": 2});
            if let Some(a) = adapter {
                g["adapter"] = json!(a);
            }
            let png = pngs(&post_json(&server, "/generate", &g))[0].clone();
            let img = image::load_from_memory(&png).unwrap().to_rgb8();
            let score = clip.score(&[img], &[prompts[1]]).unwrap()[0];
            let stored = row["scores"]["clip_score"][side].as_f64().unwrap();
            assert!((score - stored).abs() < 1e-9, "side {side} seed {seed}: {score} vs {stored}");
        }
    }
    let listed = get(&server, "/evaluate").json();
    assert!(listed.as_array().unwrap().iter().any(|e| e["id"] == id.as_str()));
}

#[test]
fn evaluations_are_validated_and_cancellable() {
    let server = start(config());
    for (body, status, code) in [
        (json!({"prompts": ["x"], "rewards": ["pickscore"]}), 422, "unknown_reward"),
        (json!({"prompts": ["x"], "rewards": []}), 422, "unknown_reward"),
        (json!({"prompts": [], "rewards": ["clip_score"]}), 422, "invalid_request"),
        (json!({"prompts": ["x"], "rewards": ["clip_score"], "seeds": 0}), 422, "invalid_request"),
        (json!({"prompts": ["x"], "rewards": ["clip_score"], "adapter_a": "nope"}), 404, "adapter_not_found"),
        (json!({"prompts": ["x"], "rewards": ["clip_score"], "steps": 0}), 422, "invalid_steps"),
        (json!({"prompts": ["x"], "rewards": ["clip_score"], "model": "nope"}), 404, "model_not_found"),
        (json!({"prompts": ["x"], "rewards": ["clip_score"], "nonsense": 1}), 422, "invalid_request"),
    ] {
        let r = post_json(&server, "/evaluate", &body);
        assert_eq!((r.status, r.code().as_str()), (status, code), "{body}: {:?}", r.json());
    }
    let many: Vec<String> = (0..60).map(|i| format!("prompt {i}")).collect();
    let r = post_json(&server, "/evaluate", &json!({"prompts": many, "rewards": ["clip_score"], "steps": 3}));
    assert_eq!(r.status, 202);
    let id = r.json()["evaluation_id"].as_str().unwrap().to_string();
    let rows = get(&server, &format!("/evaluate/{id}/rows"));
    assert_eq!((rows.status, rows.code().as_str()), (409, "evaluation_not_finished"));
    let c = request(&server, "DELETE", &format!("/evaluate/{id}"), &[], None);
    assert_eq!(c.status, 200);
    let done = wait_done(&server, &id);
    assert_eq!(done["status"], "cancelled", "{done}");
    assert!(done["done"].as_u64().unwrap() < 120);
    let missing = get(&server, "/evaluate/00000000-0000-0000-0000-000000000000");
    assert_eq!((missing.status, missing.code().as_str()), (404, "evaluation_not_found"));
}

/// `dspo-server eval --reward` and POST /evaluate are two paths to one protocol (the CLI runs
/// the pipeline in-process, the server through its worker): same prompts, seeds and settings,
/// same win counts and mean scores.
#[test]
fn the_eval_command_and_the_endpoint_agree() {
    let dir = temp_dir("eval-cli");
    let prompts = ["a red circle", "a green square"];
    std::fs::write(dir.join("prompts.txt"), prompts.join("\n")).unwrap();
    let adapter = fixtures().join("lora/kohya_sd15.safetensors");
    let tiny_clip = fixtures().join("rewards/models/tiny-clip");
    let tiny_hps = fixtures().join("rewards/models/tiny-hps");
    let run = std::process::Command::new(env!("CARGO_BIN_EXE_dspo-server"))
        .args(["eval", "--model"])
        .arg(models_dir().join("tiny-sd15"))
        .arg("--adapter")
        .arg(&adapter)
        .arg("--prompts")
        .arg(dir.join("prompts.txt"))
        .arg("--out")
        .arg(dir.join("out"))
        .args(["--seeds", "2", "--steps", "2", "--guidance-scale", "7.5", "--scheduler", "ddim", "--size", "64"])
        .arg("--reward")
        .arg(format!("clip_score={}", tiny_clip.display()))
        .arg("--reward")
        .arg(format!("hpsv2={}", tiny_hps.display()))
        .output()
        .unwrap();
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    let cli: Value = serde_json::from_slice(&std::fs::read(dir.join("out/result.json")).unwrap()).unwrap();

    let server = start(config());
    let body = json!({"model": "tiny-sd15", "adapter_a": "kohya-style", "prompts": prompts, "seeds": 2,
                      "steps": 2, "guidance_scale": 7.5, "scheduler": "ddim", "width": 64, "height": 64,
                      "rewards": ["clip_score", "hpsv2"]});
    let id = post_json(&server, "/evaluate", &body).json()["evaluation_id"].as_str().unwrap().to_string();
    let served = wait_done(&server, &id);
    assert_eq!(served["status"], "completed", "{served}");
    for reward in ["clip_score", "hpsv2"] {
        let (c, s) = (&cli["rewards"][reward], &served["result"][reward]);
        for k in ["n", "wins", "ties", "losses"] {
            assert_eq!(c[k], s[k], "{reward} {k}: cli {c} server {s}");
        }
        assert!((c["a"]["mean_reward"].as_f64().unwrap() - s["mean_a"].as_f64().unwrap()).abs() < 1e-9);
        assert!((c["b"]["mean_reward"].as_f64().unwrap() - s["mean_b"].as_f64().unwrap()).abs() < 1e-9);
        assert_eq!(c["unpaired"]["wins"], s["unpaired"]["wins"]);
    }
}

/// POST /finetune with an `evaluation` block: once the adapter is registered the server
/// evaluates it against the base model, and the job shows the evaluation and its win rates.
#[test]
fn a_finetune_job_evaluates_its_adapter() {
    let www = shapes_pairs_server();
    let mut c = config();
    c.datasets.allow_private_networks = true;
    let server = start(c);
    let job = |evaluation: Value| {
        json!({
            "dataset_url": www.url("prefs.parquet"), "method": "dspo", "base_model": "tiny-sd15",
            "lora": {"rank": 2, "alpha": 2.0},
            "hyperparameters": {"max_steps": 2, "batch_size": 2, "max_pairs": 8, "learning_rate": 1e-2,
                                "resolution": 64, "warmup_steps": 0},
            "evaluation": evaluation,
        })
    };
    let bad = post_json(&server, "/finetune", &job(json!({"prompts": ["x"], "rewards": ["pickscore"]})));
    assert_eq!((bad.status, bad.code().as_str()), (422, "unknown_reward"), "{:?}", bad.json());
    let r = post_json(
        &server,
        "/finetune",
        &job(json!({"prompts": ["a red circle", "a blue square"], "rewards": ["clip_score"], "seeds": 2, "steps": 2})),
    );
    assert_eq!(r.status, 202, "{:?}", r.json());
    let id = r.json()["job_id"].as_str().unwrap().to_string();
    let mut last = Value::Null;
    wait_until(300, "the job and its evaluation to end", || {
        last = get(&server, &format!("/finetune/{id}")).json();
        ["failed", "cancelled"].contains(&last["status"].as_str().unwrap_or(""))
            || ["completed", "failed"].contains(&last["evaluation"]["status"].as_str().unwrap_or(""))
    });
    assert_eq!(last["status"], "completed", "{last}");
    let e = &last["evaluation"];
    assert_eq!(e["status"], "completed", "{last}");
    assert_eq!(e["result"]["clip_score"]["n"], 4, "{e}");
    let eval_id = e["evaluation_id"].as_str().unwrap();
    let full = get(&server, &format!("/evaluate/{eval_id}")).json();
    assert_eq!(full["spec"]["adapter_a"], last["adapter"]);
    assert_eq!(full["spec"]["adapter_b"], Value::Null);
}

/// Prompt sets by URL (parquet with a `caption` column as Pick-a-Pic ships, JSON lines, plain
/// text), repeats kept once; and an InstructPix2Pix evaluation with one input image per prompt.
#[test]
fn prompt_sets_by_url_and_edit_evaluations() {
    let root = temp_dir("prompt-sets");
    let png = test_png(64, 64);
    let rows: Vec<_> = ["a red circle", "a blue square", "a red circle"]
        .iter()
        .map(|c| dspo_server::training::dataset::PairRow::new(*c, png.clone(), png.clone(), 1.0))
        .collect();
    dspo_server::training::dataset::write_pairs_parquet(&root.join("pairs.parquet"), &rows, 2).unwrap();
    std::fs::write(root.join("prompts.jsonl"), "{\"prompt\": \"a green star\"}\n{\"prompt\": \"a cat\"}\n").unwrap();
    std::fs::write(root.join("prompts.txt"), "one\n\ntwo\none\n").unwrap();
    let www = common::fileserver::FileServer::start(root);
    let mut c = config();
    c.datasets.allow_private_networks = true;
    c.models.serve = ["tiny-sd15", "tiny-ip2p"]
        .iter()
        .map(|n| format!("{n}={}", models_dir().join(n).display()))
        .collect();
    let server = start(c);
    for (file, expected) in [
        ("pairs.parquet", vec!["a red circle", "a blue square"]),
        ("prompts.jsonl", vec!["a green star", "a cat"]),
        ("prompts.txt", vec!["one", "two"]),
    ] {
        let r = post_json(&server, "/evaluate", &json!({"model": "tiny-sd15", "prompts_url": www.url(file),
                                                        "rewards": ["clip_score"], "steps": 1}));
        assert_eq!(r.status, 202, "{file}: {:?}", r.json());
        assert_eq!(r.json()["evaluation"]["spec"]["prompts"], json!(expected), "{file}");
        assert_eq!(r.json()["evaluation"]["total"], 4);
    }
    let missing = post_json(&server, "/evaluate", &json!({"prompts_url": www.url("nope.txt"), "rewards": ["clip_score"]}));
    assert_eq!((missing.status, missing.code().as_str()), (422, "invalid_request"));
    assert!(missing.json()["error"]["message"].as_str().unwrap().contains("404"), "{:?}", missing.json());

    let second = image::RgbImage::from_fn(64, 64, |x, y| image::Rgb([(x * 4) as u8, 90, (y * 4) as u8]));
    let mut second_png = Vec::new();
    second.write_to(&mut std::io::Cursor::new(&mut second_png), image::ImageFormat::Png).unwrap();
    let r = post_json(&server, "/evaluate", &json!({
        "model": "tiny-ip2p", "prompts": ["make it blue", "make it red"], "images": [b64(&png), b64(&second_png)],
        "image_guidance_scale": 1.5, "steps": 2, "rewards": ["clip_score", "aesthetic"]}));
    assert_eq!(r.status, 202, "{:?}", r.json());
    let done = wait_done(&server, r.json()["evaluation_id"].as_str().unwrap());
    assert_eq!(done["status"], "completed", "{done}");
    // Both sides are the base model: every pair ties.
    assert_eq!(done["result"]["clip_score"]["ties"], 2, "{done}");
    let bad = post_json(&server, "/evaluate", &json!({"model": "tiny-ip2p", "prompts": ["a", "b"],
                                                      "images": [b64(&png)], "rewards": ["clip_score"]}));
    assert_eq!((bad.status, bad.code().as_str()), (422, "invalid_request"));
}
