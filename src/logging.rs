//! Logging setup shared by every process kind (gateway, node, CLI): the subscriber, the
//! default filter, and the live filter the shared config (`logging.level`) may replace.
//!
//! It lives apart from the CLI so that a gateway can change its own filter without importing
//! the command line.

use anyhow::{anyhow, Result};
use clawmesh_federation::logs::layer::{Handoff, SpoolLayer};
use clawmesh_federation::logs::record::Level;

/// The default log filter of long-running commands: openraft reports every failed replication
/// attempt to an offline gateway (several lines a second); the mesh already logs the link going
/// down and coming back, so only openraft's errors outside replication are shown.
pub const DEFAULT_LOG: &str = "info,openraft=error,openraft::replication=off";

type FilterHandle =
    tracing_subscriber::reload::Handle<tracing_subscriber::EnvFilter, tracing_subscriber::Registry>;

/// The live log filter, when it came from the default (not `--log` or `RUST_LOG`, which an
/// operator set on purpose and the shared config must not override).
static LOG_FILTER: std::sync::OnceLock<FilterHandle> = std::sync::OnceLock::new();

/// The layer that copies every event the filter lets through into the log spool, once a
/// gateway has opened one ([`attach_spool`]); until then it does nothing.
static SPOOL: std::sync::OnceLock<SpoolLayer> = std::sync::OnceLock::new();

fn spool_layer() -> SpoolLayer {
    // Trace: the spool takes whatever the process's filter lets through, i.e. the configured
    // level.
    SPOOL
        .get_or_init(|| SpoolLayer::unattached(Level::Trace))
        .clone()
}

/// Sends this process's log events (those its filter passes) to `handoff` from now on.
pub fn attach_spool(handoff: Handoff) {
    spool_layer().attach(handoff);
}

/// Whether log lines are JSON objects (`--log-format json`), set once before [`init`].
static JSON_FORMAT: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Chooses the line format for [`init`]: JSON objects (for log shippers) or text.
pub fn set_json_format(json: bool) {
    JSON_FORMAT.store(json, std::sync::atomic::Ordering::Relaxed);
}

/// Installs the process's subscriber: `filter` (`--log`), else `RUST_LOG`, else `default`,
/// written to stderr (and to the log spool once a gateway attaches one), as text (ANSI colour only when stderr is a terminal and `NO_COLOR` is
/// not set, so files and journald get plain lines) or as JSON lines ([`set_json_format`]).
/// The default filter stays reloadable by [`set_log_filter`].
pub fn init(filter: Option<&str>, default: &str) {
    use std::io::IsTerminal as _;
    use tracing_subscriber::layer::SubscriberExt as _;
    use tracing_subscriber::util::SubscriberInitExt as _;
    let explicit = filter
        .map(str::to_string)
        .or_else(|| std::env::var("RUST_LOG").ok());
    let (layer, handle) = tracing_subscriber::reload::Layer::new(
        tracing_subscriber::EnvFilter::new(explicit.as_deref().unwrap_or(default)),
    );
    let colour = std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none();
    let json = JSON_FORMAT.load(std::sync::atomic::Ordering::Relaxed);
    let registry = tracing_subscriber::registry().with(layer);
    let ok = if json {
        registry
            .with(
                tracing_subscriber::fmt::layer()
                    .json()
                    .with_current_span(false)
                    .with_writer(std::io::stderr),
            )
            .with(spool_layer())
            .try_init()
            .is_ok()
    } else {
        registry
            .with(
                tracing_subscriber::fmt::layer()
                    .with_ansi(colour)
                    .with_writer(std::io::stderr),
            )
            .with(spool_layer())
            .try_init()
            .is_ok()
    };
    if ok && explicit.is_none() {
        let _ = LOG_FILTER.set(handle);
    }
}

/// Replaces the log filter (`logging.level` from the shared config). Returns false when the
/// operator chose the filter with `--log` or `RUST_LOG`, which then stays.
pub fn set_log_filter(filter: &str) -> Result<bool> {
    let Some(handle) = LOG_FILTER.get() else {
        return Ok(false);
    };
    let f = tracing_subscriber::EnvFilter::try_new(filter)
        .map_err(|e| anyhow!("not a log filter: {e}"))?;
    handle
        .reload(f)
        .map_err(|e| anyhow!("cannot change the log filter: {e}"))?;
    Ok(true)
}
