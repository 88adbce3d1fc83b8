//! The raft log and vote in SQLite: [`SqliteLogStore`].

use std::fmt::Debug;
use std::io;
use std::ops::{Bound, RangeBounds};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use openraft::storage::{LogFlushed, RaftLogStorage};
use openraft::{ErrorSubject, ErrorVerb, LogState, OptionalSend, RaftLogReader};
use rusqlite::types::Value;
use rusqlite::{params, Connection, OptionalExtension};

use super::types::{Entry, LogId, StorageError, TypeConfig, Vote};
use super::{
    from_json, index_from_sql, run_blocking, sql_bytes, sql_index, sql_int, to_json,
    ConsensusStoreError,
};
use crate::store::Store;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS raft_log (
    idx INTEGER PRIMARY KEY,
    term INTEGER NOT NULL,
    entry BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS raft_meta (key TEXT PRIMARY KEY, value BLOB NOT NULL);
";

const VOTE: &str = "vote";
const COMMITTED: &str = "committed";
const LAST_PURGED: &str = "last_purged";

/// The raft log, the vote and the committed log id, in the tables `raft_log` and `raft_meta` of
/// the state database.
///
/// Cheap to clone; a clone is also the log reader handed to replication tasks.
///
/// The committed log id is saved lazily: `save_committed` keeps it in memory and the next
/// append writes it in its own transaction, instead of one more fsynced transaction per commit
/// advance (one per round of replication, on every gateway). openraft allows this because the
/// state machine is durable on its own ([`super::SqliteStateMachine`] commits the last applied
/// log id with each applied batch): after a crash the saved value may be behind, so entries
/// committed but not yet applied then are applied once a leader tells the commit index again,
/// and openraft raises a saved value below the last applied one to it.
#[derive(Debug, Clone)]
pub struct SqliteLogStore {
    store: Store,
    committed: Arc<Mutex<LazyCommitted>>,
    /// The index after the last stored entry, as this process last wrote it (a hint for the
    /// replication path, see [`SqliteLogStore::next_index_hint`]).
    next_index: Arc<AtomicU64>,
}

/// The committed log id as last told by openraft, and whether the table is behind it.
#[derive(Debug, Default)]
struct LazyCommitted {
    /// The last value `save_committed` was given in this process (`None`: not yet given).
    latest: Option<Option<LogId>>,
    /// `latest` is not yet in `raft_meta`.
    unsaved: bool,
}

/// A row of `raft_log` as read: index, term, encoded entry (raw, checked when decoded).
type RawRow = (i64, Value, Value);

impl SqliteLogStore {
    /// Opens the log store on `store`, creating its tables if needed (blocking: call it at
    /// startup or in `spawn_blocking`).
    pub fn open(store: Store) -> Result<SqliteLogStore, ConsensusStoreError> {
        store.with_conn(|c| c.execute_batch(SCHEMA))?;
        let last: Option<i64> =
            store.with_conn(|c| c.query_row("SELECT MAX(idx) FROM raft_log", [], |r| r.get(0)))?;
        let next = last.map_or(0, |l| u64::try_from(l).map_or(0, |l| l + 1));
        Ok(SqliteLogStore {
            store,
            committed: Arc::default(),
            next_index: Arc::new(AtomicU64::new(next)),
        })
    }

    /// The index after the last entry this process appended (or found at open), without
    /// reading the table: the replication path reads the log only when it may hold entries at
    /// or after an index. A hint (an append in progress is not counted yet); the log itself is
    /// what is read and sent.
    pub fn next_index_hint(&self) -> u64 {
        self.next_index.load(Ordering::Acquire)
    }

    /// The state database underneath.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Reads and decodes every stored entry and the metadata rows once, so a damaged row is
    /// reported at start rather than when a follower first needs it. Returns how many entries
    /// are stored.
    pub async fn verify(&self) -> Result<usize, ConsensusStoreError> {
        let _: Option<Vote> = self.read_meta(VOTE).await?;
        let _: Option<LogId> = self.read_meta(COMMITTED).await?;
        let state = self.log_state().await?;
        let start = state.last_purged_log_id.map_or(0, |l| l.index + 1);
        let entries = self.read_range(start, None).await?;
        if let (Some(first), Some(last)) = (entries.first(), state.last_log_id) {
            if first.log_id.index != start && state.last_purged_log_id.is_some() {
                return Err(ConsensusStoreError::corrupt(
                    "raft_log",
                    format!("entries {start} to {} are missing", first.log_id.index - 1),
                ));
            }
            if entries.last().map(|e| e.log_id) != Some(last) {
                return Err(ConsensusStoreError::corrupt(
                    "raft_log",
                    "the last entry disagrees with the log state",
                ));
            }
        }
        Ok(entries.len())
    }

    /// The last log id and the vote: what a forced promotion starts from.
    pub(crate) async fn last_and_vote(
        &self,
    ) -> Result<(Option<LogId>, Option<Vote>), ConsensusStoreError> {
        let state = self.log_state().await?;
        Ok((state.last_log_id, self.read_meta(VOTE).await?))
    }

    /// Appends `entry` and saves `vote` outside of openraft (the raft node must be stopped):
    /// the operator's forced promotion, see [`super::recovery`].
    pub(crate) async fn force_append(
        &self,
        entry: Entry,
        vote: Vote,
    ) -> Result<(), ConsensusStoreError> {
        self.write_meta(VOTE, Some(&vote)).await?;
        self.append_entries(vec![entry]).await
    }

    async fn read_meta<T>(&self, key: &'static str) -> Result<Option<T>, ConsensusStoreError>
    where
        T: serde::de::DeserializeOwned,
    {
        let raw = run_blocking(&self.store, move |c| read_meta(c, key)).await?;
        raw.map(|value| decode_meta(value, key)).transpose()
    }

    async fn write_meta<T: serde::Serialize>(
        &self,
        key: &'static str,
        value: Option<&T>,
    ) -> Result<(), ConsensusStoreError> {
        let bytes = value
            .map(|v| to_json(v, &format!("raft_meta row {key:?}")))
            .transpose()?;
        run_blocking(&self.store, move |c| match bytes {
            Some(bytes) => write_meta(c, key, &bytes),
            None => c
                .execute("DELETE FROM raft_meta WHERE key = ?1", [key])
                .map(|_| ()),
        })
        .await
    }

    async fn read_range(
        &self,
        start: u64,
        end: Option<u64>,
    ) -> Result<Vec<Entry>, ConsensusStoreError> {
        // Past SQLite's range: nothing can be stored there (appends refuse such indexes).
        let Ok(start) = i64::try_from(start) else {
            return Ok(Vec::new());
        };
        let end = end.and_then(|e| i64::try_from(e).ok());
        let rows: Vec<RawRow> = run_blocking(&self.store, move |c| {
            let mut stmt = c.prepare_cached(
                "SELECT idx, term, entry FROM raft_log
                 WHERE idx >= ?1 AND (?2 IS NULL OR idx < ?2) ORDER BY idx",
            )?;
            let rows = stmt.query_map(params![start, end], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?))
            })?;
            rows.collect()
        })
        .await?;
        let entries: Vec<Entry> = rows.into_iter().map(decode_row).collect::<Result<_, _>>()?;
        // The log has no holes; a missing row inside what was found is damage, not a gap to skip.
        if let Some(pair) = entries
            .windows(2)
            .find(|pair| pair[1].log_id.index != pair[0].log_id.index + 1)
        {
            return Err(ConsensusStoreError::corrupt(
                "raft_log",
                format!(
                    "entries {} to {} are missing",
                    pair[0].log_id.index + 1,
                    pair[1].log_id.index - 1
                ),
            ));
        }
        Ok(entries)
    }

    async fn log_state(&self) -> Result<LogState<TypeConfig>, ConsensusStoreError> {
        let (purged, last) = run_blocking(&self.store, |c| {
            let purged = read_meta(c, LAST_PURGED)?;
            let last: Option<RawRow> = c
                .query_row(
                    "SELECT idx, term, entry FROM raft_log ORDER BY idx DESC LIMIT 1",
                    [],
                    |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
                )
                .optional()?;
            Ok((purged, last))
        })
        .await?;
        let last_purged_log_id: Option<LogId> = purged
            .map(|value| decode_meta(value, LAST_PURGED))
            .transpose()?;
        let last_log_id = match last {
            Some(row) => Some(decode_row(row)?.log_id),
            None => last_purged_log_id,
        };
        Ok(LogState {
            last_purged_log_id,
            last_log_id,
        })
    }

    async fn append_entries(&self, entries: Vec<Entry>) -> Result<(), ConsensusStoreError> {
        let mut rows = Vec::with_capacity(entries.len());
        for entry in &entries {
            let idx = sql_index(entry.log_id.index)?;
            let term = sql_index(entry.log_id.leader_id.term)?;
            let bytes = postcard::to_stdvec(entry).map_err(|e| {
                ConsensusStoreError::encode(format!("log entry {}", entry.log_id), e)
            })?;
            rows.push((idx, term, bytes));
        }
        // The committed log id told since the last append rides in this transaction.
        let committed = self.take_unsaved_committed()?;
        let result = run_blocking(&self.store, move |c| {
            let tx = c.transaction()?;
            {
                let mut stmt = tx.prepare_cached(
                    "INSERT OR REPLACE INTO raft_log(idx, term, entry) VALUES (?1, ?2, ?3)",
                )?;
                for (idx, term, bytes) in &rows {
                    stmt.execute(params![idx, term, bytes])?;
                }
            }
            match committed {
                Some(Some(value)) => write_meta(&tx, COMMITTED, &value)?,
                Some(None) => {
                    tx.execute("DELETE FROM raft_meta WHERE key = ?1", [COMMITTED])?;
                }
                None => {}
            }
            tx.commit()
        })
        .await;
        match &result {
            Ok(()) => {
                if let Some(last) = entries.last() {
                    self.next_index
                        .fetch_max(last.log_id.index + 1, Ordering::AcqRel);
                }
            }
            // Not written: the next append tries again.
            Err(_) => self.lock_committed().unsaved = true,
        }
        result
    }

    fn lock_committed(&self) -> std::sync::MutexGuard<'_, LazyCommitted> {
        // Plain data: a panic while it was held leaves a usable value.
        self.committed
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The committed log id not yet written, encoded: `Some(None)` clears the row.
    fn take_unsaved_committed(&self) -> Result<Option<Option<Vec<u8>>>, ConsensusStoreError> {
        let mut c = self.lock_committed();
        if !c.unsaved {
            return Ok(None);
        }
        let Some(latest) = c.latest else {
            return Ok(None);
        };
        let encoded = latest
            .map(|l| to_json(&l, "raft_meta row \"committed\""))
            .transpose()?;
        c.unsaved = false;
        Ok(Some(encoded))
    }

    async fn truncate_since(&self, index: u64) -> Result<(), ConsensusStoreError> {
        let Ok(idx) = i64::try_from(index) else {
            return Ok(()); // nothing is stored at or past it
        };
        run_blocking(&self.store, move |c| {
            c.execute("DELETE FROM raft_log WHERE idx >= ?1", [idx])
                .map(|_| ())
        })
        .await?;
        self.next_index.fetch_min(index, Ordering::AcqRel);
        Ok(())
    }

    async fn purge_upto(&self, log_id: LogId) -> Result<(), ConsensusStoreError> {
        // The purge point only moves forward: a stale purge must not move it back. (Writes are
        // serialized by openraft, so nothing changes it between this read and the write below.)
        let current: Option<LogId> = self.read_meta(LAST_PURGED).await?;
        if current.is_some_and(|current| current.index >= log_id.index) {
            return Ok(());
        }
        let idx = sql_index(log_id.index)?;
        let value = to_json(&log_id, "raft_meta row \"last_purged\"")?;
        run_blocking(&self.store, move |c| {
            let tx = c.transaction()?;
            write_meta(&tx, LAST_PURGED, &value)?;
            tx.execute("DELETE FROM raft_log WHERE idx <= ?1", [idx])?;
            tx.commit()
        })
        .await
    }
}

