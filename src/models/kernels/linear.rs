//! `y = x W^T (+ b)` as one custom op with its own backward.
//!
//! candle's composed `matmul` + `broadcast_add` is correct but, in a backward pass, costs twice:
//! it computes the gradient of every operand, including a frozen base weight under LoRA (one
//! wasted GEMM per layer and a weight-sized buffer kept until the step ends), and the gradient
//! it hands a trainable weight is itself a graph node that keeps the layer's output gradient
//! alive until the whole backward is over. Here the bias is folded into the GEMM's destination,
//! only tracked operands get a gradient, and every gradient is a plain, detached tensor.

use super::gemm::{sgemm, Par, Strided};
use super::{cpu_f32, storage_f32, uninit_vec};
use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Shape, Tensor};

/// `[M, K] x [N, K]^T`, the shapes checked.
fn dims(xl: &Layout, wl: &Layout) -> candle_core::Result<(usize, usize, usize)> {
    let (m, k) = xl.shape().dims2()?;
    let (n, kw) = wl.shape().dims2()?;
    if k != kw {
        candle_core::bail!("linear: input [{m}, {k}] and weight [{n}, {kw}] do not fit");
    }
    Ok((m, n, k))
}

/// The slice behind a weight `[N, K]` and the strides of `W^T [K, N]` in it. The weight is
/// row-major as loaded, or column-major (`W^T` contiguous, as `nn::Linear` keeps frozen CPU
/// weights: the product `x W^T` then reads both operands in the order the GEMM's kernels
/// want, without packing the activations).
fn weight_view<'a>(s: &'a CpuStorage, l: &Layout) -> candle_core::Result<(&'a [f32], Strided)> {
    let (n, k) = l.shape().dims2()?;
    if l.is_contiguous() {
        return Ok((cpu_f32(s, l, "linear")?, Strided::new(0, 1, k)));
    }
    match s {
        CpuStorage::F32(v) if column_major(l) => {
            let start = l.start_offset();
            Ok((&v[start..start + n * k], Strided::new(0, n, 1)))
        }
        _ => candle_core::bail!("linear: weight must be contiguous or transposed-contiguous"),
    }
}

/// A `[N, K]` layout whose transpose is contiguous.
fn column_major(l: &Layout) -> bool {
    matches!((l.shape().dims(), l.stride()), (&[n, _], &[1, ld]) if ld == n)
}

/// Whether `linear` takes this weight as it is (see [`weight_view`]).
pub fn weight_layout_ok(w: &Tensor) -> bool {
    w.layout().is_contiguous() || column_major(w.layout())
}

fn forward(x: &[f32], w: &[f32], wt: Strided, b: Option<&[f32]>, (m, n, k): (usize, usize, usize)) -> Vec<f32> {
    let mut y = uninit_vec(m * n);
    if let Some(b) = b {
        for row in y.chunks_exact_mut(n) {
            row.copy_from_slice(b);
        }
    }
    sgemm(
        (m, n, k),
        &mut y,
        Strided::new(0, n, 1),
        b.is_some(),
        x,
        Strided::new(0, k, 1),
        w,
        wt,
        1.0,
        Par::Pool,
    );
    y
}

/// Gradients of the tracked operands among `x [M, K]`, `w [N, K]` and a bias `[N]`.
fn backward(
    x: &Tensor,
    w: &Tensor,
    bias_tracked: bool,
    grad: &Tensor,
) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
    let grad = grad.contiguous()?;
    let (m, k) = x.dims2()?;
    let (n, _) = w.dims2()?;
    let dev = x.device();
    let (gs, gl) = grad.storage_and_layout();
    let g = storage_f32(&gs, gl, "linear backward")?;
    // One GEMM `(rows x cols) = lhs x rhs` into a fresh, detached tensor.
    let product = |(rows, cols, inner): (usize, usize, usize),
                   lhs: &[f32],
                   a: Strided,
                   rhs: &[f32],
                   b: Strided| {
        let mut out = uninit_vec(rows * cols);
        sgemm(
            (rows, cols, inner),
            &mut out,
            Strided::new(0, cols, 1),
            false,
            lhs,
            a,
            rhs,
            b,
            1.0,
            Par::Pool,
        );
        Tensor::from_vec(out, (rows, cols), dev)
    };
    let grad_x = if x.track_op() {
        let (ws, wl) = w.storage_and_layout();
        let (wv, wt) = match &*ws {
            candle_core::Storage::Cpu(c) => weight_view(c, wl)?,
            _ => candle_core::bail!("linear backward: CPU tensors expected"),
        };
        // dX [M, K] = G [M, N] x W [N, K]
        Some(product(
            (m, k, n),
            g,
            Strided::new(0, n, 1),
            wv,
            Strided::new(wt.off, wt.cs, wt.rs),
        )?)
    } else {
        None
    };
    let grad_w = if w.track_op() {
        let (xs, xl) = x.storage_and_layout();
        let xv = storage_f32(&xs, xl, "linear backward")?;
        // dW [N, K] = G^T [N, M] x X [M, K]
        Some(product(
            (n, k, m),
            g,
            Strided::new(0, 1, n),
            xv,
            Strided::new(0, k, 1),
        )?)
    } else {
        None
    };
    let grad_b = if bias_tracked {
        let mut db = vec![0f32; n];
        for row in g.chunks_exact(n) {
            for (d, v) in db.iter_mut().zip(row) {
                *d += v;
            }
        }
        Some(Tensor::from_vec(db, n, dev)?)
    } else {
        None
    };
    Ok((grad_x, grad_w, grad_b))
}

struct LinearOp;

impl CustomOp2 for LinearOp {
    fn name(&self) -> &'static str {
        "linear"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let mnk = dims(xl, wl)?;
        let (w, wt) = weight_view(ws, wl)?;
        let y = forward(cpu_f32(xs, xl, "linear")?, w, wt, None, mnk);
        Ok((CpuStorage::F32(y), Shape::from((mnk.0, mnk.1))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let (gx, gw, _) = backward(x, w, false, grad)?;
        Ok((gx, gw))
    }
}

struct LinearBiasOp;

impl CustomOp3 for LinearBiasOp {
    fn name(&self) -> &'static str {
        "linear-bias"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let mnk = dims(xl, wl)?;
        let b = cpu_f32(bs, bl, "linear")?;
        if b.len() != mnk.1 {
            candle_core::bail!("linear: bias of {} for {} outputs", b.len(), mnk.1);
        }
        let (w, wt) = weight_view(ws, wl)?;
        let y = forward(cpu_f32(xs, xl, "linear")?, w, wt, Some(b), mnk);
        Ok((CpuStorage::F32(y), Shape::from((mnk.0, mnk.1))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        backward(x, w, b.track_op(), grad)
    }
}

/// `x [M, K] W^T [N, K] (+ b [N])` on contiguous f32 CPU tensors.
pub fn linear(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> candle_core::Result<Tensor> {
    let x = x.contiguous()?;
    let w = if weight_layout_ok(w) { w.clone() } else { w.contiguous()? };
    match b {
        Some(b) => x.apply_op3(&w, &b.contiguous()?, LinearBiasOp),
        None => x.apply_op2(&w, LinearOp),
    }
}
