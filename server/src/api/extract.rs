//! Extractors whose rejections are [`ApiError`]s: the verified principal, JSON bodies and
//! path parameters.

use std::convert::Infallible;
use std::net::IpAddr;

use axum::Json;
use axum::extract::connect_info::ConnectInfo;
use axum::extract::rejection::JsonRejection;
use axum::extract::{FromRequest, FromRequestParts, Path, Request};
use axum::http::request::Parts;
use axum::http::{StatusCode, header};
use downbeat_protocol::{ErrorCode, TextKind, check_text};
use serde::de::DeserializeOwned;

use super::error::ApiError;
use super::listen::ClientAddr;
use super::state::AppState;
use crate::auth::Principal;

/// The verified principal of a school's token (a teacher, a student or an admin), within its
/// rate limit. Operators' tokens are refused here (`forbidden`): they open the
/// inspector ([`Operator`]) and nothing of a school.
#[derive(Debug)]
pub(crate) struct Auth(pub(crate) Principal);

/// The verified principal of an operator's token, within its rate limit; any other token is
/// refused (`forbidden`).
#[derive(Debug)]
pub(crate) struct Operator(pub(crate) Principal);

impl FromRequestParts<AppState> for Operator {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let who = verified(parts, state)?;
        state.authorize(&who, crate::authz::Operation::Inspect)?;
        Ok(Self(who))
    }
}

impl FromRequestParts<AppState> for Auth {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let who = verified(parts, state)?;
        if who.role == crate::auth::Role::Operator {
            state.stats.refused.inc(ErrorCode::Forbidden);
            return Err(ApiError::new(
                ErrorCode::Forbidden,
                "an operator's token opens the inspector (/api/inspect), never a school's rooms or children's data",
            ));
        }
        Ok(Self(who))
    }
}

/// The token of an `Authorization: Bearer <token>` header, if there is one.
pub(super) fn bearer_token(headers: &axum::http::HeaderMap) -> Option<&str> {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, token)| token.trim())
}

/// The principal of the request's bearer token, verified and within its rate limit.
fn verified(parts: &Parts, state: &AppState) -> Result<Principal, ApiError> {
    // A token that does not verify pays per address, as no token does.
    let unverified = |e: ApiError| {
        let PeerAddr(peer) = PeerAddr::of(parts);
        if state.take_anonymous(peer) { e } else { super::anonymous_limited(state) }
    };
    let Some(token) = bearer_token(&parts.headers) else {
        state.stats.refused.inc(ErrorCode::Unauthorized);
        let missing =
            ApiError::new(ErrorCode::Unauthorized, "missing token: send the header `Authorization: Bearer <token>`");
        return Err(if parts.headers.contains_key(header::AUTHORIZATION) { unverified(missing) } else { missing });
    };
    let principal = state.tenants.verify(token).map_err(|e| {
        state.stats.refused.inc(e.code());
        unverified(ApiError::new(e.code(), e.to_string()))
    })?;
    if !state.take_request(&principal) {
        state.stats.refused.inc(ErrorCode::RateLimited);
        return Err(ApiError::new(ErrorCode::RateLimited, "too many requests; slow down"));
    }
    Ok(principal)
}

/// The client's address, when the listener knows it (a router called directly, as in unit
/// tests, has none).
#[derive(Clone, Copy, Debug)]
pub(crate) struct PeerAddr(pub(crate) Option<IpAddr>);

impl<S: Send + Sync> FromRequestParts<S> for PeerAddr {
    type Rejection = Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Infallible> {
        Ok(Self::of(parts))
    }
}

impl PeerAddr {
    fn of(parts: &Parts) -> Self {
        Self(parts.extensions.get::<ConnectInfo<ClientAddr>>().map(|info| info.0.0.ip()))
    }
}

/// `/api/rooms/{code}/members/{member}` whose rejection is an [`ApiError`].
#[derive(Debug)]
pub(super) struct MemberPath(pub(super) String, pub(super) u64);

impl<S: Send + Sync> FromRequestParts<S> for MemberPath {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        match Path::<(String, u64)>::from_request_parts(parts, state).await {
            Ok(Path((code, member))) => Ok(Self(code, member)),
            Err(rejection) => Err(ApiError::bad_request(rejection.body_text())),
        }
    }
}

/// Longest person id (a token subject) in a path, in bytes.
const MAX_SUBJECT: usize = 128;

/// A person id (a token's `sub`) from a path: 1 to 128 bytes without control characters.
pub(super) fn subject(id: String) -> Result<String, ApiError> {
    if id.is_empty() || id.len() > MAX_SUBJECT || check_text(&id, TextKind::Line).is_err() {
        return Err(ApiError::bad_request("a person's id is 1 to 128 bytes without control characters"));
    }
    Ok(id)
}

/// `/api/rooms/{code}/co-teachers/{sub}` whose rejection is an [`ApiError`].
#[derive(Debug)]
pub(super) struct CoTeacherPath(pub(super) String, pub(super) String);

impl<S: Send + Sync> FromRequestParts<S> for CoTeacherPath {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        match Path::<(String, String)>::from_request_parts(parts, state).await {
            Ok(Path((code, sub))) => Ok(Self(code, subject(sub)?)),
            Err(rejection) => Err(ApiError::bad_request(rejection.body_text())),
        }
    }
}

/// `axum::Json` whose rejections are [`ApiError`]s.
#[derive(Debug)]
pub(crate) struct ApiJson<T>(pub(crate) T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        match Json::<T>::from_request(req, state).await {
            Ok(Json(value)) => Ok(Self(value)),
            Err(rejection) => Err(json_rejection(&rejection)),
        }
    }
}

fn json_rejection(rejection: &JsonRejection) -> ApiError {
    let mut error = ApiError::bad_request(rejection.body_text());
    // Keep the statuses that say something more precise than 400.
    if matches!(rejection.status(), StatusCode::PAYLOAD_TOO_LARGE | StatusCode::UNSUPPORTED_MEDIA_TYPE) {
        error.set_status(rejection.status());
    }
    error
}

/// `axum::extract::Path<String>` whose rejection is an [`ApiError`].
#[derive(Debug)]
pub(crate) struct RoomPath(pub(crate) String);

impl<S: Send + Sync> FromRequestParts<S> for RoomPath {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        match Path::<String>::from_request_parts(parts, state).await {
            Ok(Path(id)) => Ok(Self(id)),
            Err(rejection) => Err(ApiError::bad_request(rejection.body_text())),
        }
    }
}
