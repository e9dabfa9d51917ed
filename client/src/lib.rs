//! A native Downbeat client (tokio), over WebTransport (wtransport) or, where QUIC is
//! blocked, WebSocket (tokio-tungstenite).
//!
//! [`Client::connect`] opens a session, sends the hello and waits for the welcome; from then on
//! a driver task runs clock sync on datagrams, applies every newer timeline, and answers "at
//! what instant of my local clock does beat n sound" ([`Client::local_time_of_beat`]).
//!
//! It also keeps the room's presence, plays notes ([`Client::play_note`]) and yields
//! classmates' notes placed on the local clock at their shared playout instant
//! ([`Client::next_note`]), sends the teacher's controls, refreshes its token, and reports its
//! sync quality every couple of seconds so the teacher sees who is in time.
//!
//! All of that is decided by the engine: [`downbeat_engine::session::Session`] (hello and
//! welcome, presence, prompt, requests matched to answers, why a session ended) over
//! [`downbeat_engine::client::Client`] (clock sync, timeline, notes). This crate only moves
//! bytes through a transport (`transport.rs` is the seam; `webtransport.rs` and
//! `websocket.rs` implement it, picked by the URL's scheme), reads the [`LocalClock`] (which tests replace with an [`InjectedClock`] of
//! known offset and drift), and translates the session's events into futures (each request
//! waits on a oneshot channel the session hands back with its answer) and the [`Event`] stream.
//!
//! [`probe::probe`] runs a network check (a probe session, no token) the way the browser's
//! `/check` page does.
//!
//! The driver stamps a clock-sync reply when its task runs, not when the socket received it,
//! so time a reply waits for a busy runtime reads as a slower way back and biases that
//! exchange by half the wait. The estimator trusts the fastest exchanges most, but an
//! application that runs this client beside heavy work, or many clients in one process (the
//! benchmark's class), keeps its clock tighter on a runtime that looks at its sockets often
//! (`tokio::runtime::Builder::event_interval`).
//!
//! Used by the end-to-end tests and the benchmark harness; it is also a reference for other
//! native clients. It does not reconnect by itself: connecting again with the same token
//! within the server's grace period takes the same seat back.
#![cfg_attr(not(test), warn(clippy::unwrap_used))]

mod clock;
pub mod probe;
mod transport;
mod websocket;
mod webtransport;

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use downbeat_engine::clock::{Config as SyncConfig, Estimate};
use downbeat_engine::notes::ScheduledNote;
use downbeat_engine::session::{self, Answer, NoteError, Request, RequestError, Session, State};
use downbeat_engine::timeline::Timeline;
use downbeat_protocol::{
    BoundedString, Change, ClientNanos, ControlAck, ControlOp, ErrorCode, JoinCode, LeaveReason, Member, Note,
    ParticipationNotice, PlaybackInfo, Prompt, PromptText, RecordingInfo, ReflectionNotice, ReflectionText,
    RoomRequest, RoomSettings, ServerNanos, Welcome,
};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;

use crate::transport::Transport;

pub use clock::{InjectedClock, LocalClock, SystemClock};
pub use webtransport::read_message;

