//! QUIC on quinn-proto: one task for the socket and every connection on it.
//!
//! quinn (the async crate) runs a task per connection and hands it each packet through an
//! unbounded channel: a packet woke the endpoint's task, then the connection's, then the
//! session's, and every connection carried the channel's blocks (14 KiB), its task and a timer
//! of the runtime's. A profile of 20,000 settled sessions put 42 % of the server's time in the
//! connection tasks and 19 % in the endpoint's (BENCHMARKS.md, thirteenth round).
//!
//! Here one task, the driver, owns the socket and the QUIC endpoint. Each time it wakes it
//! reads the socket in batches (GRO) and hands each packet to its connection's state in place
//! (a batch's connections are asked from memory together first: [`ConnShared::prefetch`]),
//! runs the connections whose timers are due and those the sessions changed, and sends what
//! each has, several packets to a peer in one system call (GSO). Sessions reach their
//! connection through a [`Connection`]: a handle on its state behind a lock. What the driver
//! finds for a session (a datagram, stream data, a new stream, the end) wakes the one task
//! waiting for it. What a session changes (a datagram queued, a stream written or read, a
//! close) is sent at once from the session's own thread, so packets are built and encrypted
//! on all the runtime's threads and a reply does not wait for the driver's next round. The
//! connection is marked for the driver only if the change left it work: events, events for
//! the endpoint, or a timeout sooner than the deadline armed in the driver's timers
//! ([`timers`]). A reply a session sends leaves none.
//!
//! A datagram that only asks for an answer need not wake its session at all. A session may
//! give its connection an [`Answerer`] ([`Connection::answer_datagrams`]): the driver hands it
//! each datagram as it takes them from quinn-proto, and sends its reply in the same run, in the
//! packet that acknowledges the request; what it passes on the session reads as before. A
//! clock-sync exchange then costs the server one run of the connection and no task wake-up
//! (about a tenth of a loaded server's CPU, BENCHMARKS.md, fifteenth round).
//!
//! The API is the part of quinn's the server uses, with quinn's meanings: [`Endpoint::accept`]
//! gives [`Incoming`] connections to accept, refuse or retry; a [`Connection`] has datagrams
//! and streams; a stream dropped unfinished is finished (sending) or stopped (receiving); a
//! connection whose last handle is dropped is closed.
//!
//! Lock order: the endpoint's core, then one connection, then the list of marked
//! connections (or, in an answerer, the locks it alone takes). A session never holds a
//! connection while it takes the core.

mod conn;
#[cfg(test)]
mod tests;
mod timers;

use std::collections::VecDeque;
use std::io::IoSliceMut;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Poll, Waker};
use std::time::Instant;

use bytes::{Bytes, BytesMut};
use quinn_proto::{ConnectionHandle, DatagramEvent, EndpointConfig, ServerConfig};
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;
use tokio::sync::{Notify, watch};
use tracing::{debug, warn};

pub(crate) use self::conn::{Answer, Answerer, Answering, Connecting, Connection, RecvStream, SendStream};
use self::conn::{ConnShared, Wakers};
use self::timers::Timers;
use crate::arrival::Arrivals;
use crate::stats::Stats;
pub(crate) use quinn_proto::{ConnectionError, VarInt};

/// Incoming connections waiting for [`Endpoint::accept`] past which more are refused: the
/// accept loop takes them as fast as they come, so a queue this long means it cannot.
const MAX_WAITING: usize = 1024;
/// Socket reads (each a batch) one wake of the driver does at most before it runs the
/// connections: a flood of packets cannot hold back timers and sends.
const RECV_ROUNDS: usize = 8;
/// The largest datagram read (with GRO, several packets of one peer in one buffer).
const RECV_BUFFER_BYTES: usize = 64 * 1024;

/// A QUIC endpoint serving on one UDP socket, driven by one task. Dropping it closes every
/// connection (code 0).
#[derive(Debug)]
pub(crate) struct Endpoint {
    shared: Arc<Shared>,
}

