//! Caller authorization over real gRPC: who may call which RPC (`IDMAP_CALLERS`), by API key and by
//! a trusted mesh header; health open to all, reflection to identified callers.

use std::path::PathBuf;

use idmap::config::TrustedHeader;
use idmap::proto::api::{GetUserByOryIdRequest, LinkIdentityRequest};
use sha2::{Digest, Sha256};
use tokio_stream::StreamExt;
use tonic::Code;
use tonic::metadata::MetadataValue;
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
use tonic_reflection::pb::v1;
use uuid::Uuid;

use crate::common::*;

pub(crate) const FRONT_KEY: &str = "front-end-key-0123456789abcdef";
pub(crate) const OFFICE_KEY: &str = "back-office-key-0123456789abcdef";
const EDGE_KEY: &str = "edge-gateway-key-0123456789abcdef";
const NGINX_KEY: &str = "nginx-gateway-key-0123456789abcdef";
const BFF: &str = "spiffe://cluster.local/ns/web/sa/bff";
const LINKERD_BFF: &str = "bff.web.serviceaccount.identity.linkerd.cluster.local";

/// A callers file for a typical mesh: read-only front ends (one by API key, one by mesh identity)
/// and a back office that links.
fn callers_file() -> PathBuf {
    let sha = |key: &str| hex::encode(Sha256::digest(key.as_bytes()));
    let dir = std::env::temp_dir().join(format!("idmap-callers-{}", Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("callers.toml");
    std::fs::write(
        &path,
        format!(
            r#"
[[callers]]
name = "front"
api_key_sha256 = ["{front}"]
rpcs = ["ResolveSession", "GetUserByOryId", "GetByExternalId", "BatchGetUsers"]

[[callers]]
name = "web-bff"
spiffe_ids = ["{BFF}"]
dns_names = ["{LINKERD_BFF}"]
rpcs = ["ResolveSession", "GetUserByOryId"]

[[callers]]
name = "back-office"
api_key_sha256 = ["{office}"]
rpcs = ["*"]

[[callers]]
name = "edge"
api_key_sha256 = ["{edge}"]
rpcs = ["Check"]

[[callers]]
name = "nginx"
api_key_sha256 = ["{nginx}"]
rpcs = ["/gateway/auth"]
"#,
            front = sha(FRONT_KEY),
            office = sha(OFFICE_KEY),
            edge = sha(EDGE_KEY),
            nginx = sha(NGINX_KEY),
        ),
    )
    .unwrap();
    path
}

pub(crate) async fn env_with_callers(trusted: Option<TrustedHeader>) -> Env {
    let file = callers_file();
    let dir = file.parent().unwrap().to_owned();
    let env = Env::with(move |c| {
        c.callers.allow_any_caller = false;
        c.callers.callers_file = Some(file);
        c.callers.trusted_header = trusted;
    })
    .await;
    // The server read the file when it started serving; nothing reads it again.
    std::fs::remove_dir_all(dir).unwrap();
    env
}

fn with_header<T>(message: T, name: &'static str, value: &str) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request
        .metadata_mut()
        .insert(name, MetadataValue::try_from(value).unwrap());
    request
}

fn by_ory_id(key: Option<&str>) -> tonic::Request<GetUserByOryIdRequest> {
    let message = GetUserByOryIdRequest {
        ory_identity_id: Uuid::new_v4().to_string(),
    };
    match key {
        Some(key) => with_header(message, "authorization", &format!("Bearer {key}")),
        None => tonic::Request::new(message),
    }
}

fn assert_refused(status: &tonic::Status, code: Code, reason: &str) {
    assert_code(status, code);
    assert_eq!(error_info(status).0, reason, "{status:?}");
}

async fn list_services(env: &Env, key: Option<&str>) -> Result<Vec<String>, tonic::Status> {
    let mut reflection =
        v1::server_reflection_client::ServerReflectionClient::new(channel(env.server.addr).await);
    let message = v1::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(v1::server_reflection_request::MessageRequest::ListServices(
            String::new(),
        )),
    };
    let stream = tokio_stream::iter([message]);
    let request = match key {
        Some(key) => with_header(stream, "authorization", &format!("Bearer {key}")),
        None => tonic::Request::new(stream),
    };
    let mut answers = reflection
        .server_reflection_info(request)
        .await?
        .into_inner();
    let answer = answers.next().await.unwrap()?;
    let Some(v1::server_reflection_response::MessageResponse::ListServicesResponse(list)) =
        answer.message_response
    else {
        panic!("unexpected reflection answer")
    };
    Ok(list.service.into_iter().map(|s| s.name).collect())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_key_callers_are_allowed_and_refused_per_rpc() {
    let env = env_with_callers(None).await;
    let mut client = env.client();

    // No identity, or a key nobody was given: the calling service is not authenticated.
    let err = client
        .get_user_by_ory_id(by_ory_id(None))
        .await
        .unwrap_err();
    assert_refused(&err, Code::Unauthenticated, "CALLER_UNAUTHENTICATED");
    let err = client
        .get_user_by_ory_id(by_ory_id(Some("not-a-key-anyone-holds")))
        .await
        .unwrap_err();
    assert_refused(&err, Code::Unauthenticated, "CALLER_UNAUTHENTICATED");
    assert!(!err.message().contains("not-a-key"), "{err:?}");

    // The front end reads (the call goes through: the id is simply unknown) but may not link.
    let err = client
        .get_user_by_ory_id(by_ory_id(Some(FRONT_KEY)))
        .await
        .unwrap_err();
    assert_code(&err, Code::NotFound);
    let (identity, _) = env.customer("callers@example.com");
    let link = |key: &str| {
        with_header(
            LinkIdentityRequest {
                ory_identity_id: identity.to_string(),
                user_id: String::new(),
                external_id: String::new(),
                ..Default::default()
            },
            "authorization",
            &format!("Bearer {key}"),
        )
    };
    let err = client.link_identity(link(FRONT_KEY)).await.unwrap_err();
    assert_refused(&err, Code::PermissionDenied, "CALLER_NOT_ALLOWED");
    assert_eq!(error_info(&err).2["caller"], "front");
    assert_eq!(env.db.count("SELECT count(*) FROM users").await, 0);

    // The back office may call everything.
    let linked = client.link_identity(link(OFFICE_KEY)).await.unwrap();
    assert!(linked.into_inner().created);

    // Health needs no identity; reflection needs one, any.
    let mut health = HealthClient::new(channel(env.server.addr).await);
    health
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap();
    let err = list_services(&env, None).await.unwrap_err();
    assert_refused(&err, Code::Unauthenticated, "CALLER_UNAUTHENTICATED");
    let names = list_services(&env, Some(FRONT_KEY)).await.unwrap();
    assert!(names.iter().any(|n| n == "idmap.v1.IdentityService"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mesh_header_names_the_caller_only_when_idmap_is_told_to_trust_it() {
    let xfcc = format!("By=spiffe://cluster.local/ns/idmap/sa/idmap;Hash=abc;URI={BFF}");

    // Not trusted: anyone can send the header, so it proves nothing.
    let env = env_with_callers(None).await;
    let err = env
        .client()
        .get_user_by_ory_id(with_header(
            GetUserByOryIdRequest {
                ory_identity_id: Uuid::new_v4().to_string(),
            },
            "x-forwarded-client-cert",
            &xfcc,
        ))
        .await
        .unwrap_err();
    assert_refused(&err, Code::Unauthenticated, "CALLER_UNAUTHENTICATED");

    // Behind Envoy or Istio, told to trust it: the URI names the caller, whose grants apply.
    let env = env_with_callers(Some(TrustedHeader::XForwardedClientCert)).await;
    let mut client = env.client();
    let err = client
        .get_user_by_ory_id(with_header(
            GetUserByOryIdRequest {
                ory_identity_id: Uuid::new_v4().to_string(),
            },
            "x-forwarded-client-cert",
            &xfcc,
        ))
        .await
        .unwrap_err();
    assert_code(&err, Code::NotFound);
    let err = client
        .link_identity(with_header(
            LinkIdentityRequest {
                ory_identity_id: Uuid::new_v4().to_string(),
                user_id: String::new(),
                external_id: String::new(),
                ..Default::default()
            },
            "x-forwarded-client-cert",
            &xfcc,
        ))
        .await
        .unwrap_err();
    assert_refused(&err, Code::PermissionDenied, "CALLER_NOT_ALLOWED");
    // Linkerd's header is not the one trusted here.
    let err = client
        .get_user_by_ory_id(with_header(
            GetUserByOryIdRequest {
                ory_identity_id: Uuid::new_v4().to_string(),
            },
            "l5d-client-id",
            LINKERD_BFF,
        ))
        .await
        .unwrap_err();
    assert_refused(&err, Code::Unauthenticated, "CALLER_UNAUTHENTICATED");

    // Behind Linkerd: its client id names the caller.
    let env = env_with_callers(Some(TrustedHeader::L5dClientId)).await;
    let err = env
        .client()
        .get_user_by_ory_id(with_header(
            GetUserByOryIdRequest {
                ory_identity_id: Uuid::new_v4().to_string(),
            },
            "l5d-client-id",
            LINKERD_BFF,
        ))
        .await
        .unwrap_err();
    assert_code(&err, Code::NotFound);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_is_a_caller_granted_check() {
    use envoy_types::ext_authz::v3::pb::CheckRequest;
    use envoy_types::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient;
    let env = env_with_callers(None).await;
    let mut gateway = AuthorizationClient::new(channel(env.server.addr).await);
    let check = |key: &str| {
        with_header(
            CheckRequest::default(),
            "authorization",
            &format!("Bearer {key}"),
        )
    };
    // Granted: the request has no session, so the answer is a 401 verdict, not a refused call.
    let verdict = gateway.check(check(EDGE_KEY)).await.unwrap().into_inner();
    assert!(verdict.http_response.is_some());
    let refused = gateway.check(check(FRONT_KEY)).await.unwrap_err();
    assert_code(&refused, Code::PermissionDenied);
    assert_eq!(error_info(&refused).0, "CALLER_NOT_ALLOWED");
    let refused = gateway.check(CheckRequest::default()).await.unwrap_err();
    assert_code(&refused, Code::Unauthenticated);
    // The gateway's key opens Check only.
    let err = env
        .client()
        .get_user_by_ory_id(by_ory_id(Some(EDGE_KEY)))
        .await
        .unwrap_err();
    assert_eq!(error_info(&err).0, "CALLER_NOT_ALLOWED");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_http_gateway_routes_follow_the_callers_file() {
    let env = env_with_callers(None).await;
    let http = reqwest::Client::new();
    let base = format!("http://{}", env.server.http_addr);
    let auth = |key: Option<&str>| {
        let mut request = http.get(format!("{base}/gateway/auth"));
        if let Some(key) = key {
            request = request.header("x-idmap-api-key", key);
        }
        request
    };
    // Without a key, or with a key not granted the route: refused before any decision.
    assert_eq!(auth(None).send().await.unwrap().status(), 403);
    assert_eq!(auth(Some(EDGE_KEY)).send().await.unwrap().status(), 403);
    // Granted: the request is decided (no session here: 401).
    assert_eq!(auth(Some(NGINX_KEY)).send().await.unwrap().status(), 401);
    let hydrate = |key: &str| {
        http.post(format!("{base}/gateway/oathkeeper/hydrate"))
            .header("x-idmap-api-key", key)
            .json(&serde_json::json!({"subject": ""}))
            .send()
    };
    assert_eq!(hydrate(NGINX_KEY).await.unwrap().status(), 403);
    assert_eq!(hydrate(OFFICE_KEY).await.unwrap().status(), 200);
    // The JWKS is public: upstreams fetch it without being callers.
    assert_eq!(
        http.get(format!("{base}/.well-known/jwks.json"))
            .send()
            .await
            .unwrap()
            .status(),
        404,
        "no assertion key in this test, but not refused as a caller"
    );
}
