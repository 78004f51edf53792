//! The one module that owns caching: validated sessions (keyed by a hash of the credential, never
//! the credential) and users (by Ory identity id, and external id → identity id). Bounded in
//! entries, so memory stays bounded whatever the traffic. Knows nothing of protobuf, SQL or HTTP.
//!
//! Concurrent misses for one key share one load (moka's `try_get_with`), so a burst of calls with a
//! new session makes one whoami call.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::Bytes;

use moka::Expiry;
use moka::future::Cache;

pub mod invalidation;

use crate::config::CacheSettings;
use crate::domain::{IdentityId, SessionWithIdentity, User};

/// A SHA-256 of a credential (`Credential::fingerprint`).
pub type SessionKey = [u8; 32];

/// What the cache remembers about a credential.
#[derive(Debug, Clone)]
pub enum CachedSession {
    /// Ory accepted it.
    Valid(Arc<SessionWithIdentity>),
    /// Ory refused it (401).
    Invalid,
}

/// Bytes an adapter derives from an entry's session (the gRPC adapter: the session and identity
/// already encoded), kept with the entry so that hits do not derive them again. Filled by the first
/// caller that needs them; the cache never reads them.
pub type Rendering = Arc<OnceLock<Bytes>>;

/// A cache entry: the answer and how long it may be served.
#[derive(Debug, Clone)]
pub struct SessionEntry {
    pub value: CachedSession,
    pub fresh_for: Duration,
    pub rendering: Rendering,
}

impl SessionEntry {
    pub fn new(value: CachedSession, fresh_for: Duration) -> Self {
        Self {
            value,
            fresh_for,
            rendering: Rendering::default(),
        }
    }
}

/// A validated session kept for stale-if-error, with how long it may still be served.
#[derive(Debug, Clone)]
struct StaleEntry {
    session: Arc<SessionWithIdentity>,
    usable_for: Duration,
}

struct FreshFor;

impl Expiry<SessionKey, Arc<SessionEntry>> for FreshFor {
    fn expire_after_create(
        &self,
        _key: &SessionKey,
        value: &Arc<SessionEntry>,
        _created_at: std::time::Instant,
    ) -> Option<Duration> {
        Some(value.fresh_for)
    }
}

struct UsableFor;

impl Expiry<SessionKey, Arc<StaleEntry>> for UsableFor {
    fn expire_after_create(
        &self,
        _key: &SessionKey,
        value: &Arc<StaleEntry>,
        _created_at: std::time::Instant,
    ) -> Option<Duration> {
        Some(value.usable_for)
    }
}

/// The caches of one replica.
pub struct Caches {
    settings: CacheSettings,
    sessions: Cache<SessionKey, Arc<SessionEntry>>,
    stale: Option<Cache<SessionKey, Arc<StaleEntry>>>,
    users: Cache<IdentityId, Arc<User>>,
    external_ids: Cache<String, IdentityId>,
}

/// How long Ory's answer may be served: the smallest of our TTL, the session's remaining life, and
/// Ory's own hint.
pub fn session_ttl(
    settings: &CacheSettings,
    session: &SessionWithIdentity,
    ory_hint: Option<Duration>,
) -> Duration {
    let mut ttl = settings.session_ttl;
    if let Some(expires_at) = session.session.expires_at {
        let left = (expires_at - chrono::Utc::now())
            .to_std()
            .unwrap_or(Duration::ZERO);
        ttl = ttl.min(left);
    }
    if let Some(hint) = ory_hint {
        ttl = ttl.min(hint);
    }
    ttl
}

impl Caches {
    pub fn new(settings: CacheSettings) -> Self {
        let sessions = Cache::builder()
            .max_capacity(settings.session_max_entries)
            .expire_after(FreshFor)
            .support_invalidation_closures()
            .build();
        let stale = settings.stale_if_error.map(|_| {
            Cache::builder()
                .max_capacity(settings.session_max_entries)
                .expire_after(UsableFor)
                .support_invalidation_closures()
                .build()
        });
        let users = Cache::builder()
            .max_capacity(settings.user_max_entries)
            .time_to_live(settings.user_ttl)
            .build();
        let external_ids = Cache::builder()
            .max_capacity(settings.user_max_entries)
            .time_to_live(settings.user_ttl)
            .build();
        Self {
            settings,
            sessions,
            stale,
            users,
            external_ids,
        }
    }

    pub fn settings(&self) -> &CacheSettings {
        &self.settings
    }

