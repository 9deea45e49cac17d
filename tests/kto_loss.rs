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
