//! `UNet2DConditionModel` config.json, with every field the SD1.x, SD2.x, SDXL and
//! InstructPix2Pix checkpoints use. Values that would change the architecture in ways we do
//! not implement are refused with the field's name.

use crate::models::{ModelError, Result};
use serde_json::Value;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DownBlockType {
    CrossAttn,
    Plain,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpBlockType {
    CrossAttn,
    Plain,
}

#[derive(Debug, Clone)]
pub struct UNetConfig {
    pub in_channels: usize,
    pub out_channels: usize,
    pub block_out_channels: Vec<usize>,
    pub down_block_types: Vec<DownBlockType>,
    pub up_block_types: Vec<UpBlockType>,
    pub layers_per_block: Vec<usize>,
    /// Heads per down block (diffusers' legacy `attention_head_dim` means heads).
    pub num_heads: Vec<usize>,
    pub cross_attention_dim: Vec<usize>,
    pub transformer_layers_per_block: Vec<usize>,
    pub reverse_transformer_layers_per_block: Option<Vec<Vec<usize>>>,
    pub norm_num_groups: usize,
    pub norm_eps: f64,
    pub use_linear_projection: bool,
    pub flip_sin_to_cos: bool,
    pub freq_shift: f64,
    pub downsample_padding: usize,
    pub mid_block_scale_factor: f64,
    pub upcast_attention: bool,
    /// SDXL: `text_time` added conditioning.
    pub addition_time_embed_dim: Option<usize>,
    pub projection_class_embeddings_input_dim: Option<usize>,
    pub sample_size: usize,
}

fn field<'a>(v: &'a Value, k: &str) -> Option<&'a Value> {
    v.get(k).filter(|x| !x.is_null())
}

fn bad(k: &str, v: &Value) -> ModelError {
    ModelError::Config(format!("unet config: {k} = {v} is not supported"))
}

fn usize_field(v: &Value, k: &str) -> Result<usize> {
    let x = field(v, k).ok_or_else(|| ModelError::Config(format!("unet config: missing {k}")))?;
    x.as_u64().map(|n| n as usize).ok_or_else(|| bad(k, x))
}

/// An int or a per-block list.
fn per_block(v: &Value, k: &str, n: usize) -> Result<Option<Vec<usize>>> {
    let Some(x) = field(v, k) else {
        return Ok(None);
    };
    if let Some(i) = x.as_u64() {
        return Ok(Some(vec![i as usize; n]));
    }
    let arr = x.as_array().ok_or_else(|| bad(k, x))?;
    let list: Option<Vec<usize>> = arr.iter().map(|e| e.as_u64().map(|i| i as usize)).collect();
    let list = list.ok_or_else(|| bad(k, x))?;
    if list.len() != n {
        return Err(ModelError::Config(format!(
            "unet config: {k} has {} entries for {n} blocks",
            list.len()
        )));
    }
    Ok(Some(list))
}

fn expect(v: &Value, k: &str, ok: &[Value]) -> Result<()> {
    if let Some(x) = field(v, k) {
        if !ok.contains(x) {
            return Err(bad(k, x));
        }
    }
    Ok(())
}

