//! The one module that owns caching: validated sessions (keyed by a hash of the credential, never
//! the credential) and users (by Ory identity id, and external id → identity id). Bounded in
//! entries, so memory stays bounded whatever the traffic. Knows nothing of protobuf, SQL or HTTP.
//!
//! Concurrent misses for one key share one load (moka's `try_get_with`), so a burst of calls with a
//! new session makes one whoami call.
//!
//! An eviction outdates loads in flight: every eviction advances an epoch, a load notes the epoch
//! it started in, and an answer loaded across an eviction is neither kept nor served; it is asked
//! for again. Otherwise a whoami that was on its way while `InvalidateSession` ran would land
//! after the eviction and be served for a whole TTL.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::{Duration, Instant};

use bytes::Bytes;

use moka::Expiry;
use moka::future::Cache;
use tracing::Instrument;

pub mod invalidation;
pub mod shared;

use crate::config::CacheSettings;
use crate::domain::{IdentityId, Namespace, SessionWithIdentity, User};
use crate::metrics::{self, CacheName, CacheResult};

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

/// The state of the user a value derived from an entry was made for: the user's id and
/// `updated_at` (every change of a user moves it), or `None` for an identity without a user.
pub type UserStamp = Option<(crate::domain::UserId, chrono::DateTime<chrono::Utc>)>;

/// A value derived from an entry's session and its user, kept with the entry for the user state
/// it was made for ([`UserStamp`]): hits reuse it until that user changes, so it is made once per
/// session per TTL rather than once per request. The cache never reads it.
#[derive(Debug)]
pub struct PerUser<T>(std::sync::RwLock<Option<(UserStamp, T)>>);

impl<T> Default for PerUser<T> {
    fn default() -> Self {
        Self(std::sync::RwLock::new(None))
    }
}

impl<T: Clone> PerUser<T> {
    /// The value kept, if it was made for `stamp`.
    pub fn get(&self, stamp: &UserStamp) -> Option<T> {
        match &*self.0.read().unwrap_or_else(PoisonError::into_inner) {
            Some((made_for, value)) if made_for == stamp => Some(value.clone()),
            _ => None,
        }
    }

    /// Keeps `value`, made for `stamp`, in place of what was kept.
    pub fn set(&self, stamp: UserStamp, value: T) {
        *self.0.write().unwrap_or_else(PoisonError::into_inner) = Some((stamp, value));
    }
}

/// A signed assertion kept with a cache entry ([`PerUser`]).
pub type AssertionSlot = Arc<PerUser<Arc<str>>>;

/// A gateway's identity headers as an adapter encodes them, kept with a cache entry
/// ([`PerUser`]).
pub type HeadersSlot = Arc<PerUser<Bytes>>;

/// A cache entry: the answer and how long it may be served.
#[derive(Debug)]
pub struct SessionEntry {
    pub value: CachedSession,
    pub fresh_for: Duration,
    /// When the entry stops being served, by the wall clock (what a signed assertion's `exp`
    /// may not pass).
    pub served_until: std::time::SystemTime,
    pub rendering: Rendering,
    pub assertion: AssertionSlot,
    pub headers: HeadersSlot,
    /// The session-eviction epoch its load started in.
    epoch: u64,
    /// When a hit should start re-validating it in the background (refresh ahead); `None` for
    /// entries that re-validating cannot extend.
    refresh_at: Option<Instant>,
    /// Set by the hit that starts the re-validation, so one does per entry.
    refreshing: AtomicBool,
}

impl Clone for SessionEntry {
    fn clone(&self) -> Self {
        Self {
            value: self.value.clone(),
            fresh_for: self.fresh_for,
            served_until: self.served_until,
            rendering: self.rendering.clone(),
            assertion: self.assertion.clone(),
            headers: self.headers.clone(),
            epoch: self.epoch,
            refresh_at: self.refresh_at,
            refreshing: AtomicBool::new(self.refreshing.load(Ordering::Relaxed)),
        }
    }
}

