//! The three peer systems Downbeat is compared with (`bench/peers/`, Node programs): starting
//! their servers, running their load and measurement client (`client.mjs`), reading its JSON,
//! and turning that into the same [`SystemResult`] figures the Downbeat side reports.
//!
//! Every instant in a [`PeerRun`] is an exact integer of nanoseconds on `CLOCK_MONOTONIC`, the
//! clock shared by every process on the host (see `bench/peers/README.md`). Two peers have no
//! clock sync and play every beat and note when it arrives, so their "onset" is an arrival
//! instant. The third ([`PeerKind::Timesync`]) syncs an injected clock with `timesync` and
//! schedules ahead, as Downbeat's students do, so its figures are measured as Downbeat's are:
//! clock error against the truth, and the true instants beats and notes are scheduled for.
//!
//! The figures are pure functions of a [`PeerRun`] ([`sync_result`], [`onset_result`],
//! [`fanout_result`], [`join_result`]). Students whose join failed are left out of the beat
//! and note figures (they have no arrivals at all) and counted once, in `join_failures`.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fmt;
use std::io::{BufRead, BufReader, Read};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::metrics::{Better, Metric, Summary, SystemResult, converged_metric};
use crate::netem::Emulator;

/// The oldest Node.js major version the peers run on (`package.json`'s `engines`).
const NODE_MIN_MAJOR: u32 = 20;
/// How long a peer server may take to print its `{"port": N}` line.
const SERVER_START_TIMEOUT: Duration = Duration::from_secs(15);
/// How long a peer server may take to exit after SIGTERM (it forces its own exit after 2 s).
const SERVER_STOP_GRACE: Duration = Duration::from_secs(5);
/// Beats sent in the first 2 s after the start are left out of the clock-error figures, as
/// Downbeat's are ("after 2 s").
const SYNC_SETTLE_NS: u64 = 2_000_000_000;
/// A beat that arrives this much later than its client's median beat latency is heard as
/// displaced.
const LATE_MS: f64 = 6.0;
/// Lines of a failed client's stderr quoted in the error.
const STDERR_TAIL_LINES: usize = 30;

/// Which peer system.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum PeerKind {
    /// Peer 1: a Socket.IO metronome (`setInterval` per room), `socketio-server.mjs`.
    #[serde(rename = "socketio")]
    SocketIo,
    /// Peer 2: a plain WebSocket server with a `setTimeout` chain per room, `ws-server.mjs`.
    #[serde(rename = "ws")]
    Ws,
    /// Peer 3: Socket.IO plus `timesync` clock sync plus lookahead scheduling on the synced
    /// clock, `timesync-server.mjs`: the strongest design without Downbeat.
    #[serde(rename = "timesync")]
    Timesync,
}

impl PeerKind {
    /// Every peer, in table order.
    pub const ALL: [Self; 3] = [Self::SocketIo, Self::Ws, Self::Timesync];

    /// Stable name: the `system` of its results and `client.mjs --peer` (`socketio`, `ws`,
    /// `timesync`).
    pub fn name(self) -> &'static str {
        match self {
            Self::SocketIo => "socketio",
            Self::Ws => "ws",
            Self::Timesync => "timesync",
        }
    }

    /// Human name for tables and plot legends.
    pub fn display(self) -> &'static str {
        match self {
            Self::SocketIo => "Socket.IO",
            Self::Ws => "WebSocket timer",
            Self::Timesync => "Socket.IO + timesync",
        }
    }

    /// The server's script file name in [`peers_dir`].
    pub fn script(self) -> &'static str {
        match self {
            Self::SocketIo => "socketio-server.mjs",
            Self::Ws => "ws-server.mjs",
            Self::Timesync => "timesync-server.mjs",
        }
    }

    /// Whether its students sync their clocks and schedule ahead (rather than play on arrival).
    pub fn schedules_ahead(self) -> bool {
        self == Self::Timesync
    }
}

impl fmt::Display for PeerKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for PeerKind {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> Result<Self> {
        Self::ALL
            .into_iter()
            .find(|k| k.name() == s)
            .ok_or_else(|| anyhow!("unknown peer '{s}' (socketio, ws or timesync)"))
    }
}

/// `bench/peers` of this checkout (absolute).
pub fn peers_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("peers")
}

/// Checks that `node` (20 or later) is on `PATH` and that `bench/peers/node_modules` is
/// installed, with an error that says how to fix it otherwise.
pub fn check_installed() -> Result<()> {
    let out = Command::new("node").arg("--version").stdin(Stdio::null()).output().map_err(|e| {
        anyhow!(
            "`node` could not be run ({e}); the peers need Node.js {NODE_MIN_MAJOR} or later \
             (apt-get install nodejs npm), then run `cd bench/peers && npm ci`"
        )
    })?;
    let version = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    if !out.status.success() {
        bail!("`node --version` failed ({}); the peers need Node.js {NODE_MIN_MAJOR} or later", out.status);
    }
    let major = version.trim_start_matches('v').split('.').next().and_then(|m| m.parse::<u32>().ok());
    match major {
        Some(major) if major >= NODE_MIN_MAJOR => {}
        _ => bail!("the peers need Node.js {NODE_MIN_MAJOR} or later, but `node --version` says '{version}'"),
    }
    let modules = peers_dir().join("node_modules");
    for package in ["socket.io", "socket.io-client", "ws", "timesync"] {
        if !modules.join(package).join("package.json").is_file() {
            bail!(
                "the peers' npm packages are not installed ({} has no {package}): run `cd bench/peers && npm ci`",
                modules.display()
            );
        }
    }
    Ok(())
}

/// Sends SIGTERM to `child` and waits up to `grace` for it to exit; kills it (SIGKILL) after
/// that and says so. `child` is not reaped before it exits, so its pid cannot be anyone else's.
fn terminate(child: &mut Child, grace: Duration) -> Result<ExitStatus> {
    if let Some(status) = child.try_wait()? {
        return Ok(status);
    }
    // std has no SIGTERM and this crate has no unsafe code: kill(1) sends it.
    let sent = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if sent {
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if let Some(status) = child.try_wait()? {
                return Ok(status);
            }
            thread::sleep(Duration::from_millis(10));
        }
    }
    child.kill().ok();
    let status = child.wait()?;
    if sent {
        bail!("pid {} did not exit within {grace:?} of SIGTERM and was killed ({status})", child.id());
    }
    bail!("could not send SIGTERM to pid {}; it was killed ({status})", child.id())
}

/// A running peer server (`node <script> --host H --port 0`) in the root namespace. Its stderr
/// goes to this process's stderr. Stopped with SIGTERM by [`Self::stop`] or on drop.
#[derive(Debug)]
pub struct PeerServer {
    kind: PeerKind,
    host: IpAddr,
    port: u16,
    pid: u32,
    child: Option<Child>,
}

