//! HTTP servers beside the gRPC ones (the kube-scheduler extender, the web
//! view), served as the gRPC servers are: the same [`Security`] (TLS with
//! certificates reloaded live, mutual TLS, `--authz` rules, plaintext only
//! on loopback unless asked), a call timeout, a limit on calls in flight
//! past which new calls are shed at once, and a bounded drain at shutdown.
//!
//! Authorization rules name HTTP routes as methods: a request for `/filter`
//! on a server whose `service` is `wset.v1.Extender` is the method
//! `/wset.v1.Extender/filter`, so `IDENTITY=/wset.v1.Extender/*` lets a
//! client call every route.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ConnectInfo;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio_stream::StreamExt as _;
use tracing::{info, warn};

use crate::{Security, ServeError, Served, ServerLimits, tls};

/// Who is calling: the peer's address and the identities of its client
/// certificate (empty without mutual TLS).
#[derive(Clone, Debug)]
pub struct Peer {
    pub addr: SocketAddr,
    pub identities: Vec<String>,
}

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// Connections open at once; past it, new ones wait in the listen backlog
/// (each holds a file descriptor the controller shares with gRPC and etcd).
pub const MAX_CONNECTIONS: usize = 1024;

/// A connection and its place among the [`MAX_CONNECTIONS`].
struct Held {
    io: Pin<Box<dyn Io>>,
    _permit: tokio::sync::OwnedSemaphorePermit,
}

impl AsyncRead for Held {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        self.io.as_mut().poll_read(cx, buf)
    }
}

impl AsyncWrite for Held {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        self.io.as_mut().poll_write(cx, buf)
    }
    fn poll_flush(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        self.io.as_mut().poll_flush(cx)
    }
    fn poll_shutdown(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        self.io.as_mut().poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        self.io.as_mut().poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

type TlsIncoming = tokio_stream::wrappers::ReceiverStream<
    std::io::Result<tokio_rustls::server::TlsStream<tokio::net::TcpStream>>,
>;

/// Connections as axum takes them, plaintext or after a TLS handshake.
struct Listener {
    what: &'static str,
    local: SocketAddr,
    inner: Inner,
    connections: Arc<tokio::sync::Semaphore>,
}

enum Inner {
    Plain(TcpListener),
    Tls(TlsIncoming),
}

impl axum::serve::Listener for Listener {
    type Io = Held;
    type Addr = Peer;

    async fn accept(&mut self) -> (Self::Io, Peer) {
        let permit = self
            .connections
            .clone()
            .acquire_owned()
            .await
            .expect("the connection semaphore is never closed");
        let (io, peer) = self.accept_one().await;
        let held = Held {
            io,
            _permit: permit,
        };
        (held, peer)
    }

    fn local_addr(&self) -> std::io::Result<Peer> {
        Ok(Peer {
            addr: self.local,
            identities: Vec::new(),
        })
    }
}

impl Listener {
    async fn accept_one(&mut self) -> (Pin<Box<dyn Io>>, Peer) {
        loop {
            match &mut self.inner {
                Inner::Plain(l) => match TcpListener::accept(l).await {
                    Ok((s, addr)) => {
                        let _ = s.set_nodelay(true);
                        let peer = Peer {
                            addr,
                            identities: Vec::new(),
                        };
                        return (Box::pin(s), peer);
                    }
                    Err(e) => {
                        warn!(error = %e, "{} accept failed", self.what);
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                },
                Inner::Tls(incoming) => match incoming.next().await {
                    Some(Ok(s)) => {
                        let (tcp, conn) = s.get_ref();
                        let Ok(addr) = tcp.peer_addr() else { continue };
                        let identities = conn
                            .peer_certificates()
                            .and_then(|c| c.first().map(|der| tls::identities(der)))
                            .unwrap_or_default();
                        return (Box::pin(s), Peer { addr, identities });
                    }
                    Some(Err(e)) => warn!(error = %e, "{} accept failed", self.what),
                    // The handshake task ended: nothing more will come.
                    None => std::future::pending::<()>().await,
                },
            }
        }
    }
}

impl axum::extract::connect_info::Connected<axum::serve::IncomingStream<'_, Listener>> for Peer {
    fn connect_info(stream: axum::serve::IncomingStream<'_, Listener>) -> Self {
        stream.remote_addr().clone()
    }
}

/// What every request passes through before its route.
#[derive(Clone)]
struct Gate {
    what: &'static str,
    service: &'static str,
    security: Arc<Security>,
    call_timeout: Duration,
    in_flight: Arc<tokio::sync::Semaphore>,
    max_in_flight: usize,
}

async fn gate(
    axum::extract::State(g): axum::extract::State<Gate>,
    ConnectInfo(peer): ConnectInfo<Peer>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let method = format!("/{}{}", g.service, req.uri().path());
    if !g.security.authz.allows(&peer.identities, &method) {
        let mut msg = crate::authz::refuse(g.what, &peer.addr, &peer.identities, &method);
        msg.push('\n');
        return (StatusCode::FORBIDDEN, msg).into_response();
    }
    let Ok(_permit) = g.in_flight.clone().try_acquire_owned() else {
        let msg = format!(
            "the {} has {} requests in flight already; retry shortly\n",
            g.what, g.max_in_flight
        );
        return (StatusCode::SERVICE_UNAVAILABLE, msg).into_response();
    };
    match tokio::time::timeout(g.call_timeout, next.run(req)).await {
        Ok(r) => r,
        Err(_) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "the {} did not answer {method} within {:?}\n",
                g.what, g.call_timeout
            ),
        )
            .into_response(),
    }
}

