//! `clawmesh node run`: the node host process.
//!
//! It connects to a gateway over QUIC with its device key and serves the gateway's command
//! requests (`system.run`, `system.which`, `system.execApprovals.get/set`). An unknown device
//! becomes a pending pairing request on the gateway; the node keeps retrying (1 s, 2 s, ...
//! capped at 5 s while waiting for approval) and starts serving by itself once approved. With
//! several gateways it moves to the next when the current one is unreachable or drops it.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, Context, Result};
use clawmesh_discovery::PeerUrl;
use clawmesh_federation::backoff::Backoff;
use clawmesh_federation::endpoint::{self, TransportOptions};
use clawmesh_federation::handshake::{self, HandshakeError};
use clawmesh_federation::identity::DeviceIdentity;
use clawmesh_federation::rpc::{self, BoxFuture, Caller, CallerKind, Handler};
use clawmesh_federation::wire::{HelloRole, NodeHello, RefusalCode, Request, WireError};
use serde_json::Value;
use tracing::{info, warn};

use crate::node::approvals::{ExecApprovals, Security, SetParams};
use crate::node::exec::{self, ExecLimits, RunParams};
use crate::node::which::{self, WhichParams};

/// Commands a clawmesh node offers.
pub const COMMANDS: &[&str] = &[
    "system.run",
    "system.which",
    "system.execApprovals.get",
    "system.execApprovals.set",
];

/// How long a connect attempt may take before the next gateway is tried.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Settings of a node host.
#[derive(Debug, Clone)]
pub struct NodeSettings {
    /// State dir (key, exec approvals).
    pub state_dir: PathBuf,
    /// Gateways to try, in order.
    pub gateways: Vec<PeerUrl>,
    /// Display name.
    pub name: String,
    /// Gateway token, if the gateway asks for one.
    pub token: Option<String>,
    /// Labels such as `region=fra`.
    pub labels: Vec<(String, String)>,
    /// `--security` override of the exec approvals level (a lab's `full`).
    pub security: Option<Security>,
    /// With no gateway given, look for gateways with mDNS.
    pub mdns: bool,
}

/// Serves the gateway's requests on a node.
#[derive(Clone)]
pub struct NodeHandler {
    inner: Arc<NodeInner>,
}

use crate::node_protocol::{wall_ns, DEFAULTS_COMMAND, TIMING_KEY};

struct NodeInner {
    approvals: ExecApprovals,
    limits: ExecLimits,
}

impl NodeHandler {
    /// A handler over the node's state dir.
    pub fn new(settings: &NodeSettings) -> Self {
        NodeHandler {
            inner: Arc::new(NodeInner {
                approvals: ExecApprovals::new(&settings.state_dir, settings.security)
                    .with_node_name(settings.name.clone()),
                limits: ExecLimits::default(),
            }),
        }
    }

    async fn run(&self, method: &str, params: Value) -> Result<Value, WireError> {
        let err = |code: &str, msg: String| WireError::new(code, msg);
        let to_json = |v: Result<Value, serde_json::Error>| {
            v.map_err(|e| err("UNAVAILABLE", format!("encoding the result: {e}")))
        };
        match method {
            "system.run" => {
                let p = RunParams::from_value(params).map_err(|e| err(e.code(), e.to_string()))?;
                let r = exec::system_run(
                    p,
                    &self.inner.approvals,
                    &self.inner.limits,
                    std::future::pending(),
                )
                .await
                .map_err(|e| err(e.code(), e.to_string()))?;
                to_json(serde_json::to_value(r))
            }
            "system.which" => {
                let p =
                    WhichParams::from_value(params).map_err(|e| err(e.code(), e.to_string()))?;
                let r = which::which(&p).map_err(|e| err(e.code(), e.to_string()))?;
                to_json(serde_json::to_value(r))
            }
            "system.execApprovals.get" => {
                let r = self
                    .inner
                    .approvals
                    .get()
                    .map_err(|e| err(e.code(), e.to_string()))?;
                to_json(serde_json::to_value(r))
            }
            "system.execApprovals.set" => {
                let p = SetParams::from_value(params).map_err(|e| err(e.code(), e.to_string()))?;
                let r = self
                    .inner
                    .approvals
                    .set(p)
                    .map_err(|e| err(e.code(), e.to_string()))?;
                to_json(serde_json::to_value(r))
            }
            // Not advertised: only the gateway sends it, from the shared config.
            DEFAULTS_COMMAND => {
                let level = match params.get("security") {
                    None | Some(Value::Null) => None,
                    Some(Value::String(s)) => Some(s.parse::<Security>().map_err(|e| {
                        err("INVALID_REQUEST", format!("invalid security level: {e}"))
                    })?),
                    Some(other) => {
                        return Err(err(
                            "INVALID_REQUEST",
                            format!("security must be a string or null, not {other}"),
                        ))
                    }
                };
                if self.inner.approvals.federation_default() != level {
                    tracing::info!(
                        level = level.map(Security::as_str).unwrap_or("none"),
                        "federation default exec security level changed"
                    );
                }
                self.inner.approvals.set_federation_default(level);
                Ok(serde_json::json!({"ok": true}))
            }
            other => Err(err(
                "UNAVAILABLE",
                format!("command not advertised by this node: {other}"),
            )),
        }
    }
}

