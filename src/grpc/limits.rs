//! Limits of the gRPC transport that tonic does not set itself: the largest request any RPC
//! accepts, and a server-wide cap on calls in progress that sheds load at once instead of queueing
//! it without bound.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};

use std::future::Future;
use std::pin::Pin;

use futures_util::future::{Either, Ready};
use tonic::body::Body;

use crate::domain::{MAX_COOKIE_HEADER_BYTES, MAX_EXTERNAL_ID_BYTES, MAX_SESSION_TOKEN_BYTES};
use crate::service::MAX_BATCH_IDS;

/// The largest encoded request of an RPC that can be valid: a BatchGetUsers of every id it may
/// carry (each a 36-character UUID behind a two-byte tag and length), a ResolveSession with the
/// longest Cookie header, a LinkIdentity with the longest external id; plus room for framing. A
/// larger message is refused from its length prefix, before it is read into memory or decoded.
pub const MAX_REQUEST_BYTES: usize = 1024
    + max(
        MAX_BATCH_IDS * (36 + 2),
        max(
            MAX_COOKIE_HEADER_BYTES + MAX_SESSION_TOKEN_BYTES,
            3 * 40 + MAX_EXTERNAL_ID_BYTES,
        ),
    );

// Small enough that a request is never worth buffering twice the default 4 MiB for.
const _: () = assert!(MAX_REQUEST_BYTES < 256 * 1024);

const fn max(a: usize, b: usize) -> usize {
    if a > b { a } else { b }
}

/// Caps the calls in progress across every connection; a call over the cap is answered
/// RESOURCE_EXHAUSTED at once. Health checks are never shed: a probe must see the server alive
/// while it is busy.
#[derive(Debug, Clone)]
pub struct InFlightLimit {
    in_flight: Arc<AtomicUsize>,
    max: usize,
}

impl InFlightLimit {
    pub fn new(max_in_flight: usize) -> Self {
        Self {
            in_flight: Arc::new(AtomicUsize::new(0)),
            max: max_in_flight,
        }
    }
}

/// One call's place under the limit, given back when dropped. A counter rather than a semaphore:
/// nothing ever waits for a place, and a semaphore's release takes a lock on every call.
pub struct Place(Arc<AtomicUsize>);

impl Place {
    fn take(limit: &InFlightLimit) -> Option<Self> {
        let before = limit.in_flight.fetch_add(1, Ordering::AcqRel);
        let place = Self(limit.in_flight.clone());
        (before < limit.max).then_some(place)
    }
}

impl Drop for Place {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl<S> tower::Layer<S> for InFlightLimit {
    type Service = Limited<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Limited {
            limit: self.clone(),
            inner,
        }
    }
}

/// A gRPC service behind [`InFlightLimit`].
#[derive(Debug, Clone)]
pub struct Limited<S> {
    limit: InFlightLimit,
    inner: S,
}

impl<S, B> tower::Service<http::Request<B>> for Limited<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<Body>>,
    S::Future: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future =
        Either<Either<S::Future, WithPermit<S::Future>>, Ready<Result<Self::Response, S::Error>>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        if request.uri().path().starts_with("/grpc.health.v1.Health/") {
            return Either::Left(Either::Left(self.inner.call(request)));
        }
        match Place::take(&self.limit) {
            // The place is given back when the answer is ready (for a unary call: when it is done).
            Some(place) => Either::Left(Either::Right(WithPermit {
                call: self.inner.call(request),
                permit: Some(place),
            })),
            None => {
                let status = super::status::overloaded(request.uri().path());
                Either::Right(futures_util::future::ready(Ok(status.into_http())))
            }
        }
    }
}

pin_project_lite::pin_project! {
    /// A call's future that holds its permit until the answer is ready.
    pub struct WithPermit<F> {
        #[pin]
        call: F,
        permit: Option<Place>,
    }
}

impl<F: Future> Future for WithPermit<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = self.project();
        let answer = std::task::ready!(this.call.poll(cx));
        this.permit.take();
        Poll::Ready(answer)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_request_limit_fits_the_largest_valid_request() {
        use prost::Message;
        let batch = crate::proto::api::BatchGetUsersRequest {
            ory_identity_ids: vec![uuid::Uuid::nil().to_string(); MAX_BATCH_IDS],
        };
        assert!(batch.encoded_len() <= MAX_REQUEST_BYTES);
    }
}
