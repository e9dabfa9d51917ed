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
use crate::light::{Generator, LightRoom, LightSpec, SYNC_ROUND_TRIP_BOUNDS_MS, SYNC_ROUND_TRIP_BUCKETS};
use crate::machine::{ProcessMeter, StealMeter, describe, udp_drops_of};
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
            let (output, mut extra) = run_downbeat(common, transport, workload, None)?;
            let errors = Summary::of(&output.offset_error_ms);
            // How the error splits: a bias each student keeps (mostly of one sign where one
            // direction is slower on every path, such as a server whose receiving waits behind
            // its other sessions) and the estimate moving about it.
            let biases = &output.offset_bias_ms;
            extra["offset_bias_mean_ms"] = json!(Summary::of(biases).mean);
            extra["offset_bias_abs_ms"] = json!(Summary::of(&biases.iter().map(|b| b.abs()).collect::<Vec<_>>()));
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

/// The clients a capacity run joins.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Clients {
    /// The light load generator ([`crate::light`]): idle classroom sessions sharing a few
    /// client endpoints, one task per endpoint driving its connections sans-IO. WebTransport
    /// on loopback only.
    Light,
    /// The product's native client ([`downbeat_client::Client`]), one per session, in the
    /// class helper: each its own socket, endpoint and tasks.
    Native,
}

/// The names [`Clients::parse`] takes.
pub const CLIENTS_NAMES: &str = "light or native";

impl Clients {
    /// `light` or `native`.
    pub fn parse(name: &str) -> Result<Self> {
        match name {
            "light" => Ok(Self::Light),
            "native" => Ok(Self::Native),
            _ => bail!("unknown clients {name:?}: use {CLIENTS_NAMES}"),
        }
    }

    /// The name in the command line and the JSON.
    pub fn name(self) -> &'static str {
        match self {
            Self::Light => "light",
            Self::Native => "native",
        }
    }
}

/// What a capacity run measures.
#[derive(Clone, Debug)]
pub struct CapacityPlan {
    /// Students to hold at each point of the curve, in order (rooms of 30, a teacher each);
    /// every point on a fresh server.
    pub sessions: Vec<usize>,
    /// Seconds of the steady window measured at each point.
    pub hold_seconds: f64,
    /// Seconds between the last session up and the window: clients settle meanwhile (a
    /// session's clock sync asks 20 times a second for its first 1.5 s and 5 times a second
    /// until its estimate settles, then about once a second), so the window measures a class
    /// holding, not one joining.
    pub settle_seconds: f64,
    /// The clients, each a column of the report.
    pub clients: Vec<Clients>,
    /// Light clients: sessions started per second at most (0: as fast as the handshakes in
    /// flight allow).
    pub join_rate: f64,
    /// Light clients: handshakes in flight at most.
    pub join_concurrency: usize,
    /// Light clients: the generator's worker threads.
    pub light_threads: usize,
}

impl CapacityPlan {
    /// One point of `sessions` with `clients`, ramped at the light generator's defaults.
    pub fn new(sessions: usize, hold_seconds: f64, clients: Clients) -> Self {
        Self {
            sessions: vec![sessions],
            hold_seconds,
            settle_seconds: 2.0,
            clients: vec![clients],
            join_rate: 200.0,
            join_concurrency: 32,
            light_threads: 2,
        }
    }
}

/// Seconds a full capacity run lets its clients settle before the window
/// ([`CapacityPlan::settle_seconds`]; a smoke run takes 2).
pub const SETTLE_SECONDS: f64 = 45.0;

/// Students per room in a capacity run.
const CAPACITY_ROOM: usize = 30;

