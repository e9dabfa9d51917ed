//! The HTTP/1.1 API (axum): health, certificate hashes for pinning, rooms and teacher
//! controls, metrics.
//!
//! Requests authenticate with `Authorization: Bearer <JWT>`; the token's verified tenant and
//! role decide what is allowed, through the same [`crate::authz::authorize`] the control stream uses, and
//! each principal's requests pass its tenant's control rate limit. Every error, including
//! axum's own extractor rejections and unknown routes, is answered as
//! `{"error":{"code":"..","message":".."}}` with a stable code from
//! [`downbeat_protocol::ErrorCode`]; details go to the log, never internals to the client.

mod error;
mod extract;
mod listen;
mod pages;
mod respond;
mod rooms;
mod sel;
mod state;
mod status;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::http::StatusCode;

use self::error::not_found;
pub use self::error::{ApiError, status_for};
pub(crate) use self::listen::{ClientAddr, TlsListener};
pub(crate) use self::pages::warn_if_missing;
pub(crate) use self::state::{AppState, Web};

/// Largest request body accepted.
const MAX_BODY_BYTES: usize = 16 * 1024;

/// The API's routes, the browser pages and package ([`pages`]), with the cross-origin
/// isolation headers on every response.
pub(crate) fn router(state: AppState) -> Router {
    let demo = state.tenants.is_demo();
    Router::new()
        .merge(status::routes())
        .merge(rooms::routes())
        .merge(sel::routes())
        .merge(pages::routes(demo))
        .fallback(unknown_route)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(state)
        .layer(axum::middleware::map_response(respond::isolate))
}

async fn unknown_route() -> ApiError {
    not_found("no such endpoint")
}

async fn method_not_allowed() -> ApiError {
    let mut e = ApiError::bad_request("this endpoint does not take that method");
    e.set_status(StatusCode::METHOD_NOT_ALLOWED);
    e
}
