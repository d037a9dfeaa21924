//! The kube-scheduler extender: kube-scheduler's HTTP JSON calls, `filter`
//! and `prioritize` (the types of `k8s.io/kube-scheduler/extender/v1`), in
//! both of its modes (`nodeCacheCapable` true: node names; false: whole
//! node objects, echoed back unchanged), answered from the planner's model:
//! the same placement as `SchedulerService.RankHosts`.
//!
//! - **filter** drops the nodes where the pod's VM does not fit at the
//!   configured risk, each with the reason (the shortfall in MiB). A node
//!   where no eviction or preemption could make room (the VM alone is over
//!   its watermark, or it is in maintenance) is failed as unresolvable.
//! - **prioritize** scores the nodes it fits on 1 to 10 by the headroom the
//!   planner keeps there (more headroom, higher), in the order RankHosts
//!   gives; nodes it does not fit on, and nodes wset does not know, 0.
//!
//! A pod is a VM by [`PodVm::of`]; a node is the host whose id is its name.
//! A node wset has no agent on passes the filter (wset has no opinion) and
//! scores 0. Without a plan to answer from (no leader, no agent yet) the
//! extender says so: `Error` in a filter result, 503 on prioritize; the
//! deployment marks it `ignorable`, so scheduling goes on without it.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use wset_proto::ids::{HostId, VmId};

use crate::labels;
use crate::planner::{self, PlacementRequest, Ranked};
use crate::scheduler::SchedulerService;

/// Annotation (or label) giving the VM's id in wset, when it is not the
/// one [`PodVm::of`] derives.
pub const VM_ID: &str = "wset.io/vm-id";
/// Annotation: the working set the VM is expected to have, bytes or a
/// Kubernetes quantity ("2Gi"); without it a new VM is placed at its whole
/// memory.
pub const EXPECTED_WSS: &str = "wset.io/expected-wss-bytes";
/// KubeVirt's virt-launcher pods: label `kubevirt.io=virt-launcher`, and
/// the VMI's name in annotation (and label) `kubevirt.io/domain`.
const KUBEVIRT: &str = "kubevirt.io";
const KUBEVIRT_LAUNCHER: &str = "virt-launcher";
const KUBEVIRT_DOMAIN: &str = "kubevirt.io/domain";

/// The largest score kube-scheduler accepts from an extender
/// (`MaxExtenderPriority`).
pub const MAX_SCORE: i64 = 10;

/// `ExtenderArgs`. kube-scheduler writes Go's field names; the lower-case
/// spellings are accepted too, as Go's decoder would.
#[derive(Debug, Deserialize)]
pub struct ExtenderArgs {
    #[serde(rename = "Pod", alias = "pod")]
    pub pod: Option<Pod>,
    #[serde(rename = "Nodes", alias = "nodes")]
    pub nodes: Option<NodeList>,
    #[serde(rename = "NodeNames", alias = "nodeNames", alias = "nodenames")]
    pub node_names: Option<Vec<String>>,
}

/// The parts of a `v1.Pod` the extender reads; the rest is ignored.
#[derive(Debug, Default, Deserialize)]
pub struct Pod {
    #[serde(default)]
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: PodSpec,
}

#[derive(Debug, Default, Deserialize)]
pub struct ObjectMeta {
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub namespace: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub annotations: BTreeMap<String, String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodSpec {
    #[serde(default)]
    pub containers: Vec<Container>,
    #[serde(default)]
    pub init_containers: Vec<Container>,
    #[serde(default)]
    pub overhead: BTreeMap<String, Value>,
}

#[derive(Debug, Default, Deserialize)]
pub struct Container {
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub resources: Resources,
}

#[derive(Debug, Default, Deserialize)]
pub struct Resources {
    #[serde(default)]
    pub requests: BTreeMap<String, Value>,
    #[serde(default)]
    pub limits: BTreeMap<String, Value>,
}

/// A `v1.NodeList`; its nodes are kept whole, to be echoed back.
#[derive(Debug, Deserialize)]
pub struct NodeList {
    #[serde(default)]
    pub items: Vec<Value>,
}

/// `ExtenderFilterResult`.
#[derive(Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct FilterResult {
    #[serde(rename = "Nodes")]
    pub nodes: Option<NodeListOut>,
    #[serde(rename = "NodeNames")]
    pub node_names: Option<Vec<String>>,
    #[serde(rename = "FailedNodes")]
    pub failed_nodes: BTreeMap<String, String>,
    #[serde(rename = "FailedAndUnresolvableNodes")]
    pub failed_and_unresolvable_nodes: BTreeMap<String, String>,
    #[serde(rename = "Error")]
    pub error: String,
}

