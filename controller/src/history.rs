//! Pure history logic: turning agent summaries into stored points, checking
//! them, merging points into coarser buckets, choosing which stored series
//! answers a query, finding gaps, and page tokens. No IO, no clock, no sled.

use std::collections::BTreeMap;

use wset_proto::ids::VmId;
use wset_proto::v1 as pb;

/// Largest guest memory a summary may claim (1 PiB): anything larger is a
/// broken agent, not a VM.
pub const MAX_MEMORY_BYTES: u64 = 1 << 50;

/// Why an agent's summary was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SummaryError {
    #[error(transparent)]
    BadVmId(#[from] wset_proto::ids::IdError),
    #[error("{vm}: memory_bytes {bytes} is zero or over 1 PiB")]
    BadMemory { vm: String, bytes: u64 },
    #[error("{vm}: window {window_ms} ms has a working set ({wss} B) larger than memory ({mem} B)")]
    WssOverMemory {
        vm: String,
        window_ms: u64,
        wss: u64,
        mem: u64,
    },
    #[error("{vm}: {what} is not a finite, non-negative number")]
    BadNumber { vm: String, what: &'static str },
    #[error("{vm}: {what} has {n} entries, at most {max}")]
    TooMany {
        vm: String,
        what: &'static str,
        n: usize,
        max: usize,
    },
}

/// Check one summary from an agent before anything of it is stored; its
/// VM id, checked, is what the rest of the controller keys it by.
pub fn check_summary(s: &pb::VmSummary) -> Result<VmId, SummaryError> {
    let vm = || s.vm_id.clone();
    let id = VmId::parse_in("vm_id", &s.vm_id)?;
    if s.memory_bytes == 0 || s.memory_bytes > MAX_MEMORY_BYTES {
        return Err(SummaryError::BadMemory {
            vm: vm(),
            bytes: s.memory_bytes,
        });
    }
    let too_many = |what, n: usize, max| {
        (n > max).then(|| SummaryError::TooMany {
            vm: vm(),
            what,
            n,
            max,
        })
    };
    if let Some(e) = too_many("windows", s.windows.len(), 32)
        .or_else(|| too_many("idle_ages", s.idle_ages.len(), 64))
        .or_else(|| too_many("labels", s.labels.len(), crate::labels::MAX_LABELS))
    {
        return Err(e);
    }
    for w in &s.windows {
        if w.wss_bytes > s.memory_bytes || w.dirty_bytes > s.memory_bytes {
            return Err(SummaryError::WssOverMemory {
                vm: vm(),
                window_ms: w.window_ms,
                wss: w.wss_bytes.max(w.dirty_bytes),
                mem: s.memory_bytes,
            });
        }
    }
    let finite = |x: f64| x.is_finite() && x >= 0.0;
    for (what, x) in [
        ("access_rate_bytes_per_s", s.access_rate_bytes_per_s),
        ("dirty_rate_bytes_per_s", s.dirty_rate_bytes_per_s),
        (
            "error.relative_error",
            s.error.as_ref().map_or(0.0, |e| e.relative_error),
        ),
    ] {
        if !finite(x) {
            return Err(SummaryError::BadNumber { vm: vm(), what });
        }
    }
    Ok(id)
}

/// The stored form of one summary that arrived at `received_ms` (controller
/// clock); `resolution_ms` is the sampling period.
pub fn raw_point(s: &pb::VmSummary, received_ms: u64, resolution_ms: u64) -> pb::VmHistoryPoint {
    let e = s.error.clone().unwrap_or_default();
    pb::VmHistoryPoint {
        timestamp_ms: received_ms,
        resolution_ms,
        repaired_from: String::new(),
        samples: 1,
        host_id: s.host_id.clone(),
        memory_bytes: s.memory_bytes,
        windows: s
            .windows
            .iter()
            .map(|w| pb::WindowStat {
                window_ms: w.window_ms,
                wss_bytes: w.wss_bytes,
                wss_max_bytes: w.wss_bytes,
                dirty_bytes: w.dirty_bytes,
                dirty_max_bytes: w.dirty_bytes,
            })
            .collect(),
        access_rate_bytes_per_s: s.access_rate_bytes_per_s,
        dirty_rate_bytes_per_s: s.dirty_rate_bytes_per_s,
        dirty_rate_max_bytes_per_s: s.dirty_rate_bytes_per_s,
        idle_ages: s.idle_ages.clone(),
        relative_error: e.relative_error,
        wss_is_lower_bound: e.wss_is_lower_bound,
        methods: s.methods.clone(),
        state: s.state,
        touched_bytes: s.touched_bytes,
        agent_timestamp_ms: s.timestamp_ms,
    }
}

/// The working set of the shortest window of a summary.
pub fn shortest_wss(s: &pb::VmSummary) -> u64 {
    s.windows
        .iter()
        .min_by_key(|w| w.window_ms)
        .map_or(0, |w| w.wss_bytes)
}

/// The stored form of one batch's host facts.
pub fn host_point(
    h: &pb::HostFacts,
    vms: &[&pb::VmSummary],
    received_ms: u64,
    resolution_ms: u64,
) -> pb::HostHistoryPoint {
    let wss: u64 = vms.iter().map(|s| shortest_wss(s)).sum();
    pb::HostHistoryPoint {
        timestamp_ms: received_ms,
        resolution_ms,
        repaired_from: String::new(),
        samples: 1,
        memory_total_bytes: h.memory_total_bytes,
        memory_available_bytes: h.memory_available_bytes,
        memory_available_min_bytes: h.memory_available_bytes,
        vm_memory_committed_bytes: h.vm_memory_committed_bytes,
        vm_wss_bytes: wss,
        vm_wss_max_bytes: wss,
        vms: vms.len() as u32,
        memory_pressure_some_avg10_max_pct: h
            .memory_pressure
            .as_ref()
            .map_or(0.0, |p| p.some_avg10_pct),
        agent_instance_id: h.agent_instance_id.clone(),
    }
}

fn wmean(a: u64, na: u32, b: u64, nb: u32) -> u64 {
    let n = u128::from(na) + u128::from(nb);
    if n == 0 {
        return 0;
    }
    ((u128::from(a) * u128::from(na) + u128::from(b) * u128::from(nb)) / n) as u64
}

fn fmean(a: f64, na: u32, b: f64, nb: u32) -> f64 {
    let n = f64::from(na) + f64::from(nb);
    if n == 0.0 {
        0.0
    } else {
        (a * f64::from(na) + b * f64::from(nb)) / n
    }
}

/// A point in time.
pub trait Timed {
    fn timestamp_ms(&self) -> u64;
}

/// The part of a raw VM point the planner reads. Decoding a stored
/// `VmHistoryPoint` as this skips its other fields (ids, idle ages,
/// methods) without allocating for them.
#[derive(Clone, PartialEq, prost::Message)]
pub struct PlanPoint {
    #[prost(uint64, tag = "1")]
    pub timestamp_ms: u64,
    #[prost(message, repeated, tag = "6")]
    pub windows: Vec<pb::WindowStat>,
    #[prost(double, tag = "8")]
    pub dirty_rate_bytes_per_s: f64,
}

impl Timed for PlanPoint {
    fn timestamp_ms(&self) -> u64 {
        self.timestamp_ms
    }
}

impl Timed for pb::VmHistoryPoint {
    fn timestamp_ms(&self) -> u64 {
        self.timestamp_ms
    }
}

impl Timed for pb::HostHistoryPoint {
    fn timestamp_ms(&self) -> u64 {
        self.timestamp_ms
    }
}

/// A point that can be merged with a later one into one bucket.
pub trait Mergeable: Timed + Clone {
    fn resolution_ms(&self) -> u64;
    /// Fold `later` (the next point in time) into `self`.
    fn absorb(&mut self, later: &Self);
    /// Make `self` stand for the bucket `[start, start + len)`.
    fn set_bucket(&mut self, start: u64, len: u64);
}

/// Where a merged point came from: the one source of all its samples, or
/// "mixed".
fn mix_source(a: &mut String, b: &str) {
    if a != b {
        *a = MIXED_SOURCE.to_owned();
    }
}

/// `repaired_from` of a bucket merged from points of different sources.
pub const MIXED_SOURCE: &str = "mixed";

impl Mergeable for pb::VmHistoryPoint {
    fn resolution_ms(&self) -> u64 {
        self.resolution_ms
    }
    fn absorb(&mut self, b: &Self) {
        let (na, nb) = (self.samples, b.samples);
        let mut windows: BTreeMap<u64, pb::WindowStat> =
            self.windows.iter().map(|w| (w.window_ms, *w)).collect();
        for w in &b.windows {
            let e = windows.entry(w.window_ms).or_insert(pb::WindowStat {
                window_ms: w.window_ms,
                ..Default::default()
            });
            // A window the earlier samples lacked counts as absent there.
            let n_e = if self.windows.iter().any(|x| x.window_ms == w.window_ms) {
                na
            } else {
                0
            };
            e.wss_bytes = wmean(e.wss_bytes, n_e, w.wss_bytes, nb);
            e.dirty_bytes = wmean(e.dirty_bytes, n_e, w.dirty_bytes, nb);
            e.wss_max_bytes = e.wss_max_bytes.max(w.wss_max_bytes);
            e.dirty_max_bytes = e.dirty_max_bytes.max(w.dirty_max_bytes);
        }
        self.windows = windows.into_values().collect();
        self.access_rate_bytes_per_s = fmean(
            self.access_rate_bytes_per_s,
            na,
            b.access_rate_bytes_per_s,
            nb,
        );
        self.dirty_rate_bytes_per_s = fmean(
            self.dirty_rate_bytes_per_s,
            na,
            b.dirty_rate_bytes_per_s,
            nb,
        );
        self.dirty_rate_max_bytes_per_s = self
            .dirty_rate_max_bytes_per_s
            .max(b.dirty_rate_max_bytes_per_s);
        self.relative_error = self.relative_error.max(b.relative_error);
        self.wss_is_lower_bound |= b.wss_is_lower_bound;
        self.samples = na.saturating_add(nb);
        // The latest sample's view of what does not average.
        self.host_id.clone_from(&b.host_id);
        self.memory_bytes = b.memory_bytes;
        self.idle_ages.clone_from(&b.idle_ages);
        self.methods.clone_from(&b.methods);
        self.state = b.state;
        self.touched_bytes = b.touched_bytes;
        self.agent_timestamp_ms = b.agent_timestamp_ms;
        mix_source(&mut self.repaired_from, &b.repaired_from);
    }
    fn set_bucket(&mut self, start: u64, len: u64) {
        self.timestamp_ms = start;
        self.resolution_ms = len;
    }
}

impl Mergeable for pb::HostHistoryPoint {
    fn resolution_ms(&self) -> u64 {
        self.resolution_ms
    }
    fn absorb(&mut self, b: &Self) {
        let (na, nb) = (self.samples, b.samples);
        self.memory_available_bytes = wmean(
            self.memory_available_bytes,
            na,
            b.memory_available_bytes,
            nb,
        );
        self.memory_available_min_bytes = self
            .memory_available_min_bytes
            .min(b.memory_available_min_bytes);
        self.vm_wss_bytes = wmean(self.vm_wss_bytes, na, b.vm_wss_bytes, nb);
        self.vm_wss_max_bytes = self.vm_wss_max_bytes.max(b.vm_wss_max_bytes);
        self.memory_pressure_some_avg10_max_pct = self
            .memory_pressure_some_avg10_max_pct
            .max(b.memory_pressure_some_avg10_max_pct);
        self.samples = na.saturating_add(nb);
        self.memory_total_bytes = b.memory_total_bytes;
        self.vm_memory_committed_bytes = b.vm_memory_committed_bytes;
        self.vms = b.vms;
        self.agent_instance_id.clone_from(&b.agent_instance_id);
        mix_source(&mut self.repaired_from, &b.repaired_from);
    }
    fn set_bucket(&mut self, start: u64, len: u64) {
        self.timestamp_ms = start;
        self.resolution_ms = len;
    }
}

/// Merge time-ordered points into buckets of `bucket_ms` aligned to the Unix
/// epoch. Points already at least that coarse pass through.
pub fn merge<P: Mergeable>(points: impl IntoIterator<Item = P>, bucket_ms: u64) -> Vec<P> {
    let mut out: Vec<P> = Vec::new();
    for p in points {
        if bucket_ms == 0 || p.resolution_ms() >= bucket_ms {
            out.push(p);
            continue;
        }
        let start = p.timestamp_ms() - p.timestamp_ms() % bucket_ms;
        match out.last_mut() {
            Some(last) if last.timestamp_ms() == start && last.resolution_ms() == bucket_ms => {
                last.absorb(&p);
            }
            _ => {
                let mut b = p;
                b.set_bucket(start, bucket_ms);
                out.push(b);
            }
        }
    }
    out
}

/// One stored series: raw samples (`bucket_ms` 0) or a rollup, kept for
/// `retention_ms`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Level {
    pub bucket_ms: u64,
    pub retention_ms: u64,
}

