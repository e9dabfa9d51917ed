//! Downbeat under attack: a class of 30 plays through a run of phases, a quiet one first and
//! then one attack each, and every phase is measured as the class heard it.
//!
//! One server (the real binary, its data directory on a small tmpfs so that its SQLite
//! database can be made to run out of disk), one class helper (30 students over
//! WebTransport, each playing a note a second and writing a reflection every 2 s, the beat
//! scheduled 200 ms ahead) and, per phase:
//! - **quiet**: nothing, the baseline;
//! - **slow-http**: 2,000 connections to the HTTP listener that send a header line a second
//!   and never finish ([`attack::Attack::SlowHttp`]);
//! - **stalled-quic**: 300 QUIC handshakes that send their Initial and go silent, renewed
//!   every 5 s ([`attack::Attack::StalledQuic`]);
//! - **flood**: one student of the class playing 1,000 notes a second and guessing room
//!   codes as fast as the server answers ([`attack::Attack::Flood`]);
//! - **storm**: storms of 10,000 HTTP connections at once, back to back
//!   ([`attack::Attack::Storm`]);
//! - **disk-full**: the database's disk filled to the last byte, then freed at the end of
//!   the phase (the next phase waits until the writes queued meanwhile committed);
//! - **quiet-after**: nothing again, to show the server came back to where it was.
//!
//! The class's clocks settle for one gap before the quiet phase.
//!
//! Each attack runs in a process of its own under `nice` (an attacker's CPU is on other
//! machines in a school), from loopback addresses of its own. In every phase, students who
//! were not in the class join it (over WebTransport and over WebSocket, spread over the
//! phase), as latecomers do. Per phase the report gives the class's beat onset spread p99
//! against the quiet phase's, late beats, the latecomers' joins, the reflections written in
//! it and whether each acknowledged one is in the database after the server is killed
//! (SIGKILL), and the server's CPU.

pub mod attack;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt::Write as _;
use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail, ensure};
use downbeat_client::Client;
use downbeat_server::auth::Role;
use serde_json::json;

use crate::downbeat::class::{BeatLog, ClassOutput, ClassSpec, ReflectionLog, RoomSpec, StudentSpec};
use crate::downbeat::{Ready, ServerLimits, ServerOptions, ServerProcess, run_class};
use crate::hostclock::HostClock;
use crate::machine::{ProcessMeter, StealMeter, describe};
use crate::metrics::{Metric, RunReport, Summary, SystemResult};
use attack::{Attack, AttackReport};

/// The abuse scenario's settings (its command-line options).
#[derive(Clone, Debug, clap::Args)]
pub struct AbuseConfig {
    /// Seconds each phase is measured (60 s: 120 beats, so a p99 is not a maximum).
    #[arg(long, default_value_t = 60.0)]
    pub phase_seconds: f64,
    /// Seconds between phases (an attack winds down), not measured; also how long the
    /// class's clocks settle before the first.
    #[arg(long, default_value_t = 5.0)]
    pub gap_seconds: f64,
    /// Students in the class.
    #[arg(long, default_value_t = 30)]
    pub students: usize,
    /// Slow HTTP connections.
    #[arg(long, default_value_t = 2_000)]
    pub slow_http: usize,
    /// Stalled QUIC handshakes (renewed every 5 s).
    #[arg(long, default_value_t = 300)]
    pub stalled_quic: usize,
    /// Connections per storm.
    #[arg(long, default_value_t = 10_000)]
    pub storm: usize,
    /// Notes a second the flooding student plays.
    #[arg(long, default_value_t = 1_000)]
    pub flood_notes_per_second: u32,
    /// Latecomers joining per phase over each transport.
    #[arg(long, default_value_t = 5)]
    pub latecomers: usize,
    /// Size of the tmpfs holding the server's database, MiB.
    #[arg(long, default_value_t = 64)]
    pub disk_mib: u64,
    /// Seed for the class's clocks.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// This program (it runs the class and the attacks).
    #[arg(skip)]
    pub bench_binary: PathBuf,
    /// The command line, for the report.
    #[arg(skip)]
    pub command: String,
}

