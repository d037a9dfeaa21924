//! From a parsed handshake and its fds to a running tracker: the fds and
//! the VMM's mappings checked, the tracking methods planned, the VM's
//! record saved for re-adoption, the tracker started and the VM added to
//! the registry. Re-adoption after a restart (`adopt.rs`) enters at
//! [`track`] with the fds it reclaimed.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::Path;
use std::time::Duration;

use tracing::{info, warn};
use wset_proto::ids::VmId;
use wset_tracker::plan::{self, BackingKind, PlanInput};
use wset_tracker::uffd::{self, feature};
use wset_tracker::{TrackerHandle, TrackerSpec, Uffd};

use super::IntakeError;
use crate::adopt;
use crate::config::{Config, SocketConfig};
use crate::handshake::{self, Backing, HandshakeKind, Hello, Layout, WsetReply};
use crate::now_ms;
use crate::prefetch;
use crate::registry::{Registry, VmInfo};

fn describe_fd(fd: &OwnedFd) -> String {
    std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd()))
        .map(|p| p.display().to_string())
        .unwrap_or_else(|e| format!("unreadable: {e}"))
}

fn read_maps(pid: libc::pid_t) -> Result<Vec<handshake::MapsEntry>, IntakeError> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/maps"))
        .map_err(|source| IntakeError::Maps { pid, source })?;
    Ok(handshake::parse_maps(&text))
}

pub(super) async fn register(
    hello: Hello,
    fds: Vec<OwnedFd>,
    pid: libc::pid_t,
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
            handshake::check_mapped(&layout, &read_maps(pid)?, None)?;
            let source = match &sock.snapshot {
                Some(path) => Some(open_snapshot(path, &layout)?),
                None => None,
            };
            let n = registry
                .list()
                .iter()
                .filter(|v| v.info.vmm_pid == pid)
                .count();
            let vm_id = handshake::check_vm_id(&if n == 0 {
                format!("fc-{pid}")
            } else {
                format!("fc-{pid}-{n}")
            })?;
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
                // Firecracker backs guest memory with hugetlbfs when its
                // page size says so (`huge_pages: "2M"`).
                backing: if layout.page_size > 4096 {
                    BackingKind::Hugetlb
                } else {
                    BackingKind::Anonymous
                },
                layout,
                uffd: uffd_fd,
                memory_fd: None,
                source,
                snapshot: sock.snapshot.clone(),
                handshake: HandshakeKind::Firecracker,
                adopted: false,
            };
            track(req, cfg, registry, offered).await
        }
        Hello::WsetRegister(h) => {
            let backing = h
                .backing
                .ok_or(handshake::HandshakeError::MissingField("backing"))?;
            let vm_id = handshake::check_vm_id(h.vm_id.as_deref().unwrap_or(&format!("vm-{pid}")))?;
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
            handshake::check_mapped(&layout, &read_maps(pid)?, ino)?;
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
                handshake: HandshakeKind::WsetV1,
                adopted: false,
            };
            track(req, cfg, registry, offered).await
        }
    }
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
        let end = r.file_offset + r.len;
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
        .map(|r| r.file_offset + r.len)
        .max()
        .unwrap_or(0);
    if size < need {
        return Err(err(format!(
            "it is {size} bytes but the regions need {need}"
        )));
    }
    Ok(f)
}

pub(crate) struct Request {
    pub(crate) vm_id: VmId,
    pub(crate) name: String,
    pub(crate) labels: std::collections::BTreeMap<String, String>,
    pub(crate) pid: libc::pid_t,
    pub(crate) layout: Layout,
    pub(crate) backing: BackingKind,
    pub(crate) uffd: OwnedFd,
    pub(crate) memory_fd: Option<OwnedFd>,
    pub(crate) source: Option<std::fs::File>,
    /// Where `source` was opened from (kept so a restarted agent reopens it).
    pub(crate) snapshot: Option<std::path::PathBuf>,
    pub(crate) handshake: HandshakeKind,
    /// Taken over from an earlier agent run: threads may wait on faults its
    /// tracker read and never answered.
    pub(crate) adopted: bool,
}

