//! The HTTP listener on IDMAP_HTTP_ADDR: liveness and readiness for orchestrators that probe over
//! HTTP rather than gRPC health, and the Ory webhooks (`hooks/`).
//!
//! The listener is exposed to whatever can reach the port, so it bounds what a client can hold:
//! the time to send its request headers, the time a request may take, and the connections open at
//! once (a connection over the cap is closed as soon as it is accepted).

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::Router;
use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

pub mod gateway;
pub mod hooks;

use crate::config::HttpSettings;
use crate::metrics;
use crate::store::Store;
use crate::telemetry;
use crate::tls::ServerTls;

/// How often readiness asks the database, and how long it waits for the answer.
const READINESS_INTERVAL: Duration = Duration::from_secs(2);

/// The longest span name a request gets: the path is the client's to choose.
const MAX_SPAN_NAME: usize = 128;

/// How long a scrape waits for the database's figures before answering without fresh ones.
const FIGURES_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Clone)]
struct HttpState {
    /// The database answered the last readiness check.
    database_ready: Arc<AtomicBool>,
    draining: CancellationToken,
    store: Store,
}

/// Serves the probes and `routes` until `draining` is cancelled, then lets open requests finish.
pub async fn serve(
    listener: TcpListener,
    store: Store,
    routes: Router,
    draining: CancellationToken,
    limits: HttpSettings,
    tls: Option<Arc<ServerTls>>,
) -> std::io::Result<()> {
    let database_ready = Arc::new(AtomicBool::new(true));
    tokio::spawn(check_readiness(
        store.clone(),
        database_ready.clone(),
        draining.clone(),
    ));
    let state = HttpState {
        database_ready,
        draining: draining.clone(),
        store,
    };
    let request_timeout = limits.request_timeout;
    let app = Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready))
        .route("/metrics", get(prometheus_metrics))
        .with_state(state)
        .merge(routes)
        .layer(axum::middleware::from_fn(
            move |request: Request, next: Next| within(request_timeout, request, next),
        ));

    let connections = Arc::new(Semaphore::new(limits.max_connections));
    let graceful = GracefulShutdown::new();
    loop {
        let (tcp, peer) = tokio::select! {
            _ = draining.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of file descriptors, say: the next accept may succeed.
                    tracing::warn!(error = %e, "cannot accept an HTTP connection");
                    continue;
                }
            },
        };
        let Ok(permit) = connections.clone().try_acquire_owned() else {
            tracing::warn!(%peer, "HTTP connection refused: IDMAP_HTTP_MAX_CONNECTIONS are open");
            drop(tcp);
            continue;
        };
        // Webhook answers are small and Kratos waits for each; never hold one back for Nagle.
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(error = %e, "could not set TCP_NODELAY");
        }
        let watcher = graceful.watcher();
        let app = app.clone();
        let header_timeout = limits.header_timeout;
        let acceptor = tls.as_ref().map(|tls| tls.http_acceptor());
        tokio::spawn(async move {
            let served = match acceptor {
                None => serve_connection(tcp, app, header_timeout, watcher).await,
                // The handshake counts against the time to send the headers: both are what a
                // client must do before idmap does anything for it.
                Some(acceptor) => {
                    match tokio::time::timeout(header_timeout, acceptor.accept(tcp)).await {
                        Ok(Ok(tls)) => serve_connection(tls, app, header_timeout, watcher).await,
                        Ok(Err(e)) => {
                            tracing::debug!(error = %e, %peer, "TLS handshake failed");
                            Ok(())
                        }
                        Err(_) => {
                            tracing::debug!(%peer, "TLS handshake timed out");
                            Ok(())
                        }
                    }
                }
            };
            if let Err(e) = served {
                tracing::debug!(error = %e, %peer, "HTTP connection ended with an error");
            }
            drop(permit);
        });
    }
    // In-flight requests finish (the caller bounds the wait with the grace period); idle
    // keep-alive connections close now.
    graceful.shutdown().await;
    Ok(())
}

/// Serves HTTP/1.1 on one accepted connection until it closes or the listener drains.
async fn serve_connection<I>(
    io: I,
    app: Router,
    header_timeout: Duration,
    watcher: hyper_util::server::graceful::Watcher,
) -> Result<(), hyper::Error>
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let connection = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(header_timeout)
        .serve_connection(TokioIo::new(io), TowerToHyperService::new(app));
    watcher.watch(connection).await
}

