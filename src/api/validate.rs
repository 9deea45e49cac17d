//! The type boundary: raw requests become `GenerationTask`s here, or a specific 4xx error.
//! Past this point nothing re-checks input, so every check a client could fail lives here,
//! and no client-chosen value can reach the model and turn into a 500.

use super::error::ApiError;
use super::images::{self, OutputFormat};
use super::types::{EditRequest, GenerateRequest, Parameters};
use crate::adapters::AdapterDir;
use crate::config::Config;
use crate::pipelines::PromptPair;
use crate::schedulers::SchedulerKind;
use crate::server::{AdapterChoice, GenerationTask, Mode, ModelInfo, TaskParams};
use std::str::FromStr;
use std::sync::Arc;

/// Adapter strengths outside this range only produce noise.
pub const ADAPTER_SCALE_RANGE: (f64, f64) = (-2.0, 2.0);

/// The fields /generate and /edit share.
struct Common {
    prompt: String,
    negative_prompt: Option<String>,
    adapter: Option<String>,
    adapter_scale: Option<f64>,
    steps: Option<i64>,
    guidance_scale: Option<f64>,
    scheduler: Option<String>,
    seed: Option<u64>,
    num_images: Option<i64>,
    output_format: Option<String>,
    output_quality: Option<i64>,
}

/// The checked common fields.
struct Checked {
    format: OutputFormat,
    steps: usize,
    guidance_scale: f64,
    scheduler: SchedulerKind,
    seeds: Vec<u64>,
    adapter: Option<AdapterChoice>,
}

fn check_side(what: &str, v: i64, info: &ModelInfo, config: &Config) -> Result<usize, ApiError> {
    let (lo, hi) = (config.limits.min_size as i64, config.limits.max_size as i64);
    let f = info.vae_scale_factor.max(8) as i64;
    if v < lo || v > hi || v % 8 != 0 || v % f != 0 {
        return Err(ApiError::InvalidSize(format!(
            "{what} is {v}; it must be a multiple of {f} between {lo} and {hi}"
        )));
    }
    Ok(v as usize)
}

fn check_guidance(what: &str, v: f64, config: &Config) -> Result<f64, ApiError> {
    let max = config.limits.max_guidance_scale;
    if !v.is_finite() || !(0.0..=max).contains(&v) {
        let msg = format!("{what} is {v}; it must be between 0 and {max}");
        return Err(if what == "image_guidance_scale" {
            ApiError::InvalidImageGuidanceScale(msg)
        } else {
            ApiError::InvalidGuidanceScale(msg)
        });
    }
    Ok(v)
}

fn check_common(c: &Common, info: &ModelInfo, config: &Config) -> Result<Checked, ApiError> {
    let max_steps = (config.limits.max_steps as usize).min(info.num_train_timesteps) as i64;
    let d = &info.generate_defaults;
    let steps = c
        .steps
        .or(d.steps.map(|s| s as i64))
        .unwrap_or(config.defaults.steps as i64);
    if steps < 1 || steps > max_steps {
        return Err(ApiError::InvalidSteps(format!(
            "steps is {steps}; it must be between 1 and {max_steps}"
        )));
    }
    let guidance_scale = check_guidance(
        "guidance_scale",
        c.guidance_scale
            .or(d.guidance_scale)
            .unwrap_or(config.defaults.guidance_scale),
        config,
    )?;
    let scheduler = match &c.scheduler {
        None => info.default_scheduler,
        Some(s) => SchedulerKind::from_str(s).map_err(|_| {
            let known: Vec<&str> = SchedulerKind::ALL.iter().map(|k| k.name()).collect();
            ApiError::UnknownScheduler(format!(
                "unknown scheduler '{s}'; known: {}",
                known.join(", ")
            ))
        })?,
    };
    // Some schedules cannot produce every step count (e.g. "leading" spacing with an offset
    // runs past the last training timestep); building the scheduler is cheap and tells.
    if let Err(e) =
        crate::schedulers::make_scheduler(scheduler, &info.scheduler_config, steps as usize)
    {
        return Err(ApiError::InvalidSteps(format!(
            "{steps} steps with scheduler {}: {e}",
            scheduler.name()
        )));
    }
    let n = c.num_images.unwrap_or(1);
    let max_n = config.limits.max_num_images as i64;
    if n > max_n {
        return Err(ApiError::TooManyImages(format!(
            "num_images is {n}; at most {max_n} per request"
        )));
    }
    if n < 1 {
        return Err(ApiError::InvalidRequest(format!(
            "num_images is {n}; it must be at least 1"
        )));
    }
    // Random seeds stay below 2^32 so that every client language holds them exactly and
    // A1111-style tools accept them.
    let seed = c.seed.unwrap_or_else(|| rand::random::<u32>() as u64);
    let seeds = (0..n as u64).map(|i| seed.wrapping_add(i)).collect();
    let adapter = match &c.adapter {
        None => None,
        Some(name) => {
            let Some(path) = config.adapters().find(name) else {
                let shown = AdapterDir::in_data_dir(std::path::Path::new("<data_dir>"));
                return Err(ApiError::AdapterNotFound(format!(
                    "no adapter named '{name}' (looked for {})",
                    shown.weights(name).display()
                )));
            };
            let scale = c.adapter_scale.unwrap_or(config.defaults.adapter_scale);
            let (lo, hi) = ADAPTER_SCALE_RANGE;
            if !scale.is_finite() || !(lo..=hi).contains(&scale) {
                return Err(ApiError::InvalidAdapterScale(format!(
                    "adapter_scale is {scale}; it must be between {lo} and {hi}"
                )));
            }
            Some(AdapterChoice {
                name: name.clone(),
                path,
                scale,
            })
        }
    };
    let quality = match c.output_quality {
        None => OutputFormat::DEFAULT_JPEG_QUALITY,
        Some(q) if (1..=100).contains(&q) => q as u8,
        Some(q) => {
            return Err(ApiError::InvalidOutputFormat(format!(
                "output_quality is {q}; it must be between 1 and 100"
            )))
        }
    };
    let format = match c.output_format.as_deref() {
        None => OutputFormat::Png,
        Some(name) => OutputFormat::parse(name, quality).ok_or_else(|| {
            ApiError::InvalidOutputFormat(format!(
                "unknown output_format '{name}'; known: {}",
                OutputFormat::NAMES.join(", ")
            ))
        })?,
    };
    Ok(Checked {
        format,
        steps: steps as usize,
        guidance_scale,
        scheduler,
        seeds,
        adapter,
    })
}

