//! The edge node <-> cloud bridge wire protocol: versioned messages and their
//! compact binary encoding.
//!
//! A frame is one WebSocket binary message:
//!
//! ```text
//! +------+------+-------------------+------------------------------+
//! | 'M'  | 'R'  | protocol (u16 BE) | postcard-encoded `Message`   |
//! +------+------+-------------------+------------------------------+
//! ```
//!
//! The header is frozen across versions, and so is the position of `Hello`
//! and `Refused` in [`Message`], so any two versions can at least refuse
//! each other clearly.
//!
//! Decoding enforces every limit in [`WireLimits`] and returns an error value
//! for anything else: the frame length is checked before any decoding, every
//! allocation is bounded by the frame length, and counts and sizes are checked
//! before the message is handed on.

use serde::{Deserialize, Serialize};
use serde_bytes::ByteBuf;

use crate::ids::{NodeId, TicketId, WardId};
use crate::ticket::UnixMillis;

/// The protocol version this build speaks. Version 3: acknowledgements
/// cover only what was sent on the same connection, and the hello names the
/// edge's database and the lease it holds. Version 4: ticket documents of
/// schema 2 (supply and receipt per line), which a version 3 edge would
/// refuse as unknown edits; the frames are those of version 3.
pub const PROTOCOL_VERSION: u16 = 4;
const MAGIC: [u8; 2] = *b"MR";
const HEADER_BYTES: usize = 4;

/// Hard limits on what a peer may send. Both sides use the same defaults;
/// the bridge states its own in `Welcome` so an edge never sends more.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WireLimits {
    /// Largest frame, header included. Bounds every allocation of a decode.
    pub frame_bytes_max: usize,
    /// Most changes in one upstream or downstream batch.
    pub changes_per_batch_max: usize,
    /// Largest single Automerge change or ticket snapshot.
    pub change_bytes_max: usize,
    /// Largest bearer token.
    pub token_bytes_max: usize,
    /// Largest downstream cursor; cursors are opaque to the edge.
    pub cursor_bytes_max: usize,
    /// Largest human-readable text (error messages, refusal details).
    pub text_bytes_max: usize,
}

impl Default for WireLimits {
    fn default() -> Self {
        Self {
            frame_bytes_max: 4 * 1024 * 1024,
            changes_per_batch_max: 2_048,
            change_bytes_max: 256 * 1024,
            token_bytes_max: 8 * 1024,
            cursor_bytes_max: 256,
            text_bytes_max: 2 * 1024,
        }
    }
}

/// A position in the bridge's downstream feed for one edge. Opaque to the
/// edge, which stores it and hands it back in `Hello` to resume.
#[derive(Debug, Clone, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Cursor(pub ByteBuf);

impl Cursor {
    pub fn new(bytes: Vec<u8>) -> Self {
        Cursor(ByteBuf::from(bytes))
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }
}

/// One edge database: minted at random when the database is created and
/// again when a backup is restored into it, so a database that holds another
/// history than the node's last one is never mistaken for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct DatabaseId(pub [u8; 16]);

/// The right of one edge database to speak for its node: issued by the
/// bridge at every `Welcome`, held durably by the edge, shown in its next
/// `Hello`. A copy of the database keeps the old lease and is refused once
/// the original has taken a new one. Generations only grow, so a lease newer
/// than any the bridge knows tells it its own store was restored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Lease {
    pub generation: u64,
    /// Drawn at random: two leases of one generation are never the same.
    pub nonce: [u8; 16],
}

impl Lease {
    pub const BYTES: usize = 24;

    pub fn to_bytes(self) -> [u8; Self::BYTES] {
        let mut bytes = [0; Self::BYTES];
        bytes[..8].copy_from_slice(&self.generation.to_be_bytes());
        bytes[8..].copy_from_slice(&self.nonce);
        bytes
    }

