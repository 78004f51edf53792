//! The one module that talks HTTP to Ory (Kratos or Ory Network): base URLs, the admin API key,
//! timeouts, the Kratos JSON types, and the mapping from Ory's statuses and error bodies to
//! [`OryError`]. It follows Kratos's contract (`spec/ory/CONTRACT.md`).
//!
//! Tests exercise this client against the Kratos emulator over real HTTP rather than swapping it for
//! an in-process fake, so the request and response encoding is tested too.

mod dto;
mod error;
mod limit;

use std::sync::Arc;
use std::time::Duration;

use reqwest::{Method, RequestBuilder, Response, StatusCode, header};
use secrecy::{ExposeSecret, SecretString};
use serde_json::{Value, json};
use url::Url;

pub use error::OryError;
pub use limit::OryLimiter;

use crate::config::{ENV_ORY_ADMIN_URL, ENV_ORY_API_KEY, ENV_ORY_PUBLIC_URL, OryConfig};
use crate::domain::{
    Credential, CredentialKind, Identity, IdentityId, SessionWithIdentity, UserId,
};
use crate::metrics::{self, Limiter, OryEndpoint};
use crate::telemetry;
use dto::{ErrorBody, PatchOp, SessionDto};
pub use dto::{IdentityJson, InvalidIdentity, UnsavedIdentity};

/// The largest Ory response body read; identities with big traits stay far below it.
const MAX_BODY_BYTES: usize = 4 * 1024 * 1024;

/// Whoami's answer, with Ory's caching hint.
#[derive(Debug, Clone)]
pub struct Whoami {
    pub session: SessionWithIdentity,
    /// `Ory-Session-Cache-For`: how long Ory says the answer may be cached.
    pub cache_for: Option<Duration>,
}

/// What writing the internal user id to `metadata_public.id` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MetadataWrite {
    /// Ory now holds the id.
    Written,
    /// Ory already held that id; nothing was sent.
    AlreadySet,
    /// `metadata_public` holds something other than an object or null, so adding a key would destroy
    /// it; an operator must decide.
    NotAnObject,
}

/// What making the identity's `external_id` match idmap's value did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExternalIdWrite {
    /// Ory now holds the value (or, for `None`, none).
    Written,
    /// Ory held it already; nothing was sent.
    AlreadySet,
}

/// One page of `GET /admin/identities`.
#[derive(Debug, Clone)]
pub struct IdentityPage {
    pub identities: Vec<Identity>,
    /// Entries that could not be read as identities, described (id and why) for the operator.
    pub rejected: Vec<String>,
    /// The token of the next page; `None` on the last page.
    pub next_page_token: Option<String>,
}

/// An Ory client. Cheap to clone (reqwest's client is reference-counted).
#[derive(Clone)]
pub struct KratosClient {
    http: reqwest::Client,
    public_url: Url,
    admin_url: Url,
    api_key: Option<SecretString>,
    whoami_limit: Arc<OryLimiter>,
    admin_limit: Arc<OryLimiter>,
}

