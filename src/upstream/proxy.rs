//! One proxy: a classic node host on the OpenClaw gateway that stands for one federation node.
//!
//! It connects as `openclaw node run` does (its own ed25519 device key, role `node`, the real
//! node's commands, a display name that says where the node is), answers each
//! `node.invoke.request` by running `node.invoke` through this gateway's method table (which
//! delegates across the federation to wherever the node is attached), and drops the call on
//! `node.invoke.cancel` (the drop travels to the node, which kills the process group). It
//! reconnects with backoff when the socket closes.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use clawmesh_federation::backoff::Backoff;
use clawmesh_federation::identity::DeviceIdentity;
use clawmesh_federation::rpc::{Caller, CallerKind};
use futures_util::{SinkExt as _, StreamExt as _};
use serde_json::{json, Value};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_tungstenite::tungstenite::Message;
use tracing::{debug, info, warn, Instrument as _};

use super::client::{self, Challenge};
use super::{dial, Context, UpstreamError};
use crate::gateway::scopes;

/// Reconnect backoff: first retry after 0.5–1 s, doubling to a 5–10 s ceiling (half-jitter,
/// so a hundred proxies that lost the same OpenClaw gateway do not redial in lockstep). The
/// cap is a third of the classic node host's 30 s: an OpenClaw restart (10 to 30 s here) is
/// noticed within 10 s of the gateway being back, and a long outage costs each proxy one
/// refused TCP connect every 5–10 s, which is nothing for a gateway that is down.
const BACKOFF_BASE: Duration = Duration::from_secs(1);
const BACKOFF_CAP: Duration = Duration::from_secs(10);

/// Frames waiting to be written to the OpenClaw gateway: invoke results only, one per
/// invoke in flight, so the in-flight bound below bounds this too; a full queue makes the
/// invoke tasks wait (backpressure), nothing is dropped.
const OUT_QUEUE: usize = 256;

/// Invokes in flight per proxy. More are refused with `UNAVAILABLE` (counted in
/// [`Stats::refused`]): OpenClaw's agents call a node one command at a time; hundreds at once
/// is a runaway loop, not work.
const MAX_INFLIGHT: usize = 256;

/// The tick interval when `hello-ok` names none (the classic gateway's 30 s); the socket is
/// given up after two silent intervals, the classic client's own watchdog rule.
const DEFAULT_TICK: Duration = Duration::from_secs(30);

/// What a proxy stands for: one federation node and how it is shown in OpenClaw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Spec {
    /// The federation node's device id.
    pub node_id: String,
    /// The name the proxy connects with (`name (place, region)`).
    pub display_name: String,
    /// The real node's platform (`linux`), signed into the connect.
    pub platform: String,
    /// The real node's commands, declared to OpenClaw.
    pub commands: Vec<String>,
}

/// Counters of one proxy, for logs and tests.
#[derive(Debug, Default)]
pub struct Stats {
    /// Successful handshakes.
    pub connects: AtomicU64,
    /// Invokes answered (ok or error).
    pub invokes: AtomicU64,
    /// Invokes cancelled by OpenClaw (timeout or cancel).
    pub cancelled: AtomicU64,
    /// Invokes refused because [`MAX_INFLIGHT`] were running.
    pub refused: AtomicU64,
}

/// The device family OpenClaw shows for a platform (signed, lowercased, into the connect).
fn family(platform: &str) -> &'static str {
    match platform {
        "darwin" | "macos" => "macOS",
        "win32" | "windows" => "Windows",
        _ => "Linux",
    }
}

/// Runs the proxy until its task is aborted (the node left the federation or the gateway
/// stops).
pub async fn run(spec: Spec, key: DeviceIdentity, ctx: Arc<Context>, stats: Arc<Stats>) {
    let proxy_id = key.device_id().to_string();
    let span = tracing::info_span!("upstream", node = %spec.display_name, proxy = %&proxy_id[..12]);
    async move {
        let mut backoff = Backoff::new(BACKOFF_BASE, BACKOFF_CAP);
        loop {
            let mut connected = false;
            let mut pairing = false;
            match session(&spec, &key, &ctx, &stats, &mut connected).await {
                Ok(()) => info!("OpenClaw gateway closed the connection; reconnecting"),
                Err(UpstreamError::Refused {
                    code,
                    message,
                    details,
                }) => {
                    if details["code"] == "PAIRING_REQUIRED" {
                        pairing = true;
                        info!(
                            request = details["requestId"].as_str().unwrap_or(""),
                            "waiting for pairing approval in OpenClaw{}",
                            if ctx.settings.auto_approve {
                                " (auto-approving)"
                            } else {
                                ""
                            }
                        );
                        ctx.approve_soon();
                    } else {
                        warn!("OpenClaw refused the proxy: {code} {message} {details}");
                    }
                }
                Err(e) => {
                    if connected {
                        info!("connection lost: {e}; reconnecting");
                    } else {
                        debug!("cannot connect: {e}");
                    }
                }
            }
            if connected {
                backoff.reset();
            }
            let approved = ctx.approved.notified();
            tokio::select! {
                _ = tokio::time::sleep(backoff.next_delay()) => {}
                // Approved in OpenClaw (by the auto-approver): connect at once.
                _ = approved, if pairing => {}
            }
        }
    }
    .instrument(span)
    .await
}

