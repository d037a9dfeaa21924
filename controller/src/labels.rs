//! Labels with a meaning to the controller, and how they are read: the
//! keys operators set on VMs (at registration, through the agent) and on
//! hosts (`--host-label` on the agent), and the limit on how many one
//! summary or request may carry. Pure: no IO.

use std::collections::{BTreeMap, HashMap};
use std::hash::BuildHasher;

/// VM label: VMs with the same value never share a host.
pub const ANTI_AFFINITY: &str = "wset.io/anti-affinity";
/// VM label: `"true"`: the VM is never moved.
pub const PINNED: &str = "wset.io/pinned";
/// Host label: `"true"`: the host is in maintenance; its VMs are moved
/// off first and it takes none.
pub const MAINTENANCE: &str = "wset.io/maintenance";

/// The most labels an agent's summary or a placement request may carry.
pub const MAX_LABELS: usize = 64;

/// A set of labels, whichever map holds it (the wire's `HashMap`, the
/// planner's `BTreeMap`).
pub trait Labels {
    fn label(&self, key: &str) -> Option<&str>;
}

impl<S: BuildHasher> Labels for HashMap<String, String, S> {
    fn label(&self, key: &str) -> Option<&str> {
        self.get(key).map(String::as_str)
    }
}

impl Labels for BTreeMap<String, String> {
    fn label(&self, key: &str) -> Option<&str> {
        self.get(key).map(String::as_str)
    }
}

/// Whether the VM is pinned (never moved).
pub fn pinned(labels: &impl Labels) -> bool {
    labels.label(PINNED) == Some("true")
}

/// Whether the host is in maintenance.
pub fn in_maintenance(labels: &impl Labels) -> bool {
    labels.label(MAINTENANCE) == Some("true")
}

/// The VM's anti-affinity group, if it has one (an empty value is none).
pub fn anti_affinity_group(labels: &impl Labels) -> Option<&str> {
    labels.label(ANTI_AFFINITY).filter(|g| !g.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn meanings() {
        let vm = BTreeMap::from([
            (PINNED.to_owned(), "true".to_owned()),
            (ANTI_AFFINITY.to_owned(), String::new()),
        ]);
        assert!(pinned(&vm));
        assert_eq!(anti_affinity_group(&vm), None);
        let host: HashMap<String, String> = [(MAINTENANCE.to_owned(), "yes".to_owned())].into();
        assert!(!in_maintenance(&host));
        assert!(!pinned(&host));
    }
}
