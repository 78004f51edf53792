//! Hears other replicas' evictions (`cache::invalidation`) on a dedicated LISTEN connection, and
//! reconnects with backoff when it drops.

use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::cache::invalidation::{CHANNEL, Invalidator};
use crate::store::{Store, StoreError};

/// Listens for other replicas' evictions until `shutdown`. `listening` turns true once the first
/// LISTEN is in place, so a server can wait for it before it serves.
pub async fn run(
    invalidator: Invalidator,
    store: Store,
    heartbeat: Duration,
    listening: watch::Sender<bool>,
    shutdown: CancellationToken,
) {
    let mut failures: u32 = 0;
    let mut connected_before = false;
    loop {
        let session = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = listen_once(&invalidator, &store, heartbeat, &listening, &mut connected_before) => r,
        };
        failures = failures.saturating_add(1);
        let delay = Duration::from_millis(100)
            .saturating_mul(1 << failures.min(6))
            .min(Duration::from_secs(5));
        tracing::warn!(error = %session, retry_in_ms = delay.as_millis() as u64, "invalidation listener lost its connection");
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(delay) => {}
        }
    }
}

/// One connection's life, until it fails.
async fn listen_once(
    invalidator: &Invalidator,
    store: &Store,
    heartbeat: Duration,
    listening: &watch::Sender<bool>,
    connected_before: &mut bool,
) -> StoreError {
    let mut notifications = match store.listen(CHANNEL).await {
        Ok(n) => n,
        Err(e) => return e,
    };
    if *connected_before {
        invalidator.missed_announcements();
        tracing::info!("invalidation listener reconnected; caches cleared");
    }
    *connected_before = true;
    listening.send_replace(true);
    let mut beats = tokio::time::interval(heartbeat);
    beats.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    beats.tick().await;
    loop {
        tokio::select! {
            payload = notifications.next() => match payload {
                Some(payload) => invalidator.receive(&payload).await,
                None => return notifications.ended().await,
            },
            // A half-open connection hears nothing and says nothing: ask it something, and treat
            // silence as a lost connection, so it is noticed within two heartbeats.
            _ = beats.tick() => {
                if let Err(e) = notifications.ping(heartbeat).await {
                    return e;
                }
            }
        }
    }
}
