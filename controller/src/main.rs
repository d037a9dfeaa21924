//! `wset-controller`: collects every agent's summaries into a history in
//! sled and serves it. Flags map onto [`wset_controller::Config`]; every flag
//! has an embedded default.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use wset_controller::config::{Config, parse_duration, parse_retention};

#[derive(Debug, Parser)]
#[command(
    name = "wset-controller",
    version,
    about = "Collects wset agents' working-set summaries into history and serves it"
)]
struct Args {
    /// gRPC listen address [default: 127.0.0.1:7071].
    #[arg(long, env = "WSET_CONTROLLER_ADDR")]
    grpc_addr: Option<SocketAddr>,
    /// Prometheus metrics address (GET /metrics), or "off"
    /// [default: 127.0.0.1:7081].
    #[arg(long, env = "WSET_METRICS_ADDR", value_parser = wset_serve::metrics::parse_addr)]
    metrics_addr: Option<wset_serve::metrics::Addr>,
    /// Directory of the history store [default: /var/lib/wset/controller].
    #[arg(long, env = "WSET_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// Agent endpoints HOST:PORT, comma-separated [default: 127.0.0.1:7070,
    /// unless --agents-dns is given].
    #[arg(long, env = "WSET_AGENTS", value_delimiter = ',')]
    agents: Vec<String>,
    /// NAME:PORT whose every DNS address is an agent (a headless Service),
    /// re-resolved every --dns-refresh.
    #[arg(long, env = "WSET_AGENTS_DNS")]
    agents_dns: Option<String>,
    /// How often --agents-dns is resolved again.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    dns_refresh: Duration,
    /// One summary per VM per this period is asked of each agent.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    sample_interval: Duration,
    /// Stored series: raw=RETENTION, then BUCKET=RETENTION per rollup.
    #[arg(long, default_value = "raw=1d,1m=14d,1h=400d")]
    retention: String,
    /// How often received data is flushed to disk (what a crash can lose).
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    flush_interval: Duration,
    /// How often rollups and retention run.
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    maintain_interval: Duration,
    /// Drop and re-dial an agent stream with no batch for this long
    /// [default: 6 x --sample-interval, at least 30s].
    #[arg(long, value_parser = parse_duration)]
    stall_timeout: Option<Duration>,
    /// Longest wait between reconnection attempts.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    backoff_max: Duration,
    /// How often the planner runs on fresh history.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    plan_interval: Duration,
    /// Allowed probability that a host's summed working-set demand exceeds
    /// the memory it gives VMs.
    #[arg(long, default_value_t = 0.01)]
    risk: f64,
    /// How far ahead demand is predicted.
    #[arg(long, default_value = "1h", value_parser = parse_duration)]
    horizon: Duration,
    /// How much history each plan reads.
    #[arg(long, default_value = "1h", value_parser = parse_duration)]
    lookback: Duration,
    /// Keep each host's demand at risk under this share of its VM capacity.
    #[arg(long, default_value_t = 0.85)]
    high_watermark: f64,
    /// Empty hosts whose demand at risk is under this share of capacity when
    /// all their VMs fit elsewhere (0: never).
    #[arg(long, default_value_t = 0.0)]
    consolidate_below: f64,
    /// Bandwidth a live migration may use, Gbit/s.
    #[arg(long, default_value_t = 10.0)]
    link_gbps: f64,
    /// A VM moved less than this long ago is not moved again.
    #[arg(long, default_value = "30m", value_parser = parse_duration)]
    hysteresis: Duration,
    /// Migrations in and out of one host at once.
    #[arg(long, default_value_t = 2)]
    max_moves_per_host: u32,
    /// Memory idle this long counts as reclaimable.
    #[arg(long, default_value = "5m", value_parser = parse_duration)]
    cold_age: Duration,
    /// sled page cache, MiB.
    #[arg(long, default_value_t = 256)]
    cache_mib: u64,
    #[command(flatten)]
    security: wset_serve::SecurityArgs,
    /// Dial agents over TLS, trusting this PEM CA bundle for their
    /// certificates (re-read at every connection, so rotations apply).
    #[arg(long, env = "WSET_AGENT_TLS_CA")]
    agent_tls_ca: Option<PathBuf>,
    /// The controller's client certificate towards agents (mutual TLS).
    #[arg(long, env = "WSET_AGENT_TLS_CERT", requires_all = ["agent_tls_key", "agent_tls_ca"])]
    agent_tls_cert: Option<PathBuf>,
    /// The PEM private key of --agent-tls-cert.
    #[arg(long, env = "WSET_AGENT_TLS_KEY", requires = "agent_tls_cert")]
    agent_tls_key: Option<PathBuf>,
    /// The name agents' certificates carry [default: the --agents-dns name,
    /// else the host of each endpoint].
    #[arg(long, env = "WSET_AGENT_TLS_SERVER_NAME", requires = "agent_tls_ca")]
    agent_tls_server_name: Option<String>,
    /// Log as JSON lines.
    #[arg(long, env = "WSET_LOG_JSON")]
    log_json: bool,
}

