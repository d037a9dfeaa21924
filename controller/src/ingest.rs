//! Ingest: finding agents (a static list and a DNS name re-resolved
//! periodically), one subscription task per agent with reconnect and
//! backoff, and the single writer thread that turns batches into history.
//!
//! Each agent's stream is read by its own task, which checks every batch
//! before anything of it is stored; a broken, stalled or lying agent ends
//! its own session and backs off, and never holds up another agent. The
//! writer thread is the only one that changes the VMs of the [`Index`]
//! (where each VM is, moves between hosts) and applies writes in arrival
//! order; a flusher thread makes them durable on a fixed period and
//! publishes, per agent, the controller time up to which everything
//! received is on disk. [`StoreHealth`] says whether both work.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tracing::{debug, error, info, warn};
use wset_proto::ids::{HostId, VmId};
use wset_proto::v1 as pb;
use wset_proto::v1::agent_service_client::AgentServiceClient;

use crate::config::Config;
use crate::history::{check_summary, host_point, raw_point};
use crate::index::Index;
use crate::now_ms;
use crate::store::{Store, Write};

/// Whether the history store takes writes and flushes, and what was lost
/// while it did not (for the metrics and the health service).
#[derive(Debug)]
pub struct StoreHealth {
    /// Batches (or events) whose write failed: lost.
    pub lost_writes: AtomicU64,
    pub failed_flushes: AtomicU64,
    write_failing: AtomicBool,
    flush_failing: AtomicBool,
    /// `true` while the latest write and the latest flush both worked.
    pub ok: watch::Sender<bool>,
}

impl Default for StoreHealth {
    fn default() -> Self {
        Self {
            lost_writes: AtomicU64::new(0),
            failed_flushes: AtomicU64::new(0),
            write_failing: AtomicBool::new(false),
            flush_failing: AtomicBool::new(false),
            ok: watch::Sender::new(true),
        }
    }
}

impl StoreHealth {
    fn set(&self, which: &AtomicBool, failing: bool) {
        which.store(failing, Ordering::Release);
        // Read under the channel's lock: the writer and the flusher never
        // leave a stale answer.
        self.ok.send_if_modified(|v| {
            let ok = !self.write_failing.load(Ordering::Acquire)
                && !self.flush_failing.load(Ordering::Acquire);
            std::mem::replace(v, ok) != ok
        });
    }
}

/// A failure that repeats (every batch on a full disk) is logged when it
/// starts, then at most every `COMPLAIN_EVERY` with how many failed since,
/// and once when it ends.
const COMPLAIN_EVERY: Duration = Duration::from_secs(10);

#[derive(Debug, Default)]
struct Complaint {
    /// When the failure was last logged; `None` while all is well.
    logged: Option<std::time::Instant>,
    /// Failures since then.
    since: u64,
    /// Failures since the failure started.
    total: u64,
}

impl Complaint {
    /// One more failure; `Some(n)` when it should be logged now (`n`
    /// failures since the last time it was).
    fn failed(&mut self) -> Option<u64> {
        self.since += 1;
        self.total += 1;
        match self.logged {
            Some(t) if t.elapsed() < COMPLAIN_EVERY => None,
            _ => {
                self.logged = Some(std::time::Instant::now());
                Some(std::mem::take(&mut self.since))
            }
        }
    }

    /// A success; `Some(n)` when it ends a failure of `n` attempts.
    fn worked(&mut self) -> Option<u64> {
        self.logged.take()?;
        self.since = 0;
        Some(std::mem::take(&mut self.total))
    }
}

/// One agent batch, checked, as the writer takes it.
#[derive(Debug)]
pub struct Batch {
    pub endpoint: String,
    pub received_ms: u64,
    pub resolution_ms: u64,
    /// The host's id, checked (its facts carry it as the wire has it).
    pub host_id: HostId,
    pub host: pb::HostFacts,
    /// Checked already, each with its VM's id.
    pub summaries: Vec<(VmId, pb::VmSummary)>,
    pub events: Vec<pb::HostEvent>,
}

