//! Reading the document: the materialized [`Ticket`], its transitions, its
//! history, and the typed reads of the schema's fields they use.

use automerge::{Change, ObjId, ObjType, ROOT, ReadDoc, ScalarValue, Value};

use std::collections::BTreeMap;

use super::{
    DocumentError, FieldChange, HistoryEntry, RECEIPT, SCHEMA_VERSION, SUPPLY, TicketDocument, audit::parse_audit,
};
use crate::gs1::Gtin;
use crate::ids::{TicketId, UserId, WardId};
use crate::lifecycle::{self, Transition};
use crate::supply::{DATE_FORMAT, Discrepancy, LineReceipt, LineSupply, Shortfall, Substitute};
use crate::ticket::{LineItem, Priority, Status, Ticket, Unit, UnixMillis, utc_iso8601};

impl TicketDocument {
    /// The ticket as it stands in this replica.
    pub fn ticket(&mut self) -> Result<Ticket, DocumentError> {
        match &self.materialized {
            Some(ticket) => Ok(ticket.clone()),
            None => self.materialize(),
        }
    }

    pub(super) fn materialize(&mut self) -> Result<Ticket, DocumentError> {
        let (id, ward) = self.identity()?;
        let transitions = self.transitions()?;
        let resolution = lifecycle::resolve(&transitions);
        let mut order_conflicts = self.order_conflicts(&transitions)?;
        order_conflicts.retain(|c| !transitions.iter().any(|t| t.resolves.contains(&c.edit.change)));
        let items_obj = self.object(&ROOT, "items", ObjType::Map)?;
        let mut items = Vec::new();
        for code in self.doc.keys(&items_obj) {
            let item = self.object(&items_obj, &code, ObjType::Map)?;
            let quantity = self.quantity(&item)?;
            let unit = self.string(&item, "unit")?;
            items.push(LineItem {
                description: self.string(&item, "description")?,
                quantity,
                unit: Unit::parse(&unit).ok_or_else(|| DocumentError::malformed(format!("unknown unit {unit:?}")))?,
                medication_code: code,
            });
        }
        let priority = self.string(&ROOT, "priority")?;
        let notes = self.object(&ROOT, "notes", ObjType::Text)?;
        let assignee = match self.scalar(&ROOT, "assignee")? {
            ScalarValue::Null => None,
            ScalarValue::Str(user) => Some(parse_field::<UserId>("assignee", &user)?),
            _ => return Err(DocumentError::malformed("assignee is neither a user nor null")),
        };
        // Concurrent updates leave several values; the latest time is the truth.
        let updated_at = self
            .doc
            .get_all(ROOT, "updated_at")?
            .into_iter()
            .filter_map(|(value, _)| value.as_i64())
            .max()
            .ok_or_else(|| DocumentError::malformed("updated_at missing"))?;
        let created_at = self.timestamp(&ROOT, "created_at")?;
        Ok(Ticket {
            id,
            ward,
            items,
            priority: Priority::parse(&priority)
                .ok_or_else(|| DocumentError::malformed(format!("unknown priority {priority:?}")))?,
            status: resolution.status,
            status_reason: resolution.status_reason,
            requested_by: parse_field("created_by", &self.string(&ROOT, "created_by")?)?,
            requested_on: parse_field("created_on", &self.string(&ROOT, "created_on")?)?,
            created_at,
            updated_at,
            created_at_utc: utc_iso8601(created_at),
            updated_at_utc: utc_iso8601(updated_at),
            notes: self.doc.text(&notes)?,
            assignee,
            conflicts: resolution.conflicts,
            order_conflicts,
            supply: self
                .line_entries(SUPPLY)?
                .into_iter()
                .map(|(code, entry)| self.supply(code, &entry))
                .collect::<Result<_, _>>()?,
            receipt: self
                .line_entries(RECEIPT)?
                .into_iter()
                .map(|(code, entry)| self.receipt(code, &entry))
                .collect::<Result<_, _>>()?,
        })
    }

