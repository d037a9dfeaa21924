//! The agent's gRPC service (`wset.v1.AgentService`) and the conversions
//! between the registry's domain types and the wire types. Wire types stop
//! here.

use std::sync::Arc;

use tonic::{Request, Response, Status};
use wset_proto::v1 as pb;
use wset_tracker::summary::Summary;
use wset_tracker::{Method, TrackerState};

use crate::config::Config;
use crate::handshake::check_vm_id;
use crate::host::Identity;
use crate::now_ms;
use crate::registry::{Registry, RegistryError, VmView};
use crate::stream::{Filter, Snapshot};

/// `wset.v1.AgentService` over the registry.
#[derive(Debug, Clone)]
pub struct AgentService {
    pub registry: Arc<Registry>,
    pub cfg: Arc<Config>,
    pub identity: Arc<Identity>,
    /// The publisher's channel; each stream subscribes to it.
    pub batches: Arc<tokio::sync::watch::Sender<Arc<Snapshot>>>,
    /// One permit per open summary stream (`--max-streams`).
    pub streams: Arc<tokio::sync::Semaphore>,
    /// Changes when the agent shuts down: streams end then.
    pub stop: tokio::sync::watch::Receiver<bool>,
}

/// One VM's latest summary on the wire (O(granules): call off the async
/// workers).
pub fn vm_summary(
    registry: &Registry,
    cfg: &Config,
    host_id: &str,
    vm_id: &str,
) -> Result<pb::VmSummary, RegistryError> {
    let (v, s) = registry.summary(vm_id, &cfg.summary, now_ms())?;
    let c = registry.counters(vm_id)?;
    let mut pb = summary_pb(&v, &s, c);
    pb.interval_ms = cfg.interval.as_millis() as u64;
    pb.host_id = host_id.to_owned();
    Ok(pb)
}

impl From<RegistryError> for Status {
    fn from(e: RegistryError) -> Self {
        match e {
            RegistryError::NotFound(_) => Status::not_found(e.to_string()),
            RegistryError::Duplicate(_) => Status::already_exists(e.to_string()),
        }
    }
}

/// The methods of a plan, as wire enums.
pub fn methods(p: &wset_tracker::Plan) -> Vec<pb::TrackingMethod> {
    p.methods()
        .into_iter()
        .map(|m| match m {
            Method::FirstTouch => pb::TrackingMethod::FirstTouch,
            Method::WpAsync => pb::TrackingMethod::WpAsync,
            Method::WpSync => pb::TrackingMethod::WpSync,
            Method::ShmemSampled => pb::TrackingMethod::ShmemSampled,
            Method::ShmemExhaustive => pb::TrackingMethod::ShmemExhaustive,
            Method::RwpAsync => pb::TrackingMethod::RwpAsync,
            Method::RwpSync => pb::TrackingMethod::RwpSync,
            Method::SoftDirty => pb::TrackingMethod::SoftDirty,
        })
        .collect()
}

fn state(s: TrackerState) -> pb::VmState {
    match s {
        TrackerState::Tracking => pb::VmState::Tracking,
        _ => pb::VmState::Retired,
    }
}

fn vm_info(v: &VmView) -> pb::VmInfo {
    pb::VmInfo {
        vm_id: v.info.vm_id.clone(),
        name: v.info.name.clone(),
        labels: v.info.labels.clone().into_iter().collect(),
        memory_bytes: v.info.memory_bytes,
        methods: methods(&v.info.plan)
            .into_iter()
            .map(|m| m as i32)
            .collect(),
        state: state(v.state) as i32,
        retired_reason: v.end_reason.clone().unwrap_or_default(),
        vmm_pid: v.info.vmm_pid,
        page_size_bytes: v.info.page_size,
        granule_bytes: v.info.granule_bytes,
        handshake: v.info.handshake.to_owned(),
        notes: v.info.plan.notes.clone(),
    }
}

