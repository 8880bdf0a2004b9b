//! GS1 element strings, as a ward's scanner reads them off a pack (GS1-128
//! or GS1 DataMatrix) or as a person types them from the label: the product
//! (GTIN), its expiry, its lot and its serial number.
//!
//! Two forms are read:
//! - the human-readable one on the label, `(01)09506000134352(17)261231(10)A1B2`;
//! - what a scanner transmits: the application identifiers (AIs) run
//!   together, each variable-length field ended by FNC1, which scanners send
//!   as the ASCII group separator (GS, 0x1D), optionally after an AIM
//!   symbology identifier (`]C1` GS1-128, `]d2` DataMatrix, `]Q3` QR).
//!
//! Only the AIs a medication pack carries are accepted; any other is an
//! error that names it, not a field silently skipped, because an unknown AI
//! of unknown length would shift every field after it.

use serde::{Deserialize, Serialize};
use time::{Date, Month};

/// The longest element string accepted, in characters: a DataMatrix on a
/// pack holds well under this, and a limit bounds the work of parsing.
pub const ELEMENT_STRING_CHARS_MAX: usize = 200;

/// The longest lot or serial number (GS1's variable-length fields).
pub const VARIABLE_FIELD_CHARS_MAX: usize = 20;

const GROUP_SEPARATOR: char = '\u{1d}';
const SYMBOLOGY_IDENTIFIERS: [&str; 4] = ["]C1", "]d2", "]Q3", "]e0"];

/// How long an AI's data is.
#[derive(Debug, Clone, Copy)]
enum Length {
    /// Exactly so many characters; no separator follows.
    Fixed(usize),
    /// Up to so many characters, ended by a separator or the end.
    Variable(usize),
}

/// The AIs read: (AI, what it holds, length, digits only).
const KNOWN: [(&str, &str, Length, bool); 8] = [
    ("00", "serial shipping container code", Length::Fixed(18), true),
    ("01", "GTIN", Length::Fixed(14), true),
    ("10", "lot", Length::Variable(VARIABLE_FIELD_CHARS_MAX), false),
    ("11", "production date", Length::Fixed(6), true),
    ("15", "best before date", Length::Fixed(6), true),
    ("17", "expiry date", Length::Fixed(6), true),
    ("21", "serial number", Length::Variable(VARIABLE_FIELD_CHARS_MAX), false),
    // The national healthcare reimbursement numbers (Germany's PZN and the like).
    ("710", "national healthcare reimbursement number", Length::Variable(VARIABLE_FIELD_CHARS_MAX), false),
];

/// Why an element string was refused. Each has a stable [`code`](Self::code).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Gs1Error {
    #[error("the GS1 string is empty")]
    Empty,
    #[error("the GS1 string is {len} characters, over the limit of {max}")]
    TooLong { len: usize, max: usize },
    #[error("unknown or unsupported application identifier at {rest:?}")]
    UnknownIdentifier { rest: String },
    #[error("application identifier ({ai}) appears twice")]
    Repeated { ai: &'static str },
    #[error("({ai}) {name} must be {expected} characters, got {got}")]
    WrongLength { ai: &'static str, name: &'static str, expected: usize, got: usize },
    #[error("({ai}) {name} is empty or over {max} characters")]
    BadLength { ai: &'static str, name: &'static str, max: usize },
    #[error("({ai}) {name} must be digits only, got {value:?}")]
    NotDigits { ai: &'static str, name: &'static str, value: String },
    #[error("({ai}) {name} holds a character GS1 does not allow: {value:?}")]
    BadCharacter { ai: &'static str, name: &'static str, value: String },
    #[error("GTIN {gtin} has check digit {got}, expected {expected}")]
    CheckDigit { gtin: String, expected: u8, got: u8 },
    #[error("({ai}) {value} is not a date YYMMDD")]
    BadDate { ai: &'static str, value: String },
    #[error("the GS1 string has no ({ai}) {name}")]
    Missing { ai: &'static str, name: &'static str },
    #[error("a human-readable GS1 string must be of the form (AI)value(AI)value")]
    Unbalanced,
}

impl Gs1Error {
    pub fn code(&self) -> &'static str {
        match self {
            Gs1Error::CheckDigit { .. } => "gs1_check_digit",
            Gs1Error::Missing { .. } => "gs1_missing_identifier",
            Gs1Error::BadDate { .. } => "gs1_bad_date",
            _ => "gs1_malformed",
        }
    }
}

