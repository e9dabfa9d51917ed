//! The benchmark scenarios: each brings up the network (the kernel's loopback, or the packet
//! emulator with a profile), runs Downbeat and each peer on the same workload one after the
//! other, and returns a [`RunReport`] whose systems line up metric by metric.

use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail, ensure};
use downbeat_protocol::Transport;
use downbeat_server::auth::Role;
use serde_json::json;

use crate::downbeat::class::{ClassOutput, ClassSpec, RoomSpec, StudentSpec};
use crate::downbeat::{Ready, ServerLimits, ServerProcess, run_class};
use crate::machine::{ProcessMeter, StealMeter, describe};
use crate::metrics::{Better, Metric, RunReport, Summary, SystemResult, converged_metric};
use crate::netem::{Emulator, EmulatorConfig, Profile, Target};
use crate::peers::{self, ClientRun, PeerKind, PeerRun, PeerServer};

/// A system under test.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum System {
    /// This server with its native clients, over WebTransport (QUIC datagrams and a stream) or
    /// WebSocket (one TCP connection to the HTTP listener's `/api/ws`).
    Downbeat(Transport),
    /// A peer from `bench/peers`.
    Peer(PeerKind),
}

/// The names [`System::parse`] takes, for messages.
pub const SYSTEM_NAMES: &str = "downbeat, downbeat-websocket, socketio, ws or timesync";

impl System {
    /// Downbeat over WebTransport.
    pub const DOWNBEAT: Self = Self::Downbeat(Transport::WebTransport);
    /// Downbeat over WebSocket.
    pub const DOWNBEAT_WEBSOCKET: Self = Self::Downbeat(Transport::WebSocket);

    /// Parses `downbeat` (WebTransport; also `downbeat-webtransport`), `downbeat-websocket` or
    /// a peer's name (`socketio`, `ws`, `timesync`).
    pub fn parse(name: &str) -> Result<Self> {
        match name {
            "downbeat" | "downbeat-webtransport" => return Ok(Self::DOWNBEAT),
            "downbeat-websocket" => return Ok(Self::DOWNBEAT_WEBSOCKET),
            _ => {}
        }
        match name.parse::<PeerKind>() {
            Ok(kind) => Ok(Self::Peer(kind)),
            Err(_) => bail!("unknown system {name:?}: use {SYSTEM_NAMES}"),
        }
    }

    /// The name in the command line and the JSON (`downbeat` is WebTransport, as before the
    /// WebSocket transport existed).
    pub fn name(self) -> &'static str {
        match self {
            Self::Downbeat(Transport::WebTransport) => "downbeat",
            Self::Downbeat(Transport::WebSocket) => "downbeat-websocket",
            Self::Peer(kind) => kind.name(),
        }
    }

    /// The column heading in the report tables.
    pub fn display(self) -> &'static str {
        match self {
            Self::Downbeat(Transport::WebTransport) => "Downbeat (WebTransport)",
            Self::Downbeat(Transport::WebSocket) => "Downbeat (WebSocket)",
            Self::Peer(kind) => kind.display(),
        }
    }

    /// Whether its students sync their clocks (the clock-error figures apply).
    pub fn syncs_clocks(self) -> bool {
        match self {
            Self::Downbeat(_) => true,
            Self::Peer(kind) => kind.schedules_ahead(),
        }
    }
}

/// What every scenario takes.
#[derive(Clone, Debug)]
pub struct Common {
    /// `loopback` (the kernel's, no emulator), or an emulator profile.
    pub profile: String,
    /// Systems to run, Downbeat first.
    pub systems: Vec<System>,
    /// Seed for the emulator and the injected clocks.
    pub seed: u64,
    /// Emulator id (its addresses and names derive from it).
    pub netem_id: u8,
    /// Where JSON and PNG files go.
    pub out: PathBuf,
    /// The command line, for the report.
    pub command: String,
    /// The `downbeat-bench` program, which runs Downbeat's students (`class-helper`).
    pub bench_binary: PathBuf,
    /// How long Downbeat's students may take to join before the run goes on without those
    /// still joining.
    pub join_deadline: Duration,
}

/// The network one system's run crosses.
struct Net {
    emulator: Option<Emulator>,
}

