//! `make-random-model` writes pipelines that our own loader reads back and runs, under the
//! exact parameter names of real diffusers/transformers files (the benchmark compares us with
//! diffusers on these files, so a wrong name would silently benchmark a different model).

use candle_core::{DType, Device};
use dspo_server::models::pipeline_model::LoadOptions;
use dspo_server::models::random_model::{make_random_model, RandomModelOptions};
use dspo_server::models::DiffusionModel;
use dspo_server::pipelines::{self, Notes, PromptPair, SamplingParams};
use dspo_server::rng::NoiseRng;
use dspo_server::schedulers::SchedulerKind;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

fn shared(p: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../shared")
        .join(p)
}

fn scratch(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("dspo-random-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

fn names_and_shapes(file: &Path) -> BTreeMap<String, Vec<usize>> {
    candle_core::safetensors::load(file, &Device::Cpu)
        .unwrap()
        .into_iter()
        .map(|(k, t)| (k, t.dims().to_vec()))
        .collect()
}

#[test]
fn random_tiny_sd15_has_the_real_layout_and_generates() {
    let src = shared("conformance/models/tiny-sd15");
    let out = scratch("tiny");
    let reports = make_random_model(&src, &out, &RandomModelOptions::default()).unwrap();
    assert_eq!(
        reports.iter().filter(|r| r.action == "weights").count(),
        3,
        "{reports:?}"
    );

    // The real tiny-sd15 files were written by diffusers/transformers save_pretrained.
    for (component, file) in [
        ("unet", "diffusion_pytorch_model.safetensors"),
        ("vae", "diffusion_pytorch_model.safetensors"),
        ("text_encoder", "model.safetensors"),
    ] {
        let ours = names_and_shapes(&out.join(component).join(file));
        let real = names_and_shapes(&src.join(component).join(file));
        assert_eq!(
            ours, real,
            "{component}: names or shapes differ from the diffusers-written file"
        );
    }

    let model = DiffusionModel::load(&out, &LoadOptions::default()).unwrap();
    let params = SamplingParams {
        height: 64,
        width: 64,
        steps: 1,
        guidance_scale: 7.5,
        scheduler: SchedulerKind::Ddim,
    };
    let (h, w) = params.validate(&model).unwrap();
    let mut rng = NoiseRng::new(0);
    let noise = rng
        .randn((1, model.latent_channels(), h, w), &Device::Cpu, DType::F32)
        .unwrap();
    let prompts = [PromptPair {
        prompt: "a red cube".into(),
        negative_prompt: None,
    }];
    let img = pipelines::run(
        &model,
        pipelines::Task::Txt2Img,
        &prompts,
        &params,
        &noise,
        &mut rng,
        &mut |_, _| true,
        &mut Notes::default(),
    )
    .unwrap();
    assert_eq!(img.dims(), &[1, 3, 64, 64]);
    let px: Vec<f32> = img.flatten_all().unwrap().to_vec1().unwrap();
    assert!(px.iter().all(|v| v.is_finite() && (0.0..=1.0).contains(v)));
    let _ = std::fs::remove_dir_all(&out);
}

#[test]
fn narrowed_f16_model_loads() {
    let out = scratch("narrow-f16");
    let opts = RandomModelOptions {
        width_scale: 0.5,
        dtype: DType::F16,
        seed: 7,
        ..Default::default()
    };
    let reports = make_random_model(&shared("conformance/models/tiny-sd15"), &out, &opts).unwrap();
    let unet = reports.iter().find(|r| r.component == "unet").unwrap();
    assert!(
        unet.changed
            .iter()
            .any(|c| c.starts_with("block_out_channels")),
        "{unet:?}"
    );
    let st = candle_core::safetensors::load(
        out.join("unet/diffusion_pytorch_model.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    assert!(st.values().all(|t| t.dtype() == DType::F16));
    // tiny-sd15's 16/16/32/32 with 2 heads: half width rounds to multiples of lcm(8, 2).
    let model = DiffusionModel::load(&out, &LoadOptions::default()).unwrap();
    assert_eq!(model.unet.config.block_out_channels, vec![8, 8, 16, 16]);
    assert_eq!(model.unet.config.norm_num_groups, 8);
    let _ = std::fs::remove_dir_all(&out);
}
