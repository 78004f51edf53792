//! The one module that talks to PostgreSQL: the pool, the diesel schema and row types, and the
//! queries. Row types never leave this module; callers get domain types.
//!
//! Error types: queries return [`StoreError`], which already classifies outages (pool timeouts,
//! lost connections) apart from query failures, so callers can answer UNAVAILABLE without looking at
//! diesel errors.

mod backfill;
pub mod migrate;
mod models;
mod outbox;
mod pending;
mod schema;
mod users;

use std::time::Duration;

use diesel::result::{DatabaseErrorKind, Error as DieselError};
use diesel_async::pooled_connection::deadpool::{Object, Pool, PoolError};
use diesel_async::pooled_connection::{
    AsyncDieselConnectionManager, ManagerConfig, RecyclingMethod,
};
use diesel_async::{AsyncConnection, AsyncPgConnection, SimpleAsyncConnection};
use futures_util::FutureExt;
use secrecy::{ExposeSecret, SecretString};

pub use backfill::{BackfillCounts, BackfillRun, RunProgress};
pub use outbox::{OutboxKind, OutboxRow};
pub use users::{LinkConflict, LinkFacts, LinkResult};

/// Pool sizing and timeouts.
#[derive(Debug, Clone)]
pub struct PoolOptions {
    /// Most connections open at once.
    pub max_size: usize,
    /// How long a request waits for a free connection before the store reports itself unavailable.
    pub wait_timeout: Duration,
    /// Server-side bound on any one statement.
    pub statement_timeout: Duration,
}

impl Default for PoolOptions {
    fn default() -> Self {
        Self {
            max_size: 16,
            wait_timeout: Duration::from_secs(3),
            statement_timeout: Duration::from_secs(5),
        }
    }
}

/// Errors from the store. Cheap to clone, so one failed load can answer every caller waiting on it.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    /// The database cannot be reached or is overloaded: retrying later can help.
    #[error("database unavailable: {0}")]
    Unavailable(String),
    /// A query failed for another reason (a bug, or a schema out of step with the code).
    #[error("database query failed: {0}")]
    Query(String),
}

impl StoreError {
    fn classify(error: DieselError) -> Self {
        if let DieselError::DatabaseError(DatabaseErrorKind::ClosedConnection, info) = &error {
            return Self::Unavailable(info.message().to_owned());
        }
        // diesel-async reports a dropped connection in several shapes; the message is what they share.
        let message = error.to_string();
        if is_transient_message(&message) {
            Self::Unavailable(message)
        } else {
            Self::Query(message)
        }
    }
}

/// Messages PostgreSQL and tokio-postgres give for conditions that pass (restarts, timeouts,
/// connection loss); everything else is treated as a bug and logged in full.
fn is_transient_message(message: &str) -> bool {
    let m = message.to_ascii_lowercase();
    [
        "canceling statement due to statement timeout",
        "terminating connection",
        "the database system is",
        "connection closed",
        "connection reset",
        "could not serialize",
        "deadlock detected",
        "too many clients",
    ]
    .iter()
    .any(|needle| m.contains(needle))
}

impl From<PoolError> for StoreError {
    fn from(error: PoolError) -> Self {
        match error {
            PoolError::Timeout(_) => Self::Unavailable("timed out waiting for a connection".into()),
            PoolError::Closed => Self::Unavailable("the pool is closed".into()),
            PoolError::Backend(e) => Self::Unavailable(format!("cannot connect: {e}")),
            other => Self::Unavailable(other.to_string()),
        }
    }
}

/// The user store: a pool of PostgreSQL connections.
#[derive(Clone)]
pub struct Store {
    pool: Pool<AsyncPgConnection>,
}

impl Store {
    /// Builds the pool. Connections are opened lazily; call [`Store::ping`] to check the database.
    pub fn new(database_url: &SecretString, options: &PoolOptions) -> Result<Self, StoreError> {
        let statement_timeout_ms = options.statement_timeout.as_millis();
        let mut config = ManagerConfig::<AsyncPgConnection>::default();
        // The connection's health shows on first use; a test query on every checkout would add a
        // round trip to every request.
        config.recycling_method = RecyclingMethod::Fast;
        config.custom_setup = Box::new(move |url| {
            async move {
                let mut conn = AsyncPgConnection::establish(url).await?;
                conn.batch_execute(&format!(
                    "SET application_name = 'idmap'; SET statement_timeout = {statement_timeout_ms}"
                ))
                .await
                .map_err(|e| diesel::ConnectionError::BadConnection(e.to_string()))?;
                Ok(conn)
            }
            .boxed()
        });
        let manager = AsyncDieselConnectionManager::<AsyncPgConnection>::new_with_config(
            database_url.expose_secret(),
            config,
        );
        let pool = Pool::builder(manager)
            .max_size(options.max_size)
            .wait_timeout(Some(options.wait_timeout))
            .create_timeout(Some(options.wait_timeout))
            .runtime(deadpool::Runtime::Tokio1)
            .build()
            .map_err(|e| StoreError::Unavailable(format!("cannot build the pool: {e}")))?;
        Ok(Self { pool })
    }

    /// Checks that a connection can be opened and used.
    pub async fn ping(&self) -> Result<(), StoreError> {
        let mut conn = self.conn().await?;
        conn.batch_execute("SELECT 1")
            .await
            .map_err(StoreError::classify)
    }

    async fn conn(&self) -> Result<Object<AsyncPgConnection>, StoreError> {
        Ok(self.pool.get().await?)
    }
}

impl Store {
    /// Sends a NOTIFY on `channel`; listeners get it once this returns.
    pub async fn notify(&self, channel: &str, payload: &str) -> Result<(), StoreError> {
        use diesel::sql_types::Text;
        use diesel_async::RunQueryDsl;
        let mut conn = self.conn().await?;
        diesel::sql_query("SELECT pg_notify($1, $2)")
            .bind::<Text, _>(channel)
            .bind::<Text, _>(payload)
            .execute(&mut conn)
            .await
            .map(|_| ())
            .map_err(StoreError::classify)
    }
}
