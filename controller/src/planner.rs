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

use std::collections::{BTreeMap, BTreeSet, HashMap};

/// The labels with a meaning to the planner (anti-affinity, pinned).
pub use crate::labels;

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

#[derive(Clone, Debug, PartialEq, Default)]
pub struct VmInput {
    pub vm_id: String,
    pub host_id: String,
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

#[derive(Clone, Debug, PartialEq, Default)]
pub struct HostInput {
    pub host_id: String,
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
    pub vm_id: String,
    pub demand: Demand,
    /// Bytes idle at least `cold_age_ms`.
    pub reclaimable_bytes: u64,
}

#[derive(Clone, Debug, PartialEq)]
pub struct HostPlan {
    pub host_id: String,
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
    pub vm_id: String,
    pub from: String,
    pub to: String,
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

/// Standard normal CDF (Abramowitz and Stegun 7.1.26 for erf: |error| <
/// 1.5e-7).
pub fn normal_cdf(x: f64) -> f64 {
    let z = x / std::f64::consts::SQRT_2;
    let t = 1.0 / (1.0 + 0.327_591_1 * z.abs());
    let poly = t
        * (0.254_829_592
            + t * (-0.284_496_736
                + t * (1.421_413_741 + t * (-1.453_152_027 + t * 1.061_405_429))));
    let erf = 1.0 - poly * (-z * z).exp();
    0.5 * (1.0 + if z >= 0.0 { erf } else { -erf })
}

/// Standard normal quantile (Acklam's rational approximation, relative
/// error < 1.2e-9), for p in (0, 1).
pub fn normal_quantile(p: f64) -> f64 {
    let p = p.clamp(1e-12, 1.0 - 1e-12);
    const A: [f64; 6] = [
        -3.969_683_028_665_376e1,
        2.209_460_984_245_205e2,
        -2.759_285_104_469_687e2,
        1.383_577_518_672_69e2,
        -3.066_479_806_614_716e1,
        2.506_628_277_459_239,
    ];
    const B: [f64; 5] = [
        -5.447_609_879_822_406e1,
        1.615_858_368_580_409e2,
        -1.556_989_798_598_866e2,
        6.680_131_188_771_972e1,
        -1.328_068_155_288_572e1,
    ];
    const C: [f64; 6] = [
        -7.784_894_002_430_293e-3,
        -3.223_964_580_411_365e-1,
        -2.400_758_277_161_838,
        -2.549_732_539_343_734,
        4.374_664_141_464_968,
        2.938_163_982_698_783,
    ];
    const D: [f64; 4] = [
        7.784_695_709_041_462e-3,
        3.224_671_290_700_398e-1,
        2.445_134_137_142_996,
        3.754_408_661_907_416,
    ];
    let tail = |q: f64| {
        (((((C[0] * q + C[1]) * q + C[2]) * q + C[3]) * q + C[4]) * q + C[5])
            / ((((D[0] * q + D[1]) * q + D[2]) * q + D[3]) * q + 1.0)
    };
    if p < 0.02425 {
        tail((-2.0 * p.ln()).sqrt())
    } else if p > 1.0 - 0.02425 {
        -tail((-2.0 * (1.0 - p).ln()).sqrt())
    } else {
        let q = p - 0.5;
        let r = q * q;
        (((((A[0] * r + A[1]) * r + A[2]) * r + A[3]) * r + A[4]) * r + A[5]) * q
            / (((((B[0] * r + B[1]) * r + B[2]) * r + B[3]) * r + B[4]) * r + 1.0)
    }
}

fn mean_std(xs: &[f64]) -> (f64, f64) {
    if xs.is_empty() {
        return (0.0, 0.0);
    }
    let n = xs.len() as f64;
    let m = xs.iter().sum::<f64>() / n;
    let v = xs.iter().map(|x| (x - m) * (x - m)).sum::<f64>() / n;
    (m, v.sqrt())
}

/// Least-squares slope of `(t_ms, y)`, per ms.
fn slope(ts: &[f64], ys: &[f64]) -> f64 {
    let (mt, _) = mean_std(ts);
    let (my, _) = mean_std(ys);
    let num: f64 = ts.iter().zip(ys).map(|(t, y)| (t - mt) * (y - my)).sum();
    let den: f64 = ts.iter().map(|t| (t - mt) * (t - mt)).sum();
    if den > 0.0 { num / den } else { 0.0 }
}

/// The most recent phase change: the split of the samples that best
/// separates two levels (the largest between-segment sum of squares), kept
/// when the levels differ by more than three pooled standard deviations and
/// 5% of memory, with at least three samples on each side; then the same
/// within the later segment, so the latest of several changes wins.
/// Returns the index where the current phase begins.
fn phase_change(ys: &[f64], memory: f64) -> Option<usize> {
    // Prefix sums of y and y², so each split is O(1).
    let mut sum = Vec::with_capacity(ys.len() + 1);
    let mut sq = Vec::with_capacity(ys.len() + 1);
    sum.push(0.0);
    sq.push(0.0);
    for y in ys {
        sum.push(sum.last().unwrap() + y);
        sq.push(sq.last().unwrap() + y * y);
    }
    // Mean and sum of squared deviations of ys[a..b].
    let seg = |a: usize, b: usize| {
        let n = (b - a) as f64;
        let m = (sum[b] - sum[a]) / n;
        (m, ((sq[b] - sq[a]) - n * m * m).max(0.0))
    };
    let mut start = 0;
    let mut found = None;
    loop {
        let n = ys.len() - start;
        if n < 6 {
            return found;
        }
        let best = (start + 3..=ys.len() - 3)
            .map(|s| {
                let (m1, _) = seg(start, s);
                let (m2, _) = seg(s, ys.len());
                (
                    s,
                    ((s - start) * (ys.len() - s)) as f64 * (m2 - m1) * (m2 - m1),
                )
            })
            .max_by(|a, b| a.1.total_cmp(&b.1))
            .map(|(s, _)| s)?;
        let (m1, ss1) = seg(start, best);
        let (m2, ss2) = seg(best, ys.len());
        let pooled = ((ss1 + ss2) / n as f64).sqrt();
        if (m2 - m1).abs() <= (3.0 * pooled).max(0.05 * memory) {
            return found;
        }
        start = best;
        found = Some(start);
    }
}

/// A VM's demand over the horizon.
pub fn demand(vm: &VmInput, cfg: &Config, now_ms: u64) -> Demand {
    let mem = vm.memory_bytes as f64;
    let since = now_ms.saturating_sub(cfg.lookback_ms);
    let first = vm.samples.partition_point(|s| s.t_ms < since);
    let recent = &vm.samples[first..];
    if recent.is_empty() {
        return Demand {
            mean_bytes: mem,
            std_bytes: 0.0,
            trend_bytes_per_h: 0.0,
            phase_change_at_ms: None,
            samples_used: 0,
            span_ms: 0,
            p50_bytes: vm.memory_bytes,
            p95_bytes: vm.memory_bytes,
            max_bytes: vm.memory_bytes,
            dirty_bytes_per_s: 0.0,
            error_floor_bytes: 0.0,
            lower_bound: vm.lower_bound,
        };
    }
    let ys: Vec<f64> = recent.iter().map(|s| s.wss_bytes as f64).collect();
    let change = phase_change(&ys, mem);
    let from = change.unwrap_or(0);
    let used = &recent[from..];
    let ys = &ys[from..];
    let ts: Vec<f64> = used.iter().map(|s| s.t_ms as f64).collect();
    let (m, sd) = mean_std(ys);
    let per_ms = slope(&ts, ys);
    // Growth is projected over the horizon; shrinking is not (the memory
    // may be wanted back at any time).
    let last = ys[ys.len() - 1];
    let projected = if per_ms > 0.0 {
        last.max(m) + per_ms * cfg.horizon_ms as f64
    } else {
        m.max(last)
    };
    let floor = vm.relative_error * mem;
    // Percentiles by selection, not a full sort (this runs for every VM).
    let mut xs: Vec<u64> = used.iter().map(|s| s.wss_bytes).collect();
    let rank = |p: f64| ((xs.len() - 1) as f64 * p).round() as usize;
    let (k50, k95) = (rank(0.5), rank(0.95));
    let (_, &mut p95, above) = xs.select_nth_unstable(k95);
    let max = above.iter().copied().max().unwrap_or(p95).max(p95);
    let p50 = *xs[..=k95].select_nth_unstable(k50).1;
    Demand {
        mean_bytes: projected.min(mem),
        std_bytes: sd.max(floor).min(mem),
        trend_bytes_per_h: per_ms * 3.6e6,
        phase_change_at_ms: change.map(|i| recent[i].t_ms),
        samples_used: used.len(),
        span_ms: used[used.len() - 1].t_ms - used[0].t_ms,
        p50_bytes: p50,
        p95_bytes: p95,
        max_bytes: max,
        dirty_bytes_per_s: used.iter().map(|s| s.dirty_bytes_per_s).sum::<f64>()
            / used.len() as f64,
        error_floor_bytes: floor,
        lower_bound: vm.lower_bound,
    }
}

/// Bytes idle at least `cold_age_ms` in a histogram (a bucket counts when
/// its lower bound is at least that old).
fn reclaimable(vm: &VmInput, cfg: &Config) -> u64 {
    vm.idle_ages
        .iter()
        .filter(|(min, _, _)| *min >= cfg.cold_age_ms)
        .map(|(_, _, b)| b)
        .sum()
}

/// Pre-copy cost of moving a VM: bytes sent (memory, then each round the
/// pages dirtied during the previous one: a geometric series in
/// dirty/link) and seconds; `None` when it would not converge.
pub fn copy_cost(memory_bytes: u64, dirty_bytes_per_s: f64, cfg: &Config) -> Option<(f64, f64)> {
    let ratio = dirty_bytes_per_s / cfg.link_bytes_per_s;
    if !(ratio.is_finite() && ratio >= 0.0) || ratio > cfg.max_dirty_share {
        return None;
    }
    let bytes = memory_bytes as f64 / (1.0 - ratio);
    Some((bytes, bytes / cfg.link_bytes_per_s))
}

/// A host's running totals while moves are chosen.
#[derive(Clone, Debug)]
struct HostState {
    capacity: f64,
    mean: f64,
    var: f64,
    moves: u32,
    groups: BTreeMap<String, u32>,
    maintenance: bool,
}

impl HostState {
    fn at_risk(&self, z: f64) -> f64 {
        self.mean + z * self.var.sqrt()
    }
    fn with(&self, d: &Demand, z: f64) -> f64 {
        self.mean + d.mean_bytes + z * (self.var + d.std_bytes * d.std_bytes).sqrt()
    }
    fn hot(&self, z: f64, hw: f64) -> bool {
        self.at_risk(z) > hw * self.capacity
    }
}

/// `f` of every item, on all CPUs when there are many (each item's alone,
/// so the result does not depend on how the work is split), in order.
pub fn map_parallel<T: Sync, R: Send>(items: &[T], f: impl Fn(&T) -> R + Sync) -> Vec<R> {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    if threads == 1 || items.len() < 4096 {
        return items.iter().map(f).collect();
    }
    let chunk = items.len().div_ceil(threads);
    let f = &f;
    std::thread::scope(|s| {
        let parts: Vec<_> = items
            .chunks(chunk)
            .map(|c| s.spawn(move || c.iter().map(f).collect::<Vec<_>>()))
            .collect();
        parts
            .into_iter()
            .flat_map(|p| p.join().expect("a planning thread panicked"))
            .collect()
    })
}

/// How a move is described.
fn reason_name(r: MoveReason) -> &'static str {
    match r {
        MoveReason::Maintenance => "maintenance",
        MoveReason::Overload => "overload",
        MoveReason::Consolidation => "consolidation",
    }
}

fn mib(b: f64) -> f64 {
    b / 1048576.0
}

/// Why a VM is not chosen to move.
#[derive(Debug, thiserror::Error)]
enum Unmovable {
    #[error("pinned")]
    Pinned,
    #[error("already moving")]
    AlreadyMoving,
    #[error("moved {ago_s} s ago (hysteresis {hysteresis_s} s)")]
    Hysteresis { ago_s: u64, hysteresis_s: u64 },
    #[error(
        "dirties {dirty_mb_s:.0} MB/s, over {share_pct:.0}% of the {link_mb_s:.0} MB/s link: pre-copy would not converge"
    )]
    WouldNotConverge {
        dirty_mb_s: f64,
        share_pct: f64,
        link_mb_s: f64,
    },
}

