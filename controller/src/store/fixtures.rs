//! What the store's tests share: a small set of levels, a VM point, a
//! scratch directory and reopening a store after its last handle dropped.

use std::path::Path;

use wset_proto::v1 as pb;

use super::{Store, StoreError};
use crate::history::Level;

pub(super) fn levels() -> Vec<Level> {
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

pub(super) fn point(t: u64, wss: u64) -> pb::VmHistoryPoint {
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

pub(super) fn tmp(tag: &str) -> std::path::PathBuf {
    let p = std::env::temp_dir().join(format!("wset-store-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&p);
    p
}

/// Open the store again after its last handle was dropped. sled's
/// background threads may hold the directory's lock a moment longer,
/// so an IO error is retried for a few seconds; anything else fails.
pub(super) fn reopen(dir: &Path, levels: Vec<Level>) -> Store {
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
