//! Runs the real `wset-agent`, `wset-controller` and `wset-guest` binaries
//! for the end-to-end tests and talks to them over gRPC on loopback: the
//! agent (`agent`), the controller (`controller`), test guests and their
//! builder (`guest`), a small disk of its own for a store (`disk`), the
//! real Firecracker and its own handlers (`firecracker`), a real etcd
//! cluster (`etcd`), and fixtures
//! shared by the tests of one binary (`shared`); here, what they all use.

mod agent;
mod controller;
mod disk;
mod etcd;
pub mod firecracker;
mod guest;
mod shared;

pub use agent::{Agent, AgentOpts, fc_write_tracking};
pub use controller::Controller;
pub use disk::SmallDisk;
pub use etcd::Etcd;
pub use guest::{Backing, Guest, GuestBuilder, GuestKind, Handshake};
pub use shared::Shared;

use shared::command;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::channel;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use wset_proto::v1 as pb;

/// Where the wset binaries are: `WSET_BIN_DIR`, else the target directory
/// this test binary was built into.
pub fn bin(name: &str) -> PathBuf {
    let dir = match std::env::var_os("WSET_BIN_DIR") {
        Some(d) => PathBuf::from(d),
        None => {
            let exe = std::env::current_exe().expect("current_exe");
            // target/<profile>/deps/<test> -> target/<profile>
            exe.parent()
                .and_then(Path::parent)
                .expect("target dir")
                .to_owned()
        }
    };
    let p = dir.join(name);
    assert!(
        p.exists(),
        "{} not found: build it first (cargo build --workspace --bins, or scripts/test.sh), or set WSET_BIN_DIR",
        p.display()
    );
    p
}

/// Fail with a clear message when a device the test needs is missing.
pub fn require(dev: &str, why: &str) {
    let ok = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(dev)
        .is_ok();
    assert!(
        ok,
        "{dev} is not usable (run as root on a machine with it): {why}"
    );
}

/// A scratch directory removed on drop.
#[derive(Debug)]
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> Self {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let p = std::env::temp_dir().join(format!("wset-{tag}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).expect("create temp dir");
        // Reachable by other uids whatever the umask (the allow-list test
        // connects as uid 65534).
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755))
            .expect("chmod temp dir");
        shared::remove_at_exit(&p);
        Self(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Start a wset server binary with its log captured, and wait for its
/// "gRPC serving addr=..." line. Returns the child, its log and the address.
pub fn spawn_server(
    mut cmd: Command,
    tag: &'static str,
) -> (Child, Arc<Mutex<Vec<String>>>, String) {
    let mut child = cmd
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
    shared::note(&child);
    let log = Arc::new(Mutex::new(Vec::new()));
    let (tx, rx) = channel();
    let stderr = child.stderr.take().expect("stderr");
    let l2 = log.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if std::env::var_os("WSET_TEST_VERBOSE").is_some() {
                eprintln!("{tag}| {line}");
            }
            if let Some(i) = line.find("gRPC serving")
                && let Some(a) = line[i..].split("addr=").nth(1)
            {
                let _ = tx.send(a.split_whitespace().next().unwrap_or("").to_owned());
            }
            l2.lock().unwrap().push(line);
        }
    });
    match rx.recv_timeout(Duration::from_secs(20)) {
        Ok(a) => (child, log, a),
        Err(_) => {
            let _ = child.kill();
            panic!(
                "the {tag} did not start serving within 20 s; its log:\n{}",
                log.lock().unwrap().join("\n")
            );
        }
    }
}

/// A runtime for a server's gRPC client: multi-thread, so the client's
/// connection stays driven between the test's blocking calls.
fn client_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime")
}

/// The metrics address a server logged at start (`... metrics at
/// http://ADDR/metrics`).
fn logged_metrics_addr(log: &Mutex<Vec<String>>, tag: &str) -> String {
    let log = log.lock().unwrap();
    log.iter()
        .find_map(|l| {
            let i = l.find("metrics at http://")?;
            let rest = &l[i + "metrics at http://".len()..];
            Some(rest.split('/').next()?.to_owned())
        })
        .unwrap_or_else(|| {
            panic!(
                "the {tag} logged no metrics address; its log:\n{}",
                log.join("\n")
            )
        })
}

