//! A deterministic simulation of the sync sessions (sans I/O) in which the
//! edge's database goes through what ward hardware goes through: backups
//! restored with `edge-node restore`, old copies put back by hand, new
//! empty disks, cut connections and lost messages. Whatever happens, the
//! edge drops from its outbox only changes the bridge holds, and a database
//! the bridge admits ends up with everything it made in the cloud.
#![allow(clippy::unwrap_used)] // test code: a failure is the test failing

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use proptest::prelude::*;
use serde_bytes::ByteBuf;
use sync_protocol::admission::{self, Claim, NodeLease};
use sync_protocol::ids::TicketId;
use sync_protocol::session::{BridgeAction, BridgeSession, EdgeAction, EdgeSession, SessionConfig};
use sync_protocol::wire::{DatabaseId, Hello, Lease, Message, PROTOCOL_VERSION, UpstreamChange, WireLimits};

/// A change, named by a number unique across the whole run.
type ChangeId = u64;

/// The edge's database: what a backup copies and a restore puts back.
#[derive(Debug, Clone)]
struct EdgeDb {
    database: DatabaseId,
    lease: Option<Lease>,
    /// Outbox sequence -> change; sequences only grow within one database.
    outbox: BTreeMap<u64, ChangeId>,
    next_seq: u64,
}

impl EdgeDb {
    fn new(database: DatabaseId) -> Self {
        Self { database, lease: None, outbox: BTreeMap::new(), next_seq: 1 }
    }
}

struct Connection {
    edge: EdgeSession,
    bridge: BridgeSession,
    /// Messages on the way, edge -> bridge and bridge -> edge.
    up: VecDeque<Message>,
    down: VecDeque<Message>,
}

#[derive(Debug, Clone)]
enum Op {
    /// A nurse makes a change at the edge.
    Make,
    Connect,
    /// The edge sends what its window allows, at most this many per batch.
    Pump(usize),
    DeliverUp,
    DeliverDown,
    /// The link drops; what was on the way is lost.
    Cut,
    Backup,
    /// `edge-node restore` of a backup: a new database id, no lease.
    Restore(usize),
    /// A backup copied back by hand: the same id and the lease it had then.
    PutBack(usize),
    /// A new empty disk under the same node id.
    NewDisk,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => Just(Op::Make),
        2 => Just(Op::Connect),
        4 => (1..4usize).prop_map(Op::Pump),
        6 => Just(Op::DeliverUp),
        6 => Just(Op::DeliverDown),
        1 => Just(Op::Cut),
        1 => Just(Op::Backup),
        1 => any::<usize>().prop_map(Op::Restore),
        1 => any::<usize>().prop_map(Op::PutBack),
        1 => Just(Op::NewDisk),
    ]
}

#[derive(Default)]
struct World {
    db: Option<EdgeDb>,
    backups: Vec<EdgeDb>,
    /// What the bridge holds durably, and its record of the node.
    stored: BTreeSet<ChangeId>,
    record: Option<NodeLease>,
    connection: Option<Connection>,
    next_change: ChangeId,
    next_random: u8,
    now: i64,
}

impl World {
    fn db(&mut self) -> &mut EdgeDb {
        self.db.get_or_insert_with(|| EdgeDb::new(DatabaseId([0; 16])))
    }

    fn random16(&mut self) -> [u8; 16] {
        self.next_random = self.next_random.wrapping_add(1);
        let mut bytes = [self.next_random; 16];
        bytes[0] = (self.now % 251) as u8;
        bytes
    }

    fn step(&mut self, op: Op) {
        self.now += 1;
        match op {
            Op::Make => {
                self.next_change += 1;
                let change = self.next_change;
                let db = self.db();
                db.outbox.insert(db.next_seq, change);
                db.next_seq += 1;
            }
            Op::Connect => self.connect(),
            Op::Pump(changes_max) => self.pump(changes_max),
            Op::DeliverUp => self.deliver_up(),
            Op::DeliverDown => self.deliver_down(),
            Op::Cut => self.connection = None,
            Op::Backup => {
                let copy = self.db().clone();
                self.backups.push(copy);
            }
            Op::Restore(index) | Op::PutBack(index) if self.backups.is_empty() => {
                let _ = index;
            }
            Op::Restore(index) => {
                self.connection = None;
                let mut restored = self.backups[index % self.backups.len()].clone();
                restored.database = DatabaseId(self.random16());
                restored.lease = None;
                self.db = Some(restored);
            }
            Op::PutBack(index) => {
                self.connection = None;
                self.db = Some(self.backups[index % self.backups.len()].clone());
            }
            Op::NewDisk => {
                self.connection = None;
                self.db = Some(EdgeDb::new(DatabaseId(self.random16())));
            }
        }
    }

    fn connect(&mut self) {
        if self.connection.is_some() {
            return;
        }
        let (database, lease) = (self.db().database, self.db().lease);
        let hello = Hello {
            protocol_version: PROTOCOL_VERSION,
            node: "edge-ward-4b".parse().unwrap(),
            ward: "ward-4b".parse().unwrap(),
            token: "token".into(),
            cursor: None,
            limits: WireLimits::default(),
            database,
            lease,
        };
        let config = SessionConfig::default();
        let (edge, actions) = EdgeSession::start(hello, config, self.now);
        let bridge = BridgeSession::new(config, self.now);
        self.connection = Some(Connection { edge, bridge, up: VecDeque::new(), down: VecDeque::new() });
        self.edge_actions(actions);
    }

