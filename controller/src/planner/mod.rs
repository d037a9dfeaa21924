//! The planner: pure decisions from working-set history and host facts.
//! No IO, no clock (the time is an input), no sled, no tonic.
//!
//! - **Demand**: each VM's working set over the planning horizon as a
//!   normal distribution, from its recent samples: the samples since its
//!   last phase change, their mean and spread (never below the tracking
//!   method's stated error), and growth projected over the horizon.
//! - **Overcommit**: per host, summed demand (VMs independent: means and
//!   variances add), the demand at the configured risk (the quantile that
//!   summed demand exceeds with probability `risk`), the probability of
//!   overflowing the host, the memory still admissible, the safe overcommit
//!   ratio, and per VM the cold bytes reclaimable.
//! - **Migrations**: a set of moves that brings every host under its high
//!   watermark (or empties a host in maintenance, or consolidates a nearly
//!   idle one), cheapest relief first, each priced by pre-copy over the
//!   link; a VM dirtying faster than the link can carry is never chosen.
//! - **Placement**: hosts ranked for a new VM by the headroom each keeps.
//!
//! Every number comes with the evidence behind it. [`plan`] runs a
//! [`Planner`], whose steps are its methods: the demands and the hosts as
//! they stand ([`Planner::new`]), relieving hosts, consolidating, and the
//! explained plan; [`place`] ranks hosts from a plan.
//!
//! This file holds the inputs and outputs; `demand.rs` the statistics and
//! each VM's demand, `steps.rs` the [`Planner`], `place.rs` placement.

use std::collections::{BTreeMap, BTreeSet};

use wset_proto::ids::{HostId, VmId};

/// The labels with a meaning to the planner (anti-affinity, pinned).
pub use crate::labels;

mod demand;
mod place;
mod steps;

pub use demand::{copy_cost, demand, normal_cdf, normal_quantile};
pub use place::{PlacementRequest, Ranked, place};
pub use steps::{Planner, map_parallel};

#[derive(Clone, Debug, PartialEq)]
pub struct Config {
    /// Allowed probability that a host's summed demand exceeds its capacity.
    pub risk: f64,
    /// How far ahead demand is predicted, ms.
    pub horizon_ms: u64,
    /// How much history is read, ms.
    pub lookback_ms: u64,
    /// Hosts are kept with demand at risk below this share of capacity.
    pub high_watermark: f64,
    /// A host whose demand at risk is below this share of its capacity is
    /// emptied when every VM on it fits elsewhere (0: never).
    pub consolidate_below: f64,
    /// Bandwidth a migration may use, bytes/s.
    pub link_bytes_per_s: f64,
    /// A VM dirtying more than this share of the link never converges fast
    /// enough and is never chosen.
    pub max_dirty_share: f64,
    /// A VM moved less than this long ago is not moved again.
    pub hysteresis_ms: u64,
    /// Moves in and out of one host at once.
    pub max_moves_per_host: u32,
    /// Memory idle at least this long counts as reclaimable.
    pub cold_age_ms: u64,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            risk: 0.01,
            horizon_ms: 3_600_000,
            lookback_ms: 3_600_000,
            high_watermark: 0.85,
            consolidate_below: 0.0,
            link_bytes_per_s: 1.25e9,
            max_dirty_share: 0.5,
            hysteresis_ms: 1_800_000,
            max_moves_per_host: 2,
            cold_age_ms: 300_000,
        }
    }
}

/// One working-set sample of a VM.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Sample {
    pub t_ms: u64,
    pub wss_bytes: u64,
    pub dirty_bytes_per_s: f64,
}

#[derive(Clone, Debug, PartialEq)]
pub struct VmInput {
    pub vm_id: VmId,
    pub host_id: HostId,
    pub memory_bytes: u64,
    pub labels: BTreeMap<String, String>,
    /// Time-ordered.
    pub samples: Vec<Sample>,
    /// The demand, when the caller computed it already ([`demand`] of this
    /// VM, its samples then dropped, so that a cluster's samples are never
    /// all in memory at once); otherwise it is computed from `samples`.
    pub demand: Option<Demand>,
    /// The latest idle-age histogram: (min age ms, max age ms or 0, bytes).
    pub idle_ages: Vec<(u64, u64, u64)>,
    /// The tracking method's stated error, a fraction of memory.
    pub relative_error: f64,
    /// The method sees only some accesses: demand is at least this.
    pub lower_bound: bool,
    pub last_moved_ms: Option<u64>,
}

