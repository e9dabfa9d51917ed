//! One client session as a state machine: the control stream on top of [`Client`]'s timing.
//!
//! Every client shell (native, browser, and whatever transport carries it) runs the same
//! session: it says hello, waits for the welcome, keeps the room's presence and reflection
//! prompt, numbers its requests and matches the server's answers and refusals to them, and
//! learns why the session ended. This type does all of that; a shell only moves bytes and
//! translates [`Event`]s into its own language (futures and channels, JS promises and events).
//!
//! - Bytes in: [`Session::handle_control_bytes`] takes control-stream bytes in any chunking
//!   (it owns the frame decoder), [`Session::handle_datagram`] a datagram stamped with the
//!   local instant it arrived. Datagrams (clock sync, beat frames, classmates' notes) go to the
//!   [`Client`], which answers every timing question ([`Session::client`]).
//! - Bytes out: [`Session::connect`] gives the hello frame, [`Session::request`] a numbered
//!   request frame, [`Session::report`] the periodic report, [`Session::poll_datagram`] and
//!   [`Session::play_note`] datagrams.
//! - Events out: [`Session::poll_event`], in the order the server told them.
//!
//! Requests carry a waiter of the shell's choosing (`T`: a oneshot sender, a promise's
//! resolver): it comes back in exactly one [`Event::RequestDone`], with the answer, the
//! server's refusal, or [`RequestError::Closed`] when the session ends first. So a shell
//! holds no table of requests of its own.
//!
//! Invariants: a session ends once ([`Event::Ended`] is the last event), and every request
//! made is done before it; presence is the welcome's snapshot plus every join, leave and
//! update since, in the server's order (which is the same for every member). Nothing here
//! reads a clock: datagram handling takes the local `now`, and control frames do not depend on
//! time.

use std::collections::{BTreeMap, VecDeque};

use downbeat_protocol::{
    ClientDatagram, ClientMessage, ClientNanos, ClientReport, ControlAck, ControlOp, ControlRequest, DecodeError,
    ErrorCode, FrameDecoder, Hello, Member, Moved, Note, PROTOCOL_VERSION, ParticipationNotice, PlaybackInfo, Prompt,
    RecordingInfo, Reflection, ReflectionNotice, ReflectionText, RoomRequest, ServerMessage, Token, Welcome,
    decode_server_datagram, encode_client_datagram, encode_frame,
};

use crate::client::{Client, Handled};
use crate::clock;
use crate::notes::{self, ScheduledNote};

/// Codes after which connecting again cannot help: a shell that reconnects gives up on them.
pub const FINAL_CODES: [ErrorCode; 11] = [
    ErrorCode::RoomNotFound,
    ErrorCode::RoomClosed,
    ErrorCode::Removed,
    ErrorCode::SessionReplaced,
    ErrorCode::DataDeleted,
    ErrorCode::Unauthorized,
    ErrorCode::TokenExpired,
    ErrorCode::WrongTenant,
    ErrorCode::UnsupportedVersion,
    ErrorCode::BadRequest,
    ErrorCode::EndedByOperator,
];

/// Whether connecting again cannot help after the server ended a session with `code`.
pub fn is_final(code: ErrorCode) -> bool {
    FINAL_CODES.contains(&code)
}

/// What a shell asks of the server.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Request {
    /// A teacher control; answered by [`Answer::Control`].
    Control(ControlOp),
    /// A fresh token for this session; answered by [`Answer::TokenRefreshed`].
    RefreshToken(Token),
    /// A student's reflection; answered by [`Answer::ReflectionSaved`] once it is committed.
    Reflect {
        /// The reflection's identity, the same on every retry.
        id: [u8; 16],
        /// The prompt answered.
        prompt_id: u32,
        /// Mood check-in.
        mood: Option<u8>,
        /// Free text.
        text: Option<ReflectionText>,
    },
}

/// The server's answer to a [`Request`], of the kind the request expects.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Answer {
    /// The control was applied (and, for timeline changes, where it lands).
    Control(ControlAck),
    /// The token was taken; it expires then (Unix seconds).
    TokenRefreshed {
        /// Expiry of the new token, Unix seconds.
        expires_at: u64,
    },
    /// The reflection is committed.
    ReflectionSaved,
}

/// Why a request got no answer.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RequestError {
    /// The server refused it with a stable code.
    #[error("refused by the server: {code}: {message}")]
    Refused {
        /// The stable code.
        code: ErrorCode,
        /// The server's explanation, safe to show.
        message: String,
    },
    /// The session ended (or was not open) before an answer came. The request may or may not
    /// have been carried out: retry what is idempotent (reflections, by id).
    #[error("the session is closed")]
    Closed,
    /// The server answered with something of another kind.
    #[error("protocol error: {0}")]
    Protocol(String),
}

/// Why a note was not played.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum NoteError {
    /// MIDI number or instrument above 127, or velocity 0 or above 127: the server would
    /// refuse it, so it is never sent (nor repeated with the next notes).
    #[error("note {midi}, velocity {velocity}, instrument {instrument} is out of MIDI range")]
    OutOfRange {
        /// MIDI note number.
        midi: u8,
        /// Velocity.
        velocity: u8,
        /// Instrument.
        instrument: u8,
    },
    /// The clock is not estimated yet: the note cannot be stamped.
    #[error("the clock is not synced yet")]
    NotSynced,
}

impl NoteError {
    /// The stable code ([`ErrorCode::NoteOutOfRange`]), for the out-of-range case.
    pub const fn code(&self) -> Option<ErrorCode> {
        match self {
            Self::OutOfRange { .. } => Some(ErrorCode::NoteOutOfRange),
            Self::NotSynced => None,
        }
    }
}

/// How a session ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum End {
    /// The server said why: it refused the hello, sent an error not tied to a request, or
    /// closed the room. The last thing it said wins.
    Server {
        /// The stable code.
        code: ErrorCode,
        /// The server's explanation, safe to show.
        message: String,
    },
    /// The server sent something out of step (no welcome first, an undecodable frame) and
    /// said nothing before.
    Protocol(String),
    /// The transport ended (connection lost, stream closed) without the server saying why;
    /// the shell's words.
    Lost(String),
    /// This side closed the session.
    Closed,
}

