//! The controller's configuration: its flags (`Args`, each with an
//! embedded default that works on one machine, with an agent on
//! 127.0.0.1:7070, and a `WSET_CONTROLLER_*` environment variable) and the
//! `Config` they make; `Config::default()` is what no flag at all gives.

use std::net::SocketAddr;
use std::ops::Bound;
use std::path::PathBuf;
use std::time::Duration;

use clap::builder::ArgPredicate;
use wset_serve::cli::{self, FlagError, Legacy, duration, f64_in};

use crate::history::Level;

/// The controller's flags. Every one has a default here and an environment
/// variable `WSET_CONTROLLER_<FLAG>` ([`wset_serve::cli::parse`]).
#[derive(Debug, clap::Parser)]
#[command(
    name = "wset-controller",
    version,
    about = "Collects wset agents' working-set summaries into history and serves it"
)]
pub struct Args {
    /// gRPC listen address.
    #[arg(long, default_value = "127.0.0.1:7071")]
    grpc_addr: SocketAddr,
    /// Prometheus metrics address (GET /metrics), or "off".
    #[arg(long, default_value = "127.0.0.1:7081", value_parser = wset_serve::metrics::parse_addr)]
    metrics_addr: wset_serve::metrics::Addr,
    /// Directory of the history store.
    #[arg(long, default_value = "/var/lib/wset/controller")]
    data_dir: PathBuf,
    /// Agent endpoints HOST:PORT, comma-separated (none by default when
    /// --agents-dns is given).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "127.0.0.1:7070",
        default_value_if("agents_dns", ArgPredicate::IsPresent, None)
    )]
    agents: Vec<String>,
    /// NAME:PORT whose every DNS address is an agent (a headless Service),
    /// re-resolved every --dns-refresh.
    #[arg(long, value_parser = parse_dns_name)]
    agents_dns: Option<String>,
    /// How often --agents-dns is resolved again.
    #[arg(long, value_name = "DURATION", default_value = "30s",
          value_parser = duration().at_least(Duration::from_secs(1)))]
    dns_refresh: Duration,
    /// One summary per VM per this period is asked of each agent.
    #[arg(long, value_name = "DURATION", default_value = "10s",
          value_parser = duration().at_least(Duration::from_millis(1)).whole_millis())]
    sample_interval: Duration,
    /// Stored series: raw=RETENTION, then BUCKET=RETENTION per rollup.
    #[arg(long, default_value = DEFAULT_RETENTION)]
    retention: Retention,
    /// How often received data is flushed to disk (what a crash can lose).
    #[arg(long, value_name = "DURATION", default_value = "1s",
          value_parser = duration().at_least(Duration::from_millis(10)))]
    flush_interval: Duration,
    /// How often rollups and retention run.
    #[arg(long, value_name = "DURATION", default_value = "1m",
          value_parser = duration().at_least(Duration::from_millis(100)))]
    maintain_interval: Duration,
    /// Drop and re-dial an agent stream with no batch for this long
    /// [default: 6 x --sample-interval, at least 30s].
    #[arg(long, value_name = "DURATION",
          value_parser = duration().at_least(Duration::from_millis(1)))]
    stall_timeout: Option<Duration>,
    /// Longest wait between reconnection attempts (the first waits 500ms).
    #[arg(long, value_name = "DURATION", default_value = "30s",
          value_parser = duration().at_least(BACKOFF_MIN))]
    backoff_max: Duration,
    /// How often the planner runs on fresh history.
    #[arg(long, value_name = "DURATION", default_value = "30s",
          value_parser = duration().at_least(Duration::from_millis(100)))]
    plan_interval: Duration,
    /// Allowed probability that a host's summed working-set demand exceeds
    /// the memory it gives VMs.
    #[arg(long, default_value = "0.01",
          value_parser = f64_in((Bound::Excluded(0.0), Bound::Excluded(0.5))))]
    risk: f64,
    /// How far ahead demand is predicted.
    #[arg(long, value_name = "DURATION", default_value = "1h",
          value_parser = duration().whole_millis())]
    horizon: Duration,
    /// How much history each plan reads.
    #[arg(long, value_name = "DURATION", default_value = "1h",
          value_parser = duration().at_least(Duration::from_millis(1)).whole_millis())]
    lookback: Duration,
    /// Keep each host's demand at risk under this share of its VM capacity.
    #[arg(long, default_value = "0.85",
          value_parser = f64_in((Bound::Excluded(0.0), Bound::Included(1.0))))]
    high_watermark: f64,
    /// Empty hosts whose demand at risk is under this share of capacity when
    /// all their VMs fit elsewhere (0: never; below --high-watermark).
    #[arg(long, default_value = "0", value_parser = f64_in(0.0..1.0))]
    consolidate_below: f64,
    /// Bandwidth a live migration may use, Gbit/s.
    #[arg(long, default_value = "10",
          value_parser = f64_in((Bound::Excluded(0.0), Bound::Unbounded)))]
    link_gbps: f64,
    /// A VM moved less than this long ago is not moved again.
    #[arg(long, value_name = "DURATION", default_value = "30m",
          value_parser = duration().whole_millis())]
    hysteresis: Duration,
    /// Migrations in and out of one host at once.
    #[arg(long, default_value = "2", value_parser = clap::value_parser!(u32).range(1..))]
    max_moves_per_host: u32,
    /// Memory idle this long counts as reclaimable.
    #[arg(long, value_name = "DURATION", default_value = "5m",
          value_parser = duration().whole_millis())]
    cold_age: Duration,
    /// sled page cache, MiB.
    #[arg(long, default_value = "256",
          value_parser = clap::value_parser!(u64).range(..=(u64::MAX >> 20)))]
    cache_mib: u64,
    /// kube-scheduler extender address (POST /filter and /prioritize, HTTP
    /// JSON; the gRPC server's TLS and --authz rules, the routes named
    /// /wset.v1.Extender/filter and /prioritize), or "off".
    #[arg(long, default_value = "off", value_parser = wset_serve::metrics::parse_addr)]
    extender_addr: wset_serve::metrics::Addr,
    /// Largest extender request body, bytes (kube-scheduler sends whole
    /// node objects unless nodeCacheCapable).
    #[arg(long, default_value = "16777216",
          value_parser = clap::value_parser!(u64).range(1024..=(1 << 30)))]
    extender_max_body_bytes: u64,
    #[command(flatten)]
    security: wset_serve::SecurityArgs,
    /// Dial agents over TLS, trusting this PEM CA bundle for their
    /// certificates (re-read at every connection, so rotations apply).
    #[arg(long)]
    agent_tls_ca: Option<PathBuf>,
    /// The controller's client certificate towards agents (mutual TLS).
    #[arg(long, requires_all = ["agent_tls_key", "agent_tls_ca"])]
    agent_tls_cert: Option<PathBuf>,
    /// The PEM private key of --agent-tls-cert.
    #[arg(long, requires = "agent_tls_cert")]
    agent_tls_key: Option<PathBuf>,
    /// The name agents' certificates carry [default: the --agents-dns name,
    /// else the host of each endpoint].
    #[arg(long, requires = "agent_tls_ca")]
    agent_tls_server_name: Option<String>,
    /// etcd endpoints (HOST:PORT or URLs), comma-separated: the replicas
    /// that share them elect one leader, which alone plans. None (the
    /// default): this controller runs alone and plans.
    #[arg(long, value_delimiter = ',')]
    etcd_endpoints: Vec<String>,
    /// The election's key prefix in etcd (one per controller tier).
    #[arg(long, default_value = "/wset/controller/", value_parser = parse_prefix)]
    etcd_prefix: String,
    /// The leader's lease in etcd (whole seconds): a leader that cannot
    /// renew it stops publishing before it ends (a fifth of it early).
    #[arg(long, value_name = "DURATION", default_value = "10s",
          value_parser = duration().at_least(Duration::from_secs(2)).at_most(Duration::from_secs(3600)))]
    lease_ttl: Duration,
    /// This replica's name, unique among the replicas [default: the host
    /// name].
    #[arg(long, value_parser = parse_replica_name)]
    replica_name: Option<String>,
    /// How often a replica fills the gaps in its history from a peer.
    #[arg(long, value_name = "DURATION", default_value = "1m",
          value_parser = duration().at_least(Duration::from_secs(1)))]
    repair_interval: Duration,
    /// The HOST:PORT its peers dial for its plans [default: the address
    /// --grpc-addr binds; the host name for an unspecified IP].
    #[arg(long)]
    advertise_addr: Option<String>,
    /// Dial etcd over TLS, trusting this PEM CA bundle.
    #[arg(long)]
    etcd_tls_ca: Option<PathBuf>,
    /// The client certificate towards etcd (mutual TLS).
    #[arg(long, requires_all = ["etcd_tls_key", "etcd_tls_ca"])]
    etcd_tls_cert: Option<PathBuf>,
    /// The PEM private key of --etcd-tls-cert.
    #[arg(long, requires = "etcd_tls_cert")]
    etcd_tls_key: Option<PathBuf>,
    /// The name every etcd member's certificate carries [default: the host
    /// of the first --etcd-endpoints entry].
    #[arg(long, requires = "etcd_tls_ca")]
    etcd_tls_server_name: Option<String>,
    /// Dial peer replicas over TLS, trusting this PEM CA bundle.
    #[arg(long)]
    peer_tls_ca: Option<PathBuf>,
    /// The client certificate towards peers (mutual TLS).
    #[arg(long, requires_all = ["peer_tls_key", "peer_tls_ca"])]
    peer_tls_cert: Option<PathBuf>,
    /// The PEM private key of --peer-tls-cert.
    #[arg(long, requires = "peer_tls_cert")]
    peer_tls_key: Option<PathBuf>,
    /// Log as JSON lines.
    #[arg(long)]
    log_json: bool,
}