/// How much time one stored block of raw samples spans.
pub const RAW_BLOCK_MS: u64 = 60_000;

/// How much time the blocks of raw samples are merged into once it is past.
pub const RAW_LONG_BLOCK_MS: u64 = 3_600_000;

impl Level {
    /// The span of time packed into one stored block once it is closed: a
    /// minute of raw samples, or 60 buckets of a rollup, and never more
    /// than an eighth of the retention (so retention stays fine-grained).
    pub fn block_ms(&self) -> u64 {
        let base = if self.bucket_ms == 0 {
            RAW_BLOCK_MS
        } else {
            self.bucket_ms.saturating_mul(60)
        };
        base.min(self.retention_ms / 8).max(1)
    }

    /// The span that closed blocks are merged into once it is closed
    /// itself: an hour of raw samples (60 one-minute blocks) when raw
    /// samples are kept 8 hours or more, else the block span (no merging).
    /// Rollups keep the blocks they are packed into.
    pub fn long_block_ms(&self) -> u64 {
        if self.bucket_ms == 0
            && self.block_ms() == RAW_BLOCK_MS
            && self.retention_ms >= 8 * RAW_LONG_BLOCK_MS
        {
            RAW_LONG_BLOCK_MS
        } else {
            self.block_ms()
        }
    }
}

