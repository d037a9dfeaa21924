//! End-to-end scenarios run twice: on the host (mainline methods, Linux 6.x)
//! and in the RWP kernel lane (`scripts/kernel-lane.sh`, Linux 7.3+). Each
//! asserts what the kernel it runs on allows: the methods the summary names,
//! and the working set against the truth within the error it states.

use std::time::Duration;

use wset_guest::memory::PAGE;
use wset_guest::script::{Script, Touch};
use wset_proto::v1 as pb;
use wset_tests::harness::{
    Agent, AgentOpts, Backing, Guest, GuestKind, Handshake, methods, rel_err, window,
};
use wset_tracker::uffd::feature;

const INTERVAL_MS: u64 = 250;
const SHORT_MS: u64 = 1000;
const LONG_MS: u64 = 4000;

fn kernel_has_rwp() -> bool {
    let f = wset_tracker::Uffd::kernel_features().expect("create a userfaultfd");
    f & feature::RWP != 0
}

fn opts(extra: &[&str]) -> AgentOpts {
    AgentOpts {
        interval_ms: INTERVAL_MS,
        windows_ms: vec![SHORT_MS, LONG_MS],
        access: "exhaustive".into(),
        extra: extra.iter().map(|s| s.to_string()).collect(),
        ..AgentOpts::default()
    }
}

fn steady(reads: (u32, u32), writes: (u32, u32), ms: u64) -> Script {
    Script::steady(
        vec![
            Touch::read(reads.0, reads.1),
            Touch::write(writes.0, writes.1),
        ],
        ms,
    )
}

/// The first summary whose short window lies wholly after `epoch0`.
fn settled(agent: &Agent, g: &Guest, epoch0: u64) -> pb::VmSummary {
    let need = epoch0 + SHORT_MS.div_ceil(INTERVAL_MS) + 2;
    agent.wait_summary(&g.vm_id, Duration::from_secs(60), "window settled", |s| {
        s.epoch >= need
    })
}

fn start_guest(agent: &Agent, vm_id: &str, backing: Backing, script: Script) -> Guest {
    Guest::builder(vm_id, script)
        .kind(GuestKind::Process)
        .backing(backing)
        .memory_mib(16)
        .fill_seed(21)
        .start(agent)
}

/// Working set and dirty bytes against the truth; returns the summary.
fn measure(agent: &Agent, g: &mut Guest, wss_truth: u64, dirty_truth: u64) -> pb::VmSummary {
    g.wait_event("phase", Duration::from_secs(30));
    // A Firecracker VMM gets no reply: its VM may appear a moment later.
    let e0 = agent
        .wait_summary(&g.vm_id, Duration::from_secs(30), "registered", |_| true)
        .epoch;
    let s = settled(agent, g, e0);
    let w = window(&s, SHORT_MS);
    let err = s.error.clone().expect("every summary states its error");
    eprintln!(
        "{}: methods {:?}; wss {} vs {wss_truth} ({:.2}%), dirty {} vs {dirty_truth} ({:.2}%); \
         stated: ±{:.3}% at {}, lower bound {}; {}",
        g.vm_id,
        methods(&s),
        w.wss_bytes,
        rel_err(w.wss_bytes, wss_truth) * 100.0,
        w.dirty_bytes,
        rel_err(w.dirty_bytes, dirty_truth) * 100.0,
        err.relative_error * 100.0,
        err.confidence,
        err.wss_is_lower_bound,
        err.basis
    );
    assert!(!err.basis.is_empty(), "the error names its basis");
    s
}

