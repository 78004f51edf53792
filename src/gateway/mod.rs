//! What a gateway is told about a request it forwards: Envoy's ext_authz (`grpc/ext_authz.rs`) and
//! the HTTP forward-auth route (`http/gateway.rs`) ask here, so both make the same decision. The
//! request's session (Ory's session cookie, `Authorization: Bearer ory_st_...` or
//! `X-Session-Token`) is resolved exactly as ResolveSession resolves it: the same caches, limits
//! and just-in-time linking. The answer is in HTTP terms, which both protocols speak: a status,
//! the headers of a refusal, or the identity headers to set on the upstream request.

use std::sync::Arc;

use bytes::Bytes;

use crate::config::GatewaySettings;
use crate::domain::{Credential, User};
use crate::error::Error;
use crate::service::{IdentityMapper, Resolved};

/// What Retry-After says when Ory or the database gave no hint: soon, but not in a tight loop.
const DEFAULT_RETRY_AFTER_SECS: u64 = 1;

/// The request headers the decision reads. Header names are matched case-insensitively by the
/// adapters, which pass values as the client sent them.
#[derive(Debug, Clone, Copy, Default)]
pub struct Presented<'a> {
    pub cookie: Option<&'a str>,
    pub authorization: Option<&'a str>,
    pub session_token: Option<&'a str>,
    pub accept: Option<&'a str>,
}

impl Presented<'_> {
    /// Whether the client is a browser that can follow a redirect to a login page.
    fn wants_html(&self) -> bool {
        self.accept
            .is_some_and(|accept| accept.to_ascii_lowercase().contains("text/html"))
    }
}

/// The gateway's answer.
#[derive(Debug, Clone)]
pub enum Verdict {
    /// Let the request through, with [`Gateway::headers`] set on it (after removing every
    /// identity header the client sent: [`Gateway::is_identity_header`]).
    Allow(Allowed),
    /// Refuse it with this status, these response headers and a short text body.
    Deny {
        status: u16,
        headers: Vec<(String, String)>,
        body: &'static str,
    },
}

/// A request let through: its session as resolved, or none for an anonymous request.
#[derive(Debug, Clone)]
pub struct Allowed(Option<Resolved>);

/// The decision, shared by the gateway protocols.
pub struct Gateway {
    mapper: Arc<IdentityMapper>,
    settings: GatewaySettings,
    names: Names,
}

/// The identity header names, built once from the prefix.
struct Names {
    user_id: String,
    identity_id: String,
    session_id: String,
    aal: String,
    state: String,
    /// `x-user-external-id`; a namespace's is this, `-`, the namespace.
    external_id: String,
}

/// The assertion header, whatever the prefix: its name is part of what upstreams verify.
pub const ASSERTION_HEADER: &str = "x-idmap-assertion";

impl Gateway {
    pub fn new(mapper: Arc<IdentityMapper>, settings: GatewaySettings) -> Self {
        let prefix = settings.header_prefix.to_ascii_lowercase();
        let names = Names {
            user_id: format!("{prefix}user-id"),
            identity_id: format!("{prefix}ory-identity-id"),
            session_id: format!("{prefix}ory-session-id"),
            aal: format!("{prefix}ory-aal"),
            state: format!("{prefix}user-state"),
            external_id: format!("{prefix}user-external-id"),
        };
        Self {
            mapper,
            settings,
            names,
        }
    }

    /// The public keys upstreams verify assertions with (`/.well-known/jwks.json`); `None` when
    /// assertions are off.
    pub fn jwks(&self) -> Option<serde_json::Value> {
        self.mapper.assertion_keys().map(|keys| keys.jwks())
    }

    /// Whether a request header (any case) is one this gateway sets, so that a copy the client
    /// sent must be removed before the request goes upstream: it could only be a forgery.
    pub fn is_identity_header(&self, name: &str) -> bool {
        let n = &self.names;
        let is = |known: &str| name.eq_ignore_ascii_case(known);
        is(&n.user_id)
            || is(&n.identity_id)
            || is(&n.session_id)
            || is(&n.aal)
            || is(&n.state)
            || is(ASSERTION_HEADER)
            || name
                .get(..n.external_id.len())
                .is_some_and(|head| head.eq_ignore_ascii_case(&n.external_id))
                && name
                    .get(n.external_id.len()..)
                    .is_some_and(|rest| rest.is_empty() || rest.starts_with('-'))
    }

