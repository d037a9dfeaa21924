//! Serving plumbing shared by the agent and the controller, so both
//! processes behave alike (`process`: logging, runtime, signals, exit) and
//! both gRPC servers too: the same limits and load shedding (tower layers),
//! per-call tracing spans, `grpc.health.v1`, server reflection (v1 and
//! v1alpha) over every wset proto, and a bounded graceful shutdown.

#![forbid(unsafe_code)]

pub mod authz;
pub mod cli;
pub mod http;
pub mod metrics;
pub mod tls;

use std::future::Future;
use std::time::Duration;

use tonic::service::Routes;
use tonic::transport::Server;
use tracing::{info, warn};

/// Why a gRPC server could not be set up or stopped serving.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("build the reflection service ({version})")]
    Reflection {
        version: &'static str,
        #[source]
        source: tonic_reflection::server::Error,
    },
    #[error(transparent)]
    Security(#[from] SecurityError),
    #[error("{what} TLS")]
    Tls {
        what: &'static str,
        #[source]
        source: tls::TlsError,
    },
    #[error("bind the {what} gRPC address {addr}")]
    Bind {
        what: &'static str,
        addr: std::net::SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("listener address")]
    LocalAddr(#[source] std::io::Error),
    #[error("{what} gRPC server on {addr}")]
    Server {
        what: &'static str,
        addr: std::net::SocketAddr,
        #[source]
        source: tonic::transport::Error,
    },
    #[error("bind the {what} HTTP address {addr}")]
    HttpBind {
        what: &'static str,
        addr: std::net::SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("{what} HTTP server on {addr}")]
    Http {
        what: &'static str,
        addr: std::net::SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("{what} gRPC server task")]
    Task {
        what: &'static str,
        #[source]
        source: tokio::task::JoinError,
    },
}

/// A transport configuration that would expose a server unknowingly;
/// `what` names the server.
#[derive(Debug, thiserror::Error)]
pub enum SecurityError {
    #[error(
        "{what}: refusing plaintext on {addr}, which is not a loopback address: \
         give --tls-cert and --tls-key (and --tls-client-ca for mutual TLS), or \
         --insecure-plaintext on a network you trust"
    )]
    PlaintextOffLoopback {
        what: String,
        addr: std::net::SocketAddr,
    },
    #[error("{what}: --authz rules match client certificates: give --tls-client-ca too")]
    AuthzWithoutClientCa { what: String },
    #[error(
        "{what}: --authz rules match client certificates: give --tls-cert, --tls-key \
         and --tls-client-ca"
    )]
    AuthzWithoutTls { what: String },
}

/// `e` and every error under it, joined by `: ` (as `main` prints them).
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        out.push_str(": ");
        out.push_str(&s.to_string());
        cur = s.source();
    }
    out
}

/// Limits every wset gRPC server applies.
#[derive(Clone, Debug)]
pub struct ServerLimits {
    /// A unary call (or a stream's set-up) taking longer is cancelled.
    pub call_timeout: Duration,
    /// Calls in flight across all connections; past it, new calls are shed
    /// at once with RESOURCE_EXHAUSTED instead of queueing.
    pub max_concurrent_calls: usize,
    /// Calls in flight on one connection (shed the same way).
    pub max_calls_per_connection: usize,
    /// HTTP/2 streams one connection may open.
    pub max_streams_per_connection: u32,
    /// Largest request message accepted, bytes (larger: RESOURCE_EXHAUSTED
    /// or OUT_OF_RANGE from tonic's decoder).
    pub max_request_bytes: usize,
    /// How long in-flight calls may take to finish at shutdown.
    pub drain: Duration,
}

impl Default for ServerLimits {
    fn default() -> Self {
        Self {
            call_timeout: Duration::from_secs(30),
            max_concurrent_calls: 256,
            max_calls_per_connection: 64,
            max_streams_per_connection: 128,
            max_request_bytes: 64 << 10,
            drain: Duration::from_secs(3),
        }
    }
}

/// The health service alone, for probes on the metrics port.
pub type ProbeHealth =
    tonic_health::pb::health_server::HealthServer<tonic_health::server::HealthService>;

/// The services `with_standard_services` adds beside the application's.
pub const STANDARD_SERVICES: [&str; 3] = [
    tonic_health::pb::health_server::SERVICE_NAME,
    tonic_reflection::pb::v1::server_reflection_server::SERVICE_NAME,
    tonic_reflection::pb::v1alpha::server_reflection_server::SERVICE_NAME,
];

