//! The merge cases the product promises, by name.
#![allow(clippy::unwrap_used)] // test helpers: a failure is the test failing

mod common;

use common::*;
use sync_protocol::document::{AuditAction, NotesEdit, SCHEMA_VERSION, TicketDocument, TicketEdit, TransitionRequest};
use sync_protocol::ticket::{Limits, Status};

fn transition(to: Status) -> TransitionRequest {
    TransitionRequest { to, reason: None, resolves: vec![] }
}

#[test]
fn offline_allergy_note_and_pharmacy_note_edit_both_survive() {
    let limits = Limits::default();
    let (mut ward, _) = created("Patient in bed 12.");
    let mut pharmacy = fork(&mut ward, 2);

    // Both offline: the nurse appends an allergy, the pharmacy rewrites the same notes.
    let append = TicketEdit { notes: Some(NotesEdit::Append("ALLERGY: PENICILLIN".into())), ..TicketEdit::default() };
    ward.edit(&append, &nurse(), T0 + 1_000, &limits).unwrap();
    let rewrite = TicketEdit {
        notes: Some(NotesEdit::Replace("Patient in bed 14. Substitute generic if out of stock.".into())),
        ..TicketEdit::default()
    };
    pharmacy.edit(&rewrite, &pharmacist(), T0 + 1_500, &limits).unwrap();

    sync(&mut ward, &mut pharmacy);
    sync(&mut pharmacy, &mut ward);

    let (on_ward, in_pharmacy) = (ward.ticket().unwrap(), pharmacy.ticket().unwrap());
    assert_eq!(on_ward, in_pharmacy);
    assert!(on_ward.notes.contains("ALLERGY: PENICILLIN"), "{:?}", on_ward.notes);
    assert!(on_ward.notes.contains("Substitute generic if out of stock."), "{:?}", on_ward.notes);
    assert!(on_ward.notes.contains("bed 14"), "{:?}", on_ward.notes);
}

#[test]
fn ward_cancel_while_pharmacy_dispatches_is_one_conflict_until_resolved() {
    let limits = Limits::default();
    let (mut ward, _) = created("");
    let mut pharmacy = fork(&mut ward, 2);

    for (step, to) in [Status::Acknowledged, Status::Picking, Status::Dispatched].into_iter().enumerate() {
        pharmacy.transition(&transition(to), &pharmacist(), T0 + 10_000 + step as i64, &limits).unwrap();
    }
    // The ward, offline and later by the clock, cancels what it last saw as requested.
    ward.transition(&transition(Status::Cancelled), &nurse(), T0 + 20_000, &limits).unwrap();

    sync(&mut ward, &mut pharmacy);
    sync(&mut pharmacy, &mut ward);

    let (on_ward, in_pharmacy) = (ward.ticket().unwrap(), pharmacy.ticket().unwrap());
    assert_eq!(on_ward, in_pharmacy);
    assert_eq!(on_ward.status, Status::Dispatched, "the goods are moving; the cancel is kept as a conflict");
    assert_eq!(on_ward.conflicts.len(), 1);
    let conflict = &on_ward.conflicts[0];
    assert_eq!((conflict.held.to, conflict.overridden.to), (Status::Dispatched, Status::Cancelled));
    assert_eq!(conflict.overridden.user, nurse().user);
    assert_eq!(conflict.held.user, pharmacist().user);

    // The pharmacy recalls the delivery and accepts the cancel.
    let resolve = TransitionRequest {
        to: Status::Cancelled,
        reason: Some("recalled from porter".into()),
        resolves: vec![conflict.overridden.id.clone()],
    };
    pharmacy.transition(&resolve, &pharmacist(), T0 + 30_000, &limits).unwrap();
    sync(&mut pharmacy, &mut ward);

    let resolved = ward.ticket().unwrap();
    assert_eq!(resolved, pharmacy.ticket().unwrap());
    assert_eq!(resolved.status, Status::Cancelled);
    assert!(resolved.conflicts.is_empty());
    assert_eq!(resolved.status_reason.as_deref(), Some("recalled from porter"));
}

