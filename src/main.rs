use std::process::ExitCode;

use clap::Parser;

use idmap::cmd::Cli;

// tonic, h2 and prost allocate and free per message, often on different worker threads, which
// contends on glibc's malloc arenas; jemalloc's per-thread caches avoid that (BENCHMARKS.md has
// the measurement).
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => return idmap::cmd::parse_failure(&e),
    };
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
    // Inside the runtime: the trace exporter's connection runs on it, also while it sends the
    // last spans when dropped, after the command.
    let telemetry = {
        let _entered = runtime.enter();
        idmap::telemetry::init(cli.log_format)
    };
    let code = match runtime.block_on(cli.command.run()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => idmap::cmd::failure(&e),
    };
    drop(telemetry);
    code
}