/// One point of a capacity curve: the join phase, then the steady window.
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct CapacityPoint {
    /// Students asked for.
    pub sessions: usize,
    /// Rooms (a teacher each).
    pub rooms: usize,
    /// Students welcomed.
    pub joined: usize,
    /// Join failures (and sessions given up at the deadline), with reasons.
    pub join_errors: Vec<String>,
    /// Whether the join deadline ended the join phase.
    pub deadline_passed: bool,
    /// First connect to the last session up, seconds.
    pub join_seconds: f64,
    /// Sessions (teachers and students) up per second of the join phase.
    pub joins_per_s: f64,
    /// The server's CPU over the join phase per session up, ms.
    pub server_join_cpu_ms_per_session: f64,
    /// The server's sessions at the window's end (its `downbeat_sessions_active`).
    pub held: f64,
    /// The server's RSS at the window's start, bytes.
    pub server_rss_bytes: u64,
    /// Growth over a fresh server's RSS per session held, KiB.
    pub rss_per_session_kib: f64,
    /// The server's CPU over the window, % of one core.
    pub server_cpu_percent: f64,
    /// Datagrams the server sent and received per second of the window.
    pub datagrams_per_s: f64,
    /// The server's CPU per 1,000 of those datagrams, ms.
    pub cpu_ms_per_1000_datagrams: f64,
    /// Datagrams the server's connections refused to queue during the window.
    pub datagrams_send_failed: f64,
    /// The clients' own CPU over the window, % of one core (light: this program; native:
    /// the class helper).
    pub generator_cpu_percent: f64,
    /// The clients' RSS at the window's start, bytes.
    pub generator_rss_bytes: u64,
    /// Light clients: beat frames received per second of the window.
    pub frames_received_per_s: Option<f64>,
    /// Light clients: beat frames received in all, from the first welcome to the window's end
    /// (each session's joining frame, the bursts, then a frame every 10 s once settled).
    pub frames_received: Option<u64>,
    /// Light clients: sessions whose clock was synced at the window's end.
    pub synced: Option<i64>,
    /// Light clients: sessions lost after their welcome, by the window's end.
    pub lost: Option<u64>,
    /// Seconds of the window.
    pub window_seconds: f64,
    /// UDP datagrams the kernel dropped for a full socket receive buffer during the join
    /// phase and during the window (machine-wide `RcvbufErrors`: the server's sockets and
    /// the clients'; `server_udp_drops` and `generator_udp_drops` tell them apart).
    pub udp_receive_drops: (u64, u64),
    /// Light clients: sync requests per session held per second of the window. A settled
    /// client asks about once a second; fewer means the generator fell behind its sessions'
    /// schedules, and the server carried less than that many clients would give it.
    #[serde(default)]
    pub sync_requests_per_session_s: Option<f64>,
    /// The processors the server could run on in the window, as the kernel listed them
    /// (`Cpus_allowed_list`; `BENCH_SERVER_CPUS` pins it).
    #[serde(default)]
    pub server_cpus: String,
    /// The processors this program (the light generator, or the native clients' helper it
    /// starts) could run on (`taskset -c 0 downbeat-bench ...` keeps it off the server's).
    #[serde(default)]
    pub generator_cpus: String,
    /// Datagrams dropped at the server's own sockets during the window (their full receive
    /// buffers), apart from the machine-wide count in `udp_receive_drops`.
    #[serde(default)]
    pub server_udp_drops: Option<u64>,
    /// Light clients: datagrams dropped at the generator's sockets during the window (a
    /// generator behind on its reads).
    #[serde(default)]
    pub generator_udp_drops: Option<u64>,
}

/// Capacity: sessions held in rooms of 30 with beats flowing, memory per session, CPU per
/// datagram, the server's and the clients' CPU apart, for each Downbeat system in
/// `common.systems` (WebTransport when there is none; the peers have no capacity run) and
/// each kind of client in `plan.clients`; at every size in `plan.sessions`, each on a fresh
/// server. The metrics are the largest point's; every point is in `extra.points`.
pub fn capacity(common: &Common, plan: &CapacityPlan) -> Result<RunReport> {
    ensure!(!plan.sessions.is_empty() && !plan.clients.is_empty(), "capacity needs sessions and clients");
    let largest = plan.sessions.iter().copied().max().unwrap_or(0).max(1);
    let workload = capacity_workload(largest);
    check_clients(common, &workload)?;
    let mut parameters = workload.json();
    parameters["hold_seconds"] = json!(plan.hold_seconds);
    parameters["settle_seconds"] = json!(plan.settle_seconds);
    parameters["sessions"] = json!(plan.sessions);
    parameters["clients"] = json!(plan.clients.iter().map(|c| c.name()).collect::<Vec<_>>());
    if plan.clients.contains(&Clients::Light) {
        parameters["join_rate"] = json!(plan.join_rate);
        parameters["join_concurrency"] = json!(plan.join_concurrency);
        parameters["light_threads"] = json!(plan.light_threads);
    }
    if let Some(cpus) = crate::downbeat::server_cpus() {
        parameters["server_cpus"] = json!(cpus);
    }
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
        for &clients in &plan.clients {
            if clients == Clients::Light && transport == Transport::WebSocket {
                report.notes.push(format!(
                    "{} has no light clients (they speak WebTransport only): run it with --clients native.",
                    system.display()
                ));
                continue;
            }
            let result = capacity_of(common, system, transport, clients, plan, baseline)
                .with_context(|| format!("running {} with {} clients", system.name(), clients.name()))?;
            report.systems.push(result);
        }
    }
    ensure!(!report.systems.is_empty(), "no capacity run: light clients need Downbeat over WebTransport");
    if plan.clients.contains(&Clients::Light) {
        report.notes.push(
            "Light clients: idle classroom sessions from this program (hello, clock sync on the estimator's schedule, \
             a report when it says something new or every 10 s, beat frames received and counted), many per client endpoint (sans-IO QUIC, one task per endpoint); every \
             room's beat starts as soon as its teacher is in, so beats flow while the rest join."
                .into(),
        );
    }
    report.wall_seconds = began.elapsed().as_secs_f64();
    report.machine.steal_percent = steal.percent();
    Ok(report)
}

