//! Settings: command-line flags with environment fallbacks, each named once here. Everything is
//! parsed and checked before any port is bound; a bad value stops start-up with a message that names
//! the setting.

use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::time::Duration;

use axum::http::HeaderName;
use clap::Args;
use secrecy::SecretString;
use url::Url;

use crate::domain::Namespace;

mod settings;

pub use settings::{
    CacheSettings, CallerSettings, DEFAULT_HEADER, GatewaySettings, GrpcSettings, HookSettings,
    HttpSettings, ListenerTlsFiles, OryConfig, OutboxSettings, PendingSettings, PoolOptions,
    ServiceSettings, TlsSettings, TrustedHeader,
};

pub const ENV_DATABASE_URL: &str = "DATABASE_URL";
pub const ENV_DATABASE_READ_URL: &str = "DATABASE_READ_URL";
pub const ENV_TLS_CERT: &str = "IDMAP_TLS_CERT";
pub const ENV_TLS_KEY: &str = "IDMAP_TLS_KEY";
pub const ENV_TLS_CLIENT_CA: &str = "IDMAP_TLS_CLIENT_CA";
pub const ENV_ORY_PUBLIC_URL: &str = "ORY_PUBLIC_URL";
pub const ENV_ORY_EXTERNAL_ID_NAMESPACE: &str = "IDMAP_ORY_EXTERNAL_ID_NAMESPACE";
pub const ENV_ASSERTION_KEY: &str = "IDMAP_ASSERTION_KEY";
pub const ENV_ORY_ADMIN_URL: &str = "ORY_ADMIN_URL";
pub const ENV_ORY_API_KEY: &str = "ORY_API_KEY";
pub const ENV_WEBHOOK_SECRET: &str = "IDMAP_WEBHOOK_SECRET";
pub const ENV_WEBHOOK_HEADER: &str = "IDMAP_WEBHOOK_HEADER";
pub const ENV_PENDING_USER_TTL: &str = "IDMAP_PENDING_USER_TTL";

pub const ENV_OUTBOX_RETRY_MIN: &str = "IDMAP_OUTBOX_RETRY_MIN";
pub const ENV_OUTBOX_LEASE: &str = "IDMAP_OUTBOX_LEASE";
pub const ENV_DB_READ_CONNECTIONS: &str = "IDMAP_DB_READ_CONNECTIONS";
pub const ENV_GRPC_ADDR: &str = "IDMAP_GRPC_ADDR";
pub const ENV_HTTP_ADDR: &str = "IDMAP_HTTP_ADDR";
pub const ENV_LOG_FORMAT: &str = "IDMAP_LOG_FORMAT";
pub const ENV_ALLOW_INSECURE_ORY: &str = "IDMAP_ALLOW_INSECURE_ORY";
pub const ENV_CALLERS: &str = "IDMAP_CALLERS";
pub const ENV_ALLOW_ANY_CALLER: &str = "IDMAP_ALLOW_ANY_CALLER";
pub const ENV_TRUSTED_CALLER_HEADER: &str = "IDMAP_TRUSTED_CALLER_HEADER";
pub const ENV_DEV_ORY_ADDR: &str = "IDMAP_DEV_ORY_ADDR";

/// A setting that is wrong, named as the operator spells it. `idmap` exits with 64 (EX_USAGE).
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// Settings that each parse but contradict one another.
    #[error("{setting} {requirement}")]
    Conflict {
        setting: &'static str,
        requirement: &'static str,
    },
    /// The callers file (`IDMAP_CALLERS`) cannot be read or is malformed.
    #[error("IDMAP_CALLERS {path}{}: {problem}", line.map(|l| format!(", line {l}")).unwrap_or_default())]
    CallersFile {
        path: String,
        line: Option<usize>,
        problem: String,
    },
    /// A setting names something unusable: a TLS file that does not parse, a root certificate
    /// that cannot be read.
    #[error("{setting}: {problem}")]
    Unusable {
        setting: &'static str,
        problem: String,
    },
}

impl ConfigError {
    /// The environment variable (and, lower-cased, the flag) to fix.
    pub fn setting(&self) -> &'static str {
        match self {
            Self::Conflict { setting, .. } => setting,
            Self::CallersFile { .. } => ENV_CALLERS,
            Self::Unusable { setting, .. } => setting,
        }
    }
}

/// Why a flag's or variable's value was refused; clap prints it after the setting's name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct InvalidValue(String);

impl From<&str> for InvalidValue {
    fn from(problem: &str) -> Self {
        Self(problem.to_owned())
    }
}

impl From<String> for InvalidValue {
    fn from(problem: String) -> Self {
        Self(problem)
    }
}

/// The shortest webhook secret accepted: anything shorter could be guessed.
pub const MIN_WEBHOOK_SECRET_BYTES: usize = 16;

pub const DEFAULT_GRPC_ADDR: &str = "0.0.0.0:50051";
pub const DEFAULT_HTTP_ADDR: &str = "0.0.0.0:8080";

/// Parses a duration such as `500ms`, `5s` or `2m`.
pub fn parse_duration(value: &str) -> Result<Duration, InvalidValue> {
    humantime::parse_duration(value.trim())
        .map_err(|e| InvalidValue(format!("{e}; expected a duration such as 500ms, 5s or 2m")))
}

fn parse_positive_duration(value: &str) -> Result<Duration, InvalidValue> {
    let d = parse_duration(value)?;
    if d.is_zero() {
        return Err("must be greater than zero".into());
    }
    Ok(d)
}

