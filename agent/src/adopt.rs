//! Resuming tracking after the agent restarts (a crash, an OOM kill, an
//! upgrade).
//!
//! Every registered VM has a record under `<state dir>/vms/`: who its VMM
//! is (pid and start time, so a reused pid is not mistaken for it), its
//! layout, its backing (and the memfd's device and inode), its snapshot
//! file. A restarted agent, after putting back any pages a dead one left in
//! custody, takes each live VMM's own copy of its userfaultfd (and memfd)
//! with `pidfd_getfd(2)` and starts a tracker on them as at registration.
//! The tracker wakes every thread of the guest that waits on a fault whose
//! message the dead agent read but never answered; the threads fault
//! again and are served. RWP VMs frozen by a harvest in flight are thawed
//! when the new tracker sets the uffd's mode.
//!
//! A VMM that kept no copy of its uffd cannot be re-adopted: the kernel
//! dropped the registration when the agent's copy closed, the guest runs
//! on untracked, and it must register again. Records go when their VM
//! ends; a clean stop keeps them, so an upgraded agent resumes too.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, Write as _};
use std::os::fd::{OwnedFd, RawFd};

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use wset_tracker::recover::{pidfd_getfd, pidfd_open};

use serde::{Deserialize, Serialize};

use tracing::{info, warn};
use wset_proto::ids::VmId;
use wset_tracker::BackingKind;

use crate::config::Config;
use crate::handshake::{HandshakeKind, Layout, Region, WsetReply};
use crate::intake::{self, IntakeError};
use crate::registry::Registry;

/// What the agent must know to track a VM again without its VMM's help.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    pub vm_id: VmId,
    pub name: String,
    pub labels: BTreeMap<String, String>,
    /// `firecracker` or `wset.v1`.
    pub handshake: String,
    pub vmm_pid: libc::pid_t,
    /// The VMM's start time (`/proc/<pid>/stat` field 22), against pid reuse.
    pub vmm_start_ticks: u64,
    /// `anonymous`, `shmem` or `hugetlb` ([`backing_name`]).
    pub backing: String,
    pub page_size: u64,
    pub regions: Vec<RecordRegion>,
    /// Device and inode of the memfd (shmem and hugetlb backings).
    pub memory: Option<(u64, u64)>,
    /// The memory file a Firecracker snapshot's pages are served from.
    pub snapshot: Option<PathBuf>,
}

/// A region as a record stores it on disk (the JSON names its length
/// `size`); [`Region`] everywhere else.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecordRegion {
    pub host_addr: u64,
    pub size: u64,
    pub file_offset: u64,
}

impl From<Region> for RecordRegion {
    fn from(r: Region) -> Self {
        Self {
            host_addr: r.host_addr,
            size: r.len,
            file_offset: r.file_offset,
        }
    }
}

impl From<RecordRegion> for Region {
    fn from(r: RecordRegion) -> Self {
        Self {
            host_addr: r.host_addr,
            len: r.size,
            file_offset: r.file_offset,
        }
    }
}

/// How a record names a backing.
pub fn backing_name(b: BackingKind) -> &'static str {
    match b {
        BackingKind::Anonymous => "anonymous",
        BackingKind::Shmem => "shmem",
        BackingKind::Hugetlb => "hugetlb",
    }
}

/// A record's backing; an unknown name is anonymous memory (nothing to
/// reclaim but the uffd).
pub fn backing_from_name(name: &str) -> BackingKind {
    match name {
        "shmem" => BackingKind::Shmem,
        "hugetlb" => BackingKind::Hugetlb,
        _ => BackingKind::Anonymous,
    }
}

impl Record {
    pub fn layout(&self) -> Layout {
        Layout {
            page_size: self.page_size,
            regions: self.regions.iter().copied().map(Region::from).collect(),
        }
    }
}

fn dir(state_dir: &Path) -> PathBuf {
    state_dir.join("vms")
}

fn path(state_dir: &Path, vm_id: &VmId) -> PathBuf {
    dir(state_dir).join(format!("{vm_id}.json"))
}

