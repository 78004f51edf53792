//! The settings each part of the service runs with, as [`super::Config`] hands them out. They live
//! here rather than beside the code that reads them so that `config` imports nothing of the
//! modules it configures: every module may import `config`, and `config` none of them.

use std::fmt;
use std::num::NonZeroU32;
use std::path::PathBuf;
use std::time::Duration;

use axum::http::HeaderName;
use secrecy::SecretString;
use url::Url;

use crate::domain::Namespace;

/// Cache sizes and lifetimes.
#[derive(Debug, Clone)]
pub struct CacheSettings {
    /// Longest a validated session is served from memory (also bounded by its `expires_at` and
    /// Ory's `Ory-Session-Cache-For`). Zero turns the session cache off.
    pub session_ttl: Duration,
    /// Most sessions cached.
    pub session_max_entries: u64,
    /// How long Ory's "no such session" (401) is remembered.
    pub negative_ttl: Duration,
    /// On Ory 429/5xx/timeouts, serve a session this long past its TTL (never past `expires_at`).
    pub stale_if_error: Option<Duration>,
    /// Longest a user is served from memory; writes evict it earlier on every replica.
    pub user_ttl: Duration,
    /// Most users cached (per index).
    pub user_max_entries: u64,
    /// Share validated sessions between replicas through PostgreSQL (the second cache level).
    pub shared_sessions: bool,
    /// How long Ory's "no identity has that external id" (404) is remembered.
    pub external_id_miss_ttl: Duration,
}

impl Default for CacheSettings {
    fn default() -> Self {
        Self {
            session_ttl: Duration::from_secs(60),
            session_max_entries: 100_000,
            negative_ttl: Duration::from_secs(5),
            stale_if_error: None,
            user_ttl: Duration::from_secs(300),
            user_max_entries: 100_000,
            shared_sessions: true,
            external_id_miss_ttl: Duration::from_secs(30),
        }
    }
}

/// Where Ory is and how to reach it.
#[derive(Clone)]
pub struct OryConfig {
    /// Base URL of the public API (`/sessions/whoami`).
    pub public_url: Url,
    /// Base URL of the admin API (`/admin/identities`).
    pub admin_url: Url,
    /// Bearer token for the admin API (Ory Network project API key).
    pub api_key: Option<SecretString>,
    /// Upper bound on one Ory call, connect to last byte.
    pub timeout: Duration,
    /// Most whoami calls per second (`None`: unlimited).
    pub whoami_rps: Option<NonZeroU32>,
    /// Most admin API calls per second (`None`: unlimited).
    pub admin_rps: Option<NonZeroU32>,
}

/// The header Ory's `api_key` auth sends the secret in unless configured otherwise.
pub const DEFAULT_HEADER: &str = "Authorization";

/// How webhook requests authenticate.
#[derive(Clone)]
pub struct HookSettings {
    /// The shared secret; `None` disables the endpoints (every request is refused).
    pub secret: Option<SecretString>,
    /// The header that carries the secret as its whole value (Ory `api_key` auth, `in: header`).
    pub header: HeaderName,
}

impl fmt::Debug for HookSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HookSettings")
            .field("secret", &self.secret.as_ref().map(|_| "[REDACTED]"))
            .field("header", &self.header)
            .finish()
    }
}

/// Timing of the worker.
#[derive(Debug, Clone)]
pub struct OutboxSettings {
    /// Rows claimed per round.
    pub batch_size: i64,
    /// How long a claimed row stays invisible to other workers. At least twice `row_budget`, so a
    /// claim always has room for a delivery.
    pub lease: Duration,
    /// The longest one row's delivery may take: its Ory calls, each waiting for its turn under the
    /// admin rate limit and then for Ory, both bounded by IDMAP_ORY_TIMEOUT. A delivery that takes
    /// longer is abandoned and retried.
    pub row_budget: Duration,
    /// First retry delay; doubles per attempt.
    pub retry_min: Duration,
    /// Longest retry delay.
    pub retry_max: Duration,
    /// Longest sleep between looks at the table (rows queued by other replicas are seen this late).
    pub poll_interval: Duration,
    /// The business-id namespace whose values are written to Ory's `external_id`.
    pub external_id_namespace: Option<Namespace>,
}

impl OutboxSettings {
    /// Sizes the row budget (and, if needed, the lease) for Ory calls bounded by `ory_timeout`.
    pub fn for_ory_timeout(mut self, ory_timeout: Duration) -> Self {
        // Each call may wait up to the timeout for a rate-limit token, then take up to the timeout.
        self.row_budget = ory_timeout.saturating_mul(2 * CALLS_PER_ROW) + STORE_ALLOWANCE;
        self.lease = self.lease.max(self.row_budget.saturating_mul(2));
        self
    }
}

impl Default for OutboxSettings {
    fn default() -> Self {
        Self {
            batch_size: 32,
            lease: Duration::from_secs(60),
            row_budget: Duration::from_secs(25),
            retry_min: Duration::from_secs(1),
            retry_max: Duration::from_secs(300),
            poll_interval: Duration::from_secs(1),
            external_id_namespace: None,
        }
    }
}

