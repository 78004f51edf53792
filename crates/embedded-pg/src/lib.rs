//! A private, throw-away PostgreSQL cluster built from the PostgreSQL server
//! binaries installed on the machine (`initdb`, `pg_ctl`, `postgres`).
//!
//! Used by `idmap dev` and by the integration tests when `DATABASE_URL` is not
//! set. Each [`EmbeddedPg`] owns a fresh temporary directory holding the data
//! directory, the unix socket and the server log; the server listens on
//! `127.0.0.1` only, on a free port, and trusts every local connection.
//!
//! # Running as root
//!
//! `initdb`, `pg_ctl` and `postgres` refuse to run as root. When the effective
//! uid is 0 they are therefore run as the `postgres` system user (looked up in
//! `/etc/passwd`) and the temporary directory is chowned to that user. In that
//! mode a custom [`Options::data_dir_parent`] must be traversable and writable
//! by `postgres` (like `/tmp`), or the crash clean-up cannot delete it.
//!
//! # Crash safety
//!
//! The server is a daemon that would happily outlive us, and callers keep
//! clusters in statics whose `Drop` never runs or get killed with `SIGKILL`.
//! So every cluster has a watchdog: a tiny `sh` child blocked reading a pipe
//! whose only write end this process holds. However the process ends, the
//! kernel closes that write end, the watchdog sees EOF, stops the server
//! (`pg_ctl stop -m immediate`) and deletes the temporary directory.

// Published to the workspace as a library other crates build on, so every public item says what it is for.
#![warn(missing_docs)]

use std::ffi::OsStr;
use std::fmt::Write as _;
use std::fs;
use std::io::{self, Read as _, Seek as _, SeekFrom};
use std::net::TcpListener;
use std::os::unix::fs::{DirBuilderExt as _, MetadataExt as _, PermissionsExt as _};
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Output, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// Environment variable naming the directory holding `initdb`, `pg_ctl` and
/// `postgres`; consulted when [`Options::bin_dir`] is not set.
pub const BIN_DIR_ENV: &str = "IDMAP_PG_BIN_DIR";

/// Where distribution packages (Debian/Ubuntu) install versioned server binaries.
const VERSIONED_BIN_ROOT: &str = "/usr/lib/postgresql";

/// The system user the server runs as when we are root.
const POSTGRES_USER: &str = "postgres";

/// How many fresh ports to try when the chosen one was taken between picking
/// it and the server binding it.
const PORT_ATTEMPTS: usize = 5;

/// Seconds `pg_ctl` may wait for start-up / shutdown before giving up.
const PG_CTL_TIMEOUT_SECS: &str = "60";

/// How many trailing lines of tool output / server log go into errors.
const TAIL_LINES: usize = 20;

/// Settings appended to `postgresql.conf`. Durability is pointless for a
/// cluster that is deleted afterwards, and turning it off makes tests fast.
const TUNING: &str = "\n# Added by embedded-pg: throw-away cluster, durability is not needed.\n\
listen_addresses = '127.0.0.1'\n\
fsync = off\n\
synchronous_commit = off\n\
full_page_writes = off\n\
max_connections = 200\n\
shared_buffers = 128MB\n";

/// Watchdog script, run as `sh -c WATCHDOG embedded-pg-watchdog PG_CTL DATA_DIR BASE_DIR`.
///
/// Signals are ignored so that a Ctrl-C aimed at the owning process (or its
/// process group) cannot kill the watchdog before it has cleaned up; it must
/// only ever finish because its stdin reached EOF.
const WATCHDOG: &str = r#"trap '' HUP INT QUIT TERM PIPE
cat >/dev/null
"$1" stop -D "$2" -m immediate -w >/dev/null 2>&1
rm -rf -- "$3"
"#;

