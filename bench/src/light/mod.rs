//! A light load generator for the capacity scenario: many idle classroom sessions over
//! WebTransport from one process, cheap enough that the server, not the clients, bounds a
//! run on the same two cores. The same sessions serve the handshake scenario (students leave
//! as soon as they are welcomed: [`LightSpec::leave_after_welcome`]) and note fan-out
//! (students play notes, classmates time them: [`LightSpec::notes_per_second`]).
//!
//! The product's native client ([`downbeat_client::Client`]) gives every session its own UDP
//! socket and QUIC endpoint, three tasks, channels and locks; thousands of them cost more CPU
//! and memory than the server they measure. Here:
//!
//! - Sessions share a few client endpoints (one UDP socket and one quinn driver each), at most
//!   [`LightSpec::sessions_per_endpoint`] apiece, each bound to its own loopback address
//!   (`127.0.200+.x`) so the server's per-address limits (2,000 sessions, 32 handshakes in
//!   flight) see a school behind each address, never one giant client.
//! - One task per session (beside the tasks wtransport and quinn keep per connection), which
//!   runs the engine's own session state machine ([`downbeat_engine::session::Session`]):
//!   hello as a student of a room (or as its teacher, who creates it and starts the beat),
//!   clock sync on the estimator's schedule (a burst, then once a second), a report on the
//!   control stream when the engine has something new (else every 10 s) like the native
//!   client, and beat datagrams received, decoded and counted. Nothing is sampled, stored or
//!   scheduled per beat.
//! - Joins are ramped: at most [`LightSpec::join_rate`] sessions start per second, at most
//!   [`LightSpec::concurrency`] handshakes are in flight (16 per address), a failed handshake
//!   is tried again after a pause (three tries, as a page reconnects), and the join phase
//!   ends at [`LightSpec::join_deadline`] however many sessions are up, so a saturated
//!   server ends a run with the figures it has. A progress bar shows sessions up against the
//!   target, failures and the rate.
//!
//! Every room's teacher creates the room and starts its beat as soon as it is welcomed, so
//! beats flow to every room while the rest of the school joins (a Monday morning).
//!
//! [`Generator::start`] runs the join phase on a runtime of its own and returns with every
//! session held; [`Generator::counts`] reads the counters while they run;
//! [`Generator::stop`] closes them.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, ensure};
use downbeat_engine::client::Handled;
use downbeat_engine::clock::Config as SyncConfig;
use downbeat_engine::session::{Event, ReportDue, Request, Session, State};
use downbeat_protocol::{
    BoundedString, Change, ClientNanos, ControlOp, JoinCode, MicroBpm, Name, RoomRequest, RoomSettings, ServerDatagram,
};
use serde::Serialize;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, oneshot, watch};
use tokio::task::JoinHandle;
use wtransport::endpoint::endpoint_side;
use wtransport::error::{ConnectingError, ConnectionError};
use wtransport::proto::datagram::Datagram as H3Datagram;
use wtransport::{ClientConfig, Connection, Endpoint, RecvStream, SendStream};

use crate::metrics::Summary;
use crate::report::Progress;

/// Handshakes in flight per client address at most: half the server's default
/// `max_handshakes_per_address` (32), so the generator never trips it.
const HANDSHAKES_PER_ADDRESS: usize = 16;

/// Each endpoint's socket buffers (the kernel caps them at `net.core.rmem_max`): a room tick
/// lands on a socket as a burst of one frame per session.
const SOCKET_BUFFER_BYTES: usize = 4 << 20;

/// Control-stream bytes read at once (presence updates and answers are small).
const CONTROL_CHUNK: usize = 1024;

/// How often a session flushes nothing but its report: the native client's interval.
pub const REPORT_INTERVAL: Duration = Duration::from_secs(2);

/// QUIC keep-alive, as the native client.
const KEEP_ALIVE: Duration = Duration::from_secs(3);

/// Tries of a handshake the server closed for an HTTP/3 protocol error (wtransport 0.7.2 can
/// lose the first bytes of a SETTINGS frame; see the native client's `HANDSHAKE_ATTEMPTS`).
const HANDSHAKE_ATTEMPTS: u32 = 3;

