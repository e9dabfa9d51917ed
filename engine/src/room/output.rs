//! What a [`super::Room`] asks its shell to do: the outputs polled with
//! [`super::Room::poll_output`], and the values its `handle_*` calls return for the shell to
//! count.

use downbeat_protocol::{
    BeatFrame, BoundedString, BoundedVec, EncodeError, ErrorCode, ErrorFrame, NoteFrame, ParticipationNotice,
    PromptText, ReflectionNotice, ReflectionText, ServerDatagram, ServerMessage, Welcome, encode_server_datagram,
};
use serde::{Deserialize, Serialize};

use super::participation::Flush;
use super::stage::NoteRefusal;

/// One attached session of a member: where an output goes. The session id lets the shell tell
/// a seat's current connection from one it replaced.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Recipient {
    /// The member.
    pub member: u64,
    /// The session holding the member's seat.
    pub session: u64,
}

/// Something the shell must do, in the order polled.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Output {
    /// Queue `message` on the control stream of each of `to`, in order, never waiting. A
    /// recipient whose queue is full goes back to [`super::Room::handle_slow`].
    Message {
        /// Who hears it (empty: nobody is attached).
        to: Vec<Recipient>,
        /// What they hear.
        message: ServerMessage,
    },
    /// Queue `message`, an update of the teachers' SEL feed (a reflection committed, a
    /// participation tally), on the control stream of each of `to`, never waiting. A
    /// recipient whose queue is full misses it and stays: what it says is stored (the
    /// session's view has it), and a burst of them (the writes a database outage held back,
    /// committed at once) must not cost a teacher their seat.
    Feed {
        /// Who hears it (the room's teachers who follow the feed).
        to: Vec<Recipient>,
        /// What they hear.
        message: ServerMessage,
    },
    /// Send one beat frame datagram to each of `to` (encode once), trimmed to the path's
    /// datagram size ([`encode_beats_to_fit`]).
    Beats {
        /// The room's attached members (all of them at a tick; one who just joined, else).
        to: Vec<Recipient>,
        /// The frame.
        frame: BeatFrame,
    },
    /// Send one note frame datagram to each of `to` (encode once).
    Notes {
        /// Every attached member but the sender.
        to: Vec<Recipient>,
        /// The frame.
        frame: NoteFrame,
    },
    /// Hand SEL work to the writer without waiting; give it back with
    /// [`super::Room::handle_sel_refused`] if the queue is full.
    Sel(SelWork),
    /// End a session: it says why on its control stream, then closes.
    End {
        /// Whose session.
        to: Recipient,
        /// Why.
        reason: EndReason,
    },
    /// The room closed: no input is taken any more. What is left for the SEL writer comes
    /// from [`super::Room::finish`].
    Closed,
}

/// Why a session is ended by the room.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum EndReason {
    /// A new session of the same subject took the seat over.
    Replaced,
    /// The teacher removed the member.
    Removed,
    /// Too many refused notes.
    NoteAbuse,
    /// The member's control queue was full: it cannot be told why, so close at once.
    Backlog,
    /// The room closed.
    RoomClosed(Closing),
    /// The member's data was deleted while they were seated.
    DataDeleted,
    /// The room lives on another node now (the member was told where).
    Moved,
}

impl EndReason {
    /// The stable code the session closes with.
    pub const fn code(&self) -> ErrorCode {
        match self {
            Self::Replaced => ErrorCode::SessionReplaced,
            Self::Removed => ErrorCode::Removed,
            Self::NoteAbuse => ErrorCode::RateLimited,
            Self::Backlog => ErrorCode::ServerBusy,
            Self::RoomClosed(_) => ErrorCode::RoomClosed,
            Self::DataDeleted => ErrorCode::DataDeleted,
            Self::Moved => ErrorCode::Moved,
        }
    }

    /// The message shown to the member.
    pub const fn message(&self) -> &'static str {
        match self {
            Self::Replaced => "you joined this room from another session",
            Self::Removed => "the teacher removed you from the room",
            Self::NoteAbuse => "too many refused notes",
            Self::Backlog => "control stream backlog",
            Self::RoomClosed(closing) => closing.message(),
            Self::DataDeleted => "your school deleted your data from the class server",
            Self::Moved => "the class moved to another server; reconnecting there",
        }
    }

    /// Whether the connection must be closed at once rather than told first (its control
    /// queue is full).
    pub const fn at_once(&self) -> bool {
        matches!(self, Self::Backlog)
    }
}

/// Why a room closed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Closing {
    /// A teacher closed it.
    Teacher,
    /// Nobody held a seat for the idle expiry.
    Expired,
}

