use std::time::Duration;

use idmap::proto::api::{
    GetUserByOryIdRequest, ResolveSessionRequest, resolve_session_request::Credential,
};
use kratos_emulator::{Fault, NewIdentity, NewSession, Route};
use serde_json::json;
use tonic::Code;
use tonic_types::StatusExt;

use crate::common::*;

fn cookie(c: &str) -> ResolveSessionRequest {
    ResolveSessionRequest {
        credential: Some(Credential::Cookie(c.to_owned())),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resolve_session_token_returns_session_identity_and_a_just_in_time_user() {
    let env = Env::new().await;
    let (identity_id, session) = env.customer("ada@example.com");
    let mut client = env.client();

    let first = client
        .resolve_session(token(&session.token))
        .await
        .unwrap()
        .into_inner();
    let s = first.session.unwrap();
    assert_eq!(s.id, session.id.to_string());
    assert!(s.active);
    assert!(s.expires_at.is_some() && s.authenticated_at.is_some());
    assert_eq!(s.authenticator_assurance_level, "aal1");
    let identity = first.identity.unwrap();
    assert_eq!(identity.id, identity_id.to_string());
    assert_eq!(identity.schema_id, "customer");
    assert_eq!(identity.state, "active");
    let traits = identity.traits.unwrap();
    assert!(traits.fields.contains_key("email"));
    let user = first.user.expect("a user is linked just in time");
    assert_eq!(user.ory_identity_id, identity_id.to_string());
    assert_eq!(user.schema_id, "customer");
    assert!(user.created_at.is_some());

    // The same identity resolves to the same user, and the user id reaches Ory's metadata_public.
    let second = client
        .resolve_session(token(&session.token))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(second.user.unwrap().id, user.id);
    wait_for_metadata_id(&env.ory, identity_id, &user.id).await;
    assert_eq!(env.db.count("SELECT count(*) FROM users").await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resolve_cookie_header_uses_only_the_ory_session_cookie() {
    let env = Env::new().await;
    let (identity_id, session) = env.customer("cookie@example.com");
    let mut client = env.client();
    let header = format!(
        "theme=dark; ory_kratos_session={}; _ga=GA1.2.3",
        session.cookie
    );
    let resolved = client
        .resolve_session(cookie(&header))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(resolved.identity.unwrap().id, identity_id.to_string());

    // A header with no Ory session cookie is refused without asking Ory.
    let before = env.ory.calls(Route::Whoami);
    let err = client
        .resolve_session(cookie("theme=dark; other=1"))
        .await
        .unwrap_err();
    assert_code(&err, Code::Unauthenticated);
    assert_eq!(env.ory.calls(Route::Whoami), before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resolve_invalid_sessions_are_unauthenticated() {
    let env = Env::new().await;
    let mut client = env.client();

    let err = client
        .resolve_session(token("ory_st_unknownunknownunknownunknown12"))
        .await
        .unwrap_err();
    assert_code(&err, Code::Unauthenticated);
    assert_eq!(error_info(&err).0, "SESSION_INVALID");

    let (_, revoked) = env.customer("revoked@example.com");
    env.ory.revoke_session(revoked.id);
    let err = client
        .resolve_session(token(&revoked.token))
        .await
        .unwrap_err();
    assert_code(&err, Code::Unauthenticated);

    let (inactive_id, inactive) = env.customer("inactive@example.com");
    env.ory.set_identity_state(inactive_id, "inactive");
    let err = client
        .resolve_session(token(&inactive.token))
        .await
        .unwrap_err();
    assert_code(&err, Code::Unauthenticated);

    let expired_id = identity(&env.ory, "customer", "expired@example.com");
    let expired = env.ory.create_session(
        expired_id,
        NewSession {
            lifespan: Duration::ZERO,
            ..NewSession::default()
        },
    );
    let err = client
        .resolve_session(token(&expired.token))
        .await
        .unwrap_err();
    assert_code(&err, Code::Unauthenticated);

    // Nothing was linked for sessions Ory refused.
    assert_eq!(env.db.count("SELECT count(*) FROM users").await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resolve_aal_too_low_is_permission_denied_with_ory_error_id() {
    let env = Env::new().await;
    let created = env.ory.create_identity(NewIdentity {
        schema_id: "employee".into(),
        traits: json!({"email": "mfa@example.com"}),
        identifiers: vec!["mfa@example.com".into()],
        second_factor: true,
        ..NewIdentity::default()
    });
    let session = env
        .ory
        .create_session(id_of(&created), NewSession::default());
    let err = env
        .client()
        .resolve_session(token(&session.token))
        .await
        .unwrap_err();
    assert_code(&err, Code::PermissionDenied);
    let (reason, domain, metadata) = error_info(&err);
    assert_eq!(reason, "session_aal2_required");
    assert_eq!(domain, "idmap");
    assert_eq!(metadata["ory_error_id"], "session_aal2_required");
    assert!(metadata["redirect_browser_to"].contains("aal=aal2"));
    assert!(err.message().contains("session_aal2_required"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resolve_ory_outages_are_unavailable_never_unauthenticated() {
    let env = Env::new().await;
    let (_, session) = env.customer("outage@example.com");
    let mut client = env.client();

    for status in [500, 502, 503, 504] {
        env.ory
            .inject_fault(Route::Whoami, Fault::status(status).times(1));
        let err = client
            .resolve_session(token(&session.token))
            .await
            .unwrap_err();
        assert_code(&err, Code::Unavailable);
        assert_eq!(error_info(&err).0, "ORY_UNAVAILABLE", "status {status}");
    }

    // After the faults, the session resolves again.
    client.resolve_session(token(&session.token)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resolve_ory_429_is_unavailable_and_retry_after_is_honoured() {
    // No session cache, so every call would reach Ory.
    let env = Env::with(|c| c.cache.session_ttl = Duration::ZERO).await;
    let (_, session) = env.customer("ratelimit@example.com");
    let mut client = env.client();

    env.ory
        .inject_fault(Route::Whoami, Fault::rate_limited(7).times(1));
    let err = client
        .resolve_session(token(&session.token))
        .await
        .unwrap_err();
    assert_code(&err, Code::Unavailable);
    assert_eq!(error_info(&err).0, "ORY_RATE_LIMITED");
    let retry = err.get_details_retry_info().expect("RetryInfo");
    assert_eq!(retry.retry_delay, Some(Duration::from_secs(7)));

    // Ory asked for 7 s of quiet, longer than a call may wait: the next call fails at once,
    // without reaching Ory.
    let calls = env.ory.calls(Route::Whoami);
    let err = client
        .resolve_session(token(&session.token))
        .await
        .unwrap_err();
    assert_code(&err, Code::Unavailable);
    assert_eq!(error_info(&err).0, "ORY_RATE_LIMITED");
    assert!(err.get_details_retry_info().is_some());
    assert_eq!(env.ory.calls(Route::Whoami), calls);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resolve_with_ory_unreachable_is_unavailable() {
    let db = TestDb::new().await;
    // A port nothing listens on: bind, note it, release.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let server = TestServer::start(config_for(&db, &format!("http://127.0.0.1:{port}"))).await;
    let err = server
        .client
        .clone()
        .resolve_session(token("ory_st_aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"))
        .await
        .unwrap_err();
    assert_code(&err, Code::Unavailable);
    assert_eq!(error_info(&err).0, "ORY_UNAVAILABLE");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resolve_bad_input_is_invalid_argument_and_never_reaches_ory() {
    let env = Env::new().await;
    let mut client = env.client();
    let cases = [
        (
            ResolveSessionRequest {
                credential: None,
                ..Default::default()
            },
            "credential",
        ),
        (token(""), "session_token"),
        (token("ory_st_has space"), "session_token"),
        (token(&"a".repeat(5000)), "session_token"),
        (cookie(""), "cookie"),
        (cookie("ory_kratos_session=a\nb"), "cookie"),
        (
            cookie(&format!("ory_kratos_session={}", "a".repeat(17000))),
            "cookie",
        ),
    ];
    for (request, field) in cases {
        let err = client.resolve_session(request).await.unwrap_err();
        assert_code(&err, Code::InvalidArgument);
        assert_eq!(bad_fields(&err), [field]);
    }
    assert_eq!(env.ory.calls(Route::Whoami), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resolve_without_auto_link_returns_no_user_and_stores_nothing() {
    let env = Env::with(|c| c.service.auto_link = false).await;
    let (identity_id, session) = env.customer("nolink@example.com");
    let mut client = env.client();
    let resolved = client
        .resolve_session(token(&session.token))
        .await
        .unwrap()
        .into_inner();
    assert!(resolved.user.is_none());
    assert!(resolved.identity.is_some());
    let err = client
        .get_user_by_ory_id(GetUserByOryIdRequest {
            ory_identity_id: identity_id.to_string(),
        })
        .await
        .unwrap_err();
    assert_code(&err, Code::NotFound);
    assert_eq!(env.db.count("SELECT count(*) FROM ory_outbox").await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resolve_never_exposes_metadata_admin_and_keeps_schema_ids_apart() {
    let env = Env::new().await;
    let employee = env.ory.create_identity(NewIdentity {
        schema_id: "employee".into(),
        traits: json!({"email": "staff@example.com"}),
        identifiers: vec!["staff@example.com".into()],
        metadata_public: Some(json!({"team": "payments"})),
        metadata_admin: Some(json!({"salary_band": "secret-band-7"})),
        ..NewIdentity::default()
    });
    let employee_id = id_of(&employee);
    let session = env.ory.create_session(employee_id, NewSession::default());
    let (_, customer_session) = env.customer("buyer@example.com");
    let mut client = env.client();

    let resolved = client
        .resolve_session(token(&session.token))
        .await
        .unwrap()
        .into_inner();
    let rendered = format!("{resolved:?}");
    assert!(!rendered.contains("secret-band-7"));
    assert!(!rendered.contains("salary_band"));
    let metadata = resolved.identity.unwrap().metadata_public.unwrap();
    assert!(metadata.fields.contains_key("team"));
    assert_eq!(resolved.user.unwrap().schema_id, "employee");

    let customer = client
        .resolve_session(token(&customer_session.token))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(customer.user.unwrap().schema_id, "customer");

    // The metadata write keeps the identity's other public keys.
    let user = env
        .server
        .client
        .clone()
        .get_user_by_ory_id(GetUserByOryIdRequest {
            ory_identity_id: employee_id.to_string(),
        })
        .await
        .unwrap()
        .into_inner()
        .user
        .unwrap();
    let stored = wait_for_metadata_id(&env.ory, employee_id, &user.id).await;
    assert_eq!(stored["metadata_public"]["team"], "payments");
    assert_eq!(stored["metadata_admin"]["salary_band"], "secret-band-7");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resolve_adopts_a_user_id_ory_already_records() {
    let env = Env::new().await;
    let recorded = uuid::Uuid::new_v4();
    let created = env.ory.create_identity(NewIdentity {
        schema_id: "customer".into(),
        traits: json!({"email": "restored@example.com"}),
        identifiers: vec!["restored@example.com".into()],
        metadata_public: Some(json!({"id": recorded.to_string()})),
        ..NewIdentity::default()
    });
    let session = env
        .ory
        .create_session(id_of(&created), NewSession::default());
    let resolved = env
        .client()
        .resolve_session(token(&session.token))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(resolved.user.unwrap().id, recorded.to_string());
    // Ory already holds the id: nothing to write.
    assert_eq!(env.db.count("SELECT count(*) FROM ory_outbox").await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resolve_when_ory_times_out_is_unavailable_never_unauthenticated() {
    let env = Env::with(|c| c.ory.timeout = Duration::from_millis(300)).await;
    let (_, session) = env.customer("timeout@example.com");
    // Ory answers, but long after idmap's timeout.
    env.ory.inject_fault(
        Route::Whoami,
        Fault::delay_only(Duration::from_secs(30)).times(1),
    );
    let err = env
        .client()
        .resolve_session(token(&session.token))
        .await
        .unwrap_err();
    assert_code(&err, Code::Unavailable);
    assert_eq!(error_info(&err).0, "ORY_UNAVAILABLE");
    assert_eq!(env.db.count("SELECT count(*) FROM users").await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resolve_just_in_time_link_that_loses_a_race_answers_with_the_winner() {
    let env = Env::new().await;
    // Ory records a user id (say a registration hook minted it), so the just-in-time link adopts
    // it; meanwhile another replica links the identity to a different user.
    let recorded = uuid::Uuid::new_v4();
    let created = env.ory.create_identity(NewIdentity {
        schema_id: "customer".into(),
        traits: json!({"email": "race@example.com"}),
        identifiers: vec!["race@example.com".into()],
        metadata_public: Some(json!({"id": recorded.to_string()})),
        ..NewIdentity::default()
    });
    let identity_id = id_of(&created);
    let session = env.ory.create_session(identity_id, NewSession::default());
    let winner = uuid::Uuid::new_v4();
    // The other replica's link is in flight: inserted, not yet committed. This call's lookup
    // cannot see it, and its own insert must wait for it.
    let other = env
        .db
        .begin(&format!(
            "INSERT INTO users (id, ory_identity_id, schema_id) VALUES ('{winner}', '{identity_id}', 'customer')"
        ))
        .await;
    let mut client = env.client();
    let resolving =
        tokio::spawn(async move { client.resolve_session(token(&session.token)).await });
    env.db.wait_for_lock_waiter().await;
    other.commit().await;

    let user = resolving
        .await
        .unwrap()
        .expect("the session resolves to the link that won")
        .into_inner()
        .user
        .unwrap();
    assert_eq!(user.id, winner.to_string());
    assert_eq!(env.db.count("SELECT count(*) FROM users").await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resolve_caps_the_pause_ory_asks_for() {
    let env = Env::with(|c| c.cache.session_ttl = Duration::ZERO).await;
    let (identity, session) = env.customer("forever@example.com");
    let mut client = env.client();

    // A Retry-After no clock can add: it used to panic the call (and, in the outbox worker, the
    // worker for good).
    env.ory
        .inject_fault(Route::Whoami, Fault::rate_limited(u64::MAX).times(1));
    let err = client
        .resolve_session(token(&session.token))
        .await
        .unwrap_err();
    assert_code(&err, Code::Unavailable);
    assert_eq!(error_info(&err).0, "ORY_RATE_LIMITED");
    let retry = err.get_details_retry_info().expect("RetryInfo");
    assert_eq!(retry.retry_delay, Some(idmap::ory::MAX_RETRY_AFTER));

    // The pause is capped too: calls fail fast with at most the cap, and the server goes on.
    let err = client
        .resolve_session(token(&session.token))
        .await
        .unwrap_err();
    let retry = err.get_details_retry_info().expect("RetryInfo");
    assert!(retry.retry_delay.unwrap() <= idmap::ory::MAX_RETRY_AFTER);
    client
        .link_identity(link(identity))
        .await
        .expect("the admin API is not held back by a whoami limit");
}