/// What the endpoint's handle, its connections and its driver share.
struct Shared {
    core: Mutex<Core>,
    /// Connections the sessions changed since the driver last ran them.
    marked: Mutex<Vec<usize>>,
    /// Wakes the driver: connections were marked, or the endpoint is closing.
    wake_driver: Notify,
    accepting: Mutex<Accepting>,
    /// Connections open (handshaking or established, not yet drained).
    open: watch::Sender<usize>,
    /// Registered for reading only ([`register_for_reading`]).
    socket: AsyncFd<std::net::UdpSocket>,
    udp: quinn_udp::UdpSocketState,
    /// When the datagrams read from the socket reached the host.
    arrivals: Arrivals,
    /// Where the driver reports how long datagrams waited in the socket.
    stats: Arc<Stats>,
    /// Times a session's change marked a connection.
    #[cfg(test)]
    marks: std::sync::atomic::AtomicUsize,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("socket", self.socket.get_ref())
            .field("open", &*self.open.borrow())
            .finish_non_exhaustive()
    }
}

/// The driver's state, which accepting a connection also needs.
struct Core {
    endpoint: quinn_proto::Endpoint,
    /// By connection handle.
    conns: Vec<Option<Arc<ConnShared>>>,
    /// When each connection wants to run next.
    timers: Timers,
    /// Connections whose deadline came up, being looked at.
    due: Vec<usize>,
    /// Connections to run before the driver sleeps again.
    run: Vec<usize>,
    /// The endpoint's own packets (refusals, Retry, stateless answers).
    transmit: Vec<u8>,
    /// Once closing: every connection closed, new ones refused.
    closing: bool,
    /// Once the endpoint's handle is gone: the driver ends when the last connection has
    /// drained.
    dropped: bool,
}

/// Incoming connections not yet taken by [`Endpoint::accept`].
struct Accepting {
    waiting: VecDeque<quinn_proto::Incoming>,
    waker: Option<Waker>,
    closed: bool,
}

/// Locks `m`; a panic while it was held leaves state quinn-proto keeps consistent itself.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Endpoint {
    /// Serves QUIC with `server` on `socket` (non-blocking, bound), from a driver task spawned
    /// on the current runtime, which reports into `stats`.
    pub(crate) fn new(
        config: EndpointConfig,
        server: ServerConfig,
        socket: std::net::UdpSocket,
        stats: Arc<Stats>,
    ) -> std::io::Result<Self> {
        let arrivals = Arrivals::of(&socket);
        let udp = quinn_udp::UdpSocketState::new((&socket).into())?;
        let socket = register_for_reading(socket)?;
        let endpoint = quinn_proto::Endpoint::new(Arc::new(config), Some(Arc::new(server)), !udp.may_fragment(), None);
        let core = Core {
            endpoint,
            conns: Vec::new(),
            timers: Timers::new(Instant::now()),
            due: Vec::new(),
            run: Vec::new(),
            transmit: Vec::new(),
            closing: false,
            dropped: false,
        };
        let shared = Arc::new(Shared {
            core: Mutex::new(core),
            marked: Mutex::new(Vec::new()),
            wake_driver: Notify::new(),
            accepting: Mutex::new(Accepting { waiting: VecDeque::new(), waker: None, closed: false }),
            open: watch::Sender::new(0),
            socket,
            udp,
            arrivals,
            stats,
            #[cfg(test)]
            marks: std::sync::atomic::AtomicUsize::new(0),
        });
        tokio::spawn(drive(shared.clone()));
        Ok(Self { shared })
    }

    /// The socket's address.
    pub(crate) fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.shared.socket.get_ref().local_addr()
    }

    /// New handshakes use `server` from now on; connections keep theirs.
    pub(crate) fn set_server_config(&self, server: ServerConfig) {
        lock(&self.shared.core).endpoint.set_server_config(Some(Arc::new(server)));
    }

    /// The next connection a peer started, or `None` once the endpoint is closed.
    pub(crate) async fn accept(&self) -> Option<Incoming> {
        std::future::poll_fn(|cx| {
            let mut accepting = lock(&self.shared.accepting);
            if let Some(incoming) = accepting.waiting.pop_front() {
                return Poll::Ready(Some(Incoming { inner: Some(incoming), shared: self.shared.clone() }));
            }
            if accepting.closed {
                return Poll::Ready(None);
            }
            if !accepting.waker.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                accepting.waker = Some(cx.waker().clone());
            }
            Poll::Pending
        })
        .await
    }

    /// Closes every connection with `code` and `reason` and refuses new ones (see
    /// [`Endpoint::wait_idle`]).
    pub(crate) fn close(&self, code: VarInt, reason: &[u8]) {
        self.shared.close(code, reason);
    }

    /// Waits until every connection has drained.
    pub(crate) async fn wait_idle(&self) {
        let mut open = self.shared.open.subscribe();
        let _ = open.wait_for(|&n| n == 0).await;
    }
}

