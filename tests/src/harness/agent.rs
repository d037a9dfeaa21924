//! A running `wset-agent` and its options; gRPC calls to it on one
//! channel for its life.

use std::path::PathBuf;
use std::process::Child;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use wset_proto::v1 as pb;
use wset_proto::v1::agent_service_client::AgentServiceClient;

use super::{TempDir, bin, client_runtime, command, logged_metrics_addr, require, spawn_server};

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

/// Agent flags that make a Firecracker VM's writes visible on this kernel:
/// none where it keeps soft-dirty bits (the default tracks them), else
/// `--sync-write-protect` (the default tracks none there).
pub fn fc_write_tracking() -> Vec<String> {
    if wset_tracker::sys::soft_dirty_supported() {
        Vec::new()
    } else {
        vec!["--sync-write-protect".into()]
    }
}

impl AgentOpts {
    /// One host of a planner test: named `host`, serving on `addr`,
    /// giving VMs `capacity_bytes`, sampling every 250 ms over 1 s and 3 s
    /// windows, writes only (WP_ASYNC).
    pub fn planner_host(host: &str, addr: &str, capacity_bytes: u64) -> Self {
        Self {
            interval_ms: 250,
            windows_ms: vec![1000, 3000],
            access: "off".into(),
            extra: vec![
                "--host-name".into(),
                host.into(),
                "--vm-capacity-bytes".into(),
                capacity_bytes.to_string(),
            ],
            grpc_addr: Some(addr.into()),
            ..Default::default()
        }
    }
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
            Some(s) => {
                // The agent refuses a snapshot file that is not there; the
                // test VMMs write theirs when they start, over this one.
                if !s.exists() {
                    std::fs::File::create(s).expect("create the snapshot memory file");
                }
                format!("{}={}", socket.display(), s.display())
            }
            None => socket.display().to_string(),
        };
        let windows: Vec<String> = opts.windows_ms.iter().map(|w| format!("{w}ms")).collect();
        let mut cmd = command(bin("wset-agent"));
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
        let rt = client_runtime();
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
            }))?
            .into_inner()
            .summary
            .ok_or_else(|| tonic::Status::internal("GetSummary answered without a summary"))
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
