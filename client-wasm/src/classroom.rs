//! The classroom: one session at a time, its loops, reconnection, and the API pages call.

use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, HashMap};
use std::rc::Rc;

use downbeat_engine::client::{Client as Engine, Handled};
use downbeat_engine::clock::Config as SyncConfig;
use downbeat_engine::timeline::tempo_from_bpm_f64;
use downbeat_protocol::{
    Assignment, BoundedString, BoundedVec, Change, ClientMessage, ControlAck, ControlOp, ControlRequest, ErrorCode,
    Hello, JoinCode, MAX_MOOD, Member, PROTOCOL_VERSION, Prompt, Reflection, RoomRequest, RoomSettings, ServerMessage,
    ServerNanos, Welcome,
};
use futures_channel::oneshot;
use futures_util::future::{Either, select};
use js_sys::{Function, Promise};
use serde::Deserialize;
use wasm_bindgen::prelude::*;
use wasm_bindgen_futures::{future_to_promise, spawn_local};

use crate::js::{self, CONNECT_FAILED, Failure, INVALID_ARGUMENT, NOT_SYNCED, TIMEOUT};
use crate::transport::{self, ControlReader, Reader, Readers, Session};
use crate::view::{self, to_js};

/// How long to wait for the server's welcome.
const HANDSHAKE_TIMEOUT_MS: f64 = 10_000.0;
/// How often sync quality and playout counts are reported to the teacher.
const REPORT_INTERVAL_MS: f64 = 2_000.0;
/// Longest sleep of the sync loop, so a changed schedule is picked up soon.
const MAX_SYNC_SLEEP_MS: f64 = 250.0;
/// First reconnect delay, doubled per failed attempt up to [`MAX_BACKOFF_MS`], with jitter.
const FIRST_BACKOFF_MS: f64 = 250.0;
const MAX_BACKOFF_MS: f64 = 10_000.0;
/// Tries of a reflection refused with `store_unavailable` (the server's queue was full).
const REFLECT_TRIES: u32 = 6;

/// Codes after which reconnecting cannot help: the classroom closes.
const FINAL_CODES: [ErrorCode; 9] = [
    ErrorCode::RoomNotFound,
    ErrorCode::RoomClosed,
    ErrorCode::Removed,
    ErrorCode::SessionReplaced,
    ErrorCode::Unauthorized,
    ErrorCode::TokenExpired,
    ErrorCode::WrongTenant,
    ErrorCode::UnsupportedVersion,
    ErrorCode::BadRequest,
];

