//! Putting pages back after an agent died with pages in custody.
//!
//! The custody file names the VMM's pid and the memfd's device and inode.
//! Recovery finds that memfd among the VMM's open files, takes the VMM's
//! userfaultfd with `pidfd_getfd(2)`, copies every held page home with
//! `UFFDIO_COPY` (which wakes a guest waiting on it), then removes our
//! write protection and unregisters the memfd's ranges, so that no page is
//! left waiting for a handler that is gone. The guest then runs on,
//! untracked, with every byte in place, until its VMM registers again.

#![forbid(unsafe_code)]

use std::fs::File;
use std::io;
use std::os::fd::RawFd;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::Path;

use crate::custody::read_held_pages;
use crate::uffd::{Resolve, Uffd};

/// What recovery of one custody file did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Recovered {
    /// Every held page is back in the guest (or was already there).
    Restored { pages: usize, vmm_pid: libc::pid_t },
    /// The VMM is gone; nothing can be written back, the file was removed.
    VmmGone { vmm_pid: libc::pid_t, pages: usize },
}

#[derive(Debug, thiserror::Error)]
pub enum RecoverError {
    #[error("read custody file {path}: {source}")]
    Read { path: String, source: io::Error },
    #[error(
        "VMM {pid} is alive but holds no file with device {dev} inode {ino} (its guest memory); {pages} pages stay in {path}"
    )]
    NoMemfd {
        pid: libc::pid_t,
        dev: u64,
        ino: u64,
        pages: usize,
        path: String,
    },
    #[error(
        "VMM {pid} holds no userfaultfd that covers its guest memory ({detail}); {pages} pages stay in {path}"
    )]
    NoUffd {
        pid: libc::pid_t,
        detail: String,
        pages: usize,
        path: String,
    },
    #[error(
        "copying page at offset {offset:#x} back into VMM {pid} failed: {source}; pages stay in {path}"
    )]
    Copy {
        pid: libc::pid_t,
        offset: u64,
        source: io::Error,
        path: String,
    },
}

pub use crate::sys::{pidfd_getfd, pidfd_open};

/// A shared mapping of the memfd in the VMM: `[start, end)` maps file
/// offset `offset`.
struct Vma {
    start: u64,
    end: u64,
    offset: u64,
}

fn memfd_vmas(pid: libc::pid_t, ino: u64) -> io::Result<Vec<Vma>> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/maps"))?;
    Ok(text
        .lines()
        .filter_map(|l| {
            let mut it = l.split_ascii_whitespace();
            let (range, perms, off, _dev, inode) =
                (it.next()?, it.next()?, it.next()?, it.next()?, it.next()?);
            if inode.parse::<u64>().ok()? != ino || perms.as_bytes().get(3) != Some(&b's') {
                return None;
            }
            let (s, e) = range.split_once('-')?;
            Some(Vma {
                start: u64::from_str_radix(s, 16).ok()?,
                end: u64::from_str_radix(e, 16).ok()?,
                offset: u64::from_str_radix(off, 16).ok()?,
            })
        })
        .collect())
}

/// Put back every page `path` holds, then remove it. See the module docs.
pub fn recover_custody_file(path: &Path) -> Result<Recovered, RecoverError> {
    let spath = path.display().to_string();
    let (h, pages) = read_held_pages(path).map_err(|source| RecoverError::Read {
        path: spath.clone(),
        source,
    })?;
    let pid = h.vmm_pid;
    let n = pages.len();
    let Ok(pidfd) = pidfd_open(pid) else {
        let _ = std::fs::remove_file(path);
        return Ok(Recovered::VmmGone {
            vmm_pid: pid,
            pages: n,
        });
    };
    // The memfd and the uffds among the VMM's open files.
    let mut memfd: Option<File> = None;
    let mut uffd_fds = Vec::new();
    if let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/fd")) {
        for e in dir.flatten() {
            let Some(fd) = e.file_name().to_str().and_then(|s| s.parse::<RawFd>().ok()) else {
                continue;
            };
            if std::fs::read_link(e.path())
                .is_ok_and(|p| p.as_os_str() == "anon_inode:[userfaultfd]")
            {
                uffd_fds.push(fd);
            } else if memfd.is_none()
                && std::fs::metadata(e.path())
                    .is_ok_and(|m| m.dev() == h.memory_dev && m.ino() == h.memory_ino)
            {
                memfd = std::fs::OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open(e.path())
                    .ok();
            }
        }
    }
    let Some(memfd) = memfd else {
        if !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = std::fs::remove_file(path);
            return Ok(Recovered::VmmGone {
                vmm_pid: pid,
                pages: n,
            });
        }
        return Err(RecoverError::NoMemfd {
            pid,
            dev: h.memory_dev,
            ino: h.memory_ino,
            pages: n,
            path: spath,
        });
    };
    let vmas = memfd_vmas(pid, h.memory_ino).unwrap_or_default();
    let addr_of = |off: u64| {
        vmas.iter()
            .find(|v| off >= v.offset && off < v.offset + (v.end - v.start))
            .map(|v| v.start + (off - v.offset))
    };
    // Find the uffd that covers the memory: the one a copy succeeds on.
    let mut uffd: Option<Uffd> = None;
    let mut detail = format!("{} userfaultfd(s) open", uffd_fds.len());
    for (off, data) in &pages {
        let Some(addr) = addr_of(*off) else {
            // Not mapped any more: the data goes straight into the file.
            memfd
                .write_all_at(data, *off)
                .map_err(|source| RecoverError::Copy {
                    pid,
                    offset: *off,
                    source,
                    path: spath.clone(),
                })?;
            continue;
        };
        let try_copy = |u: &Uffd| u.copy(addr, data, false);
        if let Some(u) = &uffd {
            match try_copy(u) {
                Ok(Resolve::Done | Resolve::Exists) => continue,
                Ok(r) => detail = format!("copy answered {r:?}"),
                Err(e) => detail = format!("copy failed: {e}"),
            }
            return Err(RecoverError::NoUffd {
                pid,
                detail,
                pages: n,
                path: spath,
            });
        }
        for &fd in &uffd_fds {
            let Ok(owned) = pidfd_getfd(&pidfd, fd) else {
                continue;
            };
            let u = Uffd::from_owned(owned);
            if matches!(try_copy(&u), Ok(Resolve::Done | Resolve::Exists)) {
                uffd = Some(u);
                break;
            }
        }
        if uffd.is_none() {
            return Err(RecoverError::NoUffd {
                pid,
                detail,
                pages: n,
                path: spath,
            });
        }
    }
    // No handler is left: unprotect and unregister the memory, so that
    // never-populated pages fill as ordinary shared memory and writes go through.
    if let Some(u) = &uffd {
        for v in &vmas {
            let _ = u.write_protect(v.start, v.end - v.start, false, false);
            let _ = u.unregister(v.start, v.end - v.start);
        }
    }
    let _ = std::fs::remove_file(path);
    Ok(Recovered::Restored {
        pages: n,
        vmm_pid: pid,
    })
}