impl Net {
    /// `loopback` is the kernel's loopback device (no emulator, nothing added); any other
    /// profile is the packet emulator with `clients` client addresses.
    fn up(common: &Common, clients: usize) -> Result<Self> {
        if common.profile == "loopback" {
            return Ok(Self { emulator: None });
        }
        let profile =
            Profile::by_name(&common.profile).with_context(|| format!("unknown profile {:?}", common.profile))?;
        let config = EmulatorConfig { seed: common.seed, ..EmulatorConfig::new(common.netem_id, clients, profile) };
        Ok(Self { emulator: Some(Emulator::start(config).context("starting the network emulator (needs root)")?) })
    }

    /// Client `i`'s address: its own emulator address, or a distinct loopback address.
    fn client_addr(&self, i: usize) -> IpAddr {
        match &self.emulator {
            Some(e) => IpAddr::V4(e.client_addr(i)),
            None => IpAddr::V4(Ipv4Addr::new(127, 0, 1 + (i / 250) as u8, 2 + (i % 250) as u8)),
        }
    }

    /// Where servers are reached.
    fn server_host(&self) -> IpAddr {
        match &self.emulator {
            Some(e) => IpAddr::V4(e.server_addr()),
            None => IpAddr::V4(Ipv4Addr::LOCALHOST),
        }
    }

    /// Runs `run` while, when emulated and `outage_at` is given, every path goes down for
    /// 1 s that many seconds after the start.
    fn with_outage<T>(&self, outage_at: Option<f64>, run: impl FnOnce() -> T) -> T {
        std::thread::scope(|scope| {
            if let (Some(at), Some(emulator)) = (outage_at, self.emulator.as_ref()) {
                scope.spawn(move || {
                    // Workload timing, not synchronisation: the outage lands mid-run.
                    std::thread::sleep(Duration::from_secs_f64(at));
                    emulator.outage(Target::All, Duration::from_secs(1));
                });
            }
            run()
        })
    }

    /// A command for a client program, inside the namespace when emulated.
    fn command(&self, program: &Path) -> Command {
        match &self.emulator {
            Some(e) => e.command_in_netns(program),
            None => Command::new(program),
        }
    }
}

/// The server's default playout delay for notes (`--playout-delay-ms`).
const PLAYOUT_DELAY_MS: u64 = 80;

/// How many client addresses the emulator can give.
const MAX_EMULATED_CLIENTS: usize = crate::netem::MAX_CLIENTS;

/// A classroom workload.
#[derive(Clone, Copy, Debug)]
pub struct Workload {
    /// Rooms at once.
    pub rooms: usize,
    /// Students per room.
    pub students: usize,
    /// Seconds the beat runs.
    pub seconds: f64,
    /// Tempo.
    pub bpm: u32,
    /// Notes per student per second.
    pub notes_per_second: f64,
    /// An outage of 1 s on every path this many seconds into the run (emulated profiles).
    pub outage_at: Option<f64>,
}

impl Workload {
    fn json(&self) -> serde_json::Value {
        json!({
            "rooms": self.rooms, "students_per_room": self.students, "seconds": self.seconds,
            "bpm": self.bpm, "notes_per_second": self.notes_per_second, "outage_at_s": self.outage_at,
        })
    }

    fn people(&self) -> usize {
        self.rooms * (self.students + 1)
    }
}

/// What the capacity scenario does while every session is held: measure the server.
type Hold<'a> = dyn FnMut(&ServerProcess, usize) -> Result<()> + 'a;

