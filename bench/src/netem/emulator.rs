//! The emulator: a client network namespace, two TUN devices, and the threads that move
//! packets between them through each client's [`Path`].

use std::cmp::Ordering;
use std::collections::BinaryHeap;
use std::net::Ipv4Addr;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering as AtomicOrdering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender, TryRecvError};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use downbeat_engine::sim::Rng;
use serde::Serialize;
use tun_rs::{DeviceBuilder, InterruptEvent, SyncDevice};

use super::path::{DropCause, Path, Verdict};
use super::profile::Profile;
use super::stats::{DirectionStats, Stats};
use super::sys;

/// Most clients one emulator serves (addresses `10.77.<id>.1` to `10.77.<id>.250`).
pub const MAX_CLIENTS: usize = 250;

/// How long reader and timer threads wait at most before looking at the stop flag.
const POLL: Duration = Duration::from_millis(100);

/// What to bring up.
#[derive(Clone, Debug, Serialize)]
pub struct EmulatorConfig {
    /// Distinguishes emulators running at once: names and addresses derive from it
    /// (`dbnet-<id>`, `dbc<id>`, `dbs<id>`, `10.77.<id>.x`, `10.78.<id>.1`). Two emulators
    /// must never share an id; leftovers of a killed run with the same id are removed.
    pub id: u8,
    /// Simulated clients: one address each, so the emulator tells them apart.
    pub clients: usize,
    /// What happens to the packets.
    pub profile: Profile,
    /// Seeds every path's generator: the same seed and the same packets give the same fate.
    pub seed: u64,
    /// The timer sleeps until this long before a release, then spins (yielding) to release
    /// on time; zero sleeps all the way (less CPU, less accuracy).
    #[serde(serialize_with = "micros")]
    pub spin: Duration,
    /// MTU of both devices.
    pub mtu: u16,
    /// Run the emulator's threads at this real-time priority (SCHED_FIFO, set with `chrt`),
    /// so a busy machine delays releases less; `None` keeps the normal scheduler.
    pub realtime_priority: Option<u8>,
}

fn micros<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_u64(d.as_micros() as u64)
}

impl EmulatorConfig {
    /// `clients` clients behind `profile`, seed 1, 100 us spin, MTU 1500, real-time priority 10.
    pub fn new(id: u8, clients: usize, profile: Profile) -> Self {
        Self { id, clients, profile, seed: 1, spin: Duration::from_micros(100), mtu: 1500, realtime_priority: Some(10) }
    }
}

/// One direction of traffic.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Direction {
    /// Client to server.
    Up,
    /// Server to client.
    Down,
}

/// Which paths an outage hits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target {
    /// Every client, both directions.
    All,
    /// One client, both directions.
    Client(usize),
    /// One direction of one client.
    Path(usize, Direction),
}

#[derive(Debug)]
struct Side {
    paths: Vec<Path>,
    stats: DirectionStats,
}

#[derive(Debug)]
struct Shared {
    up: Mutex<Side>,
    down: Mutex<Side>,
    epoch: Instant,
    stop: AtomicBool,
}

impl Shared {
    fn side(&self, dir: Direction) -> MutexGuard<'_, Side> {
        match dir {
            Direction::Up => &self.up,
            Direction::Down => &self.down,
        }
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
    }

    fn now(&self) -> u64 {
        self.epoch.elapsed().as_nanos() as u64
    }
}

/// A packet waiting for its release.
#[derive(Debug)]
struct Pending {
    at: u64,
    seq: u64,
    dir: Direction,
    read_at: u64,
    data: Vec<u8>,
}

impl Pending {
    fn key(&self) -> (u64, u64, Direction) {
        (self.at, self.seq, self.dir)
    }
}

impl PartialEq for Pending {
    fn eq(&self, other: &Self) -> bool {
        self.key() == other.key()
    }
}

impl Eq for Pending {}

