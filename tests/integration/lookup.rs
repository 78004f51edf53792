use idmap::proto::api::{GetByExternalIdRequest, GetUserByOryIdRequest, LinkIdentityRequest};
use tonic::Code;

use crate::common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_user_by_ory_id_finds_linked_users_only() {
    let env = Env::new().await;
    let identity_id = identity(&env.ory, "customer", "lookup@example.com");
    let mut client = env.client();
    let linked = client
        .link_identity(LinkIdentityRequest {
            ory_identity_id: identity_id.to_string(),
            user_id: String::new(),
            external_id: "crm-7".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .user
        .unwrap();

    let found = client
        .get_user_by_ory_id(GetUserByOryIdRequest {
            ory_identity_id: identity_id.to_string(),
        })
        .await
        .unwrap()
        .into_inner()
        .user
        .unwrap();
    assert_eq!(found, linked);
    assert_eq!(found.external_id, "crm-7");

    let unknown = uuid::Uuid::new_v4().to_string();
    let err = client
        .get_user_by_ory_id(GetUserByOryIdRequest {
            ory_identity_id: unknown,
        })
        .await
        .unwrap_err();
    assert_code(&err, Code::NotFound);
    assert_eq!(error_info(&err).0, "USER_NOT_FOUND");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_user_by_ory_id_rejects_ids_that_are_not_uuids() {
    let env = Env::new().await;
    let mut client = env.client();
    for bad in [
        "",
        "nope",
        "00000000-0000-0000-0000-000000000000",
        "3f2504e04f8911d39a0c0305e82c3301",
    ] {
        let err = client
            .get_user_by_ory_id(GetUserByOryIdRequest {
                ory_identity_id: bad.into(),
            })
            .await
            .unwrap_err();
        assert_code(&err, Code::InvalidArgument);
        assert_eq!(bad_fields(&err), ["ory_identity_id"]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_by_external_id_matches_exactly() {
    let env = Env::new().await;
    let identity_id = identity(&env.ory, "employee", "ext@example.com");
    let mut client = env.client();
    let external = "Émployée #42 / ünïcode";
    let linked = client
        .link_identity(LinkIdentityRequest {
            ory_identity_id: identity_id.to_string(),
            user_id: String::new(),
            external_id: external.into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .user
        .unwrap();
    let found = client
        .get_by_external_id(GetByExternalIdRequest {
            external_id: external.into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .user
        .unwrap();
    assert_eq!(found, linked);
    assert_eq!(found.schema_id, "employee");

    for miss in ["émployée #42 / ünïcode", "Émployée #42 / ünïcode ", "other"] {
        let err = client
            .get_by_external_id(GetByExternalIdRequest {
                external_id: miss.into(),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_code(&err, Code::NotFound);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_by_external_id_rejects_invalid_ids() {
    let env = Env::new().await;
    let mut client = env.client();
    for bad in [
        String::new(),
        "a".repeat(256),
        "tab\there".into(),
        "nul\0".into(),
    ] {
        let err = client
            .get_by_external_id(GetByExternalIdRequest {
                external_id: bad,
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_code(&err, Code::InvalidArgument);
        assert_eq!(bad_fields(&err), ["external_id"]);
    }
    // 255 bytes is the limit, and allowed.
    let err = client
        .get_by_external_id(GetByExternalIdRequest {
            external_id: "a".repeat(255),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_code(&err, Code::NotFound);
}

/// Lookups share a couple of pipelined connections; many at once, none cached, each gets its own
/// user back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_uncached_lookups_each_get_their_own_user() {
    let env = Env::with(|c| {
        c.cache.user_max_entries = 1;
        c.pool.read_connections = 2;
        c.ory.admin_rps = None;
    })
    .await;
    let mut client = env.client();
    let mut linked = Vec::new();
    for i in 0..40 {
        let identity_id = identity(&env.ory, "customer", &format!("many{i}@example.com"));
        let user = client
            .link_identity(LinkIdentityRequest {
                ory_identity_id: identity_id.to_string(),
                user_id: String::new(),
                external_id: format!("crm-many-{i}"),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .user
            .unwrap();
        linked.push(user);
    }
    let lookups = linked.iter().cycle().take(400).map(|user| {
        let mut client = env.client();
        let user = user.clone();
        async move {
            let by_id = client
                .get_user_by_ory_id(GetUserByOryIdRequest {
                    ory_identity_id: user.ory_identity_id.clone(),
                })
                .await
                .unwrap()
                .into_inner()
                .user
                .unwrap();
            let by_external = client
                .get_by_external_id(GetByExternalIdRequest {
                    external_id: user.external_id.clone(),
                    ..Default::default()
                })
                .await
                .unwrap()
                .into_inner()
                .user
                .unwrap();
            assert_eq!(by_id, user);
            assert_eq!(by_external, user);
        }
    });
    futures::future::join_all(lookups).await;
}
