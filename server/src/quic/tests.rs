//! The driver against quinn's client, over real loopback sockets.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use downbeat_certs::DevIdentity;
use tokio::time::timeout;
use wtransport::quinn;
use wtransport::tls::rustls;

use super::*;
use crate::config::Config;

/// Long enough for anything on loopback; a bound on a wait for a condition, never a guess.
const WITHIN: Duration = Duration::from_secs(10);

/// A served endpoint on loopback, and a quinn client endpoint trusting its certificate.
struct Pair {
    server: Endpoint,
    stats: Arc<Stats>,
    client: quinn::Endpoint,
    client_config: quinn::ClientConfig,
    _dir: tempfile::TempDir,
}

impl Pair {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let identity = DevIdentity::load_or_create(dir.path(), &["localhost".into()], SystemTime::now()).unwrap();
        let server_config = crate::identity::server_config(&identity.current, &Config::default()).unwrap();
        let socket = std::net::UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        socket.set_nonblocking(true).unwrap();
        let stats = Arc::new(Stats::default());
        let server = Endpoint::new(EndpointConfig::default(), server_config, socket, stats.clone()).unwrap();

        let mut roots = rustls::RootCertStore::empty();
        roots.add(rustls::pki_types::CertificateDer::from(identity.current.cert_der.clone())).unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        tls.alpn_protocols = vec![wtransport::tls::WEBTRANSPORT_ALPN.to_vec()];
        let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls).unwrap();
        let client_config = quinn::ClientConfig::new(Arc::new(crypto));
        let client = quinn::Endpoint::client(SocketAddr::from((Ipv4Addr::LOCALHOST, 0))).unwrap();
        Self { server, stats, client, client_config, _dir: dir }
    }

    fn connect(&self) -> quinn::Connecting {
        let address = self.server.local_addr().unwrap();
        self.client.connect_with(self.client_config.clone(), address, "localhost").unwrap()
    }

    /// A connection from the client, accepted: both ends.
    async fn connected(&self) -> (quinn::Connection, Connection) {
        let connecting = self.connect();
        let incoming = timeout(WITHIN, self.server.accept()).await.unwrap().unwrap();
        let server = incoming.accept().unwrap();
        let (client, server) = tokio::join!(connecting, server.established());
        (client.unwrap(), server.unwrap())
    }
}

#[tokio::test]
async fn datagrams_and_streams_go_both_ways_and_a_finished_stream_is_acknowledged() {
    let pair = Pair::new();
    let (client, server) = pair.connected().await;

    client.send_datagram(Bytes::from_static(b"sync")).unwrap();
    assert_eq!(timeout(WITHIN, server.read_datagram()).await.unwrap().unwrap(), &b"sync"[..]);
    server.send_datagram(Bytes::from_static(b"beat")).unwrap();
    assert_eq!(timeout(WITHIN, client.read_datagram()).await.unwrap().unwrap(), &b"beat"[..]);

    let (mut client_send, mut client_recv) = client.open_bi().await.unwrap();
    client_send.write_all(b"hello").await.unwrap();
    client_send.finish().unwrap();
    let (mut send, mut recv) = timeout(WITHIN, server.accept_bi()).await.unwrap().unwrap();
    let mut hello = [0; 5];
    recv.read_exact(&mut hello).await.unwrap();
    assert_eq!(&hello, b"hello");
    assert!(recv.read_chunk(usize::MAX).await.unwrap().is_none(), "the stream ends where the peer finished it");

    send.write_all(b"welcome").await.unwrap();
    send.finish().unwrap();
    let read = tokio::spawn(async move { client_recv.read_to_end(64).await.unwrap() });
    // Resolves once the client acknowledged every byte, not when they were written.
    assert_eq!(timeout(WITHIN, send.stopped()).await.unwrap().unwrap(), None);
    assert_eq!(read.await.unwrap(), b"welcome");

    let mut uni = server.open_uni().await.unwrap();
    uni.write_all(b"settings").await.unwrap();
    drop(uni);
    let mut client_uni = timeout(WITHIN, client.accept_uni()).await.unwrap().unwrap();
    assert_eq!(client_uni.read_to_end(64).await.unwrap(), b"settings", "a dropped stream is finished, not reset");
    assert!(server.stats().path.sent_packets > 0);
}

#[tokio::test]
async fn a_connection_whose_last_handle_is_dropped_is_closed_and_drains() {
    let pair = Pair::new();
    let (client, server) = pair.connected().await;
    let (_client_send, _client_recv) = client.open_bi().await.unwrap();
    let other = server.clone();
    drop(server);
    // A stream the server never took, and a clone: the connection lives while a handle does.
    client.send_datagram(Bytes::from_static(b"still there")).unwrap();
    assert_eq!(timeout(WITHIN, other.read_datagram()).await.unwrap().unwrap(), &b"still there"[..]);
    drop(other);
    match timeout(WITHIN, client.closed()).await.unwrap() {
        quinn::ConnectionError::ApplicationClosed(close) => assert_eq!(close.error_code, VarInt::from_u32(0)),
        other => panic!("closed by {other:?}"),
    }
    pair.server.close(VarInt::from_u32(0), b"");
    timeout(WITHIN, pair.server.wait_idle()).await.expect("the endpoint forgets a drained connection");
}

