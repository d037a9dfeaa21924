//! Who may reach wset: mutual TLS and per-method authorization on both
//! gRPC servers (certificates made by rcgen, reloaded when rotated), the
//! controller dialling agents over mutual TLS, plaintext refused off
//! loopback, the agent socket's cgroup allow-list, and a flood of
//! registrations refused at the door while registered VMs carry on.

use std::io::Write as _;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, SanType};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use wset_guest::script::{Script, Touch};
use wset_proto::v1 as pb;
use wset_tests::harness::{Agent, AgentOpts, Controller, Guest, GuestKind, TempDir, bin, wait_for};

/// A certificate authority of the test.
struct Ca {
    cert: rcgen::Certificate,
    key: KeyPair,
}

impl Ca {
    fn new(name: &str) -> Self {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.distinguished_name.push(DnType::CommonName, name);
        let cert = p.self_signed(&key).unwrap();
        Self { cert, key }
    }

    /// A leaf certificate with these SANs (DNS names, `ip:` addresses,
    /// `uri:` URIs) and common name; `(cert PEM, key PEM)`.
    fn issue(&self, cn: &str, sans: &[&str]) -> (String, String) {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.distinguished_name.push(DnType::CommonName, cn);
        for s in sans {
            p.subject_alt_names
                .push(if let Some(ip) = s.strip_prefix("ip:") {
                    SanType::IpAddress(ip.parse().unwrap())
                } else if let Some(uri) = s.strip_prefix("uri:") {
                    SanType::URI(uri.try_into().unwrap())
                } else {
                    SanType::DnsName((*s).try_into().unwrap())
                });
        }
        let cert = p.signed_by(&key, &self.cert, &self.key).unwrap();
        (cert.pem(), key.serialize_pem())
    }

    fn pem(&self) -> String {
        self.cert.pem()
    }
}

/// Write `text` to `dir/name` atomically (as a Secret update would).
fn put(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    let tmp = dir.join(format!(".{name}.tmp"));
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, &p).unwrap();
    p
}

fn s(p: &Path) -> String {
    p.display().to_string()
}

/// A client TLS configuration: trust `ca`, present `id` if any.
fn client_tls(ca: &str, id: Option<&(String, String)>, server_name: &str) -> ClientTlsConfig {
    let mut c = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca))
        .domain_name(server_name);
    if let Some((cert, key)) = id {
        c = c.identity(Identity::from_pem(cert, key));
    }
    c
}

/// Connect over TLS; the error text when the connection is refused.
fn connect(
    rt: &tokio::runtime::Runtime,
    addr: &str,
    tls: ClientTlsConfig,
) -> Result<Channel, String> {
    rt.block_on(async {
        let ep = Endpoint::from_shared(format!("https://{addr}"))
            .unwrap()
            .connect_timeout(Duration::from_secs(5))
            .tls_config(tls)
            .map_err(|e| format!("{e:?}"))?;
        let ch = ep.connect().await.map_err(|e| format!("{e:?}"))?;
        // The handshake completes on connect; a refused client certificate
        // may only show on the first call.
        let mut h = tonic_health::pb::health_client::HealthClient::new(ch.clone());
        h.check(tonic_health::pb::HealthCheckRequest::default())
            .await
            .map_err(|e| format!("{e:?}"))?;
        Ok(ch)
    })
}

fn list_vms(
    rt: &tokio::runtime::Runtime,
    ch: &Channel,
) -> Result<pb::ListVmsResponse, tonic::Status> {
    rt.block_on(async {
        pb::agent_service_client::AgentServiceClient::new(ch.clone())
            .list_vms(pb::ListVmsRequest::default())
            .await
            .map(tonic::Response::into_inner)
    })
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap()
}

