//! Request dispatch: route classes, faults, authentication and the Kratos handlers.

use axum::{
    body::{Body, Bytes},
    extract::State,
    http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, Uri, header},
    response::Response,
};
use percent_encoding::percent_decode_str;
use serde::Deserialize;
use serde_json::Value;
use uuid::Uuid;

use crate::{
    Emulator, Fault, LinkHeader, Listener, Port, RequiredAal, Route, herodot, page_tokens,
    store::{ApiError, IdentityInput, Shape, UpdateInput, now},
};

/// herodot's `Write` (successes) sends this; its error writer sends plain `application/json`.
const JSON_UTF8: &str = "application/json; charset=utf-8";
const JSON: &str = "application/json";
const MAX_PAGE_SIZE: usize = 500;
const DEFAULT_PAGE_SIZE: usize = 250;
const CREDENTIAL_TYPES: [&str; 13] = [
    "password",
    "oidc",
    "totp",
    "lookup_secret",
    "webauthn",
    "code",
    "passkey",
    "profile",
    "saml",
    "deviceauthn",
    "identifier_first",
    "link_recovery",
    "code_recovery",
];

fn respond(
    status: u16,
    content_type: Option<&'static str>,
    headers: &[(String, String)],
    body: Body,
) -> Response {
    let mut res = Response::new(body);
    *res.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let h = res.headers_mut();
    if let Some(ct) = content_type {
        h.insert(header::CONTENT_TYPE, HeaderValue::from_static(ct));
    }
    for (k, v) in headers {
        if let (Ok(k), Ok(v)) = (
            HeaderName::try_from(k.as_str()),
            HeaderValue::try_from(v.as_str()),
        ) {
            h.append(k, v);
        }
    }
    res
}

fn json_ok(status: u16, body: &Value, headers: &[(String, String)]) -> Response {
    respond(
        status,
        Some(JSON_UTF8),
        headers,
        Body::from(body.to_string()),
    )
}

fn json_err(status: u16, body: &Value, headers: &[(String, String)]) -> Response {
    respond(
        status,
        Some(JSON),
        headers,
        Body::from(herodot::to_string(body)),
    )
}

fn api_err(e: ApiError) -> Response {
    json_err(e.status, &e.body, &[])
}

fn empty(status: u16) -> Response {
    respond(status, None, &[], Body::empty())
}

fn fault_response(fault: &Fault) -> Response {
    let body = fault
        .body
        .as_ref()
        .map(herodot::to_string)
        .unwrap_or_default();
    let has_ct = fault
        .headers
        .iter()
        .any(|(k, _)| k.eq_ignore_ascii_case("content-type"));
    let ct = (fault.body.is_some() && !has_ct).then_some(JSON);
    respond(fault.status, ct, &fault.headers, Body::from(body))
}

enum Target {
    Whoami,
    Admin(Vec<String>),
    Unknown,
}

fn classify(path: &str) -> Target {
    if path == "/sessions/whoami" {
        return Target::Whoami;
    }
    // Self-hosted admin ports accept paths with and without `/admin`; Ory Network uses `/admin`.
    let admin_path = match path.strip_prefix("/admin") {
        Some(rest) if rest.starts_with('/') => rest,
        _ if path == "/identities" || path.starts_with("/identities/") => path,
        _ => return Target::Unknown,
    };
    let segments = admin_path
        .trim_start_matches('/')
        .split('/')
        .map(|s| percent_decode_str(s).decode_utf8_lossy().into_owned())
        .collect();
    Target::Admin(segments)
}

/// Kratos's `x.RedirectToAdminRoute`: the same path (without any `/admin` prefix) under the admin
/// base URL's `/admin`, query kept, as a 307 so that the method and body are kept too. Go's
/// `http.Redirect` adds a small HTML body to GET and HEAD answers only.
fn redirect_to_admin(emu: &Emulator, method: &Method, uri: &Uri) -> Response {
    let path = uri.path();
    let rest = path.strip_prefix("/admin").unwrap_or(path);
    let mut location = format!("{}/admin{rest}", emu.inner.admin_base_url);
    if let Some(query) = uri.query() {
        location.push('?');
        location.push_str(query);
    }
    let get = *method == Method::GET || *method == Method::HEAD;
    let body = if get {
        Body::from(format!(
            "<a href=\"{location}\">Temporary Redirect</a>.\n\n"
        ))
    } else {
        Body::empty()
    };
    respond(
        307,
        get.then_some("text/html; charset=utf-8"),
        &[("Location".into(), location)],
        body,
    )
}

