//! Production certificates from ACME against a real local CA: Debian's `pebble` (Let's
//! Encrypt's test server), started here with `pebble-challtestsrv` as its DNS, so the domain
//! resolves to 127.0.0.1 and pebble really validates the TLS-ALPN-01 challenge on the
//! server's HTTPS listener (`PEBBLE_VA_ALWAYS_VALID` is never set).
//!
//! It shows: the server obtains a certificate; a rustls client trusting only pebble's root
//! (fetched from pebble's management interface) connects over HTTPS, WebSocket (`wss://`,
//! `/api/ws` on the HTTPS listener) and WebTransport without certificate hashes; the
//! certificate is renewed with a WebTransport and a WebSocket session open, which keep
//! receiving beats, while new connections get the new certificate; and a renewal that fails
//! (pebble stopped) keeps the certificate in use and shows in `/metrics` and `/api/health`.
//!
//! pebble issues certificates valid for 40 s here and the server renews with 20 s left, so a
//! renewal comes about 20 s after each issuance. Every wait polls something observable
//! (health, counters, a datagram) against a deadline.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, Result, bail, ensure};
use downbeat_certs::DevIdentity;
use downbeat_tests::{RawSession, TestServer};
use futures_util::{SinkExt as _, StreamExt as _};
use serde_json::Value;
use sha2::{Digest, Sha256};
use tokio_tungstenite::tungstenite::Message;
use wtransport::config::DnsResolver;
use wtransport::tls::rustls;
use wtransport::{ClientConfig, Connection, Endpoint};

/// The name the server gets its certificate for; pebble-challtestsrv answers 127.0.0.1 for it.
const DOMAIN: &str = "music.downbeat.test";

/// Validity of pebble's certificates and the server's renewal margin: a renewal about 20 s
/// after each issuance, which leaves 20 s to see a failed renewal with the certificate still
/// valid.
const VALIDITY_SECS: u64 = 40;
const RENEW_BEFORE_SECS: u64 = 20;

/// Longest wait for anything the CA does (issuance, a renewal, a failed order).
const PATIENCE: Duration = Duration::from_secs(90);

/// A child process killed when dropped; its output goes to `log`.
struct Process {
    child: Child,
    log: PathBuf,
}

impl Process {
    fn spawn(mut command: Command, log: PathBuf) -> Result<Self> {
        let out = std::fs::File::create(&log)?;
        let child = command
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .with_context(|| format!("starting {command:?}"))?;
        Ok(Self { child, log })
    }

    /// The end of its output, for error messages.
    fn tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Fails, naming the package, if a program is not installed: the test never skips.
fn require(program: &str) -> Result<()> {
    let found = std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|dir| dir.join(program).is_file()));
    ensure!(
        found,
        "`{program}` is not installed: this test runs Let's Encrypt's test CA from Debian's `pebble` package \
         (run scripts/setup, or apt-get install pebble)"
    );
    Ok(())
}

/// A TCP port nobody listens on now (and, for DNS, a UDP port too).
fn free_port(udp_too: bool) -> Result<u16> {
    for _ in 0..50 {
        let tcp = std::net::TcpListener::bind("127.0.0.1:0")?;
        let port = tcp.local_addr()?.port();
        if !udp_too || std::net::UdpSocket::bind(("127.0.0.1", port)).is_ok() {
            return Ok(port);
        }
    }
    bail!("no free port found")
}

/// pebble and its DNS, on free loopback ports, validating on `tls_port`.
struct Ca {
    pebble: Process,
    _dns: Process,
    /// The root pebble issues under (PEM).
    root_pem: Vec<u8>,
}

/// Writes pebble's HTTPS identity for its API (a self-signed certificate for 127.0.0.1) into
/// `dir`: the certificate, which the server and this test trust, and its key.
fn write_api_identity(dir: &Path) -> Result<(PathBuf, PathBuf)> {
    let identity =
        DevIdentity::load_or_create(&dir.join("pebble-tls"), &["127.0.0.1".to_owned()], SystemTime::now())?.current;
    let (cert_pem, key_pem) = identity.to_pem();
    let (api_ca, api_key) = (dir.join("pebble-api.pem"), dir.join("pebble-api.key"));
    std::fs::write(&api_ca, cert_pem)?;
    std::fs::write(&api_key, key_pem)?;
    Ok((api_ca, api_key))
}

