//! The real Firecracker (v1.16.1, `scripts/firecracker.sh`): a memloop guest
//! booted once and snapshotted, then restored through wset-agent, through
//! two at once, across kills of the agent before and after the guest's
//! pages are present, a SIGTERM and Firecracker's own death, and through
//! Firecracker's own example handler. The guest checks its memory every
//! tick (nine words of every page of its loop); every check must pass.

use std::time::Duration;

use wset_proto::v1 as pb;
use wset_tests::harness::firecracker::{Firecracker, Handler, Snapshot};
use wset_tests::harness::{Agent, AgentOpts, Shared, TempDir, ensure_hugepages, wait_for};

/// Guest memory and the part of it the guest's loop runs over. Small, so a
/// boot and a restore take seconds of this machine's emulated guest time.
const MEM_MIB: u64 = 128;
const LOOP_MIB: u64 = 16;
/// Generous: guest code runs emulated here, about 100x slower than hardware.
const TICK: Duration = Duration::from_secs(180);

static SNAPSHOT: Shared<Snapshot> =
    Shared::new(|| Firecracker::boot("fc-boot", MEM_MIB, LOOP_MIB).snapshot(LOOP_MIB));

/// 2 MiB pages of one guest's memory.
const HUGE_PAGES: u64 = MEM_MIB / 2;

/// The same guest with its memory on 2 MiB hugetlbfs pages.
static HUGE_SNAPSHOT: Shared<Snapshot> = Shared::new(|| {
    ensure_hugepages(HUGE_PAGES);
    Firecracker::boot_huge("fc-boot-huge", MEM_MIB, LOOP_MIB).snapshot(LOOP_MIB)
});

fn agent(snap: &Snapshot, state: Option<&TempDir>, extra: &[&str]) -> Agent {
    Agent::start(AgentOpts {
        snapshot: Some(snap.mem.clone()),
        state_dir: state.map(|s| s.0.clone()),
        extra: extra.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    })
}

/// The agent's VM for this Firecracker, once it is listed.
fn listed(agent: &Agent, fc: &Firecracker) -> pb::VmInfo {
    wait_for(Duration::from_secs(60), "the restored VM listed", || {
        agent
            .list()
            .into_iter()
            .find(|v| v.vmm_pid == fc.pid() && v.state == pb::VmState::Tracking as i32)
    })
}

fn counters(agent: &Agent, vm_id: &str) -> pb::TrackerCounters {
    agent
        .summary(vm_id)
        .expect("summary")
        .counters
        .expect("counters")
}

/// The vCPU thread of `fc` sleeps waiting for a page-fault handler.
fn vcpu_waits_on_a_fault(fc: &Firecracker) -> bool {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{}/task", fc.pid())) else {
        return false;
    };
    tasks.flatten().any(|t| {
        let read = |f: &str| std::fs::read_to_string(t.path().join(f)).unwrap_or_default();
        read("comm").starts_with("fc_vcpu") && read("wchan").contains("handle_userfault")
    })
}

/// Every page comes from the snapshot file: the guest's own checks pass,
/// and the agent's MISSING count is exactly the guest memory resident in
/// Firecracker.
#[test]
fn restore_is_served_exactly_from_the_snapshot_file() {
    let snap = SNAPSHOT.get();
    let agent = agent(snap, None, &[]);
    let fc = Firecracker::restore("fc-exact", snap, &agent.socket);
    let vm = listed(&agent, &fc);
    assert_eq!(vm.handshake, "firecracker");
    assert_eq!(vm.memory_bytes, snap.mem_bytes);
    fc.wait_tick(TICK);
    fc.wait_tick(TICK);
    let c = counters(&agent, &vm.vm_id);
    let present = fc.present_bytes(&fc.guest_memory(snap.mem_bytes)) / 4096;
    assert_eq!(
        c.missing_faults, present,
        "every present page was filled by the agent, once"
    );
    assert!(
        c.missing_faults >= snap.loop_pages,
        "the loop alone touches {} pages: {c:?}",
        snap.loop_pages
    );
    let s = agent.summary(&vm.vm_id).unwrap();
    assert!(
        s.touched_bytes >= snap.loop_pages * 4096,
        "touched {} of a loop of {} pages",
        s.touched_bytes,
        snap.loop_pages
    );
}

