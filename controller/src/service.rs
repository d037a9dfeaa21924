//! `wset.v1.ControllerService`: request validation (every refusal says what
//! to fix) and the conversions between the store's pages and the wire.

use std::sync::Arc;

use tonic::{Request, Response, Status};
use wset_proto::ids::{HostId, VmId};
use wset_proto::v1 as pb;

use crate::config::Config;
use crate::history::{Mergeable, Page, PageToken, Query, page};
use crate::index::Index;
use crate::now_ms;
use crate::store::{Store, StoreError};

/// Default and largest page sizes.
pub const DEFAULT_PAGE: u32 = 1000;
pub const MAX_PAGE: u32 = 10_000;
/// How far in the future a query's end may lie (clocks differ a little).
const FUTURE_SLACK_MS: u64 = 86_400_000;

#[derive(Debug, Clone)]
pub struct ControllerService {
    pub store: Store,
    pub index: Arc<Index>,
    pub cfg: Arc<Config>,
    /// One permit per open `WatchVms` stream.
    pub streams: Arc<tokio::sync::Semaphore>,
    /// Changes when the controller shuts down: streams end then.
    pub stop: tokio::sync::watch::Receiver<bool>,
}

/// `WatchVms` streams open at once.
pub const MAX_STREAMS: usize = 64;
/// Most VM ids one `WatchVms` request may name.
const MAX_WATCH_IDS: usize = 10_000;

impl From<StoreError> for Status {
    fn from(e: StoreError) -> Self {
        Status::internal(e.to_string())
    }
}

/// The range of a history request (both kinds carry the same fields).
macro_rules! range_of {
    ($r:expr) => {
        Range {
            start_ms: $r.start_ms,
            end_ms: $r.end_ms,
            resolution_ms: $r.resolution_ms,
            page_size: $r.page_size,
            page_token: std::mem::take(&mut $r.page_token),
        }
    };
}

/// The common fields of both history requests.
struct Range {
    start_ms: u64,
    end_ms: u64,
    resolution_ms: u64,
    page_size: u32,
    page_token: String,
}

fn query(r: Range, cfg: &Config, now: u64) -> Result<Query, Status> {
    let end_ms = if r.end_ms == 0 { now } else { r.end_ms };
    let span = cfg.max_query_span.as_millis() as u64;
    let mut r = r;
    if r.start_ms == 0 {
        let kept = cfg
            .levels
            .iter()
            .map(|l| l.retention_ms)
            .max()
            .unwrap_or(span);
        r.start_ms = end_ms.saturating_sub(kept.min(span)).max(1);
    }
    if r.start_ms >= end_ms {
        return Err(Status::invalid_argument(format!(
            "start_ms {} is not before end_ms {end_ms}: give a range [start_ms, end_ms) in milliseconds since the Unix epoch (end_ms 0 = now)",
            r.start_ms
        )));
    }
    if end_ms > now + FUTURE_SLACK_MS {
        return Err(Status::out_of_range(format!(
            "end_ms {end_ms} is more than a day in the future (now is {now}); use 0 for now"
        )));
    }
    if end_ms - r.start_ms > span {
        return Err(Status::out_of_range(format!(
            "the range spans {} ms, more than the {span} ms one query may cover; narrow it or page through smaller ranges",
            end_ms - r.start_ms
        )));
    }
    let page_size = match r.page_size {
        0 => DEFAULT_PAGE,
        n if n > MAX_PAGE => {
            return Err(Status::invalid_argument(format!(
                "page_size {n} is over {MAX_PAGE}; ask for at most {MAX_PAGE} and follow next_page_token"
            )));
        }
        n => n,
    };
    let token = if r.page_token.is_empty() {
        None
    } else {
        let t = PageToken::decode(&r.page_token).ok_or_else(|| {
            Status::invalid_argument(
                "page_token is not one this controller issued: pass next_page_token unchanged, with the same range",
            )
        })?;
        if !(r.start_ms..end_ms).contains(&t.next_start_ms) {
            return Err(Status::invalid_argument(
                "page_token lies outside [start_ms, end_ms): keep the range of the first page",
            ));
        }
        Some(t)
    };
    Ok(Query {
        start_ms: r.start_ms,
        end_ms,
        resolution_ms: r.resolution_ms,
        page_size: page_size as usize,
        token,
    })
}