/// The single handler: everything funnels through here so that counting and faults see every request.
pub(crate) async fn dispatch(
    State(Listener { emu, port }): State<Listener>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let target = match (classify(uri.path()), port) {
        // Self-hosted Kratos's public port redirects admin identity calls to the admin port
        // rather than serving them; the redirect is not an admin call, so it is neither counted
        // nor faulted.
        (Target::Admin(segments), Port::Public) => {
            return if segments.first().map(String::as_str) == Some("identities") {
                redirect_to_admin(&emu, &method, &uri)
            } else {
                json_err(404, &herodot::generic(404, None), &[])
            };
        }
        // The admin port has no whoami; its router adds the `/admin` prefix, and
        // `/admin/sessions/whoami` redirects to the public port.
        (Target::Whoami, Port::Admin) => Target::Admin(vec!["sessions".into(), "whoami".into()]),
        (target, _) => target,
    };
    let route = match (&target, &method) {
        (Target::Whoami, _) => Route::Whoami,
        (Target::Admin(_), &Method::GET | &Method::HEAD) => Route::AdminRead,
        (Target::Admin(_), _) => Route::AdminWrite,
        (Target::Unknown, _) => {
            return json_err(404, &herodot::generic(404, None), &[]);
        }
    };
    if let Some(traceparent) = headers.get("traceparent").and_then(|v| v.to_str().ok()) {
        emu.record_traceparent(route, traceparent);
    }
    emu.count(route);
    if let Some(fault) = emu.take_fault(route) {
        if let Some(d) = fault.delay {
            tokio::time::sleep(d).await;
        }
        if let Some(gate) = &fault.gate {
            gate.passed().await;
        }
        if fault.status != 0 {
            return fault_response(&fault);
        }
    }
    match target {
        Target::Whoami => whoami(&emu, &headers, uri.query()),
        Target::Admin(segments) => {
            if let Some(resp) = check_api_key(&emu, &headers) {
                return resp;
            }
            let query: Vec<(String, String)> =
                url::form_urlencoded::parse(uri.query().unwrap_or("").as_bytes())
                    .into_owned()
                    .collect();
            admin(&emu, &method, &uri, &segments, &query, &body)
        }
        Target::Unknown => json_err(404, &herodot::generic(404, None), &[]),
    }
}

fn check_api_key(emu: &Emulator, headers: &HeaderMap) -> Option<Response> {
    let key = emu.inner.config.api_key.as_deref()?;
    let presented = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(bearer);
    if presented == Some(key) {
        None
    } else {
        Some(json_err(401, &herodot::generic(401, None), &[]))
    }
}

/// `session/helper.go`: exactly two space-separated parts, scheme compared case-insensitively.
fn bearer(value: &str) -> Option<&str> {
    let parts: Vec<&str> = value.split(' ').collect();
    match parts.as_slice() {
        [scheme, token] if scheme.eq_ignore_ascii_case("bearer") => Some(token),
        _ => None,
    }
}

// ---------------------------------------------------------------------------------------------
// whoami

