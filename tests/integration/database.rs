//! The database going away: every RPC that needs it answers UNAVAILABLE (DATABASE_UNAVAILABLE),
//! never INTERNAL, and idmap recovers by itself when the database is back.

use idmap::proto::api::{
    GetByExternalIdRequest, GetUserByOryIdRequest, LinkIdentityRequest, ResolveSessionRequest,
    resolve_session_request::Credential,
};
use tonic::Code;

use crate::common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn database_outage_is_unavailable_and_idmap_recovers() {
    let env = Env::new().await;
    let (identity_id, session) = env.customer("dbdown@example.com");
    let mut client = env.client();
    let get = GetUserByOryIdRequest {
        ory_identity_id: identity_id.to_string(),
    };
    let resolve = ResolveSessionRequest {
        credential: Some(Credential::SessionToken(session.token.clone())),
        ..Default::default()
    };
    let link = LinkIdentityRequest {
        ory_identity_id: identity_id.to_string(),
        user_id: String::new(),
        external_id: "crm-dbdown".into(),
        ..Default::default()
    };
    let by_external = GetByExternalIdRequest {
        external_id: "crm-dbdown".into(),
        ..Default::default()
    };

    // Every open connection is cut and new ones are refused.
    let outage = env.db.outage().await;
    let failures = [
        client.get_user_by_ory_id(get.clone()).await.map(|_| ()),
        client
            .get_by_external_id(by_external.clone())
            .await
            .map(|_| ()),
        client.resolve_session(resolve.clone()).await.map(|_| ()),
        client.link_identity(link.clone()).await.map(|_| ()),
    ];
    for (rpc, result) in [
        "GetUserByOryId",
        "GetByExternalId",
        "ResolveSession",
        "LinkIdentity",
    ]
    .into_iter()
    .zip(failures)
    {
        let err = result.unwrap_err();
        assert_code(&err, Code::Unavailable);
        assert_eq!(error_info(&err).0, "DATABASE_UNAVAILABLE", "{rpc}: {err:?}");
    }

    outage.end().await;
    let user = client
        .link_identity(link)
        .await
        .expect("links once the database is back")
        .into_inner()
        .user
        .unwrap();
    let found = client
        .get_by_external_id(by_external)
        .await
        .unwrap()
        .into_inner()
        .user
        .unwrap();
    assert_eq!(found.id, user.id);
    client.resolve_session(resolve).await.unwrap();
}

