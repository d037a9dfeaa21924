//! The agent's configuration: its flags (`Args`, each with an embedded
//! default that works on one machine, and a `WSET_AGENT_*` environment
//! variable) and the `Config` they make; `Config::default()` is what no
//! flag at all gives.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use wset_serve::cli::{self, FlagError, Legacy};
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

/// The agent's flags. Every one has a default here and an environment
/// variable `WSET_AGENT_<FLAG>` ([`wset_serve::cli::parse`]).
#[derive(Debug, clap::Parser)]
#[command(
    name = "wset-agent",
    version,
    about = "Tracks VM guest memory working sets through userfaultfd"
)]
pub struct Args {
    /// Socket VMMs connect to; PATH=SNAPSHOT_FILE serves Firecracker MISSING
    /// faults on it from that memory file. Repeatable.
    #[arg(
        long = "socket",
        value_delimiter = ',',
        default_value = "/run/wset/agent.sock"
    )]
    sockets: Vec<SocketConfig>,
    /// Socket mode, octal.
    #[arg(long, default_value = "660", value_parser = parse_octal)]
    socket_mode: u32,
    /// gRPC listen address.
    #[arg(long, default_value = "127.0.0.1:7070")]
    grpc_addr: SocketAddr,
    /// Prometheus metrics address (GET /metrics), or "off".
    #[arg(long, default_value = "127.0.0.1:7080", value_parser = wset_serve::metrics::parse_addr)]
    metrics_addr: wset_serve::metrics::Addr,
    /// State directory (custody files).
    #[arg(long, default_value = "/var/lib/wset")]
    state_dir: PathBuf,
    // Five epochs fit in the shortest default window (10 s); a watched hot
    // page faults once per interval, so the guest's cost halves from a 1 s
    // interval at the same statistical error.
    /// Tracking interval (one epoch), e.g. 2s or 250ms.
    #[arg(long, value_name = "DURATION", default_value = "2s",
          value_parser = cli::duration().at_least(Duration::from_millis(10)))]
    interval: Duration,
    /// CPUs for tracker threads, e.g. "2,3" [default: every CPU this process may use].
    #[arg(long, value_delimiter = ',')]
    cpus: Vec<usize>,
    /// Extra peer uids allowed to register (root always is).
    #[arg(long, value_delimiter = ',')]
    allow_uid: Vec<u32>,
    /// Only peers running in these cgroups (path prefixes, e.g.
    /// /kubepods.slice; repeatable) may register [default: any cgroup].
    #[arg(long, value_delimiter = ',')]
    allow_cgroup: Vec<String>,
    /// Group (name or gid) that owns the sockets; with --socket-mode it
    /// decides who may connect at all [default: root's].
    #[arg(long, value_parser = parse_group)]
    socket_group: Option<u32>,
    /// Registrations admitted per second across all sockets.
    #[arg(long, default_value = "50",
          value_parser = cli::f64_in((std::ops::Bound::Excluded(0.0), std::ops::Bound::Unbounded)))]
    registration_rate: f64,
    /// Registrations admitted at once after a quiet spell.
    #[arg(long, default_value = "200", value_parser = clap::value_parser!(u32).range(1..))]
    registration_burst: u32,
    // 4096 granules: at most ±1.5% of guest memory at 95% confidence
    // (1.96 * 0.5 / sqrt(4096)).
    /// Read tracking on memfd guests: "off", "exhaustive", or a sample size in granules.
    #[arg(long, default_value = "4096", value_parser = parse_access)]
    access: AccessMode,
    /// Read/write-protect mode (Linux 7.3+), used wherever a VMM's uffd has
    /// UFFD_FEATURE_RWP: "async" (the kernel resolves accesses, harvested each
    /// interval), "sync" (a fault message per first access: read/write detail)
    /// or "off" (mainline methods only).
    #[arg(long, default_value = "async", value_parser = parse_rwp)]
    rwp: RwpMode,
    /// Evict cold pages of RWP guests on memfd or hugetlbfs memory: a page
    /// not accessed for this many intervals is saved to the VM's custody
    /// file (under --state-dir) and its memory freed; its next access brings
    /// it back. 0: never.
    #[arg(long, default_value = "0")]
    evict_cold_after: u32,
    /// Working-set windows, comma-separated.
    #[arg(long, value_name = "DURATION", value_delimiter = ',', default_value = "10s,1m,5m,30m",
          value_parser = cli::duration().at_least(Duration::from_millis(1)).whole_millis())]
    windows: Vec<Duration>,
    /// Lower bounds of the idle-age histogram buckets, comma-separated (0s
    /// is always one).
    #[arg(long, value_name = "DURATION", value_delimiter = ',', default_value = "0s,10s,1m,5m,30m",
          value_parser = cli::duration().whole_millis())]
    age_buckets: Vec<Duration>,
    /// Largest guest memory accepted, bytes (1099511627776: 1 TiB).
    #[arg(long, default_value = "1099511627776", value_parser = clap::value_parser!(u64).range(1..))]
    max_vm_bytes: u64,
    /// Seed of the sample draws [default: a fresh one per VM]. A fixed seed
    /// makes sampled estimates reproducible.
    #[arg(long)]
    sample_seed: Option<u64>,
    /// Writes on sampled memfd guests: "sampled" (with reads, no extra
    /// faults) or "exact" (every page, sync write-protect).
    #[arg(long, default_value = "sampled", value_parser = ["sampled", "exact"])]
    dirty: String,
    /// Restores from a snapshot file (`--socket PATH=FILE`): learn which
    /// pages the guest touches after each one and copy them in ahead of it
    /// on the next: "on" or "off".
    #[arg(long, default_value = "on", value_parser = ["on", "off"])]
    prefetch: String,
    /// How long after a restore the guest's first touches are recorded.
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = cli::duration())]
    prefetch_record: Duration,
    /// A page joins the prefetch set when the guest touched it in at least
    /// this many of the last --prefetch-history restores that could see it.
    #[arg(long, default_value = "2", value_parser = clap::value_parser!(u32).range(1..=8))]
    prefetch_min_seen: u32,
    /// How many restores (that could see a page) its membership looks back on.
    #[arg(long, default_value = "4", value_parser = clap::value_parser!(u32).range(1..=8))]
    prefetch_history: u32,
    /// One page in this many of the set is left to be faulted in on demand
    /// each restore, so that its use is still seen (0: none, and the set
    /// only grows).
    #[arg(long, default_value = "32")]
    prefetch_probe: u32,
    /// Bytes prefetched per restore, at most.
    #[arg(long, default_value = "4294967296", value_parser = clap::value_parser!(u64).range(4096..))]
    prefetch_max_bytes: u64,
    /// Track writes by synchronous write-protect on uffds without WP_ASYNC
    /// (Firecracker's), instead of soft-dirty bits: exact to the fault, but
    /// every first write to a page per interval waits for the agent, so the
    /// guest stops while no agent runs.
    #[arg(long)]
    sync_write_protect: bool,
    /// How long a tracker busy-polls for its next fault before sleeping
    /// (0: never). Spinning spares the guest the wake-up of a halted CPU per fault.
    #[arg(long, value_name = "DURATION", default_value = "200us", value_parser = cli::duration())]
    spin: Duration,
    // Each fault a guest takes for a hot sampled page costs it a round trip
    // through the agent (about 300 µs of guest time in this project's nested
    // test VMs, tens of µs on bare metal), so 32/s keeps the worst case near
    // 1% of one vCPU. Granules never accessed stay armed whatever the budget.
    /// Sampled memfd guests: faults per second per VM the agent may cause by
    /// re-confirming pages already known hot (0: every interval, no budget).
    /// Pages not known hot are always watched; the summary states the stride.
    #[arg(long, default_value = "32")]
    sample_fault_budget: u32,
    /// This host's name in summaries and host facts [default: the kernel's
    /// hostname; set it to the Kubernetes node name in a DaemonSet].
    #[arg(long)]
    host_name: Option<String>,
    /// Memory this host gives VMs, bytes [default: the total less a tenth,
    /// at least 1 GiB]: the capacity the controller's planner fills.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    vm_capacity_bytes: Option<u64>,
    /// Host labels KEY=VALUE, comma-separated; wset.io/maintenance=true asks
    /// the controller to move every VM away.
    #[arg(long = "host-label", value_delimiter = ',', value_parser = parse_label)]
    host_labels: Vec<(String, String)>,
    /// Custody capacity per VM, bytes: the most guest memory exhaustive
    /// access tracking and RWP eviction hold out of a VM at once (in a file
    /// in the state directory).
    #[arg(long, default_value = "17179869184",
          value_parser = clap::value_parser!(u64).range(4096..))]
    custody_max_bytes: u64,
    /// Summary streams (WatchSummaries) open at once; more are refused.
    #[arg(long, default_value = "64",
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    max_streams: usize,
    #[command(flatten)]
    security: wset_serve::SecurityArgs,
    /// Log as JSON lines.
    #[arg(long)]
    log_json: bool,
}

