//! Spans reach a real OTLP receiver: the test serves the OpenTelemetry
//! collector's TraceService (the opentelemetry-proto definitions, over
//! tonic) and starts the agent and the controller with the standard
//! `OTEL_EXPORTER_OTLP_ENDPOINT`. Registration, harvest, gRPC, ingest and
//! planning spans must arrive, each under its process's service name.

use std::collections::BTreeSet;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use wset_guest::script::{Script, Touch};
use wset_tests::harness::{Agent, AgentOpts, Controller, Guest, GuestKind, TempDir, bin, wait_for};

/// `(service.name, span name)` of every span received.
#[derive(Clone, Default)]
struct Receiver {
    spans: Arc<Mutex<Vec<(String, String)>>>,
}

#[tonic::async_trait]
impl TraceService for Receiver {
    async fn export(
        &self,
        req: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut got = self.spans.lock().unwrap();
        for rs in req.into_inner().resource_spans {
            let service = rs
                .resource
                .iter()
                .flat_map(|r| r.attributes.iter())
                .find(|kv| kv.key == "service.name")
                .and_then(|kv| kv.value.as_ref())
                .and_then(|v| match &v.value {
                    Some(Value::StringValue(s)) => Some(s.clone()),
                    _ => None,
                })
                .unwrap_or_default();
            for ss in rs.scope_spans {
                for sp in ss.spans {
                    got.push((service.clone(), sp.name));
                }
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

#[test]
fn spans_reach_a_real_otlp_receiver() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let receiver = Receiver::default();
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let addr = listener.local_addr().unwrap();
    let svc = TraceServiceServer::new(receiver.clone());
    rt.spawn(
        tonic::transport::Server::builder()
            .add_service(svc)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    let endpoint = format!("http://{addr}");
    let otel_env = [
        ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
        // Export every 200 ms instead of every 5 s.
        ("OTEL_BSP_SCHEDULE_DELAY", "200"),
    ];

    let agent = Agent::start(AgentOpts {
        env: otel_env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        ..Default::default()
    });
    let script = Script::steady(vec![Touch::read(0, 16)], 30_000);
    let _g = Guest::builder("otlp-1", script)
        .kind(GuestKind::Process)
        .start(&agent);
    // One gRPC call of our own on the agent.
    let _ = agent.list();

    let data = TempDir::new("otlp-ctl");
    let mut cmd = Command::new(bin("wset-controller"));
    cmd.args(Controller::args(
        &data.0,
        &[&agent.grpc_addr],
        &["--plan-interval", "1s"],
    ))
    .envs(otel_env);
    let _ctl = Controller::spawn(cmd);

    let want: BTreeSet<(String, String)> = [
        ("wset-agent", "register"),
        ("wset-agent", "harvest"),
        ("wset-agent", "grpc"),
        ("wset-controller", "ingest"),
        ("wset-controller", "plan"),
    ]
    .iter()
    .map(|(s, n)| (s.to_string(), n.to_string()))
    .collect();
    wait_for(
        Duration::from_secs(30),
        "registration, harvest, gRPC, ingest and plan spans at the receiver",
        || {
            let got: BTreeSet<(String, String)> =
                receiver.spans.lock().unwrap().iter().cloned().collect();
            want.is_subset(&got).then_some(())
        },
    );
    // The exporter's own transport is not traced into itself.
    let spans = receiver.spans.lock().unwrap().clone();
    assert!(
        spans
            .iter()
            .all(|(s, _)| s == "wset-agent" || s == "wset-controller"),
        "spans from an unexpected service: {spans:?}"
    );
}