/// What a phase does to the server.
#[derive(Clone, Debug)]
enum Trouble {
    Nothing,
    Attack(Attack),
    DiskFull,
}

/// One phase as measured.
#[derive(Debug, Default)]
struct Phase {
    name: String,
    what: String,
    /// Host monotonic ns.
    window: (u64, u64),
    latecomers: Vec<Latecomer>,
    attack: Option<AttackReport>,
    server_cpu_seconds: f64,
    /// Counters of the server that moved in the phase.
    counters: BTreeMap<String, f64>,
    notes: Vec<String>,
}

/// A latecomer's join.
#[derive(Debug, Clone)]
struct Latecomer {
    transport: &'static str,
    /// Connect to welcome, ms; or why it failed.
    result: std::result::Result<f64, String>,
}

/// A tmpfs mounted for the run, unmounted when dropped.
struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    fn mount(mib: u64) -> Result<Self> {
        let dir = tempfile::tempdir().context("a mount point")?;
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={mib}m,mode=0700"), "downbeat-bench-abuse"])
            .arg(dir.path())
            .status()
            .context("running mount")?;
        ensure!(
            status.success(),
            "mounting a {mib} MiB tmpfs for the server's database failed ({status}): the disk-full phase needs root"
        );
        Ok(Self { dir })
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(self.dir.path()).status();
    }
}

