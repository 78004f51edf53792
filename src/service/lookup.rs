use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use super::{IdentityMapper, LinkError};
use crate::domain::{ExternalId, IdentityId, LinkConflict, LinkRequest, Namespace, User};
use crate::error::{Error, reason};

/// What GetByExternalId found.
#[derive(Debug, Clone)]
pub struct Found {
    pub user: Arc<User>,
    /// The user no longer holds the value: it is the one that last held it.
    pub former: bool,
}

/// The most ids BatchGetUsers (and values BatchGetByExternalIds) takes in one call.
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

    /// The user holding `value` in `namespace`: through the cache, else the store; in the
    /// namespace mirrored to Ory, else Ory's `external_id` (linking its identity just in time);
    /// with `include_former`, else the user that last held it.
    pub async fn user_by_external_id(
        &self,
        namespace: &Namespace,
        value: &ExternalId,
        include_former: bool,
    ) -> Result<Found, Error> {
        if let Some(user) = self.held_by(namespace, value).await? {
            return Ok(Found {
                user,
                former: false,
            });
        }
        if self.settings.ory_external_id_namespace.as_ref() == Some(namespace)
            && let Some(user) = Box::pin(self.user_known_to_ory(namespace, value)).await?
        {
            return Ok(Found {
                user,
                former: false,
            });
        }
        if include_former
            && let Some(user) = self
                .store
                .user_by_former_external_id(namespace, value)
                .await?
        {
            return Ok(Found {
                user: self.caches.put_user(user).await,
                former: true,
            });
        }
        Err(Error::NotFound {
            reason: reason::USER_NOT_FOUND,
            message: if namespace.is_default() {
                "no user holds that external id".into()
            } else {
                format!("no user holds that external id in namespace {namespace}")
            },
            resource_type: "idmap.v1.User",
            resource_name: format!("external_id/{namespace}/{value}"),
        })
    }

    /// The user holding `value` in `namespace` now, as idmap knows it.
    async fn held_by(
        &self,
        namespace: &Namespace,
        value: &ExternalId,
    ) -> Result<Option<Arc<User>>, Error> {
        if let Some(identity) = self
            .caches
            .identity_for_external_id(namespace, value.as_str())
            .await
        {
            // The index may be older than the user it points at; trust it only if the user agrees.
            if let Some(user) = self.cached_user(identity).await?
                && user.holds(namespace, value)
            {
                return Ok(Some(user));
            }
            self.caches
                .forget_external_id(namespace, value.as_str())
                .await;
        }
        match self.store.user_by_external_id(namespace, value).await? {
            Some(user) => Ok(Some(self.caches.put_user(user).await)),
            None => Ok(None),
        }
    }

    /// Asks Ory which identity has `value` as its `external_id` (a value idmap does not hold in
    /// the mirrored namespace): its user, linked just in time (unless IDMAP_AUTO_LINK=false) and
    /// adopting the value. `None` when Ory has none, or when the identity's user holds another
    /// value there (idmap's record stands; `idmap reconcile` reports the mismatch).
    async fn user_known_to_ory(
        &self,
        namespace: &Namespace,
        value: &ExternalId,
    ) -> Result<Option<Arc<User>>, Error> {
        let ory = &self.ory;
        let Some(identity) = self
            .caches
            .ask_ory_for_external_id(namespace, value.as_str(), || {
                ory.get_identity_by_external_id(value.as_str())
            })
            .await?
        else {
            return Ok(None);
        };
        match self.cached_user(identity.id).await? {
            Some(user) if user.holds(namespace, value) => return Ok(Some(user)),
            Some(user) if user.external_id(namespace).is_some() => {
                tracing::warn!(
                    identity = %identity.id,
                    user = %user.id,
                    %namespace,
                    "Ory's external_id differs from the user's value in the mirrored namespace; idmap's stands"
                );
                return Ok(None);
            }
            None if !self.settings.auto_link => return Ok(None),
            _ => {}
        }
        let request = LinkRequest {
            ory_identity_id: identity.id,
            user_id: None,
            external_ids: Vec::new(),
        };
        let outcome = match self.link_seen_identity(request, &identity).await {
            Ok(outcome) => outcome,
            // A concurrent link of the identity won; its user answers.
            Err(LinkError::Conflict {
                conflict: LinkConflict::IdentityLinked { .. },
                ..
            }) => {
                return Ok(self
                    .cached_user(identity.id)
                    .await?
                    .filter(|user| user.holds(namespace, value)));
            }
            Err(e) => return Err(e.into()),
        };
        Ok(outcome
            .user
            .holds(namespace, value)
            .then(|| Arc::new(outcome.user)))
    }

    /// The users holding any of `values` in `namespace`, in request order, each once; cached
    /// ones from memory and the rest in one query. Reads idmap's store only, never Ory.
    pub async fn users_by_external_ids(
        &self,
        namespace: &Namespace,
        values: &[ExternalId],
    ) -> Result<Vec<Arc<User>>, Error> {
        let mut seen = HashSet::with_capacity(values.len());
        let unique: Vec<&ExternalId> = values.iter().filter(|v| seen.insert(*v)).collect();
        let mut found: Vec<Option<Arc<User>>> = vec![None; unique.len()];
        let mut missing = Vec::new();
        for (i, value) in unique.iter().enumerate() {
            let cached = match self
                .caches
                .identity_for_external_id(namespace, value.as_str())
                .await
            {
                Some(identity) => self
                    .caches
                    .user(&identity)
                    .await
                    .filter(|user| user.holds(namespace, value)),
                None => None,
            };
            match cached {
                Some(user) => found[i] = Some(user),
                None => missing.push((*value).clone()),
            }
        }
        if !missing.is_empty() {
            let position: HashMap<&ExternalId, usize> =
                unique.iter().enumerate().map(|(i, v)| (*v, i)).collect();
            for user in self
                .store
                .users_by_external_ids(namespace, &missing)
                .await?
            {
                let user = self.caches.put_user(user).await;
                if let Some(i) = user.external_id(namespace).and_then(|v| position.get(v)) {
                    found[*i] = Some(user);
                }
            }
        }
        Ok(found.into_iter().flatten().collect())
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
        let position: HashMap<IdentityId, usize> =
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
