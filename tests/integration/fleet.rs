//! Several replicas on one PostgreSQL and one Ory: the session cache level they share (one whoami
//! per session per TTL for the fleet), its expiry and invalidation, and refresh ahead.

use std::time::Duration;

use idmap::config::Config;
use idmap::proto::api::invalidate_session_request::Target;
use idmap::store::{Database, PoolOptions, Store};
use kratos_emulator::{Fault, Gate, Route};

use crate::common::*;

async fn replica(env: &Env, tweak: impl FnOnce(&mut Config)) -> TestServer {
    let mut config = config(&env.db, &env.ory);
    tweak(&mut config);
    TestServer::start(config).await
}

async fn shared_rows(env: &Env) -> i64 {
    env.db.count("SELECT count(*) FROM session_cache").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_share_what_ory_answered() {
    let env = Env::new().await;
    let b = replica(&env, |_| {}).await;
    let (_, session) = env.customer("fleet@example.com");

    let on_a = env
        .client()
        .resolve_session(token(&session.token))
        .await
        .unwrap();
    assert_eq!(env.ory.calls(Route::Whoami), 1);
    let on_b = b
        .client
        .clone()
        .resolve_session(token(&session.token))
        .await
        .unwrap();
    assert_eq!(env.ory.calls(Route::Whoami), 1, "B asked Ory again");
    assert_eq!(on_a.into_inner().user, on_b.into_inner().user);
    assert_eq!(shared_rows(&env).await, 1);
    // The credential is not what is stored.
    assert_eq!(
        env.db
            .count(&format!(
                "SELECT count(*) FROM session_cache WHERE position('{}'::bytea in answer) > 0 \
                 OR position('{}'::bytea in fingerprint) > 0",
                session.token, session.token
            ))
            .await,
        0
    );
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_shared_level_off_each_replica_asks() {
    let env = Env::with(|c| c.cache.shared_sessions = false).await;
    let b = replica(&env, |c| c.cache.shared_sessions = false).await;
    let (_, session) = env.customer("alone@example.com");
    env.client()
        .resolve_session(token(&session.token))
        .await
        .unwrap();
    b.client
        .clone()
        .resolve_session(token(&session.token))
        .await
        .unwrap();
    assert_eq!(env.ory.calls(Route::Whoami), 2);
    assert_eq!(shared_rows(&env).await, 0);
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_shared_entries_are_not_served_and_are_swept() {
    let env = Env::new().await;
    let b = replica(&env, |_| {}).await;
    let (_, session) = env.customer("expiry@example.com");
    env.client()
        .resolve_session(token(&session.token))
        .await
        .unwrap();
    env.db
        .run_sql("UPDATE session_cache SET expires_at = now() - interval '1 second'")
        .await;
    b.client
        .clone()
        .resolve_session(token(&session.token))
        .await
        .unwrap();
    assert_eq!(
        env.ory.calls(Route::Whoami),
        2,
        "an expired entry was served"
    );

    env.db
        .run_sql("UPDATE session_cache SET expires_at = now() - interval '1 second'")
        .await;
    let store = Store::new(
        &Database::new(&env.db.url()).unwrap(),
        &PoolOptions::default(),
    )
    .unwrap();
    assert_eq!(store.sweep_shared_sessions().await.unwrap(), 1);
    assert_eq!(shared_rows(&env).await, 0);
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalidating_a_token_reaches_its_cookie_on_replicas_that_never_saw_the_token() {
    let env = Env::new().await;
    let b = replica(&env, |_| {}).await;
    let c = replica(&env, |_| {}).await;
    let (_, session) = env.customer("logout@example.com");
    let header = format!("ory_kratos_session={}", session.cookie);

    // A knows the session by its cookie only, B by its token only; C has seen neither.
    env.client().resolve_session(cookie(&header)).await.unwrap();
    b.client
        .clone()
        .resolve_session(token(&session.token))
        .await
        .unwrap();
    assert_eq!(env.ory.calls(Route::Whoami), 2);

    env.ory.revoke_session(session.id);
    c.client
        .clone()
        .invalidate_session(invalidate(Target::SessionToken(session.token.clone())))
        .await
        .unwrap();
    env.server.heard_everything_from(&c, PATIENCE).await;
    b.heard_everything_from(&c, PATIENCE).await;
    assert_eq!(shared_rows(&env).await, 0);

    let status = env
        .client()
        .resolve_session(cookie(&header))
        .await
        .unwrap_err();
    assert_code(&status, tonic::Code::Unauthenticated);
    assert_eq!(
        env.ory.calls(Route::Whoami),
        3,
        "A served the cookie from memory"
    );
    b.stop().await;
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_on_its_way_during_an_invalidation_is_not_shared_after_it() {
    let env = Env::new().await;
    let b = replica(&env, |_| {}).await;
    let (_, session) = env.customer("race@example.com");
    let gate = Gate::new();
    env.ory
        .inject_fault(Route::Whoami, Fault::held(&gate).times(1));
    // Whoever asks after the invalidation learns the session is gone (the logout revoked it).
    env.ory.inject_fault(Route::Whoami, Fault::status(401));

    let mut client = env.client();
    let request = token(&session.token);
    let resolving = tokio::spawn(async move { client.resolve_session(request).await });
    assert!(
        env.ory.wait_for_calls(Route::Whoami, 1, PATIENCE).await,
        "whoami was not asked"
    );
    // Ory has answered "valid" (held on its way back, as it were) when B invalidates the session.
    b.client
        .clone()
        .invalidate_session(invalidate(Target::SessionId(session.id.to_string())))
        .await
        .unwrap();
    gate.open();
    let _ = resolving.await.unwrap();
    env.server.heard_everything_from(&b, PATIENCE).await;
    assert_eq!(
        shared_rows(&env).await,
        0,
        "the invalidated answer was shared"
    );
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_session_is_refreshed_ahead_once_for_the_fleet() {
    const TTL: Duration = Duration::from_secs(4);
    let env = Env::with(|c| c.cache.session_ttl = TTL).await;
    let b = replica(&env, |c| c.cache.session_ttl = TTL).await;
    let (_, session) = env.customer("busy@example.com");
    let started = tokio::time::Instant::now();
    let (mut a_client, mut b_client) = (env.client(), b.client.clone());
    a_client
        .resolve_session(token(&session.token))
        .await
        .unwrap();
    b_client
        .resolve_session(token(&session.token))
        .await
        .unwrap();
    assert_eq!(env.ory.calls(Route::Whoami), 1);

    // The re-validation is held at Ory: callers keep being answered meanwhile, from both
    // replicas, and only one of them asks.
    let gate = Gate::new();
    env.ory.inject_fault(Route::Whoami, Fault::held(&gate));
    while env.ory.calls(Route::Whoami) < 2 {
        assert!(
            started.elapsed() < TTL,
            "no refresh before the entries expired"
        );
        a_client
            .resolve_session(token(&session.token))
            .await
            .unwrap();
        b_client
            .resolve_session(token(&session.token))
            .await
            .unwrap();
    }
    gate.open();
    env.ory.clear_faults();
    // The refreshed answer reaches the shared level, and from there the other replica.
    while env
        .db
        .count("SELECT count(*) FROM session_cache WHERE expires_at > now() + interval '3 seconds'")
        .await
        == 0
    {
        assert!(
            started.elapsed() < TTL,
            "the refresh was not shared in time"
        );
        tokio::task::yield_now().await;
    }
    // Past the first answer's expiry, both replicas still answer without asking Ory.
    while started.elapsed() < TTL + Duration::from_millis(500) {
        a_client
            .resolve_session(token(&session.token))
            .await
            .unwrap();
        b_client
            .resolve_session(token(&session.token))
            .await
            .unwrap();
    }
    assert_eq!(env.ory.calls(Route::Whoami), 2);
    b.stop().await;
}

/// Sends `signal` to a PostgreSQL backend (the tests run as root or as the server's user).
fn signal(pid: i64, signal: &str) {
    let status = std::process::Command::new("kill")
        .args([signal, &pid.to_string()])
        .status()
        .unwrap();
    assert!(status.success(), "kill {signal} {pid}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listening_connection_that_goes_silent_is_replaced() {
    let env = Env::with(|c| c.listen_heartbeat = Duration::from_millis(200)).await;
    let b = replica(&env, |_| {}).await;
    // A's listener is the older of the two.
    let pid = env
        .db
        .count(
            "SELECT pid::bigint FROM pg_stat_activity WHERE datname = current_database() \
             AND application_name = 'idmap-listen' ORDER BY backend_start LIMIT 1",
        )
        .await;
    let mut reconnects = env.server.reconnects();

    // The backend stops answering without closing the connection: a half-open connection, as
    // after a failover or a dropped NAT entry.
    signal(pid, "-STOP");
    let noticed = tokio::time::timeout(PATIENCE, reconnects.wait_for(|n| *n >= 1)).await;
    signal(pid, "-CONT");
    noticed
        .expect("the silent connection was not noticed")
        .unwrap();

    // The new connection hears the other replica's evictions.
    let (_, session) = env.customer("heartbeat@example.com");
    b.client
        .clone()
        .invalidate_session(invalidate(Target::SessionToken(session.token.clone())))
        .await
        .unwrap();
    env.server.heard_everything_from(&b, PATIENCE).await;
    b.stop().await;
}

/// Writes a user straight into `db`, as replication would have.
async fn replicated_user(db: &TestDb, identity: uuid::Uuid, external_id: &str) -> uuid::Uuid {
    let user = uuid::Uuid::new_v4();
    db.run_sql(&format!(
        "INSERT INTO users (id, ory_identity_id, schema_id) VALUES ('{user}', '{identity}', 'customer'); \
         INSERT INTO user_external_ids (external_id, user_id) VALUES ('{external_id}', '{user}')"
    ))
    .await;
    user
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lookups_read_the_replica_and_ask_the_primary_for_what_it_lacks() {
    use idmap::proto::api::{BatchGetUsersRequest, GetByExternalIdRequest, GetUserByOryIdRequest};
    // A "replica" that has replicated one user the primary no longer has, and lags behind on
    // everything since: a database of its own, so the test can tell where an answer came from.
    let replica = TestDb::new().await;
    let replica_url = replica.url();
    let env = Env::with(move |c| c.database_read_url = Some(replica_url)).await;
    let old = uuid::Uuid::new_v4();
    let old_user = replicated_user(&replica, old, "crm-replica").await;

    let mut client = env.client();
    let from_replica = client
        .get_user_by_ory_id(GetUserByOryIdRequest {
            ory_identity_id: old.to_string(),
        })
        .await
        .expect("read from the replica")
        .into_inner()
        .user
        .unwrap();
    assert_eq!(from_replica.id, old_user.to_string());
    let by_external = client
        .get_by_external_id(GetByExternalIdRequest {
            external_id: "crm-replica".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .user
        .unwrap();
    assert_eq!(by_external.id, old_user.to_string());

    // Linked a moment ago on the primary, not yet replicated: found all the same.
    let (identity, _) = env.customer("fresh@example.com");
    let linked = client
        .link_identity(link_with(identity, "", "crm-fresh"))
        .await
        .unwrap()
        .into_inner()
        .user
        .unwrap();
    let found = client
        .get_user_by_ory_id(GetUserByOryIdRequest {
            ory_identity_id: identity.to_string(),
        })
        .await
        .expect("a fresh link is never missing")
        .into_inner()
        .user
        .unwrap();
    assert_eq!(found.id, linked.id);
    let batch = client
        .batch_get_users(BatchGetUsersRequest {
            ory_identity_ids: vec![old.to_string(), identity.to_string()],
        })
        .await
        .unwrap()
        .into_inner();
    let mut ids: Vec<String> = batch.users.iter().map(|u| u.id.clone()).collect();
    ids.sort();
    let mut expected = vec![old_user.to_string(), linked.id.clone()];
    expected.sort();
    assert_eq!(ids, expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_replica_leaves_lookups_to_the_primary() {
    use idmap::proto::api::GetUserByOryIdRequest;
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let env = Env::with(move |c| {
        c.database_read_url = Some(secrecy::SecretString::from(format!(
            "postgres://postgres@127.0.0.1:{closed}/postgres"
        )))
    })
    .await;
    let (identity, _) = env.customer("replica-down@example.com");
    let mut client = env.client();
    client.link_identity(link(identity)).await.unwrap();
    client
        .get_user_by_ory_id(GetUserByOryIdRequest {
            ory_identity_id: identity.to_string(),
        })
        .await
        .expect("the primary answers");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refreshed_entry_lives_its_own_ttl() {
    // One replica, nothing shared: the refreshed answer must replace the entry for a whole TTL,
    // not for what was left of the old one.
    const TTL: Duration = Duration::from_secs(2);
    let env = Env::with(|c| {
        c.cache.session_ttl = TTL;
        c.cache.shared_sessions = false;
    })
    .await;
    let (_, session) = env.customer("own-ttl@example.com");
    let started = tokio::time::Instant::now();
    let mut client = env.client();
    client.resolve_session(token(&session.token)).await.unwrap();
    while env.ory.calls(Route::Whoami) < 2 {
        assert!(
            started.elapsed() < TTL,
            "no refresh before the entry expired"
        );
        client.resolve_session(token(&session.token)).await.unwrap();
    }
    // The refresh landed at about 0.8 TTL; keep resolving past the first entry's end.
    while started.elapsed() < TTL + Duration::from_millis(500) {
        client.resolve_session(token(&session.token)).await.unwrap();
    }
    assert_eq!(
        env.ory.calls(Route::Whoami),
        2,
        "the refreshed entry expired with the old one"
    );
}
