//! Each fused kernel against the composed candle ops it replaces: values and every gradient.

use super::attention::FusedAttention;
use crate::models::nn::{composed_attention, AttentionMask};
use candle_core::{Device, Tensor, Var};
use std::sync::Arc;

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

fn scale_of(t: &Tensor) -> f32 {
    t.abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
        .max(1.0)
}

#[test]
fn fused_attention_matches_composed_values_and_gradients() -> candle_core::Result<()> {
    let dev = Device::Cpu;
    // (batch, queries, keys, heads, head dim, causal, block_q, block_k): tiles smaller than the
    // problem exercise the online rescaling and partial causal tiles; the defaults one tile.
    let cases = [
        (2, 7, 7, 2, 3, false, 3, 4),
        (2, 7, 5, 2, 4, false, 2, 2),
        (1, 9, 9, 3, 2, true, 4, 3),
        (2, 9, 9, 1, 5, true, 64, 512),
        (2, 33, 12, 2, 8, false, 64, 512),
        (1, 6, 6, 2, 3, true, 1, 1),
    ];
    for (b, n, m, heads, d, causal, bq, bk) in cases {
        let c = heads * d;
        let q = Var::from_tensor(&(Tensor::randn(0f32, 1.5, (b, n, c), &dev)?))?;
        let k = Var::from_tensor(&(Tensor::randn(0f32, 1.5, (b, m, c), &dev)?))?;
        let v = Var::from_tensor(&(Tensor::randn(0f32, 1.0, (b, m, c), &dev)?))?;
        let op = FusedAttention::with_blocks(heads, causal, bq, bk);
        let fused =
            q.as_tensor()
                .apply_op3_arc(k.as_tensor(), v.as_tensor(), Arc::new(Box::new(op)))?;
        let mask = if causal {
            AttentionMask::Causal
        } else {
            AttentionMask::None
        };
        let composed =
            composed_attention(q.as_tensor(), k.as_tensor(), v.as_tensor(), heads, mask)?;
        let what = format!("b{b} n{n} m{m} h{heads} d{d} causal {causal} tiles {bq}x{bk}");
        assert!(max_diff(&fused, &composed) < 1e-5, "forward {what}");
        let r = Tensor::randn(0f32, 1., fused.shape(), &dev)?;
        let gf = (&fused * &r)?.sum_all()?.backward()?;
        let gc = (&composed * &r)?.sum_all()?.backward()?;
        for (name, var) in [("q", &q), ("k", &k), ("v", &v)] {
            let (a, e) = (
                gf.get(var.as_tensor()).unwrap(),
                gc.get(var.as_tensor()).unwrap(),
            );
            let err = max_diff(a, e) / scale_of(e);
            assert!(err < 1e-5, "grad {name} {what}: {err}");
        }
    }
    Ok(())
}

#[test]
fn fused_attention_leaves_untracked_inputs_without_gradient() -> candle_core::Result<()> {
    let dev = Device::Cpu;
    let q = Var::from_tensor(&Tensor::randn(0f32, 1., (1, 4, 4), &dev)?)?;
    let k = Tensor::randn(0f32, 1., (1, 3, 4), &dev)?;
    let v = Tensor::randn(0f32, 1., (1, 3, 4), &dev)?;
    let out = super::attention::fused_attention(q.as_tensor(), &k, &v, 2, false)?;
    let grads = out.sum_all()?.backward()?;
    assert!(grads.get(q.as_tensor()).is_some());
    assert!(grads.get(&k).is_none() && grads.get(&v).is_none());
    Ok(())
}