/// Runs Downbeat's class helper on `workload` over `transport`; returns its output and
/// figures of the server's process.
///
/// The server's HTTP listener, where WebSocket sessions arrive (`/api/ws`), listens on the
/// address the students reach (the emulator's server address when emulated), as the peers'
/// servers do: the WebSocket's TCP segments then cross the same impaired paths as the QUIC
/// datagrams (which reach the WebTransport endpoint, bound on every address, there too).
fn run_downbeat(
    common: &Common,
    transport: Transport,
    workload: &Workload,
    hold: Option<&mut Hold<'_>>,
) -> Result<(ClassOutput, serde_json::Value)> {
    let net = Net::up(common, workload.people())?;
    let server = ServerProcess::start(
        ServerLimits {
            sessions: (workload.people() + 100).max(ServerLimits::default().sessions),
            rooms: (workload.rooms + 10).max(ServerLimits::default().rooms),
        },
        net.server_host(),
    )?;
    let mut rooms = Vec::new();
    let mut address = 0;
    for r in 0..workload.rooms {
        let teacher_bind = Some(net.client_addr(address));
        address += 1;
        let mut students = Vec::new();
        for s in 0..workload.students {
            students.push(StudentSpec {
                token: server.token(Role::Student, &format!("s-{r}-{s}"))?,
                bind: Some(net.client_addr(address)),
            });
            address += 1;
        }
        rooms.push(RoomSpec { teacher_token: server.token(Role::Teacher, &format!("t-{r}"))?, teacher_bind, students });
    }
    let spec = ClassSpec {
        url: match transport {
            Transport::WebTransport => server.url(net.server_host()),
            Transport::WebSocket => server.websocket_url(),
        },
        cert_hashes: server.cert_hashes().to_vec(),
        server_zero: server.zero(),
        rooms,
        bpm: workload.bpm,
        seconds: workload.seconds,
        notes_per_second: workload.notes_per_second,
        max_offset_ms: 500.0,
        max_drift_ppm: 100.0,
        seed: common.seed,
        lookahead_ms: 200,
        tick_ms: 25,
        sample_ms: 100,
        settle_ms: 2000,
        concurrency: 128,
        hold: hold.is_some(),
        join_deadline: common.join_deadline,
        until_stdin_closes: false,
        beat_log: false,
        reflect_every_ms: 0,
        reflection_chars: 0,
    };
    let work = tempfile::tempdir()?;
    let exe = &common.bench_binary;
    let before = server.metrics()?;
    let meter = ProcessMeter::new(server.pid());
    let cpu_before = meter.cpu_seconds()?;
    let output = net.with_outage(workload.outage_at, || match hold {
        Some(hold) => run_class(net.command(exe), &spec, work.path(), |ready| match ready {
            Ready::Held(n) => hold(&server, n),
            Ready::Playing(_) => Ok(()),
        }),
        None => run_class(net.command(exe), &spec, work.path(), |_| Ok(())),
    })?;
    let after = server.metrics()?;
    let cpu = meter.cpu_seconds()? - cpu_before;
    let sent = after.get("downbeat_datagrams_sent_total").unwrap_or(&0.0)
        - before.get("downbeat_datagrams_sent_total").unwrap_or(&0.0);
    let received = after.get("downbeat_datagrams_received_total").unwrap_or(&0.0)
        - before.get("downbeat_datagrams_received_total").unwrap_or(&0.0);
    let netem = net.emulator.as_ref().map(|e| serde_json::to_value(e.stats()).unwrap_or_default());
    let counter = |name: &str| after.get(name).unwrap_or(&0.0) - before.get(name).unwrap_or(&0.0);
    let label = format!("{{transport=\"{}\"}}", transport.as_str());
    let extra = json!({
        "transport": transport.as_str(),
        "url": spec.url,
        // WebSocket only: beat frames and sync replies the server dropped rather than queue
        // behind a slow socket (QUIC's refused sends are in datagrams_send_failed).
        "timing_dropped": counter(&format!("downbeat_transport_timing_dropped_total{label}")),
        "datagrams_send_failed": counter("downbeat_datagrams_send_failed_total"),
        "server_cpu_seconds": cpu,
        "datagrams_sent": sent,
        "datagrams_received": received,
        "server_cpu_ms_per_1000_datagrams": if sent + received > 0.0 { cpu * 1e6 / (sent + received) } else { 0.0 },
        "netem": netem,
    });
    Ok((output, extra))
}

/// Runs one peer on `workload` (one room: the peers' client drives one room per run).
fn run_peer(common: &Common, kind: PeerKind, workload: &Workload) -> Result<PeerRun> {
    ensure!(workload.rooms == 1, "the peers' client drives one room per run");
    peers::check_installed()?;
    let net = Net::up(common, workload.people())?;
    let server = PeerServer::start(kind, net.server_host())?;
    let mut run = ClientRun::new(kind, server.url());
    run.clients = workload.students;
    run.seconds = workload.seconds;
    run.bpm = f64::from(workload.bpm);
    run.notes_per_second = workload.notes_per_second;
    run.processes = 1;
    run.bind_addresses = (0..workload.people()).map(|i| net.client_addr(i)).collect();
    let result = net.with_outage(workload.outage_at, || run.run(net.emulator.as_ref()));
    let _ = server.stop();
    result
}

