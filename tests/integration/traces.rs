//! Traces: a caller's W3C trace context crosses idmap into Kratos, idmap's spans go to an OTLP
//! collector when `OTEL_EXPORTER_OTLP_ENDPOINT` is set, and JSON log lines carry the trace id.

use idmap::proto::api::identity_service_client::IdentityServiceClient;
use kratos_emulator::Route;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use opentelemetry_proto::tonic::trace::v1::Span;
use tonic::metadata::MetadataValue;

use crate::binary::{channel_to, signal, spawn_serve};
use crate::common::*;

/// The caller's span, as its `traceparent` names it.
const CALLER_SPAN: &str = "00f067aa0ba902b7";

/// A fresh trace id and the `traceparent` of a caller's span in it.
fn caller_trace() -> (String, String) {
    let trace_id = uuid::Uuid::new_v4().simple().to_string();
    let traceparent = format!("00-{trace_id}-{CALLER_SPAN}-01");
    (trace_id, traceparent)
}

fn traced<T>(message: T, traceparent: &str) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request
        .metadata_mut()
        .insert("traceparent", MetadataValue::try_from(traceparent).unwrap());
    request
}

/// The trace id and parent span id of a `traceparent`.
fn ids(traceparent: &str) -> (&str, &str) {
    let mut parts = traceparent.split('-').skip(1);
    (parts.next().unwrap(), parts.next().unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_callers_trace_reaches_ory_with_the_whoami_call() {
    let env = Env::new().await;
    let mut client = env.client();
    let (_, traced_session) = env.customer("traced@example.com");
    let (_, plain_session) = env.customer("untraced@example.com");
    let (trace_id, traceparent) = caller_trace();

    client
        .resolve_session(traced(token(&traced_session.token), &traceparent))
        .await
        .unwrap();
    // Without a trace context, none is made up for Ory (nothing here exports spans).
    client
        .resolve_session(token(&plain_session.token))
        .await
        .unwrap();

    assert_eq!(env.ory.calls(Route::Whoami), 2);
    let seen = env.ory.traceparents(Route::Whoami);
    assert_eq!(seen.len(), 1, "{seen:?}");
    // With no span of idmap's own exported, Ory's parent is the caller's span.
    assert_eq!(ids(&seen[0]), (trace_id.as_str(), CALLER_SPAN));
}

/// A stand-in OTLP/gRPC collector: every span it is sent, with its resource's `service.name`, on
/// a channel.
struct Collector(tokio::sync::mpsc::UnboundedSender<(String, Span)>);

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        for resource in request.into_inner().resource_spans {
            let service = resource
                .resource
                .iter()
                .flat_map(|r| &r.attributes)
                .find(|a| a.key == "service.name")
                .and_then(|a| a.value.as_ref())
                .and_then(|v| match &v.value {
                    Some(AnyValue::StringValue(s)) => Some(s.clone()),
                    _ => None,
                })
                .unwrap_or_default();
            for scope in resource.scope_spans {
                for span in scope.spans {
                    let _ = self.0.send((service.clone(), span));
                }
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_are_exported_over_otlp_and_log_lines_carry_the_trace() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let collector_addr = listener.local_addr().unwrap();
    let (spans_tx, mut spans) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(Collector(spans_tx)))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    let db = TestDb::new().await;
    let ory = emulator().await;
    let endpoint = format!("http://{collector_addr}");
    let (mut child, port, mut lines) = spawn_serve(
        &db,
        &ory,
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
            ("OTEL_SERVICE_NAME", "idmap-under-test"),
            // Export each batch at once rather than every 5 s.
            ("OTEL_BSP_SCHEDULE_DELAY", "10"),
            ("RUST_LOG", "info,idmap::ory=debug"),
        ],
    )
    .await;
    let person = identity(&ory, "customer", "exported@example.com");
    let session = ory.create_session(person, Default::default());
    let (trace_id, traceparent) = caller_trace();
    IdentityServiceClient::new(channel_to(port).await)
        .resolve_session(traced(token(&session.token), &traceparent))
        .await
        .unwrap();

    // idmap's server span is a child of the caller's; the whoami call's span is in the same trace.
    let hex = |bytes: &[u8]| hex::encode(bytes);
    let mut server = None;
    let mut whoami = None;
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while server.is_none() || whoami.is_none() {
        let (service, span) = tokio::time::timeout_at(deadline, spans.recv())
            .await
            .expect("the collector never got both spans")
            .unwrap();
        if hex(&span.trace_id) != trace_id {
            continue;
        }
        assert_eq!(service, "idmap-under-test", "OTEL_SERVICE_NAME is honoured");
        match span.name.as_str() {
            "idmap.v1.IdentityService/ResolveSession" => server = Some(span),
            "ory.whoami" => whoami = Some(span),
            _ => {}
        }
    }
    let (server, whoami) = (server.unwrap(), whoami.unwrap());
    assert_eq!(hex(&server.parent_span_id), CALLER_SPAN);
    // SPAN_KIND_SERVER
    assert_eq!(server.kind, 2);
    // Kratos saw the trace, with idmap's whoami span as its parent.
    let seen = ory.traceparents(Route::Whoami);
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert_eq!(
        ids(&seen[0]),
        (trace_id.as_str(), hex(&whoami.span_id).as_str())
    );

    // The log line of Ory's answer, inside the call, carries the trace and idmap's span ids.
    let server_span_id = hex(&server.span_id);
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let line = tokio::time::timeout_at(deadline, lines.recv())
            .await
            .expect("no log line of the call carries its trace")
            .expect("idmap serve stopped logging");
        if line.contains("ory answered") {
            let json: serde_json::Value = serde_json::from_str(&line).unwrap();
            let spans = json["spans"].as_array().expect("the line lists its spans");
            assert!(
                spans.iter().any(|s| s["trace_id"] == trace_id.as_str()
                    && s["span_id"] == server_span_id.as_str()),
                "{line}"
            );
            break;
        }
    }
    signal(&child, "-TERM");
    tokio::task::spawn_blocking(move || child.wait().unwrap())
        .await
        .unwrap();
}
