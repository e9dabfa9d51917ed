//! The browser classroom: the pages (`--web-dir`), the browser package (`--pkg-dir`, at
//! `/pkg/`), what a page needs to connect (`/api/client-config`, `/api/time`), demo sign-in
//! (`/api/demo/tokens`, embedded demo tenant only), the cross-origin isolation headers every
//! response carries, and the optional HTTPS listener.
//!
//! Files are served by a small handler of our own: a URL path is accepted only when every
//! segment is a plain name (`[A-Za-z0-9._-]`, not starting with a dot), checked on the raw,
//! undecoded path, so `..`, encoded dots or slashes, backslashes and hidden files never reach
//! the file system. Content types come from a fixed table; everything is `no-cache` with an
//! `ETag`, so a rebuilt page or package is picked up on the next load.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use axum::body::Body;
use axum::extract::connect_info::{ConnectInfo, Connected};
use axum::extract::{FromRequest, Request, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::serve::{IncomingStream, Listener};
use axum::{Json, Router};
use downbeat_certs::CertifiedKey;
use downbeat_engine::limit::TokenBucket;
use downbeat_protocol::{ErrorCode, MAX_NAME_LEN};
use serde::{Deserialize, Serialize};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls;
use tokio_rustls::server::TlsStream;
use tracing::{debug, error, warn};

use crate::auth::{DEMO_TENANT_ID, Role};
use crate::config::Config;
use crate::http::{ApiError, ApiJson, AppState, allow_any_origin, not_found};

/// How long a demo token lasts.
const DEMO_TOKEN_TTL: Duration = Duration::from_secs(12 * 3600);
/// Demo tokens per client network: sustained rate (per second) and burst. A whole class
/// behind one school NAT signs in at once, so the burst covers a class and its teacher.
const DEMO_TOKENS_PER_SECOND: u32 = 1;
const DEMO_TOKEN_BURST: u32 = 60;
/// Client networks whose demo-token buckets are remembered before full ones are forgotten.
const MAX_TRACKED_NETWORKS: usize = 10_000;
/// Most path segments in a served file's URL.
const MAX_SEGMENTS: usize = 4;
/// Longest served file URL path, in bytes.
const MAX_FILE_PATH: usize = 256;
/// What a missing browser package answers.
const PKG_NOT_BUILT: &str = "the browser package is not built: run scripts/build-wasm";
/// Time a client has to complete its TLS handshake on the HTTPS listener.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// TLS handshakes in progress at once on the HTTPS listener; past this, accepting waits.
const MAX_TLS_HANDSHAKES: usize = 256;

/// What the browser routes need beyond the API's state.
#[derive(Debug)]
pub(crate) struct Web {
    web_dir: PathBuf,
    pkg_dir: PathBuf,
    public_wt_url: Option<String>,
    wt_port: u16,
    demo_buckets: Mutex<HashMap<IpAddr, TokenBucket>>,
}

impl Web {
    pub(crate) fn new(config: &Config, wt_port: u16) -> Self {
        Self {
            web_dir: config.web_dir.clone(),
            pkg_dir: config.pkg_dir.clone(),
            public_wt_url: config.public_wt_url.clone(),
            wt_port,
            demo_buckets: Mutex::new(HashMap::new()),
        }
    }

    /// Takes one demo token from the bucket of `peer`'s network (an IPv4 address, or an IPv6
    /// /64). Requests without a known peer share one bucket.
    fn take_demo_token(&self, peer: Option<IpAddr>, now: u64) -> bool {
        let key = peer.map_or(IpAddr::V6(Ipv6Addr::UNSPECIFIED), network);
        let mut buckets = self.demo_buckets.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if buckets.len() >= MAX_TRACKED_NETWORKS {
            // Full buckets are the same as new ones: forgetting them changes nothing.
            buckets.retain(|_, b| b.available(now) < DEMO_TOKEN_BURST);
        }
        buckets
            .entry(key)
            .or_insert_with(|| TokenBucket::new(DEMO_TOKENS_PER_SECOND, DEMO_TOKEN_BURST, now))
            .try_take(now)
    }
}

/// The network a client address stands for in rate limits: IPv4 addresses (also when mapped
/// into IPv6) as they are, IPv6 addresses by their /64.
fn network(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(v4) => IpAddr::V4(v4),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(Ipv6Addr::from(u128::from(v6) & !u128::from(u64::MAX))),
        },
    }
}

