//! The gateway's registry of attached nodes, and invoking commands on them.
//!
//! A node session is one interface whatever the transport: today native QUIC, with the classic
//! WebSocket bridge to come. The registry, node selection and invoke error mapping do not know
//! which transport a node uses.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use clawmesh_federation::identity::{DeviceId, PublicKey};
use clawmesh_federation::liveness::Liveness;
use clawmesh_federation::rpc::{self, CallError};
use clawmesh_federation::vitals::Received;
use clawmesh_federation::wire::{Request, WireError};
use quinn::{Connection, VarInt};

use crate::gateway::node_changes::{ChangeLog, Changes, Cursor, FullReads};
use serde_json::{json, Value};

/// A node's transport-specific session.
#[derive(Debug, Clone)]
pub enum NodeLink {
    /// A `clawmesh node run` over QUIC.
    Quic(Connection),
    /// A classic `openclaw node run` over the WebSocket bridge.
    Classic(crate::bridge::classic_node::ClassicLink),
}

impl NodeLink {
    /// Transport name, as shown in `nodes status`.
    pub fn transport(&self) -> &'static str {
        match self {
            NodeLink::Quic(_) => "quic",
            NodeLink::Classic(_) => "ws",
        }
    }

    /// Closes the session with a reason the node logs.
    pub fn close(&self, reason: &str) {
        match self {
            NodeLink::Quic(c) => c.close(VarInt::from_u32(4001), reason.as_bytes()),
            NodeLink::Classic(l) => l.close(reason),
        }
    }

    /// Runs `command` on the node; the result is the command's payload as JSON text.
    pub async fn invoke(
        &self,
        command: &str,
        params: &Value,
        timeout: Duration,
        idempotency_key: &str,
    ) -> Result<String, CallError> {
        match self {
            NodeLink::Classic(l) => l.invoke(command, params, timeout, idempotency_key).await,
            NodeLink::Quic(conn) => {
                let req = Request {
                    id: rpc::next_request_id(),
                    method: command.to_string(),
                    params: params.to_string(),
                    hops: 0,
                };
                rpc::call_request(conn, req, timeout).await
            }
        }
    }
}

/// What a node told us about itself, plus where it is.
#[derive(Debug, Clone)]
pub struct NodeInfo {
    /// Device id.
    pub node_id: DeviceId,
    /// Device key.
    pub key: PublicKey,
    /// Display name.
    pub name: String,
    /// Address it connected from.
    pub remote: String,
    /// Platform.
    pub platform: String,
    /// Software version.
    pub version: String,
    /// Commands it offers.
    pub commands: Vec<String>,
    /// Labels.
    pub labels: Vec<(String, String)>,
    /// Which of the node's attachments this session is (newer ones win federation-wide).
    pub attach: clawmesh_federation::directory::AttachOrder,
    /// When this session began.
    pub connected_at: SystemTime,
    /// Client id (`clawmesh-node`, classic `node-host`).
    pub client_id: String,
    /// Client mode (`node`).
    pub client_mode: String,
    /// Device family (classic), e.g. `Linux`.
    pub device_family: String,
    /// Declared capabilities (classic).
    pub caps: Vec<String>,
    /// The node's PATH, if it said.
    pub path_env: Option<String>,
}

/// What the alert rows keep of one attached node ([`NodeRegistry::alert_brief`]).
#[derive(Debug, Clone)]
pub struct AlertBrief {
    /// Display name.
    pub name: String,
    /// Which of the node's attachments this session is.
    pub attach: clawmesh_federation::directory::AttachOrder,
    /// The session (vitals of an older session of the node are not its own).
    pub session: u64,
    /// Its host vitals, if it sent some.
    pub vitals: Option<Received>,
}

impl AlertBrief {
    fn of(e: &Entry) -> AlertBrief {
        AlertBrief {
            name: e.info.name.clone(),
            attach: e.info.attach,
            session: e.session,
            vitals: e.live.as_ref().and_then(Liveness::vitals),
        }
    }
}

