//! open_clip's key names as transformers' CLIP names, so one CLIP implementation reads both:
//! SD 2.x's and SDXL's second text encoder in single-file checkpoints, and open_clip reward
//! models (HPSv2's ViT-H-14). open_clip joins q/k/v into `in_proj_weight`, keeps projections
//! as `[width, embed]` matrices used as `x @ proj` (transformers: Linear weights `[embed,
//! width]`), and names blocks `resblocks.N.{ln_1, attn, ln_2, mlp.c_fc, mlp.c_proj}`.

use super::Result;
use candle_core::Tensor;
use std::collections::HashMap;

/// One transformer block's tensor (`rest` after `resblocks.N.`) under `layer` in transformers'
/// names; the joined q/k/v are split.
fn block(layer: &str, rest: &[&str], t: Tensor, out: &mut HashMap<String, Tensor>) -> Result<()> {
    let mut put = |k: String, v: Tensor| {
        out.insert(k, v);
    };
    match rest {
        ["ln_1", w] => put(format!("{layer}.layer_norm1.{w}"), t),
        ["ln_2", w] => put(format!("{layer}.layer_norm2.{w}"), t),
        ["mlp", "c_fc", w] => put(format!("{layer}.mlp.fc1.{w}"), t),
        ["mlp", "c_proj", w] => put(format!("{layer}.mlp.fc2.{w}"), t),
        ["attn", "out_proj", w] => put(format!("{layer}.self_attn.out_proj.{w}"), t),
        ["attn", joined @ ("in_proj_weight" | "in_proj_bias")] => {
            let what = if *joined == "in_proj_weight" { "weight" } else { "bias" };
            let h = t.dim(0)? / 3;
            for (j, x) in ["q", "k", "v"].into_iter().enumerate() {
                put(
                    format!("{layer}.self_attn.{x}_proj.{what}"),
                    t.narrow(0, j * h, h)?.contiguous()?,
                );
            }
        }
        _ => {}
    }
    Ok(())
}

/// open_clip's text tower (key after its prefix) as CLIPTextModelWithProjection tensors.
pub fn text_tower(key: &str, t: Tensor, out: &mut HashMap<String, Tensor>) -> Result<()> {
    let p: Vec<&str> = key.split('.').collect();
    match p.as_slice() {
        ["token_embedding", "weight"] => {
            out.insert("text_model.embeddings.token_embedding.weight".into(), t);
        }
        ["positional_embedding"] => {
            out.insert("text_model.embeddings.position_embedding.weight".into(), t);
        }
        ["ln_final", w] => {
            out.insert(format!("text_model.final_layer_norm.{w}"), t);
        }
        ["text_projection"] => {
            out.insert("text_projection.weight".into(), t.t()?.contiguous()?);
        }
        ["transformer", "resblocks", i, rest @ ..] => {
            block(&format!("text_model.encoder.layers.{i}"), rest, t, out)?
        }
        _ => {}
    }
    Ok(())
}

/// open_clip's vision tower (key after `visual.`) as CLIPVisionModelWithProjection tensors.
pub fn vision_tower(key: &str, t: Tensor, out: &mut HashMap<String, Tensor>) -> Result<()> {
    let p: Vec<&str> = key.split('.').collect();
    let mut put = |k: &str, v: Tensor| {
        out.insert(k.to_string(), v);
    };
    match p.as_slice() {
        ["conv1", "weight"] => put("vision_model.embeddings.patch_embedding.weight", t),
        ["class_embedding"] => put("vision_model.embeddings.class_embedding", t),
        ["positional_embedding"] => put("vision_model.embeddings.position_embedding.weight", t),
        ["ln_pre", w] => put(&format!("vision_model.pre_layrnorm.{w}"), t),
        ["ln_post", w] => put(&format!("vision_model.post_layernorm.{w}"), t),
        ["proj"] => put("visual_projection.weight", t.t()?.contiguous()?),
        ["transformer", "resblocks", i, rest @ ..] => {
            block(&format!("vision_model.encoder.layers.{i}"), rest, t, out)?
        }
        _ => {}
    }
    Ok(())
}
