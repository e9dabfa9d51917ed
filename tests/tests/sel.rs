//! SEL end to end, over real sockets, on SQLite and on PostgreSQL: reflections acknowledged
//! only once committed and stored once however often they are retried, participation and
//! on-beat accuracy measured by the server matching what 30 students really played, the
//! teachers' live feed, one student's export and hard delete (by the school's admin), tenant
//! isolation, and a database outage that beats and notes never notice.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use downbeat_client::{Client, ClientError, Event};
use downbeat_protocol::{
    Assignment, BoundedVec, Change, ClientNanos, ControlOp, ErrorCode, PartName, ParticipationNotice,
};
use downbeat_server::auth::Role;
use downbeat_server::config::TenantLimits;
use downbeat_server::sel::store::Store;
use downbeat_tests::db::{Backend, TestDatabase};
use downbeat_tests::{TestServer, Transport, events_until, on_both_backends, school};
use serde_json::{Value, json};

on_both_backends!(
    reflections_are_saved_once_and_reach_the_teachers_feed,
    reflections_over_websocket_are_saved_once_and_reach_the_teachers_feed,
    participation_and_accuracy_match_what_thirty_students_played,
    export_and_delete_cover_every_row_of_one_student,
    nobody_reads_or_deletes_another_schools_data,
    a_database_outage_never_touches_beats_and_drains_after,
    a_reflection_with_a_nul_is_refused_and_every_school_still_writes,
    a_past_sessions_timeline_counts_what_the_class_played,
);

const SYNC: Duration = Duration::from_secs(10);
/// The longest a reflection's answer may take where the test needs one.
const ANSWER: Duration = Duration::from_secs(10);

/// A server whose SEL store is `db`.
async fn server_on(db: &TestDatabase, adjust: impl FnOnce(&mut downbeat_server::Config)) -> Result<TestServer> {
    TestServer::start_on(db, adjust).await
}

/// A server over one database with a room at 120 BPM in 4/4 and its teacher connected.
struct Class {
    server: TestServer,
    teacher_token: String,
    code: String,
    teacher: Client,
}

async fn class(db: &TestDatabase, adjust: impl FnOnce(&mut downbeat_server::Config)) -> Result<Class> {
    class_over(db, Transport::WebTransport, adjust).await
}

/// [`class`], its clients connecting over `transport`.
async fn class_over(
    db: &TestDatabase,
    transport: Transport,
    adjust: impl FnOnce(&mut downbeat_server::Config),
) -> Result<Class> {
    let server = server_on(db, adjust).await?.over(transport);
    let teacher_token = server.teacher("t-1");
    let code = server.create_room(&teacher_token, 120.0, 4).await?;
    let teacher = server.connect(&code, &teacher_token).await?;
    Ok(Class { server, teacher_token, code, teacher })
}

/// The stable code of a refused request.
fn refused_code(result: Result<(), ClientError>) -> Option<ErrorCode> {
    match result {
        Err(ClientError::Refused { code, .. }) => Some(code),
        _ => None,
    }
}

/// Waits until `client` has a prompt (it arrives after the welcome or when set).
async fn prompt_of(client: &Client) -> Result<u32> {
    if let Some(p) = client.prompt() {
        return Ok(p.id);
    }
    events_until(client, |e| matches!(e, Event::Prompt(Some(_)))).await?;
    Ok(client.prompt().context("prompt")?.id)
}

/// `GET path` as `token`; must answer `expect`.
async fn get(server: &TestServer, path: &str, token: &str, expect: u16) -> Result<Value> {
    let (status, body) = server.http("GET", path, Some(token), None).await?;
    ensure!(status == expect, "GET {path} answered {status}, not {expect}: {body}");
    Ok(body)
}

/// Sets the room's prompt over HTTP.
async fn set_prompt(server: &TestServer, code: &str, teacher: &str, text: &str) -> Result<()> {
    let (status, body) =
        server.http("POST", &format!("/api/rooms/{code}/prompt"), Some(teacher), Some(json!({ "text": text }))).await?;
    ensure!(status == 200, "setting the prompt answered {status}: {body}");
    Ok(())
}

/// A student's entry in a room session's SEL view.
fn student_in<'a>(sel: &'a Value, student: &str) -> Option<&'a Value> {
    sel["students"].as_array()?.iter().find(|s| s["student_id"] == student)
}

async fn reflections_are_saved_once_and_reach_the_teachers_feed(backend: Backend) -> Result<()> {
    reflections_are_saved_once(backend, Transport::WebTransport).await
}

/// The same whatever carries the sessions: acknowledged only once committed.
async fn reflections_over_websocket_are_saved_once_and_reach_the_teachers_feed(backend: Backend) -> Result<()> {
    reflections_are_saved_once(backend, Transport::WebSocket).await
}

async fn reflections_are_saved_once(backend: Backend, transport: Transport) -> Result<()> {
    let db = TestDatabase::new(backend).await;
    let Class { server, teacher_token, code, teacher } = class_over(&db, transport, |_| {}).await?;
    let ana = server.connect(&code, &server.student("s-ana")).await?;
    let id = *b"reflection-ana-1";

    // Before any prompt there is nothing to answer.
    assert_eq!(refused_code(ana.reflect(id, 1, Some(3), None).await), Some(ErrorCode::NoPrompt));

    set_prompt(&server, &code, &teacher_token, "How did you help your group today?").await?;
    let prompt = prompt_of(&ana).await?;
    // Someone joining later is told the prompt right after the welcome.
    let ben = server.connect(&code, &server.student("s-ben")).await?;
    assert_eq!(prompt_of(&ben).await?, prompt);

    // Bad reflections are refused with stable codes and store nothing.
    assert_eq!(refused_code(ana.reflect(id, prompt, Some(9), None).await), Some(ErrorCode::BadRequest));
    assert_eq!(refused_code(ana.reflect(id, prompt, None, Some("   ")).await), Some(ErrorCode::BadRequest));
    assert_eq!(refused_code(ana.reflect(id, prompt + 1, Some(2), None).await), Some(ErrorCode::NoPrompt));
    assert_eq!(refused_code(teacher.reflect(id, prompt, Some(2), None).await), Some(ErrorCode::Forbidden));

    ana.reflect(id, prompt, Some(4), Some("I kept the beat for Ben")).await?;
    let seen = events_until(&teacher, |e| matches!(e, Event::Reflection(n) if n.id == id)).await?;
    let Some(Event::Reflection(notice)) = seen.last() else { bail!("no reflection on the feed") };
    assert_eq!(notice.member_id, ana.member_id());
    assert_eq!(notice.mood, Some(4));
    assert_eq!(notice.text.as_deref(), Some("I kept the beat for Ben"));
    assert_eq!(notice.prompt_id, prompt);

    // A retry (here with other words, as from a confused client) and one from a new session
    // are acknowledged and store nothing new: the first one stands.
    ana.reflect(id, prompt, Some(1), Some("something else")).await?;
    drop(ana);
    let ana = server.connect(&code, &server.student("s-ana")).await?;
    ana.reflect(id, prompt, Some(1), None).await?;
    ben.reflect(*b"reflection-ben-1", prompt, None, Some("Ana helped me")).await?;

    let sel = get(&server, &format!("/api/rooms/{code}/sel"), &teacher_token, 200).await?;
    let reflections = sel["reflections"].as_array().context("reflections")?;
    assert_eq!(reflections.len(), 2, "{sel}");
    let first = reflections.iter().find(|r| r["student_id"] == "s-ana").context("ana's reflection")?;
    assert_eq!(first["text"], "I kept the beat for Ben");
    assert_eq!(first["mood"], 4);
    assert_eq!(first["prompt"], "How did you help your group today?");
    assert_eq!(first["id"], hex(&id));
    // Names never reach the store: only pseudonymous ids.
    assert!(!sel.to_string().contains("Student s-ana"), "{sel}");
    // Students may not read the feed's data.
    let (status, body) =
        server.http("GET", &format!("/api/rooms/{code}/sel"), Some(&server.student("s-ana")), None).await?;
    assert_eq!((status, body["error"]["code"].as_str()), (403, Some("forbidden")));
    Ok(())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// One note a student plays: on `beat` (counted from the first beat), `offset_ms` from it.
#[derive(Clone, Copy, Debug)]
struct Planned {
    beat: i64,
    offset_ms: i64,
}

/// What the server must find for one student.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Truth {
    notes: i64,
    timed: i64,
    on_beat: i64,
    assigned: i64,
    in_part: i64,
    turns: i64,
    offset_abs_sum_micros: i64,
    score: Option<i64>,
}