/// The plan for `input`. VMs on hosts not in `input.hosts` are left out.
pub fn plan(input: &Input, cfg: &Config) -> Plan {
    Planner::new(input, cfg).plan()
}

/// One plan being made. [`Planner::new`] takes the inputs: every VM's
/// demand and every host as it stands. [`Planner::plan`] then takes the
/// steps in order: `relieve` the hosts in maintenance or over their
/// watermark (`relieve_host`, one at a time), `consolidate` nearly idle
/// ones (`empty_host`, all its VMs or none), and `explain` the hosts as
/// they stand beside the moves chosen. `movable`, `destination` and
/// `shift` are what the steps share. Pure: the time is the input's.
#[derive(Debug)]
pub struct Planner<'a> {
    input: &'a Input,
    cfg: &'a Config,
    /// The standard normal quantile of `1 - risk`.
    z: f64,
    /// Each VM's demand, in the order of `input.vms`.
    demands: Vec<Demand>,
    /// The VMs (indices into `input.vms`) on each host, in the order of
    /// `input.hosts`.
    on: Vec<Vec<usize>>,
    /// Each host as it stands, before any move.
    initial: Vec<HostState>,
    /// Each host's probability of overflowing, as it stands.
    overflow: Vec<f64>,
    /// Each host with the moves chosen so far.
    state: Vec<HostState>,
    /// Hosts by headroom under the watermark at risk (rounded), kept up to
    /// date, so the best destination is found without scanning every
    /// host: placing a VM of demand d on a host of headroom H leaves at
    /// most H - d.mean.
    by_room: BTreeSet<(i64, usize)>,
    /// VMs chosen to move.
    moved: Vec<bool>,
    moves: Vec<Move>,
    unresolved: Vec<String>,
}

