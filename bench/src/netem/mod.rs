//! A packet-level network emulator in user space, so QUIC (UDP) and TCP/WebSocket traffic
//! between benchmark clients and servers cross the same impaired path.
//!
//! Topology, for emulator id `N` (see [`EmulatorConfig`]):
//!
//! ```text
//!  clients (namespace dbnet-N)                         servers (root namespace)
//!  10.77.N.1 .. 10.77.N.k on TUN dbc<N>   <-- emulator -->   10.78.N.1 on TUN dbs<N>
//!  route 10.78.N.0/24 via dbc<N>          (reads one device,  route 10.77.N.0/24 via dbs<N>
//!                                           impairs, writes
//!                                           the other)
//! ```
//!
//! The emulator process holds both TUN devices. A packet a client sends leaves the namespace
//! through `dbc<N>`; the emulator reads it, decides its fate on the client's uplink [`Path`]
//! (keyed by the source address) and, at its release instant, writes it unchanged into
//! `dbs<N>`, where the root namespace's kernel delivers it to the server. Replies go the other
//! way through the client's downlink path (keyed by the destination address). IP headers are
//! never rewritten, so no checksum changes. Servers listen in the root namespace on
//! [`Emulator::server_addr`] (or 0.0.0.0); clients run in the namespace
//! ([`Emulator::command_in_netns`]) and bind to [`Emulator::client_addr`] so that each gets
//! its own path. Only the server subnet is routed from the namespace, and the emulator
//! forwards nothing but client-to-server-subnet traffic, so no other address is reachable.
//!
//! The fate of packets ([`path`]) is sans-IO and tested on virtual time; profiles
//! ([`profile`]) mirror the engine's simulated network. [`check`] is the self-check behind
//! `downbeat-bench netem --check`, and [`helper`] the programs it and the tests run inside the
//! namespace.

pub mod check;
mod emulator;
pub mod helper;
pub mod path;
pub mod profile;
pub mod stats;
mod sys;

pub use emulator::{Direction, Emulator, EmulatorConfig, MAX_CLIENTS, Target};
pub use path::{DropCause, Path, Verdict};
pub use profile::{Jitter, Outages, PROFILE_NAMES, PathParams, PowerSave, Profile};
pub use stats::{DirectionStats, Histogram, Stats};
