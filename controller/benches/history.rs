//! History benchmarks (not timed tests): the controller's real ingest path
//! (writer thread, VM index, sled, the flusher at its default period) in
//! summaries per second, against a baseline of bare sled batch inserts of
//! the same keys and bytes in the same run; and a day of one VM at 10 s
//! resolution, packed into blocks as maintenance packs it, queried through
//! the real query path, p50/p99, against a range scan of the same keys
//! that decompresses the blocks and counts their points without decoding.
//!
//! `cargo bench -p wset-controller --bench history` (WSET_BENCH_SUMMARIES
//! sets the ingest volume, default 1,000,000).

use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use prost::Message;
use wset_controller::config::default_levels;
use wset_controller::history::{Query, page, raw_point};
use wset_controller::index::Index;
use wset_controller::ingest::{Batch, Msg, StoreHealth, flusher, writer};
use wset_controller::store::{Store, Write};
use wset_proto::ids::VmId;
use wset_proto::v1 as pb;

const VMS_PER_HOST: usize = 50;

fn summary(host: usize, vm: usize) -> pb::VmSummary {
    pb::VmSummary {
        vm_id: format!("vm-{host:05}-{vm:02}"),
        name: format!("web-{vm}"),
        host_id: format!("host-{host:05}"),
        timestamp_ms: 1,
        memory_bytes: 8 << 30,
        granule_bytes: 4096,
        methods: vec![1, 4],
        interval_ms: 2000,
        tracked_ms: 3_600_000,
        windows: [10_000u64, 60_000, 300_000, 1_800_000]
            .iter()
            .map(|&w| pb::WindowWorkingSet {
                window_ms: w,
                wss_bytes: (w / 10) << 12,
                dirty_bytes: (w / 40) << 12,
                complete: true,
            })
            .collect(),
        idle_ages: (0..5)
            .map(|i| pb::IdleAgeBucket {
                min_age_ms: i * 10_000,
                max_age_ms: (i + 1) * 10_000,
                bytes: 1 << 28,
            })
            .collect(),
        access_rate_bytes_per_s: 1.5e6,
        dirty_rate_bytes_per_s: 2.5e5,
        error: Some(pb::ErrorEstimate {
            relative_error: 0.011,
            confidence: 0.95,
            basis: "sampled".into(),
            wss_is_lower_bound: false,
        }),
        state: 1,
        touched_bytes: 4 << 30,
        epoch: 1800,
        ..Default::default()
    }
}

