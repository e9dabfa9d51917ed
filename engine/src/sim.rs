//! A deterministic simulation of one room: the server's [`Stage`], N [`Client`]s, and a
//! network between them, all on virtual time.
//!
//! True time is the server's clock. Each client's clock runs at `1 + drift` the true rate from
//! its own offset ([`ClockModel`]), so the harness knows the truth and can measure every
//! client's error against it. Each direction of each client's path has its own delay, heavy-
//! tailed jitter, random and bursty loss, outages and Wi-Fi power-save holding ([`Path`]);
//! reordering follows from jitter. Everything draws from one seeded generator, so a run
//! repeats exactly. Datagrams cross the simulated network encoded with the real codec.
//!
//! Notes: [`Sim::schedule_note`] has a client's student play a note at a true instant. The
//! client's datagram crosses its uplink to the room ([`Stage::handle_notes`]), whose frame
//! crosses every other client's downlink, where that client schedules the note or counts it
//! late. The harness records every note played ([`Sim::notes_played`]), every server outcome
//! ([`Sim::server_notes`]) and, per note and receiver, the true instant the receiver will sound
//! it or that it was late ([`Sim::notes_heard`]).
//!
//! Carriers: by default a client's traffic crosses its path as datagrams, as on WebTransport.
//! [`SimClient::carrier`] set to [`Carrier::Tcp`] carries it over a TCP-like connection
//! instead, as under a WebSocket (see [`tcp`]): losses become retransmission delays,
//! everything behind a missing segment waits, and the server keeps only the newest timing
//! messages while its send buffer is full.
//!
//! Used by the engine's tests and by the benchmark harness.

use std::cmp::Reverse;
use std::collections::{BTreeSet, BinaryHeap};

use downbeat_protocol::ws::{self, Unit};
use downbeat_protocol::{
    BoundedString, BoundedVec, Change, ClientDatagram, ClientNanos, MicroBpm, Note, PROTOCOL_VERSION, Role, RoomInfo,
    ServerDatagram, ServerNanos, Welcome, decode_client_datagram, decode_server_datagram, encode_client_datagram,
    encode_server_datagram,
};

use crate::client::{Client, Handled};
use crate::clock;
use crate::room::{self, NotesOutcome, Stage};
use crate::timeline::TimelineError;

pub mod tcp;

pub use tcp::{Carrier, TcpConfig, TcpStats};
use tcp::{Link, Outbox, Parked, TcpPipe};

/// Nanoseconds in a millisecond.
pub const MS: u64 = 1_000_000;
/// Nanoseconds in a second.
pub const SEC: u64 = 1_000_000_000;

/// A small, fast, seeded generator (xoshiro256**, seeded by splitmix64).
#[derive(Clone, Debug)]
pub struct Rng([u64; 4]);

impl Rng {
    /// A generator from a seed.
    pub fn new(seed: u64) -> Self {
        let mut z = seed;
        let mut next = || {
            z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut x = z;
            x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            x ^ (x >> 31)
        };
        Self([next(), next(), next(), next()])
    }

    /// 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        let s = &mut self.0;
        let result = s[1].wrapping_mul(5).rotate_left(7).wrapping_mul(9);
        let t = s[1] << 17;
        s[2] ^= s[0];
        s[3] ^= s[1];
        s[1] ^= s[2];
        s[0] ^= s[3];
        s[2] ^= t;
        s[3] = s[3].rotate_left(45);
        result
    }

    /// Uniform in `[0, 1)`.
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Uniform in `[lo, hi)`.
    pub fn range(&mut self, lo: f64, hi: f64) -> f64 {
        lo + (hi - lo) * self.uniform()
    }

    /// True with probability `p`.
    pub fn chance(&mut self, p: f64) -> bool {
        self.uniform() < p
    }

    /// An exponential draw of mean `mean`.
    pub fn exponential(&mut self, mean: f64) -> f64 {
        -(1.0 - self.uniform()).ln() * mean
    }

    /// A standard normal draw (Box-Muller).
    pub fn normal(&mut self) -> f64 {
        let u1 = self.uniform().max(f64::MIN_POSITIVE);
        let u2 = self.uniform();
        (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
    }
}

/// Extra one-way delay on top of a path's base.
#[derive(Clone, Debug, PartialEq)]
pub enum Jitter {
    /// None.
    None,
    /// Uniform in `[0, max_nanos)`.
    Uniform {
        /// Upper bound.
        max_nanos: u64,
    },
    /// Log-normal: heavy-tailed, like Wi-Fi. Quantile q is `median * exp(z_q * sigma)`.
    LogNormal {
        /// Median extra delay.
        median_nanos: f64,
        /// Shape.
        sigma: f64,
        /// Largest extra delay.
        cap_nanos: u64,
    },
}