/// The stored series that answers a query for `[start_ms, …)` at
/// `resolution_ms`: for 0, the raw samples (as far back as they are kept);
/// otherwise the coarsest series no coarser than asked whose retention
/// reaches back to `start_ms`, else the finest series that does, else the
/// one kept longest. `levels` is sorted by bucket, raw first.
pub fn choose_level(levels: &[Level], resolution_ms: u64, start_ms: u64, now_ms: u64) -> Level {
    let raw = Level {
        bucket_ms: 0,
        retention_ms: u64::MAX,
    };
    if resolution_ms == 0 {
        return levels.first().copied().unwrap_or(raw);
    }
    let covers = |l: &Level| now_ms.saturating_sub(l.retention_ms) <= start_ms;
    levels
        .iter()
        .rev()
        .find(|l| l.bucket_ms <= resolution_ms && covers(l))
        .or_else(|| levels.iter().find(|l| covers(l)))
        .or_else(|| levels.iter().max_by_key(|l| l.retention_ms))
        .copied()
        .unwrap_or(raw)
}

/// Where two points in a row are further apart than their resolution
/// allows: a gap. A point stands for `[t, t + resolution)`; a gap is
/// reported when the next one starts later than `1.9 x` the resolution after
/// the previous one's start (one missing sample or bucket is a gap; the
/// jitter of a stream's timing is not).
pub fn gaps(points: &[(u64, u64)], prev: Option<(u64, u64)>) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    let mut last = prev;
    for &(t, res) in points {
        if let Some((pt, pres)) = last {
            let r = pres.max(res).max(1);
            if t > pt && (t - pt) * 10 > r * 19 {
                out.push((pt + pres.max(1), t));
            }
        }
        last = Some((t, res));
    }
    out
}

