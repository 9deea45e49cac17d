//! `dspo-server eval`: the win rate of model/adapter A over B on a prompt file with fixed seeds,
//! under a pluggable reward; and `dspo-server reconstruct`: VAE round trips of a dataset's
//! images (how the demo recipe checks its autoencoder before training a UNet on it).
//!
//! The reward is an external command, so any scorer can be plugged in without linking it:
//! it is run once per image folder with `{dir}` replaced by the folder (and `{prompts}` by the
//! prompt file), and must print one JSON object per image on stdout with at least `file` (the
//! image path or name) and `reward` (a number, higher is better). Any other numeric or boolean
//! fields (e.g. `color_ok`) are averaged per side and reported, which is how caption
//! correctness is tracked next to the win rate. `../shared/shapes/score.py --json` follows
//! this contract as it is.
//!
//! Image `{i:04}_{k}.png` is prompt `i` (0-based line) drawn with seed `i * 1000 + k`; both
//! sides use the same seeds, so each comparison is paired. With two or more seeds the result
//! also has `unpaired`: A's image of seed `k` against B's of seed `k + 1` (mod seeds), same
//! prompt. A paired image is a small perturbation of its partner, so the paired win rate counts
//! how *consistently* A moves images, however little; the unpaired one compares independent
//! draws of the two distributions, the setting in which imitating the preferred images (SFT on
//! winners) is capped well below what a method that moves past them can reach.

use crate::evaluation::{cross_seed, win_rate, Scores};
use crate::models::lora::LoraAdapter;
use crate::models::rewards::{RewardKind, RewardModel};
use crate::models::pipeline_model::LoadOptions;
use crate::models::{DiffusionModel, ModelSource};
use crate::pipelines::{self, Mode, PromptPair, SamplingParams, SeededRequest, TaskParams};
use crate::schedulers::SchedulerKind;
use anyhow::{bail, Context};
use candle_core::{DType, Device, Tensor};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

#[derive(clap::Args, Debug, Clone)]
pub struct EvalArgs {
    /// Model A: a diffusers directory or hub id
    #[arg(long)]
    pub model: String,
    /// LoRA adapter applied to model A
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    /// Model B (default: model A)
    #[arg(long)]
    pub model_b: Option<String>,
    /// LoRA adapter applied to model B (default: none, i.e. the base model)
    #[arg(long)]
    pub adapter_b: Option<PathBuf>,
    #[arg(long, default_value_t = 1.0)]
    pub adapter_scale: f64,
    /// One prompt per line
    #[arg(long)]
    pub prompts: PathBuf,
    /// Only the first N prompts
    #[arg(long)]
    pub limit: Option<usize>,
    /// Images per prompt (seeds i*1000 + 0..N)
    #[arg(long, default_value_t = 1)]
    pub seeds: usize,
    /// Denoising steps (default: the model's `dspo_server.json`, else 30)
    #[arg(long)]
    pub steps: Option<usize>,
    #[arg(long)]
    pub guidance_scale: Option<f64>,
    #[arg(long)]
    pub scheduler: Option<String>,
    /// Images per pipeline call
    #[arg(long, default_value_t = 8)]
    pub batch: usize,
    /// Output folder: a/ and b/ hold the images, result.json the figures
    #[arg(long)]
    pub out: PathBuf,
    /// Reward command (see the module docs); `{dir}` and `{prompts}` are substituted. Empty:
    /// only generate.
    #[arg(long, default_value = "")]
    pub reward_cmd: String,
    /// A reward model scored in-process, NAME=DIR_OR_HUB_ID (repeatable; NAME is clip_score,
    /// pickscore, aesthetic or hpsv2, see docs/evaluation.md); next to --reward-cmd or instead
    #[arg(long = "reward")]
    pub reward_models: Vec<String>,
    /// |reward difference| at or below this is a tie (counts half)
    #[arg(long, default_value_t = 0.0)]
    pub tie_eps: f64,
    /// Reuse images already in the output folders (resume an interrupted run)
    #[arg(long)]
    pub reuse: bool,
    /// Only model A: generate and score it (caption correctness of one model), no win rate
    #[arg(long)]
    pub single: bool,
    /// Evaluate edits: a folder of input images (png, jpg, webp); the i-th in file-name order
    /// is edited by the i-th prompt, after resizing to the evaluation size
    #[arg(long)]
    pub images: Option<PathBuf>,
    /// txt2img, img2img or instruct_pix2pix (default: txt2img, or with --images the model's
    /// edit mode)
    #[arg(long)]
    pub mode: Option<String>,
    /// img2img: how far the input is noised (0-1]
    #[arg(long, default_value_t = 0.8)]
    pub strength: f64,
    /// instruct_pix2pix: the image guidance scale
    #[arg(long, default_value_t = 1.5)]
    pub image_guidance_scale: f64,
    /// Image side in pixels (default: the model's native size)
    #[arg(long)]
    pub size: Option<usize>,
}

