//! The gateway protocols: Envoy's ext_authz `Check` through a generated ext_authz client, and the
//! HTTP forward-auth route, for each decision.

use std::collections::HashMap;

use envoy_types::ext_authz::v3::pb::{CheckRequest, CheckResponse, HttpResponse};
use envoy_types::pb::envoy::service::auth::v3::AttributeContext;
use envoy_types::pb::envoy::service::auth::v3::attribute_context::{HttpRequest, Request};
use envoy_types::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient;
use idmap::proto::api::{
    RemoveExternalIdRequest, SetExternalIdRequest, remove_external_id_request,
    set_external_id_request,
};
use kratos_emulator::{Fault, NewIdentity, NewSession, Route};
use serde_json::json;

use crate::common::*;

const LOGIN: &str = "https://accounts.example.com/login";

/// A request as Envoy describes it to ext_authz: its headers, lower-cased.
fn envoy_request(headers: &[(&str, &str)]) -> CheckRequest {
    CheckRequest {
        attributes: Some(AttributeContext {
            request: Some(Request {
                http: Some(HttpRequest {
                    method: "GET".into(),
                    path: "/orders".into(),
                    host: "shop.example.com".into(),
                    headers: headers
                        .iter()
                        .map(|(k, v)| (k.to_string(), v.to_string()))
                        .collect(),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }),
    }
}

async fn check(env: &Env, headers: &[(&str, &str)]) -> CheckResponse {
    AuthorizationClient::new(channel(env.server.addr).await)
        .check(envoy_request(headers))
        .await
        .expect("Check answers every decision with OK at the gRPC level")
        .into_inner()
}

/// An allowed Check's headers to set and to remove.
fn allowed(response: &CheckResponse) -> (HashMap<String, String>, Vec<String>) {
    assert_eq!(response.status.as_ref().unwrap().code, 0, "{response:?}");
    let Some(HttpResponse::OkResponse(ok)) = &response.http_response else {
        panic!("not allowed: {response:?}")
    };
    let set = ok
        .headers
        .iter()
        .map(|h| {
            let h = h.header.as_ref().unwrap();
            (h.key.clone(), h.value.clone())
        })
        .collect();
    (set, ok.headers_to_remove.clone())
}

/// A denied Check's HTTP status and response headers.
fn denied(response: &CheckResponse) -> (i32, HashMap<String, String>) {
    let Some(HttpResponse::DeniedResponse(denied)) = &response.http_response else {
        panic!("not denied: {response:?}")
    };
    assert_ne!(response.status.as_ref().unwrap().code, 0);
    let headers = denied
        .headers
        .iter()
        .map(|h| {
            let h = h.header.as_ref().unwrap();
            (h.key.clone(), h.value.clone())
        })
        .collect();
    (denied.status.as_ref().unwrap().code, headers)
}

fn cookie_of(session: &kratos_emulator::CreatedSession) -> String {
    format!("theme=dark; ory_kratos_session={}", session.cookie)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_allows_a_session_with_the_users_headers_and_strips_forged_ones() {
    let env = Env::new().await;
    let (identity, session) = env.customer("gw@example.com");
    let cookie = cookie_of(&session);

    let (set, remove) = allowed(
        &check(
            &env,
            &[
                ("cookie", &cookie),
                ("x-user-id", "forged"),
                ("x-user-external-id-crm", "forged"),
                ("x-user-agent-ish", "kept"),
            ],
        )
        .await,
    );
    let user = env.db.user_of(identity).await.to_string();
    assert_eq!(set["x-user-id"], user, "linked just in time");
    assert_eq!(set["x-ory-identity-id"], identity.to_string());
    assert_eq!(set["x-ory-session-id"], session.id.to_string());
    assert_eq!(set["x-ory-aal"], "aal1");
    assert_eq!(set["x-user-state"], "active");
    let mut remove = remove;
    remove.sort();
    assert_eq!(remove, ["x-user-external-id-crm", "x-user-id"]);

    // Business ids: the default namespace's and one per namespace.
    let mut client = env.client();
    for (namespace, value) in [("", "crm-1"), ("billing", "cus_müller")] {
        client
            .set_external_id(SetExternalIdRequest {
                subject: Some(set_external_id_request::Subject::OryIdentityId(
                    identity.to_string(),
                )),
                namespace: namespace.into(),
                value: value.into(),
                replace: false,
            })
            .await
            .unwrap();
    }
    // The session's cached answer was made before the ids were: the next request of the same
    // session carries them, and a removed one is gone from the one after.
    let (set, _) = allowed(&check(&env, &[("cookie", &cookie)]).await);
    assert_eq!(set["x-user-external-id"], "crm-1");
    assert_eq!(set["x-user-external-id-billing"], "cus_m%C3%BCller");
    client
        .remove_external_id(RemoveExternalIdRequest {
            subject: Some(remove_external_id_request::Subject::OryIdentityId(
                identity.to_string(),
            )),
            namespace: "billing".into(),
        })
        .await
        .unwrap();
    let (set, _) = allowed(&check(&env, &[("cookie", &cookie)]).await);
    assert_eq!(set["x-user-external-id"], "crm-1");
    assert!(!set.contains_key("x-user-external-id-billing"), "{set:?}");
    client
        .set_external_id(SetExternalIdRequest {
            subject: Some(set_external_id_request::Subject::OryIdentityId(
                identity.to_string(),
            )),
            namespace: "billing".into(),
            value: "cus_müller".into(),
            replace: false,
        })
        .await
        .unwrap();
    // A Bearer token and X-Session-Token are sessions too.
    for headers in [
        vec![("authorization", format!("Bearer {}", session.token))],
        vec![("x-session-token", session.token.clone())],
    ] {
        let headers: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let (set, _) = allowed(&check(&env, &headers).await);
        assert_eq!(set["x-user-id"], user);
        assert_eq!(set["x-user-external-id"], "crm-1");
        assert_eq!(set["x-user-external-id-billing"], "cus_m%C3%BCller");
    }
}

/// With `encode_raw_headers`, Envoy sends the headers as a list, values in `raw_value`, and a
/// browser's cookies may come as several `cookie` headers (HTTP/2 lets it split them).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_reads_envoys_raw_header_list_and_split_cookies() {
    use envoy_types::pb::envoy::config::core::v3::{HeaderMap, HeaderValue};
    let env = Env::new().await;
    let (identity, session) = env.customer("raw@example.com");
    let raw = |key: &str, value: &str| HeaderValue {
        key: key.into(),
        raw_value: value.as_bytes().to_vec(),
        ..Default::default()
    };
    let request = CheckRequest {
        attributes: Some(AttributeContext {
            request: Some(Request {
                http: Some(HttpRequest {
                    method: "GET".into(),
                    path: "/orders".into(),
                    header_map: Some(HeaderMap {
                        headers: vec![
                            raw("cookie", "theme=dark"),
                            raw("x-user-id", "forged"),
                            raw("cookie", &format!("ory_kratos_session={}", session.cookie)),
                        ],
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }),
    };
    let response = AuthorizationClient::new(channel(env.server.addr).await)
        .check(request)
        .await
        .unwrap()
        .into_inner();
    let (set, remove) = allowed(&response);
    assert_eq!(set["x-ory-identity-id"], identity.to_string());
    assert_eq!(set["x-user-id"], env.db.user_of(identity).await.to_string());
    assert_eq!(remove, ["x-user-id"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_refuses_missing_and_invalid_sessions_and_sends_browsers_to_log_in() {
    let env = Env::with(|c| c.gateway.login_url = Some(LOGIN.parse().unwrap())).await;
    let html = ("accept", "text/html,application/xhtml+xml");

    // No session: 401 for an API client, 303 to the login page for a browser.
    assert_eq!(denied(&check(&env, &[]).await).0, 401);
    assert_eq!(
        denied(&check(&env, &[("cookie", "theme=dark")]).await).0,
        401
    );
    let (status, headers) = denied(&check(&env, &[html]).await);
    assert_eq!((status, headers["location"].as_str()), (303, LOGIN));

    // A Bearer token of another kind is not an Ory session.
    assert_eq!(
        denied(&check(&env, &[("authorization", "Bearer eyJhbGciOi.x.y")]).await).0,
        401
    );
    // Unknown or revoked sessions.
    assert_eq!(
        denied(&check(&env, &[("x-session-token", "ory_st_nope")]).await).0,
        401
    );
    let (_, session) = env.customer("revoked@example.com");
    env.ory.revoke_session(session.id);
    let (status, headers) = denied(&check(&env, &[("cookie", &cookie_of(&session)), html]).await);
    assert_eq!((status, headers["location"].as_str()), (303, LOGIN));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anonymous_requests_pass_when_allowed_but_invalid_sessions_never_do() {
    let env = Env::with(|c| c.gateway.allow_anonymous = true).await;
    let (set, remove) = allowed(&check(&env, &[("x-user-id", "forged")]).await);
    assert!(
        set.is_empty(),
        "no identity headers for an anonymous request"
    );
    assert_eq!(remove, ["x-user-id"]);
    assert_eq!(
        denied(&check(&env, &[("x-session-token", "ory_st_nope")]).await).0,
        401
    );
    let (_, session) = env.customer("anon@example.com");
    let (set, _) = allowed(&check(&env, &[("x-session-token", &session.token)]).await);
    assert!(set.contains_key("x-user-id"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_answers_403_or_the_step_up_redirect_when_the_aal_is_too_low() {
    let env = Env::new().await;
    let created = env.ory.create_identity(NewIdentity {
        schema_id: "employee".into(),
        traits: json!({"email": "gw-mfa@example.com"}),
        identifiers: vec!["gw-mfa@example.com".into()],
        second_factor: true,
        ..NewIdentity::default()
    });
    let session = env
        .ory
        .create_session(id_of(&created), NewSession::default());
    let (status, _) = denied(&check(&env, &[("x-session-token", &session.token)]).await);
    assert_eq!(status, 403);
    let (status, headers) = denied(
        &check(
            &env,
            &[("cookie", &cookie_of(&session)), ("accept", "text/html")],
        )
        .await,
    );
    assert_eq!(status, 303);
    assert!(headers["location"].contains("aal=aal2"), "{headers:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_answers_503_with_retry_after_when_ory_is_down_never_401() {
    let env = Env::new().await;
    let (_, session) = env.customer("gw-down@example.com");
    env.ory.inject_fault(Route::Whoami, Fault::status(503));
    let (status, headers) = denied(&check(&env, &[("x-session-token", &session.token)]).await);
    assert_eq!(status, 503);
    assert!(headers.contains_key("retry-after"), "{headers:?}");
    env.ory.clear_faults();
    env.ory.inject_fault(Route::Whoami, Fault::rate_limited(7));
    let (_, other) = env.customer("gw-limited@example.com");
    let (status, headers) = denied(&check(&env, &[("x-session-token", &other.token)]).await);
    assert_eq!((status, headers["retry-after"].as_str()), (503, "7"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_session_costs_one_whoami_however_many_requests_it_makes() {
    let env = Env::new().await;
    let (_, session) = env.customer("gw-many@example.com");
    env.ory.reset_calls();
    let cookie = cookie_of(&session);
    for _ in 0..50 {
        allowed(&check(&env, &[("cookie", &cookie)]).await);
    }
    assert_eq!(env.ory.calls(Route::Whoami), 1);
}

async fn forward_auth(env: &Env, headers: &[(&str, &str)]) -> reqwest::Response {
    let mut request = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
        .get(format!("http://{}/gateway/auth", env.server.http_addr));
    for (k, v) in headers {
        request = request.header(*k, *v);
    }
    request.send().await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forward_auth_makes_the_same_decisions_over_http() {
    let env = Env::with(|c| c.gateway.login_url = Some(LOGIN.parse().unwrap())).await;
    let (identity, session) = env.customer("fwd@example.com");

    let ok = forward_auth(&env, &[("cookie", &cookie_of(&session))]).await;
    assert_eq!(ok.status(), 200);
    let user = env.db.user_of(identity).await.to_string();
    assert_eq!(ok.headers()["x-user-id"], user.as_str());
    assert_eq!(
        ok.headers()["x-ory-identity-id"],
        identity.to_string().as_str()
    );
    assert_eq!(ok.headers()["x-user-state"], "active");

    assert_eq!(forward_auth(&env, &[]).await.status(), 401);
    let browser = forward_auth(&env, &[("accept", "text/html")]).await;
    assert_eq!(browser.status(), 303);
    assert_eq!(browser.headers()["location"], LOGIN);
    assert_eq!(
        forward_auth(&env, &[("x-session-token", "ory_st_nope")])
            .await
            .status(),
        401
    );
    env.ory.inject_fault(Route::Whoami, Fault::status(502));
    let (_, other) = env.customer("fwd-down@example.com");
    let down = forward_auth(
        &env,
        &[("authorization", &format!("Bearer {}", other.token))],
    )
    .await;
    assert_eq!(down.status(), 503);
    assert!(down.headers().contains_key("retry-after"));
}

/// What Oathkeeper's hydrator mutator POSTs after its `cookie_session` authenticator (with the
/// default `subject_from: identity.id` and `extra_from: "@this"`: the whoami session as extra).
fn oathkeeper_session(identity: &str, session_id: &str) -> serde_json::Value {
    json!({
        "subject": identity,
        "extra": {
            "id": session_id,
            "active": true,
            "identity": {"id": identity, "schema_id": "customer", "traits": {"email": "x@example.com"}}
        },
        "header": null,
        "match_context": {
            "regexp_capture_groups": ["orders"],
            "url": {
                "Scheme": "https", "Opaque": "", "User": null, "Host": "shop.example.com",
                "Path": "/orders", "RawPath": "", "ForceQuery": false, "RawQuery": "page=2",
                "Fragment": "", "RawFragment": ""
            },
            "method": "GET",
            "header": {"Accept": ["text/html"], "Cookie": ["ory_kratos_session=abc"]}
        }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_oathkeeper_hydrator_adds_the_user_without_asking_ory() {
    let env = Env::new().await;
    let (identity, session) = env.customer("oathkeeper@example.com");
    let mut client = env.client();
    let user = client
        .link_identity(link_with(identity, "", "crm-77"))
        .await
        .unwrap()
        .into_inner()
        .user
        .unwrap();
    client
        .set_external_id(SetExternalIdRequest {
            subject: Some(set_external_id_request::Subject::UserId(user.id.clone())),
            namespace: "billing".into(),
            value: "cus_77".into(),
            replace: false,
        })
        .await
        .unwrap();
    env.db
        .wait_for_outbox("SELECT count(*) FROM ory_outbox", 0)
        .await;
    env.ory.reset_calls();
    let http = reqwest::Client::new();
    let url = format!("http://{}/gateway/oathkeeper/hydrate", env.server.http_addr);
    let sent = oathkeeper_session(&identity.to_string(), &session.id.to_string());

    let answer = http.post(&url).json(&sent).send().await.unwrap();
    assert_eq!(answer.status(), 200);
    let hydrated: serde_json::Value = answer.json().await.unwrap();
    assert_eq!(hydrated["extra"]["idmap"]["id"], user.id.as_str());
    assert_eq!(hydrated["extra"]["idmap"]["state"], "active");
    assert_eq!(hydrated["extra"]["idmap"]["external_id"], "crm-77");
    assert_eq!(
        hydrated["extra"]["idmap"]["external_ids"],
        json!({"": "crm-77", "billing": "cus_77"})
    );
    // Everything Oathkeeper sent comes back as it was.
    let mut without_idmap = hydrated.clone();
    without_idmap["extra"]
        .as_object_mut()
        .unwrap()
        .remove("idmap");
    assert_eq!(without_idmap, sent);
    for route in [Route::Whoami, Route::AdminRead, Route::AdminWrite] {
        assert_eq!(env.ory.calls(route), 0, "{route:?}");
    }

    // No user linked: 404, so Oathkeeper refuses the request instead of forwarding it unnamed.
    let stranger = identity_of_new_customer(&env);
    let answer = http
        .post(&url)
        .json(&oathkeeper_session(&stranger, "s"))
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 404);
    // Not a session, or a subject that is not an identity id: 400.
    for bad in [
        json!([1, 2]),
        json!({"subject": "guest"}),
        json!({"subject": 7}),
    ] {
        let answer = http.post(&url).json(&bad).send().await.unwrap();
        assert_eq!(answer.status(), 400, "{bad}");
    }
    // No subject (Oathkeeper's anonymous authenticator with an empty subject): unchanged.
    let anonymous = json!({"subject": "", "extra": {}});
    let answer: serde_json::Value = http
        .post(&url)
        .json(&anonymous)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(answer, anonymous);
}

fn identity_of_new_customer(env: &Env) -> String {
    identity(&env.ory, "customer", "not-linked@example.com").to_string()
}

/// Test-only keys (`openssl genpkey`): a P-256 key that signs, and an Ed25519 key still published
/// for tokens signed before a rotation.
const P256_KEY: &str = "-----BEGIN PRIVATE KEY-----
MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQgrFayhrTVvLR5cL3v
3oY5UweUHg0lwTyRYdbYmolTtEKhRANCAAQ5O1fScaf3gG77+oVfAVNQujeBnmXo
h3uIPPZzR4SvPjwGfx9eYCMbZhfWlmq5nmsiL69d/dOINlaK39fn0x/7
-----END PRIVATE KEY-----
";
const ED25519_KEY: &str = "-----BEGIN PRIVATE KEY-----
MC4CAQAwBQYDK2VwBCIEIOSCPl4K2iHIjFiRZALEWXruIPeH1SXxCYqbjvuvDHSC
-----END PRIVATE KEY-----
";

async fn served_jwks(env: &Env) -> serde_json::Value {
    let answer = reqwest::get(format!(
        "http://{}/.well-known/jwks.json",
        env.server.http_addr
    ))
    .await
    .unwrap();
    assert_eq!(answer.status(), 200);
    answer.json().await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allowed_requests_carry_an_assertion_that_verifies_against_the_served_jwks() {
    use idmap::assertion::{AssertionError, verify};
    use idmap::proto::api::ResolveSessionRequest;
    use idmap::proto::api::resolve_session_request::Credential;
    let env = Env::with(|c| {
        c.assertion_keys = Some(format!("{P256_KEY}{ED25519_KEY}").into());
        c.cache.session_ttl = std::time::Duration::from_secs(120);
    })
    .await;
    let (identity, session) = env.customer("asserted@example.com");
    let jwks = served_jwks(&env).await;
    assert_eq!(
        jwks["keys"].as_array().unwrap().len(),
        2,
        "both keys are published"
    );
    assert_eq!(jwks["keys"][0]["alg"], "ES256", "the first key signs");

    let (set, remove) = allowed(
        &check(
            &env,
            &[
                ("x-session-token", &session.token),
                ("x-idmap-assertion", "forged"),
            ],
        )
        .await,
    );
    assert_eq!(remove, ["x-idmap-assertion"]);
    let assertion = &set["x-idmap-assertion"];
    let now = chrono::Utc::now();
    let claims = verify(&jwks, assertion, now).expect("the assertion verifies");
    let user = env.db.user_of(identity).await.to_string();
    assert_eq!(claims.sub, user);
    assert_eq!(claims.ory_identity_id, identity.to_string());
    assert_eq!(claims.ory_session_id, session.id.to_string());
    assert_eq!(claims.iss, "idmap");
    // Valid no longer than idmap serves its cached answer for the session.
    assert!(
        claims.exp <= (now + chrono::Duration::seconds(121)).timestamp(),
        "{claims:?}"
    );
    assert!(claims.exp > now.timestamp());

    // Tampered: another user's id in the payload, or a changed signature.
    let parts: Vec<&str> = assertion.split('.').collect();
    use base64::Engine;
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let mut payload: serde_json::Value =
        serde_json::from_slice(&b64.decode(parts[1]).unwrap()).unwrap();
    payload["sub"] = json!(uuid::Uuid::new_v4().to_string());
    let forged = format!(
        "{}.{}.{}",
        parts[0],
        b64.encode(serde_json::to_vec(&payload).unwrap()),
        parts[2]
    );
    assert!(matches!(
        verify(&jwks, &forged, now),
        Err(AssertionError::BadSignature)
    ));
    let mut signature = b64.decode(parts[2]).unwrap();
    signature[0] ^= 1;
    let resigned = format!("{}.{}.{}", parts[0], parts[1], b64.encode(signature));
    assert!(verify(&jwks, &resigned, now).is_err());
    // Past its exp it no longer verifies.
    assert!(verify(&jwks, assertion, now + chrono::Duration::seconds(600)).is_err());

    // The same assertion is reused while the cached answer and the user are unchanged, and a
    // change to the user's ids is in the next one.
    let (again, _) = allowed(&check(&env, &[("x-session-token", &session.token)]).await);
    assert_eq!(&again["x-idmap-assertion"], assertion);
    env.client()
        .set_external_id(SetExternalIdRequest {
            subject: Some(set_external_id_request::Subject::OryIdentityId(
                identity.to_string(),
            )),
            namespace: "crm".into(),
            value: "c-9".into(),
            replace: false,
        })
        .await
        .unwrap();
    let (changed, _) = allowed(&check(&env, &[("x-session-token", &session.token)]).await);
    let claims = verify(&jwks, &changed["x-idmap-assertion"], chrono::Utc::now()).unwrap();
    assert_eq!(claims.external_ids["crm"], "c-9");
    assert_eq!(changed["x-user-external-id-crm"], "c-9");

    // ResolveSession returns it when asked, and only then.
    let mut client = env.client();
    let asked = client
        .resolve_session(ResolveSessionRequest {
            credential: Some(Credential::SessionToken(session.token.clone())),
            include_assertion: true,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        verify(&jwks, &asked.assertion, chrono::Utc::now())
            .unwrap()
            .sub,
        user
    );
    let plain = client
        .resolve_session(token(&session.token))
        .await
        .unwrap()
        .into_inner();
    assert!(plain.assertion.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_an_assertion_key_no_assertion_is_made_and_no_jwks_served() {
    let env = Env::new().await;
    let (_, session) = env.customer("unsigned@example.com");
    let (set, _) = allowed(&check(&env, &[("x-session-token", &session.token)]).await);
    assert!(!set.contains_key("x-idmap-assertion"));
    let answer = reqwest::get(format!(
        "http://{}/.well-known/jwks.json",
        env.server.http_addr
    ))
    .await
    .unwrap();
    assert_eq!(answer.status(), 404);
}
