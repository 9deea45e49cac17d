//! Vectorised `exp` for softmax and SiLU. libm's `expf` is called one element at a time and was
//! a sixth of a UNet call; this is Cephes' single-precision polynomial (about 1 ulp on the
//! range softmax uses), eight lanes at a time with AVX2 + FMA where the CPU has them (checked
//! once at run time, so one binary serves every x86-64 machine), else the same formula scalar.

use std::sync::OnceLock;

const LOG2E: f32 = std::f32::consts::LOG2_E;
// ln 2 split in two so that n * C1 is exact for the n that occur.
const C1: f32 = 0.693_359_4;
const C2: f32 = -2.121_944_4e-4;
const P0: f32 = 1.987_569_1e-4;
const P1: f32 = 1.398_199_9e-3;
const P2: f32 = 8.333_452e-3;
const P3: f32 = 4.166_579_6e-2;
const P4: f32 = 1.666_666_5e-1;
const P5: f32 = 5.000_000_1e-1;
/// Below this, exp(x) is under f32's smallest normal and is returned as 0.
const LO: f32 = -87.336_55;
const HI: f32 = 88.376_26;

fn has_avx2() -> bool {
    static AVX2: OnceLock<bool> = OnceLock::new();
    *AVX2.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            false
        }
    })
}

/// Scalar `exp` with the vector path's formula (used for tails and CPUs without AVX2).
#[inline]
pub fn exp_scalar(x: f32) -> f32 {
    if x < LO {
        return 0.0;
    }
    let x = x.min(HI);
    let n = (x * LOG2E).round_ties_even();
    let r = n.mul_add(-C2, n.mul_add(-C1, x));
    let p = P0
        .mul_add(r, P1)
        .mul_add(r, P2)
        .mul_add(r, P3)
        .mul_add(r, P4)
        .mul_add(r, P5);
    let y = p.mul_add(r * r, r) + 1.0;
    y * f32::from_bits(((n as i32 + 127) as u32) << 23)
}

/// `x[i] = exp(x[i] - shift)`, returning the sum of the results (a softmax row's denominator).
pub fn exp_shifted_sum(x: &mut [f32], shift: f32) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        // SAFETY: the CPU supports AVX2 and FMA (checked above).
        return unsafe { avx2::exp_shifted(x, shift, true) };
    }
    let mut s = 0.0;
    for v in x.iter_mut() {
        *v = exp_scalar(*v - shift);
        s += *v;
    }
    s
}

/// `x[i] = exp(x[i] - shift)`.
pub fn exp_shifted(x: &mut [f32], shift: f32) {
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        // SAFETY: as above.
        unsafe { avx2::exp_shifted(x, shift, false) };
        return;
    }
    for v in x.iter_mut() {
        *v = exp_scalar(*v - shift);
    }
}

/// `x[i] = sigmoid(x[i])`, i.e. `1 / (1 + exp(-x))`.
pub fn sigmoid_inplace(x: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        // SAFETY: as above.
        unsafe { avx2::sigmoid(x) };
        return;
    }
    for v in x.iter_mut() {
        *v = 1.0 / (1.0 + exp_scalar(-*v));
    }
}

/// `x[i] = x[i] * sigmoid(x[i])` (SiLU).
pub fn silu_inplace(x: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        // SAFETY: as above.
        unsafe { avx2::silu(x) };
        return;
    }
    for v in x.iter_mut() {
        *v /= 1.0 + exp_scalar(-*v);
    }
}

