//! Simulated classrooms on real sockets: the program `downbeat-bench class-helper` runs in
//! the clients' network namespace (or on loopback) and drives Downbeat's native client, the
//! same engine code a browser runs, for every teacher and student of a [`ClassSpec`], over
//! WebTransport or WebSocket as the spec's URL says.
//!
//! Each student gets an [`InjectedClock`] with a known offset and drift, so the helper knows
//! the truth: true server time at an instant is the host's monotonic clock minus the
//! server's published zero. Students behave like the classroom page: a scheduler wakes every
//! `tick_ms` and schedules the beats of the next `lookahead_ms` (as Web Audio would), notes
//! are played at a steady rate with a random phase, and classmates' notes are scheduled at
//! their playout instant. Everything is recorded on the host clock and reduced here to the
//! distributions in [`ClassOutput`].

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};
use downbeat_client::{Client, ConnectOptions, InjectedClock, LocalClock as _};
use downbeat_engine::sim::Rng;
use downbeat_protocol::{Change, MicroBpm, Name, RoomSettings, ServerNanos};
use serde::{Deserialize, Serialize};
use tokio::sync::{Barrier, Semaphore};

use crate::hostclock::HostClock;

/// What the helper runs: the server to reach, the rooms with their people, the workload.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ClassSpec {
    /// `https://host:port/` of the server's WebTransport endpoint, or `ws://host:port/api/ws`
    /// of its WebSocket endpoint: every teacher and student connects over that transport.
    pub url: String,
    /// Hex SHA-256 of the server's certificates.
    pub cert_hashes: Vec<String>,
    /// The host monotonic reading at server time zero.
    pub server_zero: u64,
    /// The rooms.
    pub rooms: Vec<RoomSpec>,
    /// Tempo.
    pub bpm: u32,
    /// How long the beat runs once every room has started, in seconds.
    pub seconds: f64,
    /// Notes each student plays per second while the beat runs.
    pub notes_per_second: f64,
    /// Injected clock offsets are uniform in +-this, in ms.
    pub max_offset_ms: f64,
    /// Injected drifts are uniform in +-this, in ppm.
    pub max_drift_ppm: f64,
    /// Seed for offsets, drifts and note phases.
    pub seed: u64,
    /// How far ahead the scheduler places beats, in ms.
    pub lookahead_ms: u64,
    /// How often the scheduler wakes, in ms.
    pub tick_ms: u64,
    /// How often each student's clock error is sampled, in ms.
    pub sample_ms: u64,
    /// Clock errors count from this long after a student's welcome, in ms.
    pub settle_ms: u64,
    /// Handshakes in flight at once, at most.
    pub concurrency: usize,
    /// Hold the sessions after joining (beats running, no notes, no measuring) until stdin
    /// closes, printing `held N` once every session is up: the capacity scenario.
    pub hold: bool,
    /// The join phase ends after this long however many sessions are up: those still joining
    /// are given up (counted in `join_errors`) and the run goes on with the rest, so a
    /// saturated run ends by itself with the figures it has.
    #[serde(default = "default_join_deadline")]
    pub join_deadline: Duration,
    /// The beat runs until stdin closes rather than for `seconds` (the parent does something
    /// to the server meanwhile: the abuse scenario). The helper prints `playing CODE...`
    /// when the measured window begins.
    #[serde(default)]
    pub until_stdin_closes: bool,
    /// Keep one [`BeatLog`] per room and beat, so a run can be cut into phases afterwards.
    #[serde(default)]
    pub beat_log: bool,
    /// Each student writes a reflection this often while the beat runs, in ms (0: never);
    /// each teacher asks a prompt when the beat starts.
    #[serde(default)]
    pub reflect_every_ms: u64,
    /// Characters of each reflection's text (at most the protocol's limit).
    #[serde(default)]
    pub reflection_chars: usize,
}

/// The join phase's deadline when a spec names none.
pub fn default_join_deadline() -> Duration {
    Duration::from_secs(600)
}

