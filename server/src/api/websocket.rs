//! `GET /api/ws`: a session over WebSocket, for networks that block QUIC (the session itself
//! is [`crate::session::websocket`]).

use std::net::{IpAddr, Ipv4Addr};

use axum::Router;
use axum::extract::ws::WebSocketUpgrade;
use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::{Extension, State};
use axum::response::{IntoResponse as _, Response};
use axum::routing::get;
use downbeat_protocol::ErrorCode;

use super::error::ApiError;
use super::extract::PeerAddr;
use super::serve::HeldConnection;
use super::state::AppState;
use crate::session::websocket;

/// Where WebSocket sessions are opened.
pub(super) const PATH: &str = "/api/ws";

pub(super) fn routes() -> Router<AppState> {
    Router::new().route(PATH, get(upgrade))
}

/// Upgrades to a session under the server's session limit; the hello follows on the socket.
async fn upgrade(
    State(state): State<AppState>,
    PeerAddr(peer): PeerAddr,
    held: Option<Extension<HeldConnection>>,
    upgrade: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Response {
    let Ok(upgrade) = upgrade else {
        state.stats.refused.inc(ErrorCode::BadRequest);
        return ApiError::bad_request("this endpoint takes a WebSocket upgrade").into_response();
    };
    let sessions = &state.sessions;
    let peer = peer.unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED));
    let places = match sessions.session_places(peer) {
        Ok(places) => places,
        Err(full) => return ApiError::new(ErrorCode::ServerBusy, full.message()).into_response(),
    };
    let (ctx, shutdown) = (sessions.clone(), state.shutdown.clone());
    websocket::limits(upgrade).on_upgrade(move |socket| websocket::run(socket, ctx, peer, shutdown, places, held))
}