impl End {
    /// Whether connecting again cannot help ([`FINAL_CODES`], or closed by this side).
    pub fn is_final(&self) -> bool {
        match self {
            Self::Server { code, .. } => is_final(*code),
            Self::Closed => true,
            Self::Protocol(_) | Self::Lost(_) => false,
        }
    }
}

/// Something for the shell, in the order it happened.
#[derive(Debug, PartialEq)]
#[non_exhaustive]
pub enum Event<T> {
    /// The server welcomed this session ([`Session::welcome`] holds the welcome).
    Welcomed,
    /// Someone joined.
    MemberJoined(Member),
    /// Someone left (their notes' numbering is forgotten).
    MemberLeft {
        /// Their member id.
        member_id: u64,
        /// Why.
        reason: downbeat_protocol::LeaveReason,
    },
    /// Someone's presence changed (mute, part, sync quality).
    MemberUpdated(Member),
    /// A timeline arrived on the control stream.
    Timeline {
        /// Its epoch.
        epoch: u64,
        /// Whether it was newer than the one held, and so applied (a beat datagram may have
        /// brought it first).
        applied: bool,
    },
    /// The teacher set (or cleared) the reflection prompt.
    Prompt(Option<Prompt>),
    /// A recording of the room started (`Some`) or stopped (`None`): show it to everyone.
    Recording(Option<RecordingInfo>),
    /// A recording plays back (`None`: it is over).
    Playback(Option<PlaybackInfo>),
    /// Teachers only: a student's reflection was saved.
    Reflection(ReflectionNotice),
    /// Teachers only: participation so far of the members who played since the last update.
    Participation(Vec<ParticipationNotice>),
    /// The room was closed; the session ends next.
    RoomClosed(String),
    /// An error not tied to a request (the session may end with it).
    Error {
        /// The stable code.
        code: ErrorCode,
        /// The server's explanation, safe to show.
        message: String,
    },
    /// A request is done: answered, refused, or failed because the session ended.
    RequestDone {
        /// Its id.
        request_id: u32,
        /// What the shell gave with it.
        waiter: T,
        /// The answer.
        result: Result<Answer, RequestError>,
    },
    /// The session is over; nothing follows.
    Ended(End),
}

/// Where the session stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    /// Hello sent, waiting for the welcome.
    Greeting,
    /// Welcomed.
    Live,
    /// Over.
    Ended,
}

/// What a pending request expects.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Expect {
    Ack,
    Refresh,
    Saved { id: [u8; 16] },
}

#[derive(Debug)]
struct Pending<T> {
    expect: Expect,
    waiter: T,
}

/// One session with the server. See the module docs.
#[derive(Debug)]
pub struct Session<T = ()> {
    client: Client,
    state: State,
    welcome: Option<Welcome>,
    members: BTreeMap<u64, Member>,
    prompt: Option<Prompt>,
    recording: Option<RecordingInfo>,
    playback: Option<PlaybackInfo>,
    pending: BTreeMap<u32, Pending<T>>,
    next_request: u32,
    decoder: FrameDecoder,
    /// What the server last said about ending the session.
    stated_end: Option<(ErrorCode, String)>,
    /// How the session ended, once it did.
    end: Option<End>,
    /// Where the room lives now, if the server said it moved.
    moved: Option<Moved>,
    synced: bool,
    /// When the last report was handed out, and what it said.
    last_report: Option<(ClientNanos, ClientReport)>,
    events: VecDeque<Event<T>>,
}

/// A report that says nothing new still goes out this often: the server keeps the fine sync
/// figures (its uncertainty histogram) and the member's presence fresh from it.
pub const REPORT_REFRESH_NANOS: u64 = 10_000_000_000;

/// What [`Session::report`] says to do now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ReportDue {
    /// Send this frame on the control stream.
    Send(Vec<u8>),
    /// Nothing new since the last report: send nothing, ask again at the next interval.
    Unchanged,
    /// The session is not live (not welcomed yet, or ended): stop reporting.
    NotLive,
}

impl<T> Session<T> {
    /// A session about to greet the server, with the hello frame to send first on the
    /// control stream. `token` is the signed token; `room` the room to join or create.
    pub fn connect(sync: clock::Config, token: Token, room: RoomRequest) -> (Self, Vec<u8>) {
        let session = Self {
            client: Client::new(sync),
            state: State::Greeting,
            welcome: None,
            members: BTreeMap::new(),
            prompt: None,
            recording: None,
            playback: None,
            pending: BTreeMap::new(),
            next_request: 1,
            decoder: FrameDecoder::new(),
            stated_end: None,
            end: None,
            moved: None,
            synced: false,
            last_report: None,
            events: VecDeque::new(),
        };
        let hello = encode_frame(&ClientMessage::Hello(Hello { version: PROTOCOL_VERSION, token, room }));
        // Cannot fail: a hello's fields are capped well within a frame.
        (session, hello.unwrap_or_default())
    }

    /// Where the session stands.
    pub fn state(&self) -> State {
        self.state
    }

    /// The welcome, once it came.
    pub fn welcome(&self) -> Option<&Welcome> {
        self.welcome.as_ref()
    }

    /// How the session ended, once it did (also told by [`Event::Ended`]).
    pub fn end(&self) -> Option<&End> {
        self.end.as_ref()
    }

    /// How the greeting went: `None` while waiting for the welcome, then the welcome, or how
    /// the session ended before (or after) it.
    /// Where the room lives now, once the server said it moved (the session then ends with
    /// `moved`): a shell connects there with the same hello.
    pub fn moved_to(&self) -> Option<&Moved> {
        self.moved.as_ref()
    }

    pub fn greeted(&self) -> Option<Result<&Welcome, &End>> {
        match (&self.end, &self.welcome) {
            (Some(end), _) => Some(Err(end)),
            (None, Some(welcome)) => Some(Ok(welcome)),
            (None, None) => None,
        }
    }

