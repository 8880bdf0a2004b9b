//! Property tests: merge laws of ticket documents and the wire codec.
#![allow(clippy::unwrap_used)] // test helpers: a failure is the test failing

mod common;

use common::*;
use proptest::prelude::*;
use sync_protocol::document::{NotesEdit, TicketDocument, TicketEdit, TransitionRequest};
use sync_protocol::gs1;
use sync_protocol::ids::{Role, TicketId};
use sync_protocol::ticket::{Limits, Priority, Status, Ticket};
use sync_protocol::wire::{
    self, Cursor, DatabaseId, DownstreamChange, ErrorCode, Hello, Lease, Message, TicketSnapshot, UpstreamChange,
    Welcome, WireLimits,
};

/// One thing a replica does while offline, or a sync between two replicas.
#[derive(Debug, Clone)]
enum Op {
    AppendNote {
        replica: usize,
        text: String,
    },
    ReplaceNote {
        replica: usize,
        text: String,
    },
    Quantity {
        replica: usize,
        quantity: u32,
    },
    Priority {
        replica: usize,
        priority: Priority,
    },
    Assign {
        replica: usize,
        user: u8,
    },
    Transition {
        replica: usize,
        to: Status,
        role: Role,
    },
    /// Resolve the first open conflict, choosing its `held` side or not.
    Resolve {
        replica: usize,
        keep_held: bool,
    },
    Sync {
        from: usize,
        to: usize,
    },
}

const REPLICAS: usize = 4;

fn op() -> impl Strategy<Value = Op> {
    let replica = 0..REPLICAS;
    let status = prop::sample::select(Status::ALL.to_vec());
    let role = prop::sample::select(vec![Role::Nurse, Role::Pharmacist, Role::Admin]);
    let priority = prop::sample::select(Priority::ALL.to_vec());
    prop_oneof![
        1 => (replica.clone(), "[a-z ]{1,12}").prop_map(|(replica, text)| Op::AppendNote { replica, text }),
        1 => (replica.clone(), "[a-z ]{0,12}").prop_map(|(replica, text)| Op::ReplaceNote { replica, text }),
        1 => (replica.clone(), 1..50u32).prop_map(|(replica, quantity)| Op::Quantity { replica, quantity }),
        1 => (replica.clone(), priority).prop_map(|(replica, priority)| Op::Priority { replica, priority }),
        1 => (replica.clone(), 0..3u8).prop_map(|(replica, user)| Op::Assign { replica, user }),
        4 => (replica.clone(), status, role).prop_map(|(replica, to, role)| Op::Transition { replica, to, role }),
        1 => (replica.clone(), any::<bool>()).prop_map(|(replica, keep_held)| Op::Resolve { replica, keep_held }),
        2 => (0..REPLICAS, 0..REPLICAS).prop_map(|(from, to)| Op::Sync { from, to }),
    ]
}

fn actor_for(replica: usize, role: Role) -> sync_protocol::ticket::Actor {
    actor(&format!("user-{replica}"), role, &format!("node-{replica}"))
}

