//! State one tracker thread publishes and the control plane reads while the
//! tracker runs: per-granule access and write epochs, per-epoch counts,
//! counters and the fault-latency histogram. Only the tracker writes; readers
//! load with `Relaxed` and order on `epoch` (`Release`/`Acquire`). No locks.

#![forbid(unsafe_code)]

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU8, AtomicU32, AtomicU64, Ordering::*};

/// Epoch 0 means "never"; the tracker starts at epoch 1 and adds one per interval.
pub const NEVER: u32 = 0;

/// How many past epochs keep per-epoch counts.
pub const EPOCH_RING: usize = 64;

/// Upper bounds (ns) of the fault-service latency buckets; the last bucket is +inf.
pub const LATENCY_BOUNDS_NS: [u64; 16] = [
    1_000,
    2_000,
    4_000,
    8_000,
    16_000,
    32_000,
    64_000,
    128_000,
    256_000,
    512_000,
    1_000_000,
    2_000_000,
    4_000_000,
    16_000_000,
    64_000_000,
    256_000_000,
];

/// Life of a tracker.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum TrackerState {
    Tracking = 1,
    /// Stopped on request; protection and custody were released.
    Stopped = 2,
    /// The VMM exited or unmapped its memory.
    Retired = 3,
    /// The tracker failed; see [`VmShared::end_reason`].
    Failed = 4,
}

/// Counters the tracker bumps; all monotonic.
#[derive(Debug, Default)]
pub struct Counters {
    pub faults_handled: AtomicU64,
    pub missing_faults: AtomicU64,
    pub wp_faults: AtomicU64,
    pub remove_events: AtomicU64,
    pub events_dropped: AtomicU64,
    pub harvests: AtomicU64,
    pub sampled_pages: AtomicU64,
    pub custody_full: AtomicU64,
    pub pages_in_custody: AtomicU64,
    /// Cold pages RWP eviction saved to custody and freed.
    pub evicted_pages: AtomicU64,
    /// Pages brought back from custody by a guest access.
    pub refaulted_pages: AtomicU64,
    /// Pages the kernel zeroed in place instead of punching (part of a
    /// large folio it could not split), put back at once and not evicted.
    pub unpunchable_pages: AtomicU64,
    /// Resolving ioctls that returned EAGAIN (the VMM's memory map was
    /// changing), each retried later.
    pub retries: AtomicU64,
    /// Faults left waiting because the deferred-fault queue was full: their
    /// threads were woken once faults could be resolved again, and faulted
    /// again.
    pub faults_rewoken: AtomicU64,
    /// Bytes reported written inside transparent huge pages, where the
    /// kernel tracks writes per 2 MiB.
    pub huge_written_bytes: AtomicU64,
    /// Bytes reported accessed inside transparent huge pages under RWP,
    /// which the kernel protects and reports per 2 MiB.
    pub huge_accessed_bytes: AtomicU64,
    /// RWP faults served in sync mode (or during a harvest's freeze), by
    /// what the fault flags say the access was.
    pub rwp_read_faults: AtomicU64,
    pub rwp_write_faults: AtomicU64,
    /// Time spent in harvests (scan, re-protect, reset), in nanoseconds.
    pub harvest_ns: AtomicU64,
    /// Pages copied in from the snapshot ahead of the guest (restore
    /// prefetch).
    pub prefetched_pages: AtomicU64,
    /// Pages of the learned set withheld from the prefetch to be seen on
    /// demand, and of them the ones the guest did not touch within the
    /// recording span (set when it ends).
    pub prefetch_probes: AtomicU64,
    pub prefetch_probes_untouched: AtomicU64,
}

/// Per-epoch distinct-granule counts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EpochCounts {
    pub accessed: u32,
    pub written: u32,
    pub sample_accessed: u32,
    pub sample_written: u32,
    /// Estimated sampled granules accessed / written that the sampler did
    /// not watch this epoch (hot granules left unarmed to keep within the
    /// fault budget), from the hot granules it did re-arm.
    pub sample_accessed_unwatched: u32,
    pub sample_written_unwatched: u32,
}

