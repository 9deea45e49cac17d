//! The training loop: data -> latents and text embeddings (frozen VAE and text encoder) ->
//! loss -> accumulated gradients -> clipping -> AdamW with linear warmup; metrics every step,
//! atomic checkpoints, exact resume.
//!
//! Every random draw of micro-batch `k` comes from a generator seeded by (seed, k) and the data
//! order is a pure function of (seed, epoch), so a run resumed from a checkpoint computes the
//! same weights as an uninterrupted one.

use super::dataset::{ParquetPairs, Preprocess, RawPair};
use super::lora::TrainableLora;
use super::losses::Method;
use super::noise::NoiseSchedule;
use super::optim::{clip, collect, AdamW, AdamWConfig};
use super::parallel::{shard, Collective, CollectiveError};
use super::step::{
    apply_conditioning_dropout, batch_loss, conditioning_dropout, with_adapters_detached,
    with_adapters_off, Batch, Reference,
};
use super::config::{mix, parse_device, StepMetrics, TrainConfig, TrainOutcome};
use super::TrainError;
use crate::models::checkpoint;
use crate::models::lora::LoraAdapter;
use crate::models::pipeline_model::{Architecture, LoadOptions};
use crate::models::unet::UNet2DConditionModel;
use crate::models::weights::{VarRegistry, Weights};
use crate::models::{DiffusionModel, ModelSource};
use crate::pipelines::{PromptPair, SamplingParams, SeededRequest, TaskParams};
use crate::rng::NoiseRng;
use candle_core::{DType, Device, Tensor, Var};
use std::collections::HashMap;
use std::path::PathBuf;

/// What one micro-batch hands its optimiser step.
struct MicroBatch {
    /// The micro-batch's loss (the gradients are of it divided by the accumulation count).
    loss: f64,
    grads: Vec<Tensor>,
    /// Pair methods: u per pair.
    u: Vec<f32>,
    anchor_mse: Option<f64>,
}

/// Where the trainable parameters live.
enum Params {
    Lora(TrainableLora),
    Full {
        policy: Box<UNet2DConditionModel>,
        registry: VarRegistry,
    },
}

impl Params {
    fn list(&self) -> Vec<(String, Var)> {
        match self {
            Params::Lora(l) => l.params(),
            Params::Full { registry, .. } => registry.all(),
        }
    }
}

pub struct Trainer {
    pub config: TrainConfig,
    model: DiffusionModel,
    schedule: NoiseSchedule,
    dataset: ParquetPairs,
    params: Params,
    opt: AdamW,
    resolution: usize,
    device: Device,
    pub metrics: Vec<StepMetrics>,
    step: usize,
    resumed_from: Option<usize>,
    /// The drift guard's probe and the base model's images of it, drawn once.
    drift_probe: Option<DriftProbe>,
    /// Edit models: the encoding of the empty instruction (what conditioning dropout puts in
    /// place of a dropped one), computed once.
    null_text: Option<Tensor>,
    /// Data-parallel runs: this rank's place in the group, and (rank 0, which the caller
    /// holds) the threads running the other ranks.
    group: Option<Box<dyn Collective>>,
    workers: Vec<std::thread::JoinHandle<()>>,
}

impl From<CollectiveError> for TrainError {
    fn from(e: CollectiveError) -> Self {
        match e {
            CollectiveError::Aborted(why) => TrainError::Parallel(why),
            CollectiveError::Tensor(e) => TrainError::Tensor(e),
        }
    }
}

struct DriftProbe {
    prompts: Vec<PromptPair>,
    /// Edit models: the source image of each probe edit.
    sources: Vec<image::RgbImage>,
    base: Vec<image::RgbImage>,
}

/// One training pair, preprocessed: winner, loser (none for unpaired data) and (edit pairs)
/// the source image.
type PreparedPair = (RawPair, Tensor, Option<Tensor>, Option<Tensor>);

/// InstructPix2Pix's recipe value of its conditioning dropout.
const DEFAULT_CONDITIONING_DROPOUT: f64 = 0.05;
/// diffusers' InstructPix2Pix pipeline default, for the drift probe's edits.
const PROBE_IMAGE_GUIDANCE: f64 = 1.5;