/// The gaps on the wire, each with the host events from one point period
/// (`slack_ms`) before it to one after its end as the reason (the event
/// that ends a gap, a reconnection, comes with the point that closes it).
fn gaps_pb(gaps: &[(u64, u64)], events: &[pb::HostEvent], slack_ms: u64) -> Vec<pb::HistoryGap> {
    gaps.iter()
        .map(|&(start_ms, end_ms)| {
            let why: Vec<String> = events
                .iter()
                .filter(|e| {
                    (start_ms.saturating_sub(slack_ms)..=end_ms.saturating_add(slack_ms))
                        .contains(&e.timestamp_ms)
                })
                .map(|e| {
                    let kind =
                        pb::HostEventKind::try_from(e.kind).map_or("event".to_owned(), |k| {
                            k.as_str_name()
                                .trim_start_matches("HOST_EVENT_KIND_")
                                .to_lowercase()
                        });
                    format!("{kind}: {}", e.detail)
                })
                .collect();
            pb::HistoryGap {
                start_ms,
                end_ms,
                reason: if why.is_empty() {
                    "no samples".into()
                } else {
                    why.join("; ")
                },
            }
        })
        .collect()
}

/// The longest period among a page's points.
fn slack(p: &Page<impl Mergeable>) -> u64 {
    p.points
        .iter()
        .map(Mergeable::resolution_ms)
        .max()
        .unwrap_or(0)
}

impl ControllerService {
    /// Run a store query off the async workers.
    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Store) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, Status> {
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || f(&store))
            .await
            .map_err(|e| Status::internal(format!("history query task failed: {e}")))?
            .map_err(Status::from)
    }
}

fn token(p: &Page<impl Mergeable>) -> String {
    p.next.map(|t| t.encode()).unwrap_or_default()
}

/// A request's host id parsed, or the status that says what one is.
pub(crate) fn parse_host_id(h: &str) -> Result<HostId, Status> {
    HostId::parse(h).map_err(|e| Status::invalid_argument(format!("{e} (see ListAgents)")))
}

/// A request's optional host id (empty: every host), parsed.
pub(crate) fn host_filter(h: &str) -> Result<Option<HostId>, Status> {
    (!h.is_empty()).then(|| parse_host_id(h)).transpose()
}

#[tonic::async_trait]
impl pb::controller_service_server::ControllerService for ControllerService {
    async fn list_agents(
        &self,
        _req: Request<pb::ListAgentsRequest>,
    ) -> Result<Response<pb::ListAgentsResponse>, Status> {
        Ok(Response::new(pb::ListAgentsResponse {
            agents: self.index.agent_list(),
        }))
    }

    async fn list_cluster_vms(
        &self,
        req: Request<pb::ListClusterVmsRequest>,
    ) -> Result<Response<pb::ListClusterVmsResponse>, Status> {
        let host = host_filter(&req.into_inner().host_id)?;
        let mut vms: Vec<pb::ClusterVm> = self
            .index
            .vms()
            .values()
            .filter(|v| host.as_ref().is_none_or(|h| h == v.host_id.as_str()))
            .cloned()
            .collect();
        vms.sort_by(|a, b| a.vm_id.cmp(&b.vm_id));
        Ok(Response::new(pb::ListClusterVmsResponse { vms }))
    }

    type WatchVmsStream =
        tokio_stream::wrappers::ReceiverStream<Result<pb::WatchVmsResponse, Status>>;