/// The agent's spellings of the previous release, accepted for one more.
const LEGACY: &[Legacy] = &[
    Legacy::env("socket", "WSET_SOCKET"),
    Legacy::env("grpc-addr", "WSET_GRPC_ADDR"),
    Legacy::env("state-dir", "WSET_STATE_DIR"),
    Legacy::renamed("interval", "interval-ms", "ms").was_env("WSET_INTERVAL_MS"),
    Legacy::env("allow-cgroup", "WSET_ALLOW_CGROUP"),
    Legacy::renamed("windows", "windows-ms", "ms"),
    Legacy::renamed("age-buckets", "age-buckets-ms", "ms"),
    Legacy::renamed("spin", "spin-us", "us"),
    Legacy::env("host-name", "WSET_HOST_NAME"),
    Legacy::env("vm-capacity-bytes", "WSET_VM_CAPACITY_BYTES"),
];

impl cli::Flags for Args {
    const ENV_PREFIX: &'static str = "WSET_AGENT_";
    const LEGACY: &'static [Legacy] = LEGACY;
    type Config = Config;

    fn log_json(&self) -> bool {
        self.log_json
    }

    fn into_config(self) -> Result<Config, FlagError> {
        let cpus = if self.cpus.is_empty() {
            default_cpus()
        } else {
            let online = default_cpus();
            if let Some(bad) = self.cpus.iter().find(|c| !online.contains(c)) {
                return Err(FlagError::new(
                    "--cpus",
                    format!("CPU {bad} is not available to this process (available: {online:?})"),
                ));
            }
            self.cpus
        };
        let host_name = match self.host_name {
            Some(h) => {
                crate::handshake::check_host_id(&h)
                    .map_err(|e| FlagError::new("--host-name", e.to_string()))?;
                h
            }
            None => hostname(),
        };
        for sock in &self.sockets {
            if let Some(file) = &sock.snapshot {
                check_snapshot(file).map_err(|problem| {
                    FlagError::new(
                        "--socket",
                        format!("{}={}: {problem}", sock.path.display(), file.display()),
                    )
                })?;
            }
        }
        if self.prefetch_min_seen > self.prefetch_history {
            return Err(FlagError::new(
                "--prefetch-min-seen",
                format!(
                    "{} is more than --prefetch-history ({}): no page could ever join",
                    self.prefetch_min_seen, self.prefetch_history
                ),
            ));
        }
        let mut age_buckets_ms: Vec<u64> = self.age_buckets.iter().map(millis).collect();
        age_buckets_ms.push(0);
        age_buckets_ms.sort_unstable();
        age_buckets_ms.dedup();
        let mut allowed_uids = vec![0];
        allowed_uids.extend(self.allow_uid);
        Ok(Config {
            sockets: self.sockets,
            socket_mode: self.socket_mode,
            grpc_addr: self.grpc_addr,
            metrics_addr: self.metrics_addr.0,
            state_dir: self.state_dir,
            interval: self.interval,
            cpus,
            allowed_uids,
            allowed_cgroups: self.allow_cgroup,
            socket_group: self.socket_group,
            registration_rate: self.registration_rate,
            registration_burst: self.registration_burst,
            max_pending_handshakes: 64,
            access_mode: self.access,
            rwp: self.rwp,
            evict_cold_after: self.evict_cold_after,
            custody_max_bytes: self.custody_max_bytes,
            max_vm_bytes: self.max_vm_bytes,
            retired_ttl: Duration::from_secs(600),
            summary: SummaryConfig {
                windows_ms: self.windows.iter().map(millis).collect(),
                age_buckets_ms,
                ..SummaryConfig::default()
            },
            host_name,
            sample_seed: self.sample_seed,
            exact_dirty: self.dirty == "exact",
            sync_write_protect: self.sync_write_protect,
            prefetch: (self.prefetch == "on").then_some(crate::prefetch::Policy {
                min_seen: self.prefetch_min_seen,
                history: self.prefetch_history,
                probe: self.prefetch_probe,
                max_bytes: self.prefetch_max_bytes,
            }),
            prefetch_record: self.prefetch_record,
            spin: self.spin,
            sample_fault_budget: self.sample_fault_budget,
            max_streams: self.max_streams,
            grpc_limits: wset_serve::ServerLimits::default(),
            grpc_security: self.security.security(),
            vm_capacity_bytes: self.vm_capacity_bytes,
            host_labels: self.host_labels.into_iter().collect(),
        })
    }
}

