//! An in-process emulator of the Ory Kratos HTTP API, served over real HTTP.
//!
//! It covers what idmap talks to: `/sessions/whoami` (every method) and the admin identity and
//! session API. By default everything is on one listener like Ory Network (admin paths work with
//! and without the `/admin` prefix, like a self-hosted admin port); with
//! [`EmulatorConfig::separate_admin_listener`] it has self-hosted Kratos's two ports, where the
//! public one answers admin identity paths with a 307 to the admin one. Behaviour follows
//! `spec/ory/CONTRACT.md` and the Kratos OpenAPI spec; test hooks (faults, call counters, waiting
//! for identity changes or calls) let tests drive the failure modes Ory Network produces.
//!
//! The emulator has no identity schemas. It behaves as if every schema were the
//! email/password preset: `traits.email` and `traits.username` become password identifiers
//! (unique, lowercased), and `traits.email` becomes a verifiable and a recovery address.

// Published to the workspace as a library other crates build on, so every public item says what it is for.
#![warn(missing_docs)]

mod herodot;
mod http;
mod page_tokens;
mod patch;
mod store;

use std::{
    net::{Ipv4Addr, SocketAddr},
    sync::{
        Arc, Mutex, MutexGuard,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use axum::Router;
use axum::serve::ListenerExt;
use rand::{RngExt, distr::Alphanumeric};
use serde_json::{Value, json};
use tokio::{
    net::TcpListener,
    sync::{oneshot, watch},
    task::JoinHandle,
};
use uuid::Uuid;

use store::{ApiError, IdentityInput, Session, Store, now};

/// Which AAL `/sessions/whoami` demands (`session.whoami.required_aal`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RequiredAal {
    /// Any authenticated session is enough.
    Aal1,
    /// A session must reach the highest AAL the identity has credentials for (Kratos' default).
    #[default]
    HighestAvailable,
}

/// How `GET /admin/identities` makes its keyset page tokens. Kratos versions differ, and a client
/// must cope with both.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PageTokens {
    /// Older Kratos (ory/x `keysetpagination`): the token is the page's last identity id, valid
    /// for ever.
    LastId,
    /// Current Kratos and Ory Network (ory/x `keysetpagination_v2`): an opaque token (Kratos
    /// encrypts it) that expires `ttl` after it was issued. An expired token is refused with 400,
    /// reason `page token expired, do not persist page tokens`.
    Expiring {
        /// ory/x gives every token one hour.
        ttl: Duration,
    },
}

impl Default for PageTokens {
    fn default() -> Self {
        Self::Expiring {
            ttl: Duration::from_secs(3600),
        }
    }
}

/// How `GET /admin/identities` sends its `Link` header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LinkHeader {
    /// One `Link` header, its `rel="first"` and `rel="next"` entries joined by a comma (current
    /// ory/x).
    #[default]
    Joined,
    /// `rel="first"` and `rel="next"` as two separate `Link` headers (older ory/x, which `Set` the
    /// first and `Add`ed the next).
    Split,
}

/// Emulator settings, mirroring the Kratos configuration keys that change whoami and the admin API.
#[derive(Debug, Clone)]
pub struct EmulatorConfig {
    /// When set, admin routes require `Authorization: Bearer <key>` (as Ory Network does) and
    /// answer 401 in herodot shape otherwise. `None` is a self-hosted admin port: no auth.
    pub api_key: Option<String>,
    /// `session.whoami.required_aal`.
    pub required_aal: RequiredAal,
    /// `feature_flags.cacheable_sessions` with its `cacheable_sessions_max_age`: when set, a whoami
    /// 200 carries `Ory-Session-Cache-For: <seconds until expiry, capped at this>` and a 401
    /// without credentials carries `Ory-Session-Cache-For: 60`.
    pub cacheable_sessions_max_age: Option<Duration>,
    /// `session.cookie.name`; cookies named `ory_session_*` are accepted as well.
    pub session_cookie_name: String,
    /// Serve the admin API on a listener of its own, as self-hosted Kratos does (`serve.public`
    /// on 4433, `serve.admin` on 4434): the public listener then answers admin identity paths
    /// (`/identities...`, `/admin/identities...`) with Kratos's 307 to the admin listener
    /// (`identity/handler.go`, `x.RedirectToAdminRoute`), and the admin listener sends
    /// `/sessions/whoami` to the public one. `false` is Ory Network: one listener for both.
    pub separate_admin_listener: bool,
    /// The page tokens of `GET /admin/identities`.
    pub page_tokens: PageTokens,
    /// The `Link` header of `GET /admin/identities`.
    pub link_header: LinkHeader,
}

