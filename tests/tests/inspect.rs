//! The operators' inspector end to end, over real sockets, on SQLite and on PostgreSQL: an
//! operator sees both schools' rooms and every session's transport figures (never a child's
//! name or id), observes a room's events live, sends a test note that every member schedules
//! at one instant, sends a test prompt, ends one session and closes a room; every action is in
//! the audit log with its outcome. Operators' tokens open nothing else, and nobody else's
//! token opens the inspector.

use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use downbeat_client::{Client, Event};
use downbeat_engine::room::TEST_NOTE_FROM;
use downbeat_protocol::{Change, ControlOp, ErrorCode, MicroBpm};
use downbeat_server::auth::Role;
use downbeat_server::config::TenantLimits;
use downbeat_server::sel::store::Store;
use downbeat_tests::db::{Backend, TestDatabase};
use downbeat_tests::{TestServer, events_until, on_both_backends, operators, school};
use serde_json::{Value, json};

on_both_backends!(an_operator_inspects_observes_and_acts_and_every_action_is_audited);

const SECRET_A: &[u8; 32] = b"school-a-secret-0123456789abcdef";
const SECRET_B: &[u8; 32] = b"school-b-secret-0123456789abcdef";
const SECRET_OPS: &[u8; 32] = b"operators-secret-0123456789abcde";
const WAIT: Duration = Duration::from_secs(10);

/// An observer's stream of events (one JSON object a line).
struct Observer {
    response: reqwest::Response,
    buffer: Vec<u8>,
}

impl Observer {
    async fn open(server: &TestServer, path: &str, token: &str) -> Result<Self> {
        let response =
            reqwest::Client::new().get(format!("http://{}{path}", server.http)).bearer_auth(token).send().await?;
        ensure!(response.status() == 200, "observe answered {}", response.status());
        let content_type = response.headers().get("content-type").and_then(|v| v.to_str().ok()).unwrap_or_default();
        ensure!(content_type == "application/x-ndjson", "{content_type}");
        Ok(Self { response, buffer: Vec::new() })
    }

    /// The next event (`None` once the stream ended).
    async fn next(&mut self) -> Result<Option<Value>> {
        loop {
            if let Some(end) = self.buffer.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = self.buffer.drain(..=end).collect();
                return Ok(Some(serde_json::from_slice(&line)?));
            }
            match tokio::time::timeout(WAIT, self.response.chunk()).await.context("waiting for an event")?? {
                Some(chunk) => self.buffer.extend_from_slice(&chunk),
                None => return Ok(None),
            }
        }
    }

    /// Reads events until one of `kind` for which `done` holds; returns it.
    async fn until(&mut self, kind: &str, done: impl Fn(&Value) -> bool) -> Result<Value> {
        while let Some(event) = self.next().await? {
            if event["event"] == kind && done(&event) {
                return Ok(event);
            }
        }
        bail!("the stream ended before a {kind} event")
    }
}

