//! The formats the distributed backend writes outside the bridge's memory:
//! the records of the change topic, and the feed cursors edges keep.
//!
//! Both start with a frozen header (two magic bytes and a version), so a
//! reader of another version refuses them by name instead of misreading
//! them, and both decode with postcard from a bounded slice.

use serde::{Deserialize, Serialize};
use sync_protocol::ids::{NodeId, TicketId, WardId};
use sync_protocol::wire::Cursor;

const RECORD_MAGIC: [u8; 2] = *b"MC";
const RECORD_VERSION: u8 = 1;
const CURSOR_MAGIC: [u8; 2] = *b"KP";
const CURSOR_VERSION: u8 = 1;
const HEADER_BYTES: usize = 3;
/// A record's bytes beyond its change: ids, ward, origin, framing.
pub const RECORD_OVERHEAD_BYTES_MAX: usize = 512;

/// One accepted change on the change topic, keyed by its ticket.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChangeRecord {
    pub ticket: TicketId,
    pub ward: WardId,
    pub origin: Origin,
    #[serde(with = "serde_bytes")]
    pub change: Vec<u8>,
    /// For a ticket's first change: the ticket it creates, materialized (JSON)
    /// by the bridge that checked it, so the projector need not do it again.
    pub created: Option<String>,
}

/// Where an accepted change entered the cloud.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Origin {
    /// An edge node's upstream batch: its feed does not send it back.
    Node(NodeId),
    /// The pharmacy API.
    Pharmacy,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RecordError {
    #[error("record of {found} bytes is over the limit of {max}")]
    TooLarge { found: usize, max: usize },
    #[error("not a change record (bad header)")]
    Header,
    #[error("change record has format version {found}; this build reads {RECORD_VERSION}")]
    Version { found: u8 },
    #[error("change record is malformed: {0}")]
    Malformed(String),
}

impl ChangeRecord {
    pub fn encode(&self) -> Vec<u8> {
        let mut bytes = Vec::with_capacity(HEADER_BYTES + self.change.len() + 96);
        bytes.extend_from_slice(&RECORD_MAGIC);
        bytes.push(RECORD_VERSION);
        // Serializing owned, valid values into a Vec cannot fail.
        postcard::to_io(self, &mut bytes).expect("a change record serializes");
        bytes
    }

    /// Decodes a record of at most `bytes_max` bytes.
    pub fn decode(bytes: &[u8], bytes_max: usize) -> Result<Self, RecordError> {
        if bytes.len() > bytes_max {
            return Err(RecordError::TooLarge { found: bytes.len(), max: bytes_max });
        }
        let body = match bytes {
            [m0, m1, version, body @ ..] if [*m0, *m1] == RECORD_MAGIC => match *version {
                RECORD_VERSION => body,
                found => return Err(RecordError::Version { found }),
            },
            _ => return Err(RecordError::Header),
        };
        postcard::from_bytes(body).map_err(|e| RecordError::Malformed(e.to_string()))
    }
}

/// An edge's position in its ward's feed in the distributed store.
///
/// Per partition of the change topic: the `last` offset of the last feed
/// page sent whole (`-1`: none). A page too large for the edge's batch
/// limits is sent in parts; `partial` then says how much of it was sent.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PageCursor {
    pub partitions: Vec<i64>,
    pub partial: Option<PartialPage>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartialPage {
    pub partition: u32,
    /// The page's id (a MongoDB ObjectId).
    pub page: [u8; 12],
    /// The page's `last` offset: the partition's position must not pass it
    /// while the page is partly sent.
    pub last: i64,
    /// Changes of the page already sent.
    pub sent: u32,
}

impl PageCursor {
    /// The offset position of `partition`, `-1` when none was read yet.
    pub fn last(&self, partition: usize) -> i64 {
        self.partitions.get(partition).copied().unwrap_or(-1)
    }

    pub fn set_last(&mut self, partition: usize, last: i64) {
        if self.partitions.len() <= partition {
            self.partitions.resize(partition + 1, -1);
        }
        self.partitions[partition] = last;
    }