impl PartialOrd for Pending {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

/// Reversed, so the heap's top is the earliest release.
impl Ord for Pending {
    fn cmp(&self, other: &Self) -> Ordering {
        other.key().cmp(&self.key())
    }
}

/// The addresses of emulator `id`.
#[derive(Clone, Copy, Debug)]
struct Addresses {
    id: u8,
    clients: usize,
}

impl Addresses {
    fn client(&self, i: usize) -> Ipv4Addr {
        Ipv4Addr::new(10, 77, self.id, (i + 1) as u8)
    }

    fn server(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, 78, self.id, 1)
    }

    fn client_index(&self, a: Ipv4Addr) -> Option<usize> {
        let [x, y, z, w] = a.octets();
        let i = usize::from(w).checked_sub(1)?;
        ((x, y, z) == (10, 77, self.id) && i < self.clients).then_some(i)
    }

    fn in_server_net(&self, a: Ipv4Addr) -> bool {
        let [x, y, z, _] = a.octets();
        (x, y, z) == (10, 78, self.id)
    }

    /// The client a packet belongs to, if it goes the right way between a client and the
    /// server subnet.
    fn classify(&self, dir: Direction, packet: &[u8]) -> Option<usize> {
        if packet.len() < 20 || packet[0] >> 4 != 4 {
            return None;
        }
        let src = Ipv4Addr::new(packet[12], packet[13], packet[14], packet[15]);
        let dst = Ipv4Addr::new(packet[16], packet[17], packet[18], packet[19]);
        match dir {
            Direction::Up => self.client_index(src).filter(|_| self.in_server_net(dst)),
            Direction::Down => self.client_index(dst).filter(|_| self.in_server_net(src)),
        }
    }
}

/// A running emulator. See the module docs of [`crate::netem`]. Dropping it stops the threads
/// and removes the namespace and the devices.
pub struct Emulator {
    config: EmulatorConfig,
    addresses: Addresses,
    netns: String,
    client_dev: String,
    server_dev: String,
    shared: Arc<Shared>,
    interrupt: Option<Arc<InterruptEvent>>,
    threads: Vec<JoinHandle<()>>,
    epoch_wall: SystemTime,
}

impl std::fmt::Debug for Emulator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Emulator")
            .field("config", &self.config)
            .field("netns", &self.netns)
            .field("client_dev", &self.client_dev)
            .field("server_dev", &self.server_dev)
            .field("threads", &self.threads.len())
            .finish_non_exhaustive()
    }
}

impl Emulator {
    /// Brings the network up: removes leftovers of a killed run with the same id, creates
    /// the namespace `dbnet-<id>` and the devices, addresses and routes, and starts the
    /// threads. Needs root, `/dev/net/tun` and `ip` (iproute2).
    pub fn start(config: EmulatorConfig) -> Result<Self> {
        sys::check_capabilities()?;
        if config.clients == 0 || config.clients > MAX_CLIENTS {
            bail!("clients must be 1 to {MAX_CLIENTS}, not {}", config.clients);
        }
        let addresses = Addresses { id: config.id, clients: config.clients };
        let id = config.id;
        let (netns, client_dev, server_dev) = (format!("dbnet-{id}"), format!("dbc{id}"), format!("dbs{id}"));
        remove_leftovers(&netns, &client_dev, &server_dev);

        let (up, down) = build_paths(&config);
        let epoch_wall = SystemTime::now();
        let shared = Arc::new(Shared {
            up: Mutex::new(Side { paths: up, stats: DirectionStats::default() }),
            down: Mutex::new(Side { paths: down, stats: DirectionStats::default() }),
            epoch: Instant::now(),
            stop: AtomicBool::new(false),
        });
        // From here on, dropping `emulator` (on an error below too) tears down what exists.
        let mut emulator = Self {
            config,
            addresses,
            netns,
            client_dev,
            server_dev,
            shared,
            interrupt: None,
            threads: Vec::new(),
            epoch_wall,
        };
        emulator.bring_up()?;
        Ok(emulator)
    }

