//! A real PostgreSQL for every test, each test in its own database.
//!
//! The server is the one in DATABASE_URL when set (CI machines and developers have one on
//! 127.0.0.1:5432), else a private cluster this process starts from the installed server binaries
//! (the same code `idmap dev` uses). Migrations run once, into a template database; each test then
//! gets `CREATE DATABASE .. TEMPLATE`, which copies files instead of replaying migrations, and drops
//! it when the test ends. Databases left behind by killed runs are swept at start-up.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicUsize, Ordering};

use diesel::sql_types::{Text, Uuid as SqlUuid};
use diesel_async::{AsyncConnection, AsyncPgConnection, RunQueryDsl, SimpleAsyncConnection};
use embedded_pg::EmbeddedPg;
use secrecy::SecretString;
use url::Url;
use uuid::Uuid;

const PREFIX: &str = "idmap_t_";

struct Server {
    /// URL of a maintenance database on the server (used for CREATE/DROP DATABASE).
    admin_url: String,
    template: String,
    _cluster: Option<EmbeddedPg>,
}

static SERVER: OnceLock<Server> = OnceLock::new();
static COUNTER: AtomicUsize = AtomicUsize::new(0);

/// Runs async set-up work on a runtime of its own: test runtimes come and go, and the shared
/// server outlives all of them.
fn block_on<F: Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
        .block_on(f)
}

fn with_database(url: &str, database: &str) -> String {
    let mut url = Url::parse(url).expect("database URL");
    url.set_path(&format!("/{database}"));
    url.to_string()
}

fn server() -> &'static Server {
    SERVER.get_or_init(|| {
        std::thread::spawn(|| {
            let (admin_url, cluster) = match std::env::var("DATABASE_URL") {
                Ok(url) if !url.is_empty() => (url, None),
                _ => {
                    let cluster = EmbeddedPg::start().expect("start a private PostgreSQL");
                    (cluster.url(), Some(cluster))
                }
            };
            let pid = std::process::id();
            let template = format!("{PREFIX}{pid}_template");
            block_on(async {
                let mut conn = AsyncPgConnection::establish(&admin_url)
                    .await
                    .expect("connect to the test PostgreSQL");
                sweep_leftovers(&mut conn).await;
                conn.batch_execute(&format!("DROP DATABASE IF EXISTS {template}"))
                    .await
                    .expect("drop old template");
                conn.batch_execute(&format!("CREATE DATABASE {template}"))
                    .await
                    .expect("create template");
                let url = SecretString::from(with_database(&admin_url, &template));
                idmap::store::migrate::run_pending(
                    &idmap::store::Database::new(&url).expect("database URL"),
                )
                .await
                .expect("migrate the template");
            });
            Server {
                admin_url,
                template,
                _cluster: cluster,
            }
        })
        .join()
        .expect("test database set-up panicked")
    })
}

/// Drops test databases of processes that no longer run (a killed `cargo test` leaves them).
async fn sweep_leftovers(conn: &mut AsyncPgConnection) {
    use diesel::prelude::*;
    use diesel_async::RunQueryDsl;

    #[derive(QueryableByName)]
    struct Name {
        #[diesel(sql_type = Text)]
        datname: String,
    }
    let names: Vec<Name> = diesel::sql_query(format!(
        "SELECT datname FROM pg_database WHERE datname LIKE '{PREFIX}%'"
    ))
    .load(conn)
    .await
    .unwrap_or_default();
    for Name { datname } in names {
        let pid = datname
            .trim_start_matches(PREFIX)
            .split('_')
            .next()
            .and_then(|p| p.parse::<u32>().ok());
        let alive = pid.is_some_and(|p| std::path::Path::new(&format!("/proc/{p}")).exists());
        if !alive {
            let _ = conn
                .batch_execute(&format!("DROP DATABASE IF EXISTS {datname} WITH (FORCE)"))
                .await;
        }
    }
}

/// A database of the test's own, dropped when the value is.
pub struct TestDb {
    name: String,
    url: String,
}