    /// Decides on one request.
    pub async fn decide(&self, presented: &Presented<'_>) -> Verdict {
        let credential = match self.credential(presented) {
            Ok(Some(credential)) => credential,
            Ok(None) if self.settings.allow_anonymous => return Verdict::Allow(Allowed(None)),
            Ok(None) => return self.unauthenticated(presented, "no session"),
            // A malformed credential is no session either; it is still refused when anonymous
            // requests are let through, since the client meant to present one.
            Err(_) => return self.unauthenticated(presented, "the session is not valid"),
        };
        match self.mapper.resolve_session(&credential).await {
            Ok(resolved) => Verdict::Allow(Allowed(Some(resolved))),
            Err(Error::Unauthenticated { .. } | Error::InvalidArgument(_)) => {
                self.unauthenticated(presented, "the session is not valid")
            }
            Err(Error::PermissionDenied {
                redirect_browser_to,
                ..
            }) => match redirect_browser_to {
                Some(to) if presented.wants_html() => redirect(to),
                _ => Verdict::Deny {
                    status: 403,
                    headers: Vec::new(),
                    body: "the session's authentication level is too low for this request",
                },
            },
            Err(e) => {
                let retry_after = match &e {
                    Error::Unavailable {
                        retry_after: Some(hint),
                        ..
                    } => hint.as_secs().max(1),
                    _ => DEFAULT_RETRY_AFTER_SECS,
                };
                tracing::warn!(error = %e, "gateway: cannot decide on a request; answering 503");
                Verdict::Deny {
                    status: 503,
                    headers: vec![("retry-after".into(), retry_after.to_string())],
                    body: "the session cannot be checked right now; retry",
                }
            }
        }
    }

    /// The session credential the request carries: `X-Session-Token`, else a Bearer token in
    /// Ory's `ory_st_` form (any other Bearer token belongs to something else and is ignored),
    /// else Ory's session cookie. `Ok(None)`: no Ory session at all.
    fn credential(&self, presented: &Presented<'_>) -> Result<Option<Credential>, Error> {
        if let Some(token) = presented.session_token.filter(|t| !t.is_empty()) {
            return Ok(Some(Credential::session_token("x-session-token", token)?));
        }
        if let Some(token) = presented.authorization.and_then(bearer)
            && token.starts_with("ory_st_")
        {
            return Ok(Some(Credential::session_token("authorization", token)?));
        }
        match presented.cookie.filter(|c| !c.trim().is_empty()) {
            Some(header) => Ok(Credential::cookie_header(
                "cookie",
                header,
                self.mapper.settings().session_cookie_name.as_deref(),
            )?),
            None => Ok(None),
        }
    }

    /// 401, or for a browser a 303 to the login page when one is configured.
    fn unauthenticated(&self, presented: &Presented<'_>, body: &'static str) -> Verdict {
        match &self.settings.login_url {
            Some(login) if presented.wants_html() => redirect(login.to_string()),
            _ => Verdict::Deny {
                status: 401,
                headers: Vec::new(),
                body,
            },
        }
    }

    /// The headers an allowed request carries upstream (none for an anonymous one): the identity
    /// headers, and the signed assertion when assertions are on.
    pub fn headers(&self, allowed: &Allowed) -> Vec<(String, String)> {
        match &allowed.0 {
            Some(resolved) => self.headers_of(resolved).0,
            None => Vec::new(),
        }
    }

    /// [`Gateway::headers`] as `encode` turns them into bytes, made once per cached session and
    /// user state and kept with the session's cache entry, so that the hits of a busy session
    /// build and encode nothing. One encoding per process: Envoy's, by the ext_authz adapter.
    pub fn encoded_headers(
        &self,
        allowed: &Allowed,
        encode: impl FnOnce(Vec<(String, String)>) -> Bytes,
    ) -> Bytes {
        let Some(resolved) = &allowed.0 else {
            return encode(Vec::new());
        };
        let stamp = resolved.user_stamp();
        if let Some(encoded) = resolved.headers.get(&stamp) {
            return encoded;
        }
        let (headers, complete) = self.headers_of(resolved);
        let encoded = encode(headers);
        // Without the assertion it should carry, the next request tries again.
        if complete {
            resolved.headers.set(stamp, encoded.clone());
        }
        encoded
    }

    /// The headers of an allowed session, and whether they are all there: `false` when
    /// assertions are on but none could be made for a user.
    fn headers_of(&self, resolved: &Resolved) -> (Vec<(String, String)>, bool) {
        let mut headers = self.identity_headers(resolved);
        let mut complete = true;
        // An assertion names the internal user: an identity without one gets none.
        if self.mapper.assertion_keys().is_some() && resolved.user.is_some() {
            match self.mapper.assertion(resolved) {
                Some(assertion) => {
                    headers.push((ASSERTION_HEADER.to_owned(), assertion.to_string()));
                }
                None => complete = false,
            }
        }
        (headers, complete)
    }

    /// The identity headers for an allowed request.
    fn identity_headers(&self, resolved: &Resolved) -> Vec<(String, String)> {
        let n = &self.names;
        let session = &resolved.session.session;
        let identity = &resolved.session.identity;
        let mut headers = Vec::with_capacity(8);
        headers.push((n.identity_id.clone(), identity.id.to_string()));
        headers.push((n.session_id.clone(), session.id.clone()));
        if let Some(aal) = &session.authenticator_assurance_level {
            headers.push((n.aal.clone(), aal.clone()));
        }
        if let Some(user) = &resolved.user {
            self.user_headers(user, &mut headers);
        }
        headers
    }