/// Two VMs restored from one snapshot at once, through one agent (a socket
/// each), each checking its memory.
#[test]
fn two_vms_restore_at_once_through_one_agent() {
    let snap = SNAPSHOT.get();
    let second = TempDir::new("fc-two");
    let sock_b = second.0.join("b.sock");
    let arg = format!("{}={}", sock_b.display(), snap.mem.display());
    let agent = agent(snap, None, &["--socket", &arg]);
    let a = Firecracker::restore("fc-a", snap, &agent.socket);
    let b = Firecracker::restore("fc-b", snap, &sock_b);
    let (va, vb) = (listed(&agent, &a), listed(&agent, &b));
    assert_ne!(va.vm_id, vb.vm_id);
    for _ in 0..2 {
        a.wait_tick(TICK);
        b.wait_tick(TICK);
    }
    assert_eq!(agent.list().len(), 2);
}

/// Once the pages the guest uses are present, nothing it does waits for
/// the agent: killed with -9, the agent leaves the guest checking its
/// memory tick after tick; a restarted agent takes the VM back.
#[test]
fn the_guest_runs_on_while_the_agent_is_dead() {
    let snap = SNAPSHOT.get();
    let state = TempDir::new("fc-dead-state");
    let mut first = agent(snap, Some(&state), &[]);
    let fc = Firecracker::restore("fc-dead", snap, &first.socket);
    let vm = listed(&first, &fc);
    assert!(
        vm.notes
            .iter()
            .any(|n| n.contains("no write waits for the agent")),
        "the notes say what a dead agent costs: {:?}",
        vm.notes
    );
    // Two whole passes: every page of the loop is present.
    fc.wait_tick(TICK);
    fc.wait_tick(TICK);
    first.kill();
    for _ in 0..3 {
        fc.wait_tick(TICK);
    }
    let again = agent(snap, Some(&state), &[]);
    again.wait_log("VM re-adopted", Duration::from_secs(30));
    let back = listed(&again, &fc);
    assert_eq!(back.vm_id, vm.vm_id);
    fc.wait_tick(TICK);
}

/// Killed while the restore is under way, the agent leaves the guest
/// waiting on a page (Firecracker's design: its faults have no other
/// handler); the restarted agent takes the VM back, serves the waiting
/// fault from the snapshot, and every check passes.
#[test]
fn killed_during_the_restore_the_guest_waits_and_is_taken_back() {
    let snap = SNAPSHOT.get();
    let state = TempDir::new("fc-mid-state");
    let mut first = agent(snap, Some(&state), &[]);
    let fc = Firecracker::restore("fc-mid", snap, &first.socket);
    let vm = listed(&first, &fc);
    // Part of the way in: some pages served, most of the loop still absent.
    wait_for(
        Duration::from_secs(120),
        "a few hundred pages served",
        || (counters(&first, &vm.vm_id).missing_faults > 300).then_some(()),
    );
    let served = counters(&first, &vm.vm_id).missing_faults;
    assert!(
        served < snap.loop_pages,
        "the restore was over ({served} pages) before the kill"
    );
    first.kill();
    wait_for(
        Duration::from_secs(60),
        "the vCPU waiting on a page fault",
        || vcpu_waits_on_a_fault(&fc).then_some(()),
    );
    let again = agent(snap, Some(&state), &[]);
    again.wait_log("VM re-adopted", Duration::from_secs(30));
    assert_eq!(listed(&again, &fc).vm_id, vm.vm_id);
    fc.wait_tick(TICK);
    fc.wait_tick(TICK);
}

/// SIGTERM: the agent copies in every page the guest has not touched, so
/// nothing is left to wait for; it exits cleanly and the guest runs on.
#[test]
fn sigterm_fills_every_page_and_the_guest_runs_on() {
    let snap = SNAPSHOT.get();
    let mut agent = agent(snap, None, &[]);
    let fc = Firecracker::restore("fc-term", snap, &agent.socket);
    listed(&agent, &fc);
    let mem = fc.guest_memory(snap.mem_bytes);
    fc.wait_tick(TICK);
    assert!(
        fc.present_bytes(&mem) < snap.mem_bytes,
        "the guest touched all of its memory"
    );
    assert!(
        agent.terminate().success(),
        "the agent's exit after SIGTERM"
    );
    assert_eq!(
        fc.present_bytes(&mem),
        snap.mem_bytes,
        "every page of guest memory is present"
    );
    fc.wait_tick(TICK);
    fc.wait_tick(TICK);
}

/// Firecracker killed: the VM is retired, and the agent serves on.
#[test]
fn firecracker_killed_retires_the_vm() {
    let snap = SNAPSHOT.get();
    let agent = agent(snap, None, &[]);
    let mut fc = Firecracker::restore("fc-gone", snap, &agent.socket);
    let vm = listed(&agent, &fc);
    fc.wait_tick(TICK);
    fc.kill();
    agent.wait_summary(&vm.vm_id, Duration::from_secs(30), "retired", |s| {
        s.state == pb::VmState::Retired as i32
    });
}

