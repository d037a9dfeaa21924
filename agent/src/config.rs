//! The agent's configuration, with embedded defaults that work on one machine
//! with no flags at all.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use wset_tracker::summary::SummaryConfig;
use wset_tracker::{AccessMode, RwpMode};

/// One listening socket, optionally tied to a snapshot memory file: MISSING
/// faults of a Firecracker VM arriving on it are served from that file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SocketConfig {
    pub path: PathBuf,
    pub snapshot: Option<PathBuf>,
}

impl std::str::FromStr for SocketConfig {
    type Err = String;
    /// `PATH` or `PATH=SNAPSHOT_MEMORY_FILE`.
    fn from_str(s: &str) -> Result<Self, String> {
        let (path, snapshot) = match s.split_once('=') {
            Some((p, f)) if !f.is_empty() => (p, Some(PathBuf::from(f))),
            Some(_) => return Err(format!("{s:?}: expected PATH or PATH=SNAPSHOT_FILE")),
            None => (s, None),
        };
        if path.is_empty() {
            return Err("empty socket path".into());
        }
        Ok(Self {
            path: PathBuf::from(path),
            snapshot,
        })
    }
}

#[derive(Clone, Debug)]
pub struct Config {
    /// Sockets VMMs connect to.
    pub sockets: Vec<SocketConfig>,
    /// Mode of the sockets (default 0660).
    pub socket_mode: u32,
    /// Address of the gRPC server.
    pub grpc_addr: SocketAddr,
    /// Address of the Prometheus metrics endpoint (`GET /metrics`); `None`: off.
    pub metrics_addr: Option<SocketAddr>,
    /// Custody files live here; keep it on a disk that survives an agent restart.
    pub state_dir: PathBuf,
    /// Tracking interval (one epoch).
    pub interval: Duration,
    /// CPUs the tracker threads are pinned to, round-robin; empty = no pinning.
    pub cpus: Vec<usize>,
    /// Peer uids allowed to register (root is always allowed).
    pub allowed_uids: Vec<u32>,
    /// Cgroups (path prefixes, whole components) a peer must run in; empty:
    /// any.
    pub allowed_cgroups: Vec<String>,
    /// Group that owns the sockets (with `socket_mode`, who may connect).
    pub socket_group: Option<u32>,
    /// Registrations admitted per second across all sockets, and the burst.
    pub registration_rate: f64,
    pub registration_burst: u32,
    /// Handshakes in progress at once.
    pub max_pending_handshakes: usize,
    /// Read tracking on shmem guests.
    pub access_mode: AccessMode,
    /// Read/write-protect mode (Linux 7.3+) where a VMM's uffd allows it.
    pub rwp: RwpMode,
    /// RWP guests on memfd or hugetlbfs memory: evict a page not accessed
    /// for this many intervals into custody (0: never).
    pub evict_cold_after: u32,
    /// Custody capacity per VM for exhaustive tracking, bytes.
    pub custody_max_bytes: u64,
    /// Largest guest memory accepted, bytes.
    pub max_vm_bytes: u64,
    /// How long a retired VM's last summary stays readable.
    pub retired_ttl: Duration,
    pub summary: SummaryConfig,
    /// The host's name in summaries (default: the kernel's hostname).
    pub host_name: String,
    /// Seed of the sample draws; `None` draws a fresh seed per VM.
    pub sample_seed: Option<u64>,
    /// On sampled memfd guests, track writes on every page (sync WP, one
    /// fault per first write per page per interval) instead of sampling them.
    pub exact_dirty: bool,
    /// How long a tracker busy-polls for its next fault before sleeping.
    pub spin: Duration,
    /// Sampled memfd guests: faults per second per VM spent re-confirming
    /// granules already known hot (0: re-arm every hot granule every interval).
    pub sample_fault_budget: u32,
    /// Summary streams (`WatchSummaries`) open at once; more are refused.
    pub max_streams: usize,
    /// Limits of the gRPC server.
    pub grpc_limits: wset_serve::ServerLimits,
    /// TLS, authorization and the plaintext policy of the gRPC server.
    pub grpc_security: wset_serve::Security,
    /// Memory the host gives VMs; `None`: the total less a reserve.
    pub vm_capacity_bytes: Option<u64>,
    /// Operator labels of the host.
    pub host_labels: BTreeMap<String, String>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            sockets: vec![SocketConfig {
                path: "/run/wset/agent.sock".into(),
                snapshot: None,
            }],
            socket_mode: 0o660,
            grpc_addr: "127.0.0.1:7070".parse().expect("static address"),
            metrics_addr: Some("127.0.0.1:7080".parse().expect("static address")),
            state_dir: "/var/lib/wset".into(),
            interval: Duration::from_millis(DEFAULT_INTERVAL_MS),
            cpus: default_cpus(),
            allowed_uids: vec![0],
            allowed_cgroups: Vec::new(),
            socket_group: None,
            registration_rate: 50.0,
            registration_burst: 200,
            max_pending_handshakes: 64,
            access_mode: AccessMode::Sampled {
                granules: DEFAULT_SAMPLE_GRANULES,
            },
            rwp: RwpMode::Async,
            evict_cold_after: 0,
            custody_max_bytes: 16 << 30,
            max_vm_bytes: 1 << 40,
            retired_ttl: Duration::from_secs(600),
            summary: SummaryConfig::default(),
            host_name: hostname(),
            sample_seed: None,
            exact_dirty: false,
            spin: Duration::from_micros(DEFAULT_SPIN_US),
            sample_fault_budget: DEFAULT_SAMPLE_FAULT_BUDGET,
            max_streams: 64,
            grpc_limits: wset_serve::ServerLimits::default(),
            grpc_security: wset_serve::Security::default(),
            vm_capacity_bytes: None,
            host_labels: BTreeMap::new(),
        }
    }
}