/// Logs a warning for each of the pages and the package that is missing. The server runs
/// without them (the API does not need them).
pub(crate) fn warn_if_missing(config: &Config) {
    if !config.web_dir.is_dir() {
        warn!(
            web_dir = %config.web_dir.display(),
            "the classroom pages directory does not exist; the API works, the pages answer 404 (set --web-dir)"
        );
    }
    if !config.pkg_dir.is_dir() {
        warn!(
            pkg_dir = %config.pkg_dir.display(),
            "the browser package is not built; the pages cannot load it until you run scripts/build-wasm (or set --pkg-dir)"
        );
    }
}

/// The browser routes. `/api/demo/tokens` exists only for the embedded demo tenant;
/// otherwise it is an unknown route like any other.
pub(crate) fn routes(demo: bool) -> Router<AppState> {
    let router = Router::new()
        .route("/", get(index))
        .route("/teacher", get(teacher))
        .route("/student", get(student))
        .route("/{file}", get(web_file))
        .route("/pkg/{*file}", get(pkg_file))
        .route("/api/client-config", get(client_config))
        .route("/api/time", get(time));
    if demo { router.route("/api/demo/tokens", post(demo_token)) } else { router }
}

/// Adds the cross-origin isolation headers (pages need them for `SharedArrayBuffer` and
/// precise timers) and `nosniff` to every response. Answers every origin may read are
/// `Cross-Origin-Resource-Policy: cross-origin`; all others `same-origin`.
pub(crate) async fn isolate(mut response: Response) -> Response {
    let headers = response.headers_mut();
    let public = headers.get(header::ACCESS_CONTROL_ALLOW_ORIGIN).is_some_and(|v| v.as_bytes() == b"*");
    let resource_policy = if public { "cross-origin" } else { "same-origin" };
    headers.insert(HeaderName::from_static("cross-origin-opener-policy"), HeaderValue::from_static("same-origin"));
    headers.insert(HeaderName::from_static("cross-origin-embedder-policy"), HeaderValue::from_static("require-corp"));
    headers.insert(HeaderName::from_static("cross-origin-resource-policy"), HeaderValue::from_static(resource_policy));
    headers.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    response
}

async fn index(State(state): State<AppState>, headers: HeaderMap) -> Result<Response, ApiError> {
    page(&state, "index.html", &headers).await
}

async fn teacher(State(state): State<AppState>, headers: HeaderMap) -> Result<Response, ApiError> {
    page(&state, "teacher.html", &headers).await
}

async fn student(State(state): State<AppState>, headers: HeaderMap) -> Result<Response, ApiError> {
    page(&state, "student.html", &headers).await
}

/// One of the named pages; its absence says where pages come from.
async fn page(state: &AppState, name: &str, headers: &HeaderMap) -> Result<Response, ApiError> {
    match serve_file(&state.web.web_dir, name, headers).await? {
        Some(response) => Ok(response),
        None => Err(not_found("the classroom pages are not installed on this server (see --web-dir)")),
    }
}

/// Any other file of the pages directory; a missing one is an unknown route.
async fn web_file(State(state): State<AppState>, uri: Uri, headers: HeaderMap) -> Result<Response, ApiError> {
    let name = uri.path().strip_prefix('/').unwrap_or_default();
    match serve_file(&state.web.web_dir, name, &headers).await? {
        Some(response) => Ok(response),
        None => Err(not_found("no such endpoint")),
    }
}

