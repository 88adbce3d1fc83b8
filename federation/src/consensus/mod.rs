//! Storage for the federation's consensus: the openraft (0.9, storage v2) log store and state
//! machine, both kept in the gateway's SQLite state database ([`Store`]).
//!
//! The federation's shared config (later also the pairing registry and the member list) is
//! replicated among the gateways with raft; the leader is the primary. This module is only the
//! storage half: [`SqliteLogStore`] implements `RaftLogStorage` and `RaftLogReader`,
//! [`SqliteStateMachine`] implements `RaftStateMachine` and `RaftSnapshotBuilder`. The network
//! half and the `Raft` instance are wired elsewhere.
//!
//! # Tables (in `state.db`, next to the gateway's other tables)
//!
//! | table | rows |
//! | --- | --- |
//! | `raft_log(idx, term, entry)` | one per log entry; `entry` is the postcard encoding of [`Entry`] |
//! | `raft_meta(key, value)` | `vote`, `committed`, `last_purged`: JSON |
//! | `config(key, value, revision)` | the replicated config: JSON text and the log index that last wrote it |
//! | `raft_sm_meta(key, value)` | `last_applied`, `last_membership`: JSON |
//! | `raft_snapshot(id = 1, last_index, meta, data)` | the current snapshot (JSON meta, snapshot bytes) |
//!
//! # Durability
//!
//! The [`Store`] runs SQLite in WAL mode with `synchronous=FULL`, so every committed transaction
//! is fsynced before the commit returns. `save_vote`, `append`, `truncate`, `purge`,
//! `apply` and `install_snapshot` each commit one transaction before they return
//! (`save_committed` is lazy: the next `append` writes it, see [`SqliteLogStore`]); `append` reports its entries flushed to openraft only after that commit. The state
//! machine is persistent (each `apply` batch commits the config rows, the last applied log id and
//! the membership together), so a restart resumes from the last applied entry without a
//! snapshot; the snapshot is persisted too, so it can still be sent to a lagging follower after
//! a restart.
//!
//! # Blocking
//!
//! SQLite calls block. The storage trait methods run them with `tokio::task::spawn_blocking`
//! (on a clone of the [`Store`] handle) and await the result, so the raft core task never blocks
//! a runtime worker and writes stay serialized (each trait call finishes its write before it
//! returns, and openraft calls them one at a time). The read accessors of the state machine
//! ([`SqliteStateMachine::get`], [`SqliteStateMachine::all`], [`SqliteStateMachine::revision`])
//! and the constructors are synchronous, like the rest of [`Store`]'s API: one short query each.
//!
//! # Corruption
//!
//! A row or snapshot that does not decode, or decodes to something inconsistent (an entry whose
//! log id is not its row's, a snapshot whose content disagrees with its metadata, a bad
//! checksum), is a [`ConsensusStoreError::Corrupt`], reported to openraft as a `StorageError`
//! (which stops the raft node). Nothing is ever reset silently.
//!
//! # Wiring (for the integrator)
//!
//! `Cargo.toml` of the federation crate needs `openraft = { version = "=0.9.25", features =
//! ["serde", "storage-v2"] }` and `miniz_oxide = "0.8"`; `storage-v2` is required: without it
//! openraft 0.9 seals `RaftLogStorage` and `RaftStateMachine` against outside implementations.
//! `lib.rs` then declares `pub mod consensus;` (between `cert` and `directory`, for rustfmt).
//!
//! # Not done yet
//!
//! - Replicating the pairing registry and the member list: new [`Command`] variants (at the
//!   end), their tables in [`SqliteStateMachine`], and a snapshot format version 2 carrying them.
//! - Snapshots are built and held in memory (`Cursor<Vec<u8>>`): fine for a config of a few
//!   megabytes, not for large state.
//! - The raft tables share the [`Store`]'s one connection (and its mutex) with the rest of the
//!   gateway: each raft write (append, commit, apply) is one fsynced transaction under that lock.
//!   Enough for config traffic; a busy log would want its own connection or database file.
//! - The committed log id on disk may lag (it is written with the next append, not in a
//!   transaction of its own per commit advance): entries committed but not applied at a crash
//!   are applied once a leader tells the commit index again.

pub mod election;
pub mod group_commit;
pub mod log_store;
pub mod network;
pub mod piggyback;
pub(crate) mod recovery;
pub mod replica;
pub mod state_machine;
pub mod types;

