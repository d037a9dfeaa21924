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

/// The syntax of the identifiers the wire carries, shared by every process
/// that accepts them (the agent from VMMs, the controller from agents and
/// clients), so an id one accepts the other accepts too.
pub mod ids {
    /// Longest VM id.
    pub const MAX_VM_ID: usize = 64;
    /// Longest host id (a DNS name's limit).
    pub const MAX_HOST_ID: usize = 253;

    fn charset_ok(id: &str) -> bool {
        id.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-')
    }

    /// A VM id: 1 to 64 characters of `A-Z a-z 0-9 . _ -`.
    pub fn vm_id_ok(id: &str) -> bool {
        (1..=MAX_VM_ID).contains(&id.len()) && charset_ok(id)
    }

    /// A host id: 1 to 253 characters of `A-Z a-z 0-9 . _ -`.
    pub fn host_id_ok(id: &str) -> bool {
        (1..=MAX_HOST_ID).contains(&id.len()) && charset_ok(id)
    }

    /// An id that is not one, saying what an id must be: the one message
    /// every process gives for a bad id.
    #[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
    #[error("{field} {shown:?} must be 1 to {max} characters of A-Z a-z 0-9 . _ -")]
    pub struct IdError {
        /// The field that carried it (`vm_id`, `host_id`, `vm_ids`).
        pub field: &'static str,
        /// The id, cut to its first 80 characters.
        pub shown: String,
        max: usize,
    }

    fn refuse(field: &'static str, id: &str, max: usize) -> IdError {
        IdError {
            field,
            shown: id.chars().take(80).collect(),
            max,
        }
    }

    /// Check a VM id carried in `field`.
    pub fn check_vm_id(field: &'static str, id: &str) -> Result<(), IdError> {
        if vm_id_ok(id) {
            Ok(())
        } else {
            Err(refuse(field, id, MAX_VM_ID))
        }
    }

    /// Check a host id carried in `field`.
    pub fn check_host_id(field: &'static str, id: &str) -> Result<(), IdError> {
        if host_id_ok(id) {
            Ok(())
        } else {
            Err(refuse(field, id, MAX_HOST_ID))
        }
    }

    #[cfg(test)]
    mod tests {
        #[test]
        fn id_syntax() {
            assert!(super::vm_id_ok("vm-1.a_B"));
            assert!(!super::vm_id_ok(""));
            assert!(!super::vm_id_ok("a/b"));
            assert!(!super::vm_id_ok(&"x".repeat(65)));
            assert!(super::host_id_ok(&"h".repeat(253)));
            assert!(!super::host_id_ok("host\0"));
            let e = super::check_vm_id("vm_id", &"y".repeat(500)).unwrap_err();
            assert_eq!(
                e.to_string(),
                format!(
                    "vm_id {:?} must be 1 to 64 characters of A-Z a-z 0-9 . _ -",
                    "y".repeat(80)
                )
            );
            assert!(super::check_host_id("host_id", "h-1").is_ok());
        }
    }
}
