//! RWP (Linux 7.3+) on the real kernel: the kernel behaviour the agent relies
//! on, and the agent's RWP methods end to end. Built only with the
//! `kernel-lane` feature and run inside the RWP kernel lane
//! (`scripts/kernel-lane.sh`), which boots a 7.3+ kernel under QEMU. On a
//! kernel without RWP every test fails and says so.

use std::os::fd::AsFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use wset_guest::memory::{BackingArg, GuestMemory, PAGE};
use wset_guest::script::{Script, Touch};
use wset_proto::v1 as pb;
use wset_tests::harness::{Agent, AgentOpts, Backing, Guest, GuestKind, methods, window};
use wset_tracker::Uffd;
use wset_tracker::uffd::{Event, UffdMsg, fault_flag, feature, mode, pagemap};

fn require_rwp() -> u64 {
    let f = Uffd::kernel_features().expect("create a userfaultfd");
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    assert!(
        f & feature::RWP != 0 && f & feature::RWP_ASYNC != 0,
        "kernel {} offers no RWP (features {:#x}): these tests need Linux 7.3+ with \
         CONFIG_USERFAULTFD_RWP=y; run them with scripts/kernel-lane.sh",
        release.trim(),
        f
    );
    f
}

/// Which of `pages` pages starting at `mem` the scan reports in `category`.
fn scan_pages(mem: &GuestMemory, category: u64, flags: u64) -> Vec<bool> {
    let pm = std::fs::File::open("/proc/self/pagemap").expect("open pagemap");
    let mut out = vec![pagemap::PageRegion::default(); 256];
    let mut hit = vec![false; mem.pages() as usize];
    let s = pagemap::Scan {
        flags,
        category_inverted: 0,
        category_mask: category,
        category_anyof_mask: 0,
        return_mask: category,
    };
    let end = mem.addr() + mem.len() as u64;
    pagemap::scan_all(pm.as_fd(), mem.addr(), end, s, &mut out, |r| {
        let mut a = r.start;
        while a < r.end {
            hit[((a - mem.addr()) / PAGE) as usize] = true;
            a += PAGE;
        }
        Ok(())
    })
    .expect("scan");
    hit
}

fn pages_where(v: &[bool]) -> Vec<usize> {
    v.iter()
        .enumerate()
        .filter_map(|(i, &b)| b.then_some(i))
        .collect()
}

fn populated(backing: BackingArg, pages: u32) -> GuestMemory {
    let mem = GuestMemory::new(backing, (pages as u64 * PAGE) as usize).expect("guest memory");
    mem.fill(3, 0, pages);
    mem
}

fn rwp_uffd(features: u64) -> Uffd {
    Uffd::create(features).expect("a uffd with RWP features (UFFDIO_API)")
}

/// Async RWP: the kernel resolves accesses itself and PAGEMAP_SCAN reports
/// exactly the pages read or written since they were protected.
fn async_harvest(backing: BackingArg) {
    require_rwp();
    let mem = populated(backing, 64);
    let u = rwp_uffd(feature::RWP | feature::RWP_ASYNC);
    u.register(mem.addr(), mem.len() as u64, mode::RWP)
        .expect("register RWP");
    for round in 0..3u32 {
        u.rw_protect(mem.addr(), mem.len() as u64, true)
            .expect("protect");
        assert!(
            pages_where(&scan_pages(&mem, pagemap::PAGE_IS_ACCESSED, 0)).is_empty(),
            "nothing accessed right after protecting"
        );
        let base = round * 20;
        let mut truth = Vec::new();
        for p in base..base + 5 {
            let _ = mem.read_u32(p as u64 * PAGE);
            truth.push(p as usize);
        }
        for p in base + 5..base + 10 {
            mem.write_u32(p as u64 * PAGE + 8, p);
            truth.push(p as usize);
        }
        let seen = pages_where(&scan_pages(&mem, pagemap::PAGE_IS_ACCESSED, 0));
        assert_eq!(seen, truth, "{backing:?} round {round}");
    }
    // Contents intact: the written words and the fill everywhere else.
    for round in 0..3u32 {
        for p in round * 20 + 5..round * 20 + 10 {
            assert_eq!(mem.read_u32(p as u64 * PAGE + 8), p);
        }
    }
}

#[test]
fn async_harvest_reports_exactly_the_accessed_pages_anonymous() {
    async_harvest(BackingArg::Anon);
}

