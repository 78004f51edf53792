//! The outbox worker: delivers the Ory writes that committed changes queued: the internal user id
//! into `metadata_public.id`, and the value in the namespace mirrored to Ory into `external_id`. Rows are claimed with `FOR UPDATE SKIP LOCKED` under a lease, so
//! replicas share the work without delivering a row twice at once, and a crash only delays a row.
//! Failures are retried with exponential backoff (Ory's `Retry-After` wins when longer); failures
//! that retrying cannot fix are parked with their error for operators.
//!
//! A row is only started while its lease has room for the longest delivery can take
//! ([`OutboxSettings::row_budget`]), so a slow Ory never lets another replica claim a row this one
//! is still delivering; rows the lease has no room left for, and rows a stopping worker will not
//! get to, are released (due again at once) rather than left invisible until the lease ends.

use std::sync::Arc;
use std::time::Duration;

use rand::RngExt;
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::config::{ENV_ORY_ADMIN_URL, ENV_ORY_API_KEY, OutboxSettings};
use crate::domain::ExternalId;
use crate::ory::{KratosClient, MetadataWrite, OryError};
use crate::store::{OutboxKind, OutboxRow, Store, StoreError};

/// Attempts a row gets when Ory rejects the write itself (400, 409, an answer that breaks Ory's
/// contract) before it is parked: such an answer rarely changes, but a proxy's hiccup can look like
/// one, so it is not believed the first time.
pub const MAX_REJECTED_ATTEMPTS: i32 = 3;

/// How a delivery ended, when Ory answered.
enum Outcome {
    /// Written (or nothing to write); the row is done.
    Done(&'static str),
    /// Retrying cannot fix it; the row is parked with this reason for an operator.
    Park(String),
}

/// Why a delivery failed.
enum Failure {
    Ory(OryError),
    Store(StoreError),
}

impl From<OryError> for Failure {
    fn from(e: OryError) -> Self {
        Self::Ory(e)
    }
}

pub struct OutboxWorker {
    store: Store,
    ory: KratosClient,
    settings: OutboxSettings,
    wakeup: Arc<Notify>,
}

impl OutboxWorker {
    pub fn new(
        store: Store,
        ory: KratosClient,
        settings: OutboxSettings,
        wakeup: Arc<Notify>,
    ) -> Self {
        Self {
            store,
            ory,
            settings,
            wakeup,
        }
    }

    /// Delivers until `shutdown` fires. Then it stops between rows, or abandons the Ory call in
    /// progress, and releases the rows it holds, so shutdown never waits for a slow Ory.
    pub async fn run(self, shutdown: CancellationToken) {
        tracing::debug!("outbox worker started");
        let mut store_failures: u32 = 0;
        loop {
            if shutdown.is_cancelled() {
                break;
            }
            let wait = match self.round(&shutdown).await {
                Ok(more) if more => Duration::ZERO,
                Ok(_) => {
                    store_failures = 0;
                    match self.store.next_outbox_due().await {
                        Ok(Some(due)) => due.min(self.settings.poll_interval),
                        Ok(None) => self.settings.poll_interval,
                        Err(e) => {
                            tracing::warn!(error = %e, "outbox: cannot read the next due time");
                            self.settings.poll_interval
                        }
                    }
                }
                Err(e) => {
                    store_failures = store_failures.saturating_add(1);
                    tracing::warn!(error = %e, "outbox: the store failed; backing off");
                    self.backoff(store_failures)
                }
            };
            if wait.is_zero() {
                continue;
            }
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = self.wakeup.notified() => {}
                _ = tokio::time::sleep(wait) => {}
            }
        }
        tracing::debug!("outbox worker stopped");
    }