    /// The per-line records under `key` (supply, receipt), by code. A
    /// document of schema 1 gains the map on its first such write; if two
    /// replicas made it concurrently, the entries of both are read, the
    /// winning map's first.
    fn line_entries(&self, key: &str) -> Result<Vec<(String, ObjId)>, DocumentError> {
        let mut entries: BTreeMap<String, ObjId> = BTreeMap::new();
        for (value, map) in self.doc.get_all(ROOT, key)?.into_iter().rev() {
            if !matches!(value, Value::Object(ObjType::Map)) {
                return Err(DocumentError::malformed(format!("{key} is not a map")));
            }
            for code in self.doc.keys(&map) {
                if let std::collections::btree_map::Entry::Vacant(slot) = entries.entry(code) {
                    let entry = self.object(&map, slot.key(), ObjType::Map)?;
                    slot.insert(entry);
                }
            }
        }
        Ok(entries.into_iter().collect())
    }

    fn supply(&self, medication_code: String, entry: &ObjId) -> Result<LineSupply, DocumentError> {
        let substitute = match self.optional_string(entry, "substitute_code")? {
            Some(code) => Some(Substitute {
                medication_code: code,
                description: self.optional_string(entry, "substitute_description")?.unwrap_or_default(),
                reason: self.optional_string(entry, "substitute_reason")?.unwrap_or_default(),
            }),
            None => None,
        };
        let shortfall = self.optional_string(entry, "shortfall")?;
        Ok(LineSupply {
            quantity: self.quantity(entry)?,
            substitute,
            shortfall: match shortfall {
                Some(s) => {
                    Some(Shortfall::parse(&s).ok_or_else(|| DocumentError::malformed(format!("shortfall {s:?}")))?)
                }
                None => None,
            },
            reason: self.optional_string(entry, "reason")?,
            medication_code,
        })
    }

    fn receipt(&self, medication_code: String, entry: &ObjId) -> Result<LineReceipt, DocumentError> {
        let malformed = |what: &str, value: &str| DocumentError::malformed(format!("{what} {value:?}"));
        let discrepancy = match self.optional_string(entry, "discrepancy")? {
            Some(d) => Some(Discrepancy::parse(&d).ok_or_else(|| malformed("discrepancy", &d))?),
            None => None,
        };
        let expiry = match self.optional_string(entry, "expiry")? {
            Some(e) => Some(time::Date::parse(&e, DATE_FORMAT).map_err(|_| malformed("expiry", &e))?),
            None => None,
        };
        let gtin = match self.optional_string(entry, "gtin")? {
            Some(g) => Some(Gtin::parse(&g).map_err(|_| malformed("gtin", &g))?),
            None => None,
        };
        Ok(LineReceipt {
            quantity: self.quantity(entry)?,
            discrepancy,
            note: self.optional_string(entry, "note")?,
            lot: self.optional_string(entry, "lot")?,
            expiry,
            gtin,
            serial: self.optional_string(entry, "serial")?,
            medication_code,
        })
    }

    fn quantity(&self, entry: &ObjId) -> Result<u32, DocumentError> {
        match self.scalar(entry, "quantity")? {
            ScalarValue::Uint(q) => u32::try_from(q).map_err(|_| DocumentError::malformed("quantity out of range")),
            _ => Err(DocumentError::malformed("quantity is not an unsigned integer")),
        }
    }

    fn optional_string(&self, parent: &ObjId, key: &str) -> Result<Option<String>, DocumentError> {
        match self.scalar(parent, key)? {
            ScalarValue::Str(s) => Ok(Some(s.to_string())),
            ScalarValue::Null => Ok(None),
            _ => Err(DocumentError::malformed(format!("{key} is neither a string nor null"))),
        }
    }

    /// Every recorded status transition, in document order.
    pub fn transitions(&self) -> Result<Vec<Transition>, DocumentError> {
        let list = self.object(&ROOT, "transitions", ObjType::List)?;
        let length = self.doc.length(&list);
        let mut transitions = Vec::with_capacity(length);
        for index in 0..length {
            let entry = match self.doc.get(&list, index)? {
                Some((Value::Object(ObjType::Map), id)) => id,
                _ => return Err(DocumentError::malformed("transition entry is not a map")),
            };
            let to = self.string(&entry, "to")?;
            let role = self.string(&entry, "role")?;
            transitions.push(Transition {
                // The entry's object id is unique across replicas by
                // construction (counter@actor), so it needs no randomness.
                id: entry.to_string(),
                to: Status::parse(&to).ok_or_else(|| DocumentError::malformed(format!("unknown status {to:?}")))?,
                seen: self.string_list(&entry, "seen")?,
                resolves: self.string_list(&entry, "resolves")?,
                reason: match self.scalar(&entry, "reason")? {
                    ScalarValue::Str(reason) => Some(reason.to_string()),
                    _ => None,
                },
                user: parse_field("transition user", &self.string(&entry, "user")?)?,
                role: role.parse().map_err(|_| DocumentError::malformed(format!("unknown role {role:?}")))?,
                device: parse_field("transition device", &self.string(&entry, "device")?)?,
                at: self.timestamp(&entry, "at")?,
            });
        }
        Ok(transitions)
    }

