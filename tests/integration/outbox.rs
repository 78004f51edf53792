use idmap::proto::api::LinkIdentityRequest;
use kratos_emulator::{Fault, Route};
use serde_json::Value;

use crate::common::*;

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
        })
        .await
        .expect("the link succeeds while Ory refuses writes")
        .into_inner()
        .user
        .unwrap();

    // Wait until the worker has tried and failed at least twice, so the retry path has run.
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while ory.calls(Route::AdminWrite) < 2 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the worker never tried"
        );
        tokio::task::yield_now().await;
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
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
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while db.count("SELECT count(*) FROM ory_outbox").await != 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the row was never completed"
        );
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    restarted.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metadata_write_is_not_repeated_once_delivered() {
    let env = Env::new().await;
    let identity_id = identity(&env.ory, "customer", "once@example.com");
    let mut client = env.client();
    let request = LinkIdentityRequest {
        ory_identity_id: identity_id.to_string(),
        user_id: String::new(),
        external_id: String::new(),
    };
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
    server
        .client
        .clone()
        .link_identity(LinkIdentityRequest {
            ory_identity_id: identity_id.to_string(),
            user_id: String::new(),
            external_id: String::new(),
        })
        .await
        .unwrap();
    ory.clear_faults();
    ory.delete_identity(identity_id);
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while db
        .count("SELECT count(*) FROM ory_outbox WHERE failed_at IS NOT NULL")
        .await
        != 1
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the row was never parked"
        );
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    server.stop().await;
}
