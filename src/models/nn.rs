//! Layers shared by the UNet, the VAE and the text encoders.
//!
//! Every operation here is composed of candle-core ops that record their backward pass:
//! candle-nn's fused softmax / layer-norm kernels record none, so gradients silently vanish
//! through them (the bug that ruled out candle-transformers' UNet for training).

use super::weights::Weights;
use super::Result;
use candle_core::{DType, Module, Tensor, D};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, RwLock};

/// A low-rank update `scale * up(down(x))` attached to one Linear layer.
#[derive(Clone, Debug)]
pub struct LoraDelta {
    /// `[r, in_features]`
    pub down: Tensor,
    /// `[out_features, r]`
    pub up: Tensor,
    /// `lora_alpha / r` times the user scale.
    pub scale: f64,
}

/// The adapter currently attached to a Linear. Swapping the content of the slot switches
/// adapters per request without touching the base weights (no merge, no reload).
#[derive(Clone, Default, Debug)]
pub struct LoraSlot(Arc<RwLock<Option<LoraDelta>>>);

impl LoraSlot {
    pub fn set(&self, delta: Option<LoraDelta>) {
        *self.0.write().unwrap() = delta;
    }
    pub fn get(&self) -> Option<LoraDelta> {
        self.0.read().unwrap().clone()
    }
}

/// Every Linear layer of a model by module name (e.g.
/// `down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q`), with its shape.
#[derive(Clone, Default)]
pub struct LinearRegistry(Arc<Mutex<BTreeMap<String, (LoraSlot, usize, usize)>>>);

impl LinearRegistry {
    fn insert(&self, name: String, slot: LoraSlot, in_dim: usize, out_dim: usize) {
        self.0.lock().unwrap().insert(name, (slot, in_dim, out_dim));
    }
    /// `(name, slot, in_features, out_features)` sorted by name.
    pub fn all(&self) -> Vec<(String, LoraSlot, usize, usize)> {
        self.0
            .lock()
            .unwrap()
            .iter()
            .map(|(k, (s, i, o))| (k.clone(), s.clone(), *i, *o))
            .collect()
    }
    pub fn get(&self, name: &str) -> Option<(LoraSlot, usize, usize)> {
        self.0.lock().unwrap().get(name).cloned()
    }
    pub fn clear_all(&self) {
        for (_, (slot, _, _)) in self.0.lock().unwrap().iter() {
            slot.set(None);
        }
    }
}

thread_local! {
    static TRAINING: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Marks this thread as computing a training loss until the guard drops: every Linear then
/// takes the one-matmul path, so a loss's policy pass (gradients tracked) and its frozen
/// reference pass (nothing tracked) round identically and a zero-initialised adapter gives
/// exactly u = 0. Serving never sets it and keeps the batch-invariant per-sample path.
pub fn training_mode() -> TrainingMode {
    TrainingMode(TRAINING.with(|t| t.replace(true)))
}

pub struct TrainingMode(bool);

impl Drop for TrainingMode {
    fn drop(&mut self) {
        TRAINING.with(|t| t.set(self.0));
    }
}

fn in_training_mode() -> bool {
    TRAINING.with(|t| t.get())
}

#[derive(Clone, Debug)]
pub struct Linear {
    weight: Tensor,
    bias: Option<Tensor>,
    lora: LoraSlot,
}

impl Linear {
    pub fn new(
        w: &Weights,
        in_dim: usize,
        out_dim: usize,
        bias: bool,
        registry: Option<&LinearRegistry>,
    ) -> Result<Self> {
        let weight = w.get((out_dim, in_dim), "weight")?;
        let bias = if bias {
            Some(w.get(out_dim, "bias")?)
        } else {
            None
        };
        let lora = LoraSlot::default();
        if let Some(reg) = registry {
            reg.insert(w.prefix_name(), lora.clone(), in_dim, out_dim);
        }
        Ok(Self { weight, bias, lora })
    }

    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    fn forward_fused(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let dims = x.dims().to_vec();
        let in_dim = dims[dims.len() - 1];
        let x2 = x.reshape((x.elem_count() / in_dim, in_dim))?;
        let mut y = x2.matmul(&self.weight.t()?)?;
        if let Some(b) = &self.bias {
            y = y.broadcast_add(b)?;
        }
        if let Some(d) = self.lora.get() {
            let h = x2.matmul(&d.down.t()?)?.matmul(&d.up.t()?)?;
            y = (y + (h * d.scale)?)?;
        }
        let mut out_dims = dims;
        *out_dims.last_mut().unwrap() = y.dim(1)?;
        y.reshape(out_dims)
    }
}

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let dims = x.dims().to_vec();
        let in_dim = dims[dims.len() - 1];
        // One matmul per sample (leading dimension): gemm picks its kernel, and with it the
        // rounding, from the matrix shape, so one call over every sample's rows made a sample's
        // result depend on how many samples shared the batch (a server request came out a few
        // pixels different batched than alone). Per-sample calls have the same shapes at any
        // batch size; tests/server_concurrency.rs checks batched == alone bit for bit.
        let lora_trains = self
            .lora
            .get()
            .is_some_and(|d| d.down.track_op() || d.up.track_op());
        if in_training_mode() || x.track_op() || self.weight.track_op() || lora_trains {
            // Training: batch-invariance does not matter, one matmul over all rows is far faster.
            return self.forward_fused(x);
        }
        let lead = if dims.len() > 1 { dims[0] } else { 1 };
        let rows = x.elem_count() / in_dim / lead.max(1);
        let x3 = x.reshape((lead, rows, in_dim))?;
        let wt = self.weight.t()?;
        let lora = self.lora.get();
        let mut outs = Vec::with_capacity(lead);
        for i in 0..lead {
            let xi = x3.get(i)?.contiguous()?;
            let mut y = xi.matmul(&wt)?;
            if let Some(b) = &self.bias {
                y = y.broadcast_add(b)?;
            }
            if let Some(d) = &lora {
                let h = xi.matmul(&d.down.t()?)?.matmul(&d.up.t()?)?;
                y = (y + (h * d.scale)?)?;
            }
            outs.push(y);
        }
        let y = Tensor::stack(&outs, 0)?;
        let mut out_dims = dims;
        *out_dims.last_mut().unwrap() = y.dim(2)?;
        y.reshape(out_dims)
    }
}

