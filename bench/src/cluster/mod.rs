//! A cluster of Downbeat nodes on this machine, and one of them killed mid-song (issue 16).
//!
//! `downbeat-bench cluster` starts a district (a NATS server with JetStream, a fresh
//! PostgreSQL database, the benchmark school's configuration; [`district`]) and `--nodes`
//! release-build `downbeat` processes with `--cluster`, then `--rooms` rooms of
//! `--clients-per-room` sessions (a teacher and students, the product's native client, each
//! on a clock with a known offset and drift) in helper processes ([`helper`]). Room r is
//! created on node `r mod nodes`; each student's page comes from node `index mod nodes` and
//! follows `moved` to the room.
//!
//! - **Sessions per node as nodes are added.** For each node count of `--scaling` and then
//!   for `--nodes`, the same class runs on a fresh district, and once every page schedules
//!   (and 2 s more), each node's sessions, rooms, CPU and memory are measured over
//!   `--hold-seconds`: how one load spreads over 1, 2, 3 nodes of one machine.
//! - **A node dies mid-song.** On the `--nodes` district, right after that window, node 1 is
//!   killed with SIGKILL. Its rooms' members notice when their transport says so (QUIC's idle
//!   timeout for WebTransport, the reset TCP connection for WebSocket) and come back as the
//!   browser package does; once the node's lease runs out another node takes each room over
//!   (when a member's hello reaches it, or on its sweep). Measured: when each member is back
//!   (and when their session ended), every beat each page scheduled through it all against
//!   the beat's true instant on the timeline the page had at the kill, the beats a page never
//!   scheduled, whether the timeline moved, every reconnect attempt's outcome, and newcomers
//!   joining during the recovery. The song goes on `--after-seconds` once everyone is back.
//!
//! The truth: the nodes count server time on the shared time base (the wall clock since
//! 2026-01-01, read once at start and counted on with the monotonic clock), so server time
//! `t` is the host's monotonic instant `t - (wall - monotonic)`, with `wall - monotonic`
//! read here once (they only differ if the wall clock is stepped during a run).

pub mod district;
pub mod helper;

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::io::{BufRead as _, BufReader, Write as _};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail, ensure};
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::hostclock::{HostClock, monotonic_now};
use crate::machine::{ProcessMeter, StealMeter, describe};
use crate::metrics::{Metric, RunReport, Summary, SystemResult};
use district::{District, NodeSettings};
use helper::{Backoff, HelperOutput, HelperSpec, NodeAddr, RoomPlan};

/// The cluster scenario's settings (its command-line options).
#[derive(Clone, Debug, clap::Args)]
pub struct ClusterConfig {
    /// Nodes of the cluster whose first node is killed mid-song.
    #[arg(long, default_value_t = 3)]
    pub nodes: usize,
    /// Rooms, spread over the nodes (room r is created on node r mod nodes).
    #[arg(long, default_value_t = 60)]
    pub rooms: usize,
    /// Sessions per room: a teacher and students.
    #[arg(long, default_value_t = 30)]
    pub clients_per_room: usize,
    /// Node counts to measure at steady state first (the same class on a fresh district of
    /// that many nodes), comma-separated (`0`: none); `--nodes` is always measured, before the
    /// kill.
    #[arg(long, default_value = "1,2", value_delimiter = ',')]
    pub scaling: Vec<usize>,
    /// The nodes' `--cluster-lease-ms`.
    #[arg(long, default_value_t = 5_000)]
    pub lease_ms: u64,
    /// The nodes' `idle_timeout_ms`: QUIC's idle timeout, after which a WebTransport client
    /// notices that its node is gone (default: the server's, 10 s). Keep-alives every third
    /// of it (at most 3 s).
    #[arg(long)]
    pub idle_timeout_ms: Option<u64>,
    /// Every N-th session connects over WebSocket (0: every session over WebTransport).
    #[arg(long, default_value_t = 0)]
    pub websocket_every: usize,
    /// Seconds each node is measured at steady state (and the class plays before the kill).
    #[arg(long, default_value_t = 10.0)]
    pub hold_seconds: f64,
    /// Seconds the song goes on once every member of the killed node's rooms is back.
    #[arg(long, default_value_t = 10.0)]
    pub after_seconds: f64,
    /// Seconds after the kill to give up waiting for members to come back.
    #[arg(long, default_value_t = 180.0)]
    pub recovery_deadline_seconds: f64,
    /// During the recovery, a newcomer joins a room every this many ms in each helper (0:
    /// none).
    #[arg(long, default_value_t = 500)]
    pub newcomer_every_ms: u64,
    /// Helper processes running the clients (rooms dealt out in turn).
    #[arg(long, default_value_t = 2)]
    pub helpers: usize,
    /// Tempo.
    #[arg(long, default_value_t = 120)]
    pub bpm: u32,
    /// How often each page schedules, ms.
    #[arg(long, default_value_t = 100)]
    pub tick_ms: u64,
    /// How far ahead each page schedules beats, ms.
    #[arg(long, default_value_t = 500)]
    pub lookahead_ms: u64,
    /// Seed for the clients' clocks and backoff jitter.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// The PostgreSQL server (its maintenance database); each run creates and drops a
    /// database of its own there.
    #[arg(long, env = "DOWNBEAT_TEST_POSTGRES_URL", default_value = district::DEFAULT_POSTGRES_URL, hide_env_values = true)]
    pub postgres_url: String,
    /// The `nats-server` binary (default: `target/py-nats/bin/nats-server`, which
    /// `scripts/setup` installs).
    #[arg(long)]
    pub nats_server: Option<PathBuf>,
    /// Where the JSON and markdown go.
    #[arg(long, default_value = "bench/results/cluster")]
    pub out: PathBuf,
    /// Also write every helper's output of the failover run (every member's sessions and
    /// reconnect attempts, every beat's error) to this JSON file.
    #[arg(long)]
    pub raw: Option<PathBuf>,
    /// Keep each district's directory (its configuration and the nodes' logs) and print where.
    #[arg(long)]
    pub keep_logs: bool,
    /// Two rooms of three, a 1 s lease and a 2 s idle timeout, one node count of scaling:
    /// shows the harness works in seconds (what CI runs).
    #[arg(long)]
    pub smoke: bool,
    /// This program (it runs the helpers).
    #[arg(skip)]
    pub bench_binary: PathBuf,
    /// The command line, for the report.
    #[arg(skip)]
    pub command: String,
}

