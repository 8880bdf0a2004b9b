//! The domain: who and what a ticket is (`ids`, `ticket`), what a pack's
//! label says (`gs1`), the medication catalogue (`formulary`), what is supplied and received per line (`supply`),
//! the lifecycle's
//! rules (`lifecycle`), and the canonical order of a causal graph that the
//! status fold and the history share (`causal`).

pub(crate) mod causal;
pub mod formulary;
pub mod gs1;
pub mod ids;
pub mod lifecycle;
pub mod supply;
pub mod ticket;