/// Runs the ops; writes the rules refuse are skipped, as a device would be told no.
/// Without `resolutions`, `Op::Resolve` does nothing.
fn run(ops: &[Op], resolutions: bool) -> Vec<TicketDocument> {
    let limits = Limits::default();
    let (mut origin, _) = created("start");
    let mut replicas: Vec<TicketDocument> = (0..REPLICAS).map(|i| fork(&mut origin, i as u8 + 10)).collect();
    for (step, op) in ops.iter().enumerate() {
        let now = T0 + 1_000 + step as i64;
        let edit = |replica: &mut TicketDocument, role: Role, edit: TicketEdit, i: usize| {
            let _ = replica.edit(&edit, &actor_for(i, role), now, &limits);
        };
        match op.clone() {
            Op::AppendNote { replica, text } => {
                let e = TicketEdit { notes: Some(NotesEdit::Append(text)), ..TicketEdit::default() };
                edit(&mut replicas[replica], Role::Nurse, e, replica)
            }
            Op::ReplaceNote { replica, text } => {
                let e = TicketEdit { notes: Some(NotesEdit::Replace(text)), ..TicketEdit::default() };
                edit(&mut replicas[replica], Role::Pharmacist, e, replica)
            }
            Op::Quantity { replica, quantity } => {
                let mut items = replicas[replica].ticket().unwrap().items;
                items[0].quantity = quantity;
                edit(
                    &mut replicas[replica],
                    Role::Nurse,
                    TicketEdit { items: Some(items), ..TicketEdit::default() },
                    replica,
                )
            }
            Op::Priority { replica, priority } => edit(
                &mut replicas[replica],
                Role::Nurse,
                TicketEdit { priority: Some(priority), ..TicketEdit::default() },
                replica,
            ),
            Op::Assign { replica, user } => {
                let e = TicketEdit {
                    assignee: Some(Some(format!("pharm-{user}").parse().unwrap())),
                    ..TicketEdit::default()
                };
                edit(&mut replicas[replica], Role::Pharmacist, e, replica)
            }
            Op::Transition { replica, to, role } => {
                let request = TransitionRequest { to, reason: Some("because".into()), resolves: vec![] };
                let _ = replicas[replica].transition(&request, &actor_for(replica, role), now, &limits);
            }
            Op::Resolve { .. } if !resolutions => {}
            Op::Resolve { replica, keep_held } => {
                let ticket = replicas[replica].ticket().unwrap();
                let request = if let Some(conflict) = ticket.conflicts.first() {
                    let side = if keep_held { &conflict.held } else { &conflict.overridden };
                    Some((side.to, conflict.overridden.id.clone()))
                } else {
                    // An order conflict is settled by accepting the order as it stands.
                    ticket.order_conflicts.first().map(|conflict| (ticket.status, conflict.edit.change.clone()))
                };
                if let Some((to, id)) = request {
                    let request = TransitionRequest { to, reason: Some("resolved".into()), resolves: vec![id] };
                    replicas[replica].transition(&request, &actor_for(replica, Role::Admin), now, &limits).unwrap();
                }
            }
            Op::Sync { from, to } if from != to => {
                let changes = replicas[from].all_changes();
                replicas[to].apply_untrusted(&changes, &limits).unwrap();
            }
            Op::Sync { .. } => {}
        }
    }
    replicas
}

/// Delivers `changes` one at a time in the given order; a change whose
/// dependencies have not arrived is refused and delivered again later, as a
/// network retry would.
fn deliver(doc: &mut TicketDocument, changes: &[Vec<u8>]) {
    let limits = Limits::default();
    let mut pending: Vec<&Vec<u8>> = changes.iter().collect();
    while !pending.is_empty() {
        let before = pending.len();
        pending.retain(|change| doc.apply_untrusted(&[(*change).clone()], &limits).is_err());
        assert!(pending.len() < before, "no change could be applied: {} left", pending.len());
    }
}

fn all_changes(replicas: &mut [TicketDocument]) -> Vec<Vec<u8>> {
    replicas.iter_mut().flat_map(|r| r.all_changes()).collect()
}

