//! Planning on fresh history: the planner's input is built from the hosts
//! whose agents are connected, their VMs in the index and each VM's raw
//! samples over the lookback in the store; the plan is published in a
//! `watch` channel, every `--plan-interval` and whenever a client asks for
//! a fresh one, by the replica that may plan (alone, or the leader), each
//! plan stamped with its term. The planner itself (`planner/`) stays pure.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use tokio::sync::watch;
use tracing::{debug, warn};
use wset_proto::ids::{HostId, VmId};
use wset_proto::v1 as pb;

use crate::config::Config;
use crate::index::Index;
use crate::labels;
use crate::planner::{self, HostInput, Input, Sample, VmInput};
use crate::recent::Recent;
use crate::replica::{NotServable, Replica};
use crate::store::{Store, StoreError};

/// A plan with what went into it.
#[derive(Debug)]
pub struct PlanRecord {
    pub id: String,
    pub created_ms: u64,
    pub history_from_ms: u64,
    pub hosts: u32,
    pub vms: u32,
    pub samples: u64,
    /// VMs whose history could not be read, planned at their full memory.
    pub unreadable_vms: u32,
    pub seconds: f64,
    pub settings: planner::Config,
    pub plan: planner::Plan,
    /// The leader's term it was made in (0: a controller alone).
    pub term: u64,
    /// The replica that made it.
    pub leader: String,
}

#[cfg(test)]
impl PlanRecord {
    /// A plan of nothing, made in `term`.
    pub fn empty_for_tests(term: u64) -> Self {
        Self {
            id: format!("plan-test-{term}"),
            created_ms: 1,
            history_from_ms: 0,
            hosts: 0,
            vms: 0,
            samples: 0,
            unreadable_vms: 0,
            seconds: 0.0,
            settings: planner::Config::default(),
            plan: planner::Plan {
                hosts: Vec::new(),
                moves: Vec::new(),
                unresolved: Vec::new(),
            },
            term,
            leader: "test".into(),
        }
    }
}

/// The planner's input, and what went into it.
#[derive(Debug)]
pub struct Built {
    pub input: Input,
    /// Raw samples read.
    pub samples: u64,
    /// VMs whose history could not be read (a damaged block, an I/O
    /// error): each is planned as one sample of its full memory, the
    /// demand that overcommits nothing on its account.
    pub unreadable: u32,
    /// The first of them, and why.
    pub first_unreadable: Option<(VmId, StoreError)>,
}

