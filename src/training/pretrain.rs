//! Training a model from image–caption rows: the `text_to_image` mode (plain denoising loss on
//! the UNet, optionally the text encoder too) and the `autoencoder` mode (the VAE alone). This
//! is how the offline `shapes` demo model is built from random weights (scripts/train_shapes.sh);
//! it shares the optimiser, the noise process, the checkpoint format and the progress reporting
//! with preference tuning.
//!
//! Every random draw of optimiser step `k` comes from a generator seeded by (seed, k) and the
//! data order is a pure function of (seed, epoch), so a resumed run computes the same weights.

use super::checkpoint;
use super::dataset::{DatasetStats, Preprocess};
use super::noise::{NoiseSchedule, TimestepSampler};
use super::optim::{clip, collect, AdamW, AdamWConfig};
use super::config::{mix, parse_device, StepMetrics, TrainConfig, TrainMode, TrainOutcome};
use super::TrainError;
use crate::models::clip::ClipTextModel;
use crate::models::pipeline_model::{Architecture, LoadOptions};
use crate::models::unet::UNet2DConditionModel;
use crate::models::vae::AutoencoderKL;
use crate::models::weights::{VarRegistry, Weights};
use crate::models::{DiffusionModel, ModelSource};
use crate::rng::NoiseRng;
use candle_core::{DType, Device, Tensor, Var};
use parquet::file::reader::FileReader;
use parquet::record::Field;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// An image–caption parquet (`image` PNG/JPEG bytes, `caption`), held in memory: the files
/// this mode is for (the shapes world: 11 MB) are small; a LAION-scale run needs streaming.
pub struct CaptionImages {
    rows: Vec<(String, Arc<Vec<u8>>)>,
    order: Option<(usize, u64, Vec<usize>)>,
}

impl CaptionImages {
    pub fn open(path: &Path) -> Result<Self, TrainError> {
        let reader = super::dataset::open_parquet(path)?;
        let root = reader
            .metadata()
            .file_metadata()
            .schema_descr()
            .root_schema();
        let names: Vec<&str> = root.get_fields().iter().map(|f| f.name()).collect();
        if !(names.contains(&"image") && names.contains(&"caption")) {
            return Err(TrainError::Dataset(format!(
                "{}: an image–caption dataset needs the columns `image` (bytes) and `caption` (string)",
                path.display()
            )));
        }
        let proj = super::dataset::projection(&reader, &["image", "caption"])?;
        let mut rows = Vec::new();
        for row in reader
            .get_row_iter(Some(proj))
            .map_err(|e| TrainError::Dataset(e.to_string()))?
        {
            let row = row.map_err(|e| TrainError::Dataset(e.to_string()))?;
            let (mut caption, mut image) = (None, None);
            for (name, f) in row.get_column_iter() {
                match (name.as_str(), f) {
                    ("caption", Field::Str(s)) => caption = Some(s.clone()),
                    ("image", Field::Bytes(b)) => image = Some(Arc::new(b.data().to_vec())),
                    _ => {}
                }
            }
            if let (Some(c), Some(i)) = (caption, image) {
                rows.push((c, i));
            }
        }
        if rows.is_empty() {
            return Err(TrainError::Dataset(format!(
                "{}: no rows with both an image and a caption",
                path.display()
            )));
        }
        Ok(Self { rows, order: None })
    }