fn is_final(code: &str) -> bool {
    FINAL_CODES.iter().any(|c| c.as_str() == code)
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct ConnectOptions {
    url: String,
    #[serde(default)]
    certificate_hashes: Vec<String>,
    token: String,
    #[serde(default)]
    code: Option<String>,
    #[serde(default)]
    create: Option<CreateOptions>,
    #[serde(default)]
    reconnect: Option<bool>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct CreateOptions {
    name: String,
    #[serde(default)]
    tempo_bpm: Option<f64>,
    #[serde(default)]
    beats_per_bar: Option<f64>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct ReflectionInput {
    prompt_id: f64,
    #[serde(default)]
    mood: Option<f64>,
    #[serde(default)]
    text: Option<String>,
}

fn invalid(message: impl Into<String>) -> Failure {
    Failure::new(INVALID_ARGUMENT, message)
}

/// A whole number in `0..=max` from a JS number.
fn whole(value: f64, max: u64, what: &str) -> Result<u64, Failure> {
    if value.is_finite() && value >= 0.0 && value.fract() == 0.0 && value <= max as f64 {
        Ok(value as u64)
    } else {
        Err(invalid(format!("{what} must be a whole number from 0 to {max}, not {value}")))
    }
}

fn member_id(value: f64) -> Result<u64, Failure> {
    whole(value, (1u64 << 53) - 1, "a member id")
}

fn room_settings(create: &CreateOptions) -> Result<RoomSettings, Failure> {
    let name = BoundedString::new(create.name.trim().to_owned()).map_err(|e| invalid(format!("room name: {e}")))?;
    let tempo =
        tempo_from_bpm_f64(create.tempo_bpm.unwrap_or(120.0)).map_err(|e| Failure::server(e.code(), e.to_string()))?;
    let meter = create.beats_per_bar.unwrap_or(4.0);
    let beats_per_bar = u8::try_from(whole(meter, 16, "beatsPerBar")?)
        .ok()
        .filter(|m| (1..=16).contains(m))
        .ok_or_else(|| Failure::server(ErrorCode::MeterOutOfRange, format!("{meter} beats per bar is outside 1-16")))?;
    Ok(RoomSettings { name, tempo, beats_per_bar })
}

/// Where the classroom stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Status {
    Connected,
    Reconnecting,
    Closed,
}

impl Status {
    fn as_str(self) -> &'static str {
        match self {
            Self::Connected => "connected",
            Self::Reconnecting => "reconnecting",
            Self::Closed => "closed",
        }
    }
}

type Answer = Result<ServerMessage, Failure>;

/// Everything a classroom's loops and methods share. Borrows of the `RefCell`s never span an
/// `await` or a listener call.
struct Inner {
    url: String,
    hashes: Vec<[u8; 32]>,
    token: RefCell<String>,
    reconnect: bool,
    engine: RefCell<Engine>,
    welcome: RefCell<Welcome>,
    session: RefCell<Option<Rc<Session>>>,
    /// Bumped whenever a session starts or ends; loops of an older one stop.
    generation: Cell<u64>,
    members: RefCell<BTreeMap<u64, Member>>,
    prompt: RefCell<Option<Prompt>>,
    pending: RefCell<HashMap<u32, oneshot::Sender<Answer>>>,
    next_request: Cell<u32>,
    listeners: RefCell<Vec<(String, Function)>>,
    status: Cell<Status>,
    synced: Cell<bool>,
    /// Woken when a reconnect succeeds or the classroom closes.
    waiters: RefCell<Vec<oneshot::Sender<()>>>,
    /// Why the server is ending the current session, if it said so first.
    ending: RefCell<Option<Failure>>,
}

/// Opens a session and joins (or, for a teacher with `create`, creates) a room.
///
/// Resolves once the server has welcomed this page; rejects with a `DownbeatError` whose
/// `code` says why (`connect_failed`, `timeout`, or the server's: `room_not_found`,
/// `unauthorized`, `token_expired`, `room_full`, ...).
#[wasm_bindgen]
pub async fn connect(
    #[wasm_bindgen(unchecked_param_type = "ConnectOptions")] options: JsValue,
) -> Result<Classroom, JsValue> {
    let options: ConnectOptions =
        serde_wasm_bindgen::from_value(options).map_err(|e| invalid(format!("connect options: {e}")))?;
    let hashes = options
        .certificate_hashes
        .iter()
        .map(|h| js::parse_hash(h).ok_or_else(|| invalid(format!("{h:?} is not a hex SHA-256 hash"))))
        .collect::<Result<Vec<_>, _>>()?;
    let room = match (&options.code, &options.create) {
        (Some(code), None) => {
            let code = code.trim().to_uppercase();
            RoomRequest::Join(JoinCode::new(code).map_err(|e| invalid(format!("join code: {e}")))?)
        }
        (None, Some(create)) => RoomRequest::Create(room_settings(create)?),
        _ => return Err(invalid("give exactly one of `code` (join a room) and `create` (create one)").into()),
    };
    let (session, readers, welcome) = handshake(&options.url, &hashes, &options.token, room).await?;
    let mut engine = Engine::new(SyncConfig::default());
    engine.handle_welcome(&welcome);
    let inner = Rc::new(Inner {
        url: options.url,
        hashes,
        token: RefCell::new(options.token),
        reconnect: options.reconnect.unwrap_or(true),
        engine: RefCell::new(engine),
        members: RefCell::new(welcome.members.iter().map(|m| (m.id, m.clone())).collect()),
        welcome: RefCell::new(welcome),
        session: RefCell::new(None),
        generation: Cell::new(0),
        prompt: RefCell::new(None),
        pending: RefCell::new(HashMap::new()),
        next_request: Cell::new(1),
        listeners: RefCell::new(Vec::new()),
        status: Cell::new(Status::Connected),
        synced: Cell::new(false),
        waiters: RefCell::new(Vec::new()),
        ending: RefCell::new(None),
    });
    run_session(&inner, session, readers);
    Ok(Classroom { inner })
}

/// Opens a session, says hello, and waits for the welcome.
async fn handshake(
    url: &str,
    hashes: &[[u8; 32]],
    token: &str,
    room: RoomRequest,
) -> Result<(Session, Readers, Welcome), Failure> {
    let token = BoundedString::new(token.to_owned()).map_err(|e| invalid(format!("token: {e}")))?;
    let work = async {
        let (session, mut readers) = transport::open(url, hashes).await?;
        session.send(&ClientMessage::Hello(Hello { version: PROTOCOL_VERSION, token, room })).await?;
        let answer = readers.control.next().await;
        let welcome = match answer {
            Ok(Some(ServerMessage::Welcome(w))) => Ok(w),
            Ok(Some(ServerMessage::Error(e))) => Err(Failure::server(e.code, e.message.into_string())),
            Ok(Some(other)) => Err(Failure::protocol(format!("expected a welcome, got {other:?}"))),
            Ok(None) => Err(Failure::new(CONNECT_FAILED, "the server ended the session before welcoming it")),
            Err(e) => Err(e),
        };
        match welcome {
            Ok(w) => Ok((session, readers, w)),
            Err(e) => {
                session.close();
                Err(e)
            }
        }
    };
    match select(Box::pin(work), Box::pin(js::sleep(HANDSHAKE_TIMEOUT_MS))).await {
        Either::Left((result, _)) => result,
        Either::Right(((), _)) => Err(Failure::new(TIMEOUT, "timed out waiting for the server's welcome")),
    }
}

/// Starts the loops of a freshly welcomed session.
fn run_session(inner: &Rc<Inner>, session: Session, readers: Readers) {
    let generation = inner.generation.get() + 1;
    inner.generation.set(generation);
    let session = Rc::new(session);
    *inner.session.borrow_mut() = Some(session.clone());
    inner.ending.borrow_mut().take();
    spawn_local(datagram_loop(inner.clone(), generation, readers.datagrams));
    spawn_local(sync_loop(inner.clone(), generation, session.clone()));
    spawn_local(report_loop(inner.clone(), generation, session.clone()));
    spawn_local(control_loop(inner.clone(), generation, readers.control));
    let inner = inner.clone();
    spawn_local(async move {
        let _ = js::settle(session.closed()).await;
        lost(&inner, generation, "the connection closed");
    });
}

impl Inner {
    fn current(&self, generation: u64) -> bool {
        self.generation.get() == generation && self.status.get() == Status::Connected
    }

    fn emit(&self, event: &str, detail: &JsValue) {
        let listeners: Vec<Function> =
            self.listeners.borrow().iter().filter(|(name, _)| name == event).map(|(_, f)| f.clone()).collect();
        for listener in listeners {
            if let Err(e) = listener.call1(&JsValue::NULL, detail) {
                js::warn(&format!("downbeat: a '{event}' listener threw"), &e);
            }
        }
    }

    fn emit_members(&self) {
        let detail = {
            let members = self.members.borrow();
            to_js(&members.values().map(view::MemberView::from).collect::<Vec<_>>())
        };
        self.emit("members", &detail);
    }

    fn emit_timeline(&self) {
        let detail = {
            let engine = self.engine.borrow();
            to_js(&view::timeline(&engine, engine.server_time(js::local_now())))
        };
        self.emit("timeline", &detail);
    }

    /// Emits `sync` when `synced` flipped.
    fn check_synced(&self) {
        let (changed, detail) = {
            let engine = self.engine.borrow();
            let now = js::local_now();
            let synced = engine.is_synced(now);
            (self.synced.replace(synced) != synced, to_js(&view::sync(&engine, now)))
        };
        if changed {
            self.emit("sync", &detail);
        }
    }

    fn wake_waiters(&self) {
        for waiter in self.waiters.borrow_mut().drain(..) {
            let _ = waiter.send(());
        }
    }

    /// Ends the classroom for good.
    fn finish(&self, reason: &str, code: Option<&str>) {
        if self.status.replace(Status::Closed) == Status::Closed {
            return;
        }
        self.generation.set(self.generation.get() + 1);
        if let Some(session) = self.session.borrow_mut().take() {
            session.close();
        }
        self.pending.borrow_mut().clear();
        self.wake_waiters();
        self.emit("closed", &to_js(&view::Closed { reason, code }));
    }

    /// Waits until the classroom is connected again (at once if it is); `false` once closed.
    async fn connected(&self) -> bool {
        loop {
            match self.status.get() {
                Status::Connected => return true,
                Status::Closed => return false,
                Status::Reconnecting => {
                    let (tx, rx) = oneshot::channel();
                    self.waiters.borrow_mut().push(tx);
                    let _ = rx.await;
                }
            }
        }
    }

    /// Sends a request on the control stream and waits for the server's answer to it.
    async fn request(&self, message: impl FnOnce(u32) -> ClientMessage) -> Answer {
        let session = self.session.borrow().clone().ok_or_else(Failure::closed)?;
        let request_id = self.next_request.get();
        self.next_request.set(request_id.wrapping_add(1).max(1));
        let (tx, rx) = oneshot::channel();
        self.pending.borrow_mut().insert(request_id, tx);
        if let Err(e) = session.send(&message(request_id)).await {
            self.pending.borrow_mut().remove(&request_id);
            return Err(e);
        }
        // A session that ends drops the sender: the request fails as `closed`.
        rx.await.unwrap_or_else(|_| Err(Failure::closed()))
    }

    async fn control(&self, op: ControlOp) -> Result<ControlAck, Failure> {
        match self.request(|request_id| ClientMessage::Control(ControlRequest { request_id, op })).await? {
            ServerMessage::ControlAck(ack) => Ok(ack),
            other => Err(Failure::protocol(format!("expected an acknowledgement, got {other:?}"))),
        }
    }

    fn answer(&self, request_id: u32, answer: Answer) {
        if let Some(tx) = self.pending.borrow_mut().remove(&request_id) {
            let _ = tx.send(answer);
        }
    }
}

/// The session of `generation` ended: reconnect, or close for good.
fn lost(inner: &Rc<Inner>, generation: u64, reason: &str) {
    if !inner.current(generation) {
        return;
    }
    inner.generation.set(generation + 1);
    if let Some(session) = inner.session.borrow_mut().take() {
        session.close();
    }
    inner.pending.borrow_mut().clear();
    let ending = inner.ending.borrow_mut().take();
    match ending {
        Some(f) if is_final(&f.code) => inner.finish(&f.message, Some(&f.code)),
        Some(f) if !inner.reconnect => inner.finish(&f.message, Some(&f.code)),
        _ if !inner.reconnect => inner.finish(reason, None),
        ending => {
            inner.status.set(Status::Reconnecting);
            let reason = ending.map_or_else(|| reason.to_owned(), |f| f.message);
            spawn_local(reconnect(inner.clone(), reason));
        }
    }
}

/// Reconnects with exponential backoff and full jitter until it succeeds, a final refusal
/// comes, or the page closes the classroom.
async fn reconnect(inner: Rc<Inner>, mut reason: String) {
    let code = inner.welcome.borrow().room.code.clone();
    for attempt in 1u32.. {
        let ceiling = (FIRST_BACKOFF_MS * 2f64.powi(attempt.min(16) as i32 - 1)).min(MAX_BACKOFF_MS);
        let delay = ceiling * (0.5 + js_sys::Math::random() / 2.0);
        inner.emit("reconnecting", &to_js(&view::Reconnecting { attempt, delay_ms: delay, reason: &reason }));
        js::sleep(delay).await;
        if inner.status.get() != Status::Reconnecting {
            return;
        }
        let token = inner.token.borrow().clone();
        match handshake(&inner.url, &inner.hashes, &token, RoomRequest::Join(code.clone())).await {
            Ok((session, readers, welcome)) => {
                if inner.status.get() != Status::Reconnecting {
                    session.close();
                    return;
                }
                // A new session: sync from scratch, notes numbered from 1 again.
                let mut engine = Engine::new(SyncConfig::default());
                engine.handle_welcome(&welcome);
                *inner.engine.borrow_mut() = engine;
                *inner.members.borrow_mut() = welcome.members.iter().map(|m| (m.id, m.clone())).collect();
                let member_id = welcome.member_id;
                *inner.welcome.borrow_mut() = welcome;
                inner.synced.set(false);
                inner.status.set(Status::Connected);
                run_session(&inner, session, readers);
                inner.wake_waiters();
                inner.emit("reconnected", &to_js(&view::Reconnected { member_id }));
                inner.emit_members();
                inner.emit_timeline();
                return;
            }
            Err(f) if is_final(&f.code) => {
                inner.finish(&f.message, Some(&f.code));
                return;
            }
            Err(f) => reason = f.message,
        }
    }
}

/// Beat frames, sync replies and classmates' notes.
async fn datagram_loop(inner: Rc<Inner>, generation: u64, reader: Reader) {
    while let Some(bytes) = reader.next().await {
        // Stamp t3 before anything else.
        let t3 = js::local_now();
        if !inner.current(generation) {
            return;
        }
        let datagram = match downbeat_protocol::decode_server_datagram(&bytes) {
            Ok(d) => d,
            Err(e) => {
                js::warn("downbeat: dropped an undecodable datagram", &JsValue::from_str(&e.to_string()));
                continue;
            }
        };
        let (handled, notes) = {
            let mut engine = inner.engine.borrow_mut();
            let handled = engine.handle_datagram(t3, &datagram);
            let notes: Vec<JsValue> =
                std::iter::from_fn(|| engine.poll_note()).map(|n| to_js(&view::NoteView::from(&n))).collect();
            (handled, notes)
        };
        if handled == Handled::NewTimeline {
            inner.emit_timeline();
        }
        for note in &notes {
            inner.emit("note", note);
        }
        inner.check_synced();
    }
}

/// Sends clock-sync requests when the estimator asks for them.
async fn sync_loop(inner: Rc<Inner>, generation: u64, session: Rc<Session>) {
    while inner.current(generation) {
        let wait_ms = {
            let mut engine = inner.engine.borrow_mut();
            let now = js::local_now();
            while let Some(datagram) = engine.poll_datagram(now) {
                session.send_datagram(&datagram);
            }
            js::nanos_to_ms(engine.poll_timeout().0.saturating_sub(now.0))
        };
        inner.check_synced();
        js::sleep(wait_ms.clamp(1.0, MAX_SYNC_SLEEP_MS)).await;
    }
}

/// Tells the server (and so the teacher) how well this page is synced.
async fn report_loop(inner: Rc<Inner>, generation: u64, session: Rc<Session>) {
    loop {
        js::sleep(REPORT_INTERVAL_MS).await;
        if !inner.current(generation) {
            return;
        }
        let report = inner.engine.borrow().report(js::local_now());
        if session.send(&ClientMessage::Report(report)).await.is_err() {
            return;
        }
    }
}

/// Timelines, answers, presence, prompts and the teachers' SEL feed.
async fn control_loop(inner: Rc<Inner>, generation: u64, mut reader: ControlReader) {
    let reason = loop {
        let message = match reader.next().await {
            Ok(Some(m)) => m,
            Ok(None) => break "the server ended the session".to_owned(),
            Err(e) => break e.message,
        };
        if !inner.current(generation) {
            return;
        }
        handle_control(&inner, message);
    };
    lost(&inner, generation, &reason);
}

fn handle_control(inner: &Inner, message: ServerMessage) {
    match message {
        ServerMessage::Timeline(t) => {
            let handled = inner.engine.borrow_mut().handle_timeline(&t);
            if handled == Handled::NewTimeline {
                inner.emit_timeline();
            }
        }
        ServerMessage::ControlAck(ack) => inner.answer(ack.request_id, Ok(ServerMessage::ControlAck(ack))),
        ServerMessage::TokenRefreshed { request_id, expires_at } => {
            inner.answer(request_id, Ok(ServerMessage::TokenRefreshed { request_id, expires_at }));
        }
        ServerMessage::ReflectionSaved { request_id, id } => {
            inner.answer(request_id, Ok(ServerMessage::ReflectionSaved { request_id, id }));
        }
        ServerMessage::Error(e) => {
            let failure = Failure::server(e.code, e.message.into_string());
            match e.request_id {
                Some(request_id) => inner.answer(request_id, Err(failure)),
                None => {
                    let detail = to_js(&view::ErrorView { code: &failure.code, message: &failure.message });
                    *inner.ending.borrow_mut() = Some(failure);
                    inner.emit("error", &detail);
                }
            }
        }
        ServerMessage::MemberJoined(m) => {
            let detail = to_js(&view::MemberView::from(&m));
            inner.members.borrow_mut().insert(m.id, m);
            inner.emit("member-joined", &detail);
            inner.emit_members();
        }
        ServerMessage::MemberUpdated(m) => {
            let detail = to_js(&view::MemberView::from(&m));
            inner.members.borrow_mut().insert(m.id, m);
            inner.emit("member-updated", &detail);
            inner.emit_members();
        }
        ServerMessage::MemberLeft { member_id, reason } => {
            inner.members.borrow_mut().remove(&member_id);
            inner.engine.borrow_mut().forget_sender(member_id);
            inner.emit("member-left", &to_js(&view::Left { id: member_id, reason: view::leave_reason(reason) }));
            inner.emit_members();
        }
        ServerMessage::RoomClosed { message } => {
            *inner.ending.borrow_mut() = Some(Failure::server(ErrorCode::RoomClosed, message.into_string()));
        }
        ServerMessage::Prompt(p) => {
            let detail = to_js(&view::prompt(p.as_ref()));
            *inner.prompt.borrow_mut() = p;
            inner.emit("prompt", &detail);
        }
        ServerMessage::Reflection(notice) => inner.emit("reflection", &to_js(&view::ReflectionView::from(&notice))),
        ServerMessage::Participation(notices) => {
            let detail: Vec<_> = notices.iter().map(view::ParticipationView::from).collect();
            inner.emit("participation", &to_js(&detail));
        }
        ServerMessage::Welcome(_) => {}
    }
}

/// A room this page takes part in. See the crate docs; created by [`connect`].
#[wasm_bindgen]
pub struct Classroom {
    inner: Rc<Inner>,
}

impl std::fmt::Debug for Classroom {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Classroom").field("member_id", &self.inner.welcome.borrow().member_id).finish_non_exhaustive()
    }
}

