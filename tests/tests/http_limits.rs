//! What no HTTP client can do to the others, over real sockets: hold a connection by sending
//! half a header, a kept-alive connection left idle or a body that never comes; open more
//! connections than its share, from one address or from all; stall the HTTPS listener's
//! handshakes; or flood the routes that need no token.
//!
//! Other client addresses are other loopback addresses (`127.0.0.2`, ...), which Linux routes
//! to the server on `127.0.0.1`. Nothing here sleeps to synchronise: the tests wait for the
//! server to answer or close, each wait bounded by a timeout.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use downbeat_server::auth::Role;
use downbeat_tests::TestServer;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpSocket, TcpStream};
use tokio::time::timeout;

/// Upper bound on any single wait in these tests.
const WAIT: Duration = Duration::from_secs(10);
/// The header timeout the servers here run with.
const HEADER_TIMEOUT: Duration = Duration::from_millis(500);

/// A TCP connection to `to` from the loopback address `127.0.0.<host>`.
async fn connect_from(host: u8, to: SocketAddr) -> Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    socket.bind(SocketAddr::from(([127, 0, 0, host], 0)))?;
    Ok(socket.connect(to).await?)
}

/// Reads until the server closes `stream` (or resets it); returns what it sent.
async fn until_closed(stream: &mut TcpStream) -> Result<String> {
    let mut answer = Vec::new();
    let read = timeout(WAIT, stream.read_to_end(&mut answer)).await.context("the server did not close")?;
    if let Err(e) = read {
        ensure!(e.kind() == std::io::ErrorKind::ConnectionReset, "reading failed: {e}");
    }
    Ok(String::from_utf8_lossy(&answer).into_owned())
}

