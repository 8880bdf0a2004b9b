//! The distributed store's decoders must turn any bytes into a value or an
//! error, never a panic: a change record read from the topic, and a feed
//! cursor an edge hands back in its hello. What decodes must encode back to
//! the same value.
#![no_main]

use cloud_store::distributed::record::{ChangeRecord, PageCursor};
use libfuzzer_sys::fuzz_target;
use sync_protocol::wire::Cursor;

/// The largest record the projector reads (a change of 256 KiB and its framing).
const RECORD_BYTES_MAX: usize = 256 * 1024 + 512;

fuzz_target!(|bytes: &[u8]| {
    if let Ok(record) = ChangeRecord::decode(bytes, RECORD_BYTES_MAX) {
        assert_eq!(ChangeRecord::decode(&record.encode(), RECORD_BYTES_MAX), Ok(record));
    }
    if let Some(cursor) = PageCursor::decode(&Cursor::new(bytes.to_vec())) {
        assert_eq!(PageCursor::decode(&cursor.encode()), Some(cursor));
    }
});