/// The three ways of playing in this test, and what each must count.
fn plan(group: usize) -> (Vec<Planned>, Truth) {
    let p = |beat, offset_ms| Planned { beat, offset_ms };
    match group {
        // Assigned the downbeat: two turns (one with two notes), plus one note on another beat.
        0 => (
            vec![p(0, 2), p(1, 5), p(4, -10), p(4, 30)],
            Truth {
                notes: 4,
                timed: 4,
                on_beat: 4,
                assigned: 4,
                in_part: 3,
                turns: 2,
                score: Some(88),
                ..Truth::default()
            },
        ),
        // No assignment, on the beat.
        1 => (
            vec![p(0, 10), p(1, -15), p(2, 20), p(3, 0)],
            Truth { notes: 4, timed: 4, on_beat: 4, score: Some(100), ..Truth::default() },
        ),
        // Off the beat: 200 ms away from the nearest one.
        _ => (vec![p(0, 200), p(2, 200), p(5, -200)], Truth { notes: 3, timed: 3, score: Some(0), ..Truth::default() }),
    }
}

/// Waits until the client's clock reads `at`, then plays a note; returns its stamp.
async fn play_at(client: &Client, at: ClientNanos) -> Result<downbeat_protocol::ServerNanos> {
    let now = client.clock().now();
    if at.0 > now.0 {
        tokio::time::sleep(Duration::from_nanos(at.0 - now.0)).await;
    }
    Ok(client.play_note(60, 100, 0)?.played_at)
}

async fn participation_and_accuracy_match_what_thirty_students_played(backend: Backend) -> Result<()> {
    let db = TestDatabase::new(backend).await;
    let Class { server, teacher_token, code, teacher } = class(&db, |_| {}).await?;
    let mut students = Vec::new();
    for i in 0..30 {
        students.push(server.connect(&code, &server.student(&format!("s-{i:02}"))).await?);
    }
    // Group 0 plays the downbeat; the last student only listens.
    for student in &students[..10] {
        let assignment = Assignment {
            part: Some(PartName::truncating("drums")),
            beats: BoundedVec::try_from_vec(vec![0]).expect("one beat"),
        };
        teacher.control(ControlOp::Assign { member: student.member_id(), assignment }).await?;
    }
    for student in &students {
        student.wait_synced(SYNC).await?;
    }
    let applied = teacher.change(Change::Start { count_in_bars: 0 }).await?.applied.context("applied")?;
    for student in &students {
        downbeat_tests::wait_for_epoch(student, applied.epoch).await?;
    }
    let first = applied.effective_beat;

    // Every student plays its plan on its own synced clock, all at once; the test keeps what
    // each note was stamped and computes the truth from the timeline.
    let students: Vec<Arc<Client>> = students.into_iter().map(Arc::new).collect();
    let mut players = Vec::new();
    for (i, student) in students.iter().enumerate().take(29) {
        let student = student.clone();
        players.push(tokio::spawn(async move {
            let (notes, mut truth) = plan(i / 10);
            let timeline = student.timeline().context("timeline")?;
            for n in notes {
                let beat = first + n.beat;
                let local = student.local_time_of_beat(beat).context("beat time")?;
                let at = ClientNanos((local.0 as i64 + n.offset_ms * 1_000_000) as u64);
                let played_at = play_at(&student, at).await?;
                let sounds = timeline.time_of(beat).context("beat sounds")?;
                truth.offset_abs_sum_micros += (played_at.0.abs_diff(sounds.0) / 1000) as i64;
            }
            anyhow::Ok((format!("s-{i:02}"), student.member_id(), truth))
        }));
    }
    let mut truths = BTreeMap::new();
    let mut members = HashMap::new();
    for player in players {
        let (sub, member, truth) = player.await??;
        members.insert(member, truth.notes);
        truths.insert(sub, truth);
    }

    // The live feed: teachers hear everyone's counts as they commit.
    let mut latest: HashMap<u64, ParticipationNotice> = HashMap::new();
    events_until(&teacher, |e| {
        if let Event::Participation(notices) = e {
            for n in notices {
                latest.insert(n.member_id, *n);
            }
        }
        members.iter().all(|(m, notes)| latest.get(m).is_some_and(|n| i64::from(n.notes) == *notes))
    })
    .await?;
    let group0 = latest[&students[0].member_id()];
    assert_eq!((group0.on_beat, group0.in_part, group0.turns, group0.score), (4, 3, 2, Some(88)));

    // The summary, from the database, matches the truth exactly.
    let sel = get(&server, &format!("/api/rooms/{code}/sel"), &teacher_token, 200).await?;
    for (sub, truth) in &truths {
        let s = student_in(&sel, sub).with_context(|| format!("{sub} in {sel}"))?;
        let p = &s["participation"];
        let got = Truth {
            notes: p["notes"].as_i64().context("notes")?,
            timed: p["timed"].as_i64().context("timed")?,
            on_beat: p["on_beat"].as_i64().context("on_beat")?,
            assigned: p["assigned"].as_i64().context("assigned")?,
            in_part: p["in_part"].as_i64().context("in_part")?,
            turns: p["turns"].as_i64().context("turns")?,
            offset_abs_sum_micros: p["offset_abs_sum_micros"].as_i64().context("sum")?,
            score: p["collaboration_score"].as_i64(),
        };
        assert_eq!(&got, truth, "{sub}");
        let mean = p["mean_offset_ms"].as_f64().context("mean")?;
        let expected = (truth.offset_abs_sum_micros / truth.timed) as f64 / 1000.0;
        assert!((mean - expected).abs() < 1e-9, "{sub}: mean {mean} ms, expected {expected} ms");
    }
    // The listener attended and played nothing.
    let idle = student_in(&sel, "s-29").context("s-29")?;
    assert_eq!(idle["participation"]["notes"], 0);
    assert_eq!(idle["participation"]["collaboration_score"], Value::Null);
    assert!(idle["first_joined_at_ms"].as_i64().is_some());

    let summary = get(&server, "/api/students/s-00/summary", &teacher_token, 200).await?;
    assert_eq!(summary["sessions_attended"], 1);
    assert_eq!(summary["participation"]["notes"], 4);
    assert_eq!(summary["participation"]["collaboration_score"], 88);
    assert_eq!(summary["sessions"][0]["room_code"], sel["session"]["room_code"]);
    Ok(())
}

