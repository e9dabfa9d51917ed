//! Recordings: a room's teachers start and stop a take, list a room session's takes and
//! download one as a Standard MIDI File ([`crate::sel::midi`]).
//!
//! A take is children's data (who played each note), so reading one is [`Operation::ReadSel`]
//! on its room session: the teachers who ran it and the school's admins, never another
//! school (every query is filtered by the token's tenant). Lists and downloads wait for the
//! SEL writes already queued, so a take just stopped is there whole.

use axum::Json;
use axum::Router;
use axum::extract::{FromRequestParts, Path, State};
use axum::http::request::Parts;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use downbeat_engine::timeline;
use downbeat_protocol::{ControlOp, ErrorCode};
use serde::{Deserialize, Serialize};

use super::error::ApiError;
use super::extract::{ApiJson, Auth, PeerAddr, RoomPath};
use super::rooms::{ChangeApplied, Done, RecordingView, control};
use super::sel::{BARRIER_PATIENCE, PastSession, store_behind};
use super::state::AppState;
use crate::auth::Principal;
use crate::authz::{Operation, authorize};
use crate::sel::midi::take_to_midi;
use crate::sel::store::TakeSummary;

pub(crate) fn routes() -> Router<AppState> {
    Router::new()
        .route("/api/rooms/{code}/recording", post(start).delete(stop))
        .route("/api/rooms/{code}/playback", post(play).delete(stop_playback))
        .route("/api/rooms/{code}/recordings", get(room_recordings))
        .route("/api/sessions/{id}/recordings", get(session_recordings))
        .route("/api/sessions/{id}/recordings/{file}", get(download))
}

/// Starts recording the room; everyone in it sees it runs.
async fn start(
    State(state): State<AppState>,
    Auth(who): Auth,
    peer: PeerAddr,
    RoomPath(code): RoomPath,
) -> Result<(StatusCode, Json<RecordingView>), ApiError> {
    control(&state, &who, peer, &code, ControlOp::StartRecording).await?;
    let room = state.room_for(&who, peer, &code, Operation::ViewRoom)?;
    let view = room.view().await?;
    // Stopped again in the meantime (by another teacher): nothing to show, but it did start.
    let recording = view
        .recording
        .ok_or_else(|| ApiError::new(ErrorCode::NotRecording, "the recording was stopped again at once"))?;
    Ok((StatusCode::CREATED, Json(RecordingView { take: recording.take, started_at_ns: recording.started_at.0 })))
}

