//! History maintenance, one series at a time: rollups into coarser series,
//! packing closed blocks of single points, merging past hours of minute
//! blocks into hour blocks, and retention; VMs unseen for longer than the
//! longest retention are forgotten.
//!
//! Points arrive one key each (durable as soon as they are flushed). Once
//! a block of time (`Level::block_ms`: a minute of raw samples, 60 buckets
//! of a rollup) is closed, its points are packed into one block
//! ([`super::codec`]) keyed by its last point's time, and the single keys
//! removed. Raw samples kept 8 hours or more are packed a second time: once
//! an hour is past, its minute blocks are merged into one
//! (`Level::long_block_ms`, with a long-block watermark per series). sled
//! keeps memory per key whatever the cache size, so this is what bounds
//! the controller's memory as history accumulates (a day of a VM's raw
//! samples is 24 keys, not 8,640). Packing writes the block before removing
//! the single keys, and merges any block already there, so a crash in
//! between leaves both (readers prefer the single key; the next pass
//! finishes) and a late point is packed on the next pass. Retention drops
//! whole blocks: a block that straddles the cut stays until all of it is
//! past. A series that fails is counted and skipped; the others go on.

use prost::Message;
use wset_proto::v1 as pb;

use super::codec::{block_len, decode, decode_block, encode_block};
use super::keys::{Mark, event_key, key_time, mark_key, mark_time, point_key, points};
use super::series::{Series, merge_sorted};
use super::{Store, StoreError};
use crate::history::{Level, Mergeable, Timed, merge};

/// What a maintenance pass did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Maintenance {
    pub rollup_points: u64,
    /// Single points moved into blocks.
    pub packed_points: u64,
    /// Blocks merged away into long blocks.
    pub merged_blocks: u64,
    pub expired_points: u64,
    pub forgotten_vms: u64,
    /// Series (a VM's or a host's) whose maintenance failed; the pass went
    /// on with the others.
    pub failed_series: u64,
}

impl std::ops::AddAssign for Maintenance {
    fn add_assign(&mut self, o: Self) {
        self.rollup_points += o.rollup_points;
        self.packed_points += o.packed_points;
        self.merged_blocks += o.merged_blocks;
        self.expired_points += o.expired_points;
        self.forgotten_vms += o.forgotten_vms;
        self.failed_series += o.failed_series;
    }
}

/// One maintenance pass: what it did, the VMs it forgot (the caller drops
/// them from memory) and the first series it could not maintain.
#[derive(Debug, Default)]
pub struct Pass {
    pub done: Maintenance,
    pub forgotten: Vec<String>,
    /// Which series (`VM <id>`, `host <id>`) and why; the others that
    /// failed are only counted in `done.failed_series`.
    pub first_failure: Option<(String, StoreError)>,
}

/// The first series a maintenance pass could not maintain, and why.
#[derive(Debug, thiserror::Error)]
#[error("{series}: {source}")]
pub struct MaintenanceError {
    /// `VM <id>` or `host <id>`.
    pub series: String,
    pub source: StoreError,
}

impl Pass {
    /// The work done and the VMs forgotten, or the first failure (which
    /// series, and why).
    pub fn into_result(self) -> Result<(Maintenance, Vec<String>), MaintenanceError> {
        match self.first_failure {
            Some((series, source)) => Err(MaintenanceError { series, source }),
            None => Ok((self.done, self.forgotten)),
        }
    }

    fn failed(&mut self, what: impl FnOnce() -> String, e: StoreError) {
        self.done.failed_series += 1;
        if self.first_failure.is_none() {
            self.first_failure = Some((what(), e));
        }
    }
}

/// A stored watermark's time, or the error that says it is damaged.
fn watermark(v: &[u8]) -> Result<u64, StoreError> {
    mark_time(v).ok_or(StoreError::DamagedMark { len: v.len() })
}