/// One room: its teacher creates it, then the students join.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RoomSpec {
    /// The teacher's token.
    pub teacher_token: String,
    /// Where the teacher sends from.
    pub teacher_bind: Option<IpAddr>,
    /// The students.
    pub students: Vec<StudentSpec>,
}

/// One student.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct StudentSpec {
    /// Their token.
    pub token: String,
    /// Where they send from.
    pub bind: Option<IpAddr>,
}

/// What the helper measured, reduced to distributions (milliseconds unless named).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ClassOutput {
    /// Students asked for.
    pub students: usize,
    /// Students whose session came up.
    pub joined: usize,
    /// Join failures, with their reasons.
    pub join_errors: Vec<String>,
    /// Per student: connect start to welcome.
    pub welcome_ms: Vec<f64>,
    /// Per student: connect start to clock synced.
    pub synced_ms: Vec<f64>,
    /// First connect start to the last student synced (or welcomed, when holding).
    pub all_joined_ms: f64,
    /// Clock error against the truth, |estimate - truth| in ms, every sample after settling.
    pub offset_error_ms: Vec<f64>,
    /// Per student: the mean of estimate minus truth (signed, ms) over the same samples, the
    /// part of the error that stays: what the two directions' unequal delays left in the
    /// estimate. The rest is how much the estimate moves about it.
    pub offset_bias_ms: Vec<f64>,
    /// Per student: welcome to the first sample after which the error stays within 1 ms for
    /// the rest of the run, in seconds (`None`: never).
    pub converged_s: Vec<Option<f64>>,
    /// Per room and beat: latest minus earliest true instant its students schedule it.
    pub onset_spread_ms: Vec<f64>,
    /// Per beat and student: scheduled true instant minus the server's instant for the beat.
    pub onset_vs_server_ms: Vec<f64>,
    /// Beats (per student) checked for lateness.
    pub beats_checked: u64,
    /// Of those, scheduled after their instant.
    pub beats_late: u64,
    /// Beats some classmate scheduled but this student never did.
    pub beats_missing: u64,
    /// Note deliveries: arrival minus the sender's play instant.
    pub fanout_ms: Vec<f64>,
    /// Per note: latest minus earliest true playout instant across its receivers.
    pub playout_spread_ms: Vec<f64>,
    /// Notes played.
    pub notes_sent: u64,
    /// Deliveries expected (notes times classmates) and missing.
    pub deliveries_expected: u64,
    /// Deliveries not played: never arrived, or arrived after their playout instant (which
    /// the client drops rather than play out of sync).
    pub deliveries_missing: u64,
    /// Of those, the ones that arrived too late to play (the clients' own count).
    pub deliveries_late: u64,
    /// When the measured window (beats running) began and ended, host monotonic ns.
    pub window: (u64, u64),
    /// With [`ClassSpec::beat_log`]: every room's beats checked, in no order.
    #[serde(default)]
    pub beat_log: Vec<BeatLog>,
    /// With [`ClassSpec::reflect_every_ms`]: every reflection sent and what became of it.
    #[serde(default)]
    pub reflections: Vec<ReflectionLog>,
}

/// One room's beat as its students scheduled it.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize)]
pub struct BeatLog {
    /// The server's instant for the beat, host monotonic ns.
    pub at: u64,
    /// Latest minus earliest true instant its students scheduled it, ms (0 with one student).
    pub spread_ms: f64,
    /// Students who scheduled it.
    pub checked: u32,
    /// Of those, scheduled after its instant.
    pub late: u32,
    /// Students of the room who never scheduled it.
    pub missing: u32,
}

/// One reflection a student sent.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ReflectionLog {
    /// Its text (unique in a run).
    pub text: String,
    /// When it was sent, host monotonic ns.
    pub sent: u64,
    /// When the server acknowledged it as stored, host monotonic ns.
    pub acknowledged: Option<u64>,
    /// Why it was refused (the error as the client reports it).
    pub error: Option<String>,
}

