//! Preference tuning of InstructPix2Pix models: edit pairs (a source image, an instruction and
//! two edits of it) train an adapter that POST /edit uses. One training step (the source
//! latents as extra UNet channels, InstructPix2Pix's conditioning dropout, DSPO and
//! Diffusion-DPO) is checked against the PyTorch float64 reference written by
//! tests/fixtures/ip2p_pref/make_case.py; then whole jobs run over HTTP, from parquet and from
//! a JSONL manifest, and a text-to-image pairs file is refused for an edit model.

mod common;

use candle_core::{DType, Device, Tensor, Var};
use dspo_server::conformance::compare;
use dspo_server::models::lora::LoraAdapter;
use dspo_server::models::nn::LoraDelta;
use dspo_server::models::unet::UNet2DConditionModel;
use dspo_server::models::weights::Weights;
use dspo_server::training::dataset::{read_all_rows, write_pairs_parquet, PairRow};
use dspo_server::training::losses::Method;
use dspo_server::training::noise::NoiseSchedule;
use dspo_server::training::step::{
    apply_conditioning_dropout, batch_loss, conditioning_dropout, Batch, Reference,
};
use serde_json::json;
use std::path::PathBuf;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/ip2p_pref").join(name)
}

#[test]
fn one_edit_pair_step_matches_the_pytorch_reference() {
    let dev = Device::Cpu;
    let t = candle_core::safetensors::load(fixture("ip2p_step.safetensors"), &dev).unwrap();
    let model = common::models_dir().join("tiny-ip2p");
    let unet_dir = model.join("unet");
    let files = UNet2DConditionModel::weight_files(&unet_dir, None).unwrap();
    let unet = UNet2DConditionModel::new(
        UNet2DConditionModel::load_config(&unet_dir).unwrap(),
        &Weights::from_files(&files, &dev, DType::F32).unwrap(),
    )
    .unwrap();
    let adapter = LoraAdapter::load(&fixture("ip2p_step.lora.safetensors"), &dev).unwrap();
    let mut vars: Vec<(String, Var)> = Vec::new();
    for (module, m) in &adapter.modules {
        let (slot, _, _) = unet.linears().get(module).expect("adapter module in the UNet");
        let (down, up) = (Var::from_tensor(&m.down).unwrap(), Var::from_tensor(&m.up).unwrap());
        slot.set(Some(LoraDelta {
            down: down.as_tensor().clone(),
            up: up.as_tensor().clone(),
            scale: adapter.module_scale(m),
        }));
        vars.push((m.down_key.clone(), down));
        vars.push((m.up_key.clone(), up));
    }
    let schedule = NoiseSchedule::from_model_dir(&model).unwrap();

    let u: Vec<f64> = t["random_p"].to_dtype(DType::F64).unwrap().to_vec1().unwrap();
    let p = t["conditioning_dropout_prob"].to_dtype(DType::F64).unwrap().to_vec1::<f64>().unwrap()[0];
    let keep = conditioning_dropout(&u, p);
    // The fixture's draws cover every case: both kept, image dropped, text dropped, both dropped.
    assert_eq!(keep, vec![(true, true), (true, false), (false, true), (false, false)]);
    let (ehs, latents) = apply_conditioning_dropout(
        &t["encoder_hidden_states"],
        &t["null_encoder_hidden_states"],
        &t["original_image_embeds"],
        &keep,
    )
    .unwrap();
    let ts: Vec<i64> = t["timesteps"].to_vec1().unwrap();
    let ts: Vec<usize> = ts.iter().chain(ts.iter()).map(|&v| v as usize).collect();
    let batch = Batch {
        x0: t["x0"].clone(),
        noise: Tensor::cat(&[&t["noise"], &t["noise"]], 0).unwrap(),
        timesteps: ts,
        encoder_hidden_states: Tensor::cat(&[&ehs, &ehs], 0).unwrap(),
        added: None,
        image_latents: Some(Tensor::cat(&[&latents, &latents], 0).unwrap()),
        labels: None,
    };
    for (case, method) in [("dspo", Method::Dspo), ("diffusion_dpo", Method::DiffusionDpo)] {
        let get = |k: &str| t[&format!("{case}.{k}")].to_dtype(DType::F64).unwrap();
        let beta = get("beta").to_vec1::<f64>().unwrap()[0];
        let out = batch_loss(&unet, Reference::AdaptersOff, &schedule, &batch, method, beta, 0.0)
            .unwrap();
        let loss = out.loss.to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap();
        let expected = get("loss").to_vec1::<f64>().unwrap()[0];
        assert!(
            ((loss - expected) / expected).abs() < 1e-4,
            "{case}: loss {loss} vs reference {expected}"
        );
        let (_, rel) = compare(&out.u.unwrap().to_dtype(DType::F64).unwrap(), &get("u")).unwrap();
        assert!(rel < 1e-3, "{case}: u relative error {rel:e}");
        // Over the whole gradient: some matrices' exact gradient is zero (self-attention
        // over a single token, where the query cannot matter), so per-matrix relative errors
        // would divide float noise by zero.
        let grads = out.loss.backward().unwrap();
        let (mut diff, mut norm) = (0.0f64, 0.0f64);
        for (key, var) in &vars {
            let g = grads.get(var.as_tensor()).expect("every LoRA matrix gets a gradient");
            let g: Vec<f64> = g.to_dtype(DType::F64).unwrap().flatten_all().unwrap().to_vec1().unwrap();
            let r: Vec<f64> = get(&format!("grad.{key}")).flatten_all().unwrap().to_vec1().unwrap();
            assert_eq!(g.len(), r.len(), "{key}");
            diff += g.iter().zip(&r).map(|(a, b)| (a - b).powi(2)).sum::<f64>();
            norm += r.iter().map(|b| b * b).sum::<f64>();
        }
        let rel = (diff / norm).sqrt();
        assert!(norm > 0.0 && rel < 1e-3, "{case}: gradient off by {rel:e} (relative L2 over {} matrices)", vars.len());
    }
}