#[test]
fn async_harvest_reports_exactly_the_accessed_pages_memfd() {
    async_harvest(BackingArg::Memfd);
}

/// Sync RWP: each first access after protection is a fault message with
/// the RWP flag, and WRITE on writes; resolving with RWPROTECT (cleared)
/// lets the thread go on.
#[test]
fn sync_faults_say_read_or_write() {
    require_rwp();
    let mem = Arc::new(populated(BackingArg::Memfd, 16));
    let u = rwp_uffd(feature::RWP | feature::RWP_ASYNC);
    u.register(mem.addr(), mem.len() as u64, mode::RWP)
        .expect("register RWP");
    u.rw_protect(mem.addr(), mem.len() as u64, true)
        .expect("protect");
    // Async until now; sync from here.
    u.set_mode(0, feature::RWP_ASYNC).expect("SET_MODE sync");
    let done = Arc::new(AtomicBool::new(false));
    let toucher = {
        let (mem, done) = (mem.clone(), done.clone());
        std::thread::spawn(move || {
            let _ = mem.read_u32(0);
            mem.write_u32(PAGE, 7);
            let _ = mem.read_u32(2 * PAGE);
            mem.write_u32(2 * PAGE + 4, 9);
            done.store(true, Ordering::SeqCst);
        })
    };
    let mut seen = Vec::new();
    let mut msgs = [UffdMsg::default(); 8];
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while !done.load(Ordering::SeqCst) {
        assert!(
            std::time::Instant::now() < deadline,
            "faults seen: {seen:?}"
        );
        let n = u.read_msgs(&mut msgs).expect("read uffd");
        for m in &msgs[..n] {
            if let Event::PageFault { flags, address, .. } = m.decode() {
                let page = (address - mem.addr()) / PAGE;
                seen.push((page, flags));
                let a = address & !(PAGE - 1);
                u.rw_protect(a, PAGE, false).expect("resolve");
            }
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    toucher.join().unwrap();
    eprintln!("sync faults: {seen:x?}");
    assert_eq!(
        seen,
        vec![
            (0, fault_flag::RWP),
            (1, fault_flag::RWP | fault_flag::WRITE),
            (2, fault_flag::RWP),
        ],
        "a read faults with RWP, a write with RWP|WRITE, and an access after \
         the page was released does not fault"
    );
    assert_eq!(mem.read_u32(PAGE), 7);
    assert_eq!(mem.read_u32(2 * PAGE + 4), 9);
}

/// Soft-dirty bits beside async RWP (how the agent tracks writes on RWP
/// VMAs, where write-protect cannot be): after a reset, exactly the pages
/// written are soft-dirty, whether read first or not, and RWP still reports
/// every page accessed.
#[test]
fn soft_dirty_sees_every_write_beside_rwp() {
    require_rwp();
    for backing in [BackingArg::Anon, BackingArg::Memfd] {
        let mem = populated(backing, 32);
        let u = rwp_uffd(feature::RWP | feature::RWP_ASYNC);
        u.register(mem.addr(), mem.len() as u64, mode::RWP)
            .expect("register RWP");
        for round in 0..3 {
            std::fs::write("/proc/self/clear_refs", "4").expect("reset soft-dirty bits");
            u.rw_protect(mem.addr(), mem.len() as u64, true)
                .expect("protect");
            // 0..4 read; 4..8 written; 8..12 read, then written; 12..16
            // written, then read; 16..32 untouched.
            for p in 0..4u64 {
                let _ = mem.read_u32(p * PAGE);
            }
            for p in 4..8u64 {
                mem.write_u32(p * PAGE, 1);
            }
            for p in 8..12u64 {
                let _ = mem.read_u32(p * PAGE);
                mem.write_u32(p * PAGE, 1);
            }
            for p in 12..16u64 {
                mem.write_u32(p * PAGE, 1);
                let _ = mem.read_u32(p * PAGE);
            }
            let acc = pages_where(&scan_pages(&mem, pagemap::PAGE_IS_ACCESSED, 0));
            let sd = pages_where(&scan_pages(&mem, pagemap::PAGE_IS_SOFT_DIRTY, 0));
            assert_eq!(
                acc,
                (0..16).collect::<Vec<_>>(),
                "{backing:?} round {round}"
            );
            assert_eq!(sd, (4..16).collect::<Vec<_>>(), "{backing:?} round {round}");
        }
    }
}

/// A uffd created as Firecracker creates it (only EVENT_REMOVE requested,
/// regions registered MISSING): RWP cannot be added later, write-protect can.
#[test]
fn firecracker_style_uffd_takes_write_protect_but_not_rwp() {
    require_rwp();
    let mem = populated(BackingArg::Anon, 16);
    let u = Uffd::create(feature::EVENT_REMOVE).expect("a uffd (UFFDIO_API)");
    let (a, len) = (mem.addr(), mem.len() as u64);
    u.register(a, len, mode::MISSING).expect("register MISSING");
    let e = u
        .register(a, len, mode::MISSING | mode::RWP)
        .expect_err("RWP needs UFFD_FEATURE_RWP at UFFDIO_API time");
    assert_eq!(e.raw_os_error(), Some(libc::EINVAL), "{e}");
    u.register(a, len, mode::MISSING | mode::WP)
        .expect("MISSING|WP needs no feature up front");
    // And with RWP requested, MISSING|RWP works on a MISSING range.
    let u2 = rwp_uffd(feature::RWP | feature::EVENT_REMOVE);
    let mem2 = populated(BackingArg::Anon, 16);
    u2.register(mem2.addr(), mem2.len() as u64, mode::MISSING)
        .expect("register MISSING");
    u2.register(mem2.addr(), mem2.len() as u64, mode::MISSING | mode::RWP)
        .expect("re-register MISSING|RWP");
}

/// A Firecracker-style uffd (no WP_ASYNC, features fixed) on a kernel with
/// soft-dirty bits, as Debian's are: the tracker takes writes from the bits,
/// registers no write-protect, and no write ever waits for it. A page the
/// kernel fills for a read reads soft-dirty from the fill; it does not count
/// as written.
#[test]
fn soft_dirty_tracks_a_firecracker_uffd_without_write_protect() {
    use wset_tracker::plan::{self, AccessMode, BackingKind, PlanInput};
    assert!(
        wset_tracker::sys::soft_dirty_supported(),
        "the lane's kernel keeps no soft-dirty bits (CONFIG_MEM_SOFT_DIRTY)"
    );
    const INTERVAL: Duration = Duration::from_millis(100);
    let mem = Arc::new(GuestMemory::new(BackingArg::Anon, 64 * PAGE as usize).expect("map"));
    let uffd = Uffd::create(feature::EVENT_REMOVE).expect("a uffd (UFFDIO_API)");
    let features = uffd.features().expect("features");
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
        soft_dirty: true,
        missing_registered: false,
        sync_write_protect: false,
    });
    assert_eq!(p.dirty, wset_tracker::Dirty::SoftDirty, "{:?}", p.notes);
    assert_eq!(
        p.register_mode,
        mode::MISSING,
        "no write-protect registered"
    );
    let h = wset_tracker::TrackerHandle::spawn(wset_tracker::TrackerSpec {
        name: "wset-sd".into(),
        uffd,
        regions: vec![wset_tracker::Region {
            host_addr: mem.addr(),
            len: mem.len() as u64,
            file_offset: 0,
        }],
        granule_bytes: PAGE,
        plan: p.clone(),
        memory_fd: None,
        source: None,
        pid: std::process::id() as i32,
        interval: INTERVAL,
        cpu: None,
        spin: Duration::from_micros(200),
        custody_path: None,
        custody_granules: 64,
        seed: 7,
        started_ms: 0,
        fault_budget: 0,
        max_stride: 1,
        wake_waiters: false,
        prefetch: Vec::new(),
        probes: Vec::new(),
        record: None,
    })
    .expect("spawn the tracker");
    let wait_epochs = |n: u32| {
        let target = h.shared().epoch() + n;
        wset_tests::harness::wait_for(Duration::from_secs(30), "tracker epochs", || {
            (h.shared().epoch() >= target).then_some(())
        });
    };
    let cfg = wset_tracker::summary::SummaryConfig {
        windows_ms: vec![200, 500],
        age_buckets_ms: vec![0],
        heat_slices: 1,
    };
    // First touches: reads bring 0..32 in, writes 32..64.
    for pg in 0..32 {
        assert_eq!(mem.read_u32(pg * PAGE), 0);
    }
    for pg in 32..64 {
        mem.write_u32(pg * PAGE, pg as u32);
    }
    wait_epochs(3);
    let s = wset_tracker::summary::summarize(h.shared(), &p, &cfg, 0);
    assert_eq!(s.touched_bytes, 64 * PAGE, "{s:#?}");
    assert_eq!(s.windows[1].dirty_bytes, 32 * PAGE, "{s:#?}");
    // Then writes of present pages, every 10 ms: seen each interval.
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (mem, stop) = (mem.clone(), stop.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                for pg in 20..30 {
                    mem.write_u32(pg * PAGE, 7);
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        })
    };
    wait_epochs(3);
    let s = wset_tracker::summary::summarize(h.shared(), &p, &cfg, 0);
    stop.store(true, Ordering::Relaxed);
    writer.join().unwrap();
    assert_eq!(s.windows[0].dirty_bytes, 10 * PAGE, "{s:#?}");
    let wp = h.shared().counters.wp_faults.load(Ordering::Relaxed);
    assert_eq!(wp, 0, "no write waited for the tracker");
    h.stop();
    assert_eq!(mem.read_u32(25 * PAGE), 7);
    assert_eq!(mem.read_u32(63 * PAGE), 63);
}