/// An Ory base URL: http or https, with a host, without query or fragment.
pub fn parse_http_url(value: &str) -> Result<Url, InvalidValue> {
    let url = Url::parse(value.trim()).map_err(|e| InvalidValue(format!("not a URL: {e}")))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(format!("must be an http or https URL, not {}", url.scheme()).into());
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err("must name a host".into());
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err("must not have a query or fragment".into());
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err("must not carry credentials; use ORY_API_KEY".into());
    }
    Ok(url)
}

/// Whether a secret sent to `url` stays off the network in clear: https, or plain http to this
/// machine (a sidecar, a port-forward).
fn carries_secrets_safely(url: &Url) -> bool {
    if url.scheme() == "https" {
        return true;
    }
    match url.host() {
        Some(url::Host::Domain(name)) => name.eq_ignore_ascii_case("localhost"),
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
        None => false,
    }
}

fn parse_trusted_header(value: &str) -> Result<TrustedHeader, InvalidValue> {
    match value.trim().to_ascii_lowercase().as_str() {
        "x-forwarded-client-cert" => Ok(TrustedHeader::XForwardedClientCert),
        "l5d-client-id" => Ok(TrustedHeader::L5dClientId),
        _ => {
            Err("must be x-forwarded-client-cert (Envoy, Istio) or l5d-client-id (Linkerd)".into())
        }
    }
}

/// A PostgreSQL URL. Only the shape is checked here; `serve` connects before it binds any port.
pub fn parse_database_url(value: &str) -> Result<SecretString, InvalidValue> {
    let url = Url::parse(value.trim()).map_err(|_| {
        InvalidValue::from("not a URL; expected postgres://user[:password]@host[:port]/database")
    })?;
    if !matches!(url.scheme(), "postgres" | "postgresql") {
        return Err("must start with postgres:// or postgresql://".into());
    }
    // libpq's modes (store/connect.rs gives them their meaning); anything else is a typo that
    // would otherwise weaken or break the connection later.
    const SSL_MODES: [&str; 5] = ["disable", "prefer", "require", "verify-ca", "verify-full"];
    for (key, value) in url.query_pairs() {
        if key == "sslmode" && !SSL_MODES.contains(&value.as_ref()) {
            return Err(format!("sslmode={value} is not one of {}", SSL_MODES.join(", ")).into());
        }
    }
    Ok(SecretString::from(value.trim().to_owned()))
}

fn parse_secret(value: &str) -> Result<SecretString, InvalidValue> {
    if value.trim().is_empty() {
        return Err("must not be empty when set".into());
    }
    Ok(SecretString::from(value.trim().to_owned()))
}

/// A webhook secret: Ory sends it as a header value (or a basic-auth password), so it must be one.
fn parse_webhook_secret(value: &str) -> Result<SecretString, InvalidValue> {
    let value = value.trim();
    if value.len() < MIN_WEBHOOK_SECRET_BYTES {
        return Err(format!(
            "must be at least {MIN_WEBHOOK_SECRET_BYTES} characters (e.g. `openssl rand -hex 32`)"
        )
        .into());
    }
    if !value.bytes().all(|b| (0x20..0x7f).contains(&b)) {
        return Err("must be printable ASCII, since it travels in an HTTP header".into());
    }
    Ok(SecretString::from(value.to_owned()))
}

fn parse_header_name(value: &str) -> Result<HeaderName, InvalidValue> {
    HeaderName::from_bytes(value.trim().as_bytes()).map_err(|_| {
        InvalidValue::from("must be an HTTP header name, such as Authorization or X-Idmap-Secret")
    })
}

/// The PEM text of IDMAP_ASSERTION_KEY: the value itself when it holds PEM, else the files it
/// names (comma-separated), concatenated in order. The keys themselves are checked at start-up.
fn parse_assertion_keys(value: &str) -> Result<SecretString, InvalidValue> {
    let value = value.trim();
    if value.is_empty() {
        return Err("must not be empty when set".into());
    }
    if value.contains("-----BEGIN") {
        return Ok(SecretString::from(value.to_owned()));
    }
    let mut bundle = String::new();
    for path in value.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let text = std::fs::read_to_string(path)
            .map_err(|e| InvalidValue::from(format!("cannot read the key file {path}: {e}")))?;
        bundle.push_str(&text);
        bundle.push('\n');
    }
    Ok(SecretString::from(bundle))
}

fn parse_header_prefix(value: &str) -> Result<String, InvalidValue> {
    if value.len() <= 32
        && value
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    {
        Ok(value.to_owned())
    } else {
        Err("must be at most 32 lower-case letters, digits and '-' (e.g. x- or x-auth-)".into())
    }
}

fn parse_namespace(value: &str) -> Result<Namespace, InvalidValue> {
    match Namespace::parse(ENV_ORY_EXTERNAL_ID_NAMESPACE, value) {
        // The default namespace is what an unset variable means: no namespace is mirrored.
        Ok(namespace) if namespace.is_default() => {
            Err("must name a namespace ([a-z0-9._-], starting with a letter or digit); leave it unset to mirror none".into())
        }
        Ok(namespace) => Ok(namespace),
        Err(violation) => Err(violation.description.into()),
    }
}

fn parse_cookie_name(value: &str) -> Result<String, InvalidValue> {
    let ok = !value.is_empty()
        && value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b));
    if ok {
        Ok(value.to_owned())
    } else {
        Err("must be a cookie name (letters, digits and !#$%&'*+-.^_`|~)".into())
    }
}

