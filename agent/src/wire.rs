//! Every conversion between the agent's domain types and `wset.v1`'s wire
//! types, and the one error mapping onto gRPC statuses. Wire types stop
//! here: the registry, the trackers and the host facts know nothing of
//! protobuf.

use std::sync::atomic::Ordering::Relaxed;

use tonic::Status;
use wset_proto::ids::VmId;
use wset_proto::v1 as pb;
use wset_tracker::summary::Summary;
use wset_tracker::{Method, Plan, TrackerState, VmShared};

use crate::config::Config;
use crate::host::{HostFacts, MemoryPressure};
use crate::now_ms;
use crate::registry::{Registry, RegistryError, VmView};

impl From<RegistryError> for Status {
    fn from(e: RegistryError) -> Self {
        match e {
            RegistryError::NotFound(_) => Status::not_found(e.to_string()),
            RegistryError::Duplicate(_) => Status::already_exists(e.to_string()),
        }
    }
}

/// The methods of a plan, as wire enums.
pub fn methods(p: &Plan) -> Vec<pb::TrackingMethod> {
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

fn method_codes(p: &Plan) -> Vec<i32> {
    methods(p).into_iter().map(|m| m as i32).collect()
}

fn state(s: TrackerState) -> pb::VmState {
    match s {
        TrackerState::Tracking => pb::VmState::Tracking,
        _ => pb::VmState::Retired,
    }
}

/// A VM as `ListVms` shows it.
pub fn vm_info(v: &VmView) -> pb::VmInfo {
    pb::VmInfo {
        vm_id: v.info.vm_id.to_string(),
        name: v.info.name.clone(),
        labels: v.info.labels.clone().into_iter().collect(),
        memory_bytes: v.info.memory_bytes,
        methods: method_codes(&v.info.plan),
        state: state(v.state) as i32,
        retired_reason: v.end_reason.clone().unwrap_or_default(),
        vmm_pid: v.info.vmm_pid.cast_unsigned(),
        page_size_bytes: v.info.page_size,
        granule_bytes: v.info.granule_bytes,
        handshake: v.info.handshake.as_str().to_owned(),
        notes: v.info.plan.notes.clone(),
    }
}

/// One VM's latest summary on the wire (O(granules): call off the async
/// workers).
pub fn vm_summary(
    registry: &Registry,
    cfg: &Config,
    host_id: &str,
    vm_id: &VmId,
) -> Result<pb::VmSummary, RegistryError> {
    let (v, s) = registry.summary(vm_id, &cfg.summary, now_ms())?;
    let shared = registry
        .shared(vm_id)
        .ok_or_else(|| RegistryError::NotFound(vm_id.clone()))?;
    let mut pb = summary(&v, &s, counters(&shared));
    pb.interval_ms = cfg.interval.as_millis() as u64;
    pb.host_id = host_id.to_owned();
    Ok(pb)
}

/// A summary on the wire (without the interval and host, which the caller
/// knows).
pub fn summary(v: &VmView, s: &Summary, counters: pb::TrackerCounters) -> pb::VmSummary {
    pb::VmSummary {
        vm_id: v.info.vm_id.to_string(),
        name: v.info.name.clone(),
        timestamp_ms: now_ms(),
        memory_bytes: s.memory_bytes,
        granule_bytes: v.info.granule_bytes,
        methods: method_codes(&v.info.plan),
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

/// A tracker's counters now.
pub fn counters(shared: &VmShared) -> pb::TrackerCounters {
    let c = &shared.counters;
    pb::TrackerCounters {
        faults_handled: c.faults_handled.load(Relaxed),
        missing_faults: c.missing_faults.load(Relaxed),
        wp_faults: c.wp_faults.load(Relaxed),
        events_dropped: c.events_dropped.load(Relaxed),
        pages_in_custody: c.pages_in_custody.load(Relaxed),
        harvests: c.harvests.load(Relaxed),
        sampled_pages: c.sampled_pages.load(Relaxed),
        remove_events: c.remove_events.load(Relaxed),
        huge_written_bytes: c.huge_written_bytes.load(Relaxed),
        rwp_read_faults: c.rwp_read_faults.load(Relaxed),
        rwp_write_faults: c.rwp_write_faults.load(Relaxed),
        harvest_ns_total: c.harvest_ns.load(Relaxed),
        evicted_pages: c.evicted_pages.load(Relaxed),
        refaulted_pages: c.refaulted_pages.load(Relaxed),
        unpunchable_pages: c.unpunchable_pages.load(Relaxed),
        custody_full: c.custody_full.load(Relaxed),
        prefetched_pages: c.prefetched_pages.load(Relaxed),
        prefetch_probes: c.prefetch_probes.load(Relaxed),
        prefetch_probes_untouched: c.prefetch_probes_untouched.load(Relaxed),
        fault_service_latency: shared
            .latency_histogram()
            .into_iter()
            .map(|(le_ns, count)| pb::LatencyBucket { le_ns, count })
            .collect(),
    }
}

/// The host's facts on the wire.
pub fn host_facts(f: HostFacts) -> pb::HostFacts {
    pb::HostFacts {
        host_id: f.host_id,
        agent_instance_id: f.agent_instance_id,
        agent_started_ms: f.agent_started_ms,
        agent_version: f.agent_version.to_owned(),
        kernel_release: f.kernel_release,
        timestamp_ms: f.timestamp_ms,
        memory_total_bytes: f.memory_total_bytes,
        memory_available_bytes: f.memory_available_bytes,
        vm_memory_committed_bytes: f.vm_memory_committed_bytes,
        vms_tracking: f.vms_tracking,
        memory_pressure: f.memory_pressure.map(memory_pressure),
        tracking_interval_ms: f.tracking_interval_ms,
        uffd_features: f.uffd_features,
        rwp_available: f.rwp_available,
        cpus: f.cpus,
        vm_capacity_bytes: f.vm_capacity_bytes,
        labels: f.labels.into_iter().collect(),
    }
}

fn memory_pressure(p: MemoryPressure) -> pb::MemoryPressure {
    pb::MemoryPressure {
        some_avg10_pct: p.some_avg10_pct,
        some_avg60_pct: p.some_avg60_pct,
        some_avg300_pct: p.some_avg300_pct,
        some_total_us: p.some_total_us,
        full_avg10_pct: p.full_avg10_pct,
        full_avg60_pct: p.full_avg60_pct,
        full_avg300_pct: p.full_avg300_pct,
        full_total_us: p.full_total_us,
    }
}