fn check_clients(common: &Common, workload: &Workload) -> Result<()> {
    if common.profile != "loopback" {
        ensure!(
            workload.people() <= MAX_EMULATED_CLIENTS,
            "the emulator gives at most {MAX_EMULATED_CLIENTS} client addresses; {} people asked for",
            workload.people()
        );
    }
    Ok(())
}

fn profile_parameters(profile: &str) -> String {
    if profile == "loopback" {
        return "loopback: the kernel's loopback device, no emulator, nothing added".into();
    }
    Profile::by_name(profile).map_or_else(|| profile.to_owned(), |p| p.to_string())
}

fn report(common: &Common, scenario: &str, title: &str, parameters: serde_json::Value) -> RunReport {
    RunReport {
        scenario: scenario.into(),
        title: title.into(),
        profile: common.profile.clone(),
        profile_parameters: profile_parameters(&common.profile),
        parameters,
        command: common.command.clone(),
        started_at: now_rfc3339(),
        machine: describe(),
        ..RunReport::default()
    }
}

fn now_rfc3339() -> String {
    let t = time::OffsetDateTime::now_utc();
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}Z",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second()
    )
}

fn downbeat_result(
    system: System,
    extra: serde_json::Value,
    metrics: Vec<Metric>,
    distributions: &[(&str, &[f64])],
) -> SystemResult {
    SystemResult {
        system: system.name().into(),
        display: system.display().into(),
        metrics,
        distributions: distributions.iter().map(|(k, v)| ((*k).to_owned(), v.to_vec())).collect(),
        extra,
    }
}

fn with_class_extra(mut extra: serde_json::Value, output: &ClassOutput) -> serde_json::Value {
    extra["students"] = json!(output.students);
    extra["joined"] = json!(output.joined);
    extra["join_errors"] = json!(output.join_errors);
    extra["beats_checked"] = json!(output.beats_checked);
    extra["beats_late"] = json!(output.beats_late);
    extra["beats_missing"] = json!(output.beats_missing);
    extra["notes_sent"] = json!(output.notes_sent);
    extra["deliveries_expected"] = json!(output.deliveries_expected);
    extra["deliveries_missing"] = json!(output.deliveries_missing);
    extra["deliveries_late"] = json!(output.deliveries_late);
    extra["onset_vs_server_ms"] = json!(Summary::of(&output.onset_vs_server_ms));
    extra
}

/// Runs `each` for every system, timing the whole and recording steal.
fn run_systems(
    common: &Common,
    mut report: RunReport,
    mut each: impl FnMut(System) -> Result<SystemResult>,
) -> Result<RunReport> {
    let began = Instant::now();
    let steal = StealMeter::start();
    for &system in &common.systems {
        report.systems.push(each(system).with_context(|| format!("running {}", system.name()))?);
    }
    report.wall_seconds = began.elapsed().as_secs_f64();
    report.machine.steal_percent = steal.percent();
    if report.machine.steal_percent > 1.0 {
        report.notes.push(format!(
            "The hypervisor stole {:.1} % of the CPU during this run: treat its tails as noisy.",
            report.machine.steal_percent
        ));
    }
    Ok(report)
}

/// Clock sync: clock error against the injected truth and time to converge.
pub fn sync(common: &Common, workload: &Workload) -> Result<RunReport> {
    check_clients(common, workload)?;
    let report = report(common, "sync", "Clock sync: error against the truth", workload.json());
    run_systems(common, report, |system| match system {
        System::Downbeat(transport) => {
            let (output, extra) = run_downbeat(common, transport, workload, None)?;
            let errors = Summary::of(&output.offset_error_ms);
            let converged = output.converged_s.iter().try_fold(0.0f64, |m, c| c.map(|c| m.max(c)));
            let metrics = vec![
                Metric::lower("offset_error_p50_ms", "clock error vs truth p50", "ms", errors.p50),
                Metric::lower("offset_error_p99_ms", "clock error vs truth p99", "ms", errors.p99),
                converged_metric(converged),
            ];
            Ok(downbeat_result(
                system,
                with_class_extra(extra, &output),
                metrics,
                &[("offset_error_ms", &output.offset_error_ms)],
            ))
        }
        System::Peer(kind) => Ok(peers::sync_result(&run_peer(common, kind, workload)?)),
    })
}

