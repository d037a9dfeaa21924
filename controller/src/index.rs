//! The controller's index, in memory: the agents it subscribes to, every
//! VM and host it has heard of (each VM with its latest point), and how far
//! each agent's batches are applied to the store.
//!
//! Loaded from the store at start ([`Index::load`]); the writer thread
//! (`ingest`) is the only one that changes VMs, subscriptions change their
//! agent's status and its host's facts; the gRPC services, planning,
//! maintenance and metrics read it. Every lock is taken through the
//! accessors, which carry on past a poisoned lock: the data is plain
//! records, never left half-updated by a panic that matters. VMs and hosts
//! are keyed by their checked ids ([`VmId`], [`HostId`]); a lookup by
//! `&str` works too.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};

use tokio::sync::broadcast;
use tracing::warn;
use wset_proto::ids::{HostId, VmId};
use wset_proto::v1 as pb;

use crate::store::{Store, StoreError};

/// Updates kept for slow `WatchVms` readers before they miss some.
const UPDATES_KEPT: usize = 256;

/// The VMs of one stored batch, as `WatchVms` streams them.
pub type VmUpdate = Arc<Vec<pb::ClusterVm>>;

#[derive(Debug)]
pub struct Index {
    /// Per agent endpoint.
    agents: Mutex<BTreeMap<String, pb::AgentStatus>>,
    /// Per agent endpoint: controller time of the last batch applied.
    applied: Mutex<HashMap<String, u64>>,
    /// Every VM seen, with its latest point.
    vms: RwLock<HashMap<VmId, pb::ClusterVm>>,
    /// Every host's last facts.
    hosts: Mutex<HashMap<HostId, pb::HostFacts>>,
    /// The VMs of each stored batch, for `WatchVms` (sent only while
    /// someone watches).
    updates: broadcast::Sender<VmUpdate>,
}

impl Default for Index {
    fn default() -> Self {
        Self {
            agents: Mutex::default(),
            applied: Mutex::default(),
            vms: RwLock::default(),
            hosts: Mutex::default(),
            updates: broadcast::channel(UPDATES_KEPT).0,
        }
    }
}

impl Index {
    /// Load the VM index and host facts from the store. A damaged record
    /// or latest point is skipped with a warning (the VM's next report
    /// brings it back): it never keeps the controller from starting. A
    /// record whose id is not one (written by a controller that checked
    /// less, or damaged on disk) counts as damaged too: the index holds
    /// only checked ids.
    pub fn load(store: &Store) -> Result<Self, StoreError> {
        let (records, bad) = store.load_vms()?;
        let mut bad_records: Vec<String> = bad.iter().map(ToString::to_string).collect();
        let mut vms = HashMap::new();
        let mut bad_latest = Vec::new();
        for mut v in records {
            let id = match VmId::parse(&v.vm_id) {
                Ok(id) => id,
                Err(e) => {
                    bad_records.push(format!("VM record: {e}"));
                    continue;
                }
            };
            match store.last_vm_point(id.as_str()) {
                Ok(p) => v.latest = p,
                Err(e) => bad_latest.push((id.clone(), e)),
            }
            vms.insert(id, v);
        }
        let (records, bad) = store.load_hosts()?;
        let mut bad_hosts: Vec<String> = bad.iter().map(ToString::to_string).collect();
        let mut hosts = HashMap::new();
        for h in records {
            match HostId::parse(&h.host_id) {
                Ok(id) => {
                    hosts.insert(id, h);
                }
                Err(e) => bad_hosts.push(format!("host record: {e}")),
            }
        }
        for (what, bad) in [("VM records", &bad_records), ("host records", &bad_hosts)] {
            if let Some(e) = bad.first() {
                warn!(
                    skipped = bad.len(),
                    first = %e,
                    "damaged {what} skipped; each comes back with its next report"
                );
            }
        }
        if let Some((vm, e)) = bad_latest.first() {
            warn!(
                vms = bad_latest.len(),
                first = %vm,
                error = %e,
                "latest points unreadable; each comes back with its VM's next report"
            );
        }
        Ok(Self {
            vms: RwLock::new(vms),
            hosts: Mutex::new(hosts),
            ..Default::default()
        })
    }

