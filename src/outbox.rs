//! The outbox worker: delivers the Ory writes that committed links queued (today: the internal user
//! id into `metadata_public.id`). Rows are claimed with `FOR UPDATE SKIP LOCKED` under a lease, so
//! replicas share the work without delivering a row twice at once, and a crash only delays a row.
//! Failures are retried with exponential backoff (Ory's `Retry-After` wins when longer); failures
//! that retrying cannot fix are parked with their error for operators.

use std::sync::Arc;
use std::time::Duration;

use rand::RngExt;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::ory::{KratosClient, MetadataWrite, OryError};
use crate::store::{OutboxKind, OutboxRow, Store};

/// Timing of the worker.
#[derive(Debug, Clone)]
pub struct OutboxSettings {
    /// Rows claimed per round.
    pub batch_size: i64,
    /// How long a claimed row stays invisible to other workers.
    pub lease: Duration,
    /// First retry delay; doubles per attempt.
    pub retry_min: Duration,
    /// Longest retry delay.
    pub retry_max: Duration,
    /// Longest sleep between looks at the table (rows queued by other replicas are seen this late).
    pub poll_interval: Duration,
}

impl Default for OutboxSettings {
    fn default() -> Self {
        Self {
            batch_size: 32,
            lease: Duration::from_secs(60),
            retry_min: Duration::from_secs(1),
            retry_max: Duration::from_secs(300),
            poll_interval: Duration::from_secs(1),
        }
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

    /// Delivers until `shutdown` fires; a delivery in progress is finished first.
    pub async fn run(self, shutdown: CancellationToken) {
        tracing::debug!("outbox worker started");
        let mut store_failures: u32 = 0;
        loop {
            if shutdown.is_cancelled() {
                break;
            }
            let wait = match self.round().await {
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

    /// Claims and delivers one batch; returns whether a full batch was claimed (more may be due).
    async fn round(&self) -> Result<bool, crate::store::StoreError> {
        let rows = self
            .store
            .claim_outbox(self.settings.batch_size, self.settings.lease)
            .await?;
        let full = rows.len() as i64 == self.settings.batch_size;
        for row in rows {
            self.deliver(row).await?;
        }
        Ok(full)
    }

    async fn deliver(&self, row: OutboxRow) -> Result<(), crate::store::StoreError> {
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
        match kind {
            OutboxKind::SetMetadataPublicId => {}
        }
        let result = self
            .ory
            .set_metadata_public_id(row.ory_identity_id, row.user_id)
            .await;
        match result {
            Ok(MetadataWrite::Written | MetadataWrite::AlreadySet) => {
                tracing::info!(
                    identity = %row.ory_identity_id,
                    user = %row.user_id,
                    attempts = row.attempts,
                    "metadata_public.id written to Ory"
                );
                self.store.complete_outbox(row.id).await
            }
            Ok(MetadataWrite::NotAnObject) => {
                tracing::error!(
                    identity = %row.ory_identity_id,
                    "metadata_public is neither an object nor null; not overwriting it"
                );
                self.store
                    .fail_outbox(row.id, "metadata_public is neither an object nor null")
                    .await
            }
            Err(OryError::NotFound) => {
                tracing::warn!(identity = %row.ory_identity_id, "identity is gone from Ory; dropping its metadata write");
                self.store
                    .fail_outbox(row.id, "the identity does not exist in Ory")
                    .await
            }
            Err(e) => {
                let mut delay = self.backoff(row.attempts.max(1) as u32);
                if let OryError::RateLimited {
                    retry_after: Some(hint),
                } = &e
                {
                    delay = delay.max(*hint);
                }
                if e.is_transient() {
                    tracing::warn!(identity = %row.ory_identity_id, error = %e, retry_in_ms = delay.as_millis() as u64, "Ory write failed; will retry");
                } else {
                    tracing::error!(identity = %row.ory_identity_id, error = %e, retry_in_ms = delay.as_millis() as u64, "Ory write failed; will retry");
                }
                self.store.retry_outbox(row.id, delay, &e.to_string()).await
            }
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