impl Jitter {
    /// One draw of extra delay, ns.
    pub fn sample(&self, rng: &mut Rng) -> u64 {
        match *self {
            Self::None => 0,
            Self::Uniform { max_nanos } => (rng.uniform() * max_nanos as f64) as u64,
            Self::LogNormal { median_nanos, sigma, cap_nanos } => {
                ((median_nanos * (sigma * rng.normal()).exp()) as u64).min(cap_nanos)
            }
        }
    }
}

/// Wi-Fi power save: after `idle_nanos` without traffic, the station sleeps and downlink
/// packets wait for the next beacon.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PowerSave {
    /// Idle time before sleeping.
    pub idle_nanos: u64,
    /// Beacon interval.
    pub beacon_nanos: u64,
}

/// One direction of one client's path.
#[derive(Clone, Debug, PartialEq)]
pub struct Path {
    /// Fixed one-way delay.
    pub base_nanos: u64,
    /// Extra delay per packet.
    pub jitter: Jitter,
    /// Probability a packet is lost on its own.
    pub loss: f64,
    /// Stretches of time in which everything is lost, if any.
    pub bursts: Option<Bursts>,
    /// True-time windows `[from, to)` in which nothing gets through.
    pub outages: Vec<(u64, u64)>,
    /// Power-save holding (meaningful on the downlink).
    pub power_save: Option<PowerSave>,
}

impl Path {
    /// A path with a fixed delay and nothing else.
    pub fn fixed(base_nanos: u64) -> Self {
        Self { base_nanos, jitter: Jitter::None, loss: 0.0, bursts: None, outages: Vec::new(), power_save: None }
    }

    /// The long-run fraction of packets lost (random losses plus bursts), outages aside.
    pub fn mean_loss(&self) -> f64 {
        (self.loss + self.bursts.map_or(0.0, |b| b.share())).min(1.0)
    }
}

/// Loss bursts in time: stretches in which a path loses everything, as when interference or a
/// neighbouring network takes the channel. Gaps between bursts and their lengths are drawn
/// from exponential distributions, so what a burst takes depends on how long it lasts, not on
/// how many packets happen to be sent meanwhile: a sender that sends less does not make the
/// bursts it meets longer.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Bursts {
    /// Mean length of a burst, ns.
    pub mean_nanos: u64,
    /// Mean time from the end of one burst to the start of the next, ns.
    pub mean_gap_nanos: u64,
}

impl Bursts {
    /// The long-run share of time spent in a burst.
    pub fn share(&self) -> f64 {
        let (len, gap) = (self.mean_nanos as f64, self.mean_gap_nanos as f64);
        if len + gap > 0.0 { len / (len + gap) } else { 0.0 }
    }

    fn sample(rng: &mut Rng, mean_nanos: u64) -> u64 {
        (rng.exponential(mean_nanos as f64) as u64).max(1)
    }
}

/// Where one path is in its [`Bursts`]: the burst under way or the next one, `[from, to)`,
/// drawn from the path's own generator, so the bursts depend on time only and the same seed
/// gives the same bursts whatever the traffic.
#[derive(Clone, Debug)]
pub struct BurstState {
    rng: Rng,
    window: Option<(u64, u64)>,
}

impl BurstState {
    /// Bursts drawn from a generator seeded by `seed`.
    pub fn new(seed: u64) -> Self {
        Self { rng: Rng::new(seed), window: None }
    }

    /// Whether a packet entering at `now` (ns from the path's start) falls in a burst. Calls
    /// must come in order of `now`.
    pub fn lost_at(&mut self, bursts: &Bursts, now: u64) -> bool {
        let rng = &mut self.rng;
        let (mut from, mut to) = self.window.unwrap_or_else(|| {
            let from = Bursts::sample(rng, bursts.mean_gap_nanos);
            (from, from + Bursts::sample(rng, bursts.mean_nanos))
        });
        while to <= now {
            from = to + Bursts::sample(rng, bursts.mean_gap_nanos);
            to = from + Bursts::sample(rng, bursts.mean_nanos);
        }
        self.window = Some((from, to));
        from <= now
    }
}

/// Both directions of a client's path.
#[derive(Clone, Debug, PartialEq)]
pub struct Profile {
    /// A name for reports.
    pub name: &'static str,
    /// Client to server.
    pub up: Path,
    /// Server to client.
    pub down: Path,
}

impl Profile {
    /// No impairment: 50 us each way.
    pub fn loopback() -> Self {
        Self { name: "loopback", up: Path::fixed(50_000), down: Path::fixed(50_000) }
    }

