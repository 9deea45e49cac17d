//! Per-request noise. Every request carries its own seeded generator so that the same seed
//! gives the same image whatever else runs concurrently (no global device seed, unlike
//! `torch.manual_seed`). Noise is drawn on the host and moved to the device, so a seed also
//! gives the same image on CPU and GPU.
//!
//! A batch of requests holds one generator per sample: drawing a `[N, ...]` tensor takes row
//! `i` from generator `i`, so a request gets the same noise batched or alone.

use candle_core::{DType, Device, Result, Shape, Tensor};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};

pub struct NoiseRng {
    rngs: Vec<ChaCha8Rng>,
}

impl NoiseRng {
    pub fn new(seed: u64) -> Self {
        Self {
            rngs: vec![ChaCha8Rng::seed_from_u64(seed)],
        }
    }

    /// One generator per batch row.
    pub fn batch(seeds: &[u64]) -> Self {
        Self {
            rngs: seeds
                .iter()
                .map(|&s| ChaCha8Rng::seed_from_u64(s))
                .collect(),
        }
    }

    /// Joins per-request generators into one batch generator (row `i` continues the stream
    /// of `parts[i]`), so a request's ancestral noise does not depend on its batch-mates.
    pub fn merge(parts: Vec<NoiseRng>) -> Self {
        Self {
            rngs: parts.into_iter().flat_map(|p| p.rngs).collect(),
        }
    }

    /// Standard normal samples of `shape`, converted to `dtype` on `device`. With several
    /// generators the leading dimension must equal their number.
    pub fn randn<S: Into<Shape>>(
        &mut self,
        shape: S,
        device: &Device,
        dtype: DType,
    ) -> Result<Tensor> {
        let shape = shape.into();
        let n = shape.elem_count();
        let data: Vec<f32> = if self.rngs.len() == 1 {
            (0..n)
                .map(|_| StandardNormal.sample(&mut self.rngs[0]))
                .collect()
        } else {
            let rows = shape.dims().first().copied().unwrap_or(1);
            if rows != self.rngs.len() {
                candle_core::bail!(
                    "noise for {rows} rows requested from {} generators",
                    self.rngs.len()
                );
            }
            let per = n / rows;
            self.rngs
                .iter_mut()
                .flat_map(|r| {
                    (0..per)
                        .map(|_| StandardNormal.sample(r))
                        .collect::<Vec<f32>>()
                })
                .collect()
        };
        Tensor::from_vec(data, shape, device)?.to_dtype(dtype)
    }

    /// Uniform in [0, 1) from the first generator.
    pub fn uniform(&mut self) -> f64 {
        rand::Rng::random::<f64>(&mut self.rngs[0])
    }

    /// Uniform integer in [0, n) from the first generator.
    pub fn below(&mut self, n: usize) -> usize {
        rand::Rng::random_range(&mut self.rngs[0], 0..n)
    }
}