/// Probe size and sampling of the drift guard: enough to see a model leave its base, small
/// enough to cost a few percent of a run.
const DRIFT_PROMPTS: usize = 4;
const DRIFT_STEPS: usize = 8;

/// One image per prompt, prompt `i` drawn with seed `i`; an edit of `sources[i]` where
/// sources are given.
fn sample(
    model: &DiffusionModel,
    prompts: &[PromptPair],
    sources: &[image::RgbImage],
    params: &SamplingParams,
) -> Result<Vec<image::RgbImage>, TrainError> {
    let seeds: Vec<[u64; 1]> = (0..prompts.len()).map(|i| [i as u64]).collect();
    let requests: Vec<SeededRequest<'_>> = prompts
        .iter()
        .zip(&seeds)
        .enumerate()
        .map(|(i, (p, s))| SeededRequest {
            prompt: p,
            seeds: s,
            image: sources.get(i),
        })
        .collect();
    let task = if sources.is_empty() {
        TaskParams::Txt2Img
    } else {
        TaskParams::InstructPix2Pix {
            image_guidance_scale: PROBE_IMAGE_GUIDANCE,
        }
    };
    let images = crate::pipelines::generate(model, task, &requests, params, &mut |_, _| true)
        .map_err(|e| TrainError::Config(format!("drift probe: {e}")))?;
    Ok(images.into_iter().flatten().collect())
}

impl Trainer {
    /// A run on `config.device`, or with two or more `config.devices` a data-parallel run:
    /// the returned trainer is rank 0 (it checkpoints, samples the drift probe and writes the
    /// result) and the other ranks run on threads of their own, in step with it.
    pub fn new(config: TrainConfig) -> Result<Self, TrainError> {
        config.validate()?;
        if config.devices.len() <= 1 {
            let mut config = config;
            if let Some(d) = config.devices.first() {
                config.device = d.clone();
            }
            return Self::new_rank(config);
        }
        let mut group = super::parallel::group(&config.devices)?.into_iter();
        let first = group.next().expect("a group of two or more ranks");
        let mut workers = Vec::new();
        for (rank, handle) in group.enumerate().map(|(i, g)| (i + 1, g)) {
            let mut c = config.clone();
            c.device = config.devices[rank].clone();
            let spawned = std::thread::Builder::new()
                .name(format!("train-rank-{rank}"))
                .spawn(move || {
                    let mut t = match Self::new_rank(c) {
                        Ok(t) => t,
                        Err(e) => return handle.abort(&format!("rank {rank}: {e}")),
                    };
                    t.group = Some(handle);
                    while t.step < t.config.hyperparameters.max_steps {
                        match t.train_step() {
                            Ok(_) => {}
                            // Another rank left first and said why.
                            Err(TrainError::Parallel(_)) => return,
                            Err(e) => return t.leave(&format!("rank {rank}: {e}")),
                        }
                    }
                });
            match spawned {
                Ok(h) => workers.push(h),
                Err(e) => {
                    first.abort("could not start every rank");
                    return Err(TrainError::Io(format!("starting rank {rank}: {e}")));
                }
            }
        }
        let mut c = config.clone();
        c.device = config.devices[0].clone();
        match Self::new_rank(c) {
            Ok(mut t) => {
                t.group = Some(first);
                t.workers = workers;
                Ok(t)
            }
            Err(e) => {
                first.abort(&format!("rank 0: {e}"));
                for w in workers {
                    let _ = w.join();
                }
                Err(e)
            }
        }
    }

    /// (rank, ranks) of this trainer: (0, 1) outside data-parallel runs.
    fn rank_world(&self) -> (usize, usize) {
        self.group
            .as_ref()
            .map_or((0, 1), |g| (g.rank(), g.world_size()))
    }

    /// Leaves the group (releasing ranks waiting on this one) and waits for the other ranks'
    /// threads (rank 0).
    fn leave(&mut self, why: &str) {
        if let Some(g) = &self.group {
            g.abort(why);
        }
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }

    fn new_rank(config: TrainConfig) -> Result<Self, TrainError> {
        let device = parse_device(&config.device)?;
        let opts = LoadOptions {
            device: device.clone(),
            dtype: DType::F32,
            variant: None,
        };
        let model = DiffusionModel::load_source(&config.model, &opts)?;
        let mut dataset = ParquetPairs::open(&config.dataset)?;
        let edits = model.architecture == Architecture::InstructPix2Pix;
        if edits && !dataset.has_source {
            return Err(TrainError::Config(format!(
                "{} is an InstructPix2Pix model: its pairs are edits of a source image, which \
                 the dataset gives in an `{}` column (it has none)",
                config.model,
                super::dataset::SOURCE_COLUMN
            )));
        }
        if dataset.unpaired && (edits || config.method != Method::DiffusionKto) {
            return Err(TrainError::Config(format!(
                "{} holds single images with a desirable/undesirable label: it trains \
                 text-to-image models with method diffusion_kto",
                config.dataset.display()
            )));
        }
        if !edits && config.hyperparameters.conditioning_dropout.is_some() {
            return Err(TrainError::Config(
                "conditioning_dropout is for InstructPix2Pix models; text-to-image models take \
                 caption_dropout"
                    .into(),
            ));
        }
        if let Some(n) = config.hyperparameters.max_pairs {
            dataset.truncate(n);
        }
        let schedule = NoiseSchedule::new(&model.scheduler_config);
        let factor = model.vae_scale_factor();
        let resolution = config
            .hyperparameters
            .resolution
            .unwrap_or(model.unet.config.sample_size * factor);
        if resolution % factor != 0 {
            return Err(TrainError::Config(format!(
                "resolution must be a multiple of {factor}"
            )));
        }
        let mut init_rng = NoiseRng::new(mix(config.hyperparameters.seed, u64::MAX));
        let params = if config.full_finetune {
            if let ModelSource::SingleFile { file, .. } = ModelSource::parse(&config.model) {
                return Err(TrainError::Config(format!(
                    "full fine-tuning reads a diffusers directory; {} is a single-file \
                     checkpoint (LoRA fine-tuning takes it)",
                    file.display()
                )));
            }
            let unet_dir = model.dir.join("unet");
            let registry = VarRegistry::default();
            let files = UNet2DConditionModel::weight_files(&unet_dir, None)?;
            let w = Weights::from_files(&files, &device, DType::F32)?.trainable(registry.clone());
            let policy =
                UNet2DConditionModel::new(UNet2DConditionModel::load_config(&unet_dir)?, &w)?;
            Params::Full {
                policy: Box::new(policy),
                registry,
            }
        } else {
            let spec = config.lora.clone().unwrap_or_default();
            Params::Lora(TrainableLora::new(
                model.unet.linears(),
                &spec,
                &mut init_rng,
                &device,
                DType::F32,
            )?)
        };
        let h = &config.hyperparameters;
        let opt = AdamW::new(
            params.list(),
            AdamWConfig {
                lr: config.learning_rate(),
                beta1: h.adam_beta1,
                beta2: h.adam_beta2,
                eps: h.adam_eps,
                weight_decay: h.weight_decay,
            },
        )?;
        let mut t = Self {
            config,
            model,
            schedule,
            dataset,
            params,
            opt,
            resolution,
            device,
            metrics: Vec::new(),
            step: 0,
            resumed_from: None,
            drift_probe: None,
            null_text: None,
            group: None,
            workers: Vec::new(),
        };
        t.resume()?;
        Ok(t)
    }

    pub fn dataset_stats(&self) -> &super::dataset::DatasetStats {
        &self.dataset.stats
    }

    pub fn step(&self) -> usize {
        self.step
    }

    fn checkpoint_dir(&self) -> PathBuf {
        self.config.output_dir.join("checkpoints")
    }

    /// Loads the newest complete checkpoint, if any.
    fn resume(&mut self) -> Result<(), TrainError> {
        let Some((step, state)) =
            super::checkpoint::load_latest(&self.checkpoint_dir(), &mut self.opt, &self.device)?
        else {
            return Ok(());
        };
        self.metrics = serde_json::from_value(state["metrics"].clone()).unwrap_or_default();
        self.step = step;
        self.resumed_from = Some(step);
        tracing::info!(step, "resumed from checkpoint");
        Ok(())
    }

