//! End to end: two real agents (two processes on loopback, each tracking a
//! real KVM guest) and a real controller. Every VM's history is retrievable
//! over gRPC and matches what the agents measured; an agent restart shows
//! as a gap with its reason; a controller killed with SIGKILL comes back with
//! every point it had called durable.

use std::collections::BTreeSet;
use std::time::Duration;

use wset_guest::memory::PAGE;
use wset_guest::script::{Script, Touch};
use wset_proto::v1 as pb;
use wset_tests::harness::{
    Agent, AgentOpts, Controller, Guest, TempDir, free_loopback_addr, wait_for, window,
};

const WINDOW_MS: u64 = 1000;

fn agent(host: &str, addr: &str) -> Agent {
    Agent::start(AgentOpts {
        interval_ms: 200,
        windows_ms: vec![WINDOW_MS, 3000],
        access: "exhaustive".into(),
        extra: vec!["--host-name".into(), host.into()],
        grpc_addr: Some(addr.into()),
        ..Default::default()
    })
}

/// A KVM guest reading `pages` pages for a minute.
fn guest(agent: &Agent, vm_id: &str, pages: u32) -> Guest {
    let script = Script::steady(vec![Touch::read(16, pages)], 60_000);
    Guest::builder(vm_id, script).start(agent)
}

fn history(c: &Controller, vm: &str) -> pb::GetVmHistoryResponse {
    c.vm_history(pb::GetVmHistoryRequest {
        vm_id: vm.into(),
        page_size: 10_000,
        ..Default::default()
    })
    .unwrap_or_else(|s| panic!("GetVmHistory {vm}: {s}"))
}

fn shortest(p: &pb::VmHistoryPoint) -> u64 {
    p.windows
        .iter()
        .find(|w| w.window_ms == WINDOW_MS)
        .map_or(0, |w| w.wss_bytes)
}

fn agent_status<'a>(c: &'a [pb::AgentStatus], ep: &str) -> &'a pb::AgentStatus {
    c.iter()
        .find(|a| a.endpoint == ep)
        .unwrap_or_else(|| panic!("no agent {ep} in {c:#?}"))
}