/// A promise of `work`, resolving to what `done` makes of its value.
fn promise<T: 'static>(
    work: impl std::future::Future<Output = Result<T, Failure>> + 'static,
    done: impl FnOnce(T) -> JsValue + 'static,
) -> Promise {
    future_to_promise(async move { work.await.map(done).map_err(Failure::into_js) })
}

#[wasm_bindgen]
impl Classroom {
    /// This page's member id in the room.
    #[wasm_bindgen(getter, js_name = memberId)]
    pub fn member_id(&self) -> f64 {
        self.inner.welcome.borrow().member_id as f64
    }

    /// `"teacher"` or `"student"`, from the token.
    #[wasm_bindgen(getter, unchecked_return_type = "\"teacher\" | \"student\"")]
    pub fn role(&self) -> String {
        view::role(self.inner.welcome.borrow().role).to_owned()
    }

    /// The room's join code (show it to the class).
    #[wasm_bindgen(getter)]
    pub fn code(&self) -> String {
        self.inner.welcome.borrow().room.code.as_str().to_owned()
    }

    /// The room's name.
    #[wasm_bindgen(getter, js_name = roomName)]
    pub fn room_name(&self) -> String {
        self.inner.welcome.borrow().room.name.as_str().to_owned()
    }

    /// How long after a note is played everyone sounds it (ms).
    #[wasm_bindgen(getter, js_name = playoutDelayMs)]
    pub fn playout_delay_ms(&self) -> f64 {
        js::nanos_to_ms(self.inner.welcome.borrow().room.playout_delay_nanos)
    }