/// Health and reflection beside the application's services. Returns the
/// routes, the health reporter (the overall status `""` starts SERVING;
/// `services` are set SERVING too) and the same health service for the
/// metrics port, where probes that cannot present a client certificate
/// (the kubelet's) reach it.
pub async fn with_standard_services(
    routes: Routes,
    services: &[&str],
) -> Result<(Routes, tonic_health::server::HealthReporter, ProbeHealth), ServeError> {
    let reporter = tonic_health::server::HealthReporter::new();
    let health = tonic_health::pb::health_server::HealthServer::new(
        tonic_health::server::HealthService::from_health_reporter(reporter.clone()),
    );
    for s in services {
        reporter
            .set_service_status(*s, tonic_health::ServingStatus::Serving)
            .await;
    }
    // Reflection lists exactly what this server serves: its own services,
    // health and both reflection versions, not every service of wset.v1's
    // descriptors (the agent's server has no SchedulerService).
    let reflection = |b: tonic_reflection::server::Builder<'static>| {
        // Both reflection versions are served, so both are described by
        // either (a client of one may ask about the other).
        let b = b
            .include_reflection_service(false)
            .register_encoded_file_descriptor_set(wset_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(
                tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET,
            );
        services
            .iter()
            .copied()
            .chain(STANDARD_SERVICES)
            .fold(b, |b, s| b.with_service_name(s))
    };
    let v1 = reflection(tonic_reflection::server::Builder::configure())
        .build_v1()
        .map_err(|source| ServeError::Reflection {
            version: "v1",
            source,
        })?;
    let v1alpha = reflection(tonic_reflection::server::Builder::configure())
        .build_v1alpha()
        .map_err(|source| ServeError::Reflection {
            version: "v1alpha",
            source,
        })?;
    let probe = health.clone();
    Ok((
        routes
            .add_service(health)
            .add_service(v1)
            .add_service(v1alpha),
        reporter,
        probe,
    ))
}

/// How a server is reached: TLS (mutual with a client CA), the methods
/// each client identity may call, and whether plaintext is allowed off
/// loopback.
#[derive(Clone, Debug, Default)]
pub struct Security {
    pub tls: Option<tls::ServerTls>,
    pub authz: authz::Policy,
    /// Serve plaintext on an address other than loopback (only on a network
    /// you trust: anyone who reaches it can call everything).
    pub insecure_plaintext: bool,
}

impl Security {
    /// Refuse configurations that would expose a server unknowingly.
    pub fn check(&self, what: &str, addr: std::net::SocketAddr) -> Result<(), SecurityError> {
        let what = what.to_owned();
        match &self.tls {
            None if !addr.ip().is_loopback() && !self.insecure_plaintext => {
                Err(SecurityError::PlaintextOffLoopback { what, addr })
            }
            Some(t) if t.client_ca.is_none() && !self.authz.is_open() => {
                Err(SecurityError::AuthzWithoutClientCa { what })
            }
            None if !self.authz.is_open() => Err(SecurityError::AuthzWithoutTls { what }),
            _ => Ok(()),
        }
    }
}

/// Bind `addr` and serve `routes` there in a task of its own until `stop`
/// changes (then drain as `serve` does). Configuration and binding errors
/// come back at once.
pub async fn spawn(
    what: &'static str,
    routes: Routes,
    addr: std::net::SocketAddr,
    limits: ServerLimits,
    security: Security,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> Result<Served, ServeError> {
    security.check(what, addr)?;
    let tls = match &security.tls {
        Some(t) => Some(
            tls::Reloading::start(what, t.clone(), tls::Alpn::Grpc, stop.clone())
                .map_err(|source| ServeError::Tls { what, source })?,
        ),
        None => None,
    };
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| ServeError::Bind { what, addr, source })?;
    if security.tls.is_some() && security.authz.is_open() {
        warn!(
            "{what}: no --authz rules: every client whose certificate the client CA signed may call every method"
        );
    }
    let bound = listener
        .local_addr()
        .map_err(|source| ServeError::Bind { what, addr, source })?;
    let task = tokio::spawn(async move {
        serve(
            what,
            routes,
            listener,
            &limits,
            tls,
            security.authz,
            async move {
                let _ = stop.changed().await;
            },
        )
        .await
    });
    Ok(Served { task, addr: bound })
}

/// A server [`spawn`] started: its task, and the address it is bound to.
#[derive(Debug)]
pub struct Served {
    pub task: tokio::task::JoinHandle<Result<(), ServeError>>,
    pub addr: std::net::SocketAddr,
}