    pub fn len(&self) -> usize {
        self.rows.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    pub fn truncate(&mut self, n: usize) {
        if n > 0 {
            self.rows.truncate(n);
        }
    }

    /// Row index of position `n` of the infinite seeded stream (a fresh shuffle per epoch).
    pub fn index(&mut self, seed: u64, n: usize) -> usize {
        let len = self.rows.len();
        let epoch = n / len;
        if !matches!(&self.order, Some((e, s, _)) if *e == epoch && *s == seed) {
            let mut rng = ChaCha8Rng::seed_from_u64(mix(seed ^ 0x5EED_CAB1, epoch as u64));
            let mut order: Vec<usize> = (0..len).collect();
            order.shuffle(&mut rng);
            self.order = Some((epoch, seed, order));
        }
        self.order.as_ref().unwrap().2[n % len]
    }

    pub fn caption(&self, i: usize) -> &str {
        &self.rows[i].0
    }

    pub fn image(
        &self,
        i: usize,
        resolution: usize,
        device: &Device,
    ) -> Result<Tensor, TrainError> {
        let pre = Preprocess {
            resolution,
            random_crop: false,
        };
        match pre.apply(&self.rows[i].1, false, (0.5, 0.5), device) {
            Some(t) => Ok(t?),
            None => Err(TrainError::Dataset(format!(
                "row {i}: the image does not decode"
            ))),
        }
    }
}

/// The trained components, each with its own parameters (names prefixed by the component
/// directory in the optimiser, so checkpoints of a joint run keep them apart).
struct Trainables {
    unet: Option<UNet2DConditionModel>,
    text_encoder: Option<ClipTextModel>,
    vae: Option<AutoencoderKL>,
    registries: Vec<(&'static str, VarRegistry)>,
}

fn trainable_weights(
    dir: &Path,
    stem: &str,
    device: &Device,
) -> Result<(Weights, VarRegistry), TrainError> {
    let registry = VarRegistry::default();
    let files = Weights::resolve_files(dir, stem, None)?;
    Ok((
        Weights::from_files(&files, device, DType::F32)?.trainable(registry.clone()),
        registry,
    ))
}

pub struct Pretrainer {
    pub config: TrainConfig,
    model: DiffusionModel,
    schedule: NoiseSchedule,
    /// None = uniform timesteps (drawn as before the bias option existed, so old runs resume
    /// bit-exactly).
    timesteps: Option<TimestepSampler>,
    data: CaptionImages,
    train: Trainables,
    opt: AdamW,
    ema: Option<Vec<Tensor>>,
    /// text_to_image: each row's latent posterior (mean, std), encoded once by the frozen VAE.
    latents: HashMap<usize, (Tensor, Tensor)>,
    resolution: usize,
    device: Device,
    pub metrics: Vec<StepMetrics>,
    step: usize,
    resumed_from: Option<usize>,
    stats: DatasetStats,
}

impl Pretrainer {
    pub fn new(config: TrainConfig) -> Result<Self, TrainError> {
        config.validate()?;
        let opts = config.pretrain.clone();
        opts.save_dtype()?;
        if !(0.0..1.0).contains(&opts.ema_decay) {
            return Err(TrainError::Config(format!(
                "pretrain.ema_decay must be in [0, 1), got {}",
                opts.ema_decay
            )));
        }
        for (name, v) in [
            ("noise_offset", opts.noise_offset),
            ("snr_gamma", opts.snr_gamma),
        ] {
            if !(v.is_finite() && v >= 0.0) {
                return Err(TrainError::Config(format!(
                    "pretrain.{name} must be a finite number >= 0 (0 = off), got {v}"
                )));
            }
        }
        if config.lora.is_some() {
            return Err(TrainError::Config(
                "text_to_image and autoencoder modes train whole components, not LoRA".into(),
            ));
        }
        // Two spellings of one knob would leave one silently ignored.
        if config.hyperparameters.noise_offset != 0.0 {
            return Err(TrainError::Config(
                "hyperparameters.noise_offset is for fine-tuning (dspo, diffusion_dpo, sft, \
                 dspo_e); text_to_image takes pretrain.noise_offset"
                    .into(),
            ));
        }
        if config.hyperparameters.anchor_weight != 0.0 {
            return Err(TrainError::Config(
                "hyperparameters.anchor_weight is for preference fine-tuning; text_to_image \
                 already trains on the plain denoising loss"
                    .into(),
            ));
        }
        let device = parse_device(&config.device)?;
        let dir = ModelSource::parse(&config.model).resolve(None)?;
        let model = DiffusionModel::load(
            &dir,
            &LoadOptions {
                device: device.clone(),
                dtype: DType::F32,
                variant: None,
            },
        )?;
        if model.architecture != Architecture::StableDiffusion {
            return Err(TrainError::Config(
                "text_to_image and autoencoder modes support SD1.x-layout models only".into(),
            ));
        }
        let mut data = CaptionImages::open(&config.dataset)?;
        if let Some(n) = config.hyperparameters.max_pairs {
            data.truncate(n);
        }
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
        let mut train = Trainables {
            unet: None,
            text_encoder: None,
            vae: None,
            registries: Vec::new(),
        };
        match config.mode {
            TrainMode::TextToImage => {
                let (w, r) =
                    trainable_weights(&dir.join("unet"), "diffusion_pytorch_model", &device)?;
                train.unet = Some(UNet2DConditionModel::new(
                    UNet2DConditionModel::load_config(&dir.join("unet"))?,
                    &w,
                )?);
                train.registries.push(("unet", r));
                if opts.train_text_encoder {
                    let (w, r) = trainable_weights(&dir.join("text_encoder"), "model", &device)?;
                    train.text_encoder = Some(ClipTextModel::new(
                        ClipTextModel::load_config(&dir.join("text_encoder"))?,
                        &w,
                    )?);
                    train.registries.push(("text_encoder", r));
                }
            }
            TrainMode::Autoencoder => {
                let (w, r) =
                    trainable_weights(&dir.join("vae"), "diffusion_pytorch_model", &device)?;
                train.vae = Some(AutoencoderKL::new(
                    AutoencoderKL::load_config(&dir.join("vae"))?,
                    &w,
                )?);
                train.registries.push(("vae", r));
            }
            TrainMode::Preference => {
                return Err(TrainError::Config(
                    "preference runs use the preference trainer".into(),
                ))
            }
        }
        let params: Vec<(String, Var)> = train
            .registries
            .iter()
            .flat_map(|(prefix, r)| {
                r.all()
                    .into_iter()
                    .map(move |(n, v)| (format!("{prefix}.{n}"), v))
            })
            .collect();
        let h = &config.hyperparameters;
        let lr = h.learning_rate.ok_or_else(|| {
            TrainError::Config("text_to_image and autoencoder modes need a learning_rate".into())
        })?;
        let opt = AdamW::new(
            params,
            AdamWConfig {
                lr,
                beta1: h.adam_beta1,
                beta2: h.adam_beta2,
                eps: h.adam_eps,
                weight_decay: h.weight_decay,
            },
        )?;
        let ema = if opts.ema_decay > 0.0 {
            Some(
                opt.params
                    .iter()
                    .map(|(_, v)| v.as_tensor().detach().copy())
                    .collect::<candle_core::Result<Vec<_>>>()?,
            )
        } else {
            None
        };
        let stats = DatasetStats {
            rows: data.len(),
            kept: data.len(),
            ..Default::default()
        };
        let schedule = NoiseSchedule::new(&model.scheduler_config);
        let timesteps = if opts.timestep_bias.strategy == "none" {
            None
        } else {
            let sampler = schedule
                .timestep_sampler(&opts.timestep_bias)
                .map_err(|e| TrainError::Config(format!("pretrain.{e}")))?;
            Some(sampler)
        };
        let mut t = Self {
            schedule,
            timesteps,
            config,
            model,
            data,
            train,
            opt,
            ema,
            latents: HashMap::new(),
            resolution,
            device,
            metrics: Vec::new(),
            step: 0,
            resumed_from: None,
            stats,
        };
        t.resume()?;
        Ok(t)
    }