impl ClusterConfig {
    /// The smoke run's settings (see `--smoke`).
    fn smoked(self) -> Self {
        Self {
            rooms: 2,
            clients_per_room: 3,
            scaling: vec![1],
            lease_ms: 1_000,
            idle_timeout_ms: Some(2_000),
            hold_seconds: 1.0,
            after_seconds: 2.0,
            recovery_deadline_seconds: 30.0,
            newcomer_every_ms: 300,
            helpers: 1,
            ..self
        }
    }
}

/// Runs the scenario, writes `<out>/cluster-….json` and `<out>/results.md`, prints the
/// markdown; with `--smoke`, fails unless the harness measured what it should.
pub fn main(config: ClusterConfig) -> Result<()> {
    let config = if config.smoke { config.smoked() } else { config };
    let report = run(&config)?;
    let json = crate::report::write_json(&report, &config.out)?;
    let mut text = markdown(&report);
    let _ = write!(text, "\nJSON: `{}`\n", json.display());
    std::fs::write(config.out.join("results.md"), &text)?;
    println!("{text}");
    if config.smoke {
        smoke_check(&report)?;
    }
    Ok(())
}

/// One node at steady state.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
struct NodeSteady {
    id: String,
    sessions: f64,
    rooms: f64,
    cpu_percent: f64,
    rss_mib: f64,
    datagrams_per_s: f64,
    /// Counters that moved during the window (`_total` series).
    counters: BTreeMap<String, f64>,
}

/// A district at steady state.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
struct Steady {
    nodes: Vec<NodeSteady>,
    seconds: f64,
    nats_cpu_percent: f64,
    helpers_cpu_percent: f64,
}

/// One district's run.
#[derive(Debug, Default)]
struct ClusterRun {
    nodes: usize,
    steady: Steady,
    outputs: Vec<HelperOutput>,
    kill: Option<Kill>,
    /// Every node's logged warnings and errors, by message, over the whole run.
    warnings: BTreeMap<String, BTreeMap<String, usize>>,
    /// Where each node was reached.
    addrs: Vec<NodeAddr>,
}

/// What the kill did.
#[derive(Debug, Default)]
struct Kill {
    node: String,
    at: u64,
    /// When every helper said its members were back, host monotonic ns (`None`: the
    /// deadline passed first).
    recovered: Option<u64>,
    /// The live nodes once everyone was back (and the song went on a while).
    survivors: Vec<NodeAfter>,
}

/// A surviving node after the recovery.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
struct NodeAfter {
    id: String,
    sessions: f64,
    rooms: f64,
    rooms_adopted: f64,
    /// Counters that moved from before the kill to the end (`_total` series).
    counters: BTreeMap<String, f64>,
}

/// Runs every district: the scaling ones, then the one whose node is killed.
pub fn run(config: &ClusterConfig) -> Result<RunReport> {
    ensure!(config.nodes >= 2, "--nodes must be at least 2: one is killed and another takes its rooms");
    ensure!(config.rooms >= 1 && config.clients_per_room >= 1, "at least one room of one");
    ensure!(config.helpers >= 1, "at least one helper");
    // Each session sends from an address of its own, 127.0.1.2 up to 127.254.255.251.
    ensure!(config.rooms * config.clients_per_room <= 60_000, "at most 60,000 sessions");
    let began = Instant::now();
    let steal = StealMeter::start();
    let load_before = describe().load_average;
    let started_at =
        time::OffsetDateTime::now_utc().format(&time::format_description::well_known::Rfc3339).unwrap_or_default();
    let nats = district::nats_binary(config.nats_server.as_deref())?;
    let mut runs = Vec::new();
    for &nodes in config.scaling.iter().filter(|&&n| n >= 1 && n != config.nodes) {
        eprintln!("cluster: {nodes} node(s) at steady state");
        runs.push(run_district(config, &nats, nodes, false)?);
    }
    eprintln!("cluster: {} nodes, node-1 killed mid-song", config.nodes);
    let failover = run_district(config, &nats, config.nodes, true)?;
    if let Some(path) = &config.raw {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)?;
        }
        std::fs::write(path, serde_json::to_vec(&failover.outputs)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }

    let mut report = RunReport {
        scenario: "cluster".into(),
        title: format!(
            "Cluster: a node dies mid-song ({} nodes, {} rooms of {})",
            config.nodes, config.rooms, config.clients_per_room
        ),
        profile: "loopback".into(),
        profile_parameters: "loopback: the kernel's loopback device, no emulator, nothing added".into(),
        parameters: json!({
            "nodes": config.nodes, "rooms": config.rooms, "clients_per_room": config.clients_per_room,
            "sessions": config.rooms * config.clients_per_room, "scaling": config.scaling,
            "lease_ms": config.lease_ms, "idle_timeout_ms": config.idle_timeout_ms.unwrap_or(30_000),
            "websocket_every": config.websocket_every, "hold_seconds": config.hold_seconds,
            "after_seconds": config.after_seconds, "newcomer_every_ms": config.newcomer_every_ms,
            "helpers": config.helpers, "bpm": config.bpm, "tick_ms": config.tick_ms,
            "lookahead_ms": config.lookahead_ms, "seed": config.seed, "backoff": Backoff::BROWSER,
            "load_average_before": load_before,
        }),
        command: config.command.clone(),
        started_at,
        ..RunReport::default()
    };
    report.systems.push(failover_result(config, &failover));
    for run in runs.iter().chain(std::iter::once(&failover)) {
        report.systems.push(steady_result(run));
    }
    report.machine = describe();
    report.wall_seconds = began.elapsed().as_secs_f64();
    report.machine.steal_percent = steal.percent();
    report.notes.push(format!("1-minute load average when the run began: {load_before:.2}."));
    if report.machine.steal_percent > 1.0 {
        report.notes.push(format!(
            "The hypervisor stole {:.1} % of the CPU during this run: treat its tails as noisy.",
            report.machine.steal_percent
        ));
    }
    Ok(report)
}

