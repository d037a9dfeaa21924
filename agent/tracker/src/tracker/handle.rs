//! The tracker's owner: [`TrackerSpec`] in, a running thread out. `spawn`
//! registers and arms the VM's ranges on the caller's thread (so
//! registration errors come back at once), starts a named thread, reports
//! through a ready handshake whether it could pin itself, and `stop` ends it
//! through an eventfd and joins it.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::PathBuf;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use super::Tracker;
use super::region::Region;
use super::sampler::draw_sample;
use crate::plan::{Access, Plan};
use crate::shared::{TrackerState, VmShared};
use crate::sys::{self, EventFd};
use crate::uffd::Uffd;

/// Everything a tracker needs; consumed by [`TrackerHandle::spawn`].
#[derive(Debug)]
pub struct TrackerSpec {
    /// Thread name (at most 15 bytes are kept by the kernel).
    pub name: String,
    pub uffd: Uffd,
    /// Sorted by `host_addr`, non-overlapping, granule-aligned (the caller validated).
    pub regions: Vec<Region>,
    pub granule_bytes: u64,
    pub plan: Plan,
    /// The guest memory's memfd, for shmem/hugetlb guests.
    pub memory_fd: Option<OwnedFd>,
    /// The snapshot memory file MISSING faults are served from.
    pub source: Option<File>,
    /// The VMM's pid, for `/proc/<pid>/pagemap` and its pidfd.
    /// Pids are `libc::pid_t` everywhere (the kernel's type, which syscalls
    /// and nix take: no casts inside); the wire's `uint32` and
    /// `std::process::id()` are converted at the edge.
    pub pid: libc::pid_t,
    pub interval: Duration,
    pub cpu: Option<usize>,
    /// How long the thread busy-polls for the next event after one, before
    /// sleeping (0: never spin).
    pub spin: Duration,
    /// Where the custody file goes (required for access methods).
    pub custody_path: Option<PathBuf>,
    /// Custody slots for exhaustive access tracking (sampled tracking uses
    /// one slot per sampled granule).
    pub custody_granules: u32,
    /// Seed of the sample draw.
    pub seed: u64,
    pub started_ms: u64,
    /// Sampled tracking: the faults per second the guest may take for
    /// re-confirming granules already known hot (0: no budget, re-arm every
    /// hot granule every interval). New accesses are always watched.
    pub fault_budget: u32,
    /// Sampled tracking: re-arm each hot granule at least every this many
    /// intervals (keep it below the shortest window, in intervals).
    pub max_stride: u32,
    /// Wake every thread waiting on a fault in the guest's ranges once
    /// armed. Needed when taking over a uffd from a tracker that died
    /// (after an agent restart): faults whose messages it read but never
    /// answered have nobody else to wake them. A woken thread whose page is
    /// still missing faults again, and this tracker serves it.
    pub wake_waiters: bool,
    /// Snapshot-backed VMs: granules to copy in from the snapshot ahead of
    /// the guest, in this order (a learned restore working set; empty:
    /// none).
    pub prefetch: Vec<u32>,
    /// Pages of the learned set left out of `prefetch` to be seen on
    /// demand: how many of them the guest touches within the recording
    /// span estimates how much of the prefetch it did not need.
    pub probes: Vec<u32>,
    /// Snapshot-backed VMs: record the guest's first touches for this long
    /// after the start into this file (`tracker::prefetch` has its format).
    pub record: Option<(PathBuf, Duration)>,
}

/// Why a tracker could not start.
#[derive(Debug, thiserror::Error)]
pub enum TrackerError {
    #[error("UFFDIO_REGISTER of {start:#x}+{len:#x} with mode {mode:#x} failed: {source}")]
    Register {
        start: u64,
        len: u64,
        mode: u64,
        source: io::Error,
    },
    #[error("UFFDIO_SET_MODE to {mode} failed: {source}")]
    SetMode {
        mode: &'static str,
        source: io::Error,
    },
    #[error(
        "open /proc/{pid}/clear_refs to reset soft-dirty bits: {source} (the agent needs root)"
    )]
    ClearRefs { pid: libc::pid_t, source: io::Error },
    #[error("write-protecting {start:#x}+{len:#x} failed: {source}")]
    Protect {
        start: u64,
        len: u64,
        source: io::Error,
    },
    #[error(
        "open /proc/{pid}/pagemap for PAGEMAP_SCAN: {source} (the agent needs root or CAP_SYS_PTRACE)"
    )]
    Pagemap { pid: libc::pid_t, source: io::Error },
    #[error("custody: {0}")]
    Custody(io::Error),
    #[error("access tracking needs {0}")]
    Missing(&'static str),
    #[error("map the snapshot memory file: {0}")]
    SourceMap(io::Error),
    #[error("create {what}: {source}")]
    Fd {
        what: &'static str,
        source: io::Error,
    },
    #[error("spawn tracker thread: {0}")]
    Spawn(io::Error),
}

