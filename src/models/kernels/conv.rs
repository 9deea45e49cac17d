//! 2-D convolution as a sum of shifted GEMMs, forward and backward, without an unfolded input.
//!
//! Each image is copied once into a zero-padded buffer split into `stride²` phases (the even
//! and odd rows and columns of a stride-2 convolution; one plain padded copy at stride 1). In
//! a phase, output pixel `(y, x)` of kernel tap `(ky, kx)` reads a fixed offset from index
//! `y * Wq + x`, so every tap is one GEMM `W_tap [O, C] x window [C, cols]` over a contiguous
//! window, accumulated into one output tile: no im2col matrix (9x the input for a 3x3 kernel),
//! no NHWC round trip, and the backward rebuilds nothing but the padded copy. The `Wq - Wo`
//! columns per row that fall between output rows are computed and dropped (a few percent).
//!
//! Work is split by output-row tiles of one image; how an image is tiled and whether its GEMMs
//! use the thread pool depend only on the image's own geometry, never on the batch size.

use super::gemm::{sgemm, sgemm_raw, Par, Strided};
use super::{cpu_f32, storage_f32, uninit_vec, SharedMut};
use candle_core::{CpuStorage, Layout, Shape, Tensor};
use rayon::prelude::*;

pub struct Conv2dOp {
    pub stride: usize,
    pub padding: usize,
}

/// How a weight `[O, C, k, k]` lies in memory: as loaded (`Standard`), or channels last
/// (`ChannelsLast`, physically `[O, k, k, C]`), how `nn::Conv2d` keeps frozen CPU weights.
/// Channels last, a tap's GEMM reads the weight along its contiguous input channels instead
/// of at a stride of k² floats (a cache line per one or two values). Either way the weight is
/// a row-major `[O, k²C]` matrix, in its own column order, which the one-GEMM path for small
/// images uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum WeightOrder {
    Standard,
    ChannelsLast,
}

impl WeightOrder {
    fn of(l: &Layout) -> Option<Self> {
        if l.is_contiguous() {
            return Some(Self::Standard);
        }
        let (_, c, k, _) = l.shape().dims4().ok()?;
        (l.stride() == [k * k * c, 1, k * c, c]).then_some(Self::ChannelsLast)
    }

    /// Tap `t`'s `[O, C]` matrix: offset, row (output channel) stride, column stride.
    fn tap(self, g: &Geo, t: usize) -> (usize, usize, usize) {
        match self {
            Self::Standard => (t, g.c * g.taps(), g.taps()),
            Self::ChannelsLast => (t * g.c, g.taps() * g.c, 1),
        }
    }

    /// The column of the `[O, k²C]` weight matrix that holds tap `t`, input channel `c`.
    fn column(self, g: &Geo, t: usize, c: usize) -> usize {
        match self {
            Self::Standard => c * g.taps() + t,
            Self::ChannelsLast => t * g.c + c,
        }
    }
}

/// The slice behind a weight in either order (from its start offset).
fn weight_slice<'a>(s: &'a CpuStorage, l: &Layout) -> candle_core::Result<(&'a [f32], WeightOrder)> {
    match (WeightOrder::of(l), s) {
        (Some(WeightOrder::Standard), _) => Ok((cpu_f32(s, l, "conv2d")?, WeightOrder::Standard)),
        (Some(WeightOrder::ChannelsLast), CpuStorage::F32(v)) => {
            let start = l.start_offset();
            Ok((&v[start..start + l.shape().elem_count()], WeightOrder::ChannelsLast))
        }
        _ => candle_core::bail!("conv2d: weight must be contiguous or channels-last f32"),
    }
}

/// The same weight, channels last (see [`WeightOrder`]); the logical shape is unchanged.
pub fn channels_last(w: &Tensor) -> candle_core::Result<Tensor> {
    w.permute((0, 2, 3, 1))?.contiguous()?.permute((0, 3, 1, 2))
}

