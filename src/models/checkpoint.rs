//! Activation checkpointing (diffusers' `gradient_checkpointing`): a checkpointed block keeps
//! only its inputs and output in the autograd graph, and its backward runs the block again to
//! rebuild what it needs. A training step then holds the activations of one block at a time
//! instead of the whole network's, for about one extra forward pass of compute.
//!
//! candle's graph has no hook for this, so each block becomes one custom op whose backward
//! recomputes the block under autograd and differentiates it there. The gradients of the
//! block's own parameters cannot leave a custom op's backward (it returns gradients for its
//! arguments only): they go to a per-thread side store that [`backward`] merges into the
//! result. Training code therefore calls [`backward`] instead of `Tensor::backward`.
//!
//! A block's output would stop tracking when neither its input nor its arguments track (the
//! first LoRA block sees the frozen `conv_in`'s output), and then candle would never call the
//! op's backward: every checkpoint op therefore also takes a trainable zero "anchor" that keeps
//! the output on the graph.

use candle_core::backend::BackendStorage;
use candle_core::backprop::GradStore;
use candle_core::{CpuStorage, CustomOp3, DType, Device, Layout, Shape, Storage, Tensor, Var};
use std::cell::RefCell;
use std::sync::{Arc, Mutex};

thread_local! {
    static ANCHOR: RefCell<Option<Tensor>> = const { RefCell::new(None) };
    static SIDE: RefCell<Option<GradStore>> = const { RefCell::new(None) };
}

/// Checkpointing is on for this thread until the guard drops.
pub struct Checkpointing(Option<Tensor>);

/// Turns checkpointing on for the blocks this thread runs on `device`.
pub fn enable(device: &Device) -> candle_core::Result<Checkpointing> {
    let anchor = Var::zeros(1, DType::F32, device)?.into_inner();
    SIDE.with(|s| *s.borrow_mut() = None);
    Ok(Checkpointing(ANCHOR.with(|a| a.replace(Some(anchor)))))
}

impl Drop for Checkpointing {
    fn drop(&mut self) {
        ANCHOR.with(|a| *a.borrow_mut() = self.0.take());
    }
}

/// Whether to checkpoint on `device` when the option is `setting` (unset: on GPUs only, where
/// activation memory limits the batch; the CPU kernels keep little and the recompute costs
/// time there).
pub fn wanted(setting: Option<bool>, device: &Device) -> bool {
    setting.unwrap_or(!device.is_cpu())
}

/// `loss.backward()` plus the parameter gradients that checkpointed blocks computed during it.
pub fn backward(loss: &Tensor) -> candle_core::Result<GradStore> {
    SIDE.with(|s| *s.borrow_mut() = None);
    let mut grads = loss.backward()?;
    if let Some(side) = SIDE.with(|s| s.borrow_mut().take()) {
        grads.extend(side)?;
    }
    Ok(grads)
}

type Block = dyn Fn(&Tensor, Option<&Tensor>) -> candle_core::Result<Tensor> + Send + Sync;

/// `block(x, aux)`, checkpointed when checkpointing is on and anything in it trains.
pub fn checkpointed<F>(x: &Tensor, aux: Option<&Tensor>, block: F) -> candle_core::Result<Tensor>
where
    F: Fn(&Tensor, Option<&Tensor>) -> candle_core::Result<Tensor> + Send + Sync + 'static,
{
    let Some(anchor) = ANCHOR.with(|a| a.borrow().clone()) else {
        return block(x, aux);
    };
    let aux_d = aux.map(Tensor::detach);
    let y = block(&x.detach(), aux_d.as_ref())?;
    if !(y.track_op() || x.track_op() || aux.is_some_and(Tensor::track_op)) {
        // Nothing inside or upstream trains (a frozen reference pass): no graph to keep.
        return Ok(y);
    }
    // The block's graph goes with `y`; only a copy of its value stays.
    let value = y.detach().copy()?;
    drop(y);
    let op = CheckpointOp {
        block: Arc::new(block),
        value: Mutex::new(Some(value)),
        has_aux: aux.is_some(),
    };
    x.apply_op3(aux.unwrap_or(&anchor), &anchor, op)
}

struct CheckpointOp {
    block: Arc<Block>,
    /// The output, computed before the op was built; handed over by the forward.
    value: Mutex<Option<Tensor>>,
    has_aux: bool,
}

impl CheckpointOp {
    fn take_value(&self) -> candle_core::Result<Tensor> {
        self.value
            .lock()
            .unwrap()
            .take()
            .ok_or_else(|| candle_core::Error::Msg("checkpoint: forward ran twice".into()))
    }
}

/// A fresh leaf holding `t`'s value: trainable when a gradient for it is wanted.
fn leaf(t: &Tensor, wanted: bool) -> candle_core::Result<Tensor> {
    if wanted {
        Ok(Var::from_tensor(&t.detach())?.into_inner())
    } else {
        Ok(t.detach())
    }
}

