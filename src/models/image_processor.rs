//! CLIP's image preprocessing, in the two forms reward models use:
//!
//! * transformers' `CLIPImageProcessor` and open_clip's eval transform: resize the shorter side
//!   to `shortest_edge` with Pillow's bicubic filter on the 8-bit image, centre-crop, rescale to
//!   [0, 1], normalise per channel. The resize reproduces Pillow's 8-bit resampling exactly (its
//!   filter support grows with the downscale factor, coefficients in 22-bit fixed point,
//!   horizontal pass then vertical, rounding to 8 bits in between), since a reward model's score
//!   is read from these pixels.
//! * HPSv2's `preprocess_val` (`image_processor_type` "HPSv2ResizeMaxSize"): rescale first, resize
//!   the longer side to `longest_edge` with torch's antialiased bicubic on the float image (the
//!   same weights, no rounding), zero-pad to a square, normalise.

use super::{ModelError, Result};
use candle_core::{Device, Tensor};
use image::RgbImage;
use serde_json::Value;
use std::path::Path;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CropRounding {
    /// transformers: `(size - crop) // 2`.
    Floor,
    /// torchvision (open_clip): `round((size - crop) / 2)`.
    Round,
}

#[derive(Debug, Clone)]
pub struct ImageProcessor {
    pub shortest_edge: usize,
    pub crop_height: usize,
    pub crop_width: usize,
    pub mean: [f64; 3],
    pub std: [f64; 3],
    pub crop_rounding: CropRounding,
    /// HPSv2's form: the longer side to this, then zero padding to `pad` (height, width).
    pub longest_edge_pad: Option<(usize, (usize, usize))>,
}

impl ImageProcessor {
    /// `preprocessor_config.json` (transformers' keys); `crop_rounding: "round"` marks open_clip's
    /// transform.
    pub fn load(dir: &Path) -> Result<Self> {
        let path = dir.join("preprocessor_config.json");
        let text = std::fs::read_to_string(&path)
            .map_err(|e| ModelError::Io(path.clone(), e.to_string()))?;
        let v: Value = serde_json::from_str(&text)
            .map_err(|e| ModelError::Corrupt(path.display().to_string(), e.to_string()))?;
        Self::from_json(&v).map_err(|e| ModelError::Config(format!("{}: {e}", path.display())))
    }

    pub fn from_json(v: &Value) -> std::result::Result<Self, String> {
        let size = |x: &Value, k: &str| x.get(k).and_then(|s| s.as_u64()).map(|s| s as usize);
        let longest_edge_pad = match v.get("size").and_then(|s| size(s, "longest_edge")) {
            Some(edge) => {
                let pad = v.get("pad_size").ok_or("pad_size is missing")?;
                Some((
                    edge,
                    (
                        size(pad, "height").ok_or("pad_size.height is missing")?,
                        size(pad, "width").ok_or("pad_size.width is missing")?,
                    ),
                ))
            }
            None => None,
        };
        let shortest_edge = match v.get("size") {
            Some(s) if s.is_u64() => s.as_u64().map(|s| s as usize),
            Some(s) => size(s, "shortest_edge").or(longest_edge_pad.map(|(e, _)| e)),
            None => None,
        }
        .ok_or("size.shortest_edge is missing")?;
        let (crop_height, crop_width) = match v.get("crop_size") {
            Some(c) if c.is_u64() => {
                let c = c.as_u64().unwrap_or(0) as usize;
                (c, c)
            }
            Some(c) => (
                size(c, "height").ok_or("crop_size.height is missing")?,
                size(c, "width").ok_or("crop_size.width is missing")?,
            ),
            None => (shortest_edge, shortest_edge),
        };
        let triple = |k: &str, default: [f64; 3]| -> std::result::Result<[f64; 3], String> {
            match v.get(k).and_then(|a| a.as_array()) {
                None => Ok(default),
                Some(a) if a.len() == 3 => {
                    let mut out = [0.0; 3];
                    for (o, x) in out.iter_mut().zip(a) {
                        *o = x.as_f64().ok_or(format!("{k} must be numbers"))?;
                    }
                    Ok(out)
                }
                Some(_) => Err(format!("{k} must have 3 values")),
            }
        };
        // OpenAI CLIP's statistics, transformers' defaults for CLIPImageProcessor.
        let mean = triple("image_mean", [0.48145466, 0.4578275, 0.40821073])?;
        let std = triple("image_std", [0.26862954, 0.26130258, 0.27577711])?;
        if let Some(r) = v.get("resample").and_then(|r| r.as_u64()) {
            if r != 3 {
                return Err(format!("resample {r}: only bicubic (3) is supported"));
            }
        }
        let crop_rounding = match v.get("crop_rounding").and_then(|r| r.as_str()) {
            Some("round") => CropRounding::Round,
            _ => CropRounding::Floor,
        };
        Ok(Self {
            shortest_edge,
            crop_height,
            crop_width,
            mean,
            std,
            crop_rounding,
            longest_edge_pad,
        })
    }

