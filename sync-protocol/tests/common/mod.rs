//! Helpers shared by the integration tests: actors, replicas and a ticket.
#![allow(dead_code, clippy::unwrap_used)] // test helpers: a failure is the test failing

use automerge::ActorId;
use sync_protocol::document::TicketDocument;
use sync_protocol::ids::{Role, TicketId, WardId};
use sync_protocol::ticket::{Actor, Limits, LineItem, NewTicket, Priority, Unit};

pub const T0: i64 = 1_764_000_000_000;

pub fn actor(user: &str, role: Role, device: &str) -> Actor {
    Actor { user: user.parse().unwrap(), role, device: device.parse().unwrap(), offline_login: false }
}

pub fn nurse() -> Actor {
    actor("n.okafor", Role::Nurse, "edge-ward-4b")
}

pub fn pharmacist() -> Actor {
    actor("p.lindqvist", Role::Pharmacist, "bridge-1")
}

pub fn replica(n: u8) -> ActorId {
    ActorId::from(&[n; 16][..])
}

pub fn new_ticket(notes: &str) -> NewTicket {
    NewTicket {
        items: vec![
            LineItem {
                medication_code: "AMOX-500".into(),
                description: "Amoxicillin 500 mg".into(),
                quantity: 20,
                unit: Unit::Capsule,
            },
            LineItem {
                medication_code: "NACL-09".into(),
                description: "Saline 0.9% 1 L".into(),
                quantity: 4,
                unit: Unit::Bag,
            },
        ],
        priority: Priority::Urgent,
        notes: notes.into(),
    }
}

/// A ticket created by the ward's nurse on replica 1.
pub fn created(notes: &str) -> (TicketDocument, Vec<u8>) {
    let ward: WardId = "ward-4b".parse().unwrap();
    let mut created = TicketDocument::create(
        TicketId::new(T0, [7; 10]),
        &ward,
        &new_ticket(notes),
        &nurse(),
        T0,
        &Limits::default(),
        replica(1),
    )
    .unwrap();
    assert_eq!(
        Some(&created.ticket),
        created.document.ticket().ok().as_ref(),
        "create materializes what the document holds"
    );
    (created.document, created.change)
}

/// A second replica holding the same changes as `doc`.
pub fn fork(doc: &mut TicketDocument, n: u8) -> TicketDocument {
    TicketDocument::from_untrusted_changes(&doc.all_changes(), &Limits::default(), replica(n)).unwrap().0
}

/// Sends every change of `from` to `to`.
pub fn sync(from: &mut TicketDocument, to: &mut TicketDocument) {
    to.apply_untrusted(&from.all_changes(), &Limits::default()).unwrap();
}
