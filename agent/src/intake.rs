//! VMM intake: the Unix sockets VMMs hand their userfaultfd to. Each
//! connection is read, validated and turned into a running tracker, or
//! refused with a reason; one bad peer never disturbs the others.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use nix::sys::socket::{getsockopt, sockopt};
use tokio::io::{AsyncWriteExt, Interest};
use tokio::net::{UnixListener, UnixStream};
use tracing::{info, warn};
use wset_tracker::plan::{self, BackingKind, PlanInput};
use wset_tracker::uffd::{self, feature};
use wset_tracker::{Region, TrackerHandle, TrackerSpec, Uffd};

use crate::adopt;
use crate::config::{Config, SocketConfig};
use crate::handshake::{self, Backing, Hello, Layout, WsetReply};
use crate::now_ms;
use crate::registry::{Registry, VmInfo};

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
        pid: i32,
        allowed: Vec<u32>,
    },
    #[error(
        "peer pid {pid} runs in cgroup(s) {cgroups:?}, none under an allowed cgroup ({allowed:?})"
    )]
    CgroupNotAllowed {
        pid: i32,
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
    NotMapped(String),
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

/// How many registrations are admitted: a token bucket (rate and burst)
/// shared by every socket, and a cap on handshakes in progress. A flood is
/// refused at the door, before its handshake is read, so registered VMs
/// (served by their own threads) and well-behaved peers are unaffected.
#[derive(Debug)]
pub struct Admission {
    bucket: std::sync::Mutex<(f64, std::time::Instant)>,
    rate: f64,
    burst: f64,
    pending: Arc<tokio::sync::Semaphore>,
    /// Refusals are logged at most 20 a second; the next line counts the rest.
    log: wset_serve::LogThrottle,
}

impl Admission {
    pub fn new(rate_per_s: f64, burst: u32, max_pending: usize) -> Self {
        Self {
            bucket: std::sync::Mutex::new((f64::from(burst), std::time::Instant::now())),
            rate: rate_per_s,
            burst: f64::from(burst),
            pending: Arc::new(tokio::sync::Semaphore::new(max_pending)),
            log: wset_serve::LogThrottle::new(20),
        }
    }

    /// Take one token, or say why not.
    fn admit(&self) -> Result<tokio::sync::OwnedSemaphorePermit, String> {
        let permit = self
            .pending
            .clone()
            .try_acquire_owned()
            .map_err(|_| "too many handshakes in progress; try again shortly".to_owned())?;
        let mut b = self.bucket.lock().unwrap_or_else(|p| p.into_inner());
        let now = std::time::Instant::now();
        b.0 = (b.0 + now.duration_since(b.1).as_secs_f64() * self.rate).min(self.burst);
        b.1 = now;
        if b.0 < 1.0 {
            return Err(format!(
                "registration rate limit ({}/s, burst {}) reached; try again shortly",
                self.rate, self.burst
            ));
        }
        b.0 -= 1.0;
        Ok(permit)
    }
}

/// The cgroups `pid` belongs to (every hierarchy's path).
fn cgroups_of(pid: i32) -> Vec<String> {
    std::fs::read_to_string(format!("/proc/{pid}/cgroup"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.splitn(3, ':').nth(2).map(str::to_owned))
        .collect()
}

/// Whether any of `cgroups` is `prefix` or below it.
fn cgroup_allowed(cgroups: &[String], allowed: &[String]) -> bool {
    allowed.is_empty()
        || cgroups.iter().any(|c| {
            allowed.iter().any(|a| {
                let a = a.trim_end_matches('/');
                a.is_empty()
                    || c == a
                    || c.strip_prefix(a).is_some_and(|rest| rest.starts_with('/'))
            })
        })
}

/// Bind one socket: create its directory, replace a stale socket file, and
/// set its mode and group.
pub fn bind(sock: &SocketConfig, mode: u32, group: Option<u32>) -> io::Result<UnixListener> {
    let path = &sock.path;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)
            .map_err(|e| io::Error::new(e.kind(), format!("create {}: {e}", dir.display())))?;
    }
    if path.exists() {
        // A live agent answers on it; a stale file from a dead one does not.
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(io::Error::new(
                io::ErrorKind::AddrInUse,
                format!("{} is served by another running agent", path.display()),
            ));
        }
        std::fs::remove_file(path)?;
    }
    let l = UnixListener::bind(path)
        .map_err(|e| io::Error::new(e.kind(), format!("bind {}: {e}", path.display())))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
    if let Some(gid) = group {
        nix::unistd::chown(path, None, Some(nix::unistd::Gid::from_raw(gid))).map_err(|e| {
            io::Error::other(format!("chown {} to group {gid}: {e}", path.display()))
        })?;
    }
    Ok(l)
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
            let mut line = serde_json::to_vec(&WsetReply::error(why)).expect("reply serializes");
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
    pid: i32,
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

