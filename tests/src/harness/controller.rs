//! A running `wset-controller`, its test flags, and calls to its service.

use std::path::Path;
use std::process::{Child, Command};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use wset_proto::v1 as pb;
use wset_proto::v1::controller_service_client::ControllerServiceClient;

use super::{bin, client_runtime, logged_metrics_addr, spawn_server};

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
        let rt = client_runtime();
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

    /// Where the controller serves the kube-scheduler extender
    /// (`host:port`; started with `--extender-addr`).
    pub fn extender_addr(&self) -> String {
        // Logged once the gRPC server serves, a moment after `start` returns.
        super::wait_for(
            Duration::from_secs(20),
            "the controller's extender address",
            || {
                self.log().iter().find_map(|l| {
                    let rest = &l[l.find("extender serving at http")?..];
                    let url = &rest[rest.find("://")? + 3..];
                    Some(url.split('/').next()?.to_owned())
                })
            },
        )
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

    /// A channel to the controller, for the services `call` does not cover.
    async fn channel(&self) -> Result<tonic::transport::Channel, tonic::Status> {
        tonic::transport::Endpoint::from_shared(format!("http://{}", self.grpc_addr))
            .expect("endpoint")
            .connect_timeout(Duration::from_secs(2))
            .timeout(Duration::from_secs(10))
            .connect()
            .await
            .map_err(|e| tonic::Status::unavailable(format!("connect: {e}")))
    }

    /// `ReplicaService.GetReplica`: its role, the leader, the terms it led.
    pub fn replica(&self) -> Result<pb::GetReplicaResponse, tonic::Status> {
        self.rt.block_on(async {
            let mut c =
                pb::replica_service_client::ReplicaServiceClient::new(self.channel().await?);
            Ok(c.get_replica(pb::GetReplicaRequest {}).await?.into_inner())
        })
    }

    /// `SchedulerService.ListMigrations` (no replan).
    pub fn migrations(&self) -> Result<pb::ListMigrationsResponse, tonic::Status> {
        self.rt.block_on(async {
            let mut c =
                pb::scheduler_service_client::SchedulerServiceClient::new(self.channel().await?);
            Ok(c.list_migrations(pb::ListMigrationsRequest::default())
                .await?
                .into_inner())
        })
    }

    /// The `grpc.health.v1` status of `service` on the gRPC port.
    pub fn health(&self, service: &str) -> Result<i32, tonic::Status> {
        self.rt.block_on(async {
            let mut h = tonic_health::pb::health_client::HealthClient::new(self.channel().await?);
            Ok(h.check(tonic_health::pb::HealthCheckRequest {
                service: service.into(),
            })
            .await?
            .into_inner()
            .status)
        })
    }

    pub fn agents(&self) -> Vec<pb::AgentStatus> {
        self.call(async |mut c| c.list_agents(pb::ListAgentsRequest {}).await)
            .expect("ListAgents")
            .agents
    }

    pub fn vms(&self) -> Vec<pb::ClusterVm> {
        self.call(async |mut c| {
            c.list_cluster_vms(pb::ListClusterVmsRequest::default())
                .await
        })
        .expect("ListClusterVms")
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
