//! End to end: three agents (three hosts on loopback), real KVM guests, and
//! the controller's planner. The guests on one host grow their working sets
//! past what it can hold: the controller recommends moving VMs off it to the
//! hosts with headroom, the plan is visible with grpcurl, and when the guests
//! shrink back the recommendation is withdrawn (seen on WatchDecisions).

use std::process::Command;
use std::time::{Duration, Instant};

use wset_guest::script::{Phase, Script, Touch};
use wset_proto::v1 as pb;
use wset_proto::v1::scheduler_service_client::SchedulerServiceClient;
use wset_tests::harness::{
    Agent, AgentOpts, Backing, Controller, Guest, TempDir, free_loopback_addr, wait_for,
};

const MIB: u64 = 1 << 20;
/// Memory each host gives VMs: the watermark (85%) is 68 MiB.
const CAPACITY: u64 = 80 * MIB;

fn agent(host: &str, addr: &str) -> Agent {
    Agent::start(AgentOpts {
        interval_ms: 250,
        windows_ms: vec![1000, 3000],
        access: "off".into(),
        extra: vec![
            "--host-name".into(),
            host.into(),
            "--vm-capacity-bytes".into(),
            CAPACITY.to_string(),
        ],
        grpc_addr: Some(addr.into()),
        ..Default::default()
    })
}

fn phase(name: &str, pages: u32, secs: u64) -> Phase {
    Phase {
        name: name.into(),
        touches: vec![Touch::write(16, pages)],
        duration_ms: secs * 1000,
        period_ms: 100,
    }
}

/// A KVM guest of 32 MiB on anonymous memory (its writes are what the
/// agent sees, WP_ASYNC): 2 MiB for `small_s`, then 26 MiB for `grown_s`,
/// then 2 MiB again.
fn guest(a: &Agent, vm: &str, small_s: u64, grown_s: u64) -> Guest {
    let script = Script {
        phases: vec![
            phase("small", 512, small_s),
            phase("grown", 6656, grown_s),
            phase("small", 512, 600),
        ],
        checksum_every: 0,
    };
    Guest::builder(vm, script).backing(Backing::Anon).start(a)
}

fn migrations(c: &Controller) -> Vec<pb::Migration> {
    let url = format!("http://{}", c.grpc_addr);
    tokio::runtime::Runtime::new()
        .unwrap()
        .block_on(async move {
            SchedulerServiceClient::connect(url)
                .await
                .expect("connect")
                .list_migrations(pb::ListMigrationsRequest::default())
                .await
                .expect("ListMigrations")
                .into_inner()
                .migrations
        })
}

#[test]
fn growth_on_one_host_moves_vms_away_and_shrinking_withdraws_it() {
    let addrs: Vec<String> = (0..3).map(|_| free_loopback_addr()).collect();
    let agents: Vec<Agent> = ["h1", "h2", "h3"]
        .iter()
        .zip(&addrs)
        .map(|(h, a)| agent(h, a))
        .collect();
    // h1: three guests that grow together for 12 s; h2 and h3: one small one.
    let _g: Vec<Guest> = vec![
        guest(&agents[0], "web-1", 8, 12),
        guest(&agents[0], "web-2", 8, 12),
        guest(&agents[0], "web-3", 8, 12),
        guest(&agents[1], "db-1", 600, 0),
        guest(&agents[2], "db-2", 600, 0),
    ];
    let started = Instant::now();
    let data = TempDir::new("decisions");
    let refs: Vec<&str> = addrs.iter().map(String::as_str).collect();
    let ctl = Controller::start(
        &data.0,
        &refs,
        &[
            "--plan-interval",
            "500ms",
            "--horizon",
            "2s",
            "--lookback",
            "5s",
            "--hysteresis",
            "1m",
        ],
    );
    let url = format!("http://{}", ctl.grpc_addr);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mut watch = rt.block_on(async {
        let mut c = SchedulerServiceClient::connect(url.clone())
            .await
            .expect("connect");
        c.watch_decisions(pb::WatchDecisionsRequest {})
            .await
            .expect("WatchDecisions")
            .into_inner()
    });

    // While small: nothing to move.
    std::thread::sleep(Duration::from_secs(4));
    assert!(
        migrations(&ctl).is_empty(),
        "moves while every host is small: {:#?}",
        migrations(&ctl)
    );

    // They grow: moves off h1, onto h2 and h3.
    let moves = wait_for(Duration::from_secs(25), "moves recommended off h1", || {
        let m = migrations(&ctl);
        (!m.is_empty()).then_some(m)
    });
    println!("after {:?}: {moves:#?}", started.elapsed());
    for m in &moves {
        assert_eq!(m.from_host_id, "h1", "{m:#?}");
        assert!(["h2", "h3"].contains(&m.to_host_id.as_str()), "{m:#?}");
        assert_eq!(m.reason, pb::MigrationReason::Overload as i32);
        assert!(m.copy_seconds > 0.0 && !m.explanation.is_empty());
    }
    // Visible with grpcurl, with the evidence behind it.
    let out = Command::new("grpcurl")
        .args([
            "--plaintext",
            &ctl.grpc_addr,
            "wset.v1.SchedulerService/ListMigrations",
        ])
        .output()
        .expect("grpcurl (cargo install --locked grpcurl-rs; scripts/test.sh installs it)");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("MIGRATION_REASON_OVERLOAD") && text.contains("h1"),
        "{text}"
    );
    let explain = Command::new("grpcurl")
        .args([
            "--plaintext",
            "-d",
            &format!(r#"{{"decision_id":"{}"}}"#, moves[0].decision_id),
            &ctl.grpc_addr,
            "wset.v1.SchedulerService/ExplainDecision",
        ])
        .output()
        .expect("grpcurl");
    let text = String::from_utf8_lossy(&explain.stdout);
    assert!(
        text.contains("evidence") && text.contains("host h1"),
        "{text}"
    );

    // They shrink: the recommendation is withdrawn, and the stream says so.
    let withdrawn = rt.block_on(async {
        tokio::time::timeout(Duration::from_secs(40), async {
            loop {
                let u = watch.message().await.expect("stream").expect("update");
                if !u.withdrawn.is_empty() && u.current.is_empty() {
                    return u;
                }
            }
        })
        .await
        .expect("a withdrawal within 40 s")
    });
    println!(
        "after {:?}: withdrawn {:#?}",
        started.elapsed(),
        withdrawn.withdrawn
    );
    assert!(migrations(&ctl).is_empty());
    // The overcommit view: h1's demand is back under its watermark.
    let o = rt.block_on(async {
        SchedulerServiceClient::connect(url)
            .await
            .unwrap()
            .get_overcommit(pb::GetOvercommitRequest {
                host_id: "h1".into(),
                include_vms: true,
                replan: true,
            })
            .await
            .expect("GetOvercommit")
            .into_inner()
    });
    let h1 = &o.hosts[0];
    assert_eq!((h1.capacity_bytes, h1.vms.len()), (CAPACITY, 3), "{h1:#?}");
    assert!(h1.demand_at_risk_bytes < 0.85 * CAPACITY as f64, "{h1:#?}");
    assert!(h1.vms.iter().all(|v| v.phase_change_at_ms > 0), "{h1:#?}");
}
