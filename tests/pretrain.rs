//! Training a model from image–caption rows (`mode = "text_to_image"` / `"autoencoder"`), the
//! way scripts/train_shapes.sh builds the demo model, on the tiny SD1.5 model and the shapes
//! pretraining parquet.

mod common;

use candle_core::{DType, Device, Tensor};
use dspo_server::models::pipeline_model::LoadOptions;
use dspo_server::models::DiffusionModel;
use dspo_server::training::pretrain::Pretrainer;
use dspo_server::training::{Hyperparameters, Method, TrainConfig, TrainMode};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

fn shared() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared")
}

fn config(out: &Path, mode: TrainMode) -> TrainConfig {
    let mut c: TrainConfig = serde_json::from_value(serde_json::json!({
        "model": shared().join("conformance/models/tiny-sd15"),
        "dataset": shared().join("shapes/pretrain.parquet"),
        "output_dir": out,
        "method": "sft",
    }))
    .unwrap();
    c.mode = mode;
    c.method = Method::Sft;
    c.hyperparameters = Hyperparameters {
        learning_rate: Some(1e-3),
        max_steps: 3,
        batch_size: 2,
        warmup_steps: 0,
        caption_dropout: 0.5,
        seed: 3,
        max_pairs: Some(16),
        ..Default::default()
    };
    c
}

fn tensors(path: &Path) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(path, &Device::Cpu).unwrap()
}

fn max_diff(a: &HashMap<String, Tensor>, b: &HashMap<String, Tensor>) -> f32 {
    let mut m = 0f32;
    for (k, t) in a {
        let d = (t.to_dtype(DType::F32).unwrap() - b[k].to_dtype(DType::F32).unwrap())
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        m = m.max(d);
    }
    m
}

#[test]
fn text_to_image_trains_unet_and_text_encoder_and_writes_a_loadable_pipeline() {
    let out = common::temp_dir("t2i");
    let mut cfg = config(&out, TrainMode::TextToImage);
    cfg.pretrain.train_text_encoder = true;
    cfg.pretrain.noise_offset = 0.1;
    cfg.pretrain.ema_decay = 0.9;
    cfg.pretrain.save_dtype = "f16".into();
    let outcome = Pretrainer::new(cfg)
        .unwrap()
        .run(&mut |m| m.loss.is_finite())
        .unwrap();
    assert_eq!(outcome.metrics.len(), 3);
    let model = outcome.artifact;
    let base = shared().join("conformance/models/tiny-sd15");
    for (component, file) in [
        ("unet", "diffusion_pytorch_model.safetensors"),
        ("text_encoder", "model.safetensors"),
    ] {
        let new = tensors(&model.join(component).join(file));
        let old = tensors(&base.join(component).join(file));
        assert_eq!(new.len(), old.len(), "{component}: every parameter written");
        assert!(
            new.values().all(|t| t.dtype() == DType::F16),
            "{component}: save_dtype"
        );
        assert!(max_diff(&new, &old) > 1e-3, "{component} was trained");
    }
    // The VAE was frozen: copied byte for byte.
    assert_eq!(
        std::fs::read(model.join("vae/diffusion_pytorch_model.safetensors")).unwrap(),
        std::fs::read(base.join("vae/diffusion_pytorch_model.safetensors")).unwrap()
    );
    let loaded = DiffusionModel::load(
        &model,
        &LoadOptions {
            device: Device::Cpu,
            dtype: DType::F32,
            variant: None,
        },
    );
    assert!(loaded.is_ok(), "{:?}", loaded.err());
}