fn parse_prefix(s: &str) -> Result<String, String> {
    if s.is_empty() || !s.ends_with('/') {
        return Err(format!(
            "{s:?}: give a key prefix ending in '/', e.g. /wset/controller/"
        ));
    }
    Ok(s.to_owned())
}

fn parse_replica_name(s: &str) -> Result<String, String> {
    s.parse::<wset_proto::ids::HostId>()
        .map(|_| s.to_owned())
        .map_err(|e| format!("{s:?}: {e}"))
}

/// The address peers dial when no --advertise-addr is given: the bound
/// one, with the host name for an unspecified IP (0.0.0.0, ::).
pub fn advertised(bound: SocketAddr) -> String {
    if bound.ip().is_unspecified() {
        format!("{}:{}", host_name(), bound.port())
    } else {
        bound.to_string()
    }
}

/// The host's name, the default replica name.
fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_owned())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "controller".into())
}

/// The controller's spellings of the previous release, accepted for one more.
const LEGACY: &[Legacy] = &[
    Legacy::env("grpc-addr", "WSET_CONTROLLER_ADDR"),
    Legacy::env("data-dir", "WSET_DATA_DIR"),
    Legacy::env("agents", "WSET_AGENTS"),
    Legacy::env("agents-dns", "WSET_AGENTS_DNS"),
    Legacy::env("agent-tls-ca", "WSET_AGENT_TLS_CA"),
    Legacy::env("agent-tls-cert", "WSET_AGENT_TLS_CERT"),
    Legacy::env("agent-tls-key", "WSET_AGENT_TLS_KEY"),
    Legacy::env("agent-tls-server-name", "WSET_AGENT_TLS_SERVER_NAME"),
];