/// Runs a request for at most `limit`; past it the answer is 503, which Kratos retries.
async fn within(limit: Duration, request: Request, next: Next) -> Result<Response, Infallible> {
    // A span per request (Kratos's webhook calls among them), a child of the caller's trace.
    let mut name = format!("{} {}", request.method(), request.uri().path());
    name.truncate(MAX_SPAN_NAME);
    let span = tracing::info_span!(
        "http",
        otel.name = name,
        otel.kind = "server",
        http.request.method = request.method().as_str(),
        trace_id = tracing::field::Empty,
        span_id = tracing::field::Empty,
    );
    let (span, context) = telemetry::incoming_span(request.headers(), span);
    let call = tokio::time::timeout(limit, next.run(request));
    Ok(
        match telemetry::in_context(call, context).instrument(span).await {
            Ok(response) => response,
            Err(_) => {
                tracing::warn!(
                    limit_ms = limit.as_millis() as u64,
                    "HTTP request took longer than IDMAP_HTTP_REQUEST_TIMEOUT"
                );
                (
                    StatusCode::SERVICE_UNAVAILABLE,
                    "the request took too long; retry\n",
                )
                    .into_response()
            }
        },
    )
}

/// Keeps `ready` current in the background, so a probe (Kubernetes sends one every few seconds,
/// per replica and per probe kind) costs no database connection of its own.
async fn check_readiness(store: Store, ready: Arc<AtomicBool>, draining: CancellationToken) {
    let mut ticks = tokio::time::interval(READINESS_INTERVAL);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = draining.cancelled() => return,
            _ = ticks.tick() => {}
        }
        let answered = tokio::time::timeout(READINESS_INTERVAL, store.ping()).await;
        let now = matches!(answered, Ok(Ok(())));
        if ready.swap(now, Ordering::Relaxed) != now {
            match answered {
                Ok(Ok(())) => tracing::info!("readiness: database reachable again"),
                Ok(Err(e)) => tracing::warn!(error = %e, "readiness: database unavailable"),
                Err(_) => tracing::warn!("readiness: the database did not answer in time"),
            }
        }
    }
}

/// Prometheus's scrape: every family, with the database's figures read now (a scrape is
/// seconds apart; the query is one pass over the outbox). Without the database the figures keep
/// their last values and the rest is served.
async fn prometheus_metrics(State(state): State<HttpState>) -> Response {
    let metrics = metrics::get();
    match tokio::time::timeout(FIGURES_TIMEOUT, state.store.figures()).await {
        Ok(Ok(figures)) => {
            metrics.outbox_pending.set(figures.outbox_pending);
            metrics.outbox_parked.set(figures.outbox_parked);
            metrics
                .outbox_oldest_age
                .set(figures.outbox_oldest_age_secs);
            metrics.pending_users.set(figures.pending_users);
            let as_gauge = |n: usize| i64::try_from(n).unwrap_or(i64::MAX);
            metrics
                .db_pool_connections
                .with_label_values(&["in_use"])
                .set(as_gauge(figures.pool_in_use));
            metrics
                .db_pool_connections
                .with_label_values(&["idle"])
                .set(as_gauge(figures.pool_idle));
            metrics.db_pool_waiting.set(as_gauge(figures.pool_waiting));
        }
        Ok(Err(e)) => {
            tracing::debug!(error = %e, "metrics: the database's figures are not current")
        }
        Err(_) => tracing::debug!("metrics: the database's figures took too long"),
    }
    let (content_type, body) = metrics.render();
    ([(http::header::CONTENT_TYPE, content_type)], body).into_response()
}

/// Ready while not draining and the database answered its last check.
async fn ready(State(state): State<HttpState>) -> (StatusCode, &'static str) {
    if state.draining.is_cancelled() {
        return (StatusCode::SERVICE_UNAVAILABLE, "draining\n");
    }
    if state.database_ready.load(Ordering::Relaxed) {
        (StatusCode::OK, "ready\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "database unavailable\n")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tower::ServiceExt;

    #[tokio::test(start_paused = true)]
    async fn a_request_past_its_time_is_answered_503() {
        let app = Router::new()
            .route(
                "/slow",
                get(|| async {
                    tokio::time::sleep(Duration::from_secs(60)).await;
                    "late"
                }),
            )
            .route("/fast", get(|| async { "ok" }))
            .layer(axum::middleware::from_fn(|request: Request, next: Next| {
                within(Duration::from_secs(1), request, next)
            }));
        let call = |path: &'static str| {
            app.clone()
                .oneshot(Request::get(path).body(axum::body::Body::empty()).unwrap())
        };
        assert_eq!(call("/fast").await.unwrap().status(), StatusCode::OK);
        assert_eq!(
            call("/slow").await.unwrap().status(),
            StatusCode::SERVICE_UNAVAILABLE
        );
    }
}