pub use log_store::SqliteLogStore;
pub use replica::{ConsensusError, ConsensusStatus, Replica, ReplicaConfig, Timings, WriteAck};
pub use state_machine::SqliteStateMachine;
pub use types::{
    node_id_of, Command, CommandResult, Entry, GatewayNode, LogId, NodeId, Snapshot, SnapshotMeta,
    StorageError, StoredMembership, TypeConfig, Vote,
};

use openraft::{AnyError, ErrorSubject, ErrorVerb, StorageIOError};
use rusqlite::types::Value;
use rusqlite::Connection;

use crate::store::{Store, StoreError};

/// Errors of the consensus storage, before they are handed to openraft as a [`StorageError`].
#[derive(Debug, thiserror::Error)]
pub enum ConsensusStoreError {
    /// SQLite failed (I/O error, full disk, locked or corrupt database file).
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A stored row or a snapshot does not decode, or contradicts itself.
    #[error("corrupt raft storage: {what}: {reason} (restore the state database from a backup, or remove this gateway's raft state and let it re-sync from the primary)")]
    Corrupt {
        /// What was being read (table and row, or snapshot).
        what: String,
        /// Why it is rejected.
        reason: String,
    },
    /// A value cannot be encoded for storage.
    #[error("cannot encode {what} for raft storage: {reason}")]
    Encode {
        /// What was being encoded.
        what: String,
        /// Why.
        reason: String,
    },
    /// A log index or revision does not fit SQLite's signed 64-bit integers.
    #[error("log index {0} is out of range for the raft storage")]
    IndexOutOfRange(u64),
    /// The blocking task running the SQLite call panicked or was cancelled.
    #[error("raft storage task failed: {0}")]
    Task(String),
}

impl ConsensusStoreError {
    /// Converts into openraft's error, saying what was done (`verb`) to what (`subject`).
    pub fn into_storage_error(
        self,
        subject: ErrorSubject<NodeId>,
        verb: ErrorVerb,
    ) -> StorageError {
        StorageIOError::new(subject, verb, AnyError::new(&self)).into()
    }

    pub(crate) fn corrupt(what: impl Into<String>, reason: impl ToString) -> Self {
        ConsensusStoreError::Corrupt {
            what: what.into(),
            reason: reason.to_string(),
        }
    }

    pub(crate) fn encode(what: impl Into<String>, reason: impl ToString) -> Self {
        ConsensusStoreError::Encode {
            what: what.into(),
            reason: reason.to_string(),
        }
    }
}

/// Opens both halves of the storage on `store` (creating their tables if needed).
pub fn open(store: &Store) -> Result<(SqliteLogStore, SqliteStateMachine), ConsensusStoreError> {
    Ok((
        SqliteLogStore::open(store.clone())?,
        SqliteStateMachine::open(store.clone())?,
    ))
}

/// Runs `f` on the database connection in tokio's blocking pool and waits for it.
pub(crate) async fn run_blocking<T, F>(store: &Store, f: F) -> Result<T, ConsensusStoreError>
where
    T: Send + 'static,
    F: FnOnce(&mut Connection) -> rusqlite::Result<T> + Send + 'static,
{
    let store = store.clone();
    tokio::task::spawn_blocking(move || store.with_conn(f))
        .await
        .map_err(|e| ConsensusStoreError::Task(e.to_string()))?
        .map_err(ConsensusStoreError::from)
}

/// A log index as SQLite stores it.
pub(crate) fn sql_index(index: u64) -> Result<i64, ConsensusStoreError> {
    i64::try_from(index).map_err(|_| ConsensusStoreError::IndexOutOfRange(index))
}

/// A log index read back from SQLite (`what` names the row for the error).
pub(crate) fn index_from_sql(value: i64, what: &str) -> Result<u64, ConsensusStoreError> {
    u64::try_from(value)
        .map_err(|_| ConsensusStoreError::corrupt(what, format!("negative index {value}")))
}

/// The bytes of a column read as a raw SQLite value (BLOB, or TEXT written by hand).
pub(crate) fn sql_bytes(value: Value, what: &str) -> Result<Vec<u8>, ConsensusStoreError> {
    match value {
        Value::Blob(bytes) => Ok(bytes),
        Value::Text(text) => Ok(text.into_bytes()),
        other => Err(ConsensusStoreError::corrupt(
            what,
            format!("holds {} instead of bytes", other.data_type()),
        )),
    }
}

