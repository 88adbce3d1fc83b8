//! The replicated state in SQLite: [`SqliteStateMachine`], and its snapshots.
//!
//! # Snapshot format
//!
//! `b"CMRS"`, a format version byte (now 2), the length of the rest (u64, big endian), then a
//! zlib stream (deflate with an adler-32 checksum, by `miniz_oxide`) of the postcard encoding of: the last applied log id, the last
//! membership, every config row `(key, value, revision)` in key order, and (since version 2)
//! every pairing decision (paired and revoked devices) and the federation's member list. Version 1 snapshots are still read. The snapshot's
//! metadata (with its id) travels beside the bytes, as openraft sends it; installing checks that
//! both agree.

use std::io::Cursor;
use std::time::{SystemTime, UNIX_EPOCH};

use openraft::storage::RaftStateMachine;
use openraft::{EntryPayload, ErrorSubject, ErrorVerb, OptionalSend, RaftSnapshotBuilder};
use rusqlite::types::Value;
use rusqlite::{params, Connection, OptionalExtension};
use serde::{Deserialize, Serialize};

use super::types::{
    Command, CommandResult, Entry, LogId, Snapshot, SnapshotMeta, StorageError, StoredMembership,
    TypeConfig,
};
use super::{
    from_json, index_from_sql, run_blocking, sql_bytes, sql_index, sql_int, sql_text, to_json,
    ConsensusStoreError,
};
use crate::pairing::PairingRecord;
use crate::store::Store;
use crate::wire::Membership;
use tokio::sync::{broadcast, watch};

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS config (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL,
    revision INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS raft_sm_meta (key TEXT PRIMARY KEY, value BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS raft_snapshot (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    last_index INTEGER NOT NULL,
    meta BLOB NOT NULL,
    data BLOB NOT NULL
);
";

const LAST_APPLIED: &str = "last_applied";
const LAST_MEMBERSHIP: &str = "last_membership";
/// The replicated member list of the federation (JSON [`Membership`]).
const MEMBERS: &str = "members";

/// First bytes of every snapshot.
const SNAPSHOT_MAGIC: &[u8; 4] = b"CMRS";
/// The snapshot format version written now.
const SNAPSHOT_VERSION: u8 = 2;
/// Decompressed snapshots larger than this are refused (a corrupt or hostile stream must not
/// exhaust memory).
pub const MAX_SNAPSHOT_BYTES: usize = 256 * 1024 * 1024;
/// zlib compression level of snapshots (0..=10).
const COMPRESSION_LEVEL: u8 = 6;

/// One config row: key, value (JSON text), revision (the log index that last wrote it).
pub type ConfigRow = (String, String, u64);

/// What a snapshot holds (format version 2).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct SnapshotBody {
    last_applied: Option<LogId>,
    last_membership: StoredMembership,
    config: Vec<ConfigRow>,
    pairing: Vec<PairingRecord>,
    members: Option<Membership>,
}

/// What a format version 1 snapshot holds (no pairing).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct SnapshotBodyV1 {
    last_applied: Option<LogId>,
    last_membership: StoredMembership,
    config: Vec<ConfigRow>,
}

/// The federation's replicated state (the `config` table) and the raft bookkeeping of what was
/// applied (`raft_sm_meta`) and the current snapshot (`raft_snapshot`), in the state database.
///
/// Cheap to clone; a clone is also the snapshot builder.
#[derive(Debug, Clone)]
pub struct SqliteStateMachine {
    store: Store,
    pairing_changes: broadcast::Sender<PairingRecord>,
    members: watch::Sender<Option<Membership>>,
}

/// Pairing changes buffered for a slow subscriber; older ones are dropped (the subscriber
/// misses a disconnect notice, and the device's next request is refused by the registry).
const PAIRING_CHANGES: usize = 256;

/// A write to the `config` table.
enum ConfigOp {
    Set {
        key: String,
        value: String,
        revision: i64,
    },
    Unset {
        key: String,
    },
}

/// What one `apply` batch changes, gathered entry by entry before its one transaction.
struct Pending<'a> {
    ops: &'a mut Vec<ConfigOp>,
    pairing: &'a mut Vec<PairingRecord>,
    members: &'a mut Option<Membership>,
}

impl SqliteStateMachine {
    /// Opens the state machine on `store`, creating its tables if needed (blocking: call it at
    /// startup or in `spawn_blocking`).
    pub fn open(store: Store) -> Result<SqliteStateMachine, ConsensusStoreError> {
        store.with_conn(|c| {
            c.execute_batch(SCHEMA)?;
            crate::pairing::ensure_schema(c)
        })?;
        let members: Option<Membership> =
            decode_meta(store.with_conn(|c| read_meta(c, MEMBERS))?, MEMBERS)?;
        Ok(SqliteStateMachine {
            store,
            pairing_changes: broadcast::channel(PAIRING_CHANGES).0,
            members: watch::channel(members).0,
        })
    }

    /// The state database underneath.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Pairing decisions that changed the local registry as they are applied from the log
    /// (revoked devices must be disconnected here).
    pub fn pairing_changes(&self) -> broadcast::Receiver<PairingRecord> {
        self.pairing_changes.subscribe()
    }

    /// The replicated member list, as last applied (from the log or a snapshot).
    pub fn members(&self) -> watch::Receiver<Option<Membership>> {
        self.members.subscribe()
    }