/// Why a client call failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// The endpoint could not be set up.
    #[error("could not create the client endpoint: {0}")]
    Endpoint(#[source] std::io::Error),
    /// The WebTransport session could not be established.
    #[error("could not connect: {0}")]
    Connect(String),
    /// The server refused with a stable code.
    #[error("refused by the server: {code}: {message}")]
    Refused {
        /// The stable code.
        code: ErrorCode,
        /// The server's explanation.
        message: String,
    },
    /// The session ended.
    #[error("the session is closed")]
    Closed,
    /// The server sent something that did not decode.
    #[error("protocol error: {0}")]
    Protocol(String),
    /// A value was too long for the wire.
    #[error("{0}")]
    TooLong(#[from] downbeat_protocol::TooLong),
    /// Waited too long.
    #[error("timed out waiting for {0}")]
    Timeout(&'static str),
}

/// How many times one connect follows a room that lives on another server (`moved`).
pub const MAX_MOVES: usize = 3;

/// How to connect.
#[derive(Clone, Debug)]
pub struct ConnectOptions {
    /// `https://host:port` of the server's WebTransport endpoint, or its WebSocket endpoint
    /// (`ws://host:port/api/ws` on its HTTP listener, `wss://…` on HTTPS) where QUIC is blocked.
    pub url: String,
    /// SHA-256 hashes of acceptable self-signed server certificates; empty to use the system
    /// roots (production certificates).
    pub cert_hashes: Vec<[u8; 32]>,
    /// The signed token (JWT); the display name and role come from it.
    pub token: String,
    /// The room to join, or a room to create (teachers).
    pub room: RoomRequest,
    /// Clock-sync settings.
    pub sync: SyncConfig,
    /// How long to wait for the welcome.
    pub handshake_timeout: Duration,
    /// How often sync quality and playout counts are reported; `None`: never.
    pub report_interval: Option<Duration>,
    /// The local address to send from; `None`: any (the system picks). Benchmarks give each
    /// simulated client its own address so a network emulator can tell them apart.
    pub bind_address: Option<std::net::IpAddr>,
}

impl ConnectOptions {
    /// Options to join the room with join code `code`, with default sync settings, a 10 s
    /// handshake timeout and a report every 2 s.
    pub fn new(url: impl Into<String>, token: impl Into<String>, code: &str) -> Self {
        Self {
            url: url.into(),
            cert_hashes: Vec::new(),
            token: token.into(),
            room: RoomRequest::Join(JoinCode::truncating(code)),
            sync: SyncConfig::default(),
            handshake_timeout: Duration::from_secs(10),
            report_interval: Some(Duration::from_secs(2)),
            bind_address: None,
        }
    }

    /// Options to create a room (teachers only) and join it.
    pub fn create(url: impl Into<String>, token: impl Into<String>, settings: RoomSettings) -> Self {
        Self { room: RoomRequest::Create(settings), ..Self::new(url, token, "") }
    }
}

/// Something the server told this client on the control stream, in the order it was told.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub enum Event {
    /// Someone joined.
    MemberJoined(Member),
    /// Someone left.
    MemberLeft(u64, LeaveReason),
    /// Someone's presence changed (mute, part, sync quality).
    MemberUpdated(Member),
    /// A timeline arrived on the control stream (its epoch).
    Timeline(u64),
    /// The room was closed; the session ends next.
    RoomClosed(String),
    /// An error not tied to a request (the session may end with it).
    Error(ErrorCode, String),
    /// The teacher set (or cleared) the reflection prompt.
    Prompt(Option<Prompt>),
    /// A recording of the room started (`Some`) or stopped (`None`): everyone is told.
    Recording(Option<RecordingInfo>),
    /// A recording plays back (`None`: it is over); its notes arrive like a classmate's, from
    /// member id [`downbeat_engine::room::PLAYBACK_FROM`].
    Playback(Option<PlaybackInfo>),
    /// Teachers only: a student's reflection was saved.
    Reflection(ReflectionNotice),
    /// Teachers only: participation so far of the members who played since the last update.
    Participation(Vec<ParticipationNotice>),
}

/// What a request's caller waits on; the session hands it back with the answer.
type Waiter = oneshot::Sender<Result<Answer, RequestError>>;

/// The session engine and where its events go, behind one lock shared by the tasks and the
/// methods of [`Client`]. The lock is never held across an `await`.
struct Shared {
    session: Session<Waiter>,
    /// Dropped when the session ends, so [`Client::next_event`] ends too.
    events: Option<mpsc::Sender<Event>>,
    /// Why the server ended the session, once it did.
    ended_by_server: Option<(ErrorCode, String)>,
}

impl Shared {
    /// Translates the session's events: answers wake their caller, the rest go to the event
    /// stream.
    fn dispatch(&mut self) {
        while let Some(event) = self.session.poll_event() {
            let event = match event {
                session::Event::RequestDone { waiter, result, .. } => {
                    // A caller that stopped waiting does not mind.
                    let _ = waiter.send(result);
                    continue;
                }
                session::Event::Ended(end) => {
                    tracing::debug!(?end, "session ended");
                    if let session::End::Server { code, message } = end {
                        self.ended_by_server = Some((code, message));
                    }
                    self.events = None;
                    continue;
                }
                session::Event::MemberJoined(m) => Event::MemberJoined(m),
                session::Event::MemberLeft { member_id, reason } => Event::MemberLeft(member_id, reason),
                session::Event::MemberUpdated(m) => Event::MemberUpdated(m),
                session::Event::Timeline { epoch, .. } => Event::Timeline(epoch),
                session::Event::RoomClosed(message) => Event::RoomClosed(message),
                session::Event::Error { code, message } => Event::Error(code, message),
                session::Event::Prompt(p) => Event::Prompt(p),
                session::Event::Recording(r) => Event::Recording(r),
                session::Event::Playback(p) => Event::Playback(p),
                session::Event::Reflection(notice) => Event::Reflection(notice),
                session::Event::Participation(notices) => Event::Participation(notices),
                _ => continue,
            };
            if let Some(events) = &self.events {
                // A consumer that does not read events loses them, never the session.
                let _ = events.try_send(event);
            }
        }
    }
}

/// A connected session. Dropping it closes the session.
pub struct Client {
    transport: Arc<dyn Transport>,
    clock: Arc<dyn LocalClock>,
    shared: Arc<Mutex<Shared>>,
    welcome: Welcome,
    synced: watch::Receiver<bool>,
    frames: watch::Receiver<u64>,
    samples: watch::Receiver<u64>,
    events: tokio::sync::Mutex<mpsc::Receiver<Event>>,
    notes: tokio::sync::Mutex<mpsc::Receiver<ScheduledNote>>,
    tasks: Vec<JoinHandle<()>>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("member_id", &self.welcome.member_id)
            .field("room", &self.welcome.room)
            .finish_non_exhaustive()
    }
}

