//! Stable error codes shared by the control stream and the HTTP API.

use core::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

macro_rules! error_codes {
    ($( $(#[$doc:meta])* $name:ident = $num:literal, $text:literal; )*) => {
        /// A stable error code. The number is what travels on the wire, the text is what the
        /// HTTP API returns; neither ever changes meaning. Codes this build does not know
        /// decode as [`ErrorCode::Unknown`] rather than failing.
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        #[non_exhaustive]
        pub enum ErrorCode {
            $( $(#[$doc])* $name, )*
            /// A code from a newer peer that this build does not know.
            Unknown(u16),
        }

        impl ErrorCode {
            /// Every known code, in numeric order.
            pub const ALL: &'static [ErrorCode] = &[$(ErrorCode::$name),*];

            /// The number that travels on the wire.
            pub const fn as_u16(self) -> u16 {
                match self {
                    $( ErrorCode::$name => $num, )*
                    ErrorCode::Unknown(n) => n,
                }
            }

            /// The code for a wire number.
            pub const fn from_u16(n: u16) -> Self {
                match n {
                    $( $num => ErrorCode::$name, )*
                    other => ErrorCode::Unknown(other),
                }
            }

            /// The stable snake_case name used by the HTTP API and in logs.
            pub const fn as_str(self) -> &'static str {
                match self {
                    $( ErrorCode::$name => $text, )*
                    ErrorCode::Unknown(_) => "unknown",
                }
            }
        }
    };
}

error_codes! {
    /// The hello named a protocol version this server does not speak.
    UnsupportedVersion = 1, "unsupported_version";
    /// A frame or datagram did not decode.
    MalformedFrame = 2, "malformed_frame";
    /// A frame declared a length above the cap.
    FrameTooLarge = 3, "frame_too_large";
    /// The first frame on the control stream was not a hello.
    HelloRequired = 4, "hello_required";
    /// No hello arrived in time.
    HelloTimeout = 5, "hello_timeout";
    /// The token was missing or not valid.
    Unauthorized = 6, "unauthorized";
    /// No such room.
    RoomNotFound = 7, "room_not_found";
    /// Tempo outside 20-300 BPM.
    TempoOutOfRange = 8, "tempo_out_of_range";
    /// Meter outside 1-16 beats per bar.
    MeterOutOfRange = 9, "meter_out_of_range";
    /// Start asked of a room that is (or is about to be) running.
    AlreadyRunning = 10, "already_running";
    /// Stop asked of a room that is (or is about to be) stopped.
    NotRunning = 11, "not_running";
    /// Too many timeline changes are already announced and waiting to take effect.
    TooManyPendingChanges = 12, "too_many_pending_changes";
    /// The room has no free seat.
    RoomFull = 13, "room_full";
    /// The server is at a capacity limit; try again later.
    ServerBusy = 14, "server_busy";
    /// The server failed; nothing was changed.
    Internal = 15, "internal";
    /// A message arrived that is not valid in the session's state (e.g. a second hello).
    UnexpectedMessage = 16, "unexpected_message";
    /// A request body or parameter was not valid.
    BadRequest = 17, "bad_request";
    /// The server limit on rooms was reached.
    TooManyRooms = 18, "too_many_rooms";
    /// The server is shutting down.
    ShuttingDown = 19, "shutting_down";
    /// The token is valid but its role may not do this (e.g. a student sending a teacher control).
    Forbidden = 20, "forbidden";
    /// The token has expired; present a fresh one.
    TokenExpired = 21, "token_expired";
    /// The room was closed by its teacher or expired.
    RoomClosed = 22, "room_closed";
    /// The room belongs to another tenant (school).
    WrongTenant = 23, "wrong_tenant";
    /// A rate limit was exceeded; slow down.
    RateLimited = 24, "rate_limited";
    /// A note's MIDI number, velocity, part or time is out of range.
    NoteOutOfRange = 25, "note_out_of_range";
    /// No member with that id is in the room.
    MemberNotFound = 26, "member_not_found";
    /// The teacher removed this member from the room.
    Removed = 27, "removed";
    /// The tenant's limit on concurrent sessions was reached.
    TooManySessions = 28, "too_many_sessions";
    /// The same person joined the room from another session, which took over the seat.
    SessionReplaced = 29, "session_replaced";
    /// SEL storage is behind (the database is down, full or slow and the write queue is
    /// full): nothing was stored; retry later with the same reflection id.
    StoreUnavailable = 30, "store_unavailable";
    /// The reflection answers no prompt of this room.
    NoPrompt = 31, "no_prompt";
    /// A network check (a probe session) sent something other than clock sync.
    ProbeOnly = 32, "probe_only";
    /// Too many network checks are running, from this network or on the whole server.
    TooManyProbes = 33, "too_many_probes";
    /// The network check's time is up (its normal end).
    ProbeOver = 34, "probe_over";
    /// A school's admin deleted this person's data while they were in the room: the session
    /// ended and nothing more of it is stored.
    DataDeleted = 35, "data_deleted";
    /// The database refused to store this (a retry of the same would be refused the same
    /// way): nothing was stored.
    StoreRefused = 36, "store_refused";
    /// This student already answered this prompt as often as a room takes.
    TooManyReflections = 37, "too_many_reflections";
    /// The room is already recording: stop the take first.
    AlreadyRecording = 38, "already_recording";
    /// The room is not recording.
    NotRecording = 39, "not_recording";
    /// The room session holds as many recordings as it may.
    TooManyRecordings = 40, "too_many_recordings";
    /// No recording of your school has this id (or it was purged).
    RecordingNotFound = 41, "recording_not_found";
    /// A recording is already playing back in the room: stop it first.
    AlreadyPlaying = 42, "already_playing";
    /// No recording is playing back.
    NotPlaying = 43, "not_playing";
    /// A server operator ended this session (from the inspector); joining again works.
    EndedByOperator = 44, "ended_by_operator";
    /// The room lives on another server of the cluster (the session was told where before
    /// this): connect there.
    Moved = 45, "moved";
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Unknown(n) => write!(f, "unknown({n})"),
            known => f.write_str(known.as_str()),
        }
    }
}

impl Serialize for ErrorCode {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_u16(self.as_u16())
    }
}

impl<'de> Deserialize<'de> for ErrorCode {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        u16::deserialize(deserializer).map(Self::from_u16)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_round_trip_and_are_unique() {
        for (i, code) in ErrorCode::ALL.iter().enumerate() {
            assert_eq!(usize::from(code.as_u16()), i + 1, "codes are dense and in order");
            assert_eq!(ErrorCode::from_u16(code.as_u16()), *code);
            let bytes = postcard::to_allocvec(code).unwrap();
            assert_eq!(postcard::from_bytes::<ErrorCode>(&bytes).unwrap(), *code);
        }
        assert_eq!(ErrorCode::from_u16(999), ErrorCode::Unknown(999));
        assert_eq!(ErrorCode::RoomNotFound.as_str(), "room_not_found");
    }
}
