//! Runs one batch of compatible tasks through `pipelines::generate` (which keeps every image
//! independent of its batch), and tells each request about its own truncated prompts.

use super::task::GenerationTask;
use crate::models::DiffusionModel;
use crate::pipelines::{self, PipelineError, PromptPair, SamplingParams, SeededRequest};

/// Per task (in batch order): its images in seed order and the warnings about its own prompts.
pub struct BatchOutput {
    pub images: Vec<Vec<image::RgbImage>>,
    pub warnings: Vec<Vec<String>>,
}

/// `tasks` must share a batch key. `keep_going(step, steps)` is called after every denoising
/// step; false abandons the batch (every client went away).
pub fn run_batch(
    model: &DiffusionModel,
    tasks: &[&GenerationTask],
    keep_going: &mut dyn FnMut(usize, usize) -> bool,
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
    let requests: Vec<SeededRequest<'_>> = tasks
        .iter()
        .map(|t| SeededRequest {
            prompt: &t.prompt,
            seeds: &t.seeds,
            image: t.image.as_deref(),
        })
        .collect();
    let out = pipelines::generate(model, first.task, &requests, &params, keep_going)?;
    // The pipeline's notes mix every prompt of the batch; each request is told only about its own.
    let warnings = tasks
        .iter()
        .map(|t| {
            let mut w = t.warnings.clone();
            w.extend(prompt_warnings(model, &t.prompt)?);
            Ok(w)
        })
        .collect::<Result<_, PipelineError>>()?;
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
