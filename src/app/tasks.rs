//! The background work beside the gRPC server, started before it serves and stopped within the
//! grace period after it.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::App;
use crate::auth::CallerPolicy;
use crate::worker::outbox::OutboxWorker;
use crate::worker::pending_sweep::PendingSweeper;

/// How long start-up waits for the invalidation listener's first LISTEN.
const LISTEN_READY_TIMEOUT: Duration = Duration::from_secs(10);

/// The running background tasks and the tokens that stop them.
pub(super) struct Background {
    /// Stops the listener and the sweep (and the worker, if it is still running).
    stop: CancellationToken,
    /// Stops the outbox worker; cancelled as soon as draining starts.
    pub stop_worker: CancellationToken,
    /// Cancelled when draining starts: the HTTP listener stops accepting and `/readyz` fails.
    pub draining: CancellationToken,
    listener: JoinHandle<()>,
    worker: JoinHandle<()>,
    sweeper: JoinHandle<()>,
    session_sweeper: JoinHandle<()>,
    http: JoinHandle<std::io::Result<()>>,
}

impl Background {
    /// Starts every task. Returns once the invalidation listener is in place: until other
    /// replicas' evictions reach this one, it could serve what they have evicted.
    pub async fn start(
        app: &App,
        http: TcpListener,
        policy: Arc<CallerPolicy>,
    ) -> anyhow::Result<Self> {
        let stop = CancellationToken::new();
        let stop_worker = stop.child_token();
        let draining = CancellationToken::new();

        let (listening_tx, mut listening) = tokio::sync::watch::channel(false);
        let listener = tokio::spawn(crate::worker::listener::run(
            app.mapper.invalidator().clone(),
            app.store.clone(),
            app.config.listen_heartbeat,
            listening_tx,
            stop.child_token(),
        ));
        tokio::time::timeout(LISTEN_READY_TIMEOUT, listening.wait_for(|ready| *ready))
            .await
            .context("the invalidation listener could not LISTEN in time")?
            .context("the invalidation listener stopped")?;
        let worker = tokio::spawn(
            OutboxWorker::new(
                app.store.clone(),
                app.ory.clone(),
                app.config.outbox.clone(),
                app.outbox_wakeup.clone(),
            )
            .run(stop_worker.clone()),
        );
        let sweeper = tokio::spawn(
            PendingSweeper::new(app.store.clone(), app.config.pending_users.clone())
                .run(stop.child_token()),
        );
        let session_sweeper = tokio::spawn(crate::worker::session_sweep::run(
            app.store.clone(),
            stop.child_token(),
        ));
        let http = tokio::spawn(crate::http::serve(
            http,
            app.store.clone(),
            crate::http::hooks::router(app.mapper.clone(), &app.config.hooks)
                .merge(crate::http::gateway::router(app.gateway.clone(), policy)),
            draining.clone(),
            app.config.http.clone(),
            app.tls.clone(),
        ));
        Ok(Self {
            stop,
            stop_worker,
            draining,
            listener,
            worker,
            sweeper,
            session_sweeper,
            http,
        })
    }

    /// Stops every task and waits for them until `deadline`, then abandons what is left (an
    /// abandoned outbox delivery only delays its row until the lease runs out).
    pub async fn stop_by(self, deadline: Instant) {
        let Self {
            stop,
            draining,
            mut listener,
            mut worker,
            mut sweeper,
            mut session_sweeper,
            mut http,
            ..
        } = self;
        stop.cancel();
        draining.cancel();
        join_by(deadline, "the outbox worker", &mut worker).await;
        join_by(deadline, "the invalidation listener", &mut listener).await;
        join_by(deadline, "the pending-user sweep", &mut sweeper).await;
        join_by(deadline, "the shared session sweep", &mut session_sweeper).await;
        match tokio::time::timeout_at(deadline, &mut http).await {
            Ok(Ok(Err(e))) => tracing::error!(error = %e, "the HTTP server failed"),
            Ok(other) => report_task("the HTTP server", other.map(|_| ())),
            Err(_) => {
                tracing::warn!("HTTP calls did not finish within the grace period");
                http.abort();
            }
        }
    }
}

/// Waits for a background task until `deadline`, then abandons it.
async fn join_by(deadline: Instant, name: &str, task: &mut JoinHandle<()>) {
    match tokio::time::timeout_at(deadline, &mut *task).await {
        Ok(result) => report_task(name, result),
        Err(_) => {
            tracing::warn!("{name} did not stop within the grace period; abandoning it");
            task.abort();
        }
    }
}

/// Logs a background task that ended abnormally. A task cancelled because the runtime is going away
/// (a test ending) is not a failure.
fn report_task(name: &str, result: Result<(), tokio::task::JoinError>) {
    if let Err(e) = result
        && e.is_panic()
    {
        tracing::error!(error = %e, "{name} panicked");
    }
}