fn whoami(emu: &Emulator, headers: &HeaderMap, query: Option<&str>) -> Response {
    let cache_for = emu.inner.config.cacheable_sessions_max_age;
    let store = emu.lock_store();
    let token: Option<String> = headers
        .get("x-session-token")
        .and_then(|v| v.to_str().ok())
        .filter(|t| !t.is_empty())
        .map(str::to_string)
        .or_else(|| {
            // A cookie that does not "decode" (is unknown) falls through to the bearer header,
            // like a securecookie that fails its HMAC check.
            session_cookies(headers, &emu.inner.config.session_cookie_name)
                .into_iter()
                .find_map(|c| store.by_cookie.get(&c))
                .and_then(|sid| store.sessions.get(sid))
                .map(|s| s.token.clone())
        })
        .or_else(|| {
            headers
                .get(header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                .and_then(bearer)
                .filter(|t| !t.is_empty())
                .map(str::to_string)
        });

    let unauthorized = herodot::error_body(
        401,
        None,
        Some("No valid session credentials found in the request."),
        "The request could not be authorized",
    );
    let Some(token) = token else {
        let extra: Vec<(String, String)> = cache_for
            .map(|_| vec![("Ory-Session-Cache-For".to_string(), "60".to_string())])
            .unwrap_or_default();
        return json_err(401, &unauthorized, &extra);
    };
    let at = now();
    let Some(session) = store.session_by_token(&token) else {
        return json_err(401, &unauthorized, &[]);
    };
    let identity = store.identities.get(&session.identity_id);
    let Some(identity) = identity.filter(|i| session.is_active(Some(i), at)) else {
        return json_err(401, &unauthorized, &[]);
    };

    if emu.inner.config.required_aal == RequiredAal::HighestAvailable
        && identity.has_second_factor()
        && session.aal != "aal2"
        && session.aal != "aal3"
    {
        let redirect = format!("{}/self-service/login/browser?aal=aal2", emu.inner.base_url);
        let mut body = herodot::error_body(
            403,
            Some("session_aal2_required"),
            Some(
                "An active session was found but it does not fulfill the requested Authenticator Assurance Level. Please verify yourself with a second factor to resolve this issue.",
            ),
            "Session does not fulfill the requested Authenticator Assurance Level",
        );
        if let Some(err) = body.get_mut("error").and_then(Value::as_object_mut) {
            // herodot orders `details` before `message`; JSON object order is not significant.
            err.insert(
                "details".into(),
                serde_json::json!({ "redirect_browser_to": redirect }),
            );
        }
        if let Some(obj) = body.as_object_mut() {
            obj.insert("redirect_browser_to".into(), Value::String(redirect));
        }
        return json_err(
            403,
            &body,
            &[("Ory-Error-Id".into(), "session_aal2_required".into())],
        );
    }

    // The emulator configures no tokenizer templates, so every template name is unknown, which
    // Kratos reports after the session checks passed.
    let template = url::form_urlencoded::parse(query.unwrap_or("").as_bytes())
        .find(|(k, v)| k == "tokenize_as" && !v.is_empty())
        .map(|(_, v)| v.into_owned());
    if let Some(template) = template {
        let reason = format!("Unable to find tokenizer template \"{template}\".");
        return json_err(400, &herodot::generic(400, Some(&reason)), &[]);
    }

    let json = session.to_json(Some(identity), &emu.inner.base_url, Shape::Public, at);
    let mut extra = vec![(
        "X-Kratos-Authenticated-Identity-Id".to_string(),
        identity.id.to_string(),
    )];
    if let Some(max) = cache_for {
        let left = (session.expires_at - at).num_seconds().max(0);
        let secs = u64::try_from(left).unwrap_or(0).min(max.as_secs());
        extra.push(("Ory-Session-Cache-For".into(), secs.to_string()));
    }
    json_ok(200, &json, &extra)
}

/// Session cookie values in header order: the configured name and Ory Network's `ory_session_*`.
fn session_cookies(headers: &HeaderMap, name: &str) -> Vec<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .filter(|(k, _)| *k == name || k.starts_with("ory_session_"))
        .map(|(_, v)| v.trim_matches('"').to_string())
        .collect()
}

// ---------------------------------------------------------------------------------------------
// admin