impl Drop for Endpoint {
    fn drop(&mut self) {
        lock(&self.shared.core).dropped = true;
        self.shared.close(VarInt::from_u32(0), b"");
        self.shared.wake_driver.notify_one();
    }
}

impl Shared {
    /// Marks connection `k` for the driver (a session changed it).
    fn mark(&self, k: usize) {
        #[cfg(test)]
        self.marks.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        lock(&self.marked).push(k);
        self.wake_driver.notify_one();
    }

    fn close(&self, code: VarInt, reason: &[u8]) {
        let mut guard = lock(&self.core);
        let core = &mut *guard;
        if core.closing {
            return;
        }
        core.closing = true;
        let waiting = {
            let mut accepting = lock(&self.accepting);
            accepting.closed = true;
            if let Some(waker) = accepting.waker.take() {
                waker.wake();
            }
            std::mem::take(&mut accepting.waiting)
        };
        for incoming in waiting {
            core.refuse(self, incoming);
        }
        let now = Instant::now();
        let reason = Bytes::copy_from_slice(reason);
        let mut wakers = Wakers::default();
        for (k, conn) in core.conns.iter().enumerate() {
            let Some(conn) = conn else { continue };
            let mut state = lock(&conn.state);
            if state.is_open() {
                state.close(now, code, reason.clone(), &mut wakers);
            }
            state.list(k, &mut core.run);
        }
        drop(guard);
        wakers.wake();
        self.wake_driver.notify_one();
    }

    /// Sends what `quic` has to send now, from this thread's buffer.
    fn transmit(&self, quic: &mut quinn_proto::Connection) {
        thread_local! {
            static BUFFER: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
        }
        BUFFER.with_borrow_mut(|buffer| {
            let now = Instant::now();
            let max_segments = self.udp.max_gso_segments();
            loop {
                buffer.clear();
                let Some(transmit) = quic.poll_transmit(now, max_segments, buffer) else { break };
                self.send(&transmit, buffer);
            }
        });
    }

    /// Sends one transmit (several packets to one peer with GSO). A full socket drops it:
    /// QUIC recovers as from any loss.
    fn send(&self, transmit: &quinn_proto::Transmit, contents: &[u8]) {
        if let Err(e) = send_transmit(self.socket.get_ref(), &self.udp, transmit, contents) {
            debug!(error = %e, destination = %transmit.destination, "a QUIC packet was not sent");
        }
    }
}

/// A connection a peer started, not yet accepted. Dropping it refuses it.
pub(crate) struct Incoming {
    /// Until accepted, refused or retried.
    inner: Option<quinn_proto::Incoming>,
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Incoming {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Incoming").field("remote", &self.inner.as_ref().map(|i| i.remote_address())).finish()
    }
}

impl Incoming {
    fn take(&mut self) -> quinn_proto::Incoming {
        self.inner.take().expect("an incoming connection is answered once")
    }

    /// The peer's address.
    pub(crate) fn remote_address(&self) -> SocketAddr {
        self.inner.as_ref().map_or_else(|| SocketAddr::from(([0, 0, 0, 0], 0)), |i| i.remote_address())
    }

    /// Whether the peer proved its address (it came back with a Retry's token).
    pub(crate) fn remote_address_validated(&self) -> bool {
        self.inner.as_ref().is_some_and(quinn_proto::Incoming::remote_address_validated)
    }

    /// Starts the handshake: the connection, once it is established.
    pub(crate) fn accept(mut self) -> Result<Connecting, ConnectionError> {
        let incoming = self.take();
        let remote = incoming.remote_address();
        let mut core = lock(&self.shared.core);
        let core = &mut *core;
        if core.closing {
            core.refuse(&self.shared, incoming);
            return Err(ConnectionError::LocallyClosed);
        }
        core.transmit.clear();
        match core.endpoint.accept(incoming, Instant::now(), &mut core.transmit, None) {
            Ok((handle, quic)) => {
                let k = handle.0;
                let conn = Arc::new(ConnShared::new(k, remote, quic, self.shared.clone()));
                if core.conns.len() <= k {
                    core.conns.resize_with(k + 1, || None);
                }
                core.conns[k] = Some(conn.clone());
                self.shared.open.send_modify(|n| *n += 1);
                lock(&conn.state).list(k, &mut core.run);
                self.shared.wake_driver.notify_one();
                Ok(Connecting::new(conn))
            }
            Err(e) => {
                if let Some(transmit) = e.response {
                    self.shared.send(&transmit, &core.transmit);
                }
                Err(e.cause)
            }
        }
    }

