//! The planner against named scenarios with expected plans, and property
//! tests of its invariants over random clusters: no host that receives a VM
//! ends over its watermark at the configured risk, no VM moves twice or
//! inside its hysteresis window, pinned VMs and VMs dirtying faster than the
//! link allows never move, anti-affinity holds, and every move names a
//! reason and a finite cost.

use std::collections::BTreeMap;

use proptest::prelude::*;
use wset_controller::planner::{
    Config, HostInput, Input, MoveReason, PlacementRequest, Plan, Sample, VmInput, demand, labels,
    normal_cdf, normal_quantile, place, plan,
};
use wset_proto::ids::IdError;

const GIB: u64 = 1 << 30;
const NOW: u64 = 10 * 86_400_000;

/// A VM or host id, parsed.
fn parse_id<T: std::str::FromStr<Err = IdError>>(s: &str) -> T {
    s.parse().expect("an id")
}

fn host(id: &str, cap_gib: u64) -> HostInput {
    HostInput {
        host_id: parse_id(id),
        capacity_bytes: cap_gib * GIB,
        maintenance: false,
    }
}

/// An hour of steady samples, one a minute, with a little deterministic
/// noise (±1% of the working set).
fn steady(wss: u64, dirty: f64) -> Vec<Sample> {
    (0..60)
        .map(|i| Sample {
            t_ms: NOW - 3_600_000 + i * 60_000,
            wss_bytes: wss + (wss / 100) * ((i * 7) % 3) - wss / 100,
            dirty_bytes_per_s: dirty,
        })
        .collect()
}

fn vm(id: &str, on: &str, mem_gib: u64, wss_mib: u64) -> VmInput {
    VmInput {
        samples: steady(wss_mib << 20, 10e6),
        relative_error: 0.01,
        ..VmInput::new(parse_id(id), parse_id(on), mem_gib * GIB)
    }
}

fn with_label(mut v: VmInput, k: &str, val: &str) -> VmInput {
    v.labels.insert(k.into(), val.into());
    v
}

fn moves(p: &Plan) -> Vec<(&str, &str, &str, u8)> {
    p.moves
        .iter()
        .map(|m| (m.vm_id.as_str(), m.from.as_str(), m.to.as_str(), m.priority))
        .collect()
}

fn host_plan<'a>(p: &'a Plan, h: &str) -> &'a wset_controller::planner::HostPlan {
    p.hosts.iter().find(|x| x.host_id == h).unwrap()
}

#[test]
fn normal_functions() {
    assert!((normal_quantile(0.99) - 2.326_347_9).abs() < 1e-6);
    assert!((normal_quantile(0.5)).abs() < 1e-9);
    assert!((normal_quantile(0.01) + 2.326_347_9).abs() < 1e-6);
    assert!((normal_cdf(1.96) - 0.975_002).abs() < 1e-5);
    assert!((normal_cdf(-1.0) - 0.158_655).abs() < 1e-5);
}

