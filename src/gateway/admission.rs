//! Who may come in: operators (token, paired device) and nodes (paired, pending, refused)
//! dialing this gateway over QUIC, and what happens once they are in.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Result;
use clawmesh_federation::health::HealthConfig;
use clawmesh_federation::identity::PublicKey;
use clawmesh_federation::liveness;
use clawmesh_federation::mesh::Admission;
use clawmesh_federation::pairing::{Admission as PairingDecision, DeviceMeta};
use clawmesh_federation::rpc::{self, Caller, CallerKind};
use clawmesh_federation::secret;
use clawmesh_federation::wire::{Hello, HelloRole, NodeHello, Refusal, RefusalCode};
use quinn::Connection;
use tracing::{info, warn};

use crate::gateway::methods::Methods;
use crate::gateway::registry::{NodeInfo, NodeLink};

use crate::gateway::scopes;
use crate::gateway::tailnet_auth::{Lookup, NodeVerdict};

/// Decides on operators and nodes that dial this gateway.
pub(super) struct GatewayAdmission {
    /// This gateway's own key (a peer showing it is refused).
    pub(super) own_key: PublicKey,
    /// Operator tokens accepted (`--token`, `gateway.auth.token`).
    pub(super) tokens: Vec<String>,
    /// The method table, for the registries and the shared config.
    pub(super) methods: Methods,
    /// Health settings nodes are told to use.
    pub(super) health: HealthConfig,
}

impl GatewayAdmission {
    fn admit_node(
        &self,
        key: &PublicKey,
        remote: SocketAddr,
        hello: &NodeHello,
    ) -> Result<CallerKind, Refusal> {
        if let Some(t) = &hello.token {
            if !self.tokens.is_empty() && !secret::equals_any(&self.tokens, t) {
                return Err(Refusal {
                    code: RefusalCode::BadToken,
                    message: "unauthorized: gateway token mismatch".into(),
                    retryable: false,
                });
            }
        }
        let mut meta = DeviceMeta {
            name: hello.name.clone(),
            role: "node".into(),
            addr: remote.to_string(),
            platform: hello.platform.clone(),
            client_id: "clawmesh-node".into(),
            client_mode: "node".into(),
            region: self.methods.region(),
            ..Default::default()
        };
        let unavailable = |e: clawmesh_federation::pairing::PairingError| Refusal {
            code: RefusalCode::Unavailable,
            message: format!("pairing registry unavailable: {e}"),
            retryable: true,
        };
        if let Some(tailnet) = self.methods.tailnet() {
            // admit() runs on a blocking thread (see the mesh), so waiting here is fine.
            let lookup = tokio::runtime::Handle::current().block_on(tailnet.lookup(remote));
            match tailnet
                .decide_node(self.methods.pairing(), key, &meta, lookup.as_ref())
                .map_err(unavailable)?
            {
                NodeVerdict::Normal => {}
                NodeVerdict::Approved(d) => {
                    info!(device = %d.device_id, name = %d.name, tailnet = %d.tailnet.clone().unwrap_or_default(), "node admitted by the tailnet (approvedBy: tailscale)");
                    self.methods.publish_pairing(&d.public_key);
                    return Ok(CallerKind::Node {
                        name: hello.name.clone(),
                    });
                }
                NodeVerdict::Revoked(reason) => {
                    warn!(device = %key.device_id(), name = %hello.name, "tailnet admission revoked: {reason}");
                    self.methods.publish_pairing(&key.to_base64url());
                    meta.reason = reason;
                }
                NodeVerdict::Pending { reason, tailnet } => {
                    meta.reason = reason;
                    meta.tailnet = tailnet;
                }
            }
        }
        let decision = self
            .methods
            .pairing()
            .admit(key, &meta)
            .map_err(unavailable)?;
        match decision {
            PairingDecision::Paired(_) => Ok(CallerKind::Node {
                name: hello.name.clone(),
            }),
            PairingDecision::Pending(p) => {
                // Logged once per request: the node's retries only refresh it.
                if p.requested_at == p.refreshed_at {
                    info!(
                        device = %p.device_id,
                        name = %p.name,
                        request = %p.request_id,
                        reason = %p.reason,
                        "pairing request pending; approve with `clawmesh devices approve {}`",
                        p.request_id
                    );
                } else {
                    tracing::debug!(request = %p.request_id, "pairing request refreshed");
                }
                Err(Refusal {
                    code: RefusalCode::PairingRequired,
                    message: format!(
                        "pairing required: device is not approved yet{}; on the gateway run `clawmesh devices approve {}` (fingerprint {}) (requestId: {})",
                        if p.reason.is_empty() { String::new() } else { format!(" ({})", p.reason) },
                        p.request_id, p.fingerprint, p.request_id
                    ),
                    retryable: true,
                })
            }
        }
    }
}