#[test]
fn mutual_tls_and_authorization_on_both_servers() {
    let rt = runtime();
    let pki = TempDir::new("pki");
    let d = &pki.0;
    let ca = Ca::new("wset test CA");
    let rogue = Ca::new("somebody else's CA");
    let ca_file = put(d, "ca.pem", &ca.pem());
    let (agent_cert, agent_key) = ca.issue("wset-agent", &["wset-agent", "ip:127.0.0.1"]);
    let (ctl_cert, ctl_key) = ca.issue("wset-controller", &["wset-controller", "ip:127.0.0.1"]);
    let controller_id = ca.issue("controller", &["uri:spiffe://wset/controller"]);
    let scheduler_id = ca.issue("scheduler", &["uri:spiffe://wset/scheduler"]);
    let ops_id = ca.issue("ops", &[]);
    let rogue_id = rogue.issue("controller", &["uri:spiffe://wset/controller"]);
    let agent_cert_f = put(d, "agent.pem", &agent_cert);
    let agent_key_f = put(d, "agent.key", &agent_key);
    let client_ca_f = put(d, "client-ca.pem", &ca.pem());

    let agent = Agent::start(AgentOpts {
        extra: [
            "--host-name",
            "secure-1",
            "--tls-cert",
            &s(&agent_cert_f),
            "--tls-key",
            &s(&agent_key_f),
            "--tls-client-ca",
            &s(&client_ca_f),
            "--tls-reload",
            "1s",
            "--authz",
            "spiffe://wset/controller=/wset.v1.AgentService/*",
            "--authz",
            "ops=*",
        ]
        .map(String::from)
        .to_vec(),
        ..Default::default()
    });
    agent.wait_log("mutual TLS with authorization", Duration::from_secs(5));
    let script = Script::steady(vec![Touch::read(0, 16)], 120_000);
    let _g = Guest::builder("secure-vm", script)
        .kind(GuestKind::Process)
        .start(&agent);
    let a = agent.grpc_addr.clone();
    let ca_pem = ca.pem();

    // Refused at the handshake: no certificate, another CA's, plaintext.
    // The client only sees a broken connection; the agent says why.
    connect(&rt, &a, client_tls(&ca_pem, None, "wset-agent")).unwrap_err();
    agent.wait_log("peer sent no certificates", Duration::from_secs(5));
    connect(&rt, &a, client_tls(&ca_pem, Some(&rogue_id), "wset-agent")).unwrap_err();
    let plain = rt.block_on(async {
        let ch = Endpoint::from_shared(format!("http://{a}"))
            .unwrap()
            .connect()
            .await?;
        Ok::<_, tonic::transport::Error>(ch)
    });
    if let Ok(ch) = plain {
        assert!(list_vms(&rt, &ch).is_err(), "a plaintext call went through");
    }
    agent.wait_log("TLS handshake failed", Duration::from_secs(5));

    // Authenticated but not authorized: PERMISSION_DENIED, logged; health
    // stays open to it.
    let sched = connect(
        &rt,
        &a,
        client_tls(&ca_pem, Some(&scheduler_id), "wset-agent"),
    )
    .expect("the scheduler's certificate is valid");
    let denied = list_vms(&rt, &sched).unwrap_err();
    assert_eq!(denied.code(), tonic::Code::PermissionDenied, "{denied:?}");
    assert!(
        denied.message().starts_with(
            "spiffe://wset/scheduler, scheduler may not call /wset.v1.AgentService/ListVms"
        ),
        "{denied:?}"
    );
    agent.wait_log("not authorized", Duration::from_secs(5));

    // Authorized by URI SAN and by common name.
    for id in [&controller_id, &ops_id] {
        let ch = connect(&rt, &a, client_tls(&ca_pem, Some(id), "wset-agent")).unwrap();
        let vms = list_vms(&rt, &ch).expect("an authorized client lists VMs");
        assert!(vms.vms.iter().any(|v| v.vm_id == "secure-vm"), "{vms:?}");
    }

    // The controller dials the agent over mutual TLS and serves mutual TLS
    // with its own rules.
    let ctl_id_cert = put(d, "controller-client.pem", &controller_id.0);
    let ctl_id_key = put(d, "controller-client.key", &controller_id.1);
    let data = TempDir::new("secure-ctl");
    let mut cmd = Command::new(bin("wset-controller"));
    cmd.args(Controller::args(
        &data.0,
        &[&a],
        &[
            "--agent-tls-ca",
            &s(&ca_file),
            "--agent-tls-cert",
            &s(&ctl_id_cert),
            "--agent-tls-key",
            &s(&ctl_id_key),
            "--agent-tls-server-name",
            "wset-agent",
            "--tls-cert",
            &s(&put(d, "ctl.pem", &ctl_cert)),
            "--tls-key",
            &s(&put(d, "ctl.key", &ctl_key)),
            "--tls-client-ca",
            &s(&ca_file),
            "--authz",
            "spiffe://wset/scheduler=/wset.v1.SchedulerService/*",
            "--authz",
            "spiffe://wset/kube-scheduler=/wset.v1.Extender/*",
            "--authz",
            "ops=*",
            "--extender-addr",
            "127.0.0.1:0",
        ],
    ));
    let ctl = Controller::spawn(cmd);
    let c = ctl.grpc_addr.clone();
    let ops = connect(
        &rt,
        &c,
        client_tls(&ca_pem, Some(&ops_id), "wset-controller"),
    )
    .unwrap();
    wait_for(
        Duration::from_secs(30),
        "the controller's TLS stream from the agent",
        || {
            let agents = rt
                .block_on(
                    pb::controller_service_client::ControllerServiceClient::new(ops.clone())
                        .list_agents(pb::ListAgentsRequest {}),
                )
                .ok()?
                .into_inner()
                .agents;
            agents
                .iter()
                .find(|x| x.host_id == "secure-1" && x.batches_received > 0)
                .cloned()
        },
    );
    let sched = connect(
        &rt,
        &c,
        client_tls(&ca_pem, Some(&scheduler_id), "wset-controller"),
    )
    .unwrap();
    rt.block_on(
        pb::scheduler_service_client::SchedulerServiceClient::new(sched.clone())
            .get_overcommit(pb::GetOvercommitRequest::default()),
    )
    .expect("the scheduler may call SchedulerService");
    let denied = rt
        .block_on(
            pb::controller_service_client::ControllerServiceClient::new(sched)
                .list_cluster_vms(pb::ListClusterVmsRequest::default()),
        )
        .unwrap_err();
    assert_eq!(denied.code(), tonic::Code::PermissionDenied, "{denied:?}");

    // The extender: HTTPS with the same certificates and rules, its routes
    // named as methods of wset.v1.Extender.
    let ext = ctl.extender_addr();
    let kube_scheduler_id = ca.issue("kube-scheduler", &["uri:spiffe://wset/kube-scheduler"]);
    let body = r#"{"Pod":{"metadata":{"name":"p"}},"NodeNames":["secure-1"]}"#;
    let (status, text) = https_post(&ext, &ca_pem, Some(&kube_scheduler_id), "/filter", body)
        .expect("kube-scheduler's certificate is valid");
    assert_eq!(status, 200, "{text}");
    assert!(text.contains("\"NodeNames\":[\"secure-1\"]"), "{text}");
    let (status, text) = https_post(&ext, &ca_pem, Some(&scheduler_id), "/filter", body)
        .expect("the scheduler's certificate is valid");
    assert_eq!(status, 403, "{text}");
    assert!(
        text.starts_with(
            "spiffe://wset/scheduler, scheduler may not call /wset.v1.Extender/filter"
        ),
        "{text}"
    );
    https_post(&ext, &ca_pem, None, "/filter", body).expect_err("no client certificate");
    https_post(&ext, &ca_pem, Some(&rogue_id), "/filter", body)
        .expect_err("another CA's certificate");
    let mut plain = std::net::TcpStream::connect(&ext).unwrap();
    plain
        .write_all(b"POST /filter HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}")
        .unwrap();
    plain
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let mut answer = Vec::new();
    let _ = std::io::Read::read_to_end(&mut plain, &mut answer);
    assert!(
        !answer.starts_with(b"HTTP/"),
        "a plaintext request was answered: {answer:?}"
    );

    // Rotation: a new CA signs the agent's certificate and its clients';
    // within the reload period the agent serves the new certificate and
    // accepts only the new CA's clients, without a restart.
    let ca2 = Ca::new("wset test CA 2");
    let ops2 = ca2.issue("ops", &[]);
    let ca2_pem = ca2.pem();
    connect(&rt, &a, client_tls(&ca2_pem, Some(&ops2), "wset-agent"))
        .expect_err("the new CA is not trusted yet");
    let (cert2, key2) = ca2.issue("wset-agent", &["wset-agent", "ip:127.0.0.1"]);
    put(d, "agent.key", &key2);
    put(d, "agent.pem", &cert2);
    put(d, "client-ca.pem", &ca2_pem);
    agent.wait_log("TLS certificates reloaded", Duration::from_secs(10));
    let ch = wait_for(
        Duration::from_secs(10),
        "the rotated certificates in force",
        || connect(&rt, &a, client_tls(&ca2_pem, Some(&ops2), "wset-agent")).ok(),
    );
    assert!(list_vms(&rt, &ch).is_ok());
    connect(&rt, &a, client_tls(&ca_pem, Some(&ops_id), "wset-agent"))
        .expect_err("the old CA's clients are refused after the rotation");
}

