//! Gradient census: every trainable parameter of the UNet, the VAE and the text encoders
//! must get a finite, nonzero gradient from a simple loss. This is the guard against fused
//! kernels without a backward pass (gradients then vanish silently while the loss still falls).

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var};
use dspo_server::models::checkpoint;
use dspo_server::models::clip::ClipTextModel;
use dspo_server::models::unet::{AddedCond, UNet2DConditionModel};
use dspo_server::models::vae::AutoencoderKL;
use dspo_server::models::weights::{VarRegistry, Weights};
use std::path::PathBuf;

fn models() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/conformance/models")
}

fn trainable(dir: &std::path::Path, stem: &str) -> (Weights, VarRegistry) {
    let reg = VarRegistry::default();
    let files = Weights::resolve_files(dir, stem, None).unwrap();
    let w = Weights::from_files(&files, &Device::Cpu, DType::F32)
        .unwrap()
        .trainable(reg.clone());
    (w, reg)
}

fn census(reg: &VarRegistry, loss: &Tensor, what: &str) -> GradStore {
    let grads = loss.backward().unwrap();
    census_of(reg, grads, what)
}

fn census_of(reg: &VarRegistry, grads: GradStore, what: &str) -> GradStore {
    let vars: Vec<(String, Var)> = reg.all();
    assert!(
        !vars.is_empty(),
        "{what}: no trainable parameters were registered"
    );
    let mut missing = Vec::new();
    for (name, var) in &vars {
        match grads.get(var.as_tensor()) {
            None => missing.push(format!("{name}: no gradient")),
            Some(g) => {
                let n2: f32 = g.sqr().unwrap().sum_all().unwrap().to_scalar().unwrap();
                if !n2.is_finite() {
                    missing.push(format!("{name}: non-finite gradient"));
                } else if n2 == 0.0 {
                    missing.push(format!("{name}: zero gradient"));
                }
            }
        }
    }
    assert!(
        missing.is_empty(),
        "{what}: {} of {} parameters lack a gradient:\n{}",
        missing.len(),
        vars.len(),
        missing.join("\n")
    );
    grads
}

fn randn(shape: &[usize], seed: u64) -> Tensor {
    dspo_server::rng::NoiseRng::new(seed)
        .randn(shape, &Device::Cpu, DType::F32)
        .unwrap()
}

fn unet_census(model: &str, in_channels: usize, sdxl: bool) {
    let dir = models().join(model).join("unet");
    let (w, reg) = trainable(&dir, "diffusion_pytorch_model");
    let unet =
        UNet2DConditionModel::new(UNet2DConditionModel::load_config(&dir).unwrap(), &w).unwrap();
    let cross = unet.config.cross_attention_dim[0];
    // 16x16 latents: the lowest resolution still has several tokens, so attention q/k get a
    // real (non-structurally-zero) gradient.
    let x = randn(&[2, in_channels, 16, 16], 1);
    let t = Tensor::new(&[100f32, 700.0], &Device::Cpu).unwrap();
    let ehs = randn(&[2, 77, cross], 2);
    let loss = || {
        let out = if sdxl {
            let proj = unet.config.projection_class_embeddings_input_dim.unwrap()
                - 6 * unet.config.addition_time_embed_dim.unwrap();
            let te = randn(&[2, proj], 3);
            let ids = Tensor::new(
                &[
                    [128f32, 128., 0., 0., 128., 128.],
                    [64., 96., 0., 0., 64., 96.],
                ],
                &Device::Cpu,
            )
            .unwrap();
            unet.forward(
                &x,
                &t,
                &ehs,
                Some(AddedCond {
                    text_embeds: &te,
                    time_ids: &ids,
                }),
            )
            .unwrap()
        } else {
            unet.forward(&x, &t, &ehs, None).unwrap()
        };
        let target = randn(out.dims(), 4);
        (out - target).unwrap().sqr().unwrap().mean_all().unwrap()
    };
    let plain = census(&reg, &loss(), model);
    // The same loss with every ResNet and transformer block checkpointed: the same gradients.
    let guard = checkpoint::enable(&Device::Cpu).unwrap();
    let ck = checkpoint::backward(&loss()).unwrap();
    drop(guard);
    let ck = census_of(&reg, ck, &format!("{model}, checkpointed"));
    for (name, var) in reg.all() {
        let (a, b) = (
            plain.get(var.as_tensor()).unwrap(),
            ck.get(var.as_tensor()).unwrap(),
        );
        let max = |t: &Tensor| {
            t.abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
        };
        let err = max(&(a - b).unwrap()) / max(a).max(1e-12);
        assert!(
            err < 1e-5,
            "{model} {name}: checkpointed gradient differs by {err} (relative)"
        );
    }
}

#[test]
fn every_unet_parameter_gets_a_gradient_sd15() {
    unet_census("tiny-sd15", 4, false);
}

#[test]
fn every_unet_parameter_gets_a_gradient_sdxl() {
    unet_census("tiny-sdxl", 4, true);
}

#[test]
fn every_unet_parameter_gets_a_gradient_ip2p() {
    unet_census("tiny-ip2p", 8, false);
}

#[test]
fn every_vae_parameter_gets_a_gradient() {
    for model in ["tiny-sd15", "tiny-sdxl"] {
        let dir = models().join(model).join("vae");
        let (w, reg) = trainable(&dir, "diffusion_pytorch_model");
        let vae = AutoencoderKL::new(AutoencoderKL::load_config(&dir).unwrap(), &w).unwrap();
        let img = randn(&[1, 3, 32, 32], 5).tanh().unwrap();
        let post = vae.encode(&img).unwrap();
        let z = post.sample_with(&randn(post.mean.dims(), 6)).unwrap();
        let rec = vae.decode(&z).unwrap();
        let loss = (rec - &img).unwrap().sqr().unwrap().mean_all().unwrap();
        census(&reg, &loss, model);
    }
}

#[test]
fn every_text_encoder_parameter_gets_a_gradient() {
    for (model, sub) in [
        ("tiny-sd15", "text_encoder"),
        ("tiny-sdxl", "text_encoder"),
        ("tiny-sdxl", "text_encoder_2"),
    ] {
        let dir = models().join(model).join(sub);
        let (w, reg) = trainable(&dir, "model");
        let enc = ClipTextModel::new(ClipTextModel::load_config(&dir).unwrap(), &w).unwrap();
        let mut ids: Vec<u32> = vec![49406, 320, 1929, 6883, 525, 320, 2866, 49407];
        ids.resize(77, 49407);
        let ids = Tensor::from_vec(ids, (1, 77), &Device::Cpu).unwrap();
        let out = enc.forward(&ids).unwrap();
        let target = randn(out.last_hidden_state.dims(), 7);
        let mut loss = (out.last_hidden_state - target)
            .unwrap()
            .sqr()
            .unwrap()
            .mean_all()
            .unwrap();
        loss = (loss + out.pooled.sqr().unwrap().mean_all().unwrap()).unwrap();
        census(&reg, &loss, &format!("{model}/{sub}"));
    }
}
