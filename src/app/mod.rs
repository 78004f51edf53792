//! Builds the service from a [`Config`] and serves it until told to stop: `server` builds the gRPC
//! side (the business service, health, reflection), `tasks` runs the background work beside it
//! (invalidation listener, outbox worker, pending-user sweep, HTTP listener) and stops it in time.

mod server;
mod tasks;

use std::future::Future;
use std::sync::{Arc, OnceLock};

use anyhow::Context;
use tokio::net::TcpListener;
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::auth::CallerPolicy;
use crate::cache::Caches;
use crate::config::{
    Config, ConfigError, ENV_ASSERTION_KEY, ENV_DATABASE_READ_URL, ENV_DATABASE_URL, ENV_GRPC_ADDR,
    ENV_HTTP_ADDR, ENV_TLS_CERT, ENV_TLS_CLIENT_CA, ENV_TLS_KEY, ListenerTlsFiles,
};
use secrecy::ExposeSecret;

use crate::assertion::AssertionKeys;
use crate::gateway::Gateway;
use crate::grpc::CallerAuth;
use crate::jobs::Jobs;
use crate::ory::KratosClient;
use crate::service::IdentityMapper;
use crate::store::{Database, Store, migrate};
use crate::tls::{ServerTls, ServerTlsFiles, TlsError};
use server::GrpcServer;
use tasks::Background;

pub use server::SERVICE_NAME;

/// Everything the server needs, built once.
pub struct App {
    config: Config,
    /// TLS of both listeners, when configured.
    tls: Option<Arc<ServerTls>>,
    store: Store,
    ory: KratosClient,
    mapper: Arc<IdentityMapper>,
    /// The decision gateways ask for (ext_authz on the gRPC port, forward-auth on HTTP).
    gateway: Arc<Gateway>,
    outbox_wakeup: Arc<Notify>,
}