/// Tries of a session's join (connect to welcome) when the handshake fails or the server
/// drops it, within [`LightSpec::handshake_timeout`].
const JOIN_ATTEMPTS: u32 = 3;

/// The pause before a join is tried again.
const RETRY_PAUSE: Duration = Duration::from_secs(1);

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
    /// Datagrams the connection refused to send (a full buffer).
    pub send_failed: u64,
    /// Reports sent on the control stream.
    pub reports: u64,
    /// Sessions that ended after their welcome (the server closed them, or the connection
    /// was lost), before the generator stopped.
    pub lost: u64,
}

/// What every task shares: counters, the clock, the settings.
#[derive(Debug)]
struct Shared {
    /// The local clock counts from here (every session's `ClientNanos`).
    base: Instant,
    url: String,
    report_interval: Option<Duration>,
    handshake_timeout: Duration,
    leave_after_welcome: bool,
    /// Between two notes of a student (`None`: students play none).
    note_every: Option<Duration>,
    /// Notes played and the instant each was sent, by (room, member, sequence number).
    notes_sent: Mutex<HashMap<(u64, u64, u32), ClientNanos>>,
    /// Send to a classmate's arrival of each note's first datagram, ns.
    fanout_ns: Mutex<Vec<u64>>,
    /// The join deadline on the runtime's clock.
    deadline: tokio::time::Instant,
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
    send_failed: AtomicU64,
    reports: AtomicU64,
    lost: AtomicU64,
    /// Failures by reason.
    errors: Mutex<HashMap<String, u64>>,
    /// Connect to welcome, microseconds; and the last welcome's instant.
    welcomes: Mutex<(Vec<u32>, Option<Instant>)>,
}

impl Shared {
    fn now(&self) -> ClientNanos {
        ClientNanos(u64::try_from(self.base.elapsed().as_nanos()).unwrap_or(u64::MAX))
    }

    fn instant_at(&self, local: ClientNanos) -> Option<tokio::time::Instant> {
        self.base.checked_add(Duration::from_nanos(local.0)).map(tokio::time::Instant::from_std)
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
            send_failed: self.send_failed.load(Relaxed),
            reports: self.reports.load(Relaxed),
            lost: self.lost.load(Relaxed),
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A client endpoint and its share of the handshakes in flight.
struct Local {
    endpoint: Endpoint<endpoint_side::Client>,
    handshakes: Arc<Semaphore>,
}

impl std::fmt::Debug for Local {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Local").field("address", &self.endpoint.local_addr().ok()).finish_non_exhaustive()
    }
}

/// The sessions, held after the join phase until [`Generator::stop`].
#[derive(Debug)]
pub struct Generator {
    runtime: tokio::runtime::Runtime,
    shared: Arc<Shared>,
    locals: Vec<Arc<Local>>,
    stop: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
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
        let locals = {
            let _entered = runtime.enter();
            (0..endpoints).map(|k| open_endpoint(k, &spec.cert_hashes).map(Arc::new)).collect::<Result<Vec<_>>>()?
        };
        let shared = Arc::new(Shared {
            base: Instant::now(),
            url: spec.url.clone(),
            report_interval: spec.report_interval,
            leave_after_welcome: spec.leave_after_welcome,
            note_every: (spec.notes_per_second > 0.0).then(|| Duration::from_secs_f64(1.0 / spec.notes_per_second)),
            notes_sent: Mutex::default(),
            fanout_ns: Mutex::default(),
            handshake_timeout: spec.handshake_timeout,
            deadline: tokio::time::Instant::now() + spec.join_deadline,
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
            send_failed: AtomicU64::new(0),
            reports: AtomicU64::new(0),
            lost: AtomicU64::new(0),
            errors: Mutex::default(),
            welcomes: Mutex::default(),
        });
        let (stop, stopped) = watch::channel(false);
        let (tasks, joined) = runtime.block_on(join(&spec, shared.clone(), &locals, stopped));
        Ok(Self { runtime, shared, locals, stop, tasks, joined })
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
        let Self { runtime, shared, locals, stop, tasks, .. } = self;
        let _ = stop.send(true);
        runtime.block_on(async {
            let all = async {
                for task in tasks {
                    let _ = task.await;
                }
            };
            // Every session closes at once; a stuck one is not worth waiting for.
            let _ = tokio::time::timeout(Duration::from_secs(10), all).await;
            for local in &locals {
                local.endpoint.close(0u32.into(), b"bench over");
            }
            // Let the closes go out before the sockets do.
            let _ = tokio::time::timeout(Duration::from_secs(2), async {
                for local in &locals {
                    local.endpoint.wait_idle().await;
                }
            })
            .await;
        });
        runtime.shutdown_timeout(Duration::from_secs(2));
        shared.counts()
    }
}

