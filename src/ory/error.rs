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
    /// Ory answered with a redirect, which idmap never follows (a redirect could carry the session
    /// token or API key to another host). It means `setting` names the wrong Ory URL: self-hosted
    /// Kratos sends admin calls made on its public port to its admin URL, and whoami calls made on
    /// its admin port to its public URL. `location` is the target without its query.
    #[error(
        "Ory answered {status} redirecting to {}; idmap does not follow redirects: check {setting}",
        location.as_deref().unwrap_or("nowhere")
    )]
    Redirected {
        setting: &'static str,
        status: u16,
        location: Option<String>,
    },
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

    /// Whether idmap's own settings are wrong (ORY_API_KEY, ORY_ADMIN_URL, ORY_PUBLIC_URL): retrying
    /// helps only once an operator has fixed them.
    pub fn is_misconfiguration(&self) -> bool {
        matches!(self, Self::AdminUnauthorized(_) | Self::Redirected { .. })
    }
}
