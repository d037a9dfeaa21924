//! wset test guests and end-to-end test helpers: guest memory with known
//! contents, a real KVM guest program, access scripts with exact ground
//! truth, the VMM side of both handshakes, and a harness that runs the real
//! agent and controller binaries.
//!
//! The test VMMs map memory and create KVM memory slots, so this crate has
//! `unsafe` blocks of its own, each with its `// SAFETY:` reason.

pub mod harness;
pub mod kvm;
pub mod memory;
pub mod script;
pub mod simagent;
mod tidy;
pub mod vmm;

/// Wall-clock milliseconds since the Unix epoch (the clock the controller
/// keeps history in).
pub use wset_controller::now_ms;
