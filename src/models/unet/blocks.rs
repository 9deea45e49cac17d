//! UNet building blocks: ResNet blocks, spatial transformers, resamplers.

use crate::models::nn::{
    attention, AttentionMask, Conv2d, GroupNorm, LayerNorm, Linear, LinearRegistry,
};
use crate::models::weights::Weights;
use crate::models::Result;
use candle_core::{Module, Tensor};

#[derive(Clone)]
pub struct ResnetBlock2D {
    norm1: GroupNorm,
    conv1: Conv2d,
    time_emb_proj: Option<Linear>,
    norm2: GroupNorm,
    conv2: Conv2d,
    conv_shortcut: Option<Conv2d>,
    output_scale_factor: f64,
}

impl ResnetBlock2D {
    pub fn new(
        w: &Weights,
        in_c: usize,
        out_c: usize,
        temb_c: Option<usize>,
        groups: usize,
        eps: f64,
        output_scale_factor: f64,
    ) -> Result<Self> {
        let conv_shortcut = if in_c != out_c {
            Some(Conv2d::new(&w.pp("conv_shortcut"), in_c, out_c, 1, 1, 0)?)
        } else {
            None
        };
        Ok(Self {
            norm1: GroupNorm::new(&w.pp("norm1"), groups, in_c, eps)?,
            conv1: Conv2d::new(&w.pp("conv1"), in_c, out_c, 3, 1, 1)?,
            time_emb_proj: match temb_c {
                Some(t) => Some(Linear::new(&w.pp("time_emb_proj"), t, out_c, true, None)?),
                None => None,
            },
            norm2: GroupNorm::new(&w.pp("norm2"), groups, out_c, eps)?,
            conv2: Conv2d::new(&w.pp("conv2"), out_c, out_c, 3, 1, 1)?,
            conv_shortcut,
            output_scale_factor,
        })
    }

    pub fn forward(&self, x: &Tensor, temb: Option<&Tensor>) -> candle_core::Result<Tensor> {
        let mut h = self.conv1.forward(&self.norm1.forward_silu(x)?)?;
        if let (Some(proj), Some(t)) = (&self.time_emb_proj, temb) {
            let t = proj.forward(&t.silu()?)?;
            h = h.broadcast_add(&t.unsqueeze(2)?.unsqueeze(3)?)?;
        }
        let h = self.conv2.forward(&self.norm2.forward_silu(&h)?)?;
        let skip = match &self.conv_shortcut {
            Some(c) => c.forward(x)?,
            None => x.clone(),
        };
        let out = (skip + h)?;
        if self.output_scale_factor != 1.0 {
            out / self.output_scale_factor
        } else {
            Ok(out)
        }
    }
}

#[derive(Clone)]
/// diffusers `Attention` as used in transformer blocks: q/k/v without bias, out with bias.
pub struct CrossAttention {
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
    heads: usize,
}

impl CrossAttention {
    pub fn new(
        w: &Weights,
        query_dim: usize,
        context_dim: usize,
        heads: usize,
        reg: &LinearRegistry,
    ) -> Result<Self> {
        let inner = query_dim;
        Ok(Self {
            to_q: Linear::new(&w.pp("to_q"), query_dim, inner, false, Some(reg))?,
            to_k: Linear::new(&w.pp("to_k"), context_dim, inner, false, Some(reg))?,
            to_v: Linear::new(&w.pp("to_v"), context_dim, inner, false, Some(reg))?,
            to_out: Linear::new(&w.pp("to_out.0"), inner, query_dim, true, Some(reg))?,
            heads,
        })
    }

    pub fn forward(&self, x: &Tensor, context: Option<&Tensor>) -> candle_core::Result<Tensor> {
        let ctx = context.unwrap_or(x);
        let q = self.to_q.forward(x)?;
        let k = self.to_k.forward(ctx)?;
        let v = self.to_v.forward(ctx)?;
        let out = attention(&q, &k, &v, self.heads, AttentionMask::None)?;
        self.to_out.forward(&out)
    }
}

/// GEGLU feed-forward: `proj(x) -> (h, gate)`, `h * gelu(gate)` with exact erf GELU.
#[derive(Clone)]
pub struct FeedForward {
    proj: Linear,
    out: Linear,
}

impl FeedForward {
    pub fn new(w: &Weights, dim: usize, reg: &LinearRegistry) -> Result<Self> {
        let inner = dim * 4;
        Ok(Self {
            proj: Linear::new(&w.pp("net.0.proj"), dim, inner * 2, true, Some(reg))?,
            out: Linear::new(&w.pp("net.2"), inner, dim, true, Some(reg))?,
        })
    }

    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let h = self.proj.forward(x)?;
        if h.device().is_cpu() && h.dtype() == candle_core::DType::F32 {
            return self.out.forward(&crate::models::kernels::activation::geglu(&h)?);
        }
        let half = h.dim(candle_core::D::Minus1)? / 2;
        let a = h.narrow(candle_core::D::Minus1, 0, half)?;
        let gate = h.narrow(candle_core::D::Minus1, half, half)?;
        self.out.forward(&(a * gate.gelu_erf()?)?)
    }
}

#[derive(Clone)]
pub struct BasicTransformerBlock {
    norm1: LayerNorm,
    attn1: CrossAttention,
    norm2: LayerNorm,
    attn2: CrossAttention,
    norm3: LayerNorm,
    ff: FeedForward,
}

