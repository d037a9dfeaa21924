//! Every raw system call the tracker and recovery make, outside the
//! userfaultfd and PAGEMAP_SCAN bindings (`uffd.rs`), the custody mapping
//! (`custody.rs`) and fd passing (`fdpass.rs`). Each wrapper is safe to call:
//! the `unsafe` it needs sits here with its `// SAFETY:` reason, so that the
//! tracker's logic modules can forbid `unsafe` outright.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::Duration;

fn fd_or_error(fd: RawFd) -> io::Result<OwnedFd> {
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh fd the kernel just installed in our table; nobody
    // else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// A non-blocking eventfd, the tracker's stop signal.
#[derive(Debug)]
pub struct EventFd(OwnedFd);

impl EventFd {
    pub fn new() -> io::Result<Self> {
        // SAFETY: eventfd(2) with constant flags returns a new fd or -1.
        fd_or_error(unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) }).map(Self)
    }

    /// Make the eventfd readable (poll reports POLLIN from then on).
    pub fn signal(&self) {
        let one: u64 = 1;
        // SAFETY: writing 8 bytes from a u64 to our eventfd.
        unsafe { libc::write(self.0.as_raw_fd(), (&one as *const u64).cast(), 8) };
    }
}

impl AsRawFd for EventFd {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}

/// A periodic, non-blocking monotonic timerfd: the interval tick.
#[derive(Debug)]
pub struct TimerFd(OwnedFd);

impl TimerFd {
    pub fn periodic(interval: Duration) -> io::Result<Self> {
        // SAFETY: timerfd_create with constant arguments returns a new fd or -1.
        let fd = fd_or_error(unsafe {
            libc::timerfd_create(
                libc::CLOCK_MONOTONIC,
                libc::TFD_NONBLOCK | libc::TFD_CLOEXEC,
            )
        })?;
        let ts = libc::timespec {
            tv_sec: interval.as_secs() as _,
            tv_nsec: interval.subsec_nanos() as _,
        };
        let spec = libc::itimerspec {
            it_interval: ts,
            it_value: ts,
        };
        // SAFETY: `spec` is a valid itimerspec; the old value is not asked for.
        if unsafe { libc::timerfd_settime(fd.as_raw_fd(), 0, &spec, std::ptr::null_mut()) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Self(fd))
    }

    /// Consume the expirations so far (so poll stops reporting the timer).
    pub fn consume(&self) {
        let mut ticks = 0u64;
        // SAFETY: reading 8 bytes into a u64 from our timerfd.
        unsafe { libc::read(self.0.as_raw_fd(), (&mut ticks as *mut u64).cast(), 8) };
    }
}

impl AsRawFd for TimerFd {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}

/// A pidfd for `pid` (`pidfd_open(2)`).
pub fn pidfd_open(pid: libc::pid_t) -> io::Result<OwnedFd> {
    // SAFETY: pidfd_open(2) takes a pid and flags and returns a new fd or -1.
    fd_or_error(unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) } as RawFd)
}

/// Duplicate fd `target` of the process behind `pidfd` into our fd table
/// (`pidfd_getfd(2)`; needs ptrace access to it).
pub fn pidfd_getfd(pidfd: &OwnedFd, target: RawFd) -> io::Result<OwnedFd> {
    // SAFETY: pidfd_getfd(2) takes a pidfd, a target fd and flags, and
    // returns a new fd in our table or -1.
    fd_or_error(
        unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), target, 0) } as RawFd,
    )
}

/// Close an fd the kernel installed in our table on our behalf (the child
/// uffd of a `UFFD_EVENT_FORK` message).
pub fn close_received(fd: RawFd) {
    if fd >= 0 {
        // SAFETY: the kernel installed this fd for us and nothing else refers to it.
        drop(unsafe { OwnedFd::from_raw_fd(fd) });
    }
}

/// `poll(2)` over `fds`; `timeout_ms` < 0 waits for ever.
pub fn poll(fds: &mut [libc::pollfd], timeout_ms: i32) -> io::Result<usize> {
    // SAFETY: `fds` is a valid array of pollfd of the given length.
    let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as _, timeout_ms) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n as usize)
}