/// The text of a column read as a raw SQLite value.
pub(crate) fn sql_text(value: Value, what: &str) -> Result<String, ConsensusStoreError> {
    match value {
        Value::Text(text) => Ok(text),
        Value::Blob(bytes) => {
            String::from_utf8(bytes).map_err(|e| ConsensusStoreError::corrupt(what, e))
        }
        other => Err(ConsensusStoreError::corrupt(
            what,
            format!("holds {} instead of text", other.data_type()),
        )),
    }
}

/// The integer of a column read as a raw SQLite value.
pub(crate) fn sql_int(value: Value, what: &str) -> Result<i64, ConsensusStoreError> {
    match value {
        Value::Integer(n) => Ok(n),
        other => Err(ConsensusStoreError::corrupt(
            what,
            format!("holds {} instead of an integer", other.data_type()),
        )),
    }
}

/// Decodes a JSON value of a metadata row.
pub(crate) fn from_json<T: serde::de::DeserializeOwned>(
    bytes: &[u8],
    what: &str,
) -> Result<T, ConsensusStoreError> {
    serde_json::from_slice(bytes).map_err(|e| ConsensusStoreError::corrupt(what, e))
}

/// Encodes a value of a metadata row as JSON.
pub(crate) fn to_json<T: serde::Serialize>(
    value: &T,
    what: &str,
) -> Result<Vec<u8>, ConsensusStoreError> {
    serde_json::to_vec(value).map_err(|e| ConsensusStoreError::encode(what, e))
}

#[cfg(test)]
pub(crate) mod testing {
    //! Helpers shared by the tests of this module.

    use std::collections::{BTreeMap, BTreeSet};

    use openraft::{CommittedLeaderId, EntryPayload, Membership};

    use super::types::{Command, Entry, GatewayNode, LogId};
    use crate::store::Store;

