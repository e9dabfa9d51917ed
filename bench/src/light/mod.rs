//! A light load generator for the capacity scenario: many idle classroom sessions over
//! WebTransport from one process, cheap enough that the server, not the clients, bounds a
//! run on the same two cores. The same sessions serve the handshake scenario (students leave
//! as soon as they are welcomed: [`LightSpec::leave_after_welcome`]) and note fan-out
//! (students play notes, classmates time them: [`LightSpec::notes_per_second`]).
//!
//! The product's native client ([`downbeat_client::Client`]) gives every session its own UDP
//! socket and QUIC endpoint, three tasks, channels and locks; thousands of them cost more CPU
//! and memory than the server they measure. Here QUIC is driven sans-IO ([`quinn_proto`]):
//!
//! - Sessions share a few client endpoints, at most [`LightSpec::sessions_per_endpoint`]
//!   apiece, each one UDP socket bound to its own loopback address (`127.0.200+.x`) so the
//!   server's per-address limits (2,000 sessions, 32 handshakes in flight) see a school
//!   behind each address, never one giant client.
//! - One task per endpoint (`Driver`) owns the socket, the QUIC endpoint and every
//!   connection on it: it receives in batches (GRO), hands each packet to its connection,
//!   runs the sessions whose connection had news or whose timer is due, and sends what they
//!   have in batches (GSO). No task, channel or waker per connection or per datagram.
//! - HTTP/3 and WebTransport as a page's browser speaks them ([`wtransport_proto`]): SETTINGS
//!   on a control stream, then the extended CONNECT on the first bidirectional stream once the
//!   server's SETTINGS are in, then the session's control stream (a WebTransport
//!   bidirectional stream) and its datagrams, prefixed with the quarter stream id.
//! - Each session runs the engine's own session state machine
//!   ([`downbeat_engine::session::Session`]): hello as a student of a room (or as its teacher,
//!   who creates it and starts the beat), clock sync on the estimator's schedule (a burst,
//!   then once a second), a report on the control stream when the engine has something new
//!   (else every interval) like the native client, and beat datagrams received, decoded and
//!   counted. Nothing is sampled, stored or scheduled per beat.
//! - Joins are ramped: at most [`LightSpec::join_rate`] sessions start per second, at most
//!   [`LightSpec::concurrency`] handshakes are in flight (16 per address), a failed join is
//!   tried again (three tries, as a page reconnects), and the join phase ends at
//!   [`LightSpec::join_deadline`] however many sessions are up, so a saturated server ends a
//!   run with the figures it has. A progress bar shows sessions up against the target,
//!   failures and the rate.
//!
//! Every room's teacher creates the room and starts its beat as soon as it is welcomed, so
//! beats flow to every room while the rest of the school joins (a Monday morning).
//!
//! [`Generator::start`] runs the join phase on a runtime of its own and returns with every
//! session held; [`Generator::counts`] reads the counters while they run;
//! [`Generator::stop`] closes them.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::io::IoSliceMut;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, ToSocketAddrs as _};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, anyhow, ensure};
use bytes::{Bytes, BytesMut};
use downbeat_engine::client::Handled;
use downbeat_engine::clock::Config as SyncConfig;
use downbeat_engine::session::{End, Event, ReportDue, Request, Session, State};
use downbeat_protocol::{
    BoundedString, Change, ClientNanos, ControlOp, JoinCode, MicroBpm, Name, RoomRequest, RoomSettings, ServerDatagram,
    Token,
};
use downbeat_server::Exchanged;
use quinn_proto::{ConnectionError, ConnectionHandle, DatagramEvent, Dir, StreamEvent, StreamId, VarInt};
use serde::Serialize;
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot};
use tokio::task::JoinHandle;
use wtransport_proto::bytes::BufferReader;
use wtransport_proto::datagram::Datagram as H3Datagram;
use wtransport_proto::frame::{Frame, FrameKind};
use wtransport_proto::headers::Headers;
use wtransport_proto::ids::{QStreamId, SessionId, StreamId as H3StreamId};
use wtransport_proto::session::{SessionRequest, SessionResponse};
use wtransport_proto::settings::Settings;
use wtransport_proto::stream_header::{StreamHeader, StreamKind};
use wtransport_proto::varint::VarInt as H3VarInt;

use crate::metrics::Summary;
use crate::report::Progress;

/// Handshakes in flight per client address at most: half the server's default
/// `max_handshakes_per_address` (32), so the generator never trips it.
const HANDSHAKES_PER_ADDRESS: usize = 16;

/// Each endpoint's socket buffers (the kernel caps them at `net.core.rmem_max`): a room tick
/// lands on a socket as a burst of one frame per session.
const SOCKET_BUFFER_BYTES: usize = 4 << 20;

/// How often a session flushes nothing but its report: the native client's interval.
pub const REPORT_INTERVAL: Duration = Duration::from_secs(2);

/// QUIC keep-alive, as the native client.
const KEEP_ALIVE: Duration = Duration::from_secs(3);

/// Tries of a session's join (connect to welcome) when the handshake fails or the server
/// drops it, within [`LightSpec::handshake_timeout`].
const JOIN_ATTEMPTS: u32 = 3;

/// The pause before a join is tried again (none after an HTTP/3 protocol close: wtransport
/// 0.7.2 can lose the first bytes of a SETTINGS frame, and a page simply reconnects).
const RETRY_PAUSE: Duration = Duration::from_secs(1);

/// Receive buffers a driver reads into at once, each big enough for a GRO batch.
const RECV_BUFFERS: usize = 8;

/// Bytes of one receive buffer (64 KiB: the most one GRO batch delivers).
const RECV_BUFFER_BYTES: usize = 64 * 1024;

/// Receive batches a driver takes before it runs its sessions again, so a flood of packets
/// cannot hold back their timers.
const RECV_ROUNDS: usize = 16;

/// How long a driver waits for its connections to close once the generator stops.
const CLOSE_GRACE: Duration = Duration::from_secs(2);

/// The WebTransport session is the connection's first bidirectional stream (its CONNECT).
const SESSION_STREAM: u32 = 0;

/// What to run: the server, the rooms with their tokens, and how to ramp.
#[derive(Clone, Debug)]
pub struct LightSpec {
    /// `https://host:port/` of the server's WebTransport endpoint.
    pub url: String,
    /// SHA-256 of the server's certificates.
    pub cert_hashes: Vec<[u8; 32]>,
    /// The rooms: each teacher creates one, then its students join by code.
    pub rooms: Vec<LightRoom>,
    /// The rooms' tempo.
    pub bpm: u32,
    /// Sessions started per second at most (0: as fast as `concurrency` allows).
    pub join_rate: f64,
    /// Handshakes (connect to welcome) in flight at once, at most.
    pub concurrency: usize,
    /// Sessions per client endpoint (one socket, one address) at most.
    pub sessions_per_endpoint: usize,
    /// The join phase ends after this long however many sessions are up: sessions still
    /// joining are given up, sessions not started are not started.
    pub join_deadline: Duration,
    /// How long one session may take from connect to welcome.
    pub handshake_timeout: Duration,
    /// How often each session reports on the control stream (`None`: never).
    pub report_interval: Option<Duration>,
    /// Worker threads of the generator's runtime.
    pub threads: usize,
    /// Students close their session as soon as they are welcomed (connect, hello, welcome,
    /// close: a handshake benchmark); teachers stay, and so do their rooms.
    pub leave_after_welcome: bool,
    /// Notes each student plays per second once its clock is synced (0: none), at a random
    /// phase; every classmate's first datagram carrying a note is timed against its send
    /// ([`Generator::take_fanout`]).
    pub notes_per_second: f64,
}

impl LightSpec {
    /// A spec with the defaults: 200 joins/s, 32 handshakes in flight, 1,000 sessions per
    /// endpoint, 30 s per handshake, a report every 2 s, two threads.
    pub fn new(url: String, cert_hashes: Vec<[u8; 32]>, rooms: Vec<LightRoom>, join_deadline: Duration) -> Self {
        Self {
            url,
            cert_hashes,
            rooms,
            bpm: 120,
            join_rate: 200.0,
            concurrency: 32,
            sessions_per_endpoint: 1_000,
            join_deadline,
            handshake_timeout: Duration::from_secs(30),
            report_interval: Some(REPORT_INTERVAL),
            threads: 2,
            leave_after_welcome: false,
            notes_per_second: 0.0,
        }
    }

