//! Public status routes: ping, health (the SEL store and the TLS certificate), the
//! certificate hashes pages pin, and `/metrics`.

use std::time::SystemTime;

use axum::extract::State;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::Serialize;

use super::respond::allow_any_origin;
use super::state::AppState;

/// The status routes, with `/metrics` unless it has its own listener (`--metrics-addr`).
pub(super) fn routes(with_metrics: bool) -> Router<AppState> {
    let routes = Router::new()
        .route("/api/ping", get(ping))
        .route("/api/health", get(health))
        .route("/api/cert-hashes", get(cert_hashes));
    if with_metrics { routes.merge(metrics_routes()) } else { routes }
}

/// `/metrics` alone, for the HTTP listeners or for its own (`--metrics-addr`).
pub(super) fn metrics_routes() -> Router<AppState> {
    Router::new().route("/metrics", get(metrics))
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
struct HealthView {
    status: &'static str,
    /// Why `degraded`: `store_failing`, `certificate_pending`, `certificate_expired`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    reasons: Vec<&'static str>,
    store: crate::sel::Health,
    tls: crate::identity::TlsView,
}

/// `200 {"status":"ok"}`, or `503 {"status":"degraded"}` while SEL writes fail, before the
/// first ACME certificate is issued, or once the certificate in use has expired (beats and
/// notes carry on regardless). A failing ACME renewal shows in `tls.acme` while the
/// certificate is still valid.
async fn health(State(state): State<AppState>) -> Response {
    let store = state.sel.health();
    let tls = state.tls.view();
    let reasons: Vec<&'static str> =
        [store.degraded.then_some("store_failing"), tls.degraded_reason(SystemTime::now())]
            .into_iter()
            .flatten()
            .collect();
    let (status, word) =
        if reasons.is_empty() { (StatusCode::OK, "ok") } else { (StatusCode::SERVICE_UNAVAILABLE, "degraded") };
    let mut response = (status, Json(HealthView { status: word, reasons, store, tls })).into_response();
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

async fn metrics(State(state): State<AppState>) -> Response {
    prometheus(&state)
}

/// The server's counters in the Prometheus text format (`/metrics`, and the inspector's copy).
pub(super) fn prometheus(state: &AppState) -> Response {
    (
        [(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"))],
        state.stats.render_prometheus(),
    )
        .into_response()
}