/// The task an evaluation runs, checked against the model's pipelines.
fn eval_task(args: &EvalArgs, model: &DiffusionModel) -> anyhow::Result<TaskParams> {
    let supported = Mode::supported_by(model.architecture);
    let mode = match (&args.mode, &args.images) {
        (Some(m), _) => Mode::parse(m)
            .ok_or_else(|| anyhow::anyhow!("--mode {m}: use txt2img, img2img or instruct_pix2pix"))?,
        (None, None) => Mode::Txt2Img,
        (None, Some(_)) => *supported
            .iter()
            .find(|m| **m != Mode::Txt2Img)
            .ok_or_else(|| anyhow::anyhow!("this model ({}) has no edit pipeline", model.architecture.name()))?,
    };
    if !supported.contains(&mode) {
        bail!("this model ({}) does not run {}", model.architecture.name(), mode.name());
    }
    if (mode == Mode::Txt2Img) != args.images.is_none() {
        bail!("--images goes with an edit mode (img2img, instruct_pix2pix), and edits need --images");
    }
    Ok(match mode {
        Mode::Txt2Img => TaskParams::Txt2Img,
        Mode::Img2Img => TaskParams::Img2Img { strength: args.strength },
        Mode::InstructPix2Pix => TaskParams::InstructPix2Pix {
            image_guidance_scale: args.image_guidance_scale,
        },
    })
}

/// The first `n` images of a folder in file-name order, resized to `size` x `size`.
fn input_images(dir: &Path, n: usize, size: usize) -> anyhow::Result<Vec<image::RgbImage>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| dir.display().to_string())?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.extension()
                .and_then(|e| e.to_str())
                .is_some_and(|e| ["png", "jpg", "jpeg", "webp"].contains(&e.to_ascii_lowercase().as_str()))
        })
        .collect();
    files.sort();
    if files.len() < n {
        bail!("{}: {} images for {n} prompts", dir.display(), files.len());
    }
    files[..n]
        .iter()
        .map(|f| {
            let img = image::open(f).with_context(|| f.display().to_string())?.to_rgb8();
            Ok(image::imageops::resize(&img, size as u32, size as u32, image::imageops::FilterType::Lanczos3))
        })
        .collect()
}

struct Side {
    model: DiffusionModel,
    adapter: Option<LoraAdapter>,
}

fn load_side(source: &str, adapter: Option<&Path>, device: &Device) -> anyhow::Result<Side> {
    let dir = ModelSource::parse(source).resolve(None)?;
    let model = DiffusionModel::load(
        &dir,
        &LoadOptions {
            device: device.clone(),
            dtype: DType::F32,
            variant: None,
        },
    )?;
    let adapter = adapter.map(|p| LoraAdapter::load(p, device)).transpose()?;
    Ok(Side { model, adapter })
}