    /// `"connected"`, `"reconnecting"` or `"closed"`.
    #[wasm_bindgen(getter, unchecked_return_type = "\"connected\" | \"reconnecting\" | \"closed\"")]
    pub fn state(&self) -> String {
        self.inner.status.get().as_str().to_owned()
    }

    /// The server's clock now (ms), as estimated; `undefined` before the first sync sample.
    #[wasm_bindgen(js_name = serverNow)]
    pub fn server_now(&self) -> Option<f64> {
        self.inner.engine.borrow().server_time(js::local_now()).map(|t| js::nanos_to_ms(t.0))
    }

    /// Whether the clock is synced well enough to schedule by.
    pub fn synced(&self) -> bool {
        self.inner.engine.borrow().is_synced(js::local_now())
    }

    /// The server time (ms) at `performance.now()` time `localMs`.
    #[wasm_bindgen(js_name = serverTimeOf)]
    pub fn server_time_of(&self, #[wasm_bindgen(js_name = localMs)] local_ms: f64) -> Option<f64> {
        self.inner.engine.borrow().server_time(js::ms_to_local(local_ms)).map(|t| js::nanos_to_ms(t.0))
    }

    /// The `performance.now()` time (ms) at which the server clock reads `serverMs`.
    #[wasm_bindgen(js_name = localTimeOf)]
    pub fn local_time_of(&self, #[wasm_bindgen(js_name = serverMs)] server_ms: f64) -> Option<f64> {
        let at = ServerNanos(js::ms_to_nanos(server_ms));
        self.inner.engine.borrow().local_time_of(at).map(|t| js::nanos_to_ms(t.0))
    }

