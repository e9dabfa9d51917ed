//! Bad input over the wire: every case gets a stable error code or is dropped and counted, and
//! the server and the other sessions carry on.

use std::time::Duration;

use downbeat_protocol::{
    Change, ClientMessage, ControlOp, ControlRequest, ErrorCode, FRAME_HEADER_LEN, MAX_FRAME_LEN, PROTOCOL_VERSION,
    ServerMessage,
};
use downbeat_tests::{RawSession, TestServer};

/// A bystander keeps receiving beat frames and can still change the room.
async fn bystander_still_served(server: &TestServer, bystander: &downbeat_client::Client) -> anyhow::Result<()> {
    let before = bystander.stats().frames;
    let ack = bystander.change(Change::SetMeter(3)).await?;
    downbeat_tests::wait_for_epoch(bystander, ack.applied.expect("a boundary").epoch).await?;
    // A frame every 100 ms right after a change (for a lead and until it takes effect): the
    // next few must keep arriving.
    bystander.wait_frames(before + 3, Duration::from_secs(5)).await?;
    assert!(server.stats.sessions_active.get() >= 1);
    Ok(())
}

/// A running room whose teacher is the bystander.
async fn setup() -> anyhow::Result<(TestServer, String, downbeat_client::Client)> {
    let server = TestServer::start().await?;
    let teacher = server.teacher("t-bystander");
    let room = server.create_room(&teacher, 100.0, 4).await?;
    let bystander = server.connect(&room, &teacher).await?;
    let (status, _) = server.http("POST", &format!("/api/rooms/{room}/start"), Some(&teacher), None).await?;
    assert_eq!(status, 200);
    Ok((server, room, bystander))
}

#[tokio::test]
async fn garbage_datagrams_are_dropped_and_counted_and_the_session_stays_up() -> anyhow::Result<()> {
    let (server, room, bystander) = setup().await?;
    // A co-teacher of the room, so its controls are its to make.
    let owner = server.teacher("t-bystander");
    let path = format!("/api/rooms/{room}/co-teachers/t-noisy");
    assert_eq!(server.http("PUT", &path, Some(&owner), None).await?.0, 200);
    let noisy = server.connect(&room, &server.teacher("t-noisy")).await?;
    let mut rng = downbeat_engine::sim::Rng::new(9);
    let mut sent = 0u64;
    for i in 0..500usize {
        let len = 1 + i % 300;
        let bytes: Vec<u8> = (0..len).map(|_| rng.next_u64() as u8).collect();
        // Only bytes that do not happen to decode count as garbage.
        if downbeat_protocol::decode_client_datagram(&bytes).is_err() && noisy.send_raw_datagram(&bytes).is_ok() {
            sent += 1;
        }
    }
    // The noisy session is still served: its controls are still acknowledged.
    let ack = noisy.change(Change::SetTempo(downbeat_protocol::MicroBpm::from_bpm(90))).await?;
    assert!(ack.applied.is_some());
    bystander_still_served(&server, &bystander).await?;
    // A burst this size trips the per-session datagram rate limit, whose drops are counted
    // too; loopback may also lose a few. Most must be accounted for, as garbage or as excess.
    let malformed = server.stats.datagrams_malformed.get();
    let limited = server.stats.datagrams_rate_limited.get();
    assert!(malformed >= 100 && malformed <= sent, "{malformed} malformed of {sent}");
    assert!(malformed + limited > sent / 2, "{malformed} malformed + {limited} rate-limited of {sent}");
    Ok(())
}