/// Errors starting or stopping an [`EmbeddedPg`].
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No directory with the PostgreSQL server binaries was found.
    #[error(
        "PostgreSQL server binaries (initdb, pg_ctl, postgres) not found; looked in: {searched} \
         (set {BIN_DIR_ENV} to the directory containing them)"
    )]
    BinariesNotFound {
        /// Human-readable list of the places that were checked.
        searched: String,
    },
    /// Running as root, but there is no `postgres` user to run the server as.
    #[error(
        "running as root, but PostgreSQL refuses to run as root and no `{POSTGRES_USER}` user \
         exists in /etc/passwd to run it as; create that user or run as a non-root user"
    )]
    NoPostgresUser,
    /// An I/O operation failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// A PostgreSQL tool exited unsuccessfully.
    #[error("{what} failed ({status}):\n{output}")]
    CommandFailed {
        /// The command that failed, e.g. `initdb`.
        what: String,
        /// Its exit status.
        status: String,
        /// The last lines of its stderr and stdout.
        output: String,
    },
    /// `pg_ctl start` failed.
    #[error(
        "starting postgres on 127.0.0.1:{port} failed:\n{output}\n--- server log (last lines) ---\n{log}"
    )]
    ServerStart {
        /// The port the server was asked to listen on.
        port: u16,
        /// The last lines of `pg_ctl`'s output.
        output: String,
        /// The last lines of the server log written during this attempt.
        log: String,
    },
}

impl Error {
    fn io(what: impl Into<String>) -> impl FnOnce(io::Error) -> Error {
        let what = what.into();
        move |source| Error::Io { what, source }
    }
}

/// Options for [`EmbeddedPg::start_with`]. `Default` gives the same behaviour
/// as [`EmbeddedPg::start`].
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// Directory containing `initdb`, `pg_ctl` and `postgres`. When unset:
    /// `$IDMAP_PG_BIN_DIR`, then the directory of `initdb` on `PATH`, then the
    /// highest version under `/usr/lib/postgresql/*/bin`.
    pub bin_dir: Option<PathBuf>,
    /// Fixed TCP port. When unset a free port is picked (and re-picked if it
    /// gets taken before the server binds it); a fixed port is never retried.
    pub port: Option<u16>,
    /// Where to create the temporary cluster directory; defaults to
    /// [`std::env::temp_dir`].
    pub data_dir_parent: Option<PathBuf>,
    /// Serve TLS (`ssl = on`) with this certificate and key, and only TLS to
    /// TCP clients (`hostssl` in `pg_hba.conf`); unset, the server refuses
    /// TLS, as initdb leaves it.
    pub tls: Option<ServerTls>,
}

/// The server certificate (chain, leaf first) and private key, in PEM.
#[derive(Debug, Clone)]
pub struct ServerTls {
    /// `server.crt`: the certificate chain, leaf first.
    pub cert_pem: String,
    /// `server.key`: the certificate's private key.
    pub key_pem: String,
}

impl Options {
    /// The directory of the PostgreSQL binaries these options select, found
    /// as described at [`Options::bin_dir`].
    pub fn resolve_bin_dir(&self) -> Result<PathBuf, Error> {
        find_bin_dir(self.bin_dir.as_deref())
    }
}

/// The user the PostgreSQL tools run as, when that is not us (we are root).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct RunAs {
    uid: u32,
    gid: u32,
}

/// A running throw-away PostgreSQL cluster. Stopped and deleted by
/// [`EmbeddedPg::stop`], on `Drop`, or by its watchdog when this process exits
/// without either.
#[derive(Debug)]
pub struct EmbeddedPg {
    port: u16,
    bin_dir: PathBuf,
    /// The temporary directory owning everything below; deleting it is the clean-up.
    base_dir: PathBuf,
    data_dir: PathBuf,
    run_as: Option<RunAs>,
    watchdog: Option<Child>,
    /// Write end of the watchdog's stdin. Never written; closing it (explicitly
    /// or by process exit) is what triggers the watchdog.
    watchdog_pipe: Option<ChildStdin>,
    stopped: bool,
}

impl EmbeddedPg {
    /// Creates a temporary directory, runs `initdb` (user `postgres`, trust
    /// auth, UTF8, C locale, no fsync) and starts the server on `127.0.0.1`
    /// at a free port with the unix socket in the temporary directory and
    /// durability turned off. Returns once the server accepts connections.
    pub fn start() -> Result<EmbeddedPg, Error> {
        Self::start_with(Options::default())
    }

