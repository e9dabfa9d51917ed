//! The HTTP/1.1 API (axum): health, certificate hashes for pinning, rooms, metrics.
//!
//! Every error, including axum's own extractor rejections and unknown routes, is answered
//! as `{"error":{"code":"..","message":".."}}` with a stable code from
//! [`downbeat_protocol::ErrorCode`]; details go to the log, never internals to the client.

use std::sync::Arc;
use std::time::SystemTime;

use axum::extract::rejection::JsonRejection;
use axum::extract::{DefaultBodyLimit, FromRequest, FromRequestParts, Path, Request, State};
use axum::http::request::Parts;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use downbeat_engine::timeline::{self, Applied};
use downbeat_protocol::{self as wire, BoundedString, Change, ErrorCode, MAX_ERROR_MESSAGE_LEN};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tracing::{debug, error};

use crate::identity::PublishedHashes;
use crate::rooms::{Rooms, RoomsError};
use crate::stats::Stats;

/// Largest request body accepted.
const MAX_BODY_BYTES: usize = 16 * 1024;

/// What the handlers share.
#[derive(Clone, Debug)]
pub(crate) struct AppState {
    pub(crate) rooms: Arc<Rooms>,
    pub(crate) hashes: Arc<PublishedHashes>,
    pub(crate) dev_token: Arc<str>,
    pub(crate) stats: Arc<Stats>,
}

/// The API's routes.
pub(crate) fn router(state: AppState) -> Router {
    Router::new()
        .route("/api/ping", get(ping))
        .route("/api/cert-hashes", get(cert_hashes))
        .route("/api/rooms", post(create_room))
        .route("/api/rooms/{id}", get(room))
        .route("/api/rooms/{id}/start", post(start))
        .route("/api/rooms/{id}/stop", post(stop))
        .route("/api/rooms/{id}/tempo", post(set_tempo))
        .route("/api/rooms/{id}/meter", post(set_meter))
        .route("/metrics", get(metrics))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(state)
}

/// The one error type of the API: a status, a stable code and a message safe to show.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: ErrorCode,
    message: String,
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    error: ErrorDetail<'a>,
}

#[derive(Serialize)]
struct ErrorDetail<'a> {
    code: &'static str,
    message: &'a str,
}

impl ApiError {
    /// An error with the status that fits `code`.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self { status: status_for(code), code, message: message.into() }
    }

    fn bad_request(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::BadRequest, message)
    }

    /// The HTTP status.
    pub fn status(&self) -> StatusCode {
        self.status
    }

    /// The stable code.
    pub fn code(&self) -> ErrorCode {
        self.code
    }
}

/// The HTTP status for each stable code.
pub fn status_for(code: ErrorCode) -> StatusCode {
    match code {
        ErrorCode::Unauthorized => StatusCode::UNAUTHORIZED,
        ErrorCode::RoomNotFound => StatusCode::NOT_FOUND,
        ErrorCode::AlreadyRunning | ErrorCode::NotRunning | ErrorCode::TooManyPendingChanges => StatusCode::CONFLICT,
        ErrorCode::TooManyRooms => StatusCode::TOO_MANY_REQUESTS,
        ErrorCode::ServerBusy | ErrorCode::ShuttingDown => StatusCode::SERVICE_UNAVAILABLE,
        ErrorCode::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        _ => StatusCode::BAD_REQUEST,
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if self.status.is_server_error() {
            error!(status = %self.status, code = self.code.as_str(), message = %self.message, "request failed");
        } else {
            debug!(status = %self.status, code = self.code.as_str(), message = %self.message, "request refused");
        }
        // Internal failures get a fixed message; everything else is written to be shown.
        let message = if self.code == ErrorCode::Internal {
            "internal error".to_owned()
        } else {
            BoundedString::<MAX_ERROR_MESSAGE_LEN>::truncating(&self.message).into_string()
        };
        let body = ErrorBody { error: ErrorDetail { code: self.code.as_str(), message: &message } };
        (self.status, Json(body)).into_response()
    }
}

