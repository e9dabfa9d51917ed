//! A native Downbeat client over WebTransport (wtransport).
//!
//! [`Client::connect`] opens a session, sends the hello and waits for the welcome; from then on
//! a driver task runs clock sync on datagrams, applies every newer timeline, and answers "at
//! what instant of my local clock does beat n sound" ([`Client::local_time_of_beat`]). All the
//! timing logic is the engine's [`downbeat_engine::client::Client`]; this crate only moves
//! bytes and reads the [`LocalClock`], which tests replace with an [`InjectedClock`] of known
//! offset and drift.
//!
//! It also keeps the room's presence, plays notes ([`Client::play_note`]) and yields
//! classmates' notes placed on the local clock at their shared playout instant
//! ([`Client::next_note`]), sends the teacher's controls, refreshes its token, and reports its
//! sync quality every couple of seconds so the teacher sees who is in time.
//!
//! Used by the end-to-end tests and the benchmark harness; it is also a reference for other
//! native clients. It does not reconnect by itself: connecting again with the same token
//! within the server's grace period takes the same seat back.
#![cfg_attr(not(test), warn(clippy::unwrap_used))]

mod clock;

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use downbeat_engine::client::Client as State;
use downbeat_engine::clock::{Config as SyncConfig, Estimate};
use downbeat_engine::notes::ScheduledNote;
use downbeat_engine::timeline::Timeline;
use downbeat_protocol::{
    BoundedString, Change, ClientMessage, ClientNanos, ControlAck, ControlOp, ControlRequest, ErrorCode, ErrorFrame,
    FRAME_HEADER_LEN, Hello, JoinCode, LeaveReason, Member, Note, PROTOCOL_VERSION, ParticipationNotice, Prompt,
    PromptText, Reflection, ReflectionNotice, ReflectionText, RoomRequest, RoomSettings, ServerMessage, ServerNanos,
    Welcome, decode_frame_body, decode_server_datagram, encode_client_datagram, encode_frame, frame_body_len,
};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use wtransport::{ClientConfig, Connection, Endpoint, RecvStream, SendStream};

pub use clock::{InjectedClock, LocalClock, SystemClock};

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

/// How to connect.
#[derive(Clone, Debug)]
pub struct ConnectOptions {
    /// `https://host:port` of the server's WebTransport endpoint.
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
    /// Teachers only: a student's reflection was saved.
    Reflection(ReflectionNotice),
    /// Teachers only: participation so far of the members who played since the last update.
    Participation(Vec<ParticipationNotice>),
}

/// The room's current reflection prompt, as this client was told.
type CurrentPrompt = Arc<Mutex<Option<Prompt>>>;

/// Answers to requests on the control stream, by request id.
type Pending = Arc<Mutex<HashMap<u32, oneshot::Sender<Result<ServerMessage, ClientError>>>>>;

/// The room's members by id, as this client was told.
type Presence = Arc<Mutex<BTreeMap<u64, Member>>>;

/// A connected session. Dropping it closes the session.
pub struct Client {
    conn: Connection,
    clock: Arc<dyn LocalClock>,
    state: Arc<Mutex<State>>,
    welcome: Welcome,
    send: Arc<tokio::sync::Mutex<SendStream>>,
    pending: Pending,
    presence: Presence,
    prompt: CurrentPrompt,
    next_request: std::sync::atomic::AtomicU32,
    synced: watch::Receiver<bool>,
    frames: watch::Receiver<u64>,
    events: tokio::sync::Mutex<mpsc::Receiver<Event>>,
    notes: tokio::sync::Mutex<mpsc::Receiver<ScheduledNote>>,
    tasks: Vec<JoinHandle<()>>,
    _endpoint: Endpoint<wtransport::endpoint::endpoint_side::Client>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("member_id", &self.welcome.member_id)
            .field("room", &self.welcome.room)
            .finish_non_exhaustive()
    }
}

