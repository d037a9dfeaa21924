//! The agent's gRPC service (`wset.v1.AgentService`): requests checked,
//! work handed to the registry, the stream publisher and the host facts off
//! the async workers, answers put on the wire by `wire.rs`.

use std::sync::Arc;

use tonic::{Request, Response, Status};
use wset_proto::v1 as pb;

use crate::config::Config;
use crate::handshake::check_vm_id;
use crate::host::Identity;
use crate::registry::Registry;
use crate::stream::{Filter, Snapshot};
use crate::wire;

/// `wset.v1.AgentService` over the registry.
#[derive(Debug, Clone)]
pub struct AgentService {
    pub registry: Arc<Registry>,
    pub cfg: Arc<Config>,
    pub identity: Arc<Identity>,
    /// The publisher's channel; each stream subscribes to it.
    pub batches: Arc<tokio::sync::watch::Sender<Arc<Snapshot>>>,
    /// One permit per open summary stream (`--max-streams`).
    pub streams: Arc<tokio::sync::Semaphore>,
    /// Changes when the agent shuts down: streams end then.
    pub stop: tokio::sync::watch::Receiver<bool>,
}

#[tonic::async_trait]
impl pb::agent_service_server::AgentService for AgentService {
    async fn list_vms(
        &self,
        _req: Request<pb::ListVmsRequest>,
    ) -> Result<Response<pb::ListVmsResponse>, Status> {
        let vms = self.registry.list().iter().map(wire::vm_info).collect();
        Ok(Response::new(pb::ListVmsResponse { vms }))
    }

    async fn get_summary(
        &self,
        req: Request<pb::GetSummaryRequest>,
    ) -> Result<Response<pb::GetSummaryResponse>, Status> {
        let id = req.into_inner().vm_id;
        if id.is_empty() {
            return Err(Status::invalid_argument("vm_id is required (see ListVms)"));
        }
        let id = check_vm_id(&id).map_err(|e| Status::invalid_argument(e.to_string()))?;
        let registry = self.registry.clone();
        let cfg = self.cfg.clone();
        let host = self.identity.clone();
        // O(granules): keep it off the async workers.
        let out = tokio::task::spawn_blocking(move || {
            wire::vm_summary(&registry, &cfg, &host.host_id, &id)
        })
        .await
        .map_err(|e| Status::internal(format!("summary task failed: {e}")))??;
        Ok(Response::new(pb::GetSummaryResponse { summary: Some(out) }))
    }

    type WatchSummariesStream =
        tokio_stream::wrappers::ReceiverStream<Result<pb::WatchSummariesResponse, Status>>;

    async fn watch_summaries(
        &self,
        req: Request<pb::WatchSummariesRequest>,
    ) -> Result<Response<Self::WatchSummariesStream>, Status> {
        let filter = Filter::new(req.into_inner())?;
        let permit = self.streams.clone().try_acquire_owned().map_err(|_| {
            Status::resource_exhausted(format!(
                "{} summary streams are open already (--max-streams); close one or raise the limit",
                self.cfg.max_streams
            ))
        })?;
        // Capacity 1: a batch waits only while the reader reads the one before.
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        tokio::spawn(crate::stream::feed(
            self.batches.subscribe(),
            filter,
            tx,
            permit,
            self.stop.clone(),
        ));
        Ok(Response::new(tokio_stream::wrappers::ReceiverStream::new(
            rx,
        )))
    }

    async fn get_host_facts(
        &self,
        _req: Request<pb::GetHostFactsRequest>,
    ) -> Result<Response<pb::GetHostFactsResponse>, Status> {
        let (id, registry) = (self.identity.clone(), self.registry.clone());
        let interval_ms = self.cfg.interval.as_millis() as u64;
        let facts =
            tokio::task::spawn_blocking(move || crate::host::facts(&id, &registry, interval_ms))
                .await
                .map_err(|e| Status::internal(format!("host facts task failed: {e}")))?;
        Ok(Response::new(pb::GetHostFactsResponse {
            facts: Some(wire::host_facts(facts)),
        }))
    }
}