    pub fn from_bytes(bytes: &[u8]) -> Option<Self> {
        let (generation, nonce) = bytes.split_first_chunk::<8>()?;
        Some(Lease { generation: u64::from_be_bytes(*generation), nonce: nonce.try_into().ok()? })
    }
}

fn write_hex(bytes: &[u8], f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
    bytes.iter().try_for_each(|byte| write!(f, "{byte:02x}"))
}

impl std::fmt::Display for DatabaseId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write_hex(&self.0, f)
    }
}

/// The first message on a connection, from the edge.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    pub protocol_version: u16,
    pub node: NodeId,
    pub ward: WardId,
    /// The node's bearer token (a JWT from the auth service).
    pub token: String,
    /// Where the downstream feed should resume; `None` asks for a snapshot
    /// first (a new node, or one restored from a backup without a cursor).
    pub cursor: Option<Cursor>,
    /// The limits the edge decodes frames with; the bridge sends within
    /// them (and its own). Since protocol version 2.
    pub limits: WireLimits,
    /// The edge's database. Since protocol version 3.
    pub database: DatabaseId,
    /// The lease this database holds, if it was ever welcomed. Since
    /// protocol version 3.
    pub lease: Option<Lease>,
}

/// The bridge accepted the hello.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Welcome {
    pub protocol_version: u16,
    /// The bridge's clock, so an edge can show drift.
    pub server_time: UnixMillis,
    /// The limits the bridge enforces; the edge batches within them.
    pub limits: WireLimits,
    /// The database's new lease: the edge stores it durably before it sends
    /// anything else, and shows it in its next hello.
    pub lease: Lease,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum RefusalReason {
    /// The peer speaks a version outside `supported_min..=supported_max`.
    VersionMismatch { supported_min: u16, supported_max: u16 },
    /// The token is missing, invalid, expired or revoked.
    Unauthorized,
    /// The token is valid but not for this node or ward.
    Forbidden,
    /// The bridge cannot serve now (its storage is down); retry later.
    Unavailable,
    /// This database no longer speaks for the node: another database of
    /// the node (a restore, a new install, or a copy that synced first)
    /// took over. Since protocol version 3.
    Superseded,
    /// The node is connected right now through another connection: a copy
    /// of its database runs elsewhere, or its last connection has not timed
    /// out yet. Since protocol version 3.
    AlreadyConnected,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Refused {
    pub reason: RefusalReason,
    pub detail: String,
}

/// One local change of an edge node, numbered by the node's outbox.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UpstreamChange {
    /// Strictly increasing per node; never reused.
    pub seq: u64,
    pub ticket: TicketId,
    pub change: ByteBuf,
}

/// A change of any replica, sent down to an edge.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DownstreamChange {
    pub ticket: TicketId,
    pub change: ByteBuf,
}

/// Most heads a ticket shows in a reconciliation: concurrent branches of
/// one ticket are few; a ticket with more shows this many of them.
pub const HEADS_PER_TICKET_MAX: usize = 64;

/// A ticket's heads (change hashes) as one replica holds them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TicketHeads {
    pub ticket: TicketId,
    pub heads: Vec<[u8; 32]>,
}

/// A whole ticket document, for bootstrapping a node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TicketSnapshot {
    pub ticket: TicketId,
    pub document: ByteBuf,
}