impl Default for EmulatorConfig {
    fn default() -> Self {
        Self {
            api_key: None,
            required_aal: RequiredAal::default(),
            cacheable_sessions_max_age: None,
            session_cookie_name: "ory_kratos_session".into(),
            separate_admin_listener: false,
            page_tokens: PageTokens::default(),
            link_header: LinkHeader::default(),
        }
    }
}

/// A class of routes, for fault injection and call counting.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Route {
    /// `/sessions/whoami`, any method.
    Whoami,
    /// `GET`/`HEAD` on an admin path.
    AdminRead,
    /// `POST`/`PUT`/`PATCH`/`DELETE` (any other method) on an admin path.
    AdminWrite,
}

impl Route {
    fn index(self) -> usize {
        match self {
            Route::Whoami => 0,
            Route::AdminRead => 1,
            Route::AdminWrite => 2,
        }
    }
}

/// A canned answer for a route class, served instead of the normal handling.
///
/// A fault with `status == 0` only delays: after `delay`, the request is answered normally.
#[derive(Debug, Clone)]
pub struct Fault {
    /// HTTP status to answer with; 0 means "no canned answer" (delay only).
    pub status: u16,
    /// Extra response headers.
    pub headers: Vec<(String, String)>,
    /// JSON body (sent with `Content-Type: application/json`); `None` sends an empty body.
    pub body: Option<Value>,
    /// How many requests the fault applies to; `None` until [`Emulator::clear_faults`].
    pub times: Option<usize>,
    /// Wait this long before answering (a slow or hanging upstream).
    pub delay: Option<Duration>,
    /// Hold the request (after `delay`) until the gate opens: a test can let every request of a
    /// burst arrive, then answer them all at once.
    pub gate: Option<Gate>,
}

/// Holds requests that a fault applies to until [`Gate::open`] (see [`Fault::held`]).
#[derive(Debug, Clone)]
pub struct Gate(Arc<watch::Sender<bool>>);

impl Default for Gate {
    fn default() -> Self {
        Gate(Arc::new(watch::channel(false).0))
    }
}

impl Gate {
    /// A closed gate.
    pub fn new() -> Gate {
        Gate::default()
    }

    /// Lets every held request, and every later one, through.
    pub fn open(&self) {
        self.0.send_replace(true);
    }

    pub(crate) async fn passed(&self) {
        let mut open = self.0.subscribe();
        let _ = open.wait_for(|o| *o).await;
    }
}

impl Fault {
    /// Answer `code` with the herodot error body Ory uses for that status.
    pub fn status(code: u16) -> Fault {
        Fault {
            status: code,
            headers: Vec::new(),
            body: Some(herodot::generic(code, None)),
            times: None,
            delay: None,
            gate: None,
        }
    }

    /// Answer `code` with exactly `body` (none: an empty body), as a canned Ory answer: a recorded
    /// Kratos response, or what another implementation or a proxy might send.
    pub fn answer(code: u16, body: Option<Value>) -> Fault {
        Fault {
            status: code,
            headers: Vec::new(),
            body,
            times: None,
            delay: None,
            gate: None,
        }
    }

    /// Ory Network rate limiting: 429 with `Retry-After` and `x-ratelimit-*` headers.
    pub fn rate_limited(retry_after_secs: u64) -> Fault {
        let mut f = Fault::status(429);
        f.headers = vec![
            ("Retry-After".into(), retry_after_secs.to_string()),
            ("x-ratelimit-limit".into(), "10".into()),
            ("x-ratelimit-remaining".into(), "0".into()),
            ("x-ratelimit-reset".into(), retry_after_secs.to_string()),
        ];
        f
    }