#[test]
fn concurrent_edits_to_different_fields_both_survive() {
    let limits = Limits::default();
    let (mut ward, _) = created("");
    let mut pharmacy = fork(&mut ward, 2);

    let mut items = ward.ticket().unwrap().items;
    items[0].quantity = 30;
    ward.edit(&TicketEdit { items: Some(items), ..TicketEdit::default() }, &nurse(), T0 + 1, &limits).unwrap();
    let assign = TicketEdit { assignee: Some(Some("p.lindqvist".parse().unwrap())), ..TicketEdit::default() };
    pharmacy.edit(&assign, &pharmacist(), T0 + 2, &limits).unwrap();

    sync(&mut ward, &mut pharmacy);
    sync(&mut pharmacy, &mut ward);
    let ticket = ward.ticket().unwrap();
    assert_eq!(ticket, pharmacy.ticket().unwrap());
    assert_eq!(ticket.items[0].quantity, 30);
    assert_eq!(ticket.assignee.as_ref().map(|u| u.as_str()), Some("p.lindqvist"));
    assert_eq!(ticket.updated_at, T0 + 2);
}

#[test]
fn history_lists_who_did_what_from_where_in_order() {
    let limits = Limits::default();
    let (mut doc, _) = created("");
    doc.transition(&transition(Status::Acknowledged), &pharmacist(), T0 + 5, &limits).unwrap();
    let history = doc.history().unwrap();
    assert_eq!(history.len(), 2);
    assert_eq!(history[0].audit.action, AuditAction::Create);
    assert_eq!(history[0].audit.actor, nurse());
    assert_eq!(history[1].audit.action, AuditAction::Transition { to: Status::Acknowledged });
    assert_eq!(history[1].audit.actor.device.as_str(), "bridge-1");
    assert_eq!(history[1].audit.at, T0 + 5);
}

/// The conflict of a cancel and a dispatch carries both sides' reasons; a
/// resolution must say why; the trail shows each change's values.
#[test]
fn conflicts_and_the_trail_say_why_and_what() {
    let limits = Limits::default();
    let (mut ward, _) = created("Bed 4.");
    let mut pharmacy = fork(&mut ward, 2);
    pharmacy.transition(&transition(Status::Acknowledged), &pharmacist(), T0 + 5, &limits).unwrap();
    let dispatch = TransitionRequest { reason: Some("porter 7 on the way".into()), ..transition(Status::Dispatched) };
    pharmacy.transition(&dispatch, &pharmacist(), T0 + 10, &limits).unwrap();
    let cancel =
        TransitionRequest { reason: Some("patient transferred to ICU".into()), ..transition(Status::Cancelled) };
    ward.transition(&cancel, &nurse(), T0 + 20, &limits).unwrap();
    let append = TicketEdit { notes: Some(NotesEdit::Append("ALLERGY: PENICILLIN".into())), ..TicketEdit::default() };
    ward.edit(&append, &nurse(), T0 + 30, &limits).unwrap();
    sync(&mut ward, &mut pharmacy);

    let ticket = pharmacy.ticket().unwrap();
    let conflict = &ticket.conflicts[0];
    assert_eq!(conflict.held.reason.as_deref(), Some("porter 7 on the way"));
    assert_eq!(conflict.overridden.reason.as_deref(), Some("patient transferred to ICU"));
    let mut resolve =
        TransitionRequest { resolves: vec![conflict.overridden.id.clone()], ..transition(Status::Cancelled) };
    let err = pharmacy.transition(&resolve, &pharmacist(), T0 + 40, &limits).unwrap_err();
    assert!(err.to_string().contains("needs a reason"), "{err}");
    resolve.reason = Some("porter recalled".into());
    pharmacy.transition(&resolve, &pharmacist(), T0 + 40, &limits).unwrap();

    let history = pharmacy.history().unwrap();
    let fields: Vec<serde_json::Value> =
        history.iter().map(|entry| serde_json::to_value(&entry.changes).unwrap()).collect();
    assert_eq!(fields[0], serde_json::json!([]), "the creation is the ticket itself");
    let find = |field: &str| {
        fields.iter().flat_map(|f| f.as_array().unwrap()).filter(|c| c["field"] == field).cloned().collect::<Vec<_>>()
    };
    let notes = find("notes");
    assert_eq!(notes, [serde_json::json!({ "field": "notes", "removed": "", "inserted": "\nALLERGY: PENICILLIN" })]);
    let transitions = find("transition");
    assert_eq!(transitions.len(), 4, "{transitions:?}");
    let reasons: Vec<(&str, &str)> =
        transitions.iter().filter_map(|t| Some((t["to"].as_str()?, t["reason"].as_str()?))).collect();
    assert_eq!(reasons.len(), 3, "{transitions:?}");
    for expected in [
        ("dispatched", "porter 7 on the way"),
        ("cancelled", "patient transferred to ICU"),
        ("cancelled", "porter recalled"),
    ] {
        assert!(reasons.contains(&expected), "{expected:?} in {reasons:?}");
    }
    assert_eq!(transitions.iter().filter(|t| t["resolves"] != serde_json::json!([])).count(), 1);
}

