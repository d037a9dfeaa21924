//! End-to-end accuracy: the real agent binary tracks real KVM guests (and
//! process guests) whose access pattern is known exactly, and its summaries
//! are compared with that ground truth over gRPC.

use std::time::Duration;

use wset_guest::memory::PAGE;
use wset_guest::script::{Op, Phase, Script, Touch};
use wset_proto::v1 as pb;
use wset_tests::harness::{
    Agent, AgentOpts, Backing, Guest, GuestKind, Handshake, Shared, TempDir, methods, rel_err,
    window,
};

const INTERVAL_MS: u64 = 250;
const SHORT_MS: u64 = 1000;
const LONG_MS: u64 = 4000;

fn opts(access: &str) -> AgentOpts {
    AgentOpts {
        interval_ms: INTERVAL_MS,
        windows_ms: vec![SHORT_MS, LONG_MS],
        access: access.into(),
        extra: vec![
            "--sample-seed".into(),
            "7".into(),
            "--age-buckets".into(),
            format!("0ms,{SHORT_MS}ms,{LONG_MS}ms"),
        ],
        snapshot: None,
        state_dir: None,
        grpc_addr: None,
        env: vec![],
    }
}

/// Agents shared by the tests whose guests only need tracking side by side
/// (each test has VM ids of its own and looks at its own VMs only).
static EXHAUSTIVE: Shared<Agent> = Shared::new(|| Agent::start(opts("exhaustive")));
static SAMPLED: Shared<Agent> = Shared::new(|| Agent::start(opts("4096")));

fn touch(op: Op, start: u32, pages: u32) -> Touch {
    Touch { op, start, pages }
}

fn phase(name: &str, touches: Vec<Touch>, duration_ms: u64) -> Phase {
    Phase {
        name: name.into(),
        touches,
        duration_ms,
        period_ms: 100,
    }
}

fn overhead(g: &Guest) -> u64 {
    g.registered["overhead_pages"]
        .as_array()
        .map_or(0, Vec::len) as u64
}

/// Wait until the summary's shortest window covers only the phase that
/// started at `epoch0` (the window is SHORT_MS plus the interval in progress).
fn settle(agent: &Agent, g: &Guest, epoch0: u64) -> pb::VmSummary {
    let need = epoch0 + SHORT_MS.div_ceil(INTERVAL_MS) + 2;
    agent.wait_summary(
        &g.vm_id,
        Duration::from_secs(30),
        "window settled on the phase",
        |s| s.epoch >= need,
    )
}

fn epoch_now(agent: &Agent, g: &Guest) -> u64 {
    agent.summary(&g.vm_id).expect("summary").epoch
}

