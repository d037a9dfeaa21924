//! Transport security for both servers and for the controller's dials:
//! TLS (rustls, ring) with client certificates (mutual TLS), certificates
//! read from PEM files and reloaded when the files change, and the
//! identities a client certificate carries, for authorization.
//!
//! Files are polled rather than watched: Kubernetes updates mounted
//! Secrets by swapping a symlink, which a poll of the resolved file's
//! metadata sees whatever the filesystem. A new server configuration is
//! built only when every file parses; until then the previous one stays
//! in force and the error is logged, so a half-written rotation never
//! takes a server down.

use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use rustls::pki_types::pem::{self, PemObject};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::{TcpListener, TcpStream};
use tokio_stream::wrappers::ReceiverStream;
use tracing::{info, warn};

/// Where a server's certificate, key and (for mutual TLS) client CA are.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServerTls {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// Clients must present a certificate signed by one of these CAs
    /// (mutual TLS); `None`: any client may connect (server TLS only).
    pub client_ca: Option<PathBuf>,
    /// How often the files are checked for changes.
    pub reload: Duration,
}

/// A client's certificate, key and the CA that signs the servers'.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClientTls {
    pub ca: PathBuf,
    /// The client's own identity (mutual TLS); both or neither.
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    /// Name the servers' certificates must carry; `None`: the host dialled.
    pub server_name: Option<String>,
}

/// Why a TLS configuration could not be built from its files.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("read certificates from {}", path.display())]
    ReadCertificates {
        path: PathBuf,
        #[source]
        source: pem::Error,
    },
    #[error("parse PEM certificates in {}", path.display())]
    ParseCertificates {
        path: PathBuf,
        #[source]
        source: pem::Error,
    },
    #[error("{} holds no PEM certificate", path.display())]
    NoCertificate { path: PathBuf },
    #[error("read a PEM private key from {}", path.display())]
    ReadKey {
        path: PathBuf,
        #[source]
        source: pem::Error,
    },
    #[error("add a CA certificate from {}", path.display())]
    AddCa {
        path: PathBuf,
        #[source]
        source: rustls::Error,
    },
    #[error("TLS protocol versions")]
    ProtocolVersions(#[source] rustls::Error),
    #[error("client certificate verifier from {}", path.display())]
    ClientVerifier {
        path: PathBuf,
        #[source]
        source: rustls::server::VerifierBuilderError,
    },
    #[error("certificate {} and key {} do not make a TLS identity", cert.display(), key.display())]
    Identity {
        cert: PathBuf,
        key: PathBuf,
        #[source]
        source: rustls::Error,
    },
    /// A client file (`what`: CA, certificate or key) could not be read.
    #[error("read {what} {}", path.display())]
    ReadFile {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("a client certificate needs both its certificate and its key")]
    HalfIdentity,
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let path_buf = || path.to_owned();
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|source| TlsError::ReadCertificates {
            path: path_buf(),
            source,
        })?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| TlsError::ParseCertificates {
            path: path_buf(),
            source,
        })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate { path: path_buf() });
    }
    Ok(certs)
}

fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_file(path).map_err(|source| TlsError::ReadKey {
        path: path.to_owned(),
        source,
    })
}

fn roots(path: &Path) -> Result<rustls::RootCertStore, TlsError> {
    let mut roots = rustls::RootCertStore::empty();
    for c in read_certs(path)? {
        roots.add(c).map_err(|source| TlsError::AddCa {
            path: path.to_owned(),
            source,
        })?;
    }
    Ok(roots)
}

/// What a TLS server speaks, offered in ALPN.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Alpn {
    /// gRPC: HTTP/2 only.
    Grpc,
    /// HTTP servers (the extender): HTTP/2 or HTTP/1.1, so that any
    /// client, curl or Python's as much as kube-scheduler's Go, connects.
    Http,
}

/// Build a rustls server configuration from the files.
pub fn server_config(t: &ServerTls, alpn: Alpn) -> Result<rustls::ServerConfig, TlsError> {
    let builder = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(TlsError::ProtocolVersions)?;
    let builder = match &t.client_ca {
        Some(ca) => {
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots(ca)?),
                provider(),
            )
            .build()
            .map_err(|source| TlsError::ClientVerifier {
                path: ca.clone(),
                source,
            })?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut cfg = builder
        .with_single_cert(read_certs(&t.cert)?, read_key(&t.key)?)
        .map_err(|source| TlsError::Identity {
            cert: t.cert.clone(),
            key: t.key.clone(),
            source,
        })?;
    cfg.alpn_protocols = match alpn {
        Alpn::Grpc => vec![b"h2".to_vec()],
        Alpn::Http => vec![b"h2".to_vec(), b"http/1.1".to_vec()],
    };
    Ok(cfg)
}

/// Modification time and length of each file: a change of either reloads.
fn stamp(paths: &[&Path]) -> Vec<Option<(SystemTime, u64)>> {
    paths
        .iter()
        .map(|p| {
            std::fs::metadata(p)
                .ok()
                .and_then(|m| Some((m.modified().ok()?, m.len())))
        })
        .collect()
}

/// The server configuration in force, swapped when the files change.
#[derive(Clone, Debug)]
pub struct Reloading {
    current: Arc<RwLock<Arc<rustls::ServerConfig>>>,
}

