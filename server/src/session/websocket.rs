//! Sessions over WebSocket, for networks that block QUIC: the same session as WebTransport
//! (see [`downbeat_protocol::ws`] for how one socket carries both channels), with datagram
//! semantics kept on the server's side.
//!
//! A TCP socket delivers in order, so a slow or stalled socket would hold every beat frame
//! and sync reply behind the ones before it. The session never queues timing traffic:
//! [`Outbox`] keeps at most the newest beat frame, the newest sync reply and a few note
//! frames waiting, replaces stale ones (counted as dropped), and the writer stamps a sync
//! reply's `t2` just before it writes it. Control messages keep the control queue's bound; a
//! write that does not finish in [`WRITE_DEADLINE`] ends the session, so a peer that never
//! reads costs bounded memory.

use std::collections::VecDeque;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message, WebSocket};
use bytes::Bytes;
use downbeat_protocol::ws::{self, Unit};
use downbeat_protocol::{
    self as wire, ClientMessage, ErrorCode, MAX_DATAGRAM_LEN, ServerNanos, SyncRequest, Transport,
};
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt as _, StreamExt as _};
use tokio::sync::{Notify, mpsc};
use tokio::task::JoinHandle;
use tokio::time::{Instant, timeout, timeout_at};
use tracing::{Instrument as _, Span, debug, warn};

use super::{
    ActiveGuard, Control, Datagrams, End, FLUSH_TIMEOUT, Link, ReadError, Session, SessionContext, SessionPlaces,
    sync_reply,
};
use crate::authz::Refusal;
use crate::clock::ServerClock;
use crate::room::{DatagramKind, Departure, Outgoing, Peer};
use crate::shutdown::Shutdown;
use crate::stats::Stats;

/// Note frames waiting per session before the oldest is dropped.
const NOTE_BACKLOG: usize = 16;
/// A single write (a message into the socket) must finish within this time.
const WRITE_DEADLINE: Duration = Duration::from_secs(10);
/// Bytes the socket's write buffer may hold beyond what TCP took: a control queue's worth of
/// the largest frames is never needed at once, a few beat frames and replies are.
const MAX_WRITE_BUFFER: usize = 256 * 1024;

/// The WebSocket settings every upgrade gets: messages capped at the protocol's largest.
pub(crate) fn limits(upgrade: axum::extract::ws::WebSocketUpgrade) -> axum::extract::ws::WebSocketUpgrade {
    upgrade
        .max_message_size(ws::MAX_MESSAGE_LEN)
        .max_frame_size(ws::MAX_MESSAGE_LEN)
        .write_buffer_size(0)
        .max_write_buffer_size(MAX_WRITE_BUFFER)
}

/// Runs an upgraded WebSocket as a session; `places` are its places under the session limits
/// and `hold` anything else it keeps while open (its HTTP connection's place).
pub(crate) async fn run<H: Send>(
    socket: WebSocket,
    ctx: Arc<SessionContext>,
    peer: IpAddr,
    shutdown: Shutdown,
    places: SessionPlaces,
    hold: H,
) {
    let _active = ActiveGuard::new(&ctx.stats, Transport::WebSocket);
    let deadline = Instant::now() + ctx.hello_timeout;
    let (session, span) = Session::new(ctx, Transport::WebSocket, peer, shutdown);
    debug!(parent: &span, %peer, "WebSocket session accepted");
    serve(session, socket, deadline).instrument(span).await;
    drop((places, hold));
}

async fn serve(session: Session, socket: WebSocket, deadline: Instant) {
    let (sink, stream) = socket.split();
    let outbox = Arc::new(Outbox::new(session.ctx.stats.clone()));
    let ctx = &session.ctx;
    let mut link = WsLink {
        sink: Some(sink),
        stream,
        outbox: outbox.clone(),
        clock: ctx.clock,
        left: false,
        idle_timeout: ctx.idle_timeout,
        keep_alive: ctx.keep_alive,
    };
    let mut shutdown = session.shutdown.clone();
    let first = tokio::select! {
        first = timeout_at(deadline, read_control(&mut link.stream, &mut link.left)) => first.unwrap_or(Err(ReadError::Stalled)),
        () = shutdown.wait() => {
            link.goodbye(&Refusal::new(ErrorCode::ShuttingDown, "the server is shutting down")).await;
            return;
        }
    };
    // Boxed: the hello's state is gone once the session is served (see `webtransport::run`).
    let (admitted, answer) = match Box::pin(session.admit(first, outbox)).await {
        Ok(admitted) => admitted,
        Err(refusal) => {
            if let Some(refusal) = refusal {
                link.goodbye(&refusal).await;
            }
            return;
        }
    };
    let answered = match wire::encode_frame(&answer) {
        Ok(frame) => link.write(Message::Binary(ws::control_message(&frame).into())).await,
        Err(e) => {
            warn!(error = %e, "the first answer did not encode");
            false
        }
    };
    if !answered {
        admitted.abandon(Departure::Lost).await;
        return;
    }
    session.run(&mut link, admitted).await;
}