/// Each named scenario with the plan it must give.
#[test]
fn scenarios() {
    struct Case {
        name: &'static str,
        input: Input,
        cfg: Config,
        expect: fn(&Plan),
    }
    let cfg = Config::default();
    let cases = vec![
        Case {
            name: "idle cluster: nothing to do, room to overcommit",
            input: Input {
                now_ms: NOW,
                hosts: vec![host("a", 64), host("b", 64), host("c", 64)],
                vms: (0..12)
                    .map(|i| vm(&format!("v{i}"), ["a", "b", "c"][i % 3], 8, 1024))
                    .collect(),
            },
            cfg: cfg.clone(),
            expect: |p| {
                assert!(p.moves.is_empty() && p.unresolved.is_empty(), "{p:#?}");
                for h in &p.hosts {
                    assert_eq!(h.committed_bytes, 32 * GIB);
                    assert!(h.safe_overcommit_ratio > 5.0, "{h:#?}");
                    assert!(h.admissible_bytes > 40 * GIB, "{h:#?}");
                    assert!(h.overflow_probability < 1e-9);
                }
            },
        },
        Case {
            name: "one hot host: one move relieves it, to the host with most room",
            input: Input {
                now_ms: NOW,
                hosts: vec![host("a", 64), host("b", 64), host("c", 96)],
                vms: (0..8)
                    .map(|i| vm(&format!("a{i}"), "a", 8, 7680))
                    .chain([vm("b0", "b", 8, 4096)])
                    .collect(),
            },
            cfg: cfg.clone(),
            expect: |p| {
                assert_eq!(p.moves.len(), 1, "{p:#?}");
                let m = &p.moves[0];
                assert_eq!(
                    (m.from.as_str(), m.to.as_str(), m.reason),
                    ("a", "c", MoveReason::Overload)
                );
                assert!(m.copy_seconds > 6.0 && m.copy_seconds < 8.0, "{m:#?}");
                assert!(p.unresolved.is_empty(), "{p:#?}");
                let a = host_plan(p, "a");
                assert!(a.demand_at_risk_bytes > 0.85 * a.capacity_bytes as f64);
            },
        },
        Case {
            name: "consolidation: a nearly idle host is emptied",
            input: Input {
                now_ms: NOW,
                hosts: vec![host("a", 64), host("b", 64), host("c", 64)],
                vms: vec![
                    vm("a0", "a", 32, 24_576),
                    vm("b0", "b", 32, 24_576),
                    vm("c0", "c", 4, 512),
                ],
            },
            cfg: Config {
                consolidate_below: 0.2,
                ..cfg.clone()
            },
            expect: |p| {
                assert_eq!(moves(p).len(), 1, "{p:#?}");
                let m = &p.moves[0];
                assert_eq!(
                    (m.vm_id.as_str(), m.from.as_str(), m.priority),
                    ("c0", "c", 5)
                );
                assert_eq!(m.reason, MoveReason::Consolidation);
            },
        },
        Case {
            name: "a VM dirtying faster than the link carries is never chosen",
            input: Input {
                now_ms: NOW,
                hosts: vec![host("a", 64), host("b", 64)],
                vms: {
                    let mut v: Vec<VmInput> =
                        (0..7).map(|i| vm(&format!("a{i}"), "a", 8, 7800)).collect();
                    // The smallest, so the cheapest by size, but it dirties 1 GB/s.
                    let mut hot = vm("writer", "a", 4, 3500);
                    hot.samples = steady(3500 << 20, 1e9);
                    v.push(hot);
                    v
                },
            },
            cfg: cfg.clone(),
            expect: |p| {
                assert!(!p.moves.is_empty(), "{p:#?}");
                assert!(p.moves.iter().all(|m| m.vm_id != "writer"), "{p:#?}");
            },
        },
        Case {
            name: "anti-affinity: never onto a host with the same group",
            input: Input {
                now_ms: NOW,
                hosts: vec![host("a", 64), host("b", 128), host("c", 48)],
                vms: {
                    let mut v: Vec<VmInput> = (0..7)
                        .map(|i| {
                            with_label(
                                vm(&format!("a{i}"), "a", 8, 7800),
                                labels::ANTI_AFFINITY,
                                "db",
                            )
                        })
                        .collect();
                    v.push(with_label(
                        vm("b0", "b", 8, 1024),
                        labels::ANTI_AFFINITY,
                        "db",
                    ));
                    v
                },
            },
            cfg: cfg.clone(),
            expect: |p| {
                assert_eq!(p.moves.len(), 1, "{p:#?}");
                assert_eq!(p.moves[0].to, "c", "b has room but runs a db VM: {p:#?}");
            },
        },
        Case {
            name: "maintenance host: every VM leaves, priority 1",
            input: Input {
                now_ms: NOW,
                hosts: vec![
                    HostInput {
                        maintenance: true,
                        ..host("a", 64)
                    },
                    host("b", 64),
                    host("c", 64),
                ],
                vms: vec![vm("a0", "a", 8, 2048), vm("a1", "a", 8, 2048)],
            },
            cfg: cfg.clone(),
            expect: |p| {
                assert_eq!(p.moves.len(), 2, "{p:#?}");
                assert!(
                    p.moves
                        .iter()
                        .all(|m| m.priority == 1 && m.reason == MoveReason::Maintenance)
                );
                // Spread: each destination keeps the most headroom.
                assert_ne!(p.moves[0].to, p.moves[1].to);
                assert!(p.unresolved.is_empty());
            },
        },
        Case {
            name: "pinned and recently moved VMs stay; the host is reported unresolved",
            input: Input {
                now_ms: NOW,
                hosts: vec![host("a", 32), host("b", 64)],
                vms: vec![
                    with_label(vm("p", "a", 16, 15_000), labels::PINNED, "true"),
                    VmInput {
                        last_moved_ms: Some(NOW - 60_000),
                        ..vm("r", "a", 16, 15_000)
                    },
                ],
            },
            cfg: cfg.clone(),
            expect: |p| {
                assert!(p.moves.is_empty(), "{p:#?}");
                assert_eq!(p.unresolved.len(), 1);
                let u = &p.unresolved[0];
                assert!(u.contains("pinned") && u.contains("hysteresis"), "{u}");
            },
        },
        Case {
            name: "a VM that just changed phase: its new, larger working set counts",
            input: Input {
                now_ms: NOW,
                hosts: vec![host("a", 32), host("b", 64)],
                vms: {
                    let mut grown = vm("g", "a", 24, 1024);
                    for s in grown.samples.iter_mut().skip(50) {
                        s.wss_bytes = 20 * GIB;
                    }
                    vec![grown, vm("a1", "a", 8, 7500)]
                },
            },
            cfg: cfg.clone(),
            expect: |p| {
                let d = &host_plan(p, "a").vms[0].demand;
                assert!(d.phase_change_at_ms.is_some(), "{d:#?}");
                assert_eq!(d.samples_used, 10);
                assert!(d.mean_bytes >= 20.0 * GIB as f64, "{d:#?}");
                // 20 + 7.3 GiB > 85% of 32: something leaves a (the hour's mean, 4.7 GiB, would not have moved anything).
                assert!(!p.moves.is_empty(), "{p:#?}");
            },
        },
    ];
    for c in cases {
        let p = plan(&c.input, &c.cfg);
        println!("{}: {} moves {:?}", c.name, p.moves.len(), moves(&p));
        (c.expect)(&p);
        for m in &p.moves {
            assert!(
                !m.explanation.is_empty() && m.copy_seconds.is_finite(),
                "{}: {m:#?}",
                c.name
            );
        }
    }
}

