//! Contract behaviours of the emulator, exercised over real HTTP (`spec/ory/CONTRACT.md` sections a and b).

// Test helpers fail the test by panicking, like the #[test] bodies they serve.
#![allow(clippy::unwrap_used)]

use std::{collections::HashSet, time::Duration};

use kratos_emulator::{
    Emulator, EmulatorConfig, Fault, Gate, LinkHeader, NewIdentity, NewSession, PageTokens,
    RequiredAal, Route,
};
use reqwest::{Client, Method, StatusCode};
use serde_json::{Value, json};
use uuid::Uuid;

/// In this workspace reqwest is built with rustls but no bundled crypto provider (idmap installs
/// ring's); the tests install it too before building a client.
fn client_builder() -> reqwest::ClientBuilder {
    let _ = rustls::crypto::ring::default_provider().install_default();
    Client::builder()
}

const NO_SESSION_401: &str = r#"{"error":{"code":401,"status":"Unauthorized","reason":"No valid session credentials found in the request.","message":"The request could not be authorized"}}"#;

async fn start(config: EmulatorConfig) -> (Emulator, Client) {
    let emu = Emulator::start("127.0.0.1:0".parse().unwrap(), config)
        .await
        .unwrap();
    (emu, client_builder().build().unwrap())
}

async fn start_default() -> (Emulator, Client) {
    start(EmulatorConfig::default()).await
}

fn person(email: &str) -> NewIdentity {
    NewIdentity {
        schema_id: "customer".into(),
        traits: json!({"email": email, "name": {"first": "A", "last": "B"}}),
        ..NewIdentity::default()
    }
}

fn id_of(v: &Value) -> Uuid {
    Uuid::parse_str(v["id"].as_str().unwrap()).unwrap()
}

async fn json_body(res: reqwest::Response) -> Value {
    res.json().await.unwrap()
}

fn header<'a>(res: &'a reqwest::Response, name: &str) -> Option<&'a str> {
    res.headers().get(name).map(|v| v.to_str().unwrap())
}

// ----------------------------------------------------------------------------------------------
// whoami

