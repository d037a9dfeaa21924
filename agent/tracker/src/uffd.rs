//! userfaultfd and PAGEMAP_SCAN bindings: the kernel structs with layout
//! asserts, the ioctl numbers, and thin safe wrappers that return `io::Error`.
//!
//! The constants come from the kernel's UAPI headers (`linux/userfaultfd.h`,
//! `linux/fs.h`) up to Linux 7.3, because the build host's headers (Debian 12:
//! 6.1) lack WP_ASYNC, PAGEMAP_SCAN and RWP.

use std::io;
use std::mem::size_of;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

/// `UFFD_API`.
pub const UFFD_API: u64 = 0xAA;

/// `UFFD_FEATURE_*` bits of `uffdio_api.features`.
pub mod feature {
    pub const PAGEFAULT_FLAG_WP: u64 = 1 << 0;
    pub const EVENT_FORK: u64 = 1 << 1;
    pub const EVENT_REMAP: u64 = 1 << 2;
    pub const EVENT_REMOVE: u64 = 1 << 3;
    pub const MISSING_HUGETLBFS: u64 = 1 << 4;
    pub const MISSING_SHMEM: u64 = 1 << 5;
    pub const EVENT_UNMAP: u64 = 1 << 6;
    pub const SIGBUS: u64 = 1 << 7;
    pub const THREAD_ID: u64 = 1 << 8;
    pub const MINOR_HUGETLBFS: u64 = 1 << 9;
    pub const MINOR_SHMEM: u64 = 1 << 10;
    pub const EXACT_ADDRESS: u64 = 1 << 11;
    pub const WP_HUGETLBFS_SHMEM: u64 = 1 << 12;
    pub const WP_UNPOPULATED: u64 = 1 << 13;
    pub const POISON: u64 = 1 << 14;
    pub const WP_ASYNC: u64 = 1 << 15;
    pub const MOVE: u64 = 1 << 16;
    /// Linux 7.3+: read/write-protect mode.
    pub const RWP: u64 = 1 << 17;
    /// Linux 7.3+: RWP faults resolved by the kernel, harvested by PAGEMAP_SCAN.
    pub const RWP_ASYNC: u64 = 1 << 18;

    /// Names of the feature bits, for logs and handshake replies.
    pub const NAMES: [(u64, &str); 19] = [
        (PAGEFAULT_FLAG_WP, "PAGEFAULT_FLAG_WP"),
        (EVENT_FORK, "EVENT_FORK"),
        (EVENT_REMAP, "EVENT_REMAP"),
        (EVENT_REMOVE, "EVENT_REMOVE"),
        (MISSING_HUGETLBFS, "MISSING_HUGETLBFS"),
        (MISSING_SHMEM, "MISSING_SHMEM"),
        (EVENT_UNMAP, "EVENT_UNMAP"),
        (SIGBUS, "SIGBUS"),
        (THREAD_ID, "THREAD_ID"),
        (MINOR_HUGETLBFS, "MINOR_HUGETLBFS"),
        (MINOR_SHMEM, "MINOR_SHMEM"),
        (EXACT_ADDRESS, "EXACT_ADDRESS"),
        (WP_HUGETLBFS_SHMEM, "WP_HUGETLBFS_SHMEM"),
        (WP_UNPOPULATED, "WP_UNPOPULATED"),
        (POISON, "POISON"),
        (WP_ASYNC, "WP_ASYNC"),
        (MOVE, "MOVE"),
        (RWP, "RWP"),
        (RWP_ASYNC, "RWP_ASYNC"),
    ];

    /// The names of the bits set in `features`, `|`-separated.
    pub fn names(features: u64) -> String {
        let mut out = String::new();
        for (bit, name) in NAMES {
            if features & bit != 0 {
                if !out.is_empty() {
                    out.push('|');
                }
                out.push_str(name);
            }
        }
        out
    }
}

/// `UFFDIO_REGISTER_MODE_*`.
pub mod mode {
    pub const MISSING: u64 = 1 << 0;
    pub const WP: u64 = 1 << 1;
    pub const MINOR: u64 = 1 << 2;
    /// Linux 7.3+.
    pub const RWP: u64 = 1 << 3;
}

