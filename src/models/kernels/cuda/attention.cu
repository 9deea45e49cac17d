// Scaled dot-product attention that never stores a score matrix, for the GPU: the same scheme
// as the CPU kernel in attention.rs (online softmax over key tiles in the forward, one
// log-sum-exp per query row kept for the backward, probabilities recomputed in the backward).
//
// Layout: q is [B, N, heads*d], k and v are [B, M, heads*d], all contiguous; head h of a row
// is the d elements starting at h*d. Arithmetic is f32 whatever the storage type.
//
// Parallel scheme, chosen so that no kernel needs atomics (every output element is written by
// one thread with a fixed order of operations, so results do not depend on the batch size):
// - forward: one thread per query row; key/value tiles go through shared memory;
// - backward dQ: one thread per query row, walking the keys (also writes D_i = dO_i . O_i);
// - backward dK/dV: one thread per key row, walking the query rows.
// Head dimensions are padded to DP (a template constant) so the per-thread vectors live in
// registers; the padding is zero and does not change any sum.

// DSPO_CUDA_EMULATION: compiled as plain C++ against tests/cuda_emulation/emulation.h, which
// runs each block's threads on CPU threads, so the tests check this source's logic without a
// GPU (f32 only).
#ifndef DSPO_CUDA_EMULATION
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <math_constants.h>
#endif

__device__ __forceinline__ float to_f32(float x) { return x; }
template <typename T> __device__ __forceinline__ T from_f32(float x);
template <> __device__ __forceinline__ float from_f32<float>(float x) { return x; }

