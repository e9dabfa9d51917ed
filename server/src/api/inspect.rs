//! The operators' inspector (`/api/inspect`, the page `/inspect`): the server, its schools,
//! their live rooms and the sessions in them, the server's counters, and actions on a room:
//! observe its events, send a test note or a test prompt, close it, end one session.
//!
//! Only an operator's token opens it ([`Operator`]), and an operator's token opens nothing
//! else. What it shows of a room is members by id, role, part and transport figures, never
//! a child's name, subject or words; reflections and the SEL feed never reach it.
//!
//! **Every action is audited before it is done**: its row (who, what, which room, when) is
//! committed to the store first, and an action whose row cannot be written is not done
//! (`store_unavailable`). Its outcome (`ok` or the refusal's code) is added once it ended.

use std::convert::Infallible;
use std::time::{Duration, SystemTime};

use axum::body::{Body, Bytes};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use downbeat_protocol::{ControlOp, ErrorCode, PromptText};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tracing::{info, warn};

use super::error::ApiError;
use super::extract::{ApiJson, Operator};
use super::state::AppState;
use crate::auth::Principal;
use crate::room::{MAX_OBSERVERS, OBSERVER_QUEUE, RoomHandle, RoomInspection};
use crate::sel::store::AuditEntry;
use crate::sel::unix_ms;

/// Audit entries the inspector shows by default, and at most.
const AUDIT_DEFAULT: u32 = 50;
const AUDIT_MAX: u32 = 500;

/// How often an observer's stream says it is alive while the room is quiet.
const OBSERVER_HEARTBEAT: Duration = Duration::from_secs(5);

/// What a test prompt asks when the operator gives no text.
const DEFAULT_TEST_PROMPT: &str = "Test prompt from the server team: no need to answer.";

pub(super) fn routes() -> Router<AppState> {
    Router::new()
        .route("/api/inspect", get(overview))
        .route("/api/inspect/metrics", get(metrics))
        .route("/api/inspect/audit", get(audit_log))
        .route("/api/inspect/rooms/{tenant}/{code}", delete(close_room))
        .route("/api/inspect/rooms/{tenant}/{code}/events", get(observe))
        .route("/api/inspect/rooms/{tenant}/{code}/test-note", post(test_note))
        .route("/api/inspect/rooms/{tenant}/{code}/test-prompt", post(test_prompt))
        .route("/api/inspect/rooms/{tenant}/{code}/sessions/{session}", delete(end_session))
}

#[derive(Serialize)]
struct Overview {
    node: Node,
    /// In a cluster, every node whose lease holds (this one among them); otherwise empty.
    cluster: Vec<ClusterNode>,
    tenants: Vec<TenantView>,
    rooms: Vec<RoomView>,
}

/// A node of the cluster, as the directory lists it.
#[derive(Serialize)]
struct ClusterNode {
    id: String,
    http_url: String,
    webtransport_url: String,
    /// Whether it is the node answering.
    this: bool,
    /// How long its entry holds without a renewal, in ms.
    lease_left_ms: i64,
    /// Its wall clock against the answering node's, as measured (none for itself, or before
    /// the first measurement).
    clock: Option<crate::cluster::ClockOffset>,
}

/// This server (one node today).
#[derive(Serialize)]
struct Node {
    id: String,
    version: &'static str,
    uptime_secs: u64,
    sessions_active: u64,
    rooms_active: u64,
}

#[derive(Serialize)]
struct TenantView {
    id: String,
    name: String,
    rooms: usize,
    /// Sessions seated in its rooms now.
    sessions: usize,
    max_rooms: u32,
    max_sessions: u32,
    /// Its rooms and sessions on the cluster's other nodes, as their entries last said
    /// (counted against its limits there and here); zero without a cluster.
    rooms_elsewhere: u32,
    sessions_elsewhere: u32,
}

#[derive(Serialize)]
struct RoomView {
    tenant: String,
    code: String,
    /// The room's name, as its teacher gave it.
    name: String,
    created_unix_ms: i64,
    #[serde(flatten)]
    inspection: RoomInspection,
}

/// The node's name: the host's name, as operators know their machines.
fn node_id() -> String {
    crate::host_name().unwrap_or_else(|| "this server".to_owned())
}

