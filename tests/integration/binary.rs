//! The `idmap` binary itself: configuration errors, migrations, and SIGTERM handling.

use std::process::{Command, Stdio};

use secrecy::ExposeSecret;
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

use crate::common::*;

const BIN: &str = env!("CARGO_BIN_EXE_idmap");

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A command with none of the developer's idmap settings leaking in.
fn idmap(args: &[&str]) -> Command {
    let mut cmd = Command::new(BIN);
    cmd.args(args)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("RUST_LOG", "info")
        // The tests of other settings run as a deployment that decided who may call; the one that
        // checks the decision is required removes this.
        .env("IDMAP_ALLOW_ANY_CALLER", "true")
        .stdin(Stdio::null());
    cmd
}

async fn output(mut cmd: Command) -> std::process::Output {
    tokio::task::spawn_blocking(move || cmd.output().expect("run idmap"))
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_refuses_bad_settings_and_names_them() {
    let cases: [(&[(&str, &str)], &str); 9] = [
        (&[("ORY_PUBLIC_URL", "http://kratos:4433")], "DATABASE_URL"),
        (
            &[("DATABASE_URL", "postgres://x@127.0.0.1/x")],
            "ORY_PUBLIC_URL",
        ),
        (
            &[
                ("DATABASE_URL", "postgres://x@127.0.0.1/x"),
                ("ORY_PUBLIC_URL", "ftp://kratos"),
            ],
            "ORY_PUBLIC_URL",
        ),
        (
            &[
                ("DATABASE_URL", "postgres://x@127.0.0.1/x"),
                ("ORY_PUBLIC_URL", "http://kratos:4433"),
                ("IDMAP_GRPC_ADDR", "not-an-address"),
            ],
            "IDMAP_GRPC_ADDR",
        ),
        (
            &[
                ("DATABASE_URL", "postgres://x@127.0.0.1/x"),
                ("ORY_PUBLIC_URL", "http://kratos:4433"),
                ("IDMAP_AUTO_LINK", "maybe"),
            ],
            "IDMAP_AUTO_LINK",
        ),
        (
            &[
                ("DATABASE_URL", "postgres://x@127.0.0.1/x?sslmode=verify"),
                ("ORY_PUBLIC_URL", "http://kratos:4433"),
            ],
            "DATABASE_URL",
        ),
        (
            &[
                ("DATABASE_URL", "postgres://x@127.0.0.1/x"),
                ("ORY_PUBLIC_URL", "http://kratos:4433"),
                ("IDMAP_TLS_CERT", "/etc/idmap/tls.crt"),
            ],
            "IDMAP_TLS_KEY",
        ),
        (
            &[
                ("DATABASE_URL", "postgres://x@127.0.0.1/x"),
                ("ORY_PUBLIC_URL", "http://kratos:4433"),
                ("IDMAP_TLS_CERT", "/nonexistent/tls.crt"),
                ("IDMAP_TLS_KEY", "/nonexistent/tls.key"),
            ],
            "IDMAP_TLS_CERT",
        ),
        (
            // Shorter than two deliveries at a 1 s Ory timeout (2 x (4 x 1s + 5s) = 18s).
            &[
                ("DATABASE_URL", "postgres://x@127.0.0.1/x"),
                ("ORY_PUBLIC_URL", "http://kratos:4433"),
                ("IDMAP_ORY_TIMEOUT", "1s"),
                ("IDMAP_OUTBOX_LEASE", "17s"),
            ],
            "IDMAP_OUTBOX_LEASE",
        ),
    ];
    for (env, named) in cases {
        let mut cmd = idmap(&["serve"]);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let out = output(cmd).await;
        assert_eq!(out.status.code(), Some(64), "{env:?}: {out:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(named), "{named} not named in: {stderr}");
    }
    // Combinations clap cannot check fail the same way.
    let mut cmd = idmap(&["serve"]);
    cmd.env("DATABASE_URL", "postgres://x@127.0.0.1/x")
        .env("ORY_PUBLIC_URL", "http://kratos:4433")
        .env("IDMAP_OUTBOX_RETRY_MIN", "10m");
    let out = output(cmd).await;
    assert_eq!(out.status.code(), Some(64), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("IDMAP_OUTBOX_RETRY_MIN"));
    // No decision on who may call: no silent open door.
    let mut cmd = idmap(&["serve"]);
    cmd.env_remove("IDMAP_ALLOW_ANY_CALLER")
        .env("DATABASE_URL", "postgres://x@127.0.0.1/x")
        .env("ORY_PUBLIC_URL", "http://kratos:4433");
    let out = output(cmd).await;
    assert_eq!(out.status.code(), Some(64), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("IDMAP_CALLERS") && stderr.contains("IDMAP_ALLOW_ANY_CALLER"),
        "{stderr}"
    );
    // A callers file that names an RPC that does not exist stops start-up, naming its line.
    let dir = std::env::temp_dir().join(format!("idmap-callers-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("callers.toml");
    std::fs::write(
        &file,
        "[[callers]]\nname = \"bff\"\ndns_names = [\"bff.web\"]\nrpcs = [\"ResolveSession\", \"Resolve\"]\n",
    )
    .unwrap();
    let mut cmd = idmap(&["serve"]);
    cmd.env_remove("IDMAP_ALLOW_ANY_CALLER")
        .env("DATABASE_URL", "postgres://x@127.0.0.1/x")
        .env("ORY_PUBLIC_URL", "http://kratos:4433")
        .env("IDMAP_CALLERS", &file);
    let out = output(cmd).await;
    std::fs::remove_dir_all(&dir).unwrap();
    assert_eq!(out.status.code(), Some(64), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("line 1") && stderr.contains("\"Resolve\""),
        "{stderr}"
    );
    // Asking for help is not a mistake.
    for flag in ["--help", "--version"] {
        let out = output(idmap(&[flag])).await;
        assert_eq!(out.status.code(), Some(0), "{flag}: {out:?}");
        assert!(!out.stdout.is_empty());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_refuses_an_unreachable_or_unmigrated_database() {
    let ory = emulator().await;
    let dead = format!("postgres://postgres@127.0.0.1:{}/postgres", free_port());
    let mut cmd = idmap(&["serve"]);
    cmd.env("DATABASE_URL", &dead)
        .env("ORY_PUBLIC_URL", ory.url());
    let out = output(cmd).await;
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("DATABASE_URL"));

    // An empty database: serve asks for `idmap migrate`; migrate makes serve possible.
    let db = TestDb::new().await;
    {
        use diesel_async::SimpleAsyncConnection;
        let mut conn = db.conn().await;
        conn.batch_execute(
            "DROP TABLE backfill_run_identities, backfill_runs, former_external_ids, ory_outbox, pending_users, session_cache, session_cache_evictions, user_external_ids, users, __diesel_schema_migrations",
        )
        .await
        .unwrap();
    }
    let url = db.url().expose_secret().to_owned();
    let mut cmd = idmap(&["serve"]);
    cmd.env("DATABASE_URL", &url)
        .env("ORY_PUBLIC_URL", ory.url());
    let out = output(cmd).await;
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("idmap migrate"));

    let mut cmd = idmap(&["migrate"]);
    cmd.env("DATABASE_URL", &url);
    let out = output(cmd).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(db.count("SELECT count(*) FROM users").await, 0);
}

/// `idmap serve` as a child process on `db` and `ory`, with `env` on top; returns once it says it
/// serves (its listeners are bound by then), with its gRPC port and every line it logs.
pub(crate) async fn spawn_serve(
    db: &TestDb,
    ory: &kratos_emulator::Emulator,
    env: &[(&str, &str)],
) -> (
    std::process::Child,
    u16,
    tokio::sync::mpsc::UnboundedReceiver<String>,
) {
    let grpc_port = free_port();
    let mut cmd = idmap(&["serve"]);
    cmd.env("DATABASE_URL", db.url().expose_secret())
        .env("ORY_PUBLIC_URL", ory.url())
        .env("IDMAP_GRPC_ADDR", format!("127.0.0.1:{grpc_port}"))
        .env("IDMAP_HTTP_ADDR", format!("127.0.0.1:{}", free_port()))
        .env("IDMAP_LOG_FORMAT", "json")
        .envs(env.iter().copied())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("spawn idmap serve");
    // The thread keeps reading so the pipe never fills.
    let stderr = child.stderr.take().unwrap();
    let (serving_tx, serving) = tokio::sync::oneshot::channel::<()>();
    let (lines_tx, lines) = tokio::sync::mpsc::unbounded_channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        let mut serving_tx = Some(serving_tx);
        for line in std::io::BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            if line.contains(r#""message":"serving""#)
                && let Some(tx) = serving_tx.take()
            {
                let _ = tx.send(());
            }
            let _ = lines_tx.send(line);
        }
    });
    tokio::time::timeout(PATIENCE, serving)
        .await
        .expect("idmap serve never said it serves")
        .expect("idmap serve exited before serving");
    (child, grpc_port, lines)
}

pub(crate) async fn channel_to(port: u16) -> tonic::transport::Channel {
    tonic::transport::Channel::from_shared(format!("http://127.0.0.1:{port}"))
        .unwrap()
        .connect()
        .await
        .expect("connect to idmap serve")
}

pub(crate) fn signal(child: &std::process::Child, signal: &str) {
    let sent = Command::new("kill")
        .args([signal, &child.id().to_string()])
        .status()
        .unwrap();
    assert!(sent.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_exits_zero_on_sigterm() {
    let db = TestDb::new().await;
    let ory = emulator().await;
    let (mut child, grpc_port, _) = spawn_serve(&db, &ory, &[]).await;
    HealthClient::new(channel_to(grpc_port).await)
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .expect("idmap serve is healthy");

    signal(&child, "-TERM");
    let status = tokio::task::spawn_blocking(move || child.wait().unwrap())
        .await
        .unwrap();
    assert_eq!(status.code(), Some(0));
}

/// A replica SIGKILLed while it delivers an Ory write gives nothing back: the row stays claimed
/// until its lease runs out, and then another replica delivers it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_whose_replica_is_killed_mid_delivery_arrives_once_its_lease_expires() {
    use idmap::proto::api::identity_service_client::IdentityServiceClient;
    use kratos_emulator::{Fault, Gate, Route};

    let db = TestDb::new().await;
    let ory = emulator().await;
    // The shortest lease a 1 s Ory timeout allows (2 x (4 x 1s + 5s)); a failed attempt would wait
    // an hour, so only the lease running out can bring the row back within this test.
    let lease = std::time::Duration::from_secs(18);
    let (mut child, grpc_port, _) = spawn_serve(
        &db,
        &ory,
        &[
            ("IDMAP_ORY_TIMEOUT", "1s"),
            ("IDMAP_OUTBOX_LEASE", "18s"),
            ("IDMAP_OUTBOX_RETRY_MIN", "1h"),
            ("IDMAP_OUTBOX_RETRY_MAX", "1h"),
        ],
    )
    .await;
    // The replica's write reaches Ory and is held there, unanswered, for good.
    let gate = Gate::new();
    ory.inject_fault(Route::AdminWrite, Fault::held(&gate));
    let person = identity(&ory, "customer", "killed@example.com");
    let user = IdentityServiceClient::new(channel_to(grpc_port).await)
        .link_identity(link(person))
        .await
        .expect("links")
        .into_inner()
        .user
        .unwrap();
    assert!(
        ory.wait_for_calls(Route::AdminWrite, 1, PATIENCE).await,
        "the replica never sent its write"
    );
    signal(&child, "-KILL");
    tokio::task::spawn_blocking(move || child.wait().unwrap())
        .await
        .unwrap();
    // Killed mid-delivery: the row is still claimed, with no failure recorded.
    assert_eq!(
        db.count("SELECT count(*) FROM ory_outbox WHERE next_attempt_at > now() AND last_error IS NULL AND attempts = 1")
            .await,
        1
    );

    ory.clear_faults();
    let survivor = TestServer::start(config(&db, &ory)).await;
    let delivered = ory
        .wait_for_identity(
            person,
            {
                let want = user.id.clone();
                move |i| i["metadata_public"]["id"].as_str() == Some(want.as_str())
            },
            lease + PATIENCE,
        )
        .await;
    assert!(delivered.is_some(), "the write never arrived");
    db.wait_for_outbox("SELECT count(*) FROM ory_outbox", 0)
        .await;
    survivor.stop().await;
}