/// Reads and writes on shmem, tracked exhaustively: working set and dirty
/// bytes within 2% of the truth, a phase change visible within two
/// intervals, and every byte intact through custody and after SIGTERM.
fn exhaustive_scenario(kind: GuestKind) {
    let mut agent = Agent::start(opts("exhaustive"));
    let warm = phase(
        "warm",
        vec![touch(Op::Read, 16, 200), touch(Op::Write, 300, 100)],
        4000,
    );
    let shift = phase("shift", vec![touch(Op::Read, 1000, 250)], 4000);
    let idle = phase("idle", vec![], 3000);
    let mut g = Guest::builder(
        &format!("exh-{kind}"),
        Script {
            phases: vec![warm, shift, idle],
            checksum_every: 0,
        },
    )
    .kind(kind)
    .memory_mib(16)
    .fill_seed(11)
    .start(&agent);
    let oh = overhead(&g);
    // The KVM guest program also reads its code page and the VMM writes the
    // command page every command.
    let oh_written = oh.min(1);

    g.wait_event("phase", Duration::from_secs(10));
    let e0 = epoch_now(&agent, &g);
    let s = settle(&agent, &g, e0);
    assert_eq!(
        methods(&s),
        vec![
            pb::TrackingMethod::FirstTouch,
            pb::TrackingMethod::ShmemExhaustive
        ]
    );
    let w = window(&s, SHORT_MS);
    let (wss_truth, dirty_truth) = ((300 + oh) * PAGE, (100 + oh_written) * PAGE);
    let (e_wss, e_dirty) = (
        rel_err(w.wss_bytes, wss_truth),
        rel_err(w.dirty_bytes, dirty_truth),
    );
    eprintln!(
        "{kind} exhaustive warm: wss {} vs {wss_truth} ({:.2}%), dirty {} vs {dirty_truth} ({:.2}%)",
        w.wss_bytes,
        e_wss * 100.0,
        w.dirty_bytes,
        e_dirty * 100.0
    );
    assert!(
        e_wss <= 0.02,
        "working set {} vs truth {wss_truth}",
        w.wss_bytes
    );
    assert!(
        e_dirty <= 0.02,
        "dirty {} vs truth {dirty_truth}",
        w.dirty_bytes
    );
    assert_eq!(s.error.as_ref().unwrap().confidence, 1.0);
    assert!(!s.error.as_ref().unwrap().wss_is_lower_bound);

    // Phase change: the interval after the one the change fell in shows only
    // the new phase, so the change is visible at most two epochs later.
    g.wait_event("phase", Duration::from_secs(10));
    let e1 = epoch_now(&agent, &g);
    let shift_truth = (250 + oh) * PAGE;
    let seen = agent.wait_summary(
        &g.vm_id,
        Duration::from_secs(10),
        "shift phase in the last interval",
        |s| {
            let last = s.access_rate_bytes_per_s * INTERVAL_MS as f64 / 1000.0;
            rel_err(last as u64, shift_truth) <= 0.02
        },
    );
    eprintln!(
        "{kind} phase change seen {} epochs after it began",
        seen.epoch - e1
    );
    assert!(
        seen.epoch - e1 <= 2,
        "phase change took {} epochs to show",
        seen.epoch - e1
    );
    let s = settle(&agent, &g, seen.epoch);
    let w = window(&s, SHORT_MS);
    assert!(
        rel_err(w.wss_bytes, shift_truth) <= 0.02,
        "shift working set {} vs {shift_truth}",
        w.wss_bytes
    );
    assert_eq!(
        window(&s, LONG_MS).wss_bytes / PAGE,
        w.wss_bytes / PAGE + 300,
        "the long window still holds the warm phase"
    );

    // Idle: nothing accessed.
    g.wait_event("phase", Duration::from_secs(10));
    let e2 = epoch_now(&agent, &g);
    let s = settle(&agent, &g, e2);
    assert_eq!(
        window(&s, SHORT_MS).wss_bytes,
        0,
        "idle guest still shows a working set: {s:#?}"
    );
    assert_eq!(s.access_rate_bytes_per_s, 0.0);
    let idle_bytes: u64 = s
        .idle_ages
        .iter()
        .filter(|b| b.min_age_ms >= 1000)
        .map(|b| b.bytes)
        .sum();
    assert_eq!(
        idle_bytes, s.memory_bytes,
        "every byte idle for at least 1 s: {:?}",
        s.idle_ages
    );

    let v = g.wait_event("verify", Duration::from_secs(60));
    assert_eq!(v["ok"], true, "memory damaged while tracked: {v}");
    g.wait_event("done", Duration::from_secs(30));
    // SIGTERM: every page comes back from custody.
    assert!(
        agent.terminate().success(),
        "agent log:\n{}",
        agent.log().join("\n")
    );
    let v = g.verify_now();
    assert_eq!(v["ok"], true, "memory damaged after the agent stopped: {v}");
    assert!(g.finish().success());
}

#[test]
fn kvm_guest_exhaustive_shmem_matches_truth() {
    exhaustive_scenario(GuestKind::Kvm);
}

#[test]
fn process_guest_exhaustive_shmem_matches_truth() {
    exhaustive_scenario(GuestKind::Process);
}

/// ESX-style sampling at the default sample size: the estimate falls within
/// the interval the summary states (95% confidence).
/// A 64 MiB guest reading 3000 pages and writing 1000, steadily.
fn start_sampled_guest(agent: &Agent, vm_id: &str, kind: GuestKind) -> Guest {
    let hot = phase(
        "hot",
        vec![touch(Op::Read, 16, 3000), touch(Op::Write, 5000, 1000)],
        60_000,
    );
    Guest::builder(
        vm_id,
        Script {
            phases: vec![hot],
            checksum_every: 0,
        },
    )
    .kind(kind)
    .memory_mib(64)
    .fill_seed(5)
    .start(agent)
}

