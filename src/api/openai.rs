//! OpenAI-compatible image routes, so code written for OpenAI's Images API (its SDKs too) runs
//! against this server: POST /v1/images/generations (JSON) and POST /v1/images/edits
//! (multipart). Requests become the same validated tasks as /generate and /edit; the answer is
//! OpenAI's `{"created", "data": [{"b64_json"} | {"url"}], "output_format"}` (png, or jpeg/webp
//! when `output_format` asks, with `output_compression` as JPEG quality). Errors keep this server's envelope,
//! whose `error.message` OpenAI's clients read.
//!
//! `model` names a served model (default: the first); OpenAI's own model names are not served
//! and get 404. `size` is `WxH` or `auto` (the model's native size). `response_format` `url` is
//! answered with `data:` URLs (nothing is hosted). Options with no counterpart here (quality,
//! style, background, user, ...) are accepted and ignored, as OpenAI ignores those of other
//! models; `mask` is refused, since masked inpainting is not served.

use super::auth::Caller;
use super::error::ApiError;
use super::handlers::{compute, edit_task, generate_task, track, Computed, RequestId};
use super::types::{EditRequest, GenerateRequest};
use super::AppState;
use axum::extract::rejection::JsonRejection;
use axum::extract::{Multipart, State};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use base64::Engine;
use serde::Deserialize;
use std::time::Instant;

#[derive(Debug, Deserialize)]
pub struct GenerationsRequest {
    prompt: String,
    #[serde(default)]
    model: Option<String>,
    #[serde(default)]
    n: Option<i64>,
    #[serde(default)]
    size: Option<String>,
    #[serde(default)]
    response_format: Option<String>,
    /// png, jpeg or webp (gpt-image models' option).
    #[serde(default)]
    output_format: Option<String>,
    /// JPEG quality 0-100 (gpt-image models' option).
    #[serde(default)]
    output_compression: Option<i64>,
    /// OpenAI options without a counterpart (quality, style, user, ...): accepted, ignored.
    #[serde(flatten)]
    _other: serde_json::Map<String, serde_json::Value>,
}

/// `WxH` into (width, height); `auto` or nothing: the model's native size.
fn parse_size(size: Option<&str>) -> Result<(Option<i64>, Option<i64>), ApiError> {
    match size.map(str::trim) {
        None | Some("auto") | Some("") => Ok((None, None)),
        Some(s) => {
            let bad = || ApiError::InvalidSize(format!("size '{s}': use WIDTHxHEIGHT, e.g. 512x512, or auto"));
            let (w, h) = s.split_once(['x', 'X']).ok_or_else(bad)?;
            Ok((
                Some(w.trim().parse().map_err(|_| bad())?),
                Some(h.trim().parse().map_err(|_| bad())?),
            ))
        }
    }
}

/// Whether images go back as `url` (data: URLs) rather than `b64_json`.
fn wants_url(format: Option<&str>) -> Result<bool, ApiError> {
    match format {
        None | Some("b64_json") => Ok(false),
        Some("url") => Ok(true),
        Some(other) => Err(ApiError::InvalidRequest(format!(
            "response_format '{other}': use b64_json or url"
        ))),
    }
}

fn answer(done: Computed, url: bool, prompt: &str) -> Response {
    let b64 = base64::engine::general_purpose::STANDARD;
    let created = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let mime = done.format.mime();
    let data: Vec<serde_json::Value> = done
        .files
        .iter()
        .map(|file| {
            let encoded = b64.encode(file);
            if url {
                serde_json::json!({"url": format!("data:{mime};base64,{encoded}"), "revised_prompt": prompt})
            } else {
                serde_json::json!({"b64_json": encoded, "revised_prompt": prompt})
            }
        })
        .collect();
    Json(serde_json::json!({"created": created, "data": data, "output_format": done.format.name()}))
        .into_response()
}

