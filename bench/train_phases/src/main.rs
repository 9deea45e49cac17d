//! Splits one optimiser step of `dspo-server bench-train` into its parts, to see where our step
//! is slower than PyTorch's. The step is the one src/cli/bench_train.rs runs (same calls, same
//! synthetic batch); each part is timed on its own, and the reference pass, which batch_loss
//! runs inside the forward, is timed again separately on the same inputs.
//!
//!   train-phases --model DIR --method dspo|diffusion_dpo|sft [--full] --pairs P --resolution R --steps N
//!
//! `--method dspo,diffusion_dpo` alternates the methods step by step in one process (one warm-up
//! step each, then N timed steps each), so that their costs are compared on the same model,
//! allocator state and machine moment; `by_method` then holds each one's figures (without the
//! separate reference timing, so that steps follow each other as in bench-train).

use candle_core::{DType, Device, Tensor};
use dspo_server::models::checkpoint;
use dspo_server::models::unet::UNet2DConditionModel;
use dspo_server::models::weights::{VarRegistry, Weights};
use dspo_server::rng::NoiseRng;
use dspo_server::training::lora::{LoraSpec, TrainableLora};
use dspo_server::training::noise::NoiseSchedule;
use dspo_server::training::optim::{clip, collect, AdamW, AdamWConfig};
use dspo_server::training::step::{batch_loss, Batch, Reference};
use dspo_server::training::Method;
use std::path::PathBuf;
use std::time::Instant;

fn status_mib(key: &str) -> f64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    s.lines()
        .find(|l| l.starts_with(key))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse::<f64>().ok())
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