/// The connect params of this proxy for the challenge `ch`.
fn connect_params(spec: &Spec, key: &DeviceIdentity, token: &str, ch: &Challenge) -> Value {
    let fam = family(&spec.platform);
    let mut p = json!({
        "minProtocol": 4,
        "maxProtocol": 4,
        "client": {
            "id": "node-host",
            "displayName": spec.display_name,
            "version": crate::VERSION,
            "platform": spec.platform,
            "deviceFamily": fam,
            "mode": "node",
            "instanceId": spec.node_id,
        },
        "caps": ["system"],
        "commands": spec.commands,
        "role": "node",
        "scopes": [],
        "device": client::device_proof(key, "node-host", "node", "node", &[], token, ch, &spec.platform, fam),
    });
    if !token.is_empty() {
        p["auth"] = json!({"token": token});
    }
    p
}

/// One connection: handshake, then events until the socket closes.
async fn session(
    spec: &Spec,
    key: &DeviceIdentity,
    ctx: &Arc<Context>,
    stats: &Arc<Stats>,
    connected: &mut bool,
) -> Result<(), UpstreamError> {
    let mut ws = dial::open(&ctx.settings.url, ctx.pin).await?;
    let token = ctx.settings.token.clone().unwrap_or_default();
    let hello = client::handshake(&mut ws, |ch| connect_params(spec, key, &token, ch)).await?;
    *connected = true;
    stats.connects.fetch_add(1, Ordering::Relaxed);
    info!("attached to the OpenClaw gateway as a node host");
    // The capability surface may be awaiting approval now.
    ctx.approve_soon();
    let tick = hello["policy"]["tickIntervalMs"]
        .as_u64()
        .filter(|ms| *ms > 0)
        .map(Duration::from_millis)
        .unwrap_or(DEFAULT_TICK);
    let watchdog = tick * 2;
    let proxy_id = key.device_id().to_string();
    let (mut sink, mut stream) = ws.split();
    let (tx, mut rx) = mpsc::channel::<Value>(OUT_QUEUE);
    let mut running: HashMap<String, tokio::task::AbortHandle> = HashMap::new();
    let mut task_of: HashMap<tokio::task::Id, String> = HashMap::new();
    let mut tasks: JoinSet<()> = JoinSet::new();
    let mut next_id: u64 = 2;
    loop {
        tokio::select! {
            frame = tokio::time::timeout(watchdog, stream.next()) => {
                let frame = match frame {
                    Err(_) => return Err(UpstreamError::Closed(format!("no tick for {watchdog:?}"))),
                    Ok(None) => return Ok(()),
                    Ok(Some(Err(e))) => return Err(UpstreamError::Closed(e.to_string())),
                    Ok(Some(Ok(Message::Text(t)))) => t,
                    Ok(Some(Ok(Message::Close(c)))) => {
                        return Err(UpstreamError::Closed(c.map(|c| format!("{} {}", u16::from(c.code), c.reason)).unwrap_or_default()))
                    }
                    Ok(Some(Ok(_))) => continue,
                };
                let Ok(f) = serde_json::from_str::<Value>(frame.as_str()) else {
                    warn!("OpenClaw sent a frame that is not JSON; ignored");
                    continue;
                };
                if f["type"] != "event" {
                    continue;
                }
                let p = &f["payload"];
                match f["event"].as_str().unwrap_or("") {
                    "node.invoke.request" => {
                        let Some(id) = p["id"].as_str().filter(|s| !s.is_empty()).map(str::to_string) else {
                            warn!("node.invoke.request without an id; ignored");
                            continue;
                        };
                        if running.len() >= MAX_INFLIGHT {
                            stats.refused.fetch_add(1, Ordering::Relaxed);
                            let err = json!({"code": "UNAVAILABLE", "message": format!("busy: {MAX_INFLIGHT} invokes already running on this proxy")});
                            let _ = tx.try_send(json!({"id": id, "nodeId": proxy_id, "ok": false, "error": err}));
                            continue;
                        }
                        let fut = invoke(ctx.clone(), spec.node_id.clone(), proxy_id.clone(), id.clone(), p.clone());
                        let (tx, stats) = (tx.clone(), stats.clone());
                        let h = tasks.spawn(async move {
                            let result = fut.await;
                            stats.invokes.fetch_add(1, Ordering::Relaxed);
                            let _ = tx.send(result).await;
                        }.instrument(tracing::info_span!("invoke", id = %id)));
                        task_of.insert(h.id(), id.clone());
                        running.insert(id, h);
                    }
                    "node.invoke.cancel" => {
                        if let Some(h) = p["invokeId"].as_str().and_then(|i| running.remove(i)) {
                            debug!(invoke = p["invokeId"].as_str().unwrap_or(""), "cancelled by OpenClaw");
                            stats.cancelled.fetch_add(1, Ordering::Relaxed);
                            h.abort();
                        }
                    }
                    _ => {}
                }
            }
            Some(result) = rx.recv() => {
                let id = format!("{next_id}:{}", clawmesh_federation::pairing::uuid_v4());
                next_id += 1;
                let frame = json!({"type": "req", "id": id, "method": "node.invoke.result", "params": result});
                sink.send(Message::text(frame.to_string())).await.map_err(|e| UpstreamError::Closed(e.to_string()))?;
            }
            Some(done) = tasks.join_next_with_id(), if !tasks.is_empty() => {
                let tid = match done { Ok((tid, ())) => tid, Err(e) => e.id() };
                if let Some(id) = task_of.remove(&tid) {
                    running.remove(&id);
                }
            }
        }
    }
}