/// `UFFD_EVENT_*`.
pub mod event {
    pub const PAGEFAULT: u8 = 0x12;
    pub const FORK: u8 = 0x13;
    pub const REMAP: u8 = 0x14;
    pub const REMOVE: u8 = 0x15;
    pub const UNMAP: u8 = 0x16;
}

/// `UFFD_PAGEFAULT_FLAG_*`.
pub mod fault_flag {
    pub const WRITE: u64 = 1 << 0;
    pub const WP: u64 = 1 << 1;
    pub const MINOR: u64 = 1 << 2;
    /// Linux 7.3+: the fault is an RWP fault (WRITE is also set on writes).
    pub const RWP: u64 = 1 << 3;
}

const UFFDIO_COPY_MODE_WP: u64 = 1 << 1;
const UFFDIO_RWPROTECT_MODE_RWP: u64 = 1 << 0;

/// `struct uffd_msg` (packed, 32 bytes). The union is kept as raw words and
/// decoded by [`UffdMsg::decode`].
#[repr(C, packed)]
#[derive(Clone, Copy, Debug, Default)]
pub struct UffdMsg {
    pub event: u8,
    pub reserved1: u8,
    pub reserved2: u16,
    pub reserved3: u32,
    pub arg: [u64; 3],
}
const _: () = assert!(size_of::<UffdMsg>() == 32);

/// A decoded userfaultfd message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Event {
    /// A fault at `address` (page-aligned unless EXACT_ADDRESS) with
    /// `UFFD_PAGEFAULT_FLAG_*` bits in `flags`.
    PageFault {
        flags: u64,
        address: u64,
        thread_id: u32,
    },
    /// `MADV_DONTNEED`/`MADV_REMOVE` dropped `[start, end)` (balloon).
    Remove { start: u64, end: u64 },
    /// The VMM unmapped `[start, end)`.
    Unmap { start: u64, end: u64 },
    /// The VMM moved `len` bytes from `from` to `to` (mremap).
    Remap { from: u64, to: u64, len: u64 },
    /// The VMM forked; the child's uffd is `fd` (in our fd table).
    Fork { fd: RawFd },
    /// An event this build does not know.
    Unknown { event: u8 },
}

impl UffdMsg {
    /// Decode the union according to `event`.
    pub fn decode(&self) -> Event {
        let arg = self.arg;
        match self.event {
            event::PAGEFAULT => Event::PageFault {
                flags: arg[0],
                address: arg[1],
                thread_id: arg[2] as u32,
            },
            event::REMOVE => Event::Remove {
                start: arg[0],
                end: arg[1],
            },
            event::UNMAP => Event::Unmap {
                start: arg[0],
                end: arg[1],
            },
            event::REMAP => Event::Remap {
                from: arg[0],
                to: arg[1],
                len: arg[2],
            },
            event::FORK => Event::Fork {
                fd: arg[0] as u32 as RawFd,
            },
            other => Event::Unknown { event: other },
        }
    }
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
struct UffdioApi {
    api: u64,
    features: u64,
    ioctls: u64,
}
const _: () = assert!(size_of::<UffdioApi>() == 24);

/// `struct uffdio_range`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
struct UffdioRange {
    start: u64,
    len: u64,
}
const _: () = assert!(size_of::<UffdioRange>() == 16);

#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
struct UffdioCopy {
    dst: u64,
    src: u64,
    len: u64,
    mode: u64,
    copy: i64,
}
const _: () = assert!(size_of::<UffdioCopy>() == 40);

/// Linux 7.3+ `struct uffdio_rwprotect`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
struct UffdioRwprotect {
    range: UffdioRange,
    mode: u64,
}
const _: () = assert!(size_of::<UffdioRwprotect>() == 24);

/// Linux 7.3+ `struct uffdio_set_mode`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
struct UffdioSetMode {
    enable: u64,
    disable: u64,
}
const _: () = assert!(size_of::<UffdioSetMode>() == 16);

const fn ioc(dir: u64, ty: u64, nr: u64, size: usize) -> u64 {
    (dir << 30) | ((size as u64) << 16) | (ty << 8) | nr
}
const IOC_WRITE: u64 = 1;
const IOC_READ: u64 = 2;
const UFFDIO: u64 = 0xAA;

const UFFDIO_API: u64 = ioc(IOC_READ | IOC_WRITE, UFFDIO, 0x3F, size_of::<UffdioApi>());
const UFFDIO_COPY: u64 = ioc(IOC_READ | IOC_WRITE, UFFDIO, 0x03, size_of::<UffdioCopy>());
const UFFDIO_RWPROTECT: u64 = ioc(
    IOC_READ | IOC_WRITE,
    UFFDIO,
    0x09,
    size_of::<UffdioRwprotect>(),
);
const UFFDIO_SET_MODE: u64 = ioc(IOC_WRITE, UFFDIO, 0x0A, size_of::<UffdioSetMode>());
const USERFAULTFD_IOC_NEW: u64 = ioc(0, UFFDIO, 0x00, 0);

// Known values from the kernel headers, as a check on `ioc`.
const _: () = assert!(UFFDIO_API == 0xc018_aa3f);
const _: () = assert!(UFFDIO_COPY == 0xc028_aa03);

/// The result of a resolving ioctl that may race with the guest or the VMM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Resolve {
    /// The ioctl did its work.
    Done,
    /// `EEXIST`: the page is already present (another fault won the race).
    Exists,
    /// `EAGAIN`: the mm is changing (mremap, fork); try again.
    Again,
    /// `ENOENT`/`ESRCH`: the VMM's mm is gone or the range is no longer registered.
    Gone,
}

