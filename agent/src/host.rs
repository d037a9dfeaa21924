//! Facts about this host for `GetHostFacts` and every summary batch: memory
//! (`/proc/meminfo`), memory pressure (`/proc/pressure/memory`), the kernel,
//! and what the agent tracks. Parsing is pure and unit-tested; reading
//! `/proc` is a thin shell around it. `wire.rs` puts them on the wire.

use std::collections::BTreeMap;

use crate::registry::Registry;

/// Memory pressure (PSI): the share of time some or all tasks stalled on
/// memory, over 10 s, 60 s and 300 s, and the total stall.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct MemoryPressure {
    pub some_avg10_pct: f64,
    pub some_avg60_pct: f64,
    pub some_avg300_pct: f64,
    pub some_total_us: u64,
    pub full_avg10_pct: f64,
    pub full_avg60_pct: f64,
    pub full_avg300_pct: f64,
    pub full_total_us: u64,
}

/// The host at one instant, as the agent reports it.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct HostFacts {
    pub host_id: String,
    pub agent_instance_id: String,
    pub agent_started_ms: u64,
    pub agent_version: &'static str,
    pub kernel_release: String,
    pub timestamp_ms: u64,
    pub memory_total_bytes: u64,
    pub memory_available_bytes: u64,
    /// Guest memory of the VMs being tracked.
    pub vm_memory_committed_bytes: u64,
    pub vms_tracking: u32,
    /// `None` where the kernel has no PSI.
    pub memory_pressure: Option<MemoryPressure>,
    pub tracking_interval_ms: u64,
    pub uffd_features: String,
    pub rwp_available: bool,
    pub cpus: u32,
    pub vm_capacity_bytes: u64,
    pub labels: BTreeMap<String, String>,
}

/// Who this agent process is; fixed at start-up.
#[derive(Clone, Debug)]
pub struct Identity {
    pub host_id: String,
    /// Random per process, so a restart is visible to subscribers.
    pub instance_id: String,
    pub started_ms: u64,
    pub kernel_release: String,
    pub uffd_features: String,
    pub rwp_available: bool,
    pub cpus: u32,
    /// Memory the host gives VMs; `None`: the total less `default_reserve`.
    pub vm_capacity_bytes: Option<u64>,
    /// Operator labels (`--host-label`).
    pub labels: BTreeMap<String, String>,
}

impl Identity {
    pub fn new(
        host_id: String,
        offered_features: u64,
        vm_capacity_bytes: Option<u64>,
        labels: BTreeMap<String, String>,
    ) -> Self {
        use wset_tracker::uffd::feature;
        Self {
            host_id,
            instance_id: instance_id(),
            started_ms: crate::now_ms(),
            kernel_release: std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .map(|s| s.trim().to_owned())
                .unwrap_or_default(),
            uffd_features: feature::names(offered_features),
            rwp_available: offered_features & feature::RWP != 0,
            cpus: std::thread::available_parallelism().map_or(1, |n| n.get() as u32),
            vm_capacity_bytes,
            labels,
        }
    }
}

/// A random id: the kernel's UUID source, or time and pid where it is absent.
fn instance_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/uuid")
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| format!("{:x}-{:x}", crate::now_ms(), std::process::id()))
}

/// `MemTotal` and `MemAvailable` of a `/proc/meminfo` text, in bytes.
pub fn parse_meminfo(text: &str) -> (u64, u64) {
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .map_or(0, |kib| kib * 1024)
    };
    (field("MemTotal:"), field("MemAvailable:"))
}