/// The first wait before re-dialling an agent.
const BACKOFF_MIN: Duration = Duration::from_millis(500);

impl cli::Flags for Args {
    const ENV_PREFIX: &'static str = "WSET_CONTROLLER_";
    const LEGACY: &'static [Legacy] = LEGACY;
    type Config = Config;

    fn log_json(&self) -> bool {
        self.log_json
    }

    fn into_config(self) -> Result<Config, FlagError> {
        if self.consolidate_below >= self.high_watermark {
            return Err(FlagError::new(
                "--consolidate-below",
                format!(
                    "{} must be below --high-watermark ({})",
                    self.consolidate_below, self.high_watermark
                ),
            ));
        }
        if self.lease_ttl.subsec_nanos() != 0 {
            return Err(FlagError::new(
                "--lease-ttl",
                format!(
                    "{}: give whole seconds (etcd leases count seconds)",
                    cli::format_duration(self.lease_ttl)
                ),
            ));
        }
        let ms = |d: Duration| d.as_millis() as u64;
        let dns_name = self
            .agents_dns
            .as_deref()
            .and_then(|d| d.rsplit_once(':'))
            .map(|(name, _)| name.to_owned());
        Ok(Config {
            grpc_addr: self.grpc_addr,
            metrics_addr: self.metrics_addr.0,
            data_dir: self.data_dir,
            agents: self.agents,
            agents_dns: self.agents_dns,
            dns_refresh: self.dns_refresh,
            sample_interval: self.sample_interval,
            levels: self.retention.0,
            flush_interval: self.flush_interval,
            maintain_interval: self.maintain_interval,
            stall_timeout: self
                .stall_timeout
                .unwrap_or_else(|| (self.sample_interval * 6).max(Duration::from_secs(30))),
            backoff_min: BACKOFF_MIN,
            backoff_max: self.backoff_max,
            max_batch_bytes: 64 << 20,
            cache_bytes: self.cache_mib << 20,
            max_query_span: Duration::from_millis(400 * DAY_MS),
            grpc_limits: wset_serve::ServerLimits::default(),
            grpc_security: self.security.security(),
            extender_addr: self.extender_addr.0,
            extender_max_body_bytes: self.extender_max_body_bytes as usize,
            agent_tls: self.agent_tls_ca.map(|ca| wset_serve::tls::ClientTls {
                ca,
                cert: self.agent_tls_cert,
                key: self.agent_tls_key,
                server_name: self.agent_tls_server_name.or(dns_name),
            }),
            replica_name: self.replica_name.unwrap_or_else(host_name),
            advertise_addr: self.advertise_addr,
            repair_interval: self.repair_interval,
            etcd: (!self.etcd_endpoints.is_empty()).then(|| crate::replica::etcd::EtcdConfig {
                endpoints: self.etcd_endpoints,
                prefix: self.etcd_prefix,
                lease_ttl: self.lease_ttl,
                tls: self.etcd_tls_ca.map(|ca| wset_serve::tls::ClientTls {
                    ca,
                    cert: self.etcd_tls_cert,
                    key: self.etcd_tls_key,
                    server_name: self.etcd_tls_server_name,
                }),
            }),
            peer_tls: self.peer_tls_ca.map(|ca| wset_serve::tls::ClientTls {
                ca,
                cert: self.peer_tls_cert,
                key: self.peer_tls_key,
                server_name: None,
            }),
            plan_interval: self.plan_interval,
            planner: crate::planner::Config {
                risk: self.risk,
                horizon_ms: ms(self.horizon),
                lookback_ms: ms(self.lookback),
                high_watermark: self.high_watermark,
                consolidate_below: self.consolidate_below,
                link_bytes_per_s: self.link_gbps * 1e9 / 8.0,
                hysteresis_ms: ms(self.hysteresis),
                max_moves_per_host: self.max_moves_per_host,
                cold_age_ms: ms(self.cold_age),
                ..Default::default()
            },
        })
    }
}