impl PeerServer {
    /// Starts `kind`'s server listening on `host` and an OS-chosen port, and waits (up to
    /// 15 s) for the port it prints.
    pub fn start(kind: PeerKind, host: IpAddr) -> Result<Self> {
        check_installed()?;
        let dir = peers_dir();
        let mut child = Command::new("node")
            .arg(dir.join(kind.script()))
            .args(["--host", &host.to_string(), "--port", "0"])
            .current_dir(&dir)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| format!("starting the {} peer server", kind.display()))?;
        let pid = child.id();
        let stdout = child.stdout.take().context("the server's stdout")?;
        let (tx, rx) = mpsc::channel();
        // Reads the port line, then drains stdout until the server exits so it never blocks.
        thread::Builder::new()
            .name(format!("peer-{}-stdout", kind.name()))
            .spawn(move || {
                let mut lines = BufReader::new(stdout).lines();
                let first = match lines.next() {
                    Some(Ok(line)) => Ok(line),
                    Some(Err(e)) => Err(format!("reading its stdout: {e}")),
                    None => Err("it closed its stdout without printing its port".to_owned()),
                };
                let _ = tx.send(first);
                for _ in lines.map_while(std::result::Result::ok) {}
            })
            .context("spawning the server's stdout reader")?;
        let mut server = Self { kind, host, port: 0, pid, child: Some(child) };
        let line = match rx.recv_timeout(SERVER_START_TIMEOUT) {
            Ok(Ok(line)) => line,
            Ok(Err(why)) => bail!("the {} peer server failed to start: {why}{}", kind.display(), server.exit_note()),
            Err(_) => bail!(
                "the {} peer server printed no port within {SERVER_START_TIMEOUT:?}{}",
                kind.display(),
                server.exit_note()
            ),
        };
        #[derive(Deserialize)]
        struct PortLine {
            port: u16,
        }
        let PortLine { port } = serde_json::from_str(&line).with_context(|| {
            format!("the {} peer server's first line is not {{\"port\": N}}: {line:?}", kind.display())
        })?;
        if port == 0 {
            bail!("the {} peer server reported port 0", kind.display());
        }
        server.port = port;
        Ok(server)
    }

    /// Waits briefly for an exit status to quote in a start error (stops the server if it
    /// still runs).
    fn exit_note(&mut self) -> String {
        let Some(child) = self.child.as_mut() else { return String::new() };
        thread::sleep(Duration::from_millis(100));
        match child.try_wait() {
            Ok(Some(status)) => format!(" (it exited: {status})"),
            _ => String::new(),
        }
    }

    /// Which peer this is.
    pub fn kind(&self) -> PeerKind {
        self.kind
    }

    /// The address it listens on.
    pub fn host(&self) -> IpAddr {
        self.host
    }

    /// The port it listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The socket address it listens on.
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::new(self.host, self.port)
    }

    /// Its process id (for CPU and memory accounting).
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// `http://host:port` (IPv6 hosts in brackets), what [`ClientRun::url`] takes.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr())
    }

    /// Stops it: SIGTERM, then up to 5 s for it to exit (it forces its own exit after 2 s),
    /// then SIGKILL, which is an error.
    pub fn stop(mut self) -> Result<ExitStatus> {
        let mut child = self.child.take().context("already stopped")?;
        terminate(&mut child, SERVER_STOP_GRACE)
            .with_context(|| format!("stopping the {} peer server", self.kind.display()))
    }
}

impl Drop for PeerServer {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = terminate(&mut child, SERVER_STOP_GRACE);
        }
    }
}

/// A temporary file path, removed on drop.
#[derive(Debug)]
struct TempPath(PathBuf);

impl TempPath {
    fn new(stem: &str) -> Result<Self> {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let dir = std::env::temp_dir();
        loop {
            let n = NEXT.fetch_add(1, Ordering::Relaxed);
            let path = dir.join(format!("downbeat-{stem}-{}-{n}.json", std::process::id()));
            match std::fs::OpenOptions::new().write(true).create_new(true).open(&path) {
                Ok(_) => return Ok(Self(path)),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(e).with_context(|| format!("creating {}", path.display())),
            }
        }
    }
}

impl Drop for TempPath {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// The last `lines` lines of `text`.
fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// One run of `client.mjs`: its students, the teacher, and what they measure. Fields are the
/// client's options; [`ClientRun::new`] gives the client's defaults.
#[derive(Clone, Debug, PartialEq)]
pub struct ClientRun {
    /// Which peer the server is (`--peer`).
    pub peer: PeerKind,
    /// The server, `http://host:port` (`--url`), e.g. [`PeerServer::url`].
    pub url: String,
    /// Students, each with its own connection (`--clients`).
    pub clients: usize,
    /// How long the teacher keeps the metronome running, in seconds (`--seconds`).
    pub seconds: f64,
    /// The starting tempo (`--bpm`), 20 to 400 (the peers ignore other tempos).
    pub bpm: f64,
    /// Tempo changes as (seconds after start, bpm) (`--tempo-change`).
    pub tempo_changes: Vec<(f64, f64)>,
    /// Notes each student plays per second while the metronome runs (`--notes-per-second`).
    pub notes_per_second: f64,
    /// Node processes the students are spread over (`--processes`).
    pub processes: usize,
    /// Source addresses for the client sockets; student `g` uses entry `g mod len`
    /// (`--bind-address`). Empty: unbound, or the emulator's client addresses when the run
    /// goes through one.
    pub bind_addresses: Vec<IpAddr>,
    /// Room code (`--room`).
    pub room: String,
    /// How long the students keep listening after `stopped`, in ms (`--drain-ms`).
    pub drain_ms: u64,
    /// The client's own deadline for the whole run (`--timeout-seconds`); `None` is the
    /// client's default, `seconds + 60`. This process waits that long plus the drain and 15 s.
    pub timeout: Option<Duration>,
}

impl ClientRun {
    /// A run against `url` with `client.mjs`'s defaults: 5 students, 10 s, 120 BPM, no notes,
    /// one process, room `bench`, 300 ms drain.
    pub fn new(peer: PeerKind, url: impl Into<String>) -> Self {
        Self {
            peer,
            url: url.into(),
            clients: 5,
            seconds: 10.0,
            bpm: 120.0,
            tempo_changes: Vec::new(),
            notes_per_second: 0.0,
            processes: 1,
            bind_addresses: Vec::new(),
            room: "bench".to_owned(),
            drain_ms: 300,
            timeout: None,
        }
    }

    /// The client's deadline in seconds.
    fn timeout_seconds(&self) -> f64 {
        self.timeout.map_or(self.seconds + 60.0, |t| t.as_secs_f64())
    }

    /// `client.mjs`'s arguments (after the script path) for this run, writing its JSON to
    /// `out`; `bind` replaces [`Self::bind_addresses`] when that is empty.
    pub fn args(&self, out: &Path, bind: &[IpAddr]) -> Vec<OsString> {
        let mut args: Vec<OsString> = Vec::new();
        let mut push = |name: &str, value: String| {
            args.push(name.into());
            args.push(value.into());
        };
        push("--peer", self.peer.name().to_owned());
        push("--url", self.url.clone());
        push("--clients", self.clients.to_string());
        push("--room", self.room.clone());
        push("--seconds", self.seconds.to_string());
        push("--bpm", self.bpm.to_string());
        if !self.tempo_changes.is_empty() {
            let list: Vec<String> = self.tempo_changes.iter().map(|(at, bpm)| format!("{at}:{bpm}")).collect();
            push("--tempo-change", list.join(","));
        }
        push("--notes-per-second", self.notes_per_second.to_string());
        push("--processes", self.processes.to_string());
        let bind = if self.bind_addresses.is_empty() { bind } else { &self.bind_addresses };
        if !bind.is_empty() {
            let list: Vec<String> = bind.iter().map(ToString::to_string).collect();
            push("--bind-address", list.join(","));
        }
        push("--drain-ms", self.drain_ms.to_string());
        push("--timeout-seconds", self.timeout_seconds().to_string());
        args.push("--out".into());
        args.push(out.as_os_str().to_owned());
        args
    }

    fn validate(&self) -> Result<()> {
        if self.clients == 0 {
            bail!("a peer run needs at least one student");
        }
        if self.processes == 0 || self.processes > self.clients {
            bail!("processes must be 1 to the number of students ({}), not {}", self.clients, self.processes);
        }
        if !(self.seconds.is_finite() && self.seconds > 0.0) {
            bail!("seconds must be positive, not {}", self.seconds);
        }
        for bpm in std::iter::once(self.bpm).chain(self.tempo_changes.iter().map(|t| t.1)) {
            // The peers silently ignore a tempo outside this range and keep 120 BPM.
            if !(20.0..=400.0).contains(&bpm) {
                bail!("the peers accept 20 to 400 BPM, not {bpm}");
            }
        }
        if !(self.notes_per_second.is_finite() && self.notes_per_second >= 0.0) {
            bail!("notes per second must be 0 or more, not {}", self.notes_per_second);
        }
        Ok(())
    }

