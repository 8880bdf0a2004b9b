//! The ticket: what a ward asks the pharmacy for, and the checks every write
//! must pass before it is stored anywhere.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::ids::{NodeId, Role, TicketId, UserId, WardId};

/// Milliseconds since the Unix epoch. Time is always passed in: this crate reads no clock.
pub type UnixMillis = i64;

/// `YYYY-MM-DDThh:mm:ss.sssZ` (ISO 8601, UTC): how JSON bodies, exports
/// and FHIR give a time to people and other systems.
pub fn utc_iso8601(at: UnixMillis) -> String {
    utc(at)
        .and_then(|t| t.format(&time::format_description::well_known::Rfc3339).ok())
        .unwrap_or_else(|| "1970-01-01T00:00:00Z".to_owned())
}

/// The calendar day (UTC) of a time: what "expired" is decided against.
pub fn utc_date(at: UnixMillis) -> time::Date {
    utc(at).map_or(time::Date::MIN, time::OffsetDateTime::date)
}

/// A time as a UTC date-time; `None` beyond the years `time` represents.
fn utc(at: UnixMillis) -> Option<time::OffsetDateTime> {
    time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(at) * 1_000_000).ok()
}

/// Bounds on what a ticket may hold. Every one is a hard limit: a write that
/// exceeds it is refused, never truncated, because a truncated medication
/// order is worse than a refused one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Largest quantity on one line; a typo of 10000 instead of 100 should bounce.
    pub quantity_max: u32,
    pub items_per_ticket_max: usize,
    pub description_chars_max: usize,
    pub notes_chars_max: usize,
    pub reason_chars_max: usize,
    /// Bounds the work of materializing a status (see `lifecycle::resolve`).
    pub transitions_per_ticket_max: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            quantity_max: 10_000,
            items_per_ticket_max: 50,
            description_chars_max: 200,
            notes_chars_max: 4_000,
            reason_chars_max: 500,
            transitions_per_ticket_max: 256,
        }
    }
}

