//! The controller's Prometheus metrics, rendered on each scrape from the
//! ingest state and the latest plan.

use std::sync::Arc;

use wset_proto::v1 as pb;
use wset_serve::metrics::{Exposition, Kind};

use crate::decide::Plans;
use crate::index::Index;
use crate::ingest::{Msg, StoreHealth};

/// Everything a scrape reads.
#[derive(Debug)]
pub struct Sources {
    /// The extender's counts, when it serves.
    pub extender: Option<Arc<crate::extender::Stats>>,
    pub index: Arc<Index>,
    pub store_health: Arc<StoreHealth>,
    pub plans: Arc<Plans>,
    pub replica: Arc<crate::replica::Replica>,
    /// The writer's queue (weak: the writer still ends when ingest does).
    pub queue: tokio::sync::mpsc::WeakSender<Msg>,
    pub store: crate::store::Store,
    pub maintained: Arc<std::sync::Mutex<crate::MaintenanceTotals>>,
}

pub fn render(s: &Sources) -> String {
    let now = crate::now_ms();
    let secs = |ms: u64| now.saturating_sub(ms) as f64 / 1000.0;
    let mut e = Exposition::new();
    e.family(
        "wset_controller_info",
        Kind::Gauge,
        "The controller and its version (value 1).",
    )
    .sample(
        "wset_controller_info",
        &[("version", env!("CARGO_PKG_VERSION"))],
        1.0,
    );

    let agents = s.index.agent_list();
    e.family(
        "wset_controller_agents",
        Kind::Gauge,
        "Agents known, by connection state.",
    );
    for state in [
        pb::AgentConnectionState::Connecting,
        pb::AgentConnectionState::Connected,
        pb::AgentConnectionState::BackingOff,
    ] {
        let n = agents.iter().filter(|a| a.state == state as i32).count();
        let name = state
            .as_str_name()
            .trim_start_matches("AGENT_CONNECTION_STATE_")
            .to_lowercase();
        e.sample("wset_controller_agents", &[("state", &name)], n as f64);
    }
    type Field = fn(&pb::AgentStatus) -> Option<f64>;
    let per_agent: [(&str, Kind, &str, Field); 8] = [
        (
            "wset_controller_agent_batches_total",
            Kind::Counter,
            "Summary batches received from the agent.",
            |a| Some(a.batches_received as f64),
        ),
        (
            "wset_controller_agent_summaries_stored_total",
            Kind::Counter,
            "VM summaries from the agent written to history.",
            |a| Some(a.summaries_stored as f64),
        ),
        (
            "wset_controller_agent_summaries_rejected_total",
            Kind::Counter,
            "VM summaries from the agent refused as malformed (never stored).",
            |a| Some(a.summaries_rejected as f64),
        ),
        (
            "wset_controller_agent_batches_skipped_total",
            Kind::Counter,
            "Batches the agent made that this subscription skipped (read too slowly): dropped events.",
            |a| Some(a.batches_skipped as f64),
        ),
        (
            "wset_controller_agent_reconnects_total",
            Kind::Counter,
            "Times the subscription to the agent was re-established.",
            |a| Some(a.reconnects as f64),
        ),
        (
            "wset_controller_ingest_lag_seconds",
            Kind::Gauge,
            "Seconds since the agent's latest batch was applied (absent before the first).",
            |a| (a.last_batch_ms > 0).then_some(a.last_batch_ms as f64),
        ),
        (
            "wset_controller_durable_lag_seconds",
            Kind::Gauge,
            "Seconds of the agent's batches not yet flushed to disk (what a controller crash would lose).",
            |a| (a.durable_through_ms > 0).then_some(a.durable_through_ms as f64),
        ),
        (
            "wset_controller_agent_clock_skew_seconds",
            Kind::Gauge,
            "Agent clock minus controller clock at the latest batch.",
            |a| (a.last_batch_ms > 0).then_some(a.clock_skew_ms as f64 / 1000.0),
        ),
    ];
    for (name, kind, help, field) in per_agent {
        e.family(name, kind, help);
        for a in &agents {
            let Some(v) = field(a) else { continue };
            let v = if name.ends_with("_lag_seconds") {
                secs(v as u64)
            } else {
                v
            };
            e.sample(name, &[("agent", &a.endpoint), ("host_id", &a.host_id)], v);
        }
    }

    let (vms, tracking) = {
        let v = s.index.vms();
        let tracking = v
            .values()
            .filter(|x| x.state == pb::VmState::Tracking as i32)
            .count();
        (v.len(), tracking)
    };
    e.family(
        "wset_controller_vms",
        Kind::Gauge,
        "VMs in the index: all ever seen, and those tracking at their latest report.",
    )
    .sample("wset_controller_vms", &[("state", "known")], vms as f64)
    .sample(
        "wset_controller_vms",
        &[("state", "tracking")],
        tracking as f64,
    );
    if let Some(q) = s.queue.upgrade() {
        e.family(
            "wset_controller_write_queue_depth",
            Kind::Gauge,
            "Batches waiting for the history writer.",
        )
        .sample(
            "wset_controller_write_queue_depth",
            &[],
            (q.max_capacity() - q.capacity()) as f64,
        );
    }

    history(&mut e, s, secs);
    replica(&mut e, &s.replica, s.plans.borrow().as_deref());

    let plan = s.plans.borrow().clone();
    if let Some(p) = plan {
        e.family(
            "wset_controller_plan_age_seconds",
            Kind::Gauge,
            "Seconds since the latest plan was made.",
        )
        .sample("wset_controller_plan_age_seconds", &[], secs(p.created_ms));
        e.family(
            "wset_controller_plan_duration_seconds",
            Kind::Gauge,
            "Time the latest plan took.",
        )
        .sample("wset_controller_plan_duration_seconds", &[], p.seconds);
        e.family(
            "wset_controller_plan_vms_without_history",
            Kind::Gauge,
            "VMs the latest plan could not read the history of (planned at their full memory).",
        )
        .sample(
            "wset_controller_plan_vms_without_history",
            &[],
            p.unreadable_vms as f64,
        );
        e.family(
            "wset_controller_plan_migrations",
            Kind::Gauge,
            "Migrations in the latest plan.",
        )
        .sample(
            "wset_controller_plan_migrations",
            &[],
            p.plan.moves.len() as f64,
        );
        e.family(
            "wset_controller_plan_unresolved_hosts",
            Kind::Gauge,
            "Hosts the latest plan leaves over their watermark (or in maintenance with VMs).",
        )
        .sample(
            "wset_controller_plan_unresolved_hosts",
            &[],
            p.plan.unresolved.len() as f64,
        );
        type HostField = fn(&crate::planner::HostPlan) -> f64;
        let per_host: [(&str, &str, HostField); 5] = [
            (
                "wset_host_overflow_probability",
                "Probability that the host's summed demand exceeds its capacity (latest plan).",
                |h| h.overflow_probability,
            ),
            (
                "wset_host_admissible_bytes",
                "Demand that may still be added under the high watermark at the configured risk.",
                |h| h.admissible_bytes as f64,
            ),
            (
                "wset_host_reclaimable_bytes",
                "Committed memory the host's VMs leave cold (safely reclaimable).",
                |h| h.reclaimable_bytes as f64,
            ),
            (
                "wset_host_safe_overcommit_ratio",
                "Guest memory per byte of capacity that keeps the host under its watermark at the configured risk.",
                |h| h.safe_overcommit_ratio,
            ),
            (
                "wset_host_demand_at_risk_bytes",
                "Summed demand exceeded only with the configured risk.",
                |h| h.demand_at_risk_bytes,
            ),
        ];
        for (name, help, field) in per_host {
            e.family(name, Kind::Gauge, help);
            for h in &p.plan.hosts {
                e.sample(name, &[("host_id", h.host_id.as_str())], field(h));
            }
        }
    }
    e.process();
    if let Some(x) = &s.extender {
        use std::sync::atomic::Ordering::Relaxed;
        e.family(
            "wset_controller_extender_calls_total",
            Kind::Counter,
            "kube-scheduler extender calls, by verb.",
        )
        .sample(
            "wset_controller_extender_calls_total",
            &[("verb", "filter")],
            x.filter_calls.load(Relaxed) as f64,
        )
        .sample(
            "wset_controller_extender_calls_total",
            &[("verb", "prioritize")],
            x.prioritize_calls.load(Relaxed) as f64,
        );
        e.family(
            "wset_controller_extender_bad_requests_total",
            Kind::Counter,
            "Extender calls refused: malformed or oversized bodies, pods with bad wset annotations.",
        )
        .sample(
            "wset_controller_extender_bad_requests_total",
            &[],
            x.bad_requests.load(Relaxed) as f64,
        );
        e.family(
            "wset_controller_extender_unplanned_total",
            Kind::Counter,
            "Extender calls answered with an error for want of a plan (no leader, no agent yet).",
        )
        .sample(
            "wset_controller_extender_unplanned_total",
            &[],
            x.unplanned.load(Relaxed) as f64,
        );
        e.family(
            "wset_controller_extender_nodes_filtered_total",
            Kind::Counter,
            "Nodes the extender's filter failed, summed over calls.",
        )
        .sample(
            "wset_controller_extender_nodes_filtered_total",
            &[],
            x.nodes_failed.load(Relaxed) as f64,
        );
    }
    e.finish()
}