/// A page token: where the next page starts, and the last point of this
/// page (to find a gap across the page boundary).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PageToken {
    pub next_start_ms: u64,
    pub prev: Option<(u64, u64)>,
}

impl PageToken {
    pub fn encode(&self) -> String {
        match self.prev {
            Some((t, r)) => format!("v1.{}.{t}.{r}", self.next_start_ms),
            None => format!("v1.{}", self.next_start_ms),
        }
    }

    pub fn decode(s: &str) -> Option<Self> {
        let mut it = s.strip_prefix("v1.")?.split('.');
        let next_start_ms = it.next()?.parse().ok()?;
        let prev = match (it.next(), it.next()) {
            (Some(t), Some(r)) => Some((t.parse().ok()?, r.parse().ok()?)),
            (None, None) => None,
            _ => return None,
        };
        if it.next().is_some() {
            return None;
        }
        Some(Self {
            next_start_ms,
            prev,
        })
    }
}

/// One page of a history query, validated by the caller.
#[derive(Clone, Copy, Debug)]
pub struct Query {
    pub start_ms: u64,
    pub end_ms: u64,
    pub resolution_ms: u64,
    pub page_size: usize,
    pub token: Option<PageToken>,
}

/// A page of points with the gaps among them.
#[derive(Clone, Debug, PartialEq)]
pub struct Page<P> {
    /// 0 for raw samples.
    pub resolution_ms: u64,
    pub points: Vec<P>,
    pub gaps: Vec<(u64, u64)>,
    pub next: Option<PageToken>,
    /// The time this page covers: `[from, to)`.
    pub from_ms: u64,
    pub to_ms: u64,
}