fn lock(shared: &Mutex<Shared>) -> MutexGuard<'_, Shared> {
    // A panic while holding the lock cannot leave the engine state half-updated in a way that
    // matters more than losing the session, so take the data either way.
    shared.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn request_error(e: RequestError) -> ClientError {
    match e {
        RequestError::Refused { code, message } => ClientError::Refused { code, message },
        RequestError::Closed => ClientError::Closed,
        RequestError::Protocol(message) => ClientError::Protocol(message),
        other => ClientError::Protocol(other.to_string()),
    }
}

fn ended(end: &session::End) -> ClientError {
    match end {
        session::End::Server { code, message } => ClientError::Refused { code: *code, message: message.clone() },
        session::End::Protocol(message) => ClientError::Protocol(message.clone()),
        session::End::Lost(_) | session::End::Closed => ClientError::Closed,
    }
}

/// Says hello on `transport` and feeds the control stream to `session` until it is welcomed.
async fn greet(transport: &dyn Transport, session: &mut Session<Waiter>, hello: &[u8]) -> Result<Welcome, ClientError> {
    transport.send_control(hello).await?;
    loop {
        match transport.recv_control().await {
            Some(bytes) => session.handle_control_bytes(&bytes),
            None => session.handle_closed("the server ended the session before welcoming it"),
        }
        if let Some(greeted) = session.greeted() {
            return greeted.cloned().map_err(ended);
        }
    }
}

impl Client {
    /// Connects with the machine's clock.
    pub async fn connect(options: ConnectOptions) -> Result<Self, ClientError> {
        Self::connect_with_clock(options, Arc::new(SystemClock::new())).await
    }

    /// Connects, timestamping with `clock`. A server of a cluster that does not hold the
    /// room answers where it lives (`moved`): the client connects there, on the same kind of
    /// transport, at most [`MAX_MOVES`] times.
    pub async fn connect_with_clock(options: ConnectOptions, clock: Arc<dyn LocalClock>) -> Result<Self, ClientError> {
        Self::open(options, clock, None).await
    }

