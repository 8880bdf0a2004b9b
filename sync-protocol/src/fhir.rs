//! A pure mapping of tickets to FHIR R4, so exports to other hospital systems
//! need no rework.
//!
//! FHIR's `SupplyRequest` carries exactly one item and one quantity, while a
//! ticket has several lines. A ticket therefore maps to a `Bundle` (type
//! `collection`) of one `SupplyRequest` per line, each carrying the ticket's
//! identifier so a receiver can group them again.

use serde_json::{Value, json};

use crate::ticket::{Status, Ticket, UnixMillis};

/// Identifier systems. URNs, because the hospital's own URLs are
/// configuration, not code; a deployment may map them at its FHIR gateway.
pub const TICKET_SYSTEM: &str = "urn:medsync:ticket";
pub const WARD_SYSTEM: &str = "urn:medsync:ward";
pub const USER_SYSTEM: &str = "urn:medsync:user";
pub const FORMULARY_SYSTEM: &str = "urn:medsync:formulary";
pub const STATUS_EXTENSION: &str = "urn:medsync:fhir:StructureDefinition/ticket-status";

/// The FHIR `SupplyRequest.status` for a ticket status. FHIR has fewer codes;
/// the exact status travels in the [`STATUS_EXTENSION`] extension.
pub fn supply_request_status(status: Status) -> &'static str {
    match status {
        Status::Requested | Status::Acknowledged | Status::Picking | Status::Dispatched => "active",
        Status::Delivered => "completed",
        Status::Cancelled | Status::Rejected => "cancelled",
        Status::EnteredInError => "entered-in-error",
    }
}

/// `YYYY-MM-DDThh:mm:ss.sssZ`, as FHIR's `dateTime` wants.
pub fn date_time(at: UnixMillis) -> String {
    let nanos = i128::from(at) * 1_000_000;
    time::OffsetDateTime::from_unix_timestamp_nanos(nanos)
        .ok()
        .and_then(|t| t.format(&time::format_description::well_known::Rfc3339).ok())
        .unwrap_or_else(|| "1970-01-01T00:00:00Z".to_owned())
}

/// The ticket as a FHIR R4 `Bundle` of `SupplyRequest`s, one per line item.
pub fn supply_request_bundle(ticket: &Ticket) -> Value {
    let entries: Vec<Value> = ticket
        .items
        .iter()
        .enumerate()
        .map(|(line, item)| {
            let mut request = json!({
                "resourceType": "SupplyRequest",
                "id": format!("{}-{}", ticket.id, line + 1),
                "identifier": [{ "system": TICKET_SYSTEM, "value": ticket.id.to_string() }],
                "status": supply_request_status(ticket.status),
                "extension": [{ "url": STATUS_EXTENSION, "valueCode": ticket.status.as_str() }],
                "priority": ticket.priority.as_str(),
                "itemCodeableConcept": {
                    "coding": [{ "system": FORMULARY_SYSTEM, "code": item.medication_code, "display": item.description }],
                    "text": item.description,
                },
                "quantity": { "value": item.quantity, "unit": item.unit.as_str() },
                "authoredOn": date_time(ticket.created_at),
                "requester": { "identifier": { "system": USER_SYSTEM, "value": ticket.requested_by.as_str() } },
                "deliverTo": { "identifier": { "system": WARD_SYSTEM, "value": ticket.ward.as_str() } },
            });
            if let Some(reason) = &ticket.status_reason {
                request["reasonCode"] = json!([{ "text": reason }]);
            }
            json!({ "resource": request })
        })
        .collect();
    json!({
        "resourceType": "Bundle",
        "type": "collection",
        "timestamp": date_time(ticket.updated_at),
        "entry": entries,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ticket::{LineItem, Priority, Unit};

    fn ticket(status: Status) -> Ticket {
        Ticket {
            id: crate::ids::TicketId::new(1_764_000_000_000, [1; 10]),
            ward: "ward-4b".parse().unwrap(),
            items: vec![
                LineItem {
                    medication_code: "AMOX-500".into(),
                    description: "Amoxicillin".into(),
                    quantity: 20,
                    unit: Unit::Capsule,
                },
                LineItem {
                    medication_code: "NACL-09".into(),
                    description: "Saline".into(),
                    quantity: 4,
                    unit: Unit::Bag,
                },
            ],
            priority: Priority::Stat,
            status,
            status_reason: (status == Status::Rejected).then(|| "out of stock".to_owned()),
            requested_by: "n.okafor".parse().unwrap(),
            requested_on: "edge-ward-4b".parse().unwrap(),
            created_at: 1_764_000_000_123,
            updated_at: 1_764_000_060_000,
            notes: String::new(),
            assignee: None,
            conflicts: vec![],
            order_conflicts: vec![],
            supply: vec![],
            receipt: vec![],
        }
    }

    #[test]
    fn one_supply_request_per_line_with_the_required_fields() {
        let bundle = supply_request_bundle(&ticket(Status::Picking));
        let entries = bundle["entry"].as_array().unwrap();
        assert_eq!(entries.len(), 2);
        let first = &entries[0]["resource"];
        assert_eq!(first["resourceType"], "SupplyRequest");
        assert_eq!(first["status"], "active");
        assert_eq!(first["priority"], "stat");
        assert_eq!(first["itemCodeableConcept"]["coding"][0]["code"], "AMOX-500");
        assert_eq!(first["quantity"]["value"], 20);
        assert_eq!(first["quantity"]["unit"], "capsule");
        assert_eq!(first["authoredOn"], "2025-11-24T16:00:00.123Z");
        assert_eq!(first["requester"]["identifier"]["value"], "n.okafor");
        assert_eq!(first["deliverTo"]["identifier"]["value"], "ward-4b");
        assert_eq!(entries[1]["resource"]["identifier"], first["identifier"]);
    }

    #[test]
    fn statuses_map_to_fhir_codes_and_keep_the_reason() {
        let rejected = supply_request_bundle(&ticket(Status::Rejected));
        let resource = &rejected["entry"][0]["resource"];
        assert_eq!(resource["status"], "cancelled");
        assert_eq!(resource["extension"][0]["valueCode"], "rejected");
        assert_eq!(resource["reasonCode"][0]["text"], "out of stock");
        assert_eq!(supply_request_status(Status::Delivered), "completed");
        assert_eq!(supply_request_status(Status::EnteredInError), "entered-in-error");
    }
}