/// A count of at least one (cache entries, connections, calls).
fn parse_at_least_one<T: std::str::FromStr + PartialOrd + From<u8>>(
    value: &str,
) -> Result<T, InvalidValue> {
    match value.trim().parse::<T>() {
        Ok(n) if n >= T::from(1) => Ok(n),
        _ => Err("must be a whole number of at least 1".into()),
    }
}

fn parse_pool_size(value: &str) -> Result<usize, InvalidValue> {
    match value.trim().parse::<usize>() {
        Ok(n) if (1..=1000).contains(&n) => Ok(n),
        _ => Err("must be a whole number from 1 to 1000".into()),
    }
}

/// `DATABASE_URL`, shared by every command that needs the database.
#[derive(Debug, Clone, Args)]
pub struct DatabaseArgs {
    /// PostgreSQL connection URL.
    #[arg(long, env = ENV_DATABASE_URL, value_name = ENV_DATABASE_URL, hide_env_values = true, value_parser = parse_database_url)]
    pub database_url: SecretString,
}

/// Settings of `idmap serve`.
#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    #[command(flatten)]
    pub database: DatabaseArgs,

    /// Base URL of Ory's public API, where `/sessions/whoami` lives
    /// (self-hosted Kratos: http://kratos:4433; Ory Network: https://<slug>.projects.oryapis.com).
    #[arg(long, env = ENV_ORY_PUBLIC_URL, value_name = ENV_ORY_PUBLIC_URL, value_parser = parse_http_url)]
    pub ory_public_url: Url,

    /// Base URL of Ory's admin API (`/admin/identities`). Defaults to ORY_PUBLIC_URL, as on Ory Network;
    /// self-hosted Kratos serves it on its admin port (http://kratos:4434).
    #[arg(long, env = ENV_ORY_ADMIN_URL, value_name = ENV_ORY_ADMIN_URL, value_parser = parse_http_url)]
    pub ory_admin_url: Option<Url>,

    #[command(flatten)]
    pub common: CommonArgs,
}

/// Settings `serve` and `dev` share.
#[derive(Debug, Clone, Args)]
pub struct CommonArgs {
    /// Bearer token for Ory's admin API (an Ory Network project API key). Unset for self-hosted Kratos,
    /// whose admin port has no authentication.
    #[arg(long, env = ENV_ORY_API_KEY, value_name = ENV_ORY_API_KEY, hide_env_values = true, value_parser = parse_secret)]
    pub ory_api_key: Option<SecretString>,

    /// Name of Ory's session cookie when Kratos is configured with a custom `session.cookie.name`.
    /// `ory_kratos_session` and `ory_session_*` are always recognised.
    #[arg(long, env = "ORY_SESSION_COOKIE", value_name = "ORY_SESSION_COOKIE", value_parser = parse_cookie_name)]
    pub ory_session_cookie: Option<String>,

    /// Upper bound on one call to Ory.
    #[arg(long, env = "IDMAP_ORY_TIMEOUT", value_name = "IDMAP_ORY_TIMEOUT", default_value = "5s", value_parser = parse_positive_duration)]
    pub ory_timeout: Duration,

    /// The business-id namespace kept in step with Ory's own `external_id`: values set there are
    /// written to the identity's `external_id`, Ory's value is adopted at link time, and
    /// GetByExternalId asks Ory for values idmap does not hold. Unset: no namespace is.
    #[arg(long, env = ENV_ORY_EXTERNAL_ID_NAMESPACE, value_name = ENV_ORY_EXTERNAL_ID_NAMESPACE, value_parser = parse_namespace)]
    pub ory_external_id_namespace: Option<Namespace>,

    /// How long Ory's 404 for an external id (GetByExternalId in the namespace mirrored to Ory) is
    /// remembered, so lookups of unknown ids cannot flood Ory's admin API.
    #[arg(long, env = "IDMAP_EXTERNAL_ID_MISS_TTL", value_name = "IDMAP_EXTERNAL_ID_MISS_TTL", default_value = "30s", value_parser = parse_duration)]
    pub external_id_miss_ttl: Duration,

    /// Link a user just in time when ResolveSession meets an identity without one.
    #[arg(long, env = "IDMAP_AUTO_LINK", value_name = "IDMAP_AUTO_LINK", default_value = "true", action = clap::ArgAction::Set, value_parser = clap::builder::BoolishValueParser::new())]
    pub auto_link: bool,

    /// Address of the gRPC server.
    #[arg(long, env = ENV_GRPC_ADDR, value_name = ENV_GRPC_ADDR, default_value = DEFAULT_GRPC_ADDR)]
    pub grpc_addr: SocketAddr,

    /// Address of the HTTP server (`/healthz`, `/readyz`).
    #[arg(long, env = ENV_HTTP_ADDR, value_name = ENV_HTTP_ADDR, default_value = DEFAULT_HTTP_ADDR)]
    pub http_addr: SocketAddr,

    /// Most PostgreSQL connections open at once.
    #[arg(long, env = "IDMAP_DB_POOL_SIZE", value_name = "IDMAP_DB_POOL_SIZE", default_value = "16", value_parser = parse_pool_size)]
    pub db_pool_size: usize,

    /// Connections, out of IDMAP_DB_POOL_SIZE, that GetUserByOryId, GetByExternalId and the
    /// user lookups of ResolveSession share (their queries are pipelined on them).
    #[arg(long, env = ENV_DB_READ_CONNECTIONS, value_name = ENV_DB_READ_CONNECTIONS, default_value = "2", value_parser = parse_pool_size)]
    pub db_read_connections: usize,