/// Reads the first unit, which must be a control frame (the hello or a probe); pings and pongs
/// aside.
async fn read_control(stream: &mut SplitStream<WebSocket>, left: &mut bool) -> Result<ClientMessage, ReadError> {
    // The hello's own deadline bounds this wait.
    match next_unit(stream, left, Duration::MAX).await? {
        Received::Control(message) => message,
        // Before the hello, nothing else is expected.
        Received::Datagram(_) => Err(ReadError::Decode(wire::DecodeError::Malformed)),
    }
}

/// What one WebSocket message carried.
enum Received {
    Control(Result<ClientMessage, ReadError>),
    Datagram(Bytes),
}

/// The next unit the peer sent; `Err` when the socket ended ([`ReadError::Closed`], with
/// `left` set when the peer said goodbye), went silent for `idle` (not even answering pings:
/// the connection is lost) or broke the protocol.
async fn next_unit(
    stream: &mut SplitStream<WebSocket>,
    left: &mut bool,
    idle: Duration,
) -> Result<Received, ReadError> {
    loop {
        let message = match timeout(idle, stream.next()).await {
            Err(_) => {
                debug!("nothing received within the idle timeout; the connection is lost");
                return Err(ReadError::Closed);
            }
            Ok(None) => return Err(ReadError::Closed),
            Ok(Some(Ok(message))) => message,
            Ok(Some(Err(e))) => return Err(read_error(e)),
        };
        match message {
            Message::Binary(bytes) => {
                return match ws::split(&bytes) {
                    Ok(Unit::Control(body)) => {
                        Ok(Received::Control(wire::decode_frame_body(body).map_err(ReadError::Decode)))
                    }
                    Ok(Unit::Datagram(datagram)) => {
                        let start = bytes.len() - datagram.len();
                        Ok(Received::Datagram(bytes.slice(start..)))
                    }
                    Err(e) => Err(ReadError::Decode(e)),
                };
            }
            // Not part of the protocol: the peer is out of step.
            Message::Text(_) => return Err(ReadError::Decode(wire::DecodeError::Malformed)),
            Message::Ping(_) | Message::Pong(_) => continue,
            Message::Close(_) => {
                *left = true;
                return Err(ReadError::Closed);
            }
        }
    }
}

/// What a failed read means: a message over the cap is [`ErrorCode::FrameTooLarge`]; a
/// protocol violation (bad framing, unmasked frames) is malformed; anything else a lost socket.
fn read_error(e: axum::Error) -> ReadError {
    use tokio_tungstenite::tungstenite::Error as WsError;
    match e.into_inner().downcast::<WsError>().map(|e| *e) {
        Ok(WsError::Capacity(_)) => ReadError::Decode(wire::DecodeError::TooLarge {
            len: ws::MAX_MESSAGE_LEN as u64 + 1,
            max: ws::MAX_MESSAGE_LEN as u64,
        }),
        Ok(WsError::Protocol(_) | WsError::Utf8(_)) => ReadError::Decode(wire::DecodeError::Malformed),
        _ => ReadError::Closed,
    }
}

/// A joined WebSocket session.
#[derive(Debug)]
struct WsLink {
    /// Until the writer takes it.
    sink: Option<SplitSink<WebSocket, Message>>,
    stream: SplitStream<WebSocket>,
    outbox: Arc<Outbox>,
    clock: ServerClock,
    /// The peer sent a close frame.
    left: bool,
    idle_timeout: Duration,
    keep_alive: Duration,
}