/// Rooms of 30 holding `sessions` students.
fn capacity_workload(sessions: usize) -> Workload {
    let rooms = sessions.div_ceil(CAPACITY_ROOM).max(1);
    Workload {
        rooms,
        students: sessions.div_ceil(rooms),
        seconds: 0.0,
        bpm: 120,
        notes_per_second: 0.0,
        outage_at: None,
    }
}

/// One Downbeat system's capacity with one kind of client, every point; `baseline` is a
/// fresh server's RSS in bytes.
fn capacity_of(
    common: &Common,
    system: System,
    transport: Transport,
    clients: Clients,
    plan: &CapacityPlan,
    baseline: u64,
) -> Result<SystemResult> {
    let mut points = Vec::new();
    let mut last_extra = serde_json::Value::Null;
    for &sessions in &plan.sessions {
        let (point, extra) = match clients {
            Clients::Light => light_point(common, sessions, plan, baseline)?,
            Clients::Native => native_point(common, transport, sessions, plan, baseline)?,
        };
        eprintln!(
            "capacity ({} clients): {} of {} students up, {:.0} sessions held, server {:.0} % CPU, {:.1} KiB/session, \
             {:.1} ms/1000 datagrams; clients {:.0} % CPU",
            clients.name(),
            point.joined,
            point.sessions,
            point.held,
            point.server_cpu_percent,
            point.rss_per_session_kib,
            point.cpu_ms_per_1000_datagrams,
            point.generator_cpu_percent,
        );
        points.push(point);
        last_extra = extra;
    }
    let Some(last) = points.last().cloned() else { bail!("no capacity point ran") };
    let mut per_datagram = Metric::lower(
        "cpu_ms_per_1000_datagrams",
        "server CPU per 1,000 datagrams",
        "ms",
        last.cpu_ms_per_1000_datagrams,
    );
    if transport == Transport::WebSocket {
        per_datagram = per_datagram
            .with_note("WebSocket: binary messages with datagram semantics (beat frames, sync requests and replies)");
    }
    let generator_note = match clients {
        Clients::Light => "the light generator's threads (this program's process, /proc/self) over the window",
        Clients::Native => "the class helper's process (/proc) over the window",
    };
    let metrics = vec![
        Metric::higher("sessions_held", "sessions held", "", last.held),
        Metric::lower("rss_per_session_kib", "memory per session", "KiB", last.rss_per_session_kib)
            .with_note("server RSS growth over a fresh server's, divided by sessions held"),
        per_datagram,
        Metric::higher("datagrams_per_s", "datagrams per second (sent + received)", "/s", last.datagrams_per_s),
        Metric::lower("server_cpu_percent", "server CPU", "% of a core", last.server_cpu_percent)
            .with_note("the server process alone (/proc/<pid>), over the steady window"),
        Metric::lower("generator_cpu_percent", "clients' CPU", "% of a core", last.generator_cpu_percent)
            .with_note(generator_note),
        Metric::lower("join_all_ms", "all sessions up", "ms", last.join_seconds * 1e3),
        Metric::higher("joins_per_s", "sessions up per second (join phase)", "/s", last.joins_per_s),
        Metric::lower(
            "server_join_cpu_ms_per_session",
            "server CPU per session joined",
            "ms",
            last.server_join_cpu_ms_per_session,
        )
        .with_note(match clients {
            Clients::Light => {
                "the server's CPU over the join phase per session up (beats to the rooms already up included)"
            }
            Clients::Native => "the server's CPU from its start to the last session up, per session up",
        }),
        Metric::lower(
            "udp_receive_drops",
            "UDP datagrams dropped at a full receive buffer",
            "",
            (last.udp_receive_drops.0 + last.udp_receive_drops.1) as f64,
        )
        .with_note(
            "machine-wide RcvbufErrors over the join phase and the window: the server's and the clients' sockets",
        ),
        Metric::lower(
            "server_udp_drops",
            "UDP datagrams dropped at the server's socket in the window",
            "",
            last.server_udp_drops.unwrap_or(0) as f64,
        )
        .with_note("the drops column of /proc/net/udp and udp6 for the server's own sockets"),
    ];
    let mut extra = match last_extra {
        serde_json::Value::Object(_) => last_extra,
        _ => json!({}),
    };
    extra["clients"] = json!(clients.name());
    extra["transport"] = json!(transport.as_str());
    extra["students"] = json!(last.sessions);
    extra["joined"] = json!(last.joined);
    extra["join_errors"] = json!(last.join_errors);
    extra["baseline_rss_bytes"] = json!(baseline);
    extra["points"] = serde_json::to_value(&points)?;
    Ok(SystemResult {
        system: system.name().into(),
        display: format!("{} · {} clients", system.display(), clients.name()),
        metrics,
        distributions: Default::default(),
        extra,
    })
}

