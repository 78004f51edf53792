//! Integration tests: real clusters from the installed PostgreSQL binaries.
#![allow(clippy::unwrap_used)]

use std::io::{BufRead as _, BufReader};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use embedded_pg::{EmbeddedPg, Error, Options};

/// Set in the re-executed test binary to make `crash_helper` start a cluster
/// and then die without dropping it; the value says how ("exit" or "hang",
/// the latter to be SIGKILLed by the parent).
const HELPER_ENV: &str = "EMBEDDED_PG_CRASH_HELPER";

fn accepts_connections(port: u16) -> bool {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    TcpStream::connect_timeout(&addr, Duration::from_secs(1)).is_ok()
}

/// Runs `select 1` through psql, proving the server speaks the protocol and
/// trusts the `postgres` user over TCP.
fn psql_select_1(pg: &EmbeddedPg) {
    let bundled = pg.bin_dir().join("psql");
    let psql = if bundled.is_file() {
        bundled
    } else {
        PathBuf::from("psql")
    };
    let output = Command::new(&psql)
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &pg.port().to_string(),
            "-U",
            "postgres",
        ])
        .args(["-d", "postgres", "-X", "-A", "-t", "-c", "select 1"])
        .env_remove("PGPASSWORD")
        .output()
        .unwrap_or_else(|err| panic!("running {}: {err}", psql.display()));
    assert!(
        output.status.success(),
        "psql failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&output.stdout).trim(), "1");
}

/// Bounded wait-until: polls `done` for up to 20 s.
fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn postgres_uid() -> Option<u32> {
    let passwd = std::fs::read_to_string("/etc/passwd").ok()?;
    passwd.lines().find_map(|line| {
        let fields: Vec<&str> = line.split(':').collect();
        (fields.first() == Some(&"postgres")).then(|| fields.get(2)?.parse().ok())?
    })
}

fn running_as_root() -> bool {
    std::fs::metadata("/proc/self")
        .map(|m| m.uid() == 0)
        .unwrap_or(false)
}

#[test]
fn starts_accepts_connections_and_stop_removes_everything() {
    let pg = EmbeddedPg::start().unwrap();
    let port = pg.port();
    assert_ne!(port, 0);
    assert_eq!(
        pg.url(),
        format!("postgres://postgres@127.0.0.1:{port}/postgres")
    );
    assert_eq!(
        pg.url_for("idmap"),
        format!("postgres://postgres@127.0.0.1:{port}/idmap")
    );
    assert!(accepts_connections(port));
    psql_select_1(&pg);

    if running_as_root() {
        let owner = std::fs::metadata(pg.data_dir()).unwrap().uid();
        assert_eq!(
            Some(owner),
            postgres_uid(),
            "data dir must belong to postgres when root"
        );
    }

    let base_dir = pg.base_dir().to_path_buf();
    let data_dir = pg.data_dir().to_path_buf();
    assert!(data_dir.join("PG_VERSION").is_file());
    pg.stop().unwrap();
    assert!(!data_dir.exists(), "data dir survived stop()");
    assert!(!base_dir.exists(), "base dir survived stop()");
    assert!(
        !accepts_connections(port),
        "server still listening after stop()"
    );
}

#[test]
fn drop_stops_the_server_and_removes_the_dir() {
    let pg = EmbeddedPg::start().unwrap();
    let (port, base_dir) = (pg.port(), pg.base_dir().to_path_buf());
    drop(pg);
    assert!(!base_dir.exists());
    assert!(!accepts_connections(port));
}

#[test]
fn two_clusters_at_once_get_different_ports() {
    let a = EmbeddedPg::start().unwrap();
    let b = EmbeddedPg::start().unwrap();
    assert_ne!(a.port(), b.port());
    assert_ne!(a.data_dir(), b.data_dir());
    psql_select_1(&a);
    psql_select_1(&b);
    a.stop().unwrap();
    // Stopping one must not disturb the other.
    psql_select_1(&b);
    b.stop().unwrap();
}

