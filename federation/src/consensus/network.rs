//! Raft RPCs over the mesh's QUIC links.
//!
//! openraft's `RaftNetwork` is implemented on top of [`rpc::call`]: every raft message
//! (append-entries, vote, snapshot chunk) is one request stream on the existing,
//! mutually-authenticated link to the target gateway, found by its pinned device key
//! ([`GatewayNode::key`]). No second port, no second trust model.
//!
//! # Payload encoding
//!
//! [`Request::params`](crate::wire::Request) is text, so a raft message travels as
//! `base64(flag ‖ body)`, where the body is the postcard encoding of the openraft type and
//! `flag` says whether it is deflated: bodies over [`COMPRESS_OVER`] bytes are compressed when
//! compression is on (`gateway.sync.compression`), so a catch-up batch of many similar config
//! changes is a fraction of its raw size, while a one-key change (the common case) stays
//! uncompressed and small. Replies use the same encoding. Decompression is bounded by
//! [`MAX_FRAME`], like every other frame.

use std::time::Duration;

use openraft::error::{
    InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Timeout, Unreachable,
};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use openraft::{AnyError, RPCTypes, RaftLogReader};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tracing::debug;

use super::log_store::SqliteLogStore;
use super::piggyback::{self, FollowerAcks, PiggybackLimits};
use super::types::{GatewayNode, NodeId, TypeConfig};
use crate::frame::MAX_FRAME;
use crate::identity::PublicKey;
use crate::mesh::Mesh;
use crate::rpc::{self, CallError};

/// Raft method: append-entries (and heartbeats).
pub const METHOD_APPEND: &str = "raft.append";
/// Raft method: request a vote.
pub const METHOD_VOTE: &str = "raft.vote";
/// Raft method: one chunk of a snapshot.
pub const METHOD_SNAPSHOT: &str = "raft.snapshot";

/// Bodies larger than this are deflated when compression is on: below it the zlib header and
/// the base64 growth cost more than they save.
pub const COMPRESS_OVER: usize = 512;

const FLAG_PLAIN: u8 = 0;
const FLAG_DEFLATE: u8 = 1;

/// zlib level for raft payloads: fast (they are compressed on the leader's hot path).
const LEVEL: u8 = 3;

/// Why a raft payload could not be encoded or decoded.
#[derive(Debug, thiserror::Error)]
pub enum PayloadError {
    /// postcard failed to encode the value.
    #[error("cannot encode raft payload: {0}")]
    Encode(String),
    /// The text is not a well-formed payload.
    #[error("malformed raft payload: {0}")]
    Malformed(String),
}

/// Encodes a raft message for [`Request::params`](crate::wire::Request) or a reply.
pub fn encode<T: Serialize>(value: &T, compress: bool) -> Result<String, PayloadError> {
    encode_at(value, if compress { LEVEL } else { 0 })
}

/// [`encode`] at deflate `level` (0: never compress; 1 is the fastest, for bulk payloads such
/// as log batches whose CPU matters more than a few bytes). [`decode`] reads any level.
pub fn encode_at<T: Serialize>(value: &T, level: u8) -> Result<String, PayloadError> {
    use base64::Engine;
    let body = postcard::to_stdvec(value).map_err(|e| PayloadError::Encode(e.to_string()))?;
    let mut out = Vec::with_capacity(body.len() + 1);
    if level > 0 && body.len() > COMPRESS_OVER {
        out.push(FLAG_DEFLATE);
        out.extend_from_slice(&miniz_oxide::deflate::compress_to_vec_zlib(&body, level));
    } else {
        out.push(FLAG_PLAIN);
        out.extend_from_slice(&body);
    }
    Ok(base64::engine::general_purpose::STANDARD_NO_PAD.encode(out))
}

/// Decodes a raft message written by [`encode`].
pub fn decode<T: DeserializeOwned>(text: &str) -> Result<T, PayloadError> {
    use base64::Engine;
    let raw = base64::engine::general_purpose::STANDARD_NO_PAD
        .decode(text.trim_end_matches('='))
        .map_err(|e| PayloadError::Malformed(format!("not base64: {e}")))?;
    let (&flag, body) = raw
        .split_first()
        .ok_or_else(|| PayloadError::Malformed("empty".into()))?;
    let plain;
    let body = match flag {
        FLAG_PLAIN => body,
        FLAG_DEFLATE => {
            plain = miniz_oxide::inflate::decompress_to_vec_zlib_with_limit(body, MAX_FRAME)
                .map_err(|e| PayloadError::Malformed(format!("bad deflate stream: {e:?}")))?;
            &plain[..]
        }
        other => return Err(PayloadError::Malformed(format!("unknown flag {other}"))),
    };
    postcard::from_bytes(body).map_err(|e| PayloadError::Malformed(e.to_string()))
}

