//! Logs from every region in one place: spool, ship, collect, and the audit trail.
//!
//! - [`record`]: the record (a tracing event or an audit entry of a `node.invoke`);
//! - [`spool`]: the durable local spool of every gateway, numbered per origin;
//! - [`layer`]: the tracing layer that hands events to the spool without blocking the caller;
//! - [`audit`]: the audit trail's batching writer (off the invoke's path, drops counted);
//! - [`ship`]: batches from the spool to the current primary over the mesh, resumed from the
//!   collector's cursor after any fault, backfilled to a new collector;
//! - [`service`]: the `logs.*` requests between gateways and the mesh router;
//! - [`collector`]: the primary's durable store, deduplicated by (origin, seq), queried by
//!   `clawmesh logs`, with durable export cursors;
//! - [`otlp`]: stored records as an OTLP/HTTP `ExportLogsServiceRequest` (protobuf).

pub mod audit;
pub mod collector;
pub mod layer;
pub mod otlp;
pub mod record;
pub mod service;
pub mod ship;
pub mod spool;

use std::path::{Path, PathBuf};

use rusqlite::Connection;

/// Errors of the spool and the collector's store.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    /// The file exists but is not a healthy SQLite database.
    #[error("log database {path} is corrupt ({reason}); move it away (its records are lost, the gateway starts a new one)")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// SQLite's words.
        reason: String,
    },
    /// Any other SQLite error.
    #[error("log database {path}: {source}")]
    Sqlite {
        /// The file.
        path: PathBuf,
        /// The error.
        source: rusqlite::Error,
    },
    /// A stored row does not decode.
    #[error("log database {path}: bad row in {table}: {reason}")]
    BadRow {
        /// The file.
        path: PathBuf,
        /// Table name.
        table: &'static str,
        /// Why.
        reason: String,
    },
    /// A batch was meant for another store (see [`collector::Collector::ingest`]).
    #[error(
        "batch meant for log store {expected:x}, this is {actual:x}; ask for the cursor again"
    )]
    WrongStore {
        /// The store id the shipper had.
        expected: u64,
        /// This store's id.
        actual: u64,
    },
    /// A pipelined batch arrived before the one it follows was stored.
    #[error(
        "batch for {origin} follows seq {prev}, the store holds {held}; resend from the cursor"
    )]
    OutOfOrder {
        /// The origin.
        origin: String,
        /// What the store holds.
        held: u64,
        /// What the batch needs held first.
        prev: u64,
    },
    /// A record could not be encoded.
    #[error("cannot encode a log record: {0}")]
    Encode(String),
}

impl LogError {
    fn sql(path: &Path, source: rusqlite::Error) -> LogError {
        LogError::Sqlite {
            path: path.to_path_buf(),
            source,
        }
    }
}

/// Opens a log database with WAL and the given `synchronous` mode, checks it, applies `schema`.
fn open_db(path: &Path, synchronous: &str, schema: &str) -> Result<Connection, LogError> {
    let corrupt = |e: rusqlite::Error| LogError::Corrupt {
        path: path.to_path_buf(),
        reason: e.to_string(),
    };
    let conn = Connection::open(path).map_err(|e| LogError::sql(path, e))?;
    let check: String = conn
        .query_row("PRAGMA quick_check", [], |r| r.get(0))
        .map_err(corrupt)?;
    if check != "ok" {
        return Err(LogError::Corrupt {
            path: path.to_path_buf(),
            reason: check,
        });
    }
    // A 16 MiB WAL between checkpoints (SQLite's default is 4 MiB) and a 16 MiB page cache:
    // index pages a batch touches again are copied to the database once per checkpoint, and
    // the insert path rarely reads a page back from the file.
    conn.execute_batch(&format!(
        "PRAGMA journal_mode=WAL; PRAGMA synchronous={synchronous};
         PRAGMA wal_autocheckpoint=4096; PRAGMA cache_size=-16384;"
    ))
    .map_err(corrupt)?;
    conn.execute_batch(schema).map_err(corrupt)?;
    Ok(conn)
}