fn parameters(
    mode: Mode,
    c: &Common,
    checked: &Checked,
    info: &ModelInfo,
    width: usize,
    height: usize,
) -> Parameters {
    Parameters {
        mode: mode.name().to_string(),
        prompt: c.prompt.clone(),
        negative_prompt: c.negative_prompt.clone(),
        model: info.name.clone(),
        adapter: checked.adapter.as_ref().map(|a| a.name.clone()),
        adapter_scale: checked.adapter.as_ref().map(|a| a.scale),
        width: width as u32,
        height: height as u32,
        steps: checked.steps as u32,
        guidance_scale: checked.guidance_scale,
        scheduler: checked.scheduler.name().to_string(),
        seed: checked.seeds[0],
        num_images: checked.seeds.len() as u32,
        strength: None,
        image_guidance_scale: None,
        input_width: None,
        input_height: None,
        resized: None,
        output_format: checked.format.name().to_string(),
        output_quality: match checked.format {
            OutputFormat::Jpeg(q) => Some(q as u32),
            _ => None,
        },
    }
}

fn unsupported(mode: Mode, info: &ModelInfo) -> ApiError {
    let modes: Vec<&str> = info.modes().iter().map(|m| m.name()).collect();
    ApiError::UnsupportedMode(format!(
        "model '{}' ({}) does not support {}; it supports: {}",
        info.name,
        info.architecture.name(),
        mode.name(),
        modes.join(", ")
    ))
}

/// A size far from the one the model was trained at draws repeated or cropped subjects (a
/// 256-pixel request on a 64-pixel model tiles its scene): allowed, but said.
fn size_warning(width: usize, height: usize, info: &ModelInfo) -> Option<String> {
    let native = info.native_size;
    let far = |side: usize| side > 2 * native || 2 * side < native;
    (far(width) || far(height)).then(|| {
        format!(
            "{width}x{height} is far from this model's native {native}x{native}; expect \
             repeated, cropped or distorted subjects"
        )
    })
}

/// Parameters a request may send that its mode does not use are accepted (clients send one
/// body shape for every mode) but named in the response's warnings, not silently dropped.
fn ignored_adapter_scale(c: &Common) -> Option<String> {
    (c.adapter.is_none() && c.adapter_scale.is_some())
        .then(|| "adapter_scale was ignored: it applies only with an adapter".to_string())
}

pub fn generate(
    req: GenerateRequest,
    info: &ModelInfo,
    config: &Config,
) -> Result<(GenerationTask, Parameters), ApiError> {
    if !info.supports(Mode::Txt2Img) {
        return Err(unsupported(Mode::Txt2Img, info));
    }
    let width = check_side(
        "width",
        req.width.unwrap_or(info.native_size as i64),
        info,
        config,
    )?;
    let height = check_side(
        "height",
        req.height.unwrap_or(info.native_size as i64),
        info,
        config,
    )?;
    let common = Common {
        prompt: req.prompt,
        negative_prompt: req.negative_prompt,
        adapter: req.adapter,
        adapter_scale: req.adapter_scale,
        steps: req.steps,
        guidance_scale: req.guidance_scale,
        scheduler: req.scheduler,
        seed: req.seed,
        num_images: req.num_images,
        output_format: req.output_format,
        output_quality: req.output_quality,
    };
    let checked = check_common(&common, info, config)?;
    let params = parameters(Mode::Txt2Img, &common, &checked, info, width, height);
    let warnings = ignored_adapter_scale(&common)
        .into_iter()
        .chain(size_warning(width, height, info))
        .collect();
    let task = GenerationTask {
        task: TaskParams::Txt2Img,
        prompt: PromptPair {
            prompt: common.prompt,
            negative_prompt: common.negative_prompt,
        },
        width,
        height,
        steps: checked.steps,
        guidance_scale: checked.guidance_scale,
        scheduler: checked.scheduler,
        adapter: checked.adapter,
        seeds: checked.seeds,
        image: None,
        warnings,
    };
    Ok((task, params))
}

