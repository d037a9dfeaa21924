//! Reflection describes exactly what each server serves: every service it
//! lists is one the server answers, and every method of every listed
//! service is called here (an empty request, which decodes as any
//! message's defaults) and must come back with anything but UNIMPLEMENTED.
//! The services a server does not serve (the agent has no SchedulerService,
//! the controller no AgentService) must not be listed.

use std::time::Duration;

use prost::Message;
use prost::bytes::{Buf, BufMut, Bytes};
use prost_types::FileDescriptorProto;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::transport::Channel;
use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
use tonic_reflection::pb::v1::{ServerReflectionRequest, ServerReflectionResponse};
use wset_guest::script::{Script, Touch};
use wset_tests::harness::{Agent, AgentOpts, Controller, Guest, GuestKind, TempDir, wait_for};

/// Messages as raw protobuf bytes, so that any method can be called
/// without its generated types.
#[derive(Clone, Copy, Default)]
struct Raw;

impl Codec for Raw {
    type Encode = Bytes;
    type Decode = Bytes;
    type Encoder = Raw;
    type Decoder = Raw;
    fn encoder(&mut self) -> Raw {
        Raw
    }
    fn decoder(&mut self) -> Raw {
        Raw
    }
}

impl Encoder for Raw {
    type Item = Bytes;
    type Error = tonic::Status;
    fn encode(&mut self, item: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), tonic::Status> {
        dst.put_slice(&item);
        Ok(())
    }
}

impl Decoder for Raw {
    type Item = Bytes;
    type Error = tonic::Status;
    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Bytes>, tonic::Status> {
        Ok(Some(src.copy_to_bytes(src.remaining())))
    }
}

/// One reflection request and its answer.
async fn ask(ch: &Channel, request: MessageRequest) -> MessageResponse {
    let mut client = ServerReflectionClient::new(ch.clone());
    let req = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(request),
    };
    let mut answers = client
        .server_reflection_info(tokio_stream::once(req))
        .await
        .expect("reflection answers")
        .into_inner();
    let ServerReflectionResponse {
        message_response, ..
    } = answers
        .message()
        .await
        .expect("a reflection answer")
        .expect("the stream holds an answer");
    message_response.expect("the answer says something")
}

/// The services reflection v1alpha lists.
async fn v1alpha_list(ch: &Channel) -> Vec<String> {
    use tonic_reflection::pb::v1alpha::ServerReflectionRequest;
    use tonic_reflection::pb::v1alpha::server_reflection_client::ServerReflectionClient as Client;
    use tonic_reflection::pb::v1alpha::server_reflection_request::MessageRequest as Req;
    use tonic_reflection::pb::v1alpha::server_reflection_response::MessageResponse as Resp;
    let req = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(Req::ListServices(String::new())),
    };
    let mut answers = Client::new(ch.clone())
        .server_reflection_info(tokio_stream::once(req))
        .await
        .expect("reflection v1alpha answers")
        .into_inner();
    match answers
        .message()
        .await
        .expect("an answer")
        .and_then(|a| a.message_response)
    {
        Some(Resp::ListServicesResponse(l)) => l.service.into_iter().map(|s| s.name).collect(),
        other => panic!("v1alpha ListServices answered {other:?}"),
    }
}

/// A method as reflection describes it.
struct Method {
    path: String,
    client_streaming: bool,
    server_streaming: bool,
}

/// Every service the server lists, with its methods.
async fn listed(ch: &Channel) -> Vec<(String, Vec<Method>)> {
    let MessageResponse::ListServicesResponse(list) =
        ask(ch, MessageRequest::ListServices(String::new())).await
    else {
        panic!("ListServices answered with something else");
    };
    let mut out = Vec::new();
    for s in list.service {
        let MessageResponse::FileDescriptorResponse(files) =
            ask(ch, MessageRequest::FileContainingSymbol(s.name.clone())).await
        else {
            panic!("no file describes {}", s.name);
        };
        let mut methods = None;
        for raw in &files.file_descriptor_proto {
            let f = FileDescriptorProto::decode(raw.as_slice()).expect("a file descriptor");
            for svc in &f.service {
                if format!("{}.{}", f.package(), svc.name()) == s.name {
                    methods = Some(
                        svc.method
                            .iter()
                            .map(|m| Method {
                                path: format!("/{}/{}", s.name, m.name()),
                                client_streaming: m.client_streaming(),
                                server_streaming: m.server_streaming(),
                            })
                            .collect::<Vec<_>>(),
                    );
                }
            }
        }
        let methods = methods.unwrap_or_else(|| panic!("{} is listed but not described", s.name));
        out.push((s.name, methods));
    }
    out
}

