//! The classic OpenClaw WebSocket bridge: the gateway's second front door.
//!
//! It listens on TCP at the gateway's port (the classic 18789) and speaks the classic protocol
//! at any path (the node host may add a context path): challenge, `connect` with device
//! signatures and tokens, pairing, `hello-ok`, ticks, and requests. Operators' requests go to
//! the same method table as native QUIC requests; classic node hosts become nodes in the same
//! registry as native ones. `GET /healthz` (liveness) and `GET /readyz` (readiness) answer on the same port,
//! and `GET /` is the status page (`GET /status.json` its feed, [`crate::gateway::page`]). Optional TLS (`wss://`).

pub mod classic_node;
pub mod connect;
pub mod frames;
pub mod outbox;
pub mod session;
pub mod tls;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use axum::extract::connect_info::Connected;
use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::WebSocketUpgrade;
use axum::extract::{ConnectInfo, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::serve::IncomingStream;
use axum::{Json, Router};
use serde_json::json;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::gateway::methods::Methods;

/// Largest frame after `hello-ok` (classic `policy.maxPayload`, 25 MiB).
pub const MAX_PAYLOAD: usize = 26_214_400;

/// WebSocket read buffer per connection: a few KiB, not tungstenite's 128 KiB, so one gateway
/// holds tens of thousands of idle node sockets. Larger frames still arrive; the buffer grows
/// for them and shrinks back.
const READ_BUFFER: usize = 4 * 1024;

/// Classic connections a gateway holds before it answers 503: far above the 10 000 idle
/// nodes it is built for, well below what would exhaust memory or file descriptors.
const MAX_CONNECTIONS: usize = 50_000;

/// Shared state of the bridge.
pub struct Bridge {
    /// The gateway's method table (and through it the node and pairing registries).
    pub methods: Methods,
    /// Shared secrets a classic client may present (gateway token, join token).
    pub secrets: Vec<String>,
    /// Becomes `Some(reason)` when the gateway stops: sessions send `shutdown` and close.
    pub shutdown: watch::Receiver<Option<String>>,
    /// Start time, for `uptimeMs`.
    pub started: Instant,
    connections: Arc<AtomicUsize>,
    /// The gateway's `/metrics` registry, once attached ([`Bridge::with_metrics`]).
    metrics: Option<Arc<crate::gateway::metrics::GatewayMetrics>>,
}

impl Bridge {
    /// A bridge over the gateway's method table.
    pub fn new(
        methods: Methods,
        secrets: Vec<String>,
        shutdown: watch::Receiver<Option<String>>,
    ) -> Self {
        Bridge {
            methods,
            secrets,
            shutdown,
            started: Instant::now(),
            connections: Arc::new(AtomicUsize::new(0)),
            metrics: None,
        }
    }

    /// Open classic connections, shared with `/metrics`.
    pub fn connection_count(&self) -> Arc<AtomicUsize> {
        self.connections.clone()
    }

    /// Serves `metrics` at `GET /metrics`.
    pub fn with_metrics(mut self, metrics: crate::gateway::metrics::GatewayMetrics) -> Self {
        self.metrics = Some(Arc::new(metrics));
        self
    }

    /// Whether an HTTP request may read operator data: from loopback, or with
    /// `Authorization: Bearer <token>` naming the gateway's operator or join token.
    pub fn operator_allowed(&self, remote: SocketAddr, headers: &axum::http::HeaderMap) -> bool {
        if remote.ip().to_canonical().is_loopback() {
            return true;
        }
        headers
            .get(axum::http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .is_some_and(|t| clawmesh_federation::secret::equals_any(&self.secrets, t.trim()))
    }

    fn features_methods(&self) -> Vec<&'static str> {
        let mut m = crate::gateway::methods::method_names();
        m.extend([
            "node.invoke.result",
            "node.event",
            "node.skills.update",
            "node.pluginTools.update",
            "node.runnerInventory.update",
        ]);
        m
    }
}

async fn healthz(State(bridge): State<Arc<Bridge>>) -> impl IntoResponse {
    let ok = bridge.methods.dispatch_health();
    (StatusCode::OK, Json(ok))
}

/// `GET /readyz[?all=1]`: 200 when the gateway is ready to serve the federation, else 503
/// with the reasons in the body (see [`crate::gateway::methods::Methods::readiness`]).
/// `/healthz` stays a liveness probe: 200 while the process serves.
async fn readyz(
    State(bridge): State<Arc<Bridge>>,
    axum::extract::RawQuery(query): axum::extract::RawQuery,
) -> impl IntoResponse {
    let all = query
        .as_deref()
        .unwrap_or("")
        .split('&')
        .any(|kv| matches!(kv, "all" | "all=1" | "all=true"));
    let (ready, doc) = bridge.methods.readiness(all);
    let code = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, Json(doc))
}

