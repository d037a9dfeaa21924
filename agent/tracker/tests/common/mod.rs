//! What the tracker's real-kernel tests and benchmarks share: their memory
//! (`wset_guest::memory`, the one helper the end-to-end guests use too),
//! a tracker spec over it, and a uffd made as the agent makes it.

#![allow(dead_code)]

use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::time::Duration;

use wset_tracker::plan::{self, AccessMode, BackingKind, PlanInput};
use wset_tracker::{Plan, Region, TrackerSpec, Uffd};

pub use wset_guest::memory::{BackingArg, Expected, GuestMemory, PAGE};

/// `pages` pages of private anonymous memory (the guest crate's memory,
/// as the test VMMs map it).
pub fn anon(pages: usize) -> GuestMemory {
    GuestMemory::new(BackingArg::Anon, pages * PAGE as usize).expect("map anonymous memory")
}

/// `pages` pages of memory shared over a memfd.
pub fn memfd(pages: usize) -> GuestMemory {
    GuestMemory::new(BackingArg::Memfd, pages * PAGE as usize).expect("map memfd memory")
}

/// What memory filled with `seed` holds once each `(page, value)` of
/// `written` has had its first dword set to `value`.
pub fn filled(seed: u32, written: impl IntoIterator<Item = (u32, u32)>) -> Expected {
    Expected {
        fill_seed: Some(seed),
        overrides: written.into_iter().collect(),
        ..Default::default()
    }
}

/// A tracker over all of `mem` in this process, pinned to CPU 0 with the
/// agent's default busy-poll; tests override fields with struct update.
pub fn spec(
    uffd: Uffd,
    mem: &GuestMemory,
    plan: Plan,
    interval: Duration,
    memory_fd: Option<OwnedFd>,
    custody: Option<PathBuf>,
) -> TrackerSpec {
    TrackerSpec {
        name: "wset-test".into(),
        uffd,
        regions: vec![Region {
            host_addr: mem.addr(),
            len: mem.len() as u64,
            file_offset: 0,
        }],
        granule_bytes: PAGE,
        plan,
        memory_fd,
        source: None,
        pid: std::process::id() as i32,
        interval,
        cpu: Some(0),
        spin: Duration::from_micros(200),
        custody_path: custody,
        custody_granules: (mem.len() as u64 / PAGE) as u32,
        seed: 7,
        started_ms: 0,
        fault_budget: 0,
        max_stride: 1,
        wake_waiters: false,
        prefetch: Vec::new(),
        probes: Vec::new(),
        record: None,
    }
}

/// A uffd created the way the agent recommends for `backing` (the VMM keeps
/// it, and passes the memfd for shmem), and the plan the agent would make.
pub fn planned_uffd(
    backing: BackingKind,
    access_mode: AccessMode,
    granules: usize,
) -> (Uffd, Plan) {
    let offered = Uffd::kernel_features().expect("userfaultfd unavailable: run the tests as root");
    let uffd = Uffd::create(plan::recommended_features(offered, backing)).unwrap();
    let features = uffd.features().unwrap();
    let p = plan::plan(PlanInput {
        features,
        offered: features,
        rwp: wset_tracker::RwpMode::Async,
        backing,
        access_mode,
        vmm_holds_uffd: true,
        have_memory_fd: backing != BackingKind::Anonymous,
        granules: granules as u32,
        custody_granules: granules as u32,
        exact_dirty: false,
        evict_after: 0,
        soft_dirty: true,
        missing_registered: false,
        sync_write_protect: false,
    });
    (uffd, p)
}
