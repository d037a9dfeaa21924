//! `wset.v1.SchedulerService`: the planner's decisions on the wire, with
//! request validation and the conversions from the planner's types.

use std::collections::BTreeMap;
use std::sync::Arc;

use tonic::{Request, Response, Status};
use wset_proto::ids::VmId;
use wset_proto::v1 as pb;

use crate::decide::{PlanError, PlanRecord, Planning};
use crate::labels;
use crate::planner::{self, MoveReason, PlacementRequest};
use crate::replica::NotServable;

#[derive(Debug, Clone)]
pub struct SchedulerService {
    pub planning: Planning,
    /// One permit per open `WatchDecisions` stream.
    pub streams: Arc<tokio::sync::Semaphore>,
    pub stop: tokio::sync::watch::Receiver<bool>,
}

/// `WatchDecisions` streams open at once.
pub const MAX_STREAMS: usize = 64;

fn settings(c: &planner::Config) -> pb::PlannerSettings {
    pb::PlannerSettings {
        risk: c.risk,
        horizon_ms: c.horizon_ms,
        lookback_ms: c.lookback_ms,
        high_watermark: c.high_watermark,
        consolidate_below: c.consolidate_below,
        link_bytes_per_s: c.link_bytes_per_s,
        max_dirty_share: c.max_dirty_share,
        hysteresis_ms: c.hysteresis_ms,
        max_moves_per_host: c.max_moves_per_host,
        cold_age_ms: c.cold_age_ms,
    }
}

fn info(r: &PlanRecord) -> pb::PlanInfo {
    pb::PlanInfo {
        plan_id: r.id.clone(),
        created_ms: r.created_ms,
        history_from_ms: r.history_from_ms,
        hosts: r.hosts,
        vms: r.vms,
        samples: r.samples,
        vms_without_history: r.unreadable_vms,
        settings: Some(settings(&r.settings)),
        planning_seconds: r.seconds,
        term: r.term,
        leader: r.leader.clone(),
    }
}

/// The stable id of a migration decision.
pub fn migration_id(m: &planner::Move) -> String {
    format!("migration/{}/{}/{}", m.vm_id, m.from, m.to)
}

fn migration(m: &planner::Move) -> pb::Migration {
    pb::Migration {
        decision_id: migration_id(m),
        vm_id: m.vm_id.to_string(),
        from_host_id: m.from.to_string(),
        to_host_id: m.to.to_string(),
        priority: u32::from(m.priority),
        reason: match m.reason {
            MoveReason::Maintenance => pb::MigrationReason::Maintenance,
            MoveReason::Overload => pb::MigrationReason::Overload,
            MoveReason::Consolidation => pb::MigrationReason::Consolidation,
        } as i32,
        copy_bytes: m.copy_bytes,
        copy_seconds: m.copy_seconds,
        explanation: m.explanation.clone(),
    }
}

fn vm_demand(v: &planner::VmPlan, memory_bytes: u64, horizon_ms: u64) -> pb::VmDemand {
    let d = &v.demand;
    pb::VmDemand {
        vm_id: v.vm_id.to_string(),
        memory_bytes,
        mean_bytes: d.mean_bytes,
        std_bytes: d.std_bytes,
        trend_bytes_per_h: d.trend_bytes_per_h,
        phase_change_at_ms: d.phase_change_at_ms.unwrap_or(0),
        samples_used: d.samples_used as u32,
        span_ms: d.span_ms,
        p50_bytes: d.p50_bytes,
        p95_bytes: d.p95_bytes,
        max_bytes: d.max_bytes,
        dirty_rate_bytes_per_s: d.dirty_bytes_per_s,
        lower_bound: d.lower_bound,
        reclaimable_bytes: v.reclaimable_bytes,
        explanation: d.explain(horizon_ms),
        error_floor_bytes: d.error_floor_bytes,
    }
}

