//! The audit trail: every change carries a [`ChangeAudit`] as its commit
//! message (who, in which role, from which device, when, what), and a
//! change from a peer is decoded once into a [`ReceivedChange`] with it.

use automerge::Change;
use serde::{Deserialize, Serialize};

use super::DocumentError;
use crate::ticket::{Actor, Status, UnixMillis};

/// What a change did, for the audit trail.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum AuditAction {
    Create,
    Edit { fields: Vec<String> },
    Transition { to: Status },
    Resolve { to: Status, resolves: Vec<String> },
}

/// The commit message of every change: one entry of the audit trail.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChangeAudit {
    #[serde(flatten)]
    pub actor: Actor,
    pub at: UnixMillis,
    pub action: AuditAction,
}

/// One entry of a ticket's history, in causal order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HistoryEntry {
    /// The Automerge change hash: a tamper-evident reference to the change.
    pub change: String,
    #[serde(flatten)]
    pub audit: ChangeAudit,
}

/// A change from a peer, decoded once, with the ticket-independent facts
/// read without applying it: its hash and audit record. A bridge checks
/// these (which device sent it, in which role) before letting the change
/// near a document.
#[derive(Debug, Clone)]
pub struct ReceivedChange {
    pub(super) change: Change,
    pub(super) hash: String,
    pub(super) audit: ChangeAudit,
}

impl ReceivedChange {
    /// Decodes a change and its audit record; a change without a valid one is refused.
    pub fn decode(bytes: &[u8]) -> Result<Self, DocumentError> {
        let change = Change::from_bytes(bytes.to_vec())?;
        let audit = parse_audit(&change)?;
        Ok(Self { hash: change.hash().to_string(), change, audit })
    }

    pub(super) fn decode_all(changes: &[Vec<u8>]) -> Result<Vec<Self>, DocumentError> {
        changes.iter().map(|bytes| Self::decode(bytes)).collect()
    }

    /// The change's hash, hex encoded: its identity in every replica.
    pub fn hash(&self) -> &str {
        &self.hash
    }

    pub fn audit(&self) -> &ChangeAudit {
        &self.audit
    }

    /// The change as it travels: what a peer decodes.
    pub fn bytes(&self) -> &[u8] {
        self.change.raw_bytes()
    }

    /// Whether the change depends on no other: only a ticket's first change does.
    pub fn is_root(&self) -> bool {
        self.change.deps().is_empty()
    }
}

pub(super) fn parse_audit(change: &Change) -> Result<ChangeAudit, DocumentError> {
    let unaudited = |problem: String| DocumentError::Unaudited { hash: change.hash().to_string(), problem };
    let message = change.message().ok_or_else(|| unaudited("no commit message".into()))?;
    serde_json::from_str(message).map_err(|e| unaudited(e.to_string()))
}
