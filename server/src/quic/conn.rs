//! A connection's state as the driver and its sessions share it, and the handles sessions
//! hold: [`Connection`], [`SendStream`], [`RecvStream`].

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};
use std::time::Instant;

use bytes::Bytes;
use quinn_proto::{ConnectionError, ConnectionStats, Dir, StreamEvent, StreamId, VarInt};

use super::{Shared, lock};

/// One connection: its QUIC state and who waits on it, behind one lock.
pub(super) struct ConnShared {
    /// Its handle in the endpoint.
    k: usize,
    remote: SocketAddr,
    /// Handles the sessions hold ([`Connection`] and its streams); the last one dropped closes
    /// the connection.
    handles: AtomicUsize,
    pub(super) state: Mutex<ConnState>,
    shared: Arc<Shared>,
}

impl ConnShared {
    pub(super) fn new(k: usize, remote: SocketAddr, quic: quinn_proto::Connection, shared: Arc<Shared>) -> Self {
        let state = ConnState {
            quic,
            marked: false,
            armed: None,
            stashed: Vec::new(),
            stashed_endpoint: Vec::new(),
            arrived: None,
            answerer: None,
            passed: VecDeque::new(),
            passed_bytes: 0,
            connected: false,
            error: None,
            on_connected: None,
            on_datagram: None,
            on_accept: [None, None],
            on_open_uni: None,
            on_closed: Vec::new(),
            readers: Vec::new(),
            writers: Vec::new(),
        };
        Self { k, remote, handles: AtomicUsize::new(0), state: Mutex::new(state), shared }
    }

    /// Asks the processor to bring the connection's state (its lock and quinn-proto's
    /// connection, which lies inline) into its caches, without waiting for it. Among thousands
    /// of connections the one a packet is for is in none of the caches; the driver asks for
    /// every connection of a batch read before it handles the first packet, so the batch's
    /// connections come from memory side by side rather than one after the other
    /// (BENCHMARKS.md, nineteenth round).
    #[allow(unsafe_code)]
    pub(super) fn prefetch(&self) {
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::x86_64::{_MM_HINT_T0, _mm_prefetch};
            const LINE: usize = 64;
            let start = std::ptr::from_ref(self).cast::<i8>();
            for offset in (0..size_of::<Self>()).step_by(LINE) {
                // SAFETY: every x86-64 processor has SSE, and a prefetch only hints: it reads
                // nothing the program sees and cannot fault, whatever the address.
                unsafe { _mm_prefetch::<_MM_HINT_T0>(start.wrapping_add(offset)) };
            }
        }
    }
}

/// What the driver and the sessions share of a connection.
pub(super) struct ConnState {
    pub(super) quic: quinn_proto::Connection,
    /// Listed to run (by the driver, or in the endpoint's marked list).
    pub(super) marked: bool,
    /// When the driver looks at the connection's timeout next (its armed deadline), if it
    /// will: a session whose change leaves the timeout no sooner need not mark it.
    pub(super) armed: Option<Instant>,
    /// Events a session's change left, for the driver...
    pub(super) stashed: Vec<quinn_proto::Event>,
    /// ...and the connection's events for the endpoint.
    pub(super) stashed_endpoint: Vec<quinn_proto::EndpointEvent>,
    /// When the last batch the driver read with a packet of this connection's reached the
    /// host (the kernel's stamp of its last datagram), if stamped.
    pub(super) arrived: Option<Instant>,
    /// Answers datagrams as the driver takes them, if a session asked ([`Connection::answer_datagrams`]).
    answerer: Option<Arc<dyn Answerer>>,
    /// Datagrams the answerer passed on, for the session to read ([`Connection::read_datagram`]),
    /// oldest first, and their bytes (at most [`PASSED_BYTES`]).
    passed: VecDeque<Bytes>,
    passed_bytes: usize,
    connected: bool,
    /// Why the connection ended, once it has.
    error: Option<ConnectionError>,
    on_connected: Option<Waker>,
    on_datagram: Option<Waker>,
    /// Bidirectional, then unidirectional.
    on_accept: [Option<Waker>; 2],
    on_open_uni: Option<Waker>,
    on_closed: Vec<Waker>,
    /// Who waits to read a stream...
    readers: Vec<(StreamId, Waker)>,
    /// ...and to write one, or for it to be acknowledged or stopped.
    writers: Vec<(StreamId, Waker)>,
}