impl Ca {
    /// Starts pebble on `acme_port` with the API identity from [`write_api_identity`],
    /// validating TLS-ALPN-01 on `tls_port`, and waits for its directory to answer.
    async fn start(dir: &Path, (api_ca, api_key): (PathBuf, PathBuf), acme_port: u16, tls_port: u16) -> Result<Self> {
        let dns_port = free_port(true)?;
        let dns = {
            let mut command = Command::new("pebble-challtestsrv");
            command.args([
                "-dns01",
                &format!("127.0.0.1:{dns_port}"),
                "-http01",
                "",
                "-https01",
                "",
                "-tlsalpn01",
                "",
                "-management",
                &format!("127.0.0.1:{}", free_port(false)?),
                "-defaultIPv4",
                "127.0.0.1",
                "-defaultIPv6",
                "",
            ]);
            Process::spawn(command, dir.join("challtestsrv.log"))?
        };

        let management_port = free_port(false)?;
        let config = serde_json::json!({
            "pebble": {
                "listenAddress": format!("127.0.0.1:{acme_port}"),
                "managementListenAddress": format!("127.0.0.1:{management_port}"),
                "certificate": api_ca,
                "privateKey": api_key,
                "httpPort": free_port(false)?,
                "tlsPort": tls_port,
                "ocspResponderURL": "",
                "externalAccountBindingRequired": false,
                "certificateValidityPeriod": VALIDITY_SECS,
            }
        });
        let config_path = dir.join("pebble.json");
        std::fs::write(&config_path, serde_json::to_vec_pretty(&config)?)?;
        let mut command = Command::new("pebble");
        command
            .arg("-config")
            .arg(&config_path)
            .arg("-dnsserver")
            .arg(format!("127.0.0.1:{dns_port}"))
            // Validate at once, accept every nonce, and validate every order afresh.
            .env("PEBBLE_VA_NOSLEEP", "1")
            .env("PEBBLE_WFE_NONCEREJECT", "0")
            .env("PEBBLE_AUTHZREUSE", "0")
            .env_remove("PEBBLE_VA_ALWAYS_VALID");
        let pebble = Process::spawn(command, dir.join("pebble.log"))?;

        let client = api_client(&api_ca)?;
        let directory = format!("https://127.0.0.1:{acme_port}/dir");
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            match client.get(&directory).send().await {
                Ok(response) if response.status().is_success() => break,
                _ if Instant::now() < deadline => tokio::time::sleep(Duration::from_millis(100)).await,
                other => bail!("pebble's directory did not answer: {other:?}\n{}", pebble.tail()),
            }
        }
        let root = client.get(format!("https://127.0.0.1:{management_port}/roots/0")).send().await?;
        ensure!(root.status().is_success(), "pebble's management interface answered {}", root.status());
        let root_pem = root.bytes().await?.to_vec();
        Ok(Self { pebble, _dns: dns, root_pem })
    }
}

/// An HTTPS client for pebble's own API, trusting only its certificate.
fn api_client(api_ca: &Path) -> Result<reqwest::Client> {
    Ok(reqwest::Client::builder()
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(&std::fs::read(api_ca)?)?)
        .timeout(Duration::from_secs(10))
        .build()?)
}

fn sha256_hex(der: &[u8]) -> String {
    Sha256::digest(der).iter().map(|b| format!("{b:02x}")).collect()
}

