//! GroupNorm (optionally followed by SiLU, as in every ResNet block) and LayerNorm, each one
//! pass forward with an analytic backward that recomputes the normalised values from the
//! input and the per-group statistics. Composed from tensor ops they were ~10 passes forward,
//! more backward, and the graph kept five full-size f32 intermediates per norm.

use super::{cpu_f32, simd, storage_f32, uninit_vec};
use candle_core::{CpuStorage, Layout, Shape, Tensor};
use rayon::prelude::*;

/// Mean and 1/std of each contiguous chunk of `n` values, accumulated in f64 (statistics over
/// thousands of f32 values lose digits otherwise; diffusers upcasts too).
fn chunk_stats(x: &[f32], n: usize, eps: f64) -> Vec<(f32, f32)> {
    x.par_chunks(n)
        .map(|v| {
            let mean = v.iter().map(|&a| a as f64).sum::<f64>() / n as f64;
            let var = v.iter().map(|&a| (a as f64 - mean).powi(2)).sum::<f64>() / n as f64;
            (mean as f32, (1.0 / (var + eps).sqrt()) as f32)
        })
        .collect()
}

pub struct GroupNormOp {
    pub groups: usize,
    pub eps: f64,
    /// Apply SiLU to the normalised output.
    pub silu: bool,
}

impl GroupNormOp {
    fn geometry(&self, shape: &Shape) -> candle_core::Result<(usize, usize, usize)> {
        let dims = shape.dims();
        if dims.len() < 2 || self.groups == 0 || dims[1] % self.groups != 0 {
            candle_core::bail!(
                "group-norm: {shape:?} does not split into {} groups",
                self.groups
            );
        }
        let (b, c) = (dims[0], dims[1]);
        Ok((b, c, shape.elem_count() / (b * c).max(1)))
    }
}

impl candle_core::CustomOp3 for GroupNormOp {
    fn name(&self) -> &'static str {
        "group-norm"
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
        let (x, w, bias) = (
            cpu_f32(xs, xl, "group-norm")?,
            cpu_f32(ws, wl, "group-norm")?,
            cpu_f32(bs, bl, "group-norm")?,
        );
        let (_, c, hw) = self.geometry(xl.shape())?;
        let cg = c / self.groups;
        let stats = chunk_stats(x, cg * hw, self.eps);
        let mut y = uninit_vec(x.len());
        y.par_chunks_mut(hw).enumerate().for_each(|(p, out)| {
            let (bi, ci) = (p / c, p % c);
            let (mean, rstd) = stats[bi * self.groups + ci / cg];
            let (sc, sh) = (rstd * w[ci], bias[ci] - mean * rstd * w[ci]);
            for (o, &v) in out.iter_mut().zip(&x[p * hw..][..hw]) {
                *o = v * sc + sh;
            }
            if self.silu {
                simd::silu_inplace(out);
            }
        });
        Ok((CpuStorage::F32(y), xl.shape().clone()))
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
        let (xg, xl) = x.storage_and_layout();
        let (wg, wl) = weight.storage_and_layout();
        let (bg, bl) = bias.storage_and_layout();
        let (gg, gl) = grad.storage_and_layout();
        let xv = storage_f32(&xg, xl, "group-norm backward")?;
        let w = storage_f32(&wg, wl, "group-norm backward")?;
        let bv = storage_f32(&bg, bl, "group-norm backward")?;
        let gv = storage_f32(&gg, gl, "group-norm backward")?;
        let (b, c, hw) = self.geometry(xl.shape())?;
        let (g, cg) = (self.groups, c / self.groups);
        let stats = chunk_stats(xv, cg * hw, self.eps);
        // With SiLU, the gradient reaching the norm's output z: dy * silu'(z).
        let dz_owned: Option<Vec<f32>> = self.silu.then(|| {
            let mut dz = uninit_vec(xv.len());
            dz.par_chunks_mut(hw).enumerate().for_each(|(p, out)| {
                let (bi, ci) = (p / c, p % c);
                let (mean, rstd) = stats[bi * g + ci / cg];
                let (sc, sh) = (rstd * w[ci], bv[ci] - mean * rstd * w[ci]);
                let xs = &xv[p * hw..][..hw];
                for (o, &v) in out.iter_mut().zip(xs) {
                    *o = v * sc + sh;
                }
                let mut sig = out.to_vec();
                simd::sigmoid_inplace(&mut sig);
                for ((o, &s), &d) in out.iter_mut().zip(&sig).zip(&gv[p * hw..][..hw]) {
                    // d/dz z*s(z) = s + z*s*(1-s)
                    *o = d * (s + *o * s * (1.0 - s));
                }
            });
            dz
        });
        let dz: &[f32] = dz_owned.as_deref().unwrap_or(gv);
        // Per (batch, channel): sum(dz) and sum(dz * xhat), the pieces of every gradient.
        let sums: Vec<(f32, f32)> = (0..b * c)
            .into_par_iter()
            .map(|p| {
                let (mean, rstd) = stats[p / c * g + p % c / cg];
                let (xs, ds) = (&xv[p * hw..][..hw], &dz[p * hw..][..hw]);
                let (s, sx) = xs.iter().zip(ds).fold((0f64, 0f64), |(s, sx), (&a, &d)| {
                    (s + d as f64, sx + (d * (a - mean) * rstd) as f64)
                });
                (s as f32, sx as f32)
            })
            .collect();
        let dev = x.device();
        let grad_x = if x.track_op() {
            let mut gx = uninit_vec(xv.len());
            gx.par_chunks_mut(cg * hw)
                .enumerate()
                .for_each(|(bg, out)| {
                    let (bi, gi) = (bg / g, bg % g);
                    let (mean, rstd) = stats[bg];
                    let n = (cg * hw) as f32;
                    // Means over the group of dxhat = dz * w and of dxhat * xhat.
                    let (mut m1, mut m2) = (0f32, 0f32);
                    for ci in gi * cg..(gi + 1) * cg {
                        let (s, sx) = sums[bi * c + ci];
                        m1 += s * w[ci];
                        m2 += sx * w[ci];
                    }
                    let (m1, m2) = (m1 / n, m2 / n);
                    for (j, o) in out.iter_mut().enumerate() {
                        let ci = gi * cg + j / hw;
                        let idx = bg * cg * hw + j;
                        let xhat = (xv[idx] - mean) * rstd;
                        *o = rstd * (dz[idx] * w[ci] - m1 - xhat * m2);
                    }
                });
            Some(Tensor::from_vec(gx, xl.shape(), dev)?)
        } else {
            None
        };
        let per_channel = |pick: fn(&(f32, f32)) -> f32| {
            let mut v = vec![0f32; c];
            for (p, s) in sums.iter().enumerate() {
                v[p % c] += pick(s);
            }
            Tensor::from_vec(v, c, dev)
        };
        let grad_w = match weight.track_op() {
            true => Some(per_channel(|s| s.1)?),
            false => None,
        };
        let grad_b = match bias.track_op() {
            true => Some(per_channel(|s| s.0)?),
            false => None,
        };
        Ok((grad_x, grad_w, grad_b))
    }
}

