//! `downbeat-bench` as a library: the pieces the benchmark binary and its tests share.
//!
//! - [`scenarios`]: the socket scenarios, each system in turn on one workload and network.
//! - [`abuse`]: a class playing while the server is attacked, phase by phase.
//! - [`cluster`]: a cluster of nodes on this machine, one killed mid-song, and sessions per
//!   node as nodes are added.
//! - [`downbeat`]: the real server binary as a child process, and simulated classrooms of
//!   native clients ([`downbeat::class`]) in a child process of their own.
//! - [`light`]: a light load generator for the capacity, handshake and fan-out scenarios:
//!   many classroom sessions on a few client endpoints, so the server, not its clients,
//!   bounds a run.
//! - [`peers`]: the peers in `bench/peers/` (Socket.IO, WebSocket timer, Socket.IO + timesync)
//!   and their client.
//! - [`netem`]: a packet-level network emulator in user space (TUN devices and a network
//!   namespace), so QUIC and TCP traffic between benchmark clients and servers cross the same
//!   impaired path.
//! - [`metrics`], [`report`], [`machine`], [`hostclock`]: what a run reports and how it is
//!   rendered (JSON, markdown with ratios, PNG CDFs), the machine and its steal, and the host
//!   clock every process shares.

#![cfg_attr(not(test), warn(clippy::unwrap_used))]

pub mod abuse;
pub mod cluster;
pub mod downbeat;
pub mod hostclock;
pub mod light;
pub mod machine;
pub mod metrics;
pub mod netem;
pub mod peers;
pub mod report;
pub mod scenarios;
