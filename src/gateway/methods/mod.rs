//! The gateway's operator method table: one table, several front doors.
//!
//! A method name and JSON params go in; a JSON result or a classic-shaped error comes out,
//! with the caller's role and scopes checked first. The native QUIC transport (CLI, agents),
//! requests from other gateways, and the classic WebSocket bridge all call
//! [`Methods::dispatch`], so no method is written twice.
//!
//! This file holds the table (name -> access rule), the dispatch and the state the methods
//! read; each family of methods has its own file, all of the same shape (one `*_method` entry
//! that matches the names of its family):
//!
//! - `gateway`: `status`, `health`, `gateway.identity|forget|call`;
//! - `nodes`: `node.list|describe|invoke` and a node's exec approvals, local or delegated;
//! - `devices`: `device.pair.*`, the pairing registry;
//! - `config`: `config.*` and `gateway.promote`, the shared config;
//! - `alerts`: `alerts.list` (the evaluator's book) and `alerts.sync` (its pushes);
//! - `logs`: `logs.query` (answered by the primary's collector) and `node.logs` (a node's
//!   records, into this gateway's spool).

use std::collections::BTreeMap;
use std::sync::{Arc, OnceLock, RwLock};
use std::time::{Duration, Instant, SystemTime};

use clawmesh_federation::consensus::Replica;
use clawmesh_federation::mesh::Mesh;
use clawmesh_federation::pairing::{PairingError, Registry};
use clawmesh_federation::rpc::{BoxFuture, Caller, CallerKind, Handler};
use clawmesh_federation::wire::{Request, WireError};
use serde_json::{json, Value};

mod alerting;
mod alerts;
mod config;
mod devices;
mod gateway;
mod listing;
mod logs;
mod nodes;

use crate::gateway::registry::{self, NodeRegistry};
use crate::gateway::scopes;
use crate::gateway::shared_config::SyncPolicy;
use crate::gateway::tailnet_auth::TailnetAuth;

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

/// Who may call a method.
#[derive(Debug, Clone, Copy)]
enum Access {
    /// Anyone admitted (the classic `health` has no scope check).
    Any,
    /// Operators holding this scope (gateways of the federation are trusted).
    Scope(&'static str),
    /// Only node hosts (a node sending its own records).
    Node,
    /// Only gateways of the federation (the alert evaluator's pushes).
    Gateway,
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
    ("logs.query", Access::Scope(scopes::READ)),
    ("node.logs", Access::Node),
    ("alerts.list", Access::Scope(scopes::READ)),
    ("alerts.sync", Access::Gateway),
    ("alerts.probe", Access::Gateway),
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
                crate::node_protocol::DEFAULTS_COMMAND,
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

/// Every method with the scope it needs (`-` for none), for `gateway call --list`.
pub fn method_scopes() -> Vec<(&'static str, &'static str)> {
    TABLE
        .iter()
        .map(|(n, a)| {
            (
                *n,
                match a {
                    Access::Any => "-",
                    Access::Scope(s) => s,
                    Access::Node => "node role only",
                    Access::Gateway => "gateway role only",
                },
            )
        })
        .collect()
}

/// The error for a method the table does not have: the classic message, and in `details`
/// the closest method name when a typo is likely (at most a third of the name differs), which
/// the CLI shows as "did you mean".
fn unknown_method(method: &str) -> WireError {
    let mut e = bad(format!("unknown method: {method}"));
    let best = TABLE
        .iter()
        .map(|(n, _)| (edit_distance(method, n), *n))
        .min();
    if let Some((_, name)) = best.filter(|(d, _)| *d <= method.len().max(3) / 3) {
        e.details = Some(json!({"code": "UNKNOWN_METHOD", "didYouMean": name}).to_string());
    }
    e
}

/// Levenshtein distance of two short names (method names are a few dozen bytes).
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            let sub = prev[j] + usize::from(ca != *cb);
            cur[j + 1] = sub.min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}

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
    /// Keys of `local` set by command-line flags.
    flags: std::collections::BTreeSet<String>,
}