    /// Only delay requests by `d`, then answer normally.
    pub fn delay_only(d: Duration) -> Fault {
        Fault {
            status: 0,
            headers: Vec::new(),
            body: None,
            times: None,
            delay: Some(d),
            gate: None,
        }
    }

    /// Only hold requests until `gate` opens, then answer normally.
    pub fn held(gate: &Gate) -> Fault {
        Fault {
            status: 0,
            headers: Vec::new(),
            body: None,
            times: None,
            delay: None,
            gate: Some(gate.clone()),
        }
    }

    /// Apply to the next `n` requests only.
    pub fn times(mut self, n: usize) -> Fault {
        self.times = Some(n);
        self
    }

    /// Wait `d` before answering.
    pub fn delay(mut self, d: Duration) -> Fault {
        self.delay = Some(d);
        self
    }

    /// Send this header too.
    pub fn header(mut self, name: &str, value: &str) -> Fault {
        self.headers.push((name.to_owned(), value.to_owned()));
        self
    }
}

/// An identity to create directly (bypassing HTTP).
#[derive(Debug, Clone)]
pub struct NewIdentity {
    /// Schema id; empty means `"default"`.
    pub schema_id: String,
    /// Traits; must be a JSON object.
    pub traits: Value,
    /// `"active"` (default when `None`) or `"inactive"`.
    pub state: Option<String>,
    /// Unique external id; `None` or `""` leaves it unset.
    pub external_id: Option<String>,
    /// Public metadata (`null` when `None`).
    pub metadata_public: Option<Value>,
    /// Admin metadata (`null` when `None`).
    pub metadata_admin: Option<Value>,
    /// Extra password credential identifiers, on top of `traits.email` / `traits.username`.
    /// They are recomputed from traits alone when the identity is later updated over HTTP.
    pub identifiers: Vec<String>,
    /// The identity has an `aal2` credential (TOTP), so `highest_available` requires `aal2`.
    pub second_factor: bool,
}

impl Default for NewIdentity {
    fn default() -> Self {
        Self {
            schema_id: "default".into(),
            traits: json!({}),
            state: None,
            external_id: None,
            metadata_public: None,
            metadata_admin: None,
            identifiers: Vec::new(),
            second_factor: false,
        }
    }
}

/// A session to create directly, as if the identity had just logged in.
#[derive(Debug, Clone)]
pub struct NewSession {
    /// `"aal1"` or `"aal2"`.
    pub aal: String,
    /// Time until `expires_at`; zero or tiny values give an already expired session.
    pub lifespan: Duration,
    /// Authentication methods (`password`, `totp`, ...). An `aal2` session without a second
    /// factor method gets `totp` appended.
    pub methods: Vec<String>,
}

impl Default for NewSession {
    fn default() -> Self {
        Self {
            aal: "aal1".into(),
            lifespan: Duration::from_secs(24 * 3600),
            methods: vec!["password".into()],
        }
    }
}

/// What a client needs to present a session.
#[derive(Debug, Clone)]
pub struct CreatedSession {
    /// Session id.
    pub id: Uuid,
    /// Session token (`ory_st_` + 32 alphanumerics) for `X-Session-Token` or `Authorization: Bearer`.
    pub token: String,
    /// Opaque value for the session cookie (`<config.session_cookie_name>=<cookie>`).
    pub cookie: String,
}

/// One seeded identity with a live session.
#[derive(Debug, Clone)]
pub struct DemoEntry {
    /// Identity id.
    pub identity_id: Uuid,
    /// `"customer"` or `"employee"`.
    pub schema_id: String,
    /// `traits.email`.
    pub email: String,
    /// Session token.
    pub session_token: String,
    /// Session cookie value.
    pub cookie: String,
    /// The session's AAL.
    pub aal: String,
    /// What this entry demonstrates.
    pub note: String,
}

/// The data [`Emulator::seed_demo`] created.
#[derive(Debug, Clone, Default)]
pub struct DemoSeed {
    /// One entry per seeded session.
    pub entries: Vec<DemoEntry>,
}

