//! Identifiers. Each one is validated when it is made, so a value of the type
//! is proof that it is well formed; serde goes through the same checks.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Why an identifier was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    #[error("{kind} must be 1 to {max} characters, got {len}")]
    Length { kind: &'static str, max: usize, len: usize },
    #[error("{kind} may contain only {allowed}, got {value:?}")]
    Charset { kind: &'static str, allowed: &'static str, value: String },
    #[error("ticket id must be a UUIDv7, got {0:?}")]
    NotUuidV7(String),
    #[error("unknown role {0:?}: expected nurse, pharmacist, admin or edge-node")]
    UnknownRole(String),
}

/// A ticket's identity: a UUIDv7, so ids sort by creation time and can be
/// minted offline on any edge node without coordination.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct TicketId(uuid::Uuid);

impl TicketId {
    /// A new id for a ticket created at `now_ms` (milliseconds since the Unix epoch).
    /// The time is passed in because this crate reads no clock.
    pub fn new(now_ms: i64, random: [u8; 10]) -> Self {
        // Times before the epoch cannot be encoded in a UUIDv7; clamping keeps
        // the id valid, and no real ticket is created in 1969.
        let millis = u64::try_from(now_ms).unwrap_or(0);
        let id = uuid::Builder::from_unix_timestamp_millis(millis, &random).into_uuid();
        Self(id)
    }

    pub fn as_uuid(&self) -> uuid::Uuid {
        self.0
    }
}

impl TryFrom<uuid::Uuid> for TicketId {
    type Error = IdError;
    fn try_from(id: uuid::Uuid) -> Result<Self, IdError> {
        if id.get_version_num() == 7 { Ok(Self(id)) } else { Err(IdError::NotUuidV7(id.to_string())) }
    }
}

impl FromStr for TicketId {
    type Err = IdError;
    fn from_str(s: &str) -> Result<Self, IdError> {
        let id = uuid::Uuid::try_parse(s).map_err(|_| IdError::NotUuidV7(s.to_owned()))?;
        Self::try_from(id)
    }
}

impl TryFrom<String> for TicketId {
    type Error = IdError;
    fn try_from(s: String) -> Result<Self, IdError> {
        s.parse()
    }
}

impl From<TicketId> for String {
    fn from(id: TicketId) -> String {
        id.0.hyphenated().to_string()
    }
}

impl fmt::Display for TicketId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.hyphenated().fmt(f)
    }
}

/// Declares a string identifier made of a restricted character set, so ids are
/// safe in URLs, log fields, SQL and Kafka keys without escaping.
macro_rules! slug_id {
    ($(#[$doc:meta])* $name:ident, $kind:literal, $max:expr, $allowed_doc:literal, $allowed:expr) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub struct $name(String);

        impl $name {
            pub const LEN_MAX: usize = $max;

            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl TryFrom<String> for $name {
            type Error = IdError;
            fn try_from(value: String) -> Result<Self, IdError> {
                let len = value.chars().count();
                if len == 0 || len > Self::LEN_MAX {
                    return Err(IdError::Length { kind: $kind, max: Self::LEN_MAX, len });
                }
                let allowed: fn(char) -> bool = $allowed;
                if !value.chars().all(allowed) {
                    return Err(IdError::Charset { kind: $kind, allowed: $allowed_doc, value });
                }
                Ok(Self(value))
            }
        }

        impl FromStr for $name {
            type Err = IdError;
            fn from_str(s: &str) -> Result<Self, IdError> {
                Self::try_from(s.to_owned())
            }
        }

        impl From<$name> for String {
            fn from(id: $name) -> String {
                id.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.pad(&self.0)
            }
        }
    };
}

fn is_slug_char(c: char) -> bool {
    c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-'
}

slug_id!(
    /// A ward, as named by the hospital (`ward-4b`, `icu-2`).
    WardId, "ward id", 64, "lowercase letters, digits and '-'", is_slug_char
);
slug_id!(
    /// An edge node, one per installation on ward hardware (`edge-ward-4b-1`).
    NodeId, "node id", 64, "lowercase letters, digits and '-'", is_slug_char
);
slug_id!(
    /// A person or client known to the auth service (`n.okafor`, `pharm-01`).
    UserId, "user id", 64, "lowercase letters, digits and '.', '_', '-', '@'",
    |c| is_slug_char(c) || matches!(c, '.' | '_' | '@')
);

/// What a caller is, as stated in its token. Which role may do what to a
/// ticket is decided in [`crate::lifecycle`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Role {
    /// Ward staff: request stock, edit and cancel their ward's tickets, confirm receipt.
    Nurse,
    /// Central pharmacy: work the queue of all wards.
    Pharmacist,
    /// Supervisors and IT: may do what nurses and pharmacists may, and mark entries in error.
    Admin,
    /// A ward's edge node as a machine client: relays its ward's changes, authors none.
    EdgeNode,
}

impl Role {
    pub const ALL: [Role; 4] = [Role::Nurse, Role::Pharmacist, Role::Admin, Role::EdgeNode];

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Nurse => "nurse",
            Role::Pharmacist => "pharmacist",
            Role::Admin => "admin",
            Role::EdgeNode => "edge-node",
        }
    }

    /// Whether the role works at a ward: requests stock, edits and cancels
    /// the ward's tickets, logs in at the ward's edge node.
    pub fn works_at_ward(self) -> bool {
        matches!(self, Role::Nurse | Role::Admin)
    }

    /// Whether the role works the central pharmacy's queue.
    pub fn works_at_pharmacy(self) -> bool {
        matches!(self, Role::Pharmacist | Role::Admin)
    }

    /// The roles that work at a ward, for queries over stored accounts.
    pub fn ward_roles() -> impl Iterator<Item = Role> {
        Role::ALL.into_iter().filter(|role| role.works_at_ward())
    }
}

impl FromStr for Role {
    type Err = IdError;
    fn from_str(s: &str) -> Result<Self, IdError> {
        Role::ALL.into_iter().find(|role| role.as_str() == s).ok_or_else(|| IdError::UnknownRole(s.to_owned()))
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticket_ids_are_uuid_v7_and_sort_by_time() {
        let early = TicketId::new(1_700_000_000_000, [1; 10]);
        let late = TicketId::new(1_700_000_000_001, [0; 10]);
        assert!(early < late);
        assert_eq!(early.as_uuid().get_version_num(), 7);
        assert_eq!(early.to_string().parse::<TicketId>(), Ok(early));
    }

    #[test]
    fn other_uuid_versions_are_refused() {
        let v4 = "2f1c4a4e-9a55-4d0e-8b1a-0c6d2b1f3e4a";
        assert!(matches!(v4.parse::<TicketId>(), Err(IdError::NotUuidV7(_))));
        assert!("not-a-uuid".parse::<TicketId>().is_err());
    }

    #[test]
    fn slugs_are_checked() {
        assert!("ward-4b".parse::<WardId>().is_ok());
        assert!("Ward 4B".parse::<WardId>().is_err());
        assert!("".parse::<WardId>().is_err());
        assert!("x".repeat(65).parse::<NodeId>().is_err());
        assert!("n.okafor@ward-4b".parse::<UserId>().is_ok());
        assert!(serde_json::from_str::<WardId>("\"ward/../etc\"").is_err());
    }

    #[test]
    fn roles_round_trip_through_text() {
        for role in Role::ALL {
            assert_eq!(role.as_str().parse::<Role>(), Ok(role));
        }
        assert!("doctor".parse::<Role>().is_err());
    }
}
