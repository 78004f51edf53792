use std::time::Duration;

/// What went wrong talking to Ory, by meaning. Nothing above the Ory client sees an HTTP status.
#[derive(Debug, Clone, thiserror::Error)]
pub enum OryError {
    /// Ory does not accept the session (401): unknown, expired, revoked, or its identity is inactive.
    #[error("Ory did not accept the session")]
    Unauthenticated,
    /// Ory found the session but refused it (403), e.g. `session_aal2_required`.
    #[error("Ory refused the session: {}", error_id.as_deref().unwrap_or("forbidden"))]
    Forbidden {
        error_id: Option<String>,
        reason: Option<String>,
        redirect_browser_to: Option<String>,
    },
    /// The admin API has no such identity (404).
    #[error("Ory has no such identity")]
    NotFound,
    /// Ory rejected a write because it clashes with another identity (409).
    #[error("Ory reported a conflict")]
    Conflict,
    /// Ory rate-limited us (429). `retry_after` is Ory's hint, when it gave one.
    #[error("Ory rate-limited the request")]
    RateLimited { retry_after: Option<Duration> },
    /// Ory answered 5xx, timed out, or could not be reached.
    #[error("Ory is unavailable: {0}")]
    Unavailable(String),
    /// Ory refused our admin credentials (401/403 on the admin API): ORY_API_KEY is wrong or missing.
    #[error("Ory rejected the admin API credentials (check ORY_API_KEY): status {0}")]
    AdminUnauthorized(u16),
    /// Ory refused a page token of the identity list (400): it expired (current Kratos's tokens
    /// live an hour), or it was issued under another pagination secret or Kratos version. Only a
    /// walk from the first page can go on.
    #[error("Ory refused the page token: {0}")]
    PageTokenRefused(String),
    /// Ory answered something its contract does not allow (unexpected status or body).
    #[error("unexpected answer from Ory: {0}")]
    Protocol(String),
}

impl OryError {
    /// Whether trying again later can help.
    pub fn is_transient(&self) -> bool {
        matches!(self, Self::RateLimited { .. } | Self::Unavailable(_))
    }
}
