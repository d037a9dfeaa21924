//! The kube-scheduler extender against a running controller with three
//! agents (three hosts on loopback) and real KVM guests: the JSON
//! kube-scheduler posts (a KubeVirt virt-launcher pod, plain pods, node
//! names and whole node objects) is filtered and scored as the planner's
//! own ranking (`RankHosts`, from the same plan) says, with reasons that
//! name the shortfall; malformed and oversized bodies get 400 with a
//! message, and the controller goes on serving.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use serde_json::{Value, json};
use tonic::transport::Channel;
use wset_guest::script::{Phase, Script, Touch};
use wset_proto::v1 as pb;
use wset_proto::v1::scheduler_service_client::SchedulerServiceClient;
use wset_tests::harness::{
    Agent, AgentOpts, Backing, Controller, Guest, TempDir, free_loopback_addr, wait_for,
};

const MIB: u64 = 1 << 20;
/// Memory each host gives VMs: the watermark (85%) is 68 MiB.
const CAPACITY: u64 = 80 * MIB;
/// The extender's body limit in this test.
const MAX_BODY: usize = 64 << 10;

fn agent(host: &str, addr: &str) -> Agent {
    Agent::start(AgentOpts::planner_host(host, addr, CAPACITY))
}

/// A 32 MiB KVM guest writing `mib` MiB over and over (its writes are
/// what the agent sees, WP_ASYNC).
fn guest(a: &Agent, vm: &str, mib: u32) -> Guest {
    let script = Script {
        phases: vec![Phase {
            name: "steady".into(),
            touches: vec![Touch::write(16, mib * 256)],
            duration_ms: 3_600_000,
            period_ms: 100,
        }],
        checksum_every: 0,
    };
    Guest::builder(vm, script).backing(Backing::Anon).start(a)
}

/// One HTTP/1.1 request (`Content-Length` given, or that of `body`); the
/// status and the body of the answer.
fn http(addr: &str, method: &str, path: &str, body: &[u8], length: Option<usize>) -> (u16, String) {
    let mut s = TcpStream::connect(addr)
        .unwrap_or_else(|e| panic!("connect to the extender at {addr}: {e}"));
    s.set_read_timeout(Some(Duration::from_secs(60)))
        .expect("timeout");
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n",
        length.unwrap_or(body.len())
    );
    s.write_all(head.as_bytes()).expect("send the request head");
    s.write_all(body).expect("send the request body");
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).expect("read the answer");
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("not an HTTP answer: {text:?}"));
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no status in {head:?}"));
    assert!(
        !head
            .to_ascii_lowercase()
            .contains("transfer-encoding: chunked"),
        "a chunked answer: {head}"
    );
    (status, body.to_owned())
}

fn post(addr: &str, verb: &str, body: &Value) -> (u16, String) {
    http(
        addr,
        "POST",
        &format!("/{verb}"),
        body.to_string().as_bytes(),
        None,
    )
}

fn post_ok(addr: &str, verb: &str, body: &Value) -> Value {
    let (status, text) = post(addr, verb, body);
    assert_eq!(status, 200, "{verb}: {text}");
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{verb} answered non-JSON ({e}): {text}"))
}

/// A KubeVirt virt-launcher pod for VMI `name` in `ns`, as virt-controller
/// makes it: labels and annotations, and the compute container's memory
/// request (guest memory and overhead).
fn virt_launcher(ns: &str, name: &str, memory: &str, extra: Value) -> Value {
    let mut annotations = json!({
        "kubevirt.io/domain": name,
        "kubectl.kubernetes.io/default-container": "compute",
        "kubevirt.io/migrationTransportUnix": "true"
    });
    if let (Some(a), Some(x)) = (annotations.as_object_mut(), extra.as_object()) {
        a.extend(x.clone());
    }
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": format!("virt-launcher-{name}-x7k2p"),
            "generateName": format!("virt-launcher-{name}-"),
            "namespace": ns,
            "uid": "8d1f3b3d-0000-4963-9c2e-5b0c6f0e1a11",
            "labels": {
                "kubevirt.io": "virt-launcher",
                "kubevirt.io/created-by": "34f4ad5b-0000-4f2c-af31-9b680b46955c",
                "kubevirt.io/domain": name,
                "vm.kubevirt.io/name": name
            },
            "annotations": annotations,
            "ownerReferences": [{"apiVersion": "kubevirt.io/v1", "kind": "VirtualMachineInstance",
                                 "name": name, "controller": true,
                                 "uid": "34f4ad5b-0000-4f2c-af31-9b680b46955c"}]
        },
        "spec": {
            "containers": [{
                "name": "compute",
                "image": "quay.io/kubevirt/virt-launcher:v1.3.0",
                "resources": {
                    "limits": {"devices.kubevirt.io/kvm": "1"},
                    "requests": {"cpu": "100m", "devices.kubevirt.io/kvm": "1",
                                 "ephemeral-storage": "50M", "memory": memory}
                }
            }],
            "nodeSelector": {"kubevirt.io/schedulable": "true"},
            "schedulerName": "default-scheduler"
        },
        "status": {"phase": "Pending", "qosClass": "Burstable"}
    })
}

