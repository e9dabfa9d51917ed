//! Rooms and teacher controls: create, list, look up, close, timeline changes, mute,
//! assignment and removal, and the owner's co-teachers.

use axum::routing::{delete, get, post, put};
use axum::{Json, Router};
use std::time::SystemTime;

use axum::extract::State;
use axum::http::{Method, StatusCode};
use downbeat_engine::timeline;
use downbeat_protocol::{
    self as wire, Applied, Assignment, BoundedVec, Change, ControlOp, ErrorCode, MAX_ASSIGNED_BEATS, Member, Name,
    PartName, RoomSettings, TextKind, check_text,
};
use serde::{Deserialize, Serialize};

use super::error::ApiError;
use super::extract::{ApiJson, Auth, CoTeacherPath, MemberPath, PeerAddr, RoomPath};
use super::state::AppState;
use crate::auth::Principal;
use crate::authz::Operation;
use crate::cluster::RoomElsewhere;
use crate::codes::JoinCode;
use crate::room::RoomHandle;

/// The room and control routes.
pub(super) fn routes() -> Router<AppState> {
    Router::new()
        .route("/api/rooms", post(create_room).get(list_rooms))
        .route("/api/rooms/{code}", get(room).delete(close_room))
        .route("/api/rooms/{code}/start", post(start))
        .route("/api/rooms/{code}/stop", post(stop))
        .route("/api/rooms/{code}/tempo", post(set_tempo))
        .route("/api/rooms/{code}/meter", post(set_meter))
        .route("/api/rooms/{code}/members/{member}", delete(remove_member))
        .route("/api/rooms/{code}/members/{member}/mute", post(mute))
        .route("/api/rooms/{code}/members/{member}/assignment", put(assign))
        .route("/api/rooms/{code}/co-teachers/{sub}", put(co_teacher).delete(co_teacher))
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
    transport: &'static str,
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
            transport: m.transport.as_str(),
        }
    }
}

#[derive(Serialize)]
struct RoomSummary {
    code: String,
    name: String,
    created_unix: u64,
    /// The node that holds the room (in a cluster).
    #[serde(skip_serializing_if = "Option::is_none")]
    node: Option<String>,
}