    /// Refuses the connection (one packet, nothing kept).
    pub(crate) fn refuse(mut self) {
        let incoming = self.take();
        self.shared.refuse(incoming);
    }

    /// Asks the peer to prove its address first (a stateless Retry: one packet, nothing kept).
    /// A peer that already did is refused instead.
    pub(crate) fn retry(mut self) {
        let incoming = self.take();
        let mut core = lock(&self.shared.core);
        let core = &mut *core;
        core.transmit.clear();
        match core.endpoint.retry(incoming, &mut core.transmit) {
            Ok(transmit) => self.shared.send(&transmit, &core.transmit),
            Err(e) => core.refuse(&self.shared, e.into_incoming()),
        }
    }
}

impl Shared {
    fn refuse(&self, incoming: quinn_proto::Incoming) {
        lock(&self.core).refuse(self, incoming);
    }
}

impl Core {
    /// Refuses `incoming` (one packet, nothing kept).
    fn refuse(&mut self, shared: &Shared, incoming: quinn_proto::Incoming) {
        self.transmit.clear();
        let transmit = self.endpoint.refuse(incoming, &mut self.transmit);
        shared.send(&transmit, &self.transmit);
    }
}

impl Drop for Incoming {
    fn drop(&mut self) {
        if let Some(incoming) = self.inner.take() {
            self.shared.refuse(incoming);
        }
    }
}