    /// The value (JSON text) and revision of a config key, if it is set.
    ///
    /// Reads the local state: on a follower it may lag the primary (use a raft read barrier,
    /// such as `Raft::ensure_linearizable`, first when that matters). Blocking (one query).
    pub fn get(&self, key: &str) -> Result<Option<(String, u64)>, ConsensusStoreError> {
        let row: Option<(Value, Value)> = self.store.with_conn(|c| {
            c.query_row(
                "SELECT value, revision FROM config WHERE key = ?1",
                [key],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()
        })?;
        row.map(|(value, revision)| {
            let (_, value, revision) = config_row((Value::Text(key.to_owned()), value, revision))?;
            Ok((value, revision))
        })
        .transpose()
    }

    /// Every config row, in key order. Blocking (one query).
    pub fn all(&self) -> Result<Vec<ConfigRow>, ConsensusStoreError> {
        self.store
            .with_conn(|c| read_config(c))?
            .into_iter()
            .map(config_row)
            .collect()
    }

    /// The revision of the whole state: the index of the last applied log entry (0 before
    /// anything is applied; index 0 itself is the initial membership, which changes no key).
    /// Blocking (one query).
    pub fn revision(&self) -> Result<u64, ConsensusStoreError> {
        Ok(self.applied_log_id()?.map_or(0, |id| id.index))
    }

    /// The log id of the last applied entry. Blocking (one query).
    pub fn applied_log_id(&self) -> Result<Option<LogId>, ConsensusStoreError> {
        let raw = self.store.with_conn(|c| read_meta(c, LAST_APPLIED))?;
        decode_meta(raw, LAST_APPLIED)
    }

    async fn read_applied_state(
        &self,
    ) -> Result<(Option<LogId>, StoredMembership), ConsensusStoreError> {
        let (applied, membership) = run_blocking(&self.store, |c| {
            Ok((read_meta(c, LAST_APPLIED)?, read_meta(c, LAST_MEMBERSHIP)?))
        })
        .await?;
        Ok((
            decode_meta(applied, LAST_APPLIED)?,
            decode_meta(membership, LAST_MEMBERSHIP)?.unwrap_or_default(),
        ))
    }

    /// Adds what `command` (of the entry at `revision`) changes to `into`; a group's writes in
    /// their order.
    fn collect(&self, command: Command, revision: i64, into: &mut Pending<'_>) {
        match command {
            Command::SetConfig { key, value } => into.ops.push(config_op(key, value, revision)),
            Command::SetConfigBatch(changes) => into.ops.extend(
                changes
                    .into_iter()
                    .map(|(key, value)| config_op(key, value, revision)),
            ),
            Command::Noop => {}
            Command::Pairing(records) => into.pairing.extend(records),
            // Only a newer epoch replaces the list (deterministic on every gateway).
            Command::Members(m) => {
                let current = into
                    .members
                    .as_ref()
                    .or(self.members.borrow().as_ref())
                    .map_or(0, |c| c.epoch);
                if m.epoch > current || current == 0 {
                    *into.members = Some(m);
                }
            }
            Command::Group(writes) => {
                for w in writes {
                    self.collect(w, revision, into);
                }
            }
        }
    }

    async fn apply_entries(
        &self,
        entries: Vec<Entry>,
    ) -> Result<Vec<CommandResult>, ConsensusStoreError> {
        let Some(last) = entries.last() else {
            return Ok(Vec::new());
        };
        let applied = to_json(&last.log_id, LAST_APPLIED)?;
        let mut membership = None;
        let mut ops = Vec::new();
        let mut pairing: Vec<PairingRecord> = Vec::new();
        let mut members: Option<Membership> = None;
        let mut results = Vec::with_capacity(entries.len());
        for entry in entries {
            let revision = sql_index(entry.log_id.index)?;
            match entry.payload {
                EntryPayload::Blank => {}
                EntryPayload::Membership(m) => {
                    membership = Some(StoredMembership::new(Some(entry.log_id), m));
                }
                EntryPayload::Normal(command) => {
                    let mut pending = Pending {
                        ops: &mut ops,
                        pairing: &mut pairing,
                        members: &mut members,
                    };
                    self.collect(command, revision, &mut pending);
                }
            }
            results.push(CommandResult {
                revision: entry.log_id.index,
            });
        }
        let membership = membership
            .map(|m| to_json(&m, LAST_MEMBERSHIP))
            .transpose()?;
        let members_json = members.as_ref().map(|m| to_json(m, MEMBERS)).transpose()?;
        // One transaction per batch: the config rows, the pairing decisions, the last applied
        // id and the membership move together (and are fsynced on commit).
        let changed = run_blocking(&self.store, move |c| {
            let tx = c.transaction()?;
            let changed = if pairing.is_empty() {
                Vec::new()
            } else {
                crate::pairing::apply_records(&tx, &pairing)?
            };
            {
                let mut set = tx.prepare_cached(
                    "INSERT INTO config(key, value, revision) VALUES (?1, ?2, ?3)
                     ON CONFLICT(key) DO UPDATE SET value = excluded.value, revision = excluded.revision",
                )?;
                let mut unset = tx.prepare_cached("DELETE FROM config WHERE key = ?1")?;
                for op in &ops {
                    match op {
                        ConfigOp::Set { key, value, revision } => {
                            set.execute(params![key, value, revision])?;
                        }
                        ConfigOp::Unset { key } => {
                            unset.execute([key])?;
                        }
                    }
                }
            }
            write_meta(&tx, LAST_APPLIED, &applied)?;
            if let Some(membership) = &membership {
                write_meta(&tx, LAST_MEMBERSHIP, membership)?;
            }
            if let Some(members) = &members_json {
                write_meta(&tx, MEMBERS, members)?;
            }
            tx.commit()?;
            Ok(changed)
        })
        .await?;
        for r in changed {
            let _ = self.pairing_changes.send(r);
        }
        if members.is_some() {
            self.members.send_replace(members);
        }
        Ok(results)
    }

    async fn build(&self) -> Result<Snapshot, ConsensusStoreError> {
        // One read of the whole state, consistent (the connection is held throughout).
        let (applied, membership, rows, pairing, members) = run_blocking(&self.store, |c| {
            let tx = c.transaction()?;
            let applied = read_meta(&tx, LAST_APPLIED)?;
            let membership = read_meta(&tx, LAST_MEMBERSHIP)?;
            let rows = read_config(&tx)?;
            let pairing = crate::pairing::read_records(&tx)?;
            let members = read_meta(&tx, MEMBERS)?;
            tx.commit()?;
            Ok((applied, membership, rows, pairing, members))
        })
        .await?;
        let body = SnapshotBody {
            last_applied: decode_meta(applied, LAST_APPLIED)?,
            last_membership: decode_meta(membership, LAST_MEMBERSHIP)?.unwrap_or_default(),
            config: rows.into_iter().map(config_row).collect::<Result<_, _>>()?,
            pairing,
            members: decode_meta(members, MEMBERS)?,
        };
        let data = encode_snapshot(&body)?;
        let meta = SnapshotMeta {
            last_log_id: body.last_applied,
            last_membership: body.last_membership,
            snapshot_id: snapshot_id(body.last_applied.as_ref()),
        };
        let meta_json = to_json(&meta, "snapshot meta")?;
        let last_index = snapshot_index(&meta)?;
        let stored = data.clone();
        run_blocking(&self.store, move |c| {
            store_built_snapshot(c, last_index, &meta_json, &stored)
        })
        .await?;
        Ok(Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(data)),
        })
    }

    async fn install(&self, meta: &SnapshotMeta, data: Vec<u8>) -> Result<(), ConsensusStoreError> {
        let what = format!("snapshot {}", meta.snapshot_id);
        let body = decode_snapshot(&data, &what)?;
        if body.last_applied != meta.last_log_id || body.last_membership != meta.last_membership {
            return Err(ConsensusStoreError::corrupt(
                what,
                "its content does not match its metadata (last log id or membership)",
            ));
        }
        let applied = body
            .last_applied
            .map(|id| to_json(&id, LAST_APPLIED))
            .transpose()?;
        let membership = to_json(&body.last_membership, LAST_MEMBERSHIP)?;
        let meta_json = to_json(meta, "snapshot meta")?;
        let last_index = snapshot_index(meta)?;
        let mut rows = Vec::with_capacity(body.config.len());
        for (key, value, revision) in body.config {
            rows.push((key, value, sql_index(revision)?));
        }
        let pairing = body.pairing;
        let members = body.members;
        let members_json = members.as_ref().map(|m| to_json(m, MEMBERS)).transpose()?;
        // Replaces the config, merges the pairing decisions (newest wins, as in the log), and
        // replaces the applied bookkeeping and the current snapshot, at once.
        let changed = run_blocking(&self.store, move |c| {
            let tx = c.transaction()?;
            let changed = crate::pairing::apply_records(&tx, &pairing)?;
            tx.execute("DELETE FROM config", [])?;
            {
                let mut insert =
                    tx.prepare_cached("INSERT INTO config(key, value, revision) VALUES (?1, ?2, ?3)")?;
                for (key, value, revision) in &rows {
                    insert.execute(params![key, value, revision])?;
                }
            }
            match &applied {
                Some(applied) => write_meta(&tx, LAST_APPLIED, applied)?,
                None => {
                    tx.execute("DELETE FROM raft_sm_meta WHERE key = ?1", [LAST_APPLIED])?;
                }
            }
            write_meta(&tx, LAST_MEMBERSHIP, &membership)?;
            if let Some(members) = &members_json {
                write_meta(&tx, MEMBERS, members)?;
            }
            tx.execute(
                "INSERT OR REPLACE INTO raft_snapshot(id, last_index, meta, data) VALUES (1, ?1, ?2, ?3)",
                params![last_index, meta_json, data],
            )?;
            tx.commit()?;
            Ok(changed)
        })
        .await?;
        for r in changed {
            let _ = self.pairing_changes.send(r);
        }
        if members.is_some() {
            self.members.send_replace(members);
        }
        Ok(())
    }

    async fn current_snapshot(&self) -> Result<Option<Snapshot>, ConsensusStoreError> {
        let row: Option<(Value, Value)> = run_blocking(&self.store, |c| {
            c.query_row(
                "SELECT meta, data FROM raft_snapshot WHERE id = 1",
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()
        })
        .await?;
        let Some((meta, data)) = row else {
            return Ok(None);
        };
        let meta: SnapshotMeta = from_json(
            &sql_bytes(meta, "raft_snapshot meta")?,
            "raft_snapshot meta",
        )?;
        let data = sql_bytes(data, "raft_snapshot data")?;
        Ok(Some(Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(data)),
        }))
    }
}