impl<'a> Planner<'a> {
    /// Every VM's demand (the one its input carries, or computed, on all
    /// CPUs) and every host's totals as it stands.
    pub fn new(input: &'a Input, cfg: &'a Config) -> Self {
        let z = normal_quantile(1.0 - cfg.risk);
        let vms = &input.vms;
        let host_ix: HashMap<&str, usize> = input
            .hosts
            .iter()
            .enumerate()
            .map(|(i, h)| (h.host_id.as_str(), i))
            .collect();
        let demands = map_parallel(vms, |v| {
            v.demand
                .clone()
                .unwrap_or_else(|| demand(v, cfg, input.now_ms))
        });
        let mut on: Vec<Vec<usize>> = vec![Vec::new(); input.hosts.len()];
        for (i, v) in vms.iter().enumerate() {
            if let Some(&h) = host_ix.get(v.host_id.as_str()) {
                on[h].push(i);
            }
        }
        let initial: Vec<HostState> = input
            .hosts
            .iter()
            .enumerate()
            .map(|(h, hi)| {
                let mut st = HostState {
                    capacity: hi.capacity_bytes as f64,
                    mean: 0.0,
                    var: 0.0,
                    moves: 0,
                    groups: BTreeMap::new(),
                    maintenance: hi.maintenance,
                };
                for &i in &on[h] {
                    st.mean += demands[i].mean_bytes;
                    st.var += demands[i].std_bytes * demands[i].std_bytes;
                    if let Some(g) = labels::anti_affinity_group(&vms[i].labels) {
                        *st.groups.entry(g.to_owned()).or_default() += 1;
                    }
                }
                st
            })
            .collect();
        let overflow: Vec<f64> = initial
            .iter()
            .map(|st| {
                let sd = st.var.sqrt();
                if sd > 0.0 {
                    1.0 - normal_cdf((st.capacity - st.mean) / sd)
                } else if st.mean > st.capacity {
                    1.0
                } else {
                    0.0
                }
            })
            .collect();
        let mut planner = Self {
            input,
            cfg,
            z,
            demands,
            on,
            state: initial.clone(),
            initial,
            overflow,
            by_room: BTreeSet::new(),
            moved: vec![false; vms.len()],
            moves: Vec::new(),
            unresolved: Vec::new(),
        };
        planner.by_room = (0..planner.state.len())
            .map(|h| (planner.room(h), h))
            .collect();
        planner
    }

