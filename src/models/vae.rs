//! `AutoencoderKL` (encoder, decoder, diagonal-Gaussian posterior), from its config.json.

use super::nn::{Conv2d, GroupNorm, Linear};
use super::unet::nearest_resize;
use super::weights::Weights;
use super::{ModelError, Result};
use crate::models::nn::{attention, AttentionMask};
use candle_core::{DType, Module, Tensor};
use serde_json::Value;
use std::path::Path;

#[derive(Debug, Clone)]
pub struct VaeConfig {
    pub in_channels: usize,
    pub out_channels: usize,
    pub latent_channels: usize,
    pub block_out_channels: Vec<usize>,
    pub layers_per_block: usize,
    pub norm_num_groups: usize,
    pub scaling_factor: f64,
    pub shift_factor: Option<f64>,
    pub use_quant_conv: bool,
    pub use_post_quant_conv: bool,
    pub mid_block_add_attention: bool,
    pub force_upcast: bool,
}

impl VaeConfig {
    pub fn from_json(v: &Value) -> Result<Self> {
        let f = |k: &str| v.get(k).filter(|x| !x.is_null());
        let us = |k: &str, d: usize| {
            f(k).and_then(|x| x.as_u64())
                .map(|x| x as usize)
                .unwrap_or(d)
        };
        let block_out_channels: Vec<usize> = f("block_out_channels")
            .and_then(|x| x.as_array())
            .and_then(|a| a.iter().map(|e| e.as_u64().map(|i| i as usize)).collect())
            .ok_or_else(|| {
                ModelError::Config("vae config: block_out_channels missing or invalid".into())
            })?;
        if block_out_channels.is_empty() {
            return Err(ModelError::Config(
                "vae config: block_out_channels is empty".into(),
            ));
        }
        for (k, ok) in [
            ("down_block_types", "DownEncoderBlock2D"),
            ("up_block_types", "UpDecoderBlock2D"),
        ] {
            if let Some(arr) = f(k).and_then(|x| x.as_array()) {
                if arr.len() != block_out_channels.len()
                    || arr.iter().any(|e| e.as_str() != Some(ok))
                {
                    return Err(ModelError::Config(format!(
                        "vae config: {k} must be {} x {ok}",
                        block_out_channels.len()
                    )));
                }
            }
        }
        if let Some(x) = f("act_fn") {
            if x.as_str() != Some("silu") {
                return Err(ModelError::Config(format!(
                    "vae config: act_fn = {x} is not supported"
                )));
            }
        }
        if f("latents_mean").is_some() || f("latents_std").is_some() {
            return Err(ModelError::Config(
                "vae config: latents_mean/latents_std are not supported".into(),
            ));
        }
        Ok(Self {
            in_channels: us("in_channels", 3),
            out_channels: us("out_channels", 3),
            latent_channels: us("latent_channels", 4),
            block_out_channels,
            layers_per_block: us("layers_per_block", 1),
            norm_num_groups: us("norm_num_groups", 32),
            scaling_factor: f("scaling_factor")
                .and_then(|x| x.as_f64())
                .unwrap_or(0.18215),
            shift_factor: f("shift_factor").and_then(|x| x.as_f64()),
            use_quant_conv: f("use_quant_conv")
                .and_then(|x| x.as_bool())
                .unwrap_or(true),
            use_post_quant_conv: f("use_post_quant_conv")
                .and_then(|x| x.as_bool())
                .unwrap_or(true),
            mid_block_add_attention: f("mid_block_add_attention")
                .and_then(|x| x.as_bool())
                .unwrap_or(true),
            force_upcast: f("force_upcast").and_then(|x| x.as_bool()).unwrap_or(true),
        })
    }
}

const VAE_EPS: f64 = 1e-6;

struct VaeResnet {
    norm1: GroupNorm,
    conv1: Conv2d,
    norm2: GroupNorm,
    conv2: Conv2d,
    shortcut: Option<Conv2d>,
}

impl VaeResnet {
    fn new(w: &Weights, in_c: usize, out_c: usize, groups: usize) -> Result<Self> {
        Ok(Self {
            norm1: GroupNorm::new(&w.pp("norm1"), groups, in_c, VAE_EPS)?,
            conv1: Conv2d::new(&w.pp("conv1"), in_c, out_c, 3, 1, 1)?,
            norm2: GroupNorm::new(&w.pp("norm2"), groups, out_c, VAE_EPS)?,
            conv2: Conv2d::new(&w.pp("conv2"), out_c, out_c, 3, 1, 1)?,
            shortcut: if in_c != out_c {
                Some(Conv2d::new(&w.pp("conv_shortcut"), in_c, out_c, 1, 1, 0)?)
            } else {
                None
            },
        })
    }
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let h = self.conv1.forward(&self.norm1.forward_silu(x)?)?;
        let h = self.conv2.forward(&self.norm2.forward_silu(&h)?)?;
        let skip = match &self.shortcut {
            Some(c) => c.forward(x)?,
            None => x.clone(),
        };
        skip + h
    }
}