/// A snapshot memory file must be there, a regular file, and readable by
/// the agent, or Firecracker's first fault would find out too late.
fn check_snapshot(file: &std::path::Path) -> Result<(), String> {
    let meta = std::fs::metadata(file).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => "the snapshot memory file does not exist".to_owned(),
        _ => format!("the snapshot memory file cannot be examined: {e}"),
    })?;
    if !meta.is_file() {
        return Err(format!(
            "the snapshot memory file is not a regular file (it is a {})",
            file_kind(&meta)
        ));
    }
    std::fs::File::open(file)
        .map_err(|e| format!("the snapshot memory file cannot be opened for reading: {e}"))?;
    Ok(())
}

fn file_kind(meta: &std::fs::Metadata) -> &'static str {
    use std::os::unix::fs::FileTypeExt as _;
    let t = meta.file_type();
    if t.is_dir() {
        "directory"
    } else if t.is_fifo() {
        "FIFO"
    } else if t.is_socket() {
        "socket"
    } else if t.is_block_device() {
        "block device"
    } else if t.is_char_device() {
        "character device"
    } else {
        "special file"
    }
}

/// Whole milliseconds of a duration the flag parser checked is whole.
fn millis(d: &Duration) -> u64 {
    d.as_millis() as u64
}

fn parse_group(s: &str) -> Result<u32, String> {
    if let Ok(gid) = s.parse() {
        return Ok(gid);
    }
    match nix::unistd::Group::from_name(s) {
        Ok(Some(g)) => Ok(g.gid.as_raw()),
        Ok(None) => Err(format!("no group named {s:?}")),
        Err(e) => Err(format!("look up group {s:?}: {e}")),
    }
}