    /// Writes `checkpoints/step-N/` atomically.
    pub fn checkpoint(&self) -> Result<PathBuf, TrainError> {
        let state = serde_json::json!({ "metrics": self.metrics, "method": self.config.method });
        super::checkpoint::save(&self.checkpoint_dir(), self.step, &self.opt, state)
    }

    fn edits(&self) -> bool {
        self.model.architecture == Architecture::InstructPix2Pix
    }

    /// `n` usable pairs starting at stream position `start`; a pair whose image does not decode
    /// is replaced by the pair at the same position of a later epoch. The two images of a
    /// text-to-image pair are flipped and cropped independently; an edit pair's source and
    /// both edits share one draw, so they stay aligned.
    fn pairs(&mut self, start: usize, n: usize) -> Result<Vec<PreparedPair>, TrainError> {
        let edits = self.edits();
        let seed = self.config.hyperparameters.seed;
        let len = self.dataset.len();
        let pre = Preprocess {
            resolution: self.resolution,
            random_crop: self.config.hyperparameters.random_crop,
        };
        let mut out = Vec::with_capacity(n);
        for j in 0..n {
            let mut got = None;
            for attempt in 0..8 {
                let pos = start + j + attempt * len;
                let mut rng = NoiseRng::new(mix(seed ^ 0xDA7A, pos as u64));
                let Some(pair) = self.dataset.pair(seed, pos)? else {
                    self.dataset.stats.undecodable_skipped += 1;
                    continue;
                };
                let (f0, f1) = (rng.uniform() < 0.5, rng.uniform() < 0.5);
                let (c0, c1) = (
                    (rng.uniform(), rng.uniform()),
                    (rng.uniform(), rng.uniform()),
                );
                let (f1, c1) = if edits { (f0, c0) } else { (f1, c1) };
                let source = match (&pair.source, edits) {
                    (Some(s), true) => match pre.apply(s, f0, c0, &self.device) {
                        Some(t) => Some(Some(t?)),
                        None => None,
                    },
                    _ => Some(None),
                };
                let loser = match pair.desirable {
                    Some(_) => Some(None),
                    None => pre.apply(&pair.loser, f1, c1, &self.device).map(Some),
                };
                match (pre.apply(&pair.winner, f0, c0, &self.device), loser, source) {
                    (Some(w), Some(l), Some(s)) => {
                        got = Some((pair, w?, l.transpose()?, s));
                        break;
                    }
                    _ => self.dataset.stats.undecodable_skipped += 1,
                }
            }
            out.push(got.ok_or_else(|| {
                TrainError::Dataset("too many undecodable images in a row".into())
            })?);
        }
        Ok(out)
    }

    fn encode_text(&self, captions: &[String]) -> Result<(Tensor, Option<Tensor>), TrainError> {
        let refs: Vec<&str> = captions.iter().map(String::as_str).collect();
        let mut notes = crate::pipelines::Notes::default();
        let map = |e: crate::pipelines::PipelineError| TrainError::Config(e.to_string());
        let c = crate::pipelines::encode_prompts(&self.model, &refs, &mut notes).map_err(map)?;
        Ok((c.embeds.detach(), c.pooled.map(|p| p.detach())))
    }

