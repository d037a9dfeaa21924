//! The planner's recent samples, in memory: for every VM, its raw samples
//! over the planner's lookback, as the planner reads them (time, shortest
//! window's working set, dirty rate). The writer adds every raw point it
//! stores (received or repaired); at start-up they are read back from the
//! store once. A plan then reads memory, not sled: re-reading an hour of
//! every VM's samples from the store for each plan was most of the
//! controller's CPU at scale (BENCHMARKS.md, the load run).
//!
//! Bounded: a VM keeps the samples of the lookback and at most
//! [`Recent::cap`] of them; 16 bytes a sample (an hour at 10 s is 5.6 KiB
//! a VM). A VM the ring does not hold (its history unreadable at start-up)
//! is read from the store as before.

use std::collections::{HashMap, VecDeque};
use std::sync::RwLock;

use wset_proto::ids::VmId;
use wset_proto::v1 as pb;

use crate::history::PlanPoint;
use crate::planner::Sample;
use crate::store::{Store, StoreError};

/// One sample as kept: 16 bytes.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Kept {
    t_ms: u64,
    /// Working set in 4 KiB pages (working sets are whole pages).
    wss_pages: u32,
    dirty_bytes_per_s: f32,
}

impl Kept {
    fn sample(self) -> Sample {
        Sample {
            t_ms: self.t_ms,
            wss_bytes: u64::from(self.wss_pages) * 4096,
            dirty_bytes_per_s: f64::from(self.dirty_bytes_per_s),
        }
    }
}

/// The planner's view of a raw point: its shortest window's working set.
pub fn sample_of(timestamp_ms: u64, windows: &[pb::WindowStat], dirty: f64) -> Sample {
    Sample {
        t_ms: timestamp_ms,
        wss_bytes: windows
            .iter()
            .min_by_key(|w| w.window_ms)
            .map_or(0, |w| w.wss_bytes),
        dirty_bytes_per_s: dirty,
    }
}

impl From<&PlanPoint> for Sample {
    fn from(p: &PlanPoint) -> Self {
        sample_of(p.timestamp_ms, &p.windows, p.dirty_rate_bytes_per_s)
    }
}

impl From<&pb::VmHistoryPoint> for Sample {
    fn from(p: &pb::VmHistoryPoint) -> Self {
        sample_of(p.timestamp_ms, &p.windows, p.dirty_rate_bytes_per_s)
    }
}

/// Every VM's recent samples.
#[derive(Debug)]
pub struct Recent {
    vms: RwLock<HashMap<VmId, VecDeque<Kept>>>,
    /// How far back a VM's samples are kept, behind its newest.
    keep_ms: u64,
    /// Most samples a VM keeps.
    cap: usize,
}

impl Recent {
    /// Keep `keep_ms` of samples (the planner's lookback), sampled every
    /// `interval_ms`: room for twice that many, and some.
    pub fn new(keep_ms: u64, interval_ms: u64) -> Self {
        let expected = (keep_ms / interval_ms.max(1)) as usize;
        Self {
            vms: RwLock::new(HashMap::new()),
            keep_ms,
            cap: expected.saturating_mul(2).saturating_add(64),
        }
    }

    pub fn cap(&self) -> usize {
        self.cap
    }

    /// Add one sample of `vm` (in time order or not: a repaired sample may
    /// be older than the newest).
    pub fn push(&self, vm: &str, s: Sample) {
        let kept = Kept {
            t_ms: s.t_ms,
            wss_pages: u32::try_from(s.wss_bytes.div_ceil(4096)).unwrap_or(u32::MAX),
            dirty_bytes_per_s: s.dirty_bytes_per_s as f32,
        };
        let mut vms = self.vms.write().unwrap_or_else(|p| p.into_inner());
        if !vms.contains_key(vm) {
            let Ok(id) = vm.parse::<VmId>() else {
                return;
            };
            vms.insert(id, VecDeque::new());
        }
        let Some(ring) = vms.get_mut(vm) else {
            return;
        };
        // Most samples are the newest: a scan from the back is short.
        let at = ring
            .iter()
            .rposition(|k| k.t_ms <= kept.t_ms)
            .map_or(0, |i| i + 1);
        if at > 0 && ring[at - 1].t_ms == kept.t_ms {
            ring[at - 1] = kept;
        } else {
            ring.insert(at, kept);
        }
        let newest = ring.back().map_or(0, |k| k.t_ms);
        while ring.front().is_some_and(|k| k.t_ms + self.keep_ms < newest) || ring.len() > self.cap
        {
            ring.pop_front();
        }
    }

