//! Diffusion-KTO's loss and gradient against the official trainer's formula, computed with
//! torch autograd in float64 by tests/fixtures/kto/make_kto_case.py: one case whose reference
//! point is positive, one where it clamps to zero. Then a whole `diffusion_kto` job over HTTP
//! on the tiny model, whose adapter serves /generate; and SDXL preference jobs over HTTP.

mod common;

use candle_core::{DType, Device, Var};
use serde_json::json;
use dspo_server::conformance::compare;
use dspo_server::training::losses::{preference, Method};
use std::path::PathBuf;

#[test]
fn kto_loss_and_gradient_match_the_reference() {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/kto/kto_loss.safetensors");
    let t = candle_core::safetensors::load(path, &Device::Cpu).unwrap();
    for case in ["positive_kl", "clamped_kl"] {
        let get = |k: &str| t[&format!("{case}.{k}")].clone();
        let beta = get("beta").to_vec1::<f64>().unwrap()[0];
        let model_pred = Var::from_tensor(&get("model_pred")).unwrap();
        let out = preference(
            Method::DiffusionKto,
            model_pred.as_tensor(),
            &get("ref_pred"),
            &get("target"),
            beta,
            1.0,
        )
        .unwrap();
        let loss = out.loss.to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap();
        let expected = get("loss").to_vec1::<f64>().unwrap()[0];
        assert!((loss - expected).abs() < 1e-12, "{case}: loss {loss} vs {expected}");
        let grads = out.loss.backward().unwrap();
        let grad = grads.get(model_pred.as_tensor()).unwrap();
        let (max_abs, rel) = compare(grad, &get("grad")).unwrap();
        assert!(rel < 1e-10, "{case}: gradient max |diff| {max_abs:e}, relative {rel:e}");
    }
}

/// The official DSPO trainer's SDXL branch, in both of its forms, against
/// tests/fixtures/dspo_sdxl/make_case.py (torch float64, the official code's lines).
#[test]
fn dspo_sdxl_loss_and_gradient_match_the_official_branch() {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/dspo_sdxl/dspo_sdxl_loss.safetensors");
    let t = candle_core::safetensors::load(path, &Device::Cpu).unwrap();
    for case in ["far", "near"] {
        let get = |k: &str| t[&format!("{case}.{k}")].clone();
        let beta = get("beta").to_vec1::<f64>().unwrap()[0];
        let model_pred = Var::from_tensor(&get("model_pred")).unwrap();
        let out = preference(Method::DspoSdxl, model_pred.as_tensor(), &get("ref_pred"), &get("target"), beta, 1.0)
            .unwrap();
        let loss = out.loss.to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap();
        let expected = get("loss").to_vec1::<f64>().unwrap()[0];
        assert!((loss - expected).abs() < 1e-12, "{case}: loss {loss} vs {expected}");
        let (_, rel) = compare(&out.u, &get("u")).unwrap();
        assert!(rel < 1e-12, "{case}: u off by {rel:e}");
        let grads = out.loss.backward().unwrap();
        let (max_abs, rel) = compare(grads.get(model_pred.as_tensor()).unwrap(), &get("grad")).unwrap();
        assert!(rel < 1e-10, "{case}: gradient max |diff| {max_abs:e}, relative {rel:e}");
    }
}

#[test]
fn a_diffusion_kto_job_trains_an_adapter_over_http() {
    let www = common::shapes_pairs_server();
    let mut c = common::tiny_config();
    c.models.serve.truncate(1);
    c.datasets.allow_private_networks = true;
    let server = common::start(c);
    let (job, metrics) = common::finetune(&server, &json!({
        "dataset_url": www.url("prefs.parquet"), "method": "diffusion_kto", "adapter_name": "kto-tiny",
        "lora": {"rank": 2, "alpha": 2.0},
        "hyperparameters": {"max_steps": 3, "batch_size": 2, "max_pairs": 8, "learning_rate": 1e-2,
                            "resolution": 64, "warmup_steps": 0}}));
    assert_eq!(job["status"], "completed", "{job}");
    assert_eq!(job["spec"]["method"], "diffusion_kto");
    let losses: Vec<f64> = metrics.iter().map(|m| m["loss"].as_f64().unwrap()).collect();
    assert_eq!(losses.len(), 3);
    // 1 - sigmoid(.) lies in (0, 1).
    assert!(losses.iter().all(|l| *l > 0.0 && *l < 1.0), "{losses:?}");
    let gen = common::post_json(&server, "/generate", &json!({"prompt": "a red circle", "adapter": "kto-tiny", "steps": 2}));
    assert_eq!(gen.status, 200);
}