/// `GET /metrics`: the Prometheus text format, for loopback or the operator token.
async fn metrics(
    State(bridge): State<Arc<Bridge>>,
    ConnectInfo(Peer(remote)): ConnectInfo<Peer>,
    headers: axum::http::HeaderMap,
) -> Response {
    if !bridge.operator_allowed(remote, &headers) {
        return (
            StatusCode::UNAUTHORIZED,
            [(axum::http::header::WWW_AUTHENTICATE, "Bearer")],
            "metrics need the operator token: Authorization: Bearer <token>\n",
        )
            .into_response();
    }
    let Some(m) = bridge.metrics.clone() else {
        return (StatusCode::NOT_FOUND, "no metrics on this gateway\n").into_response();
    };
    // Off the async threads: a scrape reads SQLite (the log spool's counts).
    match tokio::task::spawn_blocking(move || m.encode()).await {
        Ok(Ok(text)) => (
            [(
                axum::http::header::CONTENT_TYPE,
                crate::gateway::metrics::CONTENT_TYPE,
            )],
            text,
        )
            .into_response(),
        _ => (StatusCode::INTERNAL_SERVER_ERROR, "metrics failed\n").into_response(),
    }
}

/// The client's address, for both the plain and the TLS listener.
#[derive(Debug, Clone, Copy)]
pub struct Peer(pub SocketAddr);

impl Connected<IncomingStream<'_, TcpListener>> for Peer {
    fn connect_info(stream: IncomingStream<'_, TcpListener>) -> Self {
        Peer(*stream.remote_addr())
    }
}

impl Connected<IncomingStream<'_, tls::TlsListener>> for Peer {
    fn connect_info(stream: IncomingStream<'_, tls::TlsListener>) -> Self {
        Peer(*stream.remote_addr())
    }
}

