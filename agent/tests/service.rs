//! The agent's gRPC service in process, over an in-memory duplex stream (no
//! socket, no device, no root): every bogus argument gets a status a
//! person can act on, and the stream limit holds. Tracking itself needs
//! real uffds and is tested end to end in `tests/`.

use std::sync::Arc;

use hyper_util::rt::TokioIo;
use tonic::Code;
use tonic::transport::{Endpoint, Server};
use wset_agent::Config;
use wset_agent::host::Identity;
use wset_agent::registry::Registry;
use wset_agent::service::AgentService;
use wset_agent::stream::{MAX_FILTER_IDS, MAX_MIN_INTERVAL_MS, Snapshot};
use wset_proto::v1 as pb;
use wset_proto::v1::agent_service_client::AgentServiceClient;
use wset_proto::v1::agent_service_server::AgentServiceServer;

type Client = AgentServiceClient<tonic::transport::Channel>;

/// The service with no VM, `max_streams` summary streams allowed.
async fn client(max_streams: usize) -> (Client, tokio::sync::watch::Sender<bool>) {
    let cfg = Config {
        max_streams,
        ..Config::default()
    };
    let (stop_tx, stop) = tokio::sync::watch::channel(false);
    let svc = AgentService {
        registry: Arc::new(Registry::default()),
        cfg: Arc::new(cfg),
        identity: Arc::new(Identity::new(
            "in-process-host".into(),
            0,
            Some(1 << 30),
            Default::default(),
        )),
        batches: Arc::new(tokio::sync::watch::channel(Arc::new(Snapshot::default())).0),
        streams: Arc::new(tokio::sync::Semaphore::new(max_streams)),
        stop,
    };
    let (near, far) = tokio::io::duplex(1 << 20);
    tokio::spawn(
        Server::builder()
            .add_service(AgentServiceServer::new(svc))
            .serve_with_incoming(tokio_stream::once(Ok::<_, std::io::Error>(far))),
    );
    let mut near = Some(near);
    let channel = Endpoint::from_static("http://in-process")
        .connect_with_connector(tower::service_fn(move |_| {
            let io = near.take().map(TokioIo::new);
            async move { io.ok_or_else(|| std::io::Error::other("the duplex is used already")) }
        }))
        .await
        .expect("connect over the duplex");
    (AgentServiceClient::new(channel), stop_tx)
}

#[tokio::test]
async fn an_agent_without_vms_answers_every_call() {
    let (mut c, _stop) = client(4).await;
    let vms = c
        .list_vms(pb::ListVmsRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(vms.vms.is_empty());
    let facts = c
        .get_host_facts(pb::GetHostFactsRequest {})
        .await
        .unwrap()
        .into_inner()
        .facts
        .expect("GetHostFacts answers with the facts");
    assert_eq!(facts.host_id, "in-process-host");
    assert_eq!(facts.vm_capacity_bytes, 1 << 30);
    assert!(facts.memory_total_bytes > 0, "{facts:?}");
    assert_eq!(facts.vms_tracking, 0);
}

#[tokio::test]
async fn bogus_summary_requests_say_what_is_wrong() {
    let (mut c, _stop) = client(4).await;
    let get = |id: &str| pb::GetSummaryRequest {
        vm_id: id.to_owned(),
    };
    let e = c.get_summary(get("")).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains("vm_id is required"), "{e:?}");
    let e = c.get_summary(get("no spaces allowed")).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    let e = c.get_summary(get(&"x".repeat(10_000))).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    let e = c.get_summary(get("not-here")).await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    assert!(e.message().contains("not-here"), "{e:?}");
}

#[tokio::test]
async fn bogus_stream_requests_say_what_is_wrong() {
    let (mut c, _stop) = client(4).await;
    let too_many = pb::WatchSummariesRequest {
        vm_ids: (0..=MAX_FILTER_IDS).map(|i| format!("vm-{i}")).collect(),
        ..Default::default()
    };
    let e = c.watch_summaries(too_many).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains("at most"), "{e:?}");
    let bad_id = pb::WatchSummariesRequest {
        vm_ids: vec!["bad id".into()],
        ..Default::default()
    };
    let e = c.watch_summaries(bad_id).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(e.message().starts_with("vm_ids"), "{e:?}");
    let slow = pb::WatchSummariesRequest {
        min_interval_ms: MAX_MIN_INTERVAL_MS + 1,
        ..Default::default()
    };
    let e = c.watch_summaries(slow).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains("GetSummary"), "{e:?}");
}

#[tokio::test]
async fn streams_past_the_limit_are_refused_and_a_closed_one_frees_its_slot() {
    let (mut c, _stop) = client(2).await;
    let open = pb::WatchSummariesRequest::default();
    let first = c.watch_summaries(open.clone()).await.expect("first stream");
    let _second = c
        .watch_summaries(open.clone())
        .await
        .expect("second stream");
    let e = c.watch_summaries(open.clone()).await.unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    assert!(e.message().contains("--max-streams"), "{e:?}");
    drop(first);
    // The slot frees once the server sees the stream go: wait for it.
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        match c.watch_summaries(open.clone()).await {
            Ok(_) => break,
            Err(e) if e.code() == Code::ResourceExhausted => {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "the closed stream's slot never came back"
                );
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            }
            Err(e) => panic!("{e:?}"),
        }
    }
}