/// A file of the browser package.
async fn pkg_file(State(state): State<AppState>, uri: Uri, headers: HeaderMap) -> Result<Response, ApiError> {
    let name = uri.path().strip_prefix("/pkg/").unwrap_or_default();
    if let Some(response) = serve_file(&state.web.pkg_dir, name, &headers).await? {
        return Ok(response);
    }
    if !state.web.pkg_dir.is_dir() {
        return Err(not_found(PKG_NOT_BUILT));
    }
    if safe_path(&state.web.pkg_dir, name).is_none() {
        return Err(not_found("no such file in the browser package"));
    }
    Err(not_found(format!("{name} is not in the browser package: run scripts/build-wasm to build it")))
}

/// The file `name` (the raw, undecoded URL path under a served directory) names in `dir`:
/// `None` unless every `/`-separated segment is a plain name.
fn safe_path(dir: &Path, name: &str) -> Option<PathBuf> {
    if name.is_empty() || name.len() > MAX_FILE_PATH {
        return None;
    }
    let mut path = dir.to_path_buf();
    for (i, segment) in name.split('/').enumerate() {
        let plain = !segment.is_empty()
            && !segment.starts_with('.')
            && segment.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'));
        if !plain || i >= MAX_SEGMENTS {
            return None;
        }
        path.push(segment);
    }
    Some(path)
}

/// The `Content-Type` of a served file, by extension.
fn content_type(path: &Path) -> &'static str {
    let extension = path.extension().and_then(|e| e.to_str()).unwrap_or_default().to_ascii_lowercase();
    match extension.as_str() {
        "html" | "htm" => "text/html; charset=utf-8",
        "js" | "mjs" => "text/javascript",
        "css" => "text/css",
        "json" | "map" => "application/json",
        "wasm" => "application/wasm",
        "ts" | "txt" | "md" => "text/plain; charset=utf-8",
        "svg" => "image/svg+xml",
        "png" => "image/png",
        "jpg" | "jpeg" => "image/jpeg",
        "webp" => "image/webp",
        "ico" => "image/x-icon",
        "wav" => "audio/wav",
        "mp3" => "audio/mpeg",
        "ogg" => "audio/ogg",
        "woff2" => "font/woff2",
        _ => "application/octet-stream",
    }
}

/// Serves `name` from `dir`: `Ok(None)` if it is not a plain name or no such file exists;
/// `304 Not Modified` when the request's `If-None-Match` has its current `ETag`.
async fn serve_file(dir: &Path, name: &str, request: &HeaderMap) -> Result<Option<Response>, ApiError> {
    let Some(path) = safe_path(dir, name) else { return Ok(None) };
    let read_failed = |e: io::Error| {
        error!(path = %path.display(), error = %e, "cannot read a served file");
        ApiError::new(ErrorCode::Internal, "cannot read the file")
    };
    let meta = match tokio::fs::metadata(&path).await {
        Ok(meta) if meta.is_file() => meta,
        Ok(_) => return Ok(None),
        Err(e) if is_missing(&e) => return Ok(None),
        Err(e) => return Err(read_failed(e)),
    };
    let modified = meta.modified().ok().and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok());
    let etag = format!("\"{:x}-{:x}\"", meta.len(), modified.map_or(0, |d| d.as_nanos()));
    let etag = HeaderValue::from_str(&etag).map_err(|_| ApiError::new(ErrorCode::Internal, "bad etag"))?;
    let cached = request
        .get_all(header::IF_NONE_MATCH)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|tag| tag.trim() == "*" || tag.trim().trim_start_matches("W/") == etag.to_str().unwrap_or_default());
    let mut response = if cached {
        StatusCode::NOT_MODIFIED.into_response()
    } else {
        let bytes = match tokio::fs::read(&path).await {
            Ok(bytes) => bytes,
            Err(e) if is_missing(&e) => return Ok(None),
            Err(e) => return Err(read_failed(e)),
        };
        let mut response = Response::new(Body::from(bytes));
        response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type(&path)));
        response
    };
    let headers = response.headers_mut();
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    headers.insert(header::ETAG, etag);
    Ok(Some(response))
}

