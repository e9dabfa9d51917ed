//! `downbeat-bench`: figures from classrooms, simulated and on real sockets.
//!
//! - `sync`, `onset`, `fanout`, `join`, `capacity`: socket scenarios. Each runs Downbeat (the
//!   real server binary, native clients with injected clocks) over WebTransport and over
//!   WebSocket, and the peers in `bench/peers/`, on the same workload, over the kernel's
//!   loopback or the packet emulator, and prints a table with the ratios; JSON and PNG CDFs go
//!   to `--out`. `all` runs the scenarios (`--scenarios`) on loopback and classroom-wifi
//!   (`--smoke`: seconds, what CI runs); `report` renders a directory of runs again. See
//!   `downbeat_bench::scenarios`.
//! - `sim`: the engine (room, clock-sync estimator, client state machine, codec) on the
//!   engine's virtual network, so its figures are those of the algorithms, free of this
//!   machine's scheduling noise.
//! - `netem`: brings up the packet-level network emulator (`downbeat_bench::netem`) with a
//!   profile, and either runs its self-check or holds it for manual use until Ctrl-C.

#![cfg_attr(not(test), warn(clippy::unwrap_used))]

use std::time::Instant;

use anyhow::{Context, Result, bail, ensure};
use clap::{Parser, Subcommand};
use downbeat_bench::metrics::RunReport;
use downbeat_bench::netem::{self, Emulator, EmulatorConfig};
use downbeat_bench::{abuse, cluster, report, scenarios};
use downbeat_engine::sim::{ClockModel, MS, Profile, Rng, SEC, Sim};
use downbeat_engine::{clock, room};
use downbeat_protocol::{Change, MicroBpm, ServerNanos};

/// Every system, in table order: Downbeat over each transport, then the peers.
const DEFAULT_SYSTEMS: &str = "downbeat,downbeat-websocket,socketio,ws,timesync";

/// The socket scenarios `all` runs, in order.
const SCENARIOS: &[&str] = &["sync", "onset", "fanout", "join", "capacity"];

#[derive(Parser, Debug)]
#[command(version, about = "Downbeat benchmark harness")]
struct Cli {
    #[command(subcommand)]
    scenario: Scenario,
}

/// Options every socket scenario takes.
#[derive(clap::Args, Debug, Clone)]
struct CommonArgs {
    /// Network: `loopback` (the kernel's loopback device, no emulator) or an emulator profile:
    /// lan, classroom-wifi or congested (needs root).
    #[arg(long, default_value = "loopback")]
    profile: String,
    /// Systems to run, in order, comma-separated: downbeat (over WebTransport),
    /// downbeat-websocket, socketio, ws, timesync. Ratios compare each with the first.
    #[arg(long, default_value = DEFAULT_SYSTEMS, value_delimiter = ',')]
    systems: Vec<String>,
    /// Seed for the emulator and the injected clocks.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Emulator id (0-255); emulators running at once need different ids.
    #[arg(long, default_value_t = 40)]
    netem_id: u8,
    /// Where the JSON and PNG files go.
    #[arg(long, default_value = "bench/results")]
    out: std::path::PathBuf,
    /// Seconds Downbeat's students may take to join; past it, those still joining are given
    /// up (counted as join errors) and the run goes on with the sessions that are up, so a
    /// saturated `capacity` run ends by itself with the figures it has.
    #[arg(long, default_value_t = 600.0)]
    join_deadline_seconds: f64,
}

/// A classroom workload's shape.
#[derive(clap::Args, Debug, Clone)]
struct WorkloadArgs {
    /// Rooms at once (the peers run one room of the same size).
    #[arg(long, default_value_t = 1)]
    rooms: usize,
    /// Students per room.
    #[arg(long, default_value_t = 30)]
    students: usize,
    /// Seconds the beat runs.
    #[arg(long, default_value_t = 30.0)]
    seconds: f64,
    /// Tempo in BPM.
    #[arg(long, default_value_t = 120)]
    bpm: u32,
}

