//! The HTTP/1.1 API (axum): health, certificate hashes for pinning, rooms and teacher
//! controls, metrics.
//!
//! Requests authenticate with `Authorization: Bearer <JWT>`; the token's verified tenant and
//! role decide what is allowed, through the same [`authorize`] the control stream uses, and
//! each principal's requests pass its tenant's control rate limit. Every error, including
//! axum's own extractor rejections and unknown routes, is answered as
//! `{"error":{"code":"..","message":".."}}` with a stable code from
//! [`downbeat_protocol::ErrorCode`]; details go to the log, never internals to the client.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use axum::extract::rejection::JsonRejection;
use axum::extract::{DefaultBodyLimit, FromRequest, FromRequestParts, Path, Request, State};
use axum::http::request::Parts;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post, put};
use axum::{Json, Router};
use downbeat_engine::limit::TokenBucket;
use downbeat_engine::timeline;
use downbeat_protocol::{
    self as wire, Applied, Assignment, BoundedString, BoundedVec, Change, ControlOp, ErrorCode, MAX_ASSIGNED_BEATS,
    MAX_ERROR_MESSAGE_LEN, Member, Name, PartName, RoomSettings,
};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tracing::{debug, error};

use crate::auth::{Principal, Tenants};
use crate::authz::{Operation, Refusal, authorize};
use crate::clock::ServerClock;
use crate::identity::PublishedHashes;
use crate::rooms::{RoomHandle, Rooms};
use crate::sel::Sel;
use crate::stats::Stats;
use crate::web::Web;

/// Largest request body accepted.
const MAX_BODY_BYTES: usize = 16 * 1024;
/// Principals whose request buckets are remembered before idle ones are forgotten.
const MAX_TRACKED_PRINCIPALS: usize = 10_000;

/// Per-principal request buckets for the HTTP API.
pub(crate) type RequestLimits = Arc<Mutex<HashMap<(Arc<str>, String), TokenBucket>>>;

/// What the handlers share.
#[derive(Clone, Debug)]
pub(crate) struct AppState {
    pub(crate) rooms: Arc<Rooms>,
    pub(crate) tenants: Arc<Tenants>,
    pub(crate) hashes: Arc<PublishedHashes>,
    pub(crate) stats: Arc<Stats>,
    pub(crate) clock: ServerClock,
    pub(crate) limits: RequestLimits,
    pub(crate) sel: Sel,
    pub(crate) web: Arc<Web>,
}