impl Store {
    /// One maintenance pass over the given VMs and hosts: rollups, packing
    /// of closed blocks, then retention; VMs last seen before the longest
    /// retention are forgotten. A series that fails (a damaged point, an I/O
    /// error) is counted and skipped: one bad series never stops the
    /// maintenance of the others, and the next pass tries it again.
    pub fn maintain(
        &self,
        vms: &[(String, u64)],
        hosts: &[String],
        now_ms: u64,
        lateness_ms: u64,
    ) -> Pass {
        let mut pass = Pass::default();
        for (vm, _) in vms {
            let r = self.maintain_series::<pb::VmHistoryPoint>(
                &self.vm,
                vm,
                now_ms,
                lateness_ms,
                &mut pass.done,
            );
            if let Err(e) = r {
                pass.failed(|| format!("VM {vm}"), e);
            }
        }
        let keep = self
            .levels
            .iter()
            .map(|l| l.retention_ms)
            .max()
            .unwrap_or(0);
        for host in hosts {
            let r = self
                .maintain_series::<pb::HostHistoryPoint>(
                    &self.host,
                    host,
                    now_ms,
                    lateness_ms,
                    &mut pass.done,
                )
                .and_then(|()| self.expire_events(host, now_ms.saturating_sub(keep)));
            if let Err(e) = r {
                pass.failed(|| format!("host {host}"), e);
            }
        }
        for (vm, last_seen) in vms {
            if last_seen.saturating_add(keep) >= now_ms {
                continue;
            }
            match self.forget_vm(vm) {
                Ok(()) => pass.forgotten.push(vm.clone()),
                Err(e) => pass.failed(|| format!("VM {vm}"), e),
            }
        }
        pass.done.forgotten_vms = pass.forgotten.len() as u64;
        pass
    }

    /// Rollups, packing and retention of one series.
    fn maintain_series<M: Message + Default + Mergeable>(
        &self,
        s: &Series,
        id: &str,
        now_ms: u64,
        lateness_ms: u64,
        m: &mut Maintenance,
    ) -> Result<(), StoreError> {
        m.rollup_points += self.rollup::<M>(s, id, now_ms, lateness_ms)?;
        let horizon = now_ms.saturating_sub(lateness_ms);
        for l in &self.levels {
            let long = l.long_block_ms();
            let wm_key = mark_key(Mark::LongBlocks, s.tag, id, l.bucket_ms);
            let merged_to = match self.meta.get(&wm_key)? {
                Some(v) if long > l.block_ms() => watermark(&v)?,
                _ => 0,
            };
            m.packed_points += s.pack::<M>(id, *l, horizon, merged_to)?;
            let cut = horizon - horizon % long;
            if long > l.block_ms() && cut > merged_to {
                m.merged_blocks += s.merge_blocks::<M>(id, l.bucket_ms, long, merged_to, cut)?;
                self.meta.insert(wm_key, &cut.to_be_bytes())?;
            }
            m.expired_points += s.expire(id, l.bucket_ms, now_ms.saturating_sub(l.retention_ms))?;
        }
        Ok(())
    }

    /// Roll the raw samples of one series up into every coarser level, for
    /// buckets that ended at least `lateness_ms` before `now_ms`.
    fn rollup<M: Message + Default + Mergeable>(
        &self,
        s: &Series,
        id: &str,
        now_ms: u64,
        lateness_ms: u64,
    ) -> Result<u64, StoreError> {
        let mut written = 0;
        for pair in self.levels.windows(2) {
            let (src, dst) = (pair[0], pair[1]);
            let b = dst.bucket_ms;
            let wm_key = mark_key(Mark::Rollup, s.tag, id, b);
            let wm = match self.meta.get(&wm_key)? {
                Some(v) => watermark(&v)?,
                None => match s.first::<M>(id, src.bucket_ms)? {
                    Some(p) => {
                        let t = p.timestamp_ms();
                        t - t % b
                    }
                    None => continue,
                },
            };
            let end = now_ms.saturating_sub(lateness_ms);
            let cutoff = end - end % b;
            if cutoff <= wm {
                continue;
            }
            let pts: Vec<M> = s.range(id, src.bucket_ms, wm, cutoff, usize::MAX)?;
            let mut batch = sled::Batch::default();
            for p in merge(pts, b) {
                batch.insert(point_key(id, b, p.timestamp_ms()), p.encode_to_vec());
                written += 1;
            }
            s.points.apply_batch(batch)?;
            self.meta.insert(wm_key, &cutoff.to_be_bytes())?;
        }
        Ok(written)
    }

    /// Drop a host's events from before `cutoff_ms`.
    fn expire_events(&self, host: &str, cutoff_ms: u64) -> Result<(), StoreError> {
        let mut batch = sled::Batch::default();
        for kv in self
            .host_events
            .range(event_key(host, 0, 0)..event_key(host, cutoff_ms, 0))
        {
            batch.remove(kv?.0);
        }
        Ok(self.host_events.apply_batch(batch)?)
    }

