//! The checks of an upstream change that both backends make, and the work
//! on it that needs no storage, done on every core before a store sees it.

use std::sync::Arc;

use automerge::ActorId;
use rayon::prelude::*;
use sync_protocol::document::{DocumentError, ReceivedChange, TicketDocument};
use sync_protocol::ids::{NodeId, Role, TicketId, WardId};
use sync_protocol::ticket::{Limits, Ticket};
use sync_protocol::wire::UpstreamChange;

use super::StoreError;

/// Stack of each thread that decodes or merges Automerge changes.
const AUTOMERGE_THREAD_STACK_BYTES: usize = 8 * 1024 * 1024;

/// A pool of threads, one per core, that decode and merge Automerge changes
/// (the bridge's stagers, the projector's mergers), named `{name}-{n}`.
pub fn automerge_pool(name: &'static str) -> Result<Arc<rayon::ThreadPool>, StoreError> {
    // Automerge's decoder and merge run deep on the stack (an unoptimized
    // build overflowed rayon's default 2 MiB), and a worker waiting in a
    // join runs other tasks on top of its own: give them the main thread's 8 MiB.
    rayon::ThreadPoolBuilder::new()
        .thread_name(move |n| format!("{name}-{n}"))
        .stack_size(AUTOMERGE_THREAD_STACK_BYTES)
        .build()
        .map(Arc::new)
        .map_err(|e| StoreError::Task(format!("cannot start the {name} threads: {e}")))
}

