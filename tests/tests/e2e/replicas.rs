//! Controller replicas on a real three-member etcd cluster (Debian's
//! etcd-server, on loopback), three real `wset-controller` processes and
//! two real agents with KVM guests, shared by the tests here: a leader
//! killed with SIGKILL is replaced within its lease's TTL and a plan
//! interval by one of a higher term, and comes back with every point it
//! called durable; a leader cut off from etcd stops publishing before its
//! lease ends, and no two replicas ever publish at once; with etcd gone,
//! every replica keeps ingesting and serving history while nobody
//! publishes, and health and metrics say so; a replica whose data
//! directory is wiped gets its peers' history back, point for point.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Mutex;
use std::time::Duration;

use wset_guest::script::{Script, Touch};
use wset_proto::v1 as pb;
use wset_tests::harness::{
    Agent, AgentOpts, Controller, Etcd, Guest, Shared, TempDir, free_loopback_addr, http_get,
    metric, wait_for,
};

/// The leader's lease in these tests, and the plan interval.
const TTL: Duration = Duration::from_secs(3);
const PLAN_INTERVAL: Duration = Duration::from_secs(1);
/// What a loaded machine may add to a hand-over (scheduling, the first
/// plan's own time).
const SLACK: Duration = Duration::from_secs(2);
const VMS: [&str; 2] = ["replica-vm-a", "replica-vm-b"];

/// Two agents (two hosts), each tracking one steady KVM guest.
struct Hosts {
    addrs: Vec<String>,
    _agents: Vec<Agent>,
    _guests: Mutex<Vec<Guest>>,
}

static HOSTS: Shared<Hosts> = Shared::new(|| {
    let mut addrs = Vec::new();
    let mut agents = Vec::new();
    let mut guests = Vec::new();
    for (i, vm) in VMS.iter().enumerate() {
        let addr = free_loopback_addr();
        let agent = Agent::start(AgentOpts {
            interval_ms: 200,
            windows_ms: vec![1000, 3000],
            access: "exhaustive".into(),
            extra: vec!["--host-name".into(), format!("replica-host-{i}")],
            grpc_addr: Some(addr.clone()),
            ..Default::default()
        });
        let script = Script::steady(vec![Touch::read(16, 100)], 3_600_000);
        guests.push(Guest::builder(vm, script).start(&agent));
        addrs.push(addr);
        agents.push(agent);
    }
    Hosts {
        addrs,
        _agents: agents,
        _guests: Mutex::new(guests),
    }
});

/// Which etcd members each replica is given.
#[derive(Clone, Copy)]
enum Reach {
    /// Every member.
    All,
    /// Replica i only member i (so pausing member i cuts replica i off).
    Own,
}

struct Tier {
    etcd: Etcd,
    dirs: Vec<TempDir>,
    replicas: Vec<Option<Controller>>,
    reach: Reach,
    extra: Vec<String>,
}

fn replica_args(tier_etcd: &Etcd, reach: Reach, i: usize) -> Vec<String> {
    let endpoints = match reach {
        Reach::All => tier_etcd.endpoints(),
        Reach::Own => tier_etcd.endpoint(i).to_owned(),
    };
    [
        "--etcd-endpoints",
        &endpoints,
        "--replica-name",
        &format!("r{i}"),
        "--lease-ttl",
        &format!("{}s", TTL.as_secs()),
        "--plan-interval",
        &format!("{}ms", PLAN_INTERVAL.as_millis()),
    ]
    .map(String::from)
    .to_vec()
}

impl Tier {
    fn start(reach: Reach) -> Self {
        Self::start_with(reach, &[])
    }

    fn start_with(reach: Reach, extra: &[&str]) -> Self {
        let hosts = HOSTS.get();
        let etcd = Etcd::start(3);
        let dirs: Vec<TempDir> = (0..3).map(|_| TempDir::new("replica")).collect();
        let mut t = Self {
            etcd,
            dirs,
            replicas: Vec::new(),
            reach,
            extra: extra.iter().map(|s| s.to_string()).collect(),
        };
        for i in 0..3 {
            let c = t.spawn(i, &hosts.addrs);
            t.replicas.push(Some(c));
        }
        t
    }