#[tokio::test]
async fn an_oversized_frame_is_refused_from_its_header() -> anyhow::Result<()> {
    let (server, room, bystander) = setup().await?;
    let mut raw = server.raw_session().await?;
    raw.write_message(&RawSession::hello(PROTOCOL_VERSION, &server.student("s-raw"), &room)).await?;
    assert!(matches!(raw.read_message().await?, Some(ServerMessage::Welcome(_))));
    // Declares 4 GiB; only the header is sent, so a server that allocated first would stall.
    raw.write(&u32::MAX.to_be_bytes()).await?;
    assert_eq!(raw.expect_error().await?, ErrorCode::FrameTooLarge);
    raw.conn.closed().await;
    assert_eq!(server.stats.frames_too_large.get(), 1);
    bystander_still_served(&server, &bystander).await?;
    Ok(())
}

#[tokio::test]
async fn a_frame_just_over_the_cap_is_refused_too() -> anyhow::Result<()> {
    let (server, room, _bystander) = setup().await?;
    let mut raw = server.raw_session().await?;
    raw.write_message(&RawSession::hello(PROTOCOL_VERSION, &server.student("s-raw"), &room)).await?;
    raw.read_message().await?;
    raw.write(&(MAX_FRAME_LEN + 1).to_be_bytes()).await?;
    assert_eq!(raw.expect_error().await?, ErrorCode::FrameTooLarge);
    Ok(())
}

#[tokio::test]
async fn a_malformed_frame_gets_a_code_and_closes_only_that_session() -> anyhow::Result<()> {
    let (server, room, bystander) = setup().await?;
    let mut raw = server.raw_session().await?;
    raw.write_message(&RawSession::hello(PROTOCOL_VERSION, &server.student("s-raw"), &room)).await?;
    assert!(matches!(raw.read_message().await?, Some(ServerMessage::Welcome(_))));
    let mut frame = 3u32.to_be_bytes().to_vec();
    frame.extend([0xff, 0xff, 0xff]);
    assert_eq!(frame.len(), FRAME_HEADER_LEN + 3);
    raw.write(&frame).await?;
    assert_eq!(raw.expect_error().await?, ErrorCode::MalformedFrame);
    raw.conn.closed().await;
    assert_eq!(server.stats.frames_malformed.get(), 1);
    bystander_still_served(&server, &bystander).await?;
    Ok(())
}

#[tokio::test]
async fn hello_problems_each_get_their_own_code() -> anyhow::Result<()> {
    let (server, room, bystander) = setup().await?;
    let token = server.student("s-raw");
    let cases = [
        (RawSession::hello(PROTOCOL_VERSION + 1, &token, &room), ErrorCode::UnsupportedVersion),
        (RawSession::hello(0, &token, &room), ErrorCode::UnsupportedVersion),
        (RawSession::hello(PROTOCOL_VERSION, "not-the-token", &room), ErrorCode::Unauthorized),
        (RawSession::hello(PROTOCOL_VERSION, &token, "no-such-room"), ErrorCode::RoomNotFound),
        (
            ClientMessage::Control(ControlRequest {
                request_id: 1,
                op: ControlOp::Timeline(Change::Start { count_in_bars: 0 }),
            }),
            ErrorCode::HelloRequired,
        ),
    ];
    for (message, code) in cases {
        let mut raw = server.raw_session().await?;
        raw.write_message(&message).await?;
        assert_eq!(raw.expect_error().await?, code);
        raw.conn.closed().await;
    }
    assert_eq!(server.stats.hello_failures.get(ErrorCode::UnsupportedVersion), 2);
    bystander_still_served(&server, &bystander).await?;
    Ok(())
}

#[tokio::test]
async fn a_silent_session_is_closed_at_the_hello_deadline() -> anyhow::Result<()> {
    let server = TestServer::start_with(|c| c.hello_timeout_ms = 300).await?;
    let mut raw = server.raw_session().await?;
    // Open the stream (a byte of nothing useful would be a malformed hello; send nothing).
    assert_eq!(raw.expect_error().await?, ErrorCode::HelloTimeout);
    Ok(())
}