    /// Connects again as this client's member (its session ended: the server went away, or
    /// the room moved to another server of its cluster), on the same local clock. The clock
    /// estimate is kept when the server reached keeps the same time base (see
    /// [`downbeat_engine::client::Client::carry_clock`]), so every beat stays where it was.
    pub async fn reconnect(&self, options: ConnectOptions) -> Result<Self, ClientError> {
        let estimator = lock(&self.shared).session.client().clock().clone();
        Self::open(options, self.clock.clone(), Some(estimator)).await
    }

    async fn open(
        options: ConnectOptions,
        clock: Arc<dyn LocalClock>,
        carry: Option<downbeat_engine::clock::Estimator>,
    ) -> Result<Self, ClientError> {
        let mut options = options;
        let mut moves = 0;
        let (transport, welcome, session) = loop {
            let token = BoundedString::new(options.token.clone())?;
            let (mut session, hello) = Session::connect(options.sync.clone(), token, options.room.clone());
            let handshake = async {
                let transport = transport::open(&options).await?;
                let greeted = greet(&*transport, &mut session, &hello).await;
                Ok::<_, ClientError>((transport, greeted))
            };
            let (transport, greeted) = tokio::time::timeout(options.handshake_timeout, handshake)
                .await
                .map_err(|_| ClientError::Timeout("the welcome"))??;
            match (greeted, session.moved_to()) {
                (Ok(welcome), _) => {
                    if let Some(previous) = &carry {
                        let kept = session.client_mut().carry_clock(previous, welcome.server_now, clock.now());
                        tracing::debug!(kept, "clock estimate carried over from the last session");
                    }
                    break (transport, welcome, session);
                }
                (Err(_), Some(moved)) if moves < MAX_MOVES => {
                    transport.close(0, b"moved");
                    let websocket = options.url.starts_with("ws://") || options.url.starts_with("wss://");
                    let url = if websocket { &moved.websocket_url } else { &moved.webtransport_url };
                    options.url = url.to_string();
                    options.cert_hashes = moved.certificate_hashes.to_vec();
                    moves += 1;
                }
                (Err(e), _) => return Err(e),
            }
        };

        let (synced_tx, synced) = watch::channel(false);
        let (frames_tx, frames) = watch::channel(0u64);
        let (samples_tx, samples) = watch::channel(0u64);
        let (events_tx, events) = mpsc::channel(4096);
        let (notes_tx, notes) = mpsc::channel(4096);
        let shared = Arc::new(Mutex::new(Shared { session, events: Some(events_tx), ended_by_server: None }));
        let driver = Driver {
            transport: transport.clone(),
            clock: clock.clone(),
            shared: shared.clone(),
            synced: synced_tx,
            frames: frames_tx,
            samples: samples_tx,
            notes: notes_tx,
        };
        let mut tasks = vec![tokio::spawn(driver.run()), tokio::spawn(read_control(transport.clone(), shared.clone()))];
        if let Some(interval) = options.report_interval {
            tasks.push(tokio::spawn(report(transport.clone(), clock.clone(), shared.clone(), interval)));
        }
        Ok(Self {
            transport,
            clock,
            shared,
            welcome,
            synced,
            frames,
            samples,
            events: tokio::sync::Mutex::new(events),
            notes: tokio::sync::Mutex::new(notes),
            tasks,
        })
    }

    /// The welcome the server sent.
    pub fn welcome(&self) -> &Welcome {
        &self.welcome
    }

    /// This session's member id.
    pub fn member_id(&self) -> u64 {
        self.welcome.member_id
    }

    /// The local clock.
    pub fn clock(&self) -> &Arc<dyn LocalClock> {
        &self.clock
    }

    /// Waits until the clock is synced well enough to schedule by.
    pub async fn wait_synced(&self, timeout: Duration) -> Result<(), ClientError> {
        wait_until(&self.synced, timeout, "clock sync", |s| *s).await
    }