    fn bring_up(&mut self) -> Result<()> {
        let (ns, cdev, sdev) = (self.netns.clone(), self.client_dev.clone(), self.server_dev.clone());
        let a = self.addresses;
        sys::ip(&["netns", "add", &ns])?;
        let make = |name: &str| {
            DeviceBuilder::new()
                .name(name)
                .mtu(self.config.mtu)
                .tx_queue_len(4096)
                .enable(false)
                .build_sync()
                .with_context(|| format!("creating TUN device {name} (is another emulator with this id running?)"))
        };
        let server = Arc::new(make(&sdev)?);
        let client = Arc::new(make(&cdev)?);
        sys::ip(&["link", "set", &cdev, "netns", &ns])?;
        // No IPv6 on the devices (no link-local addresses, no router solicitations): only
        // the clients' IPv4 traffic crosses. Best effort: a host without IPv6 refuses it.
        sys::ip_ok(&["link", "set", "dev", &sdev, "addrgenmode", "none"]);
        sys::ip_ok(&["-n", &ns, "link", "set", "dev", &cdev, "addrgenmode", "none"]);
        let (server_addr, client0) = (a.server(), a.client(0));
        let client_net = format!("10.77.{}.0/24", a.id);
        let server_net = format!("10.78.{}.0/24", a.id);
        sys::ip_batch(
            None,
            &[
                format!("link set dev {sdev} up"),
                format!("addr add {server_addr}/32 dev {sdev}"),
                format!("route add {client_net} dev {sdev} src {server_addr}"),
                // Guards: whatever happens to the devices, traffic to emulator addresses never
                // leaves this machine (deliberately left in place; idempotent).
                "route replace unreachable 10.77.0.0/16 metric 4242".to_owned(),
                "route replace unreachable 10.78.0.0/16 metric 4242".to_owned(),
            ],
        )?;
        let mut lines = vec!["link set dev lo up".to_owned(), format!("link set dev {cdev} up")];
        lines.extend((0..self.config.clients).map(|i| format!("addr add {}/32 dev {cdev}", a.client(i))));
        // Only the server subnet is routed through the emulator: nothing else is reachable
        // from the namespace.
        lines.push(format!("route add {server_net} dev {cdev} src {client0}"));
        sys::ip_batch(Some(&ns), &lines)?;

        server.set_nonblocking(true).context("TUN non-blocking")?;
        client.set_nonblocking(true).context("TUN non-blocking")?;
        let interrupt = Arc::new(InterruptEvent::new().context("creating the interrupt event")?);
        self.interrupt = Some(interrupt.clone());
        let (tx, rx) = mpsc::channel();
        let rt = self.config.realtime_priority;
        for (dir, dev) in [(Direction::Up, client.clone()), (Direction::Down, server.clone())] {
            let (shared, interrupt, tx) = (self.shared.clone(), interrupt.clone(), tx.clone());
            let name = format!("netem-{}-{dir:?}", a.id);
            self.threads.push(
                std::thread::Builder::new()
                    .name(name)
                    .spawn(move || {
                        realtime(rt);
                        read_loop(&dev, dir, a, &shared, &interrupt, &tx);
                    })
                    .context("spawning a reader thread")?,
            );
        }
        drop(tx);
        let (shared, spin) = (self.shared.clone(), self.config.spin);
        self.threads.push(
            std::thread::Builder::new()
                .name(format!("netem-{}-timer", a.id))
                .spawn(move || {
                    realtime(rt);
                    release_loop(&rx, &client, &server, &shared, spin);
                })
                .context("spawning the timer thread")?,
        );
        Ok(())
    }

    /// The configuration it runs with.
    pub fn config(&self) -> &EmulatorConfig {
        &self.config
    }

    /// The profile it applies.
    pub fn profile(&self) -> &Profile {
        &self.config.profile
    }