/// A pod that is not KubeVirt's; a VM to wset when it carries
/// `wset.io/expected-wss-bytes` (`expected`).
fn plain_pod(name: &str, memory: &str, expected: Option<&str>) -> Value {
    let annotations = match expected {
        Some(e) => json!({"wset.io/expected-wss-bytes": e}),
        None => json!({}),
    };
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": "default", "uid": "0f0e0d0c-1111-2222-3333-444455556666",
                     "annotations": annotations},
        "spec": {"containers": [{"name": "app", "image": "busybox",
                                 "resources": {"requests": {"memory": memory, "cpu": "50m"}}}]}
    })
}

/// A whole `v1.Node` as kube-scheduler sends it when not nodeCacheCapable.
fn node(name: &str) -> Value {
    json!({
        "metadata": {"name": name, "uid": format!("uid-{name}"),
                     "labels": {"kubernetes.io/hostname": name, "kubevirt.io/schedulable": "true"}},
        "spec": {"podCIDR": "10.244.1.0/24"},
        "status": {"capacity": {"memory": "80Mi", "cpu": "2"},
                   "allocatable": {"memory": "80Mi", "cpu": "2"},
                   "conditions": [{"type": "Ready", "status": "True"}]}
    })
}

const NODES: [&str; 4] = ["h1", "h2", "h3", "not-a-wset-node"];

/// The planner's own ranking for a VM, and the plan it came from.
fn rank(url: &str, req: pb::RankHostsRequest) -> pb::RankHostsResponse {
    let url = url.to_owned();
    tokio::runtime::Runtime::new()
        .unwrap()
        .block_on(async move {
            let ch = Channel::from_shared(url)
                .unwrap()
                .connect()
                .await
                .expect("connect");
            SchedulerServiceClient::new(ch)
                .rank_hosts(req)
                .await
                .expect("RankHosts")
                .into_inner()
        })
}