/// Bytes of datagrams an answerer passed on that a connection keeps for its session; the
/// oldest go first past it, as quinn-proto drops from its own receive buffer (the server's is
/// as large).
pub(super) const PASSED_BYTES: usize = 64 * 1024;

/// What the driver does with a datagram it takes for an [`Answerer`].
#[derive(Debug)]
pub(crate) enum Answer {
    /// Not the answerer's: the session reads it.
    Pass,
    /// Dealt with, nothing to send (e.g. over the session's rate).
    Taken,
    /// Dealt with: this goes back at once.
    Reply(Bytes),
}

/// Answers a connection's datagrams in the driver, as they are taken from their packets,
/// without waking the session: a clock-sync request is answered in the run that read it,
/// in the packet that acknowledges it. It runs under the connection's lock, on the driver's
/// thread, so it only decides: no waiting, no locks a session could hold across the
/// connection's.
pub(crate) trait Answerer: Send + Sync {
    /// What to do with `datagram`, the last packet of whose batch reached the host at
    /// `arrived` (the kernel's stamp), if stamped.
    fn answer(&self, datagram: &Bytes, arrived: Option<Instant>) -> Answer;

    /// The reply it gave last was queued to be sent (`sent`), or refused (the peer takes no
    /// datagrams, or none that large).
    fn replied(&self, sent: bool);
}

/// Wakers collected under a lock, woken once it is released.
#[derive(Default)]
pub(super) struct Wakers(Vec<Waker>);

impl Wakers {
    fn push(&mut self, waker: Option<Waker>) {
        self.0.extend(waker);
    }

    pub(super) fn wake(&mut self) {
        for waker in self.0.drain(..) {
            waker.wake();
        }
    }
}

/// Keeps `slot`'s waker as `cx`'s (cloning only when it changed).
fn register(slot: &mut Option<Waker>, cx: &Context<'_>) {
    if !slot.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
        *slot = Some(cx.waker().clone());
    }
}

/// Keeps `cx`'s waker for stream `id` in `list`.
fn register_for(list: &mut Vec<(StreamId, Waker)>, id: StreamId, cx: &Context<'_>) {
    match list.iter_mut().find(|(s, _)| *s == id) {
        Some((_, waker)) if waker.will_wake(cx.waker()) => {}
        Some((_, waker)) => *waker = cx.waker().clone(),
        None => list.push((id, cx.waker().clone())),
    }
}

/// Takes the waker for stream `id` out of `list`.
fn take_for(list: &mut Vec<(StreamId, Waker)>, id: StreamId) -> Option<Waker> {
    let i = list.iter().position(|(s, _)| *s == id)?;
    Some(list.swap_remove(i).1)
}

fn dir_index(dir: Dir) -> usize {
    match dir {
        Dir::Bi => 0,
        Dir::Uni => 1,
    }
}