#[derive(Subcommand, Debug)]
enum Scenario {
    /// Clock sync: each simulated student has an injected clock offset (+-500 ms) and drift
    /// (+-100 ppm); its estimate of server time is compared with the truth every 100 ms.
    /// Reports the error p50/p99 from 2 s after joining and the time until every client
    /// stays within 1 ms. The Socket.IO and WebSocket timer peers have no clock sync: their
    /// error is a beat's one-way delay. The timesync peer is measured as Downbeat is.
    Sync {
        #[command(flatten)]
        common: CommonArgs,
        #[command(flatten)]
        workload: WorkloadArgs,
    },
    /// Beat onset spread: the latest minus the earliest true instant at which the students
    /// sound the same beat, and beats scheduled late or never. Downbeat's students schedule
    /// 200 ms ahead on the shared timeline, and so do the timesync peer's on their synced
    /// clocks; the two other peers' play each beat on arrival.
    Onset {
        #[command(flatten)]
        common: CommonArgs,
        #[command(flatten)]
        workload: WorkloadArgs,
        /// A 1 s outage on every path this many seconds in (emulated profiles only).
        #[arg(long)]
        outage_at: Option<f64>,
    },
    /// Note fan-out: every student plays notes; latency from playing to each classmate's
    /// arrival (p50/p99/p99.9), deliveries lost, and the spread of the instants at which the
    /// classmates sound one note.
    Fanout {
        #[command(flatten)]
        common: CommonArgs,
        #[command(flatten)]
        workload: WorkloadArgs,
        /// Notes per student per second.
        #[arg(long, default_value_t = 2.0)]
        notes_per_second: f64,
        /// Clients: native (the product's client in the class helper, every system in
        /// --systems) or light (Downbeat over WebTransport only, many sessions per socket from
        /// this program; loopback).
        #[arg(long, default_value = "native")]
        clients: String,
        /// Light clients: seconds from the last session up to the window (their clocks sync
        /// meanwhile; a student plays no note before).
        #[arg(long, default_value_t = 10.0)]
        settle_seconds: f64,
    },
    /// A class joining at once (slowest join, p50), then a storm of sessions connecting at
    /// once for handshakes per second.
    Join {
        #[command(flatten)]
        common: CommonArgs,
        #[command(flatten)]
        workload: WorkloadArgs,
        /// Sessions in the storm (loopback; emulated profiles use one class).
        #[arg(long, default_value_t = 600)]
        storm: usize,
    },
    /// Capacity (Downbeat only, each transport in --systems; WebTransport when none): sessions
    /// held in rooms of 30 with beats flowing, server memory per session, server CPU per 1,000
    /// datagrams and the server's and the clients' CPU apart, over a steady window; at each
    /// size in --sessions (a curve, each point on a fresh server; PNG plots with two or more).
    /// A progress bar shows the join; --join-deadline-seconds ends a saturated one. To give
    /// the server processors of its own, name them in BENCH_SERVER_CPUS and keep this program
    /// off them: `BENCH_SERVER_CPUS=1 taskset -c 0 downbeat-bench capacity ...`.
    Capacity {
        #[command(flatten)]
        common: CommonArgs,
        /// Students to hold (rooms of 30, a teacher each), comma-separated for a curve:
        /// 1000,5000,10000.
        #[arg(long, default_value = "2000", value_delimiter = ',')]
        sessions: Vec<usize>,
        /// Seconds of the steady window measured.
        #[arg(long, default_value_t = 10.0)]
        hold_seconds: f64,
        /// Seconds from the last session up to the window, for the clients' clock sync to
        /// settle (its first seconds ask 5 to 20 times faster than a settled class).
        #[arg(long, default_value_t = scenarios::SETTLE_SECONDS)]
        settle_seconds: f64,
        /// Clients, comma-separated, each a column: light (many idle sessions per socket from
        /// this program, sans-IO QUIC, one task per socket; WebTransport on loopback) or native (the product's
        /// client, one socket and several tasks per session, in the class helper).
        #[arg(long, default_value = "light", value_delimiter = ',')]
        clients: Vec<String>,
        /// Light clients: sessions started per second at most (0: as fast as
        /// --join-concurrency allows).
        #[arg(long, default_value_t = 200.0)]
        join_rate: f64,
        /// Light clients: handshakes (connect to welcome) in flight at most.
        #[arg(long, default_value_t = 32)]
        join_concurrency: usize,
        /// Light clients: the generator's worker threads.
        #[arg(long, default_value_t = 2)]
        light_threads: usize,
    },
    /// Handshakes, the server's side apart (Downbeat over WebTransport, light clients,
    /// loopback): students connect, say hello, are welcomed and leave at once, as fast as
    /// --concurrency handshakes in flight allow; the server's CPU per handshake apart from
    /// the clients'. Each room's teacher stays.
    Handshakes {
        #[command(flatten)]
        common: CommonArgs,
        /// Students who join and leave (rooms of 30).
        #[arg(long, default_value_t = 10_000)]
        sessions: usize,
        /// Handshakes (connect to welcome) in flight at most.
        #[arg(long, default_value_t = 64)]
        concurrency: usize,
        /// The generator's worker threads.
        #[arg(long, default_value_t = 1)]
        threads: usize,
    },
    /// A class of 30 playing while the server is attacked, phase by phase: quiet, 2,000 slow
    /// HTTP connections, 300 stalled QUIC handshakes, one student flooding notes and joins,
    /// storms of 10,000 connections, the database's disk full. Per phase: the class's beat
    /// onset spread against the quiet phase's, late beats, latecomers' joins, and whether
    /// every acknowledged reflection is stored. Loopback; needs root (a tmpfs for the disk).
    Abuse {
        #[command(flatten)]
        config: abuse::AbuseConfig,
        /// Where the JSON and markdown go.
        #[arg(long, default_value = "bench/results/abuse")]
        out: std::path::PathBuf,
        /// Seconds-long phases and small attacks: shows the harness works (what CI runs).
        #[arg(long)]
        smoke: bool,
    },
    /// Three nodes of a cluster on this machine (NATS, PostgreSQL, release builds), 60 rooms
    /// of 30 native clients spread over them; node 1 is killed with SIGKILL mid-song: when each
    /// member of its rooms is back, beats missed, the largest shift of a beat's true instant,
    /// joins refused meanwhile; and sessions per node with 1, 2 and 3 nodes. See
    /// `downbeat_bench::cluster`.
    Cluster {
        #[command(flatten)]
        config: cluster::ClusterConfig,
    },
    /// Runs the clients of the cluster scenario (internal).
    #[command(hide = true)]
    ClusterHelper {
        /// The helper spec (JSON).
        #[arg(long)]
        spec: std::path::PathBuf,
    },
    /// Runs one attack of the abuse scenario (internal).
    #[command(hide = true)]
    AttackHelper {
        /// The attack (JSON).
        #[arg(long)]
        spec: std::path::PathBuf,
    },
    /// The scenarios (every one unless --scenarios names some) on loopback and classroom-wifi
    /// (or --profiles), as BENCHMARKS.md reports them; with --smoke, each in seconds (what CI
    /// runs to keep the harness working).
    All {
        /// Where the JSON, PNG and markdown files go.
        #[arg(long, default_value = "bench/results")]
        out: std::path::PathBuf,
        /// Tiny workloads that only show the harness works.
        #[arg(long)]
        smoke: bool,
        /// Seed.
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Profiles to run.
        #[arg(long, default_value = "loopback,classroom-wifi", value_delimiter = ',')]
        profiles: Vec<String>,
        /// Systems to run (see `sync --help`).
        #[arg(long, default_value = DEFAULT_SYSTEMS, value_delimiter = ',')]
        systems: Vec<String>,
        /// Scenarios to run, comma-separated: sync, onset, fanout, join, capacity (capacity on
        /// loopback only, Downbeat over WebTransport).
        #[arg(long, default_value = "sync,onset,fanout,join,capacity", value_delimiter = ',')]
        scenarios: Vec<String>,
    },
    /// Renders every run's JSON in a directory again (markdown tables and PNG plots) into
    /// its `results.md`, in the order of the scenarios.
    Report {
        /// The directory with the JSON files.
        dir: std::path::PathBuf,
    },
    /// Runs simulated students for a socket scenario (internal).
    #[command(hide = true)]
    ClassHelper {
        /// The class spec (JSON).
        #[arg(long)]
        spec: std::path::PathBuf,
    },
    /// Clock sync and beat onset spread of N simulated clients in one room.
    Sim {
        /// Network profile: loopback, lan, classroom-wifi or congested.
        #[arg(long, default_value = "classroom-wifi")]
        profile: String,
        /// Clients in the room.
        #[arg(long, default_value_t = 30)]
        clients: usize,
        /// Simulated seconds.
        #[arg(long, default_value_t = 120)]
        seconds: u64,
        /// Tempo in BPM.
        #[arg(long, default_value_t = 120)]
        bpm: u32,
        /// Seed (a run repeats exactly).
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Add one 1 s outage on every client's path at this second.
        #[arg(long)]
        outage_at: Option<u64>,
        /// Change the tempo (+10 %) at this many seconds: with --outage-at, a change whose
        /// frames must get through the outage (the simulation carries datagrams only, no
        /// control stream).
        #[arg(long)]
        change_at: Option<f64>,
        /// The room's beat frame interval once settled (no change, no note for a lead), ms;
        /// 100 sends a frame every 100 ms throughout, as before the steady pace.
        #[arg(long, default_value_t = room::Config::default().steady_send_interval_nanos / 1_000_000)]
        steady_send_interval_ms: u64,
        /// The clients' clock-sync interval once settled, ms (the estimator's steady pace).
        #[arg(long, default_value_t = clock::Config::default().steady_interval_nanos / 1_000_000)]
        sync_steady_interval_ms: u64,
        /// Write the figures as JSON here too.
        #[arg(long)]
        json: Option<std::path::PathBuf>,
    },
    /// Packet-level network emulator: a namespace for clients, TUN devices and an impaired
    /// path per client and direction, for real UDP (QUIC) and TCP traffic.
    ///
    /// Needs root, /dev/net/tun and `ip` (iproute2). Clients run inside the namespace
    /// (`ip netns exec dbnet-<id> ...`) and bind to their own address (10.77.<id>.<i+1>);
    /// servers listen in the root namespace on 10.78.<id>.1 (or 0.0.0.0). Without --check it
    /// prints the addresses and holds the network until Ctrl-C, then prints the counters.
    Netem {
        /// Network profile: loopback, lan, classroom-wifi or congested.
        #[arg(long, default_value = "classroom-wifi")]
        profile: String,
        /// Simulated clients (one address and one path each way per client).
        #[arg(long, default_value_t = 10)]
        clients: usize,
        /// Emulator id (0-255): names and addresses derive from it; emulators running at once
        /// need different ids.
        #[arg(long, default_value_t = 1)]
        id: u8,
        /// Seed (the same seed and the same packets give the same losses and delays).
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Add a 1 s outage on every client's paths this many seconds after start.
        #[arg(long)]
        outage_at: Option<f64>,
        /// Microseconds the timer spins before a release instead of sleeping (accuracy vs CPU).
        #[arg(long, default_value_t = 100)]
        spin_us: u64,
        /// Keep the emulator's threads on the normal scheduler (default: SCHED_FIFO priority
        /// 10 via `chrt`, so a busy machine delays releases less).
        #[arg(long)]
        no_realtime: bool,
        /// Run the self-check (UDP echoes from every client, measured against the model) and
        /// exit.
        #[arg(long)]
        check: bool,
        /// Self-check: probes per client.
        #[arg(long, default_value_t = 1_000)]
        count: u32,
        /// Self-check: milliseconds between rounds of probes (one per client).
        #[arg(long, default_value_t = 10.0)]
        interval_ms: f64,
        /// Write the self-check's figures (or, when holding, the final counters) as JSON here.
        #[arg(long)]
        json: Option<std::path::PathBuf>,
    },
    /// Programs the emulator runs inside the clients' namespace (internal).
    #[command(hide = true)]
    NetemHelper {
        #[command(subcommand)]
        mode: netem::helper::HelperMode,
    },
}

