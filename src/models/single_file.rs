//! Single-file checkpoints: one `.safetensors` holding the UNet, VAE and text encoder(s) in
//! the original layout (CompVis/LDM for SD 1.x/2.x and InstructPix2Pix, Stability's SGM for
//! SDXL), as AUTOMATIC1111 and civitai distribute them. Keys are renamed to diffusers' layout at
//! load, as diffusers' `from_single_file` does; the configuration and tokenizers come from a
//! diffusers-layout directory or hub repository of the same architecture (`from_single_file`'s
//! `config=`), by default the reference repository of the detected family.
//!
//! Renaming, UNet (`model.diffusion_model.`): `input_blocks.0.0` is conv_in; input block
//! `i >= 1` is level `(i-1) / (L+1)`, place `(i-1) % (L+1)` (L = layers_per_block), its `.0` a
//! resnet (or `.0.op`, the level's downsampler) and `.1` the attention; `middle_block.{0,1,2}`
//! is resnet, attention, resnet; output block `i` is level `i / (L+1)`, place `i % (L+1)`, with
//! its upsampler as the last `.conv` child; resnets rename `in_layers.{0,2}`, `emb_layers.1`,
//! `out_layers.{0,3}`, `skip_connection`. VAE (`first_stage_model.`): `down.i.block.j`,
//! `up.i.block.j` (levels numbered from the bottom), `mid.block_{1,2}`, `mid.attn_1` whose
//! q/k/v/proj_out are 1x1 convolutions. Text encoders: transformers' layout under
//! `cond_stage_model.transformer.` / `conditioner.embedders.0.transformer.`, or open_clip's
//! under `cond_stage_model.model.` / `conditioner.embedders.1.model.` (joined q/k/v
//! `in_proj_weight`, a transposed `text_projection`).

use super::{ModelError, Result};
use candle_core::safetensors::MmapedSafetensors;
use candle_core::{Device, Tensor};
use std::collections::HashMap;
use std::path::Path;

/// Which original layout a checkpoint is in, from its keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    /// SD 1.x: transformers' CLIP text encoder.
    Sd1,
    /// SD 2.x: open_clip's text tower.
    Sd2,
    /// SDXL: both.
    Sdxl,
}

impl Family {
    /// The diffusers repository whose configuration `from_single_file` uses for this family;
    /// `instruct_pix2pix` when the UNet reads 8 channels.
    pub fn reference_repo(self, unet_in_channels: usize) -> &'static str {
        match self {
            Family::Sd1 if unet_in_channels == 8 => "timbrooks/instruct-pix2pix",
            Family::Sd1 => "stable-diffusion-v1-5/stable-diffusion-v1-5",
            Family::Sd2 => "stabilityai/stable-diffusion-2-1",
            Family::Sdxl => "stabilityai/stable-diffusion-xl-base-1.0",
        }
    }
}

/// A checkpoint's tensors as diffusers names them, by component.
#[derive(Default)]
pub struct Components {
    pub unet: HashMap<String, Tensor>,
    pub vae: HashMap<String, Tensor>,
    pub text_encoder: HashMap<String, Tensor>,
    pub text_encoder_2: HashMap<String, Tensor>,
}

fn bad(path: &Path, msg: impl Into<String>) -> ModelError {
    ModelError::Corrupt(path.display().to_string(), msg.into())
}

fn open(path: &Path) -> Result<MmapedSafetensors> {
    if !path.exists() {
        return Err(ModelError::MissingFile(path.to_path_buf()));
    }
    // Safety: the file is memory-mapped read-only and not written while mapped.
    unsafe { MmapedSafetensors::new(path) }.map_err(|e| bad(path, e.to_string()))
}

