//! Migrations are embedded in the binary and applied by `idmap migrate`, an explicit step: `serve`
//! refuses to start on a schema that is behind instead of changing it behind the operator's back.

use diesel::migration::MigrationSource;
use diesel::pg::Pg;
use diesel_async::AsyncPgConnection;
use diesel_async::async_connection_wrapper::AsyncConnectionWrapper;
use diesel_migrations::{EmbeddedMigrations, MigrationHarness, embed_migrations};

use super::Database;

pub const MIGRATIONS: EmbeddedMigrations = embed_migrations!("migrations");

type SyncConn = AsyncConnectionWrapper<AsyncPgConnection>;

/// Applies pending migrations; returns the versions applied.
pub async fn run_pending(database: &Database) -> anyhow::Result<Vec<String>> {
    let conn = establish(database).await?;
    // diesel's migration harness is synchronous; run it where blocking is allowed.
    tokio::task::spawn_blocking(move || -> anyhow::Result<Vec<String>> {
        let mut conn = SyncConn::from(conn);
        let applied = conn
            .run_pending_migrations(MIGRATIONS)
            .map_err(|e| anyhow::anyhow!("applying migrations failed: {e}"))?;
        Ok(applied.iter().map(ToString::to_string).collect())
    })
    .await?
}

/// Migrations embedded in this binary that the database has not applied.
pub async fn pending(database: &Database) -> anyhow::Result<Vec<String>> {
    let conn = establish(database).await?;
    tokio::task::spawn_blocking(move || -> anyhow::Result<Vec<String>> {
        let mut conn = SyncConn::from(conn);
        let pending = conn
            .pending_migrations(MIGRATIONS)
            .map_err(|e| anyhow::anyhow!("reading applied migrations failed: {e}"))?;
        Ok(pending.iter().map(|m| m.name().to_string()).collect())
    })
    .await?
}

/// Names of every embedded migration, oldest first.
pub fn embedded() -> anyhow::Result<Vec<String>> {
    let migrations = MigrationSource::<Pg>::migrations(&MIGRATIONS)
        .map_err(|e| anyhow::anyhow!("reading embedded migrations failed: {e}"))?;
    Ok(migrations.iter().map(|m| m.name().to_string()).collect())
}

async fn establish(database: &Database) -> anyhow::Result<AsyncPgConnection> {
    database
        .connect_diesel()
        .await
        .map_err(|e| anyhow::anyhow!("cannot connect to the database: {e}"))
}