/// Geometry of one convolution.
#[derive(Clone, Copy, Debug)]
struct Geo {
    b: usize,
    c: usize,
    h: usize,
    w: usize,
    o: usize,
    k: usize,
    s: usize,
    p: usize,
    /// Rows and columns of each phase image.
    hq: usize,
    wq: usize,
    ho: usize,
    wo: usize,
}

impl Geo {
    fn new(x: &Shape, wt: &Shape, s: usize, p: usize) -> candle_core::Result<Self> {
        let (b, c, h, w) = x.dims4()?;
        let (o, ci, k, kw) = wt.dims4()?;
        if ci != c || k != kw || s == 0 {
            candle_core::bail!("conv2d: input {x:?} and weight {wt:?} (stride {s}) do not fit");
        }
        let (hp, wp) = (h + 2 * p, w + 2 * p);
        if hp < k || wp < k {
            candle_core::bail!("conv2d: kernel {k} larger than the padded input {hp}x{wp}");
        }
        Ok(Self {
            b,
            c,
            h,
            w,
            o,
            k,
            s,
            p,
            hq: hp.div_ceil(s),
            wq: wp.div_ceil(s),
            ho: (hp - k) / s + 1,
            wo: (wp - k) / s + 1,
        })
    }

    fn taps(&self) -> usize {
        self.k * self.k
    }

    fn phase_len(&self) -> usize {
        self.hq * self.wq
    }

    /// Floats in one image's phase buffer.
    fn image_len(&self) -> usize {
        self.s * self.s * self.c * self.phase_len()
    }

    /// Columns of a tile of `rows` output rows (the last row's trailing gap left out).
    fn cols(&self, rows: usize) -> usize {
        (rows - 1) * self.wq + self.wo
    }

    /// Offset in an image's phase buffer that tap `t` reads for output row `y0`, column 0.
    fn tap_offset(&self, t: usize, y0: usize) -> usize {
        let (ky, kx) = (t / self.k, t % self.k);
        let phase = (ky % self.s) * self.s + kx % self.s;
        phase * self.c * self.phase_len() + (ky / self.s + y0) * self.wq + kx / self.s
    }

    /// Output rows per tile: the tile and its input window stay around L2 size.
    fn tile_rows(&self) -> usize {
        let cols = (131_072 / (self.o + self.c).max(1)).clamp(256, 4096);
        (cols / self.wq).clamp(1, self.ho)
    }

    /// Whether an image is small enough to run as one GEMM over its unfolded input
    /// (`[k²C, cols]`, at most 4 MiB): nine short GEMMs cost more in calls and packing than
    /// the copy, in the inner blocks of a UNet. Depends on the image alone.
    fn unfolds(&self) -> bool {
        self.taps() > 1 && self.taps() * self.c * self.cols(self.ho) <= 1 << 20
    }

    /// Whether to run one image's tiles in parallel (with sequential GEMMs) rather than one
    /// tile at a time with the GEMM on the pool. Depends on the image alone.
    fn parallel_tiles(&self) -> bool {
        self.ho.div_ceil(self.tile_rows()) >= 2 * rayon::current_num_threads()
    }
}

/// One image `[C, H, W]` into its zero-padded phase buffer `[s*s, C, Hq, Wq]`.
fn phases(x: &[f32], g: &Geo, out: &mut [f32]) {
    out.fill(0.0);
    let (s, p, pl) = (g.s, g.p, g.phase_len());
    for ci in 0..g.c {
        let plane = &x[ci * g.h * g.w..][..g.h * g.w];
        for (iy, line) in plane.chunks_exact(g.w).enumerate() {
            let (yy, py) = ((iy + p) / s, (iy + p) % s);
            for px in 0..s {
                let base = ((py * s + px) * g.c + ci) * pl + yy * g.wq;
                // Input columns ix with (ix + p) % s == px, landing at (ix + p) / s.
                let first = (px + s - p % s) % s;
                if first >= g.w {
                    continue;
                }
                let dst = &mut out[base + (first + p) / s..base + g.wq];
                for (d, &v) in dst.iter_mut().zip(line[first..].iter().step_by(s)) {
                    *d = v;
                }
            }
        }
    }
}