/// The cluster's shared time base minus the host's monotonic clock, ns: of a few tries, the
/// wall-clock reading taken closest between two monotonic ones.
fn truth_offset() -> i64 {
    let epoch = std::time::UNIX_EPOCH + Duration::from_secs(downbeat_server::clock::SHARED_EPOCH_UNIX_SECS);
    let mut best: Option<(u64, i64)> = None;
    for _ in 0..9 {
        let before = monotonic_now();
        let wall = std::time::SystemTime::now().duration_since(epoch).map_or(0, |d| d.as_nanos() as i64);
        let after = monotonic_now();
        let offset = wall - (before / 2 + after / 2) as i64;
        if best.is_none_or(|(gap, _)| after - before < gap) {
            best = Some((after - before, offset));
        }
    }
    best.map_or(0, |(_, offset)| offset)
}

/// A helper process and its stdout, line by line.
struct HelperProcess {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: Receiver<String>,
}

impl HelperProcess {
    fn start(bench: &Path, spec: &HelperSpec, work: &Path) -> Result<Self> {
        let path = work.join(format!("helper-{}.json", spec.helper));
        std::fs::write(&path, serde_json::to_vec(spec)?)?;
        let mut child = Command::new(bench)
            .arg("cluster-helper")
            .arg("--spec")
            .arg(&path)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .context("starting a cluster helper")?;
        let stdout = child.stdout.take().context("the helper's stdout")?;
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Ok(Self { stdin: child.stdin.take(), child, lines })
    }

    /// Waits for a line starting with `word`; the line.
    fn wait_for(&mut self, word: &str, timeout: Duration) -> Result<Option<String>> {
        let deadline = Instant::now() + timeout;
        loop {
            match self.lines.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                Ok(line) if line.starts_with(word) => return Ok(Some(line)),
                Ok(_) => {}
                Err(RecvTimeoutError::Timeout) => return Ok(None),
                Err(RecvTimeoutError::Disconnected) => {
                    let status = self.child.wait()?;
                    bail!("a cluster helper ended ({status}) before saying {word:?}")
                }
            }
        }
    }

    fn send(&mut self, line: &str) -> Result<()> {
        let stdin = self.stdin.as_mut().context("the helper's stdin is closed")?;
        writeln!(stdin, "{line}")?;
        stdin.flush()?;
        Ok(())
    }

    /// Closes stdin (the helper stops) and reads its output.
    fn finish(mut self) -> Result<HelperOutput> {
        drop(self.stdin.take());
        let line = loop {
            match self.lines.recv_timeout(Duration::from_secs(120)) {
                Ok(line) if line.starts_with('{') => break line,
                Ok(_) => {}
                Err(_) => {
                    let _ = self.child.kill();
                    let status = self.child.wait()?;
                    bail!("a cluster helper printed no output ({status})")
                }
            }
        };
        let status = self.child.wait()?;
        ensure!(status.success(), "a cluster helper failed ({status})");
        serde_json::from_str(&line).context("a cluster helper's output")
    }
}

