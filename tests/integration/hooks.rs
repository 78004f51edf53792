//! The Ory Actions webhooks over real HTTP against a real PostgreSQL: each endpoint's success, retry
//! and overlapping deliveries, authentication, size and body checks, pending users and their sweep.

use std::time::Duration;

use chrono::Utc;
use idmap::config::PendingSettings;
use idmap::store::{Database, PoolOptions, Store};
use idmap::worker::pending_sweep::PendingSweeper;
use kratos_emulator::{NewIdentity, NewSession};
use secrecy::SecretString;
use serde_json::{Value, json};
use uuid::Uuid;

use crate::common::*;

const SECRET: &str = "test-webhook-secret-0123456789";
const REGISTRATION: &str = "/hooks/ory/registration";
const PRE_PERSIST: &str = "/hooks/ory/registration/pre-persist";
const SETTINGS: &str = "/hooks/ory/settings";
const NIL: &str = "00000000-0000-0000-0000-000000000000";

async fn env() -> Env {
    Env::with(|c| c.hooks.secret = Some(SecretString::from(SECRET))).await
}

/// Posts to the server's hook endpoints the way Kratos does.
struct Hooks {
    base: String,
    http: reqwest::Client,
}

impl Hooks {
    fn new(env: &Env) -> Hooks {
        // reqwest is built without a bundled TLS provider (see src/tls.rs).
        let _ = rustls::crypto::ring::default_provider().install_default();
        Hooks {
            base: format!("http://{}", env.server.http_addr),
            http: reqwest::Client::new(),
        }
    }

    fn request(&self, path: &str) -> reqwest::RequestBuilder {
        self.http.post(format!("{}{path}", self.base))
    }

    /// Posts `body` with the secret as Ory's `api_key` auth sends it (`Authorization: <secret>`).
    async fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        answer(
            self.request(path)
                .header("Authorization", SECRET)
                .json(body)
                .send()
                .await
                .unwrap(),
        )
        .await
    }
}

async fn answer(response: reqwest::Response) -> (u16, Value) {
    let status = response.status().as_u16();
    let text = response.text().await.unwrap();
    let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
    (status, body)
}

/// Asserts the body is in Ory's `messages` format and returns the first message's text.
#[track_caller]
fn message_text(body: &Value) -> String {
    let outer = &body["messages"][0];
    assert!(
        outer["instance_ptr"].is_string(),
        "not a messages body: {body}"
    );
    let inner = &outer["messages"][0];
    assert!(inner["id"].is_i64(), "not a messages body: {body}");
    assert_eq!(inner["type"], "error", "{body}");
    assert!(inner["context"].is_object(), "{body}");
    inner["text"].as_str().unwrap().to_owned()
}

/// A Kratos identity, as a post-persist hook's `ctx.identity` carries it.
fn stored_identity(env: &Env, email: &str, metadata_public: Option<Value>) -> Value {
    env.ory.create_identity(NewIdentity {
        schema_id: "customer".into(),
        traits: json!({ "email": email }),
        identifiers: vec![email.to_owned()],
        metadata_public,
        ..NewIdentity::default()
    })
}

/// A Kratos identity as a pre-persist hook sees it: not stored yet, so its id is nil.
fn new_identity(email: &str, metadata_public: Value) -> Value {
    json!({
        "id": NIL,
        "schema_id": "customer",
        "schema_url": "http://kratos/schemas/Y3VzdG9tZXI",
        "state": "active",
        "traits": { "email": email },
        "metadata_public": metadata_public,
        "created_at": "0001-01-01T00:00:00Z",
        "updated_at": "0001-01-01T00:00:00Z",
        "organization_id": null
    })
}

async fn counts(env: &Env) -> (i64, i64, i64) {
    (
        env.db.count("SELECT count(*) FROM users").await,
        env.db.count("SELECT count(*) FROM pending_users").await,
        env.db.count("SELECT count(*) FROM ory_outbox").await,
    )
}

