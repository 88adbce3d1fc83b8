//! The gateway's operator method table: one table, several front doors.
//!
//! A method name and JSON params go in; a JSON result or a classic-shaped error comes out,
//! with the caller's role and scopes checked first. The native QUIC transport (CLI, agents),
//! requests from other gateways, and (later) the classic WebSocket bridge all call
//! [`Methods::dispatch`], so no method is written twice.

use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant, SystemTime};

use clawmesh_federation::mesh::Mesh;
use clawmesh_federation::pairing::{PairingError, Registry};
use clawmesh_federation::rpc::{BoxFuture, Caller, CallerKind, Handler};
use clawmesh_federation::wire::{Request, WireError};
use serde_json::{json, Value};

use crate::nodes::{self, NodeRegistry};
use crate::scopes;

/// Largest params document accepted (JSON text): operator requests are small; a bigger one
/// is a mistake or an attack.
const MAX_PARAMS: usize = 1024 * 1024;

/// Default and longest `node.invoke` timeouts: the classic gateway's 30 s default; a command
/// may be given up to 10 minutes, never forever.
const DEFAULT_INVOKE_TIMEOUT: Duration = Duration::from_secs(30);
const MAX_INVOKE_TIMEOUT: Duration = Duration::from_secs(600);

/// Who may call a method.
#[derive(Debug, Clone, Copy)]
enum Access {
    /// Anyone admitted (the classic `health` has no scope check).
    Any,
    /// Operators holding this scope (gateways of the federation are trusted).
    Scope(&'static str),
}

/// Every method the table serves, with its access rule.
const TABLE: &[(&str, Access)] = &[
    ("health", Access::Any),
    ("status", Access::Scope(scopes::READ)),
    ("gateway.status", Access::Scope(scopes::READ)),
    ("gateway.identity", Access::Scope(scopes::READ)),
    ("gateway.forget", Access::Scope(scopes::ADMIN)),
    ("node.list", Access::Scope(scopes::READ)),
    ("node.describe", Access::Scope(scopes::READ)),
    ("node.invoke", Access::Scope(scopes::WRITE)),
    ("device.pair.list", Access::Scope(scopes::PAIRING)),
    ("device.pair.approve", Access::Scope(scopes::PAIRING)),
    ("device.pair.reject", Access::Scope(scopes::PAIRING)),
    ("device.pair.remove", Access::Scope(scopes::PAIRING)),
    ("exec.approvals.node.get", Access::Scope(scopes::APPROVALS)),
    ("exec.approvals.node.set", Access::Scope(scopes::APPROVALS)),
];

/// Names of every method, for `hello-ok.features.methods` and `gateway call --help`.
pub fn method_names() -> Vec<&'static str> {
    TABLE.iter().map(|(n, _)| *n).collect()
}

/// The method table and the gateway state it reads.
#[derive(Clone)]
pub struct Methods {
    inner: Arc<Inner>,
}

struct Inner {
    mesh: OnceLock<Mesh>,
    front_doors: OnceLock<Value>,
    nodes: Arc<NodeRegistry>,
    pairing: Registry,
    started: Instant,
    started_at: SystemTime,
}

fn bad(msg: impl Into<String>) -> WireError {
    WireError::new("INVALID_REQUEST", msg)
}

fn pairing_err(e: PairingError) -> WireError {
    match e {
        PairingError::Store(e) => WireError::new("UNAVAILABLE", e.to_string()),
        e => bad(e.to_string()),
    }
}

fn str_param<'a>(params: &'a Value, key: &str, method: &str) -> Result<&'a str, WireError> {
    params
        .get(key)
        .and_then(Value::as_str)
        .filter(|s| !s.trim().is_empty())
        .ok_or_else(|| {
            bad(format!(
                "invalid {method} params: must have required property '{key}'"
            ))
        })
}

impl Methods {
    /// A table over the gateway's registries; the mesh is attached once it has started.
    pub fn new(pairing: Registry, nodes: Arc<NodeRegistry>) -> Self {
        Methods {
            inner: Arc::new(Inner {
                mesh: OnceLock::new(),
                front_doors: OnceLock::new(),
                nodes,
                pairing,
                started: Instant::now(),
                started_at: SystemTime::now(),
            }),
        }
    }

    /// Attaches the running mesh.
    pub fn set_mesh(&self, mesh: Mesh) {
        let _ = self.inner.mesh.set(mesh);
    }

