//! The gateway's operator method table: one table, several front doors.
//!
//! A method name and JSON params go in; a JSON result or a classic-shaped error comes out,
//! with the caller's role and scopes checked first. The native QUIC transport (CLI, agents),
//! requests from other gateways, and (later) the classic WebSocket bridge all call
//! [`Methods::dispatch`], so no method is written twice.

use std::collections::BTreeMap;
use std::sync::{Arc, OnceLock, RwLock};
use std::time::{Duration, Instant, SystemTime};

use clawmesh_federation::consensus::{Command, Replica};
use clawmesh_federation::mesh::Mesh;
use clawmesh_federation::pairing::{PairingError, Registry};
use clawmesh_federation::rpc::{BoxFuture, Caller, CallerKind, Handler};
use clawmesh_federation::wire::{Request, WireError};
use futures_util::StreamExt as _;
use serde_json::{json, Value};

use crate::gateway::registry::{self, NodeRegistry};
use crate::gateway::scopes;
use crate::gateway::shared_config::{self, SyncPolicy};

/// Largest params document accepted (JSON text): operator requests are small; a bigger one
/// is a mistake or an attack.
const MAX_PARAMS: usize = 1024 * 1024;

/// Default and longest `node.invoke` timeouts: the classic gateway's 30 s default; a command
/// may be given up to 10 minutes, never forever.
const DEFAULT_INVOKE_TIMEOUT: Duration = Duration::from_secs(30);
const MAX_INVOKE_TIMEOUT: Duration = Duration::from_secs(600);

/// Extra wait for a forwarded invoke's answer beyond the node timeout: one intercontinental
/// round trip with room to spare.
const FORWARD_MARGIN: Duration = Duration::from_secs(3);

/// Invokes in flight during a fan-out (`node.invoke` with `all`): enough to reach 100 nodes in
/// a couple of round trips without opening hundreds of streams at once.
const FANOUT_CONCURRENCY: usize = 64;

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
    ("gateway.call", Access::Any),
    ("node.list", Access::Scope(scopes::READ)),
    ("node.describe", Access::Scope(scopes::READ)),
    ("node.invoke", Access::Scope(scopes::WRITE)),
    ("device.pair.list", Access::Scope(scopes::PAIRING)),
    ("device.pair.approve", Access::Scope(scopes::PAIRING)),
    ("device.pair.reject", Access::Scope(scopes::PAIRING)),
    ("device.pair.remove", Access::Scope(scopes::PAIRING)),
    ("exec.approvals.node.get", Access::Scope(scopes::APPROVALS)),
    ("exec.approvals.node.set", Access::Scope(scopes::APPROVALS)),
    ("config.get", Access::Scope(scopes::READ)),
    ("config.show", Access::Scope(scopes::READ)),
    ("config.set", Access::Scope(scopes::ADMIN)),
    ("config.unset", Access::Scope(scopes::ADMIN)),
    ("gateway.promote", Access::Scope(scopes::ADMIN)),
];

/// Sends the federation's default exec level to one node, in the background; a node that is
/// gone or too old to know the command is only logged.
pub fn push_exec_default(link: registry::NodeLink, level: Option<String>, name: String) {
    if !matches!(link, registry::NodeLink::Quic(_)) {
        return;
    }
    tokio::spawn(async move {
        let params = json!({"security": level});
        // Bounded: a node answers this at once; one that does not is being dropped anyway.
        let r = link
            .invoke(
                crate::node::run::DEFAULTS_COMMAND,
                &params,
                Duration::from_secs(5),
                "exec-default",
            )
            .await;
        if let Err(e) = r {
            tracing::debug!(node = %name, "federation exec default not delivered: {e}");
        }
    });
}

/// Bytes of keys and values in one config write at most: a raft entry well inside a frame.
const MAX_CONFIG_WRITE: usize = 8 * 1024 * 1024;

/// Names of every method, for `hello-ok.features.methods` and `gateway call --help`.
pub fn method_names() -> Vec<&'static str> {
    TABLE.iter().map(|(n, _)| *n).collect()
}

/// The method table and the gateway state it reads.
#[derive(Clone)]
pub struct Methods {
    inner: Arc<Inner>,
}

/// The shared config as this gateway serves it: the consensus, and what it makes of it.
struct Shared {
    replica: Replica,
    policy: SyncPolicy,
    local: BTreeMap<String, Value>,
}

struct Inner {
    mesh: OnceLock<Mesh>,
    shared: OnceLock<Shared>,
    fallback: RwLock<Option<String>>,
    exec_default: RwLock<Option<String>>,
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
                shared: OnceLock::new(),
                fallback: RwLock::new(None),
                exec_default: RwLock::new(None),
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