/// The planner's input now: connected hosts, their tracking VMs reported
/// within the last three sample intervals (and 5 s), and each VM's samples
/// (its shortest window's working set) over the lookback. One VM's
/// unreadable history never keeps the others from a plan. The ids are the
/// index's, checked when their agent reported them.
pub fn build_input(
    store: &Store,
    index: &Index,
    recent: &Recent,
    settings: &planner::Config,
    sample_interval_ms: u64,
    now_ms: u64,
) -> Built {
    let connected: HashSet<String> = index
        .agents()
        .values()
        .filter(|a| a.state == pb::AgentConnectionState::Connected as i32)
        .map(|a| a.host_id.clone())
        .collect();
    let hosts: Vec<HostInput> = index
        .hosts()
        .iter()
        .filter(|(id, _)| connected.contains(id.as_str()))
        .map(|(id, h)| HostInput {
            host_id: id.clone(),
            capacity_bytes: if h.vm_capacity_bytes > 0 {
                h.vm_capacity_bytes
            } else {
                h.memory_total_bytes
            },
            maintenance: labels::in_maintenance(&h.labels),
        })
        .collect();
    // A VM its agent stopped reporting (its VMM never registered again after
    // an agent restart, or the agent forgot it) is not on the host any more
    // as far as anyone knows: it is left out rather than planned on stale
    // history.
    let fresh_ms = 3 * sample_interval_ms + 5000;
    // Only VMs on a connected host, which always has its facts (the batch
    // that connected it brought them): each VM takes its host's id.
    let host_ids: HashMap<&str, &HostId> = hosts
        .iter()
        .map(|h| (h.host_id.as_str(), &h.host_id))
        .collect();
    let vms: Vec<(VmId, HostId, pb::ClusterVm)> = index
        .vms()
        .iter()
        .filter(|(_, v)| {
            v.state == pb::VmState::Tracking as i32
                && now_ms.saturating_sub(v.last_seen_ms) <= fresh_ms
        })
        .filter_map(|(id, v)| {
            let host = host_ids.get(v.host_id.as_str())?;
            Some((id.clone(), (*host).clone(), v.clone()))
        })
        .collect();
    // Each VM's samples are read, reduced to its demand and dropped, on
    // all CPUs: an hour of every VM's samples is never in memory at once.
    let from = now_ms.saturating_sub(settings.lookback_ms);
    let none = pb::VmHistoryPoint::default();
    let read = planner::map_parallel(&vms, |(id, host, v)| {
        let latest = v.latest.as_ref().unwrap_or(&none);
        // Memory holds every VM's recent samples; the store is read only
        // for a VM it does not hold.
        let held = recent.samples(id, from, now_ms + 1).map(Ok);
        let read = held.unwrap_or_else(|| {
            store
                .vm_plan_points(id.as_str(), from, now_ms + 1)
                .map(|points| points.iter().map(Sample::from).collect::<Vec<_>>())
        });
        let (history, read) = match read {
            Ok(samples) => {
                let n = samples.len() as u64;
                (samples, Ok(n))
            }
            Err(e) => (
                vec![Sample {
                    t_ms: v.last_seen_ms,
                    wss_bytes: v.memory_bytes,
                    dirty_bytes_per_s: latest.dirty_rate_bytes_per_s,
                }],
                Err(e),
            ),
        };
        let mut input = VmInput {
            vm_id: id.clone(),
            host_id: host.clone(),
            memory_bytes: v.memory_bytes,
            labels: v.labels.clone().into_iter().collect(),
            samples: history,
            demand: None,
            idle_ages: latest
                .idle_ages
                .iter()
                .map(|b| (b.min_age_ms, b.max_age_ms, b.bytes))
                .collect(),
            relative_error: latest.relative_error,
            lower_bound: latest.wss_is_lower_bound,
            last_moved_ms: (v.moved_at_ms > 0).then_some(v.moved_at_ms),
        };
        input.demand = Some(planner::demand(&input, settings, now_ms));
        input.samples = Vec::new();
        (input, read)
    });
    let (mut samples, mut unreadable, mut first_unreadable) = (0u64, 0u32, None);
    let mut inputs = Vec::with_capacity(read.len());
    for (input, r) in read {
        match r {
            Ok(n) => samples += n,
            Err(e) => {
                unreadable += 1;
                first_unreadable.get_or_insert((input.vm_id.clone(), e));
            }
        }
        inputs.push(input);
    }
    Built {
        input: Input {
            now_ms,
            hosts,
            vms: inputs,
        },
        samples,
        unreadable,
        first_unreadable,
    }
}

static PLAN_SEQ: AtomicU64 = AtomicU64::new(0);

/// Plan now, in `term`, as replica `leader` (call off the async workers).
pub fn plan_now(
    store: &Store,
    index: &Index,
    recent: &Recent,
    cfg: &Config,
    term: u64,
    leader: &str,
) -> PlanRecord {
    let span = tracing::info_span!(
        "plan",
        term,
        hosts = tracing::field::Empty,
        vms = tracing::field::Empty,
        moves = tracing::field::Empty
    );
    let _e = span.enter();
    let started = Instant::now();
    let now = crate::now_ms();
    let Built {
        input,
        samples,
        unreadable,
        first_unreadable,
    } = build_input(
        store,
        index,
        recent,
        &cfg.planner,
        cfg.sample_interval.as_millis() as u64,
        now,
    );
    if let Some((vm, e)) = first_unreadable {
        warn!(
            vms = unreadable,
            first = %vm,
            error = %e,
            "history unreadable: those VMs are planned at their full memory"
        );
    }
    let plan = planner::plan(&input, &cfg.planner);
    span.record("hosts", input.hosts.len());
    span.record("vms", input.vms.len());
    span.record("moves", plan.moves.len());
    PlanRecord {
        id: format!("plan-{now}-{}", PLAN_SEQ.fetch_add(1, Ordering::Relaxed)),
        created_ms: now,
        history_from_ms: now.saturating_sub(cfg.planner.lookback_ms),
        hosts: input.hosts.len() as u32,
        vms: input.vms.len() as u32,
        samples,
        unreadable_vms: unreadable,
        seconds: started.elapsed().as_secs_f64(),
        settings: cfg.planner.clone(),
        plan,
        term,
        leader: leader.to_owned(),
    }
}

/// The latest plan published or mirrored; `None` before the first.
pub type Plans = watch::Sender<Option<Arc<PlanRecord>>>;