/// What the subscription tasks hand the writer.
#[derive(Debug)]
pub enum Msg {
    Batch(Box<Batch>),
    Event {
        host_id: String,
        event: pb::HostEvent,
    },
    /// History copied from a peer replica, and the records of VMs this
    /// replica did not know (added to the index unless known by then).
    Repair {
        write: Box<Write>,
        records: Vec<pb::ClusterVm>,
    },
}

fn event(kind: pb::HostEventKind, detail: String) -> pb::HostEvent {
    event_at(now_ms(), kind, detail)
}

fn event_at(timestamp_ms: u64, kind: pb::HostEventKind, detail: String) -> pb::HostEvent {
    pb::HostEvent {
        timestamp_ms,
        kind: kind as i32,
        detail,
    }
}

/// A VM record is rewritten at least this often while the VM reports, so a
/// restarted controller knows roughly when it was last seen.
const RECORD_REFRESH_MS: u64 = 60_000;

/// The writer: applies every message in order until the channel closes.
pub fn writer(
    store: Store,
    index: Arc<Index>,
    recent: Arc<crate::recent::Recent>,
    health: Arc<StoreHealth>,
    mut rx: mpsc::Receiver<Msg>,
) {
    let mut persisted: HashMap<VmId, u64> = HashMap::new();
    let mut complaint = Complaint::default();
    while let Some(msg) = rx.blocking_recv() {
        let (w, endpoint, received_ms, updated) = match msg {
            Msg::Event { host_id, event } => (
                Write {
                    events: vec![(host_id, event)],
                    ..Default::default()
                },
                None,
                0,
                Vec::new(),
            ),
            Msg::Repair { write, records } => {
                let mut write = *write;
                let mut vms = index.vms_mut();
                for r in records {
                    let Ok(id) = r.vm_id.parse::<VmId>() else {
                        continue;
                    };
                    if let std::collections::hash_map::Entry::Vacant(e) = vms.entry(id) {
                        write.vm_records.push(r.clone());
                        e.insert(r);
                    }
                }
                (write, None, 0, Vec::new())
            }
            Msg::Batch(b) => {
                let span = tracing::info_span!(
                    "ingest",
                    agent = %b.endpoint,
                    host_id = %b.host_id,
                    summaries = b.summaries.len()
                );
                let _e = span.enter();
                let (endpoint, received_ms) = (b.endpoint.clone(), b.received_ms);
                let (w, updated) = index_batch(&index, &mut persisted, *b);
                (w, Some(endpoint), received_ms, updated)
            }
        };
        if let Err(e) = store.apply(&w) {
            // The batch is lost; every agent's durable mark stops
            // advancing, and the health service says NOT_SERVING.
            health.lost_writes.fetch_add(1, Ordering::Relaxed);
            health.set(&health.write_failing, true);
            if let Some(n) = complaint.failed() {
                error!(
                    error = %e,
                    dir = %store.dir().display(),
                    lost = n,
                    "history writes fail: batches are lost. Check the store's disk (space, \
                     permissions, errors); after an I/O error the store (sled) refuses every \
                     write until the controller restarts"
                );
            }
            continue;
        }
        if let Some(n) = complaint.worked() {
            info!(lost = n, "history writes work again");
            health.set(&health.write_failing, false);
        }
        // What the planner reads, in memory: every raw point stored.
        let raw = w.vm_points.iter().map(|(vm, p)| (vm, p)).chain(
            w.levelled_vm_points
                .iter()
                .filter(|(_, bucket, _)| *bucket == 0)
                .map(|(vm, _, p)| (vm, p)),
        );
        for (vm, p) in raw {
            recent.push(vm, crate::planner::Sample::from(p));
        }
        if let Some(ep) = endpoint {
            index.applied(ep, received_ms);
        }
        if !updated.is_empty() {
            index.publish(Arc::new(updated));
        }
    }
}