#[test]
fn the_trail_shows_old_and_new_values_of_an_edit() {
    let limits = Limits::default();
    let (mut doc, _) = created("Bed 4, post-op.");
    let mut items = doc.ticket().unwrap().items;
    items[0].quantity = 40;
    items.pop();
    let edit = TicketEdit {
        items: Some(items),
        priority: Some(sync_protocol::ticket::Priority::Stat),
        notes: Some(NotesEdit::Replace("Bed 6, post-op.".into())),
        ..TicketEdit::default()
    };
    doc.edit(&edit, &nurse(), T0 + 5, &limits).unwrap();
    let entry = serde_json::to_value(&doc.history().unwrap()[1]).unwrap();
    assert_eq!(entry["action"], serde_json::json!({ "kind": "edit", "fields": ["items", "priority", "notes"] }));
    assert_eq!(
        entry["changes"],
        serde_json::json!([
            { "field": "priority", "old": "urgent", "new": "stat" },
            { "field": "item", "medication_code": "AMOX-500",
              "old": { "medication_code": "AMOX-500", "description": "Amoxicillin 500 mg", "quantity": 20, "unit": "capsule" },
              "new": { "medication_code": "AMOX-500", "description": "Amoxicillin 500 mg", "quantity": 40, "unit": "capsule" } },
            { "field": "item", "medication_code": "NACL-09",
              "old": { "medication_code": "NACL-09", "description": "Saline 0.9% 1 L", "quantity": 4, "unit": "bag" },
              "new": null },
            { "field": "notes", "removed": "4", "inserted": "6" },
        ])
    );
}

/// The ward doubles a quantity offline while the pharmacy starts picking:
/// the edit is kept and shown, not applied silently, until a person
/// accepts the order as it stands, with a reason.
#[test]
fn an_offline_order_edit_concurrent_with_picking_is_one_conflict_until_resolved() {
    let limits = Limits::default();
    let (mut ward, _) = created("");
    let mut pharmacy = fork(&mut ward, 2);
    pharmacy.transition(&transition(Status::Acknowledged), &pharmacist(), T0 + 10, &limits).unwrap();
    sync(&mut pharmacy, &mut ward);
    let pick = TransitionRequest { reason: Some("bench 2".into()), ..transition(Status::Picking) };
    pharmacy.transition(&pick, &pharmacist(), T0 + 20, &limits).unwrap();
    let mut items = ward.ticket().unwrap().items;
    items[0].quantity = 40;
    let edit =
        TicketEdit { items: Some(items), reason: Some("dose doubled by Dr Berg".into()), ..TicketEdit::default() };
    ward.edit(&edit, &nurse(), T0 + 30, &limits).unwrap();

    sync(&mut ward, &mut pharmacy);
    sync(&mut pharmacy, &mut ward);
    let (on_ward, in_pharmacy) = (ward.ticket().unwrap(), pharmacy.ticket().unwrap());
    assert_eq!(on_ward, in_pharmacy);
    assert_eq!((on_ward.status, on_ward.items[0].quantity), (Status::Picking, 40), "kept, not lost");
    assert_eq!(on_ward.order_conflicts.len(), 1, "{on_ward:?}");
    let conflict = &on_ward.order_conflicts[0];
    assert_eq!(
        (conflict.edit.user.as_str(), conflict.edit.fields.as_slice()),
        ("n.okafor", &["items".to_string()][..])
    );
    assert_eq!(conflict.edit.reason.as_deref(), Some("dose doubled by Dr Berg"));
    assert_eq!((conflict.progress.to, conflict.progress.reason.as_deref()), (Status::Picking, Some("bench 2")));

    // Settled by accepting the order as it stands; any other outcome, or no reason, is refused.
    let mut resolve =
        TransitionRequest { resolves: vec![conflict.edit.change.clone()], ..transition(Status::Dispatched) };
    resolve.reason = Some("re-picked 40".into());
    let err = pharmacy.transition(&resolve, &pharmacist(), T0 + 40, &limits).unwrap_err();
    assert!(err.to_string().contains("picking"), "{err}");
    resolve.to = Status::Picking;
    pharmacy.transition(&resolve, &pharmacist(), T0 + 40, &limits).unwrap();
    sync(&mut pharmacy, &mut ward);
    let resolved = ward.ticket().unwrap();
    assert_eq!(resolved, pharmacy.ticket().unwrap());
    assert_eq!((resolved.status, resolved.order_conflicts.len()), (Status::Picking, 0));
}

