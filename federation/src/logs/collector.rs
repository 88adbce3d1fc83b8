//! The collector: the primary's durable store of every origin's records.
//!
//! One SQLite file (`logstore.db`) with `synchronous=FULL`: a batch is written in one
//! transaction and acknowledged only after it commits, so an acknowledged record survives a
//! SIGKILL or a power cut of the collector. Every origin's highest stored sequence number is
//! kept apart from the records (the *cursor*, also in memory), and a record at or below it is a
//! duplicate: a shipper sends those after any fault where it cannot know whether its last
//! batch arrived, and a record the store's own limit removed is never taken again. That test
//! is exact because batches are stored in the order their shipper sent them (each names the
//! sequence number the store must hold first, [`Batch::prev`]) and each origin's records are in
//! sequence order within a batch; so the store needs no unique index on (origin, seq), the
//! most expensive part of an insert (stores created before keep theirs, harmlessly).
//!
//! Each store has a random id, created with the file: a shipper that sees it change (the
//! primary moved, or a collector's disk was replaced) asks for the cursor again and backfills.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use rusqlite::{params, Connection, OptionalExtension};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use super::record::{Audit, Frames, Level, Record, RecordRef};
use super::spool::OriginDrops;
use super::LogError;

/// File name of the store inside a state dir.
pub const STORE_FILE: &str = "logstore.db";

/// Size and age limits of the store.
#[derive(Debug, Clone, Copy)]
pub struct StoreLimits {
    /// Message bytes kept at most; the oldest records go first (and are counted).
    pub max_bytes: u64,
    /// Records older than this go (and are counted).
    pub max_age: Duration,
}

impl Default for StoreLimits {
    fn default() -> Self {
        StoreLimits {
            // 2 GiB: weeks of a small federation's logs on one primary; beyond that, export.
            max_bytes: 2 << 30,
            // 30 days, the usual retention of a log system's hot tier.
            max_age: Duration::from_secs(30 * 24 * 3600),
        }
    }
}

/// A batch as a shipper sends it (`logs.push`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Batch {
    /// The shipping gateway.
    pub gateway: String,
    /// The store id the shipper believes it is talking to (0: any).
    pub store_id: u64,
    /// Records as the spool stores them (postcard [`Record`]s), each origin's in sequence
    /// order: the shipper sends the stored bytes as they are.
    pub records: Frames,
    /// For each origin in the batch, the sequence number the collector must already hold
    /// before it may store this batch (the last one of the shipper's previous batch, or the
    /// cursor it started from). A shipper keeps several batches in flight; this keeps their
    /// commits in order, so the cursor never moves past a batch that was lost.
    pub prev: Vec<(String, u64)>,
    /// The shipper's cumulative drop counters, per origin.
    pub drops: Vec<OriginDrops>,
}

impl Batch {
    /// A batch of `records` (encoded here; shippers send the spool's stored encodings).
    pub fn from_records(
        gateway: &str,
        store_id: u64,
        records: &[Record],
    ) -> Result<Batch, LogError> {
        let mut frames = Frames::default();
        for r in records {
            frames.push(&postcard::to_stdvec(r).map_err(|e| LogError::Encode(e.to_string()))?);
        }
        Ok(Batch {
            gateway: gateway.to_string(),
            store_id,
            records: frames,
            prev: Vec::new(),
            drops: Vec::new(),
        })
    }
}

/// The collector's reply to a batch, sent after the batch is durable.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ack {
    /// The store that holds them.
    pub store_id: u64,
    /// Records newly stored.
    pub stored: u64,
    /// Records it already had.
    pub duplicates: u64,
}

/// What the collector holds: each origin's highest stored sequence number.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cursor {
    /// The store's id.
    pub store_id: u64,
    /// (origin, highest seq).
    pub held: Vec<(String, u64)>,
}

/// Every counter of what limits dropped for one origin, as `clawmesh logs` shows it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DropCount {
    /// The origin.
    pub origin: String,
    /// Dropped by the origin's spool limit.
    pub spool_dropped: u64,
    /// Dropped at the in-memory hand-off (logging faster than the spool writes).
    pub overflow_dropped: u64,
    /// Removed by the store's own size or age limit.
    pub store_dropped: u64,
}