/// The window of a summary with this length.
pub fn window(s: &pb::VmSummary, window_ms: u64) -> &pb::WindowWorkingSet {
    s.windows
        .iter()
        .find(|w| w.window_ms == window_ms)
        .unwrap_or_else(|| panic!("no {window_ms} ms window in {s:#?}"))
}

/// The tracking methods a summary names.
pub fn methods(s: &pb::VmSummary) -> Vec<pb::TrackingMethod> {
    s.methods
        .iter()
        .map(|&m| pb::TrackingMethod::try_from(m).expect("known method"))
        .collect()
}

/// |measured - truth| / truth.
pub fn rel_err(measured: u64, truth: u64) -> f64 {
    (measured as f64 - truth as f64).abs() / (truth as f64).max(1.0)
}

/// Make sure `n` 2 MiB huge pages are there for the caller, on top of what
/// every earlier caller in this test binary asked for: tests run at once,
/// and a guest whose hugetlbfs page cannot be had mid-run stops, so each
/// request adds to the pool instead of counting pages another test is
/// about to take (root). Fails with what to do when the kernel cannot
/// provide them.
pub fn ensure_hugepages(n: u64) {
    static ASKED: Mutex<Option<(u64, u64)>> = Mutex::new(None);
    let read = |f: &str| -> u64 {
        std::fs::read_to_string(f)
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0)
    };
    let free = || -> u64 {
        std::fs::read_to_string("/proc/meminfo")
            .unwrap_or_default()
            .lines()
            .find_map(|l| l.strip_prefix("HugePages_Free:"))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0)
    };
    let mut asked = ASKED.lock().unwrap_or_else(|e| e.into_inner());
    // The pool as this binary found it (what it had free), and what its
    // tests asked for since.
    let (base, total) = asked.get_or_insert_with(|| {
        let nr = read("/proc/sys/vm/nr_hugepages");
        (nr.saturating_sub(free()), 0)
    });
    *total += n;
    let want = *base + *total;
    let nr = read("/proc/sys/vm/nr_hugepages");
    let wrote = if nr < want {
        std::fs::write("/proc/sys/vm/nr_hugepages", want.to_string())
    } else {
        Ok(())
    };
    let have = read("/proc/sys/vm/nr_hugepages");
    assert!(
        wrote.is_ok() && have >= want,
        "need {want} 2 MiB huge pages for this binary's hugetlbfs tests, the kernel gave {have}: \
         run as root, or reserve them with 'echo {want} > /proc/sys/vm/nr_hugepages' ({wrote:?})"
    );
}

/// `GET path` over HTTP/1.0: the status code and the body.
pub fn http_get(addr: &str, path: &str) -> (u16, String) {
    let mut s =
        std::net::TcpStream::connect(addr).unwrap_or_else(|e| panic!("connect to {addr}: {e}"));
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    use std::io::{Read, Write};
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw)
        .unwrap_or_else(|e| panic!("read {addr}{path}: {e}"));
    let (head, body) = raw.split_once("\r\n\r\n").unwrap_or((&raw, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no HTTP status from {addr}{path}: {head:?}"));
    (status, body.to_owned())
}

/// The overall status (`grpc.health.v1`, service `""`) a server's metrics
/// port answers, in plaintext as the kubelet's probes ask.
pub fn grpc_health(addr: &str) -> Result<i32, tonic::Status> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let ch = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .map_err(|e| tonic::Status::invalid_argument(e.to_string()))?
            .connect()
            .await
            .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
        let mut h = tonic_health::pb::health_client::HealthClient::new(ch);
        Ok(h.check(tonic_health::pb::HealthCheckRequest::default())
            .await?
            .into_inner()
            .status)
    })
}

/// The value of a sample without labels (`name value`) in a Prometheus
/// exposition.
pub fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

/// Poll `f` until it returns `Some`, or fail saying what was awaited.
pub fn wait_for<T>(timeout: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let end = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < end, "{what}: not within {timeout:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A loopback address with a port free right now (for servers that must
/// come back on the same address after a restart).
pub fn free_loopback_addr() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a free port");
    l.local_addr().expect("local addr").to_string()
}