#[test]
fn text_to_image_resumes_exactly() {
    let whole = common::temp_dir("t2i-whole");
    let mut cfg = config(&whole, TrainMode::TextToImage);
    cfg.pretrain.ema_decay = 0.5;
    let a = Pretrainer::new(cfg.clone())
        .unwrap()
        .run(&mut |_| true)
        .unwrap();

    let split = common::temp_dir("t2i-split");
    let mut first = cfg.clone();
    first.output_dir = split.clone();
    first.hyperparameters.checkpoint_every = 1;
    // Stop after step 2 (its checkpoint is written before the control callback runs).
    let err = Pretrainer::new(first.clone())
        .unwrap()
        .run(&mut |m| m.step < 2);
    assert!(err.is_err());
    let mut second = Pretrainer::new(first).unwrap();
    assert_eq!(second.step(), 2);
    let b = second.run(&mut |_| true).unwrap();
    let file = "unet/diffusion_pytorch_model.safetensors";
    assert_eq!(
        max_diff(
            &tensors(&a.artifact.join(file)),
            &tensors(&b.artifact.join(file))
        ),
        0.0
    );
    assert_eq!(
        a.metrics.last().unwrap().loss,
        b.metrics.last().unwrap().loss
    );
}

#[test]
fn autoencoder_mode_trains_the_vae_with_a_deterministic_posterior_and_sets_its_scale() {
    let out = common::temp_dir("vae");
    let mut cfg = config(&out, TrainMode::Autoencoder);
    cfg.pretrain.sample_posterior = false;
    cfg.pretrain.chroma_weight = 3.0;
    cfg.pretrain.scaling_samples = 8;
    let outcome = Pretrainer::new(cfg).unwrap().run(&mut |_| true).unwrap();
    let model = outcome.artifact;
    let vae_dir = model.join("vae");
    let w = tensors(&vae_dir.join("diffusion_pytorch_model.safetensors"));
    let old = tensors(
        &shared().join("conformance/models/tiny-sd15/vae/diffusion_pytorch_model.safetensors"),
    );
    assert!(max_diff(&w, &old) > 1e-3, "the VAE was trained");
    // Zero-variance posterior: logvar rows of quant_conv are 0 weights and a -30 bias.
    let b: Vec<f32> = w["quant_conv.bias"]
        .to_dtype(DType::F32)
        .unwrap()
        .to_vec1()
        .unwrap();
    let lc = b.len() / 2;
    assert!(b[lc..].iter().all(|&v| v == -30.0), "{b:?}");
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(vae_dir.join("config.json")).unwrap())
            .unwrap();
    let scale = cfg["scaling_factor"].as_f64().unwrap();
    assert!(
        scale.is_finite() && scale > 0.0 && (scale - 0.18215).abs() > 1e-6,
        "scaling_factor {scale}"
    );
    // The written pipeline samples its posterior to the mean.
    let m = DiffusionModel::load(
        &model,
        &LoadOptions {
            device: Device::Cpu,
            dtype: DType::F32,
            variant: None,
        },
    )
    .unwrap();
    let x = Tensor::zeros((1, 3, 64, 64), DType::F32, &Device::Cpu).unwrap();
    let post = m.vae.encode(&x).unwrap();
    let std = post
        .std()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(std < 1e-6, "posterior std {std}");
}

#[test]
fn pretraining_input_errors_are_clear() {
    let out = common::temp_dir("errors");
    // A pairs file is not an image–caption dataset.
    let mut cfg = config(&out, TrainMode::TextToImage);
    cfg.dataset = shared().join("shapes/prefs_centered.parquet");
    let e = Pretrainer::new(cfg).err().unwrap().to_string();
    assert!(e.contains("`image`") && e.contains("`caption`"), "{e}");
    let mut cfg = config(&out, TrainMode::TextToImage);
    cfg.hyperparameters.learning_rate = None;
    assert!(Pretrainer::new(cfg)
        .err()
        .unwrap()
        .to_string()
        .contains("learning_rate"));
    let mut cfg = config(&out, TrainMode::Autoencoder);
    cfg.pretrain.save_dtype = "int8".into();
    assert!(Pretrainer::new(cfg)
        .err()
        .unwrap()
        .to_string()
        .contains("save_dtype"));
}