/// Choose methods, start the tracker, and add the VM to the registry.
pub(crate) async fn track(
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
    let mut p = plan::plan(PlanInput {
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
        soft_dirty: wset_tracker::sys::soft_dirty_supported(),
        missing_registered: req.handshake == HandshakeKind::Firecracker,
        sync_write_protect: cfg.sync_write_protect,
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
        handshake: req.handshake.as_str().to_owned(),
        vmm_pid: req.pid,
        vmm_start_ticks: adopt::start_ticks(req.pid).unwrap_or(0),
        backing: adopt::backing_name(req.backing).to_owned(),
        page_size: req.layout.page_size,
        regions: req
            .layout
            .regions
            .iter()
            .copied()
            .map(adopt::RecordRegion::from)
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
    let restore = Restore {
        vm_id: &req.vm_id,
        source: req.source.as_ref(),
        snapshot: req.snapshot.as_deref(),
        adopted: req.adopted,
    };
    let (prefetch, probes, recording) =
        restore_prefetch(&restore, cfg, granule, granules, &mut p.notes);
    let spec = TrackerSpec {
        name: format!("wset-{}", req.vm_id),
        uffd,
        regions: req.layout.regions.clone(),
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
        prefetch,
        probes,
        record: recording,
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
        vmm_pid: req.pid,
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
        vm_id: Some(req.vm_id.into_string()),
        methods: methods.iter().map(|m| m.to_string()).collect(),
        granule_bytes: Some(granule),
        notes,
        ..Default::default()
    })
}

/// What `restore_prefetch` needs of a registration.
struct Restore<'a> {
    vm_id: &'a VmId,
    source: Option<&'a std::fs::File>,
    snapshot: Option<&'a Path>,
    adopted: bool,
}

/// A restore from a snapshot file: what to prefetch (learned from earlier
/// restores of the same file) and where to record this one, with a note
/// saying so. Nothing for other VMs, or when prefetch is off.
fn restore_prefetch(
    req: &Restore<'_>,
    cfg: &Config,
    granule: u64,
    granules: u32,
    notes: &mut Vec<String>,
) -> (Vec<u32>, Vec<u32>, Option<(std::path::PathBuf, Duration)>) {
    let (Some(policy), Some(file), Some(path)) = (&cfg.prefetch, req.source, req.snapshot) else {
        return (Vec::new(), Vec::new(), None);
    };
    if req.adopted {
        notes.push(
            "restore prefetch not resumed: a restarted agent took the VM over part of the way \
             through its restore"
                .into(),
        );
        return (Vec::new(), Vec::new(), None);
    }
    let prepared = prefetch::identity(file, path).and_then(|id| {
        prefetch::Store::new(&cfg.state_dir, &id).prepare(
            granules,
            granule,
            policy,
            req.vm_id.as_str(),
        )
    });
    let p = match prepared {
        Ok(p) => p,
        Err(e) => {
            warn!(vm_id = %req.vm_id, error = %e, "restore prefetch off for this VM");
            notes.push(format!("restore prefetch off for this VM: {e}"));
            return (Vec::new(), Vec::new(), None);
        }
    };
    let span = cfg.prefetch_record;
    let plan = &p.plan;
    notes.push(if plan.order.is_empty() {
        format!(
            "restore prefetch: nothing learned for this snapshot yet ({} restores folded in; a \
             page joins once touched in {} of the last {} restores that saw it); recording \
             this restore's first touches for {}",
            p.restores,
            policy.min_seen,
            policy.history,
            wset_serve::cli::format_duration(span)
        )
    } else {
        format!(
            "restore prefetch: {} pages ({} MiB) copied in ahead of the guest in first-touch \
             order, learned from {} restores (touched in {} of the last {} that saw them); {} of \
             the set's {} withheld to be seen on demand{}; recording this restore for {}",
            plan.order.len(),
            (plan.order.len() as u64 * granule) >> 20,
            p.restores,
            policy.min_seen,
            policy.history,
            plan.withheld,
            plan.members,
            if plan.over_budget > 0 {
                format!(", {} over --prefetch-max-bytes", plan.over_budget)
            } else {
                String::new()
            },
            wset_serve::cli::format_duration(span)
        )
    });
    if let Some(f) = p.last
        && let Some(share) = f.untouched_share()
    {
        notes.push(format!(
            "restore prefetch, last restore: {} pages prefetched, {} faulted in; of the {} pages \
             of the set it left to demand, {} went untouched, so an estimated {:.1}% of what it \
             prefetched was not needed",
            f.prefetched,
            f.touched,
            f.probes,
            f.probes_untouched,
            share * 100.0
        ));
    }
    (
        plan.order.clone(),
        plan.probes.clone(),
        Some((p.record_path, span)),
    )
}
