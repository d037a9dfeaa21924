//! The controller's configuration, with embedded defaults that work on one
//! machine with no flags at all (an agent on 127.0.0.1:7070).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use crate::history::Level;

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
    /// TLS, authorization and the plaintext policy of the gRPC server.
    pub grpc_security: wset_serve::Security,
    /// TLS towards the agents (`None`: plaintext).
    pub agent_tls: Option<wset_serve::tls::ClientTls>,
    /// How often the planner runs on fresh history.
    pub plan_interval: Duration,
    pub planner: crate::planner::Config,
}

pub const DAY_MS: u64 = 86_400_000;

/// Raw samples for a day, one-minute rollups for two weeks, hourly ones for
/// 400 days.
pub fn default_levels() -> Vec<Level> {
    vec![
        Level {
            bucket_ms: 0,
            retention_ms: DAY_MS,
        },
        Level {
            bucket_ms: 60_000,
            retention_ms: 14 * DAY_MS,
        },
        Level {
            bucket_ms: 3_600_000,
            retention_ms: 400 * DAY_MS,
        },
    ]
}

impl Default for Config {
    fn default() -> Self {
        Self {
            grpc_addr: "127.0.0.1:7071".parse().expect("static address"),
            metrics_addr: Some("127.0.0.1:7081".parse().expect("static address")),
            data_dir: "/var/lib/wset/controller".into(),
            agents: vec!["127.0.0.1:7070".into()],
            agents_dns: None,
            dns_refresh: Duration::from_secs(30),
            sample_interval: Duration::from_secs(10),
            levels: default_levels(),
            flush_interval: Duration::from_secs(1),
            maintain_interval: Duration::from_secs(60),
            stall_timeout: Duration::from_secs(60),
            backoff_min: Duration::from_millis(500),
            backoff_max: Duration::from_secs(30),
            max_batch_bytes: 64 << 20,
            cache_bytes: 256 << 20,
            max_query_span: Duration::from_millis(400 * DAY_MS),
            grpc_limits: wset_serve::ServerLimits::default(),
            grpc_security: wset_serve::Security::default(),
            agent_tls: None,
            plan_interval: Duration::from_secs(30),
            planner: crate::planner::Config::default(),
        }
    }
}

/// Parse a duration: `500ms`, `10s`, `5m`, `24h`, `14d`, or bare milliseconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (n, unit) = s.split_at(split);
    let n: u64 = n
        .parse()
        .map_err(|_| format!("{s:?}: expected a number with ms, s, m, h or d"))?;
    let ms = match unit {
        "" | "ms" => 1,
        "s" => 1000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => DAY_MS,
        _ => return Err(format!("{s:?}: unknown unit {unit:?} (ms, s, m, h, d)")),
    };
    n.checked_mul(ms)
        .map(Duration::from_millis)
        .ok_or_else(|| format!("{s:?} is too long"))
}

/// Parse `raw=1d,1m=14d,1h=400d`: the raw retention, then each rollup's
/// bucket and retention. Buckets must grow, each must divide the next, and
/// each series must be kept longer than the next bucket (the rollup reads it).
pub fn parse_retention(s: &str) -> Result<Vec<Level>, String> {
    let mut levels = Vec::new();
    for (i, part) in s.split(',').enumerate() {
        let (b, r) = part
            .split_once('=')
            .ok_or_else(|| format!("{part:?}: expected BUCKET=RETENTION, e.g. 1m=14d"))?;
        let bucket_ms = if i == 0 {
            if b.trim() != "raw" {
                return Err(format!(
                    "the first entry must be raw=RETENTION, not {part:?}"
                ));
            }
            0
        } else {
            parse_duration(b)?.as_millis() as u64
        };
        let retention_ms = parse_duration(r)?.as_millis() as u64;
        if retention_ms == 0 {
            return Err(format!("{part:?}: retention must be positive"));
        }
        if let Some(prev) = levels.last().copied() {
            let prev: Level = prev;
            if bucket_ms <= prev.bucket_ms
                || (prev.bucket_ms > 0 && bucket_ms % prev.bucket_ms != 0)
            {
                return Err(format!(
                    "{part:?}: each bucket must be a multiple of the one before ({} ms)",
                    prev.bucket_ms
                ));
            }
            if prev.retention_ms <= bucket_ms {
                return Err(format!(
                    "{part:?}: the series before it is kept {} ms, not longer than this bucket",
                    prev.retention_ms
                ));
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

    #[test]
    fn durations() {
        assert_eq!(parse_duration("250").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("10s").unwrap(), Duration::from_secs(10));
        assert_eq!(parse_duration("2d").unwrap(), Duration::from_secs(172_800));
        assert!(parse_duration("10x").is_err());
        assert!(parse_duration("s").is_err());
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
            assert!(parse_retention(bad).is_err(), "{bad}");
        }
    }
}