/// Why a peer rejected something, with a stable code for programs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ErrorCode {
    /// The frame could not be decoded or broke a limit.
    Malformed,
    /// A message that is not allowed in the session's current state.
    UnexpectedMessage,
    /// A change failed domain validation (role rules, ward scope, limits).
    ChangeRejected,
    /// The peer is overloaded or its storage is unavailable; retry later.
    Unavailable,
    /// Anything else on the peer's side.
    Internal,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Message {
    // Variants 0 and 1 are frozen: see the module docs.
    Hello(Hello),
    Refused(Refused),
    Welcome(Welcome),
    /// Edge -> bridge: local changes, in ascending `seq`.
    Upstream {
        changes: Vec<UpstreamChange>,
    },
    /// Bridge -> edge: every upstream change sent on this connection up to
    /// `up_to_seq` is durably stored or was rejected (a `Rejected` for it
    /// came first). It never covers a change sent on another connection.
    Ack {
        up_to_seq: u64,
    },
    /// Bridge -> edge: this change failed validation; the edge keeps it, marked stuck.
    Rejected {
        seq: u64,
        ticket: TicketId,
        code: ErrorCode,
        message: String,
    },
    /// Bridge -> edge: changes the edge has not seen, and the cursor after them.
    Downstream {
        changes: Vec<DownstreamChange>,
        cursor: Cursor,
    },
    /// Edge -> bridge: changes up to `cursor` are applied and durable.
    DownstreamAck {
        cursor: Cursor,
    },
    /// Reserved: whole documents for bootstrapping a node. No bridge sends
    /// it and an edge refuses it; it stays so the variants after it keep
    /// their numbers on the wire.
    Snapshot {
        tickets: Vec<TicketSnapshot>,
        cursor: Cursor,
        last: bool,
    },
    Ping {
        nonce: u64,
    },
    Pong {
        nonce: u64,
    },
    Error {
        code: ErrorCode,
        message: String,
    },
    /// Edge -> bridge, right after a `Welcome` or `NewLease`: the edge
    /// stored the lease offered, durably; the one it held before is void.
    LeaseHeld {
        lease: Lease,
    },
    /// Bridge -> edge: take this lease instead of the one held (another
    /// connection showed the one held: a copy of this database).
    NewLease {
        lease: Lease,
    },
    /// Edge -> bridge: the heads of some of the edge's tickets, in ticket
    /// order, one message in flight at a time (a reconciliation).
    Reconcile {
        tickets: Vec<TicketHeads>,
        /// Whether these are the edge's last tickets.
        last: bool,
    },
    /// Bridge -> edge, answering `Reconcile`: the tickets whose heads the
    /// cloud lacks some of, each with the heads the cloud holds (none: the
    /// cloud lacks the ticket).
    Reconciled {
        missing: Vec<TicketHeads>,
        last: bool,
    },
}

impl Message {
    /// A short name for logs and metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            Message::Hello(_) => "hello",
            Message::Refused(_) => "refused",
            Message::Welcome(_) => "welcome",
            Message::Upstream { .. } => "upstream",
            Message::Ack { .. } => "ack",
            Message::Rejected { .. } => "rejected",
            Message::Downstream { .. } => "downstream",
            Message::DownstreamAck { .. } => "downstream-ack",
            Message::Snapshot { .. } => "snapshot",
            Message::Ping { .. } => "ping",
            Message::Pong { .. } => "pong",
            Message::Error { .. } => "error",
            Message::LeaseHeld { .. } => "lease-held",
            Message::NewLease { .. } => "new-lease",
            Message::Reconcile { .. } => "reconcile",
            Message::Reconciled { .. } => "reconciled",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("frame of {len} bytes exceeds the limit of {max}")]
    FrameTooLarge { len: usize, max: usize },
    #[error("frame too short for a header")]
    Truncated,
    #[error("frame does not start with the protocol magic")]
    BadMagic,
    #[error("frame speaks protocol version {found}; this build speaks {supported}")]
    Version { found: u16, supported: u16 },
    #[error("frame body is malformed: {0}")]
    Body(String),
    #[error("frame has {0} bytes after the message")]
    TrailingBytes(usize),
    #[error("{what} has {got}, over the limit of {max}")]
    Limit { what: &'static str, got: usize, max: usize },
    #[error("upstream sequence numbers must strictly increase")]
    SequenceOrder,
}