/// The driver: see the module's documentation. Ends when the endpoint's handle is gone and
/// its last connection has drained; until then a closed endpoint refuses new connections.
async fn drive(shared: Arc<Shared>) {
    let mut buffers = vec![vec![0u8; RECV_BUFFER_BYTES]; quinn_udp::BATCH_SIZE];
    let mut metas = vec![quinn_udp::RecvMeta::default(); quinn_udp::BATCH_SIZE];
    let mut events = Vec::new();
    let mut wakers = Wakers::default();
    // The marked list is swapped with this one, so neither allocates once both have grown.
    let mut marked = Vec::new();
    loop {
        let next = {
            let core = lock(&shared.core);
            if core.dropped && core.conns.iter().all(Option::is_none) {
                return;
            }
            core.timers.next()
        };
        let sleep = async {
            match next {
                Some(at) => tokio::time::sleep_until(at.into()).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = shared.socket.readable() => {}
            () = shared.wake_driver.notified() => {}
            () = sleep => {}
        }
        let mut core = lock(&shared.core);
        let core = &mut *core;
        // Whatever woke the driver, the socket is read: sessions marking connections as fast
        // as they are woken must not keep it from the packets (a read finds the socket not
        // ready without a system call).
        receive(&shared, core, &mut buffers, &mut metas, &mut events);
        let now = Instant::now();
        // Taken out while the connections are looked at, and put back to keep its capacity.
        let mut due = std::mem::take(&mut core.due);
        core.timers.expire(now, &mut due);
        for (i, &k) in due.iter().enumerate() {
            prefetch(&core.conns, due.get(i + 1));
            let Some(conn) = core.conns.get(k).and_then(Option::as_ref) else { continue };
            let mut state = lock(&conn.state);
            state.armed = None;
            match state.quic.poll_timeout() {
                // Moved later since it was armed (a packet came or went): armed again, not run.
                Some(at) if at > now => state.armed = Some(core.timers.arm(k, at)),
                None => {}
                Some(_) => {
                    state.quic.handle_timeout(now);
                    state.list(k, &mut core.run);
                }
            }
        }
        due.clear();
        core.due = due;
        std::mem::swap(&mut *lock(&shared.marked), &mut marked);
        core.run.append(&mut marked);
        while let Some(k) = core.run.pop() {
            prefetch(&core.conns, core.run.last());
            run(&shared, core, k, &mut wakers);
            // Now, not after the rest: the session runs on another thread meanwhile.
            wakers.wake();
        }
    }
}

/// Prefetches connection `next` ([`ConnShared::prefetch`]), the one the driver looks at after
/// the current one, if there is one and the endpoint still has it.
fn prefetch(conns: &[Option<Arc<ConnShared>>], next: Option<&usize>) {
    if let Some(conn) = next.and_then(|&k| conns.get(k)).and_then(Option::as_ref) {
        conn.prefetch();
    }
}

/// Reads what the socket has (at most [`RECV_ROUNDS`] batches) and hands every packet to its
/// connection (marked to run), or to the accept queue.
///
/// A batch is routed first and handled after: the endpoint names each packet's connection,
/// whose state is prefetched ([`ConnShared::prefetch`]) while the next packets are routed,
/// and only then does each connection take its packets, in the order they came. `events` is
/// the driver's, to keep its capacity.
fn receive(
    shared: &Shared,
    core: &mut Core,
    buffers: &mut [Vec<u8>],
    metas: &mut [quinn_udp::RecvMeta],
    events: &mut Vec<(usize, quinn_proto::ConnectionEvent)>,
) {
    let mut slices: Vec<IoSliceMut<'_>> = buffers.iter_mut().map(|b| IoSliceMut::new(b)).collect();
    for _ in 0..RECV_ROUNDS {
        let received = {
            let (socket, udp) = (&shared.socket, &shared.udp);
            socket.try_io(Interest::READABLE, |socket| udp.recv(socket.into(), &mut slices, metas))
        };
        // `WouldBlock` (the socket is empty) clears the readiness the driver waits on.
        let n = match received {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return,
            Err(e) => {
                // An ICMP error for an earlier send, on some systems: nothing to do but go on.
                debug!(error = %e, "reading the QUIC socket failed");
                continue;
            }
        };
        let now = Instant::now();
        // The batch's last datagram reached the host then, the others before.
        let arrived = shared.arrivals.last_read(shared.socket.get_ref(), now);
        if let Some(arrived) = arrived {
            let waited = now.saturating_duration_since(arrived).as_micros();
            shared.stats.quic_receive_wait.observe_micros(u32::try_from(waited).unwrap_or(u32::MAX));
        }
        for (meta, buffer) in metas.iter().zip(slices.iter()).take(n) {
            for packet in buffer[..meta.len].chunks(meta.stride.max(1)) {
                let ecn = meta.ecn.and_then(|e| quinn_proto::EcnCodepoint::from_bits(e as u8));
                let data = BytesMut::from(packet);
                core.transmit.clear();
                match core.endpoint.handle(now, meta.addr, meta.dst_ip, ecn, data, &mut core.transmit) {
                    Some(DatagramEvent::ConnectionEvent(handle, event)) => {
                        if let Some(conn) = core.conns.get(handle.0).and_then(Option::as_ref) {
                            conn.prefetch();
                            events.push((handle.0, event));
                        }
                    }
                    Some(DatagramEvent::NewConnection(incoming)) => {
                        let mut accepting = lock(&shared.accepting);
                        if accepting.closed || accepting.waiting.len() >= MAX_WAITING {
                            drop(accepting);
                            if !core.closing {
                                warn!("the accept queue is full; refusing a connection");
                            }
                            core.refuse(shared, incoming);
                        } else {
                            accepting.waiting.push_back(incoming);
                            if let Some(waker) = accepting.waker.take() {
                                waker.wake();
                            }
                        }
                    }
                    Some(DatagramEvent::Response(transmit)) => shared.send(&transmit, &core.transmit),
                    None => {}
                }
            }
        }
        // Connections leave `conns` only in `run`, after this.
        for (k, event) in events.drain(..) {
            if let Some(conn) = core.conns.get(k).and_then(Option::as_ref) {
                let mut state = lock(&conn.state);
                state.arrived = arrived;
                state.quic.handle_event(event);
                state.list(k, &mut core.run);
            }
        }
    }
}

/// Runs connection `k`: its events (waking the sessions waiting for them), its packets out,
/// its endpoint events, its next timer; a drained connection is removed.
fn run(shared: &Shared, core: &mut Core, k: usize, wakers: &mut Wakers) {
    let Some(conn) = core.conns.get(k).and_then(Option::clone) else { return };
    let mut state = lock(&conn.state);
    state.marked = false;
    // What a session's change left first, in the order it came.
    for event in std::mem::take(&mut state.stashed) {
        state.on_event(event, wakers);
    }
    loop {
        while let Some(event) = state.quic.poll() {
            state.on_event(event, wakers);
        }
        state.answer(wakers);
        shared.transmit(&mut state.quic);
        let stashed = std::mem::take(&mut state.stashed_endpoint);
        match exchange(&mut core.endpoint, ConnectionHandle(k), &mut state.quic, stashed) {
            Exchanged::Drained => {
                state.drained(wakers);
                drop(state);
                core.conns[k] = None;
                core.timers.disarm(k);
                shared.open.send_modify(|n| *n = n.saturating_sub(1));
                return;
            }
            Exchanged::More => {}
            Exchanged::Nothing => break,
        }
    }
    if let Some(next) = state.quic.poll_timeout() {
        state.armed = Some(core.timers.arm(k, next));
    }
}

/// What [`exchange_endpoint_events`] found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Exchanged {
    /// The endpoint answered nothing: the connection has no new work from it.
    Nothing,
    /// The endpoint answered (new connection ids): the connection may have more to do.
    More,
    /// The connection has drained: the endpoint forgot it, and so should its driver.
    Drained,
}

