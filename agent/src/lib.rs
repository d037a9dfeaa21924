//! The wset agent: takes VMMs' userfaultfds over Unix sockets, runs one
//! tracker thread per VM, and serves working-set summaries over gRPC.
//!
//! The binary is a thin shell over [`run`], so tests and the demo run the
//! same code as production.

#![forbid(unsafe_code)]

pub mod adopt;
pub mod config;
pub mod handshake;
pub mod host;
pub mod intake;
pub mod metrics;
pub mod prefetch;
pub mod registry;
pub mod service;
pub mod stream;
pub mod wire;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tracing::{info, warn};

pub use config::Config;
use registry::Registry;

/// Wall-clock milliseconds since the Unix epoch.
pub use wset_serve::process::now_ms;

/// Why the agent could not start, or did not stop cleanly.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("userfaultfd is not usable: the agent needs root (or vm.unprivileged_userfaultfd=1)")]
    Userfaultfd(#[source] std::io::Error),
    #[error("create state directory {}", dir.display())]
    StateDir {
        dir: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("resume the VMs a previous agent tracked (records in {})", dir.display())]
    Resume {
        dir: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("listen on {}", path.display())]
    Listen {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Serve(Box<wset_serve::ServeError>),
    #[error(transparent)]
    Metrics(#[from] wset_serve::metrics::MetricsError),
    #[error("gRPC server task")]
    Task(#[source] tokio::task::JoinError),
    #[error("{pages} pages could not be put back and remain in custody files under {}", dir.display())]
    PagesInCustody { pages: u32, dir: PathBuf },
}

impl From<wset_serve::ServeError> for RunError {
    fn from(e: wset_serve::ServeError) -> Self {
        Self::Serve(Box::new(e))
    }
}

/// Run the agent until `shutdown` resolves; then stop every tracker (each
/// puts pages in custody back and unregisters) and return.
pub async fn run(
    cfg: Config,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), RunError> {
    let cfg = Arc::new(cfg);
    let registry = Arc::new(Registry::default());
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);

    // Fail early, with a reason, when the kernel cannot do what we need.
    let offered = wset_tracker::Uffd::kernel_features().map_err(RunError::Userfaultfd)?;
    info!(features = %wset_tracker::uffd::feature::names(offered), "kernel userfaultfd features");
    std::fs::create_dir_all(&cfg.state_dir).map_err(|source| RunError::StateDir {
        dir: cfg.state_dir.clone(),
        source,
    })?;
    // What a previous agent left: pages in custody back, its VMs tracked again.
    adopt::resume(&cfg, &registry, offered)
        .await
        .map_err(|source| RunError::Resume {
            dir: cfg.state_dir.clone(),
            source,
        })?;

    let mut tasks = Vec::new();
    let admission = Arc::new(intake::Admission::new(
        cfg.registration_rate,
        cfg.registration_burst,
        cfg.max_pending_handshakes,
    ));
    for sock in &cfg.sockets {
        let l = intake::bind(sock, cfg.socket_mode, cfg.socket_group).map_err(|source| {
            RunError::Listen {
                path: sock.path.clone(),
                source,
            }
        })?;
        info!(socket = %sock.path.display(), snapshot = ?sock.snapshot, "accepting VMMs");
        tasks.push(tokio::spawn(intake::serve(
            l,
            sock.clone(),
            cfg.clone(),
            registry.clone(),
            offered,
            admission.clone(),
            stop_rx.clone(),
        )));
    }

    let identity = Arc::new(host::Identity::new(
        cfg.host_name.clone(),
        offered,
        cfg.vm_capacity_bytes,
        cfg.host_labels.clone(),
    ));
    info!(host_id = %identity.host_id, instance = %identity.instance_id, "agent identity");
    let batches = Arc::new(tokio::sync::watch::Sender::new(Arc::new(
        stream::Snapshot::default(),
    )));
    let publisher = tokio::spawn(stream::publish(
        registry.clone(),
        cfg.clone(),
        identity.clone(),
        batches.clone(),
        stop_rx.clone(),
    ));
    let streams = Arc::new(tokio::sync::Semaphore::new(cfg.max_streams));
    let sources = metrics::Sources {
        registry: registry.clone(),
        cfg: cfg.clone(),
        identity: identity.clone(),
        streams: streams.clone(),
    };
    let svc = service::AgentService {
        registry: registry.clone(),
        cfg: cfg.clone(),
        identity,
        batches,
        streams,
        stop: stop_rx.clone(),
    };
    use wset_proto::v1::agent_service_server::{AgentServiceServer, SERVICE_NAME};
    let routes = tonic::service::Routes::new(
        AgentServiceServer::new(svc).max_decoding_message_size(cfg.grpc_limits.max_request_bytes),
    );
    let (routes, _health, probe) =
        wset_serve::with_standard_services(routes, &[SERVICE_NAME]).await?;
    let metrics = wset_serve::metrics::spawn_if(
        "agent",
        cfg.metrics_addr,
        move || metrics::render(&sources),
        Some(probe),
        stop_rx.clone(),
    )
    .await?;
    let grpc = wset_serve::spawn(
        "agent",
        routes,
        cfg.grpc_addr,
        cfg.grpc_limits.clone(),
        cfg.grpc_security.clone(),
        stop_rx.clone(),
    )
    .await?
    .task;

    // Retire VMs whose trackers ended (VMM exit, unmap, failure).
    let reaper = {
        let registry = registry.clone();
        let ttl = cfg.retired_ttl;
        let state_dir = cfg.state_dir.clone();
        let mut stop = stop_rx.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(250));
            loop {
                tokio::select! {
                    _ = stop.changed() => break,
                    _ = tick.tick() => {
                        let r = registry.clone();
                        let done = tokio::task::spawn_blocking(move || r.reap(ttl)).await.unwrap_or_default();
                        for (info, report) in done {
                            adopt::remove(&state_dir, &info.vm_id);
                            info!(vm_id = %info.vm_id, state = ?report.state, reason = %report.reason, "VM retired");
                        }
                    }
                }
            }
        })
    };

    shutdown.await;
    info!(
        vms = registry.tracking_count(),
        "shutting down: putting every page back"
    );
    let _ = stop_tx.send(true);
    let r = registry.clone();
    let stopped = tokio::task::spawn_blocking(move || r.stop_all())
        .await
        .unwrap_or_default();
    let mut left = 0;
    for (info, report) in &stopped {
        if report.pages_left_in_custody > 0 {
            warn!(vm_id = %info.vm_id, reason = %report.reason, "pages remain in custody");
            left += report.pages_left_in_custody;
        }
    }
    for t in tasks {
        t.abort();
    }
    reaper.abort();
    publisher.abort();
    grpc.await.map_err(RunError::Task)??;
    if let Some(m) = metrics {
        let _ = m.await;
    }
    for s in &cfg.sockets {
        let _ = std::fs::remove_file(&s.path);
    }
    if left > 0 {
        return Err(RunError::PagesInCustody {
            pages: left,
            dir: cfg.state_dir.clone(),
        });
    }
    info!(vms = stopped.len(), "stopped cleanly");
    Ok(())
}