    /// The room's members by id (the welcome's snapshot, then every join, leave and update).
    pub fn members(&self) -> impl Iterator<Item = &Member> {
        self.members.values()
    }

    /// The room's current reflection prompt, as told.
    pub fn prompt(&self) -> Option<&Prompt> {
        self.prompt.as_ref()
    }

    /// The recording running in the room, as told.
    pub fn recording(&self) -> Option<RecordingInfo> {
        self.recording
    }

    /// The recording playing back in the room, as told.
    pub fn playback(&self) -> Option<PlaybackInfo> {
        self.playback
    }

    /// The timing state machine: clock sync, the newest timeline, notes.
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// The timing state machine, to change (e.g. its schedule margin).
    pub fn client_mut(&mut self) -> &mut Client {
        &mut self.client
    }

    /// Requests sent and not done yet.
    pub fn pending_requests(&self) -> usize {
        self.pending.len()
    }

    /// The next event for the shell.
    pub fn poll_event(&mut self) -> Option<Event<T>> {
        self.events.pop_front()
    }

    /// Numbers `request`, remembers `waiter` with it, and returns its id and the frame to send
    /// on the control stream. Refused with [`RequestError::Closed`] unless the session is live
    /// (the waiter is handed back). If the frame cannot be sent, [`Session::cancel`] the id.
    pub fn request(&mut self, request: Request, waiter: T) -> Result<(u32, Vec<u8>), (RequestError, T)> {
        if self.state != State::Live {
            return Err((RequestError::Closed, waiter));
        }
        let request_id = self.next_request_id();
        let (expect, message) = match request {
            Request::Control(op) => (Expect::Ack, ClientMessage::Control(ControlRequest { request_id, op })),
            Request::RefreshToken(token) => (Expect::Refresh, ClientMessage::RefreshToken { request_id, token }),
            Request::Reflect { id, prompt_id, mood, text } => {
                (Expect::Saved { id }, ClientMessage::Reflect(Reflection { request_id, id, prompt_id, mood, text }))
            }
        };
        match encode_frame(&message) {
            Ok(bytes) => {
                self.pending.insert(request_id, Pending { expect, waiter });
                Ok((request_id, bytes))
            }
            Err(e) => Err((RequestError::Protocol(e.to_string()), waiter)),
        }
    }

    /// Forgets request `request_id` (its frame could not be sent) and hands back its waiter.
    pub fn cancel(&mut self, request_id: u32) -> Option<T> {
        self.pending.remove(&request_id).map(|p| p.waiter)
    }

    /// The next request id: from 1, skipping 0 and ids still pending when it wraps.
    fn next_request_id(&mut self) -> u32 {
        loop {
            let id = self.next_request;
            self.next_request = id.checked_add(1).unwrap_or(1);
            if !self.pending.contains_key(&id) {
                return id;
            }
        }
    }

    /// What to do about the report (sync quality, playout counts) at `now`, asked about every
    /// two seconds: send it if it says something new (the first of the session, coarse sync
    /// quality changed as [`downbeat_protocol::SyncQuality::coarse`] counts it, a classmate's
    /// note scheduled or late since the last) or the last one went [`REPORT_REFRESH_NANOS`]
    /// ago. A settled, quiet class then reports every ten seconds rather than every two: a
    /// fifth of the control-stream traffic, where a server holding thousands of sessions
    /// spends its time on stream frames and their acknowledgements.
    pub fn report(&mut self, now: ClientNanos) -> ReportDue {
        if self.state != State::Live {
            return ReportDue::NotLive;
        }
        let report = self.client.report(now);
        let new = self.last_report.is_none_or(|(at, last)| {
            last.sync.coarse() != report.sync.coarse()
                || (last.notes_played, last.notes_late) != (report.notes_played, report.notes_late)
                || now.0.saturating_sub(at.0) >= REPORT_REFRESH_NANOS
        });
        if !new {
            return ReportDue::Unchanged;
        }
        match encode_frame(&ClientMessage::Report(report)) {
            Ok(frame) => {
                self.last_report = Some((now, report));
                ReportDue::Send(frame)
            }
            Err(_) => ReportDue::Unchanged,
        }
    }

    /// Takes control-stream bytes as they arrived (any chunking) and handles every complete
    /// frame. A frame that does not decode ends the session (the stream is out of step).
    pub fn handle_control_bytes(&mut self, bytes: &[u8]) {
        if self.state == State::Ended {
            return;
        }
        self.decoder.push(bytes);
        while self.state != State::Ended {
            match self.decoder.next_frame::<ServerMessage>() {
                Ok(Some(message)) => self.handle_control(message),
                Ok(None) => break,
                Err(e) => self.finish(End::Protocol(e.to_string())),
            }
        }
    }

    /// Takes one control message from the server.
    pub fn handle_control(&mut self, message: ServerMessage) {
        match self.state {
            State::Ended => {}
            State::Greeting => match message {
                ServerMessage::Welcome(welcome) => {
                    self.client.handle_welcome(&welcome);
                    self.members = welcome.members.iter().map(|m| (m.id, m.clone())).collect();
                    self.welcome = Some(welcome);
                    self.state = State::Live;
                    self.events.push_back(Event::Welcomed);
                }
                ServerMessage::Error(e) => self.finish(End::Server { code: e.code, message: e.message.into_string() }),
                ServerMessage::Moved(moved) => self.moved_away(moved),
                other => self.finish(End::Protocol(format!("expected a welcome, got {other:?}"))),
            },
            State::Live => self.handle_live(message),
        }
    }