fn lock(state: &Mutex<State>) -> MutexGuard<'_, State> {
    // A panic while holding the lock cannot leave the engine state half-updated in a way that
    // matters more than losing the session, so take the data either way.
    state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Reads one server frame from a control stream: header, length check before allocating,
/// body, decode. [`ClientError::Closed`] if the stream ends first.
pub async fn read_message(recv: &mut RecvStream) -> Result<ServerMessage, ClientError> {
    let mut header = [0u8; FRAME_HEADER_LEN];
    recv.read_exact(&mut header).await.map_err(|_| ClientError::Closed)?;
    let len = frame_body_len(header).map_err(|e| ClientError::Protocol(e.to_string()))?;
    let mut body = vec![0u8; len];
    recv.read_exact(&mut body).await.map_err(|_| ClientError::Closed)?;
    decode_frame_body(&body).map_err(|e| ClientError::Protocol(e.to_string()))
}

fn refused(e: ErrorFrame) -> ClientError {
    ClientError::Refused { code: e.code, message: e.message.into_string() }
}

impl Client {
    /// Connects with the machine's clock.
    pub async fn connect(options: ConnectOptions) -> Result<Self, ClientError> {
        Self::connect_with_clock(options, Arc::new(SystemClock::new())).await
    }

    /// Connects, timestamping with `clock`.
    pub async fn connect_with_clock(options: ConnectOptions, clock: Arc<dyn LocalClock>) -> Result<Self, ClientError> {
        let bind = ClientConfig::builder();
        let builder = match options.bind_address {
            Some(ip) => bind.with_bind_address(std::net::SocketAddr::new(ip, 0)),
            None => bind.with_bind_default(),
        };
        let config = if options.cert_hashes.is_empty() {
            builder.with_native_certs().keep_alive_interval(Some(Duration::from_secs(3))).build()
        } else {
            builder
                .with_server_certificate_hashes(options.cert_hashes.iter().map(|h| (*h).into()))
                .keep_alive_interval(Some(Duration::from_secs(3)))
                .build()
        };
        let endpoint = Endpoint::client(config).map_err(ClientError::Endpoint)?;
        let handshake = async {
            let conn = endpoint.connect(&options.url).await.map_err(|e| ClientError::Connect(e.to_string()))?;
            let opening = conn.open_bi().await.map_err(|e| ClientError::Connect(e.to_string()))?;
            let (mut send, mut recv) = opening.await.map_err(|e| ClientError::Connect(e.to_string()))?;
            let hello = ClientMessage::Hello(Hello {
                version: PROTOCOL_VERSION,
                token: BoundedString::new(options.token.clone())?,
                room: options.room.clone(),
            });
            let bytes = encode_frame(&hello).map_err(|e| ClientError::Protocol(e.to_string()))?;
            send.write_all(&bytes).await.map_err(|_| ClientError::Closed)?;
            match read_message(&mut recv).await? {
                ServerMessage::Welcome(w) => Ok((conn, send, recv, w)),
                ServerMessage::Error(e) => Err(refused(e)),
                other => Err(ClientError::Protocol(format!("expected a welcome, got {other:?}"))),
            }
        };
        let (conn, send, recv, welcome) = tokio::time::timeout(options.handshake_timeout, handshake)
            .await
            .map_err(|_| ClientError::Timeout("the welcome"))??;

        let mut state = State::new(options.sync.clone());
        state.handle_welcome(&welcome);
        let state = Arc::new(Mutex::new(state));
        let pending: Pending = Arc::default();
        let presence: Presence = Arc::new(Mutex::new(welcome.members.iter().map(|m| (m.id, m.clone())).collect()));
        let prompt = CurrentPrompt::default();
        let send = Arc::new(tokio::sync::Mutex::new(send));
        let (synced_tx, synced) = watch::channel(false);
        let (frames_tx, frames) = watch::channel(0u64);
        let (events_tx, events) = mpsc::channel(4096);
        let (notes_tx, notes) = mpsc::channel(4096);
        let driver = Driver {
            conn: conn.clone(),
            clock: clock.clone(),
            state: state.clone(),
            synced: synced_tx,
            frames: frames_tx,
            notes: notes_tx,
        };
        let mut tasks = vec![
            tokio::spawn(driver.run()),
            tokio::spawn(read_control(
                recv,
                state.clone(),
                pending.clone(),
                presence.clone(),
                prompt.clone(),
                events_tx,
            )),
        ];
        if let Some(interval) = options.report_interval {
            tasks.push(tokio::spawn(report(send.clone(), clock.clone(), state.clone(), interval)));
        }
        Ok(Self {
            conn,
            clock,
            state,
            welcome,
            send,
            pending,
            presence,
            prompt,
            next_request: std::sync::atomic::AtomicU32::new(1),
            synced,
            frames,
            events: tokio::sync::Mutex::new(events),
            notes: tokio::sync::Mutex::new(notes),
            tasks,
            _endpoint: endpoint,
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
        let mut rx = self.synced.clone();
        tokio::time::timeout(timeout, rx.wait_for(|s| *s))
            .await
            .map_err(|_| ClientError::Timeout("clock sync"))?
            .map_err(|_| ClientError::Closed)?;
        Ok(())
    }

    /// Waits until at least `count` beat frames have arrived in all.
    pub async fn wait_frames(&self, count: u64, timeout: Duration) -> Result<(), ClientError> {
        let mut rx = self.frames.clone();
        tokio::time::timeout(timeout, rx.wait_for(|n| *n >= count))
            .await
            .map_err(|_| ClientError::Timeout("beat frames"))?
            .map_err(|_| ClientError::Closed)?;
        Ok(())
    }

    /// The clock estimate now.
    pub fn estimate(&self) -> Option<Estimate> {
        lock(&self.state).estimate(self.clock.now())
    }

    /// The server clock now, as estimated.
    pub fn server_now(&self) -> Option<ServerNanos> {
        lock(&self.state).server_time(self.clock.now())
    }

    /// The server clock at local time `local`, as estimated.
    pub fn server_time_at(&self, local: ClientNanos) -> Option<ServerNanos> {
        lock(&self.state).server_time(local)
    }

    /// The newest timeline.
    pub fn timeline(&self) -> Option<Timeline> {
        lock(&self.state).timeline().cloned()
    }

    /// The local instant at which beat `beat` sounds.
    pub fn local_time_of_beat(&self, beat: i64) -> Option<ClientNanos> {
        lock(&self.state).local_time_of_beat(beat)
    }

    /// Counters of what arrived on datagrams.
    pub fn stats(&self) -> downbeat_engine::client::Stats {
        lock(&self.state).stats()
    }

    /// The room's members as this client was last told (the welcome's snapshot, then every
    /// join, leave and update).
    pub fn presence(&self) -> Vec<Member> {
        self.presence.lock().unwrap_or_else(std::sync::PoisonError::into_inner).values().cloned().collect()
    }

    /// Sends a request and waits for the server's answer to it.
    async fn request(&self, message: impl FnOnce(u32) -> ClientMessage) -> Result<ServerMessage, ClientError> {
        let request_id = self.next_request.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        self.pending.lock().unwrap_or_else(std::sync::PoisonError::into_inner).insert(request_id, tx);
        let frame = encode_frame(&message(request_id)).map_err(|e| ClientError::Protocol(e.to_string()))?;
        self.send.lock().await.write_all(&frame).await.map_err(|_| ClientError::Closed)?;
        rx.await.map_err(|_| ClientError::Closed)?
    }

    /// Sends a teacher control and waits for the acknowledgement (or the refusal).
    pub async fn control(&self, op: ControlOp) -> Result<ControlAck, ClientError> {
        match self.request(|request_id| ClientMessage::Control(ControlRequest { request_id, op })).await? {
            ServerMessage::ControlAck(ack) => Ok(ack),
            other => Err(ClientError::Protocol(format!("expected an ack, got {other:?}"))),
        }
    }

    /// Asks for a timeline change (a teacher control) and waits for the acknowledgement.
    pub async fn change(&self, change: Change) -> Result<ControlAck, ClientError> {
        self.control(ControlOp::Timeline(change)).await
    }

    /// The room's current reflection prompt.
    pub fn prompt(&self) -> Option<Prompt> {
        self.prompt.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
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
        let message = |request_id| ClientMessage::Reflect(Reflection { request_id, id, prompt_id, mood, text });
        match self.request(message).await? {
            ServerMessage::ReflectionSaved { id: saved, .. } if saved == id => Ok(()),
            other => Err(ClientError::Protocol(format!("expected a reflection acknowledgement, got {other:?}"))),
        }
    }

    /// Presents a fresh token; returns its expiry (Unix seconds) once the server took it.
    pub async fn refresh_token(&self, token: &str) -> Result<u64, ClientError> {
        let token = BoundedString::new(token.to_owned())?;
        match self.request(|request_id| ClientMessage::RefreshToken { request_id, token }).await? {
            ServerMessage::TokenRefreshed { expires_at, .. } => Ok(expires_at),
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
        if !downbeat_engine::notes::playable(midi, velocity, instrument) {
            return Err(ClientError::Refused {
                code: ErrorCode::NoteOutOfRange,
                message: format!("note {midi}, velocity {velocity}, instrument {instrument} is out of MIDI range"),
            });
        }
        let (note, datagram) = lock(&self.state)
            .play_note(self.clock.now(), midi, velocity, instrument)
            .ok_or(ClientError::Timeout("clock sync"))?;
        let bytes = encode_client_datagram(&datagram).map_err(|e| ClientError::Protocol(e.to_string()))?;
        self.conn.send_datagram(bytes).map_err(|e| ClientError::Protocol(e.to_string()))?;
        Ok(note)
    }

    /// The next classmate's note, placed on the local clock at its playout instant; `None`
    /// once the session is closed. Late notes are counted in [`Client::stats`], never yielded.
    pub async fn next_note(&self) -> Option<ScheduledNote> {
        self.notes.lock().await.recv().await
    }

    /// Sends raw bytes on the control stream (for tests of the server's input handling).
    pub async fn send_raw_control(&self, bytes: &[u8]) -> Result<(), ClientError> {
        self.send.lock().await.write_all(bytes).await.map_err(|_| ClientError::Closed)
    }

    /// Sends a raw datagram (for tests of the server's input handling).
    pub fn send_raw_datagram(&self, bytes: &[u8]) -> Result<(), ClientError> {
        self.conn.send_datagram(bytes).map_err(|e| ClientError::Protocol(e.to_string()))
    }

    /// The next event, or `None` once the session is closed.
    pub async fn next_event(&self) -> Option<Event> {
        self.events.lock().await.recv().await
    }

    /// Waits until the session is closed by either side; returns the close reason.
    pub async fn closed(&self) -> String {
        self.conn.closed().await.to_string()
    }

    /// Closes the session.
    pub fn close(&self) {
        self.conn.close(0u32.into(), b"bye");
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

/// Clock sync, beat frames and classmates' notes: the only loop that receives datagrams.
struct Driver {
    conn: Connection,
    clock: Arc<dyn LocalClock>,
    state: Arc<Mutex<State>>,
    synced: watch::Sender<bool>,
    frames: watch::Sender<u64>,
    notes: mpsc::Sender<ScheduledNote>,
}

impl Driver {
    async fn run(self) {
        let Self { conn, clock, state, synced, frames, notes } = self;
        loop {
            let wake = {
                let mut s = lock(&state);
                let now = clock.now();
                while let Some(d) = s.poll_datagram(now) {
                    if let Ok(bytes) = encode_client_datagram(&d) {
                        // A full send buffer drops the request; the estimator simply asks again.
                        let _ = conn.send_datagram(bytes);
                    }
                }
                synced.send_if_modified(|v| {
                    let now_synced = s.is_synced(now);
                    std::mem::replace(v, now_synced) != now_synced
                });
                clock.instant_at(s.poll_timeout())
            };
            tokio::select! {
                received = conn.receive_datagram() => {
                    let Ok(datagram) = received else { return };
                    // Stamp t3 before anything else.
                    let t3 = clock.now();
                    match decode_server_datagram(&datagram.payload()) {
                        Ok(d) => {
                            let mut s = lock(&state);
                            s.handle_datagram(t3, &d);
                            frames.send_replace(s.stats().frames);
                            while let Some(note) = s.poll_note() {
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

/// Reports sync quality and playout counts every `interval`.
async fn report(
    send: Arc<tokio::sync::Mutex<SendStream>>,
    clock: Arc<dyn LocalClock>,
    state: Arc<Mutex<State>>,
    interval: Duration,
) {
    let mut ticks = tokio::time::interval(interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        let report = lock(&state).report(clock.now());
        let Ok(frame) = encode_frame(&ClientMessage::Report(report)) else { return };
        if send.lock().await.write_all(&frame).await.is_err() {
            return;
        }
    }
}

/// Reads the control stream: timelines, answers, errors and presence.
async fn read_control(
    mut recv: RecvStream,
    state: Arc<Mutex<State>>,
    pending: Pending,
    presence: Presence,
    prompt: CurrentPrompt,
    events: mpsc::Sender<Event>,
) {
    let take = |id: u32| pending.lock().unwrap_or_else(std::sync::PoisonError::into_inner).remove(&id);
    let members = || presence.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    loop {
        let message = match read_message(&mut recv).await {
            Ok(m) => m,
            Err(e) => {
                tracing::debug!(error = %e, "control stream ended");
                break;
            }
        };
        let event = match message {
            ServerMessage::Timeline(t) => {
                let epoch = t.epoch;
                lock(&state).handle_timeline(&t);
                Some(Event::Timeline(epoch))
            }
            ServerMessage::ControlAck(ack) => {
                if let Some(tx) = take(ack.request_id) {
                    let _ = tx.send(Ok(ServerMessage::ControlAck(ack)));
                }
                None
            }
            ServerMessage::TokenRefreshed { request_id, expires_at } => {
                if let Some(tx) = take(request_id) {
                    let _ = tx.send(Ok(ServerMessage::TokenRefreshed { request_id, expires_at }));
                }
                None
            }
            ServerMessage::Error(e) => match e.request_id.and_then(take) {
                Some(tx) => {
                    let _ = tx.send(Err(refused(e)));
                    None
                }
                None => Some(Event::Error(e.code, e.message.into_string())),
            },
            ServerMessage::MemberJoined(m) => {
                members().insert(m.id, m.clone());
                Some(Event::MemberJoined(m))
            }
            ServerMessage::MemberUpdated(m) => {
                members().insert(m.id, m.clone());
                Some(Event::MemberUpdated(m))
            }
            ServerMessage::MemberLeft { member_id, reason } => {
                members().remove(&member_id);
                lock(&state).forget_sender(member_id);
                Some(Event::MemberLeft(member_id, reason))
            }
            ServerMessage::RoomClosed { message } => Some(Event::RoomClosed(message.into_string())),
            ServerMessage::Welcome(_) => None,
            ServerMessage::Prompt(p) => {
                p.clone_into(&mut prompt.lock().unwrap_or_else(std::sync::PoisonError::into_inner));
                Some(Event::Prompt(p))
            }
            ServerMessage::ReflectionSaved { request_id, id } => {
                if let Some(tx) = take(request_id) {
                    let _ = tx.send(Ok(ServerMessage::ReflectionSaved { request_id, id }));
                }
                None
            }
            ServerMessage::Reflection(notice) => Some(Event::Reflection(notice)),
            ServerMessage::Participation(notices) => Some(Event::Participation(notices.into_vec())),
        };
        if let Some(event) = event {
            // A consumer that does not read events loses them, never the session.
            let _ = events.try_send(event);
        }
    }
    // Fail whatever is still waiting.
    pending.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clear();
}
