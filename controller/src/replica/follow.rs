//! A follower mirrors the leader's plans: while it follows a known
//! leader, it holds `WatchPlans` open to the leader's advertised address
//! and puts every plan of the leader's term into its own `plans`, so its
//! `SchedulerService` answers as the leader would. A plan of any other term
//! is refused; a new leader means a new stream.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tracing::{debug, info, warn};
use wset_proto::v1 as pb;
use wset_proto::v1::replica_service_client::ReplicaServiceClient;

use super::{LeaderInfo, Leadership, Replica};
use crate::decide::Plans;

/// Largest plan a follower takes (10,000 VMs make about 5 MB).
const MAX_PLAN_BYTES: usize = 256 << 20;

/// Why mirroring a leader stopped.
#[derive(Debug, thiserror::Error)]
pub enum FollowError {
    #[error(transparent)]
    Dial(super::DialError),
    #[error("the leader at {addr} ended WatchPlans: {status}")]
    Stream { addr: String, status: tonic::Status },
    #[error("the leader at {addr} sent a plan this replica cannot read: {error}")]
    BadPlan { addr: String, error: String },
    #[error("the leader at {addr} sent a plan of term {got}, not its term {want}")]
    WrongTerm { addr: String, got: u64, want: u64 },
}

/// Mirror the leader's plans until `stop` changes.
pub async fn run(
    replica: Arc<Replica>,
    plans: Arc<Plans>,
    tls: Option<wset_serve::tls::ClientTls>,
    mut stop: watch::Receiver<bool>,
) {
    let mut leadership = replica.subscribe();
    let mut backoff = BACKOFF_MIN;
    let mut last: Option<LeaderInfo> = None;
    loop {
        let leader = match &*leadership.borrow_and_update() {
            Leadership::Follower { leader: Some(l) } if l.name != replica.name => Some(l.clone()),
            _ => None,
        };
        if leader != last {
            // A new leader may not know yet that it leads: ask it again soon.
            backoff = BACKOFF_MIN;
            last.clone_from(&leader);
        }
        let Some(leader) = leader else {
            tokio::select! {
                _ = stop.changed() => return,
                r = leadership.changed() => if r.is_err() { return },
            }
            continue;
        };
        tokio::select! {
            _ = stop.changed() => return,
            r = leadership.changed() => if r.is_err() { return },
            e = mirror(&replica, &leader, &plans, tls.as_ref()) => {
                debug!(error = %wset_serve::error_chain(&e), leader = %leader.name, "mirroring the leader's plans stopped; retrying");
                if backoff >= BACKOFF_WARN {
                    warn!(error = %wset_serve::error_chain(&e), leader = %leader.name, "cannot mirror the leader's plans; retrying");
                }
                tokio::select! {
                    _ = stop.changed() => return,
                    r = leadership.changed() => if r.is_err() { return },
                    () = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(BACKOFF_MAX);
            }
        }
    }
}

/// Waits between attempts to mirror one leader.
const BACKOFF_MIN: Duration = Duration::from_millis(50);
const BACKOFF_MAX: Duration = Duration::from_secs(2);
/// Failures are logged as warnings once the wait reaches this.
const BACKOFF_WARN: Duration = Duration::from_millis(800);

async fn mirror(
    replica: &Replica,
    leader: &LeaderInfo,
    plans: &Plans,
    tls: Option<&wset_serve::tls::ClientTls>,
) -> FollowError {
    let addr = leader.addr.clone();
    let channel = match super::dial(&addr, tls).await {
        Ok(c) => c,
        Err(source) => return FollowError::Dial(source),
    };
    let mut client = ReplicaServiceClient::new(channel).max_decoding_message_size(MAX_PLAN_BYTES);
    let mut stream = match client.watch_plans(pb::WatchPlansRequest {}).await {
        Ok(s) => s.into_inner(),
        Err(status) => return FollowError::Stream { addr, status },
    };
    info!(leader = %leader.name, %addr, term = leader.term, "mirroring the leader's plans");
    loop {
        let msg = match stream.message().await {
            Ok(Some(m)) => m,
            Ok(None) => {
                let status = tonic::Status::unavailable("stream ended");
                return FollowError::Stream { addr, status };
            }
            Err(status) => return FollowError::Stream { addr, status },
        };
        let Some(plan) = msg.plan else {
            let error = "a WatchPlans message without a plan".to_owned();
            return FollowError::BadPlan { addr, error };
        };
        let p = match crate::scheduler::from_replicated(plan) {
            Ok(p) => p,
            Err(error) => return FollowError::BadPlan { addr, error },
        };
        if p.term != leader.term {
            return FollowError::WrongTerm {
                addr,
                got: p.term,
                want: leader.term,
            };
        }
        // Stored only while this replica still follows that leader's term:
        // a plan read just before it changed must not replace a newer one.
        let p = Arc::new(p);
        let stored = plans.send_if_modified(|slot| {
            let follows = matches!(
                replica.leadership(),
                Leadership::Follower { leader: Some(l) } if l.term == p.term
            );
            if follows {
                *slot = Some(p.clone());
            }
            follows
        });
        if !stored {
            let status = tonic::Status::aborted("this replica no longer follows that term");
            return FollowError::Stream { addr, status };
        }
        debug!(plan = %p.id, term = p.term, "mirrored a plan");
    }
}