    fn pump(&mut self, changes_max: usize) {
        let Some(connection) = self.connection.as_mut() else { return };
        let Some(demand) = connection.edge.upstream_demand() else { return };
        let db = self.db.as_ref().unwrap();
        let batch: Vec<UpstreamChange> = db
            .outbox
            .range(demand.after_seq + 1..)
            .take(changes_max.min(demand.changes_max))
            .map(|(&seq, change)| UpstreamChange {
                seq,
                ticket: TicketId::new(1, [0; 10]),
                change: ByteBuf::from(change.to_be_bytes().to_vec()),
            })
            .collect();
        if batch.is_empty() {
            return;
        }
        let actions = connection.edge.send_upstream(batch, self.now);
        self.edge_actions(actions);
    }

    fn deliver_up(&mut self) {
        let Some(connection) = self.connection.as_mut() else { return };
        let Some(message) = connection.up.pop_front() else { return };
        let actions = connection.bridge.on_message(message, self.now);
        self.bridge_actions(actions);
    }

    fn deliver_down(&mut self) {
        let Some(connection) = self.connection.as_mut() else { return };
        let Some(message) = connection.down.pop_front() else { return };
        let actions = connection.edge.on_message(message, self.now);
        self.edge_actions(actions);
    }

    fn edge_actions(&mut self, actions: Vec<EdgeAction>) {
        for action in actions {
            let Some(connection) = self.connection.as_mut() else { return };
            match action {
                EdgeAction::Send(message) => connection.up.push_back(message),
                EdgeAction::HoldLease(lease) => self.db().lease = Some(lease),
                EdgeAction::Acked { up_to_seq } => {
                    let db = self.db.as_mut().unwrap();
                    let kept = db.outbox.split_off(&(up_to_seq + 1));
                    let dropped = std::mem::replace(&mut db.outbox, kept);
                    for (seq, change) in dropped {
                        assert!(
                            self.stored.contains(&change),
                            "the edge dropped change {change} (outbox {seq}) the bridge does not hold"
                        );
                    }
                }
                EdgeAction::Close(_) => self.connection = None,
                EdgeAction::Stuck { .. }
                | EdgeAction::ApplyDownstream { .. }
                | EdgeAction::Resend { .. }
                | EdgeAction::ReconcileDone => {
                    unreachable!(
                        "the simulated bridge refuses nothing, sends no feed and is asked to reconcile nothing"
                    )
                }
            }
        }
    }

    fn bridge_actions(&mut self, actions: Vec<BridgeAction>) {
        let mut queue: VecDeque<BridgeAction> = actions.into();
        while let Some(action) = queue.pop_front() {
            let Some(connection) = self.connection.as_mut() else { return };
            match action {
                BridgeAction::Send(message) => connection.down.push_back(message),
                BridgeAction::Authenticate { database, lease, .. } => {
                    let nonce = self.random16();
                    let claim = Claim { database, lease, connected_elsewhere: false };
                    let result = admission::admit(self.record.as_ref(), claim, nonce).map(|(record, _)| {
                        let offered = record.offered.expect("an admission offers a lease");
                        self.record = Some(record);
                        offered
                    });
                    let connection = self.connection.as_mut().unwrap();
                    queue.extend(connection.bridge.authenticated(result, self.now));
                }
                BridgeAction::LeaseHeld { lease } => {
                    let record = self.record.as_ref().unwrap();
                    if let Some(confirmed) = admission::confirm(record, record.database, lease) {
                        self.record = Some(confirmed);
                    }
                }
                BridgeAction::Store { changes } => {
                    for change in &changes {
                        self.stored.insert(u64::from_be_bytes(change.change.as_slice().try_into().unwrap()));
                    }
                    queue.extend(connection.bridge.stored(Vec::new(), self.now));
                }
                BridgeAction::StartFeed { .. } | BridgeAction::DownstreamAcked { .. } => {}
                BridgeAction::CheckHeads { .. } => unreachable!("the simulated edge does not reconcile"),
                BridgeAction::Close(_) => self.connection = None,
            }
        }
    }

    /// A link that stays up until everything is delivered; returns whether
    /// the bridge admitted the database.
    fn settle(&mut self) -> bool {
        self.connection = None;
        self.connect();
        for _ in 0..10_000 {
            let Some(connection) = self.connection.as_ref() else { return false };
            let idle = connection.up.is_empty() && connection.down.is_empty();
            let nothing_to_send = self.db.as_ref().unwrap().outbox.is_empty();
            if idle && nothing_to_send {
                return true;
            }
            self.pump(3);
            self.deliver_up();
            self.deliver_down();
        }
        panic!("the link did not settle");
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn an_edge_rolled_back_to_any_earlier_state_never_drops_a_change_the_bridge_lacks(
        ops in prop::collection::vec(op(), 1..160),
    ) {
        let mut world = World::default();
        for op in ops {
            world.step(op);
        }
        let outbox: Vec<ChangeId> = world.db().outbox.values().copied().collect();
        if world.settle() {
            // Admitted: everything this database still had to send is in the cloud.
            prop_assert!(outbox.iter().all(|change| world.stored.contains(change)));
        } else {
            // Refused (an old copy put back by hand): it keeps what it made.
            prop_assert_eq!(world.db().outbox.values().copied().collect::<Vec<_>>(), outbox);
        }
    }
}

/// The fault of protocol 2, replayed: a database restored from a backup
/// taken before its first change numbers its next changes from 1 again.
#[test]
fn a_restore_of_an_empty_backup_keeps_the_changes_it_makes_next() {
    let mut world = World::default();
    world.step(Op::Backup);
    for _ in 0..5 {
        world.step(Op::Make);
    }
    assert!(world.settle());
    world.step(Op::Restore(0));
    world.step(Op::Make);
    let made_after = *world.db().outbox.values().next().unwrap();
    assert!(world.settle());
    assert!(world.stored.contains(&made_after), "the change made after the restore reached the bridge");
}
