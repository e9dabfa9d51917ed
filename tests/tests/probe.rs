//! Network checks (probe sessions, what the `/check` page runs), end to end over loopback on
//! both transports: a probe syncs its clock without a token; anything but clock sync ends it
//! with `probe_only`; its time running out ends it with `probe_over`; the caps per client
//! network and in all refuse with `too_many_probes` and are given back when probes end; the
//! metrics count them; and a probe holds no seat and counts toward no school's sessions.

use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use downbeat_client::probe::{self, End, Quality};
use downbeat_protocol::{
    BoundedVec, ClientDatagram, ClientMessage, ClientReport, ErrorCode, Note, PROTOCOL_VERSION, ServerMessage,
    ServerNanos, encode_client_datagram,
};
use downbeat_server::config::TenantLimits;
use downbeat_tests::{RawLink, RawSession, TestServer, Transport, over_both_transports, school};

const PROBE: ClientMessage = ClientMessage::Probe { version: PROTOCOL_VERSION };
const OTHER_NETWORK: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));

over_both_transports!(
    a_probe_syncs_without_a_token_and_gets_replies,
    anything_but_clock_sync_ends_a_probe_with_probe_only,
    a_probe_ends_with_probe_over_when_its_time_is_up,
    the_caps_refuse_with_too_many_probes_and_come_back_when_probes_end,
    a_probe_holds_no_seat_and_counts_toward_no_school,
);

/// A raw probe from `from` (127.0.0.1 if `None`) that the server started: the link and the
/// duration it was given.
async fn started(server: &TestServer, from: Option<IpAddr>) -> Result<(RawLink, u32)> {
    let mut link = server.raw_link_from(from).await?;
    link.write_message(&PROBE).await?;
    match link.read_message().await? {
        Some(ServerMessage::ProbeStarted { duration_ms }) => Ok((link, duration_ms)),
        other => bail!("expected the probe to start, got {other:?}"),
    }
}

/// A raw probe from `from` that the server refused: the error code and the code it closed with.
async fn refused(server: &TestServer, from: Option<IpAddr>) -> Result<(ErrorCode, u16)> {
    let mut link = server.raw_link_from(from).await?;
    link.write_message(&PROBE).await?;
    let code = match link.read_message().await? {
        Some(ServerMessage::Error(e)) => e.code,
        other => bail!("expected a refusal, got {other:?}"),
    };
    Ok((code, link.closed().await?))
}

/// Ends a running probe by sending a control frame it may not send: the error and close codes.
async fn end_with_report(link: &mut RawLink) -> Result<(ErrorCode, u16)> {
    link.write_message(&ClientMessage::Report(ClientReport::default())).await?;
    let code = match link.read_message().await? {
        Some(ServerMessage::Error(e)) => e.code,
        other => bail!("expected an error, got {other:?}"),
    };
    Ok((code, link.closed().await?))
}

async fn metrics(server: &TestServer) -> Result<String> {
    Ok(reqwest::get(format!("http://{}/metrics", server.http)).await?.text().await?)
}