/// Serve `routes` on `listener` with `limits` (over TLS when `tls` is
/// given, with `authz` enforced) until `shutdown` resolves, then let
/// in-flight calls finish for at most `limits.drain`. `what` names the
/// server in logs and errors.
pub async fn serve(
    what: &'static str,
    routes: Routes,
    listener: tokio::net::TcpListener,
    limits: &ServerLimits,
    tls: Option<tls::Reloading>,
    authz: authz::Policy,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    let addr = listener.local_addr().map_err(ServeError::LocalAddr)?;
    let failed = |source| ServeError::Server { what, addr, source };
    let scheme = match (&tls, authz.is_open()) {
        (None, _) => "plaintext",
        (Some(_), true) => "TLS",
        (Some(_), false) => "mutual TLS with authorization",
    };
    info!(%addr, transport = scheme, "{what} gRPC serving");
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let router = Server::builder()
        .timeout(limits.call_timeout)
        .concurrency_limit_per_connection(limits.max_calls_per_connection)
        .load_shed(true)
        .max_concurrent_streams(limits.max_streams_per_connection)
        .http2_keepalive_interval(Some(Duration::from_secs(20)))
        .http2_keepalive_timeout(Some(Duration::from_secs(10)))
        .trace_fn(|req| tracing::info_span!("grpc", method = %req.uri().path()))
        .layer(
            tower::ServiceBuilder::new()
                .layer(authz::AuthzLayer {
                    what,
                    policy: std::sync::Arc::new(authz),
                })
                .load_shed()
                .layer(tower::limit::GlobalConcurrencyLimitLayer::new(
                    limits.max_concurrent_calls,
                )),
        )
        .add_routes(routes);
    let signal = async move {
        let _ = stop_rx.await;
    };
    let server: std::pin::Pin<
        Box<dyn Future<Output = Result<(), tonic::transport::Error>> + Send>,
    > = match tls {
        None => Box::pin(router.serve_with_incoming_shutdown(
            tokio_stream::wrappers::TcpListenerStream::new(listener),
            signal,
        )),
        Some(t) => {
            Box::pin(router.serve_with_incoming_shutdown(tls::incoming(what, listener, t), signal))
        }
    };
    let mut server = tokio::spawn(server);
    tokio::select! {
        r = &mut server => {
            return r.map_err(|source| ServeError::Task { what, source })?.map_err(failed);
        }
        () = shutdown => {}
    }
    let _ = stop_tx.send(());
    // Graceful for in-flight calls, but bounded: an idle client connection
    // (or a stream that never ends) must not keep the process from exiting.
    match tokio::time::timeout(limits.drain, &mut server).await {
        Ok(Ok(r)) => r.map_err(failed),
        Ok(Err(e)) => {
            warn!(error = %e, "{what} gRPC server task ended abnormally");
            Ok(())
        }
        Err(_) => {
            warn!(
                "{what} gRPC connections still open after {:?}; closing them",
                limits.drain
            );
            server.abort();
            Ok(())
        }
    }
}

/// What both binaries do around their `run`: logging, the runtime, the
/// shutdown signal and the exit status.
pub mod process {
    use std::future::Future;
    use std::process::ExitCode;