    /// Like [`EmbeddedPg::start`], with explicit [`Options`].
    pub fn start_with(options: Options) -> Result<EmbeddedPg, Error> {
        let bin_dir = options.resolve_bin_dir()?;
        let parent = options
            .data_dir_parent
            .clone()
            .unwrap_or_else(std::env::temp_dir);
        let base_dir = create_unique_dir(&parent)?;

        // From here on `pg` owns the directory: any early return drops it,
        // and Drop stops whatever was started and deletes the directory.
        let mut pg = EmbeddedPg {
            port: 0,
            data_dir: base_dir.join("data"),
            bin_dir,
            base_dir,
            run_as: None,
            watchdog: None,
            watchdog_pipe: None,
            stopped: false,
        };

        // The directory we just created is owned by our effective uid, which
        // tells us whether we are root without needing libc.
        let euid = fs::metadata(&pg.base_dir)
            .map_err(Error::io(format!(
                "reading metadata of {}",
                pg.base_dir.display()
            )))?
            .uid();
        if euid == 0 {
            let run_as = lookup_user(POSTGRES_USER)?.ok_or(Error::NoPostgresUser)?;
            std::os::unix::fs::chown(&pg.base_dir, Some(run_as.uid), Some(run_as.gid)).map_err(
                Error::io(format!(
                    "chowning {} to {POSTGRES_USER}",
                    pg.base_dir.display()
                )),
            )?;
            pg.run_as = Some(run_as);
        }

        // Spawned before initdb so that even a crash during set-up or start-up
        // leaves nothing behind.
        pg.spawn_watchdog()?;
        pg.initdb()?;
        pg.configure(options.tls.as_ref())?;
        pg.start_server(options.port)?;
        Ok(pg)
    }

    /// The connection URL of the `postgres` database:
    /// `postgres://postgres@127.0.0.1:PORT/postgres`.
    pub fn url(&self) -> String {
        self.url_for("postgres")
    }

    /// The connection URL of `database` on this server (the database is not
    /// created by this call).
    pub fn url_for(&self, database: &str) -> String {
        format!(
            "postgres://postgres@127.0.0.1:{}/{}",
            self.port,
            percent_encode(database)
        )
    }

    /// The TCP port the server listens on (on 127.0.0.1).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The cluster's data directory (inside [`EmbeddedPg::base_dir`]).
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// The temporary directory holding the data directory, the unix socket and
    /// the server log (`postgres.log`); removed on stop.
    pub fn base_dir(&self) -> &Path {
        &self.base_dir
    }

    /// The directory of the PostgreSQL binaries in use (e.g. to find `psql`).
    pub fn bin_dir(&self) -> &Path {
        &self.bin_dir
    }

    /// The directory of the server's unix socket (usable as `host=` in libpq).
    pub fn socket_dir(&self) -> &Path {
        &self.base_dir
    }

    /// Stops the server (fast shutdown: connections are terminated) and
    /// removes the temporary directory. Also done on `Drop`, ignoring errors.
    pub fn stop(mut self) -> Result<(), Error> {
        self.shutdown()
    }

    /// Stops the server as a crash or failover would look to clients (fast shutdown: open
    /// connections are cut), keeping the data and the port for [`EmbeddedPg::resume`].
    pub fn halt(&self) -> Result<(), Error> {
        let mut cmd = self.command(self.bin_dir.join("pg_ctl"));
        cmd.arg("stop").arg("-D").arg(&self.data_dir).args([
            "-m",
            "fast",
            "-w",
            "-t",
            PG_CTL_TIMEOUT_SECS,
        ]);
        run(&mut cmd, "pg_ctl stop")?;
        Ok(())
    }

    /// Starts a server stopped by [`EmbeddedPg::halt`] again, on the same port, with its data.
    pub fn resume(&self) -> Result<(), Error> {
        self.try_start_server(self.port)
    }

    fn log_file(&self) -> PathBuf {
        self.base_dir.join("postgres.log")
    }