/// Whether a file error means "nothing there" rather than a failure.
fn is_missing(e: &io::Error) -> bool {
    matches!(e.kind(), io::ErrorKind::NotFound | io::ErrorKind::NotADirectory)
}

#[derive(Serialize)]
struct ClientConfig {
    webtransport_url: String,
    certificate_hashes: Vec<String>,
    demo: bool,
}

/// What a page needs to connect: the WebTransport URL, the hashes to pin, and whether demo
/// sign-in exists.
async fn client_config(State(state): State<AppState>, headers: HeaderMap) -> Result<Response, ApiError> {
    let webtransport_url = match &state.web.public_wt_url {
        Some(url) => url.clone(),
        None => {
            let host = match headers.get(header::HOST) {
                None => "127.0.0.1",
                Some(value) => value
                    .to_str()
                    .ok()
                    .and_then(host_without_port)
                    .ok_or_else(|| ApiError::bad_request("the Host header is not a host name or address"))?,
            };
            format!("https://{host}:{}/", state.web.wt_port)
        }
    };
    let certificate_hashes = state.hashes.get().iter().map(|h| hex::encode(h.sha256)).collect();
    let body = ClientConfig { webtransport_url, certificate_hashes, demo: state.tenants.is_demo() };
    Ok(public_no_store(Json(body).into_response()))
}

/// The host of a `Host` header value without its port: a DNS name or IPv4 address, or an
/// IPv6 literal with its brackets. `None` if it is neither.
fn host_without_port(value: &str) -> Option<&str> {
    let port_ok = |port: &str| !port.is_empty() && port.len() <= 5 && port.bytes().all(|b| b.is_ascii_digit());
    if let Some(inside) = value.strip_prefix('[') {
        let (address, after) = inside.split_once(']')?;
        address.parse::<Ipv6Addr>().ok()?;
        if !after.is_empty() && !after.strip_prefix(':').is_some_and(port_ok) {
            return None;
        }
        return Some(&value[..address.len() + 2]);
    }
    let host = match value.split_once(':') {
        Some((host, port)) if port_ok(port) => host,
        Some(_) => return None,
        None => value,
    };
    let name_ok = !host.is_empty()
        && host.len() <= 253
        && host.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'));
    name_ok.then_some(host)
}

