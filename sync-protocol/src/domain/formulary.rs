//! The hospital's medication catalogue: which codes a ticket line may name,
//! with the unit each is counted in. A pharmacy admin keeps it in the
//! cloud; a line that names a code the catalogue lacks, an inactive one, or
//! another unit is flagged for the pharmacy ([`check_items`]).

use serde::{Deserialize, Serialize};

use crate::gs1::Gtin;
use crate::ticket::{Limits, LineItem, TicketError, Unit, check_text, is_medication_code};

/// The most GTINs (pack sizes, suppliers) one catalogue entry lists.
pub const GTINS_PER_MEDICATION_MAX: usize = 20;
/// The longest strength or form text ("500 mg", "film-coated tablet").
pub const DETAIL_CHARS_MAX: usize = 100;

/// One entry of the catalogue.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Medication {
    pub code: String,
    pub name: String,
    #[serde(default)]
    pub strength: String,
    #[serde(default)]
    pub form: String,
    /// The unit a line of this medication is counted in.
    pub unit: Unit,
    #[serde(default)]
    pub gtins: Vec<Gtin>,
    /// An inactive entry stays for the record; new lines should not use it.
    pub active: bool,
}

impl Medication {
    pub fn validate(&self, limits: &Limits) -> Result<(), TicketError> {
        if !is_medication_code(&self.code) {
            return Err(TicketError::MalformedMedicationCode { code: self.code.clone() });
        }
        if self.name.trim().is_empty() {
            return Err(TicketError::InvalidMedication { code: self.code.clone(), problem: "it needs a name" });
        }
        check_text("name", &self.name, limits.description_chars_max)?;
        check_text("strength", &self.strength, DETAIL_CHARS_MAX)?;
        check_text("form", &self.form, DETAIL_CHARS_MAX)?;
        if self.gtins.len() > GTINS_PER_MEDICATION_MAX {
            return Err(TicketError::InvalidMedication { code: self.code.clone(), problem: "it lists too many GTINs" });
        }
        let mut gtins: Vec<&Gtin> = self.gtins.iter().collect();
        gtins.sort();
        gtins.dedup();
        if gtins.len() != self.gtins.len() {
            return Err(TicketError::InvalidMedication { code: self.code.clone(), problem: "it lists a GTIN twice" });
        }
        Ok(())
    }
}

/// What is wrong with a line against the catalogue.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "code", rename_all = "snake_case")]
pub enum FormularyIssue {
    /// The catalogue has no such code.
    UnknownMedication { medication_code: String },
    /// The catalogue lists it as no longer in use.
    InactiveMedication { medication_code: String },
    /// The line counts it in another unit than the catalogue.
    WrongUnit { medication_code: String, expected: Unit, got: Unit },
}

impl FormularyIssue {
    /// The stable code an HTTP edge answers with (the same as the JSON tag).
    pub fn code(&self) -> &'static str {
        match self {
            FormularyIssue::UnknownMedication { .. } => "unknown_medication",
            FormularyIssue::InactiveMedication { .. } => "inactive_medication",
            FormularyIssue::WrongUnit { .. } => "wrong_unit",
        }
    }
}

impl std::fmt::Display for FormularyIssue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FormularyIssue::UnknownMedication { medication_code } => {
                write!(f, "{medication_code} is not in the formulary")
            }
            FormularyIssue::InactiveMedication { medication_code } => {
                write!(f, "{medication_code} is retired from the formulary")
            }
            FormularyIssue::WrongUnit { medication_code, expected, got } => {
                write!(f, "{medication_code} is counted in {}, not {}", expected.as_str(), got.as_str())
            }
        }
    }
}

/// The issues of `items` against the catalogue, looked up by code: empty
/// when every line names an active entry in its unit.
pub fn check_items<'a>(items: &[LineItem], lookup: impl Fn(&str) -> Option<&'a Medication>) -> Vec<FormularyIssue> {
    items
        .iter()
        .filter_map(|item| {
            let medication_code = item.medication_code.clone();
            match lookup(&item.medication_code) {
                None => Some(FormularyIssue::UnknownMedication { medication_code }),
                Some(entry) if !entry.active => Some(FormularyIssue::InactiveMedication { medication_code }),
                Some(entry) if entry.unit != item.unit => {
                    Some(FormularyIssue::WrongUnit { medication_code, expected: entry.unit, got: item.unit })
                }
                Some(_) => None,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn amoxicillin() -> Medication {
        Medication {
            code: "AMOX-500".into(),
            name: "Amoxicillin".into(),
            strength: "500 mg".into(),
            form: "capsule".into(),
            unit: Unit::Capsule,
            gtins: vec![Gtin::parse("09506000134352").unwrap()],
            active: true,
        }
    }

    #[test]
    fn lines_are_checked_against_the_catalogue() {
        let (active, mut retired) = (amoxicillin(), amoxicillin());
        retired.code = "AMOX-250".into();
        retired.active = false;
        let catalogue = [active, retired];
        let lookup = |code: &str| catalogue.iter().find(|m| m.code == code);
        let line =
            |code: &str, unit| LineItem { medication_code: code.into(), description: String::new(), quantity: 1, unit };
        assert_eq!(check_items(&[line("AMOX-500", Unit::Capsule)], lookup), []);
        let issues = check_items(
            &[line("AMOX-500", Unit::Tablet), line("AMOX-250", Unit::Capsule), line("NOPE-1", Unit::Vial)],
            lookup,
        );
        let codes: Vec<String> =
            issues.iter().map(|i| serde_json::to_value(i).unwrap()["code"].as_str().unwrap().to_owned()).collect();
        assert_eq!(codes, ["wrong_unit", "inactive_medication", "unknown_medication"]);
        assert_eq!(issues.iter().map(FormularyIssue::code).collect::<Vec<_>>(), codes, "one name for each");
        assert_eq!(issues[0].to_string(), "AMOX-500 is counted in capsule, not tablet");
    }

    #[test]
    fn entries_are_validated() {
        let limits = Limits::default();
        assert_eq!(amoxicillin().validate(&limits), Ok(()));
        let code = |m: Medication| m.validate(&limits).map_err(|e| e.code());
        assert_eq!(code(Medication { code: "amox".into(), ..amoxicillin() }), Err("malformed_medication_code"));
        assert_eq!(code(Medication { name: " ".into(), ..amoxicillin() }), Err("invalid_medication"));
        let twice = Gtin::parse("09506000134352").unwrap();
        assert_eq!(code(Medication { gtins: vec![twice.clone(), twice], ..amoxicillin() }), Err("invalid_medication"));
    }
}