    /// A wired LAN: 0.2 ms +- 0.1 ms each way, no loss.
    pub fn lan() -> Self {
        let p = Path { jitter: Jitter::Uniform { max_nanos: 200_000 }, ..Path::fixed(100_000) };
        Self { name: "lan", up: p.clone(), down: p }
    }

    /// Classroom Wi-Fi (see `performance.md`): 3 ms base, log-normal jitter with p90 ~20 ms
    /// and p99 ~250 ms one way, 0.5 % random loss plus bursts taking another 0.5 % of the time
    /// (mean 60 ms, the "mean 3 packets" of a 20 ms media stream, one every 12 s or so);
    /// optional power save (102.4 ms beacons after 200 ms idle) on the downlink.
    pub fn classroom_wifi(power_save: bool) -> Self {
        let path = Path {
            base_nanos: 3 * MS,
            jitter: Jitter::LogNormal { median_nanos: 640_000.0, sigma: 2.56, cap_nanos: 1_500 * MS },
            loss: 0.005,
            bursts: Some(Bursts { mean_nanos: 60 * MS, mean_gap_nanos: 11_940 * MS }),
            outages: Vec::new(),
            power_save: None,
        };
        let down = Path {
            power_save: power_save.then_some(PowerSave { idle_nanos: 200 * MS, beacon_nanos: 102_400_000 }),
            ..path.clone()
        };
        Self { name: "classroom-wifi", up: path, down }
    }

    /// Congested Wi-Fi: the Wi-Fi profile with 5 % loss and three times the jitter.
    pub fn congested(power_save: bool) -> Self {
        let mut p = Self::classroom_wifi(power_save);
        p.name = "congested";
        for path in [&mut p.up, &mut p.down] {
            path.loss = 0.05;
            path.jitter = Jitter::LogNormal { median_nanos: 3.0 * 640_000.0, sigma: 2.56, cap_nanos: 3_000 * MS };
        }
        p
    }
}

#[derive(Clone, Debug)]
struct PathState {
    bursts: BurstState,
    last_activity: Option<u64>,
}

impl PathState {
    fn new(seed: u64) -> Self {
        Self { bursts: BurstState::new(seed), last_activity: None }
    }

    /// When a packet sent at `now` arrives, or `None` if it is lost.
    fn transit(&mut self, path: &Path, rng: &mut Rng, now: u64) -> Option<u64> {
        if path.outages.iter().any(|&(a, b)| (a..b).contains(&now)) {
            return None;
        }
        if path.bursts.is_some_and(|b| self.bursts.lost_at(&b, now)) {
            return None;
        }
        if rng.chance(path.loss) {
            return None;
        }
        Some(self.arrival(path, rng, now))
    }

    /// When a retransmission sent at `now` arrives, or `None` if it is lost too: it goes out
    /// long after the loss it repairs, so it meets the path's mean loss rate, not the burst.
    fn retransmit(&mut self, path: &Path, rng: &mut Rng, now: u64) -> Option<u64> {
        if path.outages.iter().any(|&(a, b)| (a..b).contains(&now)) || rng.chance(path.mean_loss()) {
            return None;
        }
        Some(self.arrival(path, rng, now))
    }

    /// When a packet sent at `now` that is not lost arrives.
    fn arrival(&mut self, path: &Path, rng: &mut Rng, now: u64) -> u64 {
        let mut at = now + path.base_nanos + path.jitter.sample(rng);
        if let Some(ps) = path.power_save {
            let asleep = self.last_activity.is_none_or(|t| now.saturating_sub(t) > ps.idle_nanos);
            if asleep {
                at = at.div_ceil(ps.beacon_nanos) * ps.beacon_nanos;
            }
            self.last_activity = Some(at);
        }
        at
    }
}

/// A client clock: `local = BASE + offset + true * (1 + drift)`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ClockModel {
    /// Offset from true time at true time zero, ns.
    pub offset_nanos: i64,
    /// Rate error, ppm.
    pub drift_ppm: f64,
}

/// Added to every simulated local clock so that negative offsets stay representable.
const LOCAL_BASE: i128 = 1_000 * SEC as i128;

impl ClockModel {
    /// The local clock reading at true time `t`.
    pub fn local_at(&self, t: u64) -> ClientNanos {
        let drift = (t as f64 * self.drift_ppm * 1e-6).round() as i128;
        ClientNanos((LOCAL_BASE + i128::from(self.offset_nanos) + i128::from(t) + drift).max(0) as u64)
    }

    /// The true time at which the local clock reads `local` (rounded up).
    pub fn true_at(&self, local: ClientNanos) -> u64 {
        let since = i128::from(local.0) - LOCAL_BASE - i128::from(self.offset_nanos);
        let mut t = (since as f64 / (1.0 + self.drift_ppm * 1e-6)).max(0.0) as u64;
        while self.local_at(t) < local {
            t += 1;
        }
        t
    }

