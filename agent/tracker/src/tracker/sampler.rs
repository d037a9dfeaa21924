//! Which granules the shmem access methods watch, and re-arming them at
//! each tick: a deterministic random sample (or every granule), with a
//! fault budget that re-arms granules already known hot in turn, and the
//! estimate of what the unwatched hot granules did meanwhile.

use std::io;
use std::sync::atomic::Ordering::Relaxed;

use super::Tracker;
use super::custody_pages::Evict;
use crate::shared::{NEVER, VmShared};

#[derive(Debug)]
pub(super) struct Sampler {
    /// Granules the access method watches.
    sample: Box<[u32]>,
    /// Sampled tracking, per granule: `epoch << 1 | skipped` of the last
    /// tick that re-armed (skipped = 0) or deliberately left unarmed
    /// (skipped = 1) a hot granule. Empty otherwise.
    armed_tick: Box<[u32]>,
    strata: Strata,
    fault_budget: u32,
    max_stride: u32,
    interval_ms: u64,
}

impl Sampler {
    pub(super) fn new(
        sample: Vec<u32>,
        sampled_granules: usize,
        fault_budget: u32,
        max_stride: u32,
        interval_ms: u64,
    ) -> Self {
        Self {
            sample: sample.into_boxed_slice(),
            armed_tick: vec![0; sampled_granules].into_boxed_slice(),
            strata: Strata::default(),
            fault_budget,
            max_stride: max_stride.max(1),
            interval_ms,
        }
    }

    /// A fault on granule `g` in epoch `e`: count it in the stratum the
    /// granule was armed in this epoch (before the access is recorded).
    #[inline]
    pub(super) fn note(&mut self, shared: &VmShared, g: usize, e: u32, write: bool) {
        if let Some(&m) = self.armed_tick.get(g)
            && m >> 1 == e
        {
            let first_access = (shared.access_epoch(g) != e) as u32;
            let first_write = (write && shared.write_epoch(g) != e) as u32;
            let st = &mut self.strata;
            if m & 1 == 0 {
                st.rearmed_accessed += first_access;
                st.rearmed_written += first_write;
            } else {
                st.skipped_accessed += first_access;
                st.skipped_written += first_write;
            }
        }
    }

    /// The unwatched hot granules' estimated first accesses and writes in
    /// the epoch closing now.
    pub(super) fn unseen(&self) -> (u32, u32) {
        self.strata.unseen()
    }
}

/// Hot sampled granules in the epoch in progress: those re-armed at its
/// start and those left unwatched, with the first accesses and writes seen
/// in each. The re-armed ones stand for the unwatched ones in the rates.
#[derive(Debug, Default)]
struct Strata {
    rearmed: u32,
    skipped: u32,
    rearmed_accessed: u32,
    rearmed_written: u32,
    skipped_accessed: u32,
    skipped_written: u32,
}

impl Strata {
    /// Estimated first accesses and writes of the skipped granules that
    /// were not seen: the re-armed granules' proportions applied to them,
    /// less what was seen anyway (writes to pages still write-protected).
    fn unseen(&self) -> (u32, u32) {
        if self.skipped == 0 {
            return (0, 0);
        }
        // Without a re-armed granule to go by, hot granules are taken to
        // have stayed hot (and their writes to be those seen).
        let (pa, pw) = if self.rearmed == 0 {
            (1.0, 0.0)
        } else {
            (
                self.rearmed_accessed as f64 / self.rearmed as f64,
                self.rearmed_written as f64 / self.rearmed as f64,
            )
        };
        let est = |p: f64| (self.skipped as f64 * p).round() as u32;
        (
            est(pa).saturating_sub(self.skipped_accessed),
            est(pw).saturating_sub(self.skipped_written),
        )
    }
}

/// How many intervals apart hot sampled granules are re-armed so that `hot`
/// of them fault at most `budget` times per second over `interval_ms`.
pub fn rearm_stride(hot: u32, budget: u32, interval_ms: u64, max_stride: u32) -> u32 {
    if budget == 0 || hot == 0 {
        return 1;
    }
    let per_interval = (budget as u64 * interval_ms / 1000).max(1);
    (hot as u64)
        .div_ceil(per_interval)
        .clamp(1, max_stride.max(1) as u64) as u32
}

