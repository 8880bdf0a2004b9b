//! Changes from a peer are untrusted bytes too: applying any of them to a
//! ticket must succeed or fail cleanly, and a failure must leave the
//! document as it was.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sync_protocol::document::TicketDocument;
use sync_protocol::ids::{Role, TicketId};
use sync_protocol::ticket::{Actor, Limits, LineItem, NewTicket, Priority, Unit};

fuzz_target!(|change: &[u8]| {
    let limits = Limits::default();
    let actor = Actor {
        user: "n.okafor".parse().unwrap(),
        role: Role::Nurse,
        device: "edge-ward-4b".parse().unwrap(),
        offline_login: false,
    };
    let new = NewTicket {
        items: vec![LineItem { medication_code: "AMOX-500".into(), description: String::new(), quantity: 1, unit: Unit::Tablet }],
        priority: Priority::Routine,
        notes: String::new(),
    };
    let replica = automerge::ActorId::from(&[1u8; 16][..]);
    let ward = "ward-4b".parse().unwrap();
    let mut doc = TicketDocument::create(TicketId::new(0, [0; 10]), &ward, &new, &actor, 0, &limits, replica).unwrap().document;
    let before = doc.save();
    if doc.apply_untrusted(&[change.to_vec()], &limits).is_err() {
        assert_eq!(doc.save(), before);
    }
});