    /// A random clock within `+-max_offset_nanos` and `+-max_drift_ppm`.
    pub fn random(rng: &mut Rng, max_offset_nanos: i64, max_drift_ppm: f64) -> Self {
        Self {
            offset_nanos: rng.range(-(max_offset_nanos as f64), max_offset_nanos as f64) as i64,
            drift_ppm: rng.range(-max_drift_ppm, max_drift_ppm),
        }
    }
}

/// One simulated client.
#[derive(Debug)]
pub struct SimClient {
    /// Its state machine.
    pub client: Client,
    /// Its clock.
    pub clock: ClockModel,
    /// Its path.
    pub profile: Profile,
    /// How its traffic crosses the path (datagrams unless set; set it before the first run).
    pub carrier: Carrier,
    up: PathState,
    down: PathState,
    up_tcp: TcpPipe,
    down_tcp: TcpPipe,
    outbox: Outbox,
    tcp_stats: TcpStats,
    beat_frames: u64,
}

impl SimClient {
    /// Beat frames the room sent it: its ticks, the frame of its own on joining, and repairs
    /// of a stale timeline.
    pub fn beat_frames_sent(&self) -> u64 {
        self.beat_frames
    }

    /// Its TCP connection's counters (zero on datagrams).
    pub fn tcp_stats(&self) -> TcpStats {
        self.tcp_stats
    }
}

#[derive(Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Packet {
    ToServer { client: usize, bytes: Vec<u8> },
    ToClient { client: usize, bytes: Vec<u8> },
}

/// Counters of what crossed the network.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NetStats {
    /// Datagrams handed to the network.
    pub sent: u64,
    /// Datagrams lost.
    pub lost: u64,
    /// Largest datagram, bytes.
    pub max_datagram_len: usize,
}

/// A note a simulated student played.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PlayedNote {
    /// The client (its index, also its member id).
    pub client: usize,
    /// The true instant it was played.
    pub true_at: u64,
    /// The note as stamped, or `None` if the client could not stamp it (clock not estimated).
    pub note: Option<Note>,
}

/// What a receiver did with the first copy of a note to reach it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hearing {
    /// Scheduled: it will sound at this true instant (its local instant, converted back to
    /// true time with the receiver's clock).
    Scheduled {
        /// The true instant it sounds.
        true_at: u64,
        /// The receiver's local instant it sounds.
        local_at: ClientNanos,
    },
    /// It arrived too late to schedule.
    Late,
}

/// A note reaching a receiver for the first time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HeardNote {
    /// The client that received it.
    pub receiver: usize,
    /// Who played it (member id).
    pub from: u64,
    /// The note.
    pub note: Note,
    /// The true instant it arrived.
    pub arrived_at: u64,
    /// Scheduled or late.
    pub hearing: Hearing,
}

/// The room's outcome for one note datagram.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServerNotes {
    /// The true (server) instant it was handled.
    pub at: u64,
    /// The client that sent it.
    pub from: usize,
    /// What the room did.
    pub outcome: NotesOutcome,
}

/// Server and clients on virtual time. See the module docs.
#[derive(Debug)]
pub struct Sim {
    now: u64,
    rng: Rng,
    room: Stage,
    /// Members the teacher muted (the server keeps mute on the seat, outside the stage).
    muted: BTreeSet<u64>,
    clients: Vec<SimClient>,
    queue: BinaryHeap<Reverse<(u64, u64, Packet)>>,
    next_packet: u64,
    changes: Vec<(u64, Change)>,
    change_results: Vec<(u64, Result<crate::timeline::Applied, TimelineError>)>,
    stats: NetStats,
    server_hold_nanos: u64,
    /// Notes to play: `(true time, order asked, client, midi)`, latest first.
    notes_to_play: Vec<(u64, u64, usize, u8)>,
    notes_asked: u64,
    notes_played: Vec<PlayedNote>,
    server_notes: Vec<ServerNotes>,
    notes_heard: Vec<HeardNote>,
    /// `(receiver, from, seq)` of every note that reached a receiver.
    heard_once: BTreeSet<(usize, u64, u32)>,
}

