//! The durable local spool: every record this gateway (or one of its nodes) logged, numbered
//! per origin, kept until the collector acknowledges it and then for a retention window, so a
//! new collector can backfill what the old one held.
//!
//! One SQLite file (`logspool.db`), apart from `state.db` so that a burst of log writes never
//! queues behind a raft append. WAL with `synchronous=NORMAL`: a killed process loses nothing
//! that was appended (the WAL is in the OS cache); a power cut may lose the last appends, which
//! the next start then numbers again from the last durable sequence number.
//!
//! Limits: `max_bytes` of record bodies and `max_age` for unacknowledged records. Acknowledged
//! records go first (they are delivered); only then are unacknowledged ones dropped, oldest
//! first, and every one of those is counted against its origin (`spool_dropped`), shipped with
//! the next batch and shown by `clawmesh logs`. Records the in-memory hand-off could not take
//! are counted too (`overflow_dropped`).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use std::sync::atomic::{AtomicU64, Ordering};

use rusqlite::{params, Connection};
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;

use super::record::{Entry, Frames, Record};
use super::LogError;

/// File name of the spool inside a state dir.
pub const SPOOL_FILE: &str = "logspool.db";

/// Size and age limits of a spool.
#[derive(Debug, Clone, Copy)]
pub struct SpoolLimits {
    /// Record bytes kept at most (acknowledged ones are dropped first).
    pub max_bytes: u64,
    /// An unacknowledged record older than this is dropped (and counted).
    pub max_age: Duration,
    /// How long an acknowledged record stays, for a new collector to backfill from.
    pub retain_acked: Duration,
}

impl Default for SpoolLimits {
    fn default() -> Self {
        SpoolLimits {
            // 256 MiB: about two million typical records, hours of a busy gateway's logs
            // through a long partition, yet small beside a gateway's disk.
            max_bytes: 256 << 20,
            // A week: longer than any partition an operator would leave unattended.
            max_age: Duration::from_secs(7 * 24 * 3600),
            // A day of acknowledged records: a collector's disk destroyed within a day of a
            // record being acknowledged does not lose it (the new collector backfills).
            retain_acked: Duration::from_secs(24 * 3600),
        }
    }
}

/// What limits dropped for one origin, cumulative since the spool was created.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct OriginDrops {
    /// The origin (`gateway` or `gateway/node`).
    pub origin: String,
    /// Unacknowledged records the spool's size or age limit dropped.
    pub spool_dropped: u64,
    /// Records the in-memory hand-off had no room for.
    pub overflow_dropped: u64,
}

/// A batch read from the spool for shipping.
#[derive(Debug, Clone, Default)]
pub struct Pending {
    /// The records' stored encodings (postcard [`Record`]s) in spool order, each origin's in
    /// sequence order: shipped as they are, never decoded and encoded again on the way.
    pub bodies: Frames,
    /// Each origin in the batch with the first and last sequence number it has there.
    pub origins: HashMap<String, (u64, u64)>,
    /// The spool position up to which everything is either in `records` or already held by
    /// the collector; acknowledging the batch acknowledges up to here.
    pub upto: i64,
    /// Whether the spool has more after `upto` (the batch hit a cap).
    pub more: bool,
    /// Record body bytes in the batch.
    pub bytes: usize,
}

impl Pending {
    /// The records, decoded (tests and tools; shipping sends [`Pending::bodies`] as is).
    pub fn records(&self) -> Result<Vec<Record>, LogError> {
        self.bodies.records().map_err(LogError::Encode)
    }
}

/// Records not yet acknowledged by a collector: the shipping lag of one gateway.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lag {
    /// Records spooled and not yet acknowledged.
    pub unacked: u64,
    /// Source time of the oldest of them (ms since the epoch), if any.
    pub oldest_ts_ms: Option<u64>,
}

impl Lag {
    /// Age of the oldest unacknowledged record at `now_ms` (0 when there is none).
    pub fn oldest_age_ms(&self, now_ms: u64) -> u64 {
        self.oldest_ts_ms
            .map(|t| now_ms.saturating_sub(t))
            .unwrap_or(0)
    }
}

/// Counters of the spool, for status lines and benchmarks.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SpoolStats {
    /// Records held.
    pub records: u64,
    /// Of those, not yet acknowledged.
    pub unacked: u64,
    /// Body bytes held.
    pub bytes: u64,
}

