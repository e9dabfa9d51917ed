//! Downbeat's wire protocol: the types that cross the network and their postcard codec.
//!
//! Two channels carry these types:
//! - **datagrams** (unreliable, unordered): clock-sync requests and replies, and beat frames
//!   that each carry the whole room timeline plus the next few beats, so any one datagram may be
//!   lost, duplicated or reordered at no cost ([`ClientDatagram`], [`ServerDatagram`]);
//! - **the control stream** (one reliable bidirectional stream per session): length-prefixed
//!   postcard frames, [`ClientMessage`] up and [`ServerMessage`] down, starting with a
//!   [`Hello`] that names the [`PROTOCOL_VERSION`] (or, for a network check that needs no
//!   token and may only sync its clock, [`ClientMessage::Probe`]).
//!
//! WebTransport carries them as a bidirectional stream and QUIC datagrams; on networks that
//! block QUIC, one WebSocket carries both, each message tagged ([`ws`]).
//!
//! Compatibility rules, enforced by review and by the fuzz targets in `fuzz/`:
//! - postcard is not self-describing and encodes enum variants by index: variants are only ever
//!   appended, never reordered or removed;
//! - no `usize` on the wire (wasm32 is 32-bit): every integer has an explicit width;
//! - every length a peer controls is capped *before* anything is allocated ([`BoundedVec`],
//!   [`BoundedString`], [`MAX_FRAME_LEN`]); decoders return errors, never panic.
//!
//! This crate does no I/O and knows nothing of tokio or sockets; it builds for
//! `wasm32-unknown-unknown`.
#![no_std]
#![cfg_attr(not(test), warn(clippy::unwrap_used))]

extern crate alloc;

mod bounded;
mod codec;
mod error;
mod size;
mod text;
mod time;
mod wire;
pub mod ws;

pub use bounded::{BoundedString, BoundedVec, TooLong};
pub use codec::{
    DecodeError, EncodeError, FRAME_HEADER_LEN, FrameDecoder, decode_client_datagram, decode_frame_body,
    decode_server_datagram, encode_client_datagram, encode_frame, encode_server_datagram,
    encode_server_datagram_to_slice, frame_body_len,
};
pub use error::ErrorCode;
pub use size::{MAX_SYNC_REPLY_LEN, MAX_WELCOME_LEN};
pub use text::{BadText, TextKind, check_text};
pub use time::{ClientNanos, MicroBpm, ServerNanos};
pub use wire::*;

/// The protocol version this build speaks. A [`Hello`] with another version is refused with
/// [`ErrorCode::UnsupportedVersion`].
pub const PROTOCOL_VERSION: u16 = 2;

/// Hard cap on one control-stream frame body, checked before the body is read or allocated.
pub const MAX_FRAME_LEN: u32 = 16 * 1024;
/// Hard cap on a datagram this protocol will try to decode (QUIC datagrams are smaller still).
pub const MAX_DATAGRAM_LEN: usize = 1500;
/// Most timeline segments (the one in force plus announced future changes) a timeline carries.
pub const MAX_SEGMENTS: usize = 8;
/// Most beats one beat frame carries.
pub const MAX_BEATS_PER_FRAME: usize = 16;
/// Longest token a hello may carry, in bytes.
pub const MAX_TOKEN_LEN: usize = 4096;
/// Longest join code as typed, in bytes.
pub const MAX_JOIN_CODE_LEN: usize = 16;
/// Longest part name, in bytes.
pub const MAX_PART_LEN: usize = 32;
/// Most beats of the bar one assignment names.
pub const MAX_ASSIGNED_BEATS: usize = 16;
/// Most notes one note datagram carries.
pub const MAX_NOTES_PER_DATAGRAM: usize = 8;
/// Longest display name, in bytes.
pub const MAX_NAME_LEN: usize = 64;
/// Longest human-readable error message, in bytes.
pub const MAX_ERROR_MESSAGE_LEN: usize = 256;
/// Most members a room holds, and so a room snapshot lists: the most whose welcome, at the
/// longest names and parts, still fits one frame ([`MAX_WELCOME_LEN`] <= [`MAX_FRAME_LEN`],
/// checked at compile time).
pub const MAX_MEMBERS: usize = 100;
/// Longest reflection prompt a teacher sets, in bytes.
pub const MAX_PROMPT_LEN: usize = 200;
/// Longest free-text reflection, in bytes of UTF-8 (about a paragraph).
pub const MAX_REFLECTION_LEN: usize = 1000;
/// Highest mood on the check-in scale: 0 (very unhappy) to 4 (very happy).
pub const MAX_MOOD: u8 = 4;
