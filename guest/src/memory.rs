//! Guest memory for the test VMMs and the tracker's real-kernel tests:
//! anonymous or memfd-backed, with a known fill pattern, the checksum the
//! KVM guest program computes, and the expected contents to compare with.

use std::collections::BTreeMap;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

pub const PAGE: u64 = 4096;

/// How the test VMM backs guest memory.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize, clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum BackingArg {
    Anon,
    Memfd,
    /// A hugetlbfs memfd with 2 MiB pages (needs /proc/sys/vm/nr_hugepages).
    Hugetlb,
    /// Private anonymous memory advised for transparent huge pages.
    Thp,
}

/// The 2 MiB huge page size.
pub const HUGE_2M: u64 = 2 << 20;

/// The command-line spelling (`memfd`, ...).
impl std::fmt::Display for BackingArg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            BackingArg::Anon => "anon",
            BackingArg::Memfd => "memfd",
            BackingArg::Hugetlb => "hugetlb",
            BackingArg::Thp => "thp",
        })
    }
}

impl BackingArg {
    pub fn page_size(self) -> u64 {
        if self == BackingArg::Hugetlb {
            HUGE_2M
        } else {
            PAGE
        }
    }
}

/// A mapping of guest memory in the test VMM.
#[derive(Debug)]
pub struct GuestMemory {
    ptr: *mut u8,
    len: usize,
    memfd: Option<OwnedFd>,
}

// SAFETY: the mapping is process-wide memory; the test VMM coordinates its
// threads (the vCPU or toucher thread and the main thread) itself.
unsafe impl Send for GuestMemory {}
// SAFETY: as above; all accesses are volatile loads and stores.
unsafe impl Sync for GuestMemory {}

impl GuestMemory {
    pub fn new(backing: BackingArg, len: usize) -> std::io::Result<Self> {
        let (flags, fd) = match backing {
            BackingArg::Anon | BackingArg::Thp => (libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, None),
            BackingArg::Memfd | BackingArg::Hugetlb => {
                let huge = if backing == BackingArg::Hugetlb {
                    libc::MFD_HUGETLB | libc::MFD_HUGE_2MB
                } else {
                    0
                };
                // SAFETY: memfd_create with a static C string.
                let fd =
                    unsafe { libc::memfd_create(c"wset-guest".as_ptr(), libc::MFD_CLOEXEC | huge) };
                if fd < 0 {
                    let e = std::io::Error::last_os_error();
                    return Err(std::io::Error::new(e.kind(), format!("memfd_create: {e}")));
                }
                // SAFETY: a fresh fd we own.
                let fd = unsafe { OwnedFd::from_raw_fd(fd) };
                // SAFETY: ftruncate on our own fd.
                if unsafe { libc::ftruncate(fd.as_raw_fd(), len as libc::off_t) } != 0 {
                    let e = std::io::Error::last_os_error();
                    let hint = if huge != 0 {
                        " (reserve huge pages: echo N > /proc/sys/vm/nr_hugepages)"
                    } else {
                        ""
                    };
                    return Err(std::io::Error::new(
                        e.kind(),
                        format!("size guest memory: {e}{hint}"),
                    ));
                }
                (libc::MAP_SHARED, Some(fd))
            }
        };
        let raw = fd.as_ref().map_or(-1, |f| f.as_raw_fd());
        // SAFETY: a fresh mapping (anonymous, or of our memfd).
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                flags,
                raw,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            let e = std::io::Error::last_os_error();
            return Err(std::io::Error::new(
                e.kind(),
                format!("map guest memory: {e}"),
            ));
        }
        let advice = match backing {
            BackingArg::Hugetlb => None,
            BackingArg::Thp => Some(libc::MADV_HUGEPAGE),
            // Keep THP out of the way: these guests count 4 KiB pages.
            BackingArg::Anon | BackingArg::Memfd => Some(libc::MADV_NOHUGEPAGE),
        };
        if let Some(advice) = advice {
            // SAFETY: advising our own mapping.
            unsafe { libc::madvise(p, len, advice) };
        }
        Ok(Self {
            ptr: p.cast(),
            len,
            memfd: fd,
        })
    }

    pub fn addr(&self) -> u64 {
        self.ptr as u64
    }
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    pub fn pages(&self) -> u32 {
        (self.len as u64 / PAGE) as u32
    }
    pub fn memfd(&self) -> Option<&OwnedFd> {
        self.memfd.as_ref()
    }

    pub fn read_u32(&self, off: u64) -> u32 {
        assert!(off as usize + 4 <= self.len);
        // SAFETY: in bounds (asserted); volatile so the access happens.
        unsafe { std::ptr::read_volatile(self.ptr.add(off as usize).cast::<u32>()) }
    }

    pub fn write_u32(&self, off: u64, v: u32) {
        assert!(off as usize + 4 <= self.len);
        // SAFETY: in bounds (asserted).
        unsafe { std::ptr::write_volatile(self.ptr.add(off as usize).cast::<u32>(), v) }
    }

    /// Unmap pages `[from, to)` from the VMM (they must not be touched again).
    pub fn unmap(&self, from: u32, to: u32) -> std::io::Result<()> {
        let (off, len) = (from as u64 * PAGE, (to - from) as u64 * PAGE);
        assert!(off + len <= self.len as u64);
        // SAFETY: unmapping part of our own mapping; the caller promises not
        // to touch it again (Drop unmapping it once more is harmless).
        let rc = unsafe { libc::munmap(self.ptr.add(off as usize).cast(), len as usize) };
        if rc != 0 {
            Err(std::io::Error::last_os_error())
        } else {
            Ok(())
        }
    }

    /// `MADV_DONTNEED` pages `[from, to)`, as a balloon driver's VMM does.
    pub fn discard(&self, from: u32, to: u32) -> std::io::Result<()> {
        let (off, len) = (from as u64 * PAGE, (to - from) as u64 * PAGE);
        assert!(off + len <= self.len as u64);
        // SAFETY: advising a range of our own mapping.
        let rc = unsafe {
            libc::madvise(
                self.ptr.add(off as usize).cast(),
                len as usize,
                libc::MADV_DONTNEED,
            )
        };
        if rc != 0 {
            Err(std::io::Error::last_os_error())
        } else {
            Ok(())
        }
    }

    pub fn write_bytes(&self, off: u64, bytes: &[u8]) {
        assert!(off as usize + bytes.len() <= self.len);
        // SAFETY: in bounds (asserted); the source is a separate buffer.
        unsafe {
            std::ptr::copy_nonoverlapping(bytes.as_ptr(), self.ptr.add(off as usize), bytes.len())
        }
    }

    /// Fill pages `[from, to)` with the pattern for `seed`.
    pub fn fill(&self, seed: u32, from: u32, to: u32) {
        for w in (from as u64 * PAGE / 4)..(to as u64 * PAGE / 4) {
            self.write_u32(w * 4, fill_word(seed, w));
        }
    }

    /// How many dwords of the whole mapping differ from `expected` (reads go
    /// through whatever serves this memory's faults).
    pub fn mismatches(&self, expected: &Expected) -> usize {
        (0..self.len as u64 / 4)
            .filter(|&w| self.read_u32(w * 4) != expected.word(w))
            .count()
    }

    /// The checksum of pages `[from, to)`, one dword every `stride` bytes,
    /// as the guest program computes it.
    pub fn checksum(&self, from: u32, to: u32, stride: u64) -> u32 {
        let mut c = 0u32;
        let mut off = from as u64 * PAGE;
        while off < to as u64 * PAGE {
            c = checksum_step(c, self.read_u32(off));
            off += stride;
        }
        c
    }
}