/// Hands `conn`'s events for its endpoint (connection ids, its end) to `endpoint`, and the
/// endpoint's answers back to `conn`. Every sans-IO QUIC driver does this after running a
/// connection: the server's, and the benchmark's load generator.
pub fn exchange_endpoint_events(
    endpoint: &mut quinn_proto::Endpoint,
    handle: ConnectionHandle,
    conn: &mut quinn_proto::Connection,
) -> Exchanged {
    exchange(endpoint, handle, conn, Vec::new())
}

/// [`exchange_endpoint_events`], `earlier` events (taken from `conn` before) first.
fn exchange(
    endpoint: &mut quinn_proto::Endpoint,
    handle: ConnectionHandle,
    conn: &mut quinn_proto::Connection,
    earlier: Vec<quinn_proto::EndpointEvent>,
) -> Exchanged {
    let mut more = false;
    let mut earlier = earlier.into_iter();
    while let Some(event) = earlier.next().or_else(|| conn.poll_endpoint_events()) {
        let drained = event.is_drained();
        if let Some(event) = endpoint.handle_event(handle, event) {
            conn.handle_event(event);
            more = true;
        }
        if drained {
            return Exchanged::Drained;
        }
    }
    if more { Exchanged::More } else { Exchanged::Nothing }
}

/// `socket` (non-blocking, bound) registered with the current runtime for reading only, for a
/// QUIC driver that reads it in batches and sends on it without waiting
/// ([`send_transmit`]).
///
/// A tokio `UdpSocket` registers for writing too. Each packet the socket sent frees its
/// buffer once it is out (over loopback, once the peer has read it), and the kernel then tells
/// whoever polls the socket that it can write: a runtime thread asleep in `epoll_wait` wakes
/// for it, with nothing to do (BENCHMARKS.md, sixteenth round). A driver never waits to write
/// (a full socket drops the packet, and QUIC recovers), so it asks only to hear that there is
/// something to read.
#[allow(unsafe_code)]
pub fn register_for_reading(socket: std::net::UdpSocket) -> std::io::Result<AsyncFd<std::net::UdpSocket>> {
    // SAFETY: the descriptor is the socket's own: open, and the same, for as long as the
    // `AsyncFd` owns the socket.
    unsafe { AsyncFd::register_with_interest(socket, Interest::READABLE) }.map_err(|e| e.into_parts().1)
}

/// Sends what quinn-proto built into `contents` for `transmit` (several packets to one peer
/// with GSO) on `socket`, without waiting: a full socket is an error (`WouldBlock`).
pub fn send_transmit(
    socket: &std::net::UdpSocket,
    udp: &quinn_udp::UdpSocketState,
    transmit: &quinn_proto::Transmit,
    contents: &[u8],
) -> std::io::Result<()> {
    let transmit = quinn_udp::Transmit {
        destination: transmit.destination,
        ecn: transmit.ecn.and_then(|e| quinn_udp::EcnCodepoint::from_bits(e as u8)),
        contents: &contents[..transmit.size],
        segment_size: transmit.segment_size,
        src_ip: transmit.src_ip,
    };
    udp.send(socket.into(), &transmit)
}