#[tokio::test]
async fn refused_controls_get_codes_and_change_nothing() -> anyhow::Result<()> {
    let (server, room, bystander) = setup().await?;
    let before = bystander.timeline().expect("timeline");
    let refused = [
        (Change::SetTempo(downbeat_protocol::MicroBpm::from_bpm(301)), ErrorCode::TempoOutOfRange),
        (Change::SetTempo(downbeat_protocol::MicroBpm::from_bpm(19)), ErrorCode::TempoOutOfRange),
        (Change::SetMeter(0), ErrorCode::MeterOutOfRange),
        (Change::SetMeter(17), ErrorCode::MeterOutOfRange),
        (Change::Start { count_in_bars: 0 }, ErrorCode::AlreadyRunning),
        (Change::Start { count_in_bars: 9 }, ErrorCode::AlreadyRunning),
    ];
    for (change, code) in refused {
        match bystander.change(change).await {
            Err(downbeat_client::ClientError::Refused { code: got, .. }) => assert_eq!(got, code),
            other => panic!("{change:?}: expected {code}, got {other:?}"),
        }
    }
    let teacher = server.teacher("t-bystander");
    let (_, body) = server.http("GET", &format!("/api/rooms/{room}"), Some(&teacher), None).await?;
    assert_eq!(body["timeline"]["epoch"].as_u64(), Some(before.epoch()), "nothing changed");
    Ok(())
}

/// The members the room lists over HTTP.
async fn members(server: &TestServer, code: &str) -> anyhow::Result<usize> {
    let (status, room) = server.http("GET", &format!("/api/rooms/{code}"), Some(&server.teacher("t-1")), None).await?;
    assert_eq!(status, 200, "{room}");
    Ok(room["members"].as_array().map_or(0, Vec::len))
}

/// Waits (at most 10 s) for the server to close `raw` and returns its application code.
async fn closed_with(raw: &RawSession) -> anyhow::Result<u64> {
    match tokio::time::timeout(Duration::from_secs(10), raw.conn.closed()).await? {
        wtransport::error::ConnectionError::ApplicationClosed(close) => Ok(close.code().into_inner()),
        other => anyhow::bail!("closed, but not by the server application: {other}"),
    }
}

/// A peer that keeps its QUIC receive window shut never takes its welcome: the server gives
/// up on it after the hello's time with `server_busy`, and the seat it was given is free
/// again. A peer that took its welcome but stopped reading is closed with `server_busy` once a
/// control frame waited longer than the idle timeout, and its seat is freed at once, the class
/// seeing it leave. (Before, each held its seat and its school's session slot for as long as
/// it kept the connection alive.)
#[tokio::test]
async fn a_peer_that_stops_taking_control_frames_loses_its_seat() -> anyhow::Result<()> {
    let server = TestServer::start_with(|c| {
        c.hello_timeout_ms = 500;
        c.idle_timeout_ms = 1_000;
        c.keep_alive_ms = 300;
    })
    .await?;
    let teacher_token = server.teacher("t-1");
    let code = server.create_room(&teacher_token, 100.0, 4).await?;
    let teacher = server.connect(&code, &teacher_token).await?;
    let (status, _) = server.http("POST", &format!("/api/rooms/{code}/start"), Some(&teacher_token), None).await?;
    assert_eq!(status, 200);

    // Enough window to set the session up, not enough for the welcome.
    let mut shut = server.raw_session_with_window(48).await?;
    shut.write_message(&RawSession::hello(PROTOCOL_VERSION, &server.student("s-shut"), &code)).await?;
    assert_eq!(closed_with(&shut).await?, u64::from(ErrorCode::ServerBusy.as_u16()));
    assert_eq!(members(&server, &code).await?, 1, "only the teacher is seated");

    // Takes the welcome, then reads nothing more while prompts fill its window.
    let mut greedy = server.raw_session_with_window(2_048).await?;
    greedy.write_message(&RawSession::hello(PROTOCOL_VERSION, &server.student("s-greedy"), &code)).await?;
    let Some(ServerMessage::Welcome(welcome)) = greedy.read_message().await? else { anyhow::bail!("no welcome") };
    assert_eq!(members(&server, &code).await?, 2);
    // 15 prompts of about 190 bytes each are more than its window (and within the teacher's
    // burst of controls).
    for i in 0..15 {
        teacher.set_prompt(&format!("{i:>3} {}", "la ".repeat(60))).await?;
    }
    assert_eq!(closed_with(&greedy).await?, u64::from(ErrorCode::ServerBusy.as_u16()));
    let left =
        |e: &downbeat_client::Event| matches!(e, downbeat_client::Event::MemberLeft(id, _) if *id == welcome.member_id);
    downbeat_tests::events_until(&teacher, left).await?;
    assert_eq!(members(&server, &code).await?, 1, "the seat is free");
    // The teacher was never held up.
    bystander_still_served(&server, &teacher).await
}

