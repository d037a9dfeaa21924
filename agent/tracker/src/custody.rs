//! The custody file: where a shmem guest's page lives between the agent
//! saving it and the guest's next access bringing it back.
//!
//! Layout (all little-endian): a 4 KiB header, then a table of one `u64` per
//! slot (memory-file offset + 1 of the page it holds, 0 when free), then the
//! page data, one granule per slot. The file is mapped `MAP_SHARED`, so its
//! contents are in the page cache the moment they are written: a killed
//! agent loses nothing, and a restarted one (or an operator, with
//! `wset-agent restore-custody`) can write every held page back into the
//! memfd.
//!
//! The file is sparse; its blocks are reserved (`fallocate`) a chunk of
//! slots at a time, before a slot of the chunk is handed out. A store into
//! a hole of a shared mapping on a full filesystem raises SIGBUS (or, from
//! the kernel, fails with EFAULT); a slot that cannot be reserved is never
//! handed out instead, and custody is full until space comes back.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::ptr::NonNull;

/// `b"WSETCST1"` as a little-endian u64.
pub const MAGIC: u64 = u64::from_le_bytes(*b"WSETCST1");
const HEADER_BYTES: u64 = 4096;
/// Data reserved at a time (rounded to whole slots, at least one): one
/// `fallocate` per 256 pages of 4 KiB taken into custody, each of which
/// costs three system calls of its own.
const RESERVE_BYTES: u64 = 1 << 20;

/// A custody file mapped into the agent.
#[derive(Debug)]
pub struct Custody {
    path: PathBuf,
    file: File,
    map: NonNull<u8>,
    map_len: usize,
    granule: u64,
    slots: u32,
    data_off: u64,
    /// Free slots, a stack: take and release never allocate. Slots come
    /// off it in ascending order the first time, so every slot below
    /// `reserved` has been handed out before one at or above it.
    free: Vec<u32>,
    /// Slots whose data and table entry have their blocks reserved.
    reserved: u32,
    /// Why the latest reservation failed, until someone takes it.
    reserve_error: Option<io::Error>,
}

// SAFETY: the mapping is owned by this value alone and only touched through
// `&mut self` or by the one thread that owns the tracker.
unsafe impl Send for Custody {}

/// What a custody file header records, so that a later reader can tell
/// which VM and memory it belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CustodyHeader {
    pub granule: u64,
    pub slots: u32,
    pub vmm_pid: libc::pid_t,
    /// Device and inode of the memory file the offsets refer to.
    pub memory_dev: u64,
    pub memory_ino: u64,
}