#[derive(Debug, Serialize, Deserialize, PartialEq)]
pub struct NodeListOut {
    #[serde(
        rename = "apiVersion",
        skip_serializing_if = "String::is_empty",
        default
    )]
    pub api_version: String,
    #[serde(rename = "kind", skip_serializing_if = "String::is_empty", default)]
    pub kind: String,
    pub items: Vec<Value>,
}

/// One entry of a `HostPriorityList`.
#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct HostPriority {
    #[serde(rename = "Host")]
    pub host: String,
    #[serde(rename = "Score")]
    pub score: i64,
}

/// A Kubernetes quantity (`"1266Mi"`, `"2G"`, `"1e9"`, `"512"`) as bytes,
/// rounded up as Kubernetes rounds memory.
pub fn quantity_bytes(q: &str) -> Result<u64, String> {
    let bad = || format!("{q:?} is not a Kubernetes quantity of bytes (e.g. 512Mi, 2Gi, 1e9)");
    let s = q.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.' || c == '+'))
        .unwrap_or(s.len());
    let (num, suffix) = s.split_at(split);
    if num.is_empty() || num.starts_with('.') && num.len() == 1 {
        return Err(bad());
    }
    let n: f64 = num.parse().map_err(|_| bad())?;
    let scale = match suffix {
        "" => 1.0,
        "Ki" => 1024f64,
        "Mi" => 1024f64.powi(2),
        "Gi" => 1024f64.powi(3),
        "Ti" => 1024f64.powi(4),
        "Pi" => 1024f64.powi(5),
        "Ei" => 1024f64.powi(6),
        "n" => 1e-9,
        "u" => 1e-6,
        "m" => 1e-3,
        "k" => 1e3,
        "M" => 1e6,
        "G" => 1e9,
        "T" => 1e12,
        "P" => 1e15,
        "E" => 1e18,
        e if e.starts_with(['e', 'E']) => {
            let exp: i32 = e[1..].parse().map_err(|_| bad())?;
            10f64.powi(exp)
        }
        _ => return Err(bad()),
    };
    let bytes = (n * scale).ceil();
    if !bytes.is_finite() || bytes > crate::history::MAX_MEMORY_BYTES as f64 {
        return Err(format!("{q:?} is more than 1 PiB"));
    }
    Ok(bytes as u64)
}

fn value_bytes(v: &Value) -> Result<u64, String> {
    match v {
        Value::String(s) => quantity_bytes(s),
        Value::Number(n) => quantity_bytes(&n.to_string()),
        other => Err(format!("{other} is not a quantity")),
    }
}

/// The pod's memory as kube-scheduler counts it: the larger of its
/// containers' summed requests and its largest init container's, plus the
/// pod overhead. A container with a limit and no request requests its
/// limit (the API server's defaulting).
fn pod_memory(spec: &PodSpec) -> Result<u64, String> {
    let of = |c: &Container| -> Result<u64, String> {
        let q = c
            .resources
            .requests
            .get("memory")
            .or_else(|| c.resources.limits.get("memory"));
        match q {
            Some(v) => value_bytes(v).map_err(|e| format!("container {:?} memory: {e}", c.name)),
            None => Ok(0),
        }
    };
    let mut sum = 0u64;
    for c in &spec.containers {
        sum = sum.saturating_add(of(c)?);
    }
    let mut init = 0u64;
    for c in &spec.init_containers {
        init = init.max(of(c)?);
    }
    let overhead = match spec.overhead.get("memory") {
        Some(v) => value_bytes(v).map_err(|e| format!("pod overhead memory: {e}"))?,
        None => 0,
    };
    Ok(sum.max(init).saturating_add(overhead))
}

/// What the extender takes a pod to be.
#[derive(Clone, Debug, PartialEq)]
pub struct PodVm {
    /// The VM's id in wset, when the pod names one (a VM the controller may
    /// know: its measured demand is used).
    pub vm_id: Option<VmId>,
    pub memory_bytes: u64,
    pub expected_wss_bytes: u64,
    pub labels: BTreeMap<String, String>,
    /// How the pod was read, for logs.
    pub how: &'static str,
}

