//! The history store: the only module that names sled.
//!
//! Trees and keys (ids never contain a NUL byte, so `id ‖ 0x00` is a prefix
//! that no other id shares; integers are big-endian so keys sort by time):
//!
//! | tree | key | value |
//! |---|---|---|
//! | `vm_points` | `vm_id ‖ 0 ‖ bucket_ms:u64 ‖ t_ms:u64` | `VmHistoryPoint` |
//! | `vm_blocks` | `vm_id ‖ 0 ‖ bucket_ms:u64 ‖ last_t_ms:u64` | block of `VmHistoryPoint` |
//! | `host_points` | `host_id ‖ 0 ‖ bucket_ms:u64 ‖ t_ms:u64` | `HostHistoryPoint` |
//! | `host_blocks` | `host_id ‖ 0 ‖ bucket_ms:u64 ‖ last_t_ms:u64` | block of `HostHistoryPoint` |
//! | `host_events` | `host_id ‖ 0 ‖ t_ms:u64 ‖ seq:u32` | `HostEvent` |
//! | `vms` | `vm_id` | `ClusterVm` (without `latest`) |
//! | `hosts` | `host_id` | the agent's last `HostFacts` |
//! | `meta` | `wm ‖ tree ‖ series ‖ bucket_ms`, `lb ‖ tree ‖ series ‖ bucket_ms` | rollup and long-block watermarks `t_ms:u64` |
//!
//! `bucket_ms` is 0 for raw samples, else the rollup's bucket length, so a
//! range scan over one VM (or host) at one resolution over a time range is
//! one contiguous key range, and a changed rollup configuration never
//! misreads old series.
//!
//! Points arrive one key each (durable as soon as they are flushed). Once
//! a block of time (`Level::block_ms`: a minute of raw samples, 60 buckets
//! of a rollup) is closed, maintenance packs its points into one value of
//! length-delimited points, compressed with zstd and keyed by its last
//! point's time, and removes the single keys. Raw samples kept 8 hours or
//! more are packed a second time: once an hour is past, its minute blocks
//! are merged into one (`Level::long_block_ms`, a watermark per series in
//! `meta`: `lb ‖ tree ‖ series ‖ bucket_ms`). sled keeps memory per key
//! whatever the cache size, so this is what bounds the controller's memory
//! as history accumulates (a day of a VM's raw samples is 24 keys, not
//! 8,640). Packing writes the block before removing the single keys, and
//! merges any block already there, so a crash in between leaves both
//! (readers prefer the single key; the next pass finishes) and a late
//! point is packed on the next pass. Blocks never overlap, so the block
//! that holds a time is the first key at or after it. Retention drops
//! whole blocks: a block that straddles the cut stays until all of it is
//! past.

use std::borrow::Cow;
use std::cell::RefCell;
use std::path::Path;
use std::sync::atomic::{AtomicU32, Ordering};

use prost::Message;
use wset_proto::v1 as pb;

