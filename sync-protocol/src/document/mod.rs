//! One Automerge document per ticket: the replicated source of truth that
//! edge nodes and the cloud merge.
//!
//! Schema (version [`SCHEMA_VERSION`]), at the document root:
//!
//! | key           | type                          | merge behaviour                              |
//! |---------------|-------------------------------|----------------------------------------------|
//! | `schema`      | uint                          | written once at creation                     |
//! | `id`, `ward`  | str                           | written once; a change to them is refused    |
//! | `created_at`, `created_by`, `created_on` | timestamp, str, str | written once           |
//! | `priority`    | str                           | register (concurrent edits: one wins, both kept in history) |
//! | `items`       | map code -> {description, quantity, unit} | per-item, per-field          |
//! | `notes`       | text                          | character-level merge: both edits survive    |
//! | `assignee`    | str or null                   | register                                     |
//! | `updated_at`  | timestamp                     | the latest of all concurrent values          |
//! | `transitions` | list of maps                  | append-only; status is derived, see [`crate::lifecycle`] |
//! | `supply`      | map code -> {quantity, substitute_code, substitute_description, substitute_reason, shortfall, reason} | per-line, per-field (schema 2; a schema 1 document gains it on its first supply) |
//! | `receipt`     | map code -> {quantity, discrepancy, note, lot, expiry, gtin, serial} | per-line, per-field (schema 2, as `supply`) |
//!
//! Schema 1 documents (no `supply`, `receipt`) load and merge with schema 2
//! ones (`tests/upgrade.rs`, against documents saved by that release).
//!
//! Every change carries a [`ChangeAudit`] as its commit message (who, in which
//! role, from which device, when, what): the document's change history is the
//! medication audit trail, and a change without one is refused.

mod audit;
mod checks;
mod materialize;
mod order;

use std::collections::{BTreeMap, HashMap};

use automerge::transaction::Transactable;
use automerge::{ActorId, AutoCommit, ChangeHash, ObjId, ObjType, ROOT, ReadDoc, ScalarValue, Value, hydrate};
use serde::{Deserialize, Serialize};

use crate::gs1::Gtin;
use crate::ids::{TicketId, UserId, WardId};
use crate::lifecycle;
use crate::supply::{Discrepancy, LineReceipt, LineSupply, ReceiptInput, Shortfall};
use crate::ticket::{self, Actor, Limits, LineItem, NewTicket, Priority, Status, Ticket, TicketError, UnixMillis};

pub use self::audit::{AuditAction, ChangeAudit, FieldChange, HistoryEntry, ReceivedChange};
use self::checks::{EditPlan, check_authored_transition, check_declared_edits, check_request, plan_edit};

/// The schema this build writes and the newest it can read. Version 2
/// adds `supply` and `receipt`; a version 1 document gains them on its
/// first such write.
pub const SCHEMA_VERSION: u64 = 2;

/// The shape of the materialized ticket's JSON (`Ticket`). Stores keep it
/// beside each document and serve it in lists; one written in an older
/// shape is rewritten from its document when a store opens. Version 2:
/// supply, receipt, order conflicts, reasons on conflicts, times in ISO 8601.
pub const TICKET_JSON_VERSION: u64 = 2;

const SUPPLY: &str = "supply";
const RECEIPT: &str = "receipt";