fn admin(
    emu: &Emulator,
    method: &Method,
    uri: &Uri,
    segments: &[String],
    query: &[(String, String)],
    body: &Bytes,
) -> Response {
    let segs: Vec<&str> = segments.iter().map(String::as_str).collect();
    let get = *method == Method::GET || *method == Method::HEAD;
    match (segs.as_slice(), method) {
        (["identities"], _) if get => list_identities(emu, uri, query),
        (["identities"], &Method::POST) => create_identity(emu, body),
        (["identities", "by", "external", rest @ ..], _) if get => {
            let external = rest.join("/");
            if external.is_empty() {
                return api_err(ApiError::bad_request("The external ID must not be empty."));
            }
            if let Err(e) = check_include_credential(query) {
                return api_err(e);
            }
            let found = emu
                .lock_store()
                .identities
                .values()
                .find(|i| i.external_id() == Some(external.as_str()))
                .map(|i| i.to_json(&emu.inner.base_url, Shape::Admin));
            match found {
                Some(v) => json_ok(200, &v, &[]),
                None => api_err(ApiError::not_found()),
            }
        }
        (["identities", id], _) if get => {
            if let Err(e) = check_include_credential(query) {
                return api_err(e);
            }
            match Uuid::parse_str(id).ok().and_then(|id| emu.identity(id)) {
                Some(v) => json_ok(200, &v, &[]),
                None => api_err(ApiError::not_found()),
            }
        }
        (["identities", id], &Method::PUT) => update_identity(emu, id, body),
        (["identities", id], &Method::PATCH) => patch_identity(emu, id, body),
        (["identities", id], &Method::DELETE) => {
            match Uuid::parse_str(id)
                .ok()
                .filter(|id| emu.delete_identity(*id))
            {
                Some(_) => empty(204),
                None => api_err(ApiError::not_found()),
            }
        }
        (["identities", id, "sessions"], &Method::DELETE) => {
            let Ok(id) = Uuid::parse_str(id) else {
                return api_err(ApiError::bad_request("Unable to parse the identity ID."));
            };
            let removed = emu.mutate(|s| {
                if !s.identities.contains_key(&id) {
                    return Err(ApiError::not_found());
                }
                let doomed: Vec<Uuid> = s
                    .sessions
                    .values()
                    .filter(|x| x.identity_id == id)
                    .map(|x| x.id)
                    .collect();
                // Kratos' DELETE ... WHERE identity_id reports "no rows" as 404.
                if doomed.is_empty() {
                    return Err(ApiError::not_found());
                }
                for sid in doomed {
                    s.remove_session(sid);
                }
                Ok(())
            });
            match removed {
                Ok(()) => empty(204),
                Err(e) => api_err(e),
            }
        }
        // Kratos' admin port sends whoami callers to the public endpoint.
        (["sessions", "whoami"], _) => respond(
            307,
            None,
            &[(
                "Location".into(),
                format!("{}/sessions/whoami", emu.inner.base_url),
            )],
            Body::empty(),
        ),
        (["sessions", id], _) if get => {
            let Ok(id) = Uuid::parse_str(id) else {
                return api_err(ApiError::bad_request("Unable to parse the session ID."));
            };
            let expand: Vec<&str> = query
                .iter()
                .filter(|(k, _)| k == "expand")
                .map(|(_, v)| v.as_str())
                .collect();
            let store = emu.lock_store();
            let Some(session) = store.sessions.get(&id) else {
                return api_err(ApiError::not_found());
            };
            let identity = store.identities.get(&session.identity_id);
            let mut json = session.to_json(
                identity.filter(|_| expand.contains(&"identity")),
                &emu.inner.base_url,
                Shape::AdminNoCredentials,
                now(),
            );
            // `active` must still reflect the identity state when the identity is not expanded.
            if let Some(obj) = json.as_object_mut() {
                obj.insert(
                    "active".into(),
                    Value::Bool(session.is_active(identity, now())),
                );
                if !expand.contains(&"devices") {
                    obj.remove("devices");
                }
            }
            json_ok(200, &json, &[])
        }
        (["sessions", id], &Method::DELETE) => {
            let Ok(id) = Uuid::parse_str(id) else {
                return api_err(ApiError::bad_request("Unable to parse the session ID."));
            };
            let res = emu.mutate(|s| match s.sessions.get_mut(&id) {
                Some(session) => {
                    session.active = false;
                    Ok(session.identity_id)
                }
                None => Err(ApiError::not_found()),
            });
            match res {
                Ok(_) => empty(204),
                Err(e) => api_err(e),
            }
        }
        _ => json_err(404, &herodot::generic(404, None), &[]),
    }
}

fn check_include_credential(query: &[(String, String)]) -> Result<(), ApiError> {
    for (k, v) in query {
        if k == "include_credential" && !CREDENTIAL_TYPES.contains(&v.as_str()) {
            return Err(ApiError::bad_request(format!(
                "The credential type \"{v}\" is not supported."
            )));
        }
    }
    Ok(())
}

fn parse_size(query: &[(String, String)], key: &str) -> Result<Option<usize>, ApiError> {
    match query.iter().find(|(k, _)| k == key) {
        None => Ok(None),
        Some((_, v)) => v
            .parse::<usize>()
            .ok()
            .filter(|n| (1..=MAX_PAGE_SIZE).contains(n))
            .map(Some)
            .ok_or_else(|| {
                ApiError::bad_request(format!(
                    "{key} must be an integer between 1 and {MAX_PAGE_SIZE}"
                ))
            }),
    }
}

fn list_identities(emu: &Emulator, uri: &Uri, query: &[(String, String)]) -> Response {
    match list_identities_inner(emu, uri, query) {
        Ok((list, link)) => {
            let headers: Vec<(String, String)> = match emu.inner.config.link_header {
                _ if link.is_empty() => Vec::new(),
                LinkHeader::Joined => vec![("Link".to_string(), link.join(","))],
                LinkHeader::Split => link.into_iter().map(|l| ("Link".to_string(), l)).collect(),
            };
            json_ok(200, &Value::Array(list), &headers)
        }
        Err(e) => api_err(e),
    }
}