impl Drop for HelperProcess {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// One district: starts it, runs the class, measures the steady state, kills node 1 if
/// `kill`, and stops everything.
fn run_district(config: &ClusterConfig, nats: &Path, nodes: usize, kill: bool) -> Result<ClusterRun> {
    let settings = NodeSettings {
        lease_ms: config.lease_ms,
        idle_timeout_ms: config.idle_timeout_ms,
        max_sessions: 20_000,
        max_rooms: 2_000,
        max_members_per_room: 100,
    };
    let mut district = District::start(nats, &config.postgres_url, nodes, &settings)?;
    let result = measure_district(config, &mut district, kill);
    if result.is_err() || config.keep_logs {
        let dir = district.keep_logs();
        eprintln!("cluster: the nodes' logs ({nodes} nodes) are kept in {}", dir.display());
    }
    result
}

fn measure_district(config: &ClusterConfig, district: &mut District, kill: bool) -> Result<ClusterRun> {
    let work = tempfile::tempdir()?;
    let addrs: Vec<NodeAddr> = district
        .nodes
        .iter()
        .map(|n| NodeAddr {
            id: n.id.clone(),
            webtransport_url: n.webtransport_url(),
            websocket_url: n.websocket_url(),
            cert_hashes: n.cert_hashes().to_vec(),
        })
        .collect();
    let nodes = addrs.len();
    let truth_offset_ns = truth_offset();
    let mut helpers = Vec::new();
    for h in 0..config.helpers.min(config.rooms) {
        let rooms = (h..config.rooms).step_by(config.helpers).map(|r| RoomPlan { index: r, node: r % nodes }).collect();
        let spec = HelperSpec {
            helper: h,
            config_text: district.config_text().to_owned(),
            tenant: district::TENANT.into(),
            nodes: addrs.clone(),
            rooms,
            clients_per_room: config.clients_per_room,
            websocket_every: config.websocket_every,
            bpm: config.bpm,
            seed: config.seed,
            max_offset_ms: 500.0,
            max_drift_ppm: 100.0,
            tick_ms: config.tick_ms,
            lookahead_ms: config.lookahead_ms,
            concurrency: 64,
            join_deadline_ms: 300_000,
            backoff: Backoff::BROWSER,
            newcomer_every_ms: config.newcomer_every_ms,
            truth_offset_ns,
            worker_threads: 2,
        };
        helpers.push(HelperProcess::start(&config.bench_binary, &spec, work.path())?);
    }
    for helper in &mut helpers {
        helper.wait_for("ready", Duration::from_secs(420))?.context("a helper's class did not get going in 7 min")?;
    }
    // Handshakes' leftovers settle, then the steady window.
    std::thread::sleep(Duration::from_secs(2));
    let host = HostClock::new();
    let meters: Vec<ProcessMeter> = district.nodes.iter().map(|n| ProcessMeter::new(n.pid())).collect();
    let nats_meter = ProcessMeter::new(district.nats_pid());
    let helper_meters: Vec<ProcessMeter> = helpers.iter().map(|h| ProcessMeter::new(h.child.id())).collect();
    let cpu = |meters: &[ProcessMeter]| -> Result<Vec<f64>> { meters.iter().map(ProcessMeter::cpu_seconds).collect() };
    let (cpu0, nats0, helpers0) = (cpu(&meters)?, nats_meter.cpu_seconds()?, cpu(&helper_meters)?);
    let metrics0 = district.nodes.iter().map(district::Node::metrics).collect::<Result<Vec<_>>>()?;
    let t0 = Instant::now();
    std::thread::sleep(Duration::from_secs_f64(config.hold_seconds));
    let seconds = t0.elapsed().as_secs_f64();
    let (cpu1, nats1, helpers1) = (cpu(&meters)?, nats_meter.cpu_seconds()?, cpu(&helper_meters)?);
    let metrics1 = district.nodes.iter().map(district::Node::metrics).collect::<Result<Vec<_>>>()?;
    let get = |m: &HashMap<String, f64>, k: &str| m.get(k).copied().unwrap_or(0.0);
    let mut steady = Steady {
        seconds,
        nats_cpu_percent: (nats1 - nats0) / seconds * 100.0,
        helpers_cpu_percent: helpers1.iter().zip(&helpers0).map(|(a, b)| a - b).sum::<f64>() / seconds * 100.0,
        ..Steady::default()
    };
    for (i, node) in district.nodes.iter().enumerate() {
        let datagrams =
            get(&metrics1[i], "downbeat_datagrams_sent_total") - get(&metrics0[i], "downbeat_datagrams_sent_total");
        steady.nodes.push(NodeSteady {
            id: node.id.clone(),
            sessions: get(&metrics1[i], "downbeat_sessions_active"),
            rooms: get(&metrics1[i], "downbeat_rooms_active"),
            cpu_percent: (cpu1[i] - cpu0[i]) / seconds * 100.0,
            rss_mib: meters[i].rss_bytes()? as f64 / (1024.0 * 1024.0),
            datagrams_per_s: datagrams / seconds,
            counters: moved(&metrics0[i], &metrics1[i]),
        });
    }
    let mut run = ClusterRun { nodes, steady, addrs: addrs.clone(), ..ClusterRun::default() };

    if kill {
        let at = host.now();
        district.nodes[0].kill()?;
        for helper in &mut helpers {
            helper.send(&format!("kill 0 {at}"))?;
        }
        let deadline = Instant::now() + Duration::from_secs_f64(config.recovery_deadline_seconds);
        let mut all_back = true;
        for helper in &mut helpers {
            let left = deadline.saturating_duration_since(Instant::now());
            all_back &= helper.wait_for("recovered", left)?.is_some();
        }
        let recovered = all_back.then(|| host.now());
        std::thread::sleep(Duration::from_secs_f64(config.after_seconds));
        let mut survivors = Vec::new();
        for (i, node) in district.nodes.iter().enumerate().filter(|(_, n)| !n.is_dead()) {
            let after = node.metrics()?;
            let counters = moved(&metrics1[i], &after);
            survivors.push(NodeAfter {
                id: node.id.clone(),
                sessions: get(&after, "downbeat_sessions_active"),
                rooms: get(&after, "downbeat_rooms_active"),
                rooms_adopted: get(&after, "downbeat_cluster_rooms_adopted_total"),
                counters,
            });
        }
        run.kill = Some(Kill { node: district.nodes[0].id.clone(), at, recovered, survivors });
    }
    for helper in helpers {
        run.outputs.push(helper.finish()?);
    }
    run.warnings = district.nodes.iter().map(|n| (n.id.clone(), n.log_warnings())).collect();
    Ok(run)
}

/// The `_total` series that moved from `before` to `after`, by how much.
fn moved(before: &HashMap<String, f64>, after: &HashMap<String, f64>) -> BTreeMap<String, f64> {
    after
        .iter()
        .filter(|(k, _)| k.contains("_total"))
        .filter_map(|(k, v)| {
            let moved = v - before.get(k).copied().unwrap_or(0.0);
            (moved != 0.0).then(|| (k.clone(), moved))
        })
        .collect()
}

/// Seconds from `from` to `to`, host ns.
fn seconds(from: u64, to: u64) -> f64 {
    to.saturating_sub(from) as f64 / 1e9
}

/// Counts of each string.
fn tally<'a>(items: impl Iterator<Item = &'a str>) -> BTreeMap<String, usize> {
    items.fold(BTreeMap::new(), |mut m, s| {
        *m.entry(s.to_owned()).or_default() += 1;
        m
    })
}

