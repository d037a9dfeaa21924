//! Test memory shared by the tracker's real-kernel tests and benchmarks:
//! anonymous or memfd-backed mappings that unmap themselves.

#![allow(dead_code)]

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::PathBuf;
use std::time::Duration;

use wset_tracker::plan::{self, AccessMode, BackingKind, PlanInput};
use wset_tracker::{Plan, Region, TrackerSpec, Uffd};

pub const PAGE: u64 = 4096;

/// A mapping of `len` bytes, private anonymous or shared over a memfd.
pub struct Mem {
    pub ptr: *mut u8,
    pub len: usize,
    pub memfd: Option<OwnedFd>,
}

// SAFETY: test memory shared between toucher threads and checks; every
// access is a volatile load or store of plain bytes.
unsafe impl Send for Mem {}
// SAFETY: as above.
unsafe impl Sync for Mem {}

impl Mem {
    pub fn anon(pages: usize) -> Self {
        Self::map(pages, None)
    }

    pub fn memfd(pages: usize) -> Self {
        let len = pages * PAGE as usize;
        // SAFETY: memfd_create with a static name.
        let fd = unsafe { libc::memfd_create(c"wset-test".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
        // SAFETY: a fresh fd that nobody else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: sizing our own memfd.
        assert_eq!(unsafe { libc::ftruncate(fd.as_raw_fd(), len as i64) }, 0);
        Self::map(pages, Some(fd))
    }

    fn map(pages: usize, fd: Option<OwnedFd>) -> Self {
        let len = pages * PAGE as usize;
        let (flags, raw) = match &fd {
            Some(f) => (libc::MAP_SHARED, f.as_raw_fd()),
            None => (libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, -1),
        };
        // SAFETY: a fresh mapping, anonymous or of our own memfd.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                flags,
                raw,
                0,
            )
        };
        assert_ne!(
            p,
            libc::MAP_FAILED,
            "mmap: {}",
            std::io::Error::last_os_error()
        );
        Self {
            ptr: p.cast(),
            len,
            memfd: fd,
        }
    }

    pub fn addr(&self) -> u64 {
        self.ptr as u64
    }
}

impl Drop for Mem {
    fn drop(&mut self) {
        // SAFETY: unmapping our own mapping.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

/// A tracker over all of `mem` in this process, pinned to CPU 0 with the
/// agent's default busy-poll; tests override fields with struct update.
pub fn spec(
    uffd: Uffd,
    mem: &Mem,
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
            len: mem.len as u64,
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
        custody_granules: (mem.len as u64 / PAGE) as u32,
        seed: 7,
        started_ms: 0,
        fault_budget: 0,
        max_stride: 1,
        wake_waiters: false,
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
    });
    (uffd, p)
}