    /// Why logging and tracing could not be set up.
    #[derive(Debug, thiserror::Error)]
    pub enum TelemetryError {
        #[error("set up the OTLP span exporter (check OTEL_EXPORTER_OTLP_ENDPOINT)")]
        Exporter(#[source] opentelemetry_otlp::ExporterBuildError),
        #[error("install the tracing subscriber")]
        Subscriber(#[source] tracing_subscriber::util::TryInitError),
    }

    /// Logging and tracing for the process's life. Drop it, or better call
    /// [`Telemetry::shutdown`], at exit so the last spans are exported.
    #[derive(Debug)]
    pub struct Telemetry {
        provider: Option<opentelemetry_sdk::trace::SdkTracerProvider>,
    }

    impl Telemetry {
        /// Whether spans go to an OTLP endpoint.
        pub fn exporting(&self) -> bool {
            self.provider.is_some()
        }

        /// Export what is left and stop the exporter (off the async workers:
        /// the exporter's channel runs on them).
        pub async fn shutdown(mut self) {
            if let Some(p) = self.provider.take() {
                let _ = tokio::task::spawn_blocking(move || p.shutdown()).await;
            }
        }
    }

    impl Drop for Telemetry {
        fn drop(&mut self) {
            if let Some(p) = self.provider.take() {
                let _ = p.shutdown();
            }
        }
    }

    /// Whether the standard OpenTelemetry variables ask for OTLP export
    /// (`OTEL_EXPORTER_OTLP_ENDPOINT` or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`
    /// set, `OTEL_SDK_DISABLED` not `true`, `OTEL_TRACES_EXPORTER` not `none`).
    pub fn otlp_requested() -> bool {
        let set = |k: &str| std::env::var(k).is_ok_and(|v| !v.trim().is_empty());
        let is =
            |k: &str, v: &str| std::env::var(k).is_ok_and(|x| x.trim().eq_ignore_ascii_case(v));
        (set("OTEL_EXPORTER_OTLP_ENDPOINT") || set("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))
            && !is("OTEL_SDK_DISABLED", "true")
            && !is("OTEL_TRACES_EXPORTER", "none")
    }

    /// Log to stderr (plain, no colours) or as JSON lines on stdout;
    /// `RUST_LOG` filters (default `info`). When [`otlp_requested`], spans
    /// (registration, harvests, gRPC calls, ingest, planning) are also
    /// exported over OTLP/gRPC as the standard `OTEL_*` variables say
    /// (endpoint, headers, timeout, compression, `OTEL_SERVICE_NAME`,
    /// `OTEL_RESOURCE_ATTRIBUTES`, `OTEL_BSP_*`); `service` is the service
    /// name unless `OTEL_SERVICE_NAME` gives one. Call it inside the runtime:
    /// the exporter's channel runs on it.
    pub fn init_tracing(service: &'static str, json: bool) -> Result<Telemetry, TelemetryError> {
        use opentelemetry::trace::TracerProvider as _;
        use tracing_subscriber::Layer as _;
        use tracing_subscriber::layer::SubscriberExt as _;
        use tracing_subscriber::util::SubscriberInitExt as _;

        let filter =
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
        let fmt = if json {
            tracing_subscriber::fmt::layer().json().boxed()
        } else {
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                .with_ansi(false)
                .boxed()
        };
        let (otel, provider) = if otlp_requested() {
            let exporter = opentelemetry_otlp::SpanExporter::builder()
                .with_tonic()
                .build()
                .map_err(TelemetryError::Exporter)?;
            let mut resource = opentelemetry_sdk::Resource::builder();
            if std::env::var_os("OTEL_SERVICE_NAME").is_none() {
                resource = resource.with_service_name(service);
            }
            let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder()
                .with_batch_exporter(exporter)
                .with_resource(resource.build())
                .build();
            let tracer = provider.tracer(service);
            // The exporter's own transport must not feed spans back to it.
            let quiet: tracing_subscriber::filter::Targets = "info,h2=off,hyper=off,hyper_util=off,tonic=off,tower=off,opentelemetry=off,opentelemetry_sdk=off,opentelemetry_otlp=off"
                .parse()
                .expect("static filter");
            (
                Some(
                    tracing_opentelemetry::layer()
                        .with_tracer(tracer)
                        .with_filter(quiet),
                ),
                Some(provider),
            )
        } else {
            (None, None)
        };
        tracing_subscriber::registry()
            .with(filter)
            .with(fmt)
            .with(otel)
            .try_init()
            .map_err(TelemetryError::Subscriber)?;
        if provider.is_some() {
            tracing::info!(service, "exporting spans over OTLP");
        }
        Ok(Telemetry { provider })
    }

    /// Run the process's `main_fn` on a multi-threaded runtime with
    /// logging and tracing set up ([`init_tracing`]) around it.
    pub fn run<F>(service: &'static str, json: bool, main_fn: F) -> anyhow::Result<()>
    where
        F: Future<Output = anyhow::Result<()>>,
    {
        raise_nofile();
        block_on(async move {
            let telemetry = init_tracing(service, json)?;
            let r = main_fn.await;
            telemetry.shutdown().await;
            r
        })
    }

    /// Wall-clock milliseconds since the Unix epoch (the clock summaries,
    /// history and plans are stamped with).
    pub fn now_ms() -> u64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64)
    }

    /// Raise the soft limit on open files to the hard one: a controller
    /// keeps a connection per agent (thousands), an agent several fds per
    /// VM, and the usual soft limit (1024) is far below either.
    pub fn raise_nofile() {
        use nix::sys::resource::{Resource, getrlimit, setrlimit};
        if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE)
            && soft < hard
            && let Err(e) = setrlimit(Resource::RLIMIT_NOFILE, hard, hard)
        {
            eprintln!("could not raise the open-file limit from {soft} to {hard}: {e}");
        }
    }

    /// Run `f` to completion on a multi-threaded runtime.
    pub fn block_on<T>(f: impl Future<Output = anyhow::Result<T>>) -> anyhow::Result<T> {
        tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()?
            .block_on(f)
    }

    /// Resolves at SIGTERM or SIGINT.
    pub async fn shutdown_signal() {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = signal(SignalKind::terminate()).expect("install SIGTERM handler");
        let mut int = signal(SignalKind::interrupt()).expect("install SIGINT handler");
        tokio::select! {
            _ = term.recv() => {},
            _ = int.recv() => {},
        }
    }

    /// The exit status, printing the whole error chain on failure.
    pub fn exit(name: &str, result: anyhow::Result<()>) -> ExitCode {
        match result {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("{name}: error: {e:#}");
                ExitCode::FAILURE
            }
        }
    }
}

/// The transport flags both servers take (flattened into each binary's
/// arguments, which give each its environment variable: [`cli::parse`]).
#[derive(Clone, Debug, clap::Args)]
pub struct SecurityArgs {
    /// Serve gRPC over TLS with this PEM certificate (chain), reloaded when
    /// the file changes.
    #[arg(long, requires = "tls_key")]
    pub tls_cert: Option<std::path::PathBuf>,
    /// The PEM private key of --tls-cert.
    #[arg(long, requires = "tls_cert")]
    pub tls_key: Option<std::path::PathBuf>,
    /// Require client certificates signed by this PEM CA bundle (mutual TLS).
    #[arg(long, requires = "tls_cert")]
    pub tls_client_ca: Option<std::path::PathBuf>,
    /// How often the certificate files are checked for changes.
    #[arg(long, value_name = "DURATION", default_value = "10s",
          value_parser = cli::duration().at_least(Duration::from_secs(1)))]
    pub tls_reload: Duration,
    /// Who may call what, IDENTITY=METHODS (repeatable): IDENTITY is a URI
    /// or DNS name in the client certificate's SANs or its common name (*
    /// for any client), METHODS is *, /package.Service/* or
    /// /package.Service/Method. Needs --tls-client-ca. Without rules every
    /// client the client CA signed may call everything; health checks are
    /// always allowed.
    #[arg(long = "authz", value_name = "IDENTITY=METHODS")]
    pub authz: Vec<authz::Rule>,
    /// Serve plaintext gRPC on a non-loopback address (a trusted network only).
    #[arg(long)]
    pub insecure_plaintext: bool,
}