impl Drop for GuestMemory {
    fn drop(&mut self) {
        // SAFETY: unmapping our own mapping.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

/// The fill value of dword `w` (a global dword index).
pub fn fill_word(seed: u32, w: u64) -> u32 {
    (w as u32).wrapping_mul(2_654_435_761) ^ seed
}

/// The value the guest's write op stores at the first dword of a page.
pub fn written_word(seed: u32, page: u32) -> u32 {
    (page as u64 * PAGE) as u32 ^ seed
}

pub fn checksum_step(c: u32, v: u32) -> u32 {
    c.wrapping_add(v).rotate_left(1)
}

/// What the memory should hold: the fill pattern (or zeros), with the first
/// dword of written pages overridden.
#[derive(Clone, Debug, Default)]
pub struct Expected {
    pub fill_seed: Option<u32>,
    pub overrides: BTreeMap<u32, u32>,
    /// Pages dropped with MADV_DONTNEED on private memory: they read as zeros.
    pub zeroed: std::collections::BTreeSet<u32>,
}

impl Expected {
    pub fn word(&self, w: u64) -> u32 {
        let page = (w * 4 / PAGE) as u32;
        if (w * 4).is_multiple_of(PAGE)
            && let Some(v) = self.overrides.get(&page)
        {
            return *v;
        }
        if self.zeroed.contains(&page) {
            return 0;
        }
        self.fill_seed.map_or(0, |s| fill_word(s, w))
    }

    pub fn checksum(&self, from: u32, to: u32, stride: u64) -> u32 {
        let mut c = 0u32;
        let mut off = from as u64 * PAGE;
        while off < to as u64 * PAGE {
            c = checksum_step(c, self.word(off / 4));
            off += stride;
        }
        c
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksum_matches_expectation() {
        let m = GuestMemory::new(BackingArg::Memfd, 64 * 1024).unwrap();
        m.fill(9, 0, 16);
        m.write_u32(3 * PAGE, written_word(5, 3));
        let mut e = Expected {
            fill_seed: Some(9),
            ..Default::default()
        };
        e.overrides.insert(3, written_word(5, 3));
        assert_eq!(m.checksum(0, 16, 4), e.checksum(0, 16, 4));
        assert_eq!(m.checksum(0, 16, 256), e.checksum(0, 16, 256));
        e.overrides.insert(4, 1);
        assert_ne!(m.checksum(0, 16, 4), e.checksum(0, 16, 4));
    }
}
