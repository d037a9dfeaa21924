//! Fault-path benchmark: faults/s and service latency of the agent's tracker
//! thread against a minimal handler doing the same ioctls (poll, read,
//! UFFDIO_COPY with write-protect), measured in the same run and printed as
//! ratios. A toucher thread first-touches every page of fresh shmem memory
//! and times each touch.
//!
//! Two more kinds weigh the userfaultfd crate against a hand-written ioctl:
//! the same minimal handler resolving with a plain `UFFDIO_COPY`, once
//! through `Uffd::copy` (the crate's call) and once through the raw ioctl.
//!
//! Run: cargo bench -p wset-tracker --bench fault_path

use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use wset_tracker::plan::{Access, Dirty, Plan};
use wset_tracker::uffd::{Resolve, Uffd, UffdMsg, feature, mode};
use wset_tracker::{Region, TrackerHandle, TrackerSpec};

const PAGES: usize = 32 * 1024; // 128 MiB per round
const ROUNDS: usize = 7;

#[path = "../tests/common/mod.rs"]
mod common;
use common::GuestMemory;

fn new_mem() -> GuestMemory {
    common::memfd(PAGES)
}

fn uffd() -> Uffd {
    Uffd::create(feature::MISSING_SHMEM | feature::WP_HUGETLBFS_SHMEM)
        .expect("userfaultfd: run as root")
}

/// Touch every page once; returns (elapsed, per-touch latencies in ns).
fn touch_all(base: usize) -> (Duration, Vec<u32>) {
    let mut lat = Vec::with_capacity(PAGES);
    let t0 = Instant::now();
    for i in 0..PAGES {
        let t = Instant::now();
        // SAFETY: in bounds of the mapping; volatile so the access happens.
        std::hint::black_box(unsafe { std::ptr::read_volatile((base + i * 4096) as *const u8) });
        lat.push(t.elapsed().as_nanos().min(u32::MAX as u128) as u32);
    }
    (t0.elapsed(), lat)
}

/// The minimal handler: poll, read a batch, UFFDIO_COPY each page (WP) from
/// a zero page. No bookkeeping at all.
fn minimal_round() -> (Duration, Vec<u32>) {
    handler_round(mode::MISSING | mode::WP, |u, addr, zero| {
        u.copy(addr, zero, true).unwrap()
    })
}

/// A minimal handler on a MISSING-only range resolving with a plain copy
/// through the userfaultfd crate (`Uffd::copy` without WP).
fn crate_copy_round() -> (Duration, Vec<u32>) {
    handler_round(mode::MISSING, |u, addr, zero| {
        u.copy(addr, zero, false).unwrap()
    })
}

/// The same, resolving with a hand-written `UFFDIO_COPY` ioctl.
fn raw_copy_round() -> (Duration, Vec<u32>) {
    handler_round(mode::MISSING, raw_copy)
}

/// `struct uffdio_copy` and `UFFDIO_COPY`, written out by hand.
#[repr(C)]
struct UffdioCopy {
    dst: u64,
    src: u64,
    len: u64,
    mode: u64,
    copy: i64,
}
const UFFDIO_COPY: u64 = 0xc028_aa03;

fn raw_copy(u: &Uffd, addr: u64, zero: &[u8]) -> Resolve {
    let mut c = UffdioCopy {
        dst: addr,
        src: zero.as_ptr() as u64,
        len: zero.len() as u64,
        mode: 0,
        copy: 0,
    };
    // SAFETY: UFFDIO_COPY reads `len` bytes at `src`, which `zero` holds,
    // and reads/writes one `uffdio_copy`.
    let ret = unsafe { libc::ioctl(u.as_raw_fd(), UFFDIO_COPY as _, &mut c) };
    if ret == 0 {
        return Resolve::Done;
    }
    match std::io::Error::last_os_error().raw_os_error() {
        Some(libc::EEXIST) => Resolve::Exists,
        e => panic!("UFFDIO_COPY: errno {e:?}"),
    }
}