fn profile(name: &str, power_save: bool) -> Result<Profile> {
    Ok(match name {
        "loopback" => Profile::loopback(),
        "lan" => Profile::lan(),
        "classroom-wifi" => Profile::classroom_wifi(power_save),
        "congested" => Profile::congested(power_save),
        other => bail!("unknown profile {other:?}: use loopback, lan, classroom-wifi or congested"),
    })
}

fn quantile(sorted: &[u64], q: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    sorted[((sorted.len() - 1) as f64 * q).round() as usize]
}

fn main() -> Result<()> {
    match Cli::parse().scenario {
        Scenario::Sim {
            profile,
            clients,
            seconds,
            bpm,
            seed,
            outage_at,
            change_at,
            steady_send_interval_ms,
            sync_steady_interval_ms,
            json,
        } => {
            let paces = (steady_send_interval_ms, sync_steady_interval_ms);
            sim_scenario(profile, clients, seconds, bpm, seed, (outage_at, change_at, paces), json)
        }
        Scenario::Netem {
            profile,
            clients,
            id,
            seed,
            outage_at,
            spin_us,
            no_realtime,
            check,
            count,
            interval_ms,
            json,
        } => {
            let Some(mut p) = netem::Profile::by_name(&profile) else {
                bail!("unknown profile {profile:?}: use {}", netem::PROFILE_NAMES.join(", "))
            };
            if let Some(at) = outage_at {
                let from = (at * SEC as f64) as u64;
                p = p.with_outage_at(from, from + SEC);
            }
            let config = EmulatorConfig {
                seed,
                spin: std::time::Duration::from_micros(spin_us),
                realtime_priority: if no_realtime { None } else { Some(10) },
                ..EmulatorConfig::new(id, clients, p)
            };
            let check = check.then(|| netem::check::CheckConfig {
                count,
                interval_us: (interval_ms * 1e3) as u64,
                ..netem::check::CheckConfig::default()
            });
            netem_scenario(config, check, json)
        }
        Scenario::NetemHelper { mode } => netem::helper::run(mode),
        Scenario::ClassHelper { spec } => downbeat_bench::downbeat::class::run_helper(&spec),
        Scenario::AttackHelper { spec } => downbeat_bench::abuse::attack::run_helper(&spec),
        Scenario::ClusterHelper { spec } => cluster::helper::run_helper(&spec),
        Scenario::Cluster { mut config } => {
            config.bench_binary = bench_binary()?;
            config.command = command_line();
            cluster::main(config)
        }
        Scenario::Abuse { mut config, out, smoke } => {
            config.bench_binary = bench_binary()?;
            config.command = command_line();
            if smoke {
                config = abuse::AbuseConfig {
                    phase_seconds: 4.0,
                    gap_seconds: 1.0,
                    students: 5,
                    slow_http: 100,
                    stalled_quic: 40,
                    storm: 500,
                    flood_notes_per_second: 200,
                    latecomers: 1,
                    disk_mib: 16,
                    ..config
                };
            }
            let report = abuse::run(&config)?;
            let markdown = publish_to(&out, &report, &[])?;
            std::fs::write(out.join("results.md"), &markdown)?;
            println!("{markdown}");
            if smoke {
                abuse::smoke_check(&report)?;
            }
            Ok(())
        }
        Scenario::Sync { common, workload } => {
            let common = common.resolve()?;
            publish(&common, &scenarios::sync(&common, &workload.with(0.0, None))?, &[])
        }
        Scenario::Onset { common, workload, outage_at } => {
            let common = common.resolve()?;
            publish(&common, &scenarios::onset(&common, &workload.with(0.0, outage_at))?, ONSET_PLOTS)
        }
        Scenario::Fanout { common, workload, notes_per_second, clients, settle_seconds } => {
            let common = common.resolve()?;
            let workload = workload.with(notes_per_second, None);
            let report = match scenarios::Clients::parse(&clients)? {
                scenarios::Clients::Native => scenarios::fanout(&common, &workload)?,
                scenarios::Clients::Light => scenarios::light_fanout(&common, &workload, settle_seconds)?,
            };
            publish(&common, &report, FANOUT_PLOTS)
        }
        Scenario::Join { common, workload, storm } => {
            let common = common.resolve()?;
            publish(&common, &scenarios::join(&common, &workload.with(0.0, None), storm)?, &[])
        }
        Scenario::Capacity {
            common,
            sessions,
            hold_seconds,
            settle_seconds,
            clients,
            join_rate,
            join_concurrency,
            light_threads,
        } => {
            let common = common.resolve()?;
            let plan = scenarios::CapacityPlan {
                sessions,
                hold_seconds,
                settle_seconds,
                clients: clients.iter().map(|c| scenarios::Clients::parse(c)).collect::<Result<_>>()?,
                join_rate,
                join_concurrency,
                light_threads,
            };
            publish(&common, &scenarios::capacity(&common, &plan)?, &[])
        }
        Scenario::Handshakes { common, sessions, concurrency, threads } => {
            let common = common.resolve()?;
            publish(
                &common,
                &scenarios::handshakes(&common, scenarios::HandshakePlan { sessions, concurrency, threads })?,
                &[],
            )
        }
        Scenario::All { out, smoke, seed, profiles, systems, scenarios } => {
            all(&out, smoke, seed, &profiles, &systems, &scenarios)
        }
        Scenario::Report { dir } => rerender(&dir),
    }
}