impl From<RoomsError> for ApiError {
    fn from(e: RoomsError) -> Self {
        let code = e.code();
        Self::new(code, e.to_string())
    }
}

impl From<timeline::TimelineError> for ApiError {
    fn from(e: timeline::TimelineError) -> Self {
        Self::new(e.code(), e.to_string())
    }
}

/// Whether `given` equals `expected`, in time independent of where they differ.
pub(crate) fn token_matches(expected: &str, given: &str) -> bool {
    let (a, b) = (expected.as_bytes(), given.as_bytes());
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Proof that the request carried `Authorization: Bearer <dev token>`.
#[derive(Debug)]
struct Authorized;

impl FromRequestParts<AppState> for Authorized {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let given = parts
            .headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split_once(' '))
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map(|(_, token)| token.trim());
        match given {
            Some(token) if token_matches(&state.dev_token, token) => Ok(Self),
            _ => Err(ApiError::new(
                ErrorCode::Unauthorized,
                "missing or wrong token: send the header `Authorization: Bearer <dev token>`",
            )),
        }
    }
}

/// `axum::Json` whose rejections are [`ApiError`]s.
#[derive(Debug)]
struct ApiJson<T>(T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        match Json::<T>::from_request(req, state).await {
            Ok(Json(value)) => Ok(Self(value)),
            Err(rejection) => Err(json_rejection(&rejection)),
        }
    }
}

fn json_rejection(rejection: &JsonRejection) -> ApiError {
    let mut error = ApiError::bad_request(rejection.body_text());
    // Keep the statuses that say something more precise than 400.
    if matches!(rejection.status(), StatusCode::PAYLOAD_TOO_LARGE | StatusCode::UNSUPPORTED_MEDIA_TYPE) {
        error.status = rejection.status();
    }
    error
}

/// `axum::extract::Path<String>` whose rejection is an [`ApiError`].
#[derive(Debug)]
struct RoomPath(String);

impl<S: Send + Sync> FromRequestParts<S> for RoomPath {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        match Path::<String>::from_request_parts(parts, state).await {
            Ok(Path(id)) => Ok(Self(id)),
            Err(rejection) => Err(ApiError::bad_request(rejection.body_text())),
        }
    }
}

#[derive(Serialize)]
struct SegmentView {
    start_ns: u64,
    start_beat: i64,
    tempo_bpm: f64,
    beats_per_bar: u8,
    running: bool,
}

#[derive(Serialize)]
struct TimelineView {
    epoch: u64,
    segments: Vec<SegmentView>,
}

impl From<&wire::Timeline> for TimelineView {
    fn from(t: &wire::Timeline) -> Self {
        Self {
            epoch: t.epoch,
            segments: t
                .segments
                .iter()
                .map(|s| SegmentView {
                    start_ns: s.start.0,
                    start_beat: s.start_beat,
                    tempo_bpm: s.tempo.as_bpm_f64(),
                    beats_per_bar: s.beats_per_bar,
                    running: s.running,
                })
                .collect(),
        }
    }
}

#[derive(Serialize)]
struct Status {
    status: &'static str,
}

async fn ping() -> Response {
    let mut response = Json(Status { status: "ok" }).into_response();
    allow_any_origin(&mut response);
    response
}

#[derive(Serialize)]
struct HashView {
    hex: String,
    not_after_unix: u64,
}

#[derive(Serialize)]
struct CertHashes {
    algorithm: &'static str,
    hashes: Vec<HashView>,
}

async fn cert_hashes(State(state): State<AppState>) -> Response {
    let hashes = state
        .hashes
        .get()
        .iter()
        .map(|h| HashView {
            hex: hex::encode(h.sha256),
            not_after_unix: h.not_after.duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_secs()),
        })
        .collect();
    let mut response = Json(CertHashes { algorithm: "sha-256", hashes }).into_response();
    allow_any_origin(&mut response);
    response.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

/// Pages on any origin may read public, non-secret answers (ping, certificate hashes).
fn allow_any_origin(response: &mut Response) {
    response.headers_mut().insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, HeaderValue::from_static("*"));
}