/// Encodes a message into a frame, refusing what the peer would refuse.
pub fn encode(message: &Message, limits: &WireLimits) -> Result<Vec<u8>, WireError> {
    check_limits(message, limits)?;
    let mut frame = Vec::with_capacity(256);
    frame.extend_from_slice(&MAGIC);
    frame.extend_from_slice(&PROTOCOL_VERSION.to_be_bytes());
    let frame = postcard::to_extend(message, frame).map_err(|e| WireError::Body(e.to_string()))?;
    if frame.len() > limits.frame_bytes_max {
        return Err(WireError::FrameTooLarge { len: frame.len(), max: limits.frame_bytes_max });
    }
    Ok(frame)
}

/// Reads only the protocol version of a frame, so a peer of another version
/// can be refused in words it understands.
pub fn frame_version(frame: &[u8]) -> Result<u16, WireError> {
    if frame.len() < HEADER_BYTES {
        return Err(WireError::Truncated);
    }
    if frame[..2] != MAGIC {
        return Err(WireError::BadMagic);
    }
    Ok(u16::from_be_bytes([frame[2], frame[3]]))
}

/// Decodes one frame. Never panics; every failure is a [`WireError`].
pub fn decode(frame: &[u8], limits: &WireLimits) -> Result<Message, WireError> {
    if frame.len() > limits.frame_bytes_max {
        return Err(WireError::FrameTooLarge { len: frame.len(), max: limits.frame_bytes_max });
    }
    let version = frame_version(frame)?;
    if version != PROTOCOL_VERSION {
        return Err(WireError::Version { found: version, supported: PROTOCOL_VERSION });
    }
    let (message, rest) =
        postcard::take_from_bytes::<Message>(&frame[HEADER_BYTES..]).map_err(|e| WireError::Body(e.to_string()))?;
    if !rest.is_empty() {
        return Err(WireError::TrailingBytes(rest.len()));
    }
    check_limits(&message, limits)?;
    Ok(message)
}

fn at_most(what: &'static str, got: usize, max: usize) -> Result<(), WireError> {
    if got > max { Err(WireError::Limit { what, got, max }) } else { Ok(()) }
}

