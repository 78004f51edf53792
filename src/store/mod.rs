//! The one module that talks to PostgreSQL: the pool, the diesel schema and row types, and the
//! queries. Row types never leave this module; callers get domain types.
//!
//! Error types: queries return [`StoreError`], which already classifies outages (pool timeouts,
//! lost connections) apart from query failures, so callers can answer UNAVAILABLE without looking at
//! diesel errors.

mod backfill_runs;
mod connect;
mod external_ids;
mod listen;
pub mod migrate;
mod models;
mod ory_outbox;
mod pending_users;
mod schema;
mod session_cache;
mod users;

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, PoisonError, RwLock};

use diesel::result::{DatabaseErrorKind, Error as DieselError, QueryResult};
use diesel_async::pooled_connection::deadpool::{Hook, HookError, Object, Pool, PoolError};
use diesel_async::pooled_connection::{
    AsyncDieselConnectionManager, ManagerConfig, RecyclingMethod,
};
use diesel_async::{AsyncPgConnection, SimpleAsyncConnection};
use futures_util::FutureExt;

pub use crate::config::PoolOptions;

pub use backfill_runs::{BackfillCounts, BackfillRun, RunProgress};
pub use connect::{Database, DatabaseUrlError, SslMode};
pub use external_ids::{ChangeResult, IdChange};
pub use listen::Notifications;
pub use ory_outbox::{OutboxKind, OutboxRow};
pub use session_cache::{SharedLookup, SharedSession, SharedTarget};
pub use users::{LinkFacts, LinkResult};

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
    /// Sorts a query's failure by what PostgreSQL said (its SQLSTATE, as diesel-async maps it to
    /// [`DatabaseErrorKind`]) or by the connection failing under it.
    fn classify(error: DieselError) -> Self {
        let message = error.to_string();
        match &error {
            // No SQLSTATE at all: the connection failed (closed, reset, timed out) under the query.
            DieselError::DatabaseError(
                DatabaseErrorKind::ClosedConnection | DatabaseErrorKind::UnableToSendCommand,
                _,
            ) => Self::Unavailable(message),
            // 40001: retrying helps.
            DieselError::DatabaseError(DatabaseErrorKind::SerializationFailure, _) => {
                Self::Unavailable(message)
            }
            // 25006 from a primary demoted to a replica: retrying elsewhere helps, so the
            // connections to it are dropped ([`demotion`]) and new ones find the new primary.
            DieselError::DatabaseError(DatabaseErrorKind::ReadOnlyTransaction, _) => {
                demotion::record();
                Self::Unavailable(message)
            }
            DieselError::DatabaseError(DatabaseErrorKind::Unknown, info)
                if transient_sqlstate_message(info.message()) =>
            {
                Self::Unavailable(message)
            }
            _ => Self::Query(message),
        }
    }

    /// Sorts a failure of the dedicated LISTEN connection, which tokio-postgres reports with its
    /// SQLSTATE.
    fn from_postgres(error: tokio_postgres::Error) -> Self {
        match error.code() {
            None => Self::Unavailable(error.to_string()),
            Some(code) if is_transient_sqlstate(code) => Self::Unavailable(error.to_string()),
            Some(_) => Self::Query(error.to_string()),
        }
    }
}

/// Read-only errors (25006: the server was a primary and is now a replica, after a failover) mean
/// that every connection opened until then may lead to the demoted server, while one opened now
/// resolves the primary's address again. Recorded process-wide because `classify` runs where no
/// store is at hand (inside transactions); a store in the same process that did not meet the error
/// only reconnects once.
mod demotion {
    use std::sync::LazyLock;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::time::Instant;

    static EPOCH: LazyLock<Instant> = LazyLock::new(Instant::now);
    /// When the last read-only error was seen, in nanoseconds after [`EPOCH`]; 0 for never.
    static LAST: AtomicU64 = AtomicU64::new(0);

    /// Fixes the epoch before any connection is opened, so none predates it.
    pub(super) fn init() {
        LazyLock::force(&EPOCH);
    }

    pub(super) fn record() {
        let nanos = u64::try_from(EPOCH.elapsed().as_nanos()).unwrap_or(u64::MAX);
        LAST.fetch_max(nanos.max(1), Ordering::Relaxed);
    }

    /// The last demotion seen, as a value that only grows (0 for none).
    pub(super) fn last() -> u64 {
        LAST.load(Ordering::Relaxed)
    }

