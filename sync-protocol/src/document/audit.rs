//! The audit trail: every change carries a [`ChangeAudit`] as its commit
//! message (who, in which role, from which device, when, what), and a
//! change from a peer is decoded once into a [`ReceivedChange`] with it.

use automerge::{Change, ChangeHash};
use serde::{Deserialize, Serialize};

use super::DocumentError;
use crate::ids::UserId;
use crate::lifecycle::Transition;
use crate::supply::{LineReceipt, LineSupply};
use crate::ticket::{Actor, LineItem, Priority, Status, Ticket, UnixMillis};

/// What a change did, for the audit trail.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum AuditAction {
    Create,
    Edit {
        fields: Vec<String>,
        /// Absent from edits of releases before reasons were asked for.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reason: Option<String>,
    },
    Transition {
        to: Status,
    },
    Resolve {
        to: Status,
        resolves: Vec<String>,
    },
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
    /// `audit.at` as ISO 8601 UTC, for people and exports.
    pub at_utc: String,
    /// What the change did, read from the document itself (not from what
    /// the audit record claims): each field's value before and after it.
    pub changes: Vec<FieldChange>,
}

/// One field a change altered, with the values before and after. "Before"
/// is the ticket as the changes ahead of it in the history left it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "field", rename_all = "snake_case")]
pub enum FieldChange {
    Priority {
        old: Priority,
        new: Priority,
    },
    Assignee {
        old: Option<UserId>,
        new: Option<UserId>,
    },
    /// One line of the order: added (`old` null), removed (`new` null) or changed.
    Item {
        medication_code: String,
        old: Option<LineItem>,
        new: Option<LineItem>,
    },
    /// The text the change removed from the notes and the text it put in
    /// their place (one span: the notes between the longest unchanged
    /// beginning and end).
    Notes {
        removed: String,
        inserted: String,
    },
    /// What the pharmacy supplies against one line: added or changed.
    Supply {
        medication_code: String,
        old: Option<LineSupply>,
        new: LineSupply,
    },
    /// What the ward received of one line: added or changed.
    Receipt {
        medication_code: String,
        old: Option<LineReceipt>,
        new: LineReceipt,
    },
    /// A status transition the change recorded, with its reason.
    Transition {
        id: String,
        to: Status,
        reason: Option<String>,
        resolves: Vec<String>,
    },
}

impl FieldChange {
    /// What changed from `before` (`None` for a ticket's creation) to `after`.
    pub(super) fn between(
        before: Option<(&Ticket, &[Transition])>,
        after: (&Ticket, &[Transition]),
    ) -> Vec<FieldChange> {
        let Some((old, old_transitions)) = before else {
            return Vec::new(); // the creation: the ticket itself is the record
        };
        let (new, new_transitions) = after;
        let mut changes = Vec::new();
        if old.priority != new.priority {
            changes.push(FieldChange::Priority { old: old.priority, new: new.priority });
        }
        if old.assignee != new.assignee {
            changes.push(FieldChange::Assignee { old: old.assignee.clone(), new: new.assignee.clone() });
        }
        let line = |items: &[LineItem], code: &str| items.iter().find(|i| i.medication_code == code).cloned();
        let mut codes: Vec<&str> =
            old.items.iter().chain(&new.items).map(|item| item.medication_code.as_str()).collect();
        codes.sort_unstable();
        codes.dedup();
        for code in codes {
            let (was, is) = (line(&old.items, code), line(&new.items, code));
            if was != is {
                changes.push(FieldChange::Item { medication_code: code.to_owned(), old: was, new: is });
            }
        }
        for line in new.supply.iter().filter(|line| !old.supply.contains(line)) {
            let was = old.supply.iter().find(|o| o.medication_code == line.medication_code).cloned();
            changes.push(FieldChange::Supply {
                medication_code: line.medication_code.clone(),
                old: was,
                new: line.clone(),
            });
        }
        for line in new.receipt.iter().filter(|line| !old.receipt.contains(line)) {
            let was = old.receipt.iter().find(|o| o.medication_code == line.medication_code).cloned();
            changes.push(FieldChange::Receipt {
                medication_code: line.medication_code.clone(),
                old: was,
                new: line.clone(),
            });
        }
        if old.notes != new.notes {
            let (removed, inserted) = changed_span(&old.notes, &new.notes);
            changes.push(FieldChange::Notes { removed: removed.to_owned(), inserted: inserted.to_owned() });
        }
        for t in new_transitions.iter().filter(|t| !old_transitions.iter().any(|o| o.id == t.id)) {
            changes.push(FieldChange::Transition {
                id: t.id.clone(),
                to: t.to,
                reason: t.reason.clone(),
                resolves: t.resolves.clone(),
            });
        }
        changes
    }
}

/// The spans of `old` and `new` between their longest common beginning
/// and end, on character boundaries.
fn changed_span<'a>(old: &'a str, new: &'a str) -> (&'a str, &'a str) {
    let prefix: usize = old.chars().zip(new.chars()).take_while(|(a, b)| a == b).map(|(c, _)| c.len_utf8()).sum();
    let (old_rest, new_rest) = (&old[prefix..], &new[prefix..]);
    let suffix: usize =
        old_rest.chars().rev().zip(new_rest.chars().rev()).take_while(|(a, b)| a == b).map(|(c, _)| c.len_utf8()).sum();
    (&old_rest[..old_rest.len() - suffix], &new_rest[..new_rest.len() - suffix])
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
    parse_message(&change.hash(), change.message())
}

/// The audit record in a change's commit message.
pub(super) fn parse_message(hash: &ChangeHash, message: Option<&str>) -> Result<ChangeAudit, DocumentError> {
    let unaudited = |problem: String| DocumentError::Unaudited { hash: hash.to_string(), problem };
    let message = message.ok_or_else(|| unaudited("no commit message".into()))?;
    serde_json::from_str(message).map_err(|e| unaudited(e.to_string()))
}
