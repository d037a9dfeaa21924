//! The interval tick: harvest what the asynchronous methods saw (RWP's
//! accessed pages, WP_ASYNC's written pages, soft-dirty bits) with
//! PAGEMAP_SCAN, re-protect, evict cold pages under RWP, re-arm the access
//! sample, and advance the epoch.

use std::fs::File;
use std::io;
use std::io::Write;
use std::os::fd::AsFd;
use std::sync::atomic::Ordering::Relaxed;

use super::Tracker;
use super::custody_pages::Evict;
use super::region::Region;
use crate::plan::{Access, Dirty};
use crate::sys;
use crate::uffd::{feature, pagemap};

impl Tracker {
    /// The interval tick: harvest, re-arm, advance the epoch.
    pub(super) fn tick(&mut self) -> io::Result<()> {
        let e = self.shared.epoch();
        // A span per interval (not per fault); free when nobody listens.
        let _span = tracing::info_span!("harvest", vm = %self.name, epoch = e).entered();
        let t0 = sys::now_ns();
        if let Access::Rwp { sync } = self.plan.access {
            self.harvest_rwp(e, sync)?;
        }
        match self.plan.dirty {
            Dirty::WpAsync => self.harvest_wp_async(e)?,
            Dirty::WpSync => {
                for r in self.map.regions() {
                    let _ = self.uffd.write_protect(r.host_addr, r.len, true, true)?;
                }
            }
            Dirty::SoftDirty if !matches!(self.plan.access, Access::Rwp { .. }) => {
                self.harvest_soft_dirty(e)?;
            }
            // Watched pages are re-protected by rearm_access below; soft-dirty
            // bits beside RWP are harvested with its accesses.
            Dirty::Watched | Dirty::SoftDirty | Dirty::None => {}
        }
        if matches!(
            self.plan.access,
            Access::ShmemSampled { .. } | Access::ShmemExhaustive
        ) {
            let (a, w) = self.sampler.unseen();
            self.shared.set_unwatched(e, a, w);
            self.rearm_access(e)?;
        }
        let c = &self.shared.counters;
        c.harvest_ns
            .fetch_add(sys::now_ns().saturating_sub(t0), Relaxed);
        c.harvests.fetch_add(1, Relaxed);
        self.shared.advance_epoch(e);
        Ok(())
    }

    /// Reset the VMM's soft-dirty bits (its whole address space: the kernel
    /// offers no narrower reset).
    pub(super) fn clear_soft_dirty(&self) -> io::Result<()> {
        match &self.clear_refs {
            Some(f) => {
                let mut f: &File = f;
                f.write_all(b"4")
            }
            None => Ok(()),
        }
    }

    /// RWP harvest: freeze, scan, re-protect, evict, thaw. While frozen (sync mode)
    /// a first access to a protected page waits for this thread, so nothing
    /// slips between the scan and the re-protect or the soft-dirty reset;
    /// those accesses are served (and recorded in the next epoch) right
    /// after the tick.
    fn harvest_rwp(&mut self, e: u32, sync: bool) -> io::Result<()> {
        if !sync {
            self.uffd.set_mode(0, feature::RWP_ASYNC)?;
        }
        let r = self.scan_and_reprotect(e);
        let reset = if r.is_ok() {
            self.clear_soft_dirty()
        } else {
            Ok(())
        };
        let r = r.and_then(|()| self.evict_cold(e));
        // Thaw whatever happened: a guest must never stay frozen.
        let thaw = if sync {
            Ok(())
        } else {
            self.uffd.set_mode(feature::RWP_ASYNC, 0)
        };
        r.and(reset).and(thaw)
    }