/// Single-head self-attention over all channels, GroupNorm in front, residual.
struct VaeAttention {
    group_norm: GroupNorm,
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
}

impl VaeAttention {
    fn new(w: &Weights, c: usize, groups: usize) -> Result<Self> {
        Ok(Self {
            group_norm: GroupNorm::new(&w.pp("group_norm"), groups, c, VAE_EPS)?,
            to_q: Linear::new(&w.pp("to_q"), c, c, true, None)?,
            to_k: Linear::new(&w.pp("to_k"), c, c, true, None)?,
            to_v: Linear::new(&w.pp("to_v"), c, c, true, None)?,
            to_out: Linear::new(&w.pp("to_out.0"), c, c, true, None)?,
        })
    }
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let t = self
            .group_norm
            .forward(x)?
            .reshape((b, c, h * w))?
            .transpose(1, 2)?;
        let q = self.to_q.forward(&t)?;
        let k = self.to_k.forward(&t)?;
        let v = self.to_v.forward(&t)?;
        let o = self
            .to_out
            .forward(&attention(&q, &k, &v, 1, AttentionMask::None)?)?;
        let o = o.transpose(1, 2)?.reshape((b, c, h, w))?;
        o + x
    }
}

struct VaeMid {
    resnet_0: VaeResnet,
    attention: Option<VaeAttention>,
    resnet_1: VaeResnet,
}

impl VaeMid {
    fn new(w: &Weights, c: usize, groups: usize, attn: bool) -> Result<Self> {
        Ok(Self {
            resnet_0: VaeResnet::new(&w.pp("resnets.0"), c, c, groups)?,
            attention: if attn {
                Some(VaeAttention::new(&w.pp("attentions.0"), c, groups)?)
            } else {
                None
            },
            resnet_1: VaeResnet::new(&w.pp("resnets.1"), c, c, groups)?,
        })
    }
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let mut x = self.resnet_0.forward(x)?;
        if let Some(a) = &self.attention {
            x = a.forward(&x)?;
        }
        self.resnet_1.forward(&x)
    }
}

struct EncoderBlock {
    resnets: Vec<VaeResnet>,
    downsample: Option<Conv2d>,
}

struct DecoderBlock {
    resnets: Vec<VaeResnet>,
    upsample: Option<Conv2d>,
}

pub struct AutoencoderKL {
    pub config: VaeConfig,
    enc_conv_in: Conv2d,
    enc_blocks: Vec<EncoderBlock>,
    enc_mid: VaeMid,
    enc_norm_out: GroupNorm,
    enc_conv_out: Conv2d,
    quant_conv: Option<Conv2d>,
    post_quant_conv: Option<Conv2d>,
    dec_conv_in: Conv2d,
    dec_mid: VaeMid,
    dec_blocks: Vec<DecoderBlock>,
    dec_norm_out: GroupNorm,
    dec_conv_out: Conv2d,
    dtype: DType,
}

/// The posterior `N(mean, std^2)` of one encoded image batch.
pub struct DiagonalGaussian {
    pub mean: Tensor,
    pub logvar: Tensor,
}

impl DiagonalGaussian {
    pub fn std(&self) -> candle_core::Result<Tensor> {
        (self.logvar.clone() * 0.5)?.exp()
    }
    /// `mean + std * noise` with caller-supplied noise (per-request RNG).
    pub fn sample_with(&self, noise: &Tensor) -> candle_core::Result<Tensor> {
        self.mean.clone() + (self.std()? * noise)?
    }
    pub fn mode(&self) -> &Tensor {
        &self.mean
    }
}