impl ConnState {
    /// Wakes whoever waits for what `event` says.
    pub(super) fn on_event(&mut self, event: quinn_proto::Event, wakers: &mut Wakers) {
        use quinn_proto::Event;
        match event {
            Event::Connected => {
                self.connected = true;
                wakers.push(self.on_connected.take());
            }
            Event::ConnectionLost { reason } => self.end(reason, wakers),
            // With an answerer, the datagrams go to it first ([`ConnState::answer`]).
            Event::DatagramReceived if self.answerer.is_some() => {}
            Event::DatagramReceived => wakers.push(self.on_datagram.take()),
            Event::Stream(StreamEvent::Opened { dir }) => wakers.push(self.on_accept[dir_index(dir)].take()),
            Event::Stream(StreamEvent::Available { dir: Dir::Uni }) => wakers.push(self.on_open_uni.take()),
            Event::Stream(StreamEvent::Readable { id }) => wakers.push(take_for(&mut self.readers, id)),
            Event::Stream(
                StreamEvent::Writable { id } | StreamEvent::Finished { id } | StreamEvent::Stopped { id, .. },
            ) => wakers.push(take_for(&mut self.writers, id)),
            Event::Stream(StreamEvent::Available { dir: Dir::Bi })
            | Event::HandshakeDataReady
            | Event::DatagramsUnblocked => {}
        }
    }

    /// The connection ended (`reason`, unless it already had): everyone waiting is woken.
    fn end(&mut self, reason: ConnectionError, wakers: &mut Wakers) {
        if self.error.is_none() {
            self.error = Some(reason);
        }
        wakers.push(self.on_connected.take());
        wakers.push(self.on_datagram.take());
        for slot in &mut self.on_accept {
            wakers.push(slot.take());
        }
        wakers.push(self.on_open_uni.take());
        wakers.0.append(&mut self.on_closed);
        wakers.0.extend(self.readers.drain(..).map(|(_, w)| w));
        wakers.0.extend(self.writers.drain(..).map(|(_, w)| w));
    }

    /// Hands every datagram received to the answerer, if there is one: replies are queued to
    /// go out with the next transmit, and what it passes on is kept for the session (woken).
    pub(super) fn answer(&mut self, wakers: &mut Wakers) {
        let Self { answerer: Some(answerer), quic, arrived, passed, passed_bytes, on_datagram, .. } = self else {
            return;
        };
        let mut woken = false;
        while let Some(datagram) = quic.datagrams().recv() {
            match answerer.answer(&datagram, *arrived) {
                Answer::Pass => {
                    *passed_bytes += datagram.len();
                    passed.push_back(datagram);
                    while *passed_bytes > PASSED_BYTES {
                        let Some(oldest) = passed.pop_front() else { break };
                        *passed_bytes -= oldest.len();
                    }
                    woken = true;
                }
                Answer::Taken => {}
                Answer::Reply(reply) => answerer.replied(quic.datagrams().send(reply, true).is_ok()),
            }
        }
        if woken {
            wakers.push(on_datagram.take());
        }
    }

    /// Lists connection `k` in the driver's `run` unless it is listed already.
    pub(super) fn list(&mut self, k: usize, run: &mut Vec<usize>) {
        if !self.marked {
            self.marked = true;
            run.push(k);
        }
    }

    /// Whether the connection has not ended yet.
    pub(super) fn is_open(&self) -> bool {
        self.error.is_none()
    }

    /// Closes the connection with `code` (this side's close).
    pub(super) fn close(&mut self, now: Instant, code: VarInt, reason: Bytes, wakers: &mut Wakers) {
        self.quic.close(now, code, reason);
        self.end(ConnectionError::LocallyClosed, wakers);
    }

    /// The connection drained: it is gone from the endpoint.
    pub(super) fn drained(&mut self, wakers: &mut Wakers) {
        self.end(ConnectionError::LocallyClosed, wakers);
    }
}

/// A handle on a connection. Clones share it; when the last handle (streams included) is
/// dropped, the connection is closed with code 0.
pub(crate) struct Connection(Arc<ConnShared>);

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection").field("handle", &self.0.k).field("remote", &self.0.remote).finish()
    }
}

/// A connection's datagrams go to an [`Answerer`] first while this lives.
#[derive(Debug)]
pub(crate) struct Answering(Connection);

impl Drop for Answering {
    fn drop(&mut self) {
        self.0.lock().answerer = None;
    }
}