    /// The resized size: the shorter side becomes `shortest_edge`, the longer keeps the aspect
    /// ratio, truncated (both transformers and torchvision compute `int(edge * long / short)`).
    pub fn resized_size(&self, width: usize, height: usize) -> (usize, usize) {
        let e = self.shortest_edge;
        if width <= height {
            (e, (e as f64 * height as f64 / width as f64) as usize)
        } else {
            ((e as f64 * width as f64 / height as f64) as usize, e)
        }
    }

    /// `pixel_values [1, 3, crop_height, crop_width]` (float32) of one image.
    pub fn preprocess(&self, img: &RgbImage, device: &Device) -> Result<Tensor> {
        if let Some((edge, pad)) = self.longest_edge_pad {
            return self.preprocess_longest_edge(img, edge, pad, device);
        }
        let (w, h) = (img.width() as usize, img.height() as usize);
        let (rw, rh) = self.resized_size(w, h);
        let resized = resize_bicubic(img, rw, rh);
        let (ch, cw) = (self.crop_height, self.crop_width);
        let offset = |size: usize, crop: usize| -> isize {
            let d = size as isize - crop as isize;
            match self.crop_rounding {
                CropRounding::Floor => d.div_euclid(2),
                // Python's round: halves to even.
                CropRounding::Round => ((d as f64) / 2.0).round_ties_even() as isize,
            }
        };
        let (top, left) = (offset(rh, ch), offset(rw, cw));
        let mut out = vec![0f32; 3 * ch * cw];
        for y in 0..ch {
            for x in 0..cw {
                let (sy, sx) = (y as isize + top, x as isize + left);
                // A crop larger than the image pads with zeros (transformers' center_crop).
                let px = if sy >= 0 && sx >= 0 && (sy as usize) < rh && (sx as usize) < rw {
                    resized.get_pixel(sx as u32, sy as u32).0
                } else {
                    [0, 0, 0]
                };
                for c in 0..3 {
                    let v = px[c] as f64 / 255.0;
                    out[c * ch * cw + y * cw + x] = ((v - self.mean[c]) / self.std[c]) as f32;
                }
            }
        }
        Ok(Tensor::from_vec(out, (1, 3, ch, cw), device)?)
    }
}

impl ImageProcessor {
    /// HPSv2's form: float image, antialiased bicubic to `edge` on the longer side (the new
    /// shorter side rounded half to even, as Python's `round`), zero-padded, normalised.
    fn preprocess_longest_edge(
        &self,
        img: &RgbImage,
        edge: usize,
        (ph, pw): (usize, usize),
        device: &Device,
    ) -> Result<Tensor> {
        let (w, h) = (img.width() as usize, img.height() as usize);
        let planes: Vec<Vec<f64>> = (0..3)
            .map(|c| img.pixels().map(|p| p.0[c] as f64 / 255.0).collect())
            .collect();
        let longest = w.max(h);
        let (nw, nh, planes) = if longest == edge {
            (w, h, planes)
        } else {
            let scaled = |side: usize| ((side * edge) as f64 / longest as f64).round_ties_even() as usize;
            let (nw, nh) = (scaled(w).max(1), scaled(h).max(1));
            let planes = planes
                .iter()
                .map(|p| resize_float(p, w, h, nw, nh))
                .collect();
            (nw, nh, planes)
        };
        if nw > pw || nh > ph {
            return Err(ModelError::Config(format!(
                "resized image {nw}x{nh} exceeds the pad size {pw}x{ph}"
            )));
        }
        let (left, top) = ((pw - nw) / 2, (ph - nh) / 2);
        let mut out = vec![0f32; 3 * ph * pw];
        for (c, plane) in planes.iter().enumerate() {
            for y in 0..ph {
                for x in 0..pw {
                    let v = if y >= top && y < top + nh && x >= left && x < left + nw {
                        plane[(y - top) * nw + (x - left)]
                    } else {
                        0.0
                    };
                    out[c * ph * pw + y * pw + x] = ((v - self.mean[c]) / self.std[c]) as f32;
                }
            }
        }
        Ok(Tensor::from_vec(out, (1, 3, ph, pw), device)?)
    }
}

/// Normalised floating-point weights of the antialiased bicubic resampling (the weights
/// Pillow's `precompute_coeffs` computes, before its fixed-point rounding).
fn float_coefficients(in_size: usize, out_size: usize) -> Vec<(usize, Vec<f64>)> {
    let scale = in_size as f64 / out_size as f64;
    let filterscale = scale.max(1.0);
    let support = 2.0 * filterscale;
    (0..out_size)
        .map(|xx| {
            let center = (xx as f64 + 0.5) * scale;
            let xmin = ((center - support + 0.5) as isize).max(0) as usize;
            let xmax = ((center + support + 0.5) as isize).min(in_size as isize) as usize;
            let mut w: Vec<f64> = (xmin..xmax)
                .map(|x| bicubic((x as f64 - center + 0.5) * (1.0 / filterscale)))
                .collect();
            let total: f64 = w.iter().sum();
            if total != 0.0 {
                w.iter_mut().for_each(|k| *k /= total);
            }
            (xmin, w)
        })
        .collect()
}