async fn an_operator_inspects_observes_and_acts_and_every_action_is_audited(backend: Backend) -> Result<()> {
    let db = TestDatabase::new(backend).await;
    let server = TestServer::start_on(&db, |c| {
        c.tenants =
            vec![school("a", SECRET_A, TenantLimits::default()), school("b", SECRET_B, TenantLimits::default())];
        c.operators = Some(operators(SECRET_OPS));
    })
    .await?;
    let mint = |tenant: &str, role, sub: &str, name: &str| {
        server.tenants.mint(tenant, role, sub, name, Duration::from_secs(3600)).expect("mints")
    };
    let operator = server.operator("op-1");
    let teacher_a = mint("a", Role::Teacher, "t-a", "Ms. Rivera");
    let teacher_b = mint("b", Role::Teacher, "t-b", "Mr. Okafor");
    let code_a = server.create_room(&teacher_a, 120.0, 4).await?;
    let code_b = server.create_room(&teacher_b, 90.0, 3).await?;
    let teacher = server.connect(&code_a, &teacher_a).await?;
    let mut students = Vec::new();
    for i in 1..=3 {
        let token = mint("a", Role::Student, &format!("pupil-{i}"), &format!("Child Name{i}"));
        let mut options = server.options(&code_a, &token);
        options.report_interval = Some(Duration::from_secs(1));
        students.push(Client::connect(options).await?);
    }
    let _in_b = server.connect(&code_b, &mint("b", Role::Student, "pupil-b", "Child NameB")).await?;

    // Nobody else opens the inspector; an operator's token opens nothing of a school.
    for token in [&teacher_a, &mint("a", Role::Student, "pupil-1", "x"), &mint("a", Role::Admin, "ad", "Admin")] {
        server.call("GET", "/api/inspect", token, None, (403, Some("forbidden"))).await?;
    }
    server.call("GET", "/api/rooms", &operator, None, (403, Some("forbidden"))).await?;
    server.call("GET", &format!("/api/rooms/{code_a}/sel"), &operator, None, (403, Some("forbidden"))).await?;
    server.call("GET", "/api/students/pupil-1/export", &operator, None, (403, Some("forbidden"))).await?;
    let prompt = json!({"text": "How did we do?"});
    server
        .call("POST", &format!("/api/rooms/{code_a}/prompt"), &operator, Some(prompt), (403, Some("forbidden")))
        .await?;
    // Reflections of a past session, whatever its id.
    server
        .call("GET", "/api/sessions/00000000000000000000000000000000/sel", &operator, None, (403, Some("forbidden")))
        .await?;
    let joined = server.connect(&code_a, &operator).await;
    ensure!(joined.is_err(), "an operator joined a room");
    // A school's key cannot make an operator, nor the operators' key a school's teacher.
    let forged = mint("a", Role::Operator, "t-a", "Ms. Rivera");
    server.call("GET", "/api/inspect", &forged, None, (401, Some("unauthorized"))).await?;
    let claims = downbeat_server::auth::Claims {
        iss: "https://sso.district.example/operators".into(),
        aud: "downbeat".into(),
        exp: chrono_now()? + 600,
        iat: None,
        nbf: None,
        sub: "op-2".into(),
        tenant: "operators".into(),
        role: Role::Teacher,
        name: "Op".into(),
    };
    let teacher_by_operators = server.tenants.mint_claims("operators", &claims)?;
    server.call("GET", "/api/rooms", &teacher_by_operators, None, (401, Some("unauthorized"))).await?;

    // The overview: both schools, their rooms, every session's figures; no child's name or id.
    // Once every clock is synced (each sent clock-sync datagrams) and the teacher's presence
    // shows every student's report, the room has counted all of it.
    for client in std::iter::once(&teacher).chain(&students) {
        client.wait_synced(WAIT).await?;
    }
    let reported = || teacher.presence().iter().filter(|m| m.sync.synced && m.sync.rtt_micros > 0).count() >= 3;
    if !reported() {
        events_until(&teacher, |_| reported()).await?;
    }
    let overview = server.call("GET", "/api/inspect", &operator, None, (200, None)).await?;
    let seats = room_of(&overview, "a").map(|r| &r["seats"]).and_then(Value::as_array).context("seats")?;
    ensure!(seats.len() == 4, "{overview}");
    ensure!(seats.iter().all(|s| s["session"]["datagrams_received"].as_u64() > Some(0)), "{overview}");
    let text = overview.to_string();
    for secret in ["Child Name", "pupil-", "Ms. Rivera", "Mr. Okafor", "t-a", "t-b"] {
        ensure!(!text.contains(secret), "the inspector shows {secret:?}: {text}");
    }
    ensure!(overview["tenants"].as_array().map(Vec::len) == Some(2), "{overview}");
    let tenant_a = &overview["tenants"][0];
    ensure!(tenant_a["id"] == "a" && tenant_a["rooms"] == 1 && tenant_a["sessions"] == 4, "{tenant_a}");
    ensure!(overview["tenants"][1]["sessions"] == 1, "{overview}");
    let room = room_of(&overview, "a").context("school a's room")?;
    ensure!(room["code"].as_str().is_some_and(|c| c.replace('-', "") == code_a.replace('-', "")), "{room}");
    ensure!(room["tempo_bpm"] == 120.0 && room["running"] == false, "{room}");
    for seat in room["seats"].as_array().context("seats")? {
        let session = &seat["session"];
        ensure!(session["transport"] == "webtransport", "{seat}");
        ensure!(session["datagrams_sent"].as_u64().is_some(), "{seat}");
        let path = &session["path"];
        ensure!(
            path["rtt_micros"].as_u64().is_some_and(|rtt| rtt > 0) && path["packets_sent"].as_u64() > Some(0),
            "{seat}"
        );
        if seat["role"] == "student" {
            ensure!(
                session["rtt_micros"].as_u64() > Some(0) && session["uncertainty_micros"].as_u64().is_some(),
                "{seat}"
            );
        }
    }
    let metrics = server.http_bytes("/api/inspect/metrics", &operator).await?;
    ensure!(metrics.0 == 200 && String::from_utf8(metrics.2)?.contains("downbeat_sessions_active 5"), "metrics");

    // Observing: the room as it is, then what happens in it, by member id.
    let events_path = format!("/api/inspect/rooms/a/{code_a}/events");
    let mut observer = Observer::open(&server, &events_path, &operator).await?;
    let first = observer.next().await?.context("the first event")?;
    ensure!(first["event"] == "observing" && first["room"]["seats"].as_array().map(Vec::len) == Some(4), "{first}");
    teacher.control(ControlOp::Timeline(Change::SetTempo(MicroBpm::from_bpm(100)))).await?;
    observer
        .until("timeline", |e| e["segments"].as_array().is_some_and(|s| s.iter().any(|s| s["tempo_bpm"] == 100.0)))
        .await?;
    teacher.control(ControlOp::Timeline(Change::Start { count_in_bars: 0 })).await?;
    let played = students[0].play_note(64, 90, 0)?;
    let notes = observer.until("notes", |e| e["notes"][0]["midi"] == 64).await?;
    ensure!(notes["from"] == students[0].member_id(), "{notes}");
    ensure!(!notes.to_string().contains("Child"), "{notes}");
    let _ = played;

    // A test note: every member schedules it, at one instant, from nobody in the room.
    let sent = server
        .call(
            "POST",
            &format!("/api/inspect/rooms/a/{code_a}/test-note"),
            &operator,
            Some(json!({"midi": 60})),
            (200, None),
        )
        .await?;
    let sounds_at_ms = sent["sounds_at_unix_ms"].as_i64().context("sounds_at_unix_ms")?;
    let mut instants = Vec::new();
    for client in std::iter::once(&teacher).chain(&students) {
        let note = loop {
            let n = tokio::time::timeout(WAIT, client.next_note()).await?.context("session closed")?;
            if n.from == TEST_NOTE_FROM {
                break n;
            }
        };
        ensure!(note.note.midi == 60, "{note:?}");
        instants.push(note.server_at);
    }
    ensure!(instants.windows(2).all(|w| w[0] == w[1]), "one instant for everyone: {instants:?}");
    observer.until("notes", |e| e["from"] == TEST_NOTE_FROM && e["notes"][0]["midi"] == 60).await?;
    let now_ms = i64::try_from(chrono_now()? * 1000)?;
    ensure!((sounds_at_ms - now_ms).abs() < 5_000, "sounds at {sounds_at_ms}, now {now_ms}");
    server
        .call(
            "POST",
            &format!("/api/inspect/rooms/a/{code_a}/test-note"),
            &operator,
            Some(json!({"midi": 60, "instrument": 200})),
            (400, Some("note_out_of_range")),
        )
        .await?;

    // A test prompt reaches the students.
    server
        .call("POST", &format!("/api/inspect/rooms/a/{code_a}/test-prompt"), &operator, Some(json!({})), (200, None))
        .await?;
    events_until(&students[1], |e| matches!(e, Event::Prompt(Some(p)) if p.text.contains("Test prompt"))).await?;
    observer.until("prompt", |e| e["text"].as_str().is_some_and(|t| t.contains("Test prompt"))).await?;

    // Ending one session: it hears why, the others stay.
    let overview = server.call("GET", "/api/inspect", &operator, None, (200, None)).await?;
    let room = room_of(&overview, "a").context("room")?;
    let third = students[2].member_id();
    let seat = room["seats"].as_array().context("seats")?.iter().find(|s| s["member_id"] == third).context("seat")?;
    let session = seat["session"]["id"].as_u64().context("session id")?;
    let end_path = format!("/api/inspect/rooms/a/{code_a}/sessions/{session}");
    server.call("DELETE", &end_path, &operator, None, (200, None)).await?;
    events_until(&students[2], |e| matches!(e, Event::Error(ErrorCode::EndedByOperator, _))).await?;
    observer.until("member_left", |e| e["member_id"] == third).await?;
    server.call("DELETE", &end_path, &operator, None, (404, Some("member_not_found"))).await?;
    server
        .call(
            "DELETE",
            &format!("/api/inspect/rooms/a/ZZZZZZZZ/sessions/{session}"),
            &operator,
            None,
            (404, Some("room_not_found")),
        )
        .await?;
    server
        .call("DELETE", &format!("/api/inspect/rooms/b/{code_a}"), &operator, None, (404, Some("room_not_found")))
        .await?;

    // Closing the room: everyone is told, the observer's stream says so and ends.
    server.call("DELETE", &format!("/api/inspect/rooms/a/{code_a}"), &operator, None, (200, None)).await?;
    events_until(&students[0], |e| matches!(e, Event::RoomClosed(_))).await?;
    observer.until("room_closed", |_| true).await?;
    ensure!(observer.next().await?.is_none_or(|e| e["event"] != "notes"), "the stream goes on after the close");

    // The audit log: every action, newest first, with who and how it ended; no child in it.
    let log = server.call("GET", "/api/inspect/audit?limit=20", &operator, None, (200, None)).await?;
    let entries = log["entries"].as_array().context("entries")?;
    let actions: Vec<(&str, &str)> = entries
        .iter()
        .map(|e| (e["action"].as_str().unwrap_or_default(), e["outcome"].as_str().unwrap_or_default()))
        .collect();
    let expected = [
        ("close_room", "ok"),
        ("close_room", "room_not_found"),
        ("end_session", "room_not_found"),
        ("end_session", "member_not_found"),
        ("end_session", "ok"),
        ("test_prompt", "ok"),
        ("test_note", "note_out_of_range"),
        ("test_note", "ok"),
        ("observe", "ok"),
    ];
    ensure!(actions == expected, "{actions:?}");
    ensure!(entries.iter().all(|e| e["operator_id"] == "op-1" && e["operator_name"] == "Operator op-1"), "{log}");
    ensure!(entries[4]["target"] == format!("session {session}") && entries[4]["tenant_id"] == "a", "{log}");
    let store = Store::open(db.url()).await?;
    for student in ["pupil-1", "pupil-2", "pupil-3"] {
        let in_audit = store.audit_log(100).await?.iter().filter(|e| format!("{e:?}").contains(student)).count();
        ensure!(in_audit == 0, "{student} in the audit log");
    }
    server.call("GET", "/api/inspect/audit?limit=0", &operator, None, (400, Some("bad_request"))).await?;
    server.call("GET", "/api/inspect/audit", &teacher_a, None, (403, Some("forbidden"))).await?;
    store.close().await;
    Ok(())
}

/// Seconds since the Unix epoch.
fn chrono_now() -> Result<u64> {
    Ok(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_secs())
}

fn room_of<'a>(overview: &'a Value, tenant: &str) -> Option<&'a Value> {
    overview["rooms"].as_array()?.iter().find(|r| r["tenant"] == tenant)
}