#[test]
fn demand_follows_growth_and_history_gaps() {
    let cfg = Config::default();
    // Growing 1 GiB per 10 minutes: projected an hour ahead.
    let mut v = vm("g", "a", 64, 1024);
    for (i, s) in v.samples.iter_mut().enumerate() {
        s.wss_bytes = GIB + (i as u64) * GIB / 10;
    }
    let d = demand(&v, &cfg, NOW);
    assert!(d.trend_bytes_per_h > 5.0 * GIB as f64, "{d:#?}");
    assert!(d.mean_bytes > 12.0 * GIB as f64, "{d:#?}");
    // No history: the whole memory.
    let mut v = vm("n", "a", 8, 0);
    v.samples.clear();
    let d = demand(&v, &cfg, NOW);
    assert_eq!(d.mean_bytes, 8.0 * GIB as f64);
    assert!(d.explain(cfg.horizon_ms).contains("no working-set history"));
}

/// A demand the caller computed (and whose samples it dropped) is the
/// plan's demand for that VM: the same plan as from the samples.
#[test]
fn a_precomputed_demand_stands_for_the_samples() {
    let cfg = Config::default();
    let input = Input {
        now_ms: NOW,
        hosts: vec![host("a", 32)],
        vms: vec![vm("x", "a", 16, 3000), vm("y", "a", 16, 9000)],
    };
    let mut reduced = input.clone();
    for v in &mut reduced.vms {
        v.demand = Some(demand(v, &cfg, NOW));
        v.samples.clear();
    }
    let (full, thin) = (plan(&input, &cfg), plan(&reduced, &cfg));
    assert_eq!(full, thin);
    let y = host_plan(&thin, "a")
        .vms
        .iter()
        .find(|v| v.vm_id == "y")
        .unwrap();
    assert_eq!(y.demand, demand(&input.vms[1], &cfg, NOW));
    assert!(y.demand.samples_used > 0);
}