/// Keeps a freshly built snapshot as the current one, unless a newer one was installed while it
/// was being built.
fn store_built_snapshot(
    c: &Connection,
    last_index: i64,
    meta: &[u8],
    data: &[u8],
) -> rusqlite::Result<()> {
    c.execute(
        "INSERT INTO raft_snapshot(id, last_index, meta, data) VALUES (1, ?1, ?2, ?3)
         ON CONFLICT(id) DO UPDATE SET
             last_index = excluded.last_index, meta = excluded.meta, data = excluded.data
         WHERE excluded.last_index >= raft_snapshot.last_index",
        params![last_index, meta, data],
    )
    .map(|_| ())
}

fn config_op(key: String, value: Option<String>, revision: i64) -> ConfigOp {
    match value {
        Some(value) => ConfigOp::Set {
            key,
            value,
            revision,
        },
        None => ConfigOp::Unset { key },
    }
}

fn read_meta(c: &Connection, key: &str) -> rusqlite::Result<Option<Value>> {
    c.query_row(
        "SELECT value FROM raft_sm_meta WHERE key = ?1",
        [key],
        |r| r.get(0),
    )
    .optional()
}

fn write_meta(c: &Connection, key: &str, value: &[u8]) -> rusqlite::Result<()> {
    c.execute(
        "INSERT INTO raft_sm_meta(key, value) VALUES (?1, ?2)
         ON CONFLICT(key) DO UPDATE SET value = excluded.value",
        params![key, value],
    )
    .map(|_| ())
}