fn read_meta(c: &Connection, key: &str) -> rusqlite::Result<Option<Value>> {
    c.query_row("SELECT value FROM raft_meta WHERE key = ?1", [key], |r| {
        r.get(0)
    })
    .optional()
}

fn write_meta(c: &Connection, key: &str, value: &[u8]) -> rusqlite::Result<()> {
    c.execute(
        "INSERT INTO raft_meta(key, value) VALUES (?1, ?2)
         ON CONFLICT(key) DO UPDATE SET value = excluded.value",
        params![key, value],
    )
    .map(|_| ())
}

fn decode_meta<T: serde::de::DeserializeOwned>(
    value: Value,
    key: &str,
) -> Result<T, ConsensusStoreError> {
    let what = format!("raft_meta row {key:?}");
    from_json(&sql_bytes(value, &what)?, &what)
}

/// Decodes a `raft_log` row and checks that the entry is the one its row says.
fn decode_row((idx, term, bytes): RawRow) -> Result<Entry, ConsensusStoreError> {
    let what = format!("raft_log row {idx}");
    let bytes = sql_bytes(bytes, &what)?;
    let (entry, rest): (Entry, _) =
        postcard::take_from_bytes(&bytes).map_err(|e| ConsensusStoreError::corrupt(&what, e))?;
    if !rest.is_empty() {
        return Err(ConsensusStoreError::corrupt(
            what,
            format!("{} trailing bytes", rest.len()),
        ));
    }
    let index = index_from_sql(idx, &what)?;
    let term = index_from_sql(sql_int(term, &what)?, &what)?;
    if entry.log_id.index != index || entry.log_id.leader_id.term != term {
        return Err(ConsensusStoreError::corrupt(
            what,
            format!(
                "holds entry {} (term {}), not index {index} term {term}",
                entry.log_id, entry.log_id.leader_id.term
            ),
        ));
    }
    Ok(entry)
}