/// The history store: its size and what maintenance has done.
fn history(e: &mut Exposition, s: &Sources, secs: impl Fn(u64) -> f64) {
    match s.store.size_on_disk() {
        Ok(b) => {
            e.family(
                "wset_controller_store_bytes",
                Kind::Gauge,
                "Bytes the history store takes on disk (sled's log and blobs).",
            )
            .sample("wset_controller_store_bytes", &[], b as f64);
        }
        Err(err) => tracing::debug!(error = %err, "store size for metrics"),
    }
    let h = &s.store_health;
    e.family(
        "wset_controller_store_ok",
        Kind::Gauge,
        "1 while the latest history write and flush worked, 0 while they fail.",
    )
    .sample(
        "wset_controller_store_ok",
        &[],
        if *h.ok.borrow() { 1.0 } else { 0.0 },
    );
    for (name, help, n) in [
        (
            "wset_controller_history_lost_writes_total",
            "Batches (or events) whose history write failed: lost.",
            &h.lost_writes,
        ),
        (
            "wset_controller_history_failed_flushes_total",
            "History flushes that failed.",
            &h.failed_flushes,
        ),
    ] {
        e.family(name, Kind::Counter, help).sample(
            name,
            &[],
            n.load(std::sync::atomic::Ordering::Relaxed) as f64,
        );
    }
    let t = *s.maintained.lock().unwrap_or_else(|p| p.into_inner());
    e.family(
        "wset_controller_maintenance_passes_total",
        Kind::Counter,
        "History maintenance passes (rollups, packing, retention) done.",
    )
    .sample(
        "wset_controller_maintenance_passes_total",
        &[],
        t.passes as f64,
    );
    if t.passes > 0 {
        e.family(
            "wset_controller_maintenance_duration_seconds",
            Kind::Gauge,
            "Time the latest history maintenance pass took.",
        )
        .sample(
            "wset_controller_maintenance_duration_seconds",
            &[],
            t.last_seconds,
        );
        e.family(
            "wset_controller_maintenance_age_seconds",
            Kind::Gauge,
            "Seconds since the latest history maintenance pass ended.",
        )
        .sample(
            "wset_controller_maintenance_age_seconds",
            &[],
            secs(t.last_end_ms),
        );
    }
    let m = t.done;
    e.family(
        "wset_controller_history_points_total",
        Kind::Counter,
        "History points handled by maintenance: rolled up (written into a coarser level), \
         packed (moved into a block), expired (dropped by retention).",
    );
    for (op, n) in [
        ("rolled_up", m.rollup_points),
        ("packed", m.packed_points),
        ("expired", m.expired_points),
    ] {
        e.sample(
            "wset_controller_history_points_total",
            &[("op", op)],
            n as f64,
        );
    }
    for (name, help, n) in [
        (
            "wset_controller_history_blocks_merged_total",
            "History blocks merged away into longer ones (minute blocks of raw samples into hours).",
            m.merged_blocks,
        ),
        (
            "wset_controller_maintenance_failed_series_total",
            "Series (a VM's or a host's) whose maintenance failed in a pass; the others went on.",
            m.failed_series,
        ),
        (
            "wset_controller_vms_forgotten_total",
            "VMs forgotten, unseen for longer than the longest retention.",
            m.forgotten_vms,
        ),
    ] {
        e.family(name, Kind::Counter, help)
            .sample(name, &[], n as f64);
    }
}

