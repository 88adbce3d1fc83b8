//! The `clawmesh` binary: parse the command line, run it, turn errors into exit codes.
#![forbid(unsafe_code)]

use clap::Parser;

fn main() {
    let cli = clawmesh::cli::Cli::parse();
    // A node host serves one gateway connection: a single-threaded runtime keeps each request
    // on one core (on a small VM a cross-core wakeup costs ~30 µs, more than the request).
    // Gateways and the CLI use a multi-threaded runtime.
    let mut builder = if matches!(cli.command, clawmesh::cli::Command::Node(_)) {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        b.worker_threads(2);
        b
    };
    let runtime = match builder.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("clawmesh: cannot start the async runtime: {e}");
            std::process::exit(clawmesh::cli::EXIT_ERROR);
        }
    };
    let code = match runtime.block_on(clawmesh::cli::run(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("clawmesh: {e:#}");
            clawmesh::cli::EXIT_ERROR
        }
    };
    // Don't wait for background tasks (e.g. a dial in flight) once the command is done.
    runtime.shutdown_timeout(std::time::Duration::from_millis(200));
    std::process::exit(code);
}