/// A query (`clawmesh logs`). Empty fields match everything.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Query {
    /// Records at or after this time (ms since the epoch).
    pub since_ms: Option<u64>,
    /// Only this gateway (its own records and its nodes').
    pub gateway: Option<String>,
    /// Only this node.
    pub node: Option<String>,
    /// At this level or more severe; audit records always pass.
    pub level: Option<Level>,
    /// Only messages containing this text.
    pub grep: Option<String>,
    /// Only audit records.
    pub audit: bool,
    /// Only records stored after this store position (for following).
    pub after_id: Option<i64>,
    /// At most this many, the newest (in time order).
    pub limit: usize,
    /// When nothing matches yet, wait up to this long for new records (long poll).
    pub wait_ms: u64,
}

/// One record as the store returns it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stored {
    /// Store position (increases with every insert).
    pub id: i64,
    /// The record.
    pub record: Record,
}

/// The answer to a [`Query`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueryReply {
    /// The store that answered (a different id after a failover).
    pub store_id: u64,
    /// Records in time order.
    pub records: Vec<Stored>,
    /// The store's last position (follow from here).
    pub last_id: i64,
    /// Drop counters of every origin that has any.
    pub drops: Vec<DropCount>,
}

struct Inner {
    conn: Connection,
    bytes: u64,
    /// Each origin's highest stored sequence number (the `origins` table, in memory).
    high: HashMap<String, u64>,
}

/// Handle to the collector's store; cheap to clone.
#[derive(Clone)]
pub struct Collector {
    inner: Arc<Mutex<Inner>>,
    store_id: u64,
    limits: StoreLimits,
    path: PathBuf,
    last_id: Arc<watch::Sender<i64>>,
    /// Counts commits: a batch waiting for its predecessor wakes on it.
    commits: Arc<watch::Sender<u64>>,
}

impl std::fmt::Debug for Collector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Collector")
            .field("path", &self.path)
            .field("store_id", &self.store_id)
            .finish()
    }
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS records (
    id INTEGER PRIMARY KEY,
    origin TEXT NOT NULL,
    seq INTEGER NOT NULL,
    ts_ms INTEGER NOT NULL,
    level INTEGER NOT NULL,
    gateway TEXT NOT NULL,
    node TEXT,
    target TEXT NOT NULL,
    message TEXT NOT NULL,
    audit TEXT
);
CREATE INDEX IF NOT EXISTS records_ts ON records(ts_ms);
CREATE TABLE IF NOT EXISTS origins (
    origin TEXT PRIMARY KEY,
    high_seq INTEGER NOT NULL,
    spool_dropped INTEGER NOT NULL DEFAULT 0,
    overflow_dropped INTEGER NOT NULL DEFAULT 0,
    store_dropped INTEGER NOT NULL DEFAULT 0
);
";

/// Bytes a record counts against the store's size limit (text plus a row's overhead).
fn row_bytes(r: &RecordRef) -> u64 {
    // 48: the fixed columns and SQLite's row header, roughly.
    (r.message.len() + r.target.len() + r.origin.len() + 48) as u64
}

