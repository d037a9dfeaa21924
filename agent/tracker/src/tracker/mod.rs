//! The tracker: one named, pinned OS thread per uffd. It reads uffd messages
//! in batches, resolves faults, records page ages in [`VmShared`], and on
//! each interval tick harvests accesses and writes and re-arms sampling. It
//! owns every buffer it needs from the start: the fault path takes no lock
//! and does not allocate.
//!
//! [`Tracker`] composes the VM's [`RegionMap`], the [`Sampler`](sampler::Sampler)
//! that chooses which granules to watch, the [`CustodyPages`](custody_pages::CustodyPages)
//! that hold the pages punched out of guest memory, and the
//! [`Deferred`](fault::Deferred) faults the kernel asked to retry. Each step
//! lives in its own file: `handle` (spawn, stop), `event_loop` (poll, read,
//! dispatch), `fault` (serving one fault), `harvest` (the tick),
//! `sampler` (re-arming watched granules), `custody_pages` (evicting,
//! restoring, releasing). None of them has `unsafe` code: every raw call
//! goes through `crate::sys` or the bindings in `crate::uffd`.

#![forbid(unsafe_code)]

mod custody_pages;
mod event_loop;
mod fault;
mod handle;
mod harvest;
mod prefetch;
mod region;
mod sampler;

use std::fs::File;
use std::os::fd::OwnedFd;
use std::os::unix::fs::MetadataExt;
use std::sync::Arc;

pub use fault::DEFERRED_CAP;
pub use handle::{StopReport, TrackerError, TrackerHandle, TrackerSpec};
pub use prefetch::{CHUNK_GRANULES, RECORD_MAGIC};
pub use region::{Region, RegionMap};
pub use sampler::{draw_sample, rearm_stride};

use crate::Uffd;
use crate::custody::{Custody, CustodyHeader};
use crate::plan::{Access, Dirty, Plan};
use crate::shared::VmShared;
use crate::sys::{self, FileMap, TimerFd};
use crate::uffd::{UffdMsg, feature, mode, pagemap};
use custody_pages::CustodyPages;
use fault::{Deferred, Snapshot};
use prefetch::{Prefetch, Recorder};
use sampler::Sampler;

/// Messages read per `read(2)`.
const MSG_BATCH: usize = 64;
/// Page runs per PAGEMAP_SCAN call.
const SCAN_VEC: usize = 512;

#[derive(Debug)]
struct Tracker {
    name: String,
    uffd: Uffd,
    map: RegionMap,
    plan: Plan,
    /// The VMM's pid.
    pid: libc::pid_t,
    shared: Arc<VmShared>,
    cpu: Option<usize>,
    spin_ns: u64,
    timer: TimerFd,
    pidfd: Option<OwnedFd>,
    /// `/proc/<pid>/pagemap`, for PAGEMAP_SCAN harvests.
    pagemap: Option<File>,
    /// `/proc/<pid>/clear_refs`, for soft-dirty dirty tracking.
    clear_refs: Option<File>,
    /// Snapshot-backed VMs: the memory file MISSING faults are served from.
    snapshot: Option<Snapshot>,
    /// Per granule: the VMM dropped it (REMOVE): serve zeros, not the snapshot.
    removed: Box<[bool]>,
    /// Snapshot-backed VMs: what is left to copy in ahead of the guest.
    prefetch: Option<Prefetch>,
    /// Snapshot-backed VMs: this restore's first touches, being recorded.
    recorder: Option<Recorder>,
    pages: CustodyPages,
    sampler: Sampler,
    deferred: Deferred,
    zero: Box<[u8]>,
    msgs: Box<[UffdMsg; MSG_BATCH]>,
    scan_buf: Box<[pagemap::PageRegion]>,
}

