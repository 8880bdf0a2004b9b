//! What the pharmacy supplies against each line of a ticket and what the
//! ward receives: partial supply, substitutes, backorders, receipt with lot
//! and expiry, and the rules each must pass when it is written.

use serde::{Deserialize, Serialize};
use time::Date;

use crate::gs1::{self, Gtin};
use crate::ticket::{Limits, LineItem, TicketError, check_text, is_medication_code};

time::serde::format_description!(pub(crate) calendar_date, Date, "[year]-[month]-[day]");

/// How a date is written in documents and JSON: `YYYY-MM-DD`.
pub(crate) const DATE_FORMAT: &[time::format_description::BorrowedFormatItem<'static>] =
    time::macros::format_description!("[year]-[month]-[day]");

/// What happens to the part of a line that was not supplied.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Shortfall {
    /// Still owed: the line stays open and visible until supplied in full
    /// or closed short.
    Backorder,
    /// Not coming (discontinued, out of stock for good): needs a reason.
    ClosedShort,
}

impl Shortfall {
    pub fn as_str(self) -> &'static str {
        match self {
            Shortfall::Backorder => "backorder",
            Shortfall::ClosedShort => "closed-short",
        }
    }

    pub fn parse(s: &str) -> Option<Shortfall> {
        [Shortfall::Backorder, Shortfall::ClosedShort].into_iter().find(|v| v.as_str() == s)
    }
}

/// Another product supplied in place of the one asked for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Substitute {
    pub medication_code: String,
    #[serde(default)]
    pub description: String,
    /// Why ("out of stock; generic equivalent"): a substitute needs one.
    pub reason: String,
}

/// What the pharmacy supplies against one line; `quantity` is the total
/// supplied so far (a backorder filled later raises it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LineSupply {
    /// The line's code, as the ward asked for it.
    pub medication_code: String,
    pub quantity: u32,
    #[serde(default)]
    pub substitute: Option<Substitute>,
    /// What happens to the rest when `quantity` is short of what was asked.
    #[serde(default)]
    pub shortfall: Option<Shortfall>,
    /// Why the line is short; required when it is closed short.
    #[serde(default)]
    pub reason: Option<String>,
}

impl LineSupply {
    /// Whether part of the line is still owed.
    pub fn is_backordered(&self) -> bool {
        self.shortfall == Some(Shortfall::Backorder)
    }
}

/// What went wrong with a line at the ward's door.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Discrepancy {
    Missing,
    Damaged,
    WrongItem,
}

impl Discrepancy {
    pub fn as_str(self) -> &'static str {
        match self {
            Discrepancy::Missing => "missing",
            Discrepancy::Damaged => "damaged",
            Discrepancy::WrongItem => "wrong-item",
        }
    }

    pub fn parse(s: &str) -> Option<Discrepancy> {
        [Discrepancy::Missing, Discrepancy::Damaged, Discrepancy::WrongItem].into_iter().find(|d| d.as_str() == s)
    }
}

/// What a nurse records on receiving a line: typed, or with the pack's GS1
/// string (`gs1`) from a scanner, which gives the lot, expiry, GTIN and
/// serial.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReceiptInput {
    pub medication_code: String,
    pub quantity: u32,
    #[serde(default)]
    pub discrepancy: Option<Discrepancy>,
    #[serde(default)]
    pub note: Option<String>,
    #[serde(default)]
    pub lot: Option<String>,
    /// `YYYY-MM-DD`: the last day the product may be used.
    #[serde(default, with = "calendar_date::option")]
    pub expiry: Option<Date>,
    #[serde(default)]
    pub gs1: Option<String>,
}

/// A line as received at the ward.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LineReceipt {
    pub medication_code: String,
    pub quantity: u32,
    pub discrepancy: Option<Discrepancy>,
    pub note: Option<String>,
    pub lot: Option<String>,
    #[serde(with = "calendar_date::option")]
    pub expiry: Option<Date>,
    pub gtin: Option<Gtin>,
    pub serial: Option<String>,
}

fn line<'a>(items: &'a [LineItem], code: &str) -> Result<&'a LineItem, TicketError> {
    items.iter().find(|item| item.medication_code == code).ok_or_else(|| TicketError::UnknownLine { code: code.into() })
}

fn non_empty(text: Option<&str>) -> Option<&str> {
    text.map(str::trim).filter(|t| !t.is_empty())
}

