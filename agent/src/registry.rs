//! The VMs this agent knows: tracking or retired. Only the control plane
//! touches the registry; trackers never wait on its lock.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use wset_proto::ids::VmId;
use wset_tracker::summary::{Summary, SummaryConfig, summarize};
use wset_tracker::{Plan, StopReport, TrackerHandle, TrackerState, VmShared};

/// What the agent knows of a VM besides its tracker's state.
#[derive(Clone, Debug)]
pub struct VmInfo {
    pub vm_id: VmId,
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub vmm_pid: libc::pid_t,
    pub memory_bytes: u64,
    pub page_size: u64,
    pub granule_bytes: u64,
    pub handshake: crate::handshake::HandshakeKind,
    pub plan: Plan,
}

#[derive(Debug)]
struct Entry {
    info: VmInfo,
    shared: Arc<VmShared>,
    handle: Option<TrackerHandle>,
    retired_at: Option<Instant>,
    end: Option<StopReport>,
}

/// A VM as the API shows it.
#[derive(Clone, Debug)]
pub struct VmView {
    pub info: VmInfo,
    pub state: TrackerState,
    pub end_reason: Option<String>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RegistryError {
    #[error("vm_id {0:?} is already registered and tracking; retire it first or pick another id")]
    Duplicate(VmId),
    #[error("no VM {0:?} on this agent")]
    NotFound(VmId),
}

/// The set of VMs.
#[derive(Debug, Default)]
pub struct Registry {
    vms: Mutex<HashMap<VmId, Entry>>,
    next_cpu: AtomicUsize,
    /// How registrations went, for the metrics.
    pub registrations: RegistrationStats,
}

/// Registration outcomes since start; all monotonic.
#[derive(Debug, Default)]
pub struct RegistrationStats {
    pub accepted: AtomicU64,
    /// Unreadable, malformed or late handshakes.
    pub refused_handshake: AtomicU64,
    /// Peers outside the allow-list.
    pub refused_peer: AtomicU64,
    /// Registrations past the rate limit.
    pub refused_rate: AtomicU64,
    /// Well-formed registrations that failed (bad fds, regions, duplicates).
    pub refused_registration: AtomicU64,
}

impl Registry {
    fn lock(&self) -> MutexGuard<'_, HashMap<VmId, Entry>> {
        // A panic while holding this lock cannot leave an entry half-made
        // (every change is one insert or field store), so poison is ignored.
        self.vms.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Round-robin CPU for the next tracker.
    pub fn next_cpu(&self, cpus: &[usize]) -> Option<usize> {
        if cpus.is_empty() {
            return None;
        }
        Some(cpus[self.next_cpu.fetch_add(1, Ordering::Relaxed) % cpus.len()])
    }

    /// Whether `vm_id` can be registered (no tracking VM has it).
    pub fn check_free(&self, vm_id: &VmId) -> Result<(), RegistryError> {
        match self.lock().get(vm_id) {
            Some(e) if e.handle.is_some() => Err(RegistryError::Duplicate(vm_id.clone())),
            _ => Ok(()),
        }
    }

    /// Add a VM whose tracker runs. A retired VM of the same id is replaced.
    pub fn insert(
        &self,
        info: VmInfo,
        handle: TrackerHandle,
    ) -> Result<(), (RegistryError, TrackerHandle)> {
        let mut vms = self.lock();
        if vms.get(&info.vm_id).is_some_and(|e| e.handle.is_some()) {
            return Err((RegistryError::Duplicate(info.vm_id.clone()), handle));
        }
        let shared = handle.shared().clone();
        vms.insert(
            info.vm_id.clone(),
            Entry {
                info,
                shared,
                handle: Some(handle),
                retired_at: None,
                end: None,
            },
        );
        Ok(())
    }

    pub fn list(&self) -> Vec<VmView> {
        let vms = self.lock();
        let mut out: Vec<VmView> = vms.values().map(view).collect();
        out.sort_by(|a, b| a.info.vm_id.cmp(&b.info.vm_id));
        out
    }

    pub fn get(&self, vm_id: &VmId) -> Result<VmView, RegistryError> {
        self.lock()
            .get(vm_id)
            .map(view)
            .ok_or_else(|| RegistryError::NotFound(vm_id.clone()))
    }

    /// The latest summary of one VM (computed now, off the fault path).
    pub fn summary(
        &self,
        vm_id: &VmId,
        cfg: &SummaryConfig,
        now_ms: u64,
    ) -> Result<(VmView, Summary), RegistryError> {
        let (v, shared) = {
            let vms = self.lock();
            let e = vms
                .get(vm_id)
                .ok_or_else(|| RegistryError::NotFound(vm_id.clone()))?;
            (view(e), e.shared.clone())
        };
        let s = summarize(&shared, &v.info.plan, cfg, now_ms);
        Ok((v, s))
    }

    /// Collect trackers that ended by themselves and forget VMs retired for
    /// longer than `ttl`. Returns the VMs newly retired.
    pub fn reap(&self, ttl: Duration) -> Vec<(VmInfo, StopReport)> {
        let mut done = Vec::new();
        let mut vms = self.lock();
        for e in vms.values_mut() {
            if e.handle.as_ref().is_some_and(TrackerHandle::is_finished) {
                let report = e.handle.take().expect("checked").stop();
                e.retired_at = Some(Instant::now());
                e.end = Some(report.clone());
                done.push((e.info.clone(), report));
            }
        }
        vms.retain(|_, e| e.retired_at.is_none_or(|t| t.elapsed() < ttl));
        done
    }

    /// Stop every tracker (each puts its custody back and unregisters).
    pub fn stop_all(&self) -> Vec<(VmInfo, StopReport)> {
        let handles: Vec<(VmInfo, TrackerHandle)> = {
            let mut vms = self.lock();
            vms.values_mut()
                .filter_map(|e| {
                    e.retired_at = Some(Instant::now());
                    e.handle.take().map(|h| (e.info.clone(), h))
                })
                .collect()
        };
        // Stop in parallel: each release may copy many pages back.
        let joins: Vec<_> = handles
            .into_iter()
            .map(|(info, h)| std::thread::spawn(move || (info, h.stop())))
            .collect();
        joins.into_iter().filter_map(|j| j.join().ok()).collect()
    }

    /// The shared tracker state of one VM.
    pub fn shared(&self, vm_id: &VmId) -> Option<std::sync::Arc<VmShared>> {
        self.lock().get(vm_id).map(|e| e.shared.clone())
    }

    pub fn tracking_count(&self) -> usize {
        self.lock().values().filter(|e| e.handle.is_some()).count()
    }
}

fn view(e: &Entry) -> VmView {
    let state = if e.handle.is_some() {
        TrackerState::Tracking
    } else {
        e.shared.state()
    };
    let end_reason = e
        .end
        .as_ref()
        .map(|r| r.reason.clone())
        .or_else(|| e.shared.end_reason().map(str::to_owned));
    VmView {
        info: e.info.clone(),
        state,
        end_reason,
    }
}
