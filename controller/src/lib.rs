//! The wset controller: subscribes to every agent's summary stream, keeps
//! each VM's and host's history in sled (raw samples, then rollups), and
//! serves it over gRPC. The decisions (overcommit, migration) build on this
//! history.
//!
//! The binary is a thin shell over [`run`], so tests and the demo run the
//! same code as production.

#![forbid(unsafe_code)]

pub mod config;
pub mod decide;
pub mod extender;
pub mod history;
pub mod index;
pub mod ingest;
pub mod labels;
pub mod metrics;
pub mod planner;
pub mod recent;
pub mod replica;
pub mod scheduler;
pub mod service;
pub mod sim;
pub mod store;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use std::path::PathBuf;

use tracing::{info, warn};

pub use config::Config;

/// Why the controller could not start, or did not stop cleanly.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("create data directory {}", dir.display())]
    DataDir {
        dir: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "open the history store in {} (another controller using it? remove it to start afresh)",
        dir.display()
    )]
    OpenStore {
        dir: PathBuf,
        #[source]
        source: store::StoreError,
    },
    #[error("load the VM index")]
    LoadIndex(#[source] store::StoreError),
    #[error("start the {0} thread")]
    Thread(&'static str, #[source] std::io::Error),
    /// A task of the controller's own ended by panicking or being cancelled.
    #[error("{0}")]
    Task(&'static str, #[source] tokio::task::JoinError),
    #[error(transparent)]
    Serve(Box<wset_serve::ServeError>),
    #[error(transparent)]
    Metrics(#[from] wset_serve::metrics::MetricsError),
}

impl From<wset_serve::ServeError> for RunError {
    fn from(e: wset_serve::ServeError) -> Self {
        Self::Serve(Box::new(e))
    }
}

/// Wall-clock milliseconds since the Unix epoch.
pub use wset_serve::process::now_ms;

/// Queue between the agents' streams and the writer: batches, not bytes.
const WRITE_QUEUE: usize = 1024;

/// Run the controller until `shutdown` resolves; then stop ingest, write and
/// flush everything received, and return.
pub async fn run(
    cfg: Config,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), RunError> {
    let cfg = Arc::new(cfg);
    std::fs::create_dir_all(&cfg.data_dir).map_err(|source| RunError::DataDir {
        dir: cfg.data_dir.clone(),
        source,
    })?;
    let (store, index, recent) = {
        let cfg = cfg.clone();
        tokio::task::spawn_blocking(move || -> Result<_, RunError> {
            let store = store::Store::open(&cfg.data_dir, cfg.levels.clone(), cfg.cache_bytes)
                .map_err(|source| RunError::OpenStore {
                    dir: cfg.data_dir.clone(),
                    source,
                })?;
            let index = index::Index::load(&store).map_err(RunError::LoadIndex)?;
            // The planner's samples, read once; then the writer keeps them.
            let recent = recent::Recent::new(
                cfg.planner.lookback_ms,
                cfg.sample_interval.as_millis() as u64,
            );
            let vms: Vec<_> = index.vms().keys().cloned().collect();
            let now = now_ms();
            let failed = recent.load_from(
                &store,
                &vms,
                now.saturating_sub(cfg.planner.lookback_ms),
                now + 1,
            );
            if let Some((vm, e)) = failed.first() {
                warn!(vms = failed.len(), first = %vm, error = %e,
                    "recent samples unreadable: those VMs' plans read the store each time");
            }
            Ok((store, Arc::new(index), Arc::new(recent)))
        })
        .await
        .map_err(|e| RunError::Task("store open task", e))??
    };
    info!(
        dir = %cfg.data_dir.display(),
        vms = index.vms().len(),
        "history store open"
    );

    let store_health = Arc::new(ingest::StoreHealth::default());
    let (tx, rx) = tokio::sync::mpsc::channel(WRITE_QUEUE);
    // History repaired from peers goes through the writer too.
    let repair_tx = tx.clone();
    let writer = {
        let (store, index, health) = (store.clone(), index.clone(), store_health.clone());
        let recent = recent.clone();
        std::thread::Builder::new()
            .name("wset-writer".into())
            .spawn(move || ingest::writer(store, index, recent, health, rx))
            .map_err(|e| RunError::Thread("writer", e))?
    };
    let flush_stop = Arc::new(AtomicBool::new(false));
    let flusher = {
        let (store, index) = (store.clone(), index.clone());
        let (health, stop) = (store_health.clone(), flush_stop.clone());
        let period = cfg.flush_interval;
        std::thread::Builder::new()
            .name("wset-flusher".into())
            .spawn(move || ingest::flusher(store, index, health, period, stop))
            .map_err(|e| RunError::Thread("flusher", e))?
    };

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let queue = tx.downgrade();
    let discovery = tokio::spawn(ingest::discover(
        cfg.clone(),
        index.clone(),
        tx,
        stop_rx.clone(),
    ));
    let maintained = Arc::new(std::sync::Mutex::new(MaintenanceTotals::default()));
    let maintenance = tokio::spawn(maintain(
        store.clone(),
        index.clone(),
        recent.clone(),
        cfg.clone(),
        maintained.clone(),
        stop_rx.clone(),
    ));

    let plans: Arc<decide::Plans> = Arc::new(tokio::sync::watch::Sender::new(None));
    let replica = Arc::new(replica::Replica::new(
        cfg.replica_name.clone(),
        cfg.etcd.is_some(),
    ));
    let planning = decide::Planning {
        store: store.clone(),
        index: index.clone(),
        recent: recent.clone(),
        cfg: cfg.clone(),
        replica: replica.clone(),
        plans: plans.clone(),
    };
    let planner_task = tokio::spawn(decide::run(planning.clone(), stop_rx.clone()));
    let extender_stats = Arc::new(extender::Stats::default());
    let sources = metrics::Sources {
        extender: cfg.extender_addr.map(|_| extender_stats.clone()),
        index: index.clone(),
        store_health: store_health.clone(),
        plans: plans.clone(),
        replica: replica.clone(),
        queue,
        store: store.clone(),
        maintained,
    };
    let sched = scheduler::SchedulerService {
        planning,
        streams: Arc::new(tokio::sync::Semaphore::new(scheduler::MAX_STREAMS)),
        stop: stop_rx.clone(),
    };
    let sched_for_extender = sched.clone();
    let replica_svc = replica::ReplicaService {
        replica: replica.clone(),
        plans: plans.clone(),
        index: index.clone(),
        streams: Arc::new(tokio::sync::Semaphore::new(replica::service::MAX_STREAMS)),
        stop: stop_rx.clone(),
    };
    let svc = service::ControllerService {
        store: store.clone(),
        index: index.clone(),
        cfg: cfg.clone(),
        streams: Arc::new(tokio::sync::Semaphore::new(service::MAX_STREAMS)),
        stop: stop_rx.clone(),
    };
    use wset_proto::v1::controller_service_server::{self as ctl, ControllerServiceServer};
    use wset_proto::v1::replica_service_server::{self as rep, ReplicaServiceServer};
    use wset_proto::v1::scheduler_service_server::{self as sch, SchedulerServiceServer};
    let limit = cfg.grpc_limits.max_request_bytes;
    let routes = tonic::service::Routes::new(
        ControllerServiceServer::new(svc).max_decoding_message_size(limit),
    )
    .add_service(SchedulerServiceServer::new(sched).max_decoding_message_size(limit))
    .add_service(ReplicaServiceServer::new(replica_svc).max_decoding_message_size(limit));
    let (routes, health, probe) = wset_serve::with_standard_services(
        routes,
        &[ctl::SERVICE_NAME, sch::SERVICE_NAME, rep::SERVICE_NAME],
    )
    .await?;
    // Decisions are served while some replica may publish: the scheduler
    // service is NOT_SERVING while this replica knows no leader (etcd lost,
    // an election under way); history is served throughout.
    {
        let health = health.clone();
        let mut leadership = replica.subscribe();
        tokio::spawn(async move {
            let mut last = None;
            loop {
                let serving = !matches!(
                    *leadership.borrow_and_update(),
                    replica::Leadership::NoQuorum { .. }
                        | replica::Leadership::Follower { leader: None }
                );
                if last != Some(serving) {
                    let status = if serving {
                        tonic_health::ServingStatus::Serving
                    } else {
                        tonic_health::ServingStatus::NotServing
                    };
                    health.set_service_status(sch::SERVICE_NAME, status).await;
                    last = Some(serving);
                }
                if leadership.changed().await.is_err() {
                    return;
                }
            }
        });
    }
    // A store that takes no writes makes the whole server NOT_SERVING: the
    // kubelet's liveness probe then restarts it, which is what recovers
    // sled after an I/O error once the disk is fixed.
    let mut store_ok = store_health.ok.subscribe();
    tokio::spawn(async move {
        while store_ok.changed().await.is_ok() {
            let ok = *store_ok.borrow_and_update();
            let status = if ok {
                tonic_health::ServingStatus::Serving
            } else {
                tonic_health::ServingStatus::NotServing
            };
            health.set_service_status("", status).await;
        }
    });
    let metrics = wset_serve::metrics::spawn_if(
        "controller",
        cfg.metrics_addr,
        move || metrics::render(&sources),
        Some(probe),
        stop_rx.clone(),
    )
    .await?;
    let served = wset_serve::spawn(
        "controller",
        routes,
        cfg.grpc_addr,
        cfg.grpc_limits.clone(),
        cfg.grpc_security.clone(),
        stop_rx.clone(),
    )
    .await?;
    let grpc = served.task;
    let extender = match cfg.extender_addr {
        Some(addr) => {
            let router = extender::router(extender::Extender {
                scheduler: sched_for_extender,
                max_body_bytes: cfg.extender_max_body_bytes,
                stats: extender_stats,
            });
            let s = wset_serve::http::spawn(
                "controller extender",
                "wset.v1.Extender",
                router,
                addr,
                &cfg.grpc_limits,
                cfg.grpc_security.clone(),
                stop_rx.clone(),
            )
            .await?;
            Some(s.task)
        }
        None => None,
    };
    // Peers dial the address given, else the one bound (its port known
    // only now when --grpc-addr asked for any).
    replica.advertise(
        cfg.advertise_addr
            .clone()
            .unwrap_or_else(|| config::advertised(served.addr)),
    );
    let election = cfg.etcd.clone().map(|etcd| {
        info!(
            replica = %replica.name,
            endpoints = %etcd.endpoints.join(","),
            lease_ttl = ?etcd.lease_ttl,
            "replicated: electing a leader through etcd"
        );
        (
            tokio::spawn(replica::etcd::run(etcd, replica.clone(), stop_rx.clone())),
            tokio::spawn(replica::follow::run(
                replica.clone(),
                plans.clone(),
                cfg.peer_tls.clone(),
                stop_rx.clone(),
            )),
            tokio::spawn(replica::repair::run(
                replica::repair::Repairer {
                    store: store.clone(),
                    index: index.clone(),
                    cfg: cfg.clone(),
                    replica: replica.clone(),
                    tx: repair_tx.clone(),
                },
                stop_rx.clone(),
            )),
        )
    });
    drop(repair_tx);

    shutdown.await;
    info!("shutting down: closing agent streams, writing and flushing what arrived");
    let _ = stop_tx.send(true);
    let _ = discovery.await;
    let _ = maintenance.await;
    let _ = planner_task.await;
    if let Some((election, follow, repair)) = election {
        // The election steps down and revokes its lease on the way out.
        let _ = election.await;
        let _ = follow.await;
        let _ = repair.await;
    }
    // Every sender is gone with discovery: the writer drains and ends.
    tokio::task::spawn_blocking(move || {
        let _ = writer.join();
        flush_stop.store(true, Ordering::Release);
        let _ = flusher.join();
    })
    .await
    .map_err(|e| RunError::Task("writer shutdown", e))?;
    grpc.await
        .map_err(|e| RunError::Task("gRPC server task", e))??;
    if let Some(x) = extender {
        x.await
            .map_err(|e| RunError::Task("extender server task", e))??;
    }
    if let Some(m) = metrics {
        let _ = m.await;
    }
    info!("stopped cleanly");
    Ok(())
}

/// What history maintenance has done since the controller started (for
/// the metrics endpoint).
#[derive(Debug, Default, Clone, Copy)]
pub struct MaintenanceTotals {
    pub passes: u64,
    /// Wall time of the latest pass, seconds.
    pub last_seconds: f64,
    /// Controller time the latest pass ended.
    pub last_end_ms: u64,
    pub done: store::Maintenance,
}

/// Rollups and retention every `maintain_interval`.
async fn maintain(
    store: store::Store,
    index: Arc<index::Index>,
    recent: Arc<recent::Recent>,
    cfg: Arc<Config>,
    totals: Arc<std::sync::Mutex<MaintenanceTotals>>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(cfg.maintain_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // A bucket is rolled up once no sample for it can still arrive.
    let lateness_ms = 2 * cfg.sample_interval.as_millis() as u64 + 1000;
    loop {
        tokio::select! {
            _ = stop.changed() => return,
            _ = tick.tick() => {}
        }
        let vms: Vec<(String, u64)> = index
            .vms()
            .values()
            .map(|v| (v.vm_id.clone(), v.last_seen_ms))
            .collect();
        let hosts: Vec<String> = index.hosts().keys().map(|h| h.to_string()).collect();
        let s = store.clone();
        let started = std::time::Instant::now();
        let pass = match tokio::task::spawn_blocking(move || {
            s.maintain(&vms, &hosts, now_ms(), lateness_ms)
        })
        .await
        {
            Ok(p) => p,
            Err(e) => {
                warn!(error = %e, "history maintenance task failed; will retry");
                continue;
            }
        };
        let took = started.elapsed();
        if !pass.forgotten.is_empty() {
            let mut v = index.vms_mut();
            for id in &pass.forgotten {
                v.remove(id.as_str());
                if let Ok(id) = id.parse() {
                    recent.forget(&id);
                }
            }
        }
        if let Some((what, e)) = &pass.first_failure {
            warn!(
                failed = pass.done.failed_series,
                first = %what,
                error = %e,
                "history maintenance failed for some series (the others were maintained); \
                 the next pass tries again"
            );
        }
        tracing::debug!(m = ?pass.done, ?took, "history maintenance");
        let mut t = totals.lock().unwrap_or_else(|p| p.into_inner());
        t.passes += 1;
        t.last_seconds = took.as_secs_f64();
        t.last_end_ms = now_ms();
        t.done += pass.done;
    }
}
