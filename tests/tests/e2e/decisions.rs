//! End to end: three agents (three hosts on loopback), real KVM guests, and
//! the controller's planner. The guests on one host grow their working sets
//! past what it can hold: the controller recommends moving VMs off it to the
//! hosts with headroom, the plan is visible with grpcurl, and when the guests
//! shrink back the recommendation is withdrawn (seen on WatchDecisions).

use std::process::Command;
use std::time::{Duration, Instant};

use tonic::transport::Channel;
use wset_guest::script::{Phase, Script, Touch};
use wset_proto::v1 as pb;
use wset_proto::v1::scheduler_service_client::SchedulerServiceClient;
use wset_tests::harness::{
    Agent, AgentOpts, Backing, Controller, Guest, TempDir, free_loopback_addr, wait_for,
};

const MIB: u64 = 1 << 20;
/// Memory each host gives VMs: the watermark (85%) is 68 MiB.
const CAPACITY: u64 = 80 * MIB;
/// How long h1's guests stay small, then grown, in seconds.
const SMALL_S: u64 = 20;
const GROWN_S: u64 = 30;

fn agent(host: &str, addr: &str) -> Agent {
    Agent::start(AgentOpts::planner_host(host, addr, CAPACITY))
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

/// One call to the controller's SchedulerService at `url`.
fn scheduler<T, F>(url: &str, call: impl FnOnce(SchedulerServiceClient<Channel>) -> F) -> T
where
    F: std::future::Future<Output = T>,
{
    let url = url.to_owned();
    tokio::runtime::Runtime::new()
        .unwrap()
        .block_on(async move {
            call(SchedulerServiceClient::connect(url).await.expect("connect")).await
        })
}

fn migrations(c: &Controller) -> Vec<pb::Migration> {
    scheduler(&format!("http://{}", c.grpc_addr), |mut c| async move {
        c.list_migrations(pb::ListMigrationsRequest::default())
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
    let started = Instant::now();
    // h1: three guests, small for 20 s, that grow together for 30 s; h2 and
    // h3: one small one. The phases are long so that a loaded machine still
    // sees each one: the test waits for conditions, the guests keep time.
    let _g: Vec<Guest> = vec![
        guest(&agents[0], "web-1", SMALL_S, GROWN_S),
        guest(&agents[0], "web-2", SMALL_S, GROWN_S),
        guest(&agents[0], "web-3", SMALL_S, GROWN_S),
        guest(&agents[1], "db-1", 600, 0),
        guest(&agents[2], "db-2", 600, 0),
    ];
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

    // While small: a plan over all five VMs, and nothing to move.
    let small = wait_for(
        Duration::from_secs(SMALL_S),
        "a plan that has seen all five VMs while they are small",
        || {
            let o = overcommit(&url, "", false);
            let seen: usize = o.hosts.iter().map(|h| h.vms.len()).sum();
            (seen == 5).then_some(o)
        },
    );
    assert!(
        started.elapsed() < Duration::from_secs(SMALL_S),
        "the machine is too slow for this test: the guests' small phase ({SMALL_S} s) \
         ended before a plan saw them all"
    );
    assert!(
        migrations(&ctl).is_empty(),
        "moves while every host is small: {:#?}; {small:#?}",
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
    // Each plan names its decisions afresh, so explain one of the latest.
    let mut last = String::new();
    wait_for(
        Duration::from_secs(GROWN_S),
        "ExplainDecision (grpcurl) on a move of the latest plan",
        || {
            let m = migrations(&ctl).into_iter().next()?;
            let explain = Command::new("grpcurl")
                .args([
                    "--plaintext",
                    "-d",
                    &format!(r#"{{"decision_id":"{}"}}"#, m.decision_id),
                    &ctl.grpc_addr,
                    "wset.v1.SchedulerService/ExplainDecision",
                ])
                .output()
                .expect("grpcurl");
            last = format!(
                "{}{}",
                String::from_utf8_lossy(&explain.stdout),
                String::from_utf8_lossy(&explain.stderr)
            );
            (last.contains("evidence") && last.contains("host h1")).then_some(())
        },
    );
    assert!(!last.contains("NotFound"), "{last}");

    // They shrink: the recommendation is withdrawn, and the stream says so.
    let withdrawn = rt.block_on(async {
        tokio::time::timeout(Duration::from_secs(GROWN_S + 60), async {
            loop {
                let u = watch.message().await.expect("stream").expect("update");
                if !u.withdrawn.is_empty() && u.current.is_empty() {
                    return u;
                }
            }
        })
        .await
        .expect("a withdrawal within a minute of the guests' shrinking")
    });
    println!(
        "after {:?}: withdrawn {:#?}",
        started.elapsed(),
        withdrawn.withdrawn
    );
    assert!(migrations(&ctl).is_empty());
    // The overcommit view: h1's demand is back under its watermark, and
    // every one of its VMs shows its shrink as a phase change (the last one
    // may be seen a little after the withdrawal).
    let h1 = wait_for(
        Duration::from_secs(60),
        "h1 under its watermark with a phase change on every VM",
        || {
            let h1 = overcommit(&url, "h1", true)
                .hosts
                .into_iter()
                .next()
                .expect("GetOvercommit names h1");
            (h1.demand_at_risk_bytes < 0.85 * CAPACITY as f64
                && h1.vms.iter().all(|v| v.phase_change_at_ms > 0))
            .then_some(h1)
        },
    );
    assert_eq!((h1.capacity_bytes, h1.vms.len()), (CAPACITY, 3), "{h1:#?}");
}

/// GetOvercommit for `host_id` (all hosts when empty).
fn overcommit(url: &str, host_id: &str, replan: bool) -> pb::GetOvercommitResponse {
    let host_id = host_id.to_owned();
    scheduler(url, |mut c| async move {
        c.get_overcommit(pb::GetOvercommitRequest {
            host_id,
            include_vms: true,
            replan,
        })
        .await
        .expect("GetOvercommit")
        .into_inner()
    })
}