/// GET `https://DOMAIN/api/ping` on a new connection, trusting only pebble's root: the SHA-256
/// of the certificate the server presented.
async fn https_certificate(https: SocketAddr, root_pem: &[u8]) -> Result<String> {
    let client = reqwest::Client::builder()
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(root_pem)?)
        .resolve(DOMAIN, https)
        .tls_info(true)
        .timeout(Duration::from_secs(10))
        .build()?;
    let response = client.get(format!("https://{DOMAIN}:{}/api/ping", https.port())).send().await?;
    ensure!(response.status().is_success(), "ping over HTTPS answered {}", response.status());
    let info = response.extensions().get::<reqwest::tls::TlsInfo>().context("TLS info")?;
    let leaf = info.peer_certificate().context("a peer certificate")?;
    Ok(sha256_hex(leaf))
}

/// Resolves [`DOMAIN`] (any name, in fact) to the server's WebTransport port on loopback.
#[derive(Debug)]
struct Loopback(u16);

impl DnsResolver for Loopback {
    fn resolve(&self, _host: &str) -> std::pin::Pin<Box<dyn wtransport::config::DnsLookupFuture>> {
        let addr = SocketAddr::from(([127, 0, 0, 1], self.0));
        Box::pin(async move { Ok(Some(addr)) })
    }
}

/// A WebTransport session to `https://DOMAIN:port/` trusting only pebble's root (no
/// certificate hashes), with its control stream, and the SHA-256 of the certificate it got.
async fn webtransport(server: &TestServer, root_pem: &[u8]) -> Result<(RawSession, String)> {
    let mut roots = rustls::RootCertStore::empty();
    use rustls::pki_types::pem::PemObject as _;
    for cert in rustls::pki_types::CertificateDer::pem_slice_iter(root_pem) {
        roots.add(cert?)?;
    }
    let tls = wtransport::tls::client::build_default_tls_config(Arc::new(roots), None);
    let config =
        ClientConfig::builder().with_bind_default().with_custom_tls(tls).dns_resolver(Loopback(server.wt_port)).build();
    let endpoint = Endpoint::client(config)?;
    let conn: Connection = endpoint.connect(format!("https://{DOMAIN}:{}/", server.wt_port)).await?;
    let leaf = conn.peer_identity().context("a peer certificate")?;
    let sha = sha256_hex(leaf.as_slice().first().context("a leaf")?.der());
    let (send, recv) = conn.open_bi().await?.await?;
    Ok((RawSession::from_parts(conn, send, recv, endpoint), sha))
}

/// A WebSocket session over `wss://DOMAIN/api/ws` on the HTTPS listener, trusting only
/// pebble's root, welcomed into `room`: the socket and the SHA-256 of the certificate it got.
async fn websocket(https: SocketAddr, root_pem: &[u8], token: &str, room: &str) -> Result<(WebSocket, String)> {
    use rustls::pki_types::pem::PemObject as _;
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls::pki_types::CertificateDer::pem_slice_iter(root_pem) {
        roots.add(cert?)?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(https).await?;
    let name = rustls::pki_types::ServerName::try_from(DOMAIN)?;
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config)).connect(name, tcp).await?;
    let leaf = tls.get_ref().1.peer_certificates().and_then(|chain| chain.first()).context("a peer certificate")?;
    let sha = sha256_hex(leaf);
    let url = format!("wss://{DOMAIN}:{}/api/ws", https.port());
    let (mut socket, _) = tokio_tungstenite::client_async(url, tls).await.context("the WebSocket upgrade")?;
    let hello = downbeat_protocol::encode_frame(&RawSession::hello(downbeat_protocol::PROTOCOL_VERSION, token, room))?;
    socket.send(Message::Binary(downbeat_protocol::ws::control_message(&hello).into())).await?;
    loop {
        let message = tokio::time::timeout(Duration::from_secs(10), socket.next())
            .await
            .context("no welcome over WebSocket within 10 s")?
            .context("the WebSocket ended")??;
        let Message::Binary(bytes) = message else { continue };
        if let downbeat_protocol::ws::Unit::Control(body) = downbeat_protocol::ws::split(&bytes)? {
            match downbeat_protocol::decode_frame_body(body)? {
                downbeat_protocol::ServerMessage::Welcome(_) => return Ok((socket, sha)),
                other => bail!("expected a welcome over WebSocket, got {other:?}"),
            }
        }
    }
}