#[tokio::test]
async fn whoami_without_credentials_is_exact_401() {
    let (emu, http) = start_default().await;
    let res = http
        .get(format!("{}/sessions/whoami", emu.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(header(&res, "content-type"), Some("application/json"));
    assert!(header(&res, "ory-session-cache-for").is_none());
    assert!(header(&res, "x-kratos-authenticated-identity-id").is_none());
    assert_eq!(res.text().await.unwrap(), NO_SESSION_401);
    emu.shutdown().await;
}

#[tokio::test]
async fn whoami_token_sources_and_precedence() {
    let (emu, http) = start_default().await;
    let id = id_of(&emu.create_identity(person("a@example.com")));
    let s = emu.create_session(id, NewSession::default());
    let url = format!("{}/sessions/whoami", emu.url());
    let ok = |r: &reqwest::Response| r.status() == StatusCode::OK;

    // X-Session-Token wins over a bad bearer.
    let r = http
        .get(&url)
        .header("X-Session-Token", &s.token)
        .header("Authorization", "Bearer nonsense")
        .send()
        .await
        .unwrap();
    assert!(ok(&r));
    // ... and a bad X-Session-Token is not rescued by a good bearer.
    let r = http
        .get(&url)
        .header("X-Session-Token", "ory_st_bad")
        .header("Authorization", format!("Bearer {}", s.token))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(r.text().await.unwrap(), NO_SESSION_401);

    // Cookie, among other cookies, by the configured name and by the Ory Network prefix.
    for cookie in [
        format!("theme=dark; ory_kratos_session={}; csrf=x", s.cookie),
        format!("ory_session_myprojectslug={}", s.cookie),
    ] {
        let r = http
            .get(&url)
            .header("Cookie", cookie)
            .send()
            .await
            .unwrap();
        assert!(ok(&r));
    }
    // The cookie value is not the token.
    let r = http
        .get(&url)
        .header("Cookie", format!("ory_kratos_session={}", s.token))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    // A cookie that does not decode falls through to the bearer header.
    let r = http
        .get(&url)
        .header("Cookie", "ory_kratos_session=garbage")
        .header("Authorization", format!("Bearer {}", s.token))
        .send()
        .await
        .unwrap();
    assert!(ok(&r));
    // Unrelated cookies only: no credentials.
    let r = http
        .get(&url)
        .header("Cookie", "other=1")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);

    // Bearer: scheme case-insensitive, exactly two parts.
    let r = http
        .get(&url)
        .header("Authorization", format!("bEaReR {}", s.token))
        .send()
        .await
        .unwrap();
    assert!(ok(&r));
    for bad in [
        format!("Bearer {} extra", s.token),
        format!("Bearer  {}", s.token),
        format!("Basic {}", s.token),
        s.token.clone(),
    ] {
        let r = http
            .get(&url)
            .header("Authorization", bad)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    }
    emu.shutdown().await;
}

#[tokio::test]
async fn whoami_200_body_and_headers_for_every_method() {
    let (emu, http) = start_default().await;
    let identity = emu.create_identity(NewIdentity {
        external_id: Some("ext-1".into()),
        metadata_public: Some(json!({"id": "u-1"})),
        metadata_admin: Some(json!({"secret": true})),
        ..person("b@example.com")
    });
    let id = id_of(&identity);
    let s = emu.create_session(id, NewSession::default());
    for method in ["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "HEAD"] {
        let res = http
            .request(
                Method::from_bytes(method.as_bytes()).unwrap(),
                format!("{}/sessions/whoami", emu.url()),
            )
            .header("X-Session-Token", &s.token)
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), StatusCode::OK, "{method}");
        assert_eq!(
            header(&res, "x-kratos-authenticated-identity-id"),
            Some(id.to_string().as_str())
        );
        assert_eq!(
            header(&res, "content-type"),
            Some("application/json; charset=utf-8")
        );
        if method == "HEAD" {
            continue;
        }
        let body = json_body(res).await;
        assert_eq!(body["id"], json!(s.id));
        assert_eq!(body["active"], json!(true));
        assert_eq!(body["authenticator_assurance_level"], "aal1");
        assert_eq!(body["authentication_methods"][0]["method"], "password");
        assert_eq!(body["authentication_methods"][0]["aal"], "aal1");
        assert!(body["expires_at"].as_str().unwrap().ends_with('Z'));
        assert_eq!(body["devices"], json!([]));
        let ident = &body["identity"];
        assert_eq!(ident["id"], json!(id));
        assert!(ident.get("credentials").is_none());
        assert!(ident.get("metadata_admin").is_none());
        assert_eq!(ident["metadata_public"], json!({"id": "u-1"}));
        assert_eq!(ident["external_id"], "ext-1");
        assert_eq!(ident["organization_id"], Value::Null);
        assert_eq!(ident["state"], "active");
        assert_eq!(ident["schema_id"], "customer");
        assert_eq!(
            ident["schema_url"],
            format!("{}/schemas/Y3VzdG9tZXI", emu.url())
        );
        assert_eq!(ident["verifiable_addresses"][0]["value"], "b@example.com");
        assert_eq!(ident["recovery_addresses"][0]["via"], "email");
    }
    // No tokenizer templates are configured, so any tokenize_as is a 400.
    let r = http
        .get(format!("{}/sessions/whoami?tokenize_as=jwt", emu.url()))
        .header("X-Session-Token", &s.token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    // The admin whoami path redirects to the public one.
    let r = client_builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
        .get(format!("{}/admin/sessions/whoami", emu.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::TEMPORARY_REDIRECT);
    assert_eq!(
        header(&r, "location"),
        Some(format!("{}/sessions/whoami", emu.url()).as_str())
    );

    // metadata_public is present as null when unset, external_id absent.
    let other = id_of(&emu.create_identity(person("c@example.com")));
    let s2 = emu.create_session(other, NewSession::default());
    let body = json_body(
        http.get(format!("{}/sessions/whoami", emu.url()))
            .header("X-Session-Token", &s2.token)
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(body["identity"]["metadata_public"], Value::Null);
    assert!(body["identity"].get("external_id").is_none());
    emu.shutdown().await;
}

#[tokio::test]
async fn whoami_rejects_expired_revoked_inactive_and_deleted() {
    let (emu, http) = start_default().await;
    let who = |token: String| {
        let http = http.clone();
        let url = format!("{}/sessions/whoami", emu.url());
        async move {
            let r = http
                .get(url)
                .header("X-Session-Token", token)
                .send()
                .await
                .unwrap();
            (r.status(), r.text().await.unwrap())
        }
    };
    let id = id_of(&emu.create_identity(person("d@example.com")));

    let expired = emu.create_session(
        id,
        NewSession {
            lifespan: Duration::from_nanos(1),
            ..NewSession::default()
        },
    );
    assert_eq!(
        who(expired.token).await,
        (StatusCode::UNAUTHORIZED, NO_SESSION_401.into())
    );

    let revoked = emu.create_session(id, NewSession::default());
    assert_eq!(who(revoked.token.clone()).await.0, StatusCode::OK);
    emu.revoke_session(revoked.id);
    assert_eq!(
        who(revoked.token).await,
        (StatusCode::UNAUTHORIZED, NO_SESSION_401.into())
    );

    let via_admin = emu.create_session(id, NewSession::default());
    let r = http
        .delete(format!("{}/admin/sessions/{}", emu.url(), via_admin.id))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    assert_eq!(who(via_admin.token).await.0, StatusCode::UNAUTHORIZED);

    let live = emu.create_session(id, NewSession::default());
    emu.set_identity_state(id, "inactive");
    assert_eq!(
        who(live.token.clone()).await,
        (StatusCode::UNAUTHORIZED, NO_SESSION_401.into())
    );
    emu.set_identity_state(id, "active");
    assert_eq!(who(live.token.clone()).await.0, StatusCode::OK);

    assert_eq!(
        who("ory_st_unknown".into()).await.0,
        StatusCode::UNAUTHORIZED
    );
    assert!(emu.delete_identity(id));
    assert_eq!(who(live.token).await.0, StatusCode::UNAUTHORIZED);
    emu.shutdown().await;
}

#[tokio::test]
async fn whoami_aal_matrix() {
    let (emu, http) = start_default().await;
    let id = id_of(&emu.create_identity(NewIdentity {
        second_factor: true,
        ..person("mfa@example.com")
    }));
    assert!(emu.identity(id).unwrap()["credentials"]["totp"].is_object());
    let aal1 = emu.create_session(id, NewSession::default());
    let res = http
        .get(format!("{}/sessions/whoami", emu.url()))
        .header("X-Session-Token", &aal1.token)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::FORBIDDEN);
    assert_eq!(header(&res, "ory-error-id"), Some("session_aal2_required"));
    assert_eq!(header(&res, "content-type"), Some("application/json"));
    let redirect = format!("{}/self-service/login/browser?aal=aal2", emu.url());
    assert_eq!(
        json_body(res).await,
        json!({"error":{"id":"session_aal2_required","code":403,"status":"Forbidden",
            "reason":"An active session was found but it does not fulfill the requested Authenticator Assurance Level. Please verify yourself with a second factor to resolve this issue.",
            "details":{"redirect_browser_to": redirect},
            "message":"Session does not fulfill the requested Authenticator Assurance Level"},
          "redirect_browser_to": redirect})
    );

    let aal2 = emu.create_session(
        id,
        NewSession {
            aal: "aal2".into(),
            methods: vec!["password".into(), "totp".into()],
            ..NewSession::default()
        },
    );
    let body = json_body(
        http.get(format!("{}/sessions/whoami", emu.url()))
            .header("X-Session-Token", &aal2.token)
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(body["authenticator_assurance_level"], "aal2");
    assert_eq!(body["authentication_methods"][1]["method"], "totp");
    assert_eq!(body["authentication_methods"][1]["aal"], "aal2");
    emu.shutdown().await;

    // With required_aal = aal1 the same aal1 session is fine.
    let (emu, http) = start(EmulatorConfig {
        required_aal: RequiredAal::Aal1,
        ..EmulatorConfig::default()
    })
    .await;
    let id = id_of(&emu.create_identity(NewIdentity {
        second_factor: true,
        ..person("mfa@example.com")
    }));
    let aal1 = emu.create_session(id, NewSession::default());
    let res = http
        .get(format!("{}/sessions/whoami", emu.url()))
        .header("X-Session-Token", &aal1.token)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    emu.shutdown().await;
}

#[tokio::test]
async fn whoami_cache_for_header() {
    let (emu, http) = start(EmulatorConfig {
        cacheable_sessions_max_age: Some(Duration::from_secs(90)),
        ..EmulatorConfig::default()
    })
    .await;
    let url = format!("{}/sessions/whoami", emu.url());
    let r = http.get(&url).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(header(&r, "ory-session-cache-for"), Some("60"));

    let id = id_of(&emu.create_identity(person("e@example.com")));
    let long = emu.create_session(id, NewSession::default());
    let r = http
        .get(&url)
        .header("X-Session-Token", &long.token)
        .send()
        .await
        .unwrap();
    assert_eq!(header(&r, "ory-session-cache-for"), Some("90"));
    let short = emu.create_session(
        id,
        NewSession {
            lifespan: Duration::from_secs(30),
            ..NewSession::default()
        },
    );
    let r = http
        .get(&url)
        .header("X-Session-Token", &short.token)
        .send()
        .await
        .unwrap();
    let secs: u64 = header(&r, "ory-session-cache-for")
        .unwrap()
        .parse()
        .unwrap();
    assert!((28..=30).contains(&secs), "{secs}");
    // Credentials that fail are not "missing": no cache header.
    let r = http
        .get(&url)
        .header("X-Session-Token", "ory_st_x")
        .send()
        .await
        .unwrap();
    assert!(header(&r, "ory-session-cache-for").is_none());
    emu.shutdown().await;
}

// ----------------------------------------------------------------------------------------------
// admin

#[tokio::test]
async fn admin_get_404_and_prefixless_paths() {
    let (emu, http) = start_default().await;
    let not_found = json!({"error":{"code":404,"status":"Not Found","message":"Unable to locate the resource"}});
    for path in [
        "/admin/identities/does-not-exist".to_string(),
        format!("/admin/identities/{}", Uuid::new_v4()),
        format!("/identities/{}", Uuid::new_v4()),
        "/admin/identities/by/external/nope".to_string(),
    ] {
        let r = http
            .get(format!("{}{path}", emu.url()))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::NOT_FOUND, "{path}");
        assert_eq!(header(&r, "content-type"), Some("application/json"));
        assert_eq!(json_body(r).await, not_found);
    }
    let id = id_of(&emu.create_identity(NewIdentity {
        metadata_admin: Some(json!({"a": 1})),
        ..person("f@example.com")
    }));
    for prefix in ["/admin", ""] {
        let r = http
            .get(format!("{}{prefix}/identities/{id}", emu.url()))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::OK);
        let v = json_body(r).await;
        assert_eq!(v["metadata_admin"], json!({"a": 1}));
        assert_eq!(
            v["credentials"]["password"]["identifiers"],
            json!(["f@example.com"])
        );
        assert!(v["credentials"]["password"].get("config").is_none());
    }
    emu.shutdown().await;
}

