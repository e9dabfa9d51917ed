//! Teachers act on their own classes, end to end over real sockets, on SQLite and on
//! PostgreSQL: a room is run by its owner and the co-teachers the owner adds (control stream
//! and HTTP), its SEL data (live feed, its session's view, past sessions) is theirs and the
//! school admins', and only admins export or delete a child's data. Another teacher of the
//! same school is refused with `forbidden` and changes nothing.

use anyhow::{Context, Result, bail};
use downbeat_client::{Client, ClientError, Event};
use downbeat_protocol::{Change, ControlOp, ErrorCode};
use downbeat_server::sel::store::Store;
use downbeat_tests::db::{Backend, TestDatabase};
use downbeat_tests::{TestServer, events_until, on_both_backends};
use serde_json::json;

on_both_backends!(
    another_teacher_neither_runs_nor_reads_a_room_until_the_owner_adds_them,
    only_admins_export_or_delete_a_child,
    a_past_session_is_read_by_the_teachers_who_ran_it,
);

async fn server_on(db: &TestDatabase) -> Result<TestServer> {
    let url = db.url().to_owned();
    TestServer::start_with(|c| c.database_url = Some(url)).await
}

const OK: (u16, Option<&str>) = (200, None);
const FORBIDDEN: (u16, Option<&str>) = (403, Some("forbidden"));

/// The stable code of a refused request.
fn refused<T>(result: Result<T, ClientError>) -> Option<ErrorCode> {
    match result {
        Err(ClientError::Refused { code, .. }) => Some(code),
        _ => None,
    }
}

/// The room's timeline epoch and whether it runs, as the owner sees it over HTTP.
async fn timeline(server: &TestServer, code: &str, token: &str) -> Result<(u64, bool)> {
    let room = server.call("GET", &format!("/api/rooms/{code}"), token, None, OK).await?;
    let epoch = room["timeline"]["epoch"].as_u64().context("epoch")?;
    let running = room["timeline"]["segments"].as_array().context("segments")?.iter().any(|s| s["running"] == true);
    Ok((epoch, running))
}

/// Reads `client`'s events until the prompt `text` arrives; whether a reflection came first.
async fn heard_a_reflection_before_prompt(client: &Client, text: &str) -> Result<bool> {
    let seen = events_until(client, |e| matches!(e, Event::Prompt(Some(p)) if p.text.as_str() == text)).await?;
    Ok(seen.iter().any(|e| matches!(e, Event::Reflection(_))))
}