    /// Records where the classic bridge listens (URL, TLS fingerprint), for status.
    pub fn set_front_doors(&self, v: Value) {
        let _ = self.inner.front_doors.set(v);
    }

    /// The node registry.
    pub fn nodes(&self) -> &Arc<NodeRegistry> {
        &self.inner.nodes
    }

    /// The pairing registry.
    pub fn pairing(&self) -> &Registry {
        &self.inner.pairing
    }

    fn mesh(&self) -> Result<&Mesh, WireError> {
        self.inner.mesh.get().ok_or_else(|| {
            let mut e = WireError::new("UNAVAILABLE", "gateway starting; retry shortly");
            e.retryable = true;
            e
        })
    }

    fn gateway_name(&self) -> String {
        self.inner
            .mesh
            .get()
            .map(|m| m.config().name.clone())
            .unwrap_or_default()
    }

    /// Checks access, then runs the method.
    pub async fn dispatch(
        &self,
        caller: &Caller,
        method: &str,
        params: Value,
    ) -> Result<Value, WireError> {
        let Some((_, access)) = TABLE.iter().find(|(n, _)| *n == method) else {
            return Err(bad(format!("unknown method: {method}")));
        };
        match (&caller.kind, access) {
            (CallerKind::Node { .. }, _) => return Err(bad("unauthorized role: node")),
            (
                CallerKind::Operator {
                    scopes: granted, ..
                },
                Access::Scope(required),
            ) if !scopes::satisfies(granted, required) => {
                return Err(scopes::missing(required));
            }
            _ => {}
        }
        match method {
            "health" => self.health(),
            "status" | "gateway.status" => {
                let all = params.get("all").and_then(Value::as_bool).unwrap_or(true);
                let mut doc = crate::status::to_json(&self.mesh()?.status(), all);
                if let (Some(extra), Some(gws)) =
                    (self.inner.front_doors.get(), doc["gateways"].as_array_mut())
                {
                    for g in gws.iter_mut().filter(|g| g["isSelf"] == true) {
                        g["wsUrl"] = extra["wsUrl"].clone();
                        g["tlsFingerprint"] = extra["tlsFingerprint"].clone();
                    }
                }
                doc["nodes"] = json!(self.inner.nodes.list().len());
                Ok(doc)
            }
            "gateway.identity" => {
                let mesh = self.mesh()?;
                Ok(json!({
                    "deviceId": mesh.key().device_id().to_string(),
                    "publicKey": mesh.key().to_base64url(),
                    "name": mesh.config().name,
                }))
            }
            "gateway.forget" => {
                let name = str_param(&params, "name", method)?;
                let m = self.mesh()?.forget(name).map_err(|e| bad(e.to_string()))?;
                Ok(json!({"name": m.name, "deviceId": m.key.device_id().to_string()}))
            }
            "node.list" => Ok(json!({"ts": now_ms(), "nodes": self.node_entries()?})),
            "node.describe" => {
                let sel = str_param(&params, "nodeId", method)?;
                let entries = self.node_entries()?;
                let mut e = nodes::resolve(sel, &entries)?.clone();
                e["ts"] = json!(now_ms());
                Ok(e)
            }
            "node.invoke" => self.node_invoke(params).await,
            "device.pair.list" => {
                serde_json::to_value(self.inner.pairing.list().map_err(pairing_err)?)
                    .map_err(|e| WireError::new("UNAVAILABLE", e.to_string()))
            }
            "device.pair.approve" => {
                let sel = str_param(&params, "requestId", method)?;
                if let CallerKind::Operator {
                    scopes: granted, ..
                } = &caller.kind
                {
                    // Approving a node (a non-operator role) also needs admin, as in the classic
                    // protocol: a node can run commands.
                    if !scopes::satisfies(granted, scopes::ADMIN) {
                        let mut e = bad("device pairing approval denied");
                        e.details = Some(
                            json!({"code":"MISSING_SCOPE","missingScope":scopes::ADMIN})
                                .to_string(),
                        );
                        return Err(e);
                    }
                }
                let device = self.inner.pairing.approve(sel).map_err(pairing_err)?;
                tracing::info!(device = %device.device_id, name = %device.name, "device approved");
                Ok(json!({"requestId": sel, "device": device}))
            }
            "device.pair.reject" => {
                let sel = str_param(&params, "requestId", method)?;
                let p = self.inner.pairing.reject(sel).map_err(pairing_err)?;
                Ok(json!({"requestId": p.request_id, "deviceId": p.device_id}))
            }
            "device.pair.remove" => {
                let sel = str_param(&params, "deviceId", method)?;
                let d = self.inner.pairing.revoke(sel).map_err(pairing_err)?;
                let disconnected = clawmesh_federation::identity::DeviceId::parse(&d.device_id)
                    .map(|id| self.inner.nodes.disconnect(&id, "device removed"))
                    .unwrap_or(false);
                tracing::info!(device = %d.device_id, name = %d.name, disconnected, "device revoked");
                Ok(json!({"deviceId": d.device_id, "name": d.name, "disconnected": disconnected}))
            }
            "exec.approvals.node.get" | "exec.approvals.node.set" => {
                let sel = str_param(&params, "nodeId", method)?.to_string();
                let (command, inner) = if method.ends_with(".get") {
                    ("system.execApprovals.get", json!({}))
                } else {
                    let file = params.get("file").cloned().ok_or_else(|| {
                        bad(format!(
                            "invalid {method} params: must have required property 'file'"
                        ))
                    })?;
                    let mut p = json!({"file": file});
                    if let Some(h) = params.get("baseHash") {
                        p["baseHash"] = h.clone();
                    }
                    ("system.execApprovals.set", p)
                };
                let key = clawmesh_federation::pairing::uuid_v4();
                let r = self
                    .invoke_on(&sel, command, inner, DEFAULT_INVOKE_TIMEOUT, &key)
                    .await?;
                Ok(r["payload"].clone())
            }
            other => Err(bad(format!("unknown method: {other}"))),
        }
    }