impl Sim {
    /// A room at `tempo`/`beats_per_bar` (stopped) with one client per `(clock, profile)`, all
    /// joined at true time zero.
    pub fn new(
        seed: u64,
        room_config: room::Config,
        clock_config: &clock::Config,
        tempo: MicroBpm,
        beats_per_bar: u8,
        clients: Vec<(ClockModel, Profile)>,
    ) -> Self {
        let mut room = Stage::new(room_config, ServerNanos(0), tempo, beats_per_bar).expect("valid tempo and meter");
        // Each path's bursts have a generator of their own (see [`BurstState`]).
        let mut burst_seeds = Rng::new(seed ^ 0xb0_0057);
        let clients = clients
            .into_iter()
            .enumerate()
            .map(|(i, (clock, profile))| {
                room.join(ServerNanos(0), i as u64).expect("room large enough");
                let mut client = Client::new(clock_config.clone());
                client.handle_welcome(&Welcome {
                    version: PROTOCOL_VERSION,
                    member_id: i as u64,
                    role: Role::Student,
                    room: RoomInfo {
                        code: BoundedString::truncating("SIMROOM"),
                        name: BoundedString::truncating("Simulated room"),
                        playout_delay_nanos: room.config().playout_delay_nanos,
                    },
                    timeline: room.timeline().to_wire(),
                    members: BoundedVec::new(),
                    lead_nanos: room.config().lead_nanos,
                    server_now: ServerNanos(0),
                    token_expires_at: 0,
                });
                SimClient {
                    client,
                    clock,
                    profile,
                    carrier: Carrier::Datagrams,
                    up: PathState::new(burst_seeds.next_u64()),
                    down: PathState::new(burst_seeds.next_u64()),
                    up_tcp: TcpPipe::default(),
                    down_tcp: TcpPipe::default(),
                    outbox: Outbox::default(),
                    tcp_stats: TcpStats::default(),
                    beat_frames: 0,
                }
            })
            .collect();
        Self {
            now: 0,
            rng: Rng::new(seed),
            room,
            muted: BTreeSet::new(),
            clients,
            queue: BinaryHeap::new(),
            next_packet: 0,
            changes: Vec::new(),
            change_results: Vec::new(),
            stats: NetStats::default(),
            server_hold_nanos: 20_000,
            notes_to_play: Vec::new(),
            notes_asked: 0,
            notes_played: Vec::new(),
            server_notes: Vec::new(),
            notes_heard: Vec::new(),
            heard_once: BTreeSet::new(),
        }
    }

    /// True (server) time now.
    pub fn now(&self) -> u64 {
        self.now
    }

    /// The room's stage.
    pub fn room(&self) -> &Stage {
        &self.room
    }

    /// The room's stage, to act as the teacher would between runs.
    pub fn room_mut(&mut self) -> &mut Stage {
        &mut self.room
    }

    /// Mutes or unmutes `member`, as the teacher would between runs.
    pub fn set_muted(&mut self, member: u64, muted: bool) {
        if muted {
            self.muted.insert(member);
        } else {
            self.muted.remove(&member);
        }
    }

    /// Whether `member` is muted.
    pub fn is_muted(&self, member: u64) -> bool {
        self.muted.contains(&member)
    }

    /// The clients.
    pub fn clients(&self) -> &[SimClient] {
        &self.clients
    }

    /// The clients, to change their settings (or paths) between runs.
    pub fn clients_mut(&mut self) -> &mut [SimClient] {
        &mut self.clients
    }

    /// Has client `client`'s student play MIDI note `midi` (velocity 100, instrument 0) at
    /// true time `at`. Notes asked for the same instant are played in the order asked.
    pub fn schedule_note(&mut self, at: u64, client: usize, midi: u8) {
        self.notes_asked += 1;
        self.notes_to_play.push((at, self.notes_asked, client, midi));
        self.notes_to_play.sort_by_key(|&(at, order, _, _)| Reverse((at, order)));
    }

    /// Every note played so far, in order.
    pub fn notes_played(&self) -> &[PlayedNote] {
        &self.notes_played
    }

    /// The room's outcome for every note datagram it received, in order.
    pub fn server_notes(&self) -> &[ServerNotes] {
        &self.server_notes
    }

    /// Every note that reached a receiver, once per note and receiver (copies are not
    /// recorded), in order of arrival.
    pub fn notes_heard(&self) -> &[HeardNote] {
        &self.notes_heard
    }

    /// Network counters.
    pub fn net_stats(&self) -> NetStats {
        self.stats
    }

    /// Asks the room for `change` at true time `at`.
    pub fn schedule_change(&mut self, at: u64, change: Change) {
        self.changes.push((at, change));
        self.changes.sort_by_key(|c| Reverse(c.0));
    }

    /// Results of the changes applied so far, with the time they were asked.
    pub fn change_results(&self) -> &[(u64, Result<crate::timeline::Applied, TimelineError>)] {
        &self.change_results
    }