#[tokio::test]
async fn separate_admin_listener_redirects_like_self_hosted_kratos() {
    let (emu, _) = start(EmulatorConfig {
        separate_admin_listener: true,
        ..EmulatorConfig::default()
    })
    .await;
    // Redirects must be seen, not followed.
    let http = client_builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    assert_ne!(emu.url(), emu.admin_url());
    let id = id_of(&emu.create_identity(person("split@example.com")));
    let session = emu.create_session(id, NewSession::default());

    // The public port sends admin identity paths, with or without `/admin`, to the admin port,
    // keeping the query (`x.RedirectToAdminRoute`).
    for (method, path) in [
        (
            Method::GET,
            format!("/admin/identities/{id}?include_credential=oidc"),
        ),
        (
            Method::GET,
            format!("/identities/{id}?include_credential=oidc"),
        ),
        (
            Method::PATCH,
            format!("/admin/identities/{id}?include_credential=oidc"),
        ),
    ] {
        let r = http
            .request(method.clone(), format!("{}{path}", emu.url()))
            .send()
            .await
            .unwrap();
        assert_eq!(
            r.status(),
            StatusCode::TEMPORARY_REDIRECT,
            "{method} {path}"
        );
        assert_eq!(
            header(&r, "location"),
            Some(
                format!(
                    "{}/admin/identities/{id}?include_credential=oidc",
                    emu.admin_url()
                )
                .as_str()
            )
        );
    }
    // A redirect is not an admin call.
    assert_eq!(emu.calls(Route::AdminRead), 0);
    assert_eq!(emu.calls(Route::AdminWrite), 0);

    // The admin port serves them, and sends whoami to the public port.
    let r = http
        .get(format!("{}/admin/identities/{id}", emu.admin_url()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(emu.calls(Route::AdminRead), 1);
    for path in ["/sessions/whoami", "/admin/sessions/whoami"] {
        let r = http
            .get(format!("{}{path}", emu.admin_url()))
            .header("X-Session-Token", &session.token)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::TEMPORARY_REDIRECT, "{path}");
        assert_eq!(
            header(&r, "location"),
            Some(format!("{}/sessions/whoami", emu.url()).as_str())
        );
    }
    assert_eq!(emu.calls(Route::Whoami), 0);
    let r = http
        .get(format!("{}/sessions/whoami", emu.url()))
        .header("X-Session-Token", &session.token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    emu.shutdown().await;
}

/// `<url>; rel="next"` out of a Link header.
fn link_rel(link: &str, rel: &str) -> Option<String> {
    link.split(',').find_map(|part| {
        let (target, params) = part.split_once(';')?;
        params.contains(&format!("rel=\"{rel}\"")).then(|| {
            target
                .trim()
                .trim_start_matches('<')
                .trim_end_matches('>')
                .to_string()
        })
    })
}

#[tokio::test]
async fn admin_list_keyset_pagination() {
    let (emu, http) = start_default().await;
    let mut created: Vec<Uuid> = (0..23)
        .map(|i| id_of(&emu.create_identity(person(&format!("user{i}@example.com")))))
        .collect();
    created.sort();

    let mut seen = Vec::new();
    let mut next = Some("/admin/identities?page_size=5".to_string());
    let mut pages = 0;
    while let Some(path) = next {
        let r = http
            .get(format!("{}{path}", emu.url()))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::OK);
        let link = header(&r, "link").unwrap().to_string();
        assert!(link_rel(&link, "first").unwrap().contains("page_size=5"));
        next = link_rel(&link, "next");
        let page = json_body(r).await;
        let page = page.as_array().unwrap();
        assert!(page.len() <= 5);
        assert!(page.iter().all(|i| i.get("credentials").is_none()));
        seen.extend(page.iter().map(id_of));
        pages += 1;
    }
    assert_eq!(pages, 5);
    assert_eq!(seen, created, "every id once, in id order");
    let unique: HashSet<_> = seen.iter().collect();
    assert_eq!(unique.len(), 23);

    // Default page holds everything; bad sizes are 400.
    let all = json_body(
        http.get(format!("{}/identities", emu.url()))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(all.as_array().unwrap().len(), 23);
    for q in [
        "page_size=0",
        "page_size=501",
        "page_size=x",
        "page_token=not-a-token",
    ] {
        let r = http
            .get(format!("{}/admin/identities?{q}", emu.url()))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::BAD_REQUEST, "{q}");
        assert_eq!(json_body(r).await["error"]["code"], 400);
    }

    // Filters.
    let ids = json_body(
        http.get(format!("{}/admin/identities", emu.url()))
            .query(&[
                ("ids", created[0].to_string()),
                ("ids", created[3].to_string()),
                ("ids", Uuid::new_v4().to_string()),
            ])
            .send()
            .await
            .unwrap(),
    )
    .await;
    let got: HashSet<Uuid> = ids.as_array().unwrap().iter().map(id_of).collect();
    assert_eq!(got, HashSet::from([created[0], created[3]]));
    let r = http
        .get(format!("{}/admin/identities?ids=nope", emu.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    let r = http
        .get(format!(
            "{}/admin/identities?ids={}&credentials_identifier=user1@example.com",
            emu.url(),
            created[0]
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    assert_eq!(
        json_body(r).await["error"]["reason"],
        "You cannot combine multiple filters in this API"
    );
    let by_ident = json_body(
        http.get(format!("{}/admin/identities", emu.url()))
            .query(&[("credentials_identifier", "USER7@example.com")])
            .send()
            .await
            .unwrap(),
    )
    .await;
    let by_ident = by_ident.as_array().unwrap();
    assert_eq!(by_ident.len(), 1);
    assert_eq!(by_ident[0]["traits"]["email"], "user7@example.com");
    assert!(by_ident[0]["credentials"]["password"].is_object());
    emu.shutdown().await;
}

/// Every `page_token` of the `rel` entries of a response's Link header(s).
fn link_tokens(res: &reqwest::Response, rel: &str) -> Vec<String> {
    res.headers()
        .get_all("link")
        .iter()
        .filter_map(|v| link_rel(v.to_str().unwrap(), rel))
        .map(|target| {
            let url = url::Url::parse("http://x").unwrap().join(&target).unwrap();
            url.query_pairs()
                .find(|(k, _)| k == "page_token")
                .map(|(_, v)| v.into_owned())
                .unwrap()
        })
        .collect()
}

#[tokio::test]
async fn admin_list_page_tokens_expire_like_keysetpagination_v2() {
    let (emu, http) = start_default().await;
    for i in 0..3 {
        emu.create_identity(person(&format!("exp{i}@example.com")));
    }
    let list = |token: Option<&str>| {
        let mut request = http
            .get(format!("{}/admin/identities", emu.url()))
            .query(&[("page_size", "1")]);
        if let Some(token) = token {
            request = request.query(&[("page_token", token)]);
        }
        request.send()
    };
    let first = list(None).await.unwrap();
    assert_eq!(first.status(), StatusCode::OK);
    let next = link_tokens(&first, "next");
    let [next] = next.as_slice() else {
        panic!("one next link: {next:?}")
    };
    // Opaque: not an identity id a client could build itself.
    assert!(Uuid::parse_str(next).is_err(), "{next}");
    assert_eq!(list(Some(next)).await.unwrap().status(), StatusCode::OK);

    emu.expire_page_tokens();
    let refused = list(Some(next)).await.unwrap();
    assert_eq!(refused.status(), StatusCode::BAD_REQUEST);
    assert_eq!(header(&refused, "content-type"), Some("application/json"));
    assert_eq!(
        refused.text().await.unwrap(),
        r#"{"error":{"code":400,"status":"Bad Request","reason":"page token expired, do not persist page tokens","message":"The request was malformed or contained invalid parameters"}}"#
    );
    // Walking again from the first page hands out fresh tokens.
    let again = list(None).await.unwrap();
    let fresh = link_tokens(&again, "next");
    assert_eq!(
        list(Some(&fresh[0])).await.unwrap().status(),
        StatusCode::OK
    );

    // A token whose hour has passed is refused the same way.
    let (short, http) = start(EmulatorConfig {
        page_tokens: PageTokens::Expiring {
            ttl: Duration::ZERO,
        },
        ..EmulatorConfig::default()
    })
    .await;
    short.create_identity(person("a@example.com"));
    short.create_identity(person("b@example.com"));
    let first = http
        .get(format!("{}/admin/identities?page_size=1", short.url()))
        .send()
        .await
        .unwrap();
    let next = link_tokens(&first, "next");
    let refused = http
        .get(format!("{}/admin/identities", short.url()))
        .query(&[("page_size", "1"), ("page_token", next[0].as_str())])
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), StatusCode::BAD_REQUEST);
    assert_eq!(
        json_body(refused).await["error"]["reason"],
        "page token expired, do not persist page tokens"
    );
    emu.shutdown().await;
    short.shutdown().await;
}

#[tokio::test]
async fn admin_list_legacy_tokens_and_split_link_headers() {
    let (emu, http) = start(EmulatorConfig {
        page_tokens: PageTokens::LastId,
        link_header: LinkHeader::Split,
        ..EmulatorConfig::default()
    })
    .await;
    let mut ids: Vec<Uuid> = (0..3)
        .map(|i| id_of(&emu.create_identity(person(&format!("old{i}@example.com")))))
        .collect();
    ids.sort();
    let first = http
        .get(format!("{}/admin/identities?page_size=2", emu.url()))
        .send()
        .await
        .unwrap();
    let links: Vec<&str> = first
        .headers()
        .get_all("link")
        .iter()
        .map(|v| v.to_str().unwrap())
        .collect();
    assert_eq!(
        links.len(),
        2,
        "first and next in headers of their own: {links:?}"
    );
    assert!(links[0].ends_with(r#"; rel="first""#), "{links:?}");
    assert!(links[1].ends_with(r#"; rel="next""#), "{links:?}");
    assert_eq!(
        link_tokens(&first, "first"),
        vec!["00000000-0000-0000-0000-000000000000".to_owned()]
    );
    // The older token is the page's last id, and it never expires.
    assert_eq!(link_tokens(&first, "next"), vec![ids[1].to_string()]);
    emu.expire_page_tokens();
    let last = http
        .get(format!("{}/admin/identities", emu.url()))
        .query(&[("page_size", "2"), ("page_token", &ids[1].to_string())])
        .send()
        .await
        .unwrap();
    assert_eq!(last.status(), StatusCode::OK);
    assert_eq!(
        last.headers().get_all("link").iter().count(),
        1,
        "no next on the last page"
    );
    assert_eq!(json_body(last).await.as_array().unwrap().len(), 1);
    emu.shutdown().await;
}

#[tokio::test]
async fn admin_create_put_and_conflicts() {
    let (emu, http) = start_default().await;
    let r = http
        .post(format!("{}/admin/identities", emu.url()))
        .json(
            &json!({"schema_id": "", "traits": {"email": "New@Example.com"}, "external_id": "ext-9",
                       "metadata_public": {"id": "m1"}}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    let location = header(&r, "location").unwrap().to_string();
    let created = json_body(r).await;
    let id = id_of(&created);
    assert_eq!(location, format!("{}/admin/identities/{id}", emu.url()));
    assert_eq!(created["schema_id"], "default");
    assert_eq!(created["state"], "active");
    assert_eq!(created["metadata_admin"], Value::Null);
    assert_eq!(
        created["credentials"]["password"]["identifiers"],
        json!(["new@example.com"])
    );

    let conflict = json!({"error":{"code":409,"status":"Conflict","reason":"This identity conflicts with another identity that already exists.","message":"The resource could not be created due to a conflict"}});
    for body in [
        json!({"schema_id": "default", "traits": {"email": "other@example.com"}, "external_id": "ext-9"}),
        json!({"schema_id": "default", "traits": {"email": "new@example.com"}}),
    ] {
        let r = http
            .post(format!("{}/admin/identities", emu.url()))
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::CONFLICT);
        assert_eq!(json_body(r).await, conflict);
    }
    for body in [
        json!({"schema_id": "default", "traits": {}, "surprise": 1}),
        json!({"schema_id": "default", "traits": {}, "state": "sleeping"}),
        json!({"schema_id": "default", "traits": "not-an-object"}),
    ] {
        let r = http
            .post(format!("{}/admin/identities", emu.url()))
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::BAD_REQUEST, "{body}");
    }

    // Lookup by external id.
    let r = http
        .get(format!("{}/admin/identities/by/external/ext-9", emu.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(json_body(r).await["id"], json!(id));

    // PUT replaces traits, metadata and external_id wholesale; state is kept when empty.
    let r = http
        .put(format!("{}/admin/identities/{id}", emu.url()))
        .json(&json!({"schema_id": "", "state": "", "traits": {"email": "new@example.com", "name": {"first": "N"}}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let put = json_body(r).await;
    assert_eq!(put["metadata_public"], Value::Null);
    assert!(put.get("external_id").is_none());
    assert_eq!(put["state"], "active");
    assert_eq!(put["schema_id"], "default");
    assert!(put["updated_at"].as_str().unwrap() >= created["updated_at"].as_str().unwrap());
    let r = http
        .get(format!("{}/admin/identities/by/external/ext-9", emu.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    let r = http
        .put(format!("{}/admin/identities/{}", emu.url(), Uuid::new_v4()))
        .json(&json!({"schema_id": "default", "state": "active", "traits": {}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    emu.shutdown().await;
}

async fn patch(http: &Client, emu: &Emulator, id: Uuid, ops: Value) -> reqwest::Response {
    http.patch(format!("{}/admin/identities/{id}", emu.url()))
        .json(&ops)
        .send()
        .await
        .unwrap()
}

#[tokio::test]
async fn admin_patch_rules() {
    let (emu, http) = start_default().await;
    let id = id_of(&emu.create_identity(person("p@example.com")));
    let before = emu.identity(id).unwrap();
    assert_eq!(before["metadata_public"], Value::Null);

    // Whole object onto null, then a key into the object.
    let r = patch(
        &http,
        &emu,
        id,
        json!([{"op":"add","path":"/metadata_public","value":{"a":1}}]),
    )
    .await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(
        header(&r, "content-type"),
        Some("application/json; charset=utf-8")
    );
    let v = json_body(r).await;
    assert_eq!(v["metadata_public"], json!({"a": 1}));
    assert!(v["credentials"]["password"].is_object());
    assert!(v["updated_at"].as_str().unwrap() >= before["updated_at"].as_str().unwrap());
    let v = json_body(
        patch(
            &http,
            &emu,
            id,
            json!([{"op":"add","path":"/metadata_public/id","value":"m-1"}]),
        )
        .await,
    )
    .await;
    assert_eq!(v["metadata_public"], json!({"a": 1, "id": "m-1"}));
    // replace on a missing key acts as add; missing parents are created; remove works.
    let v = json_body(
        patch(
            &http,
            &emu,
            id,
            json!([{"op":"replace","path":"/metadata_admin/x","value":true},
                   {"op":"add","path":"/traits/name/middle","value":"M"},
                   {"op":"remove","path":"/metadata_public/a"},
                   {"op":"replace","path":"/external_id","value":"ext-p"}]),
        )
        .await,
    )
    .await;
    assert_eq!(v["metadata_admin"], json!({"x": true}));
    assert_eq!(v["traits"]["name"]["middle"], "M");
    assert_eq!(v["metadata_public"], json!({"id": "m-1"}));
    assert_eq!(v["external_id"], "ext-p");

    // Denied paths and unsupported operations are 400 and change nothing.
    let unchanged = emu.identity(id).unwrap();
    for ops in [
        json!([{"op":"replace","path":"/id","value":Uuid::new_v4()}]),
        json!([{"op":"add","path":"/stateChangedAt","value":"2020-01-01T00:00:00Z"}]),
        json!([{"op":"add","path":"/credentials","value":{}}]),
        json!([{"op":"add","path":"/credentials/oidc/config","value":{}}]),
        json!([{"op":"add","path":"/metadata_public/z","value":1},{"op":"move","from":"/traits","path":"/x"}]),
        json!([{"op":"copy","from":"/traits","path":"/x"}]),
        json!([{"op":"test","path":"/state","value":"active"}]),
        json!([{"op":"replace","path":"/state","value":"sleeping"}]),
        json!([{"op":"remove","path":"/metadata_public/missing"}]),
        json!({"op":"add","path":"/traits/x","value":1}),
    ] {
        let r = patch(&http, &emu, id, ops.clone()).await;
        assert_eq!(r.status(), StatusCode::BAD_REQUEST, "{ops}");
        let body = json_body(r).await;
        assert_eq!(body["error"]["code"], 400);
        assert_eq!(body["error"]["status"], "Bad Request");
    }
    let r = patch(
        &http,
        &emu,
        id,
        json!([{"op":"move","from":"/a","path":"/b"}]),
    )
    .await;
    assert!(
        json_body(r).await["error"]["reason"]
            .as_str()
            .unwrap()
            .contains("unsupported operation")
    );
    let r = patch(
        &http,
        &emu,
        id,
        json!([{"op":"replace","path":"/id","value":"x"}]),
    )
    .await;
    assert!(
        json_body(r).await["error"]["reason"]
            .as_str()
            .unwrap()
            .contains("failed to apply JSON patch")
    );
    assert_eq!(emu.identity(id).unwrap(), unchanged);

    // state change sets state_changed_at.
    let v = json_body(
        patch(
            &http,
            &emu,
            id,
            json!([{"op":"replace","path":"/state","value":"inactive"}]),
        )
        .await,
    )
    .await;
    assert_eq!(v["state"], "inactive");
    assert!(v["state_changed_at"].is_string());

    // external_id clash is 409; "" clears.
    let other = id_of(&emu.create_identity(NewIdentity {
        external_id: Some("taken".into()),
        ..person("q@example.com")
    }));
    let r = patch(
        &http,
        &emu,
        id,
        json!([{"op":"replace","path":"/external_id","value":"taken"}]),
    )
    .await;
    assert_eq!(r.status(), StatusCode::CONFLICT);
    assert_eq!(
        json_body(r).await,
        json!({"error":{"code":409,"status":"Conflict","message":"Unable to insert or update resource because a resource with that value exists already"}})
    );
    let v = json_body(
        patch(
            &http,
            &emu,
            other,
            json!([{"op":"replace","path":"/external_id","value":""}]),
        )
        .await,
    )
    .await;
    assert!(v.get("external_id").is_none());
    let r = http
        .get(format!("{}/admin/identities/by/external/taken", emu.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    let r = patch(&http, &emu, Uuid::new_v4(), json!([])).await;
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    emu.shutdown().await;
}

#[tokio::test]
async fn admin_delete_identity_and_sessions() {
    let (emu, http) = start_default().await;
    let id = id_of(&emu.create_identity(person("del@example.com")));
    let s = emu.create_session(id, NewSession::default());
    let s2 = emu.create_session(id, NewSession::default());

    let r = http
        .delete(format!("{}/admin/identities/{id}/sessions", emu.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    for token in [&s.token, &s2.token] {
        let r = http
            .get(format!("{}/sessions/whoami", emu.url()))
            .header("X-Session-Token", token)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    }

    let s3 = emu.create_session(id, NewSession::default());
    let r = http
        .delete(format!("{}/admin/identities/{id}", emu.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    assert!(header(&r, "content-type").is_none());
    assert!(r.bytes().await.unwrap().is_empty());
    assert!(emu.identity(id).is_none());
    let r = http
        .get(format!("{}/sessions/whoami", emu.url()))
        .header("X-Session-Token", &s3.token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    let r = http
        .delete(format!("{}/admin/identities/{id}", emu.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    emu.shutdown().await;
}

#[tokio::test]
async fn admin_api_key_enforced() {
    let (emu, http) = start(EmulatorConfig {
        api_key: Some("ory_pat_test".into()),
        ..EmulatorConfig::default()
    })
    .await;
    let id = id_of(&emu.create_identity(person("k@example.com")));
    let url = format!("{}/admin/identities/{id}", emu.url());
    for auth in [
        None,
        Some("Bearer wrong"),
        Some("ory_pat_test"),
        Some("Basic ory_pat_test"),
    ] {
        let mut req = http.get(&url);
        if let Some(a) = auth {
            req = req.header("Authorization", a);
        }
        let r = req.send().await.unwrap();
        assert_eq!(r.status(), StatusCode::UNAUTHORIZED, "{auth:?}");
        let body = json_body(r).await;
        assert_eq!(body["error"]["code"], 401);
        assert_eq!(body["error"]["status"], "Unauthorized");
    }
    let r = http
        .get(&url)
        .bearer_auth("ory_pat_test")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let r = http.delete(&url).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    // whoami is public.
    let s = emu.create_session(id, NewSession::default());
    let r = http
        .get(format!("{}/sessions/whoami", emu.url()))
        .header("X-Session-Token", &s.token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    emu.shutdown().await;
}

// ----------------------------------------------------------------------------------------------
// test hooks

#[tokio::test]
async fn faults_and_counters() {
    let (emu, http) = start_default().await;
    let id = id_of(&emu.create_identity(person("f1@example.com")));
    let s = emu.create_session(id, NewSession::default());
    let whoami = || {
        http.get(format!("{}/sessions/whoami", emu.url()))
            .header("X-Session-Token", &s.token)
            .send()
    };

    emu.inject_fault(Route::Whoami, Fault::status(503).times(2));
    for _ in 0..2 {
        let r = whoami().await.unwrap();
        assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(header(&r, "content-type"), Some("application/json"));
        let body = json_body(r).await;
        assert_eq!(body["error"]["code"], 503);
        assert_eq!(body["error"]["status"], "Service Unavailable");
    }
    assert_eq!(whoami().await.unwrap().status(), StatusCode::OK);
    assert_eq!(emu.calls(Route::Whoami), 3);

    emu.inject_fault(Route::AdminRead, Fault::rate_limited(7));
    let r = http
        .get(format!("{}/admin/identities/{id}", emu.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(header(&r, "retry-after"), Some("7"));
    assert_eq!(header(&r, "x-ratelimit-remaining"), Some("0"));
    assert_eq!(header(&r, "x-ratelimit-reset"), Some("7"));
    assert!(header(&r, "x-ratelimit-limit").is_some());
    assert_eq!(json_body(r).await["error"]["code"], 429);
    // Admin writes are a different class.
    let r = patch(&http, &emu, id, json!([])).await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(emu.calls(Route::AdminRead), 1);
    assert_eq!(emu.calls(Route::AdminWrite), 1);
    emu.clear_faults();
    let r = http
        .get(format!("{}/admin/identities/{id}", emu.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);

    // Delay only, then the normal answer; and a delayed custom fault.
    emu.inject_fault(
        Route::Whoami,
        Fault::delay_only(Duration::from_millis(150)).times(1),
    );
    let started = std::time::Instant::now();
    assert_eq!(whoami().await.unwrap().status(), StatusCode::OK);
    assert!(started.elapsed() >= Duration::from_millis(150));
    emu.inject_fault(
        Route::Whoami,
        Fault::answer(
            500,
            Some(json!({"error": {"code": 500, "message": "boom"}})),
        )
        .header("X-Custom", "1")
        .times(1)
        .delay(Duration::from_millis(50)),
    );
    let r = whoami().await.unwrap();
    assert_eq!(r.status(), StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(header(&r, "x-custom"), Some("1"));
    assert_eq!(json_body(r).await["error"]["message"], "boom");

    // Held until the gate opens, then the normal answer.
    let gate = Gate::new();
    emu.inject_fault(Route::Whoami, Fault::held(&gate).times(2));
    let held: Vec<_> = (0..2)
        .map(|_| {
            let request = http
                .get(format!("{}/sessions/whoami", emu.url()))
                .header("X-Session-Token", &s.token);
            tokio::spawn(request.send())
        })
        .collect();
    assert!(
        emu.wait_for_calls(
            Route::Whoami,
            emu.calls(Route::Whoami) + 2,
            Duration::from_secs(10)
        )
        .await
    );
    assert!(held.iter().all(|h| !h.is_finished()));
    gate.open();
    for h in held {
        assert_eq!(h.await.unwrap().unwrap().status(), StatusCode::OK);
    }

    emu.reset_calls();
    assert_eq!(emu.calls(Route::Whoami), 0);
    assert_eq!(emu.calls(Route::AdminRead), 0);
    emu.shutdown().await;
}

#[tokio::test]
async fn wait_for_calls_wakes_on_a_call() {
    let (emu, http) = start_default().await;
    assert!(emu.wait_for_calls(Route::Whoami, 0, Duration::ZERO).await);
    let waiter = {
        let emu = emu.clone();
        tokio::spawn(async move {
            emu.wait_for_calls(Route::Whoami, 2, Duration::from_secs(10))
                .await
        })
    };
    for _ in 0..2 {
        http.get(format!("{}/sessions/whoami", emu.url()))
            .send()
            .await
            .unwrap();
    }
    assert!(waiter.await.unwrap());
    assert!(
        !emu.wait_for_calls(Route::AdminRead, 1, Duration::from_millis(20))
            .await
    );
    emu.shutdown().await;
}

#[tokio::test]
async fn wait_for_identity_wakes_on_mutation() {
    let (emu, http) = start_default().await;
    let id = id_of(&emu.create_identity(person("w@example.com")));

    // Already satisfied: immediate.
    let v = emu
        .wait_for_identity(id, |v| v["state"] == "active", Duration::from_secs(5))
        .await;
    assert!(v.is_some());

    let waiter = {
        let emu = emu.clone();
        tokio::spawn(async move {
            emu.wait_for_identity(
                id,
                |v| v["metadata_public"]["id"] == "mapped-1",
                Duration::from_secs(10),
            )
            .await
        })
    };
    tokio::task::yield_now().await;
    let r = patch(
        &http,
        &emu,
        id,
        json!([{"op":"add","path":"/metadata_public","value":{"id":"mapped-1"}}]),
    )
    .await;
    assert_eq!(r.status(), StatusCode::OK);
    let got = waiter
        .await
        .unwrap()
        .expect("waiter resolves after the PATCH");
    assert_eq!(got["metadata_public"]["id"], "mapped-1");

    let none = emu
        .wait_for_identity(id, |v| v["state"] == "inactive", Duration::from_millis(50))
        .await;
    assert!(none.is_none());
    emu.shutdown().await;
}

#[tokio::test]
async fn seed_demo_sessions_behave_as_noted() {
    let (emu, http) = start_default().await;
    let seed = emu.seed_demo();
    assert!(seed.entries.iter().any(|e| e.schema_id == "customer"));
    assert!(seed.entries.iter().any(|e| e.schema_id == "employee"));
    for e in &seed.entries {
        let r = http
            .get(format!("{}/sessions/whoami", emu.url()))
            .header("Cookie", format!("ory_kratos_session={}", e.cookie))
            .send()
            .await
            .unwrap();
        let expected = if e.note.contains("403") {
            StatusCode::FORBIDDEN
        } else if e.note.contains("401") {
            StatusCode::UNAUTHORIZED
        } else {
            StatusCode::OK
        };
        assert_eq!(r.status(), expected, "{}", e.note);
        assert!(e.session_token.starts_with("ory_st_") && e.session_token.len() == 39);
        let identity = emu.identity(e.identity_id).unwrap();
        assert_eq!(identity["traits"]["email"], e.email.as_str());
    }
    emu.shutdown().await;
}

#[tokio::test]
async fn shutdown_releases_the_port() {
    let (emu, http) = start_default().await;
    let addr = emu.addr();
    assert_eq!(emu.url(), format!("http://{addr}"));
    // Keep a pooled keep-alive connection open across the shutdown.
    let r = http
        .get(format!("{}/sessions/whoami", emu.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    emu.shutdown().await;
    emu.shutdown().await;
    let again = Emulator::start(addr, EmulatorConfig::default())
        .await
        .unwrap();
    assert_eq!(again.addr(), addr);
    again.shutdown().await;
}
