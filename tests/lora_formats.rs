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
    close_within(what, out, reference, 2e-5, 2e-4)
}

fn close_within(what: &str, out: &Tensor, reference: &Tensor, max_rel: f64, max_abs_err: f64) {
    let (max_abs, rel) = compare(out, reference).unwrap();
    assert!(
        rel < max_rel && max_abs < max_abs_err,
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

/// SDXL files from kohya's scripts name UNet layers in the original layout
/// (`lora_unet_input_blocks_4_1_...`) and the two encoders `lora_te1_` / `lora_te2_`.
#[test]
fn kohya_sdxl_lora_in_the_original_layout_matches_diffusers() {
    let device = Device::Cpu;
    let model = DiffusionModel::load(
        &common::models_dir().join("tiny-sdxl"),
        &LoadOptions {
            device: device.clone(),
            dtype: DType::F32,
            variant: None,
        },
    )
    .unwrap();
    let reference =
        candle_core::safetensors::load(fixture("kohya_sdxl.reference.safetensors"), &device).unwrap();
    let get = |k: &str| reference.get(k).unwrap_or_else(|| panic!("{k} missing")).clone();
    let f32 = |k: &str| get(k).to_dtype(DType::F32).unwrap();
    let ids = get("inputs.input_ids").to_dtype(DType::U32).unwrap();
    let (sample, t) = (f32("inputs.sample"), f32("inputs.timestep"));
    let (context, text_embeds, time_ids) = (
        f32("inputs.encoder_hidden_states"),
        f32("inputs.text_embeds"),
        f32("inputs.time_ids"),
    );
    let two = model.text_encoder_2.as_ref().unwrap();
    // with_lora: the expected outputs; without: the reference's own base-model outputs.
    let check = |with_lora: bool| {
        let key = |k: &str| match with_lora {
            true => format!("expected.{k}"),
            false => format!("debug.{k}_without_lora"),
        };
        let suffix = if with_lora { " with the kohya LoRA" } else { " without LoRA" };
        let one = model.text_encoder.forward(&ids).unwrap();
        close(&format!("text encoder 1{suffix}"), &one.last_hidden_state, &get(&key("text_hidden")));
        let out = two.forward(&ids).unwrap();
        close(&format!("text encoder 2 hidden{suffix}"), &out.last_hidden_state, &get(&key("text_hidden_2")));
        close(&format!("text encoder 2 projection{suffix}"), &out.pooled, &get(&key("text_embeds_2")));
        let added = dspo_server::models::unet::AddedCond {
            text_embeds: &text_embeds,
            time_ids: &time_ids,
        };
        let pred = model.unet.forward(&sample, &t, &context, Some(added)).unwrap();
        // The random adapter inflates this UNet's activations: diffusers' own float32 pass is
        // 6.9e-5 (relative) and 2.1e-4 (max) from its float64 reference here, so float32
        // rounding alone allows a few times that.
        close_within(&format!("UNet{suffix}"), &pred, &get(&key("noise_pred")), 4e-4, 1e-3);
    };
    check(false);
    let adapter = LoraAdapter::load(&fixture("kohya_sdxl.safetensors"), &device).unwrap();
    assert_eq!(
        (adapter.modules.len(), adapter.text_encoder.len(), adapter.text_encoder_2.len()),
        (192, 18, 18)
    );
    adapter.attach(model.unet.linears(), 1.0, DType::F32).unwrap();
    adapter
        .attach_text([Some(model.text_encoder.linears()), Some(two.linears())], 1.0, DType::F32)
        .unwrap();
    check(true);
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