    /// How long a request waits for a PostgreSQL connection before failing with UNAVAILABLE.
    #[arg(long, env = "IDMAP_DB_TIMEOUT", value_name = "IDMAP_DB_TIMEOUT", default_value = "3s", value_parser = parse_positive_duration)]
    pub db_timeout: Duration,

    /// First retry delay of a failed Ory write; it doubles per attempt up to IDMAP_OUTBOX_RETRY_MAX.
    #[arg(long, env = ENV_OUTBOX_RETRY_MIN, value_name = ENV_OUTBOX_RETRY_MIN, default_value = "1s", value_parser = parse_positive_duration)]
    pub outbox_retry_min: Duration,

    /// Longest retry delay of a failed Ory write.
    #[arg(long, env = "IDMAP_OUTBOX_RETRY_MAX", value_name = "IDMAP_OUTBOX_RETRY_MAX", default_value = "5m", value_parser = parse_positive_duration)]
    pub outbox_retry_max: Duration,

    /// How long a claimed Ory write stays invisible to the other replicas' workers: a replica that
    /// dies while delivering delays its rows by this much, never loses them. At least twice the
    /// longest one delivery may take (2 x (4 x IDMAP_ORY_TIMEOUT + 5s)), so a live worker's row is
    /// never taken from it. Unset: 60s, or that minimum if it is longer.
    #[arg(long, env = ENV_OUTBOX_LEASE, value_name = ENV_OUTBOX_LEASE, value_parser = parse_positive_duration)]
    pub outbox_lease: Option<Duration>,

    /// Longest a validated session is answered from memory (also capped by the session's expiry and
    /// Ory's `Ory-Session-Cache-For`). `0s` turns the session cache off.
    #[arg(long, env = "IDMAP_SESSION_CACHE_TTL", value_name = "IDMAP_SESSION_CACHE_TTL", default_value = "60s", value_parser = parse_duration)]
    pub session_cache_ttl: Duration,

    /// Share validated sessions between replicas through PostgreSQL, so the fleet asks Ory once
    /// per session per TTL (a memory miss reads it before asking Ory). `off`: each replica asks.
    #[arg(long, env = "IDMAP_SESSION_CACHE_SHARED", value_name = "IDMAP_SESSION_CACHE_SHARED", default_value = "on", action = clap::ArgAction::Set, value_parser = clap::builder::BoolishValueParser::new())]
    pub session_cache_shared: bool,

    /// Most sessions kept in memory (BENCHMARKS.md measures the memory each takes).
    #[arg(long, env = "IDMAP_SESSION_CACHE_MAX_ENTRIES", value_name = "IDMAP_SESSION_CACHE_MAX_ENTRIES", default_value = "100000", value_parser = parse_at_least_one::<u64>)]
    pub session_cache_max_entries: u64,

    /// How long Ory's refusal of a credential (401) is remembered, so floods of bad tokens stay off Ory.
    #[arg(long, env = "IDMAP_NEGATIVE_CACHE_TTL", value_name = "IDMAP_NEGATIVE_CACHE_TTL", default_value = "5s", value_parser = parse_duration)]
    pub negative_cache_ttl: Duration,

    /// When set, a cached session may be served this long past its TTL while Ory answers 429/5xx or
    /// times out (never past the session's expiry). Off by default.
    #[arg(long, env = "IDMAP_STALE_IF_ERROR", value_name = "IDMAP_STALE_IF_ERROR", value_parser = parse_positive_duration)]
    pub stale_if_error: Option<Duration>,

    /// Longest a user record is answered from memory; every write evicts it on all replicas sooner.
    #[arg(long, env = "IDMAP_USER_CACHE_TTL", value_name = "IDMAP_USER_CACHE_TTL", default_value = "5m", value_parser = parse_duration)]
    pub user_cache_ttl: Duration,

    /// Most users kept in memory.
    #[arg(long, env = "IDMAP_USER_CACHE_MAX_ENTRIES", value_name = "IDMAP_USER_CACHE_MAX_ENTRIES", default_value = "100000", value_parser = parse_at_least_one::<u64>)]
    pub user_cache_max_entries: u64,

