//! Business ids in namespaces (SetExternalId, RemoveExternalId, BatchGetByExternalIds, former
//! values), and the namespace kept in step with Ory's own `external_id`: the mirror through the
//! outbox, adoption at link time, and GetByExternalId asking Ory for ids only it knows.

use idmap::config::Config;
use idmap::domain::Namespace;
use idmap::proto::api::{
    self, BatchGetByExternalIdsRequest, GetByExternalIdRequest, GetByExternalIdResponse,
    LinkIdentityRequest, RemoveExternalIdRequest, SetExternalIdRequest, remove_external_id_request,
    set_external_id_request,
};
use kratos_emulator::{NewIdentity, NewSession, Route};
use serde_json::json;
use tonic::{Code, Status};
use uuid::Uuid;

use crate::common::*;

fn ext(namespace: &str, value: &str) -> api::ExternalId {
    api::ExternalId {
        namespace: namespace.into(),
        value: value.into(),
    }
}

/// The user's ids as (namespace, value) pairs, in the order the API gives them.
fn ids_of(user: &api::User) -> Vec<(String, String)> {
    user.external_ids
        .iter()
        .map(|id| (id.namespace.clone(), id.value.clone()))
        .collect()
}

fn pairs(list: &[(&str, &str)]) -> Vec<(String, String)> {
    list.iter()
        .map(|(n, v)| (n.to_string(), v.to_string()))
        .collect()
}

/// Keeps `namespace` in step with Ory's `external_id`, as IDMAP_ORY_EXTERNAL_ID_NAMESPACE does.
fn mirroring(namespace: &str) -> impl FnOnce(&mut Config) {
    let namespace = Namespace::parse("namespace", namespace).unwrap();
    move |c: &mut Config| {
        c.service.ory_external_id_namespace = Some(namespace.clone());
        c.outbox.external_id_namespace = Some(namespace);
    }
}