    /// Whether a connection opened at `created` was opened before the last demotion, so it may
    /// lead to the demoted server. A pool hook asks on every checkout: one atomic load.
    pub(super) fn predates(created: Instant) -> bool {
        match LAST.load(Ordering::Relaxed) {
            0 => false,
            nanos => created.saturating_duration_since(*EPOCH).as_nanos() <= u128::from(nanos),
        }
    }
}

/// SQLSTATEs of conditions that pass: connection exceptions (08), insufficient resources (53),
/// operator intervention such as a restart or a statement timeout (57), transaction rollbacks
/// (40: serialization failures, deadlocks), and a read-only transaction (25006) on a demoted
/// primary.
fn is_transient_sqlstate(code: &tokio_postgres::error::SqlState) -> bool {
    let code = code.code();
    ["08", "53", "57", "40"]
        .iter()
        .any(|class| code.starts_with(class))
        || code == "25006"
}

/// diesel-async maps only some SQLSTATEs to a [`DatabaseErrorKind`] and keeps the rest as
/// `Unknown` without the code (`DatabaseErrorInformation` has no accessor for it). For those
/// transient classes ([`is_transient_sqlstate`]) diesel cannot name, PostgreSQL's primary message
/// is the only trace of the code left; these are its texts for 57014, 57P01-57P03, 53300 and 40P01.
fn transient_sqlstate_message(message: &str) -> bool {
    const MESSAGES: [&str; 5] = [
        "canceling statement due to statement timeout",
        "terminating connection",
        "the database system is",
        "too many clients",
        "deadlock detected",
    ];
    MESSAGES.iter().any(|m| message.starts_with(m))
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

/// The database's side of the metrics ([`Store::figures`]).
#[derive(Debug, Clone, Copy)]
pub struct Figures {
    pub outbox_pending: i64,
    pub outbox_parked: i64,
    pub outbox_oldest_age_secs: f64,
    pub pending_users: i64,
    pub pool_in_use: usize,
    pub pool_idle: usize,
    pub pool_waiting: usize,
}

/// The user store: a pool of PostgreSQL connections, a few of them shared by lookups.
#[derive(Clone)]
pub struct Store {
    pool: Pool<AsyncPgConnection>,
    readers: Arc<Readers>,
    /// A read replica (`DATABASE_READ_URL`) for user lookups, if one is configured.
    replica: Option<Arc<Readers>>,
    database: Database,
    /// The [`demotion::last`] this store last stopped sharing its lookup connections for.
    demotions_handled: Arc<AtomicU64>,
}

type Pooled = Object<AsyncPgConnection>;

/// Connections that concurrent single-user lookups share instead of taking one each from the pool.
///
/// tokio-postgres pipelines the queries of every task using one connection: it writes whatever is
/// queued in one go and reads the answers in order, and PostgreSQL runs them back to back in one
/// backend. A lookup that holds a pooled connection of its own instead pays a round trip of task
/// wake-ups and syscalls alone, and a backend per lookup competes for the CPU (BENCHMARKS.md's cold
/// lookups compare the two). Lookups are single-row index scans, so none waits long behind
/// another; transactions and BatchGetUsers keep pooled connections of their own.
///
/// Each slot holds a connection checked out of the pool until a query on it fails for want of the
/// database; the slot is then emptied and the next lookup checks out a fresh one, while the broken
/// connection goes back to the pool, which discards it.
struct Readers {
    /// Where the shared connections come from.
    pool: Pool<AsyncPgConnection>,
    slots: Vec<RwLock<Option<Arc<Pooled>>>>,
    next: AtomicUsize,
}

impl Store {
    /// Builds the pool. Connections are opened lazily; call [`Store::ping`] to check the database.
    pub fn new(database: &Database, options: &PoolOptions) -> Result<Self, StoreError> {
        let pool = pool(database, options)?;
        Ok(Self {
            readers: Arc::new(Readers::new(pool.clone(), options)),
            pool,
            replica: None,
            database: database.clone(),
            demotions_handled: Arc::new(AtomicU64::new(demotion::last())),
        })
    }

    /// Sends single-user lookups and batches to a read replica; writes, the outbox, LISTEN and
    /// the shared session cache stay on the primary. A lookup the replica cannot answer (nothing
    /// found, or the replica unavailable) asks the primary, so a user linked a moment ago, not yet
    /// replicated, is never reported missing.
    pub fn with_replica(
        mut self,
        replica: &Database,
        options: &PoolOptions,
    ) -> Result<Self, StoreError> {
        self.replica = Some(Arc::new(Readers::new(pool(replica, options)?, options)));
        Ok(self)
    }

    /// Checks that a connection can be opened and used.
    pub async fn ping(&self) -> Result<(), StoreError> {
        let mut conn = self.conn().await?;
        conn.batch_execute("SELECT 1")
            .await
            .map_err(StoreError::classify)
    }

    async fn conn(&self) -> Result<Object<AsyncPgConnection>, StoreError> {
        self.drop_demoted();
        let started = std::time::Instant::now();
        let conn = self.pool.get().await;
        crate::metrics::get().db_pool_wait(started.elapsed());
        Ok(conn?)
    }

    /// What the metrics show of the database at a scrape: the outbox and pending users (one
    /// query), and the primary's pool.
    pub async fn figures(&self) -> Result<Figures, StoreError> {
        use diesel::sql_types::{BigInt, Double};
        use diesel_async::RunQueryDsl;
        #[derive(diesel::QueryableByName)]
        struct Row {
            #[diesel(sql_type = BigInt)]
            pending: i64,
            #[diesel(sql_type = BigInt)]
            parked: i64,
            #[diesel(sql_type = Double)]
            oldest: f64,
            #[diesel(sql_type = BigInt)]
            pending_users: i64,
        }
        let mut conn = self.conn().await?;
        let row: Row = diesel::sql_query(
            "SELECT count(*) FILTER (WHERE failed_at IS NULL) AS pending, \
                 count(*) FILTER (WHERE failed_at IS NOT NULL) AS parked, \
                 COALESCE(EXTRACT(EPOCH FROM now() - min(created_at) FILTER (WHERE failed_at IS NULL)), 0)::float8 AS oldest, \
                 (SELECT count(*) FROM pending_users) AS pending_users \
             FROM ory_outbox",
        )
        .get_result(&mut conn)
        .await
        .map_err(StoreError::classify)?;
        drop(conn);
        let pool = self.pool.status();
        Ok(Figures {
            outbox_pending: row.pending,
            outbox_parked: row.parked,
            outbox_oldest_age_secs: row.oldest.max(0.0),
            pending_users: row.pending_users,
            pool_in_use: pool.size.saturating_sub(pool.available),
            pool_idle: pool.available,
            pool_waiting: pool.waiting,
        })
    }

    /// After a read-only error, drops every idle and shared connection to the primary opened
    /// before it. The pool's hook ([`pool`]) also refuses such connections when they come back
    /// from a task that held them meanwhile; this closes the idle ones at once and stops sharing
    /// the lookup connections, which are not checked out again.
    fn drop_demoted(&self) {
        let seen = demotion::last();
        if self.demotions_handled.load(Ordering::Relaxed) == seen
            || self.demotions_handled.swap(seen, Ordering::Relaxed) == seen
        {
            return;
        }
        self.readers.clear();
        let dropped = self
            .pool
            .retain(|_, metrics| !demotion::predates(metrics.created))
            .removed
            .len();
        tracing::warn!(
            dropped,
            "the database refused a write as read-only (a demoted primary?); reconnecting"
        );
    }

    /// A shared lookup connection ([`Readers`]) to the primary, round robin.
    async fn reader(&self) -> Result<Arc<Pooled>, StoreError> {
        self.drop_demoted();
        self.readers.get().await
    }

    /// A shared lookup connection to the read replica, if one is configured.
    async fn replica_reader(&self) -> Option<Result<Arc<Pooled>, StoreError>> {
        match &self.replica {
            Some(replica) => Some(replica.get().await),
            None => None,
        }
    }

    /// A pooled connection to the read replica, if one is configured.
    async fn replica_conn(&self) -> Option<Result<Pooled, StoreError>> {
        match &self.replica {
            Some(replica) => Some(replica.pool.get().await.map_err(StoreError::from)),
            None => None,
        }
    }

    /// Runs a single-row lookup on a shared connection: on the read replica first, if one is
    /// configured, and on the primary when the replica finds nothing or fails.
    async fn lookup<T, F, Fut>(&self, query: F) -> Result<Option<T>, StoreError>
    where
        F: Fn(Arc<Pooled>) -> Fut,
        Fut: Future<Output = QueryResult<Option<T>>>,
    {
        if let Some(replica) = self.replica_reader().await {
            let found = match replica {
                Ok(conn) => {
                    let result = query(conn.clone()).await;
                    self.after_read(&conn, result)
                }
                Err(e) => Err(e),
            };
            match found {
                Ok(Some(row)) => return Ok(Some(row)),
                Ok(None) => {}
                Err(e) => tracing::debug!(error = %e, "read replica failed; asking the primary"),
            }
        }
        let conn = self.reader().await?;
        let result = query(conn.clone()).await;
        self.after_read(&conn, result)
    }

    /// Classifies a lookup's result, and stops sharing `conn` if the database failed under it.
    fn after_read<T>(&self, conn: &Arc<Pooled>, result: QueryResult<T>) -> Result<T, StoreError> {
        result.map_err(|e| {
            let error = StoreError::classify(e);
            if matches!(error, StoreError::Unavailable(_)) {
                self.readers.forget(conn);
                if let Some(replica) = &self.replica {
                    replica.forget(conn);
                }
            }
            error
        })
    }
}

/// Builds a pool of connections to `database`.
fn pool(database: &Database, options: &PoolOptions) -> Result<Pool<AsyncPgConnection>, StoreError> {
    let statement_timeout_ms = options.statement_timeout.as_millis();
    let mut config = ManagerConfig::<AsyncPgConnection>::default();
    // The connection's health shows on first use; a test query on every checkout would add a
    // round trip to every request.
    config.recycling_method = RecyclingMethod::Fast;
    let connect = database.clone();
    config.custom_setup = Box::new(move |_url| {
        let database = connect.clone();
        async move {
            let mut conn = database.connect_diesel().await.map_err(|e| {
                let (StoreError::Unavailable(why) | StoreError::Query(why)) = e;
                diesel::ConnectionError::BadConnection(why)
            })?;
            conn.batch_execute(&format!(
                "SET application_name = 'idmap'; SET statement_timeout = {statement_timeout_ms}"
            ))
            .await
            .map_err(|e| diesel::ConnectionError::BadConnection(e.to_string()))?;
            Ok(conn)
        }
        .boxed()
    });
    // The URL is not used: `custom_setup` connects with `database`.
    let manager = AsyncDieselConnectionManager::<AsyncPgConnection>::new_with_config("", config);
    demotion::init();
    Pool::builder(manager)
        .pre_recycle(Hook::sync_fn(|_, metrics| {
            if demotion::predates(metrics.created) {
                Err(HookError::message("opened before the primary was demoted"))
            } else {
                Ok(())
            }
        }))
        .max_size(options.max_size)
        .wait_timeout(Some(options.wait_timeout))
        .create_timeout(Some(options.wait_timeout))
        .runtime(deadpool::Runtime::Tokio1)
        .build()
        .map_err(|e| StoreError::Unavailable(format!("cannot build the pool: {e}")))
}

impl Readers {
    fn new(pool: Pool<AsyncPgConnection>, options: &PoolOptions) -> Self {
        Self {
            pool,
            slots: (0..options.read_connections.max(1))
                .map(|_| RwLock::new(None))
                .collect(),
            next: AtomicUsize::new(0),
        }
    }

    /// A shared connection, round robin.
    async fn get(&self) -> Result<Arc<Pooled>, StoreError> {
        let slot = &self.slots[self.next.fetch_add(1, Ordering::Relaxed) % self.slots.len()];
        if let Some(conn) = slot.read().unwrap_or_else(PoisonError::into_inner).as_ref() {
            return Ok(conn.clone());
        }
        let fresh = Arc::new(self.pool.get().await?);
        // Lookups that found the slot empty at the same time race to fill it; the first one's
        // connection stays, the others' go back to the pool when their lookup ends.
        let mut filled = slot.write().unwrap_or_else(PoisonError::into_inner);
        Ok(filled.get_or_insert(fresh).clone())
    }

    /// Stops sharing every connection.
    fn clear(&self) {
        for slot in &self.slots {
            *slot.write().unwrap_or_else(PoisonError::into_inner) = None;
        }
    }

    /// Stops sharing `conn`, which the database failed under.
    fn forget(&self, conn: &Arc<Pooled>) {
        for slot in &self.slots {
            let mut held = slot.write().unwrap_or_else(PoisonError::into_inner);
            if held.as_ref().is_some_and(|c| Arc::ptr_eq(c, conn)) {
                *held = None;
            }
        }
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