/// `[start, end)` of a range of log indexes; `end` `None` is unbounded.
fn bounds(range: &impl RangeBounds<u64>) -> Option<(u64, Option<u64>)> {
    let start = match range.start_bound() {
        Bound::Included(&s) => s,
        Bound::Excluded(&s) => s.checked_add(1)?,
        Bound::Unbounded => 0,
    };
    let end = match range.end_bound() {
        Bound::Included(&e) => e.checked_add(1),
        Bound::Excluded(&e) => Some(e),
        Bound::Unbounded => None,
    };
    Some((start, end))
}

fn read_err(e: ConsensusStoreError, subject: ErrorSubject<u64>) -> StorageError {
    e.into_storage_error(subject, ErrorVerb::Read)
}

fn write_err(e: ConsensusStoreError, subject: ErrorSubject<u64>) -> StorageError {
    e.into_storage_error(subject, ErrorVerb::Write)
}

impl RaftLogReader<TypeConfig> for SqliteLogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, StorageError> {
        let Some((start, end)) = bounds(&range) else {
            return Ok(Vec::new());
        };
        if end.is_some_and(|end| end <= start) {
            return Ok(Vec::new());
        }
        self.read_range(start, end)
            .await
            .map_err(|e| read_err(e, ErrorSubject::Logs))
    }
}

