//! Learned restore prefetch: for each snapshot memory file, which pages
//! its guests touch after a restore and in what order, learned over
//! restores, and from that the pages to copy in ahead of the guest on the
//! next one (the tracker copies them: `wset_tracker::tracker::prefetch`).
//!
//! A snapshot is known by its identity: device, inode, size, modification
//! time and a fingerprint of its contents, so a rewritten file never meets
//! an old set. Each restore's tracker records the first touches over a
//! span (`--prefetch-record`) and which pages it prefetched; the next
//! registration of the same snapshot folds those recordings in. A page is
//! in the set when the guest touched it in at least `min_seen` of the last
//! `history` restores that could see it, so a one-off burst does not stay
//! and a set shrinks as well as grows. A prefetched page raises no fault,
//! so that restore cannot see whether the guest touched it: each restore
//! withholds a rotating 1 in `probe` pages of the set (they are served on
//! demand, and seen), which keeps every page's history moving and gives an
//! estimate of how much of the set the guest did not touch.
//!
//! Files, under `<state-dir>/prefetch/<identity>/`: `learned.bin` (per
//! page: the touch history bits, how many restores saw it, its first-touch
//! rank) and `rec-*.bin` recordings not yet folded in. The state of the
//! [`KEEP_SNAPSHOTS`] most recently restored snapshots is kept.

use std::fs::File;
use std::io;
use std::os::unix::fs::{FileExt as _, MetadataExt as _};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use wset_tracker::tracker::RECORD_MAGIC;

const LEARNED_MAGIC: &[u8; 8] = b"WSETLRN1";
/// Observations kept per page (bits of `hist`).
pub const MAX_HISTORY: u32 = 8;

/// How the set is learned and used.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Policy {
    /// A page is in the set when seen in at least this many...
    pub min_seen: u32,
    /// ...of the last this many restores that could see it.
    pub history: u32,
    /// One page in this many of the set is withheld each restore (0: none).
    pub probe: u32,
    /// At most this many bytes are prefetched per restore.
    pub max_bytes: u64,
}

/// Why the learned state could not be used.
#[derive(Debug, thiserror::Error)]
pub enum PrefetchError {
    #[error("snapshot file {}: {source}", path.display())]
    Snapshot { path: PathBuf, source: io::Error },
    #[error("{}: {source}", path.display())]
    State { path: PathBuf, source: io::Error },
}

/// A snapshot memory file's identity, as a directory name.
pub fn identity(file: &File, path: &Path) -> Result<String, PrefetchError> {
    let err = |source| PrefetchError::Snapshot {
        path: path.to_owned(),
        source,
    };
    let m = file.metadata().map_err(err)?;
    let mtime_ns = (m.mtime() as i128 * 1_000_000_000 + m.mtime_nsec() as i128) as u64;
    let mut h = Fnv::new();
    for v in [m.dev(), m.ino(), m.len(), mtime_ns] {
        h.write(&v.to_le_bytes());
    }
    // 64 blocks spread over the file, and its last one.
    let mut block = vec![0u8; 4096];
    let blocks = m.len() / 4096;
    let mut at: Vec<u64> = (0..64).map(|i| i * blocks / 64).collect();
    at.push(blocks.saturating_sub(1));
    for b in at {
        let n = read_at_most(file, &mut block, b * 4096).map_err(err)?;
        h.write(&block[..n]);
    }
    Ok(format!(
        "{:x}-{:x}-{}-{:016x}",
        m.dev(),
        m.ino(),
        m.len(),
        h.finish()
    ))
}

fn read_at_most(f: &File, buf: &mut [u8], off: u64) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match f.read_at(&mut buf[n..], off + n as u64)? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

/// FNV-1a, 64 bits: stable across builds and releases (the identity is
/// stored on disk), unlike the standard library's hasher.
struct Fnv(u64);

