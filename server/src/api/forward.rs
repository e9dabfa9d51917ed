//! In a cluster, a room's HTTP calls (`/api/rooms/{code}/…`) made on a node that does not hold
//! the room are **forwarded** to the node that does, and its answer is passed back as it
//! comes.
//!
//! Forwarding rather than redirecting: a browser's `fetch` drops the `Authorization` header
//! on a cross-origin redirect, and a teacher's page talks to the node that served it; a
//! forward keeps one origin for the page and one code path for every client. The owner checks
//! the token and authorizes the call itself; this node only reads the token's tenant to find
//! the room in the directory. A forwarded call carries [`FORWARDED_BY`] and is never forwarded
//! again, so two nodes that disagree about a room cannot bounce a request between them.

use std::sync::OnceLock;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderName, HeaderValue, header};
use axum::middleware::Next;
use axum::response::{IntoResponse as _, Response};
use downbeat_protocol::ErrorCode;
use tokio_rustls::TlsConnector;
use tracing::{debug, warn};

use super::MAX_BODY_BYTES;
use super::error::ApiError;
use super::state::AppState;
use crate::auth::Role;
use crate::cluster::{Located, NodeEntry};
use crate::codes::JoinCode;

/// Names the node a call was forwarded by (such a call is answered where it lands).
pub(crate) const FORWARDED_BY: HeaderName = HeaderName::from_static("x-downbeat-forwarded-by");

/// How long the owner has to start answering a forwarded call.
const FORWARD_TIMEOUT: Duration = Duration::from_secs(15);

/// The request headers a forward carries (the rest is this hop's).
const KEPT: [HeaderName; 4] = [header::AUTHORIZATION, header::CONTENT_TYPE, header::ACCEPT, header::USER_AGENT];

/// The join code a path names: `/api/rooms/{code}` and everything under it.
fn room_code(path: &str) -> Option<JoinCode> {
    let rest = path.strip_prefix("/api/rooms/")?;
    let code = rest.split('/').next().filter(|c| !c.is_empty())?;
    JoinCode::parse(code)
}

/// Forwards a room's call to the node holding the room, when that is not this one.
pub(crate) async fn to_owner(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let Some(cluster) = state.rooms.cluster() else { return next.run(request).await };
    let Some(code) = room_code(request.uri().path()) else { return next.run(request).await };
    if request.headers().contains_key(&FORWARDED_BY) {
        return next.run(request).await;
    }
    // Whatever does not verify, or names no school, is answered here as usual.
    let Some(who) = super::extract::bearer_token(request.headers())
        .and_then(|t| state.tenants.verify(t).ok())
        .filter(|w| w.role != Role::Operator)
    else {
        return next.run(request).await;
    };
    if state.rooms.find(&who.tenant, code.as_str()).is_some() {
        return next.run(request).await;
    }
    match cluster.locate(&who.tenant, code.as_str()).await {
        Ok(Located::Elsewhere(owner)) => {
            forward(&cluster.node_id(), &owner, request).await.unwrap_or_else(|e| e.into_response())
        }
        Ok(Located::Orphaned | Located::Nowhere) => next.run(request).await,
        Err(e) => {
            warn!(error = %e, "the cluster's directory cannot be reached");
            ApiError::new(ErrorCode::ServerBusy, "the cluster's room directory cannot be reached; try again shortly")
                .into_response()
        }
    }
}

fn connector() -> Result<&'static TlsConnector, ApiError> {
    static TLS: OnceLock<Option<TlsConnector>> = OnceLock::new();
    TLS.get_or_init(|| crate::outbound::tls_connector(Vec::new()).ok())
        .as_ref()
        .ok_or_else(|| ApiError::new(ErrorCode::Internal, "no TLS client"))
}

async fn forward(this: &str, owner: &NodeEntry, request: Request) -> Result<Response, ApiError> {
    let unreachable = |e: &dyn std::fmt::Display| {
        warn!(owner = %owner.id, error = %e, "forwarding a room's call to its node failed");
        ApiError::new(ErrorCode::ServerBusy, "the server holding this room cannot be reached; try again shortly")
    };
    let (parts, body) = request.into_parts();
    let body = axum::body::to_bytes(body, MAX_BODY_BYTES)
        .await
        .map_err(|_| ApiError::bad_request(format!("a request body is at most {MAX_BODY_BYTES} bytes")))?;
    let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    let mut out = hyper::Request::builder().method(parts.method.clone()).uri(format!("{}{path}", owner.http_url));
    for name in KEPT {
        if let Some(value) = parts.headers.get(&name) {
            out = out.header(name, value);
        }
    }
    let this = HeaderValue::from_str(this).map_err(|e| unreachable(&e))?;
    let out = out.header(FORWARDED_BY, this).body(Body::from(body)).map_err(|e| unreachable(&e))?;
    debug!(owner = %owner.id, path, "forwarding a room's call to the node holding it");
    let answer = tokio::time::timeout(FORWARD_TIMEOUT, crate::outbound::send(connector()?, out))
        .await
        .map_err(|e| unreachable(&e))?
        .map_err(|e| unreachable(&e))?;
    let (parts, incoming) = answer.into_parts();
    let mut response = Response::new(Body::new(incoming));
    *response.status_mut() = parts.status;
    for name in [header::CONTENT_TYPE, header::CONTENT_DISPOSITION, header::CACHE_CONTROL] {
        if let Some(value) = parts.headers.get(&name) {
            response.headers_mut().insert(name, value.clone());
        }
    }
    Ok(response)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_rooms_own_paths_name_a_code() {
        assert_eq!(room_code("/api/rooms/K7QF-M3XP").map(|c| c.as_str().to_owned()).as_deref(), Some("K7QFM3XP"));
        assert!(room_code("/api/rooms/k7qfm3xp/start").is_some());
        for path in
            ["/api/rooms", "/api/rooms/", "/api/sessions/abc/sel", "/api/rooms//start", "/api/rooms/NOT-A-CODE!"]
        {
            assert!(room_code(path).is_none(), "{path}");
        }
    }
}
