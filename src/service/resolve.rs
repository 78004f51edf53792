use std::sync::Arc;
use std::time::Duration;

use super::IdentityMapper;
use super::LinkError;
use crate::cache::invalidation::Eviction;
use crate::cache::{
    AssertionSlot, CachedSession, HeadersSlot, Rendering, SessionEntry, SessionKey, UserStamp,
    session_ttl,
};
use crate::domain::{Credential, LinkConflict, LinkRequest, SessionWithIdentity, User};
use crate::error::Error;
use crate::metrics::{self, CacheName, CacheResult};
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
    /// When the cache stops serving this answer (now, when the session cache is off).
    pub served_until: std::time::SystemTime,
    /// The entry's signed assertion, once one is made ([`IdentityMapper::assertion`]).
    pub assertion: AssertionSlot,
    /// The gateway's identity headers for the entry, once an adapter has encoded them.
    pub headers: HeadersSlot,
}

impl Resolved {
    /// The state of the user the answer names, which values kept with the entry were made for.
    pub fn user_stamp(&self) -> UserStamp {
        self.user.as_deref().map(|user| (user.id, user.updated_at))
    }
}

impl IdentityMapper {
    /// Validates the session (from the cache, else with Ory; concurrent misses for one credential
    /// share one whoami call) and finds (or, with auto-link on, creates) its user. Never writes to Ory
    /// on this path: a new link's `metadata_public.id` goes through the outbox.
    pub async fn resolve_session(&self, credential: &Credential) -> Result<Resolved, Error> {
        let key = credential.fingerprint();
        let entry = if self.caches.settings().session_ttl.is_zero() {
            Arc::new(Box::pin(self.fetch_session(key, credential)).await?)
        } else {
            let entry = self
                .caches
                .session(key, || self.fetch_session(key, credential))
                .await
                .map_err(|e| Error::from((*e).clone()))?;
            if entry.refresh_due() {
                self.refresh_ahead(key, credential, entry.refresh_lead());
            }
            entry
        };
        let rendering = entry.rendering.clone();
        let served_until = entry.served_until;
        let assertion = entry.assertion.clone();
        let headers = entry.headers.clone();
        let whoami = match &entry.value {
            CachedSession::Valid(session) => session.clone(),
            CachedSession::Invalid => return Err(OryError::Unauthenticated.into()),
        };
        let user = match self.cached_user(whoami.identity.id).await? {
            Some(user) => Some(user),
            None if self.settings.auto_link => {
                let request = LinkRequest {
                    ory_identity_id: whoami.identity.id,
                    user_id: None,
                    external_ids: Vec::new(),
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
            served_until,
            assertion,
            headers,
        })
    }

    /// Re-validates a busy session in the background before its entry expires, so its callers
    /// never wait for whoami; once across the fleet when the shared level is on (the replica that
    /// claims it asks, the others find its answer there when their entries expire).
    fn refresh_ahead(&self, key: SessionKey, credential: &Credential, lead: Duration) {
        let caches = self.caches.clone();
        let ory = self.ory.clone();
        let invalidator = self.invalidator.clone();
        let credential = credential.clone();
        tokio::spawn(async move {
            let claimed = match caches.shared() {
                Some(shared) => match shared.claim_refresh(&key, lead + lead / 4).await {
                    Ok(Some(at)) => Some(at),
                    Ok(None) => return,
                    // Without the database, re-validate for this replica alone.
                    Err(_) => None,
                },
                None => None,
            };
            let started = caches.session_epoch();
            match ory.whoami(&credential).await {
                Ok(whoami) => {
                    let session = Arc::new(whoami.session);
                    let ttl = session_ttl(caches.settings(), &session, whoami.cache_for);
                    caches.keep_for_stale(key, &session, ttl).await;
                    let entry = SessionEntry::new(CachedSession::Valid(session.clone()), ttl);
                    if caches.refreshed(key, started, entry).await
                        && let (Some(shared), Some(since)) = (caches.shared(), claimed)
                    {
                        shared.put(key, session, ttl, since).await;
                    }
                }
                // Revoked meanwhile: every replica drops it now rather than at its expiry.
                Err(OryError::Unauthenticated) => {
                    if let Err(e) = invalidator.announce(Eviction::SessionKey(key)).await {
                        tracing::debug!(error = %e, "cannot announce a session Ory refused");
                    }
                }
                // The entry expires as it would have; the next miss asks again.
                Err(e) => {
                    tracing::debug!(error = %e, "refreshing a session ahead of expiry failed")
                }
            }
        });
    }

    /// Finds the session in the level the replicas share, else asks Ory (and shares its answer),
    /// and decides how long the answer may be served.
    async fn fetch_session(
        &self,
        key: SessionKey,
        credential: &Credential,
    ) -> Result<SessionEntry, OryError> {
        let settings = self.caches.settings();
        let mut loaded_since = None;
        if let Some(shared) = self.caches.shared()
            && !settings.session_ttl.is_zero()
            && let Some(lookup) = shared.lookup(&key).await
        {
            if let Some(found) = lookup.found {
                metrics::get().cache_lookup(CacheName::Session, CacheResult::SharedHit);
                let session = Arc::new(found.session);
                self.caches
                    .keep_for_stale(key, &session, found.fresh_for)
                    .await;
                return Ok(SessionEntry::new(
                    CachedSession::Valid(session),
                    found.fresh_for,
                ));
            }
            loaded_since = Some(lookup.as_of);
        }
        let answer = self.ory.whoami(credential).await;
        let stale = match &answer {
            Err(e) if e.is_transient() => self.caches.stale_session(&key).await,
            _ => None,
        };
        metrics::get().cache_lookup(
            CacheName::Session,
            match stale {
                Some(_) => CacheResult::Stale,
                None => CacheResult::Miss,
            },
        );
        match answer {
            Ok(whoami) => {
                let session = Arc::new(whoami.session);
                let ttl = session_ttl(settings, &session, whoami.cache_for);
                self.caches.keep_for_stale(key, &session, ttl).await;
                if let (Some(shared), Some(since)) = (self.caches.shared(), loaded_since)
                    && !ttl.is_zero()
                    && !settings.session_ttl.is_zero()
                {
                    shared.put(key, session.clone(), ttl, since).await;
                }
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
            Err(e) if e.is_transient() => match stale {
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