    /// Waits until at least `count` clock-sync replies have been taken as samples in all (see
    /// [`Client::samples`]): about one a second once the clock settled, whatever the room does.
    pub async fn wait_samples(&self, count: u64, timeout: Duration) -> Result<(), ClientError> {
        wait_until(&self.samples, timeout, "clock samples", |n| *n >= count).await
    }

    /// Clock-sync replies taken as samples so far.
    pub fn samples(&self) -> u64 {
        lock(&self.shared).session.client().clock().counts().0
    }

    /// Waits until at least `count` beat frames have arrived in all (a room sends one every
    /// 100 ms for a while after a change or a note, else one every 10 s by default).
    pub async fn wait_frames(&self, count: u64, timeout: Duration) -> Result<(), ClientError> {
        wait_until(&self.frames, timeout, "beat frames", |n| *n >= count).await
    }

    /// The clock estimate now.
    pub fn estimate(&self) -> Option<Estimate> {
        lock(&self.shared).session.client().estimate(self.clock.now())
    }

    /// The server clock now, as estimated.
    pub fn server_now(&self) -> Option<ServerNanos> {
        lock(&self.shared).session.client().server_time(self.clock.now())
    }

    /// The server clock at local time `local`, as estimated.
    pub fn server_time_at(&self, local: ClientNanos) -> Option<ServerNanos> {
        lock(&self.shared).session.client().server_time(local)
    }

    /// The newest timeline.
    pub fn timeline(&self) -> Option<Timeline> {
        lock(&self.shared).session.client().timeline().cloned()
    }

    /// The local instant at which beat `beat` sounds.
    pub fn local_time_of_beat(&self, beat: i64) -> Option<ClientNanos> {
        lock(&self.shared).session.client().local_time_of_beat(beat)
    }

    /// Where the room went, once the server said it moved to another server of its cluster
    /// (the session then ends with `moved`): connect there with the same token to take the
    /// same seat back.
    pub fn moved_to(&self) -> Option<downbeat_protocol::Moved> {
        lock(&self.shared).session.moved_to().cloned()
    }

    /// Counters of what arrived on datagrams.
    pub fn stats(&self) -> downbeat_engine::client::Stats {
        lock(&self.shared).session.client().stats()
    }

    /// The room's members as this client was last told (the welcome's snapshot, then every
    /// join, leave and update).
    pub fn presence(&self) -> Vec<Member> {
        lock(&self.shared).session.members().cloned().collect()
    }

    /// Sends a request and waits for the session to hand back the server's answer to it.
    async fn request(&self, request: Request) -> Result<Answer, ClientError> {
        let (tx, rx) = oneshot::channel();
        let (request_id, frame) =
            lock(&self.shared).session.request(request, tx).map_err(|(e, _waiter)| request_error(e))?;
        if let Err(e) = self.transport.send_control(&frame).await {
            lock(&self.shared).session.cancel(request_id);
            return Err(e);
        }
        rx.await.map_err(|_| ClientError::Closed)?.map_err(request_error)
    }

    /// Sends a teacher control and waits for the acknowledgement (or the refusal).
    pub async fn control(&self, op: ControlOp) -> Result<ControlAck, ClientError> {
        match self.request(Request::Control(op)).await? {
            Answer::Control(ack) => Ok(ack),
            other => Err(ClientError::Protocol(format!("expected an ack, got {other:?}"))),
        }
    }

    /// Asks for a timeline change (a teacher control) and waits for the acknowledgement.
    pub async fn change(&self, change: Change) -> Result<ControlAck, ClientError> {
        self.control(ControlOp::Timeline(change)).await
    }

    /// The room's current reflection prompt.
    pub fn prompt(&self) -> Option<Prompt> {
        lock(&self.shared).session.prompt().cloned()
    }

    /// The recording running in the room, if any (everyone is told).
    pub fn recording(&self) -> Option<RecordingInfo> {
        lock(&self.shared).session.recording()
    }