impl Admission for GatewayAdmission {
    fn admit(
        &self,
        key: &PublicKey,
        remote: SocketAddr,
        hello: &Hello,
    ) -> Result<CallerKind, Refusal> {
        match &hello.role {
            HelloRole::Operator(op) => {
                let all = || {
                    scopes::ALL
                        .iter()
                        .map(|s| s.to_string())
                        .collect::<Vec<_>>()
                };
                if *key == self.own_key {
                    return Ok(CallerKind::Operator {
                        scopes: all(),
                        client: op.client.clone(),
                    });
                }
                let Some(token) = &op.token else {
                    let mut why = String::new();
                    if let Some(tailnet) = self.methods.tailnet() {
                        match tokio::runtime::Handle::current().block_on(tailnet.lookup(remote)) {
                            Some(Lookup::Identity(id)) => {
                                if let Some(scopes) =
                                    tailnet.policy().operator_scopes(&id, &op.scopes)
                                {
                                    info!(tailnet = %id.describe(), ?scopes, "operator admitted by the tailnet");
                                    return Ok(CallerKind::Operator {
                                        scopes,
                                        client: op.client.clone(),
                                    });
                                }
                                why = format!(" (tailnet identity {} is not allowed by gateway.auth.tailscale.operatorUsers/operatorTags)", id.describe());
                            }
                            Some(other) => {
                                why = format!(" ({})", other.failure().unwrap_or_default());
                            }
                            None => {}
                        }
                    }
                    return Err(Refusal {
                        code: RefusalCode::BadToken,
                        message: format!("operator token required{why}: pass --token (or CLAWMESH_TOKEN), or run the CLI on the gateway's machine with its state dir"),
                        retryable: false,
                    });
                };
                if !secret::equals_any(&self.tokens, token) {
                    return Err(Refusal {
                        code: RefusalCode::BadToken,
                        message: "unauthorized: gateway token mismatch".into(),
                        retryable: false,
                    });
                }
                let scopes = if op.scopes.is_empty() {
                    all()
                } else {
                    op.scopes
                        .iter()
                        .filter(|s| scopes::ALL.contains(&s.as_str()))
                        .cloned()
                        .collect()
                };
                Ok(CallerKind::Operator {
                    scopes,
                    client: op.client.clone(),
                })
            }
            HelloRole::Node(n) => self.admit_node(key, remote, n),
            HelloRole::Gateway(_) => Err(Refusal {
                code: RefusalCode::BadHello,
                message: "gateway hellos are handled by the mesh".into(),
                retryable: false,
            }),
        }
    }

    fn connected(&self, conn: Connection, caller: Caller, hello: Hello) {
        let methods = Arc::new(self.methods.clone());
        match (&caller.kind, hello.role, caller.key) {
            (CallerKind::Node { .. }, HelloRole::Node(n), Some(key)) => {
                let info = NodeInfo {
                    node_id: key.device_id(),
                    key,
                    name: n.name.clone(),
                    remote: caller.remote.to_string(),
                    platform: n.platform,
                    version: hello.software,
                    // Bounded: a node declares a handful of commands and labels.
                    commands: n.commands.into_iter().take(256).collect(),
                    labels: n.labels.into_iter().take(64).collect(),
                    attach: n.attach,
                    connected_at: std::time::SystemTime::now(),
                    client_id: "clawmesh-node".into(),
                    client_mode: "node".into(),
                    device_family: String::new(),
                    caps: Vec::new(),
                    path_env: None,
                };
                let node_id = info.node_id;
                let registry = self.methods.nodes().clone();
                let node_name = info.name.clone();
                let session = registry.attach(info, NodeLink::Quic(conn.clone()));
                if let Some(level) = self.methods.exec_default() {
                    crate::gateway::methods::push_exec_default(
                        NodeLink::Quic(conn.clone()),
                        Some(level),
                        node_name,
                    );
                }
                info!(node = %n.name, device = %node_id.short(), remote = %caller.remote, "node attached");
                let health = self.methods.health_settings().unwrap_or(self.health);
                let rows = self.methods.alert_rows().clone();
                tokio::spawn(async move {
                    // Serve the node's own requests while pinging it: a node that stops
                    // answering is closed, which fails its pending invokes at once. Its vitals
                    // go to the alert rows as they arrive.
                    let live = liveness::Liveness::default()
                        .with_vitals_hook(move |r| rows.on_vitals(node_id, session, r));
                    registry.set_liveness(&node_id, session, live.clone());
                    tokio::join!(
                        rpc::serve(conn.clone(), caller, methods),
                        liveness::monitor(conn.clone(), health, live, None),
                    );
                    registry.detach(&node_id, session);
                    let reason = conn
                        .close_reason()
                        .map(|r| r.to_string())
                        .unwrap_or_default();
                    info!(node = %n.name, "node detached: {reason}");
                });
            }
            _ => {
                tokio::spawn(rpc::serve(conn, caller, methods));
            }
        }
    }
}