    pub fn dataset_stats(&self) -> &DatasetStats {
        &self.stats
    }

    pub fn step(&self) -> usize {
        self.step
    }

    fn checkpoint_dir(&self) -> PathBuf {
        self.config.output_dir.join("checkpoints")
    }

    fn resume(&mut self) -> Result<(), TrainError> {
        let Some((step, state)) =
            checkpoint::load_latest(&self.checkpoint_dir(), &mut self.opt, &self.device)?
        else {
            return Ok(());
        };
        let path = self
            .checkpoint_dir()
            .join(format!("step-{step:08}"))
            .join("ema.safetensors");
        if let Some(ema) = &mut self.ema {
            let saved = candle_core::safetensors::load(&path, &self.device)
                .map_err(|e| TrainError::Checkpoint(format!("{}: {e}", path.display())))?;
            for (i, (name, _)) in self.opt.params.iter().enumerate() {
                ema[i] = saved
                    .get(name)
                    .ok_or_else(|| TrainError::Checkpoint(format!("EMA of {name} missing")))?
                    .clone();
            }
        }
        self.metrics = serde_json::from_value(state["metrics"].clone()).unwrap_or_default();
        self.step = step;
        self.resumed_from = Some(step);
        tracing::info!(step, "resumed from checkpoint");
        Ok(())
    }