/// Leadership: the role, the term, the lease left, what was published.
fn replica(
    e: &mut Exposition,
    r: &crate::replica::Replica,
    plan: Option<&crate::decide::PlanRecord>,
) {
    use crate::replica::Leadership;
    let l = r.leadership();
    e.family(
        "wset_controller_replica_role",
        Kind::Gauge,
        "This replica's role (1 for the role it has): alone, leader, follower or no_quorum.",
    );
    for role in [
        pb::ReplicaRole::Alone,
        pb::ReplicaRole::Leader,
        pb::ReplicaRole::Follower,
        pb::ReplicaRole::NoQuorum,
    ] {
        let name = role
            .as_str_name()
            .trim_start_matches("REPLICA_ROLE_")
            .to_lowercase();
        let v = if l.role() == role { 1.0 } else { 0.0 };
        e.sample("wset_controller_replica_role", &[("role", &name)], v);
    }
    e.family(
        "wset_controller_leader",
        Kind::Gauge,
        "1 while this replica may publish decisions (it leads, or runs alone).",
    )
    .sample(
        "wset_controller_leader",
        &[],
        if matches!(l, Leadership::Alone | Leadership::Leader { .. }) {
            1.0
        } else {
            0.0
        },
    );
    e.family(
        "wset_controller_term",
        Kind::Gauge,
        "The latest leader's term this replica knows (0: none, or alone).",
    )
    .sample("wset_controller_term", &[], l.term().unwrap_or(0) as f64);
    e.family(
        "wset_controller_lease_remaining_seconds",
        Kind::Gauge,
        "While leading: how long this replica may still publish without a renewal.",
    )
    .sample(
        "wset_controller_lease_remaining_seconds",
        &[],
        r.lease_remaining().map_or(0.0, |d| d.as_secs_f64()),
    );
    let published: u64 = r.terms_led().iter().map(|t| t.plans).sum();
    e.family(
        "wset_controller_plans_published_total",
        Kind::Counter,
        "Plans this replica published as leader (or alone) in the terms it remembers.",
    )
    .sample(
        "wset_controller_plans_published_total",
        &[],
        published as f64,
    );
    let repair = r.repair_stats();
    e.family(
        "wset_controller_repaired_points_total",
        Kind::Counter,
        "History points copied from peer replicas into this one's gaps.",
    )
    .sample(
        "wset_controller_repaired_points_total",
        &[],
        repair.points as f64,
    );
    e.family(
        "wset_controller_repair_passes_total",
        Kind::Counter,
        "History repair passes run (each against the first peer that answers).",
    )
    .sample(
        "wset_controller_repair_passes_total",
        &[],
        repair.passes as f64,
    );
    e.family(
        "wset_controller_repair_failing",
        Kind::Gauge,
        "1 when the latest repair pass failed against every peer.",
    )
    .sample(
        "wset_controller_repair_failing",
        &[],
        if repair.error.is_empty() { 0.0 } else { 1.0 },
    );
    e.family(
        "wset_controller_plan_servable",
        Kind::Gauge,
        "1 while this replica serves a plan of the current term.",
    )
    .sample(
        "wset_controller_plan_servable",
        &[],
        if r.servable(plan).is_ok() { 1.0 } else { 0.0 },
    );
}
