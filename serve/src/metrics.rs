//! Prometheus metrics for both servers: a small writer of the text
//! exposition format (version 0.0.4, which every Prometheus scrapes) and an
//! HTTP endpoint serving `GET /metrics` on an address of its own, so a
//! scraper needs neither gRPC nor the servers' client certificates.
//!
//! Metrics are rendered on each scrape from the state the processes keep
//! anyway (tracker counters, ingest and plan state): nothing is recorded
//! twice, and a scrape costs the fault path nothing.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;

use tracing::info;

/// Why the metrics endpoint could not start.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error("bind the {what} metrics address {addr}")]
    Bind {
        what: &'static str,
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("metrics listener address")]
    LocalAddr(#[source] std::io::Error),
}

/// What a metric family is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
    Histogram,
}

/// One scrape's worth of text. Families are written whole: [`Exposition::family`]
/// then its samples.
#[derive(Debug, Default)]
pub struct Exposition {
    out: String,
}

impl Exposition {
    pub fn new() -> Self {
        Self::default()
    }

    /// Start a family: its `# HELP` and `# TYPE` lines.
    pub fn family(&mut self, name: &str, kind: Kind, help: &str) -> &mut Self {
        let kind = match kind {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
            Kind::Histogram => "histogram",
        };
        let _ = writeln!(self.out, "# HELP {name} {}", escape_help(help));
        let _ = writeln!(self.out, "# TYPE {name} {kind}");
        self
    }

    /// One sample of the current family.
    pub fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: f64) -> &mut Self {
        self.out.push_str(name);
        write_labels(&mut self.out, labels, None);
        let _ = writeln!(self.out, " {}", number(value));
        self
    }

    /// A whole histogram: `buckets` are `(upper bound, count in that bucket)`
    /// (not cumulative), the last bound may be `f64::INFINITY`; `sum` is the
    /// sum of observations.
    pub fn histogram(
        &mut self,
        name: &str,
        labels: &[(&str, &str)],
        buckets: &[(f64, u64)],
        sum: f64,
    ) -> &mut Self {
        let mut cumulative = 0u64;
        let mut saw_inf = false;
        for &(le, count) in buckets {
            cumulative += count;
            saw_inf |= le.is_infinite();
            self.out.push_str(name);
            self.out.push_str("_bucket");
            write_labels(&mut self.out, labels, Some(le));
            let _ = writeln!(self.out, " {cumulative}");
        }
        if !saw_inf {
            self.out.push_str(name);
            self.out.push_str("_bucket");
            write_labels(&mut self.out, labels, Some(f64::INFINITY));
            let _ = writeln!(self.out, " {cumulative}");
        }
        self.out.push_str(name);
        self.out.push_str("_sum");
        write_labels(&mut self.out, labels, None);
        let _ = writeln!(self.out, " {}", number(sum));
        self.out.push_str(name);
        self.out.push_str("_count");
        write_labels(&mut self.out, labels, None);
        let _ = writeln!(self.out, " {cumulative}");
        self
    }

    /// The standard `process_*` families of this process (CPU, memory, file
    /// descriptors, threads, start time), from `/proc/self`.
    pub fn process(&mut self) -> &mut Self {
        let Some(p) = ProcessStats::read() else {
            return self;
        };
        self.family(
            "process_cpu_seconds_total",
            Kind::Counter,
            "Total user and system CPU time spent in seconds.",
        )
        .sample("process_cpu_seconds_total", &[], p.cpu_seconds);
        self.family(
            "process_resident_memory_bytes",
            Kind::Gauge,
            "Resident memory size in bytes.",
        )
        .sample(
            "process_resident_memory_bytes",
            &[],
            p.resident_bytes as f64,
        );
        self.family(
            "process_virtual_memory_bytes",
            Kind::Gauge,
            "Virtual memory size in bytes.",
        )
        .sample("process_virtual_memory_bytes", &[], p.virtual_bytes as f64);
        self.family(
            "process_open_fds",
            Kind::Gauge,
            "Number of open file descriptors.",
        )
        .sample("process_open_fds", &[], p.open_fds as f64);
        self.family("process_threads", Kind::Gauge, "Number of OS threads.")
            .sample("process_threads", &[], p.threads as f64);
        self.family(
            "process_start_time_seconds",
            Kind::Gauge,
            "Start time of the process since the Unix epoch in seconds.",
        )
        .sample("process_start_time_seconds", &[], p.start_time_seconds);
        self
    }

    pub fn finish(self) -> String {
        self.out
    }
}