    /// Most whoami calls per second idmap makes to Ory (0: no limit). Set it below your Ory plan's
    /// limit; calls over it wait up to IDMAP_ORY_TIMEOUT, then fail with UNAVAILABLE.
    #[arg(
        long,
        env = "IDMAP_ORY_WHOAMI_RPS",
        value_name = "IDMAP_ORY_WHOAMI_RPS",
        default_value = "100"
    )]
    pub ory_whoami_rps: u32,

    /// Most admin API calls per second idmap makes to Ory (0: no limit).
    #[arg(
        long,
        env = "IDMAP_ORY_ADMIN_RPS",
        value_name = "IDMAP_ORY_ADMIN_RPS",
        default_value = "50"
    )]
    pub ory_admin_rps: u32,

    /// On SIGTERM/SIGINT, how long in-flight calls may take to finish before the process exits anyway.
    #[arg(long, env = "IDMAP_SHUTDOWN_GRACE", value_name = "IDMAP_SHUTDOWN_GRACE", default_value = "30s", value_parser = parse_duration)]
    pub shutdown_grace: Duration,

    /// On SIGTERM/SIGINT, how long to keep serving with health NOT_SERVING before closing
    /// connections (HTTP/2 GOAWAY): the time load balancers and sidecars need to stop sending
    /// new calls, which a client would otherwise see fail. `0s` when something else waits (a
    /// Kubernetes preStop hook, as in deploy/kubernetes/). Counts against IDMAP_SHUTDOWN_GRACE.
    #[arg(long, env = "IDMAP_SHUTDOWN_DELAY", value_name = "IDMAP_SHUTDOWN_DELAY", default_value = "0s", value_parser = parse_duration)]
    pub shutdown_delay: Duration,

    /// Shared secret Ory's webhooks must present (Ory Actions `auth`: `api_key` or `basic_auth`).
    /// Unset: the /hooks/ory/* endpoints refuse every request.
    #[arg(long, env = ENV_WEBHOOK_SECRET, value_name = ENV_WEBHOOK_SECRET, hide_env_values = true, value_parser = parse_webhook_secret)]
    pub webhook_secret: Option<SecretString>,

    /// Header whose whole value must be IDMAP_WEBHOOK_SECRET (Ory `api_key` auth `name`). Basic
    /// auth with the secret as password is accepted as well.
    #[arg(long, env = ENV_WEBHOOK_HEADER, value_name = ENV_WEBHOOK_HEADER, default_value = DEFAULT_HEADER, value_parser = parse_header_name)]
    pub webhook_header: HeaderName,

    /// Signing keys of identity assertions (`x-idmap-assertion`, JWKS at `/.well-known/jwks.json`):
    /// PEM Ed25519 or P-256 private keys, either the PEM text itself or paths to PEM files separated
    /// by commas. Several keys for rotation: the first signs, all are published. Never logged.
    #[arg(long, env = ENV_ASSERTION_KEY, value_name = ENV_ASSERTION_KEY, hide_env_values = true, value_parser = parse_assertion_keys)]
    pub assertion_key: Option<SecretString>,

    /// Where a gateway sends a browser without a session (a 303 instead of a 401), e.g. the
    /// login page of Ory's account experience. Unset: browsers get the 401 too.
    #[arg(
        long,
        env = "IDMAP_GATEWAY_LOGIN_URL",
        value_name = "IDMAP_GATEWAY_LOGIN_URL"
    )]
    pub gateway_login_url: Option<Url>,

    /// Let requests that carry no session at all through the gateway, without identity headers
    /// (public pages behind the same gateway). A session that is not valid is still refused.
    #[arg(long, env = "IDMAP_GATEWAY_ALLOW_ANONYMOUS", value_name = "IDMAP_GATEWAY_ALLOW_ANONYMOUS", default_value = "false", action = clap::ArgAction::Set, value_parser = clap::builder::BoolishValueParser::new())]
    pub gateway_allow_anonymous: bool,

    /// The prefix of the identity headers a gateway sets on upstream requests (`x-user-id`,
    /// `x-ory-session-id`, ...): lower-case letters, digits and `-`.
    #[arg(long, env = "IDMAP_GATEWAY_HEADER_PREFIX", value_name = "IDMAP_GATEWAY_HEADER_PREFIX", default_value = "x-", value_parser = parse_header_prefix)]
    pub gateway_header_prefix: String,

    /// How long a user id minted by the pre-persist registration hook waits for its identity to be
    /// linked before the sweep removes it.
    #[arg(long, env = ENV_PENDING_USER_TTL, value_name = ENV_PENDING_USER_TTL, default_value = "1h", value_parser = parse_positive_duration)]
    pub pending_user_ttl: Duration,

    /// Allow ORY_API_KEY to travel over plain http:// to a host other than this machine (a
    /// sidecar or a private network that encrypts for you). Off: such a setting stops start-up.
    #[arg(long, env = ENV_ALLOW_INSECURE_ORY, value_name = ENV_ALLOW_INSECURE_ORY, default_value = "false", action = clap::ArgAction::Set, value_parser = clap::builder::BoolishValueParser::new())]
    pub allow_insecure_ory: bool,

    /// A TOML file naming the callers and the RPCs each may call (README "Security"). Without it,
    /// `serve` starts only with IDMAP_ALLOW_ANY_CALLER=true.
    #[arg(long, env = ENV_CALLERS, value_name = ENV_CALLERS)]
    pub callers: Option<std::path::PathBuf>,

    /// Let any caller that reaches the gRPC port call every RPC, unidentified.
    #[arg(long, env = ENV_ALLOW_ANY_CALLER, value_name = ENV_ALLOW_ANY_CALLER, default_value = "false", action = clap::ArgAction::Set, value_parser = clap::builder::BoolishValueParser::new())]
    pub allow_any_caller: bool,

    /// A header a mesh sidecar sets with the verified caller identity, to trust as the caller:
    /// `x-forwarded-client-cert` (Envoy, Istio) or `l5d-client-id` (Linkerd). Only behind a sidecar
    /// that strips it from what clients send.
    #[arg(long, env = ENV_TRUSTED_CALLER_HEADER, value_name = ENV_TRUSTED_CALLER_HEADER, value_parser = parse_trusted_header)]
    pub trusted_caller_header: Option<TrustedHeader>,

    /// Most calls one gRPC connection may have open at once (HTTP/2 SETTINGS_MAX_CONCURRENT_STREAMS).
    #[arg(long, env = "IDMAP_GRPC_MAX_CONCURRENT_STREAMS", value_name = "IDMAP_GRPC_MAX_CONCURRENT_STREAMS", default_value = "256", value_parser = parse_at_least_one::<u32>)]
    pub grpc_max_concurrent_streams: u32,

    /// Most gRPC calls in progress across all connections; past it, calls are refused at once with
    /// RESOURCE_EXHAUSTED rather than queued (health checks are exempt).
    #[arg(long, env = "IDMAP_GRPC_MAX_IN_FLIGHT", value_name = "IDMAP_GRPC_MAX_IN_FLIGHT", default_value = "4096", value_parser = parse_at_least_one::<u32>)]
    pub grpc_max_in_flight: u32,

    /// How often an idle gRPC connection is pinged (HTTP/2 keepalive), so dead peers and silently
    /// dropped connections are found; a ping unanswered for 20 s closes the connection.
    #[arg(long, env = "IDMAP_GRPC_KEEPALIVE", value_name = "IDMAP_GRPC_KEEPALIVE", default_value = "60s", value_parser = parse_positive_duration)]
    pub grpc_keepalive: Duration,

    /// Close gRPC connections older than this (after letting their calls finish), so a mesh or
    /// balancer spreads long-lived clients over new replicas. Unset: connections live on.
    #[arg(long, env = "IDMAP_GRPC_MAX_CONNECTION_AGE", value_name = "IDMAP_GRPC_MAX_CONNECTION_AGE", value_parser = parse_positive_duration)]
    pub grpc_max_connection_age: Option<Duration>,

    /// How long an HTTP client may take to send its request headers before the connection is
    /// closed, so slow clients cannot hold connections open.
    #[arg(long, env = "IDMAP_HTTP_HEADER_TIMEOUT", value_name = "IDMAP_HTTP_HEADER_TIMEOUT", default_value = "10s", value_parser = parse_positive_duration)]
    pub http_header_timeout: Duration,

    /// Longest an HTTP request (a webhook) may take; past it the answer is 503, which Kratos
    /// retries.
    #[arg(long, env = "IDMAP_HTTP_REQUEST_TIMEOUT", value_name = "IDMAP_HTTP_REQUEST_TIMEOUT", default_value = "20s", value_parser = parse_positive_duration)]
    pub http_request_timeout: Duration,

    /// Most HTTP connections open at once; one more is closed as soon as it is accepted.
    #[arg(long, env = "IDMAP_HTTP_MAX_CONNECTIONS", value_name = "IDMAP_HTTP_MAX_CONNECTIONS", default_value = "1024", value_parser = parse_at_least_one::<u32>)]
    pub http_max_connections: u32,

    /// A read replica's PostgreSQL URL: user lookups and BatchGetUsers read from it (falling back
    /// to DATABASE_URL for what it lacks); writes, the outbox, LISTEN and the shared session cache
    /// stay on DATABASE_URL.
    #[arg(long, env = ENV_DATABASE_READ_URL, value_name = ENV_DATABASE_READ_URL, hide_env_values = true, value_parser = parse_database_url)]
    pub database_read_url: Option<SecretString>,

    /// How often the connection that hears other replicas' evictions is asked to answer; one
    /// that stays silent for as long again is reconnected (and this replica's caches cleared).
    #[arg(long, env = "IDMAP_LISTEN_HEARTBEAT", value_name = "IDMAP_LISTEN_HEARTBEAT", default_value = "5s", value_parser = parse_positive_duration)]
    pub listen_heartbeat: Duration,

    /// PEM certificate chain (leaf first) the gRPC and HTTP listeners present; with
    /// IDMAP_TLS_KEY, both speak TLS only. Re-read when the file changes.
    #[arg(long, env = ENV_TLS_CERT, value_name = ENV_TLS_CERT)]
    pub tls_cert: Option<std::path::PathBuf>,

    /// PEM private key of IDMAP_TLS_CERT.
    #[arg(long, env = ENV_TLS_KEY, value_name = ENV_TLS_KEY)]
    pub tls_key: Option<std::path::PathBuf>,

    /// PEM CA certificates: gRPC clients must present a certificate signed by one (mTLS), and its
    /// URI SAN (SPIFFE id) or DNS SAN names the caller in IDMAP_CALLERS.
    #[arg(long, env = ENV_TLS_CLIENT_CA, value_name = ENV_TLS_CLIENT_CA)]
    pub tls_client_ca: Option<std::path::PathBuf>,

    /// How often the TLS files are compared with what is in use, so a rotated certificate is
    /// picked up by new connections.
    #[arg(long, env = "IDMAP_TLS_RELOAD_INTERVAL", value_name = "IDMAP_TLS_RELOAD_INTERVAL", default_value = "10s", value_parser = parse_positive_duration)]
    pub tls_reload_interval: Duration,
}

