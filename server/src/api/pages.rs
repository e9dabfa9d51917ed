//! The browser classroom: the pages (`--web-dir`), the browser package (`--pkg-dir`, at
//! `/pkg/`), what a page needs to connect (`/api/client-config`, `/api/time`), demo sign-in
//! (`/api/demo/tokens`, embedded demo tenant only).
//!
//! Files are served by a small handler of our own: a URL path is accepted only when every
//! segment is a plain name (`[A-Za-z0-9._-]`, not starting with a dot), checked on the raw,
//! undecoded path, so `..`, encoded dots or slashes, backslashes and hidden files never reach
//! the file system. Content types come from a fixed table; everything is `no-cache` with an
//! `ETag`, so a rebuilt page or package is picked up on the next load.

use std::io;
use std::net::Ipv6Addr;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use axum::body::Body;
use axum::extract::{FromRequest, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use downbeat_protocol::{ErrorCode, MAX_NAME_LEN, TextKind, check_text};
use serde::{Deserialize, Serialize};
use tracing::{debug, error, warn};

use super::error::{ApiError, not_found};
use super::extract::{ApiJson, PeerAddr};
use super::respond::allow_any_origin;
use super::state::AppState;
use crate::auth::{DEMO_TENANT_ID, Role};
use crate::config::Config;

/// How long a demo token lasts (or the maximum token lifetime, if shorter).
const DEMO_TOKEN_TTL: Duration = Duration::from_secs(12 * 3600);
/// Most path segments in a served file's URL.
const MAX_SEGMENTS: usize = 4;
/// Longest served file URL path, in bytes.
const MAX_FILE_PATH: usize = 256;
/// What a missing browser package answers.
const PKG_NOT_BUILT: &str = "the browser package is not built: run scripts/build-wasm";

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
        .route("/check", get(check))
        .route("/inspect", get(inspect))
        .route("/{file}", get(web_file))
        .route("/pkg/{*file}", get(pkg_file))
        .route("/api/client-config", get(client_config))
        .route("/api/time", get(time));
    if demo { router.route("/api/demo/tokens", post(demo_token)) } else { router }
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

/// The network check: can this device reach the server, on which transport, how well timed.
async fn check(State(state): State<AppState>, headers: HeaderMap) -> Result<Response, ApiError> {
    page(&state, "check.html", &headers).await
}

/// The operators' inspector (its API needs an operator's token).
async fn inspect(State(state): State<AppState>, headers: HeaderMap) -> Result<Response, ApiError> {
    page(&state, "inspect.html", &headers).await
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
    /// The demo teacher secret: needed for a teacher's or an admin's token, ignored for a
    /// student's.
    #[serde(default)]
    secret: Option<String>,
}

#[derive(Serialize)]
struct DemoToken {
    token: String,
    sub: String,
    expires_at: u64,
}

/// Signs a child or teacher in to the embedded demo tenant by display name: a fresh
/// pseudonymous subject and a 12-hour token. A teacher or an admin (who exports and deletes
/// children's data) must also give the demo teacher secret (the banner's teacher page URL
/// carries it), else `forbidden`. Rate-limited per client
/// network, wrong secrets included.
async fn demo_token(
    State(state): State<AppState>,
    PeerAddr(peer): PeerAddr,
    request: Request,
) -> Result<Response, ApiError> {
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
        "admin" => (Role::Admin, "a"),
        _ => return Err(ApiError::bad_request("role must be \"teacher\", \"student\" or \"admin\"")),
    };
    if role != Role::Student && !state.web.is_demo_teacher_secret(body.secret.as_deref()) {
        state.stats.refused.inc(ErrorCode::Forbidden);
        return Err(ApiError::new(
            ErrorCode::Forbidden,
            "a teacher signs in to the demo with the teacher secret: open the teacher page link the server printed at start",
        ));
    }
    let name = body.name.trim();
    if name.is_empty() || name.len() > MAX_NAME_LEN || check_text(name, TextKind::Line).is_err() {
        return Err(ApiError::bad_request(format!(
            "a name is 1 to {MAX_NAME_LEN} bytes (after trimming spaces) on one line without control characters"
        )));
    }
    let sub = format!("demo-{prefix}-{:08x}", rand::random::<u32>());
    let ttl = DEMO_TOKEN_TTL.min(state.tenants.max_lifetime());
    let minted = state.tenants.mint(DEMO_TENANT_ID, role, &sub, name, ttl).and_then(|token| {
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
}