async fn overview(State(state): State<AppState>, Operator(_who): Operator) -> Result<Json<Overview>, ApiError> {
    let mut rooms = Vec::new();
    for room in state.rooms.all() {
        // A room that closed meanwhile is simply not listed.
        if let Ok(inspection) = room.inspect().await {
            let meta = room.meta();
            rooms.push(RoomView {
                tenant: meta.tenant.to_string(),
                code: meta.code.display(),
                name: meta.name.to_string(),
                created_unix_ms: unix_ms(meta.created_at),
                inspection,
            });
        }
    }
    let tenants = state
        .tenants
        .iter()
        .map(|t| {
            let own = rooms.iter().filter(|r| r.tenant == t.id());
            let sessions = own.clone().map(|r| r.inspection.seats.iter().filter(|s| s.session.is_some()).count()).sum();
            let elsewhere = state.rooms.cluster().map(|c| c.elsewhere(t.id())).unwrap_or_default();
            TenantView {
                rooms_elsewhere: elsewhere.rooms,
                sessions_elsewhere: elsewhere.sessions,
                id: t.id().to_owned(),
                name: t.name().to_owned(),
                rooms: own.count(),
                sessions,
                max_rooms: t.limits().max_rooms,
                max_sessions: t.limits().max_sessions,
            }
        })
        .collect();
    let node = Node {
        id: state.rooms.cluster().map_or_else(node_id, |c| c.node_id()),
        version: env!("CARGO_PKG_VERSION"),
        // The server clock starts with the server.
        uptime_secs: state.clock.now().0 / 1_000_000_000,
        sessions_active: state.stats.sessions_active.get(),
        rooms_active: state.stats.rooms_active.get(),
    };
    let cluster = match state.rooms.cluster() {
        Some(cluster) => {
            let now = crate::sel::unix_ms_now();
            let this = cluster.node_id();
            let clocks = cluster.clock_offsets();
            cluster
                .nodes()
                .into_iter()
                .map(|n| ClusterNode {
                    clock: clocks.iter().find(|c| c.node == n.id).cloned(),
                    this: n.id == this,
                    lease_left_ms: n.lease_until_ms - now,
                    id: n.id,
                    http_url: n.http_url,
                    webtransport_url: n.webtransport_url,
                })
                .collect()
        }
        None => Vec::new(),
    };
    Ok(Json(Overview { node, cluster, tenants, rooms }))
}

