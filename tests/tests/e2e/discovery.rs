//! Agent discovery through DNS, and VMs moving between hosts. The
//! controller runs in a mount namespace of its own whose /etc/hosts is a
//! file of the test's, so the system resolver (getaddrinfo, as in a
//! cluster) answers the agents' name with two loopback addresses; the test
//! then changes the answer and the controller follows it.

use std::process::Command;
use std::time::Duration;

use wset_guest::script::{Script, Touch};
use wset_proto::v1 as pb;
use wset_tests::harness::{Agent, AgentOpts, Controller, Guest, GuestKind, TempDir, bin, wait_for};

const NAME: &str = "agents.wset.test";

fn agent(host: &str, addr: &str) -> Agent {
    Agent::start(AgentOpts {
        extra: vec!["--host-name".into(), host.into()],
        grpc_addr: Some(addr.into()),
        ..Default::default()
    })
}

fn guest(a: &Agent) -> Guest {
    Guest::builder("mover", Script::steady(vec![Touch::read(16, 40)], 60_000))
        .kind(GuestKind::Process)
        .start(a)
}

fn endpoints(c: &Controller) -> Vec<(String, String, i32)> {
    let mut v: Vec<_> = c
        .agents()
        .into_iter()
        .map(|a| (a.endpoint, a.host_id, a.state))
        .collect();
    v.sort();
    v
}

#[test]
fn dns_discovery_follows_the_answer_and_vms_move() {
    assert!(
        Command::new("unshare").arg("--version").output().is_ok(),
        "unshare (util-linux) is needed to give the controller its own /etc/hosts"
    );
    // One port on two loopback addresses, as a headless Service gives.
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.2:0").expect("bind 127.0.0.2");
        l.local_addr().unwrap().port()
    };
    let (e2, e3) = (format!("127.0.0.2:{port}"), format!("127.0.0.3:{port}"));
    let a2 = agent("host-2", &e2);
    let a3 = agent("host-3", &e3);
    let dir = TempDir::new("discovery");
    let hosts = dir.0.join("hosts");
    std::fs::write(&hosts, format!("127.0.0.2 {NAME}\n127.0.0.3 {NAME}\n")).unwrap();

    let mut cmd = Command::new("unshare");
    cmd.args(["--mount", "--propagation", "private", "--", "sh", "-c"])
        .arg(r#"mount --bind "$0" /etc/hosts && exec "$@""#)
        .arg(&hosts)
        .arg(bin("wset-controller"))
        .args(Controller::args(
            &dir.0.join("data"),
            &[],
            &[
                "--agents-dns",
                &format!("{NAME}:{port}"),
                "--dns-refresh",
                "1s",
            ],
        ));
    let ctl = Controller::spawn(cmd);
    let connected = pb::AgentConnectionState::Connected as i32;
    let both = vec![
        (e2.clone(), "host-2".to_owned(), connected),
        (e3.clone(), "host-3".to_owned(), connected),
    ];
    wait_for(
        Duration::from_secs(20),
        "both agents found through DNS",
        || (endpoints(&ctl) == both).then_some(()),
    );
    assert!(
        ctl.agents()
            .iter()
            .all(|a| a.source == format!("dns:{NAME}:{port}"))
    );

    // A VM moves from host-2 to host-3 (its VMM ends on one, registers on
    // the other with the same id).
    let mut g2 = guest(&a2);
    wait_for(Duration::from_secs(20), "the VM on host-2", || {
        ctl.vms()
            .iter()
            .any(|v| v.vm_id == "mover" && v.host_id == "host-2")
            .then_some(())
    });
    g2.kill();
    std::thread::sleep(Duration::from_millis(800));
    let _g3 = guest(&a3);
    let moved = wait_for(Duration::from_secs(20), "the VM on host-3", || {
        ctl.vms()
            .into_iter()
            .find(|v| v.vm_id == "mover" && v.host_id == "host-3")
    });
    assert_eq!(
        (moved.previous_host_id.as_str(), moved.moves),
        ("host-2", 1),
        "{moved:#?}"
    );
    // It stays there although host-2 still lists it, retired.
    std::thread::sleep(Duration::from_secs(2));
    let v = ctl.vms().into_iter().find(|v| v.vm_id == "mover").unwrap();
    assert_eq!((v.host_id.as_str(), v.moves), ("host-3", 1), "{v:#?}");
    let h3 = ctl
        .host_history(pb::GetHostHistoryRequest {
            host_id: "host-3".into(),
            ..Default::default()
        })
        .expect("host-3 history");
    assert!(
        h3.events
            .iter()
            .any(|e| e.kind == pb::HostEventKind::VmArrived as i32 && e.detail.contains("host-2")),
        "{:#?}",
        h3.events
    );

    // host-3 leaves the DNS answer: the controller lets it go.
    std::fs::write(&hosts, format!("127.0.0.2 {NAME}\n")).unwrap();
    wait_for(Duration::from_secs(20), "host-3 dropped", || {
        (endpoints(&ctl) == both[..1]).then_some(())
    });
    // And comes back.
    std::fs::write(&hosts, format!("127.0.0.2 {NAME}\n127.0.0.3 {NAME}\n")).unwrap();
    wait_for(Duration::from_secs(20), "host-3 back", || {
        (endpoints(&ctl) == both).then_some(())
    });
    drop(a3);
}
