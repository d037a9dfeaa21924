//! Placement: hosts ranked for a new VM by the headroom each keeps under
//! its watermark, from a plan's view of the hosts as they stand.

use std::collections::BTreeMap;

use wset_proto::ids::HostId;

use super::demand::normal_quantile;
use super::{Config, Plan, labels};

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
    pub host_id: HostId,
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