/// torch's `interpolate(mode="bicubic", antialias=True)` of one float plane: width first,
/// then height, no rounding or clamping.
fn resize_float(src: &[f64], w: usize, h: usize, nw: usize, nh: usize) -> Vec<f64> {
    let cx = float_coefficients(w, nw);
    let mut rows = vec![0.0; h * nw];
    for y in 0..h {
        for (xx, (xmin, k)) in cx.iter().enumerate() {
            rows[y * nw + xx] = k.iter().enumerate().map(|(i, kk)| src[y * w + xmin + i] * kk).sum();
        }
    }
    let cy = float_coefficients(h, nh);
    let mut out = vec![0.0; nh * nw];
    for (yy, (ymin, k)) in cy.iter().enumerate() {
        for x in 0..nw {
            out[yy * nw + x] = k.iter().enumerate().map(|(i, kk)| rows[(ymin + i) * nw + x] * kk).sum();
        }
    }
    out
}

/// Pillow's bicubic kernel (a = -0.5).
fn bicubic(x: f64) -> f64 {
    const A: f64 = -0.5;
    let x = x.abs();
    if x < 1.0 {
        ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        (((x - 5.0) * x + 8.0) * x - 4.0) * A
    } else {
        0.0
    }
}

const PRECISION_BITS: u32 = 32 - 8 - 2;

/// Per output position: the first input index and the fixed-point weights (Pillow's
/// `precompute_coeffs` and `normalize_coeffs_8bpc`).
fn coefficients(in_size: usize, out_size: usize) -> Vec<(usize, Vec<i64>)> {
    float_coefficients(in_size, out_size)
        .into_iter()
        .map(|(xmin, w)| {
            let fixed = w
                .iter()
                .map(|&k| {
                    let scaled = k * (1u64 << PRECISION_BITS) as f64;
                    (if k < 0.0 { scaled - 0.5 } else { scaled + 0.5 }) as i64
                })
                .collect();
            (xmin, fixed)
        })
        .collect()
}

fn clip8(v: i64) -> u8 {
    (v >> PRECISION_BITS).clamp(0, 255) as u8
}

/// Pillow's `Image.resize((width, height), Image.BICUBIC)` of an 8-bit RGB image.
pub fn resize_bicubic(img: &RgbImage, width: usize, height: usize) -> RgbImage {
    let (w, h) = (img.width() as usize, img.height() as usize);
    let src = img.as_raw();
    let round = 1i64 << (PRECISION_BITS - 1);
    // Horizontal pass (skipped when the width does not change, as Pillow does).
    let horizontal: Vec<u8> = if width != w {
        let cx = coefficients(w, width);
        let mut out = vec![0u8; h * width * 3];
        for y in 0..h {
            for (xx, (xmin, k)) in cx.iter().enumerate() {
                for c in 0..3 {
                    let mut ss = round;
                    for (i, &kk) in k.iter().enumerate() {
                        ss += src[(y * w + xmin + i) * 3 + c] as i64 * kk;
                    }
                    out[(y * width + xx) * 3 + c] = clip8(ss);
                }
            }
        }
        out
    } else {
        src.clone()
    };
    let vertical: Vec<u8> = if height != h {
        let cy = coefficients(h, height);
        let mut out = vec![0u8; height * width * 3];
        for (yy, (ymin, k)) in cy.iter().enumerate() {
            for x in 0..width {
                for c in 0..3 {
                    let mut ss = round;
                    for (i, &kk) in k.iter().enumerate() {
                        ss += horizontal[((ymin + i) * width + x) * 3 + c] as i64 * kk;
                    }
                    out[(yy * width + x) * 3 + c] = clip8(ss);
                }
            }
        }
        out
    } else {
        horizontal
    };
    RgbImage::from_raw(width as u32, height as u32, vertical).expect("buffer matches the size")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_size_is_the_identity_and_weights_sum_to_one() {
        let img = RgbImage::from_fn(7, 5, |x, y| image::Rgb([x as u8 * 30, y as u8 * 40, 9]));
        assert_eq!(resize_bicubic(&img, 7, 5), img);
        for (_, k) in coefficients(37, 30).iter().chain(coefficients(20, 30).iter()) {
            let sum: i64 = k.iter().sum();
            assert!((sum - (1 << PRECISION_BITS)).abs() <= k.len() as i64, "{sum}");
        }
        let flat = RgbImage::from_pixel(9, 13, image::Rgb([200, 17, 90]));
        assert_eq!(resize_bicubic(&flat, 4, 6), RgbImage::from_pixel(4, 6, image::Rgb([200, 17, 90])));
    }

    #[test]
    fn the_shorter_side_becomes_shortest_edge() {
        let p = ImageProcessor::from_json(&serde_json::json!({"size": {"shortest_edge": 30},
            "crop_size": {"height": 30, "width": 30}}))
        .unwrap();
        assert_eq!(p.resized_size(45, 37), (36, 30));
        assert_eq!(p.resized_size(29, 64), (30, 66));
    }
}
