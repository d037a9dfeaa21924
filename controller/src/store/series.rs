//! Reading one series (a VM's or a host's, at one resolution): its single
//! points and its closed blocks, merged into one run in time order.
//!
//! Blocks never overlap and are keyed by their last point's time, so the
//! block that holds a time is the first block key at or after it. A single
//! point wins over a packed point of the same time: it is the later write
//! (a late point, or a crash between packing a block and removing the
//! single keys it replaced).

use prost::Message;

use super::StoreError;
use super::codec::{block_len, decode, decode_block};
use super::keys::{key_time, point_key, points, series};
use crate::history::{Mergeable, Timed};

/// One kind of series: single points, and the closed blocks they are
/// packed into.
#[derive(Clone, Debug)]
pub(super) struct Series {
    pub(super) points: sled::Tree,
    pub(super) blocks: sled::Tree,
    /// What a point is called in errors.
    pub(super) what: &'static str,
    /// The series' tag in `meta` keys.
    pub(super) tag: u8,
}

/// Two runs sorted by time merged into one, a single point winning over a
/// packed one of the same time (it is the later write).
pub(super) fn merge_sorted<M: Timed>(packed: Vec<M>, single: Vec<M>) -> Vec<M> {
    let mut out = Vec::with_capacity(packed.len() + single.len());
    let mut s = single.into_iter().peekable();
    for p in packed {
        while let Some(q) = s.next_if(|q| q.timestamp_ms() <= p.timestamp_ms()) {
            let same = q.timestamp_ms() == p.timestamp_ms();
            out.push(q);
            if same {
                break;
            }
        }
        if out.last().map(Timed::timestamp_ms) != Some(p.timestamp_ms()) {
            out.push(p);
        }
    }
    out.extend(s);
    out
}

impl Series {
    /// Points of one series in `[start_ms, end_ms)`, at most `limit`, from
    /// blocks and single keys.
    pub(super) fn range<M: Message + Default + Timed>(
        &self,
        id: &str,
        bucket_ms: u64,
        start_ms: u64,
        end_ms: u64,
        limit: usize,
    ) -> Result<Vec<M>, StoreError> {
        if start_ms >= end_ms || limit == 0 {
            return Ok(Vec::new());
        }
        // A block is keyed by its last point, so the first block that can
        // hold a point at or after `start_ms` is the first key at or after
        // it; blocks never overlap, so reading stops at the first one that
        // reaches `end_ms` or once `limit` points are in hand.
        let mut packed = Vec::new();
        for kv in self
            .blocks
            .range(point_key(id, bucket_ms, start_ms)..=point_key(id, bucket_ms, u64::MAX))
        {
            let (k, v) = kv?;
            packed.extend(
                decode_block::<M>(self.what, &v)?
                    .into_iter()
                    .filter(|p| (start_ms..end_ms).contains(&p.timestamp_ms())),
            );
            if key_time(&k) >= end_ms || packed.len() >= limit {
                break;
            }
        }
        let single = self
            .points
            .range(points(id, bucket_ms, start_ms, end_ms))
            .take(limit)
            .map(|kv| Ok(decode(self.what, &kv?.1)?))
            .collect::<Result<Vec<M>, StoreError>>()?;
        let mut all = merge_sorted(packed, single);
        all.truncate(limit);
        Ok(all)
    }

    /// How many points one series has in `[start_ms, end_ms)`, without
    /// decoding them: single keys, and the blocks keyed in the range by
    /// their framing (exact for ranges of whole blocks).
    pub(super) fn count(
        &self,
        id: &str,
        bucket_ms: u64,
        start_ms: u64,
        end_ms: u64,
    ) -> Result<usize, StoreError> {
        let mut n = 0;
        for kv in self.points.range(points(id, bucket_ms, start_ms, end_ms)) {
            kv?;
            n += 1;
        }
        for kv in self.blocks.range(points(id, bucket_ms, start_ms, end_ms)) {
            n += block_len(self.what, &kv?.1)?;
        }
        Ok(n)
    }

    /// The first point of a series.
    pub(super) fn first<M: Message + Default + Mergeable>(
        &self,
        id: &str,
        bucket_ms: u64,
    ) -> Result<Option<M>, StoreError> {
        let pre = series(id, bucket_ms);
        let single: Option<M> = match self.points.scan_prefix(&pre).next() {
            Some(kv) => Some(decode(self.what, &kv?.1)?),
            None => None,
        };
        let packed: Option<M> = match self.blocks.scan_prefix(&pre).next() {
            Some(kv) => decode_block(self.what, &kv?.1)?.into_iter().next(),
            None => None,
        };
        Ok(match (single, packed) {
            (Some(a), Some(b)) => Some(if b.timestamp_ms() < a.timestamp_ms() {
                b
            } else {
                a
            }),
            (a, b) => a.or(b),
        })
    }