impl TestDb {
    pub async fn new() -> TestDb {
        let server = tokio::task::spawn_blocking(server).await.expect("set-up");
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let name = format!("{PREFIX}{}_{n}", std::process::id());
        let mut conn = AsyncPgConnection::establish(&server.admin_url)
            .await
            .expect("connect");
        conn.batch_execute(&format!(
            "CREATE DATABASE {name} TEMPLATE {}",
            server.template
        ))
        .await
        .expect("create the test database");
        TestDb {
            url: with_database(&server.admin_url, &name),
            name,
        }
    }

    pub fn url(&self) -> SecretString {
        SecretString::from(self.url.clone())
    }

    /// A direct connection, for asserting on what is stored.
    pub async fn conn(&self) -> AsyncPgConnection {
        AsyncPgConnection::establish(&self.url)
            .await
            .expect("connect to the test database")
    }

    /// Runs SQL statements (no results), for setting up or breaking what a test needs.
    pub async fn run_sql(&self, sql: &str) {
        self.conn().await.batch_execute(sql).await.unwrap();
    }

    /// (identity id, user id) of every user.
    pub async fn links(&self) -> Vec<(Uuid, Uuid)> {
        #[derive(diesel::QueryableByName)]
        struct Link {
            #[diesel(sql_type = SqlUuid)]
            ory_identity_id: Uuid,
            #[diesel(sql_type = SqlUuid)]
            id: Uuid,
        }
        let rows: Vec<Link> = diesel::sql_query("SELECT ory_identity_id, id FROM users")
            .load(&mut self.conn().await)
            .await
            .unwrap();
        rows.into_iter()
            .map(|l| (l.ory_identity_id, l.id))
            .collect()
    }

    /// The user id linked to `identity`; panics if there is none.
    pub async fn user_of(&self, identity: Uuid) -> Uuid {
        self.links()
            .await
            .into_iter()
            .find(|(i, _)| *i == identity)
            .map(|(_, u)| u)
            .unwrap_or_else(|| panic!("identity {identity} has no user"))
    }

    /// The stored `state` of `identity`'s user.
    pub async fn user_state(&self, identity: Uuid) -> String {
        #[derive(diesel::QueryableByName)]
        struct State {
            #[diesel(sql_type = Text)]
            state: String,
        }
        let row: State = diesel::sql_query("SELECT state FROM users WHERE ory_identity_id = $1")
            .bind::<SqlUuid, _>(identity)
            .get_result(&mut self.conn().await)
            .await
            .unwrap();
        row.state
    }

    /// Runs a `SELECT count(*) ...` and returns the count.
    pub async fn count(&self, sql: &str) -> i64 {
        use diesel::prelude::*;
        use diesel_async::RunQueryDsl;
        #[derive(QueryableByName)]
        struct Count {
            #[diesel(sql_type = diesel::sql_types::BigInt)]
            n: i64,
        }
        let mut conn = self.conn().await;
        let row: Count = diesel::sql_query(format!("SELECT ({sql}) AS n"))
            .get_result(&mut conn)
            .await
            .expect("count query");
        row.n
    }
}

/// A statement trigger that announces every change to `ory_outbox` on a channel, so tests can wait
/// for the outbox worker's effects instead of polling for them.
const OUTBOX_CHANGES: &str = "
    CREATE OR REPLACE FUNCTION idmap_test_outbox_changed() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN PERFORM pg_notify('idmap_test_outbox', ''); RETURN NULL; END $$;
    CREATE OR REPLACE TRIGGER idmap_test_outbox_changed
        AFTER INSERT OR UPDATE OR DELETE ON ory_outbox
        FOR EACH STATEMENT EXECUTE FUNCTION idmap_test_outbox_changed();
    LISTEN idmap_test_outbox;
";

impl TestDb {
    /// Waits until the count query `sql` returns `want`, checking again after every committed
    /// change to `ory_outbox` (PostgreSQL delivers a NOTIFY when its transaction commits, so each
    /// check sees what changed). Panics after [`super::PATIENCE`].
    pub async fn wait_for_outbox(&self, sql: &str, want: i64) {
        use futures::StreamExt;
        let (client, mut connection) = tokio_postgres::connect(&self.url, tokio_postgres::NoTls)
            .await
            .expect("connect to the test database");
        let (changed, mut changes) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            let mut messages = futures::stream::poll_fn(move |cx| connection.poll_message(cx));
            while let Some(Ok(message)) = messages.next().await {
                if let tokio_postgres::AsyncMessage::Notification(_) = message {
                    let _ = changed.send(());
                }
            }
        });
        // Listening before the first check means no change can slip between check and wait.
        client
            .batch_execute(OUTBOX_CHANGES)
            .await
            .expect("install the outbox trigger");
        let deadline = tokio::time::Instant::now() + super::PATIENCE;
        loop {
            let row = client
                .query_one(&format!("SELECT ({sql})::bigint"), &[])
                .await
                .expect("count query");
            let n: i64 = row.get(0);
            if n == want {
                return;
            }
            match tokio::time::timeout_at(deadline, changes.recv()).await {
                Ok(Some(())) => {}
                _ => panic!("`{sql}` stayed {n}, never {want}"),
            }
        }
    }
}