fn host(
    h: &planner::HostPlan,
    include_vms: bool,
    memory: &BTreeMap<VmId, u64>,
    horizon_ms: u64,
) -> pb::HostOvercommit {
    pb::HostOvercommit {
        host_id: h.host_id.to_string(),
        capacity_bytes: h.capacity_bytes,
        committed_bytes: h.committed_bytes,
        demand_mean_bytes: h.demand_mean_bytes,
        demand_std_bytes: h.demand_std_bytes,
        demand_at_risk_bytes: h.demand_at_risk_bytes,
        overflow_probability: h.overflow_probability,
        admissible_bytes: h.admissible_bytes,
        safe_overcommit_ratio: h.safe_overcommit_ratio,
        reclaimable_bytes: h.reclaimable_bytes,
        maintenance: h.maintenance,
        vms: if include_vms {
            h.vms
                .iter()
                .map(|v| vm_demand(v, memory.get(&v.vm_id).copied().unwrap_or(0), horizon_ms))
                .collect()
        } else {
            Vec::new()
        },
        explanation: h.explanation.clone(),
        groups: h.groups.iter().cloned().collect(),
    }
}

impl SchedulerService {
    /// The latest plan this replica may serve, or a fresh one when asked
    /// (or when none of the current term exists yet and this replica may
    /// plan). Never a plan of an older term: the refusal names the leader.
    async fn plan(&self, replan: bool) -> Result<Arc<PlanRecord>, Status> {
        let replica = &self.planning.replica;
        if !replan {
            let current = self.planning.plans.borrow().clone();
            match replica.servable(current.as_deref()) {
                Ok(()) => {
                    if let Some(p) = current {
                        return Ok(p);
                    }
                }
                Err(NotServable::NoPlanOfTerm { .. }) if replica.planning_term().is_some() => {}
                Err(e) => return Err(e.into()),
            }
        }
        match self.planning.plan_and_publish().await {
            Ok(p) => Ok(p),
            Err(PlanError::NotLeader(e)) => Err(e.into()),
            Err(e) => Err(Status::internal(format!("{e:#}"))),
        }
    }

    /// The plan every read is answered from (the extender's too).
    pub async fn current_plan(&self) -> Result<Arc<PlanRecord>, Status> {
        self.plan(false).await
    }

    fn memory_of_vms(&self) -> BTreeMap<VmId, u64> {
        memory_of_vms(&self.planning.index)
    }
}

/// Every VM's guest memory, from the index.
pub fn memory_of_vms(index: &crate::index::Index) -> BTreeMap<VmId, u64> {
    index
        .vms()
        .iter()
        .map(|(id, v)| (id.clone(), v.memory_bytes))
        .collect()
}

/// A whole plan on the wire, for a follower to mirror.
pub fn replicated(p: &PlanRecord, memory: &BTreeMap<VmId, u64>) -> pb::ReplicatedPlan {
    pb::ReplicatedPlan {
        plan: Some(info(p)),
        hosts: p
            .plan
            .hosts
            .iter()
            .map(|h| host(h, true, memory, p.settings.horizon_ms))
            .collect(),
        migrations: p.plan.moves.iter().map(migration).collect(),
        unresolved: p.plan.unresolved.clone(),
    }
}

