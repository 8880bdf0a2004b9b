//! Audit exports: a ticket's or a ward's trail over a time range, as JSON
//! lines (one history entry per line, as the ticket API shows it, with the
//! ticket and ward) or as CSV (one row per value a change altered, so a
//! spreadsheet can filter by field, user or device).

use cloud_store::TicketView;
use serde::Serialize;
use sync_protocol::document::{AuditAction, FieldChange, HistoryEntry};
use sync_protocol::ids::{TicketId, WardId};
use sync_protocol::ticket::UnixMillis;

/// One history entry of one ticket, as exported.
#[derive(Debug, Serialize)]
pub struct TrailLine<'a> {
    pub ticket: &'a TicketId,
    pub ward: &'a WardId,
    #[serde(flatten)]
    pub entry: &'a HistoryEntry,
}

/// The entries of `views` made in `from..=to`, ticket by ticket in order.
pub fn lines(views: &[TicketView], from: UnixMillis, to: UnixMillis) -> Vec<TrailLine<'_>> {
    views
        .iter()
        .flat_map(|view| {
            view.history.iter().filter(move |entry| (from..=to).contains(&entry.audit.at)).map(move |entry| TrailLine {
                ticket: &view.ticket.id,
                ward: &view.ticket.ward,
                entry,
            })
        })
        .collect()
}

pub fn jsonl(lines: &[TrailLine<'_>]) -> Result<String, serde_json::Error> {
    let mut out = String::new();
    for line in lines {
        out.push_str(&serde_json::to_string(line)?);
        out.push('\n');
    }
    Ok(out)
}

const CSV_HEADER: [&str; 14] = [
    "ticket",
    "ward",
    "change",
    "at_utc",
    "at_ms",
    "user",
    "role",
    "device",
    "offline_login",
    "action",
    "field",
    "old",
    "new",
    "reason",
];

pub fn csv(lines: &[TrailLine<'_>]) -> Result<String, csv::Error> {
    let mut writer = csv::Writer::from_writer(Vec::new());
    writer.write_record(CSV_HEADER)?;
    for line in lines {
        let audit = &line.entry.audit;
        let (action, edit_reason) = match &audit.action {
            AuditAction::Create => ("create", None),
            AuditAction::Edit { reason, .. } => ("edit", reason.as_deref()),
            AuditAction::Transition { .. } => ("transition", None),
            AuditAction::Resolve { .. } => ("resolve", None),
        };
        let mut values: Vec<[String; 4]> = line.entry.changes.iter().map(cells).collect();
        if values.is_empty() {
            values.push(Default::default()); // a creation: the ticket itself is the record
        }
        for [field, old, new, reason] in values {
            let reason = if reason.is_empty() { edit_reason.unwrap_or_default().to_owned() } else { reason };
            writer.write_record([
                line.ticket.to_string(),
                line.ward.to_string(),
                line.entry.change.clone(),
                line.entry.at_utc.clone(),
                audit.at.to_string(),
                audit.actor.user.to_string(),
                audit.actor.role.to_string(),
                audit.actor.device.to_string(),
                audit.actor.offline_login.to_string(),
                action.to_owned(),
                field,
                old,
                new,
                reason,
            ])?;
        }
    }
    writer.into_inner().map_err(|e| e.into_error().into()).map(|bytes| String::from_utf8_lossy(&bytes).into_owned())
}

/// A change as CSV cells: field, old value, new value, reason. Structured
/// values (a line, a supply) are compact JSON.
fn cells(change: &FieldChange) -> [String; 4] {
    match change {
        FieldChange::Priority { old, new } => {
            ["priority".into(), old.as_str().into(), new.as_str().into(), String::new()]
        }
        FieldChange::Assignee { old, new } => {
            let name =
                |user: &Option<sync_protocol::ids::UserId>| user.as_ref().map(ToString::to_string).unwrap_or_default();
            ["assignee".into(), name(old), name(new), String::new()]
        }
        FieldChange::Item { medication_code, old, new } => {
            [format!("item:{medication_code}"), json_cell(old), json_cell(new), String::new()]
        }
        FieldChange::Notes { removed, inserted } => ["notes".into(), removed.clone(), inserted.clone(), String::new()],
        FieldChange::Supply { medication_code, old, new } => {
            [format!("supply:{medication_code}"), json_cell(old), json_cell(new), String::new()]
        }
        FieldChange::Receipt { medication_code, old, new } => {
            [format!("receipt:{medication_code}"), json_cell(old), json_cell(new), String::new()]
        }
        FieldChange::Transition { to, reason, .. } => {
            ["status".into(), String::new(), to.as_str().into(), reason.clone().unwrap_or_default()]
        }
    }
}

/// Compact JSON of a value; `null` is an empty cell.
fn json_cell<T: Serialize>(value: &T) -> String {
    match serde_json::to_value(value) {
        Ok(serde_json::Value::Null) | Err(_) => String::new(),
        Ok(value) => value.to_string(),
    }
}