fn sampled_scenario(kind: GuestKind) {
    let agent = SAMPLED.get();
    let g = start_sampled_guest(agent, &format!("smp-{kind}"), kind);
    let oh = overhead(&g);
    let e0 = epoch_now(agent, &g);
    let s = settle(agent, &g, e0);
    assert_eq!(
        methods(&s),
        vec![
            pb::TrackingMethod::FirstTouch,
            pb::TrackingMethod::ShmemSampled
        ]
    );
    let err = s.error.clone().unwrap();
    let truth = (4000 + oh) * PAGE;
    let w = window(&s, SHORT_MS);
    let miss = (w.wss_bytes as f64 - truth as f64).abs() / s.memory_bytes as f64;
    eprintln!(
        "{kind} sampled: wss {} vs {truth} ({:.2}% of truth, {:.3}% of memory; stated ±{:.3}% of memory at {})",
        w.wss_bytes,
        rel_err(w.wss_bytes, truth) * 100.0,
        miss * 100.0,
        err.relative_error * 100.0,
        err.confidence
    );
    assert_eq!(err.confidence, 0.95);
    assert!(
        miss <= err.relative_error,
        "estimate {} outside the stated interval around {truth}",
        w.wss_bytes
    );
    assert!(
        rel_err(w.wss_bytes, truth) <= 0.05,
        "estimate {} not within 5% of {truth}",
        w.wss_bytes
    );
    // Writes are sampled on the same granules (their proportion is further
    // from one half than the working set's, so the stated bound covers it).
    let dirty_truth = (1000 + oh.min(1)) * PAGE;
    let dirty_miss = (w.dirty_bytes as f64 - dirty_truth as f64).abs() / s.memory_bytes as f64;
    eprintln!(
        "{kind} sampled dirty: {} vs {dirty_truth} ({:.3}% of memory)",
        w.dirty_bytes,
        dirty_miss * 100.0
    );
    assert!(
        dirty_miss <= err.relative_error,
        "dirty {} outside the stated interval around {dirty_truth}",
        w.dirty_bytes
    );
}

/// `--dirty exact`: reads sampled, writes exact on every page.
#[test]
fn process_guest_sampled_reads_with_exact_dirty() {
    let mut o = opts("4096");
    o.extra.extend(["--dirty".into(), "exact".into()]);
    let agent = Agent::start(o);
    let g = start_sampled_guest(&agent, "smp-exact", GuestKind::Process);
    let e0 = epoch_now(&agent, &g);
    let s = settle(&agent, &g, e0);
    assert_eq!(
        methods(&s),
        vec![
            pb::TrackingMethod::FirstTouch,
            pb::TrackingMethod::WpSync,
            pb::TrackingMethod::ShmemSampled
        ]
    );
    let w = window(&s, SHORT_MS);
    assert_eq!(w.dirty_bytes, 1000 * PAGE, "{s:#?}");
}

#[test]
fn kvm_guest_sampled_shmem_within_stated_error() {
    sampled_scenario(GuestKind::Kvm);
}

#[test]
fn process_guest_sampled_shmem_within_stated_error() {
    sampled_scenario(GuestKind::Process);
}

/// Anonymous memory with WP_ASYNC: first touches and writes are exact; the
/// working set is flagged as a lower bound (reads of present pages unseen).
fn anonymous_scenario(kind: GuestKind) {
    let agent = EXHAUSTIVE.get();
    let p = phase(
        "p",
        vec![touch(Op::Read, 16, 300), touch(Op::Write, 400, 100)],
        60_000,
    );
    let g = Guest::builder(
        &format!("anon-{kind}"),
        Script {
            phases: vec![p],
            checksum_every: 0,
        },
    )
    .kind(kind)
    .backing(Backing::Anon)
    .start(agent);
    let oh = overhead(&g);
    let e0 = epoch_now(agent, &g);
    let s = settle(agent, &g, e0);
    assert_eq!(
        methods(&s),
        vec![pb::TrackingMethod::FirstTouch, pb::TrackingMethod::WpAsync]
    );
    assert!(s.error.as_ref().unwrap().wss_is_lower_bound);
    // The program page was written before registration, so it never faults.
    let touched_truth = (400 + oh.saturating_sub(1)) * PAGE;
    assert!(
        rel_err(s.touched_bytes, touched_truth) <= 0.02,
        "touched {} vs {touched_truth}",
        s.touched_bytes
    );
    let w = window(&s, SHORT_MS);
    let dirty_truth = (100 + oh.min(1)) * PAGE;
    eprintln!(
        "{kind} anonymous: touched {} vs {touched_truth}, dirty {} vs {dirty_truth}",
        s.touched_bytes, w.dirty_bytes
    );
    assert!(
        rel_err(w.dirty_bytes, dirty_truth) <= 0.02,
        "dirty {} vs {dirty_truth}",
        w.dirty_bytes
    );
    assert!(s.dirty_rate_bytes_per_s > 0.0);
}