impl VmInput {
    /// A VM of `memory_bytes` on `host_id` with nothing else known: no
    /// labels, samples, idle ages or stated error, never moved.
    pub fn new(vm_id: VmId, host_id: HostId, memory_bytes: u64) -> Self {
        Self {
            vm_id,
            host_id,
            memory_bytes,
            labels: BTreeMap::new(),
            samples: Vec::new(),
            demand: None,
            idle_ages: Vec::new(),
            relative_error: 0.0,
            lower_bound: false,
            last_moved_ms: None,
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct HostInput {
    pub host_id: HostId,
    /// Memory VMs may use, bytes.
    pub capacity_bytes: u64,
    pub maintenance: bool,
}

#[derive(Clone, Debug, PartialEq, Default)]
pub struct Input {
    pub now_ms: u64,
    pub hosts: Vec<HostInput>,
    pub vms: Vec<VmInput>,
}

/// A VM's predicted demand over the horizon.
#[derive(Clone, Debug, PartialEq)]
pub struct Demand {
    pub mean_bytes: f64,
    pub std_bytes: f64,
    /// Growth, bytes per hour (least squares over the samples used).
    pub trend_bytes_per_h: f64,
    /// Where the samples used begin, if a phase change cut older ones off.
    pub phase_change_at_ms: Option<u64>,
    pub samples_used: usize,
    /// The time the samples used span.
    pub span_ms: u64,
    pub p50_bytes: u64,
    pub p95_bytes: u64,
    pub max_bytes: u64,
    pub dirty_bytes_per_s: f64,
    /// The floor of `std_bytes`: the tracking method's stated error.
    pub error_floor_bytes: f64,
    /// The method cannot see every access: demand is at least this.
    pub lower_bound: bool,
}

impl Demand {
    /// The evidence behind the figures, for a person (made on request: a
    /// plan of a large cluster holds hundreds of thousands of these).
    pub fn explain(&self, horizon_ms: u64) -> String {
        if self.samples_used == 0 {
            return "no working-set history in the lookback: the whole memory is assumed".into();
        }
        let mib = |b: f64| b / 1048576.0;
        let mut why = format!(
            "{} samples over {} s: p50 {:.0} MiB, p95 {:.0} MiB, max {:.0} MiB; predicted {:.0} ± {:.1} MiB (spread floored at the stated error, {:.1} MiB)",
            self.samples_used,
            self.span_ms / 1000,
            mib(self.p50_bytes as f64),
            mib(self.p95_bytes as f64),
            mib(self.max_bytes as f64),
            mib(self.mean_bytes),
            mib(self.std_bytes),
            mib(self.error_floor_bytes),
        );
        if let Some(t) = self.phase_change_at_ms {
            why.push_str(&format!(
                "; phase change at t={t} ms, earlier samples ignored"
            ));
        }
        if self.trend_bytes_per_h > 0.0 {
            why.push_str(&format!(
                "; growing {:.1} MiB/h, projected over {} min",
                mib(self.trend_bytes_per_h),
                horizon_ms / 60_000
            ));
        }
        if self.lower_bound {
            why.push_str("; a lower bound (the method cannot see every read)");
        }
        why
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct VmPlan {
    pub vm_id: VmId,
    pub demand: Demand,
    /// Bytes idle at least `cold_age_ms`.
    pub reclaimable_bytes: u64,
}

#[derive(Clone, Debug, PartialEq)]
pub struct HostPlan {
    pub host_id: HostId,
    pub capacity_bytes: u64,
    pub committed_bytes: u64,
    pub demand_mean_bytes: f64,
    pub demand_std_bytes: f64,
    /// Summed demand exceeded with probability `risk`.
    pub demand_at_risk_bytes: f64,
    /// Probability that summed demand exceeds capacity.
    pub overflow_probability: f64,
    /// Demand that may still be added under the high watermark at `risk`.
    pub admissible_bytes: u64,
    /// Guest memory per byte of capacity that keeps the host under its
    /// watermark at `risk`, if new VMs look like these.
    pub safe_overcommit_ratio: f64,
    pub reclaimable_bytes: u64,
    pub maintenance: bool,
    /// Anti-affinity groups of the VMs on the host.
    pub groups: BTreeSet<String>,
    pub vms: Vec<VmPlan>,
    pub explanation: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum MoveReason {
    Maintenance,
    Overload,
    Consolidation,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Move {
    pub vm_id: VmId,
    pub from: HostId,
    pub to: HostId,
    /// 1 (most urgent) to 5.
    pub priority: u8,
    pub reason: MoveReason,
    /// Bytes pre-copy is expected to send, and how long that takes.
    pub copy_bytes: f64,
    pub copy_seconds: f64,
    pub explanation: String,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Plan {
    pub hosts: Vec<HostPlan>,
    pub moves: Vec<Move>,
    /// Hosts left over their watermark (or in maintenance with VMs), and why.
    pub unresolved: Vec<String>,
}

/// The plan for `input`. VMs on hosts not in `input.hosts` are left out.
pub fn plan(input: &Input, cfg: &Config) -> Plan {
    Planner::new(input, cfg).plan()
}
