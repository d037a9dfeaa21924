//! Simulated agents: real gRPC servers speaking `wset.v1.AgentService`
//! (`WatchSummaries`) whose VMs follow the synthetic traces of
//! `wset_controller::sim`, one trace step per batch. The controller ingests
//! them through its real path (streams, checks, sled, planner), so a
//! cluster of any size can drive it on one machine.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio_stream::Stream;
use tonic::{Request, Response, Status};
use wset_controller::planner::Sample;
use wset_controller::sim::{Rng, Shape, pick_shape, trace};
use wset_proto::v1 as pb;
use wset_proto::v1::agent_service_server::{AgentService, AgentServiceServer};

/// One simulated VM.
#[derive(Debug, Clone)]
pub struct SimVm {
    pub vm_id: String,
    pub memory_bytes: u64,
    pub trace: Vec<Sample>,
}

/// One simulated host and its agent.
#[derive(Debug)]
pub struct SimHost {
    pub host_id: String,
    pub capacity_bytes: u64,
    pub vms: Vec<SimVm>,
    instance: String,
    /// Trace steps served so far (shared by all streams of this agent).
    step: AtomicU64,
    pub batches: AtomicU64,
}

impl SimHost {
    /// A host whose VMs follow the fleet mix, or all grow when `hot`.
    pub fn new(
        seed: u64,
        host_id: &str,
        capacity_bytes: u64,
        vms: usize,
        vm_bytes: u64,
        hot: bool,
        steps: usize,
    ) -> Self {
        let mut rng = Rng::new(seed);
        let vms = (0..vms)
            .map(|i| {
                let shape = if hot {
                    Shape::Growing
                } else {
                    pick_shape(&mut rng)
                };
                SimVm {
                    vm_id: format!("{host_id}-vm{i}"),
                    memory_bytes: vm_bytes,
                    trace: trace(&mut rng, shape, vm_bytes, 0, 1000, steps),
                }
            })
            .collect();
        Self {
            host_id: host_id.into(),
            capacity_bytes,
            vms,
            instance: format!("sim-{seed}"),
            step: AtomicU64::new(0),
            batches: AtomicU64::new(0),
        }
    }

    fn batch(&self) -> pb::WatchSummariesResponse {
        let step = self.step.fetch_add(1, Ordering::Relaxed) as usize;
        let now = wset_controller::now_ms();
        let summaries = self
            .vms
            .iter()
            .map(|v| {
                let s = v.trace[step.min(v.trace.len() - 1)];
                pb::VmSummary {
                    vm_id: v.vm_id.clone(),
                    name: v.vm_id.clone(),
                    timestamp_ms: now,
                    memory_bytes: v.memory_bytes,
                    granule_bytes: 4096,
                    methods: vec![pb::TrackingMethod::RwpAsync as i32],
                    interval_ms: 1000,
                    windows: vec![pb::WindowWorkingSet {
                        window_ms: 10_000,
                        wss_bytes: s.wss_bytes,
                        dirty_bytes: 0,
                        complete: true,
                    }],
                    dirty_rate_bytes_per_s: s.dirty_bytes_per_s,
                    error: Some(pb::ErrorEstimate {
                        relative_error: 0.01,
                        confidence: 0.95,
                        basis: "simulated".into(),
                        wss_is_lower_bound: false,
                    }),
                    state: pb::VmState::Tracking as i32,
                    host_id: self.host_id.clone(),
                    ..Default::default()
                }
            })
            .collect();
        pb::WatchSummariesResponse {
            host: Some(pb::HostFacts {
                host_id: self.host_id.clone(),
                agent_instance_id: self.instance.clone(),
                agent_version: "sim".into(),
                timestamp_ms: now,
                memory_total_bytes: self.capacity_bytes * 2,
                memory_available_bytes: self.capacity_bytes,
                vm_memory_committed_bytes: self.vms.iter().map(|v| v.memory_bytes).sum(),
                vms_tracking: self.vms.len() as u32,
                tracking_interval_ms: 100,
                vm_capacity_bytes: self.capacity_bytes,
                ..Default::default()
            }),
            sequence: step as u64 + 1,
            timestamp_ms: now,
            summaries,
            skipped_batches: 0,
        }
    }
}

#[derive(Debug, Clone)]
struct Server(Arc<SimHost>);

type BatchStream = Pin<Box<dyn Stream<Item = Result<pb::WatchSummariesResponse, Status>> + Send>>;

#[tonic::async_trait]
impl AgentService for Server {
    async fn list_vms(
        &self,
        _: Request<pb::ListVmsRequest>,
    ) -> Result<Response<pb::ListVmsResponse>, Status> {
        Err(Status::unimplemented(
            "a simulated agent serves WatchSummaries only",
        ))
    }
    async fn get_summary(
        &self,
        _: Request<pb::GetSummaryRequest>,
    ) -> Result<Response<pb::GetSummaryResponse>, Status> {
        Err(Status::unimplemented(
            "a simulated agent serves WatchSummaries only",
        ))
    }
    async fn get_host_facts(
        &self,
        _: Request<pb::GetHostFactsRequest>,
    ) -> Result<Response<pb::GetHostFactsResponse>, Status> {
        Err(Status::unimplemented(
            "a simulated agent serves WatchSummaries only",
        ))
    }

    type WatchSummariesStream = BatchStream;

    async fn watch_summaries(
        &self,
        req: Request<pb::WatchSummariesRequest>,
    ) -> Result<Response<BatchStream>, Status> {
        let every = Duration::from_millis(req.into_inner().min_interval_ms.max(100));
        let host = self.0.clone();
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            loop {
                tick.tick().await;
                host.batches.fetch_add(1, Ordering::Relaxed);
                if tx.send(Ok(host.batch())).await.is_err() {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }
}

/// Serve `host` on `addr` (on the current tokio runtime); returns the
/// address bound.
pub async fn serve(host: Arc<SimHost>, addr: &str) -> std::io::Result<String> {
    let l = tokio::net::TcpListener::bind(addr).await?;
    let bound = l.local_addr()?.to_string();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(AgentServiceServer::new(Server(host)))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(l)),
    );
    Ok(bound)
}

/// `hosts` simulated agents of `vms` VMs each (16 GiB VMs following the
/// fleet mix on 256 GiB hosts, named `{prefix}-{i:04}`), each served on
/// its own loopback port on `rt`; returns their addresses.
pub fn serve_fleet(
    rt: &tokio::runtime::Runtime,
    prefix: &str,
    hosts: usize,
    vms: usize,
) -> Vec<String> {
    const GIB: u64 = 1 << 30;
    (0..hosts)
        .map(|h| {
            let host = Arc::new(SimHost::new(
                h as u64 + 1,
                &format!("{prefix}-{h:04}"),
                256 * GIB,
                vms,
                16 * GIB,
                false,
                600,
            ));
            rt.block_on(serve(host, "127.0.0.1:0"))
                .expect("serve a simulated agent")
        })
        .collect()
}
