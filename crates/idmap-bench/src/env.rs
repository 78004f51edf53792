//! What the benchmark runs against: a PostgreSQL database of its own (a private cluster, or a fresh
//! database on the server in DATABASE_URL, dropped afterwards), bulk-seeded users, and idmap servers
//! started in this process on 127.0.0.1:0 with the generated client connected over TCP.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use embedded_pg::EmbeddedPg;
use kratos_emulator::{Emulator, NewIdentity};
use secrecy::{ExposeSecret, SecretString};
use serde_json::json;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::transport::{Channel, Endpoint};
use uuid::Uuid;

use idmap::config::Config;
use idmap::store::migrate;

/// Seeded user `i`'s Ory identity id: `b0000000-0000-4000-8000-<i as 12 hex digits>`, so SQL
/// (`generate_series`) and the client compute the same ids without exchanging them.
pub fn seeded_identity(i: u64) -> Uuid {
    Uuid::from_u128(0xb000_0000_0000_4000_8000_0000_0000_0000 | u128::from(i))
}

/// Seeded user `i`'s external id (in the default namespace).
pub fn seeded_external_id(i: u64) -> String {
    format!("bench-{i}")
}

/// The second namespace every seeded user holds a business id in, besides the default one.
pub const SEEDED_NAMESPACE: &str = "crm";

/// Seeded user `i`'s business id in [`SEEDED_NAMESPACE`].
pub fn seeded_namespaced_id(i: u64) -> String {
    format!("crm-{i}")
}

/// Rows per seeding statement: large enough to be fast, small enough to show progress.
const SEED_CHUNK: u64 = 250_000;

/// The database the benchmark seeds (and, in process, the server uses).
pub struct Database {
    pub url: SecretString,
    /// A database this run created on someone else's server: (maintenance URL, name) to drop it.
    created: Option<(String, String)>,
    /// Shared so that a scenario can halt and resume it from a blocking task.
    cluster: Option<Arc<EmbeddedPg>>,
}

impl Database {
    /// A migrated database of this run's own: a private cluster, or a new database on `server`.
    pub async fn start(server: Option<&SecretString>) -> anyhow::Result<Self> {
        let db = match server {
            None => {
                let cluster = tokio::task::spawn_blocking(EmbeddedPg::start)
                    .await?
                    .context(
                        "cannot start a private PostgreSQL (set DATABASE_URL to use another)",
                    )?;
                Self {
                    url: SecretString::from(cluster.url()),
                    created: None,
                    cluster: Some(Arc::new(cluster)),
                }
            }
            Some(url) => {
                let admin = url.expose_secret().to_owned();
                let name = format!(
                    "idmap_bench_{}_{}",
                    std::process::id(),
                    rand::random::<u32>()
                );
                let client = connect(&admin).await?;
                client
                    .batch_execute(&format!("CREATE DATABASE {name}"))
                    .await
                    .context("cannot create the benchmark database in DATABASE_URL")?;
                let mut parsed = url::Url::parse(&admin).context("DATABASE_URL")?;
                parsed.set_path(&format!("/{name}"));
                Self {
                    url: SecretString::from(parsed.to_string()),
                    created: Some((admin, name)),
                    cluster: None,
                }
            }
        };
        migrate::run_pending(&idmap::store::Database::new(&db.url)?).await?;
        Ok(db)
    }

    /// Another migrated database on the same PostgreSQL server, dropped by [`Database::close`].
    pub async fn sibling(&self) -> anyhow::Result<Self> {
        let name = format!(
            "idmap_bench_{}_{}",
            std::process::id(),
            rand::random::<u32>()
        );
        let here = self.url.expose_secret().to_owned();
        connect(&here)
            .await?
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .context("cannot create a second benchmark database")?;
        let mut parsed = url::Url::parse(&here).context("the benchmark database's URL")?;
        parsed.set_path(&format!("/{name}"));
        let db = Self {
            url: SecretString::from(parsed.to_string()),
            created: Some((here, name)),
            cluster: None,
        };
        migrate::run_pending(&idmap::store::Database::new(&db.url)?).await?;
        Ok(db)
    }

