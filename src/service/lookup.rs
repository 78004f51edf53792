use std::collections::HashSet;
use std::sync::Arc;

use super::IdentityMapper;
use crate::domain::{ExternalId, IdentityId, User};
use crate::error::{Error, reason};

/// The most ids BatchGetUsers takes in one call.
pub const MAX_BATCH_IDS: usize = 1000;

impl IdentityMapper {
    /// The user linked to an Ory identity: from the cache, else the store. Never Ory.
    pub async fn user_by_identity(&self, id: IdentityId) -> Result<Arc<User>, Error> {
        self.cached_user(id).await?.ok_or_else(|| Error::NotFound {
            reason: reason::USER_NOT_FOUND,
            message: format!("no user is linked to Ory identity {id}"),
            resource_type: "idmap.v1.User",
            resource_name: format!("ory_identity_id/{id}"),
        })
    }

    /// The user linked to an identity, if any, through the cache.
    pub(super) async fn cached_user(&self, id: IdentityId) -> Result<Option<Arc<User>>, Error> {
        let store = &self.store;
        Ok(self
            .caches
            .user_or_load(id, || store.user_by_identity(id))
            .await?)
    }

    /// The user holding an external id: through the cache, else the store. Never Ory.
    pub async fn user_by_external_id(&self, external_id: &ExternalId) -> Result<Arc<User>, Error> {
        if let Some(identity) = self
            .caches
            .identity_for_external_id(external_id.as_str())
            .await
        {
            // The index may be older than the user it points at; trust it only if the user agrees.
            if let Some(user) = self.cached_user(identity).await?
                && user.external_id.as_ref() == Some(external_id)
            {
                return Ok(user);
            }
            self.caches.forget_external_id(external_id.as_str()).await;
        }
        match self.store.user_by_external_id(external_id).await? {
            Some(user) => Ok(self.caches.put_user(user).await),
            None => Err(Error::NotFound {
                reason: reason::USER_NOT_FOUND,
                message: "no user holds that external id".into(),
                resource_type: "idmap.v1.User",
                resource_name: format!("external_id/{external_id}"),
            }),
        }
    }

    /// The users linked to `ids`, in request order, each once; cached ones from memory and the rest
    /// in one query.
    pub async fn users_by_identities(&self, ids: &[IdentityId]) -> Result<Vec<Arc<User>>, Error> {
        let mut seen = HashSet::with_capacity(ids.len());
        let unique: Vec<IdentityId> = ids.iter().copied().filter(|id| seen.insert(*id)).collect();
        let mut found = Vec::with_capacity(unique.len());
        let mut missing = Vec::new();
        for id in &unique {
            match self.caches.user(id).await {
                Some(user) => found.push(user),
                None => missing.push(*id),
            }
        }
        for user in self.store.users_by_identities(&missing).await? {
            found.push(self.caches.put_user(user).await);
        }
        let position: std::collections::HashMap<IdentityId, usize> =
            unique.iter().enumerate().map(|(i, id)| (*id, i)).collect();
        found.sort_by_key(|u| {
            position
                .get(&u.ory_identity_id)
                .copied()
                .unwrap_or(usize::MAX)
        });
        Ok(found)
    }
}
