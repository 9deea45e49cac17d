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
        if !x.device().is_cpu() {
            // On a GPU, one launch per sample would cost more than the matmul itself, and
            // cuBLAS picks its algorithm per shape anyway: the bit-for-bit batched == alone
            // guarantee is a CPU one (tests/server_concurrency.rs).
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

/// Training-time convolution on the CPU by explicit im2col + one GEMM for the whole batch, with
/// its own backward. candle's CPU conv2d tiles each image separately (an 8x8 latent is one
/// 64-column GEMM per image) and its backward runs a direct conv_transpose2d; on the shapes UNet
/// and VAE that made a training step several times slower than PyTorch. Here the forward, both
/// gradients and the bias gradient are one matmul or one contiguous reduction each, and the
/// unfolded input is kept from the forward for the weight gradient.
struct ConvGrad {
    stride: usize,
    padding: usize,
    /// Forward output, computed outside the op so it can use tensor matmuls.
    y: Tensor,
    /// The unfolded input [C*k*k, B*Ho*Wo].
    cols: Tensor,
}

/// Output size of a convolution along one axis.
fn conv_out(n: usize, k: usize, stride: usize, padding: usize) -> usize {
    (n + 2 * padding - k) / stride + 1
}

/// `x` [B, C, H, W] -> columns [C*k*k, B*Ho*Wo]: one row per kernel tap (the weight's
/// (c, ky, kx) order), each a shifted copy of input lines, so reads and writes stay sequential.
fn im2col(
    x: &[f32],
    (b, c, h, w): (usize, usize, usize, usize),
    k: usize,
    stride: usize,
    padding: usize,
) -> Vec<f32> {
    use rayon::prelude::*;
    let (ho, wo) = (
        conv_out(h, k, stride, padding),
        conv_out(w, k, stride, padding),
    );
    let n = b * ho * wo;
    let mut out = vec![0f32; c * k * k * n];
    out.par_chunks_mut(n).enumerate().for_each(|(r, row)| {
        let (ci, ky, kx) = (r / (k * k), (r / k) % k, r % k);
        for bi in 0..b {
            let plane = &x[(bi * c + ci) * h * w..][..h * w];
            for oy in 0..ho {
                let iy = (oy * stride + ky) as isize - padding as isize;
                if iy < 0 || iy >= h as isize {
                    continue;
                }
                let line = &plane[iy as usize * w..][..w];
                let dst = &mut row[(bi * ho + oy) * wo..][..wo];
                for (ox, d) in dst.iter_mut().enumerate() {
                    let ix = (ox * stride + kx) as isize - padding as isize;
                    if ix >= 0 && ix < w as isize {
                        *d = line[ix as usize];
                    }
                }
            }
        }
    });
    out
}

/// The adjoint of `im2col`: columns [C*k*k, B*Ho*Wo] summed back into [B, C, H, W].
fn col2im(
    cols: &[f32],
    (b, c, h, w): (usize, usize, usize, usize),
    k: usize,
    stride: usize,
    padding: usize,
) -> Vec<f32> {
    use rayon::prelude::*;
    let (ho, wo) = (
        conv_out(h, k, stride, padding),
        conv_out(w, k, stride, padding),
    );
    let n = b * ho * wo;
    let mut out = vec![0f32; b * c * h * w];
    out.par_chunks_mut(h * w)
        .enumerate()
        .for_each(|(pi, plane)| {
            let (bi, ci) = (pi / c, pi % c);
            for ky in 0..k {
                for kx in 0..k {
                    let row = &cols[((ci * k + ky) * k + kx) * n..][..n];
                    for oy in 0..ho {
                        let iy = (oy * stride + ky) as isize - padding as isize;
                        if iy < 0 || iy >= h as isize {
                            continue;
                        }
                        let line = &mut plane[iy as usize * w..][..w];
                        let src = &row[(bi * ho + oy) * wo..][..wo];
                        for (ox, v) in src.iter().enumerate() {
                            let ix = (ox * stride + kx) as isize - padding as isize;
                            if ix >= 0 && ix < w as isize {
                                line[ix as usize] += v;
                            }
                        }
                    }
                }
            }
        });
    out
}

impl ConvGrad {
    /// Builds the op for `x` (contiguous f32 [B, C, H, W]) and computes its forward output.
    fn new(
        x: &Tensor,
        weight: &Tensor,
        bias: &Tensor,
        stride: usize,
        padding: usize,
    ) -> candle_core::Result<Self> {
        let xd = x.dims4()?;
        let (b, _, h, w) = xd;
        let (o, _, k, _) = weight.dims4()?;
        let (ho, wo) = (
            conv_out(h, k, stride, padding),
            conv_out(w, k, stride, padding),
        );
        let xv = x.detach().flatten_all()?.to_vec1::<f32>()?;
        let cols = im2col(&xv, xd, k, stride, padding);
        let ckk = cols.len() / (b * ho * wo);
        let cols = Tensor::from_vec(cols, (ckk, b * ho * wo), x.device())?;
        let y = weight
            .detach()
            .reshape((o, ckk))?
            .matmul(&cols)?
            .reshape((o, b, ho * wo))?
            .transpose(0, 1)?
            .broadcast_add(&bias.detach().reshape((1, o, 1))?)?
            .reshape((b, o, ho, wo))?
            .contiguous()?;
        Ok(Self {
            stride,
            padding,
            y,
            cols,
        })
    }
}

impl candle_core::CustomOp3 for ConvGrad {
    fn name(&self) -> &'static str {
        "conv2d-im2col"
    }

    /// Hands out the output computed in `new`.
    fn cpu_fwd(
        &self,
        _: &candle_core::CpuStorage,
        _: &candle_core::Layout,
        _: &candle_core::CpuStorage,
        _: &candle_core::Layout,
        _: &candle_core::CpuStorage,
        _: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
        let v = self.y.flatten_all()?.to_vec1::<f32>()?;
        Ok((candle_core::CpuStorage::F32(v), self.y.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        weight: &Tensor,
        bias: &Tensor,
        _: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let xd = x.dims4()?;
        let (o, c, k, _) = weight.dims4()?;
        let (b, _, ho, wo) = grad.dims4()?;
        let g = grad.detach().reshape((b, o, ho * wo))?;
        // Frozen weights (LoRA training, the input-only gradient) skip their GEMM.
        let grad_b = match bias.track_op() {
            // A contiguous reduction over pixels first, then the small batch sum.
            true => Some(g.sum(2)?.sum(0)?),
            false => None,
        };
        let gt = g.transpose(0, 1)?.contiguous()?.reshape((o, b * ho * wo))?;
        let grad_w = match weight.track_op() {
            true => Some(gt.matmul(&self.cols.t()?)?.reshape((o, c, k, k))?),
            false => None,
        };
        let grad_x = match x.track_op() {
            true => {
                let wm = weight.detach().reshape((o, c * k * k))?;
                let gcols = wm.t()?.matmul(&gt)?;
                let gx = col2im(
                    &gcols.flatten_all()?.to_vec1::<f32>()?,
                    xd,
                    k,
                    self.stride,
                    self.padding,
                );
                Some(Tensor::from_vec(gx, xd, x.device())?)
            }
            false => None,
        };
        Ok((grad_x, grad_w, grad_b))
    }
}

/// Largest unfolded input (bytes) an untracked convolution builds in training mode. A frozen
/// encoder pass (the VAE encoding a preference batch) needs no backward, so past this size it
/// falls back to candle's tiled conv, whose memory is bounded by its tile: an SD VAE at 512x512
/// would otherwise unfold ~1.2 GB per image in its first block. Tracked convolutions always
/// unfold (their backward reuses the columns).
const UNTRACKED_IM2COL_MAX_BYTES: usize = 512 << 20;

impl Module for Conv2d {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        // In training mode untracked passes (the reference model, the frozen VAE) take the same
        // path as tracked ones, so policy and reference agree bit for bit where their weights
        // do, and frozen encoders get the batched GEMM too. (Past the size cap, far beyond what
        // trains on a CPU, an untracked reference pass rounds differently from its policy.)
        let tracked = x.track_op()
            || self.weight.track_op()
            || self.bias.as_ref().is_some_and(|b| b.track_op());
        let fits = || -> candle_core::Result<bool> {
            let (b, c, h, w) = x.dims4()?;
            let k = self.weight.dim(2)?;
            let cols = c * k * k * b
                * conv_out(h, k, self.stride, self.padding)
                * conv_out(w, k, self.stride, self.padding);
            Ok(cols * 4 <= UNTRACKED_IM2COL_MAX_BYTES)
        };
        if (tracked || (in_training_mode() && fits()?))
            && x.device().is_cpu()
            && x.dtype() == DType::F32
            && self.weight.dtype() == DType::F32
        {
            if let Some(bias) = &self.bias {
                let x = x.contiguous()?;
                let op = ConvGrad::new(&x, &self.weight, bias, self.stride, self.padding)?;
                return x.apply_op3_arc(&self.weight, bias, std::sync::Arc::new(Box::new(op)));
            }
        }
        let y = x.conv2d(&self.weight, self.padding, self.stride, 1, 1)?;
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

/// GroupNorm with its affine part as one CPU op with a hand-written backward, for training.
/// Composed from tensor ops it is ~10 passes forward and more backward, and the gradients of
/// the per-channel weight and bias go through candle's strided reductions over (B, H, W):
/// together the largest non-matmul cost of a training step on the shapes VAE.
struct GroupNormOp {
    groups: usize,
    eps: f64,
}

impl GroupNormOp {
    /// Per (batch, group): mean and 1/std over the group's channels and pixels.
    fn stats(&self, x: &[f32], (b, c, hw): (usize, usize, usize)) -> Vec<(f32, f32)> {
        let n = c / self.groups * hw;
        (0..b * self.groups)
            .map(|i| {
                let v = &x[i * n..][..n];
                let mean = v.iter().map(|&a| a as f64).sum::<f64>() / n as f64;
                let var = v.iter().map(|&a| (a as f64 - mean).powi(2)).sum::<f64>() / n as f64;
                (mean as f32, (1.0 / (var + self.eps).sqrt()) as f32)
            })
            .collect()
    }
}

fn cpu_f32<'a>(
    s: &'a candle_core::CpuStorage,
    l: &candle_core::Layout,
) -> candle_core::Result<&'a [f32]> {
    match (s, l.contiguous_offsets()) {
        (candle_core::CpuStorage::F32(v), Some((a, b))) => Ok(&v[a..b]),
        _ => candle_core::bail!("group-norm: contiguous f32 expected"),
    }
}

impl candle_core::CustomOp3 for GroupNormOp {
    fn name(&self) -> &'static str {
        "group-norm"
    }

    fn cpu_fwd(
        &self,
        xs: &candle_core::CpuStorage,
        xl: &candle_core::Layout,
        ws: &candle_core::CpuStorage,
        wl: &candle_core::Layout,
        bs: &candle_core::CpuStorage,
        bl: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
        use rayon::prelude::*;
        let (x, w, bias) = (cpu_f32(xs, xl)?, cpu_f32(ws, wl)?, cpu_f32(bs, bl)?);
        let dims = xl.dims();
        let (b, c) = (dims[0], dims[1]);
        let hw = x.len() / (b * c);
        let stats = self.stats(x, (b, c, hw));
        let cg = c / self.groups;
        let mut y = vec![0f32; x.len()];
        y.par_chunks_mut(hw).enumerate().for_each(|(p, out)| {
            let (bi, ci) = (p / c, p % c);
            let (mean, rstd) = stats[bi * self.groups + ci / cg];
            let (sc, sh) = (rstd * w[ci], bias[ci] - mean * rstd * w[ci]);
            for (o, &v) in out.iter_mut().zip(&x[p * hw..][..hw]) {
                *o = v * sc + sh;
            }
        });
        Ok((candle_core::CpuStorage::F32(y), xl.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        weight: &Tensor,
        bias: &Tensor,
        _: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        use rayon::prelude::*;
        let dims = x.dims().to_vec();
        let (b, c) = (dims[0], dims[1]);
        let xv = x.detach().flatten_all()?.to_vec1::<f32>()?;
        let gv = grad.detach().flatten_all()?.to_vec1::<f32>()?;
        let w = weight.detach().to_vec1::<f32>()?;
        let hw = xv.len() / (b * c);
        let stats = self.stats(&xv, (b, c, hw));
        let (g, cg) = (self.groups, c / self.groups);
        let n = (cg * hw) as f32;
        // Per (batch, channel): sum(dy) and sum(dy * xhat), the pieces of every gradient.
        let sums: Vec<(f32, f32)> = (0..b * c)
            .into_par_iter()
            .map(|p| {
                let (mean, rstd) = stats[p / c * g + p % c / cg];
                let (xs, gs) = (&xv[p * hw..][..hw], &gv[p * hw..][..hw]);
                xs.iter().zip(gs).fold((0f32, 0f32), |(s, sx), (&a, &d)| {
                    (s + d, sx + d * (a - mean) * rstd)
                })
            })
            .collect();
        let grad_x = match x.track_op() {
            true => {
                let mut gx = vec![0f32; xv.len()];
                gx.par_chunks_mut(cg * hw)
                    .enumerate()
                    .for_each(|(bg, out)| {
                        let (bi, gi) = (bg / g, bg % g);
                        let (mean, rstd) = stats[bg];
                        // Means over the group of dxhat = dy * w and of dxhat * xhat.
                        let (mut m1, mut m2) = (0f32, 0f32);
                        for ci in gi * cg..(gi + 1) * cg {
                            let (s, sx) = sums[bi * c + ci];
                            m1 += s * w[ci];
                            m2 += sx * w[ci];
                        }
                        let (m1, m2) = (m1 / n, m2 / n);
                        for (j, o) in out.iter_mut().enumerate() {
                            let ci = gi * cg + j / hw;
                            let idx = (bi * c + ci) * hw + j % hw;
                            let xhat = (xv[idx] - mean) * rstd;
                            *o = rstd * (gv[idx] * w[ci] - m1 - xhat * m2);
                        }
                    });
                Some(Tensor::from_vec(gx, dims.as_slice(), x.device())?)
            }
            false => None,
        };
        let per_channel = |pick: fn(&(f32, f32)) -> f32| {
            let mut v = vec![0f32; c];
            for (p, s) in sums.iter().enumerate() {
                v[p % c] += pick(s);
            }
            Tensor::from_vec(v, c, x.device())
        };
        let grad_w = match weight.track_op() {
            true => Some(per_channel(|s| s.1)?),
            false => None,
        };
        let grad_b = match bias.track_op() {
            true => Some(per_channel(|s| s.0)?),
            false => None,
        };
        Ok((grad_x, grad_w, grad_b))
    }
}

impl Module for GroupNorm {
    /// Input `[B, C, ...]`.
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let tracked =
            in_training_mode() || x.track_op() || self.weight.track_op() || self.bias.track_op();
        if tracked
            && x.device().is_cpu()
            && x.dtype() == DType::F32
            && self.weight.dtype() == DType::F32
        {
            let op = GroupNormOp {
                groups: self.groups,
                eps: self.eps,
            };
            return x
                .contiguous()?
                .apply_op3_arc(&self.weight, &self.bias, Arc::new(Box::new(op)));
        }
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

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// The im2col training convolution must match candle's own conv2d and its autograd
    /// (forward and all three gradients), for strides, paddings and 1x1 kernels. Sizes where
    /// stride does not divide evenly are left out: candle's own conv backward mis-sizes them.
    #[test]
    fn im2col_conv_matches_candle_conv_and_its_gradients() -> candle_core::Result<()> {
        let dev = Device::Cpu;
        for &(k, stride, padding, h, w) in &[
            (3, 1, 1, 7, 6),
            (3, 2, 0, 9, 9),
            (3, 2, 1, 5, 5),
            (1, 1, 0, 4, 3),
        ] {
            let x = Var::from_tensor(&Tensor::randn(0f32, 1., (2, 3, h, w), &dev)?)?;
            let wt = Var::from_tensor(&Tensor::randn(0f32, 1., (4, 3, k, k), &dev)?)?;
            let b = Var::from_tensor(&Tensor::randn(0f32, 1., 4, &dev)?)?;
            let conv = Conv2d {
                weight: wt.as_tensor().clone(),
                bias: Some(b.as_tensor().clone()),
                stride,
                padding,
            };
            let ours = conv.forward(x.as_tensor())?;
            let reference = x
                .as_tensor()
                .conv2d(wt.as_tensor(), padding, stride, 1, 1)?
                .broadcast_add(&b.as_tensor().reshape((1, 4, 1, 1))?)?;
            assert_eq!(ours.dims(), reference.dims());
            let r = Tensor::randn(0f32, 1., ours.shape(), &dev)?;
            let g_ours = (&ours * &r)?.sum_all()?.backward()?;
            let g_ref = (&reference * &r)?.sum_all()?.backward()?;
            let max_diff = |a: &Tensor, b: &Tensor| -> candle_core::Result<f32> {
                (a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()
            };
            assert!(
                max_diff(&ours, &reference)? < 1e-4,
                "forward k{k} s{stride} p{padding}"
            );
            for (name, v) in [("x", &x), ("weight", &wt), ("bias", &b)] {
                let (a, e) = (
                    g_ours.get(v.as_tensor()).unwrap(),
                    g_ref.get(v.as_tensor()).unwrap(),
                );
                assert!(
                    max_diff(a, e)? < 1e-3,
                    "grad {name} k{k} s{stride} p{padding}"
                );
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod group_norm_tests {
    use super::*;
    use candle_core::{Device, Var};

    /// The fused training GroupNorm equals the composed one (the inference path) in value and in
    /// all three gradients.
    #[test]
    fn fused_group_norm_matches_composed_ops() -> candle_core::Result<()> {
        let dev = Device::Cpu;
        for &(groups, c) in &[(1usize, 6usize), (3, 6), (6, 6)] {
            let x = Var::from_tensor(&(Tensor::randn(0f32, 2., (2, c, 5, 3), &dev)? + 0.7)?)?;
            let w = Var::from_tensor(&Tensor::randn(1f32, 0.5, c, &dev)?)?;
            let b = Var::from_tensor(&Tensor::randn(0f32, 0.5, c, &dev)?)?;
            let gn = GroupNorm {
                weight: w.as_tensor().clone(),
                bias: b.as_tensor().clone(),
                groups,
                eps: 1e-5,
            };
            let fused = gn.forward(x.as_tensor())?;
            let xg = x.as_tensor().reshape((2, groups, ()))?;
            let composed = normalize_last(&xg, 1e-5)?
                .reshape((2, c, 5, 3))?
                .broadcast_mul(&w.as_tensor().reshape((1, c, 1, 1))?)?
                .broadcast_add(&b.as_tensor().reshape((1, c, 1, 1))?)?;
            let r = Tensor::randn(0f32, 1., fused.shape(), &dev)?;
            let gf = (&fused * &r)?.sum_all()?.backward()?;
            let gc = (&composed * &r)?.sum_all()?.backward()?;
            let max_diff = |a: &Tensor, b: &Tensor| -> candle_core::Result<f32> {
                (a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()
            };
            assert!(
                max_diff(&fused, &composed)? < 1e-4,
                "forward groups {groups}"
            );
            for (name, v) in [("x", &x), ("weight", &w), ("bias", &b)] {
                let (a, e) = (
                    gf.get(v.as_tensor()).unwrap(),
                    gc.get(v.as_tensor()).unwrap(),
                );
                assert!(max_diff(a, e)? < 1e-3, "grad {name} groups {groups}");
            }
        }
        Ok(())
    }
}