async fn reply_if_wset(stream: &mut UnixStream, bytes: Option<&[u8]>, reply: &WsetReply) {
    let is_wset = bytes.is_some_and(|b| b.iter().find(|c| !c.is_ascii_whitespace()) == Some(&b'{'));
    if is_wset {
        let mut line = serde_json::to_vec(reply).expect("reply serializes");
        line.push(b'\n');
        let _ = stream.write_all(&line).await;
    }
}

/// Read until one complete JSON value has arrived, collecting passed fds.
async fn read_handshake(stream: &UnixStream) -> Result<(Vec<u8>, Vec<OwnedFd>), IntakeError> {
    let mut buf = Vec::with_capacity(4096);
    let mut fds: Vec<OwnedFd> = Vec::new();
    let mut chunk = vec![0u8; 16 * 1024];
    loop {
        stream.readable().await?;
        let r = stream.try_io(Interest::READABLE, || {
            recv_chunk(stream.as_raw_fd(), &mut chunk)
        });
        let (n, got) = match r {
            Ok(x) => x,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e.into()),
        };
        fds.extend(got);
        if fds.len() > MAX_FDS {
            return Err(IntakeError::FdCount {
                want: MAX_FDS,
                got: fds.len(),
                what: "too many",
            });
        }
        if n == 0 {
            // EOF: whatever arrived is the whole message.
            if buf.is_empty() {
                return Err(handshake::HandshakeError::Empty.into());
            }
            if !handshake::is_complete(&buf) {
                // Let the parser name the problem (truncated or garbage).
                return Ok((buf, fds));
            }
            return Ok((buf, fds));
        }
        buf.extend_from_slice(&chunk[..n]);
        if buf.len() > handshake::MAX_MESSAGE_BYTES {
            return Err(handshake::HandshakeError::TooLarge.into());
        }
        if handshake::is_complete(&buf) {
            return Ok((buf, fds));
        }
    }
}

fn recv_chunk(fd: RawFd, chunk: &mut [u8]) -> io::Result<(usize, Vec<OwnedFd>)> {
    wset_tracker::fdpass::recv_with_fds(fd, chunk)
}

fn describe_fd(fd: &OwnedFd) -> String {
    std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd()))
        .map(|p| p.display().to_string())
        .unwrap_or_else(|e| format!("unreadable: {e}"))
}

fn read_maps(pid: i32) -> Result<Vec<handshake::MapsEntry>, IntakeError> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/maps"))
        .map_err(|e| IntakeError::NotMapped(format!("cannot read /proc/{pid}/maps: {e}")))?;
    Ok(handshake::parse_maps(&text))
}