/// The kill and the recovery, from every helper's output.
fn failover_result(config: &ClusterConfig, run: &ClusterRun) -> SystemResult {
    let kill = run.kill.as_ref();
    let kill_at = kill.map_or(0, |k| k.at);
    let members: Vec<&helper::MemberOutput> = run.outputs.iter().flat_map(|o| &o.members).collect();
    let affected: Vec<&&helper::MemberOutput> = members.iter().filter(|m| m.affected).collect();
    // Each affected member's first outage after the kill.
    let outages: Vec<&helper::Outage> =
        affected.iter().filter_map(|m| m.outages.iter().find(|o| o.ended >= kill_at)).collect();
    let back: Vec<f64> = outages.iter().filter_map(|o| o.back.map(|b| seconds(kill_at, b))).collect();
    let detected: Vec<f64> = outages.iter().map(|o| seconds(kill_at, o.ended)).collect();
    let rejoin: Vec<f64> = outages.iter().filter_map(|o| o.back.map(|b| seconds(o.ended, b))).collect();
    let attempts: Vec<&helper::Attempt> = outages.iter().flat_map(|o| &o.attempts).collect();
    let outcomes = tally(attempts.iter().map(|a| a.outcome.as_str()));
    let refused = |outcomes: &BTreeMap<String, usize>| -> usize {
        outcomes.iter().filter(|(k, _)| k.starts_with("refused")).map(|(_, v)| v).sum()
    };
    let others_ended =
        members.iter().filter(|m| !m.affected).filter(|m| m.outages.iter().any(|o| o.ended >= kill_at)).count();
    let newcomers: Vec<&helper::Newcomer> = run.outputs.iter().flat_map(|o| &o.newcomers).collect();
    let newcomer_outcomes = tally(newcomers.iter().map(|n| n.outcome.as_str()));
    let newcomer_ms: Vec<f64> = newcomers.iter().filter(|n| n.outcome == "welcome").map(|n| n.took_ms).collect();
    let errors = |stretch: &str| -> Vec<f64> {
        run.outputs
            .iter()
            .flat_map(|o| o.beat_error_us.get(stretch).into_iter().flatten())
            .map(|e| e.abs() / 1e3)
            .collect()
    };
    let (before, away, after, others) = (errors("before"), errors("away"), errors("after"), errors("others"));
    let through: Vec<f64> = away.iter().chain(&after).copied().collect();
    let sum = |f: fn(&helper::MemberOutput) -> u64| members.iter().map(|m| f(m)).sum::<u64>();
    let missed_per_child: Vec<u64> = affected.iter().map(|m| m.missed_away + m.missed_after).collect();
    let shift = affected.iter().filter_map(|m| m.timeline_shift_ns).max();
    // Per child: how far the median of their beats moved from before the kill.
    let moved = |stretch: &str| -> Vec<f64> {
        affected
            .iter()
            .filter_map(|m| Some((m.median_error_us.get(stretch)? - m.median_error_us.get("before")?).abs() / 1e3))
            .collect()
    };
    let (moved_away, moved_after) = (moved("away"), moved("after"));
    let joined: usize = run.outputs.iter().map(|o| o.joined).sum();
    let clients: usize = run.outputs.iter().map(|o| o.clients).sum();
    let summary = |v: &[f64]| Summary::of(v);
    let mut metrics = vec![
        Metric::higher("sessions", "sessions in the class", "", joined as f64),
        Metric::higher("members_affected", "members of the killed node's rooms", "", affected.len() as f64),
        Metric::higher("members_back", "of those, back", "", back.len() as f64),
        Metric::lower("back_p50_s", "back after the kill, p50", "s", summary(&back).p50),
        Metric::lower("back_p99_s", "back after the kill, p99", "s", summary(&back).p99),
        Metric::lower("back_max_s", "back after the kill, max", "s", summary(&back).max),
        Metric::lower("detected_p50_s", "session seen to end, p50", "s", summary(&detected).p50),
        Metric::lower("detected_max_s", "session seen to end, max", "s", summary(&detected).max),
        Metric::lower("rejoin_p50_s", "session end to welcome, p50", "s", summary(&rejoin).p50),
        Metric::lower("rejoin_max_s", "session end to welcome, max", "s", summary(&rejoin).max),
        Metric::lower("beats_missed", "beats missed (away or after)", "", missed_per_child.iter().sum::<u64>() as f64),
        Metric::lower(
            "beats_missed_max_per_child",
            "most beats missed by one child",
            "",
            missed_per_child.iter().copied().max().unwrap_or(0) as f64,
        ),
        Metric::lower(
            "children_missing_beats",
            "children who missed a beat",
            "",
            missed_per_child.iter().filter(|&&n| n > 0).count() as f64,
        ),
        Metric::higher("beats_away", "beats due while away (per child)", "", sum(|m| m.beats_away) as f64),
        Metric::lower("beats_missed_others", "beats missed in the other rooms", "", {
            members.iter().filter(|m| !m.affected).map(|m| m.missed_after).sum::<u64>() as f64
        }),
        Metric::lower("beats_missed_before", "beats missed before the kill", "", sum(|m| m.missed_before) as f64),
        Metric::lower(
            "shift_max_ms",
            "largest shift of a beat's true instant (away or after)",
            "ms",
            summary(&through).max,
        ),
        Metric::lower("shift_p99_ms", "shift p99 (away or after)", "ms", summary(&through).p99),
        Metric::lower(
            "median_moved_max_ms",
            "most a child's median beat moved from before the kill (away or after)",
            "ms",
            summary(&moved_away).max.max(summary(&moved_after).max),
        ),
        Metric::lower("error_before_max_ms", "largest error before the kill", "ms", summary(&before).max),
        Metric::lower("error_before_p99_ms", "error p99 before the kill", "ms", summary(&before).p99),
        Metric::lower(
            "error_others_max_ms",
            "largest error in the other rooms after the kill",
            "ms",
            summary(&others).max,
        ),
        Metric::lower(
            "timeline_shift_max_ns",
            "largest change of a beat's server instant",
            "ns",
            shift.unwrap_or(0) as f64,
        ),
        Metric::lower("rejoins_refused", "rejoin attempts refused", "", refused(&outcomes) as f64),
        Metric::lower(
            "rejoins_failed",
            "rejoin attempts that failed otherwise",
            "",
            (attempts.len() - outcomes.get("welcome").copied().unwrap_or(0) - refused(&outcomes)) as f64,
        ),
        Metric::higher("newcomers", "newcomers during recovery", "", newcomers.len() as f64),
        Metric::lower("newcomers_refused", "newcomers refused", "", refused(&newcomer_outcomes) as f64),
        Metric::lower(
            "newcomers_failed",
            "newcomers who failed otherwise",
            "",
            (newcomers.len() - newcomer_outcomes.get("welcome").copied().unwrap_or(0) - refused(&newcomer_outcomes))
                as f64,
        ),
        Metric::lower("others_ended", "sessions that ended in the other rooms", "", others_ended as f64),
    ];
    if kill.is_some_and(|k| k.recovered.is_none()) {
        metrics.push(Metric::not_applicable(
            "recovered",
            "everyone back",
            "",
            crate::metrics::Better::Higher,
            &format!("not everyone was back {} s after the kill", config.recovery_deadline_seconds),
        ));
    }
    let seats_kept = outages.iter().filter(|o| o.seat_kept == Some(true)).count();
    let ages = |carried: bool| -> Vec<f64> {
        outages.iter().filter(|o| o.clock_carried == Some(carried)).filter_map(|o| o.welcome_age_ms).collect()
    };
    let carried = outages.iter().filter(|o| o.clock_carried == Some(true)).count();
    let by_transport = |t: &str| -> Vec<f64> {
        affected
            .iter()
            .filter(|m| m.transport == t)
            .filter_map(|m| m.outages.iter().find(|o| o.ended >= kill_at))
            .filter_map(|o| o.back.map(|b| seconds(kill_at, b)))
            .collect()
    };
    SystemResult {
        system: "failover".into(),
        display: format!("{} killed", kill.map_or("no node", |k| k.node.as_str())),
        metrics,
        // One figure per member of the killed node's rooms (the beats' errors, one per beat
        // and page, are summarized in `extra`: with `--raw` they are all kept).
        distributions: BTreeMap::from([
            ("back_s".to_owned(), back.clone()),
            ("detected_s".to_owned(), detected.clone()),
        ]),
        extra: json!({
            "clients": clients,
            "joined": joined,
            "join_errors": run.outputs.iter().flat_map(|o| &o.join_errors).collect::<Vec<_>>(),
            "join_ms": Summary::of(&run.outputs.iter().flat_map(|o| o.join_ms.iter().copied()).collect::<Vec<_>>()),
            "recovered_s": kill.and_then(|k| k.recovered.map(|r| seconds(k.at, r))),
            "back_s": summary(&back),
            "back_webtransport_s": summary(&by_transport("webtransport")),
            "back_websocket_s": summary(&by_transport("websocket")),
            "detected_s": summary(&detected),
            "rejoin_s": summary(&rejoin),
            "attempts": attempts.len(),
            "attempt_outcomes": outcomes,
            "attempts_per_member_max": outages.iter().map(|o| o.attempts.len()).max().unwrap_or(0),
            "moved_sessions": outages.iter().filter(|o| o.moved).count(),
            "end_reasons": tally(outages.iter().map(|o| o.reason.as_str())),
            "seats_kept": seats_kept,
            "clock_carried": carried,
            "welcome_age_ms": {"carried": summary(&ages(true)), "not_carried": summary(&ages(false))},
            "newcomer_outcomes": newcomer_outcomes,
            "newcomers_to_dead_nodes_rooms": newcomers.iter().filter(|n| n.room_on_dead_node).count(),
            "newcomer_welcome_ms": Summary::of(&newcomer_ms),
            "median_moved_ms": {"away": summary(&moved_away), "after": summary(&moved_after)},
            "error_ms": {
                "before": summary(&before), "away": summary(&away), "after": summary(&after), "others": summary(&others),
            },
            "beats": {
                "before": sum(|m| m.beats_before), "away": sum(|m| m.beats_away), "after": sum(|m| m.beats_after),
                "missed_before": sum(|m| m.missed_before), "missed_away": sum(|m| m.missed_away),
                "missed_after": sum(|m| m.missed_after),
            },
            "survivors": kill.map(|k| &k.survivors),
            "attempt_errors": tally(attempts.iter().filter_map(|a| a.error.as_deref())),
            "newcomer_errors": tally(newcomers.iter().filter_map(|n| n.error.as_deref())),
            "node_warnings": run.warnings,
            "node_addresses": run.addrs.iter().map(|a| json!({"id": a.id, "webtransport": a.webtransport_url, "websocket": a.websocket_url})).collect::<Vec<_>>(),
        }),
    }
}

