//! Logs and traces. Logs go to stderr; `RUST_LOG` filters them (default `info`).
//!
//! Traces: every gRPC call and HTTP request gets a span, a child of the caller's W3C trace context
//! (`traceparent`, `tracestate`) when it sends one, and every Ory call carries the context on, so a
//! trace crosses idmap into Kratos. Spans are exported over OTLP/gRPC when
//! `OTEL_EXPORTER_OTLP_ENDPOINT` (or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) is set; the other
//! standard `OTEL_*` variables (`OTEL_SERVICE_NAME`, `OTEL_RESOURCE_ATTRIBUTES`,
//! `OTEL_TRACES_SAMPLER`, `OTEL_EXPORTER_OTLP_HEADERS`, `OTEL_BSP_*`, `OTEL_SDK_DISABLED`, ...) are
//! read by the OpenTelemetry SDK itself. Without an endpoint nothing is exported, no span is built
//! for OpenTelemetry, and the caller's context is passed on to Ory as it came.

use std::sync::OnceLock;

use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::{TraceContextExt, TracerProvider as _};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

/// Log line format.
#[derive(Debug, Clone, Copy, Default, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line, for log shippers; lines logged inside a call carry its
    /// `trace_id` (and, when traces are exported, idmap's `span_id`).
    Json,
}

/// Whether spans go to OpenTelemetry (set once, by [`init`]).
static EXPORTING: OnceLock<bool> = OnceLock::new();

fn exporting() -> bool {
    EXPORTING.get().copied().unwrap_or(false)
}

/// Whether a call with these headers gets a span: always while spans are exported; otherwise
/// only a call that came with a trace context, whose logs then carry its trace id. An untraced
/// call with nothing exported would pay for a span nobody sees, on the hottest path idmap has.
pub fn wants_span(headers: &http::HeaderMap) -> bool {
    exporting() || headers.contains_key("traceparent")
}

/// Keeps the trace exporter running; dropping it sends what is still buffered.
#[must_use = "dropping it stops exporting traces"]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        if let Some(provider) = self.provider.take()
            && let Err(e) = provider.shutdown()
        {
            eprintln!("warning: exporting the last traces failed: {e}");
        }
    }
}

/// Whether the environment asks for OTLP export.
fn otlp_requested() -> bool {
    let set = |name: &str| std::env::var(name).is_ok_and(|v| !v.trim().is_empty());
    let disabled = std::env::var("OTEL_SDK_DISABLED").is_ok_and(|v| v.eq_ignore_ascii_case("true"))
        || std::env::var("OTEL_TRACES_EXPORTER").is_ok_and(|v| v.eq_ignore_ascii_case("none"));
    !disabled && (set("OTEL_EXPORTER_OTLP_ENDPOINT") || set("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))
}

/// Sets up logging, and trace export when the environment asks for it. Call inside a Tokio
/// runtime (the OTLP exporter's connection runs on it); a second call (tests) keeps the first set-up.
pub fn init(format: LogFormat) -> Telemetry {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let logs = match format {
        LogFormat::Text => tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .boxed(),
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            // The call's span (with its trace and span ids) is the outermost of the list.
            .with_current_span(false)
            .with_span_list(true)
            .with_writer(std::io::stderr)
            .boxed(),
    };
    let provider = if otlp_requested() {
        match opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .build()
        {
            Ok(exporter) => {
                // The SDK's own resource reads OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES;
                // without them the service is `idmap`, not `unknown_service`.
                let mut resource = opentelemetry_sdk::Resource::builder();
                if std::env::var_os("OTEL_SERVICE_NAME").is_none() {
                    resource = resource.with_service_name("idmap");
                }
                Some(
                    SdkTracerProvider::builder()
                        .with_resource(resource.build())
                        .with_batch_exporter(exporter)
                        .build(),
                )
            }
            Err(e) => {
                eprintln!("warning: traces will not be exported: {e}");
                None
            }
        }
    } else {
        None
    };
    let traces = provider
        .as_ref()
        .map(|p| tracing_opentelemetry::layer().with_tracer(p.tracer("idmap")));
    let installed = tracing_subscriber::registry()
        .with(filter)
        .with(logs)
        .with(traces)
        .try_init()
        .is_ok();
    if !installed {
        return Telemetry { provider: None };
    }
    let _ = EXPORTING.set(provider.is_some());
    Telemetry { provider }
}

/// The span of one incoming call, named `name` for OpenTelemetry, and the caller's trace context
/// (`None` when it sent none), which the call must run in ([`in_context`]) for Ory calls to carry
/// it on when traces are not exported.
pub fn incoming_span(
    headers: &http::HeaderMap,
    span: tracing::Span,
) -> (tracing::Span, Option<opentelemetry::Context>) {
    if headers.get("traceparent").is_none() {
        return (span, None);
    }
    let context = TraceContextPropagator::new().extract(&HeaderCarrier(headers));
    let remote = context.span().span_context().clone();
    if !remote.is_valid() {
        return (span, None);
    }
    span.record("trace_id", tracing::field::display(remote.trace_id()));
    if exporting() {
        // The span is a child of the caller's; its own ids come from OpenTelemetry.
        let _ = span.set_parent(context.clone());
        let own = span.context().span().span_context().clone();
        span.record("span_id", tracing::field::display(own.span_id()));
    }
    (span, Some(context))
}

/// A call's future, run inside its caller's trace context when there is one.
pub type InContext<F> = futures_util::future::Either<opentelemetry::trace::WithContext<F>, F>;

/// Runs `call` inside the caller's trace context, when there is one.
pub fn in_context<F: Future>(call: F, context: Option<opentelemetry::Context>) -> InContext<F> {
    use opentelemetry::trace::FutureExt;
    match context {
        Some(context) => futures_util::future::Either::Left(call.with_context(context)),
        None => futures_util::future::Either::Right(call),
    }
}

/// Adds the current trace context (`traceparent`, `tracestate`) to an outgoing request's headers:
/// idmap's current span when traces are exported, else the caller's context as it came.
pub fn inject(headers: &mut http::HeaderMap) {
    let context = if exporting() {
        tracing::Span::current().context()
    } else {
        opentelemetry::Context::current()
    };
    if context.span().span_context().is_valid() {
        TraceContextPropagator::new().inject_context(&context, &mut HeaderCarrierMut(headers));
    }
}

struct HeaderCarrier<'a>(&'a http::HeaderMap);

impl Extractor for HeaderCarrier<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(http::HeaderName::as_str).collect()
    }
}

struct HeaderCarrierMut<'a>(&'a mut http::HeaderMap);

impl Injector for HeaderCarrierMut<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(name), Ok(value)) = (
            http::HeaderName::from_bytes(key.as_bytes()),
            http::HeaderValue::from_str(&value),
        ) {
            self.0.insert(name, value);
        }
    }
}
