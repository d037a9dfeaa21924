//! Both servers as operators observe them: a real Prometheus (Debian's
//! `prometheus` package; scripts/test.sh installs it) scrapes the agent's
//! and the controller's metrics endpoints, and its query API must show
//! each target up and the figures moving; `promtool check metrics` lints
//! both expositions; the metrics port answers gRPC health checks in
//! plaintext, as the kubelet's probes make them.

use std::io::Write;
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use wset_guest::script::{Script, Touch};
use wset_tests::harness::{
    Agent, AgentOpts, Controller, Guest, GuestKind, TempDir, free_loopback_addr, grpc_health,
    http_get, wait_for,
};

fn tool(name: &str) -> String {
    let path = format!("/usr/bin/{name}");
    assert!(
        std::path::Path::new(&path).exists(),
        "{path} is missing: install Debian's prometheus package (apt-get install prometheus; \
         scripts/test.sh does)"
    );
    path
}

/// Lint an exposition with `promtool check metrics`.
fn promtool_check(what: &str, text: &str) {
    let mut child = Command::new(tool("promtool"))
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run promtool");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics refused the {what}'s exposition:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

struct Prometheus {
    child: Child,
    addr: String,
    _dir: TempDir,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Prometheus {
    fn start(agent: &str, controller: &str) -> Self {
        let dir = TempDir::new("prometheus");
        let config = dir.0.join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n\
                 scrape_configs:\n\
                 \x20 - job_name: wset-agent\n    static_configs:\n      - targets: ['{agent}']\n\
                 \x20 - job_name: wset-controller\n    static_configs:\n      - targets: ['{controller}']\n"
            ),
        )
        .unwrap();
        let addr = free_loopback_addr();
        let child = Command::new(tool("prometheus"))
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.0.join("data").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start prometheus");
        Self {
            child,
            addr,
            _dir: dir,
        }
    }

    /// An instant query: each result's labels and value.
    fn query(&self, q: &str) -> Vec<(serde_json::Value, f64)> {
        let enc: String = q
            .bytes()
            .map(|b| match b {
                b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                    (b as char).to_string()
                }
                b => format!("%{b:02X}"),
            })
            .collect();
        let (status, body) = match TcpStream::connect(&self.addr) {
            Ok(_) => http_get(&self.addr, &format!("/api/v1/query?query={enc}")),
            Err(_) => return Vec::new(),
        };
        if status != 200 {
            return Vec::new();
        }
        let v: serde_json::Value = serde_json::from_str(&body).expect("Prometheus answers JSON");
        v["data"]["result"]
            .as_array()
            .map(|r| {
                r.iter()
                    .map(|x| {
                        let val = x["value"][1]
                            .as_str()
                            .and_then(|s| s.parse().ok())
                            .unwrap_or(f64::NAN);
                        (x["metric"].clone(), val)
                    })
                    .collect()
            })
            .unwrap_or_default()
    }
}

#[test]
fn prometheus_scrapes_agent_and_controller() {
    let agent = Agent::start(AgentOpts {
        extra: vec!["--host-name".into(), "node-m".into()],
        ..Default::default()
    });
    // Reads of 32 pages and writes of 16, forever: faults keep coming.
    let script = Script::steady(vec![Touch::read(0, 32), Touch::write(64, 16)], 60_000);
    let _g = Guest::builder("metrics-1", script)
        .kind(GuestKind::Process)
        .start(&agent);
    let data = TempDir::new("metrics-ctl");
    let ctl = Controller::start(
        &data.0,
        &[&agent.grpc_addr],
        &["--plan-interval", "1s", "--maintain-interval", "1s"],
    );
    let (am, cm) = (agent.metrics_addr(), ctl.metrics_addr());

    // The endpoints themselves, linted by promtool.
    wait_for(
        Duration::from_secs(20),
        "the controller's first plan",
        || {
            http_get(&cm, "/metrics")
                .1
                .contains("wset_controller_plan_age_seconds")
                .then_some(())
        },
    );
    for (what, addr) in [("agent", &am), ("controller", &cm)] {
        let (status, text) = http_get(addr, "/metrics");
        assert_eq!(status, 200, "{what} /metrics: {text}");
        promtool_check(what, &text);
        assert!(text.contains("process_resident_memory_bytes"), "{text}");
        let (status, _) = http_get(addr, "/nothing-here");
        assert_eq!(status, 404, "{what}: an unknown path is not found");
    }

    // The kubelet's gRPC probe: plaintext grpc.health.v1 on the metrics
    // port (the gRPC port may demand client certificates).
    for (what, addr) in [("agent", &am), ("controller", &cm)] {
        let status = grpc_health(addr)
            .unwrap_or_else(|e| panic!("{what}: gRPC health on the metrics port: {e}"));
        assert_eq!(
            status,
            tonic_health::pb::health_check_response::ServingStatus::Serving as i32,
            "{what}"
        );
    }

    let prom = Prometheus::start(&am, &cm);
    // Both targets up.
    wait_for(
        Duration::from_secs(60),
        "Prometheus to scrape both targets",
        || {
            let up = prom.query("up");
            (up.len() == 2 && up.iter().all(|(_, v)| *v == 1.0)).then_some(())
        },
    );
    // The figures: faults served for the guest, its fault latency, its
    // working set; the controller's ingest and plan.
    let positive = |q: &str| {
        let r = prom.query(q);
        !r.is_empty() && r.iter().all(|(_, v)| *v > 0.0)
    };
    for q in [
        r#"wset_vm_faults_total{vm_id="metrics-1",kind="missing"}"#,
        r#"wset_vm_fault_service_seconds_count{vm_id="metrics-1"}"#,
        r#"wset_vm_working_set_bytes{vm_id="metrics-1",window="1s"}"#,
        r#"wset_agent_registrations_total{result="accepted"}"#,
        r#"wset_agent_vms{state="tracking"}"#,
        r#"wset_controller_agent_batches_total{host_id="node-m"}"#,
        r#"wset_controller_agents{state="connected"}"#,
        r#"wset_controller_plan_age_seconds"#,
        r#"wset_controller_store_bytes"#,
        r#"wset_controller_maintenance_passes_total"#,
        r#"wset_controller_maintenance_duration_seconds"#,
        r#"process_resident_memory_bytes{job="wset-agent"}"#,
        r#"process_resident_memory_bytes{job="wset-controller"}"#,
    ] {
        wait_for(Duration::from_secs(30), q, || positive(q).then_some(()));
    }
    // Counters move between scrapes: batches keep arriving.
    wait_for(
        Duration::from_secs(30),
        "a rising batch rate at the controller",
        || {
            positive(r#"rate(wset_controller_agent_batches_total{host_id="node-m"}[5s])"#)
                .then_some(())
        },
    );
    // The working set Prometheus holds is the agent's own (48 pages touched).
    let ws = prom.query(r#"wset_vm_working_set_bytes{vm_id="metrics-1",window="3s"}"#);
    assert_eq!(ws.len(), 1, "{ws:?}");
    assert_eq!(ws[0].1, (48 * 4096) as f64, "{ws:?}");
    // Ingest is current: the last batch is recent.
    let lag = prom.query(r#"wset_controller_ingest_lag_seconds{host_id="node-m"}"#);
    assert!(lag.len() == 1 && lag[0].1 < 10.0, "ingest lag {lag:?}");
}
