//! The election on etcd: a lease of `--lease-ttl`, kept alive every third
//! of it; a campaign on `<prefix>election` with the lease (etcd's election
//! API: the lowest live key leads); the leader observed, so followers know
//! whom to mirror. The term is the revision that created the leader's
//! key, so terms only grow.
//!
//! **Stepping down.** etcd ends a lease `TTL` after it *receives* the last
//! keep-alive, which is after this replica *sent* it. So this replica may
//! publish until `sent + TTL − margin` on its own monotonic clock, where
//! `margin` ([`drift_margin`]) covers its clock running up to a fifth fast
//! against etcd's. When no renewal lands in time, the gate in
//! [`Replica::may_publish`] closes at that instant by itself, and this
//! task marks the replica `NoQuorum` and starts again: two replicas never
//! publish in overlapping terms, because a new leader is only elected once
//! etcd ended the old lease.
//!
//! On a clean stop the leader stops publishing, then revokes its lease, so
//! the next replica leads at once rather than after a TTL.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use etcd_client::{Client, ConnectOptions, LeaseKeepAliveStream, LeaseKeeper};
use tokio::sync::watch;
use tracing::{info, warn};

use super::{LeaderInfo, Replica};

/// How the replica reaches etcd.
#[derive(Clone, Debug)]
pub struct EtcdConfig {
    pub endpoints: Vec<String>,
    /// Key prefix of the election (ends with '/').
    pub prefix: String,
    /// The lease's TTL (whole seconds, at least 2 s).
    pub lease_ttl: Duration,
    pub tls: Option<wset_serve::tls::ClientTls>,
}

impl EtcdConfig {
    pub fn election(&self) -> String {
        format!("{}election", self.prefix)
    }
}

/// The share of the TTL this replica gives up to clock drift: a fifth.
pub fn drift_margin(ttl: Duration) -> Duration {
    ttl / 5
}

/// Why a session with etcd ended.
#[derive(Debug, thiserror::Error)]
pub enum EtcdError {
    #[error("etcd TLS configuration")]
    Tls(#[from] wset_serve::tls::TlsError),
    #[error("etcd at {endpoints}: {what}")]
    Call {
        endpoints: String,
        what: &'static str,
        #[source]
        source: etcd_client::Error,
    },
    #[error("etcd at {endpoints}: {what} took longer than {timeout:?}")]
    Timeout {
        endpoints: String,
        what: &'static str,
        timeout: Duration,
    },
    #[error("etcd ended the lease (keep-alive answered TTL 0)")]
    LeaseEnded,
    #[error(
        "no lease renewal landed in time: stopped publishing {0:?} before etcd could end the lease"
    )]
    RenewalLate(Duration),
    #[error("etcd ended the {0} stream")]
    StreamEnded(&'static str),
    #[error("this replica's election key is gone (another replica leads in term {0})")]
    LostKey(u64),
}

/// A task aborted when its owner goes (the session's observer).
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The value a replica campaigns with.
#[derive(serde::Serialize, serde::Deserialize)]
struct Candidate {
    name: String,
    addr: String,
}

