//! How a classroom reaches the server: which transports it tries, in which order, and which
//! session it keeps.
//!
//! In `auto` mode WebTransport goes first and WebSocket starts after a head start (500 ms by
//! default), or at once if WebTransport failed sooner; the first session the server *welcomes*
//! is kept and the other closed. A refusal from the server (`room_not_found`, say) ends the race
//! at once: the other transport would hear the same.
//!
//! Only one hello is outstanding at a time (the hello gate). The server gives a token's subject
//! one seat, and a second hello would take it over and end the first session; so a transport
//! that opened second says hello only once the first one's hello failed, or went unanswered for
//! [`GREET_LIMIT_MS`] while it waited. The stalled attempt is then closed; a hello of it that
//! still reaches the server afterwards would take the seat over (the kept session then ends
//! with `session_replaced`), which takes a hello stalled for seconds and then delivered.
//!
//! The winner is remembered per server (keyed by the WebTransport URL) in `localStorage`. After
//! a WebSocket win the next connect goes straight to WebSocket; WebTransport only gets a turn
//! if WebSocket fails, or has not been welcomed within [`REMEMBERED_HEAD_START_MS`] (a network
//! that has since started to block TCP, say). A classroom on WebSocket retries
//! WebTransport in the background, [`RETRY_WEBTRANSPORT_MS`] after it last failed (at least
//! [`FIRST_RETRY_MS`] after connecting): it opens a session and closes it without a hello, which
//! takes no seat. A retry that opens forgets the memory, so the next connect (or reconnect)
//! races with WebTransport first again; the running session stays where it is.

use std::cell::{Cell, RefCell};
use std::rc::Rc;

use downbeat_engine::clock::Config as SyncConfig;
use downbeat_engine::session::{End, Session};
use downbeat_protocol::{Moved, RoomRequest, Token, Welcome};
use futures_channel::oneshot;
use futures_util::future::{Either, LocalBoxFuture, select};

use crate::js::{self, CLOSED, CONNECT_FAILED, Failure, PROTOCOL, TIMEOUT};
use crate::transport::{self, Endpoints, Kind, Transport};

/// How long a whole connect (every attempt, hello and welcome) may take.
const HANDSHAKE_TIMEOUT_MS: f64 = 10_000.0;
/// How long a racing attempt's hello may go unanswered while the other attempt waits to say
/// its own.
pub(crate) const GREET_LIMIT_MS: f64 = 3_000.0;
/// How long after WebTransport last failed a classroom on WebSocket tries it again.
pub(crate) const RETRY_WEBTRANSPORT_MS: f64 = 5.0 * 60_000.0;
/// The earliest a background retry runs after a connect, so it never competes with the start.
pub(crate) const FIRST_RETRY_MS: f64 = 10_000.0;
/// How long a background retry waits for WebTransport to open.
const RETRY_TIMEOUT_MS: f64 = 10_000.0;
/// The default head start of WebTransport over WebSocket.
pub(crate) const DEFAULT_HEAD_START_MS: f64 = 500.0;
/// The head start of a remembered WebSocket over WebTransport: long enough that a slow but
/// working WebSocket is never raced.
pub(crate) const REMEMBERED_HEAD_START_MS: f64 = 2_000.0;
/// Where the winner is remembered: this prefix and the WebTransport URL.
const MEMORY_PREFIX: &str = "downbeat.transport ";

/// Which transports a classroom may use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Choice {
    /// Race them (WebTransport first) and remember the winner.
    Auto,
    /// Only this one.
    Only(Kind),
}

/// How to reach one server.
#[derive(Clone, Debug)]
pub(crate) struct Route {
    pub(crate) endpoints: Endpoints,
    /// The endpoints the page was given (its own server, or a cluster's front): where a
    /// reconnect goes back to when the server a room moved to cannot be reached (it died; the
    /// cluster's directory knows where the room lives now).
    pub(crate) home: Endpoints,
    pub(crate) choice: Choice,
    pub(crate) head_start_ms: f64,
}

impl Route {
    /// Points the route at the server a room moved to.
    pub(crate) fn follow(&mut self, to: &Moved) {
        let hashes = to.certificate_hashes.to_vec();
        self.endpoints.webtransport = Some((to.webtransport_url.to_string(), hashes));
        self.endpoints.websocket = Some(to.websocket_url.to_string());
    }

    /// Points the route back at the page's own endpoints.
    pub(crate) fn go_home(&mut self) {
        self.endpoints = self.home.clone();
    }
}

/// A session the server welcomed, on the transport that carried it.
pub(crate) struct Greeted<T> {
    pub(crate) transport: Rc<dyn Transport>,
    pub(crate) kind: Kind,
    pub(crate) session: Session<T>,
    pub(crate) welcome: Welcome,
}

/// How many times one connect follows a room that lives on another server (`moved`).
const MAX_MOVES: usize = 3;

