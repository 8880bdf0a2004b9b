//! A ward and the pharmacy edit the same ticket while cut off from each
//! other, then merge. Shows the merged ticket, the conflict kept for a
//! person, its resolution, and the audit trail.
//!
//! `cargo run -p sync-protocol --example offline_ward_and_pharmacy`

use automerge::ActorId;
use sync_protocol::document::{NotesEdit, TicketDocument, TicketEdit, TransitionRequest};
use sync_protocol::ids::{Role, TicketId};
use sync_protocol::ticket::{Actor, Limits, LineItem, NewTicket, Priority, Status, Ticket, Unit};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let limits = Limits::default();
    let now = 1_764_000_000_000;
    let nurse =
        Actor { user: "n.okafor".parse()?, role: Role::Nurse, device: "edge-ward-4b".parse()?, offline_login: false };
    let pharmacist = Actor {
        user: "p.lindqvist".parse()?,
        role: Role::Pharmacist,
        device: "bridge-1".parse()?,
        offline_login: false,
    };

    let request = NewTicket {
        items: vec![LineItem {
            medication_code: "AMOX-500".into(),
            description: "Amoxicillin 500 mg".into(),
            quantity: 20,
            unit: Unit::Capsule,
        }],
        priority: Priority::Urgent,
        notes: "Bed 12.".into(),
    };
    let mut ward = TicketDocument::create(
        TicketId::new(now, [7; 10]),
        &"ward-4b".parse()?,
        &request,
        &nurse,
        now,
        &limits,
        ActorId::random(),
    )?
    .document;
    let (mut pharmacy, _) = TicketDocument::from_untrusted_changes(&ward.all_changes(), &limits, ActorId::random())?;

    println!("-- the link drops; both sides keep working --");
    let allergy = TicketEdit { notes: Some(NotesEdit::Append("ALLERGY: PENICILLIN".into())), ..TicketEdit::default() };
    ward.edit(&allergy, &nurse, now + 1_000, &limits)?;
    ward.transition(
        &TransitionRequest { to: Status::Cancelled, reason: Some("patient discharged".into()), resolves: vec![] },
        &nurse,
        now + 2_000,
        &limits,
    )?;
    pharmacy.edit(
        &TicketEdit { notes: Some(NotesEdit::Replace("Bed 12. Generic substituted.".into())), ..TicketEdit::default() },
        &pharmacist,
        now + 1_500,
        &limits,
    )?;
    for to in [Status::Acknowledged, Status::Picking, Status::Dispatched] {
        pharmacy.transition(
            &TransitionRequest { to, reason: None, resolves: vec![] },
            &pharmacist,
            now + 1_600,
            &limits,
        )?;
    }

    println!("-- the link returns; each side applies the other's changes --");
    ward.apply_untrusted(&pharmacy.all_changes(), &limits)?;
    pharmacy.apply_untrusted(&ward.all_changes(), &limits)?;
    let merged = ward.ticket()?;
    assert_eq!(merged, pharmacy.ticket()?, "replicas converge");
    show(&merged);

    println!("-- the pharmacy recalls the porter and accepts the cancel --");
    let conflict = merged.conflicts.first().ok_or("expected a conflict")?;
    let resolve = TransitionRequest {
        to: Status::Cancelled,
        reason: Some("recalled from porter".into()),
        resolves: vec![conflict.overridden.id.clone()],
    };
    pharmacy.transition(&resolve, &pharmacist, now + 60_000, &limits)?;
    ward.apply_untrusted(&pharmacy.all_changes(), &limits)?;
    show(&ward.ticket()?);

    println!("-- audit trail --");
    for entry in ward.history()? {
        let a = &entry.audit;
        println!("{}  {:<11} {:<10} on {:<12} {:?}", a.at, a.actor.user, a.actor.role, a.actor.device, a.action);
    }
    Ok(())
}

fn show(ticket: &Ticket) {
    println!("status: {}  reason: {:?}", ticket.status, ticket.status_reason);
    println!("notes:  {:?}", ticket.notes);
    for c in &ticket.conflicts {
        println!(
            "conflict: {} by {} (held) vs {} by {} (not applied)",
            c.held.to, c.held.user, c.overridden.to, c.overridden.user
        );
    }
}
