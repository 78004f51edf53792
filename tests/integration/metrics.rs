//! `GET /metrics`: after real traffic, every family is there with its labels, and no label or
//! value carries a token, an id or an email.

use idmap::proto::api::GetUserByOryIdRequest;
use idmap::proto::api::invalidate_session_request::Target;
use kratos_emulator::{Fault, Gate, Route};
use tonic::metadata::MetadataValue;

use crate::callers::{FRONT_KEY, env_with_callers};
use crate::common::*;

/// The scrape's body, after checking that it is Prometheus's text format.
async fn scrape(env: &Env) -> String {
    let response = reqwest::get(format!("http://{}/metrics", env.server.http_addr))
        .await
        .expect("scrape");
    assert_eq!(response.status(), 200);
    let content_type = response.headers()["content-type"]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(
        content_type.starts_with("text/plain; version=0.0.4"),
        "{content_type}"
    );
    response.text().await.unwrap()
}

/// The sum of the samples of `name` whose labels include every one of `labels`; `None` when no
/// sample matches.
fn sample(body: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let mut found = None;
    for line in body.lines().filter(|l| !l.starts_with('#')) {
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let (series_name, series_labels) = match series.split_once('{') {
            Some((n, rest)) => (n, rest.trim_end_matches('}')),
            None => (series, ""),
        };
        if series_name != name {
            continue;
        }
        let has = |(k, v): &(&str, &str)| {
            series_labels
                .split(',')
                .any(|pair| pair == format!("{k}=\"{v}\""))
        };
        if labels.iter().all(has) {
            *found.get_or_insert(0.0) += value.parse::<f64>().unwrap();
        }
    }
    found
}

fn at_least(body: &str, name: &str, labels: &[(&str, &str)], n: f64) {
    let value = sample(body, name, labels);
    assert!(
        value.is_some_and(|v| v >= n),
        "{name}{labels:?} = {value:?}, wanted at least {n}"
    );
}

