//! Documents written by earlier releases load, materialize and merge with
//! this build's changes. Each `fixtures/ticket-schema-N.automerge` was
//! saved by the release of document schema N, beside the ticket JSON that
//! release stored for it (`.json`): a ticket with notes from both sides, an
//! order edit, an assignee, and an open cancel-versus-dispatch conflict.
//! When the schema changes, the document of the schema before is added.
#![allow(clippy::unwrap_used)] // test code: a failure is the test failing

mod common;

use common::*;
use sync_protocol::document::{TicketDocument, TicketEdit, TransitionRequest};
use sync_protocol::supply::LineSupply;
use sync_protocol::ticket::{Limits, Status, Ticket};

const SCHEMA_1: &[u8] = include_bytes!("fixtures/ticket-schema-1.automerge");
const SCHEMA_1_STORED: &str = include_str!("fixtures/ticket-schema-1.json");

#[test]
fn a_schema_1_document_reads_as_its_release_stored_it_and_more() {
    let mut document = TicketDocument::load(SCHEMA_1, replica(3)).unwrap();
    let ticket = document.ticket().unwrap();
    // What that release stored still reads (the fields added since default to empty).
    let stored: Ticket = serde_json::from_str(SCHEMA_1_STORED).unwrap();
    assert_eq!((stored.supply.len(), stored.order_conflicts.len()), (0, 0));
    assert_eq!(stored.conflicts[0].overridden.reason, None, "that release did not show reasons");
    // This build reads the same ticket from the document, and shows more of it.
    let as_that_release_showed_it = {
        let mut t = ticket.clone();
        (t.created_at_utc, t.updated_at_utc) = Default::default();
        for c in &mut t.conflicts {
            (c.held.reason, c.overridden.reason) = (None, None);
            (c.held.at_utc, c.overridden.at_utc) = Default::default();
        }
        t
    };
    assert_eq!(as_that_release_showed_it, stored);
    assert_eq!(ticket.created_at_utc, "2025-11-24T16:00:00Z");
    assert_eq!(ticket.conflicts[0].overridden.reason.as_deref(), Some("patient transferred to ICU"));
    assert_eq!(document.history().unwrap().len(), 7, "every change of the trail, with what it did");
}

#[test]
fn a_schema_1_document_takes_and_merges_this_builds_changes() {
    let limits = Limits::default();
    let mut pharmacy = TicketDocument::load(SCHEMA_1, replica(3)).unwrap();
    let mut ward = TicketDocument::from_untrusted_changes(&pharmacy.all_changes(), &limits, replica(4)).unwrap().0;
    let conflict = pharmacy.ticket().unwrap().conflicts[0].clone();
    let resolve = TransitionRequest {
        to: Status::Dispatched,
        reason: Some("porter already on the ward".into()),
        resolves: vec![conflict.overridden.id],
    };
    pharmacy.transition(&resolve, &pharmacist(), T0 + 10_000, &limits).unwrap();
    let supply = vec![LineSupply {
        medication_code: "NACL-09".into(),
        quantity: 4,
        substitute: None,
        shortfall: None,
        reason: None,
    }];
    pharmacy
        .edit(&TicketEdit { supply: Some(supply), ..TicketEdit::default() }, &pharmacist(), T0 + 11_000, &limits)
        .unwrap();
    // The ward, on its copy of the old document, appends a note meanwhile.
    let note = TicketEdit {
        notes: Some(sync_protocol::document::NotesEdit::Append("porter at the door".into())),
        ..TicketEdit::default()
    };
    ward.edit(&note, &nurse(), T0 + 11_500, &limits).unwrap();
    sync(&mut pharmacy, &mut ward);
    sync(&mut ward, &mut pharmacy);
    let ticket = ward.ticket().unwrap();
    assert_eq!(ticket, pharmacy.ticket().unwrap());
    assert_eq!((ticket.status, ticket.open_conflicts(), ticket.supply.len()), (Status::Dispatched, 0, 1));
    assert!(ticket.notes.ends_with("porter at the door"), "{:?}", ticket.notes);
    // Saved and loaded again, the upgraded document is the same ticket.
    let reloaded = TicketDocument::load(&ward.save(), replica(5)).unwrap().ticket().unwrap();
    assert_eq!(reloaded, ticket);
}
