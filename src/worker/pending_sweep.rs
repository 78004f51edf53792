//! The pending-user sweep: removes user ids the pre-persist registration hook reserved that no
//! identity claimed within `IDMAP_PENDING_USER_TTL` (the registration failed after the hook, for
//! example on a duplicate email, or Kratos retried the hook and stored another attempt's answer).
//!
//! Sweeping loses nothing that matters: a reservation's id is only ever stored in Ory, on an identity
//! that exists if the registration went through, and linking adopts whatever id `metadata_public.id`
//! names, so an identity that turns up after its reservation was swept still gets that id. Each
//! replica sweeps; the delete skips rows another replica or a claim holds.

use chrono::{DateTime, Utc};
use tokio_util::sync::CancellationToken;

use crate::config::PendingSettings;
use crate::store::{Store, StoreError};

pub struct PendingSweeper {
    store: Store,
    settings: PendingSettings,
}

impl PendingSweeper {
    pub fn new(store: Store, settings: PendingSettings) -> Self {
        Self { store, settings }
    }

    /// Removes the pending users that are older than the TTL at `now`; returns how many.
    pub async fn sweep(&self, now: DateTime<Utc>) -> Result<u64, StoreError> {
        let ttl = chrono::Duration::from_std(self.settings.ttl).unwrap_or(chrono::Duration::MAX);
        let cutoff = now
            .checked_sub_signed(ttl)
            .unwrap_or(DateTime::<Utc>::MIN_UTC);
        let removed = self.store.sweep_pending_users(cutoff).await?;
        if removed > 0 {
            tracing::info!(
                removed,
                "removed pending users no identity claimed within the TTL"
            );
        }
        Ok(removed)
    }

    /// Sweeps every interval until `shutdown` fires.
    pub async fn run(self, shutdown: CancellationToken) {
        tracing::debug!("pending-user sweep started");
        loop {
            // This host's clock against created_at from the database's: any sane skew is far below
            // the TTL.
            if let Err(e) = self.sweep(Utc::now()).await {
                tracing::warn!(error = %e, "pending-user sweep failed; will retry");
            }
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tokio::time::sleep(self.settings.sweep_interval) => {}
            }
        }
        tracing::debug!("pending-user sweep stopped");
    }
}
