//! `wset.v1.ReplicaService`: a replica's status, and on the leader the
//! stream of its plans that followers mirror.

use std::sync::Arc;

use tonic::{Request, Response, Status};
use wset_proto::v1 as pb;

use super::{Leadership, Replica};
use crate::decide::Plans;
use crate::index::Index;

#[derive(Debug, Clone)]
pub struct ReplicaService {
    pub replica: Arc<Replica>,
    pub plans: Arc<Plans>,
    pub index: Arc<Index>,
    /// One permit per open `WatchPlans` stream.
    pub streams: Arc<tokio::sync::Semaphore>,
    pub stop: tokio::sync::watch::Receiver<bool>,
}

/// `WatchPlans` streams open at once (a follower holds one).
pub const MAX_STREAMS: usize = 16;

impl ReplicaService {
    pub fn status(&self) -> pb::GetReplicaResponse {
        let r = &self.replica;
        let l = r.leadership();
        let (leader_name, leader_addr) = match &l {
            Leadership::Alone | Leadership::Leader { .. } => {
                (r.name.clone(), r.advertise_addr().to_owned())
            }
            Leadership::Follower { leader: Some(ld) } => (ld.name.clone(), ld.addr.clone()),
            _ => (String::new(), String::new()),
        };
        let plan = self.plans.borrow().clone();
        let served = plan.filter(|p| r.servable(Some(p)).is_ok());
        let repair = r.repair_stats();
        pb::GetReplicaResponse {
            name: r.name.clone(),
            advertise_addr: r.advertise_addr().to_owned(),
            role: l.role() as i32,
            term: l.term().unwrap_or(0),
            leader_name,
            leader_addr,
            lease_remaining_ms: r.lease_remaining().map_or(0, |d| d.as_millis() as u64),
            etcd_error: match &l {
                Leadership::NoQuorum { error } => error.clone(),
                _ => String::new(),
            },
            plan_term: served.as_ref().map_or(0, |p| p.term),
            plan_id: served.map(|p| p.id.clone()).unwrap_or_default(),
            terms_led: r.terms_led(),
            repaired_points: repair.points,
            last_repair_ms: repair.last_ms,
            repair_error: repair.error,
            peers: r.peers().into_iter().map(|p| p.name).collect(),
        }
    }
}

#[tonic::async_trait]
impl pb::replica_service_server::ReplicaService for ReplicaService {
    async fn get_replica(
        &self,
        _req: Request<pb::GetReplicaRequest>,
    ) -> Result<Response<pb::GetReplicaResponse>, Status> {
        Ok(Response::new(self.status()))
    }

    type WatchPlansStream =
        tokio_stream::wrappers::ReceiverStream<Result<pb::WatchPlansResponse, Status>>;

    async fn watch_plans(
        &self,
        _req: Request<pb::WatchPlansRequest>,
    ) -> Result<Response<Self::WatchPlansStream>, Status> {
        let replica = self.replica.clone();
        let Leadership::Leader { term, .. } = replica.leadership() else {
            return Err(replica.why_not_planning().into());
        };
        let permit = self.streams.clone().try_acquire_owned().map_err(|_| {
            Status::resource_exhausted(format!(
                "{MAX_STREAMS} WatchPlans streams are open already; close one"
            ))
        })?;
        let mut rx = self.plans.subscribe();
        let mut leadership = replica.subscribe();
        let mut stop = self.stop.clone();
        let index = self.index.clone();
        let (tx, out) = tokio::sync::mpsc::channel(1);
        tokio::spawn(async move {
            let _permit = permit;
            let mut sent: Option<String> = None;
            loop {
                let p = rx.borrow_and_update().clone();
                leadership.borrow_and_update();
                if !replica.may_publish(term) {
                    let _ = tx.send(Err(replica.why_not_planning().into())).await;
                    return;
                }
                if let Some(p) = p.filter(|p| p.term == term && sent.as_ref() != Some(&p.id)) {
                    let memory = crate::scheduler::memory_of_vms(&index);
                    let plan = Some(crate::scheduler::replicated(&p, &memory));
                    if tx.send(Ok(pb::WatchPlansResponse { plan })).await.is_err() {
                        return;
                    }
                    sent = Some(p.id.clone());
                }
                tokio::select! {
                    r = rx.changed() => if r.is_err() { return },
                    r = leadership.changed() => if r.is_err() { return },
                    () = tx.closed() => return,
                    _ = stop.changed() => return,
                }
            }
        });
        Ok(Response::new(tokio_stream::wrappers::ReceiverStream::new(
            out,
        )))
    }
}