impl Fnv {
    fn new() -> Self {
        Self(0xcbf2_9ce4_8422_2325)
    }
    fn write(&mut self, b: &[u8]) {
        for &x in b {
            self.0 = (self.0 ^ u64::from(x)).wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    fn finish(&self) -> u64 {
        self.0
    }
}

/// One restore's recording, as the tracker wrote it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Recording {
    pub granules: u32,
    /// First touches, in order.
    pub touched: Vec<u32>,
    /// Pages the prefetch copied in (their touches were not seen).
    pub prefetched: Vec<u32>,
}

impl Recording {
    pub fn parse(b: &[u8]) -> Option<Self> {
        let rest = b.strip_prefix(RECORD_MAGIC)?;
        let words: Vec<u32> = rest
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes(c.try_into().expect("4 bytes")))
            .collect();
        let (&[granules, nt, np], rest) = words.split_first_chunk::<3>()?;
        let (nt, np) = (nt as usize, np as usize);
        if rest.len() != nt + np || rest.iter().any(|&g| g >= granules) {
            return None;
        }
        Some(Self {
            granules,
            touched: rest[..nt].to_vec(),
            prefetched: rest[nt..].to_vec(),
        })
    }
}

/// What restores of one snapshot taught.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Learned {
    pub granules: u32,
    /// Restores folded in.
    pub restores: u32,
    /// Per page: bit 0 the latest restore that saw it (1: touched).
    hist: Vec<u8>,
    /// Per page: restores that saw it, at most [`MAX_HISTORY`].
    seen: Vec<u8>,
    /// Per page: its place in the first-touch order when last touched.
    rank: Vec<u32>,
}

/// What folding one recording in found.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Folded {
    pub touched: u32,
    pub prefetched: u32,
    /// Pages of the set that restore withheld (or the guest reached first).
    pub probes: u32,
    /// Of those, the ones the guest did not touch.
    pub probes_untouched: u32,
}

impl Folded {
    /// The share of the prefetched pages the guest is estimated not to
    /// have touched, from the probes, with the number it rests on.
    pub fn untouched_share(&self) -> Option<f64> {
        (self.probes > 0).then(|| f64::from(self.probes_untouched) / f64::from(self.probes))
    }
}

/// The pages to prefetch on a restore, and what stands behind them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PlanOut {
    /// Granules in first-touch order.
    pub order: Vec<u32>,
    /// The set's pages withheld to be seen on demand (the probes).
    pub probes: Vec<u32>,
    /// Pages in the learned set.
    pub members: u32,
    /// Of them, withheld as probes.
    pub withheld: u32,
    /// Of them, left out by the byte budget.
    pub over_budget: u32,
}

impl Learned {
    pub fn new(granules: u32) -> Self {
        let n = granules as usize;
        Self {
            granules,
            restores: 0,
            hist: vec![0; n],
            seen: vec![0; n],
            rank: vec![u32::MAX; n],
        }
    }

    fn member(&self, g: usize, p: &Policy) -> bool {
        let window = u32::from(self.seen[g]).min(p.history).min(MAX_HISTORY);
        let mask = ((1u32 << window) - 1) as u8;
        (self.hist[g] & mask).count_ones() >= p.min_seen
    }

    /// Fold one restore in. A recording of another size is refused.
    pub fn fold(&mut self, rec: &Recording, p: &Policy) -> Option<Folded> {
        if rec.granules != self.granules {
            return None;
        }
        let n = self.granules as usize;
        let mut prefetched = vec![false; n];
        for &g in &rec.prefetched {
            prefetched[g as usize] = true;
        }
        let mut first = vec![u32::MAX; n];
        for (i, &g) in rec.touched.iter().enumerate() {
            let f = &mut first[g as usize];
            *f = (*f).min(i as u32);
        }
        let mut out = Folded {
            touched: rec.touched.len() as u32,
            prefetched: rec.prefetched.len() as u32,
            ..Folded::default()
        };
        for g in 0..n {
            let touched = first[g] != u32::MAX;
            if prefetched[g] && !touched {
                // Copied in ahead of the guest: this restore cannot tell.
                continue;
            }
            if self.member(g, p) {
                out.probes += 1;
                out.probes_untouched += u32::from(!touched);
            }
            self.hist[g] = (self.hist[g] << 1) | u8::from(touched);
            self.seen[g] = (self.seen[g] + 1).min(MAX_HISTORY as u8);
            if touched {
                self.rank[g] = first[g];
            }
        }
        self.restores += 1;
        Some(out)
    }