    fn send(&mut self, client: usize, up: bool, bytes: Vec<u8>) {
        self.stats.sent += 1;
        self.stats.max_datagram_len = self.stats.max_datagram_len.max(bytes.len());
        let c = &mut self.clients[client];
        if let Carrier::Tcp(config) = &c.carrier {
            let message = ws::datagram_message(&bytes);
            let (pipe, path, state, back) = if up {
                (&mut c.up_tcp, &c.profile.up, &mut c.up, &c.profile.down)
            } else {
                (&mut c.down_tcp, &c.profile.down, &mut c.down, &c.profile.up)
            };
            let link = Link { config, path, state, back, stats: &mut c.tcp_stats };
            let at = pipe.write(link, &mut self.rng, self.now, message.len());
            let packet = if up {
                Packet::ToServer { client, bytes: message }
            } else {
                Packet::ToClient { client, bytes: message }
            };
            self.next_packet += 1;
            self.queue.push(Reverse((at, self.next_packet, packet)));
            return;
        }
        let arrival = if up {
            c.up.transit(&c.profile.up, &mut self.rng, self.now)
        } else {
            c.down.transit(&c.profile.down, &mut self.rng, self.now)
        };
        let Some(at) = arrival else {
            self.stats.lost += 1;
            return;
        };
        let packet = if up { Packet::ToServer { client, bytes } } else { Packet::ToClient { client, bytes } };
        self.next_packet += 1;
        self.queue.push(Reverse((at, self.next_packet, packet)));
    }

    fn client_wake(&self, i: usize) -> u64 {
        let c = &self.clients[i];
        c.clock.true_at(c.client.poll_timeout()).max(self.now)
    }

    /// Runs until true time `end`.
    pub fn run_until(&mut self, end: u64) {
        loop {
            let mut next = end.saturating_add(1);
            if let Some(Reverse((at, _, _))) = self.queue.peek() {
                next = next.min(*at);
            }
            if let Some(t) = self.room.poll_timeout() {
                next = next.min(t.0);
            }
            if let Some(&(at, _)) = self.changes.last() {
                next = next.min(at);
            }
            if let Some(&(at, ..)) = self.notes_to_play.last() {
                next = next.min(at);
            }
            for i in 0..self.clients.len() {
                next = next.min(self.client_wake(i));
                let c = &self.clients[i];
                if let Some(at) = c.down_tcp.next_ack().filter(|_| !c.outbox.is_empty()) {
                    next = next.min(at);
                }
            }
            if next > end {
                self.now = end;
                return;
            }
            self.now = self.now.max(next);
            self.step();
        }
    }

    fn step(&mut self) {
        let now = self.now;
        self.flush_outboxes();
        while self.changes.last().is_some_and(|c| c.0 <= now) {
            if let Some((at, change)) = self.changes.pop() {
                let result = self.room.handle_change(ServerNanos(now), change);
                self.change_results.push((at, result));
            }
        }
        while self.notes_to_play.last().is_some_and(|n| n.0 <= now) {
            if let Some((_, _, client, midi)) = self.notes_to_play.pop() {
                self.play_note(client, midi);
            }
        }
        while self.queue.peek().is_some_and(|Reverse((at, _, _))| *at <= now) {
            let Some(Reverse((_, _, packet))) = self.queue.pop() else { break };
            match packet {
                Packet::ToServer { client, bytes } => {
                    match self.datagram_of(client, &bytes).map(decode_client_datagram) {
                        Some(Ok(ClientDatagram::SyncRequest(req))) => {
                            self.server_write(client, Parked::Sync(req, ServerNanos(now)));
                            self.room.handle_held_epoch(ServerNanos(now), client as u64, req.epoch);
                        }
                        Some(Ok(ClientDatagram::Notes(notes))) => self.server_handle_notes(client, &notes),
                        _ => {}
                    }
                }
                Packet::ToClient { client, bytes } => {
                    if let Some(Ok(d)) = self.datagram_of(client, &bytes).map(decode_server_datagram) {
                        self.client_handle(client, &d);
                    }
                }
            }
        }
        while let Some(t) = self.room.poll_transmit(ServerNanos(now)) {
            if let Ok(bytes) = encode_server_datagram(&ServerDatagram::Beats(t.frame)) {
                for &member in &t.members {
                    self.clients[member as usize].beat_frames += 1;
                    self.server_write(member as usize, Parked::Beats(bytes.clone()));
                }
            }
        }
        for i in 0..self.clients.len() {
            let local = self.clients[i].clock.local_at(now);
            while let Some(d) = self.clients[i].client.poll_datagram(local) {
                if let Ok(bytes) = encode_client_datagram(&d) {
                    self.send(i, true, bytes);
                }
            }
        }
    }

