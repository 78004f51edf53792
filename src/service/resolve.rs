use std::sync::Arc;
use std::time::Duration;

use super::IdentityMapper;
use super::LinkError;
use crate::cache::{CachedSession, Rendering, SessionEntry, SessionKey, session_ttl};
use crate::domain::{Credential, LinkConflict, LinkRequest, SessionWithIdentity, User};
use crate::error::Error;
use crate::ory::OryError;

/// Longest a stale session is served before Ory is asked again, so a recovering Ory sees at most one
/// call per session per interval.
const STALE_RECHECK: Duration = Duration::from_secs(1);

/// ResolveSession's answer.
#[derive(Debug, Clone)]
pub struct Resolved {
    /// Shared with the session cache: a hit copies nothing.
    pub session: Arc<SessionWithIdentity>,
    /// `None` when the identity has no user and auto-linking is off.
    pub user: Option<Arc<User>>,
    /// The adapter's encoding of `session`, shared by every hit of the cache entry.
    pub rendering: Rendering,
}

impl IdentityMapper {
    /// Validates the session (from the cache, else with Ory; concurrent misses for one credential
    /// share one whoami call) and finds (or, with auto-link on, creates) its user. Never writes to Ory
    /// on this path: a new link's `metadata_public.id` goes through the outbox.
    pub async fn resolve_session(&self, credential: &Credential) -> Result<Resolved, Error> {
        let key = credential.fingerprint();
        let entry = if self.caches.settings().session_ttl.is_zero() {
            Box::pin(self.fetch_session(key, credential)).await?
        } else {
            self.caches
                .session(key, || self.fetch_session(key, credential))
                .await
                .map_err(|e| Error::from((*e).clone()))?
                .as_ref()
                .clone()
        };
        let rendering = entry.rendering;
        let whoami = match entry.value {
            CachedSession::Valid(session) => session,
            CachedSession::Invalid => return Err(OryError::Unauthenticated.into()),
        };
        let user = match self.cached_user(whoami.identity.id).await? {
            Some(user) => Some(user),
            None if self.settings.auto_link => {
                let request = LinkRequest {
                    ory_identity_id: whoami.identity.id,
                    user_id: None,
                    external_id: None,
                };
                // Boxed: the link's future is large, and only first sightings pay for it.
                match Box::pin(self.link_seen_identity(request, &whoami.identity)).await {
                    Ok(outcome) => Some(Arc::new(outcome.user)),
                    // A concurrent link (another call, replica or hook) committed a different user
                    // for the identity after the lookup above, e.g. one named by a newer
                    // `metadata_public.id` than this session's snapshot. That link stands; the
                    // caller asked who the session is, not to link it, so answer with that user.
                    Err(LinkError::Conflict {
                        conflict: LinkConflict::IdentityLinked { .. },
                        ..
                    }) => {
                        let linked = self.cached_user(whoami.identity.id).await?;
                        if linked.is_none() {
                            return Err(Error::Internal(
                                "the identity's link vanished right after a conflicting link"
                                    .into(),
                            ));
                        }
                        linked
                    }
                    Err(e) => return Err(e.into()),
                }
            }
            None => None,
        };
        Ok(Resolved {
            session: whoami,
            user,
            rendering,
        })
    }

    /// Asks Ory, and decides how long its answer may be served.
    async fn fetch_session(
        &self,
        key: SessionKey,
        credential: &Credential,
    ) -> Result<SessionEntry, OryError> {
        let settings = self.caches.settings();
        match self.ory.whoami(credential).await {
            Ok(whoami) => {
                let session = Arc::new(whoami.session);
                let ttl = session_ttl(settings, &session, whoami.cache_for);
                self.caches.keep_for_stale(key, &session, ttl).await;
                Ok(SessionEntry::new(CachedSession::Valid(session), ttl))
            }
            // Remembered briefly, so a flood of bad tokens does not reach Ory. A copy kept for
            // stale-if-error goes: once Ory has refused the session it is never served again, even
            // while Ory fails after the refusal has been forgotten.
            Err(OryError::Unauthenticated) => {
                self.caches.drop_stale(&key).await;
                Ok(SessionEntry::new(
                    CachedSession::Invalid,
                    settings.negative_ttl,
                ))
            }
            Err(e) if e.is_transient() => match self.caches.stale_session(&key).await {
                Some((session, usable_for)) => {
                    tracing::warn!(error = %e, "Ory unavailable; serving a cached session past its TTL (stale-if-error)");
                    Ok(SessionEntry::new(
                        CachedSession::Valid(session),
                        usable_for.min(STALE_RECHECK),
                    ))
                }
                None => Err(e),
            },
            Err(e) => Err(e),
        }
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