impl UNetConfig {
    pub fn from_json(v: &Value) -> Result<Self> {
        let block_out_channels: Vec<usize> = field(v, "block_out_channels")
            .and_then(|x| x.as_array())
            .and_then(|a| a.iter().map(|e| e.as_u64().map(|i| i as usize)).collect())
            .ok_or_else(|| {
                ModelError::Config("unet config: block_out_channels missing or invalid".into())
            })?;
        let n = block_out_channels.len();
        if n == 0 {
            return Err(ModelError::Config(
                "unet config: block_out_channels is empty".into(),
            ));
        }
        let strs = |k: &str| -> Result<Vec<String>> {
            let x = field(v, k)
                .ok_or_else(|| ModelError::Config(format!("unet config: missing {k}")))?;
            x.as_array()
                .and_then(|a| a.iter().map(|e| e.as_str().map(str::to_string)).collect())
                .ok_or_else(|| bad(k, x))
        };
        let down_block_types = strs("down_block_types")?
            .iter()
            .map(|s| match s.as_str() {
                "CrossAttnDownBlock2D" => Ok(DownBlockType::CrossAttn),
                "DownBlock2D" => Ok(DownBlockType::Plain),
                o => Err(ModelError::Config(format!(
                    "unet config: down_block_types entry {o} is not supported"
                ))),
            })
            .collect::<Result<Vec<_>>>()?;
        let up_block_types = strs("up_block_types")?
            .iter()
            .map(|s| match s.as_str() {
                "CrossAttnUpBlock2D" => Ok(UpBlockType::CrossAttn),
                "UpBlock2D" => Ok(UpBlockType::Plain),
                o => Err(ModelError::Config(format!(
                    "unet config: up_block_types entry {o} is not supported"
                ))),
            })
            .collect::<Result<Vec<_>>>()?;
        if down_block_types.len() != n || up_block_types.len() != n {
            return Err(ModelError::Config(
                "unet config: block type lists and block_out_channels differ in length".into(),
            ));
        }
        if let Some(x) = field(v, "mid_block_type") {
            if x.as_str() != Some("UNetMidBlock2DCrossAttn") {
                return Err(bad("mid_block_type", x));
            }
        }
        expect(v, "act_fn", &["silu".into()])?;
        expect(v, "time_embedding_type", &["positional".into()])?;
        expect(v, "resnet_time_scale_shift", &["default".into()])?;
        expect(v, "class_embed_type", &[])?;
        expect(v, "num_class_embeds", &[])?;
        expect(v, "encoder_hid_dim", &[])?;
        expect(v, "encoder_hid_dim_type", &[])?;
        expect(v, "time_cond_proj_dim", &[])?;
        expect(v, "time_embedding_act_fn", &[])?;
        expect(v, "timestep_post_act", &[])?;
        expect(v, "time_embedding_dim", &[])?;
        expect(v, "cross_attention_norm", &[])?;
        expect(v, "attention_type", &["default".into()])?;
        expect(v, "dual_cross_attention", &[false.into()])?;
        expect(v, "only_cross_attention", &[false.into()])?;
        expect(v, "center_input_sample", &[false.into()])?;
        expect(v, "resnet_skip_time_act", &[false.into()])?;
        expect(v, "class_embeddings_concat", &[false.into()])?;
        expect(v, "mid_block_only_cross_attention", &[false.into()])?;
        expect(v, "conv_in_kernel", &[3.into()])?;
        expect(v, "conv_out_kernel", &[3.into()])?;
        if let Some(x) = field(v, "resnet_out_scale_factor") {
            if x.as_f64() != Some(1.0) {
                return Err(bad("resnet_out_scale_factor", x));
            }
        }
        let addition = field(v, "addition_embed_type")
            .and_then(|x| x.as_str())
            .map(str::to_string);
        let (addition_time_embed_dim, projection_class_embeddings_input_dim) =
            match addition.as_deref() {
                None => (None, None),
                Some("text_time") => (
                    Some(usize_field(v, "addition_time_embed_dim")?),
                    Some(usize_field(v, "projection_class_embeddings_input_dim")?),
                ),
                Some(o) => {
                    return Err(ModelError::Config(format!(
                        "unet config: addition_embed_type = {o} is not supported"
                    )))
                }
            };
        // diffusers: num_attention_heads = num_attention_heads or attention_head_dim.
        let num_heads = match per_block(v, "num_attention_heads", n)? {
            Some(h) => h,
            None => per_block(v, "attention_head_dim", n)?.unwrap_or(vec![8; n]),
        };
        let cross_attention_dim = per_block(v, "cross_attention_dim", n)?.unwrap_or(vec![1280; n]);
        let transformer_layers_per_block =
            per_block(v, "transformer_layers_per_block", n)?.unwrap_or(vec![1; n]);
        let reverse_transformer_layers_per_block =
            match field(v, "reverse_transformer_layers_per_block") {
                None => None,
                Some(x) => {
                    let rows = x
                        .as_array()
                        .ok_or_else(|| bad("reverse_transformer_layers_per_block", x))?;
                    let parsed: Option<Vec<Vec<usize>>> = rows
                        .iter()
                        .map(|r| match r.as_u64() {
                            Some(i) => Some(vec![i as usize]),
                            None => r.as_array().and_then(|a| {
                                a.iter().map(|e| e.as_u64().map(|i| i as usize)).collect()
                            }),
                        })
                        .collect();
                    Some(parsed.ok_or_else(|| bad("reverse_transformer_layers_per_block", x))?)
                }
            };
        let layers_per_block = per_block(v, "layers_per_block", n)?.unwrap_or(vec![2; n]);
        let cfg = UNetConfig {
            in_channels: usize_field(v, "in_channels")?,
            out_channels: usize_field(v, "out_channels")?,
            block_out_channels,
            down_block_types,
            up_block_types,
            layers_per_block,
            num_heads,
            cross_attention_dim,
            transformer_layers_per_block,
            reverse_transformer_layers_per_block,
            norm_num_groups: field(v, "norm_num_groups")
                .and_then(|x| x.as_u64())
                .unwrap_or(32) as usize,
            norm_eps: field(v, "norm_eps")
                .and_then(|x| x.as_f64())
                .unwrap_or(1e-5),
            use_linear_projection: field(v, "use_linear_projection")
                .and_then(|x| x.as_bool())
                .unwrap_or(false),
            flip_sin_to_cos: field(v, "flip_sin_to_cos")
                .and_then(|x| x.as_bool())
                .unwrap_or(true),
            freq_shift: field(v, "freq_shift")
                .and_then(|x| x.as_f64())
                .unwrap_or(0.0),
            downsample_padding: field(v, "downsample_padding")
                .and_then(|x| x.as_u64())
                .unwrap_or(1) as usize,
            mid_block_scale_factor: field(v, "mid_block_scale_factor")
                .and_then(|x| x.as_f64())
                .unwrap_or(1.0),
            upcast_attention: field(v, "upcast_attention")
                .and_then(|x| x.as_bool())
                .unwrap_or(false),
            addition_time_embed_dim,
            projection_class_embeddings_input_dim,
            sample_size: field(v, "sample_size")
                .and_then(|x| x.as_u64())
                .unwrap_or(64) as usize,
        };
        for (i, (&c, &h)) in cfg
            .block_out_channels
            .iter()
            .zip(&cfg.num_heads)
            .enumerate()
        {
            if h == 0 || c % h != 0 {
                return Err(ModelError::Config(format!(
                    "unet config: block {i} has {c} channels, not divisible by {h} attention heads"
                )));
            }
            if c % cfg.norm_num_groups != 0 {
                return Err(ModelError::Config(format!(
                    "unet config: block {i} has {c} channels, not divisible by norm_num_groups {}",
                    cfg.norm_num_groups
                )));
            }
        }
        Ok(cfg)
    }

    /// Number of 2x upsamplers (= downsamplers): latent sides that are not multiples of
    /// 2^this need explicit upsample sizes.
    pub fn num_upsamplers(&self) -> usize {
        self.block_out_channels.len() - 1
    }

    pub fn time_embed_dim(&self) -> usize {
        self.block_out_channels[0] * 4
    }
}