/// Protection is never left behind: closing the last copy of a uffd whose
/// pages are protected in sync mode (so every access would wait for a
/// handler) restores every PTE, and the memory reads back intact.
#[test]
fn closing_the_uffd_releases_protected_pages() {
    require_rwp();
    for backing in [BackingArg::Anon, BackingArg::Memfd] {
        let mem = Arc::new(populated(backing, 64));
        let expected: Vec<u32> = (0..64).map(|p| mem.read_u32(p * PAGE + 12)).collect();
        let u = rwp_uffd(feature::RWP | feature::RWP_ASYNC);
        u.register(mem.addr(), mem.len() as u64, mode::RWP)
            .expect("register RWP");
        u.set_mode(0, feature::RWP_ASYNC).expect("sync mode");
        u.rw_protect(mem.addr(), mem.len() as u64, true)
            .expect("protect");
        drop(u);
        let done = Arc::new(AtomicBool::new(false));
        let reader = {
            let (mem, done) = (mem.clone(), done.clone());
            std::thread::spawn(move || {
                let got: Vec<u32> = (0..64).map(|p| mem.read_u32(p * PAGE + 12)).collect();
                mem.write_u32(5 * PAGE, 77);
                done.store(true, Ordering::SeqCst);
                got
            })
        };
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while !done.load(Ordering::SeqCst) {
            assert!(
                std::time::Instant::now() < deadline,
                "{backing:?}: an access still waits 30 s after the uffd closed"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(reader.join().unwrap(), expected, "{backing:?}");
        assert_eq!(mem.read_u32(5 * PAGE), 77);
    }
}

fn agent_opts(extra: &[&str]) -> AgentOpts {
    AgentOpts {
        interval_ms: 250,
        windows_ms: vec![1000, 4000],
        access: "exhaustive".into(),
        extra: extra.iter().map(|s| s.to_string()).collect(),
        ..AgentOpts::default()
    }
}

/// Long enough that the guest still runs when the slowest test's window
/// ends: under software emulation the agent's intervals stretch, and a
/// guest that finished early would leave intervals without accesses.
fn steady_guest(agent: &Agent, vm_id: &str, backing: Backing) -> Guest {
    let script = Script::steady(vec![Touch::read(16, 300), Touch::write(1000, 100)], 40_000);
    Guest::builder(vm_id, script)
        .kind(GuestKind::Process)
        .backing(backing)
        .memory_mib(16)
        .fill_seed(9)
        .start(agent)
}

/// The agent in sync mode: every first access per interval is a fault
/// message, and the fault flags classify it. The guest reads 300 pages and
/// writes 100 others over and over. Software emulation on a busy machine
/// stretches the guest's passes over those pages past any fixed number of
/// intervals, so the test waits for the working set to be whole in the
/// 4 s window (and checks on the way that it never shows more than those
/// 400 pages), and bounds the faults by what one fault per page per
/// interval allows.
#[test]
fn agent_sync_mode_classifies_every_read_and_write() {
    require_rwp();
    let agent = Agent::start(agent_opts(&["--rwp", "sync"]));
    let mut g = steady_guest(&agent, "rwp-sync", Backing::Anon);
    g.wait_event("phase", Duration::from_secs(30));
    let e0 = agent.summary(&g.vm_id).expect("summary").epoch;
    // The 4 s window holds only the steady phase once 16 intervals passed.
    let need = e0 + 17;
    let s1 = agent.wait_summary(&g.vm_id, Duration::from_secs(120), "settled", |s| {
        s.epoch >= need
    });
    let need = s1.epoch + 12;
    let s2 = agent.wait_summary(
        &g.vm_id,
        Duration::from_secs(120),
        "whole working set",
        |s| {
            let w = window(s, 4000);
            assert!(
                w.wss_bytes <= 400 * PAGE && w.dirty_bytes <= 100 * PAGE,
                "more than the guest touches: {s:#?}"
            );
            s.epoch >= need && w.wss_bytes == 400 * PAGE && w.dirty_bytes == 100 * PAGE
        },
    );
    assert_eq!(
        methods(&s2),
        vec![
            pb::TrackingMethod::FirstTouch,
            pb::TrackingMethod::SoftDirty,
            pb::TrackingMethod::RwpSync
        ]
    );
    let (c1, c2) = (s1.counters.unwrap(), s2.counters.unwrap());
    let k = c2.harvests - c1.harvests;
    let reads = c2.rwp_read_faults - c1.rwp_read_faults;
    let writes = c2.rwp_write_faults - c1.rwp_write_faults;
    eprintln!("{k} intervals: {reads} read faults, {writes} write faults");
    // Every page faults at least once over these intervals, and at most
    // once per interval (plus the one in progress); a write misread as a
    // read, or the reverse, would break a bound sooner or later.
    assert!(
        (300..=300 * (k + 1)).contains(&reads),
        "{reads} read faults in {k} intervals, expected 300 at most each"
    );
    assert!(
        (100..=100 * (k + 1)).contains(&writes),
        "{writes} write faults in {k} intervals, expected 100 at most each"
    );
    // Each pass reads 300 pages, then writes 100: three reads to a write,
    // less at most the writes of a pass whose reads came before s1.
    assert!(
        3 * writes <= reads + 300,
        "{reads} read faults for {writes} write faults: reads counted as writes?"
    );
    let v = g.wait_event("verify", Duration::from_secs(120));
    assert_eq!(v["ok"], true, "memory damaged while tracked: {v}");
}

/// Async mode takes no fault message at all: the kernel resolves every
/// access and the harvest finds it.
#[test]
fn agent_async_mode_takes_no_fault_messages() {
    require_rwp();
    let agent = Agent::start(agent_opts(&[]));
    let mut g = steady_guest(&agent, "rwp-async", Backing::Memfd);
    g.wait_event("phase", Duration::from_secs(30));
    let e0 = agent.summary(&g.vm_id).expect("summary").epoch;
    let need = e0 + 10;
    let s = agent.wait_summary(&g.vm_id, Duration::from_secs(60), "settled", |s| {
        s.epoch >= need
    });
    let w = window(&s, 1000);
    assert_eq!(w.wss_bytes, 400 * PAGE, "{s:#?}");
    assert_eq!(w.dirty_bytes, 100 * PAGE, "{s:#?}");
    let c = s.counters.unwrap();
    eprintln!(
        "async: {} harvests in {} ms, read faults {}, write faults {}, missing {}",
        c.harvests,
        c.harvest_ns_total / 1_000_000,
        c.rwp_read_faults,
        c.rwp_write_faults,
        c.missing_faults
    );
    // Only accesses that fell inside a harvest's freeze come as messages.
    assert!(
        c.rwp_read_faults + c.rwp_write_faults < c.harvests * 400 / 4,
        "async mode should not fault on most accesses: {c:?}"
    );
    let v = g.wait_event("verify", Duration::from_secs(120));
    assert_eq!(v["ok"], true, "memory damaged while tracked: {v}");
}

/// hugetlbfs (2 MiB pages) under async RWP: the harvest reports exactly the
/// huge pages accessed. Soft-dirty bits are not kept for hugetlbfs (every
/// huge page reads as soft-dirty after a reset), which is why the agent
/// does not use them there; if a kernel starts keeping them, this fails and
/// the planner can use them.
#[test]
fn hugetlbfs_async_harvest_reports_the_accessed_huge_pages() {
    require_rwp();
    wset_tests::harness::ensure_hugepages(4);
    const HUGE: u64 = 2 << 20;
    let mem = GuestMemory::new(BackingArg::Hugetlb, (4 * HUGE) as usize).expect("hugetlbfs memory");
    mem.fill(3, 0, mem.pages());
    let u = rwp_uffd(feature::RWP | feature::RWP_ASYNC);
    u.register(mem.addr(), mem.len() as u64, mode::RWP)
        .expect("register RWP");
    let huge_pages = |category| -> Vec<usize> {
        let hit = scan_pages(&mem, category, 0);
        (0..4).filter(|h| hit[h * 512]).collect()
    };
    for round in 0..3u64 {
        std::fs::write("/proc/self/clear_refs", "4").expect("reset soft-dirty bits");
        u.rw_protect(mem.addr(), mem.len() as u64, true)
            .expect("protect");
        assert_eq!(huge_pages(pagemap::PAGE_IS_ACCESSED), Vec::<usize>::new());
        let _ = mem.read_u32(round % 4 * HUGE + 100);
        mem.write_u32((round + 1) % 4 * HUGE + 8, 5);
        let mut want = vec![(round % 4) as usize, ((round + 1) % 4) as usize];
        want.sort();
        assert_eq!(huge_pages(pagemap::PAGE_IS_ACCESSED), want, "round {round}");
        assert_eq!(
            huge_pages(pagemap::PAGE_IS_SOFT_DIRTY),
            vec![0, 1, 2, 3],
            "round {round}: hugetlbfs soft-dirty bits now follow writes; use them for dirty tracking"
        );
    }
}

/// The agent SIGKILLed at random moments (in async mode some kills land in
/// a harvest's freeze, in sync mode every access waits on the agent) while
/// the VMM keeps its copy of the uffd: a restarted agent on the same state
/// directory takes that copy back, thaws it, wakes the waiting threads and
/// tracks the VM again with RWP; the guest's memory checks every time.
#[test]
fn killed_agent_is_replaced_and_rwp_vms_are_readopted() {
    require_rwp();
    for mode in ["async", "sync"] {
        let state = wset_tests::harness::TempDir::new("rwp-kills");
        let mut opts = agent_opts(&["--rwp", mode]);
        opts.state_dir = Some(state.0.clone());
        let mut agent = Agent::start(opts.clone());
        // Long enough for three restarts under software emulation.
        let script = Script::steady(vec![Touch::read(16, 300), Touch::write(1000, 100)], 180_000);
        let mut g = Guest::builder(&format!("rwp-kill-{mode}"), script)
            .kind(GuestKind::Process)
            .backing(Backing::Anon)
            .memory_mib(16)
            .fill_seed(9)
            .start(&agent);
        g.wait_event("phase", Duration::from_secs(30));
        for (round, wait_ms) in [700u64, 1300, 400].into_iter().enumerate() {
            std::thread::sleep(Duration::from_millis(wait_ms));
            agent.kill();
            let t = std::time::Instant::now();
            agent = Agent::start(opts.clone());
            // Tracked again once the working set is whole in a window. In
            // sync mode on a busy emulator one pass over the 400 pages can
            // outlast the 1 s window, so either window will do; neither
            // may ever show more than the guest touches.
            let s = agent.wait_summary(
                &g.vm_id,
                Duration::from_secs(120),
                "re-adopted with its whole working set",
                |s| {
                    let (w1, w4) = (window(s, 1000), window(s, 4000));
                    assert!(
                        w1.wss_bytes <= 400 * PAGE && w4.wss_bytes <= 400 * PAGE,
                        "{mode} round {round}: more than the guest touches: {s:#?}"
                    );
                    s.state == pb::VmState::Tracking as i32
                        && s.epoch >= 3
                        && (w1.wss_bytes == 400 * PAGE || w4.wss_bytes == 400 * PAGE)
                },
            );
            let rwp = if mode == "async" {
                pb::TrackingMethod::RwpAsync
            } else {
                pb::TrackingMethod::RwpSync
            };
            assert!(methods(&s).contains(&rwp), "{mode} round {round}: {s:#?}");
            let v = g.verify_now();
            assert_eq!(v["ok"], true, "{mode} round {round}: memory damaged: {v}");
            eprintln!(
                "rwp {mode}: kill {round} after {wait_ms} ms, tracked again in {:?}",
                t.elapsed()
            );
        }
        assert!(agent.terminate().success());
        let v = g.verify_now();
        assert_eq!(
            v["ok"], true,
            "{mode}: memory incomplete after the stop: {v}"
        );
    }
}

/// A guest on transparent huge pages under RWP async. The 7.3 kernel
/// protects and reports a THP per 2 MiB (measured: one touched 4 KiB page
/// in each of five huge pages reads as 10 MiB, one written page as 2 MiB
/// dirty), so the agent counts whole huge pages there and says so at
/// registration and in the summary; RWP stays in force and the guest's
/// memory intact.
#[test]
fn rwp_async_on_transparent_huge_pages() {
    require_rwp();
    let mut agent = Agent::start(agent_opts(&[]));
    // One read page in each of four huge pages, one written page in a fifth.
    let touches = vec![
        Touch::read(512 + 3, 1),
        Touch::read(1024 + 100, 1),
        Touch::read(1536 + 7, 1),
        Touch::read(2048 + 300, 1),
        Touch::write(2560 + 9, 1),
    ];
    let script = Script::steady(touches, 120_000);
    let mut g = Guest::builder("rwp-thp", script)
        .kind(GuestKind::Process)
        .backing(Backing::Thp)
        .memory_mib(16)
        .fill_seed(5)
        .start(&agent);
    let notes = g.registered["reply"]["notes"].to_string();
    eprintln!("rwp-thp registration notes: {notes}");
    g.wait_event("phase", Duration::from_secs(30));
    let e0 = agent.summary(&g.vm_id).expect("summary").epoch;
    let s = agent.wait_summary(&g.vm_id, Duration::from_secs(60), "settled", |s| {
        s.epoch >= e0 + 6
    });
    assert!(
        methods(&s).contains(&pb::TrackingMethod::RwpAsync),
        "{s:#?}"
    );
    let w = window(&s, 1000);
    let exact = 5 * PAGE;
    let huge = 5 * (2 << 20);
    eprintln!(
        "rwp-thp: working set {} bytes for 5 touched 4 KiB pages in 5 huge pages (exact {exact}, whole huge pages {huge}); dirty {}",
        w.wss_bytes, w.dirty_bytes
    );
    assert_eq!(
        w.wss_bytes, huge,
        "not whole huge pages (exact would be {exact}): {s:#?}"
    );
    assert_eq!(w.dirty_bytes, 2 << 20, "{s:#?}");
    assert!(
        notes.contains("per 2 MiB, so accesses and writes there count whole huge pages"),
        "{notes}"
    );
    let basis = &s.error.as_ref().expect("error estimate").basis;
    assert!(basis.contains("transparent huge pages"), "{basis}");
    let v = g.verify_now();
    assert_eq!(v["ok"], true, "memory damaged: {v}");
    assert!(agent.terminate().success());
}

/// Resident shmem of a process (`RssShmem` in `/proc/<pid>/status`), bytes.
fn resident_shmem(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("guest status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("RssShmem:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .expect("RssShmem in /proc/<pid>/status")
        * 1024
}

/// Cold-page eviction (`--evict-cold-after 8`) on a memfd guest whose data
/// pages (16 MiB less 16 pages) are all written at start and of which 400
/// pages stay hot: every other
/// page is saved to custody and freed, so the guest's resident memory falls
/// to its hot set while the working set and dirty bytes stay exact; a read
/// of every page brings each one back intact and counts as a read, not a
/// write; then the pages go cold and are evicted again. In async mode the
/// agent then stops cleanly, in sync mode it is SIGKILLed and restarted on
/// its state directory: either way every evicted page is back in the guest.
#[test]
fn rwp_evicts_cold_pages_and_brings_them_back() {
    require_rwp();
    // The process guest fills (and reads back) its data pages, after the
    // first few it leaves alone.
    const PAGES: u64 = (16 << 20) / PAGE - wset_guest::kvm::FIRST_DATA_PAGE as u64;
    const HOT: u64 = 400;
    for mode in ["async", "sync"] {
        let state = wset_tests::harness::TempDir::new("rwp-evict");
        // Eight idle intervals (2 s) before a page is cold: under software
        // emulation on a loaded machine the guest can stall for a second.
        let mut opts = agent_opts(&["--rwp", mode, "--evict-cold-after", "8"]);
        // A long window, so that a read of all 16 MiB under software
        // emulation falls inside one.
        opts.windows_ms = vec![1000, 30_000];
        opts.state_dir = Some(state.0.clone());
        let mut agent = Agent::start(opts.clone());
        let script = Script::steady(vec![Touch::read(16, 300), Touch::write(1000, 100)], 240_000);
        let mut g = Guest::builder(&format!("rwp-evict-{mode}"), script)
            .kind(GuestKind::Process)
            .backing(Backing::Memfd)
            .memory_mib(16)
            .fill_seed(9)
            .start(&agent);
        let notes = g.registered["reply"]["notes"].to_string();
        assert!(
            notes.contains("cold pages evicted: a page not accessed for 8 intervals"),
            "{mode}: {notes}"
        );
        g.wait_event("phase", Duration::from_secs(30));
        let before = resident_shmem(g.pid());
        let cold = PAGES - HOT;
        let evicted = |s: &pb::VmSummary| s.counters.as_ref().map_or(0, |c| c.pages_in_custody);
        // Exactly the cold pages: a hot page the guest left alone for a
        // stalled moment is evicted, then faulted back at its next touch.
        // And their memory freed: resident shmem is read right after a
        // summary that shows them, and both are read again until they agree
        // (a hot page evicted in a stall and not yet faulted back shows in
        // one and not the other). (Resident shmem also counts the guest's
        // own files on the lane's tmpfs root, which do not change.)
        let (pid, resident) = (g.pid(), std::cell::Cell::new(0));
        let s = agent.wait_summary(
            &g.vm_id,
            Duration::from_secs(120),
            "exactly the cold pages in custody, and their memory freed (within 16 pages)",
            |s| {
                if evicted(s) != cold {
                    return false;
                }
                resident.set(resident_shmem(pid));
                before.saturating_sub(resident.get()).abs_diff(cold * PAGE) <= 16 * PAGE
            },
        );
        let c = s.counters.clone().unwrap();
        let after = resident.get();
        eprintln!(
            "rwp evict {mode}: {} pages in custody ({} evicted, {} refaulted), guest resident \
             shmem {} KiB -> {} KiB",
            c.pages_in_custody,
            c.evicted_pages,
            c.refaulted_pages,
            before >> 10,
            after >> 10
        );
        let w = window(&s, 1000);
        assert_eq!(w.wss_bytes, HOT * PAGE, "{mode}: {s:#?}");
        assert_eq!(w.dirty_bytes, 100 * PAGE, "{mode}: {s:#?}");
        let basis = &s.error.as_ref().expect("error estimate").basis;
        assert!(basis.contains("evicted to custody"), "{basis}");

        // Read every page: each evicted one comes back intact, and is a
        // read (a page placed with UFFDIO_COPY would read as written).
        let t = std::time::Instant::now();
        let v = g.verify_now();
        assert_eq!(v["ok"], true, "{mode}: evicted memory damaged: {v}");
        let read_all = t.elapsed();
        let e = agent.summary(&g.vm_id).expect("summary").epoch;
        let s = agent.wait_summary(&g.vm_id, Duration::from_secs(60), "after the read", |s| {
            s.epoch >= e + 2
        });
        let c2 = s.counters.clone().unwrap();
        eprintln!(
            "rwp evict {mode}: all {PAGES} data pages read back in {read_all:?}, {} pages refaulted",
            c2.refaulted_pages - c.refaulted_pages
        );
        assert!(
            c2.refaulted_pages - c.refaulted_pages >= cold,
            "{mode}: every evicted page must come back: {c:?} -> {c2:?}"
        );
        let w = window(&s, 30_000);
        assert_eq!(w.wss_bytes, PAGES * PAGE, "{mode}: every page read: {s:#?}");
        assert_eq!(
            w.dirty_bytes,
            100 * PAGE,
            "{mode}: reading evicted pages back must not count as writing them: {s:#?}"
        );

        // Cold again, evicted again; then the agent goes with pages held.
        agent.wait_summary(&g.vm_id, Duration::from_secs(120), "evicted again", |s| {
            evicted(s) >= cold
        });
        if mode == "async" {
            assert!(agent.terminate().success());
        } else {
            agent.kill();
            agent = Agent::start(opts.clone());
            agent.wait_summary(&g.vm_id, Duration::from_secs(60), "re-adopted", |s| {
                s.state == pb::VmState::Tracking as i32 && s.epoch >= 2
            });
        }
        let v = g.verify_now();
        assert_eq!(
            v["ok"],
            true,
            "{mode}: memory incomplete after the agent {}: {v}",
            if mode == "async" {
                "stopped"
            } else {
                "was killed"
            }
        );
        if mode == "sync" {
            assert!(agent.terminate().success());
        }
    }
}
