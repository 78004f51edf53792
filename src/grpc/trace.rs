//! A span per gRPC call, a child of the caller's W3C trace context (`traceparent` metadata), so
//! the call's logs carry its trace id and its Ory calls carry the trace on (`telemetry`). While
//! nothing is exported, only calls that came with a trace context get one
//! ([`telemetry::wants_span`]).

use std::task::{Context, Poll};

use tracing::Instrument;

use crate::telemetry;

/// Starts a span for every call.
#[derive(Debug, Clone, Copy, Default)]
pub struct CallSpans;

impl<S> tower::Layer<S> for CallSpans {
    type Service = Spanned<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Spanned { inner }
    }
}

/// A gRPC service behind [`CallSpans`].
#[derive(Debug, Clone)]
pub struct Spanned<S> {
    inner: S,
}

type SpannedFuture<F> =
    futures_util::future::Either<tracing::instrument::Instrumented<telemetry::InContext<F>>, F>;

impl<S, B> tower::Service<http::Request<B>> for Spanned<S>
where
    S: tower::Service<http::Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = SpannedFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        if !telemetry::wants_span(request.headers()) {
            return futures_util::future::Either::Right(self.inner.call(request));
        }
        // The path names the RPC (`/package.Service/Method`), as OpenTelemetry names gRPC spans
        // without the leading slash.
        let name = request.uri().path().trim_start_matches('/');
        let span = tracing::info_span!(
            "grpc",
            otel.name = name,
            otel.kind = "server",
            rpc.system = "grpc",
            trace_id = tracing::field::Empty,
            span_id = tracing::field::Empty,
        );
        let (span, context) = telemetry::incoming_span(request.headers(), span);
        futures_util::future::Either::Left(
            telemetry::in_context(self.inner.call(request), context).instrument(span),
        )
    }
}