/// A `/proc/pressure/memory` text: `some ...` and `full ...` lines of
/// `avg10=.. avg60=.. avg300=.. total=..`. `None` if it does not parse.
pub fn parse_psi(text: &str) -> Option<MemoryPressure> {
    let line = |kind: &str| -> Option<(f64, f64, f64, u64)> {
        let l = text.lines().find(|l| l.starts_with(kind))?;
        let get = |k: &str| {
            l.split_whitespace()
                .find_map(|kv| kv.strip_prefix(k)?.strip_prefix('='))
        };
        Some((
            get("avg10")?.parse().ok()?,
            get("avg60")?.parse().ok()?,
            get("avg300")?.parse().ok()?,
            get("total")?.parse().ok()?,
        ))
    };
    let some = line("some ")?;
    // Older kernels have no "full" line for memory; report zeros then.
    let full = line("full ").unwrap_or((0.0, 0.0, 0.0, 0));
    Some(MemoryPressure {
        some_avg10_pct: some.0,
        some_avg60_pct: some.1,
        some_avg300_pct: some.2,
        some_total_us: some.3,
        full_avg10_pct: full.0,
        full_avg60_pct: full.1,
        full_avg300_pct: full.2,
        full_total_us: full.3,
    })
}

/// Memory kept for the host itself when no VM capacity is configured: a
/// tenth of the total, at least 1 GiB, at most half.
pub fn default_reserve(total: u64) -> u64 {
    (total / 10).max(1 << 30).min(total / 2)
}

/// The host's facts now.
pub fn facts(id: &Identity, registry: &Registry, interval_ms: u64) -> HostFacts {
    let (total, available) =
        parse_meminfo(&std::fs::read_to_string("/proc/meminfo").unwrap_or_default());
    let tracking: Vec<_> = registry
        .list()
        .into_iter()
        .filter(|v| v.state == wset_tracker::TrackerState::Tracking)
        .collect();
    HostFacts {
        host_id: id.host_id.clone(),
        agent_instance_id: id.instance_id.clone(),
        agent_started_ms: id.started_ms,
        agent_version: env!("CARGO_PKG_VERSION"),
        kernel_release: id.kernel_release.clone(),
        timestamp_ms: crate::now_ms(),
        memory_total_bytes: total,
        memory_available_bytes: available,
        vm_memory_committed_bytes: tracking.iter().map(|v| v.info.memory_bytes).sum(),
        vms_tracking: tracking.len() as u32,
        memory_pressure: std::fs::read_to_string("/proc/pressure/memory")
            .ok()
            .and_then(|t| parse_psi(&t)),
        tracking_interval_ms: interval_ms,
        uffd_features: id.uffd_features.clone(),
        rwp_available: id.rwp_available,
        cpus: id.cpus,
        vm_capacity_bytes: id
            .vm_capacity_bytes
            .unwrap_or_else(|| total - default_reserve(total)),
        labels: id.labels.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn meminfo_fields_in_bytes() {
        let t =
            "MemTotal:       24554116 kB\nMemFree:        1000 kB\nMemAvailable:   23000000 kB\n";
        assert_eq!(parse_meminfo(t), (24554116 * 1024, 23000000 * 1024));
        assert_eq!(parse_meminfo("garbage"), (0, 0));
    }

    #[test]
    fn psi_lines() {
        let t = "some avg10=1.50 avg60=0.25 avg300=0.00 total=12345\nfull avg10=0.10 avg60=0.00 avg300=0.00 total=678\n";
        let p = parse_psi(t).unwrap();
        assert_eq!(p.some_avg10_pct, 1.5);
        assert_eq!(p.some_avg60_pct, 0.25);
        assert_eq!(p.some_total_us, 12345);
        assert_eq!(p.full_avg10_pct, 0.1);
        assert_eq!(p.full_total_us, 678);
        assert!(parse_psi("").is_none());
        assert!(parse_psi("some avg10=x avg60=0 avg300=0 total=1").is_none());
        // No "full" line: zeros.
        let p = parse_psi("some avg10=0.00 avg60=0.00 avg300=0.00 total=5").unwrap();
        assert_eq!((p.some_total_us, p.full_total_us), (5, 0));
    }

    #[test]
    fn reserve_for_the_host() {
        assert_eq!(default_reserve(64 << 30), (64 << 30) / 10);
        assert_eq!(default_reserve(4 << 30), 1 << 30);
        assert_eq!(default_reserve(1 << 30), 1 << 29);
    }

    #[test]
    fn this_machine_has_memory() {
        let (total, avail) =
            parse_meminfo(&std::fs::read_to_string("/proc/meminfo").expect("/proc/meminfo"));
        assert!(total > 0 && avail > 0 && avail <= total, "{total} {avail}");
    }
}
