use std::process::ExitCode;

use clap::Parser;

use idmap::cli::{Cli, Command};

// glibc's malloc took a fifth of the CPU under load: tonic, h2 and prost allocate and free per
// message, often on different worker threads, which contends on glibc's arenas. With jemalloc the
// same 2-core machine served 27% more Health/Check and ResolveSession calls per second (BENCHMARKS.md).
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// EX_USAGE: a setting is wrong (README "Running in production").
const EXIT_BAD_SETTING: u8 = 64;

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => return parse_failure(&e),
    };
    idmap::telemetry::init(cli.log_format);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async move {
        match cli.command {
            Command::Serve(args) => idmap::cli::serve(args).await,
            Command::Migrate(args) => idmap::cli::migrate(args).await,
            #[cfg(feature = "dev")]
            Command::Dev(args) => idmap::dev::run(*args).await,
            Command::Backfill(args) => idmap::backfill::backfill(*args).await,
            Command::Reconcile(args) => idmap::backfill::reconcile(*args).await,
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // The command has printed its summary; the error says why the exit code is not 0.
            if let Some(failed) = e.downcast_ref::<idmap::backfill::CommandFailed>() {
                eprintln!("error: {failed}");
                return ExitCode::from(failed.code);
            }
            tracing::error!("{e:#}");
            eprintln!("error: {e:#}");
            e.downcast_ref::<idmap::cli::ConfigError>()
                .map_or(ExitCode::FAILURE, |_| ExitCode::from(EXIT_BAD_SETTING))
        }
    }
}

/// `--help` and `--version` print and succeed as clap would; any other parse failure is a bad
/// setting (a flag or environment variable clap could not accept), so it gets the documented 64
/// instead of clap's 2.
fn parse_failure(e: &clap::Error) -> ExitCode {
    use clap::error::ErrorKind;
    let _ = e.print();
    match e.kind() {
        ErrorKind::DisplayHelp | ErrorKind::DisplayVersion => ExitCode::SUCCESS,
        _ => ExitCode::from(EXIT_BAD_SETTING),
    }
}