#[derive(Clone, Debug)]
pub struct Conv2d {
    weight: Tensor,
    bias: Option<Tensor>,
    stride: usize,
    padding: usize,
}

impl Conv2d {
    pub fn new(
        w: &Weights,
        in_c: usize,
        out_c: usize,
        k: usize,
        stride: usize,
        padding: usize,
    ) -> Result<Self> {
        let weight = w.get((out_c, in_c, k, k), "weight")?;
        let bias = Some(w.get(out_c, "bias")?);
        Ok(Self {
            weight,
            bias,
            stride,
            padding,
        })
    }
}

/// Gradients of a convolution by im2col + matmul, attached to a forward pass computed by
/// candle's own (fast) conv2d: candle's CPU conv2d backward runs through its direct
/// conv_transpose2d and a kernel-sized conv, which made a training step of the 64x64 VAE several
/// times slower than its forward. Here both gradients are one matmul each plus an O(n) unfold.
struct ConvGrad {
    stride: usize,
    padding: usize,
}

impl ConvGrad {
    /// `x` [B, C, H, W] -> rows [B, Ho*Wo, C*k*k] in the weight's (c, ky, kx) order.
    fn im2col(
        &self,
        x: &[f32],
        (b, c, h, w): (usize, usize, usize, usize),
        k: usize,
        (ho, wo): (usize, usize),
    ) -> Vec<f32> {
        let (s, p) = (self.stride as isize, self.padding as isize);
        let ckk = c * k * k;
        let mut out = vec![0f32; b * ho * wo * ckk];
        for bi in 0..b {
            for oy in 0..ho {
                for ox in 0..wo {
                    let row = &mut out[((bi * ho + oy) * wo + ox) * ckk..][..ckk];
                    for ci in 0..c {
                        let plane = &x[(bi * c + ci) * h * w..][..h * w];
                        for ky in 0..k {
                            let iy = oy as isize * s + ky as isize - p;
                            if iy < 0 || iy >= h as isize {
                                continue;
                            }
                            for kx in 0..k {
                                let ix = ox as isize * s + kx as isize - p;
                                if ix >= 0 && ix < w as isize {
                                    row[(ci * k + ky) * k + kx] =
                                        plane[iy as usize * w + ix as usize];
                                }
                            }
                        }
                    }
                }
            }
        }
        out
    }