/// The CDFs the onset and fan-out reports draw: (distribution key, title, unit).
const ONSET_PLOTS: &[(&str, &str, &str)] = &[("onset_spread_ms", "Beat onset spread across the class", "ms")];
const FANOUT_PLOTS: &[(&str, &str, &str)] = &[("fanout_ms", "Note fan-out latency", "ms")];

impl CommonArgs {
    fn resolve(self) -> Result<scenarios::Common> {
        let systems = self.systems.iter().map(|s| scenarios::System::parse(s)).collect::<Result<Vec<_>>>()?;
        Ok(scenarios::Common {
            profile: self.profile,
            systems,
            seed: self.seed,
            netem_id: self.netem_id,
            out: self.out,
            command: command_line(),
            bench_binary: bench_binary()?,
            join_deadline: std::time::Duration::try_from_secs_f64(self.join_deadline_seconds)
                .context("--join-deadline-seconds must be a positive number of seconds")?,
        })
    }
}

/// This program: it runs Downbeat's students (`class-helper`).
fn bench_binary() -> Result<std::path::PathBuf> {
    std::env::current_exe().context("finding this program to run the class helper")
}

impl WorkloadArgs {
    fn with(&self, notes_per_second: f64, outage_at: Option<f64>) -> scenarios::Workload {
        scenarios::Workload {
            rooms: self.rooms,
            students: self.students,
            seconds: self.seconds,
            bpm: self.bpm,
            notes_per_second,
            outage_at,
        }
    }
}