/// The adjoint of `phases`: a phase buffer summed back into one image `[C, H, W]` (padding
/// positions dropped).
fn unphase(ph: &[f32], g: &Geo, x: &mut [f32]) {
    let (s, p, pl) = (g.s, g.p, g.phase_len());
    x.par_chunks_mut(g.h * g.w)
        .enumerate()
        .for_each(|(ci, plane)| {
            for (iy, line) in plane.chunks_exact_mut(g.w).enumerate() {
                let (yy, py) = ((iy + p) / s, (iy + p) % s);
                for px in 0..s {
                    let first = (px + s - p % s) % s;
                    if first >= g.w {
                        continue;
                    }
                    let base = ((py * s + px) * g.c + ci) * pl + yy * g.wq;
                    let src = &ph[base + (first + p) / s..base + g.wq];
                    for (d, &v) in line[first..].iter_mut().step_by(s).zip(src) {
                        *d = v;
                    }
                }
            }
        });
}

fn all_phases(x: &[f32], g: &Geo) -> Vec<f32> {
    let n = g.image_len();
    let mut out = uninit_vec(g.b * n);
    out.par_chunks_mut(n)
        .enumerate()
        .for_each(|(bi, ph)| phases(&x[bi * g.c * g.h * g.w..][..g.c * g.h * g.w], g, ph));
    out
}

/// One image's input unfolded: row `order.column(t, c)` holds what tap `t` reads of channel
/// `c`, `[k²C, cols]`, so that the weight's `[O, k²C]` matrix multiplies it in one GEMM.
fn unfold(g: &Geo, img: &[f32], order: WeightOrder) -> Vec<f32> {
    let cols = g.cols(g.ho);
    let mut out = uninit_vec(g.taps() * g.c * cols);
    for t in 0..g.taps() {
        let base = g.tap_offset(t, 0);
        for c in 0..g.c {
            let j = order.column(g, t, c);
            out[j * cols..][..cols].copy_from_slice(&img[base + c * g.phase_len()..][..cols]);
        }
    }
    out
}

/// Output rows `y0..y0+rows` of image `bi`: the taps' GEMMs into `tmp`, then cropped and
/// biased into `out`.
#[allow(clippy::too_many_arguments)]
fn forward_tile(
    g: &Geo,
    ph: &[f32],
    (weight, order): (&[f32], WeightOrder),
    bias: &[f32],
    (bi, y0, rows): (usize, usize, usize),
    out: SharedMut,
    par: Par,
) {
    let cols = g.cols(rows);
    let mut tmp = uninit_vec(g.o * cols);
    let kk = g.taps();
    let img = &ph[bi * g.image_len()..][..g.image_len()];
    if g.unfolds() && rows == g.ho {
        let unfolded = unfold(g, img, order);
        sgemm(
            (g.o, cols, kk * g.c),
            &mut tmp,
            Strided::new(0, cols, 1),
            false,
            weight,
            Strided::new(0, kk * g.c, 1),
            &unfolded,
            Strided::new(0, cols, 1),
            1.0,
            par,
        );
    }
    for t in (0..kk).filter(|_| !(g.unfolds() && rows == g.ho)) {
        let (off, rs, cs) = order.tap(g, t);
        sgemm(
            (g.o, cols, g.c),
            &mut tmp,
            Strided::new(0, cols, 1),
            t > 0,
            weight,
            Strided::new(off, rs, cs),
            img,
            Strided::new(g.tap_offset(t, y0), g.phase_len(), 1),
            1.0,
            par,
        );
    }
    for oc in 0..g.o {
        for y in 0..rows {
            let src = &tmp[oc * cols + y * g.wq..][..g.wo];
            let at = ((bi * g.o + oc) * g.ho + y0 + y) * g.wo;
            // SAFETY: each (image, row range) is written by exactly one tile.
            unsafe {
                let dst = out.ptr().add(at);
                for (x, &v) in src.iter().enumerate() {
                    *dst.add(x) = v + bias[oc];
                }
            }
        }
    }
}