#[test]
fn shifted_gemm_conv_matches_candle_conv_and_its_gradients() -> candle_core::Result<()> {
    let dev = Device::Cpu;
    // (in channels, out channels, kernel, stride, padding, height, width)
    for &(c, o, k, stride, padding, h, w) in &[
        (3, 4, 3, 1, 1, 7, 6),
        (3, 5, 3, 2, 1, 8, 8),
        (2, 3, 3, 2, 0, 9, 9),
        (4, 2, 1, 1, 0, 4, 3),
        (3, 3, 3, 1, 0, 6, 5),
        (2, 4, 3, 1, 1, 1, 1),
        (5, 3, 3, 1, 1, 40, 33),
        // Large enough for the tap-by-tap path (the ones above run as one unfolded GEMM).
        (16, 8, 3, 1, 1, 90, 90),
        (32, 4, 3, 2, 1, 130, 130),
    ] {
        let x = Var::from_tensor(&Tensor::randn(0f32, 1., (2, c, h, w), &dev)?)?;
        let wt = Var::from_tensor(&Tensor::randn(0f32, 1., (o, c, k, k), &dev)?)?;
        let b = Var::from_tensor(&Tensor::randn(0f32, 1., o, &dev)?)?;
        let ours = super::conv::conv2d(
            x.as_tensor(),
            wt.as_tensor(),
            b.as_tensor(),
            stride,
            padding,
        )?;
        let reference = x
            .as_tensor()
            .conv2d(wt.as_tensor(), padding, stride, 1, 1)?
            .broadcast_add(&b.as_tensor().reshape((1, o, 1, 1))?)?;
        let what = format!("c{c} o{o} k{k} s{stride} p{padding} {h}x{w}");
        assert_eq!(ours.dims(), reference.dims(), "{what}");
        assert!(max_diff(&ours, &reference) < 1e-4, "forward {what}");
        let r = Tensor::randn(0f32, 1., ours.shape(), &dev)?;
        let g_ours = (&ours * &r)?.sum_all()?.backward()?;
        // candle's own conv backward mis-sizes the input gradient where the stride does not
        // divide the padded size evenly; the weight and bias gradients are still right there.
        let g_ref = (&reference * &r)?.sum_all()?.backward()?;
        for (name, v) in [("x", &x), ("weight", &wt), ("bias", &b)] {
            let (a, e) = (
                g_ours.get(v.as_tensor()).unwrap(),
                g_ref.get(v.as_tensor()).unwrap(),
            );
            if a.dims() != e.dims() {
                assert_eq!(name, "x", "{what}");
                continue;
            }
            assert!(max_diff(a, e) / scale_of(e) < 1e-5, "grad {name} {what}");
        }
        // The input gradient, independently: the adjoint identity <conv(dx), r> = <dx, grad>.
        let dx = Tensor::randn(0f32, 1., x.shape(), &dev)?;
        let lhs = (super::conv::conv2d(
            &dx,
            wt.as_tensor(),
            &b.as_tensor().zeros_like()?,
            stride,
            padding,
        )? * &r)?
            .sum_all()?
            .to_scalar::<f32>()?;
        let gx = g_ours.get(x.as_tensor()).unwrap();
        let rhs = (&dx * gx)?.sum_all()?.to_scalar::<f32>()?;
        // f32 sums of many signed terms: the rounding scales with the sum of their magnitudes,
        // not with the (possibly cancelled) sum itself.
        let magnitude = (dx.abs()? * gx.abs()?)?.sum_all()?.to_scalar::<f32>()?;
        assert!(
            (lhs - rhs).abs() <= 1e-4 * lhs.abs().max(1.0).max(magnitude * 1e-2),
            "adjoint {what}: {lhs} vs {rhs} (terms' magnitude {magnitude})"
        );
    }
    Ok(())
}