/// One student's session and clock.
struct Student {
    room: usize,
    client: Arc<Client>,
    clock: InjectedClock,
    started: Instant,
    welcomed: Instant,
    /// Clock error samples from the welcome on: (host ns, estimate minus truth in ns).
    samples: Arc<Mutex<Vec<(u64, i64)>>>,
}

/// A note as its sender played it and its classmates heard it.
#[derive(Default)]
struct NoteRecord {
    sent: Option<u64>,
    room: usize,
    /// (arrival, true playout instant), host monotonic ns.
    heard: Vec<(u64, u64)>,
}

/// Notes by (room, sender's member id, sequence number): member ids are per room.
type Notes = Arc<Mutex<HashMap<(usize, u64, u32), NoteRecord>>>;

/// Every reflection sent, updated when its answer comes.
type Reflections = Arc<Mutex<Vec<ReflectionLog>>>;

/// What the students of a run share.
struct Shared {
    notes: Notes,
    reflections: Reflections,
    /// Everyone waits here before the notes in flight are given time to arrive.
    barrier: Arc<Barrier>,
}

/// How many tasks the helper's runtime runs between looks at its sockets and timers
/// (`tokio::runtime::Builder::event_interval`; tokio's default is 61): one, a look after every
/// task.
///
/// The helper plays a whole class in one process, every student's endpoint and tasks on two
/// threads, where a class has a device each. A student stamps a clock-sync reply when its task
/// runs (`t3`), so a reply that waits in its socket while the threads work through other
/// students' tasks reads as a slower way back, and biases that exchange by half the wait.
/// While thirty students burst their first exchanges at once, in six runs with each setting,
/// the exchanges' median round trip was 165-355 µs with 61 tasks between looks and 148-232 µs
/// with one, and a sample's median error 21-75 µs against 20-41 µs (BENCHMARKS.md, issue 15's
/// eighteenth round). A device of its own looks as soon as its one student's reply arrives, as
/// do the peers' clients in Node.js, whose event loop polls its sockets on every turn.
const STUDENTS_EVENT_INTERVAL: u32 = 1;

/// Runs the helper: reads the spec from `spec_path`, writes the output as JSON to stdout.
pub fn run_helper(spec_path: &std::path::Path) -> Result<()> {
    let spec: ClassSpec = serde_json::from_slice(&std::fs::read(spec_path).context("reading the class spec")?)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .event_interval(STUDENTS_EVENT_INTERVAL)
        .enable_all()
        .build()?;
    let output = runtime.block_on(run(spec))?;
    println!("{}", serde_json::to_string(&output)?);
    Ok(())
}