/// A leader's plan back from the wire, exactly as it made it.
pub fn from_replicated(r: pb::ReplicatedPlan) -> Result<PlanRecord, String> {
    let info = r.plan.ok_or("a replicated plan without its PlanInfo")?;
    let s = info
        .settings
        .ok_or("a replicated plan without its settings")?;
    let vm =
        |v: String| -> Result<VmId, String> { v.parse().map_err(|e| format!("vm_id {v:?}: {e}")) };
    let host_id = |v: String| -> Result<wset_proto::ids::HostId, String> {
        v.parse().map_err(|e| format!("host_id {v:?}: {e}"))
    };
    let mut hosts = Vec::with_capacity(r.hosts.len());
    for h in r.hosts {
        let mut vms = Vec::with_capacity(h.vms.len());
        for v in h.vms {
            vms.push(planner::VmPlan {
                vm_id: vm(v.vm_id)?,
                demand: planner::Demand {
                    mean_bytes: v.mean_bytes,
                    std_bytes: v.std_bytes,
                    trend_bytes_per_h: v.trend_bytes_per_h,
                    phase_change_at_ms: (v.phase_change_at_ms > 0).then_some(v.phase_change_at_ms),
                    samples_used: v.samples_used as usize,
                    span_ms: v.span_ms,
                    p50_bytes: v.p50_bytes,
                    p95_bytes: v.p95_bytes,
                    max_bytes: v.max_bytes,
                    dirty_bytes_per_s: v.dirty_rate_bytes_per_s,
                    error_floor_bytes: v.error_floor_bytes,
                    lower_bound: v.lower_bound,
                },
                reclaimable_bytes: v.reclaimable_bytes,
            });
        }
        hosts.push(planner::HostPlan {
            host_id: host_id(h.host_id)?,
            capacity_bytes: h.capacity_bytes,
            committed_bytes: h.committed_bytes,
            demand_mean_bytes: h.demand_mean_bytes,
            demand_std_bytes: h.demand_std_bytes,
            demand_at_risk_bytes: h.demand_at_risk_bytes,
            overflow_probability: h.overflow_probability,
            admissible_bytes: h.admissible_bytes,
            safe_overcommit_ratio: h.safe_overcommit_ratio,
            reclaimable_bytes: h.reclaimable_bytes,
            maintenance: h.maintenance,
            groups: h.groups.into_iter().collect(),
            vms,
            explanation: h.explanation,
        });
    }
    let mut moves = Vec::with_capacity(r.migrations.len());
    for m in r.migrations {
        moves.push(planner::Move {
            vm_id: vm(m.vm_id)?,
            from: host_id(m.from_host_id)?,
            to: host_id(m.to_host_id)?,
            priority: u8::try_from(m.priority)
                .map_err(|_| format!("migration priority {} is not 1 to 5", m.priority))?,
            reason: match pb::MigrationReason::try_from(m.reason) {
                Ok(pb::MigrationReason::Maintenance) => MoveReason::Maintenance,
                Ok(pb::MigrationReason::Overload) => MoveReason::Overload,
                Ok(pb::MigrationReason::Consolidation) => MoveReason::Consolidation,
                _ => return Err(format!("migration reason {} is not known", m.reason)),
            },
            copy_bytes: m.copy_bytes,
            copy_seconds: m.copy_seconds,
            explanation: m.explanation,
        });
    }
    Ok(PlanRecord {
        id: info.plan_id,
        created_ms: info.created_ms,
        history_from_ms: info.history_from_ms,
        hosts: info.hosts,
        vms: info.vms,
        samples: info.samples,
        unreadable_vms: info.vms_without_history,
        seconds: info.planning_seconds,
        settings: planner::Config {
            risk: s.risk,
            horizon_ms: s.horizon_ms,
            lookback_ms: s.lookback_ms,
            high_watermark: s.high_watermark,
            consolidate_below: s.consolidate_below,
            link_bytes_per_s: s.link_bytes_per_s,
            max_dirty_share: s.max_dirty_share,
            hysteresis_ms: s.hysteresis_ms,
            max_moves_per_host: s.max_moves_per_host,
            cold_age_ms: s.cold_age_ms,
        },
        plan: planner::Plan {
            hosts,
            moves,
            unresolved: r.unresolved,
        },
        term: info.term,
        leader: info.leader,
    })
}

fn update(
    p: &PlanRecord,
    before: &BTreeMap<String, pb::Migration>,
) -> (pb::WatchDecisionsResponse, BTreeMap<String, pb::Migration>) {
    let now: BTreeMap<String, pb::Migration> = p
        .plan
        .moves
        .iter()
        .map(|m| (migration_id(m), migration(m)))
        .collect();
    let added = now
        .iter()
        .filter(|(k, _)| !before.contains_key(*k))
        .map(|(_, m)| m.clone())
        .collect();
    let withdrawn = before
        .iter()
        .filter(|(k, _)| !now.contains_key(*k))
        .map(|(_, m)| m.clone())
        .collect();
    (
        pb::WatchDecisionsResponse {
            plan: Some(info(p)),
            added,
            withdrawn,
            current: p.plan.moves.iter().map(migration).collect(),
            unresolved: p.plan.unresolved.clone(),
        },
        now,
    )
}

