//! The userfaultfd message decoder and what the tracker does with a
//! message before any ioctl: any 32 bytes decode to an event; a fault
//! address maps to a granule inside the VM's regions or to none; a REMOVE
//! range marks only granules wholly inside it, and costs time in proportion
//! to the VM, not to the range. Also the fdinfo `API:` line parser.

#![no_main]

use libfuzzer_sys::fuzz_target;
use wset_tracker::Region;
use wset_tracker::tracker::RegionMap;
use wset_tracker::uffd::{Event, UffdMsg, parse_fdinfo_features};

fn u64_at(b: &[u8], i: usize) -> u64 {
    u64::from_ne_bytes(b[i..i + 8].try_into().expect("8 bytes"))
}

fuzz_target!(|data: &[u8]| {
    let Some((&shape, rest)) = data.split_first() else {
        return;
    };
    // A small layout chosen by the first byte: 1-3 regions, 4 KiB or 2 MiB.
    let granule: u64 = if shape & 1 == 0 { 4096 } else { 2 << 20 };
    let n = 1 + (shape >> 1) as u64 % 3;
    let regions: Vec<Region> = (0..n)
        .map(|i| Region {
            host_addr: 0x7f00_0000_0000 + i * 64 * granule,
            len: (1 + i * 3) * granule,
            file_offset: i * 16 * granule,
        })
        .collect();
    let map = RegionMap::new(&regions, granule);
    let total = map.granules();
    for chunk in rest.chunks_exact(32) {
        let msg = UffdMsg {
            event: chunk[0],
            reserved1: chunk[1],
            reserved2: u16::from_ne_bytes([chunk[2], chunk[3]]),
            reserved3: u32::from_ne_bytes(chunk[4..8].try_into().expect("4 bytes")),
            arg: [u64_at(chunk, 8), u64_at(chunk, 16), u64_at(chunk, 24)],
        };
        match msg.decode() {
            Event::PageFault { address, .. } => {
                if let Some((g, ga)) = map.locate(address) {
                    assert!(g < total);
                    assert!(ga <= address && address - ga < granule);
                    assert_eq!(map.granule_addr(g), ga);
                }
            }
            Event::Remove { start, end } => {
                let mut count = 0;
                for g in map.wholly_within(start, end) {
                    assert!(g < total);
                    let ga = map.granule_addr(g);
                    assert!(ga >= start && ga + granule <= end);
                    count += 1;
                }
                assert!(count <= total);
            }
            _ => {}
        }
    }
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = parse_fdinfo_features(text);
    }
});
