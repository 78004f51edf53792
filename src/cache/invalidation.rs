//! Cache evictions across replicas. Replicas share one PostgreSQL and hear each other through
//! LISTEN/NOTIFY on one channel: no new infrastructure. An eviction is applied locally at once and
//! announced; every replica keeps one dedicated listening connection (`worker::listener`),
//! reconnects when it drops, and clears its caches after a reconnect, since it may have missed
//! announcements meanwhile.
//!
//! Payloads name what to evict (a session-key hash, a session id, an identity id), never a secret.

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use uuid::Uuid;

use super::{Caches, SessionKey};
use crate::domain::IdentityId;
use crate::metrics::{self, EvictionOrigin};
use crate::store::{SharedTarget, Store, StoreError};

/// The NOTIFY channel.
pub const CHANNEL: &str = "idmap_invalidate";

/// Something to evict.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Eviction {
    /// One credential's cached answer.
    SessionKey(SessionKey),
    /// Every cached entry of one Ory session.
    SessionId(String),
    /// Every cached session of an identity, and its user.
    Identity(IdentityId),
    /// The identity's cached user only (after a write changed it).
    User(IdentityId),
}

#[derive(Debug, Serialize, Deserialize)]
struct Payload {
    /// The announcing replica, which has applied the eviction already.
    origin: Uuid,
    kind: String,
    value: String,
}

impl Eviction {
    fn to_payload(&self, origin: Uuid) -> Payload {
        let (kind, value) = match self {
            Self::SessionKey(key) => ("session_key", hex::encode(key)),
            Self::SessionId(id) => ("session_id", id.clone()),
            Self::Identity(id) => ("identity", id.to_string()),
            Self::User(id) => ("user", id.to_string()),
        };
        Payload {
            origin,
            kind: kind.to_owned(),
            value,
        }
    }

    fn from_payload(payload: &Payload) -> Option<Self> {
        let identity = || {
            Uuid::try_parse(&payload.value)
                .ok()
                .map(IdentityId::from_uuid)
        };
        match payload.kind.as_str() {
            "session_key" => {
                let bytes = hex::decode(&payload.value).ok()?;
                Some(Self::SessionKey(bytes.try_into().ok()?))
            }
            "session_id" => Some(Self::SessionId(payload.value.clone())),
            "identity" => identity().map(Self::Identity),
            "user" => identity().map(Self::User),
            _ => None,
        }
    }
}

/// Applies evictions here and announces them to the other replicas.
#[derive(Clone)]
pub struct Invalidator {
    store: Store,
    caches: Arc<Caches>,
    origin: Uuid,
    counts: Arc<Counts>,
}

/// Running totals of this replica's traffic on the channel. PostgreSQL delivers notifications in
/// commit order, so once a replica has heard as many as the others announced, it has applied every
/// one of them: a caller can wait for that instead of polling the cache.
struct Counts {
    /// Evictions announced (their NOTIFY committed).
    announced: watch::Sender<u64>,
    /// Other replicas' notifications handled, whatever they held.
    heard: watch::Sender<u64>,
    /// Times the listening connection was lost and made again (caches cleared each time).
    reconnects: watch::Sender<u64>,
}

impl Invalidator {
    pub fn new(store: Store, caches: Arc<Caches>) -> Self {
        Self {
            store,
            caches,
            origin: Uuid::new_v4(),
            counts: Arc::new(Counts {
                announced: watch::Sender::new(0),
                heard: watch::Sender::new(0),
                reconnects: watch::Sender::new(0),
            }),
        }
    }

    /// Evicts locally, then tells every other replica.
    pub async fn announce(&self, eviction: Eviction) -> Result<(), StoreError> {
        apply(&self.caches, &eviction).await;
        let payload = serde_json::to_string(&eviction.to_payload(self.origin))
            .map_err(|e| StoreError::Query(format!("encoding an eviction: {e}")))?;
        // The shared level's entries go in the same statement as the announcement, so no
        // replica can read one back once it is made.
        let target = match &eviction {
            Eviction::SessionKey(key) => SharedTarget::Fingerprint(key),
            Eviction::SessionId(id) => SharedTarget::SessionId(id),
            Eviction::Identity(id) => SharedTarget::Identity(*id),
            Eviction::User(_) => SharedTarget::None,
        };
        self.store
            .notify_and_delete(CHANNEL, &payload, target)
            .await?;
        self.counts.announced.send_modify(|n| *n += 1);
        metrics::get().eviction(EvictionOrigin::Local);
        Ok(())
    }

    /// How many evictions this replica has announced so far.
    pub fn announced(&self) -> watch::Receiver<u64> {
        self.counts.announced.subscribe()
    }

    /// How many notifications of other replicas this replica has handled (applied, or ignored as
    /// unreadable) so far.
    pub fn heard(&self) -> watch::Receiver<u64> {
        self.counts.heard.subscribe()
    }

    /// Forgets every cached entry: after the listening connection was lost, announcements made
    /// meanwhile are lost too, and anything cached may have been evicted elsewhere.
    pub fn missed_announcements(&self) {
        self.caches.clear();
        self.counts.reconnects.send_modify(|n| *n += 1);
    }

    /// How many times the listening connection has been made again so far.
    pub fn reconnects(&self) -> watch::Receiver<u64> {
        self.counts.reconnects.subscribe()
    }

    /// Applies one notification heard on [`CHANNEL`]; this replica's own are skipped, as they were
    /// applied when announced.
    pub async fn receive(&self, raw: &str) {
        match serde_json::from_str::<Payload>(raw) {
            Ok(payload) if payload.origin == self.origin => return,
            Ok(payload) => match Eviction::from_payload(&payload) {
                Some(eviction) => apply(&self.caches, &eviction).await,
                None => tracing::warn!(kind = payload.kind, "ignoring an unknown invalidation"),
            },
            Err(_) => tracing::warn!("ignoring a malformed invalidation payload"),
        }
        self.counts.heard.send_modify(|n| *n += 1);
        metrics::get().eviction(EvictionOrigin::Heard);
    }
}

async fn apply(caches: &Caches, eviction: &Eviction) {
    match eviction {
        Eviction::SessionKey(key) => caches.evict_session_key(key).await,
        Eviction::SessionId(id) => caches.evict_session_id(id),
        Eviction::Identity(id) => caches.evict_identity(*id).await,
        Eviction::User(id) => caches.evict_user(*id).await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_round_trip_and_carry_no_secret() {
        let origin = Uuid::new_v4();
        let identity = IdentityId::from_uuid(Uuid::new_v4());
        for eviction in [
            Eviction::SessionKey([7; 32]),
            Eviction::SessionId(Uuid::new_v4().to_string()),
            Eviction::Identity(identity),
            Eviction::User(identity),
        ] {
            let payload = eviction.to_payload(origin);
            let json = serde_json::to_string(&payload).unwrap();
            let back: Payload = serde_json::from_str(&json).unwrap();
            assert_eq!(Eviction::from_payload(&back), Some(eviction));
        }
    }
}