fn tmp(tag: &str) -> std::path::PathBuf {
    let p = std::env::temp_dir().join(format!("wset-bench-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&p);
    p
}

/// Summaries/s through the real writer (index, encode, sled, flusher).
fn ingest(total: usize) -> f64 {
    let dir = tmp("ingest");
    let store = Store::open(&dir, default_levels(), 256 << 20).expect("open store");
    let index = Arc::new(Index::default());
    let health = Arc::new(StoreHealth::default());
    let (tx, rx) = tokio::sync::mpsc::channel(1024);
    let w = {
        let (s, ix, h) = (store.clone(), index.clone(), health.clone());
        let recent = Arc::new(wset_controller::recent::Recent::new(3_600_000, 10_000));
        std::thread::spawn(move || writer(s, ix, recent, h, rx))
    };
    let stop = Arc::new(AtomicBool::new(false));
    let f = {
        let (s, ix, h, st) = (store.clone(), index.clone(), health, stop.clone());
        std::thread::spawn(move || flusher(s, ix, h, Duration::from_secs(1), st))
    };
    let hosts = total / VMS_PER_HOST;
    let batches: Vec<Vec<(VmId, pb::VmSummary)>> = (0..hosts.min(10_000))
        .map(|h| {
            (0..VMS_PER_HOST)
                .map(|v| {
                    let s = summary(h, v);
                    (s.vm_id.parse().expect("a VM id"), s)
                })
                .collect()
        })
        .collect();
    let start = Instant::now();
    for i in 0..hosts {
        let b = &batches[i % batches.len()];
        let msg = Msg::Batch(Box::new(Batch {
            endpoint: format!("10.0.{}.{}:7070", (i % batches.len()) / 256, i % 256),
            received_ms: 1_000_000 + i as u64,
            resolution_ms: 10_000,
            host_id: b[0].1.host_id.parse().expect("a host id"),
            host: pb::HostFacts {
                host_id: b[0].1.host_id.clone(),
                memory_total_bytes: 512 << 30,
                ..Default::default()
            },
            summaries: b.clone(),
            events: vec![],
        }));
        tx.blocking_send(msg).expect("writer alive");
        if i % (hosts / 10).max(1) == 0 {
            eprint!("\r  ingest: {:>3}%", i * 100 / hosts);
        }
    }
    drop(tx);
    w.join().expect("writer");
    stop.store(true, std::sync::atomic::Ordering::Release);
    f.join().expect("flusher");
    let secs = start.elapsed().as_secs_f64();
    eprintln!("\r  ingest: done in {secs:.2} s");
    let _ = std::fs::remove_dir_all(&dir);
    (hosts * VMS_PER_HOST) as f64 / secs
}

/// Bare sled: the same number of keys and value bytes, one batch per host.
fn baseline(total: usize) -> f64 {
    let dir = tmp("baseline");
    let db = sled::Config::new()
        .path(&dir)
        .cache_capacity(256 << 20)
        .mode(sled::Mode::HighThroughput)
        .flush_every_ms(Some(1000))
        .open()
        .expect("open sled");
    let t = db.open_tree("t").expect("tree");
    let value = raw_point(&summary(0, 0), 1, 10_000).encode_to_vec();
    let hosts = total / VMS_PER_HOST;
    let start = Instant::now();
    for i in 0..hosts {
        let mut b = sled::Batch::default();
        for v in 0..VMS_PER_HOST {
            let mut k = format!("vm-{:05}-{v:02}", i % 10_000).into_bytes();
            k.push(0);
            k.extend_from_slice(&0u64.to_be_bytes());
            k.extend_from_slice(&(1_000_000 + i as u64).to_be_bytes());
            b.insert(k, value.clone());
        }
        t.apply_batch(b).expect("apply");
    }
    db.flush().expect("flush");
    let secs = start.elapsed().as_secs_f64();
    drop(t);
    drop(db);
    let _ = std::fs::remove_dir_all(&dir);
    (hosts * VMS_PER_HOST) as f64 / secs
}

fn pct(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(f64::total_cmp);
    v[((v.len() - 1) as f64 * p).round() as usize]
}

/// A day of one VM at 10 s: the real query path vs a range scan.
fn query() -> ((f64, f64), (f64, f64), usize) {
    let dir = tmp("query");
    let store = Store::open(&dir, default_levels(), 256 << 20).expect("open store");
    let day = 86_400_000u64;
    let now = 10 * day;
    let s = summary(0, 0);
    // The VM of interest among neighbours whose keys sort around it.
    for vm in ["vm-00000-00", "vm-00000-000", "vm-00000-01"] {
        let mut w = Write::default();
        for t in (now - day..now).step_by(10_000) {
            w.vm_points.push((vm.to_owned(), raw_point(&s, t, 10_000)));
        }
        store.apply(&w).expect("write a day");
    }
    // Packed as maintenance packs it: hour blocks, the last minutes as
    // minute blocks.
    let vms: Vec<(String, u64)> = ["vm-00000-00", "vm-00000-000", "vm-00000-01"]
        .iter()
        .map(|v| (v.to_string(), now))
        .collect();
    store
        .maintain(&vms, &[], now, 0)
        .into_result()
        .expect("pack");
    store.flush().expect("flush");
    let q = Query {
        start_ms: now - day,
        end_ms: now,
        resolution_ms: 10_000,
        page_size: 10_000,
        token: None,
    };
    let (mut ours, mut bare) = (Vec::new(), Vec::new());
    let mut n = 0;
    for _ in 0..200 {
        let t = Instant::now();
        let p = page(&q, store.levels(), now, |b, s, e, l| {
            store.vm_points("vm-00000-00", b, s, e, l)
        })
        .expect("query");
        ours.push(t.elapsed().as_secs_f64() * 1e3);
        n = p.points.len();
        let t = Instant::now();
        let got = store
            .count_vm_points("vm-00000-00", 0, now - day, now)
            .expect("scan");
        bare.push(t.elapsed().as_secs_f64() * 1e3);
        assert_eq!(got, n);
    }
    let _ = std::fs::remove_dir_all(&dir);
    (
        (pct(&mut ours, 0.5), pct(&mut ours, 0.99)),
        (pct(&mut bare, 0.5), pct(&mut bare, 0.99)),
        n,
    )
}

fn main() {
    let total: usize = std::env::var("WSET_BENCH_SUMMARIES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    println!("history ingest: {total} summaries in batches of {VMS_PER_HOST} (one host's)");
    let base = baseline(total);
    let ours = ingest(total);
    println!("  bare sled batch inserts (same keys and bytes): {base:>10.0} summaries/s");
    println!(
        "  controller ingest (index, encode, sled, flush): {ours:>10.0} summaries/s  = {:.2}x bare sled",
        ours / base
    );
    println!(
        "  target 50,000/s (10,000 hosts x 50 VMs every 10 s): {:.2}x the target",
        ours / 50_000.0
    );
    let ((p50, p99), (b50, b99), n) = query();
    println!("history query: one VM, a day at 10 s ({n} points), 200 queries");
    println!("  controller query path: p50 {p50:.2} ms, p99 {p99:.2} ms");
    println!(
        "  range scan, decompress, count: p50 {b50:.2} ms, p99 {b99:.2} ms  (query = {:.2}x at p50)",
        p50 / b50
    );
}