/// The API's routes, the browser pages and package ([`crate::web`]), with the cross-origin
/// isolation headers on every response.
pub(crate) fn router(state: AppState) -> Router {
    let demo = state.tenants.is_demo();
    Router::new()
        .route("/api/ping", get(ping))
        .route("/api/cert-hashes", get(cert_hashes))
        .route("/api/rooms", post(create_room).get(list_rooms))
        .route("/api/rooms/{code}", get(room).delete(close_room))
        .route("/api/rooms/{code}/start", post(start))
        .route("/api/rooms/{code}/stop", post(stop))
        .route("/api/rooms/{code}/tempo", post(set_tempo))
        .route("/api/rooms/{code}/meter", post(set_meter))
        .route("/api/rooms/{code}/members/{member}", delete(remove_member))
        .route("/api/rooms/{code}/members/{member}/mute", post(mute))
        .route("/api/rooms/{code}/members/{member}/assignment", put(assign))
        .route("/metrics", get(metrics))
        .merge(crate::sel_api::routes())
        .merge(crate::web::routes(demo))
        .fallback(unknown_route)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(state)
        .layer(axum::middleware::map_response(crate::web::isolate))
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

    pub(crate) fn bad_request(message: impl Into<String>) -> Self {
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

    /// Replaces the status (for answers more precise than the code's usual one).
    pub(crate) fn set_status(&mut self, status: StatusCode) {
        self.status = status;
    }
}

/// The HTTP status for each stable code.
pub fn status_for(code: ErrorCode) -> StatusCode {
    match code {
        ErrorCode::Unauthorized | ErrorCode::TokenExpired => StatusCode::UNAUTHORIZED,
        ErrorCode::Forbidden | ErrorCode::WrongTenant => StatusCode::FORBIDDEN,
        ErrorCode::RoomNotFound | ErrorCode::MemberNotFound => StatusCode::NOT_FOUND,
        ErrorCode::RoomClosed => StatusCode::GONE,
        ErrorCode::AlreadyRunning
        | ErrorCode::NotRunning
        | ErrorCode::TooManyPendingChanges
        | ErrorCode::RoomFull
        | ErrorCode::SessionReplaced => StatusCode::CONFLICT,
        ErrorCode::TooManyRooms | ErrorCode::RateLimited | ErrorCode::TooManySessions => StatusCode::TOO_MANY_REQUESTS,
        ErrorCode::ServerBusy | ErrorCode::ShuttingDown | ErrorCode::StoreUnavailable => {
            StatusCode::SERVICE_UNAVAILABLE
        }
        ErrorCode::NoPrompt => StatusCode::CONFLICT,
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

impl From<Refusal> for ApiError {
    fn from(r: Refusal) -> Self {
        Self::new(r.code, r.message)
    }
}

impl From<timeline::TimelineError> for ApiError {
    fn from(e: timeline::TimelineError) -> Self {
        Self::new(e.code(), e.to_string())
    }
}

/// The verified principal of a request that carried `Authorization: Bearer <JWT>` and is
/// within its rate limit.
#[derive(Debug)]
pub(crate) struct Auth(pub(crate) Principal);

impl FromRequestParts<AppState> for Auth {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let given = parts
            .headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split_once(' '))
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map(|(_, token)| token.trim());
        let Some(token) = given else {
            state.stats.refused.inc(ErrorCode::Unauthorized);
            return Err(ApiError::new(
                ErrorCode::Unauthorized,
                "missing token: send the header `Authorization: Bearer <token>`",
            ));
        };
        let principal = state.tenants.verify(token).map_err(|e| {
            state.stats.refused.inc(e.code());
            ApiError::new(e.code(), e.to_string())
        })?;
        if !state.take_request(&principal) {
            state.stats.refused.inc(ErrorCode::RateLimited);
            return Err(ApiError::new(ErrorCode::RateLimited, "too many requests; slow down"));
        }
        Ok(Self(principal))
    }
}

impl AppState {
    /// Takes one request from the principal's bucket (its tenant's control limits).
    fn take_request(&self, who: &Principal) -> bool {
        let Some(tenant) = self.tenants.tenant(&who.tenant) else { return false };
        let limits = tenant.limits();
        let now = self.clock.now().0;
        let mut buckets = self.limits.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if buckets.len() >= MAX_TRACKED_PRINCIPALS {
            // Full buckets are the same as new ones: forgetting them changes nothing.
            buckets.retain(|_, b| b.available(now) < limits.control_burst);
        }
        buckets
            .entry((who.tenant.clone(), who.subject.clone()))
            .or_insert_with(|| TokenBucket::new(limits.controls_per_second, limits.control_burst, now))
            .try_take(now)
    }

    /// Counts a refusal made here and turns it into the response. (Refusals made by a room
    /// task are counted there, for HTTP and the control stream alike.)
    pub(crate) fn refused(&self, r: Refusal) -> ApiError {
        self.stats.refused.inc(r.code);
        r.into()
    }

    /// Whether `who` may do `op` (on no room), counting a refusal.
    pub(crate) fn authorize(&self, who: &Principal, op: Operation<'_>) -> Result<(), ApiError> {
        authorize(who, None, op).map_err(|r| self.refused(r))
    }

    /// The room `code` names for `who`, if `who` may do `op` there.
    pub(crate) fn room_for(&self, who: &Principal, code: &str, op: Operation<'_>) -> Result<RoomHandle, ApiError> {
        let tenant =
            self.tenants.tenant(&who.tenant).ok_or_else(|| ApiError::new(ErrorCode::Unauthorized, "unknown school"))?;
        let room = self.rooms.lookup(tenant, who, code).map_err(|r| self.refused(r))?;
        authorize(who, Some(&room.meta().tenant), op).map_err(|r| self.refused(r))?;
        Ok(room)
    }
}

/// `/api/rooms/{code}/members/{member}` whose rejection is an [`ApiError`].
#[derive(Debug)]
struct MemberPath(String, u64);

impl<S: Send + Sync> FromRequestParts<S> for MemberPath {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        match Path::<(String, u64)>::from_request_parts(parts, state).await {
            Ok(Path((code, member))) => Ok(Self(code, member)),
            Err(rejection) => Err(ApiError::bad_request(rejection.body_text())),
        }
    }
}