    /// Client `i`'s address (`10.77.<id>.<i + 1>`), in the namespace. A client that wants its
    /// own path binds its sockets to it; unbound sockets get client 0's.
    ///
    /// # Panics
    /// If `i` is not below the number of clients.
    pub fn client_addr(&self, i: usize) -> Ipv4Addr {
        assert!(i < self.config.clients, "client {i} of {}", self.config.clients);
        self.addresses.client(i)
    }

    /// Every client's address, in order.
    pub fn client_addrs(&self) -> Vec<Ipv4Addr> {
        (0..self.config.clients).map(|i| self.addresses.client(i)).collect()
    }

    /// The server's address (`10.78.<id>.1`), in the root namespace: servers listen on it (or
    /// on 0.0.0.0).
    pub fn server_addr(&self) -> Ipv4Addr {
        self.addresses.server()
    }

    /// The clients' network namespace.
    pub fn netns(&self) -> &str {
        &self.netns
    }

    /// The TUN device in the clients' namespace and the one in the root namespace.
    pub fn devices(&self) -> (&str, &str) {
        (&self.client_dev, &self.server_dev)
    }

    /// A command that runs `program` inside the clients' namespace (`ip netns exec`).
    pub fn command_in_netns(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.netns]).arg(program);
        cmd
    }

    /// When the emulator's clock started: path times and the power-save beacon grid count
    /// from here.
    pub fn epoch(&self) -> Instant {
        self.shared.epoch
    }

    /// The wall-clock reading at [`Self::epoch`] (for processes that stamp packets with the
    /// wall clock).
    pub fn epoch_wall(&self) -> SystemTime {
        self.epoch_wall
    }

    /// The wall-clock epoch in ns since the Unix epoch.
    pub fn epoch_wall_nanos(&self) -> u64 {
        self.epoch_wall.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64)
    }

    /// Counters and delay histograms so far.
    pub fn stats(&self) -> Stats {
        Stats {
            up: self.shared.side(Direction::Up).stats.clone(),
            down: self.shared.side(Direction::Down).stats.clone(),
        }
    }

    /// Starts an outage now on `target` that lasts `duration`.
    pub fn outage(&self, target: Target, duration: Duration) {
        let until = self.shared.now() + duration.as_nanos() as u64;
        let clients = self.config.clients;
        let (who, dirs): (Vec<usize>, &[Direction]) = match target {
            Target::All => ((0..clients).collect(), &[Direction::Up, Direction::Down]),
            Target::Client(i) => (vec![i], &[Direction::Up, Direction::Down]),
            Target::Path(i, Direction::Up) => (vec![i], &[Direction::Up]),
            Target::Path(i, Direction::Down) => (vec![i], &[Direction::Down]),
        };
        for &dir in dirs {
            let mut side = self.shared.side(dir);
            for &i in &who {
                if let Some(path) = side.paths.get_mut(i) {
                    path.outage_until(until);
                }
            }
        }
    }

    fn tear_down(&mut self) {
        self.shared.stop.store(true, AtomicOrdering::SeqCst);
        if let Some(interrupt) = &self.interrupt {
            // If the trigger fails, the readers still see the stop flag within `POLL`.
            let _ = interrupt.trigger();
        }
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        // The threads held the devices: closing them removed the devices.
        remove_leftovers(&self.netns, &self.client_dev, &self.server_dev);
    }
}

impl Drop for Emulator {
    fn drop(&mut self) {
        self.tear_down();
    }
}

