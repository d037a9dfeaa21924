//! The fault path does not allocate: while the tracker serves thousands of
//! faults and runs its interval ticks (re-arming and evicting pages), the
//! process makes no heap allocation at all. The toucher thread only loads
//! and stores, and the test thread only sleeps, during the measured window.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

mod common;
use common::GuestMemory;
use wset_tracker::plan::{AccessMode, BackingKind};
use wset_tracker::{TrackerHandle, TrackerSpec};

struct Counting;
static ALLOCS: AtomicU64 = AtomicU64::new(0);

// SAFETY: forwards to the system allocator and only counts.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: same contract as ours.
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        // SAFETY: same contract as ours.
        unsafe { System.dealloc(p, l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, n: usize) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: same contract as ours.
        unsafe { System.realloc(p, l, n) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

#[test]
fn serving_faults_and_ticks_allocates_nothing() {
    const PAGES: usize = 1024;
    let mem: GuestMemory = common::memfd(PAGES);
    let memfd = mem.memfd().expect("memfd");
    let base = mem.addr() as usize;
    for i in 0..PAGES {
        // SAFETY: in bounds of the mapping.
        unsafe { *((base + i * 4096) as *mut u64) = i as u64 };
    }
    let (uffd, p) = common::planned_uffd(BackingKind::Shmem, AccessMode::Exhaustive, PAGES);
    let dir = std::env::temp_dir().join(format!("wset-noalloc-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let memory_fd = Some(memfd.try_clone().unwrap());
    let custody = Some(dir.join("vm.custody"));
    let spec = common::spec(uffd, &mem, p, Duration::from_millis(50), memory_fd, custody);
    let h = TrackerHandle::spawn(TrackerSpec {
        cpu: None,
        spin: Duration::ZERO,
        ..spec
    })
    .unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let go = Arc::new(AtomicBool::new(false));
    let (s2, g2) = (stop.clone(), go.clone());
    let toucher = std::thread::spawn(move || {
        let mut sum = 0u64;
        while !s2.load(Ordering::Relaxed) {
            if g2.load(Ordering::Relaxed) {
                for i in 0..PAGES {
                    // SAFETY: in bounds; volatile so every access happens.
                    sum = sum.wrapping_add(unsafe {
                        std::ptr::read_volatile((base + i * 4096) as *const u64)
                    });
                    if i % 4 == 0 {
                        // SAFETY: in bounds.
                        unsafe { std::ptr::write_volatile((base + i * 4096 + 8) as *mut u64, sum) };
                    }
                }
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        sum
    });
    // Let start-up allocations settle, then measure a window of pure work.
    std::thread::sleep(Duration::from_millis(300));
    let faults0 = h.shared().counters.faults_handled.load(Ordering::Relaxed);
    let ticks0 = h.shared().counters.harvests.load(Ordering::Relaxed);
    let before = ALLOCS.load(Ordering::Relaxed);
    go.store(true, Ordering::Relaxed);
    std::thread::sleep(Duration::from_millis(1000));
    go.store(false, Ordering::Relaxed);
    std::thread::sleep(Duration::from_millis(60));
    let after = ALLOCS.load(Ordering::Relaxed);
    let faults = h.shared().counters.faults_handled.load(Ordering::Relaxed) - faults0;
    let ticks = h.shared().counters.harvests.load(Ordering::Relaxed) - ticks0;
    stop.store(true, Ordering::Relaxed);
    toucher.join().unwrap();
    h.stop();
    std::fs::remove_dir_all(&dir).unwrap();
    assert!(
        faults > 2000 && ticks >= 10,
        "too little work to judge: {faults} faults, {ticks} ticks"
    );
    assert_eq!(
        after - before,
        0,
        "{} allocations while serving {faults} faults over {ticks} ticks",
        after - before
    );
}