/// The steady window at one point: the server's figures and the clients' CPU.
#[derive(Debug, Default)]
struct Window {
    held: f64,
    rss: u64,
    cpu_seconds: f64,
    datagrams: f64,
    send_failed: f64,
    generator_cpu_seconds: f64,
    generator_rss: u64,
    frames: u64,
    seconds: f64,
    udp_drops: u64,
    server_cpus: String,
    generator_cpus: String,
    server_udp_drops: u64,
    /// This program's sockets' (the light generator's).
    own_udp_drops: u64,
}

/// The clients' side of a window: their CPU seconds so far and beat frames received so far
/// (0 when not counted).
type ClientsGauge<'a> = dyn FnMut() -> Result<(f64, u64)> + 'a;

/// Lets handshakes' transient allocations and the clients' clock sync settle for the plan's
/// `settle_seconds`, then measures `hold_seconds` of steady state: the server's RSS, CPU and
/// datagrams, the clients' CPU.
fn measure_window(
    server: &ServerProcess,
    plan: &CapacityPlan,
    generator_rss: impl Fn() -> u64,
    clients: &mut ClientsGauge<'_>,
) -> Result<Window> {
    let (settle_seconds, hold_seconds) = (plan.settle_seconds, plan.hold_seconds);
    let meter = ProcessMeter::new(server.pid());
    std::thread::sleep(Duration::from_secs_f64(settle_seconds.max(0.0)));
    let (rss, generator_rss) = (meter.rss_bytes()?, generator_rss());
    let (cpu0, m0, (g0, f0)) = (meter.cpu_seconds()?, server.metrics()?, clients()?);
    let drops0 = crate::machine::udp_receive_buffer_drops();
    let socket_drops = || (udp_drops_of(Some(server.pid())), udp_drops_of(None));
    let (server_drops0, own_drops0) = socket_drops();
    let t0 = Instant::now();
    std::thread::sleep(Duration::from_secs_f64(hold_seconds));
    let (cpu1, m1, (g1, f1)) = (meter.cpu_seconds()?, server.metrics()?, clients()?);
    let seconds = t0.elapsed().as_secs_f64();
    let (server_drops1, own_drops1) = socket_drops();
    let delta = |k: &str| m1.get(k).unwrap_or(&0.0) - m0.get(k).unwrap_or(&0.0);
    Ok(Window {
        held: m1.get("downbeat_sessions_active").copied().unwrap_or(0.0),
        rss,
        cpu_seconds: cpu1 - cpu0,
        datagrams: delta("downbeat_datagrams_sent_total") + delta("downbeat_datagrams_received_total"),
        send_failed: delta("downbeat_datagrams_send_failed_total"),
        generator_cpu_seconds: g1 - g0,
        generator_rss,
        frames: f1.saturating_sub(f0),
        seconds,
        udp_drops: crate::machine::udp_receive_buffer_drops().saturating_sub(drops0),
        server_cpus: crate::machine::cpus_allowed(Some(server.pid())),
        generator_cpus: crate::machine::cpus_allowed(None),
        server_udp_drops: server_drops1.saturating_sub(server_drops0),
        own_udp_drops: own_drops1.saturating_sub(own_drops0),
    })
}

/// How a capacity point's join phase went, whichever clients joined.
struct JoinPhase {
    students: usize,
    rooms: usize,
    /// Rooms created (their teachers' sessions).
    rooms_up: usize,
    joined: usize,
    errors: Vec<String>,
    deadline_passed: bool,
    all_joined_ms: f64,
}

impl CapacityPoint {
    /// A point with its join phase filled in: `join_cpu` is the server's CPU seconds over it,
    /// `join_drops` the UDP receive-buffer drops.
    fn joined(phase: JoinPhase, join_cpu: f64, join_drops: u64) -> Self {
        let up = phase.joined + phase.rooms_up;
        let join_seconds = phase.all_joined_ms / 1e3;
        Self {
            sessions: phase.students,
            rooms: phase.rooms,
            joined: phase.joined,
            join_errors: phase.errors,
            deadline_passed: phase.deadline_passed,
            join_seconds,
            joins_per_s: up as f64 / join_seconds.max(1e-9),
            server_join_cpu_ms_per_session: join_cpu * 1e3 / (up.max(1) as f64),
            udp_receive_drops: (join_drops, 0),
            ..Self::default()
        }
    }

