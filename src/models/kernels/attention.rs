//! Scaled dot-product attention that never holds a score matrix (the memory-efficient /
//! flash-attention scheme): the forward walks key blocks with an online softmax and keeps one
//! log-sum-exp per query row; the backward recomputes each block's probabilities from it.
//!
//! Memory: the forward needs one `block_q x block_k` score tile per thread, the backward keeps
//! q, k, v, the output and `B*heads*N` floats, where the composed form kept ~4 score-sized
//! tensors per layer (hundreds of MiB at 256x256 on a CPU, tens of GB at 512x512 on a GPU).
//!
//! Inputs stay in the `[B, N, heads*d]` layout the projections write; each head is a strided
//! view, so no transposed copies are made. One task computes one (batch, head, query block),
//! with a fixed sequence of operations, so a row's result never depends on the batch size.

use super::gemm::{sgemm, sgemm_raw, Par, Strided};
use super::{cpu_f32, simd, storage_f32, uninit_vec, SharedMut};
use candle_core::{CpuStorage, Layout, Shape, Tensor};
use rayon::prelude::*;
use std::sync::Mutex;

/// Query rows per task.
pub const BLOCK_Q: usize = 64;
/// Keys per score tile (rows with more keys take several tiles and the online rescaling).
pub const BLOCK_K: usize = 512;

pub struct FusedAttention {
    heads: usize,
    causal: bool,
    block_q: usize,
    block_k: usize,
    /// Natural log of each score row's softmax denominator plus its max, `[B, heads, N]`:
    /// everything the backward needs to rebuild the probabilities.
    lse: Mutex<Vec<f32>>,
    /// The same statistics when the forward ran on a GPU.
    #[cfg(feature = "cuda")]
    lse_cuda: Mutex<Option<candle_core::cuda_backend::cudarc::driver::CudaSlice<f32>>>,
}

impl FusedAttention {
    pub fn new(heads: usize, causal: bool) -> Self {
        Self::with_blocks(heads, causal, BLOCK_Q, BLOCK_K)
    }

    /// Explicit tile sizes (tests use tiny ones to exercise the multi-tile paths).
    pub fn with_blocks(heads: usize, causal: bool, block_q: usize, block_k: usize) -> Self {
        Self {
            heads,
            causal,
            block_q: block_q.max(1),
            block_k: block_k.max(1),
            lse: Mutex::new(Vec::new()),
            #[cfg(feature = "cuda")]
            lse_cuda: Mutex::new(None),
        }
    }
}

/// Problem geometry shared by the forward and the backward.
#[derive(Clone, Copy)]
struct Dims {
    b: usize,
    n: usize,
    m: usize,
    c: usize,
    heads: usize,
    d: usize,
    scale: f32,
}

impl Dims {
    #[cfg(feature = "cuda")]
    fn for_cuda(&self) -> super::cuda::Dims {
        super::cuda::Dims {
            b: self.b,
            n: self.n,
            m: self.m,
            c: self.c,
            heads: self.heads,
            d: self.d,
            scale: self.scale,
        }
    }

    fn q_off(&self, bi: usize, hi: usize) -> usize {
        bi * self.n * self.c + hi * self.d
    }
    fn k_off(&self, bi: usize, hi: usize) -> usize {
        bi * self.m * self.c + hi * self.d
    }
}

fn dims(heads: usize, q: &Layout, k: &Layout, v: &Layout) -> candle_core::Result<Dims> {
    let (b, n, c) = q.shape().dims3()?;
    let (bk, m, ck) = k.shape().dims3()?;
    if (bk, m, ck) != v.shape().dims3()? || bk != b || ck != c {
        candle_core::bail!(
            "attention: q {:?}, k {:?}, v {:?} do not fit together",
            q.shape(),
            k.shape(),
            v.shape()
        );
    }
    if heads == 0 || c % heads != 0 {
        candle_core::bail!("attention: {c} channels do not split into {heads} heads");
    }
    let d = c / heads;
    Ok(Dims {
        b,
        n,
        m,
        c,
        heads,
        d,
        scale: 1.0 / (d as f32).sqrt(),
    })
}