#[test]
fn fused_norms_match_composed_values_and_gradients() -> candle_core::Result<()> {
    use super::norm::{GroupNormOp, LayerNormOp};
    let dev = Device::Cpu;
    let composed_gn =
        |x: &Tensor, w: &Tensor, b: &Tensor, groups: usize| -> candle_core::Result<Tensor> {
            let dims = x.dims().to_vec();
            let xg = x.reshape((dims[0], groups, ()))?;
            let mean = xg.mean_keepdim(2)?;
            let xc = xg.broadcast_sub(&mean)?;
            let var = xc.sqr()?.mean_keepdim(2)?;
            let xn = xc
                .broadcast_div(&(var + 1e-5)?.sqrt()?)?
                .reshape(dims.as_slice())?;
            let c = dims[1];
            xn.broadcast_mul(&w.reshape((1, c, 1, 1))?)?
                .broadcast_add(&b.reshape((1, c, 1, 1))?)
        };
    for &(groups, c, silu) in &[
        (1usize, 6usize, false),
        (3, 6, true),
        (6, 6, true),
        (2, 4, false),
    ] {
        let x = Var::from_tensor(&(Tensor::randn(0f32, 2., (2, c, 5, 3), &dev)? + 0.7)?)?;
        let w = Var::from_tensor(&Tensor::randn(1f32, 0.5, c, &dev)?)?;
        let b = Var::from_tensor(&Tensor::randn(0f32, 0.5, c, &dev)?)?;
        let op = GroupNormOp {
            groups,
            eps: 1e-5,
            silu,
        };
        let fused =
            x.as_tensor()
                .apply_op3_arc(w.as_tensor(), b.as_tensor(), Arc::new(Box::new(op)))?;
        let mut composed = composed_gn(x.as_tensor(), w.as_tensor(), b.as_tensor(), groups)?;
        if silu {
            composed = composed.silu()?;
        }
        let r = Tensor::randn(0f32, 1., fused.shape(), &dev)?;
        let gf = (&fused * &r)?.sum_all()?.backward()?;
        let gc = (&composed * &r)?.sum_all()?.backward()?;
        assert!(
            max_diff(&fused, &composed) < 1e-5,
            "group norm forward g{groups} silu {silu}"
        );
        for (name, v) in [("x", &x), ("weight", &w), ("bias", &b)] {
            let (a, e) = (
                gf.get(v.as_tensor()).unwrap(),
                gc.get(v.as_tensor()).unwrap(),
            );
            assert!(
                max_diff(a, e) / scale_of(e) < 1e-5,
                "group norm grad {name} g{groups} silu {silu}"
            );
        }
    }
    for &(rows, d) in &[(7usize, 5usize), (3, 64)] {
        let x = Var::from_tensor(&(Tensor::randn(0f32, 3., (1, rows, d), &dev)? - 1.0)?)?;
        let w = Var::from_tensor(&Tensor::randn(1f32, 0.5, d, &dev)?)?;
        let b = Var::from_tensor(&Tensor::randn(0f32, 0.5, d, &dev)?)?;
        let fused = x.as_tensor().apply_op3_arc(
            w.as_tensor(),
            b.as_tensor(),
            Arc::new(Box::new(LayerNormOp { eps: 1e-5 })),
        )?;
        let xt = x.as_tensor();
        let mean = xt.mean_keepdim(2)?;
        let xc = xt.broadcast_sub(&mean)?;
        let var = xc.sqr()?.mean_keepdim(2)?;
        let composed = xc
            .broadcast_div(&(var + 1e-5)?.sqrt()?)?
            .broadcast_mul(w.as_tensor())?
            .broadcast_add(b.as_tensor())?;
        assert!(
            max_diff(&fused, &composed) < 1e-5,
            "layer norm forward {rows}x{d}"
        );
        let r = Tensor::randn(0f32, 1., fused.shape(), &dev)?;
        let gf = (&fused * &r)?.sum_all()?.backward()?;
        let gc = (&composed * &r)?.sum_all()?.backward()?;
        for (name, v) in [("x", &x), ("weight", &w), ("bias", &b)] {
            let (a, e) = (
                gf.get(v.as_tensor()).unwrap(),
                gc.get(v.as_tensor()).unwrap(),
            );
            assert!(
                max_diff(a, e) / scale_of(e) < 1e-5,
                "layer norm grad {name} {rows}x{d}"
            );
        }
    }
    Ok(())
}

#[test]
fn fused_linear_matches_matmul_and_gives_only_tracked_operands_a_gradient(
) -> candle_core::Result<()> {
    let dev = Device::Cpu;
    for &(m, n, k, with_bias) in &[(5, 7, 3, true), (1, 4, 9, false), (33, 17, 70, true)] {
        let x = Var::from_tensor(&Tensor::randn(0f32, 1., (m, k), &dev)?)?;
        let w = Var::from_tensor(&Tensor::randn(0f32, 1., (n, k), &dev)?)?;
        let b = Var::from_tensor(&Tensor::randn(0f32, 1., n, &dev)?)?;
        let bias = with_bias.then(|| b.as_tensor());
        let ours = super::linear::linear(x.as_tensor(), w.as_tensor(), bias)?;
        let mut reference = x.as_tensor().matmul(&w.as_tensor().t()?)?;
        if with_bias {
            reference = reference.broadcast_add(b.as_tensor())?;
        }
        let what = format!("m{m} n{n} k{k} bias {with_bias}");
        assert!(max_diff(&ours, &reference) < 1e-4, "forward {what}");
        let r = Tensor::randn(0f32, 1., ours.shape(), &dev)?;
        let g_ours = (&ours * &r)?.sum_all()?.backward()?;
        let g_ref = (&reference * &r)?.sum_all()?.backward()?;
        let mut vars = vec![("x", &x), ("weight", &w)];
        if with_bias {
            vars.push(("bias", &b));
        }
        for (name, v) in vars {
            let (a, e) = (
                g_ours.get(v.as_tensor()).unwrap(),
                g_ref.get(v.as_tensor()).unwrap(),
            );
            assert!(!a.track_op(), "grad {name} {what} is a graph node");
            let err = max_diff(a, e) / scale_of(e);
            assert!(err < 1e-5, "grad {name} {what}: {err}");
        }
    }
    // A frozen weight (plain tensor) gets no gradient computed at all.
    let x = Var::from_tensor(&Tensor::randn(0f32, 1., (4, 3), &dev)?)?;
    let w = Tensor::randn(0f32, 1., (2, 3), &dev)?;
    let grads = super::linear::linear(x.as_tensor(), &w, None)?
        .sum_all()?
        .backward()?;
    assert!(grads.get(x.as_tensor()).is_some() && grads.get(&w).is_none());
    Ok(())
}

