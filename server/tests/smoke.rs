//! Real-socket smoke tests of the server alone: loopback, port 0, a wtransport client pinning
//! the development certificate's hash. The end-to-end timing evidence lives in the workspace's
//! `tests/` crate; these check the session layer's contract: welcome, sync, beats, controls,
//! and a stable error code for every kind of bad input.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use downbeat_protocol::{
    BoundedString, Change, ClientDatagram, ClientMessage, ClientNanos, ControlRequest, ErrorCode, FRAME_HEADER_LEN,
    Hello, MicroBpm, PROTOCOL_VERSION, ServerDatagram, ServerMessage, SyncRequest, decode_frame_body,
    decode_server_datagram, encode_client_datagram, encode_frame, frame_body_len,
};
use downbeat_server::{Config, Server, ServerError, Stats};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio::time::timeout;
use wtransport::error::ConnectionError;
use wtransport::tls::Sha256Digest;
use wtransport::{ClientConfig, Connection, Endpoint, RecvStream, SendStream};

const TOKEN: &str = "smoke-test-token";
const WAIT: Duration = Duration::from_secs(10);

struct Running {
    http: SocketAddr,
    url: String,
    port: u16,
    hashes: Vec<[u8; 32]>,
    stats: Arc<Stats>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<Result<(), ServerError>>>,
    _dir: tempfile::TempDir,
}

async fn start() -> Running {
    let dir = tempfile::tempdir().unwrap();
    let config = Config {
        http_addr: "127.0.0.1:0".parse().unwrap(),
        wt_port: 0,
        data_dir: dir.path().to_owned(),
        dev_token: Some(TOKEN.to_owned()),
        hello_timeout_ms: 1000,
        ..Config::default()
    };
    let server = Server::bind(config).await.unwrap();
    let (stop, stopped) = oneshot::channel::<()>();
    let running = Running {
        http: server.http_addr(),
        url: server.webtransport_url("127.0.0.1"),
        port: server.webtransport_port(),
        hashes: server.cert_hashes(),
        stats: server.stats(),
        stop: Some(stop),
        task: None,
        _dir: dir,
    };
    assert_eq!(server.dev_token(), TOKEN);
    let task = tokio::spawn(server.run(async {
        let _ = stopped.await;
    }));
    Running { task: Some(task), ..running }
}