/// Write the record (a new file renamed over the old, synced), so a crash
/// leaves either the old record or the new one.
pub fn save(state_dir: &Path, r: &Record) -> io::Result<()> {
    let d = dir(state_dir);
    std::fs::create_dir_all(&d)
        .map_err(|e| io::Error::new(e.kind(), format!("create {}: {e}", d.display())))?;
    let p = path(state_dir, &r.vm_id);
    let tmp = d.join(format!(".{}.tmp", r.vm_id));
    let mut f = File::create(&tmp)
        .map_err(|e| io::Error::new(e.kind(), format!("create {}: {e}", tmp.display())))?;
    f.write_all(&serde_json::to_vec_pretty(r).expect("a record serializes"))?;
    f.sync_all()?;
    std::fs::rename(&tmp, &p)
        .map_err(|e| io::Error::new(e.kind(), format!("rename to {}: {e}", p.display())))?;
    File::open(&d)?.sync_all()
}

/// Forget a VM that ended.
pub fn remove(state_dir: &Path, vm_id: &VmId) {
    let _ = std::fs::remove_file(path(state_dir, vm_id));
}

/// Why a VM record could not be read.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    #[error("read {}: {source}", path.display())]
    Read { path: PathBuf, source: io::Error },
    #[error("parse {}: {source}", path.display())]
    Parse {
        path: PathBuf,
        source: serde_json::Error,
    },
}

/// Every record, with the ones that cannot be read named.
pub fn load_all(state_dir: &Path) -> Vec<Result<Record, RecordError>> {
    let Ok(rd) = std::fs::read_dir(dir(state_dir)) else {
        return Vec::new();
    };
    let mut out: Vec<Result<Record, RecordError>> = rd
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .map(|path| match std::fs::read(&path) {
            Err(source) => Err(RecordError::Read { path, source }),
            Ok(b) => {
                serde_json::from_slice(&b).map_err(|source| RecordError::Parse { path, source })
            }
        })
        .collect();
    out.sort_by(|a, b| match (a, b) {
        (Ok(a), Ok(b)) => a.vm_id.cmp(&b.vm_id),
        _ => std::cmp::Ordering::Equal,
    });
    out
}

/// The start time of `pid` in clock ticks after boot, if it runs.
pub fn start_ticks(pid: libc::pid_t) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 2..];
    // Field 22 of proc(5); `rest` starts at field 3.
    rest.split_whitespace().nth(22 - 3)?.parse().ok()
}

/// Why a VM could not be re-adopted.
#[derive(Debug, thiserror::Error)]
pub enum AdoptError {
    #[error("its VMM (pid {pid}) is gone")]
    VmmGone { pid: libc::pid_t },
    #[error("pid {pid} is now another process (the VMM is gone)")]
    PidReused { pid: libc::pid_t },
    #[error(
        "its VMM (pid {pid}) keeps no copy of its userfaultfd: the kernel dropped the \
         registration with the agent's copy; the guest runs untracked until the VMM registers again"
    )]
    NoUffd { pid: libc::pid_t },
    #[error(
        "its VMM (pid {pid}) no longer holds the guest memory file (device {dev}, inode {ino})"
    )]
    NoMemfd {
        pid: libc::pid_t,
        dev: u64,
        ino: u64,
    },
    #[error("taking fd {fd} of pid {pid}: {source} (the agent needs CAP_SYS_PTRACE)")]
    GetFd {
        pid: libc::pid_t,
        fd: RawFd,
        source: io::Error,
    },
    #[error("the snapshot file {path}: {source}")]
    Snapshot { path: String, source: io::Error },
}

/// The VMM's file descriptors a tracker needs again: every userfaultfd it
/// holds (the one covering the guest is found by registering), the memfd.
#[derive(Debug)]
pub struct Reclaimed {
    pub uffds: Vec<OwnedFd>,
    pub memory_fd: Option<OwnedFd>,
    pub source: Option<File>,
}

