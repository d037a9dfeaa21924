//! Guest slowdown with tracking on vs off: the same guest workload runs for a
//! fixed time untracked (no agent) and tracked by the real agent at its
//! default settings (2 s interval, 200 us busy-poll; sampled read tracking of 4096 granules on
//! memfd memory, WP_ASYNC dirty tracking on anonymous memory), in
//! alternating rounds; the ratio of work done is the slowdown.
//!
//! On memfd guests a third arm runs the agent with `--sample-fault-budget 0`
//! (every hot sampled granule re-armed every interval), which shows what the
//! default fault budget saves.
//!
//! Run: cargo build --release --bins && cargo bench -p wset-tests --bench guest_slowdown
//! WSET_BENCH_SECS sets each round's length (default 10), WSET_BENCH_ROUNDS
//! the number of rounds per configuration (default 5).

use std::time::Duration;

use wset_guest::script::{Op, Phase, Script, Touch};
use wset_tests::harness::{Agent, AgentOpts, Backing, Guest, GuestKind, Handshake};

fn secs() -> u64 {
    std::env::var("WSET_BENCH_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(10)
}

fn rounds() -> usize {
    std::env::var("WSET_BENCH_ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(5)
}

#[derive(Clone, Copy, PartialEq)]
enum Arm {
    Untracked,
    Defaults,
    NoBudget,
}

fn default_agent(arm: Arm) -> Agent {
    Agent::start(AgentOpts {
        interval_ms: 2000,
        windows_ms: vec![10_000, 60_000, 300_000, 1_800_000],
        access: "4096".into(),
        extra: if arm == Arm::NoBudget {
            vec!["--sample-fault-budget".into(), "0".into()]
        } else {
            vec![]
        },
        snapshot: None,
        state_dir: None,
        grpc_addr: None,
        env: vec![],
    })
}

/// Work done (periods of the script) in one round.
fn round(kind: GuestKind, backing: Backing, arm: Arm) -> f64 {
    let p = Phase {
        name: "work".into(),
        touches: vec![
            Touch {
                op: Op::Read,
                start: 16,
                pages: 4000,
            },
            Touch {
                op: Op::Write,
                start: 8000,
                pages: 1000,
            },
        ],
        duration_ms: secs() * 1000,
        period_ms: 0,
    };
    let o = Guest::builder(
        &format!("bench-{kind}-{backing}"),
        Script {
            phases: vec![p],
            checksum_every: 0,
        },
    )
    .kind(kind)
    .backing(backing)
    .memory_mib(256)
    .fill_seed(1);
    let (agent, mut g) = if arm != Arm::Untracked {
        let a = default_agent(arm);
        let g = o.start(&a);
        (Some(a), g)
    } else {
        (
            None,
            o.handshake(Handshake::None)
                .start_at(std::path::Path::new("/nonexistent")),
        )
    };
    let done = g.wait_event("done", Duration::from_secs(secs() + 120));
    drop(g);
    drop(agent);
    done["periods"].as_f64().expect("periods")
        / (done["elapsed_ms"].as_f64().expect("elapsed") / 1000.0)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    println!(
        "guest slowdown, tracking on (agent defaults) vs off, {} alternating rounds of {} s, median:",
        rounds(),
        secs()
    );
    for (kind, backing) in [
        (GuestKind::Kvm, Backing::Memfd),
        (GuestKind::Kvm, Backing::Anon),
        (GuestKind::Process, Backing::Memfd),
        (GuestKind::Process, Backing::Anon),
    ] {
        let mut arms = vec![Arm::Untracked, Arm::Defaults];
        if backing == Backing::Memfd {
            arms.push(Arm::NoBudget);
        }
        let mut results: Vec<Vec<f64>> = vec![Vec::new(); arms.len()];
        for r in 0..rounds() {
            // Rotate the order so no arm always runs first.
            for i in 0..arms.len() {
                let a = (i + r) % arms.len();
                results[a].push(round(kind, backing, arms[a]));
            }
            eprintln!("{kind}/{backing}: round {}/{} done", r + 1, rounds());
        }
        let m: Vec<f64> = results.into_iter().map(median).collect();
        let (off, on) = (m[0], m[1]);
        println!(
            "  {kind:>7} guest, {backing:>5}: untracked {off:>9.1} passes/s, tracked {on:>9.1} passes/s, ratio {:.3}x, slowdown {:+.2}% (target <= 2%)",
            on / off,
            (1.0 - on / off) * 100.0
        );
        if let Some(&nb) = m.get(2) {
            println!(
                "  {kind:>7} guest, {backing:>5}: without the fault budget {nb:>9.1} passes/s, ratio {:.3}x, slowdown {:+.2}%",
                nb / off,
                (1.0 - nb / off) * 100.0
            );
        }
    }
}
