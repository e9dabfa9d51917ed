//! Public status routes: ping, the certificate hashes pages pin, and `/metrics`.

use std::time::SystemTime;

use axum::extract::State;
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::Serialize;

use super::respond::allow_any_origin;
use super::state::AppState;

/// The status routes.
pub(super) fn routes() -> Router<AppState> {
    Router::new()
        .route("/api/ping", get(ping))
        .route("/api/cert-hashes", get(cert_hashes))
        .route("/metrics", get(metrics))
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

async fn metrics(State(state): State<AppState>) -> Response {
    (
        [(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"))],
        state.stats.render_prometheus(),
    )
        .into_response()
}