impl TlsSettings {
    /// TLS on the listeners: a certificate needs its key, and client CAs need a certificate.
    fn new(common: &CommonArgs) -> Result<Self, ConfigError> {
        let files = match (&common.tls_cert, &common.tls_key) {
            (Some(cert), Some(key)) => Some(ListenerTlsFiles {
                cert: cert.clone(),
                key: key.clone(),
                client_ca: common.tls_client_ca.clone(),
            }),
            (Some(_), None) => {
                return Err(ConfigError::Conflict {
                    setting: ENV_TLS_KEY,
                    requirement: "must be set with IDMAP_TLS_CERT (the certificate's private key)",
                });
            }
            (None, Some(_)) => {
                return Err(ConfigError::Conflict {
                    setting: ENV_TLS_CERT,
                    requirement: "must be set with IDMAP_TLS_KEY (the certificate the key belongs to)",
                });
            }
            (None, None) if common.tls_client_ca.is_some() => {
                return Err(ConfigError::Conflict {
                    setting: ENV_TLS_CLIENT_CA,
                    requirement: "needs IDMAP_TLS_CERT and IDMAP_TLS_KEY: client certificates are asked for only over TLS",
                });
            }
            (None, None) => None,
        };
        Ok(Self {
            files,
            reload_interval: common.tls_reload_interval,
        })
    }
}