const RESOLVE: [(&str, &str); 3] = [
    ("grpc_service", "idmap.v1.IdentityService"),
    ("grpc_method", "ResolveSession"),
    ("grpc_type", "unary"),
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_calls_caches_ory_and_the_outbox_with_bounded_labels() {
    let env = Env::new().await;
    let mut client = env.client();
    let (identity, session) = env.customer("metrics@example.com");
    // The link's Ory write stays in the outbox while the scrape looks at it.
    let gate = Gate::new();
    env.ory.inject_fault(Route::AdminWrite, Fault::held(&gate));

    // A miss (whoami, a just-in-time link), then a hit; an invalid session; bad input.
    let user = client
        .resolve_session(token(&session.token))
        .await
        .unwrap()
        .into_inner()
        .user
        .unwrap();
    client.resolve_session(token(&session.token)).await.unwrap();
    let bogus_token = "ory_st_metricsNeverValid0123456789";
    client
        .resolve_session(token(bogus_token))
        .await
        .unwrap_err();
    client
        .get_user_by_ory_id(GetUserByOryIdRequest {
            ory_identity_id: "not-a-uuid".into(),
        })
        .await
        .unwrap_err();
    client
        .invalidate_session(invalidate(Target::SessionToken(session.token.clone())))
        .await
        .unwrap();
    // A path no service has: counted, but under `unknown`, never as sent.
    let odd_path = format!(
        "/idmap.v1.IdentityService/Nope{}",
        uuid::Uuid::new_v4().simple()
    );
    let mut grpc = tonic::client::Grpc::new(channel(env.server.addr).await);
    grpc.ready().await.unwrap();
    let unknown = grpc
        .unary::<(), (), _>(
            tonic::Request::new(()),
            odd_path.parse().unwrap(),
            tonic_prost::ProstCodec::default(),
        )
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), tonic::Code::Unimplemented);
    assert!(
        env.ory.wait_for_calls(Route::AdminWrite, 1, PATIENCE).await,
        "the outbox never tried its write"
    );

    let body = scrape(&env).await;
    at_least(&body, "grpc_server_started_total", &RESOLVE, 3.0);
    for code in ["OK", "Unauthenticated"] {
        let labels = [RESOLVE[0], RESOLVE[1], RESOLVE[2], ("grpc_code", code)];
        at_least(&body, "grpc_server_handled_total", &labels, 1.0);
    }
    at_least(
        &body,
        "grpc_server_handled_total",
        &[
            ("grpc_method", "GetUserByOryId"),
            ("grpc_code", "InvalidArgument"),
        ],
        1.0,
    );
    at_least(
        &body,
        "grpc_server_handled_total",
        &[("grpc_method", "unknown"), ("grpc_code", "Unimplemented")],
        1.0,
    );
    at_least(&body, "grpc_server_handling_seconds_count", &RESOLVE, 3.0);
    let inf = [RESOLVE[0], RESOLVE[1], RESOLVE[2], ("le", "+Inf")];
    at_least(&body, "grpc_server_handling_seconds_bucket", &inf, 3.0);
    for result in ["hit", "miss"] {
        for cache in ["session", "user"] {
            at_least(
                &body,
                "idmap_cache_lookups_total",
                &[("cache", cache), ("result", result)],
                1.0,
            );
        }
    }
    at_least(
        &body,
        "idmap_cache_evictions_total",
        &[("origin", "local")],
        1.0,
    );
    for status in ["200", "401"] {
        at_least(
            &body,
            "idmap_ory_requests_total",
            &[("endpoint", "whoami"), ("status", status)],
            1.0,
        );
    }
    at_least(
        &body,
        "idmap_ory_requests_total",
        &[("endpoint", "get_identity"), ("status", "200")],
        1.0,
    );
    at_least(
        &body,
        "idmap_ory_request_duration_seconds_count",
        &[("endpoint", "whoami")],
        2.0,
    );
    at_least(
        &body,
        "idmap_ory_rate_limiter_wait_seconds_count",
        &[("limiter", "whoami")],
        2.0,
    );
    // The held write is pending, and has been since the link.
    at_least(&body, "idmap_outbox_pending", &[], 1.0);
    at_least(
        &body,
        "idmap_outbox_oldest_age_seconds",
        &[],
        f64::MIN_POSITIVE,
    );
    for gauge in [
        "idmap_outbox_parked",
        "idmap_pending_users",
        "idmap_db_pool_waiting",
    ] {
        at_least(&body, gauge, &[], 0.0);
    }
    at_least(
        &body,
        "idmap_db_pool_connections",
        &[("state", "in_use")],
        0.0,
    );
    at_least(
        &body,
        "idmap_db_pool_connections",
        &[("state", "idle")],
        0.0,
    );
    at_least(&body, "idmap_db_pool_wait_seconds_count", &[], 1.0);

    for secret in [
        session.token.as_str(),
        bogus_token,
        &identity.to_string(),
        &user.id,
        "metrics@example.com",
        odd_path.as_str(),
    ] {
        assert!(!body.contains(secret), "the scrape shows {secret}");
    }
    gate.open();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_name_identified_callers_and_count_refusals() {
    let env = env_with_callers(None).await;
    let mut client = env.client();
    let with_key = |key: &str| {
        let mut request = tonic::Request::new(GetUserByOryIdRequest {
            ory_identity_id: uuid::Uuid::new_v4().to_string(),
        });
        request.metadata_mut().insert(
            "authorization",
            MetadataValue::try_from(format!("Bearer {key}")).unwrap(),
        );
        request
    };
    // Allowed (and simply not found), then a key nobody holds.
    client
        .get_user_by_ory_id(with_key(FRONT_KEY))
        .await
        .unwrap_err();
    client
        .get_user_by_ory_id(with_key("a-key-nobody-was-given-0123456789"))
        .await
        .unwrap_err();

    let body = scrape(&env).await;
    at_least(
        &body,
        "idmap_caller_calls_total",
        &[
            ("caller", "front"),
            ("grpc_method", "GetUserByOryId"),
            ("decision", "allowed"),
        ],
        1.0,
    );
    at_least(
        &body,
        "idmap_caller_calls_total",
        &[("caller", "unidentified"), ("decision", "denied")],
        1.0,
    );
    at_least(
        &body,
        "grpc_server_handled_total",
        &[
            ("grpc_method", "GetUserByOryId"),
            ("grpc_code", "Unauthenticated"),
        ],
        1.0,
    );
    for secret in [FRONT_KEY, "a-key-nobody-was-given"] {
        assert!(!body.contains(secret), "the scrape shows {secret}");
    }
}

/// A scrape while PostgreSQL is unreachable still answers, with every family; the database's
/// figures keep their last values rather than failing the scrape.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scrape_without_the_database_still_answers() {
    let env = Env::new().await;
    let outage = env.db.outage().await;
    let body = scrape(&env).await;
    for family in [
        "grpc_server_started_total",
        "idmap_cache_lookups_total",
        "idmap_outbox_pending",
    ] {
        assert!(sample(&body, family, &[]).is_some(), "{family} missing");
    }
    outage.end().await;
}