impl Tracker {
    fn new(
        spec: TrackerSpec,
        shared: Arc<VmShared>,
        sample: Option<Vec<u32>>,
    ) -> Result<Self, TrackerError> {
        let granule = spec.granule_bytes;
        let granules = shared.granules();
        let map = RegionMap::new(&spec.regions, granule);
        let memory = spec.memory_fd.map(File::from);
        // Custody-based access methods, and RWP's cold-page eviction.
        let access = matches!(
            spec.plan.access,
            Access::ShmemSampled { .. } | Access::ShmemExhaustive
        );
        let evicting = spec.plan.evict_after > 0;
        let (custody, sample) = if access || evicting {
            let path = spec
                .custody_path
                .clone()
                .ok_or(TrackerError::Missing("a state directory for custody files"))?;
            let mfd = memory
                .as_ref()
                .ok_or(TrackerError::Missing("the memory fd"))?;
            let st = mfd.metadata().map_err(TrackerError::Custody)?;
            // Eviction watches no sample: the RWP harvest sees every page.
            let sample = match (access, sample) {
                (false, _) => Vec::new(),
                (true, s) => s.unwrap_or_else(|| (0..granules as u32).collect()),
            };
            let slots = match spec.plan.access {
                Access::ShmemSampled { .. } => sample.len() as u32,
                _ => spec.custody_granules.min(granules as u32),
            };
            let header = CustodyHeader {
                granule,
                slots,
                vmm_pid: spec.pid,
                memory_dev: st.dev(),
                memory_ino: st.ino(),
            };
            (
                Some(Custody::create(&path, header).map_err(TrackerError::Custody)?),
                sample,
            )
        } else {
            (None, Vec::new())
        };
        let hugetlbfs = memory.as_ref().is_some_and(sys::on_hugetlbfs);
        let rwp = matches!(spec.plan.access, Access::Rwp { .. });
        let pagemap = if matches!(spec.plan.dirty, Dirty::WpAsync | Dirty::SoftDirty) || rwp {
            Some(
                File::open(format!("/proc/{}/pagemap", spec.pid)).map_err(|source| {
                    TrackerError::Pagemap {
                        pid: spec.pid,
                        source,
                    }
                })?,
            )
        } else {
            None
        };
        let clear_refs = if spec.plan.dirty == Dirty::SoftDirty {
            Some(
                std::fs::OpenOptions::new()
                    .write(true)
                    .open(format!("/proc/{}/clear_refs", spec.pid))
                    .map_err(|source| TrackerError::ClearRefs {
                        pid: spec.pid,
                        source,
                    })?,
            )
        } else {
            None
        };
        let snapshot_backed = spec.source.is_some();
        let snapshot = match spec.source {
            Some(f) => Some(Snapshot::new(
                FileMap::new(f).map_err(TrackerError::SourceMap)?,
                granules,
            )),
            None => None,
        };
        let timer = TimerFd::periodic(spec.interval).map_err(|source| TrackerError::Fd {
            what: "timerfd",
            source,
        })?;
        // A VMM that is already gone is noticed at the first tick instead.
        let pidfd = sys::pidfd_open(spec.pid).ok();
        let sampled = matches!(spec.plan.access, Access::ShmemSampled { .. });
        let t = Self {
            name: spec.name,
            uffd: spec.uffd,
            map,
            plan: spec.plan,
            pid: spec.pid,
            shared,
            cpu: spec.cpu,
            spin_ns: spec.spin.as_nanos() as u64,
            timer,
            pidfd,
            pagemap,
            clear_refs,
            snapshot,
            removed: vec![false; granules].into_boxed_slice(),
            prefetch: if snapshot_backed {
                Prefetch::new(spec.prefetch)
            } else {
                None
            },
            recorder: match spec.record {
                Some((path, span)) if snapshot_backed => Some(Recorder::new(
                    path,
                    span.as_nanos() as u64,
                    granules,
                    spec.probes,
                )),
                _ => None,
            },
            pages: CustodyPages::new(
                custody,
                memory,
                hugetlbfs,
                if access || evicting { granules } else { 0 },
            ),
            sampler: Sampler::new(
                sample,
                if sampled { granules } else { 0 },
                spec.fault_budget,
                spec.max_stride,
                spec.interval.as_millis() as u64,
            ),
            deferred: Deferred::new(granules),
            zero: vec![0u8; granule as usize].into_boxed_slice(),
            msgs: Box::new([UffdMsg::default(); MSG_BATCH]),
            scan_buf: vec![pagemap::PageRegion::default(); SCAN_VEC].into_boxed_slice(),
        };
        t.arm()?;
        if spec.wake_waiters {
            t.drop_stale_write_protect()?;
            for r in t.map.regions() {
                let _ = t.uffd.wake(r.host_addr, r.len);
            }
        }
        Ok(t)
    }