/// The validated configuration the server runs with.
#[derive(Clone)]
pub struct Config {
    pub database_url: SecretString,
    /// A read replica for user lookups.
    pub database_read_url: Option<SecretString>,
    pub ory: OryConfig,
    pub grpc_addr: SocketAddr,
    pub http_addr: SocketAddr,
    pub service: ServiceSettings,
    pub pool: PoolOptions,
    pub outbox: OutboxSettings,
    pub cache: CacheSettings,
    pub shutdown_grace: Duration,
    pub shutdown_delay: Duration,
    pub hooks: HookSettings,
    /// What gateways (Envoy ext_authz, HTTP forward-auth) are told.
    pub gateway: GatewaySettings,
    /// The PEM text of the assertion signing keys (IDMAP_ASSERTION_KEY), if set.
    pub assertion_keys: Option<SecretString>,
    pub pending_users: PendingSettings,
    pub callers: CallerSettings,
    pub grpc: GrpcSettings,
    pub http: HttpSettings,
    pub tls: TlsSettings,
    /// Heartbeat interval of the invalidation listener's connection.
    pub listen_heartbeat: Duration,
}

impl Config {
    /// Combines the parsed settings; fails, naming the setting, on combinations flags cannot check.
    pub fn new(
        database_url: SecretString,
        ory_public_url: Url,
        ory_admin_url: Option<Url>,
        common: CommonArgs,
    ) -> Result<Self, ConfigError> {
        if common.outbox_retry_min > common.outbox_retry_max {
            return Err(ConfigError::Conflict {
                setting: ENV_OUTBOX_RETRY_MIN,
                requirement: "must not be greater than IDMAP_OUTBOX_RETRY_MAX",
            });
        }
        if common.db_read_connections >= common.db_pool_size {
            return Err(ConfigError::Conflict {
                setting: ENV_DB_READ_CONNECTIONS,
                requirement: "must be smaller than IDMAP_DB_POOL_SIZE (the rest serve writes and batches)",
            });
        }
        let outbox = OutboxSettings {
            retry_min: common.outbox_retry_min,
            retry_max: common.outbox_retry_max,
            lease: common
                .outbox_lease
                .unwrap_or(OutboxSettings::default().lease),
            external_id_namespace: common.ory_external_id_namespace.clone(),
            ..OutboxSettings::default()
        }
        .for_ory_timeout(common.ory_timeout);
        if common
            .outbox_lease
            .is_some_and(|lease| lease < outbox.lease)
        {
            return Err(ConfigError::Conflict {
                setting: ENV_OUTBOX_LEASE,
                requirement: "must be at least twice the longest one delivery may take: 2 x (4 x IDMAP_ORY_TIMEOUT + 5s)",
            });
        }
        let tls = TlsSettings::new(&common)?;
        let admin_url = ory_admin_url.unwrap_or_else(|| ory_public_url.clone());
        if common.ory_api_key.is_some() && !common.allow_insecure_ory {
            for (setting, url) in [
                (ENV_ORY_ADMIN_URL, &admin_url),
                (ENV_ORY_PUBLIC_URL, &ory_public_url),
            ] {
                if !carries_secrets_safely(url) {
                    return Err(ConfigError::Conflict {
                        setting,
                        requirement: "must be an https:// URL (or name this machine) when ORY_API_KEY is set, or the key crosses the network in clear; set IDMAP_ALLOW_INSECURE_ORY=true if something else encrypts the hop",
                    });
                }
            }
        }
        Ok(Self {
            database_url,
            database_read_url: common.database_read_url,
            ory: OryConfig {
                public_url: ory_public_url,
                admin_url,
                api_key: common.ory_api_key,
                timeout: common.ory_timeout,
                whoami_rps: NonZeroU32::new(common.ory_whoami_rps),
                admin_rps: NonZeroU32::new(common.ory_admin_rps),
            },
            grpc_addr: common.grpc_addr,
            http_addr: common.http_addr,
            service: ServiceSettings {
                auto_link: common.auto_link,
                session_cookie_name: common.ory_session_cookie,
                ory_external_id_namespace: common.ory_external_id_namespace.clone(),
            },
            pool: PoolOptions {
                max_size: common.db_pool_size,
                wait_timeout: common.db_timeout,
                read_connections: common.db_read_connections,
                ..PoolOptions::default()
            },
            outbox,
            cache: CacheSettings {
                session_ttl: common.session_cache_ttl,
                session_max_entries: common.session_cache_max_entries,
                negative_ttl: common.negative_cache_ttl,
                stale_if_error: common.stale_if_error,
                user_ttl: common.user_cache_ttl,
                user_max_entries: common.user_cache_max_entries,
                shared_sessions: common.session_cache_shared,
                external_id_miss_ttl: common.external_id_miss_ttl,
            },
            shutdown_grace: common.shutdown_grace,
            shutdown_delay: common.shutdown_delay,
            hooks: HookSettings {
                secret: common.webhook_secret,
                header: common.webhook_header,
            },
            assertion_keys: common.assertion_key,
            gateway: GatewaySettings {
                login_url: common.gateway_login_url,
                allow_anonymous: common.gateway_allow_anonymous,
                header_prefix: common.gateway_header_prefix,
            },
            pending_users: PendingSettings::with_ttl(common.pending_user_ttl),
            http: HttpSettings {
                header_timeout: common.http_header_timeout,
                request_timeout: common.http_request_timeout,
                max_connections: common.http_max_connections as usize,
            },
            grpc: GrpcSettings {
                max_concurrent_streams: common.grpc_max_concurrent_streams,
                max_in_flight: common.grpc_max_in_flight as usize,
                keepalive: common.grpc_keepalive,
                max_connection_age: common.grpc_max_connection_age,
            },
            callers: CallerSettings {
                callers_file: common.callers,
                allow_any_caller: common.allow_any_caller,
                trusted_header: common.trusted_caller_header,
            },
            tls,
            listen_heartbeat: common.listen_heartbeat,
        })
    }