/// The part of an entry's life after which a hit re-validates it in the background: late enough
/// that a fleet asks Ory about once per TTL for a busy session, early enough that the answer is
/// back before the entry expires.
const REFRESH_AFTER: f64 = 0.8;

/// Entries fresh for less are not refreshed ahead: a short life is Ory's or the session's choice.
const MIN_REFRESHED_TTL: Duration = Duration::from_secs(1);

impl SessionEntry {
    pub fn new(value: CachedSession, fresh_for: Duration) -> Self {
        let refresh_at = match &value {
            CachedSession::Valid(s) if fresh_for >= MIN_REFRESHED_TTL => {
                // A session that ends before a new entry would could only be asked about again.
                let outlives = s.session.expires_at.is_none_or(|expires_at| {
                    (expires_at - chrono::Utc::now())
                        .to_std()
                        .is_ok_and(|left| left > fresh_for + fresh_for / 4)
                });
                outlives.then(|| Instant::now() + fresh_for.mul_f64(REFRESH_AFTER))
            }
            _ => None,
        };
        Self {
            value,
            fresh_for,
            served_until: std::time::SystemTime::now() + fresh_for,
            rendering: Rendering::default(),
            assertion: AssertionSlot::default(),
            headers: HeadersSlot::default(),
            epoch: 0,
            refresh_at,
            refreshing: AtomicBool::new(false),
        }
    }

    /// Whether this hit should re-validate the entry in the background: it is near its end, and
    /// no hit has started that yet. `true` once per entry.
    pub fn refresh_due(&self) -> bool {
        self.refresh_at.is_some_and(|at| Instant::now() >= at)
            && !self.refreshing.swap(true, Ordering::Relaxed)
    }

    /// How far ahead of its end the entry is re-validated.
    pub fn refresh_lead(&self) -> Duration {
        self.fresh_for.mul_f64(1.0 - REFRESH_AFTER)
    }
}

/// How many times a load is made when evictions of the same session keep overtaking it; the
/// last answer is then returned to its callers but not kept. Such evictions are rare, and a storm
/// of them must not keep a caller (or Ory) busy.
const MAX_LOADS: usize = 3;

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
        _created_at: Instant,
    ) -> Option<Duration> {
        Some(value.fresh_for)
    }

    // A re-validated answer replaces the entry it refreshes: it lives its own TTL, not what was
    // left of the old one's (moka's default for an update).
    fn expire_after_update(
        &self,
        _key: &SessionKey,
        value: &Arc<SessionEntry>,
        _updated_at: Instant,
        _duration_until_expiry: Option<Duration>,
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
        _created_at: Instant,
    ) -> Option<Duration> {
        Some(value.usable_for)
    }

    fn expire_after_update(
        &self,
        _key: &SessionKey,
        value: &Arc<StaleEntry>,
        _updated_at: Instant,
        _duration_until_expiry: Option<Duration>,
    ) -> Option<Duration> {
        Some(value.usable_for)
    }
}

/// The key of a business id in the caches: namespace and value, split by a NUL, which neither may
/// hold, so no two pairs share a key.
fn index_key(namespace: &Namespace, value: &str) -> String {
    let mut key = String::with_capacity(namespace.as_str().len() + 1 + value.len());
    key.push_str(namespace.as_str());
    key.push('\0');
    key.push_str(value);
    key
}

/// The caches of one replica.
pub struct Caches {
    settings: CacheSettings,
    sessions: Cache<SessionKey, Arc<SessionEntry>>,
    stale: Option<Cache<SessionKey, Arc<StaleEntry>>>,
    users: Cache<IdentityId, Arc<User>>,
    /// Which identity's user held a business id when last seen, by [`index_key`].
    external_ids: Cache<String, IdentityId>,
    /// Business ids (by [`index_key`]) Ory answered 404 for, in the namespace mirrored to Ory.
    ory_external_id_misses: Cache<String, ()>,
    /// Session evictions, recorded before they evict (see the module docs).
    session_evictions: Evictions<SessionTarget>,
    /// User evictions, recorded before they evict.
    user_evictions: Evictions<Option<IdentityId>>,
    /// The level shared by the fleet, when on.
    shared: Option<shared::SharedSessions>,
}

