//! The [`Planner`] type and its steps as named methods: relieving hosts
//! in maintenance or over their watermark, consolidating nearly idle
//! ones, and explaining the hosts beside the moves chosen; with the
//! running host totals they share.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use wset_proto::ids::HostId;

use super::demand::{copy_cost, demand, normal_cdf, normal_quantile, reclaimable};
use super::{Config, Demand, HostPlan, Input, Move, MoveReason, Plan, VmPlan, labels};

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
        let host_ix: HashMap<&HostId, usize> = input
            .hosts
            .iter()
            .enumerate()
            .map(|(i, h)| (&h.host_id, i))
            .collect();
        let demands = map_parallel(vms, |v| {
            v.demand
                .clone()
                .unwrap_or_else(|| demand(v, cfg, input.now_ms))
        });
        let mut on: Vec<Vec<usize>> = vec![Vec::new(); input.hosts.len()];
        for (i, v) in vms.iter().enumerate() {
            if let Some(&h) = host_ix.get(&v.host_id) {
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

    fn host_name(&self, h: usize) -> &'a HostId {
        &self.input.hosts[h].host_id
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
        let no_exclusions = vec![false; self.state.len()];
        let unresolved_base = self.unresolved.len();
        // Relieving one host can make room on another that an earlier host
        // needed, so pass again over the hosts still hot while a pass moves
        // anything. Every VM moves at most once, so this ends; only the last
        // pass's unresolved hosts are reported.
        loop {
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
            let moves_before = self.moves.len();
            self.unresolved.truncate(unresolved_base);
            for h in hot {
                self.relieve_host(h, &no_exclusions);
            }
            if self.moves.len() == moves_before {
                break;
            }
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
                from: from_name.clone(),
                to: to_name.clone(),
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
                self.moves.iter().filter(|m| m.from == *name).count(),
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
                from: from_name.clone(),
                to: to_name.clone(),
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