impl Clone for Connection {
    fn clone(&self) -> Self {
        Self::new(self.0.clone())
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        if self.0.handles.fetch_sub(1, Ordering::AcqRel) == 1 {
            let mut wakers = Wakers::default();
            let mut state = self.lock();
            if state.error.is_none() {
                state.close(Instant::now(), VarInt::from_u32(0), Bytes::new(), &mut wakers);
                self.touched(&mut state);
            }
            drop(state);
            wakers.wake();
        }
    }
}

/// Why a datagram was not queued.
#[derive(Debug, thiserror::Error)]
pub(crate) enum SendDatagramError {
    #[error(transparent)]
    Refused(#[from] quinn_proto::SendDatagramError),
    #[error("the connection ended: {0}")]
    Lost(ConnectionError),
}

impl Connection {
    fn new(shared: Arc<ConnShared>) -> Self {
        shared.handles.fetch_add(1, Ordering::AcqRel);
        Self(shared)
    }

    fn lock(&self) -> MutexGuard<'_, ConnState> {
        lock(&self.0.state)
    }

    /// A session changed the connection: what it has to send goes now, from this thread
    /// (several sessions' packets are built and encrypted at once on the runtime's threads,
    /// not one after another in the driver's). The connection is listed for the driver only
    /// if the change left it something: events, events for the endpoint (both kept for it), or
    /// a timeout sooner than the deadline armed. A reply to a clock-sync request leaves none
    /// of these (the acknowledgement it carries stops a timer, the loss timer it starts comes
    /// after the deadline armed for that acknowledgement), so a reply costs the driver nothing.
    fn touched(&self, state: &mut ConnState) {
        self.0.shared.transmit(&mut state.quic);
        if state.marked {
            return;
        }
        while let Some(event) = state.quic.poll() {
            state.stashed.push(event);
        }
        while let Some(event) = state.quic.poll_endpoint_events() {
            state.stashed_endpoint.push(event);
        }
        let sooner = state.quic.poll_timeout().is_some_and(|at| state.armed.is_none_or(|armed| at < armed));
        if sooner || !state.stashed.is_empty() || !state.stashed_endpoint.is_empty() {
            state.marked = true;
            self.0.shared.mark(self.0.k);
        }
    }

    /// The connection's counts and path figures.
    pub(crate) fn stats(&self) -> ConnectionStats {
        self.lock().quic.stats()
    }

    /// When the last batch of packets read with one of this connection's reached the host, if
    /// stamped: every datagram queued for the session arrived no later ([`crate::arrival`]).
    pub(crate) fn arrived(&self) -> Option<Instant> {
        self.lock().arrived
    }

    /// The largest datagram the peer takes now, if it takes any.
    pub(crate) fn max_datagram_size(&self) -> Option<usize> {
        self.lock().quic.datagrams().max_size()
    }

    /// Queues a datagram (dropping the oldest queued if the send buffer is full).
    pub(crate) fn send_datagram(&self, data: Bytes) -> Result<(), SendDatagramError> {
        let mut state = self.lock();
        if let Some(e) = &state.error {
            return Err(SendDatagramError::Lost(e.clone()));
        }
        state.quic.datagrams().send(data, true)?;
        self.touched(&mut state);
        Ok(())
    }

    /// Has the driver hand this connection's datagrams to `answerer` first, until the guard
    /// returned is dropped. What it passes on, [`Connection::read_datagram`] reads in order.
    pub(crate) fn answer_datagrams(&self, answerer: Arc<dyn Answerer>) -> Answering {
        // Datagrams already received wait for the session, or for the next run to take them,
        // which takes them all in order.
        self.lock().answerer = Some(answerer);
        Answering(self.clone())
    }