/// Every client's uplink and downlink paths, as the emulator builds them: each path gets its
/// own generator, drawn in a fixed order from the seed, so one client's traffic never changes
/// another's fate. Outage phases are per client (both directions).
pub(crate) fn build_paths(config: &EmulatorConfig) -> (Vec<Path>, Vec<Path>) {
    let mut master = Rng::new(config.seed);
    let (mut up, mut down) = (Vec::new(), Vec::new());
    let p = &config.profile;
    for i in 0..config.clients {
        let periodic = p.outages.map(|o| (o, (master.uniform() * o.every_nanos as f64) as u64));
        up.push(Path::new(p.up.clone(), None, periodic, master.next_u64()));
        let power_save = p.power_save.filter(|_| p.power_saves(i));
        down.push(Path::new(p.down.clone(), power_save, periodic, master.next_u64()));
    }
    (up, down)
}

/// Removes the namespace and devices of an emulator with these names, if any.
fn remove_leftovers(netns: &str, client_dev: &str, server_dev: &str) {
    if sys::netns_exists(netns) {
        sys::ip_ok(&["netns", "del", netns]);
    }
    for dev in [client_dev, server_dev] {
        if sys::link_exists(dev) {
            sys::ip_ok(&["link", "del", dev]);
        }
    }
}

/// Puts the calling thread on the real-time scheduler at `priority` (best effort: where
/// `chrt` is missing or refused, the thread keeps the normal scheduler, with a warning).
fn realtime(priority: Option<u8>) {
    let Some(priority) = priority else { return };
    // "/proc/thread-self" links to "<pid>/task/<tid>".
    let tid = std::fs::read_link("/proc/thread-self")
        .ok()
        .and_then(|p| p.file_name().and_then(|n| n.to_str()).and_then(|n| n.parse::<u32>().ok()));
    let Some(tid) = tid else { return };
    let ok = Command::new("chrt")
        .args(["--fifo", "-p", &priority.to_string(), &tid.to_string()])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        eprintln!("netem: could not give thread {tid} real-time priority (chrt); timing may suffer under load");
    }
}

fn read_loop(
    dev: &SyncDevice,
    dir: Direction,
    addresses: Addresses,
    shared: &Shared,
    interrupt: &InterruptEvent,
    tx: &Sender<Pending>,
) {
    let mut buf = vec![0u8; 65_536];
    let mut seq = 0u64;
    while !shared.stop.load(AtomicOrdering::Relaxed) {
        let n = match dev.recv_intr_timeout(&mut buf, interrupt, Some(POLL)) {
            Ok(n) => n,
            Err(e) if matches!(e.kind(), std::io::ErrorKind::TimedOut | std::io::ErrorKind::WouldBlock) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                if !shared.stop.load(AtomicOrdering::Relaxed) {
                    eprintln!("netem: reading {dir:?} packets failed: {e}");
                }
                return;
            }
        };
        let packet = &buf[..n];
        let now = shared.now();
        let verdict = {
            let mut side = shared.side(dir);
            match addresses.classify(dir, packet) {
                None => {
                    side.stats.ignored += 1;
                    None
                }
                Some(i) => {
                    let verdict = side.paths[i].admit(now);
                    let stats = &mut side.stats;
                    stats.packets += 1;
                    match verdict {
                        Verdict::Drop(DropCause::Random) => stats.dropped_random += 1,
                        Verdict::Drop(DropCause::Burst) => stats.dropped_burst += 1,
                        Verdict::Drop(DropCause::Outage) => stats.dropped_outage += 1,
                        Verdict::Deliver { held, reordered, .. } => {
                            stats.held_power_save += u64::from(held);
                            stats.reordered += u64::from(reordered);
                        }
                    }
                    Some(verdict)
                }
            }
        };
        if let Some(Verdict::Deliver { at, .. }) = verdict {
            seq += 1;
            if tx.send(Pending { at, seq, dir, read_at: now, data: packet.to_vec() }).is_err() {
                return;
            }
        }
    }
}

