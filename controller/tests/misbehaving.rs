//! The controller (in-process, real gRPC over loopback TCP, real sled)
//! against agents that misbehave, and against bogus requests: a lying agent
//! (impossible sizes, bad ids, a clock ten years off), one that stalls, one
//! that sends batches without host facts and one that answers with garbage
//! bytes. None of them corrupts history or holds up a good agent's ingest;
//! every bogus request gets the right status and a message that says what to
//! fix.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio_stream::Stream;
use tonic::{Code, Request, Response, Status};
use wset_controller::Config;
use wset_controller::history::Level;
use wset_proto::v1 as pb;
use wset_proto::v1::agent_service_server::{AgentService, AgentServiceServer};
use wset_proto::v1::controller_service_client::ControllerServiceClient;

#[derive(Clone, Copy, Debug, PartialEq)]
enum Behaviour {
    /// Good and bad summaries, clock ten years ahead.
    Liar,
    /// One batch, then nothing.
    Staller,
    /// Batches without host facts.
    NoFacts,
}

#[derive(Debug, Clone)]
struct FakeAgent {
    how: Behaviour,
    host: &'static str,
    sent: Arc<AtomicU64>,
}

fn now_ms() -> u64 {
    wset_controller::now_ms()
}

fn summary(vm: &str, mem: u64, wss: u64) -> pb::VmSummary {
    pb::VmSummary {
        vm_id: vm.into(),
        memory_bytes: mem,
        windows: vec![pb::WindowWorkingSet {
            window_ms: 10_000,
            wss_bytes: wss,
            dirty_bytes: 0,
            complete: true,
        }],
        state: pb::VmState::Tracking as i32,
        ..Default::default()
    }
}

type BatchStream = Pin<Box<dyn Stream<Item = Result<pb::WatchSummariesResponse, Status>> + Send>>;

#[tonic::async_trait]
impl AgentService for FakeAgent {
    async fn list_vms(
        &self,
        _: Request<pb::ListVmsRequest>,
    ) -> Result<Response<pb::ListVmsResponse>, Status> {
        Err(Status::unimplemented("fake"))
    }
    async fn get_summary(
        &self,
        _: Request<pb::GetSummaryRequest>,
    ) -> Result<Response<pb::GetSummaryResponse>, Status> {
        Err(Status::unimplemented("fake"))
    }
    async fn get_host_facts(
        &self,
        _: Request<pb::GetHostFactsRequest>,
    ) -> Result<Response<pb::GetHostFactsResponse>, Status> {
        Err(Status::unimplemented("fake"))
    }

    type WatchSummariesStream = BatchStream;

    async fn watch_summaries(
        &self,
        req: Request<pb::WatchSummariesRequest>,
    ) -> Result<Response<BatchStream>, Status> {
        let every = Duration::from_millis(req.into_inner().min_interval_ms.max(50));
        let me = self.clone();
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        tokio::spawn(async move {
            for seq in 1.. {
                if me.how == Behaviour::Staller && seq > 1 {
                    tokio::time::sleep(Duration::from_secs(3600)).await;
                }
                let ten_years = 10 * 365 * 86_400_000;
                let host = pb::HostFacts {
                    host_id: me.host.into(),
                    agent_instance_id: "fake".into(),
                    timestamp_ms: now_ms() + ten_years,
                    memory_total_bytes: 64 << 30,
                    tracking_interval_ms: 50,
                    ..Default::default()
                };
                let mut nan = summary("nan-1", 1 << 30, 1);
                nan.dirty_rate_bytes_per_s = f64::NAN;
                let b = pb::WatchSummariesResponse {
                    host: (me.how != Behaviour::NoFacts).then_some(host),
                    sequence: seq,
                    timestamp_ms: now_ms() + ten_years,
                    summaries: vec![
                        summary(&format!("{}-good", me.host), 1 << 30, 1 << 20),
                        summary("huge-1", 1 << 30, 1 << 40),
                        summary("bad/id", 1 << 30, 1),
                        summary("zero-1", 0, 0),
                        nan,
                    ],
                    skipped_batches: 0,
                };
                let mut b = b;
                for s in &mut b.summaries {
                    s.timestamp_ms = now_ms() + ten_years;
                }
                me.sent.fetch_add(1, Ordering::Relaxed);
                if tx.send(Ok(b)).await.is_err() {
                    return;
                }
                tokio::time::sleep(every).await;
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }
}

async fn serve_fake(how: Behaviour, host: &'static str) -> String {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap().to_string();
    let svc = FakeAgent {
        how,
        host,
        sent: Arc::default(),
    };
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(AgentServiceServer::new(svc))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(l)),
    );
    addr
}

/// A TCP server that answers every connection with garbage bytes.
async fn serve_garbage() -> String {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap().to_string();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            use tokio::io::AsyncWriteExt;
            let _ = s.write_all(&[0x5a; 4096]).await;
        }
    });
    addr
}

fn free_addr() -> std::net::SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

