//! Order edits the pharmacy had not seen when it started picking. Edits,
//! unlike transitions, record nothing of what their author had seen, so
//! this reads the document's change graph: an edit is seen by a transition
//! when the edit's change is among the ancestors of the transition's.

use std::collections::{HashMap, HashSet};

use automerge::ChangeHash;

use super::audit::{AuditAction, parse_message};
use super::{DocumentError, TicketDocument};
use crate::lifecycle::{self, Transition};
use crate::ticket::{EditRef, OrderConflict, Status};

/// The edit fields that make up the order itself.
const ORDER_FIELDS: [&str; 2] = ["items", "priority"];

impl TicketDocument {
    /// Every order edit that a progress transition to picking or later was
    /// made without, paired with the first such transition in canonical
    /// order; resolved ones included (the caller filters them).
    pub(super) fn order_conflicts(&mut self, transitions: &[Transition]) -> Result<Vec<OrderConflict>, DocumentError> {
        let progress: Vec<&Transition> = lifecycle::canonical_order(transitions)
            .into_iter()
            .filter(|t| matches!(t.to, Status::Picking | Status::Dispatched | Status::Delivered))
            .collect();
        if progress.is_empty() {
            return Ok(Vec::new()); // the common case, and the hot path: nothing to read
        }
        let metas = self.doc.get_changes_meta(&[]);
        let mut edits = Vec::new();
        for meta in &metas {
            let audit = parse_message(&meta.hash, meta.message.as_deref())?;
            if let AuditAction::Edit { fields, .. } = &audit.action
                && fields.iter().any(|field| ORDER_FIELDS.contains(&field.as_str()))
            {
                edits.push((meta.hash, audit));
            }
        }
        if edits.is_empty() {
            return Ok(Vec::new());
        }
        let deps: HashMap<ChangeHash, &[ChangeHash]> = metas.iter().map(|m| (m.hash, m.deps.as_slice())).collect();
        // The change that wrote each progress transition, and what it had seen.
        let seen_by: Vec<(&Transition, HashSet<ChangeHash>)> = progress
            .into_iter()
            .map(|t| {
                let change =
                    metas.iter().find(|meta| writes_op(&t.id, &meta.actor.to_hex_string(), meta.start_op, meta.max_op));
                (t, change.map_or_else(HashSet::new, |meta| ancestors(&deps, meta.hash)))
            })
            .collect();
        let mut conflicts = Vec::new();
        for (hash, audit) in edits {
            let Some((transition, _)) = seen_by.iter().find(|(_, seen)| !seen.contains(&hash)) else {
                continue;
            };
            let AuditAction::Edit { fields, reason } = audit.action else { continue };
            conflicts.push(OrderConflict {
                edit: EditRef {
                    change: hash.to_string(),
                    fields: fields.into_iter().filter(|f| ORDER_FIELDS.contains(&f.as_str())).collect(),
                    reason,
                    user: audit.actor.user,
                    role: audit.actor.role,
                    device: audit.actor.device,
                    at: audit.at,
                    at_utc: crate::ticket::utc_iso8601(audit.at),
                },
                progress: transition.to_ref(),
            });
        }
        // The changes come in storage order, which differs between replicas.
        conflicts.sort_by(|a, b| (a.edit.at, &a.edit.change).cmp(&(b.edit.at, &b.edit.change)));
        Ok(conflicts)
    }
}

/// Whether the op id `counter@actor` (a transition's id) is one of the ops
/// `start_op..=max_op` of a change by `actor`.
fn writes_op(op: &str, actor: &str, start_op: u64, max_op: u64) -> bool {
    op.split_once('@').is_some_and(|(counter, by)| {
        by == actor && counter.parse::<u64>().is_ok_and(|counter| (start_op..=max_op).contains(&counter))
    })
}

/// `change` and every change it depends on, directly or not.
fn ancestors(deps: &HashMap<ChangeHash, &[ChangeHash]>, change: ChangeHash) -> HashSet<ChangeHash> {
    let mut seen = HashSet::from([change]);
    let mut queue = vec![change];
    while let Some(next) = queue.pop() {
        for dep in deps.get(&next).copied().unwrap_or_default() {
            if seen.insert(*dep) {
                queue.push(*dep);
            }
        }
    }
    seen
}
