//! The store's key table: every sled tree, the layout of its keys and what
//! its values hold, and the functions that build and read those keys. This
//! is the one description of the layout; ARCHITECTURE.md points here.
//!
//! Ids never contain a NUL byte, so `id ‖ 0x00` is a prefix no other id
//! shares (`vm-1` never reads `vm-10`'s keys); integers are big-endian, so
//! keys sort by time.
//!
//! | tree | key | value |
//! |---|---|---|
//! | `vm_points` | `vm_id ‖ 0x00 ‖ bucket_ms:u64 ‖ t_ms:u64` | one `VmHistoryPoint` |
//! | `vm_blocks` | `vm_id ‖ 0x00 ‖ bucket_ms:u64 ‖ last_t_ms:u64` | a closed block of `VmHistoryPoint`s ([`super::codec`]) |
//! | `host_points` | `host_id ‖ 0x00 ‖ bucket_ms:u64 ‖ t_ms:u64` | one `HostHistoryPoint` |
//! | `host_blocks` | `host_id ‖ 0x00 ‖ bucket_ms:u64 ‖ last_t_ms:u64` | a closed block of `HostHistoryPoint`s |
//! | `host_events` | `host_id ‖ 0x00 ‖ t_ms:u64 ‖ seq:u32` | one `HostEvent` |
//! | `vms` | `vm_id` | the `ClusterVm` record, without `latest` |
//! | `hosts` | `host_id` | the agent's last `HostFacts` |
//! | `meta` | `mark:2 ‖ tag:1 ‖ id ‖ 0x00 ‖ bucket_ms:u64` | a watermark, `t_ms:u64` |
//!
//! `bucket_ms` is 0 for raw samples, else the rollup's bucket length: one
//! VM (or host) at one resolution over a time range is one contiguous key
//! range, and a changed rollup configuration never misreads old series.
//! `seq` tells apart events of one host in the same millisecond.
//!
//! In `meta`, `mark` is `wm` (the rollup watermark: buckets before `t_ms`
//! are rolled up into the series of `bucket_ms`) or `lb` (the long-block
//! watermark: blocks of the series of `bucket_ms` before `t_ms` are merged
//! into long blocks), and `tag` is `v` for a VM's series, `h` for a host's.

use std::ops::Range;

/// The trees, by name.
pub(super) const VM_POINTS: &str = "vm_points";
pub(super) const VM_BLOCKS: &str = "vm_blocks";
pub(super) const HOST_POINTS: &str = "host_points";
pub(super) const HOST_BLOCKS: &str = "host_blocks";
pub(super) const HOST_EVENTS: &str = "host_events";
pub(super) const VMS: &str = "vms";
pub(super) const HOSTS: &str = "hosts";
pub(super) const META: &str = "meta";

/// The `tag` of a VM's series in `meta`.
pub(super) const VM_TAG: u8 = b'v';
/// The `tag` of a host's series in `meta`.
pub(super) const HOST_TAG: u8 = b'h';

/// The watermarks kept in `meta`, per series.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Mark {
    /// How far the series below is rolled up into this one (`wm`).
    Rollup,
    /// How far this series' blocks are merged into long blocks (`lb`).
    LongBlocks,
}

impl Mark {
    pub(super) const ALL: [Mark; 2] = [Mark::Rollup, Mark::LongBlocks];

    fn prefix(self) -> &'static [u8; 2] {
        match self {
            Mark::Rollup => b"wm",
            Mark::LongBlocks => b"lb",
        }
    }
}

/// The prefix of every key of one series: `id ‖ 0x00 ‖ bucket_ms`.
pub(super) fn series(id: &str, bucket_ms: u64) -> Vec<u8> {
    let mut k = Vec::with_capacity(id.len() + 17);
    k.extend_from_slice(id.as_bytes());
    k.push(0);
    k.extend_from_slice(&bucket_ms.to_be_bytes());
    k
}

/// A point's key (or a block's, by its last point's time).
pub(super) fn point_key(id: &str, bucket_ms: u64, t_ms: u64) -> Vec<u8> {
    let mut k = series(id, bucket_ms);
    k.extend_from_slice(&t_ms.to_be_bytes());
    k
}

/// The keys of one series' points (or blocks) timed in `[start_ms, end_ms)`.
pub(super) fn points(id: &str, bucket_ms: u64, start_ms: u64, end_ms: u64) -> Range<Vec<u8>> {
    point_key(id, bucket_ms, start_ms)..point_key(id, bucket_ms, end_ms)
}

/// A watermark's key in `meta`.
pub(super) fn mark_key(mark: Mark, tag: u8, id: &str, bucket_ms: u64) -> Vec<u8> {
    let p = mark.prefix();
    let mut k = vec![p[0], p[1], tag];
    k.extend_from_slice(&series(id, bucket_ms));
    k
}

/// A host event's key.
pub(super) fn event_key(host: &str, t_ms: u64, seq: u32) -> Vec<u8> {
    let mut k = Vec::with_capacity(host.len() + 13);
    k.extend_from_slice(host.as_bytes());
    k.push(0);
    k.extend_from_slice(&t_ms.to_be_bytes());
    k.extend_from_slice(&seq.to_be_bytes());
    k
}

/// The time of a point or block key (its last 8 bytes; every such key the
/// store reads is longer, being in a series' range).
pub(super) fn key_time(k: &[u8]) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&k[k.len() - 8..]);
    u64::from_be_bytes(b)
}

/// The time a watermark value holds; `None` unless it is 8 bytes.
pub(super) fn mark_time(v: &[u8]) -> Option<u64> {
    <[u8; 8]>::try_from(v).ok().map(u64::from_be_bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_laid_out_as_the_table_says() {
        assert_eq!(
            point_key("vm", 60_000, 5),
            [
                b"vm\0".as_slice(),
                &60_000u64.to_be_bytes(),
                &5u64.to_be_bytes()
            ]
            .concat()
        );
        assert_eq!(
            mark_key(Mark::LongBlocks, VM_TAG, "vm", 0),
            [b"lbvvm\0".as_slice(), &0u64.to_be_bytes()].concat()
        );
        assert_eq!(
            event_key("h", 7, 2),
            [b"h\0".as_slice(), &7u64.to_be_bytes(), &2u32.to_be_bytes()].concat()
        );
        assert_eq!(key_time(&point_key("vm", 1, 42)), 42);
        assert_eq!(mark_time(&42u64.to_be_bytes()), Some(42));
        assert_eq!(mark_time(&[1, 2, 3]), None);
        // An id that is a prefix of another's never shares its keys.
        let r = points("vm-1", 0, 0, u64::MAX);
        assert!(!r.contains(&point_key("vm-10", 0, 5)));
    }
}