fn command_line() -> String {
    let args: Vec<String> = std::env::args().skip(1).collect();
    format!("downbeat-bench {}", args.join(" "))
}

/// Prints the report's table, writes its JSON and plots; returns the markdown.
fn publish(common: &scenarios::Common, report: &RunReport, plots: &[(&str, &str, &str)]) -> Result<()> {
    publish_to(&common.out, report, plots).map(|markdown| println!("{markdown}"))
}

/// What a smoke run must show: every system produced the scenario's core figures and nobody
/// failed to join. It checks that the harness works, never how fast anything is.
fn smoke_check(report: &RunReport) -> Result<()> {
    let core: &[&str] = match report.scenario.as_str() {
        "onset" => &["onset_spread_p50_ms"],
        "fanout" => &["fanout_p50_ms"],
        "join" => &["join_all_ms", "handshakes_per_s"],
        "handshakes" => &["handshakes_per_s", "server_cpu_ms_per_handshake"],
        "capacity" => &["sessions_held", "rss_per_session_kib", "cpu_ms_per_1000_datagrams"],
        // Two peers have no clock sync; their stand-in needs beats after the first 2 s.
        _ => &[],
    };
    for system in &report.systems {
        let synced = scenarios::System::parse(&system.system).is_ok_and(scenarios::System::syncs_clocks);
        for key in core.iter().chain((report.scenario == "sync" && synced).then_some(&"offset_error_p50_ms")) {
            let value = system.metrics.iter().find(|m| m.key == *key).and_then(|m| m.value);
            let Some(value) = value.filter(|v| v.is_finite()) else {
                bail!("smoke: {} {} has no {key}", report.scenario, system.display);
            };
            if *key == "sessions_held" && value < report.parameters["rooms"].as_f64().unwrap_or(0.0) {
                bail!("smoke: capacity held only {value} sessions");
            }
        }
        if report.scenario == "capacity" {
            let (students, joined) = (&system.extra["students"], &system.extra["joined"]);
            if students.as_u64().is_none_or(|n| joined.as_u64() != Some(n)) {
                bail!("smoke: capacity {}: {joined} of {students} students joined", system.display);
            }
        }
        if let Some(failures) = system.metrics.iter().find(|m| m.key == "join_failures").and_then(|m| m.value)
            && failures > 0.0
        {
            bail!("smoke: {failures} joins failed for {} in {}", system.display, report.scenario);
        }
    }
    Ok(())
}

fn publish_to(out: &std::path::Path, report: &RunReport, plots: &[(&str, &str, &str)]) -> Result<String> {
    let mut markdown = match report.scenario.as_str() {
        "abuse" => abuse::markdown(report),
        "cluster" => cluster::markdown(report),
        "capacity" => report::markdown(report) + &scenarios::capacity_curve_markdown(report),
        _ => report::markdown(report),
    };
    let json = report::write_json(report, out)?;
    markdown.push_str(&format!("\nJSON: `{}`", json.display()));
    if report.scenario == "capacity" {
        for png in scenarios::plot_capacity(report, out)? {
            let name = png.file_name().map_or_else(String::new, |f| f.to_string_lossy().into_owned());
            markdown.push_str(&format!("\n\n![{name}]({name})"));
        }
    }
    for (key, title, unit) in plots {
        if let Some(png) = report::plot_cdfs(report, key, title, unit, out)? {
            markdown.push_str(&format!(
                "\n\n![{title}]({})",
                png.file_name().map_or_else(String::new, |f| f.to_string_lossy().into_owned())
            ));
        }
    }
    Ok(markdown)
}