    /// A command for a PostgreSQL tool, run as the cluster's owner with an
    /// environment that cannot redirect it elsewhere.
    fn command(&self, program: impl AsRef<OsStr>) -> Command {
        let mut cmd = Command::new(program);
        // Inherited PG* variables could point the tools at another cluster.
        for var in [
            "PGDATA",
            "PGHOST",
            "PGHOSTADDR",
            "PGPORT",
            "PGCTLTIMEOUT",
            "PGOPTIONS",
        ] {
            cmd.env_remove(var);
        }
        // English messages, so that a port conflict can be recognised in the log.
        cmd.env("LC_ALL", "C");
        // Our cwd may be unreadable for the postgres user.
        cmd.current_dir("/");
        cmd.stdin(Stdio::null());
        if let Some(run_as) = self.run_as {
            cmd.uid(run_as.uid).gid(run_as.gid);
        }
        cmd
    }

    fn spawn_watchdog(&mut self) -> Result<(), Error> {
        let mut cmd = self.command("sh");
        cmd.arg("-c")
            .arg(WATCHDOG)
            .arg("embedded-pg-watchdog")
            .arg(self.bin_dir.join("pg_ctl"))
            .arg(&self.data_dir)
            .arg(&self.base_dir)
            // std creates this pipe with O_CLOEXEC, so the write end we keep is
            // not inherited by later children (pg_ctl and the server it
            // daemonises in particular); otherwise they would keep it open
            // and the watchdog would never wake.
            .stdin(Stdio::piped())
            // Not our stdout/stderr: a parent reading our output until EOF
            // must not wait for the watchdog.
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            // Own process group, so terminal signals to ours do not reach it.
            .process_group(0);
        let mut child = cmd
            .spawn()
            .map_err(Error::io("spawning the watchdog (sh)"))?;
        self.watchdog_pipe = child.stdin.take();
        self.watchdog = Some(child);
        Ok(())
    }

    fn initdb(&self) -> Result<(), Error> {
        let mut cmd = self.command(self.bin_dir.join("initdb"));
        cmd.arg("-D").arg(&self.data_dir).args([
            "-U",
            "postgres",
            "--auth=trust",
            "-E",
            "UTF8",
            "--no-locale",
            "--no-sync",
        ]);
        run(&mut cmd, "initdb")?;
        Ok(())
    }

    fn configure(&self, tls: Option<&ServerTls>) -> Result<(), Error> {
        let conf_path = self.data_dir.join("postgresql.conf");
        let mut conf = fs::read_to_string(&conf_path)
            .map_err(Error::io(format!("reading {}", conf_path.display())))?;
        conf.push_str(TUNING);
        if let Some(tls) = tls {
            // PostgreSQL refuses a key that others can read, and must own both files.
            for (name, pem) in [("server.crt", &tls.cert_pem), ("server.key", &tls.key_pem)] {
                let path = self.data_dir.join(name);
                fs::write(&path, pem).map_err(Error::io(format!("writing {}", path.display())))?;
                fs::set_permissions(&path, fs::Permissions::from_mode(0o600))
                    .map_err(Error::io(format!("chmod {}", path.display())))?;
                if let Some(run_as) = self.run_as {
                    std::os::unix::fs::chown(&path, Some(run_as.uid), Some(run_as.gid))
                        .map_err(Error::io(format!("chowning {}", path.display())))?;
                }
            }
            conf.push_str("ssl = on\nssl_cert_file = 'server.crt'\nssl_key_file = 'server.key'\n");
            let hba_path = self.data_dir.join("pg_hba.conf");
            let hba = fs::read_to_string(&hba_path)
                .map_err(Error::io(format!("reading {}", hba_path.display())))?;
            let tls_only: String = hba
                .lines()
                .map(|line| match line.strip_prefix("host ") {
                    Some(rest) => format!("hostssl {rest}\n"),
                    None => format!("{line}\n"),
                })
                .collect();
            fs::OpenOptions::new()
                .write(true)
                .truncate(true)
                .open(&hba_path)
                .and_then(|mut f| io::Write::write_all(&mut f, tls_only.as_bytes()))
                .map_err(Error::io(format!("writing {}", hba_path.display())))?;
        }
        // Keep the socket in our private directory rather than /var/run/postgresql,
        // which may not exist or be shared with a system cluster.
        let socket_dir = self.base_dir.to_string_lossy().replace('\'', "''");
        let _ = writeln!(conf, "unix_socket_directories = '{socket_dir}'");
        // Write through the existing file so that owner and mode stay as initdb left them.
        fs::OpenOptions::new()
            .write(true)
            .truncate(true)
            .open(&conf_path)
            .and_then(|mut f| io::Write::write_all(&mut f, conf.as_bytes()))
            .map_err(Error::io(format!("writing {}", conf_path.display())))
    }

