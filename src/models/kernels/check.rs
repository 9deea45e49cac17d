//! The fused kernels against the composed candle form they replace, on any device and storage
//! type: values and gradients on shapes with ragged tiles, every head size the models use, and
//! the causal mask. The unit tests do this on the CPU; on a GPU build it is the first thing a
//! GPU run checks (`dspo-server check-kernels --device cuda:0`), since CI has no GPU.

use crate::models::nn::{composed_attention, AttentionMask};
use candle_core::{DType, Device, Tensor, Var};

/// One comparison: the largest error of the output and of the three input gradients, each
/// relative to the largest magnitude of the reference.
#[derive(Debug, Clone, serde::Serialize)]
pub struct CheckRow {
    pub kernel: &'static str,
    pub case: String,
    pub dtype: String,
    pub output_error: f32,
    pub gradient_error: f32,
    pub tolerance: f32,
}

impl CheckRow {
    pub fn passed(&self) -> bool {
        // NaN fails: comparisons with it are false.
        self.output_error <= self.tolerance && self.gradient_error <= self.tolerance
    }
}

/// Attention shapes: (batch, queries, keys, heads, head dim, causal). Lengths that are not
/// multiples of any tile size, cross-attention with 77 text tokens, the CLIP causal mask, and
/// the head dimensions of SD1.5 (40/80/160), SD2/SDXL (64) and the tiny test models (8).
const ATTENTION_CASES: [(usize, usize, usize, usize, usize, bool); 7] = [
    (2, 333, 333, 2, 40, false),
    (2, 200, 77, 2, 40, false),
    (1, 77, 77, 3, 64, true),
    (2, 150, 150, 2, 64, false),
    (1, 130, 77, 2, 80, false),
    (1, 70, 70, 2, 160, false),
    (2, 65, 65, 4, 8, true),
];

fn tolerance(dtype: DType) -> f32 {
    match dtype {
        DType::F32 => 1e-4,
        // Inputs and outputs are rounded to 11 (f16) or 8 (bf16) significant bits.
        DType::F16 => 1e-2,
        _ => 4e-2,
    }
}

fn relative_error(a: &Tensor, reference: &Tensor) -> candle_core::Result<f32> {
    let a = a.to_dtype(DType::F32)?;
    let scale = reference.abs()?.max_all()?.to_scalar::<f32>()?.max(1e-6);
    let err = (a - reference)?.abs()?.max_all()?.to_scalar::<f32>()?;
    Ok(err / scale)
}

/// Output and q/k/v gradients of `loss = sum(out * r)`.
fn forward_backward(
    qkv: [&Tensor; 3],
    r: &Tensor,
    f: impl Fn(&Tensor, &Tensor, &Tensor) -> candle_core::Result<Tensor>,
) -> candle_core::Result<(Tensor, Vec<Tensor>)> {
    let vars = qkv
        .iter()
        .map(|t| Var::from_tensor(t))
        .collect::<candle_core::Result<Vec<_>>>()?;
    let out = f(vars[0].as_tensor(), vars[1].as_tensor(), vars[2].as_tensor())?;
    let loss = (out.to_dtype(DType::F32)? * r)?.sum_all()?;
    let grads = loss.backward()?;
    let g = vars
        .iter()
        .map(|var| match grads.get(var.as_tensor()) {
            Some(x) => x.to_dtype(DType::F32),
            None => candle_core::bail!("no gradient for an attention input"),
        })
        .collect::<candle_core::Result<Vec<_>>>()?;
    Ok((out.to_dtype(DType::F32)?, g))
}

/// Standard-normal values from a fixed seed, made on the CPU (whose generator cannot be
/// seeded through candle) and moved to `device`.
fn randn(seed: u64, shape: (usize, usize, usize), device: &Device) -> candle_core::Result<Tensor> {
    use rand::SeedableRng;
    use rand_distr::Distribution;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let normal = rand_distr::StandardNormal;
    let len = shape.0 * shape.1 * shape.2;
    let data: Vec<f32> = (0..len).map(|_| normal.sample(&mut rng)).collect();
    Tensor::from_vec(data, shape, &Device::Cpu)?.to_device(device)
}

/// Fused attention against the composed form computed in f32 from the same (rounded) inputs.
pub fn check_attention(device: &Device, dtype: DType) -> candle_core::Result<Vec<CheckRow>> {
    if device.is_cpu() && dtype != DType::F32 {
        candle_core::bail!("the CPU attention kernel is f32 only");
    }
    let mut rows = Vec::new();
    for (i, &(b, n, m, heads, d, causal)) in ATTENTION_CASES.iter().enumerate() {
        let c = heads * d;
        let seed = 4 * i as u64;
        let q = randn(seed, (b, n, c), device)?.to_dtype(dtype)?;
        let k = randn(seed + 1, (b, m, c), device)?.to_dtype(dtype)?;
        let v = randn(seed + 2, (b, m, c), device)?.to_dtype(dtype)?;
        let r = randn(seed + 3, (b, n, c), device)?;
        let mask = if causal {
            AttentionMask::Causal
        } else {
            AttentionMask::None
        };
        let (out, grads) = forward_backward([&q, &k, &v], &r, |q, k, v| {
            super::attention::fused_attention(q, k, v, heads, causal)
        })?;
        let up = |t: &Tensor| t.to_dtype(DType::F32);
        let (ref_out, ref_grads) = forward_backward([&up(&q)?, &up(&k)?, &up(&v)?], &r, |q, k, v| {
            composed_attention(q, k, v, heads, mask)
        })?;
        let mut gradient_error = 0f32;
        for (g, rg) in grads.iter().zip(&ref_grads) {
            gradient_error = gradient_error.max(relative_error(g, rg)?);
        }
        rows.push(CheckRow {
            kernel: "attention",
            case: format!(
                "b{b} n{n} m{m} heads{heads} d{d}{}",
                if causal { " causal" } else { "" }
            ),
            dtype: format!("{dtype:?}").to_lowercase(),
            output_error: relative_error(&out, &ref_out)?,
            gradient_error,
            tolerance: tolerance(dtype),
        });
    }
    Ok(rows)
}

#[cfg(test)]
mod tests {
    #[test]
    fn cpu_attention_kernel_passes_its_own_check() {
        let rows = super::check_attention(&candle_core::Device::Cpu, candle_core::DType::F32)
            .unwrap();
        assert_eq!(rows.len(), super::ATTENTION_CASES.len());
        for r in &rows {
            assert!(r.passed(), "{r:?}");
        }
    }
}
