//! `dspo-server bench` and `dspo-server make-random-model`: latency measurements that
//! `bench/diffusers_txt2img.py` mirrors line for line, so the two can be compared side by side
//! on the same weight files (`bench/cpu_txt2img.sh` runs both).
//!
//! Timing protocol, identical on both sides: load once (timed separately), one untimed
//! warm-up generation, then `repeats` timed generations; report median and min wall-clock.
//! Component timings (text encoder, one UNet call, VAE decode) use the same protocol and
//! tell where a whole-pipeline difference comes from.

use crate::models::pipeline_model::LoadOptions;
use crate::models::random_model::{make_random_model, RandomModelOptions};
use crate::models::{Architecture, DiffusionModel};
use crate::pipelines::{self, Notes, PromptPair, SamplingParams};
use crate::rng::NoiseRng;
use crate::schedulers::SchedulerKind;
use anyhow::{bail, Context};
use candle_core::{DType, Tensor};
use serde_json::{json, Value};
use std::path::PathBuf;
use std::time::Instant;

#[derive(clap::Subcommand, Debug)]
pub enum BenchCommand {
    /// Text-to-image latency of an SD 1.x/2.x or SDXL pipeline directory (JSON lines on stdout).
    Txt2img(Txt2ImgArgs),
}

#[derive(clap::Args, Debug, Clone)]
pub struct Txt2ImgArgs {
    /// Diffusers pipeline directory (model_index.json, unet/, vae/, ...)
    #[arg(long)]
    pub model: PathBuf,
    #[arg(long, default_value_t = 20)]
    pub steps: usize,
    /// Image side in pixels (square)
    #[arg(long, default_value_t = 512)]
    pub size: usize,
    /// Images per generation (one prompt repeated, each with its own noise)
    #[arg(long, default_value_t = 1)]
    pub batch: usize,
    /// Timed generations after the warm-up
    #[arg(long, default_value_t = 3)]
    pub repeats: usize,
    #[arg(long, default_value = "ddim")]
    pub scheduler: String,
    #[arg(long, default_value_t = 7.5)]
    pub guidance: f64,
    #[arg(long, default_value = "a photograph of an astronaut riding a horse")]
    pub prompt: String,
    /// cpu or cuda:N
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// f32, f16 or bf16
    #[arg(long, default_value = "f32")]
    pub dtype: String,
    /// What to time: `all` (whole pipeline, then each stage alone), `pipeline`, or one stage
    /// alone (`text_encoder`, `unet`, `vae_decode`: e.g. under a profiler)
    #[arg(long, default_value = "all", value_parser = ["all", "pipeline", "text_encoder", "unet", "vae_decode"])]
    pub stage: String,
    /// Label written into every line (e.g. the model's short name in a results table)
    #[arg(long, default_value = "")]
    pub label: String,
}

#[derive(clap::Args, Debug, Clone)]
pub struct MakeRandomModelArgs {
    /// Directory with model_index.json and per-component config.json (e.g. ../shared/configs/stable-diffusion-v1-5)
    #[arg(long)]
    pub config_dir: PathBuf,
    /// Output pipeline directory (created)
    #[arg(long)]
    pub out: PathBuf,
    /// Multiplies UNet and VAE block_out_channels (rounded to valid widths; see random_model.rs)
    #[arg(long, default_value_t = 1.0)]
    pub width_scale: f64,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// dtype of the written weights: f32, f16 or bf16
    #[arg(long, default_value = "f32")]
    pub dtype: String,
    /// Standard deviation of the random (non-norm, non-bias) weights
    #[arg(long, default_value_t = 0.02)]
    pub std: f64,
    /// PyTorch's default initialisation of Linear/Conv2d (weights and biases
    /// U(+-1/sqrt(fan_in))), for training from scratch; embeddings keep N(0, std)
    #[arg(long)]
    pub torch_init: bool,
}

