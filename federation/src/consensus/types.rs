//! The openraft type configuration of the federation's replicated state, and its commands.
//!
//! Everything here is part of the stored and the wire format (raft log entries, snapshots and
//! raft RPCs carry these types), so the rules of the wire protocol apply: enums grow only at the
//! end, fields are never reordered or retyped.

use serde::{Deserialize, Serialize};

/// A raft node id: the first 8 bytes of the gateway's device id, see [`node_id_of`].
pub type NodeId = u64;

openraft::declare_raft_types!(
    /// The openraft type configuration of the federation: commands are [`Command`], results are
    /// [`CommandResult`], nodes are gateways ([`GatewayNode`]) and snapshots are in-memory
    /// byte buffers (the replicated state is small).
    pub TypeConfig:
        D = Command,
        R = CommandResult,
        NodeId = NodeId,
        Node = GatewayNode,
        Entry = openraft::Entry<TypeConfig>,
        SnapshotData = std::io::Cursor<Vec<u8>>,
        AsyncRuntime = openraft::TokioRuntime,
);

/// A raft log entry of the federation.
pub type Entry = openraft::Entry<TypeConfig>;

/// The raft log id (leader term and node, index) of the federation.
pub type LogId = openraft::LogId<NodeId>;

/// A raft vote of the federation.
pub type Vote = openraft::Vote<NodeId>;

/// A membership as last applied or stored, with the log id that introduced it.
pub type StoredMembership = openraft::StoredMembership<NodeId, GatewayNode>;

/// Metadata of a snapshot of the replicated state.
pub type SnapshotMeta = openraft::SnapshotMeta<NodeId, GatewayNode>;

/// A snapshot of the replicated state: its metadata and its bytes.
pub type Snapshot = openraft::Snapshot<TypeConfig>;

/// The error type of the storage traits.
pub type StorageError = openraft::StorageError<NodeId>;

/// A gateway as a raft member: what a peer needs to reach it and to authenticate it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GatewayNode {
    /// The gateway's name in the federation.
    pub name: String,
    /// Where its QUIC endpoint listens (`host:port`).
    pub addr: String,
    /// Its ed25519 public key (the device id is the SHA-256 of it).
    pub key: [u8; 32],
}

/// A change to the replicated state; the `D` of [`TypeConfig`].
///
/// Values are JSON text; applying a command never parses them (the state machine must stay
/// deterministic and must not fail on input), so the proposer checks them first with
/// [`Command::check`].
///
/// Stored in the raft log: variants are only ever added at the end.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    /// Sets (`Some(json)`) or unsets (`None`) one config key.
    SetConfig {
        /// The config key.
        key: String,
        /// The new value as JSON text, or `None` to remove the key.
        value: Option<String>,
    },
    /// Sets or unsets several keys at once (all or nothing, one revision for all of them).
    SetConfigBatch(Vec<(String, Option<String>)>),
    /// Changes nothing; advances the applied revision (a read barrier, a leadership probe).
    Noop,
    /// Pairing decisions (approvals, revocations) made on some gateway: merged into every
    /// gateway's registry, newest decision per device wins, a revocation wins a tie.
    Pairing(Vec<crate::pairing::PairingRecord>),
    /// The federation's member list (pinned gateway keys, names, addresses) at an epoch, as
    /// the primary admitted them: every gateway adopts it when it is newer than its own.
    Members(crate::wire::Membership),
    /// Several independent writes committed in one entry by the leader's group commit
    /// ([`super::group_commit`]): applied in order, every one at this entry's revision. The
    /// leader never puts two writes of the same config key into one group, so each write's
    /// key holds exactly that write's value at the revision its writer is told.
    Group(Vec<Command>),
}

impl Command {
    /// Checks that every value is well-formed JSON text (what the proposer must check before
    /// proposing: the state machine stores values as they come).
    pub fn check(&self) -> Result<(), serde_json::Error> {
        let check = |value: &Option<String>| match value {
            Some(text) => serde_json::from_str::<serde_json::Value>(text).map(|_| ()),
            None => Ok(()),
        };
        match self {
            Command::SetConfig { value, .. } => check(value),
            Command::SetConfigBatch(changes) => changes.iter().try_for_each(|(_, v)| check(v)),
            Command::Noop | Command::Pairing(_) | Command::Members(_) => Ok(()),
            Command::Group(writes) => writes.iter().try_for_each(Command::check),
        }
    }

