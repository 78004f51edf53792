//! Removes expired entries of the shared session cache. Expired entries are never served (reads
//! compare `expires_at` with the database's clock), so the sweep only keeps the table as small as
//! the sessions in use. Each replica sweeps; the delete skips rows another replica holds.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::store::Store;

/// How often expired entries are removed: a minute's worth of expired rows costs little.
const SWEEP_INTERVAL: Duration = Duration::from_secs(30);

/// Sweeps until `shutdown` fires.
pub async fn run(store: Store, shutdown: CancellationToken) {
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(SWEEP_INTERVAL) => {}
        }
        match store.sweep_shared_sessions().await {
            Ok(removed) if removed > 0 => {
                tracing::debug!(removed, "removed expired shared session entries");
            }
            Ok(_) => {}
            Err(e) => tracing::debug!(error = %e, "shared session sweep failed; will retry"),
        }
    }
}
