//! Counters a worker keeps about its own queue, reported by `/health` so operators (and tests)
//! can see what was computed, what was batched and what was dropped.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

#[derive(Default, Debug)]
pub struct WorkerStats {
    pub requests_computed: AtomicU64,
    pub images_computed: AtomicU64,
    /// Dropped before compute because the client had gone away.
    pub dropped_disconnected: AtomicU64,
    /// Batches abandoned between steps because every client of the batch had gone away.
    pub cancelled_in_compute: AtomicU64,
    pub rejected_queue_full: AtomicU64,
    pub batches: AtomicU64,
    /// Batches that ended in an error or a panic.
    pub failed_batches: AtomicU64,
    /// How many batches had each size (in images).
    batch_sizes: Mutex<BTreeMap<usize, u64>>,
    /// 1 while a batch is being computed (fine-tuning jobs yield to it).
    pub computing: AtomicU64,
    /// When the last batch ended, in milliseconds since the Unix epoch.
    pub last_done_ms: AtomicU64,
}

pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct StatsSnapshot {
    pub requests_computed: u64,
    pub images_computed: u64,
    pub dropped_disconnected: u64,
    pub cancelled_in_compute: u64,
    pub rejected_queue_full: u64,
    pub batches: u64,
    pub failed_batches: u64,
    pub batch_sizes: BTreeMap<usize, u64>,
}

impl WorkerStats {
    pub fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// True while computing, or within `grace_ms` of the last batch: a client sending requests
    /// one after another leaves only short gaps, which a training step should not fill.
    pub fn recently_busy(&self, grace_ms: u64) -> bool {
        self.computing.load(Ordering::SeqCst) > 0
            || now_ms().saturating_sub(self.last_done_ms.load(Ordering::SeqCst)) < grace_ms
    }

    pub fn record_batch(&self, images: usize) {
        Self::bump(&self.batches);
        *self
            .batch_sizes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(images)
            .or_default() += 1;
    }

    pub fn snapshot(&self) -> StatsSnapshot {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        StatsSnapshot {
            requests_computed: g(&self.requests_computed),
            images_computed: g(&self.images_computed),
            dropped_disconnected: g(&self.dropped_disconnected),
            cancelled_in_compute: g(&self.cancelled_in_compute),
            rejected_queue_full: g(&self.rejected_queue_full),
            batches: g(&self.batches),
            failed_batches: g(&self.failed_batches),
            batch_sizes: self
                .batch_sizes
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone(),
        }
    }
}
