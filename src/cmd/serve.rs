//! `idmap serve` and `idmap migrate`.

use crate::auth::CallerPolicy;
use crate::config::{Config, DatabaseArgs, ServeArgs};
use anyhow::Context;

use crate::config::ENV_DATABASE_URL;
use crate::store::{Database, migrate};

pub async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let config = Config::from_serve_args(args)?;
    // Before anything else, so a missing decision or a bad callers file costs no connection.
    let policy = CallerPolicy::from_settings(&config.callers)?;
    let app = crate::App::build(config).await?;
    let (grpc, http) = crate::app::bind(app.config()).await?;
    app.serve_as(policy, grpc, http, crate::shutdown::signal())
        .await
}

pub async fn migrate(args: DatabaseArgs) -> anyhow::Result<()> {
    let database = Database::new(&args.database_url)
        .with_context(|| format!("{ENV_DATABASE_URL} is not usable"))?;
    let applied = migrate::run_pending(&database).await?;
    if applied.is_empty() {
        tracing::info!("the database is up to date");
    } else {
        tracing::info!(applied = ?applied, "migrations applied");
    }
    Ok(())
}