    /// The next datagram the peer sent.
    pub(crate) async fn read_datagram(&self) -> Result<Bytes, ConnectionError> {
        std::future::poll_fn(|cx| {
            let mut state = self.lock();
            // Those the answerer passed on came before any it has not taken yet.
            if let Some(datagram) = state.passed.pop_front() {
                state.passed_bytes -= datagram.len();
                return Poll::Ready(Ok(datagram));
            }
            if let Some(datagram) = state.quic.datagrams().recv() {
                return Poll::Ready(Ok(datagram));
            }
            if let Some(e) = &state.error {
                return Poll::Ready(Err(e.clone()));
            }
            register(&mut state.on_datagram, cx);
            Poll::Pending
        })
        .await
    }

    fn poll_accept(&self, cx: &Context<'_>, dir: Dir) -> Poll<Result<StreamId, ConnectionError>> {
        let mut state = self.lock();
        if let Some(id) = state.quic.streams().accept(dir) {
            // Taking a stream may give the peer credit for another.
            self.touched(&mut state);
            return Poll::Ready(Ok(id));
        }
        if let Some(e) = &state.error {
            return Poll::Ready(Err(e.clone()));
        }
        register(&mut state.on_accept[dir_index(dir)], cx);
        Poll::Pending
    }

    /// The next bidirectional stream the peer opened. One task at a time waits for one.
    pub(crate) async fn accept_bi(&self) -> Result<(SendStream, RecvStream), ConnectionError> {
        let id = std::future::poll_fn(|cx| self.poll_accept(cx, Dir::Bi)).await?;
        Ok((SendStream::new(self.clone(), id), RecvStream::new(self.clone(), id)))
    }

    /// The next unidirectional stream the peer opened. One task at a time waits for one.
    pub(crate) async fn accept_uni(&self) -> Result<RecvStream, ConnectionError> {
        let id = std::future::poll_fn(|cx| self.poll_accept(cx, Dir::Uni)).await?;
        Ok(RecvStream::new(self.clone(), id))
    }

    /// Opens a unidirectional stream, once the peer allows one more.
    pub(crate) async fn open_uni(&self) -> Result<SendStream, ConnectionError> {
        let id = std::future::poll_fn(|cx| {
            let mut state = self.lock();
            if let Some(e) = &state.error {
                return Poll::Ready(Err(e.clone()));
            }
            if let Some(id) = state.quic.streams().open(Dir::Uni) {
                return Poll::Ready(Ok(id));
            }
            register(&mut state.on_open_uni, cx);
            Poll::Pending
        })
        .await?;
        Ok(SendStream::new(self.clone(), id))
    }

    /// Closes the connection with `code` and `reason` (a connection already ended stays as
    /// it is).
    pub(crate) fn close(&self, code: VarInt, reason: &[u8]) {
        let mut wakers = Wakers::default();
        let mut state = self.lock();
        if state.error.is_none() {
            state.close(Instant::now(), code, Bytes::copy_from_slice(reason), &mut wakers);
            self.touched(&mut state);
        }
        drop(state);
        wakers.wake();
    }

    /// Why the connection ended, once it has.
    pub(crate) async fn closed(&self) -> ConnectionError {
        std::future::poll_fn(|cx| {
            let mut state = self.lock();
            if let Some(e) = &state.error {
                return Poll::Ready(e.clone());
            }
            if !state.on_closed.iter().any(|w| w.will_wake(cx.waker())) {
                state.on_closed.push(cx.waker().clone());
            }
            Poll::Pending
        })
        .await
    }
}

/// A connection being established.
#[derive(Debug)]
pub(crate) struct Connecting(Connection);

impl Connecting {
    pub(super) fn new(shared: Arc<ConnShared>) -> Self {
        Self(Connection::new(shared))
    }

    /// The connection, once its handshake is done.
    pub(crate) async fn established(self) -> Result<Connection, ConnectionError> {
        std::future::poll_fn(|cx| {
            let mut state = self.0.lock();
            if let Some(e) = &state.error {
                return Poll::Ready(Err(e.clone()));
            }
            if state.connected {
                return Poll::Ready(Ok(()));
            }
            register(&mut state.on_connected, cx);
            Poll::Pending
        })
        .await?;
        Ok(self.0)
    }
}