fn release_loop(rx: &Receiver<Pending>, client: &SyncDevice, server: &SyncDevice, shared: &Shared, spin: Duration) {
    let spin = spin.as_nanos() as u64;
    let mut heap: BinaryHeap<Pending> = BinaryHeap::new();
    let mut open = true;
    while !shared.stop.load(AtomicOrdering::Relaxed) {
        while open {
            match rx.try_recv() {
                Ok(p) => heap.push(p),
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => open = false,
            }
        }
        let now = shared.now();
        let Some(next) = heap.peek().map(|p| p.at) else {
            if !open {
                return;
            }
            match rx.recv_timeout(POLL) {
                Ok(p) => heap.push(p),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => return,
            }
            continue;
        };
        if next <= now {
            let Some(p) = heap.pop() else { continue };
            let dev = match p.dir {
                Direction::Up => server,
                Direction::Down => client,
            };
            let result = dev.send(&p.data);
            let sent = shared.now();
            let mut side = shared.side(p.dir);
            match result {
                Ok(_) => {
                    side.stats.forwarded += 1;
                    side.stats.added_delay.record(sent.saturating_sub(p.read_at));
                    side.stats.lateness.record(sent.saturating_sub(p.at));
                }
                Err(_) => side.stats.write_errors += 1,
            }
            continue;
        }
        let wait = next - now;
        if wait > spin && open {
            // Sleep until shortly before the release, waking for any new packet.
            match rx.recv_timeout(Duration::from_nanos((wait - spin).min(POLL.as_nanos() as u64))) {
                Ok(p) => heap.push(p),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => open = false,
            }
        } else if wait > spin {
            std::thread::sleep(Duration::from_nanos(wait - spin).min(POLL));
        } else {
            std::thread::yield_now();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn packet(src: [u8; 4], dst: [u8; 4]) -> Vec<u8> {
        let mut p = vec![0u8; 28];
        p[0] = 0x45;
        p[12..16].copy_from_slice(&src);
        p[16..20].copy_from_slice(&dst);
        p
    }

    #[test]
    fn packets_are_classified_by_client_address_and_direction() {
        let a = Addresses { id: 7, clients: 3 };
        assert_eq!(a.client(0), Ipv4Addr::new(10, 77, 7, 1));
        assert_eq!(a.server(), Ipv4Addr::new(10, 78, 7, 1));
        assert_eq!(a.classify(Direction::Up, &packet([10, 77, 7, 3], [10, 78, 7, 1])), Some(2));
        assert_eq!(a.classify(Direction::Down, &packet([10, 78, 7, 1], [10, 77, 7, 1])), Some(0));
        // Unknown client, wrong emulator, wrong way, elsewhere, not IPv4, truncated.
        assert_eq!(a.classify(Direction::Up, &packet([10, 77, 7, 4], [10, 78, 7, 1])), None);
        assert_eq!(a.classify(Direction::Up, &packet([10, 77, 8, 1], [10, 78, 7, 1])), None);
        assert_eq!(a.classify(Direction::Down, &packet([10, 77, 7, 1], [10, 78, 7, 1])), None);
        assert_eq!(a.classify(Direction::Up, &packet([10, 77, 7, 1], [8, 8, 8, 8])), None);
        let mut v6 = packet([10, 77, 7, 1], [10, 78, 7, 1]);
        v6[0] = 0x60;
        assert_eq!(a.classify(Direction::Up, &v6), None);
        assert_eq!(a.classify(Direction::Up, &[0x45; 10]), None);
        assert_eq!(Addresses { id: 7, clients: 250 }.client(249), Ipv4Addr::new(10, 77, 7, 250));
    }

    #[test]
    fn pending_packets_leave_earliest_first_then_in_order_read() {
        let p = |at, seq| Pending { at, seq, dir: Direction::Up, read_at: 0, data: Vec::new() };
        let mut heap: BinaryHeap<Pending> = [p(5, 1), p(3, 2), p(5, 0), p(9, 3)].into_iter().collect();
        let order: Vec<(u64, u64)> = std::iter::from_fn(|| heap.pop().map(|x| (x.at, x.seq))).collect();
        assert_eq!(order, [(3, 2), (5, 0), (5, 1), (9, 3)]);
    }
}