/// Renders the JSON files in `dir` into `dir/results.md`.
fn rerender(dir: &std::path::Path) -> Result<()> {
    let mut reports = Vec::new();
    for entry in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "json") {
            let report: RunReport = serde_json::from_slice(&std::fs::read(&path)?)
                .with_context(|| format!("{} is not a run report", path.display()))?;
            reports.push(report);
        }
    }
    let rank = |r: &RunReport| {
        let rooms = r.parameters.get("rooms").and_then(serde_json::Value::as_u64).unwrap_or(1);
        (r.profile != "loopback", SCENARIOS.iter().position(|s| *s == r.scenario).unwrap_or(SCENARIOS.len()), rooms)
    };
    reports.sort_by_key(rank);
    let mut sections = Vec::new();
    for report in &reports {
        let plots = match report.scenario.as_str() {
            "onset" => ONSET_PLOTS,
            "fanout" => FANOUT_PLOTS,
            _ => &[],
        };
        sections.push(publish_to(dir, report, plots)?);
    }
    sections.extend(fanout_curve(dir, &reports)?);
    let text = sections.join("\n\n");
    std::fs::write(dir.join("results.md"), &text)?;
    println!("{text}");
    Ok(())
}

/// Fan-out against rooms of 30, from the light-client fan-out runs in a directory (two or
/// more room counts): a table and a PNG of p50, p99 and p99.9 against rooms.
fn fanout_curve(dir: &std::path::Path, reports: &[RunReport]) -> Result<Option<String>> {
    let mut runs: Vec<&RunReport> = reports
        .iter()
        .filter(|r| r.scenario == "fanout" && r.parameters.get("clients").and_then(|c| c.as_str()) == Some("light"))
        .collect();
    runs.sort_by_key(|r| r.parameters["rooms"].as_u64().unwrap_or(0));
    let (Some(first), Some(last)) = (runs.first(), runs.last()) else { return Ok(None) };
    if first.parameters["rooms"] == last.parameters["rooms"] {
        return Ok(None);
    }
    let figure = |r: &RunReport, key: &str| {
        r.systems
            .first()
            .and_then(|s| s.metrics.iter().find(|m| m.key == key))
            .and_then(|m| m.value)
            .unwrap_or(f64::NAN)
    };
    let keys = [("p50", "fanout_p50_ms"), ("p99", "fanout_p99_ms"), ("p99.9", "fanout_p999_ms")];
    let mut text = String::from(
        "#### Note fan-out against rooms of 30 (light clients)\n\n\
         | rooms of 30 | fan-out p50 (ms) | p99 (ms) | p99.9 (ms) | server CPU (% of a core) | clients' CPU (% of a core) |\n\
         |--:|--:|--:|--:|--:|--:|\n",
    );
    for r in &runs {
        text.push_str(&format!(
            "| {} | {:.2} | {:.2} | {:.2} | {:.0} | {:.0} |\n",
            r.parameters["rooms"],
            figure(r, "fanout_p50_ms"),
            figure(r, "fanout_p99_ms"),
            figure(r, "fanout_p999_ms"),
            figure(r, "server_cpu_percent"),
            figure(r, "generator_cpu_percent"),
        ));
    }
    let series: Vec<report::XySeries> = keys
        .iter()
        .map(|(name, key)| {
            let points = runs.iter().map(|r| (r.parameters["rooms"].as_f64().unwrap_or(0.0), figure(r, key))).collect();
            ((*name).to_owned(), points)
        })
        .collect();
    let title = "Note fan-out against rooms of 30";
    if let Some(path) = report::plot_xy(last, "curve", title, ("rooms of 30", "ms"), &series, dir)? {
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        text.push_str(&format!("\n![{title}]({name})\n"));
    }
    Ok(Some(text))
}