/// Opens a session the way `route` says, says hello with `token` for `room`, and returns the
/// first session welcomed; rejects with the server's refusal, or why no transport worked. A
/// server of a cluster that does not hold the room answers where it lives: `route` is
/// pointed there (so reconnects go there too) and the hello is said again.
pub(crate) async fn establish<T>(route: &mut Route, token: &Token, room: &RoomRequest) -> Result<Greeted<T>, Failure> {
    let mut moves = 0;
    loop {
        match establish_here(route, token, room).await {
            Err(Failure { moved: Some(to), .. }) if moves < MAX_MOVES => {
                moves += 1;
                route.follow(&to);
            }
            result => return result,
        }
    }
}

/// [`establish`] on the server `route` names, moves not followed.
async fn establish_here<T>(route: &Route, token: &Token, room: &RoomRequest) -> Result<Greeted<T>, Failure> {
    match select(Box::pin(race(route, token, room)), Box::pin(js::sleep(HANDSHAKE_TIMEOUT_MS))).await {
        Either::Left((result, _)) => result,
        Either::Right(((), _)) => Err(Failure::new(TIMEOUT, "timed out waiting for the server's welcome")),
    }
}

async fn race<T>(route: &Route, token: &Token, room: &RoomRequest) -> Result<Greeted<T>, Failure> {
    let (first, second, head_start_ms) = match route.choice {
        Choice::Only(kind) => return attempt(kind, route, None, token, room).await,
        Choice::Auto if recall(route).is_some() => (Kind::WebSocket, Kind::WebTransport, REMEMBERED_HEAD_START_MS),
        Choice::Auto => (Kind::WebTransport, Kind::WebSocket, route.head_start_ms),
    };
    let gate = Gate::default();
    // Futures do nothing until polled: the second attempt starts when the race first polls it.
    let first: LocalBoxFuture<'_, _> = Box::pin(attempt(first, route, Some(&gate), token, room));
    let second: LocalBoxFuture<'_, _> = Box::pin(attempt(second, route, Some(&gate), token, room));
    let result = match select(first, Box::pin(js::sleep(head_start_ms))).await {
        Either::Left((Ok(greeted), _)) => Ok(greeted),
        Either::Left((Err(e), _)) if !others_may_try(&e) => Err(e),
        Either::Left((Err(e), _)) => second.await.map_err(|other| both_failed(e, other)),
        Either::Right(((), first)) => match select(first, second).await {
            Either::Left((Ok(greeted), _)) | Either::Right((Ok(greeted), _)) => Ok(greeted),
            Either::Left((Err(e), other)) | Either::Right((Err(e), other)) => {
                if others_may_try(&e) {
                    other.await.map_err(|other| both_failed(e, other))
                } else {
                    Err(e)
                }
            }
        },
    };
    if let Ok(greeted) = &result {
        match greeted.kind {
            Kind::WebTransport => forget(route),
            // A remembered WebSocket keeps the time WebTransport last failed.
            Kind::WebSocket => remember_websocket(route, recall(route).unwrap_or_else(js_sys::Date::now)),
        }
    }
    result
}

/// Whether `failure` is about the way there (so another transport may do better) rather than
/// the server's answer.
fn others_may_try(failure: &Failure) -> bool {
    [CONNECT_FAILED, TIMEOUT, CLOSED, PROTOCOL].contains(&failure.code.as_str())
}

/// Both attempts failed: the server's answer if one had it, else both reasons.
fn both_failed(first: Failure, second: Failure) -> Failure {
    match (others_may_try(&first), others_may_try(&second)) {
        (false, _) => first,
        (true, false) => second,
        (true, true) => Failure::new(CONNECT_FAILED, format!("{}; {}", first.message, second.message)),
    }
}

/// One transport's attempt: open, wait for the gate, say hello, read until welcomed.
async fn attempt<T>(
    kind: Kind,
    route: &Route,
    gate: Option<&Gate>,
    token: &Token,
    room: &RoomRequest,
) -> Result<Greeted<T>, Failure> {
    let transport = Opened { transport: transport::open(kind, &route.endpoints).await?, kept: false };
    let mut turn = None;
    if let Some(gate) = gate {
        turn = Some(gate.turn().await);
    }
    let (mut session, hello) = Session::connect(SyncConfig::default(), token.clone(), room.clone());
    let mut greeting = Box::pin(greet(&*transport.transport, &mut session, &hello));
    // Another attempt waiting for the gate may take over from a hello unanswered this long.
    let welcome = loop {
        match select(greeting, Box::pin(js::sleep(GREET_LIMIT_MS))).await {
            Either::Left((welcome, _)) => break welcome?,
            Either::Right(((), _)) if gate.is_some_and(Gate::contended) => {
                let message = format!("no welcome over {} within {GREET_LIMIT_MS} ms", kind.as_str());
                return Err(Failure::new(TIMEOUT, message));
            }
            Either::Right(((), unanswered)) => greeting = unanswered,
        }
    };
    drop(turn);
    Ok(Greeted { transport: transport.keep(), kind, session, welcome })
}