fn default_tempo_bpm() -> f64 {
    120.0
}

fn default_beats_per_bar() -> i64 {
    4
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateRoom {
    #[serde(default = "default_tempo_bpm")]
    tempo_bpm: f64,
    #[serde(default = "default_beats_per_bar")]
    beats_per_bar: i64,
}

#[derive(Serialize)]
struct RoomCreated {
    room_id: String,
    timeline: TimelineView,
}

/// A meter from JSON: out-of-range integers (including ones that do not fit a byte) are
/// `meter_out_of_range`, not a parse error.
fn meter(beats_per_bar: i64) -> Result<u8, ApiError> {
    let out_of_range =
        || ApiError::new(ErrorCode::MeterOutOfRange, format!("{beats_per_bar} beats per bar is outside 1-16"));
    let meter = u8::try_from(beats_per_bar).map_err(|_| out_of_range())?;
    timeline::check_meter(meter).map_err(|_| out_of_range())
}

async fn create_room(
    State(state): State<AppState>,
    _auth: Authorized,
    ApiJson(body): ApiJson<CreateRoom>,
) -> Result<(StatusCode, Json<RoomCreated>), ApiError> {
    let tempo = timeline::tempo_from_bpm_f64(body.tempo_bpm)?;
    let beats_per_bar = meter(body.beats_per_bar)?;
    let (room_id, timeline) = state.rooms.create(tempo, beats_per_bar)?;
    Ok((StatusCode::CREATED, Json(RoomCreated { room_id, timeline: (&timeline).into() })))
}

#[derive(Serialize)]
struct RoomView {
    room_id: String,
    members: usize,
    timeline: TimelineView,
}

async fn room(State(state): State<AppState>, RoomPath(id): RoomPath) -> Result<Json<RoomView>, ApiError> {
    let handle = state.rooms.get(&id).ok_or(RoomsError::NotFound)?;
    let snapshot = handle.snapshot().await?;
    Ok(Json(RoomView {
        room_id: handle.id().to_owned(),
        members: snapshot.members,
        timeline: (&snapshot.timeline).into(),
    }))
}

#[derive(Serialize)]
struct ChangeApplied {
    epoch: u64,
    effective_at_ns: u64,
    effective_beat: i64,
}

impl From<Applied> for ChangeApplied {
    fn from(a: Applied) -> Self {
        Self { epoch: a.epoch, effective_at_ns: a.effective_at.0, effective_beat: a.effective_beat }
    }
}

async fn change(state: &AppState, id: &str, change: Change) -> Result<Json<ChangeApplied>, ApiError> {
    let handle = state.rooms.get(id).ok_or(RoomsError::NotFound)?;
    let applied = handle.try_change(change).await?;
    Ok(Json(applied.into()))
}

async fn start(
    State(state): State<AppState>,
    _auth: Authorized,
    RoomPath(id): RoomPath,
) -> Result<Json<ChangeApplied>, ApiError> {
    change(&state, &id, Change::Start).await
}

async fn stop(
    State(state): State<AppState>,
    _auth: Authorized,
    RoomPath(id): RoomPath,
) -> Result<Json<ChangeApplied>, ApiError> {
    change(&state, &id, Change::Stop).await
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SetTempo {
    tempo_bpm: f64,
}

async fn set_tempo(
    State(state): State<AppState>,
    _auth: Authorized,
    RoomPath(id): RoomPath,
    ApiJson(body): ApiJson<SetTempo>,
) -> Result<Json<ChangeApplied>, ApiError> {
    let tempo = timeline::tempo_from_bpm_f64(body.tempo_bpm)?;
    change(&state, &id, Change::SetTempo(tempo)).await
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SetMeter {
    beats_per_bar: i64,
}

async fn set_meter(
    State(state): State<AppState>,
    _auth: Authorized,
    RoomPath(id): RoomPath,
    ApiJson(body): ApiJson<SetMeter>,
) -> Result<Json<ChangeApplied>, ApiError> {
    let beats_per_bar = meter(body.beats_per_bar)?;
    change(&state, &id, Change::SetMeter(beats_per_bar)).await
}

async fn metrics(State(state): State<AppState>) -> Response {
    (
        [(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"))],
        state.stats.render_prometheus(),
    )
        .into_response()
}

async fn not_found() -> ApiError {
    let mut e = ApiError::bad_request("no such endpoint");
    e.status = StatusCode::NOT_FOUND;
    e
}

async fn method_not_allowed() -> ApiError {
    let mut e = ApiError::bad_request("this endpoint does not take that method");
    e.status = StatusCode::METHOD_NOT_ALLOWED;
    e
}

#[cfg(test)]
mod tests {
    use axum::body::Body;
    use axum::http::Method;
    use serde_json::{Value, json};
    use tower::ServiceExt as _;

    use super::*;
    use crate::clock::ServerClock;
    use crate::identity::PublishedHash;
    use crate::rooms::RoomsConfig;

    const TOKEN: &str = "test-token-0123456789";

    struct Api {
        router: Router,
        _trigger: crate::shutdown::Trigger,
    }

    fn api(max_rooms: usize) -> Api {
        let (trigger, shutdown) = crate::shutdown::channel();
        let stats = Arc::new(Stats::default());
        let rooms = Rooms::new(
            RoomsConfig { engine: downbeat_engine::room::Config::default(), max_rooms },
            ServerClock::new(),
            stats.clone(),
            shutdown,
        );
        let hashes = Arc::new(PublishedHashes::default());
        hashes.set(vec![PublishedHash {
            sha256: [0xab; 32],
            not_after: SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_000),
        }]);
        let state = AppState { rooms: Arc::new(rooms), hashes, dev_token: TOKEN.into(), stats };
        Api { router: router(state), _trigger: trigger }
    }

    impl Api {
        /// Sends one request; returns the status and the body as JSON (or a string).
        async fn call(
            &self,
            method: Method,
            uri: &str,
            token: Option<&str>,
            body: Option<&str>,
        ) -> (StatusCode, Value) {
            let mut req = Request::builder().method(method).uri(uri);
            if let Some(token) = token {
                req = req.header(header::AUTHORIZATION, format!("Bearer {token}"));
            }
            if body.is_some() {
                req = req.header(header::CONTENT_TYPE, "application/json");
            }
            let req = req.body(body.map_or_else(Body::empty, |b| Body::from(b.to_owned()))).unwrap();
            let response = self.router.clone().oneshot(req).await.unwrap();
            let status = response.status();
            let bytes = axum::body::to_bytes(response.into_body(), 1 << 20).await.unwrap();
            let value = serde_json::from_slice(&bytes)
                .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()));
            (status, value)
        }

        async fn create(&self, body: &str) -> String {
            let (status, v) = self.call(Method::POST, "/api/rooms", Some(TOKEN), Some(body)).await;
            assert_eq!(status, StatusCode::CREATED, "{v}");
            v["room_id"].as_str().unwrap().to_owned()
        }
    }

    /// Asserts an error response: status and code, in the one JSON shape.
    fn check_error(got: (StatusCode, Value), status: StatusCode, code: &str) {
        assert_eq!(got.0, status, "{}", got.1);
        assert_eq!(got.1["error"]["code"], code, "{}", got.1);
        assert!(got.1["error"]["message"].as_str().is_some_and(|m| !m.is_empty()), "{}", got.1);
    }

    #[tokio::test]
    async fn ping_and_cert_hashes() {
        let api = api(10);
        let (status, v) = api.call(Method::GET, "/api/ping", None, None).await;
        assert_eq!((status, v), (StatusCode::OK, json!({"status": "ok"})));
        let (status, v) = api.call(Method::GET, "/api/cert-hashes", None, None).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(v, json!({"algorithm": "sha-256", "hashes": [{"hex": "ab".repeat(32), "not_after_unix": 1000}]}));
    }

    #[tokio::test]
    async fn creating_a_room_needs_the_token() {
        let api = api(10);
        let body = Some(r#"{"tempo_bpm": 120.0, "beats_per_bar": 4}"#);
        check_error(api.call(Method::POST, "/api/rooms", None, body).await, StatusCode::UNAUTHORIZED, "unauthorized");
        check_error(
            api.call(Method::POST, "/api/rooms", Some("wrong"), body).await,
            StatusCode::UNAUTHORIZED,
            "unauthorized",
        );
        // Authentication is checked before the body: no token and bad JSON is still 401.
        check_error(
            api.call(Method::POST, "/api/rooms", None, Some("{")).await,
            StatusCode::UNAUTHORIZED,
            "unauthorized",
        );

        let (status, v) = api.call(Method::POST, "/api/rooms", Some(TOKEN), body).await;
        assert_eq!(status, StatusCode::CREATED, "{v}");
        let id = v["room_id"].as_str().unwrap();
        assert_eq!(id.len(), 10);
        assert_eq!(v["timeline"]["epoch"], 1);
        assert_eq!(v["timeline"]["segments"][0]["tempo_bpm"], 120.0);
        assert_eq!(v["timeline"]["segments"][0]["beats_per_bar"], 4);
        assert_eq!(v["timeline"]["segments"][0]["running"], false);

        let (status, v) = api.call(Method::GET, &format!("/api/rooms/{id}"), None, None).await;
        assert_eq!(status, StatusCode::OK, "{v}");
        assert_eq!(v["room_id"], id);
        assert_eq!(v["members"], 0);
        assert_eq!(v["timeline"]["epoch"], 1);
    }

    #[tokio::test]
    async fn bad_bodies_get_json_errors() {
        let api = api(10);
        let post = |body: &'static str| api.call(Method::POST, "/api/rooms", Some(TOKEN), Some(body));
        check_error(post(r#"{"tempo_bpm": 500}"#).await, StatusCode::BAD_REQUEST, "tempo_out_of_range");
        check_error(post(r#"{"tempo_bpm": 19.9}"#).await, StatusCode::BAD_REQUEST, "tempo_out_of_range");
        check_error(post(r#"{"beats_per_bar": 17}"#).await, StatusCode::BAD_REQUEST, "meter_out_of_range");
        check_error(post(r#"{"beats_per_bar": 1000}"#).await, StatusCode::BAD_REQUEST, "meter_out_of_range");
        check_error(post(r#"{"beats_per_bar": -1}"#).await, StatusCode::BAD_REQUEST, "meter_out_of_range");
        check_error(post("{").await, StatusCode::BAD_REQUEST, "bad_request");
        check_error(post(r#"{"tempo_bpm": "fast"}"#).await, StatusCode::BAD_REQUEST, "bad_request");
        check_error(post(r#"{"tempo": 120}"#).await, StatusCode::BAD_REQUEST, "bad_request");
        // No content type.
        check_error(
            api.call(Method::POST, "/api/rooms", Some(TOKEN), None).await,
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "bad_request",
        );
        // Too large.
        let big = format!(r#"{{"tempo_bpm": 120{}}}"#, " ".repeat(MAX_BODY_BYTES));
        check_error(
            api.call(Method::POST, "/api/rooms", Some(TOKEN), Some(&big)).await,
            StatusCode::PAYLOAD_TOO_LARGE,
            "bad_request",
        );
        // Defaults: 120 BPM, 4/4.
        let (status, v) = post("{}").await;
        assert_eq!(status, StatusCode::CREATED, "{v}");
        assert_eq!(v["timeline"]["segments"][0]["tempo_bpm"], 120.0);
    }

    #[tokio::test]
    async fn unknown_rooms_routes_and_methods() {
        let api = api(10);
        check_error(
            api.call(Method::GET, "/api/rooms/nosuchroom", None, None).await,
            StatusCode::NOT_FOUND,
            "room_not_found",
        );
        check_error(
            api.call(Method::POST, "/api/rooms/nosuchroom/start", Some(TOKEN), None).await,
            StatusCode::NOT_FOUND,
            "room_not_found",
        );
        // The token is checked before the room is looked up: no probing without it.
        check_error(
            api.call(Method::POST, "/api/rooms/nosuchroom/start", None, None).await,
            StatusCode::UNAUTHORIZED,
            "unauthorized",
        );
        check_error(api.call(Method::GET, "/nope", None, None).await, StatusCode::NOT_FOUND, "bad_request");
        check_error(
            api.call(Method::DELETE, "/api/ping", None, None).await,
            StatusCode::METHOD_NOT_ALLOWED,
            "bad_request",
        );
    }

    #[tokio::test]
    async fn start_stop_tempo_meter() {
        let api = api(10);
        let id = api.create(r#"{"tempo_bpm": 100, "beats_per_bar": 3}"#).await;
        let url = |what: &str| format!("/api/rooms/{id}/{what}");

        check_error(api.call(Method::POST, &url("stop"), Some(TOKEN), None).await, StatusCode::CONFLICT, "not_running");
        let (status, v) = api.call(Method::POST, &url("start"), Some(TOKEN), None).await;
        assert_eq!(status, StatusCode::OK, "{v}");
        assert_eq!(v["epoch"], 2);
        assert!(v["effective_at_ns"].as_u64().unwrap() >= 1_500_000_000);
        assert_eq!(v["effective_beat"].as_i64().unwrap() % 3, 0);
        check_error(
            api.call(Method::POST, &url("start"), Some(TOKEN), None).await,
            StatusCode::CONFLICT,
            "already_running",
        );

        let (status, v) = api.call(Method::POST, &url("tempo"), Some(TOKEN), Some(r#"{"tempo_bpm": 130.5}"#)).await;
        assert_eq!(status, StatusCode::OK, "{v}");
        assert_eq!(v["epoch"], 3);
        check_error(
            api.call(Method::POST, &url("tempo"), Some(TOKEN), Some(r#"{"tempo_bpm": 301}"#)).await,
            StatusCode::BAD_REQUEST,
            "tempo_out_of_range",
        );
        let (status, v) = api.call(Method::POST, &url("meter"), Some(TOKEN), Some(r#"{"beats_per_bar": 7}"#)).await;
        assert_eq!(status, StatusCode::OK, "{v}");
        check_error(
            api.call(Method::POST, &url("meter"), Some(TOKEN), Some(r#"{"beats_per_bar": 0}"#)).await,
            StatusCode::BAD_REQUEST,
            "meter_out_of_range",
        );
        check_error(
            api.call(Method::POST, &url("tempo"), Some("bad"), Some(r#"{"tempo_bpm": 100}"#)).await,
            StatusCode::UNAUTHORIZED,
            "unauthorized",
        );

        let (status, v) = api.call(Method::GET, &format!("/api/rooms/{id}"), None, None).await;
        assert_eq!(status, StatusCode::OK);
        assert!(v["timeline"]["segments"].as_array().unwrap().len() >= 2, "{v}");
        assert_eq!(v["timeline"]["epoch"], 4);
    }

    #[tokio::test]
    async fn too_many_rooms_is_429() {
        let api = api(1);
        api.create("{}").await;
        check_error(
            api.call(Method::POST, "/api/rooms", Some(TOKEN), Some("{}")).await,
            StatusCode::TOO_MANY_REQUESTS,
            "too_many_rooms",
        );
    }

    #[tokio::test]
    async fn metrics_are_prometheus_text() {
        let api = api(10);
        api.create("{}").await;
        let (status, v) = api.call(Method::GET, "/metrics", None, None).await;
        assert_eq!(status, StatusCode::OK);
        let text = v.as_str().unwrap();
        assert!(text.contains("# TYPE downbeat_rooms_active gauge\ndownbeat_rooms_active 1\n"), "{text}");
    }

    #[test]
    fn tokens_compare_exactly() {
        assert!(token_matches("abc", "abc"));
        assert!(!token_matches("abc", "abd"));
        assert!(!token_matches("abc", "ab"));
        assert!(!token_matches("abc", ""));
    }
}
