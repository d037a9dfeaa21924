//! Synthetic working-set traces for tests, benchmarks and the comparison of
//! overcommit policies: steady, growing, phase-changing, idle and bursty
//! VMs with noisy dirty rates, deterministic for a seed. Pure.

use crate::planner::Sample;

/// The shapes a VM's working set takes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Shape {
    /// A level with a little noise.
    Steady,
    /// Linear growth over the trace.
    Growing,
    /// Jumps between two levels at random moments.
    Phased,
    /// A few percent of memory.
    Idle,
    /// A low level with short spikes.
    Bursty,
}

/// A small, fast, deterministic generator (xorshift64*).
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    /// Uniform in [0, 1).
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
    /// Uniform in [a, b).
    pub fn range(&mut self, a: f64, b: f64) -> f64 {
        a + (b - a) * self.unit()
    }
}

/// The mix of shapes in a simulated fleet: 40% steady, 20% growing, 20%
/// phased, 15% idle, 5% bursty.
pub fn pick_shape(rng: &mut Rng) -> Shape {
    match rng.unit() {
        x if x < 0.40 => Shape::Steady,
        x if x < 0.60 => Shape::Growing,
        x if x < 0.80 => Shape::Phased,
        x if x < 0.95 => Shape::Idle,
        _ => Shape::Bursty,
    }
}

/// `steps` samples, one every `step_ms` from `start_ms`, of a VM of
/// `memory_bytes` with the given shape.
pub fn trace(
    rng: &mut Rng,
    shape: Shape,
    memory_bytes: u64,
    start_ms: u64,
    step_ms: u64,
    steps: usize,
) -> Vec<Sample> {
    let mem = memory_bytes as f64;
    let lo = rng.range(0.1, 0.4);
    let hi = (lo + rng.range(0.2, 0.5)).min(0.95);
    let switch_p = rng.range(0.002, 0.02);
    let mut high = rng.unit() < 0.5;
    let dirty_base = rng.range(0.0, 0.02) * mem;
    (0..steps)
        .map(|i| {
            let f = i as f64 / steps.max(1) as f64;
            let level = match shape {
                Shape::Steady => lo,
                Shape::Growing => lo + (hi - lo) * f,
                Shape::Phased => {
                    if rng.unit() < switch_p {
                        high = !high;
                    }
                    if high { hi } else { lo }
                }
                Shape::Idle => 0.02,
                Shape::Bursty => {
                    if rng.unit() < 0.03 {
                        hi
                    } else {
                        lo * 0.5
                    }
                }
            };
            let noisy = (level * (1.0 + rng.range(-0.05, 0.05))).clamp(0.0, 1.0);
            Sample {
                t_ms: start_ms + i as u64 * step_ms,
                wss_bytes: (noisy * mem) as u64,
                // Noisy and heavy-tailed: mostly small, sometimes large.
                dirty_bytes_per_s: dirty_base * (-rng.unit().max(1e-9).ln()),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traces_are_deterministic_and_shaped() {
        let gib = 1u64 << 30;
        let a = trace(&mut Rng::new(7), Shape::Growing, 8 * gib, 0, 60_000, 120);
        let b = trace(&mut Rng::new(7), Shape::Growing, 8 * gib, 0, 60_000, 120);
        assert_eq!(a, b);
        assert!(a[119].wss_bytes > a[0].wss_bytes);
        assert!(a.iter().all(|s| s.wss_bytes <= 8 * gib));
        let idle = trace(&mut Rng::new(1), Shape::Idle, 8 * gib, 0, 60_000, 60);
        assert!(idle.iter().all(|s| s.wss_bytes < gib / 4));
        let mut r = Rng::new(3);
        let shapes: Vec<Shape> = (0..1000).map(|_| pick_shape(&mut r)).collect();
        let steady = shapes.iter().filter(|s| **s == Shape::Steady).count();
        assert!((350..450).contains(&steady), "{steady}");
    }
}