/// Certificate hashes from hex.
pub fn decode_hashes(hex_hashes: &[String]) -> Result<Vec<[u8; 32]>> {
    hex_hashes
        .iter()
        .map(|h| {
            let bytes = hex::decode(h)?;
            bytes.try_into().map_err(|_| anyhow::anyhow!("a certificate hash is not 32 bytes"))
        })
        .collect()
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

async fn run(spec: ClassSpec) -> Result<ClassOutput> {
    let host = HostClock::new();
    let hashes = decode_hashes(&spec.cert_hashes)?;
    let mut rng = Rng::new(spec.seed);
    let settings =
        RoomSettings { name: Name::truncating("Bench"), tempo: MicroBpm::from_bpm(spec.bpm), beats_per_bar: 4 };
    // Teachers create their rooms first, one after another (not what is measured).
    let mut teachers = Vec::new();
    for room in &spec.rooms {
        let mut options = ConnectOptions::create(spec.url.clone(), room.teacher_token.clone(), settings.clone());
        options.cert_hashes.clone_from(&hashes);
        options.bind_address = room.teacher_bind;
        options.report_interval = None;
        let teacher = Client::connect(options).await.context("a teacher creating a room")?;
        teachers.push(teacher);
    }
    let codes: Vec<String> = teachers.iter().map(|t| t.welcome().room.code.to_string()).collect();

    // The whole class joins at once (bounded by `concurrency` handshakes in flight).
    let limit = Arc::new(Semaphore::new(spec.concurrency.max(1)));
    let (stop_tx, stop) = tokio::sync::watch::channel(false);
    let (server_zero, sample_every) = (spec.server_zero, Duration::from_millis(spec.sample_ms));
    // The injected clocks count from the moment the storm begins.
    let storm_began = Instant::now();
    let mut joins = tokio::task::JoinSet::new();
    let mut output = ClassOutput::default();
    for (r, room) in spec.rooms.iter().enumerate() {
        for student in &room.students {
            output.students += 1;
            let offset = ((rng.uniform() * 2.0 - 1.0) * spec.max_offset_ms * 1e6) as i64;
            let drift = (rng.uniform() * 2.0 - 1.0) * spec.max_drift_ppm;
            let clock = InjectedClock::new(storm_began, offset, drift);
            let mut options = ConnectOptions::new(spec.url.clone(), student.token.clone(), &codes[r]);
            options.cert_hashes.clone_from(&hashes);
            options.bind_address = student.bind;
            options.handshake_timeout = Duration::from_secs(30);
            let limit = limit.clone();
            let stop = stop.clone();
            let wait_sync = !spec.hold;
            joins.spawn(async move {
                let _permit = limit.acquire_owned().await.map_err(|e| e.to_string())?;
                let started = Instant::now();
                let client = Client::connect_with_clock(options, Arc::new(clock)).await.map_err(|e| e.to_string())?;
                let welcomed = Instant::now();
                let client = Arc::new(client);
                let samples: Arc<Mutex<Vec<(u64, i64)>>> = Arc::default();
                if wait_sync {
                    let sampler =
                        sample_errors(client.clone(), clock, host, server_zero, sample_every, samples.clone(), stop);
                    tokio::spawn(sampler);
                }
                let synced = if wait_sync {
                    client.wait_synced(Duration::from_secs(30)).await.map_err(|e| e.to_string())?;
                    Some(Instant::now())
                } else {
                    None
                };
                Ok::<_, String>((Student { room: r, client, clock, started, welcomed, samples }, synced))
            });
        }
    }
    let mut students = Vec::new();
    let mut last = storm_began;
    // A bar (or, off a terminal, a line every 10 s) while a big class joins.
    let progress = (output.students > 100).then(|| crate::report::Progress::new(output.students as u64, "joining"));
    let deadline = tokio::time::Instant::from_std(storm_began + spec.join_deadline);
    loop {
        let joined = match tokio::time::timeout_at(deadline, joins.join_next()).await {
            Ok(Some(joined)) => joined,
            Ok(None) => break,
            Err(_) => {
                let left = joins.len();
                joins.abort_all();
                // One line for all of them: `joined` against `students` says how many.
                output.join_errors.push(format!(
                    "{left} sessions still joining when the join deadline ({:?}) passed",
                    spec.join_deadline
                ));
                if let Some(progress) = &progress {
                    progress.set_message(&format!("join deadline passed: {left} given up"));
                }
                break;
            }
        };
        match joined? {
            Ok((student, synced)) => {
                output.welcome_ms.push(ms(student.welcomed - student.started));
                if let Some(synced) = synced {
                    output.synced_ms.push(ms(synced - student.started));
                }
                last = last.max(synced.unwrap_or(student.welcomed));
                students.push(student);
            }
            Err(e) => output.join_errors.push(e),
        }
        if let Some(progress) = &progress {
            progress.inc(1);
            if !output.join_errors.is_empty() {
                progress.set_message(&format!("{} failed", output.join_errors.len()));
            }
        }
    }
    if let Some(progress) = &progress {
        progress.finish();
    }
    output.joined = students.len();
    output.all_joined_ms = ms(last - storm_began);

    // Every teacher starts the beat (it takes effect at a bar line after the lead).
    for teacher in &teachers {
        teacher.change(Change::Start { count_in_bars: 0 }).await.context("starting the beat")?;
        if spec.reflect_every_ms > 0 {
            teacher.set_prompt("How did keeping the beat feel today?").await.context("asking a prompt")?;
        }
    }
    if spec.hold {
        // Beats flow to every room while the parent measures.
        println!("held {}", students.len());
        // Until the parent closes stdin: it measures the server meanwhile.
        let _ =
            tokio::task::spawn_blocking(|| std::io::Read::read_to_end(&mut std::io::stdin(), &mut Vec::new())).await;
        return Ok(output);
    }

    let began = Instant::now();
    // The window ends after `seconds`, or when the parent closes stdin.
    let (end_tx, ended) = tokio::sync::watch::channel(false);
    let ender = if spec.until_stdin_closes {
        println!("playing {}", codes.join(" "));
        tokio::task::spawn_blocking(move || {
            let _ = std::io::Read::read_to_end(&mut std::io::stdin(), &mut Vec::new());
            let _ = end_tx.send(true);
            Instant::now()
        })
    } else {
        let seconds = Duration::from_secs_f64(spec.seconds);
        tokio::spawn(async move {
            tokio::time::sleep(seconds).await;
            let _ = end_tx.send(true);
            Instant::now()
        })
    };
    let notes: Notes = Arc::default();
    let reflections: Reflections = Arc::default();
    let students = Arc::new(students);
    let barrier = Arc::new(Barrier::new(students.len()));
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..students.len() {
        let phase = rng.uniform();
        let shared = Shared { notes: notes.clone(), reflections: reflections.clone(), barrier: barrier.clone() };
        tasks.spawn(student_loop(students.clone(), i, spec.clone(), host, shared, phase, ended.clone()));
    }
    let mut per_student = Vec::new();
    while let Some(done) = tasks.join_next().await {
        per_student.push(done??);
    }
    let _ = stop_tx.send(true);
    let end = ender.await?;
    output.window = (host.monotonic_of(began), host.monotonic_of(end));
    output.reflections = std::mem::take(&mut *reflections.lock().unwrap_or_else(std::sync::PoisonError::into_inner));
    reduce(&mut output, &spec, &students, per_student, &notes, host);
    drop(teachers);
    Ok(output)
}

/// Samples `client`'s clock error every `every` from now until `stop`.
async fn sample_errors(
    client: Arc<Client>,
    clock: InjectedClock,
    host: HostClock,
    server_zero: u64,
    every: Duration,
    samples: Arc<Mutex<Vec<(u64, i64)>>>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        let now = Instant::now();
        let t = host.monotonic_of(now);
        if let Some(estimate) = client.server_time_at(clock.reading_at(now)) {
            let truth = t.saturating_sub(server_zero);
            let error = estimate.0 as i64 - truth as i64;
            samples.lock().unwrap_or_else(std::sync::PoisonError::into_inner).push((t, error));
        }
    }
}

