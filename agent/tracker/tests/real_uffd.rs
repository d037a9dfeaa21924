//! The tracker against the real kernel, in one process: a thread plays the
//! guest and touches memory in a known pattern while the tracker thread
//! serves its faults. Needs /dev/userfaultfd (or the syscall) as root.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use wset_tracker::plan::{self, AccessMode, BackingKind, PlanInput};
use wset_tracker::summary::{SummaryConfig, summarize};
use wset_tracker::uffd::{feature, mode};
use wset_tracker::{TrackerHandle, TrackerState, Uffd};

const INTERVAL: Duration = Duration::from_millis(100);

mod common;
use common::{GuestMemory, PAGE};

fn cfg() -> SummaryConfig {
    // Windows of 2 and 5 intervals.
    SummaryConfig {
        windows_ms: vec![200, 500],
        age_buckets_ms: vec![0, 200, 500],
        heat_slices: 4,
    }
}

fn wait_epochs(h: &TrackerHandle, n: u32) {
    let start = h.shared().epoch();
    let deadline = Instant::now() + INTERVAL * (n + 20);
    while h.shared().epoch() < start + n {
        assert!(
            Instant::now() < deadline,
            "tracker epochs stalled at {}",
            h.shared().epoch()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Keep touching `pages` (reads, or writes of `v`) until told to stop.
fn toucher(
    mem: Arc<GuestMemory>,
    pages: std::ops::Range<usize>,
    write: Option<u32>,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        while !stop.load(Ordering::Relaxed) {
            for p in pages.clone() {
                match write {
                    Some(v) => mem.write_u32(p as u64 * PAGE, v),
                    None => {
                        std::hint::black_box(mem.read_u32(p as u64 * PAGE));
                    }
                }
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    })
}

fn custody_dir(name: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("wset-rt-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[test]
fn anonymous_first_touch_and_wp_async_dirty_are_exact() {
    let offered = Uffd::kernel_features().expect("userfaultfd: run as root");
    assert!(
        offered & feature::WP_ASYNC != 0,
        "kernel lacks WP_ASYNC (6.7+): {offered:#x}"
    );
    let mem = Arc::new(common::anon(256));
    let (uffd, p) = common::planned_uffd(BackingKind::Anonymous, AccessMode::Off, 256);
    assert_eq!(p.dirty, wset_tracker::Dirty::WpAsync);
    let h =
        TrackerHandle::spawn(common::spec(uffd, &mem, p.clone(), INTERVAL, None, None)).unwrap();
    // Phase 1: read pages 0..100, write 100..150 (first touches).
    for pg in 0..100 {
        assert_eq!(mem.read_u32(pg as u64 * PAGE), 0);
    }
    for pg in 100..150 {
        mem.write_u32(pg as u64 * PAGE, 0xAA);
    }
    wait_epochs(&h, 2);
    let s = summarize(h.shared(), &p, &cfg(), 0);
    assert_eq!(s.touched_bytes, 150 * PAGE);
    assert_eq!(s.windows[1].dirty_bytes, 50 * PAGE);
    // Phase 2: keep writing 10 pages that are already present: only WP_ASYNC sees these.
    let stop = Arc::new(AtomicBool::new(false));
    let t = toucher(mem.clone(), 0..10, Some(0xBB), stop.clone());
    wait_epochs(&h, 4);
    let s = summarize(h.shared(), &p, &cfg(), 0);
    stop.store(true, Ordering::Relaxed);
    t.join().unwrap();
    // Last 2 intervals: exactly the 10 pages written.
    assert_eq!(s.windows[0].dirty_bytes, 10 * PAGE, "{s:#?}");
    assert_eq!(s.windows[0].wss_bytes, 10 * PAGE, "{s:#?}");
    assert!(s.error.lower_bound);
    let r = h.stop();
    assert_eq!(r.state, TrackerState::Stopped);
    // After release the memory is ordinary again, and intact.
    for pg in 0..10 {
        assert_eq!(mem.read_u32(pg as u64 * PAGE), 0xBB);
    }
    for pg in 100..150 {
        assert_eq!(mem.read_u32(pg as u64 * PAGE), 0xAA);
    }
}

#[test]
fn heat_follows_the_regions_order_not_their_addresses() {
    // Four regions of 16 pages mapped top-down, as VMMs often map them:
    // the guest's first region is the VMM's highest addresses.
    let mem = Arc::new(common::anon(64));
    let (uffd, p) = common::planned_uffd(BackingKind::Anonymous, AccessMode::Off, 64);
    let quarter = 16 * PAGE;
    let regions = (0..4)
        .map(|i| wset_tracker::Region {
            host_addr: mem.addr() + (3 - i) * quarter,
            len: quarter,
            file_offset: i * quarter,
        })
        .collect();
    let h = TrackerHandle::spawn(wset_tracker::TrackerSpec {
        regions,
        ..common::spec(uffd, &mem, p.clone(), INTERVAL, None, None)
    })
    .unwrap();
    // The whole of the guest's first region, and one page of its third.
    for pg in 48..64 {
        mem.write_u32(pg * PAGE, 1);
    }
    mem.write_u32(20 * PAGE, 1);
    wait_epochs(&h, 2);
    let s = summarize(h.shared(), &p, &cfg(), 0);
    let heat: Vec<(u64, u64)> = s
        .regions
        .iter()
        .map(|r| (r.offset_bytes / PAGE, r.accessed_bytes / PAGE))
        .collect();
    assert_eq!(heat, [(0, 16), (16, 0), (32, 1), (48, 0)], "{s:#?}");
    h.stop();
}

/// The plan for a uffd made as Firecracker makes it (only EVENT_REMOVE
/// requested, so no WP_ASYNC): soft-dirty bits by default, sync
/// write-protect when asked for.
fn firecracker_style(sync_write_protect: bool) -> (Uffd, wset_tracker::Plan) {
    let uffd = Uffd::create(feature::EVENT_REMOVE).unwrap();
    let features = uffd.features().unwrap();
    let p = plan::plan(PlanInput {
        features,
        offered: features,
        rwp: wset_tracker::RwpMode::Async,
        backing: BackingKind::Anonymous,
        access_mode: AccessMode::Sampled { granules: 16 },
        vmm_holds_uffd: true,
        have_memory_fd: false,
        granules: 64,
        custody_granules: 64,
        exact_dirty: false,
        evict_after: 0,
        soft_dirty: wset_tracker::sys::soft_dirty_supported(),
        missing_registered: true,
        sync_write_protect,
    });
    (uffd, p)
}

/// Writes to present pages, seen every interval; then the memory is intact.
fn writes_of_present_pages_are_seen(
    h: &TrackerHandle,
    mem: &Arc<GuestMemory>,
    p: &wset_tracker::Plan,
) {
    let stop = Arc::new(AtomicBool::new(false));
    let t = toucher(mem.clone(), 20..30, Some(7), stop.clone());
    wait_epochs(h, 3);
    let s = summarize(h.shared(), p, &cfg(), 0);
    stop.store(true, Ordering::Relaxed);
    t.join().unwrap();
    assert_eq!(s.windows[0].dirty_bytes, 10 * PAGE, "{s:#?}");
}

/// By default no write to a Firecracker VM's memory waits for the tracker:
/// no write-protect is registered, and writes come from soft-dirty bits
/// where the kernel keeps them (exact; proven in the kernel lane, whose
/// kernel has them) or are not tracked where it does not.
#[test]
fn firecracker_style_uffd_never_write_protects_by_default() {
    let soft_dirty = wset_tracker::sys::soft_dirty_supported();
    let mem = Arc::new(common::anon(64));
    let (uffd, p) = firecracker_style(false);
    let want = if soft_dirty {
        wset_tracker::Dirty::SoftDirty
    } else {
        wset_tracker::Dirty::None
    };
    assert_eq!(p.dirty, want, "{:?}", p.notes);
    assert_eq!(
        p.register_mode,
        mode::MISSING,
        "no write-protect registered"
    );
    assert!(
        p.notes
            .iter()
            .any(|n| n.contains("no write waits for the agent")),
        "{:?}",
        p.notes
    );
    let h =
        TrackerHandle::spawn(common::spec(uffd, &mem, p.clone(), INTERVAL, None, None)).unwrap();
    for pg in 0..32 {
        assert_eq!(mem.read_u32(pg * PAGE), 0);
    }
    for pg in 32..64 {
        mem.write_u32(pg * PAGE, pg as u32);
    }
    wait_epochs(&h, 3);
    let s = summarize(h.shared(), &p, &cfg(), 0);
    assert_eq!(s.touched_bytes, 64 * PAGE, "{s:#?}");
    // First touches by a write are seen whatever the method.
    assert_eq!(s.windows[1].dirty_bytes, 32 * PAGE, "{s:#?}");
    let stop = Arc::new(AtomicBool::new(false));
    let t = toucher(mem.clone(), 20..30, Some(7), stop.clone());
    wait_epochs(&h, 3);
    let s = summarize(h.shared(), &p, &cfg(), 0);
    stop.store(true, Ordering::Relaxed);
    t.join().unwrap();
    let seen = if soft_dirty { 10 * PAGE } else { 0 };
    assert_eq!(s.windows[0].dirty_bytes, seen, "{s:#?}");
    let c = &h.shared().counters;
    assert_eq!(
        c.wp_faults.load(Ordering::Relaxed),
        0,
        "no write waited for the tracker"
    );
    h.stop();
    assert_eq!(mem.read_u32(25 * PAGE), 7);
    assert_eq!(mem.read_u32(63 * PAGE), 63);
}

#[test]
fn firecracker_style_uffd_gets_sync_wp_when_asked() {
    let mem = Arc::new(common::anon(64));
    let (uffd, p) = firecracker_style(true);
    assert_eq!(p.dirty, wset_tracker::Dirty::WpSync);
    let h =
        TrackerHandle::spawn(common::spec(uffd, &mem, p.clone(), INTERVAL, None, None)).unwrap();
    for pg in 0..64 {
        mem.write_u32(pg as u64 * PAGE, pg as u32);
    }
    wait_epochs(&h, 6);
    writes_of_present_pages_are_seen(&h, &mem, &p);
    assert!(h.shared().counters.wp_faults.load(Ordering::Relaxed) >= 10);
    h.stop();
    assert_eq!(mem.read_u32(25 * PAGE), 7);
    assert_eq!(mem.read_u32(63 * PAGE), 63);
}

fn shmem_tracker(
    pages: usize,
    mode: AccessMode,
    name: &str,
) -> (
    Arc<GuestMemory>,
    TrackerHandle,
    plan::Plan,
    std::path::PathBuf,
) {
    let mem = Arc::new(common::memfd(pages));
    mem.fill(0x1234, 0, mem.pages());
    let (uffd, p) = common::planned_uffd(BackingKind::Shmem, mode, pages);
    let dir = custody_dir(name);
    let memfd = mem.memfd().unwrap().try_clone().unwrap();
    let custody = Some(dir.join("vm.custody"));
    let h = TrackerHandle::spawn(common::spec(
        uffd,
        &mem,
        p.clone(),
        INTERVAL,
        Some(memfd),
        custody,
    ))
    .unwrap();
    (mem, h, p, dir)
}

#[test]
fn shmem_exhaustive_sees_reads_and_writes_and_loses_nothing() {
    let (mem, h, p, dir) = shmem_tracker(512, AccessMode::Exhaustive, "exh");
    assert_eq!(p.access, wset_tracker::Access::ShmemExhaustive);
    // Let the first tick take everything into custody.
    wait_epochs(&h, 2);
    assert!(h.shared().counters.pages_in_custody.load(Ordering::Relaxed) >= 500);
    let stop = Arc::new(AtomicBool::new(false));
    let readers = toucher(mem.clone(), 0..64, None, stop.clone());
    let writers = toucher(mem.clone(), 64..96, Some(0xD1D1), stop.clone());
    wait_epochs(&h, 4);
    let s = summarize(h.shared(), &p, &cfg(), 0);
    stop.store(true, Ordering::Relaxed);
    readers.join().unwrap();
    writers.join().unwrap();
    assert_eq!(s.windows[0].wss_bytes, 96 * PAGE, "{s:#?}");
    assert_eq!(s.windows[0].dirty_bytes, 32 * PAGE, "{s:#?}");
    assert_eq!(s.error.relative_error, 0.0);
    // Every byte is intact while pages are still in custody...
    let expected = common::filled(0x1234, (64..96).map(|p| (p, 0xD1D1)));
    assert_eq!(mem.mismatches(&expected), 0);
    // ...and after stop every page is back in the memfd, not in custody.
    wait_epochs(&h, 2);
    let r = h.stop();
    assert_eq!(r.pages_left_in_custody, 0);
    assert!(!dir.join("vm.custody").exists());
    assert_eq!(mem.mismatches(&expected), 0);
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn shmem_sampled_estimates_within_its_error() {
    let pages = 4096;
    let (mem, h, p, dir) = shmem_tracker(pages, AccessMode::Sampled { granules: 1024 }, "smp");
    wait_epochs(&h, 2);
    let stop = Arc::new(AtomicBool::new(false));
    // A quarter of memory hot.
    let t = toucher(mem.clone(), 0..1024, None, stop.clone());
    wait_epochs(&h, 4);
    let s = summarize(h.shared(), &p, &cfg(), 0);
    stop.store(true, Ordering::Relaxed);
    t.join().unwrap();
    let truth = 1024 * PAGE;
    let err = (s.windows[0].wss_bytes as f64 - truth as f64).abs() / s.memory_bytes as f64;
    assert!(
        err <= s.error.relative_error * 1.5,
        "estimate {} vs truth {truth}: error {err:.4} beyond stated {:.4}",
        s.windows[0].wss_bytes,
        s.error.relative_error
    );
    h.stop();
    assert_eq!(mem.mismatches(&common::filled(0x1234, [])), 0);
    std::fs::remove_dir_all(dir).unwrap();
}

/// Run a sampled memfd guest with a quarter of memory read and an eighth
/// written every interval, under `budget` faults/s (0: none) and at most
/// `max_stride`; returns the summary, the stride in force and the faults
/// the guest took per interval.
fn sampled_hot_guest(
    budget: u32,
    max_stride: u32,
    name: &str,
) -> (wset_tracker::summary::Summary, u32, f64) {
    let pages = 4096;
    let mem = Arc::new(common::memfd(pages));
    mem.fill(0x1234, 0, mem.pages());
    let (uffd, p) = common::planned_uffd(
        BackingKind::Shmem,
        AccessMode::Sampled { granules: 1024 },
        pages,
    );
    let dir = custody_dir(name);
    let memfd = mem.memfd().unwrap().try_clone().unwrap();
    let spec = common::spec(
        uffd,
        &mem,
        p.clone(),
        INTERVAL,
        Some(memfd),
        Some(dir.join("vm.custody")),
    );
    let h = TrackerHandle::spawn(wset_tracker::TrackerSpec {
        fault_budget: budget,
        max_stride,
        wake_waiters: false,
        prefetch: Vec::new(),
        probes: Vec::new(),
        record: None,
        ..spec
    })
    .unwrap();
    wait_epochs(&h, 2);
    let stop = Arc::new(AtomicBool::new(false));
    let readers = toucher(mem.clone(), 0..1024, None, stop.clone());
    let writers = toucher(mem.clone(), 1024..1536, Some(0xD1D1), stop.clone());
    // Settle for two strides, then count faults over ten intervals.
    wait_epochs(&h, 10);
    let f0 = h.shared().counters.faults_handled.load(Ordering::Relaxed);
    let e0 = h.shared().epoch();
    wait_epochs(&h, 10);
    let faults = h.shared().counters.faults_handled.load(Ordering::Relaxed) - f0;
    let epochs = h.shared().epoch() - e0;
    let cfg = SummaryConfig {
        windows_ms: vec![600, 1500],
        age_buckets_ms: vec![0, 600],
        heat_slices: 4,
    };
    let s = summarize(h.shared(), &p, &cfg, 0);
    let stride = h.shared().stride();
    stop.store(true, Ordering::Relaxed);
    readers.join().unwrap();
    writers.join().unwrap();
    h.stop();
    let expected = common::filled(0x1234, (1024..1536).map(|p| (p, 0xD1D1)));
    assert_eq!(mem.mismatches(&expected), 0, "guest memory damaged");
    std::fs::remove_dir_all(dir).unwrap();
    (s, stride, faults as f64 / epochs as f64)
}

#[test]
fn shmem_sampled_under_a_fault_budget_keeps_its_estimates() {
    // 1536 hot pages of 4096: ~384 hot granules in a 1024-granule sample.
    // A budget of 500/s is 50 per 100 ms interval: stride 8, capped at 4.
    let (free, free_stride, free_faults) = sampled_hot_guest(0, 4, "nobudget");
    let (s, stride, faults) = sampled_hot_guest(500, 4, "budget");
    eprintln!(
        "faults per interval: {free_faults:.0} without a budget, {faults:.0} with (stride {stride}); \
         access rate {:.0} / {:.0} B/s, dirty rate {:.0} / {:.0} B/s (truth {} / {})",
        free.access_rate_bytes_per_s,
        s.access_rate_bytes_per_s,
        free.dirty_rate_bytes_per_s,
        s.dirty_rate_bytes_per_s,
        1536 * PAGE * 10,
        512 * PAGE * 10
    );
    assert_eq!(free_stride, 1);
    assert_eq!(stride, 4, "{s:#?}");
    assert!(
        faults < free_faults / 2.5,
        "faults per interval with the budget {faults:.0} vs {free_faults:.0} without"
    );
    assert!(
        s.error.basis.contains("re-armed every 4 intervals"),
        "{}",
        s.error.basis
    );
    let secs = INTERVAL.as_secs_f64();
    for (what, sum) in [("without", &free), ("with", &s)] {
        // The working set and the dirty bytes over the windows.
        let mem = sum.memory_bytes as f64;
        for w in &sum.windows {
            let err = (w.wss_bytes as f64 - (1536 * PAGE) as f64).abs() / mem;
            assert!(
                err <= sum.error.relative_error * 1.5,
                "{what} budget, {} ms window: {} vs truth {} ({err:.4} of memory, stated {:.4})",
                w.window_ms,
                w.wss_bytes,
                1536 * PAGE,
                sum.error.relative_error
            );
            let derr = (w.dirty_bytes as f64 - (512 * PAGE) as f64).abs() / mem;
            assert!(
                derr <= sum.error.relative_error * 1.5,
                "{what} budget: dirty {w:?}"
            );
        }
        // Per-interval rates: every hot page is accessed each interval.
        let acc_truth = (1536 * PAGE) as f64 / secs;
        let dirty_truth = (512 * PAGE) as f64 / secs;
        let tol = sum.error.relative_error * 1.5 * mem / secs;
        assert!(
            (sum.access_rate_bytes_per_s - acc_truth).abs() <= tol,
            "{what} budget: access rate {} vs {acc_truth}",
            sum.access_rate_bytes_per_s
        );
        assert!(
            (sum.dirty_rate_bytes_per_s - dirty_truth).abs() <= tol,
            "{what} budget: dirty rate {} vs {dirty_truth}",
            sum.dirty_rate_bytes_per_s
        );
    }
}

/// What `/proc/self/task/<tid>/wchan` says the thread sleeps in.
fn wchan(tid: i32) -> String {
    std::fs::read_to_string(format!("/proc/self/task/{tid}/wchan")).unwrap_or_default()
}

/// Wait until every thread in `tids` sleeps in a function whose name holds
/// `what`, or fail saying how many do not.
fn wait_blocked(tids: &[AtomicI32], what: &str, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        let not = tids
            .iter()
            .filter(|t| {
                let tid = t.load(Ordering::Acquire);
                tid == 0 || !wchan(tid).contains(what)
            })
            .count();
        if not == 0 {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{not} of {} threads are not blocked in {what} after {timeout:?}",
            tids.len()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// More faulting threads than the deferred queue holds, all blocked while
/// a REMOVE event is pending: until the tracker reads that event, the
/// kernel refuses every resolution (EAGAIN). The faults past the queue's
/// capacity are left waiting and woken once resolutions succeed again;
/// each message is counted once, and every thread gets its page.
#[test]
fn more_refused_faults_than_the_deferred_queue_holds() {
    const THREADS: usize = wset_tracker::tracker::DEFERRED_CAP + 300;
    const REMOVED: usize = 16;
    let mem = Arc::new(common::anon(THREADS + REMOVED));
    let uffd = Uffd::create(feature::EVENT_REMOVE).unwrap();
    // Registered before the tracker exists, so the faults queue up unread.
    uffd.register(mem.addr(), mem.len() as u64, mode::MISSING)
        .unwrap();
    let tids: Arc<Vec<AtomicI32>> = Arc::new((0..THREADS).map(|_| AtomicI32::new(0)).collect());
    let done = Arc::new(AtomicUsize::new(0));
    let faulting: Vec<_> = (0..THREADS)
        .map(|i| {
            let (mem, tids, done) = (mem.clone(), tids.clone(), done.clone());
            std::thread::Builder::new()
                .stack_size(64 * 1024)
                .spawn(move || {
                    // SAFETY: gettid has no preconditions.
                    tids[i].store(unsafe { libc::gettid() }, Ordering::Release);
                    let v = mem.read_u32(i as u64 * PAGE);
                    done.fetch_add(1, Ordering::Release);
                    v
                })
                .unwrap()
        })
        .collect();
    wait_blocked(&tids, "handle_userfault", Duration::from_secs(60));
    // The REMOVE: the dropping thread waits until the event is read.
    let remover_tid = Arc::new([AtomicI32::new(0)]);
    let remover = {
        let (mem, tid) = (mem.clone(), remover_tid.clone());
        std::thread::spawn(move || {
            // SAFETY: gettid has no preconditions.
            tid[0].store(unsafe { libc::gettid() }, Ordering::Release);
            // 0 on success, as madvise returns.
            mem.discard(THREADS as u32, (THREADS + REMOVED) as u32)
                .map_or(-1, |()| 0)
        })
    };
    wait_blocked(&remover_tid[..], "userfaultfd", Duration::from_secs(60));
    let plan = wset_tracker::Plan {
        register_mode: mode::MISSING,
        first_touch: true,
        dirty: wset_tracker::Dirty::None,
        access: wset_tracker::Access::None,
        evict_after: 0,
        notes: vec![],
    };
    let h = TrackerHandle::spawn(common::spec(uffd, &mem, plan, INTERVAL, None, None)).unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    while done.load(Ordering::Acquire) < THREADS {
        assert!(
            Instant::now() < deadline,
            "{} of {THREADS} faulting threads still wait; tracker {:?}, counters {:?}",
            THREADS - done.load(Ordering::Acquire),
            h.shared().state(),
            h.shared().counters
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    for t in faulting {
        assert_eq!(
            t.join().unwrap(),
            0,
            "a fresh anonymous page reads as zeros"
        );
    }
    assert_eq!(remover.join().unwrap(), 0, "madvise(MADV_DONTNEED)");
    assert_eq!(h.shared().state(), TrackerState::Tracking);
    let c = &h.shared().counters;
    let missing = c.missing_faults.load(Ordering::Relaxed);
    let rewoken = c.faults_rewoken.load(Ordering::Relaxed);
    let handled = c.faults_handled.load(Ordering::Relaxed);
    eprintln!(
        "{THREADS} threads: {missing} fault messages, {rewoken} left waiting and woken, \
         {handled} handled, {} refused resolutions",
        c.retries.load(Ordering::Relaxed)
    );
    // Every fault is read before the REMOVE (the kernel delivers faults
    // first) and refused: the queue takes its capacity, the rest wait. Only
    // faults read by the same read(2) as the REMOVE may be resolved at once:
    // reading the event lets the remover go on, and the kernel may allow
    // resolutions again before the tracker handles them (one batch, 64).
    let over = THREADS - wset_tracker::tracker::DEFERRED_CAP;
    assert!(
        (over.saturating_sub(64)..=over).contains(&(rewoken as usize)),
        "{rewoken} faults left waiting, expected {over} less at most one batch"
    );
    // One message per fault: the woken threads faulted once more.
    assert_eq!(missing, THREADS as u64 + rewoken);
    assert_eq!(handled, THREADS as u64);
    assert_eq!(c.remove_events.load(Ordering::Relaxed), 1);
    assert_eq!(h.stop().state, TrackerState::Stopped);
}
