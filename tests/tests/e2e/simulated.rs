//! The controller driven by a simulated cluster through its real path:
//! twenty simulated agents (real gRPC servers, synthetic traces) stream to
//! the real controller binary, which stores their history and plans. The
//! two hosts whose VMs all grow are relieved, onto the others.

use std::sync::Arc;
use std::time::Duration;

use wset_proto::v1 as pb;
use wset_proto::v1::scheduler_service_client::SchedulerServiceClient;
use wset_tests::harness::{Controller, TempDir, wait_for};
use wset_tests::simagent::{SimHost, serve};

const GIB: u64 = 1 << 30;
const HOSTS: usize = 20;
const HOT: [&str; 2] = ["host-00", "host-01"];

#[test]
fn a_simulated_cluster_drives_the_controller() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let hosts: Vec<Arc<SimHost>> = (0..HOSTS)
        .map(|h| {
            let id = format!("host-{h:02}");
            Arc::new(SimHost::new(
                h as u64 + 1,
                &id,
                48 * GIB,
                10,
                8 * GIB,
                HOT.contains(&id.as_str()),
                60,
            ))
        })
        .collect();
    let addrs: Vec<String> = hosts
        .iter()
        .map(|h| {
            rt.block_on(serve(h.clone(), "127.0.0.1:0"))
                .expect("serve a simulated agent")
        })
        .collect();
    let data = TempDir::new("simulated");
    let refs: Vec<&str> = addrs.iter().map(String::as_str).collect();
    let ctl = Controller::start(
        &data.0,
        &refs,
        &[
            "--plan-interval",
            "500ms",
            "--horizon",
            "5s",
            "--lookback",
            "10s",
        ],
    );
    wait_for(
        Duration::from_secs(20),
        "every simulated agent connected",
        || {
            let a = ctl.agents();
            (a.len() == HOSTS
                && a.iter()
                    .all(|a| a.state == pb::AgentConnectionState::Connected as i32))
            .then_some(())
        },
    );
    wait_for(Duration::from_secs(20), "every simulated VM listed", || {
        (ctl.vms().len() == HOSTS * 10).then_some(())
    });
    let url = format!("http://{}", ctl.grpc_addr);
    let moves = wait_for(Duration::from_secs(40), "the hot hosts relieved", || {
        let m = rt.block_on(async {
            SchedulerServiceClient::connect(url.clone())
                .await
                .ok()?
                .list_migrations(pb::ListMigrationsRequest::default())
                .await
                .ok()
        })?;
        let m = m.into_inner();
        let from: std::collections::BTreeSet<&str> = m
            .migrations
            .iter()
            .map(|x| x.from_host_id.as_str())
            .collect();
        (from == HOT.into_iter().collect()).then_some(m)
    });
    println!(
        "{} moves: {:?}",
        moves.migrations.len(),
        moves
            .migrations
            .iter()
            .map(|m| (&m.vm_id, &m.to_host_id))
            .collect::<Vec<_>>()
    );
    for m in &moves.migrations {
        assert!(!HOT.contains(&m.to_host_id.as_str()), "{m:#?}");
        assert!(m.copy_seconds > 0.0);
    }
    let plan = moves.plan.expect("plan info");
    assert_eq!(
        (plan.hosts as usize, plan.vms as usize),
        (HOSTS, HOSTS * 10)
    );
    assert!(plan.samples > 0);
    let stored: u64 = ctl.agents().iter().map(|a| a.summaries_stored).sum();
    println!(
        "stored {stored} summaries from {HOSTS} simulated agents; plan {} took {:.3} s",
        plan.plan_id, plan.planning_seconds
    );
}
