use super::IdentityMapper;
use crate::domain::{
    Adoption, ExternalId, Identity, LinkConflict, LinkOutcome, LinkRequest, NamespacedId, UserId,
    UserState,
};
use crate::error::{Error, reason};
use crate::ory::OryError;
use crate::store::{LinkFacts, LinkResult};

/// Why a link was not stored. A caller that can recover from a conflict (a link that lost a race
/// to a concurrent one, say) matches the variant; everyone else turns it into an [`Error`].
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    /// The request clashes with a link already stored.
    #[error("{}", conflict_error(request, conflict))]
    Conflict {
        request: LinkRequest,
        conflict: LinkConflict,
    },
    /// Ory or the database failed, or the request was refused for another reason.
    #[error(transparent)]
    Failed(#[from] Error),
}

impl From<LinkError> for Error {
    fn from(e: LinkError) -> Self {
        match e {
            LinkError::Conflict { request, conflict } => conflict_error(&request, &conflict),
            LinkError::Failed(e) => e,
        }
    }
}

impl IdentityMapper {
    /// LinkIdentity: checks that Ory knows the identity, then stores the link and queues the
    /// `metadata_public.id` write in one transaction. Nothing is stored when Ory cannot be asked.
    pub async fn link(&self, request: LinkRequest) -> Result<LinkOutcome, Error> {
        for id in &request.external_ids {
            self.check_fits_ory("external_ids", id)?;
        }
        let identity = self
            .ory
            .get_identity(request.ory_identity_id)
            .await
            .map_err(|e| match e {
                OryError::NotFound => Error::NotFound {
                    reason: reason::IDENTITY_NOT_FOUND,
                    message: format!("Ory has no identity {}", request.ory_identity_id),
                    resource_type: "ory.identity",
                    resource_name: request.ory_identity_id.to_string(),
                },
                other => other.into(),
            })?;
        Ok(self.link_seen_identity(request, &identity).await?)
    }

    /// Stores a link for an identity just read from Ory (or sent by a hook). Every creation path
    /// (LinkIdentity, ResolveSession, the registration hook, backfill) comes through here, so a
    /// new user gets the identity's state in the transaction that creates it.
    pub(super) async fn link_seen_identity(
        &self,
        request: LinkRequest,
        identity: &Identity,
    ) -> Result<LinkOutcome, LinkError> {
        self.link_seen_identity_in_run(request, identity, None)
            .await
    }

    /// [`Self::link_seen_identity`] for backfill run `run`, which records the users it creates.
    pub async fn link_seen_identity_in_run(
        &self,
        mut request: LinkRequest,
        identity: &Identity,
        run: Option<i64>,
    ) -> Result<LinkOutcome, LinkError> {
        // An identity that already records a user id in `metadata_public.id` (written by idmap before,
        // say to a database since restored, or minted by a registration hook) keeps it: a new user
        // takes that id rather than overwriting the record in Ory with a fresh one.
        let recorded = identity
            .metadata_user_id()
            .and_then(|id| UserId::parse("metadata_public.id", id).ok());
        let adopt = request.user_id.is_none() && recorded.is_some();
        if adopt {
            request.user_id = recorded;
        }
        let mirrored = self.settings.ory_external_id_namespace.as_ref();
        // Ory's `external_id` is offered for adoption into the mirrored namespace. Kratos accepts
        // any string there; one idmap could not store is left out, and reconcile reports it.
        let ory_external_id = match (mirrored, identity.external_id.as_deref()) {
            (Some(namespace), Some(value)) => ExternalId::parse("external_id", value)
                .map(|value| NamespacedId::new(namespace.clone(), value))
                .ok(),
            _ => None,
        };
        let facts = LinkFacts {
            schema_id: &identity.schema_id,
            state: UserState::of_identity(&identity.state),
            ory_has: identity.metadata_user_id(),
            backfill_run: run,
            mirrored,
            ory_external_id: ory_external_id.as_ref(),
        };
        let ory_has = facts.ory_has;
        let mut result = self
            .store
            .link(&request, &facts)
            .await
            .map_err(Error::from)?;
        if adopt && let LinkResult::Conflict(LinkConflict::UserLinked { .. }) = result {
            tracing::warn!(
                identity = %identity.id,
                "metadata_public.id names a user linked to another identity; minting a new user"
            );
            request.user_id = None;
            result = self
                .store
                .link(&request, &facts)
                .await
                .map_err(Error::from)?;
        }
        match result {
            LinkResult::Linked(outcome) => {
                // A queued Ory write (the metadata id, or a value given in the mirrored
                // namespace) is delivered at once rather than at the next poll.
                if ory_has != Some(outcome.user.id.to_string().as_str())
                    || (mirrored.is_some() && !request.external_ids.is_empty())
                {
                    self.outbox_wakeup.notify_one();
                }
                if let Some(Adoption::TakenBy { user_id, .. }) = &outcome.adoption {
                    tracing::warn!(
                        identity = %identity.id,
                        user = %outcome.user.id,
                        holder = %user_id,
                        "the identity's Ory external_id is held by another user in the mirrored namespace; not adopted"
                    );
                }
                self.user_written(&outcome.user).await;
                tracing::info!(
                    user = %outcome.user.id,
                    identity = %identity.id,
                    created = outcome.created,
                    "identity linked"
                );
                Ok(outcome)
            }
            LinkResult::Conflict(conflict) => Err(LinkError::Conflict { request, conflict }),
        }
    }
}