/// The same snapshot through Firecracker's own example handler: the
/// snapshot, not wset, is what the other tests' guests run from.
#[test]
fn firecrackers_own_handler_restores_the_same_snapshot() {
    let snap = SNAPSHOT.get();
    let h = Handler::start(false, snap);
    let fc = Firecracker::restore("fc-theirs", snap, &h.socket);
    fc.wait_tick(TICK);
    fc.wait_tick(TICK);
}

/// Three restores of `snap` through one agent, each ended after two good
/// ticks: per restore, the faults served on demand, the pages prefetched
/// and the VM's notes.
fn three_restores(
    snap: &Snapshot,
    tag: &str,
    page_size: u64,
    extra: &[&str],
) -> Vec<(u64, u64, Vec<String>)> {
    let agent = agent(snap, None, extra);
    let mut seen = Vec::new();
    let mut probes = Vec::new();
    for i in 0..3 {
        let mut fc = Firecracker::restore(&format!("{tag}-{i}"), snap, &agent.socket);
        let vm = listed(&agent, &fc);
        assert_eq!(vm.page_size_bytes, page_size);
        assert_eq!(vm.granule_bytes, page_size);
        fc.wait_tick(TICK);
        fc.wait_tick(TICK);
        let c = counters(&agent, &vm.vm_id);
        seen.push((c.missing_faults, c.prefetched_pages, vm.notes.clone()));
        // Its recording is written when its tracking ends.
        fc.kill();
        let s = agent.wait_summary(&vm.vm_id, Duration::from_secs(30), "retired", |s| {
            s.state == pb::VmState::Retired as i32
        });
        let c = s.counters.expect("counters");
        probes.push((c.prefetch_probes, c.prefetch_probes_untouched));
    }
    eprintln!("{tag}: (probes withheld, of them untouched) {probes:?}");
    assert_eq!(
        probes[0],
        (0, 0),
        "nothing to withhold before anything is learned"
    );
    let (withheld, untouched) = probes[2];
    assert!(
        withheld > 0,
        "the third restore withheld no probes: {probes:?}"
    );
    assert!(
        untouched * 10 <= withheld,
        "the guest's loop touches its whole set every restore: {probes:?}"
    );
    seen
}

/// Two restores record which pages the guest touches and in what order;
/// the third copies them in ahead of the guest: at least 95% fewer faults
/// served on demand than the first restore, every check passing.
#[test]
fn learned_prefetch_takes_the_restore_working_set_off_the_fault_path() {
    let snap = SNAPSHOT.get();
    let seen = three_restores(snap, "fc-learn", 4096, &[]);
    let figures: Vec<(u64, u64)> = seen.iter().map(|(f, p, _)| (*f, *p)).collect();
    eprintln!("restores: (faults on demand, pages prefetched) {figures:?}");
    let (cold, cold_prefetched, _) = &seen[0];
    let (warm, prefetched, notes) = &seen[2];
    assert_eq!(
        *cold_prefetched, 0,
        "nothing is known before the first restore"
    );
    assert_eq!(seen[1].1, 0, "a page joins once seen in two restores");
    assert!(
        notes
            .iter()
            .any(|n| n.contains("copied in ahead of the guest")),
        "{notes:?}"
    );
    assert!(
        *prefetched >= snap.loop_pages,
        "prefetched {prefetched} pages of a loop of {}",
        snap.loop_pages
    );
    assert!(
        warm * 20 <= *cold,
        "faults served on demand: {cold} on the first restore, {warm} with the prefetch \
         (at least 95% fewer expected)"
    );
}

/// A guest on 2 MiB hugetlbfs pages: served from the snapshot at 2 MiB,
/// tracked at 2 MiB, and prefetched at 2 MiB once two restores taught the
/// set.
#[test]
fn hugetlbfs_restores_are_served_and_prefetched_in_huge_pages() {
    let snap = HUGE_SNAPSHOT.get();
    ensure_hugepages(HUGE_PAGES);
    // A set of a few dozen huge pages: withhold 1 in 4, so some are.
    let seen = three_restores(snap, "fc-huge", 2 << 20, &["--prefetch-probe", "4"]);
    let figures: Vec<(u64, u64)> = seen.iter().map(|(f, p, _)| (*f, *p)).collect();
    eprintln!("hugetlbfs restores: (faults on demand, pages prefetched) {figures:?}");
    let (cold, warm, prefetched) = (figures[0].0, figures[2].0, figures[2].1);
    let loop_huge = snap.loop_pages / 512;
    assert!(cold >= loop_huge, "{figures:?}");
    assert!(prefetched >= loop_huge, "{figures:?}");
    assert!(warm * 2 <= cold, "{figures:?}");
}