    fn sessions(&self) -> usize {
        self.rooms.iter().map(|r| 1 + r.student_tokens.len()).sum()
    }
}

/// One room: its teacher's token and its students'.
#[derive(Clone, Debug)]
pub struct LightRoom {
    /// The teacher's token.
    pub teacher_token: String,
    /// The students' tokens.
    pub student_tokens: Vec<String>,
}

/// How the join phase went.
#[derive(Clone, Debug, Default, Serialize)]
pub struct JoinOutput {
    /// Students asked for.
    pub students: usize,
    /// Students welcomed.
    pub joined: usize,
    /// Rooms asked for.
    pub rooms: usize,
    /// Rooms created (their teacher welcomed).
    pub rooms_created: usize,
    /// Failures by reason, `N × reason`; sessions given up at the deadline are one line.
    pub join_errors: Vec<String>,
    /// Sessions (teachers and students) still joining or never started when the deadline
    /// passed.
    pub given_up: usize,
    /// Connect to welcome, ms, every session welcomed.
    pub welcome_ms: Summary,
    /// From the first connect to the last welcome, ms.
    pub all_joined_ms: f64,
    /// Whether the deadline ended the join phase.
    pub deadline_passed: bool,
    /// Joins tried again after a failed or dropped handshake.
    pub retries: u64,
    /// Client endpoints (sockets) the sessions share.
    pub endpoints: usize,
}

/// Notes played and their deliveries ([`Generator::take_fanout`]).
#[derive(Clone, Debug, Default)]
pub struct Fanout {
    /// Notes played.
    pub played: usize,
    /// Send to arrival of each delivery, ns.
    pub latency_ns: Vec<u64>,
}

/// Upper bounds of [`Counts::sync_round_trips`]' buckets, ms.
pub const SYNC_ROUND_TRIP_BOUNDS_MS: [u64; 10] = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1_000];

/// Buckets of [`Counts::sync_round_trips`]: one per bound, and one beyond the last.
pub const SYNC_ROUND_TRIP_BUCKETS: usize = SYNC_ROUND_TRIP_BOUNDS_MS.len() + 1;

/// Counters of the sessions while they run (totals since the start).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Counts {
    /// Sessions welcomed and not ended.
    pub live: i64,
    /// Sessions whose clock is synced now.
    pub synced: i64,
    /// Beat frames received.
    pub frames: u64,
    /// Sync replies received.
    pub sync_replies: u64,
    /// Sync requests sent.
    pub sync_requests: u64,
    /// Sync exchanges that became samples, by round trip: below each bound of
    /// [`SYNC_ROUND_TRIP_BOUNDS_MS`] in turn, then the rest.
    pub sync_round_trips: [u64; SYNC_ROUND_TRIP_BUCKETS],
    /// Datagrams the connection refused to send (a full buffer).
    pub send_failed: u64,
    /// UDP packets the generator's sockets refused (a full send buffer; QUIC recovers).
    pub packets_dropped: u64,
    /// Reports sent on the control stream.
    pub reports: u64,
    /// Sessions that ended after their welcome (the server closed them, or the connection
    /// was lost), before the generator stopped.
    pub lost: u64,
}

/// What every driver shares: counters, the clock, the settings.
#[derive(Debug)]
struct Shared {
    /// The local clock counts from here (every session's `ClientNanos`).
    base: Instant,
    report_interval: Option<Duration>,
    handshake_timeout: Duration,
    leave_after_welcome: bool,
    /// Between two notes of a student (`None`: students play none).
    note_every: Option<Duration>,
    /// Notes played and the instant each was sent, by (room, member, sequence number).
    notes_sent: Mutex<HashMap<(u64, u64, u32), ClientNanos>>,
    /// Send to a classmate's arrival of each note's first datagram, ns.
    fanout_ns: Mutex<Vec<u64>>,
    /// The join deadline.
    deadline: Instant,
    handshaking: AtomicU64,
    retries: AtomicU64,
    welcomed: AtomicU64,
    failed: AtomicU64,
    given_up: AtomicU64,
    live: AtomicI64,
    synced: AtomicI64,
    frames: AtomicU64,
    sync_replies: AtomicU64,
    sync_requests: AtomicU64,
    sync_round_trips: [AtomicU64; SYNC_ROUND_TRIP_BUCKETS],
    send_failed: AtomicU64,
    packets_dropped: AtomicU64,
    reports: AtomicU64,
    lost: AtomicU64,
    /// Failures by reason.
    errors: Mutex<HashMap<String, u64>>,
    /// Connect to welcome, microseconds; and the last welcome's instant.
    welcomes: Mutex<(Vec<u32>, Option<Instant>)>,
}

impl Shared {
    /// The local clock at `at`.
    fn local(&self, at: Instant) -> ClientNanos {
        ClientNanos(u64::try_from(at.saturating_duration_since(self.base).as_nanos()).unwrap_or(u64::MAX))
    }

    fn instant_at(&self, local: ClientNanos) -> Option<Instant> {
        self.base.checked_add(Duration::from_nanos(local.0))
    }

    /// A session that did not get in, and why.
    fn fail(&self, reason: String) {
        self.failed.fetch_add(1, Relaxed);
        self.note(reason);
    }

    /// Something that went wrong in a session that did get in (a teacher's start refused).
    fn note(&self, reason: String) {
        *lock(&self.errors).entry(reason).or_default() += 1;
    }