/// `pretrain.snr_gamma` (Min-SNR-γ): the same step's loss with γ above every timestep's SNR is
/// the plain loss (every weight is 1), and with a γ below every SNR it is scaled down by
/// γ / SNR(t) < 1 per sample.
#[test]
fn min_snr_gamma_weights_the_text_to_image_loss() {
    let loss = |gamma: f64| {
        let out = common::temp_dir("t2i-snr");
        let mut cfg = config(&out, TrainMode::TextToImage);
        cfg.hyperparameters.max_steps = 1;
        cfg.pretrain.snr_gamma = gamma;
        let o = Pretrainer::new(cfg).unwrap().run(&mut |_| true).unwrap();
        o.metrics[0].loss
    };
    let plain = loss(0.0);
    let capped_above = loss(1e30);
    assert!(
        (plain - capped_above).abs() <= 1e-6 * plain.abs(),
        "{plain} vs {capped_above}"
    );
    // SD1.5's schedule: SNR(999) ≈ 0.0047 is the smallest, so γ = 1e-4 weights every sample
    // by at most 1e-4 / 0.0047 ≈ 0.02.
    let capped_below = loss(1e-4);
    assert!(
        capped_below > 0.0 && capped_below < 0.03 * plain,
        "{capped_below} vs {plain}"
    );
}

#[test]
fn a_negative_or_nan_pretrain_option_is_a_config_error() {
    for (offset, gamma) in [(-0.1, 0.0), (0.0, -5.0), (0.0, f64::NAN)] {
        let out = common::temp_dir("t2i-bad");
        let mut cfg = config(&out, TrainMode::TextToImage);
        cfg.pretrain.noise_offset = offset;
        cfg.pretrain.snr_gamma = gamma;
        let err = Pretrainer::new(cfg).err().expect("rejected").to_string();
        assert!(err.contains("must be a finite number >= 0"), "{err}");
    }
    // The fine-tuning spelling of the offset is refused here rather than ignored.
    let out = common::temp_dir("t2i-bad");
    let mut cfg = config(&out, TrainMode::TextToImage);
    cfg.hyperparameters.noise_offset = 0.1;
    let err = Pretrainer::new(cfg).err().expect("rejected").to_string();
    assert!(err.contains("pretrain.noise_offset"), "{err}");
    // The anchor is a fine-tuning term; text_to_image's loss already is the plain MSE.
    let mut cfg = config(&out, TrainMode::TextToImage);
    cfg.hyperparameters.anchor_weight = 0.1;
    let err = Pretrainer::new(cfg).err().expect("rejected").to_string();
    assert!(err.contains("anchor_weight"), "{err}");
}