impl BasicTransformerBlock {
    pub fn new(
        w: &Weights,
        dim: usize,
        context_dim: usize,
        heads: usize,
        reg: &LinearRegistry,
    ) -> Result<Self> {
        Ok(Self {
            norm1: LayerNorm::new(&w.pp("norm1"), dim, 1e-5)?,
            attn1: CrossAttention::new(&w.pp("attn1"), dim, dim, heads, reg)?,
            norm2: LayerNorm::new(&w.pp("norm2"), dim, 1e-5)?,
            attn2: CrossAttention::new(&w.pp("attn2"), dim, context_dim, heads, reg)?,
            norm3: LayerNorm::new(&w.pp("norm3"), dim, 1e-5)?,
            ff: FeedForward::new(&w.pp("ff"), dim, reg)?,
        })
    }

    pub fn forward(&self, x: &Tensor, context: &Tensor) -> candle_core::Result<Tensor> {
        let x = (self.attn1.forward(&self.norm1.forward(x)?, None)? + x)?;
        let x = (self
            .attn2
            .forward(&self.norm2.forward(&x)?, Some(context))?
            + &x)?;
        self.ff.forward(&self.norm3.forward(&x)?)? + x
    }
}

/// `Transformer2DModel` over continuous NCHW input.
#[derive(Clone)]
pub struct SpatialTransformer {
    norm: GroupNorm,
    /// Linear layers in SD 2.x/SDXL, 1x1 convolutions in SD 1.x: the same per-pixel map, held
    /// as Linear either way so LoRA can adapt both.
    proj_in: Linear,
    blocks: Vec<BasicTransformerBlock>,
    proj_out: Linear,
}

pub struct TransformerSpec {
    pub channels: usize,
    pub heads: usize,
    pub context_dim: usize,
    pub layers: usize,
    pub groups: usize,
    pub linear_projection: bool,
}

impl SpatialTransformer {
    pub fn new(w: &Weights, s: &TransformerSpec, reg: &LinearRegistry) -> Result<Self> {
        let c = s.channels;
        let (proj_in, proj_out) = if s.linear_projection {
            (
                Linear::new(&w.pp("proj_in"), c, c, true, Some(reg))?,
                Linear::new(&w.pp("proj_out"), c, c, true, Some(reg))?,
            )
        } else {
            (
                Linear::from_conv1x1(&w.pp("proj_in"), c, c, Some(reg))?,
                Linear::from_conv1x1(&w.pp("proj_out"), c, c, Some(reg))?,
            )
        };
        let blocks = (0..s.layers)
            .map(|i| {
                BasicTransformerBlock::new(
                    &w.pp(format!("transformer_blocks.{i}")),
                    c,
                    s.context_dim,
                    s.heads,
                    reg,
                )
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            // diffusers hard-codes eps 1e-6 for this GroupNorm.
            norm: GroupNorm::new(&w.pp("norm"), s.groups, c, 1e-6)?,
            proj_in,
            blocks,
            proj_out,
        })
    }

    pub fn forward(&self, x: &Tensor, context: &Tensor) -> candle_core::Result<Tensor> {
        let (b, c, h, wd) = x.dims4()?;
        let residual = x;
        let x = self.norm.forward(x)?;
        let to_tokens = |t: &Tensor| t.permute((0, 2, 3, 1))?.reshape((b, h * wd, c));
        let mut x = self.proj_in.forward(&to_tokens(&x)?)?;
        for blk in &self.blocks {
            x = blk.forward(&x, context)?;
        }
        let to_image = |t: &Tensor| t.reshape((b, h, wd, c))?.permute((0, 3, 1, 2));
        let x = to_image(&self.proj_out.forward(&x)?)?;
        x + residual
    }
}

pub struct Downsample {
    conv: Conv2d,
}

impl Downsample {
    pub fn new(w: &Weights, c: usize, padding: usize) -> Result<Self> {
        Ok(Self {
            conv: Conv2d::new(&w.pp("conv"), c, c, 3, 2, padding)?,
        })
    }
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.conv.forward(x)
    }
}

pub struct Upsample {
    conv: Conv2d,
}

impl Upsample {
    pub fn new(w: &Weights, c: usize) -> Result<Self> {
        Ok(Self {
            conv: Conv2d::new(&w.pp("conv"), c, c, 3, 1, 1)?,
        })
    }
    /// Nearest upsampling to `size` (the skip tensor's size when the latent side is not a
    /// multiple of 2^levels), else 2x.
    pub fn forward(&self, x: &Tensor, size: Option<(usize, usize)>) -> candle_core::Result<Tensor> {
        let (_, _, h, w) = x.dims4()?;
        let (oh, ow) = size.unwrap_or((2 * h, 2 * w));
        self.conv.forward(&nearest_resize(x, oh, ow)?)
    }
}

/// PyTorch-compatible nearest interpolation (`src = floor(dst * in / out)`). The 2x case uses
/// candle's kernel; other sizes gather rows and columns, which also keeps a backward pass.
pub fn nearest_resize(x: &Tensor, oh: usize, ow: usize) -> candle_core::Result<Tensor> {
    let (_, _, h, w) = x.dims4()?;
    if oh == 2 * h && ow == 2 * w {
        return x.upsample_nearest2d(oh, ow);
    }
    let rows: Vec<u32> = (0..oh).map(|i| ((i * h) / oh) as u32).collect();
    let cols: Vec<u32> = (0..ow).map(|j| ((j * w) / ow) as u32).collect();
    let dev = x.device();
    let x = x.index_select(&Tensor::new(rows, dev)?, 2)?;
    x.index_select(&Tensor::new(cols, dev)?, 3)
}