/// Frozen weights are kept in the layouts the GEMMs read best (`nn::Linear`: column-major;
/// `nn::Conv2d`: channels last). Outputs and input gradients must equal those of the weights as
/// loaded: the same dot products, only read differently (the GEMM kernels may split a short
/// one differently, so equal up to f32 rounding).
#[test]
fn frozen_weight_layouts_give_the_same_results() -> candle_core::Result<()> {
    let dev = Device::Cpu;
    for &(c, o, k, stride, padding, h, w) in &[
        (3, 4, 3, 1, 1, 7, 6),
        (3, 5, 3, 2, 1, 8, 8),
        (16, 24, 3, 1, 1, 2, 2),
        (5, 3, 3, 1, 1, 40, 33),
        (16, 8, 3, 1, 1, 90, 90),
        (32, 4, 3, 2, 1, 130, 130),
    ] {
        let x = Var::from_tensor(&Tensor::randn(0f32, 1., (2, c, h, w), &dev)?)?;
        let wt = Tensor::randn(0f32, 1., (o, c, k, k), &dev)?;
        let tap = super::conv::channels_last(&wt)?;
        assert!(!tap.is_contiguous(), "channels-last is a non-contiguous view");
        let b = Tensor::randn(0f32, 1., o, &dev)?;
        let a = super::conv::conv2d(x.as_tensor(), &wt, &b, stride, padding)?;
        let t = super::conv::conv2d(x.as_tensor(), &tap, &b, stride, padding)?;
        let what = format!("c{c} o{o} k{k} s{stride} p{padding} {h}x{w}");
        assert!(max_diff(&a, &t) / scale_of(&a) < 1e-6, "forward {what}");
        let r = Tensor::randn(0f32, 1., a.shape(), &dev)?;
        let ga = (&a * &r)?.sum_all()?.backward()?;
        let gt = (&t * &r)?.sum_all()?.backward()?;
        let (ga, gt) = (ga.get(x.as_tensor()).unwrap(), gt.get(x.as_tensor()).unwrap());
        assert!(max_diff(ga, gt) / scale_of(ga) < 1e-6, "grad x {what}");
    }
    for &(m, n, k) in &[(5, 7, 3), (77, 96, 64), (300, 40, 33)] {
        let x = Var::from_tensor(&Tensor::randn(0f32, 1., (m, k), &dev)?)?;
        let w = Tensor::randn(0f32, 1., (n, k), &dev)?;
        let wc = w.t()?.contiguous()?.t()?;
        let b = Tensor::randn(0f32, 1., n, &dev)?;
        let a = super::linear::linear(x.as_tensor(), &w, Some(&b))?;
        let c = super::linear::linear(x.as_tensor(), &wc, Some(&b))?;
        assert!(max_diff(&a, &c) / scale_of(&a) < 1e-6, "linear forward m{m} n{n} k{k}");
        let r = Tensor::randn(0f32, 1., a.shape(), &dev)?;
        let ga = (&a * &r)?.sum_all()?.backward()?;
        let gc = (&c * &r)?.sum_all()?.backward()?;
        let (ga, gc) = (ga.get(x.as_tensor()).unwrap(), gc.get(x.as_tensor()).unwrap());
        assert!(max_diff(ga, gc) / scale_of(ga) < 1e-6, "linear grad x m{m} n{n} k{k}");
    }
    Ok(())
}

#[test]
fn fused_geglu_matches_composed_values_and_gradient() -> candle_core::Result<()> {
    let dev = Device::Cpu;
    for dims in [vec![3usize, 8], vec![2, 5, 6], vec![2, 300, 40]] {
        let h = Var::from_tensor(&(Tensor::randn(0f32, 1., dims.as_slice(), &dev)? * 2.0)?)?;
        let ours = super::activation::geglu(h.as_tensor())?;
        let half = *dims.last().unwrap() / 2;
        let a = h.as_tensor().narrow(candle_core::D::Minus1, 0, half)?;
        let gate = h.as_tensor().narrow(candle_core::D::Minus1, half, half)?;
        let reference = (a * gate.gelu_erf()?)?;
        assert_eq!(max_diff(&ours, &reference), 0.0, "forward {dims:?}");
        let r = Tensor::randn(0f32, 1., ours.shape(), &dev)?;
        let g_ours = (&ours * &r)?.sum_all()?.backward()?;
        let g_ref = (&reference * &r)?.sum_all()?.backward()?;
        let (a, e) = (g_ours.get(h.as_tensor()).unwrap(), g_ref.get(h.as_tensor()).unwrap());
        let err = max_diff(a, e) / scale_of(e);
        assert!(err < 1e-5, "gradient {dims:?}: {err}");
    }
    Ok(())
}