async fn another_teacher_neither_runs_nor_reads_a_room_until_the_owner_adds_them(backend: Backend) -> Result<()> {
    let db = TestDatabase::new(backend).await;
    let server = server_on(&db).await?;
    let (owner_token, other_token) = (server.teacher("t-owner"), server.teacher("t-other"));
    let code = server.create_room(&owner_token, 120.0, 4).await?;
    let owner = server.connect(&code, &owner_token).await?;
    // Another teacher of the same school may join (a visitor), but not run the room.
    let other = server.connect(&code, &other_token).await?;
    let ana = server.connect(&code, &server.student("s-ana")).await?;
    let student_id = ana.member_id();
    let room = format!("/api/rooms/{code}");
    let before = timeline(&server, &code, &owner_token).await?;

    // Refused on the control stream...
    let start = Change::Start { count_in_bars: 0 };
    assert_eq!(refused(other.change(start).await), Some(ErrorCode::Forbidden));
    assert_eq!(refused(other.set_prompt("Whose room is it?").await), Some(ErrorCode::Forbidden));
    assert_eq!(
        refused(other.control(ControlOp::Mute { member: student_id, muted: true }).await),
        Some(ErrorCode::Forbidden)
    );
    assert_eq!(refused(other.control(ControlOp::Close).await), Some(ErrorCode::Forbidden));
    // ...and over HTTP, the SEL data included.
    for (method, path, body) in [
        ("POST", format!("{room}/start"), None),
        ("POST", format!("{room}/tempo"), Some(json!({"tempo_bpm": 90}))),
        ("POST", format!("{room}/prompt"), Some(json!({"text": "Whose room?"}))),
        ("POST", format!("{room}/members/{student_id}/mute"), Some(json!({"muted": true}))),
        ("DELETE", format!("{room}/members/{student_id}"), None),
        ("DELETE", room.clone(), None),
        ("GET", format!("{room}/sel"), None),
        ("PUT", format!("{room}/co-teachers/t-other"), None),
    ] {
        server.call(method, &path, &other_token, body, FORBIDDEN).await?;
    }
    // Nothing changed: the room is open and stopped, Ana is seated and not muted.
    assert_eq!(timeline(&server, &code, &owner_token).await?, before);
    assert!(!before.1);
    let members = server.call("GET", &room, &owner_token, None, OK).await?;
    let ana_seen = members["members"].as_array().context("members")?.iter().find(|m| m["id"] == student_id);
    assert_eq!(ana_seen.map(|m| m["muted"].clone()), Some(json!(false)));
    // The room's own listing is the owner's; the other teacher lists nothing.
    let listed = server.call("GET", "/api/rooms", &other_token, None, OK).await?;
    assert_eq!(listed["rooms"], json!([]));

    // The live feed reaches the owner only.
    owner.set_prompt("What did you hear?").await?;
    let prompt = loop {
        if let Some(p) = ana.prompt() {
            break p.id;
        }
        events_until(&ana, |e| matches!(e, Event::Prompt(Some(_)))).await?;
    };
    ana.reflect([1; 16], prompt, Some(4), Some("drums")).await?;
    events_until(&owner, |e| matches!(e, Event::Reflection(n) if n.id == [1; 16])).await?;
    // A later broadcast to everyone: the other teacher hears it with no reflection before it.
    owner.set_prompt("And now?").await?;
    assert!(!heard_a_reflection_before_prompt(&other, "And now?").await?, "the feed reached another teacher");

    // The owner adds the other teacher (twice: the second changes nothing).
    let added = server.call("PUT", &format!("{room}/co-teachers/t-other"), &owner_token, None, OK).await?;
    assert_eq!((&added["changed"], &added["co_teachers"]), (&json!(true), &json!(["t-other"])));
    let again = server.call("PUT", &format!("{room}/co-teachers/t-other"), &owner_token, None, OK).await?;
    assert_eq!((&again["changed"], &again["co_teachers"]), (&json!(false), &json!(["t-other"])));
    // Now they run it, on both paths, read its data and hear its feed.
    let applied = other.change(start).await?.applied.context("start applied")?;
    assert!(applied.epoch > before.0);
    server.call("POST", &format!("{room}/tempo"), &other_token, Some(json!({"tempo_bpm": 100})), OK).await?;
    let sel = server.call("GET", &format!("{room}/sel"), &other_token, None, OK).await?;
    assert_eq!(sel["reflections"].as_array().map(Vec::len), Some(1), "{sel}");
    assert_eq!(sel["co_teachers"], json!(["t-other"]));
    let listed = server.call("GET", "/api/rooms", &other_token, None, OK).await?;
    assert_eq!(listed["rooms"].as_array().map(Vec::len), Some(1));
    owner.set_prompt("One more?").await?;
    let prompt = loop {
        match ana.prompt() {
            Some(p) if p.text.as_str() == "One more?" => break p.id,
            _ => {
                events_until(&ana, |e| matches!(e, Event::Prompt(Some(_)))).await?;
            }
        }
    };
    ana.reflect([2; 16], prompt, Some(0), None).await?;
    events_until(&other, |e| matches!(e, Event::Reflection(n) if n.id == [2; 16])).await?;
    // A co-teacher runs the room but does not choose its teachers.
    server.call("PUT", &format!("{room}/co-teachers/t-third"), &other_token, None, FORBIDDEN).await?;

    // Removed (twice), they are a visitor again.
    let removed = server.call("DELETE", &format!("{room}/co-teachers/t-other"), &owner_token, None, OK).await?;
    assert_eq!((&removed["changed"], &removed["co_teachers"]), (&json!(true), &json!([])));
    let again = server.call("DELETE", &format!("{room}/co-teachers/t-other"), &owner_token, None, OK).await?;
    assert_eq!(again["changed"], json!(false));
    let running = timeline(&server, &code, &owner_token).await?;
    assert_eq!(refused(other.change(Change::Stop).await), Some(ErrorCode::Forbidden));
    server.call("POST", &format!("{room}/stop"), &other_token, None, FORBIDDEN).await?;
    server.call("GET", &format!("{room}/sel"), &other_token, None, FORBIDDEN).await?;
    server.call("DELETE", &room, &other_token, None, FORBIDDEN).await?;
    assert_eq!(timeline(&server, &code, &owner_token).await?, running);
    ana.reflect([3; 16], prompt, Some(3), None).await?;
    events_until(&owner, |e| matches!(e, Event::Reflection(n) if n.id == [3; 16])).await?;
    owner.set_prompt("Last one").await?;
    assert!(!heard_a_reflection_before_prompt(&other, "Last one").await?, "the feed outlived the removal");

    // An admin reads the room's data but neither runs nor joins it.
    let admin = server.admin("a-1");
    server.call("GET", &format!("{room}/sel"), &admin, None, OK).await?;
    server.call("POST", &format!("{room}/stop"), &admin, None, FORBIDDEN).await?;
    server.call("PUT", &format!("{room}/co-teachers/a-1"), &admin, None, FORBIDDEN).await?;
    match server.connect(&code, &admin).await {
        Err(e) => match e.downcast_ref::<ClientError>() {
            Some(ClientError::Refused { code: ErrorCode::Forbidden, .. }) => {}
            _ => bail!("an admin's join was refused with {e}, not forbidden"),
        },
        Ok(_) => bail!("an admin joined a room"),
    }

    // The list is bounded.
    for i in 0..8 {
        server.call("PUT", &format!("{room}/co-teachers/t-{i}"), &owner_token, None, OK).await?;
    }
    server.call("PUT", &format!("{room}/co-teachers/t-8"), &owner_token, None, (400, Some("bad_request"))).await?;
    // Only the owner closes it.
    owner.control(ControlOp::Close).await?;
    Ok(())
}

