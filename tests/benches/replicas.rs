//! The controller tier's replicas, measured on a real three-member etcd
//! cluster on loopback:
//!
//! 1. **Hand-over**: the leader is killed with SIGKILL 20 times (each time
//!    restarted to follow); the time from the kill to the new leader's first
//!    published plan (its `terms_led`), p50 and p99, against the lease TTL and
//!    the plan interval, the floor of any hand-over after a crash.
//! 2. **Cost**: one agent tracking 20 process guests, and for a fixed period
//!    one controller alone, then three replicas (the harness's test periods:
//!    a summary every 300 ms per VM): CPU seconds (utime + stime,
//!    /proc) and resident memory of each controller, and the agent's CPU, the
//!    one-controller run the baseline of the same run.
//!
//! Run: cargo build --release --bins && cargo bench -p wset-tests --bench replicas
//! (WSET_BENCH_SECS sets the cost periods, default 30; WSET_BENCH_KILLS the
//! kills, default 20).

use std::time::{Duration, Instant};

use wset_guest::script::{Script, Touch};
use wset_proto::v1 as pb;
use wset_serve::metrics::ProcessStats;
use wset_tests::harness::{
    Agent, AgentOpts, Controller, Etcd, Guest, GuestKind, TempDir, free_loopback_addr, wait_for,
};

const TTL_S: u64 = 3;
const PLAN_MS: u64 = 1000;

/// CPU seconds and resident bytes of a process.
fn usage(pid: u32) -> (f64, u64) {
    let p = ProcessStats::of(pid as i32).unwrap_or_else(|| panic!("process {pid} is gone"));
    (p.cpu_seconds, p.resident_bytes)
}

fn replica(etcd: &Etcd, dir: &TempDir, i: usize, agents: &[&str]) -> Controller {
    let endpoints = etcd.endpoints();
    Controller::start(
        &dir.0,
        agents,
        &[
            "--etcd-endpoints",
            &endpoints,
            "--replica-name",
            &format!("r{i}"),
            "--lease-ttl",
            &format!("{TTL_S}s"),
            "--plan-interval",
            &format!("{PLAN_MS}ms"),
        ],
    )
}

fn leader(cs: &[Option<Controller>]) -> Option<(usize, u64)> {
    cs.iter().enumerate().find_map(|(i, c)| {
        let s = c.as_ref()?.replica().ok()?;
        (s.role == pb::ReplicaRole::Leader as i32 && s.plan_term == s.term).then_some((i, s.term))
    })
}

fn pct(v: &[u64], p: f64) -> u64 {
    let mut v = v.to_vec();
    v.sort_unstable();
    v[((v.len() - 1) as f64 * p).round() as usize]
}

fn handover(kills: usize) {
    let etcd = Etcd::start(3);
    let dirs: Vec<TempDir> = (0..3).map(|_| TempDir::new("bench-replica")).collect();
    let mut cs: Vec<Option<Controller>> = (0..3)
        .map(|i| Some(replica(&etcd, &dirs[i], i, &[])))
        .collect();
    let mut took = Vec::new();
    for k in 0..kills {
        let (l, term) = wait_for(Duration::from_secs(60), "a leader with a plan", || {
            leader(&cs)
        });
        let killed_at = wset_tests::now_ms();
        cs[l].as_mut().unwrap().kill9();
        cs[l] = None;
        let (m, t2) = wait_for(Duration::from_secs(60), "a new leader with a plan", || {
            leader(&cs).filter(|&(_, t)| t > term)
        });
        let s = cs[m].as_ref().unwrap().replica().expect("GetReplica");
        let first = s
            .terms_led
            .iter()
            .find(|t| t.term == t2)
            .expect("its term")
            .first_publish_ms;
        let ms = first.saturating_sub(killed_at);
        took.push(ms);
        eprintln!(
            "kill {}: r{l} (term {term}) -> r{m} (term {t2}) in {ms} ms",
            k + 1
        );
        cs[l] = Some(replica(&etcd, &dirs[l], l, &[]));
    }
    let floor = TTL_S * 1000;
    println!(
        "hand-over after SIGKILL of the leader, {kills} kills (TTL {TTL_S} s, plan interval {PLAN_MS} ms): \
         p50 {} ms, p99 {} ms, max {} ms; p50 / TTL = {:.2}",
        pct(&took, 0.5),
        pct(&took, 0.99),
        pct(&took, 1.0),
        pct(&took, 0.5) as f64 / floor as f64
    );
}