struct Entry {
    info: NodeInfo,
    link: NodeLink,
    session: u64,
    /// A native node's pings and host vitals (a classic node has none).
    live: Option<Liveness>,
}

/// Connected nodes, by device id.
pub struct NodeRegistry {
    nodes: Mutex<HashMap<DeviceId, Entry>>,
    next: AtomicU64,
    changes: tokio::sync::watch::Sender<u64>,
    /// Which nodes changed, for consumers that work per change (see [`ChangeLog`]).
    log: ChangeLog,
    /// Full reads its consumers did (first reads, overflows).
    full_reads: FullReads,
}

impl Default for NodeRegistry {
    fn default() -> Self {
        NodeRegistry {
            nodes: Mutex::default(),
            next: AtomicU64::new(0),
            changes: tokio::sync::watch::channel(0).0,
            log: ChangeLog::default(),
            full_reads: FullReads::default(),
        }
    }
}

impl NodeRegistry {
    fn lock(&self) -> MutexGuard<'_, HashMap<DeviceId, Entry>> {
        // Updates are single inserts/removes; a poisoned map is still consistent.
        self.nodes.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Bumped on every attach and detach, so the gateway can announce its nodes.
    pub fn changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changes.subscribe()
    }

    /// How many attaches and detaches there have been: a listing cache built at one value is
    /// still right while it stays.
    pub fn generation(&self) -> u64 {
        *self.changes.borrow()
    }

    /// The host vitals of each of `ids` (`None`: not attached, or none sent), in the order
    /// asked: a page of a listing looks up only its own rows.
    pub fn vitals_of(&self, ids: &[DeviceId]) -> Vec<Option<Received>> {
        let nodes = self.lock();
        ids.iter()
            .map(|id| nodes.get(id).and_then(|e| e.live.as_ref()?.vitals()))
            .collect()
    }

    fn changed(&self, node: DeviceId) {
        self.log.record(node);
        self.changes.send_modify(|v| *v += 1);
    }

    /// Which nodes attached, detached or changed since `cursor` (see [`ChangeLog::since`]):
    /// a consumer reads only those again, or every node once after [`Changes::Overflowed`].
    pub fn changes_since(&self, cursor: Option<Cursor>) -> (Changes, Cursor) {
        self.log.since(cursor)
    }

    /// How often the change log's consumers read every node (see [`FullReads`]).
    pub fn full_reads(&self) -> &FullReads {
        &self.full_reads
    }

    /// How many nodes are attached (without listing them).
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether no node is attached.
    pub fn is_empty(&self) -> bool {
        self.lock().is_empty()
    }

    /// What the alert rows keep of an attached node: its name, attachment, session and host
    /// vitals (`None`: not attached).
    pub fn alert_brief(&self, node: &DeviceId) -> Option<AlertBrief> {
        self.lock().get(node).map(AlertBrief::of)
    }

    /// [`Self::alert_brief`] of every attached node: the alert rows' full read.
    pub fn alert_briefs(&self) -> Vec<(DeviceId, AlertBrief)> {
        self.lock()
            .iter()
            .map(|(id, e)| (*id, AlertBrief::of(e)))
            .collect()
    }

    /// Registers a session; a previous session of the same node is closed (superseded).
    pub fn attach(&self, info: NodeInfo, link: NodeLink) -> u64 {
        let session = self.next.fetch_add(1, Ordering::Relaxed) + 1;
        let node_id = info.node_id;
        let old = self.lock().insert(
            info.node_id,
            Entry {
                info,
                link,
                session,
                live: None,
            },
        );
        if let Some(old) = old {
            old.link.close("superseded by a new session");
        }
        self.changed(node_id);
        session
    }

    /// Removes a session if it is still the current one.
    pub fn detach(&self, node: &DeviceId, session: u64) {
        let mut nodes = self.lock();
        if nodes.get(node).map(|e| e.session) == Some(session) {
            nodes.remove(node);
            drop(nodes);
            self.changed(*node);
        }
    }

    /// Disconnects a node at once (revoked).
    pub fn disconnect(&self, node: &DeviceId, reason: &str) -> bool {
        let removed = self.lock().remove(node);
        match removed {
            Some(e) => {
                e.link.close(reason);
                self.changed(*node);
                true
            }
            None => false,
        }
    }

    /// What an invoke of `command` needs of an attached node, without copying its
    /// description: its link, or (`Err`) the commands it offers when it did not declare
    /// `command`.
    pub fn for_invoke(&self, node: &DeviceId, command: &str) -> Option<Result<NodeLink, String>> {
        self.lock().get(node).map(|e| {
            if e.info.commands.iter().any(|c| c == command) {
                Ok(e.link.clone())
            } else {
                Err(e.info.commands.join(", "))
            }
        })
    }

    /// An attached node's display name and which of its attachments this is (what resolving
    /// an invoke's target needs), without copying the rest of its description.
    pub fn brief(
        &self,
        node: &DeviceId,
    ) -> Option<(String, clawmesh_federation::directory::AttachOrder)> {
        self.lock()
            .get(node)
            .map(|e| (e.info.name.clone(), e.info.attach))
    }

    /// A connected node's info and link.
    pub fn get(&self, node: &DeviceId) -> Option<(NodeInfo, NodeLink)> {
        self.lock()
            .get(node)
            .map(|e| (e.info.clone(), e.link.clone()))
    }

    /// Keeps `live` (a native session's pings and vitals) with the node's session, if that
    /// session is still the current one.
    pub fn set_liveness(&self, node: &DeviceId, session: u64, live: Liveness) {
        if let Some(e) = self.lock().get_mut(node).filter(|e| e.session == session) {
            e.live = Some(live);
        }
    }

    /// The host vitals of every attached node that has sent some, with its name.
    pub fn vitals(&self) -> Vec<(DeviceId, String, Received)> {
        self.lock()
            .iter()
            .filter_map(|(id, e)| Some((*id, e.info.name.clone(), e.live.as_ref()?.vitals()?)))
            .collect()
    }

    /// Attached nodes per transport: (native QUIC, classic WebSocket).
    pub fn count_by_transport(&self) -> (usize, usize) {
        let nodes = self.lock();
        let quic = nodes
            .values()
            .filter(|e| matches!(e.link, NodeLink::Quic(_)))
            .count();
        (quic, nodes.len() - quic)
    }

    /// The ids of the attached nodes for which `wanted` holds: resolving a selector by name,
    /// IP or id prefix compares in place and copies no node's description.
    pub fn ids_where(&self, wanted: impl Fn(&NodeInfo) -> bool) -> Vec<DeviceId> {
        self.lock()
            .values()
            .filter(|e| wanted(&e.info))
            .map(|e| e.info.node_id)
            .collect()
    }

    /// One attached node's description and transport, if it is attached: what resolving a
    /// selector and a consumer of the change log read per node.
    pub fn info(&self, node: &DeviceId) -> Option<(NodeInfo, &'static str)> {
        self.lock()
            .get(node)
            .map(|e| (e.info.clone(), e.link.transport()))
    }

    /// Every connected node.
    pub fn list(&self) -> Vec<(NodeInfo, &'static str)> {
        self.lock()
            .values()
            .map(|e| (e.info.clone(), e.link.transport()))
            .collect()
    }
}