/// The shared state of one tracked VM.
#[derive(Debug)]
pub struct VmShared {
    granule_bytes: u64,
    access: Box<[AtomicU32]>,
    write: Box<[AtomicU32]>,
    /// Granules the access method watches (all of them for exhaustive methods).
    in_sample: Box<[bool]>,
    sample_count: usize,
    /// The epoch in progress. Everything recorded for earlier epochs is
    /// visible to a reader that loads this with `Acquire`.
    epoch: AtomicU32,
    /// Distinct granules accessed / written in each epoch, by `epoch % EPOCH_RING`.
    accessed_in: [AtomicU32; EPOCH_RING],
    written_in: [AtomicU32; EPOCH_RING],
    /// Distinct sampled granules accessed / written in each epoch.
    sample_accessed_in: [AtomicU32; EPOCH_RING],
    sample_written_in: [AtomicU32; EPOCH_RING],
    /// Estimates for the sampled granules left unwatched in each epoch.
    unwatched_accessed_in: [AtomicU32; EPOCH_RING],
    unwatched_written_in: [AtomicU32; EPOCH_RING],
    /// Hot sampled granules are re-armed once every `stride` intervals (1:
    /// every interval); the sampler sets it from its fault budget.
    stride: AtomicU32,
    pub counters: Counters,
    latency: [AtomicU64; LATENCY_BOUNDS_NS.len() + 1],
    /// Sum of the fault-service latencies counted in `latency`, ns.
    latency_sum_ns: AtomicU64,
    state: AtomicU8,
    end_reason: OnceLock<String>,
    started_ms: u64,
    interval_ms: u64,
}

impl VmShared {
    /// State for `granules` granules of `granule_bytes`, watching `sample`
    /// (granule indices) for reads, or every granule when `sample` is `None`.
    pub fn new(
        granules: usize,
        granule_bytes: u64,
        sample: Option<&[u32]>,
        started_ms: u64,
        interval_ms: u64,
    ) -> Self {
        let mut in_sample = vec![sample.is_none(); granules].into_boxed_slice();
        let sample_count = match sample {
            None => granules,
            Some(s) => {
                for &g in s {
                    in_sample[g as usize] = true;
                }
                s.len()
            }
        };
        Self {
            granule_bytes,
            access: (0..granules).map(|_| AtomicU32::new(NEVER)).collect(),
            write: (0..granules).map(|_| AtomicU32::new(NEVER)).collect(),
            in_sample,
            sample_count,
            epoch: AtomicU32::new(1),
            accessed_in: std::array::from_fn(|_| AtomicU32::new(0)),
            written_in: std::array::from_fn(|_| AtomicU32::new(0)),
            sample_accessed_in: std::array::from_fn(|_| AtomicU32::new(0)),
            sample_written_in: std::array::from_fn(|_| AtomicU32::new(0)),
            unwatched_accessed_in: std::array::from_fn(|_| AtomicU32::new(0)),
            unwatched_written_in: std::array::from_fn(|_| AtomicU32::new(0)),
            stride: AtomicU32::new(1),
            counters: Counters::default(),
            latency: std::array::from_fn(|_| AtomicU64::new(0)),
            latency_sum_ns: AtomicU64::new(0),
            state: AtomicU8::new(TrackerState::Tracking as u8),
            end_reason: OnceLock::new(),
            started_ms,
            interval_ms,
        }
    }

    pub fn granules(&self) -> usize {
        self.access.len()
    }
    pub fn granule_bytes(&self) -> u64 {
        self.granule_bytes
    }
    pub fn sample_count(&self) -> usize {
        self.sample_count
    }
    pub fn in_sample(&self, g: usize) -> bool {
        self.in_sample[g]
    }
    pub fn started_ms(&self) -> u64 {
        self.started_ms
    }
    pub fn interval_ms(&self) -> u64 {
        self.interval_ms
    }

    /// The epoch in progress (`Acquire`: the epochs before it are complete).
    pub fn epoch(&self) -> u32 {
        self.epoch.load(Acquire)
    }

    /// Tracker only: record an access (and a write when `write`) of granule
    /// `g` in the current epoch `e`.
    #[inline]
    pub fn record(&self, g: usize, e: u32, write: bool) {
        if self.access[g].load(Relaxed) != e {
            self.access[g].store(e, Relaxed);
            self.accessed_in[e as usize % EPOCH_RING].fetch_add(1, Relaxed);
            if self.in_sample[g] {
                self.sample_accessed_in[e as usize % EPOCH_RING].fetch_add(1, Relaxed);
            }
        }
        if write && self.write[g].load(Relaxed) != e {
            self.write[g].store(e, Relaxed);
            self.written_in[e as usize % EPOCH_RING].fetch_add(1, Relaxed);
            if self.in_sample[g] {
                self.sample_written_in[e as usize % EPOCH_RING].fetch_add(1, Relaxed);
            }
        }
    }

