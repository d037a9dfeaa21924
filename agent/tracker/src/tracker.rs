//! The tracker: one named, pinned OS thread per uffd. It reads uffd messages
//! in batches, resolves faults, records page ages in [`VmShared`], and on
//! each interval tick harvests dirty pages and re-arms sampling. It owns every
//! buffer it needs from the start: the fault path takes no lock and does not
//! allocate.

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::panic::AssertUnwindSafe;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::thread::JoinHandle;
use std::time::Duration;

use crate::custody::{Custody, CustodyHeader};
use crate::plan::{Access, Dirty, Plan};
use crate::shared::{NEVER, TrackerState, VmShared};
use crate::uffd::{Event, Resolve, Uffd, UffdMsg, fault_flag, feature, pagemap};

/// One contiguous range of guest memory in the VMM's address space.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Region {
    /// Start in the VMM's address space.
    pub host_addr: u64,
    pub len: u64,
    /// Offset of this range in the memory file (memfd, or snapshot file).
    pub file_offset: u64,
}

/// A VM's ranges cut into granules: which granule a fault address falls
/// in, and which granules a range covers wholly. Pure, so the tracker and
/// the fuzzer share it.
#[derive(Clone, Debug)]
pub struct RegionMap {
    regions: Vec<Region>,
    /// First granule index of each region.
    base: Vec<usize>,
    granule: u64,
    granules: usize,
}

impl RegionMap {
    /// `regions` sorted and apart, lengths multiples of `granule`.
    pub fn new(regions: &[Region], granule: u64) -> Self {
        let mut base = Vec::with_capacity(regions.len());
        let mut acc = 0usize;
        for r in regions {
            base.push(acc);
            acc += (r.len / granule) as usize;
        }
        Self {
            regions: regions.to_vec(),
            base,
            granule,
            granules: acc,
        }
    }

    pub fn granules(&self) -> usize {
        self.granules
    }

    /// The granule holding `addr`, and the granule's start address.
    #[inline]
    pub fn locate(&self, addr: u64) -> Option<(usize, u64)> {
        // A VM has one to a handful of regions: a linear scan beats a search.
        for (i, r) in self.regions.iter().enumerate() {
            if addr >= r.host_addr && addr - r.host_addr < r.len {
                let within = (addr - r.host_addr) / self.granule;
                return Some((
                    self.base[i] + within as usize,
                    r.host_addr + within * self.granule,
                ));
            }
        }
        None
    }

    /// Start address of granule `g`.
    pub fn granule_addr(&self, g: usize) -> u64 {
        let i = self.base.partition_point(|&b| b <= g) - 1;
        self.regions[i].host_addr + (g - self.base[i]) as u64 * self.granule
    }