    /// The plan: the steps in order.
    pub fn plan(mut self) -> Plan {
        self.relieve();
        if self.cfg.consolidate_below > 0.0 {
            self.consolidate();
        }
        self.moves
            .sort_by(|a, b| a.priority.cmp(&b.priority).then(a.vm_id.cmp(&b.vm_id)));
        self.explain()
    }

    /// Host `h`'s headroom under the watermark at risk, rounded: its key in
    /// `by_room`.
    fn room(&self, h: usize) -> i64 {
        let st = &self.state[h];
        (self.cfg.high_watermark * st.capacity - st.at_risk(self.z)).round() as i64
    }

    fn host_name(&self, h: usize) -> &'a str {
        self.input.hosts[h].host_id.as_str()
    }

    /// Whether VM `i` may move, and if so the bytes and seconds pre-copy
    /// would take.
    fn movable(&self, i: usize) -> Result<(f64, f64), Unmovable> {
        let (v, cfg, now_ms) = (&self.input.vms[i], self.cfg, self.input.now_ms);
        if labels::pinned(&v.labels) {
            return Err(Unmovable::Pinned);
        }
        if self.moved[i] {
            return Err(Unmovable::AlreadyMoving);
        }
        if let Some(t) = v.last_moved_ms
            && now_ms.saturating_sub(t) < cfg.hysteresis_ms
        {
            return Err(Unmovable::Hysteresis {
                ago_s: now_ms.saturating_sub(t) / 1000,
                hysteresis_s: cfg.hysteresis_ms / 1000,
            });
        }
        let d = &self.demands[i];
        copy_cost(v.memory_bytes, d.dirty_bytes_per_s, cfg).ok_or_else(|| {
            Unmovable::WouldNotConverge {
                dirty_mb_s: d.dirty_bytes_per_s / 1e6,
                share_pct: cfg.max_dirty_share * 100.0,
                link_mb_s: cfg.link_bytes_per_s / 1e6,
            }
        })
    }

    /// The destination for VM `i` that keeps the most headroom under the
    /// watermark, other than `from` and the hosts in `exclude`, and that
    /// headroom.
    fn destination(&self, i: usize, from: usize, exclude: &[bool]) -> Option<(usize, f64)> {
        let (cfg, z) = (self.cfg, self.z);
        let d = &self.demands[i];
        let g = labels::anti_affinity_group(&self.input.vms[i].labels);
        let mut best: Option<(usize, f64)> = None;
        for &(room, h) in self.by_room.iter().rev() {
            let bound = room as f64 + 1.0 - d.mean_bytes;
            if bound < 0.0 || best.is_some_and(|(_, b)| bound < b) {
                break;
            }
            let st = &self.state[h];
            if h == from
                || exclude[h]
                || st.maintenance
                || st.moves >= cfg.max_moves_per_host
                || g.is_some_and(|g| st.groups.contains_key(g))
            {
                continue;
            }
            let keep = cfg.high_watermark * st.capacity - st.with(d, z);
            if keep >= 0.0 && best.is_none_or(|(bh, b)| keep > b || (keep == b && h < bh)) {
                best = Some((h, keep));
            }
        }
        best
    }

    /// Move VM `i` from `from` to `to` in the running state, or (`undo`)
    /// back.
    fn shift(&mut self, i: usize, from: usize, to: usize, undo: bool) {
        let d = &self.demands[i];
        let g = labels::anti_affinity_group(&self.input.vms[i].labels);
        let (src, dst) = if undo { (to, from) } else { (from, to) };
        for h in [src, dst] {
            let key = (self.room(h), h);
            self.by_room.remove(&key);
        }
        let s = &mut self.state[src];
        s.mean -= d.mean_bytes;
        s.var = (s.var - d.std_bytes * d.std_bytes).max(0.0);
        if let Some(g) = g
            && let Some(n) = s.groups.get_mut(g)
        {
            *n -= 1;
            if *n == 0 {
                s.groups.remove(g);
            }
        }
        let t = &mut self.state[dst];
        t.mean += d.mean_bytes;
        t.var += d.std_bytes * d.std_bytes;
        if let Some(g) = g {
            *t.groups.entry(g.to_owned()).or_default() += 1;
        }
        for h in [from, to] {
            if undo {
                self.state[h].moves -= 1;
            } else {
                self.state[h].moves += 1;
            }
        }
        for h in [src, dst] {
            let key = (self.room(h), h);
            self.by_room.insert(key);
        }
    }

    /// Relieve the hosts that need it: maintenance first, then by how far
    /// over their watermark they are.
    fn relieve(&mut self) {
        let (z, hw) = (self.z, self.cfg.high_watermark);
        let state = &self.state;
        let mut hot: Vec<usize> = (0..state.len())
            .filter(|&h| state[h].maintenance || state[h].hot(z, hw))
            .collect();
        hot.sort_by(|&a, &b| {
            let over = |h: usize| state[h].at_risk(z) / state[h].capacity.max(1.0);
            state[b]
                .maintenance
                .cmp(&state[a].maintenance)
                .then(over(b).total_cmp(&over(a)))
        });
        let no_exclusions = vec![false; state.len()];
        for h in hot {
            self.relieve_host(h, &no_exclusions);
        }
    }

    /// Move VMs off host `h`, cheapest relief first, until it is under its
    /// watermark (or empty, in maintenance); what is left is unresolved,
    /// with the reasons.
    fn relieve_host(&mut self, h: usize, no_exclusions: &[bool]) {
        let (input, cfg, z, hw) = (self.input, self.cfg, self.z, self.cfg.high_watermark);
        let vms = &input.vms;
        let maint = self.state[h].maintenance;
        let mut cands: Vec<(usize, f64, f64)> = Vec::new();
        let mut refused = Vec::new();
        for &i in &self.on[h] {
            match self.movable(i) {
                Ok((bytes, secs)) => cands.push((i, bytes, secs)),
                Err(why) => refused.push(format!("{}: {why}", vms[i].vm_id)),
            }
        }
        // Cheapest relief first: copy seconds per byte of demand removed.
        cands.sort_by(|a, b| {
            let r = |c: &(usize, f64, f64)| c.2 / self.demands[c.0].mean_bytes.max(1.0);
            r(a).total_cmp(&r(b))
                .then_with(|| vms[a.0].vm_id.cmp(&vms[b.0].vm_id))
        });
        let (priority, reason) = if maint {
            (1, MoveReason::Maintenance)
        } else if self.overflow[h] > 10.0 * cfg.risk {
            (2, MoveReason::Overload)
        } else if self.overflow[h] > cfg.risk {
            (3, MoveReason::Overload)
        } else {
            (4, MoveReason::Overload)
        };
        for (i, bytes, secs) in cands {
            if !maint && !self.state[h].hot(z, hw) {
                break;
            }
            if self.state[h].moves >= cfg.max_moves_per_host {
                refused.push(format!(
                    "{}: the host already has {} moves under way",
                    vms[i].vm_id, cfg.max_moves_per_host
                ));
                break;
            }
            let Some((to, keep)) = self.destination(i, h, no_exclusions) else {
                refused.push(format!(
                    "{}: no host can take {:.0} MiB at risk {} under its watermark",
                    vms[i].vm_id,
                    mib(self.demands[i].mean_bytes),
                    cfg.risk
                ));
                continue;
            };
            let before = self.state[h].at_risk(z);
            self.shift(i, h, to, false);
            self.moved[i] = true;
            let (from_name, to_name) = (self.host_name(h), self.host_name(to));
            self.moves.push(Move {
                vm_id: vms[i].vm_id.clone(),
                from: from_name.to_owned(),
                to: to_name.to_owned(),
                priority,
                reason,
                copy_bytes: bytes,
                copy_seconds: secs,
                explanation: format!(
                    "{}: host {} demand at risk {:.0} MiB -> {:.0} MiB (watermark {:.0} MiB); {} keeps {:.0} MiB of headroom; copy {:.0} MiB in {:.1} s at {:.0} MB/s (dirty {:.1} MB/s)",
                    reason_name(reason),
                    from_name,
                    mib(before),
                    mib(self.state[h].at_risk(z)),
                    mib(hw * self.state[h].capacity),
                    to_name,
                    mib(keep),
                    mib(bytes),
                    secs,
                    cfg.link_bytes_per_s / 1e6,
                    self.demands[i].dirty_bytes_per_s / 1e6
                ),
            });
        }
        let left = self.on[h].iter().filter(|&&i| !self.moved[i]).count();
        let st = &self.state[h];
        if (maint && left > 0) || (!maint && st.hot(z, hw)) {
            let name = self.host_name(h);
            self.unresolved.push(format!(
                "{}: {} after {} moves{}",
                name,
                if maint {
                    format!("{left} VMs remain on a host in maintenance")
                } else {
                    format!(
                        "demand at risk {:.0}% of capacity, over the {:.0}% watermark",
                        st.at_risk(z) / st.capacity * 100.0,
                        hw * 100.0
                    )
                },
                self.moves.iter().filter(|m| m.from == name).count(),
                if refused.is_empty() {
                    String::new()
                } else {
                    format!("; not moved: {}", refused.join(", "))
                }
            ));
        }
    }

    /// Consolidation (when `consolidate_below` is set): empty nearly idle
    /// hosts whose every VM fits elsewhere, least loaded first.
    fn consolidate(&mut self) {
        let (cfg, z) = (self.cfg, self.z);
        let state = &self.state;
        let mut idle: Vec<usize> = (0..state.len())
            .filter(|&h| {
                !state[h].maintenance
                    && state[h].moves == 0
                    && !self.on[h].is_empty()
                    && state[h].at_risk(z) < cfg.consolidate_below * state[h].capacity
            })
            .collect();
        idle.sort_by(|&a, &b| {
            state[a]
                .at_risk(z)
                .total_cmp(&state[b].at_risk(z))
                .then(a.cmp(&b))
        });
        let mut emptied = vec![false; state.len()];
        for h in idle {
            // A host that took VMs meanwhile is a destination now, not a
            // host to empty.
            if self.state[h].moves > 0 || self.on[h].len() as u32 > cfg.max_moves_per_host {
                continue;
            }
            self.empty_host(h, &mut emptied);
        }
    }

    /// Move every VM off host `h`, or none: a trial that is undone unless
    /// every VM fits elsewhere. `emptied` marks the hosts emptied (never a
    /// destination).
    fn empty_host(&mut self, h: usize, emptied: &mut [bool]) {
        let mut trial_moves = Vec::new();
        emptied[h] = true;
        let mut ok = true;
        for k in 0..self.on[h].len() {
            let i = self.on[h][k];
            let (Ok((bytes, secs)), Some((to, _))) =
                (self.movable(i), self.destination(i, h, emptied))
            else {
                ok = false;
                break;
            };
            self.shift(i, h, to, false);
            trial_moves.push((i, to, bytes, secs));
        }
        if !ok {
            for &(i, to, _, _) in trial_moves.iter().rev() {
                self.shift(i, h, to, true);
            }
            emptied[h] = false;
            return;
        }
        let cfg = self.cfg;
        for (i, to, bytes, secs) in trial_moves {
            self.moved[i] = true;
            let (from_name, to_name) = (self.host_name(h), self.host_name(to));
            self.moves.push(Move {
                vm_id: self.input.vms[i].vm_id.clone(),
                from: from_name.to_owned(),
                to: to_name.to_owned(),
                priority: 5,
                reason: MoveReason::Consolidation,
                copy_bytes: bytes,
                copy_seconds: secs,
                explanation: format!(
                    "consolidation: host {} is under {:.0}% of its capacity at risk and every VM on it fits elsewhere; {} stays under its watermark; copy {:.0} MiB in {:.1} s",
                    from_name,
                    cfg.consolidate_below * 100.0,
                    to_name,
                    mib(bytes),
                    secs
                ),
            });
        }
    }

    /// The plan: the hosts as they stand (before the moves), each with its
    /// VMs and the evidence, beside the moves chosen and what is left
    /// unresolved.
    fn explain(self) -> Plan {
        let Planner {
            input,
            cfg,
            z,
            demands,
            on,
            initial,
            overflow,
            moves,
            unresolved,
            ..
        } = self;
        let (vms, hw) = (&input.vms, cfg.high_watermark);
        let mut taken: Vec<Option<Demand>> = demands.into_iter().map(Some).collect();
        let hosts = input
            .hosts
            .iter()
            .enumerate()
            .map(|(h, hi)| {
                let st = &initial[h];
                let sd = st.var.sqrt();
                let at_risk = st.at_risk(z);
                let committed: u64 = on[h].iter().map(|&i| vms[i].memory_bytes).sum();
                let vm_plans: Vec<VmPlan> = on[h]
                    .iter()
                    .map(|&i| VmPlan {
                        vm_id: vms[i].vm_id.clone(),
                        demand: taken[i].take().expect("each VM on one host"),
                        reclaimable_bytes: reclaimable(&vms[i], cfg),
                    })
                    .collect();
                HostPlan {
                    host_id: hi.host_id.clone(),
                    capacity_bytes: hi.capacity_bytes,
                    committed_bytes: committed,
                    demand_mean_bytes: st.mean,
                    demand_std_bytes: sd,
                    demand_at_risk_bytes: at_risk,
                    overflow_probability: overflow[h],
                    admissible_bytes: (hw * st.capacity - at_risk).max(0.0) as u64,
                    safe_overcommit_ratio: if at_risk > 0.0 {
                        committed as f64 / at_risk * hw
                    } else {
                        0.0
                    },
                    reclaimable_bytes: vm_plans.iter().map(|p| p.reclaimable_bytes).sum(),
                    maintenance: hi.maintenance,
                    groups: st.groups.keys().cloned().collect(),
                    explanation: format!(
                        "{} VMs, {:.0} MiB committed on {:.0} MiB: demand {:.0} ± {:.0} MiB; at risk {} it reaches {:.0} MiB ({:.0}% of capacity, watermark {:.0}%); P(overflow) {:.2e}",
                        on[h].len(),
                        mib(committed as f64),
                        mib(st.capacity),
                        mib(st.mean),
                        mib(sd),
                        cfg.risk,
                        mib(at_risk),
                        at_risk / st.capacity.max(1.0) * 100.0,
                        hw * 100.0,
                        overflow[h]
                    ),
                    vms: vm_plans,
                }
            })
            .collect();
        Plan {
            hosts,
            moves,
            unresolved,
        }
    }
}