/// One HTTPS POST with rustls, trusting `ca` (server name
/// `wset-controller`) and presenting `id` if any: the status and body, or
/// the error that ended the exchange.
fn https_post(
    addr: &str,
    ca: &str,
    id: Option<&(String, String)>,
    path: &str,
    body: &str,
) -> Result<(u16, String), String> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(ca.as_bytes()) {
        roots.add(c.unwrap()).unwrap();
    }
    let b = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
    let cfg = match id {
        Some((cert, key)) => b
            .with_client_auth_cert(
                CertificateDer::pem_slice_iter(cert.as_bytes())
                    .map(Result::unwrap)
                    .collect(),
                PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap(),
            )
            .unwrap(),
        None => b.with_no_client_auth(),
    };
    // HTTP/1.1 only, as curl --http1.1 or Python's clients offer.
    let mut cfg = cfg;
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    let name = ServerName::try_from("wset-controller").unwrap();
    let mut conn = rustls::ClientConnection::new(std::sync::Arc::new(cfg), name).unwrap();
    let mut tcp = std::net::TcpStream::connect(addr).map_err(|e| e.to_string())?;
    tcp.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut tls = rustls::Stream::new(&mut conn, &mut tcp);
    let req = format!(
        "POST {path} HTTP/1.1\r\nHost: wset-controller\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    tls.write_all(req.as_bytes()).map_err(|e| e.to_string())?;
    let mut raw = Vec::new();
    match std::io::Read::read_to_end(&mut tls, &mut raw) {
        Ok(_) => {}
        // The server closed without close_notify after a complete answer.
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof && !raw.is_empty() => {}
        Err(e) => return Err(e.to_string()),
    }
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, rest) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("not HTTP: {text:?}"))?;
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("no status: {head:?}"))?;
    Ok((status, rest.to_owned()))
}