/// An edit the pharmacy had seen before it started picking is no conflict,
/// and neither is an edit of the notes made while it picks.
#[test]
fn order_edits_seen_before_picking_and_notes_during_it_are_no_conflict() {
    let limits = Limits::default();
    let (mut ward, _) = created("");
    let mut items = ward.ticket().unwrap().items;
    items[0].quantity = 30;
    ward.edit(&TicketEdit { items: Some(items), ..TicketEdit::default() }, &nurse(), T0 + 5, &limits).unwrap();
    let mut pharmacy = fork(&mut ward, 2);
    pharmacy.transition(&transition(Status::Picking), &pharmacist(), T0 + 20, &limits).unwrap();
    let append = TicketEdit { notes: Some(NotesEdit::Append("on the way up?".into())), ..TicketEdit::default() };
    ward.edit(&append, &nurse(), T0 + 30, &limits).unwrap();
    sync(&mut ward, &mut pharmacy);
    sync(&mut pharmacy, &mut ward);
    let ticket = ward.ticket().unwrap();
    assert_eq!((ticket.status, ticket.open_conflicts()), (Status::Picking, 0));
}

/// The pharmacy supplies a substitute for one line and part of another
/// (the rest backordered); the ward receives one line short with a note,
/// the other from a scanned pack; later the backorder is filled. Both
/// replicas show the same ticket throughout and the trail has every step.
#[test]
fn partial_supply_with_a_substitute_and_a_backorder_then_receipt() {
    use sync_protocol::supply::{Discrepancy, LineSupply, ReceiptInput, Shortfall, Substitute};
    let limits = Limits::default();
    let (mut ward, _) = created("");
    let mut pharmacy = fork(&mut ward, 2);
    pharmacy.transition(&transition(Status::Picking), &pharmacist(), T0 + 10, &limits).unwrap();
    let substitute = Substitute {
        medication_code: "CLAR-250".into(),
        description: "Clarithromycin 250 mg".into(),
        reason: "penicillin allergy on the notes".into(),
    };
    let supply = vec![
        LineSupply {
            medication_code: "AMOX-500".into(),
            quantity: 20,
            substitute: Some(substitute),
            shortfall: None,
            reason: None,
        },
        LineSupply {
            medication_code: "NACL-09".into(),
            quantity: 2,
            substitute: None,
            shortfall: Some(Shortfall::Backorder),
            reason: None,
        },
    ];
    let nurse_supplies = TicketEdit { supply: Some(supply.clone()), ..TicketEdit::default() };
    let err = ward.edit(&nurse_supplies, &nurse(), T0 + 15, &limits).unwrap_err();
    assert!(err.to_string().contains("may not record what the pharmacy supplies"), "{err}");
    pharmacy
        .edit(&TicketEdit { supply: Some(supply), ..TicketEdit::default() }, &pharmacist(), T0 + 20, &limits)
        .unwrap();
    pharmacy.transition(&transition(Status::Dispatched), &pharmacist(), T0 + 30, &limits).unwrap();
    sync(&mut pharmacy, &mut ward);

    let receipt = vec![
        ReceiptInput {
            medication_code: "AMOX-500".into(),
            quantity: 19,
            discrepancy: Some(Discrepancy::Damaged),
            note: Some("one blister crushed".into()),
            lot: None,
            expiry: None,
            gs1: Some("]d2010950600013435217270600\u{1d}10B42\u{1d}21SN7".into()),
        },
        ReceiptInput {
            medication_code: "NACL-09".into(),
            quantity: 2,
            discrepancy: None,
            note: None,
            lot: Some("S-0912".into()),
            expiry: Some(time::macros::date!(2028 - 01 - 31)),
            gs1: None,
        },
    ];
    ward.edit(&TicketEdit { receipt: Some(receipt), ..TicketEdit::default() }, &nurse(), T0 + 40, &limits).unwrap();
    ward.transition(&transition(Status::Delivered), &nurse(), T0 + 41, &limits).unwrap();
    sync(&mut ward, &mut pharmacy);
    let ticket = pharmacy.ticket().unwrap();
    assert_eq!(ticket, ward.ticket().unwrap());
    assert_eq!(ticket.status, Status::Delivered);
    assert_eq!(ticket.supply[0].substitute.as_ref().map(|s| s.medication_code.as_str()), Some("CLAR-250"));
    let amox = &ticket.receipt[0];
    assert_eq!((amox.quantity, amox.discrepancy, amox.lot.as_deref()), (19, Some(Discrepancy::Damaged), Some("B42")));
    assert_eq!((amox.expiry, amox.serial.as_deref()), (Some(time::macros::date!(2027 - 06 - 30)), Some("SN7")));
    assert_eq!(ticket.open_backorders().map(|l| l.medication_code.as_str()).collect::<Vec<_>>(), ["NACL-09"]);

    // Delivered, the backordered line can still be filled; no other line changes.
    let fill = |code: &str, quantity| TicketEdit {
        supply: Some(vec![LineSupply {
            medication_code: code.into(),
            quantity,
            substitute: None,
            shortfall: None,
            reason: None,
        }]),
        ..TicketEdit::default()
    };
    let err = pharmacy.edit(&fill("AMOX-500", 20), &pharmacist(), T0 + 50, &limits).unwrap_err();
    assert!(err.to_string().contains("not backordered"), "{err}");
    pharmacy.edit(&fill("NACL-09", 4), &pharmacist(), T0 + 50, &limits).unwrap();
    sync(&mut pharmacy, &mut ward);
    let ticket = ward.ticket().unwrap();
    assert_eq!(ticket, pharmacy.ticket().unwrap());
    assert_eq!(ticket.open_backorders().count(), 0);
    let fields: Vec<String> = ward
        .history()
        .unwrap()
        .iter()
        .flat_map(|entry| {
            entry.changes.iter().map(|c| serde_json::to_value(c).unwrap()["field"].as_str().unwrap().to_owned())
        })
        .collect();
    let count = |field: &str| fields.iter().filter(|f| *f == field).count();
    assert_eq!((count("supply"), count("receipt")), (3, 2), "{fields:?}");
}

