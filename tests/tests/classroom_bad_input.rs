//! Bad input in the classroom, end to end over real loopback: forged and stale tokens, students
//! reaching for teacher controls, another school's codes, closed and full rooms, out-of-range
//! changes and notes, note floods, join-code guessing and tokens that expire mid-lesson.
//!
//! Every case asserts the stable error code *and* that nothing changed: the room's members and
//! timeline epoch over HTTP, a bystander's presence, and (where a refused request would have
//! broadcast something) that the next event a member sees is the one a later, valid request
//! caused. Nothing here sleeps to synchronise: tests wait on events, acks and error frames, each
//! bounded by a timeout.
//!
//! Everything a session can be sent runs over both transports (`webtransport::…` and
//! `websocket::…`): one session type serves both, so both must refuse alike.

use std::collections::HashSet;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use downbeat_client::{Client, ClientError, Event};
use downbeat_protocol::{
    Assignment, BoundedString, BoundedVec, Change, ClientDatagram, ClientMessage, ControlOp, ControlRequest, ErrorCode,
    ErrorFrame, Hello, LeaveReason, MicroBpm, Name, Note, PROTOCOL_VERSION, PartName, RoomRequest, RoomSettings,
    ServerMessage, encode_client_datagram,
};
use downbeat_server::Config;
use downbeat_server::auth::{Claims, Role, Tenants};
use downbeat_server::config::TenantLimits;
use downbeat_tests::{RawLink, RawSession, TestServer, Transport, events_until, over_both_transports, school};
use serde_json::{Value, json};
use tokio::time::timeout;

/// Upper bound on any single wait in these tests.
const WAIT: Duration = Duration::from_secs(10);
const HOUR: Duration = Duration::from_secs(3600);
const SECRET_A: &[u8; 32] = b"school-a-secret-0123456789abcdef";
const SECRET_B: &[u8; 32] = b"school-b-secret-0123456789abcdef";

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

const B64URL: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";

/// base64url without padding (JWT parts, tenant secrets).
fn b64url(bytes: &[u8]) -> String {
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let b = [chunk[0], chunk.get(1).copied().unwrap_or(0), chunk.get(2).copied().unwrap_or(0)];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..=chunk.len() {
            out.push(char::from(B64URL[((n >> (18 - 6 * i)) & 63) as usize]));
        }
    }
    out
}

/// Decodes base64url without padding.
fn b64url_decode(text: &str) -> Result<Vec<u8>> {
    let (mut bits, mut nbits, mut out) = (0u32, 0u32, Vec::new());
    for c in text.bytes() {
        let v = B64URL.iter().position(|&x| x == c).context("not base64url")?;
        bits = (bits << 6) | v as u32;
        nbits += 6;
        if nbits >= 8 {
            nbits -= 8;
            out.push((bits >> nbits) as u8);
            bits &= (1 << nbits) - 1;
        }
    }
    Ok(out)
}

fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).expect("after 1970").as_secs()
}

/// Good claims of the demo tenant for `sub`, expiring in an hour.
fn demo_claims(role: Role, sub: &str) -> Claims {
    let now = unix_now();
    Claims {
        iss: downbeat_server::auth::DEMO_TENANT_ISSUER.to_owned(),
        aud: "downbeat".to_owned(),
        exp: now + 3600,
        iat: Some(now),
        nbf: None,
        sub: sub.to_owned(),
        tenant: downbeat_server::auth::DEMO_TENANT_ID.to_owned(),
        role,
        name: format!("{role} {sub}"),
    }
}

/// A server with schools "a" and "b"; "a" has `limits_a`.
async fn two_schools(limits_a: TenantLimits) -> Result<TestServer> {
    TestServer::start_with(|c| {
        c.tenants = vec![school("a", SECRET_A, limits_a), school("b", SECRET_B, TenantLimits::default())];
    })
    .await
}

/// A token of `tenant` (configured on `server`) valid for an hour.
fn mint(server: &TestServer, tenant: &str, role: Role, sub: &str) -> String {
    server.tenants.mint(tenant, role, sub, &format!("{role} {sub}"), HOUR).expect("the tenant mints")
}

/// The stable code of an HTTP error body.
fn code_of(body: &Value) -> Option<&str> {
    body["error"]["code"].as_str()
}

/// `GET /api/rooms/{code}` as `teacher`; must answer 200.
async fn room_json(server: &TestServer, code: &str, teacher: &str) -> Result<Value> {
    let (status, body) = server.http("GET", &format!("/api/rooms/{code}"), Some(teacher), None).await?;
    if status != 200 {
        bail!("room lookup answered {status}: {body}");
    }
    Ok(body)
}

fn epoch_of(room: &Value) -> u64 {
    room["timeline"]["epoch"].as_u64().expect("an epoch")
}

/// `/metrics` as text.
async fn metrics(server: &TestServer) -> Result<String> {
    Ok(reqwest::get(format!("http://{}/metrics", server.http)).await?.text().await?)
}

/// Reads events until the session ends; returns them.
async fn events_until_end(client: &Client) -> Result<Vec<Event>> {
    let read = async {
        let mut seen = Vec::new();
        while let Some(event) = client.next_event().await {
            seen.push(event);
        }
        seen
    };
    timeout(WAIT, read).await.context("waiting for the session to end")
}

/// Reads events up to and including the join of member `id` (nothing if the welcome already
/// listed it), so later reads see only what happened after it.
async fn wait_joined(client: &Client, id: u64) -> Result<()> {
    if client.welcome().members.iter().all(|m| m.id != id) {
        events_until(client, |e| matches!(e, Event::MemberJoined(m) if m.id == id)).await?;
    }
    Ok(())
}

/// Reads frames until an error frame arrives and returns it.
async fn error_frame(raw: &mut RawLink) -> Result<ErrorFrame> {
    let read = async {
        loop {
            match raw.read_message().await? {
                Some(ServerMessage::Error(e)) => return Ok(e),
                Some(_) => continue,
                None => bail!("the stream ended without an error frame"),
            }
        }
    };
    timeout(WAIT, read).await.context("waiting for an error frame")?
}

/// A hello with `token` for `code` on a fresh raw session: returns the error frame, after
/// checking the connection was then closed with the same code.
async fn refused_hello(server: &TestServer, token: &str, code: &str) -> Result<ErrorFrame> {
    let mut raw = server.raw_link().await?;
    raw.write_message(&RawSession::hello(PROTOCOL_VERSION, token, code)).await?;
    let frame = error_frame(&mut raw).await?;
    assert_eq!(frame.request_id, None, "a hello refusal answers no request");
    assert_eq!(raw.closed().await?, frame.code.as_u16(), "closed with the code it sent");
    Ok(frame)
}

fn refused_code<T: std::fmt::Debug>(result: Result<T, ClientError>) -> ErrorCode {
    match result {
        Err(ClientError::Refused { code, .. }) => code,
        other => panic!("expected a refusal, got {other:?}"),
    }
}

/// The code a join with `token` is refused with.
async fn join_refusal(server: &TestServer, code: &str, token: &str) -> ErrorCode {
    refused_code(Client::connect(server.options(code, token)).await)
}

/// A stopped room of the demo tenant, its teacher's token and a connected student bystander.
struct Class {
    server: TestServer,
    code: String,
    teacher: String,
    bystander: Client,
}

async fn demo_class(transport: Transport) -> Result<Class> {
    let server = TestServer::start().await?.over(transport);
    let teacher = server.teacher("t-1");
    let code = server.create_room(&teacher, 100.0, 4).await?;
    let bystander = server.connect(&code, &server.student("s-bystander")).await?;
    Ok(Class { server, code, teacher, bystander })
}