    /// The `AudioContext` time to pass to `start()` so that a sound is heard at server time
    /// `serverMs`. Uses `getOutputTimestamp()` (which already includes the output latency)
    /// once the context is running, else `currentTime` minus `outputLatency`/`baseLatency`.
    /// `undefined` before the clock is estimated.
    #[wasm_bindgen(js_name = audioTimeOf)]
    pub fn audio_time_of(
        &self,
        #[wasm_bindgen(unchecked_param_type = "BaseAudioContext")] context: &JsValue,
        #[wasm_bindgen(js_name = serverMs)] server_ms: f64,
    ) -> Option<f64> {
        let local = self.local_time_of(server_ms)?;
        let stamp = js_sys::Reflect::get(context, &"getOutputTimestamp".into())
            .ok()
            .and_then(|f| f.dyn_into::<Function>().ok())
            .and_then(|f| f.call0(context).ok());
        if let Some(stamp) = stamp {
            let context_time = js::number_field(&stamp, "contextTime");
            let performance_time = js::number_field(&stamp, "performanceTime");
            if let (Some(c), Some(p)) = (context_time, performance_time)
                && c > 0.0
                && p > 0.0
            {
                return Some(c + (local - p) / 1000.0);
            }
        }
        let current = js::number_field(context, "currentTime")?;
        let latency = js::number_field(context, "outputLatency")
            .filter(|l| *l > 0.0)
            .or_else(|| js::number_field(context, "baseLatency"))
            .unwrap_or(0.0);
        Some(current + (local - js::now_ms()) / 1000.0 - latency)
    }