/// An API failure from a direct (non-HTTP) call: the status and herodot body HTTP would return.
#[derive(Debug, Clone)]
pub struct EmulatorError {
    /// HTTP status, e.g. 400, 404 or 409.
    pub status: u16,
    /// herodot error body.
    pub body: Value,
}

impl std::fmt::Display for EmulatorError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "kratos emulator error {}: {}", self.status, self.body)
    }
}

impl std::error::Error for EmulatorError {}

impl From<ApiError> for EmulatorError {
    fn from(e: ApiError) -> Self {
        Self {
            status: e.status,
            body: e.body,
        }
    }
}

struct Server {
    stop: oneshot::Sender<()>,
    task: JoinHandle<()>,
}

pub(crate) struct Inner {
    pub(crate) config: EmulatorConfig,
    addr: SocketAddr,
    /// The public API's base URL.
    pub(crate) base_url: String,
    /// The admin API's base URL: `base_url` unless the admin API has a listener of its own.
    pub(crate) admin_base_url: String,
    store: Mutex<Store>,
    faults: Mutex<[Vec<Fault>; 3]>,
    calls: [AtomicU64; 3],
    /// Bumped after every mutation so `wait_for_identity` can re-check without polling.
    changes: watch::Sender<u64>,
    /// Bumped after every counted call so `wait_for_calls` can re-check without polling.
    calls_changed: watch::Sender<u64>,
    /// The W3C `traceparent` of every request that carried one, by route, in arrival order.
    traceparents: Mutex<[Vec<String>; 3]>,
    /// Serial number of the next page token issued.
    pub(crate) next_page_token: AtomicU64,
    /// Page tokens with a serial number below this are expired ([`Emulator::expire_page_tokens`]).
    pub(crate) page_tokens_valid_from: AtomicU64,
    servers: Mutex<Vec<Server>>,
}

/// Which of the emulator's listeners a request arrived on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Port {
    /// Public and admin API together (Ory Network).
    Combined,
    /// Self-hosted Kratos's public port.
    Public,
    /// Self-hosted Kratos's admin port.
    Admin,
}

/// The state of one listener's router.
#[derive(Clone)]
pub(crate) struct Listener {
    pub(crate) emu: Emulator,
    pub(crate) port: Port,
}

/// A running emulator. Cheap to clone; every clone controls the same server. Dropping the
/// handles does not stop it: call [`Emulator::shutdown`] (or let the tokio runtime end).
#[derive(Clone)]
pub struct Emulator {
    pub(crate) inner: Arc<Inner>,
}

impl std::fmt::Debug for Emulator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Emulator")
            .field("url", &self.inner.base_url)
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding the lock cannot leave the plain data structures inconsistent in a
    // way that matters for a test double, so keep serving.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn random_alphanumeric(n: usize) -> String {
    rand::rng()
        .sample_iter(Alphanumeric)
        .take(n)
        .map(char::from)
        .collect()
}

/// An unspecified bound IP is reported as 127.0.0.1, which clients can connect to.
fn reported(mut addr: SocketAddr) -> SocketAddr {
    if addr.ip().is_unspecified() {
        addr.set_ip(Ipv4Addr::LOCALHOST.into());
    }
    addr
}

fn aal_of_method(method: &str) -> &'static str {
    if matches!(method, "totp" | "lookup_secret" | "webauthn") {
        "aal2"
    } else {
        "aal1"
    }
}