/// A room of `owner_sub` with its owner and the student `s-ana` connected: the owner's token,
/// the code, and both clients.
async fn class(server: &TestServer, owner_sub: &str) -> Result<(String, String, Client, Client)> {
    let owner_token = server.teacher(owner_sub);
    let code = server.create_room(&owner_token, 120.0, 4).await?;
    let owner = server.connect(&code, &owner_token).await?;
    let ana = server.connect(&code, &server.student("s-ana")).await?;
    Ok((owner_token, code, owner, ana))
}

/// The owner asks a question and Ana answers `text`; returns once the answer is committed
/// (after everything queued for the store before it).
async fn answer(owner: &Client, ana: &Client, text: &str) -> Result<()> {
    owner.set_prompt("How was it?").await?;
    events_until(ana, |e| matches!(e, Event::Prompt(Some(_)))).await?;
    let prompt = ana.prompt().context("prompt")?.id;
    ana.reflect([7; 16], prompt, Some(4), Some(text)).await?;
    Ok(())
}

async fn only_admins_export_or_delete_a_child(backend: Backend) -> Result<()> {
    let db = TestDatabase::new(backend).await;
    let server = server_on(&db).await?;
    let (owner_token, _code, owner, ana) = class(&server, "t-1").await?;
    answer(&owner, &ana, "good").await?;

    // The class's own teacher and a student: refused, and nothing is deleted.
    for token in [&owner_token, &server.student("s-ana")] {
        server.call("GET", "/api/students/s-ana/export", token, None, FORBIDDEN).await?;
        server.call("DELETE", "/api/students/s-ana", token, None, FORBIDDEN).await?;
    }
    let store = Store::open(db.url()).await?;
    assert!(store.rows_mentioning("s-ana").await? >= 1);

    // The school's admin exports and deletes.
    let admin = server.admin("a-1");
    let export = server.call("GET", "/api/students/s-ana/export", &admin, None, OK).await?;
    assert_eq!(export["reflections"].as_array().map(Vec::len), Some(1), "{export}");
    let deleted = server.call("DELETE", "/api/students/s-ana", &admin, None, OK).await?;
    assert_eq!(deleted["reflections"], 1);
    assert_eq!(store.rows_mentioning("s-ana").await?, 0);
    store.close().await;
    Ok(())
}

async fn a_past_session_is_read_by_the_teachers_who_ran_it(backend: Backend) -> Result<()> {
    let db = TestDatabase::new(backend).await;
    let server = server_on(&db).await?;
    let (owner_token, code, owner, ana) = class(&server, "t-owner").await?;
    let room = format!("/api/rooms/{code}");
    // A co-teacher to the end, and one removed before it.
    server.call("PUT", &format!("{room}/co-teachers/t-co"), &owner_token, None, OK).await?;
    server.call("PUT", &format!("{room}/co-teachers/t-gone"), &owner_token, None, OK).await?;
    server.call("DELETE", &format!("{room}/co-teachers/t-gone"), &owner_token, None, OK).await?;
    // Committed after the room session's own row (written as it opened) and its co-teachers.
    answer(&owner, &ana, "we kept together").await?;
    let live = server.call("GET", &format!("{room}/sel"), &owner_token, None, OK).await?;
    let session = live["session"]["id"].as_str().context("session id")?.to_owned();
    server.call("DELETE", &room, &owner_token, None, OK).await?;
    drop((owner, ana));

    let past = format!("/api/sessions/{session}/sel");
    for token in [owner_token.clone(), server.teacher("t-co"), server.admin("a-1")] {
        let sel = server.call("GET", &past, &token, None, OK).await?;
        assert_eq!(sel["reflections"][0]["text"], "we kept together", "{sel}");
        assert_eq!(sel["session"]["teacher_id"], "t-owner");
        assert_eq!(sel["co_teachers"], json!(["t-co"]));
    }
    for token in [server.teacher("t-other"), server.teacher("t-gone"), server.student("s-ana")] {
        server.call("GET", &past, &token, None, FORBIDDEN).await?;
    }

    // A student's summary holds the sessions its reader may read, and nothing of others.
    let summary = |token: String| {
        let server = &server;
        async move { server.call("GET", "/api/students/s-ana/summary", &token, None, OK).await }
    };
    for token in [owner_token.clone(), server.teacher("t-co"), server.admin("a-1")] {
        let s = summary(token).await?;
        assert_eq!(s["reflections"].as_i64(), Some(1), "{s}");
        assert_eq!(s["sessions"].as_array().map(Vec::len), Some(1), "{s}");
        assert_eq!(s["sessions"][0]["room_session_id"], session.as_str());
    }
    let s = summary(server.teacher("t-other")).await?;
    assert_eq!((s["reflections"].as_i64(), s["sessions_attended"].as_i64()), (Some(0), Some(0)), "{s}");
    assert_eq!(s["sessions"], json!([]));
    assert!(!s.to_string().contains(&session), "{s}");
    Ok(())
}
