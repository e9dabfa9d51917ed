//! The classroom: one session at a time, its loops, reconnection, and the API pages call.

use std::cell::{Cell, RefCell};
use std::rc::Rc;

use downbeat_engine::client::Handled;
use downbeat_engine::session::{self, Answer, End, NoteError, Request, RequestError, Session};
use downbeat_engine::timeline::{
    MAX_BEATS_PER_BAR, MAX_COUNT_IN_BARS, MIN_BEATS_PER_BAR, check_meter, tempo_from_bpm_f64,
};
use downbeat_protocol::{
    Assignment, BoundedString, BoundedVec, Change, ControlAck, ControlOp, ErrorCode, JoinCode, MAX_MOOD, RoomRequest,
    RoomSettings, ServerNanos, Welcome,
};
use futures_channel::oneshot;
use js_sys::{Function, Promise};
use serde::Deserialize;
use wasm_bindgen::prelude::*;
use wasm_bindgen_futures::{future_to_promise, spawn_local};

use crate::js::{self, Failure, INVALID_ARGUMENT, NOT_SYNCED};
use crate::race::{self, Choice, Route};
use crate::transport::{Endpoints, Kind, Transport};
use crate::view::{self, to_js};

/// How often sync quality and playout counts are reported to the teacher.
const REPORT_INTERVAL_MS: f64 = 2_000.0;
/// Longest sleep of the sync loop, so a changed schedule is picked up soon.
const MAX_SYNC_SLEEP_MS: f64 = 250.0;
/// First reconnect delay, doubled per failed attempt up to [`MAX_BACKOFF_MS`], with jitter.
const FIRST_BACKOFF_MS: f64 = 250.0;
const MAX_BACKOFF_MS: f64 = 10_000.0;
/// Tries of a reflection refused with `store_unavailable` (the server's queue was full).
const REFLECT_TRIES: u32 = 6;

