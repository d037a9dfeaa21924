//! Guest pages the tracker takes out of guest memory and holds: saved into
//! the custody file and punched out of the memory file (so the next access
//! faults and the page comes back), and, when the tracker ends, every one
//! put back. Custody's invariant: a page's data is in the custody file
//! before its hole is punched, and leaves the custody file only once it is
//! back in guest memory or in the memory file.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::atomic::Ordering::Relaxed;

use super::Tracker;
use crate::custody::Custody;
use crate::plan::Access;
use crate::shared::VmShared;
use crate::sys;
use crate::uffd::Resolve;

/// `slot_of` values that are not custody slots: not armed.
pub(super) const UNARMED: u32 = u32::MAX;
/// Armed without custody: the granule is a hole in the memory file, so its
/// next access faults anyway.
pub(super) const ARMED_HOLE: u32 = u32::MAX - 1;

/// What [`Tracker::evict`] did with a granule.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Evict {
    /// Saved to custody and punched: its next access faults.
    Saved,
    /// A hole already: its next access faults anyway.
    Hole,
    /// Left in place (the VMM is gone, or the kernel would not punch it).
    Kept,
    /// Custody is full.
    Full,
}

#[derive(Debug)]
pub(super) struct CustodyPages {
    custody: Option<Custody>,
    /// The custody file could not grow past this many slots the last time
    /// it was asked to (its filesystem is full): logged when it starts and
    /// when it ends.
    stuck: Option<u32>,
    /// Per granule: custody slot, [`ARMED_HOLE`] or [`UNARMED`] (access
    /// methods and eviction only; empty otherwise).
    slot_of: Box<[u32]>,
    /// The guest memory's memfd, for shmem/hugetlb guests.
    memory: Option<File>,
    /// The memory file is on hugetlbfs, where `SEEK_DATA` sees no holes and
    /// a punch always frees whole huge pages.
    hugetlbfs: bool,
}

/// Whether `file` holds data (not a hole) anywhere in `[off, off+len)`.
fn has_data(file: &File, off: u64, len: u64) -> bool {
    sys::seek_data(file, off).is_some_and(|d| d < off + len)
}

impl CustodyPages {
    pub(super) fn new(
        custody: Option<Custody>,
        memory: Option<File>,
        hugetlbfs: bool,
        granules: usize,
    ) -> Self {
        Self {
            custody,
            stuck: None,
            slot_of: vec![UNARMED; granules].into_boxed_slice(),
            memory,
            hugetlbfs,
        }
    }

    /// Granule `g`'s custody slot, if its page is held.
    #[inline]
    pub(super) fn slot(&self, g: usize) -> Option<u32> {
        match self.slot_of.get(g) {
            Some(&s) if s < ARMED_HOLE => Some(s),
            _ => None,
        }
    }

    /// Whether granule `g` waits to be armed (neither held nor a hole).
    #[inline]
    pub(super) fn unarmed(&self, g: usize) -> bool {
        self.slot_of[g] == UNARMED
    }

    /// Whether granule `g`'s page is held in custody.
    #[inline]
    pub(super) fn held(&self, g: usize) -> bool {
        self.slot_of[g] < ARMED_HOLE
    }

    /// Granule `g` was accessed: it must be armed again.
    #[inline]
    pub(super) fn accessed(&mut self, g: usize) {
        if let Some(s) = self.slot_of.get_mut(g) {
            *s = UNARMED;
        }
    }

    /// A held page's data.
    #[inline]
    pub(super) fn slot_data(&self, slot: u32) -> &[u8] {
        self.custody
            .as_ref()
            .expect("custody slot without custody")
            .slot(slot)
    }

    pub(super) fn is_custody(&self) -> bool {
        self.custody.is_some()
    }

    /// Whether the memory file holds data anywhere in `[off, off+len)`.
    pub(super) fn has_data(&self, off: u64, len: u64) -> bool {
        self.memory.as_ref().is_some_and(|f| has_data(f, off, len))
    }

    pub(super) fn on_hugetlbfs(&self) -> bool {
        self.hugetlbfs
    }

    /// Write a held page into the memory file at `off`.
    pub(super) fn write_back(&self, off: u64, slot: u32) -> io::Result<()> {
        let Some(mfd) = &self.memory else {
            return Err(io::Error::other("no memory fd"));
        };
        mfd.write_all_at(self.slot_data(slot), off)
    }

    /// Granule `g`'s page is back in the guest: free its custody slot.
    pub(super) fn home(&mut self, g: usize, slot: u32, shared: &VmShared) {
        self.custody
            .as_mut()
            .expect("custody slot without custody")
            .release(slot);
        self.slot_of[g] = UNARMED;
        shared.counters.pages_in_custody.fetch_sub(1, Relaxed);
    }

    /// The custody file's path, for messages.
    pub(super) fn path_display(&self) -> String {
        self.custody
            .as_ref()
            .map(|c| c.path().display().to_string())
            .unwrap_or_default()
    }

    /// How many granules `slot_of` covers (0 without custody).
    pub(super) fn granules(&self) -> usize {
        self.slot_of.len()
    }
}

