//! One function per case kind: run the stage, return role -> tensor.

use super::Case;
use crate::models::lora::LoraAdapter;
use crate::models::pipeline_model::LoadOptions;
use crate::models::unet::AddedCond;
use crate::models::DiffusionModel;
use crate::pipelines::{self, Notes, PromptPair, SamplingParams};
use crate::rng::NoiseRng;
use crate::schedulers::SchedulerKind;
use anyhow::{anyhow, bail, Result};
use candle_core::{DType, Device, Tensor};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

/// Suffix of an output computed a second time on the training kernels: the runner compares it
/// with the same expected tensor.
pub const TRAINING_KERNELS: &str = "@training";

/// Every kind this runner implements.
pub const KINDS: &[&str] = &[
    "tokenize",
    "text_encoder",
    "unet",
    "vae_decode",
    "vae_encode",
    "txt2img",
    "img2img",
    "instruct_pix2pix",
    "sdxl_txt2img",
    "lora_apply",
    "add_noise",
    "dspo_loss",
    "diffusion_dpo_loss",
    "dspo_e_loss",
    "sft_loss",
    "train_step",
    "train_step_lora",
    "clip_preprocess",
    "clip_embed",
    "reward",
];

#[derive(Default)]
pub struct ModelCache {
    models: HashMap<PathBuf, Arc<DiffusionModel>>,
}

impl ModelCache {
    pub fn get(&mut self, dir: &PathBuf, device: &Device) -> Result<Arc<DiffusionModel>> {
        if let Some(m) = self.models.get(dir) {
            return Ok(m.clone());
        }
        let opts = LoadOptions {
            device: device.clone(),
            dtype: DType::F32,
            variant: None,
        };
        let m = Arc::new(DiffusionModel::load(dir, &opts)?);
        self.models.insert(dir.clone(), m.clone());
        Ok(m)
    }
}

type Outputs = HashMap<String, Tensor>;

fn ids_tensor(ids: &[u32]) -> Result<Tensor> {
    let v: Vec<i64> = ids.iter().map(|&i| i as i64).collect();
    Ok(Tensor::from_vec(v, (1, ids.len()), &Device::Cpu)?)
}

fn prompt_pair(case: &Case) -> PromptPair {
    PromptPair {
        prompt: case.param_str("prompt").unwrap_or_default(),
        negative_prompt: case.param_str("negative_prompt"),
    }
}

fn sampling(case: &Case) -> Result<SamplingParams> {
    let name = case
        .param_str("scheduler")
        .ok_or_else(|| anyhow!("param scheduler missing"))?;
    if let Some(eta) = case.params.get("eta").and_then(|v| v.as_f64()) {
        if eta != 0.0 {
            bail!("DDIM eta {eta} is not supported (only eta 0)");
        }
    }
    Ok(SamplingParams {
        height: case.param_usize("height")?,
        width: case.param_usize("width")?,
        steps: case.param_usize("num_inference_steps")?,
        guidance_scale: case.param_f64("guidance_scale")?,
        scheduler: name.parse::<SchedulerKind>()?,
    })
}

