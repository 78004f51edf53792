//! The use cases the gRPC layer calls: resolve a session, look a user up, link an identity. They
//! orchestrate the store and Ory and own the decisions; they know nothing of protobuf, SQL or HTTP.

mod assert;
mod external_ids;
mod invalidate;
mod link;
mod lookup;
mod registration;
mod resolve;

use std::sync::Arc;

use tokio::sync::Notify;

use crate::assertion::AssertionKeys;
use crate::cache::Caches;
use crate::cache::invalidation::{Eviction, Invalidator};
use crate::config::ServiceSettings;
use crate::domain::User;
use crate::ory::KratosClient;
use crate::store::Store;

pub use external_ids::MAX_ORY_EXTERNAL_ID_CHARS;
pub use invalidate::InvalidateTarget;
pub use link::LinkError;
pub use lookup::{Found, MAX_BATCH_IDS};
pub use registration::Reservation;
pub use resolve::Resolved;

/// The identity mapper: the use cases behind every RPC.
pub struct IdentityMapper {
    store: Store,
    ory: KratosClient,
    settings: ServiceSettings,
    caches: Arc<Caches>,
    invalidator: Invalidator,
    /// Wakes the local outbox worker after a commit that queued an Ory write, so the write usually
    /// lands well within a second instead of waiting for the next poll.
    outbox_wakeup: Arc<Notify>,
    /// The keys signed identity assertions are made with (IDMAP_ASSERTION_KEY), if any.
    assertion_keys: Option<Arc<AssertionKeys>>,
}

impl IdentityMapper {
    pub fn new(
        store: Store,
        ory: KratosClient,
        settings: ServiceSettings,
        caches: Arc<Caches>,
        outbox_wakeup: Arc<Notify>,
    ) -> Self {
        let invalidator = Invalidator::new(store.clone(), caches.clone());
        Self {
            store,
            ory,
            settings,
            caches,
            invalidator,
            outbox_wakeup,
            assertion_keys: None,
        }
    }

    /// Signs identity assertions with `keys` (the first signs; all are published as JWKS).
    pub fn with_assertion_keys(mut self, keys: Option<Arc<AssertionKeys>>) -> Self {
        self.assertion_keys = keys;
        self
    }

    pub fn settings(&self) -> &ServiceSettings {
        &self.settings
    }

    /// The evictions announcer, for the listener task that applies other replicas' evictions.
    pub fn invalidator(&self) -> &Invalidator {
        &self.invalidator
    }

    /// After a write changed a user: evict it on every replica, then cache the new state here.
    /// The write has committed, so a failed announcement is logged, not returned: other replicas
    /// then serve the old user for at most the user cache's TTL.
    pub async fn user_written(&self, user: &User) {
        if let Err(e) = self
            .invalidator
            .announce(Eviction::User(user.ory_identity_id))
            .await
        {
            tracing::warn!(error = %e, identity = %user.ory_identity_id, "cannot announce a user change to other replicas");
        }
        self.caches.put_user(user.clone()).await;
    }
}