    /// A checkpoint (exact resume), and the model as of now under `output_dir/model`, so a long
    /// run can be sampled while it goes on.
    pub fn checkpoint(&self) -> Result<PathBuf, TrainError> {
        let state = serde_json::json!({ "metrics": self.metrics, "mode": self.config.mode });
        let dir = checkpoint::save(&self.checkpoint_dir(), self.step, &self.opt, state)?;
        if let Some(ema) = &self.ema {
            let map: HashMap<String, Tensor> = self
                .opt
                .params
                .iter()
                .zip(ema)
                .map(|((n, _), t)| (n.clone(), t.clone()))
                .collect();
            candle_core::safetensors::save(&map, dir.join("ema.safetensors"))?;
        }
        self.save_model()?;
        Ok(dir)
    }

    fn lr_at(&self, step: usize) -> f64 {
        let h = &self.config.hyperparameters;
        let base = self.opt.config.lr;
        if step < h.warmup_steps {
            return base * step as f64 / h.warmup_steps as f64;
        }
        if self.config.pretrain.cosine_decay {
            let span = h.max_steps.saturating_sub(h.warmup_steps).max(1) as f64;
            let p = ((step - h.warmup_steps) as f64 / span).min(1.0);
            return base * 0.5 * (1.0 + (std::f64::consts::PI * p).cos());
        }
        base
    }

    /// The frozen VAE's posterior of each row, encoded on first use.
    fn posterior(&mut self, rows: &[usize]) -> Result<(Tensor, Tensor), TrainError> {
        let missing: Vec<usize> = rows
            .iter()
            .copied()
            .filter(|i| !self.latents.contains_key(i))
            .collect();
        if !missing.is_empty() {
            let imgs = missing
                .iter()
                .map(|&i| self.data.image(i, self.resolution, &self.device))
                .collect::<Result<Vec<_>, _>>()?;
            let post = self.model.vae.encode(&Tensor::stack(&imgs, 0)?)?;
            let std = post.std()?;
            for (j, &i) in missing.iter().enumerate() {
                self.latents
                    .insert(i, (post.mean.get(j)?.detach(), std.get(j)?.detach()));
            }
        }
        let means: Vec<&Tensor> = rows.iter().map(|i| &self.latents[i].0).collect();
        let stds: Vec<&Tensor> = rows.iter().map(|i| &self.latents[i].1).collect();
        Ok((Tensor::stack(&means, 0)?, Tensor::stack(&stds, 0)?))
    }

    fn text_to_image_loss(
        &mut self,
        rows: &[usize],
        rng: &mut NoiseRng,
    ) -> Result<Tensor, TrainError> {
        let h = self.config.hyperparameters.clone();
        let b = rows.len();
        let (mean, std) = self.posterior(rows)?;
        let eps = rng.randn(mean.dims(), &self.device, DType::F32)?;
        let x0 = ((mean + (std * eps)?)? * self.model.vae.config.scaling_factor)?;
        let captions: Vec<&str> = rows
            .iter()
            .map(|&i| match rng.uniform() < h.caption_dropout {
                true => "",
                false => self.data.caption(i),
            })
            .collect();
        let ids = crate::pipelines::token_ids(&self.model.tokenizer, &captions, &self.device, None)
            .map_err(|e| TrainError::Config(e.to_string()))?;
        let ehs = match &self.train.text_encoder {
            Some(te) => te.forward(&ids)?.last_hidden_state,
            None => self
                .model
                .text_encoder
                .forward(&ids)?
                .last_hidden_state
                .detach(),
        };
        let (_, c, lh, lw) = x0.dims4()?;
        let noise = super::noise::training_noise(
            rng,
            (b, c, lh, lw),
            self.config.pretrain.noise_offset,
            &self.device,
        )?;
        let t: Vec<usize> = (0..b)
            .map(|_| match &self.timesteps {
                Some(s) => s.sample(rng.uniform()),
                None => rng.below(self.schedule.num_train_timesteps()),
            })
            .collect();
        let noisy = self.schedule.add_noise(&x0, &noise, &t)?;
        let target = self.schedule.target(&x0, &noise, &t)?;
        let tt = Tensor::from_vec(
            t.iter().map(|&x| x as f32).collect::<Vec<_>>(),
            b,
            &self.device,
        )?;
        let unet = self
            .train
            .unet
            .as_ref()
            .expect("text_to_image trains a UNet");
        let pred = unet.forward(&noisy, &tt, &ehs, None)?;
        let gamma = self.config.pretrain.snr_gamma;
        if gamma > 0.0 {
            let w = self.schedule.min_snr_weights(&t, gamma);
            let w = Tensor::from_vec(w.into_iter().map(|x| x as f32).collect(), b, &self.device)?;
            Ok(super::losses::weighted_mse(&pred, &target, &w)?)
        } else {
            Ok(super::losses::sft(&pred, &target)?)
        }
    }

