//! `wset-agent`: the per-host agent. Flags map onto [`wset_agent::Config`];
//! every flag has an embedded default.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use wset_agent::config::{Config, SocketConfig};
use wset_tracker::{AccessMode, RwpMode};

#[derive(Debug, Parser)]
#[command(
    name = "wset-agent",
    version,
    about = "Tracks VM guest memory working sets through userfaultfd"
)]
struct Args {
    /// Socket VMMs connect to; PATH=SNAPSHOT_FILE serves Firecracker MISSING
    /// faults on it from that memory file. Repeatable.
    #[arg(long = "socket", env = "WSET_SOCKET", value_delimiter = ',')]
    sockets: Vec<SocketConfig>,
    /// Socket mode, octal.
    #[arg(long, default_value = "660", value_parser = parse_octal)]
    socket_mode: u32,
    /// gRPC listen address.
    #[arg(long, env = "WSET_GRPC_ADDR")]
    grpc_addr: Option<SocketAddr>,
    /// Prometheus metrics address (GET /metrics), or "off"
    /// [default: 127.0.0.1:7080].
    #[arg(long, env = "WSET_METRICS_ADDR", value_parser = wset_serve::metrics::parse_addr)]
    metrics_addr: Option<wset_serve::metrics::Addr>,
    /// State directory (custody files).
    #[arg(long, env = "WSET_STATE_DIR")]
    state_dir: Option<PathBuf>,
    /// Tracking interval in milliseconds.
    #[arg(long, env = "WSET_INTERVAL_MS")]
    interval_ms: Option<u64>,
    /// CPUs for tracker threads, e.g. "2,3" (default: every CPU this process may use).
    #[arg(long, value_delimiter = ',')]
    cpus: Vec<usize>,
    /// Extra peer uids allowed to register (root always is).
    #[arg(long, value_delimiter = ',')]
    allow_uid: Vec<u32>,
    /// Only peers running in these cgroups (path prefixes, e.g.
    /// /kubepods.slice; repeatable) may register [default: any cgroup].
    #[arg(long, env = "WSET_ALLOW_CGROUP", value_delimiter = ',')]
    allow_cgroup: Vec<String>,
    /// Group (name or gid) that owns the sockets; with --socket-mode it
    /// decides who may connect at all.
    #[arg(long, value_parser = parse_group)]
    socket_group: Option<u32>,
    /// Registrations admitted per second across all sockets.
    #[arg(long, default_value_t = 50.0)]
    registration_rate: f64,
    /// Registrations admitted at once after a quiet spell.
    #[arg(long, default_value_t = 200)]
    registration_burst: u32,
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
    /// it back. 0 (the default): never.
    #[arg(long, default_value_t = 0)]
    evict_cold_after: u32,
    /// Working-set windows in milliseconds, e.g. "10000,60000,300000,1800000".
    #[arg(long, value_delimiter = ',')]
    windows_ms: Vec<u64>,
    /// Lower bounds of the idle-age histogram buckets in milliseconds, e.g. "0,10000,60000".
    #[arg(long, value_delimiter = ',')]
    age_buckets_ms: Vec<u64>,
    /// Largest guest memory accepted, bytes.
    #[arg(long)]
    max_vm_bytes: Option<u64>,
    /// Seed of the sample draws (default: a fresh one per VM). A fixed seed
    /// makes sampled estimates reproducible.
    #[arg(long)]
    sample_seed: Option<u64>,
    /// Writes on sampled memfd guests: "sampled" (with reads, no extra
    /// faults) or "exact" (every page, sync write-protect).
    #[arg(long, default_value = "sampled", value_parser = ["sampled", "exact"])]
    dirty: String,
    /// Microseconds a tracker busy-polls for its next fault before sleeping
    /// (0: never). Spinning spares the guest the wake-up of a halted CPU per fault.
    #[arg(long, default_value_t = wset_agent::config::DEFAULT_SPIN_US)]
    spin_us: u64,
    /// Sampled memfd guests: faults per second per VM the agent may cause by
    /// re-confirming pages already known hot (0: every interval, no budget).
    /// Pages not known hot are always watched; the summary states the stride.
    #[arg(long, default_value_t = wset_agent::config::DEFAULT_SAMPLE_FAULT_BUDGET)]
    sample_fault_budget: u32,
    /// This host's name in summaries and host facts (default: the kernel's
    /// hostname; set it to the Kubernetes node name in a DaemonSet).
    #[arg(long, env = "WSET_HOST_NAME")]
    host_name: Option<String>,
    /// Memory this host gives VMs, bytes (default: the total less a tenth,
    /// at least 1 GiB): the capacity the controller's planner fills.
    #[arg(long, env = "WSET_VM_CAPACITY_BYTES")]
    vm_capacity_bytes: Option<u64>,
    /// Host labels KEY=VALUE, comma-separated; wset.io/maintenance=true asks
    /// the controller to move every VM away.
    #[arg(long = "host-label", value_delimiter = ',')]
    host_labels: Vec<String>,
    /// Summary streams (WatchSummaries) open at once; more are refused.
    #[arg(long, default_value_t = 64)]
    max_streams: usize,
    #[command(flatten)]
    security: wset_serve::SecurityArgs,
    /// Log as JSON lines.
    #[arg(long, env = "WSET_LOG_JSON")]
    log_json: bool,
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

fn config(a: Args) -> anyhow::Result<Config> {
    let mut c = Config {
        grpc_security: a.security.security(),
        ..Config::default()
    };
    if !a.sockets.is_empty() {
        c.sockets = a.sockets;
    }
    c.socket_mode = a.socket_mode;
    if let Some(x) = a.grpc_addr {
        c.grpc_addr = x;
    }
    if let Some(x) = a.metrics_addr {
        c.metrics_addr = x.0;
    }
    if let Some(x) = a.state_dir {
        c.state_dir = x;
    }
    if let Some(ms) = a.interval_ms {
        anyhow::ensure!(ms >= 10, "--interval-ms {ms} is too short: at least 10 ms");
        c.interval = Duration::from_millis(ms);
    }
    if !a.cpus.is_empty() {
        let online = wset_agent::config::default_cpus();
        if let Some(bad) = a.cpus.iter().find(|c| !online.contains(c)) {
            anyhow::bail!(
                "--cpus: CPU {bad} is not available to this process (available: {online:?})"
            );
        }
        c.cpus = a.cpus;
    }
    c.allowed_uids.extend(a.allow_uid);
    c.allowed_cgroups = a.allow_cgroup;
    c.socket_group = a.socket_group;
    anyhow::ensure!(
        a.registration_rate > 0.0 && a.registration_burst > 0,
        "--registration-rate and --registration-burst must be positive"
    );
    c.registration_rate = a.registration_rate;
    c.registration_burst = a.registration_burst;
    c.access_mode = a.access;
    c.rwp = a.rwp;
    c.evict_cold_after = a.evict_cold_after;
    if !a.windows_ms.is_empty() {
        c.summary.windows_ms = a.windows_ms;
    }
    c.sample_seed = a.sample_seed;
    c.exact_dirty = a.dirty == "exact";
    c.spin = Duration::from_micros(a.spin_us);
    c.sample_fault_budget = a.sample_fault_budget;
    if !a.age_buckets_ms.is_empty() {
        let mut b = a.age_buckets_ms;
        b.sort_unstable();
        b.dedup();
        if b[0] != 0 {
            b.insert(0, 0);
        }
        c.summary.age_buckets_ms = b;
    }
    if let Some(x) = a.max_vm_bytes {
        c.max_vm_bytes = x;
    }
    if let Some(h) = a.host_name {
        wset_agent::handshake::check_host_id(&h)
            .map_err(|e| anyhow::anyhow!("--host-name: {e}"))?;
        c.host_name = h;
    }
    c.vm_capacity_bytes = a.vm_capacity_bytes;
    for l in &a.host_labels {
        let (k, v) = l
            .split_once('=')
            .ok_or_else(|| anyhow::anyhow!("--host-label {l:?}: expected KEY=VALUE"))?;
        anyhow::ensure!(
            !k.is_empty() && k.len() <= 253 && v.len() <= 253,
            "--host-label {l:?}: keys are 1 to 253 characters, values at most 253"
        );
        c.host_labels.insert(k.to_owned(), v.to_owned());
    }
    anyhow::ensure!(a.max_streams >= 1, "--max-streams must be at least 1");
    c.max_streams = a.max_streams;
    Ok(c)
}

fn main() -> std::process::ExitCode {
    use wset_serve::process;
    let args = Args::parse();
    let json = args.log_json;
    let result = config(args).and_then(|cfg| {
        process::run(
            "wset-agent",
            json,
            wset_agent::run(cfg, process::shutdown_signal()),
        )
    });
    process::exit("wset-agent", result)
}