/// Why a stream could not be written.
#[derive(Debug, thiserror::Error)]
pub(crate) enum WriteError {
    #[error("the peer stopped the stream: code {0}")]
    Stopped(VarInt),
    #[error("the stream is closed")]
    ClosedStream,
    #[error("the connection ended: {0}")]
    ConnectionLost(ConnectionError),
}

/// Why a stream could not be read.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ReadError {
    #[error("the peer reset the stream: code {0}")]
    Reset(VarInt),
    #[error("the stream ended early")]
    FinishedEarly,
    #[error("the stream is closed")]
    ClosedStream,
    #[error("the connection ended: {0}")]
    ConnectionLost(ConnectionError),
}

/// The sending side of a stream. Dropped unfinished, it is finished.
#[derive(Debug)]
pub(crate) struct SendStream {
    conn: Connection,
    id: StreamId,
    /// Finished or reset.
    done: bool,
}

impl SendStream {
    fn new(conn: Connection, id: StreamId) -> Self {
        Self { conn, id, done: false }
    }

    /// Writes all of `bytes`, waiting for flow control as needed. Cancelled, what was written
    /// stays written.
    pub(crate) async fn write_all(&mut self, mut bytes: &[u8]) -> Result<(), WriteError> {
        while !bytes.is_empty() {
            let n = std::future::poll_fn(|cx| self.poll_write(cx, bytes)).await?;
            bytes = &bytes[n..];
        }
        Ok(())
    }

    fn poll_write(&self, cx: &Context<'_>, bytes: &[u8]) -> Poll<Result<usize, WriteError>> {
        let mut state = self.conn.lock();
        if let Some(e) = &state.error {
            return Poll::Ready(Err(WriteError::ConnectionLost(e.clone())));
        }
        match state.quic.send_stream(self.id).write(bytes) {
            Ok(n) => {
                self.conn.touched(&mut state);
                Poll::Ready(Ok(n))
            }
            Err(quinn_proto::WriteError::Blocked) => {
                register_for(&mut state.writers, self.id, cx);
                Poll::Pending
            }
            Err(quinn_proto::WriteError::Stopped(code)) => Poll::Ready(Err(WriteError::Stopped(code))),
            Err(quinn_proto::WriteError::ClosedStream) => Poll::Ready(Err(WriteError::ClosedStream)),
        }
    }

    /// Ends the stream after what was written.
    pub(crate) fn finish(&mut self) -> Result<(), WriteError> {
        let mut state = self.conn.lock();
        let finished = state.quic.send_stream(self.id).finish();
        self.done = true;
        self.conn.touched(&mut state);
        match finished {
            Ok(()) => Ok(()),
            Err(quinn_proto::FinishError::Stopped(code)) => Err(WriteError::Stopped(code)),
            Err(quinn_proto::FinishError::ClosedStream) => Err(WriteError::ClosedStream),
        }
    }

    /// Abandons the stream with `code`.
    pub(crate) fn reset(&mut self, code: VarInt) -> Result<(), WriteError> {
        let mut state = self.conn.lock();
        let reset = state.quic.send_stream(self.id).reset(code);
        self.done = true;
        self.conn.touched(&mut state);
        reset.map_err(|_| WriteError::ClosedStream)
    }

    /// Waits until the peer acknowledged everything on the finished stream (`None`), or
    /// stopped it (its code).
    pub(crate) async fn stopped(&mut self) -> Result<Option<VarInt>, ConnectionError> {
        std::future::poll_fn(|cx| {
            let mut state = self.conn.lock();
            match state.quic.send_stream(self.id).stopped() {
                // Gone: finished and acknowledged (or reset).
                Err(_) => Poll::Ready(Ok(None)),
                Ok(Some(code)) => Poll::Ready(Ok(Some(code))),
                Ok(None) => {
                    if let Some(e) = &state.error {
                        return Poll::Ready(Err(e.clone()));
                    }
                    register_for(&mut state.writers, self.id, cx);
                    Poll::Pending
                }
            }
        })
        .await
    }
}

