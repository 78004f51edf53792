//! The gRPC server's metrics, as go-grpc-prometheus names them: calls started, calls handled by
//! status code, and handling time, per method. Outermost of the server's layers, so calls that the
//! in-flight limit sheds or the caller check refuses are counted with their codes too.
//!
//! Methods are read from the descriptors the server serves, so no label value comes from the
//! request: a path no service has is counted as `unknown`.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::OnceLock;
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use http_body::Frame;
use prometheus::{Histogram, IntCounter};
use prost::Message;
use tonic::body::Body;

use crate::metrics;

/// gRPC's status codes, by number, as the other gRPC implementations name them in metrics.
const CODES: [&str; 17] = [
    "OK",
    "Canceled",
    "Unknown",
    "InvalidArgument",
    "DeadlineExceeded",
    "NotFound",
    "AlreadyExists",
    "PermissionDenied",
    "ResourceExhausted",
    "FailedPrecondition",
    "Aborted",
    "OutOfRange",
    "Unimplemented",
    "Internal",
    "Unavailable",
    "DataLoss",
    "Unauthenticated",
];
const CANCELED: usize = 1;
const UNKNOWN: usize = 2;

/// One method's counters, resolved once.
struct Method {
    /// `grpc_type`, `grpc_service`, `grpc_method`.
    labels: [String; 3],
    started: IntCounter,
    handling: Histogram,
    /// By code, made on first use so the scrape lists only codes that happened.
    handled: [OnceLock<IntCounter>; 17],
}

impl Method {
    fn new(kind: &str, service: &str, method: &str) -> Self {
        let labels = [kind.to_owned(), service.to_owned(), method.to_owned()];
        let m = metrics::get();
        let values = [labels[0].as_str(), labels[1].as_str(), labels[2].as_str()];
        Self {
            started: m.grpc_started.with_label_values(&values),
            handling: m.grpc_handling_seconds.with_label_values(&values),
            handled: std::array::from_fn(|_| OnceLock::new()),
            labels,
        }
    }

    fn handled(&self, code: usize) {
        let code = if code < CODES.len() { code } else { UNKNOWN };
        self.handled[code]
            .get_or_init(|| {
                let [kind, service, method] = &self.labels;
                metrics::get().grpc_handled.with_label_values(&[
                    kind.as_str(),
                    service.as_str(),
                    method.as_str(),
                    CODES[code],
                ])
            })
            .inc();
    }
}

struct Methods {
    by_path: HashMap<String, usize>,
    /// The known methods, then `unknown`.
    all: Vec<Method>,
}

impl Methods {
    fn index(&self, path: &str) -> usize {
        self.by_path
            .get(path)
            .copied()
            .unwrap_or(self.all.len() - 1)
    }
}

/// The methods of the process's servers, read once: every server idmap builds serves the same
/// services, and a reference to a static costs a call nothing, where an `Arc` shared by every
/// call would be one more cache line the cores pass back and forth.
static METHODS: OnceLock<Methods> = OnceLock::new();

/// Counts every call of the services in the given encoded descriptor sets.
#[derive(Clone, Copy)]
pub struct GrpcMetrics {
    methods: &'static Methods,
}

impl GrpcMetrics {
    /// `descriptor_sets`: encoded `FileDescriptorSet`s of the services the server serves (a set
    /// that does not decode adds no method; its calls count as `unknown`). The first server of the
    /// process decides them.
    pub fn new(descriptor_sets: &[&[u8]]) -> Self {
        Self {
            methods: METHODS.get_or_init(|| Methods::read(descriptor_sets)),
        }
    }
}

