//! Recordings end to end, over real sockets, on SQLite and on PostgreSQL: a class of 30 native
//! clients recorded through a tempo change holds every note it played once; the take's MIDI
//! file, read back by midly and by Python's mido, puts every note on the tick the shared
//! timeline gives it, in a track named by the part; a child's export holds their notes and
//! their deletion removes them (the take stays); retention purges takes; and what may not be
//! done is refused with a stable code.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use downbeat_client::{Client, ClientError, Event, InjectedClock, LocalClock};
use downbeat_engine::room::PLAYBACK_FROM;
use downbeat_engine::sim::Rng;
use downbeat_engine::timeline::Timeline;
use downbeat_protocol::{
    Assignment, BoundedVec, Change, ClientNanos, ControlOp, ErrorCode, MicroBpm, PartName, ServerNanos,
};
use downbeat_server::auth::Role;
use downbeat_server::config::TenantLimits;
use downbeat_server::sel::store::Store;
use downbeat_tests::db::{Backend, TestDatabase};
use downbeat_tests::{TestServer, events_until, nanos_between, on_both_backends, school};
use midly::{MetaMessage, MidiMessage, Smf, TrackEventKind};
use serde_json::{Value, json};
use std::time::Instant;

on_both_backends!(
    a_class_of_thirty_is_recorded_once_and_its_midi_file_keeps_the_shared_timeline,
    a_take_plays_back_at_one_instant_for_thirty_one_clients_and_stops_on_a_bar_for_all,
    what_may_not_be_done_with_recordings_is_refused_with_a_stable_code,
);

const SYNC: Duration = Duration::from_secs(10);
const TICKS: f64 = 480.0;
const NANOS_PER_BEAT_AT_ONE_MICRO_BPM: f64 = 6e16;

/// `GET path` as `token`; must answer `expect`.
async fn get(server: &TestServer, path: &str, token: &str, expect: u16) -> Result<Value> {
    let (status, body) = server.http("GET", path, Some(token), None).await?;
    ensure!(status == expect, "GET {path} answered {status}, not {expect}: {body}");
    Ok(body)
}

/// Waits until the client's clock reads `at`, then plays `midi`; returns its stamp.
async fn play_at(client: &Client, at: ClientNanos, midi: u8) -> Result<ServerNanos> {
    let now = client.clock().now();
    if at.0 > now.0 {
        tokio::time::sleep(Duration::from_nanos(at.0 - now.0)).await;
    }
    Ok(client.play_note(midi, 100, 0)?.played_at)
}

/// Where the shared timeline puts `at`, in ticks from beat `origin` (480 a beat).
fn timeline_tick(timeline: &Timeline, at: ServerNanos, origin: i64) -> f64 {
    let s = timeline.segment_at(at);
    let beats =
        s.start_beat as f64 + (at.0 as f64 - s.start.0 as f64) * f64::from(s.tempo.0) / NANOS_PER_BEAT_AT_ONE_MICRO_BPM;
    (beats - origin as f64) * TICKS
}

/// What a reader found in a MIDI file: per track its name and notes (tick, key), and the
/// tempo map (tick, microseconds a beat) and meters (tick, beats a bar).
#[derive(Debug, Default, PartialEq)]
struct Read {
    ticks_per_beat: u64,
    tracks: BTreeMap<String, Vec<(u64, u8)>>,
    tempos: Vec<(u64, u64)>,
    meters: Vec<(u64, u8)>,
}