    /// The datagram a packet to or from `client` carries: the packet itself, or over TCP the
    /// WebSocket message's datagram unit.
    fn datagram_of<'a>(&self, client: usize, bytes: &'a [u8]) -> Option<&'a [u8]> {
        match self.clients[client].carrier {
            Carrier::Datagrams => Some(bytes),
            Carrier::Tcp(_) => match ws::split(bytes) {
                Ok(Unit::Datagram(datagram)) => Some(datagram),
                _ => None,
            },
        }
    }

    /// The server sends `message` to `client`: at once on datagrams, or over TCP into the
    /// socket's send buffer when it fits and nothing waits before it, else into the outbox.
    fn server_write(&mut self, client: usize, message: Parked) {
        let now = self.now;
        let len = self.encode(&message, now).map_or(0, |b| b.len());
        let c = &mut self.clients[client];
        if let Carrier::Tcp(config) = &c.carrier {
            let buffered = c.down_tcp.buffered(now);
            if !c.outbox.is_empty() || (buffered > 0 && buffered + len > config.send_buffer_bytes) {
                if c.outbox.park(message) {
                    c.tcp_stats.dropped += 1;
                }
                return;
            }
        }
        self.write_now(client, message);
    }

    /// Writes what waits in the outboxes while it fits into the send buffers.
    fn flush_outboxes(&mut self) {
        let now = self.now;
        for i in 0..self.clients.len() {
            while let Some(message) = self.clients[i].outbox.peek() {
                let len = self.encode(&message, now).map_or(0, |b| b.len());
                let c = &mut self.clients[i];
                let Carrier::Tcp(config) = &c.carrier else { break };
                let buffered = c.down_tcp.buffered(now);
                if buffered > 0 && buffered + len > config.send_buffer_bytes {
                    break;
                }
                c.outbox.pop();
                self.write_now(i, message);
            }
        }
    }

    /// The bytes of `message` written at `now` (a sync reply is stamped after the hold time).
    fn encode(&self, message: &Parked, now: u64) -> Option<Vec<u8>> {
        match message {
            Parked::Sync(request, t1) => {
                let reply = Parked::reply(*request, *t1, now + self.server_hold_nanos);
                encode_server_datagram(&ServerDatagram::SyncReply(reply)).ok()
            }
            Parked::Beats(bytes) | Parked::Notes(bytes) => Some(bytes.clone()),
        }
    }

    fn write_now(&mut self, client: usize, message: Parked) {
        let now = self.now;
        let Some(bytes) = self.encode(&message, now) else { return };
        if matches!(message, Parked::Sync(..)) {
            // The reply leaves after the server's hold time, stamped just before.
            self.now += self.server_hold_nanos;
            self.send(client, false, bytes);
            self.now = now;
        } else {
            self.send(client, false, bytes);
        }
    }

    fn play_note(&mut self, client: usize, midi: u8) {
        let now = self.now;
        let c = &mut self.clients[client];
        let played = c.client.play_note(c.clock.local_at(now), midi, 100, 0);
        self.notes_played.push(PlayedNote { client, true_at: now, note: played.as_ref().map(|p| p.0) });
        if let Some((_, datagram)) = played
            && let Ok(bytes) = encode_client_datagram(&datagram)
        {
            self.send(client, true, bytes);
        }
    }

    fn server_handle_notes(&mut self, client: usize, notes: &[Note]) {
        let member = client as u64;
        let outcome = self.room.handle_notes(ServerNanos(self.now), member, self.muted.contains(&member), notes);
        if let Some(frame) = &outcome.forward
            && let Ok(bytes) = encode_server_datagram(&ServerDatagram::Notes(frame.clone()))
        {
            let to: Vec<u64> = self.room.members().filter(|&m| m != frame.from).collect();
            for member in to {
                self.server_write(member as usize, Parked::Notes(bytes.clone()));
            }
        }
        self.server_notes.push(ServerNotes { at: self.now, from: client, outcome });
    }

    fn client_handle(&mut self, i: usize, datagram: &ServerDatagram) {
        let now = self.now;
        let c = &mut self.clients[i];
        let handled = c.client.handle_datagram(c.clock.local_at(now), datagram);
        let ServerDatagram::Notes(frame) = datagram else { return };
        let mut scheduled = Vec::new();
        while let Some(n) = c.client.poll_note() {
            scheduled.push(n);
        }
        let mut counts = (0u32, 0u32, 0u32);
        for &note in frame.notes.iter() {
            if !self.heard_once.insert((i, frame.from, note.seq)) {
                counts.2 += 1;
                continue;
            }
            let hearing = match scheduled.iter().find(|s| s.from == frame.from && s.note == note) {
                Some(s) => {
                    counts.0 += 1;
                    Hearing::Scheduled { true_at: c.clock.true_at(s.local_at), local_at: s.local_at }
                }
                None => {
                    counts.1 += 1;
                    Hearing::Late
                }
            };
            self.notes_heard.push(HeardNote { receiver: i, from: frame.from, note, arrived_at: now, hearing });
        }
        // The harness's own accounting agrees with the client's.
        debug_assert_eq!(
            handled,
            Handled::Notes { scheduled: counts.0, late: counts.1, duplicates: counts.2 },
            "client {i} at {now}"
        );
    }

    /// Client `i`'s estimate of the server clock minus the truth, now, in ns.
    pub fn offset_error_nanos(&self, i: usize) -> Option<i64> {
        let c = &self.clients[i];
        let est = c.client.server_time(c.clock.local_at(self.now))?;
        Some(est.0 as i64 - self.now as i64)
    }

    /// The true instant at which client `i` would sound beat `beat`, from its own clock.
    pub fn true_instant_of_beat(&self, i: usize, beat: i64) -> Option<u64> {
        let c = &self.clients[i];
        Some(c.clock.true_at(c.client.local_time_of_beat(beat)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rng_repeats_and_is_roughly_uniform() {
        let (mut a, mut b) = (Rng::new(7), Rng::new(7));
        let xs: Vec<f64> = (0..10_000).map(|_| a.uniform()).collect();
        assert!(xs.iter().zip((0..10_000).map(|_| b.uniform())).all(|(x, y)| *x == y));
        let mean = xs.iter().sum::<f64>() / xs.len() as f64;
        assert!((mean - 0.5).abs() < 0.02);
    }

    #[test]
    fn wifi_jitter_has_the_documented_tail() {
        let mut rng = Rng::new(1);
        let p = Profile::classroom_wifi(false);
        let mut delays: Vec<u64> = (0..100_000).map(|_| p.up.base_nanos + p.up.jitter.sample(&mut rng)).collect();
        delays.sort_unstable();
        let q = |f: f64| delays[(f * delays.len() as f64) as usize] as f64 / MS as f64;
        assert!((3.0..6.0).contains(&q(0.5)), "median {}", q(0.5));
        assert!((14.0..28.0).contains(&q(0.9)), "p90 {}", q(0.9));
        assert!((150.0..350.0).contains(&q(0.99)), "p99 {}", q(0.99));
    }

    /// Writes `len`-byte segments at `times` over a fixed 5 ms path each way that is down in
    /// `outages`; when the receiver hands each over.
    fn tcp_deliveries(times: &[u64], outages: Vec<(u64, u64)>) -> (Vec<u64>, TcpStats) {
        let config = TcpConfig::default();
        let path = Path { outages, ..Path::fixed(5 * MS) };
        let back = Path::fixed(5 * MS);
        let (mut pipe, mut state, mut stats, mut rng) =
            (TcpPipe::default(), PathState::new(2), TcpStats::default(), Rng::new(1));
        let delivered = times
            .iter()
            .map(|&t| {
                let link = Link { config: &config, path: &path, state: &mut state, back: &back, stats: &mut stats };
                pipe.write(link, &mut rng, t, 100)
            })
            .collect();
        (delivered, stats)
    }

    #[test]
    fn tcp_retransmits_a_loss_after_the_rto_and_holds_what_follows() {
        // Lost before any RTT sample: retransmitted after the initial 1 s; the next segment
        // arrives at 15 ms and waits for it.
        let (delivered, stats) = tcp_deliveries(&[0, 10 * MS], vec![(0, 1)]);
        assert_eq!(delivered, vec![SEC + 5 * MS, SEC + 5 * MS]);
        assert_eq!((stats.retransmissions, stats.held_back), (1, 1));
    }

    #[test]
    fn tcp_backs_off_through_an_outage() {
        // Ten round trips of 10 ms make the RTO 10 ms + 200 ms (4 * rttvar is below the
        // minimum); a 1 s outage then loses attempts at 1 s, 1.21 s and 1.63 s, and the one at
        // 2.47 s gets through. A segment written during the outage is recovered with it.
        let mut times: Vec<u64> = (0..10).map(|k| k * 50 * MS).collect();
        times.extend([SEC, 1_500 * MS]);
        let (delivered, stats) = tcp_deliveries(&times, vec![(SEC, 2 * SEC)]);
        assert_eq!(delivered[9], 455 * MS);
        assert_eq!(delivered[10], 2_470 * MS + 5 * MS);
        assert_eq!(delivered[11], 2_470 * MS + 5 * MS);
        assert_eq!(stats.retransmissions, 4);
    }

    #[test]
    fn clock_model_inverts() {
        let c = ClockModel { offset_nanos: -400 * MS as i64, drift_ppm: -87.5 };
        for t in [0u64, 1, 999_999_999, 3_600 * SEC] {
            let l = c.local_at(t);
            assert_eq!(c.local_at(c.true_at(l)), l);
        }
    }
}