/// The scenarios of `all` on each profile; writes `results.md` in `out` with all the tables.
fn all(
    out: &std::path::Path,
    smoke: bool,
    seed: u64,
    profiles: &[String],
    systems: &[String],
    chosen: &[String],
) -> Result<()> {
    let systems = systems.iter().map(|s| scenarios::System::parse(s)).collect::<Result<Vec<_>>>()?;
    for name in chosen {
        ensure!(SCENARIOS.contains(&name.as_str()), "unknown scenario {name:?}: use {}", SCENARIOS.join(", "));
    }
    let runs = |name: &str| chosen.iter().any(|c| c == name);
    let mut sections = Vec::new();
    let checked = |report: RunReport, plots: &[(&str, &str, &str)]| -> Result<String> {
        if smoke {
            smoke_check(&report)?;
        }
        publish_to(out, &report, plots)
    };
    let progress = report::Progress::new((profiles.len() * chosen.len()) as u64, "scenarios");
    for profile in profiles {
        let common = scenarios::Common {
            profile: profile.clone(),
            systems: systems.clone(),
            seed,
            netem_id: 40,
            out: out.to_path_buf(),
            command: command_line(),
            bench_binary: bench_binary()?,
            join_deadline: downbeat_bench::downbeat::class::default_join_deadline(),
        };
        let loopback = profile == "loopback";
        let class = |seconds: f64| scenarios::Workload {
            rooms: 1,
            students: if smoke { 4 } else { 30 },
            seconds: if smoke { 2.0 } else { seconds },
            bpm: 120,
            notes_per_second: 0.0,
            outage_at: None,
        };
        // Downbeat over WebTransport alone, for the runs only it makes (many rooms, capacity).
        let downbeat_only = scenarios::Common { systems: vec![scenarios::System::DOWNBEAT], ..common.clone() };
        if runs("sync") {
            progress.set_message(&format!("{profile}: sync"));
            sections.push(checked(scenarios::sync(&common, &class(20.0))?, &[])?);
            progress.inc(1);
        }
        if runs("onset") {
            progress.set_message(&format!("{profile}: onset"));
            let outage = (!loopback && !smoke).then_some(30.0);
            let onset = scenarios::Workload { outage_at: outage, ..class(60.0) };
            sections.push(checked(scenarios::onset(&common, &onset)?, ONSET_PLOTS)?);
            progress.inc(1);
        }
        if runs("fanout") {
            progress.set_message(&format!("{profile}: fanout"));
            // Side by side on one class (the peers' client drives one room), then Downbeat
            // alone on performance.md's 20 rooms of 30.
            let fan = scenarios::Workload { notes_per_second: 2.0, ..class(30.0) };
            sections.push(checked(scenarios::fanout(&common, &fan)?, FANOUT_PLOTS)?);
            if loopback {
                let rooms = scenarios::Workload { rooms: if smoke { 2 } else { 20 }, ..fan };
                sections.push(checked(scenarios::fanout(&downbeat_only, &rooms)?, FANOUT_PLOTS)?);
                // The same rooms with light clients: the server's fan-out without 600 native
                // clients on the same cores.
                let settle = if smoke { 3.0 } else { 10.0 };
                sections.push(checked(scenarios::light_fanout(&downbeat_only, &rooms, settle)?, FANOUT_PLOTS)?);
            }
            progress.inc(1);
        }
        if runs("join") {
            progress.set_message(&format!("{profile}: join"));
            let storm = if smoke { 20 } else { 600 };
            sections.push(checked(scenarios::join(&common, &class(1.0), storm)?, &[])?);
            progress.inc(1);
        }
        if runs("capacity") {
            if loopback {
                progress.set_message("capacity");
                // The smoke runs both kinds of client (a few dozen sessions each).
                let plan = if smoke {
                    scenarios::CapacityPlan {
                        clients: vec![scenarios::Clients::Light, scenarios::Clients::Native],
                        ..scenarios::CapacityPlan::new(60, 1.0, scenarios::Clients::Light)
                    }
                } else {
                    scenarios::CapacityPlan {
                        settle_seconds: scenarios::SETTLE_SECONDS,
                        ..scenarios::CapacityPlan::new(2_000, 10.0, scenarios::Clients::Light)
                    }
                };
                sections.push(checked(scenarios::capacity(&downbeat_only, &plan)?, &[])?);
                progress.set_message("handshakes");
                let handshakes =
                    scenarios::HandshakePlan { sessions: if smoke { 60 } else { 10_000 }, concurrency: 64, threads: 1 };
                sections.push(checked(scenarios::handshakes(&downbeat_only, handshakes)?, &[])?);
            }
            progress.inc(1);
        }
    }
    progress.finish();
    let text = sections.join("\n\n");
    std::fs::create_dir_all(out)?;
    std::fs::write(out.join("results.md"), &text)?;
    println!("{text}");
    Ok(())
}

/// Brings the emulator up and runs the self-check or holds it until Ctrl-C.
fn netem_scenario(
    config: EmulatorConfig,
    check: Option<netem::check::CheckConfig>,
    json: Option<std::path::PathBuf>,
) -> Result<()> {
    // Ctrl-C must not kill the process before the emulator's drop removes its namespace.
    let (ctrl_c_tx, ctrl_c) = std::sync::mpsc::channel();
    std::thread::Builder::new().name("ctrl-c".into()).spawn(move || {
        let Ok(rt) = tokio::runtime::Builder::new_current_thread().enable_io().build() else { return };
        if rt.block_on(tokio::signal::ctrl_c()).is_ok() {
            let _ = ctrl_c_tx.send(());
        }
    })?;
    let emulator = Emulator::start(config)?;
    let (client_dev, server_dev) = emulator.devices();
    println!("netem up: {}", emulator.profile());
    println!(
        "  clients: namespace {} (device {client_dev}), addresses {}",
        emulator.netns(),
        match emulator.config().clients {
            1 => emulator.client_addr(0).to_string(),
            n => format!("{} .. {}", emulator.client_addr(0), emulator.client_addr(n - 1)),
        }
    );
    println!("  server:  root namespace (device {server_dev}), address {}", emulator.server_addr());
    if let Some(check) = check {
        let exe = std::env::current_exe().context("finding this program to run the probe")?;
        let report = netem::check::run_check(&emulator, &exe, &check)?;
        println!("\n{}", report.table());
        if let Some(path) = json {
            std::fs::write(&path, serde_json::to_string_pretty(&report)?)?;
        }
        return Ok(());
    }
    println!(
        "  run a client: ip netns exec {} <program> (bind it to its client address)\nholding the network; Ctrl-C to stop",
        emulator.netns()
    );
    let _ = ctrl_c.recv();
    let stats = emulator.stats();
    println!("\n{}", serde_json::to_string_pretty(&stats)?);
    if let Some(path) = json {
        std::fs::write(&path, serde_json::to_string_pretty(&stats)?)?;
    }
    Ok(())
}

