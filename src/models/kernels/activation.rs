//! GEGLU (`a * gelu(gate)` over the two halves of the feed-forward projection) as one op.
//! Composed, it was a strided copy of each half, an erf GELU and a product forward, and a
//! backward of about a dozen full-size temporaries (candle's GELU derivative is built from
//! tensor ops) plus two zero-padded copies to route the halves' gradients back into the
//! projection's output. Here both directions are one pass over the rows, with the same `erff`
//! as candle's GELU, so the forward values are the composed ones.

use super::{cpu_f32, storage_f32, uninit_vec};
use candle_core::{CpuStorage, Layout, Shape, Tensor};
use rayon::prelude::*;

const FRAC_1_SQRT_2: f32 = std::f32::consts::FRAC_1_SQRT_2;
/// 1 / sqrt(2 pi)
const INV_SQRT_2PI: f32 = 0.398_942_3;

#[inline]
fn gelu(x: f32) -> f32 {
    (libm::erff(x * FRAC_1_SQRT_2) + 1.0) * 0.5 * x
}

/// d/dx gelu(x) = Phi(x) + x phi(x).
#[inline]
fn gelu_grad(x: f32) -> f32 {
    0.5 * (1.0 + libm::erff(x * FRAC_1_SQRT_2)) + x * INV_SQRT_2PI * (-0.5 * x * x).exp()
}

/// Rows of at least this many elements per rayon task.
const CHUNK: usize = 1 << 14;

pub struct GeGluOp;

fn halves(l: &Layout) -> candle_core::Result<(usize, usize)> {
    let dims = l.shape().dims();
    let two_i = *dims.last().unwrap_or(&0);
    if two_i == 0 || two_i % 2 != 0 {
        candle_core::bail!("geglu: last dimension {two_i} is not even");
    }
    Ok((l.shape().elem_count() / two_i, two_i / 2))
}

impl candle_core::CustomOp1 for GeGluOp {
    fn name(&self) -> &'static str {
        "geglu"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let h = cpu_f32(s, l, "geglu")?;
        let (rows, i) = halves(l)?;
        let mut out = uninit_vec(rows * i);
        let per = (CHUNK / (2 * i)).max(1);
        out.par_chunks_mut(per * i)
            .zip(h.par_chunks(per * 2 * i))
            .for_each(|(o, h)| {
                for (o, h) in o.chunks_exact_mut(i).zip(h.chunks_exact(2 * i)) {
                    let (a, gate) = h.split_at(i);
                    for ((o, &a), &g) in o.iter_mut().zip(a).zip(gate) {
                        *o = a * gelu(g);
                    }
                }
            });
        let mut dims = l.shape().dims().to_vec();
        *dims.last_mut().unwrap() = i;
        Ok((CpuStorage::F32(out), Shape::from(dims)))
    }

    fn bwd(&self, arg: &Tensor, _: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let grad = grad.contiguous()?;
        let (hs, hl) = arg.storage_and_layout();
        let (gs, gl) = grad.storage_and_layout();
        let h = storage_f32(&hs, hl, "geglu backward")?;
        let g = storage_f32(&gs, gl, "geglu backward")?;
        let (rows, i) = halves(hl)?;
        let mut dh = uninit_vec(rows * 2 * i);
        let per = (CHUNK / (2 * i)).max(1);
        dh.par_chunks_mut(per * 2 * i)
            .zip(h.par_chunks(per * 2 * i))
            .zip(g.par_chunks(per * i))
            .for_each(|((dh, h), g)| {
                for ((dh, h), g) in dh.chunks_exact_mut(2 * i).zip(h.chunks_exact(2 * i)).zip(g.chunks_exact(i)) {
                    let (da, dgate) = dh.split_at_mut(i);
                    let (a, gate) = h.split_at(i);
                    for j in 0..i {
                        da[j] = g[j] * gelu(gate[j]);
                        dgate[j] = g[j] * a[j] * gelu_grad(gate[j]);
                    }
                }
            });
        Ok(Some(Tensor::from_vec(dh, arg.shape(), arg.device())?))
    }
}

/// `h[..., :I] * gelu(h[..., I:])` for `h [..., 2I]` on a contiguous f32 CPU tensor.
pub fn geglu(h: &Tensor) -> candle_core::Result<Tensor> {
    h.contiguous()?.apply_op1(GeGluOp)
}
