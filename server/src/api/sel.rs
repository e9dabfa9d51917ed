//! The SEL part of the HTTP API: reflection prompts, summaries, and one student's
//! export and deletion. Tenant-scoped: the tenant comes from the verified token and every
//! store query is filtered by it, so nobody of one school reads anything of another, whatever
//! ids they send. Within a school, [`crate::authz`] decides: a room's data (live or past) is
//! for the teachers who run or ran it and the school's admins, a student's summary holds only
//! the sessions its reader may read, and export and delete are for admins.
//!
//! Student ids are the pseudonymous token subjects; no name is ever stored or returned here.

use std::time::Duration;

use axum::Json;
use axum::Router;
use axum::extract::{FromRequestParts, Path, State};
use axum::http::request::Parts;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use downbeat_engine::sel::Tally;
use downbeat_protocol::{ControlOp, ErrorCode, PromptText};
use serde::{Deserialize, Serialize};

use super::error::ApiError;
use super::extract::{ApiJson, Auth, PeerAddr, RoomPath, subject};
use super::rooms::{Done, control};
use super::state::AppState;
use crate::authz::{Operation, RoomAccess, authorize, sessions_readable_by};
use crate::sel::store::{
    Counts, ReflectionRow, RoomSessionRow, SessionListing, SessionSel, SessionTeachers, SessionTimeline, StoreError,
};

/// How long an export or delete waits for SEL writes queued before it to commit.
pub(super) const BARRIER_PATIENCE: Duration = Duration::from_secs(5);

/// Most stretches a room session's timeline is cut into (a 45-minute lesson: 45 minutes).
pub(super) const MAX_TIMELINE_BUCKETS: usize = 60;

/// Most room sessions `GET /api/sessions` lists.
pub(super) const MAX_SESSIONS_LISTED: u32 = 50;

pub(crate) fn routes() -> Router<AppState> {
    Router::new()
        .route("/api/rooms/{code}/prompt", post(set_prompt))
        .route("/api/rooms/{code}/sel", get(room_sel))
        .route("/api/sessions", get(list_sessions))
        .route("/api/sessions/{id}/sel", get(session_sel))
        .route("/api/students/{id}", axum::routing::delete(delete_student))
        .route("/api/students/{id}/summary", get(student_summary))
        .route("/api/students/{id}/export", get(export_student))
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        if e.is_retryable() {
            Self::new(ErrorCode::StoreUnavailable, "the SEL database is unavailable right now; try again shortly")
        } else {
            tracing::error!(error = %e, "SEL database error");
            Self::new(ErrorCode::Internal, "internal error")
        }
    }
}

pub(super) fn store_behind() -> ApiError {
    ApiError::new(ErrorCode::StoreUnavailable, "SEL writes are behind; try again shortly")
}

/// A student id from the path: 1 to 128 bytes without control characters.
#[derive(Debug)]
struct StudentPath(String);

impl<S: Send + Sync> FromRequestParts<S> for StudentPath {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        let Path(id) = Path::<String>::from_request_parts(parts, state)
            .await
            .map_err(|rejection| ApiError::bad_request(rejection.body_text()))?;
        Ok(Self(subject(id)?))
    }
}

/// A stored room session as authorization sees it: its school, owner and co-teachers as
/// recorded.
pub(super) struct PastSession<'a> {
    pub(super) tenant: &'a str,
    pub(super) owner: &'a str,
    pub(super) co_teachers: &'a [String],
}