#[test]
fn rules_are_checked_when_writing() {
    let limits = Limits::default();
    let (mut doc, _) = created("");
    let before = doc.save();
    let err = doc.transition(&transition(Status::Acknowledged), &nurse(), T0, &limits).unwrap_err();
    assert!(err.to_string().contains("may not move"), "{err}");
    let reject = transition(Status::Rejected);
    let err = doc.transition(&reject, &pharmacist(), T0, &limits).unwrap_err();
    assert!(err.to_string().contains("needs a reason"), "{err}");
    let err = doc.edit(&TicketEdit::default(), &nurse(), T0, &limits).unwrap_err();
    assert!(err.to_string().contains("changes nothing"), "{err}");
    assert_eq!(doc.save(), before, "refused writes leave the document unchanged");
}

/// Writes a change with raw Automerge, bypassing the domain checks, as a
/// buggy or hostile peer could. `entry_role` goes in the transition entry,
/// `audit` is the commit message (None: no audit record at all).
fn forge(doc: &mut TicketDocument, write: impl FnOnce(&mut automerge::AutoCommit), audit: Option<String>) -> Vec<u8> {
    use automerge::transaction::CommitOptions;
    let mut raw = automerge::AutoCommit::load(&doc.save()).unwrap().with_actor(replica(66));
    write(&mut raw);
    let options = CommitOptions::default();
    raw.commit_with(match audit {
        Some(message) => options.with_message(message),
        None => options,
    });
    raw.get_last_local_change().unwrap().raw_bytes().to_vec()
}

