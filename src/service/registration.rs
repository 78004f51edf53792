//! The Ory Actions webhook use cases: reserve a user id before Ory stores a new identity
//! (pre-persist), link a newly stored identity (post-persist), and keep a linked user in step after a
//! settings flow. None of them calls Ory: the identity in the webhook body is the source, and Kratos
//! is waiting on the answer inside the user's registration.

use super::IdentityMapper;
use super::LinkError;
use crate::domain::{Identity, LinkConflict, LinkOutcome, LinkRequest, User, UserId};
use crate::error::Error;

/// The user id a pre-persist hook hands back to Ory for `metadata_public.id`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reservation {
    /// A new id, pending until the identity it is stored on gets linked.
    Minted(UserId),
    /// The identity already carried this id in `metadata_public.id`; it is kept.
    Kept(UserId),
}

impl Reservation {
    pub fn user_id(self) -> UserId {
        match self {
            Self::Minted(id) | Self::Kept(id) => id,
        }
    }
}

impl IdentityMapper {
    /// Pre-persist registration: reserves the internal user id Ory is to store in
    /// `metadata_public.id`. `recorded` is what the identity carries there now.
    ///
    /// A recorded UUID is kept rather than replaced. On a registration it can only come from an
    /// earlier hook of the same flow (another idmap hook, or this one configured twice); if the hook
    /// is wired to a flow of an existing identity (settings with `parse: true`) it is that identity's
    /// user. Replacing it would orphan a user in either case, and keeping it costs nothing: linking
    /// adopts whatever id `metadata_public.id` names.
    pub async fn reserve_user(
        &self,
        schema_id: &str,
        recorded: Option<&str>,
    ) -> Result<Reservation, Error> {
        let reservation = match recorded.and_then(|id| UserId::parse("metadata_public.id", id).ok())
        {
            Some(id) => Reservation::Kept(id),
            None => Reservation::Minted(UserId::mint()),
        };
        self.store
            .reserve_pending_user(reservation.user_id(), schema_id)
            .await?;
        tracing::info!(user = %reservation.user_id(), schema = schema_id, ?reservation, "user id reserved for a registration");
        Ok(reservation)
    }

    /// Post-persist registration: links the stored identity, adopting (and so claiming) the user a
    /// pre-persist hook reserved when `metadata_public.id` names one, else minting one and queueing
    /// the `metadata_public.id` write. Idempotent: a retried or overlapping delivery finds the link
    /// the first one made.
    pub async fn link_registered(&self, identity: &Identity) -> Result<LinkOutcome, Error> {
        let request = LinkRequest {
            ory_identity_id: identity.id,
            user_id: None,
            external_ids: Vec::new(),
        };
        match self.link_seen_identity(request, identity).await {
            // The identity is linked to another user than its metadata_public.id names (drift that
            // reconciliation repairs). The registration itself succeeded and the identity has a
            // user, so failing the hook would only show the person an error for nothing.
            Err(LinkError::Conflict {
                conflict: LinkConflict::IdentityLinked { .. },
                ..
            }) => {
                let user = self
                    .store
                    .user_by_identity(identity.id)
                    .await?
                    .ok_or_else(|| {
                        Error::Internal(format!(
                            "identity {} reported linked but has no user",
                            identity.id
                        ))
                    })?;
                tracing::warn!(
                    identity = %identity.id,
                    user = %user.id,
                    metadata_public_id = identity.metadata_user_id().unwrap_or_default(),
                    "registered identity is linked to another user than its metadata_public.id names"
                );
                Ok(LinkOutcome {
                    user,
                    created: false,
                    adoption: None,
                })
            }
            other => Ok(other?),
        }
    }

    /// After a settings flow: brings the linked user's mirrored fields (the schema id) in step with
    /// the identity. `None` when no user is linked: nothing is created here, because the identity's
    /// user, whenever it is linked (ResolveSession, LinkIdentity, backfill), is built from Ory's
    /// current state, which already holds this change.
    pub async fn identity_updated(&self, identity: &Identity) -> Result<Option<User>, Error> {
        let Some((user, changed)) = self
            .store
            .update_schema_id(identity.id, &identity.schema_id)
            .await?
        else {
            tracing::debug!(identity = %identity.id, "settings hook for an identity without a user; nothing to update");
            return Ok(None);
        };
        if changed {
            tracing::info!(identity = %identity.id, user = %user.id, schema = %user.schema_id, "user's schema id updated");
            self.user_written(&user).await;
        }
        Ok(Some(user))
    }
}
