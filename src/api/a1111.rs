//! AUTOMATIC1111-compatible routes (its `/sdapi/v1` API, which stable-diffusion.cpp's server and
//! many front ends speak): txt2img, img2img, samplers, sd-models, loras, progress and
//! interrupt, with A1111's field names, mapped onto the same validated tasks as /generate and
//! /edit. An interrupted request is answered 409 generation_cancelled (A1111 returns the
//! unfinished images instead).
//!
//! Field mapping: `cfg_scale` is guidance_scale, `sampler_name` an A1111 sampler name ("Euler
//! a", "DPM++ 2M Karras", ...), `seed` -1 random, `batch_size * n_iter` images,
//! `denoising_strength` img2img's strength, `image_cfg_scale` InstructPix2Pix's image guidance,
//! `init_images` base64 images (a `data:` prefix is allowed), `override_settings.sd_model_checkpoint`
//! the model. A LoRA is named the A1111 way, `<lora:name:scale>` in the prompt. Other A1111
//! options (hires fix, restore faces, scripts, ...) are ignored; `mask` is refused.

use super::auth::Caller;
use super::error::ApiError;
use super::handlers::{compute, edit_task, generate_task, track, RequestId};
use super::types::{EditRequest, GenerateRequest};
use super::AppState;
use crate::schedulers::SchedulerKind;
use axum::extract::rejection::JsonRejection;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use base64::Engine;
use serde::Deserialize;
use serde_json::{json, Value};
use std::time::Instant;

#[derive(Debug, Deserialize)]
pub struct A1111Request {
    #[serde(default)]
    prompt: String,
    #[serde(default)]
    negative_prompt: Option<String>,
    #[serde(default)]
    steps: Option<i64>,
    #[serde(default)]
    cfg_scale: Option<f64>,
    #[serde(default)]
    sampler_name: Option<String>,
    #[serde(default)]
    sampler_index: Option<String>,
    #[serde(default)]
    seed: Option<i64>,
    #[serde(default)]
    width: Option<i64>,
    #[serde(default)]
    height: Option<i64>,
    #[serde(default)]
    batch_size: Option<i64>,
    #[serde(default)]
    n_iter: Option<i64>,
    #[serde(default)]
    denoising_strength: Option<f64>,
    #[serde(default)]
    image_cfg_scale: Option<f64>,
    #[serde(default)]
    init_images: Vec<String>,
    #[serde(default)]
    mask: Option<String>,
    #[serde(default)]
    override_settings: Option<Value>,
    /// Every other A1111 option: accepted, ignored.
    #[serde(flatten)]
    _other: serde_json::Map<String, Value>,
}

/// The prompt without its `<lora:name:scale>` tags, and the one adapter they name.
fn take_lora(prompt: &str) -> Result<(String, Option<(String, f64)>), ApiError> {
    let mut rest = String::new();
    let mut found = Vec::new();
    let mut s = prompt;
    while let Some(start) = s.find("<lora:") {
        rest.push_str(&s[..start]);
        let tail = &s[start + 6..];
        let end = tail
            .find('>')
            .ok_or_else(|| ApiError::InvalidRequest("an unclosed <lora:...> tag in the prompt".into()))?;
        let mut parts = tail[..end].split(':');
        let name = parts.next().unwrap_or_default().trim().to_string();
        let scale = match parts.next() {
            Some(x) => x.trim().parse::<f64>().map_err(|_| {
                ApiError::InvalidAdapterScale(format!("<lora:{name}:{x}>: the scale is not a number"))
            })?,
            None => 1.0,
        };
        found.push((name, scale));
        s = &tail[end + 1..];
    }
    rest.push_str(s);
    if found.len() > 1 {
        return Err(ApiError::InvalidAdapter(
            "one <lora:...> per request: adapters are applied one at a time".into(),
        ));
    }
    Ok((rest.split_whitespace().collect::<Vec<_>>().join(" "), found.pop()))
}

/// An A1111 sampler name ("Euler a") or one of ours ("euler_a").
fn scheduler(name: Option<&str>) -> Option<String> {
    let name = name?.trim();
    Some(
        SchedulerKind::ALL
            .iter()
            .find(|k| k.a1111_name().eq_ignore_ascii_case(name))
            .map(|k| k.name().to_string())
            .unwrap_or_else(|| name.to_string()),
    )
}

