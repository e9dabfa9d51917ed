//! Helpers for Downbeat's end-to-end tests: a real server on loopback ports chosen by the OS,
//! tokens of its demo tenant, an HTTP helper, raw WebTransport sessions for feeding the server
//! bad input, and a UDP [`relay::Relay`] that can be cut to lose a connection.
//!
//! The tests themselves live in `tests/`; every one binds port 0, so they run in parallel.

pub mod db;
pub mod nats;
pub mod process;
pub mod relay;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use downbeat_client::{Client, ConnectOptions};
use downbeat_server::auth::{Role, Tenants};
use downbeat_server::{Config, Server, ServerClock, Stats};
use serde_json::{Value, json};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use wtransport::{ClientConfig, Connection, Endpoint, RecvStream, SendStream};

/// What carries the native clients' sessions in a test (WebTransport to the server's UDP
/// port, or WebSocket to `/api/ws` on its HTTP listener).
pub use downbeat_protocol::Transport;

/// Runs each named test, an `async fn(Transport) -> anyhow::Result<()>` of the calling file,
/// over both transports: as `webtransport::NAME` and `websocket::NAME`.
#[macro_export]
macro_rules! over_both_transports {
    ($($name:ident),* $(,)?) => {
        mod webtransport {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() -> anyhow::Result<()> {
                    super::$name($crate::Transport::WebTransport).await
                }
            )*
        }
        mod websocket {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() -> anyhow::Result<()> {
                    super::$name($crate::Transport::WebSocket).await
                }
            )*
        }
    };
}

/// A command that runs the server binary at `bin` (a test's `env!("CARGO_BIN_EXE_downbeat")`)
/// with no `DOWNBEAT_*` setting this process's environment might carry, stdin closed, stdout
/// and stderr piped, killed when dropped.
pub fn server_command(bin: &str) -> tokio::process::Command {
    let mut command = tokio::process::Command::new(bin);
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("DOWNBEAT_") {
            command.env_remove(key);
        }
    }
    command
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true);
    command
}

/// A server running on loopback for one test. Stops when dropped.
#[derive(Debug)]
pub struct TestServer {
    /// HTTP address.
    pub http: SocketAddr,
    /// HTTPS address, when the configuration asked for an HTTPS listener.
    pub https: Option<SocketAddr>,
    /// The address serving `/metrics` alone, when the configuration gave it one.
    pub metrics: Option<SocketAddr>,
    /// WebTransport port.
    pub wt_port: u16,
    /// Certificate hashes to pin.
    pub hashes: Vec<[u8; 32]>,
    /// The tenants (the demo tenant unless configured), to mint tokens.
    pub tenants: Arc<Tenants>,
    /// The demo teacher secret `/api/demo/tokens` asks of teachers (`None` with schools).
    pub demo_teacher_secret: Option<String>,
    /// The server's clock (to compare clients against the truth).
    pub clock: ServerClock,
    /// Its counters.
    pub stats: std::sync::Arc<Stats>,
    /// What [`Self::options`] connects over (WebTransport unless changed).
    pub transport: Transport,
    http_client: reqwest::Client,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
    _data: tempfile::TempDir,
}

impl TestServer {
    /// Starts a server with default settings on ports chosen by the OS.
    pub async fn start() -> Result<Self> {
        Self::start_with(|_| {}).await
    }

    /// Starts a server, letting the caller adjust the configuration.
    pub async fn start_with(adjust: impl FnOnce(&mut Config)) -> Result<Self> {
        let data = tempfile::tempdir()?;
        let mut config = Config {
            http_addr: Some("127.0.0.1:0".parse()?),
            wt_port: 0,
            data_dir: data.path().to_path_buf(),
            ..Config::default()
        };
        adjust(&mut config);
        let server = Server::bind(config).await.context("binding the server")?;
        let (stop, stopped) = oneshot::channel::<()>();
        let mut me = Self {
            http: server.http_addr(),
            https: server.https_addr(),
            metrics: server.metrics_addr(),
            wt_port: server.webtransport_port(),
            hashes: server.cert_hashes(),
            tenants: server.tenants(),
            demo_teacher_secret: server.demo_teacher_secret().map(str::to_owned),
            clock: server.clock(),
            stats: server.stats(),
            transport: Transport::WebTransport,
            http_client: reqwest::Client::new(),
            stop: Some(stop),
            task: None,
            _data: data,
        };
        let task = tokio::spawn(async move {
            let _ = server
                .run(async {
                    let _ = stopped.await;
                })
                .await;
        });
        me.task = Some(task);
        Ok(me)
    }