    /// The pages to copy in on restore number `seq`.
    pub fn plan(&self, p: &Policy, granule_bytes: u64, seq: u32) -> PlanOut {
        let mut out = PlanOut::default();
        let mut order: Vec<u32> = Vec::new();
        for g in 0..self.granules {
            if !self.member(g as usize, p) {
                continue;
            }
            out.members += 1;
            if p.probe > 0 && probe_of(g, seq).is_multiple_of(p.probe) {
                out.withheld += 1;
                out.probes.push(g);
                continue;
            }
            order.push(g);
        }
        order.sort_by_key(|&g| (self.rank[g as usize], g));
        let budget = (p.max_bytes / granule_bytes.max(1)) as usize;
        if order.len() > budget {
            out.over_budget = (order.len() - budget) as u32;
            order.truncate(budget);
        }
        out.order = order;
        out
    }

    fn encode(&self) -> Vec<u8> {
        let n = self.granules as usize;
        let mut b = Vec::with_capacity(16 + 6 * n);
        b.extend_from_slice(LEARNED_MAGIC);
        b.extend_from_slice(&self.granules.to_le_bytes());
        b.extend_from_slice(&self.restores.to_le_bytes());
        b.extend_from_slice(&self.hist);
        b.extend_from_slice(&self.seen);
        for r in &self.rank {
            b.extend_from_slice(&r.to_le_bytes());
        }
        b
    }

    fn decode(b: &[u8]) -> Option<Self> {
        let rest = b.strip_prefix(LEARNED_MAGIC)?;
        let granules = u32::from_le_bytes(rest.get(..4)?.try_into().ok()?);
        let restores = u32::from_le_bytes(rest.get(4..8)?.try_into().ok()?);
        let n = granules as usize;
        let rest = &rest[8..];
        if rest.len() != 6 * n {
            return None;
        }
        Some(Self {
            granules,
            restores,
            hist: rest[..n].to_vec(),
            seen: rest[n..2 * n].to_vec(),
            rank: rest[2 * n..]
                .chunks_exact(4)
                .map(|c| u32::from_le_bytes(c.try_into().expect("4 bytes")))
                .collect(),
        })
    }
}