    fn spawn(&self, i: usize, agents: &[String]) -> Controller {
        let agents: Vec<&str> = agents.iter().map(String::as_str).collect();
        let mut extra = replica_args(&self.etcd, self.reach, i);
        extra.extend(self.extra.iter().cloned());
        let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
        Controller::start(&self.dirs[i].0, &agents, &extra)
    }

    fn restart(&mut self, i: usize) {
        let c = self.spawn(i, &HOSTS.get().addrs);
        self.replicas[i] = Some(c);
    }

    fn live(&self) -> impl Iterator<Item = (usize, &Controller)> {
        self.replicas
            .iter()
            .enumerate()
            .filter_map(|(i, c)| Some((i, c.as_ref()?)))
    }

    fn statuses(&self) -> Vec<(usize, pb::GetReplicaResponse)> {
        self.live()
            .filter_map(|(i, c)| Some((i, c.replica().ok()?)))
            .collect()
    }

    /// One live replica leads in some term above `above`, and every live
    /// replica serves a plan of that term: (the leader, the term).
    fn settled(&self, above: u64) -> Option<(usize, u64)> {
        let s = self.statuses();
        if s.len() != self.live().count() {
            return None;
        }
        let leaders: Vec<&(usize, pb::GetReplicaResponse)> = s
            .iter()
            .filter(|(_, r)| r.role == pb::ReplicaRole::Leader as i32)
            .collect();
        let [(l, lead)] = leaders.as_slice() else {
            return None;
        };
        let term = lead.term;
        (term > above
            && s.iter()
                .all(|(_, r)| r.term == term && r.plan_term == term && r.leader_name == lead.name))
        .then_some((*l, term))
    }

    fn wait_settled(&self, above: u64, what: &str) -> (usize, u64) {
        wait_for(Duration::from_secs(120), what, || self.settled(above))
    }
}

fn points(c: &Controller, vm: &str) -> Vec<pb::VmHistoryPoint> {
    c.vm_history(pb::GetVmHistoryRequest {
        vm_id: vm.into(),
        page_size: 10_000,
        ..Default::default()
    })
    .map(|h| h.points)
    .unwrap_or_default()
}

fn history(c: &Controller, vm: &str) -> Vec<u64> {
    points(c, vm).iter().map(|p| p.timestamp_ms).collect()
}

/// Every published term of every replica, ordered by when it began to
/// publish: no two overlap, and terms grow.
fn assert_never_two_publish(statuses: &[(usize, pb::GetReplicaResponse)]) -> usize {
    let mut led: Vec<(u64, u64, u64, String)> = statuses
        .iter()
        .flat_map(|(_, s)| {
            s.terms_led.iter().filter(|t| t.plans > 0).map(|t| {
                (
                    t.first_publish_ms,
                    t.last_publish_ms,
                    t.term,
                    s.name.clone(),
                )
            })
        })
        .collect();
    led.sort();
    for w in led.windows(2) {
        let ((_, a_last, a_term, a), (b_first, _, b_term, b)) = (&w[0], &w[1]);
        assert!(
            a_last < b_first && a_term < b_term,
            "{a} published term {a_term} until {a_last} ms, while {b} published term {b_term} from {b_first} ms: {led:#?}"
        );
    }
    led.len()
}

