//! Replicas: every controller ingests every agent and keeps its own
//! history; one of them, the leader, plans. This module holds what a
//! replica knows of leadership ([`Leadership`], published in a `watch`
//! channel), the one gate every plan passes before it is published or
//! served ([`Replica::may_publish`], [`Replica::servable`]), the terms it
//! led, and `wset.v1.ReplicaService`.
//!
//! The seam to the engine that elects is [`Replica`]'s `lead`, `renewed`,
//! `follow`, `no_quorum` and `step_down`: `etcd.rs` drives them from an
//! etcd election and lease. Another engine (a Kubernetes Lease) would drive
//! the same calls with its own term (the Lease's `leaseTransitions`) and
//! deadline (`renewTime + leaseDurationSeconds`, less the margin).
//! `follow.rs` mirrors the leader's plans into a follower's `plans`.

#![forbid(unsafe_code)]

pub mod etcd;
pub mod follow;
pub mod repair;
pub mod service;

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tokio::sync::watch;
use wset_proto::v1 as pb;

pub use service::ReplicaService;

use crate::decide::PlanRecord;

/// Terms kept in [`Replica::terms_led`].
const TERMS_KEPT: usize = 64;

/// A replica that leads.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LeaderInfo {
    pub name: String,
    /// The address its peers dial for its plans.
    pub addr: String,
    /// Its term: the etcd revision that created its election key.
    pub term: u64,
}

/// What this replica knows of leadership now.
#[derive(Clone, Debug, PartialEq)]
pub enum Leadership {
    /// No election configured: the only controller, it plans (term 0).
    Alone,
    /// This replica leads in `term` and may publish until `until` (its
    /// lease's end as etcd counts it, less the drift margin, on this
    /// replica's monotonic clock).
    Leader { term: u64, until: Instant },
    /// Another replica leads (`None`: none is known yet, an election is
    /// under way).
    Follower { leader: Option<LeaderInfo> },
    /// etcd cannot be reached, or this replica's lease lapsed: it must not
    /// publish and does not know who may.
    NoQuorum { error: String },
}

impl Leadership {
    /// The term whose plans may be served now (`None`: no plan may be).
    pub fn term(&self) -> Option<u64> {
        match self {
            Self::Alone => Some(0),
            Self::Leader { term, .. } => Some(*term),
            Self::Follower { leader } => leader.as_ref().map(|l| l.term),
            Self::NoQuorum { .. } => None,
        }
    }

    pub fn role(&self) -> pb::ReplicaRole {
        match self {
            Self::Alone => pb::ReplicaRole::Alone,
            Self::Leader { .. } => pb::ReplicaRole::Leader,
            Self::Follower { .. } => pb::ReplicaRole::Follower,
            Self::NoQuorum { .. } => pb::ReplicaRole::NoQuorum,
        }
    }
}

/// Why a plan cannot be served now: the text a client is given.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum NotServable {
    #[error(
        "no controller leads now ({error}): decisions are paused until one does; history is still served"
    )]
    NoLeader { error: String },
    #[error(
        "replica {me} follows, and no leader is elected yet: decisions resume when one is (retry)"
    )]
    Electing { me: String },
    #[error(
        "the leader ({leader} at {addr}, term {term}) has not sent replica {me} a plan of its term yet (retry, or ask the leader)"
    )]
    NoPlanOfTerm {
        me: String,
        leader: String,
        addr: String,
        term: u64,
    },
    #[error("replica {me}'s lease for term {term} is too near its end to publish")]
    LeaseEnding { me: String, term: u64 },
    #[error(
        "replica {me} follows: only the leader ({leader} at {addr}) plans; ask it to replan, or ask here without replan for its latest plan"
    )]
    NotLeader {
        me: String,
        leader: String,
        addr: String,
    },
}

impl From<NotServable> for tonic::Status {
    fn from(e: NotServable) -> Self {
        match e {
            NotServable::NotLeader { .. } => Self::failed_precondition(e.to_string()),
            _ => Self::unavailable(e.to_string()),
        }
    }
}

/// Why a peer replica could not be dialled.
#[derive(Debug, thiserror::Error)]
pub enum DialError {
    #[error("peer address {addr:?}")]
    BadAddress {
        addr: String,
        #[source]
        source: tonic::transport::Error,
    },
    #[error("peer TLS for {addr}: {error}")]
    Tls { addr: String, error: String },
    #[error("connect to the peer at {addr}")]
    Connect {
        addr: String,
        #[source]
        source: tonic::transport::Error,
    },
}

