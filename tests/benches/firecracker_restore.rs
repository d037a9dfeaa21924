//! Restoring the real Firecracker from one snapshot through four page-fault
//! handlers, in rotating order, several rounds: Firecracker's own
//! `uffd_on_demand_handler` (the baseline) and `uffd_fault_all_handler`,
//! wset-agent serving on demand (`--prefetch off`), and wset-agent with the
//! learned prefetch after two recording restores.
//!
//! Per restore: load to the guest's first output (its first tick line),
//! the guest's own time for its first check pass (every page of its loop
//! read: the restore working set touched) and for the next one (every page
//! present: the guest's work alone), faults served on demand, bytes copied
//! into guest memory, and the handler's CPU until the first output.
//! Medians over the rounds, and ratios against the baseline. Guest code
//! runs emulated on this machine's KVM (about 100x slower than hardware),
//! which stretches the guest's own work much more than the handlers': the
//! ratios of whole guest-side times understate what the same handlers give
//! on hardware, where fault round trips are a larger share of a restore.
//! The restore's own cost is the first pass less the steady one; its
//! ratios are printed too.
//!
//! Run: cargo build --release --bins && cargo bench -p wset-tests --bench firecracker_restore
//! WSET_BENCH_ROUNDS rounds (default 5); WSET_FC_MEM_MIB and WSET_FC_LOOP_MIB
//! the guest (default 256 and 64, the bundle's own defaults).

use std::time::{Duration, Instant};

use wset_proto::v1 as pb;
use wset_tests::harness::firecracker::{Firecracker, Handler, Snapshot, bundle};
use wset_tests::harness::{Agent, AgentOpts, wait_for};

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Arm {
    OnDemandHandler,
    FaultAllHandler,
    WsetOnDemand,
    WsetPrefetch,
}

impl Arm {
    fn name(self) -> &'static str {
        match self {
            Arm::OnDemandHandler => "uffd_on_demand_handler",
            Arm::FaultAllHandler => "uffd_fault_all_handler",
            Arm::WsetOnDemand => "wset, on demand",
            Arm::WsetPrefetch => "wset, learned prefetch",
        }
    }
}

#[derive(Clone, Copy, Debug, Default)]
struct Run {
    first_output_ms: f64,
    first_pass_ms: f64,
    /// The next pass, with every page the loop uses present: what the
    /// guest's work alone costs here.
    steady_pass_ms: f64,
    faults: f64,
    copied_mib: f64,
    cpu_ms: f64,
}

/// utime + stime of `pid`, in milliseconds.
fn cpu_ms(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let rest = stat.rfind(')').map_or("", |i| &stat[i + 2..]);
    let f: Vec<u64> = rest
        .split_whitespace()
        .map(|x| x.parse().unwrap_or(0))
        .collect();
    // Fields 14 and 15 of proc(5); `rest` starts at field 3.
    let ticks = f.get(11).copied().unwrap_or(0) + f.get(12).copied().unwrap_or(0);
    let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .unwrap_or(100)
        .max(1) as f64;
    ticks as f64 * 1000.0 / hz
}

fn vm_of(agent: &Agent, fc: &Firecracker) -> pb::VmInfo {
    wait_for(Duration::from_secs(60), "the restored VM listed", || {
        agent
            .list()
            .into_iter()
            .find(|v| v.vmm_pid == fc.pid() && v.state == pb::VmState::Tracking as i32)
    })
}