impl FusedAttention {
    /// Keys row `i` may see: all, or `0..=i` when causal.
    fn key_end(&self, g: &Dims, q_end: usize) -> usize {
        if self.causal {
            g.m.min(q_end)
        } else {
            g.m
        }
    }

    /// Scores of rows `q0..q0+nq` against keys `j0..j0+nk` into `s` (`nq x nk`), scaled, with
    /// the causal mask applied.
    #[allow(clippy::too_many_arguments)]
    fn scores(
        &self,
        g: &Dims,
        (q, k): (&[f32], &[f32]),
        (bi, hi): (usize, usize),
        (q0, nq): (usize, usize),
        (j0, nk): (usize, usize),
        s: &mut [f32],
    ) {
        sgemm(
            (nq, nk, g.d),
            s,
            Strided::new(0, nk, 1),
            false,
            q,
            Strided::new(g.q_off(bi, hi) + q0 * g.c, g.c, 1),
            k,
            Strided::new(g.k_off(bi, hi) + j0 * g.c, 1, g.c),
            g.scale,
            Par::Seq,
        );
        if self.causal {
            for i in 0..nq {
                let visible = (q0 + i + 1).saturating_sub(j0).min(nk);
                s[i * nk + visible..(i + 1) * nk].fill(f32::NEG_INFINITY);
            }
        }
    }
}

