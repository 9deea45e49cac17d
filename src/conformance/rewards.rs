//! The reward-model cases (tests/fixtures/rewards, see its README): CLIP preprocessing in its
//! three forms, CLIP embeddings in transformers' and open_clip's layouts, and each reward's
//! score computed end to end from raw images and prompts.

use super::Case;
use crate::models::clip_model::ClipModel;
use crate::models::image_processor::{CropRounding, ImageProcessor};
use crate::models::rewards::{RewardKind, RewardModel};
use anyhow::{anyhow, bail, Result};
use candle_core::{DType, Device, Tensor};
use std::collections::HashMap;

pub const KINDS: [&str; 3] = ["clip_preprocess", "clip_embed", "reward"];

/// `[H, W, 3]` uint8 tensors (or `[N, H, W, 3]`) as images.
fn images(t: &Tensor) -> Result<Vec<image::RgbImage>> {
    let t = if t.rank() == 3 { t.unsqueeze(0)? } else { t.clone() };
    let (n, h, w, c) = t.dims4()?;
    if c != 3 {
        bail!("images must be [N, H, W, 3], got {:?}", t.dims());
    }
    (0..n)
        .map(|i| {
            let raw: Vec<u8> = t.get(i)?.to_dtype(DType::U8)?.flatten_all()?.to_vec1()?;
            image::RgbImage::from_raw(w as u32, h as u32, raw).ok_or_else(|| anyhow!("bad image size"))
        })
        .collect()
}

fn prompts(case: &Case) -> Result<Vec<String>> {
    case.params
        .get("prompts")
        .and_then(|p| p.as_array())
        .ok_or_else(|| anyhow!("param prompts missing"))?
        .iter()
        .map(|p| p.as_str().map(String::from).ok_or_else(|| anyhow!("prompts must be strings")))
        .collect()
}

pub fn run(case: &Case, device: &Device) -> Result<HashMap<String, Tensor>> {
    let dir = case.model.clone().ok_or_else(|| anyhow!("case names no model"))?;
    let mut out = HashMap::new();
    match case.kind.as_str() {
        "clip_preprocess" => {
            let processor = match case.param_str("transform").as_deref() {
                // open_clip's standard eval transform, described by the case itself.
                Some("open_clip_eval") => {
                    let mut p = ImageProcessor::from_json(&serde_json::json!({
                        "size": {"shortest_edge": case.param_usize("image_size")?},
                        "crop_size": case.param_usize("image_size")?,
                        "image_mean": case.params["image_mean"],
                        "image_std": case.params["image_std"],
                    }))
                    .map_err(|e| anyhow!(e))?;
                    p.crop_rounding = CropRounding::Round;
                    p
                }
                _ => ImageProcessor::load(&dir)?,
            };
            let img = images(&case.input("image")?)?.remove(0);
            out.insert("pixel_values".into(), processor.preprocess(&img, device)?);
        }
        "clip_embed" => {
            let m = ClipModel::load(&dir, device, DType::F32)?;
            let px = case.input("pixel_values")?.to_dtype(DType::F32)?.to_device(device)?;
            let ids = case.input("input_ids")?.to_dtype(DType::U32)?.to_device(device)?;
            out.insert("image_embeds".into(), m.image_embeds(&px)?);
            out.insert("text_embeds".into(), m.text_embeds(&ids)?);
            out.insert("logit_scale".into(), Tensor::new(&[m.logit_scale as f32], device)?);
        }
        "reward" => {
            let name = case.param_str("reward").ok_or_else(|| anyhow!("param reward missing"))?;
            let kind = RewardKind::parse(&name).ok_or_else(|| anyhow!("unknown reward {name}"))?;
            let model = RewardModel::load(kind, &dir, device)?;
            let prompts = prompts(case)?;
            let refs: Vec<&str> = prompts.iter().map(String::as_str).collect();
            let scores = model.score(&images(&case.input("images")?)?, &refs)?;
            out.insert("scores".into(), Tensor::new(scores.as_slice(), device)?);
        }
        other => bail!("not a reward case kind: {other}"),
    }
    Ok(out)
}