/// Builds a [`MeshClient`] per raft peer; the `N` of openraft's `Raft`.
#[derive(Clone)]
pub struct MeshNetwork {
    mesh: Mesh,
    compress: bool,
    log: SqliteLogStore,
    limits: PiggybackLimits,
}

impl MeshNetwork {
    /// Raft over `mesh`'s links; `compress` deflates large payloads. `log` is this gateway's
    /// raft log, read for the entries that ride on a commit-index update
    /// ([`piggyback`]), at most `max_entries` (openraft's `max_payload_entries`) at a time.
    pub fn new(mesh: Mesh, compress: bool, log: SqliteLogStore, max_entries: u64) -> Self {
        MeshNetwork {
            mesh,
            compress,
            log,
            limits: PiggybackLimits {
                entries: max_entries.max(1),
                bytes: piggyback::PIGGYBACK_BYTES,
            },
        }
    }
}

impl RaftNetworkFactory<TypeConfig> for MeshNetwork {
    type Network = MeshClient;

    async fn new_client(&mut self, target: NodeId, node: &GatewayNode) -> MeshClient {
        MeshClient {
            mesh: self.mesh.clone(),
            compress: self.compress,
            target,
            key: PublicKey(node.key),
            name: node.name.clone(),
            log: self.log.clone(),
            limits: self.limits,
            acks: FollowerAcks::default(),
        }
    }
}

/// Sends raft messages to one gateway over its mesh link.
pub struct MeshClient {
    mesh: Mesh,
    compress: bool,
    target: NodeId,
    key: PublicKey,
    name: String,
    log: SqliteLogStore,
    limits: PiggybackLimits,
    /// What this follower acknowledged under the current vote ([`piggyback`]).
    acks: FollowerAcks,
}

type RpcErr<E = openraft::error::Infallible> = RPCError<NodeId, GatewayNode, RaftError<NodeId, E>>;

impl MeshClient {
    async fn send<Req, Resp, E>(
        &self,
        method: &str,
        action: RPCTypes,
        req: &Req,
        ttl: Duration,
    ) -> Result<Resp, RpcErr<E>>
    where
        Req: Serialize,
        Resp: DeserializeOwned,
        E: std::error::Error + DeserializeOwned,
    {
        let Some(conn) = self.mesh.connection_by_key(&self.key) else {
            let e = std::io::Error::new(
                std::io::ErrorKind::NotConnected,
                format!("no link to gateway {}", self.name),
            );
            return Err(RPCError::Unreachable(Unreachable::new(&e)));
        };
        let params =
            encode(req, self.compress).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        match rpc::call(&conn, method, params, 0, ttl).await {
            Ok(text) => {
                let reply: Result<Resp, RaftError<NodeId, E>> =
                    decode(&text).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
                reply.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
            }
            Err(CallError::Timeout { .. }) => Err(RPCError::Timeout(Timeout {
                action,
                id: self.target,
                target: self.target,
                timeout: ttl,
            })),
            Err(CallError::Transport { reason, .. }) => {
                let e = std::io::Error::new(std::io::ErrorKind::ConnectionAborted, reason);
                Err(RPCError::Unreachable(Unreachable::new(&e)))
            }
            Err(e) => Err(RPCError::Network(NetworkError::new(&AnyError::error(
                e.to_string(),
            )))),
        }
    }
}

