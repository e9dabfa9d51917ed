//! The messages. Enum variants are only ever appended (postcard encodes the index).

use serde::{Deserialize, Serialize};

use crate::{
    BoundedString, BoundedVec, ClientNanos, ErrorCode, MAX_ASSIGNED_BEATS, MAX_BEATS_PER_FRAME, MAX_ERROR_MESSAGE_LEN,
    MAX_JOIN_CODE_LEN, MAX_MEMBERS, MAX_NAME_LEN, MAX_NOTES_PER_DATAGRAM, MAX_PART_LEN, MAX_PROMPT_LEN,
    MAX_REFLECTION_LEN, MAX_SEGMENTS, MAX_TOKEN_LEN, MicroBpm, ServerNanos,
};

/// A room's join code as typed (the server normalises case, spaces and dashes).
pub type JoinCode = BoundedString<MAX_JOIN_CODE_LEN>;
/// A display name (of a member or a room).
pub type Name = BoundedString<MAX_NAME_LEN>;
/// A part a student is assigned, e.g. "drums" or "melody".
pub type PartName = BoundedString<MAX_PART_LEN>;
/// A bearer token (a JWT).
pub type Token = BoundedString<MAX_TOKEN_LEN>;
/// A reflection prompt, e.g. "How did you help your group today?".
pub type PromptText = BoundedString<MAX_PROMPT_LEN>;
/// A child's free-text reflection.
pub type ReflectionText = BoundedString<MAX_REFLECTION_LEN>;

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
    /// Bars of count-in at the start of a running segment that began with a start: its first
    /// `count_in_bars * beats_per_bar` beats are count-in clicks before the music.
    pub count_in_bars: u8,
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
    /// Whether it is a count-in click rather than a beat of the music.
    pub count_in: bool,
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
    /// The epoch of the newest timeline the client holds (0: none yet). A member behind the
    /// room's timeline gets a beat frame at once, so a settled room need not send frames
    /// often to repair one a member lost: the requests of clock sync carry the repair.
    pub epoch: u64,
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

/// A note a student played.
///
/// `played_at` is the shared-timeline instant the student played it (from their synced
/// clock). Every receiver sounds it at `played_at` plus the room's playout delay, so all
/// classmates hear it at the same instant; one that arrives after that instant is reported
/// late and never played out of time.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Note {
    /// Per-sender sequence number (from 1), for de-duplicating redundant copies.
    pub seq: u32,
    /// MIDI note number, 0-127.
    pub midi: u8,
    /// MIDI velocity, 1-127.
    pub velocity: u8,
    /// Instrument (General MIDI program number, 0-127).
    pub instrument: u8,
    /// When it was played, on the server clock.
    pub played_at: ServerNanos,
}

/// Notes from one member, as the server fans them out.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NoteFrame {
    /// Who played them.
    pub from: u64,
    /// Which of the member's sessions played them: grows each time the member (re)joins, so
    /// a receiver knows a reconnected classmate numbers its notes afresh and ignores late
    /// copies from the session before.
    pub generation: u32,
    /// The newest notes, oldest first; copies of notes already sent may repeat, so a lost
    /// datagram is covered by the next one.
    pub notes: BoundedVec<Note, MAX_NOTES_PER_DATAGRAM>,
}

/// Datagrams a client sends.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ClientDatagram {
    /// Clock sync.
    SyncRequest(SyncRequest),
    /// Notes played, oldest first; the last few may be repeated for redundancy.
    Notes(BoundedVec<Note, MAX_NOTES_PER_DATAGRAM>),
}

/// Datagrams the server sends.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ServerDatagram {
    /// Clock sync.
    SyncReply(SyncReply),
    /// The timeline and the next beats.
    Beats(BeatFrame),
    /// A classmate's notes.
    Notes(NoteFrame),
}

/// A new room's settings.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoomSettings {
    /// What the teacher calls it ("Room 12 drumming").
    pub name: Name,
    /// Starting tempo (20-300 BPM).
    pub tempo: MicroBpm,
    /// Beats per bar (1-16).
    pub beats_per_bar: u8,
}

/// Which room a hello is for.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum RoomRequest {
    /// Join the room with this code.
    Join(JoinCode),
    /// Create a room and join it (teachers only).
    Create(RoomSettings),
}

/// The first frame of every session.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    /// Must equal the server's [`crate::PROTOCOL_VERSION`].
    pub version: u16,
    /// The signed token (JWT): tenant, pseudonymous subject, role and display name.
    pub token: Token,
    /// The room.
    pub room: RoomRequest,
}

