//! What backfill and reconciliation share: reading every identity page by page from Ory's admin
//! API, retrying what Ory says will pass (429 with its `Retry-After`, 5xx, timeouts) with backoff,
//! and the ways a long walk can stop early.

use std::future::Future;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::Jobs;
use crate::error::Error;
use crate::ory::{IdentityPage, OryError};

/// Ory's `page_size` limit for `GET /admin/identities`.
pub const MAX_PAGE_SIZE: u32 = 500;

/// The longest a `Retry-After` is waited out; past it Ory is treated as down rather than busy.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(600);

/// How a walk retries Ory calls that failed for a passing reason.
#[derive(Debug, Clone)]
pub struct RetryPolicy {
    /// Tries per call, the first included; then the walk stops (and can be resumed).
    pub attempts: u32,
    /// Wait before the first retry; it doubles per retry. A longer `Retry-After` wins.
    pub min_delay: Duration,
    /// Longest wait between retries (unless `Retry-After` asks for more).
    pub max_delay: Duration,
}

impl Default for RetryPolicy {
    /// About four minutes of retrying: rides out a rate-limit window or an Ory deploy, and still
    /// stops a run against an Ory that is really down within minutes.
    fn default() -> Self {
        Self {
            attempts: 8,
            min_delay: Duration::from_millis(500),
            max_delay: Duration::from_secs(60),
        }
    }
}

/// Why a walk ended before the last page.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Stopped {
    /// The caller cancelled it (Ctrl-C).
    Interrupted,
    /// Ory or the database kept failing; the message says how.
    Failed(String),
}

impl std::fmt::Display for Stopped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Interrupted => f.write_str("interrupted"),
            Self::Failed(why) => write!(f, "stopped: {why}"),
        }
    }
}

/// An error in words for an operator: unlike the gRPC answer, the detail is shown.
pub fn describe(error: &Error) -> String {
    match error {
        Error::Unavailable { public, detail, .. } => format!("{public} ({detail})"),
        Error::Internal(detail) => detail.clone(),
        other => other.to_string(),
    }
}

/// Whether the error means a dependency is down (so the rest of the page would fail too), rather
/// than something wrong with one identity.
pub(crate) fn is_outage(error: &Error) -> bool {
    matches!(error, Error::Unavailable { .. })
}

/// Runs `call`, retrying transient Ory failures per `policy`. Cancellation ends the wait at once.
pub(crate) async fn with_retry<T, F, Fut>(
    policy: &RetryPolicy,
    cancel: &CancellationToken,
    what: &str,
    mut call: F,
) -> Result<T, Stopped>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, OryError>>,
{
    let mut delay = policy.min_delay;
    let mut attempt = 1;
    loop {
        let error = tokio::select! {
            result = call() => match result {
                Ok(value) => return Ok(value),
                Err(error) => error,
            },
            () = cancel.cancelled() => return Err(Stopped::Interrupted),
        };
        if !error.is_transient() || attempt >= policy.attempts.max(1) {
            return Err(Stopped::Failed(format!(
                "{what}: {error} (after {attempt} attempt(s))"
            )));
        }
        let wait = match &error {
            OryError::RateLimited {
                retry_after: Some(after),
            } => (*after).min(MAX_RETRY_AFTER).max(delay),
            _ => delay,
        };
        tracing::warn!(%error, attempt, wait_ms = wait.as_millis() as u64, "{what} failed; retrying");
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            () = cancel.cancelled() => return Err(Stopped::Interrupted),
        }
        delay = (delay * 2).min(policy.max_delay);
        attempt += 1;
    }
}

/// What asking Ory for a page gave.
#[derive(Debug)]
pub(crate) enum PageRead {
    Page(IdentityPage),
    /// Ory refused the page token (Ory's reason attached): it expired, or Kratos no longer
    /// accepts it. Only a walk from the first page can go on.
    TokenRefused(String),
}

/// The one walk from the first page again that a run may take after Ory refused its page token
/// (it expired, or Kratos's pagination secret changed). Once only, so a Kratos that refuses every
/// token cannot keep the walk going round.
#[derive(Debug, Default)]
pub(crate) struct WalkAgain {
    taken: bool,
}

impl WalkAgain {
    /// `Ok` when the walk may start again from the first page; why it must stop otherwise.
    /// `keeping` says what the walk keeps from before, for the log.
    pub(crate) fn after_refusal(&mut self, reason: &str, keeping: &str) -> Result<(), Stopped> {
        if self.taken {
            return Err(Stopped::Failed(format!(
                "listing Ory identities: Ory refused the page token again after a walk from the first page: {reason}"
            )));
        }
        tracing::warn!(
            %reason,
            keeping,
            "Ory refused the page token; walking again from the first page"
        );
        self.taken = true;
        Ok(())
    }
}

impl Jobs {
    /// One page of identities, retried per `policy`.
    pub(crate) async fn identity_page(
        &self,
        page_size: u32,
        token: Option<&str>,
        policy: &RetryPolicy,
        cancel: &CancellationToken,
    ) -> Result<PageRead, Stopped> {
        let page_size = page_size.clamp(1, MAX_PAGE_SIZE);
        with_retry(policy, cancel, "listing Ory identities", || async move {
            match self.ory.list_identities(page_size, token).await {
                Ok(page) => Ok(PageRead::Page(page)),
                Err(OryError::PageTokenRefused(reason)) => Ok(PageRead::TokenRefused(reason)),
                Err(e) => Err(e),
            }
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    fn quick(attempts: u32) -> RetryPolicy {
        RetryPolicy {
            attempts,
            min_delay: Duration::from_millis(1),
            max_delay: Duration::from_millis(4),
        }
    }

    #[tokio::test]
    async fn transient_failures_are_retried_until_success() {
        let calls = AtomicU32::new(0);
        let result = with_retry(&quick(5), &CancellationToken::new(), "test", || async {
            if calls.fetch_add(1, Ordering::Relaxed) < 2 {
                Err(OryError::Unavailable("status 503".into()))
            } else {
                Ok(7)
            }
        })
        .await;
        assert_eq!(result, Ok(7));
        assert_eq!(calls.load(Ordering::Relaxed), 3);
    }

    #[tokio::test]
    async fn permanent_failures_and_exhausted_retries_stop() {
        let calls = AtomicU32::new(0);
        let result: Result<(), _> =
            with_retry(&quick(5), &CancellationToken::new(), "test", || async {
                calls.fetch_add(1, Ordering::Relaxed);
                Err(OryError::AdminUnauthorized(401))
            })
            .await;
        assert!(matches!(result, Err(Stopped::Failed(_))));
        assert_eq!(calls.load(Ordering::Relaxed), 1);

        let result: Result<(), _> =
            with_retry(&quick(3), &CancellationToken::new(), "test", || async {
                Err(OryError::RateLimited { retry_after: None })
            })
            .await;
        assert!(matches!(result, Err(Stopped::Failed(m)) if m.contains("3 attempt")));
    }

    #[tokio::test(start_paused = true)]
    async fn retry_after_is_honoured() {
        let started = tokio::time::Instant::now();
        let calls = AtomicU32::new(0);
        let result = with_retry(&quick(3), &CancellationToken::new(), "test", || async {
            if calls.fetch_add(1, Ordering::Relaxed) == 0 {
                Err(OryError::RateLimited {
                    retry_after: Some(Duration::from_secs(7)),
                })
            } else {
                Ok(())
            }
        })
        .await;
        assert_eq!(result, Ok(()));
        assert!(started.elapsed() >= Duration::from_secs(7));
    }
}