/// Take what the VM's tracker needs from its VMM.
pub fn reclaim(r: &Record) -> Result<Reclaimed, AdoptError> {
    let pid = r.vmm_pid;
    let pidfd = pidfd_open(pid).map_err(|_| AdoptError::VmmGone { pid })?;
    match start_ticks(pid) {
        None => return Err(AdoptError::VmmGone { pid }),
        Some(t) if t != r.vmm_start_ticks => return Err(AdoptError::PidReused { pid }),
        Some(_) => {}
    }
    let mut uffds = Vec::new();
    let mut memory_fd = None;
    let entries =
        std::fs::read_dir(format!("/proc/{pid}/fd")).map_err(|_| AdoptError::VmmGone { pid })?;
    for e in entries.flatten() {
        let Some(fd) = e.file_name().to_str().and_then(|s| s.parse::<RawFd>().ok()) else {
            continue;
        };
        let take =
            |fd| pidfd_getfd(&pidfd, fd).map_err(|source| AdoptError::GetFd { pid, fd, source });
        if std::fs::read_link(e.path()).is_ok_and(|p| p.as_os_str() == "anon_inode:[userfaultfd]") {
            uffds.push(take(fd)?);
        } else if let Some((dev, ino)) = r.memory
            && memory_fd.is_none()
            && std::fs::metadata(e.path()).is_ok_and(|m| m.dev() == dev && m.ino() == ino)
        {
            memory_fd = Some(take(fd)?);
        }
    }
    if uffds.is_empty() {
        return Err(AdoptError::NoUffd { pid });
    }
    if let (Some((dev, ino)), None) = (r.memory, &memory_fd) {
        return Err(AdoptError::NoMemfd { pid, dev, ino });
    }
    let source = match &r.snapshot {
        Some(p) => Some(File::open(p).map_err(|source| AdoptError::Snapshot {
            path: p.display().to_string(),
            source,
        })?),
        None => None,
    };
    Ok(Reclaimed {
        uffds,
        memory_fd,
        source,
    })
}

/// Resume what a previous agent left: put back the pages of every custody
/// file it left (it was killed), then track again every VM it recorded
/// whose VMM still runs and holds its userfaultfd. The one path by which
/// VMs come back after a restart.
pub async fn resume(cfg: &Config, registry: &Registry, offered: u64) -> io::Result<()> {
    let dir = cfg.state_dir.clone();
    tokio::task::spawn_blocking(move || recover_custody(&dir))
        .await
        .map_err(|e| io::Error::other(format!("custody recovery task: {e}")))?;
    readopt(cfg, registry, offered).await;
    Ok(())
}

/// Put back the pages of every custody file in `state_dir` (left by an
/// agent that was killed), logging each outcome.
fn recover_custody(state_dir: &Path) {
    use wset_tracker::recover::{Recovered, recover_custody_file};
    let Ok(dir) = std::fs::read_dir(state_dir.join("custody")) else {
        return;
    };
    for e in dir.flatten() {
        let path = e.path();
        if path.extension().is_none_or(|x| x != "custody") {
            continue;
        }
        match recover_custody_file(&path) {
            Ok(Recovered::Restored { pages, vmm_pid }) => {
                info!(file = %path.display(), pages, vmm_pid, "pages left by a previous agent put back; the VM runs untracked until its VMM registers again")
            }
            Ok(Recovered::VmmGone { vmm_pid, pages }) => {
                warn!(file = %path.display(), pages, vmm_pid, "custody file of a VMM that is gone removed")
            }
            Err(e) => warn!(error = %e, "custody recovery failed; the file is kept"),
        }
    }
}