    /// The adjoint of `im2col`: rows [B, Ho*Wo, C*k*k] summed back into [B, C, H, W].
    fn col2im(
        &self,
        cols: &[f32],
        (b, c, h, w): (usize, usize, usize, usize),
        k: usize,
        (ho, wo): (usize, usize),
    ) -> Vec<f32> {
        let (s, p) = (self.stride as isize, self.padding as isize);
        let ckk = c * k * k;
        let mut out = vec![0f32; b * c * h * w];
        for bi in 0..b {
            for oy in 0..ho {
                for ox in 0..wo {
                    let row = &cols[((bi * ho + oy) * wo + ox) * ckk..][..ckk];
                    for ci in 0..c {
                        let plane = &mut out[(bi * c + ci) * h * w..][..h * w];
                        for ky in 0..k {
                            let iy = oy as isize * s + ky as isize - p;
                            if iy < 0 || iy >= h as isize {
                                continue;
                            }
                            for kx in 0..k {
                                let ix = ox as isize * s + kx as isize - p;
                                if ix >= 0 && ix < w as isize {
                                    plane[iy as usize * w + ix as usize] +=
                                        row[(ci * k + ky) * k + kx];
                                }
                            }
                        }
                    }
                }
            }
        }
        out
    }
}

impl candle_core::CustomOp3 for ConvGrad {
    fn name(&self) -> &'static str {
        "conv2d-with-im2col-grad"
    }

    /// Passes the precomputed convolution (third argument) through.
    fn cpu_fwd(
        &self,
        _: &candle_core::CpuStorage,
        _: &candle_core::Layout,
        _: &candle_core::CpuStorage,
        _: &candle_core::Layout,
        y: &candle_core::CpuStorage,
        ly: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
        let Some((start, end)) = ly.contiguous_offsets() else {
            candle_core::bail!("conv2d-with-im2col-grad: output must be contiguous");
        };
        match y {
            candle_core::CpuStorage::F32(v) => Ok((
                candle_core::CpuStorage::F32(v[start..end].to_vec()),
                ly.shape().clone(),
            )),
            _ => candle_core::bail!("conv2d-with-im2col-grad: f32 only"),
        }
    }

    fn bwd(
        &self,
        x: &Tensor,
        weight: &Tensor,
        _: &Tensor,
        _: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let xd = x.dims4()?;
        let (b, c, h, w) = xd;
        let (o, _, k, _) = weight.dims4()?;
        let (_, _, ho, wo) = grad.dims4()?;
        let ckk = c * k * k;
        let xv = x.detach().flatten_all()?.to_vec1::<f32>()?;
        let cols = Tensor::from_vec(
            self.im2col(&xv, xd, k, (ho, wo)),
            (b, ho * wo, ckk),
            x.device(),
        )?;
        let g = grad.detach().reshape((b, o, ho * wo))?;
        let grad_w = g.matmul(&cols)?.sum(0)?.reshape((o, c, k, k))?;
        let gcols = g
            .transpose(1, 2)?
            .contiguous()?
            .reshape((b * ho * wo, o))?
            .matmul(&weight.detach().reshape((o, ckk))?)?;
        let gx = self.col2im(&gcols.flatten_all()?.to_vec1::<f32>()?, xd, k, (ho, wo));
        Ok((
            Some(Tensor::from_vec(gx, (b, c, h, w), x.device())?),
            Some(grad_w),
            None,
        ))
    }
}

impl Module for Conv2d {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let training = x.track_op() || self.weight.track_op();
        let y = if training
            && x.device().is_cpu()
            && x.dtype() == DType::F32
            && self.weight.dtype() == DType::F32
        {
            let y = x
                .detach()
                .conv2d(&self.weight.detach(), self.padding, self.stride, 1, 1)?;
            x.apply_op3_arc(
                &self.weight,
                &y,
                std::sync::Arc::new(Box::new(ConvGrad {
                    stride: self.stride,
                    padding: self.padding,
                })),
            )?
        } else {
            x.conv2d(&self.weight, self.padding, self.stride, 1, 1)?
        };
        match &self.bias {
            Some(b) => y.broadcast_add(&b.reshape((1, b.dim(0)?, 1, 1))?),
            None => Ok(y),
        }
    }
}

/// Normalises the last dimension in f32 (f16 statistics over thousands of elements lose
/// precision; diffusers upcasts there too).
fn normalize_last(x: &Tensor, eps: f64) -> candle_core::Result<Tensor> {
    let dtype = x.dtype();
    let x = x.to_dtype(DType::F32)?;
    let mean = x.mean_keepdim(D::Minus1)?;
    let xc = x.broadcast_sub(&mean)?;
    let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
    xc.broadcast_div(&(var + eps)?.sqrt()?)?.to_dtype(dtype)
}

#[derive(Clone, Debug)]
pub struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f64,
}

impl LayerNorm {
    pub fn new(w: &Weights, dim: usize, eps: f64) -> Result<Self> {
        Ok(Self {
            weight: w.get(dim, "weight")?,
            bias: w.get(dim, "bias")?,
            eps,
        })
    }
}