impl AutoencoderKL {
    pub fn new(config: VaeConfig, w: &Weights) -> Result<Self> {
        let c = &config;
        let ch = &c.block_out_channels;
        let n = ch.len();
        let g = c.norm_num_groups;
        let lpb = c.layers_per_block;
        let we = w.pp("encoder");
        let mut enc_blocks = Vec::new();
        let mut out_c = ch[0];
        for i in 0..n {
            let in_c = out_c;
            out_c = ch[i];
            let wb = we.pp(format!("down_blocks.{i}"));
            let resnets = (0..lpb)
                .map(|j| {
                    VaeResnet::new(
                        &wb.pp(format!("resnets.{j}")),
                        if j == 0 { in_c } else { out_c },
                        out_c,
                        g,
                    )
                })
                .collect::<Result<Vec<_>>>()?;
            let downsample = if i + 1 < n {
                Some(Conv2d::new(
                    &wb.pp("downsamplers.0.conv"),
                    out_c,
                    out_c,
                    3,
                    2,
                    0,
                )?)
            } else {
                None
            };
            enc_blocks.push(EncoderBlock {
                resnets,
                downsample,
            });
        }
        let last = ch[n - 1];
        let lc = c.latent_channels;
        let wd = w.pp("decoder");
        let rev: Vec<usize> = ch.iter().rev().copied().collect();
        let mut dec_blocks = Vec::new();
        let mut prev = rev[0];
        for (i, &out_c) in rev.iter().enumerate() {
            let wb = wd.pp(format!("up_blocks.{i}"));
            let resnets = (0..lpb + 1)
                .map(|j| {
                    VaeResnet::new(
                        &wb.pp(format!("resnets.{j}")),
                        if j == 0 { prev } else { out_c },
                        out_c,
                        g,
                    )
                })
                .collect::<Result<Vec<_>>>()?;
            let upsample = if i + 1 < n {
                Some(Conv2d::new(
                    &wb.pp("upsamplers.0.conv"),
                    out_c,
                    out_c,
                    3,
                    1,
                    1,
                )?)
            } else {
                None
            };
            dec_blocks.push(DecoderBlock { resnets, upsample });
            prev = out_c;
        }
        Ok(Self {
            enc_conv_in: Conv2d::new(&we.pp("conv_in"), c.in_channels, ch[0], 3, 1, 1)?,
            enc_blocks,
            enc_mid: VaeMid::new(&we.pp("mid_block"), last, g, c.mid_block_add_attention)?,
            enc_norm_out: GroupNorm::new(&we.pp("conv_norm_out"), g, last, VAE_EPS)?,
            enc_conv_out: Conv2d::new(&we.pp("conv_out"), last, 2 * lc, 3, 1, 1)?,
            quant_conv: if c.use_quant_conv {
                Some(Conv2d::new(&w.pp("quant_conv"), 2 * lc, 2 * lc, 1, 1, 0)?)
            } else {
                None
            },
            post_quant_conv: if c.use_post_quant_conv {
                Some(Conv2d::new(&w.pp("post_quant_conv"), lc, lc, 1, 1, 0)?)
            } else {
                None
            },
            dec_conv_in: Conv2d::new(&wd.pp("conv_in"), lc, last, 3, 1, 1)?,
            dec_mid: VaeMid::new(&wd.pp("mid_block"), last, g, c.mid_block_add_attention)?,
            dec_blocks,
            dec_norm_out: GroupNorm::new(&wd.pp("conv_norm_out"), g, ch[0], VAE_EPS)?,
            dec_conv_out: Conv2d::new(&wd.pp("conv_out"), ch[0], c.out_channels, 3, 1, 1)?,
            dtype: w.dtype(),
            config,
        })
    }

    pub fn load_config(dir: &Path) -> Result<VaeConfig> {
        let path = dir.join("config.json");
        let text = std::fs::read_to_string(&path)
            .map_err(|e| ModelError::Io(path.clone(), e.to_string()))?;
        let v: Value = serde_json::from_str(&text)
            .map_err(|e| ModelError::Corrupt(path.display().to_string(), e.to_string()))?;
        VaeConfig::from_json(&v)
    }

    pub fn load(
        dir: &Path,
        variant: Option<&str>,
        device: &candle_core::Device,
        dtype: DType,
    ) -> Result<Self> {
        let config = Self::load_config(dir)?;
        let files = Weights::resolve_files(dir, "diffusion_pytorch_model", variant)?;
        Self::new(config, &Weights::from_files(&files, device, dtype)?)
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Image `[B, 3, H, W]` in [-1, 1] -> posterior over latents (not scaled).
    pub fn encode(&self, x: &Tensor) -> candle_core::Result<DiagonalGaussian> {
        let mut h = self.enc_conv_in.forward(&x.to_dtype(self.dtype)?)?;
        for blk in &self.enc_blocks {
            for r in &blk.resnets {
                h = r.forward(&h)?;
            }
            if let Some(d) = &blk.downsample {
                // diffusers pads right and bottom by one, then convolves without padding.
                h = d.forward(&h.pad_with_zeros(3, 0, 1)?.pad_with_zeros(2, 0, 1)?)?;
            }
        }
        h = self.enc_mid.forward(&h)?;
        h = self
            .enc_conv_out
            .forward(&self.enc_norm_out.forward_silu(&h)?)?;
        if let Some(q) = &self.quant_conv {
            h = q.forward(&h)?;
        }
        let lc = self.config.latent_channels;
        let mean = h.narrow(1, 0, lc)?;
        let logvar = h.narrow(1, lc, lc)?.clamp(-30f32, 20f32)?;
        Ok(DiagonalGaussian { mean, logvar })
    }

    /// Latents (already divided by the scaling factor) -> image, raw decoder output.
    pub fn decode(&self, z: &Tensor) -> candle_core::Result<Tensor> {
        let mut h = z.to_dtype(self.dtype)?;
        if let Some(p) = &self.post_quant_conv {
            h = p.forward(&h)?;
        }
        h = self.dec_conv_in.forward(&h)?;
        h = self.dec_mid.forward(&h)?;
        for blk in &self.dec_blocks {
            for r in &blk.resnets {
                h = r.forward(&h)?;
            }
            if let Some(u) = &blk.upsample {
                let (_, _, hh, ww) = h.dims4()?;
                h = u.forward(&nearest_resize(&h, hh * 2, ww * 2)?)?;
            }
        }
        self.dec_conv_out
            .forward(&self.dec_norm_out.forward_silu(&h)?)
    }
}