pub fn run(case: &Case, cache: &mut ModelCache, device: &Device) -> Result<Outputs> {
    let mut out = Outputs::new();
    let model = || -> Result<PathBuf> {
        case.model
            .clone()
            .ok_or_else(|| anyhow!("case names no model"))
    };
    let dev = |t: Tensor| -> Result<Tensor> { Ok(t.to_device(device)?) };
    let mut notes = Notes::default();
    let mut always = |_: usize, _: usize| true;
    if super::rewards::KINDS.contains(&case.kind.as_str()) {
        return super::rewards::run(case, device);
    }
    match case.kind.as_str() {
        "tokenize" => {
            let m = cache.get(&model()?, device)?;
            let prompt = case.param_str("prompt").unwrap_or_default();
            out.insert(
                "input_ids".into(),
                ids_tensor(&m.tokenizer.encode(&prompt)?.ids)?,
            );
            if let Some(t2) = &m.tokenizer_2 {
                out.insert("input_ids_2".into(), ids_tensor(&t2.encode(&prompt)?.ids)?);
            }
        }
        "text_encoder" => {
            let m = cache.get(&model()?, device)?;
            let prompt = case.param_str("prompt").unwrap_or_default();
            let e = pipelines::encode_prompts(&m, &[prompt.as_str()], &mut notes)?;
            out.insert("prompt_embeds".into(), e.embeds);
            if let Some(pooled) = e.pooled {
                out.insert("pooled_prompt_embeds".into(), pooled);
            }
        }
        "unet" => {
            let m = cache.get(&model()?, device)?;
            let sample = dev(case.input("sample")?)?;
            let t = dev(case.input("timestep")?)?;
            let ehs = dev(case.input("encoder_hidden_states")?)?;
            let pred = if case.has_input("text_embeds") {
                let te = dev(case.input("text_embeds")?)?;
                let ids = dev(case.input("time_ids")?)?;
                m.unet.forward(
                    &sample,
                    &t,
                    &ehs,
                    Some(AddedCond {
                        text_embeds: &te,
                        time_ids: &ids,
                    }),
                )?
            } else {
                m.unet.forward(&sample, &t, &ehs, None)?
            };
            out.insert("noise_pred".into(), pred);
        }
        "vae_decode" => {
            let m = cache.get(&model()?, device)?;
            out.insert("image".into(), m.vae.decode(&dev(case.input("latents")?)?)?);
        }
        "vae_encode" => {
            let m = cache.get(&model()?, device)?;
            let image = dev(case.input("image")?)?;
            let post = m.vae.encode(&image)?;
            out.insert("latent_mean".into(), post.mean.clone());
            out.insert("latent_std".into(), post.std()?);
            // The preference trainer encodes its pairs in training mode (batched im2col
            // convolutions, fused GroupNorm): the same function on other kernels.
            let post = {
                let _training = crate::models::nn::training_mode();
                m.vae.encode(&image)?
            };
            out.insert(format!("latent_mean{TRAINING_KERNELS}"), post.mean.clone());
            out.insert(format!("latent_std{TRAINING_KERNELS}"), post.std()?);
        }
        "txt2img" | "sdxl_txt2img" => {
            let m = cache.get(&model()?, device)?;
            let p = sampling(case)?;
            let latents = dev(case.input("latents")?)?;
            let mut rng = NoiseRng::new(0);
            let img = pipelines::run(
                &m,
                pipelines::Task::Txt2Img,
                &[prompt_pair(case)],
                &p,
                &latents,
                &mut rng,
                &mut always,
                &mut notes,
            )?;
            out.insert("image".into(), img);
        }
        "img2img" => {
            let m = cache.get(&model()?, device)?;
            let p = sampling(case)?;
            let strength = case.param_f64("strength")?;
            let (image, vae_noise) = (dev(case.input("init_image")?)?, dev(case.input("vae_noise")?)?);
            let task = pipelines::Task::Img2Img {
                strength,
                image: &image,
                vae_noise: &vae_noise,
            };
            let img = pipelines::run(
                &m,
                task,
                &[prompt_pair(case)],
                &p,
                &dev(case.input("noise")?)?,
                &mut NoiseRng::new(0),
                &mut always,
                &mut notes,
            )?;
            out.insert("image".into(), img);
        }
        "instruct_pix2pix" => {
            let m = cache.get(&model()?, device)?;
            let p = sampling(case)?;
            let image = dev(case.input("image")?)?;
            let task = pipelines::Task::InstructPix2Pix {
                image_guidance_scale: case.param_f64("image_guidance_scale")?,
                image: &image,
            };
            let img = pipelines::run(
                &m,
                task,
                &[prompt_pair(case)],
                &p,
                &dev(case.input("latents")?)?,
                &mut NoiseRng::new(0),
                &mut always,
                &mut notes,
            )?;
            out.insert("image".into(), img);
        }
        "lora_apply" => {
            let m = cache.get(&model()?, device)?;
            let adapter = LoraAdapter::load(&case.file("input_files", "lora")?, device)?;
            let scale = case.param_f64("scale")?;
            let sample = dev(case.input("sample")?)?;
            let t = dev(case.input("timestep")?)?;
            let ehs = dev(case.input("encoder_hidden_states")?)?;
            adapter.attach(m.unet.linears(), scale, m.unet.dtype())?;
            let pred = m.unet.forward(&sample, &t, &ehs, None);
            // Never leave an adapter attached to a cached model.
            m.unet.linears().clear_all();
            out.insert("noise_pred".into(), pred?);
        }
        other => return super::training::run(other, case, cache, device),
    }
    Ok(out)
}
