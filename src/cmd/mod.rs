//! The command line: `idmap serve`, `idmap migrate`, `idmap dev`, `idmap backfill`,
//! `idmap reconcile`. Each command parses its flags, builds what it needs and turns the outcome
//! into an exit code; the work itself lives in the library's other modules.

#[cfg(feature = "dev")]
pub mod dev;
pub mod jobs;
mod serve;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::config::{ConfigError, DatabaseArgs, ENV_LOG_FORMAT, ServeArgs};
use crate::telemetry::LogFormat;

/// EX_USAGE: a setting is wrong (README "Running in production").
pub const EXIT_BAD_SETTING: u8 = 64;

#[derive(Debug, Parser)]
#[command(
    name = "idmap",
    version,
    about = "Maps Ory identities to internal user records over gRPC"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
    /// Log line format.
    #[arg(
        long,
        global = true,
        env = ENV_LOG_FORMAT,
        value_name = ENV_LOG_FORMAT,
        default_value = "text"
    )]
    pub log_format: LogFormat,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve the gRPC API (and HTTP health endpoints) against PostgreSQL and Ory.
    Serve(Box<ServeArgs>),
    /// Apply pending database migrations and exit.
    Migrate(DatabaseArgs),
    /// Run everything locally: a private PostgreSQL (unless DATABASE_URL is set), a Kratos emulator
    /// seeded with demo identities and sessions, and the server.
    #[cfg(feature = "dev")]
    Dev(Box<dev::DevArgs>),
    /// Link every Ory identity that has no user yet (resumable; see README "Backfill").
    Backfill(Box<jobs::BackfillArgs>),
    /// Find (and with --fix repair) drift between users and Ory identities.
    Reconcile(Box<jobs::ReconcileArgs>),
}

impl Command {
    /// Runs the command to its end.
    pub async fn run(self) -> anyhow::Result<()> {
        match self {
            Self::Serve(args) => serve::serve(*args).await,
            Self::Migrate(args) => serve::migrate(args).await,
            #[cfg(feature = "dev")]
            Self::Dev(args) => dev::run(*args).await,
            Self::Backfill(args) => jobs::backfill(*args).await,
            Self::Reconcile(args) => jobs::reconcile(*args).await,
        }
    }
}

/// The exit code for a command that failed with `error`, which has not been reported yet.
pub fn failure(error: &anyhow::Error) -> ExitCode {
    // The command has printed its summary; the error says why the exit code is not 0.
    if let Some(failed) = error.downcast_ref::<jobs::CommandFailed>() {
        eprintln!("error: {failed}");
        return ExitCode::from(failed.code);
    }
    tracing::error!("{error:#}");
    eprintln!("error: {error:#}");
    if error.downcast_ref::<ConfigError>().is_some() {
        ExitCode::from(EXIT_BAD_SETTING)
    } else {
        ExitCode::FAILURE
    }
}

/// `--help` and `--version` print and succeed as clap would; any other parse failure is a bad
/// setting (a flag or environment variable clap could not accept), so it gets the documented 64
/// instead of clap's 2.
pub fn parse_failure(e: &clap::Error) -> ExitCode {
    use clap::error::ErrorKind;
    let _ = e.print();
    match e.kind() {
        ErrorKind::DisplayHelp | ErrorKind::DisplayVersion => ExitCode::SUCCESS,
        _ => ExitCode::from(EXIT_BAD_SETTING),
    }
}