/// Run elections until `stop` changes; a broken session is retried with
/// backoff (500 ms doubling to 5 s), the replica `NoQuorum` meanwhile.
pub async fn run(cfg: EtcdConfig, replica: Arc<Replica>, mut stop: watch::Receiver<bool>) {
    let mut backoff = Duration::from_millis(500);
    loop {
        let started = Instant::now();
        let mut session_stop = stop.clone();
        let s = session(&cfg, &replica, &mut session_stop);
        tokio::pin!(s);
        let result = tokio::select! {
            r = &mut s => r,
            _ = stop.changed() => {
                // A leading session sees the stop too, steps down and
                // revokes its lease; a session still connecting is cut short.
                let _ = tokio::time::timeout(Duration::from_secs(3), &mut s).await;
                replica.step_down("stopped");
                return;
            }
        };
        match result {
            Ok(()) => return,
            Err(e) => {
                let error = wset_serve::error_chain(&e);
                warn!(error = %error, "election session ended; retrying");
                replica.no_quorum(error);
            }
        }
        if started.elapsed() > Duration::from_secs(30) {
            backoff = Duration::from_millis(500);
        }
        tokio::select! {
            _ = stop.changed() => return,
            () = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

/// How long one unary etcd call may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(5);

async fn call<T>(
    cfg: &EtcdConfig,
    what: &'static str,
    f: impl Future<Output = Result<T, etcd_client::Error>>,
) -> Result<T, EtcdError> {
    let endpoints = || cfg.endpoints.join(",");
    match tokio::time::timeout(CALL_TIMEOUT, f).await {
        Ok(Ok(t)) => Ok(t),
        Ok(Err(source)) => Err(EtcdError::Call {
            endpoints: endpoints(),
            what,
            source,
        }),
        Err(_) => Err(EtcdError::Timeout {
            endpoints: endpoints(),
            what,
            timeout: CALL_TIMEOUT,
        }),
    }
}

async fn connect(cfg: &EtcdConfig) -> Result<Client, EtcdError> {
    let mut opts = ConnectOptions::new()
        .with_connect_timeout(Duration::from_secs(3))
        .with_keep_alive(Duration::from_secs(2), Duration::from_secs(2))
        .with_keep_alive_while_idle(true)
        // A member cut off from its cluster refuses instead of answering
        // from a stale view.
        .with_require_leader(true);
    // One TLS configuration serves every endpoint: the members'
    // certificates must all carry one name (--etcd-tls-server-name, else
    // the first endpoint's host), e.g. a wildcard.
    if let Some(t) = &cfg.tls {
        let host = cfg
            .endpoints
            .first()
            .map(|e| {
                let e = e.trim_start_matches("https://");
                e.rsplit_once(':').map_or(e, |(h, _)| h).to_owned()
            })
            .unwrap_or_default();
        opts = opts.with_tls(wset_serve::tls::client_config(t, &host)?);
    }
    call(cfg, "connect", Client::connect(&cfg.endpoints, Some(opts))).await
}

/// One session: a lease, a campaign, the leader observed, until an error
/// or `stop`.
async fn session(
    cfg: &EtcdConfig,
    replica: &Arc<Replica>,
    stop: &mut watch::Receiver<bool>,
) -> Result<(), EtcdError> {
    let client = connect(cfg).await?;
    let ttl = cfg.lease_ttl;
    let margin = drift_margin(ttl);
    let granted_at = Instant::now();
    let lease = call(
        cfg,
        "grant a lease",
        client.clone().lease_grant(ttl.as_secs() as i64, None),
    )
    .await?
    .id();
    let result = leased(
        cfg,
        replica,
        stop,
        &client,
        lease,
        granted_at + ttl - margin,
    )
    .await;
    // Stop publishing first, then give the lease up: a clean stop hands
    // over at once, and a broken session's lease ends in etcd by itself.
    match &result {
        Ok(()) => replica.step_down("stopped"),
        Err(e) => replica.no_quorum(wset_serve::error_chain(e)),
    }
    let _ = tokio::time::timeout(Duration::from_secs(2), client.clone().lease_revoke(lease)).await;
    result
}

async fn leased(
    cfg: &EtcdConfig,
    replica: &Arc<Replica>,
    stop: &mut watch::Receiver<bool>,
    client: &Client,
    lease: i64,
    mut until: Instant,
) -> Result<(), EtcdError> {
    let ttl = cfg.lease_ttl;
    let margin = drift_margin(ttl);
    let election = cfg.election();
    let (mut keeper, mut renewals): (LeaseKeeper, LeaseKeepAliveStream) = call(
        cfg,
        "keep the lease alive",
        client.clone().lease_keep_alive(lease),
    )
    .await?;
    // Observing blocks until some replica leads, so it runs beside the
    // campaign and hands each leader over a channel.
    let (observed_tx, mut observed) = tokio::sync::mpsc::channel(4);
    let observer = {
        let mut c = client.clone();
        let election = election.clone();
        AbortOnDrop(tokio::spawn(async move {
            let mut stream = match c.observe(election).await {
                Ok(s) => s,
                Err(e) => {
                    let _ = observed_tx.send(Err(e)).await;
                    return;
                }
            };
            loop {
                let m = stream.message().await.transpose();
                let end = !matches!(m, Some(Ok(_)));
                let sent = observed_tx.send(m.unwrap_or_else(|| {
                    Err(etcd_client::Error::WatchError(
                        "observe stream ended".into(),
                    ))
                }));
                if sent.await.is_err() || end {
                    return;
                }
            }
        }))
    };
    let value = serde_json::to_vec(&Candidate {
        name: replica.name.clone(),
        addr: replica.advertise_addr().to_owned(),
    })
    .expect("a candidate serializes");
    let campaign = {
        let mut c = client.clone();
        let election = election.clone();
        async move { c.campaign(election, value, lease).await }
    };
    tokio::pin!(campaign);
    let mut term: Option<u64> = None;
    // Send instants of keep-alives not yet answered, oldest first: each
    // answer counts from the request it answers.
    let mut sent: VecDeque<Instant> = VecDeque::with_capacity(8);
    let mut renew = tokio::time::interval(ttl / 3);
    renew.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let _observer = observer;
    // Every campaigning replica has a key under the election: they are the
    // peers history is repaired from. Listed beside the loop, so a slow
    // answer never delays a renewal.
    let _lister = {
        let mut c = client.clone();
        let (prefix, period) = (format!("{election}/"), ttl / 3);
        let replica = replica.clone();
        AbortOnDrop(tokio::spawn(async move {
            let mut tick = tokio::time::interval(period);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let opts = etcd_client::GetOptions::new().with_prefix();
                let Ok(Ok(keys)) =
                    tokio::time::timeout(CALL_TIMEOUT, c.get(prefix.clone(), Some(opts))).await
                else {
                    continue;
                };
                replica.set_peers(
                    keys.kvs()
                        .iter()
                        .filter_map(|kv| serde_json::from_slice::<Candidate>(kv.value()).ok())
                        .map(|c| super::Peer {
                            name: c.name,
                            addr: c.addr,
                        })
                        .collect(),
                );
            }
        }))
    };
    info!(lease, ttl_s = ttl.as_secs(), %election, "campaigning");
    replica.follow(None);
    loop {
        tokio::select! {
            _ = stop.changed() => return Ok(()),
            () = tokio::time::sleep_until(until.into()) => {
                return Err(EtcdError::RenewalLate(margin));
            }
            _ = renew.tick() => {
                // Unanswered keep-alives pile up only past the deadline,
                // which ends the session first; never pair an answer with
                // a later request than its own.
                if sent.len() == sent.capacity() {
                    return Err(EtcdError::RenewalLate(margin));
                }
                sent.push_back(Instant::now());
                call(cfg, "renew the lease", keeper.keep_alive()).await?;
            }
            r = renewals.message() => {
                let resp = r.map_err(|source| EtcdError::Call {
                    endpoints: cfg.endpoints.join(","),
                    what: "renew the lease",
                    source,
                })?.ok_or(EtcdError::StreamEnded("keep-alive"))?;
                if resp.ttl() <= 0 {
                    return Err(EtcdError::LeaseEnded);
                }
                if let Some(at) = sent.pop_front() {
                    until = at + Duration::from_secs(resp.ttl() as u64) - margin;
                    replica.renewed(until);
                }
            }
            r = &mut campaign, if term.is_none() => {
                let resp = r.map_err(|source| EtcdError::Call {
                    endpoints: cfg.endpoints.join(","),
                    what: "campaign",
                    source,
                })?;
                let Some(key) = resp.leader() else {
                    return Err(EtcdError::StreamEnded("campaign (no leader key)"));
                };
                if Instant::now() >= until {
                    return Err(EtcdError::RenewalLate(margin));
                }
                let t = key.rev() as u64;
                info!(term = t, "elected leader");
                term = Some(t);
                replica.lead(t, until);
            }
            r = observed.recv() => {
                let resp = r.ok_or(EtcdError::StreamEnded("observe"))?.map_err(|source| EtcdError::Call {
                    endpoints: cfg.endpoints.join(","),
                    what: "observe the leader",
                    source,
                })?;
                let Some(kv) = resp.kv() else { continue };
                let leader_term = kv.create_revision() as u64;
                match term {
                    Some(mine) if mine == leader_term => {}
                    // A report older than our own term says nothing new.
                    Some(mine) if leader_term < mine => {}
                    Some(_) => return Err(EtcdError::LostKey(leader_term)),
                    // Our own key leads: we won, even if the campaign call
                    // (waiting on a member that lost its cluster) has not
                    // answered.
                    None if kv.lease() == lease => {
                        if Instant::now() >= until {
                            return Err(EtcdError::RenewalLate(margin));
                        }
                        info!(term = leader_term, "elected leader (seen by observing)");
                        term = Some(leader_term);
                        replica.lead(leader_term, until);
                    }
                    None => {
                        let c: Option<Candidate> = serde_json::from_slice(kv.value()).ok();
                        match c {
                            // A key of a replica that leads and can be asked.
                            Some(c) if c.name != replica.name => {
                                let leader = LeaderInfo {
                                    name: c.name,
                                    addr: c.addr,
                                    term: leader_term,
                                };
                                info!(leader = ?leader, "following");
                                replica.follow(Some(leader));
                            }
                            // A key left by this replica before a restart, or
                            // one that does not parse: a newer term leads and
                            // nobody can be asked for its plans until it ends.
                            _ => replica.follow(None),
                        }
                    }
                }
            }
        }
    }
}