#[test]
fn a_killed_leader_is_replaced_by_a_higher_term_and_loses_nothing_durable() {
    let mut tier = Tier::start(Reach::All);
    let (l, term) = tier.wait_settled(0, "a leader, and every replica serving its plan");
    let leader = tier.replicas[l].as_ref().expect("live");
    // Both VMs' history on the leader, and what it called durable.
    wait_for(
        Duration::from_secs(60),
        "history of both VMs on the leader",
        || {
            VMS.iter()
                .all(|vm| history(leader, vm).len() >= 10)
                .then_some(())
        },
    );
    let durable: BTreeMap<&str, BTreeSet<u64>> = wait_for(
        Duration::from_secs(30),
        "durable marks from both agents",
        || {
            let agents = leader.agents();
            let through: Vec<u64> = agents.iter().map(|a| a.durable_through_ms).collect();
            (agents.len() == 2 && through.iter().all(|&d| d > 0)).then_some(())?;
            let upto = through.into_iter().min()?;
            Some(
                VMS.iter()
                    .map(|vm| {
                        (
                            *vm,
                            history(leader, vm)
                                .into_iter()
                                .filter(|&t| t <= upto)
                                .collect(),
                        )
                    })
                    .collect(),
            )
        },
    );
    let killed_at = wset_tests::now_ms();
    tier.replicas[l].as_mut().expect("live").kill9();
    tier.replicas[l] = None;

    let (m, term2) = tier.wait_settled(
        term,
        "another replica leading, every survivor serving its plan",
    );
    assert_ne!(m, l);
    assert!(term2 > term, "term {term2} after term {term}");
    let s = tier.replicas[m]
        .as_ref()
        .expect("live")
        .replica()
        .expect("GetReplica");
    let first = s
        .terms_led
        .iter()
        .find(|t| t.term == term2)
        .expect("the new term")
        .first_publish_ms;
    let handover = first.saturating_sub(killed_at);
    println!(
        "SIGKILL of the leader r{l} (term {term}): r{m} published term {term2} {handover} ms later (TTL {} ms, plan interval {} ms)",
        TTL.as_millis(),
        PLAN_INTERVAL.as_millis()
    );
    assert!(
        handover <= (TTL + PLAN_INTERVAL + SLACK).as_millis() as u64,
        "hand-over took {handover} ms"
    );

    // The old leader comes back on its data directory: it follows, serves
    // the new leader's plan and every point it had called durable.
    tier.restart(l);
    let (m2, term3) = tier.wait_settled(term, "the old leader back, following");
    assert_eq!((m2, term3), (m, term2), "leadership stays where it went");
    let back = tier.replicas[l].as_ref().expect("live");
    for (vm, points) in &durable {
        let now: BTreeSet<u64> = history(back, vm).into_iter().collect();
        let lost: Vec<&u64> = points.difference(&now).collect();
        assert!(
            lost.is_empty(),
            "{vm}: durable points lost with the leader's SIGKILL: {lost:?}"
        );
        println!(
            "{vm}: {} durable points, all served after the restart",
            points.len()
        );
    }
    assert_never_two_publish(&tier.statuses());
}

#[test]
fn a_leader_cut_off_from_etcd_stops_publishing_before_another_leads() {
    let mut tier = Tier::start(Reach::Own);
    let (l, term) = tier.wait_settled(0, "a leader, and every replica serving its plan");
    let cut_at = wset_tests::now_ms();
    // Replica l reaches etcd only through member l: pausing it cuts the
    // leader off, while the other two members keep a quorum.
    tier.etcd.pause(l);
    let new = wait_for(
        Duration::from_secs(120),
        "another replica leading and the cut-off one without a leader",
        || {
            let s = tier.statuses();
            let old = s.iter().find(|(i, _)| *i == l)?;
            let lead = s
                .iter()
                .find(|(i, r)| *i != l && r.role == pb::ReplicaRole::Leader as i32)?;
            (old.1.role == pb::ReplicaRole::NoQuorum as i32
                && lead.1.term > term
                && lead.1.plan_term == lead.1.term)
                .then_some((lead.0, lead.1.term))
        },
    );
    let s = tier.statuses();
    let old = &s
        .iter()
        .find(|(i, _)| *i == l)
        .expect("the cut-off replica")
        .1;
    let ended = old
        .terms_led
        .iter()
        .find(|t| t.term == term)
        .expect("its term");
    let next = s
        .iter()
        .find(|(i, _)| *i == new.0)
        .expect("the new leader")
        .1
        .terms_led
        .iter()
        .find(|t| t.term == new.1)
        .expect("its term")
        .clone();
    println!(
        "r{l} cut off at {cut_at}: its last plan at {}, stepped down at {} ({}); r{} led term {} from {}",
        ended.last_publish_ms,
        ended.ended_ms,
        ended.end_reason,
        new.0,
        new.1,
        next.first_publish_ms
    );
    assert!(
        ended.ended_ms > 0 && ended.ended_ms < next.first_publish_ms,
        "{ended:?} vs {next:?}"
    );
    assert!(
        old.role == pb::ReplicaRole::NoQuorum as i32 && !old.etcd_error.is_empty(),
        "the cut-off replica says why: {old:#?}"
    );
    let terms = assert_never_two_publish(&s);
    assert!(terms >= 2, "{s:#?}");
    // Reconnected, it follows the new leader and serves its plan.
    tier.etcd.resume(l);
    let (m, t) = tier.wait_settled(term, "the cut-off replica back, following");
    assert_eq!((m, t), new);
    assert_never_two_publish(&tier.statuses());
}