    fn with_window(mut self, w: &Window, baseline: u64) -> Self {
        let seconds = w.seconds.max(1e-9);
        self.held = w.held;
        self.server_rss_bytes = w.rss;
        self.rss_per_session_kib = (w.rss as f64 - baseline as f64) / w.held.max(1.0) / 1024.0;
        self.server_cpu_percent = w.cpu_seconds / seconds * 100.0;
        self.datagrams_per_s = w.datagrams / seconds;
        self.cpu_ms_per_1000_datagrams = if w.datagrams > 0.0 { w.cpu_seconds * 1e6 / w.datagrams } else { 0.0 };
        self.datagrams_send_failed = w.send_failed;
        self.generator_cpu_percent = w.generator_cpu_seconds / seconds * 100.0;
        self.generator_rss_bytes = w.generator_rss;
        self.window_seconds = w.seconds;
        self.udp_receive_drops.1 = w.udp_drops;
        self.server_cpus.clone_from(&w.server_cpus);
        self.generator_cpus.clone_from(&w.generator_cpus);
        self.server_udp_drops = Some(w.server_udp_drops);
        self
    }
}

/// One point with the light generator on a fresh server.
fn light_point(
    common: &Common,
    sessions: usize,
    plan: &CapacityPlan,
    baseline: u64,
) -> Result<(CapacityPoint, serde_json::Value)> {
    let (server, spec) = light_server(common, &capacity_workload(sessions))?;
    let spec = LightSpec {
        join_rate: plan.join_rate,
        concurrency: plan.join_concurrency,
        threads: plan.light_threads,
        ..spec
    };
    let meter = ProcessMeter::new(server.pid());
    let me = ProcessMeter::new(std::process::id());
    let cpu0 = meter.cpu_seconds()?;
    let drops0 = crate::machine::udp_receive_buffer_drops();
    let generator = Generator::start(spec)?;
    let join_cpu = meter.cpu_seconds()? - cpu0;
    let join_drops = crate::machine::udp_receive_buffer_drops().saturating_sub(drops0);
    let joined = generator.joined().clone();
    // The counters at the window's start and end.
    let mut ends = Vec::with_capacity(2);
    let window = measure_window(&server, plan, || crate::machine::self_rss_bytes().unwrap_or(0), &mut || {
        let counts = generator.counts();
        ends.push(counts);
        Ok((me.cpu_seconds()?, counts.frames))
    })?;
    let at_end = generator.counts();
    let counts = generator.stop();
    let (requests_in_window, in_window) = match ends[..] {
        [start, end] => {
            let requests = end.sync_requests - start.sync_requests;
            let in_window = json!({
                "sync_requests": requests,
                "sync_replies": end.sync_replies - start.sync_replies,
                "sync_round_trips": std::array::from_fn::<u64, SYNC_ROUND_TRIP_BUCKETS, _>(|i| {
                    end.sync_round_trips[i] - start.sync_round_trips[i]
                }),
                "sync_round_trip_bounds_ms": SYNC_ROUND_TRIP_BOUNDS_MS,
            });
            (Some(requests), in_window)
        }
        _ => (None, serde_json::Value::Null),
    };
    let point = CapacityPoint {
        frames_received_per_s: Some(window.frames as f64 / window.seconds.max(1e-9)),
        frames_received: Some(at_end.frames),
        synced: Some(at_end.synced),
        lost: Some(at_end.lost),
        sync_requests_per_session_s: requests_in_window
            .map(|requests| requests as f64 / window.held.max(1.0) / window.seconds.max(1e-9)),
        generator_udp_drops: Some(window.own_udp_drops),
        ..CapacityPoint::joined(
            JoinPhase {
                students: joined.students,
                rooms: joined.rooms,
                rooms_up: joined.rooms_created,
                joined: joined.joined,
                errors: joined.join_errors.clone(),
                deadline_passed: joined.deadline_passed,
                all_joined_ms: joined.all_joined_ms,
            },
            join_cpu,
            join_drops,
        )
    }
    .with_window(&window, baseline);
    let extra = json!({
        "join": joined,
        "counts": counts,
        "window": in_window,
        "url": server.url(IpAddr::V4(Ipv4Addr::LOCALHOST)),
    });
    Ok((point, extra))
}

/// A fresh server on loopback sized for `workload`, and the light generator's spec for its
/// rooms (a token for everyone in them, the workload's tempo, `common`'s join deadline; the
/// generator's defaults otherwise).
fn light_server(common: &Common, workload: &Workload) -> Result<(ServerProcess, LightSpec)> {
    ensure!(
        common.profile == "loopback",
        "light clients run on loopback only (their sessions share sockets, which the emulator cannot tell apart): \
         use native clients on {}",
        common.profile
    );
    let localhost = IpAddr::V4(Ipv4Addr::LOCALHOST);
    let server = ServerProcess::start(
        ServerLimits {
            sessions: (workload.people() + 100).max(ServerLimits::default().sessions),
            rooms: (workload.rooms + 10).max(ServerLimits::default().rooms),
        },
        localhost,
    )?;
    let mut rooms = Vec::with_capacity(workload.rooms);
    for r in 0..workload.rooms {
        let student_tokens = (0..workload.students)
            .map(|s| server.token(Role::Student, &format!("s-{r}-{s}")))
            .collect::<Result<Vec<_>>>()?;
        rooms.push(LightRoom { teacher_token: server.token(Role::Teacher, &format!("t-{r}"))?, student_tokens });
    }
    let hashes = crate::downbeat::class::decode_hashes(server.cert_hashes())?;
    let spec =
        LightSpec { bpm: workload.bpm, ..LightSpec::new(server.url(localhost), hashes, rooms, common.join_deadline) };
    Ok((server, spec))
}