pub fn run_make_random_model(args: &MakeRandomModelArgs) -> anyhow::Result<()> {
    let opts = RandomModelOptions {
        width_scale: args.width_scale,
        seed: args.seed,
        dtype: crate::models::device::parse_dtype(&args.dtype).map_err(anyhow::Error::msg)?,
        std: args.std,
        torch_init: args.torch_init,
    };
    let started = Instant::now();
    let reports = make_random_model(&args.config_dir, &args.out, &opts)
        .with_context(|| format!("writing a random model from {}", args.config_dir.display()))?;
    for r in &reports {
        println!("{}", serde_json::to_string(r)?);
    }
    eprintln!(
        "wrote {} in {:.1}s",
        args.out.display(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

pub fn run(cmd: &BenchCommand) -> anyhow::Result<()> {
    match cmd {
        BenchCommand::Txt2img(args) => txt2img(args, &mut |line| println!("{line}")),
    }
}

/// Median and minimum of a non-empty sample.
fn median_min(xs: &[f64]) -> (f64, f64) {
    let mut v = xs.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    let median = if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    };
    (median, v[0])
}

/// Runs `f` once untimed, then `repeats` times timed; returns the timings in seconds.
fn timed<T>(repeats: usize, mut f: impl FnMut() -> anyhow::Result<T>) -> anyhow::Result<Vec<f64>> {
    f()?;
    (0..repeats)
        .map(|_| {
            let t0 = Instant::now();
            f()?;
            Ok(t0.elapsed().as_secs_f64())
        })
        .collect()
}

/// CPU seconds used so far by this process and by the whole machine (Linux `/proc`; `None`
/// elsewhere). Their difference over a timed run is the load other processes put on the
/// machine meanwhile, which the results report so a number taken on a busy machine shows.
fn cpu_clocks() -> Option<(f64, f64)> {
    // /proc reports in USER_HZ, which Linux fixes at 100 for userspace.
    const HZ: f64 = 100.0;
    let own = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let rest = own.rsplit_once(')')?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let own_ticks: f64 = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let cpu: Vec<f64> = stat
        .lines()
        .next()?
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal: busy sums the non-idle fields directly,
    // because the idle counters can step backwards under NO_HZ and inflate "total - idle".
    let busy: f64 = [0, 1, 2, 5, 6, 7]
        .iter()
        .map(|&i| cpu.get(i).copied().unwrap_or(0.0))
        .sum();
    Some((own_ticks / HZ, busy / HZ))
}

/// Cores' worth of CPU that other processes used between two `cpu_clocks` readings.
fn other_cores(before: Option<(f64, f64)>, after: Option<(f64, f64)>, wall: f64) -> Option<f64> {
    let ((o0, m0), (o1, m1)) = (before?, after?);
    Some((((m1 - m0) - (o1 - o0)) / wall).max(0.0))
}

/// Blocks until queued device work is done, so a timing includes it (a no-op on the CPU).
fn sync(t: &Tensor) -> anyhow::Result<()> {
    t.device().synchronize()?;
    Ok(())
}

/// The benchmark proper; `emit` receives one JSON object per line of output.
pub fn txt2img(args: &Txt2ImgArgs, emit: &mut dyn FnMut(Value)) -> anyhow::Result<()> {
    if args.repeats == 0 || args.batch == 0 {
        bail!("--repeats and --batch must be at least 1");
    }
    let scheduler: SchedulerKind = args.scheduler.parse()?;
    let device = crate::models::device::parse_device(&args.device).map_err(anyhow::Error::msg)?;
    let dtype = crate::models::device::parse_dtype(&args.dtype).map_err(anyhow::Error::msg)?;
    let t0 = Instant::now();
    let model = DiffusionModel::load(
        &args.model,
        &LoadOptions {
            device: device.clone(),
            dtype,
            variant: None,
        },
    )
    .with_context(|| format!("loading {}", args.model.display()))?;
    let load_s = t0.elapsed().as_secs_f64();
    let sdxl = match model.architecture {
        Architecture::StableDiffusion => false,
        Architecture::StableDiffusionXl => true,
        other => bail!(
            "bench txt2img times text-to-image pipelines (SD 1.x/2.x, SDXL); {} is {other:?}",
            args.model.display()
        ),
    };
    if sdxl && args.stage != "pipeline" && args.stage != "all" {
        bail!(
            "--stage {} is timed for SD 1.x/2.x only; use --stage pipeline for SDXL",
            args.stage
        );
    }
    let params = SamplingParams {
        height: args.size,
        width: args.size,
        steps: args.steps,
        guidance_scale: args.guidance,
        scheduler,
    };
    let (lh, lw) = params.validate(&model)?;
    let b = args.batch;
    let prompts: Vec<PromptPair> = (0..b)
        .map(|_| PromptPair {
            prompt: args.prompt.clone(),
            negative_prompt: None,
        })
        .collect();
    let common = json!({
        "impl": "dspo-server",
        "label": args.label,
        "model": args.model.display().to_string(),
        "size": args.size,
        "steps": args.steps,
        "batch": b,
        "guidance": args.guidance,
        "scheduler": scheduler.name(),
        "device": args.device,
        "dtype": args.dtype,
        "threads": candle_core::utils::get_num_threads(),
    });
    let with = |extra: Value| -> Value {
        let mut v = common.clone();
        if let (Some(o), Some(e)) = (v.as_object_mut(), extra.as_object()) {
            o.extend(e.clone());
        }
        v
    };
    emit(with(json!({"event": "load", "seconds": load_s})));
    let mut summary = json!({"event": "summary", "load_s": load_s, "repeats": args.repeats});
    if matches!(args.stage.as_str(), "all" | "pipeline") {
        let timing = time_pipeline(args, &model, &params, &prompts, &mut |v| emit(with(v)))?;
        extend(&mut summary, timing);
    }
    // The per-stage breakdown drives SD 1.x's single text encoder; for SDXL only the whole
    // pipeline is timed.
    if args.stage != "pipeline" && !sdxl {
        let only = (args.stage != "all").then_some(args.stage.as_str());
        let parts = breakdown(
            &model,
            &args.prompt,
            b,
            args.guidance > 1.0,
            (lh, lw),
            args.repeats,
            only,
        )?;
        extend(&mut summary, parts);
    }
    emit(with(summary));
    Ok(())
}

fn extend(into: &mut Value, from: Value) {
    if let (Some(o), Value::Object(f)) = (into.as_object_mut(), from) {
        o.extend(f);
    }
}

/// Warm-up plus `repeats` timed whole generations; returns the summary fields.
fn time_pipeline(
    args: &Txt2ImgArgs,
    model: &DiffusionModel,
    params: &SamplingParams,
    prompts: &[PromptPair],
    emit: &mut dyn FnMut(Value),
) -> anyhow::Result<Value> {
    let b = prompts.len();
    let (lh, lw) = params.validate(model)?;

    // The noise is drawn inside the timed region, as diffusers draws its latents inside
    // the pipeline call.
    let seeds: Vec<u64> = (0..b as u64).collect();
    let generate = || -> anyhow::Result<Tensor> {
        let mut rng = NoiseRng::batch(&seeds);
        let noise = rng.randn(
            (b, model.latent_channels(), lh, lw),
            &model.device,
            DType::F32,
        )?;
        let mut notes = Notes::default();
        let img = pipelines::run(
            model,
            pipelines::Task::Txt2Img,
            prompts,
            params,
            &noise,
            &mut rng,
            &mut |_, _| true,
            &mut notes,
        )?;
        sync(&img)?;
        Ok(img)
    };
    let image = generate()?;
    let finite = image
        .flatten_all()?
        .to_vec1::<f32>()?
        .iter()
        .all(|x| x.is_finite());
    let mut runs = Vec::with_capacity(args.repeats);
    let mut others = Vec::with_capacity(args.repeats);
    for i in 0..args.repeats {
        let c0 = cpu_clocks();
        let t = Instant::now();
        generate()?;
        let s = t.elapsed().as_secs_f64();
        let c1 = cpu_clocks();
        let cpu_s = c0.zip(c1).map(|(a, b)| b.0 - a.0);
        let other = other_cores(c0, c1, s);
        others.extend(other);
        emit(
            json!({"event": "run", "repeat": i, "seconds": s, "cpu_s": cpu_s, "other_cores": other}),
        );
        runs.push(s);
    }
    let (median_s, min_s) = median_min(&runs);
    let other_cores_max = others
        .iter()
        .copied()
        .fold(None, |m: Option<f64>, x| Some(m.map_or(x, |m| m.max(x))));

    Ok(json!({
        "median_s": median_s,
        "min_s": min_s,
        "finite": finite,
        "other_cores_max": other_cores_max,
    }))
}

/// Median time of each pipeline stage on the inputs one generation feeds it: the text
/// encoder on the (negative, positive) prompt batch, one UNet call on the CFG-doubled
/// latents, the VAE decode of the final latents.
fn breakdown(
    model: &DiffusionModel,
    prompt: &str,
    b: usize,
    cfg: bool,
    (lh, lw): (usize, usize),
    repeats: usize,
    only: Option<&str>,
) -> anyhow::Result<Value> {
    let wanted = |stage: &str| only.is_none_or(|o| o == stage);
    let mut out = json!({});
    let prompts: Vec<&str> = if cfg {
        std::iter::repeat_n("", b)
            .chain(std::iter::repeat_n(prompt, b))
            .collect()
    } else {
        std::iter::repeat_n(prompt, b).collect()
    };
    let mut notes = Notes::default();
    if wanted("text_encoder") {
        let te = timed(repeats, || {
            let e = pipelines::encode_prompts(model, &prompts, &mut notes)?;
            sync(&e.embeds)
        })?;
        out["text_encoder_s"] = median_min(&te).0.into();
    }
    let mut rng = NoiseRng::new(0);
    if wanted("unet") {
        // The UNet stage alone runs without SDXL's added conditions (the breakdown is an SD
        // 1.x/2.x tool; SDXL is timed as a whole pipeline).
        let embeds = pipelines::encode_prompts(model, &prompts, &mut notes)?.embeds;
        let x = rng.randn(
            (prompts.len(), model.unet.config.in_channels, lh, lw),
            &model.device,
            model.dtype,
        )?;
        let t = Tensor::new(&[500f32], &model.device)?;
        let unet = timed(repeats, || {
            let y = model.unet.forward(&x, &t, &embeds, None)?;
            sync(&y)
        })?;
        out["unet_s"] = median_min(&unet).0.into();
    }
    if wanted("vae_decode") {
        let z = rng.randn(
            (b, model.latent_channels(), lh, lw),
            &model.device,
            DType::F32,
        )?;
        let vae = timed(repeats, || {
            let y = pipelines::decode_latents(model, &z)?;
            sync(&y)
        })?;
        out["vae_decode_s"] = median_min(&vae).0.into();
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::median_min;

    #[test]
    fn median_of_even_and_odd_samples() {
        assert_eq!(median_min(&[3.0, 1.0, 2.0]), (2.0, 1.0));
        assert_eq!(median_min(&[4.0, 1.0, 2.0, 3.0]), (2.5, 1.0));
    }
}