#[test]
fn placement_ranks_by_headroom() {
    let input = Input {
        now_ms: NOW,
        hosts: vec![
            host("busy", 64),
            host("free", 64),
            HostInput {
                maintenance: true,
                ..host("maint", 256)
            },
            host("dbhost", 128),
        ],
        vms: vec![
            vm("b0", "busy", 32, 30_000),
            with_label(vm("d0", "dbhost", 8, 1000), labels::ANTI_AFFINITY, "db"),
        ],
    };
    let req = PlacementRequest {
        memory_bytes: 16 * GIB,
        expected_wss_bytes: 8 * GIB,
        labels: BTreeMap::from([(labels::ANTI_AFFINITY.to_owned(), "db".to_owned())]),
        vm_id: None,
    };
    let cfg = Config::default();
    let r = place(&plan(&input, &cfg), &req, &cfg);
    let order: Vec<(&str, bool)> = r.iter().map(|x| (x.host_id.as_str(), x.fits)).collect();
    assert_eq!(order[0], ("free", true), "{r:#?}");
    assert_eq!(order[1], ("busy", true), "{r:#?}");
    assert!(order[2..].iter().all(|(_, fits)| !fits), "{r:#?}");
    assert!(
        r.iter()
            .any(|x| x.host_id == "dbhost" && x.explanation.contains("anti-affinity"))
    );
}

#[test]
fn placement_of_a_known_vm_uses_its_measured_demand() {
    // "big" is measured at 40 GiB on h1 (64 GiB); asked for as a 64 GiB VM
    // with no expectation, it fits nowhere as new, but as itself it fits on
    // its own host (taken off first) and on the free 64 GiB host.
    let input = Input {
        now_ms: NOW,
        hosts: vec![host("h1", 64), host("h2", 64), host("tiny", 16)],
        vms: vec![vm("big", "h1", 64, 40_000)],
    };
    let cfg = Config::default();
    let p = plan(&input, &cfg);
    let new = PlacementRequest {
        memory_bytes: 64 * GIB,
        ..Default::default()
    };
    let r = place(&p, &new, &cfg);
    assert!(r.iter().all(|x| !x.fits), "{r:#?}");
    let known = PlacementRequest {
        vm_id: Some(parse_id("big")),
        ..new.clone()
    };
    let r = place(&p, &known, &cfg);
    let by = |h: &str| {
        r.iter()
            .find(|x| x.host_id == h)
            .expect("every host ranked")
    };
    assert!(by("h1").fits && by("h2").fits, "{r:#?}");
    // On its own host it is not counted twice: the same headroom as on the
    // identical empty host.
    assert!(
        (by("h1").headroom_bytes - by("h2").headroom_bytes).abs() < 1.0,
        "{r:#?}"
    );
    // 40 GiB at risk cannot fit under a 16 GiB host's watermark even empty:
    // no preemption helps, and the reason says so.
    let t = by("tiny");
    assert!(!t.fits && !t.fits_when_empty, "{t:#?}");
    assert!(t.explanation.contains("alone"), "{t:#?}");
    // An unknown id is a new VM.
    let unknown = PlacementRequest {
        vm_id: Some(parse_id("nobody")),
        ..new
    };
    assert_eq!(
        place(&p, &unknown, &cfg),
        place(
            &p,
            &PlacementRequest {
                memory_bytes: 64 * GIB,
                ..Default::default()
            },
            &cfg
        )
    );
}

