use std::collections::HashSet;
use std::time::Duration;

use idmap::proto::api::{GetUserByOryIdRequest, LinkIdentityRequest, LinkIdentityResponse};
use kratos_emulator::{EmulatorConfig, Fault, Gate, NewIdentity, Route};
use serde_json::json;
use tonic::Code;
use uuid::Uuid;

use crate::common::*;

async fn call(
    client: &mut Client,
    request: LinkIdentityRequest,
) -> Result<LinkIdentityResponse, tonic::Status> {
    client.link_identity(request).await.map(|r| r.into_inner())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn link_creates_a_user_once_and_is_idempotent() {
    let env = Env::new().await;
    let identity_id = identity(&env.ory, "customer", "link@example.com");
    let mut client = env.client();

    let first = call(&mut client, link_with(identity_id, "", "crm-1"))
        .await
        .unwrap();
    assert!(first.created);
    let user = first.user.unwrap();
    assert_eq!(user.ory_identity_id, identity_id.to_string());
    assert_eq!(user.external_id, "crm-1");
    assert_eq!(user.schema_id, "customer");
    Uuid::parse_str(&user.id).expect("user id is a UUID");

    let again = call(&mut client, link_with(identity_id, "", "crm-1"))
        .await
        .unwrap();
    assert!(!again.created);
    assert_eq!(again.user.unwrap(), user);
    // Naming the user explicitly, or leaving the external id out, is the same link.
    let explicit = call(&mut client, link_with(identity_id, &user.id, ""))
        .await
        .unwrap();
    assert_eq!(explicit.user.unwrap().id, user.id);

    let stored = wait_for_metadata_id(&env.ory, identity_id, &user.id).await;
    assert_eq!(stored["metadata_public"], json!({"id": user.id}));
    assert_eq!(env.db.count("SELECT count(*) FROM users").await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_users_start_in_their_identitys_state() {
    let env = Env::new().await;
    let inactive = id_of(&env.ory.create_identity(NewIdentity {
        schema_id: "customer".into(),
        traits: json!({"email": "dormant@example.com"}),
        state: Some("inactive".into()),
        ..NewIdentity::default()
    }));
    let response = call(&mut env.client(), link_with(inactive, "", ""))
        .await
        .unwrap();
    assert!(response.created);
    assert_eq!(response.user.unwrap().state, "inactive");
    // Written by the insert itself, not by a later update: no moment where the user is active.
    assert_eq!(
        env.db
            .count(&format!(
                "SELECT count(*) FROM users WHERE ory_identity_id = '{inactive}' \
                 AND state = 'inactive' AND updated_at = created_at"
            ))
            .await,
        1
    );

    // ResolveSession links just in time through the same path (Ory only lets sessions of active
    // identities through whoami, so its users start active).
    let (active, session) = env.customer("awake@example.com");
    let resolved = env
        .client()
        .resolve_session(idmap::proto::api::ResolveSessionRequest {
            credential: Some(
                idmap::proto::api::resolve_session_request::Credential::SessionToken(session.token),
            ),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let user = resolved.user.unwrap();
    assert_eq!(user.ory_identity_id, active.to_string());
    assert_eq!(user.state, "active");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn link_with_a_chosen_user_id_uses_it() {
    let env = Env::new().await;
    let identity_id = identity(&env.ory, "employee", "chosen@example.com");
    let chosen = Uuid::new_v4().to_string();
    let response = call(&mut env.client(), link_with(identity_id, &chosen, ""))
        .await
        .unwrap();
    assert!(response.created);
    let user = response.user.unwrap();
    assert_eq!(user.id, chosen);
    assert_eq!(user.external_id, "");
    wait_for_metadata_id(&env.ory, identity_id, &chosen).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn link_keeps_other_metadata_public_keys() {
    let env = Env::new().await;
    let created = env.ory.create_identity(NewIdentity {
        schema_id: "customer".into(),
        traits: json!({"email": "meta@example.com"}),
        identifiers: vec!["meta@example.com".into()],
        metadata_public: Some(json!({"plan": "gold", "flags": [1, 2]})),
        metadata_admin: Some(json!({"note": "vip"})),
        ..NewIdentity::default()
    });
    let identity_id = id_of(&created);
    let user = call(&mut env.client(), link_with(identity_id, "", ""))
        .await
        .unwrap()
        .user
        .unwrap();
    let stored = wait_for_metadata_id(&env.ory, identity_id, &user.id).await;
    assert_eq!(
        stored["metadata_public"],
        json!({"plan": "gold", "flags": [1, 2], "id": user.id})
    );
    assert_eq!(stored["metadata_admin"], json!({"note": "vip"}));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn link_unknown_identity_is_not_found_and_stores_nothing() {
    let env = Env::new().await;
    let err = call(&mut env.client(), link_with(Uuid::new_v4(), "", "crm-404"))
        .await
        .unwrap_err();
    assert_code(&err, Code::NotFound);
    assert_eq!(error_info(&err).0, "IDENTITY_NOT_FOUND");
    assert_eq!(env.db.count("SELECT count(*) FROM users").await, 0);
    assert_eq!(
        env.db.count("SELECT count(*) FROM user_external_ids").await,
        0
    );
    assert_eq!(env.db.count("SELECT count(*) FROM ory_outbox").await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn link_conflicts_are_already_exists_with_a_reason() {
    let env = Env::new().await;
    let a = identity(&env.ory, "customer", "a@example.com");
    let b = identity(&env.ory, "customer", "b@example.com");
    let mut client = env.client();
    let user_a = call(&mut client, link_with(a, "", "ext-a"))
        .await
        .unwrap()
        .user
        .unwrap();

    // The identity is linked to user A; linking it to another user id fails.
    let err = call(&mut client, link_with(a, &Uuid::new_v4().to_string(), ""))
        .await
        .unwrap_err();
    assert_code(&err, Code::AlreadyExists);
    let (reason, domain, metadata) = error_info(&err);
    assert_eq!(reason, "IDENTITY_ALREADY_LINKED");
    assert_eq!(domain, "idmap");
    assert_eq!(metadata["user_id"], user_a.id);

    // User A is taken by identity a; identity b cannot have it.
    let err = call(&mut client, link_with(b, &user_a.id, ""))
        .await
        .unwrap_err();
    assert_code(&err, Code::AlreadyExists);
    let (reason, _, metadata) = error_info(&err);
    assert_eq!(reason, "USER_ALREADY_LINKED");
    assert_eq!(metadata["ory_identity_id"], a.to_string());

    // ext-a is held by user A.
    let err = call(&mut client, link_with(b, "", "ext-a"))
        .await
        .unwrap_err();
    assert_code(&err, Code::AlreadyExists);
    let (reason, _, metadata) = error_info(&err);
    assert_eq!(reason, "EXTERNAL_ID_TAKEN");
    assert_eq!(metadata["user_id"], user_a.id);

    // User A has ext-a; giving it another external id is refused.
    let err = call(&mut client, link_with(a, "", "ext-other"))
        .await
        .unwrap_err();
    assert_code(&err, Code::AlreadyExists);
    assert_eq!(error_info(&err).0, "EXTERNAL_ID_ALREADY_SET");

    // None of the refused calls changed anything.
    assert_eq!(env.db.count("SELECT count(*) FROM users").await, 1);
    assert_eq!(
        env.db.count("SELECT count(*) FROM user_external_ids").await,
        1
    );
    let still = client
        .get_user_by_ory_id(GetUserByOryIdRequest {
            ory_identity_id: a.to_string(),
        })
        .await
        .unwrap()
        .into_inner()
        .user
        .unwrap();
    assert_eq!(still, user_a);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn link_adds_an_external_id_to_a_user_without_one() {
    let env = Env::new().await;
    let a = identity(&env.ory, "customer", "later@example.com");
    let mut client = env.client();
    let user = call(&mut client, link_with(a, "", ""))
        .await
        .unwrap()
        .user
        .unwrap();
    let updated = call(&mut client, link_with(a, "", "crm-later"))
        .await
        .unwrap();
    assert!(!updated.created);
    let updated = updated.user.unwrap();
    assert_eq!(updated.id, user.id);
    assert_eq!(updated.external_id, "crm-later");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn link_bad_input_is_invalid_argument_and_changes_nothing() {
    let env = Env::new().await;
    let a = identity(&env.ory, "customer", "bad@example.com");
    let mut client = env.client();
    let cases = [
        (
            link_with(a, "", "").tap(|r| r.ory_identity_id = "not-a-uuid".into()),
            vec!["ory_identity_id"],
        ),
        (
            link_with(a, "", "").tap(|r| r.ory_identity_id = String::new()),
            vec!["ory_identity_id"],
        ),
        (link_with(a, "123", ""), vec!["user_id"]),
        (link_with(a, "", &"x".repeat(256)), vec!["external_id"]),
        (link_with(a, "", "line\nbreak"), vec!["external_id"]),
        (
            link_with(a, "nope", "bell\u{7}").tap(|r| r.ory_identity_id = "x".into()),
            vec!["ory_identity_id", "user_id", "external_id"],
        ),
    ];
    for (request, fields) in cases {
        let err = call(&mut client, request).await.unwrap_err();
        assert_code(&err, Code::InvalidArgument);
        assert_eq!(bad_fields(&err), fields);
    }
    assert_eq!(env.ory.calls(Route::AdminRead), 0);
    assert_eq!(env.db.count("SELECT count(*) FROM users").await, 0);
}

trait Tap: Sized {
    fn tap(mut self, f: impl FnOnce(&mut Self)) -> Self {
        f(&mut self);
        self
    }
}
impl Tap for LinkIdentityRequest {}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn link_with_ory_unreachable_is_unavailable_and_stores_nothing() {
    let env = Env::new().await;
    let a = identity(&env.ory, "customer", "down@example.com");
    env.ory.shutdown().await;
    let err = call(&mut env.client(), link_with(a, "", "crm-down"))
        .await
        .unwrap_err();
    assert_ory_unavailable_and_nothing_stored(&env, &err).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn link_when_ory_fails_the_identity_check_is_unavailable() {
    let env = Env::new().await;
    let a = identity(&env.ory, "customer", "flaky@example.com");
    env.ory
        .inject_fault(Route::AdminRead, Fault::status(503).times(1));
    let err = call(&mut env.client(), link_with(a, "", ""))
        .await
        .unwrap_err();
    assert_code(&err, Code::Unavailable);
    env.ory
        .inject_fault(Route::AdminRead, Fault::rate_limited(3).times(1));
    let err = call(&mut env.client(), link_with(a, "", ""))
        .await
        .unwrap_err();
    assert_code(&err, Code::Unavailable);
    assert_eq!(error_info(&err).0, "ORY_RATE_LIMITED");
    assert_eq!(env.db.count("SELECT count(*) FROM users").await, 0);
}

/// Lets every call reach Ory before any gets its answer, so that all of them go on to PostgreSQL
/// together: the admin rate limit is off (at its default of 50/s the reads would be 20 ms apart) and
/// the emulator holds the identity reads until all `n` have arrived.
async fn all_at_once<T>(
    env: &Env,
    n: usize,
    calls: impl IntoIterator<Item = impl Future<Output = T> + Send + 'static>,
) -> Vec<T>
where
    T: Send + 'static,
{
    let gate = Gate::new();
    env.ory
        .inject_fault(Route::AdminRead, Fault::held(&gate).times(n));
    let before = env.ory.calls(Route::AdminRead);
    let tasks: Vec<_> = calls.into_iter().map(tokio::spawn).collect();
    assert_eq!(tasks.len(), n);
    assert!(
        env.ory
            .wait_for_calls(Route::AdminRead, before + n as u64, PATIENCE)
            .await,
        "not every call reached Ory"
    );
    gate.open();
    let mut results = Vec::with_capacity(n);
    for task in tasks {
        results.push(task.await.unwrap());
    }
    results
}

/// Racing calls: no admin rate limit, and a connection for each call.
async fn race_env() -> Env {
    Env::with(|c| {
        c.ory.admin_rps = None;
        c.pool.max_size = 64;
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn link_fifty_concurrent_calls_racing_for_one_external_id_have_one_winner() {
    let env = race_env().await;
    let identities: Vec<Uuid> = (0..50)
        .map(|i| identity(&env.ory, "customer", &format!("racer{i}@example.com")))
        .collect();
    let calls = identities.iter().map(|id| {
        let mut client = env.client();
        let request = link_with(*id, "", "the-one-id");
        async move { call(&mut client, request).await }
    });
    let results = all_at_once(&env, 50, calls).await;

    let winners: Vec<_> = results.iter().filter_map(|r| r.as_ref().ok()).collect();
    assert_eq!(winners.len(), 1, "exactly one call wins");
    let winner = winners[0].user.as_ref().unwrap();
    for result in &results {
        if let Err(status) = result {
            assert_code(status, Code::AlreadyExists);
            let (reason, _, metadata) = error_info(status);
            assert_eq!(reason, "EXTERNAL_ID_TAKEN");
            assert_eq!(metadata["user_id"], winner.id);
        }
    }
    assert_eq!(env.db.count("SELECT count(*) FROM users").await, 1);
    assert_eq!(
        env.db
            .count("SELECT count(*) FROM user_external_ids WHERE external_id = 'the-one-id'")
            .await,
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn link_concurrent_calls_for_one_identity_create_one_user() {
    let env = race_env().await;
    let a = identity(&env.ory, "customer", "same@example.com");
    let calls = (0..20).map(|_| {
        let mut client = env.client();
        async move { call(&mut client, link_with(a, "", "")).await }
    });
    let results = all_at_once(&env, 20, calls).await;
    let ids: HashSet<String> = results
        .into_iter()
        .map(|r| r.expect("every call succeeds").user.unwrap().id)
        .collect();
    assert_eq!(ids.len(), 1);
    assert_eq!(env.db.count("SELECT count(*) FROM users").await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn link_nil_user_id_is_invalid_argument() {
    let env = Env::new().await;
    let a = identity(&env.ory, "customer", "nil@example.com");
    let err = call(
        &mut env.client(),
        link_with(a, "00000000-0000-0000-0000-000000000000", ""),
    )
    .await
    .unwrap_err();
    assert_code(&err, Code::InvalidArgument);
    assert_eq!(bad_fields(&err), ["user_id"]);
    assert_eq!(env.ory.calls(Route::AdminRead), 0);
    assert_eq!(env.db.count("SELECT count(*) FROM users").await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn link_when_ory_times_out_is_unavailable_and_stores_nothing() {
    let env = Env::with(|c| c.ory.timeout = Duration::from_millis(300)).await;
    let a = identity(&env.ory, "customer", "slow@example.com");
    // Ory answers, but long after idmap's timeout.
    env.ory.inject_fault(
        Route::AdminRead,
        Fault::delay_only(Duration::from_secs(30)).times(1),
    );
    let err = call(&mut env.client(), link_with(a, "", "crm-slow"))
        .await
        .unwrap_err();
    assert_ory_unavailable_and_nothing_stored(&env, &err).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn link_with_an_api_key_ory_refuses_is_unavailable_naming_the_setting() {
    const WRONG: &str = "ory_pat_wrongwrongwrongwrongwrongwrong";
    let ory = EmulatorConfig {
        api_key: Some("ory_pat_rightrightrightrightrightright".into()),
        ..EmulatorConfig::default()
    };
    let env = Env::with_ory(ory, |c| c.ory.api_key = Some(WRONG.to_owned().into())).await;
    let a = identity(&env.ory, "customer", "key@example.com");
    let err = call(&mut env.client(), link_with(a, "", ""))
        .await
        .unwrap_err();
    assert_code(&err, Code::Unavailable);
    assert_eq!(error_info(&err).0, "ORY_ADMIN_UNAUTHORIZED");
    assert!(err.message().contains("ORY_API_KEY"), "{err:?}");
    assert!(!format!("{err:?}").contains(WRONG));
    assert_eq!(env.db.count("SELECT count(*) FROM users").await, 0);
}

/// The link failed with UNAVAILABLE (ORY_UNAVAILABLE) and left nothing behind: no user, no write
/// queued.
async fn assert_ory_unavailable_and_nothing_stored(env: &Env, err: &tonic::Status) {
    assert_code(err, Code::Unavailable);
    assert_eq!(error_info(err).0, "ORY_UNAVAILABLE");
    assert_eq!(env.db.count("SELECT count(*) FROM users").await, 0);
    assert_eq!(env.db.count("SELECT count(*) FROM ory_outbox").await, 0);
}