/// Call one method with an empty request; the status it answered with
/// (OK for a stream that opened).
async fn call(ch: &Channel, m: &Method) -> tonic::Code {
    let mut grpc = tonic::client::Grpc::new(ch.clone());
    grpc.ready().await.expect("the channel is ready");
    let path: tonic::codegen::http::uri::PathAndQuery = m.path.parse().expect("a method path");
    let result = match (m.client_streaming, m.server_streaming) {
        (false, false) => grpc
            .unary(tonic::Request::new(Bytes::new()), path, Raw)
            .await
            .map(drop),
        (false, true) => grpc
            .server_streaming(tonic::Request::new(Bytes::new()), path, Raw)
            .await
            .map(drop),
        (true, false) => grpc
            .client_streaming(
                tonic::Request::new(tokio_stream::once(Bytes::new())),
                path,
                Raw,
            )
            .await
            .map(drop),
        (true, true) => grpc
            .streaming(
                tonic::Request::new(tokio_stream::once(Bytes::new())),
                path,
                Raw,
            )
            .await
            .map(drop),
    };
    match result {
        Ok(()) => tonic::Code::Ok,
        Err(status) => status.code(),
    }
}

/// Check one server: exactly `want` (beside health and reflection) is
/// listed, and every listed method is served.
async fn check(what: &str, addr: &str, want: &[&str]) {
    let ch = Channel::from_shared(format!("http://{addr}"))
        .expect("an address")
        .connect_timeout(Duration::from_secs(10))
        .timeout(Duration::from_secs(30))
        .connect()
        .await
        .unwrap_or_else(|e| panic!("{what}: connect to {addr}: {e}"));
    let services = listed(&ch).await;
    let mut names: Vec<&str> = services.iter().map(|(n, _)| n.as_str()).collect();
    names.sort_unstable();
    let mut expected: Vec<&str> = want
        .iter()
        .copied()
        .chain(wset_serve::STANDARD_SERVICES)
        .collect();
    expected.sort_unstable();
    assert_eq!(names, expected, "{what}: reflection lists {names:?}");
    // The older reflection version lists the same.
    let mut old = v1alpha_list(&ch).await;
    old.sort_unstable();
    assert_eq!(old, expected, "{what}: reflection v1alpha lists {old:?}");
    let mut calls = 0;
    for (service, methods) in &services {
        assert!(!methods.is_empty(), "{what}: {service} has no methods");
        for m in methods {
            let code = call(&ch, m).await;
            assert!(
                !matches!(
                    code,
                    tonic::Code::Unimplemented
                        | tonic::Code::DeadlineExceeded
                        | tonic::Code::Cancelled
                ),
                "{what}: {} is listed but answers {code:?} (unimplemented, or no answer in 30 s)",
                m.path
            );
            println!("{what}: {} -> {code:?}", m.path);
            calls += 1;
        }
    }
    println!(
        "{what}: {} services, {calls} methods, none UNIMPLEMENTED",
        services.len()
    );
}

#[test]
fn reflection_lists_exactly_what_each_server_serves() {
    let agent = Agent::start(AgentOpts::default());
    let script = Script::steady(vec![Touch::read(16, 50)], 30_000);
    let _g = Guest::builder("refl-1", script)
        .kind(GuestKind::Process)
        .start(&agent);
    let data = TempDir::new("reflection");
    let ctl = Controller::start(&data.0, &[&agent.grpc_addr], &[]);
    wait_for(Duration::from_secs(30), "the controller has the VM", || {
        ctl.vms().iter().any(|v| v.vm_id == "refl-1").then_some(())
    });
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    rt.block_on(async {
        check("agent", &agent.grpc_addr, &["wset.v1.AgentService"]).await;
        check(
            "controller",
            &ctl.grpc_addr,
            &[
                "wset.v1.ControllerService",
                "wset.v1.SchedulerService",
                "wset.v1.ReplicaService",
            ],
        )
        .await;
    });
}