/// Which pages a restore withholds: a hash of the page and the restore, so
/// each restore probes a different, evenly spread share.
fn probe_of(g: u32, seq: u32) -> u32 {
    let x = (u64::from(g) << 32 | u64::from(seq)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    (x >> 32) as u32
}

/// One snapshot's directory of learned state and pending recordings.
#[derive(Debug)]
pub struct Store {
    dir: PathBuf,
}

/// Snapshots whose learned state is kept (the most recently restored).
pub const KEEP_SNAPSHOTS: usize = 64;

/// Registrations of one snapshot may race; folding is one at a time.
static FOLDING: Mutex<()> = Mutex::new(());

/// What a registration gets: the pages to prefetch, where to record, and
/// what to tell the operator.
#[derive(Debug)]
pub struct Prepared {
    pub plan: PlanOut,
    pub record_path: PathBuf,
    pub restores: u32,
    pub last: Option<Folded>,
}

impl Store {
    pub fn new(state_dir: &Path, identity: &str) -> Self {
        Self {
            dir: state_dir.join("prefetch").join(identity),
        }
    }

    /// Keep what the most recently restored [`KEEP_SNAPSHOTS`] snapshots
    /// taught; older ones (rewritten or retired files) go.
    fn prune(&self) {
        let Some(parent) = self.dir.parent() else {
            return;
        };
        let Ok(rd) = std::fs::read_dir(parent) else {
            return;
        };
        let mut dirs: Vec<(std::time::SystemTime, PathBuf)> = rd
            .flatten()
            .filter(|e| e.path() != self.dir)
            .filter_map(|e| Some((e.metadata().ok()?.modified().ok()?, e.path())))
            .collect();
        if dirs.len() < KEEP_SNAPSHOTS {
            return;
        }
        dirs.sort();
        for (_, d) in &dirs[..dirs.len() + 1 - KEEP_SNAPSHOTS] {
            let _ = std::fs::remove_dir_all(d);
        }
    }

    fn state_err(&self, path: &Path) -> impl Fn(io::Error) -> PrefetchError {
        let path = path.to_owned();
        move |source| PrefetchError::State {
            path: path.clone(),
            source,
        }
    }

    /// Fold in the recordings waiting, save, and plan this restore.
    pub fn prepare(
        &self,
        granules: u32,
        granule_bytes: u64,
        p: &Policy,
        vm: &str,
    ) -> Result<Prepared, PrefetchError> {
        let _one = FOLDING.lock().unwrap_or_else(|e| e.into_inner());
        if !self.dir.exists() {
            self.prune();
        }
        std::fs::create_dir_all(&self.dir).map_err(self.state_err(&self.dir))?;
        let learned_path = self.dir.join("learned.bin");
        let mut learned = match std::fs::read(&learned_path) {
            Ok(b) => Learned::decode(&b).filter(|l| l.granules == granules),
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(e) => return Err(self.state_err(&learned_path)(e)),
        }
        .unwrap_or_else(|| Learned::new(granules));
        let mut pending: Vec<PathBuf> = std::fs::read_dir(&self.dir)
            .map_err(self.state_err(&self.dir))?
            .flatten()
            .map(|e| e.path())
            .filter(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with("rec-") && n.ends_with(".bin"))
            })
            .collect();
        // Oldest first: names carry the time they were planned.
        pending.sort();
        let mut last = None;
        for path in &pending {
            let rec = std::fs::read(path).ok().and_then(|b| Recording::parse(&b));
            match rec.and_then(|r| learned.fold(&r, p)) {
                Some(f) => last = Some(f),
                None => {
                    tracing::warn!(file = %path.display(), "restore recording unreadable or of another size; ignored")
                }
            }
        }
        if !pending.is_empty() {
            let tmp = self.dir.join("learned.tmp");
            std::fs::write(&tmp, learned.encode()).map_err(self.state_err(&tmp))?;
            std::fs::rename(&tmp, &learned_path).map_err(self.state_err(&learned_path))?;
            for path in &pending {
                let _ = std::fs::remove_file(path);
            }
        }
        let plan = learned.plan(p, granule_bytes, learned.restores);
        let record_path = self.dir.join(format!(
            "rec-{:020}-{vm}.bin",
            wset_serve::process::now_ms() * 1000 + u64::from(learned.restores % 1000)
        ));
        Ok(Prepared {
            plan,
            record_path,
            restores: learned.restores,
            last,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const P: Policy = Policy {
        min_seen: 2,
        history: 4,
        probe: 0,
        max_bytes: u64::MAX,
    };

    fn rec(granules: u32, touched: &[u32], prefetched: &[u32]) -> Recording {
        Recording {
            granules,
            touched: touched.to_vec(),
            prefetched: prefetched.to_vec(),
        }
    }

    #[test]
    fn a_page_joins_after_min_seen_restores_in_first_touch_order() {
        let mut l = Learned::new(16);
        l.fold(&rec(16, &[5, 3, 9], &[]), &P).unwrap();
        assert!(
            l.plan(&P, 4096, 1).order.is_empty(),
            "seen once is not enough"
        );
        l.fold(&rec(16, &[9, 5, 3, 12], &[]), &P).unwrap();
        assert_eq!(l.plan(&P, 4096, 2).order, [9, 5, 3], "12 was seen once");
    }

    #[test]
    fn a_one_off_burst_leaves_and_the_set_shrinks() {
        let mut l = Learned::new(8);
        for _ in 0..2 {
            l.fold(&rec(8, &[0, 1, 2, 3], &[]), &P).unwrap();
        }
        assert_eq!(l.plan(&P, 4096, 0).order, [0, 1, 2, 3]);
        // The guest stops touching 2 and 3: after enough restores that saw
        // them untouched they leave.
        for _ in 0..3 {
            l.fold(&rec(8, &[0, 1], &[]), &P).unwrap();
        }
        assert_eq!(l.plan(&P, 4096, 0).order, [0, 1]);
        // A burst of 4..8 once does not stay.
        l.fold(&rec(8, &[0, 1, 4, 5, 6, 7], &[]), &P).unwrap();
        assert_eq!(l.plan(&P, 4096, 0).order, [0, 1]);
    }

    #[test]
    fn prefetched_pages_keep_their_history_and_probes_measure_the_set() {
        let mut l = Learned::new(8);
        for _ in 0..2 {
            l.fold(&rec(8, &[0, 1, 2, 3], &[]), &P).unwrap();
        }
        // A restore that prefetched 0..3 saw none of their touches: they
        // stay in the set.
        let f = l.fold(&rec(8, &[], &[0, 1, 2, 3]), &P).unwrap();
        assert_eq!(f.probes, 0);
        assert_eq!(l.plan(&P, 4096, 0).order, [0, 1, 2, 3]);
        // One withheld (3) and touched, one withheld (2) and not touched.
        let f = l.fold(&rec(8, &[3], &[0, 1]), &P).unwrap();
        assert_eq!((f.probes, f.probes_untouched), (2, 1));
        assert_eq!(f.untouched_share(), Some(0.5));
    }

    #[test]
    fn probes_rotate_and_the_budget_cuts_the_tail() {
        let mut l = Learned::new(1024);
        let all: Vec<u32> = (0..1024).collect();
        for _ in 0..2 {
            l.fold(&rec(1024, &all, &[]), &P).unwrap();
        }
        let probing = Policy { probe: 16, ..P };
        let a = l.plan(&probing, 4096, 7);
        let b = l.plan(&probing, 4096, 8);
        assert_eq!(a.members, 1024);
        assert!(
            (40..=90).contains(&a.withheld),
            "about 1 in 16: {}",
            a.withheld
        );
        assert_ne!(a.order, b.order, "another restore withholds other pages");
        let small = Policy {
            max_bytes: 100 * 4096,
            ..P
        };
        let c = l.plan(&small, 4096, 0);
        assert_eq!(c.order, (0..100).collect::<Vec<u32>>());
        assert_eq!(c.over_budget, 924);
    }

    #[test]
    fn files_round_trip_and_bad_ones_are_refused() {
        let mut l = Learned::new(4);
        l.fold(&rec(4, &[2, 0], &[]), &P).unwrap();
        assert_eq!(Learned::decode(&l.encode()), Some(l.clone()));
        assert_eq!(Learned::decode(b"WSETLRN1\x04\x00"), None);
        let mut b = RECORD_MAGIC.to_vec();
        for v in [4u32, 2, 1, 2, 0, 3] {
            b.extend_from_slice(&v.to_le_bytes());
        }
        assert_eq!(Recording::parse(&b), Some(rec(4, &[2, 0], &[3])));
        b.truncate(b.len() - 4);
        assert_eq!(Recording::parse(&b), None, "short");
        assert!(l.fold(&rec(5, &[], &[]), &P).is_none(), "another size");
    }

    #[test]
    fn identity_changes_when_the_file_is_rewritten() {
        let d = std::env::temp_dir().join(format!("wset-prefetch-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        let p = d.join("mem");
        std::fs::write(&p, vec![1u8; 64 * 4096]).unwrap();
        let a = identity(&File::open(&p).unwrap(), &p).unwrap();
        assert_eq!(a, identity(&File::open(&p).unwrap(), &p).unwrap());
        // Same size and (restored) mtime, other contents.
        let mtime = std::fs::metadata(&p).unwrap().modified().unwrap();
        let f = std::fs::OpenOptions::new().write(true).open(&p).unwrap();
        f.write_all_at(&[2u8; 4096], 0).unwrap();
        f.set_modified(mtime).unwrap();
        drop(f);
        assert_ne!(a, identity(&File::open(&p).unwrap(), &p).unwrap());
        std::fs::remove_dir_all(&d).unwrap();
    }
}