/// One student's scheduling of one beat: (student, decided, true instant, server instant).
type BeatSeen = (usize, u64, u64, u64);

/// What one student recorded.
#[derive(Default)]
struct Recorded {
    index: usize,
    /// beat index -> (decided, true instant, server instant), host ns.
    beats: HashMap<i64, (u64, u64, u64)>,
}

async fn student_loop(
    students: Arc<Vec<Student>>,
    i: usize,
    spec: ClassSpec,
    host: HostClock,
    shared: Shared,
    phase: f64,
    ended: tokio::sync::watch::Receiver<bool>,
) -> Result<Recorded> {
    let Shared { notes, reflections, barrier } = shared;
    let student = &students[i];
    let client = &student.client;
    let mut recorded = Recorded { index: i, ..Recorded::default() };
    let began = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_millis(spec.tick_ms));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let note_every = (spec.notes_per_second > 0.0).then(|| Duration::from_secs_f64(1.0 / spec.notes_per_second));
    let mut next_note = note_every.map(|every| began + every.mul_f64(phase));
    let reflect_every = (spec.reflect_every_ms > 0).then(|| Duration::from_millis(spec.reflect_every_ms));
    let mut next_reflection = reflect_every.map(|every| began + every.mul_f64(phase));
    let mut written = 0_u32;
    let mut last_scheduled: Option<i64> = None;
    let member = client.member_id();
    let hear = {
        let notes = notes.clone();
        let students = students.clone();
        tokio::spawn(async move {
            let student = &students[i];
            while let Some(heard) = student.client.next_note().await {
                let arrival = host.now();
                let playout = host.monotonic_of(student.clock.instant_at(heard.local_at));
                let mut notes = notes.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                let record = notes.entry((student.room, heard.from, heard.note.seq)).or_default();
                record.room = student.room;
                record.heard.push((arrival, playout));
            }
        })
    };
    while !*ended.borrow() {
        tick.tick().await;
        let now = Instant::now();
        // The scheduler: every beat up to the lookahead, each once, from the one after the
        // last scheduled (so a beat that fell into the past while nothing arrived is late).
        if let (Some(timeline), Some(server_now)) = (client.timeline(), client.server_now()) {
            let horizon = ServerNanos(server_now.0 + spec.lookahead_ms * 1_000_000);
            let from = match last_scheduled {
                Some(b) => timeline.time_of(b + 1).unwrap_or(horizon),
                None => server_now,
            };
            let decided = host.now();
            for beat in timeline.beats_in(from, horizon) {
                if last_scheduled.is_some_and(|b| beat.index <= b) {
                    continue;
                }
                if let Some(local) = client.local_time_of_beat(beat.index) {
                    let instant = host.monotonic_of(student.clock.instant_at(local));
                    recorded.beats.insert(beat.index, (decided, instant, spec.server_zero + beat.at.0));
                    last_scheduled = Some(beat.index);
                }
            }
        }
        if let (Some(at), Some(every)) = (next_note, note_every)
            && now >= at
        {
            next_note = Some(at + every);
            let sent = host.now();
            if let Ok(note) = client.play_note(60 + (i % 24) as u8, 100, 0) {
                let mut notes = notes.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                let record = notes.entry((student.room, member, note.seq)).or_default();
                record.sent = Some(sent);
                record.room = student.room;
            }
        }
        if let (Some(at), Some(every), Some(prompt)) = (next_reflection, reflect_every, client.prompt())
            && now >= at
        {
            next_reflection = Some(at + every);
            written += 1;
            let text = reflection_text(i, written, spec.reflection_chars);
            // Its own task: an answer waits for the database, and the scheduler must not.
            tokio::spawn(reflect(client.clone(), prompt.id, text, host, reflections.clone()));
        }
    }
    // Notes still in flight get their playout delay to arrive, then everyone stops.
    barrier.wait().await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    hear.abort();
    Ok(recorded)
}

