//! The HTTP listener on IDMAP_HTTP_ADDR: liveness and readiness for orchestrators that probe over
//! HTTP rather than gRPC health, and the Ory webhooks (`hooks/`).

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use axum::serve::ListenerExt;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub mod hooks;

use crate::store::Store;

#[derive(Clone)]
struct HttpState {
    store: Store,
    draining: CancellationToken,
}

/// Serves the probes and `routes` until `draining` is cancelled.
pub async fn serve(
    listener: TcpListener,
    store: Store,
    routes: Router,
    draining: CancellationToken,
) -> std::io::Result<()> {
    let state = HttpState {
        store,
        draining: draining.clone(),
    };
    let app = Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready))
        .with_state(state)
        .merge(routes);
    // Webhook answers are small and Kratos waits for each; never hold one back for Nagle.
    let listener = listener.tap_io(|tcp| {
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(error = %e, "could not set TCP_NODELAY");
        }
    });
    axum::serve(listener, app)
        .with_graceful_shutdown(async move { draining.cancelled().await })
        .await
}

/// Ready while not draining and the database answers.
async fn ready(State(state): State<HttpState>) -> (StatusCode, &'static str) {
    if state.draining.is_cancelled() {
        return (StatusCode::SERVICE_UNAVAILABLE, "draining\n");
    }
    match state.store.ping().await {
        Ok(()) => (StatusCode::OK, "ready\n"),
        Err(e) => {
            tracing::warn!(error = %e, "readiness: database unavailable");
            (StatusCode::SERVICE_UNAVAILABLE, "database unavailable\n")
        }
    }
}
