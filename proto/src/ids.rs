//! The syntax of the identifiers the wire carries, shared by every process
//! that accepts them (the agent from VMMs, the controller from agents and
//! clients), so an id one accepts the other accepts too; and [`VmId`] and
//! [`HostId`], the ids once checked: parsed at the boundary (a gRPC
//! request, a handshake, a stored record), they are all that travels inside.

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

/// A string newtype holding an id that passed `$check`.
macro_rules! id_type {
    ($(#[$doc:meta])* $name:ident, $field:literal, $check:ident) => {
        $(#[$doc])*
        #[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
        #[cfg_attr(
            feature = "serde",
            derive(serde::Serialize, serde::Deserialize),
            serde(try_from = "String", into = "String")
        )]
        pub struct $name(String);

        /// As the string: messages that show an id with `{:?}` read the same.
        impl std::fmt::Debug for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                std::fmt::Debug::fmt(&self.0, f)
            }
        }

        impl $name {
            #[doc = concat!("Check `id`, carried in `", $field, "`.")]
            pub fn parse(id: &str) -> Result<Self, IdError> {
                Self::parse_in($field, id)
            }

            /// Check `id`, carried in `field` (for the message if it is bad).
            pub fn parse_in(field: &'static str, id: &str) -> Result<Self, IdError> {
                $check(field, id)?;
                Ok(Self(id.to_owned()))
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }

            pub fn into_string(self) -> String {
                self.0
            }
        }

        impl TryFrom<String> for $name {
            type Error = IdError;
            fn try_from(id: String) -> Result<Self, IdError> {
                $check($field, &id)?;
                Ok(Self(id))
            }
        }

        impl std::str::FromStr for $name {
            type Err = IdError;
            fn from_str(id: &str) -> Result<Self, IdError> {
                Self::parse(id)
            }
        }

        impl From<$name> for String {
            fn from(id: $name) -> String {
                id.0
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl std::borrow::Borrow<str> for $name {
            fn borrow(&self) -> &str {
                &self.0
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }

        impl PartialEq<str> for $name {
            fn eq(&self, other: &str) -> bool {
                self.0 == other
            }
        }

        impl PartialEq<&str> for $name {
            fn eq(&self, other: &&str) -> bool {
                self.0 == *other
            }
        }
    };
}

id_type!(
    /// A VM id that is one: 1 to 64 characters of `A-Z a-z 0-9 . _ -`.
    VmId,
    "vm_id",
    check_vm_id
);

id_type!(
    /// A host id that is one: 1 to 253 characters of `A-Z a-z 0-9 . _ -`.
    HostId,
    "host_id",
    check_host_id
);

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

    #[test]
    fn newtypes_hold_only_good_ids() {
        use super::{HostId, VmId};
        let v = VmId::parse("vm-1").unwrap();
        assert_eq!(v.as_str(), "vm-1");
        assert_eq!(v.to_string(), "vm-1");
        assert!(VmId::try_from("a/b".to_owned()).is_err());
        assert_eq!(VmId::parse_in("vm_ids", "").unwrap_err().field, "vm_ids");
        assert!("h.example".parse::<HostId>().is_ok());
        assert!(HostId::parse(&"h".repeat(254)).is_err());
        let m: std::collections::BTreeMap<VmId, u8> = [(v, 1)].into();
        assert_eq!(m.get("vm-1"), Some(&1));
    }
}
