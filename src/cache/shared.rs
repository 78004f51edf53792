//! The second level of the session cache, shared by every replica through PostgreSQL
//! (`IDMAP_SESSION_CACHE_SHARED`, on by default): a memory miss looks here before asking Ory, and
//! Ory's answers are written here, so a fleet asks Ory once per session per TTL rather than once
//! per replica. A memory hit never comes here.
//!
//! The level is an optimisation, never a dependency: when PostgreSQL cannot answer, a miss goes
//! to Ory as it would without it, and the failure is logged at debug level (readiness reports
//! the database's health).

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};

use super::SessionKey;
use crate::domain::SessionWithIdentity;
use crate::store::{SharedLookup, Store};

/// How long a replica re-validating a session holds its claim: past any whoami call with its
/// retries, so another replica takes over only from one that died.
const REFRESH_CLAIM: Duration = Duration::from_secs(30);

/// Longest an answer waits for its write to the shared level.
const PUT_WAIT: Duration = Duration::from_millis(100);

/// The shared level: the store, behind the decisions of when to use it.
#[derive(Clone)]
pub struct SharedSessions {
    store: Store,
}

impl SharedSessions {
    pub fn new(store: Store) -> Self {
        Self { store }
    }

    /// The shared entry for `key`, and the database's time of the look (`None`: the database did
    /// not answer).
    pub async fn lookup(&self, key: &SessionKey) -> Option<SharedLookup> {
        match self.store.shared_session(key).await {
            Ok(lookup) => Some(lookup),
            Err(e) => {
                tracing::debug!(error = %e, "shared session cache unavailable; asking Ory");
                None
            }
        }
    }

    /// Writes Ory's answer for others to find, unless an eviction of it ran since
    /// `loaded_since`. Waits for the write at most [`PUT_WAIT`], so that a replica asked right
    /// after this one answers usually finds it, while a slow database delays no answer by more;
    /// a write that takes longer finishes in the background.
    pub async fn put(
        &self,
        key: SessionKey,
        session: Arc<SessionWithIdentity>,
        ttl: Duration,
        loaded_since: DateTime<Utc>,
    ) {
        let store = self.store.clone();
        let write = tokio::spawn(async move {
            if let Err(e) = store
                .put_shared_session(&key, &session, ttl, loaded_since)
                .await
            {
                tracing::debug!(error = %e, "cannot write to the shared session cache");
            }
        });
        let _ = tokio::time::timeout(PUT_WAIT, write).await;
    }

    /// Claims the re-validation of `key`'s entry, due within `window`; `Some(now)` (the
    /// database's) if this replica should ask Ory, `None` if another replica has it in hand or
    /// the entry is gone.
    pub async fn claim_refresh(
        &self,
        key: &SessionKey,
        window: Duration,
    ) -> Result<Option<DateTime<Utc>>, crate::store::StoreError> {
        self.store
            .claim_shared_refresh(key, window, REFRESH_CLAIM)
            .await
    }

    /// The Ory session of a credential some replica has cached, if any has.
    pub async fn session_id(&self, key: &SessionKey) -> Option<String> {
        self.store.shared_session_id(key).await.ok().flatten()
    }
}