#[tonic::async_trait]
impl pb::scheduler_service_server::SchedulerService for SchedulerService {
    async fn get_overcommit(
        &self,
        req: Request<pb::GetOvercommitRequest>,
    ) -> Result<Response<pb::GetOvercommitResponse>, Status> {
        let r = req.into_inner();
        let only = crate::service::host_filter(&r.host_id)?;
        let p = self.plan(r.replan).await?;
        let memory = if r.include_vms {
            self.memory_of_vms()
        } else {
            BTreeMap::new()
        };
        let hosts: Vec<pb::HostOvercommit> = p
            .plan
            .hosts
            .iter()
            .filter(|h| only.as_ref().is_none_or(|id| h.host_id == *id))
            .map(|h| host(h, r.include_vms, &memory, p.settings.horizon_ms))
            .collect();
        if let Some(id) = &only
            && hosts.is_empty()
        {
            return Err(Status::not_found(format!(
                "host {id:?} is not in plan {} (its agent is not connected, or unknown: see ListAgents)",
                p.id
            )));
        }
        Ok(Response::new(pb::GetOvercommitResponse {
            plan: Some(info(&p)),
            hosts,
        }))
    }

    async fn list_migrations(
        &self,
        req: Request<pb::ListMigrationsRequest>,
    ) -> Result<Response<pb::ListMigrationsResponse>, Status> {
        let r = req.into_inner();
        if r.max_priority > 5 {
            return Err(Status::invalid_argument(format!(
                "max_priority {} is not 0 (all) or 1 to 5",
                r.max_priority
            )));
        }
        let p = self.plan(r.replan).await?;
        let migrations = p
            .plan
            .moves
            .iter()
            .filter(|m| r.max_priority == 0 || u32::from(m.priority) <= r.max_priority)
            .map(migration)
            .collect();
        Ok(Response::new(pb::ListMigrationsResponse {
            plan: Some(info(&p)),
            migrations,
            unresolved: p.plan.unresolved.clone(),
        }))
    }

    type WatchDecisionsStream =
        tokio_stream::wrappers::ReceiverStream<Result<pb::WatchDecisionsResponse, Status>>;

    async fn watch_decisions(
        &self,
        _req: Request<pb::WatchDecisionsRequest>,
    ) -> Result<Response<Self::WatchDecisionsStream>, Status> {
        let permit = self.streams.clone().try_acquire_owned().map_err(|_| {
            Status::resource_exhausted(format!(
                "{MAX_STREAMS} WatchDecisions streams are open already; close one"
            ))
        })?;
        // Subscribed before the first plan is taken: any change after it
        // wakes the stream, and the first plan is checked once more.
        let mut rx = self.planning.plans.subscribe();
        let replica = self.planning.replica.clone();
        let mut leadership = replica.subscribe();
        let first = self.plan(false).await?;
        replica.servable(Some(&first))?;
        let mut stop = self.stop.clone();
        let (tx, out) = tokio::sync::mpsc::channel(1);
        tokio::spawn(async move {
            let _permit = permit;
            let (msg, mut sent) = update(&first, &BTreeMap::new());
            let mut term = first.term;
            if tx.send(Ok(msg)).await.is_err() {
                return;
            }
            loop {
                tokio::select! {
                    r = rx.changed() => if r.is_err() { return },
                    r = leadership.changed() => if r.is_err() { return },
                    () = tx.closed() => return,
                    _ = stop.changed() => return,
                }
                let p = rx.borrow_and_update().clone();
                leadership.borrow_and_update();
                // Never a plan of a stale term: when the one held may not
                // be served any more, the stream ends saying why, and the
                // client reconnects to the current leader's decisions.
                if let Err(e) = replica.servable(p.as_deref()) {
                    let _ = tx.send(Err(e.into())).await;
                    return;
                }
                let Some(p) = p else { continue };
                let (msg, now) = update(&p, &sent);
                if p.term == term && msg.added.is_empty() && msg.withdrawn.is_empty() {
                    continue;
                }
                term = p.term;
                sent = now;
                if tx.send(Ok(msg)).await.is_err() {
                    return;
                }
            }
        });
        Ok(Response::new(tokio_stream::wrappers::ReceiverStream::new(
            out,
        )))
    }

