//! The `clawmesh` binary: parse the command line, run it, turn errors into exit codes.
#![forbid(unsafe_code)]

use clap::Parser;

fn main() {
    quiet_on_broken_pipe();
    let json = clawmesh::cli::output::json_requested();
    let cli = match clawmesh::cli::Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if json && e.use_stderr() => {
            let text = e.to_string();
            let text = text.trim().trim_start_matches("error: ");
            let err = anyhow::Error::new(clawmesh::cli::exit::Failure::new("USAGE", text));
            report(&err, clawmesh::cli::EXIT_ERROR, true);
            std::process::exit(clawmesh::cli::EXIT_ERROR);
        }
        Err(e) => e.exit(),
    };
    // A node host serves one gateway connection: a single-threaded runtime keeps each request
    // on one core (on a small VM a cross-core wakeup costs ~30 µs, more than the request).
    // Gateways and the CLI use a multi-threaded runtime.
    let mut builder = if matches!(cli.command, clawmesh::cli::Command::Node(_)) {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        // Tokio's own TOKIO_WORKER_THREADS, when set, wins (for measuring other counts).
        if std::env::var_os("TOKIO_WORKER_THREADS").is_none() {
            b.worker_threads(2);
        }
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
            let code = e
                .chain()
                .find_map(|c| c.downcast_ref::<clawmesh::cli::exit::Failure>())
                .map_or(clawmesh::cli::EXIT_ERROR, |f| f.exit);
            report(&e, code, json);
            code
        }
    };
    // Don't wait for background tasks (e.g. a dial in flight) once the command is done.
    runtime.shutdown_timeout(std::time::Duration::from_millis(200));
    std::process::exit(code);
}

/// Prints a failed command's error as text on stderr and, with `--json`, also as
/// `{"ok":false,"error":{...}}` on stdout (scripts read one stream).
fn report(e: &anyhow::Error, code: i32, json: bool) {
    if json {
        use std::io::Write as _;
        let doc = clawmesh::cli::output::error_json(e, code);
        let _ = writeln!(std::io::stdout(), "{doc}");
    }
    // The text goes to stderr in both modes: a person watching a script still reads it.
    eprintln!("clawmesh: {e:#}");
}

/// A closed stdout (`clawmesh ... | head`) ends the CLI quietly with 141 (128 + SIGPIPE, what
/// a shell reports for a command killed by SIGPIPE) instead of a panic and a backtrace: Rust
/// ignores SIGPIPE, so the write fails and `println!` panics; this hook recognises that panic.
fn quiet_on_broken_pipe() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let text = info
            .payload()
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| info.payload().downcast_ref::<&str>().copied())
            .unwrap_or("");
        if text.contains("Broken pipe") || text.contains("os error 32") {
            std::process::exit(clawmesh::cli::exit::BROKEN_PIPE);
        }
        default(info);
    }));
}
