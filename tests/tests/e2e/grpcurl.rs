//! A real reflection client against both servers: `grpcurl` (the
//! grpcurl-rs build from crates.io; scripts/test.sh installs it) lists and
//! describes the services, makes unary calls, reads a server stream and asks
//! the health service, exactly as the README shows operators.

use std::process::Command;
use std::time::Duration;

use wset_guest::script::{Script, Touch};
use wset_tests::harness::{Agent, AgentOpts, Controller, Guest, GuestKind, TempDir, wait_for};

fn grpcurl(args: &[&str]) -> (bool, String, String) {
    let out = Command::new("grpcurl")
        .arg("--plaintext")
        .args(args)
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "grpcurl could not be run ({e}): install it with 'cargo install --locked grpcurl-rs' \
                 (scripts/test.sh does) and make sure it is on PATH"
            )
        });
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// grpcurl must succeed; its standard output.
fn ok(args: &[&str]) -> String {
    let (success, out, err) = grpcurl(args);
    assert!(success, "grpcurl {args:?} failed:\n{err}\n{out}");
    out
}

/// Read a server stream for 3 s, then hang up (grpcurl-rs does not end a
/// stream at --max-time).
fn stream_for(args: &[&str]) -> String {
    let mut child = Command::new("grpcurl")
        .arg("--plaintext")
        .args(args)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("run grpcurl");
    let mut out = child.stdout.take().expect("stdout");
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = std::io::Read::read_to_string(&mut out, &mut s);
        s
    });
    std::thread::sleep(Duration::from_secs(3));
    let _ = child.kill();
    let _ = child.wait();
    reader.join().expect("reader")
}

#[test]
fn grpcurl_against_agent_and_controller() {
    let agent = Agent::start(AgentOpts {
        extra: vec!["--host-name".into(), "node-1".into()],
        ..Default::default()
    });
    let script = Script::steady(vec![Touch::read(16, 50)], 30_000);
    let _g = Guest::builder("web-1", script)
        .kind(GuestKind::Process)
        .start(&agent);
    let data = TempDir::new("grpcurl");
    let ctl = Controller::start(&data.0, &[&agent.grpc_addr], &[]);
    let (a, c) = (agent.grpc_addr.as_str(), ctl.grpc_addr.as_str());

    // list: the service, health and both reflection versions.
    for (addr, svc) in [
        (a, "wset.v1.AgentService"),
        (c, "wset.v1.ControllerService"),
    ] {
        let list = ok(&[addr, "list"]);
        for want in [
            svc,
            "grpc.health.v1.Health",
            "grpc.reflection.v1.ServerReflection",
        ] {
            assert!(list.contains(want), "{addr}: {want} not listed:\n{list}");
        }
        let described = ok(&[addr, "describe", svc]);
        assert!(described.contains("rpc "), "{svc}:\n{described}");
        let health = ok(&[addr, "grpc.health.v1.Health/Check"]);
        assert!(health.contains("SERVING"), "{health}");
        let health = ok(&[
            "-d",
            &format!(r#"{{"service":"{svc}"}}"#),
            addr,
            "grpc.health.v1.Health/Check",
        ]);
        assert!(health.contains("SERVING"), "{health}");
    }
    let described = ok(&[a, "describe", "wset.v1.AgentService"]);
    assert!(
        described.contains("WatchSummaries") && described.contains("stream"),
        "{described}"
    );

    // Unary calls.
    let vms = ok(&[a, "wset.v1.AgentService/ListVms"]);
    assert!(vms.contains("web-1"), "{vms}");
    let facts = ok(&[a, "wset.v1.AgentService/GetHostFacts"]);
    assert!(
        facts.contains("node-1") && facts.contains("memoryTotalBytes"),
        "{facts}"
    );
    let summary = ok(&[
        "-d",
        r#"{"vm_id":"web-1"}"#,
        a,
        "wset.v1.AgentService/GetSummary",
    ]);
    assert!(summary.contains("wssBytes"), "{summary}");

    // A server stream: read batches for 3 s, then hang up (grpcurl-rs does
    // not end a stream at --max-time).
    let mut child = Command::new("grpcurl")
        .args([
            "--plaintext",
            "-d",
            r#"{"vm_ids":["web-1"],"compact":true}"#,
        ])
        .args([a, "wset.v1.AgentService/WatchSummaries"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("run grpcurl");
    let mut out = child.stdout.take().expect("stdout");
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = std::io::Read::read_to_string(&mut out, &mut s);
        s
    });
    std::thread::sleep(Duration::from_secs(3));
    let _ = child.kill();
    let _ = child.wait();
    let stream = reader.join().expect("reader");
    let batches = stream.matches("\"sequence\"").count();
    assert!(batches >= 2, "{batches} batches in 3 s:\n{stream}");
    assert!(
        stream.contains("web-1") && stream.contains("node-1"),
        "{stream}"
    );
    println!("grpcurl read {batches} summary batches in 3 s");

    // The controller: its agents, the VM and its history.
    wait_for(Duration::from_secs(20), "the controller has the VM", || {
        let v = ok(&[c, "wset.v1.ControllerService/ListClusterVms"]);
        v.contains("web-1").then_some(())
    });
    let updates = stream_for(&[
        "-d",
        r#"{"host_id":"node-1"}"#,
        c,
        "wset.v1.ControllerService/WatchVms",
    ]);
    let n = updates.matches("\"latest\"").count();
    assert!(
        n >= 2 && updates.contains("web-1"),
        "{n} updates in 3 s:\n{updates}"
    );
    println!("grpcurl read {n} VM updates from the controller in 3 s");
    let agents = ok(&[c, "wset.v1.ControllerService/ListAgents"]);
    assert!(
        agents.contains("AGENT_CONNECTION_STATE_CONNECTED") && agents.contains("node-1"),
        "{agents}"
    );
    let hist = ok(&[
        "-d",
        r#"{"vm_id":"web-1","page_size":5}"#,
        c,
        "wset.v1.ControllerService/GetVmHistory",
    ]);
    assert!(
        hist.contains("points") && hist.contains("wssBytes"),
        "{hist}"
    );

    // A bad argument comes back as INVALID_ARGUMENT with what to fix.
    let (success, out, err) = grpcurl(&[
        "-d",
        r#"{"vm_id":"web-1","start_ms":"5","end_ms":"4"}"#,
        c,
        "wset.v1.ControllerService/GetVmHistory",
    ]);
    assert!(!success, "{out}");
    assert!(
        err.contains("InvalidArgument")
            || err.contains("INVALID_ARGUMENT")
            || err.contains("Invalid"),
        "{err}"
    );
    assert!(err.contains("start_ms"), "{err}");
}
