//! The HTTP/1.1 API (axum): health, certificate hashes for pinning, rooms and teacher
//! controls, metrics.
//!
//! Requests authenticate with `Authorization: Bearer <JWT>`; the token's verified tenant and
//! role decide what is allowed, through the same [`crate::authz::authorize`] the control stream uses, and
//! each principal's requests pass its tenant's control rate limit; requests without a token
//! (or with one that does not verify) pass a limit per client address instead. Connections
//! are capped and every request has deadlines ([`serve`]). Every error, including
//! axum's own extractor rejections and unknown routes, is answered as
//! `{"error":{"code":"..","message":".."}}` with a stable code from
//! [`downbeat_protocol::ErrorCode`]; details go to the log, never internals to the client.

mod error;
mod extract;
mod forward;
mod inspect;
mod listen;
mod pages;
mod recordings;
mod respond;
mod rooms;
mod sel;
mod serve;
mod state;
mod status;
mod websocket;

use std::time::Duration;

use axum::Router;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse as _, Response};
use downbeat_protocol::ErrorCode;

use self::error::not_found;
pub use self::error::{ApiError, status_for};
pub(crate) use self::listen::{CertResolver, TlsListener};
pub(crate) use self::pages::warn_if_missing;
pub(crate) use self::serve::{HttpLimits, no_delay, serve};
pub(crate) use self::state::{AppState, Web};

/// Largest request body accepted.
const MAX_BODY_BYTES: usize = 16 * 1024;

/// The API's routes, the browser pages and package ([`pages`]), with the cross-origin
/// isolation headers on every response, the per-address limit on requests without a token,
/// and `request_timeout` on every request. `/metrics` is among them when `with_metrics`
/// (it has no listener of its own: see [`metrics_router`]).
pub(crate) fn router(state: AppState, request_timeout: Duration, with_metrics: bool) -> Router {
    let demo = state.tenants.is_demo();
    Router::new()
        .merge(status::routes(with_metrics))
        .merge(rooms::routes())
        .merge(sel::routes())
        .merge(recordings::routes())
        .merge(inspect::routes())
        .merge(pages::routes(demo))
        .merge(websocket::routes())
        .fallback(unknown_route)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(middleware::from_fn_with_state(state.clone(), limit_anonymous))
        .layer(middleware::from_fn_with_state(state.clone(), forward::to_owner))
        .with_state(state)
        .layer(middleware::from_fn(move |request, next| serve::request_deadline(request_timeout, request, next)))
        .layer(middleware::map_response(respond::isolate))
}

/// `/metrics` alone, for its own listener (`--metrics-addr`, an operator network): other
/// paths answer like unknown routes, and every request has `request_timeout`.
pub(crate) fn metrics_router(state: AppState, request_timeout: Duration) -> Router {
    Router::new()
        .merge(status::metrics_routes())
        .fallback(unknown_route)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(state)
        .layer(middleware::from_fn(move |request, next| serve::request_deadline(request_timeout, request, next)))
}

/// Takes a request without a token from its client address's bucket (a request with a token
/// pays per person once it verifies, or per address if it does not: see [`extract::Auth`]).
async fn limit_anonymous(
    State(state): State<AppState>,
    extract::PeerAddr(peer): extract::PeerAddr,
    request: Request,
    next: Next,
) -> Response {
    // A WebSocket session proves who it is in its hello, under the same limits as a
    // WebTransport session (a class behind one address joins at once).
    let session = request.uri().path() == websocket::PATH;
    if !session && !request.headers().contains_key(header::AUTHORIZATION) && !state.take_anonymous(peer) {
        return anonymous_limited(&state).into_response();
    }
    next.run(request).await
}

/// The refusal of a request over its address's limit, counted.
pub(super) fn anonymous_limited(state: &AppState) -> ApiError {
    state.stats.refused.inc(ErrorCode::RateLimited);
    ApiError::new(ErrorCode::RateLimited, "too many requests from this network; slow down")
}

async fn unknown_route() -> ApiError {
    not_found("no such endpoint")
}

async fn method_not_allowed() -> ApiError {
    let mut e = ApiError::bad_request("this endpoint does not take that method");
    e.set_status(StatusCode::METHOD_NOT_ALLOWED);
    e
}
