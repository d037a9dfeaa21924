//! The history store: the only module that names sled.
//!
//! Trees and keys (ids never contain a NUL byte, so `id ‖ 0x00` is a prefix
//! that no other id shares; integers are big-endian so keys sort by time):
//!
//! | tree | key | value |
//! |---|---|---|
//! | `vm_points` | `vm_id ‖ 0 ‖ bucket_ms:u64 ‖ t_ms:u64` | `VmHistoryPoint` |
//! | `host_points` | `host_id ‖ 0 ‖ bucket_ms:u64 ‖ t_ms:u64` | `HostHistoryPoint` |
//! | `host_events` | `host_id ‖ 0 ‖ t_ms:u64 ‖ seq:u32` | `HostEvent` |
//! | `vms` | `vm_id` | `ClusterVm` (without `latest`) |
//! | `hosts` | `host_id` | the agent's last `HostFacts` |
//! | `meta` | `wm ‖ tree ‖ series ‖ bucket_ms` | rollup watermark `t_ms:u64` |
//!
//! `bucket_ms` is 0 for raw samples, else the rollup's bucket length, so a
//! range scan over one VM (or host) at one resolution over a time range is
//! one contiguous key range, and a changed rollup configuration never
//! misreads old series.

use std::path::Path;
use std::sync::atomic::{AtomicU32, Ordering};

use prost::Message;
use wset_proto::v1 as pb;

use crate::history::{Level, Mergeable, merge};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("history store: {0}")]
    Sled(#[from] sled::Error),
    #[error("history store: a stored {what} does not decode ({source}); the store may be damaged")]
    Corrupt {
        what: &'static str,
        source: prost::DecodeError,
    },
}

/// Everything one agent batch (or connection event) changes, applied at once.
#[derive(Debug, Default)]
pub struct Write {
    pub vm_points: Vec<(String, pb::VmHistoryPoint)>,
    pub host_point: Option<(String, pb::HostHistoryPoint)>,
    pub host_facts: Option<pb::HostFacts>,
    pub events: Vec<(String, pb::HostEvent)>,
    /// VM records that changed (their `latest` is not stored).
    pub vm_records: Vec<pb::ClusterVm>,
}

/// What a maintenance pass did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Maintenance {
    pub rollup_points: u64,
    pub expired_points: u64,
    pub forgotten_vms: u64,
}

#[derive(Clone, Debug)]
pub struct Store {
    db: sled::Db,
    vm_points: sled::Tree,
    host_points: sled::Tree,
    host_events: sled::Tree,
    vms: sled::Tree,
    hosts: sled::Tree,
    meta: sled::Tree,
    levels: Vec<Level>,
}

static EVENT_SEQ: AtomicU32 = AtomicU32::new(0);

fn series(id: &str, bucket_ms: u64) -> Vec<u8> {
    let mut k = Vec::with_capacity(id.len() + 17);
    k.extend_from_slice(id.as_bytes());
    k.push(0);
    k.extend_from_slice(&bucket_ms.to_be_bytes());
    k
}

fn point_key(id: &str, bucket_ms: u64, t_ms: u64) -> Vec<u8> {
    let mut k = series(id, bucket_ms);
    k.extend_from_slice(&t_ms.to_be_bytes());
    k
}

fn event_key(host: &str, t_ms: u64, seq: u32) -> Vec<u8> {
    let mut k = Vec::with_capacity(host.len() + 13);
    k.extend_from_slice(host.as_bytes());
    k.push(0);
    k.extend_from_slice(&t_ms.to_be_bytes());
    k.extend_from_slice(&seq.to_be_bytes());
    k
}

fn decode<M: Message + Default>(what: &'static str, v: &[u8]) -> Result<M, StoreError> {
    M::decode(v).map_err(|source| StoreError::Corrupt { what, source })
}

/// Time of a point key (its last 8 bytes).
fn key_time(k: &[u8]) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&k[k.len() - 8..]);
    u64::from_be_bytes(b)
}