fn decode_meta<T: serde::de::DeserializeOwned>(
    raw: Option<Value>,
    key: &str,
) -> Result<Option<T>, ConsensusStoreError> {
    let what = format!("raft_sm_meta row {key:?}");
    raw.map(|value| from_json(&sql_bytes(value, &what)?, &what))
        .transpose()
}

/// A `config` row as read (raw: checked by [`config_row`]).
type RawConfigRow = (Value, Value, Value);

fn read_config(c: &Connection) -> rusqlite::Result<Vec<RawConfigRow>> {
    let mut stmt = c.prepare_cached("SELECT key, value, revision FROM config ORDER BY key")?;
    let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?;
    rows.collect()
}

fn config_row((key, value, revision): RawConfigRow) -> Result<ConfigRow, ConsensusStoreError> {
    let key = sql_text(key, "config key")?;
    let what = format!("config row {key:?}");
    let value = sql_text(value, &what)?;
    let revision = index_from_sql(sql_int(revision, &what)?, &what)?;
    Ok((key, value, revision))
}

/// The `last_index` column of a snapshot row: -1 for a snapshot of nothing.
fn snapshot_index(meta: &SnapshotMeta) -> Result<i64, ConsensusStoreError> {
    meta.last_log_id.map_or(Ok(-1), |id| sql_index(id.index))
}

fn snapshot_id(last: Option<&LogId>) -> String {
    let stamp = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    match last {
        Some(id) => format!(
            "{}-{}-{}-{stamp:x}",
            id.leader_id.term, id.leader_id.node_id, id.index
        ),
        None => format!("empty-{stamp:x}"),
    }
}

fn encode_snapshot(body: &SnapshotBody) -> Result<Vec<u8>, ConsensusStoreError> {
    let plain =
        postcard::to_stdvec(body).map_err(|e| ConsensusStoreError::encode("snapshot", e))?;
    let compressed = miniz_oxide::deflate::compress_to_vec_zlib(&plain, COMPRESSION_LEVEL);
    let mut data = Vec::with_capacity(SNAPSHOT_MAGIC.len() + 9 + compressed.len());
    data.extend_from_slice(SNAPSHOT_MAGIC);
    data.push(SNAPSHOT_VERSION);
    data.extend_from_slice(&(compressed.len() as u64).to_be_bytes());
    data.extend_from_slice(&compressed);
    Ok(data)
}

fn decode_snapshot(data: &[u8], what: &str) -> Result<SnapshotBody, ConsensusStoreError> {
    let corrupt = |reason: String| ConsensusStoreError::corrupt(what, reason);
    let rest = data
        .strip_prefix(SNAPSHOT_MAGIC.as_slice())
        .ok_or_else(|| corrupt("not a clawmesh snapshot (bad magic bytes)".into()))?;
    let (&version, compressed) = rest
        .split_first()
        .ok_or_else(|| corrupt("truncated before its format version".into()))?;
    if version != SNAPSHOT_VERSION && version != 1 {
        return Err(corrupt(format!(
            "format version {version} is not supported (this gateway reads versions 1 and {SNAPSHOT_VERSION})"
        )));
    }
    let (length, compressed) = compressed
        .split_first_chunk::<8>()
        .ok_or_else(|| corrupt("truncated in its header".into()))?;
    let length = u64::from_be_bytes(*length);
    if length != compressed.len() as u64 {
        return Err(corrupt(format!(
            "truncated or padded: {} bytes of content where the header says {length}",
            compressed.len()
        )));
    }
    let plain =
        miniz_oxide::inflate::decompress_to_vec_zlib_with_limit(compressed, MAX_SNAPSHOT_BYTES)
            .map_err(|e| corrupt(format!("does not decompress: {e}")))?;
    let (body, trailing): (SnapshotBody, _) = if version == 1 {
        let (v1, trailing): (SnapshotBodyV1, _) = postcard::take_from_bytes(&plain)
            .map_err(|e| corrupt(format!("does not decode: {e}")))?;
        (
            SnapshotBody {
                last_applied: v1.last_applied,
                last_membership: v1.last_membership,
                config: v1.config,
                pairing: Vec::new(),
                members: None,
            },
            trailing,
        )
    } else {
        postcard::take_from_bytes(&plain).map_err(|e| corrupt(format!("does not decode: {e}")))?
    };
    if !trailing.is_empty() {
        return Err(corrupt(format!("{} trailing bytes", trailing.len())));
    }
    let applied = body.last_applied.map(|id| id.index);
    let mut previous: Option<&str> = None;
    for (key, _, revision) in &body.config {
        if previous.is_some_and(|p| p >= key.as_str()) {
            return Err(corrupt(format!(
                "config keys out of order or repeated at {key:?}"
            )));
        }
        if applied.is_none_or(|applied| *revision > applied) {
            return Err(corrupt(format!(
                "config key {key:?} has revision {revision}, past the snapshot's last log index"
            )));
        }
        previous = Some(key);
    }
    Ok(body)
}