impl RaftNetwork<TypeConfig> for MeshClient {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RpcErr> {
        // Entries the follower already acknowledged (they rode on a commit-index update):
        // answered without a round trip, never beyond the acknowledgement.
        if let Some(resp) = self.acks.answer_early(&rpc) {
            debug!(target = %self.name, ?resp, "append answered from the follower's acknowledgement");
            return Ok(resp);
        }
        let sent = match piggyback::piggyback_after(&self.acks, &rpc) {
            Some(after) => {
                let from = after.map_or(0, |l| l.index + 1);
                let to = from.saturating_add(self.limits.entries);
                if self.log.next_index_hint() <= from {
                    // Nothing appended past it: no read (a lone write's commit-index update
                    // goes out at once, as before).
                    None
                } else {
                    match self.log.try_get_log_entries(from..to).await {
                        Ok(read) => piggyback::plan(&rpc, after, read, self.limits),
                        Err(e) => {
                            // Only an optimisation: the empty request goes as it is.
                            debug!(target = %self.name, "cannot read entries to piggyback: {e}");
                            None
                        }
                    }
                }
            }
            None => None,
        };
        let ttl = option.hard_ttl();
        match sent {
            Some(req) => {
                let resp = self
                    .send(METHOD_APPEND, RPCTypes::AppendEntries, &req, ttl)
                    .await?;
                self.acks.record(&req, &resp);
                Ok(piggyback::answer_for_empty(resp))
            }
            None => {
                let resp = self
                    .send(METHOD_APPEND, RPCTypes::AppendEntries, &rpc, ttl)
                    .await?;
                self.acks.record(&rpc, &resp);
                Ok(resp)
            }
        }
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<InstallSnapshotResponse<NodeId>, RpcErr<InstallSnapshotError>> {
        self.send(
            METHOD_SNAPSHOT,
            RPCTypes::InstallSnapshot,
            &rpc,
            option.hard_ttl(),
        )
        .await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RpcErr> {
        self.send(METHOD_VOTE, RPCTypes::Vote, &rpc, option.hard_ttl())
            .await
    }

    fn backoff(&self) -> openraft::network::Backoff {
        // An unreachable gateway is retried every 200 ms: fast enough that a restarted remote
        // catches up at once, slow enough to cost nothing while it is down.
        openraft::network::Backoff::new(std::iter::repeat(Duration::from_millis(200)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::consensus::types::Command;
    use openraft::{CommittedLeaderId, Entry, EntryPayload, LogId, Vote};

    fn append(n: usize) -> AppendEntriesRequest<TypeConfig> {
        AppendEntriesRequest {
            vote: Vote::new_committed(3, 7),
            prev_log_id: Some(LogId::new(CommittedLeaderId::new(3, 7), 10)),
            entries: (0..n)
                .map(|i| Entry {
                    log_id: LogId::new(CommittedLeaderId::new(3, 7), 11 + i as u64),
                    payload: EntryPayload::Normal(Command::SetConfig {
                        key: format!("models.providers.p{i}.baseUrl"),
                        value: Some(format!("\"https://example.invalid/v{i}\"")),
                    }),
                })
                .collect(),
            leader_commit: Some(LogId::new(CommittedLeaderId::new(3, 7), 10)),
        }
    }

    #[test]
    fn payload_round_trips_plain_and_compressed() {
        for n in [0, 1, 500] {
            let req = append(n);
            for compress in [false, true] {
                let text = encode(&req, compress).unwrap();
                let back: AppendEntriesRequest<TypeConfig> = decode(&text).unwrap();
                assert_eq!(back.entries.len(), n);
                assert_eq!(back.vote, req.vote);
            }
        }
        let plain = encode(&append(500), false).unwrap();
        let packed = encode(&append(500), true).unwrap();
        assert!(
            packed.len() * 3 < plain.len(),
            "{} vs {}",
            packed.len(),
            plain.len()
        );
    }

    #[test]
    fn one_change_is_small() {
        let text = encode(&append(1), true).unwrap();
        assert!(text.len() < 200, "{}", text.len());
    }

    #[test]
    fn replies_with_errors_round_trip() {
        let reply: Result<VoteResponse<NodeId>, RaftError<NodeId>> = Ok(VoteResponse {
            vote: Vote::new(4, 2),
            vote_granted: true,
            last_log_id: None,
        });
        let back: Result<VoteResponse<NodeId>, RaftError<NodeId>> =
            decode(&encode(&reply, true).unwrap()).unwrap();
        assert!(back.unwrap().vote_granted);
    }

    #[test]
    fn garbage_is_an_error() {
        assert!(decode::<Vote<NodeId>>("!!!").is_err());
        assert!(decode::<Vote<NodeId>>("").is_err());
        assert!(decode::<Vote<NodeId>>("Aw").is_err());
        // A deflate bomb flag with junk.
        assert!(decode::<Vote<NodeId>>("AQID").is_err());
    }
}