/// Beat onset spread, late and missing beats.
pub fn onset(common: &Common, workload: &Workload) -> Result<RunReport> {
    check_clients(common, workload)?;
    let report = report(common, "onset", "Beat onset spread: one beat across the class", workload.json());
    run_systems(common, report, |system| match system {
        System::Downbeat(transport) => {
            let (output, extra) = run_downbeat(common, transport, workload, None)?;
            let spread = Summary::of(&output.onset_spread_ms);
            let judged = output.beats_checked + output.beats_missing;
            let late = if judged == 0 {
                0.0
            } else {
                (output.beats_late + output.beats_missing) as f64 * 100.0 / judged as f64
            };
            let metrics = vec![
                Metric::lower("onset_spread_p50_ms", "beat onset spread p50", "ms", spread.p50),
                Metric::lower("onset_spread_p99_ms", "beat onset spread p99", "ms", spread.p99),
                Metric::lower("onset_spread_max_ms", "beat onset spread max", "ms", spread.max),
                Metric::lower("late_beats_percent", "late or missing beats", "%", late).with_note(
                    "Downbeat schedules ahead: a beat is late when a client schedules it after its instant, \
                     missing when it never does",
                ),
                Metric::not_applicable(
                    "server_drift_ms",
                    "beat timer drift over the run",
                    "ms",
                    Better::Lower,
                    "no timer: beat n sounds at anchor + n x 60/bpm, computed exactly",
                ),
            ];
            Ok(downbeat_result(
                system,
                with_class_extra(extra, &output),
                metrics,
                &[("onset_spread_ms", &output.onset_spread_ms)],
            ))
        }
        System::Peer(kind) => Ok(peers::onset_result(&run_peer(common, kind, workload)?)),
    })
}

/// Note fan-out latency and synchronized playout.
pub fn fanout(common: &Common, workload: &Workload) -> Result<RunReport> {
    check_clients(common, workload)?;
    let report = report(common, "fanout", "Note fan-out: a child's note reaching the class", workload.json());
    run_systems(common, report, |system| match system {
        System::Downbeat(transport) => {
            let (output, extra) = run_downbeat(common, transport, workload, None)?;
            let fan = Summary::of(&output.fanout_ms);
            let playout = Summary::of(&output.playout_spread_ms);
            let lost = if output.deliveries_expected == 0 {
                0.0
            } else {
                output.deliveries_missing as f64 * 100.0 / output.deliveries_expected as f64
            };
            let metrics = vec![
                Metric::lower("fanout_p50_ms", "note fan-out latency p50", "ms", fan.p50),
                Metric::lower("fanout_p99_ms", "note fan-out latency p99", "ms", fan.p99),
                Metric::lower("fanout_p999_ms", "note fan-out latency p99.9", "ms", fan.p999),
                Metric::lower("notes_lost_percent", "note deliveries lost", "%", lost).with_note(&format!(
                    "Downbeat: not played by a classmate; {:.2} % arrived after their shared playout instant \
                     (played + {} ms) and were dropped rather than played out of sync; they are not in the \
                     latency figures",
                    if output.deliveries_expected == 0 {
                        0.0
                    } else {
                        output.deliveries_late as f64 * 100.0 / output.deliveries_expected as f64
                    },
                    PLAYOUT_DELAY_MS
                )),
                Metric::lower("playout_spread_p99_ms", "synchronized playout spread p99", "ms", playout.p99)
                    .with_note("Downbeat: true instants at which the classmates schedule the note"),
            ];
            Ok(downbeat_result(
                system,
                with_class_extra(extra, &output),
                metrics,
                &[("fanout_ms", &output.fanout_ms), ("playout_spread_ms", &output.playout_spread_ms)],
            ))
        }
        System::Peer(kind) => {
            // The peers' client drives one room: run them on one room of the same size.
            let one_room = Workload { rooms: 1, ..*workload };
            let mut result = peers::fanout_result(&run_peer(common, kind, &one_room)?);
            if workload.rooms > 1 {
                result.extra["note"] =
                    json!(format!("one room of {} (Downbeat ran {} rooms)", workload.students, workload.rooms));
            }
            Ok(result)
        }
    })
}