fn parse_dns_name(d: &str) -> Result<String, DnsNameError> {
    if d.rsplit_once(':')
        .is_some_and(|(n, p)| !n.is_empty() && p.parse::<u16>().is_ok())
    {
        Ok(d.to_owned())
    } else {
        Err(DnsNameError(d.to_owned()))
    }
}

/// An `--agents-dns` value that is not NAME:PORT.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("--agents-dns {0:?}: expected NAME:PORT, e.g. wset-agent.wset.svc.cluster.local:7070")]
pub struct DnsNameError(pub String);

/// A `--retention` value that does not describe a valid set of series.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RetentionError {
    #[error("--retention entry {0:?}: expected BUCKET=RETENTION, e.g. 1m=14d")]
    NotAPair(String),
    #[error("--retention: the first entry must be raw=RETENTION, not {0:?}")]
    RawFirst(String),
    #[error("--retention entry {part:?}: {source}")]
    Duration {
        part: String,
        source: wset_serve::cli::DurationError,
    },
    #[error("--retention entry {0:?}: give whole milliseconds")]
    SubMillisecond(String),
    #[error("--retention entry {0:?}: retention must be positive")]
    NotPositive(String),
    #[error(
        "--retention entry {part:?}: each bucket must be a multiple of the one before ({prev_ms} ms)"
    )]
    BucketNotMultiple { part: String, prev_ms: u64 },
    #[error(
        "--retention entry {part:?}: the series before it is kept {prev_ms} ms, not longer than this bucket"
    )]
    KeptTooShort { part: String, prev_ms: u64 },
}

