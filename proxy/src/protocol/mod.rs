//! The PostgreSQL v3 wire protocol as graywire needs it: framing, startup packets, the messages
//! graywire writes itself, named SQLSTATEs and the server side of SCRAM-SHA-256.

pub mod frame;
pub mod message;
pub mod scram;
pub mod sqlstate;
pub mod sqltext;
pub mod startup;

pub use sqlstate::{SqlClass, SqlState};
