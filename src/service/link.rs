use super::IdentityMapper;
use crate::domain::{Identity, LinkConflict, LinkOutcome, LinkRequest, UserId, UserState};
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
        let facts = LinkFacts {
            schema_id: &identity.schema_id,
            state: UserState::of_identity(&identity.state),
            ory_has: identity.metadata_user_id(),
            backfill_run: run,
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
                if ory_has != Some(outcome.user.id.to_string().as_str()) {
                    self.outbox_wakeup.notify_one();
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
        LinkConflict::ExternalIdTaken { user_id } => {
            let mut metadata = vec![(
                "external_id",
                request
                    .external_id
                    .as_ref()
                    .map(ToString::to_string)
                    .unwrap_or_default(),
            )];
            if let Some(user_id) = user_id {
                metadata.push(("user_id", user_id.to_string()));
            }
            Error::AlreadyExists {
                reason: reason::EXTERNAL_ID_TAKEN,
                message: "another user holds that external id".into(),
                metadata,
            }
        }
        LinkConflict::ExternalIdAlreadySet { external_id } => Error::AlreadyExists {
            reason: reason::EXTERNAL_ID_ALREADY_SET,
            message: "the identity's user already has a different external id".into(),
            metadata: vec![
                ("ory_identity_id", identity),
                ("external_id", external_id.to_string()),
            ],
        },
    }
}
