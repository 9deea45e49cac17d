//! Strided single-precision GEMM on raw buffers (the `gemm` crate candle itself uses), so that
//! kernels multiply views of their inputs in place: a head's columns of a `[B, N, heads*d]`
//! tensor, a shifted window of a padded image, a transposed weight tap.

/// A strided matrix view into a buffer: element `(r, c)` is at `off + r*rs + c*cs`.
#[derive(Clone, Copy, Debug)]
pub struct Strided {
    pub off: usize,
    pub rs: usize,
    pub cs: usize,
}

impl Strided {
    pub fn new(off: usize, rs: usize, cs: usize) -> Self {
        Self { off, rs, cs }
    }

    /// Largest index a `rows x cols` view touches.
    fn last(&self, rows: usize, cols: usize) -> usize {
        self.off + rows.saturating_sub(1) * self.rs + cols.saturating_sub(1) * self.cs
    }
}

/// Whether the GEMM may use the rayon pool itself. Kernels that already run one task per core
/// call it sequentially.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Par {
    Seq,
    Pool,
}

/// Fewest rows (columns) per thread for which splitting a product ourselves pays.
const SPLIT_MIN: usize = 32;

#[derive(Clone, Copy)]
struct SendPtr(*mut f32);
// SAFETY: used only to hand disjoint parts of one destination to scoped tasks.
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}

fn parallelism(par: Par) -> gemm::Parallelism {
    match par {
        Par::Pool if rayon::current_num_threads() > 1 => {
            gemm::Parallelism::Rayon(rayon::current_num_threads())
        }
        _ => gemm::Parallelism::None,
    }
}

/// `dst (m x n) = [dst +] scale * lhs (m x k) * rhs (k x n)` on a destination given as a raw
/// pointer, for parallel tasks that write disjoint parts of one buffer.
///
/// # Safety
/// `dst` must be valid for writes at every index the view touches, no other thread may access
/// those elements during the call, and `lhs`/`rhs` must cover their views (checked).
#[allow(clippy::too_many_arguments)]
pub unsafe fn sgemm_raw(
    (m, n, k): (usize, usize, usize),
    dst: *mut f32,
    d: Strided,
    accumulate: bool,
    lhs: &[f32],
    a: Strided,
    rhs: &[f32],
    b: Strided,
    scale: f32,
    par: Par,
) {
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            for r in 0..m {
                for c in 0..n {
                    *dst.add(d.off + r * d.rs + c * d.cs) = 0.0;
                }
            }
        }
        return;
    }
    assert!(a.last(m, k) < lhs.len(), "gemm: lhs view out of bounds");
    assert!(b.last(k, n) < rhs.len(), "gemm: rhs view out of bounds");
    // The crate's kernels want a column-major left operand (they read it in place; a
    // row-major one is gathered into panels, by strided scalar loads). When the right operand
    // is row-major, computing the transposed product `C^T = B^T A^T` gives exactly that.
    // Each element is the same dot product over k either way, in the same k-blocks (the
    // crate's k-blocking depends on k alone); the kernels may still split a short product
    // differently, so results agree to f32 rounding, and a sample's result still depends only
    // on its own shapes (batched == alone).
    if a.rs != 1 && b.cs == 1 && b.rs != 1 {
        return sgemm_raw(
            (n, m, k),
            dst,
            Strided::new(d.off, d.cs, d.rs),
            accumulate,
            rhs,
            Strided::new(b.off, b.cs, b.rs),
            lhs,
            Strided::new(a.off, a.cs, a.rs),
            scale,
            par,
        );
    }
    let threads = match parallelism(par) {
        gemm::Parallelism::Rayon(t) => t,
        gemm::Parallelism::None => 1,
    };
    // The gemm crate packs a short row-major left operand on the calling thread before it
    // fans out (its "prepack"), and the other core spins meanwhile: up to a tenth of a
    // training step. Split such a product ourselves along its rows (or, for few rows, its
    // columns), one sequential GEMM per thread, so that each packs only its own share. The
    // split depends only on the product's own shape.
    if threads > 1 && a.rs != 1 {
        let split_rows = m >= threads * SPLIT_MIN;
        let len = if split_rows { m } else { n };
        if split_rows || n >= threads * SPLIT_MIN {
            let chunk = len.div_ceil(threads).next_multiple_of(16);
            let dst = SendPtr(dst);
            let starts: Vec<usize> = (0..len).step_by(chunk).collect();
            rayon::scope(|s| {
                for &start in &starts {
                    let end = (start + chunk).min(len);
                    s.spawn(move |_| {
                        let dst = dst;
                        // SAFETY: the chunks write disjoint rows (columns) of the caller's view.
                        unsafe {
                            if split_rows {
                                sgemm_raw(
                                    (end - start, n, k),
                                    dst.0,
                                    Strided::new(d.off + start * d.rs, d.rs, d.cs),
                                    accumulate,
                                    lhs,
                                    Strided::new(a.off + start * a.rs, a.rs, a.cs),
                                    rhs,
                                    b,
                                    scale,
                                    Par::Seq,
                                )
                            } else {
                                sgemm_raw(
                                    (m, end - start, k),
                                    dst.0,
                                    Strided::new(d.off + start * d.cs, d.rs, d.cs),
                                    accumulate,
                                    lhs,
                                    a,
                                    rhs,
                                    Strided::new(b.off + start * b.cs, b.rs, b.cs),
                                    scale,
                                    Par::Seq,
                                )
                            }
                        }
                    });
                }
            });
            return;
        }
    }
    gemm::gemm(
        m,
        n,
        k,
        dst.add(d.off),
        d.cs as isize,
        d.rs as isize,
        accumulate,
        lhs.as_ptr().add(a.off),
        a.cs as isize,
        a.rs as isize,
        rhs.as_ptr().add(b.off),
        b.cs as isize,
        b.rs as isize,
        1.0f32,
        scale,
        false,
        false,
        false,
        parallelism(par),
    );
}