impl Methods {
    fn read(descriptor_sets: &[&[u8]]) -> Self {
        let mut by_path = HashMap::new();
        let mut all = Vec::new();
        for encoded in descriptor_sets {
            let Ok(set) = prost_types::FileDescriptorSet::decode(*encoded) else {
                tracing::warn!(
                    "metrics: a descriptor set does not decode; its calls count as unknown"
                );
                continue;
            };
            for file in &set.file {
                for service in &file.service {
                    let name = match file.package() {
                        "" => service.name().to_owned(),
                        package => format!("{package}.{}", service.name()),
                    };
                    for method in &service.method {
                        let path = format!("/{name}/{}", method.name());
                        if by_path.contains_key(&path) {
                            continue;
                        }
                        let kind = match (method.client_streaming(), method.server_streaming()) {
                            (false, false) => "unary",
                            (true, false) => "client_stream",
                            (false, true) => "server_stream",
                            (true, true) => "bidi_stream",
                        };
                        by_path.insert(path, all.len());
                        all.push(Method::new(kind, &name, method.name()));
                    }
                }
            }
        }
        all.push(Method::new("unknown", "unknown", "unknown"));
        Methods { by_path, all }
    }
}

impl<S> tower::Layer<S> for GrpcMetrics {
    type Service = Metered<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Metered {
            metrics: *self,
            inner,
        }
    }
}

/// A gRPC service behind [`GrpcMetrics`].
#[derive(Clone)]
pub struct Metered<S> {
    metrics: GrpcMetrics,
    inner: S,
}

impl<S, B> tower::Service<http::Request<B>> for Metered<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<Body>>,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future = Timed<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let methods = self.metrics.methods;
        let method = methods.index(request.uri().path());
        methods.all[method].started.inc();
        Timed {
            call: self.inner.call(request),
            call_of: Some(CallOf { methods, method }),
            started: Instant::now(),
        }
    }
}

/// The method a call is counted under; counts the call as handled, once.
struct CallOf {
    methods: &'static Methods,
    method: usize,
}

impl CallOf {
    fn method(&self) -> &Method {
        &self.methods.all[self.method]
    }
}

pin_project_lite::pin_project! {
    /// A call's future: the handling time ends when the answer's headers are ready, as it does
    /// for a unary handler's return in the other implementations.
    pub struct Timed<F> {
        #[pin]
        call: F,
        call_of: Option<CallOf>,
        started: Instant,
    }
}

impl<F, E> Future for Timed<F>
where
    F: Future<Output = Result<http::Response<Body>, E>>,
{
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = self.project();
        let answer = std::task::ready!(this.call.poll(cx));
        let Some(call_of) = this.call_of.take() else {
            return Poll::Ready(answer);
        };
        call_of
            .method()
            .handling
            .observe(this.started.elapsed().as_secs_f64());
        Poll::Ready(match answer {
            // A status in the headers: an error, answered without a body ("trailers only").
            Ok(response) => match status_code(response.headers()) {
                Some(code) => {
                    call_of.method().handled(code);
                    Ok(response)
                }
                None => Ok(response.map(|body| {
                    Body::new(Trailed {
                        body,
                        call_of: Some(call_of),
                    })
                })),
            },
            Err(e) => {
                call_of.method().handled(UNKNOWN);
                Err(e)
            }
        })
    }
}

/// The `grpc-status` in `headers`, as an index into [`CODES`] (UNKNOWN for a value gRPC does not
/// define).
fn status_code(headers: &http::HeaderMap) -> Option<usize> {
    let value = headers.get("grpc-status")?;
    Some(
        value
            .to_str()
            .ok()
            .and_then(|v| v.parse::<usize>().ok())
            .filter(|code| *code < CODES.len())
            .unwrap_or(UNKNOWN),
    )
}

pin_project_lite::pin_project! {
    /// A response body whose trailers carry the call's status.
    struct Trailed {
        #[pin]
        body: Body,
        call_of: Option<CallOf>,
    }

    impl PinnedDrop for Trailed {
        // Dropped before its trailers: the client went away (or the connection did).
        fn drop(this: Pin<&mut Self>) {
            if let Some(call_of) = this.project().call_of.take() {
                call_of.method().handled(CANCELED);
            }
        }
    }
}

impl http_body::Body for Trailed {
    type Data = Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = self.project();
        let frame = std::task::ready!(this.body.poll_frame(cx));
        let code = match &frame {
            Some(Ok(frame)) => frame
                .trailers_ref()
                .map(|t| status_code(t).unwrap_or(UNKNOWN)),
            Some(Err(_)) | None => Some(UNKNOWN),
        };
        if let Some(code) = code
            && let Some(call_of) = this.call_of.take()
        {
            call_of.method().handled(code);
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}