async fn export_and_delete_cover_every_row_of_one_student(backend: Backend) -> Result<()> {
    let db = TestDatabase::new(backend).await;
    let Class { server, teacher_token, code, teacher } = class(&db, |_| {}).await?;
    let ana = server.connect(&code, &server.student("s-ana")).await?;
    let ben = server.connect(&code, &server.student("s-ben")).await?;
    set_prompt(&server, &code, &teacher_token, "What did you like?").await?;
    let prompt = prompt_of(&ana).await?;
    prompt_of(&ben).await?;
    ana.wait_synced(SYNC).await?;
    ben.wait_synced(SYNC).await?;
    for (i, who) in [&ana, &ben].into_iter().enumerate() {
        who.reflect([i as u8; 16], prompt, Some(3), Some("the drums")).await?;
        who.reflect([i as u8 + 10; 16], prompt, Some(4), None).await?;
        for _ in 0..3 {
            who.play_note(62, 90, 0)?;
        }
    }
    let want = [(ana.member_id(), 3), (ben.member_id(), 3)];
    let mut latest = HashMap::new();
    events_until(&teacher, |e| {
        if let Event::Participation(notices) = e {
            latest.extend(notices.iter().map(|n| (n.member_id, n.notes)));
        }
        want.iter().all(|(m, n)| latest.get(m) == Some(n))
    })
    .await?;

    // Export and delete are the school admin's.
    let admin = server.admin("a-1");
    let export = get(&server, "/api/students/s-ana/export", &admin, 200).await?;
    assert_eq!(export["student_id"], "s-ana");
    assert_eq!(export["reflections"].as_array().map(Vec::len), Some(2));
    let rows = export["participation"].as_array().context("participation")?;
    assert!(rows.iter().any(|r| r["kind"] == "joined"), "{export}");
    let notes: i64 = rows.iter().filter_map(|r| r["counts"]["notes"].as_i64()).sum();
    assert_eq!(notes, 3);
    assert_eq!(export["room_sessions"].as_array().map(Vec::len), Some(1));
    assert!(!export.to_string().contains("s-ben"), "another child's data in the export: {export}");

    // Two more notes, certainly handled by the room (Ben hears them) but not yet flushed, then
    // the delete: nothing of Ana may come back from memory afterwards.
    ana.play_note(64, 90, 0)?;
    ana.play_note(65, 90, 0)?;
    let mut heard = 0;
    while heard < 2 {
        let note = tokio::time::timeout(SYNC, ben.next_note()).await?.context("session ended")?;
        if note.from == ana.member_id() && note.note.midi >= 64 {
            heard += 1;
        }
    }
    let (status, deleted) = server.http("DELETE", "/api/students/s-ana", Some(&admin), None).await?;
    assert_eq!(status, 200, "{deleted}");
    assert_eq!(deleted["reflections"], 2);
    assert!(deleted["participation"].as_u64().is_some_and(|n| n >= 2), "{deleted}");
    // Ana was seated: her session ended with its own code, and the class saw her leave.
    let mut told = Vec::new();
    while let Some(event) = tokio::time::timeout(SYNC, ana.next_event()).await? {
        told.push(event);
    }
    assert!(matches!(told.last(), Some(Event::Error(ErrorCode::DataDeleted, _))), "{told:?}");
    let ana_id = ana.member_id();
    events_until(&teacher, |e| matches!(e, Event::MemberLeft(id, _) if *id == ana_id)).await?;
    assert!(ana.reflect([99; 16], prompt, Some(1), None).await.is_err(), "a reflection after the delete");
    drop(ana);

    // Ben's data is untouched; Ana's is gone from every table, her leave included, also
    // after the next flushes.
    ben.play_note(60, 90, 0)?;
    events_until(
        &teacher,
        |e| matches!(e, Event::Participation(n) if n.iter().any(|n| n.member_id == ben.member_id() && n.notes == 4)),
    )
    .await?;
    let store = Store::open(db.url()).await?;
    assert_eq!(store.rows_mentioning("s-ana").await?, 0);
    assert!(store.rows_mentioning("s-ben").await? >= 4);
    store.close().await;
    let export = get(&server, "/api/students/s-ana/export", &admin, 200).await?;
    assert_eq!(export["reflections"], json!([]));
    assert_eq!(export["participation"], json!([]));
    let summary = get(&server, "/api/students/s-ben/summary", &teacher_token, 200).await?;
    assert_eq!((summary["reflections"].as_i64(), summary["participation"]["notes"].as_i64()), (Some(2), Some(4)));
    // Only admins export or delete: not a student, not the class's own teacher.
    for token in [server.student("s-ben"), teacher_token] {
        let (status, _) = server.http("DELETE", "/api/students/s-ben", Some(&token), None).await?;
        assert_eq!(status, 403);
    }
    Ok(())
}

const SECRET_A: &[u8; 32] = b"school-a-secret-school-a-secret!";
const SECRET_B: &[u8; 32] = b"school-b-secret-school-b-secret!";

/// A server over `db` with two schools, `a` and `b`.
async fn two_schools(db: &TestDatabase) -> Result<TestServer> {
    server_on(db, |c| {
        c.tenants = vec![school("a", SECRET_A, TenantLimits::default()), school("b", SECRET_B, TenantLimits::default())]
    })
    .await
}

/// A token of `tenant` for `sub` with `role`, valid for an hour.
fn mint(server: &TestServer, tenant: &str, role: Role, sub: &str) -> String {
    server.tenants.mint(tenant, role, sub, "Someone", Duration::from_secs(3600)).expect("mints")
}