/// Poll, read a batch, resolve each fault with `resolve` from a zero page,
/// wake on `EEXIST`.
fn handler_round(
    register_mode: u64,
    resolve: fn(&Uffd, u64, &[u8]) -> Resolve,
) -> (Duration, Vec<u32>) {
    let mem = new_mem();
    let u = uffd();
    u.register(mem.addr(), mem.len() as u64, register_mode)
        .unwrap();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let s2 = stop.clone();
    let handler = std::thread::spawn(move || {
        let zero = vec![0u8; 4096];
        let mut msgs = [UffdMsg::default(); 64];
        let mut pfd = libc::pollfd {
            fd: u.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        while !s2.load(std::sync::atomic::Ordering::Relaxed) {
            // SAFETY: one valid pollfd.
            if unsafe { libc::poll(&mut pfd, 1, 50) } <= 0 {
                continue;
            }
            let n = u.read_msgs(&mut msgs).unwrap();
            for m in &msgs[..n] {
                if let wset_tracker::uffd::Event::PageFault { address, .. } = m.decode()
                    && resolve(&u, address & !4095, &zero) == Resolve::Exists
                {
                    u.wake(address & !4095, 4096).unwrap();
                }
            }
        }
    });
    let out = touch_all(mem.addr() as usize);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    handler.join().unwrap();
    out
}

/// The agent's tracker with the same work: first-touch plus sync-WP dirty
/// tracking, at the default 1 s interval, busy-polling `spin` after each event.
fn tracker_round_with(spin: Duration) -> (Duration, Vec<u32>) {
    let mem = new_mem();
    let plan = Plan {
        register_mode: mode::MISSING | mode::WP,
        first_touch: true,
        dirty: Dirty::WpSync,
        access: Access::None,
        evict_after: 0,
        notes: vec![],
    };
    let h = TrackerHandle::spawn(TrackerSpec {
        name: "wset-bench".into(),
        uffd: uffd(),
        regions: vec![Region {
            host_addr: mem.addr(),
            len: mem.len() as u64,
            file_offset: 0,
        }],
        granule_bytes: 4096,
        plan,
        memory_fd: None,
        source: None,
        pid: std::process::id() as i32,
        interval: Duration::from_secs(1),
        cpu: None,
        spin,
        custody_path: None,
        custody_granules: 0,
        seed: 1,
        started_ms: 0,
        fault_budget: 0,
        max_stride: 1,
        wake_waiters: false,
        prefetch: Vec::new(),
        probes: Vec::new(),
        record: None,
    })
    .unwrap();
    let out = touch_all(mem.addr() as usize);
    h.stop();
    out
}

/// At the agent's default busy-poll window (200 us).
fn tracker_round() -> (Duration, Vec<u32>) {
    tracker_round_with(Duration::from_micros(200))
}

/// Never spinning: sleeps in poll(2) between faults, like the minimal handler.
fn tracker_round_nospin() -> (Duration, Vec<u32>) {
    tracker_round_with(Duration::ZERO)
}

fn pct(v: &mut [u32], p: f64) -> u32 {
    v.sort_unstable();
    v[((v.len() - 1) as f64 * p) as usize]
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

#[derive(Default)]
struct Series {
    rate: Vec<f64>,
    p50: Vec<f64>,
    p99: Vec<f64>,
}

impl Series {
    fn add(&mut self, (el, mut lat): (Duration, Vec<u32>)) {
        self.rate.push(PAGES as f64 / el.as_secs_f64());
        self.p50.push(pct(&mut lat, 0.5) as f64);
        self.p99.push(pct(&mut lat, 0.99) as f64);
    }
    fn medians(self) -> (f64, f64, f64) {
        (median(self.rate), median(self.p50), median(self.p99))
    }
}

fn main() {
    type Round = fn() -> (Duration, Vec<u32>);
    let kinds: [(&str, Round); 5] = [
        ("minimal handler", minimal_round),
        ("wset tracker", tracker_round),
        ("wset, no spin", tracker_round_nospin),
        ("copy, raw ioctl", raw_copy_round),
        ("copy, crate", crate_copy_round),
    ];
    let mut series: Vec<Series> = (0..kinds.len()).map(|_| Series::default()).collect();
    for r in 0..ROUNDS {
        // Rotate the order so drift on a noisy machine hits every kind alike.
        for k in 0..kinds.len() {
            let i = (k + r) % kinds.len();
            series[i].add((kinds[i].1)());
        }
        eprintln!("round {}/{ROUNDS} done", r + 1);
    }
    let m: Vec<(f64, f64, f64)> = series.into_iter().map(Series::medians).collect();
    println!(
        "fault path, {PAGES} first-touch MISSING faults per round on shmem, median of {ROUNDS} rounds:"
    );
    for (i, (name, _)) in kinds.iter().enumerate() {
        let (rate, p50, p99) = m[i];
        println!(
            "  {name:<16}: {rate:>10.0} faults/s   p50 {:>6.1} us   p99 {:>6.1} us",
            p50 / 1e3,
            p99 / 1e3
        );
    }
    for i in 1..3 {
        println!(
            "  ratio {}/minimal: throughput {:.3}x (target >= 0.9x), p50 latency {:.3}x, p99 latency {:.3}x",
            kinds[i].0,
            m[i].0 / m[0].0,
            m[i].1 / m[0].1,
            m[i].2 / m[0].2
        );
    }
    let (raw, krate) = (m[3], m[4]);
    println!(
        "  ratio copy via userfaultfd crate/raw ioctl: throughput {:.3}x (target >= 0.95x), p50 latency {:.3}x, p99 latency {:.3}x",
        krate.0 / raw.0,
        krate.1 / raw.1,
        krate.2 / raw.2
    );
}