impl KratosClient {
    pub fn new(config: OryConfig) -> Result<Self, OryError> {
        crate::tls::install_crypto_provider();
        let http = reqwest::Client::builder()
            .timeout(config.timeout)
            .connect_timeout(config.timeout.min(Duration::from_secs(5)))
            .pool_idle_timeout(Duration::from_secs(60))
            // A redirect means a URL setting is wrong (Kratos's public port redirects admin calls to
            // its admin port); following it would hide that and could carry X-Session-Token, which
            // reqwest does not strip, to another host. `send` reports it instead.
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("idmap/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| OryError::Protocol(format!("cannot build the HTTP client: {e}")))?;
        Ok(Self {
            http,
            public_url: with_trailing_slash(config.public_url),
            admin_url: with_trailing_slash(config.admin_url),
            api_key: config.api_key,
            // A call waits for its turn no longer than it may take itself.
            whoami_limit: Arc::new(OryLimiter::new(
                Limiter::Whoami,
                config.whoami_rps,
                config.timeout,
            )),
            admin_limit: Arc::new(OryLimiter::new(
                Limiter::Admin,
                config.admin_rps,
                config.timeout,
            )),
        })
    }

    /// Validates a session with `GET /sessions/whoami`.
    #[tracing::instrument(name = "ory.whoami", skip_all, fields(kind = ?credential.kind()))]
    pub async fn whoami(&self, credential: &Credential) -> Result<Whoami, OryError> {
        let url = join(&self.public_url, "sessions/whoami")?;
        let mut request = self
            .http
            .get(url)
            .header(header::ACCEPT, "application/json");
        request = match credential.kind() {
            CredentialKind::SessionToken => request.header("X-Session-Token", credential.expose()),
            CredentialKind::Cookie => request.header(header::COOKIE, credential.expose()),
        };
        let response = send(
            &self.whoami_limit,
            OryEndpoint::Whoami,
            ENV_ORY_PUBLIC_URL,
            request,
        )
        .await?;
        match response.status() {
            StatusCode::OK => {
                let cache_for = header_str(&response, "ory-session-cache-for")
                    .and_then(|v| v.trim().parse::<u64>().ok())
                    .map(Duration::from_secs);
                let dto: SessionDto = read_json(response).await?;
                let session = dto.into_domain().map_err(OryError::Protocol)?;
                // Kratos answers 401 for a session it no longer honours, but a 200 that says
                // `active: false` (a proxy's stale copy, another implementation) is believed in
                // the direction that is safe.
                if !session.session.active {
                    return Err(OryError::Unauthenticated);
                }
                Ok(Whoami { session, cache_for })
            }
            StatusCode::UNAUTHORIZED => Err(OryError::Unauthenticated),
            StatusCode::FORBIDDEN => {
                let header_id = header_str(&response, "ory-error-id");
                let body: ErrorBody = read_json(response).await.unwrap_or_default();
                let redirect = body.redirect_browser_to.or_else(|| {
                    body.error
                        .details
                        .as_ref()
                        .and_then(|d| d.get("redirect_browser_to"))
                        .and_then(Value::as_str)
                        .map(str::to_owned)
                });
                Err(OryError::Forbidden {
                    error_id: body.error.id.or(header_id).filter(|s| !s.is_empty()),
                    reason: body.error.reason,
                    redirect_browser_to: redirect,
                })
            }
            _ => Err(unexpected(response).await),
        }
    }

    /// Reads an identity with `GET /admin/identities/{id}`.
    #[tracing::instrument(name = "ory.get_identity", skip_all, fields(identity = %id))]
    pub async fn get_identity(&self, id: IdentityId) -> Result<Identity, OryError> {
        let url = join(&self.admin_url, &format!("admin/identities/{id}"))?;
        let response = self
            .send_admin(OryEndpoint::GetIdentity, self.admin(Method::GET, url))
            .await?;
        match response.status() {
            StatusCode::OK => {
                let dto: IdentityJson = read_json(response).await?;
                dto.into_identity()
                    .map_err(|e| OryError::Protocol(e.to_string()))
            }
            StatusCode::NOT_FOUND => Err(OryError::NotFound),
            _ => Err(unexpected(response).await),
        }
    }

    /// Makes `metadata_public.id` hold `user_id`, keeping every other key. Kratos's PATCH accepts
    /// only add/remove/replace and has no test op, so: read, then add just the `id` key to an
    /// existing object (other keys untouched even if they change meanwhile), or add the whole object
    /// when there is none.
    #[tracing::instrument(name = "ory.set_metadata_public_id", skip_all, fields(identity = %id))]
    pub async fn set_metadata_public_id(
        &self,
        id: IdentityId,
        user_id: UserId,
    ) -> Result<MetadataWrite, OryError> {
        let identity = self.get_identity(id).await?;
        let wanted = user_id.to_string();
        let op = match &identity.metadata_public {
            Value::Object(map) if map.get("id").and_then(Value::as_str) == Some(&wanted) => {
                return Ok(MetadataWrite::AlreadySet);
            }
            Value::Object(_) => PatchOp {
                op: "add",
                path: "/metadata_public/id",
                value: Some(Value::String(wanted)),
            },
            Value::Null => PatchOp {
                op: "add",
                path: "/metadata_public",
                value: Some(json!({ "id": wanted })),
            },
            _ => return Ok(MetadataWrite::NotAnObject),
        };
        self.patch_identity(id, op).await?;
        Ok(MetadataWrite::Written)
    }

    /// Applies one JSON Patch operation with `PATCH /admin/identities/{id}`. Ory's 409 (a unique
    /// value another identity holds) is [`OryError::Conflict`].
    async fn patch_identity(&self, id: IdentityId, op: PatchOp<'_>) -> Result<(), OryError> {
        let url = join(&self.admin_url, &format!("admin/identities/{id}"))?;
        let response = self
            .send_admin(
                OryEndpoint::PatchIdentity,
                self.admin(Method::PATCH, url).json(&[op]),
            )
            .await?;
        match response.status() {
            // Kratos answers 200 with the identity; a proxy or another implementation may answer
            // 204. Either way the patch was applied.
            status if status.is_success() => Ok(()),
            StatusCode::NOT_FOUND => Err(OryError::NotFound),
            StatusCode::CONFLICT => Err(OryError::Conflict),
            _ => Err(unexpected(response).await),
        }
    }

    /// Finds the identity whose `external_id` is `value`, with
    /// `GET /admin/identities/by/external/{externalID}`; `None` when Ory has none.
    #[tracing::instrument(name = "ory.get_identity_by_external_id", skip_all)]
    pub async fn get_identity_by_external_id(
        &self,
        value: &str,
    ) -> Result<Option<Identity>, OryError> {
        let mut url = join(&self.admin_url, "admin/identities/by/external/")?;
        // One path segment, percent-encoded: a value holding `/`, `?` or `#` must not change
        // which resource is asked for.
        url.path_segments_mut()
            .map_err(|()| OryError::Protocol("the admin URL cannot take a path".into()))?
            .pop_if_empty()
            .push(value);
        let response = self
            .send_admin(
                OryEndpoint::GetIdentityByExternalId,
                self.admin(Method::GET, url),
            )
            .await?;
        match response.status() {
            StatusCode::OK => {
                let dto: IdentityJson = read_json(response).await?;
                let identity = dto
                    .into_identity()
                    .map_err(|e| OryError::Protocol(e.to_string()))?;
                // A proxy or cache answering for another value must not link the wrong identity.
                if identity.external_id.as_deref() != Some(value) {
                    return Err(OryError::Protocol(
                        "Ory answered the external id lookup with an identity that does not hold it"
                            .into(),
                    ));
                }
                Ok(Some(identity))
            }
            StatusCode::NOT_FOUND => Ok(None),
            _ => Err(unexpected(response).await),
        }
    }

    /// Makes the identity's `external_id` hold `value`, or clears it for `None` (Kratos stores `""`
    /// as no value). Reads first, so a value already in place sends nothing. Ory's 409 (another
    /// identity holds that `external_id`) is [`OryError::Conflict`].
    #[tracing::instrument(name = "ory.set_external_id", skip_all, fields(identity = %id))]
    pub async fn set_external_id(
        &self,
        id: IdentityId,
        value: Option<&str>,
    ) -> Result<ExternalIdWrite, OryError> {
        let identity = self.get_identity(id).await?;
        if identity.external_id.as_deref() == value {
            return Ok(ExternalIdWrite::AlreadySet);
        }
        let op = PatchOp {
            op: "replace",
            path: "/external_id",
            value: Some(Value::String(value.unwrap_or_default().to_owned())),
        };
        self.patch_identity(id, op).await?;
        Ok(ExternalIdWrite::Written)
    }

    /// Reads one page of `GET /admin/identities` (keyset pagination, ordered by Ory). The next page's
    /// token comes from the `Link: <...>; rel="next"` header, which Kratos builds from its own base
    /// URL (the emulator sends a path only); either form is resolved against the admin base URL and
    /// only its `page_token` is kept, so a proxy in front of Ory cannot redirect the walk.
    ///
    /// Current Kratos's tokens expire an hour after they were issued (and any token stops working
    /// when the pagination secret changes); Ory then answers 400, reported as
    /// [`OryError::PageTokenRefused`] so the caller can start again from the first page.
    #[tracing::instrument(name = "ory.list_identities", skip_all, fields(page_size))]
    pub async fn list_identities(
        &self,
        page_size: u32,
        page_token: Option<&str>,
    ) -> Result<IdentityPage, OryError> {
        let mut url = join(&self.admin_url, "admin/identities")?;
        {
            let mut query = url.query_pairs_mut();
            query.append_pair("page_size", &page_size.to_string());
            if let Some(token) = page_token {
                query.append_pair("page_token", token);
            }
        }
        let response = self
            .send_admin(OryEndpoint::ListIdentities, self.admin(Method::GET, url))
            .await?;
        match response.status() {
            StatusCode::OK => {}
            // The only parameter Ory can refuse is the token: the page size is in range.
            StatusCode::BAD_REQUEST if page_token.is_some() => {
                let reason = read_json::<ErrorBody>(response)
                    .await
                    .ok()
                    .and_then(|b| b.error.reason.or(b.error.id))
                    .unwrap_or_else(|| "no reason given".to_owned());
                return Err(OryError::PageTokenRefused(reason));
            }
            _ => return Err(unexpected(response).await),
        }
        // Older ory/x sends `rel="first"` and `rel="next"` as separate Link headers, newer one
        // header with both; RFC 9110 makes the two forms equivalent once joined with a comma.
        let link = header_values(&response, "link").join(",");
        let next_page_token = next_page_token(&self.admin_url, &link)?;
        if next_page_token.is_some() && next_page_token.as_deref() == page_token {
            // Following it would read the same page forever.
            return Err(OryError::Protocol(
                "the next page's token is the current page's".into(),
            ));
        }
        // Entries are decoded one by one: an identity Ory sends in a shape idmap cannot read is
        // reported on its own instead of failing the whole page.
        let entries: Vec<Value> = read_json(response).await?;
        let mut identities = Vec::with_capacity(entries.len());
        let mut rejected = Vec::new();
        for entry in entries {
            let id = entry.get("id").and_then(Value::as_str).map(str::to_owned);
            match serde_json::from_value::<IdentityJson>(entry)
                .map_err(|e| e.to_string())
                .and_then(|dto| dto.into_identity().map_err(|e| e.to_string()))
            {
                Ok(identity) => identities.push(identity),
                Err(e) => rejected.push(match id {
                    Some(id) => format!("identity {id}: {e}"),
                    None => format!("identity without an id: {e}"),
                }),
            }
        }
        Ok(IdentityPage {
            identities,
            rejected,
            next_page_token,
        })
    }

    /// Sends an admin API request under the admin rate limit.
    async fn send_admin(
        &self,
        endpoint: OryEndpoint,
        request: RequestBuilder,
    ) -> Result<Response, OryError> {
        send(&self.admin_limit, endpoint, ENV_ORY_ADMIN_URL, request).await
    }

    fn admin(&self, method: Method, url: Url) -> RequestBuilder {
        let request = self
            .http
            .request(method, url)
            .header(header::ACCEPT, "application/json");
        match &self.api_key {
            Some(key) => request.bearer_auth(key.expose_secret()),
            None => request,
        }
    }
}

fn with_trailing_slash(mut url: Url) -> Url {
    if !url.path().ends_with('/') {
        let path = format!("{}/", url.path());
        url.set_path(&path);
    }
    url
}

fn join(base: &Url, path: &str) -> Result<Url, OryError> {
    base.join(path)
        .map_err(|e| OryError::Protocol(format!("cannot build the Ory URL: {e}")))
}

/// The `page_token` of the `rel="next"` entry of a `Link` header (RFC 8288), if there is one.
fn next_page_token(base: &Url, link: &str) -> Result<Option<String>, OryError> {
    let mut rest = link;
    while let Some(start) = rest.find('<') {
        let after = &rest[start + 1..];
        let end = after
            .find('>')
            .ok_or_else(|| OryError::Protocol("malformed Link header".into()))?;
        let target = &after[..end];
        let params = &after[end + 1..];
        // This entry's parameters run up to the next entry.
        let params = params.find('<').map_or(params, |next| &params[..next]);
        let is_next = params.split(';').any(|param| {
            let Some((name, value)) = param.split_once('=') else {
                return false;
            };
            name.trim().eq_ignore_ascii_case("rel")
                && value
                    .trim()
                    .trim_end_matches(',')
                    .trim()
                    .trim_matches('"')
                    .split_ascii_whitespace()
                    .any(|rel| rel.eq_ignore_ascii_case("next"))
        });
        if is_next {
            let url = base.join(target).map_err(|e| {
                OryError::Protocol(format!("the Link header's next URL is malformed: {e}"))
            })?;
            return url
                .query_pairs()
                .find(|(k, _)| k == "page_token")
                .map(|(_, v)| v.into_owned())
                .filter(|v| !v.is_empty())
                .map(Some)
                .ok_or_else(|| {
                    OryError::Protocol("the Link header's next URL has no page_token".into())
                });
        }
        rest = &after[end + 1..];
    }
    Ok(None)
}

/// Sends a request once the limiter allows, and feeds Ory's rate-limit signals back into it.
/// `setting` names the base URL the request went to, for the error a redirect gets.
async fn send(
    limiter: &OryLimiter,
    endpoint: OryEndpoint,
    setting: &'static str,
    request: RequestBuilder,
) -> Result<Response, OryError> {
    limiter.acquire().await?;
    let mut trace = http::HeaderMap::new();
    telemetry::inject(&mut trace);
    let started = tokio::time::Instant::now();
    let result = request.headers(trace).send().await;
    metrics::get().ory_request(
        endpoint,
        result.as_ref().ok().map(|r| r.status().as_u16()),
        started.elapsed(),
    );
    match result {
        Ok(response) => {
            tracing::debug!(
                status = response.status().as_u16(),
                elapsed_ms = started.elapsed().as_millis() as u64,
                "ory answered"
            );
            if response.status() == StatusCode::TOO_MANY_REQUESTS {
                // Without a hint, pause briefly rather than hammer a limit we cannot see.
                limiter.back_off(retry_after(&response).unwrap_or(Duration::from_secs(1)));
            } else if header_str(&response, "x-ratelimit-remaining").as_deref() == Some("0")
                && let Some(reset) = ratelimit_reset(&response)
            {
                limiter.back_off(reset);
            }
            if response.status().is_redirection() {
                let location = header_str(&response, "location").map(|l| {
                    // The query could be anything; the scheme, host and path say what is wrong.
                    l.split(['?', '#']).next().unwrap_or_default().to_owned()
                });
                tracing::error!(
                    status = response.status().as_u16(),
                    location = location.as_deref().unwrap_or(""),
                    "Ory answered with a redirect, which idmap does not follow; check {setting}"
                );
                return Err(OryError::Redirected {
                    setting,
                    status: response.status().as_u16(),
                    location,
                });
            }
            Ok(response)
        }
        // Never format the request itself: its headers hold the credential.
        Err(e) if e.is_timeout() => Err(OryError::Unavailable("timed out".to_owned())),
        Err(e) if e.is_connect() => Err(OryError::Unavailable("cannot connect".to_owned())),
        Err(e) => Err(OryError::Unavailable(format!(
            "request failed: {}",
            e.without_url()
        ))),
    }
}

/// Maps the statuses every endpoint shares; the caller has handled the ones specific to it.
async fn unexpected(response: Response) -> OryError {
    let status = response.status();
    if status == StatusCode::TOO_MANY_REQUESTS {
        return OryError::RateLimited {
            retry_after: retry_after(&response),
        };
    }
    if status.is_server_error() {
        return OryError::Unavailable(format!("status {}", status.as_u16()));
    }
    let is_admin = response.url().path().contains("/admin/");
    if is_admin && (status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN) {
        // The operator must act; say what to check, never what was sent.
        tracing::error!(
            status = status.as_u16(),
            "Ory refused idmap's admin API credentials; check {ENV_ORY_API_KEY} (and that {ENV_ORY_ADMIN_URL} is the project's admin API)"
        );
        return OryError::AdminUnauthorized(status.as_u16());
    }
    let reason = read_json::<ErrorBody>(response)
        .await
        .ok()
        .and_then(|b| b.error.reason.or(b.error.id));
    OryError::Protocol(match reason {
        Some(reason) => format!("status {}: {reason}", status.as_u16()),
        None => format!("status {}", status.as_u16()),
    })
}

/// The longest pause idmap takes on Ory's say-so (`Retry-After`, `x-ratelimit-reset`). Ory
/// Network's limits refill within a minute; a longer value is a proxy's mistake or an attack on
/// the path, and believing it would stall every Ory call of that kind (or, unbounded, overflow the
/// clock) until a restart. After the cap, the next call finds out whether the limit still holds.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(60);

/// `Retry-After` (seconds or an HTTP date), else Ory Network's `x-ratelimit-reset` (seconds); at
/// most [`MAX_RETRY_AFTER`].
fn retry_after(response: &Response) -> Option<Duration> {
    if let Some(value) = header_str(response, "retry-after") {
        if let Ok(secs) = value.trim().parse::<u64>() {
            return Some(Duration::from_secs(secs).min(MAX_RETRY_AFTER));
        }
        if let Ok(at) = chrono::DateTime::parse_from_rfc2822(value.trim()) {
            let secs = (at.timestamp() - chrono::Utc::now().timestamp()).max(0);
            return Some(Duration::from_secs(secs.unsigned_abs()).min(MAX_RETRY_AFTER));
        }
    }
    ratelimit_reset(response)
}

/// Ory Network's `x-ratelimit-reset`, in seconds from now; at most [`MAX_RETRY_AFTER`].
fn ratelimit_reset(response: &Response) -> Option<Duration> {
    header_str(response, "x-ratelimit-reset")
        .and_then(|v| v.trim().parse::<u64>().ok())
        // Some gateways send an epoch timestamp here instead of a delay; ignore values that cannot be
        // a delay rather than waiting for decades.
        .filter(|secs| *secs < 24 * 3600)
        .map(|secs| Duration::from_secs(secs).min(MAX_RETRY_AFTER))
}

/// Every value of a header that may be repeated, in order.
fn header_values<'a>(response: &'a Response, name: &str) -> Vec<&'a str> {
    response
        .headers()
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .collect()
}