/// What both routes share: model, LoRA, seed and image count.
struct Common {
    prompt: String,
    model: Option<String>,
    adapter: Option<(String, f64)>,
    seed: Option<u64>,
    num_images: Option<i64>,
    scheduler: Option<String>,
}

fn common(r: &A1111Request) -> Result<Common, ApiError> {
    let (prompt, adapter) = take_lora(&r.prompt)?;
    let model = r
        .override_settings
        .as_ref()
        .and_then(|o| o.get("sd_model_checkpoint"))
        .and_then(Value::as_str)
        .map(String::from);
    let n = match (r.batch_size, r.n_iter) {
        (None, None) => None,
        (b, i) => Some(b.unwrap_or(1).max(1) * i.unwrap_or(1).max(1)),
    };
    Ok(Common {
        prompt,
        model,
        adapter,
        seed: r.seed.filter(|s| *s >= 0).map(|s| s as u64),
        num_images: n,
        scheduler: scheduler(r.sampler_name.as_deref().or(r.sampler_index.as_deref())),
    })
}

fn answer(req: Value, pngs: Vec<Vec<u8>>, seeds: &[u64], params: &super::types::Parameters) -> Response {
    let b64 = base64::engine::general_purpose::STANDARD;
    let info = json!({
        "prompt": params.prompt,
        "all_prompts": vec![&params.prompt; seeds.len()],
        "negative_prompt": params.negative_prompt.clone().unwrap_or_default(),
        "seed": seeds.first(),
        "all_seeds": seeds,
        "width": params.width,
        "height": params.height,
        "steps": params.steps,
        "cfg_scale": params.guidance_scale,
        "sampler_name": params.scheduler,
        "sd_model_name": params.model,
        "denoising_strength": params.strength,
        "image_cfg_scale": params.image_guidance_scale,
    });
    Json(json!({
        "images": pngs.iter().map(|p| b64.encode(p)).collect::<Vec<_>>(),
        "parameters": req,
        "info": info.to_string(),
    }))
    .into_response()
}

/// POST /sdapi/v1/txt2img
pub async fn txt2img(
    State(app): State<AppState>,
    Extension(caller): Extension<Caller>,
    RequestId(id): RequestId,
    body: Result<Json<Value>, JsonRejection>,
) -> Result<Response, ApiError> {
    let arrived = Instant::now();
    let Json(raw) = body?;
    let r: A1111Request =
        serde_json::from_value(raw.clone()).map_err(|e| ApiError::InvalidRequest(e.to_string()))?;
    let c = common(&r)?;
    let ours = GenerateRequest {
        prompt: c.prompt,
        negative_prompt: r.negative_prompt,
        model: c.model,
        adapter: c.adapter.as_ref().map(|a| a.0.clone()),
        adapter_scale: c.adapter.as_ref().map(|a| a.1),
        width: r.width,
        height: r.height,
        steps: r.steps,
        guidance_scale: r.cfg_scale,
        scheduler: c.scheduler,
        seed: c.seed,
        num_images: c.num_images,
        output_format: None,
        output_quality: None,
    };
    let (worker, task, params) = generate_task(&app, ours)?;
    let mut tracked = track(&app, &caller, &id, worker)?;
    let done = compute(&mut tracked, worker, task, &params, arrived).await?;
    Ok(answer(raw, done.files, &done.seeds, &params))
}

/// POST /sdapi/v1/img2img (InstructPix2Pix models edit; others run img2img)
pub async fn img2img(
    State(app): State<AppState>,
    Extension(caller): Extension<Caller>,
    RequestId(id): RequestId,
    body: Result<Json<Value>, JsonRejection>,
) -> Result<Response, ApiError> {
    let arrived = Instant::now();
    let Json(raw) = body?;
    let r: A1111Request =
        serde_json::from_value(raw.clone()).map_err(|e| ApiError::InvalidRequest(e.to_string()))?;
    if r.mask.is_some() {
        return Err(ApiError::InvalidRequest(
            "mask is not supported: this server edits whole images (InstructPix2Pix, img2img)".into(),
        ));
    }
    let image = match r.init_images.as_slice() {
        [one] => one.split_once(";base64,").map_or(one.as_str(), |(_, b)| b).to_string(),
        [] => return Err(ApiError::InvalidRequest("init_images needs one image".into())),
        _ => return Err(ApiError::InvalidRequest("one image in init_images per request".into())),
    };
    let c = common(&r)?;
    let ours = EditRequest {
        image: String::new(),
        prompt: c.prompt,
        mode: None,
        image_guidance_scale: r.image_cfg_scale,
        strength: r.denoising_strength,
        negative_prompt: r.negative_prompt,
        model: c.model,
        adapter: c.adapter.as_ref().map(|a| a.0.clone()),
        adapter_scale: c.adapter.as_ref().map(|a| a.1),
        width: r.width,
        height: r.height,
        steps: r.steps,
        guidance_scale: r.cfg_scale,
        scheduler: c.scheduler,
        seed: c.seed,
        num_images: c.num_images,
        output_format: None,
        output_quality: None,
    };
    let bytes = super::images::decode_base64(&image)?;
    let (worker, task, params) = edit_task(&app, ours, bytes).await?;
    let mut tracked = track(&app, &caller, &id, worker)?;
    let done = compute(&mut tracked, worker, task, &params, arrived).await?;
    Ok(answer(raw, done.files, &done.seeds, &params))
}