async fn nobody_reads_or_deletes_another_schools_data(backend: Backend) -> Result<()> {
    let db = TestDatabase::new(backend).await;
    let server = two_schools(&db).await?;
    let mint = |tenant: &str, role, sub: &str| mint(&server, tenant, role, sub);
    // The same pseudonymous id exists in both schools.
    let mut codes = HashMap::new();
    for (tenant, text) in [("a", "school a words"), ("b", "school b words")] {
        let teacher_token = mint(tenant, Role::Teacher, "t-1");
        let code = server.create_room(&teacher_token, 100.0, 4).await?;
        let teacher = server.connect(&code, &teacher_token).await?;
        let student = server.connect(&code, &mint(tenant, Role::Student, "s-1")).await?;
        teacher.set_prompt("How was it?").await?;
        let prompt = prompt_of(&student).await?;
        student.reflect(*b"same-client-id-1", prompt, Some(2), Some(text)).await?;
        codes.insert(tenant, code);
    }
    let teacher_a = mint("a", Role::Teacher, "t-1");
    let teacher_b = mint("b", Role::Teacher, "t-1");
    let (admin_a, admin_b) = (mint("a", Role::Admin, "a-1"), mint("b", Role::Admin, "a-1"));
    let sel_a = get(&server, &format!("/api/rooms/{}/sel", codes["a"]), &teacher_a, 200).await?;
    let session_a = sel_a["session"]["id"].as_str().context("session id")?.to_owned();

    // B reads nothing of A: not the room, not the session by id, not the student's rows.
    let (status, body) = server.http("GET", &format!("/api/rooms/{}/sel", codes["a"]), Some(&teacher_b), None).await?;
    assert_eq!((status, body["error"]["code"].as_str()), (404, Some("room_not_found")));
    get(&server, &format!("/api/sessions/{session_a}/sel"), &teacher_b, 404).await?;
    let (status, body) = server.http("GET", &format!("/api/sessions/{session_a}/sel"), Some(&admin_b), None).await?;
    assert_eq!(status, 404, "{body}");
    let export_b = get(&server, "/api/students/s-1/export", &admin_b, 200).await?;
    assert!(!export_b.to_string().contains("school a words"), "{export_b}");
    assert!(export_b["reflections"].as_array().is_some_and(|r| r.len() == 1 && r[0]["tenant_id"] == "b"));
    let summary_b = get(&server, "/api/students/s-1/summary", &teacher_b, 200).await?;
    assert_eq!(summary_b["reflections"], 1);
    assert!(!summary_b.to_string().contains(&session_a));

    // B's delete removes B's rows only.
    let (status, deleted) = server.http("DELETE", "/api/students/s-1", Some(&admin_b), None).await?;
    assert_eq!((status, deleted["reflections"].as_u64()), (200, Some(1)));
    let export_a = get(&server, "/api/students/s-1/export", &admin_a, 200).await?;
    let reflections = export_a["reflections"].as_array().context("reflections")?;
    assert_eq!(reflections.len(), 1);
    assert_eq!(reflections[0]["text"], "school a words");
    Ok(())
}

/// `answer`, or an error once [`ANSWER`] has passed (a poisoned store never answers).
async fn answered<T>(what: &str, answer: impl Future<Output = T>) -> Result<T> {
    tokio::time::timeout(ANSWER, answer).await.with_context(|| format!("no answer to {what} within {ANSWER:?}"))
}

/// One NUL in a reflection (PostgreSQL cannot store it in text: the row would be unwritable,
/// and with it the writer's whole group) is refused with `bad_request` before it reaches the
/// store; so are other control characters, in reflections and prompts, over the control
/// stream and over HTTP. Later reflections, from this school and another, are acknowledged,
/// and health stays ok.
async fn a_reflection_with_a_nul_is_refused_and_every_school_still_writes(backend: Backend) -> Result<()> {
    let db = TestDatabase::new(backend).await;
    let server = two_schools(&db).await?;
    let mint = |tenant: &str, role, sub: &str| mint(&server, tenant, role, sub);
    let mut classes = Vec::new();
    for tenant in ["a", "b"] {
        let teacher_token = mint(tenant, Role::Teacher, "t-1");
        let code = server.create_room(&teacher_token, 100.0, 4).await?;
        let teacher = server.connect(&code, &teacher_token).await?;
        let student = server.connect(&code, &mint(tenant, Role::Student, "s-1")).await?;
        classes.push((tenant, teacher_token, code, teacher, student));
    }
    let (_, teacher_token, code, teacher, student) = &classes[0];

    // Prompts with control characters are refused on the control stream and over HTTP.
    for bad in ["How\0was it?", "How was\rit?", "\u{1b}[2J How was it?"] {
        assert_eq!(refused_code(teacher.set_prompt(bad).await.map(drop)), Some(ErrorCode::BadRequest), "{bad:?}");
        let (status, body) = server
            .http("POST", &format!("/api/rooms/{code}/prompt"), Some(teacher_token), Some(json!({ "text": bad })))
            .await?;
        assert_eq!((status, body["error"]["code"].as_str()), (400, Some("bad_request")), "{bad:?}: {body}");
    }
    assert_eq!(student.prompt(), None, "no refused prompt reached the class");
    // Prose may hold newlines and tabs.
    let question = "How was it?\n\t(one word is fine)";
    teacher.set_prompt(question).await?;
    let prompt = prompt_of(student).await?;

    for bad in ["I helped\0Ben", "\0", "bell\u{7}", "back\u{8}space", "carriage\rreturn"] {
        let refused = answered("a bad reflection", student.reflect(*b"reflection-bad-1", prompt, Some(3), Some(bad)));
        assert_eq!(refused_code(refused.await?), Some(ErrorCode::BadRequest), "{bad:?}");
    }
    // The refused id is still free: nothing was stored under it.
    let good = student.reflect(*b"reflection-bad-1", prompt, Some(3), Some("I helped Ben\n\tand Ana"));
    answered("a good reflection", good).await??;
    // Another school's reflection after the bad ones is acknowledged too.
    let (_, _, _, teacher_b_client, student_b) = &classes[1];
    teacher_b_client.set_prompt("And you?").await?;
    let prompt_b = prompt_of(student_b).await?;
    let other = student_b.reflect(*b"reflection-b----", prompt_b, None, Some("good"));
    answered("another school's reflection", other).await??;
    // Health says ok: the store never failed.
    let (status, body) = health(&server).await?;
    assert_eq!((status, body["status"].as_str()), (200, Some("ok")), "{body}");
    assert_eq!(body["store"]["degraded"], false, "{body}");

    let sel = get(&server, &format!("/api/rooms/{code}/sel"), teacher_token, 200).await?;
    let reflections = sel["reflections"].as_array().context("reflections")?;
    assert_eq!(reflections.len(), 1, "{sel}");
    assert_eq!(reflections[0]["text"], "I helped Ben\n\tand Ana");
    assert_eq!(reflections[0]["prompt"], question);
    let export_b = get(&server, "/api/students/s-1/export", &mint("b", Role::Admin, "a-1"), 200).await?;
    assert_eq!(export_b["reflections"].as_array().map(Vec::len), Some(1), "{export_b}");
    Ok(())
}

