//! Serving one fault: record the access, then resolve it (a page from the
//! snapshot, zeros, a page back from custody, or protection lifted). A
//! resolution the kernel refuses for now (EAGAIN: the VMM's memory map is
//! changing, and will not settle until the tracker reads the event that
//! says so) is deferred and retried from the event loop, never in a
//! recursion. When more faults are refused than the deferred queue holds,
//! the extra ones are left waiting and their threads woken once faults
//! resolve again: they fault again then. Each fault is counted once.

use std::io;
use std::sync::atomic::Ordering::Relaxed;

use super::Tracker;
use crate::plan::Dirty;
use crate::sys::{self, FileMap};
use crate::uffd::{Resolve, fault_flag};

/// Faults the deferred queue holds; allocated once, never grown.
pub const DEFERRED_CAP: usize = 1024;

/// What a fault message asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    /// A first access to an RWP-protected page.
    Rwp,
    /// A write to a write-protected page.
    Wp,
    /// A page not present.
    Missing,
}

/// A fault message taken apart.
#[derive(Clone, Copy, Debug)]
struct Fault {
    /// The granule, and its start address in the VMM.
    g: usize,
    ga: u64,
    kind: Kind,
    write: bool,
}

/// A fault waiting for a resolution the kernel refused, and when it came.
#[derive(Clone, Copy, Debug)]
struct Pending {
    fault: Fault,
    t0: u64,
}

/// Faults the kernel asked to retry.
#[derive(Debug)]
pub(super) struct Deferred {
    queue: Vec<Pending>,
    /// Per granule: a thread faulted on it while the queue was full and was
    /// left waiting; wake it once faults resolve again.
    rewake: Box<[bool]>,
    rewake_pending: usize,
}

impl Deferred {
    pub(super) fn new(granules: usize) -> Self {
        Self {
            queue: Vec::with_capacity(DEFERRED_CAP),
            rewake: vec![false; granules].into_boxed_slice(),
            rewake_pending: 0,
        }
    }

    /// Nothing to retry and nobody left waiting.
    pub(super) fn is_empty(&self) -> bool {
        self.queue.is_empty() && self.rewake_pending == 0
    }
}

/// A snapshot-backed VM's memory file, and which granules were served
/// from it (release populates the rest).
#[derive(Debug)]
pub(super) struct Snapshot {
    map: FileMap,
    served: Box<[bool]>,
}

impl Snapshot {
    pub(super) fn new(map: FileMap, granules: usize) -> Self {
        Self {
            map,
            served: vec![false; granules].into_boxed_slice(),
        }
    }

    /// `len` bytes at `off` of the memory file, if it holds them.
    pub(super) fn get(&self, off: u64, len: u64) -> Option<&[u8]> {
        self.map.get(off, len)
    }

    pub(super) fn served(&self, g: usize) -> bool {
        self.served[g]
    }

    pub(super) fn mark_served(&mut self, g: usize) {
        self.served[g] = true;
    }

    pub(super) fn granules(&self) -> usize {
        self.served.len()
    }
}

impl Tracker {
    /// Serve one fault message that arrived at `t0`.
    #[inline]
    pub(super) fn fault(&mut self, address: u64, flags: u64, t0: u64) -> io::Result<()> {
        let Some(f) = self.note(address, flags) else {
            return Ok(());
        };
        if self.resolve(f)? {
            self.fault_done(t0);
        } else {
            self.defer(Pending { fault: f, t0 });
        }
        Ok(())
    }

    /// Count the fault and record the access, once per message.
    #[inline]
    fn note(&mut self, address: u64, flags: u64) -> Option<Fault> {
        let Some((g, ga)) = self.map.locate(address) else {
            self.shared.counters.events_dropped.fetch_add(1, Relaxed);
            return None;
        };
        let kind = if flags & fault_flag::RWP != 0 {
            Kind::Rwp
        } else if flags & fault_flag::WP != 0 {
            Kind::Wp
        } else {
            Kind::Missing
        };
        let write = kind == Kind::Wp || flags & fault_flag::WRITE != 0;
        let c = &self.shared.counters;
        let counter = match (kind, write) {
            (Kind::Rwp, false) => &c.rwp_read_faults,
            (Kind::Rwp, true) => &c.rwp_write_faults,
            (Kind::Wp, _) => &c.wp_faults,
            (Kind::Missing, _) => &c.missing_faults,
        };
        counter.fetch_add(1, Relaxed);
        let e = self.shared.epoch();
        self.sampler.note(&self.shared, g, e, write);
        self.shared.record(g, e, write);
        Some(Fault { g, ga, kind, write })
    }

    /// Resolve `f`; false when the kernel says to try again later.
    #[inline]
    fn resolve(&mut self, f: Fault) -> io::Result<bool> {
        let granule = self.granule();
        let slot = self.pages.slot(f.g);
        if slot.is_none() {
            // Accessed: the granule must be re-armed at the next tick.
            self.pages.accessed(f.g);
        }
        let res = match slot {
            // A page in custody comes back, whichever fault it was.
            Some(slot) => self.restore(f.g, f.ga, slot, f.write)?,
            // Releasing the page wakes the thread waiting on it.
            None if f.kind == Kind::Rwp => self.uffd.rw_protect(f.ga, granule, false)?,
            None if f.kind == Kind::Wp => self.uffd.write_protect(f.ga, granule, false, false)?,
            None => self.serve_fresh(f.g, f.ga, f.write)?,
        };
        match res {
            Resolve::Done | Resolve::Gone => Ok(true),
            Resolve::Exists => {
                // Another fault on the same granule was served first.
                self.uffd.wake(f.ga, granule)?;
                Ok(true)
            }
            Resolve::Again => {
                self.shared.counters.retries.fetch_add(1, Relaxed);
                Ok(false)
            }
        }
    }