/// GET /sdapi/v1/progress: the caller's current generation in A1111's shape (the one
/// denoising, else the oldest queued), with `state.job_count` its generations in flight.
/// No preview image is rendered (`current_image` is null).
pub async fn progress(
    State(app): State<AppState>,
    Extension(caller): Extension<Caller>,
) -> Json<Value> {
    let all = app.generations.list(&caller);
    let current = all
        .iter()
        .find(|g| g.stage == "denoising")
        .or_else(|| all.first());
    let (progress, eta, step, steps, job) = match current {
        Some(g) => (
            g.progress,
            g.eta_s.unwrap_or(0.0),
            g.step,
            g.steps,
            g.id.clone(),
        ),
        None => (0.0, 0.0, 0, 0, String::new()),
    };
    Json(json!({
        "progress": progress,
        "eta_relative": eta,
        "state": {
            "skipped": false,
            "interrupted": false,
            "stopping_generation": false,
            "job": job,
            "job_count": all.len(),
            "job_timestamp": "0",
            "job_no": 0,
            "sampling_step": step,
            "sampling_steps": steps,
        },
        "current_image": Value::Null,
        "textinfo": Value::Null,
    }))
}

/// POST /sdapi/v1/interrupt: cancels every generation of the caller.
pub async fn interrupt(
    State(app): State<AppState>,
    Extension(caller): Extension<Caller>,
) -> Json<Value> {
    let n = app.generations.cancel_all(&caller);
    tracing::info!(cancelled = n, "A1111 interrupt");
    Json(json!({}))
}

/// GET /sdapi/v1/samplers
pub async fn samplers() -> Json<Value> {
    Json(Value::Array(
        SchedulerKind::ALL
            .iter()
            .map(|k| json!({"name": k.a1111_name(), "aliases": [k.name()], "options": {}}))
            .collect(),
    ))
}

/// GET /sdapi/v1/sd-models
pub async fn sd_models(State(app): State<AppState>) -> Json<Value> {
    Json(Value::Array(
        app.pool
            .models()
            .into_iter()
            .map(|w| {
                json!({"title": w.name(), "model_name": w.name(), "hash": null, "sha256": null,
                       "filename": w.source(), "config": null})
            })
            .collect(),
    ))
}

/// GET /sdapi/v1/loras
pub async fn loras(State(app): State<AppState>) -> Json<Value> {
    let dir = app.config.adapters();
    let names = dir.names();
    Json(Value::Array(
        names
            .into_iter()
            .map(|n| {
                let path = dir.weights(&n).display().to_string();
                json!({"name": n, "alias": n, "path": path, "metadata": {}})
            })
            .collect(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lora_tags_become_the_adapter() {
        let (p, a) = take_lora("a red circle <lora:centred:0.7>, sharp").unwrap();
        assert_eq!(p, "a red circle , sharp");
        assert_eq!(a, Some(("centred".into(), 0.7)));
        assert_eq!(take_lora("plain").unwrap(), ("plain".into(), None));
        assert!(take_lora("<lora:a:1> <lora:b:1>").is_err());
        assert!(take_lora("<lora:a:x>").is_err());
        assert_eq!(scheduler(Some("Euler a")), Some("euler_a".into()));
        assert_eq!(scheduler(Some("DPM++ 2M Karras")), Some("dpmpp_2m_karras".into()));
    }
}