/// One district's steady state.
fn steady_result(run: &ClusterRun) -> SystemResult {
    let steady = &run.steady;
    let sessions: Vec<f64> = steady.nodes.iter().map(|n| n.sessions).collect();
    let cpu: Vec<f64> = steady.nodes.iter().map(|n| n.cpu_percent).collect();
    let total_cpu = cpu.iter().fold(0.0, |a, b| a + b);
    let total_sessions = sessions.iter().fold(0.0, |a, b| a + b);
    let joined: usize = run.outputs.iter().map(|o| o.joined).sum();
    let clients: usize = run.outputs.iter().map(|o| o.clients).sum();
    let max = |v: &[f64]| v.iter().copied().fold(0.0, f64::max);
    let min = |v: &[f64]| v.iter().copied().fold(f64::INFINITY, f64::min);
    SystemResult {
        system: format!("steady-{}", run.nodes),
        display: format!("{} node{}", run.nodes, if run.nodes == 1 { "" } else { "s" }),
        metrics: vec![
            Metric::higher("sessions_total", "sessions held (all nodes)", "", total_sessions),
            Metric::higher("sessions_per_node_max", "sessions on the busiest node", "", max(&sessions)),
            Metric::higher("sessions_per_node_min", "sessions on the least busy node", "", min(&sessions)),
            Metric::lower("cpu_per_node_max_percent", "CPU of the busiest node", "%", max(&cpu)),
            Metric::lower("cpu_total_percent", "CPU of all nodes", "%", total_cpu),
            Metric::lower(
                "cpu_per_1000_sessions_percent",
                "node CPU per 1,000 sessions",
                "%",
                total_cpu / total_sessions.max(1.0) * 1000.0,
            ),
            Metric::lower("nats_cpu_percent", "NATS CPU", "%", steady.nats_cpu_percent),
            Metric::lower("helpers_cpu_percent", "clients' CPU (helpers)", "%", steady.helpers_cpu_percent),
        ],
        distributions: BTreeMap::new(),
        extra: json!({
            "node_count": run.nodes,
            "nodes": steady.nodes,
            "seconds": steady.seconds,
            "clients": clients,
            "joined": joined,
            "join_errors": run.outputs.iter().flat_map(|o| &o.join_errors).collect::<Vec<_>>(),
            "beats_missed_before": run.outputs.iter().flat_map(|o| &o.members).map(|m| m.missed_before).sum::<u64>(),
            "node_warnings": run.warnings,
        }),
    }
}