impl Collector {
    /// Opens (creating if needed) `<dir>/logstore.db`.
    pub fn open(dir: &Path, limits: StoreLimits) -> Result<Collector, LogError> {
        let path = dir.join(STORE_FILE);
        let conn = super::open_db(&path, "FULL", SCHEMA)?;
        let sql = |e| LogError::sql(&path, e);
        let existing: Option<String> = conn
            .query_row("SELECT value FROM meta WHERE key = 'store_id'", [], |r| {
                r.get(0)
            })
            .optional()
            .map_err(sql)?;
        let store_id = match existing.and_then(|v| v.parse::<u64>().ok()) {
            Some(id) => id,
            None => {
                let id = rand::random::<u64>().max(1);
                conn.execute(
                    "INSERT OR REPLACE INTO meta(key, value) VALUES ('store_id', ?1)",
                    [id.to_string()],
                )
                .map_err(sql)?;
                id
            }
        };
        let bytes: i64 = conn
            .query_row(
                "SELECT COALESCE(SUM(length(message) + length(target) + length(origin) + 48), 0) FROM records",
                [],
                |r| r.get(0),
            )
            .map_err(sql)?;
        let last: i64 = conn
            .query_row("SELECT COALESCE(MAX(id), 0) FROM records", [], |r| r.get(0))
            .map_err(sql)?;
        let high = {
            let mut stmt = conn
                .prepare("SELECT origin, high_seq FROM origins")
                .map_err(sql)?;
            let rows = stmt
                .query_map([], |r| {
                    Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?.max(0) as u64))
                })
                .map_err(sql)?
                .collect::<Result<HashMap<_, _>, _>>()
                .map_err(sql)?;
            rows
        };
        Ok(Collector {
            inner: Arc::new(Mutex::new(Inner {
                conn,
                bytes: bytes.max(0) as u64,
                high,
            })),
            store_id,
            limits,
            path,
            last_id: Arc::new(watch::channel(last).0),
            commits: Arc::new(watch::channel(0).0),
        })
    }

    /// This store's random id.
    pub fn store_id(&self) -> u64 {
        self.store_id
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // SQLite rolls back a transaction a panic interrupted, so a poisoned lock is safe.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Each origin's highest stored sequence number.
    pub fn cursor(&self) -> Result<Cursor, LogError> {
        let g = self.lock();
        let sql = |e| LogError::sql(&self.path, e);
        let mut stmt = g
            .conn
            .prepare("SELECT origin, high_seq FROM origins")
            .map_err(sql)?;
        let held = stmt
            .query_map([], |r| {
                Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?.max(0) as u64))
            })
            .map_err(sql)?
            .collect::<Result<Vec<_>, _>>()
            .map_err(sql)?;
        Ok(Cursor {
            store_id: self.store_id,
            held,
        })
    }

    /// Stores a batch durably (one transaction, fsynced) and says how many were new. A batch
    /// meant for another store (the shipper's cursor came from a store this one replaced) is
    /// refused before anything is written: taking it would leave a hole below its records.
    pub fn ingest(&self, batch: &Batch) -> Result<Ack, LogError> {
        if batch.store_id != 0 && batch.store_id != self.store_id {
            return Err(LogError::WrongStore {
                expected: batch.store_id,
                actual: self.store_id,
            });
        }
        // Decode outside the lock: only the inserts need it.
        let records = batch
            .records
            .iter()
            .map(|b| {
                b.and_then(|b| postcard::from_bytes::<RecordRef>(b).map_err(|e| e.to_string()))
                    .map_err(LogError::Encode)
            })
            .collect::<Result<Vec<_>, _>>()?;
        let mut g = self.lock();
        let inner = &mut *g;
        for (origin, prev) in &batch.prev {
            let held = inner.high.get(origin).copied().unwrap_or(0);
            if held < *prev {
                return Err(LogError::OutOfOrder {
                    origin: origin.clone(),
                    held,
                    prev: *prev,
                });
            }
        }
        let sql = |e| LogError::sql(&self.path, e);
        let tx = inner.conn.transaction().map_err(sql)?;
        let mut stored = 0u64;
        let mut added = 0u64;
        let mut high: HashMap<&str, u64> = HashMap::new();
        {
            let mut ins = tx
                .prepare_cached(
                    "INSERT OR IGNORE INTO records(origin, seq, ts_ms, level, gateway, node, target, message, audit)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
                )
                .map_err(sql)?;
            for r in &records {
                let held = high
                    .get(r.origin)
                    .copied()
                    .or_else(|| inner.high.get(r.origin).copied())
                    .unwrap_or(0);
                if r.seq <= held {
                    continue;
                }
                let audit = match &r.audit {
                    Some(a) => Some(
                        serde_json::to_string(a).map_err(|e| LogError::Encode(e.to_string()))?,
                    ),
                    None => None,
                };
                let n = ins
                    .execute(params![
                        r.origin,
                        r.seq as i64,
                        r.ts_ms as i64,
                        r.level.as_u8(),
                        r.gateway,
                        r.node,
                        r.target,
                        r.message,
                        audit
                    ])
                    .map_err(sql)?;
                if n > 0 {
                    stored += 1;
                    added += row_bytes(r);
                }
                high.insert(r.origin, r.seq);
            }
            let mut up = tx
                .prepare_cached(
                    "INSERT INTO origins(origin, high_seq) VALUES (?1, ?2)
                     ON CONFLICT(origin) DO UPDATE SET high_seq = MAX(high_seq, excluded.high_seq)",
                )
                .map_err(sql)?;
            for (o, h) in &high {
                up.execute(params![o, *h as i64]).map_err(sql)?;
            }
            let mut dr = tx
                .prepare_cached(
                    "INSERT INTO origins(origin, high_seq, spool_dropped, overflow_dropped) VALUES (?1, 0, ?2, ?3)
                     ON CONFLICT(origin) DO UPDATE SET
                       spool_dropped = MAX(spool_dropped, excluded.spool_dropped),
                       overflow_dropped = MAX(overflow_dropped, excluded.overflow_dropped)",
                )
                .map_err(sql)?;
            for d in &batch.drops {
                dr.execute(params![
                    d.origin,
                    d.spool_dropped as i64,
                    d.overflow_dropped as i64
                ])
                .map_err(sql)?;
            }
        }
        tx.commit().map_err(sql)?;
        for (o, h) in high {
            let e = inner.high.entry(o.to_string()).or_default();
            *e = (*e).max(h);
        }
        inner.bytes += added;
        if inner.bytes > self.limits.max_bytes {
            self.enforce_size(inner)?;
        }
        let last: i64 = inner.conn.last_insert_rowid();
        drop(g);
        if stored > 0 {
            self.last_id.send_modify(|v| *v = (*v).max(last));
        }
        self.commits.send_modify(|c| *c += 1);
        Ok(Ack {
            store_id: self.store_id,
            stored,
            duplicates: batch.records.len() as u64 - stored,
        })
    }

    /// The store position up to which the export `name` (e.g. `otlp`) has delivered: kept in
    /// the store itself, so an export resumes where it was after a restart, and a new primary
    /// exports from its own store's cursor.
    pub fn export_cursor(&self, name: &str) -> Result<i64, LogError> {
        let g = self.lock();
        g.conn
            .query_row(
                "SELECT value FROM meta WHERE key = ?1",
                [format!("export.{name}")],
                |r| r.get::<_, String>(0),
            )
            .optional()
            .map(|v| v.and_then(|v| v.parse().ok()).unwrap_or(0))
            .map_err(|e| LogError::sql(&self.path, e))
    }

    /// Records that the export `name` delivered everything up to store position `id`
    /// (durably: written with the store's `synchronous=FULL`).
    pub fn set_export_cursor(&self, name: &str, id: i64) -> Result<(), LogError> {
        let g = self.lock();
        g.conn
            .execute(
                "INSERT OR REPLACE INTO meta(key, value) VALUES (?1, ?2)",
                params![format!("export.{name}"), id.to_string()],
            )
            .map(|_| ())
            .map_err(|e| LogError::sql(&self.path, e))
    }

    /// [`Collector::ingest`] off the async threads, waiting up to `wait` for the batches
    /// before it (its [`Batch::prev`]) to be stored: a shipper's pipelined batches may arrive
    /// on parallel streams in any order, and are stored in theirs.
    pub async fn ingest_in_order(&self, batch: Batch, wait: Duration) -> Result<Ack, LogError> {
        let deadline = tokio::time::Instant::now() + wait;
        let mut commits = self.commits.subscribe();
        let mut batch = batch;
        loop {
            commits.borrow_and_update();
            let c = self.clone();
            let (b, res) = tokio::task::spawn_blocking(move || {
                let r = c.ingest(&batch);
                (batch, r)
            })
            .await
            .map_err(|e| LogError::Encode(format!("ingest task: {e}")))?;
            batch = b;
            match res {
                Err(LogError::OutOfOrder { .. }) if tokio::time::Instant::now() < deadline => {
                    // Woken by the next commit; a predecessor that never comes ends at the
                    // deadline and the shipper resumes from the cursor.
                    let _ = tokio::time::timeout_at(deadline, commits.changed()).await;
                }
                other => return other,
            }
        }
    }

    /// Removes the oldest records down to 90% of the size limit, counted per origin.
    fn enforce_size(&self, inner: &mut Inner) -> Result<(), LogError> {
        let target = self.limits.max_bytes / 10 * 9;
        let need = inner.bytes.saturating_sub(target);
        let sql = |e| LogError::sql(&self.path, e);
        let (last, freed, per_origin) = {
            let mut stmt = inner
                .conn
                .prepare(
                    "SELECT id, origin, length(message) + length(target) + length(origin) + 48
                     FROM records ORDER BY id",
                )
                .map_err(sql)?;
            let mut rows = stmt.query([]).map_err(sql)?;
            let mut freed = 0u64;
            let mut last = None;
            let mut per: HashMap<String, u64> = HashMap::new();
            while freed < need {
                let Some(r) = rows.next().map_err(sql)? else {
                    break;
                };
                last = Some(r.get::<_, i64>(0).map_err(sql)?);
                *per.entry(r.get(1).map_err(sql)?).or_default() += 1;
                freed += r.get::<_, i64>(2).map_err(sql)?.max(0) as u64;
            }
            (last, freed, per)
        };
        if let Some(last) = last {
            self.remove(inner, "id <= ?1", last, &per_origin)?;
            inner.bytes = inner.bytes.saturating_sub(freed);
        }
        Ok(())
    }

    fn remove(
        &self,
        inner: &mut Inner,
        cond: &str,
        arg: i64,
        per_origin: &HashMap<String, u64>,
    ) -> Result<(), LogError> {
        let sql = |e| LogError::sql(&self.path, e);
        let tx = inner.conn.transaction().map_err(sql)?;
        tx.execute(&format!("DELETE FROM records WHERE {cond}"), [arg])
            .map_err(sql)?;
        for (o, n) in per_origin {
            tx.execute(
                "UPDATE origins SET store_dropped = store_dropped + ?2 WHERE origin = ?1",
                params![o, *n as i64],
            )
            .map_err(sql)?;
        }
        tx.commit().map_err(sql)
    }

    /// Applies the age limit at `now_ms`; returns how many records went.
    pub fn prune(&self, now_ms: u64) -> Result<u64, LogError> {
        let mut g = self.lock();
        let inner = &mut *g;
        let sql = |e| LogError::sql(&self.path, e);
        let before = now_ms.saturating_sub(self.limits.max_age.as_millis() as u64) as i64;
        let mut per: HashMap<String, u64> = HashMap::new();
        let mut freed = 0u64;
        {
            let mut stmt = inner
                .conn
                .prepare(
                    "SELECT origin, COUNT(*), SUM(length(message) + length(target) + length(origin) + 48)
                     FROM records WHERE ts_ms < ?1 GROUP BY origin",
                )
                .map_err(sql)?;
            let rows = stmt
                .query_map([before], |r| {
                    Ok((
                        r.get::<_, String>(0)?,
                        r.get::<_, i64>(1)?,
                        r.get::<_, i64>(2)?,
                    ))
                })
                .map_err(sql)?;
            for r in rows {
                let (o, n, b) = r.map_err(sql)?;
                per.insert(o, n.max(0) as u64);
                freed += b.max(0) as u64;
            }
        }
        let total = per.values().sum();
        if total > 0 {
            self.remove(inner, "ts_ms < ?1", before, &per)?;
            inner.bytes = inner.bytes.saturating_sub(freed);
        }
        Ok(total)
    }

    /// Drop counters of every origin that has any.
    pub fn drops(&self) -> Result<Vec<DropCount>, LogError> {
        let g = self.lock();
        let sql = |e| LogError::sql(&self.path, e);
        let mut stmt = g
            .conn
            .prepare(
                "SELECT origin, spool_dropped, overflow_dropped, store_dropped FROM origins
                 WHERE spool_dropped + overflow_dropped + store_dropped > 0 ORDER BY origin",
            )
            .map_err(sql)?;
        let out = stmt
            .query_map([], |r| {
                Ok(DropCount {
                    origin: r.get(0)?,
                    spool_dropped: r.get::<_, i64>(1)?.max(0) as u64,
                    overflow_dropped: r.get::<_, i64>(2)?.max(0) as u64,
                    store_dropped: r.get::<_, i64>(3)?.max(0) as u64,
                })
            })
            .map_err(sql)?
            .collect::<Result<Vec<_>, _>>()
            .map_err(sql)?;
        Ok(out)
    }

    /// Answers a query; with `wait_ms`, waits for a first match up to that long.
    pub async fn query(&self, q: &Query) -> Result<QueryReply, LogError> {
        let mut rx = self.last_id.subscribe();
        // Wait at most 30 s whatever the caller asks: a long poll must end well inside the
        // request deadlines of the hops in between.
        let deadline = tokio::time::Instant::now() + Duration::from_millis(q.wait_ms.min(30_000));
        loop {
            rx.borrow_and_update();
            let reply = self.query_now(q)?;
            if !reply.records.is_empty() || q.wait_ms == 0 {
                return Ok(reply);
            }
            match tokio::time::timeout_at(deadline, rx.changed()).await {
                Ok(Ok(())) => continue,
                _ => return Ok(reply),
            }
        }
    }

    /// Answers a query from what is stored now.
    pub fn query_now(&self, q: &Query) -> Result<QueryReply, LogError> {
        let g = self.lock();
        let sql = |e| LogError::sql(&self.path, e);
        let mut cond = vec!["1".to_string()];
        let mut args: Vec<rusqlite::types::Value> = Vec::new();
        let mut arg = |v: rusqlite::types::Value| {
            args.push(v);
            format!("?{}", args.len())
        };
        if let Some(s) = q.since_ms {
            cond.push(format!("ts_ms >= {}", arg((s as i64).into())));
        }
        if let Some(gw) = &q.gateway {
            cond.push(format!("gateway = {}", arg(gw.clone().into())));
        }
        if let Some(n) = &q.node {
            cond.push(format!("node = {}", arg(n.clone().into())));
        }
        if q.audit {
            cond.push(format!("level = {}", Level::Audit.as_u8()));
        } else if let Some(l) = q.level {
            cond.push(format!(
                "(level <= {} OR level = {})",
                l.as_u8(),
                Level::Audit.as_u8()
            ));
        }
        if let Some(t) = &q.grep {
            cond.push(format!("instr(message, {}) > 0", arg(t.clone().into())));
        }
        if let Some(a) = q.after_id {
            cond.push(format!("id > {}", arg(a.into())));
        }
        // 100 000 at most per answer: the reply must fit one 4 MiB frame after compression
        // (followers page with after_id).
        let limit = q.limit.clamp(1, 100_000) as i64;
        let order = if q.after_id.is_some() {
            // Following: the oldest unseen first, so paging never skips.
            "ORDER BY id ASC"
        } else {
            "ORDER BY ts_ms DESC, id DESC"
        };
        let text = format!(
            "SELECT id, origin, seq, ts_ms, level, gateway, node, target, message, audit
             FROM records WHERE {} {order} LIMIT {limit}",
            cond.join(" AND ")
        );
        let mut stmt = g.conn.prepare(&text).map_err(sql)?;
        let rows = stmt
            .query_map(rusqlite::params_from_iter(args.iter()), |r| {
                Ok((
                    r.get::<_, i64>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, i64>(2)?,
                    r.get::<_, i64>(3)?,
                    r.get::<_, u8>(4)?,
                    r.get::<_, String>(5)?,
                    r.get::<_, Option<String>>(6)?,
                    r.get::<_, String>(7)?,
                    r.get::<_, String>(8)?,
                    r.get::<_, Option<String>>(9)?,
                ))
            })
            .map_err(sql)?;
        let mut records = Vec::new();
        for row in rows {
            let (id, origin, seq, ts, level, gateway, node, target, message, audit) =
                row.map_err(sql)?;
            let bad = |reason: String| LogError::BadRow {
                path: self.path.clone(),
                table: "records",
                reason: format!("row {id}: {reason}"),
            };
            let level = Level::from_u8(level).ok_or_else(|| bad(format!("level {level}")))?;
            let audit: Option<Audit> = match audit {
                Some(a) => Some(serde_json::from_str(&a).map_err(|e| bad(e.to_string()))?),
                None => None,
            };
            records.push(Stored {
                id,
                record: Record {
                    origin,
                    seq: seq.max(0) as u64,
                    ts_ms: ts.max(0) as u64,
                    level,
                    gateway,
                    node,
                    target,
                    message,
                    audit,
                },
            });
        }
        drop(stmt);
        drop(g);
        if q.after_id.is_none() {
            records.reverse();
        }
        Ok(QueryReply {
            store_id: self.store_id,
            records,
            last_id: *self.last_id.borrow(),
            drops: self.drops()?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::logs::record::{now_ms, Outcome};

    static CLOCK: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

    fn rec(origin: &str, seq: u64, level: Level, msg: &str) -> Record {
        let (gateway, node) = match origin.split_once('/') {
            Some((g, n)) => (g.to_string(), Some(n.to_string())),
            None => (origin.to_string(), None),
        };
        Record {
            origin: origin.into(),
            seq,
            // Strictly increasing, in the order the test builds them.
            ts_ms: now_ms() + CLOCK.fetch_add(1, std::sync::atomic::Ordering::SeqCst),
            level,
            gateway,
            node,
            target: "t".into(),
            message: msg.into(),
            audit: None,
        }
    }

    fn batch(records: Vec<Record>) -> Batch {
        Batch::from_records("g", 0, &records).unwrap()
    }

    #[test]
    fn dedupes_by_origin_and_seq_and_keeps_the_cursor() {
        let dir = tempfile::tempdir().unwrap();
        let c = Collector::open(dir.path(), StoreLimits::default()).unwrap();
        let b = batch((1..=5).map(|s| rec("tokyo", s, Level::Info, "m")).collect());
        assert_eq!(c.ingest(&b).unwrap().stored, 5);
        let again = c.ingest(&b).unwrap();
        assert_eq!((again.stored, again.duplicates), (0, 5));
        let b2 = batch(vec![
            rec("tokyo", 5, Level::Info, "m"),
            rec("tokyo", 6, Level::Info, "m"),
            rec("tokyo/n1", 1, Level::Info, "m"),
        ]);
        assert_eq!(c.ingest(&b2).unwrap().stored, 2);
        let mut held = c.cursor().unwrap().held;
        held.sort();
        assert_eq!(held, vec![("tokyo".into(), 6), ("tokyo/n1".into(), 1)]);
        // Durable: the same after reopening, with the same store id.
        let id = c.store_id();
        drop(c);
        let c = Collector::open(dir.path(), StoreLimits::default()).unwrap();
        assert_eq!(c.store_id(), id);
        assert_eq!(
            c.query_now(&Query {
                limit: 100,
                ..Query::default()
            })
            .unwrap()
            .records
            .len(),
            7
        );
    }

    #[test]
    fn queries_filter_by_everything() {
        let dir = tempfile::tempdir().unwrap();
        let c = Collector::open(dir.path(), StoreLimits::default()).unwrap();
        let mut audit = rec("fra", 3, Level::Audit, "ok system.run on n1");
        audit.audit = Some(Audit {
            caller: "device:1".into(),
            entry_gateway: "tokyo".into(),
            node: "n1".into(),
            command: "system.run".into(),
            argv: vec!["true".into()],
            exit_code: Some(0),
            duration_ms: 3,
            outcome: Outcome::Ok,
            key: "k1".into(),
        });
        c.ingest(&batch(vec![
            rec("fra", 1, Level::Warn, "disk low"),
            rec("fra", 2, Level::Debug, "tick"),
            audit.clone(),
            rec("fra/n1", 1, Level::Error, "exec failed"),
            rec("tokyo", 1, Level::Info, "hello"),
        ]))
        .unwrap();
        let q = |q: Query| {
            c.query_now(&Query { limit: 100, ..q })
                .unwrap()
                .records
                .into_iter()
                .map(|s| s.record.message)
                .collect::<Vec<_>>()
        };
        assert_eq!(
            q(Query {
                gateway: Some("tokyo".into()),
                ..Query::default()
            }),
            vec!["hello"]
        );
        assert_eq!(
            q(Query {
                node: Some("n1".into()),
                ..Query::default()
            }),
            vec!["exec failed"]
        );
        assert_eq!(
            q(Query {
                level: Some(Level::Warn),
                ..Query::default()
            }),
            // The audit record was built first, so it is the oldest.
            vec!["ok system.run on n1", "disk low", "exec failed"],
        );
        assert_eq!(
            q(Query {
                audit: true,
                ..Query::default()
            }),
            vec!["ok system.run on n1"]
        );
        assert_eq!(
            q(Query {
                grep: Some("disk".into()),
                ..Query::default()
            }),
            vec!["disk low"]
        );
        let all = c
            .query_now(&Query {
                audit: true,
                limit: 10,
                ..Query::default()
            })
            .unwrap();
        assert_eq!(all.records[0].record.audit, audit.audit);
        // Newest n, still in time order.
        let last2: Vec<String> = c
            .query_now(&Query {
                limit: 2,
                ..Query::default()
            })
            .unwrap()
            .records
            .into_iter()
            .map(|s| s.record.message)
            .collect();
        assert_eq!(last2, vec!["exec failed", "hello"]);
    }

    #[test]
    fn size_limit_counts_what_it_removes_and_drops_travel() {
        let dir = tempfile::tempdir().unwrap();
        let c = Collector::open(
            dir.path(),
            StoreLimits {
                max_bytes: 2_000,
                max_age: Duration::from_secs(3600),
            },
        )
        .unwrap();
        let mut b = batch(
            (1..=40)
                .map(|s| rec("beijing", s, Level::Info, &"x".repeat(50)))
                .collect(),
        );
        b.drops = vec![OriginDrops {
            origin: "beijing".into(),
            spool_dropped: 1204,
            overflow_dropped: 2,
        }];
        c.ingest(&b).unwrap();
        let d = c.drops().unwrap();
        assert_eq!(d[0].spool_dropped, 1204);
        assert_eq!(d[0].overflow_dropped, 2);
        let held = c
            .query_now(&Query {
                limit: 1000,
                ..Query::default()
            })
            .unwrap()
            .records
            .len() as u64;
        assert_eq!(held + d[0].store_dropped, 40);
        assert!(d[0].store_dropped > 0);
        // Removed records are not taken again: the cursor still says 40.
        assert_eq!(c.cursor().unwrap().held, vec![("beijing".into(), 40)]);
        // An older counter never lowers a newer one.
        b.drops[0].spool_dropped = 5;
        b.records = Frames::default();
        c.ingest(&b).unwrap();
        assert_eq!(c.drops().unwrap()[0].spool_dropped, 1204);
    }

    #[tokio::test]
    async fn a_pipelined_batch_waits_for_its_predecessor_and_a_lost_one_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let c = Collector::open(dir.path(), StoreLimits::default()).unwrap();
        let first = batch((1..=3).map(|s| rec("tokyo", s, Level::Info, "a")).collect());
        let mut second = batch((4..=6).map(|s| rec("tokyo", s, Level::Info, "b")).collect());
        second.prev = vec![("tokyo".into(), 3)];
        // The second arrives first: it is held, not stored ahead (the cursor must not pass
        // records that may never come).
        assert!(matches!(
            c.ingest(&second),
            Err(LogError::OutOfOrder {
                held: 0,
                prev: 3,
                ..
            })
        ));
        let c2 = c.clone();
        let waiting =
            tokio::spawn(async move { c2.ingest_in_order(second, Duration::from_secs(5)).await });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(c.cursor().unwrap().held, vec![]);
        c.ingest_in_order(first, Duration::from_secs(5))
            .await
            .unwrap();
        assert_eq!(waiting.await.unwrap().unwrap().stored, 3);
        assert_eq!(c.cursor().unwrap().held, vec![("tokyo".into(), 6)]);
        // A batch whose predecessor never comes is refused at the deadline.
        let mut orphan = batch(vec![rec("tokyo", 9, Level::Info, "c")]);
        orphan.prev = vec![("tokyo".into(), 8)];
        assert!(matches!(
            c.ingest_in_order(orphan, Duration::from_millis(100)).await,
            Err(LogError::OutOfOrder { held: 6, .. })
        ));
    }

    #[tokio::test]
    async fn follow_wakes_on_new_records() {
        let dir = tempfile::tempdir().unwrap();
        let c = Collector::open(dir.path(), StoreLimits::default()).unwrap();
        c.ingest(&batch(vec![rec("a", 1, Level::Info, "old")]))
            .unwrap();
        let last = c
            .query_now(&Query {
                limit: 10,
                ..Query::default()
            })
            .unwrap()
            .last_id;
        let c2 = c.clone();
        let waiter = tokio::spawn(async move {
            c2.query(&Query {
                after_id: Some(last),
                wait_ms: 10_000,
                limit: 10,
                ..Query::default()
            })
            .await
            .unwrap()
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        c.ingest(&batch(vec![rec("a", 2, Level::Info, "new")]))
            .unwrap();
        let r = waiter.await.unwrap();
        assert_eq!(r.records.len(), 1);
        assert_eq!(r.records[0].record.message, "new");
    }
}