/// Runs one `node.invoke.request` through the method table; the `node.invoke.result` params.
async fn invoke(
    ctx: Arc<Context>,
    node_id: String,
    proxy_id: String,
    id: String,
    p: Value,
) -> Value {
    let command = p["command"].as_str().unwrap_or("").to_string();
    let params = match &p["paramsJSON"] {
        Value::String(s) => serde_json::from_str(s).unwrap_or(Value::Null),
        _ => p.get("params").cloned().unwrap_or(Value::Null),
    };
    let params = if params.is_null() { json!({}) } else { params };
    let caller = Caller {
        key: None,
        kind: CallerKind::Operator {
            scopes: vec![scopes::WRITE.into(), scopes::APPROVALS.into()],
            client: format!("openclaw-upstream {}", ctx.settings.url),
        },
        remote: std::net::SocketAddr::from(([0, 0, 0, 0], 0)),
    };
    // A node's exec approvals have their own methods in clawmesh (OpenClaw's
    // `exec.approvals.node.*` arrive here as these two commands).
    let r = match command.as_str() {
        "system.execApprovals.get" | "system.execApprovals.set" => {
            let method = if command.ends_with(".get") {
                "exec.approvals.node.get"
            } else {
                "exec.approvals.node.set"
            };
            let mut q = params.clone();
            q["nodeId"] = json!(node_id);
            ctx.methods
                .dispatch(&caller, method, q)
                .await
                .map(|v| json!({"payloadJSON": v.to_string()}))
        }
        _ => {
            let mut req = json!({
                "nodeId": node_id,
                "command": command,
                "params": params,
                "idempotencyKey": p["idempotencyKey"].as_str().map(str::to_string).unwrap_or_else(clawmesh_federation::pairing::uuid_v4),
            });
            if let Some(ms) = p["timeoutMs"].as_u64() {
                req["timeoutMs"] = json!(ms);
            }
            ctx.methods.dispatch(&caller, "node.invoke", req).await
        }
    };
    match r {
        Ok(v) => {
            let text = match &v["payloadJSON"] {
                Value::String(s) => s.clone(),
                _ => v["payload"].to_string(),
            };
            json!({"id": id, "nodeId": proxy_id, "ok": true, "payloadJSON": text})
        }
        Err(e) => {
            json!({"id": id, "nodeId": proxy_id, "ok": false, "error": {"code": e.code, "message": e.message}})
        }
    }
}