    /// The granules wholly inside `[start, end)`, in order; the work is
    /// bounded by the VM's size whatever the range.
    pub fn wholly_within(&self, start: u64, end: u64) -> impl Iterator<Item = usize> + '_ {
        self.regions.iter().enumerate().flat_map(move |(i, r)| {
            let lo = start.max(r.host_addr);
            let hi = end.min(r.host_addr.saturating_add(r.len));
            let (first, last) = if lo < hi {
                (
                    (lo - r.host_addr).div_ceil(self.granule),
                    (hi - r.host_addr) / self.granule,
                )
            } else {
                (0, 0)
            };
            (first..last.max(first)).map(move |k| self.base[i] + k as usize)
        })
    }
}

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
    pub pid: i32,
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
    ClearRefs { pid: i32, source: io::Error },
    #[error("write-protecting {start:#x}+{len:#x} failed: {source}")]
    Protect {
        start: u64,
        len: u64,
        source: io::Error,
    },
    #[error(
        "open /proc/{pid}/pagemap for PAGEMAP_SCAN: {source} (the agent needs root or CAP_SYS_PTRACE)"
    )]
    Pagemap { pid: i32, source: io::Error },
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
    stop: OwnedFd,
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
        let stop = eventfd().map_err(|source| TrackerError::Fd {
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
                    pin_to(cpu).map_err(|e| format!("pinning to CPU {cpu} failed: {e}"))
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
        let one: u64 = 1;
        // SAFETY: writing 8 bytes from a u64 to our eventfd.
        unsafe { libc::write(self.stop.as_raw_fd(), (&one as *const u64).cast(), 8) };
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

/// A deterministic random sample of `k` distinct granules out of `n`
/// (Floyd's algorithm), sorted.
pub fn draw_sample(n: u32, k: u32, seed: u64) -> Vec<u32> {
    let k = k.min(n);
    let mut rng = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut next = || {
        // xorshift64*
        rng ^= rng >> 12;
        rng ^= rng << 25;
        rng ^= rng >> 27;
        rng.wrapping_mul(0x2545_F491_4F6C_DD1D)
    };
    let mut chosen = std::collections::HashSet::with_capacity(k as usize);
    for j in (n - k)..n {
        let t = (next() % (j as u64 + 1)) as u32;
        if !chosen.insert(t) {
            chosen.insert(j);
        }
    }
    let mut v: Vec<u32> = chosen.into_iter().collect();
    v.sort_unstable();
    v
}

fn eventfd() -> io::Result<OwnedFd> {
    // SAFETY: eventfd(2) with constant flags returns a new fd or -1.
    let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh fd from the kernel.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn timerfd(interval: Duration) -> io::Result<OwnedFd> {
    // SAFETY: timerfd_create with constant arguments returns a new fd or -1.
    let fd = unsafe {
        libc::timerfd_create(
            libc::CLOCK_MONOTONIC,
            libc::TFD_NONBLOCK | libc::TFD_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh fd from the kernel.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let ts = libc::timespec {
        tv_sec: interval.as_secs() as _,
        tv_nsec: interval.subsec_nanos() as _,
    };
    let spec = libc::itimerspec {
        it_interval: ts,
        it_value: ts,
    };
    // SAFETY: `spec` is a valid itimerspec; the old value is not asked for.
    if unsafe { libc::timerfd_settime(fd.as_raw_fd(), 0, &spec, std::ptr::null_mut()) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(fd)
}

fn pidfd_open(pid: i32) -> io::Result<OwnedFd> {
    // SAFETY: pidfd_open(2) takes a pid and flags and returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) } as RawFd;
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh fd from the kernel.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Monotonic nanoseconds (vDSO; no syscall, no allocation).
#[inline]
fn now_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

fn pin_to(cpu: usize) -> io::Result<()> {
    // SAFETY: a zeroed cpu_set_t is a valid empty set; CPU_SET writes in bounds
    // for cpu < CPU_SETSIZE (checked by the caller's validation of the CPU set).
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        if libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set) != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// A read-only private mapping of the snapshot memory file.
#[derive(Debug)]
struct SourceMap {
    ptr: *const u8,
    len: usize,
}

impl SourceMap {
    fn new(f: &File) -> io::Result<Self> {
        let len = f.metadata()?.len() as usize;
        if len == 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "snapshot memory file is empty",
            ));
        }
        // SAFETY: mapping a file we hold, read-only and private.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_PRIVATE,
                f.as_raw_fd(),
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(Self { ptr: p.cast(), len })
    }
}

impl Drop for SourceMap {
    fn drop(&mut self) {
        // SAFETY: unmapping our own mapping.
        unsafe { libc::munmap(self.ptr as *mut _, self.len) };
    }
}

const MSG_BATCH: usize = 64;
const DEFERRED_CAP: usize = 1024;
const SCAN_VEC: usize = 512;
/// `slot_of` values that are not custody slots.
const UNARMED: u32 = u32::MAX;
/// Armed without custody: the granule is a hole in the memory file, so its
/// next access faults anyway.
const ARMED_HOLE: u32 = u32::MAX - 1;

/// What [`Tracker::evict`] did with a granule.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Evict {
    /// Saved to custody and punched: its next access faults.
    Saved,
    /// A hole already: its next access faults anyway.
    Hole,
    /// Left in place (the VMM is gone, or the kernel would not punch it).
    Kept,
    /// Custody is full.
    Full,
}

#[derive(Debug)]
struct Tracker {
    name: String,
    uffd: Uffd,
    regions: Vec<Region>,
    /// First granule index of each region.
    region_base: Vec<usize>,
    granule: u64,
    plan: Plan,
    memory_fd: Option<OwnedFd>,
    /// The memory fd is on hugetlbfs, where `SEEK_DATA` sees no holes and
    /// a punch always frees whole huge pages.
    hugetlbfs: bool,
    source: Option<SourceMap>,
    _source_file: Option<File>,
    pagemap: Option<File>,
    /// The VMM's pid.
    pid: i32,
    /// `/proc/<pid>/clear_refs`, for soft-dirty dirty tracking.
    clear_refs: Option<File>,
    pidfd: Option<OwnedFd>,
    timer: OwnedFd,
    cpu: Option<usize>,
    spin_ns: u64,
    shared: Arc<VmShared>,
    custody: Option<Custody>,
    /// The custody file could not grow past this many slots the last time
    /// it was asked to (its filesystem is full): logged when it starts and
    /// when it ends.
    custody_stuck: Option<u32>,
    /// Per granule: custody slot, [`ARMED_HOLE`] or [`UNARMED`] (access
    /// methods and eviction only).
    slot_of: Box<[u32]>,
    /// Granules the access method watches.
    sample: Box<[u32]>,
    /// Per granule: the VMM dropped it (REMOVE): serve zeros, not the snapshot.
    removed: Box<[bool]>,
    /// Per granule, for snapshot-backed VMs only (empty otherwise): served by
    /// us from the snapshot, so release populates the rest.
    served: Box<[bool]>,
    zero: Box<[u8]>,
    msgs: Box<[UffdMsg; MSG_BATCH]>,
    deferred: Vec<(u64, u64)>,
    scan_buf: Box<[pagemap::PageRegion]>,
    map: RegionMap,
    /// Sampled tracking, per granule: `epoch << 1 | skipped` of the last
    /// tick that re-armed (skipped = 0) or deliberately left unarmed
    /// (skipped = 1) a hot granule.
    armed_tick: Box<[u32]>,
    strata: Strata,
    fault_budget: u32,
    max_stride: u32,
    interval_ms: u64,
}

/// Hot sampled granules in the epoch in progress: those re-armed at its
/// start and those left unwatched, with the first accesses and writes seen
/// in each. The re-armed ones stand for the unwatched ones in the rates.
#[derive(Debug, Default)]
struct Strata {
    rearmed: u32,
    skipped: u32,
    rearmed_accessed: u32,
    rearmed_written: u32,
    skipped_accessed: u32,
    skipped_written: u32,
}

impl Strata {
    /// Estimated first accesses and writes of the skipped granules that
    /// were not seen: the re-armed granules' proportions applied to them,
    /// less what was seen anyway (writes to pages still write-protected).
    fn unseen(&self) -> (u32, u32) {
        if self.skipped == 0 {
            return (0, 0);
        }
        // Without a re-armed granule to go by, hot granules are taken to
        // have stayed hot (and their writes to be those seen).
        let (pa, pw) = if self.rearmed == 0 {
            (1.0, 0.0)
        } else {
            (
                self.rearmed_accessed as f64 / self.rearmed as f64,
                self.rearmed_written as f64 / self.rearmed as f64,
            )
        };
        let est = |p: f64| (self.skipped as f64 * p).round() as u32;
        (
            est(pa).saturating_sub(self.skipped_accessed),
            est(pw).saturating_sub(self.skipped_written),
        )
    }
}

/// How many intervals apart hot sampled granules are re-armed so that `hot`
/// of them fault at most `budget` times per second over `interval_ms`.
pub fn rearm_stride(hot: u32, budget: u32, interval_ms: u64, max_stride: u32) -> u32 {
    if budget == 0 || hot == 0 {
        return 1;
    }
    let per_interval = (budget as u64 * interval_ms / 1000).max(1);
    (hot as u64)
        .div_ceil(per_interval)
        .clamp(1, max_stride.max(1) as u64) as u32
}

impl Tracker {
    fn new(
        spec: TrackerSpec,
        shared: Arc<VmShared>,
        sample: Option<Vec<u32>>,
    ) -> Result<Self, TrackerError> {
        let granule = spec.granule_bytes;
        let granules = shared.granules();
        let mut region_base = Vec::with_capacity(spec.regions.len());
        let mut acc = 0usize;
        for r in &spec.regions {
            region_base.push(acc);
            acc += (r.len / granule) as usize;
        }
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
            let mfd = spec
                .memory_fd
                .as_ref()
                .ok_or(TrackerError::Missing("the memory fd"))?;
            let st = nix_fstat(mfd.as_raw_fd()).map_err(TrackerError::Custody)?;
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
                vmm_pid: spec.pid as u32,
                memory_dev: st.0,
                memory_ino: st.1,
            };
            (
                Some(Custody::create(&path, header).map_err(TrackerError::Custody)?),
                sample,
            )
        } else {
            (None, Vec::new())
        };
        let hugetlbfs = spec
            .memory_fd
            .as_ref()
            .is_some_and(|f| on_hugetlbfs(f.as_raw_fd()));
        let rwp = matches!(spec.plan.access, Access::Rwp { .. });
        let pagemap = if spec.plan.dirty == Dirty::WpAsync || rwp {
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
        let source = match &spec.source {
            Some(f) => Some(SourceMap::new(f).map_err(TrackerError::SourceMap)?),
            None => None,
        };
        let timer = timerfd(spec.interval).map_err(|source| TrackerError::Fd {
            what: "timerfd",
            source,
        })?;
        // A VMM that is already gone is noticed at the first tick instead.
        let pidfd = pidfd_open(spec.pid).ok();
        let snapshot_backed = source.is_some();
        let sampled = matches!(spec.plan.access, Access::ShmemSampled { .. });
        let map = RegionMap::new(&spec.regions, granule);
        let t = Self {
            name: spec.name,
            uffd: spec.uffd,
            regions: spec.regions,
            region_base,
            granule,
            plan: spec.plan,
            hugetlbfs,
            memory_fd: spec.memory_fd,
            source,
            _source_file: spec.source,
            pagemap,
            clear_refs,
            pid: spec.pid,
            pidfd,
            timer,
            cpu: spec.cpu,
            spin_ns: spec.spin.as_nanos() as u64,
            shared,
            custody,
            custody_stuck: None,
            slot_of: vec![UNARMED; if access || evicting { granules } else { 0 }]
                .into_boxed_slice(),
            sample: sample.into_boxed_slice(),
            removed: vec![false; granules].into_boxed_slice(),
            served: vec![false; if snapshot_backed { granules } else { 0 }].into_boxed_slice(),
            zero: vec![0u8; granule as usize].into_boxed_slice(),
            msgs: Box::new([UffdMsg::default(); MSG_BATCH]),
            deferred: Vec::with_capacity(DEFERRED_CAP),
            scan_buf: vec![pagemap::PageRegion::default(); SCAN_VEC].into_boxed_slice(),
            map,
            armed_tick: vec![0; if sampled { granules } else { 0 }].into_boxed_slice(),
            strata: Strata::default(),
            fault_budget: spec.fault_budget,
            max_stride: spec.max_stride.max(1),
            interval_ms: spec.interval.as_millis() as u64,
        };
        t.arm()?;
        // Wake every thread waiting on a fault in the guest's ranges: after
        // an agent restart, faults whose messages the dead tracker read but
        // never answered have nobody else to wake them. A woken thread whose
        // page is still missing faults again, and this tracker serves it.
        for r in &t.regions {
            let _ = t.uffd.wake(r.host_addr, r.len);
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
        for r in &self.regions {
            self.uffd
                .register(r.host_addr, r.len, self.plan.register_mode)
                .map_err(|source| TrackerError::Register {
                    start: r.host_addr,
                    len: r.len,
                    mode: self.plan.register_mode,
                    source,
                })?;
            if matches!(self.plan.access, Access::Rwp { .. })
                && let Err(source) = self.uffd.rw_protect(r.host_addr, r.len, true)
            {
                return Err(TrackerError::Protect {
                    start: r.host_addr,
                    len: r.len,
                    source,
                });
            }
            // Watched writes need no protection up front: each watched page
            // is write-protected when the access method arms it.
            if matches!(self.plan.dirty, Dirty::WpSync | Dirty::WpAsync) {
                match self.uffd.write_protect(r.host_addr, r.len, true, true) {
                    Ok(_) => {}
                    Err(source) => {
                        return Err(TrackerError::Protect {
                            start: r.host_addr,
                            len: r.len,
                            source,
                        });
                    }
                }
            }
        }
        Ok(())
    }

    fn run(&mut self, stop: RawFd) -> StopReport {
        let outcome = std::panic::catch_unwind(AssertUnwindSafe(|| self.event_loop(stop)));
        let (state, reason) = match outcome {
            Ok(Ok(end)) => end,
            Ok(Err(e)) => (TrackerState::Failed, format!("tracker error: {e}")),
            Err(p) => {
                let msg = p
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| p.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "unknown panic".into());
                (TrackerState::Failed, format!("tracker panicked: {msg}"))
            }
        };
        let vmm_alive = state != TrackerState::Retired;
        let left = self.release(vmm_alive);
        let reason = if left > 0 {
            format!(
                "{reason}; {left} pages could not be put back and remain in {}",
                self.custody
                    .as_ref()
                    .map(|c| c.path().display().to_string())
                    .unwrap_or_default()
            )
        } else {
            reason
        };
        self.shared.end(state, reason.clone());
        StopReport {
            state,
            reason,
            pages_left_in_custody: left,
        }
    }

    fn event_loop(&mut self, stop: RawFd) -> io::Result<(TrackerState, String)> {
        let mut fds = [
            libc::pollfd {
                fd: self.uffd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: self.timer.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: stop,
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: self.pidfd.as_ref().map_or(-1, AsRawFd::as_raw_fd),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // Busy-poll for `spin_ns` after each event before sleeping: faults
        // come in bursts (after every tick), and waking a halted CPU for each
        // one costs the guest far more than the spin costs us.
        let mut spin_until = 0u64;
        loop {
            let timeout = if !self.deferred.is_empty() {
                1
            } else if self.spin_ns > 0 && now_ns() < spin_until {
                0
            } else {
                -1
            };
            // SAFETY: `fds` is a valid array of pollfd of the given length.
            let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as _, timeout) };
            if n > 0 {
                spin_until = now_ns() + self.spin_ns;
            }
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            if fds[2].revents != 0 {
                return Ok((TrackerState::Stopped, "stopped by the agent".into()));
            }
            if fds[0].revents & libc::POLLIN != 0
                && let Some(end) = self.drain()?
            {
                return Ok(end);
            }
            if fds[0].revents & (libc::POLLERR | libc::POLLHUP) != 0 {
                return Ok((
                    TrackerState::Retired,
                    "the uffd reported an error or hang-up".into(),
                ));
            }
            if !self.deferred.is_empty() {
                self.retry_deferred()?;
            }
            if fds[1].revents != 0 {
                let mut ticks = 0u64;
                // SAFETY: reading 8 bytes into a u64 from our timerfd.
                unsafe { libc::read(self.timer.as_raw_fd(), (&mut ticks as *mut u64).cast(), 8) };
                self.tick()?;
            }
            if fds[3].revents != 0 {
                return Ok((TrackerState::Retired, "the VMM process exited".into()));
            }
        }
    }

    /// Read and handle messages. A short batch means the queue was empty, so
    /// poll again instead of spending a read that would return EAGAIN (with
    /// one vCPU faulting at a time, that read would double the syscalls).
    fn drain(&mut self) -> io::Result<Option<(TrackerState, String)>> {
        loop {
            let n = match self.uffd.read_msgs(&mut self.msgs[..]) {
                Ok(n) => n,
                Err(e) => {
                    return Ok(Some((
                        TrackerState::Retired,
                        format!("reading the uffd failed: {e}"),
                    )));
                }
            };
            if n == 0 {
                return Ok(None);
            }
            let t0 = now_ns();
            for i in 0..n {
                let ev = self.msgs[i].decode();
                if let Some(end) = self.handle(ev, t0)? {
                    return Ok(Some(end));
                }
            }
            if n < MSG_BATCH {
                return Ok(None);
            }
        }
    }

    #[inline]
    fn locate(&self, addr: u64) -> Option<(usize, u64)> {
        self.map.locate(addr)
    }

    /// The region holding granule `g`, and `g`'s byte offset inside it.
    fn region_of(&self, g: usize) -> (&Region, u64) {
        let i = self.region_base.partition_point(|&b| b <= g) - 1;
        (
            &self.regions[i],
            (g - self.region_base[i]) as u64 * self.granule,
        )
    }

    fn file_offset(&self, g: usize) -> u64 {
        let (r, within) = self.region_of(g);
        r.file_offset + within
    }

    fn handle(&mut self, ev: Event, t0: u64) -> io::Result<Option<(TrackerState, String)>> {
        match ev {
            Event::PageFault { flags, address, .. } => {
                let resolved = self.fault(address, flags)?;
                if resolved {
                    self.shared.record_latency(now_ns().saturating_sub(t0));
                    self.shared.counters.faults_handled.fetch_add(1, Relaxed);
                }
            }
            Event::Remove { start, end } => {
                self.shared.counters.remove_events.fetch_add(1, Relaxed);
                // Only granules wholly inside the range were dropped.
                for g in self.map.wholly_within(start, end) {
                    self.removed[g] = true;
                }
            }
            Event::Unmap { start, end } => {
                if self
                    .regions
                    .iter()
                    .any(|r| start < r.host_addr + r.len && r.host_addr < end)
                {
                    return Ok(Some((
                        TrackerState::Retired,
                        format!("the VMM unmapped guest memory {start:#x}..{end:#x}"),
                    )));
                }
            }
            Event::Remap { from, to, len } => {
                return Ok(Some((
                    TrackerState::Retired,
                    format!(
                        "the VMM moved guest memory {from:#x}+{len:#x} to {to:#x}; re-register to track it"
                    ),
                )));
            }
            Event::Fork { fd } => {
                // We do not track the VMM's children; close the child's uffd.
                // SAFETY: the kernel installed this fd in our table for us.
                drop(unsafe { OwnedFd::from_raw_fd(fd) });
            }
            Event::Unknown { .. } => {
                self.shared.counters.events_dropped.fetch_add(1, Relaxed);
            }
        }
        Ok(None)
    }

    /// Serve one fault. Returns whether it was resolved now (false: deferred).
    #[inline]
    fn fault(&mut self, address: u64, flags: u64) -> io::Result<bool> {
        let Some((g, ga)) = self.locate(address) else {
            self.shared.counters.events_dropped.fetch_add(1, Relaxed);
            return Ok(true);
        };
        let e = self.shared.epoch();
        let rwp_fault = flags & fault_flag::RWP != 0;
        let wp_fault = !rwp_fault && flags & fault_flag::WP != 0;
        let write = wp_fault || flags & fault_flag::WRITE != 0;
        let c = &self.shared.counters;
        let counter = match (rwp_fault, wp_fault, write) {
            (true, _, false) => &c.rwp_read_faults,
            (true, _, true) => &c.rwp_write_faults,
            (false, true, _) => &c.wp_faults,
            (false, false, _) => &c.missing_faults,
        };
        counter.fetch_add(1, Relaxed);
        if let Some(&m) = self.armed_tick.get(g)
            && m >> 1 == e
        {
            let first_access = (self.shared.access_epoch(g) != e) as u32;
            let first_write = (write && self.shared.write_epoch(g) != e) as u32;
            let st = &mut self.strata;
            if m & 1 == 0 {
                st.rearmed_accessed += first_access;
                st.rearmed_written += first_write;
            } else {
                st.skipped_accessed += first_access;
                st.skipped_written += first_write;
            }
        }
        self.shared.record(g, e, write);
        let slot = self.custody_slot(g);
        if slot.is_none() && !self.slot_of.is_empty() {
            // Accessed: the granule must be re-armed at the next tick.
            self.slot_of[g] = UNARMED;
        }
        let res = match slot {
            // A page in custody comes back, whichever fault it was.
            Some(slot) => self.restore(g, ga, slot, write)?,
            // Releasing the page wakes the thread waiting on it.
            None if rwp_fault => self.uffd.rw_protect(ga, self.granule, false)?,
            None if wp_fault => self.uffd.write_protect(ga, self.granule, false, false)?,
            None => self.serve_fresh(g, ga, write)?,
        };
        match res {
            Resolve::Done | Resolve::Gone => Ok(true),
            Resolve::Exists => {
                // Another fault on the same granule was served first.
                self.uffd.wake(ga, self.granule)?;
                Ok(true)
            }
            Resolve::Again => {
                self.shared.counters.retries.fetch_add(1, Relaxed);
                if self.deferred.len() < DEFERRED_CAP {
                    self.deferred.push((address, flags));
                    Ok(false)
                } else {
                    // Full: spin on this one rather than lose a blocked vCPU.
                    self.fault(address, flags)
                }
            }
        }
    }

    fn retry_deferred(&mut self) -> io::Result<()> {
        let pending = self.deferred.len();
        for i in 0..pending {
            let (a, f) = self.deferred[i];
            let _ = self.fault(a, f)?;
        }
        self.deferred.drain(..pending);
        Ok(())
    }

    #[inline]
    fn custody_slot(&self, g: usize) -> Option<u32> {
        match self.slot_of.get(g) {
            Some(&s) if s < ARMED_HOLE => Some(s),
            _ => None,
        }
    }

    /// Whether a later write to granule `g` must fault (so a page served for
    /// a read is mapped write-protected).
    #[inline]
    fn watches_writes(&self, g: usize) -> bool {
        match self.plan.dirty {
            Dirty::WpAsync | Dirty::WpSync => true,
            Dirty::Watched => self.shared.in_sample(g),
            // Soft-dirty bits see writes without any protection.
            Dirty::SoftDirty | Dirty::None => false,
        }
    }

    /// Serve a first touch (or a touch after the VMM dropped the page): from
    /// the snapshot file when there is one, else zeros.
    #[inline]
    fn serve_fresh(&mut self, g: usize, ga: u64, write: bool) -> io::Result<Resolve> {
        let wp = !write && self.watches_writes(g);
        let src = match &self.source {
            Some(s) if !self.removed[g] => {
                let off = self.file_offset(g) as usize;
                if off + self.granule as usize > s.len {
                    self.zero.as_ptr()
                } else {
                    // SAFETY: in bounds of the mapping (checked just above).
                    unsafe { s.ptr.add(off) }
                }
            }
            _ => self.zero.as_ptr(),
        };
        self.removed[g] = false;
        if let Some(s) = self.served.get_mut(g) {
            *s = true;
        }
        // SAFETY: `src` points at `granule` readable bytes (the snapshot
        // mapping or our zero buffer).
        unsafe { self.uffd.copy(ga, src, self.granule, wp) }
    }

    /// Put a page from custody back into the guest.
    fn restore(&mut self, g: usize, ga: u64, slot: u32, write: bool) -> io::Result<Resolve> {
        if self.plan.dirty == Dirty::SoftDirty {
            return self.restore_through_file(g, ga, slot);
        }
        let wp = !write && self.watches_writes(g);
        let custody = self.custody.as_ref().expect("custody slot without custody");
        // SAFETY: the slot pointer is valid for one granule.
        let r = unsafe {
            self.uffd
                .copy(ga, custody.slot_ptr(slot), self.granule, wp)?
        };
        match r {
            Resolve::Done | Resolve::Exists => {
                // Exists: something put a page there other than us (the VMM
                // wrote the memory file directly); its data is newer.
                self.slot_home(g, slot);
                self.shared.counters.refaulted_pages.fetch_add(1, Relaxed);
            }
            Resolve::Again | Resolve::Gone => {}
        }
        Ok(r)
    }

    /// Granule `g`'s page is back in the guest: free its custody slot.
    fn slot_home(&mut self, g: usize, slot: u32) {
        self.custody
            .as_mut()
            .expect("custody slot without custody")
            .release(slot);
        self.slot_of[g] = UNARMED;
        self.shared.counters.pages_in_custody.fetch_sub(1, Relaxed);
    }

    /// Put a page from custody back by writing it into the memory file and
    /// waking the threads waiting on it: they fault again, find the page in
    /// the file and map it like any other page of it, so a read maps it
    /// clean and only a write sets its soft-dirty bit. (`UFFDIO_COPY` maps
    /// every page it places dirty, which would count each read of an
    /// evicted page as a write.)
    fn restore_through_file(&mut self, g: usize, ga: u64, slot: u32) -> io::Result<Resolve> {
        let off = self.file_offset(g);
        // Data already there was written into the file by the VMM after the
        // eviction: it is newer than ours.
        if !self.file_has_data(off) {
            self.write_back(g, slot)?;
        }
        self.slot_home(g, slot);
        self.shared.counters.refaulted_pages.fetch_add(1, Relaxed);
        self.uffd.wake(ga, self.granule)?;
        Ok(Resolve::Done)
    }

    /// Whether the memory file holds data (not a hole) anywhere in the
    /// granule at `off`.
    fn file_has_data(&self, off: u64) -> bool {
        let Some(mfd) = &self.memory_fd else {
            return false;
        };
        // SAFETY: lseek on our memfd.
        let data = unsafe { libc::lseek(mfd.as_raw_fd(), off as libc::off_t, libc::SEEK_DATA) };
        data >= 0 && (data as u64) < off + self.granule
    }

    /// The interval tick: harvest, re-arm, advance the epoch.
    fn tick(&mut self) -> io::Result<()> {
        let e = self.shared.epoch();
        // A span per interval (not per fault); free when nobody listens.
        let _span = tracing::info_span!("harvest", vm = %self.name, epoch = e).entered();
        let t0 = now_ns();
        if let Access::Rwp { sync } = self.plan.access {
            self.harvest_rwp(e, sync)?;
        }
        match self.plan.dirty {
            Dirty::WpAsync => self.harvest_wp_async(e)?,
            Dirty::WpSync => {
                for r in &self.regions {
                    let _ = self.uffd.write_protect(r.host_addr, r.len, true, true)?;
                }
            }
            // Watched pages are re-protected by rearm_access below; soft-dirty
            // bits are harvested with RWP's.
            Dirty::Watched | Dirty::SoftDirty | Dirty::None => {}
        }
        if matches!(
            self.plan.access,
            Access::ShmemSampled { .. } | Access::ShmemExhaustive
        ) {
            let (a, w) = self.strata.unseen();
            self.shared.set_unwatched(e, a, w);
            self.rearm_access(e)?;
        }
        let c = &self.shared.counters;
        c.harvest_ns.fetch_add(now_ns().saturating_sub(t0), Relaxed);
        c.harvests.fetch_add(1, Relaxed);
        self.shared.advance_epoch(e);
        Ok(())
    }

    /// Reset the VMM's soft-dirty bits (its whole address space: the kernel
    /// offers no narrower reset).
    fn clear_soft_dirty(&self) -> io::Result<()> {
        use std::io::Write;
        match &self.clear_refs {
            Some(f) => {
                let mut f: &File = f;
                f.write_all(b"4")
            }
            None => Ok(()),
        }
    }

    /// RWP harvest: freeze, scan, re-protect, evict, thaw. While frozen (sync mode)
    /// a first access to a protected page waits for this thread, so nothing
    /// slips between the scan and the re-protect or the soft-dirty reset;
    /// those accesses are served (and recorded in the next epoch) right
    /// after the tick.
    fn harvest_rwp(&mut self, e: u32, sync: bool) -> io::Result<()> {
        if !sync {
            self.uffd.set_mode(0, feature::RWP_ASYNC)?;
        }
        let r = self.scan_and_reprotect(e);
        let reset = if r.is_ok() {
            self.clear_soft_dirty()
        } else {
            Ok(())
        };
        let r = r.and_then(|()| self.evict_cold(e));
        // Thaw whatever happened: a guest must never stay frozen.
        let thaw = if sync {
            Ok(())
        } else {
            self.uffd.set_mode(feature::RWP_ASYNC, 0)
        };
        r.and(reset).and(thaw)
    }

    fn scan_and_reprotect(&mut self, e: u32) -> io::Result<()> {
        let Some(pm) = self.pagemap.as_ref() else {
            return Ok(());
        };
        let soft_dirty = self.plan.dirty == Dirty::SoftDirty;
        let anyof = pagemap::PAGE_IS_ACCESSED
            | if soft_dirty {
                pagemap::PAGE_IS_SOFT_DIRTY
            } else {
                0
            };
        let scan = pagemap::Scan {
            category_inverted: 0,
            flags: 0,
            // Only present pages: a never-touched page is not protected, but
            // it has not been accessed either.
            category_mask: pagemap::PAGE_IS_PRESENT,
            category_anyof_mask: anyof,
            return_mask: anyof | pagemap::PAGE_IS_HUGE,
        };
        let (shared, uffd, base, granule) =
            (&self.shared, &self.uffd, &self.region_base, self.granule);
        scan_regions(pm, &self.regions, &mut self.scan_buf, scan, |ri, r, pr| {
            // Every write after the reset and the protect is also an
            // access, so a page that is soft-dirty but not accessed was
            // written before (at most in the first interval).
            if pr.categories & pagemap::PAGE_IS_ACCESSED == 0 {
                return Ok(());
            }
            let written = pr.categories & pagemap::PAGE_IS_SOFT_DIRTY != 0;
            if pr.categories & pagemap::PAGE_IS_HUGE != 0 {
                // A transparent huge page: protected and reported per PMD.
                shared
                    .counters
                    .huge_accessed_bytes
                    .fetch_add(pr.end - pr.start, Relaxed);
            }
            let mut a = pr.start - (pr.start - r.host_addr) % granule;
            while a < pr.end {
                shared.record(
                    base[ri] + ((a - r.host_addr) / granule) as usize,
                    e,
                    written,
                );
                a += granule;
            }
            uffd.rw_protect(pr.start, pr.end - pr.start, true)?;
            Ok(())
        })
    }

    fn harvest_wp_async(&mut self, e: u32) -> io::Result<()> {
        let Some(pm) = self.pagemap.as_ref() else {
            return Ok(());
        };
        let scan = pagemap::Scan {
            category_inverted: 0,
            flags: pagemap::PM_SCAN_WP_MATCHING | pagemap::PM_SCAN_CHECK_WPASYNC,
            category_mask: pagemap::PAGE_IS_WRITTEN,
            category_anyof_mask: 0,
            return_mask: pagemap::PAGE_IS_WRITTEN | pagemap::PAGE_IS_HUGE,
        };
        let (shared, base, granule) = (&self.shared, &self.region_base, self.granule);
        scan_regions(pm, &self.regions, &mut self.scan_buf, scan, |ri, r, pr| {
            if pr.categories & pagemap::PAGE_IS_HUGE != 0 {
                // A transparent huge page: the kernel tracks it per PMD.
                shared
                    .counters
                    .huge_written_bytes
                    .fetch_add(pr.end - pr.start, Relaxed);
            }
            let mut a = pr.start;
            while a < pr.end {
                shared.record(base[ri] + ((a - r.host_addr) / granule) as usize, e, true);
                a += granule;
            }
            Ok(())
        })
    }

    /// Take every watched granule that was accessed since it was last armed
    /// back into custody (or mark it armed if it is a hole).
    /// Arm the watched granules accessed since they were last armed, at the
    /// tick closing epoch `e`. Under a fault budget, granules already known
    /// hot are re-armed in turn, a `stride`-th of them each interval (each
    /// at least every `max_stride` intervals); granules never accessed are
    /// always armed, so a new access is seen in the interval it happens.
    fn rearm_access(&mut self, e: u32) -> io::Result<()> {
        let sampled = !self.armed_tick.is_empty();
        let stride = if sampled {
            let hot = self
                .sample
                .iter()
                .filter(|&&g| {
                    let g = g as usize;
                    self.slot_of[g] == UNARMED
                        && !self.removed[g]
                        && self.shared.access_epoch(g) != NEVER
                })
                .count() as u32;
            rearm_stride(hot, self.fault_budget, self.interval_ms, self.max_stride)
        } else {
            1
        };
        self.shared.set_stride(stride);
        self.strata = Strata::default();
        let next = (e + 1) << 1;
        for i in 0..self.sample.len() {
            let g = self.sample[i] as usize;
            if self.slot_of[g] != UNARMED || self.removed[g] {
                continue;
            }
            let a = self.shared.access_epoch(g);
            let hot = sampled && a != NEVER;
            if hot
                && stride > 1
                && !(i as u32).wrapping_add(e).is_multiple_of(stride)
                && e + 1 - a < stride
            {
                self.armed_tick[g] = next | 1;
                self.strata.skipped += 1;
                continue;
            }
            match self.evict(g)? {
                Evict::Full => {
                    self.shared.counters.custody_full.fetch_add(1, Relaxed);
                    break;
                }
                Evict::Saved => {
                    self.shared.counters.sampled_pages.fetch_add(1, Relaxed);
                }
                Evict::Hole | Evict::Kept => {}
            }
            if hot {
                self.armed_tick[g] = next;
                self.strata.rearmed += 1;
            }
        }
        Ok(())
    }

    /// Save granule `g` into custody and punch its hole.
    fn evict(&mut self, g: usize) -> io::Result<Evict> {
        let off = self.file_offset(g);
        let ga = self.granule_addr(g);
        let mfd = self
            .memory_fd
            .as_ref()
            .expect("custody without memory fd")
            .as_raw_fd();
        // A hole faults on its next access anyway: armed for free.
        if !self.hugetlbfs && !self.file_has_data(off) {
            self.slot_of[g] = ARMED_HOLE;
            return Ok(Evict::Hole);
        }
        let rwp = matches!(self.plan.access, Access::Rwp { .. });
        let custody = self.custody.as_mut().expect("eviction without custody");
        let Some(slot) = custody.take() else {
            if let Some(e) = custody.take_reserve_error()
                && self.custody_stuck.is_none()
            {
                self.custody_stuck = Some(custody.reserved());
                tracing::warn!(
                    vm = %self.name,
                    file = %custody.path().display(),
                    held = custody.in_use(),
                    error = %e,
                    "custody file cannot grow: custody is full until its filesystem has room \
                     (pages stay in guest memory; tracking is coarser). Free space in the \
                     state directory or lower --custody-max-bytes"
                );
            }
            return Ok(Evict::Full);
        };
        if self.custody_stuck.is_some_and(|r| custody.reserved() > r) {
            self.custody_stuck = None;
            tracing::info!(vm = %self.name, "custody file grows again");
        }
        // 1. Freeze: from here a guest write waits on a WP fault we serve
        // later. Under RWP the page is frozen already: it is protected (not
        // accessed since the last harvest) and the harvest runs in sync mode.
        if !rwp && self.uffd.write_protect(ga, self.granule, true, true)? == Resolve::Gone {
            custody.release(slot);
            return Ok(Evict::Kept);
        }
        // 2. Save the granule into the custody file.
        let dst = custody.slot_ptr(slot);
        let mut done = 0usize;
        while done < self.granule as usize {
            // SAFETY: `dst` is valid for `granule` bytes; reading the rest of it.
            let n = unsafe {
                libc::pread(
                    mfd,
                    dst.add(done).cast(),
                    self.granule as usize - done,
                    (off + done as u64) as libc::off_t,
                )
            };
            if n <= 0 {
                let err = io::Error::last_os_error();
                custody.release(slot);
                return Err(io::Error::new(
                    err.kind(),
                    format!("saving page at offset {off:#x}: {err}"),
                ));
            }
            done += n as usize;
        }
        custody.commit(slot, off);
        // 3. Punch: the next access faults MISSING and gets the page back.
        // SAFETY: fallocate on our memfd with constant flags.
        let rc = unsafe {
            libc::fallocate(
                mfd,
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                off as libc::off_t,
                self.granule as libc::off_t,
            )
        };
        if rc != 0 {
            // The page is still there: nothing lost, but this granule is not armed.
            let err = io::Error::last_os_error();
            custody.release(slot);
            return Err(io::Error::new(
                err.kind(),
                format!("punching page at offset {off:#x}: {err}"),
            ));
        }
        // A part of a large folio the kernel could not split is zeroed in
        // place rather than punched: no fault would bring the page back, so
        // put the saved copy back at once.
        if !self.hugetlbfs && self.file_has_data(off) {
            self.write_back(g, slot).map_err(|e| {
                io::Error::new(
                    e.kind(),
                    format!("page at offset {off:#x} was zeroed, not punched, and putting it back failed: {e}"),
                )
            })?;
            self.custody.as_mut().expect("custody").release(slot);
            self.shared.counters.unpunchable_pages.fetch_add(1, Relaxed);
            return Ok(Evict::Kept);
        }
        self.slot_of[g] = slot;
        self.shared.counters.pages_in_custody.fetch_add(1, Relaxed);
        Ok(Evict::Saved)
    }

    /// RWP eviction, inside the harvest's freeze: every present page not
    /// accessed for `evict_after` intervals is saved to custody and punched
    /// out of the memory file. Such a page is still protected (the harvest
    /// found it not accessed) and the uffd is in sync mode, so a guest
    /// access to it waits for this thread and is served right after the
    /// tick, from custody.
    fn evict_cold(&mut self, e: u32) -> io::Result<()> {
        let after = self.plan.evict_after;
        if after == 0 || self.custody.is_none() {
            return Ok(());
        }
        let Some(pm) = self.pagemap.take() else {
            return Ok(());
        };
        let mut buf = std::mem::take(&mut self.scan_buf);
        let r = self.evict_cold_in(&pm, &mut buf, e, after);
        self.scan_buf = buf;
        self.pagemap = Some(pm);
        r
    }

    fn evict_cold_in(
        &mut self,
        pm: &File,
        buf: &mut [pagemap::PageRegion],
        e: u32,
        after: u32,
    ) -> io::Result<()> {
        // Present and not accessed (the accessed ones were re-protected by
        // the harvest, but their last access is this epoch).
        let scan = pagemap::Scan {
            flags: 0,
            category_inverted: pagemap::PAGE_IS_ACCESSED,
            category_mask: pagemap::PAGE_IS_PRESENT | pagemap::PAGE_IS_ACCESSED,
            category_anyof_mask: 0,
            return_mask: pagemap::PAGE_IS_HUGE,
        };
        for ri in 0..self.regions.len() {
            let (base, len) = (self.regions[ri].host_addr, self.regions[ri].len);
            let mut start = base;
            while start < base + len {
                let (n, walk_end) = match pagemap::scan(pm.as_fd(), start, base + len, scan, buf) {
                    Err(err) if err.raw_os_error() == Some(libc::ESRCH) => return Ok(()),
                    r => r?,
                };
                for pr in &buf[..n] {
                    // A transparent huge page is not split to evict a part
                    // of it (hugetlbfs pages are the granule itself).
                    if pr.categories & pagemap::PAGE_IS_HUGE != 0 && !self.hugetlbfs {
                        continue;
                    }
                    let mut a = pr.start - (pr.start - base) % self.granule;
                    while a < pr.end {
                        let g = self.region_base[ri] + ((a - base) / self.granule) as usize;
                        a += self.granule;
                        if self.slot_of[g] < ARMED_HOLE
                            || e.wrapping_sub(self.shared.access_epoch(g)) < after
                        {
                            continue;
                        }
                        match self.evict(g)? {
                            Evict::Saved => {
                                self.shared.counters.evicted_pages.fetch_add(1, Relaxed);
                            }
                            Evict::Full => {
                                self.shared.counters.custody_full.fetch_add(1, Relaxed);
                                return Ok(());
                            }
                            Evict::Hole | Evict::Kept => {}
                        }
                    }
                }
                if walk_end <= start {
                    break;
                }
                start = walk_end;
            }
        }
        Ok(())
    }

    fn granule_addr(&self, g: usize) -> u64 {
        let (r, within) = self.region_of(g);
        r.host_addr + within
    }

    /// Leave the guest as if we had never been there: every page in custody
    /// back, the snapshot's unserved pages populated, protection removed,
    /// ranges unregistered. Returns pages that could not be put back.
    fn release(&mut self, vmm_alive: bool) -> u32 {
        let mut left = 0;
        let granules = self.slot_of.len();
        for g in 0..granules {
            let Some(slot) = self.custody_slot(g) else {
                continue;
            };
            let ga = self.granule_addr(g);
            let put_back = vmm_alive && {
                let custody = self.custody.as_ref().expect("custody");
                // SAFETY: the slot pointer is valid for one granule.
                let r = unsafe {
                    self.uffd
                        .copy(ga, custody.slot_ptr(slot), self.granule, false)
                };
                matches!(r, Ok(Resolve::Done | Resolve::Exists))
            };
            // Without the VMM (or if the copy failed), write the page into the
            // memory file itself so the data outlives us.
            let ok = put_back || self.write_back(g, slot).is_ok();
            if ok {
                self.slot_home(g, slot);
            } else {
                left += 1;
            }
        }
        if vmm_alive {
            if self.source.is_some() {
                self.populate_unserved();
            }
            let rwp = matches!(self.plan.access, Access::Rwp { .. });
            for r in &self.regions {
                if rwp {
                    let _ = self.uffd.rw_protect(r.host_addr, r.len, false);
                } else {
                    let _ = self.uffd.write_protect(r.host_addr, r.len, false, false);
                }
                let _ = self.uffd.unregister(r.host_addr, r.len);
            }
        }
        if let Some(c) = &self.custody {
            let _ = c.remove_if_empty();
        }
        left
    }

    fn write_back(&self, g: usize, slot: u32) -> io::Result<()> {
        let Some(mfd) = &self.memory_fd else {
            return Err(io::Error::other("no memory fd"));
        };
        let custody = self.custody.as_ref().expect("custody");
        let off = self.file_offset(g);
        // SAFETY: the slot pointer is valid for `granule` bytes.
        let buf =
            unsafe { std::slice::from_raw_parts(custody.slot_ptr(slot), self.granule as usize) };
        use std::os::unix::fs::FileExt;
        let f = std::mem::ManuallyDrop::new(
            // SAFETY: borrowing our memfd as a File without taking ownership.
            unsafe { File::from_raw_fd(mfd.as_raw_fd()) },
        );
        f.write_all_at(buf, off)
    }

    /// Before unregistering a snapshot-backed VM, copy in every page it has
    /// not touched yet: once unregistered, the kernel would zero-fill them.
    fn populate_unserved(&mut self) {
        let Some(src) = &self.source else { return };
        for g in 0..self.served.len() {
            if self.served[g] || self.removed[g] {
                continue;
            }
            let off = self.file_offset(g) as usize;
            if off + self.granule as usize > src.len {
                continue;
            }
            let ga = self.granule_addr(g);
            // SAFETY: in bounds of the snapshot mapping (checked above).
            let _ = unsafe { self.uffd.copy_dontwake(ga, src.ptr.add(off), self.granule) };
        }
        for r in &self.regions {
            let _ = self.uffd.wake(r.host_addr, r.len);
        }
    }
}

/// PAGEMAP_SCAN every region with `scan`, calling `each(region index,
/// region, page run)` for every run reported. A VMM that is gone ends the
/// scan quietly (its pidfd says so).
fn scan_regions(
    pm: &File,
    regions: &[Region],
    buf: &mut [pagemap::PageRegion],
    scan: pagemap::Scan,
    mut each: impl FnMut(usize, &Region, &pagemap::PageRegion) -> io::Result<()>,
) -> io::Result<()> {
    for (ri, r) in regions.iter().enumerate() {
        let end = r.host_addr + r.len;
        match pagemap::scan_all(pm.as_fd(), r.host_addr, end, scan, buf, |pr| {
            each(ri, r, pr)
        }) {
            Err(e) if e.raw_os_error() == Some(libc::ESRCH) => return Ok(()),
            other => other?,
        }
    }
    Ok(())
}

fn on_hugetlbfs(fd: RawFd) -> bool {
    const HUGETLBFS_MAGIC: libc::__fsword_t = 0x9584_58f6;
    // SAFETY: a zeroed statfs is a valid out-parameter for fstatfs.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: fstatfs writes one statfs.
    unsafe { libc::fstatfs(fd, &mut st) == 0 && st.f_type == HUGETLBFS_MAGIC }
}

fn nix_fstat(fd: RawFd) -> io::Result<(u64, u64)> {
    // SAFETY: a zeroed stat is a valid out-parameter for fstat.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: fstat writes one stat.
    if unsafe { libc::fstat(fd, &mut st) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok((st.st_dev, st.st_ino))
}

// SAFETY: the source mapping is read-only and owned by the tracker; it moves
// to the tracker thread with it and is used only there.
unsafe impl Send for SourceMap {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn region_map_locates_and_bounds_ranges() {
        let regions = [
            Region {
                host_addr: 0x10000,
                len: 0x3000,
                file_offset: 0,
            },
            Region {
                host_addr: 0x20000,
                len: 0x2000,
                file_offset: 0x3000,
            },
        ];
        let m = RegionMap::new(&regions, 0x1000);
        assert_eq!(m.granules(), 5);
        assert_eq!(m.locate(0x10fff), Some((0, 0x10000)));
        assert_eq!(m.locate(0x12abc), Some((2, 0x12000)));
        assert_eq!(m.locate(0x13000), None);
        assert_eq!(m.locate(0x21000), Some((4, 0x21000)));
        assert_eq!(m.locate(u64::MAX), None);
        assert_eq!(m.granule_addr(3), 0x20000);
        // Wholly inside only; a huge range is no more work than the VM.
        let w: Vec<usize> = m.wholly_within(0x10800, 0x21000).collect();
        assert_eq!(w, vec![1, 2, 3]);
        assert_eq!(m.wholly_within(0, u64::MAX).count(), 5);
        assert_eq!(m.wholly_within(0x21000, 0x20000).count(), 0);
        assert_eq!(m.wholly_within(0x10000, 0x10fff).count(), 0);
    }

    #[test]
    fn stride_keeps_hot_faults_within_the_budget() {
        // No budget, or nothing hot: every interval.
        assert_eq!(rearm_stride(1000, 0, 2000, 4), 1);
        assert_eq!(rearm_stride(0, 32, 2000, 4), 1);
        // 64 faults fit a 2 s interval at 32/s.
        assert_eq!(rearm_stride(64, 32, 2000, 4), 1);
        assert_eq!(rearm_stride(65, 32, 2000, 4), 2);
        assert_eq!(rearm_stride(192, 32, 2000, 4), 3);
        // Never beyond the cap, whatever the hot set.
        assert_eq!(rearm_stride(100_000, 32, 2000, 4), 4);
        // A budget below one fault per interval still allows one.
        assert_eq!(rearm_stride(3, 1, 100, 8), 3);
    }

    #[test]
    fn unwatched_granules_are_estimated_from_the_rearmed() {
        let none = Strata::default();
        assert_eq!(none.unseen(), (0, 0));
        // Half the re-armed ones were read, a quarter written: 300 skipped
        // -> 150 read and 75 written, less the 10 and 5 seen anyway.
        let s = Strata {
            rearmed: 100,
            skipped: 300,
            rearmed_accessed: 50,
            rearmed_written: 25,
            skipped_accessed: 10,
            skipped_written: 5,
        };
        assert_eq!(s.unseen(), (140, 70));
        // Nothing re-armed: the skipped ones are taken as still hot.
        let s = Strata {
            skipped: 40,
            skipped_written: 3,
            ..Strata::default()
        };
        assert_eq!(s.unseen(), (40, 0));
    }

    #[test]
    fn sample_is_distinct_sorted_and_deterministic() {
        let s = draw_sample(1000, 100, 42);
        assert_eq!(s.len(), 100);
        assert!(s.windows(2).all(|w| w[0] < w[1]));
        assert!(s.iter().all(|&g| g < 1000));
        assert_eq!(s, draw_sample(1000, 100, 42));
        assert_ne!(s, draw_sample(1000, 100, 43));
        assert_eq!(draw_sample(10, 50, 1), (0..10).collect::<Vec<_>>());
    }
}