    fn user_headers(&self, user: &User, headers: &mut Vec<(String, String)>) {
        let n = &self.names;
        headers.push((n.user_id.clone(), user.id.to_string()));
        headers.push((n.state.clone(), user.state.as_str().to_owned()));
        for id in &user.external_ids {
            let name = if id.namespace.is_default() {
                n.external_id.clone()
            } else {
                format!("{}-{}", n.external_id, id.namespace)
            };
            headers.push((name, header_value(id.value.as_str())));
        }
    }
}

/// Why a hydration was refused.
#[derive(Debug, thiserror::Error)]
pub enum HydrateError {
    /// The body is not an Oathkeeper authentication session, or its subject is not an identity id.
    #[error("{0}")]
    BadSession(String),
    /// No user is linked to the subject (hydration never calls Ory, so it cannot link one).
    #[error("no user is linked to Ory identity {0}")]
    NotLinked(String),
    /// The store failed.
    #[error(transparent)]
    Failed(Error),
}

impl Gateway {
    /// Oathkeeper's hydrator mutator: the authentication session Oathkeeper built (its `subject`
    /// is the Ory identity id, after a `cookie_session` or `bearer_token` authenticator), with
    /// `extra.idmap` holding the linked user, from the user cache or the store, never Ory. Every
    /// other field comes back as it was sent. A session without a subject (the `anonymous`
    /// authenticator's, once its subject is configured empty) comes back unchanged.
    pub async fn hydrate(
        &self,
        mut session: serde_json::Value,
    ) -> Result<serde_json::Value, HydrateError> {
        use serde_json::{Map, Value, json};
        let Value::Object(fields) = &mut session else {
            return Err(HydrateError::BadSession(
                "the body must be Oathkeeper's authentication session, a JSON object".into(),
            ));
        };
        let subject = match fields.get("subject") {
            None | Some(Value::Null) => return Ok(session),
            Some(Value::String(s)) if s.is_empty() => return Ok(session),
            Some(Value::String(s)) => s.clone(),
            Some(_) => return Err(HydrateError::BadSession("subject must be a string".into())),
        };
        let identity = crate::domain::IdentityId::parse("subject", &subject)
            .map_err(|v| HydrateError::BadSession(v.to_string()))?;
        let user = match self.mapper.user_by_identity(identity).await {
            Ok(user) => user,
            Err(Error::NotFound { .. }) => return Err(HydrateError::NotLinked(subject)),
            Err(e) => return Err(HydrateError::Failed(e)),
        };
        let external_ids: Map<String, Value> = user
            .external_ids
            .iter()
            .map(|id| {
                (
                    id.namespace.to_string(),
                    Value::String(id.value.to_string()),
                )
            })
            .collect();
        let hydrated = json!({
            "id": user.id.to_string(),
            "ory_identity_id": user.ory_identity_id.to_string(),
            "state": user.state.as_str(),
            "external_id": user.default_external_id().map(|v| v.as_str()),
            "external_ids": external_ids,
        });
        let extra = fields
            .entry("extra")
            .or_insert_with(|| Value::Object(Map::new()));
        if !extra.is_object() {
            *extra = Value::Object(Map::new());
        }
        if let Value::Object(extra) = extra {
            extra.insert("idmap".into(), hydrated);
        }
        Ok(session)
    }
}

fn redirect(location: String) -> Verdict {
    Verdict::Deny {
        status: 303,
        headers: vec![("location".into(), location)],
        body: "log in first",
    }
}

/// The token of `Authorization: Bearer <token>` (the scheme is case-insensitive).
fn bearer(header: &str) -> Option<&str> {
    let (scheme, token) = header.trim().split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|t| !t.is_empty())
}

/// A business id as a header value: as it is when it is visible ASCII (or spaces) without `%`,
/// else percent-encoded as UTF-8 (RFC 3986), so a value is never mangled by a proxy and `%` in
/// the header always means an escape.
fn header_value(value: &str) -> String {
    if value
        .bytes()
        .all(|b| (b == b' ' || b.is_ascii_graphic()) && b != b'%')
    {
        return value.to_owned();
    }
    let mut out = String::with_capacity(value.len() * 3);
    for b in value.bytes() {
        if b.is_ascii_graphic() && b != b'%' {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_tokens_are_read_case_insensitively() {
        assert_eq!(bearer("Bearer ory_st_abc"), Some("ory_st_abc"));
        assert_eq!(bearer("bearer  ory_st_abc "), Some("ory_st_abc"));
        assert_eq!(bearer("Basic dXNlcg=="), None);
        assert_eq!(bearer("Bearer"), None);
    }

    #[test]
    fn header_values_escape_anything_a_proxy_could_mangle() {
        assert_eq!(header_value("crm-42"), "crm-42");
        assert_eq!(header_value("a b"), "a b");
        assert_eq!(header_value("100%"), "100%25");
        assert_eq!(header_value("müller"), "m%C3%BCller");
    }
}
