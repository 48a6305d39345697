//! graywire's write-continuity probe (sequential-id writer, verifier, ledger, gate).
//!
//! Not built yet: this crate exists so the workspace has its fixed shape; the probe is the
//! subject of its own issue and nothing in graywire depends on this crate today.