    /// Claims and delivers one batch; returns whether more may be due (a full batch was claimed, or
    /// the lease ran short and rows were given back).
    async fn round(&self, shutdown: &CancellationToken) -> Result<bool, StoreError> {
        // Taken before the claim, so the lease this worker counts on ends no later than the one
        // PostgreSQL granted.
        let lease_ends = Instant::now() + self.settings.lease;
        let rows = self
            .store
            .claim_outbox(self.settings.batch_size, self.settings.lease)
            .await?;
        let full = rows.len() as i64 == self.settings.batch_size;
        let mut rows = rows.into_iter();
        let mut started = 0usize;
        while let Some(row) = rows.next() {
            let stopping = shutdown.is_cancelled();
            // The first row of a claim is always tried, so settings whose lease cannot fit a row
            // budget still make progress rather than claim and release forever.
            let no_room = started > 0 && Instant::now() + self.settings.row_budget > lease_ends;
            if stopping || no_room {
                let unstarted: Vec<i64> =
                    std::iter::once(row.id).chain(rows.map(|r| r.id)).collect();
                tracing::debug!(
                    rows = unstarted.len(),
                    stopping,
                    "outbox: releasing rows this worker will not deliver"
                );
                self.store.release_outbox(&unstarted, true).await?;
                return Ok(!stopping);
            }
            started += 1;
            self.deliver(row, shutdown).await?;
        }
        Ok(full)
    }

    async fn deliver(
        &self,
        row: OutboxRow,
        shutdown: &CancellationToken,
    ) -> Result<(), StoreError> {
        let Some(kind) = row.kind else {
            // Written by a newer replica; leave it to one that knows the kind.
            return self
                .store
                .retry_outbox(
                    row.id,
                    self.settings.retry_max,
                    &format!("unknown kind {}", row.kind_name),
                )
                .await;
        };
        let work = async {
            match kind {
                OutboxKind::SetMetadataPublicId => self.write_metadata(&row).await,
                OutboxKind::SyncExternalId => self.write_external_id(&row).await,
            }
        };
        let result = tokio::select! {
            result = tokio::time::timeout(self.settings.row_budget, work) => {
                result.unwrap_or_else(|_| Err(Failure::Ory(OryError::Unavailable("the delivery took longer than its budget".into()))))
            }
            () = shutdown.cancelled() => {
                // The write may or may not have landed; delivering it again is harmless, since a
                // delivery reads first and sends nothing when Ory already holds the value.
                tracing::info!(identity = %row.ory_identity_id, "outbox: stopping mid-delivery; releasing the row");
                return self.store.release_outbox(&[row.id], false).await;
            }
        };
        match result {
            Ok(Outcome::Done(what)) => {
                tracing::info!(
                    identity = %row.ory_identity_id,
                    user = %row.user_id,
                    attempts = row.attempts,
                    kind = row.kind_name,
                    "{what}"
                );
                if !self.store.complete_outbox(row.id, row.revision).await? {
                    tracing::debug!(identity = %row.ory_identity_id, "outbox: the row changed during delivery; delivering it again");
                }
                Ok(())
            }
            Ok(Outcome::Park(why)) => {
                tracing::error!(identity = %row.ory_identity_id, kind = row.kind_name, "{why}; parking the write");
                self.store.fail_outbox(row.id, &why).await
            }
            Err(Failure::Store(e)) => Err(e),
            Err(Failure::Ory(OryError::NotFound)) => {
                tracing::warn!(identity = %row.ory_identity_id, kind = row.kind_name, "identity is gone from Ory; dropping its write");
                self.store
                    .fail_outbox(row.id, "the identity does not exist in Ory")
                    .await
            }
            Err(Failure::Ory(e)) if !e.is_transient() && !e.is_misconfiguration() => {
                // Ory rejected the write itself (400, 409) or broke its contract: trying again is
                // unlikely to help, so after a few attempts the row is parked for an operator.
                let message = e.to_string();
                if row.attempts >= MAX_REJECTED_ATTEMPTS {
                    tracing::error!(identity = %row.ory_identity_id, error = %e, attempts = row.attempts, "Ory keeps rejecting the write; parking it");
                    return self.store.fail_outbox(row.id, &message).await;
                }
                let delay = self.backoff(row.attempts.max(1) as u32);
                tracing::error!(identity = %row.ory_identity_id, error = %e, retry_in_ms = delay.as_millis() as u64, "Ory rejected the write; will try again before parking it");
                self.store.retry_outbox(row.id, delay, &message).await
            }
            Err(Failure::Ory(e)) => {
                let mut delay = self.backoff(row.attempts.max(1) as u32);
                if let OryError::RateLimited {
                    retry_after: Some(hint),
                } = &e
                {
                    delay = delay.max(*hint);
                }
                if e.is_misconfiguration() {
                    // Not parked: every write queued while a setting is wrong would be stranded.
                    // Once the operator fixes it (and restarts), the backoff's next try delivers.
                    tracing::error!(identity = %row.ory_identity_id, error = %e, retry_in_ms = delay.as_millis() as u64, "Ory write refused; check {ENV_ORY_API_KEY} and {ENV_ORY_ADMIN_URL}; will retry");
                } else {
                    tracing::warn!(identity = %row.ory_identity_id, error = %e, retry_in_ms = delay.as_millis() as u64, "Ory write failed; will retry");
                }
                self.store.retry_outbox(row.id, delay, &e.to_string()).await
            }
        }
    }