    /// Runs `client.mjs` to completion and parses its JSON. With `netns`, the client runs
    /// inside the emulator's client namespace (`ip netns exec`, so root) and, unless
    /// [`Self::bind_addresses`] says otherwise, binds its students to the emulator's client
    /// addresses. Fails with the tail of the client's stderr if it fails or overruns.
    pub fn run(&self, netns: Option<&Emulator>) -> Result<PeerRun> {
        self.validate()?;
        check_installed()?;
        let dir = peers_dir();
        let out = TempPath::new(&format!("peer-{}", self.peer.name()))?;
        let bind: Vec<IpAddr> = match netns {
            Some(emulator) => emulator.client_addrs().into_iter().map(IpAddr::V4).collect(),
            None => Vec::new(),
        };
        let mut cmd = match netns {
            Some(emulator) => emulator.command_in_netns("node"),
            None => Command::new("node"),
        };
        cmd.arg(dir.join("client.mjs"))
            .args(self.args(&out.0, &bind))
            .current_dir(&dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let what = format!("the {} client (client.mjs)", self.peer.display());
        let mut child = cmd.spawn().with_context(|| format!("starting {what}"))?;
        let mut stderr = child.stderr.take().context("the client's stderr")?;
        let reader = thread::Builder::new()
            .name(format!("peer-{}-client-stderr", self.peer.name()))
            .spawn(move || {
                let mut text = Vec::new();
                let _ = stderr.read_to_end(&mut text);
                String::from_utf8_lossy(&text).into_owned()
            })
            .context("spawning the client's stderr reader")?;

        let limit = Duration::from_secs_f64(self.timeout_seconds())
            + Duration::from_millis(self.drain_ms)
            + Duration::from_secs(15);
        let deadline = Instant::now() + limit;
        let status = loop {
            if let Some(status) = child.try_wait()? {
                break Some(status);
            }
            if Instant::now() >= deadline {
                child.kill().ok();
                child.wait().ok();
                break None;
            }
            thread::sleep(Duration::from_millis(20));
        };
        // The client's children (with --processes) may hold stderr a little longer.
        let err_text = reader.join().unwrap_or_default();
        let err_tail = tail(&err_text, STDERR_TAIL_LINES);
        match status {
            None => bail!("{what} did not finish within {limit:?}; it was killed. Its stderr ends:\n{err_tail}"),
            Some(status) if !status.success() => bail!("{what} failed ({status}). Its stderr ends:\n{err_tail}"),
            Some(_) => {}
        }
        let text = std::fs::read_to_string(&out.0).with_context(|| format!("reading {what}'s output"))?;
        let run = PeerRun::from_json(&text)
            .with_context(|| format!("parsing {what}'s output. Its stderr ends:\n{err_tail}"))?;
        if run.peer != self.peer {
            bail!("{what} reported peer {}, not {}", run.peer, self.peer);
        }
        Ok(run)
    }
}

/// A tempo change as the client saw it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TempoChange {
    /// Server instant of the change, ns.
    pub at_ns: u64,
    /// The new tempo.
    pub bpm: f64,
    /// Index of the first beat the server sent after the change.
    pub next_index: u64,
}

/// One beat and when each student got it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BeatRecord {
    /// Beat number; beat 0 is sent at the start.
    pub index: u64,
    /// Server instant the beat was sent, ns.
    pub server_sent_ns: u64,
    /// Per student (the run's student order), its arrival instant, ns; `None` if it never came.
    pub arrivals_ns: Vec<Option<u64>>,
    /// Scheduling peers: the server instant the beat sounds at, ns.
    #[serde(default)]
    pub at_ns: Option<u64>,
    /// Scheduling peers, per student: the true instant it scheduled the beat for, ns.
    #[serde(default)]
    pub onsets_ns: Vec<Option<u64>>,
    /// Scheduling peers, per student: the true instant it decided that, ns (after the onset:
    /// late).
    #[serde(default)]
    pub decided_ns: Vec<Option<u64>>,
}

/// One note and when each student got it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct NoteRecord {
    /// Global id of the student who played it (see [`PeerRun::client_ids`]).
    pub from: u64,
    /// The sender's note number.
    pub seq: u64,
    /// Sender's instant of sending, ns (`None` only if the sender is in no part of this run
    /// and no copy carried it).
    pub sent_ns: Option<u64>,
    /// Per student, its arrival instant, ns; the sender's own entry is always `None`.
    pub arrivals_ns: Vec<Option<u64>>,
    /// Scheduling peers, per student: the true instant it scheduled the note for (its
    /// `playAt` on that student's synced clock), ns; before the arrival means too late to play.
    #[serde(default)]
    pub playouts_ns: Vec<Option<u64>>,
}

/// A student that could not connect or join.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ConnectError {
    /// Its global id.
    pub client: u64,
    /// What went wrong.
    pub error: String,
}

/// `client.mjs`'s JSON output, as written (see `bench/peers/README.md`, "Output schema").
/// Arrays indexed by student follow [`Self::client_ids`]' order.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PeerRun {
    /// Which peer.
    pub peer: PeerKind,
    /// The server's URL.
    #[serde(default)]
    pub url: String,
    /// Room code.
    #[serde(default)]
    pub room: String,
    /// Students in this file.
    pub clients: usize,
    /// Global id of each student (a note's `from` is one of these).
    #[serde(default)]
    pub client_ids: Vec<u64>,
    /// The starting tempo asked for.
    pub bpm: f64,
    /// Seconds the metronome was to run.
    #[serde(default)]
    pub seconds: f64,
    /// Notes per second per student asked for.
    #[serde(default)]
    pub notes_per_second: f64,
    /// Client processes that ran the students.
    #[serde(default)]
    pub processes: usize,
    /// Server instant of `start`, ns (`None` if it never started).
    pub started_ns: Option<u64>,
    /// The tempo the server started with.
    #[serde(default)]
    pub started_bpm: Option<f64>,
    /// Server instant of `stop`, ns.
    pub stopped_ns: Option<u64>,
    /// Tempo changes, in order.
    #[serde(default)]
    pub tempo_changes: Vec<TempoChange>,
    /// Every beat any student got, by index.
    pub beats: Vec<BeatRecord>,
    /// Every note sent or received, by (from, seq).
    pub notes: Vec<NoteRecord>,
    /// Per student, connect + join acknowledged in ms (`None` if it failed).
    pub connect_ms: Vec<Option<f64>>,
    /// Per student, its address as the server saw it.
    #[serde(default)]
    pub server_addresses: Vec<Option<String>>,
    /// Students that could not connect or join.
    #[serde(default)]
    pub connect_errors: Vec<ConnectError>,
    /// Scheduling peers: how far ahead the server sends beats and places changes, ms.
    #[serde(default)]
    pub lead_ms: Option<f64>,
    /// Scheduling peers: how far ahead students schedule beats, ms.
    #[serde(default)]
    pub lookahead_ms: Option<f64>,
    /// Scheduling peers: a note sounds this long after it is played, ms.
    #[serde(default)]
    pub playout_delay_ms: Option<f64>,
    /// Scheduling peers, per student: when its socket connected, ns (clock errors count from
    /// 2 s after it, as Downbeat's count from its welcome).
    #[serde(default)]
    pub welcomed_ns: Vec<Option<u64>>,
    /// Scheduling peers, per student: connect start to its first completed sync round, ms.
    #[serde(default)]
    pub synced_ms: Vec<Option<f64>>,
    /// Scheduling peers, per student: (instant, estimate of the server clock − truth), ns,
    /// every 100 ms from its first offset on.
    #[serde(default)]
    pub clock_errors_ns: Vec<Vec<(u64, i64)>>,
}