impl PodVm {
    /// The VM a pod runs:
    /// - `wset.io/vm-id` (annotation, else label) names it;
    /// - else a KubeVirt virt-launcher pod (label `kubevirt.io=virt-launcher`)
    ///   is the VMI its `kubevirt.io/domain` annotation (or label) names,
    ///   with the id `<namespace>_<name>` (the libvirt domain name KubeVirt
    ///   gives QEMU);
    /// - else it is a VM wset has not seen.
    ///
    /// Its memory is the pod's memory request; its expected working set
    /// `wset.io/expected-wss-bytes`. `None`: a pod without a memory request,
    /// which wset cannot size.
    pub fn of(pod: &Pod) -> Result<Option<Self>, String> {
        let m = &pod.metadata;
        let get = |k: &str| m.annotations.get(k).or_else(|| m.labels.get(k));
        let (id, how) = if let Some(id) = get(VM_ID) {
            (Some(id.clone()), "wset.io/vm-id")
        } else if m.labels.get(KUBEVIRT).map(String::as_str) == Some(KUBEVIRT_LAUNCHER) {
            match get(KUBEVIRT_DOMAIN) {
                Some(d) => (
                    Some(format!("{}_{d}", m.namespace)),
                    "KubeVirt virt-launcher",
                ),
                None => (None, "KubeVirt virt-launcher without kubevirt.io/domain"),
            }
        } else {
            (None, "a pod wset has not seen")
        };
        let vm_id = match id {
            Some(id) => Some(
                VmId::parse_in(VM_ID, &id)
                    .map_err(|e| format!("pod {}/{}: {e}", m.namespace, m.name))?,
            ),
            None => None,
        };
        let memory_bytes =
            pod_memory(&pod.spec).map_err(|e| format!("pod {}/{}: {e}", m.namespace, m.name))?;
        let expected_wss_bytes = match m.annotations.get(EXPECTED_WSS) {
            Some(q) => quantity_bytes(q).map_err(|e| {
                format!(
                    "pod {}/{}: annotation {EXPECTED_WSS}: {e}",
                    m.namespace, m.name
                )
            })?,
            None => 0,
        };
        if memory_bytes == 0 {
            return Ok(None);
        }
        if expected_wss_bytes > memory_bytes {
            return Err(format!(
                "pod {}/{}: annotation {EXPECTED_WSS} ({expected_wss_bytes} B) is more than the pod's memory request ({memory_bytes} B)",
                m.namespace, m.name
            ));
        }
        let mut labels = m.labels.clone();
        if labels.len() > labels::MAX_LABELS {
            labels.retain(|k, _| k.starts_with("wset.io/"));
        }
        Ok(Some(Self {
            vm_id,
            memory_bytes,
            expected_wss_bytes,
            labels,
            how,
        }))
    }
}

/// Counts for the metrics endpoint.
#[derive(Debug, Default)]
pub struct Stats {
    pub filter_calls: AtomicU64,
    pub prioritize_calls: AtomicU64,
    /// Bodies refused (malformed, oversized, bad pod annotations).
    pub bad_requests: AtomicU64,
    /// Calls answered without a plan.
    pub unplanned: AtomicU64,
    pub nodes_failed: AtomicU64,
}

#[derive(Clone, Debug)]
pub struct Extender {
    pub scheduler: SchedulerService,
    pub max_body_bytes: usize,
    pub stats: Arc<Stats>,
}

/// The nodes asked about: names in order, and the whole objects when
/// kube-scheduler sent them (`nodeCacheCapable: false`).
struct Nodes {
    names: Vec<String>,
    objects: Option<(String, String, Vec<Value>)>,
}

fn nodes_of(args: &mut ExtenderArgs) -> Result<Nodes, String> {
    if let Some(names) = args.node_names.take() {
        return Ok(Nodes {
            names,
            objects: None,
        });
    }
    let Some(list) = args.nodes.take() else {
        return Err("neither NodeNames nor Nodes is given".into());
    };
    let mut names = Vec::with_capacity(list.items.len());
    for (i, n) in list.items.iter().enumerate() {
        match n.pointer("/metadata/name").and_then(Value::as_str) {
            Some(name) => names.push(name.to_owned()),
            None => return Err(format!("Nodes.items[{i}] has no metadata.name")),
        }
    }
    Ok(Nodes {
        names,
        objects: Some(("v1".into(), "NodeList".into(), list.items)),
    })
}