impl WsLink {
    /// Writes one message before the writer task exists; false if the socket failed.
    async fn write(&mut self, message: Message) -> bool {
        let Some(sink) = self.sink.as_mut() else { return false };
        matches!(timeout(WRITE_DEADLINE, sink.send(message)).await, Ok(Ok(())))
    }

    /// Tells a peer that was never joined why, then closes.
    async fn goodbye(&mut self, refusal: &Refusal) {
        let code = refusal.code;
        let frame = wire::encode_frame(&refusal.answer()).map(|f| ws::control_message(&f));
        let _ = timeout(FLUSH_TIMEOUT, async {
            if let Ok(frame) = frame {
                self.write(Message::Binary(frame.into())).await;
            }
            self.write(Message::Close(Some(close_frame(code)))).await;
        })
        .await;
        drain(&mut self.stream, self.left).await;
    }
}

/// Reads and drops what the peer still sends until it answers our close frame (or at most
/// [`FLUSH_TIMEOUT`]; at once if it already closed). Closing a TCP socket that holds unread
/// data resets the connection, and a reset makes the peer's kernel throw away what its
/// application has not read yet: the goodbye itself, when a peer's sync requests crossed it.
async fn drain(stream: &mut SplitStream<WebSocket>, left: bool) {
    if left {
        return;
    }
    let _ = timeout(FLUSH_TIMEOUT, async {
        while let Some(Ok(message)) = stream.next().await {
            if matches!(message, Message::Close(_)) {
                break;
            }
        }
    })
    .await;
}

fn close_frame(code: ErrorCode) -> CloseFrame {
    CloseFrame { code: ws::close_code(code), reason: code.as_str().into() }
}

impl Link for WsLink {
    fn spawn_writer(&mut self, rx: mpsc::Receiver<Outgoing>) -> JoinHandle<()> {
        let sink = self.sink.take().expect("the writer starts once");
        let writer = write_loop(sink, rx, self.outbox.clone(), self.clock, self.keep_alive);
        tokio::spawn(writer.instrument(Span::current()))
    }

    async fn read(
        &mut self,
        control: &mut Control<'_>,
        datagrams: &mut Datagrams<'_>,
        control_tx: &mpsc::Sender<Outgoing>,
    ) -> End {
        loop {
            let unit = next_unit(&mut self.stream, &mut self.left, self.idle_timeout).await;
            let t1 = self.clock.now();
            let read = match unit {
                Ok(Received::Datagram(datagram)) => {
                    match datagrams.receive(&datagram, t1) {
                        Ok(Some(request)) => self.outbox.sync_reply(request, t1),
                        Ok(None) => {}
                        Err(end) => return end,
                    }
                    continue;
                }
                Ok(Received::Control(read)) => read,
                Err(e) => Err(e),
            };
            if let Some(end) = control.handle(read, control_tx).await {
                return end;
            }
        }
    }

    async fn departure(&self) -> Departure {
        if self.left { Departure::Left } else { Departure::Lost }
    }

    fn closing(&self, code: ErrorCode, _message: &'static str) {
        self.outbox.lock().close = Some(code);
    }

    fn close(&self, _code: Option<ErrorCode>, _message: &str) {
        // The writer said goodbye (or could not); dropping the socket closes it.
    }

    async fn linger(&mut self) {
        drain(&mut self.stream, self.left).await;
    }
}

/// Timing traffic waiting for a session's socket: never more than the newest beat frame, the
/// newest sync reply and [`NOTE_BACKLOG`] note frames. The room hands datagrams here as it
/// would to QUIC (without waiting); the writer takes them.
#[derive(Debug)]
pub(crate) struct Outbox {
    waiting: Mutex<Waiting>,
    wake: Notify,
    stats: Arc<Stats>,
}

#[derive(Debug, Default)]
struct Waiting {
    beats: Option<Vec<u8>>,
    sync: Option<(SyncRequest, ServerNanos)>,
    notes: VecDeque<Vec<u8>>,
    /// Set when the session must end now ([`Peer::close`]) or is ending (its goodbye code).
    close: Option<ErrorCode>,
    /// [`Peer::close`] was called: end without waiting for the control queue.
    at_once: bool,
}