impl RoomAccess for PastSession<'_> {
    fn tenant(&self) -> &str {
        self.tenant
    }

    fn owner(&self) -> &str {
        self.owner
    }

    fn has_co_teacher(&self, subject: &str) -> bool {
        self.co_teachers.iter().any(|s| s == subject)
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SetPrompt {
    text: String,
}

async fn set_prompt(
    State(state): State<AppState>,
    Auth(who): Auth,
    peer: PeerAddr,
    RoomPath(code): RoomPath,
    ApiJson(body): ApiJson<SetPrompt>,
) -> Result<Json<Done>, ApiError> {
    let text = PromptText::new(body.text.trim().to_owned())
        .map_err(|_| ApiError::bad_request("a prompt is at most 200 bytes"))?;
    control(&state, &who, peer, &code, ControlOp::Prompt { text }).await?;
    Ok(Json(Done { ok: true }))
}

/// Counts with what they mean: ratios, mean distance from the beat and the score.
#[derive(Serialize)]
struct Participation {
    #[serde(flatten)]
    counts: Counts,
    /// On-beat notes / timed notes.
    on_beat_ratio: Option<f64>,
    /// Mean distance of timed notes from the nearest beat, in ms.
    mean_offset_ms: Option<f64>,
    /// Mean signed offset of timed notes from the nearest beat, in ms: negative when early
    /// on average, positive when late.
    mean_signed_offset_ms: Option<f64>,
    /// In-part notes / assigned notes.
    in_part_ratio: Option<f64>,
    /// See the README.
    collaboration_score: Option<u8>,
}

impl From<Counts> for Participation {
    fn from(counts: Counts) -> Self {
        let tally = Tally::from(counts);
        Self {
            counts,
            on_beat_ratio: tally.on_beat_ratio(),
            mean_offset_ms: tally.mean_offset_micros().map(|us| us as f64 / 1000.0),
            mean_signed_offset_ms: tally.mean_signed_offset_micros().map(|us| us as f64 / 1000.0),
            in_part_ratio: (tally.assigned > 0).then(|| tally.in_part as f64 / tally.assigned as f64),
            collaboration_score: tally.collaboration_score(),
        }
    }
}

#[derive(Serialize)]
struct StudentSessionView {
    room_session_id: String,
    room_code: String,
    room_name: String,
    started_at_ms: i64,
    ended_at_ms: Option<i64>,
    reflections: i64,
    participation: Participation,
}

#[derive(Serialize)]
struct StudentSummaryView {
    student_id: String,
    sessions_attended: i64,
    reflections: i64,
    participation: Participation,
    sessions: Vec<StudentSessionView>,
}

async fn student_summary(
    State(state): State<AppState>,
    Auth(who): Auth,
    StudentPath(student): StudentPath,
) -> Result<Json<StudentSummaryView>, ApiError> {
    state.authorize(&who, Operation::ReadSel)?;
    let store = state.sel.store();
    let s = match sessions_readable_by(&who) {
        None => store.student_summary(&who.tenant, &student).await?,
        // Only the sessions this teacher ran, by the same rule as a room's data.
        Some(_) => {
            let readable = |t: &SessionTeachers| {
                let session = PastSession { tenant: &who.tenant, owner: &t.teacher_id, co_teachers: &t.co_teachers };
                authorize(&who, Some(&session), Operation::ReadSel).is_ok()
            };
            store.student_summary_where(&who.tenant, &student, readable).await?
        }
    };
    Ok(Json(StudentSummaryView {
        student_id: s.student_id,
        sessions_attended: s.sessions_attended,
        reflections: s.reflections,
        participation: s.counts.into(),
        sessions: s
            .sessions
            .into_iter()
            .map(|x| StudentSessionView {
                room_session_id: x.room_session_id,
                room_code: x.room_code,
                room_name: x.room_name,
                started_at_ms: x.started_at_ms,
                ended_at_ms: x.ended_at_ms,
                reflections: x.reflections,
                participation: x.counts.into(),
            })
            .collect(),
    }))
}

#[derive(Serialize)]
struct StudentInSessionView {
    student_id: String,
    first_joined_at_ms: Option<i64>,
    reflections: i64,
    participation: Participation,
}

/// One stretch of a room session's timeline.
#[derive(Serialize)]
struct BucketView {
    /// Where it starts and ends, in ms from the session's start.
    from_ms: i64,
    to_ms: i64,
    /// Students whose notes were counted in it.
    students: i64,
    participation: Participation,
}

/// A room session's participation over time, for a chart.
#[derive(Serialize)]
struct TimelineView {
    bucket_ms: i64,
    buckets: Vec<BucketView>,
}

impl From<SessionTimeline> for TimelineView {
    fn from(t: SessionTimeline) -> Self {
        let bucket_ms = t.bucket_ms;
        Self {
            bucket_ms,
            buckets: t
                .buckets
                .into_iter()
                .map(|b| BucketView {
                    from_ms: b.from_ms,
                    to_ms: b.from_ms.saturating_add(bucket_ms),
                    students: b.students,
                    participation: b.counts.into(),
                })
                .collect(),
        }
    }
}

impl TimelineView {
    /// No notes counted yet.
    fn empty() -> Self {
        Self { bucket_ms: crate::sel::store::timeline_bucket_ms(0, MAX_TIMELINE_BUCKETS), buckets: Vec::new() }
    }
}

#[derive(Serialize)]
struct SessionSelView {
    session: RoomSessionRow,
    co_teachers: Vec<String>,
    students: Vec<StudentInSessionView>,
    reflections: Vec<ReflectionRow>,
    /// The class's participation over the session, in stretches of one width.
    timeline: TimelineView,
}

impl SessionSelView {
    fn new(s: SessionSel, timeline: Option<SessionTimeline>) -> Self {
        Self {
            timeline: timeline.map_or_else(TimelineView::empty, TimelineView::from),
            session: s.session,
            co_teachers: s.co_teachers,
            students: s
                .students
                .into_iter()
                .map(|x| StudentInSessionView {
                    student_id: x.student_id,
                    first_joined_at_ms: x.first_joined_at_ms,
                    reflections: x.reflections,
                    participation: x.counts.into(),
                })
                .collect(),
            reflections: s.reflections,
        }
    }
}

/// The live room's session (as committed so far: participation lags by about a second).
async fn room_sel(
    State(state): State<AppState>,
    Auth(who): Auth,
    peer: PeerAddr,
    RoomPath(code): RoomPath,
) -> Result<Json<SessionSelView>, ApiError> {
    let room = state.room_for(&who, peer, &code, Operation::ReadSel)?;
    let meta = room.meta();
    let store = state.sel.store();
    let session = store.session_sel(&who.tenant, &meta.sel_id).await?;
    // The live room's co-teachers, which the store may hold a moment later.
    let co_teachers = meta.co_teachers().clone();
    let Some(s) = session else {
        // Created a moment ago: its row is not committed yet.
        let session = meta.session_row();
        let (students, reflections, timeline) = (Vec::new(), Vec::new(), TimelineView::empty());
        return Ok(Json(SessionSelView { session, co_teachers, students, reflections, timeline }));
    };
    let timeline = store.session_timeline(&who.tenant, &meta.sel_id, MAX_TIMELINE_BUCKETS).await?;
    Ok(Json(SessionSelView { co_teachers, ..SessionSelView::new(s, timeline) }))
}

/// A past or live room session by its id (from a student's summary or the list of sessions):
/// for the teachers who ran it, as recorded with it, and the school's admins. With its
/// timeline (read after the rest: for a live session it may hold a flush more).
async fn session_sel(
    State(state): State<AppState>,
    Auth(who): Auth,
    RoomPath(id): RoomPath,
) -> Result<Json<SessionSelView>, ApiError> {
    state.authorize(&who, Operation::ReadSel)?;
    let store = state.sel.store();
    let no_such_session = || {
        let mut e = ApiError::bad_request("no room session of your school has this id");
        e.set_status(StatusCode::NOT_FOUND);
        e
    };
    let Some(s) = store.session_sel(&who.tenant, &id).await? else {
        return Err(no_such_session());
    };
    let session =
        PastSession { tenant: &s.session.tenant_id, owner: &s.session.teacher_id, co_teachers: &s.co_teachers };
    authorize(&who, Some(&session), Operation::ReadSel).map_err(|r| state.refused(r))?;
    let timeline = store.session_timeline(&who.tenant, &id, MAX_TIMELINE_BUCKETS).await?;
    Ok(Json(SessionSelView::new(s, timeline)))
}

#[derive(Serialize)]
struct SessionListingView {
    #[serde(flatten)]
    session: RoomSessionRow,
    co_teachers: Vec<String>,
    /// Students who joined.
    students: i64,
    /// Notes they played.
    notes: i64,
}

#[derive(Serialize)]
struct SessionsView {
    sessions: Vec<SessionListingView>,
}

/// The room sessions the caller may read, newest first (at most [`MAX_SESSIONS_LISTED`]):
/// a teacher's own (owned or co-taught, as recorded with each), every one of the school for
/// its admins. Ids for `GET /api/sessions/{id}/sel`.
async fn list_sessions(State(state): State<AppState>, Auth(who): Auth) -> Result<Json<SessionsView>, ApiError> {
    state.authorize(&who, Operation::ReadSel)?;
    let listed = state.sel.store().sessions(&who.tenant, sessions_readable_by(&who), MAX_SESSIONS_LISTED).await?;
    // The store picked them by the same rule; each is still checked as a room's data is.
    let readable = |l: &SessionListing| {
        let session =
            PastSession { tenant: &l.session.tenant_id, owner: &l.session.teacher_id, co_teachers: &l.co_teachers };
        authorize(&who, Some(&session), Operation::ReadSel).is_ok()
    };
    let sessions = listed
        .into_iter()
        .filter(readable)
        .map(|l| SessionListingView {
            session: l.session,
            co_teachers: l.co_teachers,
            students: l.students,
            notes: l.notes,
        })
        .collect();
    Ok(Json(SessionsView { sessions }))
}

/// Everything stored about one student, as a JSON download. Waits for writes already queued,
/// so the export is complete as of the request.
async fn export_student(
    State(state): State<AppState>,
    Auth(who): Auth,
    StudentPath(student): StudentPath,
) -> Result<Response, ApiError> {
    state.authorize(&who, Operation::ManageStudentData)?;
    if !state.sel.barrier(BARRIER_PATIENCE).await {
        return Err(store_behind());
    }
    let export = state.sel.store().export_student(&who.tenant, &student).await?;
    tracing::info!(rows = export.participation.len() + export.reflections.len(), "student data exported");
    let mut response = Json(export).into_response();
    response.headers_mut().insert(
        header::CONTENT_DISPOSITION,
        HeaderValue::from_static("attachment; filename=\"downbeat-student-export.json\""),
    );
    Ok(response)
}

#[derive(Serialize)]
struct DeletedView {
    deleted: bool,
    participation: u64,
    reflections: u64,
    recorded_notes: u64,
}

/// Hard-deletes every row about one student. Live rooms first drop what they hold in memory
/// about them and everything already queued is committed, so nothing reappears afterwards.
async fn delete_student(
    State(state): State<AppState>,
    Auth(who): Auth,
    StudentPath(student): StudentPath,
) -> Result<Json<DeletedView>, ApiError> {
    state.authorize(&who, Operation::ManageStudentData)?;
    state.rooms.forget_student(&who.tenant, &student).await;
    if !state.sel.barrier(BARRIER_PATIENCE).await {
        return Err(store_behind());
    }
    let deleted = state.sel.store().delete_student(&who.tenant, &student).await?;
    tracing::info!(
        participation = deleted.participation,
        reflections = deleted.reflections,
        recorded_notes = deleted.recorded_notes,
        "student data deleted"
    );
    Ok(Json(DeletedView {
        deleted: true,
        participation: deleted.participation,
        reflections: deleted.reflections,
        recorded_notes: deleted.recorded_notes,
    }))
}