/// The run as markdown: the failover's figures against the goals, where the rooms went,
/// then one row per node count.
pub fn markdown(report: &RunReport) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "### {}\n", report.title);
    let value = |system: &SystemResult, key: &str| system.metrics.iter().find(|m| m.key == key).and_then(|m| m.value);
    let fmt = |v: Option<f64>, digits: usize| v.map_or_else(|| "n/a".to_owned(), |v| format!("{v:.digits$}"));
    if let Some(failover) = report.systems.iter().find(|s| s.system == "failover") {
        let v = |key: &str| value(failover, key);
        let x = &failover.extra;
        let _ = writeln!(
            out,
            "{}: {} of {} sessions up; {} members in its rooms, {} back.\n",
            failover.display,
            fmt(v("sessions"), 0),
            x["clients"],
            fmt(v("members_affected"), 0),
            fmt(v("members_back"), 0),
        );
        out.push_str("| | p50 | p99 | max | goal |\n|:--|--:|--:|--:|:--|\n");
        let row = |out: &mut String, label: &str, s: &serde_json::Value, digits: usize, goal: &str| {
            let f = |k: &str| s[k].as_f64().map_or_else(|| "n/a".to_owned(), |v| format!("{v:.digits$}"));
            let _ = writeln!(out, "| {label} | {} | {} | {} | {goal} |", f("p50"), f("p99"), f("max"));
        };
        row(&mut out, "member back after the kill (s)", &x["back_s"], 2, "");
        if x["back_websocket_s"]["count"].as_u64().unwrap_or(0) > 0 {
            row(&mut out, "… over WebTransport (s)", &x["back_webtransport_s"], 2, "");
            row(&mut out, "… over WebSocket (s)", &x["back_websocket_s"], 2, "");
        }
        row(&mut out, "member's session seen to end after the kill (s)", &x["detected_s"], 2, "");
        row(&mut out, "session end to welcome (s)", &x["rejoin_s"], 2, "");
        if x["welcome_age_ms"]["not_carried"]["count"].as_u64().unwrap_or(0) > 0 {
            row(&mut out, "welcome's age on arrival, estimate carried (ms)", &x["welcome_age_ms"]["carried"], 1, "");
            row(&mut out, "… estimate not carried (ms)", &x["welcome_age_ms"]["not_carried"], 1, "≤ 1000 to carry");
        }
        row(&mut out, "beat error before the kill, all pages (ms)", &x["error_ms"]["before"], 3, "");
        row(&mut out, "beat error while away (ms)", &x["error_ms"]["away"], 3, "≤ 0.2");
        row(&mut out, "beat error after coming back (ms)", &x["error_ms"]["after"], 3, "≤ 0.2");
        row(&mut out, "beat error in the other rooms after the kill (ms)", &x["error_ms"]["others"], 3, "");
        row(&mut out, "a child's median beat moved, away vs before (ms)", &x["median_moved_ms"]["away"], 3, "");
        row(&mut out, "a child's median beat moved, after vs before (ms)", &x["median_moved_ms"]["after"], 3, "");
        let beats = &x["beats"];
        let _ = writeln!(
            out,
            "\n| | |\n|:--|--:|\n\
             | beats missed by the killed node's children (due while away / after) | {} / {} of {} / {} (goal 0) |\n\
             | most beats missed by one child; children who missed any | {}; {} |\n\
             | beats missed in the other rooms after the kill; before the kill | {}; {} |\n\
             | largest change of a beat's server instant (timeline) | {} ns |\n\
             | rejoin attempts: refused / failed otherwise / welcomed | {} / {} / {} |\n\
             | newcomers during recovery: refused / failed otherwise / welcomed of tried | {} / {} / {} of {} |\n\
             | seats kept; clock estimates carried over | {} of {}; {} |\n\
             | sessions that ended in the other rooms | {} |",
            beats["missed_away"],
            beats["missed_after"],
            beats["away"],
            beats["after"],
            fmt(v("beats_missed_max_per_child"), 0),
            fmt(v("children_missing_beats"), 0),
            fmt(v("beats_missed_others"), 0),
            fmt(v("beats_missed_before"), 0),
            fmt(v("timeline_shift_max_ns"), 0),
            fmt(v("rejoins_refused"), 0),
            fmt(v("rejoins_failed"), 0),
            x["attempt_outcomes"]["welcome"].as_u64().unwrap_or(0),
            fmt(v("newcomers_refused"), 0),
            fmt(v("newcomers_failed"), 0),
            x["newcomer_outcomes"]["welcome"].as_u64().unwrap_or(0),
            fmt(v("newcomers"), 0),
            x["seats_kept"],
            fmt(v("members_back"), 0),
            x["clock_carried"],
            fmt(v("others_ended"), 0),
        );
        let outcomes = |key: &str| {
            x[key]
                .as_object()
                .map(|o| o.iter().map(|(k, v)| format!("{v} × {k}")).collect::<Vec<_>>().join(", "))
                .unwrap_or_default()
        };
        let _ = writeln!(out, "\nRejoin attempts: {}.", outcomes("attempt_outcomes"));
        let _ = writeln!(out, "Newcomers: {}.", outcomes("newcomer_outcomes"));
        let _ = writeln!(out, "Sessions ended: {}.", outcomes("end_reasons"));
        let top = |key: &str| {
            let mut errors: Vec<(String, u64)> = x[key]
                .as_object()
                .map(|o| o.iter().map(|(k, v)| (k.clone(), v.as_u64().unwrap_or(0))).collect())
                .unwrap_or_default();
            errors.sort_by_key(|e| std::cmp::Reverse(e.1));
            errors.iter().take(4).map(|(k, v)| format!("{v} × \"{k}\"")).collect::<Vec<_>>().join(", ")
        };
        if x["attempt_errors"].as_object().is_some_and(|o| !o.is_empty()) {
            let _ = writeln!(out, "Rejoin errors, the commonest: {}.", top("attempt_errors"));
        }
        if x["newcomer_errors"].as_object().is_some_and(|o| !o.is_empty()) {
            let _ = writeln!(out, "Newcomers' errors, the commonest: {}.", top("newcomer_errors"));
        }
        if let Some(nodes) = x["node_warnings"].as_object() {
            for (node, warnings) in nodes {
                let Some(warnings) = warnings.as_object().filter(|w| !w.is_empty()) else { continue };
                let said: Vec<String> = warnings.iter().map(|(k, v)| format!("{v} × `{k}`")).collect();
                let _ = writeln!(out, "{node} logged: {}.", said.join(", "));
            }
        }
        if let Some(survivors) = x["survivors"].as_array() {
            let said: Vec<String> = survivors
                .iter()
                .map(|s| {
                    let n = |key: &str| fmt(s[key].as_f64(), 0);
                    format!(
                        "{} {} sessions in {} rooms ({} taken over)",
                        s["id"].as_str().unwrap_or("?"),
                        n("sessions"),
                        n("rooms"),
                        n("rooms_adopted")
                    )
                })
                .collect();
            let _ = writeln!(out, "After the recovery: {}.", said.join("; "));
        }
    }
    out.push_str(
        "\nSessions per node as nodes are added (the same class on a fresh district each time, \
         measured once every page schedules):\n\n\
         | nodes | sessions up | sessions per node | rooms per node | CPU per node (%) | all nodes' CPU (%) | CPU per 1,000 sessions (%) | RSS per node (MiB) | NATS CPU (%) | clients' CPU (%) |\n\
         |--:|--:|:--|:--|:--|--:|--:|:--|--:|--:|\n",
    );
    for system in report.systems.iter().filter(|s| s.system.starts_with("steady-")) {
        let nodes = system.extra["nodes"].as_array().cloned().unwrap_or_default();
        let list = |key: &str, digits: usize| {
            nodes
                .iter()
                .map(|n| n[key].as_f64().map_or_else(|| "?".to_owned(), |v| format!("{v:.digits$}")))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let _ = writeln!(
            out,
            "| {} | {} of {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            system.extra["node_count"],
            system.extra["joined"],
            system.extra["clients"],
            list("sessions", 0),
            list("rooms", 0),
            list("cpu_percent", 1),
            fmt(value(system, "cpu_total_percent"), 1),
            fmt(value(system, "cpu_per_1000_sessions_percent"), 1),
            list("rss_mib", 0),
            fmt(value(system, "nats_cpu_percent"), 1),
            fmt(value(system, "helpers_cpu_percent"), 0),
        );
    }
    out.push_str(&crate::report::run_footer(report));
    out
}