    fn handle_live(&mut self, message: ServerMessage) {
        let event = match message {
            // A welcome again, or a probe's answer: not for a joined session.
            ServerMessage::Welcome(_) | ServerMessage::ProbeStarted { .. } => return,
            ServerMessage::Moved(moved) => return self.moved_away(moved),
            ServerMessage::Timeline(t) => {
                let applied = self.client.handle_timeline(&t) == Handled::NewTimeline;
                Event::Timeline { epoch: t.epoch, applied }
            }
            ServerMessage::ControlAck(ack) => return self.answer(ack.request_id, Answer::Control(ack)),
            ServerMessage::TokenRefreshed { request_id, expires_at } => {
                return self.answer(request_id, Answer::TokenRefreshed { expires_at });
            }
            ServerMessage::ReflectionSaved { request_id, id } => {
                return self.answer_saved(request_id, id);
            }
            ServerMessage::Error(e) => {
                let (code, message) = (e.code, e.message.into_string());
                if let Some(request_id) = e.request_id {
                    if let Some(Pending { waiter, .. }) = self.pending.remove(&request_id) {
                        let result = Err(RequestError::Refused { code, message });
                        self.events.push_back(Event::RequestDone { request_id, waiter, result });
                        return;
                    }
                } else {
                    // Not tied to a request: the server may be about to end the session.
                    self.stated_end = Some((code, message.clone()));
                }
                Event::Error { code, message }
            }
            ServerMessage::MemberJoined(m) => {
                self.members.insert(m.id, m.clone());
                Event::MemberJoined(m)
            }
            ServerMessage::MemberUpdated(m) => {
                self.members.insert(m.id, m.clone());
                Event::MemberUpdated(m)
            }
            ServerMessage::MemberLeft { member_id, reason } => {
                self.members.remove(&member_id);
                self.client.forget_sender(member_id);
                Event::MemberLeft { member_id, reason }
            }
            ServerMessage::RoomClosed { message } => {
                let message = message.into_string();
                self.stated_end = Some((ErrorCode::RoomClosed, message.clone()));
                Event::RoomClosed(message)
            }
            ServerMessage::Prompt(p) => {
                self.prompt.clone_from(&p);
                Event::Prompt(p)
            }
            ServerMessage::Recording(r) => {
                self.recording = r;
                Event::Recording(r)
            }
            ServerMessage::Playback(p) => {
                self.playback = p;
                Event::Playback(p)
            }
            ServerMessage::Reflection(notice) => Event::Reflection(notice),
            ServerMessage::Participation(notices) => Event::Participation(notices.into_vec()),
        };
        self.events.push_back(event);
    }

    /// Resolves `request_id` with `answer` if it expects that kind.
    fn answer(&mut self, request_id: u32, answer: Answer) {
        let Some(Pending { expect, waiter }) = self.pending.remove(&request_id) else { return };
        let fits = matches!(
            (expect, &answer),
            (Expect::Ack, Answer::Control(_)) | (Expect::Refresh, Answer::TokenRefreshed { .. })
        );
        let result = if fits { Ok(answer) } else { Err(unexpected(expect, &answer)) };
        self.events.push_back(Event::RequestDone { request_id, waiter, result });
    }

    fn answer_saved(&mut self, request_id: u32, saved: [u8; 16]) {
        let Some(Pending { expect, waiter }) = self.pending.remove(&request_id) else { return };
        let result = match expect {
            Expect::Saved { id } if id == saved => Ok(Answer::ReflectionSaved),
            _ => Err(unexpected(expect, &Answer::ReflectionSaved)),
        };
        self.events.push_back(Event::RequestDone { request_id, waiter, result });
    }

    /// The transport ended (the control stream closed, the connection was lost, or a frame
    /// could not be read): `reason` says how, in the shell's words. Ends the session with what
    /// the server last said, if it said anything, else with [`End::Lost`].
    pub fn handle_closed(&mut self, reason: &str) {
        self.finish(End::Lost(reason.to_owned()));
    }

    /// The transport ended with the server's close `code` (a WebTransport session's close
    /// code, which the server sets to the [`ErrorCode`] it ended the session with; 0 or an
    /// unknown code is a plain loss). The close can overtake the error frame on the control
    /// stream that says the same, and must not then read as a lost connection: a session
    /// replaced by another tab would reconnect and take the seat back.
    pub fn handle_closed_with(&mut self, code: u32, reason: &str) {
        let code = u16::try_from(code).ok().filter(|&c| c != 0).map(ErrorCode::from_u16);
        match code {
            Some(code) if !matches!(code, ErrorCode::Unknown(_)) => {
                let message = if reason.is_empty() { code.as_str().to_owned() } else { reason.to_owned() };
                self.finish(End::Server { code, message });
            }
            _ => self.handle_closed("the connection closed"),
        }
    }

    /// This side closes the session: pending requests fail with [`RequestError::Closed`].
    pub fn close(&mut self) {
        self.finish(End::Closed);
    }

    /// The room lives elsewhere now: remember where, and end with `moved`.
    fn moved_away(&mut self, moved: Moved) {
        self.moved = Some(moved);
        let message = "the room lives on another server now; connecting there".to_owned();
        self.finish(End::Server { code: ErrorCode::Moved, message });
    }

    fn finish(&mut self, end: End) {
        if self.state == State::Ended {
            return;
        }
        self.state = State::Ended;
        let end = match (end, self.stated_end.take()) {
            (End::Closed, _) => End::Closed,
            (_, Some((code, message))) => End::Server { code, message },
            (end, None) => end,
        };
        for (request_id, Pending { waiter, .. }) in std::mem::take(&mut self.pending) {
            self.events.push_back(Event::RequestDone { request_id, waiter, result: Err(RequestError::Closed) });
        }
        self.end = Some(end.clone());
        self.events.push_back(Event::Ended(end));
    }

    /// Takes a datagram received at local time `now` (stamp it before anything else: it may be
    /// a sync reply). Classmates' notes it brought wait in [`Session::poll_note`].
    pub fn handle_datagram(&mut self, now: ClientNanos, bytes: &[u8]) -> Result<Handled, DecodeError> {
        let datagram = decode_server_datagram(bytes)?;
        Ok(self.client.handle_datagram(now, &datagram))
    }

    /// The next classmate's note to sound (see [`Client::poll_note`]).
    pub fn poll_note(&mut self) -> Option<ScheduledNote> {
        self.client.poll_note()
    }

