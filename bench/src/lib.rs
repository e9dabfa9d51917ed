//! `downbeat-bench` as a library: the pieces the benchmark binary and its tests share.
//!
//! - [`netem`]: a packet-level network emulator in user space (TUN devices and a network
//!   namespace), so QUIC and TCP traffic between benchmark clients and servers cross the same
//!   impaired path.

#![cfg_attr(not(test), warn(clippy::unwrap_used))]

pub mod netem;
