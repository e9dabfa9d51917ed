//! The API's one error type: a status, a stable code and a message safe to show.

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use downbeat_engine::timeline;
use downbeat_protocol::{BoundedString, ErrorCode, MAX_ERROR_MESSAGE_LEN};
use serde::Serialize;
use tracing::{debug, error};

use crate::authz::Refusal;

/// The one error type of the API: a status, a stable code and a message safe to show.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: ErrorCode,
    message: String,
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    error: ErrorDetail<'a>,
}

#[derive(Serialize)]
struct ErrorDetail<'a> {
    code: &'static str,
    message: &'a str,
}

impl ApiError {
    /// An error with the status that fits `code`.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self { status: status_for(code), code, message: message.into() }
    }

    pub(crate) fn bad_request(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::BadRequest, message)
    }

    /// The HTTP status.
    pub fn status(&self) -> StatusCode {
        self.status
    }

    /// The stable code.
    pub fn code(&self) -> ErrorCode {
        self.code
    }

    /// Replaces the status (for answers more precise than the code's usual one).
    pub(crate) fn set_status(&mut self, status: StatusCode) {
        self.status = status;
    }
}

/// The HTTP status for each stable code.
pub fn status_for(code: ErrorCode) -> StatusCode {
    match code {
        ErrorCode::Unauthorized | ErrorCode::TokenExpired => StatusCode::UNAUTHORIZED,
        ErrorCode::Forbidden | ErrorCode::WrongTenant => StatusCode::FORBIDDEN,
        ErrorCode::RoomNotFound | ErrorCode::MemberNotFound | ErrorCode::RecordingNotFound => StatusCode::NOT_FOUND,
        ErrorCode::RoomClosed | ErrorCode::DataDeleted | ErrorCode::EndedByOperator => StatusCode::GONE,
        ErrorCode::AlreadyRunning
        | ErrorCode::NotRunning
        | ErrorCode::TooManyPendingChanges
        | ErrorCode::RoomFull
        | ErrorCode::SessionReplaced
        | ErrorCode::AlreadyRecording
        | ErrorCode::NotRecording
        | ErrorCode::AlreadyPlaying
        | ErrorCode::NotPlaying => StatusCode::CONFLICT,
        ErrorCode::TooManyRooms
        | ErrorCode::RateLimited
        | ErrorCode::TooManySessions
        | ErrorCode::TooManyProbes
        | ErrorCode::TooManyReflections
        | ErrorCode::TooManyRecordings => StatusCode::TOO_MANY_REQUESTS,
        ErrorCode::ServerBusy | ErrorCode::ShuttingDown | ErrorCode::StoreUnavailable => {
            StatusCode::SERVICE_UNAVAILABLE
        }
        ErrorCode::NoPrompt => StatusCode::CONFLICT,
        ErrorCode::StoreRefused => StatusCode::UNPROCESSABLE_ENTITY,
        ErrorCode::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        _ => StatusCode::BAD_REQUEST,
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if self.status.is_server_error() {
            error!(status = %self.status, code = self.code.as_str(), message = %self.message, "request failed");
        } else {
            debug!(status = %self.status, code = self.code.as_str(), message = %self.message, "request refused");
        }
        // Internal failures get a fixed message; everything else is written to be shown.
        let message = if self.code == ErrorCode::Internal {
            "internal error".to_owned()
        } else {
            BoundedString::<MAX_ERROR_MESSAGE_LEN>::truncating(&self.message).into_string()
        };
        let body = ErrorBody { error: ErrorDetail { code: self.code.as_str(), message: &message } };
        (self.status, Json(body)).into_response()
    }
}

impl From<Refusal> for ApiError {
    fn from(r: Refusal) -> Self {
        Self::new(r.code, r.message)
    }
}

impl From<timeline::TimelineError> for ApiError {
    fn from(e: timeline::TimelineError) -> Self {
        Self::new(e.code(), e.to_string())
    }
}

/// A `404 Not Found` answered like an unknown route (code `bad_request`), with `message`.
pub(crate) fn not_found(message: impl Into<String>) -> ApiError {
    let mut e = ApiError::bad_request(message);
    e.status = StatusCode::NOT_FOUND;
    e
}