impl PeerRun {
    /// Parses `client.mjs`'s JSON and checks that its per-student arrays match `clients`.
    pub fn from_json(text: &str) -> Result<Self> {
        let run: Self = serde_json::from_str(text).context("client.mjs output does not match the schema")?;
        let n = run.clients;
        if run.connect_ms.len() != n {
            bail!("connect_ms has {} entries for {n} students", run.connect_ms.len());
        }
        if !run.client_ids.is_empty() && run.client_ids.len() != n {
            bail!("client_ids has {} entries for {n} students", run.client_ids.len());
        }
        if let Some(b) = run.beats.iter().find(|b| b.arrivals_ns.len() != n) {
            bail!("beat {} has {} arrivals for {n} students", b.index, b.arrivals_ns.len());
        }
        if let Some(m) = run.notes.iter().find(|m| m.arrivals_ns.len() != n) {
            bail!("note {}:{} has {} arrivals for {n} students", m.from, m.seq, m.arrivals_ns.len());
        }
        if run.peer.schedules_ahead() {
            let per_student = [
                ("welcomed_ns", run.welcomed_ns.len()),
                ("synced_ms", run.synced_ms.len()),
                ("clock_errors_ns", run.clock_errors_ns.len()),
            ];
            if let Some((field, len)) = per_student.iter().find(|(_, len)| *len != n) {
                bail!("{field} has {len} entries for {n} students");
            }
            if let Some(b) = run.beats.iter().find(|b| b.onsets_ns.len() != n || b.decided_ns.len() != n) {
                bail!(
                    "beat {} has {} onsets and {} decisions for {n} students",
                    b.index,
                    b.onsets_ns.len(),
                    b.decided_ns.len()
                );
            }
            if let Some(m) = run.notes.iter().find(|m| m.playouts_ns.len() != n) {
                bail!("note {}:{} has {} playouts for {n} students", m.from, m.seq, m.playouts_ns.len());
            }
        }
        Ok(run)
    }

    /// Whether student `i` (by position) connected and joined.
    pub fn connected(&self, i: usize) -> bool {
        self.connect_ms.get(i).is_some_and(Option::is_some)
    }

    /// Students that connected and joined.
    pub fn connected_count(&self) -> usize {
        (0..self.clients).filter(|&i| self.connected(i)).count()
    }

    /// Position of the student with global id `id` in this file, if it is one of them.
    pub fn position_of(&self, id: u64) -> Option<usize> {
        if self.client_ids.is_empty() {
            usize::try_from(id).ok().filter(|&i| i < self.clients)
        } else {
            self.client_ids.iter().position(|&c| c == id)
        }
    }

    /// Beats the server sent between `start` and `stop` (bounds that are missing do not limit).
    pub fn beats_in_run(&self) -> impl Iterator<Item = &BeatRecord> {
        self.beats.iter().filter(|b| {
            self.started_ns.is_none_or(|s| b.server_sent_ns >= s)
                && self.stopped_ns.is_none_or(|t| b.server_sent_ns <= t)
        })
    }
}

/// `b − a` in ms (negative if `b` is earlier).
fn ms_between(a: u64, b: u64) -> f64 {
    (i128::from(b) - i128::from(a)) as f64 / 1e6
}

fn base(kind: PeerKind) -> SystemResult {
    SystemResult { system: kind.name().to_owned(), display: kind.display().to_owned(), ..SystemResult::default() }
}

/// A lower-is-better figure that may be missing, with a note either way.
fn lower(key: &str, label: &str, unit: &str, value: Option<f64>, note: &str) -> Metric {
    Metric {
        key: key.into(),
        label: label.into(),
        unit: unit.into(),
        value,
        better: Better::Lower,
        note: Some(note.into()),
    }
}

/// `Some(summary)` when there are samples.
fn summary(samples: &[f64]) -> Option<Summary> {
    let s = Summary::of(samples);
    (s.count > 0).then_some(s)
}

/// Clock error. The arrival peers have no clock sync, and their client knows server time only
/// by a beat's arrival, so their error is each beat's one-way delay (arrival − server send),
/// over the beats sent from 2 s after the start on (as Downbeat's "after 2 s"). A scheduling
/// peer is measured as Downbeat is: |its estimate of the server clock − truth| every 100 ms
/// from 2 s after each student connected; a student has converged from the first sample after
/// which its error stays within 1 ms.
pub fn sync_result(run: &PeerRun) -> SystemResult {
    if run.peer.schedules_ahead() {
        return scheduled_sync_result(run);
    }
    const NOTE: &str =
        "no clock sync: a beat's arrival is the client's only view of server time; error = one-way delay";
    let from = run.started_ns.or_else(|| run.beats.first().map(|b| b.server_sent_ns));
    let mut errors = Vec::new();
    let mut beats = 0;
    if let Some(from) = from {
        for b in run.beats.iter().filter(|b| b.server_sent_ns >= from + SYNC_SETTLE_NS) {
            beats += 1;
            errors.extend(b.arrivals_ns.iter().flatten().map(|&a| ms_between(b.server_sent_ns, a).abs()));
        }
    }
    let never = Metric::not_applicable(
        "converged_s",
        "time until every client is within 1 ms",
        "s",
        Better::Lower,
        "never: no clock sync",
    );
    let mut result = sync_figures(run, errors, NOTE, never);
    result.extra["beats_after_2s"] = json!(beats);
    result
}

fn scheduled_sync_result(run: &PeerRun) -> SystemResult {
    const NOTE: &str =
        "timesync's estimate of the server clock against the truth, every 100 ms from 2 s after connecting";
    let mut errors = Vec::new();
    let mut converged = Vec::new();
    for i in (0..run.clients).filter(|&i| run.connected(i)) {
        let samples = &run.clock_errors_ns[i];
        let Some(welcomed) = run.welcomed_ns[i] else { continue };
        let settled = welcomed + SYNC_SETTLE_NS;
        errors.extend(samples.iter().filter(|&&(t, _)| t >= settled).map(|&(_, e)| e.unsigned_abs() as f64 / 1e6));
        let last_bad = samples.iter().rposition(|&(_, e)| e.unsigned_abs() > 1_000_000);
        let from = match last_bad {
            None => samples.first(),
            Some(k) => samples.get(k + 1),
        };
        converged.push(from.map(|&(t, _)| t.saturating_sub(welcomed) as f64 / 1e9));
    }
    let all = converged.iter().try_fold(0.0f64, |m, c| c.map(|c| m.max(c))).filter(|_| !converged.is_empty());
    let mut result = sync_figures(run, errors, NOTE, converged_metric(all));
    result.extra["converged_s"] = json!(converged);
    result
}

/// The clock-error figures of `errors` (|error| in ms) and the convergence figure.
fn sync_figures(run: &PeerRun, errors: Vec<f64>, note: &str, converged: Metric) -> SystemResult {
    let s = summary(&errors);
    let mut result = base(run.peer);
    result.metrics = vec![
        lower("offset_error_p50_ms", "clock error vs truth p50", "ms", s.map(|s| s.p50), note),
        lower("offset_error_p99_ms", "clock error vs truth p99", "ms", s.map(|s| s.p99), note),
        converged,
    ];
    result.extra = json!({
        "samples": errors.len(),
        "clients": run.clients,
        "connect_errors": run.connect_errors.len(),
    });
    result.distributions.insert("offset_error_ms".to_owned(), errors);
    result
}

