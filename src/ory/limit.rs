//! Client-side limits on what idmap sends to Ory: a token bucket per class of call (whoami, admin),
//! and a cool-down that Ory's own signals set (`Retry-After` on a 429, `x-ratelimit-remaining: 0`
//! with `x-ratelimit-reset`). Calls wait for a token at most `max_wait`; past that they fail as rate
//! limited without reaching Ory, so no load pattern can push Ory beyond the configured rate.

use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use tokio::time::Instant;

use super::OryError;
use crate::metrics::{self, Limiter};

/// A rate limit and cool-down for one class of Ory calls.
pub struct OryLimiter {
    /// Which one, for the wait metric.
    kind: Limiter,
    bucket: Option<DefaultDirectRateLimiter>,
    /// Milliseconds after `origin` before which no call may start (0: none).
    blocked_until_ms: AtomicU64,
    origin: Instant,
    max_wait: Duration,
}

impl OryLimiter {
    /// `rps`: calls per second, `None` for no limit. The bucket holds a single token, so the rate
    /// holds over any window, not just on average: a burst is spread out instead of sent at once.
    pub fn new(kind: Limiter, rps: Option<NonZeroU32>, max_wait: Duration) -> Self {
        Self {
            kind,
            bucket: rps
                .map(|n| RateLimiter::direct(Quota::per_second(n).allow_burst(NonZeroU32::MIN))),
            blocked_until_ms: AtomicU64::new(0),
            origin: Instant::now(),
            max_wait,
        }
    }

    /// Waits until a call may be made, or fails without one when that would take too long.
    pub async fn acquire(&self) -> Result<(), OryError> {
        let started = Instant::now();
        let result = self.wait_for_turn().await;
        metrics::get().limiter_wait(self.kind, started.elapsed());
        result
    }

    async fn wait_for_turn(&self) -> Result<(), OryError> {
        let deadline = Instant::now() + self.max_wait;
        let blocked = self.blocked_until();
        if let Some(until) = blocked {
            if until > deadline {
                return Err(OryError::RateLimited {
                    retry_after: Some(until - Instant::now()),
                });
            }
            tokio::time::sleep_until(until).await;
        }
        if let Some(bucket) = &self.bucket
            && tokio::time::timeout_at(deadline, bucket.until_ready())
                .await
                .is_err()
        {
            return Err(OryError::RateLimited { retry_after: None });
        }
        Ok(())
    }

    /// Holds every call back for `delay` (Ory asked us to slow down), at most
    /// [`super::MAX_RETRY_AFTER`] whatever the caller passes.
    pub fn back_off(&self, delay: Duration) {
        let until = (Instant::now() + delay.min(super::MAX_RETRY_AFTER))
            .duration_since(self.origin)
            .as_millis() as u64;
        self.blocked_until_ms.fetch_max(until, Ordering::Relaxed);
    }

    fn blocked_until(&self) -> Option<Instant> {
        let ms = self.blocked_until_ms.load(Ordering::Relaxed);
        let until = self.origin + Duration::from_millis(ms);
        (ms > 0 && until > Instant::now()).then_some(until)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_cool_down_is_capped_however_long_ory_asks_for() {
        let limiter = OryLimiter::new(Limiter::Whoami, None, Duration::from_millis(50));
        // Unbounded, this overflowed the clock and panicked the calling task.
        limiter.back_off(Duration::MAX);
        let Err(OryError::RateLimited {
            retry_after: Some(after),
        }) = limiter.acquire().await
        else {
            panic!("not held back");
        };
        assert!(after <= super::super::MAX_RETRY_AFTER, "{after:?}");
    }

    #[tokio::test]
    async fn cool_down_longer_than_the_wait_fails_fast() {
        let limiter = OryLimiter::new(Limiter::Whoami, None, Duration::from_millis(50));
        limiter.acquire().await.unwrap();
        limiter.back_off(Duration::from_secs(30));
        let err = limiter.acquire().await.unwrap_err();
        let OryError::RateLimited {
            retry_after: Some(after),
        } = err
        else {
            panic!("not rate limited: {err:?}")
        };
        assert!(after > Duration::from_secs(29));
    }

    #[tokio::test(start_paused = true)]
    async fn short_cool_down_is_waited_out() {
        let limiter = OryLimiter::new(Limiter::Whoami, None, Duration::from_secs(5));
        limiter.back_off(Duration::from_secs(2));
        let started = Instant::now();
        limiter.acquire().await.unwrap();
        assert!(started.elapsed() >= Duration::from_secs(2));
    }
}
