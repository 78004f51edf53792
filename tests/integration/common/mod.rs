//! Shared test fixtures: a database per test, the Kratos emulator, and a running idmap with a
//! generated gRPC client connected over TCP.

pub mod db;
pub mod requests;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use idmap::config::{CommonArgs, Config};
use idmap::proto::api::identity_service_client::IdentityServiceClient;
use kratos_emulator::{CreatedSession, Emulator, EmulatorConfig, NewIdentity, NewSession};
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::transport::Channel;
use tonic_types::StatusExt;
use uuid::Uuid;

pub use db::TestDb;
pub use requests::{cookie, invalidate, link, link_with, token};

pub type Client = IdentityServiceClient<Channel>;

/// The longest any test waits for something that should happen within milliseconds.
pub const PATIENCE: Duration = Duration::from_secs(10);

pub async fn emulator() -> Emulator {
    Emulator::start("127.0.0.1:0".parse().unwrap(), EmulatorConfig::default())
        .await
        .expect("start the emulator")
}

/// Settings as `idmap serve` would parse them with only the required ones given, tuned so retries
/// happen in milliseconds.
pub fn config(db: &TestDb, emulator: &Emulator) -> Config {
    config_for(db, &emulator.url())
}

pub fn config_for(db: &TestDb, ory_url: &str) -> Config {
    config_for_url(db.url(), ory_url)
}

/// [`config_for`] with a database of the test's own choosing.
pub fn config_for_url(database_url: secrecy::SecretString, ory_url: &str) -> Config {
    use clap::Parser;
    #[derive(Parser)]
    struct Defaults {
        #[command(flatten)]
        common: CommonArgs,
    }
    // Parse an empty command line so the test runs with the real defaults, whatever the environment.
    let mut defaults = Defaults::try_parse_from(["idmap"]).expect("defaults parse");
    defaults.common.grpc_addr = "127.0.0.1:0".parse().unwrap();
    defaults.common.http_addr = "127.0.0.1:0".parse().unwrap();
    defaults.common.ory_timeout = Duration::from_secs(2);
    defaults.common.outbox_retry_min = Duration::from_millis(20);
    defaults.common.outbox_retry_max = Duration::from_millis(200);
    let mut config = Config::new(
        database_url,
        url::Url::parse(ory_url).unwrap(),
        None,
        defaults.common,
    )
    .expect("valid test config");
    config.outbox.poll_interval = Duration::from_millis(100);
    // Authorization has tests of its own (auth.rs); the others call as an allowed caller would.
    config.callers.allow_any_caller = true;
    config
}

/// A running idmap.
pub struct TestServer {
    pub addr: SocketAddr,
    pub http_addr: SocketAddr,
    pub client: Client,
    /// This replica's end of the invalidation channel, for its traffic counts.
    invalidator: idmap::cache::invalidation::Invalidator,
    shutdown: Option<oneshot::Sender<()>>,
    task: JoinHandle<anyhow::Result<()>>,
}

impl TestServer {
    pub async fn start(config: Config) -> TestServer {
        let app = idmap::App::build(config).await.expect("build the app");
        let invalidator = app.mapper().invalidator().clone();
        let grpc = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let http = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = grpc.local_addr().unwrap();
        let http_addr = http.local_addr().unwrap();
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(app.serve(grpc, http, async move {
            let _ = rx.await;
        }));
        let channel = channel(addr).await;
        // Wait until idmap serves (it first waits for its invalidation listener): one health check
        // sits in the listen backlog until then, so no polling is needed.
        tonic_health::pb::health_client::HealthClient::new(channel.clone())
            .check(tonic_health::pb::HealthCheckRequest::default())
            .await
            .expect("idmap becomes healthy");
        let client = IdentityServiceClient::new(channel);
        TestServer {
            addr,
            http_addr,
            client,
            invalidator,
            shutdown: Some(tx),
            task,
        }
    }