impl Tracker {
    /// Save granule `g` into custody and punch its hole.
    pub(super) fn evict(&mut self, g: usize) -> io::Result<Evict> {
        let granule = self.granule();
        let off = self.map.file_offset(g);
        let ga = self.map.granule_addr(g);
        let rwp = matches!(self.plan.access, Access::Rwp { .. });
        let CustodyPages {
            custody,
            stuck,
            slot_of,
            memory,
            hugetlbfs,
        } = &mut self.pages;
        let mfd = memory.as_ref().expect("custody without memory fd");
        // A hole faults on its next access anyway: armed for free.
        if !*hugetlbfs && !has_data(mfd, off, granule) {
            slot_of[g] = ARMED_HOLE;
            return Ok(Evict::Hole);
        }
        let custody = custody.as_mut().expect("eviction without custody");
        let Some(slot) = custody.take() else {
            if let Some(e) = custody.take_reserve_error()
                && stuck.is_none()
            {
                *stuck = Some(custody.reserved());
                tracing::warn!(
                    vm = %self.name,
                    file = %custody.path().display(),
                    held = custody.in_use(),
                    error = %e,
                    "custody file cannot grow: custody is full until its filesystem has room \
                     (pages stay in guest memory; tracking is coarser). Free space in the \
                     state directory or lower --custody-max-bytes"
                );
            }
            return Ok(Evict::Full);
        };
        if stuck.is_some_and(|r| custody.reserved() > r) {
            *stuck = None;
            tracing::info!(vm = %self.name, "custody file grows again");
        }
        // 1. Freeze: from here a guest write waits on a WP fault we serve
        // later. Under RWP the page is frozen already: it is protected (not
        // accessed since the last harvest) and the harvest runs in sync mode.
        if !rwp && self.uffd.write_protect(ga, granule, true, true)? == Resolve::Gone {
            custody.release(slot);
            return Ok(Evict::Kept);
        }
        // 2. Save the granule into the custody file.
        if let Err(err) = mfd.read_exact_at(custody.slot_mut(slot), off) {
            custody.release(slot);
            return Err(io::Error::new(
                err.kind(),
                format!("saving page at offset {off:#x}: {err}"),
            ));
        }
        custody.commit(slot, off);
        // 3. Punch: the next access faults MISSING and gets the page back.
        if let Err(err) = sys::punch_hole(mfd, off, granule) {
            // The page is still there: nothing lost, but this granule is not armed.
            custody.release(slot);
            return Err(io::Error::new(
                err.kind(),
                format!("punching page at offset {off:#x}: {err}"),
            ));
        }
        // A part of a large folio the kernel could not split is zeroed in
        // place rather than punched: no fault would bring the page back, so
        // put the saved copy back at once.
        if !*hugetlbfs && has_data(mfd, off, granule) {
            mfd.write_all_at(custody.slot(slot), off).map_err(|e| {
                io::Error::new(
                    e.kind(),
                    format!("page at offset {off:#x} was zeroed, not punched, and putting it back failed: {e}"),
                )
            })?;
            custody.release(slot);
            self.shared.counters.unpunchable_pages.fetch_add(1, Relaxed);
            return Ok(Evict::Kept);
        }
        slot_of[g] = slot;
        self.shared.counters.pages_in_custody.fetch_add(1, Relaxed);
        Ok(Evict::Saved)
    }

    /// Leave the guest as if we had never been there: every page in custody
    /// back, the snapshot's unserved pages populated, protection removed,
    /// ranges unregistered. Returns pages that could not be put back.
    pub(super) fn release(&mut self, vmm_alive: bool) -> u32 {
        let mut left = 0;
        for g in 0..self.pages.granules() {
            let Some(slot) = self.pages.slot(g) else {
                continue;
            };
            let ga = self.map.granule_addr(g);
            let put_back = vmm_alive
                && matches!(
                    self.uffd.copy(ga, self.pages.slot_data(slot), false),
                    Ok(Resolve::Done | Resolve::Exists)
                );
            // Without the VMM (or if the copy failed), write the page into the
            // memory file itself so the data outlives us.
            let ok = put_back || self.pages.write_back(self.map.file_offset(g), slot).is_ok();
            if ok {
                self.pages.home(g, slot, &self.shared);
            } else {
                left += 1;
            }
        }
        if vmm_alive {
            self.populate_unserved();
            let rwp = matches!(self.plan.access, Access::Rwp { .. });
            for r in self.map.regions() {
                if rwp {
                    let _ = self.uffd.rw_protect(r.host_addr, r.len, false);
                } else {
                    let _ = self.uffd.write_protect(r.host_addr, r.len, false, false);
                }
                let _ = self.uffd.unregister(r.host_addr, r.len);
            }
        }
        if let Some(c) = &self.pages.custody {
            let _ = c.remove_if_empty();
        }
        left
    }

    /// Before unregistering a snapshot-backed VM, copy in every page it has
    /// not touched yet: once unregistered, the kernel would zero-fill them.
    fn populate_unserved(&mut self) {
        let Some(s) = &self.snapshot else { return };
        let granule = self.granule();
        for g in 0..s.granules() {
            if s.served(g) || self.removed[g] {
                continue;
            }
            let Some(src) = s.get(self.map.file_offset(g), granule) else {
                continue;
            };
            let _ = self.uffd.copy_dontwake(self.map.granule_addr(g), src);
        }
        for r in self.map.regions() {
            let _ = self.uffd.wake(r.host_addr, r.len);
        }
    }
}