    /// The config keys this command writes (none for the commands that write no config key).
    pub fn keys(&self) -> Vec<&str> {
        match self {
            Command::SetConfig { key, .. } => vec![key.as_str()],
            Command::SetConfigBatch(changes) => changes.iter().map(|(k, _)| k.as_str()).collect(),
            Command::Group(writes) => writes.iter().flat_map(Command::keys).collect(),
            Command::Noop | Command::Pairing(_) | Command::Members(_) => Vec::new(),
        }
    }

    /// Bytes of config keys and values this command carries (its share of a raft entry, for
    /// the group commit's size bound; commands that write no config count one byte per
    /// pairing record or member, roughly).
    pub fn weight(&self) -> usize {
        let change = |k: &String, v: &Option<String>| k.len() + v.as_ref().map_or(0, String::len);
        match self {
            Command::SetConfig { key, value } => change(key, value),
            Command::SetConfigBatch(changes) => changes.iter().map(|(k, v)| change(k, v)).sum(),
            Command::Group(writes) => writes.iter().map(Command::weight).sum(),
            Command::Noop => 0,
            Command::Pairing(records) => records.len() * 256,
            Command::Members(_) => 4096,
        }
    }
}

/// What applying one log entry returns; the `R` of [`TypeConfig`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommandResult {
    /// The log index of the entry: the revision of the keys it wrote, and the state machine's
    /// revision right after it.
    pub revision: u64,
}

/// The raft node id of a gateway: the first 8 bytes of its device id, big endian.
///
/// Device ids are SHA-256 hashes, so two gateways share a node id only by a 64-bit collision;
/// membership changes should still refuse a gateway whose node id is already taken by another
/// device id.
pub fn node_id_of(device_id: &[u8; 32]) -> NodeId {
    let mut first = [0u8; 8];
    first.copy_from_slice(&device_id[..8]);
    u64::from_be_bytes(first)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_id_is_first_eight_bytes_big_endian() {
        let mut id = [0xffu8; 32];
        id[..8].copy_from_slice(&[0, 1, 2, 3, 4, 5, 6, 7]);
        assert_eq!(node_id_of(&id), 0x0001_0203_0405_0607);
    }

    #[test]
    fn command_check_rejects_bad_json() {
        let ok = Command::SetConfigBatch(vec![
            ("a".into(), Some("{\"x\":1}".into())),
            ("b".into(), None),
        ]);
        assert!(ok.check().is_ok());
        let bad = Command::SetConfig {
            key: "a".into(),
            value: Some("{not json".into()),
        };
        assert!(bad.check().is_err());
        assert!(Command::Noop.check().is_ok());
    }

    #[test]
    fn command_encoding_is_stable() {
        // Variant indexes are part of the stored log format: this pins them.
        let bytes = postcard::to_stdvec(&Command::Noop).unwrap();
        assert_eq!(bytes, vec![2]);
        let bytes = postcard::to_stdvec(&Command::SetConfig {
            key: "k".into(),
            value: None,
        })
        .unwrap();
        assert_eq!(bytes, vec![0, 1, b'k', 0]);
        let bytes = postcard::to_stdvec(&Command::Group(vec![Command::Noop])).unwrap();
        assert_eq!(bytes, vec![5, 1, 2]);
    }

    #[test]
    fn group_keys_and_check() {
        let g = Command::Group(vec![
            Command::SetConfig {
                key: "a".into(),
                value: Some("1".into()),
            },
            Command::SetConfigBatch(vec![("b".into(), None), ("c".into(), Some("2".into()))]),
            Command::Noop,
        ]);
        assert_eq!(g.keys(), vec!["a", "b", "c"]);
        assert_eq!(g.weight(), 5);
        assert!(g.check().is_ok());
        let bad = Command::Group(vec![Command::SetConfig {
            key: "a".into(),
            value: Some("{".into()),
        }]);
        assert!(bad.check().is_err());
    }
}