    /// Tracker only: close epoch `e` and open `e + 1`.
    pub fn advance_epoch(&self, e: u32) {
        let next = (e + 1) as usize % EPOCH_RING;
        self.accessed_in[next].store(0, Relaxed);
        self.written_in[next].store(0, Relaxed);
        self.sample_accessed_in[next].store(0, Relaxed);
        self.sample_written_in[next].store(0, Relaxed);
        self.unwatched_accessed_in[next].store(0, Relaxed);
        self.unwatched_written_in[next].store(0, Relaxed);
        self.epoch.store(e + 1, Release);
    }

    /// Tracker only, before closing epoch `e`: the estimated accesses and
    /// writes of sampled granules it left unwatched during `e`.
    pub fn set_unwatched(&self, e: u32, accessed: u32, written: u32) {
        let i = e as usize % EPOCH_RING;
        self.unwatched_accessed_in[i].store(accessed, Relaxed);
        self.unwatched_written_in[i].store(written, Relaxed);
    }

    /// Tracker only: the re-arm stride now in force.
    pub fn set_stride(&self, stride: u32) {
        self.stride.store(stride.max(1), Relaxed);
    }

    /// Hot sampled granules are re-armed once every this many intervals.
    pub fn stride(&self) -> u32 {
        self.stride.load(Relaxed)
    }

    /// Tracker only: count one fault served in `ns` nanoseconds.
    #[inline]
    pub fn record_latency(&self, ns: u64) {
        let i = LATENCY_BOUNDS_NS
            .iter()
            .position(|&b| ns <= b)
            .unwrap_or(LATENCY_BOUNDS_NS.len());
        self.latency[i].fetch_add(1, Relaxed);
        self.latency_sum_ns.fetch_add(ns, Relaxed);
    }

    /// Sum of every fault-service latency in the histogram, ns.
    pub fn latency_sum_ns(&self) -> u64 {
        self.latency_sum_ns.load(Relaxed)
    }

    /// Fault-service latency histogram: `(upper bound ns, or 0 for +inf; count)`.
    pub fn latency_histogram(&self) -> Vec<(u64, u64)> {
        self.latency
            .iter()
            .enumerate()
            .map(|(i, c)| {
                (
                    LATENCY_BOUNDS_NS.get(i).copied().unwrap_or(0),
                    c.load(Relaxed),
                )
            })
            .collect()
    }

    pub fn access_epoch(&self, g: usize) -> u32 {
        self.access[g].load(Relaxed)
    }
    pub fn write_epoch(&self, g: usize) -> u32 {
        self.write[g].load(Relaxed)
    }

    /// Distinct granules accessed, written, and accessed among the sampled
    /// ones during epoch `e`, if `e` is still in the ring.
    pub fn epoch_counts(&self, e: u32) -> Option<EpochCounts> {
        let cur = self.epoch();
        if e == NEVER || e > cur || cur - e >= EPOCH_RING as u32 {
            return None;
        }
        let i = e as usize % EPOCH_RING;
        Some(EpochCounts {
            accessed: self.accessed_in[i].load(Relaxed),
            written: self.written_in[i].load(Relaxed),
            sample_accessed: self.sample_accessed_in[i].load(Relaxed),
            sample_written: self.sample_written_in[i].load(Relaxed),
            sample_accessed_unwatched: self.unwatched_accessed_in[i].load(Relaxed),
            sample_written_unwatched: self.unwatched_written_in[i].load(Relaxed),
        })
    }

    pub fn state(&self) -> TrackerState {
        match self.state.load(Acquire) {
            1 => TrackerState::Tracking,
            2 => TrackerState::Stopped,
            3 => TrackerState::Retired,
            _ => TrackerState::Failed,
        }
    }

    /// Why the tracker ended, once it has.
    pub fn end_reason(&self) -> Option<&str> {
        self.end_reason.get().map(String::as_str)
    }

    pub(crate) fn end(&self, state: TrackerState, reason: String) {
        let _ = self.end_reason.set(reason);
        self.state.store(state as u8, Release);
    }
}