/// PostgreSQL restarted (a crash, a failover) while idmap serves: cached sessions keep answering,
/// what needs the database is UNAVAILABLE (never INTERNAL), and idmap recovers by itself, its
/// listener included, with nothing queued for Ory lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_restarted_under_load_costs_only_what_needs_it() {
    use embedded_pg::EmbeddedPg;
    use idmap::store::{Database, migrate};
    use secrecy::SecretString;

    let cluster = tokio::task::spawn_blocking(EmbeddedPg::start)
        .await
        .unwrap()
        .expect("a private PostgreSQL to restart");
    let url = SecretString::from(cluster.url());
    migrate::run_pending(&Database::new(&url).unwrap())
        .await
        .unwrap();
    let ory = emulator().await;
    let mut config = config_for_url(url, &ory.url());
    config.listen_heartbeat = std::time::Duration::from_millis(200);
    // A delivery whose outcome cannot be recorded while the database is down keeps its claim
    // until the lease runs out: short here, so the test sees the write arrive after it.
    config.outbox.row_budget = std::time::Duration::from_secs(1);
    config.outbox.lease = std::time::Duration::from_secs(2);
    let server = TestServer::start(config).await;
    let mut client = server.client.clone();
    let person = identity(&ory, "customer", "restart@example.com");
    let session = ory.create_session(person, kratos_emulator::NewSession::default());
    let resolve = ResolveSessionRequest {
        credential: Some(Credential::SessionToken(session.token.clone())),
        ..Default::default()
    };
    client.resolve_session(resolve.clone()).await.unwrap();
    let unknown = GetByExternalIdRequest {
        external_id: "nobody".into(),
        ..Default::default()
    };
    let mut reconnects = server.reconnects();
    // A link whose Ory write cannot be delivered yet: it waits in the outbox across the restart.
    ory.inject_fault(
        kratos_emulator::Route::AdminWrite,
        kratos_emulator::Fault::status(503),
    );
    let queued = identity(&ory, "customer", "queued@example.com");
    let queued_user = client
        .link_identity(LinkIdentityRequest {
            ory_identity_id: queued.to_string(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .user
        .unwrap();

    tokio::task::block_in_place(|| cluster.halt()).expect("stop PostgreSQL");
    for i in 0..20 {
        // A cached session needs no database.
        client
            .resolve_session(resolve.clone())
            .await
            .expect("a cached session is answered while the database is down");
        let err = client
            .get_by_external_id(unknown.clone())
            .await
            .unwrap_err();
        assert_code(&err, Code::Unavailable);
        assert_eq!(error_info(&err).0, "DATABASE_UNAVAILABLE");
        let newcomer = identity(&ory, "customer", &format!("newcomer{i}@example.com"));
        let err = client
            .link_identity(LinkIdentityRequest {
                ory_identity_id: newcomer.to_string(),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_code(&err, Code::Unavailable);
    }
    tokio::task::block_in_place(|| cluster.resume()).expect("restart PostgreSQL");

    // Back without a restart of idmap: lookups, links (and their Ory write), the listener.
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        match client.get_by_external_id(unknown.clone()).await {
            Err(e) if e.code() == Code::NotFound => break,
            Err(e) => {
                assert_eq!(e.code(), Code::Unavailable, "{e:?}");
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "idmap did not recover: {e:?}"
                );
            }
            Ok(_) => panic!("found a user nobody linked"),
        }
    }
    let linked = client
        .link_identity(LinkIdentityRequest {
            ory_identity_id: person.to_string(),
            ..Default::default()
        })
        .await
        .expect("links once the database is back")
        .into_inner()
        .user
        .unwrap();
    ory.clear_faults();
    wait_for_metadata_id(&ory, person, &linked.id).await;
    wait_for_metadata_id(&ory, queued, &queued_user.id).await;
    tokio::time::timeout(PATIENCE, reconnects.wait_for(|n| *n >= 1))
        .await
        .expect("the listener reconnected")
        .unwrap();
    server.stop().await;
}

/// After a failover the old primary answers writes with "read-only transaction": those are
/// UNAVAILABLE, and idmap drops its connections rather than keep writing to a replica.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_demoted_primary_is_unavailable_and_its_connections_are_dropped() {
    use embedded_pg::EmbeddedPg;
    use idmap::proto::api::BatchGetUsersRequest;
    use idmap::store::{Database, migrate};
    use secrecy::SecretString;

    let cluster = tokio::task::spawn_blocking(EmbeddedPg::start)
        .await
        .unwrap()
        .expect("a private PostgreSQL to demote");
    let url = SecretString::from(cluster.url());
    migrate::run_pending(&Database::new(&url).unwrap())
        .await
        .unwrap();
    let ory = emulator().await;
    let mut config = config_for_url(url, &ory.url());
    // Nothing in the background writes while the server is demoted, so the first write to meet
    // the read-only server is this test's (the outbox worker polled, with an empty outbox, when it
    // started; the pending-user sweep ran then too; the shared-session sweep waits 30 s).
    config.outbox.poll_interval = std::time::Duration::from_secs(3600);
    config.pending_users.sweep_interval = std::time::Duration::from_secs(3600);
    let server = TestServer::start(config).await;
    let mut client = server.client.clone();
    // Pooled connections, idle, all made before the "failover" (a batch takes a pooled connection;
    // it queues no Ory write, so nothing wakes the outbox worker).
    let warm = futures::future::join_all((0..4).map(|_| {
        let mut client = client.clone();
        let request = BatchGetUsersRequest {
            ory_identity_ids: (0..10).map(|_| uuid::Uuid::new_v4().to_string()).collect(),
        };
        async move { client.batch_get_users(request).await }
    }))
    .await;
    assert!(warm.iter().all(Result::is_ok));

    // The connections idmap holds now lead to a server that refuses writes; connections made from
    // now on lead to one that accepts them (as after a failover and a DNS switch).
    let (admin, connection) = tokio_postgres::connect(&cluster.url(), tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    for statement in [
        "ALTER DATABASE postgres SET default_transaction_read_only = off",
        "ALTER SYSTEM SET default_transaction_read_only = on",
        "SELECT pg_reload_conf()",
    ] {
        admin.batch_execute(statement).await.unwrap();
    }
    // The reload reaches sessions asynchronously: once this older session has it, the postmaster
    // has passed it on to every backend, which applies it before its next command.
    loop {
        let row = admin
            .query_one("SHOW default_transaction_read_only", &[])
            .await
            .unwrap();
        if row.get::<_, String>(0) == "on" {
            break;
        }
        tokio::task::yield_now().await;
    }
    let link = |email: &str| LinkIdentityRequest {
        ory_identity_id: identity(&ory, "customer", email).to_string(),
        ..Default::default()
    };

    // The first write goes over an old connection and is refused as unavailable.
    let refused = client
        .link_identity(link("during@example.com"))
        .await
        .expect_err("a write over a connection to the demoted server");
    assert_code(&refused, Code::Unavailable);
    assert_eq!(error_info(&refused).0, "DATABASE_UNAVAILABLE");
    // Then no connection made before it is used again: every write goes to the new primary.
    for i in 0..10 {
        if let Err(e) = client
            .link_identity(link(&format!("after{i}@example.com")))
            .await
        {
            panic!("write {i} after the demotion was noticed failed: {e:?}");
        }
    }
    server.stop().await;
}