    /// The audit trail: every change in causal order, ties by time then
    /// hash, each with what it changed. The changes are replayed one by one
    /// into a scratch document, so each entry's values are the document's
    /// own, whatever its audit record claims.
    pub fn history(&mut self) -> Result<Vec<HistoryEntry>, DocumentError> {
        let changes = self.doc.get_changes(&[]);
        let ordered =
            crate::causal::order(&changes, Change::hash, |c| c.deps().to_vec(), |c| (c.timestamp(), c.hash()));
        let mut replay = TicketDocument::empty(self.doc.get_actor().clone());
        let mut before: Option<(Ticket, Vec<Transition>)> = None;
        let mut history = Vec::with_capacity(ordered.len());
        for change in ordered {
            let audit = parse_audit(change)?;
            replay.doc.apply_changes([change.clone()])?;
            let after = (replay.materialize()?, replay.transitions()?);
            let changes = FieldChange::between(
                before.as_ref().map(|(ticket, transitions)| (ticket, transitions.as_slice())),
                (&after.0, &after.1),
            );
            let at_utc = crate::ticket::utc_iso8601(audit.at);
            history.push(HistoryEntry { change: change.hash().to_string(), audit, at_utc, changes });
            before = Some(after);
        }
        Ok(history)
    }

    pub(super) fn check_schema(&self) -> Result<(), DocumentError> {
        match self.scalar(&ROOT, "schema")? {
            ScalarValue::Uint(found) if found <= SCHEMA_VERSION && found > 0 => Ok(()),
            ScalarValue::Uint(found) => Err(DocumentError::UnsupportedSchema { found, supported: SCHEMA_VERSION }),
            _ => Err(DocumentError::malformed("schema version is not an unsigned integer")),
        }
    }

    pub(super) fn identity(&self) -> Result<(TicketId, WardId), DocumentError> {
        Ok((parse_field("id", &self.string(&ROOT, "id")?)?, parse_field("ward", &self.string(&ROOT, "ward")?)?))
    }

    pub(super) fn object(&self, parent: &ObjId, key: &str, kind: ObjType) -> Result<ObjId, DocumentError> {
        match self.doc.get(parent, key)? {
            Some((Value::Object(found), id)) if found == kind => Ok(id),
            _ => Err(DocumentError::malformed(format!("{key} is missing or not a {kind:?}"))),
        }
    }

    pub(super) fn scalar(&self, parent: &ObjId, key: &str) -> Result<ScalarValue, DocumentError> {
        match self.doc.get(parent, key)? {
            Some((Value::Scalar(value), _)) => Ok(value.into_owned()),
            _ => Err(DocumentError::malformed(format!("{key} is missing or not a scalar"))),
        }
    }

    pub(super) fn string(&self, parent: &ObjId, key: &str) -> Result<String, DocumentError> {
        match self.scalar(parent, key)? {
            ScalarValue::Str(s) => Ok(s.to_string()),
            _ => Err(DocumentError::malformed(format!("{key} is not a string"))),
        }
    }

    pub(super) fn timestamp(&self, parent: &ObjId, key: &str) -> Result<UnixMillis, DocumentError> {
        match self.scalar(parent, key)? {
            ScalarValue::Timestamp(t) => Ok(t),
            _ => Err(DocumentError::malformed(format!("{key} is not a timestamp"))),
        }
    }

    pub(super) fn string_list(&self, parent: &ObjId, key: &str) -> Result<Vec<String>, DocumentError> {
        let list = self.object(parent, key, ObjType::List)?;
        (0..self.doc.length(&list))
            .map(|i| match self.doc.get(&list, i)? {
                Some((Value::Scalar(value), _)) if value.is_str() => Ok(value.as_str().unwrap_or_default().to_owned()),
                _ => Err(DocumentError::malformed(format!("{key} holds a non-string"))),
            })
            .collect()
    }
}

pub(super) fn parse_field<T: std::str::FromStr>(field: &str, value: &str) -> Result<T, DocumentError>
where
    T::Err: std::fmt::Display,
{
    value.parse().map_err(|e| DocumentError::malformed(format!("{field}: {e}")))
}
