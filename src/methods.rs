//! The gateway's operator method table: one table, several front doors.
//!
//! A method name and JSON params go in; a JSON result or a classic-shaped error comes out,
//! with the caller's role and scopes checked first. The native QUIC transport (CLI, agents),
//! requests from other gateways, and (later) the classic WebSocket bridge all call
//! [`Methods::dispatch`], so no method is written twice.

use std::sync::{Arc, OnceLock};
use std::time::{Instant, SystemTime};

use clawmesh_federation::mesh::Mesh;
use clawmesh_federation::rpc::{BoxFuture, Caller, CallerKind, Handler};
use clawmesh_federation::wire::{Request, WireError};
use serde_json::{json, Value};

use crate::scopes;

/// Largest params document accepted (JSON text): operator requests are small; a bigger one
/// is a mistake or an attack.
const MAX_PARAMS: usize = 1024 * 1024;

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
    started: Instant,
    started_at: SystemTime,
}

impl Default for Methods {
    fn default() -> Self {
        Self::new()
    }
}

impl Methods {
    /// An empty table; the mesh is attached once it has started.
    pub fn new() -> Self {
        Methods {
            inner: Arc::new(Inner {
                mesh: OnceLock::new(),
                started: Instant::now(),
                started_at: SystemTime::now(),
            }),
        }
    }

    /// Attaches the running mesh.
    pub fn set_mesh(&self, mesh: Mesh) {
        let _ = self.inner.mesh.set(mesh);
    }

    fn mesh(&self) -> Result<&Mesh, WireError> {
        self.inner.mesh.get().ok_or_else(|| {
            let mut e = WireError::new("UNAVAILABLE", "gateway starting; retry shortly");
            e.retryable = true;
            e
        })
    }

    /// Checks access, then runs the method.
    pub async fn dispatch(
        &self,
        caller: &Caller,
        method: &str,
        params: Value,
    ) -> Result<Value, WireError> {
        let Some((_, access)) = TABLE.iter().find(|(n, _)| *n == method) else {
            return Err(WireError::new(
                "INVALID_REQUEST",
                format!("unknown method: {method}"),
            ));
        };
        match (&caller.kind, access) {
            (CallerKind::Node { .. }, _) => {
                return Err(WireError::new("INVALID_REQUEST", "unauthorized role: node"))
            }
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
                Ok(crate::status::to_json(&self.mesh()?.status(), all))
            }
            "gateway.identity" => {
                let mesh = self.mesh()?;
                Ok(json!({
                    "deviceId": mesh.key().device_id().to_string(),
                    "publicKey": mesh.key().to_base64url(),
                    "name": mesh.config().name,
                }))
            }
            other => Err(WireError::new(
                "INVALID_REQUEST",
                format!("unknown method: {other}"),
            )),
        }
    }

    fn health(&self) -> Result<Value, WireError> {
        let mesh = self.mesh()?;
        let status = mesh.status();
        let me = status.gateways.iter().find(|g| g.is_self);
        Ok(json!({
            "ok": true,
            "ts": SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0),
            "name": status.self_name,
            "status": me.map(|g| g.status.as_str()).unwrap_or("healthy"),
            "uptimeMs": self.inner.started.elapsed().as_millis() as u64,
            "startedAt": humantime::format_rfc3339_millis(self.inner.started_at).to_string(),
            "version": crate::VERSION,
            "gateways": status.gateways.len(),
            "primary": status.primary,
        }))
    }
}

impl Handler for Methods {
    fn handle(&self, caller: Caller, req: Request) -> BoxFuture<Result<String, WireError>> {
        let this = self.clone();
        Box::pin(async move {
            if req.params.len() > MAX_PARAMS {
                return Err(WireError::new(
                    "INVALID_REQUEST",
                    format!("params of {} bytes exceed {MAX_PARAMS}", req.params.len()),
                ));
            }
            let params: Value = if req.params.trim().is_empty() {
                json!({})
            } else {
                serde_json::from_str(&req.params).map_err(|e| {
                    WireError::new("INVALID_REQUEST", format!("invalid params: {e}"))
                })?
            };
            let out = this.dispatch(&caller, &req.method, params).await?;
            Ok(out.to_string())
        })
    }
}