fn arg<T: std::str::FromStr>(args: &[String], name: &str, default: T) -> T {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let model: PathBuf = arg(&args, "--model", PathBuf::new());
    let methods: Vec<Method> = arg::<String>(&args, "--method", "dspo".into())
        .split(',')
        .map(|m| m.parse().map_err(anyhow::Error::msg))
        .collect::<anyhow::Result<_>>()?;
    let full = args.iter().any(|a| a == "--full");
    let rank: usize = arg(&args, "--lora-rank", 4);
    let b: usize = arg(&args, "--pairs", 1);
    let side = arg::<usize>(&args, "--resolution", 64) / 8;
    let steps: usize = arg(&args, "--steps", 3);
    // Diagnostic: hand AdamW detached gradients, to see whether what the optimiser keeps from
    // one step to the next is what makes memory grow with the number of steps.
    let detach_grads = args.iter().any(|a| a == "--detach-grads");
    // As bench-train: `--gradient-checkpointing true|false`, unset as the trainer on the CPU.
    let checkpointing: bool = arg(&args, "--gradient-checkpointing", false);

    let device = Device::Cpu;
    let unet_dir = model.join("unet");
    let config = UNet2DConditionModel::load_config(&unet_dir)?;
    let files = Weights::resolve_files(&unet_dir, "diffusion_pytorch_model", None)?;
    let schedule = NoiseSchedule::from_model_dir(&model)?;
    let base = UNet2DConditionModel::new(config.clone(), &Weights::from_files(&files, &device, DType::F32)?)?;
    let mut rng = NoiseRng::new(0);
    let (policy_full, params, _lora) = if full {
        let reg = VarRegistry::default();
        let w = Weights::from_files(&files, &device, DType::F32)?.trainable(reg.clone());
        (Some(UNet2DConditionModel::new(config.clone(), &w)?), reg.all(), None)
    } else {
        let spec = LoraSpec { rank, alpha: rank as f64, ..Default::default() };
        let l = TrainableLora::new(base.linears(), &spec, &mut rng, &device, DType::F32)?;
        let p = l.params();
        (None, p, Some(l))
    };
    let mut opt = AdamW::new(params.clone(), AdamWConfig { lr: 1e-5, ..Default::default() })?;
    // Weights (and, for full fine-tuning, the AdamW moments) before any step.
    let rss_loaded = status_mib("VmRSS:");
    let cross = config.cross_attention_dim[0];
    let in_c = config.in_channels;

    // Per timed step: its method, then step total, batch_loss, reference alone, backward,
    // collect+clip, AdamW.
    let mut parts_by_step: Vec<(usize, [f64; 6])> = Vec::new();
    let mut rss_after_loss = 0f64;
    let mut rss_after_backward = 0f64;
    let mut rss_after_update = 0f64;
    let k = methods.len();
    for step in 0..(steps + 1) * k {
        let mi = step % k;
        let method = methods[mi];
        let x0 = rng.randn((2 * b, in_c, side, side), &device, DType::F32)?;
        let noise = rng.randn((b, in_c, side, side), &device, DType::F32)?;
        let noise = Tensor::cat(&[&noise, &noise], 0)?;
        let ehs = rng.randn((b, 77, cross), &device, DType::F32)?;
        let ehs = Tensor::cat(&[&ehs, &ehs], 0)?;
        let t: Vec<usize> = (0..b).map(|_| rng.below(1000)).collect();
        let timesteps: Vec<usize> = t.iter().chain(&t).copied().collect();
        let batch = Batch { x0, noise, timesteps: timesteps.clone(), encoder_hidden_states: ehs.clone(), added: None };

        // The reference pass alone, outside the step, on the inputs the step will use; not when
        // comparing methods, where each step should follow the previous one as in bench-train.
        let r0 = Instant::now();
        if method != Method::Sft && k == 1 {
            let noisy = schedule.add_noise(&batch.x0, &batch.noise, &timesteps)?;
            let tt = Tensor::from_vec(timesteps.iter().map(|&x| x as f32).collect::<Vec<_>>(), timesteps.len(), &device)?;
            let r = match &policy_full {
                Some(_) => base.forward(&noisy, &tt, &ehs, None)?,
                None => {
                    let saved: Vec<_> = base.linears().all().into_iter().map(|(_, s, _, _)| (s.clone(), s.get())).collect();
                    for (s, _) in &saved {
                        s.set(None);
                    }
                    let r = base.forward(&noisy, &tt, &ehs, None);
                    for (s, d) in saved {
                        s.set(d);
                    }
                    r?
                }
            };
            drop(r);
        }
        let reference_s = r0.elapsed().as_secs_f64();

        let t0 = Instant::now();
        let _checkpointing = if checkpointing { Some(checkpoint::enable(&device)?) } else { None };
        let out = match &policy_full {
            Some(p) => batch_loss(p, Reference::Model(&base), &schedule, &batch, method, 1.0, 0.0)?,
            None => batch_loss(&base, Reference::AdaptersOff, &schedule, &batch, method, 1.0, 0.0)?,
        };
        let t1 = Instant::now();
        let ra = status_mib("VmRSS:");
        let grads = checkpoint::backward(&out.loss)?;
        let t2 = Instant::now();
        let rb = status_mib("VmRSS:");
        let mut raw = collect(&params, &grads)?;
        if detach_grads {
            raw = raw.iter().map(|g| g.detach()).collect();
        }
        let g = clip(raw, Some(1.0))?;
        let t3 = Instant::now();
        opt.update(&g.clipped, 1e-5)?;
        let t4 = Instant::now();
        let ru = status_mib("VmRSS:");
        drop((out, grads, g));
        if step >= k {
            parts_by_step.push((mi, [
                (t4 - t0).as_secs_f64(),
                (t1 - t0).as_secs_f64(),
                reference_s,
                (t2 - t1).as_secs_f64(),
                (t3 - t2).as_secs_f64(),
                (t4 - t3).as_secs_f64(),
            ]));
        } else if step == 0 {
            // Only the first step says what the forward graph holds: after a backward, freed
            // buffers stay in the allocator and later VmRSS readings include them.
            rss_after_loss = ra;
            rss_after_backward = rb;
            rss_after_update = ru;
        }
    }
    // Medians, as bench-train reports: one step disturbed by another process moves a mean a lot.
    let figures = |m: usize| {
        let med = |i: usize| {
            let mut v: Vec<f64> = parts_by_step.iter().filter(|(x, _)| *x == m).map(|(_, p)| p[i]).collect();
            v.sort_by(|a, b| a.total_cmp(b));
            v[v.len() / 2]
        };
        let min = parts_by_step.iter().filter(|(x, _)| *x == m).map(|(_, p)| p[0]).fold(f64::INFINITY, f64::min);
        serde_json::json!({
            "step_s_median": med(0),
            "step_s_min": min,
            "loss_fwd_s": med(1),
            "reference_s": med(2),
            "forward_s": med(1) - med(2),
            "backward_s": med(3),
            "clip_s": med(4),
            "adamw_s": med(5),
            "optimizer_s": med(4) + med(5),
        })
    };
    let mut line = serde_json::json!({
        "impl": "dspo-server",
        "probe": "train-phases",
        "model": model,
        "method": methods.iter().map(|m| m.name()).collect::<Vec<_>>().join(","),
        "mode": if full { "full" } else { "lora" },
        "detach_grads": detach_grads,
        "gradient_checkpointing": checkpointing,
        "pairs": b,
        "resolution": side * 8,
        "rss_loaded_mib": rss_loaded,
        "rss_first_forward_mib": rss_after_loss,
        "rss_first_backward_mib": rss_after_backward,
        "rss_first_update_mib": rss_after_update,
        "peak_rss_mib": status_mib("VmHWM:"),
        "by_method": methods.iter().enumerate().map(|(i, m)| (m.name().to_string(), figures(i))).collect::<serde_json::Map<_, _>>(),
    });
    if let (Some(o), serde_json::Value::Object(f)) = (line.as_object_mut(), figures(0)) {
        o.extend(f);
    }
    println!("{line}");
    Ok(())
}
