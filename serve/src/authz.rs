//! Which clients may call which methods: rules `IDENTITY=PATTERN` matched
//! against the identities of the client's certificate (mutual TLS) and the
//! gRPC method path, checked by a tower layer before any service runs.
//! A refusal is `PERMISSION_DENIED` naming the identity and the method, and
//! is logged (at most 20 lines a second; the next line counts the rest).

use std::future::Future;
use std::pin::Pin;
use std::str::FromStr;
use std::sync::Arc;
use std::task::{Context, Poll};

use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};
use tracing::warn;

/// One rule: clients with `identity` (or any authenticated client, `*`)
/// may call the methods `pattern` matches: `*`, `/package.Service/*` or
/// `/package.Service/Method`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rule {
    pub identity: String,
    pub pattern: String,
}

impl FromStr for Rule {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        // The identity may hold '=' only in a URI's query; the pattern never does.
        let (identity, pattern) = s
            .rsplit_once('=')
            .ok_or_else(|| format!("{s:?}: expected IDENTITY=METHODS, e.g. spiffe://wset/controller=/wset.v1.AgentService/*"))?;
        if identity.is_empty() {
            return Err(format!("{s:?}: empty identity (use * for any client)"));
        }
        let ok = pattern == "*"
            || pattern
                .strip_prefix('/')
                .and_then(|p| p.split_once('/'))
                .is_some_and(|(svc, m)| {
                    !svc.is_empty()
                        && !svc.contains('*')
                        && !m.is_empty()
                        && (m == "*" || !m.contains(['*', '/']))
                });
        if !ok {
            return Err(format!(
                "{s:?}: the methods must be *, /package.Service/* or /package.Service/Method"
            ));
        }
        Ok(Self {
            identity: identity.to_owned(),
            pattern: pattern.to_owned(),
        })
    }
}

impl Rule {
    fn matches(&self, ids: &[String], method: &str) -> bool {
        let who = self.identity == "*" || ids.contains(&self.identity);
        let what = match self.pattern.strip_suffix('*') {
            _ if self.pattern == "*" => true,
            Some(prefix) => method.starts_with(prefix),
            None => method == self.pattern,
        };
        who && what
    }
}

/// The rules of one server. Without rules every client the transport let
/// in may call every method (with mutual TLS: every client whose
/// certificate the client CA signed).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Policy {
    pub rules: Vec<Rule>,
}

/// Health checks are open to every client the transport let in (probes,
/// load balancers).
const ALWAYS: &str = "/grpc.health.v1.Health/";

impl Policy {
    pub fn is_open(&self) -> bool {
        self.rules.is_empty()
    }

    /// Whether a client with `ids` may call `method`.
    pub fn allows(&self, ids: &[String], method: &str) -> bool {
        self.is_open()
            || method.starts_with(ALWAYS)
            || self.rules.iter().any(|r| r.matches(ids, method))
    }
}

/// The tower layer enforcing a [`Policy`] on a server.
#[derive(Clone, Debug)]
pub struct AuthzLayer {
    pub what: &'static str,
    pub policy: Arc<Policy>,
}

impl<S> tower::Layer<S> for AuthzLayer {
    type Service = Authz<S>;
    fn layer(&self, inner: S) -> Authz<S> {
        Authz {
            inner,
            what: self.what,
            policy: self.policy.clone(),
        }
    }
}

#[derive(Clone, Debug)]
pub struct Authz<S> {
    inner: S,
    what: &'static str,
    policy: Arc<Policy>,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S, B, R> tower::Service<http::Request<B>> for Authz<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<R>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    R: Default + Send + 'static,
{
    type Response = http::Response<R>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        if self.policy.is_open() {
            return Box::pin(self.inner.call(req));
        }
        let method = req.uri().path().to_owned();
        let tls = req.extensions().get::<TlsConnectInfo<TcpConnectInfo>>();
        let peer = tls
            .and_then(|t| t.get_ref().remote_addr())
            .map_or_else(|| "unknown".to_owned(), |a| a.to_string());
        let ids: Vec<String> = tls
            .and_then(TlsConnectInfo::peer_certs)
            .and_then(|c| c.first().map(|der| crate::tls::identities(der)))
            .unwrap_or_default();
        if self.policy.allows(&ids, &method) {
            return Box::pin(self.inner.call(req));
        }
        let status = tonic::Status::permission_denied(refuse(self.what, &peer, &ids, &method));
        Box::pin(std::future::ready(Ok(status.into_http())))
    }
}

/// A call [`Policy::allows`] refused: logged (at most 20 lines a second,
/// the next one counting the rest), and the message the client is given,
/// naming its identities and the method. Both the gRPC layer and the HTTP
/// servers' gate refuse through it.
pub fn refuse(what: &str, peer: &dyn std::fmt::Display, ids: &[String], method: &str) -> String {
    let who = if ids.is_empty() {
        "a client without a certificate identity".to_owned()
    } else {
        ids.join(", ")
    };
    static THROTTLE: std::sync::OnceLock<crate::LogThrottle> = std::sync::OnceLock::new();
    if let Some(suppressed) = THROTTLE.get_or_init(|| crate::LogThrottle::new(20)).allow() {
        warn!(%peer, identity = %who, %method, suppressed, "{what} refused a call: not authorized");
    }
    format!("{who} may not call {method} on the {what}: no --authz rule allows it")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_parse_and_refuse_what_they_cannot_mean() {
        let r: Rule = "spiffe://wset/controller=/wset.v1.AgentService/*"
            .parse()
            .unwrap();
        assert_eq!(r.identity, "spiffe://wset/controller");
        assert_eq!(r.pattern, "/wset.v1.AgentService/*");
        assert!("*=*".parse::<Rule>().is_ok());
        assert!(
            "ops=/wset.v1.SchedulerService/RankHosts"
                .parse::<Rule>()
                .is_ok()
        );
        for bad in [
            "no-equals",
            "=/wset.v1.AgentService/*",
            "x=/wset.v1.AgentService",
            "x=wset.v1.AgentService/ListVms",
            "x=/wset.*/ListVms",
            "x=/wset.v1.AgentService/List*",
            "x=/wset.v1.AgentService/",
        ] {
            assert!(bad.parse::<Rule>().is_err(), "{bad} parsed");
        }
    }

    #[test]
    fn policy_matches_identity_and_method() {
        let p = Policy {
            rules: vec![
                "spiffe://wset/controller=/wset.v1.AgentService/*"
                    .parse()
                    .unwrap(),
                "sched=/wset.v1.SchedulerService/RankHosts".parse().unwrap(),
            ],
        };
        let ctl = vec!["spiffe://wset/controller".to_owned()];
        let sched = vec!["sched".to_owned(), "other".to_owned()];
        assert!(p.allows(&ctl, "/wset.v1.AgentService/WatchSummaries"));
        assert!(!p.allows(&ctl, "/wset.v1.SchedulerService/RankHosts"));
        assert!(p.allows(&sched, "/wset.v1.SchedulerService/RankHosts"));
        assert!(!p.allows(&sched, "/wset.v1.SchedulerService/ListMigrations"));
        assert!(!p.allows(&[], "/wset.v1.AgentService/ListVms"));
        // Health is open to whoever the transport let in.
        assert!(p.allows(&[], "/grpc.health.v1.Health/Check"));
        // No rules: open.
        assert!(Policy::default().allows(&[], "/wset.v1.AgentService/ListVms"));
    }
}