#[allow(clippy::too_many_arguments)]
fn generate(
    side: &Side,
    prompts: &[String],
    (task, inputs): (TaskParams, Option<&[image::RgbImage]>),
    seeds: usize,
    params: &SamplingParams,
    scale: f64,
    batch: usize,
    out: &Path,
    reuse: bool,
) -> anyhow::Result<()> {
    std::fs::create_dir_all(out)?;
    let m = &side.model;
    m.detach_adapters();
    if let Some(a) = &side.adapter {
        m.attach_adapter(a, scale)?;
    }
    params.validate(m)?;
    let mut jobs: Vec<(usize, usize)> = Vec::new();
    for i in 0..prompts.len() {
        for k in 0..seeds {
            if !(reuse && out.join(format!("{i:04}_{k}.png")).exists()) {
                jobs.push((i, k));
            }
        }
    }
    let pairs: Vec<PromptPair> = prompts
        .iter()
        .map(|p| PromptPair {
            prompt: p.clone(),
            negative_prompt: None,
        })
        .collect();
    let total = jobs.len();
    for (n, chunk) in jobs.chunks(batch.max(1)).enumerate() {
        let seeds: Vec<[u64; 1]> = chunk.iter().map(|&(i, k)| [(i * 1000 + k) as u64]).collect();
        let requests: Vec<SeededRequest<'_>> = chunk
            .iter()
            .zip(&seeds)
            .map(|(&(i, _), s)| SeededRequest {
                prompt: &pairs[i],
                seeds: s,
                image: inputs.map(|imgs| &imgs[i]),
            })
            .collect();
        let images = pipelines::generate(m, task, &requests, params, &mut |_, _| true)?;
        for (&(i, k), img) in chunk.iter().zip(images.into_iter().flatten()) {
            img.save(out.join(format!("{i:04}_{k}.png")))?;
        }
        eprint!(
            "\r{}: {}/{} images   ",
            out.display(),
            ((n + 1) * batch).min(total),
            total
        );
    }
    if total > 0 {
        eprintln!();
    }
    m.detach_adapters();
    Ok(())
}

