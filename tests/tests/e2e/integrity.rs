//! Guest integrity under sampling, for minutes: a KVM guest checksums its
//! memory (in the guest, 16 points per page) while the agent samples it with
//! the default sample size, and a process guest checksums every word while
//! tracked exhaustively (every accessed page goes through custody every
//! interval). Every checksum must match; after SIGTERM every page must be
//! back, checked word by word through the VMM's mapping.
//!
//! WSET_INTEGRITY_SECS sets the duration (default 120).

use std::time::Duration;

use wset_guest::script::{Op, Phase, Script, Touch};
use wset_tests::harness::{Agent, AgentOpts, Guest, GuestKind};

fn secs() -> u64 {
    std::env::var("WSET_INTEGRITY_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(120)
}

fn run(kind: GuestKind, access: &str, mem_mib: u64, checksum_every: u32) {
    let mut agent = Agent::start(AgentOpts {
        interval_ms: 100,
        access: access.into(),
        ..Default::default()
    });
    let dur = secs() * 1000;
    let p = Phase {
        name: "churn".into(),
        touches: vec![
            Touch {
                op: Op::Read,
                start: 16,
                pages: 600,
            },
            Touch {
                op: Op::Write,
                start: 1000,
                pages: 300,
            },
        ],
        duration_ms: dur,
        period_ms: 50,
    };
    let mut g = Guest::builder(
        &format!("integrity-{kind}"),
        Script {
            phases: vec![p],
            checksum_every,
        },
    )
    .kind(kind)
    .memory_mib(mem_mib)
    .fill_seed(0xC0FFEE)
    .start(&agent);
    let v = g.wait_event(
        "verify",
        Duration::from_millis(dur) + Duration::from_secs(120),
    );
    let s = agent.summary(&g.vm_id).unwrap();
    let c = s.counters.unwrap();
    eprintln!(
        "{kind}/{access}: {} in-guest checksums, {} pages taken into custody, {} faults; verify {v}",
        v["checks"], c.sampled_pages, c.faults_handled
    );
    assert!(
        c.sampled_pages > 10_000,
        "too little sampling to judge: {c:?}"
    );
    assert!(
        v["checks"].as_u64().unwrap() >= 5,
        "too few checksums to judge: {v}"
    );
    assert_eq!(v["ok"], true, "memory changed under the agent: {v}");
    assert!(agent.terminate().success());
    let v = g.verify_now();
    assert_eq!(v["ok"], true, "memory incomplete after SIGTERM: {v}");
    assert!(g.finish().success());
}

#[test]
fn kvm_guest_checksums_hold_while_sampled_for_minutes() {
    run(GuestKind::Kvm, "4096", 32, 5);
}

#[test]
fn process_guest_checksums_hold_while_tracked_exhaustively_for_minutes() {
    run(GuestKind::Process, "exhaustive", 32, 1);
}