    async fn rank_hosts(
        &self,
        req: Request<pb::RankHostsRequest>,
    ) -> Result<Response<pb::RankHostsResponse>, Status> {
        let r = req.into_inner();
        if r.memory_bytes == 0 || r.memory_bytes > crate::history::MAX_MEMORY_BYTES {
            return Err(Status::invalid_argument(format!(
                "memory_bytes {} must be between 1 B and 1 PiB",
                r.memory_bytes
            )));
        }
        if r.expected_wss_bytes > r.memory_bytes {
            return Err(Status::invalid_argument(format!(
                "expected_wss_bytes {} is larger than memory_bytes {}",
                r.expected_wss_bytes, r.memory_bytes
            )));
        }
        if r.labels.len() > labels::MAX_LABELS {
            return Err(Status::invalid_argument(format!(
                "labels has more than {} entries",
                labels::MAX_LABELS
            )));
        }
        let vm_id = if r.vm_id.is_empty() {
            None
        } else {
            Some(
                VmId::parse_in("vm_id", &r.vm_id)
                    .map_err(|e| Status::invalid_argument(e.to_string()))?,
            )
        };
        let p = self.plan(false).await?;
        let ranked = planner::place(
            &p.plan,
            &PlacementRequest {
                memory_bytes: r.memory_bytes,
                expected_wss_bytes: r.expected_wss_bytes,
                labels: r.labels.into_iter().collect(),
                vm_id,
            },
            &p.settings,
        );
        Ok(Response::new(pb::RankHostsResponse {
            plan: Some(info(&p)),
            hosts: ranked
                .into_iter()
                .map(|x| pb::HostRank {
                    host_id: x.host_id.into_string(),
                    fits: x.fits,
                    headroom_bytes: x.headroom_bytes,
                    explanation: x.explanation,
                    fits_when_empty: x.fits_when_empty,
                })
                .collect(),
        }))
    }

    async fn explain_decision(
        &self,
        req: Request<pb::ExplainDecisionRequest>,
    ) -> Result<Response<pb::ExplainDecisionResponse>, Status> {
        let id = req.into_inner().decision_id;
        let p = self.plan(false).await?;
        let horizon = p.settings.horizon_ms;
        let host_line = |h: &str| {
            p.plan
                .hosts
                .iter()
                .find(|x| x.host_id == h)
                .map(|x| format!("host {h}: {}", x.explanation))
        };
        let vm_line = |vm: &str| {
            p.plan
                .hosts
                .iter()
                .flat_map(|h| &h.vms)
                .find(|v| v.vm_id == vm)
                .map(|v| {
                    format!(
                        "VM {vm}: {}; {:.0} MiB reclaimable (idle {} s or more)",
                        v.demand.explain(horizon),
                        v.reclaimable_bytes as f64 / 1048576.0,
                        p.settings.cold_age_ms / 1000
                    )
                })
        };
        let not_found = || {
            Status::not_found(format!(
                "{id:?} is not a decision of plan {} (see ListMigrations, GetOvercommit)",
                p.id
            ))
        };
        let parts: Vec<&str> = id.split('/').collect();
        let (explanation, evidence) = match parts.as_slice() {
            ["migration", vm, from, to] => {
                let m = p
                    .plan
                    .moves
                    .iter()
                    .find(|m| m.vm_id == *vm && m.from == *from && m.to == *to)
                    .ok_or_else(not_found)?;
                (
                    m.explanation.clone(),
                    [vm_line(vm), host_line(from), host_line(to)]
                        .into_iter()
                        .flatten()
                        .collect(),
                )
            }
            ["host", h] => {
                let line = host_line(h).ok_or_else(not_found)?;
                let hp = p
                    .plan
                    .hosts
                    .iter()
                    .find(|x| x.host_id == *h)
                    .expect("found");
                let mut ev: Vec<String> = hp
                    .vms
                    .iter()
                    .filter_map(|v| vm_line(v.vm_id.as_str()))
                    .collect();
                ev.extend(
                    p.plan
                        .unresolved
                        .iter()
                        .filter(|u| u.starts_with(&format!("{h}:")))
                        .cloned(),
                );
                (line, ev)
            }
            ["vm", vm] => (vm_line(vm).ok_or_else(not_found)?, Vec::new()),
            _ => {
                return Err(Status::invalid_argument(format!(
                    "decision_id {:?} is not migration/<vm>/<from>/<to>, host/<host_id> or vm/<vm_id>",
                    id.chars().take(200).collect::<String>()
                )));
            }
        };
        Ok(Response::new(pb::ExplainDecisionResponse {
            plan: Some(info(&p)),
            decision_id: id.clone(),
            explanation,
            evidence,
        }))
    }
}