    /// Starts a server whose SEL store is `db`, letting the caller adjust the rest.
    pub async fn start_on(db: &db::TestDatabase, adjust: impl FnOnce(&mut Config)) -> Result<Self> {
        let url = db.url().to_owned();
        Self::start_with(|c| {
            c.database_url = Some(url);
            adjust(c);
        })
        .await
    }

    /// The server's data directory (a temporary one, removed with the server).
    pub fn data_dir(&self) -> &std::path::Path {
        self._data.path()
    }

    /// `https://host:port/` of the WebTransport endpoint.
    pub fn url(&self, host: &str) -> String {
        format!("https://{host}:{}/", self.wt_port)
    }

    /// The same server, with native clients connecting over `transport`.
    pub fn over(mut self, transport: Transport) -> Self {
        self.transport = transport;
        self
    }

    /// The URL native clients open sessions at, over [`Self::transport`], at `host`.
    pub fn session_url(&self, host: &str) -> String {
        match self.transport {
            Transport::WebTransport => self.url(host),
            Transport::WebSocket => format!("ws://{host}:{}/api/ws", self.http.port()),
        }
    }

    /// A demo-tenant token for `sub` with `role`, valid for an hour.
    pub fn token(&self, role: Role, sub: &str, name: &str) -> String {
        self.tenants.mint("demo", role, sub, name, Duration::from_secs(3600)).expect("the demo tenant mints")
    }

    /// A teacher's token (subject `sub`, named after it).
    pub fn teacher(&self, sub: &str) -> String {
        self.token(Role::Teacher, sub, &format!("Teacher {sub}"))
    }

    /// A student's token (subject `sub`, named after it).
    pub fn student(&self, sub: &str) -> String {
        self.token(Role::Student, sub, &format!("Student {sub}"))
    }

    /// An operator's token (the server's operators' realm: the demo's, or one configured with
    /// [`operators`]), subject `sub`.
    pub fn operator(&self, sub: &str) -> String {
        let realm = downbeat_server::auth::OPERATOR_REALM;
        self.tenants
            .mint(realm, Role::Operator, sub, &format!("Operator {sub}"), Duration::from_secs(3600))
            .expect("the operators' realm mints")
    }

    /// An admin's token (the school's data steward; subject `sub`, named after it).
    pub fn admin(&self, sub: &str) -> String {
        self.token(Role::Admin, sub, &format!("Admin {sub}"))
    }

    /// Connect options to join room `code` with `token` over [`Self::transport`] and the pinned
    /// hashes; no reports.
    pub fn options(&self, code: &str, token: &str) -> ConnectOptions {
        let mut o = ConnectOptions::new(self.session_url("127.0.0.1"), token, code);
        o.cert_hashes = self.hashes.clone();
        o.report_interval = None;
        o
    }

    /// Joins room `code` with `token`, on the machine clock.
    pub async fn connect(&self, code: &str, token: &str) -> Result<Client> {
        Ok(Client::connect(self.options(code, token)).await?)
    }

    /// An HTTP request with `token` (if any); returns status and JSON body.
    pub async fn http(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
    ) -> Result<(u16, Value)> {
        let url = format!("http://{}{}", self.http, path);
        let method = reqwest::Method::from_bytes(method.as_bytes())?;
        let mut req = self.http_client.request(method, url);
        if let Some(token) = token {
            req = req.bearer_auth(token);
        }
        if let Some(body) = body {
            req = req.json(&body);
        }
        let resp = req.send().await?;
        let status = resp.status().as_u16();
        let text = resp.text().await?;
        let value = if text.is_empty() { Value::Null } else { serde_json::from_str(&text).context(text)? };
        Ok((status, value))
    }