    /// An existing database (the one an external `--target` serves from); nothing is dropped.
    pub fn existing(url: SecretString) -> Self {
        Self {
            url,
            created: None,
            cluster: None,
        }
    }

    /// The private cluster this run started, when it started one (not with DATABASE_URL).
    pub fn cluster(&self) -> Option<Arc<EmbeddedPg>> {
        self.cluster.clone()
    }

    pub async fn client(&self) -> anyhow::Result<tokio_postgres::Client> {
        connect(self.url.expose_secret()).await
    }

    /// Drops a database this run created; a private cluster stops when dropped.
    pub async fn close(self) -> anyhow::Result<()> {
        if let Some((admin, name)) = &self.created {
            let client = connect(admin).await?;
            client
                .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                .await
                .with_context(|| format!("cannot drop the benchmark database {name}"))?;
        }
        Ok(())
    }
}

async fn connect(url: &str) -> anyhow::Result<tokio_postgres::Client> {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .context("cannot connect to PostgreSQL")?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::warn!(error = %e, "benchmark database connection ended");
        }
    });
    Ok(client)
}

/// Inserts seeded users `from..=to` (identity [`seeded_identity`], external id
/// [`seeded_external_id`] in the default namespace and [`seeded_namespaced_id`] in
/// [`SEEDED_NAMESPACE`], so each user holds two business ids) straight into `users` and
/// `user_external_ids` with `generate_series`, skipping ones that exist, then refreshes the
/// planner's statistics.
pub async fn seed_users(pg: &tokio_postgres::Client, from: u64, to: u64) -> anyhow::Result<()> {
    let mut start = from;
    while start <= to {
        let end = (start + SEED_CHUNK - 1).min(to);
        let (a, b) = (start as i64, end as i64);
        pg.execute(
            "INSERT INTO users (id, ory_identity_id, schema_id) \
             SELECT ('b1000000-0000-4000-8000-' || lpad(to_hex(i), 12, '0'))::uuid, \
                    ('b0000000-0000-4000-8000-' || lpad(to_hex(i), 12, '0'))::uuid, \
                    'customer' \
             FROM generate_series($1::bigint, $2::bigint) AS i \
             ON CONFLICT DO NOTHING",
            &[&a, &b],
        )
        .await
        .context("seeding users")?;
        pg.execute(
            "INSERT INTO user_external_ids (external_id, user_id) \
             SELECT 'bench-' || i, ('b1000000-0000-4000-8000-' || lpad(to_hex(i), 12, '0'))::uuid \
             FROM generate_series($1::bigint, $2::bigint) AS i \
             ON CONFLICT DO NOTHING",
            &[&a, &b],
        )
        .await
        .context("seeding external ids")?;
        pg.execute(
            "INSERT INTO user_external_ids (namespace, external_id, user_id) \
             SELECT $3::text, 'crm-' || i, ('b1000000-0000-4000-8000-' || lpad(to_hex(i), 12, '0'))::uuid \
             FROM generate_series($1::bigint, $2::bigint) AS i \
             ON CONFLICT DO NOTHING",
            &[&a, &b, &SEEDED_NAMESPACE],
        )
        .await
        .context("seeding external ids in the second namespace")?;
        start = end + 1;
    }
    pg.batch_execute("ANALYZE users; ANALYZE user_external_ids")
        .await
        .context("ANALYZE after seeding")?;
    Ok(())
}