impl RaftLogStorage<TypeConfig> for SqliteLogStore {
    type LogReader = SqliteLogStore;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError> {
        self.log_state()
            .await
            .map_err(|e| read_err(e, ErrorSubject::Logs))
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote) -> Result<(), StorageError> {
        self.write_meta(VOTE, Some(vote))
            .await
            .map_err(|e| write_err(e, ErrorSubject::Vote))
    }

    async fn read_vote(&mut self) -> Result<Option<Vote>, StorageError> {
        self.read_meta(VOTE)
            .await
            .map_err(|e| read_err(e, ErrorSubject::Vote))
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), StorageError> {
        // Lazily: written by the next append (see [`SqliteLogStore`]).
        let mut c = self.lock_committed();
        c.latest = Some(committed);
        c.unsaved = true;
        Ok(())
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, StorageError> {
        if let Some(latest) = self.lock_committed().latest {
            return Ok(latest);
        }
        self.read_meta(COMMITTED)
            .await
            .map_err(|e| read_err(e, ErrorSubject::Store))
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: LogFlushed<TypeConfig>,
    ) -> Result<(), StorageError>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let entries: Vec<Entry> = entries.into_iter().collect();
        // The transaction is committed (and fsynced: synchronous=FULL) before the callback says
        // the entries are on disk.
        match self.append_entries(entries).await {
            Ok(()) => {
                callback.log_io_completed(Ok(()));
                Ok(())
            }
            Err(e) => {
                callback.log_io_completed(Err(io::Error::other(e.to_string())));
                Err(write_err(e, ErrorSubject::Logs))
            }
        }
    }

    async fn truncate(&mut self, log_id: LogId) -> Result<(), StorageError> {
        self.truncate_since(log_id.index)
            .await
            .map_err(|e| e.into_storage_error(ErrorSubject::Log(log_id), ErrorVerb::Delete))
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), StorageError> {
        self.purge_upto(log_id)
            .await
            .map_err(|e| e.into_storage_error(ErrorSubject::Log(log_id), ErrorVerb::Delete))
    }
}

#[cfg(test)]
mod tests {
    use openraft::storage::RaftLogStorageExt;

    use super::*;
    use crate::consensus::testing::{blank, log_id, membership, normal, set, temp_store};
    use crate::consensus::types::Command;