    fn scan_and_reprotect(&mut self, e: u32) -> io::Result<()> {
        let Some(pm) = self.pagemap.as_ref() else {
            return Ok(());
        };
        let soft_dirty = self.plan.dirty == Dirty::SoftDirty;
        let anyof = pagemap::PAGE_IS_ACCESSED
            | if soft_dirty {
                pagemap::PAGE_IS_SOFT_DIRTY
            } else {
                0
            };
        let scan = pagemap::Scan {
            category_inverted: 0,
            flags: 0,
            // Only present pages: a never-touched page is not protected, but
            // it has not been accessed either.
            category_mask: pagemap::PAGE_IS_PRESENT,
            category_anyof_mask: anyof,
            return_mask: anyof | pagemap::PAGE_IS_HUGE,
        };
        let (shared, uffd, map) = (&self.shared, &self.uffd, &self.map);
        let granule = map.granule();
        scan_regions(pm, map.regions(), &mut self.scan_buf, scan, |ri, r, pr| {
            // Every write after the reset and the protect is also an
            // access, so a page that is soft-dirty but not accessed was
            // written before (at most in the first interval).
            if pr.categories & pagemap::PAGE_IS_ACCESSED == 0 {
                return Ok(());
            }
            let written = pr.categories & pagemap::PAGE_IS_SOFT_DIRTY != 0;
            if pr.categories & pagemap::PAGE_IS_HUGE != 0 {
                // A transparent huge page: protected and reported per PMD.
                shared
                    .counters
                    .huge_accessed_bytes
                    .fetch_add(pr.end - pr.start, Relaxed);
            }
            let mut a = pr.start - (pr.start - r.host_addr) % granule;
            while a < pr.end {
                shared.record(map.granule_in(ri, a), e, written);
                a += granule;
            }
            uffd.rw_protect(pr.start, pr.end - pr.start, true)?;
            Ok(())
        })
    }

    /// Soft-dirty harvest without RWP (a uffd without WP_ASYNC, such as
    /// Firecracker's): the pages written since the last reset, then the
    /// reset. Nothing freezes the guest, so a write between the scan and
    /// the reset is not seen (a window of one `clear_refs` write).
    fn harvest_soft_dirty(&mut self, e: u32) -> io::Result<()> {
        let Some(pm) = self.pagemap.as_ref() else {
            return Ok(());
        };
        let scan = pagemap::Scan {
            category_inverted: 0,
            flags: 0,
            category_mask: pagemap::PAGE_IS_SOFT_DIRTY,
            category_anyof_mask: 0,
            return_mask: pagemap::PAGE_IS_SOFT_DIRTY,
        };
        let (shared, map) = (&self.shared, &self.map);
        let granule = map.granule();
        scan_regions(pm, map.regions(), &mut self.scan_buf, scan, |ri, r, pr| {
            let mut a = pr.start - (pr.start - r.host_addr) % granule;
            while a < pr.end {
                let g = map.granule_in(ri, a);
                // The kernel marks every page it fills dirty: a page first
                // touched by a read this interval reads soft-dirty whether
                // or not it was written after (a write fault recorded it).
                let filled_by_read = shared.access_epoch(g) == e && shared.write_epoch(g) != e;
                if !filled_by_read {
                    shared.record(g, e, true);
                }
                a += granule;
            }
            Ok(())
        })?;
        self.clear_soft_dirty()
    }

    fn harvest_wp_async(&mut self, e: u32) -> io::Result<()> {
        let Some(pm) = self.pagemap.as_ref() else {
            return Ok(());
        };
        let scan = pagemap::Scan {
            category_inverted: 0,
            flags: pagemap::PM_SCAN_WP_MATCHING | pagemap::PM_SCAN_CHECK_WPASYNC,
            category_mask: pagemap::PAGE_IS_WRITTEN,
            category_anyof_mask: 0,
            return_mask: pagemap::PAGE_IS_WRITTEN | pagemap::PAGE_IS_HUGE,
        };
        let (shared, map) = (&self.shared, &self.map);
        let granule = map.granule();
        scan_regions(pm, map.regions(), &mut self.scan_buf, scan, |ri, _, pr| {
            if pr.categories & pagemap::PAGE_IS_HUGE != 0 {
                // A transparent huge page: the kernel tracks it per PMD.
                shared
                    .counters
                    .huge_written_bytes
                    .fetch_add(pr.end - pr.start, Relaxed);
            }
            let mut a = pr.start;
            while a < pr.end {
                shared.record(map.granule_in(ri, a), e, true);
                a += granule;
            }
            Ok(())
        })
    }