fn header_str(response: &Response, name: &str) -> Option<String> {
    response
        .headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
}

async fn read_json<T: serde::de::DeserializeOwned>(mut response: Response) -> Result<T, OryError> {
    let mut body = Vec::new();
    loop {
        match response.chunk().await {
            Ok(Some(chunk)) => {
                if body.len() + chunk.len() > MAX_BODY_BYTES {
                    return Err(OryError::Protocol(format!(
                        "response body larger than {MAX_BODY_BYTES} bytes"
                    )));
                }
                body.extend_from_slice(&chunk);
            }
            Ok(None) => break,
            Err(e) if e.is_timeout() => {
                return Err(OryError::Unavailable(
                    "timed out reading the body".to_owned(),
                ));
            }
            Err(e) => {
                return Err(OryError::Unavailable(format!(
                    "reading the body failed: {}",
                    e.without_url()
                )));
            }
        }
    }
    serde_json::from_slice(&body)
        .map_err(|e| OryError::Protocol(format!("cannot decode Ory's JSON: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> Url {
        Url::parse("http://kratos:4434/").unwrap()
    }

    #[test]
    fn next_token_comes_from_relative_and_absolute_links() {
        let relative = r#"</admin/identities?page_size=2&page_token=00000000-0000-0000-0000-000000000000>; rel="first",</admin/identities?page_size=2&page_token=abc>; rel="next""#;
        assert_eq!(
            next_page_token(&base(), relative).unwrap().as_deref(),
            Some("abc")
        );
        let absolute = r#"<https://x.projects.oryapis.com/admin/identities?page_size=2&page_token=a%2Bb>; rel="next", <https://x.projects.oryapis.com/admin/identities?page_token=f>; rel=first"#;
        assert_eq!(
            next_page_token(&base(), absolute).unwrap().as_deref(),
            Some("a+b")
        );
    }

    #[test]
    fn split_link_headers_read_as_one() {
        // What older ory/x sends as two headers, joined as `list_identities` joins them.
        let first = r#"</admin/identities?page_size=2&page_token=f>; rel="first""#;
        let next = r#"</admin/identities?page_size=2&page_token=n>; rel="next""#;
        for joined in [format!("{first},{next}"), format!("{next},{first}")] {
            assert_eq!(
                next_page_token(&base(), &joined).unwrap().as_deref(),
                Some("n")
            );
        }
    }

    #[test]
    fn last_page_has_no_next_token() {
        let last = r#"</admin/identities?page_size=2&page_token=00000000-0000-0000-0000-000000000000>; rel="first""#;
        assert_eq!(next_page_token(&base(), last).unwrap(), None);
        assert_eq!(next_page_token(&base(), "").unwrap(), None);
    }

    #[test]
    fn next_link_without_token_is_a_protocol_error() {
        let bad = r#"</admin/identities?page_size=2>; rel="next""#;
        assert!(matches!(
            next_page_token(&base(), bad),
            Err(OryError::Protocol(_))
        ));
    }
}