impl Custody {
    /// Create `path` (which must not exist) with `slots` slots of `granule` bytes.
    pub fn create(path: &Path, header: CustodyHeader) -> io::Result<Self> {
        let granule = header.granule;
        let slots = header.slots;
        let table_bytes = (slots as u64 * 8).next_multiple_of(4096);
        let data_off = (HEADER_BYTES + table_bytes).next_multiple_of(granule.max(4096));
        let len = data_off + slots as u64 * granule;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .map_err(|e| {
                io::Error::new(
                    e.kind(),
                    format!("create custody file {}: {e}", path.display()),
                )
            })?;
        let fail = |e: io::Error, what: &str| {
            let _ = std::fs::remove_file(path);
            io::Error::new(
                e.kind(),
                format!("{what} custody file {}: {e}", path.display()),
            )
        };
        file.set_len(len).map_err(|e| fail(e, "size"))?;
        // SAFETY: a fresh shared mapping of a file we own, `len` bytes long.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(fail(io::Error::last_os_error(), "map"));
        }
        let map = NonNull::new(p.cast::<u8>()).expect("mmap returned null");
        let mut c = Self {
            path: path.to_owned(),
            file,
            map,
            map_len: len as usize,
            granule,
            slots,
            data_off,
            free: (0..slots).rev().collect(),
            reserved: 0,
            reserve_error: None,
        };
        // The header and the first chunk now: a custody that cannot hold a
        // single page is refused here, with the reason.
        let first = c
            .allocate(0, HEADER_BYTES)
            .and_then(|()| c.reserve_through(0));
        if let Err(e) = first {
            drop(c);
            return Err(fail(e, "reserve space for"));
        }
        let words = [
            MAGIC,
            1, // version
            granule,
            slots as u64,
            header.vmm_pid as u64,
            header.memory_dev,
            header.memory_ino,
            data_off,
        ];
        for (i, w) in words.iter().enumerate() {
            c.write_u64(i as u64 * 8, *w);
        }
        Ok(c)
    }

    fn write_u64(&self, off: u64, v: u64) {
        assert!(off + 8 <= self.map_len as u64);
        // SAFETY: in bounds (checked), 8-aligned (all offsets used are), and
        // the mapping is ours.
        unsafe {
            std::ptr::write_volatile(self.map.as_ptr().add(off as usize).cast::<u64>(), v.to_le())
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
    pub fn capacity(&self) -> u32 {
        self.slots
    }
    pub fn in_use(&self) -> u32 {
        self.slots - self.free.len() as u32
    }

    /// Take a free slot, if any (and if its blocks can be reserved; if
    /// not, [`Custody::take_reserve_error`] says why).
    #[inline]
    pub fn take(&mut self) -> Option<u32> {
        let slot = *self.free.last()?;
        if slot >= self.reserved
            && let Err(e) = self.reserve_through(slot)
        {
            self.reserve_error = Some(e);
            return None;
        }
        self.free.pop()
    }

    /// Why custody could not grow the last time it tried (once).
    pub fn take_reserve_error(&mut self) -> Option<io::Error> {
        self.reserve_error.take()
    }

    /// Slots whose blocks are reserved.
    pub fn reserved(&self) -> u32 {
        self.reserved
    }

    /// Reserve whole chunks of slots until `slot` is covered.
    fn reserve_through(&mut self, slot: u32) -> io::Result<()> {
        let chunk = (RESERVE_BYTES / self.granule).clamp(1, u32::MAX as u64) as u32;
        while self.reserved <= slot && self.reserved < self.slots {
            let (from, n) = (self.reserved, chunk.min(self.slots - self.reserved));
            self.allocate(HEADER_BYTES + from as u64 * 8, n as u64 * 8)?;
            self.allocate(
                self.data_off + from as u64 * self.granule,
                n as u64 * self.granule,
            )?;
            // (A filesystem without fallocate set it to every slot.)
            self.reserved = self.reserved.max(from + n);
        }
        Ok(())
    }

    /// Give `[off, off + len)` of the file its blocks. A filesystem that
    /// cannot (EOPNOTSUPP) leaves the file sparse, as before reservation.
    fn allocate(&mut self, off: u64, len: u64) -> io::Result<()> {
        // SAFETY: fallocate on the file we own; mode 0 only allocates.
        let rc = unsafe {
            libc::fallocate(
                self.file.as_raw_fd(),
                0,
                off as libc::off_t,
                len as libc::off_t,
            )
        };
        if rc == 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::EOPNOTSUPP) {
            self.reserved = self.slots;
            return Ok(());
        }
        Err(e)
    }

    /// The slot's data, `granule` bytes.
    #[inline]
    pub fn slot(&self, slot: u32) -> &[u8] {
        // SAFETY: `slot_ptr` points at `granule` bytes inside the mapping,
        // which lives as long as `self`; writes need `&mut self`.
        unsafe { std::slice::from_raw_parts(self.slot_ptr(slot), self.granule as usize) }
    }

    /// The slot's data, to fill.
    #[inline]
    pub fn slot_mut(&mut self, slot: u32) -> &mut [u8] {
        // SAFETY: as in `slot`, borrowed mutably through `&mut self`.
        unsafe { std::slice::from_raw_parts_mut(self.slot_ptr(slot), self.granule as usize) }
    }

    #[inline]
    fn slot_ptr(&self, slot: u32) -> *mut u8 {
        assert!(slot < self.slots);
        // SAFETY: slot < slots, so the granule lies inside the mapping.
        unsafe {
            self.map
                .as_ptr()
                .add((self.data_off + slot as u64 * self.granule) as usize)
        }
    }

    /// Record that `slot` holds the page at `memory_offset` of the memory file.
    /// Called after the data is in the slot and before the hole is punched.
    #[inline]
    pub fn commit(&self, slot: u32, memory_offset: u64) {
        self.write_u64(HEADER_BYTES + slot as u64 * 8, memory_offset + 1);
    }

    /// Free `slot` once its page is back in the guest.
    #[inline]
    pub fn release(&mut self, slot: u32) {
        self.write_u64(HEADER_BYTES + slot as u64 * 8, 0);
        self.free.push(slot);
    }

    /// Remove the file; only when no page is held any more.
    pub fn remove_if_empty(&self) -> io::Result<bool> {
        if self.in_use() == 0 {
            std::fs::remove_file(&self.path)?;
            Ok(true)
        } else {
            Ok(false)
        }
    }
}

impl Drop for Custody {
    fn drop(&mut self) {
        // SAFETY: unmapping the mapping this value created; nothing refers to
        // it after drop.
        unsafe {
            libc::munmap(self.map.as_ptr().cast(), self.map_len);
        }
    }
}