    /// One micro-batch: forward, backward, and what its step reports. `part` is the share of
    /// the micro-batch's pairs this rank computes: every random draw is made for the whole
    /// micro-batch and cut to `part`, so the ranks together compute exactly the pairs, noise
    /// and timesteps one rank would.
    fn micro_batch(
        &mut self,
        k: usize,
        pair_start: usize,
        part: std::ops::Range<usize>,
    ) -> Result<MicroBatch, TrainError> {
        let h = self.config.hyperparameters.clone();
        let b = h.batch_size;
        let n = part.len();
        let pairs = self.pairs(pair_start + part.start, n)?;
        let mut rng = NoiseRng::new(mix(h.seed, k as u64));
        let edits = self.edits();
        // One uniform draw per pair: caption dropout, or an edit pair's conditioning dropout.
        let drops: Vec<f64> = (0..b).map(|_| rng.uniform()).collect();
        let drops = &drops[part.clone()];
        let captions: Vec<String> = pairs
            .iter()
            .zip(drops)
            .map(|((p, ..), &u)| {
                if !edits && u < h.caption_dropout {
                    String::new()
                } else {
                    p.caption.clone()
                }
            })
            .collect();
        // Unpaired data has one row per image; pairs two (winners, then losers).
        let unpaired = self.dataset.unpaired;
        let rows_per = if unpaired { 1 } else { 2 };
        let winners: Vec<&Tensor> = pairs.iter().map(|(_, w, _, _)| w).collect();
        let mut images = vec![Tensor::stack(&winners, 0)?];
        if !unpaired {
            let losers: Vec<&Tensor> = pairs
                .iter()
                .filter_map(|(_, _, l, _)| l.as_ref())
                .collect();
            images.push(Tensor::stack(&losers, 0)?);
        }
        let images = Tensor::cat(&images, 0)?;
        let post = {
            // The frozen VAE encodes both images of every pair at every step. In training mode
            // its convolutions and norms take the batched training kernels (nn.rs) instead of
            // the per-image inference ones: on the shapes model, 64 images of 64x64 per step,
            // the inference path was ~40% of a fine-tuning step (measured with perf).
            let _batched = crate::models::nn::training_mode();
            self.model.vae.encode(&images)?
        };
        let (_, c, lh, lw) = post.mean.dims4()?;
        let vnoise = rng.randn((rows_per * b, c, lh, lw), &self.device, DType::F32)?;
        let cut: Vec<Tensor> = (0..rows_per)
            .map(|r| vnoise.narrow(0, r * b + part.start, n))
            .collect::<candle_core::Result<_>>()?;
        let vnoise = Tensor::cat(&cut, 0)?;
        let x0 = (post.sample_with(&vnoise)? * self.model.vae.config.scaling_factor)?.detach();
        let (ehs, pooled) = self.encode_text(&captions)?;
        let (ehs, image_latents) = if edits {
            // InstructPix2Pix training: the source's latents unscaled (the posterior's mode),
            // as its pipeline encodes the image it edits.
            let sources: Vec<&Tensor> = pairs
                .iter()
                .map(|(.., s)| s.as_ref().expect("edit pairs carry their source"))
                .collect();
            let latents = {
                let _batched = crate::models::nn::training_mode();
                self.model.vae.encode(&Tensor::stack(&sources, 0)?)?.mode().detach()
            };
            let null = match &self.null_text {
                Some(t) => t.clone(),
                None => {
                    let t = self.encode_text(&[String::new()])?.0;
                    self.null_text = Some(t.clone());
                    t
                }
            };
            let p = h
                .conditioning_dropout
                .unwrap_or(DEFAULT_CONDITIONING_DROPOUT);
            let (e, l) = apply_conditioning_dropout(
                &ehs,
                &null,
                &latents,
                &conditioning_dropout(drops, p),
            )?;
            (e, Some(Tensor::cat(&[&l, &l], 0)?))
        } else {
            (ehs, None)
        };
        // Per pair (or image) draws and conditioning, repeated for a pair's two rows.
        let rows = |x: &Tensor| Tensor::cat(&vec![x; rows_per], 0);
        let ehs = rows(&ehs)?;
        let noise =
            super::noise::training_noise(&mut rng, (b, c, lh, lw), h.noise_offset, &self.device)?
                .narrow(0, part.start, n)?;
        let noise = rows(&noise)?;
        let t: Vec<usize> = (0..b)
            .map(|_| rng.below(self.schedule.num_train_timesteps()))
            .collect();
        let t = &t[part.clone()];
        let timesteps: Vec<usize> = t.iter().cycle().take(rows_per * n).copied().collect();
        let added = match pooled {
            Some(p) => {
                let r = self.resolution as f32;
                // The official trainer fixes the ids at the training resolution.
                let ids: Vec<f32> =
                    (0..rows_per * n).flat_map(|_| [r, r, 0.0, 0.0, r, r]).collect();
                Some((
                    rows(&p)?,
                    Tensor::from_vec(ids, (rows_per * n, 6), &self.device)?,
                ))
            }
            None => None,
        };
        let labels = unpaired.then(|| pairs.iter().map(|(p, ..)| p.desirable == Some(true)).collect());
        let batch = Batch {
            x0,
            noise,
            timesteps,
            encoder_hidden_states: ehs,
            added,
            image_latents,
            labels,
        };
        let method = self.config.method;
        let beta = self.config.beta();
        let (policy, reference) = match &self.params {
            Params::Lora(_) => (&self.model.unet, Reference::AdaptersOff),
            Params::Full { policy, .. } => (policy.as_ref(), Reference::Model(&self.model.unet)),
        };
        let _checkpointing = match checkpoint::wanted(h.gradient_checkpointing, &self.device) {
            true => Some(checkpoint::enable(&self.device)?),
            false => None,
        };
        let out = batch_loss(
            policy,
            reference,
            &self.schedule,
            &batch,
            method,
            beta,
            h.anchor_weight,
        )?;
        let accum = h.gradient_accumulation_steps as f64;
        let loss = (out.loss / accum)?;
        let grads = checkpoint::backward(&loss)?;
        let g = collect(&self.opt.params, &grads)?;
        let u: Vec<f32> = match &out.u {
            Some(u) => u.to_dtype(DType::F32)?.to_vec1()?,
            None => vec![],
        };
        let anchor_mse = match &out.anchor_mse {
            Some(a) => Some(a.to_dtype(DType::F64)?.to_scalar::<f64>()?),
            None => None,
        };
        Ok(MicroBatch {
            loss: loss.to_dtype(DType::F64)?.to_scalar::<f64>()? * accum,
            grads: g,
            u,
            anchor_mse,
        })
    }