fn forged_transition(raw: &mut automerge::AutoCommit, to: &str, role: &str) {
    use automerge::transaction::Transactable;
    use automerge::{ObjType, ROOT, ReadDoc, ScalarValue};
    let (_, list) = raw.get(ROOT, "transitions").unwrap().unwrap();
    let entry = raw.insert_object(&list, raw.length(&list), ObjType::Map).unwrap();
    for (key, value) in [("to", to), ("user", "n.okafor"), ("role", role), ("device", "edge-ward-4b")] {
        raw.put(&entry, key, value).unwrap();
    }
    raw.put(&entry, "at", ScalarValue::Timestamp(T0 + 1)).unwrap();
    raw.put(&entry, "reason", ScalarValue::Null).unwrap();
    raw.put_object(&entry, "seen", ObjType::List).unwrap();
    raw.put_object(&entry, "resolves", ObjType::List).unwrap();
}

fn audit(role: &str, action: &str) -> Option<String> {
    Some(format!(r#"{{"user":"n.okafor","role":"{role}","device":"edge-ward-4b","at":{},"action":{action}}}"#, T0 + 1))
}

#[test]
fn changes_that_break_the_rules_are_refused_by_a_receiving_replica() {
    use automerge::transaction::Transactable;
    let limits = Limits::default();
    let (mut doc, _) = created("");
    let mut receiver = fork(&mut doc, 2);
    let before = receiver.save();
    let acknowledge = r#"{"kind":"transition","to":"acknowledged"}"#;
    let cases = [
        (
            "a nurse acknowledging",
            forge(&mut doc, |raw| forged_transition(raw, "acknowledged", "nurse"), audit("nurse", acknowledge)),
        ),
        (
            "entry and audit disagree on the role",
            forge(&mut doc, |raw| forged_transition(raw, "acknowledged", "pharmacist"), audit("nurse", acknowledge)),
        ),
        ("no audit record", forge(&mut doc, |raw| forged_transition(raw, "cancelled", "nurse"), None)),
        (
            "the ward rewritten",
            forge(
                &mut doc,
                |raw| raw.put(automerge::ROOT, "ward", "icu-2").unwrap(),
                audit("nurse", r#"{"kind":"edit","fields":["notes"]}"#),
            ),
        ),
        (
            "an undeclared edit",
            forge(
                &mut doc,
                |raw| raw.put(automerge::ROOT, "priority", "stat").unwrap(),
                audit("nurse", r#"{"kind":"edit","fields":["notes"]}"#),
            ),
        ),
        (
            "a pharmacist editing the order",
            forge(
                &mut doc,
                |raw| raw.put(automerge::ROOT, "priority", "stat").unwrap(),
                audit("pharmacist", r#"{"kind":"edit","fields":["priority"]}"#),
            ),
        ),
    ];
    for (case, change) in cases {
        assert!(receiver.apply_untrusted(&[change], &limits).is_err(), "{case} was accepted");
        assert_eq!(receiver.save(), before, "{case} left a trace");
    }
    // The same shape, done within the rules, is accepted.
    let legal = forge(
        &mut doc,
        |raw| forged_transition(raw, "cancelled", "nurse"),
        audit("nurse", r#"{"kind":"transition","to":"cancelled"}"#),
    );
    receiver.apply_untrusted(&[legal], &limits).unwrap();
    assert_eq!(receiver.ticket().unwrap().status, Status::Cancelled);
}

#[test]
fn garbage_and_unaudited_changes_are_refused_without_harm() {
    let limits = Limits::default();
    let (mut doc, _) = created("");
    let before = doc.save();
    assert!(doc.apply_untrusted(&[vec![1, 2, 3]], &limits).is_err());
    assert_eq!(doc.save(), before);
}

#[test]
fn documents_from_a_newer_schema_are_refused() {
    use automerge::transaction::Transactable;
    let (mut doc, _) = created("");
    let mut raw = automerge::AutoCommit::load(&doc.save()).unwrap();
    raw.put(automerge::ROOT, "schema", SCHEMA_VERSION + 1).unwrap();
    let err = TicketDocument::load(&raw.save(), replica(9)).unwrap_err();
    let expected = format!("schema version {}; this build reads versions up to {SCHEMA_VERSION}", SCHEMA_VERSION + 1);
    assert!(err.to_string().contains(&expected), "{err}");
}