    /// A state database in a fresh temporary directory (kept while the guard lives).
    pub(crate) fn temp_store() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        (dir, store)
    }

    pub(crate) fn log_id(term: u64, index: u64) -> LogId {
        LogId::new(CommittedLeaderId::new(term, 1), index)
    }

    pub(crate) fn blank(term: u64, index: u64) -> Entry {
        Entry {
            log_id: log_id(term, index),
            payload: EntryPayload::Blank,
        }
    }

    pub(crate) fn normal(term: u64, index: u64, command: Command) -> Entry {
        Entry {
            log_id: log_id(term, index),
            payload: EntryPayload::Normal(command),
        }
    }

    pub(crate) fn gateway(id: u64) -> GatewayNode {
        GatewayNode {
            name: format!("gw{id}"),
            addr: format!("127.0.0.1:{}", 7000 + id),
            key: [id as u8; 32],
        }
    }

    pub(crate) fn membership(term: u64, index: u64, ids: &[u64]) -> Entry {
        let voters: BTreeSet<u64> = ids.iter().copied().collect();
        let nodes: BTreeMap<u64, GatewayNode> = ids.iter().map(|&id| (id, gateway(id))).collect();
        Entry {
            log_id: log_id(term, index),
            payload: EntryPayload::Membership(Membership::new(vec![voters], nodes)),
        }
    }

    pub(crate) fn set(key: &str, value: &str) -> Command {
        Command::SetConfig {
            key: key.into(),
            value: Some(value.into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::sync::Arc;
    use std::time::Duration;

    use openraft::error::{InstallSnapshotError, RPCError, RaftError, Unreachable};
    use openraft::network::RPCOption;
    use openraft::raft::{
        AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest,
        InstallSnapshotResponse, VoteRequest, VoteResponse,
    };
    use openraft::testing::{StoreBuilder, Suite};
    use openraft::{Config, ErrorSubject, ErrorVerb, Raft, RaftNetwork, RaftNetworkFactory};

    use super::*;

    /// Builds both stores on a fresh state database for each test of openraft's suite.
    struct SqliteBuilder;

    impl StoreBuilder<TypeConfig, SqliteLogStore, SqliteStateMachine, tempfile::TempDir>
        for SqliteBuilder
    {
        async fn build(
            &self,
        ) -> Result<(tempfile::TempDir, SqliteLogStore, SqliteStateMachine), StorageError> {
            let (dir, store) = testing::temp_store();
            let (log, sm) = open(&store)
                .map_err(|e| e.into_storage_error(ErrorSubject::Store, ErrorVerb::Write))?;
            Ok((dir, log, sm))
        }
    }

    /// openraft's own storage test suite (it runs its own tokio runtimes).
    #[test]
    fn openraft_storage_suite() {
        Suite::test_all(SqliteBuilder).unwrap();
    }

    /// The network of a single-node cluster: never used, every call fails.
    struct NoNetwork;

    fn unreachable<E: std::error::Error>() -> RPCError<NodeId, GatewayNode, E> {
        RPCError::Unreachable(Unreachable::new(&std::io::Error::other("single-node test")))
    }

    impl RaftNetworkFactory<TypeConfig> for NoNetwork {
        type Network = NoNetwork;

        async fn new_client(&mut self, _target: NodeId, _node: &GatewayNode) -> NoNetwork {
            NoNetwork
        }
    }

    impl RaftNetwork<TypeConfig> for NoNetwork {
        async fn append_entries(
            &mut self,
            _rpc: AppendEntriesRequest<TypeConfig>,
            _option: RPCOption,
        ) -> Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, GatewayNode, RaftError<NodeId>>>
        {
            Err(unreachable())
        }

        async fn install_snapshot(
            &mut self,
            _rpc: InstallSnapshotRequest<TypeConfig>,
            _option: RPCOption,
        ) -> Result<
            InstallSnapshotResponse<NodeId>,
            RPCError<NodeId, GatewayNode, RaftError<NodeId, InstallSnapshotError>>,
        > {
            Err(unreachable())
        }

        async fn vote(
            &mut self,
            _rpc: VoteRequest<NodeId>,
            _option: RPCOption,
        ) -> Result<VoteResponse<NodeId>, RPCError<NodeId, GatewayNode, RaftError<NodeId>>>
        {
            Err(unreachable())
        }
    }

    async fn start(store: &Store) -> (Raft<TypeConfig>, SqliteStateMachine) {
        let config = Config {
            heartbeat_interval: 50,
            election_timeout_min: 150,
            election_timeout_max: 300,
            ..Default::default()
        };
        let (log, sm) = open(store).unwrap();
        let raft = Raft::new(
            1,
            Arc::new(config.validate().unwrap()),
            NoNetwork,
            log,
            sm.clone(),
        )
        .await
        .unwrap();
        (raft, sm)
    }

    async fn write(raft: &Raft<TypeConfig>, key: &str, value: &str) -> u64 {
        raft.client_write(testing::set(key, value))
            .await
            .unwrap()
            .data
            .revision
    }

    /// A real single-node openraft cluster on the stores: writes, a snapshot, a log purge and a
    /// restart.
    #[tokio::test]
    async fn single_node_raft_writes_snapshots_and_restarts() {
        let (dir, store) = testing::temp_store();
        let (raft, sm) = start(&store).await;
        raft.initialize(BTreeMap::from([(1, testing::gateway(1))]))
            .await
            .unwrap();
        raft.wait(Some(Duration::from_secs(5)))
            .metrics(|m| m.current_leader == Some(1), "leader")
            .await
            .unwrap();

        let first = write(&raft, "a", "1").await;
        let second = write(&raft, "b", "[true]").await;
        assert!(second > first);
        assert_eq!(sm.get("a").unwrap(), Some(("1".into(), first)));
        assert_eq!(sm.revision().unwrap(), second);

        raft.trigger().snapshot().await.unwrap();
        raft.wait(Some(Duration::from_secs(5)))
            .metrics(
                |m| m.snapshot.is_some_and(|s| s.index >= second),
                "snapshot",
            )
            .await
            .unwrap();
        raft.trigger().purge_log(second).await.unwrap();
        raft.wait(Some(Duration::from_secs(5)))
            .metrics(|m| m.purged.is_some_and(|p| p.index >= second), "purged")
            .await
            .unwrap();
        let third = write(&raft, "a", "3").await;
        raft.shutdown().await.unwrap();
        drop((raft, sm, store));

        // Restart on the same database: the state, the log and the vote are back.
        let store = Store::open(dir.path()).unwrap();
        let (raft, sm) = start(&store).await;
        assert_eq!(
            sm.all().unwrap(),
            vec![
                ("a".into(), "3".into(), third),
                ("b".into(), "[true]".into(), second)
            ]
        );
        raft.wait(Some(Duration::from_secs(5)))
            .metrics(|m| m.current_leader == Some(1), "leader after restart")
            .await
            .unwrap();
        let fourth = write(&raft, "c", "null").await;
        assert!(fourth > third);
        let metrics = raft.metrics().borrow().clone();
        assert!(metrics.purged.is_some_and(|p| p.index >= second));
        assert!(metrics.snapshot.is_some());
        raft.shutdown().await.unwrap();
    }
}