fn parse_octal(s: &str) -> Result<u32, String> {
    u32::from_str_radix(s, 8).map_err(|e| format!("{s:?} is not an octal mode: {e}"))
}

fn parse_access(s: &str) -> Result<AccessMode, String> {
    match s {
        "off" => Ok(AccessMode::Off),
        "exhaustive" => Ok(AccessMode::Exhaustive),
        n => n
            .parse::<u32>()
            .ok()
            .filter(|&g| g > 0)
            .map(|granules| AccessMode::Sampled { granules })
            .ok_or_else(|| format!("{s:?}: expected off, exhaustive, or a positive sample size")),
    }
}

fn parse_rwp(s: &str) -> Result<RwpMode, String> {
    match s {
        "async" => Ok(RwpMode::Async),
        "sync" => Ok(RwpMode::Sync),
        "off" => Ok(RwpMode::Off),
        _ => Err(format!("{s:?}: expected async, sync or off")),
    }
}

fn parse_label(l: &str) -> Result<(String, String), String> {
    let (k, v) = l
        .split_once('=')
        .ok_or_else(|| format!("{l:?}: expected KEY=VALUE"))?;
    if k.is_empty() || k.len() > 253 || v.len() > 253 {
        return Err(format!(
            "{l:?}: keys are 1 to 253 characters, values at most 253"
        ));
    }
    Ok((k.to_owned(), v.to_owned()))
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
    /// Sync write-protect where the uffd lacks WP_ASYNC (`--sync-write-protect`).
    pub sync_write_protect: bool,
    /// Learned restore prefetch for snapshot restores (`--prefetch*`), or off.
    pub prefetch: Option<crate::prefetch::Policy>,
    /// How long after a restore its first touches are recorded.
    pub prefetch_record: Duration,
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
    /// What the agent runs with when given no flag (and no environment
    /// variable): the flags' defaults.
    fn default() -> Self {
        cli::defaults::<Args>()
    }
}

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

    use wset_serve::cli::parse_args;

    #[test]
    fn default_is_what_no_flag_gives() {
        cli::check_defaults::<Args>().unwrap();
        let none = parse_args::<Args>(&[]).unwrap();
        assert!(!none.log_json);
        // The tracker's own defaults agree with the flags'.
        let tracker = SummaryConfig::default();
        assert_eq!(none.config.summary.windows_ms, tracker.windows_ms);
        assert_eq!(none.config.summary.age_buckets_ms, tracker.age_buckets_ms);
    }

    #[test]
    fn every_flag_has_a_variable_and_durations_print_as_given() {
        let help = cli::long_help::<Args>();
        for v in [
            "WSET_AGENT_SOCKET",
            "WSET_AGENT_GRPC_ADDR",
            "WSET_AGENT_METRICS_ADDR",
            "WSET_AGENT_INTERVAL",
            "WSET_AGENT_LOG_JSON",
            "WSET_AGENT_TLS_CERT",
            "WSET_AGENT_TLS_RELOAD",
            "WSET_AGENT_INSECURE_PLAINTEXT",
            "[default: 2s]",
            "[default: 200us]",
            "[default: 10s,1m,5m,30m]",
        ] {
            assert!(help.contains(v), "{v} missing from:\n{help}");
        }
    }

    #[test]
    fn old_spellings_give_the_same_config() {
        let new = parse_args::<Args>(&[
            "--interval=250ms",
            "--windows=1s,3s",
            "--age-buckets=5s",
            "--spin=50us",
            "--tls-reload=5s",
        ])
        .unwrap();
        let old = parse_args::<Args>(&[
            "--interval-ms",
            "250",
            "--windows-ms=1000,3000",
            "--age-buckets-ms",
            "5000",
            "--spin-us",
            "50",
            "--tls-reload-secs",
            "5",
        ])
        .unwrap();
        cli::same(&new.config, &old.config).unwrap();
        assert_eq!(new.config.interval, Duration::from_millis(250));
        assert_eq!(new.config.summary.windows_ms, [1000, 3000]);
        assert_eq!(new.config.summary.age_buckets_ms, [0, 5000]);
        assert!(new.deprecated.is_empty());
        assert_eq!(old.deprecated.len(), 5, "{:?}", old.deprecated);
        assert!(
            old.deprecated[0].contains("--interval-ms")
                && old.deprecated[0].contains("--interval 250ms")
        );
    }

    #[test]
    fn bad_values_are_refused_naming_the_flag() {
        for (args, want) in [
            (&["--interval", "5ms"][..], "--interval"),
            (&["--interval", "250"], "--interval"),
            (&["--interval-ms", "5"], "--interval"),
            (&["--windows", "0s"], "--windows"),
            (&["--registration-rate", "0"], "--registration-rate"),
            (&["--registration-burst", "0"], "--registration-burst"),
            (&["--max-streams", "0"], "--max-streams"),
            (&["--host-label", "nolabel"], "--host-label"),
            (&["--host-name", "bad name"], "--host-name"),
            (&["--cpus", "100000"], "--cpus"),
            (&["--access", "0"], "--access"),
        ] {
            let e = parse_args::<Args>(args).map(|_| ()).unwrap_err();
            assert!(e.contains(want), "{args:?}: {e}");
        }
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