/// Note fan-out with light clients (Downbeat over WebTransport, loopback): `workload.rooms`
/// rooms of a teacher and `workload.students` students, every student playing
/// `workload.notes_per_second` notes once its clock is synced; after `settle_seconds`, for
/// `workload.seconds`, every classmate's first datagram carrying a note is timed from the
/// note's send (one process, one clock: no clock error in the figure), with the server's CPU
/// and the generator's apart. The class helper's native clients cost the machine more than
/// the server does past a few hundred; these let the server's own fan-out be measured at
/// 20 and 40 rooms.
pub fn light_fanout(common: &Common, workload: &Workload, settle_seconds: f64) -> Result<RunReport> {
    let mut parameters = workload.json();
    parameters["clients"] = json!("light");
    parameters["settle_seconds"] = json!(settle_seconds);
    let mut report = report(common, "fanout", "Note fan-out: a child's note reaching the class", parameters);
    let began = Instant::now();
    let steal = StealMeter::start();
    let (server, spec) = light_server(common, workload)?;
    let spec = LightSpec { notes_per_second: workload.notes_per_second, ..spec };
    let generator = Generator::start(spec)?;
    let joined = generator.joined().clone();
    std::thread::sleep(Duration::from_secs_f64(settle_seconds.max(0.0)));
    let (meter, me) = (ProcessMeter::new(server.pid()), ProcessMeter::new(std::process::id()));
    let _ = generator.take_fanout();
    let (cpu0, own0, t0) = (meter.cpu_seconds()?, me.cpu_seconds()?, Instant::now());
    std::thread::sleep(Duration::from_secs_f64(workload.seconds));
    let fan = generator.take_fanout();
    let (cpu1, own1, seconds) = (meter.cpu_seconds()?, me.cpu_seconds()?, t0.elapsed().as_secs_f64());
    let counts = generator.stop();
    let latency_ms: Vec<f64> = fan.latency_ns.iter().map(|&ns| ns as f64 / 1e6).collect();
    let summary = Summary::of(&latency_ms);
    // A note reaches the room's other students and its teacher.
    let expected = fan.played * workload.students;
    let untimed = expected.saturating_sub(latency_ms.len());
    eprintln!(
        "fanout (light clients, {} rooms): {} notes, p50/p99/p99.9 {:.2}/{:.2}/{:.2} ms, server {:.0} % CPU",
        workload.rooms,
        fan.played,
        summary.p50,
        summary.p99,
        summary.p999,
        (cpu1 - cpu0) / seconds * 100.0
    );
    let metrics = vec![
        Metric::lower("fanout_p50_ms", "note fan-out latency p50", "ms", summary.p50),
        Metric::lower("fanout_p99_ms", "note fan-out latency p99", "ms", summary.p99),
        Metric::lower("fanout_p999_ms", "note fan-out latency p99.9", "ms", summary.p999),
        Metric::lower(
            "deliveries_untimed_percent",
            "deliveries not timed",
            "%",
            untimed as f64 * 100.0 / expected.max(1) as f64,
        )
        .with_note("the classmate's first datagram of the note was lost (a later one repeats it) or did not come"),
        Metric::lower("server_cpu_percent", "server CPU", "% of a core", (cpu1 - cpu0) / seconds * 100.0)
            .with_note("the server process alone (/proc/<pid>), over the window"),
        Metric::lower("generator_cpu_percent", "clients' CPU", "% of a core", (own1 - own0) / seconds * 100.0)
            .with_note("the light generator's process (/proc/self), over the window"),
        Metric::lower("join_failures", "joins failed", "", (joined.students - joined.joined) as f64),
    ];
    report.systems.push(SystemResult {
        system: System::DOWNBEAT.name().into(),
        display: format!("{} · light clients", System::DOWNBEAT.display()),
        metrics,
        distributions: [("fanout_ms".to_owned(), latency_ms)].into_iter().collect(),
        extra: json!({"join": joined, "counts": counts, "notes_played": fan.played, "deliveries_expected": expected}),
    });
    report.wall_seconds = began.elapsed().as_secs_f64();
    report.machine.steal_percent = steal.percent();
    Ok(report)
}

/// What a handshake run asks for.
#[derive(Clone, Copy, Debug)]
pub struct HandshakePlan {
    /// Students who join and leave (rooms of 30, whose teachers stay).
    pub sessions: usize,
    /// Handshakes (connect to welcome) in flight at most.
    pub concurrency: usize,
    /// The generator's worker threads.
    pub threads: usize,
}

