//! The command line: `idmap serve`, `idmap migrate`, `idmap dev`, `idmap backfill`,
//! `idmap reconcile`.

use anyhow::Context;
use clap::{Parser, Subcommand};
use tokio::net::TcpListener;

use crate::config::{Config, DatabaseArgs, ServeArgs};
use crate::store::migrate;
use crate::telemetry::LogFormat;

#[derive(Debug, Parser)]
#[command(
    name = "idmap",
    version,
    about = "Maps Ory identities to internal user records over gRPC"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
    /// Log line format.
    #[arg(
        long,
        global = true,
        env = "IDMAP_LOG_FORMAT",
        value_name = "IDMAP_LOG_FORMAT",
        default_value = "text"
    )]
    pub log_format: LogFormat,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve the gRPC API (and HTTP health endpoints) against PostgreSQL and Ory.
    Serve(Box<ServeArgs>),
    /// Apply pending database migrations and exit.
    Migrate(DatabaseArgs),
    /// Run everything locally: a private PostgreSQL (unless DATABASE_URL is set), a Kratos emulator
    /// seeded with demo identities and sessions, and the server.
    #[cfg(feature = "dev")]
    Dev(Box<crate::dev::DevArgs>),
    /// Link every Ory identity that has no user yet (resumable; see README "Backfill").
    Backfill(Box<crate::backfill::BackfillArgs>),
    /// Find (and with --fix repair) drift between users and Ory identities.
    Reconcile(Box<crate::backfill::ReconcileArgs>),
}

/// A setting that is wrong; the process exits with 64 (EX_USAGE).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(pub String);

pub async fn serve(args: Box<ServeArgs>) -> anyhow::Result<()> {
    let config = Config::from_serve_args(*args).map_err(ConfigError)?;
    let app = crate::App::build(config).await?;
    let (grpc, http) = bind(app.config()).await?;
    app.serve(grpc, http, crate::shutdown::signal()).await
}

pub async fn migrate(args: DatabaseArgs) -> anyhow::Result<()> {
    let applied = migrate::run_pending(&args.database_url).await?;
    if applied.is_empty() {
        tracing::info!("the database is up to date");
    } else {
        tracing::info!(applied = ?applied, "migrations applied");
    }
    Ok(())
}

/// Binds both listeners, naming the setting when an address is unusable.
pub async fn bind(config: &Config) -> anyhow::Result<(TcpListener, TcpListener)> {
    let grpc = TcpListener::bind(config.grpc_addr)
        .await
        .with_context(|| format!("cannot listen on IDMAP_GRPC_ADDR {}", config.grpc_addr))?;
    let http = TcpListener::bind(config.http_addr)
        .await
        .with_context(|| format!("cannot listen on IDMAP_HTTP_ADDR {}", config.http_addr))?;
    Ok((grpc, http))
}
