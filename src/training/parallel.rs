//! Data-parallel training: a job spans several devices, each rank holding a copy of the model
//! and computing its shard of every optimiser batch; gradients (and the step's metrics) are
//! averaged across ranks before clipping and AdamW, so every rank applies the same update and
//! the weights stay identical without ever being sent.
//!
//! The ranks meet in a `Collective`. `ThreadGroup` is the in-process implementation: ranks are
//! threads, and the reduction runs on the host in rank order, so it is deterministic and
//! works between any devices (a GPU rank's tensors go through host memory). With the `nccl`
//! feature, `nccl::NcclGroup` reduces GPU tensors on the GPUs (NVLink/PCIe), and `group`
//! picks it whenever every rank is a CUDA device.

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

/// One handle per rank for a run over `devices`: NCCL where every device is a GPU and the
/// build has it, the in-process thread group otherwise.
pub fn group(devices: &[String]) -> Result<Vec<Box<dyn Collective>>, CollectiveError> {
    #[cfg(feature = "nccl")]
    if devices.iter().all(|d| d.starts_with("cuda")) {
        return Ok(nccl::NcclGroup::new(devices)?
            .into_iter()
            .map(|g| Box::new(g) as Box<dyn Collective>)
            .collect());
    }
    Ok(ThreadGroup::new(devices.len())
        .into_iter()
        .map(|g| Box::new(g) as Box<dyn Collective>)
        .collect())
}

#[cfg(feature = "nccl")]
pub mod nccl {
    //! NCCL all-reduce between the GPUs of one process, one communicator per rank, created
    //! together (`ncclCommInitAll`).

    use super::{Collective, CollectiveError};
    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::nccl::safe::{Comm, ReduceOp};
    use candle_core::cuda_backend::CudaStorage;
    use candle_core::{CustomOp1, DType, Layout, Shape, Tensor};
    use std::sync::{Arc, Mutex};

    /// A communicator moved to its rank's thread. NCCL allows a communicator to be used from
    /// any thread as long as calls on it do not overlap; each rank's thread is its only user.
    struct RankComm(Comm);
    // SAFETY: see above; the communicator is owned by one rank and used by one thread at a time.
    unsafe impl Send for RankComm {}
    // SAFETY: `&RankComm` is only used inside `all_reduce_mean`, which its one owner calls.
    unsafe impl Sync for RankComm {}

    pub struct NcclGroup {
        comm: RankComm,
        rank: usize,
        world: usize,
        aborted: Arc<Mutex<Option<String>>>,
    }

    impl NcclGroup {
        pub fn new(devices: &[String]) -> Result<Vec<NcclGroup>, CollectiveError> {
            let mut streams = Vec::new();
            for d in devices {
                match crate::models::device::parse_device(d) {
                    Ok(candle_core::Device::Cuda(c)) => streams.push(c.cuda_stream()),
                    Ok(_) => return Err(CollectiveError::Aborted(format!("{d} is not a GPU"))),
                    Err(e) => return Err(CollectiveError::Aborted(e)),
                }
            }
            let comms = Comm::from_devices(streams)
                .map_err(|e| CollectiveError::Aborted(format!("NCCL initialisation: {e:?}")))?;
            let aborted = Arc::new(Mutex::new(None));
            let world = comms.len();
            Ok(comms
                .into_iter()
                .enumerate()
                .map(|(rank, comm)| NcclGroup {
                    comm: RankComm(comm),
                    rank,
                    world,
                    aborted: aborted.clone(),
                })
                .collect())
        }
    }

    /// The mean over ranks of one contiguous f32 tensor, as a new tensor.
    struct AllReduceMean<'a>(&'a Comm);

    impl CustomOp1 for AllReduceMean<'_> {
        fn name(&self) -> &'static str {
            "nccl-all-reduce-mean"
        }

        fn cpu_fwd(
            &self,
            _: &candle_core::CpuStorage,
            _: &Layout,
        ) -> candle_core::Result<(candle_core::CpuStorage, Shape)> {
            candle_core::bail!("NCCL reduces GPU tensors only")
        }

        fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> candle_core::Result<(CudaStorage, Shape)> {
            let Some((start, end)) = l.contiguous_offsets() else {
                candle_core::bail!("NCCL all-reduce needs a contiguous tensor")
            };
            let src = s.as_cuda_slice::<f32>()?.slice(start..end);
            let dev = s.device().clone();
            let mut dst = dev.alloc_zeros::<f32>(end - start)?;
            self.0
                .all_reduce(&src, &mut dst, &ReduceOp::Avg)
                .map_err(|e| candle_core::Error::Msg(format!("NCCL all-reduce: {e:?}")))?;
            Ok((CudaStorage::wrap_cuda_slice(dst, dev), l.shape().clone()))
        }
    }

    impl Collective for NcclGroup {
        fn rank(&self) -> usize {
            self.rank
        }

        fn world_size(&self) -> usize {
            self.world
        }

        fn all_reduce_mean(&self, tensors: &[Tensor]) -> Result<Vec<Tensor>, CollectiveError> {
            if let Some(why) = self.aborted.lock().unwrap_or_else(|p| p.into_inner()).clone() {
                return Err(CollectiveError::Aborted(why));
            }
            tensors
                .iter()
                .map(|t| {
                    let flat = t.to_dtype(DType::F32)?.flatten_all()?.contiguous()?;
                    flat.apply_op1_no_bwd(&AllReduceMean(&self.comm.0))?
                        .reshape(t.shape())?
                        .to_dtype(t.dtype())
                        .map_err(CollectiveError::from)
                })
                .collect()
        }

        /// Marks the group aborted for later reductions. A rank already inside an NCCL
        /// reduction waits for its peers there: a rank that fails must fail before its next
        /// reduction, which the trainer's step structure ensures for data and model errors.
        fn abort(&self, why: &str) {
            let mut a = self.aborted.lock().unwrap_or_else(|p| p.into_inner());
            if a.is_none() {
                *a = Some(why.to_string());
            }
        }
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