/// Handshakes, the server's side apart (Downbeat over WebTransport, light clients, loopback):
/// every room's teacher joins and stays, then `plan.sessions` students connect, say hello,
/// are welcomed and close their session at once, as fast as `plan.concurrency` handshakes in
/// flight allow. Nothing is held but the teachers, so the server's CPU over the run is the
/// handshakes' (QUIC and TLS, the HTTP/3 session, hello, token and admission, the welcome,
/// the leave) and not the held sessions' clock sync and beats that a join storm also pays.
pub fn handshakes(common: &Common, plan: HandshakePlan) -> Result<RunReport> {
    let workload = capacity_workload(plan.sessions);
    let mut parameters = workload.json();
    parameters["sessions"] = json!(plan.sessions);
    parameters["concurrency"] = json!(plan.concurrency);
    parameters["light_threads"] = json!(plan.threads);
    let mut report =
        report(common, "handshakes", "Handshakes: sessions joining and leaving, the server's side apart", parameters);
    let began = Instant::now();
    let steal = StealMeter::start();
    let (server, spec) = light_server(common, &workload)?;
    let spec = LightSpec {
        join_rate: 0.0,
        concurrency: plan.concurrency,
        threads: plan.threads,
        leave_after_welcome: true,
        ..spec
    };
    let (meter, me) = (ProcessMeter::new(server.pid()), ProcessMeter::new(std::process::id()));
    let (cpu0, own0, m0) = (meter.cpu_seconds()?, me.cpu_seconds()?, server.metrics()?);
    let generator = Generator::start(spec)?;
    let (cpu1, own1, m1) = (meter.cpu_seconds()?, me.cpu_seconds()?, server.metrics()?);
    let joined = generator.joined().clone();
    let counts = generator.stop();
    let delta = |k: &str| m1.get(k).unwrap_or(&0.0) - m0.get(k).unwrap_or(&0.0);
    let up = joined.joined + joined.rooms_created;
    let seconds = (joined.all_joined_ms / 1e3).max(1e-9);
    let per = |cpu: f64| cpu * 1e3 / up.max(1) as f64;
    let server_ms = per(cpu1 - cpu0);
    eprintln!(
        "handshakes: {up} sessions up in {seconds:.1} s ({:.0}/s), server {server_ms:.3} ms CPU each, generator {:.3} ms",
        up as f64 / seconds,
        per(own1 - own0)
    );
    let metrics = vec![
        Metric::higher("handshakes_per_s", "handshakes per second", "/s", up as f64 / seconds).with_note(
            "sessions welcomed (teachers and students) over the run, server and generator on the same cores",
        ),
        Metric::lower("server_cpu_ms_per_handshake", "server CPU per handshake", "ms", server_ms)
            .with_note("the server process alone (/proc/<pid>) over the run, per session welcomed"),
        Metric::higher(
            "server_handshakes_per_core_s",
            "handshakes a core of the server takes per second",
            "/s",
            1e3 / server_ms.max(1e-9),
        )
        .with_note("1 s divided by the server's CPU per handshake"),
        Metric::lower("server_cpu_percent", "server CPU over the run", "% of a core", (cpu1 - cpu0) / seconds * 100.0),
        Metric::lower("generator_cpu_ms_per_handshake", "clients' CPU per handshake", "ms", per(own1 - own0))
            .with_note("the light generator's process (/proc/self)"),
        Metric::lower("welcome_p50_ms", "connect to welcome p50", "ms", joined.welcome_ms.p50),
        Metric::lower("welcome_p99_ms", "connect to welcome p99", "ms", joined.welcome_ms.p99),
        Metric::lower("join_failures", "sessions not welcomed", "", (joined.students - joined.joined) as f64),
        Metric::lower(
            "quic_retries",
            "handshakes asked to retry (address validation)",
            "",
            delta("downbeat_handshakes_retried_total"),
        ),
    ];
    report.systems.push(SystemResult {
        system: System::DOWNBEAT.name().into(),
        display: format!("{} · light clients", System::DOWNBEAT.display()),
        metrics,
        distributions: Default::default(),
        extra: json!({"join": joined, "counts": counts, "server_cpu_seconds": cpu1 - cpu0, "generator_cpu_seconds": own1 - own0}),
    });
    report.notes.push(format!(
        "{} rooms of {} students; each room's teacher joins first and stays (beats run to the teachers), then every student \
         connects, says hello, is welcomed and closes the session at once.",
        workload.rooms, workload.students
    ));
    report.wall_seconds = began.elapsed().as_secs_f64();
    report.machine.steal_percent = steal.percent();
    Ok(report)
}

