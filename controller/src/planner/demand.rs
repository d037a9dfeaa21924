//! The demand side of planning: the normal distribution's CDF and
//! quantile, a VM's predicted demand from its samples (phase changes,
//! spread, trend), its reclaimable cold bytes and the pre-copy cost of
//! moving it.

use super::{Config, Demand, VmInput};

/// Standard normal CDF (Abramowitz and Stegun 7.1.26 for erf: |error| <
/// 1.5e-7).
pub fn normal_cdf(x: f64) -> f64 {
    let z = x / std::f64::consts::SQRT_2;
    let t = 1.0 / (1.0 + 0.327_591_1 * z.abs());
    let poly = t
        * (0.254_829_592
            + t * (-0.284_496_736
                + t * (1.421_413_741 + t * (-1.453_152_027 + t * 1.061_405_429))));
    let erf = 1.0 - poly * (-z * z).exp();
    0.5 * (1.0 + if z >= 0.0 { erf } else { -erf })
}

/// Standard normal quantile (Acklam's rational approximation, relative
/// error < 1.2e-9), for p in (0, 1).
pub fn normal_quantile(p: f64) -> f64 {
    let p = p.clamp(1e-12, 1.0 - 1e-12);
    const A: [f64; 6] = [
        -3.969_683_028_665_376e1,
        2.209_460_984_245_205e2,
        -2.759_285_104_469_687e2,
        1.383_577_518_672_69e2,
        -3.066_479_806_614_716e1,
        2.506_628_277_459_239,
    ];
    const B: [f64; 5] = [
        -5.447_609_879_822_406e1,
        1.615_858_368_580_409e2,
        -1.556_989_798_598_866e2,
        6.680_131_188_771_972e1,
        -1.328_068_155_288_572e1,
    ];
    const C: [f64; 6] = [
        -7.784_894_002_430_293e-3,
        -3.223_964_580_411_365e-1,
        -2.400_758_277_161_838,
        -2.549_732_539_343_734,
        4.374_664_141_464_968,
        2.938_163_982_698_783,
    ];
    const D: [f64; 4] = [
        7.784_695_709_041_462e-3,
        3.224_671_290_700_398e-1,
        2.445_134_137_142_996,
        3.754_408_661_907_416,
    ];
    let tail = |q: f64| {
        (((((C[0] * q + C[1]) * q + C[2]) * q + C[3]) * q + C[4]) * q + C[5])
            / ((((D[0] * q + D[1]) * q + D[2]) * q + D[3]) * q + 1.0)
    };
    if p < 0.02425 {
        tail((-2.0 * p.ln()).sqrt())
    } else if p > 1.0 - 0.02425 {
        -tail((-2.0 * (1.0 - p).ln()).sqrt())
    } else {
        let q = p - 0.5;
        let r = q * q;
        (((((A[0] * r + A[1]) * r + A[2]) * r + A[3]) * r + A[4]) * r + A[5]) * q
            / (((((B[0] * r + B[1]) * r + B[2]) * r + B[3]) * r + B[4]) * r + 1.0)
    }
}

fn mean_std(xs: &[f64]) -> (f64, f64) {
    if xs.is_empty() {
        return (0.0, 0.0);
    }
    let n = xs.len() as f64;
    let m = xs.iter().sum::<f64>() / n;
    let v = xs.iter().map(|x| (x - m) * (x - m)).sum::<f64>() / n;
    (m, v.sqrt())
}

/// Least-squares slope of `(t_ms, y)`, per ms.
fn slope(ts: &[f64], ys: &[f64]) -> f64 {
    let (mt, _) = mean_std(ts);
    let (my, _) = mean_std(ys);
    let num: f64 = ts.iter().zip(ys).map(|(t, y)| (t - mt) * (y - my)).sum();
    let den: f64 = ts.iter().map(|t| (t - mt) * (t - mt)).sum();
    if den > 0.0 { num / den } else { 0.0 }
}

/// The most recent phase change: the split of the samples that best
/// separates two levels (the largest between-segment sum of squares), kept
/// when the levels differ by more than three pooled standard deviations and
/// 5% of memory, with at least three samples on each side; then the same
/// within the later segment, so the latest of several changes wins.
/// Returns the index where the current phase begins.
fn phase_change(ys: &[f64], memory: f64) -> Option<usize> {
    // Prefix sums of y and y², so each split is O(1).
    let mut sum = Vec::with_capacity(ys.len() + 1);
    let mut sq = Vec::with_capacity(ys.len() + 1);
    sum.push(0.0);
    sq.push(0.0);
    for y in ys {
        sum.push(sum.last().unwrap() + y);
        sq.push(sq.last().unwrap() + y * y);
    }
    // Mean and sum of squared deviations of ys[a..b].
    let seg = |a: usize, b: usize| {
        let n = (b - a) as f64;
        let m = (sum[b] - sum[a]) / n;
        (m, ((sq[b] - sq[a]) - n * m * m).max(0.0))
    };
    let mut start = 0;
    let mut found = None;
    loop {
        let n = ys.len() - start;
        if n < 6 {
            return found;
        }
        let best = (start + 3..=ys.len() - 3)
            .map(|s| {
                let (m1, _) = seg(start, s);
                let (m2, _) = seg(s, ys.len());
                (
                    s,
                    ((s - start) * (ys.len() - s)) as f64 * (m2 - m1) * (m2 - m1),
                )
            })
            .max_by(|a, b| a.1.total_cmp(&b.1))
            .map(|(s, _)| s)?;
        let (m1, ss1) = seg(start, best);
        let (m2, ss2) = seg(best, ys.len());
        let pooled = ((ss1 + ss2) / n as f64).sqrt();
        if (m2 - m1).abs() <= (3.0 * pooled).max(0.05 * memory) {
            return found;
        }
        start = best;
        found = Some(start);
    }
}