/// Update the VM index with one batch and build its write; also returns
/// the updated records when someone watches (`WatchVms`).
fn index_batch(
    index: &Index,
    persisted: &mut HashMap<VmId, u64>,
    b: Batch,
) -> (Write, Vec<pb::ClusterVm>) {
    let Batch {
        received_ms: now,
        resolution_ms,
        host_id,
        host,
        summaries,
        events,
        ..
    } = b;
    let h = host_id.as_str();
    let watched = index.watched();
    let mut updated = Vec::new();
    let mut w = Write {
        events: events.into_iter().map(|e| (h.to_owned(), e)).collect(),
        ..Default::default()
    };
    let retired = pb::VmState::Retired as i32;
    let mut vms = index.vms_mut();
    for (id, s) in &summaries {
        let point = raw_point(s, now, resolution_ms);
        let mut changed = false;
        let rec = vms.entry(id.clone()).or_insert_with(|| {
            changed = true;
            pb::ClusterVm {
                vm_id: id.to_string(),
                host_id: h.to_owned(),
                first_seen_ms: now,
                ..Default::default()
            }
        });
        if rec.host_id != h {
            if s.state == retired {
                // The old host still lists a VM that moved away: not news.
                continue;
            }
            info!(vm_id = %id, from = %rec.host_id, to = %h, "VM moved between hosts");
            w.events.push((
                h.to_owned(),
                event(
                    pb::HostEventKind::VmArrived,
                    format!("VM {id} arrived from host {}", rec.host_id),
                ),
            ));
            rec.previous_host_id = std::mem::replace(&mut rec.host_id, h.to_owned());
            rec.moved_at_ms = now;
            rec.moves += 1;
            changed = true;
        } else if rec.state == retired && s.state == retired {
            // Its last summary is stored already.
            continue;
        }
        changed |= rec.state != s.state
            || rec.name != s.name
            || rec.memory_bytes != s.memory_bytes
            || rec.methods != s.methods
            || rec.labels != s.labels;
        rec.name.clone_from(&s.name);
        rec.labels.clone_from(&s.labels);
        rec.memory_bytes = s.memory_bytes;
        rec.methods.clone_from(&s.methods);
        rec.state = s.state;
        rec.last_seen_ms = now;
        rec.latest = Some(point.clone());
        let due = persisted
            .get(id)
            .is_none_or(|&t| now.saturating_sub(t) >= RECORD_REFRESH_MS);
        if changed || due {
            persisted.insert(id.clone(), now);
            w.vm_records.push(rec.clone());
        }
        if watched {
            updated.push(rec.clone());
        }
        w.vm_points.push((id.to_string(), point));
    }
    drop(vms);
    let tracking: Vec<&pb::VmSummary> = summaries
        .iter()
        .map(|(_, s)| s)
        .filter(|s| s.state != retired)
        .collect();
    w.host_point = Some((
        h.to_owned(),
        host_point(&host, &tracking, now, resolution_ms),
    ));
    w.host_facts = Some(host);
    (w, updated)
}

/// Make writes durable every `period` until `stop` is set, then once more.
pub fn flusher(
    store: Store,
    index: Arc<Index>,
    health: Arc<StoreHealth>,
    period: Duration,
    stop: Arc<AtomicBool>,
) {
    let mut complaint = Complaint::default();
    loop {
        let last = stop.load(Ordering::Acquire);
        if !last {
            std::thread::sleep(period);
        }
        let applied = index.applied_so_far();
        match store.flush() {
            Ok(_) => {
                index.mark_durable(applied);
                if let Some(n) = complaint.worked() {
                    info!(failed = n, "history flushes work again");
                    health.set(&health.flush_failing, false);
                }
            }
            Err(e) => {
                health.failed_flushes.fetch_add(1, Ordering::Relaxed);
                health.set(&health.flush_failing, true);
                if let Some(n) = complaint.failed() {
                    error!(
                        error = %e,
                        dir = %store.dir().display(),
                        failed = n,
                        "history flushes fail: nothing new becomes durable. Check the store's disk"
                    );
                }
            }
        }
        if last {
            return;
        }
    }
}

/// How a session with an agent ended.
enum End {
    Cancelled,
    Failed {
        error: SessionError,
        had_batches: bool,
    },
}