type WebSocket = tokio_tungstenite::WebSocketStream<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>;

/// A beat (a datagram unit) on the WebSocket session within 5 s.
async fn websocket_beat(socket: &mut WebSocket) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let message = tokio::time::timeout_at(deadline.into(), socket.next())
            .await
            .context("no datagram over WebSocket within 5 s")?
            .context("the WebSocket ended")??;
        if let Message::Binary(bytes) = message
            && matches!(downbeat_protocol::ws::split(&bytes)?, downbeat_protocol::ws::Unit::Datagram(_))
        {
            return Ok(());
        }
    }
}

/// Polls `/api/health` until `done` holds for it, up to [`PATIENCE`].
async fn health_until(server: &TestServer, ca: &Ca, what: &str, done: impl Fn(&Value) -> bool) -> Result<Value> {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let (_, health) = server.http("GET", "/api/health", None, None).await?;
        if done(&health) {
            return Ok(health);
        }
        if Instant::now() >= deadline {
            bail!("{what}: not within {PATIENCE:?}; health: {health}\npebble:\n{}", ca.pebble.tail());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A beat datagram on `session` within 5 s.
async fn beat(session: &RawSession) -> Result<()> {
    tokio::time::timeout(Duration::from_secs(5), session.conn.receive_datagram())
        .await
        .context("no datagram within 5 s")?
        .context("the session ended")?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acme_issues_serves_renews_with_sessions_open_and_survives_a_failed_renewal() -> Result<()> {
    require("pebble")?;
    require("pebble-challtestsrv")?;
    // The server's ACME log goes with the test's output, shown when it fails.
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new("downbeat_server::acme=info,downbeat_server::identity=info")
    });
    let _ = tracing_subscriber::fmt().with_env_filter(filter).with_test_writer().try_init();
    let tmp = tempfile::tempdir()?;
    let api = write_api_identity(tmp.path())?;
    let acme_port = free_port(false)?;
    // The server binds first (pebble must know its HTTPS port); its orders fail until pebble
    // answers, and are retried every second or so.
    let server = TestServer::start_with(|c| {
        c.https_addr = Some("127.0.0.1:0".parse().expect("address"));
        c.acme_domain = Some(DOMAIN.to_owned());
        c.acme_email = Some("it@downbeat.test".to_owned());
        c.acme_directory = format!("https://127.0.0.1:{acme_port}/dir");
        c.acme_directory_ca = Some(api.0.clone());
        c.acme_renew_before_secs = RENEW_BEFORE_SECS;
        c.acme_retry_secs = 1;
    })
    .await?;
    let https = server.https.context("an HTTPS listener")?;
    let (status, health) = server.http("GET", "/api/health", None, None).await?;
    assert_eq!(status, 503, "{health}");
    assert_eq!(health["reasons"], serde_json::json!(["certificate_pending"]), "{health}");
    assert_eq!(health["tls"]["source"], "acme", "{health}");
    let mut ca = Ca::start(tmp.path(), api, acme_port, https.port()).await?;

    // Issue: pebble validates the TLS-ALPN-01 challenge on the HTTPS listener.
    let health = health_until(&server, &ca, "the first certificate", |h| h["tls"]["acme"]["issued"] == true).await?;
    assert_eq!(health["tls"]["acme"]["domain"], DOMAIN, "{health}");
    assert!(server.stats.acme_certificates_issued.get() >= 1);
    let saved = server.data_dir().join("acme");
    assert!(saved.is_dir(), "the certificate and account are saved under the data directory");

    // Serve: HTTPS and WebTransport, trusting pebble's root only, without hashes.
    assert!(server.hashes.is_empty(), "a CA's certificate needs no pinning");
    let first_https = https_certificate(https, &ca.root_pem).await.context("HTTPS with pebble's root")?;
    let teacher = server.teacher("t-1");
    let room = server.create_room(&teacher, 120.0, 4).await?;
    let (mut session, first_wt) =
        webtransport(&server, &ca.root_pem).await.context("WebTransport with pebble's root")?;
    session.write_message(&RawSession::hello(downbeat_protocol::PROTOCOL_VERSION, &teacher, &room)).await?;
    match session.read_message().await? {
        Some(downbeat_protocol::ServerMessage::Welcome(_)) => {}
        other => bail!("expected a welcome, got {other:?}"),
    }
    let student = server.student("s-1");
    let (mut socket, first_ws) =
        websocket(https, &ca.root_pem, &student, &room).await.context("wss with pebble's root")?;
    let (status, body) = server.http("POST", &format!("/api/rooms/{room}/start"), Some(&teacher), None).await?;
    assert_eq!(status, 200, "{body}");
    beat(&session).await.context("beats before the renewal")?;
    websocket_beat(&mut socket).await.context("beats over WebSocket before the renewal")?;

    // Renew with the session open: a new certificate for new connections, the session goes on.
    let issued = server.stats.acme_certificates_issued.get();
    let renewed = health_until(&server, &ca, "a renewal", |h| {
        h["tls"]["sha256"].as_str().is_some_and(|sha| sha != first_https && sha != first_wt && sha != first_ws)
    })
    .await?;
    assert!(server.stats.acme_certificates_issued.get() > issued);
    beat(&session).await.context("the session opened before the renewal still gets beats")?;
    websocket_beat(&mut socket).await.context("the WebSocket opened before the renewal still gets beats")?;
    let (_ws_now, ws_now) = websocket(https, &ca.root_pem, &server.student("s-2"), &room).await?;
    assert_ne!(ws_now, first_ws, "new WebSocket sessions get the new certificate");
    let https_now = https_certificate(https, &ca.root_pem).await?;
    assert_ne!(https_now, first_https, "new HTTPS connections get the new certificate: {renewed}");
    let (_second, wt_now) = webtransport(&server, &ca.root_pem).await?;
    assert_ne!(wt_now, first_wt, "new WebTransport sessions get the new certificate");

    // A failed renewal: pebble is gone. The certificate in use stays, for old and new
    // connections, and the failure shows in /metrics and /api/health.
    ca.pebble.stop();
    let kept = https_certificate(https, &ca.root_pem).await?;
    let failures = server.stats.acme_failures.get();
    let health = health_until(&server, &ca, "a failed renewal", |h| {
        h["tls"]["acme"]["failures_in_a_row"].as_u64().is_some_and(|n| n >= 1)
    })
    .await?;
    assert!(server.stats.acme_failures.get() > failures);
    assert_eq!(health["tls"]["acme"]["last_error"], "directory_unreachable", "{health}");
    assert_eq!(health["tls"]["sha256"], kept.as_str(), "the certificate in use is kept: {health}");
    assert_eq!(health["status"], "ok", "a failing renewal of a valid certificate is not an outage: {health}");
    assert_eq!(https_certificate(https, &ca.root_pem).await?, kept);
    let (_third, wt_kept) = webtransport(&server, &ca.root_pem).await?;
    assert_eq!(wt_kept, kept, "WebTransport keeps the certificate in use too");
    let (_ws_kept, ws_kept) = websocket(https, &ca.root_pem, &server.student("s-3"), &room).await?;
    assert_eq!(ws_kept, kept, "so does WebSocket");
    let metrics = reqwest::get(format!("http://{}/metrics", server.http)).await?.text().await?;
    assert!(metrics.contains("\ndownbeat_acme_failing 1\n"), "{metrics}");
    let counted = metrics
        .lines()
        .find_map(|line| line.strip_prefix("downbeat_acme_failures_total "))
        .and_then(|n| n.parse::<u64>().ok())
        .context("downbeat_acme_failures_total in /metrics")?;
    assert!(counted > failures, "{metrics}");
    beat(&session).await.context("the session still gets beats after the failed renewal")?;
    Ok(())
}