struct Inner {
    mesh: OnceLock<Mesh>,
    shared: OnceLock<Shared>,
    fallback: RwLock<Option<String>>,
    exec_default: RwLock<Option<String>>,
    front_doors: OnceLock<Value>,
    logs: OnceLock<crate::gateway::logs::GatewayLogs>,
    alerts: OnceLock<Arc<crate::gateway::alerts::book::AlertBook>>,
    nodes: Arc<NodeRegistry>,
    pairing: Registry,
    tailnet: OnceLock<Arc<TailnetAuth>>,
    started: Instant,
    started_at: SystemTime,
    /// Invokes and config writes counted for `/metrics`.
    instruments: Arc<crate::gateway::instruments::Instruments>,
    /// `node.list`'s resolved, id-sorted directory between calls.
    listing: Arc<listing::ListingCache>,
    /// The node rows the alert rules evaluate, kept per change.
    alert_rows: Arc<alerting::AlertRows>,
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
                logs: OnceLock::new(),
                alerts: OnceLock::new(),
                nodes,
                pairing,
                tailnet: OnceLock::new(),
                started: Instant::now(),
                started_at: SystemTime::now(),
                instruments: Arc::default(),
                listing: Arc::default(),
                alert_rows: Arc::default(),
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
        flags: std::collections::BTreeSet<String>,
    ) {
        let _ = self.inner.shared.set(Shared {
            replica,
            policy,
            local,
            flags,
        });
    }

    fn shared(&self) -> Result<&Shared, WireError> {
        self.inner.shared.get().ok_or_else(|| {
            let mut e = WireError::new("UNAVAILABLE", "consensus starting; retry shortly");
            e.retryable = true;
            e
        })
    }

    /// Attaches the gateway's logs (spool, shipper, collector, audit trail).
    pub fn set_logs(&self, logs: crate::gateway::logs::GatewayLogs) {
        let _ = self.inner.logs.set(logs);
    }

    /// Records where the classic bridge listens (URL, TLS fingerprint), for status.
    pub fn set_front_doors(&self, v: Value) {
        let _ = self.inner.front_doors.set(v);
    }

    /// A table over a fresh state database in `dir`, with nothing attached (unit tests).
    #[cfg(test)]
    pub(crate) fn bare(dir: &std::path::Path) -> Methods {
        let store = clawmesh_federation::store::Store::open(dir).unwrap();
        let pairing = Registry::open(store).unwrap();
        Methods::new(pairing, Arc::default())
    }

    /// The counters of invokes and config writes (for `/metrics`).
    pub fn instruments(&self) -> &Arc<crate::gateway::instruments::Instruments> {
        &self.inner.instruments
    }

    /// The running mesh, once attached (for `/metrics`).
    pub fn mesh_view(&self) -> Option<&Mesh> {
        self.inner.mesh.get()
    }

    /// The consensus as this gateway sees it, once attached (for `/metrics`).
    pub fn consensus_view(
        &self,
    ) -> Option<clawmesh_federation::consensus::replica::ConsensusStatus> {
        self.inner.shared.get().map(|s| s.replica.status())
    }

    /// The gateway's logs, once attached (for `/metrics`).
    pub fn logs_view(&self) -> Option<&crate::gateway::logs::GatewayLogs> {
        self.inner.logs.get()
    }

    /// The node registry.
    pub fn nodes(&self) -> &Arc<NodeRegistry> {
        &self.inner.nodes
    }

    /// The pairing registry.
    pub fn pairing(&self) -> &Registry {
        &self.inner.pairing
    }

    /// Attaches the tailnet admission service (once, at start).
    pub fn set_tailnet(&self, t: Arc<TailnetAuth>) {
        let _ = self.inner.tailnet.set(t);
    }

    /// The tailnet admission service, once attached.
    pub fn tailnet(&self) -> Option<&Arc<TailnetAuth>> {
        self.inner.tailnet.get()
    }

    fn mesh(&self) -> Result<&Mesh, WireError> {
        self.inner.mesh.get().ok_or_else(|| {
            let mut e = WireError::new("UNAVAILABLE", "gateway starting; retry shortly");
            e.retryable = true;
            e
        })
    }

    /// This gateway's region (`--region`), if it has one.
    pub fn region(&self) -> Option<String> {
        self.inner
            .mesh
            .get()
            .and_then(|m| m.config().region.clone())
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
            return Err(unknown_method(method));
        };
        match (&caller.kind, access) {
            (CallerKind::Node { .. }, Access::Node) => {}
            (CallerKind::Node { .. }, _) => return Err(bad("unauthorized role: node")),
            (_, Access::Node) => return Err(bad(format!("{method} is sent by nodes only"))),
            (CallerKind::Gateway { .. }, Access::Gateway) => {}
            (_, Access::Gateway) => return Err(bad(format!("{method} is sent by gateways only"))),
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
            "status" | "gateway.status" | "gateway.identity" | "gateway.forget" => {
                self.gateway_method(method, params)
            }
            "node.list"
            | "node.describe"
            | "node.invoke"
            | "exec.approvals.node.get"
            | "exec.approvals.node.set" => self.nodes_method(caller, method, params).await,
            "device.pair.list"
            | "device.pair.approve"
            | "device.pair.reject"
            | "device.pair.remove" => self.devices_method(caller, method, params).await,
            "logs.query" | "node.logs" => self.logs_method(caller, method, params).await,
            "alerts.list" | "alerts.sync" | "alerts.probe" => {
                self.alerts_method(caller, method, params).await
            }
            other => Err(bad(format!("unknown method: {other}"))),
        }
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
        // One clock read: the gateway's receive time if this is a timed `node.invoke`.
        let received = crate::node_protocol::wall_ns();
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
            let mut params = params;
            if req.method == "node.invoke" && params.get("timing") == Some(&Value::Bool(true)) {
                params["timing"] = json!(received);
            }
            if req.method == "node.list" {
                // Straight to text: 100 000 rows as a JSON tree first would cost more than
                // the listing itself (see `listing`).
                Self::check_access(&caller, &req.method)?;
                return this.node_list_text(&params);
            }
            if req.method == "device.pair.list" {
                // The same for a page of up to 10 000 paired devices.
                Self::check_access(&caller, &req.method)?;
                return this.pair_list_text(&caller, &params).await;
            }
            let out = this.dispatch(&caller, &req.method, params).await?;
            Ok(out.to_string())
        })
    }
}