/// Edit pairs built from the shapes world's images: each pair's loser is its source image and
/// the instruction is the winner's caption. Written as parquet and as a JSONL manifest.
fn edit_pairs_dir() -> PathBuf {
    let rows = read_all_rows(&common::models_dir().join("../../shapes/prefs_centered.parquet")).unwrap();
    let root = common::temp_dir("edit-pairs");
    let pairs: Vec<PairRow> = rows
        .into_iter()
        .filter(|r| r.label_0 == 1.0 || r.label_0 == 0.0)
        .take(8)
        .map(|r| {
            let source = if r.label_0 == 1.0 { r.jpg_1.clone() } else { r.jpg_0.clone() };
            PairRow { input_image: Some(source), ..r }
        })
        .collect();
    write_pairs_parquet(&root.join("edits.parquet"), &pairs, 4).unwrap();
    std::fs::create_dir_all(root.join("img")).unwrap();
    let mut jsonl = String::new();
    for (i, r) in pairs.iter().enumerate() {
        for (k, bytes) in [("s", r.input_image.as_ref().unwrap()), ("0", &r.jpg_0), ("1", &r.jpg_1)] {
            std::fs::write(root.join(format!("img/{i}_{k}.jpg")), bytes).unwrap();
        }
        jsonl.push_str(&json!({"caption": r.caption, "input_image": format!("img/{i}_s.jpg"),
            "image_0": format!("img/{i}_0.jpg"), "image_1": format!("img/{i}_1.jpg"),
            "label_0": r.label_0}).to_string());
        jsonl.push('\n');
    }
    std::fs::write(root.join("edits.jsonl"), jsonl).unwrap();
    std::fs::copy(
        common::models_dir().join("../../shapes/prefs_centered.parquet"),
        root.join("prefs.parquet"),
    )
    .unwrap();
    root
}

#[test]
fn edit_preference_jobs_run_over_http_and_serve_edit() {
    let root = edit_pairs_dir();
    let www = common::fileserver::FileServer::start(root.clone());
    let mut c = common::tiny_config();
    c.models.serve = vec![format!("tiny-ip2p={}", common::models_dir().join("tiny-ip2p").display())];
    c.datasets.allow_private_networks = true;
    let server = common::start(c);
    let source = std::fs::read(root.join("img/0_s.jpg")).unwrap();
    let edit = json!({"image": common::b64(&source), "prompt": "make it blue", "steps": 3, "seed": 5});
    let base = common::pixels(&common::pngs(&common::post_json(&server, "/edit", &edit))[0]);
    let hyper = json!({"max_steps": 2, "batch_size": 2, "learning_rate": 1e-2, "resolution": 64,
                       "warmup_steps": 0, "drift_every": 1, "conditioning_dropout": 0.1});
    for (method, file) in [("dspo", "edits.parquet"), ("diffusion_dpo", "edits.jsonl")] {
        let name = format!("edit-{method}");
        let (job, metrics) = common::finetune(&server, &json!({
            "dataset_url": www.url(file), "method": method, "adapter_name": name,
            "lora": {"rank": 2, "alpha": 2.0}, "hyperparameters": hyper}));
        assert_eq!(job["status"], "completed", "{method}: {job}");
        assert_eq!(metrics.len(), 2, "{method}");
        // The drift guard's probe edits the dataset's source images.
        assert!(metrics.iter().all(|m| m["drift"].as_f64().is_some_and(|d| d > 0.0)), "{metrics:?}");
        let mut tuned = edit.clone();
        tuned["adapter"] = json!(name);
        let tuned = common::pixels(&common::pngs(&common::post_json(&server, "/edit", &tuned))[0]);
        assert_ne!(base, tuned, "{method}: the adapter changes nothing");
    }

    // Text-to-image pairs have no source image: the job fails saying so.
    let (job, _) = common::finetune(&server, &json!({"dataset_url": www.url("prefs.parquet"), "method": "dspo",
        "hyperparameters": {"max_steps": 1, "resolution": 64}}));
    assert_eq!(job["status"], "failed", "{job}");
    assert!(job["error"]["message"].as_str().unwrap().contains("input_image"), "{job}");
    let _ = std::fs::remove_dir_all(root);
}

#[test]
fn conditioning_dropout_is_for_edit_models_and_bounded() {
    let root = edit_pairs_dir();
    let www = common::fileserver::FileServer::start(root.clone());
    let mut c = common::tiny_config();
    c.models.serve.truncate(1);
    c.datasets.allow_private_networks = true;
    let server = common::start(c);
    let r = common::post_json(&server, "/finetune", &json!({"dataset_url": www.url("prefs.parquet"),
        "method": "dspo", "hyperparameters": {"conditioning_dropout": 0.5}}));
    assert_eq!(r.status, 422, "{:?}", r.json());
    assert!(r.json()["error"]["message"].as_str().unwrap().contains("1/3"), "{:?}", r.json());
    let (job, _) = common::finetune(&server, &json!({"dataset_url": www.url("prefs.parquet"), "method": "dspo",
        "hyperparameters": {"max_steps": 1, "resolution": 64, "conditioning_dropout": 0.1}}));
    assert_eq!(job["status"], "failed", "{job}");
    assert!(job["error"]["message"].as_str().unwrap().contains("caption_dropout"), "{job}");
    let _ = std::fs::remove_dir_all(root);
}