#[tokio::test]
async fn closing_the_endpoint_closes_its_connections_with_the_code_and_ends_accept() {
    let pair = Pair::new();
    let (client, server) = pair.connected().await;
    pair.server.close(VarInt::from_u32(7), b"shutting down");
    match timeout(WITHIN, client.closed()).await.unwrap() {
        quinn::ConnectionError::ApplicationClosed(close) => {
            assert_eq!(close.error_code, VarInt::from_u32(7));
            assert_eq!(&close.reason[..], b"shutting down");
        }
        other => panic!("closed by {other:?}"),
    }
    assert!(matches!(server.closed().await, ConnectionError::LocallyClosed));
    assert!(server.send_datagram(Bytes::from_static(b"late")).is_err());
    assert!(timeout(WITHIN, pair.server.accept()).await.unwrap().is_none());
    timeout(WITHIN, pair.server.wait_idle()).await.expect("every connection drains");
    // A new connection is refused, not left to time out.
    let refused = timeout(WITHIN, pair.connect()).await.unwrap();
    assert!(refused.is_err());
}

#[tokio::test]
async fn a_refused_connection_is_told_and_a_retried_one_comes_back_validated() {
    let pair = Pair::new();
    let connecting = pair.connect();
    let incoming = timeout(WITHIN, pair.server.accept()).await.unwrap().unwrap();
    assert!(!incoming.remote_address_validated());
    incoming.refuse();
    match timeout(WITHIN, connecting).await.unwrap() {
        Err(quinn::ConnectionError::ConnectionClosed(close)) => {
            assert_eq!(close.error_code, quinn_proto::TransportErrorCode::CONNECTION_REFUSED);
        }
        other => panic!("{other:?}"),
    }

    let connecting = pair.connect();
    let incoming = timeout(WITHIN, pair.server.accept()).await.unwrap().unwrap();
    incoming.retry();
    // The client answers the Retry by itself, with the token proving its address.
    let incoming = timeout(WITHIN, pair.server.accept()).await.unwrap().unwrap();
    assert!(incoming.remote_address_validated());
    let server = incoming.accept().unwrap();
    let (client, server) = tokio::join!(connecting, server.established());
    let (client, _server) = (client.unwrap(), server.unwrap());
    assert!(client.close_reason().is_none());
}

/// A request and its reply, as a clock-sync exchange goes: the reply is sent by the session
/// and leaves the driver nothing to do, so it does not wake it. A close leaves a timeout the
/// driver does get to: the connection drains.
#[tokio::test]
async fn a_reply_to_a_datagram_leaves_the_driver_nothing_and_a_closed_connection_still_drains() {
    let pair = Pair::new();
    let (client, server) = pair.connected().await;
    let marks = || pair.server.shared.marks.load(std::sync::atomic::Ordering::Relaxed);
    let exchange = async |i: u32| {
        client.send_datagram(Bytes::from(i.to_be_bytes().to_vec())).unwrap();
        let request = timeout(WITHIN, server.read_datagram()).await.unwrap().unwrap();
        let before = marks();
        server.send_datagram(request).unwrap();
        let after = marks();
        assert_eq!(timeout(WITHIN, client.read_datagram()).await.unwrap().unwrap(), &i.to_be_bytes()[..]);
        after - before
    };
    // The first exchanges may still carry the handshake's tail (its acknowledgements, new
    // connection ids), which the driver has to see.
    for i in 0..10 {
        exchange(i).await;
    }
    let mut marked = 0;
    for i in 10..30 {
        marked += exchange(i).await;
    }
    assert_eq!(marked, 0, "replies marked the connection {marked} times in 20 exchanges");

    server.close(VarInt::from_u32(7), b"done");
    let closed = timeout(WITHIN, client.closed()).await.unwrap();
    assert!(
        matches!(closed, quinn::ConnectionError::ApplicationClosed(ref c) if c.error_code == quinn::VarInt::from_u32(7)),
        "{closed:?}"
    );
    // Drained while the session still holds its handle: the driver ran the closing timer.
    timeout(WITHIN, pair.server.wait_idle()).await.unwrap();
}

/// Replies to datagrams beginning `sync`, takes those beginning `drop`, passes the rest on;
/// counts what the driver did with its replies.
#[derive(Default)]
struct Echo {
    sent: std::sync::atomic::AtomicUsize,
}

impl Answerer for Echo {
    fn answer(&self, datagram: &Bytes, _: Option<std::time::Instant>) -> Answer {
        if datagram.starts_with(b"sync") {
            Answer::Reply(Bytes::from([b"reply:", &datagram[..]].concat()))
        } else if datagram.starts_with(b"drop") {
            Answer::Taken
        } else {
            Answer::Pass
        }
    }