/// POST /v1/images/generations
pub async fn generations(
    State(app): State<AppState>,
    Extension(caller): Extension<Caller>,
    RequestId(id): RequestId,
    body: Result<Json<GenerationsRequest>, JsonRejection>,
) -> Result<Response, ApiError> {
    let arrived = Instant::now();
    let Json(req) = body?;
    let url = wants_url(req.response_format.as_deref())?;
    let (width, height) = parse_size(req.size.as_deref())?;
    let prompt = req.prompt.clone();
    let ours = GenerateRequest {
        prompt: req.prompt,
        negative_prompt: None,
        model: req.model,
        adapter: None,
        adapter_scale: None,
        width,
        height,
        steps: None,
        guidance_scale: None,
        scheduler: None,
        seed: None,
        num_images: req.n,
        output_format: req.output_format,
        output_quality: req.output_compression,
    };
    let (worker, task, params) = generate_task(&app, ours)?;
    let mut tracked = track(&app, &caller, &id, worker)?;
    let done = compute(&mut tracked, worker, task, &params, arrived).await?;
    Ok(answer(done, url, &prompt))
}

/// POST /v1/images/edits (multipart: `image` or `image[]`, `prompt`, `model`, `n`, `size`,
/// `response_format`).
pub async fn edits(
    State(app): State<AppState>,
    Extension(caller): Extension<Caller>,
    RequestId(id): RequestId,
    form: Result<Multipart, axum::extract::multipart::MultipartRejection>,
) -> Result<Response, ApiError> {
    let arrived = Instant::now();
    let mut form = form.map_err(|e| ApiError::MalformedMultipart(e.body_text()))?;
    let mut image = None;
    let mut text = std::collections::HashMap::new();
    while let Some(field) = form
        .next_field()
        .await
        .map_err(|e| ApiError::MalformedMultipart(e.body_text()))?
    {
        let name = field.name().unwrap_or_default().to_string();
        let bytes = field
            .bytes()
            .await
            .map_err(|e| ApiError::MalformedMultipart(e.body_text()))?;
        match name.as_str() {
            "image" | "image[]" if image.is_none() => image = Some(bytes.to_vec()),
            "image" | "image[]" => {
                return Err(ApiError::InvalidRequest("one input image per edit".into()))
            }
            "mask" => {
                return Err(ApiError::InvalidRequest(
                    "mask is not supported: this server edits whole images (InstructPix2Pix, img2img)".into(),
                ))
            }
            _ => {
                text.insert(name, String::from_utf8_lossy(&bytes).into_owned());
            }
        }
    }
    let image = image.ok_or_else(|| ApiError::InvalidRequest("missing field `image` (a file part)".into()))?;
    let prompt = text
        .remove("prompt")
        .ok_or_else(|| ApiError::InvalidRequest("missing field `prompt`".into()))?;
    let url = wants_url(text.get("response_format").map(String::as_str))?;
    let (width, height) = parse_size(text.get("size").map(String::as_str))?;
    let n = match text.get("n") {
        Some(v) => Some(v.trim().parse::<i64>().map_err(|_| {
            ApiError::InvalidRequest(format!("field `n`: '{v}' is not a whole number"))
        })?),
        None => None,
    };
    let model = text.remove("model");
    let ours = EditRequest {
        image: String::new(),
        prompt: prompt.clone(),
        mode: None,
        image_guidance_scale: None,
        strength: None,
        negative_prompt: None,
        model,
        adapter: None,
        adapter_scale: None,
        width,
        height,
        steps: None,
        guidance_scale: None,
        scheduler: None,
        seed: None,
        num_images: n,
        output_format: text.remove("output_format"),
        output_quality: None,
    };
    let (worker, task, params) = edit_task(&app, ours, image).await?;
    let mut tracked = track(&app, &caller, &id, worker)?;
    let done = compute(&mut tracked, worker, task, &params, arrived).await?;
    Ok(answer(done, url, &prompt))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_formats() {
        assert_eq!(parse_size(Some("512x768")).unwrap(), (Some(512), Some(768)));
        assert_eq!(parse_size(Some("auto")).unwrap(), (None, None));
        assert!(parse_size(Some("big")).is_err());
        assert!(!wants_url(None).unwrap());
        assert!(wants_url(Some("url")).unwrap());
        assert!(wants_url(Some("png")).is_err());
    }
}