    fn counts(&self) -> Counts {
        Counts {
            live: self.live.load(Relaxed),
            synced: self.synced.load(Relaxed),
            frames: self.frames.load(Relaxed),
            sync_replies: self.sync_replies.load(Relaxed),
            sync_requests: self.sync_requests.load(Relaxed),
            sync_round_trips: std::array::from_fn(|i| self.sync_round_trips[i].load(Relaxed)),
            send_failed: self.send_failed.load(Relaxed),
            packets_dropped: self.packets_dropped.load(Relaxed),
            reports: self.reports.load(Relaxed),
            lost: self.lost.load(Relaxed),
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A client endpoint's driver task, the way to it, and its share of the handshakes in flight.
#[derive(Debug)]
struct Local {
    commands: mpsc::UnboundedSender<Command>,
    handshakes: Arc<Semaphore>,
    task: JoinHandle<()>,
}

/// What the join phase asks of a driver.
#[derive(Debug)]
enum Command {
    /// Start a session.
    Join(Joiner),
    /// Close every session; the driver ends once they are closed.
    Stop,
}

/// The sessions, held after the join phase until [`Generator::stop`].
#[derive(Debug)]
pub struct Generator {
    runtime: tokio::runtime::Runtime,
    shared: Arc<Shared>,
    locals: Vec<Local>,
    joined: JoinOutput,
}

impl Generator {
    /// Opens the endpoints and runs the join phase: every teacher creates its room and starts
    /// the beat, then the students join, ramped as `spec` says, with a progress bar. Returns
    /// once every session is up or failed, or the deadline passed; the sessions stay up.
    pub fn start(spec: LightSpec) -> Result<Self> {
        ensure!(!spec.rooms.is_empty(), "no rooms to join");
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(spec.threads.max(1))
            .thread_name("light")
            .enable_all()
            .build()
            .context("the load generator's runtime")?;
        let total = spec.sessions();
        let endpoints = total
            .div_ceil(spec.sessions_per_endpoint.max(1))
            .max(spec.concurrency.div_ceil(HANDSHAKES_PER_ADDRESS))
            .clamp(1, total);
        let shared = Arc::new(Shared {
            base: Instant::now(),
            report_interval: spec.report_interval,
            leave_after_welcome: spec.leave_after_welcome,
            note_every: (spec.notes_per_second > 0.0).then(|| Duration::from_secs_f64(1.0 / spec.notes_per_second)),
            notes_sent: Mutex::default(),
            fanout_ns: Mutex::default(),
            handshake_timeout: spec.handshake_timeout,
            deadline: Instant::now() + spec.join_deadline,
            handshaking: AtomicU64::new(0),
            retries: AtomicU64::new(0),
            welcomed: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            given_up: AtomicU64::new(0),
            live: AtomicI64::new(0),
            synced: AtomicI64::new(0),
            frames: AtomicU64::new(0),
            sync_replies: AtomicU64::new(0),
            sync_requests: AtomicU64::new(0),
            sync_round_trips: std::array::from_fn(|_| AtomicU64::new(0)),
            send_failed: AtomicU64::new(0),
            packets_dropped: AtomicU64::new(0),
            reports: AtomicU64::new(0),
            lost: AtomicU64::new(0),
            errors: Mutex::default(),
            welcomes: Mutex::default(),
        });
        let target = Target::new(&spec.url, &spec.cert_hashes)?;
        let locals = {
            let _entered = runtime.enter();
            (0..endpoints).map(|k| open_endpoint(k, &target, &shared)).collect::<Result<Vec<_>>>()?
        };
        let joined = runtime.block_on(join(&spec, shared.clone(), &locals));
        Ok(Self { runtime, shared, locals, joined })
    }

    /// How the join phase went.
    pub fn joined(&self) -> &JoinOutput {
        &self.joined
    }

    /// The counters now.
    pub fn counts(&self) -> Counts {
        self.shared.counts()
    }

    /// Note fan-out since the last call: notes played, and the latency of every classmate's
    /// first datagram carrying one of them (send to arrival, one process's clock, ns).
    pub fn take_fanout(&self) -> Fanout {
        let played = std::mem::take(&mut *lock(&self.shared.notes_sent)).len();
        Fanout { played, latency_ns: std::mem::take(&mut *lock(&self.shared.fanout_ns)) }
    }

    /// Closes every session and the endpoints; returns the final counters.
    pub fn stop(self) -> Counts {
        let Self { runtime, shared, locals, .. } = self;
        for local in &locals {
            let _ = local.commands.send(Command::Stop);
        }
        runtime.block_on(async {
            // Each driver ends within its close grace; a stuck one is not worth waiting for.
            let all = async {
                for local in locals {
                    let _ = local.task.await;
                }
            };
            let _ = tokio::time::timeout(CLOSE_GRACE * 3, all).await;
        });
        runtime.shutdown_timeout(Duration::from_secs(2));
        shared.counts()
    }
}

/// The server as every driver dials it: its address and name, the QUIC client settings, and
/// the HTTP/3 bytes every session sends the same.
#[derive(Clone)]
struct Target {
    address: SocketAddr,
    config: quinn_proto::ClientConfig,
    server_name: String,
    /// The control stream's opening: its type and our SETTINGS.
    settings: Bytes,
    /// The CONNECT request's HEADERS frame.
    request: Bytes,
}

impl Target {
    fn new(url: &str, hashes: &[[u8; 32]]) -> Result<Self> {
        let request = SessionRequest::new(url).map_err(|e| anyhow!("the server's url {url}: {e:?}"))?;
        let authority = request.authority().to_owned();
        let address = authority
            .to_socket_addrs()
            .with_context(|| format!("resolving {authority}"))?
            .find(SocketAddr::is_ipv4)
            .with_context(|| format!("no IPv4 address for {authority}"))?;
        let server_name = authority.rsplit_once(':').map_or(authority.as_str(), |(host, _)| host).to_owned();
        let mut request_bytes = Vec::new();
        request.headers().generate_frame().write(&mut request_bytes).map_err(|_| anyhow!("the CONNECT request"))?;
        // As wtransport's client (and so the server's own tests) opens its control stream.
        let settings = Settings::builder()
            .qpack_max_table_capacity(H3VarInt::from_u32(0))
            .qpack_blocked_streams(H3VarInt::from_u32(0))
            .enable_webtransport()
            .enable_h3_datagrams()
            .webtransport_max_sessions(H3VarInt::from_u32(1))
            .build();
        let mut settings_bytes = Vec::new();
        StreamHeader::new_control().write(&mut settings_bytes).map_err(|_| anyhow!("the control stream header"))?;
        settings.generate_frame().write(&mut settings_bytes).map_err(|_| anyhow!("the SETTINGS frame"))?;
        let quic = quinn_proto::crypto::rustls::QuicClientConfig::try_from(Arc::new(browser_like_tls(hashes)?))
            .context("QUIC over the browser-like TLS")?;
        let mut transport = quinn_proto::TransportConfig::default();
        transport.keep_alive_interval(Some(KEEP_ALIVE));
        // As the server: every packet fits the 1,200 bytes every path carries.
        transport.mtu_discovery_config(None);
        let mut config = quinn_proto::ClientConfig::new(Arc::new(quic));
        config.transport_config(Arc::new(transport));
        Ok(Self { address, config, server_name, settings: settings_bytes.into(), request: request_bytes.into() })
    }
}

/// Client endpoint `k`: its own loopback address (127.0.200.2 on), big socket buffers, and
/// its driver task.
fn open_endpoint(k: usize, target: &Target, shared: &Arc<Shared>) -> Result<Local> {
    let ip = Ipv4Addr::new(127, 0, 200 + (k / 250) as u8, 2 + (k % 250) as u8);
    ensure!(k / 250 < 55, "too many client endpoints ({k})");
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::DGRAM, Some(socket2::Protocol::UDP))?;
    // Best effort: the kernel caps both at its maximum.
    let _ = socket.set_recv_buffer_size(SOCKET_BUFFER_BYTES);
    let _ = socket.set_send_buffer_size(SOCKET_BUFFER_BYTES);
    socket.set_nonblocking(true)?;
    socket.bind(&SocketAddr::new(IpAddr::V4(ip), 0).into()).with_context(|| format!("binding {ip}"))?;
    let socket = std::net::UdpSocket::from(socket);
    let udp = quinn_udp::UdpSocketState::new((&socket).into()).context("the socket's batching")?;
    downbeat_server::arrival::stamp_arrivals(&socket).context("the socket's arrival stamps")?;
    let socket = downbeat_server::register_for_reading(socket).context("registering the socket")?;
    let endpoint = quinn_proto::Endpoint::new(Arc::new(quinn_proto::EndpointConfig::default()), None, false, None);
    let (commands, receiver) = mpsc::unbounded_channel();
    let driver = Driver {
        shared: shared.clone(),
        target: target.clone(),
        endpoint,
        socket,
        udp,
        conns: Vec::new(),
        timers: BinaryHeap::new(),
        dirty: Vec::new(),
        pending_retries: Vec::new(),
        transmit: Vec::new(),
        response: Vec::new(),
    };
    let task = tokio::spawn(driver.run(receiver));
    Ok(Local { commands, handshakes: Arc::new(Semaphore::new(HANDSHAKES_PER_ADDRESS)), task })
}

/// TLS as a page's WebTransport asks for it: TLS 1.3, the server's certificate pinned by its
/// hash (as `serverCertificateHashes`), and TLS_AES_128_GCM_SHA256 first, as Chrome and Edge
/// offer on machines with AES instructions (rustls alone offers AES-256 first, which costs the
/// server more per handshake and per packet than a classroom's browsers do).
fn browser_like_tls(hashes: &[[u8; 32]]) -> Result<rustls::ClientConfig> {
    let mut provider = rustls::crypto::ring::default_provider();
    provider.cipher_suites.sort_by_key(|s| s.suite() != rustls::CipherSuite::TLS13_AES_128_GCM_SHA256);
    let verifier = wtransport::tls::client::ServerHashVerification::new(hashes.iter().map(|h| (*h).into()));
    let mut tls = rustls::ClientConfig::builder_with_provider(Arc::new(provider))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .context("TLS 1.3")?
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
    tls.dangerous().set_certificate_verifier(Arc::new(verifier));
    tls.alpn_protocols = vec![wtransport::tls::WEBTRANSPORT_ALPN.to_vec()];
    Ok(tls)
}

/// The join phase: teachers, then students, ramped.
async fn join(spec: &LightSpec, shared: Arc<Shared>, locals: &[Local]) -> JoinOutput {
    let total = spec.sessions();
    let began = Instant::now();
    let progress = Arc::new(Progress::new(total as u64, "sessions up"));
    let shown = Arc::new(AtomicU64::new(0));
    let ticker = tokio::spawn(show_progress(shared.clone(), progress.clone(), began, shown.clone()));
    let global = Arc::new(Semaphore::new(spec.concurrency.max(1)));
    let mut ramp = Ramp::new(spec.join_rate);
    let mut started = 0usize;
    let settings =
        RoomSettings { name: Name::truncating("Bench"), tempo: MicroBpm::from_bpm(spec.bpm), beats_per_bar: 4 };

    // Teachers create their rooms (and start the beat once welcomed).
    let mut codes = Vec::with_capacity(spec.rooms.len());
    for room in &spec.rooms {
        let (tx, rx) = oneshot::channel();
        codes.push(rx);
        let local = &locals[started % locals.len()];
        let Some(permits) = ramp.admit(&shared, local, &global).await else { break };
        let request = RoomRequest::Create(settings.clone());
        start_session(&shared, local, &room.teacher_token, request, Kind::Teacher(Some(tx)), permits);
        started += 1;
    }
    let mut room_codes = Vec::with_capacity(codes.len());
    for rx in codes {
        let deadline = tokio::time::Instant::from_std(shared.deadline);
        room_codes.push(tokio::time::timeout_at(deadline, rx).await.ok().and_then(Result::ok));
    }
    let rooms_created = room_codes.iter().flatten().count();

    // Students join their room by code.
    let mut not_started = total - started;
    'rooms: for (room, code) in spec.rooms.iter().zip(&room_codes) {
        let Some(code) = code else {
            // The teacher's failure is counted; the room's students never try.
            if Instant::now() < shared.deadline {
                for _ in &room.student_tokens {
                    shared.fail("the room's teacher did not get in".into());
                    not_started -= 1;
                }
            }
            continue;
        };
        for token in &room.student_tokens {
            let local = &locals[started % locals.len()];
            let Some(permits) = ramp.admit(&shared, local, &global).await else { break 'rooms };
            let request = RoomRequest::Join(code.clone());
            start_session(&shared, local, token, request, Kind::Student, permits);
            started += 1;
            not_started -= 1;
        }
    }
    shared.given_up.fetch_add(not_started as u64, Relaxed);

    // Wait for the handshakes in flight: each ends by the deadline at the latest.
    while shared.welcomed.load(Relaxed) + shared.failed.load(Relaxed) + shared.given_up.load(Relaxed) < total as u64 {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    ticker.abort();
    update_progress(&shared, &progress, began, &shown);
    progress.finish();

    let welcomed = shared.welcomed.load(Relaxed) as usize;
    let given_up = shared.given_up.load(Relaxed) as usize;
    let mut join_errors: Vec<String> =
        lock(&shared.errors).iter().map(|(reason, n)| format!("{n} × {reason}")).collect();
    join_errors.sort();
    if given_up > 0 {
        join_errors.push(format!(
            "{given_up} sessions still joining when the join deadline ({:?}) passed",
            spec.join_deadline
        ));
    }
    let (welcome_us, last) = std::mem::take(&mut *lock(&shared.welcomes));
    let welcome_ms: Vec<f64> = welcome_us.iter().map(|&us| f64::from(us) / 1e3).collect();
    JoinOutput {
        students: total - spec.rooms.len(),
        joined: welcomed.saturating_sub(rooms_created),
        rooms: spec.rooms.len(),
        rooms_created,
        join_errors,
        given_up,
        welcome_ms: Summary::of(&welcome_ms),
        all_joined_ms: last.map_or(0.0, |l| (l - began).as_secs_f64() * 1e3),
        deadline_passed: given_up > 0,
        retries: shared.retries.load(Relaxed),
        endpoints: locals.len(),
    }
}

/// Hands a session to its endpoint's driver.
fn start_session(
    shared: &Shared,
    local: &Local,
    token: &str,
    room: RoomRequest,
    kind: Kind,
    permits: (OwnedSemaphorePermit, OwnedSemaphorePermit),
) {
    shared.handshaking.fetch_add(1, Relaxed);
    let began = Instant::now();
    let joiner = Joiner {
        token: BoundedString::new(token.to_owned()).map_err(|e| e.to_string()),
        room,
        kind,
        permits: Some(permits),
        began,
        limit: shared.deadline.min(began + shared.handshake_timeout),
        attempt: 1,
    };
    if let Err(mpsc::error::SendError(Command::Join(mut joiner))) = local.commands.send(Command::Join(joiner)) {
        joiner.finish(shared, Outcome::Failed("the generator's driver ended".into()));
    }
}

/// Paces session starts: at most `rate` a second, never a burst of more than 50 ms' worth
/// after a stall.
#[derive(Debug)]
struct Ramp {
    every: Duration,
    next: tokio::time::Instant,
}

impl Ramp {
    fn new(rate: f64) -> Self {
        let every = if rate > 0.0 { Duration::from_secs_f64(1.0 / rate) } else { Duration::ZERO };
        Self { every, next: tokio::time::Instant::now() }
    }

    /// Waits for the next start's turn and its handshake places (the address's and the
    /// global); `None` once the deadline passed.
    async fn admit(
        &mut self,
        shared: &Shared,
        local: &Local,
        global: &Arc<Semaphore>,
    ) -> Option<(OwnedSemaphorePermit, OwnedSemaphorePermit)> {
        let deadline = tokio::time::Instant::from_std(shared.deadline);
        let now = tokio::time::Instant::now();
        if now >= deadline {
            return None;
        }
        let slack = Duration::from_millis(50);
        if self.next + slack < now {
            self.next = now - slack;
        }
        if self.next > now {
            tokio::time::timeout_at(deadline, tokio::time::sleep_until(self.next)).await.ok()?;
        }
        self.next += self.every;
        let address = tokio::time::timeout_at(deadline, local.handshakes.clone().acquire_owned()).await.ok()?.ok()?;
        let global = tokio::time::timeout_at(deadline, global.clone().acquire_owned()).await.ok()?.ok()?;
        Some((address, global))
    }
}

async fn show_progress(shared: Arc<Shared>, progress: Arc<Progress>, began: Instant, shown: Arc<AtomicU64>) {
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    loop {
        tick.tick().await;
        update_progress(&shared, &progress, began, &shown);
    }
}

/// Moves the bar to the sessions up (`shown`: how far it was moved so far).
fn update_progress(shared: &Shared, progress: &Progress, began: Instant, shown: &AtomicU64) {
    let up = shared.welcomed.load(Relaxed);
    progress.inc(up.saturating_sub(shown.fetch_max(up, Relaxed)));
    let rate = up as f64 / began.elapsed().as_secs_f64().max(1e-3);
    progress.set_message(&format!(
        "{rate:.0}/s, {} joining, {} retried, {} failed, {} given up",
        shared.handshaking.load(Relaxed),
        shared.retries.load(Relaxed),
        shared.failed.load(Relaxed),
        shared.given_up.load(Relaxed)
    ));
}

/// A teacher (who hands the room's code back once welcomed) or a student.
#[derive(Debug)]
enum Kind {
    Teacher(Option<oneshot::Sender<JoinCode>>),
    Student,
}

/// A session on its way in: what it joins with, its tries, and its places among the
/// handshakes in flight (freed when the join ends, however it ends).
#[derive(Debug)]
struct Joiner {
    token: Result<Token, String>,
    room: RoomRequest,
    kind: Kind,
    permits: Option<(OwnedSemaphorePermit, OwnedSemaphorePermit)>,
    /// The first connect.
    began: Instant,
    /// No welcome by then: the join failed (or was given up, past the join deadline).
    limit: Instant,
    attempt: u32,
}

/// How a join ended.
#[derive(Debug)]
enum Outcome {
    Welcomed,
    Failed(String),
    /// Still joining when the join deadline passed, or when the generator stopped.
    GivenUp,
}

impl Joiner {
    fn finish(&mut self, shared: &Shared, outcome: Outcome) {
        self.permits = None;
        shared.handshaking.fetch_sub(1, Relaxed);
        match outcome {
            Outcome::Welcomed => {}
            Outcome::Failed(reason) => shared.fail(reason),
            Outcome::GivenUp => {
                shared.given_up.fetch_add(1, Relaxed);
            }
        }
    }

    fn teacher(&self) -> bool {
        matches!(self.kind, Kind::Teacher(_))
    }
}

/// Where a connection's session is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// The QUIC handshake.
    Handshake,
    /// QUIC is up and our SETTINGS are out; the server's are awaited before the CONNECT.
    Settings,
    /// The CONNECT is out; its response is awaited.
    Response,
    /// The control stream is open and the hello out; the welcome is awaited.
    Greeting,
    /// Welcomed: clock sync, beats, reports, notes.
    Held,
    /// Closed (or lost) by us or the server; the connection drains.
    Closing,
}

/// A welcomed session's own timers and numbers.
#[derive(Debug)]
struct Held {
    teacher: bool,
    synced: bool,
    next_report: Option<Instant>,
    next_note: Option<Instant>,
    /// The room's code, hashed: notes are keyed by room and member.
    room: u64,
    member: u64,
    played: u8,
}

/// One QUIC connection and the session on it.
struct Conn {
    quic: quinn_proto::Connection,
    /// The instant this connection's entry in the driver's timer heap is for.
    wake: Option<Instant>,
    /// Listed in the driver's connections to run.
    dirty: bool,
    phase: Phase,
    /// Until the session is welcomed (or its join ends otherwise).
    joiner: Option<Joiner>,
    session: Session<()>,
    /// The hello, until the control stream is open.
    hello: Vec<u8>,
    /// Stream bytes flow control has not taken yet, in order.
    unsent: Vec<(StreamId, Bytes)>,
    /// The CONNECT stream's bytes until its response is whole.
    response: Vec<u8>,
    /// The server's unidirectional streams: its control stream's bytes until its SETTINGS
    /// are whole (`None`: read and dropped).
    uni: Vec<(StreamId, Option<Vec<u8>>)>,
    settings_in: bool,
    control: Option<StreamId>,
    held: Option<Held>,
    /// When the last batch read with a packet of this connection's reached the host, by the
    /// kernel's stamp: its sync replies arrived no later (see [`Driver::receive`]).
    arrived: Option<Instant>,
}

/// One client endpoint: its socket, its QUIC endpoint and every connection on it, run by one
/// task.
struct Driver {
    shared: Arc<Shared>,
    target: Target,
    endpoint: quinn_proto::Endpoint,
    /// Registered for reading only, as the server's ([`downbeat_server::register_for_reading`]).
    socket: AsyncFd<std::net::UdpSocket>,
    udp: quinn_udp::UdpSocketState,
    /// By connection handle (boxed: a QUIC connection is kilobytes, and a connection is
    /// taken out of its slot while it runs).
    conns: Vec<Option<Box<Conn>>>,
    /// When each connection wants to run next, at most one live entry per connection (an
    /// entry whose instant is no longer the connection's `wake` is skipped). A heap, not the
    /// server's millisecond wheel: the wheel saved 3 % of the generator's time, but it fired
    /// every session's deadline at the end of its millisecond, so sends that real clients
    /// spread out went in bunches, and note fan-out read 0.06 ms slower at p50
    /// (BENCHMARKS.md, sixteenth round).
    timers: BinaryHeap<Reverse<(Instant, usize)>>,
    /// Connections with news to run.
    dirty: Vec<usize>,
    /// Joins to try again, and when.
    pending_retries: Vec<(Instant, Joiner)>,
    /// A connection's outgoing packets.
    transmit: Vec<u8>,
    /// The endpoint's own answers (stateless resets).
    response: Vec<u8>,
}

/// What woke a driver.
enum Wake {
    Command(Option<Command>),
    Readable,
    Timer,
}

impl Driver {
    async fn run(mut self, mut commands: mpsc::UnboundedReceiver<Command>) {
        let mut buffers = vec![vec![0u8; RECV_BUFFER_BYTES]; RECV_BUFFERS];
        let mut metas = [quinn_udp::RecvMeta::default(); RECV_BUFFERS];
        // Once stopping: when the driver ends even if some connection has not drained.
        let mut closing: Option<Instant> = None;
        loop {
            let now = Instant::now();
            self.retry_due(now);
            while let Some(&Reverse((at, k))) = self.timers.peek() {
                if at > now {
                    break;
                }
                self.timers.pop();
                if let Some(conn) = self.conns.get_mut(k).and_then(Option::as_mut)
                    && conn.wake == Some(at)
                {
                    conn.wake = None;
                    conn.quic.handle_timeout(now);
                    self.mark(k);
                }
            }
            self.run_dirty();
            if let Some(until) = closing
                && (Instant::now() >= until || self.conns.iter().all(Option::is_none))
            {
                return;
            }
            let next = self
                .timers
                .peek()
                .map(|&Reverse((at, _))| at)
                .into_iter()
                .chain(self.pending_retries.iter().map(|(at, _)| *at))
                .chain(closing)
                .min();
            let sleep = async {
                match next {
                    Some(at) => tokio::time::sleep_until(at.into()).await,
                    None => std::future::pending().await,
                }
            };
            let wake = tokio::select! {
                biased;
                command = commands.recv(), if closing.is_none() => Wake::Command(command),
                ready = self.socket.readable() => match ready {
                    Ok(_) => Wake::Readable,
                    Err(_) => Wake::Timer,
                },
                () = sleep => Wake::Timer,
            };
            match wake {
                Wake::Command(Some(Command::Join(joiner))) => self.connect(joiner, Instant::now()),
                Wake::Command(Some(Command::Stop) | None) => {
                    self.close_all(Instant::now());
                    closing = Some(Instant::now() + CLOSE_GRACE);
                }
                Wake::Readable => self.receive(&mut buffers, &mut metas),
                Wake::Timer => {}
            }
        }
    }

    fn mark(&mut self, k: usize) {
        if let Some(conn) = self.conns.get_mut(k).and_then(Option::as_mut)
            && !conn.dirty
        {
            conn.dirty = true;
            self.dirty.push(k);
        }
    }

    /// Starts a session's connection (a first try or a retry).
    fn connect(&mut self, mut joiner: Joiner, now: Instant) {
        let token = match &joiner.token {
            Ok(token) => token.clone(),
            Err(e) => return joiner.finish(&self.shared, Outcome::Failed(e.clone())),
        };
        let connected =
            self.endpoint.connect(now, self.target.config.clone(), self.target.address, &self.target.server_name);
        let (handle, quic) = match connected {
            Ok(connected) => connected,
            Err(e) => return joiner.finish(&self.shared, Outcome::Failed(format!("connect: {e}"))),
        };
        let (session, hello) = Session::<()>::connect(SyncConfig::default(), token, joiner.room.clone());
        let k = handle.0;
        if self.conns.len() <= k {
            self.conns.resize_with(k + 1, || None);
        }
        self.conns[k] = Some(Box::new(Conn {
            quic,
            wake: None,
            dirty: false,
            phase: Phase::Handshake,
            joiner: Some(joiner),
            session,
            hello,
            unsent: Vec::new(),
            response: Vec::new(),
            uni: Vec::new(),
            settings_in: false,
            control: None,
            held: None,
            arrived: None,
        }));
        self.mark(k);
    }

    fn retry_due(&mut self, now: Instant) {
        if self.pending_retries.iter().all(|(at, _)| *at > now) {
            return;
        }
        let (due, waiting): (Vec<_>, Vec<_>) =
            std::mem::take(&mut self.pending_retries).into_iter().partition(|(at, _)| *at <= now);
        self.pending_retries = waiting;
        for (_, joiner) in due {
            self.connect(joiner, now);
        }
    }

    /// Reads what the socket has (a bounded number of batches) and hands every packet to its
    /// connection.
    fn receive(&mut self, buffers: &mut [Vec<u8>], metas: &mut [quinn_udp::RecvMeta]) {
        for _ in 0..RECV_ROUNDS {
            let received = {
                let mut slices: Vec<IoSliceMut<'_>> = buffers.iter_mut().map(|b| IoSliceMut::new(b)).collect();
                let (socket, udp) = (&self.socket, &self.udp);
                socket.try_io(Interest::READABLE, |socket| udp.recv(socket.into(), &mut slices, metas))
            };
            // `WouldBlock` (the socket is empty) clears the readiness the driver waits on.
            let Ok(n) = received else { return };
            let now = Instant::now();
            // The batch's last packet reached the host when the kernel stamped it, the others
            // before. A client on its own processor handles a reply about then; this one's
            // sessions share a core with thousands of others and the server, and a wait here
            // would count as the reply's path, on its way in only: every client's estimate
            // would be off by half of it and its round trips long.
            let arrived = downbeat_server::arrival::since_last_read(self.socket.get_ref())
                .and_then(|wait| now.checked_sub(wait))
                .unwrap_or(now);
            for (meta, buffer) in metas.iter().zip(buffers.iter()).take(n) {
                for packet in buffer[..meta.len].chunks(meta.stride.max(1)) {
                    let ecn = meta.ecn.and_then(|e| quinn_proto::EcnCodepoint::from_bits(e as u8));
                    let data = BytesMut::from(packet);
                    match self.endpoint.handle(now, meta.addr, meta.dst_ip, ecn, data, &mut self.response) {
                        Some(DatagramEvent::ConnectionEvent(handle, event)) => {
                            if let Some(conn) = self.conns.get_mut(handle.0).and_then(Option::as_mut) {
                                conn.arrived = Some(arrived);
                                conn.quic.handle_event(event);
                                self.mark(handle.0);
                            }
                        }
                        Some(DatagramEvent::Response(transmit)) => {
                            send(&self.socket, &self.udp, &transmit, &self.response, &self.shared);
                        }
                        Some(DatagramEvent::NewConnection(_)) | None => {}
                    }
                    self.response.clear();
                }
            }
        }
    }

    /// Runs every connection with news.
    fn run_dirty(&mut self) {
        while let Some(k) = self.dirty.pop() {
            let Some(mut conn) = self.conns.get_mut(k).and_then(Option::take) else { continue };
            conn.dirty = false;
            if self.run_conn(k, &mut conn) {
                self.conns[k] = Some(conn);
            }
        }
    }

    /// Runs one connection: its events, its session, its packets out, its endpoint events,
    /// its next wake. `false`: it has drained and is gone.
    fn run_conn(&mut self, k: usize, conn: &mut Conn) -> bool {
        loop {
            let now = Instant::now();
            while let Some(event) = conn.quic.poll() {
                self.on_event(conn, event, now);
            }
            if let Some(joiner) = &conn.joiner
                && now >= joiner.limit
            {
                let outcome = if now >= self.shared.deadline {
                    Outcome::GivenUp
                } else {
                    Outcome::Failed("no welcome within the handshake timeout".into())
                };
                self.end_join(conn, now, outcome, None);
            }
            if conn.phase == Phase::Held {
                self.hold(conn, now);
            }
            flush(conn);
            let max = self.udp.max_gso_segments();
            loop {
                self.transmit.clear();
                let Some(transmit) = conn.quic.poll_transmit(now, max, &mut self.transmit) else { break };
                send(&self.socket, &self.udp, &transmit, &self.transmit, &self.shared);
            }
            match downbeat_server::exchange_endpoint_events(&mut self.endpoint, ConnectionHandle(k), &mut conn.quic) {
                Exchanged::Drained => return false,
                Exchanged::More => {}
                Exchanged::Nothing => break,
            }
        }
        let sync = conn.held.is_some().then(|| self.shared.instant_at(conn.session.poll_timeout())).flatten();
        let next = [
            conn.quic.poll_timeout(),
            conn.joiner.as_ref().map(|j| j.limit),
            sync,
            conn.held.as_ref().and_then(|h| h.next_report),
            conn.held.as_ref().and_then(|h| h.next_note),
        ]
        .into_iter()
        .flatten()
        .min();
        // A later wake leaves the earlier entry: it fires, finds nothing due, and sets the next.
        if let Some(next) = next
            && conn.wake.is_none_or(|w| next < w)
        {
            conn.wake = Some(next);
            self.timers.push(Reverse((next, k)));
        }
        true
    }

    fn on_event(&mut self, conn: &mut Conn, event: quinn_proto::Event, now: Instant) {
        match event {
            quinn_proto::Event::Connected => {
                if let Some(id) = conn.quic.streams().open(Dir::Uni) {
                    conn.unsent.push((id, self.target.settings.clone()));
                }
                conn.phase = Phase::Settings;
                self.request(conn);
            }
            quinn_proto::Event::ConnectionLost { reason } => self.on_lost(conn, &reason, now),
            quinn_proto::Event::Stream(StreamEvent::Opened { dir: Dir::Uni }) => {
                while let Some(id) = conn.quic.streams().accept(Dir::Uni) {
                    conn.uni.push((id, Some(Vec::new())));
                    self.read(conn, id, now);
                }
            }
            quinn_proto::Event::Stream(StreamEvent::Readable { id }) => self.read(conn, id, now),
            quinn_proto::Event::DatagramReceived => {
                while let Some(datagram) = conn.quic.datagrams().recv() {
                    self.on_datagram(conn, &datagram);
                }
            }
            _ => {}
        }
    }

    /// Sends the CONNECT once QUIC is up and the server's SETTINGS are in.
    fn request(&mut self, conn: &mut Conn) {
        if conn.phase != Phase::Settings || !conn.settings_in {
            return;
        }
        if let Some(id) = conn.quic.streams().open(Dir::Bi) {
            conn.unsent.push((id, self.target.request.clone()));
            conn.phase = Phase::Response;
        }
    }

    /// Reads what a stream has and hands it on.
    fn read(&mut self, conn: &mut Conn, id: StreamId, now: Instant) {
        let mut chunks_in = Vec::new();
        let mut ended = false;
        if let Ok(mut chunks) = conn.quic.recv_stream(id).read(true) {
            loop {
                match chunks.next(usize::MAX) {
                    Ok(Some(chunk)) => chunks_in.push(chunk.bytes),
                    Ok(None) => {
                        ended = true;
                        break;
                    }
                    Err(quinn_proto::ReadError::Blocked) => break,
                    Err(_) => {
                        ended = true;
                        break;
                    }
                }
            }
            // Flow control credit goes out with the connection's next packets.
            let _ = chunks.finalize();
        }
        if Some(id) == conn.control {
            for chunk in &chunks_in {
                conn.session.handle_control_bytes(chunk);
            }
            if ended {
                conn.session.handle_closed("the control stream ended");
            }
            self.on_control(conn, now);
        } else if id.dir() == Dir::Bi {
            // The CONNECT stream: its response, then nothing this generator reads.
            if conn.phase == Phase::Response {
                for chunk in &chunks_in {
                    conn.response.extend_from_slice(chunk);
                }
                self.on_response(conn, ended, now);
            }
        } else if let Some(at) = conn.uni.iter().position(|(uni, _)| *uni == id) {
            if let Some(bytes) = &mut conn.uni[at].1 {
                for chunk in &chunks_in {
                    bytes.extend_from_slice(chunk);
                }
                match server_settings(bytes) {
                    Ok(None) => {}
                    Ok(Some(true)) => {
                        conn.uni[at].1 = None;
                        conn.settings_in = true;
                        self.request(conn);
                    }
                    Ok(Some(false)) => conn.uni[at].1 = None,
                    Err(reason) => {
                        self.end_join(conn, now, Outcome::Failed(format!("connect: {reason}")), Some(RETRY_PAUSE));
                    }
                }
            }
            if ended {
                conn.uni.retain(|(uni, _)| *uni != id);
            }
        }
    }

    /// The CONNECT's response: a 2xx opens the control stream and sends the hello.
    fn on_response(&mut self, conn: &mut Conn, ended: bool, now: Instant) {
        let parsed = {
            let mut reader = BufferReader::new(&conn.response);
            loop {
                match Frame::read_from_buffer(&mut reader) {
                    Ok(Some(frame)) if matches!(frame.kind(), FrameKind::Exercise(_)) => {}
                    Ok(Some(frame)) if matches!(frame.kind(), FrameKind::Headers) => {
                        let status = Headers::with_frame(&frame).ok().and_then(|h| SessionResponse::try_from(h).ok());
                        break Some(status.map(|s| s.code()).ok_or("an unreadable CONNECT response".to_owned()));
                    }
                    Ok(Some(frame)) => {
                        break Some(Err(format!("a {:?} frame before the CONNECT response", frame.kind())));
                    }
                    Ok(None) if ended => break Some(Err("the CONNECT stream ended without a response".into())),
                    Ok(None) => break None,
                    Err(e) => break Some(Err(format!("the CONNECT response: {e:?}"))),
                }
            }
        };
        match parsed {
            None => {}
            Some(Ok(status)) if status.is_successful() => {
                conn.response = Vec::new();
                let Some(id) = conn.quic.streams().open(Dir::Bi) else {
                    let reason = Outcome::Failed("no stream for the control stream".into());
                    return self.end_join(conn, now, reason, Some(RETRY_PAUSE));
                };
                let mut opening = Vec::with_capacity(8 + conn.hello.len());
                let header = Frame::new_webtransport(session_id());
                if header.write(&mut opening).is_err() {
                    return self.end_join(conn, now, Outcome::Failed("the control stream's header".into()), None);
                }
                opening.append(&mut conn.hello);
                conn.unsent.push((id, opening.into()));
                conn.control = Some(id);
                conn.phase = Phase::Greeting;
            }
            Some(Ok(status)) => {
                let reason = Outcome::Failed(format!("connect: the server answered {status}"));
                self.end_join(conn, now, reason, Some(RETRY_PAUSE));
            }
            Some(Err(reason)) => {
                self.end_join(conn, now, Outcome::Failed(format!("connect: {reason}")), Some(RETRY_PAUSE));
            }
        }
    }

    /// Control-stream news: the welcome (or a refusal) while greeting, the session's events
    /// once held.
    fn on_control(&mut self, conn: &mut Conn, now: Instant) {
        match conn.phase {
            Phase::Greeting => match conn.session.greeted() {
                None => {}
                Some(Ok(_)) => {
                    while conn.session.poll_event().is_some() {}
                    self.welcomed(conn, now);
                }
                Some(Err(end)) => {
                    let (outcome, retry_after) = refused(end);
                    self.end_join(conn, now, outcome, retry_after);
                }
            },
            Phase::Held => {
                let teacher = conn.held.as_ref().is_some_and(|h| h.teacher);
                while let Some(event) = conn.session.poll_event() {
                    if let Event::RequestDone { result: Err(e), .. } = event
                        && teacher
                    {
                        self.shared.note(format!("starting the beat: {e}"));
                    }
                }
                if conn.session.state() == State::Ended {
                    self.end_held(conn, true);
                    conn.quic.close(now, VarInt::from_u32(0), Bytes::from_static(b"bye"));
                }
            }
            _ => {}
        }
    }

    fn welcomed(&mut self, conn: &mut Conn, now: Instant) {
        let Some(mut joiner) = conn.joiner.take() else { return };
        let teacher = joiner.teacher();
        {
            let mut welcomes = lock(&self.shared.welcomes);
            welcomes.0.push(u32::try_from((now - joiner.began).as_micros()).unwrap_or(u32::MAX));
            welcomes.1 = Some(welcomes.1.map_or(now, |last| last.max(now)));
        }
        joiner.finish(&self.shared, Outcome::Welcomed);
        if self.shared.leave_after_welcome && !teacher {
            self.shared.welcomed.fetch_add(1, Relaxed);
            // The close goes out with the connection's next packets; it drains after.
            conn.quic.close(now, VarInt::from_u32(0), Bytes::from_static(b"bye"));
            conn.phase = Phase::Closing;
            return;
        }
        self.shared.live.fetch_add(1, Relaxed);
        if let Kind::Teacher(code) = &mut joiner.kind {
            let start = Request::Control(ControlOp::Timeline(Change::Start { count_in_bars: 0 }));
            match conn.session.request(start, ()) {
                Ok((_, frame)) => {
                    if let Some(control) = conn.control {
                        conn.unsent.push((control, frame.into()));
                    }
                }
                Err((e, ())) => self.shared.note(format!("starting the beat: {e}")),
            }
            if let (Some(welcome), Some(code)) = (conn.session.welcome(), code.take()) {
                let _ = code.send(welcome.room.code.clone());
            }
        }
        // Counted once welcomed, after the teacher's code is out: the join phase waits on it.
        self.shared.welcomed.fetch_add(1, Relaxed);
        // Reports and notes spread over their interval rather than all at once.
        let phase = |every: Duration| now + every.mul_f64(f64::from(rand::random::<u16>()) / f64::from(u16::MAX));
        let (room, member) = conn.session.welcome().map_or((0, 0), |w| {
            let mut hasher = std::collections::hash_map::DefaultHasher::new();
            std::hash::Hash::hash(&w.room.code, &mut hasher);
            (std::hash::Hasher::finish(&hasher), w.member_id)
        });
        conn.held = Some(Held {
            teacher,
            synced: false,
            next_report: self.shared.report_interval.map(phase),
            next_note: self.shared.note_every.filter(|_| !teacher).map(phase),
            room,
            member,
            played: 0,
        });
        conn.phase = Phase::Held;
    }

    /// A held session's turn: sync requests, its synced state, a note and a report when due.
    fn hold(&self, conn: &mut Conn, now: Instant) {
        let shared = &*self.shared;
        let Some(held) = &mut conn.held else { return };
        let local = shared.local(now);
        while let Some(bytes) = conn.session.poll_datagram(local) {
            if send_datagram(&mut conn.quic, &bytes) {
                shared.sync_requests.fetch_add(1, Relaxed);
            } else {
                shared.send_failed.fetch_add(1, Relaxed);
            }
        }
        if let Some(synced) = conn.session.poll_synced(local) {
            held.synced = synced;
            shared.synced.fetch_add(if synced { 1 } else { -1 }, Relaxed);
        }
        if let (Some(at), Some(every)) = (held.next_note, shared.note_every)
            && now >= at
        {
            // Behind (a busy generator): the next note is an interval from now.
            held.next_note = Some((at + every).max(now));
            // Not synced yet: no note (the engine cannot stamp it).
            if let Ok((note, bytes)) = conn.session.play_note(local, 60 + held.played % 24, 100, 0) {
                held.played = held.played.wrapping_add(1);
                lock(&shared.notes_sent).insert((held.room, held.member, note.seq), local);
                if !send_datagram(&mut conn.quic, &bytes) {
                    shared.send_failed.fetch_add(1, Relaxed);
                }
            }
        }
        if let (Some(at), Some(every)) = (held.next_report, shared.report_interval)
            && now >= at
        {
            held.next_report = Some(at + every);
            if let (ReportDue::Send(frame), Some(control)) = (conn.session.report(local), conn.control) {
                conn.unsent.push((control, frame.into()));
                shared.reports.fetch_add(1, Relaxed);
            }
        }
    }

    /// A datagram for a held session: a beat frame, a sync reply, classmates' notes.
    fn on_datagram(&self, conn: &mut Conn, datagram: &[u8]) {
        if conn.phase != Phase::Held {
            return;
        }
        let shared = &*self.shared;
        let handled = shared.local(Instant::now());
        // An HTTP datagram (RFC 9297): the quarter stream id, then the payload. Every
        // datagram here belongs to the connection's one session.
        let Ok(h3) = H3Datagram::read(datagram) else { return };
        let payload = h3.payload();
        if shared.note_every.is_some()
            && let Some(held) = &conn.held
        {
            time_note(shared, held.room, handled, payload);
        }
        let arrived = conn.arrived.map_or(handled, |at| shared.local(at).min(handled));
        match conn.session.handle_datagram(arrived, payload) {
            Ok(reply @ (Handled::Sample | Handled::IgnoredReply)) => {
                shared.sync_replies.fetch_add(1, Relaxed);
                if reply == Handled::Sample
                    && let Some(sample) = conn.session.client().clock().newest_sample()
                {
                    let ms = sample.delay / 1_000_000;
                    let bucket = SYNC_ROUND_TRIP_BOUNDS_MS
                        .iter()
                        .position(|&bound| ms < bound)
                        .unwrap_or(SYNC_ROUND_TRIP_BOUNDS_MS.len());
                    shared.sync_round_trips[bucket].fetch_add(1, Relaxed);
                }
            }
            Ok(Handled::Notes { .. }) | Err(_) => {}
            Ok(_) => {
                shared.frames.fetch_add(1, Relaxed);
            }
        }
    }

    fn on_lost(&mut self, conn: &mut Conn, reason: &ConnectionError, now: Instant) {
        match conn.phase {
            Phase::Closing => {}
            Phase::Held => self.end_held(conn, true),
            Phase::Greeting => {
                conn.session.handle_closed("the server ended the session before welcoming it");
                let (outcome, retry_after) = match conn.session.greeted() {
                    Some(Err(end)) => refused(end),
                    _ => (Outcome::Failed(format!("connect: {reason}")), Some(RETRY_PAUSE)),
                };
                self.end_join(conn, now, outcome, retry_after);
            }
            Phase::Handshake | Phase::Settings | Phase::Response => {
                let h3_protocol = matches!(reason, ConnectionError::ApplicationClosed(close)
                    if (0x100..=0x110).contains(&close.error_code.into_inner()));
                let pause = if h3_protocol { Duration::ZERO } else { RETRY_PAUSE };
                self.end_join(conn, now, Outcome::Failed(format!("connect: {reason}")), Some(pause));
            }
        }
        conn.phase = Phase::Closing;
    }

    /// A join that will not be welcomed on this connection: closes it, then tries again
    /// `retry_after` from now if tries and time are left, or ends the join with `outcome`.
    fn end_join(&mut self, conn: &mut Conn, now: Instant, outcome: Outcome, retry_after: Option<Duration>) {
        if conn.phase != Phase::Closing {
            conn.quic.close(now, VarInt::from_u32(0), Bytes::from_static(b"giving up"));
            conn.phase = Phase::Closing;
        }
        let Some(mut joiner) = conn.joiner.take() else { return };
        match retry_after {
            Some(pause) if joiner.attempt < JOIN_ATTEMPTS && now + pause < joiner.limit => {
                joiner.attempt += 1;
                self.shared.retries.fetch_add(1, Relaxed);
                self.pending_retries.push((now + pause, joiner));
            }
            _ => joiner.finish(&self.shared, outcome),
        }
    }

    /// A held session ends: `lost` if the server or the network ended it.
    fn end_held(&mut self, conn: &mut Conn, lost: bool) {
        if let Some(held) = conn.held.take() {
            self.shared.live.fetch_sub(1, Relaxed);
            if held.synced {
                self.shared.synced.fetch_sub(1, Relaxed);
            }
            if lost {
                self.shared.lost.fetch_add(1, Relaxed);
            }
        }
        conn.phase = Phase::Closing;
    }

    /// The generator stops: every session closes, joins and retries still pending end.
    fn close_all(&mut self, now: Instant) {
        for (_, mut joiner) in std::mem::take(&mut self.pending_retries) {
            joiner.finish(&self.shared, Outcome::GivenUp);
        }
        for k in 0..self.conns.len() {
            let Some(mut conn) = self.conns[k].take() else { continue };
            self.end_held(&mut conn, false);
            if let Some(mut joiner) = conn.joiner.take() {
                joiner.finish(&self.shared, Outcome::GivenUp);
            }
            conn.quic.close(now, VarInt::from_u32(0), Bytes::from_static(b"bench over"));
            self.conns[k] = Some(conn);
            self.mark(k);
        }
    }
}

/// A session that ended before its welcome: the failure, and when to try again. A refusal
/// the server explained is final; a dropped or garbled session is retried, as a page would.
fn refused(end: &End) -> (Outcome, Option<Duration>) {
    let retry_after = (!matches!(end, End::Server { .. })).then_some(RETRY_PAUSE);
    (Outcome::Failed(format!("refused: {end:?}")), retry_after)
}

/// The WebTransport session's id: its CONNECT stream's.
fn session_id() -> SessionId {
    SessionId::try_from_session_stream(H3StreamId::new(H3VarInt::from_u32(SESSION_STREAM)))
        .expect("the first client-initiated bidirectional stream")
}

/// The server's SETTINGS from the start of one of its unidirectional streams: `None` until
/// enough bytes are in, `Some(true)` once its control stream's SETTINGS are, `Some(false)`
/// for a stream of another kind.
fn server_settings(bytes: &[u8]) -> Result<Option<bool>, String> {
    let mut reader = BufferReader::new(bytes);
    match StreamHeader::read_from_buffer(&mut reader) {
        Ok(None) => Ok(None),
        Ok(Some(header)) if matches!(header.kind(), StreamKind::Control) => {
            match Frame::read_from_buffer(&mut reader) {
                Ok(None) => Ok(None),
                Ok(Some(frame)) if matches!(frame.kind(), FrameKind::Settings) => Settings::with_frame(&frame)
                    .map(|_| Some(true))
                    .map_err(|e| format!("the server's SETTINGS: {e:?}")),
                Ok(Some(frame)) => Err(format!("the server's control stream opened with {:?}", frame.kind())),
                Err(e) => Err(format!("the server's control stream: {e:?}")),
            }
        }
        Ok(Some(_)) => Ok(Some(false)),
        Err(e) => Err(format!("a server stream's header: {e:?}")),
    }
}

/// Writes what flow control takes of each stream's unsent bytes, in order.
fn flush(conn: &mut Conn) {
    conn.unsent.retain_mut(|(id, bytes)| {
        while !bytes.is_empty() {
            match conn.quic.send_stream(*id).write(bytes) {
                Ok(n) => {
                    let _ = bytes.split_to(n);
                }
                // Blocked: the rest waits for credit; a stopped or closed stream takes nothing.
                Err(quinn_proto::WriteError::Blocked) => return true,
                Err(_) => return false,
            }
        }
        false
    });
}

/// Sends `payload` as the session's HTTP datagram; `false` if QUIC refused it.
fn send_datagram(quic: &mut quinn_proto::Connection, payload: &[u8]) -> bool {
    let id = QStreamId::from_session_id(session_id());
    let datagram = H3Datagram::new(id, payload);
    let mut bytes = BytesMut::zeroed(datagram.write_size());
    if datagram.write(&mut bytes).is_err() {
        return false;
    }
    quic.datagrams().send(bytes.freeze(), true).is_ok()
}

/// Sends one transmit (several packets to one peer with GSO). A full socket drops it (QUIC
/// recovers, as from any loss) and counts it.
fn send(
    socket: &AsyncFd<std::net::UdpSocket>,
    udp: &quinn_udp::UdpSocketState,
    transmit: &quinn_proto::Transmit,
    contents: &[u8],
    shared: &Shared,
) {
    if downbeat_server::send_transmit(socket.get_ref(), udp, transmit, contents).is_err() {
        shared.packets_dropped.fetch_add(1, Relaxed);
    }
}

/// Times a classmate's notes datagram: its newest note (the one this datagram is the first to
/// carry, unless an earlier one was lost) against its send, if it was played since the last
/// [`Generator::take_fanout`].
fn time_note(shared: &Shared, room: u64, arrived: ClientNanos, payload: &[u8]) {
    let Ok(ServerDatagram::Notes(frame)) = downbeat_protocol::decode_server_datagram(payload) else { return };
    let Some(newest) = frame.notes.iter().last() else { return };
    let sent = lock(&shared.notes_sent).get(&(room, frame.from, newest.seq)).copied();
    if let Some(sent) = sent {
        lock(&shared.fanout_ns).push(arrived.0.saturating_sub(sent.0));
    }
}