/// Track again every VM a previous agent recorded whose VMM still runs
/// and holds its userfaultfd (see `adopt`); forget the others.
async fn readopt(cfg: &Config, registry: &Registry, offered: u64) {
    let t0 = std::time::Instant::now();
    let mut adopted = 0;
    for r in load_all(&cfg.state_dir) {
        let rec = match r {
            Ok(rec) => rec,
            Err(e) => {
                warn!(error = %e, "unreadable VM record left as it is");
                continue;
            }
        };
        let t = std::time::Instant::now();
        match adopt(&rec, cfg, registry, offered).await {
            Ok(reply) => {
                adopted += 1;
                info!(
                    vm_id = %rec.vm_id,
                    vmm_pid = rec.vmm_pid,
                    methods = ?reply.methods,
                    ms = t.elapsed().as_millis() as u64,
                    "VM re-adopted: tracking resumed after an agent restart"
                );
            }
            Err(e) => {
                remove(&cfg.state_dir, &rec.vm_id);
                warn!(vm_id = %rec.vm_id, vmm_pid = rec.vmm_pid, error = %e, "VM not re-adopted; its record is removed");
            }
        }
    }
    if adopted > 0 {
        info!(
            vms = adopted,
            ms = t0.elapsed().as_millis() as u64,
            "re-adoption done"
        );
    }
}

/// Track a VM again from its record (after an agent restart): take the
/// VMM's userfaultfd and memfd, and start as at registration. With several
/// uffds in the VMM, the one the guest's ranges are registered with (or
/// that may register them) is the one whose registration succeeds.
async fn adopt(
    rec: &Record,
    cfg: &Config,
    registry: &Registry,
    offered: u64,
) -> Result<WsetReply, IntakeError> {
    let got = tokio::task::spawn_blocking({
        let rec = rec.clone();
        move || reclaim(&rec)
    })
    .await
    .map_err(|e| io::Error::other(format!("re-adoption task: {e}")))?
    .map_err(|e| IntakeError::Io(io::Error::other(e.to_string())))?;
    let backing = backing_from_name(&rec.backing);
    let handshake = HandshakeKind::from_name(&rec.handshake);
    let mut last = None;
    for uffd in got.uffds {
        let req = intake::Request {
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
        match intake::track(req, cfg, registry, offered).await {
            Err(e @ IntakeError::Tracker(wset_tracker::TrackerError::Register { .. })) => {
                last = Some(e);
            }
            other => return other,
        }
    }
    Err(last.expect("reclaim returns at least one uffd"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record() -> Record {
        Record {
            vm_id: VmId::parse("web-1").unwrap(),
            name: "web".into(),
            labels: [("tier".to_owned(), "front".to_owned())].into(),
            handshake: "wset.v1".into(),
            vmm_pid: std::process::id().cast_signed(),
            vmm_start_ticks: start_ticks(std::process::id().cast_signed()).unwrap(),
            backing: "shmem".into(),
            page_size: 4096,
            regions: vec![RecordRegion {
                host_addr: 0x7f00_0000_0000,
                size: 1 << 20,
                file_offset: 0,
            }],
            memory: Some((1, 2)),
            snapshot: None,
        }
    }

    #[test]
    fn records_round_trip_and_go() {
        let d = std::env::temp_dir().join(format!("wset-adopt-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        let r = record();
        save(&d, &r).unwrap();
        std::fs::write(dir(&d).join("broken.json"), b"{").unwrap();
        let all = load_all(&d);
        assert_eq!(all.len(), 2);
        assert!(all.iter().any(|x| x.as_ref().is_ok_and(|x| *x == r)));
        assert!(all.iter().any(|x| x.as_ref().is_err_and(
            |e| matches!(e, RecordError::Parse { path, .. } if path.ends_with("broken.json"))
        )));
        assert_eq!(r.layout().total_bytes(), 1 << 20);
        remove(&d, &VmId::parse("web-1").unwrap());
        assert_eq!(load_all(&d).len(), 1);
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn a_reused_pid_or_missing_uffd_is_named() {
        let mut r = record();
        r.vmm_start_ticks += 1;
        assert!(matches!(reclaim(&r), Err(AdoptError::PidReused { .. })));
        // This test process holds no userfaultfd.
        let r = Record {
            memory: None,
            ..record()
        };
        assert!(matches!(reclaim(&r), Err(AdoptError::NoUffd { .. })));
        let r = Record {
            vmm_pid: libc::pid_t::MAX,
            ..record()
        };
        assert!(matches!(reclaim(&r), Err(AdoptError::VmmGone { .. })));
    }
}