#[test]
fn without_etcd_nobody_publishes_and_history_goes_on() {
    let mut tier = Tier::start(Reach::All);
    let (_, term) = tier.wait_settled(0, "a leader, and every replica serving its plan");
    for i in 0..tier.etcd.len() {
        tier.etcd.pause(i);
    }
    let paused_at = wset_tests::now_ms();
    wait_for(
        Duration::from_secs(60),
        "every replica without a leader",
        || {
            let s = tier.statuses();
            (s.len() == 3
                && s.iter()
                    .all(|(_, r)| r.role == pb::ReplicaRole::NoQuorum as i32))
            .then_some(())
        },
    );
    let quiet_at = wset_tests::now_ms();
    for (i, c) in tier.live() {
        // Decisions are refused, saying why; the scheduler service is not
        // serving; history is.
        let e = c.migrations().expect_err("no plan without a leader");
        assert_eq!(e.code(), tonic::Code::Unavailable, "r{i}: {e}");
        assert!(e.message().contains("no controller leads"), "r{i}: {e}");
        assert_eq!(
            c.health("wset.v1.SchedulerService").expect("health"),
            2,
            "r{i}: SchedulerService NOT_SERVING"
        );
        assert_eq!(c.health("wset.v1.ControllerService").expect("health"), 1);
        let (_, m) = http_get(&c.metrics_addr(), "/metrics");
        assert_eq!(metric(&m, "wset_controller_leader"), Some(0.0), "r{i}");
        assert!(
            m.contains("wset_controller_replica_role{role=\"no_quorum\"} 1"),
            "r{i}"
        );
    }
    // Ingest goes on: every replica stores new points after the loss.
    for (i, c) in tier.live() {
        wait_for(
            Duration::from_secs(60),
            &format!("r{i} storing points without etcd"),
            || {
                VMS.iter()
                    .all(|vm| history(c, vm).last().is_some_and(|&t| t > quiet_at))
                    .then_some(())
            },
        );
    }
    // Nobody published once every replica knew it had no leader.
    let s = tier.statuses();
    for (i, r) in &s {
        for t in &r.terms_led {
            assert!(
                t.last_publish_ms <= quiet_at,
                "r{i} published at {} after {quiet_at}: {t:?}",
                t.last_publish_ms
            );
        }
    }
    println!(
        "etcd paused at {paused_at}: every replica without a leader by {quiet_at}, history still stored"
    );
    for i in 0..tier.etcd.len() {
        tier.etcd.resume(i);
    }
    let (_, t2) = tier.wait_settled(term, "a leader again once etcd is back");
    assert!(t2 > term);
    assert_never_two_publish(&tier.statuses());
}

