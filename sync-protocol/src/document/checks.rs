//! The checks an edit or a transition must pass: when it is authored
//! (against the ticket as it stands) and when it arrives from a peer
//! (against what its audit declares and the status its author had seen).

use super::audit::{AuditAction, ChangeAudit};
use super::{DocumentError, NotesEdit, TicketEdit};
use crate::ids::Role;
use crate::lifecycle::{self, EditKind, Transition};
use crate::supply::{self, LineReceipt, LineSupply};
use crate::ticket::{self, Actor, Limits, OrderConflict, Status, Ticket, TicketError};
use time::Date;

/// What an edit changes: the fields it touches, the notes' new text, and
/// the supply and receipt lines that differ from what the ticket holds.
pub(super) struct EditPlan {
    pub fields: Vec<&'static str>,
    pub notes: Option<String>,
    pub supply: Vec<LineSupply>,
    pub receipt: Vec<LineReceipt>,
}

/// Checks an edit against the ticket as it stands (the lifecycle's rules,
/// the limits) and finds what it actually changes.
pub(super) fn plan_edit(
    current: &Ticket,
    edit: &TicketEdit,
    actor: &Actor,
    today: Date,
    limits: &Limits,
) -> Result<EditPlan, DocumentError> {
    ticket::check_reason(edit.reason.as_deref(), limits)?;
    let mut fields = Vec::new();
    let (supply, receipt) = plan_lines(current, edit, actor.role, today, limits)?;
    if !supply.is_empty() {
        fields.push("supply");
    }
    if !receipt.is_empty() {
        fields.push("receipt");
    }
    if let Some(items) = &edit.items {
        lifecycle::check_edit(EditKind::Order, current.status, actor.role)?;
        ticket::check_items(items, limits)?;
        if *items != current.items {
            fields.push("items");
        }
    }
    if let Some(priority) = edit.priority {
        lifecycle::check_edit(EditKind::Order, current.status, actor.role)?;
        if priority != current.priority {
            fields.push("priority");
        }
    }
    let notes = match &edit.notes {
        Some(notes) => {
            lifecycle::check_edit(EditKind::Notes, current.status, actor.role)?;
            let text = match notes {
                NotesEdit::Append(line) if current.notes.is_empty() || current.notes.ends_with('\n') => {
                    format!("{}{line}", current.notes)
                }
                NotesEdit::Append(line) => format!("{}\n{line}", current.notes),
                NotesEdit::Replace(text) => text.clone(),
            };
            ticket::check_notes(&text, limits)?;
            (text != current.notes).then(|| {
                fields.push("notes");
                text
            })
        }
        None => None,
    };
    if let Some(assignee) = &edit.assignee {
        lifecycle::check_edit(EditKind::Assignee, current.status, actor.role)?;
        if *assignee != current.assignee {
            fields.push("assignee");
        }
    }
    if fields.is_empty() {
        return Err(TicketError::EmptyEdit.into());
    }
    Ok(EditPlan { fields, notes, supply, receipt })
}

/// The supply and receipt lines an edit writes, each checked, keeping
/// those that differ from what the ticket holds.
fn plan_lines(
    current: &Ticket,
    edit: &TicketEdit,
    role: Role,
    today: Date,
    limits: &Limits,
) -> Result<(Vec<LineSupply>, Vec<LineReceipt>), DocumentError> {
    let mut supply = Vec::new();
    if let Some(lines) = &edit.supply {
        lifecycle::check_edit(EditKind::Supply, current.status, role)?;
        let backordered = |code: &str| current.supply.iter().any(|s| s.medication_code == code && s.is_backordered());
        if current.status == Status::Delivered && !lines.iter().all(|line| backordered(&line.medication_code)) {
            let what = "change the supply of a line that is not backordered on";
            return Err(TicketError::IllegalEdit { what, status: current.status, role }.into());
        }
        supply::check_supply(lines, &current.items, limits)?;
        supply = lines.iter().filter(|line| !current.supply.contains(line)).cloned().collect();
    }
    let mut receipt = Vec::new();
    if let Some(inputs) = &edit.receipt {
        lifecycle::check_edit(EditKind::Receipt, current.status, role)?;
        let mut codes = std::collections::BTreeSet::new();
        for input in inputs {
            if !codes.insert(input.medication_code.as_str()) {
                return Err(TicketError::DuplicateMedicationCode { code: input.medication_code.clone() }.into());
            }
            let line = supply::receive(input, &current.items, &current.supply, today, limits)?;
            if !current.receipt.contains(&line) {
                receipt.push(line);
            }
        }
    }
    Ok((supply, receipt))
}