/// A world-writable (like /tmp) scratch directory, so that the `postgres`
/// user can create and delete the cluster directory in it when we are root.
fn scratch_parent(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("embedded-pg-test-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o1777)).unwrap();
    dir
}

fn is_empty_dir(dir: &Path) -> bool {
    std::fs::read_dir(dir).unwrap().next().is_none()
}

#[test]
fn fixed_port_taken_fails_with_server_log_and_cleans_up() {
    let parent = scratch_parent("taken");
    let blocker = TcpListener::bind(("127.0.0.1", 0)).unwrap();
    let port = blocker.local_addr().unwrap().port();

    let err = EmbeddedPg::start_with(Options {
        port: Some(port),
        data_dir_parent: Some(parent.clone()),
        ..Options::default()
    })
    .unwrap_err();
    assert!(matches!(err, Error::ServerStart { .. }), "{err}");
    let message = err.to_string();
    assert!(message.contains("Address already in use"), "{message}");

    assert!(
        is_empty_dir(&parent),
        "failed start left files in {}",
        parent.display()
    );
    std::fs::remove_dir(&parent).unwrap();
}

#[test]
fn custom_options_are_honoured() {
    let parent = scratch_parent("options");
    let port = TcpListener::bind(("127.0.0.1", 0))
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let bin_dir = Options::default().resolve_bin_dir().unwrap();

    let pg = EmbeddedPg::start_with(Options {
        bin_dir: Some(bin_dir.clone()),
        port: Some(port),
        data_dir_parent: Some(parent.clone()),
        tls: None,
    })
    .unwrap();
    assert_eq!(pg.port(), port);
    assert_eq!(pg.bin_dir(), bin_dir);
    assert!(pg.base_dir().starts_with(&parent));
    psql_select_1(&pg);
    pg.stop().unwrap();

    assert!(is_empty_dir(&parent));
    std::fs::remove_dir(&parent).unwrap();
}

#[test]
fn missing_binaries_are_reported() {
    let err = EmbeddedPg::start_with(Options {
        bin_dir: Some(PathBuf::from("/nonexistent/bin")),
        ..Options::default()
    })
    .unwrap_err();
    assert!(matches!(err, Error::BinariesNotFound { .. }), "{err}");
}

/// Not a test on its own: when re-executed with `HELPER_ENV` set, starts a
/// cluster, reports it on stdout and dies without running any destructor.
#[test]
fn crash_helper() {
    let Ok(mode) = std::env::var(HELPER_ENV) else {
        return;
    };
    let pg = EmbeddedPg::start().unwrap();
    println!("EMBEDDED_PG_BASE_DIR={}", pg.base_dir().display());
    println!("EMBEDDED_PG_PORT={}", pg.port());
    // A static whose Drop never runs, as in the integration tests.
    let pg = Box::leak(Box::new(pg));
    assert!(accepts_connections(pg.port()));
    match mode.as_str() {
        "exit" => std::process::exit(0),
        // Block until the parent SIGKILLs us; bounded so a broken parent
        // cannot leave us around forever.
        _ => std::thread::sleep(Duration::from_secs(120)),
    }
}

/// Runs `crash_helper` in a child process in `mode` and checks that its
/// cluster goes away although the child never stopped it.
fn assert_cluster_dies_with_owner(mode: &str) {
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["crash_helper", "--exact", "--nocapture", "--test-threads=1"])
        .env(HELPER_ENV, mode)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();

    let mut base_dir = None;
    let mut port = None;
    let stdout = child.stdout.take().unwrap();
    for line in BufReader::new(stdout).lines() {
        let line = line.unwrap();
        // libtest may print "test crash_helper ... " in front of our output.
        if let Some((_, dir)) = line.split_once("EMBEDDED_PG_BASE_DIR=") {
            base_dir = Some(PathBuf::from(dir));
        } else if let Some((_, p)) = line.split_once("EMBEDDED_PG_PORT=") {
            port = Some(p.trim().parse::<u16>().unwrap());
        }
        // A helper that is to exit is read to EOF, which also proves that
        // neither the server nor the watchdog holds on to its stdout.
        if mode == "kill" && base_dir.is_some() && port.is_some() {
            break;
        }
    }
    let base_dir = base_dir.expect("helper did not report its data dir");
    let port = port.expect("helper did not report its port");

    if mode == "kill" {
        child.kill().unwrap();
    }
    let status = child.wait().unwrap();
    if mode == "exit" {
        assert!(status.success(), "helper failed: {status}");
    }

    wait_until("the orphaned server stops listening", || {
        !accepts_connections(port)
    });
    wait_until("the orphaned cluster directory is removed", || {
        !base_dir.exists()
    });
}

#[test]
fn cluster_dies_when_owner_exits_without_drop() {
    assert_cluster_dies_with_owner("exit");
}

#[test]
fn cluster_dies_when_owner_is_sigkilled() {
    assert_cluster_dies_with_owner("kill");
}