fn bad(stats: &Stats, msg: impl Into<String>) -> Response {
    stats.bad_requests.fetch_add(1, Ordering::Relaxed);
    let mut m = msg.into();
    m.push('\n');
    (StatusCode::BAD_REQUEST, m).into_response()
}

/// Read and parse a body, refusing what is not `ExtenderArgs`.
async fn args(
    ext: &Extender,
    req: axum::extract::Request,
) -> Result<(ExtenderArgs, Nodes), Response> {
    // A declared length over the limit is refused before any of it is read.
    let declared = req
        .headers()
        .get(axum::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if let Some(n) = declared.filter(|&n| n > ext.max_body_bytes as u64) {
        return Err(bad(
            &ext.stats,
            format!(
                "the body is {n} bytes, over the extender's limit of {} (--extender-max-body-bytes)",
                ext.max_body_bytes
            ),
        ));
    }
    let body = axum::body::to_bytes(req.into_body(), ext.max_body_bytes)
        .await
        .map_err(|e| {
            bad(
                &ext.stats,
                format!(
                    "the body could not be read whole within {} bytes (--extender-max-body-bytes): {e}",
                    ext.max_body_bytes
                ),
            )
        })?;
    let mut a: ExtenderArgs = serde_json::from_slice(&body).map_err(|e| {
        bad(
            &ext.stats,
            format!("the body is not kube-scheduler's ExtenderArgs JSON: {e}"),
        )
    })?;
    let nodes = nodes_of(&mut a).map_err(|e| bad(&ext.stats, e))?;
    if a.pod.is_none() {
        return Err(bad(&ext.stats, "ExtenderArgs has no Pod"));
    }
    Ok((a, nodes))
}

/// The planner's ranking of `hosts` for the pod, by host id; `Err`: no plan.
async fn rank(ext: &Extender, vm: &PodVm) -> Result<HashMap<HostId, Ranked>, String> {
    let p = ext
        .scheduler
        .current_plan()
        .await
        .map_err(|s| format!("wset has no plan to answer from: {}", s.message()))?;
    let req = PlacementRequest {
        memory_bytes: vm.memory_bytes,
        expected_wss_bytes: vm.expected_wss_bytes,
        labels: vm.labels.clone(),
        vm_id: vm.vm_id.clone(),
    };
    Ok(planner::place(&p.plan, &req, &p.settings)
        .into_iter()
        .map(|r| (r.host_id.clone(), r))
        .collect())
}

fn host_of(node: &str) -> Option<HostId> {
    node.parse().ok()
}

/// `POST /filter`.
pub async fn filter(ext: Extender, req: axum::extract::Request) -> Response {
    ext.stats.filter_calls.fetch_add(1, Ordering::Relaxed);
    let (a, nodes) = match args(&ext, req).await {
        Ok(x) => x,
        Err(r) => return r,
    };
    let pod = a.pod.as_ref().expect("checked in args");
    let mut out = FilterResult::default();
    let vm = match PodVm::of(pod) {
        Ok(v) => v,
        Err(e) => {
            ext.stats.bad_requests.fetch_add(1, Ordering::Relaxed);
            out.error = e;
            return axum::Json(out).into_response();
        }
    };
    let mut pass = vec![true; nodes.names.len()];
    if let Some(vm) = &vm {
        let ranked = match rank(&ext, vm).await {
            Ok(r) => r,
            Err(e) => {
                ext.stats.unplanned.fetch_add(1, Ordering::Relaxed);
                out.error = e;
                return axum::Json(out).into_response();
            }
        };
        for (i, name) in nodes.names.iter().enumerate() {
            let Some(r) = host_of(name).and_then(|h| ranked.get(&h)) else {
                continue;
            };
            if r.fits {
                continue;
            }
            pass[i] = false;
            let why = format!("wset: {}", r.explanation);
            if r.fits_when_empty && !r.maintenance {
                out.failed_nodes.insert(name.clone(), why);
            } else {
                out.failed_and_unresolvable_nodes.insert(name.clone(), why);
            }
        }
        let failed = pass.iter().filter(|p| !**p).count() as u64;
        ext.stats.nodes_failed.fetch_add(failed, Ordering::Relaxed);
        tracing::debug!(pod = %pod.metadata.name, read_as = vm.how, nodes = nodes.names.len(), failed, "extender filter");
    }
    match nodes.objects {
        None => {
            out.node_names = Some(
                nodes
                    .names
                    .into_iter()
                    .zip(&pass)
                    .filter_map(|(n, p)| p.then_some(n))
                    .collect(),
            );
        }
        Some((api_version, kind, items)) => {
            out.nodes = Some(NodeListOut {
                api_version,
                kind,
                items: items
                    .into_iter()
                    .zip(&pass)
                    .filter_map(|(n, p)| p.then_some(n))
                    .collect(),
            });
        }
    }
    axum::Json(out).into_response()
}

/// Scores 1..=10 for the nodes the VM fits on, by headroom (linear between
/// the least and the most headroom among them; all 10 when they are
/// equal), 0 for the rest and for nodes wset does not know.
pub fn scores(names: &[String], ranked: &HashMap<HostId, Ranked>) -> Vec<HostPriority> {
    let fitting: Vec<f64> = names
        .iter()
        .filter_map(|n| host_of(n).and_then(|h| ranked.get(&h)))
        .filter(|r| r.fits)
        .map(|r| r.headroom_bytes)
        .collect();
    let lo = fitting.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = fitting.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    names
        .iter()
        .map(|n| {
            let score = match host_of(n).and_then(|h| ranked.get(&h)) {
                Some(r) if r.fits => {
                    if hi - lo < 1.0 {
                        MAX_SCORE
                    } else {
                        1 + ((r.headroom_bytes - lo) / (hi - lo) * (MAX_SCORE - 1) as f64).round()
                            as i64
                    }
                }
                _ => 0,
            };
            HostPriority {
                host: n.clone(),
                score,
            }
        })
        .collect()
}

/// `POST /prioritize`.
pub async fn prioritize(ext: Extender, req: axum::extract::Request) -> Response {
    ext.stats.prioritize_calls.fetch_add(1, Ordering::Relaxed);
    let (a, nodes) = match args(&ext, req).await {
        Ok(x) => x,
        Err(r) => return r,
    };
    let pod = a.pod.as_ref().expect("checked in args");
    let vm = match PodVm::of(pod) {
        Ok(v) => v,
        Err(e) => return bad(&ext.stats, e),
    };
    let Some(vm) = vm else {
        let flat: Vec<HostPriority> = nodes
            .names
            .iter()
            .map(|n| HostPriority {
                host: n.clone(),
                score: 0,
            })
            .collect();
        return axum::Json(flat).into_response();
    };
    match rank(&ext, &vm).await {
        Ok(ranked) => axum::Json(scores(&nodes.names, &ranked)).into_response(),
        Err(e) => {
            ext.stats.unplanned.fetch_add(1, Ordering::Relaxed);
            (StatusCode::SERVICE_UNAVAILABLE, format!("{e}\n")).into_response()
        }
    }
}

/// The extender's routes.
pub fn router(ext: Extender) -> axum::Router {
    let f = ext.clone();
    let p = ext;
    axum::Router::new()
        .route(
            "/filter",
            axum::routing::post(move |req: axum::extract::Request| filter(f.clone(), req)),
        )
        .route(
            "/prioritize",
            axum::routing::post(move |req: axum::extract::Request| prioritize(p.clone(), req)),
        )
        .route(
            "/",
            axum::routing::get(|| async {
                "wset kube-scheduler extender: POST /filter, POST /prioritize (ExtenderArgs JSON)\n"
            }),
        )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantities_read_as_kubernetes_reads_them() {
        assert_eq!(quantity_bytes("1266Mi"), Ok(1266 << 20));
        assert_eq!(quantity_bytes("2Gi"), Ok(2 << 30));
        assert_eq!(quantity_bytes("1G"), Ok(1_000_000_000));
        assert_eq!(quantity_bytes("1e9"), Ok(1_000_000_000));
        assert_eq!(quantity_bytes("512"), Ok(512));
        assert_eq!(quantity_bytes("1.5Ki"), Ok(1536));
        assert_eq!(quantity_bytes("1500m"), Ok(2), "rounded up");
        for bad in ["", "Mi", "1Qi", "-1Gi", "1e", "2Ei", "."] {
            assert!(quantity_bytes(bad).is_err(), "{bad:?}");
        }
    }

    fn pod(json: Value) -> Pod {
        serde_json::from_value(json).expect("a pod")
    }

    #[test]
    fn a_virt_launcher_pod_is_its_vmi() {
        let p = pod(serde_json::json!({
            "metadata": {
                "name": "virt-launcher-db-1-x7k2p",
                "namespace": "prod",
                "labels": {"kubevirt.io": "virt-launcher", "kubevirt.io/domain": "db-1"},
                "annotations": {"kubevirt.io/domain": "db-1", "wset.io/expected-wss-bytes": "1Gi"}
            },
            "spec": {"containers": [
                {"name": "compute", "resources": {"requests": {"memory": "4362Mi", "cpu": "1"}}},
                {"name": "sidecar", "resources": {"limits": {"memory": "64Mi"}}}
            ]}
        }));
        let vm = PodVm::of(&p).unwrap().unwrap();
        assert_eq!(vm.vm_id.as_ref().map(VmId::as_str), Some("prod_db-1"));
        assert_eq!(vm.memory_bytes, (4362 + 64) << 20);
        assert_eq!(vm.expected_wss_bytes, 1 << 30);
    }

    #[test]
    fn plain_pods_and_bad_annotations() {
        let plain = pod(serde_json::json!({
            "metadata": {"name": "web", "namespace": "a"},
            "spec": {"containers": [{"name": "c", "resources": {"requests": {"memory": "1Gi"}}}],
                     "initContainers": [{"name": "i", "resources": {"requests": {"memory": "3Gi"}}}],
                     "overhead": {"memory": "128Mi"}}
        }));
        let vm = PodVm::of(&plain).unwrap().unwrap();
        assert_eq!(vm.vm_id, None);
        assert_eq!(vm.memory_bytes, (3 << 30) + (128 << 20));
        let no_memory = pod(
            serde_json::json!({"metadata": {"name": "x"}, "spec": {"containers": [{"name": "c"}]}}),
        );
        assert_eq!(PodVm::of(&no_memory), Ok(None));
        let bad = pod(serde_json::json!({
            "metadata": {"name": "x", "annotations": {"wset.io/expected-wss-bytes": "lots"}},
            "spec": {"containers": [{"name": "c", "resources": {"requests": {"memory": "1Gi"}}}]}
        }));
        let e = PodVm::of(&bad).unwrap_err();
        assert!(
            e.contains("wset.io/expected-wss-bytes") && e.contains("lots"),
            "{e}"
        );
        let bad_id = pod(serde_json::json!({
            "metadata": {"name": "x", "annotations": {"wset.io/vm-id": "a/b"}},
            "spec": {"containers": [{"name": "c", "resources": {"requests": {"memory": "1Gi"}}}]}
        }));
        assert!(PodVm::of(&bad_id).unwrap_err().contains("wset.io/vm-id"));
    }

    fn ranked(host: &str, fits: bool, headroom_gib: f64) -> (HostId, Ranked) {
        let h: HostId = host.parse().unwrap();
        (
            h.clone(),
            Ranked {
                host_id: h,
                headroom_bytes: headroom_gib * (1u64 << 30) as f64,
                fits,
                fits_when_empty: true,
                maintenance: false,
                explanation: String::new(),
            },
        )
    }

    #[test]
    fn scores_follow_headroom() {
        let r: HashMap<HostId, Ranked> = [
            ranked("a", true, 10.0),
            ranked("b", true, 1.0),
            ranked("c", false, -3.0),
            ranked("d", true, 5.5),
        ]
        .into_iter()
        .collect();
        let names: Vec<String> = ["a", "b", "c", "d", "unknown"].map(String::from).to_vec();
        let s: Vec<i64> = scores(&names, &r).iter().map(|h| h.score).collect();
        assert_eq!(s, vec![10, 1, 0, 6, 0]);
        let one = scores(&names[..1], &r);
        assert_eq!(one[0].score, MAX_SCORE);
    }

    #[test]
    fn results_speak_go_field_names() {
        let r = FilterResult {
            node_names: Some(vec!["n1".into()]),
            ..Default::default()
        };
        let v = serde_json::to_value(&r).unwrap();
        for k in [
            "Nodes",
            "NodeNames",
            "FailedNodes",
            "FailedAndUnresolvableNodes",
            "Error",
        ] {
            assert!(v.get(k).is_some(), "{k} missing from {v}");
        }
        let h = serde_json::to_value(HostPriority {
            host: "n".into(),
            score: 3,
        })
        .unwrap();
        assert_eq!(h, serde_json::json!({"Host": "n", "Score": 3}));
    }
}
