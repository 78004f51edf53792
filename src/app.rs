//! Builds the service from a [`Config`] and serves it until told to stop.

use std::future::Future;
use std::sync::Arc;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tonic_health::ServingStatus;

use crate::cache::Caches;
use crate::config::{Config, ENV_DATABASE_URL};
use crate::grpc::IdentityApi;
use crate::ory::KratosClient;
use crate::outbox::OutboxWorker;
use crate::pending::PendingSweeper;
use crate::proto::{self, api::identity_service_server::IdentityServiceServer};
use crate::service::IdentityMapper;
use crate::store::{Store, migrate};

/// How long start-up waits for the invalidation listener's first LISTEN.
const LISTEN_READY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// The name health checks use for the business service.
pub const SERVICE_NAME: &str = "idmap.v1.IdentityService";

/// Everything the server needs, built once.
pub struct App {
    config: Config,
    store: Store,
    ory: KratosClient,
    mapper: Arc<IdentityMapper>,
    outbox_wakeup: Arc<Notify>,
}

impl App {
    /// Builds the clients and checks the database: reachable, and migrated to this binary's schema.
    /// Binds nothing, so a failure here leaves no port behind.
    pub async fn build(config: Config) -> anyhow::Result<Self> {
        let store = Store::new(&config.database_url, &config.pool)
            .with_context(|| format!("{ENV_DATABASE_URL} is not usable"))?;
        store
            .ping()
            .await
            .with_context(|| format!("cannot reach the database at {ENV_DATABASE_URL}"))?;
        let pending = migrate::pending(&config.database_url).await?;
        if !pending.is_empty() {
            anyhow::bail!(
                "the database schema is behind this binary ({} pending migration(s): {}); run `idmap migrate` first",
                pending.len(),
                pending.join(", ")
            );
        }
        let ory = KratosClient::new(config.ory.clone()).context("cannot build the Ory client")?;
        let outbox_wakeup = Arc::new(Notify::new());
        let caches = Arc::new(Caches::new(config.cache.clone()));
        let mapper = Arc::new(IdentityMapper::new(
            store.clone(),
            ory.clone(),
            config.service.clone(),
            caches,
            outbox_wakeup.clone(),
        ));
        Ok(Self {
            config,
            store,
            ory,
            mapper,
            outbox_wakeup,
        })
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The use cases, for commands that run them without serving (backfill, reconcile).
    pub fn mapper(&self) -> &Arc<IdentityMapper> {
        &self.mapper
    }

    /// Serves gRPC on `grpc` and HTTP on `http`, and runs the outbox worker, until `shutdown`
    /// resolves. Then health turns NOT_SERVING, new connections are refused, in-flight calls get up
    /// to the grace period to finish, and the outbox worker stops at once, giving back the rows it
    /// holds. Everything, background tasks included, is done within the grace period.
    pub async fn serve(
        self,
        grpc: TcpListener,
        http: TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        let (health, health_service) = tonic_health::server::health_reporter();
        health
            .set_service_status(SERVICE_NAME, ServingStatus::Serving)
            .await;
        health.set_service_status("", ServingStatus::Serving).await;

        let reflection_v1 = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .build_v1()
            .context("building the reflection service")?;
        let reflection_v1alpha = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .build_v1alpha()
            .context("building the reflection service")?;

        let stop = CancellationToken::new();
        // The worker stops when draining starts rather than after: a delivery may wait on a slow
        // Ory for longer than the grace period, and the rows it gives back are delivered by another
        // replica or the next start.
        let stop_worker = stop.child_token();
        // Serve only once other replicas' evictions reach us; until then we could serve what they
        // have evicted.
        let (listening_tx, mut listening) = tokio::sync::watch::channel(false);
        let listener = tokio::spawn(self.mapper.invalidator().clone().listen(
            self.config.database_url.clone(),
            listening_tx,
            stop.child_token(),
        ));
        tokio::time::timeout(LISTEN_READY_TIMEOUT, listening.wait_for(|ready| *ready))
            .await
            .context("the invalidation listener could not LISTEN in time")?
            .context("the invalidation listener stopped")?;
        let worker = tokio::spawn(
            OutboxWorker::new(
                self.store.clone(),
                self.ory.clone(),
                self.config.outbox.clone(),
                self.outbox_wakeup.clone(),
            )
            .run(stop_worker.clone()),
        );

        let sweeper = tokio::spawn(
            PendingSweeper::new(self.store.clone(), self.config.pending_users.clone())
                .run(stop.child_token()),
        );

        let draining = CancellationToken::new();
        let http_task = tokio::spawn(crate::http::serve(
            http,
            self.store.clone(),
            crate::hooks::router(self.mapper.clone(), &self.config.hooks),
            draining.clone(),
        ));

        let grpc_addr = grpc.local_addr().ok();
        tracing::info!(grpc = ?grpc_addr, "serving");
        let draining_for_signal = draining.clone();
        let health_for_signal = health.clone();
        let drain_started = Arc::new(std::sync::OnceLock::new());
        let drain_started_for_signal = drain_started.clone();
        let signal = async move {
            shutdown.await;
            drain_started_for_signal.get_or_init(tokio::time::Instant::now);
            stop_worker.cancel();
            tracing::info!("shutting down: health NOT_SERVING, draining in-flight calls");
            health_for_signal
                .set_service_status(SERVICE_NAME, ServingStatus::NotServing)
                .await;
            health_for_signal
                .set_service_status("", ServingStatus::NotServing)
                .await;
            draining_for_signal.cancel();
        };

        let grace = self.config.shutdown_grace;
        let server = tonic::transport::Server::builder()
            .add_service(health_service)
            .add_service(reflection_v1)
            .add_service(reflection_v1alpha)
            .add_service(IdentityServiceServer::new(IdentityApi::new(
                self.mapper.clone(),
            )))
            .serve_with_incoming_shutdown(crate::grpc::incoming(grpc), signal);
        let mut server = std::pin::pin!(server);
        let result = tokio::select! {
            r = &mut server => r.map_err(anyhow::Error::from),
            // The grace period starts when draining does; past it, in-flight calls are abandoned.
            _ = async { draining.cancelled().await; tokio::time::sleep(grace).await } => {
                tracing::warn!(grace = ?grace, "in-flight calls did not finish within the grace period");
                Ok(())
            }
        };

        stop.cancel();
        draining.cancel();
        // Whatever is left shares what remains of the grace period; a task past it is abandoned
        // (an abandoned outbox delivery only delays its row until the lease runs out).
        let deadline = drain_started
            .get()
            .copied()
            .unwrap_or_else(tokio::time::Instant::now)
            + grace;
        let mut worker = worker;
        let mut listener = listener;
        let mut sweeper = sweeper;
        join_by(deadline, "the outbox worker", &mut worker).await;
        join_by(deadline, "the invalidation listener", &mut listener).await;
        join_by(deadline, "the pending-user sweep", &mut sweeper).await;
        let mut http_task = http_task;
        match tokio::time::timeout_at(deadline, &mut http_task).await {
            Ok(Ok(Err(e))) => tracing::error!(error = %e, "the HTTP server failed"),
            Ok(other) => report_task("the HTTP server", other.map(|_| ())),
            Err(_) => {
                tracing::warn!("HTTP calls did not finish within the grace period");
                http_task.abort();
            }
        }
        tracing::info!("stopped");
        result
    }
}

/// Waits for a background task until `deadline`, then abandons it.
async fn join_by(
    deadline: tokio::time::Instant,
    name: &str,
    task: &mut tokio::task::JoinHandle<()>,
) {
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