/// The page and the entries of its `Link` header (none for the unpaginated forms).
fn list_identities_inner(
    emu: &Emulator,
    uri: &Uri,
    query: &[(String, String)],
) -> Result<(Vec<Value>, Vec<String>), ApiError> {
    check_include_credential(query)?;
    let values = |key: &str| -> Vec<&str> {
        query
            .iter()
            .filter(|(k, v)| k == key && !v.is_empty())
            .map(|(_, v)| v.as_str())
            .collect()
    };
    let ids = values("ids");
    let identifier = values("credentials_identifier");
    let similar = values("preview_credentials_identifier_similar");
    let organization = values("organization_id");
    let filters = [&ids, &identifier, &similar, &organization]
        .iter()
        .filter(|f| !f.is_empty())
        .count();
    if filters > 1 {
        return Err(ApiError::bad_request(
            "You cannot combine multiple filters in this API",
        ));
    }
    let base = &emu.inner.base_url;
    let store = emu.lock_store();

    if !ids.is_empty() {
        if ids.len() > MAX_PAGE_SIZE {
            return Err(ApiError::bad_request(format!(
                "You can only query up to {MAX_PAGE_SIZE} identities by ID at once"
            )));
        }
        let mut wanted = Vec::with_capacity(ids.len());
        for id in ids {
            wanted.push(Uuid::parse_str(id).map_err(|_| {
                ApiError::bad_request(format!("Invalid UUID value `{id}` in `ids` parameter"))
            })?);
        }
        let list = wanted
            .iter()
            .filter_map(|id| store.identities.get(id))
            .map(|i| i.to_json(base, Shape::AdminNoCredentials))
            .collect();
        return Ok((list, Vec::new()));
    }

    let page_size = match (
        parse_size(query, "page_size")?,
        parse_size(query, "per_page")?,
    ) {
        (Some(n), _) | (None, Some(n)) => n,
        (None, None) => DEFAULT_PAGE_SIZE,
    };

    let mut matches: Box<dyn Iterator<Item = &crate::store::Identity>> =
        Box::new(store.identities.values());
    let mut shape = Shape::AdminNoCredentials;
    if let Some(needle) = identifier.first() {
        let needle = needle.to_string();
        matches = Box::new(matches.filter(move |i| i.matches_identifier(&needle)));
        shape = Shape::Admin;
    } else if let Some(needle) = similar.first() {
        let needle = needle.to_lowercase();
        matches = Box::new(matches.filter(move |i| i.identifier_contains(&needle)));
        shape = Shape::Admin;
    } else if let Some(org) = organization.first() {
        let org = Uuid::parse_str(org)
            .map_err(|_| ApiError::bad_request("organization_id must be a UUID"))?;
        matches = Box::new(matches.filter(move |i| i.organization_id() == Some(org)));
    }

    // Legacy offset pagination (`page` is zero-based) still works without a Link header.
    if let Some((_, page)) = query.iter().find(|(k, _)| k == "page") {
        let page: usize = page
            .parse()
            .map_err(|_| ApiError::bad_request("page must be a non-negative integer"))?;
        let list = matches
            .skip(page.saturating_mul(page_size))
            .take(page_size)
            .map(|i| i.to_json(base, shape))
            .collect();
        return Ok((list, Vec::new()));
    }

    let token = query
        .iter()
        .find(|(k, _)| k == "page_token")
        .map(|(_, v)| v.as_str())
        .filter(|v| !v.is_empty());
    let after = match token {
        None => Uuid::nil(),
        Some(t) => page_tokens::parse(emu, t)?,
    };
    let mut page: Vec<&crate::store::Identity> = matches
        .filter(|i| i.id > after)
        .take(page_size + 1)
        .collect();
    let has_next = page.len() > page_size;
    page.truncate(page_size);

    let link_for = |rel: &str, token: &str| {
        let mut q = url::form_urlencoded::Serializer::new(String::new());
        // Go's url.Values.Encode sorts keys; keep every other parameter (filters) as sent.
        let mut pairs: Vec<(&str, &str)> = query
            .iter()
            .filter(|(k, _)| k != "page_token" && k != "page_size" && k != "per_page")
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        let size = page_size.to_string();
        pairs.push(("page_size", &size));
        pairs.push(("page_token", token));
        pairs.sort_by(|a, b| a.0.cmp(b.0));
        for (k, v) in pairs {
            q.append_pair(k, v);
        }
        format!("<{}?{}>; rel=\"{rel}\"", uri.path(), q.finish())
    };
    let mut link = vec![link_for("first", &page_tokens::issue(emu, Uuid::nil()))];
    if let Some(last) = page.last().filter(|_| has_next) {
        link.push(link_for("next", &page_tokens::issue(emu, last.id)));
    }
    let list = page.iter().map(|i| i.to_json(base, shape)).collect();
    Ok((list, link))
}