/// What a stopped tracker reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StopReport {
    pub state: TrackerState,
    pub reason: String,
    /// Pages that could not be put back and stay in the custody file.
    pub pages_left_in_custody: u32,
}

/// Owns one tracker thread. Dropping the handle stops the thread.
#[derive(Debug)]
pub struct TrackerHandle {
    shared: Arc<VmShared>,
    stop: EventFd,
    join: Option<JoinHandle<StopReport>>,
    pin_warning: Option<String>,
}

impl TrackerHandle {
    /// Register the VM's ranges with the chosen modes, arm tracking, and start
    /// the thread. Registration errors come back here, before any thread runs.
    pub fn spawn(spec: TrackerSpec) -> Result<Self, TrackerError> {
        let interval_ms = spec.interval.as_millis() as u64;
        let granules: usize = spec
            .regions
            .iter()
            .map(|r| (r.len / spec.granule_bytes) as usize)
            .sum();
        let sample = match spec.plan.access {
            Access::ShmemSampled { granules: k } => {
                Some(draw_sample(granules as u32, k, spec.seed))
            }
            _ => None,
        };
        let shared = Arc::new(VmShared::new(
            granules,
            spec.granule_bytes,
            sample.as_deref(),
            spec.started_ms,
            interval_ms,
        ));
        let stop = EventFd::new().map_err(|source| TrackerError::Fd {
            what: "eventfd",
            source,
        })?;
        let mut t = Tracker::new(spec, shared.clone(), sample)?;
        let stop_raw = stop.as_raw_fd();
        let name = t.name.clone();
        let (ready_tx, ready_rx) = std::sync::mpsc::sync_channel(1);
        let join = std::thread::Builder::new()
            .name(name)
            .spawn(move || {
                let pin = t.cpu.map(|cpu| {
                    sys::pin_to(cpu).map_err(|e| format!("pinning to CPU {cpu} failed: {e}"))
                });
                let _ = ready_tx.send(pin.and_then(Result::err));
                t.run(stop_raw)
            })
            .map_err(TrackerError::Spawn)?;
        let pin_warning = ready_rx.recv().ok().flatten();
        Ok(Self {
            shared,
            stop,
            join: Some(join),
            pin_warning,
        })
    }

    /// Why the thread could not be pinned to its CPU, if it could not.
    pub fn pin_warning(&self) -> Option<&str> {
        self.pin_warning.as_deref()
    }

    /// The state the control plane reads.
    pub fn shared(&self) -> &Arc<VmShared> {
        &self.shared
    }

    /// Whether the thread has ended (VMM gone, failure, or stopped).
    pub fn is_finished(&self) -> bool {
        self.join.as_ref().is_none_or(JoinHandle::is_finished)
    }

    /// Stop the thread: it puts every page in custody back, removes all
    /// protection, unregisters, and exits. Blocks until it has.
    pub fn stop(mut self) -> StopReport {
        self.stop_inner()
    }

    fn stop_inner(&mut self) -> StopReport {
        self.stop.signal();
        match self.join.take() {
            Some(j) => j.join().unwrap_or_else(|_| StopReport {
                state: TrackerState::Failed,
                reason: "tracker thread panicked outside its guard".into(),
                pages_left_in_custody: 0,
            }),
            None => StopReport {
                state: self.shared.state(),
                reason: self.shared.end_reason().unwrap_or_default().to_owned(),
                pages_left_in_custody: 0,
            },
        }
    }
}

impl Drop for TrackerHandle {
    fn drop(&mut self) {
        if self.join.is_some() {
            self.stop_inner();
        }
    }
}
