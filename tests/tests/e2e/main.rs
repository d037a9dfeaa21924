//! The end-to-end tests, one binary with a module per area: each starts the
//! real binaries (agent, controller, guests) and talks to them over real
//! sockets. `scenarios` (also run in the RWP kernel lane), `rwp` (the lane
//! only) and `load` (a long measurement) are binaries of their own.

mod bad_input;
mod config;
mod controller;
mod crash;
mod decisions;
mod discovery;
mod disk_full;
mod extender;
mod firecracker;
mod grpcurl;
mod integrity;
mod limits;
mod observability;
mod otlp;
mod reflection;
mod replicas;
mod security;
mod simulated;
mod tracking;