/// Why a ticket write was refused. Each variant has a stable [`code`](Self::code)
/// that HTTP edges put in their JSON error bodies.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TicketError {
    #[error("a ticket needs at least one line item")]
    EmptyItems,
    #[error("a ticket may have at most {max} line items, got {got}")]
    TooManyItems { max: usize, got: usize },
    #[error("quantity of {code} must be greater than 0")]
    QuantityZero { code: String },
    #[error("quantity of {code} is {got}, over the maximum of {max}")]
    QuantityOverMax { code: String, max: u32, got: u32 },
    #[error(
        "malformed medication code {code:?}: expected 2 to 32 characters of A-Z, 0-9, '-' or '.', starting with a letter or digit"
    )]
    MalformedMedicationCode { code: String },
    #[error("medication code {code} appears on more than one line")]
    DuplicateMedicationCode { code: String },
    #[error("{field} is {len} characters, over the limit of {max}")]
    TextTooLong { field: &'static str, max: usize, len: usize },
    #[error("moving a ticket to {to} needs a reason")]
    ReasonRequired { to: Status },
    #[error("resolving a conflict needs a reason: the trail must say why one side was chosen")]
    ResolutionReasonRequired,
    #[error("a {role} may not move a ticket from {from} to {to}")]
    IllegalTransition { from: Status, to: Status, role: Role },
    #[error("a {role} may not {what} a ticket that is {status}")]
    IllegalEdit { what: &'static str, status: Status, role: Role },
    #[error("the edit changes nothing")]
    EmptyEdit,
    #[error("no open conflict involves transition {0}")]
    UnknownConflict(String),
    #[error("resolving a conflict must choose {allowed}, got {got}")]
    ResolutionOutcome { allowed: String, got: Status },
    #[error("a ticket may record at most {max} status transitions")]
    TooManyTransitions { max: usize },
    #[error("a {role} may not {action}")]
    Forbidden { role: Role, action: &'static str },
    #[error("no line of this ticket asks for {code}")]
    UnknownLine { code: String },
    #[error("{got} of {code} is more than the {asked} asked for")]
    OverSupply { code: String, asked: u32, got: u32 },
    #[error("{code} is supplied short: say whether the rest is backordered or closed short")]
    ShortfallRequired { code: String },
    #[error("{code} is supplied in full, so nothing is backordered or closed short")]
    NotShort { code: String },
    #[error("closing {code} short needs a reason")]
    ShortReasonRequired { code: String },
    #[error("the substitute for {code} is refused: {problem}")]
    InvalidSubstitute { code: String, problem: String },
    #[error("{got} of {code} received, but {sent} were sent")]
    OverReceipt { code: String, sent: u32, got: u32 },
    #[error("{got} of {code} received of {sent} sent: record the discrepancy (missing, damaged, wrong-item)")]
    DiscrepancyRequired { code: String, sent: u32, got: u32 },
    #[error("the discrepancy of {code} needs a note saying what happened")]
    DiscrepancyNoteRequired { code: String },
    #[error("{code} received without its lot and expiry: type them or scan the pack")]
    LotAndExpiryRequired { code: String },
    #[error("the pack scanned for {code} does not match the {field} typed")]
    LabelMismatch { code: String, field: &'static str },
    #[error("the pack of {code}: {error}")]
    Label { code: String, error: crate::gs1::Gs1Error },
    #[error("{code} expired on {expiry}: do not use it; return it to the pharmacy")]
    ExpiredProduct { code: String, expiry: time::Date },
    #[error("formulary entry {code} is refused: {problem}")]
    InvalidMedication { code: String, problem: &'static str },
}

/// How a refusal should be reported: the same at every HTTP edge.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    /// The request is well formed but its content breaks a rule (HTTP 422).
    Invalid,
    /// The ticket's state does not allow it now (HTTP 409).
    Conflict,
    /// The caller's role may never do it (HTTP 403).
    Forbidden,
}

impl TicketError {
    pub fn class(&self) -> ErrorClass {
        match self {
            TicketError::IllegalTransition { .. }
            | TicketError::IllegalEdit { .. }
            | TicketError::UnknownConflict(_)
            | TicketError::ResolutionOutcome { .. }
            | TicketError::TooManyTransitions { .. } => ErrorClass::Conflict,
            TicketError::Forbidden { .. } => ErrorClass::Forbidden,
            _ => ErrorClass::Invalid,
        }
    }

    /// A stable, machine-readable name for the error.
    pub fn code(&self) -> &'static str {
        match self {
            TicketError::EmptyItems => "empty_items",
            TicketError::TooManyItems { .. } => "too_many_items",
            TicketError::QuantityZero { .. } => "quantity_zero",
            TicketError::QuantityOverMax { .. } => "quantity_over_max",
            TicketError::MalformedMedicationCode { .. } => "malformed_medication_code",
            TicketError::DuplicateMedicationCode { .. } => "duplicate_medication_code",
            TicketError::TextTooLong { .. } => "text_too_long",
            TicketError::ReasonRequired { .. } | TicketError::ResolutionReasonRequired => "reason_required",
            TicketError::IllegalTransition { .. } => "illegal_transition",
            TicketError::IllegalEdit { .. } => "illegal_edit",
            TicketError::EmptyEdit => "empty_edit",
            TicketError::UnknownConflict(_) => "unknown_conflict",
            TicketError::ResolutionOutcome { .. } => "illegal_resolution",
            TicketError::TooManyTransitions { .. } => "too_many_transitions",
            TicketError::Forbidden { .. } => "forbidden_role",
            TicketError::UnknownLine { .. } => "unknown_line",
            TicketError::OverSupply { .. } => "over_supply",
            TicketError::ShortfallRequired { .. } => "shortfall_required",
            TicketError::NotShort { .. } => "not_short",
            TicketError::ShortReasonRequired { .. } => "reason_required",
            TicketError::InvalidSubstitute { .. } => "invalid_substitute",
            TicketError::OverReceipt { .. } => "over_receipt",
            TicketError::DiscrepancyRequired { .. } => "discrepancy_required",
            TicketError::DiscrepancyNoteRequired { .. } => "note_required",
            TicketError::LotAndExpiryRequired { .. } => "lot_and_expiry_required",
            TicketError::LabelMismatch { .. } => "label_mismatch",
            TicketError::Label { error, .. } => error.code(),
            TicketError::ExpiredProduct { .. } => "expired_product",
            TicketError::InvalidMedication { .. } => "invalid_medication",
        }
    }
}

/// How a quantity is counted. A closed set: a free-text unit is how "5 mg"
/// becomes "5 ml" on a picking list.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Unit {
    Tablet,
    Capsule,
    Ampoule,
    Vial,
    Bag,
    Bottle,
    Tube,
    Patch,
    Syringe,
    Sachet,
    Inhaler,
    Pack,
}

impl Unit {
    pub const ALL: [Unit; 12] = [
        Unit::Tablet,
        Unit::Capsule,
        Unit::Ampoule,
        Unit::Vial,
        Unit::Bag,
        Unit::Bottle,
        Unit::Tube,
        Unit::Patch,
        Unit::Syringe,
        Unit::Sachet,
        Unit::Inhaler,
        Unit::Pack,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Unit::Tablet => "tablet",
            Unit::Capsule => "capsule",
            Unit::Ampoule => "ampoule",
            Unit::Vial => "vial",
            Unit::Bag => "bag",
            Unit::Bottle => "bottle",
            Unit::Tube => "tube",
            Unit::Patch => "patch",
            Unit::Syringe => "syringe",
            Unit::Sachet => "sachet",
            Unit::Inhaler => "inhaler",
            Unit::Pack => "pack",
        }
    }

    pub fn parse(s: &str) -> Option<Unit> {
        Unit::ALL.into_iter().find(|unit| unit.as_str() == s)
    }
}

