//! History repair from peers: every `--repair-interval` a replica asks a
//! peer (one it knows from the election) for the history it lacks, over
//! the ordinary `ControllerService` history API, paged, and stores what
//! fills its gaps through the writer, each point marked with the replica
//! it came from (`repaired_from`). A replica that was down, or lost its
//! disk, so ends up with its peers' history; a gap stays only where no
//! replica has the data.
//!
//! Which points are missing ([`missing`], pure): a peer's point that falls
//! in one of this replica's gaps (before its first point, after its last,
//! or between two of its points further apart than 1.9 resolutions) and is
//! not a sample this replica holds. A raw sample is known by the agent's
//! stamp, the same on every replica (each replica stamps its own arrival
//! time, so those differ by milliseconds); this replica's points are read a
//! little wider than the peer's so a sample on either side of an edge is
//! still found. Rollup buckets start at the same instants everywhere.
//! Every level is repaired: raw samples over the raw retention, each rollup
//! over its own. The first pass covers the whole retention; later passes
//! the time since the previous one (and a margin), so a pass costs what
//! the recent past holds.
//!
//! A bucket this replica rolls up from its own and repaired samples says
//! `repaired_from: "mixed"`.
//!
//! VMs this replica never saw (it lost its disk, or was down while they
//! lived) arrive with their records from the peer's `ListClusterVms`. Host
//! history is repaired for the hosts this replica knows (every connected
//! agent reports its host).

use std::sync::Arc;

use tokio::sync::{mpsc, watch};
use tracing::{debug, info, warn};
use wset_proto::v1 as pb;
use wset_proto::v1::controller_service_client::ControllerServiceClient;

use super::{DialError, Peer, Replica};
use crate::config::Config;
use crate::index::Index;
use crate::ingest::Msg;
use crate::store::{Store, StoreError, Write};

/// Points per page asked of a peer (the history API's most).
const PAGE: u32 = 10_000;
/// Points stored per write sent to the writer.
const WRITE_CHUNK: usize = 5_000;