/// `axum::Json` whose rejections are [`ApiError`]s.
#[derive(Debug)]
pub(crate) struct ApiJson<T>(pub(crate) T);

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
pub(crate) struct RoomPath(pub(crate) String);

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
    count_in_bars: u8,
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
                    count_in_bars: s.count_in_bars,
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
pub(crate) fn allow_any_origin(response: &mut Response) {
    response.headers_mut().insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, HeaderValue::from_static("*"));
}

fn default_tempo_bpm() -> f64 {
    120.0
}

fn default_beats_per_bar() -> i64 {
    4
}

/// A meter from JSON: out-of-range integers (including ones that do not fit a byte) are
/// `meter_out_of_range`, not a parse error.
fn meter(beats_per_bar: i64) -> Result<u8, ApiError> {
    let out_of_range =
        || ApiError::new(ErrorCode::MeterOutOfRange, format!("{beats_per_bar} beats per bar is outside 1-16"));
    let meter = u8::try_from(beats_per_bar).map_err(|_| out_of_range())?;
    timeline::check_meter(meter).map_err(|_| out_of_range())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateRoom {
    #[serde(default)]
    name: Option<String>,
    #[serde(default = "default_tempo_bpm")]
    tempo_bpm: f64,
    #[serde(default = "default_beats_per_bar")]
    beats_per_bar: i64,
}

#[derive(Serialize)]
struct MemberView {
    id: u64,
    name: String,
    role: &'static str,
    part: Option<String>,
    beats: Vec<u8>,
    muted: bool,
    connected: bool,
    synced: bool,
    rtt_us: u32,
    uncertainty_us: u32,
}

impl MemberView {
    fn new(m: &Member, connected: bool) -> Self {
        Self {
            id: m.id,
            name: m.name.to_string(),
            role: match m.role {
                wire::Role::Teacher => "teacher",
                wire::Role::Student => "student",
            },
            part: m.assignment.part.as_ref().map(ToString::to_string),
            beats: m.assignment.beats.iter().copied().collect(),
            muted: m.muted,
            connected,
            synced: m.sync.synced,
            rtt_us: m.sync.rtt_micros,
            uncertainty_us: m.sync.uncertainty_micros,
        }
    }
}

#[derive(Serialize)]
struct RoomSummary {
    code: String,
    name: String,
    created_unix: u64,
}

impl RoomSummary {
    fn new(room: &RoomHandle) -> Self {
        let meta = room.meta();
        Self {
            code: meta.code.display(),
            name: meta.name.to_string(),
            created_unix: meta.created_at.duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_secs()),
        }
    }
}

#[derive(Serialize)]
struct RoomDetail {
    #[serde(flatten)]
    summary: RoomSummary,
    playout_delay_ms: f64,
    members: Vec<MemberView>,
    timeline: TimelineView,
}

async fn detail(room: &RoomHandle) -> Result<RoomDetail, ApiError> {
    let view = room.view().await?;
    Ok(RoomDetail {
        summary: RoomSummary::new(room),
        playout_delay_ms: view.playout_delay_nanos as f64 / 1e6,
        members: view.members.iter().map(|(m, connected)| MemberView::new(m, *connected)).collect(),
        timeline: (&view.timeline).into(),
    })
}