    fn start_server(&mut self, fixed_port: Option<u16>) -> Result<(), Error> {
        let attempts = if fixed_port.is_some() {
            1
        } else {
            PORT_ATTEMPTS
        };
        let mut last_error = None;
        for _ in 0..attempts {
            let port = match fixed_port {
                Some(port) => port,
                None => free_port()?,
            };
            match self.try_start_server(port) {
                Ok(()) => {
                    self.port = port;
                    return Ok(());
                }
                // Someone else bound the port between our probe and the server's bind.
                Err(err @ Error::ServerStart { .. }) if is_port_conflict(&err) => {
                    last_error = Some(err);
                }
                Err(err) => return Err(err),
            }
        }
        Err(last_error.unwrap_or_else(|| Error::ServerStart {
            port: 0,
            output: "no start attempted".into(),
            log: String::new(),
        }))
    }

    fn try_start_server(&self, port: u16) -> Result<(), Error> {
        let log_file = self.log_file();
        // Only the part of the log written by this attempt explains its failure.
        let log_offset = fs::metadata(&log_file).map(|m| m.len()).unwrap_or(0);
        let mut cmd = self.command(self.bin_dir.join("pg_ctl"));
        cmd.arg("start")
            .arg("-w")
            .args(["-t", PG_CTL_TIMEOUT_SECS])
            .arg("-D")
            .arg(&self.data_dir)
            .arg("-l")
            .arg(&log_file)
            .arg("-o")
            .arg(format!("-p {port}"));
        let output = cmd.output().map_err(Error::io("running pg_ctl start"))?;
        if output.status.success() {
            return Ok(());
        }
        Err(Error::ServerStart {
            port,
            output: output_tail(&output),
            log: read_tail_from(&log_file, log_offset),
        })
    }

    fn shutdown(&mut self) -> Result<(), Error> {
        if self.stopped {
            return Ok(());
        }
        self.stopped = true;
        let mut result = Ok(());

        // postmaster.pid exists exactly while a server may be running.
        if self.data_dir.join("postmaster.pid").exists()
            && let Err(err) = self.halt()
        {
            result = Err(err);
        }

        // Closing the pipe wakes the watchdog, which stops the server the hard
        // way should the fast shutdown have failed, and removes the directory.
        drop(self.watchdog_pipe.take());
        if let Some(mut watchdog) = self.watchdog.take()
            && let Err(err) = watchdog.wait()
        {
            result = result.and(Err(Error::io("waiting for the watchdog")(err)));
        }

        // The watchdog normally removed it already; this covers a watchdog that
        // could not (e.g. no permission on a custom parent directory).
        match fs::remove_dir_all(&self.base_dir) {
            Err(err) if err.kind() != io::ErrorKind::NotFound => {
                result = result.and(Err(Error::io(format!(
                    "removing {}",
                    self.base_dir.display()
                ))(err)));
            }
            _ => {}
        }
        result
    }
}

impl Drop for EmbeddedPg {
    fn drop(&mut self) {
        // Errors cannot be reported from Drop; stop() reports them.
        let _ = self.shutdown();
    }
}

/// Runs `cmd` to completion, turning a failure into an error with its output.
fn run(cmd: &mut Command, what: &str) -> Result<Output, Error> {
    let output = cmd.output().map_err(Error::io(format!("running {what}")))?;
    if output.status.success() {
        Ok(output)
    } else {
        Err(Error::CommandFailed {
            what: what.to_owned(),
            status: output.status.to_string(),
            output: output_tail(&output),
        })
    }
}