fn status_progress(ticket: &Ticket) -> Option<u8> {
    ticket.status.progress_rank()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    /// Convergence: whatever the replicas did offline, delivering every change
    /// to every replica in any order, with duplicates, gives one ticket.
    #[test]
    fn replicas_converge_whatever_the_delivery_order(
        ops in prop::collection::vec(op(), 1..40),
        orders in prop::collection::vec(Just(()).prop_perturb(|_, mut rng| rng.random::<u64>()), REPLICAS),
    ) {
        let mut replicas = run(&ops, true);
        let mut changes = all_changes(&mut replicas);
        let duplicates: Vec<Vec<u8>> = changes.iter().step_by(3).cloned().collect();
        changes.extend(duplicates);
        for (replica, seed) in replicas.iter_mut().zip(orders) {
            let mut shuffled = changes.clone();
            shuffle(&mut shuffled, seed);
            deliver(replica, &shuffled);
        }
        let first = replicas[0].ticket().unwrap();
        for replica in &mut replicas[1..] {
            prop_assert_eq!(&replica.ticket().unwrap(), &first);
        }
    }

    /// Commutative and idempotent: A+B equals B+A, and merging again changes nothing.
    #[test]
    fn merging_is_commutative_and_idempotent(ops in prop::collection::vec(op(), 1..30)) {
        let limits = Limits::default();
        let mut replicas = run(&ops, true);
        let (a_changes, b_changes) = (replicas[0].all_changes(), replicas[1].all_changes());
        let mut ab = replicas[0].clone();
        ab.apply_untrusted(&b_changes, &limits).unwrap();
        let mut ba = replicas[1].clone();
        ba.apply_untrusted(&a_changes, &limits).unwrap();
        prop_assert_eq!(ab.ticket().unwrap(), ba.ticket().unwrap());
        let heads = ab.heads();
        let again = ab.apply_untrusted(&b_changes, &limits).unwrap();
        prop_assert!(again.is_empty());
        prop_assert_eq!(ab.heads(), heads);
    }

    /// Without resolutions, learning more never moves a ticket back along its
    /// path, and never leaves a closing transition unapplied without a conflict naming it.
    #[test]
    fn status_never_silently_regresses(ops in prop::collection::vec(op(), 1..40)) {
        let mut replicas = run(&ops, false);
        let changes = all_changes(&mut replicas);
        let limits = Limits::default();
        for replica in replicas.iter_mut() {
            let mut previous = replica.ticket().unwrap();
            for change in &changes {
                if replica.apply_untrusted(std::slice::from_ref(change), &limits).is_err() {
                    continue;
                }
                let now = replica.ticket().unwrap();
                match (status_progress(&previous), status_progress(&now)) {
                    (Some(before), Some(after)) => prop_assert!(after >= before, "{:?} -> {:?}", previous.status, now.status),
                    (None, Some(_)) => prop_assert!(
                        now.conflicts.iter().any(|c| c.overridden.to == previous.status),
                        "{:?} was replaced by {:?} without a conflict", previous.status, now.status
                    ),
                    _ => {}
                }
                previous = now;
            }
        }
    }

    #[test]
    fn frames_round_trip(message in message()) {
        let limits = WireLimits::default();
        let frame = wire::encode(&message, &limits).unwrap();
        prop_assert_eq!(wire::decode(&frame, &limits).unwrap(), message);
    }

    /// The decoder answers arbitrary bytes with a value, never a panic.
    #[test]
    fn decoding_arbitrary_bytes_never_panics(body in prop::collection::vec(any::<u8>(), 0..512), with_header in any::<bool>()) {
        let mut frame = if with_header { b"MR\0\x01".to_vec() } else { Vec::new() };
        frame.extend(body);
        let _ = wire::decode(&frame, &WireLimits::default());
    }

    /// Flipping any byte of a valid frame gives an error or another valid message, never a panic.
    #[test]
    fn corrupted_frames_never_panic(message in message(), position in any::<prop::sample::Index>(), byte in any::<u8>()) {
        let limits = WireLimits::default();
        let mut frame = wire::encode(&message, &limits).unwrap();
        let i = position.index(frame.len());
        frame[i] = byte;
        let _ = wire::decode(&frame, &limits);
    }

    /// A GS1 string from a scanner or a keyboard is untrusted: any text,
    /// and any valid label with a character changed, gives a label or an
    /// error, never a panic; a label read is one the string held.
    #[test]
    fn gs1_strings_never_panic(noise in "\\PC{0,80}", position in any::<prop::sample::Index>(), c in any::<char>()) {
        let today = time::macros::date!(2026 - 12 - 07);
        let _ = gs1::parse_label(&noise, today);
        let mut label: Vec<char> = "]d2010950600013435217270600\u{1d}10B42\u{1d}21SN7".chars().collect();
        let i = position.index(label.len());
        label[i] = c;
        let text: String = label.into_iter().collect();
        if let Ok(read) = gs1::parse_label(&text, today) {
            prop_assert!(text.contains(&read.lot) && text.contains(read.gtin.as_str()));
        }
    }
}