fn read_with_midly(bytes: &[u8]) -> Result<Read> {
    let smf = Smf::parse(bytes).context("midly parses the file")?;
    ensure!(smf.header.format == midly::Format::Parallel, "format 1: {:?}", smf.header.format);
    let midly::Timing::Metrical(ppq) = smf.header.timing else { anyhow::bail!("metrical timing") };
    let mut read = Read { ticks_per_beat: u64::from(ppq.as_int()), ..Read::default() };
    for track in &smf.tracks {
        let (mut tick, mut name, mut notes) = (0_u64, String::new(), Vec::new());
        for event in track {
            tick += u64::from(event.delta.as_int());
            match event.kind {
                TrackEventKind::Meta(MetaMessage::TrackName(n)) => name = String::from_utf8_lossy(n).into_owned(),
                TrackEventKind::Meta(MetaMessage::Tempo(t)) => read.tempos.push((tick, u64::from(t.as_int()))),
                TrackEventKind::Meta(MetaMessage::TimeSignature(n, ..)) => read.meters.push((tick, n)),
                TrackEventKind::Midi { message: MidiMessage::NoteOn { key, vel }, .. } if vel > 0 => {
                    notes.push((tick, key.as_int()));
                }
                _ => {}
            }
        }
        if !notes.is_empty() {
            read.tracks.insert(name, notes);
        }
    }
    Ok(read)
}

/// The Python of the environment scripts/setup makes for mido.
fn mido_python() -> Result<PathBuf> {
    let python = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../target/py-mido/bin/python"));
    ensure!(python.exists(), "{} is missing: run ./scripts/setup (it installs mido)", python.display());
    Ok(python)
}

const MIDO_READER: &str = r#"
import json, sys, mido
f = mido.MidiFile(sys.argv[1])
out = {"ticks_per_beat": f.ticks_per_beat, "type": f.type, "tracks": {}, "tempos": [], "meters": []}
for track in f.tracks:
    tick, name, notes = 0, "", []
    for m in track:
        tick += m.time
        if m.type == "track_name": name = m.name
        elif m.type == "set_tempo": out["tempos"].append([tick, m.tempo])
        elif m.type == "time_signature": out["meters"].append([tick, m.numerator])
        elif m.type == "note_on" and m.velocity > 0: notes.append([tick, m.note])
    if notes: out["tracks"][name] = notes
print(json.dumps(out))
"#;

async fn read_with_mido(bytes: &[u8]) -> Result<Read> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("take.mid");
    std::fs::write(&path, bytes)?;
    let output = tokio::process::Command::new(mido_python()?).arg("-c").arg(MIDO_READER).arg(&path).output().await?;
    ensure!(output.status.success(), "mido failed: {}", String::from_utf8_lossy(&output.stderr));
    let v: Value = serde_json::from_slice(&output.stdout)?;
    ensure!(v["type"] == 1, "format 1: {v}");
    let pairs = |v: &Value| -> Vec<(u64, u64)> {
        v.as_array().into_iter().flatten().filter_map(|p| Some((p[0].as_u64()?, p[1].as_u64()?))).collect()
    };
    let tracks = v["tracks"]
        .as_object()
        .context("tracks")?
        .iter()
        .map(|(name, notes)| (name.clone(), pairs(notes).into_iter().map(|(t, k)| (t, k as u8)).collect()))
        .collect();
    Ok(Read {
        ticks_per_beat: v["ticks_per_beat"].as_u64().context("ticks_per_beat")?,
        tracks,
        tempos: pairs(&v["tempos"]),
        meters: pairs(&v["meters"]).into_iter().map(|(t, n)| (t, n as u8)).collect(),
    })
}

/// The part of student `i`: ten play drums, ten the melody, ten nothing assigned.
fn part_of(i: usize) -> Option<&'static str> {
    match i / 10 {
        0 => Some("drums"),
        1 => Some("melody"),
        _ => None,
    }
}

