//! Upstream mode: lending the federation's nodes to an unmodified OpenClaw gateway.
//!
//! With `--upstream ws://host:port` (or `gateway.upstream.url`) this gateway connects to that
//! OpenClaw gateway as one classic node host per federation node it exposes (`proxy`), each
//! with its own device key under `<state>/upstream/<node id>/device.key`, declaring the real
//! node's commands, named for where the node is. OpenClaw's agents and CLI then see and call
//! those nodes as their own; every invoke runs through this gateway's method table and so
//! through the federation's delegation to wherever the node is attached.
//!
//! - `settings`: flags and `gateway.upstream.*`;
//! - `dial`: the WebSocket (ws://, or wss:// with the certificate fingerprint pinned);
//! - `client`: the classic client handshake and device signature (public with `dial`: the
//!   upstream benchmark's operator client is this same code);
//! - `proxy`: one proxy node host (invokes, cancels, reconnects);
//! - `approve`: `autoApprove`, for this gateway's own proxies only;
//! - this file: following the federation's node list (a proxy per selected node, started,
//!   renamed or stopped within one health interval).

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clawmesh_federation::identity::DeviceIdentity;
use clawmesh_federation::rpc::{Caller, CallerKind};
use serde_json::{json, Value};
use tokio::sync::Notify;
use tracing::{info, warn};

use crate::gateway::methods::Methods;

mod approve;
pub mod client;
pub mod dial;
mod proxy;
pub mod settings;

pub use settings::UpstreamSettings;

/// How long a node whose gateway went offline keeps its proxy: long enough for the node to
/// fail over to another gateway (its own dial timeout plus the federation noticing), short
/// enough that a node that is really gone leaves OpenClaw's list within a minute.
const FAILOVER_GRACE: Duration = Duration::from_secs(30);

/// Most proxies one gateway opens: each is a socket and a task on both sides; a federation
/// larger than this is exposed through a selector (`gateway.upstream.nodes`), and the nodes
/// left out are logged.
const MAX_PROXIES: usize = 1000;

/// Why an upstream connection failed.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// TCP, TLS or the WebSocket upgrade failed.
    #[error("dial {0}")]
    Dial(String),
    /// The socket closed or broke.
    #[error("closed: {0}")]
    Closed(String),
    /// The OpenClaw gateway answered with an error (refused connect, failed request).
    #[error("{code}: {message}")]
    Refused {
        /// `error.code`.
        code: String,
        /// `error.message`.
        message: String,
        /// `error.details` (`details.code` is what clients branch on).
        details: Value,
    },
    /// A frame the classic protocol does not allow.
    #[error("protocol: {0}")]
    Protocol(String),
    /// The state dir (proxy keys) could not be used.
    #[error("state: {0}")]
    State(String),
}

/// What every proxy and the approver share.
pub struct Context {
    methods: Methods,
    settings: UpstreamSettings,
    pin: Option<[u8; 32]>,
    nudge: Notify,
    /// Woken after the approver approved something: proxies waiting for approval retry now
    /// instead of at the end of their backoff.
    approved: Notify,
    proxies: Mutex<HashSet<String>>,
}

impl Context {
    /// Asks the approver (with `autoApprove`) to look at OpenClaw's pending requests.
    fn approve_soon(&self) {
        if self.settings.auto_approve {
            self.nudge.notify_one();
        }
    }

