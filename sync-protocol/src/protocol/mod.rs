//! The edge <-> bridge protocol: frames (`wire`), the session state
//! machines that make every protocol decision (`session`), and the
//! bridge's rule for which database speaks for a node (`admission`).

pub mod admission;
pub mod session;
pub mod wire;
