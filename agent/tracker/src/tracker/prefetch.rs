//! Restore prefetch and first-touch recording, for VMs restored from a
//! snapshot file.
//!
//! The prefetch copies a planned list of granules (the agent learned it
//! from earlier restores; `wset_agent::prefetch`) from the snapshot file,
//! in runs of granules contiguous in guest memory and in the file, in the
//! list's order. It runs between fault batches, one chunk of at most
//! [`CHUNK_GRANULES`] per step, so a fault is always served first and a
//! vCPU that faults while a chunk is copied waits for that chunk at most.
//!
//! The recorder keeps the order of the guest's first touches over a span
//! after the restore, and which granules the prefetch copied (the guest's
//! touches of those raise no fault, so this restore says nothing of them),
//! and writes both out once, for the agent to learn from. Its buffers are
//! sized to the VM up front: recording a fault does not allocate.

#![forbid(unsafe_code)]

use std::io;
use std::path::PathBuf;
use std::sync::atomic::Ordering::Relaxed;

use super::Tracker;
use crate::sys;
use crate::uffd::Resolve;

/// Granules copied per ioctl at most: a fault arriving during a copy waits
/// for one chunk (64 KiB of 4 KiB pages; 32 MiB of 2 MiB ones).
pub const CHUNK_GRANULES: usize = 16;

/// What the prefetch still has to copy.
#[derive(Debug)]
pub(super) struct Prefetch {
    order: Vec<u32>,
    next: usize,
}

impl Prefetch {
    pub(super) fn new(order: Vec<u32>) -> Option<Self> {
        (!order.is_empty()).then_some(Self { order, next: 0 })
    }
}

/// A recording of one restore's first touches.
#[derive(Debug)]
pub(super) struct Recorder {
    touched: Vec<u32>,
    seen: Box<[bool]>,
    prefetched: Vec<u32>,
    probes: Vec<u32>,
    until_ns: u64,
    path: PathBuf,
}

/// The recording file: `WSETREC1`, then little-endian u32s: granules,
/// touched count, prefetched count, the touched granules in first-touch
/// order, the prefetched granules.
pub const RECORD_MAGIC: &[u8; 8] = b"WSETREC1";

impl Recorder {
    pub(super) fn new(path: PathBuf, span_ns: u64, granules: usize, probes: Vec<u32>) -> Self {
        Self {
            touched: Vec::with_capacity(granules),
            seen: vec![false; granules].into_boxed_slice(),
            prefetched: Vec::with_capacity(granules),
            probes: probes
                .into_iter()
                .filter(|&g| (g as usize) < granules)
                .collect(),
            until_ns: sys::now_ns().saturating_add(span_ns),
            path,
        }
    }

    /// A first touch of `g` (a MISSING fault served from the snapshot).
    #[inline]
    pub(super) fn touched(&mut self, g: usize) {
        if !self.seen[g] && sys::now_ns() < self.until_ns {
            self.seen[g] = true;
            self.touched.push(g as u32);
        }
    }

    fn write(&self) -> io::Result<()> {
        let mut b = Vec::with_capacity(20 + 4 * (self.touched.len() + self.prefetched.len()));
        b.extend_from_slice(RECORD_MAGIC);
        for v in [
            self.seen.len() as u32,
            self.touched.len() as u32,
            self.prefetched.len() as u32,
        ] {
            b.extend_from_slice(&v.to_le_bytes());
        }
        for &g in self.touched.iter().chain(&self.prefetched) {
            b.extend_from_slice(&g.to_le_bytes());
        }
        // Written whole under a temporary name, then renamed: a reader never
        // sees half a recording.
        let tmp = self.path.with_extension("tmp");
        std::fs::write(&tmp, &b)?;
        std::fs::rename(&tmp, &self.path)
    }
}

impl Tracker {
    /// Whether the prefetch has copying left to do.
    pub(super) fn prefetching(&self) -> bool {
        self.prefetch.is_some()
    }

    /// Copy the next run of planned granules, at most one chunk.
    pub(super) fn prefetch_step(&mut self) -> io::Result<()> {
        let (Some(p), Some(snap)) = (&mut self.prefetch, &mut self.snapshot) else {
            self.prefetch = None;
            return Ok(());
        };
        let usable = |g: usize, snap: &super::fault::Snapshot, removed: &[bool]| {
            g < snap.granules() && !snap.served(g) && !removed[g]
        };
        while p.next < p.order.len() && !usable(p.order[p.next] as usize, snap, &self.removed) {
            p.next += 1;
        }
        if p.next == p.order.len() {
            self.prefetch = None;
            return Ok(());
        }
        let map = &self.map;
        let gb = map.granule();
        let g0 = p.order[p.next] as usize;
        let (ga0, off0) = (map.granule_addr(g0), map.file_offset(g0));
        // A run: the next granules of the list that follow g0 in guest
        // memory and in the file.
        let mut n = 1;
        while n < CHUNK_GRANULES && p.next + n < p.order.len() {
            let g = p.order[p.next + n] as usize;
            let k = n as u64;
            if g != g0 + n
                || !usable(g, snap, &self.removed)
                || map.granule_addr(g) != ga0 + k * gb
                || map.file_offset(g) != off0 + k * gb
            {
                break;
            }
            n += 1;
        }
        let Some(src) = snap.get(off0, n as u64 * gb) else {
            // Past the file's end: nothing to copy there.
            p.next += n;
            return Ok(());
        };
        // Write-protected where later writes must fault, as a page served
        // for a read is.
        let wp = super::fault::writes_fault(&self.plan, &self.shared, g0);
        let (copied, r) = self.uffd.copy_run(ga0, src, wp)?;
        let done = ((copied / gb) as usize).min(n);
        for g in g0..g0 + done {
            snap.mark_served(g);
            if let Some(rec) = &mut self.recorder {
                rec.prefetched.push(g as u32);
            }
        }
        self.shared
            .counters
            .prefetched_pages
            .fetch_add(done as u64, Relaxed);
        match r {
            Resolve::Done => p.next += n,
            // Present already (the guest's fault won, or the VMM wrote it):
            // skip it.
            Resolve::Exists => {
                snap.mark_served(g0 + done);
                p.next += done + 1;
            }
            // The memory map is changing: the rest of the run next time.
            Resolve::Again => p.next += done,
            Resolve::Gone => self.prefetch = None,
        }
        Ok(())
    }

    /// Record a first touch, if a recording is under way.
    #[inline]
    pub(super) fn record_touch(&mut self, g: usize) {
        if let Some(r) = &mut self.recorder {
            r.touched(g);
        }
    }

    /// Write the recording out once its span is over (or the VM's tracking
    /// ends, with what it has).
    pub(super) fn finish_recording(&mut self, force: bool) {
        let due = self
            .recorder
            .as_ref()
            .is_some_and(|r| force || sys::now_ns() >= r.until_ns);
        if !due {
            return;
        }
        let r = self.recorder.take().expect("checked");
        let untouched = r.probes.iter().filter(|&&g| !r.seen[g as usize]).count();
        let c = &self.shared.counters;
        c.prefetch_probes.store(r.probes.len() as u64, Relaxed);
        c.prefetch_probes_untouched.store(untouched as u64, Relaxed);
        match r.write() {
            Ok(()) => tracing::info!(
                vm = %self.name,
                touched = r.touched.len(),
                prefetched = r.prefetched.len(),
                file = %r.path.display(),
                "restore recording written"
            ),
            Err(e) => tracing::warn!(
                vm = %self.name,
                error = %e,
                file = %r.path.display(),
                "restore recording not written; the next restore learns without it"
            ),
        }
    }
}
