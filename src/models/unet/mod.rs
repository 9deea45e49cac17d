//! `UNet2DConditionModel`, built from its diffusers `config.json`.

mod blocks;
pub mod config;

pub use blocks::nearest_resize;
use blocks::{Downsample, ResnetBlock2D, SpatialTransformer, TransformerSpec, Upsample};
pub use config::UNetConfig;
use config::{DownBlockType, UpBlockType};

use super::checkpoint::checkpointed;
use super::nn::{Conv2d, GroupNorm, Linear, LinearRegistry};
use super::weights::Weights;
use super::{ModelError, Result};
use candle_core::{DType, Module, Tensor};
use std::path::Path;

struct TimestepEmbedding {
    linear_1: Linear,
    linear_2: Linear,
}

impl TimestepEmbedding {
    fn new(w: &Weights, in_dim: usize, out_dim: usize) -> Result<Self> {
        Ok(Self {
            linear_1: Linear::new(&w.pp("linear_1"), in_dim, out_dim, true, None)?,
            linear_2: Linear::new(&w.pp("linear_2"), out_dim, out_dim, true, None)?,
        })
    }
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.linear_2.forward(&self.linear_1.forward(x)?.silu()?)
    }
}

/// Sinusoidal embedding of a `[N]` f32 tensor of timesteps into `[N, dim]`, computed in f32
/// like diffusers (`exponent = -ln(10000) * i / (half - shift)`).
pub fn timestep_embedding(
    t: &Tensor,
    dim: usize,
    flip_sin_to_cos: bool,
    shift: f64,
) -> candle_core::Result<Tensor> {
    let half = dim / 2;
    let freqs: Vec<f32> = (0..half)
        .map(|i| (-(10000f64.ln()) * i as f64 / (half as f64 - shift)).exp() as f32)
        .collect();
    let freqs = Tensor::from_vec(freqs, (1, half), t.device())?;
    let args = t
        .to_dtype(DType::F32)?
        .unsqueeze(1)?
        .broadcast_mul(&freqs)?;
    let (sin, cos) = (args.sin()?, args.cos()?);
    let mut emb = if flip_sin_to_cos {
        Tensor::cat(&[cos, sin], 1)?
    } else {
        Tensor::cat(&[sin, cos], 1)?
    };
    if dim % 2 == 1 {
        emb = emb.pad_with_zeros(1, 0, 1)?;
    }
    Ok(emb)
}

struct DownBlock {
    resnets: Vec<ResnetBlock2D>,
    attentions: Vec<SpatialTransformer>,
    downsampler: Option<Downsample>,
}

struct UpBlock {
    resnets: Vec<ResnetBlock2D>,
    attentions: Vec<SpatialTransformer>,
    upsampler: Option<Upsample>,
}

struct MidBlock {
    resnet_0: ResnetBlock2D,
    attention: SpatialTransformer,
    resnet_1: ResnetBlock2D,
}

/// SDXL's added conditioning (`addition_embed_type: text_time`).
pub struct AddedCond<'a> {
    /// pooled text embeddings `[B, proj]`
    pub text_embeds: &'a Tensor,
    /// `[B, 6]`: original size, crop top-left, target size
    pub time_ids: &'a Tensor,
}

pub struct UNet2DConditionModel {
    pub config: UNetConfig,
    conv_in: Conv2d,
    time_embedding: TimestepEmbedding,
    add_embedding: Option<TimestepEmbedding>,
    down_blocks: Vec<DownBlock>,
    mid_block: MidBlock,
    up_blocks: Vec<UpBlock>,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
    linears: LinearRegistry,
    dtype: DType,
}