    /// One optimiser step (all its micro-batches). Returns its metrics.
    pub fn train_step(&mut self) -> Result<StepMetrics, TrainError> {
        let started = std::time::Instant::now();
        let h = self.config.hyperparameters.clone();
        let accum = h.gradient_accumulation_steps;
        let mut sum: Option<Vec<Tensor>> = None;
        let mut loss_sum = 0.0;
        let mut us = Vec::new();
        let mut anchor_sum: Option<f64> = None;
        let (rank, world) = self.rank_world();
        let part = shard(h.batch_size, rank, world);
        for m in 0..accum {
            let k = self.step * accum + m;
            let MicroBatch {
                loss: l,
                grads: g,
                u,
                anchor_mse,
            } = self.micro_batch(k, k * h.batch_size, part.clone())?;
            loss_sum += l;
            us.extend(u);
            if let Some(a) = anchor_mse {
                *anchor_sum.get_or_insert(0.0) += a;
            }
            sum = Some(match sum {
                None => g,
                Some(s) => s
                    .iter()
                    .zip(&g)
                    .map(|(a, b)| a + b)
                    .collect::<candle_core::Result<Vec<_>>>()?,
            });
        }
        let mut sum = sum.unwrap_or_default();
        let mut accuracy = (!us.is_empty()).then(|| {
            us.iter().filter(|&&u| u > 0.0).count() as f64 / us.len() as f64
        });
        if let Some(g) = &self.group {
            // Gradients and the step's figures averaged over the ranks in one exchange, before
            // clipping: every rank then applies the same update. Shards are equal, so the
            // mean of the ranks' means is the whole batch's mean.
            let figures = [
                loss_sum,
                accuracy.unwrap_or(0.0),
                anchor_sum.unwrap_or(0.0),
            ];
            sum.push(Tensor::new(&figures, &self.device)?.to_dtype(DType::F32)?);
            let mut reduced = g.all_reduce_mean(&sum)?;
            let figures: Vec<f32> = reduced.pop().expect("the figures").to_vec1()?;
            loss_sum = figures[0] as f64;
            accuracy = accuracy.map(|_| figures[1] as f64);
            anchor_sum = anchor_sum.map(|_| figures[2] as f64);
            sum = reduced;
        }
        let clipped = clip(sum, Some(h.max_grad_norm))?;
        // diffusers' constant_with_warmup: the factor of optimiser step k (from 0) is k / warmup.
        let warm = if h.warmup_steps == 0 {
            1.0
        } else {
            (self.step as f64 / h.warmup_steps as f64).min(1.0)
        };
        let lr = self.config.learning_rate() * warm;
        self.opt.update(&clipped.clipped, lr)?;
        self.step += 1;
        let metrics = StepMetrics {
            step: self.step,
            total_steps: h.max_steps,
            loss: loss_sum / accum as f64,
            implicit_accuracy: accuracy,
            anchor_mse: anchor_sum.map(|a| a / accum as f64),
            learning_rate: lr,
            grad_norm: clipped.norm,
            seconds: started.elapsed().as_secs_f64(),
            drift: None,
        };
        let mut metrics = metrics;
        let every = self.config.drift_every();
        // Rank 0 alone: the weights are the same on every rank.
        if rank == 0 && every > 0 && (self.step % every == 0 || self.step == h.max_steps) {
            if let Some(d) = self.drift()? {
                metrics.drift = Some(d);
                if let Some(limit) = h.drift_limit.filter(|l| d > *l) {
                    self.metrics.push(metrics);
                    return Err(TrainError::Drift(format!(
                        "after step {}, the tuned model's probe images differ from the base \
                         model's by {d:.4} (mean absolute pixel difference), past drift_limit \
                         {limit}: the adapter is taking the model apart; lower the learning rate \
                         or beta, or train on data closer to the model's own images",
                        self.step
                    )));
                }
            }
        }
        self.metrics.push(metrics.clone());
        Ok(metrics)
    }