/// One point with native clients (the class helper) on a fresh server.
fn native_point(
    common: &Common,
    transport: Transport,
    sessions: usize,
    plan: &CapacityPlan,
    baseline: u64,
) -> Result<(CapacityPoint, serde_json::Value)> {
    let workload = capacity_workload(sessions);
    let mut measured = None;
    let mut join_cpu = 0.0;
    let drops0 = crate::machine::udp_receive_buffer_drops();
    let mut join_drops = 0;
    let mut hold = |server: &ServerProcess, _held: usize| -> Result<()> {
        // The server's CPU from its start to here: its share of the join phase.
        join_cpu = ProcessMeter::new(server.pid()).cpu_seconds()?;
        join_drops = crate::machine::udp_receive_buffer_drops().saturating_sub(drops0);
        let helpers: Vec<ProcessMeter> = crate::machine::child_pids()
            .into_iter()
            .filter(|&pid| pid != server.pid())
            .map(ProcessMeter::new)
            .collect();
        let helper_cpu = |helpers: &[ProcessMeter]| helpers.iter().filter_map(|m| m.cpu_seconds().ok()).sum::<f64>();
        let helper_rss = || helpers.iter().filter_map(|m| m.rss_bytes().ok()).sum::<u64>();
        measured = Some(measure_window(server, plan, helper_rss, &mut || Ok((helper_cpu(&helpers), 0)))?);
        Ok(())
    };
    let (output, extra) = run_downbeat(common, transport, &workload, Some(&mut hold))?;
    let window = measured.unwrap_or_default();
    let point = CapacityPoint::joined(
        JoinPhase {
            students: output.students,
            rooms: workload.rooms,
            rooms_up: workload.rooms,
            joined: output.joined,
            errors: output.join_errors.clone(),
            deadline_passed: output.join_errors.iter().any(|e| e.contains("join deadline")),
            all_joined_ms: output.all_joined_ms,
        },
        join_cpu,
        join_drops,
    )
    .with_window(&window, baseline);
    Ok((point, with_class_extra(extra, &output)))
}

/// The capacity report's curve as a markdown table (every point of every column), or
/// nothing when no column has more than one point.
pub fn capacity_curve_markdown(report: &RunReport) -> String {
    let columns = capacity_columns(report);
    if columns.iter().all(|(_, points)| points.len() < 2) {
        return String::new();
    }
    let mut out = String::from(
        "\n\n| clients | students asked | sessions held | server CPU (% of a core) | server RSS (MiB) | \
         memory per session (KiB) | server CPU per 1,000 datagrams (ms) | datagrams/s | per session/s | clients' CPU \
         (% of a core) | sessions up/s | join errors | UDP receive drops (join, window) |\n\
         |:--|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|\n",
    );
    for (name, points) in &columns {
        for p in points {
            out.push_str(&format!(
                "| {name} | {} | {:.0} | {:.0} | {:.0} | {:.1} | {:.2} | {:.0} | {:.2} | {:.0} | {:.0} | {} | {}, {} |\n",
                p.sessions,
                p.held,
                p.server_cpu_percent,
                p.server_rss_bytes as f64 / (1 << 20) as f64,
                p.rss_per_session_kib,
                p.cpu_ms_per_1000_datagrams,
                p.datagrams_per_s,
                p.datagrams_per_s / p.held.max(1.0),
                p.generator_cpu_percent,
                p.joins_per_s,
                p.sessions.saturating_sub(p.joined),
                p.udp_receive_drops.0,
                p.udp_receive_drops.1,
            ));
        }
    }
    out
}

/// Plots the capacity curve (CPU and RSS against sessions held) when some column has more
/// than one point; returns the PNGs written.
pub fn plot_capacity(report: &RunReport, dir: &Path) -> Result<Vec<PathBuf>> {
    let columns = capacity_columns(report);
    if columns.iter().all(|(_, points)| points.len() < 2) {
        return Ok(Vec::new());
    }
    let mut cpu = Vec::new();
    let mut rss = Vec::new();
    for (name, points) in &columns {
        cpu.push((format!("server · {name}"), points.iter().map(|p| (p.held, p.server_cpu_percent)).collect()));
        cpu.push((format!("clients · {name}"), points.iter().map(|p| (p.held, p.generator_cpu_percent)).collect()));
        rss.push((
            name.clone(),
            points.iter().map(|p| (p.held, p.server_rss_bytes as f64 / (1 << 20) as f64)).collect(),
        ));
    }
    let mut written = Vec::new();
    let axes = ("sessions held", "% of one core");
    written.extend(crate::report::plot_xy(report, "cpu", "CPU against sessions held", axes, &cpu, dir)?);
    let axes = ("sessions held", "server RSS (MiB)");
    written.extend(crate::report::plot_xy(report, "rss", "Server memory against sessions held", axes, &rss, dir)?);
    Ok(written)
}

/// Every capacity column's display name and points.
fn capacity_columns(report: &RunReport) -> Vec<(String, Vec<CapacityPoint>)> {
    report
        .systems
        .iter()
        .filter_map(|s| {
            let points: Vec<CapacityPoint> = serde_json::from_value(s.extra.get("points")?.clone()).ok()?;
            Some((s.display.clone(), points))
        })
        .collect()
}
