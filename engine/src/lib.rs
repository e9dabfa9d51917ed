//! Downbeat's sans-IO heart.
//!
//! - [`timeline`]: a room's musical timeline as exact integer math: beat `n` sounds at one
//!   exact server instant, with no accumulated error however many beats have passed; tempo,
//!   meter, start and stop take effect at a future bar boundary announced ahead of time.
//! - [`clock`]: the NTP-style clock-sync estimator every client runs (native and browser):
//!   four timestamps per exchange, minimum-delay filtering, outlier rejection, drift by
//!   regression, and a resync schedule that is faster while uncertain.
//! - [`room`]: the server's per-room state machine: seats by token subject (grace period,
//!   takeover), presence in one order, teacher controls and their checks, mute, notes
//!   (validated, de-duplicated, muted or rate-limited, fanned out with redundancy) and the
//!   abuse policy, idle expiry, and what to hand the SEL writer. Its [`room::Stage`] holds the
//!   timeline and the paced beat frames sent ahead of time. A room's state is plain data
//!   (serde), so it can move between processes.
//! - [`client`]: the client state machine: clock sync plus the newest timeline, answering "at
//!   what instant of my own clock does beat n sound"; it stamps the notes its student plays and
//!   schedules classmates' notes at their shared playout instant.
//! - [`session`]: one client session on top of [`client`]: hello and welcome, presence, the
//!   reflection prompt, numbered requests matched to the server's answers and refusals, and
//!   why the session ended, as events a shell (native or browser, any transport) translates.
//! - [`probe`]: a network check: a session that needs no token and only syncs its clock for a
//!   few seconds, summed up as round trips, the estimator's uncertainty and a sync quality
//!   (what the `/check` page shows for each transport).
//! - [`notes`]: what a note's playout instant is, the range checks, redundancy and
//!   de-duplication shared by both sides.
//! - [`sel`]: participation measured on the shared timeline (how far each note landed from
//!   the beat, turns in assigned parts) and the collaboration score.
//! - [`limit`]: an exact integer token bucket (per-member note rate).
//! - [`sim`]: a deterministic simulation harness (virtual time, a lossy, jittery, asymmetric
//!   network, client clocks with offset and drift) used by the tests and the benchmark; it
//!   carries beats, clock sync and notes as datagrams (WebTransport) or over a TCP-like
//!   connection (WebSocket: retransmissions, head-of-line blocking, the server's outbox), and
//!   records the true instant every note sounds.
//!
//! What this crate deliberately does not do: it never reads a clock, sleeps, spawns, or touches
//! a socket. Every entry point takes `now` as an argument (`handle_*`) and hands back what to
//! send (`poll_*`), so the same code runs on the server, in native clients, in the browser
//! (it builds for `wasm32-unknown-unknown`) and under virtual time in tests.
#![cfg_attr(not(test), warn(clippy::unwrap_used))]

pub mod client;
pub mod clock;
pub mod limit;
pub mod notes;
pub mod probe;
pub mod room;
pub mod sel;
pub mod session;
#[cfg(any(test, feature = "sim"))]
pub mod sim;
pub mod take;
pub mod timeline;

pub use downbeat_protocol as protocol;