    /// `vm`'s samples in `[from_ms, to_ms)`, or `None` when this ring does
    /// not hold the VM (read the store instead).
    pub fn samples(&self, vm: &VmId, from_ms: u64, to_ms: u64) -> Option<Vec<Sample>> {
        let vms = self.vms.read().unwrap_or_else(|p| p.into_inner());
        let ring = vms.get(vm)?;
        Some(
            ring.iter()
                .filter(|k| k.t_ms >= from_ms && k.t_ms < to_ms)
                .map(|k| k.sample())
                .collect(),
        )
    }

    /// Hold `vm` with these samples (read from the store at start-up).
    pub fn load(&self, vm: &VmId, samples: impl IntoIterator<Item = Sample>) {
        {
            let mut vms = self.vms.write().unwrap_or_else(|p| p.into_inner());
            vms.entry(vm.clone()).or_default();
        }
        for s in samples {
            self.push(vm.as_str(), s);
        }
    }

    /// Read `vms`' raw samples in `[from_ms, to_ms)` from the store (at
    /// start-up); a VM whose history cannot be read is left out, and read
    /// from the store at each plan, as before. Returns those errors.
    pub fn load_from(
        &self,
        store: &Store,
        vms: &[VmId],
        from_ms: u64,
        to_ms: u64,
    ) -> Vec<(VmId, StoreError)> {
        let mut failed = Vec::new();
        for vm in vms {
            match store.vm_plan_points(vm.as_str(), from_ms, to_ms) {
                Ok(points) => self.load(vm, points.iter().map(Sample::from)),
                Err(e) => failed.push((vm.clone(), e)),
            }
        }
        failed
    }

    /// Drop a VM the index forgot.
    pub fn forget(&self, vm: &VmId) {
        self.vms
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(vm);
    }

    /// VMs held, samples held.
    pub fn size(&self) -> (usize, usize) {
        let vms = self.vms.read().unwrap_or_else(|p| p.into_inner());
        (vms.len(), vms.values().map(VecDeque::len).sum())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(t: u64, wss: u64) -> Sample {
        Sample {
            t_ms: t,
            wss_bytes: wss,
            dirty_bytes_per_s: 1.5,
        }
    }

    #[test]
    fn keeps_the_lookback_in_order_and_bounded() {
        let r = Recent::new(10_000, 1000);
        let vm: VmId = "vm".parse().unwrap();
        assert!(
            r.samples(&vm, 0, u64::MAX).is_none(),
            "not held: read the store"
        );
        for t in (0..30).map(|i| i * 1000) {
            r.push("vm", s(t, 8192));
        }
        let got = r.samples(&vm, 0, u64::MAX).unwrap();
        // The newest at 29 s; kept from 19 s.
        assert_eq!(got.first().unwrap().t_ms, 19_000);
        assert_eq!(got.len(), 11);
        // An older sample (repaired) goes in its place; a repeat replaces.
        r.push("vm", s(19_500, 4096));
        r.push("vm", s(20_000, 12_288));
        let got = r.samples(&vm, 19_000, 21_000).unwrap();
        assert_eq!(
            got.iter()
                .map(|x| (x.t_ms, x.wss_bytes))
                .collect::<Vec<_>>(),
            [(19_000, 8192), (19_500, 4096), (20_000, 12_288)]
        );
        assert_eq!(got[0].dirty_bytes_per_s, 1.5);
        // Never more than the cap, whatever the timestamps.
        let tight = Recent::new(u64::MAX / 2, u64::MAX);
        for t in 0..1000 {
            tight.push("vm", s(t, 4096));
        }
        assert_eq!(tight.size(), (1, tight.cap()));
        r.forget(&vm);
        assert_eq!(r.size(), (0, 0));
    }
}