#[derive(Debug, thiserror::Error)]
pub enum DocumentError {
    #[error(transparent)]
    Ticket(#[from] TicketError),
    #[error("ticket document has schema version {found}; this build reads versions up to {supported}")]
    UnsupportedSchema { found: u64, supported: u64 },
    #[error("ticket document is malformed: {0}")]
    Malformed(String),
    #[error("change {hash} has no valid audit record: {problem}")]
    Unaudited { hash: String, problem: String },
    #[error("change {hash} is not allowed: {problem}")]
    Forbidden { hash: String, problem: String },
    /// The changes build on changes this replica does not hold (yet): a
    /// peer may hold them, so this is not proof of a bad change.
    #[error("changes depend on changes this replica does not have")]
    MissingDependencies,
    #[error("change bytes are not an automerge change: {0}")]
    ChangeEncoding(#[from] automerge::LoadChangeError),
    #[error("automerge: {0}")]
    Automerge(#[from] automerge::AutomergeError),
}

impl DocumentError {
    fn malformed(what: impl Into<String>) -> Self {
        DocumentError::Malformed(what.into())
    }
}

/// A change to the non-status fields of a ticket. `None` leaves a field alone.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TicketEdit {
    #[serde(default)]
    pub items: Option<Vec<LineItem>>,
    #[serde(default)]
    pub priority: Option<Priority>,
    #[serde(default)]
    pub notes: Option<NotesEdit>,
    /// `Some(None)` clears the assignee.
    #[serde(default, with = "serde_double_option")]
    pub assignee: Option<Option<UserId>>,
    /// What the pharmacy supplies: the lines given replace those lines'
    /// supply; others are left alone.
    #[serde(default)]
    pub supply: Option<Vec<LineSupply>>,
    /// What the ward received: the lines given replace those lines' receipt.
    #[serde(default)]
    pub receipt: Option<Vec<ReceiptInput>>,
    /// Why (a changed dose, a transfer): kept in the audit record, and shown
    /// on an order conflict the edit causes.
    #[serde(default)]
    pub reason: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub enum NotesEdit {
    /// Adds a line at the end: what a device does when a nurse adds a note.
    /// Concurrent appends all survive.
    Append(String),
    /// Replaces the text; applied as a minimal diff so concurrent edits to
    /// other parts of the notes survive.
    Replace(String),
}

/// An edit of a document run where the document is stored (a store's
/// writer thread), returning the new change.
pub type Mutation = Box<dyn FnOnce(&mut TicketDocument) -> Result<Vec<u8>, DocumentError> + Send>;

/// A request to move a ticket's status.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TransitionRequest {
    pub to: Status,
    #[serde(default)]
    pub reason: Option<String>,
    /// Transition ids of the open conflicts this resolves; empty for a plain transition.
    #[serde(default)]
    pub resolves: Vec<String>,
}

/// Distinguishes "absent" from "null" for `assignee`.
mod serde_double_option {
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    pub fn serialize<T: Serialize, S: Serializer>(value: &Option<Option<T>>, s: S) -> Result<S::Ok, S::Error> {
        match value {
            Some(inner) => inner.serialize(s),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, T: Deserialize<'de>, D: Deserializer<'de>>(d: D) -> Result<Option<Option<T>>, D::Error> {
        Option::<T>::deserialize(d).map(Some)
    }
}

/// A new ticket: its document, its first change (for the outbox), and the
/// ticket materialized.
#[derive(Debug)]
pub struct Created {
    pub document: TicketDocument,
    pub change: Vec<u8>,
    pub ticket: Ticket,
}

/// A ticket's Automerge document.
#[derive(Debug, Clone)]
pub struct TicketDocument {
    doc: AutoCommit,
    /// The ticket as last materialized, kept because materializing is the
    /// largest cost of moving a ticket through a bridge. Every mutation goes
    /// through a method of this type, which refreshes or clears it.
    materialized: Option<Ticket>,
}

impl TicketDocument {
    /// Creates the document for a new ticket and returns it with its first
    /// change and the materialized ticket. `replica` must be unique to this
    /// process (see ARCHITECTURE.md: actor ids).
    pub fn create(
        id: TicketId,
        ward: &WardId,
        new: &NewTicket,
        actor: &Actor,
        now: UnixMillis,
        limits: &Limits,
        replica: ActorId,
    ) -> Result<Created, DocumentError> {
        new.validate(limits)?;
        if !actor.role.works_at_ward() {
            return Err(TicketError::IllegalTransition {
                from: Status::Requested,
                to: Status::Requested,
                role: actor.role,
            }
            .into());
        }
        let mut doc = AutoCommit::new().with_actor(replica);
        // One batch write of the whole tree: in automerge 0.12 each single
        // put splices the op set, about 10 us apiece; the batch is several
        // times cheaper, and creation is the hottest write path.
        let item = |item: &LineItem| -> hydrate::Value {
            hydrate::Map::from(HashMap::from([
                ("description", hydrate::Value::from(item.description.as_str())),
                ("quantity", hydrate::Value::from(u64::from(item.quantity))),
                ("unit", hydrate::Value::from(item.unit.as_str())),
            ]))
            .into()
        };
        let items: HashMap<&str, hydrate::Value> =
            new.items.iter().map(|i| (i.medication_code.as_str(), item(i))).collect();
        let (ticket_id, id) = (id, id.to_string());
        let root = HashMap::from([
            ("schema", hydrate::Value::from(SCHEMA_VERSION)),
            ("id", hydrate::Value::from(id.as_str())),
            ("ward", hydrate::Value::from(ward.as_str())),
            ("created_at", hydrate::Value::from(ScalarValue::Timestamp(now))),
            ("created_by", hydrate::Value::from(actor.user.as_str())),
            ("created_on", hydrate::Value::from(actor.device.as_str())),
            ("updated_at", hydrate::Value::from(ScalarValue::Timestamp(now))),
            ("priority", hydrate::Value::from(new.priority.as_str())),
            ("assignee", hydrate::Value::from(ScalarValue::Null)),
            ("items", hydrate::Map::from(items).into()),
            ("notes", hydrate::Text::new(doc.text_encoding(), &new.notes).into()),
            ("transitions", hydrate::Value::from(Vec::<hydrate::Value>::new())),
            // Made with the document, so two replicas never create them
            // concurrently (one of two concurrent maps would hide the other).
            (SUPPLY, hydrate::Map::default().into()),
            (RECEIPT, hydrate::Map::default().into()),
        ]);
        doc.init_root_from_hydrate(&hydrate::Map::from(root))?;
        let mut document = TicketDocument { doc, materialized: None };
        let change = document.commit(actor, now, AuditAction::Create)?;
        // Materializing from the inputs saves reading the document back, the
        // largest cost of a create; tests check both ways agree.
        let ticket = requested(ticket_id, ward, new, actor, now);
        debug_assert_eq!(Some(&ticket), document.ticket().ok().as_ref(), "materialized from inputs");
        document.materialized = Some(ticket.clone());
        Ok(Created { document, change, ticket })
    }

    /// Loads a saved document. A newer schema than this build knows is an error, not a guess.
    pub fn load(bytes: &[u8], replica: ActorId) -> Result<Self, DocumentError> {
        let doc = AutoCommit::load(bytes)?.with_actor(replica);
        let document = TicketDocument { doc, materialized: None };
        document.check_schema()?;
        Ok(document)
    }

    /// Builds a document from changes received from a peer that may not be
    /// trusted (see [`Self::apply_untrusted`]).
    pub fn from_untrusted_changes(
        changes: &[Vec<u8>],
        limits: &Limits,
        replica: ActorId,
    ) -> Result<(Self, Vec<ChangeAudit>), DocumentError> {
        Self::from_received(&ReceivedChange::decode_all(changes)?, limits, replica)
    }

    /// [`Self::from_untrusted_changes`] for changes already decoded.
    pub fn from_received(
        changes: &[ReceivedChange],
        limits: &Limits,
        replica: ActorId,
    ) -> Result<(Self, Vec<ChangeAudit>), DocumentError> {
        let mut document = TicketDocument { doc: AutoCommit::new().with_actor(replica), materialized: None };
        let audits = document.apply_received(changes, limits)?;
        Ok((document, audits))
    }

    /// A document with no change yet, for a projection to merge accepted
    /// changes into ([`Self::merge_accepted`]).
    pub fn empty(replica: ActorId) -> Self {
        TicketDocument { doc: AutoCommit::new().with_actor(replica), materialized: None }
    }

    pub fn save(&mut self) -> Vec<u8> {
        self.doc.save()
    }

    /// Every change of the document, in an order a peer can apply.
    pub fn all_changes(&mut self) -> Vec<Vec<u8>> {
        self.doc.get_changes(&[]).into_iter().map(|c| c.raw_bytes().to_vec()).collect()
    }

    /// Hashes of the current heads, hex encoded.
    pub fn heads(&mut self) -> Vec<String> {
        self.doc.get_heads().iter().map(ToString::to_string).collect()
    }

    /// Hashes of the current heads: what a peer holding this document holds.
    pub fn head_hashes(&mut self) -> Vec<[u8; 32]> {
        self.doc.get_heads().into_iter().map(|hash| hash.0).collect()
    }

    /// Whether some of `heads` (a peer's) are changes this document lacks.
    pub fn lacks_any(&mut self, heads: &[[u8; 32]]) -> bool {
        heads.iter().any(|&head| self.doc.get_change_by_hash(&ChangeHash(head)).is_none())
    }

    /// The changes a peer whose document has the heads `theirs` lacks, in
    /// an order it can apply them (heads this document does not know are
    /// passed over: the peer has those and what they build on).
    pub fn changes_beyond(&mut self, theirs: &[[u8; 32]]) -> Vec<ReceivedChange> {
        let known: Vec<ChangeHash> = theirs
            .iter()
            .map(|&head| ChangeHash(head))
            .filter(|hash| self.doc.get_change_by_hash(hash).is_some())
            .collect();
        self.doc
            .get_changes(&known)
            .into_iter()
            // Every change in a stored document was audited when it came in.
            .filter_map(|change| ReceivedChange::decode(change.raw_bytes()).ok())
            .collect()
    }

    /// Applies changes that arrived from another replica, after checking them
    /// as the bridge must check anything an edge sends: each carries an audit
    /// record; the result is still a valid ticket of the same id and ward;
    /// each new transition was allowed for its author's role in the status
    /// its author saw, and names the author of the change. On any error the
    /// document is left as it was.
    ///
    /// Changes already present are skipped, so applying twice is harmless.
    /// Returns the audit records of the changes that were new.
    pub fn apply_untrusted(&mut self, changes: &[Vec<u8>], limits: &Limits) -> Result<Vec<ChangeAudit>, DocumentError> {
        self.apply_received(&ReceivedChange::decode_all(changes)?, limits)
    }

    /// [`Self::apply_untrusted`] for changes already decoded, so a caller
    /// that inspected them first does not parse them twice.
    pub fn apply_received(
        &mut self,
        changes: &[ReceivedChange],
        limits: &Limits,
    ) -> Result<Vec<ChangeAudit>, DocumentError> {
        let mut decoded = Vec::with_capacity(changes.len());
        let mut audits = Vec::new();
        for received in changes {
            if self.doc.get_change_by_hash(&received.change.hash()).is_some() {
                continue;
            }
            audits.push((received.hash.clone(), received.audit.clone()));
            decoded.push(received.change.clone());
        }
        if decoded.is_empty() {
            return Ok(Vec::new());
        }
        let before = if self.doc.get_heads().is_empty() { None } else { Some(self.ticket()?) };
        let transitions_before: Vec<String> = match before {
            Some(_) => self.transitions()?.into_iter().map(|t| t.id).collect(),
            None => Vec::new(),
        };
        let mut candidate = TicketDocument { doc: self.doc.fork(), materialized: None };
        candidate.doc.set_actor(self.doc.get_actor().clone());
        candidate.doc.apply_changes(decoded)?;
        if !candidate.doc.get_missing_deps(&[]).is_empty() {
            return Err(DocumentError::MissingDependencies);
        }
        candidate.check_schema()?;
        let ticket = candidate.ticket()?;
        check_declared_edits(before.as_ref(), &ticket, &audits, limits)?;
        ticket::check_items(&ticket.items, limits)?;
        ticket::check_notes(&ticket.notes, limits)?;
        let transitions = candidate.transitions()?;
        if transitions.len() > limits.transitions_per_ticket_max {
            return Err(TicketError::TooManyTransitions { max: limits.transitions_per_ticket_max }.into());
        }
        let fresh: Vec<&lifecycle::Transition> =
            transitions.iter().filter(|t| !transitions_before.contains(&t.id)).collect();
        // As where one is authored: only a resolution may name an order conflict.
        let order_conflicts = match fresh.iter().any(|t| !t.resolves.is_empty()) {
            true => candidate.order_conflicts(&transitions)?,
            false => Vec::new(),
        };
        for new in fresh {
            check_authored_transition(new, &transitions, &order_conflicts, &audits, limits)?;
        }
        candidate.materialized = Some(ticket);
        *self = candidate;
        Ok(audits.into_iter().map(|(_, audit)| audit).collect())
    }

    /// Merges changes that a bridge already accepted (checked there by
    /// [`Self::apply_received`]) without checking them again. A second check
    /// against this replica's state, which may hold other concurrent changes,
    /// could refuse what was accepted against the first; an accepted change
    /// must never be dropped, so a projection of accepted changes uses this.
    ///
    /// Changes already present are skipped. A change whose dependencies are
    /// missing is not applied but returned in [`Merged::held`], so the caller
    /// can keep it until they arrive.
    pub fn merge_accepted(&mut self, changes: Vec<ReceivedChange>) -> Result<Merged, DocumentError> {
        let mut merged = Merged::default();
        let fresh: Vec<ReceivedChange> =
            changes.into_iter().filter(|c| self.doc.get_change_by_hash(&c.change.hash()).is_none()).collect();
        if fresh.is_empty() {
            return Ok(merged);
        }
        self.materialized = None;
        self.doc.apply_changes(fresh.iter().map(|c| c.change.clone()))?;
        let mut any_held = false;
        for received in fresh {
            if self.doc.get_change_by_hash(&received.change.hash()).is_some() {
                merged.new.push(received.hash);
            } else {
                any_held = true;
                merged.held.push(received);
            }
        }
        if any_held {
            // Automerge queues a change whose dependencies are missing inside
            // the document; a round trip through its saved form drops that
            // queue, so what is held lives only with the caller.
            let actor = self.doc.get_actor().clone();
            self.doc = AutoCommit::load(&self.doc.save())?.with_actor(actor);
        }
        if !merged.new.is_empty() {
            self.check_schema()?;
        }
        Ok(merged)
    }

    /// Edits the items, priority, notes or assignee. Returns the new change.
    pub fn edit(
        &mut self,
        edit: &TicketEdit,
        actor: &Actor,
        now: UnixMillis,
        limits: &Limits,
    ) -> Result<Vec<u8>, DocumentError> {
        let current = self.ticket()?;
        let EditPlan { fields, notes, supply, receipt } =
            plan_edit(&current, edit, actor, crate::ticket::utc_date(now), limits)?;
        self.materialized = None;
        if fields.contains(&"items") {
            self.write_items(&current.items, edit.items.iter().flatten())?;
        }
        if let Some(priority) = edit.priority.filter(|_| fields.contains(&"priority")) {
            self.doc.put(ROOT, "priority", priority.as_str())?;
        }
        if let Some(text) = notes {
            let appended = matches!(edit.notes, Some(NotesEdit::Append(_)));
            self.write_notes(&current.notes, &text, appended)?;
        }
        self.write_lines(SUPPLY, supply.iter().map(|line| (line.medication_code.as_str(), supply_fields(line))))?;
        self.write_lines(RECEIPT, receipt.iter().map(|line| (line.medication_code.as_str(), receipt_fields(line))))?;
        if fields.contains(&"assignee") {
            match edit.assignee.as_ref().and_then(Option::as_ref) {
                Some(user) => self.doc.put(ROOT, "assignee", user.as_str())?,
                None => self.doc.put(ROOT, "assignee", ScalarValue::Null)?,
            }
        }
        self.doc.put(ROOT, "updated_at", ScalarValue::Timestamp(now))?;
        let reason = edit.reason.as_deref().map(str::trim).filter(|r| !r.is_empty()).map(str::to_owned);
        self.commit(actor, now, AuditAction::Edit { fields: fields.into_iter().map(String::from).collect(), reason })
    }

    /// Puts the order's lines as `wanted`: removes lines no longer asked
    /// for, writes those new or changed, leaves the others untouched (so a
    /// concurrent edit of another line merges).
    fn write_items<'a>(
        &mut self,
        current: &[LineItem],
        wanted: impl Iterator<Item = &'a LineItem>,
    ) -> Result<(), DocumentError> {
        let items = self.object(&ROOT, "items", ObjType::Map)?;
        let wanted: BTreeMap<&str, &LineItem> = wanted.map(|item| (item.medication_code.as_str(), item)).collect();
        for old in current {
            if !wanted.contains_key(old.medication_code.as_str()) {
                self.doc.delete(&items, old.medication_code.as_str())?;
            }
        }
        for (code, item) in wanted {
            if current.iter().find(|old| old.medication_code == code) != Some(item) {
                update_item(&mut self.doc, &items, item)?;
            }
        }
        Ok(())
    }

    /// Writes per-line records (supply, receipt) under `key`, each field
    /// only where it differs, so concurrent edits of other fields merge.
    fn write_lines<'a>(
        &mut self,
        key: &str,
        lines: impl Iterator<Item = (&'a str, Vec<(&'static str, ScalarValue)>)>,
    ) -> Result<(), DocumentError> {
        let mut lines = lines.peekable();
        if lines.peek().is_none() {
            return Ok(());
        }
        let map = match self.doc.get(ROOT, key)? {
            Some((Value::Object(ObjType::Map), map)) => map,
            // A document of schema 1: its first such write makes the map.
            _ => self.doc.put_object(ROOT, key, ObjType::Map)?,
        };
        for (code, fields) in lines {
            let entry = match self.doc.get(&map, code)? {
                Some((Value::Object(ObjType::Map), entry)) => entry,
                _ => self.doc.put_object(&map, code, ObjType::Map)?,
            };
            put_changed(&mut self.doc, &entry, fields)?;
        }
        Ok(())
    }

    fn write_notes(&mut self, current: &str, text: &str, appended: bool) -> Result<(), DocumentError> {
        let notes = self.object(&ROOT, "notes", ObjType::Text)?;
        if appended {
            // Appending splices at the end only, so it merges with any
            // concurrent edit of the existing text.
            let old_len = self.doc.length(&notes);
            self.doc.splice_text(&notes, old_len, 0, &text[current.len()..])?;
        } else {
            self.doc.update_text(&notes, text)?;
        }
        Ok(())
    }

    /// Records a status transition (or a conflict resolution). Returns the new change.
    pub fn transition(
        &mut self,
        request: &TransitionRequest,
        actor: &Actor,
        now: UnixMillis,
        limits: &Limits,
    ) -> Result<Vec<u8>, DocumentError> {
        let transitions = self.transitions()?;
        if transitions.len() >= limits.transitions_per_ticket_max {
            return Err(TicketError::TooManyTransitions { max: limits.transitions_per_ticket_max }.into());
        }
        let current = lifecycle::resolve(&transitions);
        let reason = request.reason.as_deref().map(str::trim).filter(|r| !r.is_empty());
        // Only a resolution may name an order conflict: finding them reads
        // the change graph, so a plain transition does not.
        let order_conflicts = if request.resolves.is_empty() { Vec::new() } else { self.ticket()?.order_conflicts };
        check_request(request.to, reason, &request.resolves, &current, &order_conflicts, actor.role, limits)?;
        // Checked where a resolution is authored, not where one arrives:
        // documents of releases that did not ask for a reason still merge.
        if !request.resolves.is_empty() && reason.is_none() {
            return Err(TicketError::ResolutionReasonRequired.into());
        }
        self.materialized = None;
        let list = self.object(&ROOT, "transitions", ObjType::List)?;
        let entry = self.doc.insert_object(&list, self.doc.length(&list), ObjType::Map)?;
        self.doc.put(&entry, "to", request.to.as_str())?;
        self.doc.put(&entry, "user", actor.user.as_str())?;
        self.doc.put(&entry, "role", actor.role.as_str())?;
        self.doc.put(&entry, "device", actor.device.as_str())?;
        self.doc.put(&entry, "at", ScalarValue::Timestamp(now))?;
        match reason {
            Some(reason) => self.doc.put(&entry, "reason", reason)?,
            None => self.doc.put(&entry, "reason", ScalarValue::Null)?,
        }
        put_string_list(&mut self.doc, &entry, "seen", &current.heads)?;
        put_string_list(&mut self.doc, &entry, "resolves", &request.resolves)?;
        self.doc.put(ROOT, "updated_at", ScalarValue::Timestamp(now))?;
        let action = if request.resolves.is_empty() {
            AuditAction::Transition { to: request.to }
        } else {
            AuditAction::Resolve { to: request.to, resolves: request.resolves.clone() }
        };
        self.commit(actor, now, action)
    }

    /// Commits the pending operations with their audit record and returns the change.
    fn commit(&mut self, actor: &Actor, now: UnixMillis, action: AuditAction) -> Result<Vec<u8>, DocumentError> {
        let audit = ChangeAudit { actor: actor.clone(), at: now, action };
        let message = serde_json::to_string(&audit).map_err(|e| DocumentError::malformed(e.to_string()))?;
        self.doc
            .commit_with(automerge::transaction::CommitOptions::default().with_message(message).with_time(now / 1000));
        let change =
            self.doc.get_last_local_change().ok_or_else(|| DocumentError::malformed("commit produced no change"))?;
        Ok(change.raw_bytes().to_vec())
    }
}

/// A new ticket as `new` asks for it, before anyone acted on it.
fn requested(id: TicketId, ward: &WardId, new: &NewTicket, actor: &Actor, now: UnixMillis) -> Ticket {
    let mut items = new.items.clone();
    items.sort_by(|a, b| a.medication_code.cmp(&b.medication_code));
    Ticket {
        id,
        ward: ward.clone(),
        items,
        priority: new.priority,
        status: Status::Requested,
        status_reason: None,
        requested_by: actor.user.clone(),
        requested_on: actor.device.clone(),
        created_at: now,
        updated_at: now,
        created_at_utc: crate::ticket::utc_iso8601(now),
        updated_at_utc: crate::ticket::utc_iso8601(now),
        notes: new.notes.clone(),
        assignee: None,
        conflicts: Vec::new(),
        order_conflicts: Vec::new(),
        supply: Vec::new(),
        receipt: Vec::new(),
    }
}

fn put_item(doc: &mut AutoCommit, items: &ObjId, item: &LineItem) -> Result<(), DocumentError> {
    let entry = doc.put_object(items, item.medication_code.as_str(), ObjType::Map)?;
    doc.put(&entry, "description", item.description.as_str())?;
    doc.put(&entry, "quantity", u64::from(item.quantity))?;
    doc.put(&entry, "unit", item.unit.as_str())?;
    Ok(())
}

fn update_item(doc: &mut AutoCommit, items: &ObjId, item: &LineItem) -> Result<(), DocumentError> {
    let entry = match doc.get(items, item.medication_code.as_str())? {
        Some((Value::Object(ObjType::Map), entry)) => entry,
        _ => return put_item(doc, items, item),
    };
    let wanted = vec![
        ("description", ScalarValue::Str(item.description.as_str().into())),
        ("quantity", ScalarValue::Uint(u64::from(item.quantity))),
        ("unit", ScalarValue::Str(item.unit.as_str().into())),
    ];
    put_changed(doc, &entry, wanted)
}

/// Puts each of `fields` into `entry` where its value differs.
fn put_changed(
    doc: &mut AutoCommit,
    entry: &ObjId,
    fields: Vec<(&'static str, ScalarValue)>,
) -> Result<(), DocumentError> {
    for (key, value) in fields {
        let differs = match doc.get(entry, key)? {
            Some((Value::Scalar(current), _)) => current.as_ref() != &value,
            _ => true,
        };
        if differs {
            doc.put(entry, key, value)?;
        }
    }
    Ok(())
}

fn optional(text: Option<&str>) -> ScalarValue {
    text.map_or(ScalarValue::Null, |text| ScalarValue::Str(text.into()))
}

fn supply_fields(line: &LineSupply) -> Vec<(&'static str, ScalarValue)> {
    let substitute = line.substitute.as_ref();
    vec![
        ("quantity", ScalarValue::Uint(u64::from(line.quantity))),
        ("substitute_code", optional(substitute.map(|s| s.medication_code.as_str()))),
        ("substitute_description", optional(substitute.map(|s| s.description.as_str()))),
        ("substitute_reason", optional(substitute.map(|s| s.reason.as_str()))),
        ("shortfall", optional(line.shortfall.map(Shortfall::as_str))),
        ("reason", optional(line.reason.as_deref())),
    ]
}

fn receipt_fields(line: &LineReceipt) -> Vec<(&'static str, ScalarValue)> {
    let expiry = line.expiry.and_then(|date| date.format(crate::supply::DATE_FORMAT).ok());
    vec![
        ("quantity", ScalarValue::Uint(u64::from(line.quantity))),
        ("discrepancy", optional(line.discrepancy.map(Discrepancy::as_str))),
        ("note", optional(line.note.as_deref())),
        ("lot", optional(line.lot.as_deref())),
        ("expiry", optional(expiry.as_deref())),
        ("gtin", optional(line.gtin.as_ref().map(Gtin::as_str))),
        ("serial", optional(line.serial.as_deref())),
    ]
}

fn put_string_list(doc: &mut AutoCommit, parent: &ObjId, key: &str, values: &[String]) -> Result<(), DocumentError> {
    let list = doc.put_object(parent, key, ObjType::List)?;
    for (i, value) in values.iter().enumerate() {
        doc.insert(&list, i, value.as_str())?;
    }
    Ok(())
}

/// What [`TicketDocument::merge_accepted`] did.
#[derive(Debug, Default)]
pub struct Merged {
    /// Hashes of the changes that were new to the document, in the order given.
    pub new: Vec<String>,
    /// Changes not applied because changes they depend on are missing.
    pub held: Vec<ReceivedChange>,
}
