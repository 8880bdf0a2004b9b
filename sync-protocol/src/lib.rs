//! The shared core of the medication replenishment system: the ticket domain,
//! the Automerge ticket documents, and the edge <-> bridge wire protocol with
//! its session state machines.
//!
//! This crate does no I/O and reads no clock: time, randomness and bytes are
//! passed in, so everything here is deterministic and testable in isolation.

pub mod admission;
mod causal;
#[cfg(feature = "document")]
pub mod document;
pub mod fhir;
pub mod ids;
pub mod lifecycle;
pub mod session;
pub mod ticket;
pub mod token;
pub mod wire;