/// A userfaultfd, created here (test VMMs) or received from a VMM.
///
/// The fd is owned by a [`userfaultfd::Uffd`], whose safe calls serve
/// creation, registration, waking, zero pages, plain copies and
/// write-protection. Our own ioctls serve what that crate lacks: the
/// feature probe (it never returns the offered features), copies that
/// install the page write-protected (`UFFDIO_COPY_MODE_WP`), RWP
/// (`UFFDIO_RWPROTECT`, `UFFDIO_SET_MODE`) and reading messages with their
/// raw fault flags (it drops the RWP bit). ARCHITECTURE.md has the figures.
#[derive(Debug)]
pub struct Uffd {
    inner: userfaultfd::Uffd,
}

fn check(ret: libc::c_int) -> io::Result<()> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// The errno inside a userfaultfd crate error, as an `io::Error`.
fn os_error(e: userfaultfd::Error) -> io::Error {
    use userfaultfd::Error as E;
    match e {
        E::CopyFailed(errno) | E::ZeropageFailed(errno) | E::SystemError(errno) => {
            io::Error::from_raw_os_error(errno as i32)
        }
        E::PartiallyCopied(_) => io::Error::from_raw_os_error(libc::EAGAIN),
        E::OpenDevUserfaultfd(e) => e,
        other => io::Error::other(other.to_string()),
    }
}

/// A crate call that resolves a fault, as a [`Resolve`].
fn resolved<T>(r: userfaultfd::Result<T>) -> io::Result<Resolve> {
    match r {
        Ok(_) => Ok(Resolve::Done),
        Err(e) => classify(os_error(e)),
    }
}

impl Uffd {
    /// Create a non-blocking, close-on-exec userfaultfd with `features`
    /// (`UFFDIO_API`), seeing faults taken in kernel mode too (KVM's
    /// get_user_pages), so without `UFFD_USER_MODE_ONLY`. Opens
    /// `/dev/userfaultfd`, or the syscall where there is no device. Asking
    /// for a feature the kernel lacks fails with `EINVAL`.
    pub fn create(features: u64) -> io::Result<Self> {
        let inner = userfaultfd::UffdBuilder::new()
            .close_on_exec(true)
            .non_blocking(true)
            .user_mode_only(false)
            .require_features(userfaultfd::FeatureFlags::from_bits_retain(features))
            .create()
            .map_err(|e| {
                let e = os_error(e);
                io::Error::new(
                    e.kind(),
                    format!(
                        "creating a userfaultfd with features {}: {e} (run as root, or set \
                         vm.unprivileged_userfaultfd=1)",
                        feature::names(features)
                    ),
                )
            })?;
        Ok(Self { inner })
    }