    /// Every node this gateway knows: paired node devices and connected nodes.
    fn node_entries(&self) -> Result<Vec<Value>, WireError> {
        let gateway = self.gateway_name();
        let connected = self.inner.nodes.list();
        let paired = self.inner.pairing.list().map_err(pairing_err)?.paired;
        let mut out = Vec::new();
        for (info, transport) in &connected {
            let id = info.node_id.to_string();
            let labels: serde_json::Map<String, Value> = info
                .labels
                .iter()
                .map(|(k, v)| (k.clone(), json!(v)))
                .collect();
            out.push(json!({
                "nodeId": id,
                "displayName": info.name,
                "platform": info.platform,
                "version": info.version,
                "caps": info.caps,
                "commands": info.commands,
                "clientId": info.client_id,
                "clientMode": info.client_mode,
                "deviceFamily": info.device_family,
                "pathEnv": info.path_env,
                "remoteIp": nodes::ip_of(&info.remote),
                "paired": paired.iter().any(|p| p.device_id == id),
                "connected": true,
                "connectedAtMs": info.connected_at.duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0),
                "transport": transport,
                "gateway": gateway,
                "labels": labels,
                "approvalState": "approved",
            }));
        }
        for p in paired.iter().filter(|p| p.role == "node") {
            if connected
                .iter()
                .any(|(i, _)| i.node_id.to_string() == p.device_id)
            {
                continue;
            }
            out.push(json!({
                "nodeId": p.device_id,
                "displayName": p.name,
                "platform": p.platform,
                "clientId": p.client_id,
                "clientMode": p.client_mode,
                "deviceFamily": p.device_family,
                "caps": [],
                "commands": [],
                "paired": true,
                "connected": false,
                "transport": null,
                "gateway": gateway,
                "approvedAt": p.approved_at,
                "approvalState": "approved",
            }));
        }
        Ok(out)
    }

    async fn node_invoke(&self, params: Value) -> Result<Value, WireError> {
        let sel = str_param(&params, "nodeId", "node.invoke")?.to_string();
        let command = str_param(&params, "command", "node.invoke")?.to_string();
        if command.starts_with("system.execApprovals.") {
            return Err(bad(format!(
                "node.invoke does not run {command}; use exec.approvals.node.get/set (clawmesh approvals get|set --node)"
            )));
        }
        let timeout = match params.get("timeoutMs") {
            None | Some(Value::Null) => DEFAULT_INVOKE_TIMEOUT,
            Some(v) => match v.as_u64() {
                Some(ms) => Duration::from_millis(ms).min(MAX_INVOKE_TIMEOUT),
                None => {
                    return Err(bad(
                        "invalid node.invoke params: timeoutMs must be a non-negative integer",
                    ))
                }
            },
        };
        // Classic clients must send one; it reaches the node unchanged.
        let key = str_param(&params, "idempotencyKey", "node.invoke")?.to_string();
        let inner = params.get("params").cloned().unwrap_or(Value::Null);
        let inner = if inner.is_null() { json!({}) } else { inner };
        self.invoke_on(&sel, &command, inner, timeout, &key).await
    }

    async fn invoke_on(
        &self,
        sel: &str,
        command: &str,
        params: Value,
        timeout: Duration,
        idempotency_key: &str,
    ) -> Result<Value, WireError> {
        let entries = self.node_entries()?;
        let entry = nodes::resolve(sel, &entries)?;
        let node_id = entry["nodeId"].as_str().unwrap_or_default().to_string();
        let name = entry["displayName"]
            .as_str()
            .unwrap_or(&node_id)
            .to_string();
        let link = clawmesh_federation::identity::DeviceId::parse(&node_id)
            .and_then(|id| self.inner.nodes.get(&id));
        let Some((info, link)) = link else {
            let mut e = WireError::new(
                "UNAVAILABLE",
                format!(
                    "node not connected: {name} ({}) is paired but not attached to gateway {}",
                    &node_id[..node_id.len().min(12)],
                    self.gateway_name()
                ),
            );
            e.details = Some(json!({"code":"NOT_CONNECTED","nodeError":{"code":"NOT_CONNECTED","message":"node not connected"},"nodeCommandDispatched":false}).to_string());
            e.retryable = true;
            return Err(e);
        };
        if !info.commands.iter().any(|c| c == command) {
            let mut e = bad(format!("node command not allowed: {command} is not declared by node {name} (it offers: {})", info.commands.join(", ")));
            e.details = Some(
                json!({"reason":"command not declared by node","command":command}).to_string(),
            );
            return Err(e);
        }
        let started = Instant::now();
        let span = tracing::info_span!("invoke", node = %name, %command);
        match tracing::Instrument::instrument(
            link.invoke(command, &params, timeout, idempotency_key),
            span,
        )
        .await
        {
            Ok(text) => {
                let payload: Value =
                    serde_json::from_str(&text).unwrap_or(Value::String(text.clone()));
                tracing::debug!(
                    elapsed_ms = started.elapsed().as_millis() as u64,
                    "invoke ok"
                );
                Ok(json!({
                    "ok": true,
                    "nodeId": node_id,
                    "command": command,
                    "payload": payload,
                    "payloadJSON": text,
                }))
            }
            Err(e) => Err(nodes::invoke_error(e, &name, timeout)),
        }
    }

    /// The `health` document (for `GET /healthz`), or a not-ready note.
    pub fn dispatch_health(&self) -> Value {
        self.health()
            .unwrap_or_else(|e| json!({"ok": false, "error": e.message}))
    }

    fn health(&self) -> Result<Value, WireError> {
        let mesh = self.mesh()?;
        let status = mesh.status();
        let me = status.gateways.iter().find(|g| g.is_self);
        Ok(json!({
            "ok": true,
            "ts": now_ms(),
            "durationMs": 0,
            "name": status.self_name,
            "status": me.map(|g| g.status.as_str()).unwrap_or("healthy"),
            "uptimeMs": self.inner.started.elapsed().as_millis() as u64,
            "startedAt": humantime::format_rfc3339_millis(self.inner.started_at).to_string(),
            "version": crate::VERSION,
            "gateways": status.gateways.len(),
            "primary": status.primary,
            "nodes": self.inner.nodes.list().len(),
        }))
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl Handler for Methods {
    fn handle(&self, caller: Caller, req: Request) -> BoxFuture<Result<String, WireError>> {
        let this = self.clone();
        Box::pin(async move {
            if req.params.len() > MAX_PARAMS {
                return Err(bad(format!(
                    "params of {} bytes exceed {MAX_PARAMS}",
                    req.params.len()
                )));
            }
            let params: Value = if req.params.trim().is_empty() {
                json!({})
            } else {
                serde_json::from_str(&req.params)
                    .map_err(|e| bad(format!("invalid params: {e}")))?
            };
            if !params.is_object() {
                return Err(bad("invalid params: must be a JSON object"));
            }
            let out = this.dispatch(&caller, &req.method, params).await?;
            Ok(out.to_string())
        })
    }
}
