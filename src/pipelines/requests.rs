//! Seeded image requests in, images out: the batch-level entry point the server's workers and
//! `dspo-server eval` share, so both draw noise the same way and support the same tasks.
//!
//! Each image keeps its own seeded generator: its initial noise is drawn from it alone and the
//! generators are merged row by row for the ancestral samplers, so an image is the same bytes
//! whether it ran alone or batched with strangers.

use super::{Notes, PipelineError, PromptPair, Result, SamplingParams};
use crate::models::{Architecture, DiffusionModel};
use crate::rng::NoiseRng;
use candle_core::{DType, Tensor};

/// The ways a request can use a model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Txt2Img,
    Img2Img,
    InstructPix2Pix,
}

impl Mode {
    pub fn name(&self) -> &'static str {
        match self {
            Mode::Txt2Img => "txt2img",
            Mode::Img2Img => "img2img",
            Mode::InstructPix2Pix => "instruct_pix2pix",
        }
    }

    /// The mode a name (as [`name`](Self::name) writes it) stands for.
    pub fn parse(name: &str) -> Option<Mode> {
        [Mode::Txt2Img, Mode::Img2Img, Mode::InstructPix2Pix]
            .into_iter()
            .find(|m| m.name() == name)
    }

    /// Which pipelines exist for an architecture: img2img runs on SD 1.x/2.x only (there is no
    /// SDXL img2img pipeline yet), and an 8-channel InstructPix2Pix UNet only edits.
    pub fn supported_by(arch: Architecture) -> &'static [Mode] {
        match arch {
            Architecture::StableDiffusion => &[Mode::Txt2Img, Mode::Img2Img],
            Architecture::StableDiffusionXl => &[Mode::Txt2Img],
            Architecture::InstructPix2Pix => &[Mode::InstructPix2Pix],
        }
    }
}

/// A mode with its parameter: what a batch asks of the model.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum TaskParams {
    Txt2Img,
    Img2Img { strength: f64 },
    InstructPix2Pix { image_guidance_scale: f64 },
}

impl TaskParams {
    pub fn mode(&self) -> Mode {
        match self {
            TaskParams::Txt2Img => Mode::Txt2Img,
            TaskParams::Img2Img { .. } => Mode::Img2Img,
            TaskParams::InstructPix2Pix { .. } => Mode::InstructPix2Pix,
        }
    }
}

/// One prompt with its seeds (one image per seed) and, for edits, its input image, already at
/// the batch's size.
pub struct SeededRequest<'a> {
    pub prompt: &'a PromptPair,
    pub seeds: &'a [u64],
    pub image: Option<&'a image::RgbImage>,
}

/// Runs `requests` (which share `params` and `task`) as one pipeline call. Returns each
/// request's images in seed order. `keep_going(step, steps)` is called after every denoising
/// step; false abandons the batch.
pub fn generate(
    model: &DiffusionModel,
    task: TaskParams,
    requests: &[SeededRequest<'_>],
    params: &SamplingParams,
    keep_going: &mut dyn FnMut(usize, usize) -> bool,
) -> Result<Vec<Vec<image::RgbImage>>> {
    let (h, w) = params.validate(model)?;
    let c = model.latent_channels();
    let device = &model.device;
    let mut prompts: Vec<PromptPair> = Vec::new();
    let mut rngs = Vec::new();
    let mut noise_rows = Vec::new();
    let mut vae_noise_rows = Vec::new();
    let mut image_rows = Vec::new();
    for r in requests {
        let image = match r.image {
            Some(img) => {
                if (img.width() as usize, img.height() as usize) != (params.width, params.height) {
                    return Err(PipelineError::Invalid(format!(
                        "an input image is {}x{}, the batch is {}x{}",
                        img.width(),
                        img.height(),
                        params.width,
                        params.height
                    )));
                }
                Some(image_tensor(img, device)?)
            }
            None => None,
        };
        for &seed in r.seeds {
            prompts.push(r.prompt.clone());
            let mut rng = NoiseRng::new(seed);
            // diffusers' img2img draws the VAE posterior sample before the forward noise.
            if matches!(task, TaskParams::Img2Img { .. }) {
                vae_noise_rows.push(rng.randn((1, c, h, w), device, DType::F32)?);
            }
            noise_rows.push(rng.randn((1, c, h, w), device, DType::F32)?);
            rngs.push(rng);
            if let Some(img) = &image {
                image_rows.push(img.clone());
            }
        }
    }
    if noise_rows.is_empty() {
        return Err(PipelineError::Invalid("empty batch".into()));
    }
    let noise = Tensor::cat(&noise_rows, 0)?;
    let mut rng = NoiseRng::merge(rngs);
    let mut notes = Notes::default();
    let mut progress = |step: usize, steps: usize| keep_going(step, steps);
    let cat = |rows: &[Tensor]| -> Result<Option<Tensor>> {
        Ok(if rows.is_empty() { None } else { Some(Tensor::cat(rows, 0)?) })
    };
    let (image, vae_noise) = (cat(&image_rows)?, cat(&vae_noise_rows)?);
    let missing = || PipelineError::Invalid("an edit came without its image".into());
    let inputs = match task {
        TaskParams::Txt2Img => super::Task::Txt2Img,
        TaskParams::Img2Img { strength } => super::Task::Img2Img {
            strength,
            image: image.as_ref().ok_or_else(missing)?,
            vae_noise: vae_noise.as_ref().ok_or_else(missing)?,
        },
        TaskParams::InstructPix2Pix {
            image_guidance_scale,
        } => super::Task::InstructPix2Pix {
            image_guidance_scale,
            image: image.as_ref().ok_or_else(missing)?,
        },
    };
    let images = super::run(
        model,
        inputs,
        &prompts,
        params,
        &noise,
        &mut rng,
        &mut progress,
        &mut notes,
    )?;
    let mut rgb = super::to_rgb8(&images)?.into_iter();
    let mut out = Vec::with_capacity(requests.len());
    for r in requests {
        let mut mine = Vec::with_capacity(r.seeds.len());
        for _ in r.seeds {
            let (w, h, bytes) = rgb
                .next()
                .ok_or_else(|| PipelineError::Invalid("pipeline returned too few images".into()))?;
            let img = image::RgbImage::from_raw(w as u32, h as u32, bytes).ok_or_else(|| {
                PipelineError::Invalid("pipeline returned a malformed image".into())
            })?;
            mine.push(img);
        }
        out.push(mine);
    }
    Ok(out)
}

/// `[1, 3, H, W]` in [0, 1], the layout the pipelines take.
fn image_tensor(img: &image::RgbImage, device: &candle_core::Device) -> Result<Tensor> {
    let (w, h) = (img.width() as usize, img.height() as usize);
    let data: Vec<f32> = img.as_raw().iter().map(|&b| b as f32 / 255.0).collect();
    Ok(Tensor::from_vec(data, (h, w, 3), device)?
        .permute((2, 0, 1))?
        .unsqueeze(0)?
        .contiguous()?)
}
