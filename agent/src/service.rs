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
use crate::now_ms;
use crate::registry::{Registry, RegistryError, VmView};

/// `wset.v1.AgentService` over the registry.
#[derive(Debug, Clone)]
pub struct AgentService {
    pub registry: Arc<Registry>,
    pub cfg: Arc<Config>,
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
        // O(granules): keep it off the async workers.
        let out = tokio::task::spawn_blocking(move || {
            let (v, s) = registry.summary(&id, &cfg.summary, now_ms())?;
            let c = registry.counters(&id)?;
            let mut pb = summary_pb(&v, &s, c);
            pb.interval_ms = cfg.interval.as_millis() as u64;
            Ok::<_, RegistryError>(pb)
        })
        .await
        .map_err(|e| Status::internal(format!("summary task failed: {e}")))??;
        Ok(Response::new(out))
    }
}