/// Check one pod's filter (both modes) and prioritize answers against
/// RankHosts for the same VM; the ranking, for the caller's own checks.
fn check_pod(
    ext: &str,
    url: &str,
    pod: &Value,
    rank_req: pb::RankHostsRequest,
) -> Vec<pb::HostRank> {
    let ranking = rank(url, rank_req.clone());
    let by = |h: &str| ranking.hosts.iter().find(|r| r.host_id == h);
    let names: Vec<String> = NODES.iter().map(|s| s.to_string()).collect();

    // nodeCacheCapable: names in, names out.
    let f = post_ok(ext, "filter", &json!({"Pod": pod, "NodeNames": names}));
    assert_eq!(f["Error"], "", "{f}");
    let passed: Vec<&str> = f["NodeNames"]
        .as_array()
        .unwrap_or_else(|| panic!("no NodeNames: {f}"))
        .iter()
        .map(|v| v.as_str().expect("a name"))
        .collect();
    let failed = f["FailedNodes"].as_object().expect("FailedNodes");
    let unresolvable = f["FailedAndUnresolvableNodes"]
        .as_object()
        .expect("FailedAndUnresolvableNodes");
    for n in NODES {
        match by(n) {
            // wset has no agent there: no opinion.
            None => assert!(
                passed.contains(&n),
                "{n} is unknown to wset and must pass: {f}"
            ),
            Some(r) if r.fits => assert!(
                passed.contains(&n),
                "{n} fits ({r:?}) but was filtered: {f}"
            ),
            Some(r) => {
                assert!(
                    !passed.contains(&n),
                    "{n} does not fit ({r:?}) but passed: {f}"
                );
                let (reason, other) = if r.fits_when_empty {
                    (failed.get(n), unresolvable.get(n))
                } else {
                    (unresolvable.get(n), failed.get(n))
                };
                let reason = reason
                    .and_then(Value::as_str)
                    .unwrap_or_else(|| panic!("{n}: no reason in the right map ({r:?}): {f}"));
                assert!(other.is_none(), "{n} in both maps: {f}");
                assert_eq!(reason, format!("wset: {}", r.explanation), "{f}");
            }
        }
    }

    // Not nodeCacheCapable: whole node objects in, the passing ones out
    // unchanged.
    let objects: Vec<Value> = NODES.iter().map(|n| node(n)).collect();
    let g = post_ok(
        ext,
        "filter",
        &json!({"Pod": pod, "Nodes": {"apiVersion": "v1", "kind": "NodeList", "items": objects}}),
    );
    let items = g["Nodes"]["items"]
        .as_array()
        .unwrap_or_else(|| panic!("no Nodes.items: {g}"));
    let want: Vec<Value> = objects
        .iter()
        .filter(|o| passed.contains(&o["metadata"]["name"].as_str().unwrap()))
        .cloned()
        .collect();
    assert_eq!(items, &want, "the passing node objects, unchanged");
    assert_eq!(g["FailedNodes"], f["FailedNodes"]);
    assert_eq!(
        g["FailedAndUnresolvableNodes"],
        f["FailedAndUnresolvableNodes"]
    );

    // Scores: 1..=10 where it fits, in RankHosts' order; 0 elsewhere.
    let p = post_ok(ext, "prioritize", &json!({"Pod": pod, "NodeNames": names}));
    let scores: Vec<(String, i64)> = p
        .as_array()
        .unwrap_or_else(|| panic!("not a HostPriorityList: {p}"))
        .iter()
        .map(|h| {
            (
                h["Host"].as_str().unwrap().to_owned(),
                h["Score"].as_i64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        scores.iter().map(|(h, _)| h.as_str()).collect::<Vec<_>>(),
        NODES
    );
    let score = |h: &str| {
        scores
            .iter()
            .find(|(n, _)| n == h)
            .map(|(_, s)| *s)
            .unwrap()
    };
    for n in NODES {
        match by(n) {
            Some(r) if r.fits => assert!((1..=10).contains(&score(n)), "{n}: {scores:?}"),
            _ => assert_eq!(score(n), 0, "{n}: {scores:?}"),
        }
    }
    let ordered: Vec<i64> = ranking.hosts.iter().map(|r| score(&r.host_id)).collect();
    assert!(
        ordered.windows(2).all(|w| w[0] >= w[1]),
        "scores {ordered:?} out of RankHosts' order {:?}",
        ranking.hosts
    );
    // Every answer came from the plan RankHosts used.
    let again = rank(url, rank_req);
    assert_eq!(
        again.plan.as_ref().map(|p| &p.plan_id),
        ranking.plan.as_ref().map(|p| &p.plan_id),
        "the plan changed during the check (--plan-interval is an hour here)"
    );
    println!(
        "{}: passed {passed:?}, failed {failed:?}, unresolvable {unresolvable:?}, scores {scores:?}",
        pod["metadata"]["name"]
    );
    ranking.hosts
}

#[test]
fn extender_filters_and_scores_as_the_planner_ranks() {
    let addrs: Vec<String> = (0..3).map(|_| free_loopback_addr()).collect();
    let agents: Vec<Agent> = ["h1", "h2", "h3"]
        .iter()
        .zip(&addrs)
        .map(|(h, a)| agent(h, a))
        .collect();
    // h1 is busy (two guests writing 24 MiB each), h2 nearly idle, h3 runs
    // the VM KubeVirt knows as default/app-1 (id default_app-1), 4 MiB.
    let _g = [
        guest(&agents[0], "busy-1", 24),
        guest(&agents[0], "busy-2", 24),
        guest(&agents[1], "db-1", 2),
        guest(&agents[2], "default_app-1", 4),
    ];
    let data = TempDir::new("extender");
    let refs: Vec<&str> = addrs.iter().map(String::as_str).collect();
    // Plans only when asked (replan), so every answer below comes from one.
    let ctl = Controller::start(
        &data.0,
        &refs,
        &[
            "--plan-interval",
            "1h",
            "--horizon",
            "2s",
            "--lookback",
            "5s",
            "--extender-addr",
            "127.0.0.1:0",
            "--extender-max-body-bytes",
            &MAX_BODY.to_string(),
        ],
    );
    let url = format!("http://{}", ctl.grpc_addr);
    let ext = ctl.extender_addr();

    // A plan on 5 s of every guest's steady writes.
    let plan = wait_for(
        Duration::from_secs(90),
        "a plan with h1 busy and all four VMs steady",
        || {
            let url = url.clone();
            let o = tokio::runtime::Runtime::new()
                .unwrap()
                .block_on(async move {
                    let ch = Channel::from_shared(url).unwrap().connect().await.ok()?;
                    SchedulerServiceClient::new(ch)
                        .get_overcommit(pb::GetOvercommitRequest {
                            replan: true,
                            include_vms: true,
                            ..Default::default()
                        })
                        .await
                        .ok()
                        .map(tonic::Response::into_inner)
                })?;
            let h = |id: &str| o.hosts.iter().find(|h| h.host_id == id);
            let vms: usize = o.hosts.iter().map(|h| h.vms.len()).sum();
            let steady = o
                .hosts
                .iter()
                .flat_map(|h| &h.vms)
                .all(|v| v.span_ms >= 4_000);
            let busy = h("h1").is_some_and(|h| h.demand_mean_bytes >= 44.0 * MIB as f64);
            (vms == 4 && steady && busy).then_some(o)
        },
    );
    for h in &plan.hosts {
        println!(
            "{}: demand at risk {:.1} MiB of {} MiB",
            h.host_id,
            h.demand_at_risk_bytes / MIB as f64,
            h.capacity_bytes / MIB
        );
    }

    // A new KubeVirt VM expected to use 20 MiB of its 24: too much for
    // busy h1 (the reason says by how much), room on h2 and h3.
    let web = virt_launcher(
        "default",
        "web-7",
        "24Mi",
        json!({"wset.io/expected-wss-bytes": "20Mi"}),
    );
    let r = check_pod(
        &ext,
        &url,
        &web,
        pb::RankHostsRequest {
            memory_bytes: 24 * MIB,
            expected_wss_bytes: 20 * MIB,
            labels: labels_of(&web),
            vm_id: "default_web-7".into(),
        },
    );
    let fits: Vec<&str> = r
        .iter()
        .filter(|x| x.fits)
        .map(|x| x.host_id.as_str())
        .collect();
    assert!(
        fits.contains(&"h2") && fits.contains(&"h3") && !fits.contains(&"h1"),
        "{r:#?}"
    );
    let h1 = r.iter().find(|x| x.host_id == "h1").unwrap();
    assert!(
        h1.explanation.starts_with("short by ") && h1.fits_when_empty,
        "{h1:?}"
    );

    // A plain pod asking for more than any host's watermark: unresolvable
    // everywhere, preemption cannot help.
    let huge = plain_pod("huge", "100Mi", Some("100Mi"));
    let r = check_pod(
        &ext,
        &url,
        &huge,
        pb::RankHostsRequest {
            memory_bytes: 100 * MIB,
            expected_wss_bytes: 100 * MIB,
            ..Default::default()
        },
    );
    assert!(
        r.iter()
            .all(|x| !x.fits && !x.fits_when_empty && x.explanation.contains("alone")),
        "{r:#?}"
    );

    // The virt-launcher pod of a VM wset has measured (default/app-1, 4
    // MiB) asking for 64 MiB: as a new VM of that size it fits nowhere; as
    // itself, its measured demand fits.
    let app = virt_launcher("default", "app-1", "64Mi", json!({}));
    let known = check_pod(
        &ext,
        &url,
        &app,
        pb::RankHostsRequest {
            memory_bytes: 64 * MIB,
            labels: labels_of(&app),
            vm_id: "default_app-1".into(),
            ..Default::default()
        },
    );
    assert!(
        known.iter().any(|x| x.host_id == "h3" && x.fits),
        "{known:#?}"
    );
    let as_new = check_pod(
        &ext,
        &url,
        &plain_pod("app-1-as-new", "64Mi", Some("64Mi")),
        pb::RankHostsRequest {
            memory_bytes: 64 * MIB,
            expected_wss_bytes: 64 * MIB,
            ..Default::default()
        },
    );
    assert!(as_new.iter().all(|x| !x.fits), "{as_new:#?}");

    // A pod that is no VM (a DaemonSet's, asking for more than busy h1
    // keeps) and a VM wset cannot size (no memory request): no opinion,
    // every node passes and scores 0.
    let unsized_vm = json!({"metadata": {"name": "tiny", "namespace": "default",
                                         "annotations": {"wset.io/expected-wss-bytes": "0"}},
                            "spec": {"containers": [{"name": "c", "image": "busybox"}]}});
    for pod in [plain_pod("agent-on-h1", "60Mi", None), unsized_vm] {
        let f = post_ok(&ext, "filter", &json!({"Pod": pod, "NodeNames": NODES}));
        assert_eq!(f["NodeNames"], json!(NODES), "{f}");
        assert_eq!(f["FailedNodes"], json!({}), "{f}");
        let p = post_ok(&ext, "prioritize", &json!({"Pod": pod, "NodeNames": NODES}));
        assert!(p.as_array().unwrap().iter().all(|h| h["Score"] == 0), "{p}");
    }

    // Bad input: 400 with a message, and the controller serves on.
    let bad_annotation = virt_launcher(
        "default",
        "web-8",
        "24Mi",
        json!({"wset.io/expected-wss-bytes": "lots"}),
    );
    let f = post_ok(
        &ext,
        "filter",
        &json!({"Pod": bad_annotation, "NodeNames": NODES}),
    );
    let err = f["Error"].as_str().unwrap();
    assert!(
        err.contains("wset.io/expected-wss-bytes") && err.contains("lots"),
        "{f}"
    );
    let (status, text) = post(
        &ext,
        "prioritize",
        &json!({"Pod": bad_annotation, "NodeNames": NODES}),
    );
    assert_eq!(status, 400, "{text}");
    assert!(text.contains("wset.io/expected-wss-bytes"), "{text}");
    for (what, body, needle) in [
        ("not JSON", b"{\"Pod\": {".to_vec(), "ExtenderArgs JSON"),
        (
            "no nodes",
            br#"{"Pod": {"metadata": {"name": "x"}}}"#.to_vec(),
            "neither NodeNames nor Nodes",
        ),
        ("no pod", br#"{"NodeNames": ["h1"]}"#.to_vec(), "no Pod"),
        (
            "a node without a name",
            br#"{"Pod": {}, "Nodes": {"items": [{"metadata": {}}]}}"#.to_vec(),
            "metadata.name",
        ),
        (
            "a wrong type",
            br#"{"Pod": {}, "NodeNames": "h1"}"#.to_vec(),
            "ExtenderArgs JSON",
        ),
        (
            "both node forms",
            br#"{"Pod": {}, "NodeNames": ["h1"], "Nodes": {"items": []}}"#.to_vec(),
            "both NodeNames and Nodes",
        ),
        (
            "a node named twice",
            br#"{"Pod": {}, "NodeNames": ["h1", "h1"]}"#.to_vec(),
            "twice",
        ),
    ] {
        for verb in ["filter", "prioritize"] {
            let (status, text) = http(&ext, "POST", &format!("/{verb}"), &body, None);
            assert_eq!(status, 400, "{what} on {verb}: {text}");
            assert!(text.contains(needle), "{what} on {verb}: {text}");
        }
    }
    // Declared larger than the limit: refused before a byte of it is read.
    let (status, text) = http(&ext, "POST", "/filter", b"", Some(10 * MAX_BODY));
    assert_eq!(status, 400, "{text}");
    assert!(text.contains("over the extender's limit"), "{text}");
    let (status, _) = http(&ext, "GET", "/filter", b"", None);
    assert_eq!(status, 405, "GET /filter");

    // Still serving, and counted.
    let f = post_ok(&ext, "filter", &json!({"Pod": web, "NodeNames": NODES}));
    assert_eq!(f["Error"], "");
    let metrics = http(&ctl.metrics_addr(), "GET", "/metrics", b"", None).1;
    let count = |name: &str| -> f64 {
        metrics
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.rsplit(' ').next()?.parse().ok())
            .unwrap_or_else(|| panic!("{name} not in the metrics:\n{metrics}"))
    };
    assert!(count("wset_controller_extender_calls_total{verb=\"filter\"}") >= 10.0);
    assert!(count("wset_controller_extender_bad_requests_total") >= 16.0);
    assert!(
        !ctl.log().iter().any(|l| l.contains("panicked")),
        "the controller panicked:\n{}",
        ctl.log().join("\n")
    );
}

fn labels_of(pod: &Value) -> std::collections::HashMap<String, String> {
    pod["metadata"]["labels"]
        .as_object()
        .map(|m| {
            m.iter()
                .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_owned()))
                .collect()
        })
        .unwrap_or_default()
}