    /// The beats sounding from now until `horizonMs` from now, placed on both clocks: what a
    /// Web Audio lookahead scheduler should queue (each once, by `index`).
    #[wasm_bindgen(js_name = beatsAhead, unchecked_return_type = "Beat[]")]
    pub fn beats_ahead(&self, #[wasm_bindgen(js_name = horizonMs)] horizon_ms: f64) -> JsValue {
        let engine = self.inner.engine.borrow();
        let beats = engine.schedule(js::local_now(), js::ms_to_nanos(horizon_ms.max(0.0)));
        to_js(&beats.iter().map(view::BeatView::from).collect::<Vec<_>>())
    }

    /// The timeline in force now (and a decided change still to come).
    #[wasm_bindgen(unchecked_return_type = "TimelineInfo | undefined")]
    pub fn timeline(&self) -> JsValue {
        let engine = self.inner.engine.borrow();
        to_js(&view::timeline(&engine, engine.server_time(js::local_now())))
    }

    /// This page's clock sync.
    #[wasm_bindgen(unchecked_return_type = "SyncInfo")]
    pub fn sync(&self) -> JsValue {
        to_js(&view::sync(&self.inner.engine.borrow(), js::local_now()))
    }

    /// The room's members (this page included), as last told.
    #[wasm_bindgen(unchecked_return_type = "Member[]")]
    pub fn members(&self) -> JsValue {
        to_js(&self.inner.members.borrow().values().map(view::MemberView::from).collect::<Vec<_>>())
    }

    /// The teacher's current reflection question, or `null`.
    #[wasm_bindgen(unchecked_return_type = "Prompt | null")]
    pub fn prompt(&self) -> JsValue {
        to_js(&view::prompt(self.inner.prompt.borrow().as_ref()))
    }