/// A reflection's text: unique in a run (student and count), padded to `chars`.
fn reflection_text(student: usize, n: u32, chars: usize) -> String {
    let mut text = format!("bench reflection s{student} n{n}");
    let chars = chars.min(downbeat_protocol::MAX_REFLECTION_LEN);
    while text.len() < chars {
        text.push(if text.len() % 7 == 0 { ' ' } else { 'a' });
    }
    text
}

/// Sends one reflection and records what became of it.
async fn reflect(client: Arc<Client>, prompt: u32, text: String, host: HostClock, reflections: Reflections) {
    let index = {
        let mut all = reflections.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        all.push(ReflectionLog { text: text.clone(), sent: host.now(), ..ReflectionLog::default() });
        all.len() - 1
    };
    let result = client.reflect(rand::random(), prompt, None, Some(&text)).await;
    let answered = host.now();
    let mut all = reflections.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    match result {
        Ok(()) => all[index].acknowledged = Some(answered),
        Err(e) => all[index].error = Some(e.to_string()),
    }
}

fn reduce(
    out: &mut ClassOutput,
    spec: &ClassSpec,
    students: &[Student],
    per_student: Vec<Recorded>,
    notes: &Notes,
    host: HostClock,
) {
    let to_ms = |ns: i64| ns as f64 / 1e6;
    // Clock error and convergence.
    for student in students {
        let errors = student.samples.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone();
        let welcomed = host.monotonic_of(student.welcomed);
        let settled = welcomed + spec.settle_ms * 1_000_000;
        let after: Vec<f64> = errors.iter().filter(|&&(t, _)| t >= settled).map(|&(_, e)| to_ms(e)).collect();
        out.offset_error_ms.extend(after.iter().map(|e| e.abs()));
        if !after.is_empty() {
            out.offset_bias_ms.push(after.iter().sum::<f64>() / after.len() as f64);
        }
        let last_bad = errors.iter().rposition(|&(_, e)| e.unsigned_abs() > 1_000_000);
        let converged = match last_bad {
            None => errors.first().map(|&(t, _)| t),
            Some(k) => errors.get(k + 1).map(|&(t, _)| t),
        };
        out.converged_s.push(converged.map(|t| t.saturating_sub(welcomed) as f64 / 1e9));
    }
    // Beats: per room and index, the instants of its students.
    let mut by_beat: HashMap<(usize, i64), Vec<BeatSeen>> = HashMap::new();
    for r in &per_student {
        let room = students[r.index].room;
        for (&index, &(decided, instant, server)) in &r.beats {
            by_beat.entry((room, index)).or_default().push((r.index, decided, instant, server));
        }
    }
    let per_room: HashMap<usize, usize> = students.iter().fold(HashMap::new(), |mut m, s| {
        *m.entry(s.room).or_default() += 1;
        m
    });
    for ((room, _), entries) in &by_beat {
        // Only beats that sound inside the window and whose lookahead began in it.
        let server = entries[0].3;
        if server < out.window.0 + spec.lookahead_ms * 1_000_000 || server > out.window.1 {
            continue;
        }
        out.beats_checked += entries.len() as u64;
        out.beats_late += entries.iter().filter(|e| e.2 < e.1).count() as u64;
        out.beats_missing += (per_room[room] - entries.len()) as u64;
        let lo = entries.iter().map(|e| e.2).min().unwrap_or(0);
        let hi = entries.iter().map(|e| e.2).max().unwrap_or(0);
        if entries.len() >= 2 {
            out.onset_spread_ms.push(to_ms((hi - lo) as i64));
        }
        out.onset_vs_server_ms.extend(entries.iter().map(|e| to_ms(e.2 as i64 - e.3 as i64)));
        if spec.beat_log {
            out.beat_log.push(BeatLog {
                at: server,
                spread_ms: to_ms((hi - lo) as i64),
                checked: entries.len() as u32,
                late: entries.iter().filter(|e| e.2 < e.1).count() as u32,
                missing: (per_room[room] - entries.len()) as u32,
            });
        }
    }
    // Notes.
    out.deliveries_late = students.iter().map(|s| s.client.stats().notes_late).sum();
    let notes = notes.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    for record in notes.values() {
        let Some(sent) = record.sent else { continue };
        out.notes_sent += 1;
        let classmates = per_room[&record.room].saturating_sub(1) as u64;
        out.deliveries_expected += classmates;
        out.deliveries_missing += classmates.saturating_sub(record.heard.len() as u64);
        out.fanout_ms.extend(record.heard.iter().map(|&(arrival, _)| to_ms(arrival as i64 - sent as i64)));
        if record.heard.len() >= 2 {
            let lo = record.heard.iter().map(|h| h.1).min().unwrap_or(0);
            let hi = record.heard.iter().map(|h| h.1).max().unwrap_or(0);
            out.playout_spread_ms.push(to_ms((hi - lo) as i64));
        }
    }
}