impl Module for LayerNorm {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        normalize_last(x, self.eps)?
            .broadcast_mul(&self.weight)?
            .broadcast_add(&self.bias)
    }
}

#[derive(Clone, Debug)]
pub struct GroupNorm {
    weight: Tensor,
    bias: Tensor,
    groups: usize,
    eps: f64,
}

impl GroupNorm {
    pub fn new(w: &Weights, groups: usize, channels: usize, eps: f64) -> Result<Self> {
        if groups == 0 || channels % groups != 0 {
            return Err(super::ModelError::Config(format!(
                "{} channels are not divisible into {} groups (norm_num_groups)",
                channels, groups
            )));
        }
        Ok(Self {
            weight: w.get(channels, "weight")?,
            bias: w.get(channels, "bias")?,
            groups,
            eps,
        })
    }
}

impl Module for GroupNorm {
    /// Input `[B, C, ...]`.
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let dims = x.dims().to_vec();
        let (b, c) = (dims[0], dims[1]);
        let xg = x.reshape((b, self.groups, ()))?;
        let xn = normalize_last(&xg, self.eps)?.reshape(dims.as_slice())?;
        let mut bshape = vec![1usize; dims.len()];
        bshape[1] = c;
        xn.broadcast_mul(&self.weight.reshape(bshape.as_slice())?)?
            .broadcast_add(&self.bias.reshape(bshape.as_slice())?)
    }
}

/// Softmax over the last dimension, differentiable. The max is detached: softmax is
/// shift-invariant, so the gradient is exact without differentiating through it.
pub fn softmax_last_dim(x: &Tensor) -> candle_core::Result<Tensor> {
    let m = x.max_keepdim(D::Minus1)?.detach();
    let e = x.broadcast_sub(&m)?.exp()?;
    let s = e.sum_keepdim(D::Minus1)?;
    e.broadcast_div(&s)
}

pub fn sigmoid(x: &Tensor) -> candle_core::Result<Tensor> {
    // 1 / (1 + exp(-x)), composed so it has a backward pass.
    (x.neg()?.exp()? + 1.0)?.recip()
}

pub fn quick_gelu(x: &Tensor) -> candle_core::Result<Tensor> {
    x * sigmoid(&(x * 1.702)?)?
}

/// Scaled dot-product attention over `[B, N, heads*d]` inputs. Large problems are split along
/// the query axis so the score matrix never exceeds a fixed budget (SDXL at 1024² would
/// otherwise need tens of GB for the first self-attention).
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    mask: Option<&Tensor>,
) -> candle_core::Result<Tensor> {
    let (b, n, c) = q.dims3()?;
    let m = k.dim(1)?;
    let d = c / heads;
    let split = |t: &Tensor, len: usize| -> candle_core::Result<Tensor> {
        t.reshape((b, len, heads, d))?.transpose(1, 2)?.contiguous()
    };
    let q = split(q, n)?;
    let k = split(k, m)?;
    let v = split(v, m)?;
    let scale = 1.0 / (d as f64).sqrt();
    let kt = k.t()?;
    const SCORE_BUDGET: usize = 1 << 27; // elements per score chunk (512 MiB in f32)
    let per_query = b * heads * m;
    let chunk = (SCORE_BUDGET / per_query.max(1)).max(1);
    // The scale goes on q (n*d elements) rather than on the n*m scores.
    let q = (q * scale)?;
    let run = |q: &Tensor| -> candle_core::Result<Tensor> {
        let mut s = q.matmul(&kt)?;
        if let Some(mask) = mask {
            s = s.broadcast_add(mask)?;
        }
        let s32 = if s.dtype() == DType::F32 {
            s
        } else {
            s.to_dtype(DType::F32)?
        };
        // Inference takes candle-nn's fused kernel (one pass); when gradients are tracked it
        // has no backward, so training takes the composed version.
        let p = if s32.track_op() {
            softmax_last_dim(&s32)?
        } else {
            candle_nn::ops::softmax_last_dim(&s32)?
        };
        p.to_dtype(v.dtype())?.matmul(&v)
    };
    let out = if n <= chunk || mask.is_some() {
        run(&q)?
    } else {
        let mut parts = Vec::new();
        let mut start = 0;
        while start < n {
            let len = chunk.min(n - start);
            parts.push(run(&q.narrow(2, start, len)?)?);
            start += len;
        }
        Tensor::cat(&parts, 2)?
    };
    out.transpose(1, 2)?.reshape((b, n, c))
}