impl Outbox {
    fn new(stats: Arc<Stats>) -> Self {
        Self { waiting: Mutex::new(Waiting::default()), wake: Notify::new(), stats }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Waiting> {
        self.waiting.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn dropped(&self) {
        self.stats.transport_timing_dropped.get(Transport::WebSocket).inc();
    }

    /// A sync request received at `t1`, answered by the writer (replacing an older one).
    fn sync_reply(&self, request: SyncRequest, t1: ServerNanos) {
        if self.lock().sync.replace((request, t1)).is_some() {
            self.dropped();
        }
        self.wake.notify_one();
    }

    /// Takes what waits (the close request stays set).
    fn take(&self) -> Waiting {
        let mut waiting = self.lock();
        let (close, at_once) = (waiting.close, waiting.at_once);
        let taken = std::mem::take(&mut *waiting);
        (waiting.close, waiting.at_once) = (close, at_once);
        taken
    }
}

impl Peer for Outbox {
    fn max_datagram_size(&self) -> Option<usize> {
        Some(MAX_DATAGRAM_LEN)
    }

    fn send_datagram(&self, kind: DatagramKind, bytes: &[u8]) -> bool {
        let mut waiting = self.lock();
        if waiting.close.is_some() {
            return false;
        }
        let replaced = match kind {
            DatagramKind::Beats => waiting.beats.replace(bytes.to_vec()).is_some(),
            DatagramKind::Notes => {
                let full = waiting.notes.len() >= NOTE_BACKLOG;
                if full {
                    waiting.notes.pop_front();
                }
                waiting.notes.push_back(bytes.to_vec());
                full
            }
        };
        drop(waiting);
        if replaced {
            self.dropped();
        }
        self.wake.notify_one();
        true
    }

    fn close(&self, code: ErrorCode, _reason: &str) {
        let mut waiting = self.lock();
        waiting.close = Some(code);
        waiting.at_once = true;
        drop(waiting);
        self.wake.notify_one();
    }
}

/// Writes control messages and waiting timing traffic until the control queue closes (or the
/// session must end at once), then says goodbye with the close code set, if any. A ping every
/// `keep_alive` keeps an idle peer answering (browsers answer pings by themselves), so the
/// reader's idle timeout only fires on a lost connection.
async fn write_loop(
    mut sink: SplitSink<WebSocket, Message>,
    mut rx: mpsc::Receiver<Outgoing>,
    outbox: Arc<Outbox>,
    clock: ServerClock,
    keep_alive: Duration,
) {
    let mut ping = tokio::time::interval(keep_alive);
    ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            biased;
            _ = ping.tick() => {
                if !matches!(timeout(WRITE_DEADLINE, sink.send(Message::Ping(Bytes::new()))).await, Ok(Ok(()))) {
                    return;
                }
            }
            message = rx.recv() => {
                let Some(message) = message else { break };
                let frame = match wire::encode_frame(&message) {
                    Ok(frame) => frame,
                    Err(e) => {
                        warn!(error = %e, "control message did not encode; skipped");
                        continue;
                    }
                };
                if !send(&mut sink, ws::control_message(&frame)).await {
                    return;
                }
            }
            () = outbox.wake.notified() => {
                let Waiting { sync, beats, notes, at_once, .. } = outbox.take();
                if at_once {
                    break;
                }
                // Written in this order: sync reply, beats, notes.
                if let Some((request, t1)) = sync {
                    // Stamped here, as late as possible before the write.
                    let sent = match sync_reply(clock, request, t1) {
                        Some(reply) => send(&mut sink, ws::datagram_message(&reply)).await,
                        None => false,
                    };
                    outbox.stats.count_sync_reply(sent);
                    if !sent {
                        return;
                    }
                }
                for datagram in beats.into_iter().chain(notes) {
                    if !send(&mut sink, ws::datagram_message(&datagram)).await {
                        return;
                    }
                }
            }
        }
    }
    let close = outbox.lock().close;
    let frame = close.map(close_frame).unwrap_or(CloseFrame { code: 1000, reason: "".into() });
    let _ = timeout(FLUSH_TIMEOUT, sink.send(Message::Close(Some(frame)))).await;
}

/// Writes one binary message within [`WRITE_DEADLINE`]; false if the socket failed or stalled.
async fn send(sink: &mut SplitSink<WebSocket, Message>, bytes: Vec<u8>) -> bool {
    matches!(timeout(WRITE_DEADLINE, sink.send(Message::Binary(bytes.into()))).await, Ok(Ok(())))
}