/// One network may hold only so many sessions (WebTransport and WebSocket together; a school
/// behind one NAT address fits under the default): past the cap, a WebTransport session is
/// refused before it starts and a WebSocket upgrade answers `server_busy`, while another
/// address is served, and a place comes back when a session ends.
#[tokio::test]
async fn one_network_holds_at_most_its_share_of_sessions() -> anyhow::Result<()> {
    let server = TestServer::start_with(|c| c.max_sessions_per_address = 2).await?;
    let here: std::net::IpAddr = "127.0.0.1".parse()?;
    let first = server.raw_session_from(Some(here)).await?;
    let _second = server.raw_websocket_from(None, Some(here)).await?;
    assert!(server.raw_session_from(Some(here)).await.is_err(), "a third WebTransport session");
    let refused = server.raw_websocket_from(None, Some(here)).await;
    let message = format!("{:#}", refused.expect_err("a third WebSocket session"));
    assert!(message.contains("503"), "{message}");
    // Another address is served.
    let _elsewhere = server.raw_session_from(Some("127.0.0.2".parse()?)).await?;
    // A place comes back once a session ends.
    first.conn.close(wtransport::VarInt::from_u32(0), b"");
    drop(first);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        match server.raw_session_from(Some(here)).await {
            Ok(_) => break,
            // The server frees the place once it has seen the close: poll until it has.
            Err(_) if tokio::time::Instant::now() < deadline => tokio::time::sleep(Duration::from_millis(50)).await,
            Err(e) => return Err(e.context("the place never came back")),
        }
    }
    Ok(())
}

/// While the server is told to ask every new QUIC connection for address validation (as it
/// does once handshakes pile up), clients still connect: they answer the Retry and go on.
#[tokio::test]
async fn under_handshake_pressure_clients_prove_their_address_and_connect() -> anyhow::Result<()> {
    let server = TestServer::start_with(|c| c.retry_above_handshakes = 0).await?;
    let teacher = server.teacher("t-1");
    let code = server.create_room(&teacher, 100.0, 4).await?;
    let client = server.connect(&code, &teacher).await?;
    client.wait_synced(Duration::from_secs(10)).await?;
    assert!(server.stats.handshakes_retried.get() >= 1);
    Ok(())
}