    /// Forget a VM whose history is gone with the longest retention: its
    /// record and its watermarks.
    fn forget_vm(&self, vm: &str) -> Result<(), StoreError> {
        self.vms.remove(vm.as_bytes())?;
        let mut batch = sled::Batch::default();
        for l in &self.levels {
            for mark in Mark::ALL {
                batch.remove(mark_key(mark, self.vm.tag, vm, l.bucket_ms));
            }
        }
        Ok(self.meta.apply_batch(batch)?)
    }
}

impl Series {
    /// Pack the single points of one series whose block closed before
    /// `horizon_ms` into their blocks (merging any block already there):
    /// a point before `merged_to_ms` goes into its long block.
    /// Returns the points packed.
    fn pack<M: Message + Default + Mergeable>(
        &self,
        id: &str,
        level: Level,
        horizon_ms: u64,
        merged_to_ms: u64,
    ) -> Result<u64, StoreError> {
        let (b, short, long) = (level.bucket_ms, level.block_ms(), level.long_block_ms());
        let cutoff = horizon_ms - horizon_ms % short;
        let (mut keys, mut single) = (Vec::new(), Vec::<M>::new());
        for kv in self.points.range(points(id, b, 0, cutoff)) {
            let (k, v) = kv?;
            keys.push(k);
            single.push(decode(self.what, &v)?);
        }
        let packed = keys.len() as u64;
        if packed == 0 {
            return Ok(0);
        }
        let mut blocks = sled::Batch::default();
        while let Some(p) = single.first() {
            // Long spans are whole numbers of short ones, and `merged_to_ms`
            // a whole number of long ones: a span never crosses it.
            let t = p.timestamp_ms();
            let span = if t < merged_to_ms { long } else { short };
            let start = t - t % span;
            let n = single
                .iter()
                .take_while(|q| q.timestamp_ms() < start + span)
                .count();
            let group: Vec<M> = single.drain(..n).collect();
            let mut old = Vec::new();
            for kv in self.blocks.range(points(id, b, start, start + span)) {
                let (k, v) = kv?;
                old.extend(decode_block::<M>(self.what, &v)?);
                blocks.remove(k);
            }
            let merged = merge_sorted(old, group);
            let last = merged.last().map_or(start, Timed::timestamp_ms);
            // Inserted after the removes in the same batch: the insert wins
            // when the last point (hence the key) is unchanged.
            blocks.insert(point_key(id, b, last), encode_block(self.what, &merged)?);
        }
        self.blocks.apply_batch(blocks)?;
        let mut singles = sled::Batch::default();
        for k in keys {
            singles.remove(k);
        }
        self.points.apply_batch(singles)?;
        Ok(packed)
    }

    /// Merge the blocks of one series whose keys fall in `[from_ms, to_ms)`
    /// into one block per `long_ms` span of time. Blocks never overlap and
    /// are keyed by their last point, so the blocks of one span are
    /// consecutive keys and their points, read in key order, are sorted.
    /// The merged block replaces them in one batch. Returns the blocks
    /// merged away.
    fn merge_blocks<M: Message + Default + Mergeable>(
        &self,
        id: &str,
        bucket_ms: u64,
        long_ms: u64,
        from_ms: u64,
        to_ms: u64,
    ) -> Result<u64, StoreError> {
        let span_of = |k: &[u8]| key_time(k) - key_time(k) % long_ms;
        let mut batch = sled::Batch::default();
        let mut merged = 0;
        let mut group: Vec<(sled::IVec, sled::IVec)> = Vec::new();
        let mut close = |group: &mut Vec<(sled::IVec, sled::IVec)>| -> Result<(), StoreError> {
            if group.len() > 1 {
                let mut pts = Vec::<M>::new();
                for (k, v) in group.iter() {
                    pts.extend(decode_block::<M>(self.what, v)?);
                    batch.remove(k.clone());
                }
                if let Some(last) = pts.last() {
                    // After the removes: the insert wins for the last key.
                    batch.insert(
                        point_key(id, bucket_ms, last.timestamp_ms()),
                        encode_block(self.what, &pts)?,
                    );
                }
                merged += group.len() as u64 - 1;
            }
            group.clear();
            Ok(())
        };
        for kv in self.blocks.range(points(id, bucket_ms, from_ms, to_ms)) {
            let (k, v) = kv?;
            if group
                .first()
                .is_some_and(|(g, _)| span_of(g) != span_of(&k))
            {
                close(&mut group)?;
            }
            group.push((k, v));
        }
        close(&mut group)?;
        self.blocks.apply_batch(batch)?;
        Ok(merged)
    }

