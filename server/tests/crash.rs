//! Crash safety of reflections, end to end: the real `downbeat` binary is killed with SIGKILL
//! while ten students submit 1,000 reflections, then restarted on the same data directory and
//! database. Every student retries each reflection under the same 16-byte id until the server
//! acknowledges it, reconnecting to the restarted server (a new room, a new prompt) when the
//! first one dies. Afterwards the database must hold every acknowledged reflection exactly
//! once, with what was sent, and nothing else. Run on SQLite and on PostgreSQL.
//!
//! The kill catches both kinds of unanswered reflection, on purpose rather than by luck:
//!
//! - **Committed, acknowledgement lost.** Half the class reaches the first server through a
//!   UDP relay whose server-to-client direction the driver cuts. Their next reflections still
//!   arrive and are committed (the teacher's live feed says so), but no acknowledgement gets
//!   back; the kill comes after that, so their retries must not store them twice.
//! - **Sent, not committed.** Then the database is taken away (PostgreSQL refuses
//!   connections; SQLite's write lock is held elsewhere) and the kill is sent while a
//!   reflection of the other half, sent since, is in flight: the server could not have
//!   committed it, so it must not have acknowledged it either, and its retry must store it
//!   once. A server that acknowledged before committing would lose it here. (A direct
//!   student still waiting on a reflection sent before the outage sets it aside and sends
//!   its next one, retrying the first after the restart: otherwise the staging could wait on
//!   attempts that no database will answer before the kill.)
//!
//! Nothing here sleeps in place of a condition: the driver waits on the students' progress
//! and the teacher's feed, and students learn of the restarted server through a [`watch`]
//! channel the driver updates. The only timed waits are the students' pacing (they stay under
//! the per-session control rate limit) and the timeouts that turn a hang into a failure or a
//! retry.
#![cfg(unix)]

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::os::unix::process::ExitStatusExt as _;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail, ensure};
use downbeat_client::{Client, ClientError, ConnectOptions, Event};
use downbeat_protocol::{ErrorCode, MicroBpm, Name, RoomSettings};
use downbeat_server::Config;
use downbeat_server::auth::{Role, Tenants};
use downbeat_server::sel::store::Store;
use downbeat_tests::db::{Backend, TestDatabase};
use downbeat_tests::relay::Relay;
use tokio::io::{AsyncBufReadExt as _, AsyncRead, BufReader};
use tokio::process::Child;
use tokio::sync::watch;
use tokio::task::{JoinHandle, JoinSet};

