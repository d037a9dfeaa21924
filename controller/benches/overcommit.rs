//! Overcommit policies compared on the same simulated traces (not a timed
//! test): how much guest memory each admits per host, and how often the
//! admitted VMs' real working sets then overflow the host.
//!
//! Each host (256 GiB for VMs) is offered VMs (8 GiB each, shapes from the
//! simulated fleet mix) one at a time; a policy admits them while it deems
//! the host safe, judging from the first hour of each trace. The second
//! hour is then replayed: a host-minute whose summed working set exceeds
//! the capacity is a violation.
//!
//! - fixed ratio (KubeVirt style): guest memory up to 1.5x capacity;
//! - average usage (Watcher style): the VMs' mean working sets up to 85%;
//! - wset: the planner's demand (phase changes, growth over the horizon,
//!   spread) at 1% risk up to 85% (its default watermark), and up to 100%
//!   (the risk model alone).
//!
//! `cargo bench -p wset-controller --bench overcommit` (WSET_BENCH_HOSTS,
//! default 200).

use wset_controller::planner::{Config, Sample, VmInput, demand, normal_quantile};
use wset_controller::sim::{Rng, pick_shape, trace};
use wset_proto::ids::{HostId, VmId};

const GIB: u64 = 1 << 30;
const CAPACITY: u64 = 256 * GIB;
const VM: u64 = 8 * GIB;
const STEP_MS: u64 = 60_000;
const HOUR: usize = 60;

struct Candidate {
    history: Vec<Sample>,
    future: Vec<u64>,
}

fn vm(id: &str) -> VmId {
    id.parse().expect("a VM id")
}

fn host(id: &str) -> HostId {
    id.parse().expect("a host id")
}

fn candidate(rng: &mut Rng) -> Candidate {
    let shape = pick_shape(rng);
    let t = trace(rng, shape, VM, 0, STEP_MS, 2 * HOUR);
    Candidate {
        history: t[..HOUR].to_vec(),
        future: t[HOUR..].iter().map(|s| s.wss_bytes).collect(),
    }
}

#[derive(Default)]
struct Outcome {
    committed: u64,
    host_minutes: u64,
    violations: u64,
    hosts_violating: u64,
    worst_over: f64,
}

fn main() {
    let hosts: usize = std::env::var("WSET_BENCH_HOSTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200);
    let cfg = Config {
        horizon_ms: HOUR as u64 * STEP_MS,
        lookback_ms: HOUR as u64 * STEP_MS,
        ..Config::default()
    };
    let z = normal_quantile(1.0 - cfg.risk);
    let now = HOUR as u64 * STEP_MS;
    let cap = CAPACITY as f64;
    let names = [
        "no overcommit (1.0x)",
        "fixed ratio 1.5x",
        "average usage, 85%",
        "wset, 1% risk, 85%",
        "wset, 1% risk, 100%",
    ];
    let mut out: Vec<Outcome> = (0..names.len()).map(|_| Outcome::default()).collect();
    for h in 0..hosts {
        // Every policy sees the same candidates in the same order.
        let mut rng = Rng::new(h as u64 + 1);
        let pool: Vec<Candidate> = (0..200).map(|_| candidate(&mut rng)).collect();
        let demands: Vec<(f64, f64, f64)> = pool
            .iter()
            .map(|c| {
                let v = VmInput {
                    samples: c.history.clone(),
                    relative_error: 0.01,
                    ..VmInput::new(vm("candidate"), host("h"), VM)
                };
                let d = demand(&v, &cfg, now);
                let mean_hist =
                    c.history.iter().map(|s| s.wss_bytes as f64).sum::<f64>() / HOUR as f64;
                (d.mean_bytes, d.std_bytes, mean_hist)
            })
            .collect();
        for (p, o) in out.iter_mut().enumerate() {
            let mut n = 0;
            let (mut mean, mut var, mut avg) = (0.0, 0.0, 0.0);
            while n < pool.len() {
                let (m, s, a) = demands[n];
                let ok = match p {
                    0 => ((n + 1) as u64) * VM <= CAPACITY,
                    1 => ((n + 1) as u64) * VM <= CAPACITY * 3 / 2,
                    2 => avg + a <= cfg.high_watermark * cap,
                    3 => mean + m + z * (var + s * s).sqrt() <= cfg.high_watermark * cap,
                    _ => mean + m + z * (var + s * s).sqrt() <= cap,
                };
                if !ok {
                    break;
                }
                mean += m;
                var += s * s;
                avg += a;
                n += 1;
            }
            o.committed += n as u64 * VM;
            let mut any = false;
            for t in 0..HOUR {
                let used: u64 = pool[..n].iter().map(|c| c.future[t]).sum();
                o.host_minutes += 1;
                if used > CAPACITY {
                    o.violations += 1;
                    any = true;
                    o.worst_over = o.worst_over.max(used as f64 / cap - 1.0);
                }
            }
            o.hosts_violating += u64::from(any);
        }
    }
    println!(
        "overcommit policies on {hosts} simulated hosts ({} GiB for VMs each, {} GiB VMs, fleet mix: 40% steady, 20% growing, 20% phased, 15% idle, 5% bursty); decide on hour 1, replay hour 2",
        CAPACITY / GIB,
        VM / GIB
    );
    println!(
        "| policy | guest memory per host (x capacity) | memory saved vs no overcommit | host-minutes over capacity | hosts ever over | worst overflow |"
    );
    println!("|---|---|---|---|---|---|");
    let base = out[0].committed as f64;
    for (name, o) in names.iter().zip(&out) {
        println!(
            "| {name} | {:.2}x | {:+.0}% | {:.2}% | {:.1}% | {:.1}% |",
            o.committed as f64 / (hosts as f64 * cap),
            (o.committed as f64 / base - 1.0) * 100.0,
            o.violations as f64 / o.host_minutes as f64 * 100.0,
            o.hosts_violating as f64 / hosts as f64 * 100.0,
            o.worst_over * 100.0
        );
    }
}