/// Run a binary that should refuse to start; its stderr.
fn refuses_to_start(mut cmd: Command) -> String {
    let out = cmd
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .output()
        .expect("run");
    assert!(!out.status.success(), "{cmd:?} started");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn plaintext_off_loopback_is_refused_unless_asked_for() {
    let dir = TempDir::new("plaintext");
    let agent_cmd = |extra: &[&str]| {
        let mut c = Command::new(bin("wset-agent"));
        c.arg("--socket")
            .arg(dir.0.join("a.sock"))
            .arg("--state-dir")
            .arg(dir.0.join("state"))
            .args(["--grpc-addr", "0.0.0.0:0", "--metrics-addr", "off"])
            .args(extra);
        c
    };
    let err = refuses_to_start(agent_cmd(&[]));
    assert!(
        err.contains("refusing plaintext on 0.0.0.0:0") && err.contains("--insecure-plaintext"),
        "{err}"
    );
    let mut ctl = Command::new(bin("wset-controller"));
    ctl.args(Controller::args(
        &dir.0.join("data"),
        &[],
        &["--authz", "ops=*"],
    ));
    let err = refuses_to_start(ctl);
    assert!(
        err.contains("--authz rules match client certificates"),
        "{err}"
    );
    // Asked for explicitly, it serves.
    let (mut child, _, _) =
        wset_tests::harness::spawn_server(agent_cmd(&["--insecure-plaintext"]), "agent");
    let _ = child.kill();
    let _ = child.wait();
}

/// A cgroup v2 directory of the test (removed on drop, once empty).
struct Cgroup(PathBuf);

impl Cgroup {
    fn new(name: &str) -> Self {
        let root = ["/sys/fs/cgroup/unified", "/sys/fs/cgroup"]
            .iter()
            .map(Path::new)
            .find(|r| r.join("cgroup.procs").exists())
            .expect("no cgroup v2 hierarchy at /sys/fs/cgroup or /sys/fs/cgroup/unified");
        let p = root.join(format!("{name}-{}", std::process::id()));
        std::fs::create_dir_all(&p)
            .unwrap_or_else(|e| panic!("create cgroup {} (run as root): {e}", p.display()));
        Self(p)
    }

    /// The path as /proc/<pid>/cgroup shows it.
    fn path(&self) -> String {
        format!("/{}", self.0.file_name().unwrap().to_string_lossy())
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        for _ in 0..50 {
            if std::fs::remove_dir(&self.0).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

#[test]
fn peers_outside_the_cgroup_allow_list_cannot_register() {
    let allowed = Cgroup::new("wset-allowed");
    let other = Cgroup::new("wset-other");
    let agent = Agent::start(AgentOpts {
        extra: vec!["--allow-cgroup".into(), allowed.path()],
        ..Default::default()
    });
    let script = Script::steady(vec![Touch::read(0, 8)], 60_000);
    // Outside: refused with the reason, logged.
    let out = Command::new("sh")
        .arg("-c")
        .arg(r#"echo $$ > "$0/cgroup.procs" && exec "$@""#)
        .arg(&other.0)
        .arg(bin("wset-guest"))
        .arg("--socket")
        .arg(&agent.socket)
        .args([
            "--kind",
            "process",
            "--backing",
            "anon",
            "--vm-id",
            "outsider",
        ])
        .arg("--script")
        .arg(serde_json::to_string(&script).unwrap())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "an outsider registered: {text}");
    assert!(text.contains("none under an allowed cgroup"), "{text}");
    agent.wait_log("none under an allowed cgroup", Duration::from_secs(5));
    // Inside: registered and tracked.
    let g = Guest::builder("insider", script)
        .kind(GuestKind::Process)
        .cgroup(allowed.0.clone())
        .start(&agent);
    agent.wait_summary("insider", Duration::from_secs(10), "a summary", |s| {
        s.windows[0].wss_bytes > 0
    });
    drop(g);
    drop(agent);
}

#[test]
fn a_registration_flood_is_limited_without_hurting_registered_vms() {
    let agent = Agent::start(AgentOpts {
        extra: ["--registration-rate", "5", "--registration-burst", "5"]
            .map(String::from)
            .to_vec(),
        ..Default::default()
    });
    let script = Script::steady(vec![Touch::read(0, 16), Touch::write(32, 8)], 120_000);
    let g = Guest::builder("steady", script.clone())
        .kind(GuestKind::Process)
        .start(&agent);
    let before = agent.summary("steady").unwrap().epoch;

    // 8 threads hammer the socket with garbage handshakes for 3 s, and 32
    // peers connect and say nothing (holding handshake slots).
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let silent: Vec<UnixStream> = (0..32)
        .filter_map(|_| UnixStream::connect(&agent.socket).ok())
        .collect();
    let flooders: Vec<_> = (0..8)
        .map(|_| {
            let (sock, stop) = (agent.socket.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut n = 0u32;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    if let Ok(mut c) = UnixStream::connect(&sock) {
                        let _ = c.write_all(b"{\"garbage\": true}\n");
                        n += 1;
                    }
                }
                n
            })
        })
        .collect();
    std::thread::sleep(Duration::from_secs(3));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let sent: u32 = flooders.into_iter().map(|t| t.join().unwrap()).sum();
    drop(silent);

    // Refused at the door, counted and logged.
    let metrics = {
        let addr = agent.metrics_addr();
        let mut s = std::net::TcpStream::connect(&addr).unwrap();
        write!(s, "GET /metrics HTTP/1.0\r\nHost: {addr}\r\n\r\n").unwrap();
        let mut body = String::new();
        std::io::Read::read_to_string(&mut s, &mut body).unwrap();
        body
    };
    let refused: f64 = metrics
        .lines()
        .find(|l| l.starts_with("wset_agent_registrations_total{result=\"refused_rate\"}"))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .expect("the refused_rate counter");
    eprintln!("flood: {sent} connections in 3 s, {refused} refused at the door");
    assert!(
        sent > 100,
        "the flood was too small to test anything ({sent})"
    );
    assert!(
        refused > f64::from(sent) * 0.5,
        "{refused} of {sent} refused"
    );
    agent.wait_log("registration rate limit", Duration::from_secs(5));

    // The registered VM never noticed: still tracking, epochs advancing.
    let s = agent.wait_summary("steady", Duration::from_secs(10), "epochs advancing", |s| {
        s.epoch >= before + 3
    });
    assert_eq!(s.state, pb::VmState::Tracking as i32);
    assert!(s.windows[0].wss_bytes > 0);
    // And a VMM arriving after the flood registers (the bucket refills).
    std::thread::sleep(Duration::from_secs(1));
    let g2 = Guest::builder("after-flood", script)
        .kind(GuestKind::Process)
        .start(&agent);
    drop(g2);
    drop(g);
}
