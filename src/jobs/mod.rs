//! Walks over every Ory identity, run by `idmap backfill` and `idmap reconcile` rather than by a
//! request: link the identities that have no user, and find (and repair) drift between users and
//! identities. They share the paging, retry and stop rules of [`walk`].

mod backfill;
mod reconcile;
mod walk;

pub use backfill::{BackfillObserver, BackfillOptions, BackfillReport, DEFAULT_PAGE_SIZE};
pub use reconcile::{Drift, DriftKind, ReconcileObserver, ReconcileOptions, ReconcileReport};
pub use walk::{MAX_PAGE_SIZE, RetryPolicy, Stopped, describe as describe_error};

use std::sync::Arc;

use tokio::sync::Notify;

use crate::ory::KratosClient;
use crate::service::IdentityMapper;
use crate::store::Store;

/// The walks, over the same store, Ory client and link path as the request path.
pub struct Jobs {
    /// Links go through the same use case as LinkIdentity and the registration hook.
    mapper: Arc<IdentityMapper>,
    store: Store,
    ory: KratosClient,
    /// Wakes a local outbox worker after a repair queued an Ory write.
    outbox_wakeup: Arc<Notify>,
}

impl Jobs {
    pub fn new(
        mapper: Arc<IdentityMapper>,
        store: Store,
        ory: KratosClient,
        outbox_wakeup: Arc<Notify>,
    ) -> Self {
        Self {
            mapper,
            store,
            ory,
            outbox_wakeup,
        }
    }
}
