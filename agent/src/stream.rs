//! Summary batches for `WatchSummaries`: one publisher computes every VM's
//! summary once per tracking interval (only while someone watches) and
//! publishes it in a `watch` channel; each stream takes the latest batch when
//! it is ready for one. Nothing queues: a slow reader skips batches (and is
//! told how many), and no tracker ever waits for a reader.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, mpsc, watch};
use tonic::Status;
use tracing::debug;
use wset_proto::ids::VmId;
use wset_proto::v1 as pb;

use crate::config::Config;
use crate::host::{Identity, facts};
use crate::registry::Registry;
use crate::wire;

/// Every VM's summary at one instant, on the wire already: computed once,
/// filtered for each stream.
#[derive(Debug, Default)]
pub struct Snapshot {
    /// 0 before the first batch.
    pub sequence: u64,
    pub timestamp_ms: u64,
    pub host: pb::HostFacts,
    pub vms: Vec<pb::VmSummary>,
}

/// Compute a batch now (O(granules) per VM: call off the async workers).
pub fn snapshot(registry: &Registry, cfg: &Config, id: &Identity, sequence: u64) -> Snapshot {
    let interval_ms = cfg.interval.as_millis() as u64;
    let vms = registry
        .list()
        .into_iter()
        // A VM forgotten between list and summary is simply left out.
        .filter_map(|v| wire::vm_summary(registry, cfg, &id.host_id, &v.info.vm_id).ok())
        .collect();
    Snapshot {
        sequence,
        timestamp_ms: crate::now_ms(),
        host: wire::host_facts(facts(id, registry, interval_ms)),
        vms,
    }
}

/// Publish a batch every tracking interval while at least one stream is
/// open, until `stop` changes.
pub async fn publish(
    registry: Arc<Registry>,
    cfg: Arc<Config>,
    id: Arc<Identity>,
    tx: Arc<watch::Sender<Arc<Snapshot>>>,
    mut stop: watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(cfg.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut sequence = 0;
    loop {
        tokio::select! {
            _ = stop.changed() => return,
            _ = tick.tick() => {}
        }
        if tx.receiver_count() == 0 {
            continue;
        }
        sequence += 1;
        let (r, c, i) = (registry.clone(), cfg.clone(), id.clone());
        match tokio::task::spawn_blocking(move || snapshot(&r, &c, &i, sequence)).await {
            Ok(s) => {
                tx.send_replace(Arc::new(s));
            }
            Err(e) => debug!(error = %e, "summary batch task failed"),
        }
    }
}

/// What one stream asked for, validated.
#[derive(Debug, Clone)]
pub struct Filter {
    vm_ids: Vec<VmId>,
    labels: BTreeMap<String, String>,
    min_interval: Duration,
    compact: bool,
}

/// Most VM ids one request may name.
pub const MAX_FILTER_IDS: usize = 10_000;
/// Longest min_interval_ms accepted.
pub const MAX_MIN_INTERVAL_MS: u64 = 3_600_000;

impl Filter {
    pub fn new(req: pb::WatchSummariesRequest) -> Result<Self, Status> {
        if req.vm_ids.len() > MAX_FILTER_IDS {
            return Err(Status::invalid_argument(format!(
                "vm_ids names {} VMs; at most {MAX_FILTER_IDS} (leave it empty for every VM)",
                req.vm_ids.len()
            )));
        }
        let vm_ids = req
            .vm_ids
            .iter()
            .map(|id| VmId::parse_in("vm_ids", id))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        if req.label_selector.len() > 64 {
            return Err(Status::invalid_argument(
                "label_selector has more than 64 labels",
            ));
        }
        if req.min_interval_ms > MAX_MIN_INTERVAL_MS {
            return Err(Status::invalid_argument(format!(
                "min_interval_ms {} is over an hour ({MAX_MIN_INTERVAL_MS}); poll GetSummary instead",
                req.min_interval_ms
            )));
        }
        Ok(Self {
            vm_ids,
            labels: req.label_selector.into_iter().collect(),
            min_interval: Duration::from_millis(req.min_interval_ms),
            compact: req.compact,
        })
    }

    fn batch(&self, s: &Snapshot, skipped_batches: u64) -> pb::WatchSummariesResponse {
        let summaries = s
            .vms
            .iter()
            .filter(|v| {
                (self.vm_ids.is_empty() || self.vm_ids.iter().any(|id| *id == *v.vm_id))
                    && self
                        .labels
                        .iter()
                        .all(|(k, val)| v.labels.get(k) == Some(val))
            })
            .map(|v| {
                let mut v = v.clone();
                if self.compact {
                    v.regions.clear();
                    if let Some(c) = v.counters.as_mut() {
                        c.fault_service_latency.clear();
                    }
                }
                v
            })
            .collect();
        pb::WatchSummariesResponse {
            host: Some(s.host.clone()),
            sequence: s.sequence,
            timestamp_ms: s.timestamp_ms,
            summaries,
            skipped_batches,
        }
    }
}

/// Feed one stream: the latest batch whenever the reader is ready and the
/// filter's interval has passed, until the reader goes away or the publisher
/// stops, or the agent shuts down (`stop` changes: the stream then ends
/// cleanly). Holds `permit` (the stream limit) while it runs.
pub async fn feed(
    mut rx: watch::Receiver<Arc<Snapshot>>,
    filter: Filter,
    tx: mpsc::Sender<Result<pb::WatchSummariesResponse, Status>>,
    permit: OwnedSemaphorePermit,
    mut stop: watch::Receiver<bool>,
) {
    let _permit = permit;
    // Batches made while a send waited on the reader: skipped for slowness.
    let mut slow_skipped = 0u64;
    loop {
        tokio::select! {
            r = rx.changed() => if r.is_err() { return },
            () = tx.closed() => return,
            _ = stop.changed() => return,
        }
        let snap = rx.borrow_and_update().clone();
        if snap.sequence == 0 {
            continue;
        }
        let sent_at = tokio::time::Instant::now();
        if tx
            .send(Ok(filter.batch(&snap, slow_skipped)))
            .await
            .is_err()
        {
            return;
        }
        slow_skipped = rx.borrow().sequence.saturating_sub(snap.sequence);
        if !filter.min_interval.is_zero() {
            tokio::select! {
                () = tokio::time::sleep_until(sent_at + filter.min_interval) => {}
                () = tx.closed() => return,
                _ = stop.changed() => return,
            }
        }
    }
}