/// Says hello and reads until the session is welcomed (its welcome) or ended (why).
async fn greet<T>(transport: &dyn Transport, session: &mut Session<T>, hello: &[u8]) -> Result<Welcome, Failure> {
    transport.send_control(hello).await?;
    loop {
        match transport.recv_control().await {
            Some(bytes) => session.handle_control_bytes(&bytes),
            None => session.handle_closed(""),
        }
        let Some(greeted) = session.greeted() else { continue };
        return match greeted {
            Ok(welcome) => Ok(welcome.clone()),
            Err(End::Server { code, message }) => {
                let mut failure = Failure::server(*code, message.clone());
                failure.moved = session.moved_to().cloned().map(Box::new);
                Err(failure)
            }
            Err(End::Protocol(message)) => Err(Failure::protocol(message)),
            Err(_) => Err(Failure::new(CONNECT_FAILED, "the server ended the session before welcoming it")),
        };
    }
}

/// An attempt's transport: closed when dropped (the attempt failed or lost) unless kept.
struct Opened {
    transport: Rc<dyn Transport>,
    kept: bool,
}

impl Opened {
    fn keep(mut self) -> Rc<dyn Transport> {
        self.kept = true;
        self.transport.clone()
    }
}

impl Drop for Opened {
    fn drop(&mut self) {
        if !self.kept {
            self.transport.close(0, "");
        }
    }
}

/// The hello gate: one turn at a time, in any order.
#[derive(Default)]
struct Gate {
    busy: Cell<bool>,
    waiting: RefCell<Vec<oneshot::Sender<()>>>,
}

impl Gate {
    /// Whether an attempt is waiting for its turn.
    fn contended(&self) -> bool {
        self.waiting.borrow().iter().any(|waiter| !waiter.is_canceled())
    }

    async fn turn(&self) -> Turn<'_> {
        while self.busy.get() {
            let (tx, rx) = oneshot::channel();
            self.waiting.borrow_mut().push(tx);
            let _ = rx.await;
        }
        self.busy.set(true);
        Turn(self)
    }
}

/// A turn at the gate, given back when dropped.
struct Turn<'a>(&'a Gate);

impl Drop for Turn<'_> {
    fn drop(&mut self) {
        self.0.busy.set(false);
        for waiter in self.0.waiting.borrow_mut().drain(..) {
            let _ = waiter.send(());
        }
    }
}

/// Retries WebTransport in the background while the server is remembered as reached over
/// WebSocket and `wanted()` (the classroom still runs on WebSocket); stops once a retry opens
/// (the memory is forgotten) or another page found that it does.
pub(crate) async fn retry_webtransport(route: Route, wanted: impl Fn() -> bool) {
    let mut earliest = js_sys::Date::now() + FIRST_RETRY_MS;
    loop {
        let Some(failed_at) = recall(&route) else { return };
        js::sleep((failed_at + RETRY_WEBTRANSPORT_MS).max(earliest) - js_sys::Date::now()).await;
        earliest = 0.0;
        if !wanted() {
            return;
        }
        // Another page may have retried meanwhile.
        match recall(&route) {
            None => return,
            Some(newer) if newer > failed_at => continue,
            Some(_) => {}
        }
        let open = transport::open(Kind::WebTransport, &route.endpoints);
        match select(Box::pin(open), Box::pin(js::sleep(RETRY_TIMEOUT_MS))).await {
            Either::Left((Ok(transport), _)) => {
                transport.close(0, "");
                forget(&route);
                return;
            }
            _ => remember_websocket(&route, js_sys::Date::now()),
        }
    }
}

/// The `localStorage` key for `route`'s server, when racing (both URLs known).
fn memory_key(route: &Route) -> Option<String> {
    let has_websocket = route.endpoints.websocket.is_some();
    let (url, _) = route.endpoints.webtransport.as_ref().filter(|_| has_websocket)?;
    Some(format!("{MEMORY_PREFIX}{url}"))
}

/// When WebTransport last failed, if this server is remembered as reached over WebSocket.
fn recall(route: &Route) -> Option<f64> {
    let value = js::storage_get(&memory_key(route)?)?;
    value.strip_prefix("websocket ")?.parse::<f64>().ok().filter(|t| t.is_finite())
}

fn remember_websocket(route: &Route, failed_at: f64) {
    if let Some(key) = memory_key(route) {
        js::storage_set(&key, &format!("websocket {failed_at}"));
    }
}

fn forget(route: &Route) {
    if let Some(key) = memory_key(route) {
        js::storage_remove(&key);
    }
}
