use super::IdentityMapper;
use crate::domain::{Credential, Identity, LinkRequest, Session, User};
use crate::error::Error;

/// ResolveSession's answer.
#[derive(Debug, Clone)]
pub struct Resolved {
    pub session: Session,
    pub identity: Identity,
    /// `None` when the identity has no user and auto-linking is off.
    pub user: Option<User>,
}

impl IdentityMapper {
    /// Validates the session with Ory and finds (or, with auto-link on, creates) its user. Never
    /// writes to Ory on this path: a new link's `metadata_public.id` goes through the outbox.
    pub async fn resolve_session(&self, credential: &Credential) -> Result<Resolved, Error> {
        let whoami = self.ory.whoami(credential).await?;
        let identity = whoami.identity;
        let user = match self.store.user_by_identity(identity.id).await? {
            Some(user) => Some(user),
            None if self.settings.auto_link => {
                let request = LinkRequest {
                    ory_identity_id: identity.id,
                    user_id: None,
                    external_id: None,
                };
                Some(self.link_seen_identity(request, &identity).await?.user)
            }
            None => None,
        };
        Ok(Resolved {
            session: whoami.session,
            identity,
            user,
        })
    }

    /// Turns a raw Cookie header into a credential, keeping only Ory's session cookie.
    pub fn cookie_credential(
        &self,
        field: &'static str,
        header: &str,
    ) -> Result<Credential, Error> {
        Credential::cookie_header(field, header, self.settings.session_cookie_name.as_deref())?
            .ok_or_else(|| Error::Unauthenticated {
                message: "the Cookie header holds no Ory session cookie".into(),
            })
    }
}