    /// The cached answer for a credential, or the result of `load()`; concurrent callers with the
    /// same key share one load. Errors are not cached.
    ///
    /// A hit never builds the load future: loads (HTTP, SQL) are state machines of kilobytes, and
    /// every future that contains one is copied whole each time it moves, hit or miss. So misses
    /// run behind a `Box`, and a hit's future stays small.
    pub async fn session<E, F, L>(
        &self,
        key: SessionKey,
        load: L,
    ) -> Result<Arc<SessionEntry>, Arc<E>>
    where
        L: FnOnce() -> F,
        F: Future<Output = Result<SessionEntry, E>> + Send,
        E: Send + Sync + 'static,
    {
        if let Some(entry) = self.sessions.get(&key).await {
            return Ok(entry);
        }
        let load = load();
        Box::pin(
            self.sessions
                .try_get_with(key, async move { load.await.map(Arc::new) }),
        )
        .await
    }

    /// Remembers a valid session for stale-if-error, for `ttl` plus the stale window but never past
    /// the session's expiry.
    pub async fn keep_for_stale(
        &self,
        key: SessionKey,
        session: &Arc<SessionWithIdentity>,
        ttl: Duration,
    ) {
        let (Some(stale), Some(window)) = (&self.stale, self.settings.stale_if_error) else {
            return;
        };
        let mut usable_for = ttl + window;
        if let Some(expires_at) = session.session.expires_at {
            let left = (expires_at - chrono::Utc::now())
                .to_std()
                .unwrap_or(Duration::ZERO);
            usable_for = usable_for.min(left);
        }
        if usable_for.is_zero() {
            return;
        }
        stale
            .insert(
                key,
                Arc::new(StaleEntry {
                    session: session.clone(),
                    usable_for,
                }),
            )
            .await;
    }

    /// A session kept for stale-if-error, with how long it may still be served.
    pub async fn stale_session(
        &self,
        key: &SessionKey,
    ) -> Option<(Arc<SessionWithIdentity>, Duration)> {
        let stale = self.stale.as_ref()?;
        let entry = stale.get(key).await?;
        let left = entry
            .session
            .session
            .expires_at
            .and_then(|e| (e - chrono::Utc::now()).to_std().ok())
            .unwrap_or(entry.usable_for);
        (!left.is_zero()).then(|| (entry.session.clone(), left.min(entry.usable_for)))
    }

    /// The session a credential resolved to, if it is cached.
    pub async fn cached_session_id(&self, key: &SessionKey) -> Option<String> {
        match &self.sessions.get(key).await?.value {
            CachedSession::Valid(s) => Some(s.session.id.clone()),
            CachedSession::Invalid => None,
        }
    }

    /// Evicts a credential's entry.
    pub async fn evict_session_key(&self, key: &SessionKey) {
        self.sessions.invalidate(key).await;
        if let Some(stale) = &self.stale {
            stale.invalidate(key).await;
        }
    }

    /// Evicts every entry of a session, whichever credential it was cached under.
    pub fn evict_session_id(&self, session_id: &str) {
        let id = session_id.to_owned();
        self.evict_sessions_where(move |s| s.session.id == id);
    }

    /// Evicts every session of an identity, and its user.
    pub async fn evict_identity(&self, identity: IdentityId) {
        self.evict_sessions_where(move |s| s.identity.id == identity);
        self.evict_user(identity).await;
    }

    fn evict_sessions_where(
        &self,
        matches: impl Fn(&SessionWithIdentity) -> bool + Clone + Send + Sync + 'static,
    ) {
        let in_sessions = matches.clone();
        if let Err(e) = self
            .sessions
            .invalidate_entries_if(move |_, entry| match &entry.value {
                CachedSession::Valid(s) => in_sessions(s),
                CachedSession::Invalid => false,
            })
        {
            // Only possible if invalidation closures were not enabled at build time: a bug.
            tracing::error!(error = %e, "cannot evict sessions; clearing the session cache");
            self.sessions.invalidate_all();
        }
        if let Some(stale) = &self.stale
            && stale
                .invalidate_entries_if(move |_, entry| matches(&entry.session))
                .is_err()
        {
            stale.invalidate_all();
        }
    }

    /// Evicts a user (by its identity); the external-id index re-checks against it on use.
    pub async fn evict_user(&self, identity: IdentityId) {
        self.users.invalidate(&identity).await;
    }

    /// Drops everything: after the replica may have missed evictions (its listener reconnected).
    pub fn clear(&self) {
        self.sessions.invalidate_all();
        if let Some(stale) = &self.stale {
            stale.invalidate_all();
        }
        self.users.invalidate_all();
        self.external_ids.invalidate_all();
    }

    pub async fn user(&self, identity: &IdentityId) -> Option<Arc<User>> {
        self.users.get(identity).await
    }