/// One line of a ticket: so much of one medication.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LineItem {
    /// The hospital formulary's code for the product (`AMOX-500`, `0012345`).
    pub medication_code: String,
    #[serde(default)]
    pub description: String,
    pub quantity: u32,
    pub unit: Unit,
}

/// How soon the ward needs it, lowest first, so `Ord` sorts a queue with `Reverse`.
/// The names are FHIR's `request-priority` codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Priority {
    Routine,
    Urgent,
    Asap,
    Stat,
}

impl Priority {
    pub const ALL: [Priority; 4] = [Priority::Routine, Priority::Urgent, Priority::Asap, Priority::Stat];

    pub fn as_str(self) -> &'static str {
        match self {
            Priority::Routine => "routine",
            Priority::Urgent => "urgent",
            Priority::Asap => "asap",
            Priority::Stat => "stat",
        }
    }

    pub fn parse(s: &str) -> Option<Priority> {
        Priority::ALL.into_iter().find(|p| p.as_str() == s)
    }
}

/// Where a ticket is in its lifecycle. See [`crate::lifecycle`] for the rules.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Status {
    #[default]
    Requested,
    Acknowledged,
    Picking,
    Dispatched,
    Delivered,
    Cancelled,
    Rejected,
    EnteredInError,
}

impl Status {
    pub const ALL: [Status; 8] = [
        Status::Requested,
        Status::Acknowledged,
        Status::Picking,
        Status::Dispatched,
        Status::Delivered,
        Status::Cancelled,
        Status::Rejected,
        Status::EnteredInError,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Status::Requested => "requested",
            Status::Acknowledged => "acknowledged",
            Status::Picking => "picking",
            Status::Dispatched => "dispatched",
            Status::Delivered => "delivered",
            Status::Cancelled => "cancelled",
            Status::Rejected => "rejected",
            Status::EnteredInError => "entered-in-error",
        }
    }

    pub fn parse(s: &str) -> Option<Status> {
        Status::ALL.into_iter().find(|status| status.as_str() == s)
    }

    /// Position on the main path requested -> acknowledged -> picking ->
    /// dispatched -> delivered; `None` for the statuses that leave it.
    pub fn progress_rank(self) -> Option<u8> {
        match self {
            Status::Requested => Some(0),
            Status::Acknowledged => Some(1),
            Status::Picking => Some(2),
            Status::Dispatched => Some(3),
            Status::Delivered => Some(4),
            Status::Cancelled | Status::Rejected | Status::EnteredInError => None,
        }
    }

    pub fn is_final(self) -> bool {
        matches!(self, Status::Delivered | Status::Cancelled | Status::Rejected | Status::EnteredInError)
    }

    /// Statuses that need a stated reason when entered.
    pub fn needs_reason(self) -> bool {
        matches!(self, Status::Rejected | Status::EnteredInError)
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(self.as_str())
    }
}