/// A change to a room's timeline. Every change takes effect at a future bar boundary,
/// announced at least one lookahead before it takes effect.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Change {
    /// Set the tempo (20-300 BPM).
    SetTempo(MicroBpm),
    /// Set beats per bar (1-16).
    SetMeter(u8),
    /// Start the beat, after `count_in_bars` bars of count-in (0-8).
    Start {
        /// Bars of count-in clicks before the music.
        count_in_bars: u8,
    },
    /// Stop the beat.
    Stop,
}

/// A member's role, from their verified token.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Role {
    /// Runs the room.
    Teacher,
    /// Plays in it.
    Student,
}

/// What a student is asked to play.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Assignment {
    /// The part, e.g. "drums" or "melody"; `None`: no part.
    pub part: Option<PartName>,
    /// Beats of the bar to play on, 0 for the downbeat (e.g. `[0]`: "on beat 1"); empty: any.
    pub beats: BoundedVec<u8, MAX_ASSIGNED_BEATS>,
}

/// What a teacher can do on the control stream (or over HTTP).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ControlOp {
    /// Change the timeline (tempo, meter, start, stop) at the next bar boundary.
    Timeline(Change),
    /// Mute or unmute a student: a muted student's notes are not forwarded.
    Mute {
        /// The member.
        member: u64,
        /// Muted or not.
        muted: bool,
    },
    /// Assign a part and beats to a member.
    Assign {
        /// The member.
        member: u64,
        /// What they play.
        assignment: Assignment,
    },
    /// Remove a member from the room; their session ends with [`ErrorCode::Removed`].
    Remove {
        /// The member.
        member: u64,
    },
    /// Close the room: the clock stops, everyone is told why, sessions end.
    Close,
    /// Ask the room a reflection question (an empty text clears it). Everyone receives
    /// [`ServerMessage::Prompt`]; students answer with [`ClientMessage::Reflect`].
    Prompt {
        /// The question.
        text: PromptText,
    },
    /// Start recording the room: every note it accepts and every timeline change, until
    /// [`ControlOp::StopRecording`] (or the room closes). Everyone hears
    /// [`ServerMessage::Recording`]: a class is never recorded without knowing.
    StartRecording,
    /// Stop the recording.
    StopRecording,
    /// Play take `take` of this room session back into the room: from the next bar boundary
    /// (starting the beat if it is stopped, at `tempo` if given), each recorded note sounds
    /// for everyone at one instant on the shared timeline, like a live note. Everyone hears
    /// [`ServerMessage::Playback`].
    PlayRecording {
        /// The take.
        take: u32,
        /// A tempo to play it at (the room's tempo changes at the same boundary).
        tempo: Option<MicroBpm>,
    },
    /// Stop the playback at the next bar boundary.
    StopPlayback,
}

/// A control request on the control stream.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ControlRequest {
    /// Chosen by the client; echoed in the ack or error.
    pub request_id: u32,
    /// What to do.
    pub op: ControlOp,
}

/// How well a member's clock is synced, as its client reports it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SyncQuality {
    /// Whether the client's estimate is good enough to schedule audio.
    pub synced: bool,
    /// Smallest recent round trip, in microseconds.
    pub rtt_micros: u32,
    /// The estimate's uncertainty (a bound on the offset error), in microseconds.
    pub uncertainty_micros: u32,
}

impl SyncQuality {
    /// The quality coarse enough that a change is worth telling the class (synced or not,
    /// round trip in whole milliseconds, uncertainty in quarter milliseconds): the server
    /// tells everyone when it changes, and a client reports early when it does.
    pub fn coarse(&self) -> (bool, u32, u32) {
        (self.synced, self.rtt_micros / 1000, self.uncertainty_micros / 250)
    }
}

/// A client's periodic report: sync quality (shown in presence) and note playout counts.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClientReport {
    /// Sync quality now.
    pub sync: SyncQuality,
    /// Classmates' notes scheduled on time since the session began.
    pub notes_played: u32,
    /// Classmates' notes that arrived after their playout instant (not played).
    pub notes_late: u32,
}