/// Whether `stream` is still open with nothing to read (the server neither answered nor
/// closed it).
fn still_open(stream: &TcpStream) -> bool {
    let mut byte = [0u8; 1];
    matches!(stream.try_read(&mut byte), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
}

/// `GET /api/ping` from `127.0.0.<host>` on a fresh connection: the whole answer.
async fn ping_from(host: u8, to: SocketAddr) -> Result<String> {
    let mut stream = connect_from(host, to).await?;
    stream.write_all(b"GET /api/ping HTTP/1.1\r\nHost: downbeat\r\nConnection: close\r\n\r\n").await?;
    until_closed(&mut stream).await
}

async fn short_timeouts() -> Result<TestServer> {
    TestServer::start_with(|c| {
        c.http_header_timeout_ms = HEADER_TIMEOUT.as_millis() as u64;
        c.http_request_timeout_ms = 500;
    })
    .await
}

#[tokio::test]
async fn a_client_sending_half_a_header_is_cut_after_the_header_timeout_while_others_are_served() -> Result<()> {
    let server = short_timeouts().await?;
    let started = Instant::now();
    let mut stalled = connect_from(1, server.http).await?;
    stalled.write_all(b"GET /api/ping HTTP/1.1\r\nHost: down").await?;

    let answer = ping_from(1, server.http).await?;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(still_open(&stalled), "the stalled client was cut before its time");

    let answer = until_closed(&mut stalled).await?;
    let waited = started.elapsed();
    assert!(answer.is_empty() || answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(waited >= HEADER_TIMEOUT, "cut after {waited:?}");
    println!("a half-sent header was cut after {waited:?}");
    Ok(())
}

#[tokio::test]
async fn a_kept_alive_connection_left_idle_is_closed_after_the_header_timeout() -> Result<()> {
    let server = short_timeouts().await?;
    let mut idle = connect_from(1, server.http).await?;
    idle.write_all(b"GET /api/ping HTTP/1.1\r\nHost: downbeat\r\n\r\n").await?;
    let started = Instant::now();
    let answer = until_closed(&mut idle).await?;
    assert!(answer.starts_with("HTTP/1.1 200") && answer.ends_with("{\"status\":\"ok\"}"), "{answer}");
    assert!(started.elapsed() >= HEADER_TIMEOUT, "closed after {:?}", started.elapsed());
    Ok(())
}

#[tokio::test]
async fn a_body_that_never_comes_is_answered_server_busy_after_the_request_timeout() -> Result<()> {
    let server = short_timeouts().await?;
    let mut slow = connect_from(1, server.http).await?;
    let head = "POST /api/demo/tokens HTTP/1.1\r\nHost: downbeat\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n";
    slow.write_all(format!("{head}{{\"role\":").as_bytes()).await?;
    let answer = until_closed(&mut slow).await?;
    assert!(answer.starts_with("HTTP/1.1 503") && answer.contains("\"server_busy\""), "{answer}");
    Ok(())
}

#[tokio::test]
async fn connections_are_capped_per_address_and_in_all() -> Result<()> {
    let server = TestServer::start_with(|c| {
        c.http_max_connections = 5;
        c.http_max_connections_per_address = 3;
    })
    .await?;
    // Three silent connections from one address are held; the fourth is closed at once.
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(connect_from(1, server.http).await?);
    }
    let mut fourth = connect_from(1, server.http).await?;
    assert_eq!(until_closed(&mut fourth).await?, "", "the fourth connection was served");
    assert!(held.iter().all(still_open), "a held connection was closed");

    // Another address is served, and holds the last two connections of the five.
    let answer = ping_from(2, server.http).await?;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    for _ in 0..2 {
        held.push(connect_from(2, server.http).await?);
    }
    let mut sixth = connect_from(3, server.http).await?;
    assert_eq!(until_closed(&mut sixth).await?, "", "the sixth connection was served");

    // A closed connection gives its place back (once the server has seen it close).
    drop(held.remove(0));
    let mut served = false;
    for _ in 0..1000 {
        if ping_from(3, server.http).await?.starts_with("HTTP/1.1 200") {
            served = true;
            break;
        }
    }
    assert!(served, "the freed place was never given back");
    Ok(())
}

#[tokio::test]
async fn a_silent_https_client_is_cut_after_the_handshake_timeout_while_others_are_served() -> Result<()> {
    let server = TestServer::start_with(|c| {
        c.http_header_timeout_ms = HEADER_TIMEOUT.as_millis() as u64;
        c.https_addr = Some("127.0.0.1:0".parse().expect("an address"));
    })
    .await?;
    let https = server.https.context("an HTTPS address")?;
    let started = Instant::now();
    let mut silent = connect_from(1, https).await?;
    let client = reqwest::Client::builder().use_rustls_tls().danger_accept_invalid_certs(true).build()?;
    let response = client.get(format!("https://127.0.0.1:{}/api/ping", https.port())).send().await?;
    assert_eq!(response.status().as_u16(), 200);
    assert!(still_open(&silent), "the silent client was cut before its time");
    assert_eq!(until_closed(&mut silent).await?, "");
    assert!(started.elapsed() >= HEADER_TIMEOUT, "cut after {:?}", started.elapsed());
    Ok(())
}

#[tokio::test]
async fn requests_without_a_token_are_limited_per_address() -> Result<()> {
    let server = TestServer::start().await?;
    let from = |host: u8| reqwest::Client::builder().local_address(std::net::IpAddr::from([127, 0, 0, host])).build();
    let (flooder, other) = (from(1)?, from(2)?);
    let ping = format!("http://{}/api/ping", server.http);
    // A burst of 1000, then 100 a second: the flood is refused soon after its first 1000.
    let mut first_refused = None;
    for i in 0..5000 {
        let response = flooder.get(&ping).send().await?;
        if response.status().as_u16() == 429 {
            let body: serde_json::Value = response.json().await?;
            assert_eq!(body["error"]["code"], "rate_limited", "{body}");
            first_refused = Some(i);
            break;
        }
    }
    let first_refused = first_refused.context("the flood was never refused")?;
    assert!(first_refused >= 1000, "refused after {first_refused}");
    println!("the flood was refused at request {first_refused}");

    // Another address, and a request with a good token from the same one, are still served.
    assert_eq!(other.get(&ping).send().await?.status().as_u16(), 200);
    let rooms = format!("http://{}/api/rooms", server.http);
    let teacher = server.token(Role::Teacher, "t-1", "Teacher");
    assert_eq!(flooder.get(&rooms).bearer_auth(&teacher).send().await?.status().as_u16(), 200);
    // A token that does not verify pays per address like no token: the flooder's bucket,
    // refilling meanwhile, soon refuses those too.
    let mut refused = false;
    for _ in 0..1000 {
        let status = flooder.get(&rooms).bearer_auth("not-a-token").send().await?.status().as_u16();
        assert!(status == 401 || status == 429, "{status}");
        if status == 429 {
            refused = true;
            break;
        }
    }
    assert!(refused, "bad tokens were never limited");
    Ok(())
}