/// The IP part of `host:port`.
pub fn ip_of(addr: &str) -> String {
    addr.parse::<std::net::SocketAddr>()
        .map(|a| a.ip().to_string())
        .unwrap_or_else(|_| addr.to_string())
}

/// Picks the entry a selector means: exact node id, then IP, then name, then an id prefix of
/// at least 6 characters; connected entries win ties (the classic CLI's order).
pub fn resolve<'a>(selector: &str, entries: &'a [Value]) -> Result<&'a Value, WireError> {
    let sel = selector.trim();
    let norm = |s: &str| s.trim().to_lowercase();
    let tiers: [&dyn Fn(&Value) -> bool; 4] = [
        &|e: &Value| e["nodeId"] == sel,
        &|e: &Value| e["remoteIp"] == sel,
        &|e: &Value| e["displayName"].as_str().map(norm) == Some(norm(sel)),
        &|e: &Value| {
            sel.len() >= 6
                && e["nodeId"]
                    .as_str()
                    .map(|id| id.starts_with(sel))
                    .unwrap_or(false)
        },
    ];
    for tier in tiers {
        let hits: Vec<&Value> = entries.iter().filter(|e| tier(e)).collect();
        let connected: Vec<&Value> = hits
            .iter()
            .copied()
            .filter(|e| e["connected"] == true)
            .collect();
        let pool = if connected.is_empty() {
            hits
        } else {
            connected
        };
        match pool.len() {
            0 => continue,
            1 => return Ok(pool[0]),
            _ => {
                let names: Vec<String> = pool
                    .iter()
                    .map(|e| {
                        format!(
                            "{} ({})",
                            e["displayName"].as_str().unwrap_or("?"),
                            e["nodeId"]
                                .as_str()
                                .map(|s| &s[..s.len().min(12)])
                                .unwrap_or("?")
                        )
                    })
                    .collect();
                return Err(WireError::new(
                    "INVALID_REQUEST",
                    format!(
                        "node {sel:?} is ambiguous: {}; use the node id",
                        names.join(", ")
                    ),
                ));
            }
        }
    }
    let mut e = WireError::new(
        "INVALID_REQUEST",
        format!("unknown node: {sel} (see `clawmesh nodes status`)"),
    );
    e.details = Some(json!({"code": "UNKNOWN_NODE", "node": sel}).to_string());
    Err(e)
}

