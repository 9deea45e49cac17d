//! Bad inputs to the model stack are error values with a useful message, never panics.

use candle_core::{DType, Device, Tensor};
use dspo_server::models::pipeline_model::LoadOptions;
use dspo_server::models::tokenizer::ClipTokenizer;
use dspo_server::models::{DiffusionModel, ModelError};
use dspo_server::pipelines::{self, Notes, PipelineError, PromptPair, SamplingParams};
use dspo_server::rng::NoiseRng;
use dspo_server::schedulers::{SchedulerError, SchedulerKind};
use std::path::{Path, PathBuf};

fn models() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/conformance/models")
}

fn copy_dir(src: &Path, dst: &Path) {
    std::fs::create_dir_all(dst).unwrap();
    for e in std::fs::read_dir(src).unwrap() {
        let e = e.unwrap();
        let p = e.path();
        if p.is_dir() {
            copy_dir(&p, &dst.join(e.file_name()));
        } else {
            std::fs::copy(&p, dst.join(e.file_name())).unwrap();
        }
    }
}

fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("dspo-err-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    copy_dir(&models().join("tiny-sd15"), &d);
    d
}

fn load(dir: &Path) -> Result<DiffusionModel, ModelError> {
    DiffusionModel::load(dir, &LoadOptions::default())
}

#[test]
fn missing_weight_file_is_named() {
    let d = scratch("missing");
    std::fs::remove_file(d.join("unet/diffusion_pytorch_model.safetensors")).unwrap();
    let e = load(&d).err().expect("must fail");
    assert!(matches!(e, ModelError::MissingFile(_)), "{e}");
    assert!(e.to_string().contains("unet"), "{e}");
    std::fs::remove_dir_all(&d).unwrap();
}

#[test]
fn corrupt_weight_file_is_an_error() {
    let d = scratch("corrupt");
    let f = d.join("vae/diffusion_pytorch_model.safetensors");
    let bytes = std::fs::read(&f).unwrap();
    std::fs::write(&f, &bytes[..bytes.len() / 3]).unwrap();
    let e = load(&d).err().expect("must fail");
    assert!(matches!(e, ModelError::Corrupt(..)), "{e}");
    std::fs::write(&f, b"not a safetensors file at all").unwrap();
    assert!(load(&d).is_err());
    std::fs::remove_dir_all(&d).unwrap();
}

#[test]
fn unsupported_config_value_names_the_field() {
    let d = scratch("config");
    let p = d.join("unet/config.json");
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    v["act_fn"] = "mish".into();
    std::fs::write(&p, v.to_string()).unwrap();
    let e = load(&d).err().expect("must fail");
    assert!(e.to_string().contains("act_fn"), "{e}");

    v["act_fn"] = "silu".into();
    v["block_out_channels"] = serde_json::json!([16, 16, 32, 48]);
    std::fs::write(&p, v.to_string()).unwrap();
    let e = load(&d)
        .err()
        .expect("a config that does not fit the weights must fail");
    assert!(
        matches!(
            e,
            ModelError::ShapeMismatch { .. }
                | ModelError::MissingTensor { .. }
                | ModelError::Config(_)
        ),
        "{e}"
    );

    let sp = d.join("scheduler/scheduler_config.json");
    let mut s: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&sp).unwrap()).unwrap();
    v["block_out_channels"] = serde_json::json!([16, 16, 32, 32]);
    std::fs::write(&p, v.to_string()).unwrap();
    s["prediction_type"] = "sample".into();
    std::fs::write(&sp, s.to_string()).unwrap();
    let e = load(&d).err().expect("must fail");
    assert!(e.to_string().contains("prediction_type"), "{e}");
    std::fs::remove_dir_all(&d).unwrap();
}

#[test]
fn tokenizer_without_tokenizer_json_matches_the_fast_tokenizer() {
    let d = scratch("tok");
    std::fs::remove_file(d.join("tokenizer/tokenizer.json")).unwrap();
    let slow_files = ClipTokenizer::load(&d.join("tokenizer")).unwrap();
    let fast = ClipTokenizer::load(&models().join("tiny-sd15/tokenizer")).unwrap();
    for p in [
        "a photograph of an astronaut riding a horse",
        "",
        "A Cat, sitting on a MAT!!! (4k)",
        "東京の夜景 🐱🚀 it's 100% café",
    ] {
        assert_eq!(
            slow_files.encode(p).unwrap().ids,
            fast.encode(p).unwrap().ids,
            "{p}"
        );
    }
    std::fs::remove_dir_all(&d).unwrap();
}