fn check_limits(message: &Message, limits: &WireLimits) -> Result<(), WireError> {
    let changes = |count: usize| at_most("batch changes", count, limits.changes_per_batch_max);
    let change = |bytes: &ByteBuf| at_most("change bytes", bytes.len(), limits.change_bytes_max);
    let cursor = |c: &Cursor| at_most("cursor bytes", c.0.len(), limits.cursor_bytes_max);
    let text = |s: &str| at_most("text bytes", s.len(), limits.text_bytes_max);
    match message {
        Message::Hello(hello) => {
            at_most("token bytes", hello.token.len(), limits.token_bytes_max)?;
            hello.cursor.as_ref().map_or(Ok(()), cursor)
        }
        Message::Refused(refused) => text(&refused.detail),
        Message::Welcome(_)
        | Message::Ack { .. }
        | Message::Ping { .. }
        | Message::Pong { .. }
        | Message::LeaseHeld { .. }
        | Message::NewLease { .. } => Ok(()),
        Message::Upstream { changes: batch } => {
            changes(batch.len())?;
            batch.iter().try_for_each(|c| change(&c.change))?;
            if batch.windows(2).any(|pair| pair[0].seq >= pair[1].seq) {
                return Err(WireError::SequenceOrder);
            }
            Ok(())
        }
        Message::Rejected { message, .. } | Message::Error { message, .. } => text(message),
        Message::Downstream { changes: batch, cursor: c } => {
            changes(batch.len())?;
            batch.iter().try_for_each(|c| change(&c.change))?;
            cursor(c)
        }
        Message::DownstreamAck { cursor: c } => cursor(c),
        Message::Reconcile { tickets, .. } | Message::Reconciled { missing: tickets, .. } => {
            changes(tickets.len())?;
            tickets.iter().try_for_each(|t| at_most("ticket heads", t.heads.len(), HEADS_PER_TICKET_MAX))
        }
        Message::Snapshot { tickets, cursor: c, .. } => {
            changes(tickets.len())?;
            tickets.iter().try_for_each(|t| change(&t.document))?;
            cursor(c)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hello() -> Message {
        Message::Hello(Hello {
            protocol_version: PROTOCOL_VERSION,
            node: "edge-ward-4b".parse().unwrap(),
            ward: "ward-4b".parse().unwrap(),
            token: "eyJ...".into(),
            cursor: Some(Cursor::new(vec![0, 0, 0, 7])),
            limits: WireLimits::default(),
            database: DatabaseId([7; 16]),
            lease: Some(Lease { generation: 3, nonce: [9; 16] }),
        })
    }

    #[test]
    fn a_hello_round_trips() {
        let limits = WireLimits::default();
        let frame = encode(&hello(), &limits).unwrap();
        assert_eq!(&frame[..2], b"MR");
        assert_eq!(decode(&frame, &limits), Ok(hello()));
    }

    #[test]
    fn the_fuzz_seeds_are_frames_of_this_version() {
        for name in ["ack", "ping", "hello", "reconcile"] {
            let path = format!("{}/fuzz/seeds/decode_frame/{name}", env!("CARGO_MANIFEST_DIR"));
            let frame = std::fs::read(&path).unwrap();
            assert!(decode(&frame, &WireLimits::default()).is_ok(), "{name} is stale: encode it again");
        }
    }

    #[test]
    fn other_versions_are_named_not_guessed() {
        let limits = WireLimits::default();
        let mut frame = encode(&hello(), &limits).unwrap();
        frame[3] = 9;
        assert_eq!(decode(&frame, &limits), Err(WireError::Version { found: 9, supported: PROTOCOL_VERSION }));
        assert_eq!(frame_version(&frame), Ok(9));
    }

    #[test]
    fn oversized_and_malformed_frames_are_errors() {
        let limits = WireLimits { frame_bytes_max: 64, ..WireLimits::default() };
        assert!(matches!(decode(&[0; 65], &limits), Err(WireError::FrameTooLarge { .. })));
        assert_eq!(decode(b"MR", &limits), Err(WireError::Truncated));
        assert_eq!(decode(b"XX\0\x01", &limits), Err(WireError::BadMagic));
        let [high, low] = PROTOCOL_VERSION.to_be_bytes();
        assert!(matches!(decode(&[b'M', b'R', high, low, 0xff, 0xff], &limits), Err(WireError::Body(_))));
        let mut frame = encode(&Message::Ping { nonce: 1 }, &limits).unwrap();
        frame.push(0);
        assert_eq!(decode(&frame, &limits), Err(WireError::TrailingBytes(1)));
    }

    #[test]
    fn batch_limits_hold_on_both_sides() {
        let limits = WireLimits { changes_per_batch_max: 2, change_bytes_max: 4, ..WireLimits::default() };
        let ticket = TicketId::new(1, [0; 10]);
        let change = |seq, len| UpstreamChange { seq, ticket, change: ByteBuf::from(vec![0; len]) };
        let too_many = Message::Upstream { changes: vec![change(1, 1), change(2, 1), change(3, 1)] };
        assert!(matches!(encode(&too_many, &limits), Err(WireError::Limit { what: "batch changes", .. })));
        let too_big = Message::Upstream { changes: vec![change(1, 5)] };
        assert!(matches!(encode(&too_big, &limits), Err(WireError::Limit { what: "change bytes", .. })));
        let unordered = Message::Upstream { changes: vec![change(2, 1), change(2, 1)] };
        assert_eq!(encode(&unordered, &limits), Err(WireError::SequenceOrder));
        // A peer with looser limits is still held to ours when decoding.
        let frame = encode(&too_many, &WireLimits::default()).unwrap();
        assert!(matches!(decode(&frame, &limits), Err(WireError::Limit { .. })));
    }
}