/// Checks the pharmacy's supply of lines of a ticket whose order is `items`.
pub fn check_supply(supply: &[LineSupply], items: &[LineItem], limits: &Limits) -> Result<(), TicketError> {
    let mut seen = std::collections::BTreeSet::new();
    for s in supply {
        let code = &s.medication_code;
        let asked = line(items, code)?.quantity;
        if !seen.insert(code.as_str()) {
            return Err(TicketError::DuplicateMedicationCode { code: code.clone() });
        }
        if s.quantity > asked {
            return Err(TicketError::OverSupply { code: code.clone(), asked, got: s.quantity });
        }
        match (s.quantity < asked, s.shortfall) {
            (true, None) => return Err(TicketError::ShortfallRequired { code: code.clone() }),
            (false, Some(_)) => return Err(TicketError::NotShort { code: code.clone() }),
            (true, Some(Shortfall::ClosedShort)) if non_empty(s.reason.as_deref()).is_none() => {
                return Err(TicketError::ShortReasonRequired { code: code.clone() });
            }
            _ => {}
        }
        check_text("reason", s.reason.as_deref().unwrap_or_default(), limits.reason_chars_max)?;
        if let Some(substitute) = &s.substitute {
            check_substitute(code, s.quantity, substitute, limits)?;
        }
    }
    Ok(())
}

fn check_substitute(code: &str, quantity: u32, substitute: &Substitute, limits: &Limits) -> Result<(), TicketError> {
    let invalid = |problem: &str| TicketError::InvalidSubstitute { code: code.into(), problem: problem.into() };
    if !is_medication_code(&substitute.medication_code) {
        return Err(invalid("its medication code is malformed"));
    }
    if substitute.medication_code == code {
        return Err(invalid("it is the product asked for"));
    }
    if quantity == 0 {
        return Err(invalid("none of it is supplied"));
    }
    if non_empty(Some(&substitute.reason)).is_none() {
        return Err(invalid("it needs a reason"));
    }
    check_text("description", &substitute.description, limits.description_chars_max)?;
    check_text("reason", &substitute.reason, limits.reason_chars_max)
}