    /// Wrap a received fd. The caller has checked that it is a userfaultfd
    /// (see [`is_userfaultfd`]).
    pub fn from_owned(fd: OwnedFd) -> Self {
        use std::os::fd::{FromRawFd, IntoRawFd};
        // SAFETY: `fd` is ours alone (an OwnedFd), and ownership moves to the
        // crate's Uffd, which closes it once on drop.
        let inner = unsafe { userfaultfd::Uffd::from_raw_fd(fd.into_raw_fd()) };
        Self { inner }
    }

    /// The features the running kernel offers, learned on a throw-away uffd
    /// (UFFDIO_API can be called once per uffd, and its answer is all the
    /// userfaultfd crate keeps to itself, so this probe is ours).
    pub fn kernel_features() -> io::Result<u64> {
        let dev = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/userfaultfd");
        let raw = match &dev {
            // SAFETY: USERFAULTFD_IOC_NEW takes the open flags by value and returns a new fd.
            Ok(dev) => unsafe {
                libc::ioctl(dev.as_raw_fd(), USERFAULTFD_IOC_NEW as _, libc::O_CLOEXEC)
            },
            // SAFETY: userfaultfd(2) takes one int and returns a new fd or -1.
            Err(_) => unsafe {
                libc::syscall(libc::SYS_userfaultfd, libc::O_CLOEXEC) as libc::c_int
            },
        };
        if raw < 0 {
            let e = io::Error::last_os_error();
            let dev = dev
                .err()
                .map(|d| format!("/dev/userfaultfd: {d}; "))
                .unwrap_or_default();
            return Err(io::Error::new(
                e.kind(),
                format!(
                    "probing userfaultfd: {dev}{e} (run as root, or set vm.unprivileged_userfaultfd=1)"
                ),
            ));
        }
        // SAFETY: the kernel just returned this fd to us; nobody else owns it.
        let probe = unsafe { OwnedFd::from_raw_fd(raw) };
        let mut api = UffdioApi {
            api: UFFD_API,
            features: 0,
            ioctls: 0,
        };
        // SAFETY: UFFDIO_API reads and writes one `uffdio_api`, which `api` is.
        check(unsafe { libc::ioctl(probe.as_raw_fd(), UFFDIO_API as _, &mut api) })?;
        Ok(api.features)
    }

    /// `UFFDIO_REGISTER` `[start, start+len)` with `mode` bits (RWP's bit
    /// passes through). Registering a range this uffd already holds
    /// replaces its mode. Returns the ioctls the kernel allows on the range.
    pub fn register(&self, start: u64, len: u64, mode: u64) -> io::Result<u64> {
        self.inner
            .register_with_mode(
                start as *mut libc::c_void,
                len as usize,
                userfaultfd::RegisterMode::from_bits_retain(mode),
            )
            .map(|ioctls| ioctls.bits())
            .map_err(os_error)
    }

    /// `UFFDIO_UNREGISTER`; blocked faults in the range are woken.
    pub fn unregister(&self, start: u64, len: u64) -> io::Result<()> {
        self.inner
            .unregister(start as *mut libc::c_void, len as usize)
            .map_err(os_error)
    }

    /// `UFFDIO_WAKE`: wake threads blocked on faults in the range.
    pub fn wake(&self, start: u64, len: u64) -> io::Result<()> {
        self.inner
            .wake(start as *mut libc::c_void, len as usize)
            .map_err(os_error)
    }

    /// `UFFDIO_COPY` `src` (our memory) to `dst` (the VMM's), write-protected
    /// when `wp`. Wakes the faulting threads. The kernel only fills pages
    /// absent from a registered range (`EEXIST` otherwise), so nothing the
    /// VMM holds is overwritten.
    pub fn copy(&self, dst: u64, src: &[u8], wp: bool) -> io::Result<Resolve> {
        if wp {
            // The crate has no UFFDIO_COPY_MODE_WP.
            return self.copy_wp(dst, src);
        }
        self.copy_plain(dst, src, true)
    }

