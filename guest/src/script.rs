//! Access scripts with exact ground truth: phases of reads and writes over
//! page ranges, repeated every `period_ms` for `duration_ms`.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Op {
    Read,
    Write,
    /// The VMM drops the pages (`MADV_DONTNEED`), as for a balloon.
    Discard,
    /// The VMM unmaps the pages (the guest must not touch them again).
    Unmap,
}

/// Touch `pages` pages from `start` (guest page numbers), once per period.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Touch {
    pub op: Op,
    pub start: u32,
    pub pages: u32,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Phase {
    pub name: String,
    /// Empty: the guest is idle for the phase.
    #[serde(default)]
    pub touches: Vec<Touch>,
    pub duration_ms: u64,
    #[serde(default = "default_period")]
    pub period_ms: u64,
}

fn default_period() -> u64 {
    50
}

impl Touch {
    pub fn read(start: u32, pages: u32) -> Self {
        Self {
            op: Op::Read,
            start,
            pages,
        }
    }

    pub fn write(start: u32, pages: u32) -> Self {
        Self {
            op: Op::Write,
            start,
            pages,
        }
    }
}

impl Script {
    /// One phase, "steady", repeating `touches` every 100 ms for `duration_ms`.
    pub fn steady(touches: Vec<Touch>, duration_ms: u64) -> Self {
        Self {
            phases: vec![Phase {
                name: "steady".into(),
                touches,
                duration_ms,
                period_ms: 100,
            }],
            checksum_every: 0,
        }
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Script {
    pub phases: Vec<Phase>,
    /// Checksum all data pages every this many periods (integrity runs); 0 = never.
    #[serde(default)]
    pub checksum_every: u32,
}

impl Phase {
    /// Pages the phase accesses (reads or writes).
    pub fn accessed(&self) -> BTreeSet<u32> {
        self.touches
            .iter()
            .filter(|t| matches!(t.op, Op::Read | Op::Write))
            .flat_map(|t| t.start..t.start + t.pages)
            .collect()
    }

    /// Pages the phase writes.
    pub fn written(&self) -> BTreeSet<u32> {
        self.touches
            .iter()
            .filter(|t| t.op == Op::Write)
            .flat_map(|t| t.start..t.start + t.pages)
            .collect()
    }
}

impl Script {
    /// Every page any phase touches, and the highest page number + 1.
    pub fn extent(&self) -> u32 {
        self.phases
            .iter()
            .flat_map(|p| p.touches.iter())
            .map(|t| t.start + t.pages)
            .max()
            .unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn truth_of_a_phase() {
        let p = Phase {
            name: "a".into(),
            touches: vec![
                Touch {
                    op: Op::Read,
                    start: 16,
                    pages: 4,
                },
                Touch {
                    op: Op::Write,
                    start: 18,
                    pages: 4,
                },
            ],
            duration_ms: 1,
            period_ms: 1,
        };
        assert_eq!(p.accessed().len(), 6);
        assert_eq!(p.written(), (18..22).collect());
        let s = Script {
            phases: vec![p],
            checksum_every: 0,
        };
        assert_eq!(s.extent(), 22);
        let json = serde_json::to_string(&s).unwrap();
        assert_eq!(serde_json::from_str::<Script>(&json).unwrap(), s);
    }
}
