//! The cluster benchmark's clients: `downbeat-bench cluster-helper --spec FILE` runs the
//! rooms of a [`HelperSpec`] with the product's native client ([`downbeat_client::Client`],
//! nothing added: no reports, no notes), each member on an [`InjectedClock`] of known offset
//! and drift, and a page's beat scheduler beside each.
//!
//! - **Joining.** Each room's teacher creates it on the room's node; every student's page came
//!   from node `index mod nodes` (a district's load balancer) and follows `moved` to the
//!   room's node, as the client does.
//! - **Scheduling.** Every [`HelperSpec::tick_ms`] each member's page schedules the beats that
//!   sound within [`HelperSpec::lookahead_ms`], each once, at the local instant its session
//!   says (the session it has now: the old one, holding its timeline and clock estimate while
//!   its node is gone, then the new one). A beat whose instant passed before it was scheduled
//!   is never scheduled: that is a missed beat.
//! - **Coming back.** When a member's session ends (its node died: a WebTransport client
//!   notices at QUIC's idle timeout, a WebSocket one when its TCP connection is reset) the
//!   member reconnects as the browser package does: after a wait of 250 ms doubled per failed
//!   attempt up to 10 s, times a random factor in [0.5, 1), through the room's new node if the
//!   session said where it moved, else through the node its page came from, or, that one
//!   being dead, a live one (the load balancer again); each attempt has 10 s for its welcome.
//!   [`downbeat_client::Client::reconnect`] carries the clock estimate over.
//! - **Newcomers.** From the kill until this helper's members are all back, a student who was
//!   not in the class joins a room every [`HelperSpec::newcomer_every_ms`] (rooms in turn,
//!   through live nodes in turn), once, and leaves when welcomed.
//!
//! The parent talks to the helper on stdin and stdout, a line each: the helper prints
//! `ready JOINED CLIENTS` once the song runs and every page schedules, the parent writes
//! `kill NODE HOST_NS` once it killed a node (its index, and the host's monotonic clock just
//! before the SIGKILL), the helper prints `recovered` once every member of that node's rooms
//! is back, and when the parent closes stdin the helper stops and prints a [`HelperOutput`]
//! as JSON.

use std::collections::{BTreeMap, HashMap};
use std::io::{BufRead as _, Write as _};
use std::net::{IpAddr, Ipv4Addr};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};
use downbeat_client::{Client, ClientError, ConnectOptions, InjectedClock, LocalClock as _};
use downbeat_engine::sim::Rng;
use downbeat_engine::timeline::Timeline;
use downbeat_protocol::{Change, MicroBpm, Name, RoomSettings, ServerNanos};
use downbeat_server::auth::{Role, Tenants};
use serde::{Deserialize, Serialize};
use tokio::sync::Semaphore;

use crate::hostclock::HostClock;

/// Where one node is reached.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct NodeAddr {
    /// Its `--node-id`.
    pub id: String,
    /// `https://127.0.0.1:<port>/`.
    pub webtransport_url: String,
    /// `ws://127.0.0.1:<port>/api/ws`.
    pub websocket_url: String,
    /// Its certificates' SHA-256 hashes, hex.
    pub cert_hashes: Vec<String>,
}

/// One room: which of all the run's rooms, and the node its teacher creates it on.
#[derive(Clone, Copy, Debug, Serialize, Deserialize)]
pub struct RoomPlan {
    /// The room's index in the run.
    pub index: usize,
    /// The node it is created on.
    pub node: usize,
}

/// How a member whose session ended comes back (the browser package's policy).
#[derive(Clone, Copy, Debug, Serialize, Deserialize)]
pub struct Backoff {
    /// The first wait's ceiling, ms; doubled per failed attempt.
    pub first_ms: f64,
    /// The longest ceiling, ms.
    pub max_ms: f64,
    /// How long one attempt waits for its welcome, ms.
    pub handshake_timeout_ms: u64,
}

impl Backoff {
    /// What `client-wasm` does: 250 ms doubled up to 10 s, 10 s for a welcome.
    pub const BROWSER: Self = Self { first_ms: 250.0, max_ms: 10_000.0, handshake_timeout_ms: 10_000 };

    /// The wait before attempt `attempt` (1-based), with `jitter` in [0, 1).
    fn delay(&self, attempt: u32, jitter: f64) -> Duration {
        let ceiling = (self.first_ms * 2f64.powi(attempt.clamp(1, 16) as i32 - 1)).min(self.max_ms);
        Duration::from_secs_f64(ceiling * (0.5 + jitter / 2.0) / 1e3)
    }
}

