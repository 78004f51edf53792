//! The use cases the gRPC layer calls: resolve a session, look a user up, link an identity. They
//! orchestrate the store and Ory and own the decisions; they know nothing of protobuf, SQL or HTTP.

mod link;
mod lookup;
mod registration;
mod resolve;

use std::sync::Arc;

use tokio::sync::Notify;

use crate::ory::KratosClient;
use crate::store::Store;

pub use registration::Reservation;
pub use resolve::Resolved;

/// Behaviour switches for the use cases.
#[derive(Debug, Clone)]
pub struct ServiceSettings {
    /// Link a user just in time when ResolveSession sees an identity without one.
    pub auto_link: bool,
    /// An extra session cookie name to accept (Kratos's `session.cookie.name`).
    pub session_cookie_name: Option<String>,
}

/// The identity mapper: the use cases behind every RPC.
pub struct IdentityMapper {
    store: Store,
    ory: KratosClient,
    settings: ServiceSettings,
    /// Wakes the local outbox worker after a commit that queued an Ory write, so the write usually
    /// lands well within a second instead of waiting for the next poll.
    outbox_wakeup: Arc<Notify>,
}

impl IdentityMapper {
    pub fn new(
        store: Store,
        ory: KratosClient,
        settings: ServiceSettings,
        outbox_wakeup: Arc<Notify>,
    ) -> Self {
        Self {
            store,
            ory,
            settings,
            outbox_wakeup,
        }
    }

    pub fn settings(&self) -> &ServiceSettings {
        &self.settings
    }
}