impl CustomOp3 for CheckpointOp {
    fn name(&self) -> &'static str {
        "checkpoint"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let value = self.take_value()?;
        let (storage, layout) = value.storage_and_layout();
        match &*storage {
            Storage::Cpu(s) => Ok((s.try_clone(layout)?, value.shape().clone())),
            _ => candle_core::bail!("checkpoint: block output on another device"),
        }
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        _: &candle_core::CudaStorage,
        _: &Layout,
        _: &candle_core::CudaStorage,
        _: &Layout,
        _: &candle_core::CudaStorage,
        _: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let value = self.take_value()?;
        let (storage, layout) = value.storage_and_layout();
        match &*storage {
            Storage::Cuda(s) => Ok((s.try_clone(layout)?, value.shape().clone())),
            _ => candle_core::bail!("checkpoint: block output on another device"),
        }
    }

    fn bwd(
        &self,
        x: &Tensor,
        aux: &Tensor,
        _anchor: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let want_x = x.track_op();
        let want_aux = self.has_aux && aux.track_op();
        let xv = leaf(x, want_x)?;
        let av = if self.has_aux {
            Some(leaf(aux, want_aux)?)
        } else {
            None
        };
        let y = (self.block)(&xv, av.as_ref())?;
        if !y.track_op() {
            return Ok((None, None, None));
        }
        // d(sum(y * grad))/d(theta) is the vector-Jacobian product the outer backward needs.
        let s = (y * grad.detach())?.sum_all()?;
        let params: Vec<Tensor> = s
            .sorted_nodes()
            .into_iter()
            .filter(|t| {
                t.is_variable() && t.id() != xv.id() && av.as_ref().is_none_or(|a| t.id() != a.id())
            })
            .cloned()
            .collect();
        let mut grads = s.backward()?;
        let gx = if want_x { grads.remove(&xv) } else { None };
        let ga = match (&av, want_aux) {
            (Some(a), true) => grads.remove(a),
            _ => None,
        };
        let mut own = GradStore::default();
        for p in &params {
            if let Some(g) = grads.remove(p) {
                own.insert(p, g);
            }
        }
        // The rest (gradients candle computed for constants) is dropped here.
        drop(grads);
        SIDE.with(|side| -> candle_core::Result<()> {
            let mut side = side.borrow_mut();
            match side.as_mut() {
                Some(store) => store.extend(own)?,
                None => *side = Some(own),
            }
            Ok(())
        })?;
        Ok((gx, ga, None))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A two-layer block with its own parameters, checkpointed or not: the same values and the
    /// same gradients for the input, the auxiliary input and every parameter.
    #[test]
    fn checkpointed_gradients_equal_the_plain_ones() -> candle_core::Result<()> {
        let dev = Device::Cpu;
        let w1 = Var::randn(0f32, 0.5, (6, 4), &dev)?;
        let w2 = Var::randn(0f32, 0.5, (4, 6), &dev)?;
        let frozen = Tensor::randn(0f32, 0.5, (4, 4), &dev)?;
        let (a, b, c) = (
            w1.as_tensor().clone(),
            w2.as_tensor().clone(),
            frozen.clone(),
        );
        let block = move |x: &Tensor, t: Option<&Tensor>| {
            let h = x.matmul(&a.t()?)?.broadcast_add(t.unwrap())?.silu()?;
            h.matmul(&b.t()?)?.matmul(&c)?.tanh()
        };
        let x0 = Tensor::randn(0f32, 1., (3, 4), &dev)?;
        let t = Var::randn(0f32, 1., 6, &dev)?;
        for x_trains in [false, true] {
            let x = if x_trains {
                Var::from_tensor(&x0)?.into_inner()
            } else {
                x0.clone()
            };
            let plain = block(&x, Some(t.as_tensor()))?;
            let g_plain = (plain.sqr()?.sum_all()? * 0.5)?.backward()?;
            let guard = enable(&dev)?;
            let ck = checkpointed(&x, Some(t.as_tensor()), block.clone())?;
            assert!(ck.track_op());
            let g_ck = backward(&(ck.sqr()?.sum_all()? * 0.5)?)?;
            drop(guard);
            let diff = (&ck - &plain)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert_eq!(diff, 0.0, "values");
            let mut wanted = vec![
                ("w1", w1.as_tensor()),
                ("w2", w2.as_tensor()),
                ("t", t.as_tensor()),
            ];
            if x_trains {
                wanted.push(("x", &x));
            }
            for (name, v) in wanted {
                let (p, q) = (g_plain.get(v).unwrap(), g_ck.get(v).unwrap());
                let diff = (p - q)?.abs()?.max_all()?.to_scalar::<f32>()?;
                let scale = p.abs()?.max_all()?.to_scalar::<f32>()?.max(1e-6);
                assert!(
                    diff / scale < 1e-6,
                    "grad {name} (x trains {x_trains}): {diff}"
                );
            }
            assert!(g_ck.get(&frozen).is_none());
        }
        // A pass where nothing trains is not checkpointed at all.
        let _guard = enable(&dev)?;
        let frozen_block = move |x: &Tensor, _: Option<&Tensor>| x.matmul(&frozen)?.tanh();
        assert!(!checkpointed(&x0, None, frozen_block)?.track_op());
        Ok(())
    }
}