#[derive(Clone, Debug)]
pub struct Config {
    /// Address of the controller's gRPC server.
    pub grpc_addr: SocketAddr,
    /// Address of the Prometheus metrics endpoint (`GET /metrics`); `None`: off.
    pub metrics_addr: Option<SocketAddr>,
    /// The sled store lives here.
    pub data_dir: PathBuf,
    /// Agent endpoints (`host:port`) subscribed to always.
    pub agents: Vec<String>,
    /// A DNS name (`name:port`, e.g. a headless Service) whose every address
    /// is an agent.
    pub agents_dns: Option<String>,
    pub dns_refresh: Duration,
    /// One summary per VM per this period is asked of each agent.
    pub sample_interval: Duration,
    /// Stored series: raw first, then rollups by growing bucket.
    pub levels: Vec<Level>,
    /// How often writes are made durable.
    pub flush_interval: Duration,
    /// How often rollups and retention run.
    pub maintain_interval: Duration,
    /// A stream with no batch for this long is dropped and re-dialled.
    pub stall_timeout: Duration,
    pub backoff_min: Duration,
    pub backoff_max: Duration,
    /// Largest batch message accepted from an agent.
    pub max_batch_bytes: usize,
    /// sled's page cache.
    pub cache_bytes: u64,
    /// Longest time range one history query may span.
    pub max_query_span: Duration,
    pub grpc_limits: wset_serve::ServerLimits,
    /// TLS, authorization and the plaintext policy of the gRPC server (and
    /// of the extender's).
    pub grpc_security: wset_serve::Security,
    /// The kube-scheduler extender's address; `None`: off.
    pub extender_addr: Option<SocketAddr>,
    pub extender_max_body_bytes: usize,
    /// TLS towards the agents (`None`: plaintext).
    pub agent_tls: Option<wset_serve::tls::ClientTls>,
    /// How often the planner runs on fresh history.
    /// This replica's name (the host name unless given).
    pub replica_name: String,
    /// Where peers dial it (`None`: [`advertised`] of the bound address).
    pub advertise_addr: Option<String>,
    /// The election; `None`: this controller runs alone.
    pub etcd: Option<crate::replica::etcd::EtcdConfig>,
    /// TLS towards peer replicas.
    pub peer_tls: Option<wset_serve::tls::ClientTls>,
    /// How often history is repaired from a peer.
    pub repair_interval: Duration,
    pub plan_interval: Duration,
    pub planner: crate::planner::Config,
}

pub const DAY_MS: u64 = 86_400_000;

/// Raw samples for a day, one-minute rollups for two weeks, hourly ones for
/// 400 days.
pub const DEFAULT_RETENTION: &str = "raw=1d,1m=14d,1h=400d";

/// The series [`DEFAULT_RETENTION`] keeps.
pub fn default_levels() -> Vec<Level> {
    parse_retention(DEFAULT_RETENTION).expect("the default retention parses")
}

/// The `--retention` flag's value: the stored series.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Retention(pub Vec<Level>);

impl std::str::FromStr for Retention {
    type Err = RetentionError;
    fn from_str(s: &str) -> Result<Self, RetentionError> {
        parse_retention(s).map(Self)
    }
}

impl Default for Config {
    /// What the controller runs with when given no flag (and no
    /// environment variable): the flags' defaults.
    fn default() -> Self {
        cli::defaults::<Args>()
    }
}

/// Whole milliseconds of `part`'s duration `s`, in the flags' syntax.
fn parse_millis(part: &str, s: &str) -> Result<u64, RetentionError> {
    let d = cli::parse_duration(s).map_err(|source| RetentionError::Duration {
        part: part.to_owned(),
        source,
    })?;
    if !d.subsec_nanos().is_multiple_of(1_000_000) {
        return Err(RetentionError::SubMillisecond(part.to_owned()));
    }
    Ok(d.as_millis() as u64)
}

