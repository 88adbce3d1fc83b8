//! One classic WebSocket connection: challenge, `connect`, `hello-ok`, then requests both ways
//! until it closes. Operators' requests go to the gateway's method table; a node's socket also
//! carries its invokes.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use axum::extract::ws::{CloseFrame, Message, WebSocket};
use clawmesh_federation::pairing::uuid_v4;
use clawmesh_federation::rpc::{Caller, CallerKind};
use clawmesh_federation::wire::WireError;
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tracing::{debug, info, Instrument};

use super::classic_node::ClassicLink;
use super::connect::{self, Authed, Role};
use super::frames::{self, Inbound};
use super::outbox::{Outbound, Outbox};
use super::Bridge;
use crate::gateway::registry::{NodeInfo, NodeLink};

/// Largest frame before `hello-ok` (classic: 64 KiB, close 1009).
pub const PREAUTH_MAX: usize = 65_536;

/// How long a client has to send `connect` after the challenge: the classic client gives up
/// after 15 s, so a little more is never the gateway's fault.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(20);

/// Tick interval announced in `hello-ok.policy.tickIntervalMs` (the classic value); the node
/// host drops a socket that stays silent for twice this.
pub const TICK_INTERVAL: Duration = Duration::from_secs(30);

/// WebSocket ping interval; a peer silent for three intervals is closed.
const PING_INTERVAL: Duration = Duration::from_secs(25);

/// Requests one connection may have in flight; beyond it the gateway answers busy.
const MAX_IN_FLIGHT: usize = 256;

/// Methods only node hosts may call.
const NODE_METHODS: &[&str] = &[
    "node.invoke.result",
    "node.invoke.progress",
    "node.event",
    "node.pending.pull",
    "node.pending.ack",
    "node.pending.drain",
    "node.skills.update",
    "node.pluginTools.update",
    "node.runnerInventory.update",
    "node.pluginSurface.refresh",
    "skills.bins",
];

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Serves one upgraded socket until it closes.
pub async fn run(socket: WebSocket, remote: SocketAddr, bridge: Arc<Bridge>) {
    let conn_id = uuid_v4();
    let span = tracing::info_span!("ws", %remote, conn = %&conn_id[..8]);
    serve(socket, remote, bridge, conn_id)
        .instrument(span)
        .await
}

