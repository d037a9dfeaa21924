//! A VM's guest memory as the tracker sees it: ranges of the VMM's address
//! space cut into granules. Pure, so the tracker and the fuzzer share it.

/// One contiguous range of guest memory in the VMM's address space.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Region {
    /// Start in the VMM's address space.
    pub host_addr: u64,
    pub len: u64,
    /// Offset of this range in the memory file (memfd, or snapshot file).
    pub file_offset: u64,
}

impl Region {
    /// Whether the range overlaps `[start, end)`.
    pub fn overlaps(&self, start: u64, end: u64) -> bool {
        start < self.host_addr + self.len && self.host_addr < end
    }
}

/// A VM's ranges cut into granules: which granule a fault address falls
/// in, where a granule lives in the VMM and in the memory file, and which
/// granules a range covers wholly. Granule indices run through the regions
/// in the order given.
#[derive(Clone, Debug)]
pub struct RegionMap {
    regions: Vec<Region>,
    /// First granule index of each region.
    base: Vec<usize>,
    granule: u64,
    granules: usize,
}

impl RegionMap {
    /// `regions` sorted and apart, lengths multiples of `granule`.
    pub fn new(regions: &[Region], granule: u64) -> Self {
        let mut base = Vec::with_capacity(regions.len());
        let mut acc = 0usize;
        for r in regions {
            base.push(acc);
            acc += (r.len / granule) as usize;
        }
        Self {
            regions: regions.to_vec(),
            base,
            granule,
            granules: acc,
        }
    }

    pub fn granules(&self) -> usize {
        self.granules
    }

    /// Granule size in bytes.
    #[inline]
    pub fn granule(&self) -> u64 {
        self.granule
    }

    pub fn regions(&self) -> &[Region] {
        &self.regions
    }

    /// The granule holding `addr`, and the granule's start address.
    #[inline]
    pub fn locate(&self, addr: u64) -> Option<(usize, u64)> {
        // A VM has one to a handful of regions: a linear scan beats a search.
        for (i, r) in self.regions.iter().enumerate() {
            if addr >= r.host_addr && addr - r.host_addr < r.len {
                let within = (addr - r.host_addr) / self.granule;
                return Some((
                    self.base[i] + within as usize,
                    r.host_addr + within * self.granule,
                ));
            }
        }
        None
    }

    /// The granule of region `ri` holding `addr` (which must be in it).
    #[inline]
    pub fn granule_in(&self, ri: usize, addr: u64) -> usize {
        self.base[ri] + ((addr - self.regions[ri].host_addr) / self.granule) as usize
    }

    /// The region holding granule `g`, and `g`'s byte offset inside it.
    #[inline]
    fn region_of(&self, g: usize) -> (&Region, u64) {
        let i = self.base.partition_point(|&b| b <= g) - 1;
        (&self.regions[i], (g - self.base[i]) as u64 * self.granule)
    }

    /// Start address of granule `g` in the VMM.
    pub fn granule_addr(&self, g: usize) -> u64 {
        let (r, within) = self.region_of(g);
        r.host_addr + within
    }

    /// Offset of granule `g` in the memory file.
    pub fn file_offset(&self, g: usize) -> u64 {
        let (r, within) = self.region_of(g);
        r.file_offset + within
    }

    /// Whether `[start, end)` overlaps any region.
    pub fn overlaps(&self, start: u64, end: u64) -> bool {
        self.regions.iter().any(|r| r.overlaps(start, end))
    }

    /// The granules wholly inside `[start, end)`, in order; the work is
    /// bounded by the VM's size whatever the range.
    pub fn wholly_within(&self, start: u64, end: u64) -> impl Iterator<Item = usize> + '_ {
        self.regions.iter().enumerate().flat_map(move |(i, r)| {
            let lo = start.max(r.host_addr);
            let hi = end.min(r.host_addr.saturating_add(r.len));
            let (first, last) = if lo < hi {
                (
                    (lo - r.host_addr).div_ceil(self.granule),
                    (hi - r.host_addr) / self.granule,
                )
            } else {
                (0, 0)
            };
            (first..last.max(first)).map(move |k| self.base[i] + k as usize)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn region_map_locates_and_bounds_ranges() {
        let regions = [
            Region {
                host_addr: 0x10000,
                len: 0x3000,
                file_offset: 0,
            },
            Region {
                host_addr: 0x20000,
                len: 0x2000,
                file_offset: 0x3000,
            },
        ];
        let m = RegionMap::new(&regions, 0x1000);
        assert_eq!(m.granules(), 5);
        assert_eq!(m.locate(0x10fff), Some((0, 0x10000)));
        assert_eq!(m.locate(0x12abc), Some((2, 0x12000)));
        assert_eq!(m.locate(0x13000), None);
        assert_eq!(m.locate(0x21000), Some((4, 0x21000)));
        assert_eq!(m.locate(u64::MAX), None);
        assert_eq!(m.granule_addr(3), 0x20000);
        assert_eq!(m.file_offset(3), 0x3000);
        assert_eq!(m.file_offset(4), 0x4000);
        assert_eq!(m.granule_in(1, 0x21fff), 4);
        assert!(m.overlaps(0x12fff, 0x13001));
        assert!(!m.overlaps(0x13000, 0x20000));
        // Wholly inside only; a huge range is no more work than the VM.
        let w: Vec<usize> = m.wholly_within(0x10800, 0x21000).collect();
        assert_eq!(w, vec![1, 2, 3]);
        assert_eq!(m.wholly_within(0, u64::MAX).count(), 5);
        assert_eq!(m.wholly_within(0x21000, 0x20000).count(), 0);
        assert_eq!(m.wholly_within(0x10000, 0x10fff).count(), 0);
    }
}