/// Who made a change and from where: one entry of the medication audit trail.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Actor {
    pub user: UserId,
    pub role: Role,
    /// The node that accepted the change: the ward's edge node or a bridge.
    pub device: NodeId,
    /// The user logged in at the edge with a credential cached for outages,
    /// not with a token from the auth service; the trail must say so.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub offline_login: bool,
}

/// What a ward asks for when it creates a ticket.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewTicket {
    pub items: Vec<LineItem>,
    pub priority: Priority,
    #[serde(default)]
    pub notes: String,
}

/// Two status transitions that could not both hold. The ticket shows `held`'s
/// outcome until a person resolves the conflict with a transition that names it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Conflict {
    pub held: TransitionRef,
    pub overridden: TransitionRef,
}

/// A short reference to a transition in a ticket's history.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TransitionRef {
    pub id: String,
    pub to: Status,
    /// Why its author made it ("patient transferred to ICU"): a person
    /// settling the conflict needs both sides' reasons. Absent from tickets
    /// stored before reasons were shown.
    #[serde(default)]
    pub reason: Option<String>,
    pub user: UserId,
    pub role: Role,
    pub device: NodeId,
    pub at: UnixMillis,
    /// `at` as ISO 8601 UTC.
    #[serde(default)]
    pub at_utc: String,
}

/// An edit of the order (lines or priority) that the pharmacy had not seen
/// when it started picking, or a later step: what is on the bench may no
/// longer match the order. The edit stays applied (nothing a person entered
/// is dropped) and the conflict stays open until a person resolves it with a
/// transition that names `edit.change` (and states a reason).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderConflict {
    pub edit: EditRef,
    /// The first progress transition (picking or later) made without it.
    pub progress: TransitionRef,
}

/// A short reference to an edit in a ticket's history.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EditRef {
    /// The change's hash: what a resolution names.
    pub change: String,
    /// The fields it changed (`items`, `priority`).
    pub fields: Vec<String>,
    pub reason: Option<String>,
    pub user: UserId,
    pub role: Role,
    pub device: NodeId,
    pub at: UnixMillis,
    /// `at` as ISO 8601 UTC.
    pub at_utc: String,
}

/// A ticket as read from its document: every field a query or a screen needs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ticket {
    pub id: TicketId,
    pub ward: WardId,
    pub items: Vec<LineItem>,
    pub priority: Priority,
    pub status: Status,
    /// Why the ticket is in its status, where the status needs or was given one.
    pub status_reason: Option<String>,
    pub requested_by: UserId,
    /// The node the ticket was created on.
    pub requested_on: NodeId,
    pub created_at: UnixMillis,
    pub updated_at: UnixMillis,
    /// The two times above as ISO 8601 UTC, for people and other systems.
    /// Absent from tickets stored before they were given.
    #[serde(default)]
    pub created_at_utc: String,
    #[serde(default)]
    pub updated_at_utc: String,
    pub notes: String,
    pub assignee: Option<UserId>,
    pub conflicts: Vec<Conflict>,
    /// Absent from tickets stored before order conflicts were shown.
    #[serde(default)]
    pub order_conflicts: Vec<OrderConflict>,
    /// What the pharmacy supplied, per line asked for (by code).
    #[serde(default)]
    pub supply: Vec<crate::supply::LineSupply>,
    /// What the ward received, per line asked for (by code).
    #[serde(default)]
    pub receipt: Vec<crate::supply::LineReceipt>,
}

impl Ticket {
    /// Conflicts a person must settle, of either kind.
    pub fn open_conflicts(&self) -> usize {
        self.conflicts.len() + self.order_conflicts.len()
    }

    /// Lines still owed: backordered and not yet supplied in full or closed.
    pub fn open_backorders(&self) -> impl Iterator<Item = &crate::supply::LineSupply> {
        self.supply.iter().filter(|line| line.is_backordered())
    }
}

pub(crate) fn check_text(field: &'static str, text: &str, max: usize) -> Result<(), TicketError> {
    let len = text.chars().count();
    if len > max {
        return Err(TicketError::TextTooLong { field, max, len });
    }
    Ok(())
}