    fn autoencoder_loss(
        &mut self,
        rows: &[usize],
        rng: &mut NoiseRng,
    ) -> Result<Tensor, TrainError> {
        let imgs = rows
            .iter()
            .map(|&i| self.data.image(i, self.resolution, &self.device))
            .collect::<Result<Vec<_>, _>>()?;
        let x = Tensor::stack(&imgs, 0)?;
        let vae = self
            .train
            .vae
            .as_ref()
            .expect("autoencoder mode trains a VAE");
        let post = vae.encode(&x)?;
        let sample = self.config.pretrain.sample_posterior;
        let z = if sample {
            post.sample_with(&rng.randn(post.mean.dims(), &self.device, DType::F32)?)?
        } else {
            post.mean.clone()
        };
        let diff = (vae.decode(&z)? - &x)?;
        let k = self.config.pretrain.chroma_weight;
        let diff = if k != 1.0 {
            let (s3, s2, s6) = (3f64.sqrt(), 2f64.sqrt(), 6f64.sqrt());
            let m = Tensor::from_vec(
                vec![
                    (1.0 / s3) as f32,
                    (1.0 / s3) as f32,
                    (1.0 / s3) as f32,
                    (k / s2) as f32,
                    0.0,
                    (-k / s2) as f32,
                    (k / s6) as f32,
                    (-2.0 * k / s6) as f32,
                    (k / s6) as f32,
                ],
                (3, 3),
                &self.device,
            )?;
            let (b, c, h, w) = diff.dims4()?;
            m.broadcast_matmul(&diff.reshape((b, c, h * w))?)?
                .reshape((b, c, h, w))?
        } else {
            diff
        };
        // L1 keeps edges sharp, L2 punishes a wrong colour over a whole flat region.
        let rec = (diff.abs()?.mean_all()? + diff.sqr()?.mean_all()?)?;
        let reg = if sample {
            (((post.mean.sqr()? + post.logvar.exp()?)? - 1.0)?
                .sub(&post.logvar)?
                .mean_all()?
                * 0.5)?
        } else {
            post.mean.sqr()?.mean_all()?
        };
        Ok((rec + (reg * self.config.pretrain.kl_weight)?)?)
    }

