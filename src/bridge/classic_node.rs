//! A classic node host's session, seen from the gateway: invokes become `node.invoke.request`
//! events on its socket, answered by its `node.invoke.result` requests.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use clawmesh_federation::pairing::uuid_v4;
use clawmesh_federation::rpc::CallError;
use clawmesh_federation::wire::WireError;
use serde_json::{json, Value};
use tokio::sync::oneshot;

use super::frames;
use super::outbox::Outbox;

/// Invokes in flight per node: a node runs a few commands at once; past this the gateway
/// answers busy instead of queueing without bound.
const MAX_PENDING: usize = 1024;

type Pending = Arc<Mutex<HashMap<String, oneshot::Sender<Result<String, WireError>>>>>;

/// The gateway's handle on a classic node's socket.
#[derive(Clone, Debug)]
pub struct ClassicLink {
    out: Outbox,
    node_id: String,
    pending: Pending,
}

impl ClassicLink {
    /// A link over a connection's send queue.
    pub fn new(out: Outbox, node_id: String) -> Self {
        ClassicLink {
            out,
            node_id,
            pending: Arc::default(),
        }
    }

    fn pending(
        &self,
    ) -> std::sync::MutexGuard<'_, HashMap<String, oneshot::Sender<Result<String, WireError>>>>
    {
        // Single inserts and removes: a poisoned map is still consistent.
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Sends `node.invoke.request` and waits for the node's result; on timeout the node is
    /// sent `node.invoke.cancel`.
    pub async fn invoke(
        &self,
        command: &str,
        params: &Value,
        timeout: Duration,
        idempotency_key: &str,
    ) -> Result<String, CallError> {
        let id = uuid_v4();
        let (tx, rx) = oneshot::channel();
        {
            let mut p = self.pending();
            if p.len() >= MAX_PENDING {
                return Err(CallError::Remote(WireError::new(
                    "UNAVAILABLE",
                    "node busy: too many invokes in flight",
                )));
            }
            p.insert(id.clone(), tx);
        }
        let params_json = if params.is_null() {
            Value::Null
        } else {
            json!(params.to_string())
        };
        let sent = self.out.text(frames::event(
            "node.invoke.request",
            json!({
                "id": id,
                "nodeId": self.node_id,
                "command": command,
                "paramsJSON": params_json,
                "timeoutMs": timeout.as_millis() as u64,
                "idempotencyKey": idempotency_key,
            }),
            None,
        ));
        if !sent {
            self.pending().remove(&id);
            return Err(CallError::Transport {
                peer: self.node_id.clone(),
                reason: "node connection is closing".into(),
            });
        }
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(r)) => r.map_err(CallError::Remote),
            Ok(Err(_)) => Err(CallError::Transport {
                peer: self.node_id.clone(),
                reason: "node disconnected".into(),
            }),
            Err(_) => {
                self.pending().remove(&id);
                self.out.text(frames::event(
                    "node.invoke.cancel",
                    json!({"invokeId": id, "nodeId": self.node_id}),
                    None,
                ));
                Err(CallError::Timeout {
                    peer: self.node_id.clone(),
                    timeout,
                })
            }
        }
    }

    /// Delivers a `node.invoke.result`; false when the id is unknown or late.
    pub fn resolve(&self, params: &Value) -> bool {
        let Some(id) = params.get("id").and_then(Value::as_str) else {
            return false;
        };
        let Some(tx) = self.pending().remove(id) else {
            return false;
        };
        let ok = params.get("ok").and_then(Value::as_bool).unwrap_or(false);
        let result = if ok {
            match params.get("payloadJSON").and_then(Value::as_str) {
                Some(s) => Ok(s.to_string()),
                None => Ok(params
                    .get("payload")
                    .cloned()
                    .unwrap_or(Value::Null)
                    .to_string()),
            }
        } else {
            let e = params.get("error").cloned().unwrap_or(Value::Null);
            Err(WireError::new(
                e.get("code")
                    .and_then(Value::as_str)
                    .unwrap_or("UNAVAILABLE"),
                e.get("message")
                    .and_then(Value::as_str)
                    .unwrap_or("node error"),
            ))
        };
        let _ = tx.send(result);
        true
    }

    /// Closes the node's socket (revoked, superseded).
    pub fn close(&self, reason: &str) {
        self.out.close(4001, reason);
    }

    /// Fails every pending invoke (the socket is gone).
    pub fn fail_all(&self) {
        self.pending().clear();
    }
}