fn shuffle<T>(items: &mut [T], mut seed: u64) {
    for i in (1..items.len()).rev() {
        seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        items.swap(i, (seed >> 33) as usize % (i + 1));
    }
}

fn ticket_id() -> impl Strategy<Value = TicketId> {
    (0..1i64 << 47, any::<[u8; 10]>()).prop_map(|(ms, random)| TicketId::new(ms, random))
}

fn bytes(max: usize) -> impl Strategy<Value = serde_bytes::ByteBuf> {
    prop::collection::vec(any::<u8>(), 0..max).prop_map(serde_bytes::ByteBuf::from)
}

fn cursor() -> impl Strategy<Value = Cursor> {
    bytes(32).prop_map(Cursor)
}

fn message() -> impl Strategy<Value = Message> {
    let upstream = prop::collection::btree_map(any::<u64>(), (ticket_id(), bytes(64)), 0..8).prop_map(|changes| {
        Message::Upstream {
            changes: changes
                .into_iter()
                .map(|(seq, (ticket, change))| UpstreamChange { seq, ticket, change })
                .collect(),
        }
    });
    let downstream = (prop::collection::vec((ticket_id(), bytes(64)), 0..8), cursor()).prop_map(|(changes, cursor)| {
        Message::Downstream {
            changes: changes.into_iter().map(|(ticket, change)| DownstreamChange { ticket, change }).collect(),
            cursor,
        }
    });
    let snapshot = (prop::collection::vec((ticket_id(), bytes(64)), 0..4), cursor(), any::<bool>()).prop_map(
        |(tickets, cursor, last)| Message::Snapshot {
            tickets: tickets.into_iter().map(|(ticket, document)| TicketSnapshot { ticket, document }).collect(),
            cursor,
            last,
        },
    );
    let hello = (
        "[a-z0-9-]{1,20}",
        "[a-z0-9-]{1,20}",
        "[ -~]{0,100}",
        prop::option::of(cursor()),
        (1..=4_194_304usize, 1..=2_048usize),
        (any::<[u8; 16]>(), prop::option::of((any::<u64>(), any::<[u8; 16]>()))),
    )
        .prop_map(|(node, ward, token, cursor, (frame_bytes_max, changes_per_batch_max), (database, lease))| {
            Message::Hello(Hello {
                protocol_version: wire::PROTOCOL_VERSION,
                node: node.parse().unwrap(),
                ward: ward.parse().unwrap(),
                token,
                cursor,
                limits: WireLimits { frame_bytes_max, changes_per_batch_max, ..WireLimits::default() },
                database: DatabaseId(database),
                lease: lease.map(|(generation, nonce)| Lease { generation, nonce }),
            })
        });
    let welcome = (any::<i64>(), any::<u64>(), any::<[u8; 16]>()).prop_map(|(server_time, generation, nonce)| {
        Message::Welcome(Welcome {
            protocol_version: wire::PROTOCOL_VERSION,
            server_time,
            limits: WireLimits::default(),
            lease: Lease { generation, nonce },
        })
    });
    let code = prop::sample::select(vec![
        ErrorCode::Malformed,
        ErrorCode::UnexpectedMessage,
        ErrorCode::ChangeRejected,
        ErrorCode::Unavailable,
        ErrorCode::Internal,
    ]);
    prop_oneof![
        hello,
        welcome,
        upstream,
        downstream,
        snapshot,
        any::<u64>().prop_map(|up_to_seq| Message::Ack { up_to_seq }),
        any::<u64>().prop_map(|nonce| Message::Ping { nonce }),
        cursor().prop_map(|cursor| Message::DownstreamAck { cursor }),
        (any::<u64>(), ticket_id(), code.clone(), ".{0,40}")
            .prop_map(|(seq, ticket, code, message)| Message::Rejected { seq, ticket, code, message }),
        (code, ".{0,40}").prop_map(|(code, message)| Message::Error { code, message }),
    ]
}
