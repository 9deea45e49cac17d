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
