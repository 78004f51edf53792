//! `idmap-bench`: see the crate docs and BENCHMARKS.md.

use std::process::ExitCode;

use clap::Parser;
use idmap_bench::Cli;

// The server under test runs in this process, so it gets the allocator the `idmap` binary has;
// otherwise the benchmark would measure another allocator than production runs with.
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    // Held for the whole run: dropping it stops exporting traces.
    let _telemetry = idmap::telemetry::init(cli.log_format);
    match idmap_bench::run(cli.args).await {
        Ok(_) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