/// Frames a client sends on the control stream.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ClientMessage {
    /// Must be the first frame.
    Hello(Hello),
    /// A teacher control.
    Control(ControlRequest),
    /// A fresh token for this session (same tenant, subject and role), before the old expires.
    RefreshToken {
        /// Echoed in the answer.
        request_id: u32,
        /// The new token.
        token: Token,
    },
    /// Sync quality and playout counts; at most about one every two seconds.
    Report(ClientReport),
    /// A student's reflection. Answered by [`ServerMessage::ReflectionSaved`] once it is
    /// committed to the database, or by an error with `request_id`.
    Reflect(Reflection),
    /// Instead of a [`Hello`], as the first frame: a network check (a *probe*), which needs no
    /// token. Answered by [`ServerMessage::ProbeStarted`]; the session may then only sync its
    /// clock (sync requests on the datagram path, exactly as a joined session does) for at most
    /// the duration given, and ends with [`ErrorCode::ProbeOver`]. Anything else ends it with
    /// [`ErrorCode::ProbeOnly`]; too many probes at once are refused with
    /// [`ErrorCode::TooManyProbes`].
    Probe {
        /// Must equal the server's [`crate::PROTOCOL_VERSION`].
        version: u16,
    },
}

/// A student's answer to the room's reflection prompt: a mood check-in, free text, or both.
///
/// `id` is chosen by the client (random) and kept across retries: the server stores a
/// reflection once per student and id however often it arrives, so a client that did not hear
/// the acknowledgement (lost connection, server restart) sends it again, even to a new room.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reflection {
    /// Echoed in the acknowledgement or error; a fresh one per attempt is fine.
    pub request_id: u32,
    /// The reflection's identity, the same on every retry.
    pub id: [u8; 16],
    /// The prompt answered ([`Prompt::id`]).
    pub prompt_id: u32,
    /// Mood check-in, 0 to [`crate::MAX_MOOD`].
    pub mood: Option<u8>,
    /// Free text.
    pub text: Option<ReflectionText>,
}

/// The room's current reflection question.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Prompt {
    /// Numbered per room from 1.
    pub id: u32,
    /// The question.
    pub text: PromptText,
}

/// A reflection, as the teachers' live feed shows it once it is committed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReflectionNotice {
    /// Who wrote it (their member id in this room).
    pub member_id: u64,
    /// The reflection's id.
    pub id: [u8; 16],
    /// The prompt it answers.
    pub prompt_id: u32,
    /// Mood check-in.
    pub mood: Option<u8>,
    /// Free text.
    pub text: Option<ReflectionText>,
}

/// One member's participation so far in this room session, measured by the server on the
/// shared timeline (see the README for the collaboration score's formula).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ParticipationNotice {
    /// The member.
    pub member_id: u64,
    /// Notes played (accepted and heard by the room).
    pub notes: u32,
    /// Notes played while beats sounded.
    pub timed: u32,
    /// Timed notes on the beat.
    pub on_beat: u32,
    /// Mean distance of timed notes from the nearest beat, in microseconds.
    pub mean_offset_micros: u32,
    /// Timed notes played while holding assigned beats.
    pub assigned: u32,
    /// Assigned notes on the member's own beats.
    pub in_part: u32,
    /// Turns taken in the assigned part.
    pub turns: u32,
    /// Collaboration score 0 to 100, once a timed note was played.
    pub score: Option<u8>,
}

/// One member of a room, as everyone sees it (presence).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    /// Member id; kept across a reconnect within the grace period.
    pub id: u64,
    /// Display name (from the token).
    pub name: Name,
    /// Role (from the token).
    pub role: Role,
    /// Assigned part and beats.
    pub assignment: Assignment,
    /// Whether the teacher muted them.
    pub muted: bool,
    /// Their last reported sync quality.
    pub sync: SyncQuality,
    /// What carries their session.
    pub transport: Transport,
}

/// What carries a session: WebTransport, or WebSocket where a network blocks QUIC.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Transport {
    /// A WebTransport (QUIC) session.
    #[default]
    WebTransport,
    /// A WebSocket (TCP) session ([`crate::ws`]).
    WebSocket,
}

impl Transport {
    /// Both, in a fixed order (also their indices as `usize`).
    pub const ALL: [Self; 2] = [Self::WebTransport, Self::WebSocket];

    /// The name presence, metrics and the browser package use.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::WebTransport => "webtransport",
            Self::WebSocket => "websocket",
        }
    }
}

/// The room, as its members see it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoomInfo {
    /// The join code, normalised (e.g. `K7QFM3XP`).
    pub code: JoinCode,
    /// The room's name.
    pub name: Name,
    /// How long after a note's played instant every receiver sounds it, in nanoseconds.
    pub playout_delay_nanos: u64,
}