/// Most stored points read to build one page of merged buckets.
pub const MAX_SCAN_POINTS: usize = 500_000;

/// Answer one page of a query from the stored series: `fetch(bucket_ms,
/// start, end, limit)` reads points of one series in `[start, end)`.
pub fn page<P: Mergeable, E>(
    q: &Query,
    levels: &[Level],
    now_ms: u64,
    mut fetch: impl FnMut(u64, u64, u64, usize) -> Result<Vec<P>, E>,
) -> Result<Page<P>, E> {
    let from = q.token.map_or(q.start_ms, |t| t.next_start_ms);
    let level = choose_level(levels, q.resolution_ms, q.start_ms, now_ms);
    let merge_to = if q.resolution_ms > level.bucket_ms {
        q.resolution_ms
    } else {
        0
    };
    let (points, next_start, to) = if merge_to == 0 {
        let mut pts = fetch(level.bucket_ms, from, q.end_ms, q.page_size + 1)?;
        let next = (pts.len() > q.page_size)
            .then(|| pts.pop().map(|p| p.timestamp_ms()))
            .flatten();
        (pts, next, next.unwrap_or(q.end_ms))
    } else {
        let aligned = from - from % merge_to;
        let mut page_end = aligned
            .saturating_add(merge_to.saturating_mul(q.page_size as u64))
            .min(q.end_ms);
        let mut pts = fetch(level.bucket_ms, from, page_end, MAX_SCAN_POINTS)?;
        if pts.len() == MAX_SCAN_POINTS {
            // Too dense to merge a whole page at once: stop before the last
            // (maybe partial) bucket and start the next page there.
            let last = pts.last().map_or(from, Timed::timestamp_ms);
            let b = last - last % merge_to;
            if b > from {
                pts.retain(|p| p.timestamp_ms() < b);
                page_end = b;
            }
        }
        let next = (page_end < q.end_ms).then_some(page_end);
        (merge(pts, merge_to), next, page_end)
    };
    let spans: Vec<(u64, u64)> = points
        .iter()
        .map(|p| (p.timestamp_ms(), p.resolution_ms()))
        .collect();
    let gaps = gaps(&spans, q.token.and_then(|t| t.prev));
    let prev = spans.last().copied().or(q.token.and_then(|t| t.prev));
    Ok(Page {
        resolution_ms: if merge_to > 0 {
            merge_to
        } else {
            level.bucket_ms
        },
        points,
        gaps,
        next: next_start.map(|next_start_ms| PageToken {
            next_start_ms,
            prev,
        }),
        from_ms: from,
        to_ms: to,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn summary(vm: &str, mem: u64, wss: u64) -> pb::VmSummary {
        pb::VmSummary {
            vm_id: vm.into(),
            host_id: "h1".into(),
            memory_bytes: mem,
            windows: vec![
                pb::WindowWorkingSet {
                    window_ms: 10_000,
                    wss_bytes: wss,
                    dirty_bytes: wss / 2,
                    complete: true,
                },
                pb::WindowWorkingSet {
                    window_ms: 60_000,
                    wss_bytes: wss * 2,
                    dirty_bytes: 0,
                    complete: true,
                },
            ],
            dirty_rate_bytes_per_s: 100.0,
            ..Default::default()
        }
    }

    #[test]
    fn summaries_are_checked() {
        assert_eq!(
            check_summary(&summary("vm-1", 1 << 30, 1 << 20)),
            Ok(VmId::parse("vm-1").unwrap())
        );
        assert!(matches!(
            check_summary(&summary("bad/id", 1 << 30, 1)),
            Err(SummaryError::BadVmId(_))
        ));
        assert!(matches!(
            check_summary(&summary("a", 0, 0)),
            Err(SummaryError::BadMemory { .. })
        ));
        assert!(matches!(
            check_summary(&summary("a", 1 << 60, 0)),
            Err(SummaryError::BadMemory { .. })
        ));
        assert!(matches!(
            check_summary(&summary("a", 1 << 20, 1 << 20)),
            Err(SummaryError::WssOverMemory { .. })
        ));
        let mut s = summary("a", 1 << 30, 1);
        s.dirty_rate_bytes_per_s = f64::NAN;
        assert!(matches!(
            check_summary(&s),
            Err(SummaryError::BadNumber { .. })
        ));
        s.dirty_rate_bytes_per_s = -1.0;
        assert!(check_summary(&s).is_err());
        let mut s = summary("a", 1 << 30, 1);
        s.idle_ages = vec![pb::IdleAgeBucket::default(); 65];
        assert!(matches!(
            check_summary(&s),
            Err(SummaryError::TooMany { .. })
        ));
    }

    #[test]
    fn merging_averages_and_keeps_maxima() {
        let pts: Vec<_> = [(0, 100), (10_000, 300), (59_999, 200), (60_000, 50)]
            .iter()
            .map(|&(t, wss)| raw_point(&summary("a", 1 << 30, wss), t, 10_000))
            .collect();
        let m = merge(pts, 60_000);
        assert_eq!(m.len(), 2);
        assert_eq!(
            (m[0].timestamp_ms, m[0].resolution_ms, m[0].samples),
            (0, 60_000, 3)
        );
        assert_eq!(m[0].windows[0].wss_bytes, 200);
        assert_eq!(m[0].windows[0].wss_max_bytes, 300);
        assert_eq!(m[0].windows[1].wss_bytes, 400);
        assert_eq!(m[1].samples, 1);
        assert_eq!(m[1].windows[0].wss_bytes, 50);
        // Merging rollups again weighs by samples.
        let again = merge(m, 120_000);
        assert_eq!(again.len(), 1);
        assert_eq!(again[0].samples, 4);
        assert_eq!(again[0].windows[0].wss_bytes, (100 + 300 + 200 + 50) / 4);
        assert_eq!(again[0].windows[0].wss_max_bytes, 300);
        // Coarser points pass through a finer merge.
        assert_eq!(merge(again.clone(), 1000), again);
    }

    #[test]
    fn host_points_merge() {
        let h = pb::HostFacts {
            memory_total_bytes: 100,
            memory_available_bytes: 80,
            ..Default::default()
        };
        let s = summary("a", 1 << 30, 10);
        let mut a = host_point(&h, &[&s, &s], 0, 1000);
        assert_eq!((a.vm_wss_bytes, a.vms), (20, 2));
        let mut h2 = h.clone();
        h2.memory_available_bytes = 40;
        let b = host_point(&h2, &[&s], 1000, 1000);
        a.absorb(&b);
        assert_eq!(a.memory_available_bytes, 60);
        assert_eq!(a.memory_available_min_bytes, 40);
        assert_eq!((a.vm_wss_bytes, a.vm_wss_max_bytes, a.vms), (15, 20, 1));
    }

    #[test]
    fn level_choice() {
        let levels = [
            Level {
                bucket_ms: 0,
                retention_ms: 86_400_000,
            },
            Level {
                bucket_ms: 60_000,
                retention_ms: 7 * 86_400_000,
            },
            Level {
                bucket_ms: 3_600_000,
                retention_ms: 90 * 86_400_000,
            },
        ];
        let now = 100 * 86_400_000;
        let day_ago = now - 86_400_000 + 1;
        let check = |res, start, want| {
            assert_eq!(
                choose_level(&levels, res, start, now).bucket_ms,
                want,
                "res {res} start {start}"
            );
        };
        check(0, day_ago, 0);
        check(10_000, day_ago, 0);
        check(60_000, day_ago, 60_000);
        check(300_000, day_ago, 60_000);
        check(86_400_000, day_ago, 3_600_000);
        // Raw asked for: raw, as far back as it goes.
        check(0, now - 3 * 86_400_000, 0);
        // Beyond raw retention: the finest series that still covers it.
        check(10_000, now - 3 * 86_400_000, 60_000);
        check(10_000, now - 30 * 86_400_000, 3_600_000);
        // Beyond every retention: the one kept longest.
        check(10_000, 0, 3_600_000);
    }

    #[test]
    fn gaps_between_points() {
        let p = [(0, 10), (10, 10), (21, 10), (50, 10), (60, 10)];
        assert_eq!(gaps(&p, None), vec![(31, 50)]);
        // One missing bucket of a rollup is a gap.
        assert_eq!(gaps(&[(0, 60), (120, 60)], None), vec![(60, 120)]);
        assert_eq!(gaps(&[(0, 60), (60, 60)], None), vec![]);
        // Across a page boundary.
        assert_eq!(gaps(&[(100, 10)], Some((60, 10))), vec![(70, 100)]);
    }

    /// Pages of raw points and of merged buckets walk the whole range once,
    /// and a gap across a page boundary is still found.
    #[test]
    fn paging() {
        let stored: Vec<pb::VmHistoryPoint> = (0..100u64)
            .filter(|t| !(40..45).contains(t))
            .map(|t| raw_point(&summary("a", 1 << 30, t), t * 1000, 1000))
            .collect();
        let levels = [Level {
            bucket_ms: 0,
            retention_ms: u64::MAX,
        }];
        let fetch = |_b: u64, s: u64, e: u64, limit: usize| -> Result<Vec<_>, ()> {
            Ok(stored
                .iter()
                .filter(|p| p.timestamp_ms >= s && p.timestamp_ms < e)
                .take(limit)
                .cloned()
                .collect())
        };
        for (res, size, want_points) in [(0, 7, 95), (10_000, 3, 10)] {
            let mut q = Query {
                start_ms: 0,
                end_ms: 100_000,
                resolution_ms: res,
                page_size: size,
                token: None,
            };
            let (mut n, mut gaps, mut pages) = (0, vec![], 0);
            loop {
                let p = page(&q, &levels, 200_000, fetch).unwrap();
                assert!(p.points.len() <= size);
                n += p.points.len();
                gaps.extend(p.gaps);
                pages += 1;
                match p.next {
                    Some(t) => q.token = Some(t),
                    None => break,
                }
            }
            assert_eq!(n, want_points, "res {res}");
            if res == 0 {
                assert_eq!(gaps, vec![(40_000, 45_000)]);
                assert_eq!(pages, 95usize.div_ceil(7));
            } else {
                assert!(gaps.is_empty());
            }
        }
    }

    #[test]
    fn page_tokens_round_trip() {
        for t in [
            PageToken {
                next_start_ms: 5,
                prev: None,
            },
            PageToken {
                next_start_ms: 5,
                prev: Some((4, 1)),
            },
        ] {
            assert_eq!(PageToken::decode(&t.encode()), Some(t));
        }
        for bad in ["", "v1.", "v1.x", "v2.5", "v1.5.4", "v1.5.4.1.0", "5"] {
            assert_eq!(PageToken::decode(bad), None, "{bad:?}");
        }
    }
}