    /// `UFFDIO_COPY` without waking (for batches woken with one `wake`).
    pub fn copy_dontwake(&self, dst: u64, src: &[u8]) -> io::Result<Resolve> {
        self.copy_plain(dst, src, false)
    }

    fn copy_plain(&self, dst: u64, src: &[u8], wake: bool) -> io::Result<Resolve> {
        let dst = dst as *mut libc::c_void;
        // SAFETY: the kernel reads `src.len()` bytes at `src`, which the
        // slice holds, and fills only absent pages of a registered range.
        resolved(unsafe { self.inner.copy(src.as_ptr().cast(), dst, src.len(), wake) })
    }

    fn copy_wp(&self, dst: u64, src: &[u8]) -> io::Result<Resolve> {
        let mut c = UffdioCopy {
            dst,
            src: src.as_ptr() as u64,
            len: src.len() as u64,
            mode: UFFDIO_COPY_MODE_WP,
            copy: 0,
        };
        // SAFETY: UFFDIO_COPY reads `len` bytes at `src`, which the slice
        // holds, and reads/writes one `uffdio_copy`.
        let ret = unsafe { libc::ioctl(self.as_raw_fd(), UFFDIO_COPY as _, &mut c) };
        resolve(ret)
    }

    /// `UFFDIO_COPY` of a run of pages (prefetch), write-protected when
    /// `wp`: the bytes copied, and why the copy stopped short of
    /// `src.len()` if it did (`Exists` at the first page already present:
    /// the caller skips it and goes on).
    pub fn copy_run(&self, dst: u64, src: &[u8], wp: bool) -> io::Result<(u64, Resolve)> {
        let mut c = UffdioCopy {
            dst,
            src: src.as_ptr() as u64,
            len: src.len() as u64,
            mode: if wp { UFFDIO_COPY_MODE_WP } else { 0 },
            copy: 0,
        };
        // SAFETY: UFFDIO_COPY reads `len` bytes at `src`, which the slice
        // holds, fills only absent pages of a registered range, and
        // reads/writes one `uffdio_copy`.
        let ret = unsafe { libc::ioctl(self.as_raw_fd(), UFFDIO_COPY as _, &mut c) };
        // `copy` is the bytes copied, or a negative errno when none were.
        let copied = u64::try_from(c.copy).unwrap_or(0);
        Ok((copied, resolve(ret)?))
    }

    /// `UFFDIO_ZEROPAGE`: map the zero page at `[start, start+len)` and wake.
    pub fn zeropage(&self, start: u64, len: u64) -> io::Result<Resolve> {
        // SAFETY: the kernel maps zero pages only where a registered range
        // has none (`EEXIST` otherwise); nothing present is overwritten.
        resolved(unsafe {
            self.inner
                .zeropage(start as *mut libc::c_void, len as usize, true)
        })
    }

    /// `UFFDIO_WRITEPROTECT`: protect (`wp`) or un-protect the range. Un-protecting
    /// wakes the threads waiting on it unless `dontwake` (the kernel refuses
    /// DONTWAKE together with WP, so it is ignored when protecting).
    pub fn write_protect(
        &self,
        start: u64,
        len: u64,
        wp: bool,
        dontwake: bool,
    ) -> io::Result<Resolve> {
        let (start, len) = (start as *mut libc::c_void, len as usize);
        if wp {
            resolved(self.inner.write_protect(start, len))
        } else {
            resolved(self.inner.remove_write_protection(start, len, !dontwake))
        }
    }

    /// Linux 7.3+ `UFFDIO_RWPROTECT`: read/write-protect (`protect`) or release the range.
    pub fn rw_protect(&self, start: u64, len: u64, protect: bool) -> io::Result<Resolve> {
        let mode = if protect {
            UFFDIO_RWPROTECT_MODE_RWP
        } else {
            0
        };
        let mut r = UffdioRwprotect {
            range: UffdioRange { start, len },
            mode,
        };
        // SAFETY: UFFDIO_RWPROTECT reads one `uffdio_rwprotect`.
        let ret = unsafe { libc::ioctl(self.as_raw_fd(), UFFDIO_RWPROTECT as _, &mut r) };
        resolve(ret)
    }