async fn a_class_of_thirty_is_recorded_once_and_its_midi_file_keeps_the_shared_timeline(
    backend: Backend,
) -> Result<()> {
    let db = TestDatabase::new(backend).await;
    let server = TestServer::start_on(&db, |_| {}).await?;
    let teacher_token = server.teacher("t-1");
    let code = server.create_room(&teacher_token, 120.0, 4).await?;
    let teacher = server.connect(&code, &teacher_token).await?;
    let mut students = Vec::new();
    for i in 0..30 {
        students.push(server.connect(&code, &server.student(&format!("s-{i:02}"))).await?);
    }
    for (i, student) in students.iter().enumerate() {
        if let Some(part) = part_of(i) {
            let assignment = Assignment { part: Some(PartName::truncating(part)), beats: BoundedVec::default() };
            teacher.control(ControlOp::Assign { member: student.member_id(), assignment }).await?;
        }
    }
    for student in &students {
        student.wait_synced(SYNC).await?;
    }
    teacher.wait_synced(SYNC).await?;
    let started = teacher.change(Change::Start { count_in_bars: 0 }).await?.applied.context("applied")?;
    // Record once the beat sounds: wait (on the teacher's synced clock) for its first beat.
    let first_beat = teacher.local_time_of_beat(started.effective_beat).context("first beat")?;
    let wait = first_beat.0.saturating_sub(teacher.clock().now().0) + 300_000_000;
    tokio::time::sleep(Duration::from_nanos(wait)).await;

    teacher.control(ControlOp::StartRecording).await?;
    let take = teacher.recording().context("the teacher sees the take run")?;
    assert_eq!(take.take, 1);
    for student in &students {
        events_until(student, |e| matches!(e, Event::Recording(Some(r)) if *r == take)).await?;
    }
    let room = get(&server, &format!("/api/rooms/{code}"), &teacher_token, 200).await?;
    assert_eq!(room["recording"]["take"], 1, "{room}");

    // Two notes each, 250 ms apart; then a tempo change to 90 BPM, and a third note each a
    // beat after it took effect. Pitch 36 + i tells the students apart.
    let students: Vec<Arc<Client>> = students.into_iter().map(Arc::new).collect();
    let mut players = Vec::new();
    for (i, student) in students.iter().enumerate() {
        let student = student.clone();
        players.push(tokio::spawn(async move {
            let now = student.clock().now();
            let a = play_at(&student, ClientNanos(now.0 + i as u64 * 3_000_000), 36 + i as u8).await?;
            let b = play_at(&student, ClientNanos(now.0 + 250_000_000 + i as u64 * 3_000_000), 36 + i as u8).await?;
            anyhow::Ok(vec![a, b])
        }));
    }
    let mut played: Vec<Vec<ServerNanos>> = Vec::new();
    for player in players {
        played.push(player.await??);
    }
    let change = teacher.change(Change::SetTempo(MicroBpm::from_bpm(90))).await?.applied.context("applied")?;
    let timeline = teacher.timeline().context("timeline")?;
    let mut players = Vec::new();
    for (i, student) in students.iter().enumerate() {
        let student = student.clone();
        players.push(tokio::spawn(async move {
            downbeat_tests::wait_for_epoch(&student, change.epoch).await?;
            let beat = student.local_time_of_beat(change.effective_beat + 1).context("beat after the change")?;
            play_at(&student, ClientNanos(beat.0 + i as u64 * 2_000_000), 36 + i as u8).await
        }));
    }
    for (i, player) in players.into_iter().enumerate() {
        played[i].push(player.await??);
    }
    // The room took every note (the teachers' feed counts them), then the take stops.
    let want: BTreeMap<u64, u32> = students.iter().map(|s| (s.member_id(), 3)).collect();
    let mut counted = BTreeMap::new();
    events_until(&teacher, |e| {
        if let Event::Participation(notices) = e {
            counted.extend(notices.iter().map(|n| (n.member_id, n.notes)));
        }
        counted == want
    })
    .await?;
    let (status, body) =
        server.http("DELETE", &format!("/api/rooms/{code}/recording"), Some(&teacher_token), None).await?;
    ensure!(status == 200, "stopping answered {status}: {body}");
    events_until(&students[0], |e| matches!(e, Event::Recording(None))).await?;

    let list = get(&server, &format!("/api/rooms/{code}/recordings"), &teacher_token, 200).await?;
    let takes = list["recordings"].as_array().context("recordings")?;
    assert_eq!(takes.len(), 1, "{list}");
    assert_eq!(takes[0]["notes"], 90, "every note once: {list}");
    assert!(takes[0]["stopped_at_ms"].as_i64().is_some(), "{list}");
    let midi_path = takes[0]["midi"].as_str().context("midi")?.to_owned();

    let (status, content_type, bytes) = server.http_bytes(&midi_path, &teacher_token).await?;
    ensure!(status == 200, "the MIDI download answered {status}");
    assert_eq!(content_type, "audio/midi");

    // Where each note must be: its played instant on the shared timeline, in beats from the
    // downbeat at or before the take's start.
    let first = timeline.segment_at(take.started_at);
    let into = timeline.beat_at(take.started_at).context("beats sound at the take's start")? - first.start_beat;
    let origin = first.start_beat + into.div_euclid(i64::from(first.beats_per_bar)) * i64::from(first.beats_per_bar);
    let change_tick = ((change.effective_beat - origin) as f64 * TICKS) as u64;
    for (reader, read) in [("midly", read_with_midly(&bytes)?), ("mido", read_with_mido(&bytes).await?)] {
        assert_eq!(read.ticks_per_beat, 480, "{reader}");
        assert_eq!(read.tempos, vec![(0, 500_000), (change_tick, 666_666)], "{reader}: the tempo map");
        assert_eq!(read.meters.first(), Some(&(0, 4)), "{reader}");
        let names: Vec<&str> = read.tracks.keys().map(String::as_str).collect();
        let mut expected_names: Vec<String> = vec!["drums".into(), "melody".into()];
        expected_names.extend(students[20..].iter().map(|s| format!("member {}", s.member_id())));
        expected_names.sort();
        assert_eq!(names, expected_names, "{reader}: one track per part or member, never a name");
        let total: usize = read.tracks.values().map(Vec::len).sum();
        assert_eq!(total, 90, "{reader}");
        for (i, student) in students.iter().enumerate() {
            let track = match part_of(i) {
                Some(part) => part.to_owned(),
                None => format!("member {}", student.member_id()),
            };
            let got: Vec<u64> =
                read.tracks[&track].iter().filter(|(_, key)| *key == 36 + i as u8).map(|(tick, _)| *tick).collect();
            assert_eq!(got.len(), 3, "{reader}: student {i}'s notes in {track}");
            for (tick, at) in got.iter().zip(&played[i]) {
                let want = timeline_tick(&timeline, *at, origin);
                assert!(
                    (*tick as f64 - want).abs() <= 1.0,
                    "{reader}: student {i}'s note at tick {tick}, the timeline puts it at {want:.2}"
                );
            }
        }
    }

    // A child's export holds their notes; their deletion removes them and the take stays.
    let admin = server.admin("a-1");
    let export = get(&server, "/api/students/s-00/export", &admin, 200).await?;
    let notes = export["recorded_notes"].as_array().context("recorded_notes")?;
    assert_eq!(notes.len(), 3, "{export}");
    assert!(notes.iter().all(|n| n["midi"] == 36 && n["part"] == "drums"), "{export}");
    let (status, deleted) = server.http("DELETE", "/api/students/s-00", Some(&admin), None).await?;
    ensure!(status == 200, "delete answered {status}: {deleted}");
    assert_eq!(deleted["recorded_notes"], 3, "{deleted}");
    let list = get(&server, &format!("/api/rooms/{code}/recordings"), &teacher_token, 200).await?;
    assert_eq!(list["recordings"][0]["notes"], 87, "{list}");
    let (_, _, bytes) = server.http_bytes(&midi_path, &teacher_token).await?;
    let read = read_with_midly(&bytes)?;
    assert!(read.tracks["drums"].iter().all(|(_, key)| *key != 36), "the deleted child's notes are gone");
    let store = Store::open(db.url()).await?;
    assert_eq!(store.rows_mentioning("s-00").await?, 0);

    // Retention: a cutoff after everything purges the notes, then the take and its timelines.
    store.purge_before("demo", i64::MAX).await?;
    store.close().await;
    let list = get(&server, &format!("/api/rooms/{code}/recordings"), &teacher_token, 200).await?;
    assert_eq!(list["recordings"], Value::Array(Vec::new()), "{list}");
    let (status, _, _) = server.http_bytes(&midi_path, &teacher_token).await?;
    assert_eq!(status, 404);
    Ok(())
}

