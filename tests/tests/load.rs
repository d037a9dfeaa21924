//! Load, sustained: one real agent tracking 100 guests, and the real
//! controller subscribed to that agent and to 1,000 simulated agents (10
//! VMs each), for WSET_LOAD_SECS (default 180) after everything is up. Both
//! processes' CPU and resident memory (and the controller's store on disk)
//! are sampled every 10 s and printed; both processes' memory must level
//! off (the last third's mean within 15% + 48 MiB of the middle third's)
//! while the controller's store keeps growing, every agent must stay
//! connected and every VM tracked, and the controller's history maintenance
//! must run every minute without a failed series (the time of its latest
//! pass, from the metrics endpoint, is printed with each sample; the store
//! size it reports must match its directory). WSET_LOAD_RETENTION passes a
//! `--retention` to the controller, for runs long enough to reach a store
//! that retention caps.

use std::time::{Duration, Instant};

use wset_guest::script::{Script, Touch};
use wset_proto::v1 as pb;
use wset_serve::metrics::ProcessStats;
use wset_tests::harness::{
    Agent, AgentOpts, Backing, Controller, Guest, GuestKind, TempDir, http_get, metric, wait_for,
};
use wset_tests::simagent::serve_fleet;

const GUESTS: usize = 100;
const SIM_AGENTS: usize = 1000;