    /// The next datagram to send (a sync request), if one is due at `now`.
    pub fn poll_datagram(&mut self, now: ClientNanos) -> Option<Vec<u8>> {
        // A datagram that cannot be encoded is skipped; the estimator simply asks again.
        self.client.poll_datagram(now).and_then(|d| encode_client_datagram(&d).ok())
    }

    /// When [`Session::poll_datagram`] next has something.
    pub fn poll_timeout(&self) -> ClientNanos {
        self.client.poll_timeout()
    }

    /// Whether the clock is synced at `now`, if that changed since the last call (a session
    /// starts unsynced).
    pub fn poll_synced(&mut self, now: ClientNanos) -> Option<bool> {
        let synced = self.client.is_synced(now);
        (std::mem::replace(&mut self.synced, synced) != synced).then_some(synced)
    }

    /// The student played a note at local time `now`: checks its range, stamps it on the
    /// shared clock and returns it with the datagram to send (see [`Client::play_note`]).
    pub fn play_note(
        &mut self,
        now: ClientNanos,
        midi: u8,
        velocity: u8,
        instrument: u8,
    ) -> Result<(Note, Vec<u8>), NoteError> {
        if !notes::playable(midi, velocity, instrument) {
            return Err(NoteError::OutOfRange { midi, velocity, instrument });
        }
        let (note, datagram) = self.client.play_note(now, midi, velocity, instrument).ok_or(NoteError::NotSynced)?;
        Ok((note, datagram_bytes(&datagram)))
    }
}

fn datagram_bytes(datagram: &ClientDatagram) -> Vec<u8> {
    // Cannot fail: at most REDUNDANT_NOTES + 1 notes, far below the datagram cap.
    encode_client_datagram(datagram).unwrap_or_default()
}

