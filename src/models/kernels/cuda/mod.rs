//! The GPU side of the fused kernels (feature `cuda`): launches of the PTX that build.rs
//! compiles from the `.cu` files beside this one.

use candle_core::backend::BackendStorage;
use candle_core::op::BackpropOp;
use candle_core::cuda_backend::cudarc::driver::{
    CudaFunction, CudaSlice, CudaView, DeviceRepr, LaunchConfig, PushKernelArg,
};
use candle_core::cuda_backend::{CudaDType, WrapErr};
use candle_core::{CudaDevice, CudaStorage, DType, Layout, Storage, Tensor};

include!(concat!(env!("OUT_DIR"), "/attention_ptx.rs"));

/// An attention problem's shape: batch, query rows, key rows, channels (`heads * d`), heads,
/// head dimension, and the score scale.
#[derive(Clone, Copy)]
pub(crate) struct Dims {
    pub(crate) b: usize,
    pub(crate) n: usize,
    pub(crate) m: usize,
    pub(crate) c: usize,
    pub(crate) heads: usize,
    pub(crate) d: usize,
    pub(crate) scale: f32,
}

/// Query rows per forward block (`ROWS_FWD` in attention.cu, which sizes shared memory by it).
const ROWS_FWD: u32 = 64;
/// Rows (queries for dQ, keys for dK/dV) per backward block.
const ROWS_BWD: u32 = 64;

fn type_name(dtype: DType) -> Option<&'static str> {
    match dtype {
        DType::F32 => Some("f32"),
        DType::F16 => Some("f16"),
        DType::BF16 => Some("bf16"),
        _ => None,
    }
}

/// The PTX module for a storage type and head dimension (the smallest padded size that holds
/// it), if one was built.
fn attention_module(dtype: DType, head_dim: usize) -> Option<(String, &'static str)> {
    let tn = type_name(dtype)?;
    ATTENTION_PTX
        .iter()
        .filter(|(t, dp, _)| *t == tn && *dp >= head_dim)
        .min_by_key(|(_, dp, _)| *dp)
        .map(|(t, dp, ptx)| (format!("dspo_attention_{t}_{dp}"), *ptx))
}

/// Whether the fused CUDA attention handles this storage type and head dimension.
pub fn attention_supported(dtype: DType, head_dim: usize) -> bool {
    attention_module(dtype, head_dim).is_some()
}

fn function(
    dev: &CudaDevice,
    dtype: DType,
    g: &Dims,
    name: &str,
) -> candle_core::Result<CudaFunction> {
    let Some((module, ptx)) = attention_module(dtype, g.d) else {
        candle_core::bail!("fused attention: no CUDA kernel for {dtype:?} with head dimension {}", g.d)
    };
    Ok(dev.get_or_load_custom_func(name, &module, ptx)?.into_cuda_function())
}

fn grid(rows: usize, block: u32, g: &Dims) -> LaunchConfig {
    LaunchConfig {
        grid_dim: ((rows as u32).div_ceil(block), (g.b * g.heads) as u32, 1),
        block_dim: (block, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// The scalar arguments every attention kernel ends with, in the kernels' order.
struct Scalars {
    n: i32,
    m: i32,
    c: i32,
    heads: i32,
    d: i32,
    scale: f32,
    causal: i32,
}

impl Scalars {
    fn push<'a>(&'a self, b: &mut candle_core::cuda_backend::cudarc::driver::LaunchArgs<'a>) {
        b.arg(&self.n).arg(&self.m).arg(&self.c).arg(&self.heads).arg(&self.d);
        b.arg(&self.scale).arg(&self.causal);
    }

    fn new(g: &Dims, causal: bool) -> Self {
        Self {
            n: g.n as i32,
            m: g.m as i32,
            c: g.c as i32,
            heads: g.heads as i32,
            d: g.d as i32,
            scale: g.scale,
            causal: causal as i32,
        }
    }
}

fn view<'a, T: CudaDType>(s: &'a CudaStorage, l: &Layout) -> candle_core::Result<CudaView<'a, T>> {
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(s.as_cuda_slice::<T>()?.slice(a..b)),
        None => candle_core::bail!("fused attention: contiguous CUDA input expected"),
    }
}