/// Turns what a nurse recorded into a receipt, checked against what was
/// asked (`items`) and supplied (`supply`). `today` decides what has
/// expired and places a GS1 string's two-digit years.
pub fn receive(
    input: &ReceiptInput,
    items: &[LineItem],
    supply: &[LineSupply],
    today: Date,
    limits: &Limits,
) -> Result<LineReceipt, TicketError> {
    let code = &input.medication_code;
    let asked = line(items, code)?.quantity;
    let sent = supply.iter().find(|s| &s.medication_code == code).map_or(asked, |s| s.quantity);
    if input.quantity > sent {
        return Err(TicketError::OverReceipt { code: code.clone(), sent, got: input.quantity });
    }
    let note = non_empty(input.note.as_deref()).map(str::to_owned);
    match (input.discrepancy, &note) {
        (None, _) if input.quantity < sent => {
            return Err(TicketError::DiscrepancyRequired { code: code.clone(), sent, got: input.quantity });
        }
        (Some(_), None) => return Err(TicketError::DiscrepancyNoteRequired { code: code.clone() }),
        _ => {}
    }
    check_text("note", note.as_deref().unwrap_or_default(), limits.reason_chars_max)?;
    let (mut lot, mut expiry) = (non_empty(input.lot.as_deref()).map(str::to_owned), input.expiry);
    let (mut gtin, mut serial) = (None, None);
    if let Some(scanned) = &input.gs1 {
        let label =
            gs1::parse_label(scanned, today).map_err(|e| TicketError::Label { code: code.clone(), error: e })?;
        let mismatch = |field| TicketError::LabelMismatch { code: code.clone(), field };
        if lot.as_ref().is_some_and(|typed| *typed != label.lot) {
            return Err(mismatch("lot"));
        }
        if expiry.is_some_and(|typed| typed != label.expiry) {
            return Err(mismatch("expiry"));
        }
        (lot, expiry, gtin, serial) = (Some(label.lot), Some(label.expiry), Some(label.gtin), label.serial);
    }
    if input.quantity > 0 && (lot.is_none() || expiry.is_none()) {
        return Err(TicketError::LotAndExpiryRequired { code: code.clone() });
    }
    check_text("lot", lot.as_deref().unwrap_or_default(), gs1::VARIABLE_FIELD_CHARS_MAX)?;
    if let Some(expiry) = expiry.filter(|expiry| *expiry < today) {
        return Err(TicketError::ExpiredProduct { code: code.clone(), expiry });
    }
    Ok(LineReceipt {
        medication_code: code.clone(),
        quantity: input.quantity,
        discrepancy: input.discrepancy,
        note,
        lot,
        expiry,
        gtin,
        serial,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ticket::Unit;
    use time::macros::date;

    const TODAY: Date = date!(2026 - 12 - 07);

    fn items() -> Vec<LineItem> {
        vec![LineItem {
            medication_code: "AMOX-500".into(),
            description: String::new(),
            quantity: 20,
            unit: Unit::Capsule,
        }]
    }

    fn supply(quantity: u32, shortfall: Option<Shortfall>, reason: Option<&str>) -> LineSupply {
        LineSupply {
            medication_code: "AMOX-500".into(),
            quantity,
            substitute: None,
            shortfall,
            reason: reason.map(Into::into),
        }
    }

    #[test]
    fn supply_rules() {
        let limits = Limits::default();
        let check = |s: LineSupply| check_supply(&[s], &items(), &limits).map_err(|e| e.code());
        assert_eq!(check(supply(20, None, None)), Ok(()));
        assert_eq!(check(supply(10, Some(Shortfall::Backorder), None)), Ok(()));
        assert_eq!(check(supply(10, Some(Shortfall::ClosedShort), Some("discontinued"))), Ok(()));
        assert_eq!(check(supply(21, None, None)), Err("over_supply"));
        assert_eq!(check(supply(10, None, None)), Err("shortfall_required"));
        assert_eq!(check(supply(20, Some(Shortfall::Backorder), None)), Err("not_short"));
        assert_eq!(check(supply(10, Some(Shortfall::ClosedShort), Some("  "))), Err("reason_required"));
        assert_eq!(
            check(LineSupply { medication_code: "NOPE-1".into(), ..supply(1, None, None) }),
            Err("unknown_line")
        );
        let substitute = |code: &str, reason: &str| Substitute {
            medication_code: code.into(),
            description: "Clarithromycin 250 mg".into(),
            reason: reason.into(),
        };
        let with = |s: Substitute, quantity| LineSupply { substitute: Some(s), ..supply(quantity, None, None) };
        assert_eq!(check(with(substitute("CLAR-250", "penicillin allergy"), 20)), Ok(()));
        assert_eq!(check(with(substitute("CLAR-250", ""), 20)), Err("invalid_substitute"));
        assert_eq!(check(with(substitute("AMOX-500", "same"), 20)), Err("invalid_substitute"));
        assert_eq!(check(with(substitute("clar 250", "x"), 20)), Err("invalid_substitute"));
    }

    #[test]
    fn receipt_rules() {
        let limits = Limits::default();
        let sent = [supply(10, Some(Shortfall::Backorder), None)];
        let input = |quantity, discrepancy: Option<Discrepancy>, note: Option<&str>| ReceiptInput {
            medication_code: "AMOX-500".into(),
            quantity,
            discrepancy,
            note: note.map(Into::into),
            lot: Some("L1".into()),
            expiry: Some(date!(2027 - 06 - 30)),
            gs1: None,
        };
        let check = |input: ReceiptInput| receive(&input, &items(), &sent, TODAY, &limits).map_err(|e| e.code());
        assert!(check(input(10, None, None)).is_ok());
        assert_eq!(check(input(11, None, None)), Err("over_receipt"));
        assert_eq!(check(input(8, None, None)), Err("discrepancy_required"));
        assert_eq!(check(input(8, Some(Discrepancy::Damaged), None)), Err("note_required"));
        assert!(check(input(8, Some(Discrepancy::Damaged), Some("two crushed"))).is_ok());
        assert_eq!(check(ReceiptInput { lot: None, ..input(10, None, None) }), Err("lot_and_expiry_required"));
        assert_eq!(
            check(ReceiptInput { expiry: Some(date!(2026 - 12 - 06)), ..input(10, None, None) }),
            Err("expired_product")
        );
        assert!(
            check(ReceiptInput { expiry: Some(TODAY), ..input(10, None, None) }).is_ok(),
            "usable through its expiry day"
        );
        // A scanned pack fills lot and expiry; a typed value that disagrees is refused.
        let scanned = |lot: Option<&str>, gs1: &str| ReceiptInput {
            lot: lot.map(Into::into),
            expiry: None,
            gs1: Some(gs1.into()),
            ..input(10, None, None)
        };
        let receipt =
            receive(&scanned(None, "(01)09506000134352(17)270600(10)B42"), &items(), &sent, TODAY, &limits).unwrap();
        assert_eq!((receipt.lot.as_deref(), receipt.expiry), (Some("B42"), Some(date!(2027 - 06 - 30))));
        assert_eq!(receipt.gtin.map(String::from).as_deref(), Some("09506000134352"));
        assert_eq!(check(scanned(Some("B43"), "(01)09506000134352(17)270600(10)B42")), Err("label_mismatch"));
        assert_eq!(check(scanned(None, "(01)09506000134352(17)261130(10)B42")), Err("expired_product"));
        assert_eq!(check(scanned(None, "(01)09506000134353(17)270600(10)B42")), Err("gs1_check_digit"));
    }
}