/// A VM to place.
#[derive(Clone, Debug, PartialEq, Default)]
pub struct PlacementRequest {
    pub memory_bytes: u64,
    /// Expected working set; 0: the whole memory.
    pub expected_wss_bytes: u64,
    pub labels: BTreeMap<String, String>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Ranked {
    pub host_id: String,
    /// Headroom under the watermark the host keeps with the VM, at risk.
    pub headroom_bytes: f64,
    pub fits: bool,
    pub explanation: String,
}

/// Hosts for a new VM, those it fits on first, most headroom kept first,
/// from a plan's view of the hosts as they stand.
pub fn place(p: &Plan, req: &PlacementRequest, cfg: &Config) -> Vec<Ranked> {
    let z = normal_quantile(1.0 - cfg.risk);
    let want = if req.expected_wss_bytes > 0 {
        req.expected_wss_bytes.min(req.memory_bytes)
    } else {
        req.memory_bytes
    } as f64;
    // Unknown VMs vary: a tenth of their demand as spread.
    let sd = want * 0.1;
    let group = labels::anti_affinity_group(&req.labels);
    let mut out: Vec<Ranked> = p
        .hosts
        .iter()
        .map(|h| {
            let at_risk = h.demand_mean_bytes
                + want
                + z * (h.demand_std_bytes * h.demand_std_bytes + sd * sd).sqrt();
            let limit = cfg.high_watermark * h.capacity_bytes as f64;
            let clash = group.is_some_and(|g| h.groups.contains(g));
            let fits = !h.maintenance && !clash && at_risk <= limit;
            let why = if h.maintenance {
                "in maintenance".to_owned()
            } else if clash {
                "a VM of the same anti-affinity group runs there".to_owned()
            } else {
                format!(
                    "demand at risk {:.0} MiB with the VM, watermark {:.0} MiB",
                    at_risk / 1048576.0,
                    limit / 1048576.0
                )
            };
            Ranked {
                host_id: h.host_id.clone(),
                headroom_bytes: limit - at_risk,
                fits,
                explanation: why,
            }
        })
        .collect();
    out.sort_by(|a, b| {
        b.fits
            .cmp(&a.fits)
            .then(b.headroom_bytes.total_cmp(&a.headroom_bytes))
            .then(a.host_id.cmp(&b.host_id))
    });
    out
}
