//! Full disks, each on a small tmpfs mounted in a mount namespace of its
//! own (held by a helper process, reached through `/proc/<pid>/root`).
//!
//! The controller's history store, filled by a ballast file while ten
//! simulated agents stream: the controller must keep serving (agents
//! connected, the VM index answering), say what failed without logging
//! every lost batch, count the lost batches on its metrics and answer
//! NOT_SERVING to health checks (so the kubelet restarts it). Restarted
//! once the ballast is gone, it must hold every point it had called
//! durable before the disk filled, store again, and be SERVING.
//!
//! The agent's state directory, too small for the custody a guest needs:
//! custody stops growing (counted, logged once), the agent and the guest
//! carry on, every word of guest memory intact; a guest whose custody
//! cannot even start is refused with the reason.

use std::io::Write;
use std::time::{Duration, Instant};

use tonic_health::pb::health_check_response::ServingStatus;
use wset_guest::script::{Script, Touch};
use wset_proto::v1 as pb;
use wset_tests::harness::{
    Agent, AgentOpts, Controller, Guest, GuestKind, SmallDisk, TempDir, grpc_health, http_get,
    metric, wait_for,
};
use wset_tests::simagent::serve_fleet;

const HOSTS: usize = 10;
const VMS_PER_HOST: usize = 10;

fn scrape(ctl: &Controller) -> String {
    let (status, text) = http_get(&ctl.metrics_addr(), "/metrics");
    assert_eq!(status, 200, "the controller's /metrics: {text}");
    text
}

fn value(text: &str, name: &str) -> f64 {
    metric(text, name).unwrap_or_else(|| panic!("the controller's metrics lack {name}"))
}

/// Timestamps of `vm`'s raw points at or before `until_ms` (or now).
fn points(ctl: &Controller, vm: &str, until_ms: Option<u64>) -> Vec<u64> {
    ctl.vm_history(pb::GetVmHistoryRequest {
        vm_id: vm.into(),
        end_ms: until_ms.map_or(0, |t| t + 1),
        page_size: 10_000,
        ..Default::default()
    })
    .unwrap_or_else(|s| panic!("GetVmHistory {vm}: {s}"))
    .points
    .iter()
    .map(|p| p.timestamp_ms)
    .collect()
}

fn health(ctl: &Controller) -> i32 {
    grpc_health(&ctl.metrics_addr()).expect("gRPC health on the controller's metrics port")
}

#[test]
fn a_full_disk_loses_only_new_history_and_a_restart_recovers() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let addrs = serve_fleet(&rt, "full", HOSTS, VMS_PER_HOST);
    let agents: Vec<&str> = addrs.iter().map(String::as_str).collect();

    let dir = TempDir::new("disk-full");
    let disk = SmallDisk::mount(&dir.0, 48);
    let data = disk.path(&dir.0.join("data"));
    let mut ctl = Controller::start(&data, &agents, &[]);
    let connected = |c: &Controller| {
        c.agents()
            .iter()
            .filter(|a| a.state == pb::AgentConnectionState::Connected as i32)
            .count()
    };
    wait_for(Duration::from_secs(30), "every agent connected", || {
        (connected(&ctl) == HOSTS).then_some(())
    });
    assert_eq!(health(&ctl), ServingStatus::Serving as i32);

    // A few seconds of history, durable.
    let watched = "full-0000-vm0";
    let durable = wait_for(Duration::from_secs(30), "a durable mark", || {
        let d = ctl
            .agents()
            .iter()
            .map(|a| a.durable_through_ms)
            .min()
            .unwrap_or(0);
        (d > 0 && points(&ctl, watched, Some(d)).len() >= 10).then_some(d)
    });
    let before = points(&ctl, watched, Some(durable));

    // Fill the disk.
    let ballast = disk.path(&dir.0.join("ballast"));
    {
        let mut f = std::fs::File::create(&ballast).expect("create the ballast file");
        let chunk = vec![0x5au8; 1 << 20];
        while f.write_all(&chunk).is_ok() {}
    }
    let full_at = Instant::now();
    wait_for(
        Duration::from_secs(120),
        "the controller to report failing history writes",
        || {
            let m = scrape(&ctl);
            (value(&m, "wset_controller_store_ok") == 0.0
                && value(&m, "wset_controller_history_lost_writes_total") > 0.0)
                .then_some(())
        },
    );
    eprintln!(
        "history writes failed {:?} after the disk filled",
        full_at.elapsed()
    );
    wait_for(Duration::from_secs(10), "NOT_SERVING health", || {
        (health(&ctl) == ServingStatus::NotServing as i32).then_some(())
    });
    // It keeps serving what it holds in memory, and keeps its agents.
    let failing_at = Instant::now();
    std::thread::sleep(Duration::from_secs(5));
    assert_eq!(connected(&ctl), HOSTS, "agents connected on a full disk");
    assert_eq!(ctl.vms().len(), HOSTS * VMS_PER_HOST);
    let lost = value(&scrape(&ctl), "wset_controller_history_lost_writes_total");
    let log = ctl.log();
    let complaints = log
        .iter()
        .filter(|l| l.contains("history writes fail"))
        .count();
    let allowed = 2 + (full_at.elapsed().as_secs() / 10) as usize;
    assert!(
        (1..=allowed).contains(&complaints),
        "{complaints} log lines about failing writes for {lost} lost batches in {:?} (at most \
         {allowed}); log:\n{}",
        failing_at.elapsed(),
        log.join("\n")
    );
    let complaint = log
        .iter()
        .find(|l| l.contains("history writes fail"))
        .unwrap();
    assert!(
        complaint.contains("No space left on device") && complaint.contains("disk-full"),
        "the complaint names the error and the store's directory: {complaint}"
    );
    eprintln!("{lost} batches lost, {complaints} log lines about it");

    // Space again, and a restart (what the kubelet does on NOT_SERVING).
    ctl.kill9();
    std::fs::remove_file(&ballast).expect("remove the ballast");
    let restarted_ms = wset_tests::now_ms();
    let ctl = Controller::start(&data, &agents, &[]);
    assert_eq!(health(&ctl), ServingStatus::Serving as i32);
    let after = points(&ctl, watched, Some(durable));
    assert_eq!(
        after, before,
        "the points called durable before the disk filled, after the restart"
    );
    wait_for(
        Duration::from_secs(30),
        "new history after the restart",
        || {
            (points(&ctl, watched, None)
                .last()
                .is_some_and(|&t| t > restarted_ms))
            .then_some(())
        },
    );
    let m = scrape(&ctl);
    assert_eq!(value(&m, "wset_controller_store_ok"), 1.0);
    assert_eq!(value(&m, "wset_controller_history_lost_writes_total"), 0.0);
    eprintln!(
        "after the restart: {} durable points of {watched} intact, history stored again",
        before.len()
    );
    drop(rt);
}

