//! wset's end-to-end test helpers: a harness that runs the real agent,
//! controller and guest (`wset-guest`, crate `guest/`) binaries and talks
//! gRPC to them, simulated agents, and the tidy checks over the tree.

pub mod harness;
pub mod simagent;
mod tidy;

/// Wall-clock milliseconds since the Unix epoch (the clock the controller
/// keeps history in).
pub use wset_controller::now_ms;