/// `createIdentityBody`, decoded strictly like Kratos' `jsonx.NewStrictDecoder`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateBody {
    #[serde(default)]
    schema_id: String,
    traits: Option<Value>,
    credentials: Option<Value>,
    verifiable_addresses: Option<Vec<Value>>,
    #[allow(dead_code)]
    recovery_addresses: Option<Vec<Value>>,
    metadata_public: Option<Value>,
    metadata_admin: Option<Value>,
    state: Option<String>,
    organization_id: Option<Uuid>,
    external_id: Option<String>,
    region: Option<String>,
}

/// `updateIdentityBody`, decoded strictly.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct UpdateBody {
    #[serde(default)]
    schema_id: String,
    traits: Option<Value>,
    credentials: Option<Value>,
    metadata_public: Option<Value>,
    metadata_admin: Option<Value>,
    #[serde(default)]
    state: String,
    external_id: Option<String>,
    region: Option<String>,
}

fn decode<T: for<'de> Deserialize<'de>>(body: &Bytes) -> Result<T, ApiError> {
    serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("Unable to decode JSON payload: {e}")))
}

fn create_identity(emu: &Emulator, body: &Bytes) -> Response {
    let parsed: CreateBody = match decode(body) {
        Ok(b) => b,
        Err(e) => return api_err(e),
    };
    let input = IdentityInput {
        schema_id: parsed.schema_id,
        traits: parsed.traits.unwrap_or(Value::Null),
        state: parsed.state,
        external_id: parsed.external_id,
        metadata_public: parsed.metadata_public.unwrap_or(Value::Null),
        metadata_admin: parsed.metadata_admin.unwrap_or(Value::Null),
        organization_id: parsed.organization_id,
        region: parsed.region,
        credentials: parsed.credentials,
        extra_identifiers: Vec::new(),
        second_factor: false,
        verifiable_addresses: parsed.verifiable_addresses.unwrap_or_default(),
    };
    match emu.try_create(input) {
        Ok(v) => {
            let location = format!(
                "{}/admin/identities/{}",
                emu.inner.admin_base_url,
                v["id"].as_str().unwrap_or_default()
            );
            json_ok(201, &v, &[("Location".into(), location)])
        }
        Err(e) => api_err(e),
    }
}

fn update_identity(emu: &Emulator, id: &str, body: &Bytes) -> Response {
    let Ok(id) = Uuid::parse_str(id) else {
        return api_err(ApiError::not_found());
    };
    let parsed: UpdateBody = match decode(body) {
        Ok(b) => b,
        Err(e) => return api_err(e),
    };
    let input = UpdateInput {
        schema_id: parsed.schema_id,
        state: parsed.state,
        traits: parsed.traits.unwrap_or(Value::Null),
        metadata_public: parsed.metadata_public.unwrap_or(Value::Null),
        metadata_admin: parsed.metadata_admin.unwrap_or(Value::Null),
        external_id: parsed.external_id,
        region: parsed.region,
        credentials: parsed.credentials,
    };
    match emu.mutate(|s| s.update_identity(id, input)) {
        Ok(()) => identity_or_404(emu, id),
        Err(e) => api_err(e),
    }
}

fn patch_identity(emu: &Emulator, id: &str, body: &Bytes) -> Response {
    let Ok(id) = Uuid::parse_str(id) else {
        return api_err(ApiError::not_found());
    };
    let patch: Value = match decode(body) {
        Ok(b) => b,
        Err(e) => return api_err(e),
    };
    let base = emu.inner.base_url.clone();
    match emu.mutate(|s| s.patch_identity(id, &base, &patch)) {
        Ok(()) => identity_or_404(emu, id),
        Err(e) => api_err(e),
    }
}

fn identity_or_404(emu: &Emulator, id: Uuid) -> Response {
    match emu.identity(id) {
        Some(v) => json_ok(200, &v, &[]),
        None => api_err(ApiError::not_found()),
    }
}
