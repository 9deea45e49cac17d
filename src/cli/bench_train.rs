//! Optimiser-step benchmark: time per step and peak memory for each method, LoRA or full,
//! on synthetic latents (the UNet forward/backward, the reference pass and AdamW: what a
//! training step costs once data is encoded). `bench/train_step.sh` runs each configuration
//! in its own process so peak RSS is per configuration, next to a PyTorch step when present.

use crate::training::lora::{LoraSpec, TrainableLora};
use crate::training::losses::Method;
use crate::training::noise::NoiseSchedule;
use crate::training::optim::{clip, collect, AdamW, AdamWConfig};
use crate::training::step::{batch_loss, Batch, Reference};
use crate::models::unet::UNet2DConditionModel;
use crate::models::weights::{VarRegistry, Weights};
use crate::rng::NoiseRng;
use candle_core::DType;
use std::path::Path;
use std::time::Instant;

#[derive(Debug, Clone, clap::Args)]
pub struct TrainBenchArgs {
    /// Diffusers model directory (only unet/ and scheduler/ are read)
    #[arg(long)]
    pub model: std::path::PathBuf,
    #[arg(long, default_value = "dspo")]
    pub method: String,
    /// Full fine-tuning instead of LoRA
    #[arg(long)]
    pub full: bool,
    #[arg(long, default_value_t = 4)]
    pub lora_rank: usize,
    /// Pairs per step
    #[arg(long, default_value_t = 1)]
    pub pairs: usize,
    /// Image side in pixels (latent side = resolution / 8)
    #[arg(long, default_value_t = 64)]
    pub resolution: usize,
    #[arg(long, default_value_t = 5)]
    pub steps: usize,
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Recompute each UNet block in the backward pass instead of keeping its activations
    /// (true|false; default as the trainer: on for GPUs, off on the CPU)
    #[arg(long, action = clap::ArgAction::Set)]
    pub gradient_checkpointing: Option<bool>,
}

fn peak_rss_mib() -> Option<f64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

pub fn run(a: &TrainBenchArgs) -> anyhow::Result<serde_json::Value> {
    let method: Method = a.method.parse().map_err(|e: String| anyhow::anyhow!(e))?;
    let device = crate::models::device::parse_device(&a.device).map_err(anyhow::Error::msg)?;
    let unet_dir = a.model.join("unet");
    let config = UNet2DConditionModel::load_config(&unet_dir)?;
    let files = UNet2DConditionModel::weight_files(&unet_dir, None)?;
    let schedule = NoiseSchedule::from_model_dir(Path::new(&a.model))?;
    let base = UNet2DConditionModel::new(
        config.clone(),
        &Weights::from_files(&files, &device, DType::F32)?,
    )?;
    let mut rng = NoiseRng::new(0);
    let (policy_full, params, lora) = if a.full {
        let reg = VarRegistry::default();
        let w = Weights::from_files(&files, &device, DType::F32)?.trainable(reg.clone());
        (
            Some(UNet2DConditionModel::new(config.clone(), &w)?),
            reg.all(),
            None,
        )
    } else {
        let spec = LoraSpec {
            rank: a.lora_rank,
            alpha: a.lora_rank as f64,
            ..Default::default()
        };
        let l = TrainableLora::new(base.linears(), &spec, &mut rng, &device, DType::F32)?;
        let p = l.params();
        (None, p, Some(l))
    };
    let n_params: usize = params.iter().map(|(_, v)| v.elem_count()).sum();
    let mut opt = AdamW::new(
        params.clone(),
        AdamWConfig {
            lr: 1e-5,
            ..Default::default()
        },
    )?;
    let side = a.resolution / 8;
    let b = a.pairs;
    let cross = config.cross_attention_dim[0];
    let in_c = config.in_channels;
    let mut times = Vec::new();
    for step in 0..a.steps + 1 {
        let x0 = rng.randn((2 * b, in_c, side, side), &device, DType::F32)?;
        let noise = rng.randn((b, in_c, side, side), &device, DType::F32)?;
        let noise = candle_core::Tensor::cat(&[&noise, &noise], 0)?;
        let ehs = rng.randn((b, 77, cross), &device, DType::F32)?;
        let ehs = candle_core::Tensor::cat(&[&ehs, &ehs], 0)?;
        let t: Vec<usize> = (0..b).map(|_| rng.below(1000)).collect();
        let batch = Batch {
            x0,
            noise,
            timesteps: t.iter().chain(&t).copied().collect(),
            encoder_hidden_states: ehs,
            added: None,
            image_latents: None,
            labels: None,
        };
        let t0 = Instant::now();
        let (policy, reference) = match &policy_full {
            Some(p) => (p, Reference::Model(&base)),
            None => (&base, Reference::AdaptersOff),
        };
        let _checkpointing =
            match crate::models::checkpoint::wanted(a.gradient_checkpointing, &device) {
                true => Some(crate::models::checkpoint::enable(&device)?),
                false => None,
            };
        let out = batch_loss(policy, reference, &schedule, &batch, method, 1.0, 0.0)?;
        let grads = crate::models::checkpoint::backward(&out.loss)?;
        let g = clip(collect(&params, &grads)?, Some(1.0))?;
        opt.update(&g.clipped, 1e-5)?;
        device.synchronize()?;
        if step > 0 {
            times.push(t0.elapsed().as_secs_f64());
        }
    }
    drop(lora);
    times.sort_by(|x, y| x.partial_cmp(y).unwrap());
    let median = times[times.len() / 2];
    Ok(serde_json::json!({
        "impl": "dspo-server",
        "model": a.model,
        "method": method.name(),
        "mode": if a.full { "full" } else { "lora" },
        "pairs": b,
        "resolution": a.resolution,
        "trainable_params": n_params,
        "gradient_checkpointing": crate::models::checkpoint::wanted(a.gradient_checkpointing, &device),
        "step_s_median": median,
        "step_s_min": times[0],
        "peak_rss_mib": peak_rss_mib(),
    }))
}