impl Store {
    /// Open (or create) the store in `dir`. `levels` are the stored series,
    /// raw first (bucket 0), then rollups by growing bucket.
    pub fn open(dir: &Path, levels: Vec<Level>, cache_bytes: u64) -> Result<Self, StoreError> {
        let db = sled::Config::new()
            .path(dir)
            .cache_capacity(cache_bytes)
            .mode(sled::Mode::HighThroughput)
            // The controller flushes on its own schedule (ingest), so the
            // durable point is known; sled's timer would hide it.
            .flush_every_ms(None)
            .open()?;
        Ok(Self {
            vm_points: db.open_tree("vm_points")?,
            host_points: db.open_tree("host_points")?,
            host_events: db.open_tree("host_events")?,
            vms: db.open_tree("vms")?,
            hosts: db.open_tree("hosts")?,
            meta: db.open_tree("meta")?,
            db,
            levels,
        })
    }

    pub fn levels(&self) -> &[Level] {
        &self.levels
    }

    /// Apply one write. Raw points go in with one batch per tree.
    pub fn apply(&self, w: &Write) -> Result<(), StoreError> {
        if !w.vm_points.is_empty() {
            let mut b = sled::Batch::default();
            for (vm, p) in &w.vm_points {
                b.insert(point_key(vm, 0, p.timestamp_ms), p.encode_to_vec());
            }
            self.vm_points.apply_batch(b)?;
        }
        if let Some((host, p)) = &w.host_point {
            self.host_points
                .insert(point_key(host, 0, p.timestamp_ms), p.encode_to_vec())?;
        }
        if let Some(h) = &w.host_facts {
            self.hosts.insert(h.host_id.as_bytes(), h.encode_to_vec())?;
        }
        for (host, e) in &w.events {
            let seq = EVENT_SEQ.fetch_add(1, Ordering::Relaxed);
            self.host_events
                .insert(event_key(host, e.timestamp_ms, seq), e.encode_to_vec())?;
        }
        if !w.vm_records.is_empty() {
            let mut b = sled::Batch::default();
            for r in &w.vm_records {
                let mut r = r.clone();
                r.latest = None;
                b.insert(r.vm_id.as_bytes(), r.encode_to_vec());
            }
            self.vms.apply_batch(b)?;
        }
        Ok(())
    }

    /// Make everything applied so far durable. Returns the bytes flushed.
    pub fn flush(&self) -> Result<usize, StoreError> {
        Ok(self.db.flush()?)
    }

    fn points<M: Message + Default>(
        tree: &sled::Tree,
        what: &'static str,
        id: &str,
        bucket_ms: u64,
        start_ms: u64,
        end_ms: u64,
        limit: usize,
    ) -> Result<Vec<M>, StoreError> {
        if start_ms >= end_ms {
            return Ok(Vec::new());
        }
        tree.range(point_key(id, bucket_ms, start_ms)..point_key(id, bucket_ms, end_ms))
            .take(limit)
            .map(|kv| decode(what, &kv?.1))
            .collect()
    }

    /// A VM's points of one series in `[start_ms, end_ms)`, at most `limit`.
    pub fn vm_points(
        &self,
        vm: &str,
        bucket_ms: u64,
        start_ms: u64,
        end_ms: u64,
        limit: usize,
    ) -> Result<Vec<pb::VmHistoryPoint>, StoreError> {
        Self::points(
            &self.vm_points,
            "VM point",
            vm,
            bucket_ms,
            start_ms,
            end_ms,
            limit,
        )
    }

    /// A host's points of one series in `[start_ms, end_ms)`, at most `limit`.
    pub fn host_points(
        &self,
        host: &str,
        bucket_ms: u64,
        start_ms: u64,
        end_ms: u64,
        limit: usize,
    ) -> Result<Vec<pb::HostHistoryPoint>, StoreError> {
        Self::points(
            &self.host_points,
            "host point",
            host,
            bucket_ms,
            start_ms,
            end_ms,
            limit,
        )
    }

    /// How many points a VM has in one series in `[start_ms, end_ms)`,
    /// without decoding them (a range scan alone: the benchmarks' baseline).
    pub fn count_vm_points(
        &self,
        vm: &str,
        bucket_ms: u64,
        start_ms: u64,
        end_ms: u64,
    ) -> Result<usize, StoreError> {
        let mut n = 0;
        for kv in self
            .vm_points
            .range(point_key(vm, bucket_ms, start_ms)..point_key(vm, bucket_ms, end_ms))
        {
            kv?;
            n += 1;
        }
        Ok(n)
    }

