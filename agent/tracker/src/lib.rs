//! wset's hot path: userfaultfd bindings, the per-uffd tracker thread, the
//! lock-free state it publishes, and the working-set summaries computed from
//! that state.
//!
//! This crate has no async runtime (a test checks that no tokio is reachable
//! from it). Its `unsafe` code lives in the kernel bindings (`uffd`,
//! `fdpass`, `custody`'s mapping) and `sys`; every other module forbids it.

pub mod custody;
pub mod fdpass;
pub mod plan;
pub mod recover;
pub mod shared;
pub mod summary;
pub mod sys;
pub mod tracker;
pub mod uffd;

pub use plan::{Access, AccessMode, BackingKind, Dirty, Method, Plan, PlanInput, RwpMode};
pub use shared::{TrackerState, VmShared};
pub use tracker::{Region, StopReport, TrackerError, TrackerHandle, TrackerSpec};
pub use uffd::Uffd;