    /// Device ids of the proxies running now: the only requests the approver may approve.
    fn proxy_ids(&self) -> HashSet<String> {
        self.proxies
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

/// A running proxy.
struct Running {
    spec: proxy::Spec,
    proxy_id: String,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Running {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Starts the upstream mode in the background: checks the settings, then follows the
/// federation's node list every `interval` (the health interval) and on every attach or
/// detach here.
pub fn start(
    methods: Methods,
    settings: UpstreamSettings,
    state_dir: PathBuf,
    interval: Duration,
) -> Result<tokio::task::JoinHandle<()>, UpstreamError> {
    UpstreamSettings::check_url(&settings.url).map_err(UpstreamError::Protocol)?;
    let pin = settings.pin().map_err(UpstreamError::Protocol)?;
    if settings.url.starts_with("wss://") && pin.is_none() {
        return Err(UpstreamError::Protocol(
            "wss:// upstream needs gateway.upstream.tlsFingerprint (--upstream-tls-fingerprint)"
                .into(),
        ));
    }
    let ctx = Arc::new(Context {
        methods,
        settings,
        pin,
        nudge: Notify::new(),
        approved: Notify::new(),
        proxies: Mutex::new(HashSet::new()),
    });
    info!(url = %ctx.settings.url, nodes = ?ctx.settings.nodes, auto_approve = ctx.settings.auto_approve, "upstream mode: lending federation nodes to an OpenClaw gateway");
    Ok(tokio::spawn(follow(ctx, state_dir, interval)))
}

/// The caller the node list is read as: this gateway itself.
fn own_caller() -> Caller {
    Caller {
        key: None,
        kind: CallerKind::Gateway {
            name: "upstream".into(),
        },
        remote: std::net::SocketAddr::from(([0, 0, 0, 0], 0)),
    }
}

async fn follow(ctx: Arc<Context>, state_dir: PathBuf, interval: Duration) {
    let approver = ctx
        .settings
        .auto_approve
        .then(|| tokio::spawn(approve::run(ctx.clone())));
    let _approver = approver.map(AbortOnDrop);
    let mut changes = ctx.methods.nodes().changes();
    let mut running: HashMap<String, Running> = HashMap::new();
    // When and where each node was last seen connected, for the failover grace.
    let mut last_live: HashMap<String, (Instant, String)> = HashMap::new();
    let mut warned_cap = false;
    loop {
        match ctx
            .methods
            .dispatch(&own_caller(), "node.list", json!({"all": true}))
            .await
        {
            Ok(list) => {
                let rows = list["nodes"].as_array().cloned().unwrap_or_default();
                let mut want: HashMap<String, proxy::Spec> = HashMap::new();
                let now = Instant::now();
                for row in rows.iter().filter(|r| selected(&ctx.settings.nodes, r)) {
                    let Some(id) = row["nodeId"].as_str() else {
                        continue;
                    };
                    let live = row["connected"] == true;
                    let gateway = row["gateway"].as_str().unwrap_or("").to_string();
                    if live {
                        last_live.insert(id.to_string(), (now, gateway.clone()));
                    }
                    // A node whose gateway went offline while it was attached there may be
                    // failing over: keep it a while. (A node that left a healthy gateway
                    // may still be claimed by a dead one it used before: that is no
                    // failover.)
                    let grace = row["gatewayStatus"] == "offline"
                        && last_live.get(id).is_some_and(|(t, g)| {
                            *g == gateway && now.duration_since(*t) < FAILOVER_GRACE
                        });
                    if !(live || grace) {
                        continue;
                    }
                    if want.len() >= MAX_PROXIES {
                        if !warned_cap {
                            warn!("more than {MAX_PROXIES} nodes selected for the OpenClaw gateway; the rest are not lent (narrow gateway.upstream.nodes)");
                            warned_cap = true;
                        }
                        break;
                    }
                    let spec = running
                        .get(id)
                        .filter(|_| !live)
                        .map(|r| r.spec.clone())
                        .unwrap_or_else(|| spec_of(row));
                    want.insert(id.to_string(), spec);
                }
                last_live.retain(|id, (t, _)| {
                    want.contains_key(id) || now.duration_since(*t) < FAILOVER_GRACE
                });
                // Stop proxies of nodes gone, or whose name or commands changed (a new
                // manifest is a new connect, as the classic node host does).
                running.retain(|id, r| {
                    let keep = want.get(id).is_some_and(|s| *s == r.spec);
                    if !keep {
                        info!(node = %r.spec.display_name, "node left the selection or changed: proxy stopped");
                    }
                    keep
                });
                for (id, spec) in want {
                    if running.contains_key(&id) {
                        continue;
                    }
                    match start_proxy(&ctx, &state_dir, spec) {
                        Ok(r) => {
                            running.insert(id, r);
                        }
                        Err(e) => warn!("cannot start the proxy of node {id}: {e}"),
                    }
                }
                *ctx.proxies.lock().unwrap_or_else(|p| p.into_inner()) =
                    running.values().map(|r| r.proxy_id.clone()).collect();
            }
            Err(e) => warn!(
                "upstream: cannot list the federation's nodes: {}",
                e.message
            ),
        }
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            r = changes.changed() => if r.is_err() { return },
        }
    }
}

/// Aborts a task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

fn start_proxy(
    ctx: &Arc<Context>,
    state_dir: &std::path::Path,
    spec: proxy::Spec,
) -> Result<Running, UpstreamError> {
    let dir = state_dir.join("upstream").join(&spec.node_id);
    std::fs::create_dir_all(&dir)
        .map_err(|e| UpstreamError::State(format!("{}: {e}", dir.display())))?;
    let (key, _) =
        DeviceIdentity::load_or_create(&dir).map_err(|e| UpstreamError::State(e.to_string()))?;
    let proxy_id = key.device_id().to_string();
    info!(node = %spec.display_name, proxy = %&proxy_id[..12], "lending node to the OpenClaw gateway");
    let task = tokio::spawn(proxy::run(
        spec.clone(),
        key,
        ctx.clone(),
        Arc::new(proxy::Stats::default()),
    ));
    Ok(Running {
        spec,
        proxy_id,
        task,
    })
}

/// The proxy of one listing row.
fn spec_of(row: &Value) -> proxy::Spec {
    let s = |k: &str| row[k].as_str().unwrap_or("").to_string();
    let platform = Some(s("platform"))
        .filter(|p| !p.is_empty())
        .unwrap_or_else(|| "linux".into());
    proxy::Spec {
        node_id: s("nodeId"),
        display_name: display_name(row),
        platform,
        commands: row["commands"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|c| c.as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default(),
    }
}

/// `name (place, region)`: the node's name and where it is, from its labels (`site`,
/// `location` or `city` for the place; `region`, which defaults to the region of the gateway
/// where it was paired and so does not change when it fails over). Without labels, the
/// gateway it is attached to.
pub fn display_name(row: &Value) -> String {
    let name = row["displayName"]
        .as_str()
        .or(row["nodeId"].as_str())
        .unwrap_or("node");
    let labels = &row["labels"];
    let place = ["site", "location", "city"]
        .iter()
        .find_map(|k| labels[*k].as_str());
    let region = labels["region"].as_str();
    let parts: Vec<&str> = place.into_iter().chain(region).collect();
    if parts.is_empty() {
        match row["gateway"].as_str() {
            Some(g) => format!("{name} (gateway {g})"),
            None => name.to_string(),
        }
    } else {
        format!("{name} ({})", parts.join(", "))
    }
}

/// Whether a listing row is selected by `selectors` (empty: every node). A selector is `*`,
/// `key=value` on the node's labels, `gateway/NAME` (every node attached to gateway NAME),
/// `gateway/*`, a node name, or a node id (or a prefix of at least 6 characters).
pub fn selected(selectors: &[String], row: &Value) -> bool {
    if selectors.is_empty() {
        return true;
    }
    selectors.iter().any(|sel| {
        let sel = sel.trim();
        if sel == "*" {
            return true;
        }
        if let Some(g) = sel.strip_prefix("gateway/") {
            return g == "*" || row["gateway"] == g;
        }
        if let Some((k, v)) = sel.split_once('=') {
            return row["labels"][k.trim()] == v.trim();
        }
        let id = row["nodeId"].as_str().unwrap_or("");
        row["displayName"] == sel || id == sel || (sel.len() >= 6 && id.starts_with(sel))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row() -> Value {
        json!({"nodeId": "abcdef0123", "displayName": "sg-box", "gateway": "singapore",
               "labels": {"region": "ap-southeast-1", "city": "singapore", "role": "worker"}})
    }

    #[test]
    fn names_say_where_the_node_is() {
        assert_eq!(display_name(&row()), "sg-box (singapore, ap-southeast-1)");
        let r = json!({"displayName": "fra-box", "gateway": "frankfurt", "labels": {}});
        assert_eq!(display_name(&r), "fra-box (gateway frankfurt)");
        let r = json!({"displayName": "x", "labels": {"region": "eu"}});
        assert_eq!(display_name(&r), "x (eu)");
    }

    #[test]
    fn selectors() {
        let r = row();
        let sel = |s: &[&str]| selected(&s.iter().map(|s| s.to_string()).collect::<Vec<_>>(), &r);
        assert!(sel(&[]));
        assert!(sel(&["*"]));
        assert!(sel(&["role=worker"]));
        assert!(!sel(&["role=web"]));
        assert!(sel(&["gateway/singapore"]));
        assert!(!sel(&["gateway/tokyo"]));
        assert!(sel(&["gateway/tokyo", "sg-box"]));
        assert!(sel(&["abcdef"]));
        assert!(!sel(&["abc"]));
    }
}
