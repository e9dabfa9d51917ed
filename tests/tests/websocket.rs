//! Bad input on the WebSocket path (`/api/ws`), end to end over loopback: a request that is not
//! an upgrade, a hello without a valid token, text messages, unknown tags, frames that do not
//! decode, oversized messages, a datagram before the hello, and a socket that never reads.
//!
//! Each gets its stable error code on the control channel, then a close whose code is 4000 plus
//! that code, and changes nothing for the class: a teacher connected meanwhile sees the same
//! room (members and timeline epoch) as before. A peer that stops reading is dropped once it
//! stops answering pings, and the server's sessions count goes back down (how little it holds meanwhile is
//! `server::session::websocket`'s own test).

use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use downbeat_protocol::ws::{CONTROL, DATAGRAM, MAX_MESSAGE_LEN};
use downbeat_protocol::{ErrorCode, PROTOCOL_VERSION, ServerMessage, Transport};
use downbeat_tests::{RawSession, RawWebSocket, TestServer};
use tokio_tungstenite::tungstenite::Message;

const WAIT: Duration = Duration::from_secs(10);

/// What a bystander can see of the room: its members and its timeline epoch.
async fn room_state(server: &TestServer, code: &str, teacher: &str) -> Result<(Vec<u64>, u64)> {
    let (status, room) = server.http("GET", &format!("/api/rooms/{code}"), Some(teacher), None).await?;
    assert_eq!(status, 200, "{room}");
    let mut members: Vec<u64> =
        room["members"].as_array().into_iter().flatten().filter_map(|m| m["id"].as_u64()).collect();
    members.sort_unstable();
    Ok((members, room["timeline"]["epoch"].as_u64().unwrap_or_default()))
}

/// A room with its teacher connected over WebSocket: (server, code, teacher token, client).
async fn class() -> Result<(TestServer, String, String, downbeat_client::Client)> {
    let server = TestServer::start_with(|c| {
        c.idle_timeout_ms = 1_000;
        c.keep_alive_ms = 200;
        c.seat_grace_ms = 100;
    })
    .await?
    .over(Transport::WebSocket);
    let teacher = server.teacher("t-1");
    let code = server.create_room(&teacher, 100.0, 4).await?;
    let client = server.connect(&code, &teacher).await?;
    Ok((server, code, teacher, client))
}

/// A student's raw session, welcomed into `code`.
async fn joined(server: &TestServer, code: &str, sub: &str, recv_buffer: Option<u32>) -> Result<RawWebSocket> {
    let mut raw = server.raw_websocket(recv_buffer).await?;
    raw.send_message(&RawSession::hello(PROTOCOL_VERSION, &server.student(sub), code)).await?;
    match raw.next_message().await {
        Ok(ServerMessage::Welcome(_)) => Ok(raw),
        other => bail!("expected a welcome, got {other:?}"),
    }
}

fn close_code(code: ErrorCode) -> u16 {
    4000 + code.as_u16()
}

#[tokio::test]
async fn a_request_that_is_not_an_upgrade_is_a_bad_request() -> Result<()> {
    let server = TestServer::start().await?;
    let (status, body) = server.http("GET", "/api/ws", None, None).await?;
    assert_eq!((status, body["error"]["code"].as_str()), (400, Some("bad_request")), "{body}");
    Ok(())
}

#[tokio::test]
async fn a_hello_without_a_valid_token_is_unauthorized_and_changes_nothing() -> Result<()> {
    let (server, code, teacher, _client) = class().await?;
    let before = room_state(&server, &code, &teacher).await?;
    for token in ["", "not-a-token"] {
        let mut raw = server.raw_websocket(None).await?;
        raw.send_message(&RawSession::hello(PROTOCOL_VERSION, token, &code)).await?;
        let (error, close) = raw.expect_error_and_close().await?;
        assert_eq!((error, close), (ErrorCode::Unauthorized, close_code(ErrorCode::Unauthorized)), "{token:?}");
    }
    // A datagram where the hello must be.
    let mut raw = server.raw_websocket(None).await?;
    raw.send(Message::Binary(vec![DATAGRAM, 0].into())).await?;
    let (error, close) = raw.expect_error_and_close().await?;
    assert_eq!((error, close), (ErrorCode::MalformedFrame, close_code(ErrorCode::MalformedFrame)));
    assert_eq!(room_state(&server, &code, &teacher).await?, before);
    assert_eq!(server.stats.hello_failures.get(ErrorCode::Unauthorized), 2);
    Ok(())
}