fn sm_err(e: ConsensusStoreError, verb: ErrorVerb) -> StorageError {
    e.into_storage_error(ErrorSubject::StateMachine, verb)
}

fn snapshot_err(
    e: ConsensusStoreError,
    meta: Option<&SnapshotMeta>,
    verb: ErrorVerb,
) -> StorageError {
    e.into_storage_error(ErrorSubject::Snapshot(meta.map(|m| m.signature())), verb)
}

impl RaftSnapshotBuilder<TypeConfig> for SqliteStateMachine {
    async fn build_snapshot(&mut self) -> Result<Snapshot, StorageError> {
        self.build()
            .await
            .map_err(|e| snapshot_err(e, None, ErrorVerb::Write))
    }
}

impl RaftStateMachine<TypeConfig> for SqliteStateMachine {
    type SnapshotBuilder = SqliteStateMachine;

    async fn applied_state(&mut self) -> Result<(Option<LogId>, StoredMembership), StorageError> {
        self.read_applied_state()
            .await
            .map_err(|e| sm_err(e, ErrorVerb::Read))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<CommandResult>, StorageError>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let entries: Vec<Entry> = entries.into_iter().collect();
        let first = entries.first().map(|e| e.log_id);
        self.apply_entries(entries).await.map_err(|e| match first {
            Some(id) => e.into_storage_error(ErrorSubject::Apply(id), ErrorVerb::Write),
            None => sm_err(e, ErrorVerb::Write),
        })
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<Cursor<Vec<u8>>>, StorageError> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), StorageError> {
        let bytes = snapshot.get_ref().len();
        self.install(meta, snapshot.into_inner())
            .await
            .map_err(|e| snapshot_err(e, Some(meta), ErrorVerb::Write))?;
        tracing::info!(
            snapshot = %meta.snapshot_id,
            last = ?meta.last_log_id.map(|l| l.index),
            bytes,
            "installed a snapshot of the shared config from the primary"
        );
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot>, StorageError> {
        self.current_snapshot()
            .await
            .map_err(|e| snapshot_err(e, None, ErrorVerb::Read))
    }
}

#[cfg(test)]
mod tests {
    use openraft::RaftSnapshotBuilder;

    use super::*;
    use crate::consensus::testing::{blank, gateway, log_id, membership, normal, set, temp_store};

    /// Builds `sm`'s snapshot.
    async fn build(sm: &mut SqliteStateMachine) -> Snapshot {
        sm.get_snapshot_builder()
            .await
            .build_snapshot()
            .await
            .unwrap()
    }

    /// Streams `snapshot` into `sm` as openraft does: receive the bytes, then install.
    async fn receive(sm: &mut SqliteStateMachine, snapshot: &Snapshot) {
        let mut received = sm.begin_receiving_snapshot().await.unwrap();
        received
            .get_mut()
            .extend_from_slice(snapshot.snapshot.get_ref());
        sm.install_snapshot(&snapshot.meta, received).await.unwrap();
    }

    fn workload() -> Vec<Entry> {
        vec![
            membership(1, 1, &[1, 2]),
            normal(1, 2, set("a", "1")),
            normal(
                1,
                3,
                Command::SetConfigBatch(vec![
                    ("b".into(), Some("\"two\"".into())),
                    ("c".into(), Some("{\"x\":[1,2]}".into())),
                    ("a".into(), Some("10".into())),
                ]),
            ),
            normal(
                2,
                4,
                Command::SetConfig {
                    key: "c".into(),
                    value: None,
                },
            ),
            normal(2, 5, Command::Noop),
            membership(2, 6, &[1, 2, 3]),
            blank(3, 7),
        ]
    }

    fn want_rows() -> Vec<ConfigRow> {
        vec![
            ("a".into(), "10".into(), 3),
            ("b".into(), "\"two\"".into(), 3),
        ]
    }

    #[tokio::test]
    async fn a_group_applies_each_write_at_its_entry_revision() {
        let (_dir, store) = temp_store();
        let mut sm = SqliteStateMachine::open(store).unwrap();
        let results = sm
            .apply(vec![
                membership(1, 1, &[1]),
                normal(1, 2, set("a", "1")),
                normal(
                    1,
                    3,
                    Command::Group(vec![
                        set("b", "2"),
                        Command::SetConfig {
                            key: "a".into(),
                            value: None,
                        },
                        Command::SetConfigBatch(vec![
                            ("c".into(), Some("3".into())),
                            ("d".into(), Some("4".into())),
                        ]),
                        Command::Noop,
                    ]),
                ),
                normal(1, 4, set("d", "5")),
            ])
            .await
            .unwrap();
        let revisions: Vec<u64> = results.iter().map(|r| r.revision).collect();
        assert_eq!(revisions, vec![1, 2, 3, 4]);
        assert_eq!(
            sm.all().unwrap(),
            vec![
                ("b".into(), "2".into(), 3),
                ("c".into(), "3".into(), 3),
                ("d".into(), "5".into(), 4),
            ]
        );
        assert_eq!(sm.revision().unwrap(), 4);
    }