async fn register(
    hello: Hello,
    fds: Vec<OwnedFd>,
    pid: i32,
    sock: &SocketConfig,
    cfg: &Config,
    registry: &Registry,
    offered: u64,
) -> Result<WsetReply, IntakeError> {
    match hello {
        Hello::WsetFeatures { backing } => {
            let rec = plan::recommended_features(offered, kind_of(backing));
            Ok(WsetReply {
                ok: true,
                offered_features: Some(offered),
                recommended_features: Some(rec),
                recommended_feature_names: Some(feature::names(rec)),
                ..Default::default()
            })
        }
        Hello::Firecracker(regions) => {
            let layout = handshake::firecracker_layout(&regions, cfg.max_vm_bytes)?;
            let [uffd_fd]: [OwnedFd; 1] =
                fds.try_into()
                    .map_err(|v: Vec<OwnedFd>| IntakeError::FdCount {
                        want: 1,
                        got: v.len(),
                        what: "the uffd",
                    })?;
            check_uffd(&uffd_fd)?;
            handshake::check_mapped(&layout, &read_maps(pid)?, None)
                .map_err(IntakeError::NotMapped)?;
            let source = match &sock.snapshot {
                Some(path) => Some(open_snapshot(path, &layout)?),
                None => None,
            };
            let n = registry
                .list()
                .iter()
                .filter(|v| v.info.vmm_pid == pid as u32)
                .count();
            let vm_id = if n == 0 {
                format!("fc-{pid}")
            } else {
                format!("fc-{pid}-{n}")
            };
            let name = sock
                .path
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default();
            let req = Request {
                vm_id,
                name,
                labels: Default::default(),
                pid,
                layout,
                backing: BackingKind::Anonymous,
                uffd: uffd_fd,
                memory_fd: None,
                source,
                snapshot: sock.snapshot.clone(),
                handshake: "firecracker",
                adopted: false,
            };
            start(req, cfg, registry, offered).await
        }
        Hello::WsetRegister(h) => {
            let backing = h
                .backing
                .ok_or(handshake::HandshakeError::MissingField("backing"))?;
            let vm_id = h.vm_id.clone().unwrap_or_else(|| format!("vm-{pid}"));
            handshake::check_vm_id(&vm_id)?;
            registry.check_free(&vm_id)?;
            let layout = handshake::wset_layout(&h, cfg.max_vm_bytes)?;
            let want = if backing == Backing::Anonymous { 1 } else { 2 };
            let what = if want == 1 {
                "the uffd"
            } else {
                "the uffd, then the memfd"
            };
            if fds.len() != want {
                return Err(IntakeError::FdCount {
                    want,
                    got: fds.len(),
                    what,
                });
            }
            let mut fds = fds.into_iter();
            let uffd_fd = fds.next().expect("counted");
            check_uffd(&uffd_fd)?;
            let memory_fd = fds.next();
            let ino = match &memory_fd {
                Some(m) => Some(check_memfd(m, &layout)?),
                None => None,
            };
            handshake::check_mapped(&layout, &read_maps(pid)?, ino)
                .map_err(IntakeError::NotMapped)?;
            let req = Request {
                vm_id,
                name: h.name.clone().unwrap_or_default(),
                labels: h.labels.clone(),
                pid,
                layout,
                backing: kind_of(backing),
                uffd: uffd_fd,
                memory_fd,
                source: None,
                snapshot: None,
                handshake: "wset.v1",
                adopted: false,
            };
            start(req, cfg, registry, offered).await
        }
    }
}

/// Track a VM again from its record (after an agent restart): take the
/// VMM's userfaultfd and memfd, and start as at registration. With several
/// uffds in the VMM, the one the guest's ranges are registered with (or
/// that may register them) is the one whose registration succeeds.
pub async fn adopt(
    rec: &adopt::Record,
    cfg: &Config,
    registry: &Registry,
    offered: u64,
) -> Result<WsetReply, IntakeError> {
    let got = tokio::task::spawn_blocking({
        let rec = rec.clone();
        move || adopt::reclaim(&rec)
    })
    .await
    .map_err(|e| io::Error::other(format!("re-adoption task: {e}")))?
    .map_err(|e| IntakeError::Io(io::Error::other(e.to_string())))?;
    let backing = match rec.backing.as_str() {
        "shmem" => BackingKind::Shmem,
        "hugetlb" => BackingKind::Hugetlb,
        _ => BackingKind::Anonymous,
    };
    let handshake = if rec.handshake == "firecracker" {
        "firecracker"
    } else {
        "wset.v1"
    };
    let mut last = None;
    for uffd in got.uffds {
        let req = Request {
            vm_id: rec.vm_id.clone(),
            name: rec.name.clone(),
            labels: rec.labels.clone(),
            pid: rec.vmm_pid,
            layout: rec.layout(),
            backing,
            uffd,
            memory_fd: match &got.memory_fd {
                Some(m) => Some(m.try_clone()?),
                None => None,
            },
            source: match &got.source {
                Some(f) => Some(f.try_clone()?),
                None => None,
            },
            snapshot: rec.snapshot.clone(),
            handshake,
            adopted: true,
        };
        match start(req, cfg, registry, offered).await {
            Err(e @ IntakeError::Tracker(wset_tracker::TrackerError::Register { .. })) => {
                last = Some(e);
            }
            other => return other,
        }
    }
    Err(last.expect("reclaim returns at least one uffd"))
}

fn kind_of(b: Backing) -> BackingKind {
    match b {
        Backing::Anonymous => BackingKind::Anonymous,
        Backing::Memfd => BackingKind::Shmem,
        Backing::Hugetlbfs => BackingKind::Hugetlb,
    }
}

fn check_uffd(fd: &OwnedFd) -> Result<(), IntakeError> {
    if uffd::is_userfaultfd(fd.as_raw_fd()) {
        Ok(())
    } else {
        Err(IntakeError::NotUffd(describe_fd(fd)))
    }
}