impl candle_core::CustomOp3 for Conv2dOp {
    fn name(&self) -> &'static str {
        "conv2d-shifted-gemm"
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
        let g = Geo::new(xl.shape(), wl.shape(), self.stride, self.padding)?;
        let (x, w, bias) = (
            cpu_f32(xs, xl, "conv2d")?,
            weight_slice(ws, wl)?,
            cpu_f32(bs, bl, "conv2d")?,
        );
        if bias.len() != g.o {
            candle_core::bail!("conv2d: bias of {} for {} output channels", bias.len(), g.o);
        }
        let ph = all_phases(x, &g);
        let mut out = uninit_vec(g.b * g.o * g.ho * g.wo);
        let out_p = SharedMut(out.as_mut_ptr());
        let rows = g.tile_rows();
        let tiles: Vec<(usize, usize, usize)> = (0..g.b)
            .flat_map(|bi| {
                (0..g.ho)
                    .step_by(rows)
                    .map(move |y0| (bi, y0, rows.min(g.ho - y0)))
            })
            .collect();
        if g.parallel_tiles() {
            tiles
                .par_iter()
                .for_each(|&t| forward_tile(&g, &ph, w, bias, t, out_p, Par::Seq));
        } else {
            for &t in &tiles {
                forward_tile(&g, &ph, w, bias, t, out_p, Par::Pool);
            }
        }
        Ok((CpuStorage::F32(out), Shape::from((g.b, g.o, g.ho, g.wo))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        weight: &Tensor,
        bias: &Tensor,
        _: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let grad = grad.contiguous()?;
        let g = Geo::new(x.shape(), weight.shape(), self.stride, self.padding)?;
        let (xg, xl) = x.storage_and_layout();
        let (wg, wl) = weight.storage_and_layout();
        let (gg, gl) = grad.storage_and_layout();
        let (xv, gv) = (
            storage_f32(&xg, xl, "conv2d backward")?,
            storage_f32(&gg, gl, "conv2d backward")?,
        );
        let (wv, order) = match &*wg {
            candle_core::Storage::Cpu(c) => weight_slice(c, wl)?,
            _ => candle_core::bail!("conv2d backward: CPU tensors expected"),
        };
        let (kk, cols) = (g.taps(), g.cols(g.ho));
        let dev = x.device();
        // The output gradient in phase coordinates ([O, cols] per image), zero in the gaps
        // between rows so those columns add nothing.
        let mut gq = vec![0f32; g.b * g.o * cols];
        gq.par_chunks_mut(cols).enumerate().for_each(|(r, dst)| {
            let src = &gv[r * g.ho * g.wo..][..g.ho * g.wo];
            for (y, line) in src.chunks_exact(g.wo).enumerate() {
                dst[y * g.wq..y * g.wq + g.wo].copy_from_slice(line);
            }
        });
        let grad_b = if bias.track_op() {
            let mut db = vec![0f32; g.o];
            for (r, line) in gv.chunks_exact(g.ho * g.wo).enumerate() {
                db[r % g.o] += line.iter().sum::<f32>();
            }
            Some(Tensor::from_vec(db, g.o, dev)?)
        } else {
            None
        };
        let grad_w = if weight.track_op() {
            let ph = all_phases(xv, &g);
            let mut dw = vec![0f32; g.o * g.c * kk];
            let dw_p = SharedMut(dw.as_mut_ptr());
            // dW_tap [O, C] = sum over images of G [O, cols] x window^T [cols, C].
            let tap = |t: usize, par: Par| {
                for bi in 0..g.b {
                    // SAFETY: tap t writes only the elements o*C*kk + c*kk + t.
                    unsafe {
                        sgemm_raw(
                            (g.o, g.c, cols),
                            dw_p.ptr(),
                            Strided::new(t, g.c * kk, kk),
                            bi > 0,
                            &gq[bi * g.o * cols..][..g.o * cols],
                            Strided::new(0, cols, 1),
                            &ph[bi * g.image_len()..][..g.image_len()],
                            Strided::new(g.tap_offset(t, 0), 1, g.phase_len()),
                            1.0,
                            par,
                        )
                    };
                }
            };
            if kk >= rayon::current_num_threads() {
                (0..kk).into_par_iter().for_each(|t| tap(t, Par::Seq));
            } else {
                (0..kk).for_each(|t| tap(t, Par::Pool));
            }
            Some(Tensor::from_vec(dw, weight.shape(), dev)?)
        } else {
            None
        };
        let grad_x = if x.track_op() {
            let mut dx = uninit_vec(xv.len());
            let mut gph = vec![0f32; g.image_len()];
            let mut unfolded = if g.unfolds() { uninit_vec(kk * g.c * cols) } else { Vec::new() };
            for bi in 0..g.b {
                gph.fill(0.0);
                let gi = &gq[bi * g.o * cols..][..g.o * cols];
                if g.unfolds() {
                    // unfolded [k²C, cols] = W^T [k²C, O] x G [O, cols], then each row added
                    // back where the forward's unfold read it.
                    sgemm(
                        (kk * g.c, cols, g.o),
                        &mut unfolded,
                        Strided::new(0, cols, 1),
                        false,
                        wv,
                        Strided::new(0, 1, kk * g.c),
                        gi,
                        Strided::new(0, cols, 1),
                        1.0,
                        Par::Pool,
                    );
                    for t in 0..kk {
                        let base = g.tap_offset(t, 0);
                        for c in 0..g.c {
                            let src = &unfolded[order.column(&g, t, c) * cols..][..cols];
                            let dst = &mut gph[base + c * g.phase_len()..][..cols];
                            for (d, v) in dst.iter_mut().zip(src) {
                                *d += v;
                            }
                        }
                    }
                    unphase(&gph, &g, &mut dx[bi * g.c * g.h * g.w..][..g.c * g.h * g.w]);
                    continue;
                }
                // window [C, cols] += W_tap^T [C, O] x G [O, cols], tap by tap.
                for t in 0..kk {
                    let off = g.tap_offset(t, 0);
                    let (w_off, w_rs, w_cs) = order.tap(&g, t);
                    sgemm(
                        (g.c, cols, g.o),
                        &mut gph,
                        Strided::new(off, g.phase_len(), 1),
                        true,
                        wv,
                        Strided::new(w_off, w_cs, w_rs),
                        &gq[bi * g.o * cols..][..g.o * cols],
                        Strided::new(0, cols, 1),
                        1.0,
                        Par::Pool,
                    );
                }
                unphase(&gph, &g, &mut dx[bi * g.c * g.h * g.w..][..g.c * g.h * g.w]);
            }
            Some(Tensor::from_vec(dx, x.shape(), dev)?)
        } else {
            None
        };
        Ok((grad_x, grad_w, grad_b))
    }
}

/// `conv2d(x, weight) + bias` on contiguous f32 CPU tensors (square kernel, symmetric padding).
pub fn conv2d(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    stride: usize,
    padding: usize,
) -> candle_core::Result<Tensor> {
    let op = Conv2dOp { stride, padding };
    let weight = match WeightOrder::of(weight.layout()) {
        Some(_) => weight.clone(),
        None => weight.contiguous()?,
    };
    x.contiguous()?.apply_op3_arc(
        &weight,
        bias,
        std::sync::Arc::new(Box::new(op)),
    )
}
