//! The history store: the `Store` API over sled. Only this module and its
//! submodules name sled.
//!
//! - `keys`: the one key table (trees, key layouts, values) and the
//!   functions that build and read keys;
//! - [`codec`]: the pure block codec (no sled, no IO);
//! - `series`: reading one series, its single points and blocks merged;
//! - `maintenance`: rollups, packing, hour merges, retention.

pub mod codec;
mod keys;
mod maintenance;
mod series;

#[cfg(test)]
mod fixtures;

use std::path::Path;
use std::sync::atomic::{AtomicU32, Ordering};

use prost::Message;
use wset_proto::v1 as pb;

use crate::history::{Level, PlanPoint};
pub use codec::CodecError;
use codec::decode;
use keys::{event_key, point_key};
pub use maintenance::{Maintenance, MaintenanceError, Pass};
use series::Series;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("history store: {0}")]
    Sled(#[from] sled::Error),
    /// A stored record or block does not decode (or a block cannot be
    /// compressed).
    #[error(transparent)]
    Codec(#[from] CodecError),
    #[error("history store: a stored watermark is {len} bytes, not 8; the store may be damaged")]
    DamagedMark { len: usize },
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
    /// Points of any series (`bucket_ms` 0: raw), copied from a peer.
    pub levelled_vm_points: Vec<(String, u64, pb::VmHistoryPoint)>,
    pub levelled_host_points: Vec<(String, u64, pb::HostHistoryPoint)>,
}

/// Records read back, and the errors of those that did not decode.
pub type Loaded<M> = (Vec<M>, Vec<StoreError>);

/// Every record of a tree; one that does not decode is skipped and its
/// error returned beside the others.
fn load<M: Message + Default>(
    tree: &sled::Tree,
    what: &'static str,
) -> Result<Loaded<M>, StoreError> {
    let (mut ok, mut bad) = (Vec::new(), Vec::new());
    for kv in tree.iter() {
        match decode(what, &kv?.1) {
            Ok(m) => ok.push(m),
            Err(e) => bad.push(e.into()),
        }
    }
    Ok((ok, bad))
}

#[derive(Clone, Debug)]
pub struct Store {
    db: sled::Db,
    vm: Series,
    host: Series,
    host_events: sled::Tree,
    vms: sled::Tree,
    hosts: sled::Tree,
    meta: sled::Tree,
    levels: Vec<Level>,
    dir: std::path::PathBuf,
}

static EVENT_SEQ: AtomicU32 = AtomicU32::new(0);

/// sled's periodic flush and segment cleaning, milliseconds.
const SLED_FLUSH_MS: u64 = 1000;

impl Store {
    /// Open (or create) the store in `dir`. `levels` are the stored series,
    /// raw first (bucket 0), then rollups by growing bucket.
    pub fn open(dir: &Path, levels: Vec<Level>, cache_bytes: u64) -> Result<Self, StoreError> {
        let db = sled::Config::new()
            .path(dir)
            .cache_capacity(cache_bytes)
            .mode(sled::Mode::HighThroughput)
            // sled's own periodic flusher is also its segment cleaner: only
            // there does it relocate the live pages of mostly dead segments
            // (for up to half of each period), so that they can be reused.
            // Without it the files grew to 11 times their contents under the
            // load test. What the controller calls durable is still what
            // its own flusher published after a flush it made (ingest.rs).
            .flush_every_ms(Some(SLED_FLUSH_MS))
            .open()?;
        Ok(Self {
            vm: Series {
                points: db.open_tree(keys::VM_POINTS)?,
                blocks: db.open_tree(keys::VM_BLOCKS)?,
                what: "VM point",
                tag: keys::VM_TAG,
            },
            host: Series {
                points: db.open_tree(keys::HOST_POINTS)?,
                blocks: db.open_tree(keys::HOST_BLOCKS)?,
                what: "host point",
                tag: keys::HOST_TAG,
            },
            host_events: db.open_tree(keys::HOST_EVENTS)?,
            vms: db.open_tree(keys::VMS)?,
            hosts: db.open_tree(keys::HOSTS)?,
            meta: db.open_tree(keys::META)?,
            db,
            levels,
            dir: dir.to_owned(),
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
            self.vm.points.apply_batch(b)?;
        }
        if !w.levelled_vm_points.is_empty() {
            let mut b = sled::Batch::default();
            for (vm, bucket, p) in &w.levelled_vm_points {
                b.insert(point_key(vm, *bucket, p.timestamp_ms), p.encode_to_vec());
            }
            self.vm.points.apply_batch(b)?;
        }
        if !w.levelled_host_points.is_empty() {
            let mut b = sled::Batch::default();
            for (host, bucket, p) in &w.levelled_host_points {
                b.insert(point_key(host, *bucket, p.timestamp_ms), p.encode_to_vec());
            }
            self.host.points.apply_batch(b)?;
        }
        if let Some((host, p)) = &w.host_point {
            self.host
                .points
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

    /// The directory the store lives in.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Bytes the store's files take (sled's log and blobs).
    pub fn size_on_disk(&self) -> Result<u64, StoreError> {
        Ok(self.db.size_on_disk()?)
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
        self.vm.range(vm, bucket_ms, start_ms, end_ms, limit)
    }

    /// A VM's raw points in `[start_ms, end_ms)`, only the fields the
    /// planner reads.
    pub fn vm_plan_points(
        &self,
        vm: &str,
        start_ms: u64,
        end_ms: u64,
    ) -> Result<Vec<PlanPoint>, StoreError> {
        self.vm.range(vm, 0, start_ms, end_ms, usize::MAX)
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
        self.host.range(host, bucket_ms, start_ms, end_ms, limit)
    }

    /// How many points a VM has in one series in `[start_ms, end_ms)`,
    /// without decoding them (range scans, decompression and block framing
    /// alone: the benchmarks' baseline). Exact for the ranges the
    /// benchmarks ask (whole blocks).
    pub fn count_vm_points(
        &self,
        vm: &str,
        bucket_ms: u64,
        start_ms: u64,
        end_ms: u64,
    ) -> Result<usize, StoreError> {
        self.vm.count(vm, bucket_ms, start_ms, end_ms)
    }

    /// The latest raw point of a VM.
    pub fn last_vm_point(&self, vm: &str) -> Result<Option<pb::VmHistoryPoint>, StoreError> {
        self.vm.last(vm, 0)
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
            .map(|kv| Ok(decode("host event", &kv?.1)?))
            .collect()
    }

    /// Every VM record (without `latest`), and the errors of those that
    /// do not decode (skipped). Fails only when the tree cannot be read.
    pub fn load_vms(&self) -> Result<Loaded<pb::ClusterVm>, StoreError> {
        load(&self.vms, "VM record")
    }

    /// Every host's last facts, as [`Store::load_vms`].
    pub fn load_hosts(&self) -> Result<Loaded<pb::HostFacts>, StoreError> {
        load(&self.hosts, "host record")
    }
}

#[cfg(test)]
impl Store {
    /// Store `bytes` as `vm`'s raw point at `t_ms`: tests damage history
    /// with it.
    pub(crate) fn put_raw_point_bytes(&self, vm: &str, t_ms: u64, bytes: &[u8]) {
        self.vm
            .points
            .insert(point_key(vm, 0, t_ms), bytes)
            .expect("write a raw point");
    }

    /// Store `bytes` as `vm`'s record: tests damage the index with it.
    pub(crate) fn put_vm_record_bytes(&self, vm: &str, bytes: &[u8]) {
        self.vms
            .insert(vm.as_bytes(), bytes)
            .expect("write a VM record");
    }
}

#[cfg(test)]
mod tests {
    use super::fixtures::{levels, point, tmp};
    use super::*;

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
        let vms = s.load_vms().unwrap().0;
        assert_eq!(vms.len(), 1);
        assert!(vms[0].latest.is_none());
        // A VM unseen for longer than every retention is forgotten, and
        // its watermarks with it.
        let mut w = Write::default();
        w.vm_points.push(("a".into(), point(1, 1)));
        s.apply(&w).unwrap();
        s.maintain(&[("a".into(), 0)], &[], 100_000, 0)
            .into_result()
            .unwrap();
        let marks =
            |s: &Store| s.meta.scan_prefix(b"wmv").count() + s.meta.scan_prefix(b"lbv").count();
        assert!(marks(&s) > 0);
        let (_, gone) = s
            .maintain(&[("a".into(), 0)], &[], 2_000_000, 0)
            .into_result()
            .unwrap();
        assert_eq!(gone, vec!["a".to_owned()]);
        assert!(s.load_vms().unwrap().0.is_empty());
        assert_eq!(marks(&s), 0);
        drop(s);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