async fn upgrade(
    State(bridge): State<Arc<Bridge>>,
    ConnectInfo(Peer(remote)): ConnectInfo<Peer>,
    ws: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Response {
    let Ok(ws) = ws else {
        return (
            StatusCode::UPGRADE_REQUIRED,
            Json(json!({"error": "this is a clawmesh gateway: connect with a WebSocket client (classic OpenClaw protocol), or GET /healthz"})),
        )
            .into_response();
    };
    if bridge.connections.load(Ordering::Relaxed) >= MAX_CONNECTIONS {
        return (StatusCode::SERVICE_UNAVAILABLE, "too many connections").into_response();
    }
    ws.read_buffer_size(READ_BUFFER)
        .write_buffer_size(0)
        .max_message_size(MAX_PAYLOAD)
        .max_frame_size(MAX_PAYLOAD)
        .on_upgrade(move |socket| async move {
            bridge.connections.fetch_add(1, Ordering::Relaxed);
            session::run(socket, remote, bridge.clone()).await;
            bridge.connections.fetch_sub(1, Ordering::Relaxed);
        })
}

/// `GET /`: a WebSocket upgrade is a classic client (served as at any path); anything else
/// gets the status page ([`crate::gateway::page`]), with the feed embedded for a caller that
/// may read it (loopback), else the page asks for the token.
async fn status_page(
    State(bridge): State<Arc<Bridge>>,
    ConnectInfo(Peer(remote)): ConnectInfo<Peer>,
    ws: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Response {
    if let Ok(ws) = ws {
        return upgrade(State(bridge), ConnectInfo(Peer(remote)), Ok(ws)).await;
    }
    let initial = if bridge.operator_allowed(remote, &axum::http::HeaderMap::new()) {
        Some(crate::gateway::page::feed(&bridge.methods, remote).await)
    } else {
        None
    };
    let name = initial
        .as_ref()
        .and_then(|v| v["self"].as_str().map(str::to_string))
        .unwrap_or_else(|| "gateway".into());
    (
        [
            (axum::http::header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (axum::http::header::CACHE_CONTROL, "no-store"),
        ],
        crate::gateway::page::html(&name, initial.as_ref()),
    )
        .into_response()
}

/// `GET /status.json`: the status page's feed; loopback, or the operator token as a Bearer
/// header.
async fn status_feed(
    State(bridge): State<Arc<Bridge>>,
    ConnectInfo(Peer(remote)): ConnectInfo<Peer>,
    headers: axum::http::HeaderMap,
) -> Response {
    if !bridge.operator_allowed(remote, &headers) {
        return (
            StatusCode::UNAUTHORIZED,
            Json(json!({"error": "the status feed needs the operator token (Authorization: Bearer TOKEN) from a non-loopback address"})),
        )
            .into_response();
    }
    (
        [(axum::http::header::CACHE_CONTROL, "no-store")],
        Json(crate::gateway::page::feed(&bridge.methods, remote).await),
    )
        .into_response()
}

fn router(bridge: Arc<Bridge>) -> Router {
    Router::new()
        .route("/", get(status_page))
        .route("/status.json", get(status_feed))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .fallback(get(upgrade))
        .with_state(bridge)
}

/// Serves plain `ws://` on `listener` until the shutdown signal.
pub async fn serve_plain(listener: TcpListener, bridge: Arc<Bridge>) -> std::io::Result<()> {
    let stop = bridge.shutdown.clone();
    let bridge_conns = bridge.connections.clone();
    axum::serve(
        listener,
        router(bridge).into_make_service_with_connect_info::<Peer>(),
    )
    .with_graceful_shutdown(stopped(stop, bridge_conns))
    .await
}

/// Resolves when the gateway stops, after open sessions had a moment to send `shutdown` and
/// close (no wait when none is open).
async fn stopped(mut stop: watch::Receiver<Option<String>>, conns: Arc<AtomicUsize>) {
    let _ = stop.changed().await;
    if conns.load(Ordering::Relaxed) > 0 {
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    }
}

/// Serves `wss://` on `listener` with `config` until the shutdown signal.
pub async fn serve_tls(
    listener: TcpListener,
    config: Arc<rustls::ServerConfig>,
    bridge: Arc<Bridge>,
) -> std::io::Result<()> {
    let stop = bridge.shutdown.clone();
    let bridge_conns = bridge.connections.clone();
    let tls = tls::TlsListener::new(listener, config)?;
    axum::serve(
        tls,
        router(bridge).into_make_service_with_connect_info::<Peer>(),
    )
    .with_graceful_shutdown(stopped(stop, bridge_conns))
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn operator_data_needs_loopback_or_the_token() {
        let dir = tempfile::tempdir().unwrap();
        let methods = Methods::bare(dir.path());
        let (_tx, rx) = watch::channel(None);
        let b = Bridge::new(methods, vec!["s3cret".into()], rx);
        let far: SocketAddr = "192.0.2.7:5000".parse().unwrap();
        let mut h = axum::http::HeaderMap::new();
        assert!(b.operator_allowed("127.0.0.1:1".parse().unwrap(), &h));
        assert!(b.operator_allowed("[::ffff:127.0.0.1]:1".parse().unwrap(), &h));
        assert!(!b.operator_allowed(far, &h));
        h.insert("authorization", "Bearer wrong".parse().unwrap());
        assert!(!b.operator_allowed(far, &h));
        h.insert("authorization", "Basic s3cret".parse().unwrap());
        assert!(!b.operator_allowed(far, &h));
        h.insert("authorization", "Bearer s3cret".parse().unwrap());
        assert!(b.operator_allowed(far, &h));
    }
}