    pub fn train_step(&mut self) -> Result<StepMetrics, TrainError> {
        let started = std::time::Instant::now();
        let h = self.config.hyperparameters.clone();
        let accum = h.gradient_accumulation_steps;
        let mut sum: Option<Vec<Tensor>> = None;
        let mut loss_sum = 0.0;
        for m in 0..accum {
            let k = self.step * accum + m;
            let seed = h.seed;
            let rows: Vec<usize> = (0..h.batch_size)
                .map(|j| self.data.index(seed, k * h.batch_size + j))
                .collect();
            let mut rng = NoiseRng::new(mix(seed, k as u64));
            let _training = crate::models::nn::training_mode();
            let _checkpointing =
                match crate::models::checkpoint::wanted(h.gradient_checkpointing, &self.device) {
                    true => Some(crate::models::checkpoint::enable(&self.device)?),
                    false => None,
                };
            let loss = match self.config.mode {
                TrainMode::Autoencoder => self.autoencoder_loss(&rows, &mut rng)?,
                _ => self.text_to_image_loss(&rows, &mut rng)?,
            };
            let loss = (loss / accum as f64)?;
            let grads = crate::models::checkpoint::backward(&loss)?;
            let g = collect(&self.opt.params, &grads)?;
            loss_sum += loss.to_dtype(DType::F64)?.to_scalar::<f64>()? * accum as f64;
            sum = Some(match sum {
                None => g,
                Some(s) => s
                    .iter()
                    .zip(&g)
                    .map(|(a, b)| a + b)
                    .collect::<candle_core::Result<Vec<_>>>()?,
            });
        }
        let clipped = clip(sum.unwrap_or_default(), Some(h.max_grad_norm))?;
        let lr = self.lr_at(self.step);
        self.opt.update(&clipped.clipped, lr)?;
        if let Some(ema) = &mut self.ema {
            // Warm-started decay (as diffusers' EMAModel): early averages do not drag in the
            // random initialisation for thousands of steps.
            let n = self.opt.step as f64;
            let d = self.config.pretrain.ema_decay.min((1.0 + n) / (10.0 + n));
            for (e, (_, v)) in ema.iter_mut().zip(&self.opt.params) {
                *e = ((&*e * d)? + (v.as_tensor().detach() * (1.0 - d))?)?;
            }
        }
        self.step += 1;
        let metrics = StepMetrics {
            step: self.step,
            total_steps: h.max_steps,
            loss: loss_sum / accum as f64,
            implicit_accuracy: None,
            anchor_mse: None,
            learning_rate: lr,
            grad_norm: clipped.norm,
            seconds: started.elapsed().as_secs_f64(),
            drift: None,
        };
        self.metrics.push(metrics.clone());
        Ok(metrics)
    }

    pub fn run(
        &mut self,
        control: &mut dyn FnMut(&StepMetrics) -> bool,
    ) -> Result<TrainOutcome, TrainError> {
        let (out, h) = (
            self.config.output_dir.clone(),
            self.config.hyperparameters.clone(),
        );
        super::checkpoint::run_loop(self, &out, &h, control)
    }

    /// The trained parameters (their EMA when enabled) of one component, under its own names.
    fn component(&self, prefix: &str) -> Result<HashMap<String, Tensor>, TrainError> {
        let dtype = self.config.pretrain.save_dtype()?;
        let head = format!("{prefix}.");
        let mut out = HashMap::new();
        for (i, (name, var)) in self.opt.params.iter().enumerate() {
            if let Some(rest) = name.strip_prefix(&head) {
                let t = match &self.ema {
                    Some(e) => e[i].clone(),
                    None => var.as_tensor().detach(),
                };
                out.insert(rest.to_string(), t.to_dtype(dtype)?);
            }
        }
        Ok(out)
    }

    /// Writes `output_dir/model/`: the base pipeline with the trained components replaced.
    pub fn save_model(&self) -> Result<PathBuf, TrainError> {
        let io = |e: std::io::Error| TrainError::Io(e.to_string());
        let out = self.config.output_dir.join("model");
        let tmp = self.config.output_dir.join(".model.tmp");
        let _ = std::fs::remove_dir_all(&tmp);
        copy_tree(&self.model.dir, &tmp).map_err(io)?;
        for (prefix, _) in &self.train.registries {
            let (file, config_name) = match *prefix {
                "text_encoder" => ("model.safetensors", "config.json"),
                _ => ("diffusion_pytorch_model.safetensors", "config.json"),
            };
            let dir = tmp.join(prefix);
            for e in std::fs::read_dir(&dir).map_err(io)? {
                let p = e.map_err(io)?.path();
                if p.extension().and_then(|x| x.to_str()) == Some("safetensors")
                    || p.to_string_lossy().ends_with(".index.json")
                {
                    std::fs::remove_file(&p).map_err(io)?;
                }
            }
            let mut tensors = self.component(prefix)?;
            if *prefix == "vae" && !self.config.pretrain.sample_posterior {
                degenerate_posterior(&mut tensors, self.model.vae.config.latent_channels)?;
            }
            candle_core::safetensors::save(&tensors, dir.join(file))?;
            if *prefix == "vae" {
                let scale = self.latent_scaling()?;
                let path = dir.join(config_name);
                let mut cfg: serde_json::Value =
                    serde_json::from_str(&std::fs::read_to_string(&path).map_err(io)?)
                        .map_err(|e| TrainError::Io(e.to_string()))?;
                cfg["scaling_factor"] = scale.into();
                std::fs::write(&path, serde_json::to_vec_pretty(&cfg).unwrap_or_default())
                    .map_err(io)?;
            }
        }
        let _ = std::fs::remove_dir_all(&out);
        std::fs::rename(&tmp, &out).map_err(io)?;
        Ok(out)
    }

