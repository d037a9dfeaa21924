//! The agent's summary-stream fan-out cost: the real agent tracks 20 process
//! guests at its default interval while N clients read `WatchSummaries`
//! (every batch, full summaries); the agent's CPU time (utime + stime from
//! /proc) over a fixed period is compared with N = 0 in the same run, the
//! baseline of tracking alone. Rounds rotate N.
//!
//! Run: cargo build --release --bins && cargo bench -p wset-tests --bench stream_fanout
//! (WSET_BENCH_SECS sets each measurement, default 10).

use std::time::{Duration, Instant};

use wset_guest::script::{Script, Touch};
use wset_proto::v1 as pb;
use wset_proto::v1::agent_service_client::AgentServiceClient;
use wset_tests::harness::{Agent, AgentOpts, Guest, GuestKind};

const GUESTS: usize = 20;
const READERS: [usize; 4] = [0, 1, 8, 32];

/// CPU seconds the process has used.
fn cpu_secs(pid: u32) -> f64 {
    wset_serve::metrics::ProcessStats::of(pid as i32)
        .unwrap_or_else(|| panic!("process {pid} is gone"))
        .cpu_seconds
}

fn main() {
    let secs: u64 = std::env::var("WSET_BENCH_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(10);
    let agent = Agent::start(AgentOpts {
        interval_ms: 2000,
        windows_ms: vec![10_000, 60_000, 300_000, 1_800_000],
        access: "4096".into(),
        ..Default::default()
    });
    let guests: Vec<Guest> = (0..GUESTS)
        .map(|i| {
            let script = Script::steady(
                vec![Touch::read(16, 2000), Touch::write(4000, 500)],
                3_600_000,
            );
            Guest::builder(&format!("fan-{i}"), script)
                .kind(GuestKind::Process)
                .memory_mib(64)
                .start(&agent)
        })
        .collect();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let url = format!("http://{}", agent.grpc_addr);
    println!(
        "stream fan-out: agent tracking {GUESTS} guests (64 MiB, 2 s interval), {secs} s per measurement"
    );
    let mut cpu: Vec<Vec<f64>> = vec![Vec::new(); READERS.len()];
    let mut batches: Vec<u64> = vec![0; READERS.len()];
    for round in 0..3 {
        for k in 0..READERS.len() {
            let i = (k + round) % READERS.len();
            let n = READERS[i];
            let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
            let got = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
            let tasks: Vec<_> = (0..n)
                .map(|_| {
                    let (url, stop, got) = (url.clone(), stop.clone(), got.clone());
                    rt.spawn(async move {
                        let mut c = AgentServiceClient::connect(url).await.expect("connect");
                        let mut s = c
                            .watch_summaries(pb::WatchSummariesRequest::default())
                            .await
                            .expect("stream")
                            .into_inner();
                        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                            match tokio::time::timeout(Duration::from_millis(500), s.message())
                                .await
                            {
                                Ok(Ok(Some(b))) => {
                                    assert_eq!(b.summaries.len(), GUESTS);
                                    got.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                                }
                                Ok(_) => panic!("stream ended"),
                                Err(_) => {}
                            }
                        }
                    })
                })
                .collect();
            std::thread::sleep(Duration::from_secs(3));
            let (c0, t0) = (cpu_secs(agent.pid()), Instant::now());
            let g0 = got.load(std::sync::atomic::Ordering::Relaxed);
            std::thread::sleep(Duration::from_secs(secs));
            let used = cpu_secs(agent.pid()) - c0;
            let el = t0.elapsed().as_secs_f64();
            batches[i] += got.load(std::sync::atomic::Ordering::Relaxed) - g0;
            stop.store(true, std::sync::atomic::Ordering::Relaxed);
            for t in tasks {
                rt.block_on(t).expect("reader");
            }
            cpu[i].push(used / el * 100.0);
            eprintln!(
                "  round {round}: {n:>2} readers: agent CPU {:.2}%",
                used / el * 100.0
            );
        }
    }
    let med = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let base = med(&mut cpu[0].clone());
    println!("| readers | agent CPU (median) | vs no reader | extra per reader | batches read |");
    println!("|---|---|---|---|---|");
    for (i, n) in READERS.iter().enumerate() {
        let c = med(&mut cpu[i].clone());
        let per = if *n > 0 { (c - base) / *n as f64 } else { 0.0 };
        println!(
            "| {n} | {c:.2}% | {:.2}x | {per:+.3} points of CPU | {} |",
            c / base.max(0.01),
            batches[i]
        );
    }
    drop(guests);
}