impl Drop for SendStream {
    fn drop(&mut self) {
        let mut state = self.conn.lock();
        let _ = take_for(&mut state.writers, self.id);
        if !self.done && state.error.is_none() {
            let _ = state.quic.send_stream(self.id).finish();
            self.conn.touched(&mut state);
        }
    }
}

/// The receiving side of a stream. Dropped before its end, it is stopped (code 0).
#[derive(Debug)]
pub(crate) struct RecvStream {
    conn: Connection,
    id: StreamId,
    /// Read to its end, reset or stopped.
    done: bool,
}

impl RecvStream {
    fn new(conn: Connection, id: StreamId) -> Self {
        Self { conn, id, done: false }
    }

    /// The stream's id.
    pub(crate) fn id(&self) -> StreamId {
        self.id
    }

    /// Reads the next bytes in order, at most `max`; `None` at the stream's end.
    pub(crate) async fn read_chunk(&mut self, max: usize) -> Result<Option<Bytes>, ReadError> {
        std::future::poll_fn(|cx| self.poll_read(cx, max)).await
    }

    /// Fills `buf` from the stream.
    pub(crate) async fn read_exact(&mut self, buf: &mut [u8]) -> Result<(), ReadError> {
        let mut filled = 0;
        while filled < buf.len() {
            let max = buf.len() - filled;
            match std::future::poll_fn(|cx| self.poll_read(cx, max)).await? {
                Some(chunk) => {
                    buf[filled..filled + chunk.len()].copy_from_slice(&chunk);
                    filled += chunk.len();
                }
                None => return Err(ReadError::FinishedEarly),
            }
        }
        Ok(())
    }

    fn poll_read(&mut self, cx: &Context<'_>, max: usize) -> Poll<Result<Option<Bytes>, ReadError>> {
        let mut state = self.conn.lock();
        let (result, should_transmit) = {
            let mut recv = state.quic.recv_stream(self.id);
            let Ok(mut chunks) = recv.read(true) else { return Poll::Ready(Err(ReadError::ClosedStream)) };
            let result = chunks.next(max);
            (result, chunks.finalize().should_transmit())
        };
        if should_transmit {
            // Reading gave the peer flow-control credit.
            self.conn.touched(&mut state);
        }
        match result {
            Ok(Some(chunk)) => Poll::Ready(Ok(Some(chunk.bytes))),
            Ok(None) => {
                self.done = true;
                Poll::Ready(Ok(None))
            }
            Err(quinn_proto::ReadError::Reset(code)) => {
                self.done = true;
                Poll::Ready(Err(ReadError::Reset(code)))
            }
            Err(quinn_proto::ReadError::Blocked) => {
                if let Some(e) = &state.error {
                    return Poll::Ready(Err(ReadError::ConnectionLost(e.clone())));
                }
                register_for(&mut state.readers, self.id, cx);
                Poll::Pending
            }
        }
    }

    /// Tells the peer to stop sending on the stream, with `code`.
    pub(crate) fn stop(&mut self, code: VarInt) -> Result<(), ReadError> {
        let mut state = self.conn.lock();
        let stopped = state.quic.recv_stream(self.id).stop(code);
        self.done = true;
        self.conn.touched(&mut state);
        stopped.map_err(|_| ReadError::ClosedStream)
    }
}

impl Drop for RecvStream {
    fn drop(&mut self) {
        let mut state = self.conn.lock();
        let _ = take_for(&mut state.readers, self.id);
        if !self.done && state.error.is_none() {
            let _ = state.quic.recv_stream(self.id).stop(VarInt::from_u32(0));
            self.conn.touched(&mut state);
        }
    }
}