/// A channel to the peer replica at `addr` (over TLS with `tls`).
pub async fn dial(
    addr: &str,
    tls: Option<&wset_serve::tls::ClientTls>,
) -> Result<tonic::transport::Channel, DialError> {
    let scheme = if tls.is_some() { "https" } else { "http" };
    let ep = tonic::transport::Endpoint::from_shared(format!("{scheme}://{addr}"))
        .map_err(|source| DialError::BadAddress {
            addr: addr.to_owned(),
            source,
        })?
        .connect_timeout(Duration::from_secs(3))
        .http2_keep_alive_interval(Duration::from_secs(5))
        .keep_alive_timeout(Duration::from_secs(5));
    let ep = match tls {
        None => ep,
        Some(t) => {
            let host = addr.rsplit_once(':').map_or(addr, |(h, _)| h);
            let host = host.trim_start_matches('[').trim_end_matches(']');
            wset_serve::tls::client_config(t, host)
                .map_err(|e| wset_serve::error_chain(&e))
                .and_then(|c| ep.tls_config(c).map_err(|e| e.to_string()))
                .map_err(|error| DialError::Tls {
                    addr: addr.to_owned(),
                    error,
                })?
        }
    };
    ep.connect().await.map_err(|source| DialError::Connect {
        addr: addr.to_owned(),
        source,
    })
}

/// One replica's leadership state and the terms it led.
#[derive(Debug)]
pub struct Replica {
    pub name: String,
    /// Where peers dial it; set once its server is bound.
    advertise_addr: std::sync::OnceLock<String>,
    state: watch::Sender<Leadership>,
    /// The terms this replica led, oldest first.
    terms: Mutex<VecDeque<pb::TermLed>>,
    /// Every replica in the election, itself included.
    peers: Mutex<Vec<Peer>>,
    /// What history repair has done.
    repair: Mutex<RepairStats>,
}

/// A replica in the election.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Peer {
    pub name: String,
    pub addr: String,
}

/// What history repair has done since this replica started.
#[derive(Clone, Debug, Default)]
pub struct RepairStats {
    pub points: u64,
    pub passes: u64,
    pub last_ms: u64,
    /// The latest pass's first error (empty when it worked).
    pub error: String,
}

impl Replica {
    /// A replica that starts following nobody (an election is configured)
    /// or alone.
    pub fn new(name: String, elected: bool) -> Self {
        let first = if elected {
            Leadership::NoQuorum {
                error: "not connected to etcd yet".into(),
            }
        } else {
            Leadership::Alone
        };
        // Alone, it leads term 0 for its whole life.
        let terms = if elected {
            VecDeque::new()
        } else {
            VecDeque::from([pb::TermLed::default()])
        };
        Self {
            name,
            advertise_addr: std::sync::OnceLock::new(),
            state: watch::Sender::new(first),
            terms: Mutex::new(terms),
            peers: Mutex::new(Vec::new()),
            repair: Mutex::new(RepairStats::default()),
        }
    }

    /// Set where peers dial this replica (once, before the election).
    pub fn advertise(&self, addr: String) {
        let _ = self.advertise_addr.set(addr);
    }

    pub fn advertise_addr(&self) -> &str {
        self.advertise_addr.get().map_or("", String::as_str)
    }

    pub fn leadership(&self) -> Leadership {
        self.state.borrow().clone()
    }

    pub fn subscribe(&self) -> watch::Receiver<Leadership> {
        self.state.subscribe()
    }

    /// The gate before a plan made in `term` is published: this replica
    /// runs alone, or leads in `term` with its lease not near its end.
    pub fn may_publish(&self, term: u64) -> bool {
        match &*self.state.borrow() {
            Leadership::Alone => term == 0,
            Leadership::Leader { term: t, until } => *t == term && Instant::now() < *until,
            _ => false,
        }
    }

    /// The term this replica would plan in now, if it may plan.
    pub fn planning_term(&self) -> Option<u64> {
        match &*self.state.borrow() {
            Leadership::Alone => Some(0),
            Leadership::Leader { term, until } if Instant::now() < *until => Some(*term),
            _ => None,
        }
    }