    /// Drop the single points of one series older than `cutoff_ms`, and
    /// its blocks whose every point is. The one block that straddles the
    /// cutoff is kept whole until it is past it (so a series keeps at most
    /// one block span more than its retention, and no block is rewritten
    /// for retention). Returns the points dropped.
    fn expire(&self, id: &str, bucket_ms: u64, cutoff_ms: u64) -> Result<u64, StoreError> {
        let mut removed = 0;
        let mut batch = sled::Batch::default();
        for kv in self.points.range(points(id, bucket_ms, 0, cutoff_ms)) {
            batch.remove(kv?.0);
            removed += 1;
        }
        self.points.apply_batch(batch)?;
        let mut batch = sled::Batch::default();
        for kv in self.blocks.range(points(id, bucket_ms, 0, cutoff_ms)) {
            let (k, v) = kv?;
            removed += block_len(self.what, &v)? as u64;
            batch.remove(k);
        }
        self.blocks.apply_batch(batch)?;
        Ok(removed)
    }
}

#[cfg(test)]
mod tests {
    use super::super::Write;
    use super::super::fixtures::{levels, point, reopen, tmp};
    use super::super::keys::series;
    use super::*;

    /// Real sled on disk: ranges by VM and time stay within one VM (a VM
    /// whose id is a prefix of another's included), rollups and retention
    /// run, and everything survives a reopen after a flush.
    #[test]
    fn ranges_rollups_retention_reopen() {
        let dir = tmp("rrr");
        {
            let s = Store::open(&dir, levels(), 8 << 20).unwrap();
            let mut w = Write::default();
            for t in (0..30_000).step_by(100) {
                w.vm_points.push(("vm-1".into(), point(t, t)));
                w.vm_points.push(("vm-10".into(), point(t, 7)));
            }
            s.apply(&w).unwrap();
            let got = s.vm_points("vm-1", 0, 1000, 2000, usize::MAX).unwrap();
            assert_eq!(got.len(), 10);
            assert!(got.iter().all(|p| p.windows[0].wss_bytes == p.timestamp_ms));
            assert_eq!(s.vm_points("vm-1", 0, 0, 30_000, 5).unwrap().len(), 5);
            assert_eq!(
                s.last_vm_point("vm-1").unwrap().unwrap().timestamp_ms,
                29_900
            );

            let vms = [("vm-1".to_owned(), 30_000), ("vm-10".to_owned(), 30_000)];
            let (m, forgotten) = s.maintain(&vms, &[], 30_000, 0).into_result().unwrap();
            assert!(forgotten.is_empty());
            // 30 one-second and 3 ten-second buckets per VM.
            assert_eq!(m.rollup_points, 2 * (30 + 3));
            // Raw older than 10 s is gone.
            assert_eq!(m.expired_points, 2 * 200);
            let secs = s.vm_points("vm-1", 1000, 0, u64::MAX, usize::MAX).unwrap();
            assert_eq!(secs.len(), 30);
            assert_eq!(secs[3].samples, 10);
            assert_eq!(secs[3].windows[0].wss_bytes, 3450);
            assert_eq!(secs[3].windows[0].wss_max_bytes, 3900);
            let tens = s
                .vm_points("vm-1", 10_000, 0, u64::MAX, usize::MAX)
                .unwrap();
            assert_eq!(tens.iter().map(|p| p.samples).sum::<u32>(), 300);
            // A second pass adds nothing new.
            let (m2, _) = s.maintain(&vms, &[], 30_000, 0).into_result().unwrap();
            assert_eq!((m2.rollup_points, m2.expired_points), (0, 0));
            s.flush().unwrap();
        }
        let s = reopen(&dir, levels());
        assert_eq!(
            s.vm_points("vm-1", 0, 0, u64::MAX, usize::MAX)
                .unwrap()
                .len(),
            100
        );
        assert_eq!(
            s.vm_points("vm-1", 1000, 0, u64::MAX, usize::MAX)
                .unwrap()
                .len(),
            30
        );
        drop(s);
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// Closed blocks are packed into one key each: reads across blocks and
    /// single points are the same as before packing (limits included), a
    /// late point is packed on the next pass, a crash between writing a
    /// block and removing its single keys reads no duplicate and is
    /// finished by the next pass, retention keeps a block that straddles
    /// it until all of it is past, and it all survives a reopen.
    #[test]
    fn packing_blocks() {
        let dir = tmp("pack");
        let levels = vec![Level {
            bucket_ms: 0,
            retention_ms: 80_000,
        }];
        // Blocks of 10 s (an eighth of the retention).
        assert_eq!(levels[0].block_ms(), 10_000);
        let all = |s: &Store| -> Vec<u64> {
            s.vm_points("vm", 0, 0, u64::MAX, usize::MAX)
                .unwrap()
                .iter()
                .map(|p| p.timestamp_ms)
                .collect()
        };
        {
            let s = Store::open(&dir, levels.clone(), 8 << 20).unwrap();
            let mut w = Write::default();
            for t in (0..35_000).step_by(1000) {
                w.vm_points.push(("vm".into(), point(t, t)));
            }
            s.apply(&w).unwrap();
            let before: Vec<u64> = (0..35_000).step_by(1000).collect();
            assert_eq!(all(&s), before);
            let vms = [("vm".to_owned(), 35_000)];
            // Blocks [0, 10 s), [10, 20 s), [20, 30 s) are closed at 35 s.
            let (m, _) = s.maintain(&vms, &[], 35_000, 0).into_result().unwrap();
            assert_eq!((m.packed_points, m.expired_points), (30, 0));
            assert_eq!(s.vm.blocks.len(), 3);
            assert_eq!(s.vm.points.len(), 5);
            assert_eq!(all(&s), before);
            // Ranges and limits across blocks and single points.
            let got: Vec<u64> = s
                .vm_points("vm", 0, 8_500, 31_000, 4)
                .unwrap()
                .iter()
                .map(|p| p.timestamp_ms)
                .collect();
            assert_eq!(got, vec![9_000, 10_000, 11_000, 12_000]);
            assert_eq!(s.vm_points("vm", 0, 25_000, 32_000, 100).unwrap().len(), 7);
            assert!(s.vm_points("vm", 0, 9_500, 9_900, 100).unwrap().is_empty());
            assert_eq!(s.count_vm_points("vm", 0, 0, 40_000).unwrap(), 35);
            // The planner's reading: the same points, its fields only.
            let full = s.vm_points("vm", 0, 0, 40_000, usize::MAX).unwrap();
            let thin = s.vm_plan_points("vm", 0, 40_000).unwrap();
            let fields = |t, w: &[pb::WindowStat], d| (t, w.to_vec(), d);
            assert_eq!(
                thin.iter()
                    .map(|p| fields(p.timestamp_ms, &p.windows, p.dirty_rate_bytes_per_s))
                    .collect::<Vec<_>>(),
                full.iter()
                    .map(|p| fields(p.timestamp_ms, &p.windows, p.dirty_rate_bytes_per_s))
                    .collect::<Vec<_>>()
            );

            assert_eq!(s.last_vm_point("vm").unwrap().unwrap().timestamp_ms, 34_000);

            // A late point (a rewrite of 5 s, and a new 5.5 s) in a
            // packed block: read at once, packed next pass, the single
            // point winning.
            let mut w = Write::default();
            w.vm_points.push(("vm".into(), point(5_000, 777)));
            w.vm_points.push(("vm".into(), point(5_500, 1)));
            s.apply(&w).unwrap();
            let got = s.vm_points("vm", 0, 5_000, 6_000, 10).unwrap();
            assert_eq!(
                got.iter()
                    .map(|p| (p.timestamp_ms, p.windows[0].wss_bytes))
                    .collect::<Vec<_>>(),
                vec![(5_000, 777), (5_500, 1)]
            );
            let (m, _) = s.maintain(&vms, &[], 35_000, 0).into_result().unwrap();
            assert_eq!(m.packed_points, 2);
            assert_eq!(s.vm.blocks.len(), 3);
            assert_eq!(s.vm_points("vm", 0, 5_000, 6_000, 10).unwrap(), got);

            // A crash after a block was written but before its single keys
            // were removed: put the single keys of [20, 30 s) back.
            let mut w = Write::default();
            for t in (20_000..30_000).step_by(1000) {
                w.vm_points.push(("vm".into(), point(t, t)));
            }
            s.apply(&w).unwrap();
            assert_eq!(all(&s).len(), 36);
            let (m, _) = s.maintain(&vms, &[], 35_000, 0).into_result().unwrap();
            assert_eq!(m.packed_points, 10);
            assert_eq!(s.vm.points.len(), 5);
            assert_eq!(all(&s).len(), 36);

            // Everything packed: the last point comes from a block.
            let (m, _) = s.maintain(&vms, &[], 45_000, 0).into_result().unwrap();
            assert_eq!(m.packed_points, 5);
            assert_eq!(s.vm.points.len(), 0);
            assert_eq!(s.last_vm_point("vm").unwrap().unwrap().timestamp_ms, 34_000);

            // Retention at 95 s cuts at 15 s: the first block goes, the
            // second straddles the cut and stays whole until 100 s.
            let (m, _) = s.maintain(&vms, &[], 95_000, 0).into_result().unwrap();
            assert_eq!(m.expired_points, 11);
            assert_eq!(all(&s).first(), Some(&10_000));
            let (m, _) = s.maintain(&vms, &[], 100_001, 0).into_result().unwrap();
            assert_eq!(m.expired_points, 10);
            assert_eq!(all(&s).first(), Some(&20_000));
            s.flush().unwrap();
        }
        let s = reopen(&dir, levels);
        assert_eq!(all(&s), (20_000..35_000).step_by(1000).collect::<Vec<_>>());
        drop(s);
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// Raw samples kept 8 hours or more: minute blocks are merged into
    /// one block per hour once the hour is past; reads are unchanged, a
    /// point left behind as a single key (a crash) goes into its hour's
    /// block, and retention drops whole hours.
    #[test]
    fn long_blocks() {
        let dir = tmp("long");
        const H: u64 = 3_600_000;
        let levels = vec![Level {
            bucket_ms: 0,
            retention_ms: 24 * H,
        }];
        assert_eq!(
            (levels[0].block_ms(), levels[0].long_block_ms()),
            (60_000, H)
        );
        let ts = |s: &Store, a: u64, b: u64, n: usize| -> Vec<u64> {
            s.vm_points("vm", 0, a, b, n)
                .unwrap()
                .iter()
                .map(|p| p.timestamp_ms)
                .collect()
        };
        let write = |s: &Store, from: u64, to: u64| {
            let mut w = Write::default();
            for t in (from..to).step_by(10_000) {
                w.vm_points.push(("vm".into(), point(t, t)));
            }
            s.apply(&w).unwrap();
        };
        let vms = [("vm".to_owned(), 0)];
        {
            let s = Store::open(&dir, levels.clone(), 8 << 20).unwrap();
            write(&s, 0, 5 * H / 2);
            let (m, _) = s.maintain(&vms, &[], 5 * H / 2, 0).into_result().unwrap();
            // 150 minute blocks, the first 120 merged into two hours.
            assert_eq!((m.packed_points, m.merged_blocks), (900, 118));
            assert_eq!(s.vm.blocks.len(), 32);
            assert_eq!(
                ts(&s, 0, u64::MAX, usize::MAX),
                (0..5 * H / 2).step_by(10_000).collect::<Vec<_>>()
            );
            assert_eq!(
                ts(&s, H - 20_000, H + 20_000, 100),
                vec![H - 20_000, H - 10_000, H, H + 10_000]
            );
            assert_eq!(
                ts(&s, H - 20_000, H + 20_000, 3),
                vec![H - 20_000, H - 10_000, H]
            );
            assert_eq!(s.count_vm_points("vm", 0, 0, 2 * H).unwrap(), 720);

            // A point left behind as a single key in a merged hour: read at
            // once, then packed into that hour's block.
            let mut w = Write::default();
            w.vm_points.push(("vm".into(), point(H / 2, 7)));
            w.vm_points.push(("vm".into(), point(H / 2 + 1, 8)));
            s.apply(&w).unwrap();
            let (m, _) = s.maintain(&vms, &[], 5 * H / 2, 0).into_result().unwrap();
            assert_eq!((m.packed_points, m.merged_blocks), (2, 0));
            assert_eq!(s.vm.blocks.len(), 32);
            let got = s.vm_points("vm", 0, H / 2, H / 2 + 10, 10).unwrap();
            assert_eq!(
                got.iter()
                    .map(|p| (p.timestamp_ms, p.windows[0].wss_bytes))
                    .collect::<Vec<_>>(),
                vec![(H / 2, 7), (H / 2 + 1, 8)]
            );

            // The next hour is merged once it is past.
            write(&s, 5 * H / 2, 3 * H + 60_000);
            let (m, _) = s
                .maintain(&vms, &[], 3 * H + 60_000, 0)
                .into_result()
                .unwrap();
            assert_eq!((m.packed_points, m.merged_blocks), (186, 59));
            assert_eq!(s.vm.blocks.len(), 4);
            assert_eq!(
                s.last_vm_point("vm").unwrap().unwrap().timestamp_ms,
                3 * H + 50_000
            );
            s.flush().unwrap();
        }
        let s = reopen(&dir, levels);
        assert_eq!(ts(&s, 0, u64::MAX, usize::MAX).len(), 1 + 3 * 360 + 6);
        // A day and a half hour later: the first hour is past retention,
        // the second straddles it and stays.
        let (m, _) = s
            .maintain(&vms, &[], 24 * H + 3 * H / 2, 0)
            .into_result()
            .unwrap();
        assert_eq!(m.expired_points, 361);
        assert_eq!(ts(&s, 0, u64::MAX, 1), vec![H]);
        drop(s);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_damaged_series_does_not_stop_maintenance() {
        let dir = tmp("iso");
        let levels = vec![Level {
            bucket_ms: 0,
            retention_ms: 80_000,
        }];
        let s = Store::open(&dir, levels, 8 << 20).unwrap();
        let mut w = Write::default();
        for vm in ["a", "b", "c"] {
            for t in (0..25_000).step_by(1000) {
                w.vm_points.push((vm.into(), point(t, t)));
            }
        }
        s.apply(&w).unwrap();
        // VM b's point at 3 s is garbage: b cannot be packed, a and c can.
        s.vm.points
            .insert(point_key("b", 0, 3_000), &[0xff, 0xff, 0xff][..])
            .unwrap();
        let vms: Vec<(String, u64)> = ["a", "b", "c"]
            .iter()
            .map(|v| (v.to_string(), 25_000))
            .collect();
        // The next pass tries b again, and fails again.
        for packed in [2 * 20, 0] {
            let pass = s.maintain(&vms, &[], 25_000, 0);
            assert_eq!(pass.done.failed_series, 1);
            assert_eq!(pass.done.packed_points, packed);
            let (what, e) = pass.first_failure.as_ref().unwrap();
            assert_eq!(what, "VM b");
            assert!(e.to_string().contains("VM point"), "{e}");
            let e = pass.into_result().unwrap_err().to_string();
            assert!(e.starts_with("VM b: "), "{e}");
        }
        for vm in ["a", "c"] {
            assert_eq!(s.count_vm_points(vm, 0, 0, 30_000).unwrap(), 25);
        }
        // Nothing of b was lost or packed: its other 24 points stay single.
        assert_eq!(s.vm.points.scan_prefix(series("b", 0)).count(), 25);
        assert_eq!(s.vm.blocks.scan_prefix(series("b", 0)).count(), 0);
        drop(s);
        let _ = std::fs::remove_dir_all(&dir);
    }
    /// A damaged watermark (a meta value that is not 8 bytes) fails its
    /// series like any damaged point; it never stops the pass.
    #[test]
    fn a_damaged_watermark_fails_only_its_series() {
        let dir = tmp("mark");
        let s = Store::open(&dir, levels(), 8 << 20).unwrap();
        let mut w = Write::default();
        for vm in ["a", "b"] {
            for t in (0..30_000).step_by(1000) {
                w.vm_points.push((vm.into(), point(t, t)));
            }
        }
        s.apply(&w).unwrap();
        s.meta
            .insert(mark_key(Mark::Rollup, s.vm.tag, "b", 1000), &[1, 2, 3][..])
            .unwrap();
        let vms: Vec<(String, u64)> = ["a", "b"].iter().map(|v| (v.to_string(), 30_000)).collect();
        let pass = s.maintain(&vms, &[], 30_000, 0);
        assert_eq!(pass.done.failed_series, 1);
        let (what, e) = pass.first_failure.as_ref().unwrap();
        assert_eq!(what, "VM b");
        assert!(e.to_string().contains("watermark"), "{e}");
        assert_eq!(
            s.vm_points("a", 1000, 0, u64::MAX, usize::MAX)
                .unwrap()
                .len(),
            30
        );
        drop(s);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