/// Check the memory fd is a memfd covering every region; returns its inode.
fn check_memfd(fd: &OwnedFd, layout: &Layout) -> Result<u64, IntakeError> {
    let what = describe_fd(fd);
    if !what.starts_with("/memfd:") {
        return Err(IntakeError::NotMemfd(what));
    }
    let st = nix::sys::stat::fstat(fd).map_err(io::Error::from)?;
    let size = st.st_size as u64;
    for (index, r) in layout.regions.iter().enumerate() {
        let end = r.file_offset + r.size;
        if end > size {
            return Err(IntakeError::MemfdTooSmall { size, index, end });
        }
    }
    Ok(st.st_ino)
}

fn open_snapshot(path: &Path, layout: &Layout) -> Result<std::fs::File, IntakeError> {
    let err = |reason: String| IntakeError::Snapshot {
        path: path.display().to_string(),
        reason,
    };
    let f = std::fs::File::open(path).map_err(|e| err(e.to_string()))?;
    let size = f.metadata().map_err(|e| err(e.to_string()))?.len();
    let need = layout
        .regions
        .iter()
        .map(|r| r.file_offset + r.size)
        .max()
        .unwrap_or(0);
    if size < need {
        return Err(err(format!(
            "it is {size} bytes but the regions need {need}"
        )));
    }
    Ok(f)
}

struct Request {
    vm_id: String,
    name: String,
    labels: std::collections::BTreeMap<String, String>,
    pid: i32,
    layout: Layout,
    backing: BackingKind,
    uffd: OwnedFd,
    memory_fd: Option<OwnedFd>,
    source: Option<std::fs::File>,
    /// Where `source` was opened from (kept so a restarted agent reopens it).
    snapshot: Option<std::path::PathBuf>,
    handshake: &'static str,
    /// Taken over from an earlier agent run: threads may wait on faults its
    /// tracker read and never answered.
    adopted: bool,
}