#[test]
fn two_agents_history_agent_restart_and_controller_crash() {
    let (addr_a, addr_b) = (free_loopback_addr(), free_loopback_addr());
    let a = agent("host-a", &addr_a);
    let mut b = agent("host-b", &addr_b);
    let _ga = guest(&a, "vm-a", 200);
    let gb = guest(&b, "vm-b", 100);
    let data = TempDir::new("controller");
    let mut ctl = Controller::start(&data.0, &[&addr_a, &addr_b], &[]);

    // Both VMs arrive, each on its host, with history.
    let vms = wait_for(Duration::from_secs(30), "both VMs listed", || {
        let v = ctl.vms();
        (v.len() == 2).then_some(v)
    });
    assert_eq!(
        vms.iter()
            .map(|v| (v.vm_id.as_str(), v.host_id.as_str()))
            .collect::<Vec<_>>(),
        [("vm-a", "host-a"), ("vm-b", "host-b")]
    );
    // The stored working set is what the agent measures (the guest is
    // steady: 200 read pages plus its program's own).
    for (vm, ag) in [("vm-a", &a), ("vm-b", &b)] {
        let truth = wait_for(
            Duration::from_secs(30),
            "stored working set = agent's",
            || {
                let truth = window(&ag.summary(vm).expect("agent summary"), WINDOW_MS).wss_bytes;
                let h = history(&ctl, vm);
                let last = h.points.last()?;
                (h.points.len() >= 5 && shortest(last) == truth).then_some(truth)
            },
        );
        let h = history(&ctl, vm);
        assert_eq!(h.resolution_ms, 0, "raw samples");
        let last = h.points.last().unwrap();
        assert!(
            last.samples == 1 && last.memory_bytes == 32 << 20,
            "{last:#?}"
        );
        println!(
            "{vm}: {} points, last working set {} KiB (agent: {} KiB)",
            h.points.len(),
            shortest(last) / 1024,
            truth / 1024
        );
    }
    assert!(window(&a.summary("vm-a").unwrap(), WINDOW_MS).wss_bytes >= 200 * PAGE);
    let hh = ctl
        .host_history(pb::GetHostHistoryRequest {
            host_id: "host-a".into(),
            ..Default::default()
        })
        .expect("GetHostHistory");
    let hp = hh.points.last().expect("host points");
    assert!(
        hp.memory_total_bytes > 0 && hp.vms == 1 && hp.vm_memory_committed_bytes == 32 << 20,
        "{hp:#?}"
    );
    assert!(
        hh.events
            .iter()
            .any(|e| e.kind == pb::HostEventKind::Connected as i32)
    );

    // Restart agent B (same address, same host name; its VMM registers again).
    let before = agent_status(&ctl.agents(), &addr_b).clone();
    assert_eq!(before.state, pb::AgentConnectionState::Connected as i32);
    let restart_at = wset_tests::now_ms();
    b.terminate();
    drop(gb);
    std::thread::sleep(Duration::from_millis(1500));
    let b2 = agent("host-b", &addr_b);
    let _gb2 = guest(&b2, "vm-b", 100);
    let after = wait_for(Duration::from_secs(30), "agent B reconnected", || {
        let s = agent_status(&ctl.agents(), &addr_b).clone();
        (s.state == pb::AgentConnectionState::Connected as i32
            && s.agent_instance_id != before.agent_instance_id
            && s.last_batch_ms > restart_at + 1500)
            .then_some(s)
    });
    assert!(after.reconnects >= 1, "{after:#?}");
    // The gap is in vm-b's history, with what the controller knows of it
    // (the restart event may be stored a moment after the first new batch).
    let gap = wait_for(Duration::from_secs(20), "a gap in vm-b's history", || {
        let h = history(&ctl, "vm-b");
        h.gaps
            .into_iter()
            .find(|g| g.end_ms > restart_at && g.reason.contains("agent_restarted"))
    });
    println!("vm-b gap: {gap:?}");
    assert!(gap.end_ms - gap.start_ms >= 1000, "{gap:?}");
    assert!(
        gap.reason.contains("disconnected") && gap.reason.contains("agent_restarted"),
        "{gap:?}"
    );
    // vm-a's history, on the agent that stayed, has no gap.
    assert!(history(&ctl, "vm-a").gaps.is_empty());

    // kill -9 the controller: everything it called durable survives.
    let durable = wait_for(Duration::from_secs(10), "a durable mark", || {
        let d = agent_status(&ctl.agents(), &addr_a).durable_through_ms;
        (d > 0).then_some(d)
    });
    let acked: BTreeSet<u64> = history(&ctl, "vm-a")
        .points
        .iter()
        .map(|p| p.timestamp_ms)
        .filter(|&t| t <= durable)
        .collect();
    assert!(acked.len() >= 10, "{} durable points", acked.len());
    ctl.kill9();
    let killed_at = wset_tests::now_ms();
    std::thread::sleep(Duration::from_millis(1500));
    let ctl = Controller::start(&data.0, &[&addr_a, &addr_b], &[]);
    let vms = ctl.vms();
    assert_eq!(vms.len(), 2, "VM index after the crash: {vms:#?}");
    let after_crash: BTreeSet<u64> = history(&ctl, "vm-a")
        .points
        .iter()
        .map(|p| p.timestamp_ms)
        .collect();
    let lost: Vec<_> = acked.difference(&after_crash).collect();
    assert!(
        lost.is_empty(),
        "durable points lost in the crash: {lost:?}"
    );
    println!(
        "controller SIGKILL: {} durable points of vm-a, all intact",
        acked.len()
    );
    // Ingest resumes, and the downtime is a gap too.
    let gap = wait_for(
        Duration::from_secs(30),
        "new points and the downtime gap",
        || {
            history(&ctl, "vm-a")
                .gaps
                .into_iter()
                .find(|g| g.end_ms > killed_at)
        },
    );
    assert!(gap.end_ms - gap.start_ms >= 1000, "{gap:?}");
    // Plans resume, on the reloaded history and the re-dialled agents.
    let url = format!("http://{}", ctl.grpc_addr);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let plan = wait_for(Duration::from_secs(30), "a plan after the restart", || {
        let o = rt
            .block_on(async {
                pb::scheduler_service_client::SchedulerServiceClient::connect(url.clone())
                    .await
                    .ok()?
                    .get_overcommit(pb::GetOvercommitRequest {
                        replan: true,
                        ..Default::default()
                    })
                    .await
                    .ok()
            })?
            .into_inner();
        o.plan.filter(|p| p.created_ms > killed_at && p.vms >= 2)
    });
    println!(
        "controller SIGKILL: plans resumed ({} hosts, {} VMs, {} samples)",
        plan.hosts, plan.vms, plan.samples
    );
}
