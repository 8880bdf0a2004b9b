//! The wire decoder must turn any bytes into a message or an error, never a
//! panic, and a decoded message must encode back to the same frame.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sync_protocol::wire::{WireLimits, decode, encode};

fuzz_target!(|frame: &[u8]| {
    let limits = WireLimits::default();
    if let Ok(message) = decode(frame, &limits) {
        let again = encode(&message, &limits).expect("a decoded message encodes");
        assert_eq!(decode(&again, &limits).as_ref(), Ok(&message));
    }
});
