//! VMM intake: the Unix sockets VMMs hand their userfaultfd to. Each
//! connection is admitted (`admission.rs`), read (`socket.rs`), checked
//! and turned into a running tracker (`register.rs`), or refused with a
//! reason; one bad peer never disturbs the others.

mod admission;
mod register;
mod socket;

use std::io;
use std::sync::Arc;
use std::time::Duration;

use nix::sys::socket::{getsockopt, sockopt};
use tokio::io::AsyncWriteExt;
use tokio::net::{UnixListener, UnixStream};
use tracing::warn;

pub use admission::Admission;
pub(crate) use register::{Request, track};
pub use socket::bind;

use crate::config::{Config, SocketConfig};
use crate::handshake::{self, Hello, WsetReply};
use crate::registry::Registry;
use admission::{cgroup_allowed, cgroups_of};
use register::register;
use socket::{read_handshake, reply_if_wset};

/// How long a peer may take to send its handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// At most this many fds are accepted with one handshake.
const MAX_FDS: usize = wset_tracker::fdpass::MAX_FDS;

/// Why a registration was refused.
#[derive(Debug, thiserror::Error)]
pub enum IntakeError {
    #[error("{0}")]
    Handshake(#[from] handshake::HandshakeError),
    #[error(
        "peer uid {uid} (pid {pid}) is not allowed to register (allowed: root and {allowed:?})"
    )]
    NotAllowed {
        uid: u32,
        pid: libc::pid_t,
        allowed: Vec<u32>,
    },
    #[error(
        "peer pid {pid} runs in cgroup(s) {cgroups:?}, none under an allowed cgroup ({allowed:?})"
    )]
    CgroupNotAllowed {
        pid: libc::pid_t,
        cgroups: Vec<String>,
        allowed: Vec<String>,
    },
    #[error("expected {want} fd(s) with the handshake ({what}), got {got}")]
    FdCount {
        want: usize,
        got: usize,
        what: &'static str,
    },
    #[error("the passed fd is not a userfaultfd (it is {0})")]
    NotUffd(String),
    #[error("the passed memory fd is not a memfd (it is {0})")]
    NotMemfd(String),
    #[error("the memfd is {size} bytes but region {index} ends at offset {end}")]
    MemfdTooSmall { size: u64, index: usize, end: u64 },
    #[error("memory regions do not match the VMM's mappings: {0}")]
    NotMapped(#[from] handshake::MappingError),
    #[error("cannot read /proc/{pid}/maps to check the regions: {source}")]
    Maps { pid: libc::pid_t, source: io::Error },
    #[error("snapshot memory file {path}: {reason}")]
    Snapshot { path: String, reason: String },
    #[error("{0}")]
    Registry(#[from] crate::registry::RegistryError),
    #[error("tracking could not start: {0}")]
    Tracker(#[from] wset_tracker::TrackerError),
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error("handshake timed out after {0:?}")]
    Timeout(Duration),
}

/// Accept VMMs on `listener` until `shutdown` fires.
/// `offered` is what the kernel's userfaultfd offers, probed once at start-up.
pub async fn serve(
    listener: UnixListener,
    sock: SocketConfig,
    cfg: Arc<Config>,
    registry: Arc<Registry>,
    offered: u64,
    admission: Arc<Admission>,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    let sock = Arc::new(sock);
    loop {
        tokio::select! {
            _ = shutdown.changed() => break,
            r = listener.accept() => match r {
                Ok((stream, _)) => {
                    let (cfg, registry, sock, adm) =
                        (cfg.clone(), registry.clone(), sock.clone(), admission.clone());
                    tokio::spawn(async move {
                        connection(stream, &sock, &cfg, &registry, offered, &adm).await
                    });
                }
                Err(e) => {
                    warn!(socket = %sock.path.display(), error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }
}

fn bump(c: &std::sync::atomic::AtomicU64) {
    c.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
}

/// One VMM connection, start to end.
async fn connection(
    stream: UnixStream,
    sock: &SocketConfig,
    cfg: &Config,
    registry: &Registry,
    offered: u64,
    admission: &Admission,
) {
    let (pid, uid) = match getsockopt(&stream, sockopt::PeerCredentials) {
        Ok(c) => (c.pid(), c.uid()),
        Err(e) => {
            warn!(error = %e, "SO_PEERCRED failed; dropping connection");
            return;
        }
    };
    // Refused at the door: the handshake is not even read.
    let _permit = match admission.admit() {
        Ok(p) => p,
        Err(why) => {
            bump(&registry.registrations.refused_rate);
            if let Some(suppressed) = admission.log.allow() {
                warn!(peer_pid = pid, peer_uid = uid, socket = %sock.path.display(), suppressed, "registration refused: {why}");
            }
            let mut stream = stream;
            let mut line =
                serde_json::to_vec(&WsetReply::error(why.to_string())).expect("reply serializes");
            line.push(b'\n');
            let _ = tokio::time::timeout(Duration::from_millis(100), stream.write_all(&line)).await;
            return;
        }
    };
    let span = tracing::info_span!("register", peer_pid = pid, peer_uid = uid, socket = %sock.path.display());
    tracing::Instrument::instrument(
        handle_peer(stream, pid, uid, sock, cfg, registry, offered),
        span,
    )
    .await
}

/// The handshake and registration of one peer whose credentials are known.
async fn handle_peer(
    mut stream: UnixStream,
    pid: libc::pid_t,
    uid: u32,
    sock: &SocketConfig,
    cfg: &Config,
    registry: &Registry,
    offered: u64,
) {
    let (bytes, fds) = match tokio::time::timeout(HANDSHAKE_TIMEOUT, read_handshake(&stream)).await
    {
        Ok(Ok(x)) => x,
        Ok(Err(e)) => {
            bump(&registry.registrations.refused_handshake);
            warn!(error = %e, "handshake refused");
            reply_if_wset(&mut stream, None, &WsetReply::error(e.to_string())).await;
            return;
        }
        Err(_) => {
            bump(&registry.registrations.refused_handshake);
            warn!(
                "handshake refused: peer sent no complete handshake within {HANDSHAKE_TIMEOUT:?}"
            );
            return;
        }
    };
    let hello = match handshake::parse(&bytes) {
        Ok(h) => h,
        Err(e) => {
            bump(&registry.registrations.refused_handshake);
            warn!(error = %e, "handshake refused");
            reply_if_wset(&mut stream, Some(&bytes), &WsetReply::error(e.to_string())).await;
            return;
        }
    };
    let wset = !matches!(hello, Hello::Firecracker(_));
    let cgroups = cgroups_of(pid);
    let outcome = if uid != 0 && !cfg.allowed_uids.contains(&uid) {
        Err(IntakeError::NotAllowed {
            uid,
            pid,
            allowed: cfg.allowed_uids.clone(),
        })
    } else if !cgroup_allowed(&cgroups, &cfg.allowed_cgroups) {
        Err(IntakeError::CgroupNotAllowed {
            pid,
            cgroups,
            allowed: cfg.allowed_cgroups.clone(),
        })
    } else {
        register(hello, fds, pid, sock, cfg, registry, offered).await
    };
    let stats = &registry.registrations;
    let reply = match outcome {
        Ok(r) => {
            bump(&stats.accepted);
            r
        }
        Err(e) => {
            bump(match e {
                IntakeError::NotAllowed { .. } | IntakeError::CgroupNotAllowed { .. } => {
                    &stats.refused_peer
                }
                _ => &stats.refused_registration,
            });
            warn!(error = %e, "registration refused");
            WsetReply::error(e.to_string())
        }
    };
    if wset {
        let mut line = serde_json::to_vec(&reply).expect("reply serializes");
        line.push(b'\n');
        let _ = stream.write_all(&line).await;
    }
    // Firecracker keeps its end open and sends nothing more; wset.v1 peers may
    // close. Either way the VM's life is followed through its pidfd and uffd.
}