/// Why a repair pass against one peer stopped.
#[derive(Debug, thiserror::Error)]
pub enum RepairError {
    #[error(transparent)]
    Dial(#[from] DialError),
    #[error("{call} on peer {peer}")]
    Call {
        call: &'static str,
        peer: String,
        #[source]
        status: tonic::Status,
    },
    #[error("read this replica's history")]
    Store(#[from] StoreError),
    #[error("history read task failed")]
    Task(#[from] tokio::task::JoinError),
    #[error("the writer has stopped")]
    WriterGone,
}

/// What repair needs.
#[derive(Clone, Debug)]
pub struct Repairer {
    pub store: Store,
    pub index: Arc<Index>,
    pub cfg: Arc<Config>,
    pub replica: Arc<Replica>,
    pub tx: mpsc::Sender<Msg>,
}

/// One point as [`missing`] compares it: its time, its resolution, and the
/// agent's stamp of its sample (raw VM points), which is the same on every
/// replica that received the sample.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stamp {
    pub t: u64,
    pub res: u64,
    pub sample: Option<u64>,
}

/// The peer's points that fall in this replica's gaps: before its first
/// point, after its last, or between two of its points further apart than
/// the history API calls a gap (1.9 resolutions), and not a sample this
/// replica has (the same agent stamp; without one, within a quarter of a
/// resolution). Both runs are sorted by time.
pub fn missing<P: Clone>(mine: &[Stamp], theirs: &[P], at: impl Fn(&P) -> Stamp) -> Vec<P> {
    let same = |a: &Stamp, b: &Stamp| match (a.sample, b.sample) {
        (Some(x), Some(y)) => x == y,
        _ => a.t.abs_diff(b.t) * 4 < a.res.max(b.res).max(1),
    };
    // Every sample of ours, wherever it lies: the same sample may sit a
    // few milliseconds apart on two replicas, past a neighbour.
    let ours: std::collections::HashSet<u64> = mine.iter().filter_map(|m| m.sample).collect();
    let mut out = Vec::new();
    let mut next = 0;
    for p in theirs {
        let q = at(p);
        while next < mine.len() && mine[next].t <= q.t {
            next += 1;
        }
        let (before, after) = (next.checked_sub(1).map(|i| &mine[i]), mine.get(next));
        let in_gap = match (before, after) {
            (Some(b), Some(a)) => {
                let r = b.res.max(a.res).max(1);
                (a.t - b.t) * 10 > r * 19
            }
            _ => true,
        };
        let dup = q.sample.is_some_and(|x| ours.contains(&x))
            || before.is_some_and(|b| same(b, &q))
            || after.is_some_and(|a| same(a, &q));
        if in_gap && !dup {
            out.push(p.clone());
        }
    }
    out
}

/// Where a pass over `level` starts: after the previous pass's cover
/// (`since`), within the level's retention; `None` when nothing is left
/// before `until`.
fn window_start(
    since: Option<u64>,
    now: u64,
    level: &crate::history::Level,
    until: u64,
) -> Option<u64> {
    let from = since
        .unwrap_or(0)
        .max(now.saturating_sub(level.retention_ms));
    (from < until).then_some(from)
}

/// Whether a point from a page answered at `page_res` belongs to the
/// series of `bucket_ms` asked for (the API may answer from a coarser
/// series where this one does not reach back).
fn of_series(bucket_ms: u64, page_res: u64, point_res: u64) -> bool {
    (bucket_ms == 0) == (page_res == 0) && (bucket_ms == 0 || point_res == bucket_ms)
}

/// A VM point's stamp: raw points carry the agent's stamp of their sample.
fn vm_stamp(p: &pb::VmHistoryPoint) -> Stamp {
    Stamp {
        t: p.timestamp_ms,
        res: p.resolution_ms,
        sample: (p.samples == 1 && p.agent_timestamp_ms > 0).then_some(p.agent_timestamp_ms),
    }
}

fn host_stamp(p: &pb::HostHistoryPoint) -> Stamp {
    Stamp {
        t: p.timestamp_ms,
        res: p.resolution_ms,
        sample: None,
    }
}

/// Mark a copied point with where it came from (kept when the peer had it
/// from a third replica).
fn source(repaired_from: &mut String, peer: &str) {
    if repaired_from.is_empty() {
        peer.clone_into(repaired_from);
    }
}

/// Repair every `--repair-interval` while replicas are known, until `stop`.
pub async fn run(r: Repairer, mut stop: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(r.cfg.repair_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Until a whole pass has worked, every pass covers the whole retention.
    let mut covered_until: Option<u64> = None;
    loop {
        tokio::select! {
            _ = stop.changed() => return,
            _ = tick.tick() => {}
        }
        let peers: Vec<Peer> = r
            .replica
            .peers()
            .into_iter()
            .filter(|p| p.name != r.replica.name)
            .collect();
        if peers.is_empty() {
            continue;
        }
        let now = crate::now_ms();
        // Samples still arriving are not missing yet.
        let until = now.saturating_sub(2 * r.cfg.sample_interval.as_millis() as u64 + 1000);
        let since =
            covered_until.map(|c| c.saturating_sub(r.cfg.stall_timeout.as_millis() as u64 * 2));
        let mut first_error = None;
        let mut copied = 0;
        for peer in &peers {
            let pass = tokio::select! {
                _ = stop.changed() => return,
                p = pass(&r, peer, since, until) => p,
            };
            match pass {
                Ok(n) => {
                    copied = n;
                    first_error = None;
                    covered_until = Some(until);
                    if n > 0 {
                        info!(peer = %peer.name, points = n, "history repaired from a peer");
                    }
                    break;
                }
                Err(e) => {
                    let e = wset_serve::error_chain(&e);
                    debug!(peer = %peer.name, error = %e, "history repair from this peer failed");
                    first_error.get_or_insert(e);
                }
            }
        }
        if let Some(e) = &first_error {
            warn!(error = %e, "history repair failed against every peer; the next pass tries again");
        }
        r.replica.repaired(copied, first_error);
    }
}

/// One pass against `peer` over `[since (or each level's retention), until)`.
async fn pass(
    r: &Repairer,
    peer: &Peer,
    since: Option<u64>,
    until: u64,
) -> Result<u64, RepairError> {
    let channel = super::dial(&peer.addr, r.cfg.peer_tls.as_ref()).await?;
    let mut client = ControllerServiceClient::new(channel).max_decoding_message_size(256 << 20);
    let call = |call: &'static str| {
        let peer = peer.name.clone();
        move |status| RepairError::Call { call, peer, status }
    };
    let vms = client
        .list_cluster_vms(pb::ListClusterVmsRequest::default())
        .await
        .map_err(call("ListClusterVms"))?
        .into_inner()
        .vms;
    // Records of VMs this replica never saw go first, so their history can
    // be asked of it as soon as it is stored.
    let unknown: Vec<pb::ClusterVm> = {
        let known = r.index.vms();
        vms.iter()
            .filter(|v| {
                v.vm_id
                    .parse::<wset_proto::ids::VmId>()
                    .is_ok_and(|id| !known.contains_key(&id))
            })
            .cloned()
            .collect()
    };
    if !unknown.is_empty() {
        send(r, Write::default(), unknown).await?;
    }
    let now = crate::now_ms();
    let levels = r.store.levels().to_vec();
    let mut copied = 0u64;
    // Ours is read a little wider than theirs, so that a sample both hold,
    // stamped on either side of an edge, is still seen as ours.
    let pad_of = |bucket_ms: u64| 2 * bucket_ms.max(r.cfg.sample_interval.as_millis() as u64);
    for vm in &vms {
        for level in &levels {
            let pad = pad_of(level.bucket_ms);
            let Some(from) = window_start(since, now, level, until) else {
                continue;
            };
            let theirs = vm_history(
                &mut client,
                &peer.name,
                &vm.vm_id,
                level.bucket_ms,
                from,
                until,
            )
            .await?;
            if theirs.is_empty() {
                continue;
            }
            let (s, id, b) = (r.store.clone(), vm.vm_id.clone(), level.bucket_ms);
            let vm_id = vm.vm_id.clone();
            copied += fill(
                r,
                peer,
                theirs,
                move || s.vm_points(&id, b, from.saturating_sub(pad), until + pad, usize::MAX),
                vm_stamp,
                |p| &mut p.repaired_from,
                |chunk| Write {
                    levelled_vm_points: chunk
                        .iter()
                        .map(|p| (vm_id.clone(), b, p.clone()))
                        .collect(),
                    ..Default::default()
                },
            )
            .await?;
        }
    }
    let hosts: Vec<String> = r.index.hosts().keys().map(|h| h.to_string()).collect();
    for host in &hosts {
        for level in &levels {
            let pad = pad_of(level.bucket_ms);
            let Some(from) = window_start(since, now, level, until) else {
                continue;
            };
            let theirs =
                match host_history(&mut client, &peer.name, host, level.bucket_ms, from, until)
                    .await
                {
                    Ok(t) => t,
                    // A host the peer has no agent report of.
                    Err(RepairError::Call { status, .. })
                        if status.code() == tonic::Code::NotFound =>
                    {
                        break;
                    }
                    Err(e) => return Err(e),
                };
            if theirs.is_empty() {
                continue;
            }
            let (s, id, b) = (r.store.clone(), host.clone(), level.bucket_ms);
            copied += fill(
                r,
                peer,
                theirs,
                move || s.host_points(&id, b, from.saturating_sub(pad), until + pad, usize::MAX),
                host_stamp,
                |p| &mut p.repaired_from,
                |chunk| Write {
                    levelled_host_points: chunk
                        .iter()
                        .map(|p| (host.clone(), b, p.clone()))
                        .collect(),
                    ..Default::default()
                },
            )
            .await?;
        }
    }
    Ok(copied)
}

/// Store the peer's points of one series that fall in this replica's gaps
/// (read by `mine`), marked with their source; how many.
#[allow(clippy::too_many_arguments)]
async fn fill<P: Clone + Send + 'static>(
    r: &Repairer,
    peer: &Peer,
    theirs: Vec<P>,
    mine: impl FnOnce() -> Result<Vec<P>, StoreError> + Send + 'static,
    stamp: fn(&P) -> Stamp,
    source_of: fn(&mut P) -> &mut String,
    write: impl Fn(&[P]) -> Write,
) -> Result<u64, RepairError> {
    let mine: Vec<Stamp> =
        tokio::task::spawn_blocking(move || mine().map(|v| v.iter().map(stamp).collect()))
            .await??;
    let mut lack = missing(&mine, &theirs, stamp);
    for p in &mut lack {
        source(source_of(p), &peer.name);
    }
    for chunk in lack.chunks(WRITE_CHUNK) {
        send(r, write(chunk), Vec::new()).await?;
    }
    Ok(lack.len() as u64)
}

async fn send(r: &Repairer, write: Write, records: Vec<pb::ClusterVm>) -> Result<(), RepairError> {
    r.tx.send(Msg::Repair {
        write: Box::new(write),
        records,
    })
    .await
    .map_err(|_| RepairError::WriterGone)
}

/// A peer's points of one VM series in `[from, until)`, every page; a VM
/// the peer does not know has none.
async fn vm_history(
    client: &mut ControllerServiceClient<tonic::transport::Channel>,
    peer: &str,
    vm: &str,
    bucket_ms: u64,
    from: u64,
    until: u64,
) -> Result<Vec<pb::VmHistoryPoint>, RepairError> {
    let mut out = Vec::new();
    let mut token = String::new();
    loop {
        let page = client
            .get_vm_history(pb::GetVmHistoryRequest {
                vm_id: vm.to_owned(),
                start_ms: from.max(1),
                end_ms: until,
                resolution_ms: bucket_ms,
                page_size: PAGE,
                page_token: std::mem::take(&mut token),
            })
            .await;
        let page = match page {
            Ok(p) => p.into_inner(),
            Err(s) if s.code() == tonic::Code::NotFound => return Ok(out),
            Err(status) => {
                return Err(RepairError::Call {
                    call: "GetVmHistory",
                    peer: peer.to_owned(),
                    status,
                });
            }
        };
        out.extend(
            page.points
                .into_iter()
                .filter(|p| of_series(bucket_ms, page.resolution_ms, p.resolution_ms)),
        );
        if page.next_page_token.is_empty() {
            return Ok(out);
        }
        token = page.next_page_token;
    }
}

/// As [`vm_history`], for a host.
async fn host_history(
    client: &mut ControllerServiceClient<tonic::transport::Channel>,
    peer: &str,
    host: &str,
    bucket_ms: u64,
    from: u64,
    until: u64,
) -> Result<Vec<pb::HostHistoryPoint>, RepairError> {
    let mut out = Vec::new();
    let mut token = String::new();
    loop {
        let page = client
            .get_host_history(pb::GetHostHistoryRequest {
                host_id: host.to_owned(),
                start_ms: from.max(1),
                end_ms: until,
                resolution_ms: bucket_ms,
                page_size: PAGE,
                page_token: std::mem::take(&mut token),
            })
            .await
            .map_err(|status| RepairError::Call {
                call: "GetHostHistory",
                peer: peer.to_owned(),
                status,
            })?
            .into_inner();
        out.extend(
            page.points
                .into_iter()
                .filter(|p| of_series(bucket_ms, page.resolution_ms, p.resolution_ms)),
        );
        if page.next_page_token.is_empty() {
            return Ok(out);
        }
        token = page.next_page_token;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(t: u64, sample: u64) -> Stamp {
        Stamp {
            t,
            res: 1000,
            sample: Some(sample),
        }
    }

    #[test]
    fn only_what_falls_in_our_gaps_and_is_not_our_sample_is_missing() {
        // Ours: samples 1, 2, then a hole, then 6, 7 (stamped a few ms
        // after the peer stamped the same samples).
        let mine = [raw(1003, 1), raw(2004, 2), raw(6002, 6), raw(7001, 7)];
        let theirs: Vec<Stamp> = (0..=8).map(|i| raw(i * 1000, i)).collect();
        let lack: Vec<u64> = missing(&mine, &theirs, |p| *p)
            .iter()
            .map(|p| p.t)
            .collect();
        // Before our first point, in the hole, and after our last.
        assert_eq!(lack, [0, 3000, 4000, 5000, 8000]);
        // Nothing of ours: all of theirs; all of ours: none.
        assert_eq!(missing(&[], &theirs, |p| *p), theirs);
        assert!(missing(&theirs, &theirs, |p| *p).is_empty());
        // Between two points of ours no gap apart, a sample of theirs we
        // skipped is not missing: repair fills gaps, it does not merge
        // streams.
        let dense = [raw(1000, 1), raw(2000, 3)];
        assert!(missing(&dense, &[raw(1500, 2)], |p| *p).is_empty());
        // A distinct sample just before our first point is missing; the
        // same sample stamped earlier by the peer is not.
        assert_eq!(
            missing(&[raw(1000, 5)], &[raw(800, 4), raw(950, 5)], |p| *p),
            [raw(800, 4)]
        );
        // Rollup buckets (no sample stamp) match by their start.
        let b = |t| Stamp {
            t,
            res: 60_000,
            sample: None,
        };
        let lack = missing(
            &[b(0), b(180_000)],
            &[b(0), b(60_000), b(120_000), b(180_000)],
            |p| *p,
        );
        assert_eq!(lack, [b(60_000), b(120_000)]);
    }

    #[test]
    fn a_copied_point_keeps_its_first_source() {
        let mut s = String::new();
        source(&mut s, "r1");
        assert_eq!(s, "r1");
        let mut s = "r0".to_owned();
        source(&mut s, "r1");
        assert_eq!(s, "r0");
    }
}