    /// Whether `plan` may be served now; if not, why (for the client).
    pub fn servable(&self, plan: Option<&PlanRecord>) -> Result<(), NotServable> {
        let l = self.state.borrow().clone();
        match (&l, plan) {
            (Leadership::Alone, Some(p)) if p.term == 0 => Ok(()),
            (Leadership::Alone, _) => Err(NotServable::NoPlanOfTerm {
                me: self.name.clone(),
                leader: self.name.clone(),
                addr: self.advertise_addr().to_owned(),
                term: 0,
            }),
            (Leadership::Leader { term, until }, p) => {
                if Instant::now() >= *until {
                    Err(NotServable::LeaseEnding {
                        me: self.name.clone(),
                        term: *term,
                    })
                } else if p.is_some_and(|p| p.term == *term) {
                    Ok(())
                } else {
                    // The leader has no plan of its term yet: the caller plans.
                    Err(NotServable::NoPlanOfTerm {
                        me: self.name.clone(),
                        leader: self.name.clone(),
                        addr: self.advertise_addr().to_owned(),
                        term: *term,
                    })
                }
            }
            (Leadership::Follower { leader: Some(ld) }, p) => {
                if p.is_some_and(|p| p.term == ld.term) {
                    Ok(())
                } else {
                    Err(NotServable::NoPlanOfTerm {
                        me: self.name.clone(),
                        leader: ld.name.clone(),
                        addr: ld.addr.clone(),
                        term: ld.term,
                    })
                }
            }
            (Leadership::Follower { leader: None }, _) => Err(NotServable::Electing {
                me: self.name.clone(),
            }),
            (Leadership::NoQuorum { error }, _) => Err(NotServable::NoLeader {
                error: error.clone(),
            }),
        }
    }

    /// Why this replica may not plan now.
    pub fn why_not_planning(&self) -> NotServable {
        match self.leadership() {
            Leadership::Alone => NotServable::LeaseEnding {
                me: self.name.clone(),
                term: 0,
            },
            Leadership::Leader { term, .. } => NotServable::LeaseEnding {
                me: self.name.clone(),
                term,
            },
            Leadership::Follower { leader: Some(l) } => NotServable::NotLeader {
                me: self.name.clone(),
                leader: l.name,
                addr: l.addr,
            },
            Leadership::Follower { leader: None } => NotServable::Electing {
                me: self.name.clone(),
            },
            Leadership::NoQuorum { error } => NotServable::NoLeader { error },
        }
    }

    /// This replica won the election for `term`; its lease holds until `until`.
    pub fn lead(&self, term: u64, until: Instant) {
        self.state.send_replace(Leadership::Leader { term, until });
        let mut t = self.terms.lock().unwrap_or_else(|p| p.into_inner());
        if t.len() == TERMS_KEPT {
            t.pop_front();
        }
        t.push_back(pb::TermLed {
            term,
            ..Default::default()
        });
    }

    /// The lease was renewed: publishing may go on until `until`.
    pub fn renewed(&self, until: Instant) {
        self.state.send_if_modified(|l| match l {
            Leadership::Leader { until: u, .. } => {
                *u = until;
                true
            }
            _ => false,
        });
    }

    /// Another replica leads (or, with `None`, none is known).
    pub fn follow(&self, leader: Option<LeaderInfo>) {
        self.end_term("another replica leads");
        self.state.send_if_modified(|l| {
            let next = Leadership::Follower { leader };
            if *l == next {
                return false;
            }
            *l = next;
            true
        });
    }

    /// etcd is not usable: nobody this replica knows of may publish.
    pub fn no_quorum(&self, error: String) {
        self.end_term(&error);
        self.state.send_replace(Leadership::NoQuorum { error });
    }

    /// Stop leading (shutdown, a lost key) before the lease is given up.
    pub fn step_down(&self, why: &str) {
        self.end_term(why);
        self.state.send_if_modified(|l| {
            if matches!(l, Leadership::Leader { .. }) {
                *l = Leadership::Follower { leader: None };
                true
            } else {
                false
            }
        });
    }

    fn end_term(&self, why: &str) {
        if !matches!(*self.state.borrow(), Leadership::Leader { .. }) {
            return;
        }
        let mut t = self.terms.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(last) = t.back_mut()
            && last.ended_ms == 0
        {
            last.ended_ms = crate::now_ms();
            last.end_reason = why.to_owned();
        }
    }