/// The server's counters, as `/metrics` gives them (whether or not `/metrics` is served on
/// this listener).
async fn metrics(State(state): State<AppState>, Operator(_who): Operator) -> Response {
    super::status::prometheus(&state)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AuditQuery {
    limit: Option<u32>,
}

#[derive(Serialize)]
struct AuditLog {
    entries: Vec<AuditEntry>,
}

async fn audit_log(
    State(state): State<AppState>,
    Operator(_who): Operator,
    query: Result<Query<AuditQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<AuditLog>, ApiError> {
    let Query(query) = query.map_err(|e| ApiError::bad_request(e.body_text()))?;
    let limit = query.limit.unwrap_or(AUDIT_DEFAULT);
    if !(1..=AUDIT_MAX).contains(&limit) {
        return Err(ApiError::bad_request(format!("limit is 1 to {AUDIT_MAX}")));
    }
    Ok(Json(AuditLog { entries: state.sel.store().audit_log(limit).await? }))
}

/// `/api/inspect/rooms/{tenant}/{code}`: a school's id and a join code.
#[derive(Deserialize)]
struct RoomAt {
    tenant: String,
    code: String,
}

impl RoomAt {
    /// The live room, or `room_not_found`.
    fn find(&self, state: &AppState) -> Result<RoomHandle, ApiError> {
        state
            .rooms
            .find(&self.tenant, &self.code)
            .ok_or_else(|| ApiError::new(ErrorCode::RoomNotFound, "no live room has this school and code"))
    }
}

/// An action about to be done, written to the audit log first.
struct Audited {
    id: String,
}

impl Audited {
    /// Writes the action's row; refuses the action if it cannot be written.
    async fn begin(
        state: &AppState,
        who: &Principal,
        action: &str,
        at: &RoomAt,
        target: Option<String>,
    ) -> Result<Self, ApiError> {
        let mut id = [0_u8; 16];
        rand::RngCore::fill_bytes(&mut rand::rng(), &mut id);
        let entry = AuditEntry {
            id: hex::encode(id),
            at_ms: unix_ms(SystemTime::now()),
            operator_id: who.subject.clone(),
            operator_name: who.name.clone(),
            action: action.to_owned(),
            tenant_id: Some(at.tenant.clone()),
            room_code: Some(at.code.clone()),
            target,
            outcome: None,
        };
        if let Err(e) = state.sel.store().audit(&entry).await {
            warn!(error = %e, action, "the audit log cannot be written; the action is not done");
            return Err(ApiError::new(
                ErrorCode::StoreUnavailable,
                "the audit log cannot be written right now, so nothing was done; try again shortly",
            ));
        }
        info!(operator = %who.subject, action, tenant = %at.tenant, room = %at.code, "operator action");
        Ok(Self { id: entry.id })
    }

    /// Adds the outcome to the row and hands `result` back.
    async fn end<T>(self, state: &AppState, result: Result<T, ApiError>) -> Result<T, ApiError> {
        let outcome = match &result {
            Ok(_) => "ok",
            Err(e) => e.code().as_str(),
        };
        if let Err(e) = state.sel.store().audit_outcome(&self.id, outcome).await {
            warn!(error = %e, audit = %self.id, outcome, "an audited action's outcome was not written");
        }
        result
    }
}

#[derive(Serialize)]
struct Done {
    ok: bool,
}

async fn close_room(
    State(state): State<AppState>,
    Operator(who): Operator,
    Path(at): Path<RoomAt>,
) -> Result<Json<Done>, ApiError> {
    let audit = Audited::begin(&state, &who, "close_room", &at, None).await?;
    let result = async {
        at.find(&state)?.control(ControlOp::Close).await?;
        Ok(Json(Done { ok: true }))
    };
    audit.end(&state, result.await).await
}

#[derive(Deserialize)]
struct SessionAt {
    tenant: String,
    code: String,
    session: u64,
}

async fn end_session(
    State(state): State<AppState>,
    Operator(who): Operator,
    path: Result<Path<SessionAt>, axum::extract::rejection::PathRejection>,
) -> Result<Json<Done>, ApiError> {
    let Path(SessionAt { tenant, code, session }) = path.map_err(|e| ApiError::bad_request(e.body_text()))?;
    let at = RoomAt { tenant, code };
    let audit = Audited::begin(&state, &who, "end_session", &at, Some(format!("session {session}"))).await?;
    let result = async {
        if at.find(&state)?.end_session(session).await? {
            Ok(Json(Done { ok: true }))
        } else {
            Err(ApiError::new(ErrorCode::MemberNotFound, "no session with this id is seated in the room"))
        }
    };
    audit.end(&state, result.await).await
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TestNote {
    /// MIDI note number (default 72, the C above middle C).
    #[serde(default = "default_midi")]
    midi: u8,
    /// General MIDI program (default 0, a piano).
    #[serde(default)]
    instrument: u8,
}

const fn default_midi() -> u8 {
    72
}

#[derive(Serialize)]
struct NoteSent {
    /// When every member sounds it (Unix ms, the server's wall clock).
    sounds_at_unix_ms: i64,
}

async fn test_note(
    State(state): State<AppState>,
    Operator(who): Operator,
    Path(at): Path<RoomAt>,
    ApiJson(note): ApiJson<TestNote>,
) -> Result<Json<NoteSent>, ApiError> {
    let target = Some(format!("note {} on program {}", note.midi, note.instrument));
    let audit = Audited::begin(&state, &who, "test_note", &at, target).await?;
    let result = async {
        let sounds_at = at.find(&state)?.test_note(note.midi, note.instrument).await?;
        Ok(Json(NoteSent { sounds_at_unix_ms: state.clock.unix_ms_of(sounds_at) }))
    };
    audit.end(&state, result.await).await
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TestPrompt {
    #[serde(default)]
    text: Option<String>,
}

async fn test_prompt(
    State(state): State<AppState>,
    Operator(who): Operator,
    Path(at): Path<RoomAt>,
    ApiJson(prompt): ApiJson<TestPrompt>,
) -> Result<Json<Done>, ApiError> {
    let text = prompt.text.as_deref().map_or(DEFAULT_TEST_PROMPT, str::trim);
    let text = PromptText::new(text.to_owned()).map_err(|_| ApiError::bad_request("a prompt is at most 200 bytes"))?;
    let audit = Audited::begin(&state, &who, "test_prompt", &at, None).await?;
    let result = async {
        at.find(&state)?.control(ControlOp::Prompt { text }).await?;
        Ok(Json(Done { ok: true }))
    };
    audit.end(&state, result.await).await
}

/// The room's events as they happen, one JSON object a line (`application/x-ndjson`): first
/// the room as it is (`observing`), then timeline, presence (by member id), recording,
/// playback, prompt and note events, `alive` every few seconds while it is quiet, and
/// `missed` when this reader fell behind. Ends when the room closes.
async fn observe(
    State(state): State<AppState>,
    Operator(who): Operator,
    Path(at): Path<RoomAt>,
) -> Result<Response, ApiError> {
    let audit = Audited::begin(&state, &who, "observe", &at, None).await?;
    let (tx, rx) = mpsc::channel(OBSERVER_QUEUE);
    let result = async {
        if at.find(&state)?.observe(tx).await? {
            Ok(())
        } else {
            Err(ApiError::new(
                ErrorCode::ServerBusy,
                format!("this room has {MAX_OBSERVERS} observers already; try again once one leaves"),
            ))
        }
    };
    audit.end(&state, result.await).await?;
    let heartbeat = tokio::time::interval_at(tokio::time::Instant::now() + OBSERVER_HEARTBEAT, OBSERVER_HEARTBEAT);
    let lines = futures_util::stream::unfold((rx, heartbeat), |(mut rx, mut heartbeat)| async move {
        let event = tokio::select! {
            event = rx.recv() => event?,
            _ = heartbeat.tick() => json!({ "event": "alive" }),
        };
        Some((Ok::<_, Infallible>(line(&event)), (rx, heartbeat)))
    });
    Ok((
        [
            (header::CONTENT_TYPE, HeaderValue::from_static("application/x-ndjson")),
            (header::CACHE_CONTROL, HeaderValue::from_static("no-store")),
        ],
        Body::from_stream(lines),
    )
        .into_response())
}

fn line(event: &Value) -> Bytes {
    let mut bytes = serde_json::to_vec(event).unwrap_or_default();
    bytes.push(b'\n');
    Bytes::from(bytes)
}