/// Beat onsets. An arrival peer's student plays a beat when it arrives, so a beat's onset
/// spread is the spread of its arrivals (max − min over the students that got it, at least
/// two), over the beats the server sent between `start` and `stop`. Beat 0 counts like any
/// other: both send it at once on `start`, as an ordinary beat the class hears.
///
/// A beat is late for an arrival peer's student when it arrives more than 6 ms after that
/// student's own median beat latency, or never; the percentage is over beats × students that
/// joined. Server drift is |last beat's send − (first beat's send + n · 60/bpm)|, over the
/// first tempo segment only when the tempo changed (each peer applies a change at a different
/// point of its timer, so no single grid spans segments).
///
/// A scheduling peer is measured as Downbeat is: the spread of the true instants its students
/// scheduled a beat for, over the beats that sound between `start` and `stop`; a beat is late
/// for a student that decided it after its instant, and missing for one that never scheduled
/// it while a classmate did.
pub fn onset_result(run: &PeerRun) -> SystemResult {
    if run.peer.schedules_ahead() {
        return scheduled_onset_result(run);
    }
    let beats: Vec<&BeatRecord> = run.beats_in_run().collect();
    let students: Vec<usize> = (0..run.clients).filter(|&i| run.connected(i)).collect();

    let mut spreads = Vec::new();
    for b in &beats {
        let got: Vec<u64> = students.iter().filter_map(|&i| b.arrivals_ns[i]).collect();
        if let (Some(&min), Some(&max), true) = (got.iter().min(), got.iter().max(), got.len() >= 2) {
            spreads.push(ms_between(min, max));
        }
    }

    // Late or missing, against each student's own median latency.
    let (mut late, mut missing) = (0usize, 0usize);
    for &i in &students {
        let latencies: Vec<f64> =
            beats.iter().filter_map(|b| b.arrivals_ns[i].map(|a| ms_between(b.server_sent_ns, a))).collect();
        let median = Summary::of(&latencies).p50;
        for b in &beats {
            match b.arrivals_ns[i] {
                None => missing += 1,
                Some(a) if ms_between(b.server_sent_ns, a) > median + LATE_MS => late += 1,
                Some(_) => {}
            }
        }
    }
    let slots = beats.len() * students.len();
    let late_percent = (slots > 0).then(|| 100.0 * (late + missing) as f64 / slots as f64);

    let (drift, drift_note) = server_drift_ms(run);
    let mut result = onset_figures(
        run,
        spreads,
        "plays on arrival: spread of a beat's arrivals across the class",
        late_percent,
        "peers play on arrival: a beat is late when it arrives more than 6 ms (an audible \
         displacement) after that client's own median beat latency, or never arrives; \
         percentage over beats × clients",
        lower("server_drift_ms", "beat timer drift over the run", "ms", drift, &drift_note),
    );
    result.extra["beats"] = json!(beats.len());
    result.extra["beats_received"] = json!(run.beats.len());
    result.extra["clients_joined"] = json!(students.len());
    result.extra["late_beats"] = json!(late);
    result.extra["missing_beats"] = json!(missing);
    result.extra["tempo_changes"] = json!(run.tempo_changes.len());
    result
}

fn scheduled_onset_result(run: &PeerRun) -> SystemResult {
    let students: Vec<usize> = (0..run.clients).filter(|&i| run.connected(i)).collect();
    let in_run = |at: u64| run.started_ns.is_none_or(|s| at >= s) && run.stopped_ns.is_none_or(|t| at <= t);
    let (mut spreads, mut onset_vs_server) = (Vec::new(), Vec::new());
    let (mut scheduled, mut late, mut missing, mut beats) = (0usize, 0usize, 0usize, 0usize);
    for b in &run.beats {
        let Some(at) = b.at_ns.filter(|&at| in_run(at)) else { continue };
        let onsets: Vec<(u64, u64)> =
            students.iter().filter_map(|&i| Some((b.onsets_ns[i]?, b.decided_ns[i]?))).collect();
        if onsets.is_empty() {
            continue;
        }
        beats += 1;
        scheduled += onsets.len();
        missing += students.len() - onsets.len();
        late += onsets.iter().filter(|(onset, decided)| decided > onset).count();
        onset_vs_server.extend(onsets.iter().map(|&(onset, _)| ms_between(at, onset)));
        let lo = onsets.iter().map(|o| o.0).min();
        let hi = onsets.iter().map(|o| o.0).max();
        if let (Some(lo), Some(hi), true) = (lo, hi, onsets.len() >= 2) {
            spreads.push(ms_between(lo, hi));
        }
    }
    let judged = scheduled + missing;
    let late_percent = (judged > 0).then(|| 100.0 * (late + missing) as f64 / judged as f64);
    let mut result = onset_figures(
        run,
        spreads,
        "true instants at which the students schedule the beat (timesync offset, lookahead)",
        late_percent,
        "schedules ahead: a beat is late when a client schedules it after its instant, missing when it \
         never does (as Downbeat's)",
        Metric::not_applicable(
            "server_drift_ms",
            "beat timer drift over the run",
            "ms",
            Better::Lower,
            "no timer drift: beat n sounds at the timeline's instant for it; the send timer only decides \
             when it is sent",
        ),
    );
    result.extra["beats"] = json!(beats);
    result.extra["beats_checked"] = json!(scheduled);
    result.extra["beats_late"] = json!(late);
    result.extra["beats_missing"] = json!(missing);
    result.extra["clients_joined"] = json!(students.len());
    result.extra["onset_vs_server_ms"] = json!(Summary::of(&onset_vs_server));
    result.extra["lead_ms"] = json!(run.lead_ms);
    result.extra["lookahead_ms"] = json!(run.lookahead_ms);
    result
}

/// The onset figures of `spreads` (ms), the late percentage and the drift figure.
fn onset_figures(
    run: &PeerRun,
    spreads: Vec<f64>,
    spread_note: &str,
    late_percent: Option<f64>,
    late_note: &str,
    drift: Metric,
) -> SystemResult {
    let s = summary(&spreads);
    let mut result = base(run.peer);
    result.metrics = vec![
        lower("onset_spread_p50_ms", "beat onset spread p50", "ms", s.map(|s| s.p50), spread_note),
        lower("onset_spread_p99_ms", "beat onset spread p99", "ms", s.map(|s| s.p99), spread_note),
        lower("onset_spread_max_ms", "beat onset spread max", "ms", s.map(|s| s.max), spread_note),
        lower("late_beats_percent", "late or missing beats", "%", late_percent, late_note),
        drift,
    ];
    result.distributions.insert("onset_spread_ms".to_owned(), spreads);
    result.extra = json!({ "clients": run.clients, "connect_errors": run.connect_errors.len() });
    result
}

/// The server's beat timer drift and the note saying how it was measured.
fn server_drift_ms(run: &PeerRun) -> (Option<f64>, String) {
    let bpm = run.started_bpm.unwrap_or(run.bpm);
    let first_change = run.tempo_changes.iter().map(|t| t.next_index).min();
    let segment: Vec<&BeatRecord> =
        run.beats.iter().filter(|b| first_change.is_none_or(|next| b.index < next)).collect();
    let note = if first_change.is_some() {
        "|last beat's send − (first beat's send + n·60/bpm)|, over the first tempo segment only \
         (beats before the first tempo change; each peer applies a change at a different point \
         of its timer)"
    } else {
        "|last beat's send − (first beat's send + n·60/bpm)|: the server timer's own drift"
    };
    let value = match (segment.first(), segment.last()) {
        (Some(first), Some(last)) if last.index > first.index && bpm > 0.0 => {
            let ideal_ns = (last.index - first.index) as f64 * 60e9 / bpm;
            let actual_ns = (i128::from(last.server_sent_ns) - i128::from(first.server_sent_ns)) as f64;
            Some((actual_ns - ideal_ns).abs() / 1e6)
        }
        _ => None,
    };
    (value, note.to_owned())
}