/// The family and the UNet's input channels of a checkpoint, from its header alone.
pub fn inspect(path: &Path) -> Result<(Family, usize)> {
    let st = open(path)?;
    let names: Vec<String> = st.tensors().into_iter().map(|(n, _)| n).collect();
    let family = detect(&names).ok_or_else(|| {
        bad(
            path,
            "not a Stable Diffusion single-file checkpoint: no text encoder under \
             cond_stage_model. or conditioner.embedders.",
        )
    })?;
    let conv_in = st
        .get("model.diffusion_model.input_blocks.0.0.weight")
        .map_err(|_| bad(path, "no UNet (model.diffusion_model.input_blocks.0.0.weight)"))?;
    let in_channels = conv_in.shape().get(1).copied().unwrap_or(0);
    Ok((family, in_channels))
}

fn detect(names: &[String]) -> Option<Family> {
    if names.iter().any(|n| n.starts_with("conditioner.embedders.")) {
        Some(Family::Sdxl)
    } else if names.iter().any(|n| n.starts_with("cond_stage_model.model.")) {
        Some(Family::Sd2)
    } else if names.iter().any(|n| n.starts_with("cond_stage_model.transformer.")) {
        Some(Family::Sd1)
    } else {
        None
    }
}

fn resnet(rest: &[&str]) -> Option<String> {
    let (head, tail) = match rest {
        ["in_layers", "0", t @ ..] => ("norm1", t),
        ["in_layers", "2", t @ ..] => ("conv1", t),
        ["emb_layers", "1", t @ ..] => ("time_emb_proj", t),
        ["out_layers", "0", t @ ..] => ("norm2", t),
        ["out_layers", "3", t @ ..] => ("conv2", t),
        ["skip_connection", t @ ..] => ("conv_shortcut", t),
        _ => return None,
    };
    Some(join(head, tail))
}

fn join(head: &str, tail: &[&str]) -> String {
    std::iter::once(head)
        .chain(tail.iter().copied())
        .collect::<Vec<_>>()
        .join(".")
}

/// A UNet key (after `model.diffusion_model.`) in diffusers' layout; None for keys diffusers
/// has no place for.
pub fn unet_name(key: &str, layers_per_block: usize) -> Option<String> {
    let p: Vec<&str> = key.split('.').collect();
    let per_level = layers_per_block + 1;
    let num = |s: &str| s.parse::<usize>().ok();
    Some(match p.as_slice() {
        ["time_embed", "0", t @ ..] => join("time_embedding.linear_1", t),
        ["time_embed", "2", t @ ..] => join("time_embedding.linear_2", t),
        ["label_emb", "0", "0", t @ ..] => join("add_embedding.linear_1", t),
        ["label_emb", "0", "2", t @ ..] => join("add_embedding.linear_2", t),
        ["input_blocks", "0", "0", t @ ..] => join("conv_in", t),
        ["out", "0", t @ ..] => join("conv_norm_out", t),
        ["out", "2", t @ ..] => join("conv_out", t),
        ["input_blocks", i, part, rest @ ..] => {
            let i = num(i)?.checked_sub(1)?;
            let (level, place) = (i / per_level, i % per_level);
            match (*part, rest) {
                ("0", ["op", t @ ..]) if place == layers_per_block => {
                    join(&format!("down_blocks.{level}.downsamplers.0.conv"), t)
                }
                ("0", r) => format!("down_blocks.{level}.resnets.{place}.{}", resnet(r)?),
                ("1", t) => join(&format!("down_blocks.{level}.attentions.{place}"), t),
                _ => return None,
            }
        }
        ["middle_block", "0", r @ ..] => format!("mid_block.resnets.0.{}", resnet(r)?),
        ["middle_block", "2", r @ ..] => format!("mid_block.resnets.1.{}", resnet(r)?),
        ["middle_block", "1", t @ ..] => join("mid_block.attentions.0", t),
        ["output_blocks", i, part, rest @ ..] => {
            let i = num(i)?;
            let (level, place) = (i / per_level, i % per_level);
            match (*part, rest) {
                ("0", r) => format!("up_blocks.{level}.resnets.{place}.{}", resnet(r)?),
                ("1" | "2", ["conv", t @ ..]) => {
                    join(&format!("up_blocks.{level}.upsamplers.0.conv"), t)
                }
                ("1", t) => join(&format!("up_blocks.{level}.attentions.{place}"), t),
                _ => return None,
            }
        }
        _ => return None,
    })
}