    /// The agents, by endpoint.
    pub fn agents(&self) -> MutexGuard<'_, BTreeMap<String, pb::AgentStatus>> {
        self.agents.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Every agent's status now.
    pub fn agent_list(&self) -> Vec<pb::AgentStatus> {
        self.agents().values().cloned().collect()
    }

    /// Change one agent's status, if it is still subscribed to.
    pub fn update_agent(&self, endpoint: &str, f: impl FnOnce(&mut pb::AgentStatus)) {
        if let Some(s) = self.agents().get_mut(endpoint) {
            f(s);
        }
    }

    /// Every VM seen, by id.
    pub fn vms(&self) -> RwLockReadGuard<'_, HashMap<VmId, pb::ClusterVm>> {
        self.vms.read().unwrap_or_else(|p| p.into_inner())
    }

    /// The VMs, to change (the writer thread, and forgetting VMs after
    /// maintenance).
    pub fn vms_mut(&self) -> RwLockWriteGuard<'_, HashMap<VmId, pb::ClusterVm>> {
        self.vms.write().unwrap_or_else(|p| p.into_inner())
    }

    /// Every host's last facts, by id.
    pub fn hosts(&self) -> MutexGuard<'_, HashMap<HostId, pb::HostFacts>> {
        self.hosts.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Note that every batch received from `endpoint` up to `received_ms`
    /// (controller time) is applied to the store.
    pub fn applied(&self, endpoint: String, received_ms: u64) {
        self.applied
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(endpoint, received_ms);
    }

    /// How far each agent's batches are applied: taken before a flush and
    /// handed to [`Index::mark_durable`] once that flush worked.
    pub fn applied_so_far(&self) -> HashMap<String, u64> {
        self.applied
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Publish, per agent, that everything applied up to `applied` (taken
    /// before a flush that worked) is durable.
    pub fn mark_durable(&self, applied: HashMap<String, u64>) {
        let mut agents = self.agents();
        for (ep, t) in applied {
            if let Some(a) = agents.get_mut(&ep) {
                a.durable_through_ms = a.durable_through_ms.max(t);
            }
        }
    }

    /// Whether anyone watches VM updates (`WatchVms`).
    pub fn watched(&self) -> bool {
        self.updates.receiver_count() > 0
    }

    /// Hand the VMs of a stored batch to whoever watches; nobody is fine.
    pub fn publish(&self, update: VmUpdate) {
        let _ = self.updates.send(update);
    }

    /// Every update from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<VmUpdate> {
        self.updates.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use prost::Message;

    use super::*;
    use crate::store::Write;

    /// A damaged VM record or latest point, and a VM or host record whose
    /// id is not one, are skipped at start-up; the rest of the index loads.
    #[test]
    fn load_skips_what_is_damaged() {
        let dir = std::env::temp_dir().join(format!("wset-ingest-load-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let store = Store::open(&dir, crate::config::default_levels(), 8 << 20).unwrap();
        let record = |id: &str| pb::ClusterVm {
            vm_id: id.into(),
            host_id: "h".into(),
            ..Default::default()
        };
        let point = |t| pb::VmHistoryPoint {
            timestamp_ms: t,
            ..Default::default()
        };
        store
            .apply(&Write {
                vm_points: vec![("a".into(), point(10)), ("b".into(), point(10))],
                vm_records: vec![record("a"), record("b")],
                ..Default::default()
            })
            .unwrap();
        store.put_raw_point_bytes("b", 20, &[0xff; 3]);
        store.put_vm_record_bytes("c", &[0xff; 3]);
        store.put_vm_record_bytes("bad/id", &record("bad/id").encode_to_vec());
        let host = |id: &str| pb::HostFacts {
            host_id: id.into(),
            ..Default::default()
        };
        for h in ["h", "bad host"] {
            store
                .apply(&Write {
                    host_facts: Some(host(h)),
                    ..Default::default()
                })
                .unwrap();
        }
        let index = Index::load(&store).unwrap();
        let vms = index.vms();
        let mut ids: Vec<&str> = vms.keys().map(VmId::as_str).collect();
        ids.sort();
        assert_eq!(ids, ["a", "b"]);
        assert_eq!(vms["a"].latest, Some(point(10)));
        assert_eq!(vms["b"].latest, None);
        drop(vms);
        let hosts = index.hosts();
        let ids: Vec<&str> = hosts.keys().map(HostId::as_str).collect();
        assert_eq!(ids, ["h"]);
        drop(hosts);
        drop(store);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