impl Handler for NodeHandler {
    fn handle(&self, caller: Caller, req: Request) -> BoxFuture<Result<String, WireError>> {
        // Handler futures are 'static: they hold their own reference to the shared state.
        let h = self.clone();
        Box::pin(async move {
            if !matches!(caller.kind, CallerKind::Gateway { .. }) {
                return Err(WireError::new(
                    "INVALID_REQUEST",
                    "only the gateway may invoke commands",
                ));
            }
            let received = wall_ns();
            let mut params: Value = if req.params.trim().is_empty() {
                Value::Object(Default::default())
            } else {
                serde_json::from_str(&req.params).map_err(|e| {
                    WireError::new("INVALID_REQUEST", format!("invalid params: {e}"))
                })?
            };
            // The gateway asks for hop times only when a benchmark asked it.
            let timing = params
                .as_object_mut()
                .and_then(|m| m.remove(TIMING_KEY))
                .is_some();
            tracing::debug!(req_id = req.id, command = %req.method, "invoke");
            let mut out = h.run(&req.method, params).await?;
            if timing {
                if let Value::Object(m) = &mut out {
                    m.insert(
                        TIMING_KEY.into(),
                        serde_json::json!({"receivedNs": received, "repliedNs": wall_ns()}),
                    );
                }
            }
            Ok(out.to_string())
        })
    }
}