/// What one helper runs.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct HelperSpec {
    /// This helper's number (newcomers' names and addresses).
    pub helper: usize,
    /// The district's configuration file: the school's key, to mint tokens with.
    pub config_text: String,
    /// The school.
    pub tenant: String,
    /// Every node, in order.
    pub nodes: Vec<NodeAddr>,
    /// This helper's rooms.
    pub rooms: Vec<RoomPlan>,
    /// Sessions per room: a teacher and `clients_per_room - 1` students.
    pub clients_per_room: usize,
    /// Every `websocket_every`-th session connects over WebSocket (0: none).
    pub websocket_every: usize,
    /// Tempo.
    pub bpm: u32,
    /// Seed for the clocks' offsets and drifts.
    pub seed: u64,
    /// Injected clock offsets are uniform in +-this, ms.
    pub max_offset_ms: f64,
    /// Injected drifts are uniform in +-this, ppm.
    pub max_drift_ppm: f64,
    /// How often each page schedules, ms.
    pub tick_ms: u64,
    /// How far ahead each page schedules, ms.
    pub lookahead_ms: u64,
    /// Handshakes in flight at once while the class joins.
    pub concurrency: usize,
    /// The join phase ends after this long, ms.
    pub join_deadline_ms: u64,
    /// How members come back.
    pub backoff: Backoff,
    /// A newcomer joins this often during recovery, ms (0: never).
    pub newcomer_every_ms: u64,
    /// The cluster's shared time base minus the host's monotonic clock, ns: server time `t`
    /// is the host's monotonic instant `t - truth_offset_ns`.
    pub truth_offset_ns: i64,
    /// Tokio worker threads.
    pub worker_threads: usize,
}

/// One reconnect attempt.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Attempt {
    /// When it started, host monotonic ns.
    pub at: u64,
    /// How long it took, ms.
    pub took_ms: f64,
    /// `welcome`, `refused: <code>`, `connect failed`, `timed out`, `closed`, `protocol`.
    pub outcome: String,
    /// The client's error, when it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// A member's session that ended, and their way back.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Outage {
    /// When the session was seen to end, host monotonic ns.
    pub ended: u64,
    /// Why, as the transport said.
    pub reason: String,
    /// Whether the session said where the room moved.
    pub moved: bool,
    /// When a new session was welcomed, host monotonic ns.
    pub back: Option<u64>,
    /// Whether the member came back on the same seat (member id).
    pub seat_kept: Option<bool>,
    /// Whether the new session could schedule at once (the clock estimate carried over).
    pub clock_carried: Option<bool>,
    /// How old the welcome's `server_now` was (true server time when the reconnect returned
    /// minus it), ms: the client keeps its clock estimate only if that stamp is at most 1 s
    /// old (and at most 50 ms ahead), so an older welcome makes it sync afresh.
    pub welcome_age_ms: Option<f64>,
    /// Every attempt.
    pub attempts: Vec<Attempt>,
}

/// One member as measured.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct MemberOutput {
    /// The room's index in the run.
    pub room: usize,
    /// 0: the teacher.
    pub seat: usize,
    /// The node the room was created on.
    pub node: usize,
    /// `webtransport` or `websocket`.
    pub transport: String,
    /// Whether the room was on the node killed.
    pub affected: bool,
    /// Sessions that ended, in order.
    pub outages: Vec<Outage>,
    /// Beats that sound in the measured window before the kill (from 1 s after `ready`), and
    /// of those never scheduled.
    pub beats_before: u64,
    /// Of [`Self::beats_before`], never scheduled.
    pub missed_before: u64,
    /// Beats that sound from the kill to the member's return (affected members).
    pub beats_away: u64,
    /// Of those, never scheduled.
    pub missed_away: u64,
    /// Beats that sound after the return (or after the kill, for members not affected) up
    /// to the end of the run.
    pub beats_after: u64,
    /// Of those, never scheduled.
    pub missed_after: u64,
    /// The member's largest |scheduled instant - true instant| per stretch (see
    /// [`HelperOutput::beat_error_us`]), µs.
    pub max_error_us: BTreeMap<String, f64>,
    /// The member's median scheduled instant - true instant per stretch, µs: how far their
    /// beats sit from the truth, their clock estimate's own bias, which moves only if the
    /// failure moved their beats.
    pub median_error_us: BTreeMap<String, f64>,
    /// The largest difference between a beat's server instant on the timeline the member had
    /// at the kill and on the one it has at the end, over the beats after the kill, ns.
    pub timeline_shift_ns: Option<u64>,
}