    /// Linux 7.3+ `UFFDIO_SET_MODE`: toggle `RWP_ASYNC` at run time.
    pub fn set_mode(&self, enable: u64, disable: u64) -> io::Result<()> {
        let mut m = UffdioSetMode { enable, disable };
        // SAFETY: UFFDIO_SET_MODE reads one `uffdio_set_mode`.
        check(unsafe { libc::ioctl(self.as_raw_fd(), UFFDIO_SET_MODE as _, &mut m) })
    }

    /// Read up to `buf.len()` messages without blocking. Returns how many were
    /// read (0 when none is pending).
    pub fn read_msgs(&self, buf: &mut [UffdMsg]) -> io::Result<usize> {
        let bytes = size_of_val(buf);
        // SAFETY: `buf` is valid for `bytes` bytes of writes, and UffdMsg is
        // plain old data for which every bit pattern is valid.
        let n = unsafe { libc::read(self.as_raw_fd(), buf.as_mut_ptr().cast(), bytes) };
        if n < 0 {
            let e = io::Error::last_os_error();
            return if e.kind() == io::ErrorKind::WouldBlock {
                Ok(0)
            } else {
                Err(e)
            };
        }
        Ok(n as usize / size_of::<UffdMsg>())
    }

    /// The raw fd, for poll(2).
    pub fn as_fd(&self) -> BorrowedFd<'_> {
        use std::os::fd::AsFd;
        self.inner.as_fd()
    }

    /// The features this uffd was given at `UFFDIO_API` time, read from
    /// `/proc/self/fdinfo` (a received uffd's features are fixed by its creator).
    pub fn features(&self) -> io::Result<u64> {
        fdinfo_features(self.as_raw_fd())
    }
}

impl AsRawFd for Uffd {
    fn as_raw_fd(&self) -> RawFd {
        self.inner.as_raw_fd()
    }
}

fn resolve(ret: libc::c_int) -> io::Result<Resolve> {
    if ret >= 0 {
        return Ok(Resolve::Done);
    }
    classify(io::Error::last_os_error())
}

/// The errors a resolving ioctl may race into, as a [`Resolve`].
fn classify(e: io::Error) -> io::Result<Resolve> {
    match e.raw_os_error() {
        Some(libc::EEXIST) => Ok(Resolve::Exists),
        Some(libc::EAGAIN) => Ok(Resolve::Again),
        Some(libc::ENOENT) | Some(libc::ESRCH) => Ok(Resolve::Gone),
        _ => Err(e),
    }
}

/// Whether `fd` (in our fd table) is a userfaultfd.
pub fn is_userfaultfd(fd: RawFd) -> bool {
    std::fs::read_link(format!("/proc/self/fd/{fd}"))
        .map(|p| p.as_os_str() == "anon_inode:[userfaultfd]")
        .unwrap_or(false)
}

/// Whether `fd_a` in process `pid_a` and `fd_b` in `pid_b` are the same open
/// file (kcmp(2) `KCMP_FILE`; needs ptrace rights on both, e.g. root).
pub fn same_file(
    pid_a: libc::pid_t,
    fd_a: RawFd,
    pid_b: libc::pid_t,
    fd_b: RawFd,
) -> io::Result<bool> {
    const KCMP_FILE: libc::c_int = 0;
    // SAFETY: kcmp takes five integers and returns 0 (same), 1/2 (ordered) or -1.
    let r = unsafe {
        libc::syscall(
            libc::SYS_kcmp,
            pid_a,
            pid_b,
            KCMP_FILE,
            fd_a as libc::c_ulong,
            fd_b as libc::c_ulong,
        )
    };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r == 0)
    }
}