fn tiny() -> DiffusionModel {
    load(&models().join("tiny-sd15")).unwrap()
}

fn params(h: usize, w: usize) -> SamplingParams {
    SamplingParams {
        height: h,
        width: w,
        steps: 2,
        guidance_scale: 7.5,
        scheduler: SchedulerKind::Ddim,
    }
}

#[test]
fn bad_sizes_steps_and_scheduler_names_are_errors() {
    let m = tiny();
    let prompt = [PromptPair {
        prompt: "a cat".into(),
        negative_prompt: None,
    }];
    let noise = Tensor::zeros((1, 4, 8, 8), DType::F32, &Device::Cpu).unwrap();
    let mut rng = NoiseRng::new(0);
    let mut notes = Notes::default();
    for (h, w) in [(60, 64), (64, 0), (0, 0), (64, 66)] {
        let e = pipelines::run(
            &m,
            pipelines::Task::Txt2Img,
            &prompt,
            &params(h, w),
            &noise,
            &mut rng,
            &mut |_, _| true,
            &mut notes,
        )
        .err();
        assert!(
            matches!(e, Some(PipelineError::Invalid(_))),
            "{h}x{w}: {e:?}"
        );
    }
    let mut p = params(64, 64);
    p.steps = 0;
    let e = pipelines::run(
        &m,
        pipelines::Task::Txt2Img,
        &prompt,
        &p,
        &noise,
        &mut rng,
        &mut |_, _| true,
        &mut notes,
    )
    .err();
    assert!(
        matches!(
            e,
            Some(PipelineError::Scheduler(SchedulerError::Steps { .. }))
        ),
        "{e:?}"
    );
    let e = "warp_drive"
        .parse::<SchedulerKind>()
        .err()
        .expect("unknown scheduler");
    assert!(e.to_string().contains("warp_drive"));
    // instruct_pix2pix on a 4-channel UNet is refused, not attempted.
    let img = Tensor::zeros((1, 3, 64, 64), DType::F32, &Device::Cpu).unwrap();
    let e = pipelines::run(
        &m,
        pipelines::Task::InstructPix2Pix {
            image_guidance_scale: 1.5,
            image: &img,
        },
        &prompt,
        &params(64, 64),
        &noise,
        &mut rng,
        &mut |_, _| true,
        &mut notes,
    )
    .err();
    assert!(matches!(e, Some(PipelineError::Unsupported(..))), "{e:?}");
}

#[test]
fn long_prompts_are_truncated_with_a_warning() {
    let m = tiny();
    let long = "a very long prompt with many words ".repeat(20);
    let t = m.tokenizer.encode(&long).unwrap();
    assert_eq!(t.ids.len(), 77);
    assert_eq!(t.ids[76], 49407);
    assert!(t.truncated > 0);
    let prompt = [PromptPair {
        prompt: long,
        negative_prompt: None,
    }];
    let noise = Tensor::zeros((1, 4, 8, 8), DType::F32, &Device::Cpu).unwrap();
    let mut notes = Notes::default();
    let mut p = params(64, 64);
    p.steps = 1;
    pipelines::run(
        &m,
        pipelines::Task::Txt2Img,
        &prompt,
        &p,
        &noise,
        &mut NoiseRng::new(0),
        &mut |_, _| true,
        &mut notes,
    )
    .unwrap();
    assert!(
        notes.warnings.iter().any(|w| w.contains("truncated")),
        "{:?}",
        notes.warnings
    );
}

#[test]
fn cancellation_stops_the_loop() {
    let m = tiny();
    let prompt = [PromptPair {
        prompt: "a cat".into(),
        negative_prompt: None,
    }];
    let noise = Tensor::zeros((1, 4, 8, 8), DType::F32, &Device::Cpu).unwrap();
    let mut calls = 0;
    let mut p = params(64, 64);
    p.steps = 5;
    let e = pipelines::run(
        &m,
        pipelines::Task::Txt2Img,
        &prompt,
        &p,
        &noise,
        &mut NoiseRng::new(0),
        &mut |i, _| {
            calls += 1;
            i < 2
        },
        &mut Notes::default(),
    )
    .err();
    assert!(matches!(e, Some(PipelineError::Cancelled)));
    assert_eq!(calls, 2);
}