/// A newcomer's join during recovery.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Newcomer {
    /// When it started, host monotonic ns.
    pub at: u64,
    /// Whether the room was on the node killed.
    pub room_on_dead_node: bool,
    /// How long until the welcome or the failure, ms.
    pub took_ms: f64,
    /// `welcome`, or why not (as for [`Attempt::outcome`]).
    pub outcome: String,
    /// The client's error, when it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// What a helper measured.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct HelperOutput {
    /// Sessions asked for.
    pub clients: usize,
    /// Sessions up (welcomed and synced).
    pub joined: usize,
    /// Why the others are not.
    pub join_errors: Vec<String>,
    /// Connect to welcome, per session, ms.
    pub join_ms: Vec<f64>,
    /// When `ready` was printed, host monotonic ns.
    pub ready: u64,
    /// The kill: (node, host monotonic ns).
    pub kill: Option<(usize, u64)>,
    /// When the parent closed stdin, host monotonic ns.
    pub stopped: u64,
    /// Every member.
    pub members: Vec<MemberOutput>,
    /// Newcomers during recovery.
    pub newcomers: Vec<Newcomer>,
    /// Scheduled instant minus the beat's true instant (by the timeline at the kill), µs, by
    /// stretch: `before` the kill (everyone), `away` (affected members, from the kill to
    /// their return), `after` (affected members, after their return), `others` (members not
    /// affected, after the kill).
    pub beat_error_us: BTreeMap<String, Vec<f64>>,
}

/// A scheduled beat: (true instant the page schedules it at, its server instant on the
/// timeline it was scheduled by), host monotonic ns and server ns.
type Scheduled = (u64, u64);

/// One member: who, how they connect, their session and what their page scheduled.
struct Member {
    room: usize,
    seat: usize,
    global: usize,
    token: String,
    websocket: bool,
    home: usize,
    bind: IpAddr,
    clock: InjectedClock,
    session: Mutex<Arc<Client>>,
    beats: Mutex<BTreeMap<i64, Scheduled>>,
    outages: Mutex<Vec<Outage>>,
    /// The timeline the member had when the parent said it killed a node.
    at_kill: Mutex<Option<Timeline>>,
    /// Counted in [`Shared::back`].
    counted: AtomicBool,
}

/// What the helper's tasks share.
struct Shared {
    spec: HelperSpec,
    host: HostClock,
    /// The node killed and when, host monotonic ns.
    kill: Mutex<Option<(usize, u64)>>,
    stopping: AtomicBool,
    /// Members of the killed node's rooms back since the kill.
    back: AtomicUsize,
    /// Members of the killed node's rooms.
    affected: AtomicUsize,
    recovered: tokio::sync::Notify,
    /// Newcomers' joins, as they end.
    newcomers: Mutex<Vec<Newcomer>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Shared {
    fn killed(&self) -> Option<(usize, u64)> {
        *lock(&self.kill)
    }

    /// Options to reach `node` as `member` for `code`.
    fn options(&self, member: &Member, node: usize, code: &str) -> ConnectOptions {
        let node = &self.spec.nodes[node];
        let url = if member.websocket { &node.websocket_url } else { &node.webtransport_url };
        let mut options = ConnectOptions::new(url.clone(), member.token.clone(), code);
        options.cert_hashes = crate::downbeat::class::decode_hashes(&node.cert_hashes).unwrap_or_default();
        options.bind_address = Some(member.bind);
        options.report_interval = None;
        options.handshake_timeout = Duration::from_millis(self.spec.backoff.handshake_timeout_ms);
        options
    }

    /// The node a page reaches for `key`: its own (`home`) unless that one was killed, else
    /// a live one (the load balancer).
    fn entry(&self, home: usize, key: usize) -> usize {
        match self.killed() {
            Some((dead, _)) if dead == home => {
                let live: Vec<usize> = (0..self.spec.nodes.len()).filter(|&n| n != dead).collect();
                live[key % live.len()]
            }
            _ => home,
        }
    }
}

/// Runs the helper: reads the spec, runs the class, writes the output as JSON to stdout.
pub fn run_helper(spec_path: &std::path::Path) -> Result<()> {
    let spec: HelperSpec = serde_json::from_slice(&std::fs::read(spec_path).context("reading the helper spec")?)?;
    let runtime =
        tokio::runtime::Builder::new_multi_thread().worker_threads(spec.worker_threads.max(1)).enable_all().build()?;
    let output = runtime.block_on(run(spec))?;
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "{}", serde_json::to_string(&output)?)?;
    stdout.flush()?;
    // Sessions still open are not closed one by one: the process ends.
    std::process::exit(0);
}