/// Runs the reward command on one folder: stem -> (reward, other numeric fields).
fn rewards(
    cmd: &str,
    dir: &Path,
    prompts: &Path,
) -> anyhow::Result<Scores> {
    let line = cmd
        .replace("{dir}", &dir.display().to_string())
        .replace("{prompts}", &prompts.display().to_string());
    let out = std::process::Command::new("sh")
        .arg("-c")
        .arg(&line)
        .output()
        .with_context(|| format!("running `{line}`"))?;
    if !out.status.success() {
        bail!(
            "reward command `{line}` failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let mut map = BTreeMap::new();
    for l in String::from_utf8_lossy(&out.stdout).lines() {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(l.trim()) else {
            continue;
        };
        let (Some(file), Some(reward)) = (
            v.get("file").and_then(|f| f.as_str()),
            v.get("reward").and_then(|r| r.as_f64()),
        ) else {
            continue;
        };
        let stem = Path::new(file)
            .file_stem()
            .and_then(|s| s.to_str())
            .unwrap_or(file)
            .to_string();
        let mut extra = BTreeMap::new();
        if let Some(o) = v.as_object() {
            for (k, x) in o {
                if k == "reward" {
                    continue;
                }
                match x {
                    serde_json::Value::Bool(b) => {
                        extra.insert(k.clone(), if *b { 1.0 } else { 0.0 });
                    }
                    serde_json::Value::Number(n) if k.ends_with("_ok") => {
                        extra.insert(k.clone(), n.as_f64().unwrap_or(f64::NAN));
                    }
                    _ => {}
                }
            }
        }
        map.insert(stem, (reward, extra));
    }
    if map.is_empty() {
        bail!("reward command `{line}` printed no JSON objects with `file` and `reward`");
    }
    Ok(map)
}

pub fn run_eval(args: &EvalArgs) -> anyhow::Result<serde_json::Value> {
    let device = Device::Cpu;
    let mut prompts: Vec<String> = std::fs::read_to_string(&args.prompts)
        .with_context(|| args.prompts.display().to_string())?
        .lines()
        .map(|l| l.trim().to_string())
        .filter(|l| !l.is_empty())
        .collect();
    if let Some(n) = args.limit {
        prompts.truncate(n);
    }
    if prompts.is_empty() {
        bail!("{}: no prompts", args.prompts.display());
    }
    let a = load_side(&args.model, args.adapter.as_deref(), &device)?;
    let d = a.model.defaults.generate.clone();
    let scheduler = match &args.scheduler {
        Some(s) => s
            .parse::<SchedulerKind>()
            .map_err(|e| anyhow::anyhow!("{e}"))?,
        None => a.model.default_scheduler,
    };
    let f = a.model.vae_scale_factor();
    let size = args.size.unwrap_or(a.model.unet.config.sample_size * f);
    let task = eval_task(args, &a.model)?;
    let inputs = match &args.images {
        Some(dir) => Some(input_images(dir, prompts.len(), size)?),
        None => None,
    };
    let work = (task, inputs.as_deref());
    let params = SamplingParams {
        height: size,
        width: size,
        steps: args.steps.or(d.steps).unwrap_or(30),
        guidance_scale: args.guidance_scale.or(d.guidance_scale).unwrap_or(7.5),
        scheduler,
    };
    let (dir_a, dir_b) = (args.out.join("a"), args.out.join("b"));
    generate(
        &a,
        &prompts,
        work,
        args.seeds,
        &params,
        args.adapter_scale,
        args.batch,
        &dir_a,
        args.reuse,
    )?;
    let same_model = args.model_b.as_ref().is_none_or(|m| m == &args.model);
    if args.single {
        drop(a);
    } else if same_model {
        let b = Side {
            model: a.model,
            adapter: args
                .adapter_b
                .as_deref()
                .map(|p| LoraAdapter::load(p, &device))
                .transpose()?,
        };
        generate(
            &b,
            &prompts,
            work,
            args.seeds,
            &params,
            args.adapter_scale,
            args.batch,
            &dir_b,
            args.reuse,
        )?;
    } else {
        drop(a);
        let b = load_side(
            args.model_b.as_deref().unwrap_or(&args.model),
            args.adapter_b.as_deref(),
            &device,
        )?;
        generate(
            &b,
            &prompts,
            work,
            args.seeds,
            &params,
            args.adapter_scale,
            args.batch,
            &dir_b,
            args.reuse,
        )?;
    }
    let mut result = serde_json::json!({
        "model_a": args.model, "adapter_a": args.adapter, "model_b": args.model_b.clone().unwrap_or(args.model.clone()),
        "adapter_b": args.adapter_b, "prompts": args.prompts, "num_prompts": prompts.len(), "seeds": args.seeds,
        "steps": params.steps, "guidance_scale": params.guidance_scale, "scheduler": format!("{:?}", params.scheduler),
    });
    if !args.reward_cmd.is_empty() {
        let ra = rewards(&args.reward_cmd, &dir_a, &args.prompts)?;
        let rb = if args.single {
            ra.clone()
        } else {
            rewards(&args.reward_cmd, &dir_b, &args.prompts)?
        };
        let mut wr = win_rate(&ra, &rb, args.tie_eps);
        if args.single {
            wr = serde_json::json!({ "n": wr["n"], "a": wr["a"] });
        } else if args.seeds >= 2 {
            let u = win_rate(&ra, &cross_seed(&rb, args.seeds), args.tie_eps);
            wr["unpaired"] = serde_json::json!({
                "n": u["n"], "wins": u["wins"], "ties": u["ties"], "losses": u["losses"],
                "winrate": u["winrate"], "ci95": u["ci95"],
            });
        }
        result["result"] = wr;
    }
    for spec in &args.reward_models {
        let (name, source) = spec
            .split_once('=')
            .ok_or_else(|| anyhow::anyhow!("--reward {spec}: use NAME=DIR_OR_HUB_ID"))?;
        let kind = RewardKind::parse(name).ok_or_else(|| {
            anyhow::anyhow!("--reward {name}: use clip_score, pickscore, aesthetic or hpsv2")
        })?;
        let dir = crate::models::rewards::resolve_source(source)?;
        let model = RewardModel::load(kind, &dir, &device)?;
        let score = |dir: &Path| -> anyhow::Result<Scores> {
            let mut out = Scores::new();
            for i in 0..prompts.len() {
                for k in 0..args.seeds {
                    let stem = format!("{i:04}_{k}");
                    let img = image::open(dir.join(format!("{stem}.png")))?.to_rgb8();
                    let s = model.score(&[img], &[prompts[i].as_str()])?[0];
                    out.insert(stem, (s, BTreeMap::new()));
                }
            }
            Ok(out)
        };
        let ra = score(&dir_a)?;
        let entry = if args.single {
            let wr = win_rate(&ra, &ra, args.tie_eps);
            serde_json::json!({ "n": wr["n"], "a": wr["a"] })
        } else {
            let rb = score(&dir_b)?;
            let mut wr = win_rate(&ra, &rb, args.tie_eps);
            if args.seeds >= 2 {
                wr["unpaired"] = win_rate(&ra, &cross_seed(&rb, args.seeds), args.tie_eps);
            }
            wr
        };
        result["rewards"][name] = entry;
    }
    std::fs::write(
        args.out.join("result.json"),
        serde_json::to_vec_pretty(&result)?,
    )?;
    Ok(result)
}


#[derive(clap::Args, Debug, Clone)]
pub struct ReconstructArgs {
    /// Pipeline directory whose VAE is used
    #[arg(long)]
    pub model: String,
    /// Image–caption parquet (`image`, `caption`)
    #[arg(long)]
    pub dataset: PathBuf,
    /// Rows from the end of the file (held out from a run that trained on the first rows)
    #[arg(long, default_value_t = 200)]
    pub n: usize,
    /// Writes NNNN.png and captions.tsv (file<TAB>caption, what score.py --captions reads)
    #[arg(long)]
    pub out: PathBuf,
}

pub fn run_reconstruct(args: &ReconstructArgs) -> anyhow::Result<()> {
    let device = Device::Cpu;
    let dir = ModelSource::parse(&args.model).resolve(None)?;
    let model = DiffusionModel::load(
        &dir,
        &LoadOptions {
            device: device.clone(),
            dtype: DType::F32,
            variant: None,
        },
    )?;
    let data = crate::training::pretrain::CaptionImages::open(&args.dataset)?;
    let res = model.unet.config.sample_size * model.vae_scale_factor();
    std::fs::create_dir_all(&args.out)?;
    let start = data.len().saturating_sub(args.n);
    let mut tsv = String::new();
    let rows: Vec<usize> = (start..data.len()).collect();
    for chunk in rows.chunks(16) {
        let imgs = chunk
            .iter()
            .map(|&i| data.image(i, res, &device))
            .collect::<Result<Vec<_>, _>>()?;
        let post = model.vae.encode(&Tensor::stack(&imgs, 0)?)?;
        let dec = model.vae.decode(post.mode())?;
        let dec = ((dec + 1.0)? / 2.0)?.clamp(0f32, 1f32)?;
        for (&i, (w, h, bytes)) in chunk.iter().zip(pipelines::to_rgb8(&dec)?) {
            let name = format!("{i:05}.png");
            image::RgbImage::from_raw(w as u32, h as u32, bytes)
                .context("malformed image")?
                .save(args.out.join(&name))?;
            tsv.push_str(&format!("{name}\t{}\n", data.caption(i)));
        }
    }
    std::fs::write(args.out.join("captions.tsv"), tsv)?;
    eprintln!(
        "wrote {} reconstructions to {}",
        rows.len(),
        args.out.display()
    );
    Ok(())
}

