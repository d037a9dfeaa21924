//! The VMM handshake: whatever bytes arrive on the agent's socket, parsing
//! and layout validation end in a value or an error (no panic, no hang),
//! and every layout accepted is one the tracker can trust: page size a power
//! of two, regions aligned, apart, within the size limit, and for a memory
//! file in file order. The same
//! bytes as a `/proc/<pid>/maps` text go through the mapping check.

#![no_main]

use libfuzzer_sys::fuzz_target;
use wset_agent::handshake::{self, Hello, Layout};

const MAX: u64 = 1 << 40;

fn check(l: &Layout, file_backed: bool) {
    assert!(
        l.page_size.is_power_of_two() && l.page_size >= 4096,
        "{l:?}"
    );
    assert!(!l.regions.is_empty(), "{l:?}");
    assert!(l.total_bytes() <= MAX, "{l:?}");
    for r in &l.regions {
        assert!(r.len > 0 && r.len % l.page_size == 0, "{l:?}");
        assert!(r.host_addr % l.page_size == 0, "{l:?}");
        assert!(r.host_addr.checked_add(r.len).is_some(), "{l:?}");
    }
    let mut by_addr = l.regions.clone();
    by_addr.sort_by_key(|r| r.host_addr);
    for w in by_addr.windows(2) {
        assert!(w[0].host_addr + w[0].len <= w[1].host_addr, "{l:?}");
    }
    if file_backed {
        for w in l.regions.windows(2) {
            assert!(w[0].file_offset + w[0].len <= w[1].file_offset, "{l:?}");
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let _ = handshake::is_complete(data);
    match handshake::parse(data) {
        Ok(Hello::Firecracker(regions)) => {
            if let Ok(l) = handshake::firecracker_layout(&regions, MAX) {
                check(&l, true);
            }
        }
        Ok(Hello::WsetRegister(h)) => {
            if let Some(id) = &h.vm_id {
                let _ = handshake::check_vm_id(id);
            }
            if let Ok(l) = handshake::wset_layout(&h, MAX) {
                let file_backed = matches!(
                    h.backing,
                    Some(handshake::Backing::Memfd | handshake::Backing::Hugetlbfs)
                );
                check(&l, file_backed);
                if let Ok(text) = std::str::from_utf8(data) {
                    let _ = handshake::check_mapped(&l, &handshake::parse_maps(text), None);
                }
            }
        }
        _ => {}
    }
    if let Ok(text) = std::str::from_utf8(data) {
        let maps = handshake::parse_maps(text);
        let l = Layout {
            page_size: 4096,
            regions: vec![handshake::Region {
                host_addr: 0x7f00_0000_0000,
                len: 1 << 20,
                file_offset: 0,
            }],
        };
        let _ = handshake::check_mapped(&l, &maps, Some(12345));
        let _ = handshake::thp_bytes(text, &l);
    }
});
