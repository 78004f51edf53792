//! Kratos's own serialisations (ory/kratos's fixtures and test snapshots, copied to
//! `spec/ory/fixtures/`) served as Ory's answers and posted as Ory's webhook bodies, so idmap is
//! shown to read what real Kratos sends, not only what the emulator sends: Go's zero times, empty
//! AMR levels, `devices`, `credentials`, `schema_url`, null `metadata_public` and
//! `organization_id`, the nil id of an identity not stored yet.

use std::path::PathBuf;

use idmap::proto::api::{
    GetUserByOryIdRequest, LinkIdentityRequest, ResolveSessionRequest,
    resolve_session_request::Credential,
};
use kratos_emulator::{Fault, Route};
use secrecy::SecretString;
use serde_json::{Value, json};
use tonic::Code;

use crate::common::*;

fn fixture(name: &str) -> Value {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("spec/ory/fixtures")
        .join(name);
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap()
}

fn seconds(rfc3339: &str) -> i64 {
    chrono::DateTime::parse_from_rfc3339(rfc3339)
        .unwrap()
        .timestamp()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_whoami_answer_in_kratos_own_serialisation_resolves() {
    let env = Env::new().await;
    let mut body = fixture("session.aal2-with-devices.json");
    // The fixture expired in 2013, which Kratos's marshaller reports as `active: false`; whoami
    // answers 200 only for a live session, so it is given a live expiry and nothing else changes.
    let expires_at = chrono::Utc::now() + chrono::Duration::hours(1);
    body["expires_at"] = json!(expires_at.to_rfc3339());
    body["active"] = json!(true);
    let identity_id = body["identity"]["id"].as_str().unwrap().to_owned();
    env.ory.inject_fault(
        Route::Whoami,
        Fault::answer(200, Some(body))
            .header("X-Kratos-Authenticated-Identity-Id", &identity_id)
            .times(1),
    );

    let resolved = env
        .client()
        .resolve_session(ResolveSessionRequest {
            credential: Some(Credential::SessionToken(
                "ory_st_fixturefixturefixturefixture".into(),
            )),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();

    let session = resolved.session.unwrap();
    assert_eq!(session.id, "7458af86-c1d8-401c-978a-8da89133f98b");
    assert!(session.active);
    assert_eq!(session.expires_at.unwrap().seconds, expires_at.timestamp());
    assert_eq!(
        session.authenticated_at.unwrap().seconds,
        seconds("2013-10-07T08:23:19Z")
    );
    assert_eq!(
        session.issued_at.unwrap().seconds,
        seconds("2013-10-07T08:23:19Z")
    );
    assert_eq!(session.authenticator_assurance_level, "aal2");
    let methods: Vec<(&str, &str, bool)> = session
        .authentication_methods
        .iter()
        .map(|m| (m.method.as_str(), m.aal.as_str(), m.completed_at.is_some()))
        .collect();
    // Kratos writes Go's zero time (0001-01-01T00:00:00Z) for "not recorded": no timestamp.
    assert_eq!(methods, [("password", "", false), ("totp", "", false)]);

    let identity = resolved.identity.unwrap();
    assert_eq!(identity.id, identity_id);
    assert_eq!(identity.schema_id, "default");
    assert_eq!(identity.state, "active");
    assert_eq!(identity.external_id, "");
    let traits = identity.traits.unwrap();
    assert_eq!(traits.fields.len(), 1);
    assert!(traits.fields.contains_key("email"));
    assert!(
        identity.metadata_public.is_none(),
        "null has no Struct form"
    );

    // Linked just in time, with Kratos's schema id.
    let user = resolved.user.unwrap();
    assert_eq!(user.ory_identity_id, identity_id);
    assert_eq!(user.schema_id, "default");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_admin_identity_in_kratos_own_serialisation_links() {
    let env = Env::new().await;
    let mut body = fixture("identity.admin-with-credentials.json");
    body["metadata_admin"] = json!({"risk": "internal only"});
    // The identity already records its user id (its registration hook ran), so the link adopts it
    // and queues no Ory write: the outbox worker, which would read the identity again, stays idle
    // and the count of admin reads below is the link's alone.
    let recorded = uuid::Uuid::new_v4().to_string();
    body["metadata_public"] = json!({ "id": recorded });
    let identity_id = body["id"].as_str().unwrap().to_owned();
    env.ory
        .inject_fault(Route::AdminRead, Fault::answer(200, Some(body)).times(1));

    let mut client = env.client();
    let linked = client
        .link_identity(LinkIdentityRequest {
            ory_identity_id: identity_id.clone(),
            user_id: String::new(),
            external_id: "crm-fixture".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .user
        .unwrap();
    assert_eq!(linked.ory_identity_id, identity_id);
    assert_eq!(linked.id, recorded);
    assert_eq!(env.db.count("SELECT count(*) FROM ory_outbox").await, 0);
    assert_eq!(linked.schema_id, "default");
    assert_eq!(linked.external_id, "crm-fixture");
    assert_eq!(env.ory.calls(Route::AdminRead), 1);

    let found = client
        .get_user_by_ory_id(GetUserByOryIdRequest {
            ory_identity_id: identity_id,
        })
        .await
        .unwrap()
        .into_inner()
        .user
        .unwrap();
    assert_eq!(found.id, linked.id);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_whoami_answer_that_says_inactive_is_refused() {
    let env = Env::new().await;
    // The fixture as Kratos serialised it: expired in 2013, so `active: false`. Kratos itself answers
    // such a session with 401; a 200 carrying it (a stale proxy, another implementation) is not
    // taken as a live session either.
    let body = fixture("session.aal2-with-devices.json");
    assert_eq!(body["active"], json!(false));
    env.ory
        .inject_fault(Route::Whoami, Fault::answer(200, Some(body)).times(1));
    let err = env
        .client()
        .resolve_session(ResolveSessionRequest {
            credential: Some(Credential::SessionToken(
                "ory_st_inactiveinactiveinactive".into(),
            )),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_code(&err, Code::Unauthenticated);
    assert_eq!(env.db.count("SELECT count(*) FROM users").await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pre_persist_hook_body_in_kratos_own_serialisation_gets_the_id() {
    const SECRET: &str = "fixture-hook-secret";
    let env = Env::with(|c| c.hooks.secret = Some(SecretString::from(SECRET))).await;
    // The identity as a `parse: true` registration hook sees it (Kratos's web hook test snapshot):
    // nil id, zero times, credentials, metadata_admin, an external_id of Kratos's own.
    let identity = fixture("webhook.pre-persist-identity-after-metadata_public-update.json");
    let _ = rustls::crypto::ring::default_provider().install_default();
    let response = reqwest::Client::new()
        .post(format!(
            "http://{}/hooks/ory/registration/pre-persist",
            env.server.http_addr
        ))
        .header("Authorization", SECRET)
        .json(&json!({ "identity": identity }))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 200);
    let body: Value = response.json().await.unwrap();
    // Kratos replaces each field the answer carries, so it carries metadata_public alone, whole:
    // Kratos's external_id and metadata_admin stay as they are.
    assert_eq!(body["identity"].as_object().unwrap().len(), 1, "{body}");
    let metadata = body["identity"]["metadata_public"].as_object().unwrap();
    assert_eq!(metadata.len(), 2, "{body}");
    assert_eq!(metadata["useful"], "metadata");
    let user_id = metadata["id"].as_str().unwrap();
    assert_eq!(
        env.db
            .count(&format!(
                "SELECT count(*) FROM pending_users WHERE id = '{user_id}' AND schema_id = 'default'"
            ))
            .await,
        1
    );
}