/// Runs the node host until SIGINT/SIGTERM, or a refusal no retry can fix.
pub async fn run(mut s: NodeSettings) -> Result<()> {
    if s.gateways.is_empty() && s.mdns {
        s.gateways = super::find::gateways(s.token.as_deref()).await?;
    }
    if s.gateways.is_empty() {
        return Err(anyhow!(
            "no gateway to connect to: pass --gateway quic://host:port (or set node.gateways / gateway.remote.url in clawmesh.json)"
        ));
    }
    std::fs::create_dir_all(&s.state_dir)
        .with_context(|| format!("creating state dir {}", s.state_dir.display()))?;
    let _lock = crate::state_dir::DirLock::acquire_named(&s.state_dir, "node.lock", "node host")?;
    let (identity, _) = DeviceIdentity::load_or_create(&s.state_dir)?;
    let attach = crate::node::boot::AttachCounter::start(&s.state_dir)?;
    info!(device = %identity.device_id(), name = %s.name, "node host starting");
    let handler: Arc<dyn Handler> = Arc::new(NodeHandler::new(&s));
    // This host's log events go to its gateway (`node.logs`), which spools and ships them.
    let (handoff, records) = clawmesh_federation::logs::layer::channel(NODE_LOG_QUEUE);
    crate::logging::attach_spool(handoff.clone());
    let logs = NodeLogs {
        handoff,
        records: Arc::new(std::sync::Mutex::new(records)),
        lost: Arc::new(std::sync::atomic::AtomicU64::new(0)),
    };
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing the SIGTERM handler")?;
    let stop = async move {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => "SIGINT",
            _ = sigterm.recv() => "SIGTERM",
        }
    };
    tokio::pin!(stop);
    // Retry pacing: 1 s doubling to 30 s when gateways are unreachable; at most 5 s while
    // waiting for an operator's approval, so the node attaches soon after it.
    let mut backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(30));
    let mut pairing_backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(5));
    let mut idx = 0usize;
    let mut last_request: Option<String> = None;
    // The configured gateways first, then the ones the federation tells us about.
    let mut gateways = s.gateways.clone();
    let mut endpoints = Endpoints::default();
    loop {
        let url = gateways[idx % gateways.len()].clone();
        let url = &url;
        let attempt = tokio::select! {
            r = session(&s, &identity, &mut endpoints, url, attach.next(), handler.clone(), &logs) => r,
            sig = &mut stop => {
                info!("node host stopping ({sig})");
                return Ok(());
            }
        };
        let delay = match attempt {
            Ok(learned) => {
                for u in learned {
                    if !gateways.iter().any(|g| g.authority() == u.authority()) {
                        info!(gateway = %u, "learned another gateway of the federation");
                        gateways.push(u);
                    }
                }
                // Attached, served, then lost the gateway: move to the next one at once (a
                // dead gateway would cost a dial timeout), coming back round to it later.
                backoff.reset();
                pairing_backoff.reset();
                idx += 1;
                Duration::from_millis(100)
            }
            Err(SessionError::Refused {
                code: RefusalCode::PairingRequired,
                message,
            }) => {
                let req = message
                    .split("requestId: ")
                    .nth(1)
                    .map(|r| r.trim_end_matches(')').to_string());
                if req != last_request {
                    warn!("{message}");
                    last_request = req;
                }
                pairing_backoff.next_delay()
            }
            Err(SessionError::Refused {
                code: RefusalCode::BadToken,
                message,
            }) => {
                return Err(anyhow!("gateway {url} refused this node: {message}"));
            }
            Err(e) => {
                warn!(gateway = %url, "{e}");
                idx += 1;
                if idx.is_multiple_of(gateways.len()) {
                    backoff.next_delay()
                } else {
                    Duration::from_millis(100)
                }
            }
        };
        tokio::select! {
            _ = tokio::time::sleep(delay) => {},
            sig = &mut stop => {
                info!("node host stopping ({sig})");
                return Ok(());
            }
        }
    }
}

#[derive(Debug, thiserror::Error)]
enum SessionError {
    #[error("{message}")]
    Refused { code: RefusalCode, message: String },
    #[error("{0}")]
    Other(String),
}

/// The node's QUIC endpoints, one per address family, made once and reused for every
/// attempt: each endpoint holds a socket and megabytes of buffers, so one per retry would
/// grow the node's memory.
#[derive(Default)]
struct Endpoints {
    v4: Option<quinn::Endpoint>,
    v6: Option<quinn::Endpoint>,
}

impl Endpoints {
    fn for_addr(
        &mut self,
        identity: &DeviceIdentity,
        addr: std::net::SocketAddr,
    ) -> Result<quinn::Endpoint, SessionError> {
        let slot = if addr.is_ipv4() {
            &mut self.v4
        } else {
            &mut self.v6
        };
        if let Some(ep) = slot {
            return Ok(ep.clone());
        }
        let ep = endpoint::client(identity, addr, &TransportOptions::default())
            .map_err(|e| SessionError::Other(e.to_string()))?;
        *slot = Some(ep.clone());
        Ok(ep)
    }
}

/// Log entries queued on a node host before they are sent to its gateway: a second of a very
/// chatty host; what does not fit is counted and reported to the gateway.
const NODE_LOG_QUEUE: usize = 10_000;

/// How often a node host sends its queued log entries (a gateway ships on to the primary at
/// its own batch interval).
const NODE_LOG_EVERY: Duration = Duration::from_secs(1);

/// A `node.logs` request must be answered within this (the gateway only queues the entries).
const NODE_LOG_TIMEOUT: Duration = Duration::from_secs(10);

/// This host's log entries on their way to its gateway.
#[derive(Clone)]
struct NodeLogs {
    handoff: clawmesh_federation::logs::layer::Handoff,
    records: Arc<
        std::sync::Mutex<std::sync::mpsc::Receiver<Box<clawmesh_federation::logs::record::Entry>>>,
    >,
    /// Entries lost (queue full, or a send that failed) not yet reported to a gateway.
    lost: Arc<std::sync::atomic::AtomicU64>,
}