async fn create_room(
    State(state): State<AppState>,
    Auth(who): Auth,
    ApiJson(body): ApiJson<CreateRoom>,
) -> Result<(StatusCode, Json<RoomDetail>), ApiError> {
    state.authorize(&who, Operation::CreateRoom)?;
    let tempo = timeline::tempo_from_bpm_f64(body.tempo_bpm)?;
    let beats_per_bar = meter(body.beats_per_bar)?;
    let name = body.name.unwrap_or_else(|| format!("{}'s room", who.name));
    let name = Name::new(name.trim().to_owned())
        .ok()
        .filter(|n| !n.is_empty() && !n.chars().any(char::is_control))
        .ok_or_else(|| ApiError::bad_request("a room name is 1 to 64 bytes without control characters"))?;
    let tenant =
        state.tenants.tenant(&who.tenant).ok_or_else(|| ApiError::new(ErrorCode::Unauthorized, "unknown school"))?;
    let room = state.rooms.create(tenant, &who, &RoomSettings { name, tempo, beats_per_bar })?;
    Ok((StatusCode::CREATED, Json(detail(&room).await?)))
}

#[derive(Serialize)]
struct RoomList {
    rooms: Vec<RoomSummary>,
}

async fn list_rooms(State(state): State<AppState>, Auth(who): Auth) -> Result<Json<RoomList>, ApiError> {
    state.authorize(&who, Operation::ListRooms)?;
    let rooms = state.rooms.owned_by(&who.tenant, &who.subject);
    Ok(Json(RoomList { rooms: rooms.iter().map(RoomSummary::new).collect() }))
}

async fn room(
    State(state): State<AppState>,
    Auth(who): Auth,
    RoomPath(code): RoomPath,
) -> Result<Json<RoomDetail>, ApiError> {
    let room = state.room_for(&who, &code, Operation::ViewRoom)?;
    Ok(Json(detail(&room).await?))
}

/// Applies a teacher control through the one authorization function. The room counts its
/// own refusals.
pub(crate) async fn control(
    state: &AppState,
    who: &Principal,
    code: &str,
    op: ControlOp,
) -> Result<Option<Applied>, ApiError> {
    let room = state.room_for(who, code, Operation::Control(&op))?;
    Ok(room.control(op).await?)
}

#[derive(Serialize)]
struct Closed {
    code: String,
    closed: bool,
}

async fn close_room(
    State(state): State<AppState>,
    Auth(who): Auth,
    RoomPath(code): RoomPath,
) -> Result<Json<Closed>, ApiError> {
    let room = state.room_for(&who, &code, Operation::Control(&ControlOp::Close))?;
    room.control(ControlOp::Close).await?;
    Ok(Json(Closed { code: room.meta().code.display(), closed: true }))
}

#[derive(Serialize)]
struct ChangeApplied {
    epoch: u64,
    effective_at_ns: u64,
    effective_beat: i64,
}