/// Maps a failed invoke to the classic error the operator sees.
pub fn invoke_error(err: CallError, node: &str, timeout: Duration) -> WireError {
    match err {
        CallError::Timeout { .. } => {
            let mut e = WireError::new(
                "UNAVAILABLE",
                format!(
                    "TIMEOUT: node invoke timed out after {} ms (node {node} was told to cancel)",
                    timeout.as_millis()
                ),
            );
            e.details = Some(
                json!({"nodeError":{"code":"TIMEOUT","message":"node invoke timed out"},"nodeCommandDispatched":true})
                    .to_string(),
            );
            e.retryable = true;
            e
        }
        CallError::Remote(n) => {
            let mut e = WireError::new(
                if n.code == "INVALID_REQUEST" {
                    "INVALID_REQUEST"
                } else {
                    "UNAVAILABLE"
                },
                format!("{}: {}", n.code, n.message),
            );
            e.details = Some(
                json!({"nodeError":{"code":n.code,"message":n.message},"nodeCommandDispatched":true}).to_string(),
            );
            e
        }
        other => {
            let mut e = WireError::new(
                "UNAVAILABLE",
                format!("node {node} disconnected during the invoke: {other}"),
            );
            e.details = Some(
                json!({"nodeError":{"code":"NOT_CONNECTED","message":other.to_string()},"nodeCommandDispatched":true})
                    .to_string(),
            );
            e
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn selector_order_and_errors() {
        let entries = vec![
            json!({"nodeId":"aaaaaa111111","displayName":"Web-1","remoteIp":"10.0.0.1","connected":false}),
            json!({"nodeId":"aaaaaa222222","displayName":"web-1","remoteIp":"10.0.0.2","connected":true}),
            json!({"nodeId":"bbbbbb333333","displayName":"db","remoteIp":"10.0.0.3","connected":true}),
        ];
        assert_eq!(
            resolve("bbbbbb333333", &entries).unwrap()["displayName"],
            "db"
        );
        assert_eq!(
            resolve("10.0.0.1", &entries).unwrap()["nodeId"],
            "aaaaaa111111"
        );
        // Name match prefers the connected one.
        assert_eq!(
            resolve("WEB-1", &entries).unwrap()["nodeId"],
            "aaaaaa222222"
        );
        assert!(resolve("aaaaaa", &entries).is_ok()); // prefix: connected wins
        assert!(resolve("bbb", &entries).is_err()); // too short for a prefix
        let e = resolve("nope", &entries).unwrap_err();
        assert!(e.message.contains("unknown node"));
    }
}