/// A VAE key (after `first_stage_model.`) in diffusers' layout, and whether its tensor is a 1x1
/// convolution that diffusers holds as a Linear.
pub fn vae_name(key: &str, levels: usize) -> Option<(String, bool)> {
    let p: Vec<&str> = key.split('.').collect();
    let num = |s: &str| s.parse::<usize>().ok();
    let vres = |r: &[&str]| match r {
        ["nin_shortcut", t @ ..] => join("conv_shortcut", t),
        t => t.join("."),
    };
    Some(match p.as_slice() {
        ["quant_conv" | "post_quant_conv", ..] => (key.to_string(), false),
        [side @ ("encoder" | "decoder"), rest @ ..] => {
            let name = match rest {
                ["conv_in" | "conv_out", ..] => rest.join("."),
                ["norm_out", t @ ..] => join("conv_norm_out", t),
                ["mid", "block_1", r @ ..] => format!("mid_block.resnets.0.{}", vres(r)),
                ["mid", "block_2", r @ ..] => format!("mid_block.resnets.1.{}", vres(r)),
                ["mid", "attn_1", which, t @ ..] => {
                    let to = match *which {
                        "norm" => "group_norm",
                        "q" => "to_q",
                        "k" => "to_k",
                        "v" => "to_v",
                        "proj_out" => "to_out.0",
                        _ => return None,
                    };
                    let linear = *which != "norm" && t == ["weight"];
                    return Some((format!("{side}.{}", join(&format!("mid_block.attentions.0.{to}"), t)), linear));
                }
                ["down", i, "block", j, r @ ..] => {
                    format!("down_blocks.{}.resnets.{j}.{}", num(i)?, vres(r))
                }
                ["down", i, "downsample", "conv", t @ ..] => {
                    join(&format!("down_blocks.{}.downsamplers.0.conv", num(i)?), t)
                }
                ["up", i, "block", j, r @ ..] => {
                    let level = levels.checked_sub(1 + num(i)?)?;
                    format!("up_blocks.{level}.resnets.{j}.{}", vres(r))
                }
                ["up", i, "upsample", "conv", t @ ..] => {
                    let level = levels.checked_sub(1 + num(i)?)?;
                    join(&format!("up_blocks.{level}.upsamplers.0.conv"), t)
                }
                _ => return None,
            };
            (format!("{side}.{name}"), false)
        }
        _ => return None,
    })
}