/// Forward: the output (same type and layout as `q`) and each row's log-sum-exp `[B*heads*N]`.
pub(crate) fn attention_forward(
    (qs, ql): (&CudaStorage, &Layout),
    (ks, kl): (&CudaStorage, &Layout),
    (vs, vl): (&CudaStorage, &Layout),
    g: &Dims,
    causal: bool,
) -> candle_core::Result<(CudaStorage, CudaSlice<f32>)> {
    fn run<T: CudaDType + DeviceRepr>(
        (qs, ql): (&CudaStorage, &Layout),
        (ks, kl): (&CudaStorage, &Layout),
        (vs, vl): (&CudaStorage, &Layout),
        g: &Dims,
        causal: bool,
    ) -> candle_core::Result<(CudaStorage, CudaSlice<f32>)> {
        let dev = &qs.device;
        let (q, k, v) = (view::<T>(qs, ql)?, view::<T>(ks, kl)?, view::<T>(vs, vl)?);
        // SAFETY: the kernel writes every element of both before anything reads them.
        let out = unsafe { dev.alloc::<T>(g.b * g.n * g.c)? };
        let lse = unsafe { dev.alloc::<f32>(g.b * g.heads * g.n)? };
        let f = function(dev, qs.dtype(), g, "attn_fwd")?;
        let s = Scalars::new(g, causal);
        let stream = dev.cuda_stream();
        let mut b = stream.launch_builder(&f);
        b.arg(&q).arg(&k).arg(&v).arg(&out).arg(&lse);
        s.push(&mut b);
        // SAFETY: argument types and order match attn_fwd in attention.cu.
        unsafe { b.launch(grid(g.n, ROWS_FWD, g)) }.w()?;
        Ok((CudaStorage::wrap_cuda_slice(out, dev.clone()), lse))
    }
    match qs.dtype() {
        DType::F32 => run::<f32>((qs, ql), (ks, kl), (vs, vl), g, causal),
        DType::F16 => run::<half::f16>((qs, ql), (ks, kl), (vs, vl), g, causal),
        DType::BF16 => run::<half::bf16>((qs, ql), (ks, kl), (vs, vl), g, causal),
        dt => candle_core::bail!("fused attention: no CUDA kernel for {dt:?}"),
    }
}

/// Backward: dQ, dK and dV (each shaped like its input) from the inputs, the forward's output
/// and log-sum-exps, and the output's gradient. All tensors must be contiguous.
pub(crate) fn attention_backward(
    [q, k, v, o, grad]: [&Tensor; 5],
    lse: &CudaSlice<f32>,
    g: &Dims,
    causal: bool,
) -> candle_core::Result<(Tensor, Tensor, Tensor)> {
    fn run<T: CudaDType + DeviceRepr>(
        [q, k, v, o, grad]: [&Tensor; 5],
        lse: &CudaSlice<f32>,
        g: &Dims,
        causal: bool,
    ) -> candle_core::Result<(Tensor, Tensor, Tensor)> {
        let guards = [q, k, v, o, grad].map(|t| t.storage_and_layout());
        let mut views = Vec::with_capacity(5);
        for (s, l) in guards.iter() {
            match &**s {
                Storage::Cuda(cs) => views.push(view::<T>(cs, l)?),
                _ => candle_core::bail!("fused attention backward: CUDA tensors expected"),
            }
        }
        let dev = match &*guards[0].0 {
            Storage::Cuda(cs) => cs.device.clone(),
            _ => unreachable!("checked above"),
        };
        let s = Scalars::new(g, causal);
        // SAFETY: each buffer is fully written by the kernel that produces it before any read.
        let dq = unsafe { dev.alloc::<T>(g.b * g.n * g.c)? };
        let dk = unsafe { dev.alloc::<T>(g.b * g.m * g.c)? };
        let dv = unsafe { dev.alloc::<T>(g.b * g.m * g.c)? };
        let dvec = unsafe { dev.alloc::<f32>(g.b * g.heads * g.n)? };
        let dtype = q.dtype();
        let stream = dev.cuda_stream();
        {
            let f = function(&dev, dtype, g, "attn_bwd_dq")?;
            let mut b = stream.launch_builder(&f);
            for x in &views {
                b.arg(x);
            }
            b.arg(lse).arg(&dvec).arg(&dq);
            s.push(&mut b);
            // SAFETY: argument types and order match attn_bwd_dq in attention.cu.
            unsafe { b.launch(grid(g.n, ROWS_BWD, g)) }.w()?;
        }
        {
            let f = function(&dev, dtype, g, "attn_bwd_dkv")?;
            let mut b = stream.launch_builder(&f);
            b.arg(&views[0]).arg(&views[1]).arg(&views[2]).arg(&views[4]);
            b.arg(lse).arg(&dvec).arg(&dk).arg(&dv);
            s.push(&mut b);
            // SAFETY: argument types and order match attn_bwd_dkv in attention.cu.
            unsafe { b.launch(grid(g.m, ROWS_BWD, g)) }.w()?;
        }
        drop(views);
        let wrap = |slice: CudaSlice<T>, like: &Tensor| {
            Tensor::from_storage(
                Storage::Cuda(CudaStorage::wrap_cuda_slice(slice, dev.clone())),
                like.shape().clone(),
                BackpropOp::none(),
                false,
            )
        };
        Ok((wrap(dq, q), wrap(dk, k), wrap(dv, v)))
    }
    match q.dtype() {
        DType::F32 => run::<f32>([q, k, v, o, grad], lse, g, causal),
        DType::F16 => run::<half::f16>([q, k, v, o, grad], lse, g, causal),
        DType::BF16 => run::<half::bf16>([q, k, v, o, grad], lse, g, causal),
        dt => candle_core::bail!("fused attention backward: no CUDA kernel for {dt:?}"),
    }
}