fn number(v: f64) -> String {
    if v.is_nan() {
        "NaN".into()
    } else if v == f64::INFINITY {
        "+Inf".into()
    } else if v == f64::NEG_INFINITY {
        "-Inf".into()
    } else if v.fract() == 0.0 && v.abs() < 1e15 {
        format!("{}", v as i64)
    } else {
        format!("{v}")
    }
}

fn write_labels(out: &mut String, labels: &[(&str, &str)], le: Option<f64>) {
    if labels.is_empty() && le.is_none() {
        return;
    }
    out.push('{');
    let mut first = true;
    for (k, v) in labels {
        if !first {
            out.push(',');
        }
        first = false;
        let _ = write!(out, "{k}=\"{}\"", escape_value(v));
    }
    if let Some(le) = le {
        if !first {
            out.push(',');
        }
        let _ = write!(out, "le=\"{}\"", number(le));
    }
    out.push('}');
}

fn escape_value(v: &str) -> String {
    let mut s = String::with_capacity(v.len());
    for c in v.chars() {
        match c {
            '\\' => s.push_str("\\\\"),
            '"' => s.push_str("\\\""),
            '\n' => s.push_str("\\n"),
            c => s.push(c),
        }
    }
    s
}

fn escape_help(v: &str) -> String {
    v.replace('\\', "\\\\").replace('\n', "\\n")
}

/// This process's resource use, from `/proc/self`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ProcessStats {
    pub cpu_seconds: f64,
    pub resident_bytes: u64,
    pub virtual_bytes: u64,
    pub open_fds: u64,
    pub threads: u64,
    pub start_time_seconds: f64,
}

impl ProcessStats {
    /// `None` when `/proc` cannot be read (not Linux, or hidden).
    pub fn read() -> Option<Self> {
        Self::at("self")
    }

    /// The same for another process (`pid`), e.g. a child a benchmark watches.
    pub fn of(pid: nix::libc::pid_t) -> Option<Self> {
        Self::at(&pid.to_string())
    }

    /// The same for `/proc/<pid>`, where `pid` may be `self`.
    fn at(pid: &str) -> Option<Self> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // The command may hold spaces and parentheses: fields start after the last ')'.
        let rest = &stat[stat.rfind(')')? + 2..];
        let f: Vec<&str> = rest.split_whitespace().collect();
        // Field numbers from proc(5), less the two before `rest` (pid, comm).
        let field = |n: usize| f.get(n - 3).and_then(|s| s.parse::<u64>().ok());
        let tick = clock_ticks() as f64;
        let page = page_size();
        let boot = boot_time_seconds().unwrap_or(0.0);
        Some(Self {
            cpu_seconds: (field(14)? + field(15)?) as f64 / tick,
            virtual_bytes: field(23)?,
            resident_bytes: field(24)? * page,
            threads: field(20)?,
            start_time_seconds: boot + field(22)? as f64 / tick,
            open_fds: std::fs::read_dir(format!("/proc/{pid}/fd"))
                .map(|d| d.count() as u64)
                .unwrap_or(0),
        })
    }
}

fn clock_ticks() -> u64 {
    nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .map_or(100, |v| v as u64)
}

fn page_size() -> u64 {
    nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE)
        .ok()
        .flatten()
        .map_or(4096, |v| v as u64)
}

fn boot_time_seconds() -> Option<f64> {
    std::fs::read_to_string("/proc/stat")
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("btime "))
        .and_then(|v| v.trim().parse().ok())
}

/// A metrics address on the command line: `host:port`, or `off` (`None`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Addr(pub Option<SocketAddr>);

pub fn parse_addr(s: &str) -> Result<Addr, String> {
    if s == "off" {
        return Ok(Addr(None));
    }
    s.parse()
        .map(|a| Addr(Some(a)))
        .map_err(|e| format!("{s:?}: expected host:port or off ({e})"))
}

/// Renders the exposition on each scrape.
pub type Render = Arc<dyn Fn() -> String + Send + Sync>;