/// Sends queued log entries to the gateway every second until the connection ends.
async fn forward_logs(conn: quinn::Connection, logs: &NodeLogs) {
    use std::sync::atomic::Ordering;
    loop {
        tokio::select! {
            _ = conn.closed() => return,
            _ = tokio::time::sleep(NODE_LOG_EVERY) => {}
        }
        let entries: Vec<_> = {
            let rx = logs.records.lock().unwrap_or_else(|p| p.into_inner());
            // The gateway takes at most this many per request.
            std::iter::from_fn(|| rx.try_recv().ok())
                .take(10_000)
                .collect()
        };
        let lost = logs.lost.swap(0, Ordering::Relaxed) + logs.handoff.take_overflow();
        if entries.is_empty() && lost == 0 {
            continue;
        }
        let n = entries.len() as u64;
        let params = serde_json::json!({"entries": entries, "lost": lost});
        if rpc::call(&conn, "node.logs", params.to_string(), 0, NODE_LOG_TIMEOUT)
            .await
            .is_err()
        {
            // Not retried: the entries are counted as lost and reported with the next send.
            logs.lost.fetch_add(n + lost, Ordering::Relaxed);
        }
    }
}

/// One attachment to one gateway: connect, hello, serve until the connection ends.
async fn session(
    s: &NodeSettings,
    identity: &DeviceIdentity,
    endpoints: &mut Endpoints,
    url: &PeerUrl,
    attach: clawmesh_federation::directory::AttachOrder,
    handler: Arc<dyn Handler>,
    logs: &NodeLogs,
) -> Result<Vec<PeerUrl>, SessionError> {
    let addr = clawmesh_federation::mesh::resolve(&url.authority())
        .await
        .map_err(SessionError::Other)?;
    let ep = endpoints.for_addr(identity, addr)?;
    let conn = endpoint::dial(&ep, addr, CONNECT_TIMEOUT)
        .await
        .map_err(|e| SessionError::Other(format!("cannot reach gateway {url}: {e}")))?;
    let hello = handshake::hello(
        crate::VERSION,
        0,
        HelloRole::Node(NodeHello {
            name: s.name.clone(),
            token: s.token.clone(),
            commands: COMMANDS.iter().map(|c| c.to_string()).collect(),
            labels: s.labels.clone(),
            platform: std::env::consts::OS.to_string(),
            attach,
        }),
    );
    let welcome = match handshake::send_hello(&conn, &hello).await {
        Ok(w) => w,
        Err(HandshakeError::Refused { refusal, .. }) => {
            conn.close(0u32.into(), b"refused");
            return Err(SessionError::Refused {
                code: refusal.code,
                message: refusal.message,
            });
        }
        Err(e) => return Err(SessionError::Other(e.to_string())),
    };
    info!(gateway = %welcome.name, %url, "attached; serving commands");
    let caller = Caller {
        key: endpoint::peer_key(&conn),
        kind: CallerKind::Gateway {
            name: welcome.name.clone(),
        },
        remote: conn.remote_address(),
    };
    let learned: Vec<PeerUrl> = welcome
        .membership
        .iter()
        .flat_map(|m| m.members.iter())
        .filter_map(|m| PeerUrl::parse(&m.addr, crate::DEFAULT_PORT).ok())
        .collect();
    // Ping the gateway at half its health interval; three misses in a row (one and a half
    // intervals of silence, so one lost datagram or a brief stall is forgiven) mean it is
    // gone, and the node moves on within about two of the gateway's intervals.
    let health = clawmesh_federation::health::HealthConfig {
        interval: Duration::from_millis((welcome.health_interval_ms / 2).max(50)),
        unhealthy_threshold: 3,
    };
    // This host's vitals ride every other ping's pace: VITALS_EVERY of the gateway's
    // intervals, which are two of ours.
    let send = clawmesh_federation::liveness::SendVitals {
        sampler: clawmesh_federation::vitals::VitalsSampler::new(&s.state_dir),
        every: clawmesh_federation::vitals::VITALS_EVERY * 2,
    };
    tokio::join!(
        rpc::serve(conn.clone(), caller, handler),
        clawmesh_federation::liveness::monitor(
            conn.clone(),
            health,
            Default::default(),
            Some(send)
        ),
        forward_logs(conn.clone(), logs),
    );
    let reason = conn
        .close_reason()
        .map(|r| r.to_string())
        .unwrap_or_else(|| "connection ended".into());
    warn!(gateway = %welcome.name, "detached: {reason}");
    Ok(learned)
}