/// Unpaired data (`caption`, `jpg_0`, `label`), as parquet and as a JSONL manifest: each image
/// judged alone, labels given per image. A KTO job trains on it; another method is refused.
#[test]
fn unpaired_labelled_images_train_diffusion_kto() {
    use dspo_server::training::dataset::{read_all_rows, write_unpaired_parquet};
    let rows = read_all_rows(&common::models_dir().join("../../shapes/prefs_centered.parquet")).unwrap();
    // Each pair's images become two rows: the preferred one desirable, the other not.
    let mut singles = Vec::new();
    for r in rows.iter().filter(|r| r.label_0 == 1.0 || r.label_0 == 0.0).take(6) {
        let (good, bad) = if r.label_0 == 1.0 { (&r.jpg_0, &r.jpg_1) } else { (&r.jpg_1, &r.jpg_0) };
        singles.push((r.caption.clone(), good.clone(), 1.0));
        singles.push((r.caption.clone(), bad.clone(), 0.0));
    }
    let root = common::temp_dir("unpaired");
    write_unpaired_parquet(&root.join("labels.parquet"), &singles, 5).unwrap();
    std::fs::create_dir_all(root.join("img")).unwrap();
    let mut jsonl = String::new();
    for (i, (caption, bytes, label)) in singles.iter().enumerate() {
        std::fs::write(root.join(format!("img/{i}.jpg")), bytes).unwrap();
        jsonl.push_str(&json!({"caption": caption, "image": format!("img/{i}.jpg"), "label": label}).to_string());
        jsonl.push('\n');
    }
    std::fs::write(root.join("labels.jsonl"), jsonl).unwrap();
    let www = common::fileserver::FileServer::start(root.clone());
    let mut c = common::tiny_config();
    c.models.serve.truncate(1);
    c.datasets.allow_private_networks = true;
    let server = common::start(c);
    let hyper = json!({"max_steps": 3, "batch_size": 4, "learning_rate": 1e-2, "resolution": 64,
                       "warmup_steps": 0, "drift_every": 0});
    for file in ["labels.parquet", "labels.jsonl"] {
        let name = format!("kto-{}", file.replace('.', "-"));
        let (job, metrics) = common::finetune(&server, &json!({
            "dataset_url": www.url(file), "method": "diffusion_kto", "adapter_name": name,
            "lora": {"rank": 2, "alpha": 2.0}, "hyperparameters": hyper}));
        assert_eq!(job["status"], "completed", "{file}: {job}");
        assert_eq!(job["dataset"]["kept"], 12, "{job}");
        assert_eq!(metrics.len(), 3);
        for m in &metrics {
            let loss = m["loss"].as_f64().unwrap();
            assert!(loss > 0.0 && loss < 1.0, "{m}");
            assert!(m["implicit_accuracy"].as_f64().is_some(), "{m}");
        }
        let gen = common::post_json(&server, "/generate", &json!({"prompt": "a red circle", "adapter": name, "steps": 2}));
        assert_eq!(gen.status, 200);
    }
    let (job, _) = common::finetune(&server, &json!({"dataset_url": www.url("labels.parquet"), "method": "dspo",
        "hyperparameters": hyper}));
    assert_eq!(job["status"], "failed", "{job}");
    assert!(job["error"]["message"].as_str().unwrap().contains("diffusion_kto"), "{job}");
    let _ = std::fs::remove_dir_all(root);
}

/// Per-image labels in any order: the loss of rows and labels permuted together is the same,
/// and the pair layout (winners desirable, losers not) is that labelling.
#[test]
fn kto_labels_follow_their_rows() {
    use dspo_server::training::losses::kto;
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/kto/kto_loss.safetensors");
    let t = candle_core::safetensors::load(path, &Device::Cpu).unwrap();
    let get = |k: &str| t[&format!("positive_kl.{k}")].clone();
    let beta = get("beta").to_vec1::<f64>().unwrap()[0];
    let (pred, refp, target) = (get("model_pred"), get("ref_pred"), get("target"));
    let n = pred.dim(0).unwrap();
    let pair_labels: Vec<bool> = (0..n).map(|i| i < n / 2).collect();
    let as_pairs = kto(&pred, &refp, &target, beta, &pair_labels).unwrap().loss.to_scalar::<f64>().unwrap();
    assert!((as_pairs - get("loss").to_vec1::<f64>().unwrap()[0]).abs() < 1e-12);
    let order: Vec<u32> = (0..n as u32).rev().collect();
    let idx = candle_core::Tensor::new(order.as_slice(), &Device::Cpu).unwrap();
    let pick = |x: &candle_core::Tensor| x.index_select(&idx, 0).unwrap();
    let labels: Vec<bool> = order.iter().map(|&i| pair_labels[i as usize]).collect();
    let permuted = kto(&pick(&pred), &pick(&refp), &pick(&target), beta, &labels).unwrap().loss.to_scalar::<f64>().unwrap();
    assert!((permuted - as_pairs).abs() < 1e-12, "{permuted} vs {as_pairs}");
    let flipped: Vec<bool> = pair_labels.iter().map(|d| !d).collect();
    let other = kto(&pred, &refp, &target, beta, &flipped).unwrap().loss.to_scalar::<f64>().unwrap();
    assert!((other - as_pairs).abs() > 1e-6, "labels change the loss");
}

/// A preference job on the tiny SDXL model over HTTP (two text encoders, pooled embeddings and
/// time ids at the training resolution), with every method; each adapter serves /generate.
#[test]
fn sdxl_preference_jobs_run_over_http() {
    let www = common::shapes_pairs_server();
    let mut c = common::tiny_config();
    c.models.serve = vec![format!("tiny-sdxl={}", common::models_dir().join("tiny-sdxl").display())];
    c.datasets.allow_private_networks = true;
    let server = common::start(c);
    for method in ["dspo", "diffusion_dpo", "diffusion_kto", "dspo_sdxl"] {
        let name = format!("sdxl-{method}");
        let (job, _) = common::finetune(&server, &json!({
            "dataset_url": www.url("prefs.parquet"), "method": method, "adapter_name": name,
            "lora": {"rank": 2, "alpha": 2.0},
            "hyperparameters": {"max_steps": 2, "batch_size": 1, "max_pairs": 4, "learning_rate": 1e-2,
                                "resolution": 64, "warmup_steps": 0}}));
        assert_eq!(job["status"], "completed", "{method}: {job}");
        let body = json!({"prompt": "a red circle", "steps": 2, "seed": 3});
        let base = common::pngs(&common::post_json(&server, "/generate", &body))[0].clone();
        let mut tuned_body = body.clone();
        tuned_body["adapter"] = json!(name);
        let tuned = common::pngs(&common::post_json(&server, "/generate", &tuned_body))[0].clone();
        assert_ne!(common::pixels(&base), common::pixels(&tuned), "{method}: the adapter changes nothing");
    }
}