/// [`spawn`] when `addr` is given (`None`: metrics are off); the task's handle.
pub async fn spawn_if(
    what: &'static str,
    addr: Option<SocketAddr>,
    render: impl Fn() -> String + Send + Sync + 'static,
    health: Option<crate::ProbeHealth>,
    stop: tokio::sync::watch::Receiver<bool>,
) -> Result<Option<tokio::task::JoinHandle<()>>, MetricsError> {
    match addr {
        Some(addr) => Ok(Some(
            spawn(what, addr, Arc::new(render), health, stop).await?.1,
        )),
        None => Ok(None),
    }
}

/// Bind `addr` and serve `GET /metrics`, `GET /healthz` and (when `health`
/// is given) `grpc.health.v1` over plaintext HTTP/2 until `stop`
/// changes. Binding errors come back at once, naming `what`.
pub async fn spawn(
    what: &'static str,
    addr: SocketAddr,
    render: Render,
    health: Option<crate::ProbeHealth>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> Result<(SocketAddr, tokio::task::JoinHandle<()>), MetricsError> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| MetricsError::Bind { what, addr, source })?;
    let local = listener.local_addr().map_err(MetricsError::LocalAddr)?;
    info!(addr = %local, "{what} metrics at http://{local}/metrics");
    let mut app = axum::Router::new()
        .route(
            "/metrics",
            axum::routing::get(move || {
                let render = render.clone();
                async move {
                    // Rendering walks every VM or agent: off the async workers.
                    let body = tokio::task::spawn_blocking(move || render())
                        .await
                        .unwrap_or_default();
                    (
                        [(
                            axum::http::header::CONTENT_TYPE,
                            "text/plain; version=0.0.4; charset=utf-8",
                        )],
                        body,
                    )
                }
            }),
        )
        // For HTTP liveness probes (kubelet's gRPC probes cannot present a
        // client certificate to a mutual-TLS gRPC server).
        .route("/healthz", axum::routing::get(|| async { "ok\n" }))
        .route(
            "/",
            axum::routing::get(|| async { "wset: GET /metrics, GET /healthz\n" }),
        );
    // gRPC health (plaintext HTTP/2 beside HTTP/1): the kubelet's gRPC
    // probes, which cannot present a client certificate to the mutual-TLS
    // gRPC port. Only the health service is here.
    if let Some(h) = health {
        app = app
            .route_service("/grpc.health.v1.Health/Check", h.clone())
            .route_service("/grpc.health.v1.Health/Watch", h);
    }
    let task = tokio::spawn(async move {
        let r = axum::serve(listener, app)
            .with_graceful_shutdown(async move {
                let _ = stop.changed().await;
            })
            .await;
        if let Err(e) = r {
            tracing::warn!(error = %e, "{what} metrics server ended");
        }
    });
    Ok((local, task))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposition_follows_the_text_format() {
        let mut e = Exposition::new();
        e.family("wset_x_total", Kind::Counter, "Things.\nCounted.")
            .sample("wset_x_total", &[("vm_id", "a\"b\\c")], 3.0)
            .sample("wset_x_total", &[], 0.5);
        e.family("wset_lat_seconds", Kind::Histogram, "Latency.")
            .histogram(
                "wset_lat_seconds",
                &[("vm_id", "v")],
                &[(0.001, 2), (0.01, 3)],
                0.02,
            );
        assert_eq!(
            e.finish(),
            "# HELP wset_x_total Things.\\nCounted.\n\
             # TYPE wset_x_total counter\n\
             wset_x_total{vm_id=\"a\\\"b\\\\c\"} 3\n\
             wset_x_total 0.5\n\
             # HELP wset_lat_seconds Latency.\n\
             # TYPE wset_lat_seconds histogram\n\
             wset_lat_seconds_bucket{vm_id=\"v\",le=\"0.001\"} 2\n\
             wset_lat_seconds_bucket{vm_id=\"v\",le=\"0.01\"} 5\n\
             wset_lat_seconds_bucket{vm_id=\"v\",le=\"+Inf\"} 5\n\
             wset_lat_seconds_sum{vm_id=\"v\"} 0.02\n\
             wset_lat_seconds_count{vm_id=\"v\"} 5\n"
        );
    }

    #[test]
    fn process_stats_are_read_from_proc() {
        let p = ProcessStats::read().expect("/proc/self is readable");
        assert!(p.resident_bytes > 0 && p.virtual_bytes >= p.resident_bytes);
        assert!(p.threads >= 1 && p.open_fds >= 3);
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs_f64();
        assert!(p.start_time_seconds > now - 3600.0 && p.start_time_seconds <= now + 1.0);
    }
}
