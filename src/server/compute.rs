//! Runs one batch of compatible tasks through the right pipeline.
//!
//! Each image keeps its own seeded generator: its initial noise is drawn from it alone and the
//! generators are merged row by row for the ancestral samplers, so an image is the same bytes
//! whether it ran alone or batched with strangers.

use super::task::{GenerationTask, Task};
use crate::models::DiffusionModel;
use crate::pipelines::{self, Notes, PipelineError, PromptPair, SamplingParams};
use crate::rng::NoiseRng;
use candle_core::{DType, Tensor};

/// Per task (in batch order): its images in seed order and the warnings about its own prompts.
pub struct BatchOutput {
    pub images: Vec<Vec<image::RgbImage>>,
    pub warnings: Vec<Vec<String>>,
}

/// `tasks` must share a batch key. `keep_going` is polled after every denoising step; false
/// abandons the batch (every client went away).
pub fn run_batch(
    model: &DiffusionModel,
    tasks: &[&GenerationTask],
    keep_going: &mut dyn FnMut() -> bool,
) -> Result<BatchOutput, PipelineError> {
    let first = tasks
        .first()
        .ok_or_else(|| PipelineError::Invalid("empty batch".into()))?;
    let params = SamplingParams {
        height: first.height,
        width: first.width,
        steps: first.steps,
        guidance_scale: first.guidance_scale,
        scheduler: first.scheduler,
    };
    let (h, w) = params.validate(model)?;
    let c = model.latent_channels();
    let device = &model.device;

    let mut prompts: Vec<PromptPair> = Vec::new();
    let mut rngs = Vec::new();
    let mut noise_rows = Vec::new();
    let mut vae_noise_rows = Vec::new();
    let mut image_rows = Vec::new();
    for task in tasks {
        let image = match &task.image {
            Some(img) => Some(image_tensor(img, device)?),
            None => None,
        };
        for &seed in &task.seeds {
            prompts.push(task.prompt.clone());
            let mut rng = NoiseRng::new(seed);
            // diffusers' img2img draws the VAE posterior sample before the forward noise.
            if matches!(task.task, Task::Img2Img { .. }) {
                vae_noise_rows.push(rng.randn((1, c, h, w), device, DType::F32)?);
            }
            noise_rows.push(rng.randn((1, c, h, w), device, DType::F32)?);
            rngs.push(rng);
            if let Some(img) = &image {
                image_rows.push(img.clone());
            }
        }
    }
    let noise = Tensor::cat(&noise_rows, 0)?;
    let mut rng = NoiseRng::merge(rngs);
    let mut notes = Notes::default();
    let mut progress = |_: usize, _: usize| keep_going();
    let image = match image_rows.is_empty() {
        true => None,
        false => Some(Tensor::cat(&image_rows, 0)?),
    };
    let vae_noise = match vae_noise_rows.is_empty() {
        true => None,
        false => Some(Tensor::cat(&vae_noise_rows, 0)?),
    };
    let missing = || PipelineError::Invalid("an edit task came without its image".into());
    let task = match first.task {
        Task::Txt2Img => pipelines::Task::Txt2Img,
        Task::Img2Img { strength } => pipelines::Task::Img2Img {
            strength,
            image: image.as_ref().ok_or_else(missing)?,
            vae_noise: vae_noise.as_ref().ok_or_else(missing)?,
        },
        Task::InstructPix2Pix {
            image_guidance_scale,
        } => pipelines::Task::InstructPix2Pix {
            image_guidance_scale,
            image: image.as_ref().ok_or_else(missing)?,
        },
    };
    let images = pipelines::run(
        model,
        task,
        &prompts,
        &params,
        &noise,
        &mut rng,
        &mut progress,
        &mut notes,
    )?;
    let mut rgb = pipelines::to_rgb8(&images)?.into_iter();
    let mut out = Vec::with_capacity(tasks.len());
    for task in tasks {
        let mut mine = Vec::with_capacity(task.seeds.len());
        for _ in &task.seeds {
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
    // The pipeline's notes mix every prompt of the batch; each request is told only about its own.
    let warnings = tasks
        .iter()
        .map(|t| prompt_warnings(model, &t.prompt))
        .collect::<Result<_, _>>()?;
    Ok(BatchOutput {
        images: out,
        warnings,
    })
}

fn prompt_warnings(model: &DiffusionModel, p: &PromptPair) -> Result<Vec<String>, PipelineError> {
    let mut out = Vec::new();
    for (what, text) in [
        ("prompt", Some(&p.prompt)),
        ("negative_prompt", p.negative_prompt.as_ref()),
    ] {
        let Some(text) = text else { continue };
        let dropped = model.tokenizer.encode(text)?.truncated;
        if dropped > 0 {
            out.push(format!(
                "{what} truncated: its last {dropped} tokens exceed CLIP's {} token limit and were ignored",
                model.tokenizer.max_len()
            ));
        }
    }
    Ok(out)
}

/// `[1, 3, H, W]` in [0, 1], the layout the pipelines take.
fn image_tensor(
    img: &image::RgbImage,
    device: &candle_core::Device,
) -> Result<Tensor, PipelineError> {
    let (w, h) = (img.width() as usize, img.height() as usize);
    let data: Vec<f32> = img.as_raw().iter().map(|&b| b as f32 / 255.0).collect();
    Ok(Tensor::from_vec(data, (h, w, 3), device)?
        .permute((2, 0, 1))?
        .unsqueeze(0)?
        .contiguous()?)
}
