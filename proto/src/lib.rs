//! wset.v1 wire types: the protobuf messages and gRPC services of the agent
//! and the controller, generated at build time by protox and
//! tonic-prost-build.

#![allow(missing_debug_implementations)]

/// Package `wset.v1`.
pub mod v1 {
    #![allow(clippy::all, clippy::pedantic)]
    tonic::include_proto!("wset.v1");
}

/// The encoded `FileDescriptorSet` of every wset proto, for server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/wset_descriptor.bin"));

pub mod ids;