impl RoomSummary {
    fn new(room: &RoomHandle, node: Option<String>) -> Self {
        let meta = room.meta();
        Self {
            code: meta.code.display(),
            name: meta.name.to_string(),
            created_unix: meta.created_at.duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_secs()),
            node,
        }
    }

    fn elsewhere(room: RoomElsewhere) -> Self {
        Self {
            code: JoinCode::parse(&room.code).map_or(room.code, |c| c.display()),
            name: room.name,
            created_unix: u64::try_from(room.created_at_ms / 1000).unwrap_or(0),
            node: Some(room.node),
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
    /// The take being recorded now, if any.
    recording: Option<RecordingView>,
    /// The take playing back now, if any.
    playback: Option<PlaybackView>,
}

/// A take playing back in a live room.
#[derive(Serialize)]
struct PlaybackView {
    take: u32,
    starts_at_ns: u64,
    start_beat: i64,
    stops_at_ns: Option<u64>,
}

/// A take running in a live room.
#[derive(Serialize)]
pub(super) struct RecordingView {
    pub(super) take: u32,
    pub(super) started_at_ns: u64,
}

/// `room`'s detail; `node`: the node that holds it, in a cluster.
async fn detail(room: &RoomHandle, node: Option<String>) -> Result<RoomDetail, ApiError> {
    let view = room.view().await?;
    Ok(RoomDetail {
        summary: RoomSummary::new(room, node),
        playout_delay_ms: view.playout_delay_nanos as f64 / 1e6,
        members: view.members.iter().map(|(m, connected)| MemberView::new(m, *connected)).collect(),
        timeline: (&view.timeline).into(),
        recording: view.recording.map(|r| RecordingView { take: r.take, started_at_ns: r.started_at.0 }),
        playback: view.playback.map(|p| PlaybackView {
            take: p.take,
            starts_at_ns: p.starts_at.0,
            start_beat: p.start_beat,
            stops_at_ns: p.stops_at.map(|t| t.0),
        }),
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
        .filter(|n| !n.is_empty() && check_text(n, TextKind::Line).is_ok())
        .ok_or_else(|| ApiError::bad_request("a room name is 1 to 64 bytes on one line without control characters"))?;
    let tenant =
        state.tenants.tenant(&who.tenant).ok_or_else(|| ApiError::new(ErrorCode::Unauthorized, "unknown school"))?;
    let room = state.rooms.open(tenant, &who, &RoomSettings { name, tempo, beats_per_bar }).await?;
    Ok((StatusCode::CREATED, Json(detail(&room, state.rooms.cluster().map(|c| c.node_id())).await?)))
}

#[derive(Serialize)]
struct RoomList {
    rooms: Vec<RoomSummary>,
}

async fn list_rooms(State(state): State<AppState>, Auth(who): Auth) -> Result<Json<RoomList>, ApiError> {
    state.authorize(&who, Operation::ListRooms)?;
    let here = state.rooms.cluster().map(|c| c.node_id());
    let mut rooms: Vec<RoomSummary> =
        state.rooms.run_by(&who.tenant, &who.subject).iter().map(|r| RoomSummary::new(r, here.clone())).collect();
    // In a cluster, the teacher's rooms on the other nodes too, as this node's watch saw them.
    if let Some(cluster) = state.rooms.cluster() {
        let listed: std::collections::HashSet<String> = rooms.iter().map(|r| r.code.clone()).collect();
        rooms.extend(
            cluster
                .rooms_run_by(&who.tenant, &who.subject)
                .into_iter()
                .map(RoomSummary::elsewhere)
                .filter(|r| !listed.contains(&r.code)),
        );
        rooms.sort_by(|a, b| b.created_unix.cmp(&a.created_unix).then_with(|| a.code.cmp(&b.code)));
    }
    Ok(Json(RoomList { rooms }))
}

async fn room(
    State(state): State<AppState>,
    Auth(who): Auth,
    peer: PeerAddr,
    RoomPath(code): RoomPath,
) -> Result<Json<RoomDetail>, ApiError> {
    let room = state.room_for(&who, peer, &code, Operation::ViewRoom)?;
    Ok(Json(detail(&room, state.rooms.cluster().map(|c| c.node_id())).await?))
}

/// Applies a teacher control through the one authorization function. The room counts its
/// own refusals.
pub(crate) async fn control(
    state: &AppState,
    who: &Principal,
    peer: PeerAddr,
    code: &str,
    op: ControlOp,
) -> Result<Option<Applied>, ApiError> {
    let room = state.room_for(who, peer, code, Operation::Control(&op))?;
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
    peer: PeerAddr,
    RoomPath(code): RoomPath,
) -> Result<Json<Closed>, ApiError> {
    let room = state.room_for(&who, peer, &code, Operation::Control(&ControlOp::Close))?;
    room.control(ControlOp::Close).await?;
    Ok(Json(Closed { code: room.meta().code.display(), closed: true }))
}

#[derive(Serialize)]
pub(super) struct ChangeApplied {
    epoch: u64,
    effective_at_ns: u64,
    effective_beat: i64,
}

async fn change(
    state: &AppState,
    who: &Principal,
    peer: PeerAddr,
    code: &str,
    change: Change,
) -> Result<Json<ChangeApplied>, ApiError> {
    let applied = control(state, who, peer, code, ControlOp::Timeline(change))
        .await?
        .ok_or_else(|| ApiError::new(ErrorCode::Internal, "a timeline change was applied without a boundary"))?;
    Ok(Json(ChangeApplied::from(applied)))
}

impl From<Applied> for ChangeApplied {
    fn from(applied: Applied) -> Self {
        Self { epoch: applied.epoch, effective_at_ns: applied.effective_at.0, effective_beat: applied.effective_beat }
    }
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
    peer: PeerAddr,
    RoomPath(code): RoomPath,
    body: axum::body::Bytes,
) -> Result<Json<ChangeApplied>, ApiError> {
    // The body is optional: no body starts without count-in.
    let start: Start = if body.iter().all(u8::is_ascii_whitespace) {
        Start::default()
    } else {
        serde_json::from_slice(&body).map_err(|e| ApiError::bad_request(format!("bad JSON body: {e}")))?
    };
    change(&state, &who, peer, &code, Change::Start { count_in_bars: start.count_in_bars }).await
}

async fn stop(
    State(state): State<AppState>,
    Auth(who): Auth,
    peer: PeerAddr,
    RoomPath(code): RoomPath,
) -> Result<Json<ChangeApplied>, ApiError> {
    change(&state, &who, peer, &code, Change::Stop).await
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SetTempo {
    tempo_bpm: f64,
}

async fn set_tempo(
    State(state): State<AppState>,
    Auth(who): Auth,
    peer: PeerAddr,
    RoomPath(code): RoomPath,
    ApiJson(body): ApiJson<SetTempo>,
) -> Result<Json<ChangeApplied>, ApiError> {
    let tempo = timeline::tempo_from_bpm_f64(body.tempo_bpm)?;
    change(&state, &who, peer, &code, Change::SetTempo(tempo)).await
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SetMeter {
    beats_per_bar: i64,
}

async fn set_meter(
    State(state): State<AppState>,
    Auth(who): Auth,
    peer: PeerAddr,
    RoomPath(code): RoomPath,
    ApiJson(body): ApiJson<SetMeter>,
) -> Result<Json<ChangeApplied>, ApiError> {
    let beats_per_bar = meter(body.beats_per_bar)?;
    change(&state, &who, peer, &code, Change::SetMeter(beats_per_bar)).await
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
    peer: PeerAddr,
    MemberPath(code, member): MemberPath,
    ApiJson(body): ApiJson<Mute>,
) -> Result<Json<Done>, ApiError> {
    control(&state, &who, peer, &code, ControlOp::Mute { member, muted: body.muted }).await?;
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
    peer: PeerAddr,
    MemberPath(code, member): MemberPath,
    ApiJson(body): ApiJson<Assign>,
) -> Result<Json<Done>, ApiError> {
    let part = body
        .part
        .map(|p| PartName::new(p).map_err(|_| ApiError::bad_request("a part name is at most 32 bytes")))
        .transpose()?;
    let beats = BoundedVec::try_from_vec(body.beats)
        .map_err(|_| ApiError::bad_request(format!("at most {MAX_ASSIGNED_BEATS} beats")))?;
    control(&state, &who, peer, &code, ControlOp::Assign { member, assignment: Assignment { part, beats } }).await?;
    Ok(Json(Done { ok: true }))
}

async fn remove_member(
    State(state): State<AppState>,
    Auth(who): Auth,
    peer: PeerAddr,
    MemberPath(code, member): MemberPath,
) -> Result<Json<Done>, ApiError> {
    control(&state, &who, peer, &code, ControlOp::Remove { member }).await?;
    Ok(Json(Done { ok: true }))
}

#[derive(Serialize)]
struct CoTeachers {
    code: String,
    /// Whether this request changed anything (adding a co-teacher twice changes nothing).
    changed: bool,
    co_teachers: Vec<String>,
}

/// `PUT` adds, `DELETE` removes: the owner's co-teachers. Both are idempotent.
async fn co_teacher(
    State(state): State<AppState>,
    Auth(who): Auth,
    peer: PeerAddr,
    method: Method,
    CoTeacherPath(code, sub): CoTeacherPath,
) -> Result<Json<CoTeachers>, ApiError> {
    let room = state.room_for(&who, peer, &code, Operation::ManageCoTeachers)?;
    let changed = room.co_teacher(sub, method == Method::PUT).await.map_err(|r| state.refused(r))?;
    let meta = room.meta();
    Ok(Json(CoTeachers { code: meta.code.display(), changed, co_teachers: meta.co_teachers().clone() }))
}