    /// `1 / std` of the trained encoder's latent means over the first `scaling_samples` rows
    /// (how SD's 0.18215 was chosen), so the diffusion model sees unit-variance latents.
    fn latent_scaling(&self) -> Result<f64, TrainError> {
        let mut tensors = self.component("vae")?;
        if !self.config.pretrain.sample_posterior {
            degenerate_posterior(&mut tensors, self.model.vae.config.latent_channels)?;
        }
        let w = Weights::from_map(tensors, &self.device, DType::F32);
        let vae = AutoencoderKL::new(self.model.vae.config.clone(), &w)?;
        let n = self
            .config
            .pretrain
            .scaling_samples
            .clamp(1, self.data.len());
        let mut all = Vec::new();
        for chunk in (0..n).collect::<Vec<_>>().chunks(32) {
            let imgs = chunk
                .iter()
                .map(|&i| self.data.image(i, self.resolution, &self.device))
                .collect::<Result<Vec<_>, _>>()?;
            all.push(vae.encode(&Tensor::stack(&imgs, 0)?)?.mean.flatten_all()?);
        }
        let v = Tensor::cat(&all, 0)?.to_dtype(DType::F64)?;
        let mean = v.mean_all()?.to_scalar::<f64>()?;
        let var = v
            .affine(1.0, -mean)?
            .sqr()?
            .mean_all()?
            .to_scalar::<f64>()?;
        let std = var.sqrt();
        if !(std.is_finite() && std > 0.0) {
            return Err(TrainError::Config(format!(
                "latent std is {std}; the autoencoder did not train"
            )));
        }
        Ok(1.0 / std)
    }
}

/// Makes the posterior's log-variance the constant -30 (the encoder's clamp floor, std 3e-7):
/// zero weights and a -30 bias on the logvar half of `quant_conv`.
fn degenerate_posterior(
    t: &mut HashMap<String, Tensor>,
    latent_channels: usize,
) -> Result<(), TrainError> {
    let missing = || {
        TrainError::Config(
            "a deterministic autoencoder needs quant_conv (use_quant_conv = true)".into(),
        )
    };
    let w = t.get("quant_conv.weight").ok_or_else(missing)?.clone();
    let b = t.get("quant_conv.bias").ok_or_else(missing)?.clone();
    let lc = latent_channels;
    let w = Tensor::cat(
        &[w.narrow(0, 0, lc)?, w.narrow(0, lc, lc)?.zeros_like()?],
        0,
    )?;
    let b = Tensor::cat(
        &[
            b.narrow(0, 0, lc)?,
            (b.narrow(0, lc, lc)?.zeros_like()? - 30.0)?,
        ],
        0,
    )?;
    t.insert("quant_conv.weight".into(), w);
    t.insert("quant_conv.bias".into(), b);
    Ok(())
}

fn copy_tree(src: &Path, dst: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(dst)?;
    for e in std::fs::read_dir(src)? {
        let e = e?;
        let p = e.path();
        let name = e.file_name();
        if p.is_dir() {
            copy_tree(&p, &dst.join(&name))?;
        } else {
            std::fs::copy(&p, dst.join(&name))?;
        }
    }
    Ok(())
}

impl super::checkpoint::StepLoop for Pretrainer {
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
        let artifact = self.save_model()?;
        Ok(TrainOutcome {
            artifact,
            metrics: self.metrics.clone(),
            dataset: self.stats.clone(),
            resumed_from: self.resumed_from,
        })
    }
}
