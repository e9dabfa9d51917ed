//! SEL (social-emotional learning) data: the store and the write pipeline in front of it.
//!
//! - [`store`]: one schema and one set of SQL for SQLite and PostgreSQL, idempotent writes,
//!   tenant-scoped reads, export and deletion of one child's rows.
//! - `writer`: the bounded queue every room and session hands work to without waiting, the
//!   one writer task that commits in groups and retries, health, and the retention purge.
//!
//! A room's own SEL bookkeeping (its room session, prompts, per-student tallies) is the
//! room's: see `crate::room`.

pub(crate) mod midi;
pub mod store;
mod writer;

pub(crate) use self::writer::{Health, Job, OnCommit, Sel, purge_loop, unix_ms, unix_ms_now};