/// Why a store refuses an upstream change, whatever else it holds; its
/// text goes back to the edge in a `Rejected`.
#[derive(Debug, thiserror::Error)]
pub enum Refusal {
    #[error(transparent)]
    Document(#[from] DocumentError),
    #[error("change claims device {claimed}, but came from {node}")]
    OtherDevice { claimed: NodeId, node: NodeId },
    #[error("a {0} may not make changes at a ward")]
    NotAtWard(Role),
    #[error("the change creates a ticket of another ward or id ({id} in {ward})")]
    OtherTicket { id: TicketId, ward: WardId },
    #[error("ticket {0} belongs to another ward")]
    OtherWard(TicketId),
    /// It builds on changes the store never accepted (`who`: the bridge,
    /// or the cloud's projection).
    #[error("the change builds on changes the {0} never accepted")]
    Unaccepted(&'static str),
}

/// An upstream change with the work that needs no database done: decoded,
/// its audit record checked against the node that sent it, and, for a
/// ticket's first change, the ticket it creates.
pub(crate) struct Staged {
    pub seq: u64,
    pub ticket: TicketId,
    /// The change, or why it was refused whatever the store holds.
    pub checked: Result<Checked, Refusal>,
}

pub(crate) struct Checked {
    pub bytes: Vec<u8>,
    pub received: ReceivedChange,
    /// For a root change: the new ticket's row, or why it is refused.
    /// Used only if the ticket does not exist yet.
    created: Option<Result<TicketRow, Refusal>>,
}

/// What a checked change does to the ticket as a store holds it.
pub(crate) enum Outcome {
    /// It creates the ticket.
    Created(Box<TicketRow>),
    /// It was merged into the ticket's document.
    Merged,
    /// The document already had it (a resend).
    AlreadyHad,
    /// It builds on changes the store does not hold. The embedded store
    /// holds everything it accepted, so there it is refused; a distributed
    /// store may not have projected them yet.
    MissingDependencies,
    Refused(Refusal),
}

/// A ticket's saved document and materialized ticket.
#[derive(Debug)]
pub struct TicketRow {
    pub ticket: Ticket,
    pub json: Arc<str>,
    pub document: Vec<u8>,
}

impl TicketRow {
    pub fn of(document: &mut TicketDocument) -> Result<Self, DocumentError> {
        let ticket = document.ticket()?;
        let json = serde_json::to_string(&ticket).map(Arc::from).unwrap_or_else(|_| Arc::from("{}"));
        Ok(Self { ticket, json, document: document.save() })
    }
}

/// Stages upstream batches on a pool of threads, one per core.
pub(crate) struct Stager {
    pool: Arc<rayon::ThreadPool>,
    limits: Limits,
    replica: ActorId,
}

impl Stager {
    pub fn new(limits: Limits, replica: ActorId) -> Result<Self, StoreError> {
        Ok(Self { pool: automerge_pool("bridge-stage")?, limits, replica })
    }

    /// Decodes and checks a node's batch on every core.
    pub async fn stage(
        &self,
        node: &NodeId,
        ward: &WardId,
        changes: Vec<UpstreamChange>,
    ) -> Result<Vec<Staged>, StoreError> {
        let (pool, limits, replica, node, ward) =
            (Arc::clone(&self.pool), self.limits.clone(), self.replica.clone(), node.clone(), ward.clone());
        tokio::task::spawn_blocking(move || {
            pool.install(|| {
                changes.into_par_iter().map(|change| Staged::new(change, &node, &ward, &limits, &replica)).collect()
            })
        })
        .await
        .map_err(|e| StoreError::Task(format!("staging: {e}")))
    }
}

impl Staged {
    fn new(change: UpstreamChange, node: &NodeId, ward: &WardId, limits: &Limits, replica: &ActorId) -> Self {
        let UpstreamChange { seq, ticket, change } = change;
        let bytes = change.into_vec();
        let checked = ReceivedChange::decode(&bytes).map_err(Refusal::from).and_then(|received| {
            let actor = &received.audit().actor;
            // The node speaks for its ward's people: the change must say it
            // came through this node, from a role that works at a ward.
            if actor.device != *node {
                return Err(Refusal::OtherDevice { claimed: actor.device.clone(), node: node.clone() });
            }
            if !actor.role.works_at_ward() {
                return Err(Refusal::NotAtWard(actor.role));
            }
            let created = received.is_root().then(|| create_ticket(&received, ticket, ward, limits, replica));
            Ok(Checked { bytes, received, created })
        });
        Self { seq, ticket, checked }
    }
}

impl Checked {
    /// Checks the change against `document`, the ticket as the store holds
    /// it (`None`: no such ticket yet), and merges it in. An `Err` is a
    /// fault of the stored document, not of the change.
    pub fn merge_into(
        &mut self,
        document: Option<&mut TicketDocument>,
        id: TicketId,
        ward: &WardId,
        limits: &Limits,
        replica: &ActorId,
    ) -> Result<Outcome, DocumentError> {
        let Some(document) = document else {
            if !self.received.is_root() {
                return Ok(Outcome::MissingDependencies);
            }
            let created =
                self.created.take().unwrap_or_else(|| create_ticket(&self.received, id, ward, limits, replica));
            return Ok(match created {
                Ok(row) => Outcome::Created(Box::new(row)),
                Err(reason) => Outcome::Refused(reason),
            });
        };
        if document.ticket()?.ward != *ward {
            return Ok(Outcome::Refused(Refusal::OtherWard(id)));
        }
        Ok(match document.apply_received(std::slice::from_ref(&self.received), limits) {
            Ok(applied) if applied.is_empty() => Outcome::AlreadyHad,
            Ok(_) => Outcome::Merged,
            Err(DocumentError::MissingDependencies) => Outcome::MissingDependencies,
            Err(e) => Outcome::Refused(e.into()),
        })
    }
}

/// The row of the ticket a ticket's first change creates, if it is a valid
/// ticket of this id and ward. Saved here, not kept as a document: staging
/// a whole batch of live documents would cost far more memory.
fn create_ticket(
    received: &ReceivedChange,
    id: TicketId,
    ward: &WardId,
    limits: &Limits,
    replica: &ActorId,
) -> Result<TicketRow, Refusal> {
    let (mut document, _) = TicketDocument::from_received(std::slice::from_ref(received), limits, replica.clone())?;
    let row = TicketRow::of(&mut document)?;
    if row.ticket.ward != *ward || row.ticket.id != id {
        return Err(Refusal::OtherTicket { id: row.ticket.id, ward: row.ticket.ward });
    }
    Ok(row)
}