/// A client on a clock of its own (offset up to ±0.5 s, drift up to ±100 ppm), so the test
/// knows the true instant of every local reading.
struct Clocked {
    client: Client,
    clock: InjectedClock,
}

/// Where each client scheduled note `seq`, from the class's median, beside its clock estimate
/// as the spread is checked and its clock as it truly runs (offset and drift): what a failed
/// spread needs to be read.
fn clocks_apart(everyone: &[Clocked], heard: &[BTreeMap<u32, (Instant, ServerNanos, u8)>], seq: u32) -> String {
    let mut at: Vec<Instant> = heard.iter().map(|h| h[&seq].0).collect();
    at.sort();
    let median = at[at.len() / 2];
    let mut lines = Vec::new();
    for (i, (c, h)) in everyone.iter().zip(heard).enumerate() {
        lines.push(format!(
            "client {i}: {:+.1} µs from the median, {:?}, estimate {:?}",
            nanos_between(h[&seq].0, median) as f64 / 1e3,
            c.clock,
            c.client.estimate()
        ));
    }
    lines.join("; ")
}

/// The playback's notes `clocked` schedules (from [`PLAYBACK_FROM`]) until `done` says it has
/// all it expects: their true instants by sequence number.
async fn playback_heard(
    clocked: &Clocked,
    mut done: impl FnMut(&BTreeMap<u32, (Instant, ServerNanos, u8)>) -> bool,
) -> Result<BTreeMap<u32, (Instant, ServerNanos, u8)>> {
    let mut heard = BTreeMap::new();
    while !done(&heard) {
        let n = tokio::time::timeout(SYNC, clocked.client.next_note()).await?.context("session closed")?;
        if n.from == PLAYBACK_FROM {
            heard.insert(n.note.seq, (clocked.clock.instant_at(n.local_at), n.server_at, n.note.midi));
        }
    }
    Ok(heard)
}