/// Monotonic nanoseconds (vDSO; no syscall, no allocation).
#[inline]
pub fn now_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Pin the calling thread to `cpu`.
pub fn pin_to(cpu: usize) -> io::Result<()> {
    if cpu >= libc::CPU_SETSIZE as usize {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("CPU {cpu} is beyond the kernel's CPU set size"),
        ));
    }
    // SAFETY: a zeroed cpu_set_t is a valid empty set; CPU_SET writes in
    // bounds for cpu < CPU_SETSIZE (checked above).
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        if libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set) != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Punch `[off, off+len)` out of `file`, keeping its size.
pub fn punch_hole(file: &File, off: u64, len: u64) -> io::Result<()> {
    // SAFETY: fallocate on a file we hold, with constant flags.
    let rc = unsafe {
        libc::fallocate(
            file.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            off as libc::off_t,
            len as libc::off_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The first offset at or after `off` that holds data (`SEEK_DATA`); `None`
/// when there is none (a hole to the end, or the call failed).
pub fn seek_data(file: &File, off: u64) -> Option<u64> {
    // SAFETY: lseek on a file we hold; it moves only that file's offset,
    // which nothing of ours relies on (every read and write is positional).
    let data = unsafe { libc::lseek(file.as_raw_fd(), off as libc::off_t, libc::SEEK_DATA) };
    (data >= 0).then_some(data as u64)
}

/// Whether the kernel keeps soft-dirty bits (`CONFIG_MEM_SOFT_DIRTY`):
/// a page this process just wrote reads soft-dirty in its own pagemap
/// (bit 55) only then. Probed once.
pub fn soft_dirty_supported() -> bool {
    static SUPPORTED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *SUPPORTED.get_or_init(|| {
        use std::os::unix::fs::FileExt as _;
        let page = 4096usize;
        let mut buf = vec![0u8; 2 * page];
        // A whole page inside the buffer, written just now.
        let at = buf.as_ptr() as usize;
        let start = at.next_multiple_of(page) - at;
        buf[start] = 1;
        std::hint::black_box(&buf);
        let addr = (at + start) as u64;
        let mut entry = [0u8; 8];
        let read = File::open("/proc/self/pagemap")
            .and_then(|f| f.read_exact_at(&mut entry, addr / page as u64 * 8));
        read.is_ok() && u64::from_le_bytes(entry) >> 55 & 1 == 1
    })
}

/// Whether `file` lives on hugetlbfs.
pub fn on_hugetlbfs(file: &File) -> bool {
    const HUGETLBFS_MAGIC: libc::__fsword_t = 0x9584_58f6;
    // SAFETY: a zeroed statfs is a valid out-parameter for fstatfs.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: fstatfs writes one statfs.
    unsafe { libc::fstatfs(file.as_raw_fd(), &mut st) == 0 && st.f_type == HUGETLBFS_MAGIC }
}

/// A read-only private mapping of a whole file (the snapshot memory file
/// MISSING faults are served from). It keeps the file open.
#[derive(Debug)]
pub struct FileMap {
    ptr: *const u8,
    len: usize,
    _file: File,
}

// SAFETY: the mapping is read-only and owned by this value; it moves to the
// tracker thread with it and is only read there.
unsafe impl Send for FileMap {}

impl FileMap {
    pub fn new(file: File) -> io::Result<Self> {
        let len = file.metadata()?.len() as usize;
        if len == 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "snapshot memory file is empty",
            ));
        }
        // SAFETY: mapping a file we hold, read-only and private.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_PRIVATE,
                file.as_raw_fd(),
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(Self {
            ptr: p.cast(),
            len,
            _file: file,
        })
    }

    /// `len` bytes at `off`, if the file holds them all.
    #[inline]
    pub fn get(&self, off: u64, len: u64) -> Option<&[u8]> {
        let end = off.checked_add(len)?;
        if end > self.len as u64 {
            return None;
        }
        // SAFETY: `[off, end)` lies inside the mapping (checked above), which
        // lives as long as `self` and is never written.
        Some(unsafe { std::slice::from_raw_parts(self.ptr.add(off as usize), len as usize) })
    }
}

impl Drop for FileMap {
    fn drop(&mut self) {
        // SAFETY: unmapping our own mapping.
        unsafe { libc::munmap(self.ptr as *mut _, self.len) };
    }
}