/// Notes: fan-out latency is arrival − send per (note, receiver), over every student that
/// joined except the sender; a receiver that never got it is a lost delivery. Playout spread
/// is, per note, max − min of the instants its receivers sound it, for notes that at least
/// two students sound: an arrival peer's students sound it on arrival; a scheduling peer's
/// at its `playAt` on their synced clocks, and one that arrives after that instant is not
/// played in sync and counts as lost, out of the latency figures (as Downbeat's).
pub fn fanout_result(run: &PeerRun) -> SystemResult {
    let scheduled = run.peer.schedules_ahead();
    let mut latencies = Vec::new();
    let mut spreads = Vec::new();
    let (mut expected, mut lost, mut late) = (0usize, 0usize, 0usize);
    for note in &run.notes {
        let sender = run.position_of(note.from);
        let mut sounded = Vec::new();
        for i in (0..run.clients).filter(|&i| run.connected(i) && Some(i) != sender) {
            expected += 1;
            let Some(a) = note.arrivals_ns[i] else {
                lost += 1;
                continue;
            };
            let sounds = if scheduled { note.playouts_ns[i].filter(|&p| p >= a) } else { Some(a) };
            let Some(sounds) = sounds else {
                late += 1;
                continue;
            };
            sounded.push(sounds);
            if let Some(sent) = note.sent_ns {
                latencies.push(ms_between(sent, a));
            }
        }
        if let (Some(&min), Some(&max), true) = (sounded.iter().min(), sounded.iter().max(), sounded.len() >= 2) {
            spreads.push(ms_between(min, max));
        }
    }
    let percent = |k: usize| (expected > 0).then(|| 100.0 * k as f64 / expected as f64);
    let (fanout_note, lost_note, spread_note) = if scheduled {
        (
            "arrival − send, per note and receiver, over the notes played in time".to_owned(),
            format!(
                "not played by a classmate: {:.2} % arrived after their shared playout instant (played + {} ms) \
                 and were not played in sync (as Downbeat's); they are not in the latency figures",
                percent(late).unwrap_or(0.0),
                run.playout_delay_ms.unwrap_or(0.0)
            ),
            "true instants at which the classmates schedule the note (its playAt on their synced clocks)",
        )
    } else {
        (
            "arrival − send, per note and receiver".to_owned(),
            "deliveries that never arrived, over every joined student but the sender".to_owned(),
            "plays on arrival: spread of arrivals",
        )
    };
    let s = summary(&latencies);
    let spread = summary(&spreads);
    let mut result = base(run.peer);
    result.metrics = vec![
        lower("fanout_p50_ms", "note fan-out latency p50", "ms", s.map(|s| s.p50), &fanout_note),
        lower("fanout_p99_ms", "note fan-out latency p99", "ms", s.map(|s| s.p99), &fanout_note),
        lower("fanout_p999_ms", "note fan-out latency p99.9", "ms", s.map(|s| s.p999), &fanout_note),
        lower("notes_lost_percent", "note deliveries lost", "%", percent(lost + late), &lost_note),
        lower("playout_spread_p99_ms", "synchronized playout spread p99", "ms", spread.map(|s| s.p99), spread_note),
    ];
    result.distributions =
        BTreeMap::from([("fanout_ms".to_owned(), latencies), ("playout_spread_ms".to_owned(), spreads)]);
    result.extra = json!({
        "notes": run.notes.len(),
        "deliveries_expected": expected,
        "deliveries_lost": lost,
        "deliveries_late": late,
        "clients": run.clients,
        "clients_joined": run.connected_count(),
        "connect_errors": run.connect_errors.len(),
    });
    result
}

/// Joining: connect + join acknowledged per student. The slowest join is over the students
/// that joined; failures are counted on their own. A scheduling peer's students wait for
/// their first timesync round between connecting and joining: that wait is left out of the
/// join times and is its "joined and clock-synced" figure instead (the slowest student's).
pub fn join_result(run: &PeerRun) -> SystemResult {
    let mut result = arrival_join_result(run);
    if run.peer.schedules_ahead() {
        let synced: Vec<f64> = run.synced_ms.iter().flatten().copied().collect();
        result.metrics[2] = lower(
            "synced_all_ms",
            "whole class joined and clock-synced",
            "ms",
            summary(&synced).map(|s| s.max),
            "connect to the last student's first timesync round (5 requests, 1 s apart)",
        );
        for m in &mut result.metrics[..2] {
            m.note = Some("joined = connected and join acknowledged, the wait for timesync left out".to_owned());
        }
        result.distributions.insert("synced_ms".to_owned(), synced);
    }
    result
}