/// A page held in custody: its offset in the memory file and its data.
pub type HeldPage = (u64, Vec<u8>);

/// Pages a custody file holds: `(memory offset, data)`, read with plain file
/// IO, for restoring after the agent that wrote it is gone.
pub fn read_held_pages(path: &Path) -> io::Result<(CustodyHeader, Vec<HeldPage>)> {
    use std::os::unix::fs::FileExt;
    let f = File::open(path)?;
    let mut head = [0u8; 64];
    f.read_exact_at(&mut head, 0)?;
    let w = |i: usize| u64::from_le_bytes(head[i * 8..i * 8 + 8].try_into().expect("8 bytes"));
    if w(0) != MAGIC {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{}: not a wset custody file", path.display()),
        ));
    }
    let header = CustodyHeader {
        granule: w(2),
        slots: w(3) as u32,
        vmm_pid: w(4) as libc::pid_t,
        memory_dev: w(5),
        memory_ino: w(6),
    };
    let data_off = w(7);
    let mut table = vec![0u8; header.slots as usize * 8];
    f.read_exact_at(&mut table, HEADER_BYTES)?;
    let mut pages = Vec::new();
    for (slot, e) in table.chunks_exact(8).enumerate() {
        let e = u64::from_le_bytes(e.try_into().expect("8 bytes"));
        if e != 0 {
            let mut data = vec![0u8; header.granule as usize];
            f.read_exact_at(&mut data, data_off + slot as u64 * header.granule)?;
            pages.push((e - 1, data));
        }
    }
    Ok((header, pages))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn held_pages_survive_the_writer() {
        let dir = std::env::temp_dir().join(format!("wset-custody-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("vm.custody");
        let _ = std::fs::remove_file(&path);
        let header = CustodyHeader {
            granule: 4096,
            slots: 8,
            vmm_pid: 7,
            memory_dev: 1,
            memory_ino: 2,
        };
        let mut c = Custody::create(&path, header).unwrap();
        let a = c.take().unwrap();
        let b = c.take().unwrap();
        c.slot_mut(a).fill(0xAB);
        c.slot_mut(b).fill(0xCD);
        c.commit(a, 0x10000);
        c.commit(b, 0x20000);
        c.release(b);
        assert_eq!(c.in_use(), 1);
        // Read back through plain file IO while the writer still maps it, as a
        // restarted agent would after a kill.
        let (h, pages) = read_held_pages(&path).unwrap();
        assert_eq!(h, header);
        assert_eq!(pages.len(), 1);
        assert_eq!(pages[0].0, 0x10000);
        assert!(pages[0].1.iter().all(|&x| x == 0xAB));
        assert!(!c.remove_if_empty().unwrap());
        drop(c);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn blocks_are_reserved_a_chunk_ahead_of_use() {
        use std::os::unix::fs::MetadataExt;
        let dir = std::env::temp_dir().join(format!("wset-custody-r-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("vm.custody");
        let _ = std::fs::remove_file(&path);
        let header = CustodyHeader {
            granule: 4096,
            slots: 1000,
            vmm_pid: 1,
            memory_dev: 0,
            memory_ino: 0,
        };
        let mut c = Custody::create(&path, header).unwrap();
        let chunk = (RESERVE_BYTES / 4096) as u32;
        assert_eq!(c.reserved(), chunk);
        let allocated = |p: &Path| std::fs::metadata(p).unwrap().blocks() * 512;
        let at_start = allocated(&path);
        assert!(
            at_start >= HEADER_BYTES + chunk as u64 * (4096 + 8),
            "{at_start}"
        );
        let slots: Vec<u32> = (0..=chunk).map(|_| c.take().unwrap()).collect();
        assert_eq!(slots, (0..=chunk).collect::<Vec<_>>());
        assert_eq!(c.reserved(), 2 * chunk);
        assert!(allocated(&path) >= at_start + chunk as u64 * 4096);
        // A released slot is reused before a fresh one; the last chunk is
        // cut at the slot count.
        c.release(3);
        assert_eq!(c.take(), Some(3));
        while c.take().is_some() {}
        assert_eq!((c.reserved(), c.in_use()), (1000, 1000));
        assert!(c.take_reserve_error().is_none());
        drop(c);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn existing_file_is_refused() {
        let dir = std::env::temp_dir().join(format!("wset-custody-x-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("vm.custody");
        std::fs::write(&path, b"x").unwrap();
        let header = CustodyHeader {
            granule: 4096,
            slots: 1,
            vmm_pid: 1,
            memory_dev: 0,
            memory_ino: 0,
        };
        let err = Custody::create(&path, header).unwrap_err();
        assert!(err.to_string().contains("custody file"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
