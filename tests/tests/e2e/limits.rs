//! The agent's gRPC limits, against the real binary: summary streams beyond
//! --max-streams are refused with RESOURCE_EXHAUSTED and a slot frees when a
//! reader hangs up; an oversized request is refused; the agent keeps
//! serving throughout.

use std::time::Duration;

use tonic::Code;
use wset_proto::v1 as pb;
use wset_proto::v1::agent_service_client::AgentServiceClient;
use wset_tests::harness::{Agent, AgentOpts};

#[test]
fn stream_limit_and_oversized_requests() {
    let agent = Agent::start(AgentOpts {
        extra: vec!["--max-streams".into(), "2".into()],
        ..Default::default()
    });
    let rt = tokio::runtime::Runtime::new().unwrap();
    let url = format!("http://{}", agent.grpc_addr);
    rt.block_on(async {
        let mut c = AgentServiceClient::connect(url.clone())
            .await
            .expect("connect");
        let open = |mut c: AgentServiceClient<tonic::transport::Channel>| async move {
            c.watch_summaries(pb::WatchSummariesRequest::default())
                .await
        };
        let mut s1 = open(c.clone()).await.expect("first stream").into_inner();
        let s2 = open(c.clone()).await.expect("second stream").into_inner();
        let e = open(c.clone()).await.expect_err("a third stream");
        assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
        assert!(e.message().contains("--max-streams"), "{e:?}");
        // The open streams still deliver.
        let b = tokio::time::timeout(Duration::from_secs(5), s1.message())
            .await
            .expect("a batch within 5 s")
            .expect("stream ok")
            .expect("a batch");
        // And go on delivering: a later batch, newer than the first.
        let later = tokio::time::timeout(Duration::from_secs(5), s1.message())
            .await
            .expect("a second batch within 5 s")
            .expect("stream ok")
            .expect("a batch");
        assert!(
            later.sequence > b.sequence,
            "batch {} after batch {}",
            later.sequence,
            b.sequence
        );
        // A reader hangs up: its slot frees.
        drop(s2);
        let mut again = None;
        for _ in 0..50 {
            if let Ok(s) = open(c.clone()).await {
                again = Some(s);
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(again.is_some(), "no stream slot freed after a reader left");
        // Bad filters and oversized requests.
        let e = c
            .watch_summaries(pb::WatchSummariesRequest {
                vm_ids: vec!["a/b".into()],
                ..Default::default()
            })
            .await
            .expect_err("bad vm id");
        assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
        let e = c
            .get_summary(pb::GetSummaryRequest {
                vm_id: "x".repeat(100 << 10),
            })
            .await
            .expect_err("oversized");
        assert!(
            matches!(e.code(), Code::OutOfRange | Code::ResourceExhausted),
            "{e:?}"
        );
        // Still serving.
        c.list_vms(pb::ListVmsRequest {})
            .await
            .expect("ListVms after all that");
    });
}