#[tokio::test]
async fn malformed_and_oversized_messages_end_only_that_session() -> Result<()> {
    let (server, code, teacher, client) = class().await?;
    let before = room_state(&server, &code, &teacher).await?;
    let mut header_too_long = vec![CONTROL];
    header_too_long.extend_from_slice(&100u32.to_be_bytes());
    header_too_long.extend_from_slice(&[0; 10]);
    let mut undecodable = vec![CONTROL];
    undecodable.extend_from_slice(&3u32.to_be_bytes());
    undecodable.extend_from_slice(&[0xff, 0xff, 0xff]);
    let cases = [
        ("a text message", Message::Text("hello".into()), ErrorCode::MalformedFrame),
        ("an unknown tag", Message::Binary(vec![7, 1, 2].into()), ErrorCode::MalformedFrame),
        ("a frame longer than its message", Message::Binary(header_too_long.into()), ErrorCode::MalformedFrame),
        ("a frame that does not decode", Message::Binary(undecodable.into()), ErrorCode::MalformedFrame),
        ("an oversized message", Message::Binary(vec![CONTROL; MAX_MESSAGE_LEN + 1].into()), ErrorCode::FrameTooLarge),
    ];
    for (i, (what, message, want)) in cases.into_iter().enumerate() {
        let mut raw = joined(&server, &code, &format!("s-{i}"), None).await?;
        raw.send(message).await?;
        let (error, close) = raw.expect_error_and_close().await?;
        assert_eq!((error, close), (want, close_code(want)), "{what}");
    }
    // The class never noticed: same members (the bad sessions left), same timeline, and the
    // teacher's session still answers.
    let deadline = Instant::now() + WAIT;
    while room_state(&server, &code, &teacher).await? != before {
        if Instant::now() > deadline {
            bail!("the room did not return to its state: {:?}", room_state(&server, &code, &teacher).await?);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    client.wait_synced(WAIT).await?;
    assert_eq!(server.stats.frames_malformed.get(), 4);
    assert_eq!(server.stats.frames_too_large.get(), 1);
    Ok(())
}

#[tokio::test]
async fn a_socket_that_never_reads_is_dropped_when_it_stops_answering() -> Result<()> {
    let (server, code, teacher, _client) = class().await?;
    let before = room_state(&server, &code, &teacher).await?;
    // A tiny receive buffer, and from the welcome on nobody reads it: pings go unanswered.
    let stalled = joined(&server, &code, "s-stalled", Some(4096)).await?;
    let websocket = |server: &TestServer| server.stats.transport_sessions_active.get(Transport::WebSocket).get();
    assert_eq!(websocket(&server), 2);
    let deadline = Instant::now() + WAIT;
    while websocket(&server) != 1 {
        if Instant::now() > deadline {
            bail!("the stalled session was never dropped");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Its seat goes after the grace period; the room is as it was.
    let deadline = Instant::now() + WAIT;
    while room_state(&server, &code, &teacher).await? != before {
        if Instant::now() > deadline {
            bail!("the stalled member's seat was never freed");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drop(stalled);
    Ok(())
}

/// A session the server ends says why even to a peer that is still sending: closing a socket
/// that holds unread data resets the connection, and the reset makes the peer's kernel throw
/// away the goodbye before the peer reads it. Here a student pings every millisecond while the
/// teacher closes the room, in ten rooms one after the other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_still_sending_when_its_session_ends_still_reads_why() -> Result<()> {
    use futures_util::{SinkExt as _, StreamExt as _};
    let (server, _, _, _client) = class().await?;
    for round in 0..10 {
        // A teacher per room: one teacher's twenty requests at once would be rate limited.
        let teacher = server.teacher(&format!("t-round-{round}"));
        let code = server.create_room(&teacher, 100.0, 4).await?;
        let raw = joined(&server, &code, &format!("s-{round}"), None).await?;
        let (mut sink, mut stream) = raw.socket.split();
        let pinger = tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(1));
            loop {
                tick.tick().await;
                if sink.send(Message::Ping(vec![0; 64].into())).await.is_err() {
                    return;
                }
            }
        });
        let (status, body) = server.http("DELETE", &format!("/api/rooms/{code}"), Some(&teacher), None).await?;
        assert_eq!(status, 200, "{body}");
        let mut heard = Vec::new();
        let close = tokio::time::timeout(WAIT, async {
            while let Some(message) = stream.next().await {
                match message? {
                    Message::Binary(bytes) => {
                        if let Ok(downbeat_protocol::ws::Unit::Control(body)) = downbeat_protocol::ws::split(&bytes) {
                            heard.push(downbeat_protocol::decode_frame_body::<ServerMessage>(body)?);
                        }
                    }
                    Message::Close(frame) => return Ok(frame.map(|f| u16::from(f.code))),
                    _ => {}
                }
            }
            anyhow::Ok(None)
        })
        .await;
        pinger.abort();
        let close = close
            .map_err(anyhow::Error::from)
            .and_then(|r| r)
            .map_err(|e| anyhow::anyhow!("round {round}: {e} after {heard:?}"))?;
        assert!(
            matches!(heard.as_slice(), [ServerMessage::RoomClosed { .. }, ServerMessage::Error(e)] if e.code == ErrorCode::RoomClosed),
            "round {round}: {heard:?}"
        );
        assert_eq!(close, Some(close_code(ErrorCode::RoomClosed)), "round {round}");
    }
    Ok(())
}