/// A memfd guest reading 300 pages and writing 100: exact on both kernels
/// (exhaustive custody on 6.x, RWP on 7.3+), within 1% of the truth.
#[test]
fn memfd_guest_working_set_within_one_percent() {
    let rwp = kernel_has_rwp();
    let mut agent = Agent::start(opts(&[]));
    let mut g = start_guest(
        &agent,
        "sc-memfd",
        Backing::Memfd,
        steady((16, 300), (1000, 100), 12_000),
    );
    let s = measure(&agent, &mut g, 400 * PAGE, 100 * PAGE);
    let want = if rwp {
        vec![
            pb::TrackingMethod::FirstTouch,
            pb::TrackingMethod::SoftDirty,
            pb::TrackingMethod::RwpAsync,
        ]
    } else {
        vec![
            pb::TrackingMethod::FirstTouch,
            pb::TrackingMethod::ShmemExhaustive,
        ]
    };
    assert_eq!(methods(&s), want);
    let err = s.error.clone().unwrap();
    assert_eq!(err.confidence, 1.0);
    assert!(!err.wss_is_lower_bound);
    let w = window(&s, SHORT_MS);
    assert!(rel_err(w.wss_bytes, 400 * PAGE) <= 0.01, "{s:#?}");
    assert!(rel_err(w.dirty_bytes, 100 * PAGE) <= 0.01, "{s:#?}");
    // The long window holds the same pages: nothing else was touched.
    assert_eq!(window(&s, LONG_MS).wss_bytes, w.wss_bytes);
    let v = g.wait_event("verify", Duration::from_secs(120));
    assert_eq!(v["ok"], true, "memory damaged while tracked: {v}");
    g.wait_event("done", Duration::from_secs(60));
    assert!(agent.terminate().success());
    let v = g.verify_now();
    assert_eq!(v["ok"], true, "memory damaged after the agent stopped: {v}");
    assert!(g.finish().success());
}

/// Private anonymous memory: on 6.x reads of present pages are invisible,
/// so the summary says its working set is a lower bound (writes exact); on
/// 7.3+ RWP sees every read and write, within 1%.
#[test]
fn anonymous_guest_exact_with_rwp_lower_bound_without() {
    let rwp = kernel_has_rwp();
    let agent = Agent::start(opts(&[]));
    let mut g = start_guest(
        &agent,
        "sc-anon",
        Backing::Anon,
        steady((16, 300), (1000, 100), 12_000),
    );
    let s = measure(&agent, &mut g, 400 * PAGE, 100 * PAGE);
    let err = s.error.clone().unwrap();
    let w = window(&s, SHORT_MS);
    assert!(
        rel_err(w.dirty_bytes, 100 * PAGE) <= 0.01,
        "writes are exact on both kernels: {s:#?}"
    );
    if rwp {
        assert_eq!(
            methods(&s),
            vec![
                pb::TrackingMethod::FirstTouch,
                pb::TrackingMethod::SoftDirty,
                pb::TrackingMethod::RwpAsync,
            ]
        );
        assert!(!err.wss_is_lower_bound);
        assert!(rel_err(w.wss_bytes, 400 * PAGE) <= 0.01, "{s:#?}");
    } else {
        assert_eq!(
            methods(&s),
            vec![pb::TrackingMethod::FirstTouch, pb::TrackingMethod::WpAsync]
        );
        assert!(err.wss_is_lower_bound, "reads unseen: must say lower bound");
        assert!(w.wss_bytes >= 100 * PAGE && w.wss_bytes <= 400 * PAGE);
    }
    let v = g.wait_event("verify", Duration::from_secs(120));
    assert_eq!(v["ok"], true, "memory damaged while tracked: {v}");
}

/// A Firecracker-created uffd (only EVENT_REMOVE requested, regions
/// registered MISSING by the VMM): its features are fixed, so RWP is out of
/// reach even on 7.3; the agent tracks first touches and writes (soft-dirty
/// bits, so no write waits for it; sync write-protect where the kernel has
/// none) and says what the VMM should request.
#[test]
fn firecracker_uffd_tracked_as_far_as_its_features_allow() {
    let rwp = kernel_has_rwp();
    // Writes by soft-dirty bits where the kernel keeps them (the lane's
    // does), else by sync write-protect, asked for.
    let soft_dirty = wset_tracker::sys::soft_dirty_supported();
    let agent = Agent::start(AgentOpts {
        extra: wset_tests::harness::fc_write_tracking(),
        ..opts(&[])
    });
    let mut g = Guest::builder("fc", steady((16, 300), (1000, 100), 12_000))
        .kind(GuestKind::Process)
        .backing(Backing::Anon)
        .handshake(Handshake::Firecracker)
        .memory_mib(16)
        .fill_seed(21)
        .start(&agent);
    let s = measure(&agent, &mut g, 400 * PAGE, 100 * PAGE);
    let dirty = if soft_dirty {
        pb::TrackingMethod::SoftDirty
    } else {
        pb::TrackingMethod::WpSync
    };
    assert_eq!(methods(&s), vec![pb::TrackingMethod::FirstTouch, dirty]);
    assert!(s.error.as_ref().unwrap().wss_is_lower_bound);
    let w = window(&s, SHORT_MS);
    assert!(rel_err(w.dirty_bytes, 100 * PAGE) <= 0.01, "{s:#?}");
    let info = agent
        .list()
        .into_iter()
        .find(|v| v.vm_id == g.vm_id)
        .expect("listed");
    let names_rwp = info
        .notes
        .iter()
        .any(|n| n.contains("without UFFD_FEATURE_RWP"));
    assert_eq!(
        names_rwp, rwp,
        "the notes tell the VMM to request RWP exactly when the kernel has it: {:?}",
        info.notes
    );
    let v = g.wait_event("verify", Duration::from_secs(120));
    assert_eq!(v["ok"], true, "memory damaged while tracked: {v}");
}