#[test]
fn kvm_guest_anonymous_first_touch_and_dirty_exact() {
    anonymous_scenario(GuestKind::Kvm);
}

#[test]
fn process_guest_anonymous_first_touch_and_dirty_exact() {
    anonymous_scenario(GuestKind::Process);
}

/// How a Firecracker VM's writes are tracked: soft-dirty bits where the
/// kernel keeps them, else sync write-protect (asked for).
fn fc_dirty_method() -> pb::TrackingMethod {
    if wset_tracker::sys::soft_dirty_supported() {
        pb::TrackingMethod::SoftDirty
    } else {
        pb::TrackingMethod::WpSync
    }
}

/// An agent serving Firecracker MISSING faults from a snapshot memory file,
/// and a test VMM restoring from it with Firecracker's exact handshake.
/// The scratch directory must outlive both.
fn firecracker_restore(
    tag: &str,
    script: Script,
    kind: GuestKind,
    mem_mib: u64,
    fill_seed: u32,
) -> (TempDir, Agent, Guest) {
    let dir = TempDir::new(tag);
    let snapshot = dir.0.join("guest.mem");
    let mut o = AgentOpts {
        snapshot: Some(snapshot.clone()),
        ..opts("exhaustive")
    };
    o.extra.extend(wset_tests::harness::fc_write_tracking());
    let agent = Agent::start(o);
    let g = Guest::builder(tag, script)
        .kind(kind)
        .handshake(Handshake::Firecracker)
        .backing(Backing::Anon)
        .memory_mib(mem_mib)
        .fill_seed(fill_seed)
        .snapshot(snapshot)
        .start(&agent);
    (dir, agent, g)
}

/// Firecracker's exact handshake, snapshot restore: every page comes from the
/// memory file configured for the socket; writes by soft-dirty bits (sync
/// write-protect, asked for, on a kernel without them); after
/// SIGTERM the agent populates what the guest had not touched yet, so no
/// page reads back as zeros.
#[test]
fn firecracker_snapshot_restore_served_from_memory_file() {
    let p = phase(
        "p",
        vec![touch(Op::Read, 16, 200), touch(Op::Write, 300, 50)],
        3000,
    );
    let script = Script {
        phases: vec![p],
        checksum_every: 0,
    };
    let (_dir, mut agent, mut g) = firecracker_restore("fc", script, GuestKind::Kvm, 16, 99);
    assert!(g.vm_id.starts_with("fc-"));
    let oh = overhead(&g);
    let e0 = epoch_now(&agent, &g);
    let s = settle(&agent, &g, e0);
    assert_eq!(
        methods(&s),
        vec![pb::TrackingMethod::FirstTouch, fc_dirty_method()]
    );
    let vm = agent
        .list()
        .into_iter()
        .find(|v| v.vm_id == g.vm_id)
        .expect("listed");
    assert_eq!(vm.handshake, "firecracker");
    let w = window(&s, SHORT_MS);
    let dirty_truth = (50 + oh.min(1)) * PAGE;
    assert!(
        rel_err(w.dirty_bytes, dirty_truth) <= 0.02,
        "dirty {} vs {dirty_truth}",
        w.dirty_bytes
    );
    assert!(
        rel_err(s.touched_bytes, (250 + oh) * PAGE) <= 0.02,
        "touched {}",
        s.touched_bytes
    );
    let v = g.wait_event("verify", Duration::from_secs(60));
    assert_eq!(v["ok"], true, "guest memory differs from the snapshot: {v}");
    assert!(agent.terminate().success());
    let v = g.verify_now();
    assert_eq!(v["ok"], true, "after the agent stopped: {v}");
}

