//! Data-parallel training: a job spans several devices, each rank holding a copy of the model
//! and computing its shard of every optimiser batch; gradients (and the step's metrics) are
//! averaged across ranks before clipping and AdamW, so every rank applies the same update and
//! the weights stay identical without ever being sent.
//!
//! The ranks meet in a `Collective`. `ThreadGroup` is the in-process implementation: ranks are
//! threads, and the reduction runs on the host in rank order, so it is deterministic and
//! works between any devices (a GPU rank's tensors go through host memory). With the `nccl`
//! feature, `nccl::NcclGroup` reduces GPU tensors in place over NVLink/PCIe.

use std::sync::{Arc, Condvar, Mutex};

use candle_core::{DType, Tensor};

#[derive(Debug, thiserror::Error)]
pub enum CollectiveError {
    /// Another rank left the group (it failed, or the run was cancelled or ended).
    #[error("{0}")]
    Aborted(String),
    #[error(transparent)]
    Tensor(#[from] candle_core::Error),
}

/// One rank's handle on its group.
pub trait Collective: Send {
    fn rank(&self) -> usize;
    fn world_size(&self) -> usize;
    /// The element-wise mean over ranks of each tensor (every rank passes the same shapes in
    /// the same order and gets the same values back, on its own device and dtype).
    fn all_reduce_mean(&self, tensors: &[Tensor]) -> Result<Vec<Tensor>, CollectiveError>;
    /// Leaves the group: every rank waiting in, or later entering, a reduction gets
    /// `Aborted(why)`. The first reason given is the one they all see.
    fn abort(&self, why: &str);
}

#[derive(Default)]
struct State {
    /// Completed reductions; a waiting rank is released when it moves.
    generation: u64,
    /// Each rank's flattened contribution to the reduction under way.
    slots: Vec<Option<Vec<Vec<f32>>>>,
    arrived: usize,
    result: Option<Arc<Vec<Vec<f32>>>>,
    aborted: Option<String>,
}

struct Shared {
    world: usize,
    state: Mutex<State>,
    changed: Condvar,
}

/// The in-process group: `ThreadGroup::new(n)` gives one handle per rank, each moved to the
/// thread that runs that rank.
pub struct ThreadGroup {
    rank: usize,
    shared: Arc<Shared>,
}

impl ThreadGroup {
    pub fn new(world: usize) -> Vec<ThreadGroup> {
        let shared = Arc::new(Shared {
            world,
            state: Mutex::new(State {
                slots: vec![None; world],
                ..State::default()
            }),
            changed: Condvar::new(),
        });
        (0..world)
            .map(|rank| ThreadGroup {
                rank,
                shared: shared.clone(),
            })
            .collect()
    }
}

impl Collective for ThreadGroup {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.shared.world
    }

    fn all_reduce_mean(&self, tensors: &[Tensor]) -> Result<Vec<Tensor>, CollectiveError> {
        let mine = tensors
            .iter()
            .map(|t| t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>())
            .collect::<candle_core::Result<Vec<_>>>()?;
        let world = self.shared.world;
        let mut s = self.shared.state.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(why) = &s.aborted {
            return Err(CollectiveError::Aborted(why.clone()));
        }
        s.slots[self.rank] = Some(mine);
        s.arrived += 1;
        let generation = s.generation;
        if s.arrived == world {
            // Summed in rank order by whichever rank arrives last: the same bits on every
            // rank and in every run.
            let mut slots: Vec<Vec<Vec<f32>>> =
                s.slots.iter_mut().map(|x| x.take().unwrap_or_default()).collect();
            let mut sum = std::mem::take(&mut slots[0]);
            for other in &slots[1..] {
                if other.len() != sum.len() {
                    let why = "ranks reduced different numbers of tensors".to_string();
                    s.aborted = Some(why.clone());
                    self.shared.changed.notify_all();
                    return Err(CollectiveError::Aborted(why));
                }
                for (a, b) in sum.iter_mut().zip(other) {
                    for (x, y) in a.iter_mut().zip(b) {
                        *x += *y;
                    }
                }
            }
            let inv = 1.0 / world as f32;
            for a in &mut sum {
                for x in a.iter_mut() {
                    *x *= inv;
                }
            }
            s.result = Some(Arc::new(sum));
            s.arrived = 0;
            s.generation += 1;
            self.shared.changed.notify_all();
        } else {
            while s.generation == generation && s.aborted.is_none() {
                s = self
                    .shared
                    .changed
                    .wait(s)
                    .unwrap_or_else(|p| p.into_inner());
            }
            if s.generation == generation {
                let why = s.aborted.clone().unwrap_or_default();
                return Err(CollectiveError::Aborted(why));
            }
        }
        let result = s.result.clone().expect("a finished reduction has a result");
        drop(s);
        tensors
            .iter()
            .zip(result.iter())
            .map(|(t, v)| {
                Tensor::from_slice(v, t.shape(), t.device())?
                    .to_dtype(t.dtype())
                    .map_err(CollectiveError::from)
            })
            .collect()
    }

    fn abort(&self, why: &str) {
        let mut s = self.shared.state.lock().unwrap_or_else(|p| p.into_inner());
        if s.aborted.is_none() {
            s.aborted = Some(why.to_string());
        }
        self.shared.changed.notify_all();
    }
}

/// The pairs of a batch of `batch` pairs that rank `rank` of `world` computes.
pub fn shard(batch: usize, rank: usize, world: usize) -> std::ops::Range<usize> {
    let per = batch / world;
    rank * per..(rank + 1) * per
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn ranks_get_the_mean_and_an_abort_releases_waiters() {
        let group = ThreadGroup::new(3);
        let handles: Vec<_> = group
            .into_iter()
            .map(|g| {
                std::thread::spawn(move || {
                    let r = g.rank() as f32;
                    let t = Tensor::new(&[r, 2.0 * r], &Device::Cpu).unwrap();
                    let first = g.all_reduce_mean(&[t.clone()]).unwrap();
                    let second = g.all_reduce_mean(&[(t + 1.0).unwrap()]).unwrap();
                    (
                        first[0].to_vec1::<f32>().unwrap(),
                        second[0].to_vec1::<f32>().unwrap(),
                    )
                })
            })
            .collect();
        for h in handles {
            let (a, b) = h.join().unwrap();
            assert_eq!(a, vec![1.0, 2.0]);
            assert_eq!(b, vec![2.0, 3.0]);
        }

        let mut group = ThreadGroup::new(2);
        let leaver = group.pop().unwrap();
        let waiter = group.pop().unwrap();
        let h = std::thread::spawn(move || {
            waiter
                .all_reduce_mean(&[Tensor::new(&[1f32], &Device::Cpu).unwrap()])
                .map(|_| ())
        });
        std::thread::sleep(std::time::Duration::from_millis(50));
        leaver.abort("rank 1 failed: out of memory");
        let err = h.join().unwrap().unwrap_err();
        assert!(err.to_string().contains("out of memory"), "{err}");
    }
}