    /// The drift guard's measure: the mean absolute pixel difference (0-1) between the tuned
    /// and the base model's images of the probe (the first captions of the dataset, fixed
    /// seeds, a short run of the model's own scheduler). None for full fine-tuning, whose
    /// policy is a separate UNet the pipelines do not sample.
    fn drift(&mut self) -> Result<Option<f64>, TrainError> {
        if !matches!(self.params, Params::Lora(_)) {
            return Ok(None);
        }
        let d = &self.model.defaults.generate;
        let params = SamplingParams {
            height: self.resolution,
            width: self.resolution,
            steps: d.steps.unwrap_or(DRIFT_STEPS).min(DRIFT_STEPS),
            guidance_scale: d.guidance_scale.unwrap_or(7.5),
            scheduler: self.model.default_scheduler,
        };
        if self.drift_probe.is_none() {
            let seed = self.config.hyperparameters.seed;
            let edits = self.edits();
            let side = self.resolution as u32;
            let mut prompts = Vec::new();
            let mut sources = Vec::new();
            for pos in 0..self.dataset.len() {
                if prompts.len() == DRIFT_PROMPTS {
                    break;
                }
                let Some(pair) = self.dataset.pair(seed, pos)? else {
                    continue;
                };
                if edits {
                    let Some(img) = pair
                        .source
                        .as_ref()
                        .and_then(|s| image::load_from_memory(s).ok())
                    else {
                        continue;
                    };
                    sources.push(image::imageops::resize(
                        &img.to_rgb8(),
                        side,
                        side,
                        image::imageops::FilterType::Triangle,
                    ));
                }
                prompts.push(PromptPair {
                    prompt: pair.caption,
                    negative_prompt: None,
                });
            }
            let base = with_adapters_off(&self.model.unet, || {
                sample(&self.model, &prompts, &sources, &params)
            })?;
            self.drift_probe = Some(DriftProbe {
                prompts,
                sources,
                base,
            });
        }
        let Some(DriftProbe {
            prompts,
            sources,
            base,
        }) = &self.drift_probe
        else {
            return Ok(None);
        };
        let tuned = with_adapters_detached(&self.model.unet, || {
            sample(&self.model, prompts, sources, &params)
        })?;
        let (mut sum, mut count) = (0.0f64, 0usize);
        for (a, b) in tuned.iter().zip(base) {
            for (x, y) in a.as_raw().iter().zip(b.as_raw()) {
                sum += (*x as f64 - *y as f64).abs();
                count += 1;
            }
        }
        Ok(Some(sum / count.max(1) as f64 / 255.0))
    }

    /// Runs to `max_steps`. `control` sees every step's metrics; returning false cancels.
    pub fn run(
        &mut self,
        control: &mut dyn FnMut(&StepMetrics) -> bool,
    ) -> Result<TrainOutcome, TrainError> {
        let (out, h) = (
            self.config.output_dir.clone(),
            self.config.hyperparameters.clone(),
        );
        let result = super::checkpoint::run_loop(self, &out, &h, control);
        self.leave(match &result {
            Ok(_) => "the run ended",
            Err(TrainError::Cancelled) => "the run was cancelled",
            Err(_) => "rank 0 failed",
        });
        result
    }

