//! Layers shared by the UNet, the VAE and the text encoders.
//!
//! Every operation records its backward pass: on f32 CPU tensors the heavy ones (linear,
//! convolution, norms, attention) run the fused kernels of `kernels`, each with an analytic
//! backward; elsewhere they are composed of candle-core ops. candle-nn's fused softmax /
//! layer-norm kernels record no backward, so gradients would silently vanish through them
//! (the bug that ruled out candle-transformers' UNet for training).

use super::kernels;
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
    /// Every layer's `(in_features, out_features)` by name.
    pub fn shapes(&self) -> BTreeMap<String, (usize, usize)> {
        self.0
            .lock()
            .unwrap()
            .iter()
            .map(|(k, (_, i, o))| (k.clone(), (*i, *o)))
            .collect()
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
        let mut weight = w.get((out_dim, in_dim), "weight")?;
        if weight.device().is_cpu() && weight.dtype() == DType::F32 && !weight.is_variable() {
            // Frozen CPU weights are kept column-major (`W^T` contiguous): `x W^T` is then the
            // product whose operands the GEMM kernels read in place (see kernels::linear).
            weight = weight.t()?.contiguous()?.t()?;
        }
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

    /// A 1x1 convolution over channels (SD 1.x's transformer `proj_in`/`proj_out`) as the
    /// per-pixel Linear it is, so LoRA files that adapt it (kohya's do) have a slot. Weights
    /// `[out, in, 1, 1]`.
    pub fn from_conv1x1(
        w: &Weights,
        in_dim: usize,
        out_dim: usize,
        registry: Option<&LinearRegistry>,
    ) -> Result<Self> {
        let raw = w.get((out_dim, in_dim, 1, 1), "weight")?;
        let frozen_cpu_f32 = raw.device().is_cpu() && raw.dtype() == DType::F32 && !raw.is_variable();
        let mut weight = raw.reshape((out_dim, in_dim))?;
        if frozen_cpu_f32 {
            // Column-major, as `new` keeps frozen CPU weights.
            weight = weight.t()?.contiguous()?.t()?;
        }
        let lora = LoraSlot::default();
        if let Some(reg) = registry {
            reg.insert(w.prefix_name(), lora.clone(), in_dim, out_dim);
        }
        Ok(Self {
            weight,
            bias: Some(w.get(out_dim, "bias")?),
            lora,
        })
    }

    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    fn forward_fused(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let dims = x.dims().to_vec();
        let in_dim = dims[dims.len() - 1];
        let x2 = x.reshape((x.elem_count() / in_dim, in_dim))?;
        let lora = self.lora.get();
        let mut parts = vec![&self.weight];
        parts.extend(&self.bias);
        if let Some(d) = &lora {
            parts.extend([&d.down, &d.up]);
        }
        if is_cpu_f32(&[&x2]) && is_cpu_f32(&parts) {
            let mut y = kernels::linear::linear(&x2, &self.weight, self.bias.as_ref())?;
            if let Some(d) = &lora {
                let h = kernels::linear::linear(&x2, &d.down, None)?;
                let h = kernels::linear::linear(&h, &d.up, None)?;
                y = (y + (h * d.scale)?)?;
            }
            let mut out_dims = dims;
            *out_dims.last_mut().unwrap() = y.dim(1)?;
            return y.reshape(out_dims);
        }
        let mut y = x2.matmul(&self.weight.t()?)?;
        if let Some(b) = &self.bias {
            y = y.broadcast_add(b)?;
        }
        if let Some(d) = lora {
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
        let mut outs = Vec::with_capacity(lead);
        for i in 0..lead {
            // The fused kernel on f32: both cores, bias folded in (candle's matmul would run
            // on one thread, candle's own pool being pinned to one in main.rs).
            outs.push(self.forward_fused(&x3.get(i)?)?);
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
        let mut weight = w.get((out_c, in_c, k, k), "weight")?;
        if k > 1 && weight.device().is_cpu() && weight.dtype() == DType::F32 && !weight.is_variable() {
            // Frozen CPU weights channels last (see kernels::conv::channels_last).
            weight = kernels::conv::channels_last(&weight)?;
        }
        let bias = Some(w.get(out_c, "bias")?);
        Ok(Self {
            weight,
            bias,
            stride,
            padding,
        })
    }
}

impl Module for Conv2d {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        if let Some(bias) = &self.bias {
            if is_cpu_f32(&[x, &self.weight, bias]) {
                return kernels::conv::conv2d(x, &self.weight, bias, self.stride, self.padding);
            }
        }
        let y = x.conv2d(&self.weight, self.padding, self.stride, 1, 1)?;
        match &self.bias {
            Some(b) => y.broadcast_add(&b.reshape((1, b.dim(0)?, 1, 1))?),
            None => Ok(y),
        }
    }
}

/// Whether every tensor can take the fused CPU kernels.
fn is_cpu_f32(ts: &[&Tensor]) -> bool {
    ts.iter()
        .all(|t| t.device().is_cpu() && t.dtype() == DType::F32)
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
        if is_cpu_f32(&[x, &self.weight, &self.bias]) {
            let op = kernels::norm::LayerNormOp { eps: self.eps };
            return x
                .contiguous()?
                .apply_op3_arc(&self.weight, &self.bias, Arc::new(Box::new(op)));
        }
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

impl GroupNorm {
    /// `silu(group_norm(x))`, the pair every ResNet block and output head applies, in one pass
    /// on the CPU.
    pub fn forward_silu(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        if is_cpu_f32(&[x, &self.weight, &self.bias]) {
            return self.fused(x, true);
        }
        self.forward(x)?.silu()
    }

    fn fused(&self, x: &Tensor, silu: bool) -> candle_core::Result<Tensor> {
        let op = kernels::norm::GroupNormOp {
            groups: self.groups,
            eps: self.eps,
            silu,
        };
        x.contiguous()?
            .apply_op3_arc(&self.weight, &self.bias, Arc::new(Box::new(op)))
    }
}

impl Module for GroupNorm {
    /// Input `[B, C, ...]`.
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        if is_cpu_f32(&[x, &self.weight, &self.bias]) {
            return self.fused(x, false);
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

/// Which keys a query may attend to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttentionMask {
    /// Every key.
    None,
    /// Keys up to the query's own position (the CLIP text encoder).
    Causal,
}

/// Whether [`attention`] may take the fused kernel: yes unless `DSPO_ATTENTION_KERNEL=composed`
/// is set, which exists to compare the two forms on the same build (benchmarks, diagnosis).
fn fused_attention_enabled() -> bool {
    static FUSED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *FUSED.get_or_init(|| {
        std::env::var("DSPO_ATTENTION_KERNEL").map_or(true, |v| !v.eq_ignore_ascii_case("composed"))
    })
}

/// Scaled dot-product attention over `[B, N, heads*d]` queries and `[B, M, heads*d]` keys and
/// values. On the CPU in f32, and on CUDA builds in f32/f16/bf16 with heads up to 160 wide, it
/// is the fused kernel (no score matrix is ever stored, forward or backward); elsewhere it is
/// composed from tensor ops, split along the query axis so the score matrix never exceeds a
/// fixed budget (SDXL at 1024² would otherwise need tens of GB for the first self-attention).
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    mask: AttentionMask,
) -> candle_core::Result<Tensor> {
    let causal = mask == AttentionMask::Causal;
    if fused_attention_enabled() {
        if is_cpu_f32(&[q, k, v]) {
            return kernels::attention::fused_attention(q, k, v, heads, causal);
        }
        #[cfg(feature = "cuda")]
        if q.device().is_cuda()
            && q.dtype() == k.dtype()
            && q.dtype() == v.dtype()
            && heads > 0
            && kernels::cuda::attention_supported(q.dtype(), q.dim(2)? / heads)
        {
            return kernels::attention::fused_attention(q, k, v, heads, causal);
        }
    }
    composed_attention(q, k, v, heads, mask)
}

/// The reference form of [`attention`], from candle ops (any device and dtype).
pub fn composed_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    mask: AttentionMask,
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
    let run = |q: &Tensor, start: usize| -> candle_core::Result<Tensor> {
        let mut s = q.matmul(&kt)?;
        if mask == AttentionMask::Causal {
            let rows = s.dim(2)?;
            let bias: Vec<f32> = (0..rows)
                .flat_map(|i| {
                    (0..m).map(move |j| {
                        if j > start + i {
                            f32::NEG_INFINITY
                        } else {
                            0.0
                        }
                    })
                })
                .collect();
            let bias = Tensor::from_vec(bias, (1, 1, rows, m), s.device())?.to_dtype(s.dtype())?;
            s = s.broadcast_add(&bias)?;
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
    let out = if n <= chunk {
        run(&q, 0)?
    } else {
        let mut parts = Vec::new();
        let mut start = 0;
        while start < n {
            let len = chunk.min(n - start);
            parts.push(run(&q.narrow(2, start, len)?, start)?);
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

    /// The Conv2d layer must match candle's own conv2d and its autograd (forward and all three
    /// gradients), for strides, paddings and 1x1 kernels. Sizes where stride does not divide
    /// evenly are left out: candle's own conv backward mis-sizes them.
    #[test]
    fn conv2d_layer_matches_candle_conv_and_its_gradients() -> candle_core::Result<()> {
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
