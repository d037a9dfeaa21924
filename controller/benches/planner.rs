//! Planner benchmark (not a timed test): a full plan (demand of every VM,
//! every host's overcommit, migrations for the hot hosts) for N hosts x 40
//! VMs with an hour of one-minute samples each, from in-memory history,
//! against a baseline measured in the same run: one pass that only averages
//! every VM's samples (the least any planner reading the same history does).
//!
//! `cargo bench -p wset-controller --bench planner` (WSET_BENCH_HOSTS, a
//! comma-separated list, default 1000,10000,50000).

use std::time::Instant;

use wset_controller::planner::{Config, HostInput, Input, Sample, VmInput, plan};
use wset_proto::ids::{HostId, VmId};

const GIB: u64 = 1 << 30;
const VMS_PER_HOST: usize = 40;
const NOW: u64 = 10 * 86_400_000;

fn vm(id: &str) -> VmId {
    id.parse().expect("a VM id")
}

fn host(id: &str) -> HostId {
    id.parse().expect("a host id")
}

/// A cluster where one host in twenty runs hot, with noisy working sets.
fn cluster(hosts: usize) -> Input {
    let mut rng = 0x2545_f491_4f6c_dd1du64;
    let mut next = move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    let mut vms = Vec::with_capacity(hosts * VMS_PER_HOST);
    for h in 0..hosts {
        let hot = h % 20 == 0;
        for v in 0..VMS_PER_HOST {
            let mem = 8 * GIB;
            let base = if hot { 5 * GIB } else { 2 * GIB } + next() % GIB;
            vms.push(VmInput {
                samples: (0..60)
                    .map(|i| Sample {
                        t_ms: NOW - 3_600_000 + i * 60_000,
                        wss_bytes: base + next() % (GIB / 8),
                        dirty_bytes_per_s: (next() % 200) as f64 * 1e6,
                    })
                    .collect(),
                relative_error: 0.01,
                ..VmInput::new(vm(&format!("vm-{h}-{v}")), host(&format!("host-{h}")), mem)
            });
        }
    }
    Input {
        now_ms: NOW,
        hosts: (0..hosts)
            .map(|h| HostInput {
                host_id: host(&format!("host-{h}")),
                capacity_bytes: 256 * GIB,
                maintenance: false,
            })
            .collect(),
        vms,
    }
}

fn main() {
    let sizes: Vec<usize> = std::env::var("WSET_BENCH_HOSTS")
        .ok()
        .map(|s| s.split(',').filter_map(|x| x.trim().parse().ok()).collect())
        .unwrap_or_else(|| vec![1000, 10_000, 50_000]);
    println!("planner: N hosts x {VMS_PER_HOST} VMs, 60 samples each, 1 host in 20 hot");
    println!(
        "| hosts | VMs | plan (median of 3) | baseline pass | plan / baseline | moves | unresolved |"
    );
    println!("|---|---|---|---|---|---|---|");
    let cfg = Config::default();
    for n in sizes {
        eprint!("  building {n} hosts...");
        let input = cluster(n);
        eprintln!(" done");
        let mut base = Vec::new();
        let mut times = Vec::new();
        let mut last = None;
        for _ in 0..3 {
            let t = Instant::now();
            let s: f64 = input
                .vms
                .iter()
                .map(|v| {
                    v.samples.iter().map(|s| s.wss_bytes as f64).sum::<f64>()
                        / v.samples.len() as f64
                })
                .sum();
            std::hint::black_box(s);
            base.push(t.elapsed().as_secs_f64());
            if std::env::var_os("WSET_BENCH_DEMAND").is_some() {
                let t = Instant::now();
                for v in &input.vms {
                    std::hint::black_box(wset_controller::planner::demand(v, &cfg, NOW));
                }
                eprintln!("  demand alone: {:.3} s", t.elapsed().as_secs_f64());
            }
            let t = Instant::now();
            let p = plan(&input, &cfg);
            times.push(t.elapsed().as_secs_f64());
            last = Some(p);
        }
        base.sort_by(f64::total_cmp);
        times.sort_by(f64::total_cmp);
        let p = last.expect("planned");
        println!(
            "| {n} | {} | {:.3} s | {:.3} s | {:.1}x | {} | {} |",
            input.vms.len(),
            times[1],
            base[1],
            times[1] / base[1],
            p.moves.len(),
            p.unresolved.len()
        );
    }
}