/// Once the pages a restored Firecracker guest uses are present, none of
/// its accesses waits for the agent: killed with -9, the agent leaves the
/// guest writing on (sync write-protect would stop it at its first write),
/// and only a page never touched before waits, until a restarted agent
/// takes the VM back and serves it from the snapshot.
#[test]
fn firecracker_guest_writes_on_while_the_agent_is_dead() {
    const HOT: u32 = 1000;
    let mut phases = vec![phase("warm", vec![touch(Op::Read, 16, HOT)], 2000)];
    phases.extend((0..20).map(|i| {
        phase(
            &format!("write-{i}"),
            vec![touch(Op::Write, 16, HOT / 4)],
            500,
        )
    }));
    // The guest's full check at the end reads every page, most of which it
    // never touched: that waits for an agent.
    phases.push(phase("rest", vec![], 100));
    let script = Script {
        phases,
        checksum_every: 0,
    };
    let dir = TempDir::new("fc-dead");
    let snapshot = dir.0.join("guest.mem");
    let o = AgentOpts {
        snapshot: Some(snapshot.clone()),
        state_dir: Some(dir.0.join("state")),
        ..opts("exhaustive")
    };
    let mut agent = Agent::start(o.clone());
    let mut g = Guest::builder("fc-dead", script)
        .kind(GuestKind::Kvm)
        .handshake(Handshake::Firecracker)
        .backing(Backing::Anon)
        .memory_mib(16)
        .fill_seed(5)
        .snapshot(snapshot)
        .start(&agent);
    let oh = overhead(&g);
    agent.wait_summary(
        &g.vm_id,
        Duration::from_secs(60),
        "every page the guest's loop uses present",
        |s| s.touched_bytes >= (u64::from(HOT) + oh) * PAGE,
    );
    let info = agent
        .list()
        .into_iter()
        .find(|v| v.vm_id == g.vm_id)
        .expect("listed");
    assert!(
        info.notes
            .iter()
            .any(|n| n.contains("no write waits for the agent")),
        "the notes say what a dead agent costs: {:?}",
        info.notes
    );
    agent.kill();
    let killed_ms = wset_serve::process::now_ms();
    // Write phases that began after the kill, up to the last one's end.
    let mut after_kill = 0;
    loop {
        let p = g.wait_event("phase", Duration::from_secs(120));
        if p["unix_ms"].as_u64().expect("phase time") > killed_ms {
            after_kill += 1;
        }
        if p["name"] == "rest" {
            break;
        }
    }
    assert!(
        after_kill >= 3,
        "only {after_kill} phases began after the agent was killed: the guest was too fast \
         for this test to prove anything"
    );
    let agent = Agent::start(o);
    agent.wait_log("re-adopted", Duration::from_secs(30));
    let v = g.wait_event("verify", Duration::from_secs(120));
    assert_eq!(v["ok"], true, "guest memory differs from the snapshot: {v}");
    let s = agent.wait_summary(
        &g.vm_id,
        Duration::from_secs(30),
        "a summary after re-adoption",
        |_| true,
    );
    let m = methods(&s);
    assert!(!m.contains(&pb::TrackingMethod::WpSync), "{m:?}");
    assert_eq!(
        m.contains(&pb::TrackingMethod::SoftDirty),
        wset_tracker::sys::soft_dirty_supported(),
        "{m:?}"
    );
}

/// Twenty KVM guests on one agent at once, each with its own working set.
#[test]
fn twenty_kvm_guests_on_one_agent() {
    let agent = Agent::start(opts("exhaustive"));
    let guests: Vec<Guest> = (0..20)
        .map(|i| {
            let p = phase("p", vec![touch(Op::Read, 16, 20 + 10 * i)], 60_000);
            Guest::builder(
                &format!("many-{i}"),
                Script {
                    phases: vec![p],
                    checksum_every: 0,
                },
            )
            .memory_mib(8)
            .fill_seed(i)
            .start(&agent)
        })
        .collect();
    assert_eq!(agent.list().len(), 20);
    let e0 = guests.iter().map(|g| epoch_now(&agent, g)).max().unwrap();
    for (i, g) in guests.iter().enumerate() {
        let s = settle(&agent, g, e0);
        let truth = (20 + 10 * i as u64 + overhead(g)) * PAGE;
        let w = window(&s, SHORT_MS);
        assert!(
            rel_err(w.wss_bytes, truth) <= 0.02,
            "{}: wss {} vs {truth}",
            g.vm_id,
            w.wss_bytes
        );
    }
}