impl candle_core::CustomOp3 for FusedAttention {
    fn name(&self) -> &'static str {
        "fused-attention"
    }

    fn cpu_fwd(
        &self,
        qs: &CpuStorage,
        ql: &Layout,
        ks: &CpuStorage,
        kl: &Layout,
        vs: &CpuStorage,
        vl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let g = dims(self.heads, ql, kl, vl)?;
        let (q, k, v) = (
            cpu_f32(qs, ql, "attention")?,
            cpu_f32(ks, kl, "attention")?,
            cpu_f32(vs, vl, "attention")?,
        );
        let mut out = uninit_vec(g.b * g.n * g.c);
        let mut lse = uninit_vec(g.b * g.heads * g.n);
        let (bq, bk) = (self.block_q, self.block_k);
        let q_blocks = g.n.div_ceil(bq);
        let (out_p, lse_p) = (SharedMut(out.as_mut_ptr()), SharedMut(lse.as_mut_ptr()));
        (0..g.b * g.heads * q_blocks).into_par_iter().for_each(|t| {
            let (bh, qb) = (t / q_blocks, t % q_blocks);
            let (bi, hi) = (bh / g.heads, bh % g.heads);
            let q0 = qb * bq;
            let nq = bq.min(g.n - q0);
            let kend = self.key_end(&g, q0 + nq);
            let tile = bk.min(kend.max(1));
            let mut s = vec![0f32; nq * tile];
            let mut acc = vec![0f32; nq * g.d];
            let mut row_max = vec![f32::NEG_INFINITY; nq];
            let mut row_sum = vec![0f32; nq];
            let mut j0 = 0;
            while j0 < kend {
                let nk = tile.min(kend - j0);
                let s = &mut s[..nq * nk];
                self.scores(&g, (q, k), (bi, hi), (q0, nq), (j0, nk), s);
                for i in 0..nq {
                    let row = &mut s[i * nk..(i + 1) * nk];
                    let new_max = row_max[i].max(simd::max(row));
                    let sum = simd::exp_shifted_sum(row, new_max);
                    if j0 == 0 {
                        row_sum[i] = sum;
                    } else {
                        // Rows already accumulated were weighted against the old maximum.
                        let rescale = simd::exp_scalar(row_max[i] - new_max);
                        row_sum[i] = row_sum[i] * rescale + sum;
                        acc[i * g.d..(i + 1) * g.d]
                            .iter_mut()
                            .for_each(|a| *a *= rescale);
                    }
                    row_max[i] = new_max;
                }
                sgemm(
                    (nq, g.d, nk),
                    &mut acc,
                    Strided::new(0, g.d, 1),
                    j0 > 0,
                    s,
                    Strided::new(0, nk, 1),
                    v,
                    Strided::new(g.k_off(bi, hi) + j0 * g.c, g.c, 1),
                    1.0,
                    Par::Seq,
                );
                j0 += nk;
            }
            let base = g.q_off(bi, hi) + q0 * g.c;
            for i in 0..nq {
                let inv = 1.0 / row_sum[i];
                // SAFETY: task (bi, hi, qb) alone writes rows q0..q0+nq of head hi of batch bi,
                // and those rows' log-sum-exps.
                unsafe {
                    let dst = out_p.ptr().add(base + i * g.c);
                    for (j, &a) in acc[i * g.d..(i + 1) * g.d].iter().enumerate() {
                        *dst.add(j) = a * inv;
                    }
                    *lse_p.ptr().add(bh * g.n + q0 + i) = row_max[i] + row_sum[i].ln();
                }
            }
        });
        *self.lse.lock().unwrap() = lse;
        Ok((CpuStorage::F32(out), ql.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        qs: &candle_core::CudaStorage,
        ql: &Layout,
        ks: &candle_core::CudaStorage,
        kl: &Layout,
        vs: &candle_core::CudaStorage,
        vl: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let g = dims(self.heads, ql, kl, vl)?.for_cuda();
        let (out, lse) =
            super::cuda::attention_forward((qs, ql), (ks, kl), (vs, vl), &g, self.causal)?;
        *self.lse_cuda.lock().unwrap() = Some(lse);
        Ok((out, ql.shape().clone()))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        out: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (need_q, need_k, need_v) = (q.track_op(), k.track_op(), v.track_op());
        let grad = grad.contiguous()?;
        #[cfg(feature = "cuda")]
        if q.device().is_cuda() {
            let g = dims(self.heads, q.layout(), k.layout(), v.layout())?.for_cuda();
            let lse = self.lse_cuda.lock().unwrap();
            let Some(lse) = lse.as_ref() else {
                candle_core::bail!("attention backward: no forward statistics");
            };
            let (dq, dk, dv) = super::cuda::attention_backward(
                [q, k, v, &out.contiguous()?, &grad],
                lse,
                &g,
                self.causal,
            )?;
            let keep = |need: bool, t: Tensor| need.then_some(t);
            return Ok((keep(need_q, dq), keep(need_k, dk), keep(need_v, dv)));
        }
        let (qg, ql) = q.storage_and_layout();
        let (kg, kl) = k.storage_and_layout();
        let (vg, vl) = v.storage_and_layout();
        let (og, ol) = out.storage_and_layout();
        let (gg, gl) = grad.storage_and_layout();
        let (qv, kv, vv, ov, gv) = (
            storage_f32(&qg, ql, "attention backward")?,
            storage_f32(&kg, kl, "attention backward")?,
            storage_f32(&vg, vl, "attention backward")?,
            storage_f32(&og, ol, "attention backward")?,
            storage_f32(&gg, gl, "attention backward")?,
        );
        let g = dims(self.heads, ql, kl, vl)?;
        let lse = self.lse.lock().unwrap();
        if lse.len() != g.b * g.heads * g.n {
            candle_core::bail!("attention backward: no forward statistics");
        }
        let mut dq = vec![0f32; if need_q { qv.len() } else { 0 }];
        let mut dk = vec![0f32; if need_k { kv.len() } else { 0 }];
        let mut dv = vec![0f32; if need_v { vv.len() } else { 0 }];
        let (dq_p, dk_p, dv_p) = (
            SharedMut(dq.as_mut_ptr()),
            SharedMut(dk.as_mut_ptr()),
            SharedMut(dv.as_mut_ptr()),
        );
        let (bq, bk) = (self.block_q, self.block_k);
        // One task per (batch, head): it alone accumulates that head's dK and dV over every
        // query block, so the writes of different tasks never overlap.
        (0..g.b * g.heads).into_par_iter().for_each(|bh| {
            let (bi, hi) = (bh / g.heads, bh % g.heads);
            let (qo, ko) = (g.q_off(bi, hi), g.k_off(bi, hi));
            let tile = bk.min(g.m.max(1));
            let mut p = vec![0f32; bq.min(g.n) * tile];
            let mut dp = vec![0f32; bq.min(g.n) * tile];
            let mut q0 = 0;
            while q0 < g.n {
                let nq = bq.min(g.n - q0);
                // D_i = dO_i . O_i, the softmax backward's per-row correction.
                let dot: Vec<f32> = (0..nq)
                    .map(|i| {
                        let r = qo + (q0 + i) * g.c;
                        gv[r..r + g.d]
                            .iter()
                            .zip(&ov[r..r + g.d])
                            .map(|(a, b)| a * b)
                            .sum()
                    })
                    .collect();
                let kend = self.key_end(&g, q0 + nq);
                let mut j0 = 0;
                while j0 < kend {
                    let nk = tile.min(kend - j0);
                    let (p, dp) = (&mut p[..nq * nk], &mut dp[..nq * nk]);
                    self.scores(&g, (qv, kv), (bi, hi), (q0, nq), (j0, nk), p);
                    for i in 0..nq {
                        simd::exp_shifted(&mut p[i * nk..(i + 1) * nk], lse[bh * g.n + q0 + i]);
                    }
                    let q_rows = Strided::new(qo + q0 * g.c, g.c, 1);
                    let k_rows = Strided::new(ko + j0 * g.c, g.c, 1);
                    if need_v {
                        // SAFETY: head (bi, hi)'s columns of dV belong to this task alone.
                        unsafe {
                            sgemm_raw(
                                (nk, g.d, nq),
                                dv_p.ptr(),
                                k_rows,
                                true,
                                p,
                                Strided::new(0, 1, nk),
                                gv,
                                q_rows,
                                1.0,
                                Par::Seq,
                            )
                        };
                    }
                    sgemm(
                        (nq, nk, g.d),
                        dp,
                        Strided::new(0, nk, 1),
                        false,
                        gv,
                        q_rows,
                        vv,
                        Strided::new(ko + j0 * g.c, 1, g.c),
                        1.0,
                        Par::Seq,
                    );
                    // dS = P * (dP - D), with the score scale folded in.
                    for i in 0..nq {
                        let (pr, dr) = (&p[i * nk..(i + 1) * nk], &mut dp[i * nk..(i + 1) * nk]);
                        for (d, &pv) in dr.iter_mut().zip(pr) {
                            *d = pv * (*d - dot[i]) * g.scale;
                        }
                    }
                    // SAFETY: as for dV; dQ rows of this head and block are this task's too.
                    unsafe {
                        if need_q {
                            sgemm_raw(
                                (nq, g.d, nk),
                                dq_p.ptr(),
                                q_rows,
                                true,
                                dp,
                                Strided::new(0, nk, 1),
                                kv,
                                k_rows,
                                1.0,
                                Par::Seq,
                            );
                        }
                        if need_k {
                            sgemm_raw(
                                (nk, g.d, nq),
                                dk_p.ptr(),
                                k_rows,
                                true,
                                dp,
                                Strided::new(0, 1, nk),
                                qv,
                                q_rows,
                                1.0,
                                Par::Seq,
                            );
                        }
                    }
                    j0 += nk;
                }
                q0 += nq;
            }
        });
        let dev = q.device();
        let wrap =
            |need: bool, v: Vec<f32>, shape: &Shape| -> candle_core::Result<Option<Tensor>> {
                Ok(if need {
                    Some(Tensor::from_vec(v, shape, dev)?)
                } else {
                    None
                })
            };
        Ok((
            wrap(need_q, dq, ql.shape())?,
            wrap(need_k, dk, kl.shape())?,
            wrap(need_v, dv, vl.shape())?,
        ))
    }
}

/// Fused attention over `[B, N, heads*d]` queries and `[B, M, heads*d]` keys/values (CPU in
/// f32; with the `cuda` feature also CUDA in f32, f16 and bf16, head dimensions up to 160).
pub fn fused_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    causal: bool,
) -> candle_core::Result<Tensor> {
    let op = FusedAttention::new(heads, causal);
    q.contiguous()?.apply_op3_arc(
        &k.contiguous()?,
        &v.contiguous()?,
        std::sync::Arc::new(Box::new(op)),
    )
}