impl Emulator {
    /// Binds `addr` (port 0 picks a free port) and serves the public and admin API in spawned
    /// tasks. With [`EmulatorConfig::separate_admin_listener`], the admin API gets a second
    /// listener on the same IP and a free port.
    pub async fn start(addr: SocketAddr, config: EmulatorConfig) -> std::io::Result<Emulator> {
        let listener = TcpListener::bind(addr).await?;
        let local = reported(listener.local_addr()?);
        let admin_listener = if config.separate_admin_listener {
            let listener = TcpListener::bind(SocketAddr::new(addr.ip(), 0)).await?;
            let local = reported(listener.local_addr()?);
            Some((listener, local))
        } else {
            None
        };
        let base_url = format!("http://{local}");
        let admin_base_url = admin_listener
            .as_ref()
            .map_or_else(|| base_url.clone(), |(_, a)| format!("http://{a}"));
        let (changes, _) = watch::channel(0u64);
        let (calls_changed, _) = watch::channel(0u64);
        let emu = Emulator {
            inner: Arc::new(Inner {
                config,
                addr: local,
                base_url,
                admin_base_url,
                store: Mutex::new(Store::default()),
                faults: Mutex::new([Vec::new(), Vec::new(), Vec::new()]),
                calls: [AtomicU64::new(0), AtomicU64::new(0), AtomicU64::new(0)],
                changes,
                calls_changed,
                traceparents: Mutex::new(Default::default()),
                next_page_token: AtomicU64::new(0),
                page_tokens_valid_from: AtomicU64::new(0),
                servers: Mutex::new(Vec::new()),
            }),
        };
        match admin_listener {
            None => emu.serve(listener, Port::Combined),
            Some((admin, _)) => {
                emu.serve(listener, Port::Public);
                emu.serve(admin, Port::Admin);
            }
        }
        Ok(emu)
    }