// === registration (post-persist) ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registration_hook_creates_the_user_and_queues_the_metadata_write() {
    let env = env().await;
    let hooks = Hooks::new(&env);
    let identity = stored_identity(&env, "reg@example.com", None);
    let identity_id = id_of(&identity);

    let (status, body) = hooks
        .post(REGISTRATION, &json!({ "identity": identity }))
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["created"], true);
    let user_id = body["user_id"].as_str().unwrap().to_owned();
    assert_eq!(
        env.db
            .count(&format!(
                "SELECT count(*) FROM users WHERE id = '{user_id}' \
                 AND ory_identity_id = '{identity_id}' AND schema_id = 'customer'"
            ))
            .await,
        1
    );
    // The outbox delivers the id to Ory after the answer.
    wait_for_metadata_id(&env.ory, identity_id, &user_id).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registration_hook_creates_an_inactive_identitys_user_inactive() {
    let env = env().await;
    let hooks = Hooks::new(&env);
    let state_of = |user_id: String| {
        let db = &env.db;
        async move {
            // `updated_at = created_at`: the state came with the insert, not a later update.
            db.count(&format!(
                "SELECT count(*) FROM users WHERE id = '{user_id}' \
                 AND state = 'inactive' AND updated_at = created_at"
            ))
            .await
        }
    };

    // Created by the post-persist hook.
    let mut identity = stored_identity(&env, "asleep@example.com", None);
    identity["state"] = json!("inactive");
    let (status, body) = hooks
        .post(REGISTRATION, &json!({ "identity": identity }))
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        state_of(body["user_id"].as_str().unwrap().to_owned()).await,
        1
    );

    // Claimed from the pre-persist hook's reservation.
    let (_, pre) = hooks
        .post(
            PRE_PERSIST,
            &json!({ "identity": new_identity("dozing@example.com", Value::Null) }),
        )
        .await;
    let metadata = pre["identity"]["metadata_public"].clone();
    let mut identity = stored_identity(&env, "dozing@example.com", Some(metadata.clone()));
    identity["state"] = json!("inactive");
    let (status, body) = hooks
        .post(REGISTRATION, &json!({ "identity": identity }))
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["user_id"], metadata["id"]);
    assert_eq!(
        state_of(body["user_id"].as_str().unwrap().to_owned()).await,
        1
    );
    assert_eq!(counts(&env).await.0, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registration_hook_answers_without_calling_ory() {
    // Ory is unreachable: the hook still links, and the metadata write waits in the outbox.
    let db = TestDb::new().await;
    let dead = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}", listener.local_addr().unwrap())
    };
    let mut config = config_for(&db, &dead);
    config.hooks.secret = Some(SecretString::from(SECRET));
    let server = TestServer::start(config).await;
    let _ = rustls::crypto::ring::default_provider().install_default();
    let identity_id = Uuid::new_v4();
    let response = reqwest::Client::new()
        .post(format!("http://{}{REGISTRATION}", server.http_addr))
        .header("Authorization", SECRET)
        .json(&json!({ "identity": {
            "id": identity_id, "schema_id": "customer", "traits": {"email": "x@example.com"},
            "metadata_public": null, "state": "active"
        }}))
        .send()
        .await
        .unwrap();
    let (status, body) = answer(response).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(db.count("SELECT count(*) FROM users").await, 1);
    assert_eq!(
        db.count(&format!(
            "SELECT count(*) FROM ory_outbox WHERE ory_identity_id = '{identity_id}'"
        ))
        .await,
        1
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registration_hook_retried_gives_the_same_user() {
    let env = env().await;
    let hooks = Hooks::new(&env);
    let body = json!({ "identity": stored_identity(&env, "retry@example.com", None) });

    let (s1, first) = hooks.post(REGISTRATION, &body).await;
    let (s2, second) = hooks.post(REGISTRATION, &body).await;
    assert_eq!((s1, s2), (200, 200));
    assert_eq!(first["created"], true);
    assert_eq!(second["created"], false);
    assert_eq!(first["user_id"], second["user_id"]);
    let (users, pending, outbox) = counts(&env).await;
    assert_eq!(users, 1);
    assert_eq!(pending, 0);
    assert!(outbox <= 1, "at most one queued write, got {outbox}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registration_hook_overlapping_deliveries_give_one_user() {
    let env = env().await;
    let hooks = Hooks::new(&env);
    let body = json!({ "identity": stored_identity(&env, "overlap@example.com", None) });

    let answers = futures::future::join_all((0..8).map(|_| hooks.post(REGISTRATION, &body))).await;
    let mut created = 0;
    for (status, answer) in &answers {
        assert_eq!(*status, 200, "{answer}");
        assert_eq!(answer["user_id"], answers[0].1["user_id"]);
        if answer["created"] == true {
            created += 1;
        }
    }
    assert_eq!(created, 1, "exactly one delivery creates the user");
    assert_eq!(env.db.count("SELECT count(*) FROM users").await, 1);
}

// === registration (pre-persist) and pending users ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pre_persist_hook_mints_a_pending_user_and_returns_the_whole_metadata() {
    let env = env().await;
    let hooks = Hooks::new(&env);

    let (status, body) = hooks
        .post(
            PRE_PERSIST,
            &json!({ "identity": new_identity("pre@example.com", json!({"plan": "free"})) }),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let metadata = &body["identity"]["metadata_public"];
    assert_eq!(metadata["plan"], "free", "existing keys are kept: {body}");
    let user_id: Uuid = metadata["id"].as_str().unwrap().parse().unwrap();
    assert_eq!(
        body["identity"].as_object().unwrap().len(),
        1,
        "only metadata_public is answered: {body}"
    );
    assert_eq!(
        env.db
            .count(&format!(
                "SELECT count(*) FROM pending_users WHERE id = '{user_id}' AND schema_id = 'customer'"
            ))
            .await,
        1
    );
    assert_eq!(env.db.count("SELECT count(*) FROM users").await, 0);

    // Null metadata_public becomes an object holding just the id.
    let (_, body) = hooks
        .post(
            PRE_PERSIST,
            &json!({ "identity": new_identity("null@example.com", Value::Null) }),
        )
        .await;
    let metadata = body["identity"]["metadata_public"].as_object().unwrap();
    assert_eq!(metadata.len(), 1);
    assert!(metadata["id"].as_str().unwrap().parse::<Uuid>().is_ok());

    // metadata_public that is not an object is left alone: no change requested, nothing minted.
    let (status, body) = hooks
        .post(
            PRE_PERSIST,
            &json!({ "identity": new_identity("arr@example.com", json!(["x"])) }),
        )
        .await;
    assert_eq!(status, 200);
    assert_eq!(body, json!({}));
    assert_eq!(env.db.count("SELECT count(*) FROM pending_users").await, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pre_persist_hook_overlapping_deliveries_give_one_user() {
    // Kratos retried while the first attempt was still running: both deliveries answer, each with
    // an id of its own, and Ory keeps one of the answers.
    let env = env().await;
    let hooks = Hooks::new(&env);
    let body = json!({ "identity": new_identity("twice@example.com", json!({"plan": "free"})) });
    let (first, second) = tokio::join!(
        hooks.post(PRE_PERSIST, &body),
        hooks.post(PRE_PERSIST, &body)
    );
    assert_eq!((first.0, second.0), (200, 200), "{first:?} {second:?}");
    let minted = |answer: &Value| answer["identity"]["metadata_public"]["id"].clone();
    assert_ne!(minted(&first.1), minted(&second.1));
    assert_eq!(counts(&env).await, (0, 2, 0), "two pending ids");

    // Ory stored the second answer; its post-persist hook claims that id.
    let kept = second.1["identity"]["metadata_public"].clone();
    let identity = stored_identity(&env, "twice@example.com", Some(kept.clone()));
    let (status, answer) = hooks
        .post(REGISTRATION, &json!({ "identity": identity }))
        .await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["user_id"], kept["id"]);
    assert_eq!(counts(&env).await, (1, 1, 0));

    // The other id is swept once its reservation lapses; the user stays, alone.
    let store = Store::new(
        &Database::new(&env.db.url()).unwrap(),
        &PoolOptions::default(),
    )
    .unwrap();
    let sweeper = PendingSweeper::new(store, PendingSettings::with_ttl(Duration::from_secs(3600)));
    let later = Utc::now() + chrono::Duration::minutes(61);
    assert_eq!(sweeper.sweep(later).await.unwrap(), 1);
    assert_eq!(counts(&env).await, (1, 0, 0));
    assert_eq!(
        env.db
            .count(&format!(
                "SELECT count(*) FROM users WHERE id = '{}'",
                kept["id"].as_str().unwrap()
            ))
            .await,
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pre_persist_hook_keeps_a_recorded_user_id() {
    let env = env().await;
    let hooks = Hooks::new(&env);
    let recorded = Uuid::now_v7().to_string();
    let body =
        json!({ "identity": new_identity("keep@example.com", json!({"id": recorded, "a": 1})) });

    for _ in 0..2 {
        let (status, answer) = hooks.post(PRE_PERSIST, &body).await;
        assert_eq!(status, 200, "{answer}");
        assert_eq!(
            answer["identity"]["metadata_public"],
            json!({"id": recorded, "a": 1})
        );
    }
    assert_eq!(
        env.db
            .count(&format!(
                "SELECT count(*) FROM pending_users WHERE id = '{recorded}'"
            ))
            .await,
        1
    );

    // A retry without a recorded id (Kratos resends the same body) mints another id; the one Ory
    // does not keep is swept.
    let fresh = json!({ "identity": new_identity("again@example.com", json!({})) });
    let (_, a) = hooks.post(PRE_PERSIST, &fresh).await;
    let (_, b) = hooks.post(PRE_PERSIST, &fresh).await;
    assert_ne!(
        a["identity"]["metadata_public"]["id"],
        b["identity"]["metadata_public"]["id"]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pending_user_is_claimed_by_the_registration_hook() {
    let env = env().await;
    let hooks = Hooks::new(&env);
    let (_, pre) = hooks
        .post(
            PRE_PERSIST,
            &json!({ "identity": new_identity("claim@example.com", json!({"plan": "pro"})) }),
        )
        .await;
    let metadata = pre["identity"]["metadata_public"].clone();
    let user_id = metadata["id"].as_str().unwrap().to_owned();
    // Ory stores the identity with the answered metadata, then runs the post-persist hook.
    let identity = stored_identity(&env, "claim@example.com", Some(metadata));
    env.ory.reset_calls();

    let body = json!({ "identity": identity });
    let (status, answer) = hooks.post(REGISTRATION, &body).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["user_id"], user_id.as_str());
    assert_eq!(answer["created"], true);
    // Claimed in the same transaction as the link; Ory already holds the id, so nothing is queued.
    assert_eq!(counts(&env).await, (1, 0, 0));

    let (_, again) = hooks.post(REGISTRATION, &body).await;
    assert_eq!(again["user_id"], user_id.as_str());
    assert_eq!(counts(&env).await, (1, 0, 0));
    assert_eq!(
        env.ory.calls(kratos_emulator::Route::AdminWrite),
        0,
        "no Ory write at all"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pending_user_is_claimed_by_resolve_session() {
    let env = env().await;
    let hooks = Hooks::new(&env);
    let (_, pre) = hooks
        .post(
            PRE_PERSIST,
            &json!({ "identity": new_identity("jit@example.com", Value::Null) }),
        )
        .await;
    let metadata = pre["identity"]["metadata_public"].clone();
    let user_id = metadata["id"].as_str().unwrap().to_owned();
    // Only the pre-persist hook is configured: the first session links the identity.
    let identity_id = id_of(&stored_identity(&env, "jit@example.com", Some(metadata)));
    let session = env.ory.create_session(identity_id, NewSession::default());

    let resolved = env
        .client()
        .resolve_session(token(&session.token))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(resolved.user.unwrap().id, user_id);
    assert_eq!(counts(&env).await, (1, 0, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pending_users_unclaimed_within_the_ttl_are_swept() {
    let env = env().await;
    let hooks = Hooks::new(&env);
    let mut minted = Vec::new();
    for email in ["lost@example.com", "kept@example.com"] {
        let (_, pre) = hooks
            .post(
                PRE_PERSIST,
                &json!({ "identity": new_identity(email, json!({})) }),
            )
            .await;
        minted.push(pre["identity"]["metadata_public"].clone());
    }
    let kept = stored_identity(&env, "kept@example.com", Some(minted[1].clone()));
    hooks.post(REGISTRATION, &json!({ "identity": kept })).await;
    assert_eq!(counts(&env).await, (1, 1, 0));

    let store = Store::new(
        &Database::new(&env.db.url()).unwrap(),
        &PoolOptions::default(),
    )
    .unwrap();
    let sweeper = PendingSweeper::new(store, PendingSettings::with_ttl(Duration::from_secs(3600)));
    assert_eq!(sweeper.sweep(Utc::now()).await.unwrap(), 0, "not yet due");
    assert_eq!(
        sweeper
            .sweep(Utc::now() + chrono::Duration::minutes(61))
            .await
            .unwrap(),
        1
    );
    assert_eq!(counts(&env).await, (1, 0, 0), "the claimed user stays");

    // An identity that turns up after its reservation was swept still gets the id it carries.
    let late = stored_identity(&env, "lost@example.com", Some(minted[0].clone()));
    let (status, answer) = hooks.post(REGISTRATION, &json!({ "identity": late })).await;
    assert_eq!(status, 200);
    assert_eq!(answer["user_id"], minted[0]["id"]);
}

// === settings ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settings_hook_keeps_the_schema_id_current() {
    let env = env().await;
    let hooks = Hooks::new(&env);
    let mut identity = stored_identity(&env, "settings@example.com", None);
    let identity_id = id_of(&identity);
    let (_, registered) = hooks
        .post(REGISTRATION, &json!({ "identity": identity.clone() }))
        .await;

    identity["schema_id"] = json!("employee");
    let body = json!({ "identity": identity });
    for _ in 0..2 {
        let (status, answer) = hooks.post(SETTINGS, &body).await;
        assert_eq!(status, 200, "{answer}");
        assert_eq!(answer["user_id"], registered["user_id"]);
    }
    assert_eq!(
        env.db
            .count(&format!(
                "SELECT count(*) FROM users WHERE ory_identity_id = '{identity_id}' \
                 AND schema_id = 'employee' AND updated_at > created_at"
            ))
            .await,
        1
    );

    // An identity idmap has no user for: nothing to keep current, nothing created.
    let stranger = stored_identity(&env, "stranger@example.com", None);
    let (status, answer) = hooks.post(SETTINGS, &json!({ "identity": stranger })).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["user_id"], Value::Null);
    assert_eq!(env.db.count("SELECT count(*) FROM users").await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settings_hook_overlapping_deliveries_update_the_one_user() {
    let env = env().await;
    let hooks = Hooks::new(&env);
    let mut identity = stored_identity(&env, "busy@example.com", None);
    let identity_id = id_of(&identity);
    let (_, registered) = hooks
        .post(REGISTRATION, &json!({ "identity": identity.clone() }))
        .await;

    identity["schema_id"] = json!("employee");
    let body = json!({ "identity": identity });
    let answers = futures::future::join_all((0..8).map(|_| hooks.post(SETTINGS, &body))).await;
    for (status, answer) in &answers {
        assert_eq!(*status, 200, "{answer}");
        assert_eq!(answer["user_id"], registered["user_id"]);
    }
    assert_eq!(env.db.count("SELECT count(*) FROM users").await, 1);
    assert_eq!(
        env.db
            .count(&format!(
                "SELECT count(*) FROM users WHERE ory_identity_id = '{identity_id}' \
                 AND schema_id = 'employee'"
            ))
            .await,
        1
    );

    // Overlapping deliveries for an identity without a user create none.
    let stranger = json!({ "identity": stored_identity(&env, "nobody@example.com", None) });
    let answers = futures::future::join_all((0..4).map(|_| hooks.post(SETTINGS, &stranger))).await;
    assert!(
        answers
            .iter()
            .all(|(s, a)| *s == 200 && a["user_id"].is_null()),
        "{answers:?}"
    );
    assert_eq!(env.db.count("SELECT count(*) FROM users").await, 1);
}

// === authentication ===

fn basic(password: &str) -> String {
    use base64::Engine;
    let encoded = base64::engine::general_purpose::STANDARD.encode(format!("ory:{password}"));
    format!("Basic {encoded}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hooks_refuse_missing_or_wrong_credentials_and_write_nothing() {
    let env = env().await;
    let hooks = Hooks::new(&env);
    let stored = json!({ "identity": stored_identity(&env, "auth@example.com", None) });
    let new = json!({ "identity": new_identity("auth@example.com", json!({})) });

    for (path, body) in [
        (REGISTRATION, &stored),
        (PRE_PERSIST, &new),
        (SETTINGS, &stored),
    ] {
        let wrong_basic = basic("not-the-secret");
        let near_miss = format!("{SECRET}x");
        for auth in [None, Some(near_miss.as_str()), Some(wrong_basic.as_str())] {
            let mut request = hooks.request(path).json(body);
            if let Some(value) = auth {
                request = request.header("Authorization", value);
            }
            let response = request.send().await.unwrap();
            assert!(response.headers().contains_key("www-authenticate"));
            let (status, answer) = answer(response).await;
            assert_eq!(status, 401, "{path} with {auth:?}: {answer}");
            message_text(&answer);
        }
    }
    assert_eq!(counts(&env).await, (0, 0, 0));

    // Basic auth with the secret as password is Ory's `basic_auth` option.
    let response = hooks
        .request(REGISTRATION)
        .header("Authorization", basic(SECRET))
        .json(&stored)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(env.db.count("SELECT count(*) FROM users").await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hooks_read_the_secret_from_the_configured_header() {
    let env = Env::with(|c| {
        c.hooks.secret = Some(SecretString::from(SECRET));
        c.hooks.header = "x-idmap-secret".parse().unwrap();
    })
    .await;
    let hooks = Hooks::new(&env);
    let body = json!({ "identity": new_identity("hdr@example.com", json!({})) });

    // The secret in Authorization no longer counts, only in the configured header (or as basic auth).
    let (status, _) = hooks.post(PRE_PERSIST, &body).await;
    assert_eq!(status, 401);
    let wrong = hooks
        .request(PRE_PERSIST)
        .header("X-Idmap-Secret", "wrong-wrong-wrong-wrong")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.status(), 401);
    for (name, value) in [
        ("X-Idmap-Secret", SECRET.to_owned()),
        ("Authorization", basic(SECRET)),
    ] {
        let response = hooks
            .request(PRE_PERSIST)
            .header(name, value)
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200, "{name}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hooks_refuse_everything_without_a_configured_secret() {
    let env = Env::new().await;
    let hooks = Hooks::new(&env);
    let stored = json!({ "identity": stored_identity(&env, "nosecret@example.com", None) });
    for auth in ["", SECRET, &basic(SECRET)] {
        let (status, answer) = answer(
            hooks
                .request(REGISTRATION)
                .header("Authorization", auth)
                .json(&stored)
                .send()
                .await
                .unwrap(),
        )
        .await;
        assert_eq!(status, 401);
        assert!(message_text(&answer).contains("IDMAP_WEBHOOK_SECRET"));
    }
    assert_eq!(counts(&env).await, (0, 0, 0));
}

// === bodies ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_over_one_mebibyte_are_413() {
    let env = env().await;
    let hooks = Hooks::new(&env);
    let identity_id = Uuid::new_v4();
    let with_padding = |id: &str, bytes: usize| {
        json!({ "identity": {
            "id": id, "schema_id": "customer",
            "traits": { "email": "big@example.com", "bio": "x".repeat(bytes) }
        }})
    };
    let stored = identity_id.to_string();

    for (path, id) in [
        (REGISTRATION, stored.as_str()),
        (PRE_PERSIST, NIL),
        (SETTINGS, stored.as_str()),
    ] {
        let (status, answer) = hooks.post(path, &with_padding(id, 1024 * 1024)).await;
        assert_eq!(status, 413, "{path}: {answer}");
        message_text(&answer);
    }
    assert_eq!(counts(&env).await, (0, 0, 0));

    // Just under the limit is fine.
    let (status, answer) = hooks
        .post(REGISTRATION, &with_padding(&stored, 1024 * 1024 - 512))
        .await;
    assert_eq!(status, 200, "{answer}");
}

/// Posts `body` in chunks with `Transfer-Encoding: chunked` and no `Content-Length`, as a client
/// streaming a body does, so the limit cannot be checked before reading. Returns the status line
/// and the response body.
async fn post_chunked(addr: std::net::SocketAddr, path: &str, body: &[u8]) -> (String, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: {SECRET}\r\n\
         Content-Type: application/json\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    let (mut read, mut write) = stream.into_split();
    // Read while writing: the server may answer (and stop reading) before the body ends.
    let reader = tokio::spawn(async move {
        let mut response = Vec::new();
        // A reset after the answer (the server closed with body bytes unread) ends the read.
        let _ = read.read_to_end(&mut response).await;
        String::from_utf8_lossy(&response).into_owned()
    });
    for chunk in body.chunks(64 * 1024) {
        let framed = [
            format!("{:x}\r\n", chunk.len()).as_bytes(),
            chunk,
            b"\r\n".as_slice(),
        ]
        .concat();
        if write.write_all(&framed).await.is_err() {
            break;
        }
    }
    let _ = write.write_all(b"0\r\n\r\n").await;
    let response = reader.await.unwrap();
    let (head, body) = response
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("no HTTP response: {response:?}"));
    let status = head.lines().next().unwrap_or_default().to_owned();
    (status, body.to_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunked_bodies_over_one_mebibyte_are_413() {
    let env = env().await;
    let big = json!({ "identity": {
        "id": NIL, "schema_id": "customer",
        "traits": { "email": "stream@example.com", "bio": "x".repeat(2 * 1024 * 1024) }
    }})
    .to_string();
    for path in [REGISTRATION, PRE_PERSIST, SETTINGS] {
        let (status, body) = post_chunked(env.server.http_addr, path, big.as_bytes()).await;
        assert!(status.starts_with("HTTP/1.1 413"), "{path}: {status}");
        // The body may be chunk-framed; the messages format is inside either way.
        assert!(body.contains("\"messages\""), "{path}: {body}");
    }
    assert_eq!(counts(&env).await, (0, 0, 0));

    // A small chunked body is read like any other.
    let small = json!({ "identity": new_identity("small@example.com", json!({})) }).to_string();
    let (status, body) = post_chunked(env.server.http_addr, PRE_PERSIST, small.as_bytes()).await;
    assert!(status.starts_with("HTTP/1.1 200"), "{status}: {body}");
    assert_eq!(counts(&env).await, (0, 1, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_bodies_are_400_in_orys_messages_format() {
    let env = env().await;
    let hooks = Hooks::new(&env);
    let id = Uuid::new_v4().to_string();

    let not_json = hooks
        .request(REGISTRATION)
        .header("Authorization", SECRET)
        .header("Content-Type", "application/json")
        .body("{\"identity\": ")
        .send()
        .await
        .unwrap();
    let (status, answer) = answer(not_json).await;
    assert_eq!(status, 400);
    message_text(&answer);

    for (path, body, pointer) in [
        (REGISTRATION, json!({}), "#/identity"),
        (REGISTRATION, json!([1, 2]), "#/"),
        (PRE_PERSIST, json!({"identity": null}), "#/identity"),
        (
            REGISTRATION,
            json!({"identity": {"schema_id": "customer"}}),
            "#/identity/id",
        ),
        (
            REGISTRATION,
            json!({"identity": {"id": NIL, "schema_id": "customer"}}),
            "#/identity/id",
        ),
        (
            SETTINGS,
            json!({"identity": {"id": "not-a-uuid", "schema_id": "customer"}}),
            "#/identity/id",
        ),
        (
            SETTINGS,
            json!({"identity": {"id": id, "schema_id": 7}}),
            "#/",
        ),
        (
            PRE_PERSIST,
            json!({"identity": {"id": NIL}}),
            "#/identity/schema_id",
        ),
    ] {
        let (status, answer) = hooks.post(path, &body).await;
        assert_eq!(status, 400, "{path} {body}: {answer}");
        message_text(&answer);
        assert_eq!(
            answer["messages"][0]["instance_ptr"], pointer,
            "{path} {body}: {answer}"
        );
    }
    assert_eq!(counts(&env).await, (0, 0, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn database_outage_is_503_so_kratos_retries() {
    use diesel_async::{AsyncConnection, AsyncPgConnection, SimpleAsyncConnection};
    use secrecy::ExposeSecret;
    let env = env().await;
    let hooks = Hooks::new(&env);
    {
        // Refuse new connections to the test database and end the ones the pool holds. A database
        // cannot do this to itself, so from the server's maintenance database.
        let mut url = url::Url::parse(env.db.url().expose_secret()).unwrap();
        let name = url.path().trim_start_matches('/').to_owned();
        url.set_path("/postgres");
        let mut admin = AsyncPgConnection::establish(url.as_str()).await.unwrap();
        admin
            .batch_execute(&format!(
                "ALTER DATABASE {name} ALLOW_CONNECTIONS false; \
                 SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{name}';"
            ))
            .await
            .unwrap();
    }
    let body = json!({ "identity": new_identity("down@example.com", json!({})) });
    let (status, answer) = hooks.post(PRE_PERSIST, &body).await;
    assert_eq!(status, 503, "{answer}");
    message_text(&answer);
}
