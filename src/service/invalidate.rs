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
                // The same session may be cached under its cookie too, on this replica or others
                // that never saw this token; its id reaches those. Any replica that resolved the
                // token left the id in the shared level.
                let session_id = match self.caches.cached_session_id(&key).await {
                    Some(id) => Some(id),
                    None => match self.caches.shared() {
                        Some(shared) => shared.session_id(&key).await,
                        None => None,
                    },
                };
                if let Some(session_id) = session_id {
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