    fn serve(&self, listener: TcpListener, port: Port) {
        let router = Router::new().fallback(http::dispatch).with_state(Listener {
            emu: self.clone(),
            port,
        });
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let shutdown = async {
                let _ = stopped.await;
            };
            // Serving only fails if the listener breaks; a test double has nobody to report to.
            // Like Kratos's Go server (Go sets TCP_NODELAY by default), answer without Nagle delays.
            let listener = listener.tap_io(|tcp| {
                let _ = tcp.set_nodelay(true);
            });
            let _ = axum::serve(listener, router)
                .with_graceful_shutdown(shutdown)
                .await;
        });
        lock(&self.inner.servers).push(Server { stop, task });
    }

    /// The public API's base URL without trailing slash, e.g. `http://127.0.0.1:43121`; the
    /// admin API's too unless it has a listener of its own.
    pub fn url(&self) -> String {
        self.inner.base_url.clone()
    }

    /// The admin API's base URL without trailing slash: [`Emulator::url`] unless
    /// [`EmulatorConfig::separate_admin_listener`] gave it a listener of its own.
    pub fn admin_url(&self) -> String {
        self.inner.admin_base_url.clone()
    }

    /// The bound address of the public API (an unspecified IP is reported as 127.0.0.1).
    pub fn addr(&self) -> SocketAddr {
        self.inner.addr
    }

    /// Stops serving: in-flight requests get up to 5 s to finish, then the server tasks are
    /// aborted. The ports are released when this returns. Later calls do nothing.
    pub async fn shutdown(&self) {
        let servers = std::mem::take(&mut *lock(&self.inner.servers));
        // Both listeners drain at once, so the 5 s bound holds for the whole emulator.
        let mut tasks = Vec::with_capacity(servers.len());
        for Server { stop, task } in servers {
            let _ = stop.send(());
            tasks.push(task);
        }
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        for mut task in tasks {
            if tokio::time::timeout_at(deadline, &mut task).await.is_err() {
                task.abort();
                let _ = task.await;
            }
        }
    }

    pub(crate) fn lock_store(&self) -> MutexGuard<'_, Store> {
        lock(&self.inner.store)
    }

    /// Runs `f` under the store lock and wakes identity waiters if it succeeded.
    pub(crate) fn mutate<T>(
        &self,
        f: impl FnOnce(&mut Store) -> Result<T, ApiError>,
    ) -> Result<T, ApiError> {
        let result = f(&mut self.lock_store());
        if result.is_ok() {
            self.inner.changes.send_modify(|v| *v = v.wrapping_add(1));
        }
        result
    }

    pub(crate) fn record_traceparent(&self, route: Route, traceparent: &str) {
        lock(&self.inner.traceparents)[route.index()].push(traceparent.to_owned());
    }

    pub(crate) fn count(&self, route: Route) {
        self.inner.calls[route.index()].fetch_add(1, Ordering::Relaxed);
        self.inner
            .calls_changed
            .send_modify(|v| *v = v.wrapping_add(1));
    }

    /// The first fault queued for `route`, consuming one of its `times`.
    pub(crate) fn take_fault(&self, route: Route) -> Option<Fault> {
        let mut faults = lock(&self.inner.faults);
        let queue = &mut faults[route.index()];
        let first = queue.first_mut()?;
        let served = first.clone();
        match &mut first.times {
            Some(n) if *n <= 1 => {
                queue.remove(0);
            }
            Some(n) => *n -= 1,
            None => {}
        }
        Some(served)
    }

    pub(crate) fn try_create(&self, input: IdentityInput) -> Result<Value, ApiError> {
        let base = self.inner.base_url.clone();
        self.mutate(|s| {
            let id = s.create_identity(input)?;
            s.identities
                .get(&id)
                .map(|i| i.to_json(&base, store::Shape::Admin))
                .ok_or_else(ApiError::not_found)
        })
    }

    /// Creates an identity like `POST /admin/identities` and returns its admin JSON.
    pub fn try_create_identity(&self, new: NewIdentity) -> Result<Value, EmulatorError> {
        let input = IdentityInput {
            schema_id: new.schema_id,
            traits: new.traits,
            state: new.state,
            external_id: new.external_id,
            metadata_public: new.metadata_public.unwrap_or(Value::Null),
            metadata_admin: new.metadata_admin.unwrap_or(Value::Null),
            organization_id: None,
            region: None,
            credentials: None,
            extra_identifiers: new.identifiers,
            second_factor: new.second_factor,
            verifiable_addresses: Vec::new(),
        };
        Ok(self.try_create(input)?)
    }

    /// Creates an identity and returns its admin JSON (with `credentials` and `metadata_admin`).
    ///
    /// # Panics
    /// If the identity is invalid (traits not an object, bad state) or clashes with an existing
    /// `external_id` or identifier: seeding such data is a bug in the caller. Use
    /// [`Emulator::try_create_identity`] to get the 400/409 instead.
    pub fn create_identity(&self, new: NewIdentity) -> Value {
        match self.try_create_identity(new) {
            Ok(v) => v,
            Err(e) => panic!("create_identity: {e}"),
        }
    }

    /// The identity's admin JSON, as `GET /admin/identities/{id}` returns it.
    pub fn identity(&self, id: Uuid) -> Option<Value> {
        self.lock_store()
            .identities
            .get(&id)
            .map(|i| i.to_json(&self.inner.base_url, store::Shape::Admin))
    }

    /// Applies a JSON Patch like `PATCH /admin/identities/{id}` and returns the admin JSON.
    pub fn patch_identity(&self, id: Uuid, patch: &Value) -> Result<Value, EmulatorError> {
        let base = self.inner.base_url.clone();
        self.mutate(|s| {
            s.patch_identity(id, &base, patch)?;
            s.identities
                .get(&id)
                .map(|i| i.to_json(&base, store::Shape::Admin))
                .ok_or_else(ApiError::not_found)
        })
        .map_err(Into::into)
    }

    /// Deletes the identity and its sessions; false if it did not exist.
    pub fn delete_identity(&self, id: Uuid) -> bool {
        self.mutate(|s| {
            if s.delete_identity(id) {
                Ok(())
            } else {
                Err(ApiError::not_found())
            }
        })
        .is_ok()
    }

    /// Sets `state` (`"active"` or `"inactive"`; anything else is ignored) and `state_changed_at`.
    pub fn set_identity_state(&self, id: Uuid, state: &str) {
        let _ = self.mutate(|s| {
            if s.set_state(id, state) {
                Ok(())
            } else {
                Err(ApiError::not_found())
            }
        });
    }

    /// Issues a session for the identity. A session for an unknown identity is stored but
    /// whoami rejects it, like a session whose identity was deleted.
    pub fn create_session(&self, identity_id: Uuid, new: NewSession) -> CreatedSession {
        let at = now();
        let lifespan = chrono::Duration::from_std(new.lifespan).unwrap_or(chrono::Duration::MAX);
        let expires_at = at.checked_add_signed(lifespan).unwrap_or(at);
        let mut methods: Vec<(String, String)> = new
            .methods
            .iter()
            .map(|m| (m.clone(), aal_of_method(m).to_string()))
            .collect();
        if new.aal != "aal1" && !methods.iter().any(|(_, aal)| aal == "aal2") {
            methods.push(("totp".into(), "aal2".into()));
        }
        let session = Session {
            id: Uuid::new_v4(),
            identity_id,
            token: format!("ory_st_{}", random_alphanumeric(32)),
            cookie: random_alphanumeric(64),
            active: true,
            aal: new.aal,
            methods,
            issued_at: at,
            expires_at,
        };
        let created = CreatedSession {
            id: session.id,
            token: session.token.clone(),
            cookie: session.cookie.clone(),
        };
        let _ = self.mutate(|s| {
            s.insert_session(session);
            Ok(())
        });
        created
    }

    /// Revokes a session (`active: false`), as `DELETE /admin/sessions/{id}` does.
    pub fn revoke_session(&self, session_id: Uuid) {
        let _ = self.mutate(|s| match s.sessions.get_mut(&session_id) {
            Some(session) => {
                session.active = false;
                Ok(())
            }
            None => Err(ApiError::not_found()),
        });
    }

    /// Queues a fault for a route class. Faults are served in the order they were injected;
    /// one with `times` exhausted makes room for the next. A fault with `times: Some(0)` is ignored.
    pub fn inject_fault(&self, route: Route, fault: Fault) {
        if fault.times == Some(0) {
            return;
        }
        lock(&self.inner.faults)[route.index()].push(fault);
    }

    /// Removes every queued fault.
    pub fn clear_faults(&self) {
        for queue in lock(&self.inner.faults).iter_mut() {
            queue.clear();
        }
    }

    /// The W3C `traceparent` headers of the requests to `route` that carried one, oldest first:
    /// what a trace that crossed into Ory would show.
    pub fn traceparents(&self, route: Route) -> Vec<String> {
        lock(&self.inner.traceparents)[route.index()].clone()
    }

    /// Requests that reached the route class since start or [`Emulator::reset_calls`],
    /// faulted ones included.
    pub fn calls(&self, route: Route) -> u64 {
        self.inner.calls[route.index()].load(Ordering::Relaxed)
    }

    /// Makes every page token issued so far expired, as if its hour had passed: Kratos then
    /// refuses it with 400 (`page token expired, do not persist page tokens`). Tokens issued later
    /// are valid. Tests use it rather than waiting; with [`PageTokens::LastId`], which never
    /// expire, it changes nothing.
    pub fn expire_page_tokens(&self) {
        let issued = self.inner.next_page_token.load(Ordering::SeqCst);
        self.inner
            .page_tokens_valid_from
            .fetch_max(issued, Ordering::SeqCst);
    }

    /// Zeroes all call counters.
    pub fn reset_calls(&self) {
        for c in &self.inner.calls {
            c.store(0, Ordering::Relaxed);
        }
    }

    /// Resolves `true` as soon as at least `n` requests have reached the route class (counted as
    /// [`Emulator::calls`] counts them, so before any fault delay), or `false` after `timeout`.
    pub async fn wait_for_calls(&self, route: Route, n: u64, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        // Subscribing before the first check means no call can slip between check and wait.
        let mut rx = self.inner.calls_changed.subscribe();
        loop {
            if self.calls(route) >= n {
                return true;
            }
            match tokio::time::timeout_at(deadline, rx.changed()).await {
                Ok(Ok(())) => continue,
                Ok(Err(_)) | Err(_) => return false,
            }
        }
    }

    /// Resolves with the identity's admin JSON as soon as it satisfies `pred` (checked now and
    /// after every mutation), or `None` after `timeout`.
    pub async fn wait_for_identity(
        &self,
        id: Uuid,
        pred: impl Fn(&Value) -> bool,
        timeout: Duration,
    ) -> Option<Value> {
        let deadline = tokio::time::Instant::now() + timeout;
        // Subscribing before the first check means no mutation can slip between check and wait.
        let mut rx = self.inner.changes.subscribe();
        loop {
            if let Some(v) = self.identity(id).filter(|v| pred(v)) {
                return Some(v);
            }
            match tokio::time::timeout_at(deadline, rx.changed()).await {
                Ok(Ok(())) => continue,
                Ok(Err(_)) | Err(_) => return None,
            }
        }
    }

    /// Seeds demo data for `idmap dev`: customers and employees (traits `email` and `name`),
    /// some with `metadata_public` or `external_id`, one employee with a second factor, and a
    /// 24 h session per entry. Call it once: the e-mail addresses are unique identifiers.
    pub fn seed_demo(&self) -> DemoSeed {
        struct Spec {
            schema: &'static str,
            email: &'static str,
            first: &'static str,
            last: &'static str,
            metadata_public: Option<Value>,
            external_id: Option<&'static str>,
            second_factor: bool,
            state: &'static str,
            sessions: &'static [(&'static str, &'static str)],
        }
        let specs = [
            Spec {
                schema: "customer",
                email: "alice@example.com",
                first: "Alice",
                last: "Anderson",
                metadata_public: None,
                external_id: None,
                second_factor: false,
                state: "active",
                sessions: &[("aal1", "customer without metadata_public: whoami 200")],
            },
            Spec {
                schema: "customer",
                email: "bob@example.com",
                first: "Bob",
                last: "Brown",
                metadata_public: Some(json!({"plan": "pro", "newsletter": true})),
                external_id: Some("crm-1002"),
                second_factor: false,
                state: "active",
                sessions: &[(
                    "aal1",
                    "customer with metadata_public and external_id: whoami 200",
                )],
            },
            Spec {
                schema: "employee",
                email: "carol@corp.example.com",
                first: "Carol",
                last: "Clark",
                metadata_public: Some(json!({"department": "support"})),
                external_id: None,
                second_factor: false,
                state: "active",
                sessions: &[("aal1", "employee with metadata_public: whoami 200")],
            },
            Spec {
                schema: "employee",
                email: "dave@corp.example.com",
                first: "Dave",
                last: "Davis",
                metadata_public: Some(json!({"department": "engineering"})),
                external_id: None,
                second_factor: true,
                state: "active",
                sessions: &[
                    ("aal2", "employee with TOTP, aal2 session: whoami 200"),
                    (
                        "aal1",
                        "employee with TOTP, aal1 session: whoami 403 session_aal2_required (highest_available)",
                    ),
                ],
            },
            Spec {
                schema: "customer",
                email: "erin@example.com",
                first: "Erin",
                last: "Evans",
                metadata_public: None,
                external_id: None,
                second_factor: false,
                state: "inactive",
                sessions: &[("aal1", "inactive customer: whoami 401")],
            },
        ];
        let mut seed = DemoSeed::default();
        for spec in specs {
            let identity = self.create_identity(NewIdentity {
                schema_id: spec.schema.into(),
                traits: json!({"email": spec.email, "name": {"first": spec.first, "last": spec.last}}),
                state: Some(spec.state.into()),
                external_id: spec.external_id.map(str::to_string),
                metadata_public: spec.metadata_public,
                metadata_admin: None,
                identifiers: Vec::new(),
                second_factor: spec.second_factor,
            });
            let identity_id = identity["id"]
                .as_str()
                .and_then(|s| Uuid::parse_str(s).ok())
                .unwrap_or_default();
            for (aal, note) in spec.sessions {
                let methods = if *aal == "aal2" {
                    vec!["password".into(), "totp".into()]
                } else {
                    vec!["password".into()]
                };
                let session = self.create_session(
                    identity_id,
                    NewSession {
                        aal: (*aal).into(),
                        lifespan: Duration::from_secs(24 * 3600),
                        methods,
                    },
                );
                seed.entries.push(DemoEntry {
                    identity_id,
                    schema_id: spec.schema.into(),
                    email: spec.email.into(),
                    session_token: session.token,
                    cookie: session.cookie,
                    aal: (*aal).into(),
                    note: (*note).into(),
                });
            }
        }
        seed
    }
}