    /// The latest raw point of a VM.
    pub fn last_vm_point(&self, vm: &str) -> Result<Option<pb::VmHistoryPoint>, StoreError> {
        let s = series(vm, 0);
        match self.vm_points.scan_prefix(&s).next_back() {
            Some(kv) => Ok(Some(decode("VM point", &kv?.1)?)),
            None => Ok(None),
        }
    }

    /// A host's events in `[start_ms, end_ms)`.
    pub fn host_events(
        &self,
        host: &str,
        start_ms: u64,
        end_ms: u64,
    ) -> Result<Vec<pb::HostEvent>, StoreError> {
        if start_ms >= end_ms {
            return Ok(Vec::new());
        }
        self.host_events
            .range(event_key(host, start_ms, 0)..event_key(host, end_ms, 0))
            .map(|kv| decode("host event", &kv?.1))
            .collect()
    }

    /// Every VM record (without `latest`).
    pub fn load_vms(&self) -> Result<Vec<pb::ClusterVm>, StoreError> {
        self.vms
            .iter()
            .map(|kv| decode("VM record", &kv?.1))
            .collect()
    }

    /// Every host's last facts.
    pub fn load_hosts(&self) -> Result<Vec<pb::HostFacts>, StoreError> {
        self.hosts
            .iter()
            .map(|kv| decode("host record", &kv?.1))
            .collect()
    }