async fn wait<T>(what: &str, mut f: impl AsyncFnMut() -> Option<T>) -> T {
    let end = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(tokio::time::Instant::now() < end, "{what}: not within 20 s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn misbehaving_agents_and_bogus_requests() {
    let liar = serve_fake(Behaviour::Liar, "liar").await;
    let good = serve_fake(Behaviour::Liar, "good").await;
    let staller = serve_fake(Behaviour::Staller, "staller").await;
    let nofacts = serve_fake(Behaviour::NoFacts, "nofacts").await;
    let garbage = serve_garbage().await;
    let dir = std::env::temp_dir().join(format!("wset-misbehaving-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let addr = free_addr();
    let cfg = Config {
        grpc_addr: addr,
        data_dir: dir.clone(),
        agents: vec![
            liar.clone(),
            good.clone(),
            staller.clone(),
            nofacts.clone(),
            garbage.clone(),
        ],
        sample_interval: Duration::from_millis(100),
        stall_timeout: Duration::from_secs(1),
        backoff_min: Duration::from_millis(100),
        backoff_max: Duration::from_millis(500),
        flush_interval: Duration::from_millis(100),
        // Raw samples for 4 s, rolled up into 1 s buckets kept an hour.
        levels: vec![
            Level {
                bucket_ms: 0,
                retention_ms: 4000,
            },
            Level {
                bucket_ms: 1000,
                retention_ms: 3_600_000,
            },
        ],
        maintain_interval: Duration::from_millis(300),
        ..Config::default()
    };
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let ctl = tokio::spawn(wset_controller::run(cfg, async move {
        let _ = stop_rx.await;
    }));
    let mut c = wait("controller up", async || {
        ControllerServiceClient::connect(format!("http://{addr}"))
            .await
            .ok()
    })
    .await;

    // Misbehaving agents: each fails on its own, saying why.
    let status = |agents: &[pb::AgentStatus], ep: &str| {
        agents.iter().find(|a| a.endpoint == ep).cloned().unwrap()
    };
    let agents = wait("every misbehaviour seen", async || {
        let a = c
            .list_agents(pb::ListAgentsRequest {})
            .await
            .ok()?
            .into_inner()
            .agents;
        let s = status(&a, &staller);
        let n = status(&a, &nofacts);
        let g = status(&a, &garbage);
        let ok = status(&a, &good);
        (s.reconnects >= 1
            && s.last_error.contains("stalled")
            && n.last_error.contains("without host facts")
            && g.reconnects >= 1
            && !g.last_error.is_empty()
            && ok.batches_received >= 20)
            .then_some(a)
    })
    .await;
    for a in &agents {
        println!(
            "{} -> state {} reconnects {} error {:?}",
            a.endpoint, a.state, a.reconnects, a.last_error
        );
    }
    let l = status(&agents, &liar);
    assert!(l.summaries_rejected >= 4 * l.batches_received - 4, "{l:#?}");
    assert!(l.clock_skew_ms > 300 * 86_400_000, "{l:#?}");
    assert_eq!(l.state, pb::AgentConnectionState::Connected as i32);

    // Only good summaries were stored, in controller time.
    let vms = c
        .list_cluster_vms(pb::ListClusterVmsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .vms;
    let ids: Vec<&str> = vms.iter().map(|v| v.vm_id.as_str()).collect();
    assert_eq!(ids, ["good-good", "liar-good", "staller-good"], "{vms:#?}");
    let h = c
        .get_vm_history(pb::GetVmHistoryRequest {
            vm_id: "good-good".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let now = now_ms();
    assert!(h.points.len() >= 20);
    for p in &h.points {
        assert!(
            p.timestamp_ms <= now && p.timestamp_ms + 60_000 > now,
            "{p:#?}"
        );
        assert!(p.agent_timestamp_ms > now + 300 * 86_400_000);
    }

    // Maintenance ran in the background: raw samples older than their 4 s
    // retention are gone, and the 1 s rollups hold what they summarised.
    let (h, rolled) = wait("raw samples expired and rolled up", async || {
        let ask = |resolution_ms| pb::GetVmHistoryRequest {
            vm_id: "good-good".into(),
            resolution_ms,
            page_size: 10_000,
            ..Default::default()
        };
        let h = c.get_vm_history(ask(0)).await.ok()?.into_inner();
        let rolled = c.get_vm_history(ask(1000)).await.ok()?.into_inner();
        let age = now_ms().saturating_sub(h.points[0].timestamp_ms);
        (age < 5000
            && rolled.points.len() >= 3
            && rolled.points[0].timestamp_ms < h.points[0].timestamp_ms)
            .then_some((h, rolled))
    })
    .await;
    assert_eq!(rolled.resolution_ms, 1000);
    for (i, p) in rolled.points.iter().enumerate() {
        assert_eq!(p.resolution_ms, 1000);
        // About ten 100 ms samples a second; the first bucket began mid-way.
        let least = if i == 0 { 1 } else { 5 };
        assert!((least..=11).contains(&p.samples), "{p:#?}");
        assert_eq!(p.windows[0].wss_bytes, 1 << 20);
        assert_eq!(p.windows[0].wss_max_bytes, 1 << 20);
    }
    println!(
        "{} raw points kept, {} one-second rollups",
        h.points.len(),
        rolled.points.len()
    );

    // Paging walks every point exactly once.
    let h = c
        .get_vm_history(pb::GetVmHistoryRequest {
            vm_id: "good-good".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let total = h.points.len();
    let mut req = pb::GetVmHistoryRequest {
        vm_id: "good-good".into(),
        start_ms: h.points[0].timestamp_ms,
        end_ms: h.points[total - 1].timestamp_ms + 1,
        page_size: 3,
        ..Default::default()
    };
    let whole = req.clone();
    let mut seen: Vec<u64> = Vec::new();
    loop {
        let p = c.get_vm_history(req.clone()).await.unwrap().into_inner();
        assert!(p.points.len() <= 3);
        seen.extend(p.points.iter().map(|p| p.timestamp_ms));
        if p.next_page_token.is_empty() {
            break;
        }
        req.page_token = p.next_page_token;
    }
    // Retention (raw=4s here) may drop the oldest points while the pages
    // are read, and new ones arrive: every point there before and after
    // the walk was seen, in order, once, and nothing else was.
    let after = c
        .get_vm_history(pb::GetVmHistoryRequest {
            page_token: String::new(),
            page_size: 10_000,
            ..whole
        })
        .await
        .unwrap()
        .into_inner();
    let before: std::collections::BTreeSet<u64> = h.points.iter().map(|p| p.timestamp_ms).collect();
    let after: std::collections::BTreeSet<u64> =
        after.points.iter().map(|p| p.timestamp_ms).collect();
    assert!(
        seen.windows(2).all(|w| w[0] < w[1]),
        "pages out of order or repeated: {seen:?}"
    );
    for t in before.intersection(&after) {
        assert!(
            seen.contains(t),
            "point {t} was there throughout, and no page had it"
        );
    }
    for t in &seen {
        assert!(
            before.contains(t) || after.contains(t),
            "a page had {t}, which no read had"
        );
    }
    let kept = before.intersection(&after).count();
    assert!(
        kept > 0,
        "no point of {total} outlived the walk: it cannot be checked"
    );

    // Bogus requests.
    let vm = |vm_id: &str, start_ms, end_ms, page_size, page_token: &str| pb::GetVmHistoryRequest {
        vm_id: vm_id.into(),
        start_ms,
        end_ms,
        resolution_ms: 0,
        page_size,
        page_token: page_token.into(),
    };
    let cases: Vec<(pb::GetVmHistoryRequest, Code, &str)> = vec![
        (
            vm("", 0, 0, 0, ""),
            Code::InvalidArgument,
            "vm_id is required",
        ),
        (vm("a/b", 0, 0, 0, ""), Code::InvalidArgument, "A-Z a-z 0-9"),
        (vm("nope", 0, 0, 0, ""), Code::NotFound, "ListVms"),
        (
            vm("good-good", 10, 5, 0, ""),
            Code::InvalidArgument,
            "not before end_ms",
        ),
        (vm("good-good", 1, 0, 0, ""), Code::OutOfRange, "narrow it"),
        (
            vm("good-good", 1, now + 10 * 86_400_000, 0, ""),
            Code::OutOfRange,
            "future",
        ),
        (
            vm("good-good", 0, 0, 20_000, ""),
            Code::InvalidArgument,
            "page_size",
        ),
        (
            vm("good-good", 0, 0, 0, "junk"),
            Code::InvalidArgument,
            "page_token",
        ),
        (
            vm("good-good", now - 1000, now, 0, "v1.5"),
            Code::InvalidArgument,
            "outside",
        ),
        (
            vm(&"x".repeat(100 << 10), 0, 0, 0, ""),
            Code::OutOfRange,
            "",
        ),
    ];
    for (req, code, text) in cases {
        let what = format!("{:?}", &req.vm_id.chars().take(20).collect::<String>());
        let e = c.get_vm_history(req).await.expect_err(&what);
        assert_eq!(e.code(), code, "{what}: {e:?}");
        assert!(e.message().contains(text), "{what}: {e:?}");
    }
    let e = c
        .get_host_history(pb::GetHostHistoryRequest {
            host_id: "nohost".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    let e = c
        .list_cluster_vms(pb::ListClusterVmsRequest {
            host_id: "bad host".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    let hh = c
        .get_host_history(pb::GetHostHistoryRequest {
            host_id: "good".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(
        hh.points.iter().all(|p| p.vms == 1),
        "only the good VM counts"
    );

    // Ingest went on for the good agent throughout.
    let before = status(&agents, &good).batches_received;
    let after = wait("good agent still ingested", async || {
        let a = c
            .list_agents(pb::ListAgentsRequest {})
            .await
            .ok()?
            .into_inner()
            .agents;
        let n = status(&a, &good).batches_received;
        (n > before + 5).then_some(n)
    })
    .await;
    println!("good agent: {before} -> {after} batches while the others misbehaved");
    let _ = stop_tx.send(());
    ctl.await.unwrap().unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}