    /// Waits until this replica has applied every eviction `other` has announced so far, for at
    /// most `limit` (the bound a test asserts). Only for two replicas sharing a database: this one
    /// then hears from `other` alone.
    pub async fn heard_everything_from(&self, other: &TestServer, limit: Duration) {
        let announced = *other.invalidator.announced().borrow();
        let mut heard = self.invalidator.heard();
        tokio::time::timeout(limit, heard.wait_for(|n| *n >= announced))
            .await
            .unwrap_or_else(|_| {
                panic!("the other replica's {announced} eviction(s) not all heard within {limit:?}")
            })
            .expect("the invalidation listener is running");
    }

    /// How many times this replica's invalidation listener has reconnected.
    pub fn reconnects(&self) -> tokio::sync::watch::Receiver<u64> {
        self.invalidator.reconnects()
    }

    /// Signals shutdown without waiting.
    pub fn begin_shutdown(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }

    /// Shuts down and waits for the server to finish.
    pub async fn stop(mut self) {
        self.begin_shutdown();
        tokio::time::timeout(PATIENCE, &mut self.task)
            .await
            .expect("server stops in time")
            .expect("server task")
            .expect("server result");
    }

    pub async fn join(&mut self) -> anyhow::Result<()> {
        (&mut self.task).await.expect("server task")
    }
}

pub async fn channel(addr: SocketAddr) -> Channel {
    Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .expect("connect to idmap")
}

/// An emulator, a database and a server wired together.
pub struct Env {
    pub db: TestDb,
    pub ory: Emulator,
    pub server: TestServer,
}

impl Env {
    pub async fn new() -> Env {
        Self::with(|_| {}).await
    }

    pub async fn with(tweak: impl FnOnce(&mut Config)) -> Env {
        Self::with_ory(EmulatorConfig::default(), tweak).await
    }

    pub async fn with_ory(ory_config: EmulatorConfig, tweak: impl FnOnce(&mut Config)) -> Env {
        let db = TestDb::new().await;
        let ory = Emulator::start("127.0.0.1:0".parse().unwrap(), ory_config)
            .await
            .expect("start the emulator");
        let mut config = config(&db, &ory);
        tweak(&mut config);
        let server = TestServer::start(config).await;
        Env { db, ory, server }
    }

    pub fn client(&self) -> Client {
        self.server.client.clone()
    }

    /// A customer identity with a live aal1 session.
    pub fn customer(&self, email: &str) -> (Uuid, CreatedSession) {
        let id = identity(&self.ory, "customer", email);
        let session = self.ory.create_session(id, NewSession::default());
        (id, session)
    }
}

pub fn identity(ory: &Emulator, schema: &str, email: &str) -> Uuid {
    let created = ory.create_identity(NewIdentity {
        schema_id: schema.to_owned(),
        traits: json!({ "email": email }),
        identifiers: vec![email.to_owned()],
        ..NewIdentity::default()
    });
    id_of(&created)
}

pub fn id_of(identity: &Value) -> Uuid {
    identity["id"].as_str().unwrap().parse().unwrap()
}

/// Waits until Ory's `metadata_public.id` of the identity is `user_id`.
pub async fn wait_for_metadata_id(ory: &Emulator, identity: Uuid, user_id: &str) -> Value {
    let want = user_id.to_owned();
    ory.wait_for_identity(
        identity,
        move |i| i["metadata_public"]["id"].as_str() == Some(want.as_str()),
        PATIENCE,
    )
    .await
    .unwrap_or_else(|| panic!("metadata_public.id of {identity} never became {user_id}"))
}

/// The `ErrorInfo` of a status: (reason, domain, metadata).
pub fn error_info(status: &tonic::Status) -> (String, String, HashMap<String, String>) {
    let info = status
        .get_details_error_info()
        .unwrap_or_else(|| panic!("no ErrorInfo in {status:?}"));
    (info.reason, info.domain, info.metadata)
}

/// The fields named by a status's `BadRequest` details.
pub fn bad_fields(status: &tonic::Status) -> Vec<String> {
    status
        .get_details_bad_request()
        .map(|b| b.field_violations.into_iter().map(|v| v.field).collect())
        .unwrap_or_default()
}

#[track_caller]
pub fn assert_code(status: &tonic::Status, code: tonic::Code) {
    assert_eq!(status.code(), code, "unexpected status: {status:?}");
}