async fn a_take_plays_back_at_one_instant_for_thirty_one_clients_and_stops_on_a_bar_for_all(
    backend: Backend,
) -> Result<()> {
    let db = TestDatabase::new(backend).await;
    let server = TestServer::start_on(&db, |_| {}).await?;
    let teacher_token = server.teacher("t-1");
    let code = server.create_room(&teacher_token, 120.0, 4).await?;
    let mut rng = Rng::new(17);
    let base = Instant::now();
    let mut everyone = Vec::new();
    for i in 0..31 {
        let clock = InjectedClock::new(base, rng.range(-500e6, 500e6) as i64, rng.range(-100.0, 100.0));
        let token = if i == 0 { teacher_token.clone() } else { server.student(&format!("s-{i:02}")) };
        let client = Client::connect_with_clock(server.options(&code, &token), Arc::new(clock)).await?;
        everyone.push(Clocked { client, clock });
    }
    for c in &everyone {
        c.client.wait_synced(SYNC).await?;
    }
    let teacher = &everyone[0].client;

    // A take of ten notes over about five seconds (five students, two notes each), recorded
    // while the beat runs.
    let started = teacher.change(Change::Start { count_in_bars: 0 }).await?.applied.context("applied")?;
    let first_beat = teacher.local_time_of_beat(started.effective_beat).context("first beat")?;
    tokio::time::sleep(Duration::from_nanos(first_beat.0.saturating_sub(teacher.clock().now().0))).await;
    teacher.control(ControlOp::StartRecording).await?;
    let t0 = tokio::time::Instant::now();
    let mut played = Vec::new();
    for k in 0..10_usize {
        tokio::time::sleep_until(t0 + Duration::from_millis(550 * k as u64)).await;
        played.push(everyone[1 + k / 2].client.play_note(60 + k as u8, 100, 0)?.played_at);
    }
    let want: BTreeMap<u64, u32> = (1..=5).map(|i| (everyone[i].client.member_id(), 2)).collect();
    let mut counted = BTreeMap::new();
    events_until(teacher, |e| {
        if let Event::Participation(notices) = e {
            counted.extend(notices.iter().map(|n| (n.member_id, n.notes)));
        }
        counted == want
    })
    .await?;
    teacher.control(ControlOp::StopRecording).await?;

    // Played back: every client schedules each of the ten notes at one true instant, from a
    // bar boundary on.
    let (status, body) = server
        .http("POST", &format!("/api/rooms/{code}/playback"), Some(&teacher_token), Some(json!({ "take": 1 })))
        .await?;
    ensure!(status == 200, "playback answered {status}: {body}");
    let start_beat = body["effective_beat"].as_i64().context("effective_beat")?;
    let timeline = teacher.timeline().context("timeline")?;
    assert_eq!(timeline.beat_in_bar(start_beat), Some(0), "a bar boundary");
    let starts_at = timeline.time_of(start_beat).context("sounds")?;
    let mut heard = Vec::new();
    for c in &everyone {
        heard.push(playback_heard(c, |h| h.len() == 10).await?);
    }
    let (mut worst, mut worst_seq) = (Duration::ZERO, 1);
    for seq in 1..=10 {
        let instants: Vec<Instant> = heard.iter().map(|h| h[&seq].0).collect();
        let spread = *instants.iter().max().context("max")? - *instants.iter().min().context("min")?;
        if spread > worst {
            (worst, worst_seq) = (spread, seq);
        }
    }
    println!("ten played-back notes, each scheduled by 31 clients within {worst:?}");
    assert!(
        worst <= Duration::from_millis(1),
        "{worst:?} at note {worst_seq}; {}",
        clocks_apart(&everyone, &heard, worst_seq)
    );
    // In the order played, the first on or after the start boundary, none before.
    let pitches: Vec<u8> = heard[0].values().map(|(_, _, midi)| *midi).collect();
    assert_eq!(pitches, (60..70).collect::<Vec<u8>>());
    assert!(heard[0].values().all(|(_, at, _)| *at >= starts_at), "nothing before the start");
    // The take's rhythm, within a tick (1/480 of a beat) each way.
    let at: Vec<u64> = heard[0].values().map(|(_, at, _)| at.0).collect();
    for (k, w) in at.windows(2).enumerate() {
        let (got, want) = (w[1] - w[0], played[k + 1].0 - played[k].0);
        assert!(got.abs_diff(want) <= 2_100_000, "gap {k}: {got} ns played back, {want} ns played");
    }
    events_until(teacher, |e| matches!(e, Event::Playback(None))).await?;

    // Again, stopped once its first note arrived: everyone gets the same notes, those before
    // the stop's bar, and nothing after it.
    let (status, body) = server
        .http("POST", &format!("/api/rooms/{code}/playback"), Some(&teacher_token), Some(json!({ "take": 1 })))
        .await?;
    ensure!(status == 200, "playback answered {status}: {body}");
    let first_note = playback_heard(&everyone[0], |h| !h.is_empty()).await?;
    let (status, stop) =
        server.http("DELETE", &format!("/api/rooms/{code}/playback"), Some(&teacher_token), None).await?;
    ensure!(status == 200, "stopping answered {status}: {stop}");
    let stop_beat = stop["effective_beat"].as_i64().context("effective_beat")?;
    assert_eq!(teacher.timeline().context("timeline")?.beat_in_bar(stop_beat), Some(0), "on a bar");
    let stop_at = stop["effective_at_ns"].as_u64().context("effective_at_ns")?;
    // Over at the stop's bar. Every note before it went out at least half a lead earlier than
    // that, so each client holds all it will get once it hears the playback is over.
    let mut sets = Vec::new();
    for (i, c) in everyone.iter().enumerate() {
        events_until(&c.client, |e| matches!(e, Event::Playback(None))).await?;
        let mut seqs: Vec<u32> = if i == 0 { first_note.keys().copied().collect() } else { Vec::new() };
        while let Ok(Some(n)) = tokio::time::timeout(Duration::from_millis(1), c.client.next_note()).await {
            if n.from == PLAYBACK_FROM {
                assert!(n.server_at.0 < stop_at, "a note at or after the stop");
                seqs.push(n.note.seq);
            }
        }
        seqs.sort_unstable();
        seqs.dedup();
        sets.push(seqs);
    }
    let stopped = &sets[0];
    assert!(!stopped.is_empty() && stopped.len() < 10, "stopped mid-way: {stopped:?}");
    assert!(sets.iter().all(|s| s == stopped), "everyone got the same notes: {sets:?}");
    Ok(())
}