/// What a session eviction targets.
#[derive(Debug, Clone)]
enum SessionTarget {
    Key(SessionKey),
    SessionId(String),
    Identity(IdentityId),
    All,
}

impl SessionTarget {
    fn matches(&self, key: &SessionKey, entry: &SessionEntry) -> bool {
        let valid = match &entry.value {
            CachedSession::Valid(s) => Some(s),
            CachedSession::Invalid => None,
        };
        match self {
            Self::Key(k) => k == key,
            Self::SessionId(id) => valid.is_some_and(|s| &s.session.id == id),
            Self::Identity(identity) => valid.is_some_and(|s| s.identity.id == *identity),
            Self::All => true,
        }
    }
}

/// How many recent evictions are remembered for loads to check against; a load that an older
/// eviction overtook (more than this many ago) is treated as outdated.
const RECENT_EVICTIONS: usize = 256;

/// A counter of evictions and the most recent ones, so a load can tell whether an eviction that
/// ran while it was in flight concerns what it loaded.
struct Evictions<T> {
    epoch: AtomicU64,
    recent: Mutex<VecDeque<(u64, T)>>,
}

impl<T> Evictions<T> {
    fn new() -> Self {
        Self {
            epoch: AtomicU64::new(0),
            recent: Mutex::new(VecDeque::with_capacity(RECENT_EVICTIONS)),
        }
    }

    fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::SeqCst)
    }

    /// Records an eviction; call it before evicting, so a load finishing in between sees it.
    fn record(&self, target: T) {
        let mut recent = self.recent.lock().unwrap_or_else(PoisonError::into_inner);
        let epoch = self.epoch.fetch_add(1, Ordering::SeqCst) + 1;
        if recent.len() == RECENT_EVICTIONS {
            recent.pop_front();
        }
        recent.push_back((epoch, target));
    }

    /// Whether an eviction recorded after epoch `since` targets what `hit` accepts.
    fn since(&self, since: u64, hit: impl Fn(&T) -> bool) -> bool {
        if self.epoch() == since {
            return false;
        }
        let recent = self.recent.lock().unwrap_or_else(PoisonError::into_inner);
        match recent.front() {
            // Evictions since `since` have been forgotten: assume one of them concerned it.
            Some((oldest, _)) if *oldest > since + 1 => true,
            None => true,
            Some(_) => recent.iter().any(|(e, t)| *e > since && hit(t)),
        }
    }
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
        let ory_external_id_misses = Cache::builder()
            .max_capacity(settings.user_max_entries)
            .time_to_live(settings.external_id_miss_ttl)
            .build();
        Self {
            settings,
            sessions,
            stale,
            users,
            external_ids,
            ory_external_id_misses,
            session_evictions: Evictions::new(),
            user_evictions: Evictions::new(),
            shared: None,
        }
    }

    /// Adds the level shared by the replicas through `store`, if the settings ask for it.
    pub fn shared_through(mut self, store: crate::store::Store) -> Self {
        if self.settings.shared_sessions {
            self.shared = Some(shared::SharedSessions::new(store));
        }
        self
    }

    /// The level shared by the replicas, when on.
    pub fn shared(&self) -> Option<&shared::SharedSessions> {
        self.shared.as_ref()
    }

    /// The current session-eviction epoch, for a load made outside [`Caches::session`].
    pub fn session_epoch(&self) -> u64 {
        self.session_evictions.epoch()
    }

    /// Keeps an answer re-validated in the background, loaded since epoch `started`, unless an
    /// eviction since then concerns it. `true` if kept.
    pub async fn refreshed(&self, key: SessionKey, started: u64, mut entry: SessionEntry) -> bool {
        entry.epoch = started;
        let entry = Arc::new(entry);
        // Kept first and checked after, as loads are: an eviction recorded in between is seen.
        self.sessions.insert(key, entry.clone()).await;
        if self
            .session_evictions
            .since(started, |target| target.matches(&key, &entry))
        {
            self.sessions.invalidate(&key).await;
            return false;
        }
        true
    }

    pub fn settings(&self) -> &CacheSettings {
        &self.settings
    }

    /// The cached answer for a credential, or the result of `load()`; concurrent callers with the
    /// same key share one load. Errors are not cached. An answer whose load an eviction overtook is
    /// loaded again (module docs).
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
        L: Fn() -> F,
        F: Future<Output = Result<SessionEntry, E>> + Send,
        E: Send + Sync + 'static,
    {
        if let Some(entry) = self.sessions.get(&key).await {
            metrics::get().cache_lookup(CacheName::Session, CacheResult::Hit);
            return Ok(entry);
        }
        // The miss's own span: its shared-level read and whoami call are children of it.
        Box::pin(
            self.load_session(key, load)
                .instrument(tracing::info_span!("cache.load", cache = "session")),
        )
        .await
    }

    async fn load_session<E, F, L>(
        &self,
        key: SessionKey,
        load: L,
    ) -> Result<Arc<SessionEntry>, Arc<E>>
    where
        L: Fn() -> F,
        F: Future<Output = Result<SessionEntry, E>> + Send,
        E: Send + Sync + 'static,
    {
        let mut loads = 0;
        loop {
            loads += 1;
            let load = load();
            let evictions = &self.session_evictions;
            // The load counts what it found itself (a miss, a shared hit, a stale copy); a caller
            // whose load never ran joined another's.
            let loaded = AtomicBool::new(false);
            let entry = self
                .sessions
                .try_get_with(key, async {
                    loaded.store(true, Ordering::Relaxed);
                    let started = evictions.epoch();
                    let mut entry = load.await?;
                    entry.epoch = started;
                    Ok(Arc::new(entry))
                })
                .await;
            if !loaded.load(Ordering::Relaxed) {
                metrics::get().cache_lookup(CacheName::Session, CacheResult::Coalesced);
            }
            let entry = entry?;
            // The entry carries its load's epoch, also for a caller that joined a load already in
            // flight. An eviction of this session since then may have run before the answer was
            // kept: drop it, and the stale copy the load kept, and ask again.
            let outdated = self
                .session_evictions
                .since(entry.epoch, |target| target.matches(&key, &entry));
            if !outdated {
                return Ok(entry);
            }
            self.sessions.invalidate(&key).await;
            self.drop_stale(&key).await;
            if loads == MAX_LOADS {
                return Ok(entry);
            }
        }
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

    /// Forgets the copy of a credential's session kept for stale-if-error (Ory refused it).
    pub async fn drop_stale(&self, key: &SessionKey) {
        if let Some(stale) = &self.stale {
            stale.invalidate(key).await;
        }
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
        self.session_evictions.record(SessionTarget::Key(*key));
        self.sessions.invalidate(key).await;
        self.drop_stale(key).await;
    }

    /// Evicts every entry of a session, whichever credential it was cached under.
    pub fn evict_session_id(&self, session_id: &str) {
        self.session_evictions
            .record(SessionTarget::SessionId(session_id.to_owned()));
        let id = session_id.to_owned();
        self.evict_sessions_where(move |s| s.session.id == id);
    }

    /// Evicts every session of an identity, and its user.
    pub async fn evict_identity(&self, identity: IdentityId) {
        self.session_evictions
            .record(SessionTarget::Identity(identity));
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
        self.user_evictions.record(Some(identity));
        self.users.invalidate(&identity).await;
    }

    /// Drops everything: after the replica may have missed evictions (its listener reconnected).
    pub fn clear(&self) {
        self.session_evictions.record(SessionTarget::All);
        self.user_evictions.record(None);
        self.sessions.invalidate_all();
        if let Some(stale) = &self.stale {
            stale.invalidate_all();
        }
        self.users.invalidate_all();
        self.external_ids.invalidate_all();
        self.ory_external_id_misses.invalidate_all();
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
        L: Fn() -> F,
        F: Future<Output = Result<Option<User>, E>> + Send,
        E: Clone + Send + Sync + 'static,
    {
        if let Some(user) = self.users.get(&identity).await {
            metrics::get().cache_lookup(CacheName::User, CacheResult::Hit);
            return Ok(Some(user));
        }
        Box::pin(
            self.load_user(identity, load)
                .instrument(tracing::info_span!("cache.load", cache = "user")),
        )
        .await
    }

    async fn load_user<E, F, L>(
        &self,
        identity: IdentityId,
        load: L,
    ) -> Result<Option<Arc<User>>, E>
    where
        L: Fn() -> F,
        F: Future<Output = Result<Option<User>, E>> + Send,
        E: Clone + Send + Sync + 'static,
    {
        enum Miss<E> {
            NotFound,
            Failed(E),
            /// An eviction of the user ran while it was loading.
            Outdated(Arc<User>),
        }
        let mut loads = 0;
        loop {
            loads += 1;
            let load = load();
            let loaded = AtomicBool::new(false);
            let result = self
                .users
                .try_get_with(identity, async {
                    loaded.store(true, Ordering::Relaxed);
                    let started = self.user_evictions.epoch();
                    match load.await {
                        Ok(Some(user)) => {
                            let user = Arc::new(user);
                            if self
                                .user_evictions
                                .since(started, |t| t.is_none_or(|i| i == identity))
                            {
                                return Err(Miss::Outdated(user));
                            }
                            // Indexed on load only: a hit must not pay for a cache write.
                            self.remember_external_id(&user).await;
                            Ok(user)
                        }
                        Ok(None) => Err(Miss::NotFound),
                        Err(e) => Err(Miss::Failed(e)),
                    }
                })
                .await;
            metrics::get().cache_lookup(
                CacheName::User,
                match loaded.load(Ordering::Relaxed) {
                    true => CacheResult::Miss,
                    false => CacheResult::Coalesced,
                },
            );
            return match result {
                Ok(user) => Ok(Some(user)),
                Err(miss) => match &*miss {
                    Miss::NotFound => Ok(None),
                    Miss::Failed(e) => Err(e.clone()),
                    Miss::Outdated(user) if loads == MAX_LOADS => Ok(Some(user.clone())),
                    Miss::Outdated(_) => continue,
                },
            };
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
        for id in &user.external_ids {
            self.external_ids
                .insert(
                    index_key(&id.namespace, id.value.as_str()),
                    user.ory_identity_id,
                )
                .await;
        }
    }

    /// The identity whose user held this business id when last seen. Callers must check the user
    /// they then load still holds it.
    pub async fn identity_for_external_id(
        &self,
        namespace: &Namespace,
        value: &str,
    ) -> Option<IdentityId> {
        self.external_ids.get(&index_key(namespace, value)).await
    }

    pub async fn forget_external_id(&self, namespace: &Namespace, value: &str) {
        self.external_ids
            .invalidate(&index_key(namespace, value))
            .await;
    }

    /// Asks Ory (`ask`) which identity holds a business id, unless it answered "none" within
    /// `IDMAP_EXTERNAL_ID_MISS_TTL`: such answers are remembered, so lookups of unknown ids cannot
    /// flood Ory's admin API. Concurrent askers for one id share one call. `Ok(None)`: Ory has none.
    pub async fn ask_ory_for_external_id<T, E, F, Fut>(
        &self,
        namespace: &Namespace,
        value: &str,
        ask: F,
    ) -> Result<Option<T>, E>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Option<T>, E>>,
        T: Clone + Send + Sync + 'static,
        E: Clone + Send + Sync + 'static,
    {
        // Only a miss is kept; a found identity or an error is handed to every waiting caller
        // through moka's shared error and then dropped.
        let asked_ory = AtomicBool::new(false);
        let asked = self
            .ory_external_id_misses
            .try_get_with(index_key(namespace, value), async {
                asked_ory.store(true, Ordering::Relaxed);
                match ask().await {
                    Ok(None) => Ok(()),
                    Ok(Some(found)) => Err(Ok(found)),
                    Err(e) => Err(Err(e)),
                }
            })
            .await;
        metrics::get().cache_lookup(
            CacheName::OryExternalId,
            match (asked_ory.load(Ordering::Relaxed), &asked) {
                (true, _) => CacheResult::Miss,
                (false, Ok(())) => CacheResult::Hit,
                (false, Err(_)) => CacheResult::Coalesced,
            },
        );
        match asked {
            Ok(()) => Ok(None),
            Err(shared) => match &*shared {
                Ok(found) => Ok(Some(found.clone())),
                Err(e) => Err(e.clone()),
            },
        }
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

    fn user(identity: IdentityId) -> User {
        User {
            id: crate::domain::UserId::mint(),
            ory_identity_id: identity,
            external_ids: Vec::new(),
            schema_id: "default".into(),
            created_at: chrono::Utc::now(),
            updated_at: chrono::Utc::now(),
            state: crate::domain::UserState::Active,
        }
    }

    /// An eviction that lands while a load is in flight (here: inside the load) outdates it: the
    /// answer is loaded again, and only the answer loaded after the eviction is kept.
    #[tokio::test]
    async fn an_eviction_during_a_session_load_outdates_it() {
        let caches = Caches::new(CacheSettings::default());
        let key = [3; 32];
        let s = Arc::new(session(Some(chrono::Duration::hours(1))));
        let loads = AtomicU64::new(0);
        let entry = caches
            .session(key, || async {
                if loads.fetch_add(1, Ordering::SeqCst) == 0 {
                    caches.evict_session_id("s");
                }
                Ok::<_, ()>(SessionEntry::new(
                    CachedSession::Valid(s.clone()),
                    Duration::from_secs(60),
                ))
            })
            .await
            .unwrap();
        assert!(matches!(entry.value, CachedSession::Valid(_)));
        assert_eq!(
            loads.load(Ordering::SeqCst),
            2,
            "loaded again after the eviction"
        );
        assert!(caches.cached_session_id(&key).await.is_some());

        // An eviction of another session leaves the load alone.
        let other = [4; 32];
        let loads = AtomicU64::new(0);
        caches
            .session(other, || async {
                loads.fetch_add(1, Ordering::SeqCst);
                caches.evict_session_id("not-this-one");
                Ok::<_, ()>(SessionEntry::new(
                    CachedSession::Valid(s.clone()),
                    Duration::from_secs(60),
                ))
            })
            .await
            .unwrap();
        assert_eq!(loads.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn an_eviction_during_a_user_load_outdates_it() {
        let caches = Caches::new(CacheSettings::default());
        let identity = IdentityId::from_uuid(uuid::Uuid::new_v4());
        let loads = AtomicU64::new(0);
        let loaded = caches
            .user_or_load(identity, || async {
                if loads.fetch_add(1, Ordering::SeqCst) == 0 {
                    caches.evict_user(identity).await;
                }
                Ok::<_, ()>(Some(user(identity)))
            })
            .await
            .unwrap();
        assert!(loaded.is_some());
        assert_eq!(
            loads.load(Ordering::SeqCst),
            2,
            "loaded again after the eviction"
        );
        assert!(caches.user(&identity).await.is_some());
    }
}