    /// The gateway that serves work addressed to an offline gateway
    /// (`gateway.failover.fallbackNode`; `primary` means the current primary).
    pub fn set_fallback(&self, gateway: Option<String>) {
        *self
            .inner
            .fallback
            .write()
            .unwrap_or_else(|p| p.into_inner()) = gateway;
    }

    /// The federation's default exec level for nodes (`security.exec.defaultLevel`), if set.
    pub fn exec_default(&self) -> Option<String> {
        self.inner
            .exec_default
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Changes the federation's default exec level and sends it to every native node attached
    /// here (a node applies it only where neither its start flag nor its own file sets a
    /// level). Classic nodes keep their own defaults.
    pub fn set_exec_default(&self, level: Option<String>) {
        {
            let mut cur = self
                .inner
                .exec_default
                .write()
                .unwrap_or_else(|p| p.into_inner());
            if *cur == level {
                return;
            }
            *cur = level.clone();
        }
        for (info, _) in self.inner.nodes.list() {
            if let Some((_, link)) = self.inner.nodes.get(&info.node_id) {
                push_exec_default(link, level.clone(), info.name);
            }
        }
    }

    /// The mesh's health settings in force (changed live by the shared config).
    pub fn health_settings(&self) -> Option<clawmesh_federation::health::HealthConfig> {
        self.inner.mesh.get().map(Mesh::health)
    }

    /// Changes the mesh's health settings (from the shared config).
    pub fn set_health(&self, health: clawmesh_federation::health::HealthConfig) {
        if let Some(m) = self.inner.mesh.get() {
            m.set_health(health);
        }
    }

    /// Attaches the consensus, this gateway's sync policy and its own (`clawmesh.json`) keys.
    pub fn set_consensus(
        &self,
        replica: Replica,
        policy: SyncPolicy,
        local: BTreeMap<String, Value>,
    ) {
        let _ = self.inner.shared.set(Shared {
            replica,
            policy,
            local,
        });
    }

    fn shared(&self) -> Result<&Shared, WireError> {
        self.inner.shared.get().ok_or_else(|| {
            let mut e = WireError::new("UNAVAILABLE", "consensus starting; retry shortly");
            e.retryable = true;
            e
        })
    }

    /// The effective config here (local and synced keys merged under the sync policy).
    pub async fn effective_config(
        &self,
    ) -> Result<(Vec<shared_config::Effective>, Vec<shared_config::Ignored>), WireError> {
        let sh = self.shared()?;
        let rows = sh.replica.all().await.map_err(|e| e.to_wire())?;
        Ok(shared_config::effective(&sh.local, &rows, sh.policy))
    }

    /// The effective config of only `keys` (one lookup each, not the whole table).
    pub async fn effective_keys(
        &self,
        keys: &[&str],
    ) -> Result<(Vec<shared_config::Effective>, Vec<shared_config::Ignored>), WireError> {
        let sh = self.shared()?;
        let mut rows = Vec::with_capacity(keys.len());
        let mut local = BTreeMap::new();
        for key in keys {
            if let Some((value, revision)) = sh.replica.get(key).await.map_err(|e| e.to_wire())? {
                rows.push((key.to_string(), value, revision));
            }
            if let Some(v) = sh.local.get(*key) {
                local.insert(key.to_string(), v.clone());
            }
        }
        Ok(shared_config::effective(&local, &rows, sh.policy))
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
        Self::check_access(caller, method)?;
        self.run_method(caller, method, params).await
    }

    /// Role and scope check for `method`, the same for every front door.
    fn check_access(caller: &Caller, method: &str) -> Result<(), WireError> {
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
        Ok(())
    }

    async fn run_method(
        &self,
        caller: &Caller,
        method: &str,
        params: Value,
    ) -> Result<Value, WireError> {
        match method {
            "gateway.call" => Box::pin(self.gateway_call(caller, params)).await,
            "health" => self.health(),
            "config.get" | "config.show" | "config.set" | "config.unset" | "gateway.promote" => {
                self.config_method(method, params).await
            }
            "status" | "gateway.status" => {
                let all = params.get("all").and_then(Value::as_bool).unwrap_or(true);
                let mut doc = crate::cli::status::to_json(&self.mesh()?.status(), all);
                if let Some(sh) = self.inner.shared.get() {
                    doc["consensus"] = json!(sh.replica.status());
                }
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
            "node.list" => {
                let all = params.get("all").and_then(Value::as_bool).unwrap_or(false);
                Ok(json!({"ts": now_ms(), "nodes": self.node_entries(all)?}))
            }
            "node.describe" => {
                let sel = str_param(&params, "nodeId", method)?;
                let entries = self.node_entries(true)?;
                let mut e = registry::resolve(sel, &entries)?.clone();
                e["ts"] = json!(now_ms());
                Ok(e)
            }
            "node.invoke" => {
                let forwarded = matches!(caller.kind, CallerKind::Gateway { .. });
                self.node_invoke(params, forwarded).await
            }
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
                self.publish_pairing(&device.public_key);
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
                self.publish_pairing(&d.public_key);
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

    /// `config.get|show|set|unset` and `gateway.promote`.
    async fn config_method(&self, method: &str, params: Value) -> Result<Value, WireError> {
        let sh = self.shared()?;
        match method {
            "config.get" => {
                let key = str_param(&params, "key", method)?;
                let (entries, ignored) = self.effective_keys(&[key]).await?;
                let synced = sh.replica.get(key).await.map_err(|e| e.to_wire())?;
                let mut doc = json!({
                    "key": key,
                    "revision": sh.replica.revision(),
                    "synced": synced.as_ref().map(|(v, r)| json!({
                        "value": shared_config::shown(key, &serde_json::from_str(v).unwrap_or(Value::Null)),
                        "revision": r,
                    })),
                    "local": sh.local.get(key).map(|v| shared_config::shown(key, v)),
                });
                match shared_config::lookup(&entries, key) {
                    Some(e) => {
                        let one = shared_config::effective_json(std::slice::from_ref(e), &[]);
                        doc["effective"] = one["entries"][0].clone();
                        doc["found"] = json!(true);
                    }
                    None => {
                        doc["found"] = json!(false);
                        if let Some(i) = ignored.iter().find(|i| i.key == key) {
                            doc["notApplied"] = json!(i.reason);
                        }
                    }
                }
                Ok(doc)
            }
            "config.show" => {
                let eff = params
                    .get("effective")
                    .and_then(Value::as_bool)
                    .unwrap_or(false);
                let mut doc = json!({
                    "gateway": self.gateway_name(),
                    "revision": sh.replica.revision(),
                    "consensus": sh.replica.status(),
                    "sync": sh.policy.to_json(),
                });
                if eff {
                    let (entries, ignored) = self.effective_config().await?;
                    let v = shared_config::effective_json(&entries, &ignored);
                    doc["entries"] = v["entries"].clone();
                    doc["notApplied"] = v["notApplied"].clone();
                } else {
                    let rows = sh.replica.all().await.map_err(|e| e.to_wire())?;
                    doc["entries"] = rows
                        .iter()
                        .map(|(k, v, r)| {
                            let value = serde_json::from_str(v).unwrap_or(Value::Null);
                            json!({"key": k, "value": shared_config::shown(k, &value), "revision": r, "section": shared_config::Section::of(k).name()})
                        })
                        .collect();
                }
                Ok(doc)
            }
            "config.set" | "config.unset" => {
                let mut changes: Vec<(String, Option<String>)> = Vec::new();
                if method == "config.set" {
                    if let Some(values) = params.get("values").and_then(Value::as_object) {
                        for (k, v) in values {
                            changes.push((k.clone(), Some(v.to_string())));
                        }
                    } else {
                        let key = str_param(&params, "key", method)?;
                        let value = params.get("value").ok_or_else(|| {
                            bad("invalid config.set params: must have required property 'value'")
                        })?;
                        changes.push((key.to_string(), Some(value.to_string())));
                    }
                } else if let Some(keys) = params.get("keys").and_then(Value::as_array) {
                    for k in keys {
                        let k = k
                            .as_str()
                            .ok_or_else(|| bad("invalid config.unset params: keys are strings"))?;
                        changes.push((k.to_string(), None));
                    }
                } else {
                    changes.push((str_param(&params, "key", method)?.to_string(), None));
                }
                if changes.is_empty() {
                    return Err(bad(format!("{method}: nothing to change")));
                }
                let mut size = 0;
                for (k, v) in &changes {
                    shared_config::check_key(k).map_err(bad)?;
                    let len = v.as_ref().map_or(0, String::len);
                    if len > shared_config::MAX_VALUE_LEN {
                        return Err(bad(format!(
                            "value of {k} is {len} bytes; at most {} per key",
                            shared_config::MAX_VALUE_LEN
                        )));
                    }
                    size += k.len() + len;
                }
                if size > MAX_CONFIG_WRITE {
                    return Err(bad(format!(
                        "one config write carries at most {MAX_CONFIG_WRITE} bytes, not {size}; split it"
                    )));
                }
                let n = changes.len();
                let cmd = if n == 1 {
                    let (key, value) = changes.remove(0);
                    Command::SetConfig { key, value }
                } else {
                    Command::SetConfigBatch(changes)
                };
                let ack = sh.replica.write(cmd).await.map_err(|e| e.to_wire())?;
                tracing::info!(revision = ack.revision, keys = n, primary = %ack.leader, "shared config written");
                Ok(json!({"revision": ack.revision, "primary": ack.leader, "keys": n}))
            }
            "gateway.promote" => {
                if params.get("force").and_then(Value::as_bool) != Some(true) {
                    return Err(bad(
                        "gateway.promote overrides quorum and needs force: true (`clawmesh gateway promote --force`)",
                    ));
                }
                let voters = sh.replica.promote_force().await.map_err(|e| e.to_wire())?;
                tracing::warn!(?voters, "promoted by an operator, overriding quorum");
                Ok(json!({"gateway": self.gateway_name(), "voters": voters}))
            }
            other => Err(bad(format!("unknown method: {other}"))),
        }
    }

    /// Sends one device's pairing decision to every gateway of the federation.
    fn publish_pairing(&self, public_key: &str) {
        let (Some(mesh), Ok(key)) = (
            self.inner.mesh.get(),
            clawmesh_federation::identity::PublicKey::from_base64(public_key),
        ) else {
            return;
        };
        match self.inner.pairing.record(&key) {
            Ok(Some(r)) => {
                if let Some(sh) = self.inner.shared.get() {
                    sh.replica.propose_pairing(vec![r.clone()]);
                }
                mesh.publish_pairing(vec![r]);
            }
            Ok(None) => {}
            Err(e) => tracing::warn!("cannot share the pairing decision: {e}"),
        }
    }

    /// Nodes this gateway can name: its own (connected here, or paired and attached nowhere
    /// it knows of) and, for the federation view, every other gateway's announced nodes.
    fn node_entries(&self, federation: bool) -> Result<Vec<Value>, WireError> {
        let gateway = self.gateway_name();
        let connected = self.inner.nodes.list();
        let paired = self.inner.pairing.paired_all().map_err(pairing_err)?;
        let paired_ids: std::collections::HashSet<&str> =
            paired.iter().map(|p| p.device_id.as_str()).collect();
        let mut out = Vec::new();
        let mut seen = std::collections::HashSet::new();
        let region = self
            .inner
            .mesh
            .get()
            .and_then(|m| m.config().region.clone());
        for (info, transport) in &connected {
            let id = info.node_id.to_string();
            seen.insert(id.clone());
            let mut labels: serde_json::Map<String, Value> = info
                .labels
                .iter()
                .map(|(k, v)| (k.clone(), json!(v)))
                .collect();
            // A node's region defaults to its gateway's.
            if let Some(r) = &region {
                labels.entry("region").or_insert_with(|| json!(r));
            }
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
                "remoteIp": registry::ip_of(&info.remote),
                "paired": paired_ids.contains(id.as_str()),
                "connected": true,
                "connectedAtMs": info.connected_at.duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0),
                "transport": transport,
                "gateway": gateway,
                "gatewayStatus": "healthy",
                "gatewayLatencyMs": 0.0,
                "local": true,
                "labels": labels,
                "approvalState": "approved",
            }));
        }
        if federation {
            if let Some(mesh) = self.inner.mesh.get() {
                let latency: std::collections::HashMap<String, Option<f64>> = mesh
                    .status()
                    .gateways
                    .iter()
                    .map(|g| (g.name.clone(), g.latency.map(|d| d.as_secs_f64() * 1000.0)))
                    .collect();
                for r in mesh.remote_nodes() {
                    for n in &r.nodes {
                        let id = n.id.to_string();
                        if !seen.insert(id.clone()) {
                            continue;
                        }
                        let labels: serde_json::Map<String, Value> = n
                            .labels
                            .iter()
                            .map(|(k, v)| (k.clone(), json!(v)))
                            .collect();
                        out.push(json!({
                            "nodeId": id,
                            "displayName": n.name,
                            "platform": n.platform,
                            "version": n.version,
                            "caps": [],
                            "commands": n.commands,
                            "remoteIp": n.ip,
                            "paired": true,
                            "connected": r.status != clawmesh_federation::health::Status::Offline,
                            "transport": n.transport,
                            "gateway": r.gateway,
                            "gatewayStatus": r.status.as_str(),
                            "gatewayLastSeen": r.last_seen.map(|t| humantime::format_rfc3339_millis(t).to_string()),
                            "gatewayLatencyMs": latency.get(&r.gateway).cloned().flatten(),
                            "local": false,
                            "labels": labels,
                            "approvalState": "approved",
                        }));
                    }
                }
            }
        }
        for p in paired.iter().filter(|p| p.role == "node") {
            if seen.contains(&p.device_id) {
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
                "gateway": if federation { Value::Null } else { json!(gateway) },
                "local": false,
                "approvedAt": p.approved_at,
                "approvalState": "approved",
            }));
        }
        Ok(out)
    }

    /// The nodes a selector means: `id`, `name`, `ip`, id prefix, `gateway/name`, or
    /// `label=value` (one healthy match, local first, then the nearest gateway; with `all`,
    /// every connected match; `*` with `all` is every connected node).
    fn select<'a>(
        &self,
        sel: &str,
        entries: &'a [Value],
        all: bool,
    ) -> Result<Vec<&'a Value>, WireError> {
        let sel = sel.trim();
        let live = |e: &&Value| e["connected"] == true;
        let rank = |e: &&Value| {
            let local = if e["local"] == true { 0 } else { 1 };
            let lat = e["gatewayLatencyMs"].as_f64().unwrap_or(f64::MAX);
            (local, (lat * 1000.0) as u64)
        };
        if all && sel == "*" {
            return Ok(entries.iter().filter(live).collect());
        }
        if let Some((k, v)) = sel.split_once('=').filter(|_| !sel.contains('/')) {
            let mut hits: Vec<&Value> = entries
                .iter()
                .filter(live)
                .filter(|e| e["labels"][k.trim()] == v.trim())
                .collect();
            if hits.is_empty() {
                return Err(bad(format!(
                    "no connected node has the label {k}={v} (see `clawmesh nodes status --all`)"
                )));
            }
            hits.sort_by_key(rank);
            if !all {
                hits.truncate(1);
            }
            return Ok(hits);
        }
        if let Some((gw, name)) = sel.split_once('/') {
            let scoped: Vec<Value> = entries
                .iter()
                .filter(|e| e["gateway"] == gw)
                .cloned()
                .collect();
            if scoped.is_empty() {
                return Err(bad(format!(
                    "no node attached to gateway {gw:?} (see `clawmesh nodes status --all`)"
                )));
            }
            let one = registry::resolve(name, &scoped)?;
            let id = one["nodeId"].clone();
            return Ok(entries
                .iter()
                .filter(|e| e["nodeId"] == id)
                .take(1)
                .collect());
        }
        let one = registry::resolve(sel, entries)?;
        if all {
            let id = one["nodeId"].clone();
            return Ok(entries.iter().filter(|e| e["nodeId"] == id).collect());
        }
        Ok(vec![one])
    }

    async fn node_invoke(&self, params: Value, forwarded: bool) -> Result<Value, WireError> {
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
        let all = params.get("all").and_then(Value::as_bool).unwrap_or(false);
        // Fast path: an exact id needs no federation-wide listing: a node attached here, or one
        // another gateway announced.
        if !all {
            if let Some(entry) = self.exact_entry(&sel, forwarded) {
                return self
                    .invoke_entry(&entry, &command, inner, timeout, &key, forwarded)
                    .await;
            }
        }
        // A forwarded fan-out names its nodes by id (one request per holder gateway).
        let targets: Vec<Value> = match params.get("nodeIds").and_then(Value::as_array) {
            Some(ids) if forwarded => ids
                .iter()
                .filter_map(Value::as_str)
                .filter_map(|id| self.exact_entry(id, true))
                .collect(),
            _ => {
                let entries = self.node_entries(!forwarded)?;
                self.select(&sel, &entries, all)?
                    .into_iter()
                    .cloned()
                    .collect()
            }
        };
        if !all {
            let target = targets
                .into_iter()
                .next()
                .ok_or_else(|| bad(format!("unknown node: {sel}")))?;
            return self
                .invoke_entry(&target, &command, inner, timeout, &key, forwarded)
                .await;
        }
        // Fan-out: local nodes directly (at most FANOUT_CONCURRENCY in flight); the nodes of
        // each other gateway in one forwarded request, which that gateway fans out itself, so
        // a hundred remote nodes cost one round trip, not one per node.
        let me = self.gateway_name();
        let mut by_gateway: std::collections::BTreeMap<String, Vec<Value>> = Default::default();
        let mut local = Vec::new();
        for t in targets {
            match t["gateway"].as_str() {
                Some(g) if !forwarded && g != me => {
                    by_gateway.entry(g.to_string()).or_default().push(t)
                }
                _ => local.push(t),
            }
        }
        let remote = futures_util::future::join_all(by_gateway.into_iter().map(|(g, nodes)| {
            let (command, inner, key) = (command.clone(), inner.clone(), key.clone());
            async move {
                self.forward_fanout(&g, nodes, &command, inner, timeout, &key)
                    .await
            }
        }));
        let local_results = futures_util::stream::iter(local.into_iter().map(|t| {
            let (command, inner, key) = (command.clone(), inner.clone(), key.clone());
            async move {
                let r = self.invoke_entry(&t, &command, inner, timeout, &key, forwarded).await;
                let mut row = json!({"nodeId": t["nodeId"], "displayName": t["displayName"], "gateway": t["gateway"]});
                match r {
                    Ok(v) => {
                        row["ok"] = json!(true);
                        row["payload"] = v["payload"].clone();
                    }
                    Err(e) => {
                        row["ok"] = json!(false);
                        row["error"] = json!({"code": e.code, "message": e.message});
                    }
                }
                row
            }
        }))
        .buffer_unordered(FANOUT_CONCURRENCY)
        .collect::<Vec<Value>>();
        let (mut results, remote) = futures_util::future::join(local_results, remote).await;
        results.extend(remote.into_iter().flatten());
        let failed = results.iter().filter(|r| r["ok"] != true).count();
        Ok(
            json!({"ok": true, "command": command, "count": results.len(), "failed": failed, "results": results}),
        )
    }

    async fn invoke_on(
        &self,
        sel: &str,
        command: &str,
        params: Value,
        timeout: Duration,
        idempotency_key: &str,
    ) -> Result<Value, WireError> {
        let entries = self.node_entries(true)?;
        let target = self
            .select(sel, &entries, false)?
            .into_iter()
            .next()
            .cloned();
        let target = target.ok_or_else(|| bad(format!("unknown node: {sel}")))?;
        self.invoke_entry(&target, command, params, timeout, idempotency_key, false)
            .await
    }

    /// Runs `command` on the node `entry` names: here if it is attached here, else forwarded
    /// once over QUIC to the gateway holding it (never further).
    async fn invoke_entry(
        &self,
        entry: &Value,
        command: &str,
        params: Value,
        timeout: Duration,
        idempotency_key: &str,
        forwarded: bool,
    ) -> Result<Value, WireError> {
        let node_id = entry["nodeId"].as_str().unwrap_or_default().to_string();
        let name = entry["displayName"]
            .as_str()
            .unwrap_or(&node_id)
            .to_string();
        let link = clawmesh_federation::identity::DeviceId::parse(&node_id)
            .and_then(|id| self.inner.nodes.get(&id));
        let holder = entry["gateway"].as_str().unwrap_or_default().to_string();
        if link.is_none() && !forwarded && !holder.is_empty() && holder != self.gateway_name() {
            return self
                .forward_invoke(
                    entry,
                    &holder,
                    &node_id,
                    &name,
                    command,
                    params,
                    timeout,
                    idempotency_key,
                )
                .await;
        }
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
            Err(e) => Err(registry::invoke_error(e, &name, timeout)),
        }
    }

    /// The `health` document (for `GET /healthz`), or a not-ready note.
    pub fn dispatch_health(&self) -> Value {
        self.health()
            .unwrap_or_else(|e| json!({"ok": false, "error": e.message}))
    }

    /// The entry for an exact node id without listing anything: attached here, or announced
    /// by another gateway (not for forwarded requests, which only serve local nodes).
    fn exact_entry(&self, sel: &str, local_only: bool) -> Option<Value> {
        let id = clawmesh_federation::identity::DeviceId::parse(sel)?;
        if let Some((info, _)) = self.inner.nodes.get(&id) {
            return Some(
                json!({"nodeId": sel, "displayName": info.name, "gateway": self.gateway_name()}),
            );
        }
        if local_only {
            return None;
        }
        let mesh = self.inner.mesh.get()?;
        mesh.remote_nodes().into_iter().find_map(|r| {
            r.nodes.iter().find(|n| n.id == id).map(|n| {
                json!({
                    "nodeId": sel,
                    "displayName": n.name,
                    "gateway": r.gateway,
                    "gatewayLastSeen": r.last_seen.map(|t| humantime::format_rfc3339_millis(t).to_string()),
                })
            })
        })
    }

    /// Sends one fan-out request for all of `nodes` to the gateway holding them; one result
    /// row per node, errors included.
    async fn forward_fanout(
        &self,
        gateway: &str,
        nodes: Vec<Value>,
        command: &str,
        params: Value,
        timeout: Duration,
        key: &str,
    ) -> Vec<Value> {
        let fail = |nodes: &[Value], e: &WireError| -> Vec<Value> {
            nodes
                .iter()
                .map(|t| json!({"nodeId": t["nodeId"], "displayName": t["displayName"], "gateway": t["gateway"], "ok": false, "error": {"code": e.code, "message": e.message}}))
                .collect()
        };
        let conn = match self.mesh().map(|m| m.connection_to(gateway)) {
            Ok(Some(c)) => c,
            Ok(None) => {
                let e = WireError::new("UNAVAILABLE", format!("gateway {gateway} is offline"));
                return fail(&nodes, &e);
            }
            Err(e) => return fail(&nodes, &e),
        };
        let ids: Vec<Value> = nodes.iter().map(|t| t["nodeId"].clone()).collect();
        let req = json!({
            "nodeId": "*",
            "nodeIds": ids,
            "all": true,
            "command": command,
            "params": params,
            "timeoutMs": timeout.as_millis() as u64,
            "idempotencyKey": key,
        });
        match clawmesh_federation::rpc::call(
            &conn,
            "node.invoke",
            req.to_string(),
            1,
            timeout + FORWARD_MARGIN,
        )
        .await
        {
            Ok(text) => match serde_json::from_str::<Value>(&text) {
                Ok(v) => v["results"].as_array().cloned().unwrap_or_default(),
                Err(e) => fail(
                    &nodes,
                    &WireError::new(
                        "UNAVAILABLE",
                        format!("bad reply from gateway {gateway}: {e}"),
                    ),
                ),
            },
            Err(e) => fail(&nodes, &e.to_wire()),
        }
    }

    /// `gateway.call {gateway, method, params}`: runs any method on the named gateway. Scopes
    /// are checked here, where the caller entered; the target trusts its federation peer. Work
    /// for an offline gateway goes to the fallback gateway when one is configured.
    async fn gateway_call(&self, caller: &Caller, params: Value) -> Result<Value, WireError> {
        let target = str_param(&params, "gateway", "gateway.call")?.to_string();
        let method = str_param(&params, "method", "gateway.call")?.to_string();
        if method == "gateway.call" {
            return Err(bad("gateway.call cannot call gateway.call"));
        }
        let inner = params.get("params").cloned().unwrap_or_else(|| json!({}));
        Self::check_access(caller, &method)?;
        let me = self.gateway_name();
        if target == me {
            return Box::pin(self.run_method(caller, &method, inner)).await;
        }
        let mesh = self.mesh()?;
        let timeout = Duration::from_millis(
            params
                .get("timeoutMs")
                .and_then(Value::as_u64)
                .unwrap_or(30_000),
        )
        .min(MAX_INVOKE_TIMEOUT);
        let status = mesh.status();
        let Some(row) = status.gateways.iter().find(|g| g.name == target) else {
            return Err(bad(format!("no gateway named {target:?} in this federation (see `clawmesh gateway status --all`)")));
        };
        let configured = self
            .inner
            .fallback
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let fallback = match configured.as_deref() {
            Some("primary") => status.primary.clone(),
            Some(f) => Some(f.to_string()),
            None => None,
        }
        .filter(|f| *f != target);
        let seen = row
            .last_seen
            .map(|t| humantime::format_rfc3339_millis(t).to_string())
            .unwrap_or_else(|| "never".into());
        let offline_error = |why: &str| {
            let mut e = WireError::new(
                "UNAVAILABLE",
                format!("gateway {target} is {why} (last seen {seen}) and no fallback is configured (gateway.failover.fallbackNode)"),
            );
            e.details = Some(
                json!({"code":"GATEWAY_OFFLINE","gateway":target,"lastSeen":seen}).to_string(),
            );
            e.retryable = true;
            e
        };
        let reachable = mesh.connection_to(&target).is_some()
            && row.status != clawmesh_federation::health::Status::Offline;
        let (served_by, mut result) = if reachable {
            match self
                .call_gateway(caller, &target, &method, inner.clone(), timeout)
                .await
            {
                Ok(v) => (target.clone(), v),
                // The target vanished mid-request: the fallback serves it, if there is one.
                Err(Failure::Transport(e)) => match &fallback {
                    Some(f) => {
                        tracing::info!(gateway = %target, fallback = %f, %method, "gateway lost mid-request; using the fallback");
                        (
                            f.clone(),
                            self.call_gateway(caller, f, &method, inner, timeout)
                                .await
                                .map_err(Failure::into_wire)?,
                        )
                    }
                    None => return Err(e),
                },
                Err(Failure::Remote(e)) => return Err(e),
            }
        } else {
            match &fallback {
                Some(f) => {
                    tracing::info!(offline = %target, fallback = %f, %method, "gateway offline; using the fallback");
                    (
                        f.clone(),
                        self.call_gateway(caller, f, &method, inner, timeout)
                            .await
                            .map_err(Failure::into_wire)?,
                    )
                }
                None => return Err(offline_error("offline")),
            }
        };
        if served_by != target {
            if let Value::Object(m) = &mut result {
                m.insert("servedBy".into(), json!(served_by));
                m.insert("fallbackFor".into(), json!(target));
            }
        }
        Ok(result)
    }

    /// Runs `method` on gateway `name` (here when it is this one), telling a transport failure
    /// (the gateway went away) from the gateway's own answer.
    async fn call_gateway(
        &self,
        caller: &Caller,
        name: &str,
        method: &str,
        params: Value,
        timeout: Duration,
    ) -> Result<Value, Failure> {
        if name == self.gateway_name() {
            return Box::pin(self.run_method(caller, method, params))
                .await
                .map_err(Failure::Remote);
        }
        let mesh = self.mesh().map_err(Failure::Remote)?;
        let conn = mesh.connection_to(name).ok_or_else(|| {
            Failure::Transport(WireError::new(
                "UNAVAILABLE",
                format!(
                    "gateway {name} is not reachable from {}",
                    self.gateway_name()
                ),
            ))
        })?;
        match clawmesh_federation::rpc::call(
            &conn,
            method,
            params.to_string(),
            1,
            timeout + FORWARD_MARGIN,
        )
        .await
        {
            Ok(text) => serde_json::from_str(&text).map_err(|e| {
                Failure::Remote(WireError::new(
                    "UNAVAILABLE",
                    format!("bad reply from gateway {name}: {e}"),
                ))
            }),
            Err(clawmesh_federation::rpc::CallError::Remote(e)) => Err(Failure::Remote(e)),
            Err(e) => Err(Failure::Transport(e.to_wire())),
        }
    }

    #[allow(clippy::too_many_arguments)]
    async fn forward_invoke(
        &self,
        entry: &Value,
        holder: &str,
        node_id: &str,
        name: &str,
        command: &str,
        params: Value,
        timeout: Duration,
        idempotency_key: &str,
    ) -> Result<Value, WireError> {
        let mesh = self.mesh()?;
        let Some(conn) = mesh.connection_to(holder) else {
            let seen = entry["gatewayLastSeen"].as_str().unwrap_or("never");
            let mut e = WireError::new(
                "UNAVAILABLE",
                format!("node {name} is attached to gateway {holder}, which is offline (last seen {seen})"),
            );
            e.details = Some(json!({"code":"GATEWAY_OFFLINE","gateway":holder,"lastSeen":entry["gatewayLastSeen"]}).to_string());
            e.retryable = true;
            return Err(e);
        };
        let req = json!({
            "nodeId": node_id,
            "command": command,
            "params": params,
            "timeoutMs": timeout.as_millis() as u64,
            "idempotencyKey": idempotency_key,
        });
        let span = tracing::info_span!("forward", gateway = %holder, node = %name, %command);
        // The holder enforces `timeout`; allow one more round trip for its answer.
        let wait = timeout + FORWARD_MARGIN;
        match tracing::Instrument::instrument(
            clawmesh_federation::rpc::call(&conn, "node.invoke", req.to_string(), 1, wait),
            span,
        )
        .await
        {
            Ok(text) => serde_json::from_str(&text).map_err(|e| {
                WireError::new(
                    "UNAVAILABLE",
                    format!("bad reply from gateway {holder}: {e}"),
                )
            }),
            Err(clawmesh_federation::rpc::CallError::Remote(e)) => Err(e),
            Err(e) => {
                let mut w = WireError::new(
                    "UNAVAILABLE",
                    format!("gateway {holder} (holding node {name}) did not answer: {e}"),
                );
                w.retryable = true;
                Err(w)
            }
        }
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

/// Why a call to another gateway failed: it never answered, or it answered with an error.
enum Failure {
    Transport(WireError),
    Remote(WireError),
}

impl Failure {
    fn into_wire(self) -> WireError {
        match self {
            Failure::Transport(e) | Failure::Remote(e) => e,
        }
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