/// Stops the recording.
async fn stop(
    State(state): State<AppState>,
    Auth(who): Auth,
    peer: PeerAddr,
    RoomPath(code): RoomPath,
) -> Result<Json<Done>, ApiError> {
    control(&state, &who, peer, &code, ControlOp::StopRecording).await?;
    Ok(Json(Done { ok: true }))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Play {
    take: u32,
    #[serde(default)]
    tempo_bpm: Option<f64>,
}

/// Plays a take of this room session back into the room from the next bar boundary.
async fn play(
    State(state): State<AppState>,
    Auth(who): Auth,
    peer: PeerAddr,
    RoomPath(code): RoomPath,
    ApiJson(body): ApiJson<Play>,
) -> Result<Json<ChangeApplied>, ApiError> {
    let tempo = body.tempo_bpm.map(timeline::tempo_from_bpm_f64).transpose()?;
    let op = ControlOp::PlayRecording { take: body.take, tempo };
    let applied = control(&state, &who, peer, &code, op)
        .await?
        .ok_or_else(|| ApiError::new(ErrorCode::Internal, "a playback started without a boundary"))?;
    Ok(Json(applied.into()))
}

/// Stops the playback at the next bar boundary.
async fn stop_playback(
    State(state): State<AppState>,
    Auth(who): Auth,
    peer: PeerAddr,
    RoomPath(code): RoomPath,
) -> Result<Json<ChangeApplied>, ApiError> {
    let applied = control(&state, &who, peer, &code, ControlOp::StopPlayback)
        .await?
        .ok_or_else(|| ApiError::new(ErrorCode::Internal, "a playback stopped without a boundary"))?;
    Ok(Json(applied.into()))
}

#[derive(Serialize)]
struct TakeView {
    take: i64,
    started_at_ms: i64,
    stopped_at_ms: Option<i64>,
    length_ms: Option<i64>,
    notes: i64,
    /// Where the MIDI file is.
    midi: String,
}

#[derive(Serialize)]
struct Recordings {
    room_session_id: String,
    recordings: Vec<TakeView>,
}

impl Recordings {
    fn new(room_session_id: String, takes: Vec<TakeSummary>) -> Self {
        let recordings = takes
            .into_iter()
            .map(|t| TakeView {
                take: t.recording.take,
                started_at_ms: t.recording.started_at_ms,
                stopped_at_ms: t.recording.stopped_at_ms,
                length_ms: t.recording.length_nanos.map(|n| n / 1_000_000),
                notes: t.notes,
                midi: format!("/api/sessions/{room_session_id}/recordings/{}.mid", t.recording.take),
            })
            .collect();
        Self { room_session_id, recordings }
    }
}

/// The live room's takes so far.
async fn room_recordings(
    State(state): State<AppState>,
    Auth(who): Auth,
    peer: PeerAddr,
    RoomPath(code): RoomPath,
) -> Result<Json<Recordings>, ApiError> {
    let room = state.room_for(&who, peer, &code, Operation::ReadSel)?;
    let id = room.meta().sel_id.clone();
    if !state.sel.barrier(BARRIER_PATIENCE).await {
        return Err(store_behind());
    }
    let takes = state.sel.store().recordings(&who.tenant, &id).await?;
    Ok(Json(Recordings::new(id, takes)))
}

/// May `who` read the room session `id` of their school? Not found (404) when it does not
/// exist there, so another school's ids say nothing.
async fn readable_session(state: &AppState, who: &Principal, id: &str) -> Result<(), ApiError> {
    state.authorize(who, Operation::ReadSel)?;
    let Some(s) = state.sel.store().session_sel(&who.tenant, id).await? else {
        return Err(not_found());
    };
    let session =
        PastSession { tenant: &s.session.tenant_id, owner: &s.session.teacher_id, co_teachers: &s.co_teachers };
    authorize(who, Some(&session), Operation::ReadSel).map_err(|r| state.refused(r))
}

fn not_found() -> ApiError {
    ApiError::new(ErrorCode::RecordingNotFound, "no recording of your school has this id")
}

/// A past or live room session's takes.
async fn session_recordings(
    State(state): State<AppState>,
    Auth(who): Auth,
    RoomPath(id): RoomPath,
) -> Result<Json<Recordings>, ApiError> {
    if !state.sel.barrier(BARRIER_PATIENCE).await {
        return Err(store_behind());
    }
    readable_session(&state, &who, &id).await?;
    let takes = state.sel.store().recordings(&who.tenant, &id).await?;
    Ok(Json(Recordings::new(id, takes)))
}

/// `/api/sessions/{id}/recordings/{take}.mid`.
struct TakePath {
    session: String,
    take: i64,
}

impl<S: Send + Sync> FromRequestParts<S> for TakePath {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        let Path((session, file)) = Path::<(String, String)>::from_request_parts(parts, state)
            .await
            .map_err(|rejection| ApiError::bad_request(rejection.body_text()))?;
        let take = file
            .strip_suffix(".mid")
            .and_then(|n| n.parse::<i64>().ok())
            .filter(|n| *n > 0)
            .ok_or_else(|| ApiError::bad_request("a recording is downloaded as {take}.mid, e.g. 1.mid"))?;
        Ok(Self { session, take })
    }
}

/// One take as a Standard MIDI File.
async fn download(State(state): State<AppState>, Auth(who): Auth, path: TakePath) -> Result<Response, ApiError> {
    if !state.sel.barrier(BARRIER_PATIENCE).await {
        return Err(store_behind());
    }
    readable_session(&state, &who, &path.session).await?;
    let take = state.sel.store().recording(&who.tenant, &path.session, path.take).await?.ok_or_else(not_found)?;
    let bytes = take_to_midi(&take);
    let mut response = bytes.into_response();
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("audio/midi"));
    let disposition = format!("attachment; filename=\"downbeat-take-{}.mid\"", path.take);
    if let Ok(value) = HeaderValue::from_str(&disposition) {
        headers.insert(header::CONTENT_DISPOSITION, value);
    }
    Ok(response)
}
