//! Issue 3's behaviours: the session cache (TTL bounds, negative caching, coalescing), the user
//! cache, invalidation across replicas, Ory rate limits and stale-if-error, BatchGetUsers.

use std::time::Duration;

use idmap::proto::api::{
    BatchGetUsersRequest, GetUserByOryIdRequest, InvalidateSessionRequest, LinkIdentityRequest,
    invalidate_session_request::Target,
};
use kratos_emulator::{EmulatorConfig, Fault, NewSession, Route};
use tonic::Code;

use crate::common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cached_sessions_do_not_reach_ory_again() {
    let env = Env::new().await;
    let (_, session) = env.customer("cached@example.com");
    let mut client = env.client();
    for _ in 0..20 {
        client.resolve_session(token(&session.token)).await.unwrap();
    }
    assert_eq!(env.ory.calls(Route::Whoami), 1);
    // Unrelated cookies do not split the cache: these are one credential.
    for header in [
        format!("ory_kratos_session={}", session.cookie),
        format!("a=1; ory_kratos_session={}; b=2", session.cookie),
    ] {
        client.resolve_session(cookie(&header)).await.unwrap();
    }
    assert_eq!(env.ory.calls(Route::Whoami), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ory_session_cache_for_caps_the_ttl() {
    // Ory says "cache for 0 s": every call asks Ory.
    let ory = EmulatorConfig {
        cacheable_sessions_max_age: Some(Duration::ZERO),
        ..EmulatorConfig::default()
    };
    let env = Env::with_ory(ory, |_| {}).await;
    let (_, session) = env.customer("nocache@example.com");
    let mut client = env.client();
    for _ in 0..3 {
        client.resolve_session(token(&session.token)).await.unwrap();
    }
    assert_eq!(env.ory.calls(Route::Whoami), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cached_session_is_not_served_past_its_expiry() {
    let env = Env::with(|c| c.cache.stale_if_error = Some(Duration::from_secs(60))).await;
    let identity_id = identity(&env.ory, "customer", "short@example.com");
    let session = env.ory.create_session(identity_id, NewSession::default());
    // Ory's answer for a session whose expiry has passed by the time idmap reads it, as when it
    // expires in transit or Ory's clock is behind idmap's: no wall-clock wait needed. It is the
    // session's real whoami body with `expires_at` a second in idmap's past.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut body: serde_json::Value = reqwest::Client::new()
        .get(format!("{}/sessions/whoami", env.ory.url()))
        .header("X-Session-Token", &session.token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let expired_at = chrono::Utc::now() - chrono::Duration::seconds(1);
    body["expires_at"] = expired_at.to_rfc3339().into();
    env.ory.inject_fault(
        Route::Whoami,
        Fault::answer(200, Some(body))
            .header(
                "X-Kratos-Authenticated-Identity-Id",
                &identity_id.to_string(),
            )
            .times(1),
    );
    let mut client = env.client();
    let resolved = client
        .resolve_session(token(&session.token))
        .await
        .unwrap()
        .into_inner();
    let expires = resolved.session.unwrap().expires_at.unwrap();
    assert_eq!(expires.seconds, expired_at.timestamp());
    // Ory expires the session too.
    env.ory.revoke_session(session.id);

    // Ory is down, stale-if-error is on, the TTL (60 s) has not run out: still refused, because the
    // session itself has expired; and Ory was asked, so nothing was served from memory.
    env.ory.inject_fault(Route::Whoami, Fault::status(503));
    let calls = env.ory.calls(Route::Whoami);
    let err = client
        .resolve_session(token(&session.token))
        .await
        .unwrap_err();
    assert_code(&err, Code::Unavailable);
    assert_eq!(env.ory.calls(Route::Whoami), calls + 1);
    env.ory.clear_faults();
    let err = client
        .resolve_session(token(&session.token))
        .await
        .unwrap_err();
    assert_code(&err, Code::Unauthenticated);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ory_refusals_are_cached_briefly() {
    let env = Env::new().await;
    let mut client = env.client();
    for _ in 0..25 {
        let err = client
            .resolve_session(token("ory_st_floodfloodfloodfloodfloodflood"))
            .await
            .unwrap_err();
        assert_code(&err, Code::Unauthenticated);
    }
    assert_eq!(env.ory.calls(Route::Whoami), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_misses_for_one_session_make_one_whoami_call() {
    let env = Env::new().await;
    let (_, session) = env.customer("burst@example.com");
    // Ory answers slowly, so every call arrives while the first is still waiting.
    env.ory.inject_fault(
        Route::Whoami,
        Fault::status(0).delay(Duration::from_millis(300)).times(1),
    );
    let calls = (0..500).map(|i| {
        let mut client = env.client();
        let request = token(&session.token);
        async move {
            // Spread over several connections, as real callers are.
            let _ = i;
            client.resolve_session(request).await
        }
    });
    let results = futures::future::join_all(calls).await;
    assert!(results.iter().all(Result::is_ok));
    assert_eq!(env.ory.calls(Route::Whoami), 1);
    // One user, linked once.
    assert_eq!(env.db.count("SELECT count(*) FROM users").await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalidate_session_reaches_every_replica() {
    let db = TestDb::new().await;
    let ory = emulator().await;
    let a = TestServer::start(config(&db, &ory)).await;
    let b = TestServer::start(config(&db, &ory)).await;
    let identity_id = identity(&ory, "customer", "replicas@example.com");
    let by_token = ory.create_session(identity_id, NewSession::default());
    let by_id = ory.create_session(identity_id, NewSession::default());
    let (other_identity, by_identity) = {
        let id = identity(&ory, "customer", "replicas2@example.com");
        (id, ory.create_session(id, NewSession::default()))
    };
    let sessions = [&by_token, &by_id, &by_identity];
    let (mut ca, mut cb) = (a.client.clone(), b.client.clone());
    for s in sessions {
        ca.resolve_session(token(&s.token)).await.unwrap();
        cb.resolve_session(token(&s.token)).await.unwrap();
    }
    let warm = ory.calls(Route::Whoami);
    // Revoked in Ory: the replicas do not know yet and answer from their caches.
    for s in sessions {
        ory.revoke_session(s.id);
        cb.resolve_session(token(&s.token)).await.unwrap();
    }
    assert_eq!(ory.calls(Route::Whoami), warm);

    let targets = [
        (Target::SessionToken(by_token.token.clone()), &by_token),
        (Target::SessionId(by_id.id.to_string()), &by_id),
        (
            Target::OryIdentityId(other_identity.to_string()),
            &by_identity,
        ),
    ];
    for (target, session) in targets {
        ca.invalidate_session(invalidate(target)).await.unwrap();
        // Replica A evicted before answering; B hears it within a second.
        let err = ca.resolve_session(token(&session.token)).await.unwrap_err();
        assert_code(&err, Code::Unauthenticated);
        b.heard_everything_from(&a, Duration::from_secs(1)).await;
        let err = cb.resolve_session(token(&session.token)).await.unwrap_err();
        assert_code(&err, Code::Unauthenticated);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalidate_session_by_token_also_evicts_the_session_cookie() {
    let env = Env::new().await;
    let (_, session) = env.customer("both@example.com");
    let mut client = env.client();
    let header = format!("ory_kratos_session={}", session.cookie);
    client.resolve_session(token(&session.token)).await.unwrap();
    client.resolve_session(cookie(&header)).await.unwrap();
    env.ory.revoke_session(session.id);
    client
        .invalidate_session(invalidate(Target::SessionToken(session.token.clone())))
        .await
        .unwrap();
    let err = client.resolve_session(cookie(&header)).await.unwrap_err();
    assert_code(&err, Code::Unauthenticated);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalidate_session_rejects_bad_targets() {
    let env = Env::new().await;
    let mut client = env.client();
    let cases = [
        (InvalidateSessionRequest { target: None }, "target"),
        (
            invalidate(Target::SessionToken(String::new())),
            "session_token",
        ),
        (invalidate(Target::SessionId("nope".into())), "session_id"),
        (
            invalidate(Target::OryIdentityId("nope".into())),
            "ory_identity_id",
        ),
    ];
    for (request, field) in cases {
        let err = client.invalidate_session(request).await.unwrap_err();
        assert_code(&err, Code::InvalidArgument);
        assert_eq!(bad_fields(&err), [field]);
    }
    // Evicting what is not cached is fine.
    client
        .invalidate_session(invalidate(Target::SessionId(
            uuid::Uuid::new_v4().to_string(),
        )))
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_change_on_one_replica_is_seen_on_the_other() {
    let db = TestDb::new().await;
    let ory = emulator().await;
    let a = TestServer::start(config(&db, &ory)).await;
    let b = TestServer::start(config(&db, &ory)).await;
    let identity_id = identity(&ory, "customer", "change@example.com");
    let (mut ca, mut cb) = (a.client.clone(), b.client.clone());
    let link = |external_id: &str| LinkIdentityRequest {
        ory_identity_id: identity_id.to_string(),
        user_id: String::new(),
        external_id: external_id.into(),
        ..Default::default()
    };
    ca.link_identity(link("")).await.unwrap();
    let get = GetUserByOryIdRequest {
        ory_identity_id: identity_id.to_string(),
    };
    // B caches the user without an external id...
    let cached = cb
        .get_user_by_ory_id(get.clone())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(cached.user.unwrap().external_id, "");
    // ...A gives it one...
    ca.link_identity(link("crm-replica")).await.unwrap();
    // ...and B sees the change within a second.
    b.heard_everything_from(&a, Duration::from_secs(1)).await;
    let seen = cb.get_user_by_ory_id(get).await.unwrap().into_inner();
    assert_eq!(seen.user.unwrap().external_id, "crm-replica");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn whoami_never_exceeds_the_configured_rate() {
    const RPS: u32 = 5;
    let env = Env::with(|c| {
        c.ory.whoami_rps = std::num::NonZeroU32::new(RPS);
        // A call may wait at most 1 s for its turn.
        c.ory.timeout = Duration::from_secs(1);
    })
    .await;
    let sessions: Vec<_> = (0..30)
        .map(|i| env.customer(&format!("rate{i}@example.com")).1)
        .collect();
    let started = tokio::time::Instant::now();
    let calls = sessions.iter().map(|s| {
        let mut client = env.client();
        let request = token(&s.token);
        async move { client.resolve_session(request).await }
    });
    let results = futures::future::join_all(calls).await;
    let elapsed = started.elapsed().as_secs_f64();
    let made = env.ory.calls(Route::Whoami);
    // The bucket holds one token: at most one call, then RPS per second.
    assert!(
        made as f64 <= 1.0 + f64::from(RPS) * elapsed,
        "{made} whoami calls in {elapsed:.2} s"
    );
    // Calls that could not get a turn in time were refused as rate limited, not as bad sessions.
    for result in &results {
        if let Err(status) = result {
            assert_code(status, Code::Unavailable);
            assert_eq!(error_info(status).0, "ORY_RATE_LIMITED");
        }
    }
    assert!(results.iter().any(Result::is_ok));
    assert!(results.iter().any(Result::is_err));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_if_error_serves_a_known_session_while_ory_fails() {
    // Ory says "do not cache", so every call asks Ory and the stale copy is what remains.
    let ory = EmulatorConfig {
        cacheable_sessions_max_age: Some(Duration::ZERO),
        ..EmulatorConfig::default()
    };
    let env = Env::with_ory(ory, |c| {
        c.cache.stale_if_error = Some(Duration::from_secs(30))
    })
    .await;
    let (_, session) = env.customer("stale@example.com");
    let mut client = env.client();
    client.resolve_session(token(&session.token)).await.unwrap();

    for fault in [
        Fault::status(503),
        Fault::status(500),
        Fault::rate_limited(0),
    ] {
        env.ory.inject_fault(Route::Whoami, fault);
        let before = env.ory.calls(Route::Whoami);
        for _ in 0..5 {
            client
                .resolve_session(token(&session.token))
                .await
                .expect("served from the stale copy");
        }
        // While stale, Ory is asked again at most once a second, not on every call.
        assert!(env.ory.calls(Route::Whoami) - before <= 2);
        env.ory.clear_faults();
        // Evict the fresh-for-a-second copy so the next round asks Ory again.
        client
            .invalidate_session(invalidate(Target::SessionToken(session.token.clone())))
            .await
            .unwrap();
        client.resolve_session(token(&session.token)).await.unwrap();
    }
    // A session Ory refuses is never served stale.
    env.ory.revoke_session(session.id);
    client
        .invalidate_session(invalidate(Target::SessionId(session.id.to_string())))
        .await
        .unwrap();
    let err = client
        .resolve_session(token(&session.token))
        .await
        .unwrap_err();
    assert_code(&err, Code::Unauthenticated);
    // And an unknown session has no stale copy: Ory's failure shows.
    let (_, fresh) = env.customer("neverseen@example.com");
    env.ory
        .inject_fault(Route::Whoami, Fault::status(503).times(1));
    let err = client
        .resolve_session(token(&fresh.token))
        .await
        .unwrap_err();
    assert_code(&err, Code::Unavailable);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_get_users_answers_in_request_order_with_one_entry_per_user() {
    let env = Env::new().await;
    let mut client = env.client();
    let mut ids = Vec::new();
    for i in 0..5 {
        let id = identity(&env.ory, "customer", &format!("batch{i}@example.com"));
        client
            .link_identity(LinkIdentityRequest {
                ory_identity_id: id.to_string(),
                user_id: String::new(),
                external_id: format!("b-{i}"),
                ..Default::default()
            })
            .await
            .unwrap();
        ids.push(id.to_string());
    }
    // Warm the cache for some, so the answer mixes cache hits and one query.
    client
        .get_user_by_ory_id(GetUserByOryIdRequest {
            ory_identity_id: ids[3].clone(),
        })
        .await
        .unwrap();
    let unknown = uuid::Uuid::new_v4().to_string();
    let request = vec![
        ids[4].clone(),
        unknown,
        ids[0].clone(),
        ids[3].clone(),
        ids[4].clone(),
        ids[2].clone(),
    ];
    let users = client
        .batch_get_users(BatchGetUsersRequest {
            ory_identity_ids: request,
        })
        .await
        .unwrap()
        .into_inner()
        .users;
    let got: Vec<_> = users.iter().map(|u| u.ory_identity_id.clone()).collect();
    assert_eq!(
        got,
        [
            ids[4].clone(),
            ids[0].clone(),
            ids[3].clone(),
            ids[2].clone()
        ]
    );
    assert_eq!(users[0].external_id, "b-4");

    let empty = client
        .batch_get_users(BatchGetUsersRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(empty.users.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_get_users_rejects_too_many_or_bad_ids() {
    let env = Env::new().await;
    let mut client = env.client();
    let too_many: Vec<String> = (0..1001)
        .map(|_| uuid::Uuid::new_v4().to_string())
        .collect();
    let err = client
        .batch_get_users(BatchGetUsersRequest {
            ory_identity_ids: too_many,
        })
        .await
        .unwrap_err();
    assert_code(&err, Code::InvalidArgument);
    assert_eq!(bad_fields(&err), ["ory_identity_ids"]);

    let exactly: Vec<String> = (0..1000)
        .map(|_| uuid::Uuid::new_v4().to_string())
        .collect();
    client
        .batch_get_users(BatchGetUsersRequest {
            ory_identity_ids: exactly,
        })
        .await
        .unwrap();

    let err = client
        .batch_get_users(BatchGetUsersRequest {
            ory_identity_ids: vec![uuid::Uuid::new_v4().to_string(), "x".into(), String::new()],
        })
        .await
        .unwrap_err();
    assert_code(&err, Code::InvalidArgument);
    assert_eq!(
        bad_fields(&err),
        ["ory_identity_ids[1]", "ory_identity_ids[2]"]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_if_error_never_serves_a_session_ory_refused() {
    // Nothing is cached fresh (Ory says "do not cache") and refusals are not remembered, so every
    // call asks Ory; only the copy kept for stale-if-error could answer without it.
    let ory = EmulatorConfig {
        cacheable_sessions_max_age: Some(Duration::ZERO),
        ..EmulatorConfig::default()
    };
    let env = Env::with_ory(ory, |c| {
        c.cache.stale_if_error = Some(Duration::from_secs(60));
        c.cache.negative_ttl = Duration::ZERO;
    })
    .await;
    let (_, session) = env.customer("refused-then-down@example.com");
    let mut client = env.client();
    client.resolve_session(token(&session.token)).await.unwrap();

    // Revoked in Ory without telling idmap: Ory's 401 is the answer.
    env.ory.revoke_session(session.id);
    let err = client
        .resolve_session(token(&session.token))
        .await
        .unwrap_err();
    assert_code(&err, Code::Unauthenticated);

    // Then Ory fails. The session it refused must not come back from the stale copy.
    env.ory.inject_fault(Route::Whoami, Fault::status(503));
    let err = client
        .resolve_session(token(&session.token))
        .await
        .unwrap_err();
    assert_code(&err, Code::Unavailable);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalidate_session_outdates_a_whoami_in_flight() {
    let env = Env::new().await;
    let (identity_id, session) = env.customer("in-flight@example.com");
    // Ory's "valid" answer, held on its way back until the test lets it go: it was given before
    // the logout below, and arrives after InvalidateSession has returned.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let valid: serde_json::Value = reqwest::Client::new()
        .get(format!("{}/sessions/whoami", env.ory.url()))
        .header("X-Session-Token", &session.token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let gate = kratos_emulator::Gate::new();
    let held = Fault {
        gate: Some(gate.clone()),
        ..Fault::answer(200, Some(valid))
            .header(
                "X-Kratos-Authenticated-Identity-Id",
                &identity_id.to_string(),
            )
            .times(1)
    };
    let calls = env.ory.calls(Route::Whoami);
    env.ory.inject_fault(Route::Whoami, held);
    let mut in_flight_client = env.client();
    let credential = session.token.clone();
    let in_flight =
        tokio::spawn(async move { in_flight_client.resolve_session(token(&credential)).await });
    assert!(
        env.ory
            .wait_for_calls(Route::Whoami, calls + 1, PATIENCE)
            .await
    );

    // The logout: revoked in Ory, then invalidated in idmap, while the whoami is in flight.
    env.ory.revoke_session(session.id);
    let mut client = env.client();
    client
        .invalidate_session(invalidate(Target::SessionToken(session.token.clone())))
        .await
        .unwrap();
    gate.open();

    // Nothing loaded before the invalidation is served after it: the answer in flight is asked
    // for again, and Ory now refuses the session.
    let err = in_flight.await.unwrap().unwrap_err();
    assert_code(&err, Code::Unauthenticated);
    let err = client
        .resolve_session(token(&session.token))
        .await
        .unwrap_err();
    assert_code(&err, Code::Unauthenticated);
}