/// A public answer (any origin may read it) that must never be cached.
fn public_no_store(mut response: Response) -> Response {
    allow_any_origin(&mut response);
    response.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

#[derive(Serialize)]
struct ServerTime {
    server_now_ms: f64,
}

/// The server clock, in milliseconds with nanosecond precision, read as late as possible.
async fn time(State(state): State<AppState>) -> Response {
    let now = state.clock.now();
    // Exact to the nanosecond below 2^53 ns (about 104 days of uptime).
    let server_now_ms = now.0 as f64 / 1e6;
    public_no_store(Json(ServerTime { server_now_ms }).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DemoTokenRequest {
    role: String,
    name: String,
}

#[derive(Serialize)]
struct DemoToken {
    token: String,
    sub: String,
    expires_at: u64,
}

/// Signs a child or teacher in to the embedded demo tenant by display name: a fresh
/// pseudonymous subject and a 12-hour token. Rate-limited per client network.
async fn demo_token(State(state): State<AppState>, request: Request) -> Result<Response, ApiError> {
    let peer = request.extensions().get::<ConnectInfo<ClientAddr>>().map(|info| info.0.0.ip());
    if !state.web.take_demo_token(peer, state.clock.now().0) {
        state.stats.refused.inc(ErrorCode::RateLimited);
        return Err(ApiError::new(
            ErrorCode::RateLimited,
            "too many demo sign-ins from this network; wait a minute and try again",
        ));
    }
    let ApiJson(body) = ApiJson::<DemoTokenRequest>::from_request(request, &state).await?;
    let (role, prefix) = match body.role.as_str() {
        "teacher" => (Role::Teacher, "t"),
        "student" => (Role::Student, "s"),
        _ => return Err(ApiError::bad_request("role must be \"teacher\" or \"student\"")),
    };
    let name = body.name.trim();
    if name.is_empty() || name.len() > MAX_NAME_LEN || name.chars().any(char::is_control) {
        return Err(ApiError::bad_request(format!(
            "a name is 1 to {MAX_NAME_LEN} bytes (after trimming spaces) without control characters"
        )));
    }
    let sub = format!("demo-{prefix}-{:08x}", rand::random::<u32>());
    let minted = state.tenants.mint(DEMO_TENANT_ID, role, &sub, name, DEMO_TOKEN_TTL).and_then(|token| {
        let principal = state.tenants.verify(&token)?;
        Ok((token, principal.expires_at_unix))
    });
    let (token, expires_at) = minted.map_err(|e| {
        error!(error = %e, "minting a demo token failed");
        ApiError::new(ErrorCode::Internal, "internal error")
    })?;
    debug!(sub = %sub, role = role.as_str(), "demo token minted");
    let mut response = Json(DemoToken { token, sub, expires_at }).into_response();
    response.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    Ok(response)
}

/// The peer address of an HTTP or HTTPS connection, for per-client rate limits.
#[derive(Clone, Copy, Debug)]
pub(crate) struct ClientAddr(pub(crate) SocketAddr);

impl Connected<IncomingStream<'_, TcpListener>> for ClientAddr {
    fn connect_info(stream: IncomingStream<'_, TcpListener>) -> Self {
        Self(*stream.remote_addr())
    }
}

impl Connected<IncomingStream<'_, TlsListener>> for ClientAddr {
    fn connect_info(stream: IncomingStream<'_, TlsListener>) -> Self {
        Self(*stream.remote_addr())
    }
}

/// The rustls config of the HTTPS listener: `key`'s chain, TLS 1.3 on ring, HTTP/1.1.
fn https_tls_config(key: &CertifiedKey) -> Result<rustls::ServerConfig, rustls::Error> {
    crate::identity::rustls_server_config(key, b"http/1.1")
}

/// A TCP listener that hands out TLS streams. Handshakes run concurrently (at most
/// [`MAX_TLS_HANDSHAKES`], each within [`TLS_HANDSHAKE_TIMEOUT`]), so a slow or silent client
/// never holds up the others. The certificate is fixed when the listener is made.
pub(crate) struct TlsListener {
    tcp: TcpListener,
    acceptor: TlsAcceptor,
    handshakes: JoinSet<Option<(TlsStream<TcpStream>, SocketAddr)>>,
}

impl std::fmt::Debug for TlsListener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsListener")
            .field("local_addr", &self.tcp.local_addr().ok())
            .field("handshakes", &self.handshakes.len())
            .finish_non_exhaustive()
    }
}

impl TlsListener {
    /// Serves TLS with `key` on `tcp`.
    pub(crate) fn new(tcp: TcpListener, key: &CertifiedKey) -> Result<Self, rustls::Error> {
        let acceptor = TlsAcceptor::from(Arc::new(https_tls_config(key)?));
        Ok(Self { tcp, acceptor, handshakes: JoinSet::new() })
    }
}

impl Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            // Both branches are cancel safe: a dropped `accept` loses no connection.
            tokio::select! {
                accepted = self.tcp.accept(), if self.handshakes.len() < MAX_TLS_HANDSHAKES => match accepted {
                    Ok((stream, peer)) => {
                        let acceptor = self.acceptor.clone();
                        self.handshakes.spawn(async move {
                            match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                                Ok(Ok(tls)) => Some((tls, peer)),
                                Ok(Err(e)) => {
                                    debug!(%peer, error = %e, "TLS handshake failed");
                                    None
                                }
                                Err(_) => {
                                    debug!(%peer, "TLS handshake timed out");
                                    None
                                }
                            }
                        });
                    }
                    Err(e) if is_connection_error(&e) => {}
                    Err(e) => {
                        // Out of file descriptors and the like: give the system a moment.
                        error!(error = %e, "accepting an HTTPS connection failed");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                },
                Some(done) = self.handshakes.join_next() => {
                    if let Ok(Some(connection)) = done {
                        return connection;
                    }
                }
            }
        }
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        self.tcp.local_addr()
    }
}