fn secs() -> u64 {
    std::env::var("WSET_LOAD_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(180)
}

#[derive(Clone, Copy, Debug)]
struct Point {
    t: f64,
    agent: ProcessStats,
    controller: ProcessStats,
    /// The controller's store on disk, bytes.
    store: u64,
    /// The time its latest history maintenance pass took (NaN before the
    /// first), from its metrics.
    maintenance_s: f64,
}

fn dir_bytes(p: &std::path::Path) -> u64 {
    std::fs::read_dir(p)
        .map(|d| {
            d.flatten()
                .map(|e| match e.metadata() {
                    Ok(m) if m.is_dir() => dir_bytes(&e.path()),
                    Ok(m) => m.len(),
                    Err(_) => 0,
                })
                .sum()
        })
        .unwrap_or(0)
}

fn mib(b: u64) -> f64 {
    b as f64 / (1 << 20) as f64
}

fn mean_rss(points: &[Point], f: impl Fn(&Point) -> u64) -> f64 {
    points.iter().map(|p| f(p) as f64).sum::<f64>() / points.len().max(1) as f64
}

#[test]
fn one_agent_with_100_guests_and_a_controller_with_1000_agents() {
    // 1,000 listeners and their connections.
    wset_serve::process::raise_nofile();
    let run = Duration::from_secs(secs());
    let agent = Agent::start(AgentOpts {
        interval_ms: 1000,
        windows_ms: vec![10_000, 60_000],
        access: "4096".into(),
        extra: vec!["--host-name".into(), "real-host".into()],
        ..Default::default()
    });
    let script = |i: usize| {
        Script::steady(
            vec![Touch::read(0, 32 + (i as u32 % 32)), Touch::write(256, 8)],
            (run.as_millis() as u64) + 240_000,
        )
    };
    let t0 = Instant::now();
    let guests: Vec<Guest> = (0..GUESTS)
        .map(|i| {
            Guest::builder(&format!("load-{i:03}"), script(i))
                .kind(GuestKind::Process)
                .backing(if i % 2 == 0 {
                    Backing::Memfd
                } else {
                    Backing::Anon
                })
                .memory_mib(8)
                .fill_seed(i as u32 + 1)
                .start(&agent)
        })
        .collect();
    eprintln!("{GUESTS} guests registered in {:?}", t0.elapsed());

    let rt = tokio::runtime::Runtime::new().unwrap();
    let t1 = Instant::now();
    let addrs = serve_fleet(&rt, "sim", SIM_AGENTS, 10);
    let data = TempDir::new("load");
    let mut all: Vec<&str> = addrs.iter().map(String::as_str).collect();
    all.push(&agent.grpc_addr);
    // A summary per VM every 5 s: 10,100 VMs, about 2,000 summaries/s.
    // (and a stall timeout well above it).
    // WSET_LOAD_RETENTION (e.g. raw=5m,1m=15m) caps the history kept, so a
    // long run reaches a store that no longer grows.
    let retention = std::env::var("WSET_LOAD_RETENTION").ok();
    let mut extra = vec!["--plan-interval", "15s", "--cache-mib", "64"];
    if let Some(r) = &retention {
        extra.extend(["--retention", r.as_str()]);
        eprintln!("history retention: {r}");
    }
    let mut args = Controller::args(&data.0, &all, &extra);
    for (flag, value) in [("--sample-interval", "5s"), ("--stall-timeout", "30s")] {
        let i = args
            .iter()
            .position(|a| a == flag)
            .unwrap_or_else(|| panic!("the harness sets {flag}"));
        args[i + 1] = value.into();
    }
    let mut cmd = std::process::Command::new(wset_tests::harness::bin("wset-controller"));
    cmd.args(args);
    let ctl = Controller::spawn(cmd);
    let n = SIM_AGENTS + 1;
    wait_for(Duration::from_secs(120), "every agent connected", || {
        let a = ctl.agents();
        let up = a
            .iter()
            .filter(|a| {
                a.state == pb::AgentConnectionState::Connected as i32 && a.batches_received > 0
            })
            .count();
        (up == n).then_some(())
    });
    eprintln!(
        "{n} agents streaming to the controller {:?} after it started",
        t1.elapsed()
    );

    let (apid, cpid) = (agent.pid().cast_signed(), ctl.pid().cast_signed());
    let cm = ctl.metrics_addr();
    let scrape = || {
        let (status, text) = http_get(&cm, "/metrics");
        assert_eq!(status, 200, "the controller's /metrics: {text}");
        text
    };
    let stats = |pid: libc::pid_t, what: &str| {
        ProcessStats::of(pid).unwrap_or_else(|| panic!("the {what} (pid {pid}) is gone"))
    };
    let start = Instant::now();
    let mut points = Vec::new();
    loop {
        points.push(Point {
            t: start.elapsed().as_secs_f64(),
            agent: stats(apid, "agent"),
            controller: stats(cpid, "controller"),
            store: dir_bytes(&data.0),
            maintenance_s: metric(&scrape(), "wset_controller_maintenance_duration_seconds")
                .unwrap_or(f64::NAN),
        });
        if start.elapsed() >= run {
            break;
        }
        std::thread::sleep(Duration::from_secs(10).min(run.saturating_sub(start.elapsed())));
    }

    eprintln!(
        "   t s | agent CPU % | agent RSS MiB | controller CPU % | controller RSS MiB | store MiB \
         | maintenance s"
    );
    for w in points.windows(2) {
        let (a, b) = (&w[0], &w[1]);
        let dt = b.t - a.t;
        eprintln!(
            "{:>6.0} | {:>11.1} | {:>13.1} | {:>16.1} | {:>18.1} | {:>9.1} | {:>13.2}",
            b.t,
            (b.agent.cpu_seconds - a.agent.cpu_seconds) / dt * 100.0,
            mib(b.agent.resident_bytes),
            (b.controller.cpu_seconds - a.controller.cpu_seconds) / dt * 100.0,
            mib(b.controller.resident_bytes),
            mib(b.store),
            b.maintenance_s,
        );
    }
    let (first, last) = (points[0], points[points.len() - 1]);
    let span = last.t - first.t;
    eprintln!(
        "over {span:.0} s: agent {:.1}% CPU, controller {:.1}% CPU (of one core)",
        (last.agent.cpu_seconds - first.agent.cpu_seconds) / span * 100.0,
        (last.controller.cpu_seconds - first.controller.cpu_seconds) / span * 100.0
    );

    // Nothing dropped out.
    let agents = ctl.agents();
    let connected = agents
        .iter()
        .filter(|a| a.state == pb::AgentConnectionState::Connected as i32)
        .count();
    assert_eq!(connected, n, "agents connected at the end");
    let tracking = agent
        .list()
        .iter()
        .filter(|v| v.state == pb::VmState::Tracking as i32)
        .count();
    assert_eq!(tracking, GUESTS, "VMs tracked at the end");
    let rejected: u64 = agents.iter().map(|a| a.summaries_rejected).sum();
    assert_eq!(rejected, 0);

    // History maintenance kept up, failed on nothing, and the store's size
    // the controller reports is the one on disk.
    let text = scrape();
    let value = |name: &str| {
        metric(&text, name).unwrap_or_else(|| panic!("the controller's metrics lack {name}"))
    };
    let passes = value("wset_controller_maintenance_passes_total");
    let slowest = points
        .iter()
        .map(|p| p.maintenance_s)
        .filter(|s| s.is_finite())
        .fold(0.0, f64::max);
    eprintln!(
        "history maintenance: {passes} passes (one a minute), the slowest seen took {slowest:.2} s"
    );
    assert!(
        passes >= (span / 60.0).floor() - 1.0,
        "{passes} maintenance passes in {span:.0} s"
    );
    assert_eq!(
        value("wset_controller_maintenance_failed_series_total"),
        0.0
    );
    let (reported, on_disk) = (value("wset_controller_store_bytes"), dir_bytes(&data.0));
    assert!(
        (reported - on_disk as f64).abs() <= 0.1 * on_disk as f64,
        "the controller reports a store of {reported} bytes; its directory holds {on_disk}"
    );

    // Both processes' memory levels off; the controller's store grows
    // all along (its memory must not follow it).
    let third = points.len() / 3;
    let (mid, end) = (&points[third..2 * third], &points[2 * third..]);
    let mean = |pts: &[Point], f: fn(&Point) -> u64| mean_rss(pts, f) / (1 << 20) as f64;
    let (am, ae) = (
        mean(mid, |p| p.agent.resident_bytes),
        mean(end, |p| p.agent.resident_bytes),
    );
    eprintln!("agent: mean RSS {am:.1} MiB in the middle third, {ae:.1} MiB in the last");
    assert!(
        ae <= am * 1.15 + 48.0,
        "the agent's memory keeps growing: {am:.1} MiB then {ae:.1} MiB"
    );
    let (cm, ce) = (
        mean(mid, |p| p.controller.resident_bytes),
        mean(end, |p| p.controller.resident_bytes),
    );
    let (sm, se) = (mean(mid, |p| p.store), mean(end, |p| p.store));
    eprintln!(
        "controller: mean RSS {cm:.1} MiB in the middle third, {ce:.1} MiB in the last, while \
         its store grew from {sm:.1} MiB to {se:.1} MiB ({:.2} MiB of memory per MiB stored)",
        (ce - cm) / (se - sm).max(0.1)
    );
    assert!(
        ce <= cm * 1.15 + 48.0,
        "the controller's memory keeps growing: {cm:.1} MiB then {ce:.1} MiB resident, while \
         its store went {sm:.1} -> {se:.1} MiB"
    );
    drop(guests);
}