/// Client endpoint `k`: its own loopback address (127.0.200.2 on), big socket buffers.
fn open_endpoint(k: usize, hashes: &[[u8; 32]]) -> Result<Local> {
    let ip = Ipv4Addr::new(127, 0, 200 + (k / 250) as u8, 2 + (k % 250) as u8);
    ensure!(k / 250 < 55, "too many client endpoints ({k})");
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::DGRAM, Some(socket2::Protocol::UDP))?;
    // Best effort: the kernel caps both at its maximum.
    let _ = socket.set_recv_buffer_size(SOCKET_BUFFER_BYTES);
    let _ = socket.set_send_buffer_size(SOCKET_BUFFER_BYTES);
    socket.set_nonblocking(true)?;
    socket.bind(&SocketAddr::new(IpAddr::V4(ip), 0).into()).with_context(|| format!("binding {ip}"))?;
    let socket: UdpSocket = socket.into();
    let config = ClientConfig::builder()
        .with_bind_socket(socket)
        .with_custom_tls(browser_like_tls(hashes)?)
        .keep_alive_interval(Some(KEEP_ALIVE))
        .build();
    let endpoint = Endpoint::client(config).context("a client endpoint")?;
    Ok(Local { endpoint, handshakes: Arc::new(Semaphore::new(HANDSHAKES_PER_ADDRESS)) })
}