#[derive(Default)]
struct OriginState {
    next_seq: u64,
    spool_dropped: u64,
    overflow_dropped: u64,
}

struct Inner {
    conn: Connection,
    origins: HashMap<String, OriginState>,
    bytes: u64,
    /// Every record at or below this spool position is acknowledged (acks are always a
    /// prefix of the spool, so one number says it, instead of a flag on every row).
    acked_upto: i64,
}

/// Wakes the shipper when a full batch is waiting.
#[derive(Debug, Default)]
struct Kick {
    notify: Arc<Notify>,
    threshold: AtomicU64,
    count: AtomicU64,
}

/// Handle to the spool; cheap to clone, safe to share between threads.
#[derive(Clone)]
pub struct Spool {
    inner: Arc<Mutex<Inner>>,
    kick: Arc<Kick>,
    limits: SpoolLimits,
    path: PathBuf,
}

impl std::fmt::Debug for Spool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Spool").field("path", &self.path).finish()
    }
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS records (
    id INTEGER PRIMARY KEY,
    origin TEXT NOT NULL,
    seq INTEGER NOT NULL,
    ts_ms INTEGER NOT NULL,
    acked_ms INTEGER NOT NULL DEFAULT 0,
    body BLOB NOT NULL
);
DROP INDEX IF EXISTS records_acked;
CREATE TABLE IF NOT EXISTS acks (
    upto INTEGER PRIMARY KEY,
    acked_ms INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS origins (
    origin TEXT PRIMARY KEY,
    next_seq INTEGER NOT NULL,
    spool_dropped INTEGER NOT NULL,
    overflow_dropped INTEGER NOT NULL
);
";

impl Spool {
    /// Opens (creating if needed) `<dir>/logspool.db`; a damaged file is an error, never reset.
    pub fn open(dir: &Path, limits: SpoolLimits) -> Result<Spool, LogError> {
        let path = dir.join(SPOOL_FILE);
        let conn = super::open_db(&path, "NORMAL", SCHEMA)?;
        let sql = |e| LogError::sql(&path, e);
        let mut origins = HashMap::new();
        {
            let mut stmt = conn
                .prepare("SELECT origin, next_seq, spool_dropped, overflow_dropped FROM origins")
                .map_err(sql)?;
            let rows = stmt
                .query_map([], |r| {
                    Ok((
                        r.get::<_, String>(0)?,
                        r.get::<_, i64>(1)?,
                        r.get::<_, i64>(2)?,
                        r.get::<_, i64>(3)?,
                    ))
                })
                .map_err(sql)?;
            for row in rows {
                let (o, next, sd, od) = row.map_err(sql)?;
                origins.insert(
                    o,
                    OriginState {
                        next_seq: next.max(1) as u64,
                        spool_dropped: sd.max(0) as u64,
                        overflow_dropped: od.max(0) as u64,
                    },
                );
            }
        }
        // The origins row is written in the same transaction as the records, but a record row
        // is the ground truth: never hand out a sequence number a stored record already has.
        {
            let mut stmt = conn
                .prepare("SELECT origin, MAX(seq) FROM records GROUP BY origin")
                .map_err(sql)?;
            let rows = stmt
                .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))
                .map_err(sql)?;
            for row in rows {
                let (o, max) = row.map_err(sql)?;
                let st = origins.entry(o).or_default();
                st.next_seq = st.next_seq.max(max.max(0) as u64 + 1);
            }
        }
        let bytes: i64 = conn
            .query_row(
                "SELECT COALESCE(SUM(length(body)), 0) FROM records",
                [],
                |r| r.get(0),
            )
            .map_err(sql)?;
        // Acknowledgements: one row per ack (position, time). A spool written before the acks
        // table existed kept a time on each acknowledged row (`acked_ms`): carry it over once.
        let mut acked_upto: i64 = conn
            .query_row("SELECT COALESCE(MAX(upto), 0) FROM acks", [], |r| r.get(0))
            .map_err(sql)?;
        if acked_upto == 0 {
            let (old_upto, old_ms): (i64, i64) = conn
                .query_row(
                    "SELECT COALESCE(MAX(id), 0), COALESCE(MAX(acked_ms), 0) FROM records
                     WHERE acked_ms > 0",
                    [],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )
                .map_err(sql)?;
            if old_upto > 0 {
                conn.execute(
                    "INSERT OR REPLACE INTO acks(upto, acked_ms) VALUES (?1, ?2)",
                    params![old_upto, old_ms],
                )
                .map_err(sql)?;
                acked_upto = old_upto;
            }
        }
        Ok(Spool {
            inner: Arc::new(Mutex::new(Inner {
                conn,
                origins,
                bytes: bytes.max(0) as u64,
                acked_upto,
            })),
            kick: Arc::new(Kick {
                threshold: AtomicU64::new(u64::MAX),
                ..Kick::default()
            }),
            limits,
            path,
        })
    }

    /// The notifier the shipper waits on: woken whenever `batch` records were appended since
    /// the last wake, so a full batch leaves without waiting for the interval.
    pub fn kick_handle(&self, batch: u64) -> Arc<Notify> {
        self.kick.threshold.store(batch.max(1), Ordering::Relaxed);
        self.kick.notify.clone()
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The limits in force.
    pub fn limits(&self) -> SpoolLimits {
        self.limits
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // SQLite rolls back a transaction a panic interrupted, so a poisoned lock is safe.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Appends entries logged at `gateway` (a node's entries get origin `gateway/node`),
    /// numbering each origin's records in order, in one transaction; then applies the size
    /// limit. Returns how many were appended.
    pub fn append(&self, gateway: &str, entries: Vec<Entry>) -> Result<usize, LogError> {
        if entries.is_empty() {
            return Ok(0);
        }
        let n = entries.len();
        let mut g = self.lock();
        let inner = &mut *g;
        let sql = |e| LogError::sql(&self.path, e);
        let tx = inner.conn.transaction().map_err(sql)?;
        let mut touched: HashMap<String, ()> = HashMap::new();
        let mut added = 0u64;
        {
            let mut ins = tx
                .prepare_cached(
                    "INSERT INTO records(origin, seq, ts_ms, body) VALUES (?1, ?2, ?3, ?4)",
                )
                .map_err(sql)?;
            for e in entries {
                let origin = origin_of(gateway, e.node.as_deref());
                let st = inner.origins.entry(origin.clone()).or_default();
                if st.next_seq == 0 {
                    st.next_seq = 1;
                }
                let seq = st.next_seq;
                let rec = Record {
                    origin: origin.clone(),
                    seq,
                    ts_ms: e.ts_ms,
                    level: e.level,
                    gateway: gateway.to_string(),
                    node: e.node,
                    target: e.target,
                    message: e.message,
                    audit: e.audit,
                };
                let body =
                    postcard::to_stdvec(&rec).map_err(|e| LogError::Encode(e.to_string()))?;
                ins.execute(params![origin, seq as i64, rec.ts_ms as i64, body])
                    .map_err(sql)?;
                st.next_seq += 1;
                added += body.len() as u64;
                touched.insert(origin, ());
            }
        }
        for origin in touched.keys() {
            save_origin(&tx, origin, &inner.origins[origin]).map_err(sql)?;
        }
        tx.commit().map_err(sql)?;
        inner.bytes += added;
        if inner.bytes > self.limits.max_bytes {
            self.enforce_size(inner)?;
        }
        drop(g);
        let count = self.kick.count.fetch_add(n as u64, Ordering::Relaxed) + n as u64;
        if count >= self.kick.threshold.load(Ordering::Relaxed) {
            self.kick.count.store(0, Ordering::Relaxed);
            self.kick.notify.notify_one();
        }
        Ok(n)
    }

    /// Counts records of `origin` that the in-memory hand-off dropped.
    pub fn add_overflow(&self, origin: &str, n: u64) -> Result<(), LogError> {
        if n == 0 {
            return Ok(());
        }
        let mut g = self.lock();
        let inner = &mut *g;
        let st = inner.origins.entry(origin.to_string()).or_default();
        if st.next_seq == 0 {
            st.next_seq = 1;
        }
        st.overflow_dropped += n;
        save_origin(&inner.conn, origin, st).map_err(|e| LogError::sql(&self.path, e))
    }

    /// Drops down to 90% of the size limit (so the next append does not prune again):
    /// acknowledged records first, then the oldest unacknowledged, counted per origin.
    fn enforce_size(&self, inner: &mut Inner) -> Result<(), LogError> {
        let target = self.limits.max_bytes / 10 * 9;
        let sql = |e| LogError::sql(&self.path, e);
        for acked_pass in [true, false] {
            if inner.bytes <= target {
                break;
            }
            let need = inner.bytes - target;
            let (last_id, freed, per_origin) = {
                // Acknowledged records are the prefix up to `acked_upto`.
                let bound = if acked_pass {
                    inner.acked_upto
                } else {
                    i64::MAX
                };
                let mut stmt = inner
                    .conn
                    .prepare(
                        "SELECT id, origin, length(body) FROM records WHERE id <= ?1 ORDER BY id",
                    )
                    .map_err(sql)?;
                let mut rows = stmt.query([bound]).map_err(sql)?;
                let mut freed = 0u64;
                let mut last = None;
                let mut per_origin: HashMap<String, u64> = HashMap::new();
                while freed < need {
                    let Some(r) = rows.next().map_err(sql)? else {
                        break;
                    };
                    let id: i64 = r.get(0).map_err(sql)?;
                    let origin: String = r.get(1).map_err(sql)?;
                    let len: i64 = r.get(2).map_err(sql)?;
                    freed += len.max(0) as u64;
                    last = Some(id);
                    *per_origin.entry(origin).or_default() += 1;
                }
                (last, freed, per_origin)
            };
            let Some(last_id) = last_id else { continue };
            let tx = inner.conn.transaction().map_err(sql)?;
            tx.execute("DELETE FROM records WHERE id <= ?1", [last_id])
                .map_err(sql)?;
            if !acked_pass {
                for (origin, n) in &per_origin {
                    let st = inner.origins.entry(origin.clone()).or_default();
                    st.spool_dropped += n;
                    save_origin(&tx, origin, st).map_err(sql)?;
                }
            }
            tx.commit().map_err(sql)?;
            inner.bytes = inner.bytes.saturating_sub(freed);
        }
        Ok(())
    }

    /// Applies the age limits at `now_ms`: acknowledged records past the retention window go;
    /// unacknowledged ones past `max_age` go and are counted. Returns how many were dropped
    /// unacknowledged.
    pub fn prune(&self, now_ms: u64) -> Result<u64, LogError> {
        let mut g = self.lock();
        let inner = &mut *g;
        let sql = |e| LogError::sql(&self.path, e);
        let acked_before =
            now_ms.saturating_sub(self.limits.retain_acked.as_millis() as u64) as i64;
        let old_before = now_ms.saturating_sub(self.limits.max_age.as_millis() as u64) as i64;
        let tx = inner.conn.transaction().map_err(sql)?;
        let mut per_origin: Vec<(String, i64, i64)> = Vec::new();
        {
            let mut stmt = tx
                .prepare(
                    "SELECT origin, COUNT(*), SUM(length(body)) FROM records
                     WHERE id > ?2 AND ts_ms < ?1 GROUP BY origin",
                )
                .map_err(sql)?;
            let rows = stmt
                .query_map(params![old_before, inner.acked_upto], |r| {
                    Ok((r.get(0)?, r.get(1)?, r.get(2)?))
                })
                .map_err(sql)?;
            for r in rows {
                per_origin.push(r.map_err(sql)?);
            }
        }
        // The newest acknowledgement older than the retention window: everything up to its
        // position has been delivered long enough.
        let expired: i64 = tx
            .query_row(
                "SELECT COALESCE(MAX(upto), 0) FROM acks WHERE acked_ms < ?1",
                [acked_before],
                |r| r.get(0),
            )
            .map_err(sql)?;
        let acked_bytes: i64 = tx
            .query_row(
                "SELECT COALESCE(SUM(length(body)), 0) FROM records WHERE id <= ?1",
                [expired],
                |r| r.get(0),
            )
            .map_err(sql)?;
        tx.execute("DELETE FROM records WHERE id <= ?1", [expired])
            .map_err(sql)?;
        // Older ack rows say nothing the expired one does not; the newest row stays (it is
        // `acked_upto` after a restart).
        tx.execute("DELETE FROM acks WHERE upto < ?1", [expired])
            .map_err(sql)?;
        tx.execute(
            "DELETE FROM records WHERE id > ?2 AND ts_ms < ?1",
            params![old_before, inner.acked_upto],
        )
        .map_err(sql)?;
        let mut dropped = 0u64;
        let mut freed = acked_bytes.max(0) as u64;
        for (origin, n, bytes) in &per_origin {
            let st = inner.origins.entry(origin.clone()).or_default();
            st.spool_dropped += *n as u64;
            dropped += *n as u64;
            freed += (*bytes).max(0) as u64;
            save_origin(&tx, origin, st).map_err(sql)?;
        }
        tx.commit().map_err(sql)?;
        inner.bytes = inner.bytes.saturating_sub(freed);
        Ok(dropped)
    }

    /// Reads the next batch after spool position `after`, skipping records the collector
    /// already holds (`seq <= held[origin]`), up to `max_records` and `max_bytes`.
    pub fn pending(
        &self,
        after: i64,
        held: &HashMap<String, u64>,
        max_records: usize,
        max_bytes: usize,
    ) -> Result<Pending, LogError> {
        let g = self.lock();
        let sql = |e| LogError::sql(&self.path, e);
        // Read a little past the cap to learn whether more is waiting.
        let mut stmt = g
            .conn
            .prepare_cached(
                "SELECT id, origin, seq, body FROM records WHERE id > ?1 ORDER BY id LIMIT ?2",
            )
            .map_err(sql)?;
        let mut out = Pending {
            upto: after,
            ..Pending::default()
        };
        let mut cursor = after;
        loop {
            // Skipped rows (already held) do not count toward the cap, so scan in pages.
            let page = (max_records + 1) as i64;
            let mut rows = stmt.query(params![cursor, page]).map_err(sql)?;
            let mut seen = 0i64;
            while let Some(r) = rows.next().map_err(sql)? {
                seen += 1;
                let id: i64 = r.get(0).map_err(sql)?;
                let origin: String = r.get(1).map_err(sql)?;
                let seq: i64 = r.get(2).map_err(sql)?;
                cursor = id;
                if held.get(&origin).is_some_and(|h| seq.max(0) as u64 <= *h) {
                    out.upto = id;
                    continue;
                }
                let body: &[u8] =
                    r.get_ref(3)
                        .and_then(|v| Ok(v.as_blob()?))
                        .map_err(|e| LogError::BadRow {
                            path: self.path.clone(),
                            table: "records",
                            reason: format!("row {id}: {e}"),
                        })?;
                if out.bodies.len() >= max_records
                    || (!out.bodies.is_empty() && out.bytes + body.len() > max_bytes)
                {
                    out.more = true;
                    return Ok(out);
                }
                let seq = seq.max(0) as u64;
                out.origins
                    .entry(origin)
                    .and_modify(|e| e.1 = seq)
                    .or_insert((seq, seq));
                out.bytes += body.len();
                out.bodies.push(body);
                out.upto = id;
            }
            if seen < page {
                return Ok(out);
            }
        }
    }

    /// Marks every record up to spool position `upto` acknowledged (its retention window
    /// starts now).
    pub fn ack(&self, upto: i64, now_ms: u64) -> Result<(), LogError> {
        let mut g = self.lock();
        if upto <= g.acked_upto {
            return Ok(());
        }
        g.conn
            .prepare_cached("INSERT OR REPLACE INTO acks(upto, acked_ms) VALUES (?1, ?2)")
            .and_then(|mut s| s.execute(params![upto, now_ms.max(1) as i64]))
            .map_err(|e| LogError::sql(&self.path, e))?;
        g.acked_upto = upto;
        Ok(())
    }

    /// What is not acknowledged yet: how many records, and the time of the oldest (the
    /// shipping lag a status page and metrics show).
    pub fn lag(&self) -> Result<Lag, LogError> {
        let g = self.lock();
        let (records, oldest): (i64, Option<i64>) = g
            .conn
            .query_row(
                "SELECT COUNT(*), MIN(ts_ms) FROM records WHERE id > ?1",
                [g.acked_upto],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .map_err(|e| LogError::sql(&self.path, e))?;
        Ok(Lag {
            unacked: records.max(0) as u64,
            oldest_ts_ms: oldest.map(|t| t.max(0) as u64),
        })
    }

    /// Every origin's drop counters.
    pub fn drops(&self) -> Vec<OriginDrops> {
        let g = self.lock();
        let mut out: Vec<OriginDrops> = g
            .origins
            .iter()
            .map(|(o, st)| OriginDrops {
                origin: o.clone(),
                spool_dropped: st.spool_dropped,
                overflow_dropped: st.overflow_dropped,
            })
            .collect();
        out.sort_by(|a, b| a.origin.cmp(&b.origin));
        out
    }

    /// Record counts and bytes held.
    pub fn stats(&self) -> Result<SpoolStats, LogError> {
        let g = self.lock();
        let (records, unacked): (i64, i64) = g
            .conn
            .query_row(
                "SELECT COUNT(*), COALESCE(SUM(id > ?1), 0) FROM records",
                [g.acked_upto],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .map_err(|e| LogError::sql(&self.path, e))?;
        Ok(SpoolStats {
            records: records.max(0) as u64,
            unacked: unacked.max(0) as u64,
            bytes: g.bytes,
        })
    }

    /// When the oldest record not yet acknowledged by a collector was logged (ms since the
    /// epoch), if any: the shipping lag in time (the `log-lag` alert rule).
    pub fn oldest_unacked_ms(&self) -> Result<Option<u64>, LogError> {
        Ok(self.lag()?.oldest_ts_ms)
    }
}

/// The sequence origin of an entry logged at `gateway` by `node` (or the gateway itself).
pub fn origin_of(gateway: &str, node: Option<&str>) -> String {
    match node {
        Some(n) => format!("{gateway}/{n}"),
        None => gateway.to_string(),
    }
}

fn save_origin(conn: &Connection, origin: &str, st: &OriginState) -> rusqlite::Result<()> {
    conn.prepare_cached(
        "INSERT INTO origins(origin, next_seq, spool_dropped, overflow_dropped)
         VALUES (?1, ?2, ?3, ?4)
         ON CONFLICT(origin) DO UPDATE SET next_seq = excluded.next_seq,
           spool_dropped = excluded.spool_dropped, overflow_dropped = excluded.overflow_dropped",
    )?
    .execute(params![
        origin,
        st.next_seq as i64,
        st.spool_dropped as i64,
        st.overflow_dropped as i64
    ])
    .map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::logs::record::{now_ms, Level};

    fn entry(msg: &str, node: Option<&str>) -> Entry {
        Entry {
            ts_ms: now_ms(),
            level: Level::Info,
            node: node.map(str::to_string),
            target: "t".into(),
            message: msg.into(),
            audit: None,
        }
    }

    #[test]
    fn numbers_per_origin_and_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let s = Spool::open(dir.path(), SpoolLimits::default()).unwrap();
        s.append(
            "tokyo",
            vec![entry("a", None), entry("b", Some("n1")), entry("c", None)],
        )
        .unwrap();
        drop(s);
        let s = Spool::open(dir.path(), SpoolLimits::default()).unwrap();
        s.append("tokyo", vec![entry("d", None)]).unwrap();
        let p = s.pending(0, &HashMap::new(), 100, 1 << 20).unwrap();
        let seqs: Vec<(String, u64)> = p
            .records()
            .unwrap()
            .iter()
            .map(|r| (r.origin.clone(), r.seq))
            .collect();
        assert_eq!(
            seqs,
            vec![
                ("tokyo".into(), 1),
                ("tokyo/n1".into(), 1),
                ("tokyo".into(), 2),
                ("tokyo".into(), 3)
            ]
        );
        assert!(!p.more);
    }

    #[test]
    fn pending_skips_what_the_collector_holds_and_respects_caps() {
        let dir = tempfile::tempdir().unwrap();
        let s = Spool::open(dir.path(), SpoolLimits::default()).unwrap();
        s.append("a", (0..10).map(|i| entry(&i.to_string(), None)).collect())
            .unwrap();
        let held = HashMap::from([("a".to_string(), 4u64)]);
        let p = s.pending(0, &held, 3, 1 << 20).unwrap();
        assert_eq!(
            p.records()
                .unwrap()
                .iter()
                .map(|r| r.seq)
                .collect::<Vec<_>>(),
            vec![5, 6, 7]
        );
        assert!(p.more);
        let p2 = s.pending(p.upto, &held, 100, 1 << 20).unwrap();
        assert_eq!(
            p2.records()
                .unwrap()
                .iter()
                .map(|r| r.seq)
                .collect::<Vec<_>>(),
            vec![8, 9, 10]
        );
        // Everything held: nothing to send, but the position moves past it.
        let all = HashMap::from([("a".to_string(), 10u64)]);
        let p3 = s.pending(0, &all, 2, 1 << 20).unwrap();
        assert!(p3.bodies.is_empty());
        assert_eq!(p3.upto, p2.upto);
    }

    #[test]
    fn oldest_unacked_is_the_shipping_lag() {
        let dir = tempfile::tempdir().unwrap();
        let s = Spool::open(dir.path(), SpoolLimits::default()).unwrap();
        assert_eq!(s.oldest_unacked_ms().unwrap(), None);
        let before = now_ms();
        s.append("beijing", vec![entry("a", None), entry("b", None)])
            .unwrap();
        let oldest = s.oldest_unacked_ms().unwrap().unwrap();
        assert!(oldest + 1000 >= before, "{oldest} vs {before}");
        let p = s.pending(0, &HashMap::new(), 1000, 1 << 20).unwrap();
        s.ack(p.upto, now_ms()).unwrap();
        assert_eq!(s.oldest_unacked_ms().unwrap(), None);
    }

    #[test]
    fn size_limit_drops_acked_first_then_counts_unacked() {
        let dir = tempfile::tempdir().unwrap();
        let limits = SpoolLimits {
            max_bytes: 4000,
            ..SpoolLimits::default()
        };
        let s = Spool::open(dir.path(), limits).unwrap();
        let big = "x".repeat(90);
        s.append("beijing", (0..20).map(|_| entry(&big, None)).collect())
            .unwrap();
        let p = s.pending(0, &HashMap::new(), 1000, 1 << 20).unwrap();
        s.ack(p.upto, now_ms()).unwrap();
        // 20 acked records (~2 KB); 40 more push past 4 KB: the acked ones go first.
        s.append("beijing", (0..25).map(|_| entry(&big, None)).collect())
            .unwrap();
        assert_eq!(s.drops()[0].spool_dropped, 0, "acked records go first");
        s.append("beijing", (0..40).map(|_| entry(&big, None)).collect())
            .unwrap();
        let d = s.drops();
        assert!(d[0].spool_dropped > 0, "{d:?}");
        let st = s.stats().unwrap();
        assert!(st.bytes <= 4000, "{st:?}");
        // What remains plus what was dropped is what was appended unacked.
        assert_eq!(st.unacked + d[0].spool_dropped, 65);
        // The counter survives a restart.
        drop(s);
        let s = Spool::open(dir.path(), limits).unwrap();
        assert_eq!(s.drops(), d);
    }

    #[test]
    fn lag_counts_what_is_not_acknowledged_and_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let s = Spool::open(dir.path(), SpoolLimits::default()).unwrap();
        assert_eq!(s.lag().unwrap(), Lag::default());
        let t0 = now_ms();
        s.append("a", (0..5).map(|i| entry(&i.to_string(), None)).collect())
            .unwrap();
        let p = s.pending(0, &HashMap::new(), 3, 1 << 20).unwrap();
        s.ack(p.upto, t0).unwrap();
        let lag = s.lag().unwrap();
        assert_eq!(lag.unacked, 2);
        assert!(lag.oldest_ts_ms.unwrap() >= t0);
        drop(s);
        let s = Spool::open(dir.path(), SpoolLimits::default()).unwrap();
        assert_eq!(s.lag().unwrap().unacked, 2);
        assert_eq!(s.stats().unwrap().unacked, 2);
    }

    #[test]
    fn prune_applies_retention_and_age() {
        let dir = tempfile::tempdir().unwrap();
        let limits = SpoolLimits {
            max_bytes: 1 << 30,
            max_age: Duration::from_secs(100),
            retain_acked: Duration::from_secs(10),
        };
        let s = Spool::open(dir.path(), limits).unwrap();
        let t0 = now_ms();
        s.append("a", vec![entry("1", None), entry("2", None)])
            .unwrap();
        let first = s.pending(0, &HashMap::new(), 1, 1 << 20).unwrap();
        s.ack(first.upto, t0).unwrap();
        // Within retention: kept.
        assert_eq!(s.prune(t0 + 5_000).unwrap(), 0);
        assert_eq!(s.stats().unwrap().records, 2);
        // Past retention: the acked one goes, uncounted.
        assert_eq!(s.prune(t0 + 11_000).unwrap(), 0);
        assert_eq!(s.stats().unwrap().records, 1);
        // Past the age limit: the unacked one goes, counted.
        assert_eq!(s.prune(t0 + 200_000).unwrap(), 1);
        assert_eq!(s.stats().unwrap().records, 0);
        assert_eq!(s.drops()[0].spool_dropped, 1);
        // Numbering continues after everything was pruned.
        s.append("a", vec![entry("3", None)]).unwrap();
        let p = s.pending(0, &HashMap::new(), 10, 1 << 20).unwrap();
        assert_eq!(p.records().unwrap()[0].seq, 3);
    }
}