/// Parse `raw=1d,1m=14d,1h=400d`: the raw retention, then each rollup's
/// bucket and retention. Buckets must grow, each must divide the next, and
/// each series must be kept longer than the next bucket (the rollup reads it).
pub fn parse_retention(s: &str) -> Result<Vec<Level>, RetentionError> {
    let mut levels: Vec<Level> = Vec::new();
    for (i, part) in s.split(',').enumerate() {
        let (b, r) = part
            .split_once('=')
            .ok_or_else(|| RetentionError::NotAPair(part.to_owned()))?;
        let bucket_ms = if i == 0 {
            if b.trim() != "raw" {
                return Err(RetentionError::RawFirst(part.to_owned()));
            }
            0
        } else {
            parse_millis(part, b)?
        };
        let retention_ms = parse_millis(part, r)?;
        if retention_ms == 0 {
            return Err(RetentionError::NotPositive(part.to_owned()));
        }
        if let Some(prev) = levels.last().copied() {
            if bucket_ms <= prev.bucket_ms
                || (prev.bucket_ms > 0 && bucket_ms % prev.bucket_ms != 0)
            {
                return Err(RetentionError::BucketNotMultiple {
                    part: part.to_owned(),
                    prev_ms: prev.bucket_ms,
                });
            }
            if prev.retention_ms <= bucket_ms {
                return Err(RetentionError::KeptTooShort {
                    part: part.to_owned(),
                    prev_ms: prev.retention_ms,
                });
            }
        }
        levels.push(Level {
            bucket_ms,
            retention_ms,
        });
    }
    Ok(levels)
}

#[cfg(test)]
mod tests {
    use super::*;

    use wset_serve::cli::parse_args;

    #[test]
    fn default_is_what_no_flag_gives() {
        cli::check_defaults::<Args>().unwrap();
        let none = parse_args::<Args>(&[]).unwrap();
        assert!(!none.log_json);
        let c = none.config;
        assert_eq!(c.agents, ["127.0.0.1:7070"]);
        assert_eq!(c.levels, default_levels());
        assert_eq!(c.stall_timeout, Duration::from_secs(60));
        // The planner's own defaults agree with the flags'.
        assert_eq!(
            format!("{:?}", c.planner),
            format!("{:?}", crate::planner::Config::default())
        );
    }

    #[test]
    fn every_flag_has_a_variable_and_durations_print_as_given() {
        let help = cli::long_help::<Args>();
        for v in [
            "WSET_CONTROLLER_GRPC_ADDR",
            "WSET_CONTROLLER_METRICS_ADDR",
            "WSET_CONTROLLER_AGENTS_DNS",
            "WSET_CONTROLLER_SAMPLE_INTERVAL",
            "WSET_CONTROLLER_LOG_JSON",
            "WSET_CONTROLLER_TLS_CERT",
            "WSET_CONTROLLER_TLS_RELOAD",
            "WSET_CONTROLLER_AGENT_TLS_CA",
            "WSET_CONTROLLER_INSECURE_PLAINTEXT",
            "[default: 10s]",
            "[default: 30m]",
            "[default: raw=1d,1m=14d,1h=400d]",
        ] {
            assert!(help.contains(v), "{v} missing from:\n{help}");
        }
    }

    #[test]
    fn agents_dns_replaces_the_default_agent() {
        let c = parse_args::<Args>(&["--agents-dns", "agents.example:7070"])
            .unwrap()
            .config;
        assert!(c.agents.is_empty());
        assert_eq!(c.agents_dns.as_deref(), Some("agents.example:7070"));
        let c = parse_args::<Args>(&["--agents-dns", "a:1", "--agents", "b:2"])
            .unwrap()
            .config;
        assert_eq!(c.agents, ["b:2"]);
        let c = parse_args::<Args>(&["--agents-dns", "a:1", "--agent-tls-ca", "/ca.pem"])
            .unwrap()
            .config;
        assert_eq!(c.agent_tls.unwrap().server_name.as_deref(), Some("a"));
    }