#ifndef DSPO_CUDA_EMULATION
__device__ __forceinline__ float to_f32(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_f32(__nv_bfloat16 x) { return __bfloat162float(x); }
template <> __device__ __forceinline__ __half from_f32<__half>(float x) { return __float2half(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float x) {
    return __float2bfloat16(x);
}
#endif

// Keys per shared-memory tile (forward and dQ), query rows per tile (dK/dV).
#define TILE 32
// Threads (query rows) per forward block; the host launches exactly this many.
#define ROWS_FWD 64

// Rows r0..r0+nr of two [rows, c] matrices (one head's d columns each) into shared tiles of
// TILE x DP floats, zero past the rows and columns, by all threads of the block.
template <typename T, int DP>
__device__ __forceinline__ void load_rows(float (*a)[DP], float (*b)[DP], const T* ab, const T* bb,
                                          int r0, int nr, int c, int d) {
    for (int e = threadIdx.x; e < TILE * DP; e += blockDim.x) {
        const int rr = e / DP, i = e % DP;
        const bool in = rr < nr && i < d;
        const size_t off = (size_t)(r0 + rr) * c + i;
        a[rr][i] = in ? to_f32(ab[off]) : 0.f;
        b[rr][i] = in ? to_f32(bb[off]) : 0.f;
    }
}

template <typename T, int DP>
__device__ void attn_fwd_impl(const T* __restrict__ q, const T* __restrict__ k,
                         const T* __restrict__ v, T* __restrict__ out, float* __restrict__ lse,
                         int n, int m, int c, int heads, int d, float scale, int causal) {
    __shared__ float ks[TILE][DP];
    __shared__ float vs[TILE][DP];
    __shared__ float sc[TILE][ROWS_FWD];
    const int bh = blockIdx.y, b = bh / heads, h = bh % heads;
    const int row = blockIdx.x * blockDim.x + threadIdx.x;
    const bool active = row < n;
    const size_t qoff = ((size_t)b * n + (active ? row : 0)) * c + (size_t)h * d;
    float qr[DP], acc[DP];
#pragma unroll
    for (int i = 0; i < DP; ++i) {
        qr[i] = (active && i < d) ? to_f32(q[qoff + i]) : 0.f;
        acc[i] = 0.f;
    }
    float mx = -CUDART_INF_F, sum = 0.f;
    const int block_end = min(n, (int)((blockIdx.x + 1) * blockDim.x));
    const int kend = causal ? min(m, block_end) : m;
    const T* kb = k + (size_t)b * m * c + (size_t)h * d;
    const T* vb = v + (size_t)b * m * c + (size_t)h * d;
    for (int j0 = 0; j0 < kend; j0 += TILE) {
        const int nk = min(TILE, kend - j0);
        __syncthreads();
        load_rows<T, DP>(ks, vs, kb, vb, j0, nk, c, d);
        __syncthreads();
        // This thread's scores for the tile, in its own column of shared memory (registers
        // would need the tile loop fully unrolled, which multiplies the code size).
        float tmax = -CUDART_INF_F;
#pragma unroll 2
        for (int jj = 0; jj < TILE; ++jj) {
            float dot = 0.f;
#pragma unroll
            for (int i = 0; i < DP; ++i) dot = fmaf(qr[i], ks[jj][i], dot);
            const bool vis = jj < nk && (!causal || j0 + jj <= row);
            const float s = vis ? dot * scale : -CUDART_INF_F;
            sc[jj][threadIdx.x] = s;
            tmax = fmaxf(tmax, s);
        }
        const float nmx = fmaxf(mx, tmax);
        if (nmx == -CUDART_INF_F) continue;  // no visible key yet (block-uniform loop bounds)
        // Everything accumulated so far was weighted against the old maximum.
        const float corr = expf(mx - nmx);
        sum *= corr;
#pragma unroll
        for (int i = 0; i < DP; ++i) acc[i] *= corr;
#pragma unroll 2
        for (int jj = 0; jj < TILE; ++jj) {
            const float p = expf(sc[jj][threadIdx.x] - nmx);
            sum += p;
#pragma unroll
            for (int i = 0; i < DP; ++i) acc[i] = fmaf(p, vs[jj][i], acc[i]);
        }
        mx = nmx;
    }
    if (active) {
        const float inv = 1.f / sum;
        for (int i = 0; i < d; ++i) out[qoff + i] = from_f32<T>(acc[i] * inv);
        lse[(size_t)bh * n + row] = mx + logf(sum);
    }
}

template <typename T, int DP>
__device__ void attn_bwd_dq_impl(const T* __restrict__ q, const T* __restrict__ k,
                            const T* __restrict__ v, const T* __restrict__ o,
                            const T* __restrict__ dout, const float* __restrict__ lse,
                            float* __restrict__ dvec, T* __restrict__ dq, int n, int m, int c,
                            int heads, int d, float scale, int causal) {
    __shared__ float ks[TILE][DP];
    __shared__ float vs[TILE][DP];
    const int bh = blockIdx.y, b = bh / heads, h = bh % heads;
    const int row = blockIdx.x * blockDim.x + threadIdx.x;
    const bool active = row < n;
    const size_t qoff = ((size_t)b * n + (active ? row : 0)) * c + (size_t)h * d;
    float qr[DP], dor[DP], acc[DP];
    float dd = 0.f;  // D_i = dO_i . O_i, the softmax backward's per-row correction
#pragma unroll
    for (int i = 0; i < DP; ++i) {
        const bool in = active && i < d;
        qr[i] = in ? to_f32(q[qoff + i]) : 0.f;
        dor[i] = in ? to_f32(dout[qoff + i]) : 0.f;
        dd = fmaf(dor[i], in ? to_f32(o[qoff + i]) : 0.f, dd);
        acc[i] = 0.f;
    }
    const float l = active ? lse[(size_t)bh * n + row] : 0.f;
    if (active) dvec[(size_t)bh * n + row] = dd;
    const int block_end = min(n, (int)((blockIdx.x + 1) * blockDim.x));
    const int kend = causal ? min(m, block_end) : m;
    const T* kb = k + (size_t)b * m * c + (size_t)h * d;
    const T* vb = v + (size_t)b * m * c + (size_t)h * d;
    for (int j0 = 0; j0 < kend; j0 += TILE) {
        const int nk = min(TILE, kend - j0);
        __syncthreads();
        load_rows<T, DP>(ks, vs, kb, vb, j0, nk, c, d);
        __syncthreads();
#pragma unroll 1
        for (int jj = 0; jj < TILE; ++jj) {
            float s = 0.f, dp = 0.f;
#pragma unroll
            for (int i = 0; i < DP; ++i) {
                s = fmaf(qr[i], ks[jj][i], s);
                dp = fmaf(dor[i], vs[jj][i], dp);
            }
            const bool vis = active && jj < nk && (!causal || j0 + jj <= row);
            const float p = vis ? expf(s * scale - l) : 0.f;
            const float ds = p * (dp - dd) * scale;
#pragma unroll
            for (int i = 0; i < DP; ++i) acc[i] = fmaf(ds, ks[jj][i], acc[i]);
        }
    }
    if (active) {
        for (int i = 0; i < d; ++i) dq[qoff + i] = from_f32<T>(acc[i]);
    }
}

template <typename T, int DP>
__device__ void attn_bwd_dkv_impl(const T* __restrict__ q, const T* __restrict__ k,
                             const T* __restrict__ v, const T* __restrict__ dout,
                             const float* __restrict__ lse, const float* __restrict__ dvec,
                             T* __restrict__ dk, T* __restrict__ dv, int n, int m, int c,
                             int heads, int d, float scale, int causal) {
    __shared__ float qs[TILE][DP];
    __shared__ float dos[TILE][DP];
    __shared__ float ls[TILE];
    __shared__ float ds_row[TILE];
    const int bh = blockIdx.y, b = bh / heads, h = bh % heads;
    const int key = blockIdx.x * blockDim.x + threadIdx.x;
    const bool active = key < m;
    const size_t koff = ((size_t)b * m + (active ? key : 0)) * c + (size_t)h * d;
    float kr[DP], vr[DP], dka[DP], dva[DP];
#pragma unroll
    for (int i = 0; i < DP; ++i) {
        const bool in = active && i < d;
        kr[i] = in ? to_f32(k[koff + i]) : 0.f;
        vr[i] = in ? to_f32(v[koff + i]) : 0.f;
        dka[i] = 0.f;
        dva[i] = 0.f;
    }
    // With a causal mask no query row before the block's first key sees any of its keys.
    const int q_start = causal ? min(n, (int)(blockIdx.x * blockDim.x)) : 0;
    const T* qb = q + (size_t)b * n * c + (size_t)h * d;
    const T* gb = dout + (size_t)b * n * c + (size_t)h * d;
    for (int i0 = q_start; i0 < n; i0 += TILE) {
        const int nq = min(TILE, n - i0);
        __syncthreads();
        load_rows<T, DP>(qs, dos, qb, gb, i0, nq, c, d);
        for (int ii = threadIdx.x; ii < TILE; ii += blockDim.x) {
            ls[ii] = ii < nq ? lse[(size_t)bh * n + i0 + ii] : 0.f;
            ds_row[ii] = ii < nq ? dvec[(size_t)bh * n + i0 + ii] : 0.f;
        }
        __syncthreads();
#pragma unroll 1
        for (int ii = 0; ii < TILE; ++ii) {
            float s = 0.f, dp = 0.f;
#pragma unroll
            for (int i = 0; i < DP; ++i) {
                s = fmaf(qs[ii][i], kr[i], s);
                dp = fmaf(dos[ii][i], vr[i], dp);
            }
            const bool vis = active && ii < nq && (!causal || key <= i0 + ii);
            const float p = vis ? expf(s * scale - ls[ii]) : 0.f;
            const float ds = p * (dp - ds_row[ii]) * scale;
#pragma unroll
            for (int i = 0; i < DP; ++i) {
                dva[i] = fmaf(p, dos[ii][i], dva[i]);
                dka[i] = fmaf(ds, qs[ii][i], dka[i]);
            }
        }
    }
    if (active) {
        for (int i = 0; i < d; ++i) {
            dk[koff + i] = from_f32<T>(dka[i]);
            dv[koff + i] = from_f32<T>(dva[i]);
        }
    }
}

// One module per storage type and padded head size, compiled separately (build.rs passes
// ATTN_T, and ATTN_DP), so the driver only JIT-compiles the variants a model uses.
#ifndef ATTN_T
#define ATTN_T float
#endif
#ifndef ATTN_DP
#define ATTN_DP 64
#endif

extern "C" __global__ void __launch_bounds__(ROWS_FWD)
attn_fwd(const ATTN_T* q, const ATTN_T* k, const ATTN_T* v, ATTN_T* out, float* lse, int n,
         int m, int c, int heads, int d, float scale, int causal) {
    attn_fwd_impl<ATTN_T, ATTN_DP>(q, k, v, out, lse, n, m, c, heads, d, scale, causal);
}

extern "C" __global__ void attn_bwd_dq(const ATTN_T* q, const ATTN_T* k, const ATTN_T* v,
                                       const ATTN_T* o, const ATTN_T* dout, const float* lse,
                                       float* dvec, ATTN_T* dq, int n, int m, int c, int heads,
                                       int d, float scale, int causal) {
    attn_bwd_dq_impl<ATTN_T, ATTN_DP>(q, k, v, o, dout, lse, dvec, dq, n, m, c, heads, d, scale,
                                 causal);
}

extern "C" __global__ void attn_bwd_dkv(const ATTN_T* q, const ATTN_T* k, const ATTN_T* v,
                                        const ATTN_T* dout, const float* lse, const float* dvec,
                                        ATTN_T* dk, ATTN_T* dv, int n, int m, int c, int heads,
                                        int d, float scale, int causal) {
    attn_bwd_dkv_impl<ATTN_T, ATTN_DP>(q, k, v, dout, lse, dvec, dk, dv, n, m, c, heads, d, scale,
                                  causal);
}
