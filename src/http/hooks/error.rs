//! The one place a webhook failure becomes an HTTP answer. Every error body is in Ory's `messages`
//! format (`spec/ory/CONTRACT.md` c, "Response handling"), so a `parse: true` hook surfaces it as a flow error
//! and Kratos logs it for a `parse: false` one. Kratos retries 5xx and never 4xx: outages are 503,
//! requests that can never succeed are 4xx.

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use crate::domain::FieldViolation;
use crate::error::Error;

/// Message ids in idmap's answers. Kratos's own ids are seven digits starting 1 to 5; these start
/// with 9 so a UI that translates Kratos's ids never shows its text for one of ours.
pub mod message_id {
    pub const BAD_REQUEST: i64 = 9_000_400;
    pub const UNAUTHORIZED: i64 = 9_000_401;
    pub const CONFLICT: i64 = 9_000_409;
    pub const PAYLOAD_TOO_LARGE: i64 = 9_000_413;
    pub const INTERNAL: i64 = 9_000_500;
    pub const UNAVAILABLE: i64 = 9_000_503;
}

/// Why a webhook request failed.
#[derive(Debug, thiserror::Error)]
pub enum HookError {
    /// No or wrong credentials, or no secret configured; nothing was read or written.
    #[error("{0}")]
    Unauthorized(&'static str),
    /// The body is over the limit.
    #[error("the request body exceeds {limit} bytes")]
    PayloadTooLarge { limit: usize },
    /// The body is not a webhook payload idmap can use; `instance_ptr` points at the culprit.
    #[error("{text}")]
    BadRequest {
        instance_ptr: &'static str,
        text: String,
    },
    /// The use case failed.
    #[error(transparent)]
    Service(#[from] Error),
}

impl HookError {
    pub fn bad_request(instance_ptr: &'static str, text: impl Into<String>) -> Self {
        Self::BadRequest {
            instance_ptr,
            text: text.into(),
        }
    }
}

impl From<FieldViolation> for HookError {
    fn from(v: FieldViolation) -> Self {
        Self::bad_request("#/identity", v.to_string())
    }
}

/// `{"messages":[{"instance_ptr":..,"messages":[{"id":..,"text":..,"type":"error","context":{}}]}]}`
pub fn messages_body(instance_ptr: &str, id: i64, text: &str) -> serde_json::Value {
    json!({
        "messages": [{
            "instance_ptr": instance_ptr,
            "messages": [{ "id": id, "text": text, "type": "error", "context": {} }],
        }]
    })
}

impl IntoResponse for HookError {
    fn into_response(self) -> Response {
        let (status, ptr, id, text, retry_after) = match &self {
            Self::Unauthorized(text) => (
                StatusCode::UNAUTHORIZED,
                "#/",
                message_id::UNAUTHORIZED,
                (*text).to_owned(),
                None,
            ),
            Self::PayloadTooLarge { .. } => (
                StatusCode::PAYLOAD_TOO_LARGE,
                "#/",
                message_id::PAYLOAD_TOO_LARGE,
                self.to_string(),
                None,
            ),
            Self::BadRequest { instance_ptr, text } => (
                StatusCode::BAD_REQUEST,
                *instance_ptr,
                message_id::BAD_REQUEST,
                text.clone(),
                None,
            ),
            Self::Service(e) => match e {
                Error::InvalidArgument(_) => (
                    StatusCode::BAD_REQUEST,
                    "#/identity",
                    message_id::BAD_REQUEST,
                    e.to_string(),
                    None,
                ),
                Error::AlreadyExists { .. } => (
                    StatusCode::CONFLICT,
                    "#/identity",
                    message_id::CONFLICT,
                    e.to_string(),
                    None,
                ),
                Error::Unavailable {
                    public,
                    detail,
                    retry_after,
                    ..
                } => {
                    tracing::warn!(error = %detail, "webhook: {public}");
                    (
                        StatusCode::SERVICE_UNAVAILABLE,
                        "#/",
                        message_id::UNAVAILABLE,
                        (*public).to_owned(),
                        *retry_after,
                    )
                }
                Error::DeadlineExceeded => (
                    StatusCode::SERVICE_UNAVAILABLE,
                    "#/",
                    message_id::UNAVAILABLE,
                    "idmap did not finish in time; retry later".to_owned(),
                    None,
                ),
                // None of these can come out of the webhook use cases; if one does, it is a bug,
                // reported like one: logged in full, answered generically.
                Error::Internal(_)
                | Error::NotFound { .. }
                | Error::Unauthenticated { .. }
                | Error::PermissionDenied { .. } => {
                    tracing::error!(error = ?e, "webhook failed");
                    (
                        StatusCode::INTERNAL_SERVER_ERROR,
                        "#/",
                        message_id::INTERNAL,
                        "internal error".to_owned(),
                        None,
                    )
                }
            },
        };
        let mut response = (status, Json(messages_body(ptr, id, &text))).into_response();
        if status == StatusCode::UNAUTHORIZED {
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Basic realm=\"idmap webhooks\""),
            );
        }
        if let Some(after) = retry_after
            && let Ok(value) = HeaderValue::from_str(&after.as_secs().max(1).to_string())
        {
            response.headers_mut().insert(header::RETRY_AFTER, value);
        }
        response
    }
}