    fn ten_entries() -> Vec<Entry> {
        let mut entries = vec![membership(1, 1, &[1, 2, 3])];
        for i in 2..=10 {
            entries.push(match i % 3 {
                0 => blank(1, i),
                1 => normal(2, i, set(&format!("k{i}"), "{\"n\":1}")),
                _ => normal(2, i, Command::Noop),
            });
        }
        entries
    }

    async fn read_all(log: &mut SqliteLogStore) -> Vec<Entry> {
        log.try_get_log_entries(..).await.unwrap()
    }

    #[tokio::test]
    async fn log_vote_and_purge_survive_reopen() {
        let (dir, store) = temp_store();
        let entries = ten_entries();
        {
            let mut log = SqliteLogStore::open(store.clone()).unwrap();
            log.blocking_append(entries.clone()).await.unwrap();
            assert_eq!(read_all(&mut log).await, entries);
            assert_eq!(log.try_get_log_entries(3..5).await.unwrap(), entries[2..4]);
            assert_eq!(log.try_get_log_entries(3..=5).await.unwrap(), entries[2..5]);
            assert!(log.try_get_log_entries(5..5).await.unwrap().is_empty());
            assert!(log.try_get_log_entries(11..).await.unwrap().is_empty());

            log.save_vote(&Vote::new(2, 1)).await.unwrap();
            log.save_committed(Some(log_id(2, 7))).await.unwrap();
            log.purge(log_id(1, 3)).await.unwrap();
            log.truncate(log_id(2, 9)).await.unwrap();
            // Re-append over the truncated tail in a new term.
            log.blocking_append([blank(3, 9)]).await.unwrap();
        }
        drop(store);

        let store = crate::store::Store::open(dir.path()).unwrap();
        let mut log = SqliteLogStore::open(store).unwrap();
        let state = log.get_log_state().await.unwrap();
        assert_eq!(state.last_purged_log_id, Some(log_id(1, 3)));
        assert_eq!(state.last_log_id, Some(log_id(3, 9)));
        let mut want = entries[3..8].to_vec();
        want.push(blank(3, 9));
        assert_eq!(read_all(&mut log).await, want);
        assert_eq!(log.read_vote().await.unwrap(), Some(Vote::new(2, 1)));
        assert_eq!(log.read_committed().await.unwrap(), Some(log_id(2, 7)));

        // The reader sees the same log.
        let mut reader = log.get_log_reader().await;
        assert_eq!(read_all(&mut reader).await, want);
    }

    #[tokio::test]
    async fn purge_past_the_end_and_never_backwards() {
        let (_dir, store) = temp_store();
        let mut log = SqliteLogStore::open(store).unwrap();
        log.blocking_append(ten_entries()).await.unwrap();
        log.purge(log_id(2, 5)).await.unwrap();
        log.purge(log_id(1, 3)).await.unwrap();
        let state = log.get_log_state().await.unwrap();
        assert_eq!(state.last_purged_log_id, Some(log_id(2, 5)));
        assert_eq!(
            read_all(&mut log).await.first().map(|e| e.log_id.index),
            Some(6)
        );

        log.purge(log_id(4, 20)).await.unwrap();
        let state = log.get_log_state().await.unwrap();
        assert_eq!(state.last_purged_log_id, Some(log_id(4, 20)));
        assert_eq!(state.last_log_id, Some(log_id(4, 20)));
        assert!(read_all(&mut log).await.is_empty());
    }

    #[tokio::test]
    async fn committed_can_be_cleared() {
        let (_dir, store) = temp_store();
        let mut log = SqliteLogStore::open(store).unwrap();
        assert_eq!(log.read_committed().await.unwrap(), None);
        log.save_committed(Some(log_id(1, 4))).await.unwrap();
        log.save_committed(None).await.unwrap();
        assert_eq!(log.read_committed().await.unwrap(), None);
        assert_eq!(log.read_vote().await.unwrap(), None);
    }

