//! Placement: hosts ranked for a new VM by the headroom each keeps under
//! its watermark, from a plan's view of the hosts as they stand.

use std::collections::BTreeMap;

use wset_proto::ids::{HostId, VmId};

use super::demand::normal_quantile;
use super::{Config, Plan, labels};

/// A VM to place.
#[derive(Clone, Debug, PartialEq, Default)]
pub struct PlacementRequest {
    pub memory_bytes: u64,
    /// Expected working set; 0: the whole memory.
    pub expected_wss_bytes: u64,
    pub labels: BTreeMap<String, String>,
    /// A VM the plan holds (a restart, a rescheduled pod): its measured
    /// demand, mean and spread, replaces `expected_wss_bytes`, and it is
    /// taken off the host it runs on before that host is judged.
    pub vm_id: Option<VmId>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Ranked {
    pub host_id: HostId,
    /// Headroom under the watermark the host keeps with the VM, at risk.
    pub headroom_bytes: f64,
    /// The watermark: `--high-watermark` of the memory the host gives VMs.
    pub watermark_bytes: f64,
    pub fits: bool,
    /// Whether the VM would fit were the host empty and out of
    /// maintenance: when it would not, no eviction or preemption helps.
    pub fits_when_empty: bool,
    pub maintenance: bool,
    pub explanation: String,
}

/// Hosts for a new VM, those it fits on first, most headroom kept first,
/// from a plan's view of the hosts as they stand.
pub fn place(p: &Plan, req: &PlacementRequest, cfg: &Config) -> Vec<Ranked> {
    let z = normal_quantile(1.0 - cfg.risk);
    // Where the VM runs now (every host that holds it) and what it was
    // measured to need.
    let mut on: Vec<HostId> = Vec::new();
    let mut measured = None;
    if let Some(id) = &req.vm_id {
        for h in &p.hosts {
            if let Some(v) = h.vms.iter().find(|v| &v.vm_id == id) {
                on.push(h.host_id.clone());
                measured.get_or_insert((v.demand.mean_bytes, v.demand.std_bytes));
            }
        }
    }
    let (want, sd) = match measured {
        Some((mean, std)) => (mean, std),
        None => {
            let want = if req.expected_wss_bytes > 0 {
                req.expected_wss_bytes.min(req.memory_bytes)
            } else {
                req.memory_bytes
            } as f64;
            // Unknown VMs vary: a tenth of their demand as spread.
            (want, want * 0.1)
        }
    };
    let group = labels::anti_affinity_group(&req.labels);
    let mut out: Vec<Ranked> = p
        .hosts
        .iter()
        .map(|h| {
            // The VM's own host is judged without it. Its anti-affinity
            // group there cannot be told from the VM itself, so a clash is
            // not counted on it.
            let own = on.contains(&h.host_id);
            let (mean, var) = if own {
                (
                    (h.demand_mean_bytes - want).max(0.0),
                    (h.demand_std_bytes * h.demand_std_bytes - sd * sd).max(0.0),
                )
            } else {
                (h.demand_mean_bytes, h.demand_std_bytes * h.demand_std_bytes)
            };
            let at_risk = mean + want + z * (var + sd * sd).sqrt();
            let alone = want + z * sd;
            let limit = cfg.high_watermark * h.capacity_bytes as f64;
            let clash = !own && group.is_some_and(|g| h.groups.contains(g));
            let fits = !h.maintenance && !clash && at_risk <= limit;
            let fits_when_empty = alone <= limit;
            let mib = |b: f64| b / 1048576.0;
            let why = if h.maintenance {
                "in maintenance".to_owned()
            } else if !fits_when_empty {
                format!(
                    "the VM alone needs {:.0} MiB at risk, over the host's whole watermark {:.0} MiB",
                    mib(alone),
                    mib(limit)
                )
            } else if clash {
                "a VM of the same anti-affinity group runs there".to_owned()
            } else if !fits {
                format!(
                    "short by {:.0} MiB: demand at risk {:.0} MiB with the VM, watermark {:.0} MiB",
                    mib(at_risk - limit),
                    mib(at_risk),
                    mib(limit)
                )
            } else {
                format!(
                    "demand at risk {:.0} MiB with the VM, watermark {:.0} MiB",
                    mib(at_risk),
                    mib(limit)
                )
            };
            Ranked {
                host_id: h.host_id.clone(),
                headroom_bytes: limit - at_risk,
                watermark_bytes: limit,
                fits,
                fits_when_empty,
                maintenance: h.maintenance,
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