/// Joining of a peer with no clock sync to wait for.
fn arrival_join_result(run: &PeerRun) -> SystemResult {
    const JOIN_NOTE: &str = "joined = connected and join acknowledged; no clock sync to wait for";
    let times: Vec<f64> = run.connect_ms.iter().flatten().copied().collect();
    let nulls = run.connect_ms.len() - times.len();
    let failures = nulls.max(run.connect_errors.len());
    let s = summary(&times);
    let mut result = base(run.peer);
    result.metrics = vec![
        lower("join_all_ms", "whole class joined (slowest)", "ms", s.map(|s| s.max), JOIN_NOTE),
        lower("join_p50_ms", "join time p50", "ms", s.map(|s| s.p50), JOIN_NOTE),
        Metric::not_applicable(
            "synced_all_ms",
            "whole class joined and clock-synced",
            "ms",
            Better::Lower,
            "no clock sync",
        ),
        Metric::lower("join_failures", "joins failed", "", failures as f64),
    ];
    result.distributions.insert("join_ms".to_owned(), times);
    result.extra = json!({
        "clients": run.clients,
        "clients_joined": run.connected_count(),
        "connect_errors": run.connect_errors,
    });
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;
    const T0: u64 = 1_000_000_000_000;

    fn value(r: &SystemResult, key: &str) -> Option<f64> {
        r.metrics.iter().find(|m| m.key == key).unwrap_or_else(|| panic!("no metric {key}")).value
    }

    fn close(a: Option<f64>, b: f64) -> bool {
        a.is_some_and(|a| (a - b).abs() < 1e-9)
    }

    /// Three students (ids 0..3), 120 BPM from T0: beats every 500 ms, sent 1 ms late from
    /// beat 1 on (beat 5 is 4 ms late). Student 2 misses beat 3 and gets beat 4 10 ms late.
    fn beats_run() -> PeerRun {
        let beat = |index: u64, sent_late_ms: u64, arrivals_ms: [Option<u64>; 3]| {
            let sent = T0 + index * 500 * MS + sent_late_ms * MS;
            json!({
                "index": index,
                "server_sent_ns": sent,
                "arrivals_ns": arrivals_ms.map(|a| a.map(|a| sent + a * MS)),
            })
        };
        let text = json!({
            "peer": "ws",
            "url": "http://127.0.0.1:1", "room": "bench",
            "clients": 3, "client_ids": [0, 1, 2],
            "bpm": 120, "seconds": 3, "notes_per_second": 0, "processes": 1,
            "started_ns": T0, "started_bpm": 120, "stopped_ns": T0 + 3000 * MS,
            "tempo_changes": [],
            "beats": [
                beat(0, 0, [Some(1), Some(2), Some(3)]),
                beat(1, 1, [Some(1), Some(2), Some(3)]),
                beat(2, 1, [Some(1), Some(2), Some(3)]),
                beat(3, 1, [Some(1), Some(2), None]),
                beat(4, 1, [Some(1), Some(2), Some(13)]),
                beat(5, 4, [Some(1), Some(5), Some(3)]),
            ],
            "notes": [],
            "connect_ms": [10.0, 20.0, 30.0],
            "server_addresses": ["127.0.0.1", "127.0.0.1", "127.0.0.1"],
            "connect_errors": [],
        })
        .to_string();
        PeerRun::from_json(&text).expect("parses")
    }

    #[test]
    fn parses_exact_integer_instants_and_nulls() {
        let text = r#"{"peer":"socketio","clients":2,"bpm":120,"started_ns":18446744073709551000,
            "stopped_ns":null,"beats":[{"index":0,"server_sent_ns":9007199254740993,
            "arrivals_ns":[9007199254740995,null]}],"notes":[],"connect_ms":[1.5,null],
            "connect_errors":[{"client":1,"error":"refused"}]}"#;
        let run = PeerRun::from_json(text).expect("parses");
        assert_eq!(run.peer, PeerKind::SocketIo);
        assert_eq!(run.started_ns, Some(18_446_744_073_709_551_000));
        assert_eq!(run.beats[0].server_sent_ns, 9_007_199_254_740_993);
        assert_eq!(run.beats[0].arrivals_ns, vec![Some(9_007_199_254_740_995), None]);
        assert_eq!(run.connected_count(), 1);
        let bad = text.replace("\"connect_ms\":[1.5,null]", "\"connect_ms\":[1.5]");
        assert!(PeerRun::from_json(&bad).is_err());
    }

    #[test]
    fn kinds() {
        assert_eq!(PeerKind::SocketIo.name(), "socketio");
        assert_eq!(PeerKind::Ws.display(), "WebSocket timer");
        assert_eq!("ws".parse::<PeerKind>().expect("parses"), PeerKind::Ws);
        assert!("x".parse::<PeerKind>().is_err());
        assert!(peers_dir().join(PeerKind::SocketIo.script()).is_file());
        assert!(peers_dir().join("client.mjs").is_file());
        assert_eq!("timesync".parse::<PeerKind>().expect("parses"), PeerKind::Timesync);
        assert!(PeerKind::Timesync.schedules_ahead() && !PeerKind::Ws.schedules_ahead());
        for kind in PeerKind::ALL {
            assert!(peers_dir().join(kind.script()).is_file(), "{kind}");
        }
    }

    /// The timesync peer: three students (ids 0..3) connected at T0; start at T0 + 1 s, stop at
    /// T0 + 4 s. Beats sound at T0 + 2.5 s + n · 500 ms (beat 4, at 4.5 s, is after the stop).
    fn scheduled_run() -> PeerRun {
        let at = |n: u64| T0 + 2500 * MS + n * 500 * MS;
        // (onset − at, decided − at) in ms per student; None: never scheduled.
        let beat = |n: u64, students: [Option<(i64, i64)>; 3]| {
            let shift = |base: u64, d: i64| base.checked_add_signed(d * MS as i64).expect("in range");
            json!({
                "index": n,
                "server_sent_ns": at(n) - 1500 * MS,
                "arrivals_ns": [at(n) - 1499 * MS, at(n) - 1499 * MS, at(n) - 1499 * MS],
                "at_ns": at(n),
                "onsets_ns": students.map(|s| s.map(|(o, _)| shift(at(n), o))),
                "decided_ns": students.map(|s| s.map(|(_, d)| shift(at(n), d))),
            })
        };
        // Errors (ms) sampled at 1, 2.5 and 3 s after connecting.
        let errors = |e: [f64; 3]| {
            json!([
                [T0 + 1000 * MS, (e[0] * 1e6) as i64],
                [T0 + 2500 * MS, (e[1] * 1e6) as i64],
                [T0 + 3000 * MS, (e[2] * 1e6) as i64],
            ])
        };
        let text = json!({
            "peer": "timesync", "clients": 3, "client_ids": [0, 1, 2], "bpm": 120,
            "started_ns": T0 + 1000 * MS, "stopped_ns": T0 + 4000 * MS,
            "beats": [
                beat(0, [Some((0, -200)), Some((1, -190)), Some((-1, -180))]),
                beat(1, [Some((0, -200)), Some((2, 3)), Some((0, -180))]),
                beat(2, [Some((0, -200)), None, Some((0, -180))]),
                beat(3, [Some((0, -200)), Some((0, -200)), Some((3, -180))]),
                beat(4, [Some((9, -200)), Some((0, -200)), Some((0, -180))]),
            ],
            "notes": [
                // Played at T0 + 3 s, sounds at + 80 ms: student 1 in time, 2 arrives too late.
                {"from": 0, "seq": 0, "sent_ns": T0 + 3000 * MS,
                 "arrivals_ns": [null, T0 + 3010 * MS, T0 + 3090 * MS],
                 "playouts_ns": [null, T0 + 3080 * MS, T0 + 3081 * MS]},
                // From 1: both in time, scheduled 0.5 ms apart; nobody lost it.
                {"from": 1, "seq": 0, "sent_ns": T0 + 3100 * MS,
                 "arrivals_ns": [T0 + 3104 * MS, null, T0 + 3106 * MS],
                 "playouts_ns": [T0 + 3180 * MS, null, T0 + 3180 * MS + MS / 2]},
                // From 2: never reached 0.
                {"from": 2, "seq": 0, "sent_ns": T0 + 3200 * MS,
                 "arrivals_ns": [null, T0 + 3202 * MS, null],
                 "playouts_ns": [null, T0 + 3280 * MS, null]},
            ],
            "connect_ms": [10.0, 20.0, 30.0],
            "lead_ms": 1500, "lookahead_ms": 200, "playout_delay_ms": 80,
            "welcomed_ns": [T0, T0, T0],
            "synced_ms": [4100.0, 4300.0, 4200.0],
            "clock_errors_ns": [errors([3.0, 0.5, -0.25]), errors([0.1, -2.0, 0.75]), errors([0.2, 0.3, -0.4])],
        })
        .to_string();
        PeerRun::from_json(&text).expect("parses")
    }

    #[test]
    fn scheduled_peer_is_measured_as_downbeat_is() {
        let run = scheduled_run();
        let sync = sync_result(&run);
        assert_eq!((sync.system.as_str(), sync.display.as_str()), ("timesync", "Socket.IO + timesync"));
        // From 2 s after connecting: 0.5, 0.25, 2, 0.75, 0.3, 0.4 ms.
        let mut d = sync.distributions["offset_error_ms"].clone();
        d.sort_by(f64::total_cmp);
        assert_eq!(d, vec![0.25, 0.3, 0.4, 0.5, 0.75, 2.0]);
        assert!(close(value(&sync, "offset_error_p50_ms"), 0.4));
        // Within 1 ms for good from 2.5 s, 3 s and 1 s: every client by 3 s.
        assert!(close(value(&sync, "converged_s"), 3.0));

        let onset = onset_result(&run);
        // Beats 0..=3 sound before the stop. Spreads 2, 2 (beat 1), 0 (beat 2), 3.
        let mut d = onset.distributions["onset_spread_ms"].clone();
        d.sort_by(f64::total_cmp);
        assert_eq!(d, vec![0.0, 2.0, 2.0, 3.0]);
        assert!(close(value(&onset, "onset_spread_max_ms"), 3.0));
        // Student 1 decided beat 1 after its onset (late) and never scheduled beat 2: 2 of 12.
        assert!(close(value(&onset, "late_beats_percent"), 100.0 * 2.0 / 12.0));
        assert_eq!(value(&onset, "server_drift_ms"), None);
        assert_eq!(onset.extra["beats_missing"], 1);

        let fanout = fanout_result(&run);
        // In time: 10 ms (0 → 1), 4 and 6 ms (1 → 0, 2), 2 ms (2 → 1).
        let mut d = fanout.distributions["fanout_ms"].clone();
        d.sort_by(f64::total_cmp);
        assert_eq!(d, vec![2.0, 4.0, 6.0, 10.0]);
        // 6 deliveries: one late (0 → 2), one lost (2 → 0).
        assert!(close(value(&fanout, "notes_lost_percent"), 100.0 * 2.0 / 6.0));
        let lost = fanout.metrics.iter().find(|m| m.key == "notes_lost_percent").and_then(|m| m.note.clone());
        assert!(lost.is_some_and(|n| n.contains("16.67 % arrived after")), "{:?}", fanout.metrics);
        // Played together: note 1 by 0 and 2, 0.5 ms apart (notes 0 and 2 have one receiver in time).
        assert_eq!(fanout.distributions["playout_spread_ms"], vec![0.5]);

        let join = join_result(&run);
        assert!(close(value(&join, "join_all_ms"), 30.0));
        assert!(close(value(&join, "synced_all_ms"), 4300.0));
        assert!(close(value(&join, "join_failures"), 0.0));
    }

    #[test]
    fn scheduled_peer_arrays_match_the_students() {
        let run = scheduled_run();
        let mut text = serde_json::to_value(&run).expect("serializes");
        text["synced_ms"] = json!([1.0]);
        assert!(PeerRun::from_json(&text.to_string()).is_err());
        let mut text = serde_json::to_value(&run).expect("serializes");
        text["beats"][0]["onsets_ns"] = json!([]);
        assert!(PeerRun::from_json(&text.to_string()).is_err());
        // The other peers' files have none of these fields.
        assert!(beats_run().beats.iter().all(|b| b.onsets_ns.is_empty() && b.at_ns.is_none()));
    }

    #[test]
    fn sync_is_one_way_delay_after_two_seconds() {
        let r = sync_result(&beats_run());
        assert_eq!((r.system.as_str(), r.display.as_str()), ("ws", "WebSocket timer"));
        // Beats 4 and 5 (sent at 2.001 s and 2.504 s): delays 1, 2, 13, 1, 5, 3 ms.
        let mut d = r.distributions["offset_error_ms"].clone();
        d.sort_by(f64::total_cmp);
        assert_eq!(d, vec![1.0, 1.0, 2.0, 3.0, 5.0, 13.0]);
        assert!(close(value(&r, "offset_error_p50_ms"), 2.0));
        assert!(close(value(&r, "offset_error_p99_ms"), 13.0));
        assert_eq!(value(&r, "converged_s"), None);
        let converged = r.metrics.iter().find(|m| m.key == "converged_s").expect("present");
        assert_eq!(converged.note.as_deref(), Some("never: no clock sync"));
        assert_eq!(r.metrics[0].label, "clock error vs truth p50");
    }

    #[test]
    fn onset_spread_late_beats_and_drift() {
        let r = onset_result(&beats_run());
        // Spreads: 2, 2, 2, 1 (beat 3, two arrivals), 12, 4.
        let mut d = r.distributions["onset_spread_ms"].clone();
        d.sort_by(f64::total_cmp);
        assert_eq!(d, vec![1.0, 2.0, 2.0, 2.0, 4.0, 12.0]);
        assert!(close(value(&r, "onset_spread_p50_ms"), 2.0));
        assert!(close(value(&r, "onset_spread_p99_ms"), 12.0));
        assert!(close(value(&r, "onset_spread_max_ms"), 12.0));
        // Student 2: median of 3, 3, 3, 13, 3 is 3; beat 4 (13 ms) is late, beat 3 missing.
        // Student 1's beat 5 (5 ms vs median 2) is not late. 2 of 18.
        assert!(close(value(&r, "late_beats_percent"), 100.0 * 2.0 / 18.0));
        // Beat 5 sent 2.504 s after beat 0: 4 ms off the 120 BPM grid.
        assert!(close(value(&r, "server_drift_ms"), 4.0));
        assert_eq!(r.extra["beats"], 6);
        assert_eq!(r.extra["missing_beats"], 1);
    }

    #[test]
    fn onset_skips_beats_outside_the_run_and_students_that_never_joined() {
        let mut run = beats_run();
        run.stopped_ns = Some(T0 + 1200 * MS); // beats 0..=2 only
        run.connect_ms[2] = None;
        for b in &mut run.beats {
            b.arrivals_ns[2] = None;
        }
        let r = onset_result(&run);
        assert_eq!(r.distributions["onset_spread_ms"], vec![1.0, 1.0, 1.0]);
        assert!(close(value(&r, "late_beats_percent"), 0.0));
        // Drift uses every beat the server sent.
        assert!(close(value(&r, "server_drift_ms"), 4.0));
    }

    #[test]
    fn drift_over_the_first_tempo_segment_only() {
        let mut run = beats_run();
        run.tempo_changes = vec![TempoChange { at_ns: T0 + 1700 * MS, bpm: 150.0, next_index: 4 }];
        let r = onset_result(&run);
        // Beats 0..=3: beat 3 sent 1 ms late.
        assert!(close(value(&r, "server_drift_ms"), 1.0));
        let note = r.metrics.iter().find(|m| m.key == "server_drift_ms").and_then(|m| m.note.clone());
        assert!(note.is_some_and(|n| n.contains("first tempo segment")));
    }

    #[test]
    fn fanout_latency_loss_and_playout_spread() {
        let text = json!({
            "peer": "socketio", "clients": 3, "client_ids": [10, 11, 12], "bpm": 120,
            "started_ns": T0, "stopped_ns": T0 + 3000 * MS, "beats": [],
            "notes": [
                // From 10: reaches 11 after 2 ms and 12 after 5 ms.
                {"from": 10, "seq": 0, "sent_ns": T0, "arrivals_ns": [null, T0 + 2 * MS, T0 + 5 * MS]},
                // From 11: reaches 10 after 1 ms, lost to 12.
                {"from": 11, "seq": 0, "sent_ns": T0 + 100 * MS, "arrivals_ns": [T0 + 101 * MS, null, null]},
                // From a student of another process (id 99): all three receive it.
                {"from": 99, "seq": 3, "sent_ns": T0 + 200 * MS,
                 "arrivals_ns": [T0 + 203 * MS, T0 + 204 * MS, T0 + 207 * MS]},
            ],
            "connect_ms": [1.0, 2.0, 3.0],
        })
        .to_string();
        let r = fanout_result(&PeerRun::from_json(&text).expect("parses"));
        assert_eq!(r.system, "socketio");
        let mut d = r.distributions["fanout_ms"].clone();
        d.sort_by(f64::total_cmp);
        assert_eq!(d, vec![1.0, 2.0, 3.0, 4.0, 5.0, 7.0]);
        assert!(close(value(&r, "fanout_p50_ms"), 3.0));
        assert!(close(value(&r, "fanout_p99_ms"), 7.0));
        assert!(close(value(&r, "fanout_p999_ms"), 7.0));
        // Expected 2 + 2 + 3 deliveries, 1 lost.
        assert!(close(value(&r, "notes_lost_percent"), 100.0 / 7.0));
        // Spreads: 3 (note 1), none (one arrival), 4 (note 3).
        assert_eq!(r.distributions["playout_spread_ms"], vec![3.0, 4.0]);
        assert!(close(value(&r, "playout_spread_p99_ms"), 4.0));
        assert_eq!(r.extra["deliveries_expected"], 7);
    }

    #[test]
    fn joins() {
        let text = json!({
            "peer": "ws", "clients": 4, "bpm": 120, "started_ns": null, "stopped_ns": null,
            "beats": [], "notes": [],
            "connect_ms": [12.5, null, 30.0, 20.0],
            "connect_errors": [{"client": 1, "error": "ECONNREFUSED"}],
        })
        .to_string();
        let run = PeerRun::from_json(&text).expect("parses");
        let r = join_result(&run);
        assert!(close(value(&r, "join_all_ms"), 30.0));
        assert!(close(value(&r, "join_p50_ms"), 20.0));
        assert!(close(value(&r, "join_failures"), 1.0));
        let failures = r.metrics.iter().find(|m| m.key == "join_failures").expect("present");
        assert_eq!((failures.label.as_str(), failures.unit.as_str()), ("joins failed", ""));
        // Nothing to measure: figures are missing, not zero.
        let onset = onset_result(&run);
        assert_eq!(value(&onset, "onset_spread_p50_ms"), None);
        assert_eq!(value(&onset, "late_beats_percent"), None);
        assert_eq!(value(&sync_result(&run), "offset_error_p50_ms"), None);
        assert_eq!(value(&fanout_result(&run), "notes_lost_percent"), None);
    }

    #[test]
    fn client_arguments() {
        let mut c = ClientRun::new(PeerKind::SocketIo, "http://127.0.0.1:9");
        c.seconds = 3.0;
        c.notes_per_second = 2.5;
        c.tempo_changes = vec![(1.5, 150.0)];
        let args = c.args(Path::new("/tmp/x.json"), &["10.77.1.1".parse().expect("ip")]);
        let args: Vec<String> = args.iter().map(|a| a.to_string_lossy().into_owned()).collect();
        let joined = args.join(" ");
        assert!(joined.contains("--peer socketio --url http://127.0.0.1:9 --clients 5"), "{joined}");
        assert!(joined.contains("--seconds 3 --bpm 120 --tempo-change 1.5:150 --notes-per-second 2.5"), "{joined}");
        assert!(joined.contains("--bind-address 10.77.1.1"), "{joined}");
        assert!(joined.contains("--timeout-seconds 63 --out /tmp/x.json"), "{joined}");
        c.bpm = 10.0;
        assert!(c.validate().is_err());
    }

    #[test]
    fn tail_keeps_the_last_lines() {
        assert_eq!(tail("a\nb\nc\n", 2), "b\nc");
        assert_eq!(tail("a", 5), "a");
    }
}