fn unexpected(expect: Expect, got: &Answer) -> RequestError {
    let wanted = match expect {
        Expect::Ack => "an acknowledgement",
        Expect::Refresh => "a refresh answer",
        Expect::Saved { .. } => "a reflection answer",
    };
    RequestError::Protocol(format!("expected {wanted}, got {got:?}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use downbeat_protocol::{
        Applied, BoundedString, BoundedVec, Change, ErrorFrame, JoinCode, LeaveReason, MicroBpm, Role, RoomInfo,
        ServerDatagram, ServerNanos, SyncQuality, SyncReply,
    };

    use crate::timeline::Timeline;

    const MS: u64 = 1_000_000;

    fn member(id: u64, name: &str) -> Member {
        Member {
            id,
            name: BoundedString::truncating(name),
            role: if id == 1 { Role::Teacher } else { Role::Student },
            assignment: Default::default(),
            muted: false,
            sync: SyncQuality::default(),
            transport: Default::default(),
        }
    }

    fn welcome(members: &[Member]) -> ServerMessage {
        ServerMessage::Welcome(Welcome {
            version: PROTOCOL_VERSION,
            member_id: 1,
            role: Role::Teacher,
            room: RoomInfo {
                code: BoundedString::truncating("K7QFM3XP"),
                name: BoundedString::truncating("Room 12"),
                playout_delay_nanos: 80 * MS,
            },
            timeline: Timeline::new(ServerNanos(0), MicroBpm::from_bpm(120), 4).unwrap().to_wire(),
            members: BoundedVec::try_from_vec(members.to_vec()).unwrap(),
            lead_nanos: 1_500 * MS,
            server_now: ServerNanos(0),
            token_expires_at: 0,
        })
    }

    fn error(code: ErrorCode, request_id: Option<u32>) -> ServerMessage {
        ServerMessage::Error(ErrorFrame { code, request_id, message: BoundedString::truncating(code.as_str()) })
    }

    fn ack(request_id: u32) -> ServerMessage {
        ServerMessage::ControlAck(ControlAck { request_id, applied: None })
    }

    /// Feeds `message` as frame bytes, split in two chunks to exercise the decoder.
    fn feed<T>(s: &mut Session<T>, message: &ServerMessage) {
        let bytes = encode_frame(message).unwrap();
        let (a, b) = bytes.split_at(bytes.len() / 2);
        s.handle_control_bytes(a);
        s.handle_control_bytes(b);
    }

    fn sent(bytes: &[u8]) -> ClientMessage {
        let mut d = FrameDecoder::new();
        d.push(bytes);
        d.next_frame().unwrap().unwrap()
    }

    fn events<T>(s: &mut Session<T>) -> Vec<Event<T>> {
        std::iter::from_fn(|| s.poll_event()).collect()
    }

    fn join() -> RoomRequest {
        RoomRequest::Join(JoinCode::truncating("K7QFM3XP"))
    }

    /// A live session whose welcome listed `members`.
    fn live(members: &[Member]) -> Session<&'static str> {
        let (mut s, hello) = Session::connect(clock::Config::default(), BoundedString::truncating("jwt"), join());
        let ClientMessage::Hello(h) = sent(&hello) else { panic!() };
        assert_eq!((h.version, h.token.as_str(), h.room), (PROTOCOL_VERSION, "jwt", join()));
        assert_eq!(s.state(), State::Greeting);
        assert!(matches!(s.request(Request::Control(ControlOp::Close), "early"), Err((RequestError::Closed, "early"))));
        feed(&mut s, &welcome(members));
        assert_eq!(s.state(), State::Live);
        assert_eq!(events(&mut s), vec![Event::Welcomed]);
        s
    }

    fn control(s: &mut Session<&'static str>, waiter: &'static str) -> u32 {
        let (id, bytes) = s.request(Request::Control(ControlOp::Timeline(Change::Stop)), waiter).unwrap();
        let ClientMessage::Control(c) = sent(&bytes) else { panic!() };
        assert_eq!((c.request_id, c.op), (id, ControlOp::Timeline(Change::Stop)));
        id
    }

    fn done(request_id: u32, waiter: &'static str, result: Result<Answer, RequestError>) -> Event<&'static str> {
        Event::RequestDone { request_id, waiter, result }
    }

    fn refused(code: ErrorCode) -> Result<Answer, RequestError> {
        Err(RequestError::Refused { code, message: code.as_str().to_owned() })
    }

    #[test]
    fn answers_and_refusals_reach_their_request_in_any_order() {
        let mut s = live(&[member(1, "Ada")]);
        let (a, b, c) = (control(&mut s, "a"), control(&mut s, "b"), control(&mut s, "c"));
        assert_eq!((a, b, c), (1, 2, 3));
        assert_eq!(s.pending_requests(), 3);
        feed(&mut s, &error(ErrorCode::NotRunning, Some(c)));
        let applied = Applied { epoch: 4, effective_at: ServerNanos(9), effective_beat: 8 };
        feed(&mut s, &ServerMessage::ControlAck(ControlAck { request_id: a, applied: Some(applied) }));
        feed(&mut s, &ack(b));
        // A second answer to a done request, and one to a request never made, are ignored.
        feed(&mut s, &ack(a));
        feed(&mut s, &ack(77));
        assert_eq!(
            events(&mut s),
            vec![
                done(c, "c", refused(ErrorCode::NotRunning)),
                done(a, "a", Ok(Answer::Control(ControlAck { request_id: a, applied: Some(applied) }))),
                done(b, "b", Ok(Answer::Control(ControlAck { request_id: b, applied: None }))),
            ]
        );
        assert_eq!(s.pending_requests(), 0);
        assert_eq!(s.state(), State::Live, "a refusal ends nothing");
    }

    #[test]
    fn answers_of_the_wrong_kind_fail_their_request() {
        let mut s = live(&[]);
        let token = BoundedString::truncating("fresh");
        let (refresh, bytes) = s.request(Request::RefreshToken(token.clone()), "refresh").unwrap();
        assert_eq!(sent(&bytes), ClientMessage::RefreshToken { request_id: refresh, token });
        let reflect = Request::Reflect { id: [7; 16], prompt_id: 2, mood: Some(3), text: None };
        let (saved, bytes) = s.request(reflect.clone(), "saved").unwrap();
        let ClientMessage::Reflect(r) = sent(&bytes) else { panic!() };
        assert_eq!((r.request_id, r.id, r.prompt_id, r.mood), (saved, [7; 16], 2, Some(3)));
        let (other_id, _) = s.request(reflect.clone(), "other id").unwrap();
        let (acked, _) = s.request(reflect, "acked").unwrap();
        let control = control(&mut s, "control");
        feed(&mut s, &ServerMessage::TokenRefreshed { request_id: refresh, expires_at: 1_900 });
        feed(&mut s, &ServerMessage::ReflectionSaved { request_id: saved, id: [7; 16] });
        feed(&mut s, &ServerMessage::ReflectionSaved { request_id: other_id, id: [8; 16] });
        feed(&mut s, &ack(acked));
        feed(&mut s, &ServerMessage::TokenRefreshed { request_id: control, expires_at: 1 });
        let got = events(&mut s);
        assert_eq!(
            got[..2],
            [
                done(refresh, "refresh", Ok(Answer::TokenRefreshed { expires_at: 1_900 })),
                done(saved, "saved", Ok(Answer::ReflectionSaved)),
            ]
        );
        for (event, (id, waiter)) in
            got[2..].iter().zip([(other_id, "other id"), (acked, "acked"), (control, "control")])
        {
            assert!(
                matches!(event, Event::RequestDone { request_id, waiter: w, result: Err(RequestError::Protocol(_)) }
                    if *request_id == id && *w == waiter),
                "{event:?}"
            );
        }
        assert_eq!(got.len(), 5);
    }

    #[test]
    fn errors_without_a_request_are_events_and_the_last_one_ends_the_session() {
        let mut s = live(&[]);
        let pending = control(&mut s, "pending");
        feed(&mut s, &error(ErrorCode::RateLimited, None));
        // An error naming a request that is not pending is told, not matched.
        feed(&mut s, &error(ErrorCode::MalformedFrame, Some(pending + 1)));
        feed(&mut s, &error(ErrorCode::Removed, None));
        assert_eq!(s.state(), State::Live);
        s.handle_closed("the connection closed");
        assert_eq!(
            events(&mut s),
            vec![
                Event::Error { code: ErrorCode::RateLimited, message: "rate_limited".into() },
                Event::Error { code: ErrorCode::MalformedFrame, message: "malformed_frame".into() },
                Event::Error { code: ErrorCode::Removed, message: "removed".into() },
                done(pending, "pending", Err(RequestError::Closed)),
                Event::Ended(End::Server { code: ErrorCode::Removed, message: "removed".into() }),
            ]
        );
        assert!(End::Server { code: ErrorCode::Removed, message: String::new() }.is_final());
        assert!(!End::Server { code: ErrorCode::RateLimited, message: String::new() }.is_final());
    }

    #[test]
    fn a_closed_room_is_told_and_ends_the_session_as_room_closed() {
        let mut s = live(&[]);
        feed(&mut s, &ServerMessage::RoomClosed { message: BoundedString::truncating("class is over") });
        feed(&mut s, &ack(1));
        s.handle_closed("the server ended the session");
        let end = End::Server { code: ErrorCode::RoomClosed, message: "class is over".into() };
        assert_eq!(events(&mut s), vec![Event::RoomClosed("class is over".into()), Event::Ended(end.clone())]);
        assert!(end.is_final());
        // Nothing after the end.
        feed(&mut s, &ServerMessage::Prompt(None));
        s.handle_closed("again");
        s.close();
        assert_eq!(events(&mut s), vec![]);
        assert_eq!(s.report(ClientNanos(0)), ReportDue::NotLive);
    }

    #[test]
    fn a_close_code_says_why_when_it_overtakes_the_error_frame() {
        // Replaced by another tab: the transport's close arrives first, with the code.
        let mut s = live(&[]);
        s.handle_closed_with(u32::from(ErrorCode::SessionReplaced.as_u16()), "");
        let end = End::Server { code: ErrorCode::SessionReplaced, message: "session_replaced".into() };
        assert_eq!(events(&mut s), vec![Event::Ended(end.clone())]);
        assert!(end.is_final(), "the tab must not reconnect and take its seat back");
        // The error frame said it first: its words stay.
        let mut s = live(&[]);
        feed(&mut s, &error(ErrorCode::Removed, None));
        s.handle_closed_with(u32::from(ErrorCode::Removed.as_u16()), "removed");
        assert!(
            events(&mut s).contains(&Event::Ended(End::Server { code: ErrorCode::Removed, message: "removed".into() }))
        );
        // A plain close (0), a code this build does not know, or one too large: a lost connection.
        for code in [0, 999, 70_000] {
            let mut s = live(&[]);
            s.handle_closed_with(code, "bye");
            assert_eq!(events(&mut s), vec![Event::Ended(End::Lost("the connection closed".into()))], "code {code}");
        }
    }

    #[test]
    fn a_lost_connection_or_a_close_fails_every_pending_request() {
        let mut s = live(&[]);
        let (a, b) = (control(&mut s, "a"), control(&mut s, "b"));
        s.handle_closed("the connection closed");
        assert_eq!(
            events(&mut s),
            vec![
                done(a, "a", Err(RequestError::Closed)),
                done(b, "b", Err(RequestError::Closed)),
                Event::Ended(End::Lost("the connection closed".into())),
            ]
        );
        assert!(!End::Lost(String::new()).is_final());
        assert!(matches!(s.request(Request::Control(ControlOp::Close), "late"), Err((RequestError::Closed, "late"))));

        // Closing from this side wins over what the server said.
        let mut s = live(&[]);
        let a = control(&mut s, "a");
        feed(&mut s, &error(ErrorCode::TokenExpired, None));
        s.close();
        let got = events(&mut s);
        assert_eq!(got[1..], [done(a, "a", Err(RequestError::Closed)), Event::Ended(End::Closed)]);
    }

    #[test]
    fn a_request_whose_frame_was_not_sent_is_cancelled() {
        let mut s = live(&[]);
        let a = control(&mut s, "a");
        assert_eq!(s.cancel(a), Some("a"));
        assert_eq!(s.cancel(a), None);
        feed(&mut s, &ack(a));
        s.close();
        assert_eq!(events(&mut s), vec![Event::Ended(End::Closed)]);
    }

    #[test]
    fn request_ids_count_from_one_and_skip_zero_and_pending_ids_when_they_wrap() {
        let mut s = live(&[]);
        assert_eq!(control(&mut s, "one"), 1);
        s.next_request = u32::MAX - 1;
        assert_eq!(control(&mut s, "max-1"), u32::MAX - 1);
        assert_eq!(control(&mut s, "max"), u32::MAX);
        // 0 is skipped and 1 is still pending.
        assert_eq!(control(&mut s, "two"), 2);
        feed(&mut s, &ack(1));
        s.next_request = 1;
        assert_eq!(control(&mut s, "one again"), 1);
        assert_eq!(s.pending_requests(), 4);
    }

    #[test]
    fn presence_is_the_welcome_plus_every_join_leave_and_update() {
        let mut s = live(&[member(1, "Ada"), member(4, "Bo")]);
        let names = |s: &Session<&str>| s.members().map(|m| (m.id, m.name.as_str().to_owned())).collect::<Vec<_>>();
        assert_eq!(names(&s), vec![(1, "Ada".to_owned()), (4, "Bo".to_owned())]);
        feed(&mut s, &ServerMessage::MemberJoined(member(2, "Cy")));
        let mut muted = member(4, "Bo");
        muted.muted = true;
        feed(&mut s, &ServerMessage::MemberUpdated(muted.clone()));
        feed(&mut s, &ServerMessage::MemberLeft { member_id: 1, reason: LeaveReason::Left });
        feed(&mut s, &ServerMessage::MemberLeft { member_id: 9, reason: LeaveReason::Removed });
        assert_eq!(names(&s), vec![(2, "Cy".to_owned()), (4, "Bo".to_owned())]);
        assert!(s.members().find(|m| m.id == 4).unwrap().muted);
        assert_eq!(
            events(&mut s),
            vec![
                Event::MemberJoined(member(2, "Cy")),
                Event::MemberUpdated(muted),
                Event::MemberLeft { member_id: 1, reason: LeaveReason::Left },
                Event::MemberLeft { member_id: 9, reason: LeaveReason::Removed },
            ]
        );
        // A second welcome changes nothing.
        feed(&mut s, &welcome(&[]));
        assert_eq!((s.members().count(), events(&mut s)), (2, vec![]));
    }

    #[test]
    fn the_prompt_and_the_teachers_feed_are_kept_and_told() {
        let mut s = live(&[]);
        assert_eq!(s.prompt(), None);
        let prompt = Prompt { id: 3, text: BoundedString::truncating("How did it go?") };
        feed(&mut s, &ServerMessage::Prompt(Some(prompt.clone())));
        assert_eq!(s.prompt(), Some(&prompt));
        let notice = ReflectionNotice { member_id: 4, id: [1; 16], prompt_id: 3, mood: Some(2), text: None };
        feed(&mut s, &ServerMessage::Reflection(notice.clone()));
        let part = ParticipationNotice { member_id: 4, notes: 9, ..Default::default() };
        feed(&mut s, &ServerMessage::Participation(BoundedVec::try_from_vec(vec![part]).unwrap()));
        feed(&mut s, &ServerMessage::Prompt(None));
        assert_eq!(s.prompt(), None);
        assert_eq!(
            events(&mut s),
            vec![
                Event::Prompt(Some(prompt)),
                Event::Reflection(notice),
                Event::Participation(vec![part]),
                Event::Prompt(None),
            ]
        );
    }

    #[test]
    fn timelines_on_the_control_stream_are_applied_when_newer_and_always_told() {
        let mut s = live(&[]);
        let mut t = Timeline::new(ServerNanos(0), MicroBpm::from_bpm(120), 4).unwrap();
        t.apply(ServerNanos(0), Change::Start { count_in_bars: 0 }, 1_500 * MS).unwrap();
        feed(&mut s, &ServerMessage::Timeline(t.to_wire()));
        feed(&mut s, &ServerMessage::Timeline(t.to_wire()));
        assert_eq!(s.client().timeline().unwrap().epoch(), t.epoch());
        assert_eq!(
            events(&mut s),
            vec![
                Event::Timeline { epoch: t.epoch(), applied: true },
                Event::Timeline { epoch: t.epoch(), applied: false },
            ]
        );
    }

    #[test]
    fn a_hello_answered_moved_ends_with_moved_and_says_where_the_room_lives() {
        let moved = Moved {
            webtransport_url: BoundedString::truncating("https://music-2.example:4433/"),
            websocket_url: BoundedString::truncating("wss://music-2.example/api/ws"),
            certificate_hashes: BoundedVec::try_from_vec(vec![[7; 32]]).unwrap(),
        };
        let mut s = Session::<()>::connect(clock::Config::default(), BoundedString::truncating("jwt"), join()).0;
        feed(&mut s, &ServerMessage::Moved(moved.clone()));
        assert_eq!(s.moved_to(), Some(&moved));
        let Some(Err(End::Server { code, .. })) = s.greeted() else { panic!("{:?}", s.greeted()) };
        assert_eq!(*code, ErrorCode::Moved);
        assert!(!s.end().unwrap().is_final(), "a client follows a move");
        // A live session told it moved (a room handed to another node) ends the same way.
        let mut s = live(&[]);
        feed(&mut s, &ServerMessage::Moved(moved.clone()));
        assert_eq!((s.state(), s.moved_to()), (State::Ended, Some(&moved)));
    }

    #[test]
    fn the_hello_can_be_refused_or_answered_out_of_step() {
        let hello = || Session::<()>::connect(clock::Config::default(), BoundedString::truncating("jwt"), join()).0;
        let mut s = hello();
        assert_eq!(s.greeted(), None);
        feed(&mut s, &error(ErrorCode::RoomNotFound, None));
        let end = End::Server { code: ErrorCode::RoomNotFound, message: "room_not_found".into() };
        assert_eq!(s.greeted(), Some(Err(&end)));
        assert_eq!((s.state(), events(&mut s)), (State::Ended, vec![Event::Ended(end)]));
        assert_eq!(s.welcome(), None);

        let mut s = hello();
        feed(&mut s, &ServerMessage::Prompt(None));
        assert!(matches!(events(&mut s)[..], [Event::Ended(End::Protocol(_))]));

        // A frame over the cap is out of step at once, and nothing after it is read.
        let mut s = hello();
        let mut bytes = u32::MAX.to_be_bytes().to_vec();
        bytes.extend(encode_frame(&welcome(&[])).unwrap());
        s.handle_control_bytes(&bytes);
        assert!(matches!(events(&mut s)[..], [Event::Ended(End::Protocol(_))]));

        // The welcome and what follows it in the same chunk.
        let mut s = hello();
        let mut bytes = encode_frame(&welcome(&[member(1, "Ada")])).unwrap();
        bytes.extend(encode_frame(&ServerMessage::Prompt(None)).unwrap());
        s.handle_control_bytes(&bytes);
        assert_eq!(events(&mut s), vec![Event::Welcomed, Event::Prompt(None)]);
        assert_eq!(s.greeted().unwrap().unwrap().member_id, 1);
        assert_eq!(s.end(), None);
        s.handle_closed("gone");
        assert_eq!(s.greeted(), Some(Err(&End::Lost("gone".into()))));
        assert_eq!(s.client().playout_delay_nanos(), 80 * MS);
    }

    #[test]
    fn datagrams_sync_the_clock_and_notes_are_checked_before_they_are_sent() {
        let mut s = live(&[]);
        assert_eq!(s.play_note(ClientNanos(0), 60, 100, 0), Err(NoteError::NotSynced));
        assert_eq!(s.play_note(ClientNanos(0), 128, 100, 0).unwrap_err().code(), Some(ErrorCode::NoteOutOfRange));
        assert_eq!(s.poll_synced(ClientNanos(0)), None, "a session starts unsynced");
        assert!(s.handle_datagram(ClientNanos(0), &[0xff; 3]).is_err());
        // Local clock 5 s behind the server, 2 ms round trips: enough samples to sync.
        let mut now = ClientNanos(10 * MS);
        let mut flips = Vec::new();
        for _ in 0..64 {
            now = now.max(s.poll_timeout());
            let Some(bytes) = s.poll_datagram(now) else { continue };
            let Ok(ClientDatagram::SyncRequest(req)) = downbeat_protocol::decode_client_datagram(&bytes) else {
                panic!()
            };
            let at = ServerNanos(now.0 + 5_000 * MS + MS);
            let reply = ServerDatagram::SyncReply(SyncReply { id: req.id, t0: req.t0, t1: at, t2: at });
            now = ClientNanos(now.0 + 2 * MS);
            let bytes = downbeat_protocol::encode_server_datagram(&reply).unwrap();
            assert_eq!(s.handle_datagram(now, &bytes), Ok(Handled::Sample));
            flips.extend(s.poll_synced(now));
        }
        assert_eq!(flips, vec![true]);
        let (note, bytes) = s.play_note(now, 60, 100, 0).unwrap();
        assert_eq!((note.seq, note.played_at), (1, ServerNanos(now.0 + 5_000 * MS)));
        assert!(matches!(downbeat_protocol::decode_client_datagram(&bytes), Ok(ClientDatagram::Notes(_))));
        let ReportDue::Send(report) = s.report(now) else { panic!("the first report goes out") };
        assert!(matches!(sent(&report), ClientMessage::Report(r) if r.sync.synced));
        // Nothing new two seconds on (the estimate coasts, no classmate played): nothing sent,
        // until ten seconds after the last one.
        let later = |secs: u64| ClientNanos(now.0 + secs * 1_000 * MS);
        assert_eq!(s.report(later(2)), ReportDue::Unchanged);
        assert_eq!(s.report(later(8)), ReportDue::Unchanged);
        assert!(matches!(s.report(later(10)), ReportDue::Send(_)));
        assert_eq!(s.report(later(12)), ReportDue::Unchanged);
    }
}
