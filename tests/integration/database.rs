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
    };
    let link = LinkIdentityRequest {
        ory_identity_id: identity_id.to_string(),
        user_id: String::new(),
        external_id: "crm-dbdown".into(),
    };
    let by_external = GetByExternalIdRequest {
        external_id: "crm-dbdown".into(),
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