impl Reloading {
    /// Load the files now (an error here stops the server from starting),
    /// then re-check them every `t.reload` until `stop` changes. `what`
    /// names the server in the reload log lines.
    pub fn start(
        what: &'static str,
        t: ServerTls,
        alpn: Alpn,
        mut stop: tokio::sync::watch::Receiver<bool>,
    ) -> Result<Self, TlsError> {
        let cfg = server_config(&t, alpn)?;
        let current = Arc::new(RwLock::new(Arc::new(cfg)));
        let me = Self { current };
        let swap = me.clone();
        tokio::spawn(async move {
            let files = |t: &ServerTls| {
                let mut f = vec![t.cert.clone(), t.key.clone()];
                f.extend(t.client_ca.clone());
                f
            };
            let paths = files(&t);
            let refs: Vec<&Path> = paths.iter().map(PathBuf::as_path).collect();
            let mut last = stamp(&refs);
            let mut tick = tokio::time::interval(t.reload);
            loop {
                tokio::select! {
                    _ = stop.changed() => return,
                    _ = tick.tick() => {}
                }
                let now = stamp(&refs);
                if now == last {
                    continue;
                }
                match server_config(&t, alpn) {
                    Ok(cfg) => {
                        *swap.current.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(cfg);
                        last = now;
                        info!(cert = %t.cert.display(), "{what} TLS certificates reloaded");
                    }
                    // Keep the old configuration; try again next tick (a
                    // rotation may be half written).
                    Err(e) => {
                        warn!(error = %crate::error_chain(&e), "{what} TLS reload failed; the previous certificates stay in force")
                    }
                }
            }
        });
        Ok(me)
    }

    pub fn config(&self) -> Arc<rustls::ServerConfig> {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

/// How long a client may take over its TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Handshakes in progress at once; connections beyond wait in the backlog.
const MAX_HANDSHAKES: usize = 128;

/// Accept TCP connections on `listener` and hand over those whose TLS
/// handshake succeeds with the configuration in force at that moment.
/// A failed handshake (no certificate, a certificate from another CA, a
/// plaintext client) is logged with the peer's address and dropped; it
/// never delays anyone else's.
pub fn incoming(
    what: &'static str,
    listener: TcpListener,
    tls: Reloading,
) -> ReceiverStream<io::Result<tokio_rustls::server::TlsStream<TcpStream>>> {
    let (tx, rx) = tokio::sync::mpsc::channel(MAX_HANDSHAKES);
    let permits = Arc::new(tokio::sync::Semaphore::new(MAX_HANDSHAKES));
    tokio::spawn(async move {
        loop {
            let Ok(permit) = permits.clone().acquire_owned().await else {
                return;
            };
            let (tcp, peer) = tokio::select! {
                _ = tx.closed() => return,
                r = listener.accept() => match r {
                    Ok(x) => {
                        // Small requests and answers go out at once.
                        let _ = x.0.set_nodelay(true);
                        x
                    }
                    Err(e) => {
                        warn!(error = %e, "{what} accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            let acceptor = tokio_rustls::TlsAcceptor::from(tls.config());
            let tx = tx.clone();
            tokio::spawn(async move {
                let _permit = permit;
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(Ok(s)) => {
                        let _ = tx.send(Ok(s)).await;
                    }
                    Ok(Err(e)) => refused(what, peer, &e.to_string()),
                    Err(_) => refused(what, peer, "no TLS handshake within 10 s"),
                }
            });
        }
    });
    ReceiverStream::new(rx)
}

fn refused(what: &str, peer: SocketAddr, why: &str) {
    static THROTTLE: std::sync::OnceLock<crate::LogThrottle> = std::sync::OnceLock::new();
    if let Some(suppressed) = THROTTLE.get_or_init(|| crate::LogThrottle::new(20)).allow() {
        warn!(%peer, reason = why, suppressed, "{what} refused a connection: TLS handshake failed");
    }
}

/// A tonic client TLS configuration from the files (read now: a
/// reconnecting client picks up rotated files at its next connection).
pub fn client_config(
    t: &ClientTls,
    host: &str,
) -> Result<tonic::transport::ClientTlsConfig, TlsError> {
    let read = |what: &'static str, path: &Path| {
        std::fs::read(path).map_err(|source| TlsError::ReadFile {
            what,
            path: path.to_owned(),
            source,
        })
    };
    let ca = read("CA", &t.ca)?;
    let mut c = tonic::transport::ClientTlsConfig::new()
        .ca_certificate(tonic::transport::Certificate::from_pem(ca))
        .domain_name(t.server_name.clone().unwrap_or_else(|| host.to_owned()));
    match (&t.cert, &t.key) {
        (Some(cert), Some(key)) => {
            let cert = read("certificate", cert)?;
            let key = read("key", key)?;
            c = c.identity(tonic::transport::Identity::from_pem(cert, key));
        }
        (None, None) => {}
        _ => return Err(TlsError::HalfIdentity),
    }
    Ok(c)
}

/// The identities a client certificate (DER) carries, in the order
/// authorization rules are matched: URI SANs (e.g. SPIFFE IDs), DNS SANs,
/// then the subject's common name.
pub fn identities(der: &[u8]) -> Vec<String> {
    use x509_parser::prelude::*;
    let Ok((_, cert)) = X509Certificate::from_der(der) else {
        return Vec::new();
    };
    let mut ids = Vec::new();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for n in &san.value.general_names {
            if let GeneralName::URI(u) = n {
                ids.push((*u).to_owned());
            }
        }
        for n in &san.value.general_names {
            if let GeneralName::DNSName(d) = n {
                ids.push((*d).to_owned());
            }
        }
    }
    for cn in cert.subject().iter_common_name() {
        if let Ok(s) = cn.as_str() {
            ids.push(s.to_owned());
        }
    }
    ids
}
