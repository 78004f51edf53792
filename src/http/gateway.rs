//! `GET /gateway/auth`: HTTP forward-auth for nginx `auth_request`, Traefik ForwardAuth, Caddy
//! `forward_auth` and Envoy's HTTP ext_authz mode. The proxy sends the client's request headers;
//! the answer is the gateway's decision: 200 with the identity headers for the proxy to copy onto
//! the upstream request, or the refusal (401, 303 to the login page, 403, 503 with Retry-After).
//! And `POST /gateway/oathkeeper/hydrate`, Oathkeeper's hydrator mutator.

use std::sync::Arc;

use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use bytes::Bytes;

use crate::auth::{Access, CallerPolicy, Denied, Evidence, GATEWAY_KEY_HEADER};
use crate::gateway::{Gateway, HydrateError, Presented, Verdict};

/// The largest authentication session the hydrator reads: Oathkeeper's holds the request's
/// headers and the authenticator's extra data, far below this.
const MAX_SESSION_BYTES: usize = 256 * 1024;

/// The gateway routes, behind the callers file where one is in use (a gateway is a caller
/// granted the route's path, presenting its key in `x-idmap-api-key`), and the public JWKS.
pub fn router(gateway: Arc<Gateway>, policy: Arc<CallerPolicy>) -> Router {
    let gated = Router::new()
        .route("/gateway/auth", get(forward_auth))
        .route(
            "/gateway/oathkeeper/hydrate",
            post(hydrate).layer(DefaultBodyLimit::max(MAX_SESSION_BYTES)),
        )
        .layer(middleware::from_fn(move |request: Request, next: Next| {
            authorize(policy.clone(), request, next)
        }));
    Router::new()
        .route("/.well-known/jwks.json", get(jwks))
        .merge(gated)
        .with_state(gateway)
}

/// Lets a gateway route's request through only for a caller the policy grants that route. A
/// refusal is a 403 either way (an unknown caller or one without the grant): a 401 would read to
/// nginx as "no session" and send the user to log in, while this is the operator's to fix.
async fn authorize(policy: Arc<CallerPolicy>, request: Request, next: Next) -> Response {
    let key = request
        .headers()
        .get(GATEWAY_KEY_HEADER)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let path = request.uri().path().to_owned();
    let evidence = || Evidence {
        api_key: key.as_deref(),
        ..Evidence::default()
    };
    match policy.authorize(Access::Rpc(&path), evidence) {
        Ok(_) => next.run(request).await,
        Err(denied) => {
            let reason = match &denied {
                Denied::Unauthenticated { .. } => "CALLER_UNAUTHENTICATED",
                Denied::NotAllowed { .. } => "CALLER_NOT_ALLOWED",
            };
            tracing::warn!(
                path,
                reason,
                "gateway route refused: the caller is not granted it"
            );
            (
                StatusCode::FORBIDDEN,
                format!(
                    "{reason}: this gateway is not a caller granted {path} (see IDMAP_CALLERS)"
                ),
            )
                .into_response()
        }
    }
}

/// `POST /gateway/oathkeeper/hydrate`: Oathkeeper's hydrator mutator. 200 with the session and
/// `extra.idmap`; 404 when no user is linked to the subject (Oathkeeper then refuses the
/// request rather than forward it without a user); 400 for a body that is not a session; 503
/// when the store is unavailable.
async fn hydrate(State(gateway): State<Arc<Gateway>>, body: Bytes) -> Response {
    let error = |status: StatusCode, message: String| {
        (
            status,
            Json(serde_json::json!({"error": {"code": status.as_u16(), "message": message}})),
        )
            .into_response()
    };
    let session: serde_json::Value = match serde_json::from_slice(&body) {
        Ok(session) => session,
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                format!("the body is not JSON: {e}"),
            );
        }
    };
    match gateway.hydrate(session).await {
        Ok(session) => Json(session).into_response(),
        Err(e @ HydrateError::BadSession(_)) => error(StatusCode::BAD_REQUEST, e.to_string()),
        Err(e @ HydrateError::NotLinked(_)) => error(StatusCode::NOT_FOUND, e.to_string()),
        Err(HydrateError::Failed(e)) => {
            tracing::warn!(error = %e, "hydrator: cannot read the user");
            let mut response = error(
                StatusCode::SERVICE_UNAVAILABLE,
                "the user store is unavailable; retry".into(),
            );
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            response
        }
    }
}

/// The public keys of signed identity assertions; 404 when the server signs none.
async fn jwks(State(gateway): State<Arc<Gateway>>) -> Response {
    match gateway.jwks() {
        // Upstreams may cache the keys briefly; a rotation publishes the new key before it signs.
        Some(keys) => (
            [(
                header::CACHE_CONTROL,
                HeaderValue::from_static("max-age=300"),
            )],
            Json(keys),
        )
            .into_response(),
        None => (
            StatusCode::NOT_FOUND,
            "this server signs no assertions (IDMAP_ASSERTION_KEY is unset)",
        )
            .into_response(),
    }
}

async fn forward_auth(State(gateway): State<Arc<Gateway>>, headers: HeaderMap) -> Response {
    let text = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    // A browser may split its cookies over several headers (HTTP/2); they are one list.
    let cookies: Vec<&str> = headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .collect();
    let cookie = cookies.join("; ");
    let presented = Presented {
        cookie: (!cookie.is_empty()).then_some(cookie.as_str()),
        authorization: text("authorization"),
        session_token: text("x-session-token"),
        accept: text("accept"),
    };
    match gateway.decide(&presented).await {
        Verdict::Allow(allowed) => {
            (StatusCode::OK, header_map(gateway.headers(&allowed))).into_response()
        }
        Verdict::Deny {
            status,
            headers,
            body,
        } => (
            StatusCode::from_u16(status).unwrap_or(StatusCode::SERVICE_UNAVAILABLE),
            header_map(headers),
            body,
        )
            .into_response(),
    }
}

/// The verdict's headers as response headers; a name or value HTTP cannot carry is left out
/// (names come from the validated prefix and namespaces, values are escaped, so none is).
fn header_map(headers: Vec<(String, String)>) -> HeaderMap {
    let mut map = HeaderMap::with_capacity(headers.len());
    for (name, value) in headers {
        if let (Ok(name), Ok(value)) = (
            HeaderName::try_from(name.as_str()),
            HeaderValue::try_from(value.as_str()),
        ) {
            map.insert(name, value);
        }
    }
    map
}