/// The agent holds the only copy of the uffd and dies mid-tracking (SIGKILL,
/// in sync mode where RWP is present, so every protected page would wait on
/// it): the kernel releases the ranges when the uffd closes, and the guest
/// runs on with every byte intact.
#[test]
fn guest_runs_on_intact_after_its_uffd_closes_mid_tracking() {
    let mut agent = Agent::start(opts(&["--rwp", "sync"]));
    let mut g = Guest::builder("sc-closed", steady((16, 300), (1000, 100), 8_000))
        .kind(GuestKind::Process)
        .backing(Backing::Anon)
        .memory_mib(16)
        .fill_seed(21)
        .drop_uffd()
        .start(&agent);
    g.wait_event("phase", Duration::from_secs(30));
    // Let tracking protect and harvest a few times, then kill the agent.
    let e0 = agent.summary(&g.vm_id).expect("summary").epoch;
    agent.wait_summary(&g.vm_id, Duration::from_secs(30), "tracking", |s| {
        s.epoch >= e0 + 3
    });
    agent.kill();
    // The script goes on to its end and its checksums hold.
    let v = g.wait_event("verify", Duration::from_secs(120));
    assert_eq!(v["ok"], true, "memory damaged: {v}");
    g.wait_event("done", Duration::from_secs(120));
    let v = g.verify_now();
    assert_eq!(v["ok"], true, "memory damaged after the uffd closed: {v}");
    assert!(g.finish().success());
}

/// hugetlbfs memory (2 MiB pages) is tracked per huge page on both kernels.
/// Under RWP its writes are not tracked (no soft-dirty bits on hugetlbfs),
/// and the summary says so.
#[test]
fn hugetlbfs_guest_tracked_at_2mib() {
    let rwp = kernel_has_rwp();
    const HP: u32 = 512; // 4 KiB pages per 2 MiB page
    let huge = 2 << 20;
    wset_tests::harness::ensure_hugepages(16);
    let agent = Agent::start(opts(&[]));
    let script = Script::steady(
        vec![
            Touch::read(2 * HP + 7, 10),
            Touch::read(5 * HP, 3),
            Touch::write(7 * HP + 100, 1),
        ],
        12_000,
    );
    let mut g = start_guest(&agent, "sc-huge", Backing::Hugetlb, script);
    let s = measure(&agent, &mut g, 3 * huge, huge);
    assert_eq!(s.granule_bytes, huge);
    let w = window(&s, SHORT_MS);
    assert_eq!(w.wss_bytes, 3 * huge, "{s:#?}");
    if rwp {
        assert_eq!(
            methods(&s),
            vec![pb::TrackingMethod::FirstTouch, pb::TrackingMethod::RwpAsync]
        );
        assert_eq!(w.dirty_bytes, 0, "{s:#?}");
        assert!(
            s.error
                .as_ref()
                .unwrap()
                .basis
                .contains("writes not tracked")
        );
    } else {
        assert_eq!(w.dirty_bytes, huge, "{s:#?}");
    }
    let v = g.wait_event("verify", Duration::from_secs(120));
    assert_eq!(v["ok"], true, "memory damaged while tracked: {v}");
}