    /// `method path` as `token` with `body`; must answer `expect`: the status and, for an
    /// error, its stable code (`None` for a success).
    pub async fn call(
        &self,
        method: &str,
        path: &str,
        token: &str,
        body: Option<Value>,
        expect: (u16, Option<&str>),
    ) -> Result<Value> {
        let (status, answer) = self.http(method, path, Some(token), body).await?;
        let code = answer["error"]["code"].as_str();
        anyhow::ensure!((status, code) == expect, "{method} {path} answered {status} {answer}, not {expect:?}");
        Ok(answer)
    }

    /// `GET path` with `token`: the status, the `Content-Type` and the body's bytes.
    pub async fn http_bytes(&self, path: &str, token: &str) -> Result<(u16, String, Vec<u8>)> {
        let resp = self.http_client.get(format!("http://{}{}", self.http, path)).bearer_auth(token).send().await?;
        let status = resp.status().as_u16();
        let content_type = resp
            .headers()
            .get(reqwest::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        Ok((status, content_type, resp.bytes().await?.to_vec()))
    }

    /// Creates a room over HTTP as `teacher` and returns its join code.
    pub async fn create_room(&self, teacher: &str, tempo_bpm: f64, beats_per_bar: u8) -> Result<String> {
        let body = json!({"name": "Test room", "tempo_bpm": tempo_bpm, "beats_per_bar": beats_per_bar});
        let (status, body) = self.http("POST", "/api/rooms", Some(teacher), Some(body)).await?;
        if status != 201 {
            bail!("room creation answered {status}: {body}");
        }
        Ok(body["code"].as_str().context("code")?.to_owned())
    }

    /// Opens a raw session and its control stream, sending nothing.
    pub async fn raw_session(&self) -> Result<RawSession> {
        self.raw_session_from(None).await
    }

    /// Opens a raw session from local address `from` (any, if `None`), sending nothing.
    pub async fn raw_session_from(&self, from: Option<std::net::IpAddr>) -> Result<RawSession> {
        self.raw_session_with(from, None).await
    }

    /// Opens a raw session that lets the server send at most `window` bytes on a stream
    /// before it reads them (QUIC flow control, as a greedy or broken peer may advertise),
    /// sending nothing.
    pub async fn raw_session_with_window(&self, window: u32) -> Result<RawSession> {
        self.raw_session_with(None, Some(window)).await
    }

    async fn raw_session_with(&self, from: Option<std::net::IpAddr>, window: Option<u32>) -> Result<RawSession> {
        let bind = ClientConfig::builder();
        let bind = match from {
            Some(ip) => bind.with_bind_address(SocketAddr::new(ip, 0)),
            None => bind.with_bind_default(),
        };
        let mut config = bind.with_server_certificate_hashes(self.hashes.iter().map(|h| (*h).into())).build();
        if let Some(window) = window {
            use wtransport::quinn::{TransportConfig, VarInt};
            let mut transport = TransportConfig::default();
            transport.stream_receive_window(VarInt::from_u32(window));
            config.quic_config_mut().transport_config(std::sync::Arc::new(transport));
        }
        let endpoint = Endpoint::client(config)?;
        let conn = endpoint.connect(self.url("127.0.0.1")).await?;
        let (send, recv) = conn.open_bi().await?.await?;
        Ok(RawSession { conn, send, recv, _endpoint: endpoint })
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// A WebTransport session driven byte by byte.
pub struct RawSession {
    /// The session.
    pub conn: Connection,
    /// Control stream, our side.
    pub send: SendStream,
    /// Control stream, the server's side.
    pub recv: RecvStream,
    _endpoint: Endpoint<wtransport::endpoint::endpoint_side::Client>,
}

impl std::fmt::Debug for RawSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RawSession").finish_non_exhaustive()
    }
}

impl RawSession {
    /// A session opened some other way (its own TLS settings), with its control stream and
    /// the endpoint it came from.
    pub fn from_parts(
        conn: Connection,
        send: SendStream,
        recv: RecvStream,
        endpoint: Endpoint<wtransport::endpoint::endpoint_side::Client>,
    ) -> Self {
        Self { conn, send, recv, _endpoint: endpoint }
    }

    /// Writes raw bytes to the control stream.
    pub async fn write(&mut self, bytes: &[u8]) -> Result<()> {
        self.send.write_all(bytes).await?;
        Ok(())
    }