/// Errors of one incoming connection, not of the listener.
fn is_connection_error(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionRefused | io::ErrorKind::ConnectionAborted | io::ErrorKind::ConnectionReset
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_plain_names_become_paths() {
        let dir = Path::new("/srv/web");
        assert_eq!(safe_path(dir, "app.css"), Some(PathBuf::from("/srv/web/app.css")));
        assert_eq!(safe_path(dir, "snippets/x-1/inline0.js"), Some(PathBuf::from("/srv/web/snippets/x-1/inline0.js")));
        for bad in [
            "",
            "..",
            "../Cargo.toml",
            "a/../../b",
            "%2e%2e/x",
            "..%2fx",
            ".gitignore",
            "a//b",
            "/etc/passwd",
            "a\\..\\b",
            "a/",
            "a b",
            "a/b/c/d/e",
        ] {
            assert_eq!(safe_path(dir, bad), None, "{bad:?}");
        }
        assert_eq!(safe_path(dir, &"a".repeat(MAX_FILE_PATH + 1)), None);
    }

    #[test]
    fn content_types_follow_the_extension() {
        let cases = [
            ("index.html", "text/html; charset=utf-8"),
            ("downbeat_client.js", "text/javascript"),
            ("package.json", "application/json"),
            ("downbeat_client_bg.wasm", "application/wasm"),
            ("app.CSS", "text/css"),
            ("downbeat_client.d.ts", "text/plain; charset=utf-8"),
            ("README", "application/octet-stream"),
        ];
        for (name, want) in cases {
            assert_eq!(content_type(Path::new(name)), want, "{name}");
        }
    }

    #[test]
    fn hosts_lose_their_port_and_keep_ipv6_brackets() {
        let cases = [
            ("localhost:1234", Some("localhost")),
            ("localhost", Some("localhost")),
            ("music.school.example", Some("music.school.example")),
            ("192.168.1.20:4480", Some("192.168.1.20")),
            ("[::1]:4480", Some("[::1]")),
            ("[fe80::1]", Some("[fe80::1]")),
            ("[::1", None),
            ("[nope]:1", None),
            ("[::1]x", None),
            ("host:port", None),
            ("host:", None),
            ("a b", None),
            ("", None),
            ("evil\"host", None),
        ];
        for (value, want) in cases {
            assert_eq!(host_without_port(value), want, "{value:?}");
        }
    }

    #[test]
    fn networks_group_ipv6_by_64() {
        let a: IpAddr = "2001:db8:1:2:aaaa::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:bbbb::2".parse().unwrap();
        let c: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert_eq!(network(a), network(b));
        assert_ne!(network(a), network(c));
        let mapped: IpAddr = "::ffff:10.0.0.7".parse().unwrap();
        assert_eq!(network(mapped), "10.0.0.7".parse::<IpAddr>().unwrap());
    }

    #[test]
    fn demo_tokens_are_limited_per_network() {
        let web = Web::new(&Config::default(), 4433);
        let one = Some("10.0.0.1".parse().unwrap());
        let other = Some("10.0.0.2".parse().unwrap());
        for _ in 0..DEMO_TOKEN_BURST {
            assert!(web.take_demo_token(one, 0));
        }
        assert!(!web.take_demo_token(one, 0));
        assert!(web.take_demo_token(other, 0));
        assert!(web.take_demo_token(one, 1_000_000_000));
    }
}
