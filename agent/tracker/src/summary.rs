//! Working-set summaries computed from a tracker's [`VmShared`], off the
//! fault path (the control plane calls this; the tracker never waits for it).

#![forbid(unsafe_code)]

use crate::plan::{Access, Dirty, Plan};
use crate::shared::{NEVER, VmShared};

/// What a summary reports on.
#[derive(Clone, Debug)]
pub struct SummaryConfig {
    /// Working-set windows, ms.
    pub windows_ms: Vec<u64>,
    /// Lower bounds (ms) of the idle-age buckets; the first should be 0.
    pub age_buckets_ms: Vec<u64>,
    /// Slices of guest memory for the heat map.
    pub heat_slices: usize,
}

impl Default for SummaryConfig {
    fn default() -> Self {
        Self {
            windows_ms: vec![10_000, 60_000, 300_000, 1_800_000],
            age_buckets_ms: vec![0, 10_000, 60_000, 300_000, 1_800_000],
            heat_slices: 64,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct WindowStat {
    pub window_ms: u64,
    pub wss_bytes: u64,
    pub dirty_bytes: u64,
    pub complete: bool,
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AgeBucket {
    pub min_age_ms: u64,
    /// 0 = unbounded.
    pub max_age_ms: u64,
    pub bytes: u64,
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Heat {
    pub offset_bytes: u64,
    pub size_bytes: u64,
    pub accessed_bytes: u64,
    pub written_bytes: u64,
}

#[derive(Clone, Debug, PartialEq)]
pub struct ErrorEstimate {
    /// Half-width of the interval around the working set, as a fraction of memory.
    pub relative_error: f64,
    pub confidence: f64,
    /// The working set counts only what the methods can see; reads of
    /// present pages may be missing.
    pub lower_bound: bool,
    pub basis: String,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Summary {
    pub epoch: u32,
    pub tracked_ms: u64,
    pub memory_bytes: u64,
    pub windows: Vec<WindowStat>,
    pub idle_ages: Vec<AgeBucket>,
    pub access_rate_bytes_per_s: f64,
    pub dirty_rate_bytes_per_s: f64,
    pub regions: Vec<Heat>,
    pub error: ErrorEstimate,
    pub touched_bytes: u64,
}

/// z for a two-sided 95% interval.
const Z95: f64 = 1.959_964;

/// Summarize one VM at `now_ms` (agent wall clock).
pub fn summarize(s: &VmShared, plan: &Plan, cfg: &SummaryConfig, now_ms: u64) -> Summary {
    let cur = s.epoch();
    let n = s.granules();
    let gb = s.granule_bytes();
    let interval = s.interval_ms().max(1);
    let tracked_ms = now_ms.saturating_sub(s.started_ms());
    let memory_bytes = n as u64 * gb;
    let sampled = matches!(plan.access, Access::ShmemSampled { .. });
    let k = s.sample_count().max(1);
    // Windows in epochs: a window of n epochs covers the epochs
    // [cur - n, cur], i.e. n completed intervals plus the one in progress.
    let spans: Vec<u32> = cfg
        .windows_ms
        .iter()
        .map(|&w| w.div_ceil(interval) as u32)
        .collect();

    // One pass over the granules.
    let mut wss_exact = vec![0u64; spans.len()];
    let mut wss_sample = vec![0u64; spans.len()];
    let mut dirty = vec![0u64; spans.len()];
    let mut dirty_sample = vec![0u64; spans.len()];
    let mut age_counts = vec![0u64; cfg.age_buckets_ms.len()];
    let mut age_sample = vec![0u64; cfg.age_buckets_ms.len()];
    let slices = cfg.heat_slices.clamp(1, n.max(1));
    let per_slice = n.div_ceil(slices).max(1);
    let mut heat_acc = vec![0u64; slices];
    let mut heat_wr = vec![0u64; slices];
    let mut heat_samp_acc = vec![0u64; slices];
    let mut heat_samp = vec![0u64; slices];
    let mut touched = 0u64;
    let shortest = spans.iter().copied().min().unwrap_or(1);
    for g in 0..n {
        let a = s.access_epoch(g);
        let w = s.write_epoch(g);
        let in_s = s.in_sample(g);
        let sl = g / per_slice;
        if in_s {
            heat_samp[sl] += 1;
        }
        if a != NEVER {
            touched += 1;
        }
        for (i, &span) in spans.iter().enumerate() {
            let from = cur.saturating_sub(span);
            if a != NEVER && a >= from {
                wss_exact[i] += 1;
                if in_s {
                    wss_sample[i] += 1;
                }
            }
            if w != NEVER && w >= from {
                dirty[i] += 1;
                if in_s {
                    dirty_sample[i] += 1;
                }
            }
        }
        if a != NEVER && a >= cur.saturating_sub(shortest) {
            heat_acc[sl] += 1;
            if in_s {
                heat_samp_acc[sl] += 1;
            }
        }
        if w != NEVER && w >= cur.saturating_sub(shortest) {
            heat_wr[sl] += 1;
        }
        let age_ms = if a == NEVER {
            tracked_ms
        } else {
            (cur - a) as u64 * interval
        };
        let b = cfg
            .age_buckets_ms
            .partition_point(|&m| m <= age_ms)
            .saturating_sub(1);
        if !age_counts.is_empty() {
            age_counts[b] += 1;
            if in_s {
                age_sample[b] += 1;
            }
        }
    }

    let scale = |count: u64| -> u64 { ((count as f64 / k as f64) * n as f64).round() as u64 * gb };
    // Writes are sampled with reads when the access method watches them.
    let sampled_writes = sampled && plan.dirty == Dirty::Watched;
    let windows = cfg
        .windows_ms
        .iter()
        .enumerate()
        .map(|(i, &w)| {
            let exact = wss_exact[i] * gb;
            // A sample estimate can fall below what was seen for certain
            // (first touches and writes outside the sample): take the larger.
            let wss = if sampled {
                scale(wss_sample[i]).max(dirty[i] * gb)
            } else {
                exact
            };
            let dirty_bytes = if sampled_writes {
                scale(dirty_sample[i]).max(dirty[i] * gb)
            } else {
                dirty[i] * gb
            };
            WindowStat {
                window_ms: w,
                wss_bytes: wss.min(memory_bytes),
                dirty_bytes: dirty_bytes.min(memory_bytes),
                complete: tracked_ms >= w,
            }
        })
        .collect();
    let idle_ages = cfg
        .age_buckets_ms
        .iter()
        .enumerate()
        .map(|(i, &min)| AgeBucket {
            min_age_ms: min,
            max_age_ms: cfg.age_buckets_ms.get(i + 1).copied().unwrap_or(0),
            bytes: if sampled {
                scale(age_sample[i])
            } else {
                age_counts[i] * gb
            },
        })
        .collect();
    let regions = (0..slices)
        .map(|i| {
            let first = i * per_slice;
            let len = per_slice.min(n.saturating_sub(first));
            let accessed = if sampled {
                if heat_samp[i] == 0 {
                    0
                } else {
                    (heat_samp_acc[i] as f64 / heat_samp[i] as f64 * len as f64).round() as u64 * gb
                }
            } else {
                heat_acc[i] * gb
            };
            Heat {
                offset_bytes: first as u64 * gb,
                size_bytes: len as u64 * gb,
                accessed_bytes: accessed,
                written_bytes: heat_wr[i] * gb,
            }
        })
        .collect();

    // Rates over the last completed interval.
    let (access_rate, dirty_rate) = match s.epoch_counts(cur.saturating_sub(1)) {
        Some(c) => {
            // Hot granules the sampler left unwatched count as estimated
            // from the ones it re-armed (see `Tracker::rearm_access`).
            let acc = if sampled {
                scale(c.sample_accessed as u64 + c.sample_accessed_unwatched as u64)
            } else {
                c.accessed as u64 * gb
            };
            let secs = interval as f64 / 1000.0;
            let written = c.written as u64 * gb;
            let written = if sampled_writes {
                scale(c.sample_written as u64 + c.sample_written_unwatched as u64).max(written)
            } else {
                written
            };
            (acc as f64 / secs, written as f64 / secs)
        }
        None => (0.0, 0.0),
    };

    let error = error_estimate(plan, s, &wss_sample, n, k, gb, interval);
    Summary {
        epoch: cur,
        tracked_ms,
        memory_bytes,
        windows,
        idle_ages,
        access_rate_bytes_per_s: access_rate,
        dirty_rate_bytes_per_s: dirty_rate,
        regions,
        error,
        touched_bytes: touched * gb,
    }
}

fn error_estimate(
    plan: &Plan,
    s: &VmShared,
    wss_sample: &[u64],
    n: usize,
    k: usize,
    gb: u64,
    interval_ms: u64,
) -> ErrorEstimate {
    let dirty = match plan.dirty {
        Dirty::WpAsync => "writes exact (WP_ASYNC + PAGEMAP_SCAN)",
        Dirty::WpSync => "writes exact (sync write-protect)",
        Dirty::Watched if matches!(plan.access, Access::ShmemExhaustive) => {
            "writes exact (seen on every page as it is re-armed)"
        }
        Dirty::Watched => "writes sampled on the same granules as reads",
        Dirty::SoftDirty if matches!(plan.access, Access::Rwp { .. }) => {
            "writes exact (soft-dirty bits, harvested with the accesses)"
        }
        Dirty::SoftDirty => {
            "writes by soft-dirty bits, exact but for a write in the moment between an \
             interval's scan and its reset, and a write after the read that brought a page in \
             the interval it arrived"
        }
        Dirty::None => "writes not tracked",
    };
    match plan.access {
        Access::ShmemSampled { .. } => {
            // Binomial proportion of the shortest window, with the finite
            // population correction for sampling without replacement.
            let p = wss_sample.first().map_or(0.0, |&c| c as f64 / k as f64);
            let fpc = if n > 1 {
                ((n - k) as f64 / (n - 1) as f64).max(0.0).sqrt()
            } else {
                0.0
            };
            let half = Z95 * (p * (1.0 - p) / k as f64).sqrt() * fpc;
            let stride = match s.stride() {
                1 => String::new(),
                k => format!(
                    "; hot granules re-armed every {k} intervals to stay within the fault \
                     budget, so their per-interval rates are estimated from the ones re-armed"
                ),
            };
            // Never report less than one granule of uncertainty in the sample.
            let floor = 1.0 / k as f64 * fpc;
            ErrorEstimate {
                relative_error: half.max(floor),
                confidence: 0.95,
                lower_bound: false,
                basis: format!(
                    "reads and writes sampled on {k} of {n} granules of {gb} B, {interval_ms} ms \
                     interval; 95% binomial interval; {dirty}{stride}"
                ),
            }
        }
        Access::Rwp { sync } => {
            let huge = s
                .counters
                .huge_accessed_bytes
                .load(std::sync::atomic::Ordering::Relaxed);
            let thp = if huge > 0 {
                "; part of the memory is mapped with transparent huge pages, which the kernel \
                 protects and reports per 2 MiB: there the working set and dirty bytes count \
                 whole huge pages (an upper bound)"
            } else {
                ""
            };
            let evict = if plan.evict_after > 0 {
                format!(
                    "; pages idle {} intervals evicted to custody ({} held now), each seen again \
                     by the fault that brings it back",
                    plan.evict_after,
                    s.counters
                        .pages_in_custody
                        .load(std::sync::atomic::Ordering::Relaxed)
                )
            } else {
                String::new()
            };
            ErrorEstimate {
                relative_error: 0.0,
                confidence: 1.0,
                lower_bound: false,
                basis: format!(
                    "every access, read or write, seen by read/write-protect mode ({}) at {gb} B \
                     granules, attributed to {interval_ms} ms intervals (the harvest freezes the \
                     guest's first accesses while it scans, so none falls between intervals); \
                     {dirty}{thp}{evict}",
                    if sync { "sync" } else { "async" }
                ),
            }
        }
        Access::ShmemExhaustive => ErrorEstimate {
            relative_error: 0.0,
            confidence: 1.0,
            lower_bound: false,
            basis: format!(
                "reads and writes seen on every granule of {gb} B, attributed to {interval_ms} ms \
                 intervals; {dirty}; custody {} pages",
                s.counters
                    .pages_in_custody
                    .load(std::sync::atomic::Ordering::Relaxed)
            ),
        },
        Access::None => {
            let huge = s
                .counters
                .huge_written_bytes
                .load(std::sync::atomic::Ordering::Relaxed);
            let thp = if huge > 0 {
                "; part of the memory is mapped with transparent huge pages, whose writes the \
                 kernel reports per 2 MiB"
            } else {
                ""
            };
            ErrorEstimate {
                relative_error: 0.0,
                confidence: 1.0,
                lower_bound: true,
                basis: format!(
                    "first touches and {dirty} at {gb} B granules; reads of pages already present \
                     are not visible on this backing, so the working set is a lower bound{thp}"
                ),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::{Access, Dirty, Plan};

    fn plan(access: Access) -> Plan {
        Plan {
            register_mode: 3,
            first_touch: true,
            dirty: Dirty::WpSync,
            access,
            evict_after: 0,
            notes: vec![],
        }
    }

    fn cfg() -> SummaryConfig {
        SummaryConfig {
            windows_ms: vec![1000, 3000],
            age_buckets_ms: vec![0, 1000, 3000],
            heat_slices: 4,
        }
    }

    #[test]
    fn windows_count_recent_epochs() {
        // 8 granules, 1 s interval.
        let s = VmShared::new(8, 4096, None, 0, 1000);
        // Epoch 1: granules 0..4 read, 0 written.
        for g in 0..4 {
            s.record(g, 1, g == 0);
        }
        s.advance_epoch(1);
        s.advance_epoch(2);
        s.advance_epoch(3);
        // Epoch 4: granule 5 read.
        s.record(5, 4, false);
        s.advance_epoch(4); // now epoch 5
        let sum = summarize(&s, &plan(Access::ShmemExhaustive), &cfg(), 5000);
        // 1 s window = epochs 4..=5: only granule 5.
        assert_eq!(sum.windows[0].wss_bytes, 4096);
        assert_eq!(sum.windows[0].dirty_bytes, 0);
        // 3 s window = epochs 2..=5: still only granule 5.
        assert_eq!(sum.windows[1].wss_bytes, 4096);
        assert!(sum.windows[1].complete);
        assert_eq!(sum.touched_bytes, 5 * 4096);
        // Ages: granule 5 is 1 epoch old (1000 ms: bucket [1000, 3000));
        // granules 0..4 are 4 epochs old (bucket [3000, inf)); 3 never touched
        // granules count as idle for the tracked time.
        assert_eq!(sum.idle_ages[0].bytes, 0);
        assert_eq!(sum.idle_ages[1].bytes, 4096);
        assert_eq!(sum.idle_ages[2].bytes, 7 * 4096);
        assert_eq!(sum.idle_ages.iter().map(|b| b.bytes).sum::<u64>(), 8 * 4096);
        // Rate over epoch 4: one granule per second.
        assert_eq!(sum.access_rate_bytes_per_s, 4096.0);
        assert_eq!(sum.regions.len(), 4);
        assert_eq!(sum.regions[2].accessed_bytes, 4096);
        assert_eq!(sum.error.confidence, 1.0);
    }

    #[test]
    fn sample_estimate_scales_to_memory() {
        // 100 granules, sample of 10 (every 10th); 5 sampled granules hot.
        let sample: Vec<u32> = (0..100).step_by(10).collect();
        let s = VmShared::new(100, 4096, Some(&sample), 0, 1000);
        for &g in &sample[..5] {
            s.record(g as usize, 1, false);
        }
        s.advance_epoch(1);
        let sum = summarize(
            &s,
            &plan(Access::ShmemSampled { granules: 10 }),
            &cfg(),
            2000,
        );
        assert_eq!(sum.windows[0].wss_bytes, 50 * 4096);
        assert!(sum.error.relative_error > 0.0 && sum.error.relative_error < 0.5);
        assert_eq!(sum.error.confidence, 0.95);
        assert!(!sum.error.lower_bound);
    }

    #[test]
    fn anonymous_is_a_lower_bound() {
        let s = VmShared::new(4, 4096, None, 0, 1000);
        let sum = summarize(&s, &plan(Access::None), &cfg(), 500);
        assert!(sum.error.lower_bound);
        assert!(!sum.windows[0].complete);
        assert_eq!(sum.windows[0].wss_bytes, 0);
    }
}