    fn fault_done(&self, t0: u64) {
        self.shared.record_latency(sys::now_ns().saturating_sub(t0));
        self.shared.counters.faults_handled.fetch_add(1, Relaxed);
    }

    /// Queue a refused fault, or, with the queue full, leave its thread
    /// waiting until [`Self::rewake`].
    fn defer(&mut self, p: Pending) {
        let d = &mut self.deferred;
        if d.queue.len() < DEFERRED_CAP {
            d.queue.push(p);
            return;
        }
        self.shared.counters.faults_rewoken.fetch_add(1, Relaxed);
        if !d.rewake[p.fault.g] {
            d.rewake[p.fault.g] = true;
            d.rewake_pending += 1;
        }
    }

    /// Retry every deferred fault once, keeping those refused again; once
    /// none is left, wake the threads left waiting.
    pub(super) fn retry_deferred(&mut self) -> io::Result<()> {
        let mut kept = 0;
        for i in 0..self.deferred.queue.len() {
            let p = self.deferred.queue[i];
            if self.resolve(p.fault)? {
                self.fault_done(p.t0);
            } else {
                self.deferred.queue[kept] = p;
                kept += 1;
            }
        }
        self.deferred.queue.truncate(kept);
        if kept == 0 && self.deferred.rewake_pending > 0 {
            self.rewake()?;
        }
        Ok(())
    }

    /// Wake the threads left waiting while the queue was full; each faults
    /// again if its page still needs us.
    fn rewake(&mut self) -> io::Result<()> {
        let granule = self.granule();
        for g in 0..self.deferred.rewake.len() {
            if std::mem::take(&mut self.deferred.rewake[g]) {
                self.uffd.wake(self.map.granule_addr(g), granule)?;
            }
        }
        self.deferred.rewake_pending = 0;
        Ok(())
    }

    /// Whether a later write to granule `g` must fault (so a page served for
    /// a read is mapped write-protected).
    #[inline]
    fn watches_writes(&self, g: usize) -> bool {
        writes_fault(&self.plan, &self.shared, g)
    }

    /// Serve a first touch (or a touch after the VMM dropped the page): from
    /// the snapshot file when there is one, else zeros.
    #[inline]
    fn serve_fresh(&mut self, g: usize, ga: u64, write: bool) -> io::Result<Resolve> {
        let wp = !write && self.watches_writes(g);
        let granule = self.granule();
        let removed = std::mem::replace(&mut self.removed[g], false);
        if let Some(s) = &mut self.snapshot {
            s.served[g] = true;
        }
        if !removed {
            self.record_touch(g);
        }
        let src = match &self.snapshot {
            Some(s) if !removed => s.get(self.map.file_offset(g), granule),
            _ => None,
        };
        self.uffd.copy(ga, src.unwrap_or(&self.zero), wp)
    }

    /// Put a page from custody back into the guest.
    fn restore(&mut self, g: usize, ga: u64, slot: u32, write: bool) -> io::Result<Resolve> {
        if self.plan.dirty == Dirty::SoftDirty {
            return self.restore_through_file(g, ga, slot);
        }
        let wp = !write && self.watches_writes(g);
        let r = self.uffd.copy(ga, self.pages.slot_data(slot), wp)?;
        match r {
            Resolve::Done | Resolve::Exists => {
                // Exists: something put a page there other than us (the VMM
                // wrote the memory file directly); its data is newer.
                self.pages.home(g, slot, &self.shared);
                self.shared.counters.refaulted_pages.fetch_add(1, Relaxed);
            }
            Resolve::Again | Resolve::Gone => {}
        }
        Ok(r)
    }

    /// Put a page from custody back by writing it into the memory file and
    /// waking the threads waiting on it: they fault again, find the page in
    /// the file and map it like any other page of it, so a read maps it
    /// clean and only a write sets its soft-dirty bit. (`UFFDIO_COPY` maps
    /// every page it places dirty, which would count each read of an
    /// evicted page as a write.)
    fn restore_through_file(&mut self, g: usize, ga: u64, slot: u32) -> io::Result<Resolve> {
        let off = self.map.file_offset(g);
        let granule = self.granule();
        // Data already there was written into the file by the VMM after the
        // eviction: it is newer than ours.
        if !self.pages.has_data(off, granule) {
            self.pages.write_back(off, slot)?;
        }
        self.pages.home(g, slot, &self.shared);
        self.shared.counters.refaulted_pages.fetch_add(1, Relaxed);
        self.uffd.wake(ga, granule)?;
        Ok(Resolve::Done)
    }
}

/// Whether a later write to granule `g` must fault under `plan`: a page
/// put in for a read (served, or prefetched) is then mapped write-protected.
#[inline]
pub(super) fn writes_fault(plan: &crate::plan::Plan, shared: &crate::VmShared, g: usize) -> bool {
    match plan.dirty {
        Dirty::WpAsync | Dirty::WpSync => true,
        Dirty::Watched => shared.in_sample(g),
        // Soft-dirty bits see writes without any protection.
        Dirty::SoftDirty | Dirty::None => false,
    }
}