const SECRET_A: &[u8; 32] = b"school-a-secret-school-a-secret!";
const SECRET_B: &[u8; 32] = b"school-b-secret-school-b-secret!";

fn refused_code(result: Result<downbeat_protocol::ControlAck, ClientError>) -> Option<ErrorCode> {
    match result {
        Err(ClientError::Refused { code, .. }) => Some(code),
        _ => None,
    }
}

async fn what_may_not_be_done_with_recordings_is_refused_with_a_stable_code(backend: Backend) -> Result<()> {
    let db = TestDatabase::new(backend).await;
    let server = TestServer::start_on(&db, |c| {
        c.tenants = vec![school("a", SECRET_A, TenantLimits::default()), school("b", SECRET_B, TenantLimits::default())]
    })
    .await?;
    let mint = |tenant: &str, role, sub: &str| {
        server.tenants.mint(tenant, role, sub, "Someone", Duration::from_secs(3600)).expect("mints")
    };
    let teacher_token = mint("a", Role::Teacher, "t-a");
    let code = server.create_room(&teacher_token, 100.0, 4).await?;
    let teacher = server.connect(&code, &teacher_token).await?;
    let student_token = mint("a", Role::Student, "s-a");
    let student = server.connect(&code, &student_token).await?;

    // A student may not record, on the control stream or over HTTP.
    assert_eq!(refused_code(student.control(ControlOp::StartRecording).await), Some(ErrorCode::Forbidden));
    let path = format!("/api/rooms/{code}/recording");
    let (status, body) = server.http("POST", &path, Some(&student_token), None).await?;
    assert_eq!((status, body["error"]["code"].as_str()), (403, Some("forbidden")), "{body}");
    assert!(teacher.recording().is_none() && student.recording().is_none());
    // Stopping what does not run, starting what runs.
    assert_eq!(refused_code(teacher.control(ControlOp::StopRecording).await), Some(ErrorCode::NotRecording));
    let (status, body) = server.http("POST", &path, Some(&teacher_token), None).await?;
    assert_eq!(status, 201, "{body}");
    let (status, body) = server.http("POST", &path, Some(&teacher_token), None).await?;
    assert_eq!((status, body["error"]["code"].as_str()), (409, Some("already_recording")), "{body}");
    let (status, body) = server.http("DELETE", &path, Some(&teacher_token), None).await?;
    assert_eq!(status, 200, "{body}");
    let (status, body) = server.http("DELETE", &path, Some(&teacher_token), None).await?;
    assert_eq!((status, body["error"]["code"].as_str()), (409, Some("not_recording")), "{body}");

    // The take's list and file are the room's teachers': not a student's, not another school's.
    let list = get(&server, &format!("/api/rooms/{code}/recordings"), &teacher_token, 200).await?;
    let session = list["room_session_id"].as_str().context("room session")?.to_owned();
    let file = format!("/api/sessions/{session}/recordings/1.mid");
    let (status, _, bytes) = server.http_bytes(&file, &teacher_token).await?;
    assert_eq!(status, 200);
    Smf::parse(&bytes).context("an empty take is a valid file")?;
    let other_school = mint("b", Role::Teacher, "t-a");
    let (status, body) = server.http("GET", &file, Some(&other_school), None).await?;
    assert_eq!((status, body["error"]["code"].as_str()), (404, Some("recording_not_found")), "{body}");
    let (status, body) =
        server.http("GET", &format!("/api/sessions/{session}/recordings"), Some(&other_school), None).await?;
    assert_eq!((status, body["error"]["code"].as_str()), (404, Some("recording_not_found")), "{body}");
    let (status, body) = server.http("GET", &file, Some(&student_token), None).await?;
    assert_eq!((status, body["error"]["code"].as_str()), (403, Some("forbidden")), "{body}");
    let another_teacher = mint("a", Role::Teacher, "t-other");
    let (status, body) = server.http("GET", &file, Some(&another_teacher), None).await?;
    assert_eq!((status, body["error"]["code"].as_str()), (403, Some("forbidden")), "{body}");
    // Names that are no take.
    for bad in ["1", "0.mid", "x.mid", "-1.mid", "1.mid.mid"] {
        let (status, body) = server
            .http("GET", &format!("/api/sessions/{session}/recordings/{bad}"), Some(&teacher_token), None)
            .await?;
        assert_eq!((status, body["error"]["code"].as_str()), (400, Some("bad_request")), "{bad}: {body}");
    }
    let (status, body) =
        server.http("GET", &format!("/api/sessions/{session}/recordings/2.mid"), Some(&teacher_token), None).await?;
    assert_eq!((status, body["error"]["code"].as_str()), (404, Some("recording_not_found")), "{body}");

    // Playback: the room's teachers only, of a take that is there, at a tempo in range.
    let playback = format!("/api/rooms/{code}/playback");
    let take = |n: u32| Some(json!({ "take": n }));
    let (status, body) = server.http("POST", &playback, Some(&student_token), take(1)).await?;
    assert_eq!((status, body["error"]["code"].as_str()), (403, Some("forbidden")), "{body}");
    let (status, body) = server.http("DELETE", &playback, Some(&teacher_token), None).await?;
    assert_eq!((status, body["error"]["code"].as_str()), (409, Some("not_playing")), "{body}");
    let (status, body) = server.http("POST", &playback, Some(&teacher_token), take(2)).await?;
    assert_eq!((status, body["error"]["code"].as_str()), (404, Some("recording_not_found")), "{body}");
    let (status, body) =
        server.http("POST", &playback, Some(&teacher_token), Some(json!({ "take": 1, "tempo_bpm": 900 }))).await?;
    assert_eq!((status, body["error"]["code"].as_str()), (400, Some("tempo_out_of_range")), "{body}");
    assert!(teacher.playback().is_none());
    assert!(!teacher.timeline().context("timeline")?.last().running, "a refused playback starts nothing");
    // A take retention purged is gone for playback too.
    let store = Store::open(db.url()).await?;
    store.purge_before("a", i64::MAX).await?;
    store.close().await;
    let (status, body) = server.http("POST", &playback, Some(&teacher_token), take(1)).await?;
    assert_eq!((status, body["error"]["code"].as_str()), (404, Some("recording_not_found")), "{body}");
    Ok(())
}
