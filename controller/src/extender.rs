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
//!   planner keeps there (more headroom, higher: the scores fall in
//!   RankHosts' order); nodes it does not fit on, and nodes wset does not
//!   know, 0.
//!
//! A pod is a VM by [`PodVm::of`]; a pod that is no VM gets no opinion
//! (every node passes, all score 0). A node is the host whose id is its
//! name; a node wset has no agent on passes the filter and scores 0. Without a plan to answer from (no leader, no agent yet) the
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
    /// Pod-level resources (Kubernetes 1.32+).
    #[serde(default)]
    pub resources: Option<Resources>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Container {
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub resources: Resources,
    /// `Always` on an init container: a sidecar.
    #[serde(default)]
    pub restart_policy: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
pub struct Resources {
    #[serde(default)]
    pub requests: BTreeMap<String, Value>,
    #[serde(default)]
    pub limits: BTreeMap<String, Value>,
}

/// A `v1.NodeList`; its nodes are kept whole, to be echoed back (Go
/// writes an empty list's items as null).
#[derive(Debug, Deserialize)]
pub struct NodeList {
    #[serde(default)]
    pub items: Option<Vec<Value>>,
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

/// A Kubernetes quantity (`"1266Mi"`, `"2G"`, `"1e9"`, `"1.5Gi"`, `"512"`)
/// as bytes, computed exactly (no floating point) and rounded up as
/// Kubernetes rounds memory.
pub fn quantity_bytes(q: &str) -> Result<u64, String> {
    let bad = || format!("{q:?} is not a Kubernetes quantity of bytes (e.g. 512Mi, 2Gi, 1e9)");
    let too_big = || format!("{q:?} is more than 1 PiB");
    let s = q.trim();
    let s = s.strip_prefix('+').unwrap_or(s);
    let end = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (num, suffix) = s.split_at(end);
    let (int, frac) = num.split_once('.').unwrap_or((num, ""));
    if (int.is_empty() && frac.is_empty()) || frac.contains('.') {
        return Err(bad());
    }
    // The value is mantissa x 10^exp10 x mult.
    let digits = format!("{int}{frac}");
    let digits = digits.trim_start_matches('0');
    if digits.len() > 30 {
        return Err(too_big());
    }
    let mantissa: u128 = if digits.is_empty() {
        0
    } else {
        digits.parse().map_err(|_| bad())?
    };
    let mut exp10 = -(frac.len() as i64);
    let mut mult: u128 = 1;
    match suffix {
        "" => {}
        "Ki" | "Mi" | "Gi" | "Ti" | "Pi" | "Ei" => {
            let k = ["Ki", "Mi", "Gi", "Ti", "Pi", "Ei"]
                .iter()
                .position(|x| *x == suffix)
                .unwrap_or(0);
            mult = 1u128 << (10 * (k as u32 + 1));
        }
        "n" => exp10 -= 9,
        "u" => exp10 -= 6,
        "m" => exp10 -= 3,
        "k" => exp10 += 3,
        "M" => exp10 += 6,
        "G" => exp10 += 9,
        "T" => exp10 += 12,
        "P" => exp10 += 15,
        "E" => exp10 += 18,
        e if e.starts_with(['e', 'E']) => {
            let x: i64 = e[1..].parse().map_err(|_| bad())?;
            exp10 = exp10.checked_add(x).ok_or_else(bad)?;
        }
        _ => return Err(bad()),
    }
    if mantissa == 0 {
        return Ok(0);
    }
    let scaled = mantissa.checked_mul(mult).ok_or_else(too_big)?;
    let bytes = if exp10 >= 0 {
        let p = u32::try_from(exp10)
            .ok()
            .filter(|&p| p <= 38)
            .ok_or_else(too_big)?;
        scaled.checked_mul(10u128.pow(p)).ok_or_else(too_big)?
    } else if -exp10 > 38 {
        // Above 0 and below one byte: one byte, rounded up.
        1
    } else {
        scaled.div_ceil(10u128.pow((-exp10) as u32))
    };
    if bytes > u128::from(crate::history::MAX_MEMORY_BYTES) {
        return Err(too_big());
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

/// A container's memory request: its request, else its limit (what the
/// API server's defaulting makes the request), else none.
fn request(r: &Resources) -> Result<Option<u64>, String> {
    match r.requests.get("memory").or_else(|| r.limits.get("memory")) {
        Some(v) => value_bytes(v).map(Some),
        None => Ok(None),
    }
}

/// The pod's memory request as kube-scheduler counts it
/// (`resourcehelper.PodRequests`): the containers' requests summed with
/// the sidecars' (init containers with `restartPolicy: Always`, which keep
/// running); at least what any init container needs beside the sidecars
/// started before it; the pod-level request instead, when the pod gives
/// one; plus the pod overhead.
fn pod_memory(spec: &PodSpec) -> Result<u64, String> {
    let of = |c: &Container| {
        request(&c.resources)
            .map(Option::unwrap_or_default)
            .map_err(|e| format!("container {:?} memory: {e}", c.name))
    };
    let mut sum = 0u64;
    for c in &spec.containers {
        sum = sum.saturating_add(of(c)?);
    }
    let (mut sidecars, mut init) = (0u64, 0u64);
    for c in &spec.init_containers {
        let r = of(c)?;
        if c.restart_policy.as_deref() == Some("Always") {
            sum = sum.saturating_add(r);
            sidecars = sidecars.saturating_add(r);
            init = init.max(sidecars);
        } else {
            init = init.max(r.saturating_add(sidecars));
        }
    }
    let mut total = sum.max(init);
    if let Some(pod) = &spec.resources
        && let Some(r) = request(pod).map_err(|e| format!("pod-level memory: {e}"))?
    {
        total = r;
    }
    let overhead = match spec.overhead.get("memory") {
        Some(v) => value_bytes(v).map_err(|e| format!("pod overhead memory: {e}"))?,
        None => 0,
    };
    Ok(total.saturating_add(overhead))
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
    /// The VM a pod runs, if it is one:
    /// - `wset.io/vm-id` (annotation, else label) names it;
    /// - else a KubeVirt virt-launcher pod (label `kubevirt.io=virt-launcher`)
    ///   is the VMI its `kubevirt.io/domain` annotation (or label) names,
    ///   with the id `<namespace>_<name>` (the libvirt domain name KubeVirt
    ///   gives QEMU; a VM wset has not seen when that is no valid id);
    /// - else a pod with `wset.io/expected-wss-bytes` is a VM wset has not
    ///   seen;
    /// - else it is no VM, and wset has no opinion on where it goes
    ///   (`None`): DaemonSet pods, wset's own agent among them, pods pinned
    ///   to a node.
    ///
    /// Its memory is the pod's memory request; `None` too for a VM without
    /// one, which wset cannot size.
    pub fn of(pod: &Pod) -> Result<Option<Self>, String> {
        let m = &pod.metadata;
        let who = || format!("pod {}/{}", m.namespace, m.name);
        let get = |k: &str| m.annotations.get(k).or_else(|| m.labels.get(k));
        let expected = m.annotations.get(EXPECTED_WSS);
        let (vm_id, how) = if let Some(id) = get(VM_ID) {
            let id = VmId::parse_in(VM_ID, id).map_err(|e| format!("{}: {e}", who()))?;
            (Some(id), "wset.io/vm-id")
        } else if m.labels.get(KUBEVIRT).map(String::as_str) == Some(KUBEVIRT_LAUNCHER) {
            match get(KUBEVIRT_DOMAIN) {
                Some(d) => match VmId::parse_in(KUBEVIRT_DOMAIN, &format!("{}_{d}", m.namespace)) {
                    Ok(id) => (Some(id), "KubeVirt virt-launcher"),
                    Err(e) => {
                        tracing::debug!(pod = %who(), error = %e, "a virt-launcher pod whose VMI makes no VM id: placed as a new VM");
                        (None, "KubeVirt virt-launcher (no valid VM id)")
                    }
                },
                None => (None, "KubeVirt virt-launcher without kubevirt.io/domain"),
            }
        } else if expected.is_some() {
            (None, "wset.io/expected-wss-bytes")
        } else {
            return Ok(None);
        };
        let memory_bytes = pod_memory(&pod.spec).map_err(|e| format!("{}: {e}", who()))?;
        let expected_wss_bytes = match expected {
            Some(q) => quantity_bytes(q)
                .map_err(|e| format!("{}: annotation {EXPECTED_WSS}: {e}", who()))?,
            None => 0,
        };
        if memory_bytes == 0 {
            return Ok(None);
        }
        if expected_wss_bytes > memory_bytes {
            return Err(format!(
                "{}: annotation {EXPECTED_WSS} ({expected_wss_bytes} B) is more than the pod's memory request ({memory_bytes} B)",
                who()
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

/// The first name given twice.
fn twice(names: &[String]) -> Option<&String> {
    let mut seen = std::collections::HashSet::new();
    names.iter().find(|n| !seen.insert(n.as_str()))
}

fn nodes_of(args: &mut ExtenderArgs) -> Result<Nodes, String> {
    let (names, list) = match (args.node_names.take(), args.nodes.take()) {
        (Some(_), Some(_)) => {
            return Err("both NodeNames and Nodes are given: kube-scheduler sends one (NodeNames when nodeCacheCapable)".into());
        }
        (None, None) => return Err("neither NodeNames nor Nodes is given".into()),
        (Some(names), None) => (Some(names), None),
        (None, Some(list)) => (None, Some(list)),
    };
    if let Some(names) = names {
        if let Some(d) = twice(&names) {
            return Err(format!("NodeNames names {d:?} twice"));
        }
        return Ok(Nodes {
            names,
            objects: None,
        });
    }
    let items = list.and_then(|l| l.items).unwrap_or_default();
    let mut names = Vec::with_capacity(items.len());
    for (i, n) in items.iter().enumerate() {
        match n.pointer("/metadata/name").and_then(Value::as_str) {
            Some(name) => names.push(name.to_owned()),
            None => return Err(format!("Nodes.items[{i}] has no metadata.name")),
        }
    }
    if let Some(d) = twice(&names) {
        return Err(format!("Nodes holds {d:?} twice"));
    }
    Ok(Nodes {
        names,
        objects: Some(("v1".into(), "NodeList".into(), items)),
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

/// Scores 1..=10 for the nodes the VM fits on: 1 plus 9 times the
/// headroom kept there as a share of the largest watermark among the
/// nodes (so the order is RankHosts' order, by headroom, and hosts a few
/// bytes apart score alike); 0 for the rest and for nodes wset does not
/// know.
pub fn scores(names: &[String], ranked: &HashMap<HostId, Ranked>) -> Vec<HostPriority> {
    let of = |n: &String| host_of(n).and_then(|h| ranked.get(&h));
    let scale = names
        .iter()
        .filter_map(of)
        .map(|r| r.watermark_bytes)
        .fold(0.0, f64::max);
    names
        .iter()
        .map(|n| {
            let score = match of(n) {
                Some(r) if r.fits && scale > 0.0 => {
                    let share = (r.headroom_bytes / scale).clamp(0.0, 1.0);
                    1 + (share * (MAX_SCORE - 1) as f64).round() as i64
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
        // Exactly, where floating point is a byte off or gives up.
        assert_eq!(quantity_bytes("8.3M"), Ok(8_300_000));
        assert_eq!(quantity_bytes("16.1k"), Ok(16_100));
        assert_eq!(quantity_bytes("0e400"), Ok(0));
        assert_eq!(quantity_bytes("1e-400"), Ok(1));
        assert_eq!(quantity_bytes("+1"), Ok(1));
        assert_eq!(quantity_bytes("0.5"), Ok(1));
        assert_eq!(quantity_bytes("1Pi"), Ok(1 << 50));
        for bad in [
            "", "Mi", "1Qi", "-1Gi", "1e", "2Ei", ".", "1.2.3", "1e99", "1Pi1",
        ] {
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
    fn pods_are_sized_as_kube_scheduler_sizes_them() {
        // A sidecar (restartPolicy: Always) runs beside the containers; an
        // ordinary init container needs room beside the sidecars before it.
        let p = pod(serde_json::json!({
            "metadata": {"name": "s", "annotations": {"wset.io/expected-wss-bytes": "1Mi"}},
            "spec": {
                "initContainers": [
                    {"name": "proxy", "restartPolicy": "Always", "resources": {"requests": {"memory": "256Mi"}}},
                    {"name": "migrate", "resources": {"requests": {"memory": "1536Mi"}}}
                ],
                "containers": [{"name": "app", "resources": {"requests": {"memory": "1Gi"}}}]
            }
        }));
        assert_eq!(
            PodVm::of(&p).unwrap().unwrap().memory_bytes,
            (1536 + 256) << 20
        );
        let p = pod(serde_json::json!({
            "metadata": {"name": "s", "annotations": {"wset.io/expected-wss-bytes": "1Mi"}},
            "spec": {
                "initContainers": [{"name": "proxy", "restartPolicy": "Always", "resources": {"requests": {"memory": "256Mi"}}}],
                "containers": [{"name": "app", "resources": {"requests": {"memory": "1Gi"}}}]
            }
        }));
        assert_eq!(
            PodVm::of(&p).unwrap().unwrap().memory_bytes,
            (1024 + 256) << 20
        );
        // A pod-level request stands for the containers'.
        let p = pod(serde_json::json!({
            "metadata": {"name": "s", "annotations": {"wset.io/expected-wss-bytes": "1Mi"}},
            "spec": {
                "resources": {"requests": {"memory": "3Gi"}},
                "containers": [{"name": "app"}],
                "overhead": {"memory": "64Mi"}
            }
        }));
        assert_eq!(
            PodVm::of(&p).unwrap().unwrap().memory_bytes,
            (3 << 30) + (64 << 20)
        );
    }

    #[test]
    fn pods_that_are_no_vm_get_no_opinion() {
        // A DaemonSet's pod, say: no wset annotation, not virt-launcher.
        let p = pod(serde_json::json!({
            "metadata": {"name": "wset-agent-x", "namespace": "wset"},
            "spec": {"containers": [{"name": "agent", "resources": {"requests": {"memory": "128Mi"}}}]}
        }));
        assert_eq!(PodVm::of(&p), Ok(None));
        // A VMI whose namespace and name make no VM id is a new VM.
        let long = "n".repeat(40);
        let p = pod(serde_json::json!({
            "metadata": {"name": "virt-launcher-x", "namespace": long,
                         "labels": {"kubevirt.io": "virt-launcher"},
                         "annotations": {"kubevirt.io/domain": long}},
            "spec": {"containers": [{"name": "compute", "resources": {"requests": {"memory": "1Gi"}}}]}
        }));
        let vm = PodVm::of(&p).unwrap().unwrap();
        assert_eq!(vm.vm_id, None);
        assert_eq!(vm.memory_bytes, 1 << 30);
    }

    #[test]
    fn plain_pods_and_bad_annotations() {
        let plain = pod(serde_json::json!({
            "metadata": {"name": "web", "namespace": "a", "annotations": {"wset.io/expected-wss-bytes": "1Gi"}},
            "spec": {"containers": [{"name": "c", "resources": {"requests": {"memory": "1Gi"}}}],
                     "initContainers": [{"name": "i", "resources": {"requests": {"memory": "3Gi"}}}],
                     "overhead": {"memory": "128Mi"}}
        }));
        let vm = PodVm::of(&plain).unwrap().unwrap();
        assert_eq!(vm.vm_id, None);
        assert_eq!(vm.memory_bytes, (3 << 30) + (128 << 20));
        let no_memory = pod(
            serde_json::json!({"metadata": {"name": "x", "annotations": {"wset.io/expected-wss-bytes": "0"}}, "spec": {"containers": [{"name": "c"}]}}),
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
                watermark_bytes: 10.0 * (1u64 << 30) as f64,
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
        assert_eq!(s, vec![10, 2, 0, 6, 0]);
        // Hosts a few bytes apart score alike.
        let mut near = ranked("e", true, 5.5);
        near.1.headroom_bytes += 2.0;
        let r: HashMap<HostId, Ranked> = [ranked("d", true, 5.5), near].into_iter().collect();
        let s = scores(&["d".into(), "e".into()], &r);
        assert_eq!(s[0].score, s[1].score, "{s:?}");
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