pub struct LayerNormOp {
    pub eps: f64,
}

impl candle_core::CustomOp3 for LayerNormOp {
    fn name(&self) -> &'static str {
        "layer-norm"
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
        let (x, w, bias) = (
            cpu_f32(xs, xl, "layer-norm")?,
            cpu_f32(ws, wl, "layer-norm")?,
            cpu_f32(bs, bl, "layer-norm")?,
        );
        let d = w.len();
        if d == 0 || x.len() % d != 0 || bias.len() != d {
            candle_core::bail!("layer-norm: {:?} with {d} weights", xl.shape());
        }
        let mut y = uninit_vec(x.len());
        y.par_chunks_mut(d)
            .zip(x.par_chunks(d))
            .for_each(|(out, row)| {
                let mean = row.iter().map(|&a| a as f64).sum::<f64>() / d as f64;
                let var = row.iter().map(|&a| (a as f64 - mean).powi(2)).sum::<f64>() / d as f64;
                let (mean, rstd) = (mean as f32, (1.0 / (var + self.eps).sqrt()) as f32);
                for (((o, &v), &wi), &bi) in out.iter_mut().zip(row).zip(w).zip(bias) {
                    *o = (v - mean) * rstd * wi + bi;
                }
            });
        Ok((CpuStorage::F32(y), xl.shape().clone()))
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
        let (xg, xl) = x.storage_and_layout();
        let (wg, wl) = weight.storage_and_layout();
        let (gg, gl) = grad.storage_and_layout();
        let xv = storage_f32(&xg, xl, "layer-norm backward")?;
        let w = storage_f32(&wg, wl, "layer-norm backward")?;
        let gv = storage_f32(&gg, gl, "layer-norm backward")?;
        let d = w.len();
        let stats = chunk_stats(xv, d, self.eps);
        let dev = x.device();
        let grad_x = if x.track_op() {
            let mut gx = uninit_vec(xv.len());
            gx.par_chunks_mut(d).enumerate().for_each(|(r, out)| {
                let (mean, rstd) = stats[r];
                let (row, g) = (&xv[r * d..][..d], &gv[r * d..][..d]);
                let (mut m1, mut m2) = (0f32, 0f32);
                for ((&a, &gi), &wi) in row.iter().zip(g).zip(w) {
                    let dxh = gi * wi;
                    m1 += dxh;
                    m2 += dxh * (a - mean) * rstd;
                }
                let (m1, m2) = (m1 / d as f32, m2 / d as f32);
                for (((o, &a), &gi), &wi) in out.iter_mut().zip(row).zip(g).zip(w) {
                    *o = rstd * (gi * wi - m1 - (a - mean) * rstd * m2);
                }
            });
            Some(Tensor::from_vec(gx, xl.shape(), dev)?)
        } else {
            None
        };
        let (need_w, need_b) = (weight.track_op(), bias.track_op());
        let (grad_w, grad_b) = if need_w || need_b {
            // Partial sums over row chunks, then one small reduction.
            let rows = xv.len() / d;
            let chunk = rows.div_ceil(4 * rayon::current_num_threads()).max(1);
            let parts: Vec<(Vec<f32>, Vec<f32>)> = (0..rows.div_ceil(chunk))
                .into_par_iter()
                .map(|ch| {
                    let (mut dw, mut db) = (vec![0f32; d], vec![0f32; d]);
                    for r in ch * chunk..((ch + 1) * chunk).min(rows) {
                        let (mean, rstd) = stats[r];
                        let (row, g) = (&xv[r * d..][..d], &gv[r * d..][..d]);
                        for j in 0..d {
                            dw[j] += g[j] * (row[j] - mean) * rstd;
                            db[j] += g[j];
                        }
                    }
                    (dw, db)
                })
                .collect();
            let (mut dw, mut db) = (vec![0f32; d], vec![0f32; d]);
            for (pw, pb) in parts {
                dw.iter_mut().zip(pw).for_each(|(a, b)| *a += b);
                db.iter_mut().zip(pb).for_each(|(a, b)| *a += b);
            }
            (
                need_w.then(|| Tensor::from_vec(dw, d, dev)).transpose()?,
                need_b.then(|| Tensor::from_vec(db, d, dev)).transpose()?,
            )
        } else {
            (None, None)
        };
        Ok((grad_x, grad_w, grad_b))
    }
}
