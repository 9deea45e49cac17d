//! Fused kernels behind the layers of `nn`: attention that never materialises the score
//! matrix, convolutions as shifted GEMMs without an unfolded input, and single-pass norms, each
//! a candle custom op with an analytic backward that keeps only what it recomputes from.
//!
//! Every kernel works on contiguous f32 CPU storage; attention also runs on CUDA (feature
//! `cuda`, the kernels in `cuda/`). `nn` routes other devices and dtypes to the composed candle
//! ops, which compute the same function, and `check` compares the two forms on any device. Work is split so that each output
//! element is computed by the same sequence of floating-point operations whatever the batch
//! size, which keeps the server's "batched == alone, bit for bit" guarantee.

pub mod activation;
pub mod attention;
pub mod check;
pub mod conv;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod gemm;
pub mod linear;
pub mod norm;
pub mod simd;

use candle_core::{CpuStorage, Layout};

/// The contiguous f32 slice behind a CPU storage and layout.
pub(crate) fn cpu_f32<'a>(
    s: &'a CpuStorage,
    l: &Layout,
    op: &str,
) -> candle_core::Result<&'a [f32]> {
    match (s, l.contiguous_offsets()) {
        (CpuStorage::F32(v), Some((a, b))) => Ok(&v[a..b]),
        _ => candle_core::bail!("{op}: contiguous f32 CPU input expected"),
    }
}

/// The contiguous f32 slice behind a CPU tensor's storage (for a backward pass, which gets
/// tensors rather than storages).
pub(crate) fn storage_f32<'a>(
    s: &'a candle_core::Storage,
    l: &Layout,
    op: &str,
) -> candle_core::Result<&'a [f32]> {
    match s {
        candle_core::Storage::Cpu(c) => cpu_f32(c, l, op),
        _ => candle_core::bail!("{op}: CPU tensors expected"),
    }
}

/// A raw pointer that parallel tasks share to write disjoint parts of one output buffer.
#[derive(Clone, Copy)]
pub(crate) struct SharedMut(pub *mut f32);

// SAFETY: only used where every task writes a disjoint set of elements (documented per use).
unsafe impl Send for SharedMut {}
unsafe impl Sync for SharedMut {}

impl SharedMut {
    /// Through a method, so closures capture the whole (Sync) wrapper, not the raw field.
    pub(crate) fn ptr(&self) -> *mut f32 {
        self.0
    }
}

/// A buffer of `n` floats whose every element the caller writes before reading.
pub(crate) fn uninit_vec(n: usize) -> Vec<f32> {
    let mut v = Vec::with_capacity(n);
    // SAFETY: f32 has no invalid bit patterns; callers overwrite every element before use.
    unsafe { v.set_len(n) };
    v
}

#[cfg(test)]
mod tests;