    pub fn from_serve_args(args: ServeArgs) -> Result<Self, ConfigError> {
        Self::new(
            args.database.database_url,
            args.ory_public_url,
            args.ory_admin_url,
            args.common,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_checked() {
        assert!(parse_http_url("http://kratos:4433").is_ok());
        assert!(parse_http_url("https://x.projects.oryapis.com/").is_ok());
        assert!(parse_http_url("ftp://x").is_err());
        assert!(parse_http_url("kratos:4433").is_err());
        assert!(parse_http_url("http://u:p@kratos").is_err());
        assert!(parse_database_url("postgres://postgres@127.0.0.1/db").is_ok());
        assert!(parse_database_url("mysql://x").is_err());
        assert!(parse_database_url("nonsense").is_err());
    }

    #[test]
    fn durations_and_names_are_checked() {
        assert_eq!(
            parse_duration("1500ms").unwrap(),
            Duration::from_millis(1500)
        );
        assert!(parse_positive_duration("0s").is_err());
        assert!(parse_duration("soon").is_err());
        assert!(parse_cookie_name("ory_kratos_session").is_ok());
        assert!(parse_cookie_name("bad name").is_err());
        assert!(parse_pool_size("0").is_err());
    }

    #[test]
    fn shared_read_connections_must_leave_pool_connections() {
        #[derive(clap::Parser)]
        struct Flags {
            #[command(flatten)]
            common: CommonArgs,
        }
        let config = |flags: &[&str]| {
            let flags = <Flags as clap::Parser>::try_parse_from(
                std::iter::once("idmap").chain(flags.iter().copied()),
            )
            .unwrap();
            Config::new(
                SecretString::from("postgres://postgres@127.0.0.1/db"),
                Url::parse("http://kratos:4433").unwrap(),
                None,
                flags.common,
            )
        };
        let ok = config(&["--db-pool-size=3", "--db-read-connections=2"]).unwrap();
        assert_eq!(ok.pool.read_connections, 2);
        let Err(err) = config(&["--db-pool-size=2", "--db-read-connections=2"]) else {
            panic!("as many shared connections as the pool holds was accepted");
        };
        assert_eq!(err.setting(), "IDMAP_DB_READ_CONNECTIONS");
        assert!(
            err.to_string().contains("IDMAP_DB_READ_CONNECTIONS"),
            "{err}"
        );
    }

    #[test]
    fn webhook_settings_are_checked() {
        assert!(parse_header_name("X-Idmap-Secret").is_ok());
        assert!(parse_header_name("bad header").is_err());
        assert!(parse_webhook_secret("0123456789abcdef").is_ok());
        assert!(parse_webhook_secret("short").is_err());
        assert!(parse_webhook_secret("0123456789abcdef\u{7}").is_err());
    }

    #[test]
    fn the_api_key_never_travels_in_clear_unless_allowed() {
        #[derive(clap::Parser)]
        struct Flags {
            #[command(flatten)]
            common: CommonArgs,
        }
        let config = |public: &str, admin: Option<&str>, flags: &[&str]| {
            let flags = <Flags as clap::Parser>::try_parse_from(
                ["idmap", "--ory-api-key=ory_pat_x"]
                    .into_iter()
                    .chain(flags.iter().copied()),
            )
            .unwrap();
            Config::new(
                SecretString::from("postgres://postgres@127.0.0.1/db"),
                Url::parse(public).unwrap(),
                admin.map(|a| Url::parse(a).unwrap()),
                flags.common,
            )
        };
        assert!(config("https://x.projects.oryapis.com", None, &[]).is_ok());
        assert!(config("http://127.0.0.1:4433", Some("http://localhost:4434"), &[]).is_ok());
        assert!(config("http://[::1]:4433", None, &[]).is_ok());
        let Err(err) = config("https://x.example", Some("http://kratos:4434"), &[]) else {
            panic!("an API key over plain http to another host was accepted");
        };
        assert_eq!(err.setting(), ENV_ORY_ADMIN_URL);
        assert!(
            err.to_string().contains("IDMAP_ALLOW_INSECURE_ORY"),
            "{err}"
        );
        let Err(err) = config("http://kratos:4433", None, &[]) else {
            panic!("an API key over plain http to another host was accepted");
        };
        assert!(matches!(
            err.setting(),
            ENV_ORY_ADMIN_URL | ENV_ORY_PUBLIC_URL
        ));
        assert!(config("http://kratos:4433", None, &["--allow-insecure-ory=true"]).is_ok());
    }
}