    /// The internal user id into `metadata_public.id`.
    async fn write_metadata(&self, row: &OutboxRow) -> Result<Outcome, Failure> {
        match self
            .ory
            .set_metadata_public_id(row.ory_identity_id, row.user_id)
            .await?
        {
            MetadataWrite::Written | MetadataWrite::AlreadySet => {
                Ok(Outcome::Done("metadata_public.id written to Ory"))
            }
            MetadataWrite::NotAnObject => Ok(Outcome::Park(
                "metadata_public is neither an object nor null".into(),
            )),
        }
    }

    /// What the user holds in the mirrored namespace now into the identity's `external_id` (or
    /// clear it). The store is read at delivery, so however many changes the row absorbed, the
    /// newest is what Ory gets.
    async fn write_external_id(&self, row: &OutboxRow) -> Result<Outcome, Failure> {
        let Some(namespace) = &self.settings.external_id_namespace else {
            return Ok(Outcome::Done(
                "no namespace is mirrored to Ory (IDMAP_ORY_EXTERNAL_ID_NAMESPACE is unset); external_id write dropped",
            ));
        };
        let Some((identity, value)) = self
            .store
            .external_id_of(row.user_id, namespace)
            .await
            .map_err(Failure::Store)?
        else {
            return Ok(Outcome::Done("the user is gone; external_id write dropped"));
        };
        let value = value.as_ref().map(ExternalId::as_str);
        match self.ory.set_external_id(identity, value).await {
            Ok(_) => Ok(Outcome::Done("external_id written to Ory")),
            Err(OryError::Conflict) => Ok(Outcome::Park(format!(
                "Ory refused external_id {:?} with 409: another identity holds that external_id in Ory",
                value.unwrap_or_default()
            ))),
            Err(e) => Err(Failure::Ory(e)),
        }
    }

    /// Exponential backoff with ±20% jitter, so replicas that failed together do not retry together.
    fn backoff(&self, attempt: u32) -> Duration {
        let exp = attempt.saturating_sub(1).min(30);
        let base = self
            .settings
            .retry_min
            .saturating_mul(1u32 << exp)
            .min(self.settings.retry_max);
        let jitter = rand::rng().random_range(0.8..1.2);
        base.mul_f64(jitter).min(self.settings.retry_max)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_lease_always_has_room_for_the_slowest_delivery() {
        for secs in [1, 5, 30, 120] {
            let timeout = Duration::from_secs(secs);
            let settings = OutboxSettings::default().for_ory_timeout(timeout);
            // Two calls, each waiting up to the timeout for its turn and up to the timeout for Ory.
            assert!(settings.row_budget >= timeout * 4, "{secs}s");
            assert!(settings.lease >= settings.row_budget * 2, "{secs}s");
            assert!(settings.lease >= OutboxSettings::default().lease);
        }
        // The defaults are what the default IDMAP_ORY_TIMEOUT gives.
        let default = OutboxSettings::default();
        let derived = OutboxSettings::default().for_ory_timeout(Duration::from_secs(5));
        assert_eq!(default.row_budget, derived.row_budget);
        assert_eq!(default.lease, derived.lease);
    }
}