/// Choose methods, start the tracker, and add the VM to the registry.
async fn start(
    req: Request,
    cfg: &Config,
    registry: &Registry,
    offered: u64,
) -> Result<WsetReply, IntakeError> {
    let uffd = Uffd::from_owned(req.uffd);
    let features = uffd.features()?;
    let granule = req.layout.page_size;
    let granules = (req.layout.total_bytes() / granule) as u32;
    let vmm_holds_uffd = uffd::process_holds(req.pid, uffd.as_raw_fd());
    let p = plan::plan(PlanInput {
        features,
        offered,
        rwp: cfg.rwp,
        backing: req.backing,
        access_mode: cfg.access_mode,
        vmm_holds_uffd,
        have_memory_fd: req.memory_fd.is_some(),
        granules,
        custody_granules: (cfg.custody_max_bytes / granule).min(u32::MAX as u64) as u32,
        exact_dirty: cfg.exact_dirty,
        evict_after: cfg.evict_cold_after,
    });
    let custody_dir = cfg.state_dir.join("custody");
    std::fs::create_dir_all(&custody_dir)
        .map_err(|e| io::Error::new(e.kind(), format!("create {}: {e}", custody_dir.display())))?;
    let custody_path = custody_dir.join(format!("{}.custody", req.vm_id));
    if custody_path.exists() {
        return Err(IntakeError::Io(io::Error::new(
            io::ErrorKind::AlreadyExists,
            format!(
                "{} exists from an earlier agent run and may hold guest pages; it is left untouched \
                 (move it aside only once the VM it belongs to is gone)",
                custody_path.display()
            ),
        )));
    }
    let record = adopt::Record {
        vm_id: req.vm_id.clone(),
        name: req.name.clone(),
        labels: req.labels.clone(),
        handshake: req.handshake.to_owned(),
        vmm_pid: req.pid,
        vmm_start_ticks: adopt::start_ticks(req.pid).unwrap_or(0),
        backing: match req.backing {
            BackingKind::Anonymous => "anonymous",
            BackingKind::Shmem => "shmem",
            BackingKind::Hugetlb => "hugetlb",
        }
        .to_owned(),
        page_size: req.layout.page_size,
        regions: req
            .layout
            .regions
            .iter()
            .map(|r| adopt::RecordRegion {
                host_addr: r.host_addr,
                size: r.size,
                file_offset: r.file_offset,
            })
            .collect(),
        memory: match &req.memory_fd {
            Some(m) => {
                let st = nix::sys::stat::fstat(m).map_err(io::Error::from)?;
                Some((st.st_dev, st.st_ino))
            }
            None => None,
        },
        snapshot: req.snapshot.clone(),
    };
    let spec = TrackerSpec {
        name: format!("wset-{}", req.vm_id),
        uffd,
        regions: req
            .layout
            .regions
            .iter()
            .map(|r| Region {
                host_addr: r.host_addr,
                len: r.size,
                file_offset: r.file_offset,
            })
            .collect(),
        granule_bytes: granule,
        plan: p.clone(),
        memory_fd: req.memory_fd,
        source: req.source,
        pid: req.pid,
        interval: cfg.interval,
        cpu: registry.next_cpu(&cfg.cpus),
        spin: cfg.spin,
        custody_path: Some(custody_path),
        custody_granules: (cfg.custody_max_bytes / granule).min(u32::MAX as u64) as u32,
        seed: cfg.sample_seed.unwrap_or_else(|| now_ms() ^ req.pid as u64),
        started_ms: now_ms(),
        fault_budget: cfg.sample_fault_budget,
        max_stride: cfg.max_rearm_stride(),
        wake_waiters: req.adopted,
    };
    let handle = tokio::task::spawn_blocking(move || TrackerHandle::spawn(spec))
        .await
        .map_err(|e| io::Error::other(format!("tracker start panicked: {e}")))??;
    if let Some(w) = handle.pin_warning() {
        warn!(vm_id = %req.vm_id, "{w}");
    }
    let info = VmInfo {
        vm_id: req.vm_id.clone(),
        name: req.name,
        labels: req.labels,
        vmm_pid: req.pid as u32,
        memory_bytes: req.layout.total_bytes(),
        page_size: req.layout.page_size,
        granule_bytes: granule,
        handshake: req.handshake,
        plan: p.clone(),
    };
    let methods: Vec<&str> = p
        .methods()
        .into_iter()
        .map(wset_tracker::Method::name)
        .collect();
    let mut notes = p.notes.clone();
    if req.backing == BackingKind::Anonymous {
        let smaps = std::fs::read_to_string(format!("/proc/{}/smaps", req.pid)).unwrap_or_default();
        let thp = handshake::thp_bytes(&smaps, &req.layout);
        if thp > 0 && matches!(p.access, wset_tracker::Access::Rwp { .. }) {
            notes.push(format!(
                "{} MiB of guest memory is mapped with transparent huge pages; read/write-protect \
                 mode protects and reports them per 2 MiB, so accesses and writes there count \
                 whole huge pages",
                thp >> 20
            ));
        } else if thp > 0 {
            notes.push(format!(
                "{} MiB of guest memory is mapped with transparent huge pages; the kernel splits \
                 one when it is written, so writes are still tracked per 4 KiB",
                thp >> 20
            ));
        }
    }
    if let Err((e, handle)) = registry.insert(info, handle) {
        // Lost a race with a registration of the same id: undo ours.
        tokio::task::spawn_blocking(move || handle.stop())
            .await
            .ok();
        return Err(e.into());
    }
    // A restarted agent resumes from this (see `adopt`); without it the VM
    // is still tracked now, so a failure is only logged.
    if let Err(e) = adopt::save(&cfg.state_dir, &record) {
        warn!(vm_id = %req.vm_id, error = %e, "could not record the VM for re-adoption after a restart");
    }
    info!(
        vm_id = %req.vm_id,
        memory_bytes = req.layout.total_bytes(),
        methods = ?methods,
        features = %feature::names(features),
        notes = ?notes,
        "VM registered"
    );
    Ok(WsetReply {
        ok: true,
        vm_id: Some(req.vm_id),
        methods: methods.iter().map(|m| m.to_string()).collect(),
        granule_bytes: Some(granule),
        notes,
        ..Default::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cgroup_allow_list_matches_whole_path_components() {
        let cg = vec!["/kubepods.slice/pod-a/vmm".to_owned(), "/".to_owned()];
        let allow =
            |a: &[&str]| cgroup_allowed(&cg, &a.iter().map(|s| s.to_string()).collect::<Vec<_>>());
        assert!(allow(&[]));
        assert!(allow(&["/kubepods.slice"]));
        assert!(allow(&["/kubepods.slice/"]));
        assert!(allow(&["/kubepods.slice/pod-a/vmm"]));
        assert!(!allow(&["/kubepods"]));
        assert!(!allow(&["/system.slice", "/kubepods.slice/pod-b"]));
    }

    #[test]
    fn admission_refuses_past_the_burst_and_refills() {
        let a = Admission::new(1000.0, 3, 100);
        let held: Vec<_> = (0..3)
            .map(|_| a.admit().expect("within the burst"))
            .collect();
        assert!(a.admit().unwrap_err().contains("rate limit"));
        std::thread::sleep(Duration::from_millis(5));
        assert!(a.admit().is_ok());
        drop(held);
        let b = Admission::new(1000.0, 10, 1);
        let _one = b.admit().unwrap();
        assert!(b.admit().unwrap_err().contains("in progress"));
    }
}
