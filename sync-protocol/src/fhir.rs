//! A pure mapping of tickets to FHIR R4, so exports to other hospital systems
//! need no rework. A ticket maps to a `Bundle` (type `collection`) of:
//!
//! - one `SupplyRequest` per line: FHIR's carries exactly one item and one
//!   quantity. R4's `SupplyRequest` has no `groupIdentifier`, so the lines
//!   share the ticket's `identifier`, and the `Task` groups them;
//! - one `Task` for the workflow: `status` (and the exact ticket status in
//!   `businessStatus`), `statusReason` for rejected and cancelled tickets,
//!   `owner` the assignee, `groupIdentifier` the ticket, `basedOn` the lines;
//! - one `SupplyDelivery` per line with a supply recorded: the quantity
//!   supplied, the substitute as `suppliedItem`, and the pack received (lot,
//!   expiry, GTIN) as a contained `Medication` with its `batch`, since R4's
//!   `SupplyDelivery` has no lot or expiry of its own.
//!
//! Entries are linked by `urn:uuid:` full URLs derived from the ticket id,
//! so the same ticket always maps to the same bundle.

use serde_json::{Value, json};
use uuid::Uuid;

use crate::supply::{LineReceipt, LineSupply};
use crate::ticket::{LineItem, Status, Ticket, utc_iso8601};

/// Identifier systems. URNs, because the hospital's own URLs are
/// configuration, not code; a deployment may map them at its FHIR gateway.
pub const TICKET_SYSTEM: &str = "urn:medsync:ticket";
pub const WARD_SYSTEM: &str = "urn:medsync:ward";
pub const USER_SYSTEM: &str = "urn:medsync:user";
pub const FORMULARY_SYSTEM: &str = "urn:medsync:formulary";
pub const GTIN_SYSTEM: &str = "https://www.gs1.org/gtin";
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

/// The FHIR `Task.status` for a ticket status.
pub fn task_status(status: Status) -> &'static str {
    match status {
        Status::Requested => "requested",
        Status::Acknowledged => "accepted",
        Status::Picking | Status::Dispatched => "in-progress",
        Status::Delivered => "completed",
        Status::Cancelled => "cancelled",
        Status::Rejected => "rejected",
        Status::EnteredInError => "entered-in-error",
    }
}

/// The stable `urn:uuid:` of one resource of a ticket's bundle.
fn full_url(ticket: &Ticket, resource: &str) -> String {
    let namespace = Uuid::parse_str(&ticket.id.to_string()).unwrap_or(Uuid::NAMESPACE_OID);
    format!("urn:uuid:{}", Uuid::new_v5(&namespace, resource.as_bytes()))
}

fn entry(full_url: String, mut resource: Value) -> Value {
    resource["id"] = json!(full_url.trim_start_matches("urn:uuid:"));
    json!({ "fullUrl": full_url, "resource": resource })
}

fn user(user: &str) -> Value {
    json!({ "identifier": { "system": USER_SYSTEM, "value": user } })
}

fn product(code: &str, description: &str) -> Value {
    let text = if description.is_empty() { code } else { description };
    json!({ "coding": [{ "system": FORMULARY_SYSTEM, "code": code, "display": text }], "text": text })
}

/// The ticket as a FHIR R4 `Bundle`: see the module docs.
pub fn ticket_bundle(ticket: &Ticket) -> Value {
    let requests: Vec<(String, Value)> = ticket
        .items
        .iter()
        .map(|item| {
            (full_url(ticket, &format!("SupplyRequest/{}", item.medication_code)), supply_request(ticket, item))
        })
        .collect();
    let mut entries = vec![entry(full_url(ticket, "Task"), task(ticket, &requests))];
    for (url, request) in &requests {
        entries.push(entry(url.clone(), request.clone()));
    }
    for supplied in ticket.supply.iter().filter(|s| s.quantity > 0) {
        let Some((url, _)) = ticket
            .items
            .iter()
            .zip(&requests)
            .find(|(item, _)| item.medication_code == supplied.medication_code)
            .map(|(_, r)| r)
        else {
            continue; // a line the ward removed after it was supplied: the Task's history has it
        };
        let received = ticket.receipt.iter().find(|r| r.medication_code == supplied.medication_code);
        let delivery = supply_delivery(ticket, supplied, received, url);
        entries.push(entry(full_url(ticket, &format!("SupplyDelivery/{}", supplied.medication_code)), delivery));
    }
    json!({
        "resourceType": "Bundle",
        "type": "collection",
        "timestamp": utc_iso8601(ticket.updated_at),
        "entry": entries,
    })
}

