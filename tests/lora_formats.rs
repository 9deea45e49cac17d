//! LoRA files in kohya's / AUTOMATIC1111's layout (`lora_unet_*`, `lora_te_*`, alpha tensors,
//! 1x1-convolution factors) against diffusers: tests/fixtures/lora/make_kohya_case.py wrote a
//! random kohya file for tiny-sd15 and diffusers' float64 outputs with it loaded by
//! `load_lora_weights`; this loader must give the same text-encoder and UNet outputs. Also
//! through the server: the file dropped into the adapters directory serves /generate.

mod common;

use candle_core::{DType, Device, Tensor};
use dspo_server::conformance::compare;
use dspo_server::models::lora::LoraAdapter;
use dspo_server::models::pipeline_model::LoadOptions;
use dspo_server::models::DiffusionModel;
use std::path::PathBuf;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/lora").join(name)
}

fn close(what: &str, out: &Tensor, reference: &Tensor) {
    let (max_abs, rel) = compare(out, reference).unwrap();
    assert!(
        rel < 2e-5 && max_abs < 2e-4,
        "{what}: max |diff| {max_abs:.3e}, relative L2 {rel:.3e}"
    );
}

#[test]
fn kohya_unet_and_text_encoder_lora_match_diffusers() {
    let device = Device::Cpu;
    let model = DiffusionModel::load(
        &common::models_dir().join("tiny-sd15"),
        &LoadOptions {
            device: device.clone(),
            dtype: DType::F32,
            variant: None,
        },
    )
    .unwrap();
    let reference =
        candle_core::safetensors::load(fixture("kohya_sd15.reference.safetensors"), &device).unwrap();
    let get = |k: &str| reference.get(k).unwrap_or_else(|| panic!("{k} missing")).clone();
    let ids = get("inputs.input_ids").to_dtype(DType::U32).unwrap();
    let sample = get("inputs.sample").to_dtype(DType::F32).unwrap();
    let t = get("inputs.timestep").to_dtype(DType::F32).unwrap();

    let run = || {
        let hidden = model.text_encoder.forward(&ids).unwrap().last_hidden_state;
        let pred = model.unet.forward(&sample, &t, &hidden, None).unwrap();
        (hidden, pred)
    };
    // Without the adapter: the base model, as a check that the reference is what it claims.
    let (hidden, pred) = run();
    close("text encoder without LoRA", &hidden, &get("debug.text_hidden_without_lora"));
    close("UNet without LoRA", &pred, &get("debug.noise_pred_without_lora"));

    let adapter = LoraAdapter::load(&fixture("kohya_sd15.safetensors"), &device).unwrap();
    assert_eq!(adapter.modules.len(), 120, "UNet modules");
    assert_eq!(adapter.text_encoder.len(), 12, "text encoder modules");
    adapter.attach(model.unet.linears(), 1.0, DType::F32).unwrap();
    adapter
        .attach_text([Some(model.text_encoder.linears()), None], 1.0, DType::F32)
        .unwrap();
    let (hidden, pred) = run();
    close("text encoder with the kohya LoRA", &hidden, &get("expected.text_hidden"));
    close("UNet with the kohya LoRA", &pred, &get("expected.noise_pred"));

    // A model without a second text encoder refuses an adapter that has one.
    let err = adapter
        .attach_text([None, None], 1.0, DType::F32)
        .unwrap_err()
        .to_string();
    assert!(err.contains("text encoder 1"), "{err}");
}

#[test]
fn a_kohya_file_in_the_adapters_directory_serves_generate() {
    let mut config = common::tiny_config();
    config.models.serve.truncate(1);
    let adapters = config.server.data_dir.join("adapters/kohya-style");
    std::fs::create_dir_all(&adapters).unwrap();
    std::fs::copy(fixture("kohya_sd15.safetensors"), adapters.join("adapter.safetensors")).unwrap();
    let server = common::start(config);
    let body = |adapter: Option<&str>| {
        let mut b = serde_json::json!({"prompt": "a red circle", "steps": 2, "seed": 4});
        if let Some(a) = adapter {
            b["adapter"] = a.into();
        }
        b
    };
    let with = common::pngs(&common::post_json(&server, "/generate", &body(Some("kohya-style"))));
    let without = common::pngs(&common::post_json(&server, "/generate", &body(None)));
    assert_ne!(common::pixels(&with[0]), common::pixels(&without[0]));
    // The text encoder's adapter is detached with the UNet's: the base model comes back.
    let again = common::pngs(&common::post_json(&server, "/generate", &body(None)));
    assert_eq!(common::pixels(&again[0]), common::pixels(&without[0]));
}