impl Closing {
    /// What members are told.
    pub const fn message(&self) -> &'static str {
        match self {
            Self::Teacher => "the teacher closed the room",
            Self::Expired => "the room expired",
        }
    }
}

/// Work for the SEL writer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum SelWork {
    /// Participation counted since the last flush (see [`Flush`]).
    Flush(Flush),
    /// A student's checked reflection, to store and then acknowledge with
    /// [`super::Room::handle_reflection_saved`].
    Reflection(ReflectionWork),
    /// Rows of the room's recordings (see [`super::RecordingWork`]).
    Recording(super::RecordingWork),
}

/// A checked reflection: what the store keeps, and the feed's notice once committed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReflectionWork {
    /// The author's member id.
    pub member: u64,
    /// The author's token subject.
    pub subject: String,
    /// The request to acknowledge.
    pub request_id: u32,
    /// The prompt's text as it was asked.
    pub prompt: PromptText,
    /// The reflection's id (chosen by the client, the same on every retry).
    pub id: [u8; 16],
    /// Mood check-in.
    pub mood: Option<u8>,
    /// Free text, never blank.
    pub text: Option<ReflectionText>,
    /// What the teachers' feed shows once committed.
    pub notice: ReflectionNotice,
}

/// The teachers' participation feed message for `notices` (at most a room's worth).
pub(crate) fn feed_message(notices: &[ParticipationNotice]) -> Option<ServerMessage> {
    if notices.is_empty() {
        return None;
    }
    let notices = notices.iter().take(downbeat_protocol::MAX_MEMBERS).copied().collect();
    downbeat_protocol::BoundedVec::try_from_vec(notices).ok().map(ServerMessage::Participation)
}

/// A request refused by the room: a stable code and a message safe to show. Nothing changed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refused {
    /// The stable code.
    pub code: ErrorCode,
    /// What to tell the requester.
    pub message: std::borrow::Cow<'static, str>,
}

impl Refused {
    pub(crate) fn new(code: ErrorCode, message: impl Into<std::borrow::Cow<'static, str>>) -> Self {
        Self { code, message: message.into() }
    }
}

/// How a join took its seat.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Seated {
    /// A new seat: everyone heard `MemberJoined`.
    New,
    /// The subject's seat held in its grace period: nobody saw it leave or join.
    Resumed,
    /// The subject's seat taken over from a session still open, which was ended with
    /// `session_replaced`.
    Replaced,
}

/// A join that took a seat.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Joined {
    /// What the session writes first.
    pub welcome: Welcome,
    /// How.
    pub seated: Seated,
}

/// What [`super::Room::handle_notes`] did, for the shell's counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NotesHandled {
    /// New notes accepted and fanned out.
    pub accepted: u32,
    /// Copies of notes already handled.
    pub duplicates: u32,
    /// Notes dropped (see [`super::NotesOutcome::dropped`]).
    pub dropped: u32,
    /// Why notes were dropped, if any were.
    pub refusal: Option<NoteRefusal>,
    /// The session was ended for note abuse.
    pub expelled: bool,
}

/// What a client report added to the cumulative playout counts of its session.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReportHandled {
    /// Notes played since the session's last report.
    pub notes_played: u32,
    /// Notes late since the session's last report.
    pub notes_late: u32,
}

/// What [`super::Room::handle_timeout`] did, for the shell's counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Tick {
    /// Seats whose grace period ended.
    pub seats_expired: u32,
}

/// An error frame for the control stream.
pub fn error_frame(code: ErrorCode, request_id: Option<u32>, message: &str) -> ServerMessage {
    ServerMessage::Error(ErrorFrame { code, request_id, message: BoundedString::truncating(message) })
}

/// Encodes `frame` as a datagram of at most `max` bytes (the path's datagram size), dropping
/// beats from the end as needed: the timeline alone still says everything. `None` if even
/// the timeline alone does not fit. The flag says beats were dropped.
pub fn encode_beats_to_fit(frame: BeatFrame, max: usize) -> Option<(Vec<u8>, bool)> {
    let mut datagram = ServerDatagram::Beats(frame);
    let mut trimmed = false;
    loop {
        match encode_server_datagram(&datagram) {
            Ok(bytes) if bytes.len() <= max => return Some((bytes, trimmed)),
            Ok(_) | Err(EncodeError::TooLarge { .. }) => {
                let ServerDatagram::Beats(frame) = &mut datagram else { return None };
                let mut beats = std::mem::take(&mut frame.beats).into_vec();
                beats.pop()?;
                // Cannot fail: one shorter than a vector that fit.
                frame.beats = BoundedVec::try_from_vec(beats).unwrap_or_default();
                trimmed = true;
            }
            Err(_) => return None,
        }
    }
}