    #[tokio::test]
    async fn apply_writes_config_and_bookkeeping() {
        let (_dir, store) = temp_store();
        let mut sm = SqliteStateMachine::open(store).unwrap();
        assert_eq!(
            sm.applied_state().await.unwrap(),
            (None, StoredMembership::default())
        );
        assert_eq!(sm.revision().unwrap(), 0);
        assert!(sm.all().unwrap().is_empty());
        assert!(sm.apply(Vec::new()).await.unwrap().is_empty());

        let results = sm.apply(workload()).await.unwrap();
        let revisions: Vec<u64> = results.iter().map(|r| r.revision).collect();
        assert_eq!(revisions, vec![1, 2, 3, 4, 5, 6, 7]);

        assert_eq!(sm.all().unwrap(), want_rows());
        assert_eq!(sm.get("a").unwrap(), Some(("10".into(), 3)));
        assert_eq!(sm.get("c").unwrap(), None);
        assert_eq!(sm.get("missing").unwrap(), None);
        assert_eq!(sm.revision().unwrap(), 7);
        let (applied, mem) = sm.applied_state().await.unwrap();
        assert_eq!(applied, Some(log_id(3, 7)));
        assert_eq!(mem.log_id(), &Some(log_id(2, 6)));
        assert_eq!(mem.nodes().count(), 3);
        assert_eq!(
            mem.nodes()
                .find(|(id, _)| **id == 3)
                .map(|(_, n)| n.clone()),
            Some(gateway(3))
        );

        // Applying entry by entry gives the same as a batch.
        let (_dir2, store2) = temp_store();
        let mut one_by_one = SqliteStateMachine::open(store2).unwrap();
        for entry in workload() {
            one_by_one.apply([entry]).await.unwrap();
        }
        assert_eq!(one_by_one.all().unwrap(), want_rows());
        assert_eq!(
            one_by_one.applied_state().await.unwrap(),
            sm.applied_state().await.unwrap()
        );
    }

    #[tokio::test]
    async fn state_and_snapshot_survive_reopen() {
        let (dir, store) = temp_store();
        let built = {
            let mut sm = SqliteStateMachine::open(store.clone()).unwrap();
            sm.apply(workload()).await.unwrap();
            build(&mut sm).await
        };
        drop(store);
        let store = crate::store::Store::open(dir.path()).unwrap();
        let mut sm = SqliteStateMachine::open(store).unwrap();
        assert_eq!(sm.all().unwrap(), want_rows());
        assert_eq!(sm.revision().unwrap(), 7);
        let current = sm.get_current_snapshot().await.unwrap().unwrap();
        assert_eq!(current.meta, built.meta);
        assert_eq!(current.snapshot.get_ref(), built.snapshot.get_ref());
    }

    #[tokio::test]
    async fn snapshot_installs_into_a_fresh_store() {
        let (_dir, store) = temp_store();
        let mut leader = SqliteStateMachine::open(store).unwrap();
        leader.apply(workload()).await.unwrap();
        let snapshot = build(&mut leader).await;
        assert_eq!(snapshot.meta.last_log_id, Some(log_id(3, 7)));
        assert_eq!(snapshot.meta.last_membership.log_id(), &Some(log_id(2, 6)));
        assert_eq!(
            leader.get_current_snapshot().await.unwrap().map(|s| s.meta),
            Some(snapshot.meta.clone())
        );

        // The follower has stale state of its own, which the snapshot replaces entirely.
        let (_dir2, store2) = temp_store();
        let mut follower = SqliteStateMachine::open(store2).unwrap();
        follower
            .apply([
                normal(1, 1, set("stale", "true")),
                normal(1, 2, set("a", "0")),
            ])
            .await
            .unwrap();
        receive(&mut follower, &snapshot).await;

        assert_eq!(follower.all().unwrap(), leader.all().unwrap());
        assert_eq!(follower.revision().unwrap(), leader.revision().unwrap());
        assert_eq!(
            follower.applied_state().await.unwrap(),
            leader.applied_state().await.unwrap()
        );
        let current = follower.get_current_snapshot().await.unwrap().unwrap();
        assert_eq!(current.meta, snapshot.meta);

        // And it keeps applying from there.
        follower
            .apply([normal(3, 8, set("d", "null"))])
            .await
            .unwrap();
        assert_eq!(follower.get("d").unwrap(), Some(("null".into(), 8)));
    }

    fn key(n: u8) -> crate::identity::PublicKey {
        let signing = ed25519_dalek::SigningKey::from_bytes(&[n; 32]);
        crate::identity::PublicKey(signing.verifying_key().to_bytes())
    }

    fn device(n: u8, approved: bool, at: u64) -> PairingRecord {
        PairingRecord {
            key: key(n),
            approved,
            changed_at_ms: at,
            name: format!("node-{n}"),
            role: "node".into(),
            platform: "linux".into(),
            meta: "{}".into(),
            token: approved.then(|| (format!("tok-{n}"), at)),
        }
    }

