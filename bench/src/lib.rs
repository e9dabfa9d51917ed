//! `downbeat-bench` as a library: the pieces the benchmark binary and its tests share.
//!
//! - [`netem`]: a packet-level network emulator in user space (TUN devices and a network
//!   namespace), so QUIC and TCP traffic between benchmark clients and servers cross the same
//!   impaired path.

#![cfg_attr(not(test), warn(clippy::unwrap_used))]

pub mod downbeat;
pub mod hostclock;
pub mod machine;
pub mod metrics;
pub mod netem;
pub mod peers;
pub mod report;
pub mod scenarios;