/// hugetlbfs guests are tracked at the kernel's granularity (2 MiB): the
/// summary says so, and the working set counts whole huge pages.
fn hugetlb_scenario(kind: GuestKind) {
    wset_tests::harness::ensure_hugepages(16);
    let agent = EXHAUSTIVE.get();
    const HP: u32 = 512; // 4 KiB pages per 2 MiB page
    let p = phase(
        "p",
        vec![
            touch(Op::Read, 2 * HP + 7, 10),
            touch(Op::Read, 5 * HP, 3),
            touch(Op::Write, 7 * HP + 100, 1),
        ],
        60_000,
    );
    let g = Guest::builder(
        &format!("huge-{kind}"),
        Script {
            phases: vec![p],
            checksum_every: 0,
        },
    )
    .kind(kind)
    .backing(Backing::Hugetlb)
    .memory_mib(16)
    .fill_seed(8)
    .start(agent);
    let e0 = epoch_now(agent, &g);
    let s = settle(agent, &g, e0);
    let huge = 2 * 1024 * 1024;
    assert_eq!(s.granule_bytes, huge);
    let vm = agent
        .list()
        .into_iter()
        .find(|v| v.vm_id == g.vm_id)
        .unwrap();
    assert_eq!((vm.page_size_bytes, vm.granule_bytes), (huge, huge));
    // Huge pages 2, 5 and 7, plus 0 for the KVM program and command pages.
    let kvm = u64::from(kind == GuestKind::Kvm);
    let w = window(&s, SHORT_MS);
    assert_eq!(w.wss_bytes, (3 + kvm) * huge, "{s:#?}");
    assert_eq!(w.dirty_bytes, (1 + kvm) * huge, "{s:#?}");
}

#[test]
fn kvm_guest_on_hugetlbfs_tracked_at_2mib() {
    hugetlb_scenario(GuestKind::Kvm);
}

#[test]
fn process_guest_on_hugetlbfs_tracked_at_2mib() {
    hugetlb_scenario(GuestKind::Process);
}

/// Balloon: the VMM drops pages with MADV_DONTNEED (UFFD_EVENT_REMOVE). On a
/// Firecracker snapshot restore they must come back as zeros, not from the
/// memory file, exactly as Firecracker's own handlers do; memory that was
/// not dropped still comes from the file.
#[test]
fn firecracker_balloon_removal_reads_back_zeros() {
    let script = Script {
        phases: vec![
            phase("touch", vec![touch(Op::Read, 16, 100)], 600),
            phase(
                "balloon",
                vec![touch(Op::Discard, 40, 30), touch(Op::Discard, 200, 50)],
                300,
            ),
            phase("after", vec![touch(Op::Read, 16, 300)], 600),
        ],
        checksum_every: 0,
    };
    let (_dir, agent, mut g) = firecracker_restore("fc-balloon", script, GuestKind::Process, 8, 41);
    let v = g.wait_event("verify", Duration::from_secs(60));
    assert_eq!(
        v["ok"], true,
        "dropped pages must read as zeros, the rest as the snapshot: {v}"
    );
    let s = agent.summary(&g.vm_id).unwrap();
    assert!(
        s.counters.unwrap().remove_events >= 1,
        "no UFFD_EVENT_REMOVE seen"
    );
}

/// Transparent huge pages: anonymous memory backed by THP before
/// registration is accepted, the reply says so, and writes are still tracked
/// per 4 KiB (the kernel splits a write-protected huge page when it is
/// written; a write it reported per 2 MiB would show in huge_written_bytes).
#[test]
fn process_guest_on_transparent_huge_pages() {
    let agent = EXHAUSTIVE.get();
    let writes = vec![
        touch(Op::Write, 1029, 1),
        touch(Op::Write, 2057, 1),
        touch(Op::Write, 3080, 1),
    ];
    let g = Guest::builder(
        "thp",
        Script {
            phases: vec![phase("p", writes, 60_000)],
            checksum_every: 0,
        },
    )
    .kind(GuestKind::Process)
    .backing(Backing::Thp)
    .memory_mib(16)
    .fill_seed(3)
    .start(agent);
    let notes = g.registered["reply"]["notes"].to_string();
    assert!(
        notes.contains("transparent huge pages"),
        "no THP noted at registration (could the kernel give this guest huge pages? \
         /sys/kernel/mm/transparent_hugepage/enabled must be madvise or always): {notes}"
    );
    let e0 = epoch_now(agent, &g);
    let s = settle(agent, &g, e0);
    assert_eq!(s.granule_bytes, PAGE);
    let w = window(&s, SHORT_MS);
    let huge = s.counters.as_ref().unwrap().huge_written_bytes;
    eprintln!(
        "thp: dirty {} bytes for 3 written 4 KiB pages; reported inside huge pages: {huge}",
        w.dirty_bytes
    );
    assert_eq!(huge, 0, "the kernel reported writes per 2 MiB: {s:#?}");
    assert_eq!(w.dirty_bytes, 3 * PAGE, "{s:#?}");
}