    #[tokio::test]
    async fn pairing_decisions_apply_from_the_log_and_travel_in_snapshots() {
        let (_dir, store) = temp_store();
        let mut leader = SqliteStateMachine::open(store.clone()).unwrap();
        let mut changes = leader.pairing_changes();
        leader
            .apply([
                membership(1, 1, &[1]),
                normal(
                    1,
                    2,
                    Command::Pairing(vec![device(1, true, 10), device(2, true, 10)]),
                ),
                // An older decision for device 1 loses; a revocation of device 2 wins.
                normal(
                    1,
                    3,
                    Command::Pairing(vec![device(1, false, 5), device(2, false, 11)]),
                ),
            ])
            .await
            .unwrap();
        let registry = crate::pairing::Registry::open(store).unwrap();
        let by_key = |reg: &crate::pairing::Registry, n: u8| reg.record(&key(n)).unwrap();
        assert!(by_key(&registry, 1).unwrap().approved);
        assert!(!by_key(&registry, 2).unwrap().approved);
        let mut seen = Vec::new();
        while let Ok(r) = changes.try_recv() {
            seen.push((if r.key == key(1) { 1 } else { 2 }, r.approved));
        }
        assert_eq!(seen, vec![(1, true), (2, true), (2, false)]);

        let snapshot = build(&mut leader).await;
        let (_dir2, store2) = temp_store();
        let mut follower = SqliteStateMachine::open(store2.clone()).unwrap();
        receive(&mut follower, &snapshot).await;
        let registry2 = crate::pairing::Registry::open(store2).unwrap();
        assert_eq!(by_key(&registry2, 1), by_key(&registry, 1));
        assert_eq!(by_key(&registry2, 2), by_key(&registry, 2));
    }

    #[tokio::test]
    async fn member_lists_apply_newest_epoch_and_travel_in_snapshots() {
        let list = |epoch: u64, names: &[&str]| Membership {
            epoch,
            members: names
                .iter()
                .enumerate()
                .map(|(i, n)| crate::wire::Member {
                    key: key(i as u8 + 1),
                    name: n.to_string(),
                    region: None,
                    addr: format!("127.0.0.1:{}", 7000 + i),
                    primary: i == 0,
                    joined_at_ms: i as u64,
                })
                .collect(),
        };
        let (_dir, store) = temp_store();
        let mut sm = SqliteStateMachine::open(store).unwrap();
        let members = sm.members();
        sm.apply([
            normal(1, 1, Command::Members(list(2, &["tokyo", "beijing"]))),
            normal(1, 2, Command::Members(list(1, &["tokyo"]))),
        ])
        .await
        .unwrap();
        assert_eq!(members.borrow().as_ref().map(|m| m.epoch), Some(2));
        sm.apply([normal(
            1,
            3,
            Command::Members(list(3, &["tokyo", "beijing", "frankfurt"])),
        )])
        .await
        .unwrap();
        let snapshot = build(&mut sm).await;
        let (_dir2, store2) = temp_store();
        let mut follower = SqliteStateMachine::open(store2.clone()).unwrap();
        receive(&mut follower, &snapshot).await;
        assert_eq!(
            follower
                .members()
                .borrow()
                .as_ref()
                .map(|m| m.members.len()),
            Some(3)
        );
        // And it survives a reopen.
        let reopened = SqliteStateMachine::open(store2).unwrap();
        assert_eq!(
            reopened.members().borrow().as_ref().map(|m| m.epoch),
            Some(3)
        );
    }

    #[test]
    fn version_1_snapshots_still_decode() {
        let v1 = SnapshotBodyV1 {
            last_applied: Some(log_id(1, 2)),
            last_membership: StoredMembership::default(),
            config: vec![("a".into(), "1".into(), 2)],
        };
        let plain = postcard::to_stdvec(&v1).unwrap();
        let packed = miniz_oxide::deflate::compress_to_vec_zlib(&plain, 6);
        let mut data = SNAPSHOT_MAGIC.to_vec();
        data.push(1);
        data.extend_from_slice(&(packed.len() as u64).to_be_bytes());
        data.extend_from_slice(&packed);
        let body = decode_snapshot(&data, "v1").unwrap();
        assert_eq!(body.config, v1.config);
        assert!(body.pairing.is_empty());
    }

    #[tokio::test]
    async fn snapshot_of_nothing_round_trips() {
        let (_dir, store) = temp_store();
        let mut a = SqliteStateMachine::open(store).unwrap();
        let snapshot = build(&mut a).await;
        assert_eq!(snapshot.meta.last_log_id, None);
        let (_dir2, store2) = temp_store();
        let mut b = SqliteStateMachine::open(store2).unwrap();
        b.install_snapshot(&snapshot.meta, snapshot.snapshot)
            .await
            .unwrap();
        assert_eq!(
            b.applied_state().await.unwrap(),
            (None, StoredMembership::default())
        );
    }

    #[tokio::test]
    async fn an_older_build_does_not_replace_an_installed_snapshot() {
        let (_dir, store) = temp_store();
        let mut leader = SqliteStateMachine::open(store).unwrap();
        leader.apply(workload()).await.unwrap();
        let newer = build(&mut leader).await;

        let (_dir2, store2) = temp_store();
        let mut sm = SqliteStateMachine::open(store2.clone()).unwrap();
        sm.apply([normal(1, 1, set("x", "1"))]).await.unwrap();
        // A build that read the state before the install, stored after it.
        let meta = SnapshotMeta {
            last_log_id: Some(log_id(1, 1)),
            last_membership: StoredMembership::default(),
            snapshot_id: "old".into(),
        };
        sm.install_snapshot(&newer.meta, newer.snapshot)
            .await
            .unwrap();
        let stale = to_json(&meta, "test").unwrap();
        store2
            .with_conn(move |c| store_built_snapshot(c, 1, &stale, b"old"))
            .unwrap();
        let current = sm.get_current_snapshot().await.unwrap().unwrap();
        assert_eq!(current.meta, newer.meta);
    }