fn conflict_error(request: &LinkRequest, conflict: &LinkConflict) -> Error {
    let identity = request.ory_identity_id.to_string();
    match conflict {
        LinkConflict::IdentityLinked { user_id } => Error::AlreadyExists {
            reason: reason::IDENTITY_ALREADY_LINKED,
            message: format!("Ory identity {identity} is already linked to another user"),
            metadata: vec![
                ("ory_identity_id", identity),
                ("user_id", user_id.to_string()),
            ],
        },
        LinkConflict::UserLinked { ory_identity_id } => Error::AlreadyExists {
            reason: reason::USER_ALREADY_LINKED,
            message: "the user is already linked to another Ory identity".into(),
            metadata: vec![
                (
                    "user_id",
                    request.user_id.map(|u| u.to_string()).unwrap_or_default(),
                ),
                ("ory_identity_id", ory_identity_id.to_string()),
            ],
        },
        other => external_id_conflict(other, Some(&identity)),
    }
}

/// The error of a business-id conflict; `identity` names the subject's identity when known.
pub(super) fn external_id_conflict(conflict: &LinkConflict, identity: Option<&str>) -> Error {
    match conflict {
        LinkConflict::ExternalIdTaken {
            namespace,
            value,
            user_id,
        } => {
            // The default namespace is left unnamed, so clients written before namespaces see
            // exactly the metadata they always did.
            let mut metadata = Vec::with_capacity(3);
            if !namespace.is_default() {
                metadata.push(("namespace", namespace.to_string()));
            }
            metadata.push(("external_id", value.to_string()));
            if let Some(user_id) = user_id {
                metadata.push(("user_id", user_id.to_string()));
            }
            Error::AlreadyExists {
                reason: reason::EXTERNAL_ID_TAKEN,
                message: if namespace.is_default() {
                    "another user holds that external id".into()
                } else {
                    format!("another user holds that external id in namespace {namespace}")
                },
                metadata,
            }
        }
        LinkConflict::ExternalIdAlreadySet {
            namespace,
            external_id,
        } => {
            let mut metadata = Vec::new();
            if let Some(identity) = identity {
                metadata.push(("ory_identity_id", identity.to_owned()));
            }
            if !namespace.is_default() {
                metadata.push(("namespace", namespace.to_string()));
            }
            metadata.push(("external_id", external_id.to_string()));
            Error::AlreadyExists {
                reason: reason::EXTERNAL_ID_ALREADY_SET,
                message: if namespace.is_default() {
                    "the user already has a different external id".into()
                } else {
                    format!("the user already has a different external id in namespace {namespace}")
                },
                metadata,
            }
        }
        LinkConflict::IdentityLinked { .. } | LinkConflict::UserLinked { .. } => {
            Error::Internal(format!("not a business-id conflict: {conflict:?}"))
        }
    }
}