    /// RWP eviction, inside the harvest's freeze: every present page not
    /// accessed for `evict_after` intervals is saved to custody and punched
    /// out of the memory file. Such a page is still protected (the harvest
    /// found it not accessed) and the uffd is in sync mode, so a guest
    /// access to it waits for this thread and is served right after the
    /// tick, from custody.
    fn evict_cold(&mut self, e: u32) -> io::Result<()> {
        let after = self.plan.evict_after;
        if after == 0 || !self.pages.is_custody() {
            return Ok(());
        }
        let Some(pm) = self.pagemap.take() else {
            return Ok(());
        };
        let mut buf = std::mem::take(&mut self.scan_buf);
        let r = self.evict_cold_in(&pm, &mut buf, e, after);
        self.scan_buf = buf;
        self.pagemap = Some(pm);
        r
    }

    fn evict_cold_in(
        &mut self,
        pm: &File,
        buf: &mut [pagemap::PageRegion],
        e: u32,
        after: u32,
    ) -> io::Result<()> {
        // Present and not accessed (the accessed ones were re-protected by
        // the harvest, but their last access is this epoch).
        let scan = pagemap::Scan {
            flags: 0,
            category_inverted: pagemap::PAGE_IS_ACCESSED,
            category_mask: pagemap::PAGE_IS_PRESENT | pagemap::PAGE_IS_ACCESSED,
            category_anyof_mask: 0,
            return_mask: pagemap::PAGE_IS_HUGE,
        };
        let granule = self.granule();
        for ri in 0..self.map.regions().len() {
            let Region {
                host_addr: base,
                len,
                ..
            } = self.map.regions()[ri];
            let mut start = base;
            while start < base + len {
                let (n, walk_end) = match pagemap::scan(pm.as_fd(), start, base + len, scan, buf) {
                    Err(err) if err.raw_os_error() == Some(libc::ESRCH) => return Ok(()),
                    r => r?,
                };
                for pr in &buf[..n] {
                    // A transparent huge page is not split to evict a part
                    // of it (hugetlbfs pages are the granule itself).
                    if pr.categories & pagemap::PAGE_IS_HUGE != 0 && !self.pages.on_hugetlbfs() {
                        continue;
                    }
                    let mut a = pr.start - (pr.start - base) % granule;
                    while a < pr.end {
                        let g = self.map.granule_in(ri, a);
                        a += granule;
                        if self.pages.held(g) || e.wrapping_sub(self.shared.access_epoch(g)) < after
                        {
                            continue;
                        }
                        match self.evict(g)? {
                            Evict::Saved => {
                                self.shared.counters.evicted_pages.fetch_add(1, Relaxed);
                            }
                            Evict::Full => {
                                self.shared.counters.custody_full.fetch_add(1, Relaxed);
                                return Ok(());
                            }
                            Evict::Hole | Evict::Kept => {}
                        }
                    }
                }
                if walk_end <= start {
                    break;
                }
                start = walk_end;
            }
        }
        Ok(())
    }
}

/// PAGEMAP_SCAN every region with `scan`, calling `each(region index,
/// region, page run)` for every run reported. A VMM that is gone ends the
/// scan quietly (its pidfd says so).
fn scan_regions(
    pm: &File,
    regions: &[Region],
    buf: &mut [pagemap::PageRegion],
    scan: pagemap::Scan,
    mut each: impl FnMut(usize, &Region, &pagemap::PageRegion) -> io::Result<()>,
) -> io::Result<()> {
    for (ri, r) in regions.iter().enumerate() {
        let end = r.host_addr + r.len;
        match pagemap::scan_all(pm.as_fd(), r.host_addr, end, scan, buf, |pr| {
            each(ri, r, pr)
        }) {
            Err(e) if e.raw_os_error() == Some(libc::ESRCH) => return Ok(()),
            other => other?,
        }
    }
    Ok(())
}