/// Why no plan was made and published.
#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    #[error(transparent)]
    NotLeader(#[from] NotServable),
    #[error("planning task failed")]
    Task(#[source] tokio::task::JoinError),
}

/// What planning needs: history, the index, settings, who may publish and
/// where plans go.
#[derive(Clone, Debug)]
pub struct Planning {
    pub store: Store,
    pub index: Arc<Index>,
    pub recent: Arc<Recent>,
    pub cfg: Arc<Config>,
    pub replica: Arc<Replica>,
    pub plans: Arc<Plans>,
}

impl Planning {
    /// Plan now and publish, if this replica may plan: it runs alone, or
    /// leads with its lease not near its end, both when planning starts
    /// and when the plan is published (the lease may lapse in between;
    /// the plan is then dropped).
    pub async fn plan_and_publish(&self) -> Result<Arc<PlanRecord>, PlanError> {
        let Some(term) = self.replica.planning_term() else {
            return Err(self.replica.why_not_planning().into());
        };
        let (s, ix, rc, c, name) = (
            self.store.clone(),
            self.index.clone(),
            self.recent.clone(),
            self.cfg.clone(),
            self.replica.name.clone(),
        );
        let p = tokio::task::spawn_blocking(move || plan_now(&s, &ix, &rc, &c, term, &name))
            .await
            .map_err(PlanError::Task)?;
        let p = Arc::new(p);
        let mut published = None;
        self.plans.send_if_modified(|slot| {
            // The gate is checked under the channel's lock, so no reader
            // sees a plan published after it closed; the instant recorded
            // is the publication's.
            if self.replica.may_publish(term) {
                *slot = Some(p.clone());
                published = Some(crate::now_ms());
            }
            published.is_some()
        });
        let Some(at) = published else {
            return Err(self.replica.why_not_planning().into());
        };
        self.replica.published(term, at);
        Ok(p)
    }
}

/// Plan every `plan_interval` until `stop` changes, while this replica
/// may, and at once when it starts to lead a new term.
pub async fn run(planning: Planning, mut stop: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(planning.cfg.plan_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut leadership = planning.replica.subscribe();
    let mut planned_term = None;
    loop {
        tokio::select! {
            _ = stop.changed() => return,
            _ = tick.tick() => {}
            r = leadership.changed() => {
                if r.is_err() {
                    return;
                }
                let term = planning.replica.planning_term();
                if term.is_none() || term == planned_term {
                    continue;
                }
            }
        }
        planned_term = planning.replica.planning_term();
        match planning.plan_and_publish().await {
            Ok(p) => {
                debug!(plan = %p.id, term = p.term, hosts = p.hosts, vms = p.vms, moves = p.plan.moves.len(), seconds = p.seconds, "planned");
            }
            Err(PlanError::NotLeader(why)) => debug!(%why, "not planning"),
            Err(e) => warn!(error = %e, "planning task failed; the previous plan stands"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A raw point at `t` with a 5 MiB working set in a 10 s window.
    fn point(t: u64) -> pb::VmHistoryPoint {
        pb::VmHistoryPoint {
            timestamp_ms: t,
            windows: vec![pb::WindowStat {
                window_ms: 10_000,
                wss_bytes: 5 << 20,
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    /// Only hosts whose agents are connected, and only their VMs reported
    /// lately, go into a plan; each VM with its stored samples.
    #[test]
    fn input_from_connected_hosts_and_fresh_vms() {
        let dir = std::env::temp_dir().join(format!("wset-decide-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let store = Store::open(&dir, crate::config::default_levels(), 8 << 20).unwrap();
        let index = Index::default();
        let now = 1_000_000_000;
        for (ep, host, state) in [
            ("a:1", "up", pb::AgentConnectionState::Connected),
            ("b:1", "down", pb::AgentConnectionState::BackingOff),
        ] {
            index.agents().insert(
                ep.into(),
                pb::AgentStatus {
                    endpoint: ep.into(),
                    host_id: host.into(),
                    state: state as i32,
                    ..Default::default()
                },
            );
            index.hosts().insert(
                host.parse().unwrap(),
                pb::HostFacts {
                    host_id: host.into(),
                    vm_capacity_bytes: 1 << 30,
                    labels: [(labels::MAINTENANCE.to_owned(), "true".to_owned())].into(),
                    ..Default::default()
                },
            );
        }
        let vm = |id: &str, host: &str, seen: u64| pb::ClusterVm {
            vm_id: id.into(),
            host_id: host.into(),
            memory_bytes: 1 << 28,
            state: pb::VmState::Tracking as i32,
            last_seen_ms: seen,
            ..Default::default()
        };
        for v in [
            vm("fresh", "up", now - 1000),
            vm("stale", "up", now - 600_000),
            vm("away", "down", now),
        ] {
            index.vms_mut().insert(v.vm_id.parse().unwrap(), v);
        }
        store
            .apply(&crate::store::Write {
                vm_points: vec![
                    ("fresh".into(), point(now - 2_000)),
                    ("fresh".into(), point(now - 1_000)),
                    ("fresh".into(), point(now - 7_200_000)),
                ],
                ..Default::default()
            })
            .unwrap();
        let Built {
            input,
            samples,
            unreadable,
            ..
        } = build_input(
            &store,
            &index,
            &Recent::new(3_600_000, 10_000),
            &planner::Config::default(),
            10_000,
            now,
        );
        assert_eq!(unreadable, 0);
        assert_eq!(input.hosts.len(), 1);
        assert_eq!(input.hosts[0].host_id, "up");
        assert!(input.hosts[0].maintenance);
        assert_eq!(input.hosts[0].capacity_bytes, 1 << 30);
        let ids: Vec<&str> = input.vms.iter().map(|v| v.vm_id.as_str()).collect();
        assert_eq!(ids, ["fresh"]);
        // The sample older than the lookback (an hour) is not read.
        assert_eq!(samples, 2);
        // Reduced to its demand; the samples are not kept.
        let d = input.vms[0].demand.as_ref().unwrap();
        assert_eq!((d.samples_used, d.max_bytes), (2, 5 << 20));
        assert!(input.vms[0].samples.is_empty());
        // From memory, loaded from the store, the same input; and memory
        // is what is read (a sample only memory holds counts).
        let recent = Recent::new(3_600_000, 10_000);
        let ids: Vec<VmId> = index.vms().keys().cloned().collect();
        assert!(
            recent
                .load_from(&store, &ids, now - 3_600_000, now + 1)
                .is_empty()
        );
        let plan_input =
            |r: &Recent| build_input(&store, &index, r, &planner::Config::default(), 10_000, now);
        let from_memory = plan_input(&recent);
        assert_eq!(from_memory.input, input);
        assert_eq!(from_memory.samples, 2);
        recent.push(
            "fresh",
            Sample {
                t_ms: now - 500,
                wss_bytes: 6 << 20,
                dirty_bytes_per_s: 0.0,
            },
        );
        let b = plan_input(&recent);
        assert_eq!(b.samples, 3);
        assert_eq!(b.input.vms[0].demand.as_ref().unwrap().max_bytes, 6 << 20);
        drop(store);
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A VM whose history cannot be read is planned at its full memory;
    /// the others are planned as usual.
    #[test]
    fn unreadable_history_is_planned_at_full_memory() {
        let dir = std::env::temp_dir().join(format!("wset-decide-bad-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let store = Store::open(&dir, crate::config::default_levels(), 8 << 20).unwrap();
        let index = Index::default();
        let now = 1_000_000_000;
        index.agents().insert(
            "a:1".into(),
            pb::AgentStatus {
                endpoint: "a:1".into(),
                host_id: "h".into(),
                state: pb::AgentConnectionState::Connected as i32,
                ..Default::default()
            },
        );
        index.hosts().insert(
            "h".parse().unwrap(),
            pb::HostFacts {
                host_id: "h".into(),
                vm_capacity_bytes: 1 << 32,
                ..Default::default()
            },
        );
        for id in ["good", "bad"] {
            index.vms_mut().insert(
                id.parse().unwrap(),
                pb::ClusterVm {
                    vm_id: id.into(),
                    host_id: "h".into(),
                    memory_bytes: 1 << 30,
                    state: pb::VmState::Tracking as i32,
                    last_seen_ms: now - 1000,
                    ..Default::default()
                },
            );
        }
        store
            .apply(&crate::store::Write {
                vm_points: vec![
                    ("good".into(), point(now - 1000)),
                    ("bad".into(), point(now - 1000)),
                ],
                ..Default::default()
            })
            .unwrap();
        store.put_raw_point_bytes("bad", now - 2000, &[0xff; 3]);
        let b = build_input(
            &store,
            &index,
            &Recent::new(3_600_000, 10_000),
            &planner::Config::default(),
            10_000,
            now,
        );
        assert_eq!((b.unreadable, b.samples), (1, 1));
        let (vm, e) = b.first_unreadable.as_ref().unwrap();
        assert_eq!(vm, "bad");
        assert!(e.to_string().contains("VM point"), "{e}");
        let demand = |id: &str| {
            let v = b.input.vms.iter().find(|v| v.vm_id == id).unwrap();
            let d = v.demand.as_ref().unwrap();
            (d.samples_used, d.max_bytes, d.mean_bytes)
        };
        assert_eq!(demand("good"), (1, 5 << 20, (5 << 20) as f64));
        assert_eq!(demand("bad"), (1, 1 << 30, (1 << 30) as f64));
        drop(store);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