/// One restore through `arm`, ended after the guest's first tick.
fn restore(arm: Arm, snap: &Snapshot, on_demand: &Agent, prefetch: &Agent, n: usize) -> Run {
    let tag = format!("fc-bench-{n}");
    let tick = Duration::from_secs(600);
    let (handler, agent) = match arm {
        Arm::OnDemandHandler => (Some(Handler::start(false, snap)), None),
        Arm::FaultAllHandler => (Some(Handler::start(true, snap)), None),
        Arm::WsetOnDemand => (None, Some(on_demand)),
        Arm::WsetPrefetch => (None, Some(prefetch)),
    };
    let (socket, pid) = match (&handler, agent) {
        (Some(h), _) => (h.socket.clone(), h.pid()),
        (None, Some(a)) => (a.socket.clone(), a.pid()),
        _ => unreachable!(),
    };
    let cpu0 = cpu_ms(pid);
    let mut fc = Firecracker::restore(&tag, snap, &socket);
    let mem = fc.guest_memory(snap.mem_bytes);
    let (t, at) = fc.next_tick(tick);
    assert!(t.ok, "{}: the guest's check failed: {t:?}", arm.name());
    let cpu = cpu_ms(pid) - cpu0;
    let present = fc.present_bytes(&mem);
    let (steady, _) = fc.next_tick(tick);
    assert!(
        steady.ok,
        "{}: the guest's check failed: {steady:?}",
        arm.name()
    );
    let faults = match agent {
        Some(a) => {
            let vm = vm_of(a, &fc);
            let c = a
                .summary(&vm.vm_id)
                .expect("summary")
                .counters
                .expect("counters");
            c.missing_faults as f64
        }
        // Firecracker's example handlers copy one page per fault, or
        // everything on the first one.
        None if arm == Arm::OnDemandHandler => (present / 4096) as f64,
        None => 1.0,
    };
    let run = Run {
        first_output_ms: at.duration_since(fc.started).as_secs_f64() * 1000.0,
        first_pass_ms: t.verify_ms as f64,
        steady_pass_ms: steady.verify_ms as f64,
        faults,
        copied_mib: present as f64 / f64::from(1 << 20),
        cpu_ms: cpu,
    };
    let vm = agent.map(|a| (a, vm_of(a, &fc).vm_id));
    fc.kill();
    // The agent writes the restore's recording when the VM's tracking ends.
    if let Some((a, id)) = vm {
        a.wait_summary(&id, Duration::from_secs(30), "retired", |s| {
            s.state == pb::VmState::Retired as i32
        });
    }
    run
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn main() {
    let rounds = env("WSET_BENCH_ROUNDS", 5) as usize;
    let (mem_mib, loop_mib) = (env("WSET_FC_MEM_MIB", 256), env("WSET_FC_LOOP_MIB", 64));
    println!(
        "Firecracker ({}), a {mem_mib} MiB guest whose loop covers {loop_mib} MiB; {rounds} rounds",
        bundle().origin
    );
    let t0 = Instant::now();
    let snap = Firecracker::boot("fc-bench-boot", mem_mib, loop_mib).snapshot(loop_mib);
    println!(
        "booted and snapshotted in {:.0} s",
        t0.elapsed().as_secs_f64()
    );
    let agent = |prefetch: bool| {
        Agent::start(AgentOpts {
            snapshot: Some(snap.mem.clone()),
            extra: if prefetch {
                vec![]
            } else {
                vec!["--prefetch".into(), "off".into()]
            },
            ..Default::default()
        })
    };
    let (on_demand, prefetch) = (agent(false), agent(true));
    let mut n = 0;
    for i in 0..2 {
        let r = restore(Arm::WsetPrefetch, &snap, &on_demand, &prefetch, n);
        n += 1;
        println!("recording restore {}: {r:?}", i + 1);
    }
    let arms = [
        Arm::OnDemandHandler,
        Arm::FaultAllHandler,
        Arm::WsetOnDemand,
        Arm::WsetPrefetch,
    ];
    let mut runs: Vec<Vec<Run>> = vec![Vec::new(); arms.len()];
    for round in 0..rounds {
        for k in 0..arms.len() {
            let a = (round + k) % arms.len();
            let r = restore(arms[a], &snap, &on_demand, &prefetch, n);
            n += 1;
            println!("round {} {}: {r:?}", round + 1, arms[a].name());
            runs[a].push(r);
        }
    }
    let med = |a: usize, f: fn(&Run) -> f64| median(runs[a].iter().map(f).collect());
    let base = |f: fn(&Run) -> f64| med(0, f);
    println!(
        "\n{:<24} {:>9} {:>9} {:>9} {:>9} {:>8} {:>7} {:>8} {:>8} {:>8} {:>8}",
        "handler (median)",
        "out (s)",
        "pass (s)",
        "next (s)",
        "extra (s)",
        "faults",
        "MiB",
        "CPU ms",
        "out vs1",
        "pass vs1",
        "extra vs1"
    );
    let extra = |r: &Run| (r.first_pass_ms - r.steady_pass_ms).max(1.0);
    for (a, arm) in arms.iter().enumerate() {
        let out = med(a, |r| r.first_output_ms);
        let pass = med(a, |r| r.first_pass_ms);
        let x = med(a, extra);
        println!(
            "{:<24} {:>9.2} {:>9.2} {:>9.2} {:>9.2} {:>8.0} {:>7.1} {:>8.0} {:>7.2}x {:>7.2}x {:>7.2}x",
            arm.name(),
            out / 1000.0,
            pass / 1000.0,
            med(a, |r| r.steady_pass_ms) / 1000.0,
            x / 1000.0,
            med(a, |r| r.faults),
            med(a, |r| r.copied_mib),
            med(a, |r| r.cpu_ms),
            base(|r| r.first_output_ms) / out,
            base(|r| r.first_pass_ms) / pass,
            base(extra) / x,
        );
    }
    // Per-fault service cost, the same way for every handler that serves
    // faults one at a time: its CPU over the faults it served.
    for a in [0usize, 2] {
        println!(
            "{}: {:.1} us of handler CPU per fault served (median over rounds)",
            arms[a].name(),
            med(a, |r| r.cpu_ms * 1000.0 / r.faults.max(1.0))
        );
    }
    let (f0, f3) = (med(0, |r| r.faults), med(3, |r| r.faults));
    println!(
        "\nwset with the learned prefetch: {:.1}% fewer faults on demand than uffd_on_demand_handler",
        (1.0 - f3 / f0) * 100.0
    );
}