    /// LoRA: `adapter.safetensors` (diffusers format); full: `unet/` in diffusers layout.
    pub fn save_final(&self) -> Result<PathBuf, TrainError> {
        let out = &self.config.output_dir;
        match &self.params {
            Params::Lora(l) => {
                let path = out.join("adapter.safetensors");
                l.to_adapter()?.save(&path)?;
                Ok(path)
            }
            Params::Full { registry, .. } => {
                let dir = out.join("unet");
                std::fs::create_dir_all(&dir).map_err(|e| TrainError::Io(e.to_string()))?;
                let tensors: HashMap<String, Tensor> = registry
                    .all()
                    .into_iter()
                    .map(|(n, v)| (n, v.as_tensor().detach()))
                    .collect();
                let tmp = dir.join("diffusion_pytorch_model.safetensors.tmp");
                candle_core::safetensors::save(&tensors, &tmp)?;
                std::fs::rename(&tmp, dir.join("diffusion_pytorch_model.safetensors"))
                    .map_err(|e| TrainError::Io(e.to_string()))?;
                std::fs::copy(
                    self.model.dir.join("unet").join("config.json"),
                    dir.join("config.json"),
                )
                .map_err(|e| TrainError::Io(e.to_string()))?;
                Ok(dir)
            }
        }
    }

    /// The adapter as trained so far (LoRA runs only).
    pub fn adapter(&self) -> Option<Result<LoraAdapter, TrainError>> {
        match &self.params {
            Params::Lora(l) => Some(l.to_adapter()),
            _ => None,
        }
    }

    /// Implicit accuracy of the current weights on the `n` pairs at stream positions
    /// `[start, start + n)`, each under `draws` fixed (noise, timestep) draws: the share of the
    /// `n * draws` evaluations with u > 0. Many draws matter: one draw is dominated by its
    /// timestep's noise level. The draws come from an evaluation stream, not the training one.
    pub fn eval_implicit_accuracy(
        &mut self,
        start: usize,
        n: usize,
        draws: usize,
    ) -> Result<f64, TrainError> {
        let saved = (
            self.config.hyperparameters.caption_dropout,
            self.config.hyperparameters.conditioning_dropout,
            self.config.hyperparameters.batch_size,
            self.config.method,
        );
        self.config.hyperparameters.caption_dropout = 0.0;
        self.config.hyperparameters.conditioning_dropout = Some(0.0);
        self.config.hyperparameters.batch_size = n;
        if self.config.method == Method::Sft {
            self.config.method = Method::DiffusionDpo;
        }
        let mut positive = 0usize;
        let mut total = 0usize;
        let mut result = Ok(());
        for d in 0..draws.max(1) {
            match self.micro_batch((1usize << 40) + d, start, 0..n) {
                Ok(MicroBatch { u, .. }) => {
                    positive += u.iter().filter(|&&v| v > 0.0).count();
                    total += u.len();
                }
                Err(e) => {
                    result = Err(e);
                    break;
                }
            }
        }
        (
            self.config.hyperparameters.caption_dropout,
            self.config.hyperparameters.conditioning_dropout,
            self.config.hyperparameters.batch_size,
            self.config.method,
        ) = saved;
        result?;
        Ok(positive as f64 / total.max(1) as f64)
    }
}

impl Drop for Trainer {
    fn drop(&mut self) {
        self.leave("the run was abandoned");
    }
}

impl super::checkpoint::StepLoop for Trainer {
    fn steps_done(&self) -> usize {
        self.step
    }

    fn step(&mut self) -> Result<StepMetrics, TrainError> {
        self.train_step()
    }

    fn save_checkpoint(&self) -> Result<PathBuf, TrainError> {
        self.checkpoint()
    }

    fn finish(&self) -> Result<TrainOutcome, TrainError> {
        let artifact = self.save_final()?;
        Ok(TrainOutcome {
            artifact,
            metrics: self.metrics.clone(),
            dataset: self.dataset.stats.clone(),
            resumed_from: self.resumed_from,
        })
    }
}