#[test]
fn a_wiped_replica_gets_its_history_back_from_a_peer_point_for_point() {
    let mut tier = Tier::start_with(Reach::All, &["--repair-interval", "1s"]);
    let (l, _) = tier.wait_settled(0, "a leader, and every replica serving its plan");
    for (i, c) in tier.live() {
        wait_for(Duration::from_secs(60), &format!("history on r{i}"), || {
            VMS.iter()
                .all(|vm| history(c, vm).len() >= 20)
                .then_some(())
        });
    }
    // A follower loses its disk: stopped, its data directory emptied,
    // started again.
    let f = (l + 1) % 3;
    tier.replicas[f].as_mut().expect("live").terminate();
    tier.replicas[f] = None;
    std::fs::remove_dir_all(&tier.dirs[f].0).expect("wipe the data directory");
    std::fs::create_dir_all(&tier.dirs[f].0).expect("recreate it");
    let restarted_at = wset_tests::now_ms();
    tier.restart(f);
    let back = tier.replicas[f].as_ref().expect("live");
    // A pass counts what arrived until its start less the samples still
    // arriving (2 x 300 ms + 1 s): wait for a pass that ended after the
    // restart plus that, then for the one after it, which began later.
    let status = wait_for(
        Duration::from_secs(120),
        "a repair pass that copied points, after the restart",
        || {
            let s = back.replica().ok()?;
            (s.repaired_points > 0
                && s.last_repair_ms > restarted_at + 1600
                && s.repair_error.is_empty())
            .then_some(s)
        },
    );
    wait_for(Duration::from_secs(60), "the next repair pass", || {
        let s = back.replica().ok()?;
        (s.last_repair_ms > status.last_repair_ms).then_some(())
    });
    for vm in VMS {
        let mine = points(back, vm);
        let sources: BTreeSet<&str> = mine
            .iter()
            .map(|p| p.repaired_from.as_str())
            .filter(|s| !s.is_empty())
            .collect();
        let [from] = sources.iter().copied().collect::<Vec<_>>()[..] else {
            panic!("{vm}: repaired from {sources:?}, not one peer");
        };
        let peer = tier
            .live()
            .find(|(i, _)| format!("r{i}") == from)
            .map(|(_, c)| c)
            .unwrap_or_else(|| panic!("{vm}: repaired from {from}, no such replica"));
        // Before the restart, every point is the peer's, field for field.
        let theirs: Vec<pb::VmHistoryPoint> = points(peer, vm)
            .into_iter()
            .filter(|p| p.timestamp_ms < restarted_at)
            .collect();
        let copied: Vec<pb::VmHistoryPoint> = mine
            .iter()
            .filter(|p| p.timestamp_ms < restarted_at)
            .map(|p| {
                assert_eq!(
                    p.repaired_from, from,
                    "{vm}: a point before the restart not from {from}: {p:?}"
                );
                pb::VmHistoryPoint {
                    repaired_from: String::new(),
                    ..p.clone()
                }
            })
            .collect();
        assert!(
            theirs.len() >= 20,
            "{vm}: {} points on {from}",
            theirs.len()
        );
        if copied.len() != theirs.len() {
            let a: Vec<u64> = copied.iter().map(|p| p.timestamp_ms).collect();
            let b: Vec<u64> = theirs.iter().map(|p| p.timestamp_ms).collect();
            eprintln!("restarted at {restarted_at}\nhere:  {a:?}\nthere: {b:?}");
        }
        assert_eq!(
            copied.len(),
            theirs.len(),
            "{vm}: points before the restart, here and on {from}"
        );
        assert!(
            copied == theirs,
            "{vm}: the repaired history differs from {from}'s"
        );
        // After it, this replica's own ingest.
        assert!(
            mine.iter()
                .any(|p| p.timestamp_ms > restarted_at && p.repaired_from.is_empty()),
            "{vm}: no point of its own after the restart"
        );
        println!(
            "{vm}: {} points repaired from {from}, equal to its history before the restart",
            copied.len()
        );
    }
    let (_, m) = http_get(&back.metrics_addr(), "/metrics");
    assert!(
        metric(&m, "wset_controller_repaired_points_total").is_some_and(|n| n > 0.0),
        "{m}"
    );
}