fn say(line: &str) {
    let mut stdout = std::io::stdout().lock();
    let _ = writeln!(stdout, "{line}");
    let _ = stdout.flush();
}

/// Why a connect failed, in a few words.
fn outcome_of(e: &ClientError) -> String {
    match e {
        ClientError::Refused { code, .. } => format!("refused: {}", code.as_str()),
        ClientError::Connect(_) | ClientError::Endpoint(_) => "connect failed".into(),
        ClientError::Timeout(_) => "timed out".into(),
        ClientError::Closed => "closed".into(),
        _ => "protocol".into(),
    }
}

async fn run(spec: HelperSpec) -> Result<HelperOutput> {
    let config = downbeat_server::parse_and_merge(downbeat_server::Args::default(), Some(&spec.config_text))
        .context("the district's configuration")?;
    let tenants = Tenants::new(&config).context("the district's school")?;
    let mint = |role: Role, sub: &str| -> Result<String> {
        Ok(tenants.mint(&spec.tenant, role, sub, sub, Duration::from_secs(6 * 3600))?)
    };
    let host = HostClock::new();
    let began = Instant::now();
    let shared = Arc::new(Shared {
        spec: spec.clone(),
        host,
        kill: Mutex::new(None),
        stopping: AtomicBool::new(false),
        back: AtomicUsize::new(0),
        affected: AtomicUsize::new(0),
        recovered: tokio::sync::Notify::new(),
        newcomers: Mutex::new(Vec::new()),
    });
    let mut output = HelperOutput::default();
    let settings =
        RoomSettings { name: Name::truncating("Bench"), tempo: MicroBpm::from_bpm(spec.bpm), beats_per_bar: 4 };
    let limit = Arc::new(Semaphore::new(spec.concurrency.max(1)));
    let deadline = tokio::time::Instant::now() + Duration::from_millis(spec.join_deadline_ms);

    // Everyone's seat, token, clock and page.
    let mut people = Vec::new();
    for (r, room) in spec.rooms.iter().enumerate() {
        for seat in 0..spec.clients_per_room {
            let global = room.index * spec.clients_per_room + seat;
            let mut rng = Rng::new(spec.seed.wrapping_mul(1_000_003).wrapping_add(global as u64));
            let offset = ((rng.uniform() * 2.0 - 1.0) * spec.max_offset_ms * 1e6) as i64;
            let drift = (rng.uniform() * 2.0 - 1.0) * spec.max_drift_ppm;
            let (role, sub) = if seat == 0 {
                (Role::Teacher, format!("t-{}", room.index))
            } else {
                (Role::Student, format!("s-{global}"))
            };
            people.push((r, seat, global, mint(role, &sub)?, InjectedClock::new(began, offset, drift)));
        }
    }
    output.clients = people.len();
    let home_of = |r: usize, seat: usize, global: usize| {
        if seat == 0 { spec.rooms[r].node } else { global % spec.nodes.len() }
    };
    let websocket_of =
        |global: usize| spec.websocket_every > 0 && global % spec.websocket_every == spec.websocket_every - 1;
    let bind_of = |global: usize| IpAddr::V4(Ipv4Addr::new(127, 0, 1 + (global / 250) as u8, 2 + (global % 250) as u8));
    let node_options = |node: usize, websocket: bool, token: &str, bind: IpAddr| {
        let addr = &spec.nodes[node];
        let url = if websocket { &addr.websocket_url } else { &addr.webtransport_url };
        let mut options = ConnectOptions::new(url.clone(), token.to_owned(), "");
        options.cert_hashes = crate::downbeat::class::decode_hashes(&addr.cert_hashes).unwrap_or_default();
        options.bind_address = Some(bind);
        options.report_interval = None;
        options.handshake_timeout = Duration::from_secs(30);
        options
    };

    // The teachers create their rooms, on their rooms' nodes.
    let mut creating = tokio::task::JoinSet::new();
    for (r, seat, global, token, clock) in people.iter().filter(|p| p.1 == 0).cloned() {
        let mut options = node_options(home_of(r, seat, global), websocket_of(global), &token, bind_of(global));
        options.room = downbeat_protocol::RoomRequest::Create(settings.clone());
        let limit = limit.clone();
        creating.spawn(async move {
            let _permit = limit.acquire_owned().await.map_err(|e| e.to_string())?;
            let started = Instant::now();
            let client = Client::connect_with_clock(options, Arc::new(clock)).await.map_err(|e| e.to_string())?;
            Ok::<_, String>((r, started.elapsed(), client))
        });
    }
    let mut teachers: HashMap<usize, Client> = HashMap::new();
    while let Some(done) = creating.join_next().await {
        match done? {
            Ok((r, took, client)) => {
                output.join_ms.push(took.as_secs_f64() * 1e3);
                teachers.insert(r, client);
            }
            Err(e) => output.join_errors.push(format!("a teacher creating a room: {e}")),
        }
    }
    let codes: HashMap<usize, String> = teachers.iter().map(|(r, t)| (*r, t.welcome().room.code.to_string())).collect();

    // The students join their rooms through the nodes their pages came from.
    let mut joining = tokio::task::JoinSet::new();
    for (r, seat, global, token, clock) in people.iter().filter(|p| p.1 != 0).cloned() {
        let Some(code) = codes.get(&r).cloned() else {
            output.join_errors.push(format!("s-{global}: their room was not created"));
            continue;
        };
        let mut options = node_options(home_of(r, seat, global), websocket_of(global), &token, bind_of(global));
        options.room = downbeat_protocol::RoomRequest::Join(downbeat_protocol::JoinCode::truncating(&code));
        let limit = limit.clone();
        joining.spawn(async move {
            let _permit = limit.acquire_owned().await.map_err(|e| format!("s-{global}: {e}"))?;
            let started = Instant::now();
            let client =
                Client::connect_with_clock(options, Arc::new(clock)).await.map_err(|e| format!("s-{global}: {e}"))?;
            Ok::<_, String>((r, seat, started.elapsed(), client))
        });
    }
    let mut clients: Vec<(usize, usize, Client)> = teachers.into_iter().map(|(r, c)| (r, 0, c)).collect();
    let progress = (output.clients > 100).then(|| crate::report::Progress::new(output.clients as u64, "joining"));
    if let Some(progress) = &progress {
        progress.inc(clients.len() as u64);
    }
    loop {
        match tokio::time::timeout_at(deadline, joining.join_next()).await {
            Ok(Some(done)) => match done? {
                Ok((r, seat, took, client)) => {
                    output.join_ms.push(took.as_secs_f64() * 1e3);
                    clients.push((r, seat, client));
                }
                Err(e) => output.join_errors.push(e),
            },
            Ok(None) => break,
            Err(_) => {
                output.join_errors.push(format!("{} sessions still joining at the join deadline", joining.len()));
                joining.abort_all();
                break;
            }
        }
        if let Some(progress) = &progress {
            progress.inc(1);
        }
    }
    if let Some(progress) = progress {
        progress.finish();
    }
    // Everyone's clock synced (the teachers' too), then the song starts.
    let mut syncing = tokio::task::JoinSet::new();
    for (r, seat, client) in clients {
        syncing.spawn(async move {
            let synced = client.wait_synced(Duration::from_secs(30)).await;
            (r, seat, client, synced)
        });
    }
    let mut members = Vec::new();
    while let Some(done) = syncing.join_next().await {
        let (r, seat, client, synced) = done?;
        let global = spec.rooms[r].index * spec.clients_per_room + seat;
        if let Err(e) = synced {
            output.join_errors.push(format!("{global}: the clock did not sync: {e}"));
            continue;
        }
        let (_, _, _, token, clock) = people.iter().find(|p| p.2 == global).cloned().context("a member's seat")?;
        members.push(Arc::new(Member {
            room: r,
            seat,
            global,
            token,
            websocket: websocket_of(global),
            home: home_of(r, seat, global),
            bind: bind_of(global),
            clock,
            session: Mutex::new(Arc::new(client)),
            beats: Mutex::new(BTreeMap::new()),
            outages: Mutex::new(Vec::new()),
            at_kill: Mutex::new(None),
            counted: AtomicBool::new(false),
        }));
    }
    members.sort_by_key(|m| m.global);
    output.joined = members.len();
    for member in members.iter().filter(|m| m.seat == 0) {
        let client = lock(&member.session).clone();
        client.change(Change::Start { count_in_bars: 0 }).await.context("a teacher starting the song")?;
    }

    // Every page schedules; every member comes back when their session ends.
    let members = Arc::new(members);
    let scheduler = tokio::spawn(schedule(shared.clone(), members.clone()));
    for member in members.iter() {
        tokio::spawn(stay(shared.clone(), member.clone(), codes[&member.room].clone()));
    }
    // The first beats sound a lead after the start; give every page a tick to see them.
    tokio::time::sleep(Duration::from_millis(1_500 + spec.tick_ms)).await;
    output.ready = host.now();
    say(&format!("ready {} {}", output.joined, output.clients));

    // The parent's word: a kill, then the end (stdin closes).
    let (lines_tx, mut lines) = tokio::sync::mpsc::unbounded_channel();
    std::thread::spawn(move || {
        for line in std::io::stdin().lock().lines() {
            let Ok(line) = line else { break };
            if lines_tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut newcomers = None;
    while let Some(line) = lines.recv().await {
        let mut words = line.split_whitespace();
        if words.next() != Some("kill") {
            continue;
        }
        let node: usize = words.next().context("kill: the node")?.parse()?;
        let at: u64 = words.next().context("kill: the instant")?.parse()?;
        *lock(&shared.kill) = Some((node, at));
        let affected = members.iter().filter(|m| spec.rooms[m.room].node == node).count();
        shared.affected.store(affected, Ordering::SeqCst);
        for member in members.iter() {
            *lock(&member.at_kill) = lock(&member.session).timeline();
        }
        let watcher = shared.clone();
        tokio::spawn(async move {
            loop {
                let notified = watcher.recovered.notified();
                if watcher.back.load(Ordering::SeqCst) >= watcher.affected.load(Ordering::SeqCst) {
                    break;
                }
                notified.await;
            }
            say("recovered");
        });
        if spec.newcomer_every_ms > 0 {
            newcomers = Some(tokio::spawn(newcome(shared.clone(), codes.clone(), mint_pool(&spec, &tenants)?)));
        }
    }
    shared.stopping.store(true, Ordering::SeqCst);
    output.stopped = host.now();
    output.kill = shared.killed();
    scheduler.abort();
    if let Some(newcomers) = newcomers {
        newcomers.abort();
    }
    output.newcomers = lock(&shared.newcomers).drain(..).collect();
    reduce(&mut output, &shared, &members);
    Ok(output)
}

/// Tokens for newcomers: enough for ten minutes of recovery.
fn mint_pool(spec: &HelperSpec, tenants: &Tenants) -> Result<Vec<String>> {
    let count = (600_000 / spec.newcomer_every_ms.max(1)).clamp(1, 2_000);
    (0..count)
        .map(|k| {
            let sub = format!("n-{}-{k}", spec.helper);
            Ok(tenants.mint(&spec.tenant, Role::Student, &sub, &sub, Duration::from_secs(6 * 3600))?)
        })
        .collect()
}

/// Newcomers join the rooms in turn through the live nodes in turn, one every
/// `newcomer_every_ms`, until this helper's members are all back.
async fn newcome(shared: Arc<Shared>, codes: HashMap<usize, String>, tokens: Vec<String>) {
    let spec = &shared.spec;
    let Some((dead, _)) = shared.killed() else { return };
    let live: Vec<usize> = (0..spec.nodes.len()).filter(|&n| n != dead).collect();
    let mut rooms: Vec<usize> = codes.keys().copied().collect();
    rooms.sort_unstable();
    let mut tick = tokio::time::interval(Duration::from_millis(spec.newcomer_every_ms));
    for (k, token) in tokens.into_iter().enumerate() {
        tick.tick().await;
        if shared.back.load(Ordering::SeqCst) >= shared.affected.load(Ordering::SeqCst) || live.is_empty() {
            return;
        }
        let room = rooms[k % rooms.len()];
        let node = &spec.nodes[live[k % live.len()]];
        let mut options = ConnectOptions::new(node.webtransport_url.clone(), token, &codes[&room]);
        options.cert_hashes = crate::downbeat::class::decode_hashes(&node.cert_hashes).unwrap_or_default();
        options.bind_address =
            Some(IpAddr::V4(Ipv4Addr::new(127, 2, 1 + (spec.helper % 250) as u8, 2 + (k % 250) as u8)));
        options.report_interval = None;
        options.handshake_timeout = Duration::from_millis(spec.backoff.handshake_timeout_ms);
        let host = shared.host;
        let room_on_dead_node = spec.rooms[room].node == dead;
        let shared = shared.clone();
        tokio::spawn(async move {
            let at = host.now();
            let started = Instant::now();
            let (outcome, error) = match Client::connect(options).await {
                Ok(client) => {
                    client.close();
                    ("welcome".to_owned(), None)
                }
                Err(e) => (outcome_of(&e), Some(e.to_string())),
            };
            let took_ms = started.elapsed().as_secs_f64() * 1e3;
            lock(&shared.newcomers).push(Newcomer { at, room_on_dead_node, took_ms, outcome, error });
        });
    }
}

/// Every page's scheduler: each tick, each member schedules the beats that sound within the
/// lookahead through the session they have now.
async fn schedule(shared: Arc<Shared>, members: Arc<Vec<Arc<Member>>>) {
    let lookahead = shared.spec.lookahead_ms * 1_000_000;
    let mut tick = tokio::time::interval(Duration::from_millis(shared.spec.tick_ms));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        tick.tick().await;
        for member in members.iter() {
            let client = lock(&member.session).clone();
            let now = member.clock.now();
            let (Some(timeline), Some(server_now)) = (client.timeline(), client.server_now()) else { continue };
            let Some(mut beat) = timeline.beat_at(server_now) else { continue };
            let mut beats = lock(&member.beats);
            while let Some(local) = client.local_time_of_beat(beat) {
                if local.0 > now.0 + lookahead {
                    break;
                }
                if local.0 > now.0 {
                    let at = shared.host.monotonic_of(member.clock.instant_at(local));
                    let server = timeline.time_of(beat).map_or(0, |t| t.0);
                    beats.entry(beat).or_insert((at, server));
                }
                beat += 1;
            }
        }
    }
}

/// Keeps `member` in their room: whenever their session ends, they come back.
async fn stay(shared: Arc<Shared>, member: Arc<Member>, code: String) {
    let spec = &shared.spec;
    let mut rng = Rng::new(spec.seed ^ (member.global as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
    loop {
        let client = lock(&member.session).clone();
        let reason = client.closed().await;
        if shared.stopping.load(Ordering::SeqCst) {
            return;
        }
        let moved = client.moved_to();
        let mut outage = Outage { ended: shared.host.now(), reason, moved: moved.is_some(), ..Outage::default() };
        let mut follow = moved;
        let mut attempt = 0;
        let back = loop {
            attempt += 1;
            tokio::time::sleep(spec.backoff.delay(attempt, rng.uniform())).await;
            if shared.stopping.load(Ordering::SeqCst) {
                break None;
            }
            let options = match follow.take() {
                Some(to) => {
                    let mut options = shared.options(&member, member.home, &code);
                    options.url =
                        if member.websocket { to.websocket_url.to_string() } else { to.webtransport_url.to_string() };
                    options.cert_hashes = to.certificate_hashes.to_vec();
                    options
                }
                None => shared.options(&member, shared.entry(member.home, member.global), &code),
            };
            let at = shared.host.now();
            let started = Instant::now();
            let result = client.reconnect(options).await;
            let took_ms = started.elapsed().as_secs_f64() * 1e3;
            match result {
                Ok(new) => {
                    outage.attempts.push(Attempt { at, took_ms, outcome: "welcome".into(), error: None });
                    break Some(new);
                }
                Err(e) => {
                    let error = Some(e.to_string());
                    outage.attempts.push(Attempt { at, took_ms, outcome: outcome_of(&e), error });
                }
            }
        };
        let Some(new) = back else {
            lock(&member.outages).push(outage);
            return;
        };
        let back = shared.host.now();
        outage.back = Some(back);
        let server_now = back as i64 + spec.truth_offset_ns;
        outage.welcome_age_ms = Some((server_now - new.welcome().server_now.0 as i64) as f64 / 1e6);
        outage.seat_kept = Some(new.member_id() == client.member_id());
        outage.clock_carried = Some(new.server_now().is_some());
        *lock(&member.session) = Arc::new(new);
        let returned =
            shared.killed().is_some_and(|(dead, at)| outage.ended >= at && spec.rooms[member.room].node == dead);
        lock(&member.outages).push(outage);
        drop(client);
        if returned && !member.counted.swap(true, Ordering::SeqCst) {
            shared.back.fetch_add(1, Ordering::SeqCst);
            shared.recovered.notify_waiters();
        }
    }
}

/// Reduces what the pages scheduled to the output: per member, the beats of each stretch and
/// those never scheduled; every beat's error against its true instant.
fn reduce(output: &mut HelperOutput, shared: &Shared, members: &[Arc<Member>]) {
    let spec = &shared.spec;
    let offset = shared.spec.truth_offset_ns;
    let to_server = |host_ns: u64| ServerNanos((host_ns as i64 + offset).max(0) as u64);
    let true_instant = |server: u64| (server as i64 - offset) as u64;
    // Windows: from a second after `ready` (every page has scheduled a while), to the end less
    // what a page could not yet have scheduled.
    let start = output.ready + 1_000_000_000;
    let end = output.stopped.saturating_sub((spec.lookahead_ms + 2 * spec.tick_ms) * 1_000_000);
    let kill = output.kill;
    let mut errors: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    for member in members {
        let affected = kill.is_some_and(|(dead, _)| spec.rooms[member.room].node == dead);
        let outages = lock(&member.outages).clone();
        let back = kill.and_then(|(_, at)| outages.iter().find(|o| o.ended >= at).and_then(|o| o.back));
        let reference = lock(&member.at_kill).clone().or_else(|| lock(&member.session).timeline());
        let current = lock(&member.session).timeline();
        let beats = lock(&member.beats).clone();
        let mut out = MemberOutput {
            room: spec.rooms[member.room].index,
            seat: member.seat,
            node: spec.rooms[member.room].node,
            transport: if member.websocket { "websocket" } else { "webtransport" }.into(),
            affected,
            outages,
            ..MemberOutput::default()
        };
        let Some(reference) = reference else {
            output.members.push(out);
            continue;
        };
        let kill_at = kill.map_or(end, |(_, at)| at);
        let mut mine: BTreeMap<String, Vec<f64>> = BTreeMap::new();
        for beat in reference.beats_in(to_server(start), to_server(end)) {
            let due = true_instant(beat.at.0);
            let scheduled = beats.get(&beat.index);
            let stretch = if due < kill_at {
                out.beats_before += 1;
                out.missed_before += u64::from(scheduled.is_none());
                "before"
            } else if affected && back.is_none_or(|b| due <= b) {
                out.beats_away += 1;
                out.missed_away += u64::from(scheduled.is_none());
                "away"
            } else {
                out.beats_after += 1;
                out.missed_after += u64::from(scheduled.is_none());
                if affected { "after" } else { "others" }
            };
            if let Some(&(at, _)) = scheduled {
                let error = (at as i64 - due as i64) as f64 / 1e3;
                errors.entry(stretch.into()).or_default().push(error);
                let worst = out.max_error_us.entry(stretch.into()).or_default();
                *worst = worst.max(error.abs());
                mine.entry(stretch.into()).or_default().push(error);
            }
        }
        for (stretch, mut errors) in mine {
            errors.sort_by(f64::total_cmp);
            out.median_error_us.insert(stretch, errors[errors.len() / 2]);
        }
        if kill.is_some()
            && let Some(current) = current
        {
            let shift = reference
                .beats_in(to_server(kill_at), to_server(end))
                .filter_map(|b| current.time_of(b.index).map(|t| t.0.abs_diff(b.at.0)))
                .max();
            out.timeline_shift_ns = shift;
        }
        output.members.push(out);
    }
    output.beat_error_us = errors;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_backoff_doubles_to_its_ceiling_with_jitter_in_the_upper_half() {
        let b = Backoff::BROWSER;
        assert_eq!(b.delay(1, 0.0), Duration::from_millis(125));
        assert_eq!(b.delay(1, 1.0), Duration::from_millis(250));
        assert_eq!(b.delay(3, 0.0), Duration::from_millis(500));
        assert_eq!(b.delay(9, 1.0), Duration::from_secs(10));
        assert_eq!(b.delay(40, 0.0), Duration::from_secs(5));
    }
}