    async fn watch_vms(
        &self,
        req: Request<pb::WatchVmsRequest>,
    ) -> Result<Response<Self::WatchVmsStream>, Status> {
        let r = req.into_inner();
        let host = host_filter(&r.host_id)?;
        if r.vm_ids.len() > MAX_WATCH_IDS {
            return Err(Status::invalid_argument(format!(
                "vm_ids names {} VMs; at most {MAX_WATCH_IDS} (leave it empty for every VM)",
                r.vm_ids.len()
            )));
        }
        let ids = r
            .vm_ids
            .iter()
            .map(|id| VmId::parse_in("vm_ids", id))
            .collect::<Result<std::collections::HashSet<VmId>, _>>()
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let permit = self.streams.clone().try_acquire_owned().map_err(|_| {
            Status::resource_exhausted(format!(
                "{MAX_STREAMS} WatchVms streams are open already; close one"
            ))
        })?;
        let mut rx = self.index.subscribe();
        let mut stop = self.stop.clone();
        let (tx, out) = tokio::sync::mpsc::channel(1);
        tokio::spawn(async move {
            let _permit = permit;
            let mut skipped = 0u64;
            loop {
                let update = tokio::select! {
                    u = rx.recv() => u,
                    () = tx.closed() => return,
                    _ = stop.changed() => return,
                };
                let vms = match update {
                    Ok(vms) => vms,
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                        skipped += n;
                        continue;
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                };
                let vms: Vec<pb::ClusterVm> = vms
                    .iter()
                    .filter(|v| {
                        host.as_ref().is_none_or(|h| h == v.host_id.as_str())
                            && (ids.is_empty() || ids.contains(v.vm_id.as_str()))
                    })
                    .cloned()
                    .collect();
                if vms.is_empty() {
                    continue;
                }
                let msg = pb::WatchVmsResponse {
                    vms,
                    skipped_updates: std::mem::take(&mut skipped),
                };
                if tx.send(Ok(msg)).await.is_err() {
                    return;
                }
            }
        });
        Ok(Response::new(tokio_stream::wrappers::ReceiverStream::new(
            out,
        )))
    }

    async fn get_vm_history(
        &self,
        req: Request<pb::GetVmHistoryRequest>,
    ) -> Result<Response<pb::GetVmHistoryResponse>, Status> {
        let mut r = req.into_inner();
        if r.vm_id.is_empty() {
            return Err(Status::invalid_argument("vm_id is required (see ListVms)"));
        }
        let vm = VmId::parse_in("vm_id", &r.vm_id)
            .map_err(|e| Status::invalid_argument(format!("{e} (see ListVms)")))?;
        let now = now_ms();
        let q = query(range_of!(r), &self.cfg, now)?;
        let known = self.index.vms().contains_key(&vm);
        if !known {
            return Err(Status::not_found(format!(
                "no VM {vm:?} has been reported by any agent (see ListVms)"
            )));
        }
        let out = self
            .blocking(move |store| {
                let p = page(&q, store.levels(), now, |b, s, e, n| {
                    store.vm_points(vm.as_str(), b, s, e, n)
                })?;
                // Gap reasons: the events of the hosts the VM was on.
                let mut hosts: Vec<&str> = p.points.iter().map(|x| x.host_id.as_str()).collect();
                hosts.sort_unstable();
                hosts.dedup();
                let mut events = Vec::new();
                if !p.gaps.is_empty() {
                    for h in hosts {
                        events.extend(store.host_events(
                            h,
                            p.from_ms.saturating_sub(1),
                            p.to_ms.saturating_add(1),
                        )?);
                    }
                }
                Ok(pb::GetVmHistoryResponse {
                    vm_id: vm.into_string(),
                    resolution_ms: p.resolution_ms,
                    gaps: gaps_pb(&p.gaps, &events, slack(&p)),
                    next_page_token: token(&p),
                    points: p.points,
                })
            })
            .await?;
        Ok(Response::new(out))
    }

    async fn get_host_history(
        &self,
        req: Request<pb::GetHostHistoryRequest>,
    ) -> Result<Response<pb::GetHostHistoryResponse>, Status> {
        let mut r = req.into_inner();
        if r.host_id.is_empty() {
            return Err(Status::invalid_argument(
                "host_id is required (see ListAgents)",
            ));
        }
        let host = parse_host_id(&r.host_id)?;
        let now = now_ms();
        let q = query(range_of!(r), &self.cfg, now)?;
        let known = self.index.hosts().contains_key(&host);
        if !known {
            return Err(Status::not_found(format!(
                "no agent has reported host {host:?} (see ListAgents)"
            )));
        }
        let out = self
            .blocking(move |store| {
                let p = page(&q, store.levels(), now, |b, s, e, n| {
                    store.host_points(host.as_str(), b, s, e, n)
                })?;
                let events = store.host_events(
                    host.as_str(),
                    p.from_ms.saturating_sub(1),
                    p.to_ms.saturating_add(1),
                )?;
                Ok(pb::GetHostHistoryResponse {
                    host_id: host.into_string(),
                    resolution_ms: p.resolution_ms,
                    gaps: gaps_pb(&p.gaps, &events, slack(&p)),
                    next_page_token: token(&p),
                    points: p.points,
                    events,
                })
            })
            .await?;
        Ok(Response::new(out))
    }
}