async fn serve(socket: WebSocket, remote: SocketAddr, bridge: Arc<Bridge>, conn_id: String) {
    let (mut sink, mut stream) = socket.split();
    let (out, mut rx, queued) = Outbox::new();
    let writer = tokio::spawn(async move {
        while let Some(o) = rx.recv().await {
            let r = match o {
                Outbound::Text(s) => {
                    let len = s.len();
                    let r = sink.send(Message::Text(s.into())).await;
                    queued.fetch_sub(len, Ordering::Relaxed);
                    r
                }
                Outbound::Ping => sink.send(Message::Ping(Default::default())).await,
                Outbound::Close(code, reason) => {
                    let _ = sink
                        .send(Message::Close(Some(CloseFrame {
                            code,
                            reason: reason.into(),
                        })))
                        .await;
                    break;
                }
            };
            if r.is_err() {
                break;
            }
        }
        let _ = sink.close().await;
    });

    let nonce = uuid_v4();
    out.text(frames::event(
        "connect.challenge",
        json!({"nonce": nonce, "ts": now_ms()}),
        None,
    ));

    let authed = match handshake(&mut stream, &out, &bridge, &nonce, remote, &conn_id).await {
        Some(a) => a,
        None => {
            let _ = tokio::time::timeout(Duration::from_secs(2), writer).await;
            return;
        }
    };
    info!(role = authed.role.as_str(), client = %authed.client_id, name = %authed.display_name, "classic client connected");

    let caller = Caller {
        key: authed.device,
        kind: match authed.role {
            Role::Operator => CallerKind::Operator {
                scopes: authed.scopes.clone(),
                client: authed.client_id.clone(),
            },
            Role::Node => CallerKind::Node {
                name: authed.display_name.clone(),
            },
        },
        remote,
    };
    let node = match (authed.role, authed.device) {
        (Role::Node, Some(key)) => {
            let link = ClassicLink::new(out.clone(), key.device_id().to_string());
            let info = NodeInfo {
                node_id: key.device_id(),
                key,
                name: authed.display_name.clone(),
                remote: remote.to_string(),
                platform: authed.platform.clone(),
                version: authed.version.clone(),
                commands: authed.commands.clone(),
                labels: Vec::new(),
                // A classic node says nothing about its attachments: any native one orders
                // after it (see `directory::resolve`).
                attach: Default::default(),
                connected_at: SystemTime::now(),
                client_id: authed.client_id.clone(),
                client_mode: authed.client_mode.clone(),
                device_family: authed.device_family.clone(),
                caps: authed.caps.clone(),
                path_env: authed.path_env.clone(),
            };
            let session = bridge
                .methods
                .nodes()
                .attach(info, NodeLink::Classic(link.clone()));
            Some((key.device_id(), session, link))
        }
        _ => None,
    };

    let mut tick =
        tokio::time::interval_at(tokio::time::Instant::now() + TICK_INTERVAL, TICK_INTERVAL);
    let mut ping =
        tokio::time::interval_at(tokio::time::Instant::now() + PING_INTERVAL, PING_INTERVAL);
    let mut shutdown = bridge.shutdown.clone();
    let mut seq: u64 = 0;
    let mut last_inbound = Instant::now();
    let mut unauthorized_in_a_row = 0u32;
    let in_flight = Arc::new(tokio::sync::Semaphore::new(MAX_IN_FLIGHT));
    loop {
        tokio::select! {
            msg = stream.next() => {
                let msg = match msg {
                    Some(Ok(m)) => m,
                    Some(Err(e)) => {
                        // tungstenite refuses frames over maxPayload before we see them.
                        let text = e.to_string();
                        if text.contains("too long") || text.contains("Space limit") {
                            out.close(1009, "payload too large");
                        } else {
                            debug!("socket error: {text}");
                        }
                        break;
                    }
                    None => break,
                };
                last_inbound = Instant::now();
                let text = match msg {
                    Message::Text(t) => t.to_string(),
                    Message::Close(_) => break,
                    Message::Binary(_) => {
                        out.close(1003, "binary frames are not supported");
                        break;
                    }
                    _ => continue,
                };
                let Ok(frame) = serde_json::from_str::<Inbound>(&text) else {
                    out.close(1008, "invalid JSON frame");
                    break;
                };
                let id = frame.id.clone().unwrap_or(Value::Null);
                let (Some("req"), Some(method)) = (frame.kind.as_deref(), frame.method.clone()) else {
                    out.text(frames::res_err(&id, &WireError::new("INVALID_REQUEST", "invalid frame: expected a request")));
                    continue;
                };
                let params = match frame.params {
                    None | Some(Value::Null) => json!({}),
                    Some(p) => p,
                };
                let node_only = NODE_METHODS.contains(&method.as_str());
                let role_ok = match authed.role {
                    Role::Node => node_only,
                    Role::Operator => !node_only,
                };
                if !role_ok {
                    unauthorized_in_a_row += 1;
                    out.text(frames::res_err(&id, &WireError::new("INVALID_REQUEST", format!("unauthorized role: {}", authed.role.as_str()))));
                    if unauthorized_in_a_row > 10 {
                        out.close(1008, "repeated unauthorized calls");
                        break;
                    }
                    continue;
                }
                unauthorized_in_a_row = 0;
                if authed.role == Role::Node {
                    let reply = node_request(&method, &params, &authed, node.as_ref().map(|n| &n.2));
                    out.text(match reply {
                        Ok(v) => frames::res_ok(&id, v),
                        Err(e) => frames::res_err(&id, &e),
                    });
                    continue;
                }
                let Ok(permit) = in_flight.clone().try_acquire_owned() else {
                    let mut e = WireError::new("UNAVAILABLE", "too many requests in flight on this connection");
                    e.retryable = true;
                    out.text(frames::res_err(&id, &e));
                    continue;
                };
                let (methods, caller, out) = (bridge.methods.clone(), caller.clone(), out.clone());
                tokio::spawn(async move {
                    let r = methods.dispatch(&caller, &method, params).await;
                    out.text(match r {
                        Ok(v) => frames::res_ok(&id, v),
                        Err(e) => frames::res_err(&id, &e),
                    });
                    drop(permit);
                }.in_current_span());
            }
            _ = tick.tick() => {
                seq += 1;
                out.text(frames::event("tick", json!({"ts": now_ms()}), Some(seq)));
            }
            _ = ping.tick() => {
                if last_inbound.elapsed() > PING_INTERVAL * 3 {
                    out.close(1001, "ping timeout");
                    break;
                }
                out.ping();
            }
            r = shutdown.changed() => {
                if r.is_ok() {
                    let reason = shutdown.borrow().clone().unwrap_or_else(|| "gateway stopping".into());
                    seq += 1;
                    out.text(frames::event("shutdown", json!({"reason": reason}), Some(seq)));
                    out.close(1012, "service restart");
                }
                break;
            }
        }
        if out.is_closing() {
            break;
        }
    }
    if let Some((node_id, session, link)) = node {
        link.fail_all();
        bridge.methods.nodes().detach(&node_id, session);
        info!(name = %authed.display_name, "classic node detached");
    }
    if !out.is_closing() {
        out.close(1000, "bye");
    }
    let _ = tokio::time::timeout(Duration::from_secs(2), writer).await;
    debug!("connection closed");
}