/// A GTIN-14 whose check digit is right.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Gtin(String);

impl Gtin {
    /// Accepts GTIN-8, -12, -13 and -14 (digits only), stored as GTIN-14.
    pub fn parse(digits: &str) -> Result<Self, Gs1Error> {
        if !matches!(digits.len(), 8 | 12 | 13 | 14) {
            return Err(Gs1Error::WrongLength { ai: "01", name: "GTIN", expected: 14, got: digits.len() });
        }
        if !digits.bytes().all(|b| b.is_ascii_digit()) {
            return Err(Gs1Error::NotDigits { ai: "01", name: "GTIN", value: digits.to_owned() });
        }
        let gtin = format!("{digits:0>14}");
        let expected = check_digit(&gtin.as_bytes()[..13]);
        let got = gtin.as_bytes()[13] - b'0';
        if got != expected {
            return Err(Gs1Error::CheckDigit { gtin, expected, got });
        }
        Ok(Gtin(gtin))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for Gtin {
    type Error = Gs1Error;
    fn try_from(s: String) -> Result<Self, Gs1Error> {
        Gtin::parse(&s)
    }
}

impl From<Gtin> for String {
    fn from(gtin: Gtin) -> String {
        gtin.0
    }
}

/// The GS1 mod-10 check digit of `digits` (ASCII digits, the check digit
/// excluded): weights 3 and 1 alternate from the rightmost digit.
fn check_digit(digits: &[u8]) -> u8 {
    let sum: u32 =
        digits.iter().rev().enumerate().map(|(i, d)| u32::from(d - b'0') * if i % 2 == 0 { 3 } else { 1 }).sum();
    ((10 - sum % 10) % 10) as u8
}

/// What a medication pack's label says, as needed at receipt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PackLabel {
    pub gtin: Gtin,
    /// The last day the product may be used.
    pub expiry: Date,
    pub lot: String,
    pub serial: Option<String>,
}

/// Reads an element string (either form). `today` places two-digit years
/// in their century (GS1 General Specifications 7.12) and is passed in:
/// this crate reads no clock. The pack must carry a GTIN (01), an expiry
/// (17) and a lot (10); a serial (21) is read when present.
pub fn parse_label(input: &str, today: Date) -> Result<PackLabel, Gs1Error> {
    let fields = parse_fields(input)?;
    let get = |ai: &'static str| fields.iter().find(|(a, _)| *a == ai).map(|(_, v)| v.as_str());
    let required = |ai: &'static str, name: &'static str| get(ai).ok_or(Gs1Error::Missing { ai, name });
    let gtin = Gtin::parse(required("01", "GTIN")?)?;
    let expiry = expiry_date("17", required("17", "expiry date")?, today)?;
    let lot = required("10", "lot")?.to_owned();
    Ok(PackLabel { gtin, expiry, lot, serial: get("21").map(str::to_owned) })
}

/// Splits an element string into (AI, value) pairs and checks each value's
/// length and characters.
fn parse_fields(input: &str) -> Result<Vec<(&'static str, String)>, Gs1Error> {
    let input = input.trim_matches(|c: char| c.is_whitespace() && c != GROUP_SEPARATOR);
    let len = input.chars().count();
    if len == 0 {
        return Err(Gs1Error::Empty);
    }
    if len > ELEMENT_STRING_CHARS_MAX {
        return Err(Gs1Error::TooLong { len, max: ELEMENT_STRING_CHARS_MAX });
    }
    let raw = if input.starts_with('(') { read_bracketed(input)? } else { read_transmitted(input)? };
    let mut fields: Vec<(&'static str, String)> = Vec::with_capacity(raw.len());
    for (spec, value) in raw {
        let (ai, name, length, digits) = spec;
        if fields.iter().any(|(seen, _)| *seen == ai) {
            return Err(Gs1Error::Repeated { ai });
        }
        match length {
            Length::Fixed(n) if value.chars().count() != n => {
                return Err(Gs1Error::WrongLength { ai, name, expected: n, got: value.chars().count() });
            }
            Length::Variable(max) if value.is_empty() || value.chars().count() > max => {
                return Err(Gs1Error::BadLength { ai, name, max });
            }
            _ => {}
        }
        if digits && !value.bytes().all(|b| b.is_ascii_digit()) {
            return Err(Gs1Error::NotDigits { ai, name, value });
        }
        // GS1's character set 82: printable ASCII without space and a few symbols.
        if !value.bytes().all(|b| {
            b.is_ascii_graphic()
                && !matches!(b, b'#' | b'$' | b'@' | b'[' | b'\\' | b']' | b'^' | b'`' | b'{' | b'|' | b'}' | b'~')
        }) {
            return Err(Gs1Error::BadCharacter { ai, name, value });
        }
        fields.push((ai, value));
    }
    Ok(fields)
}

type Spec = (&'static str, &'static str, Length, bool);

fn spec_at(rest: &str) -> Result<Spec, Gs1Error> {
    KNOWN
        .into_iter()
        .find(|(ai, ..)| rest.starts_with(ai))
        .ok_or_else(|| Gs1Error::UnknownIdentifier { rest: rest.chars().take(8).collect() })
}

/// `(01)...(17)...`: the brackets delimit the AIs, so no separators.
fn read_bracketed(input: &str) -> Result<Vec<(Spec, String)>, Gs1Error> {
    let mut fields = Vec::new();
    let mut rest = input;
    while let Some(after_open) = rest.strip_prefix('(') {
        let (ai, after_ai) = after_open.split_once(')').ok_or(Gs1Error::Unbalanced)?;
        let spec = spec_at(ai)?;
        if spec.0 != ai {
            return Err(Gs1Error::UnknownIdentifier { rest: ai.to_owned() });
        }
        let end = after_ai.find('(').unwrap_or(after_ai.len());
        fields.push((spec, after_ai[..end].to_owned()));
        rest = &after_ai[end..];
    }
    if !rest.is_empty() {
        return Err(Gs1Error::Unbalanced);
    }
    Ok(fields)
}

/// What a scanner sends: fixed-length fields run on, variable ones end at GS.
fn read_transmitted(input: &str) -> Result<Vec<(Spec, String)>, Gs1Error> {
    let mut rest = SYMBOLOGY_IDENTIFIERS.iter().find_map(|id| input.strip_prefix(id)).unwrap_or(input);
    let mut fields = Vec::new();
    while !rest.is_empty() {
        rest = rest.trim_start_matches(GROUP_SEPARATOR);
        if rest.is_empty() {
            break;
        }
        let spec = spec_at(rest)?;
        let data = &rest[spec.0.len()..];
        let end = match spec.2 {
            Length::Fixed(n) => data.char_indices().nth(n).map_or(data.len(), |(i, _)| i),
            Length::Variable(_) => data.find(GROUP_SEPARATOR).unwrap_or(data.len()),
        };
        fields.push((spec, data[..end].to_owned()));
        rest = &data[end..];
    }
    Ok(fields)
}

/// A YYMMDD date of an AI; day 00 means the last day of the month.
fn expiry_date(ai: &'static str, value: &str, today: Date) -> Result<Date, Gs1Error> {
    let bad = || Gs1Error::BadDate { ai, value: value.to_owned() };
    let number = |range: std::ops::Range<usize>| value.get(range).and_then(|s| s.parse::<u8>().ok()).ok_or_else(bad);
    let (yy, mm, dd) = (number(0..2)?, number(2..4)?, number(4..6)?);
    let year = century_year(yy, today.year());
    let month = Month::try_from(mm).map_err(|_| bad())?;
    let day = if dd == 0 { month.length(year) } else { dd };
    Date::from_calendar_date(year, month, day).map_err(|_| bad())
}

/// GS1 General Specifications 7.12: a two-digit year within 49 years back
/// and 50 years ahead of `this_year`.
fn century_year(yy: u8, this_year: i32) -> i32 {
    let century = this_year.div_euclid(100) * 100;
    let difference = i32::from(yy) - this_year.rem_euclid(100);
    match difference {
        51..=99 => century - 100 + i32::from(yy),
        -99..=-50 => century + 100 + i32::from(yy),
        _ => century + i32::from(yy),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::date;

    const TODAY: Date = date!(2026 - 12 - 07);

    #[test]
    fn the_table() {
        let gs = GROUP_SEPARATOR;
        let ok = |input: &str| parse_label(input, TODAY).unwrap_or_else(|e| panic!("{input:?}: {e}"));
        // The human-readable form and the scanned forms say the same.
        let label = ok("(01)09506000134352(17)271231(10)A1B2C3(21)SN0042");
        assert_eq!(label.gtin.as_str(), "09506000134352");
        assert_eq!(
            (label.expiry, label.lot.as_str(), label.serial.as_deref()),
            (date!(2027 - 12 - 31), "A1B2C3", Some("SN0042"))
        );
        assert_eq!(ok("]d201095060001343521727123110A1B2C3"), PackLabel { serial: None, ..label.clone() });
        assert_eq!(ok(&format!("]C1010950600013435210A1B2C3{gs}21SN0042{gs}17271231")), label);
        // Day 00 is the end of the month, February of a leap year included.
        assert_eq!(ok("(01)09506000134352(17)280200(10)L1").expiry, date!(2028 - 02 - 29));
        assert_eq!(ok("(01)09506000134352(17)270400(10)L1").expiry, date!(2027 - 04 - 30));
        // Two-digit years within 50 years ahead; 1970s packs are history.
        assert_eq!(ok("(01)09506000134352(17)760101(10)L1").expiry, date!(2076 - 01 - 01));
        assert_eq!(ok("(01)09506000134352(17)770101(10)L1").expiry, date!(1977 - 01 - 01));
        // A GTIN-13 is a GTIN-14 with a leading zero.
        assert_eq!(Gtin::parse("9506000134352").unwrap().as_str(), "09506000134352");

        let code = |input: &str| parse_label(input, TODAY).map(|_| ()).map_err(|e| (e.code(), e.to_string()));
        let cases = [
            ("(01)09506000134353(17)271231(10)L1", "gs1_check_digit"),
            ("(01)09506000134352(17)271331(10)L1", "gs1_bad_date"),
            ("(01)09506000134352(17)270230(10)L1", "gs1_bad_date"),
            ("(01)09506000134352(10)L1", "gs1_missing_identifier"),
            ("(01)09506000134352(17)271231", "gs1_missing_identifier"),
            ("(17)271231(10)L1", "gs1_missing_identifier"),
            ("(01)0950600013435(17)271231(10)L1", "gs1_malformed"),
            ("(99)ABC", "gs1_malformed"),
            ("(01)09506000134352(10)L1(10)L2(17)271231", "gs1_malformed"),
            ("(01)09506000134352(17)271231(10)LOT WITH SPACE", "gs1_malformed"),
            ("(01)09506000134352(17)271231(10)", "gs1_malformed"),
            ("(01)09506000134352(17)271231(10)ABCDEFGHIJKLMNOPQRSTU", "gs1_malformed"),
            ("(01095060001343521727123110L1", "gs1_malformed"),
            ("0109506000134352172712", "gs1_malformed"),
            ("", "gs1_malformed"),
        ];
        for (input, expected) in cases {
            let got = code(input).expect_err(input);
            assert_eq!(got.0, expected, "{input:?}: {}", got.1);
        }
    }

    #[test]
    fn check_digits_of_known_gtins() {
        for gtin in ["09506000134352", "4006381333931", "96385074", "036000291452"] {
            assert!(Gtin::parse(gtin).is_ok(), "{gtin}");
        }
    }
}
