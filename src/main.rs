use std::process::ExitCode;

use clap::Parser;

use idmap::cli::{Cli, Command};

fn main() -> ExitCode {
    let cli = Cli::parse();
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
            Command::Dev(args) => idmap::dev::run(*args).await,
            Command::Bench(args) => idmap::bench::run(*args).await.map(|_| ()),
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
                .map_or(ExitCode::FAILURE, |_| ExitCode::from(64))
        }
    }
}
