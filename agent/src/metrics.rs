//! The agent's Prometheus metrics, rendered on each scrape from the
//! trackers' shared state (no tracker waits for a scrape) and the intake's
//! counters.

use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;

use wset_serve::metrics::{Exposition, Kind};
use wset_tracker::TrackerState;

use crate::config::Config;
use crate::host::Identity;
use crate::registry::Registry;

/// Everything a scrape reads.
#[derive(Debug)]
pub struct Sources {
    pub registry: Arc<Registry>,
    pub cfg: Arc<Config>,
    pub identity: Arc<Identity>,
    pub streams: Arc<tokio::sync::Semaphore>,
}

pub fn render(s: &Sources) -> String {
    let mut e = Exposition::new();
    let id = &s.identity;
    e.family(
        "wset_agent_info",
        Kind::Gauge,
        "The agent: its host, instance and version (value 1).",
    )
    .sample(
        "wset_agent_info",
        &[
            ("host_id", &id.host_id),
            ("instance_id", &id.instance_id),
            ("version", env!("CARGO_PKG_VERSION")),
            ("rwp", if id.rwp_available { "true" } else { "false" }),
        ],
        1.0,
    );

    let r = &s.registry.registrations;
    e.family(
        "wset_agent_registrations_total",
        Kind::Counter,
        "VMM registrations by outcome: accepted, or refused for a bad handshake, a peer outside the allow-list, the rate limit, or a failed registration.",
    );
    for (result, c) in [
        ("accepted", &r.accepted),
        ("refused_handshake", &r.refused_handshake),
        ("refused_peer", &r.refused_peer),
        ("refused_rate", &r.refused_rate),
        ("refused_registration", &r.refused_registration),
    ] {
        e.sample(
            "wset_agent_registrations_total",
            &[("result", result)],
            c.load(Relaxed) as f64,
        );
    }
    e.family(
        "wset_agent_watch_streams",
        Kind::Gauge,
        "WatchSummaries streams open now.",
    )
    .sample(
        "wset_agent_watch_streams",
        &[],
        s.cfg
            .max_streams
            .saturating_sub(s.streams.available_permits()) as f64,
    );

    let vms = s.registry.list();
    e.family(
        "wset_agent_vms",
        Kind::Gauge,
        "VMs known, by tracker state.",
    );
    for (name, state) in [
        ("tracking", TrackerState::Tracking),
        ("stopped", TrackerState::Stopped),
        ("retired", TrackerState::Retired),
        ("failed", TrackerState::Failed),
    ] {
        let n = vms.iter().filter(|v| v.state == state).count();
        e.sample("wset_agent_vms", &[("state", name)], n as f64);
    }

    // Per VM, tracking ones only: a retired VM's series end with it.
    let tracking: Vec<_> = vms
        .iter()
        .filter(|v| v.state == TrackerState::Tracking)
        .collect();
    let now = wset_serve::process::now_ms();
    let mut per_vm = Vec::with_capacity(tracking.len());
    for v in &tracking {
        if let (Ok((_, summary)), Some(shared)) = (
            s.registry.summary(&v.info.vm_id, &s.cfg.summary, now),
            s.registry.shared(&v.info.vm_id),
        ) {
            per_vm.push((v, crate::wire::counters(&shared), summary, shared));
        }
    }
    e.family(
        "wset_vm_info",
        Kind::Gauge,
        "A tracked VM: its tracking methods and handshake (value 1).",
    );
    for (v, ..) in &per_vm {
        let methods = v
            .info
            .plan
            .methods()
            .iter()
            .map(|m| m.name())
            .collect::<Vec<_>>()
            .join("+");
        e.sample(
            "wset_vm_info",
            &[
                ("vm_id", v.info.vm_id.as_str()),
                ("methods", &methods),
                ("handshake", v.info.handshake.as_str()),
            ],
            1.0,
        );
    }
    e.family("wset_vm_memory_bytes", Kind::Gauge, "Guest memory tracked.");
    for (v, ..) in &per_vm {
        e.sample(
            "wset_vm_memory_bytes",
            &[("vm_id", v.info.vm_id.as_str())],
            v.info.memory_bytes as f64,
        );
    }
    e.family(
        "wset_vm_faults_total",
        Kind::Counter,
        "Faults the VM's tracker served, by kind (missing: first touch or a page in custody; wp: write-protect; rwp_read/rwp_write: read/write-protect mode).",
    );
    for (v, c, ..) in &per_vm {
        for (kind, n) in [
            ("missing", c.missing_faults),
            ("wp", c.wp_faults),
            ("rwp_read", c.rwp_read_faults),
            ("rwp_write", c.rwp_write_faults),
        ] {
            e.sample(
                "wset_vm_faults_total",
                &[("vm_id", v.info.vm_id.as_str()), ("kind", kind)],
                n as f64,
            );
        }
    }
    e.family(
        "wset_vm_fault_service_seconds",
        Kind::Histogram,
        "Time from reading a fault message to resolving it, on the VM's tracker thread.",
    );
    for (v, c, _, shared) in &per_vm {
        let buckets: Vec<(f64, u64)> = c
            .fault_service_latency
            .iter()
            .map(|b| {
                (
                    if b.le_ns == 0 {
                        f64::INFINITY
                    } else {
                        b.le_ns as f64 / 1e9
                    },
                    b.count,
                )
            })
            .collect();
        e.histogram(
            "wset_vm_fault_service_seconds",
            &[("vm_id", v.info.vm_id.as_str())],
            &buckets,
            shared.latency_sum_ns() as f64 / 1e9,
        );
    }
    // One sample per VM each.
    type PerVm<'a> = (
        &'a wset_proto::v1::TrackerCounters,
        &'a wset_tracker::summary::Summary,
        &'a wset_tracker::VmShared,
    );
    type Family = (&'static str, Kind, &'static str, fn(PerVm<'_>) -> f64);
    let scalars: [Family; 12] = [
        (
            "wset_vm_pages_in_custody",
            Kind::Gauge,
            "Guest pages held in the agent's custody file (their hole punched in guest memory) now.",
            |(c, ..)| c.pages_in_custody as f64,
        ),
        (
            "wset_vm_custody_full_total",
            Kind::Counter,
            "Pages not taken into custody because it was full (every slot in use, or its filesystem out of space).",
            |(c, ..)| c.custody_full as f64,
        ),
        (
            "wset_vm_prefetched_pages_total",
            Kind::Counter,
            "Pages copied in from the snapshot file ahead of the guest by the learned restore prefetch (faults served on demand: wset_vm_faults_total).",
            |(c, ..)| c.prefetched_pages as f64,
        ),
        (
            "wset_vm_prefetched_untouched_pages",
            Kind::Gauge,
            "Prefetched pages the guest is estimated not to have touched within the recording span, from the share of withheld probe pages it did not touch (0 until the span ends).",
            |(c, ..)| {
                if c.prefetch_probes == 0 {
                    0.0
                } else {
                    (c.prefetched_pages as f64 * c.prefetch_probes_untouched as f64
                        / c.prefetch_probes as f64)
                        .round()
                }
            },
        ),
        (
            "wset_vm_evicted_pages_total",
            Kind::Counter,
            "Cold pages RWP eviction saved to custody and freed from guest memory.",
            |(c, ..)| c.evicted_pages as f64,
        ),
        (
            "wset_vm_refaulted_pages_total",
            Kind::Counter,
            "Pages brought back from custody by a guest access.",
            |(c, ..)| c.refaulted_pages as f64,
        ),
        (
            "wset_vm_events_dropped_total",
            Kind::Counter,
            "uffd events the tracker could not attribute (outside the VM's regions, or unknown).",
            |(c, ..)| c.events_dropped as f64,
        ),
        (
            "wset_vm_harvests_total",
            Kind::Counter,
            "Interval harvests (epochs closed).",
            |(c, ..)| c.harvests as f64,
        ),
        (
            "wset_vm_harvest_seconds_total",
            Kind::Counter,
            "Time spent harvesting (scan, re-protect, re-arm).",
            |(c, ..)| c.harvest_ns_total as f64 / 1e9,
        ),
        (
            "wset_vm_sample_rearm_stride",
            Kind::Gauge,
            "Sampled tracking: hot granules are re-armed once every this many intervals to keep within the fault budget (1: every interval).",
            |(.., shared)| shared.stride() as f64,
        ),
        (
            "wset_vm_dirty_rate_bytes_per_second",
            Kind::Gauge,
            "Bytes dirtied per second over the last interval.",
            |(_, summary, _)| summary.dirty_rate_bytes_per_s,
        ),
        (
            "wset_vm_working_set_relative_error",
            Kind::Gauge,
            "Stated error of the working-set figures, as a fraction of guest memory (95% unless exact).",
            |(_, summary, _)| summary.error.relative_error,
        ),
    ];
    for (name, kind, help, f) in scalars {
        e.family(name, kind, help);
        for (v, c, summary, shared) in &per_vm {
            e.sample(
                name,
                &[("vm_id", v.info.vm_id.as_str())],
                f((c, summary, shared)),
            );
        }
    }
    e.family(
        "wset_vm_working_set_bytes",
        Kind::Gauge,
        "Working-set size over each window (estimated for sampled methods).",
    );
    for (v, _, summary, _) in &per_vm {
        for w in &summary.windows {
            let window = format!("{}s", w.window_ms as f64 / 1000.0);
            e.sample(
                "wset_vm_working_set_bytes",
                &[("vm_id", v.info.vm_id.as_str()), ("window", &window)],
                w.wss_bytes as f64,
            );
        }
    }
    e.process();
    e.finish()
}