    /// The recording playing back in the room, if any.
    pub fn playback(&self) -> Option<PlaybackInfo> {
        lock(&self.shared).session.playback()
    }

    /// Teachers: asks the room a reflection question (blank text clears it).
    pub async fn set_prompt(&self, text: &str) -> Result<ControlAck, ClientError> {
        self.control(ControlOp::Prompt { text: PromptText::new(text.to_owned())? }).await
    }

    /// Students: sends a reflection answering prompt `prompt_id` and waits until the server
    /// has committed it. `id` identifies the reflection across retries: send the same id
    /// again (on this or a new session) until this returns `Ok`, and it is stored once.
    ///
    /// This waits for the acknowledgement without a deadline (the database may be slow, and
    /// an acknowledgement can be lost if the room closes first): wrap it in a timeout and
    /// retry with the same id.
    pub async fn reflect(
        &self,
        id: [u8; 16],
        prompt_id: u32,
        mood: Option<u8>,
        text: Option<&str>,
    ) -> Result<(), ClientError> {
        let text = text.map(|t| ReflectionText::new(t.to_owned())).transpose()?;
        match self.request(Request::Reflect { id, prompt_id, mood, text }).await? {
            Answer::ReflectionSaved => Ok(()),
            other => Err(ClientError::Protocol(format!("expected a reflection acknowledgement, got {other:?}"))),
        }
    }

    /// Presents a fresh token; returns its expiry (Unix seconds) once the server took it.
    pub async fn refresh_token(&self, token: &str) -> Result<u64, ClientError> {
        let token = BoundedString::new(token.to_owned())?;
        match self.request(Request::RefreshToken(token)).await? {
            Answer::TokenRefreshed { expires_at } => Ok(expires_at),
            other => Err(ClientError::Protocol(format!("expected a refresh answer, got {other:?}"))),
        }
    }

    /// Plays a note now: stamps it with the synced clock and sends it (with the last notes
    /// again, for redundancy). Fails before the clock is estimated.
    ///
    /// Refuses a note out of range (MIDI number or instrument above 127, velocity 0 or above
    /// 127) with [`ErrorCode::NoteOutOfRange`] without sending it, so it is never repeated
    /// with the next notes.
    pub fn play_note(&self, midi: u8, velocity: u8, instrument: u8) -> Result<Note, ClientError> {
        let played = lock(&self.shared).session.play_note(self.clock.now(), midi, velocity, instrument);
        let (note, datagram) = played.map_err(|e| match e {
            NoteError::NotSynced => ClientError::Timeout("clock sync"),
            other => ClientError::Refused { code: ErrorCode::NoteOutOfRange, message: other.to_string() },
        })?;
        self.transport.send_datagram(&datagram)?;
        Ok(note)
    }

    /// The next classmate's note, placed on the local clock at its playout instant; `None`
    /// once the session is closed. Late notes are counted in [`Client::stats`], never yielded.
    pub async fn next_note(&self) -> Option<ScheduledNote> {
        self.notes.lock().await.recv().await
    }

    /// Sends raw bytes on the control stream (for tests of the server's input handling).
    pub async fn send_raw_control(&self, bytes: &[u8]) -> Result<(), ClientError> {
        self.transport.send_control(bytes).await
    }

    /// Sends a raw datagram (for tests of the server's input handling).
    pub fn send_raw_datagram(&self, bytes: &[u8]) -> Result<(), ClientError> {
        self.transport.send_datagram(bytes)
    }

    /// The next event, or `None` once the session is closed.
    pub async fn next_event(&self) -> Option<Event> {
        self.events.lock().await.recv().await
    }

    /// Waits until the session is closed by either side; returns the close reason (when the
    /// server ended it: its message and error number, `(code N)`).
    pub async fn closed(&self) -> String {
        let why = self.transport.closed().await;
        match &lock(&self.shared).ended_by_server {
            Some((code, message)) => format!("the server ended the session: {message} (code {})", code.as_u16()),
            None => why,
        }
    }