fn supply_request(ticket: &Ticket, item: &LineItem) -> Value {
    let mut request = json!({
        "resourceType": "SupplyRequest",
        "identifier": [{ "system": TICKET_SYSTEM, "value": ticket.id.to_string() }],
        "status": supply_request_status(ticket.status),
        "extension": [{ "url": STATUS_EXTENSION, "valueCode": ticket.status.as_str() }],
        "priority": ticket.priority.as_str(),
        "itemCodeableConcept": product(&item.medication_code, &item.description),
        "quantity": { "value": item.quantity, "unit": item.unit.as_str() },
        "authoredOn": utc_iso8601(ticket.created_at),
        "requester": user(ticket.requested_by.as_str()),
        "deliverTo": { "identifier": { "system": WARD_SYSTEM, "value": ticket.ward.as_str() } },
    });
    if let Some(reason) = &ticket.status_reason {
        request["reasonCode"] = json!([{ "text": reason }]);
    }
    request
}

fn task(ticket: &Ticket, requests: &[(String, Value)]) -> Value {
    let mut task = json!({
        "resourceType": "Task",
        "identifier": [{ "system": TICKET_SYSTEM, "value": ticket.id.to_string() }],
        "groupIdentifier": { "system": TICKET_SYSTEM, "value": ticket.id.to_string() },
        "basedOn": requests.iter().map(|(url, _)| json!({ "reference": url })).collect::<Vec<_>>(),
        "status": task_status(ticket.status),
        "businessStatus": { "text": ticket.status.as_str() },
        "intent": "order",
        "priority": ticket.priority.as_str(),
        "authoredOn": utc_iso8601(ticket.created_at),
        "lastModified": utc_iso8601(ticket.updated_at),
        "requester": user(ticket.requested_by.as_str()),
    });
    if let Some(reason) =
        ticket.status_reason.as_ref().filter(|_| matches!(ticket.status, Status::Rejected | Status::Cancelled))
    {
        task["statusReason"] = json!({ "text": reason });
    }
    if let Some(assignee) = &ticket.assignee {
        task["owner"] = user(assignee.as_str());
    }
    if !ticket.notes.is_empty() {
        task["note"] = json!([{ "text": ticket.notes }]);
    }
    task
}