/// A VM's demand over the horizon.
pub fn demand(vm: &VmInput, cfg: &Config, now_ms: u64) -> Demand {
    let mem = vm.memory_bytes as f64;
    let since = now_ms.saturating_sub(cfg.lookback_ms);
    let first = vm.samples.partition_point(|s| s.t_ms < since);
    let recent = &vm.samples[first..];
    if recent.is_empty() {
        return Demand {
            mean_bytes: mem,
            std_bytes: 0.0,
            trend_bytes_per_h: 0.0,
            phase_change_at_ms: None,
            samples_used: 0,
            span_ms: 0,
            p50_bytes: vm.memory_bytes,
            p95_bytes: vm.memory_bytes,
            max_bytes: vm.memory_bytes,
            dirty_bytes_per_s: 0.0,
            error_floor_bytes: 0.0,
            lower_bound: vm.lower_bound,
        };
    }
    let ys: Vec<f64> = recent.iter().map(|s| s.wss_bytes as f64).collect();
    let change = phase_change(&ys, mem);
    let from = change.unwrap_or(0);
    let used = &recent[from..];
    let ys = &ys[from..];
    let ts: Vec<f64> = used.iter().map(|s| s.t_ms as f64).collect();
    let (m, sd) = mean_std(ys);
    let per_ms = slope(&ts, ys);
    // Growth is projected over the horizon; shrinking is not (the memory
    // may be wanted back at any time).
    let last = ys[ys.len() - 1];
    let projected = if per_ms > 0.0 {
        last.max(m) + per_ms * cfg.horizon_ms as f64
    } else {
        m.max(last)
    };
    let floor = vm.relative_error * mem;
    // Percentiles by selection, not a full sort (this runs for every VM).
    let mut xs: Vec<u64> = used.iter().map(|s| s.wss_bytes).collect();
    let rank = |p: f64| ((xs.len() - 1) as f64 * p).round() as usize;
    let (k50, k95) = (rank(0.5), rank(0.95));
    let (_, &mut p95, above) = xs.select_nth_unstable(k95);
    let max = above.iter().copied().max().unwrap_or(p95).max(p95);
    let p50 = *xs[..=k95].select_nth_unstable(k50).1;
    Demand {
        mean_bytes: projected.min(mem),
        std_bytes: sd.max(floor).min(mem),
        trend_bytes_per_h: per_ms * 3.6e6,
        phase_change_at_ms: change.map(|i| recent[i].t_ms),
        samples_used: used.len(),
        span_ms: used[used.len() - 1].t_ms - used[0].t_ms,
        p50_bytes: p50,
        p95_bytes: p95,
        max_bytes: max,
        dirty_bytes_per_s: used.iter().map(|s| s.dirty_bytes_per_s).sum::<f64>()
            / used.len() as f64,
        error_floor_bytes: floor,
        lower_bound: vm.lower_bound,
    }
}

/// Bytes idle at least `cold_age_ms` in a histogram (a bucket counts when
/// its lower bound is at least that old).
pub(super) fn reclaimable(vm: &VmInput, cfg: &Config) -> u64 {
    vm.idle_ages
        .iter()
        .filter(|(min, _, _)| *min >= cfg.cold_age_ms)
        .map(|(_, _, b)| b)
        .sum()
}

/// Pre-copy cost of moving a VM: bytes sent (memory, then each round the
/// pages dirtied during the previous one: a geometric series in
/// dirty/link) and seconds; `None` when it would not converge.
pub fn copy_cost(memory_bytes: u64, dirty_bytes_per_s: f64, cfg: &Config) -> Option<(f64, f64)> {
    let ratio = dirty_bytes_per_s / cfg.link_bytes_per_s;
    if !(ratio.is_finite() && ratio >= 0.0) || ratio > cfg.max_dirty_share {
        return None;
    }
    let bytes = memory_bytes as f64 / (1.0 - ratio);
    Some((bytes, bytes / cfg.link_bytes_per_s))
}