    #[tokio::test]
    async fn the_committed_log_id_is_written_by_the_next_append_and_only_lags() {
        let (dir, store) = temp_store();
        let entries = ten_entries();
        {
            let mut log = SqliteLogStore::open(store.clone()).unwrap();
            log.blocking_append(entries[..5].to_vec()).await.unwrap();
            log.save_committed(Some(log_id(1, 3))).await.unwrap();
            // This process reads what it was told at once.
            assert_eq!(log.read_committed().await.unwrap(), Some(log_id(1, 3)));
            log.blocking_append(entries[5..8].to_vec()).await.unwrap();
            assert_eq!(log.next_index_hint(), entries[7].log_id.index + 1);
            // Told, then the process stops before any append: not on disk.
            log.save_committed(Some(log_id(2, 7))).await.unwrap();
        }
        drop(store);
        let store = crate::store::Store::open(dir.path()).unwrap();
        let mut log = SqliteLogStore::open(store.clone()).unwrap();
        assert_eq!(log.next_index_hint(), entries[7].log_id.index + 1);
        // Behind what was told (openraft re-learns the rest from the leader), never ahead.
        assert_eq!(log.read_committed().await.unwrap(), Some(log_id(1, 3)));
        // Cleared, then written by the next append.
        log.save_committed(None).await.unwrap();
        log.blocking_append(entries[8..].to_vec()).await.unwrap();
        log.truncate(entries[8].log_id).await.unwrap();
        assert_eq!(log.next_index_hint(), entries[8].log_id.index);
        drop(log);
        let mut log = SqliteLogStore::open(store).unwrap();
        assert_eq!(log.read_committed().await.unwrap(), None);
    }

    fn assert_corrupt(err: StorageError, needle: &str) {
        let text = err.to_string();
        assert!(text.contains("corrupt raft storage"), "{text}");
        assert!(text.contains(needle), "{text}");
    }

    #[tokio::test]
    async fn corrupt_or_truncated_rows_are_errors() {
        let (_dir, store) = temp_store();
        let mut log = SqliteLogStore::open(store.clone()).unwrap();
        log.blocking_append(ten_entries()).await.unwrap();
        let exec = |sql: &str| {
            let sql = sql.to_owned();
            store.with_conn(move |c| c.execute_batch(&sql)).unwrap();
        };

        // Garbage in the middle: reading across it fails, reading around it works.
        exec("UPDATE raft_log SET entry = x'ffffffffffffffffff' WHERE idx = 4");
        assert_corrupt(
            log.try_get_log_entries(..).await.unwrap_err(),
            "raft_log row 4",
        );
        assert_eq!(log.try_get_log_entries(5..).await.unwrap().len(), 6);

        // A truncated blob at the end: the log state itself is unreadable.
        exec("UPDATE raft_log SET entry = substr(entry, 1, length(entry) / 2) WHERE idx = 10");
        assert_corrupt(log.get_log_state().await.unwrap_err(), "raft_log row 10");

        // A well-formed entry in the wrong row.
        exec(
            "UPDATE raft_log SET entry = (SELECT entry FROM raft_log WHERE idx = 6) WHERE idx = 7",
        );
        assert_corrupt(
            log.try_get_log_entries(7..8).await.unwrap_err(),
            "not index 7",
        );

        // Same index, wrong term column.
        exec("UPDATE raft_log SET term = 9 WHERE idx = 8");
        assert_corrupt(
            log.try_get_log_entries(8..9).await.unwrap_err(),
            "raft_log row 8",
        );

        // Bad metadata.
        exec("INSERT OR REPLACE INTO raft_meta(key, value) VALUES ('vote', x'7b00')");
        assert_corrupt(log.read_vote().await.unwrap_err(), "\"vote\"");
        exec("INSERT OR REPLACE INTO raft_meta(key, value) VALUES ('last_purged', 'nope')");
        assert_corrupt(log.get_log_state().await.unwrap_err(), "last_purged");
    }

    #[tokio::test]
    async fn a_hole_in_the_log_is_an_error() {
        let (_dir, store) = temp_store();
        let mut log = SqliteLogStore::open(store.clone()).unwrap();
        log.blocking_append(ten_entries()).await.unwrap();
        store
            .with_conn(|c| c.execute("DELETE FROM raft_log WHERE idx IN (5, 6)", []))
            .unwrap();
        assert_corrupt(
            log.try_get_log_entries(..).await.unwrap_err(),
            "entries 5 to 6 are missing",
        );
        // Reading around the hole (as openraft does after a purge) is fine.
        assert_eq!(log.try_get_log_entries(7..).await.unwrap().len(), 4);
    }

    #[test]
    fn range_bounds() {
        assert_eq!(bounds(&(3..7)), Some((3, Some(7))));
        assert_eq!(bounds(&(3..=7)), Some((3, Some(8))));
        assert_eq!(bounds(&(..)), Some((0, None)));
        assert_eq!(bounds(&(..=u64::MAX)), Some((0, None)));
        assert_eq!(bounds(&(Bound::Excluded(u64::MAX), Bound::Unbounded)), None);
    }
}