/// A deterministic random sample of `k` distinct granules out of `n`
/// (Floyd's algorithm), sorted.
pub fn draw_sample(n: u32, k: u32, seed: u64) -> Vec<u32> {
    let k = k.min(n);
    let mut rng = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut next = || {
        // xorshift64*
        rng ^= rng >> 12;
        rng ^= rng << 25;
        rng ^= rng >> 27;
        rng.wrapping_mul(0x2545_F491_4F6C_DD1D)
    };
    let mut chosen = std::collections::HashSet::with_capacity(k as usize);
    for j in (n - k)..n {
        let t = (next() % (j as u64 + 1)) as u32;
        if !chosen.insert(t) {
            chosen.insert(j);
        }
    }
    let mut v: Vec<u32> = chosen.into_iter().collect();
    v.sort_unstable();
    v
}

impl Tracker {
    /// Arm the watched granules accessed since they were last armed, at the
    /// tick closing epoch `e`. Under a fault budget, granules already known
    /// hot are re-armed in turn, a `stride`-th of them each interval (each
    /// at least every `max_stride` intervals); granules never accessed are
    /// always armed, so a new access is seen in the interval it happens.
    pub(super) fn rearm_access(&mut self, e: u32) -> io::Result<()> {
        let sampled = !self.sampler.armed_tick.is_empty();
        let stride = if sampled {
            let hot = self
                .sampler
                .sample
                .iter()
                .filter(|&&g| {
                    let g = g as usize;
                    self.pages.unarmed(g)
                        && !self.removed[g]
                        && self.shared.access_epoch(g) != NEVER
                })
                .count() as u32;
            let s = &self.sampler;
            rearm_stride(hot, s.fault_budget, s.interval_ms, s.max_stride)
        } else {
            1
        };
        self.shared.set_stride(stride);
        self.sampler.strata = Strata::default();
        let next = (e + 1) << 1;
        for i in 0..self.sampler.sample.len() {
            let g = self.sampler.sample[i] as usize;
            if !self.pages.unarmed(g) || self.removed[g] {
                continue;
            }
            let a = self.shared.access_epoch(g);
            let hot = sampled && a != NEVER;
            if hot
                && stride > 1
                && !(i as u32).wrapping_add(e).is_multiple_of(stride)
                && e + 1 - a < stride
            {
                self.sampler.armed_tick[g] = next | 1;
                self.sampler.strata.skipped += 1;
                continue;
            }
            match self.evict(g)? {
                Evict::Full => {
                    self.shared.counters.custody_full.fetch_add(1, Relaxed);
                    break;
                }
                Evict::Saved => {
                    self.shared.counters.sampled_pages.fetch_add(1, Relaxed);
                }
                Evict::Hole | Evict::Kept => {}
            }
            if hot {
                self.sampler.armed_tick[g] = next;
                self.sampler.strata.rearmed += 1;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stride_keeps_hot_faults_within_the_budget() {
        // No budget, or nothing hot: every interval.
        assert_eq!(rearm_stride(1000, 0, 2000, 4), 1);
        assert_eq!(rearm_stride(0, 32, 2000, 4), 1);
        // 64 faults fit a 2 s interval at 32/s.
        assert_eq!(rearm_stride(64, 32, 2000, 4), 1);
        assert_eq!(rearm_stride(65, 32, 2000, 4), 2);
        assert_eq!(rearm_stride(192, 32, 2000, 4), 3);
        // Never beyond the cap, whatever the hot set.
        assert_eq!(rearm_stride(100_000, 32, 2000, 4), 4);
        // A budget below one fault per interval still allows one.
        assert_eq!(rearm_stride(3, 1, 100, 8), 3);
    }

    #[test]
    fn unwatched_granules_are_estimated_from_the_rearmed() {
        let none = Strata::default();
        assert_eq!(none.unseen(), (0, 0));
        // Half the re-armed ones were read, a quarter written: 300 skipped
        // -> 150 read and 75 written, less the 10 and 5 seen anyway.
        let s = Strata {
            rearmed: 100,
            skipped: 300,
            rearmed_accessed: 50,
            rearmed_written: 25,
            skipped_accessed: 10,
            skipped_written: 5,
        };
        assert_eq!(s.unseen(), (140, 70));
        // Nothing re-armed: the skipped ones are taken as still hot.
        let s = Strata {
            skipped: 40,
            skipped_written: 3,
            ..Strata::default()
        };
        assert_eq!(s.unseen(), (40, 0));
    }

    #[test]
    fn sample_is_distinct_sorted_and_deterministic() {
        let s = draw_sample(1000, 100, 42);
        assert_eq!(s.len(), 100);
        assert!(s.windows(2).all(|w| w[0] < w[1]));
        assert!(s.iter().all(|&g| g < 1000));
        assert_eq!(s, draw_sample(1000, 100, 42));
        assert_ne!(s, draw_sample(1000, 100, 43));
        assert_eq!(draw_sample(10, 50, 1), (0..10).collect::<Vec<_>>());
    }
}
