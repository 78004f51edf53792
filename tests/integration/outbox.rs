use std::time::Duration;

use idmap::proto::api::LinkIdentityRequest;
use kratos_emulator::{EmulatorConfig, Fault, Route};
use serde_json::Value;
use uuid::Uuid;

use crate::common::*;

async fn link_user(client: &Client, identity: Uuid) -> String {
    client
        .clone()
        .link_identity(link(identity))
        .await
        .expect("the link succeeds")
        .into_inner()
        .user
        .unwrap()
        .id
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metadata_write_survives_an_ory_outage_and_a_restart() {
    let db = TestDb::new().await;
    let ory = emulator().await;
    let identity_id = identity(&ory, "customer", "durable@example.com");
    // Ory refuses every admin write until told otherwise.
    ory.inject_fault(Route::AdminWrite, Fault::status(500));

    let server = TestServer::start(config(&db, &ory)).await;
    let user = server
        .client
        .clone()
        .link_identity(LinkIdentityRequest {
            ory_identity_id: identity_id.to_string(),
            user_id: String::new(),
            external_id: "crm-durable".into(),
            ..Default::default()
        })
        .await
        .expect("the link succeeds while Ory refuses writes")
        .into_inner()
        .user
        .unwrap();

    // The worker has tried and failed at least twice, so the retry path has run (the first
    // failure is recorded before the second attempt starts).
    assert!(
        ory.wait_for_calls(Route::AdminWrite, 2, PATIENCE).await,
        "the worker never retried"
    );
    assert_eq!(
        ory.identity(identity_id).unwrap()["metadata_public"],
        Value::Null
    );
    assert_eq!(
        db.count("SELECT count(*) FROM ory_outbox WHERE attempts >= 1 AND last_error IS NOT NULL")
            .await,
        1
    );

    // idmap goes away with the write still pending...
    server.stop().await;
    ory.clear_faults();
    // ...and a new process on the same database delivers it.
    let restarted = TestServer::start(config(&db, &ory)).await;
    wait_for_metadata_id(&ory, identity_id, &user.id).await;
    db.wait_for_outbox("SELECT count(*) FROM ory_outbox", 0)
        .await;
    restarted.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metadata_write_arrives_once_ory_accepts_writes_again_in_the_same_process() {
    let env = Env::new().await;
    let identity_id = identity(&env.ory, "customer", "recovers@example.com");
    env.ory.inject_fault(Route::AdminWrite, Fault::status(503));
    let user = link_user(&env.client(), identity_id).await;
    assert!(env.ory.wait_for_calls(Route::AdminWrite, 2, PATIENCE).await);
    assert_eq!(
        env.ory.identity(identity_id).unwrap()["metadata_public"],
        Value::Null
    );
    // Ory recovers; the same process's retries deliver the write.
    env.ory.clear_faults();
    wait_for_metadata_id(&env.ory, identity_id, &user).await;
    env.db
        .wait_for_outbox("SELECT count(*) FROM ory_outbox", 0)
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metadata_write_is_not_repeated_once_delivered() {
    let env = Env::new().await;
    let identity_id = identity(&env.ory, "customer", "once@example.com");
    let mut client = env.client();
    let request = link(identity_id);
    let user = client
        .link_identity(request.clone())
        .await
        .unwrap()
        .into_inner()
        .user
        .unwrap();
    wait_for_metadata_id(&env.ory, identity_id, &user.id).await;
    let writes = env.ory.calls(Route::AdminWrite);
    assert_eq!(writes, 1);
    // Linking again sees the id in Ory and queues nothing.
    client.link_identity(request).await.unwrap();
    assert_eq!(env.db.count("SELECT count(*) FROM ory_outbox").await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metadata_write_for_a_deleted_identity_is_parked_not_retried_forever() {
    let db = TestDb::new().await;
    let ory = emulator().await;
    let identity_id = identity(&ory, "customer", "gone@example.com");
    ory.inject_fault(Route::AdminWrite, Fault::status(503));
    let server = TestServer::start(config(&db, &ory)).await;
    link_user(&server.client, identity_id).await;
    ory.clear_faults();
    ory.delete_identity(identity_id);
    db.wait_for_outbox(
        "SELECT count(*) FROM ory_outbox WHERE failed_at IS NOT NULL",
        1,
    )
    .await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metadata_write_answered_204_is_delivered() {
    let env = Env::new().await;
    let identity_id = identity(&env.ory, "customer", "nocontent@example.com");
    // Kratos answers the patch 200 with the identity; a proxy or another implementation may answer
    // 204 No Content, which is as much a success.
    env.ory
        .inject_fault(Route::AdminWrite, Fault::answer(204, None).times(1));
    link_user(&env.client(), identity_id).await;
    env.db
        .wait_for_outbox("SELECT count(*) FROM ory_outbox", 0)
        .await;
    assert_eq!(env.ory.calls(Route::AdminWrite), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metadata_write_ory_rejects_is_parked_after_a_few_attempts() {
    let env = Env::new().await;
    let identity_id = identity(&env.ory, "customer", "rejected@example.com");
    // Ory refuses the patch itself, as Kratos does when the identity no longer validates.
    env.ory.inject_fault(Route::AdminWrite, Fault::status(400));
    link_user(&env.client(), identity_id).await;
    env.db
        .wait_for_outbox(
            "SELECT count(*) FROM ory_outbox WHERE failed_at IS NOT NULL",
            1,
        )
        .await;
    assert_eq!(
        env.db
            .count(&format!(
                "SELECT count(*) FROM ory_outbox WHERE attempts = {} AND last_error LIKE '%status 400%'",
                idmap::worker::outbox::MAX_REJECTED_ATTEMPTS
            ))
            .await,
        1
    );
    assert_eq!(
        env.ory.calls(Route::AdminWrite),
        idmap::worker::outbox::MAX_REJECTED_ATTEMPTS as u64
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metadata_write_with_refused_credentials_keeps_retrying_until_they_work() {
    let env = Env::new().await;
    let identity_id = identity(&env.ory, "customer", "refused@example.com");
    // Ory Network refusing the API key: a setting an operator fixes, so the write must not be
    // parked meanwhile.
    env.ory.inject_fault(Route::AdminWrite, Fault::status(401));
    let user = link_user(&env.client(), identity_id).await;
    let beyond_parking = idmap::worker::outbox::MAX_REJECTED_ATTEMPTS as u64 + 2;
    assert!(
        env.ory
            .wait_for_calls(Route::AdminWrite, beyond_parking, PATIENCE)
            .await
    );
    assert_eq!(
        env.db
            .count(
                "SELECT count(*) FROM ory_outbox WHERE failed_at IS NULL AND last_error LIKE '%ORY_API_KEY%'"
            )
            .await,
        1
    );
    env.ory.clear_faults();
    wait_for_metadata_id(&env.ory, identity_id, &user).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_key_is_sent_as_bearer_on_the_identity_check_and_the_metadata_write() {
    const KEY: &str = "ory_pat_0123456789abcdefghijklmnopqrstuv";
    let ory = EmulatorConfig {
        api_key: Some(KEY.into()),
        ..EmulatorConfig::default()
    };
    // The emulator answers 401 to any admin call without the key, so both the link's identity
    // check and the outbox's read and patch must carry it.
    let env = Env::with_ory(ory, |c| c.ory.api_key = Some(KEY.to_owned().into())).await;
    let identity_id = identity(&env.ory, "customer", "bearer@example.com");
    let user = link_user(&env.client(), identity_id).await;
    wait_for_metadata_id(&env.ory, identity_id, &user).await;
    assert_eq!(env.ory.calls(Route::AdminWrite), 1);
    env.db
        .wait_for_outbox("SELECT count(*) FROM ory_outbox", 0)
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_with_ory_writes_hanging_ends_within_the_grace_period_and_loses_nothing() {
    let db = TestDb::new().await;
    let ory = emulator().await;
    let identities: Vec<Uuid> = (0..3)
        .map(|i| identity(&ory, "customer", &format!("hang{i}@example.com")))
        .collect();
    // Ory takes every admin write and never answers (far past the grace period and idmap's Ory
    // timeout).
    ory.inject_fault(
        Route::AdminWrite,
        Fault::delay_only(Duration::from_secs(600)),
    );
    let grace = Duration::from_secs(2);
    let mut config = config(&db, &ory);
    config.shutdown_grace = grace;
    config.ory.timeout = Duration::from_secs(300);
    config.outbox = config.outbox.clone().for_ory_timeout(config.ory.timeout);
    let mut server = TestServer::start(config).await;
    let mut users = Vec::new();
    for id in &identities {
        users.push(link_user(&server.client, *id).await);
    }
    // The worker is stuck in a write.
    assert!(ory.wait_for_calls(Route::AdminWrite, 1, PATIENCE).await);

    server.begin_shutdown();
    tokio::time::timeout(grace, server.join())
        .await
        .expect("shutdown finishes within the grace period")
        .expect("idmap exits cleanly");
    // The worker gave its rows back: they are due now, not hidden behind its lease.
    assert_eq!(
        db.count(
            "SELECT count(*) FROM ory_outbox WHERE failed_at IS NULL AND next_attempt_at <= now()"
        )
        .await,
        3
    );

    ory.clear_faults();
    let restarted = TestServer::start(crate::common::config(&db, &ory)).await;
    for (id, user) in identities.iter().zip(&users) {
        wait_for_metadata_id(&ory, *id, user).await;
    }
    db.wait_for_outbox("SELECT count(*) FROM ory_outbox", 0)
        .await;
    restarted.stop().await;
}