/// Runs the scenario.
pub fn run(config: &AbuseConfig) -> Result<RunReport> {
    let began = Instant::now();
    let steal = StealMeter::start();
    let started_at =
        time::OffsetDateTime::now_utc().format(&time::format_description::well_known::Rfc3339).unwrap_or_default();
    let disk = Tmpfs::mount(config.disk_mib)?;
    let server = ServerProcess::start_with(ServerOptions {
        limits: ServerLimits::default(),
        http_host: IpAddr::V4(Ipv4Addr::LOCALHOST),
        data_dir: Some(disk.path().to_path_buf()),
        // Every reflection of the run is stored (the default allows 5 per prompt).
        settings: "max_reflections_per_prompt = 100000\n".into(),
        cpus: None,
    })?;
    let host = HostClock::new();
    let students = (0..config.students)
        .map(|s| {
            Ok(StudentSpec {
                token: server.token(Role::Student, &format!("s-{s}"))?,
                bind: Some(IpAddr::V4(Ipv4Addr::new(127, 0, 1, 2 + s as u8))),
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let spec = ClassSpec {
        url: server.url(IpAddr::V4(Ipv4Addr::LOCALHOST)),
        cert_hashes: server.cert_hashes().to_vec(),
        server_zero: server.zero(),
        rooms: vec![RoomSpec {
            teacher_token: server.token(Role::Teacher, "t-0")?,
            teacher_bind: Some(IpAddr::V4(Ipv4Addr::new(127, 0, 1, 1))),
            students,
        }],
        bpm: 120,
        seconds: 0.0,
        notes_per_second: 1.0,
        max_offset_ms: 500.0,
        max_drift_ppm: 100.0,
        seed: config.seed,
        lookahead_ms: 200,
        tick_ms: 25,
        sample_ms: 100,
        settle_ms: 2000,
        concurrency: 128,
        hold: false,
        join_deadline: Duration::from_secs(60),
        until_stdin_closes: true,
        beat_log: true,
        reflect_every_ms: 2000,
        reflection_chars: 400,
    };
    let work = tempfile::tempdir()?;
    let mut phases = Vec::new();
    let output = run_class(Command::new(&config.bench_binary), &spec, work.path(), |ready| {
        let Ready::Playing(codes) = ready else { bail!("the class helper held its sessions unasked") };
        let code = codes.first().context("the class's room code")?;
        phases = run_phases(config, &server, &disk, code, host, work.path())?;
        Ok(())
    })?;
    ensure!(
        output.joined == config.students,
        "only {} of {} students joined: {:?}",
        output.joined,
        config.students,
        output.join_errors
    );
    // Acknowledged means committed: kill -9 loses none of them.
    let database = server.data_dir().join("downbeat.sqlite3");
    let mut server = server;
    server.stop();
    let stored = stored_reflections(&database)?;
    drop(disk);

    let mut report = RunReport {
        scenario: "abuse".into(),
        title: "Under attack: a class of 30 playing while the server is attacked".into(),
        profile: "loopback".into(),
        profile_parameters: "loopback: the kernel's loopback device, no emulator, nothing added".into(),
        parameters: json!({
            "students": config.students, "phase_seconds": config.phase_seconds, "gap_seconds": config.gap_seconds,
            "slow_http": config.slow_http, "stalled_quic": config.stalled_quic, "storm": config.storm,
            "flood_notes_per_second": config.flood_notes_per_second, "latecomers": config.latecomers,
            "disk_mib": config.disk_mib, "seed": config.seed,
        }),
        command: config.command.clone(),
        started_at,
        ..RunReport::default()
    };
    // Each phase's spreads against the quiet phases' are derived from the distributions when
    // the report is rendered ([`markdown`]).
    for phase in &phases {
        report.systems.push(phase_result(phase, &output, &stored));
    }
    report.machine = describe();
    report.wall_seconds = began.elapsed().as_secs_f64();
    report.machine.steal_percent = steal.percent();
    let lost: usize = report.systems.iter().map(|s| s.extra["reflections_lost"].as_u64().unwrap_or(0) as usize).sum();
    report.notes.push(format!(
        "Reflections: {} sent, {} acknowledged, {} of those not in the database after kill -9 of the server, {} stored twice.",
        output.reflections.len(),
        output.reflections.iter().filter(|r| r.acknowledged.is_some()).count(),
        lost,
        stored.values().filter(|&&n| n > 1).count(),
    ));
    if report.machine.steal_percent > 1.0 {
        report.notes.push(format!(
            "The hypervisor stole {:.1} % of the CPU during this run: treat its tails as noisy.",
            report.machine.steal_percent
        ));
    }
    Ok(report)
}

/// The phases, in order, while the class plays.
fn run_phases(
    config: &AbuseConfig,
    server: &ServerProcess,
    disk: &Tmpfs,
    code: &str,
    host: HostClock,
    work: &Path,
) -> Result<Vec<Phase>> {
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build()?;
    let wt = server.url(IpAddr::V4(Ipv4Addr::LOCALHOST));
    let wt_addr: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), url_port(&wt)?);
    let http = server.http_addr();
    let flooder = server.token(Role::Student, "flooder")?;
    let plan: Vec<(&str, String, Trouble)> = vec![
        ("quiet", "nothing: the baseline".into(), Trouble::Nothing),
        (
            "slow-http",
            format!("{} HTTP connections sending a header line a second", config.slow_http),
            Trouble::Attack(Attack::SlowHttp { target: http, connections: config.slow_http, sources: 16 }),
        ),
        (
            "stalled-quic",
            format!("{} QUIC handshakes that never answer, renewed every 5 s", config.stalled_quic),
            Trouble::Attack(Attack::StalledQuic {
                target: wt_addr,
                handshakes: config.stalled_quic,
                sources: config.stalled_quic,
                every_ms: 5_000,
            }),
        ),
        (
            "flood",
            format!("one student: {} notes/s and code guesses as fast as answered", config.flood_notes_per_second),
            Trouble::Attack(Attack::Flood {
                url: wt.clone(),
                cert_hashes: server.cert_hashes().to_vec(),
                token: flooder,
                code: code.to_owned(),
                notes_per_second: config.flood_notes_per_second,
            }),
        ),
        (
            "storm",
            format!("storms of {} HTTP connections at once, back to back", config.storm),
            Trouble::Attack(Attack::Storm { target: http, connections: config.storm, sources: 40 }),
        ),
        ("disk-full", "the database's disk full to the last byte, then freed".into(), Trouble::DiskFull),
        ("quiet-after", "nothing again, once the queued writes committed".into(), Trouble::Nothing),
    ];
    let meter = ProcessMeter::new(server.pid());
    let mut phases = Vec::new();
    // The class's clocks settle before the baseline.
    std::thread::sleep(Duration::from_secs_f64(config.gap_seconds));
    for (index, (name, what, trouble)) in plan.into_iter().enumerate() {
        let mut phase = Phase { name: name.into(), what, ..Phase::default() };
        let mut attacker = None;
        let mut filler = None;
        match &trouble {
            Trouble::Nothing => {}
            Trouble::Attack(attack) => attacker = Some(Attacker::start(&config.bench_binary, attack, work)?),
            Trouble::DiskFull => {
                let (path, bytes, note) =
                    runtime.block_on(fill_disk(disk.path(), &server.data_dir().join("downbeat.sqlite3")))?;
                phase.notes.push(format!("filled the disk with {} KiB; {note}", bytes / 1024));
                filler = Some(path);
            }
        }
        let before = server.metrics()?;
        let cpu = meter.cpu_seconds()?;
        let start = host.now();
        let tokens = (0..config.latecomers * 2)
            .map(|k| server.token(Role::Student, &format!("late-{index}-{k}")))
            .collect::<Result<Vec<_>>>()?;
        phase.latecomers = runtime.block_on(latecomers(
            &wt,
            &server.websocket_url(),
            server.cert_hashes(),
            code,
            tokens,
            index,
            Duration::from_secs_f64(config.phase_seconds),
        ))?;
        if let Some(filler) = filler {
            // The phase goes on until the writes held back are committed: their burst of
            // acknowledgements and feed updates belongs to it.
            std::fs::remove_file(&filler).context("freeing the disk")?;
            let freed = Instant::now();
            wait_for_queue(server, Duration::from_secs(120))?;
            phase.notes.push(format!(
                "once the disk was freed, the queued writes committed within {:.1} s (measured with the phase)",
                freed.elapsed().as_secs_f64()
            ));
        }
        phase.window = (start, host.now());
        phase.server_cpu_seconds = meter.cpu_seconds()? - cpu;
        let after = server.metrics()?;
        phase.counters = after
            .iter()
            .filter(|(k, _)| k.contains("_total"))
            .filter_map(|(k, v)| {
                let moved = v - before.get(k).unwrap_or(&0.0);
                (moved != 0.0).then(|| (k.clone(), moved))
            })
            .collect();
        if let Some(attacker) = attacker {
            phase.attack = Some(attacker.stop()?);
        }
        phases.push(phase);
        std::thread::sleep(Duration::from_secs_f64(config.gap_seconds));
    }
    Ok(phases)
}

/// Waits until the server's SEL queue is empty and its database works (`downbeat_sel_queued`
/// and `downbeat_sel_degraded` both 0), polling its metrics.
fn wait_for_queue(server: &ServerProcess, deadline: Duration) -> Result<()> {
    let began = Instant::now();
    loop {
        let metrics = server.metrics()?;
        let queued = metrics.get("downbeat_sel_queued").copied().unwrap_or(0.0);
        let degraded = metrics.get("downbeat_sel_degraded").copied().unwrap_or(0.0);
        if queued == 0.0 && degraded == 0.0 {
            return Ok(());
        }
        ensure!(
            began.elapsed() < deadline,
            "the SEL queue still held {queued} jobs {deadline:?} after the disk was freed"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn url_port(url: &str) -> Result<u16> {
    url.trim_end_matches('/').rsplit(':').next().and_then(|p| p.parse().ok()).context("the WebTransport port")
}

/// Latecomers join the class over WebTransport and WebSocket, spread evenly over `length`;
/// each leaves once welcomed. Returns when `length` has passed and every join ended.
async fn latecomers(
    wt: &str,
    ws: &str,
    cert_hashes: &[String],
    code: &str,
    tokens: Vec<String>,
    phase: usize,
    length: Duration,
) -> Result<Vec<Latecomer>> {
    let hashes = crate::downbeat::class::decode_hashes(cert_hashes)?;
    let began = tokio::time::Instant::now();
    let every = length / (tokens.len().max(1) as u32);
    let mut joins = tokio::task::JoinSet::new();
    for (k, token) in tokens.into_iter().enumerate() {
        tokio::time::sleep_until(began + every * k as u32 + every / 2).await;
        let (transport, url) = if k % 2 == 0 { ("webtransport", wt) } else { ("websocket", ws) };
        let from = IpAddr::V4(Ipv4Addr::new(127, 0, 9, 1 + (phase * 20 + k % 20) as u8));
        let options = attack::student_options(url, &token, code, &hashes, from);
        joins.spawn(async move {
            let started = Instant::now();
            let result = match Client::connect(options).await {
                Ok(client) => {
                    let ms = started.elapsed().as_secs_f64() * 1e3;
                    client.close();
                    Ok(ms)
                }
                Err(e) => Err(e.to_string()),
            };
            Latecomer { transport, result }
        });
    }
    tokio::time::sleep_until(began + length).await;
    let mut out = Vec::new();
    while let Some(joined) = joins.join_next().await {
        out.push(joined?);
    }
    Ok(out)
}

/// A running attack helper.
struct Attacker {
    child: Child,
    stdout: BufReader<std::process::ChildStdout>,
}

impl Attacker {
    /// Starts `attack` under `nice` and waits until it is at full strength.
    fn start(bench: &Path, attack: &Attack, work: &Path) -> Result<Self> {
        let spec = work.join(format!("attack-{}.json", attack.name()));
        std::fs::write(&spec, serde_json::to_vec(attack)?)?;
        let mut child = Command::new("nice")
            .args(["-n", "10"])
            .arg(bench)
            .arg("attack-helper")
            .arg("--spec")
            .arg(&spec)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .context("starting the attack helper")?;
        let mut stdout = BufReader::new(child.stdout.take().context("the attack helper's stdout")?);
        let mut line = String::new();
        loop {
            line.clear();
            if stdout.read_line(&mut line)? == 0 {
                let status = child.wait()?;
                bail!("the {} attack ended before it began ({status})", attack.name());
            }
            if line.trim() == "attacking" {
                break;
            }
        }
        Ok(Self { child, stdout })
    }

    /// Stops the attack; its report.
    fn stop(mut self) -> Result<AttackReport> {
        drop(self.child.stdin.take());
        let mut rest = String::new();
        self.stdout.read_to_string(&mut rest)?;
        let status = self.child.wait()?;
        ensure!(status.success(), "the attack helper failed ({status})");
        let last = rest.lines().last().context("the attack helper printed no report")?;
        serde_json::from_str(last).context("the attack helper's report")
    }
}

/// Fills the disk `dir` is on to the last byte; returns the filler file, its size and what the
/// database's write-ahead log was made to do first: checkpointed and truncated, so the next
/// write must grow it (otherwise the log reuses its own space and a full disk bites only when
/// it fills up).
async fn fill_disk(dir: &Path, database: &Path) -> Result<(PathBuf, u64, String)> {
    use sqlx::Connection as _;
    let mut connection = sqlx::SqliteConnection::connect(&format!("sqlite://{}", database.display()))
        .await
        .context("opening the server's database")?;
    let (busy, log, done): (i64, i64, i64) =
        sqlx::query_as("PRAGMA wal_checkpoint(TRUNCATE)").fetch_one(&mut connection).await?;
    connection.close().await?;
    let note = format!("the WAL was checkpointed first (busy {busy}, {log} frames, {done} moved)");
    let path = dir.join("filler");
    let mut file = std::fs::File::create(&path)?;
    let mut bytes = 0_u64;
    for chunk in [1 << 20, 4096, 512, 1] {
        let block = vec![0_u8; chunk];
        loop {
            match file.write(&block) {
                Ok(0) => break,
                Ok(n) => bytes += n as u64,
                Err(e) if e.kind() == std::io::ErrorKind::StorageFull => break,
                Err(e) => return Err(e).context("filling the disk"),
            }
        }
    }
    file.sync_all().ok();
    Ok((path, bytes, note))
}

/// Reflections in the database, by text, with how many times each is stored.
fn stored_reflections(database: &Path) -> Result<HashMap<String, u32>> {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    runtime.block_on(async {
        use sqlx::Connection as _;
        let mut connection = sqlx::SqliteConnection::connect(&format!("sqlite://{}", database.display()))
            .await
            .context("opening the server's database after the run")?;
        let texts: Vec<(Option<String>,)> =
            sqlx::query_as("SELECT text FROM reflections").fetch_all(&mut connection).await?;
        let mut stored = HashMap::new();
        for (text,) in texts.into_iter() {
            *stored.entry(text.unwrap_or_default()).or_insert(0) += 1;
        }
        Ok(stored)
    })
}

/// The phases nothing happens in: together, the baseline.
const QUIET: &[&str] = &["quiet", "quiet-after"];

/// The beats of `window` (by the instant they sound).
fn phase_beats(log: &[BeatLog], window: (u64, u64)) -> Vec<BeatLog> {
    log.iter().filter(|b| b.at >= window.0 && b.at < window.1).copied().collect()
}

fn phase_result(phase: &Phase, output: &ClassOutput, stored: &HashMap<String, u32>) -> SystemResult {
    let beats = phase_beats(&output.beat_log, phase.window);
    let spreads: Vec<f64> = beats.iter().map(|b| b.spread_ms).collect();
    let p99 = Summary::of(&spreads).p99;
    let checked: u64 = beats.iter().map(|b| u64::from(b.checked)).sum();
    let late: u64 = beats.iter().map(|b| u64::from(b.late)).sum();
    let missing: u64 = beats.iter().map(|b| u64::from(b.missing)).sum();
    let reflections: Vec<&ReflectionLog> =
        output.reflections.iter().filter(|r| r.sent >= phase.window.0 && r.sent < phase.window.1).collect();
    let acknowledged: Vec<&&ReflectionLog> = reflections.iter().filter(|r| r.acknowledged.is_some()).collect();
    let lost = acknowledged.iter().filter(|r| !stored.contains_key(&r.text)).count();
    let refused: BTreeMap<String, usize> =
        reflections.iter().filter_map(|r| r.error.clone()).fold(BTreeMap::new(), |mut m, e| {
            *m.entry(e).or_default() += 1;
            m
        });
    let ack_ms: Vec<f64> =
        acknowledged.iter().filter_map(|r| r.acknowledged.map(|a| a.saturating_sub(r.sent) as f64 / 1e6)).collect();
    let joined =
        |transport: &str| phase.latecomers.iter().filter(|l| l.transport == transport && l.result.is_ok()).count();
    let tried = |transport: &str| phase.latecomers.iter().filter(|l| l.transport == transport).count();
    let join_ms: Vec<f64> = phase.latecomers.iter().filter_map(|l| l.result.as_ref().ok().copied()).collect();
    let join_errors: Vec<&String> = phase.latecomers.iter().filter_map(|l| l.result.as_ref().err()).collect();
    let seconds = (phase.window.1 - phase.window.0) as f64 / 1e9;
    let metrics = vec![
        Metric::lower("onset_spread_p50_ms", "beat onset spread p50", "ms", Summary::of(&spreads).p50),
        Metric::lower("onset_spread_p99_ms", "beat onset spread p99", "ms", p99),
        Metric::lower("beats_late", "beats scheduled late", "", late as f64),
        Metric::lower("beats_missing", "beats never scheduled", "", missing as f64),
        Metric::higher("beats_checked", "beats checked (per student)", "", checked as f64),
        Metric::higher(
            "latecomers_webtransport",
            "latecomers joined over WebTransport",
            "",
            joined("webtransport") as f64,
        ),
        Metric::higher("latecomers_websocket", "latecomers joined over WebSocket", "", joined("websocket") as f64),
        Metric::lower("latecomer_join_max_ms", "slowest latecomer join", "ms", Summary::of(&join_ms).max),
        Metric::higher("reflections_acknowledged", "reflections acknowledged", "", acknowledged.len() as f64),
        Metric::lower("reflections_lost", "acknowledged reflections not stored", "", lost as f64),
        Metric::lower("reflection_ack_p99_ms", "reflection acknowledgement p99", "ms", Summary::of(&ack_ms).p99),
        Metric::lower("server_cpu_percent", "server CPU", "%", phase.server_cpu_seconds / seconds.max(1e-9) * 100.0),
    ];
    SystemResult {
        system: phase.name.clone(),
        display: phase.name.clone(),
        metrics,
        distributions: BTreeMap::from([("onset_spread_ms".to_owned(), spreads)]),
        extra: json!({
            "what": phase.what,
            "window_ns": [phase.window.0, phase.window.1],
            "latecomers_tried": {"webtransport": tried("webtransport"), "websocket": tried("websocket")},
            "latecomer_errors": join_errors,
            "reflections_sent": reflections.len(),
            "reflections_refused": refused,
            "reflections_lost": lost,
            "attack": phase.attack,
            "server_counters": phase.counters,
            "notes": phase.notes,
        }),
    }
}

/// The abuse run as markdown: one row per phase, then what each attack did.
pub fn markdown(report: &RunReport) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "### {}\n", report.title);
    out.push_str(
        "| phase | what the server faced | onset spread p50 / p99 (ms) | p99 × quiet | late beats | latecomers joined (WT, WS) | slowest join (ms) | reflections acknowledged | acknowledgement p99 (ms) | acknowledged, not stored | server CPU (%) |\n\
         |:--|:--|--:|--:|--:|--:|--:|--:|--:|--:|--:|\n",
    );
    let value = |system: &SystemResult, key: &str| system.metrics.iter().find(|m| m.key == key).and_then(|m| m.value);
    let spreads = |system: &SystemResult| system.distributions.get("onset_spread_ms").cloned().unwrap_or_default();
    let quiet: Vec<f64> =
        report.systems.iter().filter(|s| QUIET.contains(&s.system.as_str())).flat_map(spreads).collect();
    let quiet_p99 = Summary::of(&quiet).p99;
    let fmt = |v: Option<f64>, digits: usize| v.map_or_else(|| "n/a".to_owned(), |v| format!("{v:.digits$}"));
    for system in &report.systems {
        let tried = &system.extra["latecomers_tried"];
        let _ = writeln!(
            out,
            "| {} | {} | {} / {} | {} | {} of {} | {} of {}, {} of {} | {} | {} of {} | {} | {} | {} |",
            system.display,
            system.extra["what"].as_str().unwrap_or(""),
            fmt(value(system, "onset_spread_p50_ms"), 3),
            fmt(value(system, "onset_spread_p99_ms"), 3),
            fmt((quiet_p99 > 0.0).then(|| Summary::of(&spreads(system)).p99 / quiet_p99), 2),
            fmt(value(system, "beats_late"), 0),
            fmt(value(system, "beats_checked"), 0),
            fmt(value(system, "latecomers_webtransport"), 0),
            tried["webtransport"],
            fmt(value(system, "latecomers_websocket"), 0),
            tried["websocket"],
            fmt(value(system, "latecomer_join_max_ms"), 0),
            fmt(value(system, "reflections_acknowledged"), 0),
            system.extra["reflections_sent"],
            fmt(value(system, "reflection_ack_p99_ms"), 0),
            fmt(value(system, "reflections_lost"), 0),
            fmt(value(system, "server_cpu_percent"), 0),
        );
    }
    let _ = writeln!(
        out,
        "\np99 × quiet: against every beat of the two quiet phases together (p99 {quiet_p99:.3} ms); the quiet \
         phases alone: {}.",
        report
            .systems
            .iter()
            .filter(|s| QUIET.contains(&s.system.as_str()))
            .map(|s| format!("{} {:.3} ms", s.display, Summary::of(&spreads(s)).p99))
            .collect::<Vec<_>>()
            .join(", ")
    );
    out.push_str("\nWhat each phase did and what the server said:\n\n");
    for system in &report.systems {
        let mut said: Vec<String> = Vec::new();
        if let Some(counters) = system.extra["attack"]["counters"].as_object() {
            said.push(format!(
                "attacker: {}",
                counters.iter().map(|(k, v)| format!("{k} {v}")).collect::<Vec<_>>().join(", ")
            ));
        }
        if let Some(notes) = system.extra["attack"]["notes"].as_array() {
            said.extend(notes.iter().filter_map(|n| n.as_str().map(str::to_owned)));
        }
        if let Some(notes) = system.extra["notes"].as_array() {
            said.extend(notes.iter().filter_map(|n| n.as_str().map(str::to_owned)));
        }
        if let Some(counters) = system.extra["server_counters"].as_object() {
            let interesting: Vec<String> = counters
                .iter()
                .filter(|(k, _)| SERVER_COUNTERS.iter().any(|c| k.starts_with(c)))
                .map(|(k, v)| format!("{} {}", k.trim_start_matches("downbeat_").trim_end_matches("_total"), v))
                .collect();
            if !interesting.is_empty() {
                said.push(format!("server: {}", interesting.join(", ")));
            }
        }
        if let Some(refused) = system.extra["reflections_refused"].as_object().filter(|r| !r.is_empty()) {
            said.push(format!(
                "reflections refused: {}",
                refused.iter().map(|(k, v)| format!("{v} × {k}")).collect::<Vec<_>>().join(", ")
            ));
        }
        if let Some(errors) = system.extra["latecomer_errors"].as_array().filter(|e| !e.is_empty()) {
            let distinct: HashSet<&str> = errors.iter().filter_map(|e| e.as_str()).collect();
            said.push(format!("latecomers refused: {}", distinct.into_iter().collect::<Vec<_>>().join("; ")));
        }
        let _ = writeln!(
            out,
            "- **{}**: {}",
            system.display,
            if said.is_empty() { "nothing to say".to_owned() } else { said.join("; ") }
        );
    }
    out.push_str(&crate::report::run_footer(report));
    out
}

/// Server counters the markdown names, by prefix.
const SERVER_COUNTERS: &[&str] = &[
    "downbeat_handshakes_refused",
    "downbeat_handshakes_retried",
    "downbeat_refused_total",
    "downbeat_hello_failures_by_code",
    "downbeat_datagrams_rate_limited",
    "downbeat_note_datagrams_refused",
    "downbeat_sessions_closed_for_abuse",
    "downbeat_sel_write_failures",
    "downbeat_reflections_refused",
    "downbeat_notes_accepted",
    "downbeat_feed_dropped",
    "downbeat_slow_members_dropped",
];

/// What a smoke run must show: every phase ran and measured beats, each attack reported, and
/// no acknowledged reflection is missing from the database (that one is correctness, not
/// speed). It never checks how well the class kept time.
pub fn smoke_check(report: &RunReport) -> Result<()> {
    ensure!(report.systems.len() == 7, "smoke: {} phases ran, not 7", report.systems.len());
    for system in &report.systems {
        let value = |key: &str| system.metrics.iter().find(|m| m.key == key).and_then(|m| m.value).unwrap_or(0.0);
        ensure!(value("beats_checked") > 0.0, "smoke: no beats measured in the {} phase", system.display);
        ensure!(
            value("reflections_lost") == 0.0,
            "smoke: acknowledged reflections lost in the {} phase",
            system.display
        );
        let attacked = !QUIET.contains(&system.system.as_str()) && system.system != "disk-full";
        ensure!(
            !attacked || system.extra["attack"]["counters"].as_object().is_some_and(|c| !c.is_empty()),
            "smoke: the {} attack reported nothing",
            system.display
        );
    }
    Ok(())
}