async fn change(
    state: &AppState,
    who: &Principal,
    code: &str,
    change: Change,
) -> Result<Json<ChangeApplied>, ApiError> {
    let applied = control(state, who, code, ControlOp::Timeline(change))
        .await?
        .ok_or_else(|| ApiError::new(ErrorCode::Internal, "a timeline change was applied without a boundary"))?;
    Ok(Json(ChangeApplied {
        epoch: applied.epoch,
        effective_at_ns: applied.effective_at.0,
        effective_beat: applied.effective_beat,
    }))
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct Start {
    #[serde(default)]
    count_in_bars: u8,
}

async fn start(
    State(state): State<AppState>,
    Auth(who): Auth,
    RoomPath(code): RoomPath,
    body: axum::body::Bytes,
) -> Result<Json<ChangeApplied>, ApiError> {
    // The body is optional: no body starts without count-in.
    let start: Start = if body.iter().all(u8::is_ascii_whitespace) {
        Start::default()
    } else {
        serde_json::from_slice(&body).map_err(|e| ApiError::bad_request(format!("bad JSON body: {e}")))?
    };
    change(&state, &who, &code, Change::Start { count_in_bars: start.count_in_bars }).await
}

async fn stop(
    State(state): State<AppState>,
    Auth(who): Auth,
    RoomPath(code): RoomPath,
) -> Result<Json<ChangeApplied>, ApiError> {
    change(&state, &who, &code, Change::Stop).await
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SetTempo {
    tempo_bpm: f64,
}

async fn set_tempo(
    State(state): State<AppState>,
    Auth(who): Auth,
    RoomPath(code): RoomPath,
    ApiJson(body): ApiJson<SetTempo>,
) -> Result<Json<ChangeApplied>, ApiError> {
    let tempo = timeline::tempo_from_bpm_f64(body.tempo_bpm)?;
    change(&state, &who, &code, Change::SetTempo(tempo)).await
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SetMeter {
    beats_per_bar: i64,
}

async fn set_meter(
    State(state): State<AppState>,
    Auth(who): Auth,
    RoomPath(code): RoomPath,
    ApiJson(body): ApiJson<SetMeter>,
) -> Result<Json<ChangeApplied>, ApiError> {
    let beats_per_bar = meter(body.beats_per_bar)?;
    change(&state, &who, &code, Change::SetMeter(beats_per_bar)).await
}

#[derive(Serialize)]
pub(crate) struct Done {
    pub(crate) ok: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Mute {
    muted: bool,
}

async fn mute(
    State(state): State<AppState>,
    Auth(who): Auth,
    MemberPath(code, member): MemberPath,
    ApiJson(body): ApiJson<Mute>,
) -> Result<Json<Done>, ApiError> {
    control(&state, &who, &code, ControlOp::Mute { member, muted: body.muted }).await?;
    Ok(Json(Done { ok: true }))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Assign {
    #[serde(default)]
    part: Option<String>,
    #[serde(default)]
    beats: Vec<u8>,
}

async fn assign(
    State(state): State<AppState>,
    Auth(who): Auth,
    MemberPath(code, member): MemberPath,
    ApiJson(body): ApiJson<Assign>,
) -> Result<Json<Done>, ApiError> {
    let part = body
        .part
        .map(|p| PartName::new(p).map_err(|_| ApiError::bad_request("a part name is at most 32 bytes")))
        .transpose()?;
    let beats = BoundedVec::try_from_vec(body.beats)
        .map_err(|_| ApiError::bad_request(format!("at most {MAX_ASSIGNED_BEATS} beats")))?;
    control(&state, &who, &code, ControlOp::Assign { member, assignment: Assignment { part, beats } }).await?;
    Ok(Json(Done { ok: true }))
}

async fn remove_member(
    State(state): State<AppState>,
    Auth(who): Auth,
    MemberPath(code, member): MemberPath,
) -> Result<Json<Done>, ApiError> {
    control(&state, &who, &code, ControlOp::Remove { member }).await?;
    Ok(Json(Done { ok: true }))
}

async fn metrics(State(state): State<AppState>) -> Response {
    (
        [(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"))],
        state.stats.render_prometheus(),
    )
        .into_response()
}

/// A `404 Not Found` answered like an unknown route (code `bad_request`), with `message`.
pub(crate) fn not_found(message: impl Into<String>) -> ApiError {
    let mut e = ApiError::bad_request(message);
    e.status = StatusCode::NOT_FOUND;
    e
}

async fn unknown_route() -> ApiError {
    not_found("no such endpoint")
}

async fn method_not_allowed() -> ApiError {
    let mut e = ApiError::bad_request("this endpoint does not take that method");
    e.status = StatusCode::METHOD_NOT_ALLOWED;
    e
}