/// Safe form of [`sgemm_raw`] for a destination the caller owns.
#[allow(clippy::too_many_arguments)]
pub fn sgemm(
    mnk: (usize, usize, usize),
    dst: &mut [f32],
    d: Strided,
    accumulate: bool,
    lhs: &[f32],
    a: Strided,
    rhs: &[f32],
    b: Strided,
    scale: f32,
    par: Par,
) {
    let (m, n, _) = mnk;
    if m > 0 && n > 0 {
        assert!(d.last(m, n) < dst.len(), "gemm: dst view out of bounds");
    }
    // SAFETY: the destination is exclusively borrowed and its view is in bounds.
    unsafe {
        sgemm_raw(
            mnk,
            dst.as_mut_ptr(),
            d,
            accumulate,
            lhs,
            a,
            rhs,
            b,
            scale,
            par,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strided_gemm_matches_naive_product() {
        let (m, n, k) = (5, 7, 3);
        let lhs: Vec<f32> = (0..m * k).map(|i| (i as f32 * 0.37).sin()).collect();
        let rhs: Vec<f32> = (0..k * n).map(|i| (i as f32 * 0.11).cos()).collect();
        // lhs row-major, rhs read transposed from an n x k buffer.
        let rhs_t: Vec<f32> = (0..n * k).map(|i| rhs[(i % k) * n + i / k]).collect();
        let mut dst = vec![1.0f32; m * n];
        sgemm(
            (m, n, k),
            &mut dst,
            Strided::new(0, n, 1),
            true,
            &lhs,
            Strided::new(0, k, 1),
            &rhs_t,
            Strided::new(0, 1, k),
            0.5,
            Par::Pool,
        );
        for r in 0..m {
            for c in 0..n {
                let want: f32 =
                    1.0 + 0.5 * (0..k).map(|i| lhs[r * k + i] * rhs[i * n + c]).sum::<f32>();
                assert!((dst[r * n + c] - want).abs() < 1e-5);
            }
        }
    }
}
