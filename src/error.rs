//! The service's error type. Layers below have their own (`store::StoreError`, `ory::OryError`,
//! `domain::FieldViolation`); the services turn them into [`Error`], which says what the caller
//! should do. `grpc::status` is the one place that turns an [`Error`] into a `tonic::Status`.
//!
//! Which error where: `anyhow` off the request path (start-up, CLI), the layer's own enum inside a
//! layer, [`Error`] from `service/` up.

use std::time::Duration;

use crate::domain::FieldViolation;
use crate::ory::OryError;
use crate::store::StoreError;

/// Machine-readable reasons carried in `google.rpc.ErrorInfo`. Part of the API contract.
pub mod reason {
    pub const INVALID_ARGUMENT: &str = "INVALID_ARGUMENT";
    pub const SESSION_INVALID: &str = "SESSION_INVALID";
    pub const USER_NOT_FOUND: &str = "USER_NOT_FOUND";
    pub const IDENTITY_NOT_FOUND: &str = "IDENTITY_NOT_FOUND";
    pub const IDENTITY_ALREADY_LINKED: &str = "IDENTITY_ALREADY_LINKED";
    pub const USER_ALREADY_LINKED: &str = "USER_ALREADY_LINKED";
    pub const EXTERNAL_ID_TAKEN: &str = "EXTERNAL_ID_TAKEN";
    pub const EXTERNAL_ID_ALREADY_SET: &str = "EXTERNAL_ID_ALREADY_SET";
    pub const ORY_UNAVAILABLE: &str = "ORY_UNAVAILABLE";
    pub const ORY_RATE_LIMITED: &str = "ORY_RATE_LIMITED";
    pub const ORY_ADMIN_UNAUTHORIZED: &str = "ORY_ADMIN_UNAUTHORIZED";
    pub const ORY_REDIRECTED: &str = "ORY_REDIRECTED";
    pub const DATABASE_UNAVAILABLE: &str = "DATABASE_UNAVAILABLE";
    pub const DEADLINE_EXCEEDED: &str = "DEADLINE_EXCEEDED";
    pub const INTERNAL: &str = "INTERNAL";
    pub const CALLER_UNAUTHENTICATED: &str = "CALLER_UNAUTHENTICATED";
    pub const CALLER_NOT_ALLOWED: &str = "CALLER_NOT_ALLOWED";
    pub const SERVER_OVERLOADED: &str = "SERVER_OVERLOADED";
}

/// What went wrong, in terms of what the caller can do about it.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The request is malformed; nothing changed.
    #[error("invalid request: {}", join_violations(.0))]
    InvalidArgument(Vec<FieldViolation>),
    /// The session is not valid: log in again.
    #[error("{message}")]
    Unauthenticated { message: String },
    /// The session is valid but not enough (Ory's 403, e.g. `session_aal2_required`).
    #[error("the session does not satisfy Ory's requirements ({})", ory_error_id.as_deref().unwrap_or("forbidden"))]
    PermissionDenied {
        ory_error_id: Option<String>,
        ory_reason: Option<String>,
        redirect_browser_to: Option<String>,
    },
    /// The thing asked for does not exist.
    #[error("{message}")]
    NotFound {
        reason: &'static str,
        message: String,
        resource_type: &'static str,
        resource_name: String,
    },
    /// The request clashes with existing data.
    #[error("{message}")]
    AlreadyExists {
        reason: &'static str,
        message: String,
        metadata: Vec<(&'static str, String)>,
    },
    /// A dependency is down or overloaded: retry later. `detail` is logged, never sent.
    #[error("{public}")]
    Unavailable {
        reason: &'static str,
        public: &'static str,
        retry_after: Option<Duration>,
        detail: String,
    },
    /// The caller's deadline passed.
    #[error("the deadline passed before the request completed")]
    DeadlineExceeded,
    /// A bug or a broken contract. The detail is logged, never sent.
    #[error("internal error")]
    Internal(String),
}

fn join_violations(v: &[FieldViolation]) -> String {
    v.iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}

impl From<FieldViolation> for Error {
    fn from(v: FieldViolation) -> Self {
        Self::InvalidArgument(vec![v])
    }
}

impl From<StoreError> for Error {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Unavailable(detail) => Self::Unavailable {
                reason: reason::DATABASE_UNAVAILABLE,
                public: "the user store is unavailable; retry later",
                retry_after: None,
                detail,
            },
            StoreError::Query(e) => Self::Internal(format!("database: {e}")),
        }
    }
}

impl From<OryError> for Error {
    fn from(e: OryError) -> Self {
        match e {
            OryError::Unauthenticated => Self::Unauthenticated {
                message: "Ory did not accept the session: it is unknown, expired or revoked, or its identity is inactive".into(),
            },
            OryError::Forbidden {
                error_id,
                reason,
                redirect_browser_to,
            } => Self::PermissionDenied {
                ory_error_id: error_id,
                ory_reason: reason,
                redirect_browser_to,
            },
            OryError::NotFound => Self::NotFound {
                reason: reason::IDENTITY_NOT_FOUND,
                message: "Ory has no such identity".into(),
                resource_type: "ory.identity",
                resource_name: String::new(),
            },
            OryError::RateLimited { retry_after } => Self::Unavailable {
                reason: reason::ORY_RATE_LIMITED,
                public: "Ory is rate-limiting idmap; retry later",
                retry_after,
                detail: "Ory answered 429".into(),
            },
            OryError::Unavailable(detail) => Self::Unavailable {
                reason: reason::ORY_UNAVAILABLE,
                public: "Ory is unavailable; retry later",
                retry_after: None,
                detail,
            },
            // idmap's own settings are wrong: nothing the caller did, and retrying works once an
            // operator has fixed them (the Ory client has logged what to check).
            OryError::AdminUnauthorized(_) => Self::Unavailable {
                reason: reason::ORY_ADMIN_UNAUTHORIZED,
                public: "Ory refused idmap's admin API credentials; an operator must check ORY_API_KEY",
                retry_after: None,
                detail: e.to_string(),
            },
            OryError::Redirected { setting, .. } => Self::Unavailable {
                reason: reason::ORY_REDIRECTED,
                public: if setting == crate::config::ENV_ORY_PUBLIC_URL {
                    "Ory redirected idmap's session check; an operator must point ORY_PUBLIC_URL at Ory's public API"
                } else {
                    "Ory redirected idmap's admin API call; an operator must point ORY_ADMIN_URL at Ory's admin API"
                },
                retry_after: None,
                detail: e.to_string(),
            },
            OryError::Conflict | OryError::PageTokenRefused(_) | OryError::Protocol(_) => {
                Self::Internal(format!("ory: {e}"))
            }
        }
    }
}