    /// Roll the raw samples of one series up into every coarser level, for
    /// buckets that ended at least `lateness_ms` before `now_ms`.
    fn rollup<M: Message + Default + Mergeable>(
        &self,
        tree: &sled::Tree,
        tag: u8,
        what: &'static str,
        id: &str,
        now_ms: u64,
        lateness_ms: u64,
    ) -> Result<u64, StoreError> {
        let mut written = 0;
        for pair in self.levels.windows(2) {
            let (src, dst) = (pair[0], pair[1]);
            let b = dst.bucket_ms;
            let mut wm_key = vec![b'w', b'm', tag];
            wm_key.extend_from_slice(&series(id, b));
            let wm = match self.meta.get(&wm_key)? {
                Some(v) => key_time(&v),
                None => match tree.scan_prefix(series(id, src.bucket_ms)).next() {
                    Some(kv) => {
                        let t = key_time(&kv?.0);
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
            let pts: Vec<M> = Self::points(tree, what, id, src.bucket_ms, wm, cutoff, usize::MAX)?;
            let mut batch = sled::Batch::default();
            for p in merge(pts, b) {
                batch.insert(point_key(id, b, p.timestamp_ms()), p.encode_to_vec());
                written += 1;
            }
            tree.apply_batch(batch)?;
            self.meta.insert(wm_key, &cutoff.to_be_bytes())?;
        }
        Ok(written)
    }

    /// Drop the points of one series older than each level's retention.
    fn expire(&self, tree: &sled::Tree, id: &str, now_ms: u64) -> Result<u64, StoreError> {
        let mut removed = 0;
        for l in &self.levels {
            let cutoff = now_ms.saturating_sub(l.retention_ms);
            let mut batch = sled::Batch::default();
            for kv in tree.range(point_key(id, l.bucket_ms, 0)..point_key(id, l.bucket_ms, cutoff))
            {
                batch.remove(kv?.0);
                removed += 1;
            }
            tree.apply_batch(batch)?;
        }
        Ok(removed)
    }

    /// One maintenance pass over the given VMs and hosts: rollups, then
    /// retention; VMs last seen before the longest retention are forgotten
    /// (returned in the report's count; the caller drops them from memory).
    pub fn maintain(
        &self,
        vms: &[(String, u64)],
        hosts: &[String],
        now_ms: u64,
        lateness_ms: u64,
    ) -> Result<(Maintenance, Vec<String>), StoreError> {
        let mut m = Maintenance::default();
        for (vm, _) in vms {
            m.rollup_points += self.rollup::<pb::VmHistoryPoint>(
                &self.vm_points,
                b'v',
                "VM point",
                vm,
                now_ms,
                lateness_ms,
            )?;
            m.expired_points += self.expire(&self.vm_points, vm, now_ms)?;
        }
        for host in hosts {
            m.rollup_points += self.rollup::<pb::HostHistoryPoint>(
                &self.host_points,
                b'h',
                "host point",
                host,
                now_ms,
                lateness_ms,
            )?;
            m.expired_points += self.expire(&self.host_points, host, now_ms)?;
            let keep = self
                .levels
                .iter()
                .map(|l| l.retention_ms)
                .max()
                .unwrap_or(0);
            let cutoff = now_ms.saturating_sub(keep);
            let mut batch = sled::Batch::default();
            for kv in self
                .host_events
                .range(event_key(host, 0, 0)..event_key(host, cutoff, 0))
            {
                batch.remove(kv?.0);
            }
            self.host_events.apply_batch(batch)?;
        }
        let keep = self
            .levels
            .iter()
            .map(|l| l.retention_ms)
            .max()
            .unwrap_or(0);
        let mut forgotten = Vec::new();
        for (vm, last_seen) in vms {
            if last_seen.saturating_add(keep) < now_ms {
                self.vms.remove(vm.as_bytes())?;
                forgotten.push(vm.clone());
            }
        }
        m.forgotten_vms = forgotten.len() as u64;
        Ok((m, forgotten))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn levels() -> Vec<Level> {
        vec![
            Level {
                bucket_ms: 0,
                retention_ms: 10_000,
            },
            Level {
                bucket_ms: 1000,
                retention_ms: 100_000,
            },
            Level {
                bucket_ms: 10_000,
                retention_ms: 1_000_000,
            },
        ]
    }

    fn point(t: u64, wss: u64) -> pb::VmHistoryPoint {
        pb::VmHistoryPoint {
            timestamp_ms: t,
            resolution_ms: 100,
            samples: 1,
            host_id: "h".into(),
            memory_bytes: 1 << 30,
            windows: vec![pb::WindowStat {
                window_ms: 1000,
                wss_bytes: wss,
                wss_max_bytes: wss,
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    fn tmp(tag: &str) -> std::path::PathBuf {
        let p = std::env::temp_dir().join(format!("wset-store-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        p
    }

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
            let (m, forgotten) = s.maintain(&vms, &[], 30_000, 0).unwrap();
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
            let (m2, _) = s.maintain(&vms, &[], 30_000, 0).unwrap();
            assert_eq!((m2.rollup_points, m2.expired_points), (0, 0));
            s.flush().unwrap();
        }
        let s = Store::open(&dir, levels(), 8 << 20).unwrap();
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

    #[test]
    fn events_and_records() {
        let dir = tmp("ev");
        let s = Store::open(&dir, levels(), 8 << 20).unwrap();
        let ev = |t| pb::HostEvent {
            timestamp_ms: t,
            kind: pb::HostEventKind::Connected as i32,
            detail: String::new(),
        };
        let w = Write {
            events: vec![
                ("h1".into(), ev(5)),
                ("h1".into(), ev(5)),
                ("h10".into(), ev(6)),
            ],
            vm_records: vec![pb::ClusterVm {
                vm_id: "a".into(),
                host_id: "h1".into(),
                latest: Some(point(1, 1)),
                ..Default::default()
            }],
            ..Default::default()
        };
        s.apply(&w).unwrap();
        // Two events at the same millisecond are both kept.
        assert_eq!(s.host_events("h1", 0, 100).unwrap().len(), 2);
        assert_eq!(s.host_events("h1", 6, 100).unwrap().len(), 0);
        let vms = s.load_vms().unwrap();
        assert_eq!(vms.len(), 1);
        assert!(vms[0].latest.is_none());
        // A VM unseen for longer than every retention is forgotten.
        let (_, gone) = s.maintain(&[("a".into(), 0)], &[], 2_000_000, 0).unwrap();
        assert_eq!(gone, vec!["a".to_owned()]);
        assert!(s.load_vms().unwrap().is_empty());
        drop(s);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