impl UNet2DConditionModel {
    pub fn load_config(dir: &Path) -> Result<UNetConfig> {
        let path = dir.join("config.json");
        let text = std::fs::read_to_string(&path)
            .map_err(|e| ModelError::Io(path.clone(), e.to_string()))?;
        let v: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| ModelError::Corrupt(path.display().to_string(), e.to_string()))?;
        UNetConfig::from_json(&v)
    }

    pub fn new(config: UNetConfig, w: &Weights) -> Result<Self> {
        let c = &config;
        let n = c.block_out_channels.len();
        let ch = &c.block_out_channels;
        let groups = c.norm_num_groups;
        let eps = c.norm_eps;
        let temb = c.time_embed_dim();
        let linears = LinearRegistry::default();

        let add_embedding = match (
            c.addition_time_embed_dim,
            c.projection_class_embeddings_input_dim,
        ) {
            (Some(_), Some(in_dim)) => Some(TimestepEmbedding::new(
                &w.pp("add_embedding"),
                in_dim,
                temb,
            )?),
            _ => None,
        };

        let spec = |channels: usize, block: usize, layers: usize| TransformerSpec {
            channels,
            heads: c.num_heads[block],
            context_dim: c.cross_attention_dim[block],
            layers,
            groups,
            linear_projection: c.use_linear_projection,
        };

        let mut down_blocks = Vec::with_capacity(n);
        let mut out_c = ch[0];
        for i in 0..n {
            let in_c = out_c;
            out_c = ch[i];
            let wb = w.pp(format!("down_blocks.{i}"));
            let mut resnets = Vec::new();
            let mut attentions = Vec::new();
            for j in 0..c.layers_per_block[i] {
                let rin = if j == 0 { in_c } else { out_c };
                resnets.push(ResnetBlock2D::new(
                    &wb.pp(format!("resnets.{j}")),
                    rin,
                    out_c,
                    Some(temb),
                    groups,
                    eps,
                    1.0,
                )?);
                if c.down_block_types[i] == DownBlockType::CrossAttn {
                    let s = TransformerSpec {
                        heads: c.num_heads[i],
                        ..spec(out_c, i, c.transformer_layers_per_block[i])
                    };
                    attentions.push(SpatialTransformer::new(
                        &wb.pp(format!("attentions.{j}")),
                        &s,
                        &linears,
                    )?);
                }
            }
            let downsampler = if i + 1 < n {
                Some(Downsample::new(
                    &wb.pp("downsamplers.0"),
                    out_c,
                    c.downsample_padding,
                )?)
            } else {
                None
            };
            down_blocks.push(DownBlock {
                resnets,
                attentions,
                downsampler,
            });
        }

        let last = ch[n - 1];
        let wm = w.pp("mid_block");
        let mid_block = MidBlock {
            resnet_0: ResnetBlock2D::new(
                &wm.pp("resnets.0"),
                last,
                last,
                Some(temb),
                groups,
                eps,
                c.mid_block_scale_factor,
            )?,
            attention: SpatialTransformer::new(
                &wm.pp("attentions.0"),
                &spec(last, n - 1, c.transformer_layers_per_block[n - 1]),
                &linears,
            )?,
            resnet_1: ResnetBlock2D::new(
                &wm.pp("resnets.1"),
                last,
                last,
                Some(temb),
                groups,
                eps,
                c.mid_block_scale_factor,
            )?,
        };

        let rev_ch: Vec<usize> = ch.iter().rev().copied().collect();
        let rev_layers: Vec<usize> = c.layers_per_block.iter().rev().copied().collect();
        let rev_heads: Vec<usize> = c.num_heads.iter().rev().copied().collect();
        let rev_cross: Vec<usize> = c.cross_attention_dim.iter().rev().copied().collect();
        let rev_tlayers: Vec<Vec<usize>> = match &c.reverse_transformer_layers_per_block {
            Some(r) => r.clone(),
            None => c
                .transformer_layers_per_block
                .iter()
                .rev()
                .map(|&l| vec![l; 1])
                .collect(),
        };
        let mut up_blocks = Vec::with_capacity(n);
        let mut prev_out = rev_ch[0];
        for i in 0..n {
            let out_c = rev_ch[i];
            let in_c = rev_ch[(i + 1).min(n - 1)];
            let layers = rev_layers[i] + 1;
            let wb = w.pp(format!("up_blocks.{i}"));
            let mut resnets = Vec::new();
            let mut attentions = Vec::new();
            for j in 0..layers {
                let skip = if j == layers - 1 { in_c } else { out_c };
                let rin = if j == 0 { prev_out } else { out_c };
                resnets.push(ResnetBlock2D::new(
                    &wb.pp(format!("resnets.{j}")),
                    rin + skip,
                    out_c,
                    Some(temb),
                    groups,
                    eps,
                    1.0,
                )?);
                if c.up_block_types[i] == UpBlockType::CrossAttn {
                    let tl = rev_tlayers[i]
                        .get(j)
                        .or(rev_tlayers[i].last())
                        .copied()
                        .unwrap_or(1);
                    let s = TransformerSpec {
                        channels: out_c,
                        heads: rev_heads[i],
                        context_dim: rev_cross[i],
                        layers: tl,
                        groups,
                        linear_projection: c.use_linear_projection,
                    };
                    attentions.push(SpatialTransformer::new(
                        &wb.pp(format!("attentions.{j}")),
                        &s,
                        &linears,
                    )?);
                }
            }
            let upsampler = if i + 1 < n {
                Some(Upsample::new(&wb.pp("upsamplers.0"), out_c)?)
            } else {
                None
            };
            up_blocks.push(UpBlock {
                resnets,
                attentions,
                upsampler,
            });
            prev_out = out_c;
        }

        Ok(Self {
            conv_in: Conv2d::new(&w.pp("conv_in"), c.in_channels, ch[0], 3, 1, 1)?,
            time_embedding: TimestepEmbedding::new(&w.pp("time_embedding"), ch[0], temb)?,
            add_embedding,
            down_blocks,
            mid_block,
            up_blocks,
            conv_norm_out: GroupNorm::new(&w.pp("conv_norm_out"), groups, ch[0], eps)?,
            conv_out: Conv2d::new(&w.pp("conv_out"), ch[0], c.out_channels, 3, 1, 1)?,
            linears,
            dtype: w.dtype(),
            config,
        })
    }

    /// Loads `<dir>/config.json` and the weights (`diffusion_pytorch_model[.variant].safetensors`).
    pub fn load(
        dir: &Path,
        variant: Option<&str>,
        device: &candle_core::Device,
        dtype: DType,
    ) -> Result<Self> {
        let config = Self::load_config(dir)?;
        let w = Weights::from_files(&Self::weight_files(dir, variant)?, device, dtype)?;
        Self::new(config, &w)
    }

    /// The weight files of a diffusers UNet directory (sharded or not).
    pub fn weight_files(dir: &Path, variant: Option<&str>) -> Result<Vec<std::path::PathBuf>> {
        Weights::resolve_files(dir, "diffusion_pytorch_model", variant)
    }

    /// Names of the modules that carry a `.weight` in a UNet directory's files, read from the
    /// safetensors headers (memory-mapped, no tensor loaded): what LoRA targets can name,
    /// without building the model.
    pub fn module_names(dir: &Path) -> Result<Vec<String>> {
        let files = Self::weight_files(dir, None)?;
        let w = Weights::from_files(&files, &candle_core::Device::Cpu, DType::F32)?;
        Ok(w.names()
            .into_iter()
            .filter_map(|n| n.strip_suffix(".weight").map(String::from))
            .collect())
    }

    /// Every Linear layer by module name: where LoRA adapters attach.
    pub fn linears(&self) -> &LinearRegistry {
        &self.linears
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// `sample [B, C, h, w]`, `timesteps [B]` (or `[1]`, broadcast), `encoder_hidden_states
    /// [B, 77, D]`. Returns the noise (or v) prediction `[B, out_channels, h, w]`.
    pub fn forward(
        &self,
        sample: &Tensor,
        timesteps: &Tensor,
        encoder_hidden_states: &Tensor,
        added: Option<AddedCond<'_>>,
    ) -> candle_core::Result<Tensor> {
        let c = &self.config;
        let (b, _, h, w) = sample.dims4()?;
        let levels = 1usize << c.num_upsamplers();
        let forward_upsample_size = h % levels != 0 || w % levels != 0;

        let t = if timesteps.elem_count() == 1 && b > 1 {
            timesteps.flatten_all()?.broadcast_as(b)?.contiguous()?
        } else {
            timesteps.flatten_all()?
        };
        let t_emb =
            timestep_embedding(&t, c.block_out_channels[0], c.flip_sin_to_cos, c.freq_shift)?
                .to_dtype(self.dtype)?;
        let mut emb = self.time_embedding.forward(&t_emb)?;
        if let Some(add) = &self.add_embedding {
            let added = added.ok_or_else(|| {
                candle_core::Error::Msg(
                    "this UNet needs text_embeds and time_ids (SDXL added conditioning)".into(),
                )
            })?;
            let d = c.addition_time_embed_dim.unwrap_or(256);
            let ids = added.time_ids.flatten_all()?;
            let n_ids = ids.dim(0)?;
            let time_embeds = timestep_embedding(&ids, d, c.flip_sin_to_cos, c.freq_shift)?
                .reshape((b, n_ids / b * d))?
                .to_dtype(self.dtype)?;
            let add_in = Tensor::cat(&[added.text_embeds.to_dtype(self.dtype)?, time_embeds], 1)?;
            emb = (emb + add.forward(&add_in)?)?;
        }

        let mut x = self.conv_in.forward(sample)?;
        let mut skips = vec![x.clone()];
        for blk in &self.down_blocks {
            for (j, res) in blk.resnets.iter().enumerate() {
                x = resnet(res, &x, &emb)?;
                if let Some(attn) = blk.attentions.get(j) {
                    x = transformer(attn, &x, encoder_hidden_states)?;
                }
                skips.push(x.clone());
            }
            if let Some(down) = &blk.downsampler {
                x = down.forward(&x)?;
                skips.push(x.clone());
            }
        }

        x = resnet(&self.mid_block.resnet_0, &x, &emb)?;
        x = transformer(&self.mid_block.attention, &x, encoder_hidden_states)?;
        x = resnet(&self.mid_block.resnet_1, &x, &emb)?;

        for blk in &self.up_blocks {
            let n_res = blk.resnets.len();
            let mut res_samples = skips.split_off(skips.len() - n_res);
            for (j, res) in blk.resnets.iter().enumerate() {
                let skip = res_samples.pop().expect("one skip per resnet");
                x = Tensor::cat(&[&x, &skip], 1)?;
                x = resnet(res, &x, &emb)?;
                if let Some(attn) = blk.attentions.get(j) {
                    x = transformer(attn, &x, encoder_hidden_states)?;
                }
            }
            if let Some(up) = &blk.upsampler {
                let size = if forward_upsample_size {
                    let next = skips.last().expect("skip for upsample size");
                    let (_, _, sh, sw) = next.dims4()?;
                    Some((sh, sw))
                } else {
                    None
                };
                x = up.forward(&x, size)?;
            }
        }

        let x = self.conv_norm_out.forward_silu(&x)?;
        self.conv_out.forward(&x)
    }
}

/// A ResNet block, checkpointed when training asks for it (`models::checkpoint`).
fn resnet(block: &ResnetBlock2D, x: &Tensor, emb: &Tensor) -> candle_core::Result<Tensor> {
    let block = block.clone();
    checkpointed(x, Some(emb), move |x, emb| block.forward(x, emb))
}

/// A spatial transformer, checkpointed when training asks for it.
fn transformer(
    block: &SpatialTransformer,
    x: &Tensor,
    context: &Tensor,
) -> candle_core::Result<Tensor> {
    let block = block.clone();
    checkpointed(x, Some(context), move |x, context| {
        block.forward(x, context.expect("a transformer gets its context"))
    })
}