    #[test]
    fn etcd_endpoints_make_a_replica() {
        let c = parse_args::<Args>(&[]).unwrap().config;
        assert!(c.etcd.is_none(), "alone without --etcd-endpoints");
        let c = parse_args::<Args>(&[
            "--etcd-endpoints",
            "a:2379,b:2379",
            "--lease-ttl",
            "4s",
            "--replica-name",
            "ctl-1",
        ])
        .unwrap()
        .config;
        let e = c.etcd.unwrap();
        assert_eq!(e.endpoints, ["a:2379", "b:2379"]);
        assert_eq!(e.election(), "/wset/controller/election");
        assert_eq!(e.lease_ttl, Duration::from_secs(4));
        assert_eq!(c.replica_name, "ctl-1");
        assert_eq!(
            advertised("10.0.0.7:7071".parse().unwrap()),
            "10.0.0.7:7071"
        );
        assert!(advertised("0.0.0.0:7071".parse().unwrap()).ends_with(":7071"));
        assert!(!advertised("0.0.0.0:7071".parse().unwrap()).starts_with("0.0.0.0"));
    }

    #[test]
    fn old_spellings_give_the_same_config() {
        let new = parse_args::<Args>(&["--tls-reload", "5s"]).unwrap();
        let old = parse_args::<Args>(&["--tls-reload-secs=5"]).unwrap();
        cli::same(&new.config, &old.config).unwrap();
        assert_eq!(
            old.deprecated,
            [
                "--tls-reload-secs is deprecated and goes away in the next release: write --tls-reload 5s"
            ]
        );
    }

    #[test]
    fn bad_values_are_refused_naming_the_flag() {
        // Each of these was silently raised to its floor before.
        for (args, want) in [
            (&["--dns-refresh", "500ms"][..], "--dns-refresh"),
            (&["--flush-interval", "1ms"], "--flush-interval"),
            (&["--maintain-interval", "10ms"], "--maintain-interval"),
            (&["--backoff-max", "100ms"], "--backoff-max"),
            (&["--plan-interval", "10ms"], "--plan-interval"),
            (&["--lookback", "0s"], "--lookback"),
            (&["--sample-interval", "0s"], "--sample-interval"),
            (&["--sample-interval", "10"], "--sample-interval"),
            (&["--horizon", "1500us"], "--horizon"),
            (&["--risk", "0.5"], "--risk"),
            (&["--high-watermark", "1.1"], "--high-watermark"),
            (&["--consolidate-below", "0.9"], "--consolidate-below"),
            (&["--link-gbps", "0"], "--link-gbps"),
            (&["--max-moves-per-host", "0"], "--max-moves-per-host"),
            (&["--agents-dns", "nameonly"], "--agents-dns"),
            (&["--retention", "raw=1d,1m"], "--retention"),
            (&["--lease-ttl", "1s"], "--lease-ttl"),
            (&["--lease-ttl", "2500ms"], "--lease-ttl"),
            (&["--etcd-prefix", "/wset"], "--etcd-prefix"),
            (&["--replica-name", "no spaces"], "--replica-name"),
            (&["--etcd-tls-cert", "/c.pem"], "--etcd-tls"),
        ] {
            let e = parse_args::<Args>(args).map(|_| ()).unwrap_err();
            assert!(e.contains(want), "{args:?}: {e}");
        }
        let e = parse_args::<Args>(&["--dns-refresh", "500ms"])
            .map(|_| ())
            .unwrap_err();
        assert!(e.contains("at least 1s"), "{e}");
        let e = parse_args::<Args>(&["--consolidate-below", "0.9"])
            .map(|_| ())
            .unwrap_err();
        assert!(e.contains("must be below --high-watermark (0.85)"), "{e}");
    }

    #[test]
    fn retention_specs() {
        assert_eq!(
            parse_retention("raw=1d,1m=14d,1h=400d").unwrap(),
            default_levels()
        );
        assert_eq!(parse_retention("raw=6s").unwrap().len(), 1);
        for bad in [
            "1m=1d",
            "raw=1d,1m",
            "raw=1d,1h=2d,1m=3d",
            "raw=1d,1m=14d,90s=20d",
            "raw=30s,1m=1d",
            "raw=0",
        ] {
            let e = parse_retention(bad).unwrap_err().to_string();
            assert!(e.starts_with("--retention"), "{bad}: {e}");
        }
        assert_eq!(
            parse_retention("raw=1d,1m=1500us").unwrap_err().to_string(),
            "--retention entry \"1m=1500us\": give whole milliseconds"
        );
        assert!(
            parse_retention("raw=1d,1m=14")
                .unwrap_err()
                .to_string()
                .contains("has no unit")
        );
    }
}