/// Bind `addr` and serve `router` there in a task of its own until `stop`
/// changes, then let requests in flight finish for at most
/// `limits.drain`. `what` names the server in logs and errors; `service`
/// names its routes for authorization. Configuration and binding errors
/// come back at once.
pub async fn spawn(
    what: &'static str,
    service: &'static str,
    router: axum::Router,
    addr: SocketAddr,
    limits: &ServerLimits,
    security: Security,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> Result<Served, ServeError> {
    security.check(what, addr)?;
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| ServeError::HttpBind { what, addr, source })?;
    let local = listener
        .local_addr()
        .map_err(|source| ServeError::HttpBind { what, addr, source })?;
    let (inner, scheme) = match &security.tls {
        Some(t) => {
            let reloading = tls::Reloading::start(what, t.clone(), tls::Alpn::Http, stop.clone())
                .map_err(|source| ServeError::Tls { what, source })?;
            let scheme = if security.authz.is_open() {
                "TLS"
            } else {
                "mutual TLS with authorization"
            };
            (Inner::Tls(tls::incoming(what, listener, reloading)), scheme)
        }
        None => (Inner::Plain(listener), "plaintext"),
    };
    let url = if security.tls.is_some() {
        "https"
    } else {
        "http"
    };
    info!(addr = %local, transport = scheme, "{what} serving at {url}://{local}/");
    let gate_state = Gate {
        what,
        service,
        security: Arc::new(security),
        call_timeout: limits.call_timeout,
        in_flight: Arc::new(tokio::sync::Semaphore::new(limits.max_concurrent_calls)),
        max_in_flight: limits.max_concurrent_calls,
    };
    let app = router
        .layer(axum::middleware::from_fn_with_state(gate_state, gate))
        .into_make_service_with_connect_info::<Peer>();
    let listener = Listener {
        what,
        local,
        inner,
        connections: Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS)),
    };
    let drain = limits.drain;
    let task = tokio::spawn(async move {
        let (stopped_tx, stopped_rx) = tokio::sync::oneshot::channel::<()>();
        let server = axum::serve(listener, app).with_graceful_shutdown(async move {
            let _ = stop.changed().await;
            let _ = stopped_tx.send(());
        });
        let server = std::pin::pin!(server.into_future());
        let deadline = async move {
            if stopped_rx.await.is_ok() {
                tokio::time::sleep(drain).await;
            } else {
                std::future::pending::<()>().await;
            }
        };
        tokio::select! {
            r = server => r.map_err(|source| ServeError::Http { what, addr: local, source }),
            () = deadline => {
                warn!("{what}: requests still in flight after the {drain:?} drain: the server stops waiting for them");
                Ok(())
            }
        }
    });
    Ok(Served { task, addr: local })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// One GET over a real socket: the status and the body.
    async fn get(addr: SocketAddr, path: &str) -> (u16, String) {
        let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let req = format!("GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n");
        s.write_all(req.as_bytes()).await.expect("send");
        let mut raw = Vec::new();
        s.read_to_end(&mut raw).await.expect("read");
        let text = String::from_utf8_lossy(&raw).into_owned();
        let status = text
            .split(' ')
            .nth(1)
            .and_then(|c| c.parse().ok())
            .expect("a status");
        let body = text
            .split_once("\r\n\r\n")
            .map(|x| x.1.to_owned())
            .unwrap_or_default();
        (status, body)
    }

    async fn serve_with(
        router: axum::Router,
        limits: ServerLimits,
    ) -> (Served, tokio::sync::watch::Sender<bool>) {
        let (stop_tx, stop) = tokio::sync::watch::channel(false);
        let addr = "127.0.0.1:0".parse().unwrap();
        let served = spawn(
            "test server",
            "wset.v1.Test",
            router,
            addr,
            &limits,
            Security::default(),
            stop,
        )
        .await
        .expect("serves");
        (served, stop_tx)
    }

    #[tokio::test]
    async fn calls_past_the_limit_are_shed_at_once_and_slow_ones_time_out() {
        // One call in flight at most: /hold holds it until released.
        let (entered_tx, mut entered) = tokio::sync::watch::channel(false);
        let (release, released) = tokio::sync::watch::channel(false);
        let router = axum::Router::new().route(
            "/hold",
            axum::routing::get(move || {
                let (entered_tx, mut released) = (entered_tx.clone(), released.clone());
                async move {
                    let _ = entered_tx.send(true);
                    let _ = released.wait_for(|r| *r).await;
                    "held"
                }
            }),
        );
        let limits = ServerLimits {
            max_concurrent_calls: 1,
            ..Default::default()
        };
        let (served, _stop) = serve_with(router, limits).await;
        let first = tokio::spawn(get(served.addr, "/hold"));
        entered
            .wait_for(|e| *e)
            .await
            .expect("the first call arrives");
        let (status, body) = get(served.addr, "/hold").await;
        assert_eq!(status, 503, "{body}");
        assert!(body.contains("1 requests in flight already"), "{body}");
        release.send(true).expect("release");
        assert_eq!(first.await.expect("the first call").0, 200);
        // The permit came back.
        assert_eq!(get(served.addr, "/hold").await.0, 200);

        // A call that never answers ends with 503 at the call timeout.
        let router = axum::Router::new().route(
            "/slow",
            axum::routing::get(|| async {
                std::future::pending::<()>().await;
                "never"
            }),
        );
        let limits = ServerLimits {
            call_timeout: Duration::from_millis(200),
            ..Default::default()
        };
        let (served, _stop) = serve_with(router, limits).await;
        let (status, body) = get(served.addr, "/slow").await;
        assert_eq!(status, 503, "{body}");
        assert!(
            body.contains("did not answer /wset.v1.Test/slow within 200ms"),
            "{body}"
        );
    }

    #[tokio::test]
    async fn a_stop_ends_the_server_after_the_drain_even_with_a_call_in_flight() {
        let (entered_tx, mut entered) = tokio::sync::watch::channel(false);
        let router = axum::Router::new().route(
            "/hold",
            axum::routing::get(move || {
                let entered_tx = entered_tx.clone();
                async move {
                    let _ = entered_tx.send(true);
                    std::future::pending::<()>().await;
                    "never"
                }
            }),
        );
        let limits = ServerLimits {
            drain: Duration::from_millis(200),
            ..Default::default()
        };
        let (served, stop) = serve_with(router, limits).await;
        let addr = served.addr;
        let _held = tokio::spawn(get(addr, "/hold"));
        entered.wait_for(|e| *e).await.expect("the call arrives");
        stop.send(true).expect("stop");
        served
            .task
            .await
            .expect("the server task")
            .expect("ends cleanly");
        // It accepts nothing more.
        assert!(tokio::net::TcpStream::connect(addr).await.is_err());
    }
}