/// How long pending users wait, and how often the sweep looks.
#[derive(Debug, Clone)]
pub struct PendingSettings {
    /// Age at which an unclaimed pending user is removed.
    pub ttl: Duration,
    /// Time between sweeps.
    pub sweep_interval: Duration,
}

impl PendingSettings {
    /// Sweeps a few times per TTL, but at least once a minute and at most once a second: the delete
    /// is an index range scan, cheap even when there is nothing to do.
    pub fn with_ttl(ttl: Duration) -> Self {
        Self {
            ttl,
            sweep_interval: (ttl / 4).clamp(Duration::from_secs(1), Duration::from_secs(60)),
        }
    }
}

/// What gateways are told (see `gateway/`).
#[derive(Debug, Clone)]
pub struct GatewaySettings {
    /// Where browsers without a session are sent (303); `None`: they get 401.
    pub login_url: Option<Url>,
    /// Requests without any session pass, without identity headers.
    pub allow_anonymous: bool,
    /// The identity headers' prefix (`x-`).
    pub header_prefix: String,
}

impl Default for GatewaySettings {
    fn default() -> Self {
        Self {
            login_url: None,
            allow_anonymous: false,
            header_prefix: "x-".into(),
        }
    }
}

/// Behaviour switches for the use cases.
#[derive(Debug, Clone)]
pub struct ServiceSettings {
    /// Link a user just in time when ResolveSession sees an identity without one.
    pub auto_link: bool,
    /// An extra session cookie name to accept (Kratos's `session.cookie.name`).
    pub session_cookie_name: Option<String>,
    /// The business-id namespace kept in step with Ory's `external_id`, if any.
    pub ory_external_id_namespace: Option<Namespace>,
}

/// Pool sizing and timeouts.
#[derive(Debug, Clone)]
pub struct PoolOptions {
    /// Most connections open at once.
    pub max_size: usize,
    /// How long a request waits for a free connection before the store reports itself unavailable.
    pub wait_timeout: Duration,
    /// Server-side bound on any one statement.
    pub statement_timeout: Duration,
    /// Connections (out of `max_size`) that single-user lookups share, pipelined (see `store::Readers`).
    pub read_connections: usize,
}

impl Default for PoolOptions {
    fn default() -> Self {
        Self {
            max_size: 16,
            wait_timeout: Duration::from_secs(3),
            statement_timeout: Duration::from_secs(5),
            read_connections: 2,
        }
    }
}

/// Ory calls one delivery makes: read the identity, then patch it.
const CALLS_PER_ROW: u32 = 2;

/// Time allowed per row for the store updates around its Ory calls.
const STORE_ALLOWANCE: Duration = Duration::from_secs(5);

/// A header a mesh sidecar sets with the caller's verified identity.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TrustedHeader {
    /// Envoy's and Istio's `x-forwarded-client-cert`; its `URI=` (and `DNS=`) element names the
    /// caller.
    XForwardedClientCert,
    /// Linkerd's `l5d-client-id`: the caller's mesh identity, a DNS-like name.
    L5dClientId,
}

impl TrustedHeader {
    pub fn name(self) -> &'static str {
        match self {
            Self::XForwardedClientCert => "x-forwarded-client-cert",
            Self::L5dClientId => "l5d-client-id",
        }
    }
}

/// Who may call: the callers file, or any caller; and the mesh header to trust, if any.
#[derive(Debug, Clone, Default)]
pub struct CallerSettings {
    pub callers_file: Option<PathBuf>,
    pub allow_any_caller: bool,
    pub trusted_header: Option<TrustedHeader>,
}

/// Limits of the gRPC transport (README "Settings" says why each default).
#[derive(Debug, Clone)]
pub struct GrpcSettings {
    /// Most concurrent calls on one connection.
    pub max_concurrent_streams: u32,
    /// Most calls in progress on the whole server; more are refused with RESOURCE_EXHAUSTED.
    pub max_in_flight: usize,
    /// HTTP/2 keepalive ping interval.
    pub keepalive: Duration,
    /// Connections are closed (gracefully) at this age, if set.
    pub max_connection_age: Option<Duration>,
}

/// Limits of the HTTP listener (README "Settings" says why each default).
#[derive(Debug, Clone)]
pub struct HttpSettings {
    /// Time to receive a request's headers.
    pub header_timeout: Duration,
    /// Time to answer a request.
    pub request_timeout: Duration,
    /// Connections open at once.
    pub max_connections: usize,
}

/// TLS on the gRPC and HTTP listeners.
#[derive(Debug, Clone)]
pub struct TlsSettings {
    /// `None`: the listeners speak plaintext (a mesh sidecar encrypts, or nothing does).
    pub files: Option<ListenerTlsFiles>,
    /// How often the files are compared with what is in use.
    pub reload_interval: Duration,
}

/// The PEM files of the listeners' TLS.
#[derive(Debug, Clone)]
pub struct ListenerTlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// Set: gRPC clients must present a certificate signed by one of these CAs.
    pub client_ca: Option<PathBuf>,
}