/// The server reads a session's datagrams from the QUIC connection itself and from
/// wtransport's driver, whichever has one first: every clock-sync request is answered, and an
/// HTTP/3 datagram addressed to no session of this connection is dropped (counted if it came
/// straight from the connection; the driver drops such datagrams itself) while the session
/// carries on.
#[tokio::test]
async fn every_sync_request_is_answered_and_a_datagram_for_another_session_is_dropped() -> anyhow::Result<()> {
    use downbeat_protocol::ServerDatagram;
    use downbeat_tests::sync_request;

    let (server, room, _bystander) = setup().await?;
    let mut raw = server.raw_session().await?;
    raw.write_message(&RawSession::hello(PROTOCOL_VERSION, &server.student("s-sync"), &room)).await?;
    match raw.read_message().await? {
        Some(ServerMessage::Welcome(_)) => {}
        other => anyhow::bail!("expected a welcome, got {other:?}"),
    }
    // The reply to request `id`, skipping beat frames; `None` if none came within a second.
    async fn reply_to(raw: &RawSession, id: u32) -> anyhow::Result<Option<u32>> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(1);
        loop {
            let Ok(datagram) = tokio::time::timeout_at(deadline, raw.conn.receive_datagram()).await else {
                return Ok(None);
            };
            if let ServerDatagram::SyncReply(reply) = downbeat_protocol::decode_server_datagram(&datagram?)?
                && reply.id == id
            {
                return Ok(Some(reply.id));
            }
        }
    }
    let mut answered = Vec::new();
    for id in 1..=20u32 {
        raw.conn.send_datagram(sync_request(id, u64::from(id) * 1_000, 0)?)?;
        answered.extend(reply_to(&raw, id).await?);
    }
    assert_eq!(answered, (1..=20).collect::<Vec<_>>());

    // The same request behind the quarter stream id of another session (this connection's
    // session is on stream 0, quarter id 0): never answered.
    let before = server.stats.datagrams_malformed.get();
    let mut stray = vec![0x01];
    stray.extend(sync_request(99, 99_000, 0)?);
    raw.conn.quic_connection().send_datagram(stray.into())?;
    assert_eq!(reply_to(&raw, 99).await?, None);
    assert!(server.stats.datagrams_malformed.get() <= before + 1);
    // And the session is still answered.
    raw.conn.send_datagram(sync_request(100, 100_000, 0)?)?;
    assert_eq!(reply_to(&raw, 100).await?, Some(100));
    Ok(())
}

/// A QUIC connection to the WebTransport port that does not open a WebTransport session (no
/// request, another method, a request that does not start with HEADERS) is closed with the
/// HTTP/3 error that says why, and sessions carry on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http3_that_is_not_a_webtransport_connect_is_closed_with_its_http3_error() -> anyhow::Result<()> {
    use wtransport::proto::error::ErrorCode as H3Error;
    use wtransport::proto::frame::Frame;
    use wtransport::proto::headers::Headers;
    use wtransport::quinn;

    let (server, _room, bystander) = setup().await?;
    let config = wtransport::ClientConfig::builder()
        .with_bind_default()
        .with_server_certificate_hashes(server.hashes.iter().map(|h| (*h).into()))
        .build();
    let endpoint = quinn::Endpoint::client((std::net::Ipv4Addr::LOCALHOST, 0).into())?;
    let addr = std::net::SocketAddr::from((std::net::Ipv4Addr::LOCALHOST, server.wt_port));
    let headers = |method: &str| {
        let fields = [
            (":method", method),
            (":scheme", "https"),
            (":authority", "localhost"),
            (":path", "/"),
            (":protocol", "webtransport"),
        ];
        let headers: Headers = fields.into_iter().collect();
        let mut bytes = Vec::new();
        headers.generate_frame().write(&mut bytes).expect("encodes");
        bytes
    };
    let mut data = Vec::new();
    Frame::new_data(b"hello".as_slice().into()).write(&mut data).expect("encodes");
    for (what, first_bytes, expected) in
        [("a GET", headers("GET"), H3Error::Message), ("DATA before HEADERS", data, H3Error::FrameUnexpected)]
    {
        let conn = endpoint.connect_with(config.quic_config().clone(), addr, "localhost")?.await?;
        let (mut send, _recv) = conn.open_bi().await?;
        send.write_all(&first_bytes).await?;
        let closed = tokio::time::timeout(Duration::from_secs(10), conn.closed()).await?;
        match closed {
            quinn::ConnectionError::ApplicationClosed(close) => {
                assert_eq!(close.error_code.into_inner(), expected.to_code().into_inner(), "{what}");
            }
            other => anyhow::bail!("{what}: closed, but not by the server with an HTTP/3 error: {other}"),
        }
    }
    bystander_still_served(&server, &bystander).await
}