fn is_port_conflict(err: &Error) -> bool {
    match err {
        Error::ServerStart { log, .. } => {
            log.contains("Address already in use")
                || log.contains("could not create any TCP/IP sockets")
        }
        _ => false,
    }
}

/// Picks a port that is free right now by letting the kernel choose one. It
/// is released before the server binds it, hence the retries in `start_server`.
fn free_port() -> Result<u16, Error> {
    let listener = TcpListener::bind(("127.0.0.1", 0))
        .map_err(Error::io("binding 127.0.0.1:0 to find a free port"))?;
    let port = listener
        .local_addr()
        .map_err(Error::io("reading the address of the probe socket"))?
        .port();
    Ok(port)
}

/// Creates a fresh, private (0700) directory under `parent`.
fn create_unique_dir(parent: &Path) -> Result<PathBuf, Error> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut last_err = None;
    for _ in 0..100 {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let name = format!(
            "embedded-pg-{}-{}-{nanos:x}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        let path = parent.join(name);
        match fs::DirBuilder::new().mode(0o700).create(&path) {
            Ok(()) => {
                // The umask may have narrowed the mode; make sure it is exactly 0700.
                fs::set_permissions(&path, fs::Permissions::from_mode(0o700)).map_err(
                    Error::io(format!("setting permissions of {}", path.display())),
                )?;
                return Ok(path);
            }
            Err(err) if err.kind() == io::ErrorKind::AlreadyExists => last_err = Some(err),
            Err(err) => {
                return Err(Error::io(format!(
                    "creating a directory in {}",
                    parent.display()
                ))(err));
            }
        }
    }
    Err(Error::io(format!(
        "creating a unique directory in {}",
        parent.display()
    ))(
        last_err.unwrap_or_else(|| io::Error::other("no attempt made")),
    ))
}

/// Finds the directory holding the server binaries; see [`Options::bin_dir`].
fn find_bin_dir(explicit: Option<&Path>) -> Result<PathBuf, Error> {
    let mut searched = Vec::new();

    if let Some(dir) = explicit {
        if has_binaries(dir) {
            return Ok(dir.to_path_buf());
        }
        // An explicit choice that does not work is an error, not a hint to guess.
        return Err(Error::BinariesNotFound {
            searched: format!("{} (Options::bin_dir)", dir.display()),
        });
    }

    if let Some(dir) = std::env::var_os(BIN_DIR_ENV) {
        let dir = PathBuf::from(dir);
        if has_binaries(&dir) {
            return Ok(dir);
        }
        return Err(Error::BinariesNotFound {
            searched: format!("{} (${BIN_DIR_ENV})", dir.display()),
        });
    }

    match std::env::var_os("PATH") {
        Some(path) => {
            for dir in std::env::split_paths(&path) {
                let initdb = dir.join("initdb");
                if initdb.is_file() {
                    // Resolve symlinks (e.g. /usr/local/bin/initdb ->
                    // /usr/lib/postgresql/15/bin/initdb): the real directory
                    // also has pg_ctl/postgres/psql of the same version.
                    let real_dir = fs::canonicalize(&initdb)
                        .ok()
                        .and_then(|p| p.parent().map(Path::to_path_buf))
                        .unwrap_or_else(|| dir.clone());
                    if has_binaries(&real_dir) {
                        return Ok(real_dir);
                    }
                    if has_binaries(&dir) {
                        return Ok(dir);
                    }
                }
            }
            searched.push("directories on $PATH".to_owned());
        }
        None => searched.push("$PATH (unset)".to_owned()),
    }

    let mut versions: Vec<(Vec<u64>, PathBuf)> = fs::read_dir(VERSIONED_BIN_ROOT)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let name = entry.file_name();
            let version = name
                .to_str()?
                .split('.')
                .map(|part| part.parse::<u64>().ok())
                .collect::<Option<Vec<u64>>>()?;
            let bin = entry.path().join("bin");
            has_binaries(&bin).then_some((version, bin))
        })
        .collect();
    versions.sort();
    if let Some((_, bin)) = versions.pop() {
        return Ok(bin);
    }
    searched.push(format!("{VERSIONED_BIN_ROOT}/*/bin"));

    Err(Error::BinariesNotFound {
        searched: format!("{BIN_DIR_ENV} (unset), {}", searched.join(", ")),
    })
}