/// Writes only the fields that differ, so a concurrent edit of another field
/// of the same line survives.
/// Checks that what changed between `before` and `after` was declared by the
/// audit records of the changes, by roles allowed to make such edits, and
/// that the ticket's identity did not change.
pub(super) fn check_declared_edits(
    before: Option<&Ticket>,
    after: &Ticket,
    audits: &[(String, ChangeAudit)],
    limits: &Limits,
) -> Result<(), DocumentError> {
    let forbidden = |hash: &str, problem: String| DocumentError::Forbidden { hash: hash.to_owned(), problem };
    for (hash, audit) in audits {
        match &audit.action {
            AuditAction::Create if before.is_some() => {
                return Err(forbidden(hash, "a ticket can be created only once".into()));
            }
            AuditAction::Create if !audit.actor.role.works_at_ward() => {
                return Err(forbidden(hash, format!("a {} may not create tickets", audit.actor.role)));
            }
            AuditAction::Edit { fields, reason } => {
                ticket::check_reason(reason.as_deref(), limits).map_err(|e| forbidden(hash, e.to_string()))?;
                for field in fields {
                    let kind = match field.as_str() {
                        "items" | "priority" => EditKind::Order,
                        "notes" => EditKind::Notes,
                        "assignee" => EditKind::Assignee,
                        "supply" => EditKind::Supply,
                        "receipt" => EditKind::Receipt,
                        other => return Err(forbidden(hash, format!("unknown field {other:?}"))),
                    };
                    let status = kind.most_permissive_status();
                    lifecycle::check_edit(kind, status, audit.actor.role)
                        .map_err(|e| forbidden(hash, e.to_string()))?;
                }
            }
            _ => {}
        }
    }
    let Some(before) = before else {
        return match audits.iter().any(|(_, audit)| audit.action == AuditAction::Create) {
            true => Ok(()),
            false => Err(DocumentError::malformed("a new ticket's changes include no creation")),
        };
    };
    if after.id != before.id || after.ward != before.ward || after.created_at != before.created_at {
        return Err(DocumentError::malformed("a change altered the ticket's id, ward or creation"));
    }
    let declared = |field: &str| {
        audits.iter().any(
            |(_, audit)| matches!(&audit.action, AuditAction::Edit { fields, .. } if fields.iter().any(|f| f == field)),
        )
    };
    let changed = [
        ("items", after.items != before.items),
        ("priority", after.priority != before.priority),
        ("notes", after.notes != before.notes),
        ("assignee", after.assignee != before.assignee),
        ("supply", after.supply != before.supply),
        ("receipt", after.receipt != before.receipt),
    ];
    for (field, changed) in changed {
        if changed && !declared(field) {
            return Err(DocumentError::malformed(format!("{field} changed without an audited edit")));
        }
    }
    Ok(())
}

/// The checks a transition must pass when it is authored. `order_conflicts`
/// are the ticket's order conflicts a resolution may name.
pub(super) fn check_request(
    to: Status,
    reason: Option<&str>,
    resolves: &[String],
    current: &lifecycle::Resolution,
    order_conflicts: &[OrderConflict],
    role: Role,
    limits: &Limits,
) -> Result<(), TicketError> {
    if resolves.is_empty() {
        lifecycle::check_transition(current.status, to, role)?;
    } else {
        lifecycle::check_resolution(&current.conflicts, order_conflicts, resolves, to, current.status, role)?;
    }
    if to.needs_reason() && reason.is_none() {
        return Err(TicketError::ReasonRequired { to });
    }
    ticket::check_reason(reason, limits)
}

/// Checks a transition received from another replica against the status its
/// author saw (the transitions it names in `seen`, and their ancestors), and
/// that it names the author of a change that arrived with it. A resolution
/// may name any order conflict of the document, resolved or not: whether
/// its author saw that edit is not recorded.
pub(super) fn check_authored_transition(
    new: &Transition,
    all: &[Transition],
    order_conflicts: &[OrderConflict],
    audits: &[(String, ChangeAudit)],
    limits: &Limits,
) -> Result<(), DocumentError> {
    let forbidden = |problem: String| DocumentError::Forbidden { hash: new.id.clone(), problem };
    let authored = audits.iter().any(|(_, audit)| {
        audit.actor.user == new.user
            && audit.actor.role == new.role
            && audit.actor.device == new.device
            && matches!(audit.action, AuditAction::Transition { to } | AuditAction::Resolve { to, .. } if to == new.to)
    });
    if !authored {
        return Err(forbidden("the transition does not match the audit record of its change".into()));
    }
    let mut seen: Vec<&str> = new.seen.iter().map(String::as_str).collect();
    let mut view: Vec<Transition> = Vec::new();
    while let Some(id) = seen.pop() {
        if view.iter().any(|t| t.id == id) {
            continue;
        }
        let ancestor =
            all.iter().find(|t| t.id == id).ok_or_else(|| forbidden(format!("it saw unknown transition {id}")))?;
        seen.extend(ancestor.seen.iter().map(String::as_str));
        view.push(ancestor.clone());
    }
    let before = lifecycle::resolve(&view);
    check_request(new.to, new.reason.as_deref(), &new.resolves, &before, order_conflicts, new.role, limits)
        .map_err(|e| forbidden(e.to_string()))
}