    /// Plays a note now: stamps it on the shared clock and sends it to the room (repeating
    /// the last notes, so one lost datagram loses nothing). Sound it yourself at
    /// `audioTimeOf(ctx, playAt)`, when everyone else does. Throws `note_out_of_range`,
    /// `not_synced` (before the first sync sample) or `closed`.
    #[wasm_bindgen(js_name = playNote, unchecked_return_type = "PlayedNote")]
    pub fn play_note(&self, midi: f64, velocity: Option<f64>, instrument: Option<f64>) -> Result<JsValue, JsValue> {
        let (velocity, instrument) = (velocity.unwrap_or(100.0), instrument.unwrap_or(0.0));
        let byte = |v: f64| whole(v, 255, "").ok().and_then(|v| u8::try_from(v).ok());
        let (midi, velocity, instrument) = match (byte(midi), byte(velocity), byte(instrument)) {
            (Some(m), Some(v), Some(i)) if downbeat_engine::notes::playable(m, v, i) => (m, v, i),
            _ => {
                let message = format!("note {midi}, velocity {velocity}, instrument {instrument} is out of MIDI range");
                return Err(Failure::server(ErrorCode::NoteOutOfRange, message).into());
            }
        };
        let session = self.inner.session.borrow().clone().ok_or_else(Failure::closed)?;
        let mut engine = self.inner.engine.borrow_mut();
        let (note, datagram) = engine
            .play_note(js::local_now(), midi, velocity, instrument)
            .ok_or_else(|| Failure::new(NOT_SYNCED, "the clock is not synced yet"))?;
        session.send_datagram(&datagram);
        Ok(to_js(&view::played(&note, engine.playout_delay_nanos())))
    }

    /// Teachers: starts the beat at the next bar, after `countInBars` bars of count-in
    /// (default 1).
    #[wasm_bindgen(unchecked_return_type = "Promise<Applied>")]
    pub fn start(&self, #[wasm_bindgen(js_name = countInBars)] count_in_bars: Option<f64>) -> Promise {
        match whole(count_in_bars.unwrap_or(1.0), 8, "countInBars") {
            Ok(bars) => self.change(Change::Start { count_in_bars: bars as u8 }),
            Err(e) => Promise::reject(&e.into_js()),
        }
    }

    /// Teachers: stops the beat at the next bar.
    #[wasm_bindgen(unchecked_return_type = "Promise<Applied>")]
    pub fn stop(&self) -> Promise {
        self.change(Change::Stop)
    }

    /// Teachers: changes the tempo (20-300 BPM) at the next bar.
    #[wasm_bindgen(js_name = setTempo, unchecked_return_type = "Promise<Applied>")]
    pub fn set_tempo(&self, bpm: f64) -> Promise {
        match tempo_from_bpm_f64(bpm) {
            Ok(tempo) => self.change(Change::SetTempo(tempo)),
            Err(e) => Promise::reject(&Failure::server(e.code(), e.to_string()).into_js()),
        }
    }

    /// Teachers: changes the beats per bar (1-16) at the next bar.
    #[wasm_bindgen(js_name = setMeter, unchecked_return_type = "Promise<Applied>")]
    pub fn set_meter(&self, #[wasm_bindgen(js_name = beatsPerBar)] beats_per_bar: f64) -> Promise {
        match u8::try_from(whole(beats_per_bar, 255, "beatsPerBar").unwrap_or(0)) {
            Ok(meter) if (1..=16).contains(&meter) => self.change(Change::SetMeter(meter)),
            _ => Promise::reject(
                &Failure::server(ErrorCode::MeterOutOfRange, format!("{beats_per_bar} beats per bar is outside 1-16"))
                    .into_js(),
            ),
        }
    }

    fn change(&self, change: Change) -> Promise {
        let inner = self.inner.clone();
        promise(async move { inner.control(ControlOp::Timeline(change)).await }, |ack| match ack.applied {
            Some(applied) => to_js(&view::AppliedView::from(applied)),
            None => JsValue::NULL,
        })
    }

    fn op(&self, op: Result<ControlOp, Failure>) -> Promise {
        let inner = self.inner.clone();
        promise(async move { inner.control(op?).await }, |_| JsValue::UNDEFINED)
    }

    /// Teachers: mutes or unmutes a student (a muted student's notes reach nobody).
    #[wasm_bindgen(unchecked_return_type = "Promise<void>")]
    pub fn mute(&self, member: f64, muted: bool) -> Promise {
        self.op(member_id(member).map(|member| ControlOp::Mute { member, muted }))
    }

    /// Teachers: assigns a part (or `null`) and positions in the bar (0 for the downbeat).
    #[wasm_bindgen(unchecked_return_type = "Promise<void>")]
    pub fn assign(&self, member: f64, part: Option<String>, beats: Vec<f64>) -> Promise {
        let op = (|| {
            let member = member_id(member)?;
            let beats = beats
                .into_iter()
                .map(|b| whole(b, 15, "a beat of the bar").map(|b| b as u8))
                .collect::<Result<Vec<_>, _>>()?;
            let part = part
                .filter(|p| !p.trim().is_empty())
                .map(|p| BoundedString::new(p.trim().to_owned()))
                .transpose()
                .map_err(|e| invalid(format!("part: {e}")))?;
            let beats = BoundedVec::try_from_vec(beats).map_err(|e| invalid(format!("beats: {e}")))?;
            Ok(ControlOp::Assign { member, assignment: Assignment { part, beats } })
        })();
        self.op(op)
    }