fn sim_scenario(
    name: String,
    clients: usize,
    seconds: u64,
    bpm: u32,
    seed: u64,
    (outage_at, change_at, (steady_ms, sync_steady_ms)): (Option<u64>, Option<f64>, (u64, u64)),
    json: Option<std::path::PathBuf>,
) -> Result<()> {
    let started = Instant::now();
    let mut rng = Rng::new(seed);
    let mut members = Vec::new();
    for i in 0..clients {
        // Power save on 30 % of clients, as in the classroom profile.
        let mut p = profile(&name, i % 10 < 3)?;
        if let Some(at) = outage_at {
            p.up.outages.push((at * SEC, (at + 1) * SEC));
            p.down.outages.push((at * SEC, (at + 1) * SEC));
        }
        members.push((ClockModel::random(&mut rng, 500 * MS as i64, 100.0), p));
    }
    let described = format!("{:?}", members.first().map(|m| &m.1));
    let config = room::Config { steady_send_interval_nanos: steady_ms * MS, ..room::Config::default() };
    let clock_config = clock::Config { steady_interval_nanos: sync_steady_ms * MS, ..clock::Config::default() };
    let mut sim = Sim::new(seed, config, &clock_config, MicroBpm::from_bpm(bpm), 4, members);
    sim.schedule_change(0, Change::Start { count_in_bars: 0 });
    if let Some(at) = change_at {
        sim.schedule_change((at * SEC as f64) as u64, Change::SetTempo(MicroBpm::from_bpm(bpm + bpm / 10)));
    }

    let (mut offset_errors, mut spreads) = (Vec::new(), Vec::new());
    let (mut late, mut scheduled, mut missing) = (0u64, 0u64, 0u64);
    let mut converged_at = vec![None; clients];
    let mut t = 100 * MS;
    while t <= seconds * SEC {
        sim.run_until(t);
        for (i, at) in converged_at.iter_mut().enumerate() {
            let err = sim.offset_error_nanos(i).map_or(u64::MAX, i64::unsigned_abs);
            if at.is_none() && err <= MS {
                *at = Some(t);
            }
            if t >= 2 * SEC {
                offset_errors.push(err);
            }
        }
        // Every 500 ms: the beats each client holds from 100 ms ahead (what an audio scheduler
        // queues) to the lead, as true instants. A beat placed in the past is late.
        if t >= 2 * SEC && t.is_multiple_of(500 * MS) {
            let timeline = sim.room().timeline().clone();
            let horizon = ServerNanos(t + room::Config::default().lead_nanos);
            for beat in timeline.beats_in(ServerNanos(t + 100 * MS), horizon) {
                let mut instants = Vec::new();
                for i in 0..clients {
                    match sim.true_instant_of_beat(i, beat.index) {
                        Some(at) => {
                            scheduled += 1;
                            late += u64::from(at < t);
                            instants.push(at);
                        }
                        None => missing += 1,
                    }
                }
                if let (Some(lo), Some(hi)) = (instants.iter().min(), instants.iter().max()) {
                    spreads.push(hi - lo);
                }
            }
        }
        t += 100 * MS;
    }
    offset_errors.sort_unstable();
    spreads.sort_unstable();
    let mut converge: Vec<u64> = converged_at.iter().map(|c| c.unwrap_or(u64::MAX)).collect();
    converge.sort_unstable();
    let net = sim.net_stats();
    let us = |n: u64| n as f64 / 1e3;
    let figures = serde_json::json!({
        "scenario": "sim",
        "profile": name,
        "profile_parameters": described,
        "clients": clients,
        "simulated_seconds": seconds,
        "bpm": bpm,
        "seed": seed,
        "outage_at_s": outage_at,
        "change_at_s": change_at,
        "sync_steady_interval_ms": sync_steady_ms,
        "offset_error_us": {"p50": us(quantile(&offset_errors, 0.5)), "p99": us(quantile(&offset_errors, 0.99)), "max": us(quantile(&offset_errors, 1.0))},
        "converged_within_1ms_s": {"p50": converge[clients / 2] as f64 / 1e9, "max": converge[clients - 1] as f64 / 1e9},
        "onset_spread_us": {"p50": us(quantile(&spreads, 0.5)), "p99": us(quantile(&spreads, 0.99)), "max": us(quantile(&spreads, 1.0))},
        "beats_checked": scheduled,
        "late_beats": late,
        "beats_unknown": missing,
        "datagrams": {"sent": net.sent, "lost": net.lost, "max_bytes": net.max_datagram_len},
        "wall_seconds": started.elapsed().as_secs_f64(),
    });
    println!("| metric | p50 | p99 | max |\n|---|---|---|---|");
    println!(
        "| clock offset error (us) | {:.1} | {:.1} | {:.1} |",
        figures["offset_error_us"]["p50"], figures["offset_error_us"]["p99"], figures["offset_error_us"]["max"]
    );
    println!(
        "| beat onset spread (us) | {:.1} | {:.1} | {:.1} |",
        figures["onset_spread_us"]["p50"], figures["onset_spread_us"]["p99"], figures["onset_spread_us"]["max"]
    );
    println!(
        "profile {name}, {clients} clients, {seconds} s simulated; converged (<1 ms) by {:.2} s (max); late beats {late} of {scheduled}; unknown {missing}; datagrams {} sent, {} lost, largest {} B; {:.1} s wall",
        figures["converged_within_1ms_s"]["max"], net.sent, net.lost, net.max_datagram_len, figures["wall_seconds"]
    );
    if let Some(path) = json {
        std::fs::write(&path, serde_json::to_string_pretty(&figures)?)?;
    }
    Ok(())
}