#[cfg(feature = "document")] // only documents carry reasons
pub(crate) fn check_reason(reason: Option<&str>, limits: &Limits) -> Result<(), TicketError> {
    reason.map_or(Ok(()), |reason| check_text("reason", reason, limits.reason_chars_max))
}

pub(crate) fn check_notes(notes: &str, limits: &Limits) -> Result<(), TicketError> {
    check_text("notes", notes, limits.notes_chars_max)
}

pub(crate) fn is_medication_code(code: &str) -> bool {
    let bytes = code.as_bytes();
    (2..=32).contains(&bytes.len())
        && bytes[0].is_ascii_alphanumeric()
        && bytes.iter().all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || matches!(b, b'-' | b'.'))
}

/// Checks a full list of line items, as created or as edited.
pub fn check_items(items: &[LineItem], limits: &Limits) -> Result<(), TicketError> {
    if items.is_empty() {
        return Err(TicketError::EmptyItems);
    }
    if items.len() > limits.items_per_ticket_max {
        return Err(TicketError::TooManyItems { max: limits.items_per_ticket_max, got: items.len() });
    }
    let mut codes = std::collections::BTreeSet::new();
    for item in items {
        let code = &item.medication_code;
        if !is_medication_code(code) {
            return Err(TicketError::MalformedMedicationCode { code: code.clone() });
        }
        if !codes.insert(code.as_str()) {
            return Err(TicketError::DuplicateMedicationCode { code: code.clone() });
        }
        if item.quantity == 0 {
            return Err(TicketError::QuantityZero { code: code.clone() });
        }
        if item.quantity > limits.quantity_max {
            return Err(TicketError::QuantityOverMax {
                code: code.clone(),
                max: limits.quantity_max,
                got: item.quantity,
            });
        }
        check_text("description", &item.description, limits.description_chars_max)?;
    }
    Ok(())
}

impl NewTicket {
    pub fn validate(&self, limits: &Limits) -> Result<(), TicketError> {
        check_items(&self.items, limits)?;
        check_notes(&self.notes, limits)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(code: &str, quantity: u32) -> LineItem {
        LineItem { medication_code: code.into(), description: String::new(), quantity, unit: Unit::Tablet }
    }

    #[test]
    fn each_bad_item_gets_its_own_error() {
        let limits = Limits::default();
        let cases = [
            (vec![], "empty_items"),
            (vec![item("AMOX-500", 0)], "quantity_zero"),
            (vec![item("AMOX-500", 10_001)], "quantity_over_max"),
            (vec![item("amox 500", 1)], "malformed_medication_code"),
            (vec![item("-AMOX", 1)], "malformed_medication_code"),
            (vec![item("A", 1)], "malformed_medication_code"),
            (vec![item("AMOX-500", 1), item("AMOX-500", 2)], "duplicate_medication_code"),
        ];
        for (items, code) in cases {
            let err = check_items(&items, &limits).expect_err(code);
            assert_eq!(err.code(), code, "{items:?}");
        }
        let too_many: Vec<_> = (0..51).map(|i| item(&format!("MED-{i}"), 1)).collect();
        assert_eq!(check_items(&too_many, &limits).map_err(|e| e.code()), Err("too_many_items"));
        assert_eq!(check_items(&[item("AMOX-500", 10_000), item("0012345", 1)], &limits), Ok(()));
    }

    #[test]
    fn text_limits_count_characters_not_bytes() {
        let limits = Limits { notes_chars_max: 3, ..Limits::default() };
        assert_eq!(check_notes("äöü", &limits), Ok(()));
        assert!(matches!(check_notes("äöüx", &limits), Err(TicketError::TextTooLong { len: 4, .. })));
    }

    #[test]
    fn priorities_order_from_routine_to_stat() {
        assert!(
            Priority::Routine < Priority::Urgent
                && Priority::Urgent < Priority::Asap
                && Priority::Asap < Priority::Stat
        );
        for p in Priority::ALL {
            assert_eq!(Priority::parse(p.as_str()), Some(p));
        }
        for s in Status::ALL {
            assert_eq!(Status::parse(s.as_str()), Some(s));
        }
        for u in Unit::ALL {
            assert_eq!(Unit::parse(u.as_str()), Some(u));
        }
    }
}