/// A class joining at once, then a storm of `storm` sessions for handshakes per second.
pub fn join(common: &Common, workload: &Workload, storm: usize) -> Result<RunReport> {
    check_clients(common, workload)?;
    let mut parameters = workload.json();
    parameters["storm_sessions"] = json!(storm);
    let report = report(common, "join", "A class joining at once, and a join storm", parameters);
    let storm_workload = Workload { rooms: storm.div_ceil(workload.students.max(1)), ..*workload };
    let storm_workload = if common.profile == "loopback" { storm_workload } else { Workload { rooms: 1, ..*workload } };
    run_systems(common, report, |system| match system {
        System::Downbeat(transport) => {
            let class = Workload { seconds: 1.0, notes_per_second: 0.0, ..*workload };
            let (output, extra) = run_downbeat(common, transport, &class, None)?;
            let welcomed = Summary::of(&output.welcome_ms);
            let slowest_welcome = output.welcome_ms.iter().copied().fold(0.0f64, f64::max);
            let (storm_output, storm_extra) =
                run_downbeat(common, transport, &storm_workload, Some(&mut |_, _| Ok(())))?;
            let rate = storm_output.joined as f64 / (storm_output.all_joined_ms / 1e3).max(1e-9);
            // The server's own CPU over the storm run (its process alone, from /proc), apart
            // from the clients': what one handshake costs the server.
            let server_cpu_ms = storm_extra["server_cpu_seconds"].as_f64().unwrap_or(0.0) * 1e3;
            let per_handshake = server_cpu_ms / (storm_output.joined.max(1) as f64);
            let handshake = match transport {
                Transport::WebTransport => {
                    "Downbeat over WebTransport: QUIC and TLS handshake, session, hello and welcome"
                }
                Transport::WebSocket => {
                    "Downbeat over WebSocket: TCP handshake, WebSocket upgrade (no TLS, as the peers), hello and welcome"
                }
            };
            let metrics = vec![
                Metric::lower("join_all_ms", "whole class joined (slowest)", "ms", slowest_welcome)
                    .with_note(handshake),
                Metric::lower("join_p50_ms", "join time p50", "ms", welcomed.p50),
                Metric::lower("synced_all_ms", "whole class joined and clock-synced", "ms", output.all_joined_ms)
                    .with_note("from the first connect to the last student's clock synced"),
                Metric::lower("join_failures", "joins failed", "", (output.students - output.joined) as f64),
                Metric::higher("handshakes_per_s", "handshakes per second (storm)", "/s", rate),
                Metric::lower("server_cpu_ms_per_handshake", "server CPU per handshake (storm)", "ms", per_handshake)
                    .with_note(
                        "the server process's CPU (/proc) over the storm run, its rooms' creation included, per session joined",
                    ),
            ];
            let mut extra = with_class_extra(extra, &output);
            extra["storm"] = json!({"sessions": storm_output.students, "joined": storm_output.joined, "ms": storm_output.all_joined_ms, "errors": storm_output.students - storm_output.joined});
            Ok(downbeat_result(system, extra, metrics, &[("join_ms", &output.synced_ms)]))
        }
        System::Peer(kind) => {
            let class = run_peer(common, kind, &Workload { seconds: 1.0, notes_per_second: 0.0, ..*workload })?;
            let mut result = peers::join_result(&class);
            let storm_students = if common.profile == "loopback" { storm } else { workload.students };
            let storm_run = run_peer(
                common,
                kind,
                &Workload { rooms: 1, students: storm_students, seconds: 1.0, notes_per_second: 0.0, ..*workload },
            )?;
            let joined: Vec<f64> = storm_run.connect_ms.iter().flatten().copied().collect();
            let slowest = joined.iter().copied().fold(0.0f64, f64::max);
            let rate = joined.len() as f64 / (slowest / 1e3).max(1e-9);
            result.metrics.push(
                Metric::higher("handshakes_per_s", "handshakes per second (storm)", "/s", rate)
                    .with_note("WebSocket upgrades (no TLS) of one room's clients at once"),
            );
            Ok(result)
        }
    })
}

