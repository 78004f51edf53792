use super::IdentityMapper;
use crate::cache::invalidation::Eviction;
use crate::domain::{Credential, IdentityId};
use crate::error::Error;

/// What InvalidateSession evicts.
#[derive(Debug, Clone)]
pub enum InvalidateTarget {
    /// One credential, and every other entry of the session it resolved to.
    Credential(Credential),
    /// One Ory session (its id, as Ory gives it).
    SessionId(String),
    /// Every session of an identity, and its user.
    Identity(IdentityId),
}

impl IdentityMapper {
    /// Evicts cached sessions here and on every other replica.
    pub async fn invalidate(&self, target: InvalidateTarget) -> Result<(), Error> {
        let mut evictions = Vec::with_capacity(2);
        match target {
            InvalidateTarget::Credential(credential) => {
                let key = credential.fingerprint();
                // The same session may be cached under its cookie too; its id reaches those.
                if let Some(session_id) = self.caches.cached_session_id(&key).await {
                    evictions.push(Eviction::SessionId(session_id));
                }
                evictions.push(Eviction::SessionKey(key));
            }
            InvalidateTarget::SessionId(id) => evictions.push(Eviction::SessionId(id)),
            InvalidateTarget::Identity(id) => evictions.push(Eviction::Identity(id)),
        }
        for eviction in evictions {
            self.invalidator.announce(eviction).await?;
        }
        Ok(())
    }
}