/// Reads a checkpoint's tensors onto `device`, renamed to diffusers' layout. `layers_per_block`
/// (UNet) and `vae_levels` (VAE block count) come from the configuration. Keys outside the
/// four components (EMA copies, a CLIP vision tower, ...) are skipped.
pub fn load(
    path: &Path,
    layers_per_block: usize,
    vae_levels: usize,
    device: &Device,
) -> Result<Components> {
    let st = open(path)?;
    let mut c = Components::default();
    let mut unplaced = Vec::new();
    for (name, _) in st.tensors() {
        let load = || -> Result<Tensor> {
            st.load(&name, device).map_err(|e| bad(path, format!("{name}: {e}")))
        };
        if let Some(k) = name.strip_prefix("model.diffusion_model.") {
            match unet_name(k, layers_per_block) {
                Some(n) => {
                    c.unet.insert(n, load()?);
                }
                None => unplaced.push(name.clone()),
            }
        } else if let Some(k) = name.strip_prefix("first_stage_model.") {
            match vae_name(k, vae_levels) {
                Some((n, linear)) => {
                    let t = load()?;
                    let t = if linear && t.rank() == 4 {
                        let (o, i) = (t.dim(0)?, t.dim(1)?);
                        t.reshape((o, i))?
                    } else {
                        t
                    };
                    c.vae.insert(n, t);
                }
                None => unplaced.push(name.clone()),
            }
        } else if let Some(k) = name
            .strip_prefix("cond_stage_model.transformer.")
            .or_else(|| name.strip_prefix("conditioner.embedders.0.transformer."))
        {
            // Early SD 1.x files omit transformers' `text_model.` level.
            let k = if k.starts_with("text_model.") || k.starts_with("text_projection") {
                k.to_string()
            } else {
                format!("text_model.{k}")
            };
            c.text_encoder.insert(k, load()?);
        } else if let Some(k) = name.strip_prefix("cond_stage_model.model.") {
            super::open_clip::text_tower(k, load()?, &mut c.text_encoder)?;
        } else if let Some(k) = name.strip_prefix("conditioner.embedders.1.model.") {
            super::open_clip::text_tower(k, load()?, &mut c.text_encoder_2)?;
        }
    }
    if !unplaced.is_empty() {
        unplaced.sort();
        return Err(bad(
            path,
            format!(
                "{} UNet/VAE tensors have no place in a {layers_per_block}-layers-per-block \
                 diffusers layout (is the configuration of the right model?), e.g. {}",
                unplaced.len(),
                unplaced[0]
            ),
        ));
    }
    Ok(c)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unet_names_follow_the_block_arithmetic() {
        let n = |k| unet_name(k, 2);
        assert_eq!(n("input_blocks.0.0.weight").unwrap(), "conv_in.weight");
        assert_eq!(
            n("input_blocks.1.0.in_layers.2.weight").unwrap(),
            "down_blocks.0.resnets.0.conv1.weight"
        );
        assert_eq!(
            n("input_blocks.2.1.transformer_blocks.0.attn1.to_q.weight").unwrap(),
            "down_blocks.0.attentions.1.transformer_blocks.0.attn1.to_q.weight"
        );
        assert_eq!(
            n("input_blocks.3.0.op.weight").unwrap(),
            "down_blocks.0.downsamplers.0.conv.weight"
        );
        assert_eq!(
            n("input_blocks.4.0.skip_connection.bias").unwrap(),
            "down_blocks.1.resnets.0.conv_shortcut.bias"
        );
        assert_eq!(n("middle_block.2.out_layers.3.weight").unwrap(), "mid_block.resnets.1.conv2.weight");
        assert_eq!(n("output_blocks.2.1.conv.weight").unwrap(), "up_blocks.0.upsamplers.0.conv.weight");
        assert_eq!(n("output_blocks.5.2.conv.bias").unwrap(), "up_blocks.1.upsamplers.0.conv.bias");
        assert_eq!(
            n("output_blocks.5.1.proj_in.weight").unwrap(),
            "up_blocks.1.attentions.2.proj_in.weight"
        );
        assert_eq!(n("label_emb.0.2.weight").unwrap(), "add_embedding.linear_2.weight");
        assert_eq!(n("input_blocks.1.0.op.weight"), None, "only a level's last place downsamples");
    }

    #[test]
    fn vae_levels_count_from_the_bottom_in_the_decoder() {
        assert_eq!(
            vae_name("decoder.up.0.block.1.nin_shortcut.weight", 4).unwrap(),
            ("decoder.up_blocks.3.resnets.1.conv_shortcut.weight".into(), false)
        );
        assert_eq!(
            vae_name("encoder.down.2.downsample.conv.bias", 4).unwrap(),
            ("encoder.down_blocks.2.downsamplers.0.conv.bias".into(), false)
        );
        assert_eq!(
            vae_name("encoder.mid.attn_1.proj_out.weight", 4).unwrap(),
            ("encoder.mid_block.attentions.0.to_out.0.weight".into(), true)
        );
        assert_eq!(
            vae_name("decoder.mid.attn_1.norm.weight", 4).unwrap(),
            ("decoder.mid_block.attentions.0.group_norm.weight".into(), false)
        );
    }
}
