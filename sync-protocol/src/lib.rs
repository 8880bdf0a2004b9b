//! The shared core of the medication replenishment system: the ticket domain,
//! the Automerge ticket documents, and the edge <-> bridge wire protocol with
//! its session state machines.
//!
//! This crate does no I/O and reads no clock: time, randomness and bytes are
//! passed in, so everything here is deterministic and testable in isolation.

//!
//! Folders by concern: `domain/` (ids, the ticket, its lifecycle, causal
//! order), `document/` (the Automerge ticket document: schema, audit,
//! checks, materialization; feature `document`), `protocol/` (wire frames,
//! session machines, admission), and beside them the token checks and the
//! FHIR mapping. Each module is reachable at the crate root
//! (`sync_protocol::ids`, `sync_protocol::wire`, ...), one path each.

#[cfg(feature = "document")]
pub mod document;
mod domain;
pub mod fhir;
mod protocol;
pub mod token;

use domain::causal;
pub use domain::{formulary, gs1, ids, lifecycle, supply, ticket};
pub use protocol::{admission, session, wire};
