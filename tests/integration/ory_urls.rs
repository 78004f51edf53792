//! ORY_PUBLIC_URL and ORY_ADMIN_URL against self-hosted Kratos's two ports: idmap never follows
//! the redirects Kratos answers a wrong port with, and says which setting is wrong.

use kratos_emulator::{Emulator, EmulatorConfig, Route};
use tonic::Code;

use crate::common::*;

async fn self_hosted() -> Emulator {
    Emulator::start(
        "127.0.0.1:0".parse().unwrap(),
        EmulatorConfig {
            separate_admin_listener: true,
            ..EmulatorConfig::default()
        },
    )
    .await
    .expect("start the emulator")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn split_public_and_admin_urls_serve_every_call() {
    let db = TestDb::new().await;
    let ory = self_hosted().await;
    let mut config = config(&db, &ory);
    config.ory.admin_url = ory.admin_url().parse().unwrap();
    let server = TestServer::start(config).await;
    let id = identity(&ory, "customer", "split@example.com");
    let session = ory.create_session(id, kratos_emulator::NewSession::default());
    let mut client = server.client.clone();
    let resolved = client
        .resolve_session(token(&session.token))
        .await
        .unwrap()
        .into_inner();
    let user = resolved.user.expect("linked just in time");
    let linked = client
        .link_identity(link(id))
        .await
        .unwrap()
        .into_inner()
        .user
        .unwrap();
    assert_eq!(linked.id, user.id);
    wait_for_metadata_id(&ory, id, &user.id).await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_url_left_at_kratos_public_port_is_unavailable_naming_ory_admin_url() {
    let db = TestDb::new().await;
    let ory = self_hosted().await;
    // ORY_ADMIN_URL unset: it defaults to ORY_PUBLIC_URL, right for Ory Network, wrong here.
    let server = TestServer::start(config(&db, &ory)).await;
    let id = identity(&ory, "customer", "public@example.com");
    let err = server
        .client
        .clone()
        .link_identity(link(id))
        .await
        .unwrap_err();
    assert_code(&err, Code::Unavailable);
    assert_eq!(error_info(&err).0, "ORY_REDIRECTED");
    assert!(err.message().contains("ORY_ADMIN_URL"), "{err:?}");
    // The redirect was not followed, and nothing was stored.
    assert_eq!(ory.calls(Route::AdminRead), 0);
    assert_eq!(db.count("SELECT count(*) FROM users").await, 0);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn public_url_at_kratos_admin_port_is_unavailable_naming_ory_public_url() {
    let db = TestDb::new().await;
    let ory = self_hosted().await;
    let server = TestServer::start(config_for(&db, &ory.admin_url())).await;
    let id = identity(&ory, "customer", "admin@example.com");
    let session = ory.create_session(id, kratos_emulator::NewSession::default());
    let err = server
        .client
        .clone()
        .resolve_session(token(&session.token))
        .await
        .unwrap_err();
    // Not UNAUTHENTICATED: the session is fine, idmap's setting is not.
    assert_code(&err, Code::Unavailable);
    assert_eq!(error_info(&err).0, "ORY_REDIRECTED");
    assert!(err.message().contains("ORY_PUBLIC_URL"), "{err:?}");
    assert!(!format!("{err:?}").contains(&session.token));
    // The session token was not carried on to the public port.
    assert_eq!(ory.calls(Route::Whoami), 0);
    server.stop().await;
}