async fn linked(client: &mut Client, identity: Uuid, ids: Vec<api::ExternalId>) -> api::User {
    client
        .link_identity(LinkIdentityRequest {
            ory_identity_id: identity.to_string(),
            external_ids: ids,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .user
        .unwrap()
}

async fn set(
    client: &mut Client,
    identity: Uuid,
    namespace: &str,
    value: &str,
    replace: bool,
) -> Result<api::User, Status> {
    client
        .set_external_id(SetExternalIdRequest {
            subject: Some(set_external_id_request::Subject::OryIdentityId(
                identity.to_string(),
            )),
            namespace: namespace.into(),
            value: value.into(),
            replace,
        })
        .await
        .map(|r| r.into_inner().user.unwrap())
}

async fn remove(client: &mut Client, identity: Uuid, namespace: &str) -> Result<api::User, Status> {
    client
        .remove_external_id(RemoveExternalIdRequest {
            subject: Some(remove_external_id_request::Subject::OryIdentityId(
                identity.to_string(),
            )),
            namespace: namespace.into(),
        })
        .await
        .map(|r| r.into_inner().user.unwrap())
}

async fn get(
    client: &mut Client,
    namespace: &str,
    value: &str,
    include_former: bool,
) -> Result<GetByExternalIdResponse, Status> {
    client
        .get_by_external_id(GetByExternalIdRequest {
            external_id: value.into(),
            namespace: namespace.into(),
            include_former,
        })
        .await
        .map(|r| r.into_inner())
}

async fn holder(client: &mut Client, namespace: &str, value: &str) -> String {
    get(client, namespace, value, false)
        .await
        .unwrap_or_else(|e| panic!("{namespace}/{value}: {e:?}"))
        .user
        .unwrap()
        .id
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_holds_one_value_per_namespace_and_a_value_can_repeat_across_namespaces() {
    let env = Env::new().await;
    let mut client = env.client();
    let a = identity(&env.ory, "customer", "ns-a@example.com");
    let b = identity(&env.ory, "customer", "ns-b@example.com");

    // The single-id field and the list together, in one link.
    let user_a = client
        .link_identity(LinkIdentityRequest {
            ory_identity_id: a.to_string(),
            external_id: "crm-1".into(),
            external_ids: vec![ext("billing", "cus_1"), ext("erp", "42")],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .user
        .unwrap();
    assert_eq!(
        ids_of(&user_a),
        pairs(&[("", "crm-1"), ("billing", "cus_1"), ("erp", "42")])
    );
    assert_eq!(user_a.external_id, "crm-1");

    // The same value in another namespace belongs to another user.
    let user_b = linked(&mut client, b, vec![ext("billing", "42")]).await;
    assert_eq!(ids_of(&user_b), pairs(&[("billing", "42")]));
    assert_eq!(user_b.external_id, "", "no default-namespace id");
    assert_eq!(holder(&mut client, "erp", "42").await, user_a.id);
    assert_eq!(holder(&mut client, "billing", "42").await, user_b.id);
    assert_eq!(holder(&mut client, "billing", "cus_1").await, user_a.id);
    let err = get(&mut client, "", "42", false).await.unwrap_err();
    assert_code(&err, Code::NotFound);
    assert_eq!(error_info(&err).0, "USER_NOT_FOUND");

    // A namespace added later by user id sorts into place.
    let user_a = client
        .set_external_id(SetExternalIdRequest {
            subject: Some(set_external_id_request::Subject::UserId(user_a.id.clone())),
            namespace: "crm.legacy".into(),
            value: "L-7".into(),
            replace: false,
        })
        .await
        .unwrap()
        .into_inner()
        .user
        .unwrap();
    assert_eq!(
        ids_of(&user_a),
        pairs(&[
            ("", "crm-1"),
            ("billing", "cus_1"),
            ("crm.legacy", "L-7"),
            ("erp", "42")
        ])
    );
    // GetUserByOryId shows the same.
    let by_identity = client
        .get_user_by_ory_id(api::GetUserByOryIdRequest {
            ory_identity_id: a.to_string(),
        })
        .await
        .unwrap()
        .into_inner()
        .user
        .unwrap();
    assert_eq!(by_identity.external_ids, user_a.external_ids);

    // Many values of one namespace at once: request order, duplicates once, misses left out.
    let batch = client
        .batch_get_by_external_ids(BatchGetByExternalIdsRequest {
            namespace: "billing".into(),
            values: vec!["42".into(), "nobody".into(), "cus_1".into(), "42".into()],
        })
        .await
        .unwrap()
        .into_inner()
        .users;
    let ids: Vec<&str> = batch.iter().map(|u| u.id.as_str()).collect();
    assert_eq!(ids, [user_b.id.as_str(), user_a.id.as_str()]);
    let too_many = client
        .batch_get_by_external_ids(BatchGetByExternalIdsRequest {
            namespace: "billing".into(),
            values: (0..1001).map(|i| format!("v{i}")).collect(),
        })
        .await
        .unwrap_err();
    assert_code(&too_many, Code::InvalidArgument);
    let bad = client
        .batch_get_by_external_ids(BatchGetByExternalIdsRequest {
            namespace: "Billing".into(),
            values: vec!["ok".into(), String::new()],
        })
        .await
        .unwrap_err();
    assert_code(&bad, Code::InvalidArgument);
    assert_eq!(bad_fields(&bad), ["namespace", "values[1]"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conflicts_are_per_namespace_and_change_nothing() {
    let env = Env::new().await;
    let mut client = env.client();
    let a = identity(&env.ory, "customer", "conflict-a@example.com");
    let b = identity(&env.ory, "customer", "conflict-b@example.com");
    let user_a = linked(&mut client, a, vec![ext("crm", "1")]).await;
    let user_b = linked(&mut client, b, vec![]).await;

    // Taken in that namespace, free in another.
    let taken = set(&mut client, b, "crm", "1", false).await.unwrap_err();
    assert_code(&taken, Code::AlreadyExists);
    let (reason, domain, metadata) = error_info(&taken);
    assert_eq!(
        (reason.as_str(), domain.as_str()),
        ("EXTERNAL_ID_TAKEN", "idmap")
    );
    assert_eq!(metadata["namespace"], "crm");
    assert_eq!(metadata["external_id"], "1");
    assert_eq!(metadata["user_id"], user_a.id);
    let elsewhere = set(&mut client, b, "billing", "1", false).await.unwrap();
    assert_eq!(ids_of(&elsewhere), pairs(&[("billing", "1")]));

    // Another value in a namespace the user holds one in: refused without `replace`.
    let already = set(&mut client, a, "crm", "2", false).await.unwrap_err();
    assert_code(&already, Code::AlreadyExists);
    let (reason, _, metadata) = error_info(&already);
    assert_eq!(reason, "EXTERNAL_ID_ALREADY_SET");
    assert_eq!(metadata["namespace"], "crm");
    assert_eq!(metadata["external_id"], "1", "the value held");
    assert_eq!(metadata["ory_identity_id"], a.to_string());

    // A link that clashes in one namespace stores none of its ids.
    let clash = client
        .link_identity(LinkIdentityRequest {
            ory_identity_id: a.to_string(),
            external_ids: vec![ext("erp", "e-1"), ext("crm", "2")],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(error_info(&clash).0, "EXTERNAL_ID_ALREADY_SET");
    assert_eq!(error_info(&clash).2["namespace"], "crm");
    let clash = client
        .link_identity(LinkIdentityRequest {
            ory_identity_id: b.to_string(),
            external_ids: vec![ext("erp", "e-2"), ext("crm", "1")],
            ..Default::default()
        })
        .await
        .unwrap_err();
    let (reason, _, metadata) = error_info(&clash);
    assert_eq!(reason, "EXTERNAL_ID_TAKEN");
    assert_eq!(
        (metadata["namespace"].as_str(), metadata["user_id"].as_str()),
        ("crm", user_a.id.as_str())
    );
    for (value, namespace) in [("e-1", "erp"), ("e-2", "erp")] {
        assert_code(
            &get(&mut client, namespace, value, false).await.unwrap_err(),
            Code::NotFound,
        );
    }

    // Repeating what is held is idempotent.
    let again = client
        .link_identity(LinkIdentityRequest {
            ory_identity_id: a.to_string(),
            external_ids: vec![ext("crm", "1")],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!again.created);
    assert_eq!(again.user.unwrap().updated_at, user_a.updated_at);
    let same = set(&mut client, a, "crm", "1", false).await.unwrap();
    assert_eq!(same.updated_at, user_a.updated_at, "nothing changed");

    // Bad input is refused before anything is looked at.
    let err = client
        .link_identity(LinkIdentityRequest {
            ory_identity_id: b.to_string(),
            external_ids: vec![ext("crm", "x"), ext("crm", "y")],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_code(&err, Code::InvalidArgument);
    assert_eq!(bad_fields(&err), ["external_ids[1].namespace"]);
    let err = client
        .set_external_id(SetExternalIdRequest {
            subject: None,
            namespace: "-crm".into(),
            value: "v".into(),
            replace: false,
        })
        .await
        .unwrap_err();
    assert_code(&err, Code::InvalidArgument);
    assert_eq!(bad_fields(&err), ["subject", "namespace"]);
    let err = set(&mut client, b, &"n".repeat(65), "v", false)
        .await
        .unwrap_err();
    assert_eq!(bad_fields(&err), ["namespace"]);
    let unknown = client
        .remove_external_id(RemoveExternalIdRequest {
            subject: Some(remove_external_id_request::Subject::UserId(
                Uuid::new_v4().to_string(),
            )),
            namespace: "crm".into(),
        })
        .await
        .unwrap_err();
    assert_code(&unknown, Code::NotFound);
    assert_eq!(error_info(&unknown).0, "USER_NOT_FOUND");
    let user_b_now = client
        .get_user_by_ory_id(api::GetUserByOryIdRequest {
            ory_identity_id: b.to_string(),
        })
        .await
        .unwrap()
        .into_inner()
        .user
        .unwrap();
    assert_eq!(ids_of(&user_b_now), pairs(&[("billing", "1")]));
    assert_eq!(user_b_now.id, user_b.id);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn old_clients_single_id_calls_are_unchanged() {
    let env = Env::new().await;
    let mut client = env.client();
    let a = identity(&env.ory, "customer", "old-a@example.com");
    let b = identity(&env.ory, "customer", "old-b@example.com");
    // What a client generated before namespaces sends: fields 1 to 3 only.
    let user = client
        .link_identity(link_with(a, "", "crm-100"))
        .await
        .unwrap()
        .into_inner()
        .user
        .unwrap();
    assert_eq!(user.external_id, "crm-100");
    let found = client
        .get_by_external_id(GetByExternalIdRequest {
            external_id: "crm-100".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(found.user.unwrap().id, user.id);
    assert!(!found.former);

    let taken = client
        .link_identity(link_with(b, "", "crm-100"))
        .await
        .unwrap_err();
    let (reason, _, metadata) = error_info(&taken);
    assert_eq!(reason, "EXTERNAL_ID_TAKEN");
    // Exactly the metadata clients saw before namespaces: no `namespace` key for the default.
    assert_eq!(
        metadata,
        [
            ("external_id".to_string(), "crm-100".to_string()),
            ("user_id".to_string(), user.id.clone())
        ]
        .into_iter()
        .collect()
    );
    let already = client
        .link_identity(link_with(a, "", "crm-200"))
        .await
        .unwrap_err();
    let (reason, _, metadata) = error_info(&already);
    assert_eq!(reason, "EXTERNAL_ID_ALREADY_SET");
    assert_eq!(metadata["external_id"], "crm-100");
    assert_eq!(metadata["ory_identity_id"], a.to_string());
    assert!(!metadata.contains_key("namespace"), "{metadata:?}");

    // A value set in the default namespace through the new API is the old field's value.
    let other = linked(&mut client, b, vec![ext("", "crm-300")]).await;
    assert_eq!(other.external_id, "crm-300");
    let found = client
        .get_by_external_id(GetByExternalIdRequest {
            external_id: "crm-300".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(found.user.unwrap().id, other.id);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replaced_and_removed_values_stay_findable_as_former() {
    let env = Env::new().await;
    let mut client = env.client();
    let a = identity(&env.ory, "customer", "former-a@example.com");
    let b = identity(&env.ory, "customer", "former-b@example.com");
    let user_a = linked(&mut client, a, vec![ext("crm", "old")]).await;
    linked(&mut client, b, vec![]).await;
    // Cached under the old value before it changes.
    assert_eq!(holder(&mut client, "crm", "old").await, user_a.id);

    let replaced = set(&mut client, a, "crm", "new", true).await.unwrap();
    assert_eq!(ids_of(&replaced), pairs(&[("crm", "new")]));
    assert_ne!(replaced.updated_at, user_a.updated_at);
    assert_code(
        &get(&mut client, "crm", "old", false).await.unwrap_err(),
        Code::NotFound,
    );
    let former = get(&mut client, "crm", "old", true).await.unwrap();
    assert!(former.former);
    assert_eq!(former.user.unwrap().id, user_a.id);
    let current = get(&mut client, "crm", "new", true).await.unwrap();
    assert!(!current.former);

    // A former value can be given to another user, who then holds it.
    let user_b = set(&mut client, b, "crm", "old", false).await.unwrap();
    let now = get(&mut client, "crm", "old", true).await.unwrap();
    assert!(!now.former);
    assert_eq!(now.user.unwrap().id, user_b.id);

    // Removed: gone from the user, findable as former, and removing again is fine.
    let removed = remove(&mut client, a, "crm").await.unwrap();
    assert!(removed.external_ids.is_empty());
    assert_code(
        &get(&mut client, "crm", "new", false).await.unwrap_err(),
        Code::NotFound,
    );
    let former = get(&mut client, "crm", "new", true).await.unwrap();
    assert!(former.former);
    assert_eq!(former.user.unwrap().id, user_a.id);
    let again = remove(&mut client, a, "crm").await.unwrap();
    assert_eq!(again.updated_at, removed.updated_at);

    // The last holder is the one a former value answers with.
    let user_b = remove(&mut client, b, "crm").await.unwrap();
    let former = get(&mut client, "crm", "old", true).await.unwrap();
    assert!(former.former);
    assert_eq!(former.user.unwrap().id, user_b.id);
    assert_code(
        &get(&mut client, "crm", "never", true).await.unwrap_err(),
        Code::NotFound,
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_on_one_replica_evicts_the_user_on_the_others() {
    let env = Env::new().await;
    let other = TestServer::start(config(&env.db, &env.ory)).await;
    let mut a_client = env.client();
    let mut b_client = other.client.clone();
    let a = identity(&env.ory, "customer", "replicas@example.com");
    let user = linked(&mut a_client, a, vec![ext("crm", "r-1")]).await;
    // The other replica caches the user under its value.
    assert_eq!(holder(&mut b_client, "crm", "r-1").await, user.id);

    set(&mut a_client, a, "crm", "r-2", true).await.unwrap();
    other.heard_everything_from(&env.server, PATIENCE).await;
    assert_code(
        &get(&mut b_client, "crm", "r-1", false).await.unwrap_err(),
        Code::NotFound,
    );
    assert_eq!(holder(&mut b_client, "crm", "r-2").await, user.id);
    let by_identity = b_client
        .get_user_by_ory_id(api::GetUserByOryIdRequest {
            ory_identity_id: a.to_string(),
        })
        .await
        .unwrap()
        .into_inner()
        .user
        .unwrap();
    assert_eq!(ids_of(&by_identity), pairs(&[("crm", "r-2")]));
    other.stop().await;
}

/// Waits until the identity's `external_id` in Ory is `want` (`None`: unset).
async fn wait_for_ory_external_id(env: &Env, identity: Uuid, want: Option<&str>) {
    let wanted = want.map(str::to_owned);
    env.ory
        .wait_for_identity(
            identity,
            move |i| i["external_id"].as_str().map(str::to_owned) == wanted,
            PATIENCE,
        )
        .await
        .unwrap_or_else(|| panic!("external_id of {identity} never became {want:?}"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_mirrored_namespace_follows_into_ory_and_a_409_is_parked_with_its_reason() {
    let env = Env::with(mirroring("crm")).await;
    let mut client = env.client();
    let a = identity(&env.ory, "customer", "mirror-a@example.com");
    linked(&mut client, a, vec![]).await;

    set(&mut client, a, "crm", "c-1", false).await.unwrap();
    wait_for_ory_external_id(&env, a, Some("c-1")).await;
    set(&mut client, a, "crm", "c-2", true).await.unwrap();
    wait_for_ory_external_id(&env, a, Some("c-2")).await;
    remove(&mut client, a, "crm").await.unwrap();
    wait_for_ory_external_id(&env, a, None).await;

    // Other namespaces are idmap's alone: nothing is queued for Ory.
    set(&mut client, a, "billing", "b-1", false).await.unwrap();
    assert_eq!(
        env.db
            .count("SELECT count(*) FROM ory_outbox WHERE kind = 'sync_external_id'")
            .await,
        0
    );

    // A value given at link time goes to Ory too.
    let b = identity(&env.ory, "customer", "mirror-b@example.com");
    linked(&mut client, b, vec![ext("crm", "c-b")]).await;
    wait_for_ory_external_id(&env, b, Some("c-b")).await;

    // Ory's `external_id` holds at most 64 characters: a longer value is refused up front.
    let long = set(&mut client, a, "crm", &"x".repeat(65), false)
        .await
        .unwrap_err();
    assert_code(&long, Code::InvalidArgument);
    assert_eq!(bad_fields(&long), ["value"]);
    set(&mut client, a, "billing", &"x".repeat(65), true)
        .await
        .expect("other namespaces are not bound by Ory's limit");

    // Another identity holds the value in Ory (set there directly): Ory answers 409 and the write
    // is parked with a reason that says so; idmap keeps the value.
    env.ory.create_identity(NewIdentity {
        schema_id: "customer".into(),
        traits: json!({"email": "holder@example.com"}),
        identifiers: vec!["holder@example.com".into()],
        external_id: Some("c-taken".into()),
        ..NewIdentity::default()
    });
    let kept = set(&mut client, a, "crm", "c-taken", false).await.unwrap();
    assert!(ids_of(&kept).contains(&("crm".into(), "c-taken".into())));
    env.db
        .wait_for_outbox(
            "SELECT count(*) FROM ory_outbox WHERE kind = 'sync_external_id' \
             AND failed_at IS NOT NULL \
             AND last_error LIKE '%another identity holds that external_id in Ory%'",
            1,
        )
        .await;
    assert!(env.ory.identity(a).unwrap().get("external_id").is_none());
}

fn imported(env: &Env, email: &str, external_id: &str) -> Uuid {
    id_of(&env.ory.create_identity(NewIdentity {
        schema_id: "customer".into(),
        traits: json!({ "email": email }),
        identifiers: vec![email.to_owned()],
        external_id: Some(external_id.to_owned()),
        ..NewIdentity::default()
    }))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn linking_adopts_the_identitys_ory_external_id_without_overwriting_anyone() {
    let env = Env::with(mirroring("crm")).await;
    let mut client = env.client();

    // LinkIdentity.
    let one = imported(&env, "adopt-1@example.com", "imp-1");
    let user = linked(&mut client, one, vec![]).await;
    assert_eq!(ids_of(&user), pairs(&[("crm", "imp-1")]));
    assert_eq!(
        env.db
            .count("SELECT count(*) FROM ory_outbox WHERE kind = 'sync_external_id'")
            .await,
        0,
        "Ory holds the value already"
    );

    // Just in time, by ResolveSession.
    let two = imported(&env, "adopt-2@example.com", "imp-2");
    let session = env.ory.create_session(two, NewSession::default());
    let resolved = client
        .resolve_session(token(&session.token))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ids_of(&resolved.user.unwrap()), pairs(&[("crm", "imp-2")]));

    // Held by another user in idmap: the link stands, the value stays with its holder.
    let three = imported(&env, "adopt-3@example.com", "imp-3");
    let four = identity(&env.ory, "customer", "adopt-4@example.com");
    let holder_user = linked(&mut client, four, vec![]).await;
    env.db
        .run_sql(&format!(
            "INSERT INTO user_external_ids (namespace, external_id, user_id) VALUES ('crm', 'imp-3', '{}')",
            holder_user.id
        ))
        .await;
    let user_three = linked(&mut client, three, vec![]).await;
    assert!(user_three.external_ids.is_empty());
    assert_eq!(holder(&mut client, "crm", "imp-3").await, holder_user.id);

    // A value the request names wins over Ory's, and goes to Ory.
    let five = imported(&env, "adopt-5@example.com", "ory-5");
    let user_five = linked(&mut client, five, vec![ext("crm", "mine-5")]).await;
    assert_eq!(ids_of(&user_five), pairs(&[("crm", "mine-5")]));
    wait_for_ory_external_id(&env, five, Some("mine-5")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_by_external_id_finds_an_identity_only_ory_knew_and_remembers_misses() {
    let env = Env::with(mirroring("crm")).await;
    let mut client = env.client();
    let known = imported(&env, "only-ory@example.com", "legacy-9");
    env.ory.reset_calls();

    let found = get(&mut client, "crm", "legacy-9", false).await.unwrap();
    let user = found.user.unwrap();
    assert_eq!(user.ory_identity_id, known.to_string());
    assert_eq!(ids_of(&user), pairs(&[("crm", "legacy-9")]));
    assert_eq!(env.db.user_of(known).await.to_string(), user.id);
    // The link's metadata_public.id write reads the identity too; let it land before counting.
    wait_for_metadata_id(&env.ory, known, &user.id).await;
    env.db
        .wait_for_outbox("SELECT count(*) FROM ory_outbox", 0)
        .await;
    let asked = env.ory.calls(Route::AdminRead);
    // Linked now: idmap answers without Ory.
    assert_eq!(holder(&mut client, "crm", "legacy-9").await, user.id);
    assert_eq!(env.ory.calls(Route::AdminRead), asked);

    // A value with URL syntax in it is asked for as one path segment.
    let odd = imported(&env, "odd@example.com", "a/b?c d#e%2F");
    let found = get(&mut client, "crm", "a/b?c d#e%2F", false)
        .await
        .unwrap();
    assert_eq!(found.user.unwrap().ory_identity_id, odd.to_string());
    env.db
        .wait_for_outbox("SELECT count(*) FROM ory_outbox", 0)
        .await;

    // Unknown to Ory too: asked once, however many ask at once and again.
    env.ory.reset_calls();
    let lookups = (0..16).map(|_| {
        let mut client = client.clone();
        async move { get(&mut client, "crm", "nobody-1", false).await }
    });
    for result in futures_util::future::join_all(lookups).await {
        assert_code(&result.unwrap_err(), Code::NotFound);
    }
    assert_code(
        &get(&mut client, "crm", "nobody-1", false)
            .await
            .unwrap_err(),
        Code::NotFound,
    );
    assert_eq!(env.ory.calls(Route::AdminRead), 1);

    // Other namespaces never ask Ory.
    imported(&env, "other-ns@example.com", "legacy-10");
    env.ory.reset_calls();
    for namespace in ["", "billing"] {
        assert_code(
            &get(&mut client, namespace, "legacy-10", false)
                .await
                .unwrap_err(),
            Code::NotFound,
        );
    }
    assert_eq!(env.ory.calls(Route::AdminRead), 0);

    // Ory down: UNAVAILABLE, never NOT_FOUND.
    env.ory.inject_fault(
        Route::AdminRead,
        kratos_emulator::Fault::status(503).times(1),
    );
    let err = get(&mut client, "crm", "nobody-2", false)
        .await
        .unwrap_err();
    assert_code(&err, Code::Unavailable);
    assert_eq!(error_info(&err).0, "ORY_UNAVAILABLE");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_auto_link_an_identity_only_ory_knows_is_not_linked_by_a_lookup() {
    let env = Env::with(|c| {
        mirroring("crm")(c);
        c.service.auto_link = false;
    })
    .await;
    let mut client = env.client();
    let only_ory = imported(&env, "no-auto@example.com", "legacy-11");
    let err = get(&mut client, "crm", "legacy-11", false)
        .await
        .unwrap_err();
    assert_code(&err, Code::NotFound);
    assert!(env.db.links().await.is_empty());

    // An identity already linked (without the value) adopts it when a lookup finds it in Ory.
    let user = linked(&mut client, only_ory, vec![]).await;
    assert_eq!(ids_of(&user), pairs(&[("crm", "legacy-11")]));
    let linked_before = identity(&env.ory, "customer", "no-auto-2@example.com");
    let user_two = linked(&mut client, linked_before, vec![]).await;
    env.ory
        .patch_identity(
            linked_before,
            &json!([{"op": "replace", "path": "/external_id", "value": "legacy-12"}]),
        )
        .unwrap();
    let found = get(&mut client, "crm", "legacy-12", false).await.unwrap();
    assert_eq!(found.user.unwrap().id, user_two.id);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_made_while_its_ory_write_is_in_flight_reaches_ory_too() {
    use kratos_emulator::{Fault, Gate};
    let env = Env::with(mirroring("crm")).await;
    let mut client = env.client();
    let a = identity(&env.ory, "customer", "inflight@example.com");
    linked(&mut client, a, vec![]).await;
    env.db
        .wait_for_outbox("SELECT count(*) FROM ory_outbox", 0)
        .await;

    // The write of the first value is held inside Ory while the value changes again.
    let gate = Gate::new();
    env.ory
        .inject_fault(Route::AdminWrite, Fault::held(&gate).times(1));
    env.ory.reset_calls();
    set(&mut client, a, "crm", "first", false).await.unwrap();
    assert!(
        env.ory.wait_for_calls(Route::AdminWrite, 1, PATIENCE).await,
        "the first write never reached Ory"
    );
    set(&mut client, a, "crm", "second", true).await.unwrap();
    gate.open();
    wait_for_ory_external_id(&env, a, Some("second")).await;
    env.db
        .wait_for_outbox("SELECT count(*) FROM ory_outbox", 0)
        .await;
    assert_eq!(
        env.ory.identity(a).unwrap()["external_id"],
        "second",
        "an older write landed after the newer one"
    );
}