impl SecurityArgs {
    pub fn security(self) -> Security {
        Security {
            tls: self.tls_cert.map(|cert| tls::ServerTls {
                cert,
                key: self
                    .tls_key
                    .expect("clap requires --tls-key with --tls-cert"),
                client_ca: self.tls_client_ca,
                reload: self.tls_reload,
            }),
            authz: authz::Policy { rules: self.authz },
            insecure_plaintext: self.insecure_plaintext,
        }
    }
}

/// Keeps a flood of identical warnings (refused connections) from flooding
/// the log: at most `per_second` lines a second are written; the rest are
/// counted, and the next line written says how many were suppressed.
#[derive(Debug)]
pub struct LogThrottle {
    per_second: u32,
    state: std::sync::Mutex<(std::time::Instant, u32, u64)>,
}

impl LogThrottle {
    pub fn new(per_second: u32) -> Self {
        Self {
            per_second,
            state: std::sync::Mutex::new((std::time::Instant::now(), 0, 0)),
        }
    }

    /// `Some(suppressed since the last line)` when this event may be logged.
    pub fn allow(&self) -> Option<u64> {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let now = std::time::Instant::now();
        if now.duration_since(s.0) >= Duration::from_secs(1) {
            s.0 = now;
            s.1 = 0;
        }
        if s.1 < self.per_second {
            s.1 += 1;
            Some(std::mem::take(&mut s.2))
        } else {
            s.2 += 1;
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_chain_their_causes() {
        let t = tls::ClientTls {
            ca: "/nonexistent/ca.pem".into(),
            cert: None,
            key: None,
            server_name: None,
        };
        let e = tls::client_config(&t, "h").unwrap_err();
        let chain = error_chain(&e);
        assert!(
            chain.starts_with("read CA /nonexistent/ca.pem: ") && chain.contains("No such file"),
            "{chain}"
        );
    }

    #[test]
    fn throttle_counts_what_it_suppresses() {
        let t = LogThrottle::new(2);
        assert_eq!(t.allow(), Some(0));
        assert_eq!(t.allow(), Some(0));
        assert_eq!(t.allow(), None);
        assert_eq!(t.allow(), None);
        std::thread::sleep(Duration::from_millis(1001));
        assert_eq!(t.allow(), Some(2));
        assert_eq!(t.allow(), Some(0));
    }
}
