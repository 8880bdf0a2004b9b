//! The services' one clock. The core reads none (time is passed in); the
//! services read the system clock here and nowhere else, so every
//! timestamp in the audit trail comes from one definition.

use std::time::{SystemTime, UNIX_EPOCH};

/// Milliseconds since the Unix epoch. A clock set before 1970 reads 0 (the
/// audit trail then shows an obviously wrong time instead of the service
/// stopping); one past the year 292 million saturates.
pub fn now_ms() -> i64 {
    let since_epoch = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
    i64::try_from(since_epoch.as_millis()).unwrap_or(i64::MAX)
}

/// Seconds since the Unix epoch: the unit of JWT claims.
pub fn now_s() -> i64 {
    now_ms() / 1_000
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seconds_and_milliseconds_read_the_same_clock() {
        let (s, ms) = (now_s(), now_ms());
        assert!(ms / 1_000 - s <= 1, "{s} s vs {ms} ms");
        assert!(s > 1_700_000_000, "the clock reads after 2023: {s}");
    }
}