/// Why a session with an agent failed: its `last_error` in `ListAgents`,
/// and the reason of the `DISCONNECTED` event when it had delivered.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("bad endpoint {endpoint:?}: {source}")]
    BadEndpoint {
        endpoint: String,
        source: tonic::transport::Error,
    },
    /// The TLS client configuration could not be made (its message and
    /// causes, as `wset_serve::tls` gives them).
    #[error("{0}")]
    Tls(String),
    #[error("agent TLS configuration: {0}")]
    TlsConfig(tonic::transport::Error),
    #[error("connect: {0}")]
    Connect(tonic::transport::Error),
    #[error("WatchSummaries: {}", .0.message())]
    Watch(tonic::Status),
    #[error("no batch for {0:?}: the agent stalled")]
    Stalled(Duration),
    #[error("stream broke: {}", .0.message())]
    Broke(tonic::Status),
    #[error("the agent ended the stream")]
    Ended,
    #[error(transparent)]
    Batch(#[from] BatchError),
}

/// Why a batch was not taken; it ends the session.
#[derive(Debug, thiserror::Error)]
pub enum BatchError {
    #[error("a batch without host facts: not a wset agent, or a broken one")]
    NoHostFacts,
    #[error(transparent)]
    BadHostId(#[from] wset_proto::ids::IdError),
    #[error("a batch of {0} summaries (at most {MAX_BATCH_VMS})")]
    TooLarge(usize),
    #[error("the controller is shutting down")]
    ShuttingDown,
}

/// Subscribe to one agent until cancelled, reconnecting with exponential
/// backoff (reset once a session delivered a batch).
pub async fn subscribe(
    endpoint: String,
    index: Arc<Index>,
    tx: mpsc::Sender<Msg>,
    cfg: Arc<Config>,
    mut cancel: watch::Receiver<bool>,
) {
    let mut backoff = cfg.backoff_min;
    let mut attempt: u32 = 0;
    loop {
        index.update_agent(&endpoint, |a| {
            a.state = pb::AgentConnectionState::Connecting as i32;
            a.retry_at_ms = 0;
        });
        let end = tokio::select! {
            _ = cancel.changed() => End::Cancelled,
            e = session(&endpoint, &index, &tx, &cfg) => e,
        };
        let (error, had_batches) = match end {
            End::Cancelled => return,
            End::Failed { error, had_batches } => (error, had_batches),
        };
        attempt += 1;
        if had_batches {
            backoff = cfg.backoff_min;
        }
        // Jitter (up to a quarter) so agents that failed together do not
        // all come back at the same instant.
        let jitter = (u64::from(attempt).wrapping_mul(0x9E37_79B9) ^ now_ms()) % 256;
        let wait = backoff + backoff * jitter as u32 / 1024;
        warn!(%endpoint, %error, retry_in = ?wait, "agent stream ended");
        let mut host_id = String::new();
        index.update_agent(&endpoint, |a| {
            a.state = pb::AgentConnectionState::BackingOff as i32;
            a.last_error = error.to_string();
            a.reconnects += 1;
            a.retry_at_ms = now_ms() + wait.as_millis() as u64;
            a.connected_since_ms = 0;
            host_id.clone_from(&a.host_id);
        });
        if had_batches && !host_id.is_empty() {
            let _ = tx
                .send(Msg::Event {
                    host_id,
                    event: event(
                        pb::HostEventKind::Disconnected,
                        format!("{endpoint}: {error}"),
                    ),
                })
                .await;
        }
        tokio::select! {
            _ = cancel.changed() => return,
            () = tokio::time::sleep(wait) => {}
        }
        backoff = (backoff * 2).min(cfg.backoff_max);
    }
}

async fn session(endpoint: &str, index: &Index, tx: &mpsc::Sender<Msg>, cfg: &Config) -> End {
    let fail = |error: SessionError, had_batches| End::Failed { error, had_batches };
    let scheme = if cfg.agent_tls.is_some() {
        "https"
    } else {
        "http"
    };
    let ep = match tonic::transport::Endpoint::from_shared(format!("{scheme}://{endpoint}")) {
        Ok(e) => e
            .connect_timeout(Duration::from_secs(5))
            .tcp_keepalive(Some(Duration::from_secs(30)))
            .http2_keep_alive_interval(Duration::from_secs(10))
            .keep_alive_timeout(Duration::from_secs(5)),
        Err(source) => {
            let endpoint = endpoint.to_owned();
            return fail(SessionError::BadEndpoint { endpoint, source }, false);
        }
    };
    let ep = match &cfg.agent_tls {
        None => ep,
        Some(t) => {
            let host = endpoint.rsplit_once(':').map_or(endpoint, |(h, _)| h);
            let host = host.trim_start_matches('[').trim_end_matches(']');
            let tls = wset_serve::tls::client_config(t, host)
                .map_err(|e| SessionError::Tls(format!("{e:#}")));
            match tls.and_then(|c| ep.tls_config(c).map_err(SessionError::TlsConfig)) {
                Ok(ep) => ep,
                Err(e) => return fail(e, false),
            }
        }
    };
    let channel = match ep.connect().await {
        Ok(c) => c,
        Err(e) => return fail(SessionError::Connect(e), false),
    };
    let mut client =
        AgentServiceClient::new(channel).max_decoding_message_size(cfg.max_batch_bytes);
    let req = pb::WatchSummariesRequest {
        min_interval_ms: cfg.sample_interval.as_millis() as u64,
        compact: true,
        ..Default::default()
    };
    let mut stream = match client.watch_summaries(req).await {
        Ok(r) => r.into_inner(),
        Err(s) => return fail(SessionError::Watch(s), false),
    };
    let mut had_batches = false;
    loop {
        let batch = match tokio::time::timeout(cfg.stall_timeout, stream.message()).await {
            Err(_) => return fail(SessionError::Stalled(cfg.stall_timeout), had_batches),
            Ok(Err(s)) => return fail(SessionError::Broke(s), had_batches),
            Ok(Ok(None)) => return fail(SessionError::Ended, had_batches),
            Ok(Ok(Some(b))) => b,
        };
        if let Err(error) = take_batch(endpoint, index, tx, cfg, batch, !had_batches).await {
            return fail(error.into(), had_batches);
        }
        had_batches = true;
    }
}

/// Most summaries one batch may carry.
pub const MAX_BATCH_VMS: usize = 100_000;

/// Check one batch and hand it to the writer. An error ends the session.
async fn take_batch(
    endpoint: &str,
    index: &Index,
    tx: &mpsc::Sender<Msg>,
    cfg: &Config,
    batch: pb::WatchSummariesResponse,
    first: bool,
) -> Result<(), BatchError> {
    let received_ms = now_ms();
    let host = batch.host.ok_or(BatchError::NoHostFacts)?;
    let host_id = HostId::parse_in("host_id", &host.host_id)?;
    if batch.summaries.len() > MAX_BATCH_VMS {
        return Err(BatchError::TooLarge(batch.summaries.len()));
    }
    let mut events = Vec::new();
    if first {
        let previous = index
            .hosts()
            .get(&host_id)
            .map(|h| h.agent_instance_id.clone());
        // Stamped when the agent made the batch, on the clock its points
        // carry: a busy controller takes the batch later, and a gap closed
        // by the batch's points must still find these as its reason.
        let now = now_ms();
        let at = match batch.timestamp_ms {
            0 => now,
            t => t.min(now),
        };
        events.push(event_at(
            at,
            pb::HostEventKind::Connected,
            format!("agent {} at {endpoint}", host.agent_instance_id),
        ));
        if let Some(prev) = previous.filter(|p| !p.is_empty() && *p != host.agent_instance_id) {
            events.push(event_at(
                at,
                pb::HostEventKind::AgentRestarted,
                format!(
                    "agent instance {prev} was replaced by {}",
                    host.agent_instance_id
                ),
            ));
        }
    }
    let mut rejected = 0u64;
    let summaries: Vec<(VmId, pb::VmSummary)> = batch
        .summaries
        .into_iter()
        .filter_map(|mut s| {
            if s.host_id.is_empty() {
                s.host_id.clone_from(&host.host_id);
            }
            let r = if s.host_id == host.host_id {
                check_summary(&s).map_err(|e| e.to_string())
            } else {
                Err(format!(
                    "{}: host_id {:?} in a batch of host {:?}",
                    s.vm_id, s.host_id, host.host_id
                ))
            };
            match r {
                Ok(id) => Some((id, s)),
                Err(e) => {
                    rejected += 1;
                    debug!(%endpoint, error = %e, "summary refused");
                    None
                }
            }
        })
        .collect();
    if rejected > 0 {
        warn!(%endpoint, rejected, "summaries refused as malformed");
    }
    let stored = summaries.len() as u64;
    let resolution_ms = (cfg.sample_interval.as_millis() as u64).max(host.tracking_interval_ms);
    index.hosts().insert(host_id.clone(), host.clone());
    index.update_agent(endpoint, |a| {
        a.state = pb::AgentConnectionState::Connected as i32;
        if a.connected_since_ms == 0 {
            a.connected_since_ms = received_ms;
        }
        a.last_batch_ms = received_ms;
        a.batches_received += 1;
        a.summaries_stored += stored;
        a.summaries_rejected += rejected;
        a.batches_skipped += batch.skipped_batches;
        a.clock_skew_ms = host.timestamp_ms as i64 - received_ms as i64;
        a.host_id.clone_from(&host.host_id);
        a.agent_instance_id.clone_from(&host.agent_instance_id);
        a.host = Some(host.clone());
        a.last_error.clear();
    });
    tx.send(Msg::Batch(Box::new(Batch {
        endpoint: endpoint.to_owned(),
        received_ms,
        resolution_ms,
        host_id,
        host,
        summaries,
        events,
    })))
    .await
    .map_err(|_| BatchError::ShuttingDown)
}

/// Run discovery until `stop` changes: subscribe to every static endpoint,
/// and to every address the DNS name resolves to, re-resolved each
/// `dns_refresh`; addresses that leave the DNS answer are unsubscribed.
pub async fn discover(
    cfg: Arc<Config>,
    index: Arc<Index>,
    tx: mpsc::Sender<Msg>,
    mut stop: watch::Receiver<bool>,
) {
    let mut running: HashMap<String, (watch::Sender<bool>, tokio::task::JoinHandle<()>)> =
        HashMap::new();
    let start = |endpoint: &str,
                 source: String,
                 running: &mut HashMap<
        String,
        (watch::Sender<bool>, tokio::task::JoinHandle<()>),
    >| {
        if running.contains_key(endpoint) {
            return;
        }
        info!(%endpoint, %source, "subscribing to agent");
        index.agents().insert(
            endpoint.to_owned(),
            pb::AgentStatus {
                endpoint: endpoint.to_owned(),
                source,
                state: pb::AgentConnectionState::Connecting as i32,
                ..Default::default()
            },
        );
        let (ctx, crx) = watch::channel(false);
        let h = tokio::spawn(subscribe(
            endpoint.to_owned(),
            index.clone(),
            tx.clone(),
            cfg.clone(),
            crx,
        ));
        running.insert(endpoint.to_owned(), (ctx, h));
    };
    for ep in &cfg.agents {
        start(ep, "static".into(), &mut running);
    }
    let statics: HashSet<&String> = cfg.agents.iter().collect();
    if let Some(dns) = &cfg.agents_dns {
        let source = format!("dns:{dns}");
        let mut tick = tokio::time::interval(cfg.dns_refresh);
        loop {
            tokio::select! {
                _ = stop.changed() => break,
                _ = tick.tick() => {}
            }
            let found: HashSet<String> = match tokio::net::lookup_host(dns.as_str()).await {
                Ok(addrs) => addrs.map(|a| a.to_string()).collect(),
                Err(e) => {
                    warn!(name = %dns, error = %e, "agent discovery: DNS lookup failed; keeping the agents known");
                    continue;
                }
            };
            for ep in &found {
                start(ep, source.clone(), &mut running);
            }
            let gone: Vec<String> = running
                .keys()
                .filter(|ep| !found.contains(*ep) && !statics.contains(ep))
                .cloned()
                .collect();
            for ep in gone {
                info!(endpoint = %ep, name = %dns, "agent left the DNS answer; unsubscribing");
                if let Some((c, h)) = running.remove(&ep) {
                    let _ = c.send(true);
                    let _ = h.await;
                }
                index.agents().remove(&ep);
            }
        }
    } else {
        let _ = stop.changed().await;
    }
    for (c, h) in running.into_values() {
        let _ = c.send(true);
        let _ = h.await;
    }
}