/// A summary on the wire.
pub fn summary_pb(v: &VmView, s: &Summary, counters: pb::TrackerCounters) -> pb::VmSummary {
    pb::VmSummary {
        vm_id: v.info.vm_id.clone(),
        name: v.info.name.clone(),
        timestamp_ms: now_ms(),
        memory_bytes: s.memory_bytes,
        granule_bytes: v.info.granule_bytes,
        methods: methods(&v.info.plan)
            .into_iter()
            .map(|m| m as i32)
            .collect(),
        interval_ms: 0,
        tracked_ms: s.tracked_ms,
        windows: s
            .windows
            .iter()
            .map(|w| pb::WindowWorkingSet {
                window_ms: w.window_ms,
                wss_bytes: w.wss_bytes,
                dirty_bytes: w.dirty_bytes,
                complete: w.complete,
            })
            .collect(),
        idle_ages: s
            .idle_ages
            .iter()
            .map(|b| pb::IdleAgeBucket {
                min_age_ms: b.min_age_ms,
                max_age_ms: b.max_age_ms,
                bytes: b.bytes,
            })
            .collect(),
        access_rate_bytes_per_s: s.access_rate_bytes_per_s,
        dirty_rate_bytes_per_s: s.dirty_rate_bytes_per_s,
        regions: s
            .regions
            .iter()
            .map(|h| pb::RegionHeat {
                guest_offset_bytes: h.offset_bytes,
                size_bytes: h.size_bytes,
                accessed_bytes: h.accessed_bytes,
                written_bytes: h.written_bytes,
            })
            .collect(),
        error: Some(pb::ErrorEstimate {
            relative_error: s.error.relative_error,
            confidence: s.error.confidence,
            basis: s.error.basis.clone(),
            wss_is_lower_bound: s.error.lower_bound,
        }),
        counters: Some(counters),
        state: state(v.state) as i32,
        touched_bytes: s.touched_bytes,
        epoch: s.epoch as u64,
        host_id: String::new(),
        labels: v.info.labels.clone().into_iter().collect(),
    }
}

#[tonic::async_trait]
impl pb::agent_service_server::AgentService for AgentService {
    async fn list_vms(
        &self,
        _req: Request<pb::ListVmsRequest>,
    ) -> Result<Response<pb::ListVmsResponse>, Status> {
        let vms = self.registry.list().iter().map(vm_info).collect();
        Ok(Response::new(pb::ListVmsResponse { vms }))
    }

    async fn get_summary(
        &self,
        req: Request<pb::GetSummaryRequest>,
    ) -> Result<Response<pb::VmSummary>, Status> {
        let id = req.into_inner().vm_id;
        if id.is_empty() {
            return Err(Status::invalid_argument("vm_id is required (see ListVms)"));
        }
        check_vm_id(&id).map_err(|e| Status::invalid_argument(e.to_string()))?;
        let registry = self.registry.clone();
        let cfg = self.cfg.clone();
        let host = self.identity.clone();
        // O(granules): keep it off the async workers.
        let out =
            tokio::task::spawn_blocking(move || vm_summary(&registry, &cfg, &host.host_id, &id))
                .await
                .map_err(|e| Status::internal(format!("summary task failed: {e}")))??;
        Ok(Response::new(out))
    }

    type WatchSummariesStream =
        tokio_stream::wrappers::ReceiverStream<Result<pb::SummaryBatch, Status>>;

    async fn watch_summaries(
        &self,
        req: Request<pb::WatchSummariesRequest>,
    ) -> Result<Response<Self::WatchSummariesStream>, Status> {
        let filter = Filter::new(req.into_inner())?;
        let permit = self.streams.clone().try_acquire_owned().map_err(|_| {
            Status::resource_exhausted(format!(
                "{} summary streams are open already (--max-streams); close one or raise the limit",
                self.cfg.max_streams
            ))
        })?;
        // Capacity 1: a batch waits only while the reader reads the one before.
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        tokio::spawn(crate::stream::feed(
            self.batches.subscribe(),
            filter,
            tx,
            permit,
            self.stop.clone(),
        ));
        Ok(Response::new(tokio_stream::wrappers::ReceiverStream::new(
            rx,
        )))
    }

    async fn get_host_facts(
        &self,
        _req: Request<pb::GetHostFactsRequest>,
    ) -> Result<Response<pb::HostFacts>, Status> {
        let (id, registry) = (self.identity.clone(), self.registry.clone());
        let interval_ms = self.cfg.interval.as_millis() as u64;
        let facts =
            tokio::task::spawn_blocking(move || crate::host::facts(&id, &registry, interval_ms))
                .await
                .map_err(|e| Status::internal(format!("host facts task failed: {e}")))?;
        Ok(Response::new(facts))
    }
}