/// Whether process `pid` holds, in its own fd table, the same uffd as our `fd`.
pub fn process_holds(pid: libc::pid_t, fd: RawFd) -> bool {
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return false;
    };
    let me = std::process::id() as i32;
    dir.flatten().any(|e| {
        let is_uffd =
            std::fs::read_link(e.path()).is_ok_and(|p| p.as_os_str() == "anon_inode:[userfaultfd]");
        let their_fd = e.file_name().to_str().and_then(|s| s.parse::<RawFd>().ok());
        match (is_uffd, their_fd) {
            (true, Some(tfd)) => same_file(me, fd, pid, tfd).unwrap_or(false),
            _ => false,
        }
    })
}

/// The `features` word of a uffd, from the `API:` line of its fdinfo
/// (`API:\t<api>:<features>:<ioctls>`, all hex).
pub fn fdinfo_features(fd: RawFd) -> io::Result<u64> {
    let text = std::fs::read_to_string(format!("/proc/self/fdinfo/{fd}"))?;
    parse_fdinfo_features(&text).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("fd {fd}: no userfaultfd API line in fdinfo"),
        )
    })
}

/// The features word of an fdinfo text's `API:` line.
pub fn parse_fdinfo_features(text: &str) -> Option<u64> {
    let line = text.lines().find_map(|l| l.strip_prefix("API:"))?;
    let mut parts = line.trim().split(':');
    let _api = parts.next()?;
    u64::from_str_radix(parts.next()?, 16).ok()
}

/// PAGEMAP_SCAN (Linux 6.7+): `ioctl` on `/proc/<pid>/pagemap`.
pub mod pagemap {
    use super::*;

    pub const PAGE_IS_WPALLOWED: u64 = 1 << 0;
    pub const PAGE_IS_WRITTEN: u64 = 1 << 1;
    pub const PAGE_IS_FILE: u64 = 1 << 2;
    pub const PAGE_IS_PRESENT: u64 = 1 << 3;
    pub const PAGE_IS_SWAPPED: u64 = 1 << 4;
    pub const PAGE_IS_PFNZERO: u64 = 1 << 5;
    pub const PAGE_IS_HUGE: u64 = 1 << 6;
    pub const PAGE_IS_SOFT_DIRTY: u64 = 1 << 7;
    /// Linux 7.3+: accessed since protected, in an RWP VMA.
    pub const PAGE_IS_ACCESSED: u64 = 1 << 9;

    pub const PM_SCAN_WP_MATCHING: u64 = 1 << 0;
    pub const PM_SCAN_CHECK_WPASYNC: u64 = 1 << 1;

    /// `struct page_region`.
    #[repr(C)]
    #[derive(Clone, Copy, Debug, Default)]
    pub struct PageRegion {
        pub start: u64,
        pub end: u64,
        pub categories: u64,
    }
    const _: () = assert!(size_of::<PageRegion>() == 24);

    #[repr(C)]
    #[derive(Clone, Copy, Debug, Default)]
    struct PmScanArg {
        size: u64,
        flags: u64,
        start: u64,
        end: u64,
        walk_end: u64,
        vec: u64,
        vec_len: u64,
        max_pages: u64,
        category_inverted: u64,
        category_mask: u64,
        category_anyof_mask: u64,
        return_mask: u64,
    }
    const _: () = assert!(size_of::<PmScanArg>() == 96);

    const PAGEMAP_SCAN: u64 = ioc(
        IOC_READ | IOC_WRITE,
        b'f' as u64,
        16,
        size_of::<PmScanArg>(),
    );

    /// One scan call's arguments.
    #[derive(Clone, Copy, Debug)]
    pub struct Scan {
        pub flags: u64,
        /// Categories tested inverted (a page "in" one of these is one
        /// without it), for the two masks below.
        pub category_inverted: u64,
        /// Pages must be in every one of these categories...
        pub category_mask: u64,
        /// ...and in at least one of these (0: no such condition).
        pub category_anyof_mask: u64,
        pub return_mask: u64,
    }

