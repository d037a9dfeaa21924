//! Runs the real `wset-agent` binary and `wset-guest` VMM processes for the
//! end-to-end tests, and talks to the agent over gRPC on loopback.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError, channel};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use wset_proto::v1 as pb;
use wset_proto::v1::agent_service_client::AgentServiceClient;
use wset_proto::v1::controller_service_client::ControllerServiceClient;

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

/// A running agent.
#[derive(Debug)]
pub struct Agent {
    child: Child,
    pub dir: TempDir,
    pub socket: PathBuf,
    pub grpc_addr: String,
    log: Arc<Mutex<Vec<String>>>,
    rt: tokio::runtime::Runtime,
    channel: Mutex<Option<tonic::transport::Channel>>,
}

/// Agent flags beyond the harness's own.
#[derive(Clone, Debug)]
pub struct AgentOpts {
    pub interval_ms: u64,
    pub windows_ms: Vec<u64>,
    /// `off`, `exhaustive` or a sample size.
    pub access: String,
    pub extra: Vec<String>,
    /// Serve Firecracker MISSING faults on the socket from this file.
    pub snapshot: Option<PathBuf>,
    /// State directory (default: inside the agent's own scratch directory).
    pub state_dir: Option<PathBuf>,
    /// gRPC address (default: a free loopback port).
    pub grpc_addr: Option<String>,
    /// Environment variables of the agent process.
    pub env: Vec<(String, String)>,
}

impl Default for AgentOpts {
    fn default() -> Self {
        Self {
            interval_ms: 200,
            windows_ms: vec![1000, 3000],
            access: "exhaustive".into(),
            extra: vec![],
            snapshot: None,
            state_dir: None,
            grpc_addr: None,
            env: vec![],
        }
    }
}

impl Agent {
    pub fn start(opts: AgentOpts) -> Self {
        require(
            "/dev/userfaultfd",
            "the agent tracks guests through userfaultfd",
        );
        let dir = TempDir::new("agent");
        let socket = dir.0.join("agent.sock");
        let sock_arg = match &opts.snapshot {
            Some(s) => format!("{}={}", socket.display(), s.display()),
            None => socket.display().to_string(),
        };
        let windows: Vec<String> = opts.windows_ms.iter().map(|w| format!("{w}ms")).collect();
        let mut cmd = Command::new(bin("wset-agent"));
        cmd.arg("--socket")
            .arg(&sock_arg)
            .arg("--state-dir")
            .arg(
                opts.state_dir
                    .clone()
                    .unwrap_or_else(|| dir.0.join("state")),
            )
            .arg("--grpc-addr")
            .arg(opts.grpc_addr.as_deref().unwrap_or("127.0.0.1:0"))
            .arg("--metrics-addr")
            .arg("127.0.0.1:0")
            .arg("--interval")
            .arg(format!("{}ms", opts.interval_ms))
            .arg("--windows")
            .arg(windows.join(","))
            .arg("--access")
            .arg(&opts.access)
            .args(&opts.extra)
            .envs(opts.env.iter().map(|(k, v)| (k, v)));
        let (child, log, grpc_addr) = spawn_server(cmd, "agent");
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("runtime");
        Self {
            child,
            dir,
            socket,
            grpc_addr,
            log,
            rt,
            channel: Mutex::new(None),
        }
    }

    pub fn log(&self) -> Vec<String> {
        self.log.lock().unwrap().clone()
    }

    /// Where the agent serves Prometheus metrics (`host:port`).
    pub fn metrics_addr(&self) -> String {
        logged_metrics_addr(&self.log, "agent")
    }