/// Polls `check` (a real condition of the server) every 150 ms (within the API's rate limit)
/// for up to `limit`.
async fn until<F, Fut>(limit: Duration, what: &str, mut check: F) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<bool>>,
{
    let deadline = tokio::time::Instant::now() + limit;
    while !check().await? {
        if tokio::time::Instant::now() > deadline {
            bail!("timed out waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    Ok(())
}

/// `GET /api/health` (no token needed).
async fn health(server: &TestServer) -> Result<(u16, Value)> {
    server.http("GET", "/api/health", None, None).await
}

async fn a_database_outage_never_touches_beats_and_drains_after(backend: Backend) -> Result<()> {
    let db = TestDatabase::new(backend).await;
    // Ana writes seven reflections to one prompt: more than the default cap.
    let Class { server, teacher_token, code, teacher } = class(&db, |c| {
        c.sel_queue = 4;
        c.max_reflections_per_prompt = 10;
    })
    .await?;
    let ana = Arc::new(server.connect(&code, &server.student("s-ana")).await?);
    set_prompt(&server, &code, &teacher_token, "How do you feel?").await?;
    let prompt = prompt_of(&ana).await?;
    ana.wait_synced(SYNC).await?;
    let applied = teacher.change(Change::Start { count_in_bars: 0 }).await?.applied.context("applied")?;
    downbeat_tests::wait_for_epoch(&ana, applied.epoch).await?;
    // Everything committed so far: the health is good.
    let (status, body) = health(&server).await?;
    assert_eq!((status, body["status"].as_str()), (200, Some("ok")));

    // Ana's join is written (within a second): the queue is empty when the outage begins.
    let poller = server.admin("a-poll");
    let (s, admin_auth) = (&server, poller.as_str());
    until(Duration::from_secs(10), "the join written", move || async move {
        let export = get(s, "/api/students/s-ana/export", admin_auth, 200).await?;
        Ok(export["participation"].as_array().is_some_and(|rows| !rows.is_empty()))
    })
    .await?;

    let probe_beat = applied.effective_beat + 40;
    let before = ana.timeline().and_then(|t| t.time_of(probe_beat)).context("beat time")?;
    let outage = db.make_unavailable().await;

    // The first reflection waits in the writer, which keeps failing: health turns degraded.
    let first = tokio::spawn({
        let ana = ana.clone();
        async move { ana.reflect([1; 16], prompt, Some(3), None).await }
    });
    until(Duration::from_secs(20), "degraded health", move || async move {
        let (status, body) = health(s).await?;
        Ok(status == 503 && body["status"] == "degraded")
    })
    .await?;

    // Four more fit the queue; past the bound reflections are refused, retryably.
    let mut queued = Vec::new();
    for i in 2..=5u8 {
        let ana = ana.clone();
        queued.push(tokio::spawn(async move { ana.reflect([i; 16], prompt, Some(2), None).await }));
    }
    until(Duration::from_secs(10), "a full queue", move || async move {
        let (_, body) = health(s).await?;
        Ok(body["store"]["queued"].as_u64() == Some(5))
    })
    .await?;
    assert_eq!(refused_code(ana.reflect([6; 16], prompt, Some(1), None).await), Some(ErrorCode::StoreUnavailable));
    assert_eq!(refused_code(ana.reflect([7; 16], prompt, Some(1), None).await), Some(ErrorCode::StoreUnavailable));

    // Meanwhile the room keeps time: notes fan out, beat frames keep coming (every 100 ms for
    // a lead after a note), the timeline's beats are where they were.
    teacher.wait_synced(SYNC).await?;
    let frames = ana.stats().frames;
    teacher.play_note(67, 100, 0)?;
    let note = tokio::time::timeout(SYNC, ana.next_note()).await?.context("session ended")?;
    assert_eq!(note.from, teacher.member_id());
    ana.wait_frames(frames + 3, Duration::from_secs(5)).await?;
    ana.play_note(60, 100, 0)?;
    // Exactly: the room's timeline, not the client's clock estimate (whose 20 s extrapolation
    // wobbles by a millisecond or two on a loaded machine, database or not).
    let after = ana.timeline().and_then(|t| t.time_of(probe_beat)).context("beat time")?;
    assert_eq!(after, before, "beat {probe_beat} moved on the timeline");
    assert!(!first.is_finished(), "acknowledged while the database was down");

    outage.end().await;
    first.await?.context("the first reflection")?;
    for (i, q) in queued.into_iter().enumerate() {
        q.await?.with_context(|| format!("queued reflection {}", i + 2))?;
    }
    ana.reflect([6; 16], prompt, Some(1), None).await.context("a refused reflection, again")?;
    ana.reflect([7; 16], prompt, Some(1), None).await.context("another refused one, again")?;
    until(Duration::from_secs(10), "healthy again", move || async move { Ok(health(s).await?.0 == 200) }).await?;
    // The note played during the outage is counted once the queue drained.
    events_until(
        &teacher,
        |e| matches!(e, Event::Participation(n) if n.iter().any(|n| n.member_id == ana.member_id() && n.notes == 1)),
    )
    .await?;
    let export = get(&server, "/api/students/s-ana/export", &poller, 200).await?;
    let mut ids: Vec<&str> =
        export["reflections"].as_array().context("reflections")?.iter().filter_map(|r| r["id"].as_str()).collect();
    ids.sort_unstable();
    let want: Vec<String> = (1..=7u8).map(|i| hex(&[i; 16])).collect();
    assert_eq!(ids, want.iter().map(String::as_str).collect::<Vec<_>>());
    Ok(())
}

on_both_backends!(retention_purges_each_schools_old_records_on_its_own_schedule);

async fn retention_purges_each_schools_old_records_on_its_own_schedule(backend: Backend) -> Result<()> {
    use downbeat_server::sel::store::{
        Batch, Counts, ParticipationKind, ParticipationRow, ReflectionRow, RoomSessionRow,
    };
    let db = TestDatabase::new(backend).await;
    let now_ms = i64::try_from(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_millis())?;
    let day = 86_400_000;
    // Records from three days ago and from now, in a school that keeps them one day (a) and
    // one that keeps them a year (b).
    let mut batch = Batch::default();
    for tenant in ["a", "b"] {
        for (session, at) in [("old", now_ms - 3 * day), ("new", now_ms)] {
            batch.sessions.push(RoomSessionRow {
                tenant_id: tenant.into(),
                id: session.into(),
                room_code: "ABCDEFGH".into(),
                room_name: "Music".into(),
                teacher_id: "t-1".into(),
                started_at_ms: at,
                ended_at_ms: Some(at + 1000),
            });
            batch.participation.push(ParticipationRow {
                tenant_id: tenant.into(),
                room_session_id: session.into(),
                seq: 1,
                student_id: format!("s-{session}"),
                kind: ParticipationKind::Notes,
                at_ms: at,
                counts: Counts { notes: 3, ..Counts::default() },
            });
            batch.reflections.push(ReflectionRow {
                tenant_id: tenant.into(),
                student_id: format!("s-{session}"),
                id: "00".repeat(16),
                room_session_id: session.into(),
                prompt: "How was it?".into(),
                mood: Some(3),
                text: None,
                created_at_ms: at,
            });
        }
    }
    let store = Store::open(db.url()).await?;
    store.write(&batch).await?;

    let mut a = school("a", SECRET_A, TenantLimits::default());
    a.retention.sel_days = 1;
    let b = school("b", SECRET_B, TenantLimits::default());
    let server = server_on(&db, |c| {
        c.tenants = vec![a, b];
        c.sel_purge_interval_secs = 1;
    })
    .await?;
    // The purge runs at start and then every second; it counts what it deleted.
    let stats = server.stats.clone();
    until(Duration::from_secs(10), "the purge", move || {
        let purged = stats.sel_rows_purged.get();
        async move { Ok(purged > 0) }
    })
    .await?;
    assert_eq!(store.rows_mentioning("s-old").await?, 2, "only school b's old rows are left");
    assert_eq!(store.rows_mentioning("s-new").await?, 4);
    let a_old = store.export_student("a", "s-old").await?;
    assert!(a_old.participation.is_empty() && a_old.reflections.is_empty());
    let b_old = store.export_student("b", "s-old").await?;
    assert_eq!((b_old.participation.len(), b_old.reflections.len()), (1, 1));
    assert!(store.session_sel("a", "old").await?.is_none(), "an ended, empty session of a is purged");
    assert!(store.session_sel("b", "old").await?.is_some());
    store.close().await;
    Ok(())
}

on_both_backends!(a_row_the_database_refuses_fails_only_its_own_reflection);

/// The ids of the reflections `tenant`'s admin exports for `student`, sorted.
async fn exported_ids(server: &TestServer, tenant: &str, student: &str) -> Result<Vec<String>> {
    let path = format!("/api/students/{student}/export");
    let export = get(server, &path, &mint(server, tenant, Role::Admin, "a-export"), 200).await?;
    let mut ids: Vec<String> = export["reflections"]
        .as_array()
        .context("reflections")?
        .iter()
        .filter_map(|r| r["id"].as_str().map(str::to_owned))
        .collect();
    ids.sort_unstable();
    Ok(ids)
}

/// The database refuses one reflection's row for what it holds (a rule added to the schema
/// here; in the field, a value the database cannot store). It is queued behind an outage in
/// one group with another school's reflection, so the writer's transaction fails: the
/// writer writes the jobs one by one, that reflection alone is refused with `store_refused`,
/// every other one is acknowledged and stored once, health is ok again, and later writes go
/// on (today one such row stops every school's writes for good).
async fn a_row_the_database_refuses_fails_only_its_own_reflection(backend: Backend) -> Result<()> {
    let db = TestDatabase::new(backend).await;
    let server = two_schools(&db).await?;
    let mut students = Vec::new();
    for tenant in ["a", "b"] {
        let teacher_token = mint(&server, tenant, Role::Teacher, "t-1");
        let code = server.create_room(&teacher_token, 100.0, 4).await?;
        let student = Arc::new(server.connect(&code, &mint(&server, tenant, Role::Student, "s-1")).await?);
        set_prompt(&server, &code, &teacher_token, "How was it?").await?;
        let prompt = prompt_of(&student).await?;
        students.push((student, prompt));
    }
    // Both joins written: from here on only the reflections below are queued.
    let s = &server;
    for tenant in ["a", "b"] {
        let admin = mint(s, tenant, Role::Admin, "a-poll");
        until(Duration::from_secs(10), "the joins written", move || {
            let admin = admin.clone();
            async move {
                let export = get(s, "/api/students/s-1/export", &admin, 200).await?;
                Ok(export["participation"].as_array().is_some_and(|rows| !rows.is_empty()))
            }
        })
        .await?;
    }
    let rule = match backend {
        Backend::Sqlite => {
            "CREATE TRIGGER refuse_unwritable BEFORE INSERT ON reflections WHEN NEW.text = 'unwritable' \
             BEGIN SELECT RAISE(ABORT, 'refused by the test''s rule'); END"
        }
        Backend::Postgres => {
            "ALTER TABLE reflections ADD CONSTRAINT refuse_unwritable CHECK (text IS DISTINCT FROM 'unwritable')"
        }
    };
    db.execute(rule).await?;

    let outage = db.make_unavailable().await;
    let reflect = |i: usize, id: u8, text: &'static str| {
        let (student, prompt) = students[i].clone();
        tokio::spawn(async move { student.reflect([id; 16], prompt, Some(2), Some(text)).await })
    };
    // The first is the group the writer retries; the next two queue behind it as one group.
    let first = reflect(0, 1, "first");
    until(
        Duration::from_secs(20),
        "degraded health",
        move || async move { Ok(health(s).await?.1["status"] == "degraded") },
    )
    .await?;
    let unwritable = reflect(0, 2, "unwritable");
    let other_school = reflect(1, 3, "from school b");
    until(Duration::from_secs(10), "three queued", move || async move {
        Ok(health(s).await?.1["store"]["queued"].as_u64() == Some(3))
    })
    .await?;
    outage.end().await;

    answered("the first reflection", first).await???;
    answered("the other school's reflection", other_school).await???;
    assert_eq!(refused_code(answered("the unwritable reflection", unwritable).await??), Some(ErrorCode::StoreRefused));
    until(Duration::from_secs(10), "healthy again", move || async move { Ok(health(s).await?.0 == 200) }).await?;
    // Later writes go on, and the refused id was never stored.
    let (student_a, prompt) = students[0].clone();
    answered("a later reflection", student_a.reflect([4; 16], prompt, None, Some("later"))).await??;
    assert_eq!(exported_ids(&server, "a", "s-1").await?, vec![hex(&[1; 16]), hex(&[4; 16])]);
    assert_eq!(exported_ids(&server, "b", "s-1").await?, vec![hex(&[3; 16])]);
    let (_, body) = health(&server).await?;
    assert_eq!((body["status"].as_str(), body["store"]["queued"].as_u64()), (Some("ok"), Some(0)), "{body}");
    let metrics = reqwest::get(format!("http://{}/metrics", server.http)).await?.text().await?;
    assert!(metrics.lines().any(|l| l == "downbeat_sel_jobs_refused_total 1"), "{metrics}");
    Ok(())
}

/// A PostgreSQL database turned read-only (an operator's freeze, or a standby): writes are
/// refused with SQLSTATE 25006, which is the database's state, not the rows': health turns
/// degraded and reflections wait unacknowledged. Once it is writable again, everything queued
/// is stored and health recovers by itself, although the server's open connections still
/// carry the read-only default: the store replaces connections that saw a read-only refusal.
#[tokio::test]
async fn a_read_only_database_degrades_and_recovers_by_itself_postgres() -> Result<()> {
    let db = TestDatabase::new(Backend::Postgres).await;
    let Class { server, teacher_token, code, .. } = class(&db, |_| {}).await?;
    let ana = Arc::new(server.connect(&code, &server.student("s-ana")).await?);
    set_prompt(&server, &code, &teacher_token, "How do you feel?").await?;
    let prompt = prompt_of(&ana).await?;
    let frozen = db.make_read_only().await.context("PostgreSQL has a read-only mode")?;
    let waiting = tokio::spawn({
        let ana = ana.clone();
        async move { ana.reflect([9; 16], prompt, Some(3), None).await }
    });
    let s = &server;
    until(Duration::from_secs(20), "degraded health", move || async move {
        let (status, body) = health(s).await?;
        Ok(status == 503 && body["status"] == "degraded")
    })
    .await?;
    assert!(!waiting.is_finished(), "acknowledged while the database was read-only");
    frozen.end().await;
    answered("the reflection that waited", waiting).await???;
    until(Duration::from_secs(10), "healthy again", move || async move { Ok(health(s).await?.0 == 200) }).await?;
    let export = get(&server, "/api/students/s-ana/export", &server.admin("a-1"), 200).await?;
    assert_eq!(export["reflections"].as_array().map(Vec::len), Some(1), "{export}");
    Ok(())
}

/// The counts of a stretch of a session's timeline, or of a student's participation, that a
/// chart shows.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Tallied {
    notes: i64,
    timed: i64,
    on_beat: i64,
    offset_abs_sum_micros: i64,
    offset_sum_micros: i64,
}

impl Tallied {
    fn of(participation: &Value) -> Result<Self> {
        let field = |name: &str| participation[name].as_i64().with_context(|| format!("{name} in {participation}"));
        Ok(Self {
            notes: field("notes")?,
            timed: field("timed")?,
            on_beat: field("on_beat")?,
            offset_abs_sum_micros: field("offset_abs_sum_micros")?,
            offset_sum_micros: field("offset_sum_micros")?,
        })
    }

    fn add(&mut self, other: &Self) {
        self.notes += other.notes;
        self.timed += other.timed;
        self.on_beat += other.on_beat;
        self.offset_abs_sum_micros += other.offset_abs_sum_micros;
        self.offset_sum_micros += other.offset_sum_micros;
    }

    /// One timed note `offset_nanos` from its beat, counted as the server counts it.
    fn count(&mut self, offset_nanos: i64) {
        self.notes += 1;
        self.timed += 1;
        self.on_beat += i64::from(offset_nanos.unsigned_abs() <= 60_000_000);
        self.offset_abs_sum_micros += (offset_nanos.unsigned_abs() / 1000) as i64;
        self.offset_sum_micros += offset_nanos / 1000;
    }
}

/// Plays `plan` (beats after `first`, offsets in ms) on `client`'s synced clock; what the
/// server must count.
async fn play_plan(client: &Client, first: i64, plan: &[(i64, i64)]) -> Result<Tallied> {
    let timeline = client.timeline().context("timeline")?;
    let mut truth = Tallied::default();
    for &(beat, offset_ms) in plan {
        let beat = first + beat;
        let local = client.local_time_of_beat(beat).context("beat time")?;
        let at = ClientNanos((local.0 as i64 + offset_ms * 1_000_000) as u64);
        let played_at = play_at(client, at).await?;
        let sounds = timeline.time_of(beat).context("beat sounds")?;
        truth.count(played_at.0 as i64 - sounds.0 as i64);
    }
    Ok(truth)
}

/// A past session's chart: the class plays two bursts 10 s apart (in different stretches of
/// the timeline), the room closes, and its timeline adds up to exactly what the students
/// played, burst by burst, and stretch by stretch to the rows stored; each student's
/// on-beat share and mean early or late offset are theirs. Only the teachers who ran it and
/// the school's admins read it or see it listed: another school's teacher gets what an
/// unknown id gets, a student and another teacher of the school are refused.
async fn a_past_sessions_timeline_counts_what_the_class_played(backend: Backend) -> Result<()> {
    let db = TestDatabase::new(backend).await;
    let server = two_schools(&db).await?;
    let mint = |tenant: &str, role, sub: &str| mint(&server, tenant, role, sub);
    let teacher_token = mint("a", Role::Teacher, "t-1");
    let code = server.create_room(&teacher_token, 120.0, 4).await?;
    let teacher = server.connect(&code, &teacher_token).await?;
    let subjects = ["s-early", "s-late", "s-mixed"];
    let mut students = Vec::new();
    for sub in subjects {
        students.push(Arc::new(server.connect(&code, &mint("a", Role::Student, sub)).await?));
    }
    for student in &students {
        student.wait_synced(SYNC).await?;
    }
    let applied = teacher.change(Change::Start { count_in_bars: 0 }).await?.applied.context("applied")?;
    for student in &students {
        downbeat_tests::wait_for_epoch(student, applied.epoch).await?;
    }
    let first = applied.effective_beat + 2;
    // (beat, ms from it): early, late, and one on and one off the beat.
    let plans: [[&[(i64, i64)]; 2]; 3] = [
        [&[(0, -30), (1, -20)], &[(20, -40)]],
        [&[(0, 25), (2, 45)], &[(20, 10), (21, 90)]],
        [&[(1, -100), (3, 5)], &[(22, -5)]],
    ];
    let mut bursts = [Tallied::default(); 2];
    let mut per_student: BTreeMap<&str, Tallied> = BTreeMap::new();
    for (burst, total) in bursts.iter_mut().enumerate() {
        let mut players = Vec::new();
        for (student, plan) in students.iter().zip(&plans) {
            let (student, plan) = (student.clone(), plan[burst].to_vec());
            players.push(tokio::spawn(async move { play_plan(&student, first, &plan).await }));
        }
        for (sub, player) in subjects.iter().zip(players) {
            let truth = player.await??;
            total.add(&truth);
            per_student.entry(sub).or_default().add(&truth);
        }
        // Committed (the feed follows the commit) before the next burst is played.
        let want: Vec<(u64, i64)> =
            students.iter().zip(subjects).map(|(s, sub)| (s.member_id(), per_student[sub].notes)).collect();
        let mut latest: HashMap<u64, u32> = HashMap::new();
        events_until(&teacher, |e| {
            if let Event::Participation(notices) = e {
                latest.extend(notices.iter().map(|n| (n.member_id, n.notes)));
            }
            want.iter().all(|(m, n)| latest.get(m).is_some_and(|got| i64::from(*got) == *n))
        })
        .await?;
    }

    // The room closes: the session is past once its end is written.
    let (status, body) = server.http("DELETE", &format!("/api/rooms/{code}"), Some(&teacher_token), None).await?;
    ensure!(status == 200, "closing answered {status}: {body}");
    let listed = get(&server, "/api/sessions", &teacher_token, 200).await?;
    let id = listed["sessions"][0]["id"].as_str().context("a listed session")?.to_owned();
    assert_eq!(listed["sessions"].as_array().map(Vec::len), Some(1), "{listed}");
    assert_eq!(listed["sessions"][0]["room_code"].as_str().map(|c| c.replace('-', "")), Some(code.replace('-', "")));
    assert_eq!(listed["sessions"][0]["students"], 3);
    assert_eq!(listed["sessions"][0]["notes"], bursts[0].notes + bursts[1].notes);
    let (s, path) = (&server, format!("/api/sessions/{id}/sel"));
    let (t, p) = (teacher_token.as_str(), path.as_str());
    until(Duration::from_secs(10), "the session's end", move || async move {
        Ok(get(s, p, t, 200).await?["session"]["ended_at_ms"].as_i64().is_some())
    })
    .await?;
    let sel = get(&server, &path, &teacher_token, 200).await?;
    assert!(!sel.to_string().contains("Someone"), "no name in the view: {sel}");

    // The timeline: stretches of 5 s from the session's start (it lasted well under 5 min).
    let timeline = &sel["timeline"];
    assert_eq!(timeline["bucket_ms"], 5_000, "{timeline}");
    let buckets = timeline["buckets"].as_array().context("buckets")?;
    let mut counted = Vec::new();
    for (i, b) in buckets.iter().enumerate() {
        assert_eq!(b["from_ms"].as_i64(), Some(i as i64 * 5_000), "{b}");
        assert_eq!(b["to_ms"].as_i64(), Some((i as i64 + 1) * 5_000), "{b}");
        counted.push(Tallied::of(&b["participation"])?);
    }
    // Every note, once: the stretches before the second burst hold the first exactly.
    let mut total = Tallied::default();
    let mut split = None;
    for (i, c) in counted.iter().enumerate() {
        total.add(c);
        if total == bursts[0] && split.is_none() {
            split = Some(i + 1);
        }
    }
    let mut both = bursts[0];
    both.add(&bursts[1]);
    assert_eq!(total, both, "{timeline}");
    let split = split.with_context(|| format!("no stretch ends the first burst: {timeline}"))?;
    let mut second = Tallied::default();
    counted[split..].iter().for_each(|c| second.add(c));
    assert_eq!(second, bursts[1], "{timeline}");
    assert!(counted.last().is_some_and(|c| c.notes > 0), "the last stretch has notes: {timeline}");
    // The empty stretches between the bursts are there, so the time axis is true.
    assert!(buckets.len() >= 3, "{timeline}");
    assert!(buckets.iter().all(|b| b["students"].as_i64().is_some_and(|n| (0..=3).contains(&n))));
    let on_beat_ratio = |b: &Value| b["participation"]["on_beat_ratio"].as_f64();
    for (b, c) in buckets.iter().zip(&counted) {
        let want = (c.timed > 0).then(|| c.on_beat as f64 / c.timed as f64);
        assert_eq!(on_beat_ratio(b), want, "{b}");
    }

    // Stretch by stretch, the rows as stored (read back in the export), grouped here.
    let started = sel["session"]["started_at_ms"].as_i64().context("started")?;
    let admin = mint("a", Role::Admin, "a-1");
    let mut stored: BTreeMap<i64, Tallied> = BTreeMap::new();
    for sub in subjects {
        let export = get(&server, &format!("/api/students/{sub}/export"), &admin, 200).await?;
        for row in export["participation"].as_array().context("rows")?.iter().filter(|r| r["kind"] == "notes") {
            let at = row["at_ms"].as_i64().context("at_ms")?;
            stored.entry((at - started).max(0) / 5_000).or_default().add(&Tallied::of(&row["counts"])?);
        }
    }
    for (i, c) in counted.iter().enumerate() {
        assert_eq!(stored.get(&(i as i64)).copied().unwrap_or_default(), *c, "stretch {i}");
    }

    // Each student: their on-beat share and mean early or late offset.
    for sub in subjects {
        let truth = per_student[sub];
        let p = &student_in(&sel, sub).with_context(|| format!("{sub} in {sel}"))?["participation"];
        let got = Tallied::of(p)?;
        assert_eq!(got, truth, "{sub}");
        assert_eq!(p["on_beat_ratio"].as_f64(), Some(truth.on_beat as f64 / truth.timed as f64), "{sub}");
        let signed = p["mean_signed_offset_ms"].as_f64().context("signed mean")?;
        assert_eq!(signed, (truth.offset_sum_micros / truth.timed) as f64 / 1000.0, "{sub}");
    }
    let lean = |sub: &str| student_in(&sel, sub).and_then(|s| s["participation"]["mean_signed_offset_ms"].as_f64());
    assert!(lean("s-early").is_some_and(|ms| ms < -20.0), "early: {:?}", lean("s-early"));
    assert!(lean("s-late").is_some_and(|ms| ms > 20.0), "late: {:?}", lean("s-late"));

    // Who may read it: its teacher and the school's admins; another school's teacher gets
    // exactly what an unknown id gets; a student and another teacher are refused.
    get(&server, &path, &admin, 200).await?;
    let teacher_b = mint("b", Role::Teacher, "t-1");
    let (status, other_school) = server.http("GET", &path, Some(&teacher_b), None).await?;
    let (unknown_status, unknown) =
        server.http("GET", "/api/sessions/no-such-session/sel", Some(&teacher_b), None).await?;
    assert_eq!((status, &other_school), (unknown_status, &unknown));
    assert_eq!(status, 404, "{other_school}");
    let (status, body) = server.http("GET", &path, Some(&mint("b", Role::Admin, "a-1")), None).await?;
    assert_eq!((status, &body), (404, &unknown));
    for token in [mint("a", Role::Student, "s-early"), mint("a", Role::Teacher, "t-2")] {
        let (status, body) = server.http("GET", &path, Some(&token), None).await?;
        assert_eq!((status, body["error"]["code"].as_str()), (403, Some("forbidden")), "{body}");
        assert!(body.get("timeline").is_none());
    }
    // The list: the session is its teacher's and the admin's, nobody else's.
    let ids = |listed: &Value| -> Vec<String> {
        listed["sessions"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|s| s["id"].as_str().map(str::to_owned))
            .collect()
    };
    assert_eq!(ids(&get(&server, "/api/sessions", &admin, 200).await?), [id]);
    assert!(ids(&get(&server, "/api/sessions", &mint("a", Role::Teacher, "t-2"), 200).await?).is_empty());
    assert!(ids(&get(&server, "/api/sessions", &teacher_b, 200).await?).is_empty());
    let (status, body) = server.http("GET", "/api/sessions", Some(&mint("a", Role::Student, "s-early")), None).await?;
    assert_eq!((status, body["error"]["code"].as_str()), (403, Some("forbidden")), "{body}");
    Ok(())
}