    /// Teachers: removes a member from the room.
    #[wasm_bindgen(unchecked_return_type = "Promise<void>")]
    pub fn remove(&self, member: f64) -> Promise {
        self.op(member_id(member).map(|member| ControlOp::Remove { member }))
    }

    /// Teachers: closes the room for everyone.
    #[wasm_bindgen(js_name = closeRoom, unchecked_return_type = "Promise<void>")]
    pub fn close_room(&self) -> Promise {
        self.op(Ok(ControlOp::Close))
    }

    /// Teachers: asks the room a reflection question (an empty text clears it).
    #[wasm_bindgen(js_name = setPrompt, unchecked_return_type = "Promise<void>")]
    pub fn set_prompt(&self, text: String) -> Promise {
        self.op(BoundedString::new(text.trim().to_owned())
            .map(|text| ControlOp::Prompt { text })
            .map_err(|e| invalid(format!("prompt: {e}"))))
    }

    /// Students: answers the reflection prompt `promptId` with a mood (0-4) and/or words.
    /// Resolves with the reflection's id (hex) once the server has stored it. The same id is
    /// sent again across reconnects (and after `store_unavailable`), so it is stored once.
    #[wasm_bindgen(js_name = submitReflection, unchecked_return_type = "Promise<string>")]
    pub fn submit_reflection(
        &self,
        #[wasm_bindgen(unchecked_param_type = "{ promptId: number; mood?: number; text?: string }")] input: JsValue,
    ) -> Promise {
        let inner = self.inner.clone();
        promise(
            async move {
                let input: ReflectionInput =
                    serde_wasm_bindgen::from_value(input).map_err(|e| invalid(format!("reflection: {e}")))?;
                let prompt_id = u32::try_from(whole(input.prompt_id, u64::from(u32::MAX), "promptId")?)
                    .map_err(|e| invalid(e.to_string()))?;
                let mood = input.mood.map(|m| whole(m, u64::from(MAX_MOOD), "mood").map(|m| m as u8)).transpose()?;
                let text = input
                    .text
                    .filter(|t| !t.trim().is_empty())
                    .map(|t| BoundedString::new(t.trim().to_owned()))
                    .transpose()
                    .map_err(|e| invalid(format!("reflection text: {e}")))?;
                let id: [u8; 16] = js::random_bytes();
                let mut refusals = 0;
                loop {
                    if !inner.connected().await {
                        return Err(Failure::closed());
                    }
                    let text = text.clone();
                    let message =
                        |request_id| ClientMessage::Reflect(Reflection { request_id, id, prompt_id, mood, text });
                    match inner.request(message).await {
                        Ok(ServerMessage::ReflectionSaved { id: saved, .. }) if saved == id => return Ok(js::hex(&id)),
                        Ok(other) => {
                            return Err(Failure::protocol(format!("expected a reflection answer, got {other:?}")));
                        }
                        Err(f) if f.code == js::CLOSED => {}
                        Err(f) if f.code == ErrorCode::StoreUnavailable.as_str() && refusals + 1 < REFLECT_TRIES => {
                            refusals += 1;
                            js::sleep(FIRST_BACKOFF_MS * 2f64.powi(refusals as i32)).await;
                        }
                        Err(f) => return Err(f),
                    }
                }
            },
            |id| JsValue::from_str(&id),
        )
    }

    /// Presents a fresh token (before the current one expires); resolves with its expiry
    /// (Unix seconds). Reconnects use it from then on.
    #[wasm_bindgen(js_name = refreshToken, unchecked_return_type = "Promise<number>")]
    pub fn refresh_token(&self, token: String) -> Promise {
        let inner = self.inner.clone();
        promise(
            async move {
                let bounded = BoundedString::new(token.clone()).map_err(|e| invalid(format!("token: {e}")))?;
                match inner.request(|request_id| ClientMessage::RefreshToken { request_id, token: bounded }).await? {
                    ServerMessage::TokenRefreshed { expires_at, .. } => {
                        *inner.token.borrow_mut() = token;
                        Ok(expires_at)
                    }
                    other => Err(Failure::protocol(format!("expected a refresh answer, got {other:?}"))),
                }
            },
            |expires_at| JsValue::from_f64(expires_at as f64),
        )
    }

    /// Listens to an event (see `ClassroomEvents` for names and details).
    #[wasm_bindgen(skip_typescript)]
    pub fn on(&self, event: String, listener: Function) {
        self.inner.listeners.borrow_mut().push((event, listener));
    }

    /// Stops listening.
    #[wasm_bindgen(skip_typescript)]
    pub fn off(&self, event: &str, listener: &Function) {
        self.inner.listeners.borrow_mut().retain(|(name, f)| !(name == event && f == listener));
    }

    /// Leaves the room and closes the session; no reconnects. Emits `closed`.
    pub fn close(&self) {
        self.inner.finish("closed by the page", None);
    }
}

impl Drop for Classroom {
    fn drop(&mut self) {
        // `free()` from JS: nobody can listen any more, so end the session too.
        self.inner.finish("closed by the page", None);
    }
}