fn config(a: Args) -> anyhow::Result<Config> {
    let mut c = Config {
        grpc_security: a.security.security(),
        ..Config::default()
    };
    c.agent_tls = a.agent_tls_ca.map(|ca| wset_serve::tls::ClientTls {
        ca,
        cert: a.agent_tls_cert,
        key: a.agent_tls_key,
        server_name: a.agent_tls_server_name.or_else(|| {
            a.agents_dns
                .as_deref()
                .and_then(|d| d.rsplit_once(':'))
                .map(|(name, _)| name.to_owned())
        }),
    });
    if let Some(x) = a.grpc_addr {
        c.grpc_addr = x;
    }
    if let Some(x) = a.metrics_addr {
        c.metrics_addr = x.0;
    }
    if let Some(x) = a.data_dir {
        c.data_dir = x;
    }
    if !a.agents.is_empty() || a.agents_dns.is_some() {
        c.agents = a.agents;
    }
    if let Some(d) = &a.agents_dns {
        anyhow::ensure!(
            d.rsplit_once(':')
                .is_some_and(|(_, p)| p.parse::<u16>().is_ok()),
            "--agents-dns {d:?}: expected NAME:PORT, e.g. wset-agent.wset.svc.cluster.local:7070"
        );
    }
    c.agents_dns = a.agents_dns;
    anyhow::ensure!(
        !a.sample_interval.is_zero(),
        "--sample-interval must be positive"
    );
    c.dns_refresh = a.dns_refresh.max(Duration::from_secs(1));
    c.sample_interval = a.sample_interval;
    c.levels = parse_retention(&a.retention).map_err(|e| anyhow::anyhow!("--retention: {e}"))?;
    c.flush_interval = a.flush_interval.max(Duration::from_millis(10));
    c.maintain_interval = a.maintain_interval.max(Duration::from_millis(100));
    c.stall_timeout = a
        .stall_timeout
        .unwrap_or_else(|| (a.sample_interval * 6).max(Duration::from_secs(30)));
    c.backoff_max = a.backoff_max.max(c.backoff_min);
    c.cache_bytes = a.cache_mib << 20;
    anyhow::ensure!(
        a.risk > 0.0 && a.risk < 0.5,
        "--risk {} must be between 0 and 0.5 (e.g. 0.01)",
        a.risk
    );
    anyhow::ensure!(
        a.high_watermark > 0.0 && a.high_watermark <= 1.0,
        "--high-watermark {} must be in (0, 1]",
        a.high_watermark
    );
    anyhow::ensure!(
        (0.0..a.high_watermark).contains(&a.consolidate_below),
        "--consolidate-below {} must be at least 0 and below --high-watermark",
        a.consolidate_below
    );
    anyhow::ensure!(a.link_gbps > 0.0, "--link-gbps must be positive");
    anyhow::ensure!(
        a.max_moves_per_host >= 1,
        "--max-moves-per-host must be at least 1"
    );
    c.plan_interval = a.plan_interval.max(Duration::from_millis(100));
    let ms = |d: Duration| d.as_millis() as u64;
    c.planner = wset_controller::planner::Config {
        risk: a.risk,
        horizon_ms: ms(a.horizon),
        lookback_ms: ms(a.lookback).max(1),
        high_watermark: a.high_watermark,
        consolidate_below: a.consolidate_below,
        link_bytes_per_s: a.link_gbps * 1e9 / 8.0,
        hysteresis_ms: ms(a.hysteresis),
        max_moves_per_host: a.max_moves_per_host,
        cold_age_ms: ms(a.cold_age),
        ..Default::default()
    };
    Ok(c)
}

/// Malloc arenas kept at most, unless `MALLOC_ARENA_MAX` says otherwise.
const MALLOC_ARENAS: i32 = 2;

/// Keep glibc's malloc to [`MALLOC_ARENAS`] arenas. By default it opens up
/// to eight per core, one for each thread that contends, and memory freed
/// in one arena is not reused by another: under load (the ingest tasks,
/// the writer thread and the store's threads handing buffers to each
/// other) that fragmentation was most of the controller's growth
/// (BENCHMARKS.md). Small allocations still go through each thread's own
/// cache without a lock. Called before any thread starts.
fn limit_malloc_arenas() {
    #[cfg(target_env = "gnu")]
    if std::env::var_os("MALLOC_ARENA_MAX").is_none() {
        // SAFETY: mallopt sets one of the allocator's tunables; no thread
        // runs yet.
        if unsafe { libc::mallopt(libc::M_ARENA_MAX, MALLOC_ARENAS) } != 1 {
            eprintln!("wset-controller: could not limit malloc to {MALLOC_ARENAS} arenas");
        }
    }
}

/// How often free heap pages are handed back to the kernel.
const TRIM_EVERY: std::time::Duration = std::time::Duration::from_secs(60);

/// Hand the heap's free pages back to the kernel every [`TRIM_EVERY`].
/// glibc's malloc keeps what is freed inside its arenas and on its own
/// returns only a free stretch at the top of the main one; the store's
/// node buffers and the batches in flight come in every size, so under the
/// load test about 30% of the controller's resident memory was free heap
/// that glibc kept (BENCHMARKS.md). `malloc_trim` releases every free page
/// of every arena, walking each under its lock (2-7 ms a call under
/// the load test).
fn trim_heap_periodically() {
    #[cfg(target_env = "gnu")]
    {
        let spawned = std::thread::Builder::new()
            .name("heap-trim".into())
            .spawn(|| {
                loop {
                    std::thread::sleep(TRIM_EVERY);
                    let t = std::time::Instant::now();
                    // SAFETY: malloc_trim takes the arenas' own locks; no
                    // pointer is passed or kept.
                    unsafe { libc::malloc_trim(0) };
                    tracing::debug!(took = ?t.elapsed(), "free heap pages returned to the kernel");
                }
            });
        if let Err(e) = spawned {
            eprintln!("wset-controller: no heap-trim thread ({e}); free heap stays with malloc");
        }
    }
}

fn main() -> std::process::ExitCode {
    use wset_serve::process;
    limit_malloc_arenas();
    trim_heap_periodically();
    let args = Args::parse();
    let json = args.log_json;
    let result = config(args).and_then(|cfg| {
        process::run(
            "wset-controller",
            json,
            wset_controller::run(cfg, process::shutdown_signal()),
        )
    });
    process::exit("wset-controller", result)
}