    /// Closes the session.
    pub fn close(&self) {
        self.transport.close(0, b"bye");
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        self.close();
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// Waits until what `rx` watches satisfies `done`, for at most `timeout` (then
/// [`ClientError::Timeout`] naming `what`); [`ClientError::Closed`] once the session ended.
async fn wait_until<T>(
    rx: &watch::Receiver<T>,
    timeout: Duration,
    what: &'static str,
    done: impl FnMut(&T) -> bool,
) -> Result<(), ClientError> {
    let mut rx = rx.clone();
    tokio::time::timeout(timeout, rx.wait_for(done))
        .await
        .map_err(|_| ClientError::Timeout(what))?
        .map_err(|_| ClientError::Closed)?;
    Ok(())
}

/// Clock sync, beat frames and classmates' notes: the only loop that receives datagrams.
struct Driver {
    transport: Arc<dyn Transport>,
    clock: Arc<dyn LocalClock>,
    shared: Arc<Mutex<Shared>>,
    synced: watch::Sender<bool>,
    frames: watch::Sender<u64>,
    samples: watch::Sender<u64>,
    notes: mpsc::Sender<ScheduledNote>,
}

impl Driver {
    async fn run(self) {
        let Self { transport, clock, shared, synced, frames, samples, notes } = self;
        loop {
            let wake = {
                let mut s = lock(&shared);
                let now = clock.now();
                while let Some(bytes) = s.session.poll_datagram(now) {
                    // A full send buffer drops the request; the estimator simply asks again.
                    let _ = transport.send_datagram(&bytes);
                }
                if let Some(now_synced) = s.session.poll_synced(now) {
                    synced.send_replace(now_synced);
                }
                clock.instant_at(s.session.poll_timeout())
            };
            tokio::select! {
                received = transport.recv_datagram() => {
                    let Some(bytes) = received else { return };
                    // Stamp t3 before anything else.
                    let t3 = clock.now();
                    let mut s = lock(&shared);
                    match s.session.handle_datagram(t3, &bytes) {
                        Ok(_) => {
                            frames.send_replace(s.session.client().stats().frames);
                            samples.send_replace(s.session.client().clock().counts().0);
                            while let Some(note) = s.session.poll_note() {
                                // A consumer that does not read notes loses them, never the session.
                                let _ = notes.try_send(note);
                            }
                        }
                        Err(e) => tracing::debug!(error = %e, "dropped an undecodable datagram"),
                    }
                }
                () = tokio::time::sleep_until(wake.into()) => {}
            }
        }
    }
}

/// Reports sync quality and playout counts every `interval` while the session is live.
async fn report(
    transport: Arc<dyn Transport>,
    clock: Arc<dyn LocalClock>,
    shared: Arc<Mutex<Shared>>,
    interval: Duration,
) {
    let mut ticks = tokio::time::interval(interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        let frame = match lock(&shared).session.report(clock.now()) {
            session::ReportDue::Send(frame) => frame,
            session::ReportDue::Unchanged => continue,
            session::ReportDue::NotLive => return,
        };
        if transport.send_control(&frame).await.is_err() {
            return;
        }
    }
}

/// Feeds the control stream to the session and dispatches what it makes of it, until the
/// stream or the session ends.
async fn read_control(transport: Arc<dyn Transport>, shared: Arc<Mutex<Shared>>) {
    // What arrived with the welcome (the prompt, say) is already in the session.
    lock(&shared).dispatch();
    loop {
        let Some(bytes) = transport.recv_control().await else {
            tracing::debug!("control stream ended");
            let mut s = lock(&shared);
            s.session.handle_closed("the control stream ended");
            s.dispatch();
            return;
        };
        let mut s = lock(&shared);
        s.session.handle_control_bytes(&bytes);
        s.dispatch();
        if s.session.state() == State::Ended {
            // The server waits for this side to close once it has said why (see the README);
            // the close echoes its code.
            if let Some((code, message)) = &s.ended_by_server {
                transport.close(code.as_u16().into(), message.as_bytes());
            }
            return;
        }
    }
}