/// What a smoke run must show: every session joined, every member of the killed node's rooms
/// came back, beats were measured before and after, and a row per node count. It never checks
/// how fast or how well.
pub fn smoke_check(report: &RunReport) -> Result<()> {
    let failover = report.systems.iter().find(|s| s.system == "failover").context("smoke: no failover")?;
    let value = |key: &str| failover.metrics.iter().find(|m| m.key == key).and_then(|m| m.value).unwrap_or(0.0);
    let clients = failover.extra["clients"].as_f64().unwrap_or(0.0);
    ensure!(value("sessions") == clients && clients > 0.0, "smoke: {} of {clients} sessions joined", value("sessions"));
    ensure!(value("members_affected") > 0.0, "smoke: the killed node held no room");
    ensure!(
        value("members_back") == value("members_affected"),
        "smoke: {} of {} members came back",
        value("members_back"),
        value("members_affected")
    );
    let beats = &failover.extra["beats"];
    ensure!(beats["before"].as_u64().unwrap_or(0) > 0, "smoke: no beats measured before the kill");
    ensure!(beats["after"].as_u64().unwrap_or(0) > 0, "smoke: no beats measured after the return");
    let steady = report.systems.iter().filter(|s| s.system.starts_with("steady-")).count();
    ensure!(steady >= 2, "smoke: {steady} steady-state rows, not 2");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_empty_run_renders_and_fails_the_smoke_check() {
        let config = ClusterConfig {
            nodes: 3,
            rooms: 2,
            clients_per_room: 3,
            scaling: vec![1],
            lease_ms: 1_000,
            idle_timeout_ms: None,
            websocket_every: 0,
            hold_seconds: 1.0,
            after_seconds: 1.0,
            recovery_deadline_seconds: 1.0,
            newcomer_every_ms: 0,
            helpers: 1,
            bpm: 120,
            tick_ms: 100,
            lookahead_ms: 500,
            seed: 1,
            postgres_url: String::new(),
            nats_server: None,
            out: PathBuf::new(),
            raw: None,
            keep_logs: false,
            smoke: true,
            bench_binary: PathBuf::new(),
            command: String::new(),
        };
        let run = ClusterRun { nodes: 3, ..ClusterRun::default() };
        let report = RunReport {
            scenario: "cluster".into(),
            title: "t".into(),
            systems: vec![failover_result(&config, &run), steady_result(&run)],
            ..RunReport::default()
        };
        let text = markdown(&report);
        assert!(text.contains("| 3 | 0 of 0 |"), "{text}");
        assert!(smoke_check(&report).is_err());
    }
}
