//! The messages. Enum variants are only ever appended (postcard encodes the index).

use serde::{Deserialize, Serialize};

use crate::{
    BoundedString, BoundedVec, ClientNanos, ErrorCode, MAX_BEATS_PER_FRAME, MAX_ERROR_MESSAGE_LEN, MAX_MEMBERS,
    MAX_NAME_LEN, MAX_ROOM_ID_LEN, MAX_SEGMENTS, MAX_TOKEN_LEN, MicroBpm, ServerNanos,
};

/// A room's identifier.
pub type RoomId = BoundedString<MAX_ROOM_ID_LEN>;
/// A display name.
pub type Name = BoundedString<MAX_NAME_LEN>;

/// One stretch of a room's timeline, in force from `start` until the next segment's start.
///
/// Beat `n` (for `n >= start_beat`) sounds at
/// `start + (n - start_beat) * 60e9 / (tempo / 1e6)` nanoseconds, computed exactly from the
/// segment start every time. `start_beat` is always a downbeat (the first beat of a bar).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Segment {
    /// The server instant this segment takes effect.
    pub start: ServerNanos,
    /// The beat number that sounds at `start` (when running).
    pub start_beat: i64,
    /// The tempo.
    pub tempo: MicroBpm,
    /// Beats per bar (the meter's numerator).
    pub beats_per_bar: u8,
    /// Whether beats sound during this segment.
    pub running: bool,
}

/// A room's timeline: the segment in force plus changes already announced for the future.
///
/// `epoch` grows with every change; a receiver applies a timeline only if its epoch is newer
/// than the one it holds, so a reordered or duplicated datagram never applies a stale timeline.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Timeline {
    /// Version of this timeline; strictly increases with every change.
    pub epoch: u64,
    /// Segments in increasing `start` order; the first is in force at the time of sending.
    pub segments: BoundedVec<Segment, MAX_SEGMENTS>,
}

/// One beat and the server instant it sounds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Beat {
    /// The beat number on the room's timeline.
    pub index: i64,
    /// When it sounds, on the server clock.
    pub at: ServerNanos,
    /// Its position in the bar, 0 for the downbeat.
    pub beat_in_bar: u8,
}

/// What the server sends ahead of time on datagrams: the timeline and the next beats.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BeatFrame {
    /// Per-session sequence number, for loss and reorder accounting.
    pub seq: u64,
    /// The server clock when the frame was built.
    pub sent_at: ServerNanos,
    /// The whole timeline.
    pub timeline: Timeline,
    /// The next beats from `sent_at`, in order.
    pub beats: BoundedVec<Beat, MAX_BEATS_PER_FRAME>,
}

/// The first half of a clock-sync exchange.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SyncRequest {
    /// Chosen by the client to match the reply.
    pub id: u32,
    /// Client clock when sent.
    pub t0: ClientNanos,
}

/// The server's answer to a [`SyncRequest`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SyncReply {
    /// Echoed from the request.
    pub id: u32,
    /// Echoed from the request.
    pub t0: ClientNanos,
    /// Server clock when the request was received.
    pub t1: ServerNanos,
    /// Server clock when the reply was sent.
    pub t2: ServerNanos,
}

/// Datagrams a client sends.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ClientDatagram {
    /// Clock sync.
    SyncRequest(SyncRequest),
}

/// Datagrams the server sends.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ServerDatagram {
    /// Clock sync.
    SyncReply(SyncReply),
    /// The timeline and the next beats.
    Beats(BeatFrame),
}

/// The first frame of every session.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    /// Must equal the server's [`crate::PROTOCOL_VERSION`].
    pub version: u16,
    /// The bearer token.
    pub token: BoundedString<MAX_TOKEN_LEN>,
    /// The room to join.
    pub room: RoomId,
    /// A display name.
    pub name: Name,
}

/// A change to a room's timeline. Every change takes effect at a future bar boundary,
/// announced at least one lookahead before it takes effect.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Change {
    /// Set the tempo (20-300 BPM).
    SetTempo(MicroBpm),
    /// Set beats per bar (1-16).
    SetMeter(u8),
    /// Start the beat.
    Start,
    /// Stop the beat.
    Stop,
}

/// A change request on the control stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ControlRequest {
    /// Chosen by the client; echoed in the ack or error.
    pub request_id: u32,
    /// What to change.
    pub change: Change,
}

/// Frames a client sends on the control stream.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ClientMessage {
    /// Must be the first frame.
    Hello(Hello),
    /// Change the room's timeline.
    Control(ControlRequest),
}

/// One member of a room, as others see it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    /// Session-scoped member id.
    pub id: u64,
    /// Display name.
    pub name: Name,
}

/// The server's answer to a good hello.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Welcome {
    /// The server's protocol version.
    pub version: u16,
    /// This session's member id.
    pub member_id: u64,
    /// The room joined.
    pub room: RoomId,
    /// The room's timeline.
    pub timeline: Timeline,
    /// Everyone in the room, this session included.
    pub members: BoundedVec<Member, MAX_MEMBERS>,
    /// How far ahead (ns) the server sends beats and announces changes.
    pub lead_nanos: u64,
    /// The server clock when the welcome was built (a coarse first guess, before sync).
    pub server_now: ServerNanos,
}

/// An error on the control stream.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorFrame {
    /// The stable code.
    pub code: ErrorCode,
    /// The request it answers, if any.
    pub request_id: Option<u32>,
    /// A human-readable explanation, safe to show.
    pub message: BoundedString<MAX_ERROR_MESSAGE_LEN>,
}

/// Acknowledges a [`ControlRequest`]: the change is applied and announced.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ControlAck {
    /// Echoed from the request.
    pub request_id: u32,
    /// The timeline epoch that carries the change.
    pub epoch: u64,
    /// When the change takes effect.
    pub effective_at: ServerNanos,
    /// The beat at which it takes effect.
    pub effective_beat: i64,
}

/// Frames the server sends on the control stream.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ServerMessage {
    /// Answer to a good hello.
    Welcome(Welcome),
    /// Something was refused. After an error answering the hello the stream is closed.
    Error(ErrorFrame),
    /// The timeline changed (also carried on every beat datagram).
    Timeline(Timeline),
    /// Someone joined the room.
    MemberJoined(Member),
    /// Someone left the room.
    MemberLeft {
        /// Their member id.
        member_id: u64,
    },
    /// A control request was applied.
    ControlAck(ControlAck),
}