    /// Wait until a log line containing `needle` appears.
    pub fn wait_log(&self, needle: &str, timeout: Duration) -> String {
        let end = Instant::now() + timeout;
        loop {
            if let Some(l) = self.log.lock().unwrap().iter().find(|l| l.contains(needle)) {
                return l.clone();
            }
            assert!(
                Instant::now() < end,
                "no agent log line with {needle:?} within {timeout:?}; log:\n{}",
                self.log().join("\n")
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// One channel for the agent's life (a multi-thread runtime keeps its
    /// connection driven between calls).
    fn client(&self) -> AgentServiceClient<tonic::transport::Channel> {
        let mut ch = self.channel.lock().unwrap();
        if ch.is_none() {
            let url = format!("http://{}", self.grpc_addr);
            let endpoint = tonic::transport::Endpoint::from_shared(url).expect("endpoint");
            *ch = Some(
                self.rt
                    .block_on(endpoint.connect())
                    .expect("connect to the agent's gRPC server"),
            );
        }
        AgentServiceClient::new(ch.clone().expect("connected"))
    }

    pub fn list(&self) -> Vec<pb::VmInfo> {
        let mut c = self.client();
        self.rt
            .block_on(c.list_vms(pb::ListVmsRequest {}))
            .expect("ListVms")
            .into_inner()
            .vms
    }

    pub fn summary(&self, vm_id: &str) -> Result<pb::VmSummary, tonic::Status> {
        let mut c = self.client();
        self.rt
            .block_on(c.get_summary(pb::GetSummaryRequest {
                vm_id: vm_id.to_owned(),
            }))
            .map(tonic::Response::into_inner)
    }

    /// Poll until `pred` holds for the VM's summary.
    pub fn wait_summary(
        &self,
        vm_id: &str,
        timeout: Duration,
        what: &str,
        pred: impl Fn(&pb::VmSummary) -> bool,
    ) -> pb::VmSummary {
        let end = Instant::now() + timeout;
        let mut last = None;
        while Instant::now() < end {
            if let Ok(s) = self.summary(vm_id) {
                if pred(&s) {
                    return s;
                }
                last = Some(s);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("{vm_id}: {what} not reached within {timeout:?}; last summary: {last:#?}");
    }

    /// SIGTERM, then wait for exit; returns the exit status.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        self.try_terminate(Duration::from_secs(60))
            .unwrap_or_else(|| {
                panic!(
                    "the agent did not exit within 60 s of SIGTERM; log:\n{}",
                    self.log().join("\n")
                )
            })
    }

    fn try_terminate(&mut self, within: Duration) -> Option<std::process::ExitStatus> {
        *self.channel.lock().unwrap() = None;
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let end = Instant::now() + within;
        while Instant::now() < end {
            if let Ok(Some(st)) = self.child.try_wait() {
                return Some(st);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGKILL: the agent gets no chance to put anything back.
    pub fn kill(&mut self) {
        *self.channel.lock().unwrap() = None;
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        // Never panic here (a test may already be unwinding).
        if self.child.try_wait().ok().flatten().is_none()
            && self.try_terminate(Duration::from_secs(30)).is_none()
        {
            eprintln!(
                "wset-agent {} ignored SIGTERM for 30 s; killing it",
                self.child.id()
            );
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Options of one test VMM.
#[derive(Clone, Debug)]
pub struct GuestOpts {
    pub kind: &'static str,
    pub backing: &'static str,
    pub handshake: &'static str,
    pub mem_mib: u64,
    pub vm_id: String,
    pub script: wset_guest::script::Script,
    pub fill_seed: Option<u32>,
    pub snapshot: Option<PathBuf>,
    pub labels: String,
    /// More wset-guest arguments.
    pub extra: Vec<String>,
    /// Run the VMM in this cgroup directory (it moves itself there before
    /// it starts).
    pub cgroup: Option<PathBuf>,
}

impl GuestOpts {
    pub fn new(vm_id: &str, script: wset_guest::script::Script) -> Self {
        Self {
            kind: "kvm",
            backing: "memfd",
            handshake: "wset",
            mem_mib: 32,
            vm_id: vm_id.into(),
            script,
            fill_seed: None,
            snapshot: None,
            labels: "{}".into(),
            extra: Vec::new(),
            cgroup: None,
        }
    }
}

/// A running test VMM.
#[derive(Debug)]
pub struct Guest {
    child: Child,
    stdin: Option<ChildStdin>,
    events: Receiver<serde_json::Value>,
    pub vm_id: String,
    pub registered: serde_json::Value,
}

impl Guest {
    /// Start a test VMM and wait until it has registered. Firecracker's
    /// handshake has no reply, so for it the wait is for the agent to list
    /// the VM.
    pub fn start(agent: &Agent, o: GuestOpts) -> Self {
        let no_reply = o.handshake == "firecracker";
        let g = Self::start_at(&agent.socket, o);
        if no_reply {
            wait_for(
                Duration::from_secs(30),
                &format!(
                    "the agent to list {} after its Firecracker handshake",
                    g.vm_id
                ),
                || {
                    agent
                        .list()
                        .iter()
                        .any(|v| v.vm_id == g.vm_id)
                        .then_some(())
                },
            );
        }
        g
    }

    /// Start a test VMM against the agent socket `socket` (unused with the
    /// `none` handshake).
    /// Run the guest's VMM against `socket`, without waiting for anything.
    fn spawn_at(socket: &Path, o: GuestOpts) -> Self {
        if o.kind == "kvm" {
            require("/dev/kvm", "KVM guests need /dev/kvm");
        }
        let mut cmd = match &o.cgroup {
            None => Command::new(bin("wset-guest")),
            Some(dir) => {
                let mut c = Command::new("sh");
                c.arg("-c")
                    .arg(r#"echo $$ > "$0/cgroup.procs" && exec "$@""#)
                    .arg(dir)
                    .arg(bin("wset-guest"));
                c
            }
        };
        cmd.arg("--socket")
            .arg(socket)
            .args([
                "--kind",
                o.kind,
                "--backing",
                o.backing,
                "--handshake",
                o.handshake,
            ])
            .args([
                "--mem-mib",
                &o.mem_mib.to_string(),
                "--vm-id",
                &o.vm_id,
                "--labels",
                &o.labels,
            ])
            .arg("--script")
            .arg(serde_json::to_string(&o.script).expect("script json"))
            .arg("--wait-stdin");
        if let Some(s) = o.fill_seed {
            cmd.args(["--fill-seed", &s.to_string()]);
        }
        if let Some(p) = &o.snapshot {
            cmd.arg("--snapshot").arg(p);
        }
        cmd.args(&o.extra);
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn wset-guest");
        let stdout = child.stdout.take().expect("stdout");
        let stdin = child.stdin.take();
        let (tx, rx) = channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line)
                    && tx.send(v).is_err()
                {
                    break;
                }
            }
        });
        Self {
            child,
            stdin,
            events: rx,
            vm_id: o.vm_id.clone(),
            registered: serde_json::Value::Null,
        }
    }

    /// Start a guest that `agent` must refuse; returns the refusal.
    pub fn refused(agent: &Agent, o: GuestOpts) -> String {
        let vm_id = o.vm_id.clone();
        let g = Self::spawn_at(&agent.socket, o);
        let end = Instant::now() + Duration::from_secs(30);
        loop {
            let left = end.saturating_duration_since(Instant::now());
            match g.events.recv_timeout(left) {
                Ok(v) if v["event"] == "error" => {
                    return v["message"].as_str().unwrap_or_default().to_owned();
                }
                Ok(v) if v["event"] == "registered" => {
                    panic!("guest {vm_id} was registered, not refused: {v}")
                }
                Ok(_) => continue,
                Err(e) => panic!("guest {vm_id}: no refusal within 30 s ({e})"),
            }
        }
    }

    pub fn start_at(socket: &Path, o: GuestOpts) -> Self {
        let handshake = o.handshake;
        let mut g = Self::spawn_at(socket, o);
        let reg = g.wait_event("registered", Duration::from_secs(30));
        if handshake == "firecracker" {
            g.vm_id = format!("fc-{}", reg["pid"]);
        }
        g.registered = reg;
        g
    }

    /// Wait for the next event named `name`; fails on an `error` event.
    pub fn wait_event(&mut self, name: &str, timeout: Duration) -> serde_json::Value {
        let end = Instant::now() + timeout;
        loop {
            let left = end.saturating_duration_since(Instant::now());
            match self.events.recv_timeout(left) {
                Ok(v) if v["event"] == name => return v,
                Ok(v) if v["event"] == "error" => {
                    panic!("guest {} failed: {}", self.vm_id, v["message"])
                }
                Ok(_) => continue,
                Err(RecvTimeoutError::Timeout) => {
                    panic!("guest {}: no {name:?} event within {timeout:?}", self.vm_id)
                }
                Err(RecvTimeoutError::Disconnected) => {
                    panic!("guest {} exited before {name:?}", self.vm_id)
                }
            }
        }
    }

    /// Ask the finished guest for a fresh full checksum.
    pub fn verify_now(&mut self) -> serde_json::Value {
        let stdin = self.stdin.as_mut().expect("stdin open");
        stdin.write_all(b"verify\n").expect("write to guest");
        stdin.flush().expect("flush");
        self.wait_event("verify", Duration::from_secs(60))
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Close stdin and wait for a clean exit.
    pub fn finish(mut self) -> std::process::ExitStatus {
        drop(self.stdin.take());
        let end = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(st) = self.child.try_wait().expect("wait guest") {
                return st;
            }
            assert!(Instant::now() < end, "guest {} did not exit", self.vm_id);
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            self.kill();
        }
    }
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

/// Make sure `n` free 2 MiB huge pages exist, reserving more if needed
/// (root). Fails with what to do when the kernel cannot provide them.
pub fn ensure_hugepages(n: u64) {
    let free = || -> u64 {
        std::fs::read_to_string("/proc/meminfo")
            .unwrap_or_default()
            .lines()
            .find_map(|l| l.strip_prefix("HugePages_Free:"))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0)
    };
    let have = free();
    if have >= n {
        return;
    }
    let total: u64 = std::fs::read_to_string("/proc/sys/vm/nr_hugepages")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0);
    let want = total + (n - have);
    let wrote = std::fs::write("/proc/sys/vm/nr_hugepages", want.to_string());
    assert!(
        wrote.is_ok() && free() >= n,
        "need {n} free 2 MiB huge pages for the hugetlbfs test, have {}: run as root, or reserve them with \
         'echo {want} > /proc/sys/vm/nr_hugepages' ({wrote:?})",
        free()
    );
}

/// A running controller (`wset-controller`), with its data directory kept
/// by the caller so a restarted controller can reopen it.
#[derive(Debug)]
pub struct Controller {
    child: Child,
    pub grpc_addr: String,
    log: Arc<Mutex<Vec<String>>>,
    rt: tokio::runtime::Runtime,
}

impl Controller {
    /// Start a controller on `data_dir` subscribed to `agents`, with short
    /// periods for tests; `extra` adds flags.
    pub fn start(data_dir: &Path, agents: &[&str], extra: &[&str]) -> Self {
        let mut cmd = Command::new(bin("wset-controller"));
        cmd.args(Self::args(data_dir, agents, extra));
        Self::spawn(cmd)
    }

    /// The flags `start` gives (for a controller started some other way,
    /// e.g. in a mount namespace of its own).
    pub fn args(data_dir: &Path, agents: &[&str], extra: &[&str]) -> Vec<String> {
        let mut a: Vec<String> = vec![
            "--data-dir".into(),
            data_dir.display().to_string(),
            "--grpc-addr".into(),
            "127.0.0.1:0".into(),
            "--metrics-addr".into(),
            "127.0.0.1:0".into(),
        ];
        if !agents.is_empty() {
            a.extend(["--agents".into(), agents.join(",")]);
        }
        a.extend(
            [
                "--sample-interval",
                "300ms",
                "--flush-interval",
                "100ms",
                "--stall-timeout",
                "3s",
                "--backoff-max",
                "1s",
            ]
            .map(String::from),
        );
        a.extend(extra.iter().map(|s| s.to_string()));
        a
    }

    /// Run `cmd` (a controller) and wait until it serves.
    pub fn spawn(cmd: Command) -> Self {
        let (child, log, grpc_addr) = spawn_server(cmd, "controller");
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("runtime");
        Self {
            child,
            grpc_addr,
            log,
            rt,
        }
    }

    pub fn log(&self) -> Vec<String> {
        self.log.lock().unwrap().clone()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Where the controller serves Prometheus metrics (`host:port`).
    pub fn metrics_addr(&self) -> String {
        logged_metrics_addr(&self.log, "controller")
    }

    /// Run one call against the controller's service.
    pub fn call<T>(
        &self,
        f: impl AsyncFnOnce(
            ControllerServiceClient<tonic::transport::Channel>,
        ) -> Result<tonic::Response<T>, tonic::Status>,
    ) -> Result<T, tonic::Status> {
        let url = format!("http://{}", self.grpc_addr);
        self.rt.block_on(async move {
            let ch = tonic::transport::Endpoint::from_shared(url)
                .expect("endpoint")
                .connect()
                .await
                .map_err(|e| tonic::Status::unavailable(format!("connect: {e}")))?;
            f(ControllerServiceClient::new(ch))
                .await
                .map(tonic::Response::into_inner)
        })
    }

    pub fn agents(&self) -> Vec<pb::AgentStatus> {
        self.call(async |mut c| c.list_agents(pb::ListAgentsRequest {}).await)
            .expect("ListAgents")
            .agents
    }

    pub fn vms(&self) -> Vec<pb::ClusterVm> {
        self.call(async |mut c| c.list_vms(pb::ListClusterVmsRequest::default()).await)
            .expect("ListVms")
            .vms
    }

    pub fn vm_history(
        &self,
        req: pb::GetVmHistoryRequest,
    ) -> Result<pb::GetVmHistoryResponse, tonic::Status> {
        self.call(async move |mut c| c.get_vm_history(req).await)
    }

    pub fn host_history(
        &self,
        req: pb::GetHostHistoryRequest,
    ) -> Result<pb::GetHostHistoryResponse, tonic::Status> {
        self.call(async move |mut c| c.get_host_history(req).await)
    }

    /// SIGKILL: no flush, no goodbye.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM and wait for a clean exit.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let end = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(Some(st)) = self.child.try_wait() {
                return st;
            }
            assert!(
                Instant::now() < end,
                "the controller did not exit within 30 s of SIGTERM; log:\n{}",
                self.log().join("\n")
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Controller {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            self.kill9();
        }
    }
}

/// A tmpfs of `mib` MiB mounted on `dir` in a mount namespace that only a
/// helper process (and what reaches through its `/proc/<pid>/root`) sees.
/// Gone with the helper.
#[derive(Debug)]
pub struct SmallDisk {
    helper: Child,
}

impl SmallDisk {
    pub fn mount(dir: &std::path::Path, mib: u64) -> Self {
        let mut helper = Command::new("unshare")
            .args(["--mount", "--propagation", "private", "--", "sh", "-c"])
            .arg(r#"mount -t tmpfs -o size="$1"m wset-small "$0" && echo mounted && exec sleep 100000"#)
            .arg(dir)
            .arg(mib.to_string())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("unshare (util-linux) is needed to give the store a small disk of its own");
        let mut line = String::new();
        BufReader::new(helper.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        if line.trim() != "mounted" {
            let _ = helper.kill();
            let out = helper.wait_with_output().unwrap();
            panic!(
                "could not mount a {mib} MiB tmpfs in a mount namespace of its own (root is \
                 needed): {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Self { helper }
    }

    /// `path` (absolute) as seen inside the namespace.
    pub fn path(&self, path: &std::path::Path) -> std::path::PathBuf {
        std::path::PathBuf::from(format!("/proc/{}/root{}", self.helper.id(), path.display()))
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = self.helper.kill();
        let _ = self.helper.wait();
    }
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
