//! Single-file checkpoints (the original CompVis/LDM and SGM layouts A1111 and civitai users
//! own) against the diffusers-layout models they were written from: for the tiny SD 1.5,
//! InstructPix2Pix and SDXL models, tests/fixtures/single_file/make_single_file.py writes the
//! single file (its layout checked against diffusers' own `from_single_file`, see the script),
//! and a real server serving both gives the same pixels for the same request. A file that is
//! not a checkpoint fails to load with a reason, and the server keeps serving the others.

mod common;

use common::*;
use serde_json::json;
use std::path::{Path, PathBuf};
use std::process::Command;

fn write_single_file(model: &str, out: &Path) -> Result<(), String> {
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/single_file/make_single_file.py");
    let run = Command::new("python3")
        .arg(script)
        .arg(models_dir().join(model))
        .arg(out)
        .output()
        .map_err(|e| e.to_string())?;
    if run.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&run.stderr).into_owned())
    }
}

#[test]
fn single_file_checkpoints_serve_the_same_images_as_their_directories() {
    let dir = temp_dir("single-file");
    let mut serve = Vec::new();
    for model in ["tiny-sd15", "tiny-ip2p", "tiny-sdxl"] {
        let file = dir.join(format!("{model}.safetensors"));
        if let Err(e) = write_single_file(model, &file) {
            let missing = e.contains("No module named");
            if missing && std::env::var_os("CI").is_none() {
                eprintln!("SKIPPED the single-file test: pip install numpy safetensors (.ci/run does)\n{e}");
                return;
            }
            panic!("make_single_file.py failed for {model}: {e}");
        }
        let config = models_dir().join(model);
        serve.push(format!("{model}={}", config.display()));
        serve.push(format!("{model}-file={},config={}", file.display(), config.display()));
    }
    let mut config = tiny_config();
    config.models.serve = serve;
    let server = start(config);
    let models = get(&server, "/models").json();
    let entry = |name: &str| {
        models["models"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["name"] == name)
            .cloned()
            .unwrap()
    };
    for (model, arch) in [
        ("tiny-sd15", "stable_diffusion"),
        ("tiny-ip2p", "instruct_pix2pix"),
        ("tiny-sdxl", "stable_diffusion_xl"),
    ] {
        let file_model = format!("{model}-file");
        assert_eq!(entry(&file_model)["architecture"], arch, "{}", entry(&file_model));
        let pair = |m: &str| -> Vec<u8> {
            let r = if arch == "instruct_pix2pix" {
                post_json(&server, "/edit", &json!({"model": m, "prompt": "make it blue", "steps": 3,
                                                   "seed": 6, "image": b64(&test_png(64, 64))}))
            } else {
                post_json(&server, "/generate", &json!({"model": m, "prompt": "a red circle", "steps": 3,
                                                       "seed": 6, "negative_prompt": "blue"}))
            };
            pixels(&pngs(&r)[0])
        };
        assert_eq!(pair(model), pair(&file_model), "{model}: the single file differs from the directory");
    }
}

#[test]
fn a_file_that_is_not_a_checkpoint_is_refused_with_a_reason() {
    use dspo_server::models::pipeline_model::LoadOptions;
    use dspo_server::models::DiffusionModel;
    let lora = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/lora/kohya_sd15.safetensors");
    let source = format!("{},config={}", lora.display(), models_dir().join("tiny-sd15").display());
    let err = DiffusionModel::load_source(&source, &LoadOptions::default()).err().unwrap().to_string();
    assert!(err.contains("no unet weights"), "{err}");
    // Without a config the family is read from the keys first, and a LoRA file has none.
    let err = DiffusionModel::load_source(&lora.display().to_string(), &LoadOptions::default())
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("not a Stable Diffusion single-file checkpoint"), "{err}");
    let missing = DiffusionModel::load_source("/nonexistent/model.safetensors", &LoadOptions::default());
    assert!(missing.err().unwrap().to_string().contains("/nonexistent/model.safetensors"));
}

#[test]
fn a_single_file_source_parses_with_its_config() {
    use dspo_server::models::ModelSource;
    match ModelSource::parse("models/v1-5-pruned-emaonly.safetensors,config=stable-diffusion-v1-5/stable-diffusion-v1-5") {
        ModelSource::SingleFile { file, config } => {
            assert_eq!(file, PathBuf::from("models/v1-5-pruned-emaonly.safetensors"));
            assert_eq!(config.as_deref(), Some("stable-diffusion-v1-5/stable-diffusion-v1-5"));
        }
        other => panic!("{other:?}"),
    }
    assert!(matches!(ModelSource::parse("x/Y.SAFETENSORS"), ModelSource::SingleFile { config: None, .. }));
    assert!(matches!(ModelSource::parse("owner/repo"), ModelSource::Hub { .. }));
}