/// `image` is the raw file (already base64-decoded for JSON bodies). The image is decoded last,
/// after every cheap check, so a bad parameter costs no decoding.
pub fn edit(
    req: EditRequest,
    image: &[u8],
    info: &ModelInfo,
    config: &Config,
) -> Result<(GenerationTask, Parameters), ApiError> {
    let mode = match req.mode.as_deref() {
        None if info.supports(Mode::InstructPix2Pix) => Mode::InstructPix2Pix,
        None => Mode::Img2Img,
        Some("instruct_pix2pix") => Mode::InstructPix2Pix,
        Some("img2img") => Mode::Img2Img,
        Some(other) => {
            return Err(ApiError::UnknownMode(format!(
                "unknown mode '{other}'; /edit takes instruct_pix2pix or img2img (txt2img is POST /generate)"
            )))
        }
    };
    if !info.supports(mode) {
        return Err(unsupported(mode, info));
    }
    let mut warnings = Vec::new();
    match mode {
        Mode::InstructPix2Pix if req.strength.is_some() => warnings.push(
            "strength was ignored: it applies to img2img, not instruct_pix2pix".to_string(),
        ),
        Mode::Img2Img if req.image_guidance_scale.is_some() => warnings.push(
            "image_guidance_scale was ignored: it applies to instruct_pix2pix, not img2img"
                .to_string(),
        ),
        _ => {}
    }
    let task = match mode {
        Mode::Img2Img => {
            let strength = req.strength.unwrap_or(config.defaults.strength);
            if !strength.is_finite() || strength <= 0.0 || strength > 1.0 {
                return Err(ApiError::InvalidStrength(format!(
                    "strength is {strength}; it must be in (0, 1]"
                )));
            }
            TaskParams::Img2Img { strength }
        }
        _ => TaskParams::InstructPix2Pix {
            image_guidance_scale: check_guidance(
                "image_guidance_scale",
                req.image_guidance_scale
                    .unwrap_or(config.defaults.image_guidance_scale),
                config,
            )?,
        },
    };
    for (what, v) in [("width", req.width), ("height", req.height)] {
        if let Some(v) = v {
            check_side(what, v, info, config)?;
        }
    }
    let common = Common {
        prompt: req.prompt,
        negative_prompt: req.negative_prompt,
        adapter: req.adapter,
        adapter_scale: req.adapter_scale,
        steps: req.steps,
        guidance_scale: req.guidance_scale,
        scheduler: req.scheduler,
        seed: req.seed,
        num_images: req.num_images,
        output_format: req.output_format,
        output_quality: req.output_quality,
    };
    let checked = check_common(&common, info, config)?;
    warnings.extend(ignored_adapter_scale(&common));
    if let TaskParams::Img2Img { strength } = task {
        // diffusers denoises int(steps * strength) steps; zero would return the input noised.
        if ((checked.steps as f64 * strength) as usize) < 1 {
            return Err(ApiError::InvalidStrength(format!(
                "strength {strength} with {} steps leaves no denoising step; raise strength or steps",
                checked.steps
            )));
        }
    }
    let decoded = images::decode_image(image, config.limits.max_image_pixels)?;
    let (input_w, input_h) = (decoded.width(), decoded.height());
    let (rw, rh) = images::rounded_size(&decoded);
    let width = match req.width {
        Some(w) => w as usize,
        None => check_side(
            "the input image's width (rounded down to a multiple of 8)",
            rw as i64,
            info,
            config,
        )?,
    };
    let height = match req.height {
        Some(h) => h as usize,
        None => check_side(
            "the input image's height (rounded down to a multiple of 8)",
            rh as i64,
            info,
            config,
        )?,
    };
    let resized = images::resize(decoded, width as u32, height as u32);
    warnings.extend(size_warning(width, height, info));
    let mut params = parameters(mode, &common, &checked, info, width, height);
    params.input_width = Some(input_w);
    params.input_height = Some(input_h);
    params.resized = Some(input_w as usize != width || input_h as usize != height);
    match task {
        TaskParams::Img2Img { strength } => params.strength = Some(strength),
        TaskParams::InstructPix2Pix {
            image_guidance_scale,
        } => params.image_guidance_scale = Some(image_guidance_scale),
        TaskParams::Txt2Img => {}
    }
    let task = GenerationTask {
        task,
        prompt: PromptPair {
            prompt: common.prompt,
            negative_prompt: common.negative_prompt,
        },
        width,
        height,
        steps: checked.steps,
        guidance_scale: checked.guidance_scale,
        scheduler: checked.scheduler,
        adapter: checked.adapter,
        seeds: checked.seeds,
        image: Some(Arc::new(resized)),
        warnings,
    };
    Ok((task, params))
}