fn has_binaries(dir: &Path) -> bool {
    ["initdb", "pg_ctl", "postgres"]
        .iter()
        .all(|name| dir.join(name).is_file())
}

/// Looks `name` up in /etc/passwd (no NSS, which is enough for a system user
/// created by the PostgreSQL packages).
fn lookup_user(name: &str) -> Result<Option<RunAs>, Error> {
    let passwd = fs::read_to_string("/etc/passwd").map_err(Error::io("reading /etc/passwd"))?;
    Ok(parse_passwd(&passwd, name))
}

fn parse_passwd(passwd: &str, name: &str) -> Option<RunAs> {
    passwd.lines().find_map(|line| {
        let mut fields = line.split(':');
        if fields.next()? != name {
            return None;
        }
        let _password = fields.next()?;
        let uid = fields.next()?.parse().ok()?;
        let gid = fields.next()?.parse().ok()?;
        Some(RunAs { uid, gid })
    })
}

/// The last lines of a command's stderr followed by its stdout.
fn output_tail(output: &Output) -> String {
    let mut text = String::from_utf8_lossy(&output.stderr).into_owned();
    let stdout = String::from_utf8_lossy(&output.stdout);
    if !stdout.trim().is_empty() {
        if !text.is_empty() && !text.ends_with('\n') {
            text.push('\n');
        }
        text.push_str(&stdout);
    }
    tail(&text, TAIL_LINES)
}

/// The last lines of `path` from byte `offset` on; an explanation if unreadable.
fn read_tail_from(path: &Path, offset: u64) -> String {
    let read = || -> io::Result<String> {
        let mut file = fs::File::open(path)?;
        file.seek(SeekFrom::Start(offset))?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes)?;
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    };
    match read() {
        Ok(text) => tail(&text, TAIL_LINES),
        Err(err) => format!("(could not read {}: {err})", path.display()),
    }
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.trim_end().lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Percent-encodes everything but RFC 3986 unreserved characters, so any
/// database name yields a valid URL path segment.
fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for byte in s.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(byte));
        } else {
            let _ = write!(out, "%{byte:02X}");
        }
    }
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn parses_passwd() {
        let passwd = "root:x:0:0:root:/root:/bin/bash\n\
                      postgresx:x:7:7::/:/bin/sh\n\
                      postgres:x:101:104:PostgreSQL administrator,,,:/var/lib/postgresql:/bin/bash\n";
        assert_eq!(
            parse_passwd(passwd, "postgres"),
            Some(RunAs { uid: 101, gid: 104 })
        );
        assert_eq!(parse_passwd(passwd, "nobody"), None);
        assert_eq!(
            parse_passwd("postgres:x:bad:1::/:/bin/sh\n", "postgres"),
            None
        );
    }

    #[test]
    fn encodes_database_names() {
        assert_eq!(percent_encode("idmap_test-1.x~"), "idmap_test-1.x~");
        assert_eq!(percent_encode("a b/c%"), "a%20b%2Fc%25");
    }

    #[test]
    fn tail_keeps_last_lines() {
        assert_eq!(tail("a\nb\nc\n", 2), "b\nc");
        assert_eq!(tail("a", 5), "a");
        assert_eq!(tail("", 5), "");
    }

    #[test]
    fn explicit_bin_dir_without_binaries_is_an_error() {
        let err = find_bin_dir(Some(Path::new("/nonexistent/pg/bin"))).unwrap_err();
        assert!(matches!(err, Error::BinariesNotFound { .. }), "{err}");
        assert!(err.to_string().contains("/nonexistent/pg/bin"), "{err}");
    }

    #[test]
    fn port_conflict_is_recognised() {
        let err = Error::ServerStart {
            port: 1,
            output: String::new(),
            log: "LOG:  could not bind IPv4 address \"127.0.0.1\": Address already in use".into(),
        };
        assert!(is_port_conflict(&err));
    }
}