/// `token` is refused at the hello and over HTTP with `want`; the refusals are counted; the
/// room, its members and the bystander's presence are untouched, and the next member the
/// bystander hears of is a later, good join.
async fn token_is_refused_everywhere(class: &Class, token: &str, want: ErrorCode) -> Result<()> {
    let Class { server, code, teacher, bystander } = class;
    let before = room_json(server, code, teacher).await?;
    let presence = bystander.presence();
    let refused = server.stats.refused.get(want);
    let hello_failures = server.stats.hello_failures.get(want);

    let frame = refused_hello(server, token, code).await?;
    assert_eq!(frame.code, want, "{}", frame.message.as_str());

    let settings = json!({"name": "Forged", "tempo_bpm": 120.0, "beats_per_bar": 4});
    let requests = [
        ("GET", format!("/api/rooms/{code}"), None),
        ("GET", "/api/rooms".to_owned(), None),
        ("POST", "/api/rooms".to_owned(), Some(settings)),
        ("POST", format!("/api/rooms/{code}/start"), None),
        ("DELETE", format!("/api/rooms/{code}"), None),
    ];
    let http_count = requests.len() as u64;
    for (method, path, body) in requests {
        let (status, body) = server.http(method, &path, Some(token), body).await?;
        assert_eq!((status, code_of(&body)), (401, Some(want.as_str())), "{method} {path}: {body}");
    }

    assert_eq!(server.stats.refused.get(want), refused + 1 + http_count, "the hello and every request counted");
    assert_eq!(server.stats.hello_failures.get(want), hello_failures + 1);
    let text = metrics(server).await?;
    let line = format!("downbeat_refused_total{{code=\"{}\"}} {}", want.as_str(), refused + 1 + http_count);
    assert!(text.contains(&line), "{line} in\n{text}");
    let line = format!("downbeat_hello_failures_by_code_total{{code=\"{}\"}} {}", want.as_str(), hello_failures + 1);
    assert!(text.contains(&line), "{line} in\n{text}");

    // Nothing changed: same members and timeline, no room created, started or closed.
    let after = room_json(server, code, teacher).await?;
    assert_eq!(after["members"], before["members"]);
    assert_eq!(epoch_of(&after), epoch_of(&before));
    assert_eq!(server.stats.rooms_created.get(), 1);
    assert_eq!(server.stats.controls_applied.get(), 0);
    assert_eq!(bystander.presence(), presence);
    // The refused hello never joined: the next member the bystander hears of is this one.
    let probe = server.connect(code, &server.student("s-probe")).await?;
    let events = events_until(bystander, |e| matches!(e, Event::MemberJoined(_))).await?;
    assert!(matches!(events.last(), Some(Event::MemberJoined(m)) if m.id == probe.member_id()), "{events:?}");
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// 1. Tokens at the hello and over HTTP
// ---------------------------------------------------------------------------------------------

async fn a_token_signed_with_another_secret_is_unauthorized(transport: Transport) -> Result<()> {
    let class = demo_class(transport).await?;
    // Another server's demo tenant: same tenant id, issuer and audience, another 32-byte secret.
    let elsewhere = tempfile::tempdir()?;
    let forger = Tenants::new(&Config { data_dir: elsewhere.path().to_owned(), ..Config::default() })?;
    let forged = forger.mint("demo", Role::Teacher, "t-1", "Teacher t-1", HOUR)?;
    token_is_refused_everywhere(&class, &forged, ErrorCode::Unauthorized).await
}

async fn an_alg_none_token_is_unauthorized(transport: Transport) -> Result<()> {
    let class = demo_class(transport).await?;
    let header = b64url(br#"{"alg":"none","typ":"JWT"}"#);
    let payload = b64url(&serde_json::to_vec(&demo_claims(Role::Teacher, "t-1"))?);
    token_is_refused_everywhere(&class, &format!("{header}.{payload}."), ErrorCode::Unauthorized).await
}

async fn an_expired_token_is_token_expired(transport: Transport) -> Result<()> {
    let class = demo_class(transport).await?;
    let claims = Claims { exp: unix_now() - 3600, ..demo_claims(Role::Student, "s-late") };
    let expired = class.server.tenants.mint_claims("demo", &claims)?;
    token_is_refused_everywhere(&class, &expired, ErrorCode::TokenExpired).await
}

/// Tokens past the server's maximum lifetime (a day by default), however far, and tokens issued
/// in the future. The one expiring at `u64::MAX` used to be accepted and then panic its session
/// task, whose seat was never freed.
async fn a_token_living_too_long_or_issued_in_the_future_is_unauthorized(transport: Transport) -> Result<()> {
    let now = unix_now();
    let cases = [
        Claims { exp: now + 25 * 3600, ..demo_claims(Role::Teacher, "t-long") },
        Claims { iat: Some(now - 3600), exp: now + 24 * 3600 - 60, ..demo_claims(Role::Teacher, "t-old") },
        Claims { exp: u64::MAX, ..demo_claims(Role::Student, "s-forever") },
        Claims { iat: Some(now + 600), ..demo_claims(Role::Student, "s-future") },
    ];
    for claims in cases {
        let class = demo_class(transport).await?;
        let token = class.server.tenants.mint_claims("demo", &claims)?;
        token_is_refused_everywhere(&class, &token, ErrorCode::Unauthorized)
            .await
            .with_context(|| format!("exp {} iat {:?}", claims.exp, claims.iat))?;
    }
    Ok(())
}

async fn a_token_for_another_audience_is_unauthorized(transport: Transport) -> Result<()> {
    let class = demo_class(transport).await?;
    let claims = Claims { aud: "another-app".to_owned(), ..demo_claims(Role::Teacher, "t-1") };
    let token = class.server.tenants.mint_claims("demo", &claims)?;
    token_is_refused_everywhere(&class, &token, ErrorCode::Unauthorized).await
}

async fn a_token_signed_by_school_b_claiming_school_a_is_unauthorized(transport: Transport) -> Result<()> {
    let server = two_schools(TenantLimits::default()).await?.over(transport);
    let teacher = mint(&server, "a", Role::Teacher, "t-a");
    let code = server.create_room(&teacher, 100.0, 4).await?;
    let bystander = server.connect(&code, &mint(&server, "a", Role::Student, "s-bystander")).await?;
    // Everything about it says school A, but school B's key signed it.
    let claims = Claims {
        iss: "https://sso.a.example".to_owned(),
        aud: "downbeat".to_owned(),
        exp: unix_now() + 3600,
        iat: None,
        nbf: None,
        sub: "t-a".to_owned(),
        tenant: "a".to_owned(),
        role: Role::Teacher,
        name: "Teacher t-a".to_owned(),
    };
    let forged = server.tenants.mint_claims("b", &claims)?;
    // The probe join in the helper mints demo tokens; this server has none, so check by hand.
    let before = room_json(&server, &code, &teacher).await?;
    let presence = bystander.presence();
    let frame = refused_hello(&server, &forged, &code).await?;
    assert_eq!(frame.code, ErrorCode::Unauthorized);
    for (method, path) in [("GET", format!("/api/rooms/{code}")), ("POST", format!("/api/rooms/{code}/start"))] {
        let (status, body) = server.http(method, &path, Some(&forged), None).await?;
        assert_eq!((status, code_of(&body)), (401, Some("unauthorized")), "{method} {path}: {body}");
    }
    assert_eq!(server.stats.refused.get(ErrorCode::Unauthorized), 3);
    assert_eq!(server.stats.hello_failures.get(ErrorCode::Unauthorized), 1);
    let after = room_json(&server, &code, &teacher).await?;
    assert_eq!((&after["members"], epoch_of(&after)), (&before["members"], epoch_of(&before)));
    assert_eq!(bystander.presence(), presence);
    let probe = server.connect(&code, &mint(&server, "a", Role::Student, "s-probe")).await?;
    let events = events_until(&bystander, |e| matches!(e, Event::MemberJoined(_))).await?;
    assert!(matches!(events.last(), Some(Event::MemberJoined(m)) if m.id == probe.member_id()), "{events:?}");
    Ok(())
}

async fn a_student_token_edited_to_say_teacher_is_unauthorized(transport: Transport) -> Result<()> {
    let class = demo_class(transport).await?;
    let token = class.server.student("s-mallory");
    let parts: Vec<&str> = token.split('.').collect();
    assert_eq!(parts.len(), 3);
    let mut payload: Value = serde_json::from_slice(&b64url_decode(parts[1])?)?;
    assert_eq!(payload["role"], "student");
    payload["role"] = "teacher".into();
    let edited = format!("{}.{}.{}", parts[0], b64url(&serde_json::to_vec(&payload)?), parts[2]);
    token_is_refused_everywhere(&class, &edited, ErrorCode::Unauthorized).await
}

// ---------------------------------------------------------------------------------------------
// 2. Students and teacher controls
// ---------------------------------------------------------------------------------------------

/// A stopped demo room with a connected teacher and a connected student target.
async fn room_with_target(transport: Transport) -> Result<(TestServer, String, String, Client, Client)> {
    let server = TestServer::start().await?.over(transport);
    let teacher_token = server.teacher("t-1");
    let code = server.create_room(&teacher_token, 100.0, 4).await?;
    let teacher = server.connect(&code, &teacher_token).await?;
    let target = server.connect(&code, &server.student("s-target")).await?;
    wait_joined(&teacher, target.member_id()).await?;
    Ok((server, code, teacher_token, teacher, target))
}

fn every_control(target: u64) -> Result<Vec<ControlOp>> {
    Ok(vec![
        ControlOp::Timeline(Change::Start { count_in_bars: 0 }),
        ControlOp::Timeline(Change::Stop),
        ControlOp::Timeline(Change::SetTempo(MicroBpm::from_bpm(90))),
        ControlOp::Timeline(Change::SetMeter(3)),
        ControlOp::Mute { member: target, muted: true },
        ControlOp::Assign {
            member: target,
            assignment: Assignment {
                part: Some(PartName::truncating("drums")),
                beats: BoundedVec::try_from_vec(vec![0])?,
            },
        },
        ControlOp::Remove { member: target },
        ControlOp::Close,
    ])
}

/// After refused controls: a valid teacher change lands on the very next epoch, and neither
/// the teacher nor `others` heard anything before its timeline.
async fn only_the_probe_changed_the_room(teacher: &Client, others: &[&Client], epoch: u64) -> Result<()> {
    let ack = teacher.change(Change::SetMeter(3)).await?;
    let applied = ack.applied.context("a boundary")?;
    assert_eq!(applied.epoch, epoch + 1, "no refused control moved the epoch");
    for client in std::iter::once(teacher).chain(others.iter().copied()) {
        let events = events_until(client, |e| matches!(e, Event::Timeline(_))).await?;
        assert_eq!(events, vec![Event::Timeline(applied.epoch)], "nothing was broadcast before the probe");
    }
    Ok(())
}

async fn a_student_sending_each_teacher_control_is_forbidden_and_nothing_changes(transport: Transport) -> Result<()> {
    let (server, code, teacher_token, teacher, target) = room_with_target(transport).await?;
    let mut mallory = server.raw_link().await?;
    mallory.write_message(&RawSession::hello(PROTOCOL_VERSION, &server.student("s-mallory"), &code)).await?;
    let Some(ServerMessage::Welcome(welcome)) = mallory.read_message().await? else { bail!("no welcome") };
    wait_joined(&teacher, welcome.member_id).await?;
    wait_joined(&target, welcome.member_id).await?;
    let before = room_json(&server, &code, &teacher_token).await?;
    let presence = teacher.presence();

    let ops = every_control(target.member_id())?;
    for (i, op) in ops.iter().enumerate() {
        let request_id = 700 + i as u32;
        mallory.write_message(&ClientMessage::Control(ControlRequest { request_id, op: op.clone() })).await?;
        let frame = error_frame(&mut mallory).await?;
        assert_eq!((frame.code, frame.request_id), (ErrorCode::Forbidden, Some(request_id)), "{op:?}");
        assert!(frame.message.as_str().starts_with("only teachers may"), "{}", frame.message.as_str());
    }
    assert_eq!(server.stats.refused.get(ErrorCode::Forbidden), ops.len() as u64);
    assert_eq!(server.stats.controls_applied.get(), 0);

    // The room is as it was: open, same epoch, same members (the target neither muted, given
    // a part nor removed), and the student's own session carries on.
    let after = room_json(&server, &code, &teacher_token).await?;
    assert_eq!((&after["members"], epoch_of(&after)), (&before["members"], epoch_of(&before)));
    assert_eq!(after["members"].as_array().map(Vec::len), Some(3));
    assert_eq!(teacher.presence(), presence);
    assert_eq!(target.presence(), presence);
    assert!(presence.iter().any(|m| m.id == welcome.member_id));
    only_the_probe_changed_the_room(&teacher, &[&target], epoch_of(&before)).await?;
    // The refused student's session is still served: it hears the probe's timeline too.
    let heard = timeout(WAIT, async {
        loop {
            match mallory.read_message().await? {
                Some(ServerMessage::Timeline(t)) => return anyhow::Ok(t.epoch),
                Some(_) => continue,
                None => bail!("the refused student's session ended"),
            }
        }
    })
    .await??;
    assert_eq!(heard, epoch_of(&before) + 1);
    Ok(())
}

#[tokio::test]
async fn a_student_asking_each_teacher_endpoint_over_http_is_forbidden_and_nothing_changes() -> Result<()> {
    let (server, code, teacher_token, teacher, target) = room_with_target(Transport::WebTransport).await?;
    let student = server.student("s-mallory");
    let before = room_json(&server, &code, &teacher_token).await?;
    let presence = teacher.presence();
    let t = target.member_id();
    let requests = [
        ("POST", format!("/api/rooms/{code}/start"), Some(json!({"count_in_bars": 1}))),
        ("POST", format!("/api/rooms/{code}/stop"), None),
        ("POST", format!("/api/rooms/{code}/tempo"), Some(json!({"tempo_bpm": 90.0}))),
        ("POST", format!("/api/rooms/{code}/meter"), Some(json!({"beats_per_bar": 3}))),
        ("POST", format!("/api/rooms/{code}/members/{t}/mute"), Some(json!({"muted": true}))),
        ("PUT", format!("/api/rooms/{code}/members/{t}/assignment"), Some(json!({"part": "drums", "beats": [0]}))),
        ("DELETE", format!("/api/rooms/{code}/members/{t}"), None),
        ("DELETE", format!("/api/rooms/{code}"), None),
    ];
    for (method, path, body) in &requests {
        let (status, body) = server.http(method, path, Some(&student), body.clone()).await?;
        assert_eq!((status, code_of(&body)), (403, Some("forbidden")), "{method} {path}: {body}");
    }
    assert_eq!(server.stats.refused.get(ErrorCode::Forbidden), requests.len() as u64);
    // Creating and listing rooms (their refusals are not counted: see
    // `forbidden_create_and_list_over_http_are_counted_as_refused`).
    let settings = json!({"name": "Mine now", "tempo_bpm": 120.0, "beats_per_bar": 4});
    for (method, body) in [("POST", Some(settings)), ("GET", None)] {
        let (status, body) = server.http(method, "/api/rooms", Some(&student), body).await?;
        assert_eq!((status, code_of(&body)), (403, Some("forbidden")), "{method} /api/rooms: {body}");
    }
    assert_eq!((server.stats.controls_applied.get(), server.stats.rooms_created.get()), (0, 1));
    // A student may look at the room (and sees it unchanged).
    let seen = room_json(&server, &code, &student).await?;
    assert_eq!(epoch_of(&seen), epoch_of(&before));
    let after = room_json(&server, &code, &teacher_token).await?;
    assert_eq!((&after["members"], epoch_of(&after)), (&before["members"], epoch_of(&before)));
    assert_eq!((teacher.presence(), target.presence()), (presence.clone(), presence));
    let (status, list) = server.http("GET", "/api/rooms", Some(&teacher_token), None).await?;
    assert_eq!((status, list["rooms"].as_array().map(Vec::len)), (200, Some(1)), "{list}");
    only_the_probe_changed_the_room(&teacher, &[&target], epoch_of(&before)).await?;
    Ok(())
}

/// NUL and control characters in a room's name (created at the hello or over HTTP), a part
/// or a prompt are refused with `bad_request` and change nothing; the refused hello's session
/// is closed with that code. (Reflections: `sel.rs`, on both databases.)
async fn text_with_nul_or_control_characters_is_refused_and_changes_nothing(transport: Transport) -> Result<()> {
    let (server, code, teacher_token, teacher, target) = room_with_target(transport).await?;
    let before = room_json(&server, &code, &teacher_token).await?;
    let presence = teacher.presence();

    for name in ["Room\0 12", "Room\n12", "Room\u{2028}12", "\u{1b}[31mRoom"] {
        let mut raw = server.raw_link().await?;
        let settings = RoomSettings { name: Name::truncating(name), tempo: MicroBpm::from_bpm(100), beats_per_bar: 4 };
        raw.write_message(&ClientMessage::Hello(Hello {
            version: PROTOCOL_VERSION,
            token: BoundedString::truncating(&teacher_token),
            room: RoomRequest::Create(settings),
        }))
        .await?;
        let frame = error_frame(&mut raw).await?;
        assert_eq!(frame.code, ErrorCode::BadRequest, "{name:?}: {}", frame.message.as_str());
        assert!(frame.message.as_str().starts_with("a room name:"), "{}", frame.message.as_str());
        assert_eq!(raw.closed().await?, ErrorCode::BadRequest.as_u16());
        let body = json!({"name": name, "tempo_bpm": 100.0, "beats_per_bar": 4});
        let (status, answer) = server.http("POST", "/api/rooms", Some(&teacher_token), Some(body)).await?;
        assert_eq!((status, code_of(&answer)), (400, Some("bad_request")), "{name:?}: {answer}");
    }
    assert_eq!(server.stats.rooms_created.get(), 1, "no room was made");

    let t = target.member_id();
    for part in ["drums\0", "dr\tums", "drums\u{2029}"] {
        let assignment = Assignment { part: Some(PartName::truncating(part)), beats: BoundedVec::new() };
        let refused = teacher.control(ControlOp::Assign { member: t, assignment }).await;
        assert_eq!(refused_code(refused), ErrorCode::BadRequest, "{part:?}");
        let path = format!("/api/rooms/{code}/members/{t}/assignment");
        let (status, answer) = server.http("PUT", &path, Some(&teacher_token), Some(json!({"part": part}))).await?;
        assert_eq!((status, code_of(&answer)), (400, Some("bad_request")), "{part:?}: {answer}");
    }
    for prompt in ["Why?\0", "Why?\u{7f}"] {
        assert_eq!(refused_code(teacher.set_prompt(prompt).await), ErrorCode::BadRequest, "{prompt:?}");
    }
    assert_eq!(server.stats.controls_applied.get(), 0);

    let after = room_json(&server, &code, &teacher_token).await?;
    assert_eq!((&after["members"], epoch_of(&after)), (&before["members"], epoch_of(&before)));
    assert_eq!((teacher.presence(), target.presence()), (presence.clone(), presence));
    assert_eq!(target.prompt(), None);
    only_the_probe_changed_the_room(&teacher, &[&target], epoch_of(&before)).await?;
    Ok(())
}

/// A student's forbidden create and list requests are counted in
/// `downbeat_refused_total{code="forbidden"}` like every other refusal (a regression test:
/// they once bypassed the counter).
#[tokio::test]
async fn forbidden_create_and_list_over_http_are_counted_as_refused() -> Result<()> {
    let server = TestServer::start().await?;
    let student = server.student("s-mallory");
    let body = json!({"name": "Mine now", "tempo_bpm": 120.0, "beats_per_bar": 4});
    for (method, body) in [("POST", Some(body)), ("GET", None)] {
        let (status, answer) = server.http(method, "/api/rooms", Some(&student), body).await?;
        assert_eq!((status, code_of(&answer)), (403, Some("forbidden")), "{method}: {answer}");
    }
    assert_eq!(server.stats.rooms_created.get(), 0);
    assert_eq!(server.stats.refused.get(ErrorCode::Forbidden), 2, "both refusals counted");
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// 3. Another school's code
// ---------------------------------------------------------------------------------------------

/// Another school's live code answers exactly as a code no room has: same code, message and
/// status, at the hello and over HTTP, and the same cost to the asker's failed-join bucket, so
/// codes cannot be probed across schools.
async fn a_code_of_another_school_answers_like_no_room_at_the_hello_and_over_http(transport: Transport) -> Result<()> {
    let server = two_schools(TenantLimits::default()).await?.over(transport);
    let teacher_a = mint(&server, "a", Role::Teacher, "t-a");
    let code = server.create_room(&teacher_a, 100.0, 4).await?;
    let bystander = server.connect(&code, &mint(&server, "a", Role::Student, "s-a")).await?;
    let before = room_json(&server, &code, &teacher_a).await?;
    let presence = bystander.presence();
    let mut rng = downbeat_engine::sim::Rng::new(23);
    let missing = random_code(&mut rng, &code);

    let student_b = mint(&server, "b", Role::Student, "s-b");
    let (foreign, none) =
        (refused_hello(&server, &student_b, &code).await?, refused_hello(&server, &student_b, &missing).await?);
    assert_eq!(foreign.code, ErrorCode::RoomNotFound);
    assert_eq!((foreign.code, foreign.message), (none.code, none.message), "the hello tells them apart");
    let foreign = server.http("GET", &format!("/api/rooms/{code}"), Some(&student_b), None).await?;
    let none = server.http("GET", &format!("/api/rooms/{missing}"), Some(&student_b), None).await?;
    assert_eq!((foreign.0, code_of(&foreign.1)), (404, Some("room_not_found")), "{}", foreign.1);
    assert_eq!(foreign, none, "HTTP tells them apart");
    // Not even school B's teacher reaches it.
    let teacher_b = mint(&server, "b", Role::Teacher, "t-b");
    for (method, path) in [("POST", format!("/api/rooms/{code}/start")), ("DELETE", format!("/api/rooms/{code}"))] {
        let (status, body) = server.http(method, &path, Some(&teacher_b), None).await?;
        assert_eq!((status, code_of(&body)), (404, Some("room_not_found")), "{method} {path}: {body}");
    }
    // Each cost the student one failed join, like a missing code: the fifth is the last one
    // answered, then both kinds are refused alike.
    let (status, body) = server.http("GET", &format!("/api/rooms/{code}"), Some(&student_b), None).await?;
    assert_eq!((status, code_of(&body)), (404, Some("room_not_found")), "{body}");
    let foreign = server.http("GET", &format!("/api/rooms/{code}"), Some(&student_b), None).await?;
    let none = server.http("GET", &format!("/api/rooms/{missing}"), Some(&student_b), None).await?;
    assert_eq!((foreign.0, code_of(&foreign.1)), (429, Some("rate_limited")), "{}", foreign.1);
    assert_eq!(foreign, none);
    assert_eq!(server.stats.refused.get(ErrorCode::WrongTenant), 0);
    assert_eq!(server.stats.refused.get(ErrorCode::RoomNotFound), 7);
    assert_eq!(server.stats.hello_failures.get(ErrorCode::RoomNotFound), 2);

    let after = room_json(&server, &code, &teacher_a).await?;
    assert_eq!((&after["members"], epoch_of(&after)), (&before["members"], epoch_of(&before)));
    assert_eq!(server.stats.controls_applied.get(), 0);
    assert_eq!(bystander.presence(), presence);
    let probe = server.connect(&code, &mint(&server, "a", Role::Student, "s-probe")).await?;
    let events = events_until(&bystander, |e| matches!(e, Event::MemberJoined(_))).await?;
    assert!(matches!(events.last(), Some(Event::MemberJoined(m)) if m.id == probe.member_id()), "{events:?}");
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// 4. A closed room
// ---------------------------------------------------------------------------------------------

async fn a_closed_room_ends_its_sessions_and_refuses_later_joins_and_lookups(transport: Transport) -> Result<()> {
    let server = TestServer::start().await?.over(transport);
    let teacher = server.teacher("t-1");
    let code = server.create_room(&teacher, 100.0, 4).await?;
    let students =
        [server.connect(&code, &server.student("s-1")).await?, server.connect(&code, &server.student("s-2")).await?];
    wait_joined(&students[0], students[1].member_id()).await?;

    let (status, body) = server.http("DELETE", &format!("/api/rooms/{code}"), Some(&teacher), None).await?;
    assert_eq!((status, body["closed"].as_bool()), (200, Some(true)), "{body}");

    for student in &students {
        let events = events_until_end(student).await?;
        let tail: Vec<&Event> = events.iter().filter(|e| !matches!(e, Event::MemberJoined(_))).collect();
        assert!(
            matches!(tail.as_slice(), [Event::RoomClosed(_), Event::Error(ErrorCode::RoomClosed, _)]),
            "told the room closed, then the session ended with room_closed: {events:?}"
        );
        let closed = timeout(WAIT, student.closed()).await?;
        assert!(closed.contains(&format!("(code {})", ErrorCode::RoomClosed.as_u16())), "{closed}");
    }

    // A later join, even by a member who was in it, and a lookup: room_closed, not not-found.
    assert_eq!(join_refusal(&server, &code, &server.student("s-late")).await, ErrorCode::RoomClosed);
    assert_eq!(join_refusal(&server, &code, &server.student("s-1")).await, ErrorCode::RoomClosed);
    let frame = refused_hello(&server, &server.student("s-raw"), &code).await?;
    assert_eq!(frame.code, ErrorCode::RoomClosed);
    for (who, method, path) in [
        (&teacher, "GET", format!("/api/rooms/{code}")),
        (&server.student("s-1"), "GET", format!("/api/rooms/{code}")),
        (&teacher, "POST", format!("/api/rooms/{code}/start")),
        (&teacher, "DELETE", format!("/api/rooms/{code}")),
    ] {
        let (status, body) = server.http(method, &path, Some(who), None).await?;
        assert_eq!((status, code_of(&body)), (410, Some("room_closed")), "{method} {path}: {body}");
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// 5. A full room
// ---------------------------------------------------------------------------------------------

async fn a_full_room_refuses_the_next_member_and_keeps_its_presence(transport: Transport) -> Result<()> {
    let limits = TenantLimits { max_members_per_room: 3, ..TenantLimits::default() };
    let server = two_schools(limits).await?.over(transport);
    let teacher = mint(&server, "a", Role::Teacher, "t-a");
    let code = server.create_room(&teacher, 100.0, 4).await?;
    let mut seated = Vec::new();
    for i in 0..3 {
        seated.push(server.connect(&code, &mint(&server, "a", Role::Student, &format!("s-{i}"))).await?);
    }
    for client in &seated {
        for other in &seated {
            wait_joined(client, other.member_id()).await?;
        }
    }
    let presence = seated[0].presence();
    let before = room_json(&server, &code, &teacher).await?;

    let fourth = mint(&server, "a", Role::Student, "s-fourth");
    assert_eq!(join_refusal(&server, &code, &fourth).await, ErrorCode::RoomFull);
    assert_eq!(refused_hello(&server, &fourth, &code).await?.code, ErrorCode::RoomFull);
    // A teacher takes a seat too: no room for one either.
    assert_eq!(join_refusal(&server, &code, &teacher).await, ErrorCode::RoomFull);
    assert_eq!(server.stats.hello_failures.get(ErrorCode::RoomFull), 3);

    let after = room_json(&server, &code, &teacher).await?;
    assert_eq!(after["members"], before["members"]);
    assert_eq!(after["members"].as_array().map(Vec::len), Some(3));
    // Nobody heard of a fourth: the next presence event each hears is the teacher's mute.
    let muted = seated[2].member_id();
    let (status, body) = server
        .http("POST", &format!("/api/rooms/{code}/members/{muted}/mute"), Some(&teacher), Some(json!({"muted": true})))
        .await?;
    assert_eq!(status, 200, "{body}");
    for client in &seated {
        let events = events_until(client, |e| matches!(e, Event::MemberUpdated(_))).await?;
        assert!(matches!(events.as_slice(), [Event::MemberUpdated(m)] if m.id == muted && m.muted), "{events:?}");
        let now: Vec<_> = client.presence().into_iter().map(|m| (m.id, m.name)).collect();
        let then: Vec<_> = presence.iter().map(|m| (m.id, m.name.clone())).collect();
        assert_eq!(now, then, "the same three, seen the same by each");
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// 6. Out-of-range changes and notes
// ---------------------------------------------------------------------------------------------

async fn out_of_range_tempo_meter_and_count_in_are_refused_on_the_control_stream(transport: Transport) -> Result<()> {
    let (server, code, teacher_token, teacher, bystander) = room_with_target(transport).await?;
    let before = room_json(&server, &code, &teacher_token).await?;
    let cases = [
        (Change::SetTempo(MicroBpm(300_000_001)), ErrorCode::TempoOutOfRange),
        (Change::SetTempo(MicroBpm(19_999_999)), ErrorCode::TempoOutOfRange),
        (Change::SetTempo(MicroBpm(0)), ErrorCode::TempoOutOfRange),
        (Change::SetTempo(MicroBpm(u32::MAX)), ErrorCode::TempoOutOfRange),
        (Change::SetMeter(0), ErrorCode::MeterOutOfRange),
        (Change::SetMeter(17), ErrorCode::MeterOutOfRange),
        (Change::SetMeter(u8::MAX), ErrorCode::MeterOutOfRange),
        (Change::Start { count_in_bars: 9 }, ErrorCode::BadRequest),
        (Change::Start { count_in_bars: u8::MAX }, ErrorCode::BadRequest),
    ];
    for (change, want) in cases {
        assert_eq!(refused_code(teacher.change(change).await), want, "{change:?}");
    }
    let after = room_json(&server, &code, &teacher_token).await?;
    assert_eq!(epoch_of(&after), epoch_of(&before));
    assert_eq!(after["timeline"]["segments"], before["timeline"]["segments"]);
    assert_eq!(server.stats.changes_applied.get(), 0);
    assert_eq!(bystander.timeline().map(|t| t.epoch()), Some(epoch_of(&before)));
    only_the_probe_changed_the_room(&teacher, &[&bystander], epoch_of(&before)).await?;
    Ok(())
}

#[tokio::test]
async fn out_of_range_tempo_meter_and_count_in_are_refused_over_http() -> Result<()> {
    let (server, code, teacher_token, teacher, bystander) = room_with_target(Transport::WebTransport).await?;
    let before = room_json(&server, &code, &teacher_token).await?;
    let cases = [
        ("tempo", json!({"tempo_bpm": 300.5}), 400, "tempo_out_of_range"),
        ("tempo", json!({"tempo_bpm": 19.99}), 400, "tempo_out_of_range"),
        ("tempo", json!({"tempo_bpm": -120.0}), 400, "tempo_out_of_range"),
        ("tempo", json!({"tempo_bpm": 1e300}), 400, "tempo_out_of_range"),
        ("tempo", json!({"tempo_bpm": "fast"}), 400, "bad_request"),
        ("meter", json!({"beats_per_bar": 17}), 400, "meter_out_of_range"),
        ("meter", json!({"beats_per_bar": 0}), 400, "meter_out_of_range"),
        ("meter", json!({"beats_per_bar": -1}), 400, "meter_out_of_range"),
        ("meter", json!({"beats_per_bar": 256}), 400, "meter_out_of_range"),
        ("start", json!({"count_in_bars": 9}), 400, "bad_request"),
        ("start", json!({"count_in_bars": 300}), 400, "bad_request"),
    ];
    for (action, body, status, want) in cases {
        let path = format!("/api/rooms/{code}/{action}");
        let (got, answer) = server.http("POST", &path, Some(&teacher_token), Some(body.clone())).await?;
        assert_eq!((got, code_of(&answer)), (status, Some(want)), "{action} {body}: {answer}");
    }
    let after = room_json(&server, &code, &teacher_token).await?;
    assert_eq!(epoch_of(&after), epoch_of(&before));
    assert_eq!(after["timeline"]["segments"], before["timeline"]["segments"]);
    assert_eq!(server.stats.changes_applied.get(), 0);
    only_the_probe_changed_the_room(&teacher, &[&bystander], epoch_of(&before)).await?;
    Ok(())
}

/// A sender and a classmate in a demo room, both with synced clocks.
async fn players(transport: Transport) -> Result<(TestServer, Client, Client)> {
    let server = TestServer::start().await?.over(transport);
    let code = server.create_room(&server.teacher("t-1"), 100.0, 4).await?;
    let classmate = server.connect(&code, &server.student("s-listener")).await?;
    let sender = server.connect(&code, &server.student("s-player")).await?;
    wait_joined(&classmate, sender.member_id()).await?;
    classmate.wait_synced(WAIT).await?;
    sender.wait_synced(WAIT).await?;
    Ok((server, sender, classmate))
}

/// `bad` (seq 1, played now) in its own datagram is refused with note_out_of_range; a good
/// note played after the refusal is the first and only note the classmate gets.
async fn a_bad_note_never_reaches_a_classmate(transport: Transport, bad: impl FnOnce(Note) -> Note) -> Result<()> {
    let (server, sender, classmate) = players(transport).await?;
    let played_at = sender.server_now().context("synced")?;
    let note = bad(Note { seq: 1, midi: 60, velocity: 100, instrument: 0, played_at });
    let datagram = encode_client_datagram(&ClientDatagram::Notes(BoundedVec::try_from_vec(vec![note])?))?;
    sender.send_raw_datagram(&datagram)?;
    let events = events_until(&sender, |e| matches!(e, Event::Error(..))).await?;
    assert!(matches!(events.last(), Some(Event::Error(ErrorCode::NoteOutOfRange, _))), "{events:?}");
    assert_eq!(server.stats.notes_dropped.get(ErrorCode::NoteOutOfRange), 1);
    assert_eq!(server.stats.notes_accepted.get(), 0);

    // The good note carries seq 1 as well: had the bad one been taken, this one would be a
    // duplicate and the classmate would hear the bad one instead.
    let good = sender.play_note(62, 90, 0)?;
    assert_eq!(good.seq, 1);
    let heard = timeout(WAIT, classmate.next_note()).await?.context("session ended")?;
    assert_eq!((heard.from, heard.note), (sender.member_id(), good), "the first note heard is the good one");
    let stats = classmate.stats();
    assert_eq!((stats.notes_scheduled, stats.notes_late), (1, 0), "and it is the only one");
    assert_eq!(server.stats.notes_accepted.get(), 1);
    let text = metrics(&server).await?;
    assert!(text.contains("downbeat_note_datagrams_refused_total{code=\"note_out_of_range\"} 1"), "{text}");
    // The sender was told once and stays in the room.
    assert!(classmate.presence().iter().any(|m| m.id == sender.member_id()));
    Ok(())
}

async fn a_note_with_midi_128_is_refused_and_never_reaches_a_classmate(transport: Transport) -> Result<()> {
    a_bad_note_never_reaches_a_classmate(transport, |n| Note { midi: 128, ..n }).await
}

async fn a_note_with_velocity_0_is_refused_and_never_reaches_a_classmate(transport: Transport) -> Result<()> {
    a_bad_note_never_reaches_a_classmate(transport, |n| Note { velocity: 0, ..n }).await
}

// ---------------------------------------------------------------------------------------------
// 7. A note flood
// ---------------------------------------------------------------------------------------------

async fn a_note_flood_reaches_classmates_only_up_to_the_burst_and_rate(transport: Transport) -> Result<()> {
    const FLOOD: u32 = 200;
    let (server, sender, classmate) = players(transport).await?;
    let limits = *server.tenants.tenant("demo").context("demo tenant")?.limits();
    let (burst, rate) = (u64::from(limits.note_burst), u64::from(limits.notes_per_second));
    assert!(u64::from(FLOOD) > 2 * burst, "the flood must be well over the burst");

    // The note bucket is full (at most `burst`) when the flood starts. The server may close
    // the sender for abuse before the flood is all sent (over WebSocket the client hears of
    // it as it goes); never before it has refused more than a burst's worth of notes.
    let started = Instant::now();
    for i in 0..FLOOD {
        match sender.play_note(36 + (i % 48) as u8, 100, 0) {
            Ok(_) => {}
            Err(ClientError::Closed) => {
                assert!(u64::from(i) > burst, "closed after only {i} notes of the flood");
                break;
            }
            Err(e) => return Err(e.into()),
        }
    }
    let events = events_until(&sender, |e| matches!(e, Event::Error(..))).await?;
    assert!(matches!(events.last(), Some(Event::Error(ErrorCode::RateLimited, _))), "{events:?}");
    // More than 50 refused datagrams in a burst close the sender for abuse; once the class
    // hears it left, the room handles none of its notes any more.
    let events = events_until(&classmate, |e| matches!(e, Event::MemberLeft(..))).await?;
    assert!(
        matches!(events.last(), Some(Event::MemberLeft(id, LeaveReason::Closed)) if *id == sender.member_id()),
        "{events:?}"
    );
    let elapsed = started.elapsed();
    let bound = burst + (rate as f64 * elapsed.as_secs_f64()).ceil() as u64;
    let accepted = server.stats.notes_accepted.get();
    println!("{FLOOD} notes in {elapsed:?}: {accepted} accepted, bound {bound}");
    assert!(accepted >= 1 && accepted <= bound, "{accepted} accepted, bound {bound}");

    // What the classmate hears: distinct notes, at most what the server accepted.
    let mut heard = HashSet::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
    while (heard.len() as u64) + classmate.stats().notes_late < accepted {
        match tokio::time::timeout_at(deadline, classmate.next_note()).await {
            Ok(Some(note)) => {
                assert_eq!(note.from, sender.member_id());
                heard.insert(note.note.seq);
            }
            Ok(None) => bail!("the classmate's session ended"),
            Err(_) => break,
        }
    }
    let heard = heard.len() as u64;
    println!("the classmate heard {heard} (late: {})", classmate.stats().notes_late);
    assert!(heard >= 1 && heard <= accepted, "heard {heard}, accepted {accepted}");

    let refused = server.stats.notes_dropped.get(ErrorCode::RateLimited);
    assert!(refused >= 1);
    let text = metrics(&server).await?;
    let line = format!("downbeat_note_datagrams_refused_total{{code=\"rate_limited\"}} {refused}");
    assert!(text.contains(&line), "{line} in\n{text}");
    assert_eq!(server.stats.sessions_closed_for_abuse.get(), 1);
    // The sender's session ends with rate_limited; the classmate carries on.
    let rest = events_until_end(&sender).await?;
    assert!(rest.iter().all(|e| matches!(e, Event::Error(ErrorCode::RateLimited, _))), "{rest:?}");
    assert_eq!(classmate.presence().len(), 1);
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// 8. Guessing join codes
// ---------------------------------------------------------------------------------------------

/// A well-formed code that is not `not`.
fn random_code(rng: &mut downbeat_engine::sim::Rng, not: &str) -> String {
    const ALPHABET: &[u8; 32] = b"23456789ABCDEFGHJKLMNPQRSTUVWXYZ";
    loop {
        let s: String = (0..8).map(|_| char::from(ALPHABET[(rng.next_u64() % 32) as usize])).collect();
        let code = format!("{}-{}", &s[..4], &s[4..]);
        if code != not {
            return code;
        }
    }
}

async fn guessing_join_codes_is_rate_limited_without_revealing_the_right_one(transport: Transport) -> Result<()> {
    let limits = TenantLimits { joins_per_second: 1, join_burst: 5, ..TenantLimits::default() };
    let server = two_schools(limits).await?.over(transport);
    let teacher_token = mint(&server, "a", Role::Teacher, "t-a");
    let code = server.create_room(&teacher_token, 100.0, 4).await?;
    let teacher = server.connect(&code, &teacher_token).await?;
    let guesser = mint(&server, "a", Role::Student, "s-guesser");
    // Handshakes first, so the hellos below land while the bucket is still empty.
    let mut wrong_hello = server.raw_link().await?;
    let mut right_hello = server.raw_link().await?;
    let presence = teacher.presence();
    let mut rng = downbeat_engine::sim::Rng::new(8);

    // One token a second refills: everything from here to the hellos must take well under a
    // second, which loopback does by orders of magnitude.
    for i in 0..5 {
        let path = format!("/api/rooms/{}", random_code(&mut rng, &code));
        let (status, body) = server.http("GET", &path, Some(&guesser), None).await?;
        assert_eq!((status, code_of(&body)), (404, Some("room_not_found")), "guess {i}: {body}");
    }
    let (status, wrong) =
        server.http("GET", &format!("/api/rooms/{}", random_code(&mut rng, &code)), Some(&guesser), None).await?;
    assert_eq!((status, code_of(&wrong)), (429, Some("rate_limited")), "{wrong}");
    let (status, right) = server.http("GET", &format!("/api/rooms/{code}"), Some(&guesser), None).await?;
    assert_eq!((status, &right), (429, &wrong), "the right code answers exactly as a wrong one");
    wrong_hello.write_message(&RawSession::hello(PROTOCOL_VERSION, &guesser, &random_code(&mut rng, &code))).await?;
    right_hello.write_message(&RawSession::hello(PROTOCOL_VERSION, &guesser, &code)).await?;
    let (wrong, right) = (error_frame(&mut wrong_hello).await?, error_frame(&mut right_hello).await?);
    assert_eq!((wrong.code, right.code), (ErrorCode::RateLimited, ErrorCode::RateLimited));
    assert_eq!(wrong.message, right.message, "the hello does not tell them apart either");
    assert_eq!(server.stats.refused.get(ErrorCode::RateLimited), 4);
    assert_eq!(server.stats.refused.get(ErrorCode::RoomNotFound), 5);

    // The guessing student does not lock the staff out of their rooms over HTTP; a teacher's
    // wrong code is refused like anyone's.
    let (status, body) = server.http("GET", &format!("/api/rooms/{code}"), Some(&teacher_token), None).await?;
    assert_eq!(status, 200, "{body}");
    let path = format!("/api/rooms/{}", random_code(&mut rng, &code));
    let (status, body) = server.http("GET", &path, Some(&teacher_token), None).await?;
    assert_eq!((status, code_of(&body)), (429, Some("rate_limited")), "{body}");

    // The room itself is untouched: nobody joined, and its teacher still runs it.
    assert_eq!(teacher.presence(), presence);
    let ack = teacher.change(Change::SetMeter(3)).await?;
    let events = events_until(&teacher, |e| matches!(e, Event::Timeline(_))).await?;
    assert_eq!(events, vec![Event::Timeline(ack.applied.context("a boundary")?.epoch)], "no join was heard");

    // Both refused sessions end with the same code. (Last: a peer that read its refusal but
    // does not close is closed by the server only a while later, and the bucket refills.)
    let limited = ErrorCode::RateLimited.as_u16();
    assert_eq!((wrong_hello.closed().await?, right_hello.closed().await?), (limited, limited));
    Ok(())
}

/// One student guessing codes as fast as they can is stopped after a few, and never locks the
/// rest of the school out: another student (on the same network address, as behind a school's
/// NAT) still joins with the right code, and a teacher's wrong codes are answered and counted.
#[tokio::test]
async fn one_student_guessing_codes_does_not_lock_the_school_out() -> Result<()> {
    let server = two_schools(TenantLimits::default()).await?;
    let teacher_token = mint(&server, "a", Role::Teacher, "t-a");
    let code = server.create_room(&teacher_token, 100.0, 4).await?;
    let teacher = server.connect(&code, &teacher_token).await?;
    let guesser = mint(&server, "a", Role::Student, "s-guesser");
    let mut rng = downbeat_engine::sim::Rng::new(14);

    // A student's bucket holds 5 failed joins and refills one every 10 s; 25 guesses on
    // loopback take a small part of that.
    for i in 0..25 {
        let path = format!("/api/rooms/{}", random_code(&mut rng, &code));
        let (status, body) = server.http("GET", &path, Some(&guesser), None).await?;
        let want = if i < 5 { (404, Some("room_not_found")) } else { (429, Some("rate_limited")) };
        assert_eq!((status, code_of(&body)), want, "guess {i}: {body}");
    }
    let (status, body) = server.http("GET", &format!("/api/rooms/{code}"), Some(&guesser), None).await?;
    assert_eq!((status, code_of(&body)), (429, Some("rate_limited")), "the guesser learns nothing: {body}");

    // Everyone else in the school is unaffected.
    let classmate = mint(&server, "a", Role::Student, "s-classmate");
    let (status, body) = server.http("GET", &format!("/api/rooms/{code}"), Some(&classmate), None).await?;
    assert_eq!(status, 200, "{body}");
    let joined = server.connect(&code, &classmate).await?;
    wait_joined(&teacher, joined.member_id()).await?;
    let refused = server.stats.refused.get(ErrorCode::RoomNotFound);
    let path = format!("/api/rooms/{}", random_code(&mut rng, &code));
    let (status, body) = server.http("GET", &path, Some(&teacher_token), None).await?;
    assert_eq!((status, code_of(&body)), (404, Some("room_not_found")), "{body}");
    assert_eq!(server.stats.refused.get(ErrorCode::RoomNotFound), refused + 1);
    // A teacher's wrong codes take from their own bucket like a student's.
    for i in 1..6 {
        let path = format!("/api/rooms/{}", random_code(&mut rng, &code));
        let (status, body) = server.http("GET", &path, Some(&teacher_token), None).await?;
        let want = if i < 5 { (404, Some("room_not_found")) } else { (429, Some("rate_limited")) };
        assert_eq!((status, code_of(&body)), want, "teacher's guess {i}: {body}");
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// 9. Tokens expiring mid-session
// ---------------------------------------------------------------------------------------------

/// A demo student token for `sub` expiring at `exp` (Unix seconds).
fn token_expiring(server: &TestServer, sub: &str, exp: u64) -> Result<String> {
    Ok(server.tenants.mint_claims("demo", &Claims { exp, ..demo_claims(Role::Student, sub) })?)
}

async fn a_refreshed_session_outlives_its_first_token_and_an_unrefreshed_one_is_ended(
    transport: Transport,
) -> Result<()> {
    let server = TestServer::start().await?.over(transport);
    let teacher_token = server.teacher("t-1");
    let code = server.create_room(&teacher_token, 100.0, 4).await?;
    let teacher = server.connect(&code, &teacher_token).await?;
    let exp = unix_now() + 2;
    let refreshed = server.connect(&code, &token_expiring(&server, "s-refreshed", exp)?).await?;
    let stale = server.connect(&code, &token_expiring(&server, "s-stale", exp)?).await?;
    assert_eq!((refreshed.welcome().token_expires_at, stale.welcome().token_expires_at), (exp, exp));
    wait_joined(&teacher, refreshed.member_id()).await?;
    wait_joined(&teacher, stale.member_id()).await?;

    let fresh_exp = unix_now() + 3600;
    let fresh = token_expiring(&server, "s-refreshed", fresh_exp)?;
    assert_eq!(refreshed.refresh_token(&fresh).await?, fresh_exp);

    let started = Instant::now();
    let events = events_until_end(&stale).await?;
    assert!(matches!(events.last(), Some(Event::Error(ErrorCode::TokenExpired, _))), "{events:?}");
    let closed = timeout(WAIT, stale.closed()).await?;
    assert!(closed.contains(&format!("(code {})", ErrorCode::TokenExpired.as_u16())), "{closed}");
    println!("the stale session ended {:?} after the refresh", started.elapsed());
    assert!(unix_now() >= exp, "not before its token expired");
    let events = events_until(&teacher, |e| matches!(e, Event::MemberLeft(..))).await?;
    assert!(matches!(events.last(), Some(Event::MemberLeft(id, _)) if *id == stale.member_id()), "{events:?}");

    // The refreshed session, whose first token expired at the same instant, is still served.
    let ids: Vec<u64> = teacher.presence().iter().map(|m| m.id).collect();
    assert_eq!(ids, vec![teacher.member_id(), refreshed.member_id()]);
    let again = token_expiring(&server, "s-refreshed", fresh_exp + 60)?;
    assert_eq!(refreshed.refresh_token(&again).await?, fresh_exp + 60);
    let (status, room) = server.http("GET", &format!("/api/rooms/{code}"), Some(&teacher_token), None).await?;
    assert_eq!((status, room["members"].as_array().map(Vec::len)), (200, Some(2)), "{room}");
    Ok(())
}

async fn a_refresh_naming_another_person_or_role_is_refused_and_the_session_continues(
    transport: Transport,
) -> Result<()> {
    let server = TestServer::start().await?.over(transport);
    let teacher_token = server.teacher("t-1");
    let code = server.create_room(&teacher_token, 100.0, 4).await?;
    let teacher = server.connect(&code, &teacher_token).await?;
    let student = server.connect(&code, &server.student("s-1")).await?;
    wait_joined(&teacher, student.member_id()).await?;
    let presence = teacher.presence();
    let expires_at = student.welcome().token_expires_at;

    let expired = Claims { exp: unix_now() - 3600, ..demo_claims(Role::Student, "s-1") };
    let cases = [
        (server.student("s-2"), ErrorCode::Forbidden),
        (server.teacher("s-1"), ErrorCode::Forbidden),
        (server.teacher("t-1"), ErrorCode::Forbidden),
        (server.tenants.mint_claims("demo", &expired)?, ErrorCode::TokenExpired),
        ("not-a-token".to_owned(), ErrorCode::Unauthorized),
    ];
    for (token, want) in &cases {
        assert_eq!(refused_code(student.refresh_token(token).await), *want);
    }
    assert_eq!(server.stats.refused.get(ErrorCode::Forbidden), 3);

    // Still the same student in the same seat: students still may not control the room, and
    // a good refresh is taken.
    assert_eq!(refused_code(student.change(Change::Start { count_in_bars: 0 }).await), ErrorCode::Forbidden);
    let exp = unix_now() + 7200;
    assert_eq!(student.refresh_token(&token_expiring(&server, "s-1", exp)?).await?, exp);
    assert!(exp > expires_at);
    assert_eq!(teacher.presence(), presence);
    let ack = teacher.change(Change::SetMeter(3)).await?;
    let events = events_until(&student, |e| matches!(e, Event::Timeline(_))).await?;
    assert_eq!(events, vec![Event::Timeline(ack.applied.context("a boundary")?.epoch)]);
    Ok(())
}

/// A session the server ends (here: an expired token) is announced to the room as
/// `LeaveReason::Closed`, not as a student leaving (a regression test).
async fn an_expired_session_is_announced_as_closed_by_the_server(transport: Transport) -> Result<()> {
    let server = TestServer::start().await?.over(transport);
    let teacher_token = server.teacher("t-1");
    let code = server.create_room(&teacher_token, 100.0, 4).await?;
    let teacher = server.connect(&code, &teacher_token).await?;
    let stale = server.connect(&code, &token_expiring(&server, "s-stale", unix_now() + 1)?).await?;
    wait_joined(&teacher, stale.member_id()).await?;
    let events = events_until(&teacher, |e| matches!(e, Event::MemberLeft(..))).await?;
    assert_eq!(events.last(), Some(&Event::MemberLeft(stale.member_id(), LeaveReason::Closed)), "{events:?}");
    Ok(())
}

over_both_transports!(
    a_token_signed_with_another_secret_is_unauthorized,
    an_alg_none_token_is_unauthorized,
    an_expired_token_is_token_expired,
    a_token_living_too_long_or_issued_in_the_future_is_unauthorized,
    a_token_for_another_audience_is_unauthorized,
    a_token_signed_by_school_b_claiming_school_a_is_unauthorized,
    a_student_token_edited_to_say_teacher_is_unauthorized,
    a_student_sending_each_teacher_control_is_forbidden_and_nothing_changes,
    a_code_of_another_school_answers_like_no_room_at_the_hello_and_over_http,
    a_closed_room_ends_its_sessions_and_refuses_later_joins_and_lookups,
    a_full_room_refuses_the_next_member_and_keeps_its_presence,
    out_of_range_tempo_meter_and_count_in_are_refused_on_the_control_stream,
    a_note_with_midi_128_is_refused_and_never_reaches_a_classmate,
    a_note_with_velocity_0_is_refused_and_never_reaches_a_classmate,
    a_note_flood_reaches_classmates_only_up_to_the_burst_and_rate,
    guessing_join_codes_is_rate_limited_without_revealing_the_right_one,
    a_refreshed_session_outlives_its_first_token_and_an_unrefreshed_one_is_ended,
    a_refresh_naming_another_person_or_role_is_refused_and_the_session_continues,
    an_expired_session_is_announced_as_closed_by_the_server,
    text_with_nul_or_control_characters_is_refused_and_changes_nothing,
);
