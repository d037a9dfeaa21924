//! wset's test and demo guests: guest memory with known contents
//! (`memory`), a real KVM guest program (`kvm`), access scripts with exact
//! ground truth (`script`), and the VMM side of both handshakes (`vmm`).
//! The `wset-guest` binary puts them together; the end-to-end tests and
//! the demo run it.
//!
//! The guests map memory and create KVM memory slots, so this crate has
//! `unsafe` blocks of its own, each with its `// SAFETY:` reason.

pub mod kvm;
pub mod memory;
pub mod script;
pub mod vmm;