impl App {
    /// Builds the clients and checks the database: reachable, and migrated to this binary's schema.
    /// Binds nothing, so a failure here leaves no port behind.
    pub async fn build(config: Config) -> anyhow::Result<Self> {
        let database = Database::new(&config.database_url).map_err(|e| ConfigError::Unusable {
            setting: ENV_DATABASE_URL,
            problem: e.to_string(),
        })?;
        let tls = match &config.tls.files {
            Some(files) => Some(Arc::new(load_tls(files)?)),
            None => None,
        };
        let mut store = Store::new(&database, &config.pool)
            .with_context(|| format!("{ENV_DATABASE_URL} is not usable"))?;
        if let Some(url) = &config.database_read_url {
            let replica = Database::new(url).map_err(|e| ConfigError::Unusable {
                setting: ENV_DATABASE_READ_URL,
                problem: e.to_string(),
            })?;
            store = store
                .with_replica(&replica, &config.pool)
                .with_context(|| format!("{ENV_DATABASE_READ_URL} is not usable"))?;
        }
        store.ping().await.with_context(|| {
            format!(
                "cannot reach the database at {ENV_DATABASE_URL} ({})",
                database.target()
            )
        })?;
        let pending = migrate::pending(&database).await?;
        if !pending.is_empty() {
            anyhow::bail!(
                "the database schema is behind this binary ({} pending migration(s): {}); run `idmap migrate` first",
                pending.len(),
                pending.join(", ")
            );
        }
        let ory = KratosClient::new(config.ory.clone()).context("cannot build the Ory client")?;
        let outbox_wakeup = Arc::new(Notify::new());
        let caches = Arc::new(Caches::new(config.cache.clone()).shared_through(store.clone()));
        let assertion_keys = match &config.assertion_keys {
            Some(pem) => Some(Arc::new(
                AssertionKeys::from_pem_bundle(pem.expose_secret()).map_err(|e| {
                    ConfigError::Unusable {
                        setting: ENV_ASSERTION_KEY,
                        problem: e.to_string(),
                    }
                })?,
            )),
            None => None,
        };
        let mapper = Arc::new(
            IdentityMapper::new(
                store.clone(),
                ory.clone(),
                config.service.clone(),
                caches,
                outbox_wakeup.clone(),
            )
            .with_assertion_keys(assertion_keys),
        );
        let gateway = Arc::new(Gateway::new(mapper.clone(), config.gateway.clone()));
        Ok(Self {
            config,
            tls,
            store,
            ory,
            mapper,
            gateway,
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

    /// The backfill and reconcile walks, over this app's store, Ory client and link path.
    pub fn jobs(&self) -> Jobs {
        Jobs::new(
            self.mapper.clone(),
            self.store.clone(),
            self.ory.clone(),
            self.outbox_wakeup.clone(),
        )
    }

    /// Serves gRPC on `grpc` and HTTP on `http`, and runs the background work, until `shutdown`
    /// resolves. Then health turns NOT_SERVING, new connections are refused, in-flight calls get up
    /// to the grace period to finish, and the outbox worker stops at once, giving back the rows it
    /// holds. Everything, background tasks included, is done within the grace period.
    pub async fn serve(
        self,
        grpc: TcpListener,
        http: TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        let policy = CallerPolicy::from_settings(&self.config.callers)?;
        self.serve_as(policy, grpc, http, shutdown).await
    }

    /// [`App::serve`] with the caller policy already read from the settings (`idmap serve` reads
    /// it before anything else, so a bad callers file costs no connection).
    pub async fn serve_as(
        self,
        policy: CallerPolicy,
        grpc: TcpListener,
        http: TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        let grace = self.config.shutdown_grace;
        let delay = self.config.shutdown_delay.min(grace);
        if matches!(policy, CallerPolicy::AnyCaller) {
            tracing::warn!(
                "IDMAP_ALLOW_ANY_CALLER: any caller that reaches the gRPC port may call every RPC"
            );
        }
        let policy = Arc::new(policy);
        let auth = CallerAuth::new(policy.clone(), self.config.callers.trusted_header);
        let server = GrpcServer::build(
            self.mapper.clone(),
            self.gateway.clone(),
            auth,
            &self.config.grpc,
        )
        .await?;
        let background = Background::start(&self, http, policy).await?;
        if let Some(tls) = &self.tls {
            let draining = background.draining.clone();
            tokio::spawn(
                tls.clone()
                    .watch(self.config.tls.reload_interval, draining.cancelled_owned()),
            );
        }
        tracing::info!(
            grpc = ?grpc.local_addr().ok(),
            tls = self.tls.is_some(),
            client_certificates = self.tls.as_ref().is_some_and(|t| t.requires_client_certificates()),
            "serving"
        );

        let drain_started = Arc::new(OnceLock::new());
        let signal = {
            let drain_started = drain_started.clone();
            let health = server.health.clone();
            let draining = background.draining.clone();
            let stop_worker = background.stop_worker.clone();
            async move {
                shutdown.await;
                drain_started.get_or_init(Instant::now);
                // The worker stops when draining starts rather than after: a delivery may wait on
                // a slow Ory for longer than the grace period, and the rows it gives back are
                // delivered by another replica or the next start.
                stop_worker.cancel();
                server::not_serving(&health).await;
                if !delay.is_zero() {
                    // Calls keep arriving until balancers and sidecars have seen NOT_SERVING (or
                    // the endpoint's removal); closing connections now would fail those.
                    tracing::info!(delay = ?delay, "shutting down: health NOT_SERVING, still serving for IDMAP_SHUTDOWN_DELAY");
                    tokio::time::sleep(delay).await;
                }
                tracing::info!("shutting down: draining in-flight calls");
                draining.cancel();
            }
        };
        let draining = background.draining.clone();
        let serving = server.serve(grpc, self.tls.clone(), signal);
        let mut serving = std::pin::pin!(serving);
        let result = tokio::select! {
            r = &mut serving => r,
            // The grace period starts with the shutdown (the delay counts against it); past it,
            // in-flight calls are abandoned.
            _ = async {
                draining.cancelled().await;
                let started = drain_started.get().copied().unwrap_or_else(Instant::now);
                tokio::time::sleep_until(started + grace).await;
            } => {
                tracing::warn!(grace = ?grace, "in-flight calls did not finish within the grace period");
                Ok(())
            }
        };

        // Whatever is left shares what remains of the grace period.
        let deadline = drain_started.get().copied().unwrap_or_else(Instant::now) + grace;
        background.stop_by(deadline).await;
        tracing::info!("stopped");
        result
    }
}

/// Reads the listeners' TLS files; a file that cannot be used names its setting.
fn load_tls(files: &ListenerTlsFiles) -> Result<ServerTls, ConfigError> {
    ServerTls::load(ServerTlsFiles {
        cert: files.cert.clone(),
        key: files.key.clone(),
        client_ca: files.client_ca.clone(),
    })
    .map_err(|e| {
        let setting = match &e {
            TlsError::Read { path, .. } | TlsError::Pem { path, .. }
                if files
                    .client_ca
                    .as_ref()
                    .is_some_and(|ca| ca.display().to_string() == *path) =>
            {
                ENV_TLS_CLIENT_CA
            }
            TlsError::Read { path, .. } | TlsError::Pem { path, .. }
                if files.key.display().to_string() == *path =>
            {
                ENV_TLS_KEY
            }
            _ => ENV_TLS_CERT,
        };
        ConfigError::Unusable {
            setting,
            problem: e.to_string(),
        }
    })
}

/// Binds both listeners, naming the setting when an address is unusable.
pub async fn bind(config: &Config) -> anyhow::Result<(TcpListener, TcpListener)> {
    let grpc = TcpListener::bind(config.grpc_addr)
        .await
        .with_context(|| format!("cannot listen on {ENV_GRPC_ADDR} {}", config.grpc_addr))?;
    let http = TcpListener::bind(config.http_addr)
        .await
        .with_context(|| format!("cannot listen on {ENV_HTTP_ADDR} {}", config.http_addr))?;
    Ok((grpc, http))
}