/// Default tracking interval (one epoch), milliseconds. Five epochs fit in
/// the shortest default window (10 s); a watched hot page faults once per
/// interval, so the guest's cost halves from a 1 s interval at the same
/// statistical error.
pub const DEFAULT_INTERVAL_MS: u64 = 2000;

impl Config {
    /// Longest gap, in intervals, between two re-arms of a hot sampled
    /// granule: one less than the shortest window, so every window still sees
    /// each hot granule's latest access.
    pub fn max_rearm_stride(&self) -> u32 {
        let interval = self.interval.as_millis().max(1) as u64;
        let shortest = self
            .summary
            .windows_ms
            .iter()
            .copied()
            .min()
            .unwrap_or(interval);
        (shortest / interval)
            .saturating_sub(1)
            .clamp(1, u32::MAX as u64) as u32
    }
}

/// Default fault budget of a sampled memfd guest, faults per second: each
/// fault a guest takes for a hot sampled page costs it a round trip through
/// the agent (about 300 µs of guest time in this project's nested test VMs,
/// tens of µs on bare metal), so 32/s keeps the worst case near 1% of one
/// vCPU. Granules never accessed stay armed whatever the budget.
pub const DEFAULT_SAMPLE_FAULT_BUDGET: u32 = 32;

/// Default busy-poll window of a tracker after each event, microseconds.
pub const DEFAULT_SPIN_US: u64 = 200;

/// Default sample size (granules) for shmem read tracking: at most ±1.5% of
/// guest memory at 95% confidence (1.96 * 0.5 / sqrt(4096)).
pub const DEFAULT_SAMPLE_GRANULES: u32 = 4096;

/// Every CPU this process may run on.
pub fn default_cpus() -> Vec<usize> {
    match nix::sched::sched_getaffinity(nix::unistd::Pid::from_raw(0)) {
        Ok(set) => (0..nix::sched::CpuSet::count())
            .filter(|&c| set.is_set(c).unwrap_or(false))
            .collect(),
        Err(_) => Vec::new(),
    }
}

pub fn hostname() -> String {
    nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_else(|| "localhost".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn socket_specs_parse() {
        assert_eq!(
            "/run/a.sock=/snap/mem".parse::<SocketConfig>().unwrap(),
            SocketConfig {
                path: "/run/a.sock".into(),
                snapshot: Some("/snap/mem".into())
            }
        );
        assert_eq!(
            "/run/a.sock".parse::<SocketConfig>().unwrap().snapshot,
            None
        );
        assert!("/run/a.sock=".parse::<SocketConfig>().is_err());
        assert!("".parse::<SocketConfig>().is_err());
    }

    #[test]
    fn defaults_are_usable() {
        let c = Config::default();
        assert_eq!(c.socket_mode, 0o660);
        assert!(!c.cpus.is_empty());
        assert!(c.interval >= Duration::from_millis(100));
        // 10 s shortest window at a 2 s interval: re-armed at least every 4.
        assert_eq!(c.max_rearm_stride(), 4);
    }
}
