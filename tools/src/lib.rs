//! The developer's tools: the dev stack (`scripts/run`) and the benchmarks
//! the README's figures come from, each a binary in `src/bin`. What the
//! benchmarks share (flags, `/proc` readings, percentiles) is [`bench`].
//!
//! Tools start the real service binaries through `test-fixtures`; no
//! service depends on this crate.

pub mod bench;