fn supply_delivery(ticket: &Ticket, supplied: &LineSupply, received: Option<&LineReceipt>, request: &str) -> Value {
    let (code, description) = match &supplied.substitute {
        Some(substitute) => (substitute.medication_code.as_str(), substitute.description.as_str()),
        None => {
            let item = ticket.items.iter().find(|i| i.medication_code == supplied.medication_code);
            (supplied.medication_code.as_str(), item.map_or("", |i| i.description.as_str()))
        }
    };
    let status = match (ticket.status, received) {
        (Status::Delivered, Some(_)) => "completed",
        (Status::Cancelled | Status::Rejected, _) => "abandoned",
        (Status::EnteredInError, _) => "entered-in-error",
        _ => "in-progress",
    };
    let mut delivery = json!({
        "resourceType": "SupplyDelivery",
        "identifier": [{ "system": TICKET_SYSTEM, "value": ticket.id.to_string() }],
        "basedOn": [{ "reference": request }],
        "status": status,
        "suppliedItem": { "quantity": { "value": supplied.quantity }, "itemCodeableConcept": product(code, description) },
        "destination": { "identifier": { "system": WARD_SYSTEM, "value": ticket.ward.as_str() } },
    });
    if let Some(received) = received.filter(|r| r.lot.is_some() || r.expiry.is_some() || r.gtin.is_some()) {
        let mut coding = vec![json!({ "system": FORMULARY_SYSTEM, "code": code })];
        if let Some(gtin) = &received.gtin {
            coding.push(json!({ "system": GTIN_SYSTEM, "code": gtin.as_str() }));
        }
        let mut batch = json!({});
        if let Some(lot) = &received.lot {
            batch["lotNumber"] = json!(lot);
        }
        if let Some(expiry) = received.expiry.and_then(|e| e.format(crate::supply::DATE_FORMAT).ok()) {
            batch["expirationDate"] = json!(expiry);
        }
        delivery["contained"] =
            json!([{ "resourceType": "Medication", "id": "pack", "code": { "coding": coding }, "batch": batch }]);
        delivery["suppliedItem"] =
            json!({ "quantity": { "value": supplied.quantity }, "itemReference": { "reference": "#pack" } });
    }
    delivery
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
            created_at_utc: "2025-11-24T16:00:00.123Z".into(),
            updated_at_utc: "2025-11-24T16:01:00Z".into(),
            notes: String::new(),
            assignee: None,
            conflicts: vec![],
            order_conflicts: vec![],
            supply: vec![],
            receipt: vec![],
        }
    }

    fn resources<'a>(bundle: &'a Value, kind: &str) -> Vec<&'a Value> {
        let entries = bundle["entry"].as_array().unwrap();
        entries.iter().map(|e| &e["resource"]).filter(|r| r["resourceType"] == kind).collect()
    }

    #[test]
    fn one_supply_request_per_line_with_the_required_fields() {
        let bundle = ticket_bundle(&ticket(Status::Picking));
        let requests = resources(&bundle, "SupplyRequest");
        assert_eq!(requests.len(), 2);
        let first = requests[0];
        assert_eq!(first["status"], "active");
        assert_eq!(first["priority"], "stat");
        assert_eq!(first["itemCodeableConcept"]["coding"][0]["code"], "AMOX-500");
        assert_eq!(first["quantity"]["value"], 20);
        assert_eq!(first["quantity"]["unit"], "capsule");
        assert_eq!(first["authoredOn"], "2025-11-24T16:00:00.123Z");
        assert_eq!(first["requester"]["identifier"]["value"], "n.okafor");
        assert_eq!(first["deliverTo"]["identifier"]["value"], "ward-4b");
        assert_eq!(requests[1]["identifier"], first["identifier"]);
        let task = resources(&bundle, "Task")[0];
        assert_eq!((task["status"].as_str(), task["intent"].as_str()), (Some("in-progress"), Some("order")));
        let based_on: Vec<&Value> = task["basedOn"].as_array().unwrap().iter().map(|r| &r["reference"]).collect();
        let urls: Vec<&Value> = bundle["entry"].as_array().unwrap().iter().skip(1).map(|e| &e["fullUrl"]).collect();
        assert_eq!(based_on, urls, "the task is based on every line");
        assert_eq!(ticket_bundle(&ticket(Status::Picking)), bundle, "the same ticket maps to the same bundle");
    }

    #[test]
    fn statuses_map_to_fhir_codes_and_keep_the_reason() {
        let rejected = ticket_bundle(&ticket(Status::Rejected));
        let resource = resources(&rejected, "SupplyRequest")[0];
        assert_eq!(resource["status"], "cancelled");
        assert_eq!(resource["extension"][0]["valueCode"], "rejected");
        assert_eq!(resource["reasonCode"][0]["text"], "out of stock");
        let task = resources(&rejected, "Task")[0];
        assert_eq!(
            (task["status"].as_str(), task["statusReason"]["text"].as_str()),
            (Some("rejected"), Some("out of stock"))
        );
        assert_eq!(supply_request_status(Status::Delivered), "completed");
        assert_eq!(supply_request_status(Status::EnteredInError), "entered-in-error");
    }

    #[test]
    fn a_supplied_line_is_a_supply_delivery_with_its_substitute_and_pack() {
        use crate::supply::{Discrepancy, LineReceipt, LineSupply, Substitute};
        let mut delivered = ticket(Status::Delivered);
        delivered.assignee = Some("p.lindqvist".parse().unwrap());
        delivered.supply = vec![LineSupply {
            medication_code: "AMOX-500".into(),
            quantity: 20,
            substitute: Some(Substitute {
                medication_code: "CLAR-250".into(),
                description: "Clarithromycin".into(),
                reason: "allergy".into(),
            }),
            shortfall: None,
            reason: None,
        }];
        delivered.receipt = vec![LineReceipt {
            medication_code: "AMOX-500".into(),
            quantity: 19,
            discrepancy: Some(Discrepancy::Damaged),
            note: Some("one crushed".into()),
            lot: Some("B42".into()),
            expiry: Some(time::macros::date!(2027 - 06 - 30)),
            gtin: Some(crate::gs1::Gtin::parse("09506000134352").unwrap()),
            serial: None,
        }];
        let bundle = ticket_bundle(&delivered);
        assert_eq!(resources(&bundle, "Task")[0]["owner"]["identifier"]["value"], "p.lindqvist");
        let deliveries = resources(&bundle, "SupplyDelivery");
        assert_eq!(deliveries.len(), 1, "only the supplied line");
        let delivery = deliveries[0];
        assert_eq!(
            (delivery["status"].as_str(), delivery["suppliedItem"]["quantity"]["value"].as_u64()),
            (Some("completed"), Some(20))
        );
        let pack = &delivery["contained"][0];
        assert_eq!(pack["code"]["coding"][0]["code"], "CLAR-250", "the substitute is what was supplied");
        assert_eq!(
            (pack["batch"]["lotNumber"].as_str(), pack["batch"]["expirationDate"].as_str()),
            (Some("B42"), Some("2027-06-30"))
        );
        assert_eq!(delivery["suppliedItem"]["itemReference"]["reference"], "#pack");
    }
}
