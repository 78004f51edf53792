use std::time::Duration;

use idmap::proto::api::{ResolveSessionRequest, resolve_session_request::Credential};
use kratos_emulator::{Fault, Gate, Route};
use tokio_stream::StreamExt;
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};
use tonic_reflection::pb::{v1, v1alpha};

use crate::common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_reports_serving_overall_and_for_the_service() {
    let env = Env::new().await;
    let mut health = HealthClient::new(channel(env.server.addr).await);
    for service in ["", "idmap.v1.IdentityService"] {
        let status = health
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap()
            .into_inner()
            .status();
        assert_eq!(status, ServingStatus::Serving, "service {service:?}");
    }
    let err = health
        .check(HealthCheckRequest {
            service: "no.such.Service".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound);
}

/// Asks reflection version `$version` to list the services and for the file of each symbol, and
/// checks that every one of `$services` is listed and every symbol's file is served.
macro_rules! assert_reflection {
    ($version:ident, $channel:expr, $services:expr, $symbols:expr) => {{
        use $version::server_reflection_request::MessageRequest;
        use $version::server_reflection_response::MessageResponse;
        let version = stringify!($version);
        let ask = |message_request| $version::ServerReflectionRequest {
            host: String::new(),
            message_request: Some(message_request),
        };
        let mut requests = vec![ask(MessageRequest::ListServices(String::new()))];
        requests.extend(
            $symbols
                .iter()
                .map(|symbol| ask(MessageRequest::FileContainingSymbol((*symbol).into()))),
        );
        let answers: Vec<MessageResponse> =
            $version::server_reflection_client::ServerReflectionClient::new($channel)
                .server_reflection_info(tokio_stream::iter(requests))
                .await
                .unwrap()
                .into_inner()
                .map(|answer| answer.unwrap().message_response.unwrap())
                .collect()
                .await;
        let Some(MessageResponse::ListServicesResponse(list)) = answers.first() else {
            panic!("{version}: unexpected reflection answer: {answers:?}")
        };
        let names: Vec<&str> = list.service.iter().map(|s| s.name.as_str()).collect();
        for expected in $services {
            assert!(
                names.contains(&expected),
                "{version}: {expected} missing from {names:?}"
            );
        }
        assert_eq!(answers.len(), 1 + $symbols.len());
        for (symbol, answer) in $symbols.iter().zip(&answers[1..]) {
            assert!(
                matches!(answer, MessageResponse::FileDescriptorResponse(f) if !f.file_descriptor_proto.is_empty()),
                "{version}: {symbol}: {answer:?}"
            );
        }
    }};
}
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reflection_v1_and_v1alpha_list_and_describe_every_service() {
    let env = Env::new().await;
    let channel = channel(env.server.addr).await;
    let services = [
        "idmap.v1.IdentityService",
        "envoy.service.auth.v3.Authorization",
        "grpc.health.v1.Health",
        "grpc.reflection.v1.ServerReflection",
        "grpc.reflection.v1alpha.ServerReflection",
    ];
    // grpcurl describes a service, and decodes a status's details, by asking for the file that
    // contains the symbol; the details are every message a status of idmap's may carry.
    let symbols = [
        "idmap.v1.IdentityService",
        "envoy.service.auth.v3.Authorization",
        "envoy.service.auth.v3.CheckRequest",
        "google.rpc.ErrorInfo",
        "google.rpc.BadRequest",
        "google.rpc.RetryInfo",
    ];

    assert_reflection!(v1, channel.clone(), services, symbols);
    assert_reflection!(v1alpha, channel, services, symbols);
}

/// A health watch of the identity service, past its first answer (SERVING).
async fn watch_service_health(
    env: &Env,
) -> tonic::Streaming<tonic_health::pb::HealthCheckResponse> {
    let mut watch = HealthClient::new(channel(env.server.addr).await)
        .watch(HealthCheckRequest {
            service: "idmap.v1.IdentityService".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        watch.next().await.unwrap().unwrap().status(),
        ServingStatus::Serving
    );
    watch
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_turns_health_not_serving_and_lets_in_flight_calls_finish() {
    let mut env = Env::new().await;
    let (_, session) = env.customer("inflight@example.com");
    let mut watch = watch_service_health(&env).await;

    // A call that Ory holds on to is in flight when the shutdown begins.
    let gate = Gate::new();
    env.ory
        .inject_fault(Route::Whoami, Fault::held(&gate).times(1));
    let mut client = env.client();
    let in_flight = tokio::spawn(async move {
        client
            .resolve_session(ResolveSessionRequest {
                credential: Some(Credential::SessionToken(session.token)),
                ..Default::default()
            })
            .await
    });
    // Shut down once the call has reached Ory.
    assert!(env.ory.wait_for_calls(Route::Whoami, 1, PATIENCE).await);
    env.server.begin_shutdown();

    assert_eq!(
        watch.next().await.unwrap().unwrap().status(),
        ServingStatus::NotServing
    );
    drop(watch);
    // Draining has begun and the call is still waiting for Ory; now Ory answers.
    assert!(!in_flight.is_finished());
    gate.open();
    let answered = in_flight.await.unwrap();
    assert!(answered.is_ok(), "in-flight call failed: {answered:?}");
    tokio::time::timeout(PATIENCE, env.server.join())
        .await
        .expect("server stopped")
        .expect("server exited cleanly");
}

/// IDMAP_SHUTDOWN_DELAY: health says NOT_SERVING at once, but calls, on open connections and new
/// ones, are still served until balancers have stopped sending them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn during_the_shutdown_delay_health_is_not_serving_and_calls_are_served() {
    let mut env = Env::with(|c| {
        // Longer than any call here takes; the grace period cuts the delay short in the end.
        c.shutdown_delay = Duration::from_secs(3600);
        c.shutdown_grace = Duration::from_secs(5);
    })
    .await;
    let (_, session) = env.customer("delay@example.com");
    let mut client = env.client();
    client.resolve_session(token(&session.token)).await.unwrap();
    let mut watch = watch_service_health(&env).await;

    env.server.begin_shutdown();
    assert_eq!(
        watch.next().await.unwrap().unwrap().status(),
        ServingStatus::NotServing
    );
    client
        .resolve_session(token(&session.token))
        .await
        .expect("served on an open connection during the delay");
    let mut fresh = idmap::proto::api::identity_service_client::IdentityServiceClient::new(
        channel(env.server.addr).await,
    );
    fresh
        .resolve_session(token(&session.token))
        .await
        .expect("served on a new connection during the delay");
    drop(watch);
    tokio::time::timeout(PATIENCE, env.server.join())
        .await
        .expect("the grace period ends the delay")
        .expect("server exited cleanly");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_endpoints_report_liveness_and_readiness() {
    let env = Env::new().await;
    let base = format!("http://{}", env.server.http_addr);
    // reqwest is built without a bundled TLS provider (see src/tls.rs).
    let _ = rustls::crypto::ring::default_provider().install_default();
    let health = reqwest::get(format!("{base}/healthz")).await.unwrap();
    assert_eq!(health.status(), 200);
    let ready = reqwest::get(format!("{base}/readyz")).await.unwrap();
    assert_eq!(ready.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deadline_shorter_than_ory_is_deadline_exceeded() {
    let env = Env::new().await;
    let (_, session) = env.customer("deadline@example.com");
    env.ory.inject_fault(
        Route::Whoami,
        Fault::status(0).delay(Duration::from_millis(3000)).times(1),
    );
    let mut request = tonic::Request::new(ResolveSessionRequest {
        credential: Some(Credential::SessionToken(session.token)),
        ..Default::default()
    });
    request.set_timeout(Duration::from_millis(1000));
    let err = env.client().resolve_session(request).await.unwrap_err();
    assert_code(&err, tonic::Code::DeadlineExceeded);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_over_the_in_flight_limit_are_shed_at_once_and_health_still_answers() {
    let env = Env::with(|c| c.grpc.max_in_flight = 1).await;
    let (_, session) = env.customer("busy@example.com");
    // The one call allowed in flight waits at Ory until the test lets it go.
    let gate = Gate::new();
    env.ory
        .inject_fault(Route::Whoami, Fault::held(&gate).times(1));
    let mut first = env.client();
    let credential = session.token.clone();
    let in_flight = tokio::spawn(async move { first.resolve_session(token(&credential)).await });
    assert!(env.ory.wait_for_calls(Route::Whoami, 1, PATIENCE).await);

    let err = env
        .client()
        .resolve_session(token(&session.token))
        .await
        .unwrap_err();
    assert_code(&err, tonic::Code::ResourceExhausted);
    assert_eq!(error_info(&err).0, "SERVER_OVERLOADED");
    let mut health = HealthClient::new(channel(env.server.addr).await);
    let serving = health
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(serving.status, ServingStatus::Serving as i32);

    // Once the call in flight is answered, its place is free again.
    gate.open();
    in_flight.await.unwrap().unwrap();
    env.client()
        .resolve_session(token(&session.token))
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_larger_than_any_valid_one_is_refused_before_it_is_decoded() {
    let env = Env::new().await;
    // 4 MiB of ids: far more than the 1,000 a BatchGetUsers may carry.
    let request = idmap::proto::api::BatchGetUsersRequest {
        ory_identity_ids: vec!["x".repeat(1024); 4 * 1024],
    };
    let err = env
        .client()
        .max_encoding_message_size(usize::MAX)
        .batch_get_users(request)
        .await
        .unwrap_err();
    assert_code(&err, tonic::Code::OutOfRange);
    assert!(
        err.message()
            .contains(&idmap::grpc::MAX_REQUEST_BYTES.to_string()),
        "{err:?}"
    );
}

/// Reads what the server sends on `stream` until it closes the connection.
async fn read_until_closed(stream: &mut tokio::net::TcpStream) -> String {
    use tokio::io::AsyncReadExt;
    let mut answer = Vec::new();
    tokio::time::timeout(PATIENCE, stream.read_to_end(&mut answer))
        .await
        .expect("the server closed the connection")
        .ok();
    String::from_utf8_lossy(&answer).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http_client_that_never_finishes_its_headers_is_disconnected() {
    use tokio::io::AsyncWriteExt;
    let env = Env::with(|c| c.http.header_timeout = Duration::from_millis(200)).await;
    let mut stream = tokio::net::TcpStream::connect(env.server.http_addr)
        .await
        .unwrap();
    // The headers never end (no blank line).
    stream
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: idmap\r\n")
        .await
        .unwrap();
    let answer = read_until_closed(&mut stream).await;
    assert!(!answer.contains("200 OK"), "{answer}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_connections_over_the_cap_are_closed_at_once() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let env = Env::with(|c| c.http.max_connections = 1).await;
    let request = b"GET /healthz HTTP/1.1\r\nHost: idmap\r\n\r\n";

    // The one connection allowed, kept open (HTTP/1.1 keep-alive) after its answer.
    let mut first = tokio::net::TcpStream::connect(env.server.http_addr)
        .await
        .unwrap();
    first.write_all(request).await.unwrap();
    let mut buf = [0u8; 256];
    let n = first.read(&mut buf).await.unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).contains("200 OK"));

    // A second one is closed without an answer.
    let mut second = tokio::net::TcpStream::connect(env.server.http_addr)
        .await
        .unwrap();
    let _ = second.write_all(request).await;
    let answer = read_until_closed(&mut second).await;
    assert!(answer.is_empty(), "{answer}");

    // Once the first closes, its place is free again (the server notices the close in its own
    // time, so ask until it has).
    drop(first);
    let answered = tokio::time::timeout(PATIENCE, async {
        loop {
            let mut again = tokio::net::TcpStream::connect(env.server.http_addr)
                .await
                .unwrap();
            let _ = again.write_all(request).await;
            let mut buf = [0u8; 256];
            if let Ok(n) = again.read(&mut buf).await
                && String::from_utf8_lossy(&buf[..n]).contains("200 OK")
            {
                return;
            }
        }
    })
    .await;
    assert!(
        answered.is_ok(),
        "the freed connection slot was never reused"
    );
}