/// The server's answer to a good hello.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Welcome {
    /// The server's protocol version.
    pub version: u16,
    /// This session's member id.
    pub member_id: u64,
    /// This session's role.
    pub role: Role,
    /// The room joined.
    pub room: RoomInfo,
    /// The room's timeline.
    pub timeline: Timeline,
    /// Everyone in the room, this session included (the presence snapshot).
    pub members: BoundedVec<Member, MAX_MEMBERS>,
    /// How far ahead (ns) the server sends beats and announces changes.
    pub lead_nanos: u64,
    /// The server clock when the welcome was built (a coarse first guess, before sync).
    pub server_now: ServerNanos,
    /// When the session's token expires (Unix seconds); refresh before then.
    pub token_expires_at: u64,
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

/// Where a timeline change lands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Applied {
    /// The timeline epoch that carries the change.
    pub epoch: u64,
    /// When the change takes effect.
    pub effective_at: ServerNanos,
    /// The beat at which it takes effect.
    pub effective_beat: i64,
}

/// Acknowledges a [`ControlRequest`]: it was applied and broadcast to the room.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ControlAck {
    /// Echoed from the request.
    pub request_id: u32,
    /// For timeline changes: where the change lands.
    pub applied: Option<Applied>,
}

/// Why a member left.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum LeaveReason {
    /// They left, or their connection dropped and did not come back within the grace period.
    Left,
    /// The teacher removed them.
    Removed,
    /// Their session was closed by the server (e.g. an expired token or abuse).
    Closed,
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
        /// Why.
        reason: LeaveReason,
    },
    /// A control request was applied.
    ControlAck(ControlAck),
    /// A member's presence changed (mute, assignment, sync quality). A change of sync quality
    /// alone goes to the room's teachers only.
    MemberUpdated(Member),
    /// The room was closed; the session ends next with [`ErrorCode::RoomClosed`].
    RoomClosed {
        /// Why, safe to show.
        message: BoundedString<MAX_ERROR_MESSAGE_LEN>,
    },
    /// A [`ClientMessage::RefreshToken`] was accepted.
    TokenRefreshed {
        /// Echoed from the request.
        request_id: u32,
        /// When the new token expires (Unix seconds).
        expires_at: u64,
    },
    /// The room's reflection prompt: sent when the teacher sets or clears it, and after the
    /// welcome when one is set.
    Prompt(Option<Prompt>),
    /// A [`ClientMessage::Reflect`] is committed to the database (also when it was already).
    ReflectionSaved {
        /// Echoed from the reflection.
        request_id: u32,
        /// The reflection's id.
        id: [u8; 16],
    },
    /// Teachers only: a reflection was committed.
    Reflection(ReflectionNotice),
    /// Teachers only: participation of the members who played since the last update, as of
    /// the last committed flush (about once a second while notes are played).
    Participation(BoundedVec<ParticipationNotice, MAX_MEMBERS>),
    /// Answer to a good [`ClientMessage::Probe`]: clock sync may start; the server ends the
    /// probe with [`ErrorCode::ProbeOver`] after `duration_ms`.
    ProbeStarted {
        /// How long the probe may run, in milliseconds.
        duration_ms: u32,
    },
    /// Whether the room is being recorded: sent to everyone when a recording starts or stops,
    /// and after the welcome while one runs.
    Recording(Option<RecordingInfo>),
    /// A recording plays back (sent to everyone when it starts, when a stop is asked and, as
    /// `None`, when it is over; after the welcome while one plays).
    Playback(Option<PlaybackInfo>),
    /// The room lives on another server of the cluster: connect there with the same hello.
    /// Sent instead of the welcome, then the session closes with `moved`.
    Moved(Moved),
}

/// Longest URL in a [`Moved`].
pub const MAX_URL_LEN: usize = 256;

/// Where a room lives now: the server to connect to instead.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Moved {
    /// Its WebTransport URL (`https://host:port/`).
    pub webtransport_url: BoundedString<MAX_URL_LEN>,
    /// Its WebSocket URL (`ws://` or `wss://…/api/ws`), where QUIC is blocked.
    pub websocket_url: BoundedString<MAX_URL_LEN>,
    /// SHA-256 hashes of its development certificates to pin (empty: production
    /// certificates, checked against the system's roots).
    pub certificate_hashes: BoundedVec<[u8; 32], 2>,
}

/// A recording playing back in the room.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlaybackInfo {
    /// The take.
    pub take: u32,
    /// When its first beat sounds.
    pub starts_at: ServerNanos,
    /// The beat it starts on (a downbeat).
    pub start_beat: i64,
    /// When it stops, once a stop was asked for (a bar boundary).
    pub stops_at: Option<ServerNanos>,
}

/// A recording that is running.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecordingInfo {
    /// The take's number in this room session (from 1).
    pub take: u32,
    /// When it started, on the server clock.
    pub started_at: ServerNanos,
}
