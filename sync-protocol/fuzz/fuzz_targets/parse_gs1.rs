//! A GS1 string comes from a scanner or a keyboard: any text must give a
//! label or an error, never a panic, and a label read holds the GTIN and
//! lot the string carried.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sync_protocol::gs1::parse_label;

fuzz_target!(|text: &str| {
    let today = time::Date::from_calendar_date(2026, time::Month::December, 7).expect("a date");
    if let Ok(label) = parse_label(text, today) {
        assert!(text.contains(&label.lot));
        // A GTIN-14 is read as it was written (the bracketed form may
        // carry it shorter; it is stored zero-padded).
        assert!(text.contains(label.gtin.as_str().trim_start_matches('0')));
    }
});