    /// Register every region and protect it as the plan says.
    fn arm(&self) -> Result<(), TrackerError> {
        if let Access::Rwp { sync } = self.plan.access {
            // The uffd may arrive in either mode (RWP_ASYNC requested or not).
            let (mode, r) = if sync {
                ("sync", self.uffd.set_mode(0, feature::RWP_ASYNC))
            } else {
                ("async", self.uffd.set_mode(feature::RWP_ASYNC, 0))
            };
            r.map_err(|source| TrackerError::SetMode { mode, source })?;
        }
        if self.plan.dirty == Dirty::SoftDirty {
            self.clear_soft_dirty()
                .map_err(|source| TrackerError::ClearRefs {
                    pid: self.pid,
                    source,
                })?;
        }
        for r in self.map.regions() {
            // Nothing to register (soft-dirty writes alone on memory the uffd
            // cannot take MISSING faults on): the scan needs no uffd.
            if self.plan.register_mode == 0 {
                break;
            }
            self.uffd
                .register(r.host_addr, r.len, self.plan.register_mode)
                .map_err(|source| TrackerError::Register {
                    start: r.host_addr,
                    len: r.len,
                    mode: self.plan.register_mode,
                    source,
                })?;
            let protect = |source| TrackerError::Protect {
                start: r.host_addr,
                len: r.len,
                source,
            };
            if matches!(self.plan.access, Access::Rwp { .. }) {
                self.uffd
                    .rw_protect(r.host_addr, r.len, true)
                    .map_err(protect)?;
            }
            // Watched writes need no protection up front: each watched page
            // is write-protected when the access method arms it.
            if matches!(self.plan.dirty, Dirty::WpSync | Dirty::WpAsync) {
                self.uffd
                    .write_protect(r.host_addr, r.len, true, true)
                    .map_err(protect)?;
            }
        }
        Ok(())
    }

    /// An earlier agent may have tracked this VM by sync write-protect; a
    /// plan without it clears what that left on the pages, or the guest's
    /// next write to each would wait on a fault nobody needs. The
    /// registration itself stays (the kernel keeps a range's modes when
    /// one re-registers it with fewer), and without protected pages it
    /// never makes a guest wait.
    fn drop_stale_write_protect(&self) -> Result<(), TrackerError> {
        // The plan's registration says whether write-protect is in use.
        let uses_wp = self.plan.register_mode & (mode::WP | mode::RWP) != 0;
        if uses_wp {
            return Ok(());
        }
        for r in self.map.regions() {
            match self.uffd.write_protect(r.host_addr, r.len, false, true) {
                Ok(_) => {}
                // Not registered for write-protect: nothing was left.
                Err(e) if matches!(e.raw_os_error(), Some(libc::ENOENT | libc::EINVAL)) => {}
                Err(source) => {
                    return Err(TrackerError::Protect {
                        start: r.host_addr,
                        len: r.len,
                        source,
                    });
                }
            }
        }
        Ok(())
    }

    /// Granule size in bytes.
    #[inline]
    fn granule(&self) -> u64 {
        self.map.granule()
    }
}