    /// Writes one encoded frame.
    pub async fn write_message(&mut self, message: &downbeat_protocol::ClientMessage) -> Result<()> {
        let bytes = downbeat_protocol::encode_frame(message)?;
        self.write(&bytes).await
    }

    /// Reads the next frame from the server, or `None` if the stream ended.
    pub async fn read_message(&mut self) -> Result<Option<downbeat_protocol::ServerMessage>> {
        match downbeat_client::read_message(&mut self.recv).await {
            Ok(message) => Ok(Some(message)),
            Err(downbeat_client::ClientError::Closed) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// Reads until an error frame arrives and returns its code.
    pub async fn expect_error(&mut self) -> Result<downbeat_protocol::ErrorCode> {
        let read = async {
            loop {
                match self.read_message().await? {
                    Some(downbeat_protocol::ServerMessage::Error(e)) => return Ok(e.code),
                    Some(_) => continue,
                    None => bail!("stream ended without an error frame"),
                }
            }
        };
        tokio::time::timeout(Duration::from_secs(10), read).await.context("waiting for an error frame")?
    }

    /// A hello joining room `code`.
    pub fn hello(version: u16, token: &str, code: &str) -> downbeat_protocol::ClientMessage {
        use downbeat_protocol::BoundedString;
        downbeat_protocol::ClientMessage::Hello(downbeat_protocol::Hello {
            version,
            token: BoundedString::truncating(token),
            room: downbeat_protocol::RoomRequest::Join(BoundedString::truncating(code)),
        })
    }
}

/// A WebSocket session to `/api/ws` driven message by message.
#[derive(Debug)]
pub struct RawWebSocket {
    /// The socket.
    pub socket: tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>,
    /// The code of the server's close frame, once [`Self::read_control`] has read it.
    pub close_code: Option<u16>,
}

impl TestServer {
    /// Opens a raw WebSocket session on the HTTP listener, sending nothing; `recv_buffer` sets
    /// the socket's receive buffer (small: a peer that reads slowly fills up fast).
    pub async fn raw_websocket(&self, recv_buffer: Option<u32>) -> Result<RawWebSocket> {
        self.raw_websocket_from(recv_buffer, None).await
    }

    /// [`Self::raw_websocket`] from local IPv4 address `from` (any, if `None`).
    pub async fn raw_websocket_from(
        &self,
        recv_buffer: Option<u32>,
        from: Option<std::net::IpAddr>,
    ) -> Result<RawWebSocket> {
        let socket = tokio::net::TcpSocket::new_v4()?;
        if let Some(size) = recv_buffer {
            socket.set_recv_buffer_size(size)?;
        }
        if let Some(ip) = from {
            socket.bind(SocketAddr::new(ip, 0))?;
        }
        let tcp = socket.connect(self.http).await?;
        let url = format!("ws://{}/api/ws", self.http);
        let (socket, _) = tokio_tungstenite::client_async(url, tcp).await?;
        Ok(RawWebSocket { socket, close_code: None })
    }
}

impl RawWebSocket {
    /// Sends one message as it is.
    pub async fn send(&mut self, message: tokio_tungstenite::tungstenite::Message) -> Result<()> {
        use futures_util::SinkExt as _;
        self.socket.send(message).await?;
        Ok(())
    }

    /// Sends one control frame, tagged as the protocol says.
    pub async fn send_message(&mut self, message: &downbeat_protocol::ClientMessage) -> Result<()> {
        let frame = downbeat_protocol::encode_frame(message)?;
        self.send(tokio_tungstenite::tungstenite::Message::Binary(
            downbeat_protocol::ws::control_message(&frame).into(),
        ))
        .await
    }

    /// The next control message from the server; `Err` with the close code (or 0) once the
    /// server closes. Datagrams, pings and pongs are skipped.
    pub async fn next_message(&mut self) -> Result<downbeat_protocol::ServerMessage, u16> {
        use futures_util::StreamExt as _;
        use tokio_tungstenite::tungstenite::Message;
        loop {
            let Ok(Some(Ok(message))) = tokio::time::timeout(Duration::from_secs(10), self.socket.next()).await else {
                return Err(0);
            };
            match message {
                Message::Binary(bytes) => {
                    if let Ok(downbeat_protocol::ws::Unit::Control(body)) = downbeat_protocol::ws::split(&bytes) {
                        return downbeat_protocol::decode_frame_body(body).map_err(|_| 0);
                    }
                }
                Message::Close(frame) => return Err(frame.map_or(0, |f| f.code.into())),
                _ => {}
            }
        }
    }

    /// The next control frame, skipping datagrams, pings and pongs; `None` once the server's
    /// close frame (kept in [`Self::close_code`]) or the end of the socket arrives.
    pub async fn read_control(&mut self) -> Result<Option<downbeat_protocol::ServerMessage>> {
        use futures_util::StreamExt as _;
        use tokio_tungstenite::tungstenite::Message;
        while let Some(message) = self.socket.next().await {
            match message? {
                Message::Binary(bytes) => {
                    if let downbeat_protocol::ws::Unit::Control(body) = downbeat_protocol::ws::split(&bytes)? {
                        return Ok(Some(downbeat_protocol::decode_frame_body(body)?));
                    }
                }
                Message::Close(frame) => {
                    self.close_code = frame.map(|f| f.code.into());
                    return Ok(None);
                }
                _ => {}
            }
        }
        Ok(None)
    }

    /// Reads until an error frame and then the close: the error's code and the close code.
    pub async fn expect_error_and_close(&mut self) -> Result<(downbeat_protocol::ErrorCode, u16)> {
        let code = loop {
            match self.next_message().await {
                Ok(downbeat_protocol::ServerMessage::Error(e)) => break e.code,
                Ok(_) => continue,
                Err(close) => bail!("closed ({close}) without an error frame"),
            }
        };
        loop {
            match self.next_message().await {
                Ok(_) => continue,
                Err(close) => return Ok((code, close)),
            }
        }
    }
}

/// A session over [`TestServer::transport`] driven frame by frame, for feeding the server what
/// a misbehaving client would send: the same control frames either way.
#[derive(Debug)]
pub enum RawLink {
    /// A WebTransport session and its control stream.
    WebTransport(RawSession),
    /// A WebSocket session to `/api/ws`.
    WebSocket(RawWebSocket),
}

impl TestServer {
    /// Opens a raw session over [`Self::transport`], sending nothing.
    pub async fn raw_link(&self) -> Result<RawLink> {
        self.raw_link_from(None).await
    }

    /// Opens a raw session over [`Self::transport`] from local address `from` (a loopback
    /// address other than 127.0.0.1 looks like another client network), sending nothing.
    pub async fn raw_link_from(&self, from: Option<std::net::IpAddr>) -> Result<RawLink> {
        Ok(match self.transport {
            Transport::WebTransport => RawLink::WebTransport(self.raw_session_from(from).await?),
            Transport::WebSocket => RawLink::WebSocket(self.raw_websocket_from(None, from).await?),
        })
    }

    /// Options for a network check of this server over [`Self::transport`] (pinned hashes).
    pub fn probe_options(&self) -> downbeat_client::probe::ProbeOptions {
        let mut options = downbeat_client::probe::ProbeOptions::new(self.session_url("127.0.0.1"));
        options.cert_hashes = self.hashes.clone();
        options
    }
}

impl RawLink {
    /// Sends one control frame.
    pub async fn write_message(&mut self, message: &downbeat_protocol::ClientMessage) -> Result<()> {
        match self {
            Self::WebTransport(raw) => raw.write_message(message).await,
            Self::WebSocket(raw) => raw.send_message(message).await,
        }
    }

    /// Sends one datagram (a QUIC datagram, or a tagged WebSocket message).
    pub async fn send_datagram(&mut self, datagram: &[u8]) -> Result<()> {
        match self {
            Self::WebTransport(raw) => Ok(raw.conn.send_datagram(datagram)?),
            Self::WebSocket(raw) => {
                let message = downbeat_protocol::ws::datagram_message(datagram);
                raw.send(tokio_tungstenite::tungstenite::Message::Binary(message.into())).await
            }
        }
    }

    /// The next control frame from the server, or `None` once it closed the session (its
    /// close code is then kept for [`Self::closed`]). Waits as long as it takes.
    pub async fn read_message(&mut self) -> Result<Option<downbeat_protocol::ServerMessage>> {
        match self {
            Self::WebTransport(raw) => raw.read_message().await,
            Self::WebSocket(raw) => raw.read_control().await,
        }
    }

    /// Waits (at most 10 s) for the server to close the session and returns the error number
    /// it closed with: QUIC's application close code, or a WebSocket close code less 4000.
    pub async fn closed(&mut self) -> Result<u16> {
        let closed = async {
            match self {
                Self::WebTransport(raw) => match raw.conn.closed().await {
                    wtransport::error::ConnectionError::ApplicationClosed(close) => {
                        Ok(u16::try_from(close.code().into_inner())?)
                    }
                    other => bail!("closed, but not by the server application: {other}"),
                },
                Self::WebSocket(raw) => {
                    while raw.read_control().await?.is_some() {}
                    let code = raw.close_code.context("the socket ended without a close frame")?;
                    code.checked_sub(4000).with_context(|| format!("close code {code} is not an error's"))
                }
            }
        };
        tokio::time::timeout(Duration::from_secs(10), closed).await.context("waiting for the server to close")?
    }
}

/// A school (tenant) with one HS256 key, `secret`, and `limits`.
pub fn school(
    id: &str,
    secret: &[u8; 32],
    limits: downbeat_server::config::TenantLimits,
) -> downbeat_server::config::TenantConfig {
    use downbeat_server::config::{TenantConfig, TenantRetention};
    TenantConfig {
        id: id.to_owned(),
        name: format!("School {id}"),
        issuer: format!("https://sso.{id}.example"),
        keys: vec![hs256_key(secret)],
        limits,
        retention: TenantRetention::default(),
    }
}

/// An HS256 key whose secret is `secret`.
fn hs256_key(secret: &[u8; 32]) -> downbeat_server::config::TenantKeyConfig {
    use base64::Engine as _;
    use downbeat_server::config::{KeyAlgorithm, TenantKeyConfig};
    TenantKeyConfig {
        kid: None,
        algorithm: KeyAlgorithm::Hs256,
        secret: Some(base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(secret)),
        public_key_pem: None,
        public_key_file: None,
    }
}

/// The server's operators with one HS256 key, `secret`.
pub fn operators(secret: &[u8; 32]) -> downbeat_server::config::OperatorsConfig {
    downbeat_server::config::OperatorsConfig {
        issuer: "https://sso.district.example/operators".to_owned(),
        keys: vec![hs256_key(secret)],
    }
}

/// `a - b` in ns, negative when `a` is the earlier: how far one true instant lies from another.
pub fn nanos_between(a: Instant, b: Instant) -> i64 {
    if a >= b { (a - b).as_nanos() as i64 } else { -((b - a).as_nanos() as i64) }
}

/// A clock-sync request datagram, encoded: request `id`, sent at client time `t0`, naming the
/// timeline `epoch` its sender holds (0: none).
pub fn sync_request(id: u32, t0: u64, epoch: u64) -> Result<Vec<u8>> {
    use downbeat_protocol::{ClientDatagram, ClientNanos, SyncRequest};
    let request = ClientDatagram::SyncRequest(SyncRequest { id, t0: ClientNanos(t0), epoch });
    Ok(downbeat_protocol::encode_client_datagram(&request)?)
}

/// Waits until `f` is true of the client's timeline, reading events (never sleeping).
pub async fn wait_for_epoch(client: &Client, epoch: u64) -> Result<()> {
    let wait = async {
        while client.timeline().is_none_or(|t| t.epoch() < epoch) {
            if client.next_event().await.is_none() {
                bail!("session closed");
            }
        }
        Ok(())
    };
    tokio::time::timeout(Duration::from_secs(10), wait).await.context("waiting for a timeline epoch")?
}

/// Reads `client`'s events until `done` says stop (at most 10 s); returns every event read,
/// the last included.
pub async fn events_until(
    client: &Client,
    mut done: impl FnMut(&downbeat_client::Event) -> bool,
) -> Result<Vec<downbeat_client::Event>> {
    let read = async {
        let mut seen = Vec::new();
        loop {
            match client.next_event().await {
                Some(event) => {
                    let stop = done(&event);
                    seen.push(event);
                    if stop {
                        return Ok(seen);
                    }
                }
                None => bail!("the session ended; events so far: {seen:?}"),
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(10), read).await.context("waiting for an event")?
}
