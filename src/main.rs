//! The `clawmesh` binary: parse the command line, run it, turn errors into exit codes.
#![forbid(unsafe_code)]

use clap::Parser;

fn main() {
    let cli = clawmesh::cli::Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
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