/// Students submitting at once; the even-numbered half goes through the relay.
const STUDENTS: usize = 10;
/// Students whose acknowledgements the cut relay loses.
const RELAYED: usize = STUDENTS.div_ceil(2);
/// Reflections each student submits (10 x 100 = 1,000).
const PER_STUDENT: usize = 100;
/// Acknowledgements (all students together) after which the crash is staged.
const CRASH_AFTER: usize = 300;
/// The longest a restart may take, from spawning the process to an answer over HTTP.
const MAX_RESTART: Duration = Duration::from_secs(3);
/// Time between two attempts of one student. The server allows 10 control messages per
/// second per session (burst 20); a little slower keeps every session under the limit.
const PACE: Duration = Duration::from_millis(110);
/// How long a student waits for one acknowledgement before giving up on the session. Only a
/// hung session needs it: a closed one fails at once, and the kill ends every attempt in
/// flight. It must outlast the staged crash (the relayed students' unanswered attempts wait
/// from their send until the kill, through the database outage), or on a loaded machine an
/// attempt gives up first and is no longer counted as cut by the crash.
const REFLECT_TIMEOUT: Duration = Duration::from_secs(60);
/// How long joining a room (handshake, welcome, prompt) may take before it is retried.
const JOIN_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the server may take to print its banner.
const BANNER_TIMEOUT: Duration = Duration::from_secs(20);
/// The whole test's deadline, so that a hang fails with a message instead of running into
/// nextest's kill.
const TEST_DEADLINE: Duration = Duration::from_secs(120);
/// The demo tenant, whose secret is in the data directory.
const TENANT: &str = "demo";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite() -> Result<()> {
    crash_while_students_reflect(Backend::Sqlite).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres() -> Result<()> {
    crash_while_students_reflect(Backend::Postgres).await
}

/// The test, on one backend: start, reflect, stage the crash and kill -9, restart, finish,
/// then check the database row by row.
async fn crash_while_students_reflect(backend: Backend) -> Result<()> {
    let db = TestDatabase::new(backend).await;
    let data = tempfile::tempdir()?;
    // The demo tenant's secret is created here first; both server processes read the same
    // one, so these tokens stay valid across the restart.
    let tenants = Tenants::new(&Config { data_dir: data.path().to_path_buf(), ..Config::default() })?;

    let run = tokio::time::timeout(TEST_DEADLINE, run(data.path(), &db, &tenants))
        .await
        .context("the crash test did not finish in time")??;

    // Every acknowledged reflection is in the database exactly once, with what was sent, and
    // there is nothing else.
    let store = Store::open(db.url()).await.context("opening the store after the crash")?;
    let mut rows_total = 0;
    let mut exports = Vec::new();
    for student in &run.students {
        let export = store.export_student(TENANT, &student.subject).await?;
        let mut count: HashMap<&str, usize> = HashMap::new();
        for row in &export.reflections {
            *count.entry(row.id.as_str()).or_default() += 1;
        }
        for (id, ack) in &student.acked {
            assert_eq!(count.get(id.as_str()), Some(&1), "{}: reflection {id} is stored once", student.subject);
            let row = export.reflections.iter().find(|r| &r.id == id).context("the row")?;
            assert_eq!(row.text.as_deref(), Some(ack.text.as_str()), "{}: {id} holds what was sent", student.subject);
            assert_eq!(row.mood, Some(i64::from(ack.mood)), "{}: {id} holds its mood", student.subject);
        }
        let stored: HashSet<&str> = count.keys().copied().collect();
        assert_eq!(export.reflections.len(), stored.len(), "{}: no duplicate rows", student.subject);
        let acked: HashSet<&str> = student.acked.keys().map(String::as_str).collect();
        assert_eq!(stored, acked, "{}: the stored ids are exactly the acknowledged ones", student.subject);
        rows_total += export.reflections.len();
        exports.push(export);
    }
    store.close().await;
    let acked_total: usize = run.students.iter().map(|s| s.acked.len()).sum();
    assert_eq!(acked_total, STUDENTS * PER_STUDENT, "every reflection was acknowledged");
    assert_eq!(rows_total, acked_total, "as many rows as acknowledged reflections");

    // Which attempts cut by the kill the first server had committed: their rows belong to
    // its room session (the first content wins), the one of the reflections it acknowledged.
    let first_session: HashSet<&str> = run
        .students
        .iter()
        .zip(&exports)
        .flat_map(|(student, export)| {
            export.reflections.iter().filter(|r| student.acked.get(&r.id).is_some_and(|a| a.generation == 1))
        })
        .map(|r| r.room_session_id.as_str())
        .collect();
    assert_eq!(first_session.len(), 1, "one room on the first server");
    // Attempts cut by the kill, by path, and how many of them the first server had committed.
    let (mut relayed_cut, mut relayed_committed) = (0, 0);
    let (mut direct_cut, mut direct_committed, mut direct_cut_db_down) = (0, 0, 0);
    for (student, export) in run.students.iter().zip(&exports) {
        for cut in &student.cut_by_crash {
            let row = export.reflections.iter().find(|r| r.id == cut.id).context("a cut reflection's row")?;
            let committed = usize::from(first_session.contains(row.room_session_id.as_str()));
            if student.relayed {
                (relayed_cut, relayed_committed) = (relayed_cut + 1, relayed_committed + committed);
            } else {
                (direct_cut, direct_committed) = (direct_cut + 1, direct_committed + committed);
                if cut.db_down {
                    direct_cut_db_down += 1;
                    assert_eq!(
                        committed, 0,
                        "{}: {} was committed while the database was down",
                        student.subject, cut.id
                    );
                }
            }
        }
    }
    // The feed told of these commits, whose acknowledgements were lost.
    assert!(
        relayed_committed >= run.at_kill.committed_unanswered && run.at_kill.committed_unanswered >= RELAYED,
        "committed reflections whose acknowledgement was lost: {relayed_committed} in the database, {} in the feed",
        run.at_kill.committed_unanswered
    );
    assert!(direct_cut_db_down >= 1, "a reflection sent while the database was down was in flight at the kill");

    println!(
        "{backend:?}: {acked_total} reflections acknowledged and stored once each in {:?}; \
         first start {:?}, restart {:?} (kill to first acknowledgement after it {:?}); \
         killed after {} acknowledgements; attempts cut by the kill: {relayed_cut} relayed \
         ({relayed_committed} committed by the first server, acknowledgement lost), \
         {direct_cut} direct ({direct_cut_db_down} sent with the database down, \
         {direct_committed} committed); retries {:?}",
        run.elapsed, run.first_start, run.restart, run.recovery, run.at_kill.acked, run.retries,
    );
    db.drop_now().await;
    Ok(())
}

/// What [`run`] saw.
#[derive(Debug)]
struct Run {
    students: Vec<StudentReport>,
    /// The students' progress when the kill was sent.
    at_kill: Progress,
    /// Spawn to HTTP ready, first start and restart.
    first_start: Duration,
    restart: Duration,
    /// From the kill to the first acknowledgement by the restarted server.
    recovery: Duration,
    /// First spawn to the last acknowledgement.
    elapsed: Duration,
    /// Retried attempts by reason, all students together.
    retries: BTreeMap<&'static str, u64>,
}

/// Starts the server, sets the class going, stages the crash and kills the server, restarts
/// it, and waits for every student to finish. Leaves the server killed.
async fn run(data_dir: &Path, db: &TestDatabase, tenants: &Tenants) -> Result<Run> {
    let database_url = db.url();
    let hour = Duration::from_secs(3600);
    let teacher_token = tenants.mint(TENANT, Role::Teacher, "t-1", "Teacher", hour)?;
    let began = Instant::now();
    let (mut server, first_start) = ServerProcess::start(data_dir, database_url).await?;
    let (progress_tx, mut progress) = watch::channel(Progress::default());
    let progress_tx = Arc::new(progress_tx);
    let teacher = open_room(&server, &teacher_token, Some(progress_tx.clone())).await?;
    let relay = Relay::start(SocketAddr::from(([127, 0, 0, 1], server.wt_port))).await?;

    let (target_tx, target_rx) = watch::channel(Some(server.target(1, &teacher, Some(&relay))));
    let retries = Retries::default();
    let mut students = JoinSet::new();
    for i in 0..STUDENTS {
        let subject = format!("s-{i}");
        let student = Student {
            token: tenants.mint(TENANT, Role::Student, &subject, &format!("Student {i}"), hour)?,
            subject,
            relayed: i % 2 == 0,
            target: target_rx.clone(),
            progress: progress_tx.clone(),
            retries: retries.clone(),
        };
        students.spawn(student.run());
    }

    // Stage the crash. First cut the relayed students' way back at a moment when none of them
    // waits for an answer, so that each reflection they send from now on is answered into the
    // void. The check and the cut happen under the progress lock, which every student takes
    // before sending, so no reflection slips in between.
    loop {
        progress.wait_for(|p| p.acked >= CRASH_AFTER && p.relayed_in_flight.is_empty()).await?;
        let cut = progress_tx.send_if_modified(|p| {
            p.downlink_cut = p.relayed_in_flight.is_empty();
            if p.downlink_cut {
                relay.cut_downlink();
            }
            p.downlink_cut
        });
        if cut {
            break;
        }
    }
    // Each sends one more reflection, which the server commits (the teacher's feed says so)
    // and acknowledges into the void.
    progress.wait_for(|p| p.committed_unanswered >= RELAYED).await?;
    // Then the database goes away, and the server is killed while a direct student's
    // reflection sent since is in flight: one the server cannot have committed.
    let outage = db.make_unavailable().await;
    progress_tx.send_modify(|p| p.db_down = true);
    let at_kill = progress.wait_for(|p| p.direct_in_flight_db_down >= 1).await?.clone();
    server.kill9().await?;
    let killed = Instant::now();
    target_tx.send_replace(None);
    drop((teacher, relay));
    outage.end().await;

    // The same data directory (certificate, token secret) and the same database.
    let (mut server, restart) = ServerProcess::start(data_dir, database_url).await?;
    assert!(restart < MAX_RESTART, "restarting took {restart:?}");
    let teacher = open_room(&server, &teacher_token, None).await?;
    target_tx.send_replace(Some(server.target(2, &teacher, None)));
    let acked_before_restart = progress.borrow().acked;
    progress.wait_for(|p| p.acked > acked_before_restart).await?;
    let recovery = killed.elapsed();

    let mut reports = Vec::new();
    while let Some(report) = students.join_next().await {
        reports.push(report??);
    }
    let elapsed = began.elapsed();
    drop(teacher);
    // Stopped the hard way too: acknowledged rows must not depend on a clean shutdown.
    server.kill9().await?;
    reports.sort_by(|a, b| a.subject.cmp(&b.subject));
    let retries = retries.0.lock().expect("retries lock").clone();
    Ok(Run { students: reports, at_kill, first_start, restart, recovery, elapsed, retries })
}

/// A teacher's session in a fresh room with a reflection prompt set; students join by its
/// code. Dropping it closes the session.
struct Room {
    code: String,
    /// Reads the teacher's events (and owns the client).
    feed: JoinHandle<()>,
}

impl Drop for Room {
    fn drop(&mut self) {
        self.feed.abort();
    }
}

/// Creates a room over WebTransport as the teacher and asks the class a question. With
/// `progress`, the teacher's live feed of committed reflections is counted into it.
async fn open_room(
    server: &ServerProcess,
    teacher_token: &str,
    progress: Option<Arc<watch::Sender<Progress>>>,
) -> Result<Room> {
    let settings =
        RoomSettings { name: Name::truncating("Crash test"), tempo: MicroBpm::from_bpm(100), beats_per_bar: 4 };
    let mut options = ConnectOptions::create(server.wt_url(), teacher_token, settings);
    options.cert_hashes = server.hashes.clone();
    options.report_interval = None;
    let client = Client::connect(options).await.context("the teacher creating a room")?;
    let code = client.welcome().room.code.to_string();
    client.set_prompt("How did the rhythm feel today?").await.context("setting the prompt")?;
    let feed = tokio::spawn(async move {
        while let Some(event) = client.next_event().await {
            if let (Event::Reflection(notice), Some(progress)) = (event, &progress) {
                // Committed while its relayed student waits for an answer that cannot come.
                progress.send_if_modified(|p| {
                    let unanswered = p.downlink_cut && p.relayed_in_flight.contains(&notice.id);
                    p.committed_unanswered += usize::from(unanswered);
                    unanswered
                });
            }
        }
    });
    Ok(Room { code, feed })
}

/// Where students reflect: one server process's room. `generation` counts server starts.
#[derive(Clone, Debug)]
struct Target {
    generation: u32,
    /// The server's WebTransport URL.
    direct: String,
    /// Where relayed students connect (the relay, or the server itself when there is none).
    relayed: String,
    hashes: Vec<[u8; 32]>,
    code: String,
}

/// The class's progress, which the driver waits on.
#[derive(Clone, Debug, Default)]
struct Progress {
    /// Reflections acknowledged.
    acked: usize,
    /// The database is down (from just after it went down until the end of the test).
    db_down: bool,
    /// Direct students' attempts sent while the database was down and not yet answered (nor
    /// given up).
    direct_in_flight_db_down: usize,
    /// Relayed students' reflections sent and not yet answered (nor given up).
    relayed_in_flight: HashSet<[u8; 16]>,
    /// The relayed students' way back is cut (with none of their reflections in flight).
    downlink_cut: bool,
    /// Relayed reflections sent after the cut that the teacher's feed reported committed.
    committed_unanswered: usize,
}

/// One acknowledged reflection.
#[derive(Debug)]
struct Acked {
    /// The server start that acknowledged it.
    generation: u32,
    mood: u8,
    text: String,
}

/// What one student did.
#[derive(Debug)]
struct StudentReport {
    subject: String,
    relayed: bool,
    /// Acknowledged reflections by id (hex, as the store keeps it).
    acked: BTreeMap<String, Acked>,
    /// Attempts in flight when the server was killed (then retried).
    cut_by_crash: Vec<Cut>,
}

/// An attempt the kill cut short.
#[derive(Debug)]
struct Cut {
    /// The reflection's id (hex).
    id: String,
    /// Sent while the database was down, so certainly not committed by the first server.
    db_down: bool,
}

/// Retried attempts by reason, shared by the students.
#[derive(Clone, Debug, Default)]
struct Retries(Arc<Mutex<BTreeMap<&'static str, u64>>>);

impl Retries {
    fn count(&self, reason: &'static str) {
        *self.0.lock().expect("retries lock").entry(reason).or_default() += 1;
    }
}

/// A student and what it shares with the driver.
struct Student {
    subject: String,
    token: String,
    /// Reaches the first server through the relay.
    relayed: bool,
    /// The server and room to reflect in; `None` while the server is down.
    target: watch::Receiver<Option<Target>>,
    progress: Arc<watch::Sender<Progress>>,
    retries: Retries,
}

/// One reflection a student submits, under one id across all its attempts.
struct Reflection {
    id: [u8; 16],
    mood: u8,
    text: String,
}

/// A student's session in the room of one server start.
struct Session {
    generation: u32,
    client: Client,
    prompt_id: u32,
}

/// How one attempt to reflect ended.
enum Attempt {
    Acked,
    /// The server this session was on is gone (the driver said so); whether the attempt was
    /// sent while the database was down.
    ServerGone {
        db_down: bool,
    },
    /// A direct student's attempt sent before the database went down, which cannot be
    /// answered before the restart: the student moves on to its next reflection (sent with the
    /// database down) and retries this one later.
    Parked,
    /// Retry on this session after the pause.
    Again(&'static str),
    /// Retry on a new session.
    Reconnect(&'static str),
}

impl Student {
    /// Submits [`PER_STUDENT`] reflections one after another, each under one random id kept
    /// across retries, until each is acknowledged. A reflection parked by the database outage
    /// goes to the back of the line and is retried after the others.
    async fn run(mut self) -> Result<StudentReport> {
        let mut acked = BTreeMap::new();
        let mut cut_by_crash = Vec::new();
        let mut session: Option<Session> = None;
        let mut pace = tokio::time::interval(PACE);
        pace.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut pending: VecDeque<Reflection> = (0..PER_STUDENT)
            .map(|n| Reflection {
                id: rand::random(),
                mood: u8::try_from(n % 5).expect("a mood below 5"),
                text: format!("{} reflection {n}", self.subject),
            })
            .collect();
        while let Some(reflection) = pending.pop_front() {
            let Reflection { id, mood, ref text } = reflection;
            let hex_id = hex::encode(id);
            loop {
                pace.tick().await;
                // A session on a server that was killed is dropped unused.
                let current = match session.take().filter(|s| self.current_generation() == Some(s.generation)) {
                    Some(current) => current,
                    None => match self.join().await? {
                        Ok(joined) => joined,
                        Err(reason) => {
                            self.retries.count(reason);
                            continue;
                        }
                    },
                };
                match self.attempt(&current, id, mood, text).await? {
                    Attempt::Acked => {
                        let generation = current.generation;
                        acked.insert(hex_id.clone(), Acked { generation, mood, text: text.clone() });
                        self.progress.send_modify(|p| p.acked += 1);
                        session = Some(current);
                        break;
                    }
                    Attempt::ServerGone { db_down } => {
                        self.retries.count("server killed");
                        cut_by_crash.push(Cut { id: hex_id.clone(), db_down });
                    }
                    Attempt::Parked => {
                        self.retries.count("parked by the database outage");
                        session = Some(current);
                        pending.push_back(reflection);
                        break;
                    }
                    Attempt::Again(reason) => {
                        self.retries.count(reason);
                        session = Some(current);
                    }
                    // Dropping the session closes it; the next attempt joins again.
                    Attempt::Reconnect(reason) => self.retries.count(reason),
                }
            }
        }
        Ok(StudentReport { subject: self.subject, relayed: self.relayed, acked, cut_by_crash })
    }

    /// The server start students are pointed at; `None` while the server is down.
    fn current_generation(&self) -> Option<u32> {
        self.target.borrow().as_ref().map(|t| t.generation)
    }

    /// Joins the room of the current server (waiting while it is down) and waits for its
    /// prompt. The inner error is a retryable failure's reason.
    async fn join(&mut self) -> Result<Result<Session, &'static str>> {
        let target = self.target.wait_for(Option::is_some).await?.clone().context("a target")?;
        let connect = async {
            let url = if self.relayed { &target.relayed } else { &target.direct };
            let mut options = ConnectOptions::new(url.clone(), self.token.clone(), &target.code);
            options.cert_hashes = target.hashes.clone();
            options.report_interval = None;
            options.handshake_timeout = JOIN_TIMEOUT;
            let client = Client::connect(options).await?;
            // The prompt follows the welcome at once when one is set, and one always is.
            while client.prompt().is_none() {
                if client.next_event().await.is_none() {
                    return Err(ClientError::Closed);
                }
            }
            let prompt_id = client.prompt().map(|p| p.id).ok_or(ClientError::Closed)?;
            Ok(Session { generation: target.generation, client, prompt_id })
        };
        let gone = server_gone(self.target.clone(), target.generation);
        tokio::select! {
            joined = tokio::time::timeout(JOIN_TIMEOUT, connect) => match joined {
                Ok(Ok(session)) => Ok(Ok(session)),
                Ok(Err(ClientError::Refused { code, message })) if !retryable(code) => {
                    bail!("{}: joining was refused: {code}: {message}", self.subject)
                }
                Ok(Err(_)) => Ok(Err("join failed")),
                Err(_) => Ok(Err("join timed out")),
            },
            () = gone => Ok(Err("server killed while joining")),
        }
    }

    /// Sends the reflection once on `session` and waits for its acknowledgement, unless the
    /// driver says the server is gone first. Counted in flight meanwhile.
    async fn attempt(&self, session: &Session, id: [u8; 16], mood: u8, text: &str) -> Result<Attempt> {
        let reflect = session.client.reflect(id, session.prompt_id, Some(mood), Some(text));
        let gone = server_gone(self.target.clone(), session.generation);
        let relayed = self.relayed;
        let mut db_down = false;
        self.progress.send_modify(|p| {
            db_down = p.db_down;
            if relayed {
                p.relayed_in_flight.insert(id);
            } else if db_down {
                p.direct_in_flight_db_down += 1;
            }
        });
        // A direct attempt sent before the outage waits for a database that comes back only
        // after the kill; the staging needs this student's next reflection in flight instead.
        let parks = !relayed && !db_down;
        let mut outage = self.progress.subscribe();
        let db_went_down = async move {
            if !parks || outage.wait_for(|p| p.db_down).await.is_err() {
                std::future::pending::<()>().await;
            }
        };
        let outcome = tokio::select! {
            // The request goes out on the first poll, and an answer that arrived is taken even
            // if the server died just after sending it.
            biased;
            outcome = tokio::time::timeout(REFLECT_TIMEOUT, reflect) => Some(Some(outcome)),
            () = gone => None,
            () = db_went_down => Some(None),
        };
        self.progress.send_modify(|p| {
            if relayed {
                p.relayed_in_flight.remove(&id);
            } else if db_down {
                p.direct_in_flight_db_down -= 1;
            }
        });
        let Some(outcome) = outcome else { return Ok(Attempt::ServerGone { db_down }) };
        let Some(outcome) = outcome else { return Ok(Attempt::Parked) };
        Ok(match outcome {
            Ok(Ok(())) => Attempt::Acked,
            Ok(Err(ClientError::Refused { code: ErrorCode::StoreUnavailable, .. })) => {
                Attempt::Again("store_unavailable")
            }
            Ok(Err(ClientError::Refused { code: ErrorCode::RateLimited, .. })) => Attempt::Again("rate_limited"),
            Ok(Err(ClientError::Refused { code, message })) => {
                bail!("{}: a reflection was refused: {code}: {message}", self.subject)
            }
            Ok(Err(ClientError::Protocol(e))) => bail!("{}: protocol error: {e}", self.subject),
            Ok(Err(_)) => Attempt::Reconnect("session lost"),
            Err(_) => Attempt::Reconnect("timed out"),
        })
    }
}

/// Whether a refused join is worth trying again (the server is busy or limiting), as opposed
/// to a mistake of the test.
fn retryable(code: ErrorCode) -> bool {
    matches!(code, ErrorCode::RateLimited | ErrorCode::ServerBusy | ErrorCode::TooManySessions)
}

/// Resolves once the driver no longer points at server start `generation` (it was killed).
async fn server_gone(mut target: watch::Receiver<Option<Target>>, generation: u32) {
    let moved_on = target.wait_for(|t| t.as_ref().map(|t| t.generation) != Some(generation)).await.is_ok();
    if !moved_on {
        // The driver is gone (the test is failing): never resolve, let the timeouts act.
        std::future::pending::<()>().await;
    }
}

/// The `downbeat` binary running as a child process, with what its banner said.
struct ServerProcess {
    child: Child,
    /// The WebTransport port (UDP).
    wt_port: u16,
    /// The pinned certificate hashes (current and next).
    hashes: Vec<[u8; 32]>,
}

impl ServerProcess {
    /// Spawns the server on free loopback ports and waits until it answers over HTTP; also
    /// returns how long that took.
    async fn start(data_dir: &Path, database_url: &str) -> Result<(Self, Duration)> {
        let began = Instant::now();
        // Settings the environment might carry do not reach the server.
        let mut command = downbeat_tests::server_command(env!("CARGO_BIN_EXE_downbeat"));
        command
            .arg("--data-dir")
            .arg(data_dir)
            .args(["--http-addr", "127.0.0.1:0", "--wt-port", "0", "--database-url", database_url])
            // Each student writes all its reflections to one prompt.
            .args(["--max-reflections-per-prompt", &PER_STUDENT.to_string()])
            .env("RUST_LOG", "warn");
        let mut child = command.spawn().context("spawning the server")?;
        let pid = child.id().unwrap_or_default();
        let stdout = child.stdout.take().context("stdout")?;
        let stderr = child.stderr.take().context("stderr")?;
        tokio::spawn(forward(stderr, pid));
        let banner = tokio::time::timeout(BANNER_TIMEOUT, read_banner(stdout, pid))
            .await
            .context("waiting for the server's banner")??;
        let ping = format!("http://127.0.0.1:{}/api/ping", banner.http_port);
        let status = reqwest::get(&ping).await.context("pinging the server")?.status();
        ensure!(status.is_success(), "{ping} answered {status}");
        Ok((Self { child, wt_port: banner.wt_port, hashes: banner.hashes }, began.elapsed()))
    }

    /// `https://127.0.0.1:PORT/`.
    fn wt_url(&self) -> String {
        format!("https://127.0.0.1:{}/", self.wt_port)
    }

    /// Where students find this server's room (relayed students through `relay`, if any).
    fn target(&self, generation: u32, room: &Room, relay: Option<&Relay>) -> Target {
        let relayed = relay.map_or_else(|| self.wt_url(), |r| format!("https://127.0.0.1:{}/", r.addr().port()));
        Target { generation, direct: self.wt_url(), relayed, hashes: self.hashes.clone(), code: room.code.clone() }
    }

    /// Kills the process with SIGKILL (no chance to flush or say goodbye) and reaps it.
    async fn kill9(&mut self) -> Result<()> {
        self.child.start_kill().context("sending SIGKILL")?;
        let status = self.child.wait().await?;
        ensure!(status.signal() == Some(9), "the server ended with {status} instead of being killed");
        Ok(())
    }
}

/// What the startup banner says.
#[derive(Debug)]
struct Banner {
    http_port: u16,
    wt_port: u16,
    hashes: Vec<[u8; 32]>,
}

/// Reads the banner from the server's stdout up to its last line, then forwards the rest of
/// the output (log lines) to the test's output in the background, so the pipe never fills.
async fn read_banner(stdout: impl AsyncRead + Unpin + Send + 'static, pid: u32) -> Result<Banner> {
    let mut lines = BufReader::new(stdout).lines();
    let (mut http_port, mut wt_port, mut hashes) = (None, None, Vec::new());
    let port_of = |url: &str| -> Result<u16> {
        let port = url.trim_end_matches('/').rsplit(':').next().unwrap_or_default();
        port.parse().with_context(|| format!("the port of {url:?}"))
    };
    loop {
        let Some(line) = lines.next_line().await? else {
            bail!("the server's output ended before its banner did (see its stderr above)");
        };
        let line = line.trim();
        if let Some(rest) = line.strip_prefix("HTTP API:") {
            http_port = Some(port_of(rest.trim())?);
        } else if let Some(rest) = line.strip_prefix("WebTransport:") {
            let url = rest.split_whitespace().find(|w| w.starts_with("https://127.0.0.1:"));
            wt_port = Some(port_of(url.with_context(|| format!("a 127.0.0.1 URL in {line:?}"))?)?);
        } else if let Some(rest) = line.strip_prefix("Cert SHA-256:") {
            let hex_hash = rest.split_whitespace().next().context("a hash")?;
            let hash = hex::decode(hex_hash)?.try_into().map_err(|_| anyhow::anyhow!("{hex_hash} is not 32 bytes"))?;
            hashes.push(hash);
        } else if line.starts_with("Press Ctrl-C to stop.") {
            break;
        }
    }
    tokio::spawn(forward(lines.into_inner(), pid));
    ensure!(!hashes.is_empty(), "the banner named no certificate hash");
    Ok(Banner {
        http_port: http_port.context("the banner named no HTTP port")?,
        wt_port: wt_port.context("the banner named no WebTransport URL")?,
        hashes,
    })
}

/// Copies a child's output to the test's stderr, line by line, marked with its pid.
async fn forward(output: impl AsyncRead + Unpin, pid: u32) {
    let mut lines = BufReader::new(output).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        eprintln!("[downbeat {pid}] {line}");
    }
}