/// Reads and checks `connect`; answers hello-ok or the refusal. None: the socket is done.
async fn handshake(
    stream: &mut futures_util::stream::SplitStream<WebSocket>,
    out: &Outbox,
    bridge: &Bridge,
    nonce: &str,
    remote: SocketAddr,
    conn_id: &str,
) -> Option<Authed> {
    let msg = match tokio::time::timeout(HANDSHAKE_TIMEOUT, stream.next()).await {
        Ok(Some(Ok(m))) => m,
        Ok(_) => return None,
        Err(_) => {
            out.close(1008, "connect timeout");
            return None;
        }
    };
    let text = match msg {
        Message::Text(t) => t.to_string(),
        Message::Binary(b) if b.len() > PREAUTH_MAX => {
            out.close(1009, "preauth payload too large");
            return None;
        }
        _ => {
            out.close(1008, "invalid handshake: first request must be connect");
            return None;
        }
    };
    if text.len() > PREAUTH_MAX {
        out.close(1009, "preauth payload too large");
        return None;
    }
    let frame: Inbound = match serde_json::from_str(&text) {
        Ok(f) => f,
        Err(_) => {
            out.close(1008, "invalid handshake: malformed JSON");
            return None;
        }
    };
    let id = frame.id.clone().unwrap_or(Value::Null);
    if frame.kind.as_deref() != Some("req") || frame.method.as_deref() != Some("connect") {
        let msg = "invalid handshake: first request must be connect";
        if frame.kind.as_deref() == Some("req") {
            out.text(frames::res_err(
                &id,
                &WireError::new("INVALID_REQUEST", msg),
            ));
        }
        out.close(1008, msg);
        return None;
    }
    let params = frame.params.unwrap_or(Value::Null);
    // Signature checks and SQLite lookups (with an fsync on a new pairing request) run off the
    // async workers, so a burst of connects never stalls established sessions.
    let (secrets, pairing, nonce_owned, region) = (
        bridge.secrets.clone(),
        bridge.methods.pairing().clone(),
        nonce.to_string(),
        bridge.methods.region(),
    );
    let decided = tokio::task::spawn_blocking(move || {
        let gate = connect::Gate {
            secrets: &secrets,
            region,
            pairing: &pairing,
            now_ms: now_ms() as i64,
        };
        connect::authenticate(&gate, &params, &nonce_owned, remote)
    })
    .await;
    let decided = match decided {
        Ok(d) => d,
        Err(e) => {
            out.close(1011, "internal error");
            tracing::warn!("connect check failed: {e}");
            return None;
        }
    };
    match decided {
        Ok(a) => {
            let mut auth = json!({"role": a.role.as_str(), "scopes": a.scopes, "method": a.method});
            if let Some((t, at)) = &a.device_token {
                auth["deviceToken"] = json!(t);
                auth["issuedAtMs"] = json!(at);
            }
            let hello = json!({
                "type": "hello-ok",
                "protocol": connect::PROTOCOL,
                "server": {"version": crate::VERSION, "connId": conn_id},
                "features": {"methods": bridge.features_methods(), "events": EVENTS},
                "snapshot": {"presence": [], "health": {}, "stateVersion": {"presence": 0, "health": 0}, "uptimeMs": bridge.started.elapsed().as_millis() as u64},
                "auth": auth,
                "policy": {"maxPayload": super::MAX_PAYLOAD, "maxBufferedBytes": super::outbox::MAX_BUFFERED_BYTES, "tickIntervalMs": TICK_INTERVAL.as_millis() as u64},
            });
            out.text(frames::res_ok(&id, hello));
            Some(a)
        }
        Err(r) => {
            info!(code = %r.error.code, "classic connect refused: {}", r.error.message);
            out.text(frames::res_err(&id, &r.error));
            out.close(r.close_code, &r.close_reason);
            None
        }
    }
}

/// Events this bridge sends.
const EVENTS: &[&str] = &[
    "connect.challenge",
    "tick",
    "shutdown",
    "node.invoke.request",
    "node.invoke.cancel",
];

/// Requests from a node host.
fn node_request(
    method: &str,
    params: &Value,
    authed: &Authed,
    link: Option<&ClassicLink>,
) -> Result<Value, WireError> {
    let node_id = authed
        .device
        .map(|k| k.device_id().to_string())
        .unwrap_or_default();
    match method {
        "node.invoke.result" => {
            if let Some(n) = params.get("nodeId").and_then(Value::as_str) {
                if n != node_id {
                    return Err(WireError::new("INVALID_REQUEST", "nodeId mismatch"));
                }
            }
            let handled = link.map(|l| l.resolve(params)).unwrap_or(false);
            Ok(if handled {
                json!({"ok": true})
            } else {
                json!({"ok": true, "ignored": true})
            })
        }
        "node.event" => Ok(json!({
            "ok": true,
            "event": params.get("event").cloned().unwrap_or(Value::Null),
            "handled": true,
            "reason": "updated",
        })),
        "node.invoke.progress" => Ok(json!({"ok": true, "ignored": true})),
        "node.skills.update" => Ok(json!({"nodeId": node_id, "skills": []})),
        "node.pluginTools.update" => Ok(json!({"nodeId": node_id, "tools": []})),
        "node.runnerInventory.update" => Ok(json!({"nodeId": node_id})),
        other => Err(WireError::new(
            "INVALID_REQUEST",
            format!("unknown method: {other}"),
        )),
    }
}