    /// The last point of a series.
    pub(super) fn last<M: Message + Default + Mergeable>(
        &self,
        id: &str,
        bucket_ms: u64,
    ) -> Result<Option<M>, StoreError> {
        let pre = series(id, bucket_ms);
        let single = self.points.scan_prefix(&pre).next_back().transpose()?;
        let block = self.blocks.scan_prefix(&pre).next_back().transpose()?;
        match (single, block) {
            (Some((sk, _)), Some((bk, bv))) if key_time(&bk) > key_time(&sk) => {
                Ok(decode_block(self.what, &bv)?.pop())
            }
            (Some((_, sv)), _) => Ok(Some(decode(self.what, &sv)?)),
            (None, Some((_, bv))) => Ok(decode_block(self.what, &bv)?.pop()),
            (None, None) => Ok(None),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::codec::{ZSTD_MAGIC, encode_block};
    use super::super::fixtures::{levels, point, tmp};
    use super::super::{Store, Write};
    use super::*;
    use wset_proto::v1 as pb;

    /// A damaged block is an error that names it, never a panic; a block
    /// of bare frames (written before blocks were compressed) still reads.
    #[test]
    fn damaged_and_older_blocks() {
        let dir = tmp("dmg");
        let s = Store::open(&dir, levels(), 8 << 20).unwrap();
        let mut v = encode_block("VM point", &[point(1, 1), point(2, 2)]).unwrap();
        assert!(v.starts_with(&ZSTD_MAGIC));
        v.truncate(v.len() - 3);
        s.vm.blocks.insert(point_key("vm", 0, 2), v).unwrap();
        let e = s.vm_points("vm", 0, 0, 10, 10).unwrap_err();
        assert!(e.to_string().contains("VM point"), "{e}");
        assert!(s.count_vm_points("vm", 0, 0, 10).is_err());

        let mut bare = Vec::new();
        for p in [point(3, 3), point(4, 4)] {
            p.encode_length_delimited(&mut bare).unwrap();
        }
        s.vm.blocks
            .insert(point_key("old", 0, 4), bare.clone())
            .unwrap();
        let got = s.vm_points("old", 0, 0, 10, 10).unwrap();
        assert_eq!(got, vec![point(3, 3), point(4, 4)]);
        assert_eq!(s.count_vm_points("old", 0, 0, 10).unwrap(), 2);
        bare.truncate(bare.len() - 1);
        s.vm.blocks.insert(point_key("old", 0, 4), bare).unwrap();
        let e = s.vm_points("old", 0, 0, 10, 10).unwrap_err();
        assert!(e.to_string().contains("cut short"), "{e}");
        drop(s);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn plan_points_carry_the_planners_fields() {
        let dir = tmp("plan");
        let s = Store::open(&dir, levels(), 8 << 20).unwrap();
        let mut p = point(1_000, 5);
        p.dirty_rate_bytes_per_s = 1234.5;
        let mut w = Write::default();
        w.vm_points.push(("d".into(), p.clone()));
        s.apply(&w).unwrap();
        let d = s.vm_plan_points("d", 0, 2_000).unwrap();
        assert_eq!(d.len(), 1);
        assert_eq!(
            (
                d[0].timestamp_ms,
                &d[0].windows,
                d[0].dirty_rate_bytes_per_s
            ),
            (1_000, &p.windows, 1234.5)
        );
        drop(s);
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// The merge every read relies on: a single point replaces the packed
    /// one of its time, and the runs stay in time order.
    #[test]
    fn single_points_win_over_packed_ones() {
        let packed = vec![point(1, 1), point(3, 3), point(5, 5)];
        let single = vec![point(0, 0), point(3, 30), point(6, 6)];
        let got: Vec<(u64, u64)> = merge_sorted(packed, single)
            .iter()
            .map(|p: &pb::VmHistoryPoint| (p.timestamp_ms, p.windows[0].wss_bytes))
            .collect();
        assert_eq!(got, vec![(0, 0), (1, 1), (3, 30), (5, 5), (6, 6)]);
    }
}