/// Largest element (NaN-free input assumed; -inf for an empty slice).
pub fn max(x: &[f32]) -> f32 {
    x.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v))
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::*;
    use std::arch::x86_64::*;

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn exp8(x: __m256) -> __m256 {
        let under = _mm256_cmp_ps::<_CMP_LT_OQ>(x, _mm256_set1_ps(LO));
        // max/min take the second operand when the first is NaN: a NaN input stays NaN.
        let x = _mm256_min_ps(_mm256_set1_ps(HI), _mm256_max_ps(_mm256_set1_ps(LO), x));
        let n = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
            _mm256_mul_ps(x, _mm256_set1_ps(LOG2E)),
        );
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(C1), x);
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(C2), r);
        let mut p = _mm256_set1_ps(P0);
        for c in [P1, P2, P3, P4, P5] {
            p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c));
        }
        let y = _mm256_add_ps(
            _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), r),
            _mm256_set1_ps(1.0),
        );
        let pow = _mm256_castsi256_ps(_mm256_slli_epi32::<23>(_mm256_add_epi32(
            _mm256_cvtps_epi32(n),
            _mm256_set1_epi32(127),
        )));
        _mm256_andnot_ps(under, _mm256_mul_ps(y, pow))
    }

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn exp_shifted(x: &mut [f32], shift: f32, sum: bool) -> f32 {
        let s = _mm256_set1_ps(shift);
        let mut acc = _mm256_setzero_ps();
        let mut chunks = x.chunks_exact_mut(8);
        for c in &mut chunks {
            let e = exp8(_mm256_sub_ps(_mm256_loadu_ps(c.as_ptr()), s));
            _mm256_storeu_ps(c.as_mut_ptr(), e);
            if sum {
                acc = _mm256_add_ps(acc, e);
            }
        }
        let mut lanes = [0f32; 8];
        _mm256_storeu_ps(lanes.as_mut_ptr(), acc);
        let mut total: f32 = lanes.iter().sum();
        for v in chunks.into_remainder() {
            *v = exp_scalar(*v - shift);
            total += *v;
        }
        total
    }

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn silu(x: &mut [f32]) {
        let one = _mm256_set1_ps(1.0);
        let zero = _mm256_setzero_ps();
        let mut chunks = x.chunks_exact_mut(8);
        for c in &mut chunks {
            let v = _mm256_loadu_ps(c.as_ptr());
            let e = exp8(_mm256_sub_ps(zero, v));
            _mm256_storeu_ps(c.as_mut_ptr(), _mm256_div_ps(v, _mm256_add_ps(one, e)));
        }
        for v in chunks.into_remainder() {
            *v /= 1.0 + exp_scalar(-*v);
        }
    }

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn sigmoid(x: &mut [f32]) {
        let one = _mm256_set1_ps(1.0);
        let zero = _mm256_setzero_ps();
        let mut chunks = x.chunks_exact_mut(8);
        for c in &mut chunks {
            let v = _mm256_loadu_ps(c.as_ptr());
            let e = exp8(_mm256_sub_ps(zero, v));
            _mm256_storeu_ps(c.as_mut_ptr(), _mm256_div_ps(one, _mm256_add_ps(one, e)));
        }
        for v in chunks.into_remainder() {
            *v = 1.0 / (1.0 + exp_scalar(-*v));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vector_exp_matches_libm_to_a_few_ulp() {
        let xs: Vec<f32> = (0..20_000).map(|i| -100.0 + i as f32 * 0.0055).collect();
        let mut v = xs.clone();
        let sum = exp_shifted_sum(&mut v, 0.5);
        let mut want_sum = 0f64;
        for (&x, &e) in xs.iter().zip(&v) {
            let want = ((x - 0.5) as f64).exp();
            want_sum += if want < f32::MIN_POSITIVE as f64 {
                0.0
            } else {
                want
            };
            if want >= f32::MIN_POSITIVE as f64 {
                assert!(
                    ((e as f64) - want).abs() <= 4e-7 * want,
                    "exp({x}) = {e}, want {want}"
                );
            } else {
                assert!(e < 2.0 * f32::MIN_POSITIVE);
            }
            assert_eq!(
                e,
                exp_scalar(x - 0.5),
                "vector and scalar paths agree at {x}"
            );
        }
        // f32 accumulation over 20,000 terms.
        assert!(((sum as f64) - want_sum).abs() < 1e-4 * want_sum);
        let mut inf = [f32::NEG_INFINITY; 9];
        exp_shifted(&mut inf, 0.0);
        assert!(inf.iter().all(|&e| e == 0.0));
        let mut s = [-3.0f32, 0.0, 2.5, 40.0, -40.0, 1.0, 0.1, -0.1, 7.0];
        let want: Vec<f32> = s.iter().map(|&x| 1.0 / (1.0 + (-x).exp())).collect();
        sigmoid_inplace(&mut s);
        for (a, b) in s.iter().zip(want) {
            assert!((a - b).abs() < 1e-6);
        }
    }
}