fn cost(secs: u64) {
    let addr = free_loopback_addr();
    let agent = Agent::start(AgentOpts {
        interval_ms: 1000,
        windows_ms: vec![10_000, 60_000],
        access: "4096".into(),
        grpc_addr: Some(addr.clone()),
        ..Default::default()
    });
    let _guests: Vec<Guest> = (0..20)
        .map(|i| {
            let script = Script::steady(
                vec![Touch::read(16, 2000), Touch::write(4000, 500)],
                3_600_000,
            );
            Guest::builder(&format!("rep-bench-{i}"), script)
                .kind(GuestKind::Process)
                .memory_mib(64)
                .start(&agent)
        })
        .collect();
    let measure = |cs: &[Controller]| {
        // Settle: every controller ingesting.
        for c in cs {
            wait_for(Duration::from_secs(60), "the controller ingesting", || {
                (c.vms().len() == 20).then_some(())
            });
        }
        let a0 = usage(agent.pid()).0;
        let c0: Vec<f64> = cs.iter().map(|c| usage(c.pid()).0).collect();
        let t0 = Instant::now();
        std::thread::sleep(Duration::from_secs(secs));
        let wall = t0.elapsed().as_secs_f64();
        let agent_cpu = (usage(agent.pid()).0 - a0) / wall;
        let per: Vec<(f64, u64)> = cs
            .iter()
            .zip(&c0)
            .map(|(c, c0)| {
                let (cpu, rss) = usage(c.pid());
                ((cpu - c0) / wall, rss)
            })
            .collect();
        (agent_cpu, per)
    };
    let dir = TempDir::new("bench-alone");
    let alone = Controller::start(&dir.0, &[&addr], &["--plan-interval", "10s"]);
    let (agent1, one) = measure(std::slice::from_ref(&alone));
    drop(alone);
    let etcd = Etcd::start(3);
    let dirs: Vec<TempDir> = (0..3).map(|_| TempDir::new("bench-replica")).collect();
    let three: Vec<Controller> = (0..3)
        .map(|i| {
            Controller::start(
                &dirs[i].0,
                &[&addr],
                &[
                    "--etcd-endpoints",
                    &etcd.endpoints(),
                    "--replica-name",
                    &format!("r{i}"),
                    "--plan-interval",
                    "10s",
                ],
            )
        })
        .collect();
    let (agent3, per3) = measure(&three);
    let pct = |x: f64| x * 100.0;
    println!(
        "one controller alone: controller {:.2}% of a core, {:.1} MiB resident; agent {:.2}% of a core",
        pct(one[0].0),
        one[0].1 as f64 / 1048576.0,
        pct(agent1)
    );
    for (i, (cpu, rss)) in per3.iter().enumerate() {
        println!(
            "three replicas: r{i} {:.2}% of a core ({:.2}x alone), {:.1} MiB resident",
            pct(*cpu),
            cpu / one[0].0,
            *rss as f64 / 1048576.0
        );
    }
    println!(
        "three replicas: agent {:.2}% of a core, {:.2}x its CPU with one controller",
        pct(agent3),
        agent3 / agent1
    );
}

fn main() {
    let secs: u64 = std::env::var("WSET_BENCH_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(30);
    let kills: usize = std::env::var("WSET_BENCH_KILLS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20);
    if kills > 0 {
        handover(kills);
    }
    cost(secs);
}