/// A transaction left open on a connection of its own, standing for another replica's write that
/// has not committed yet.
pub struct OpenTransaction {
    client: tokio_postgres::Client,
}

impl OpenTransaction {
    pub async fn commit(self) {
        self.client
            .batch_execute("COMMIT")
            .await
            .expect("commit the open transaction");
    }
}

impl TestDb {
    async fn client(&self) -> tokio_postgres::Client {
        let (client, connection) = tokio_postgres::connect(&self.url, tokio_postgres::NoTls)
            .await
            .expect("connect to the test database");
        tokio::spawn(connection);
        client
    }

    /// Runs `sql` in a transaction that stays open until [`OpenTransaction::commit`].
    pub async fn begin(&self, sql: &str) -> OpenTransaction {
        let client = self.client().await;
        client
            .batch_execute(&format!("BEGIN; {sql}"))
            .await
            .expect("start the open transaction");
        OpenTransaction { client }
    }

    /// Returns once some session of this database waits for a lock (a row or a unique key that an
    /// [`OpenTransaction`] holds). PostgreSQL announces no such event, so this asks
    /// `pg_locks` again and again (no sleeps: each question is a round trip), for at most
    /// [`super::PATIENCE`].
    pub async fn wait_for_lock_waiter(&self) {
        let client = self.client().await;
        let deadline = tokio::time::Instant::now() + super::PATIENCE;
        loop {
            let row = client
                .query_one(
                    "SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid \
                     WHERE NOT l.granted AND a.datname = current_database()",
                    &[],
                )
                .await
                .expect("read pg_locks");
            if row.get::<_, i64>(0) > 0 {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "nothing ever waited for a lock"
            );
            tokio::task::yield_now().await;
        }
    }

    /// Makes the database refuse new connections and ends every connection to it, as a database
    /// restart or failover does; [`Outage::end`] lets connections in again.
    pub async fn outage(&self) -> Outage {
        let server = server();
        let (client, connection) =
            tokio_postgres::connect(&server.admin_url, tokio_postgres::NoTls)
                .await
                .expect("connect to the test PostgreSQL");
        tokio::spawn(connection);
        // Two statements, not one batch: a batch is one transaction, and connections made before
        // it commits would get in.
        client
            .batch_execute(&format!(
                "ALTER DATABASE {} ALLOW_CONNECTIONS false",
                self.name
            ))
            .await
            .expect("refuse new connections");
        // With a timeout, pg_terminate_backend returns once the backend is gone.
        client
            .batch_execute(&format!(
                "SELECT pg_terminate_backend(pid, 5000) FROM pg_stat_activity WHERE datname = '{}'",
                self.name
            ))
            .await
            .expect("end the open connections");
        Outage {
            client,
            name: self.name.clone(),
        }
    }
}

/// A database that refuses connections (see [`TestDb::outage`]).
pub struct Outage {
    client: tokio_postgres::Client,
    name: String,
}

impl Outage {
    pub async fn end(self) {
        self.client
            .batch_execute(&format!(
                "ALTER DATABASE {} ALLOW_CONNECTIONS true",
                self.name
            ))
            .await
            .expect("let connections in again");
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let Some(server) = SERVER.get() else { return };
        let admin = server.admin_url.clone();
        let name = self.name.clone();
        // Drop runs inside a test's runtime, which may not block; a thread of its own may.
        let _ = std::thread::spawn(move || {
            block_on(async move {
                if let Ok(mut conn) = AsyncPgConnection::establish(&admin).await {
                    let _ = conn
                        .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                        .await;
                }
            })
        })
        .join();
    }
}