/// The value of the sample `series` (name and labels, as `/metrics` writes them).
fn sample(metrics: &str, series: &str) -> Option<u64> {
    metrics.lines().find_map(|line| line.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

async fn a_probe_syncs_without_a_token_and_gets_replies(transport: Transport) -> Result<()> {
    let server = TestServer::start().await?.over(transport);
    let mut options = server.probe_options();
    options.config.duration_nanos = 1_000_000_000;
    let summary = probe::probe(&options).await?;
    println!("{transport:?} probe: {summary:?}");
    assert_eq!(summary.end, Some(End::Done), "{summary:?}");
    assert!(summary.started && summary.reachable(), "{summary:?}");
    // One request every 50 ms for a second; on loopback (nearly) every one is answered.
    assert!(summary.sent >= 15 && summary.samples >= 15, "{summary:?}");
    let (p50, p95) = (summary.rtt_p50_nanos.context("a median")?, summary.rtt_p95_nanos.context("a p95")?);
    assert!(p50 <= p95 && p95 < 100_000_000, "{summary:?}");
    assert!(summary.synced, "{summary:?}");
    assert_eq!(summary.quality, Some(Quality::Good), "{summary:?}");
    assert_eq!(server.stats.probes_started.get(transport).get(), 1);
    assert!(server.stats.sync_replies_sent.get() >= summary.samples as u64);
    let text = metrics(&server).await?;
    let label = transport.as_str();
    assert_eq!(sample(&text, &format!("downbeat_probes_started_total{{transport=\"{label}\"}}")), Some(1), "{text}");
    assert_eq!(sample(&text, &format!("downbeat_probes_refused_total{{transport=\"{label}\"}}")), Some(0));
    Ok(())
}

async fn anything_but_clock_sync_ends_a_probe_with_probe_only(transport: Transport) -> Result<()> {
    let server = TestServer::start().await?.over(transport);
    let only = (ErrorCode::ProbeOnly, ErrorCode::ProbeOnly.as_u16());
    // A control frame: a report, then a hello after the probe started.
    let (mut link, _) = started(&server, None).await?;
    assert_eq!(end_with_report(&mut link).await?, only);
    let (mut link, _) = started(&server, None).await?;
    link.write_message(&RawSession::hello(PROTOCOL_VERSION, &server.student("s-1"), "K7QFM3XP")).await?;
    match link.read_message().await? {
        Some(ServerMessage::Error(e)) => assert_eq!(e.code, ErrorCode::ProbeOnly),
        other => bail!("expected probe_only, got {other:?}"),
    }
    assert_eq!(link.closed().await?, only.1);
    // A datagram of notes.
    let (mut link, _) = started(&server, None).await?;
    let note = Note { seq: 1, midi: 60, velocity: 100, instrument: 0, played_at: ServerNanos(1) };
    let notes = ClientDatagram::Notes(BoundedVec::try_from_vec(vec![note]).expect("one note fits"));
    link.send_datagram(&encode_client_datagram(&notes)?).await?;
    match link.read_message().await? {
        Some(ServerMessage::Error(e)) => assert_eq!(e.code, ErrorCode::ProbeOnly),
        other => bail!("expected probe_only, got {other:?}"),
    }
    assert_eq!(link.closed().await?, only.1);
    assert_eq!(server.stats.refused.get(ErrorCode::ProbeOnly), 3);
    assert_eq!(server.stats.note_datagrams_received.get(), 0, "a probe's notes reach no room");
    Ok(())
}

async fn a_probe_ends_with_probe_over_when_its_time_is_up(transport: Transport) -> Result<()> {
    let server = TestServer::start_with(|c| c.probe_duration_ms = 400).await?.over(transport);
    // A raw probe is told its duration and closed with probe_over once it is up.
    let (mut link, duration_ms) = started(&server, None).await?;
    assert_eq!(duration_ms, 400);
    match link.read_message().await? {
        Some(ServerMessage::Error(e)) => assert_eq!(e.code, ErrorCode::ProbeOver, "{e:?}"),
        other => bail!("expected probe_over, got {other:?}"),
    }
    assert_eq!(link.closed().await?, ErrorCode::ProbeOver.as_u16());
    // A client that would sync for 10 s takes the server's shorter time: it stops after
    // 400 ms (one request every 50 ms), by itself or at the server's probe_over, a normal end.
    let mut options = server.probe_options();
    options.config.duration_nanos = 10_000_000_000;
    let summary = tokio::time::timeout(Duration::from_secs(5), probe::probe(&options)).await??;
    assert!(summary.end.as_ref().is_some_and(End::ran_its_course), "{summary:?}");
    assert!(summary.reachable() && (4..=9).contains(&summary.sent), "{summary:?}");
    Ok(())
}

async fn the_caps_refuse_with_too_many_probes_and_come_back_when_probes_end(transport: Transport) -> Result<()> {
    let server = TestServer::start_with(|c| {
        c.max_probes_per_address = 2;
        c.max_probes = 3;
    })
    .await?
    .over(transport);
    let too_many = (ErrorCode::TooManyProbes, ErrorCode::TooManyProbes.as_u16());
    let (mut a1, _) = started(&server, None).await?;
    let (_a2, _) = started(&server, None).await?;
    assert_eq!(refused(&server, None).await?, too_many, "a third from one network");
    let (_b1, _) = started(&server, Some(OTHER_NETWORK)).await?;
    assert_eq!(refused(&server, Some(OTHER_NETWORK)).await?, too_many, "a fourth in all");
    assert_eq!(server.stats.probes_active.get(), 3);
    // A probe that ends gives its place back (before it hears that it ended): one more from
    // its network fits again, under both caps.
    end_with_report(&mut a1).await?;
    let (_a3, _) = started(&server, None).await?;
    assert_eq!(refused(&server, Some(OTHER_NETWORK)).await?, too_many, "the total is full again");
    let stats = &server.stats;
    assert_eq!(
        (stats.probes_started.get(transport).get(), stats.probes_refused.get(transport).get()),
        (4, 3),
        "started and refused"
    );
    assert_eq!(stats.probes_active.get(), 3);
    assert_eq!(stats.refused.get(ErrorCode::TooManyProbes), 3);
    let text = metrics(&server).await?;
    let label = transport.as_str();
    assert_eq!(sample(&text, &format!("downbeat_probes_refused_total{{transport=\"{label}\"}}")), Some(3), "{text}");
    assert_eq!(sample(&text, "downbeat_probes_active"), Some(3), "{text}");
    Ok(())
}

async fn a_probe_holds_no_seat_and_counts_toward_no_school(transport: Transport) -> Result<()> {
    const SECRET: &[u8; 32] = b"probe-test-secret-probe-test-sec";
    let limits = TenantLimits { max_sessions: 1, ..TenantLimits::default() };
    let server = TestServer::start_with(|c| c.tenants = vec![school("a", SECRET, limits)]).await?.over(transport);
    let teacher =
        server.tenants.mint("a", downbeat_server::auth::Role::Teacher, "t-1", "T", Duration::from_secs(3600))?;
    let code = server.create_room(&teacher, 100.0, 4).await?;
    let _teacher = server.connect(&code, &teacher).await?;
    // The school is at its one session; a probe still starts, and the room does not see it.
    let (_probe, _) = started(&server, None).await?;
    let (status, room) = server.http("GET", &format!("/api/rooms/{code}"), Some(&teacher), None).await?;
    assert_eq!(status, 200, "{room}");
    assert_eq!(room["members"].as_array().map(Vec::len), Some(1), "only the teacher: {room}");
    let student =
        server.tenants.mint("a", downbeat_server::auth::Role::Student, "s-1", "S", Duration::from_secs(3600))?;
    let mut link = server.raw_link().await?;
    link.write_message(&RawSession::hello(PROTOCOL_VERSION, &student, &code)).await?;
    match link.read_message().await? {
        Some(ServerMessage::Error(e)) => {
            assert_eq!(e.code, ErrorCode::TooManySessions, "the school's one session is the teacher's")
        }
        other => bail!("expected too_many_sessions, got {other:?}"),
    }
    Ok(())
}