    fn replied(&self, sent: bool) {
        assert!(sent);
        self.sent.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
}

#[tokio::test]
async fn an_answerer_replies_in_the_driver_and_the_session_reads_only_what_it_passed_on_in_order() {
    let pair = Pair::new();
    let (client, server) = pair.connected().await;
    let echo = Arc::new(Echo::default());
    let answering = server.answer_datagrams(echo.clone());
    for datagram in ["a", "sync1", "drop", "b", "sync2", "c"] {
        client.send_datagram(Bytes::from(datagram)).unwrap();
    }
    // Answered while the session reads nothing.
    assert_eq!(timeout(WITHIN, client.read_datagram()).await.unwrap().unwrap(), &b"reply:sync1"[..]);
    assert_eq!(timeout(WITHIN, client.read_datagram()).await.unwrap().unwrap(), &b"reply:sync2"[..]);
    assert_eq!(echo.sent.load(std::sync::atomic::Ordering::Relaxed), 2);
    for expected in ["a", "b", "c"] {
        assert_eq!(timeout(WITHIN, server.read_datagram()).await.unwrap().unwrap(), expected.as_bytes());
    }

    // Without the answerer the session gets everything again.
    drop(answering);
    client.send_datagram(Bytes::from("sync3")).unwrap();
    assert_eq!(timeout(WITHIN, server.read_datagram()).await.unwrap().unwrap(), &b"sync3"[..]);
    assert_eq!(echo.sent.load(std::sync::atomic::Ordering::Relaxed), 2);
}

#[tokio::test]
async fn what_an_answerer_passes_on_is_bounded_and_the_oldest_go_first() {
    let pair = Pair::new();
    let (client, server) = pair.connected().await;
    let _answering = server.answer_datagrams(Arc::new(Echo::default()));
    let sent = 100;
    for i in 0..sent {
        let mut datagram = format!("{i:03}").into_bytes();
        datagram.resize(1000, b'.');
        client.send_datagram(Bytes::from(datagram)).unwrap();
    }
    // Answered after the driver took every datagram before it.
    client.send_datagram(Bytes::from("sync-last")).unwrap();
    assert_eq!(timeout(WITHIN, client.read_datagram()).await.unwrap().unwrap(), &b"reply:sync-last"[..]);
    let mut read = Vec::new();
    while read.last() != Some(&(sent - 1)) {
        let datagram = timeout(WITHIN, server.read_datagram()).await.unwrap().unwrap();
        read.push(std::str::from_utf8(&datagram[..3]).unwrap().parse::<usize>().unwrap());
    }
    let kept = conn::PASSED_BYTES / 1000;
    assert!(read.len() <= kept, "kept {} datagrams of 1000 bytes, more than {kept}", read.len());
    assert!(read.windows(2).all(|w| w[0] < w[1]), "out of order: {read:?}");
    assert!(read[0] >= sent - kept, "the oldest were kept: {read:?}");
}

#[tokio::test]
async fn the_driver_reports_how_long_datagrams_waited_in_the_socket() {
    let pair = Pair::new();
    let began = std::time::Instant::now();
    let (client, server) = pair.connected().await;
    // The kernel turns receive stamps on for the host a moment after the socket first asks,
    // so the first datagrams may read as unstamped: exchange them until one is stamped.
    let deadline = tokio::time::Instant::now() + WITHIN;
    let mut sent = 0u32;
    while pair.stats.quic_receive_wait.count() == 0 {
        assert!(tokio::time::Instant::now() < deadline, "no stamped datagram in {sent} sent");
        client.send_datagram(Bytes::from(sent.to_be_bytes().to_vec())).unwrap();
        timeout(WITHIN, server.read_datagram()).await.unwrap().unwrap();
        sent += 1;
    }
    let rendered = pair.stats.render_prometheus();
    let series = |name: &str| -> f64 {
        let prefix = format!("downbeat_quic_receive_wait_seconds_{name} ");
        let value = rendered.lines().find_map(|line| line.strip_prefix(prefix.as_str()));
        value.unwrap_or_else(|| panic!("the histogram's {name} is rendered")).parse().unwrap()
    };
    let count = series("count");
    assert!(count >= 1.0, "{count}");
    // Every wait it recorded was of a datagram sent since the connection began.
    let sum = series("sum");
    assert!(sum <= count * began.elapsed().as_secs_f64(), "{sum} s over {count} batches");
}

#[tokio::test]
async fn packets_of_several_connections_read_together_reach_each_connection_in_order() {
    let pair = Pair::new();
    let mut conns = Vec::new();
    for _ in 0..3 {
        conns.push(pair.connected().await);
    }
    // Sent in turns from one client socket, so the driver's reads hold packets of all three,
    // interleaved, which it routes first and hands to each connection after.
    let sent = 20u8;
    for i in 0..sent {
        for (c, (client, _)) in conns.iter().enumerate() {
            client.send_datagram(Bytes::from(vec![c as u8, i])).unwrap();
        }
    }
    for (c, (_, server)) in conns.iter().enumerate() {
        for i in 0..sent {
            let datagram = timeout(WITHIN, server.read_datagram()).await.unwrap().unwrap();
            assert_eq!(&datagram[..], &[c as u8, i][..], "connection {c}'s datagram {i}");
        }
    }
}