    /// Scan `[start, end)` of the process behind `pagemap` and fill `out`.
    /// Returns `(regions filled, where the walk stopped)`; the caller loops
    /// while the walk stopped before `end`.
    pub fn scan(
        pagemap: BorrowedFd<'_>,
        start: u64,
        end: u64,
        s: Scan,
        out: &mut [PageRegion],
    ) -> io::Result<(usize, u64)> {
        let mut arg = PmScanArg {
            size: size_of::<PmScanArg>() as u64,
            flags: s.flags,
            start,
            end,
            walk_end: 0,
            vec: out.as_mut_ptr() as u64,
            vec_len: out.len() as u64,
            max_pages: 0,
            category_inverted: s.category_inverted,
            category_mask: s.category_mask,
            category_anyof_mask: s.category_anyof_mask,
            return_mask: s.return_mask,
        };
        // SAFETY: PAGEMAP_SCAN reads/writes one `pm_scan_arg` and writes at most
        // `vec_len` `page_region`s at `vec`, which `out` provides.
        let ret = unsafe { libc::ioctl(pagemap.as_raw_fd(), PAGEMAP_SCAN as _, &mut arg) };
        if ret < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok((ret as usize, arg.walk_end))
    }

    /// Scan all of `[start, end)`, calling `each` for every page run
    /// reported, `out.len()` runs per call.
    pub fn scan_all(
        pagemap: BorrowedFd<'_>,
        mut start: u64,
        end: u64,
        s: Scan,
        out: &mut [PageRegion],
        mut each: impl FnMut(&PageRegion) -> io::Result<()>,
    ) -> io::Result<()> {
        while start < end {
            let (n, walk_end) = scan(pagemap, start, end, s, out)?;
            for r in &out[..n] {
                each(r)?;
            }
            if walk_end <= start {
                break;
            }
            start = walk_end;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fdinfo_line_is_parsed() {
        let text = "pos:\t0\nflags:\t02004002\nmnt_id:\t15\nino:\t1057\npending:\t0\ntotal:\t0\nAPI:\taa:1a008:1c000000000003\n";
        assert_eq!(parse_fdinfo_features(text), Some(0x1a008));
        assert_eq!(parse_fdinfo_features("pos:\t0\n"), None);
    }

    #[test]
    fn feature_names_follow_bits() {
        assert_eq!(
            feature::names(feature::EVENT_REMOVE | feature::WP_ASYNC),
            "EVENT_REMOVE|WP_ASYNC"
        );
        assert_eq!(feature::names(0), "");
    }

    #[test]
    fn pagefault_message_decodes() {
        let m = UffdMsg {
            event: event::PAGEFAULT,
            arg: [fault_flag::WRITE, 0x7000_1000, 42],
            ..Default::default()
        };
        assert_eq!(
            m.decode(),
            Event::PageFault {
                flags: fault_flag::WRITE,
                address: 0x7000_1000,
                thread_id: 42
            }
        );
        let r = UffdMsg {
            event: event::REMOVE,
            arg: [0x1000, 0x3000, 0],
            ..Default::default()
        };
        assert_eq!(
            r.decode(),
            Event::Remove {
                start: 0x1000,
                end: 0x3000
            }
        );
    }

    /// Against the running kernel: a uffd we create reports, through fdinfo,
    /// exactly the features UFFDIO_API granted.
    #[test]
    fn real_uffd_reports_its_features() {
        let offered =
            Uffd::kernel_features().expect("userfaultfd unavailable: run the tests as root");
        assert!(
            offered & feature::MISSING_SHMEM != 0,
            "kernel offers {offered:#x}"
        );
        let want = feature::EVENT_REMOVE | feature::MISSING_SHMEM;
        let u = Uffd::create(want).unwrap();
        assert_eq!(u.features().unwrap() & want, want);
        assert!(is_userfaultfd(u.as_raw_fd()));
        let me = std::process::id() as i32;
        assert!(process_holds(me, u.as_raw_fd()));
        let other = Uffd::create(0).unwrap();
        assert!(!same_file(me, u.as_raw_fd(), me, other.as_raw_fd()).unwrap());
        let f = std::fs::File::open("/proc/self/status").unwrap();
        assert!(!is_userfaultfd(f.as_raw_fd()));
    }
}