    fn assert_corrupt(err: impl std::fmt::Display, needle: &str) {
        let text = err.to_string();
        assert!(text.contains("corrupt raft storage"), "{text}");
        assert!(text.contains(needle), "{text}");
    }

    #[tokio::test]
    async fn corrupt_snapshots_are_refused_and_change_nothing() {
        let (_dir, store) = temp_store();
        let mut leader = SqliteStateMachine::open(store).unwrap();
        leader.apply(workload()).await.unwrap();
        let snapshot = build(&mut leader).await;
        let good = snapshot.snapshot.into_inner();
        let meta = snapshot.meta;

        let (_dir2, store2) = temp_store();
        let mut follower = SqliteStateMachine::open(store2).unwrap();
        follower
            .apply([normal(1, 1, set("mine", "1"))])
            .await
            .unwrap();
        let before = (
            follower.all().unwrap(),
            follower.applied_state().await.unwrap(),
        );

        let mut flipped = good.clone();
        let middle = flipped.len() / 2;
        flipped[middle] ^= 0x55;
        let mut bad_version = good.clone();
        bad_version[4] = 9;
        let mut trailing_garbage = good.clone();
        trailing_garbage.extend_from_slice(b"xx");
        let cases: Vec<(&str, Vec<u8>, &str)> = vec![
            ("empty", Vec::new(), "bad magic"),
            (
                "truncated",
                good[..good.len() / 2].to_vec(),
                "truncated or padded",
            ),
            (
                "truncated in length",
                good[..7].to_vec(),
                "truncated in its header",
            ),
            ("truncated header", good[..4].to_vec(), "format version"),
            ("bit flip", flipped, "decompress"),
            (
                "wrong magic",
                [b"XXXX".as_slice(), &good[4..]].concat(),
                "bad magic",
            ),
            ("future version", bad_version, "version 9"),
            ("trailing garbage", trailing_garbage, "truncated or padded"),
        ];
        for (name, data, needle) in cases {
            let err = follower
                .install_snapshot(&meta, Box::new(Cursor::new(data)))
                .await
                .expect_err(name);
            assert_corrupt(&err, needle);
        }

        // Well-formed bytes under someone else's metadata.
        let mut other = meta.clone();
        other.last_log_id = Some(log_id(9, 99));
        let err = follower
            .install_snapshot(&other, Box::new(Cursor::new(good.clone())))
            .await
            .unwrap_err();
        assert_corrupt(&err, "does not match its metadata");

        // Content that decodes but is inconsistent.
        let mut body = decode_snapshot(&good, "test").unwrap();
        body.config.reverse();
        let err = decode_snapshot(&encode_snapshot(&body).unwrap(), "test").unwrap_err();
        assert_corrupt(&err, "out of order");
        let mut body = decode_snapshot(&good, "test").unwrap();
        body.config[0].2 = 8;
        let err = decode_snapshot(&encode_snapshot(&body).unwrap(), "test").unwrap_err();
        assert_corrupt(&err, "past the snapshot's last log index");

        assert_eq!(
            (
                follower.all().unwrap(),
                follower.applied_state().await.unwrap()
            ),
            before
        );
        assert!(follower.get_current_snapshot().await.unwrap().is_none());
    }

    #[tokio::test]
    async fn corrupt_rows_are_errors() {
        let (_dir, store) = temp_store();
        let mut sm = SqliteStateMachine::open(store.clone()).unwrap();
        sm.apply(workload()).await.unwrap();
        build(&mut sm).await;
        let exec = |sql: &str| {
            let sql = sql.to_owned();
            store.with_conn(move |c| c.execute_batch(&sql)).unwrap();
        };

        exec("UPDATE config SET revision = -3 WHERE key = 'a'");
        assert_corrupt(sm.get("a").unwrap_err(), "negative index");
        assert_corrupt(sm.all().unwrap_err(), "config row \"a\"");
        assert_corrupt(
            sm.get_snapshot_builder()
                .await
                .build_snapshot()
                .await
                .unwrap_err(),
            "config row \"a\"",
        );
        exec("UPDATE config SET revision = 'x' WHERE key = 'a'");
        assert_corrupt(sm.get("a").unwrap_err(), "instead of an integer");
        exec("UPDATE config SET value = x'ff' WHERE key = 'b'");
        assert_corrupt(sm.get("b").unwrap_err(), "config row \"b\"");

        exec("UPDATE raft_sm_meta SET value = x'00' WHERE key = 'last_membership'");
        assert_corrupt(sm.applied_state().await.unwrap_err(), "last_membership");
        exec("UPDATE raft_sm_meta SET value = 42 WHERE key = 'last_applied'");
        assert_corrupt(sm.revision().unwrap_err(), "instead of bytes");

        exec("UPDATE raft_snapshot SET meta = 'not json'");
        assert_corrupt(
            sm.get_current_snapshot().await.unwrap_err(),
            "raft_snapshot meta",
        );
    }
}
