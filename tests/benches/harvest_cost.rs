//! Harvest cost on Linux 7.3+: the real agent tracks a process guest of
//! known pattern with RWP (async, the default) and, in the same run, with the
//! mainline WP_ASYNC dirty harvest (`--rwp off`), the comparable baseline.
//! For each, per interval: the time the tracker spends harvesting and
//! re-protecting (per GiB tracked), and the faults the guest takes (minor
//! faults of the guest process, which include the kernel-resolved RWP and
//! WP_ASYNC faults that never reach the agent).
//!
//! It needs an RWP kernel: `scripts/kernel-lane.sh --bench` runs it in the
//! lane (software emulation: absolute times are QEMU's, ratios are what
//! carry over). WSET_BENCH_MIB sets the guest size (default 512).

use std::time::Duration;

use wset_guest::script::{Op, Phase, Script, Touch};
use wset_tests::harness::{Agent, AgentOpts, Backing, Guest, GuestKind};

const INTERVAL_MS: u64 = 1000;
const MEASURED_INTERVALS: u64 = 6;

fn mib() -> u64 {
    std::env::var("WSET_BENCH_MIB")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(512)
}

fn minor_faults(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("guest stat");
    // Fields after the command (which may hold spaces): state is field 3,
    // minflt field 10.
    let rest = &stat[stat.rfind(')').expect("stat format") + 2..];
    rest.split(' ')
        .nth(7)
        .and_then(|s| s.parse().ok())
        .expect("minflt")
}

struct Figures {
    harvest_ms: f64,
    guest_faults: f64,
    wss_pages: u64,
}

fn run(rwp: &str, touched_pages: u32) -> Figures {
    let agent = Agent::start(AgentOpts {
        interval_ms: INTERVAL_MS,
        windows_ms: vec![INTERVAL_MS * 2],
        access: "exhaustive".into(),
        extra: vec!["--rwp".into(), rwp.into()],
        snapshot: None,
        state_dir: None,
        grpc_addr: None,
        env: vec![],
    });
    let p = Phase {
        name: "work".into(),
        // Writes, so both methods see every touched page.
        touches: vec![Touch {
            op: Op::Write,
            start: 16,
            pages: touched_pages,
        }],
        duration_ms: 600_000,
        period_ms: 200,
    };
    let mut g = Guest::builder(
        &format!("harvest-{rwp}-{touched_pages}"),
        Script {
            phases: vec![p],
            checksum_every: 0,
        },
    )
    .kind(GuestKind::Process)
    .backing(Backing::Anon)
    .memory_mib(mib())
    .fill_seed(1)
    .start(&agent);
    g.wait_event("phase", Duration::from_secs(300));
    let e0 = agent.summary(&g.vm_id).expect("summary").epoch;
    let s1 = agent.wait_summary(&g.vm_id, Duration::from_secs(120), "warm", |s| {
        s.epoch >= e0 + 3
    });
    let f1 = minor_faults(g.pid());
    let s2 = agent.wait_summary(&g.vm_id, Duration::from_secs(300), "measured", |s| {
        s.epoch >= s1.epoch + MEASURED_INTERVALS
    });
    let f2 = minor_faults(g.pid());
    let (c1, c2) = (s1.counters.unwrap(), s2.counters.unwrap());
    let k = (c2.harvests - c1.harvests).max(1) as f64;
    let fig = Figures {
        harvest_ms: (c2.harvest_ns_total - c1.harvest_ns_total) as f64 / k / 1e6,
        guest_faults: (f2 - f1) as f64 / k,
        wss_pages: s2.windows[0].wss_bytes / 4096,
    };
    g.kill();
    drop(agent);
    fig
}

fn main() {
    let gib = mib() as f64 / 1024.0;
    println!(
        "harvest cost, {} MiB anonymous process guest, {INTERVAL_MS} ms interval, {MEASURED_INTERVALS} intervals each",
        mib()
    );
    for frac in [0.01, 0.10, 0.50] {
        let pages = ((mib() * 256) as f64 * frac) as u32;
        let rwp = run("async", pages);
        let wp = run("off", pages);
        println!(
            "  {:>4.0}% of pages touched ({pages} pages): RWP async harvest {:.2} ms/interval \
             ({:.2} ms per GiB), guest faults {:.0}/interval, wss {} pages | WP_ASYNC harvest \
             {:.2} ms ({:.2} ms per GiB), guest faults {:.0}/interval | RWP/WP_ASYNC harvest \
             time {:.2}x",
            frac * 100.0,
            rwp.harvest_ms,
            rwp.harvest_ms / gib,
            rwp.guest_faults,
            rwp.wss_pages,
            wp.harvest_ms,
            wp.harvest_ms / gib,
            wp.guest_faults,
            rwp.harvest_ms / wp.harvest_ms
        );
    }
}