/// `pretrain.timestep_bias` follows diffusers' `generate_timestep_weights`
/// (train_text_to_image_sdxl.py): the selected timesteps' weight is multiplied, then all are
/// normalised. Probabilities below are that rule worked by hand for a 1,000-step schedule.
#[test]
fn timestep_bias_weights_follow_diffusers() {
    use dspo_server::training::noise::{TimestepBias, TimestepSampler};
    let p = |bias: TimestepBias| TimestepSampler::new(&bias.weights(1000).unwrap()).unwrap();
    let close = |a: f64, b: f64| (a - b).abs() < 1e-12;

    let uniform = p(TimestepBias::default());
    assert!(close(uniform.probability(0), 1e-3) && close(uniform.probability(999), 1e-3));

    // range [300, 700) x4: 400 timesteps of weight 4, 600 of weight 1, total 2,200.
    let range = p(TimestepBias {
        strategy: "range".into(),
        multiplier: 4.0,
        begin: 300,
        end: 700,
        ..Default::default()
    });
    for (t, w) in [
        (0, 1.0),
        (299, 1.0),
        (300, 4.0),
        (699, 4.0),
        (700, 1.0),
        (999, 1.0),
    ] {
        assert!(close(range.probability(t), w / 2200.0), "t={t}");
    }
    // later, portion 0.25 x2: the last 250 timesteps weigh 2 (total 1,250).
    let later = p(TimestepBias {
        strategy: "later".into(),
        multiplier: 2.0,
        portion: 0.25,
        ..Default::default()
    });
    assert!(close(later.probability(749), 1.0 / 1250.0));
    assert!(close(later.probability(750), 2.0 / 1250.0));
    // earlier, portion 0.1 x0.5: the first 100 weigh 0.5 (total 950).
    let earlier = p(TimestepBias {
        strategy: "earlier".into(),
        multiplier: 0.5,
        portion: 0.1,
        ..Default::default()
    });
    assert!(close(earlier.probability(99), 0.5 / 950.0));
    assert!(close(earlier.probability(100), 1.0 / 950.0));

    // Inverting the CDF on an even grid of u reproduces the probabilities.
    let n = 220_000;
    let inside = (0..n)
        .map(|i| range.sample((i as f64 + 0.5) / n as f64))
        .filter(|t| (300..700).contains(t))
        .count();
    assert_eq!(inside, 160_000, "1,600 / 2,200 of the mass");
    assert_eq!(range.sample(0.0), 0);
    assert_eq!(range.sample(1.0 - 1e-16), 999);
}

/// A biased run trains (finite loss), and a bias that cannot be built is a config error that
/// names the option, also through the CLI's nested `--set pretrain.timestep_bias.<key>=...`.
#[test]
fn timestep_bias_runs_and_bad_values_are_config_errors() {
    let out = common::temp_dir("t2i-bias");
    let mut cfg = config(&out, TrainMode::TextToImage);
    cfg.hyperparameters.max_steps = 1;
    cfg.pretrain.timestep_bias.strategy = "range".into();
    cfg.pretrain.timestep_bias.begin = 300;
    cfg.pretrain.timestep_bias.end = 700;
    cfg.pretrain.timestep_bias.multiplier = 3.0;
    let o = Pretrainer::new(cfg).unwrap().run(&mut |_| true).unwrap();
    assert!(o.metrics[0].loss.is_finite());

    for (field, value, wanted) in [
        ("strategy", "\"middle\"", "timestep_bias.strategy"),
        ("multiplier", "0", "timestep_bias.multiplier"),
        ("end", "1001", "begin < end <= 1000"),
    ] {
        let out = common::temp_dir("t2i-bias-bad");
        let toml = format!(
            "mode = \"text_to_image\"\nmethod = \"sft\"\nmodel = {:?}\ndataset = {:?}\n\
             output_dir = {:?}\n[hyperparameters]\nlearning_rate = 1e-3\nmax_steps = 1\n\
             batch_size = 2\n",
            shared().join("conformance/models/tiny-sd15"),
            shared().join("shapes/pretrain.parquet"),
            out.join("run"),
        );
        std::fs::write(out.join("c.toml"), toml).unwrap();
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_dspo-server"));
        cmd.arg("train").arg("--config").arg(out.join("c.toml"));
        if field != "strategy" {
            cmd.args(["--set", "pretrain.timestep_bias.strategy=range"]);
        }
        let r = cmd
            .args(["--set", &format!("pretrain.timestep_bias.{field}={value}")])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&r.stderr);
        assert!(
            !r.status.success() && err.contains(wanted),
            "{field}: {err}"
        );
    }
    let out = common::temp_dir("t2i-bias-key");
    let r = std::process::Command::new(env!("CARGO_BIN_EXE_dspo-server"))
        .args(["train", "--config", "scripts/shapes/t2i.toml"])
        .args(["--set", "pretrain.timestep_bias.middle=1"])
        .args(["--set", &format!("output_dir={}", out.display())])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&r.stderr);
    assert!(
        !r.status.success() && err.contains("no setting named 'pretrain.timestep_bias.middle'"),
        "{err}"
    );
}