    /// A plan of `term` was published at `now_ms`.
    pub fn published(&self, term: u64, now_ms: u64) {
        let mut t = self.terms.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(last) = t.back_mut()
            && last.term == term
        {
            if last.plans == 0 {
                last.first_publish_ms = now_ms;
            }
            last.last_publish_ms = now_ms;
            last.plans += 1;
        }
    }

    pub fn terms_led(&self) -> Vec<pb::TermLed> {
        let t = self.terms.lock().unwrap_or_else(|p| p.into_inner());
        t.iter().cloned().collect()
    }

    /// The replicas in the election now (from etcd), itself included.
    pub fn set_peers(&self, mut peers: Vec<Peer>) {
        peers.sort();
        peers.dedup();
        *self.peers.lock().unwrap_or_else(|p| p.into_inner()) = peers;
    }

    pub fn peers(&self) -> Vec<Peer> {
        self.peers.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Note a repair pass: points copied, and its first error.
    pub fn repaired(&self, points: u64, error: Option<String>) {
        let mut r = self.repair.lock().unwrap_or_else(|p| p.into_inner());
        r.points += points;
        r.passes += 1;
        r.last_ms = crate::now_ms();
        r.error = error.unwrap_or_default();
    }

    pub fn repair_stats(&self) -> RepairStats {
        self.repair
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// While leading: how long publishing may go on without a renewal.
    pub fn lease_remaining(&self) -> Option<Duration> {
        match &*self.state.borrow() {
            Leadership::Leader { until, .. } => {
                Some(until.saturating_duration_since(Instant::now()))
            }
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_addr(r: Replica, addr: &str) -> Replica {
        r.advertise(addr.into());
        r
    }

    fn plan(term: u64) -> PlanRecord {
        crate::decide::PlanRecord::empty_for_tests(term)
    }

    #[test]
    fn alone_serves_term_zero_only() {
        let r = with_addr(Replica::new("a".into(), false), "a:1");
        assert!(r.may_publish(0));
        assert!(!r.may_publish(1));
        assert!(r.servable(Some(&plan(0))).is_ok());
        assert!(matches!(
            r.servable(None),
            Err(NotServable::NoPlanOfTerm { term: 0, .. })
        ));
        assert_eq!(r.planning_term(), Some(0));
    }

    #[test]
    fn a_leader_publishes_its_own_term_until_its_lease_nears_its_end() {
        let r = with_addr(Replica::new("a".into(), true), "a:1");
        assert!(!r.may_publish(0), "no plan before an election");
        assert!(matches!(
            r.servable(Some(&plan(0))),
            Err(NotServable::NoLeader { .. })
        ));
        r.lead(7, Instant::now() + Duration::from_secs(60));
        assert!(r.may_publish(7));
        assert!(!r.may_publish(6));
        assert!(r.servable(Some(&plan(7))).is_ok());
        assert!(matches!(
            r.servable(Some(&plan(6))),
            Err(NotServable::NoPlanOfTerm { term: 7, .. })
        ));
        r.published(7, 100);
        r.published(7, 200);
        r.renewed(Instant::now() - Duration::from_millis(1));
        assert!(!r.may_publish(7), "lease past its margin");
        assert!(r.planning_term().is_none());
        assert!(matches!(
            r.servable(Some(&plan(7))),
            Err(NotServable::LeaseEnding { .. })
        ));
        r.no_quorum("etcd gone".into());
        let t = r.terms_led();
        assert_eq!(t.len(), 1);
        assert_eq!(
            (
                t[0].term,
                t[0].first_publish_ms,
                t[0].last_publish_ms,
                t[0].plans
            ),
            (7, 100, 200, 2)
        );
        assert!(t[0].ended_ms > 0);
        assert_eq!(t[0].end_reason, "etcd gone");
    }

    #[test]
    fn a_follower_serves_only_the_current_leaders_term() {
        let r = with_addr(Replica::new("b".into(), true), "b:1");
        r.follow(None);
        assert!(matches!(
            r.servable(Some(&plan(3))),
            Err(NotServable::Electing { .. })
        ));
        r.follow(Some(LeaderInfo {
            name: "a".into(),
            addr: "a:1".into(),
            term: 5,
        }));
        assert!(!r.may_publish(5), "a follower never publishes");
        assert!(r.servable(Some(&plan(5))).is_ok());
        let e = r.servable(Some(&plan(3))).unwrap_err().to_string();
        assert!(e.contains("a at a:1, term 5"), "{e}");
        assert!(r.terms_led().is_empty());
    }
}