#[test]
fn custody_on_a_full_state_dir_costs_neither_the_agent_nor_a_guest() {
    let dir = TempDir::new("custody-full");
    let disk = SmallDisk::mount(&dir.0, 4);
    let agent = Agent::start(AgentOpts {
        access: "exhaustive".into(),
        state_dir: Some(disk.path(&dir.0.join("state"))),
        ..Default::default()
    });
    // 16 MiB of memfd memory and a small hot set: exhaustive tracking
    // would hold about 3,900 pages (15 MiB) in custody; the disk has 4 MiB.
    let script = Script::steady(vec![Touch::read(16, 100), Touch::write(200, 50)], 8_000);
    let mut g = Guest::builder("squeezed", script)
        .kind(GuestKind::Process)
        .memory_mib(16)
        .fill_seed(91)
        .start(&agent);
    let s = agent.wait_summary("squeezed", Duration::from_secs(20), "custody full", |s| {
        s.counters.as_ref().is_some_and(|c| c.custody_full > 0)
    });
    let c = s.counters.unwrap();
    eprintln!(
        "custody full after {} pages held ({} times)",
        c.pages_in_custody, c.custody_full
    );
    assert!(c.pages_in_custody < 1024, "{c:?}");
    // Nothing of the guest was lost; the agent and the VM carry on.
    let v = g.verify_now();
    assert_eq!(
        v["ok"], true,
        "guest memory damaged on a full state dir: {v}"
    );
    let vms = agent.list();
    assert!(
        vms.iter()
            .any(|v| v.vm_id == "squeezed" && v.state == pb::VmState::Tracking as i32),
        "{vms:#?}"
    );
    let line = agent.wait_log("custody file cannot grow", Duration::from_secs(5));
    assert!(
        line.contains("No space left on device") && line.contains("squeezed.custody"),
        "{line}"
    );
    let complaints = agent
        .log()
        .iter()
        .filter(|l| l.contains("custody file cannot grow"))
        .count();
    assert_eq!(complaints, 1, "logged once while it lasts");

    // A second guest needing custody: refused, with the reason; the first
    // is still tracked.
    let why = Guest::builder("no-room", Script::steady(vec![Touch::read(0, 8)], 2_000))
        .kind(GuestKind::Process)
        .memory_mib(16)
        .refused(&agent);
    assert!(
        why.contains("reserve space for custody file") && why.contains("No space left on device"),
        "{why}"
    );
    assert!(
        agent
            .list()
            .iter()
            .any(|v| v.vm_id == "squeezed" && v.state == pb::VmState::Tracking as i32)
    );
    eprintln!("a second guest needing custody was refused: {why}");
}