impl Running {
    /// A minimal HTTP/1.1 request; returns the status and the JSON body.
    async fn http(&self, method: &str, path: &str, body: Option<&str>) -> (u16, serde_json::Value) {
        let mut stream = tokio::net::TcpStream::connect(self.http).await.unwrap();
        let body = body.unwrap_or("");
        let request = format!(
            "{method} {path} HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {TOKEN}\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut response = Vec::new();
        timeout(WAIT, stream.read_to_end(&mut response)).await.unwrap().unwrap();
        let text = String::from_utf8(response).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        let status = head.split(' ').nth(1).unwrap().parse().unwrap();
        (status, serde_json::from_str(body).unwrap_or(serde_json::Value::Null))
    }

    async fn create_room(&self) -> String {
        let (status, v) = self.http("POST", "/api/rooms", Some(r#"{"tempo_bpm": 120, "beats_per_bar": 4}"#)).await;
        assert_eq!(status, 201, "{v}");
        v["room_id"].as_str().unwrap().to_owned()
    }

    async fn connect(&self) -> Connection {
        self.connect_to(&self.url).await
    }

    async fn connect_to(&self, url: &str) -> Connection {
        let config = ClientConfig::builder()
            .with_bind_default()
            .with_server_certificate_hashes(self.hashes.iter().map(|h| Sha256Digest::new(*h)))
            .build();
        let endpoint = Endpoint::client(config).unwrap();
        timeout(WAIT, endpoint.connect(url)).await.unwrap().unwrap()
    }

    async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        let result = timeout(WAIT, self.task.take().unwrap()).await.unwrap().unwrap();
        result.unwrap();
    }
}

async fn open(conn: &Connection) -> (SendStream, RecvStream) {
    timeout(WAIT, async { conn.open_bi().await.unwrap().await.unwrap() }).await.unwrap()
}

async fn send(stream: &mut SendStream, message: &ClientMessage) {
    stream.write_all(&encode_frame(message).unwrap()).await.unwrap();
}

async fn recv(stream: &mut RecvStream) -> ServerMessage {
    timeout(WAIT, async {
        let mut header = [0u8; FRAME_HEADER_LEN];
        stream.read_exact(&mut header).await.unwrap();
        let mut body = vec![0u8; frame_body_len(header).unwrap()];
        stream.read_exact(&mut body).await.unwrap();
        decode_frame_body(&body).unwrap()
    })
    .await
    .unwrap()
}

fn hello(version: u16, token: &str, room: &str) -> ClientMessage {
    ClientMessage::Hello(Hello {
        version,
        token: BoundedString::new(token).unwrap(),
        room: BoundedString::new(room).unwrap(),
        name: BoundedString::new("Ana").unwrap(),
    })
}

/// Waits for the server to close `conn` and returns the application close code.
async fn close_code(conn: &Connection) -> u64 {
    match timeout(WAIT, conn.closed()).await.unwrap() {
        ConnectionError::ApplicationClosed(close) => close.code().into_inner(),
        other => panic!("closed without an application code: {other:?}"),
    }
}

fn expect_error(message: ServerMessage, code: ErrorCode, request_id: Option<u32>) {
    match message {
        ServerMessage::Error(e) => {
            assert_eq!(e.code, code, "{}", e.message);
            assert_eq!(e.request_id, request_id);
            assert!(!e.message.is_empty());
        }
        other => panic!("expected {code}, got {other:?}"),
    }
}

/// Next datagram that `pick` accepts, skipping others.
async fn next_datagram<T>(conn: &Connection, mut pick: impl FnMut(ServerDatagram) -> Option<T>) -> T {
    timeout(WAIT, async {
        loop {
            let d = conn.receive_datagram().await.unwrap();
            if let Some(t) = pick(decode_server_datagram(&d).unwrap()) {
                return t;
            }
        }
    })
    .await
    .unwrap()
}

#[tokio::test]
async fn hello_welcome_sync_beats_and_controls() {
    let server = start().await;
    let room = server.create_room().await;
    let conn = server.connect().await;
    let (mut tx, mut rx) = open(&conn).await;
    send(&mut tx, &hello(PROTOCOL_VERSION, TOKEN, &room)).await;
    let ServerMessage::Welcome(welcome) = recv(&mut rx).await else { panic!("no welcome") };
    assert_eq!(welcome.room.as_str(), room);
    assert_eq!(welcome.members.len(), 1);
    assert_eq!(welcome.members[0].id, welcome.member_id);
    assert_eq!(welcome.lead_nanos, 1_500_000_000);

    // Garbage is dropped and counted; the session carries on and sync still works.
    conn.send_datagram([0xff, 0x00, 0x13]).unwrap();
    let request = ClientDatagram::SyncRequest(SyncRequest { id: 42, t0: ClientNanos(777) });
    conn.send_datagram(encode_client_datagram(&request).unwrap()).unwrap();
    let reply = next_datagram(&conn, |d| match d {
        ServerDatagram::SyncReply(r) => Some(r),
        ServerDatagram::Beats(_) => None,
    })
    .await;
    assert_eq!((reply.id, reply.t0), (42, ClientNanos(777)));
    assert!(reply.t1 <= reply.t2 && reply.t1 >= welcome.server_now);
    assert_eq!(server.stats.datagrams_malformed.get(), 1);

    // Start over HTTP: the change is announced on the stream, then beats arrive ahead.
    let (status, v) = server.http("POST", &format!("/api/rooms/{room}/start"), None).await;
    assert_eq!(status, 200, "{v}");
    let ServerMessage::Timeline(timeline) = recv(&mut rx).await else { panic!("no timeline") };
    assert_eq!(timeline.epoch, 2);
    let frame = next_datagram(&conn, |d| match d {
        ServerDatagram::Beats(f) if !f.beats.is_empty() => Some(f),
        _ => None,
    })
    .await;
    assert!(frame.beats.iter().all(|b| b.at > frame.sent_at));
    assert_eq!(frame.beats[0].index, v["effective_beat"].as_i64().unwrap());

    // Controls on the stream: a refusal names the request, an ack follows the broadcast.
    let control = |request_id, change| ClientMessage::Control(ControlRequest { request_id, change });
    send(&mut tx, &control(7, Change::SetTempo(MicroBpm::from_bpm(400)))).await;
    expect_error(recv(&mut rx).await, ErrorCode::TempoOutOfRange, Some(7));
    send(&mut tx, &control(8, Change::SetTempo(MicroBpm::from_bpm(100)))).await;
    assert!(matches!(recv(&mut rx).await, ServerMessage::Timeline(t) if t.epoch == 3));
    assert!(matches!(recv(&mut rx).await, ServerMessage::ControlAck(a) if a.request_id == 8 && a.epoch == 3));

    // A second hello is refused but the session stays.
    send(&mut tx, &hello(PROTOCOL_VERSION, TOKEN, &room)).await;
    expect_error(recv(&mut rx).await, ErrorCode::UnexpectedMessage, None);
    send(&mut tx, &control(9, Change::Stop)).await;
    assert!(matches!(recv(&mut rx).await, ServerMessage::Timeline(_)));
    assert!(matches!(recv(&mut rx).await, ServerMessage::ControlAck(a) if a.request_id == 9));

    // A malformed frame puts the stream out of step: error, then close with its code.
    tx.write_all(&[0, 0, 0, 2, 0xff, 0xff]).await.unwrap();
    expect_error(recv(&mut rx).await, ErrorCode::MalformedFrame, None);
    assert_eq!(close_code(&conn).await, u64::from(ErrorCode::MalformedFrame.as_u16()));
    assert_eq!(server.stats.frames_malformed.get(), 1);

    server.stop().await;
}

#[tokio::test]
async fn bad_hellos_get_stable_codes_and_the_server_carries_on() {
    let server = start().await;
    let room = server.create_room().await;
    let oversize = (downbeat_protocol::MAX_FRAME_LEN + 1).to_be_bytes().to_vec();
    let cases: Vec<(Vec<u8>, ErrorCode)> = vec![
        (encode_frame(&hello(PROTOCOL_VERSION + 1, TOKEN, &room)).unwrap(), ErrorCode::UnsupportedVersion),
        (encode_frame(&hello(PROTOCOL_VERSION, "wrong-token", &room)).unwrap(), ErrorCode::Unauthorized),
        (encode_frame(&hello(PROTOCOL_VERSION, TOKEN, "nosuchroom")).unwrap(), ErrorCode::RoomNotFound),
        (
            encode_frame(&ClientMessage::Control(ControlRequest { request_id: 1, change: Change::Start })).unwrap(),
            ErrorCode::HelloRequired,
        ),
        (oversize, ErrorCode::FrameTooLarge),
        (vec![0, 0, 0, 3, 9, 9, 9], ErrorCode::MalformedFrame),
        // Half a header, then silence.
        (vec![0, 0], ErrorCode::HelloTimeout),
    ];
    for (bytes, code) in &cases {
        let conn = server.connect().await;
        let (mut tx, mut rx) = open(&conn).await;
        tx.write_all(bytes).await.unwrap();
        expect_error(recv(&mut rx).await, *code, None);
        assert_eq!(close_code(&conn).await, u64::from(code.as_u16()), "{code}");
    }
    for (_, code) in &cases {
        assert_eq!(server.stats.hello_failures.get(*code), 1, "{code}");
    }

    // Everyone else is fine.
    let conn = server.connect().await;
    let (mut tx, mut rx) = open(&conn).await;
    send(&mut tx, &hello(PROTOCOL_VERSION, TOKEN, &room)).await;
    assert!(matches!(recv(&mut rx).await, ServerMessage::Welcome(_)));
    let (_, v) = server.http("GET", &format!("/api/rooms/{room}"), None).await;
    assert_eq!(v["members"], 1);
    server.stop().await;
}

#[tokio::test]
async fn shutdown_tells_sessions_and_closes_them_with_a_code() {
    let server = start().await;
    let room = server.create_room().await;
    let conn = server.connect().await;
    let (mut tx, mut rx) = open(&conn).await;
    send(&mut tx, &hello(PROTOCOL_VERSION, TOKEN, &room)).await;
    assert!(matches!(recv(&mut rx).await, ServerMessage::Welcome(_)));
    assert_eq!(server.stats.sessions_active.get(), 1);

    let stats = server.stats.clone();
    let stopping = tokio::spawn(server.stop());
    expect_error(recv(&mut rx).await, ErrorCode::ShuttingDown, None);
    assert_eq!(close_code(&conn).await, u64::from(ErrorCode::ShuttingDown.as_u16()));
    timeout(WAIT, stopping).await.unwrap().unwrap();
    assert_eq!(stats.sessions_active.get(), 0);
}

#[tokio::test]
async fn the_endpoint_is_dual_stack() {
    if std::net::UdpSocket::bind("[::1]:0").is_err() {
        eprintln!("skipped: this host has no IPv6 loopback");
        return;
    }
    let server = start().await;
    for host in ["[::1]", "127.0.0.1", "localhost"] {
        let conn = server.connect_to(&format!("https://{host}:{}/", server.port)).await;
        let (mut tx, mut rx) = open(&conn).await;
        send(&mut tx, &hello(PROTOCOL_VERSION, TOKEN, "nosuchroom")).await;
        expect_error(recv(&mut rx).await, ErrorCode::RoomNotFound, None);
    }
    server.stop().await;
}