    pub fn encode(&self) -> Cursor {
        let mut bytes = Vec::with_capacity(HEADER_BYTES + 10 * self.partitions.len() + 20);
        bytes.extend_from_slice(&CURSOR_MAGIC);
        bytes.push(CURSOR_VERSION);
        postcard::to_io(self, &mut bytes).expect("a page cursor serializes");
        Cursor::new(bytes)
    }

    /// The cursor an edge handed back; `None` if it is not one of ours (a
    /// cursor of the embedded store, or of another version): the feed then
    /// starts over, which sends what the edge may have again but loses nothing.
    pub fn decode(cursor: &Cursor) -> Option<Self> {
        match cursor.as_bytes() {
            [m0, m1, CURSOR_VERSION, body @ ..] if [*m0, *m1] == CURSOR_MAGIC => postcard::from_bytes(body).ok(),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn record() -> ChangeRecord {
        ChangeRecord {
            ticket: TicketId::new(1_764_000_000_000, [7; 10]),
            ward: "ward-4b".parse().unwrap(),
            origin: Origin::Node("edge-ward-4b".parse().unwrap()),
            change: vec![0x85, 0x6f, 0x4a, 0x83, 1, 2, 3],
            created: Some("{\"id\":\"x\"}".into()),
        }
    }

    #[test]
    fn records_refuse_other_formats_by_name() {
        let bytes = record().encode();
        assert_eq!(ChangeRecord::decode(&bytes, 1_000), Ok(record()));
        assert_eq!(ChangeRecord::decode(&bytes, 10), Err(RecordError::TooLarge { found: bytes.len(), max: 10 }));
        let mut newer = bytes.clone();
        newer[2] = 9;
        assert_eq!(ChangeRecord::decode(&newer, 1_000), Err(RecordError::Version { found: 9 }));
        assert_eq!(ChangeRecord::decode(b"{\"json\":1}", 1_000), Err(RecordError::Header));
        assert!(matches!(ChangeRecord::decode(&bytes[..bytes.len() - 2], 1_000), Err(RecordError::Malformed(_))));
    }

    #[test]
    fn a_cursor_of_sixteen_partitions_fits_the_default_cursor_limit() {
        let cursor = PageCursor {
            partitions: vec![i64::MAX; crate::config::PARTITIONS_MAX as usize],
            partial: Some(PartialPage { partition: 15, page: [0xff; 12], last: i64::MAX, sent: u32::MAX }),
        };
        let bytes = cursor.encode();
        assert!(bytes.as_bytes().len() <= sync_protocol::wire::WireLimits::default().cursor_bytes_max);
        assert_eq!(PageCursor::decode(&bytes), Some(cursor));
        assert_eq!(PageCursor::decode(&Cursor::new(7u64.to_be_bytes().to_vec())), None, "an embedded cursor");
    }

    #[test]
    fn the_fuzz_seeds_are_valid_encodings() {
        let seed = |name: &str| {
            std::fs::read(format!("{}/fuzz/seeds/decode_records/{name}", env!("CARGO_MANIFEST_DIR"))).unwrap()
        };
        for name in ["record", "record-pharmacy"] {
            assert!(ChangeRecord::decode(&seed(name), 4_096).is_ok(), "{name} is stale: encode it again");
        }
        assert!(PageCursor::decode(&Cursor::new(seed("cursor"))).is_some(), "cursor is stale: encode it again");
    }

    proptest! {
        #[test]
        fn records_round_trip(change in prop::collection::vec(any::<u8>(), 0..512), pharmacy in any::<bool>()) {
            let origin = if pharmacy { Origin::Pharmacy } else { record().origin };
            let record = ChangeRecord { change, origin, ..record() };
            prop_assert_eq!(ChangeRecord::decode(&record.encode(), 4_096), Ok(record));
        }

        #[test]
        fn record_decoding_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
            let _ = ChangeRecord::decode(&bytes, 4_096);
            let _ = PageCursor::decode(&Cursor::new(bytes));
        }

        #[test]
        fn cursors_round_trip(partitions in prop::collection::vec(-1i64..i64::MAX, 0..16), sent in any::<Option<u32>>()) {
            let partial = sent.map(|sent| PartialPage { partition: 3, page: [1; 12], last: 7, sent });
            let cursor = PageCursor { partitions, partial };
            prop_assert_eq!(PageCursor::decode(&cursor.encode()), Some(cursor));
        }
    }
}