use crate::history::{Level, Mergeable, PlanPoint, Timed, merge};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("history store: {0}")]
    Sled(#[from] sled::Error),
    #[error("history store: a stored {what} does not decode ({source}); the store may be damaged")]
    Corrupt {
        what: &'static str,
        source: prost::DecodeError,
    },
    #[error("history store: a stored block of {what}s is cut short; the store may be damaged")]
    CutBlock { what: &'static str },
    #[error(
        "history store: a stored block of {what}s does not decompress ({source}); the store may be damaged"
    )]
    Unpack {
        what: &'static str,
        source: std::io::Error,
    },
    #[error("history store: a block of {what}s could not be compressed ({source})")]
    Pack {
        what: &'static str,
        source: std::io::Error,
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

impl Pass {
    /// The work done and the VMs forgotten, or the first failure (which
    /// series, and why).
    pub fn into_result(self) -> Result<(Maintenance, Vec<String>), String> {
        match self.first_failure {
            Some((what, e)) => Err(format!("{what}: {e}")),
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
            Err(e) => bad.push(e),
        }
    }
    Ok((ok, bad))
}

/// One kind of series: single points, and the closed blocks they are
/// packed into.
#[derive(Clone, Debug)]
struct Series {
    points: sled::Tree,
    blocks: sled::Tree,
    /// What a point is called in errors.
    what: &'static str,
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

/// A watermark's key in `meta`: `kind` (`wm` rollup, `lb` long blocks),
/// the tree's tag (`v` or `h`), then the series.
fn meta_key(kind: &[u8; 2], tag: u8, id: &str, bucket_ms: u64) -> Vec<u8> {
    let mut k = vec![kind[0], kind[1], tag];
    k.extend_from_slice(&series(id, bucket_ms));
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
                points: db.open_tree("vm_points")?,
                blocks: db.open_tree("vm_blocks")?,
                what: "VM point",
            },
            host: Series {
                points: db.open_tree("host_points")?,
                blocks: db.open_tree("host_blocks")?,
                what: "host point",
            },
            host_events: db.open_tree("host_events")?,
            vms: db.open_tree("vms")?,
            hosts: db.open_tree("hosts")?,
            meta: db.open_tree("meta")?,
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
    /// alone: the benchmarks' baseline).
    pub fn count_vm_points(
        &self,
        vm: &str,
        bucket_ms: u64,
        start_ms: u64,
        end_ms: u64,
    ) -> Result<usize, StoreError> {
        let mut n = 0;
        for kv in self
            .vm
            .points
            .range(point_key(vm, bucket_ms, start_ms)..point_key(vm, bucket_ms, end_ms))
        {
            kv?;
            n += 1;
        }
        // Blocks wholly inside the range, by their framing; this is exact
        // for the ranges the benchmarks ask (whole blocks).
        for kv in self
            .vm
            .blocks
            .range(point_key(vm, bucket_ms, start_ms)..point_key(vm, bucket_ms, end_ms))
        {
            n += block_len(self.vm.what, &kv?.1)?;
        }
        Ok(n)
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
            .map(|kv| decode("host event", &kv?.1))
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

    /// Roll the raw samples of one series up into every coarser level, for
    /// buckets that ended at least `lateness_ms` before `now_ms`.
    fn rollup<M: Message + Default + Mergeable>(
        &self,
        s: &Series,
        tag: u8,
        id: &str,
        now_ms: u64,
        lateness_ms: u64,
    ) -> Result<u64, StoreError> {
        let mut written = 0;
        for pair in self.levels.windows(2) {
            let (src, dst) = (pair[0], pair[1]);
            let b = dst.bucket_ms;
            let wm_key = meta_key(b"wm", tag, id, b);
            let wm = match self.meta.get(&wm_key)? {
                Some(v) => key_time(&v),
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

    /// Rollups, packing and retention of one series.
    fn maintain_series<M: Message + Default + Mergeable>(
        &self,
        s: &Series,
        tag: u8,
        id: &str,
        now_ms: u64,
        lateness_ms: u64,
        m: &mut Maintenance,
    ) -> Result<(), StoreError> {
        m.rollup_points += self.rollup::<M>(s, tag, id, now_ms, lateness_ms)?;
        let horizon = now_ms.saturating_sub(lateness_ms);
        for l in &self.levels {
            let long = l.long_block_ms();
            let wm_key = meta_key(b"lb", tag, id, l.bucket_ms);
            let merged_to = match self.meta.get(&wm_key)? {
                Some(v) if long > l.block_ms() => key_time(&v),
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
                b'v',
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
                    b'h',
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
            for kind in [b"wm", b"lb"] {
                batch.remove(meta_key(kind, b'v', vm, l.bucket_ms));
            }
        }
        Ok(self.meta.apply_batch(batch)?)
    }
}

/// zstd's frame magic. A block that starts with it is compressed; a block
/// written before blocks were compressed is bare frames, whose first byte
/// is a length and whose second is a field tag, never `B5 2F`.
const ZSTD_MAGIC: [u8; 4] = [0x28, 0xB5, 0x2F, 0xFD];

/// zstd's default level: about 3x on a block of history points, at a cost
/// paid once per block when it is packed.
const BLOCK_LEVEL: i32 = 3;

/// The most a block may expand to when read (blocks hold minutes to days
/// of one series, kilobytes to a few megabytes).
const MAX_BLOCK_BYTES: usize = 256 << 20;

thread_local! {
    /// zstd contexts, kept per thread that packs or reads blocks. Making
    /// one allocates about 100 KiB and runs CPUID (a VM exit on a virtual
    /// machine), more than decompressing a minute block takes, and the
    /// planner reads an hour of blocks of every VM for each plan: with a
    /// context per call, that made most of the controller's CPU under the
    /// load test.
    static COMPRESSOR: RefCell<Option<zstd::bulk::Compressor<'static>>> =
        const { RefCell::new(None) };
    static DECOMPRESSOR: RefCell<Option<zstd::bulk::Decompressor<'static>>> =
        const { RefCell::new(None) };
}

/// A stored block's frames, decompressed if need be.
fn block_bytes<'a>(what: &'static str, v: &'a [u8]) -> Result<Cow<'a, [u8]>, StoreError> {
    if !v.starts_with(&ZSTD_MAGIC) {
        return Ok(Cow::Borrowed(v));
    }
    DECOMPRESSOR
        .with(|d| {
            let mut d = d.borrow_mut();
            let d = match d.as_mut() {
                Some(d) => d,
                None => d.insert(zstd::bulk::Decompressor::new()?),
            };
            d.decompress(v, MAX_BLOCK_BYTES)
        })
        .map(Cow::Owned)
        .map_err(|source| StoreError::Unpack { what, source })
}

/// The framed points of a block's frames, undecoded.
fn frames<'a>(what: &'static str, mut v: &'a [u8]) -> Result<Vec<&'a [u8]>, StoreError> {
    let mut out = Vec::new();
    while !v.is_empty() {
        let len = prost::encoding::decode_varint(&mut v)
            .map_err(|source| StoreError::Corrupt { what, source })?;
        let len = usize::try_from(len)
            .ok()
            .filter(|&l| l <= v.len())
            .ok_or(StoreError::CutBlock { what })?;
        let (frame, rest) = v.split_at(len);
        out.push(frame);
        v = rest;
    }
    Ok(out)
}

/// How many points a stored block holds.
fn block_len(what: &'static str, v: &[u8]) -> Result<usize, StoreError> {
    Ok(frames(what, &block_bytes(what, v)?)?.len())
}

fn decode_block<M: Message + Default>(what: &'static str, v: &[u8]) -> Result<Vec<M>, StoreError> {
    frames(what, &block_bytes(what, v)?)?
        .into_iter()
        .map(|f| decode(what, f))
        .collect()
}

/// Points framed one after another, compressed as one zstd frame.
fn encode_block<M: Message>(what: &'static str, points: &[M]) -> Result<Vec<u8>, StoreError> {
    let mut v = Vec::with_capacity(points.iter().map(|p| p.encoded_len() + 4).sum());
    for p in points {
        p.encode_length_delimited(&mut v)
            .expect("a Vec grows as needed");
    }
    COMPRESSOR
        .with(|c| {
            let mut c = c.borrow_mut();
            let c = match c.as_mut() {
                Some(c) => c,
                None => c.insert(zstd::bulk::Compressor::new(BLOCK_LEVEL)?),
            };
            c.compress(&v)
        })
        .map_err(|source| StoreError::Pack { what, source })
}

/// Two runs sorted by time merged into one, a single point winning over a
/// packed one of the same time (it is the later write).
fn merge_sorted<M: Timed>(packed: Vec<M>, single: Vec<M>) -> Vec<M> {
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
    fn range<M: Message + Default + Timed>(
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
            .range(point_key(id, bucket_ms, start_ms)..point_key(id, bucket_ms, end_ms))
            .take(limit)
            .map(|kv| decode(self.what, &kv?.1))
            .collect::<Result<Vec<M>, _>>()?;
        let mut all = merge_sorted(packed, single);
        all.truncate(limit);
        Ok(all)
    }

    /// The first point of a series.
    fn first<M: Message + Default + Mergeable>(
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
    fn last<M: Message + Default + Mergeable>(
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
        for kv in self
            .points
            .range(point_key(id, b, 0)..point_key(id, b, cutoff))
        {
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
            for kv in self
                .blocks
                .range(point_key(id, b, start)..point_key(id, b, start + span))
            {
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
        for kv in self
            .blocks
            .range(point_key(id, bucket_ms, from_ms)..point_key(id, bucket_ms, to_ms))
        {
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
        for kv in self
            .points
            .range(point_key(id, bucket_ms, 0)..point_key(id, bucket_ms, cutoff_ms))
        {
            batch.remove(kv?.0);
            removed += 1;
        }
        self.points.apply_batch(batch)?;
        let mut batch = sled::Batch::default();
        for kv in self
            .blocks
            .range(point_key(id, bucket_ms, 0)..point_key(id, bucket_ms, cutoff_ms))
        {
            let (k, v) = kv?;
            removed += block_len(self.what, &v)? as u64;
            batch.remove(k);
        }
        self.blocks.apply_batch(batch)?;
        Ok(removed)
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

    /// Open the store again after its last handle was dropped. sled's
    /// background threads may hold the directory's lock a moment longer,
    /// so an IO error is retried for a few seconds; anything else fails.
    fn reopen(dir: &Path, levels: Vec<Level>) -> Store {
        let t0 = std::time::Instant::now();
        loop {
            match Store::open(dir, levels.clone(), 8 << 20) {
                Ok(s) => return s,
                Err(StoreError::Sled(sled::Error::Io(e)))
                    if t0.elapsed() < std::time::Duration::from_secs(5) =>
                {
                    eprintln!("reopening {}: {e}; retrying", dir.display());
                    std::thread::sleep(std::time::Duration::from_millis(50));
                }
                Err(e) => panic!("reopening {}: {e}", dir.display()),
            }
        }
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
            let e = pass.into_result().unwrap_err();
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