/// Capacity: sessions held with beats flowing, memory per session, CPU per datagram, for
/// each Downbeat system in `common.systems` (WebTransport when there is none; the peers
/// have no capacity run).
pub fn capacity(common: &Common, sessions: usize, hold_seconds: f64) -> Result<RunReport> {
    let rooms = sessions.div_ceil(30);
    let workload = Workload {
        rooms,
        students: sessions.div_ceil(rooms.max(1)),
        seconds: 0.0,
        bpm: 120,
        notes_per_second: 0.0,
        outage_at: None,
    };
    check_clients(common, &workload)?;
    let mut parameters = workload.json();
    parameters["hold_seconds"] = json!(hold_seconds);
    let mut report = report(common, "capacity", "Capacity: sessions held with beats flowing", parameters);
    let began = Instant::now();
    let steal = StealMeter::start();
    let baseline = {
        // A fresh server's footprint, before any session.
        let server = ServerProcess::start(ServerLimits::default(), IpAddr::V4(Ipv4Addr::LOCALHOST))?;
        std::thread::sleep(Duration::from_millis(500));
        ProcessMeter::new(server.pid()).rss_bytes()?
    };
    let mut systems: Vec<System> =
        common.systems.iter().copied().filter(|s| matches!(s, System::Downbeat(_))).collect();
    if systems.is_empty() {
        systems.push(System::DOWNBEAT);
    }
    for system in systems {
        let System::Downbeat(transport) = system else { continue };
        let result = capacity_of(common, system, transport, &workload, hold_seconds, baseline)
            .with_context(|| format!("running {}", system.name()))?;
        report.systems.push(result);
    }
    report.wall_seconds = began.elapsed().as_secs_f64();
    report.machine.steal_percent = steal.percent();
    Ok(report)
}

/// One Downbeat system's capacity run; `baseline` is a fresh server's RSS in bytes.
fn capacity_of(
    common: &Common,
    system: System,
    transport: Transport,
    workload: &Workload,
    hold_seconds: f64,
    baseline: u64,
) -> Result<SystemResult> {
    let mut measured = serde_json::Value::Null;
    let mut hold = |server: &ServerProcess, held: usize| -> Result<()> {
        let meter = ProcessMeter::new(server.pid());
        // Let handshakes' transient allocations settle, then measure a steady window.
        std::thread::sleep(Duration::from_secs(2));
        let (rss, cpu0, m0) = (meter.rss_bytes()?, meter.cpu_seconds()?, server.metrics()?);
        std::thread::sleep(Duration::from_secs_f64(hold_seconds));
        let (cpu1, m1) = (meter.cpu_seconds()?, server.metrics()?);
        let delta = |k: &str| m1.get(k).unwrap_or(&0.0) - m0.get(k).unwrap_or(&0.0);
        measured = json!({
            "held": held,
            "sessions_active": m1.get("downbeat_sessions_active"),
            "rss_bytes": rss,
            "cpu_seconds": cpu1 - cpu0,
            "datagrams": delta("downbeat_datagrams_sent_total") + delta("downbeat_datagrams_received_total"),
        });
        Ok(())
    };
    let (output, extra) = run_downbeat(common, transport, workload, Some(&mut hold))?;
    let held = measured["sessions_active"].as_f64().unwrap_or(0.0);
    let rss = measured["rss_bytes"].as_f64().unwrap_or(0.0);
    let datagrams = measured["datagrams"].as_f64().unwrap_or(0.0);
    let cpu = measured["cpu_seconds"].as_f64().unwrap_or(0.0);
    let mut per_datagram = Metric::lower(
        "cpu_ms_per_1000_datagrams",
        "server CPU per 1,000 datagrams",
        "ms",
        if datagrams > 0.0 { cpu * 1e6 / datagrams } else { 0.0 },
    );
    if transport == Transport::WebSocket {
        per_datagram = per_datagram
            .with_note("WebSocket: binary messages with datagram semantics (beat frames, sync requests and replies)");
    }
    let metrics = vec![
        Metric::higher("sessions_held", "sessions held", "", held),
        Metric::lower(
            "rss_per_session_kib",
            "memory per session",
            "KiB",
            (rss - baseline as f64) / held.max(1.0) / 1024.0,
        )
        .with_note("server RSS growth over a fresh server's, divided by sessions held"),
        per_datagram,
        Metric::higher(
            "datagrams_per_s",
            "datagrams per second (sent + received)",
            "/s",
            datagrams / hold_seconds.max(1e-9),
        ),
        Metric::lower("join_all_ms", "all sessions up", "ms", output.all_joined_ms),
    ];
    let mut extra = with_class_extra(extra, &output);
    extra["measured"] = measured;
    extra["baseline_rss_bytes"] = json!(baseline);
    Ok(downbeat_result(system, extra, metrics, &[]))
}
