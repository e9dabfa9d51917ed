//! Headers every response, or every public one, carries.

use axum::http::{HeaderName, HeaderValue, header};
use axum::response::Response;

/// Pages on any origin may read public, non-secret answers (ping, certificate hashes).
pub(crate) fn allow_any_origin(response: &mut Response) {
    response.headers_mut().insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, HeaderValue::from_static("*"));
}

/// Adds the cross-origin isolation headers (pages need them for `SharedArrayBuffer` and
/// precise timers) and `nosniff` to every response. Answers every origin may read are
/// `Cross-Origin-Resource-Policy: cross-origin`; all others `same-origin`.
pub(crate) async fn isolate(mut response: Response) -> Response {
    let headers = response.headers_mut();
    let public = headers.get(header::ACCESS_CONTROL_ALLOW_ORIGIN).is_some_and(|v| v.as_bytes() == b"*");
    let resource_policy = if public { "cross-origin" } else { "same-origin" };
    headers.insert(HeaderName::from_static("cross-origin-opener-policy"), HeaderValue::from_static("same-origin"));
    headers.insert(HeaderName::from_static("cross-origin-embedder-policy"), HeaderValue::from_static("require-corp"));
    headers.insert(HeaderName::from_static("cross-origin-resource-policy"), HeaderValue::from_static(resource_policy));
    headers.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    response
}