/// Creates `n` identities in the emulator and links each to a user directly in the database (as
/// if linked long ago, so no outbox write follows), with `metadata_public.id` already set in Ory.
pub async fn linked_identities(
    emulator: &Emulator,
    pg: &tokio_postgres::Client,
    n: usize,
) -> anyhow::Result<Vec<Uuid>> {
    let mut identities = Vec::with_capacity(n);
    let mut users = Vec::with_capacity(n);
    for i in 0..n {
        let user = Uuid::now_v7();
        let created = emulator
            .try_create_identity(NewIdentity {
                schema_id: "customer".into(),
                traits: json!({ "email": format!("bench-{}-{i}@example.com", Uuid::new_v4().simple()) }),
                metadata_public: Some(json!({ "id": user.to_string() })),
                ..NewIdentity::default()
            })
            .context("creating an identity in the emulator")?;
        let id = created
            .get("id")
            .and_then(|v| v.as_str())
            .and_then(|s| Uuid::parse_str(s).ok())
            .context("the emulator's identity has no id")?;
        identities.push(id);
        users.push(user);
    }
    let ids: Vec<String> = identities.iter().map(Uuid::to_string).collect();
    let user_ids: Vec<String> = users.iter().map(Uuid::to_string).collect();
    pg.execute(
        "INSERT INTO users (id, ory_identity_id, schema_id) \
         SELECT u::uuid, i::uuid, 'customer' FROM unnest($1::text[], $2::text[]) AS t(u, i)",
        &[&user_ids, &ids],
    )
    .await
    .context("linking the session identities")?;
    Ok(identities)
}

/// Identities in the emulator that idmap has never seen, for LinkIdentity.
pub fn fresh_identities(emulator: &Emulator, n: usize) -> anyhow::Result<Vec<Uuid>> {
    (0..n)
        .map(|_| {
            let created = emulator
                .try_create_identity(NewIdentity {
                    schema_id: "customer".into(),
                    ..NewIdentity::default()
                })
                .context("creating an identity in the emulator")?;
            created
                .get("id")
                .and_then(|v| v.as_str())
                .and_then(|s| Uuid::parse_str(s).ok())
                .context("the emulator's identity has no id")
        })
        .collect()
}

/// An idmap server running in this process.
pub struct Server {
    pub addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<anyhow::Result<()>>,
}

impl Server {
    /// Builds the app and serves it on 127.0.0.1:0 (gRPC and HTTP); returns once it answers health.
    pub async fn start(mut config: Config) -> anyhow::Result<Self> {
        config.grpc_addr = SocketAddr::from(([127, 0, 0, 1], 0));
        config.http_addr = SocketAddr::from(([127, 0, 0, 1], 0));
        let app = idmap::App::build(config).await?;
        let grpc = TcpListener::bind("127.0.0.1:0").await?;
        let http = TcpListener::bind("127.0.0.1:0").await?;
        let addr = grpc.local_addr()?;
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(app.serve(grpc, http, async move {
            let _ = stopped.await;
        }));
        // The first health check waits in the listen backlog until idmap serves.
        let channels = connect_channels(&addr.to_string(), 1).await?;
        for channel in channels {
            tonic_health::pb::health_client::HealthClient::new(channel)
                .check(tonic_health::pb::HealthCheckRequest::default())
                .await
                .context("the in-process idmap did not become healthy")?;
        }
        Ok(Self {
            addr,
            stop: Some(stop),
            task,
        })
    }

    pub async fn stop(mut self) -> anyhow::Result<()> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        tokio::time::timeout(Duration::from_secs(30), &mut self.task)
            .await
            .context("the in-process idmap did not stop in time")??
    }
}

/// `n` separate HTTP/2 connections to `target` (`host:port`).
pub async fn connect_channels(target: &str, n: usize) -> anyhow::Result<Vec<Channel>> {
    let endpoint = Endpoint::from_shared(format!("http://{target}"))
        .with_context(|| format!("not a usable address: {target}"))?
        .tcp_nodelay(true);
    let mut channels = Vec::with_capacity(n);
    for _ in 0..n.max(1) {
        channels.push(
            endpoint
                .connect()
                .await
                .with_context(|| format!("cannot connect to {target}"))?,
        );
    }
    Ok(channels)
}