/// Whether reconnecting cannot help after `code` (the engine's [`session::FINAL_CODES`]).
fn is_final(code: &str) -> bool {
    session::FINAL_CODES.iter().any(|c| c.as_str() == code)
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct ConnectOptions {
    #[serde(default)]
    url: Option<String>,
    #[serde(default)]
    certificate_hashes: Vec<String>,
    #[serde(default)]
    web_socket_url: Option<String>,
    #[serde(default)]
    transport: Option<String>,
    #[serde(default)]
    transport_head_start_ms: Option<f64>,
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

pub(crate) fn invalid(message: impl Into<String>) -> Failure {
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

/// `meter` beats per bar is outside the engine's range.
fn meter_out_of_range(meter: f64) -> Failure {
    let message = format!("{meter} beats per bar is outside {MIN_BEATS_PER_BAR}-{MAX_BEATS_PER_BAR}");
    Failure::server(ErrorCode::MeterOutOfRange, message)
}

/// The server's WebSocket URL when the page gave none: `/api/ws` on the page's own host
/// (`wss:` from an HTTPS page, `ws:` from an HTTP one).
fn page_websocket_url() -> Option<String> {
    let (protocol, host) = js::page_location()?;
    let scheme = match protocol.as_str() {
        "https:" => "wss:",
        "http:" => "ws:",
        _ => return None,
    };
    Some(format!("{scheme}//{host}/api/ws"))
}

/// Where the server is on each transport, from a page's `url`, `certificateHashes` and
/// `webSocketUrl` (default: [`page_websocket_url`]).
pub(crate) fn endpoints(
    url: Option<&str>,
    certificate_hashes: &[String],
    web_socket_url: Option<&str>,
) -> Result<Endpoints, Failure> {
    let hashes = certificate_hashes
        .iter()
        .map(|h| js::parse_hash(h).ok_or_else(|| invalid(format!("{h:?} is not a hex SHA-256 hash"))))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Endpoints {
        webtransport: url.map(|url| (url.to_owned(), hashes)),
        websocket: web_socket_url.map(str::to_owned).or_else(page_websocket_url),
    })
}

/// Where the server is and which transports to try, from the page's options.
fn route(options: &ConnectOptions) -> Result<Route, Failure> {
    let Endpoints { webtransport, websocket } =
        endpoints(options.url.as_deref(), &options.certificate_hashes, options.web_socket_url.as_deref())?;
    let choice = match options.transport.as_deref().unwrap_or("auto") {
        // Racing needs both; with one URL only, that transport is the only choice.
        "auto" if webtransport.is_some() && websocket.is_some() => Choice::Auto,
        "auto" if websocket.is_some() => Choice::Only(Kind::WebSocket),
        "auto" | "webtransport" => Choice::Only(Kind::WebTransport),
        "websocket" => Choice::Only(Kind::WebSocket),
        other => {
            return Err(invalid(format!("transport {other:?} is not \"auto\", \"webtransport\" or \"websocket\"")));
        }
    };
    if choice == Choice::Only(Kind::WebTransport) && webtransport.is_none() {
        return Err(invalid("connect options: `url` (the WebTransport URL) is missing"));
    }
    if choice == Choice::Only(Kind::WebSocket) && websocket.is_none() {
        return Err(invalid(
            "connect options: no `webSocketUrl`, and this page has no http(s) address to derive it from",
        ));
    }
    let head_start_ms = options.transport_head_start_ms.unwrap_or(race::DEFAULT_HEAD_START_MS);
    if !(head_start_ms.is_finite() && head_start_ms >= 0.0) {
        return Err(invalid(format!("transportHeadStartMs must be a number of milliseconds, not {head_start_ms}")));
    }
    let endpoints = Endpoints { webtransport, websocket };
    Ok(Route { home: endpoints.clone(), endpoints, choice, head_start_ms })
}

fn room_settings(create: &CreateOptions) -> Result<RoomSettings, Failure> {
    let name = BoundedString::new(create.name.trim().to_owned()).map_err(|e| invalid(format!("room name: {e}")))?;
    let tempo =
        tempo_from_bpm_f64(create.tempo_bpm.unwrap_or(120.0)).map_err(|e| Failure::server(e.code(), e.to_string()))?;
    let meter = create.beats_per_bar.unwrap_or(4.0);
    let beats_per_bar = u8::try_from(whole(meter, u64::from(MAX_BEATS_PER_BAR), "beatsPerBar")?)
        .ok()
        .and_then(|m| check_meter(m).ok())
        .ok_or_else(|| meter_out_of_range(meter))?;
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

/// What a request's promise waits on; the session hands it back with the answer.
type Waiter = oneshot::Sender<Result<Answer, RequestError>>;

/// Everything a classroom's loops and methods share. Borrows of the `RefCell`s never span an
/// `await` or a listener call.
struct Inner {
    /// Where the server is (pointed elsewhere when the room moved).
    route: RefCell<Route>,
    token: RefCell<String>,
    reconnect: bool,
    /// The current session's engine (the last one's, once it ended, until a reconnect).
    session: RefCell<Session<Waiter>>,
    /// The welcome of the current (or last) session.
    welcome: RefCell<Welcome>,
    /// The current session's transport; `None` once it ended.
    transport: RefCell<Option<Rc<dyn Transport>>>,
    /// Which transport the current (or last) session is on.
    kind: Cell<Kind>,
    /// Whether WebTransport is being retried in the background.
    retrying: Cell<bool>,
    /// Bumped whenever a session starts or ends; loops of an older one stop.
    generation: Cell<u64>,
    listeners: RefCell<Vec<(String, Function)>>,
    status: Cell<Status>,
    /// Woken when a reconnect succeeds or the classroom closes.
    waiters: RefCell<Vec<oneshot::Sender<()>>>,
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
    let mut route = route(&options)?;
    let room = match (&options.code, &options.create) {
        (Some(code), None) => {
            let code = code.trim().to_uppercase();
            RoomRequest::Join(JoinCode::new(code).map_err(|e| invalid(format!("join code: {e}")))?)
        }
        (None, Some(create)) => RoomRequest::Create(room_settings(create)?),
        _ => return Err(invalid("give exactly one of `code` (join a room) and `create` (create one)").into()),
    };
    let greeted = race::establish(&mut route, &bounded_token(&options.token)?, &room).await?;
    let inner = Rc::new(Inner {
        route: RefCell::new(route),
        token: RefCell::new(options.token),
        reconnect: options.reconnect.unwrap_or(true),
        session: RefCell::new(greeted.session),
        welcome: RefCell::new(greeted.welcome),
        transport: RefCell::new(None),
        kind: Cell::new(greeted.kind),
        retrying: Cell::new(false),
        generation: Cell::new(0),
        listeners: RefCell::new(Vec::new()),
        status: Cell::new(Status::Connected),
        waiters: RefCell::new(Vec::new()),
    });
    run_session(&inner, greeted.transport);
    Ok(Classroom { inner })
}

fn bounded_token(token: &str) -> Result<downbeat_protocol::Token, Failure> {
    BoundedString::new(token.to_owned()).map_err(|e| invalid(format!("token: {e}")))
}

/// Starts the loops of a freshly welcomed session.
fn run_session(inner: &Rc<Inner>, transport: Rc<dyn Transport>) {
    let generation = inner.generation.get() + 1;
    inner.generation.set(generation);
    *inner.transport.borrow_mut() = Some(transport.clone());
    spawn_local(datagram_loop(inner.clone(), generation, transport.clone()));
    spawn_local(sync_loop(inner.clone(), generation, transport.clone()));
    spawn_local(report_loop(inner.clone(), generation, transport.clone()));
    spawn_local(control_loop(inner.clone(), generation, transport.clone()));
    let closed = transport.closed();
    spawn_local({
        let inner = inner.clone();
        async move {
            let (code, reason) = closed.await;
            closed_with(&inner, generation, code, &reason);
        }
    });
    retry_webtransport(inner);
}

/// On WebSocket in `auto` mode: retries WebTransport in the background (see [`race`]), once
/// per classroom at a time.
fn retry_webtransport(inner: &Rc<Inner>) {
    if inner.route.borrow().choice != Choice::Auto
        || inner.kind.get() != Kind::WebSocket
        || inner.retrying.replace(true)
    {
        return;
    }
    let weak = Rc::downgrade(inner);
    let route = inner.route.borrow().clone();
    spawn_local(async move {
        let wanted = || {
            weak.upgrade()
                .is_some_and(|inner| inner.status.get() != Status::Closed && inner.kind.get() == Kind::WebSocket)
        };
        race::retry_webtransport(route, wanted).await;
        if let Some(inner) = weak.upgrade() {
            inner.retrying.set(false);
        }
    });
}

fn request_failure(e: RequestError) -> Failure {
    match e {
        RequestError::Refused { code, message } => Failure::server(code, message),
        RequestError::Closed => Failure::closed(),
        RequestError::Protocol(message) => Failure::protocol(message),
        other => Failure::protocol(other),
    }
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
        let detail = to_js(&self.session.borrow().members().map(view::MemberView::from).collect::<Vec<_>>());
        self.emit("members", &detail);
    }

    fn emit_timeline(&self) {
        let detail = {
            let session = self.session.borrow();
            let engine = session.client();
            to_js(&view::timeline(engine, engine.server_time(js::local_now())))
        };
        self.emit("timeline", &detail);
    }

    /// Emits `sync` when `synced` flipped.
    fn check_synced(&self) {
        let now = js::local_now();
        let detail = {
            let mut session = self.session.borrow_mut();
            session.poll_synced(now).map(|_| to_js(&view::sync(session.client(), now)))
        };
        if let Some(detail) = detail {
            self.emit("sync", &detail);
        }
    }

    fn wake_waiters(&self) {
        for waiter in self.waiters.borrow_mut().drain(..) {
            let _ = waiter.send(());
        }
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

    /// Sends a request on the control stream and waits for the session to hand back the
    /// server's answer to it.
    async fn request(&self, request: Request) -> Result<Answer, Failure> {
        let transport = self.transport.borrow().clone().ok_or_else(Failure::closed)?;
        let generation = self.generation.get();
        let (tx, rx) = oneshot::channel();
        let sent = self.session.borrow_mut().request(request, tx);
        let (request_id, frame) = sent.map_err(|(e, _waiter)| request_failure(e))?;
        if let Err(e) = transport.send_control(&frame).await {
            // A session that ended meanwhile already failed the request; a newer one must
            // not lose a request of its own with the same id.
            if self.generation.get() == generation {
                self.session.borrow_mut().cancel(request_id);
            }
            return Err(e);
        }
        // A session that ends fails the request as `closed`.
        rx.await.unwrap_or(Err(RequestError::Closed)).map_err(request_failure)
    }

    async fn control(&self, op: ControlOp) -> Result<ControlAck, Failure> {
        match self.request(Request::Control(op)).await? {
            Answer::Control(ack) => Ok(ack),
            other => Err(Failure::protocol(format!("expected an acknowledgement, got {other:?}"))),
        }
    }
}

/// Ends the classroom for good: closes the session (its requests fail as `closed`) and emits
/// `closed`.
fn finish(inner: &Rc<Inner>, reason: &str, code: Option<&str>) {
    if inner.status.replace(Status::Closed) == Status::Closed {
        return;
    }
    inner.generation.set(inner.generation.get() + 1);
    if let Some(transport) = inner.transport.borrow_mut().take() {
        transport.close(0, "");
    }
    inner.session.borrow_mut().close();
    dispatch(inner);
    inner.wake_waiters();
    inner.emit("closed", &to_js(&view::Closed { reason, code }));
}

/// The transport of the session of `generation` ended: the session ends with what the server
/// last said, or `reason`.
fn lost(inner: &Rc<Inner>, generation: u64, reason: &str) {
    if !inner.current(generation) {
        return;
    }
    inner.session.borrow_mut().handle_closed(reason);
    dispatch(inner);
}

/// The current session ended: reconnect, or close for good.
fn ended(inner: &Rc<Inner>, end: End) {
    if inner.status.get() != Status::Connected {
        return;
    }
    let final_ = end.is_final();
    let (reason, code) = match end {
        End::Server { code, message } => (message, Some(code.as_str())),
        End::Protocol(message) => (Failure::protocol(message).message, None),
        End::Lost(reason) => (reason, None),
        End::Closed => ("closed by the page".to_owned(), None),
    };
    if final_ || !inner.reconnect {
        finish(inner, &reason, code);
        return;
    }
    inner.generation.set(inner.generation.get() + 1);
    if let Some(transport) = inner.transport.borrow_mut().take() {
        transport.close(0, "");
    }
    // The room went to another server of the cluster: reconnect there.
    if let Some(to) = inner.session.borrow().moved_to() {
        inner.route.borrow_mut().follow(to);
    }
    inner.status.set(Status::Reconnecting);
    spawn_local(reconnect(inner.clone(), reason));
}

/// Translates the session's events into promise results and page events, in order.
fn dispatch(inner: &Rc<Inner>) {
    loop {
        // One event at a time: listeners may call back into the classroom.
        let Some(event) = inner.session.borrow_mut().poll_event() else { return };
        match event {
            session::Event::RequestDone { waiter, result, .. } => {
                // A promise nobody awaits any more does not mind.
                let _ = waiter.send(result);
            }
            session::Event::Timeline { applied: true, .. } => inner.emit_timeline(),
            session::Event::Error { code, message } => {
                inner.emit("error", &to_js(&view::ErrorView { code: code.as_str(), message: &message }));
            }
            session::Event::MemberJoined(m) => {
                inner.emit("member-joined", &to_js(&view::MemberView::from(&m)));
                inner.emit_members();
            }
            session::Event::MemberUpdated(m) => {
                inner.emit("member-updated", &to_js(&view::MemberView::from(&m)));
                inner.emit_members();
            }
            session::Event::MemberLeft { member_id, reason } => {
                inner.emit("member-left", &to_js(&view::Left { id: member_id, reason: view::leave_reason(reason) }));
                inner.emit_members();
            }
            session::Event::Prompt(p) => inner.emit("prompt", &to_js(&view::prompt(p.as_ref()))),
            session::Event::Recording(r) => inner.emit("recording", &to_js(&view::recording(r))),
            session::Event::Playback(p) => inner.emit("playback", &to_js(&view::playback(p))),
            session::Event::Reflection(notice) => {
                inner.emit("reflection", &to_js(&view::ReflectionView::from(&notice)));
            }
            session::Event::Participation(notices) => {
                let detail: Vec<_> = notices.iter().map(view::ParticipationView::from).collect();
                inner.emit("participation", &to_js(&detail));
            }
            session::Event::Ended(end) => ended(inner, end),
            // The welcome is read at the handshake; the room's closing is the session's end.
            _ => {}
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
        let token = bounded_token(&inner.token.borrow());
        let greeted = match token {
            Ok(token) => {
                let mut route = inner.route.borrow().clone();
                let greeted = race::establish(&mut route, &token, &RoomRequest::Join(code.clone())).await;
                *inner.route.borrow_mut() = route;
                greeted
            }
            Err(e) => Err(e),
        };
        match greeted {
            Ok(greeted) => {
                if inner.status.get() != Status::Reconnecting {
                    greeted.transport.close(0, "");
                    return;
                }
                // A new session, notes numbered from 1 again; its clock estimate is the last
                // session's when the server keeps the same time base (a room moved within a
                // cluster), so the beat stays where it was.
                let mut session = greeted.session;
                let previous = inner.session.borrow().client().clock().clone();
                session.client_mut().carry_clock(&previous, greeted.welcome.server_now, js::local_now());
                *inner.session.borrow_mut() = session;
                let member_id = greeted.welcome.member_id;
                *inner.welcome.borrow_mut() = greeted.welcome;
                inner.kind.set(greeted.kind);
                inner.status.set(Status::Connected);
                run_session(&inner, greeted.transport);
                inner.wake_waiters();
                inner.emit("reconnected", &to_js(&view::Reconnected { member_id }));
                inner.emit_members();
                inner.emit_timeline();
                return;
            }
            Err(f) if is_final(&f.code) => {
                finish(&inner, &f.message, Some(&f.code));
                return;
            }
            Err(f) => {
                // The server the room was on may be gone: the page's own endpoints know where
                // the room lives now.
                inner.route.borrow_mut().go_home();
                reason = f.message;
            }
        }
    }
}

/// Beat frames, sync replies and classmates' notes.
async fn datagram_loop(inner: Rc<Inner>, generation: u64, transport: Rc<dyn Transport>) {
    while let Some(bytes) = transport.recv_datagram().await {
        // Stamp t3 before anything else.
        let t3 = js::local_now();
        if !inner.current(generation) {
            return;
        }
        let handled = {
            let mut session = inner.session.borrow_mut();
            session.handle_datagram(t3, &bytes).map(|handled| {
                let notes: Vec<JsValue> =
                    std::iter::from_fn(|| session.poll_note()).map(|n| to_js(&view::NoteView::from(&n))).collect();
                (handled, notes)
            })
        };
        let (handled, notes) = match handled {
            Ok(handled) => handled,
            Err(e) => {
                js::warn("downbeat: dropped an undecodable datagram", &JsValue::from_str(&e.to_string()));
                continue;
            }
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
async fn sync_loop(inner: Rc<Inner>, generation: u64, transport: Rc<dyn Transport>) {
    while inner.current(generation) {
        let wait_ms = {
            let mut session = inner.session.borrow_mut();
            let now = js::local_now();
            while let Some(datagram) = session.poll_datagram(now) {
                transport.send_datagram(&datagram);
            }
            js::nanos_to_ms(session.poll_timeout().0.saturating_sub(now.0))
        };
        inner.check_synced();
        js::sleep(wait_ms.clamp(1.0, MAX_SYNC_SLEEP_MS)).await;
    }
}

/// Tells the server (and so the teacher) how well this page is synced.
async fn report_loop(inner: Rc<Inner>, generation: u64, transport: Rc<dyn Transport>) {
    loop {
        js::sleep(REPORT_INTERVAL_MS).await;
        if !inner.current(generation) {
            return;
        }
        let report = match inner.session.borrow_mut().report(js::local_now()) {
            session::ReportDue::Send(frame) => frame,
            session::ReportDue::Unchanged => continue,
            session::ReportDue::NotLive => return,
        };
        if transport.send_control(&report).await.is_err() {
            return;
        }
    }
}

/// Feeds the control stream to the session and dispatches what it makes of it: timelines,
/// answers, presence, prompts and the teachers' SEL feed.
async fn control_loop(inner: Rc<Inner>, generation: u64, transport: Rc<dyn Transport>) {
    // What arrived with the welcome (the prompt, say) is already in the session.
    dispatch(&inner);
    loop {
        let bytes = transport.recv_control().await;
        if !inner.current(generation) {
            return;
        }
        match bytes {
            Some(bytes) => {
                inner.session.borrow_mut().handle_control_bytes(&bytes);
                dispatch(&inner);
            }
            None => return stream_ended(&inner, generation, transport.as_ref()).await,
        }
    }
}

/// How long a page waits, once the control stream ended, for the transport to say how the
/// session closed.
const CLOSE_INFO_WAIT_MS: f64 = 1_000.0;

/// The control stream ended. When the server ends a session it writes an error frame, then
/// closes with the same code; the close can discard the frame in flight, and the stream then
/// just ends. So the session's end waits briefly for the transport's close code, which says
/// why (`session_replaced`: another tab took the seat, and this one must not take it back).
async fn stream_ended(inner: &Rc<Inner>, generation: u64, transport: &dyn Transport) {
    let closed = transport.closed();
    let waited = futures_util::future::select(closed, Box::pin(js::sleep(CLOSE_INFO_WAIT_MS))).await;
    match waited {
        futures_util::future::Either::Left(((code, reason), _)) => closed_with(inner, generation, code, &reason),
        futures_util::future::Either::Right(_) if inner.current(generation) => {
            lost(inner, generation, "the server ended the session");
        }
        futures_util::future::Either::Right(_) => {}
    }
}

/// The transport of `generation` closed with `code` and `reason`: the session ends the way
/// they say (unless a newer connection took over meanwhile).
fn closed_with(inner: &Rc<Inner>, generation: u64, code: u32, reason: &str) {
    if inner.current(generation) {
        inner.session.borrow_mut().handle_closed_with(code, reason);
        dispatch(inner);
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

    /// Which transport the current (or last) session is on: `"webtransport"`, or `"websocket"`
    /// where the network blocks QUIC (or the `transport` option asked for it).
    #[wasm_bindgen(getter, unchecked_return_type = "\"webtransport\" | \"websocket\"")]
    pub fn transport(&self) -> String {
        self.inner.kind.get().as_str().to_owned()
    }

    /// `"connected"`, `"reconnecting"` or `"closed"`.
    #[wasm_bindgen(getter, unchecked_return_type = "\"connected\" | \"reconnecting\" | \"closed\"")]
    pub fn state(&self) -> String {
        self.inner.status.get().as_str().to_owned()
    }

    /// The server's clock now (ms), as estimated; `undefined` before the first sync sample.
    #[wasm_bindgen(js_name = serverNow)]
    pub fn server_now(&self) -> Option<f64> {
        self.inner.session.borrow().client().server_time(js::local_now()).map(|t| js::nanos_to_ms(t.0))
    }

    /// Whether the clock is synced well enough to schedule by.
    pub fn synced(&self) -> bool {
        self.inner.session.borrow().client().is_synced(js::local_now())
    }

    /// The server time (ms) at `performance.now()` time `localMs`.
    #[wasm_bindgen(js_name = serverTimeOf)]
    pub fn server_time_of(&self, #[wasm_bindgen(js_name = localMs)] local_ms: f64) -> Option<f64> {
        self.inner.session.borrow().client().server_time(js::ms_to_local(local_ms)).map(|t| js::nanos_to_ms(t.0))
    }

    /// The `performance.now()` time (ms) at which the server clock reads `serverMs`.
    #[wasm_bindgen(js_name = localTimeOf)]
    pub fn local_time_of(&self, #[wasm_bindgen(js_name = serverMs)] server_ms: f64) -> Option<f64> {
        let at = ServerNanos(js::ms_to_nanos(server_ms));
        self.inner.session.borrow().client().local_time_of(at).map(|t| js::nanos_to_ms(t.0))
    }

    /// Where server time `serverMs` (a note's `serverTime`, when it was played) falls on the
    /// shared timeline: `{ offsetMs, onBeat }`, its distance from the nearest sounding beat
    /// (negative: early) and whether that is on the beat, exactly as the server counts a note
    /// for participation; `null` where no beat sounds.
    #[wasm_bindgen(js_name = beatOffset, unchecked_return_type = "BeatOffset | null")]
    pub fn beat_offset(&self, #[wasm_bindgen(js_name = serverMs)] server_ms: f64) -> JsValue {
        let session = self.inner.session.borrow();
        let Some(timeline) = session.client().timeline() else { return JsValue::NULL };
        let at = ServerNanos(js::ms_to_nanos(server_ms));
        match downbeat_engine::sel::measure(timeline, at, &[]) {
            Some(placement) => to_js(&view::beat_offset(placement)),
            None => JsValue::NULL,
        }
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
        let session = self.inner.session.borrow();
        let beats = session.client().schedule(js::local_now(), js::ms_to_nanos(horizon_ms.max(0.0)));
        to_js(&beats.iter().map(view::BeatView::from).collect::<Vec<_>>())
    }

    /// The timeline in force now (and a decided change still to come).
    #[wasm_bindgen(unchecked_return_type = "TimelineInfo | undefined")]
    pub fn timeline(&self) -> JsValue {
        let session = self.inner.session.borrow();
        let engine = session.client();
        to_js(&view::timeline(engine, engine.server_time(js::local_now())))
    }

    /// This page's clock sync.
    #[wasm_bindgen(unchecked_return_type = "SyncInfo")]
    pub fn sync(&self) -> JsValue {
        to_js(&view::sync(self.inner.session.borrow().client(), js::local_now()))
    }

    /// The room's members (this page included), as last told.
    #[wasm_bindgen(unchecked_return_type = "Member[]")]
    pub fn members(&self) -> JsValue {
        to_js(&self.inner.session.borrow().members().map(view::MemberView::from).collect::<Vec<_>>())
    }

    /// The teacher's current reflection question, or `null`.
    #[wasm_bindgen(unchecked_return_type = "Prompt | null")]
    pub fn prompt(&self) -> JsValue {
        to_js(&view::prompt(self.inner.session.borrow().prompt()))
    }

    /// The recording running in the room (`{ take }`), or `null`. Show it: everyone in the
    /// room is told (event `recording`).
    #[wasm_bindgen(unchecked_return_type = "Recording | null")]
    pub fn recording(&self) -> JsValue {
        to_js(&view::recording(self.inner.session.borrow().recording()))
    }

    /// Plays a note now: stamps it on the shared clock and sends it to the room (repeating
    /// the last notes, so one lost datagram loses nothing). Sound it yourself at
    /// `audioTimeOf(ctx, playAt)`, when everyone else does. Throws `note_out_of_range`,
    /// `not_synced` (before the first sync sample) or `closed`.
    #[wasm_bindgen(js_name = playNote, unchecked_return_type = "PlayedNote")]
    pub fn play_note(&self, midi: f64, velocity: Option<f64>, instrument: Option<f64>) -> Result<JsValue, JsValue> {
        let (velocity, instrument) = (velocity.unwrap_or(100.0), instrument.unwrap_or(0.0));
        let byte = |v: f64| whole(v, 255, "").ok().and_then(|v| u8::try_from(v).ok());
        let (Some(m), Some(v), Some(i)) = (byte(midi), byte(velocity), byte(instrument)) else {
            let message = format!("note {midi}, velocity {velocity}, instrument {instrument} is out of MIDI range");
            return Err(Failure::server(ErrorCode::NoteOutOfRange, message).into());
        };
        let mut session = self.inner.session.borrow_mut();
        let (note, datagram) = session.play_note(js::local_now(), m, v, i).map_err(|e| match e {
            NoteError::NotSynced => Failure::new(NOT_SYNCED, e.to_string()),
            other => Failure::server(ErrorCode::NoteOutOfRange, other.to_string()),
        })?;
        let transport = self.inner.transport.borrow().clone().ok_or_else(Failure::closed)?;
        transport.send_datagram(&datagram);
        Ok(to_js(&view::played(&note, session.client().playout_delay_nanos())))
    }

    /// Teachers: starts the beat at the next bar, after `countInBars` bars of count-in
    /// (default 1).
    #[wasm_bindgen(unchecked_return_type = "Promise<Applied>")]
    pub fn start(&self, #[wasm_bindgen(js_name = countInBars)] count_in_bars: Option<f64>) -> Promise {
        match whole(count_in_bars.unwrap_or(1.0), u64::from(MAX_COUNT_IN_BARS), "countInBars") {
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
        let meter = u8::try_from(whole(beats_per_bar, 255, "beatsPerBar").unwrap_or(0)).ok();
        match meter.and_then(|m| check_meter(m).ok()) {
            Some(meter) => self.change(Change::SetMeter(meter)),
            None => Promise::reject(&meter_out_of_range(beats_per_bar).into_js()),
        }
    }

    fn change(&self, change: Change) -> Promise {
        self.applied(ControlOp::Timeline(change))
    }

    /// `op`, resolving with where it lands.
    fn applied(&self, op: ControlOp) -> Promise {
        let inner = self.inner.clone();
        promise(async move { inner.control(op).await }, |ack| match ack.applied {
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

    /// Teachers: starts recording the class (every note the room hears, and the timeline).
    /// Throws `already_recording`, `too_many_recordings`.
    #[wasm_bindgen(js_name = startRecording, unchecked_return_type = "Promise<void>")]
    pub fn start_recording(&self) -> Promise {
        self.op(Ok(ControlOp::StartRecording))
    }

    /// Teachers: stops the recording. Throws `not_recording`.
    #[wasm_bindgen(js_name = stopRecording, unchecked_return_type = "Promise<void>")]
    pub fn stop_recording(&self) -> Promise {
        self.op(Ok(ControlOp::StopRecording))
    }

    /// Teachers: plays take `take` of this class back into the room from the next bar (the
    /// beat starts if stopped; `tempoBpm` changes the tempo at the same bar). Every tab
    /// hears each recorded note at one instant, as `note` events. Resolves like `start()`.
    /// Throws `recording_not_found`, `already_playing`.
    #[wasm_bindgen(js_name = playRecording, unchecked_return_type = "Promise<Applied>")]
    pub fn play_recording(&self, take: f64, #[wasm_bindgen(js_name = tempoBpm)] tempo_bpm: Option<f64>) -> Promise {
        let take = match whole(take, u64::from(u32::MAX), "take") {
            Ok(take) => u32::try_from(take).unwrap_or(u32::MAX),
            Err(e) => return Promise::reject(&e.into_js()),
        };
        match tempo_bpm.map(tempo_from_bpm_f64).transpose() {
            Ok(tempo) => self.applied(ControlOp::PlayRecording { take, tempo }),
            Err(e) => Promise::reject(&Failure::server(e.code(), e.to_string()).into_js()),
        }
    }

    /// Teachers: stops the playback at the next bar. Throws `not_playing`.
    #[wasm_bindgen(js_name = stopPlayback, unchecked_return_type = "Promise<Applied>")]
    pub fn stop_playback(&self) -> Promise {
        self.applied(ControlOp::StopPlayback)
    }

    /// The recording playing back (`{ take, startsAt, stopsAt }`, server ms), or `null`.
    #[wasm_bindgen(unchecked_return_type = "Playback | null")]
    pub fn playback(&self) -> JsValue {
        to_js(&view::playback(self.inner.session.borrow().playback()))
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
                    let request = Request::Reflect { id, prompt_id, mood, text: text.clone() };
                    match inner.request(request).await {
                        Ok(Answer::ReflectionSaved) => return Ok(js::hex(&id)),
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
                match inner.request(Request::RefreshToken(bounded)).await? {
                    Answer::TokenRefreshed { expires_at } => {
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
        finish(&self.inner, "closed by the page", None);
    }
}

impl Drop for Classroom {
    fn drop(&mut self) {
        // `free()` from JS: nobody can listen any more, so end the session too.
        finish(&self.inner, "closed by the page", None);
    }
}