    /// The cached user for an identity, or `load()`'s; concurrent callers share one load. Neither
    /// "not found" nor errors are cached, so a new user is visible at once. As with
    /// [`Caches::session`], only a miss builds (and boxes) the load.
    pub async fn user_or_load<E, F, L>(
        &self,
        identity: IdentityId,
        load: L,
    ) -> Result<Option<Arc<User>>, E>
    where
        L: FnOnce() -> F,
        F: Future<Output = Result<Option<User>, E>> + Send,
        E: Clone + Send + Sync + 'static,
    {
        if let Some(user) = self.users.get(&identity).await {
            return Ok(Some(user));
        }
        let load = load();
        let result = Box::pin(self.users.try_get_with(identity, async move {
            match load.await {
                Ok(Some(user)) => {
                    // Indexed on load only: a hit must not pay for a cache write.
                    let user = Arc::new(user);
                    self.remember_external_id(&user).await;
                    Ok(user)
                }
                Ok(None) => Err(None),
                Err(e) => Err(Some(e)),
            }
        }))
        .await;
        match result {
            Ok(user) => Ok(Some(user)),
            Err(miss) => match &*miss {
                None => Ok(None),
                Some(e) => Err(e.clone()),
            },
        }
    }

    /// Puts a user read elsewhere (a batch query, a write) into the cache.
    pub async fn put_user(&self, user: User) -> Arc<User> {
        let user = Arc::new(user);
        self.users.insert(user.ory_identity_id, user.clone()).await;
        self.remember_external_id(&user).await;
        user
    }

    async fn remember_external_id(&self, user: &Arc<User>) {
        if let Some(ext) = &user.external_id {
            self.external_ids
                .insert(ext.as_str().to_owned(), user.ory_identity_id)
                .await;
        }
    }

    /// The identity whose user held this external id when last seen. Callers must check the user
    /// they then load still holds it.
    pub async fn identity_for_external_id(&self, external_id: &str) -> Option<IdentityId> {
        self.external_ids.get(external_id).await
    }

    pub async fn forget_external_id(&self, external_id: &str) {
        self.external_ids.invalidate(external_id).await;
    }

    /// Entries currently held (approximate), for metrics and benchmarks.
    pub fn session_count(&self) -> u64 {
        self.sessions.entry_count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{Identity, Session};

    fn session(expires_in: Option<chrono::Duration>) -> SessionWithIdentity {
        SessionWithIdentity {
            session: Session {
                id: "s".into(),
                active: true,
                expires_at: expires_in.map(|d| chrono::Utc::now() + d),
                authenticated_at: None,
                issued_at: None,
                authenticator_assurance_level: None,
                authentication_methods: Vec::new(),
            },
            identity: Identity {
                id: IdentityId::from_uuid(uuid::Uuid::new_v4()),
                schema_id: "default".into(),
                state: "active".into(),
                external_id: None,
                traits: serde_json::json!({}),
                metadata_public: serde_json::Value::Null,
                created_at: None,
                updated_at: None,
            },
        }
    }

    #[test]
    fn ttl_is_the_smallest_of_setting_expiry_and_ory_hint() {
        let settings = CacheSettings::default(); // 60 s
        let long = session(Some(chrono::Duration::hours(1)));
        assert_eq!(session_ttl(&settings, &long, None), Duration::from_secs(60));
        assert_eq!(
            session_ttl(&settings, &long, Some(Duration::from_secs(10))),
            Duration::from_secs(10)
        );
        let ending = session(Some(chrono::Duration::seconds(5)));
        let ttl = session_ttl(&settings, &ending, Some(Duration::from_secs(30)));
        assert!(ttl <= Duration::from_secs(5) && ttl > Duration::from_secs(4));
        let expired = session(Some(chrono::Duration::seconds(-5)));
        assert_eq!(session_ttl(&settings, &expired, None), Duration::ZERO);
        assert_eq!(
            session_ttl(&settings, &session(None), None),
            Duration::from_secs(60)
        );
    }

    #[tokio::test]
    async fn stale_copies_never_outlive_the_session() {
        let caches = Caches::new(CacheSettings {
            stale_if_error: Some(Duration::from_secs(600)),
            ..CacheSettings::default()
        });
        let key = [1; 32];
        let s = Arc::new(session(Some(chrono::Duration::seconds(3))));
        caches
            .keep_for_stale(key, &s, Duration::from_secs(60))
            .await;
        let (_, usable) = caches.stale_session(&key).await.expect("kept");
        assert!(usable <= Duration::from_secs(3));
        let gone = Arc::new(session(Some(chrono::Duration::seconds(-1))));
        caches
            .keep_for_stale([2; 32], &gone, Duration::from_secs(60))
            .await;
        assert!(caches.stale_session(&[2; 32]).await.is_none());
    }
}