#[test]
fn a_host_short_of_room_names_the_shortfall() {
    let input = Input {
        now_ms: NOW,
        hosts: vec![host("busy", 64)],
        vms: vec![vm("b0", "busy", 48, 40_000)],
    };
    let cfg = Config::default();
    let req = PlacementRequest {
        memory_bytes: 32 * GIB,
        ..Default::default()
    };
    let r = place(&plan(&input, &cfg), &req, &cfg);
    assert!(!r[0].fits && r[0].fits_when_empty, "{r:#?}");
    assert!(r[0].explanation.starts_with("short by "), "{r:#?}");
    let short: f64 = r[0].explanation["short by ".len()..]
        .split(' ')
        .next()
        .and_then(|n| n.parse().ok())
        .expect("a number of MiB");
    assert!(
        (short - (-r[0].headroom_bytes / 1048576.0)).abs() <= 1.0,
        "{r:#?}"
    );
}

fn arb_cluster() -> impl Strategy<Value = Input> {
    let hosts = prop::collection::vec((16u64..256, prop::bool::weighted(0.1)), 2..7);
    hosts.prop_flat_map(|hs| {
        let n = hs.len();
        let vms = prop::collection::vec(
            (
                0..n,
                1u64..32,
                0.0f64..1.0,
                prop::sample::select(vec![1e6, 5e7, 4e8, 9e8]),
                prop::option::weighted(0.2, 0u64..7_200_000),
                prop::option::of(prop::sample::select(vec!["x", "y"])),
                prop::bool::weighted(0.1),
            ),
            0..40,
        );
        (Just(hs), vms).prop_map(|(hs, vms)| Input {
            now_ms: NOW,
            hosts: hs
                .iter()
                .enumerate()
                .map(|(i, (cap, maint))| HostInput {
                    host_id: parse_id(&format!("h{i}")),
                    capacity_bytes: cap * GIB,
                    maintenance: *maint,
                })
                .collect(),
            vms: vms
                .into_iter()
                .enumerate()
                .map(|(i, (h, mem, used, dirty, ago, grp, pinned))| {
                    let mut v = VmInput {
                        samples: steady(((mem * GIB) as f64 * used) as u64, dirty),
                        relative_error: 0.01,
                        last_moved_ms: ago.map(|a| NOW - a),
                        ..VmInput::new(
                            parse_id(&format!("v{i}")),
                            parse_id(&format!("h{h}")),
                            mem * GIB,
                        )
                    };
                    if let Some(g) = grp {
                        v.labels.insert(labels::ANTI_AFFINITY.into(), g.into());
                    }
                    if pinned {
                        v.labels.insert(labels::PINNED.into(), "true".into());
                    }
                    v
                })
                .collect(),
        })
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    #[test]
    fn plan_invariants(input in arb_cluster()) {
        let cfg = Config { consolidate_below: 0.25, ..Config::default() };
        let p = plan(&input, &cfg);
        let z = normal_quantile(1.0 - cfg.risk);
        let vms: BTreeMap<&str, &VmInput> = input.vms.iter().map(|v| (v.vm_id.as_str(), v)).collect();
        // Where every VM ends up.
        let mut at: BTreeMap<&str, &str> = input.vms.iter().map(|v| (v.vm_id.as_str(), v.host_id.as_str())).collect();
        let mut seen = std::collections::BTreeSet::new();
        let mut per_host: BTreeMap<&str, u32> = BTreeMap::new();
        for m in &p.moves {
            prop_assert!(seen.insert(m.vm_id.as_str()), "{} moves twice", m.vm_id);
            let v = vms[m.vm_id.as_str()];
            prop_assert_eq!(m.from.as_str(), v.host_id.as_str());
            prop_assert!(v.labels.get(labels::PINNED).is_none_or(|x| x != "true"), "pinned {} moved", m.vm_id);
            if let Some(t) = v.last_moved_ms {
                prop_assert!(NOW - t >= cfg.hysteresis_ms, "{} inside hysteresis", m.vm_id);
            }
            let dirty = v.samples[0].dirty_bytes_per_s;
            prop_assert!(dirty <= cfg.max_dirty_share * cfg.link_bytes_per_s, "{} dirties too fast", m.vm_id);
            prop_assert!(!m.explanation.is_empty() && m.copy_seconds.is_finite() && m.copy_seconds > 0.0);
            prop_assert!((1..=5).contains(&m.priority));
            let to = input.hosts.iter().find(|h| h.host_id == m.to).unwrap();
            prop_assert!(!to.maintenance, "moved onto a host in maintenance");
            *per_host.entry(m.from.as_str()).or_default() += 1;
            *per_host.entry(m.to.as_str()).or_default() += 1;
            at.insert(m.vm_id.as_str(), m.to.as_str());
        }
        for (h, n) in &per_host {
            prop_assert!(*n <= cfg.max_moves_per_host, "{h}: {n} moves");
        }
        // Every host that received a VM is under its watermark at risk, and
        // no anti-affinity group is doubled by a move.
        for h in &input.hosts {
            if !p.moves.iter().any(|m| m.to == h.host_id) {
                continue;
            }
            let here: Vec<&VmInput> = at.iter().filter(|(_, hh)| h.host_id == **hh).map(|(v, _)| vms[v]).collect();
            let (mut mean, mut var) = (0.0, 0.0);
            for v in &here {
                let d = demand(v, &cfg, NOW);
                mean += d.mean_bytes;
                var += d.std_bytes * d.std_bytes;
            }
            let at_risk = mean + z * f64::sqrt(var);
            prop_assert!(at_risk <= cfg.high_watermark * h.capacity_bytes as f64 * (1.0 + 1e-9),
                "{} over its watermark after moves: {} of {}", h.host_id, at_risk, h.capacity_bytes);
            for m in p.moves.iter().filter(|m| m.to == h.host_id) {
                if let Some(g) = vms[m.vm_id.as_str()].labels.get(labels::ANTI_AFFINITY) {
                    let same = here.iter().filter(|v| v.labels.get(labels::ANTI_AFFINITY) == Some(g)).count();
                    prop_assert_eq!(same, 1, "{} joins group {} on {}", m.vm_id, g, h.host_id);
                }
            }
        }
    }

    /// The other half: a planner that never moves anything keeps every
    /// invariant above. So: a host the plan leaves over its watermark, with
    /// moves left in its budget, holding a VM that may move and that fits
    /// under the watermark of another host with moves left (as the plan
    /// leaves it), must see a move off it.
    #[test]
    fn an_overloaded_host_is_relieved_when_one_move_would_do(input in arb_cluster()) {
        let cfg = Config::default();
        let p = plan(&input, &cfg);
        let z = normal_quantile(1.0 - cfg.risk);
        let at_risk = |vs: &[&VmInput]| {
            let (mut mean, mut var) = (0.0, 0.0);
            for v in vs {
                let d = demand(v, &cfg, NOW);
                mean += d.mean_bytes;
                var += d.std_bytes * d.std_bytes;
            }
            mean + z * f64::sqrt(var)
        };
        // Where the plan leaves every VM, and how many moves each host has.
        let mut at: BTreeMap<&str, &str> = input.vms.iter().map(|v| (v.vm_id.as_str(), v.host_id.as_str())).collect();
        let mut budget_used: BTreeMap<&str, u32> = BTreeMap::new();
        for m in &p.moves {
            at.insert(m.vm_id.as_str(), m.to.as_str());
            *budget_used.entry(m.from.as_str()).or_default() += 1;
            *budget_used.entry(m.to.as_str()).or_default() += 1;
        }
        let has_budget = |h: &str| budget_used.get(h).copied().unwrap_or(0) < cfg.max_moves_per_host;
        let on = |h: &str| input.vms.iter().filter(|v| at[v.vm_id.as_str()] == h).collect::<Vec<_>>();
        let movable = |v: &VmInput| {
            v.labels.get(labels::PINNED).is_none_or(|x| x != "true")
                && v.last_moved_ms.is_none_or(|t| NOW - t >= cfg.hysteresis_ms)
                && v.samples[0].dirty_bytes_per_s <= cfg.max_dirty_share * cfg.link_bytes_per_s
        };
        for h in &input.hosts {
            let here = on(h.host_id.as_str());
            if h.maintenance
                || !has_budget(h.host_id.as_str())
                || at_risk(&here) <= cfg.high_watermark * h.capacity_bytes as f64
            {
                continue;
            }
            let one_move = here.iter().filter(|v| movable(v)).find_map(|v| {
                input.hosts.iter().find(|t| {
                    let there = on(t.host_id.as_str());
                    let group = v.labels.get(labels::ANTI_AFFINITY);
                    t.host_id != h.host_id
                        && !t.maintenance
                        && has_budget(t.host_id.as_str())
                        && group.is_none_or(|g| !there.iter().any(|o| o.labels.get(labels::ANTI_AFFINITY) == Some(g)))
                        && at_risk(&[there.as_slice(), &[*v]].concat())
                            <= cfg.high_watermark * t.capacity_bytes as f64
                })
                .map(|t| (v.vm_id.clone(), t.host_id.clone()))
            });
            if let Some((vm, to)) = one_move {
                prop_assert!(
                    p.moves.iter().any(|m| m.from == h.host_id),
                    "{} stays over its watermark and {vm} fits on {to}, but nothing moves off it: {:#?}",
                    h.host_id,
                    p.moves
                );
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(100))]

    /// A follower serves the leader's plan exactly: every plan survives
    /// the trip through `ReplicatedPlan` unchanged, term and leader included.
    #[test]
    fn a_replicated_plan_is_the_plan(input in arb_cluster(), term in 0u64..u64::MAX) {
        use wset_controller::decide::PlanRecord;
        use wset_controller::scheduler::{from_replicated, replicated};
        let cfg = Config { consolidate_below: 0.25, ..Config::default() };
        let p = plan(&input, &cfg);
        let record = PlanRecord {
            id: format!("plan-{term}"),
            created_ms: NOW,
            history_from_ms: NOW - cfg.lookback_ms,
            hosts: input.hosts.len() as u32,
            vms: input.vms.len() as u32,
            samples: 60 * input.vms.len() as u64,
            unreadable_vms: 1,
            seconds: 0.25,
            settings: cfg.clone(),
            plan: p,
            term,
            leader: "replica-0".into(),
        };
        let memory = input.vms.iter().map(|v| (v.vm_id.clone(), v.memory_bytes)).collect();
        let back = from_replicated(replicated(&record, &memory)).unwrap();
        prop_assert_eq!(&back.plan, &record.plan);
        prop_assert_eq!(&back.settings, &record.settings);
        prop_assert_eq!(
            (&back.id, back.created_ms, back.history_from_ms, back.hosts, back.vms, back.samples, back.unreadable_vms, back.seconds, back.term, &back.leader),
            (&record.id, record.created_ms, record.history_from_ms, record.hosts, record.vms, record.samples, record.unreadable_vms, record.seconds, record.term, &record.leader)
        );
    }
}