/// TLS as a page's WebTransport asks for it: TLS 1.3, the server's certificate pinned by its
/// hash (as `serverCertificateHashes`), and TLS_AES_128_GCM_SHA256 first, as Chrome and Edge
/// offer on machines with AES instructions (rustls alone offers AES-256 first, which costs the
/// server more per handshake and per packet than a classroom's browsers do).
fn browser_like_tls(hashes: &[[u8; 32]]) -> Result<wtransport::config::TlsClientConfig> {
    use wtransport::tls::rustls;
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

/// The join phase: teachers, then students, ramped; returns the session tasks.
async fn join(
    spec: &LightSpec,
    shared: Arc<Shared>,
    locals: &[Arc<Local>],
    stopped: watch::Receiver<bool>,
) -> (Vec<JoinHandle<()>>, JoinOutput) {
    let total = spec.sessions();
    let began = Instant::now();
    let progress = Arc::new(Progress::new(total as u64, "sessions up"));
    let shown = Arc::new(AtomicU64::new(0));
    let ticker = tokio::spawn(show_progress(shared.clone(), progress.clone(), began, shown.clone()));
    let global = Arc::new(Semaphore::new(spec.concurrency.max(1)));
    let mut ramp = Ramp::new(spec.join_rate);
    let mut tasks = Vec::with_capacity(total);
    let mut started = 0usize;
    let settings =
        RoomSettings { name: Name::truncating("Bench"), tempo: MicroBpm::from_bpm(spec.bpm), beats_per_bar: 4 };

    // Teachers create their rooms (and start the beat once welcomed).
    let mut codes = Vec::with_capacity(spec.rooms.len());
    for room in &spec.rooms {
        let (tx, rx) = oneshot::channel();
        codes.push(rx);
        let Some(permits) = ramp.admit(&shared, &locals[started % locals.len()], &global).await else { break };
        let kind = Kind::Teacher(tx);
        let request = RoomRequest::Create(settings.clone());
        tasks.push(spawn_session(
            &shared,
            &locals[started % locals.len()],
            &room.teacher_token,
            request,
            kind,
            permits,
            &stopped,
        ));
        started += 1;
    }
    let mut room_codes = Vec::with_capacity(codes.len());
    for rx in codes {
        room_codes.push(tokio::time::timeout_at(shared.deadline, rx).await.ok().and_then(Result::ok));
    }
    let rooms_created = room_codes.iter().flatten().count();

    // Students join their room by code.
    let mut not_started = total - started;
    'rooms: for (room, code) in spec.rooms.iter().zip(&room_codes) {
        let Some(code) = code else {
            // The teacher's failure is counted; the room's students never try.
            if tokio::time::Instant::now() < shared.deadline {
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
            tasks.push(spawn_session(&shared, local, token, request, Kind::Student, permits, &stopped));
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
    let output = JoinOutput {
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
    };
    (tasks, output)
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
        let deadline = shared.deadline;
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

/// A teacher (who hands the room's code back) or a student.
#[derive(Debug)]
enum Kind {
    Teacher(oneshot::Sender<JoinCode>),
    Student,
}

fn spawn_session(
    shared: &Arc<Shared>,
    local: &Arc<Local>,
    token: &str,
    room: RoomRequest,
    kind: Kind,
    permits: (OwnedSemaphorePermit, OwnedSemaphorePermit),
    stopped: &watch::Receiver<bool>,
) -> JoinHandle<()> {
    shared.handshaking.fetch_add(1, Relaxed);
    let token = BoundedString::new(token.to_owned());
    tokio::spawn(run_session(shared.clone(), local.clone(), token, room, kind, permits, stopped.clone()))
}

/// The control stream's two halves.
struct Control {
    send: SendStream,
    recv: RecvStream,
}

/// One session, from connect to the generator's stop.
async fn run_session(
    shared: Arc<Shared>,
    local: Arc<Local>,
    token: Result<downbeat_protocol::Token, downbeat_protocol::TooLong>,
    room: RoomRequest,
    kind: Kind,
    permits: (OwnedSemaphorePermit, OwnedSemaphorePermit),
    mut stopped: watch::Receiver<bool>,
) {
    let began = Instant::now();
    let teacher = matches!(kind, Kind::Teacher(_));
    let limit = shared.deadline.min(tokio::time::Instant::from_std(began) + shared.handshake_timeout);
    let greeted = match token {
        Ok(token) => {
            let attempts = async {
                // A refused or dropped handshake is tried again after a pause, as a page
                // reconnects; a refusal the server explained (a refused hello) is final.
                let mut attempt = 1;
                loop {
                    let (session, hello) = Session::<()>::connect(SyncConfig::default(), token.clone(), room.clone());
                    match greet(&shared.url, &local.endpoint, session, &hello).await {
                        Err(e) if attempt < JOIN_ATTEMPTS && !e.starts_with("refused: Server") => {
                            shared.retries.fetch_add(1, Relaxed);
                            attempt += 1;
                            tokio::time::sleep(RETRY_PAUSE).await;
                        }
                        result => return result,
                    }
                }
            };
            tokio::time::timeout_at(limit, attempts).await
        }
        Err(e) => Ok(Err(e.to_string())),
    };
    drop(permits);
    shared.handshaking.fetch_sub(1, Relaxed);
    let (conn, mut control, mut session) = match greeted {
        Ok(Ok(greeted)) => greeted,
        Ok(Err(reason)) => return shared.fail(reason),
        Err(_) if tokio::time::Instant::now() >= shared.deadline => {
            shared.given_up.fetch_add(1, Relaxed);
            return;
        }
        Err(_) => return shared.fail("no welcome within the handshake timeout".into()),
    };
    {
        let mut welcomes = lock(&shared.welcomes);
        let now = Instant::now();
        welcomes.0.push(u32::try_from((now - began).as_micros()).unwrap_or(u32::MAX));
        welcomes.1 = Some(welcomes.1.map_or(now, |last| last.max(now)));
    }
    if shared.leave_after_welcome && !teacher {
        shared.welcomed.fetch_add(1, Relaxed);
        // The close goes out with the connection's next transmit; the endpoint keeps the
        // connection until its peer has it (or the drain period ends).
        conn.close(0u32.into(), b"bye");
        return;
    }
    shared.live.fetch_add(1, Relaxed);
    if let Kind::Teacher(code) = kind {
        let started = session
            .request(Request::Control(ControlOp::Timeline(Change::Start { count_in_bars: 0 })), ())
            .map_err(|(e, ())| e.to_string());
        let sent = match started {
            Ok((_, frame)) => control.send.write_all(&frame).await.map_err(|e| e.to_string()),
            Err(e) => Err(e),
        };
        if let Err(e) = sent {
            shared.note(format!("starting the beat: {e}"));
        }
        if let Some(welcome) = session.welcome() {
            let _ = code.send(welcome.room.code.clone());
        }
    }
    // Counted once welcomed, after the teacher's code is out: the join phase waits on it.
    shared.welcomed.fetch_add(1, Relaxed);
    hold(&shared, &conn, control, &mut session, teacher, &mut stopped).await;
    conn.close(0u32.into(), b"bye");
}

/// Connects, opens the control stream, says hello and reads until the welcome.
async fn greet(
    url: &str,
    endpoint: &Endpoint<endpoint_side::Client>,
    mut session: Session<()>,
    hello: &[u8],
) -> Result<(Connection, Control, Session<()>), String> {
    let mut attempt = 1;
    let conn = loop {
        match endpoint.connect(url).await {
            Ok(conn) => break conn,
            Err(e) if attempt < HANDSHAKE_ATTEMPTS && closed_for_h3_protocol(&e) => attempt += 1,
            Err(e) => return Err(format!("connect: {e}")),
        }
    };
    let opening = conn.open_bi().await.map_err(|e| format!("opening the control stream: {e}"))?;
    let (mut send, mut recv) = opening.await.map_err(|e| format!("opening the control stream: {e}"))?;
    send.write_all(hello).await.map_err(|e| format!("sending the hello: {e}"))?;
    let mut buf = [0u8; CONTROL_CHUNK];
    loop {
        match recv.read(&mut buf).await {
            Ok(Some(n)) => session.handle_control_bytes(&buf[..n]),
            _ => session.handle_closed("the server ended the session before welcoming it"),
        }
        match session.greeted() {
            None => {}
            Some(Ok(_)) => break,
            Some(Err(end)) => return Err(format!("refused: {end:?}")),
        }
    }
    while session.poll_event().is_some() {}
    Ok((conn, Control { send, recv }, session))
}

fn closed_for_h3_protocol(error: &ConnectingError) -> bool {
    match error {
        ConnectingError::ConnectionError(ConnectionError::ApplicationClosed(close)) => {
            (0x100..=0x110).contains(&close.code().into_inner())
        }
        ConnectingError::ConnectionError(ConnectionError::LocalH3Error(_)) => true,
        _ => false,
    }
}

/// The welcomed session until the generator stops or the session ends: clock sync when due,
/// datagrams in, control frames in, a report every interval.
///
/// Every future lives across the loop's turns (a datagram costs one poll of each, none is
/// set up again), and datagrams are read from the QUIC connection itself rather than through
/// wtransport's driver task: its one-slot datagram queue fills with the first datagram it
/// takes (nobody reads that queue), after which it no longer wakes for datagrams at all, so a
/// datagram wakes this task alone. The HTTP datagram's quarter stream id is stripped here.
async fn hold(
    shared: &Shared,
    conn: &Connection,
    control: Control,
    session: &mut Session<()>,
    teacher: bool,
    stopped: &mut watch::Receiver<bool>,
) {
    let Control { mut send, recv } = control;
    let every = shared.report_interval;
    // Reports spread over the interval rather than all at once.
    let mut next_report =
        every.map(|e| tokio::time::Instant::now() + e.mul_f64(f64::from(rand::random::<u16>()) / f64::from(u16::MAX)));
    let timer = tokio::time::sleep_until(tokio::time::Instant::now());
    tokio::pin!(timer);
    // The value goes from false to true once: the first change is the stop.
    let stop = stopped.changed();
    tokio::pin!(stop);
    let quic = conn.quic_connection();
    let datagram = quic.read_datagram();
    tokio::pin!(datagram);
    let read = read_control(recv, Box::new([0u8; CONTROL_CHUNK]));
    tokio::pin!(read);
    let mut synced = false;
    // Students' notes, at a random phase of their interval; numbered through two octaves.
    // Member ids count within a room: notes are keyed by the room (its code, hashed) too.
    let (room, member) = session.welcome().map_or((0, 0), |w| {
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        std::hash::Hash::hash(&w.room.code, &mut hasher);
        (std::hash::Hasher::finish(&hasher), w.member_id)
    });
    let note_every = shared.note_every.filter(|_| !teacher);
    let mut next_note = note_every
        .map(|e| tokio::time::Instant::now() + e.mul_f64(f64::from(rand::random::<u16>()) / f64::from(u16::MAX)));
    let mut played = 0u8;
    let ended = loop {
        let now = shared.now();
        while let Some(bytes) = session.poll_datagram(now) {
            match conn.send_datagram(&bytes) {
                Ok(()) => shared.sync_requests.fetch_add(1, Relaxed),
                Err(_) => shared.send_failed.fetch_add(1, Relaxed),
            };
        }
        if let Some(now_synced) = session.poll_synced(now) {
            synced = now_synced;
            shared.synced.fetch_add(if now_synced { 1 } else { -1 }, Relaxed);
        }
        let sync_at = shared.instant_at(session.poll_timeout());
        let wake = [sync_at, next_report, next_note]
            .into_iter()
            .flatten()
            .min()
            .unwrap_or_else(|| tokio::time::Instant::now() + Duration::from_secs(3600));
        if timer.deadline() != wake {
            timer.as_mut().reset(wake);
        }
        tokio::select! {
            biased;
            _ = &mut stop => break false,
            received = &mut datagram => {
                let Ok(bytes) = received else { break true };
                let t3 = shared.now();
                datagram.set(quic.read_datagram());
                // An HTTP datagram (RFC 9297): the quarter stream id, then the payload. Every
                // datagram here belongs to the connection's one session.
                let Ok(h3) = H3Datagram::read(&bytes) else { continue };
                let payload = h3.payload();
                if shared.note_every.is_some() {
                    time_note(shared, room, t3, payload);
                }
                match session.handle_datagram(t3, payload) {
                    Ok(Handled::Sample | Handled::IgnoredReply) => {
                        shared.sync_replies.fetch_add(1, Relaxed);
                    }
                    Ok(Handled::Notes { .. }) | Err(_) => {}
                    Ok(_) => {
                        shared.frames.fetch_add(1, Relaxed);
                    }
                }
            }
            (recv, buf, n) = &mut read => {
                match n {
                    Some(n) => session.handle_control_bytes(&buf[..n]),
                    None => session.handle_closed("the control stream ended"),
                }
                read.set(read_control(recv, buf));
                while let Some(event) = session.poll_event() {
                    if let Event::RequestDone { result: Err(e), .. } = event
                        && teacher
                    {
                        shared.note(format!("starting the beat: {e}"));
                    }
                }
                if session.state() == State::Ended {
                    break true;
                }
            }
            () = &mut timer => {
                if let (Some(at), Some(e)) = (next_note, note_every)
                    && tokio::time::Instant::now() >= at
                {
                    // Behind (a busy generator): the next note is an interval from now.
                    next_note = Some((at + e).max(tokio::time::Instant::now()));
                    let now = shared.now();
                    // Not synced yet: no note (the engine cannot stamp it).
                    if let Ok((note, bytes)) = session.play_note(now, 60 + played % 24, 100, 0) {
                        played = played.wrapping_add(1);
                        lock(&shared.notes_sent).insert((room, member, note.seq), now);
                        if conn.send_datagram(&bytes).is_err() {
                            shared.send_failed.fetch_add(1, Relaxed);
                        }
                    }
                }
                if let (Some(at), Some(e)) = (next_report, every)
                    && tokio::time::Instant::now() >= at
                {
                    next_report = Some(at + e);
                    if let ReportDue::Send(frame) = session.report(shared.now()) {
                        if send.write_all(&frame).await.is_err() {
                            break true;
                        }
                        shared.reports.fetch_add(1, Relaxed);
                    }
                }
            }
        }
    };
    shared.live.fetch_sub(1, Relaxed);
    if synced {
        shared.synced.fetch_sub(1, Relaxed);
    }
    if ended {
        shared.lost.fetch_add(1, Relaxed);
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

/// Reads the next control-stream bytes into `buf`; hands both back with how many came
/// (`None`: the stream ended or failed).
async fn read_control(
    mut recv: RecvStream,
    mut buf: Box<[u8; CONTROL_CHUNK]>,
) -> (RecvStream, Box<[u8; CONTROL_CHUNK]>, Option<usize>) {
    let n = recv.read(&mut buf[..]).await.ok().flatten();
    (recv, buf, n)
}
