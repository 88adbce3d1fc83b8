//! On-demand benchmark of the classic WebSocket bridge (issue 4): idle classic connections one
//! gateway holds, and `node.invoke` through the bridge to a real classic node host, beside the
//! classic OpenClaw gateway measured in the same run with the same client.
//!
//! What it measures, all on 127.0.0.1:
//!
//! 1. **Idle operator connections** (`--conns`, default 10 000): starts a release
//!    `clawmesh gateway run --primary --token T --port 0` (state dir in a temp dir; the port comes
//!    from `gateway.json`), then opens WebSocket connections from this process, 200 at a time,
//!    each completing the real handshake (waits for `connect.challenge`, sends `connect` as an
//!    operator with the token, reads `hello-ok`). Every connection stays open and idle (a task
//!    reads it, so WebSocket pings are answered and ticks consumed). Reports the gateway's
//!    VmRSS / VmHWM (`/proc/PID/status`), open file descriptors and CPU time at 0, 1 000, 5 000
//!    and 10 000 connections, the per-connection figure `(rss_10k - rss_0) / 10 000`, the
//!    handshake latency, `health` round trips on a separate connection before and with the
//!    connections held, then holds them `--hold-secs` (default 32, after a 2 s settle: every
//!    connection sees a ping and a tick) and checks none was dropped; then the RSS after they
//!    all closed, and after a second wave of as many connections (a leak would keep growing).
//! 2. **Idle node connections** (`--node-conns`, default 10 000; `--skip-nodes` to skip): one
//!    Ed25519 device per connection with a v3-signed `connect` as `role:"node"`. The first 500
//!    devices go through the real pairing path (connect refused with `PAIRING_REQUIRED`, then
//!    `device.pair.approve` one by one on an operator connection: approval latency, first vs last
//!    100); the rest are added as paired records with `Registry::apply` (the federation-sync
//!    path) while the gateway is stopped, since one-by-one approval costs O(paired devices) per
//!    approval. The gateway is restarted on that state and every device connects as a node and
//!    stays idle: the same memory figures as phase 1, plus `node.invoke system.which` to one of
//!    these nodes (it answers in-process) and `node.list` at (paired, attached) = (1, 1),
//!    (500, 1), (N, N) and (N, 1): how the per-call work scales with the fleet.
//! 3. **`node.invoke system.which {"bins":["sh"]}` through the bridge to the real classic node
//!    host** (`openclaw@2026.9.6`): the clawmesh gateway, `openclaw node run --host 127.0.0.1
//!    --port P --no-tls --display-name bench` (own HOME / OPENCLAW_STATE_DIR / TMPDIR,
//!    OPENCLAW_GATEWAY_TOKEN=T), pairing approved with `clawmesh devices approve`, attachment
//!    checked with `clawmesh nodes status --json`; then one Rust operator WebSocket (token,
//!    scopes `["operator.write"]`) does 10 warm-up and `--invoke-n` (default 1000) sequential
//!    calls: p50 / p90 / p99 / max / mean. Baseline (unless `--skip-classic`): the classic
//!    `openclaw gateway run --bind loopback --port P2 --allow-unconfigured` (token auth in its
//!    config file; loopback device pairing is silent with the default `autoApproveLocal`, the
//!    node's capability surface is approved with `node.pair.approve` — what `openclaw nodes
//!    approve` calls) with a fresh instance of the same node host, measured with the same Rust
//!    client. Both gateways' RSS (main process and process tree) and the node hosts' RSS.
//!
//! The classic client stack is installed (or found) with `scripts/install-classic-client.sh`
//! into `$CLASSIC_PREFIX` (default `~/.cache/clawmesh/classic`). Without it phase 3 is skipped
//! with the reason printed.
//!
//! Run it (release, or the numbers mean nothing):
//!
//! ```text
//! cargo build --release --bin clawmesh --example bench_bridge
//! cargo run --release --example bench_bridge
//! cargo run --release --example bench_bridge -- --skip-classic --skip-nodes --conns 2000
//! ```
//!
//! Flags (each also as an environment variable):
//!
//! | flag | env | default |
//! |---|---|---|
//! | `--conns N` | `BENCH_BRIDGE_CONNS` | 10000 (0 skips phase 1) |
//! | `--node-conns N` | `BENCH_BRIDGE_NODE_CONNS` | 10000 (0 skips phase 2) |
//! | `--invoke-n N` | `BENCH_BRIDGE_INVOKE_N` | 1000 |
//! | `--hold-secs S` | `BENCH_BRIDGE_HOLD_SECS` | 32 |
//! | `--concurrency N` | `BENCH_BRIDGE_CONCURRENCY` | 200 |
//! | `--skip-idle` | `BENCH_BRIDGE_SKIP_IDLE=1` | phase 1 |
//! | `--skip-nodes` | `BENCH_BRIDGE_SKIP_NODES=1` | phase 2 |
//! | `--skip-invoke` | `BENCH_BRIDGE_SKIP_INVOKE=1` | phase 3 |
//! | `--skip-classic` | `BENCH_BRIDGE_SKIP_CLASSIC=1` | the classic baseline of phase 3 |
//!
//! The `clawmesh` binary is looked up beside the example's directory (`target/release/clawmesh`,
//! honouring `CARGO_TARGET_DIR`); `CLAWMESH_BIN` overrides it. The benchmark raises its own
//! open-files soft limit to the hard limit (the gateway raises its own). Every process started is
//! stopped (SIGTERM to it and its descendants, SIGKILL after a grace period) and every temp dir
//! removed, also on errors and on Ctrl-C; every wait and loop is bounded. Results are printed as
//! Markdown on stdout, progress on stderr. About 4 minutes with everything enabled on an idle
//! 2-core machine (longer when other work competes for the CPU or the disk: seeding and
//! approvals fsync per record).

#[path = "support/mod.rs"]
#[allow(dead_code)]
mod support;

use std::fs;
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use base64::Engine as _;
use clawmesh_federation::identity::DeviceIdentity;
use clawmesh_federation::pairing::uuid_v4;
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use support::{
    approve_node_cli, check_stop, classic_gateway_cmd, classic_node_cmd, classic_pending,
    clawmesh_bin, clawmesh_cmd, cpu_ticks, free_tcp_port, install_classic, install_ctrl_c,
    lat_stats, machine_with_load, mb, mem_of, poll_blocking, runtime_file, sleep, tree_rss_kb, Lat,
    Mem, Proc, STOP, TICKS_PER_SEC,
};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

/// This example's name: its environment variables are `BENCH_BRIDGE_*` (see `support`).
const BENCH: &str = "bench_bridge";

type Ws = WebSocketStream<TcpStream>;

/// Gateway token of every gateway started here.
const TOKEN: &str = "bench-bridge-token-4c1d";
/// Display name of the real node host.
const NODE_NAME: &str = "bench";
/// Unmeasured calls before a sequential series.
const WARMUP: usize = 10;
/// Deadline of one handshake step (challenge, hello) and of one call.
const STEP_TIMEOUT: Duration = Duration::from_secs(20);
/// Deadline of one whole connection attempt.
const OPEN_TIMEOUT: Duration = Duration::from_secs(30);
/// Failed connection attempts after which a phase stops growing.
const MAX_OPEN_ERRORS: usize = 100;
/// Settle time before a memory sample.
const SETTLE: Duration = Duration::from_secs(2);
/// `health` calls before / with the idle connections.
const HEALTH_N: usize = 200;
/// Invokes against the in-process responder node at each (paired, attached) point.
const NODE_INVOKE_N: usize = 100;
/// Upper bound on the time the measured calls of one of those series may take.
const NODE_INVOKE_BUDGET: Duration = Duration::from_secs(10);
/// Unmeasured calls before each of those series (a call may take a second with 10 000 nodes).
const SCALE_WARMUP: usize = 2;
/// `node.list` calls at each (paired, attached) point.
const NODE_LIST_N: usize = 5;
/// Nodes paired through the real path (requests + approvals); below the registry's 1024
/// pending requests. The rest are seeded as paired records.
const PAIR_WAVE: usize = 500;
/// Largest frame this client accepts (node.list with 10 000 nodes is several MB).
const MAX_MSG: usize = 64 << 20;
/// Goal of phase 1: 10 000 connections under this gateway RSS.
const GOAL_RSS_MB: f64 = 200.0;

// ---------------------------------------------------------------------------------------------
// Options

#[derive(Debug, Clone)]
struct Opts {
    conns: usize,
    node_conns: usize,
    invoke_n: usize,
    hold: Duration,
    concurrency: usize,
    skip_invoke: bool,
    skip_classic: bool,
}

fn env_flag(name: &str) -> bool {
    matches!(
        std::env::var(name).as_deref(),
        Ok("1") | Ok("true") | Ok("yes")
    )
}

fn env_num(name: &str, default: usize) -> Result<usize> {
    match std::env::var(name) {
        Ok(v) => v
            .trim()
            .parse()
            .with_context(|| format!("{name}={v} is not a number")),
        Err(_) => Ok(default),
    }
}

fn parse_opts() -> Result<Opts> {
    let mut o = Opts {
        conns: env_num("BENCH_BRIDGE_CONNS", 10_000)?,
        node_conns: env_num("BENCH_BRIDGE_NODE_CONNS", 10_000)?,
        invoke_n: env_num("BENCH_BRIDGE_INVOKE_N", 1000)?,
        hold: Duration::from_secs(env_num("BENCH_BRIDGE_HOLD_SECS", 32)? as u64),
        concurrency: env_num("BENCH_BRIDGE_CONCURRENCY", 200)?,
        skip_invoke: env_flag("BENCH_BRIDGE_SKIP_INVOKE"),
        skip_classic: env_flag("BENCH_BRIDGE_SKIP_CLASSIC"),
    };
    if env_flag("BENCH_BRIDGE_SKIP_IDLE") {
        o.conns = 0;
    }
    if env_flag("BENCH_BRIDGE_SKIP_NODES") {
        o.node_conns = 0;
    }
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut num = |name: &str| -> Result<usize> {
            let v = args.next().ok_or_else(|| anyhow!("{name} needs a value"))?;
            v.parse()
                .with_context(|| format!("{name} {v}: not a number"))
        };
        match a.as_str() {
            "--conns" => o.conns = num("--conns")?,
            "--node-conns" => o.node_conns = num("--node-conns")?,
            "--invoke-n" => o.invoke_n = num("--invoke-n")?,
            "--hold-secs" => o.hold = Duration::from_secs(num("--hold-secs")? as u64),
            "--concurrency" => o.concurrency = num("--concurrency")?,
            "--skip-idle" => o.conns = 0,
            "--skip-nodes" => o.node_conns = 0,
            "--skip-invoke" => o.skip_invoke = true,
            "--skip-classic" => o.skip_classic = true,
            "-h" | "--help" => {
                println!("usage: bench_bridge [--conns N] [--node-conns N] [--invoke-n N] [--hold-secs S] [--concurrency N] [--skip-idle] [--skip-nodes] [--skip-invoke] [--skip-classic]\n(see the doc comment at the top of examples/bench_bridge.rs)");
                std::process::exit(0);
            }
            other => bail!("unknown argument {other} (try --help)"),
        }
    }
    // Bounds: the open-files hard limit is what really caps conns; keep every loop finite.
    if o.conns > 60_000 || o.node_conns > 60_000 {
        bail!("--conns / --node-conns above 60 000 are not supported (one source IP, one port)");
    }
    o.concurrency = o.concurrency.clamp(1, 2000);
    o.invoke_n = o.invoke_n.min(1_000_000);
    o.hold = o.hold.min(Duration::from_secs(600));
    Ok(o)
}

/// Raises this process's open-files soft limit to the hard limit; returns (soft, hard).
fn raise_nofile() -> Result<(u64, u64)> {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    if soft < hard {
        setrlimit(Resource::RLIMIT_NOFILE, hard, hard)
            .with_context(|| format!("raising RLIMIT_NOFILE from {soft} to {hard}"))?;
    }
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    Ok((soft, hard))
}

// ---------------------------------------------------------------------------------------------
// Statistics

impl Lat {
    fn row(&self) -> String {
        format!(
            "{:.2} / {:.2} / {:.2} / {:.2} / {:.2}",
            self.p50, self.p90, self.p99, self.max, self.mean
        )
    }
}

fn lat_cell(l: &Option<Lat>) -> String {
    l.map(|l| l.row()).unwrap_or_else(|| "–".into())
}

// ---------------------------------------------------------------------------------------------
// /proc

/// System-wide `TcpExt: ListenOverflows` (a full accept queue: the SYN is dropped and the
/// client retransmits it after 1 s).
fn listen_overflows() -> u64 {
    let text = fs::read_to_string("/proc/net/netstat").unwrap_or_default();
    let rows: Vec<&str> = text.lines().filter(|l| l.starts_with("TcpExt:")).collect();
    let (Some(names), Some(values)) = (rows.first(), rows.get(1)) else {
        return 0;
    };
    names
        .split_whitespace()
        .zip(values.split_whitespace())
        .find(|(k, _)| *k == "ListenOverflows")
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0)
}

// ---------------------------------------------------------------------------------------------
// clawmesh gateway

/// A running clawmesh gateway.
struct Gateway {
    proc: Proc,
    dir: PathBuf,
    /// The classic bridge's TCP address (same port as QUIC).
    ws: SocketAddr,
}

/// Starts `clawmesh gateway run` with state dir `dir`, logging to `log`.
fn start_gateway(bin: &Path, dir: &Path, log: &Path, name: &str) -> Result<Gateway> {
    let dir = dir.to_path_buf();
    let mut proc = Proc::spawn(
        &format!("clawmesh gateway {name}"),
        clawmesh_cmd(
            bin,
            &dir,
            &[
                "gateway",
                "run",
                "--name",
                name,
                "--primary",
                "--token",
                TOKEN,
                "--port",
                "0",
            ],
        ),
        log,
    )?;
    let pid = proc.pid();
    let ws = poll_blocking(
        "gateway.json",
        Duration::from_secs(20),
        Duration::from_millis(20),
        || {
            proc.ensure_running()?;
            let Some(v) = runtime_file(&dir, pid) else {
                return Ok(None);
            };
            let url = v["ws"]
                .as_str()
                .ok_or_else(|| anyhow!("gateway.json has no ws url: {v}"))?;
            let hostport = url
                .strip_prefix("ws://")
                .ok_or_else(|| anyhow!("unexpected bridge url {url}"))?
                .trim_end_matches('/');
            Ok(Some(hostport.parse::<SocketAddr>()?))
        },
    )?;
    Ok(Gateway { proc, dir, ws })
}

// ---------------------------------------------------------------------------------------------
// Classic WebSocket client

fn ws_config() -> WebSocketConfig {
    // Small buffers: the client side holds 10 000 sockets too.
    WebSocketConfig::default()
        .read_buffer_size(4096)
        .write_buffer_size(0)
        .max_message_size(Some(MAX_MSG))
        .max_frame_size(Some(MAX_MSG))
}

async fn ws_open(addr: SocketAddr) -> Result<Ws> {
    let tcp = TcpStream::connect(addr).await.context("TCP connect")?;
    tcp.set_nodelay(true)?;
    let (ws, _) = tokio_tungstenite::client_async_with_config(
        format!("ws://{addr}/"),
        tcp,
        Some(ws_config()),
    )
    .await
    .context("WebSocket upgrade")?;
    Ok(ws)
}

async fn next_json(ws: &mut Ws, timeout: Duration) -> Result<Value> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let m = tokio::time::timeout_at(deadline, ws.next())
            .await
            .map_err(|_| anyhow!("no frame within {timeout:?}"))?;
        match m {
            Some(Ok(Message::Text(t))) => {
                return serde_json::from_str(&t).context("non-JSON frame")
            }
            Some(Ok(Message::Close(f))) => bail!(
                "closed by the gateway: {}",
                f.map(|f| format!("{} {}", u16::from(f.code), f.reason))
                    .unwrap_or_default()
            ),
            Some(Ok(_)) => continue,
            Some(Err(e)) => bail!("WebSocket error: {e}"),
            None => bail!("connection closed"),
        }
    }
}

async fn send_json(ws: &mut Ws, v: &Value) -> Result<()> {
    ws.send(Message::Text(v.to_string().into()))
        .await
        .context("sending a frame")
}

/// Waits for `connect.challenge`; returns (nonce, ts).
async fn challenge(ws: &mut Ws) -> Result<(String, u64)> {
    let c = next_json(ws, STEP_TIMEOUT).await?;
    if c["event"] != "connect.challenge" {
        bail!("expected connect.challenge, got {c}");
    }
    let nonce = c["payload"]["nonce"]
        .as_str()
        .ok_or_else(|| anyhow!("challenge without nonce: {c}"))?
        .to_string();
    let ts = c["payload"]["ts"]
        .as_u64()
        .ok_or_else(|| anyhow!("challenge without ts: {c}"))?;
    Ok((nonce, ts))
}

/// Sends `connect`; Ok(Ok(hello payload)) or Ok(Err(error object)).
async fn connect_req(ws: &mut Ws, params: Value) -> Result<Result<Value, Value>> {
    send_json(
        ws,
        &json!({"type":"req","id":"1:connect","method":"connect","params":params}),
    )
    .await?;
    for _ in 0..100 {
        let f = next_json(ws, STEP_TIMEOUT).await?;
        if f["type"] == "res" && f["id"] == "1:connect" {
            return Ok(if f["ok"] == true {
                Ok(f["payload"].clone())
            } else {
                Err(f["error"].clone())
            });
        }
    }
    bail!("no connect response among 100 frames")
}

fn operator_params(token: &str, scopes: &[&str]) -> Value {
    json!({
        "minProtocol": 4, "maxProtocol": 4,
        "client": {"id": "cli", "mode": "cli", "version": "2026.9.6", "platform": "linux"},
        "role": "operator", "scopes": scopes, "caps": [], "auth": {"token": token},
    })
}

fn b64(b: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b)
}

/// A node host's `connect` with a v3 device signature (classic-protocol.md section 4).
fn node_params(id: &DeviceIdentity, nonce: &str, ts: u64, token: &str, name: &str) -> Value {
    let did = id.device_id().to_string();
    let payload = format!("v3|{did}|node-host|node|node||{ts}|{token}|{nonce}|linux|linux");
    json!({
        "minProtocol": 4, "maxProtocol": 4,
        "client": {"id": "node-host", "mode": "node", "version": "2026.9.6", "platform": "linux",
                   "deviceFamily": "Linux", "displayName": name},
        "role": "node", "scopes": [], "caps": ["system"], "commands": ["system.which"],
        "auth": {"token": token},
        "device": {"id": did, "publicKey": b64(&id.public_key().0),
                   "signature": b64(&id.sign(payload.as_bytes())), "signedAt": ts, "nonce": nonce},
    })
}

/// An authenticated operator connection.
async fn open_operator(addr: SocketAddr, scopes: &[&str]) -> Result<Ws> {
    let mut ws = ws_open(addr).await?;
    challenge(&mut ws).await?;
    match connect_req(&mut ws, operator_params(TOKEN, scopes)).await? {
        Ok(p) if p["type"] == "hello-ok" => Ok(ws),
        Ok(p) => bail!("connect answered without hello-ok: {p}"),
        Err(e) => bail!("connect refused: {e}"),
    }
}

/// A node connection: Ok(ws) after hello-ok, or the refusal's error object.
async fn open_node(addr: SocketAddr, id: &DeviceIdentity, name: &str) -> Result<Result<Ws, Value>> {
    let mut ws = ws_open(addr).await?;
    let (nonce, ts) = challenge(&mut ws).await?;
    match connect_req(&mut ws, node_params(id, &nonce, ts, TOKEN, name)).await? {
        Ok(p) if p["type"] == "hello-ok" => Ok(Ok(ws)),
        Ok(p) => bail!("connect answered without hello-ok: {p}"),
        Err(e) => Ok(Err(e)),
    }
}

/// Request/response on one operator connection, events skipped.
struct Rpc {
    ws: Ws,
    seq: u64,
}

impl Rpc {
    fn new(ws: Ws) -> Self {
        Rpc { ws, seq: 1 }
    }

    fn next_id(&mut self) -> String {
        self.seq += 1;
        format!("{}:bench", self.seq)
    }

    async fn call(&mut self, method: &str, params: Value) -> Result<Value> {
        let id = self.next_id();
        send_json(
            &mut self.ws,
            &json!({"type":"req","id":id,"method":method,"params":params}),
        )
        .await?;
        let deadline = tokio::time::Instant::now() + STEP_TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let f = next_json(&mut self.ws, left)
                .await
                .with_context(|| format!("{method}: waiting for the response"))?;
            if f["type"] == "res" && f["id"] == id.as_str() {
                if f["ok"] == true {
                    return Ok(f["payload"].clone());
                }
                bail!("{method} failed: {}", f["error"]);
            }
        }
    }
}

fn invoke_params(node_id: &str) -> Value {
    json!({
        "nodeId": node_id,
        "command": "system.which",
        "params": {"bins": ["sh"]},
        "idempotencyKey": uuid_v4(),
        "timeoutMs": 15000,
    })
}

/// `warmup` + `n` sequential calls; the measured ones stop early (with what they have) after
/// `budget`.
async fn series(
    rpc: &mut Rpc,
    method: &str,
    node_id: &str,
    (warmup, n): (usize, usize),
    budget: Duration,
) -> Result<Lat> {
    let mut t0 = Instant::now();
    let mut lat = Vec::with_capacity(n);
    for i in 0..warmup + n {
        if i == warmup {
            t0 = Instant::now();
        }
        check_stop()?;
        let params = if method == "node.invoke" {
            invoke_params(node_id)
        } else {
            json!({})
        };
        let t = Instant::now();
        let r = rpc.call(method, params).await?;
        let d = t.elapsed();
        if i == 0 && method == "node.invoke" && !r["payload"]["bins"]["sh"].is_string() {
            bail!("unexpected node.invoke result: {r}");
        }
        if i >= warmup {
            lat.push(d);
        }
        if i >= warmup && t0.elapsed() > budget {
            eprintln!(
                "  {method}: time budget {budget:?} used up after {} calls",
                lat.len()
            );
            break;
        }
    }
    lat_stats(&mut lat).map_err(|_| anyhow!("{method}: no samples within {budget:?}"))
}

// ---------------------------------------------------------------------------------------------
// Idle connection pool

#[derive(Default)]
struct HoldStats {
    dropped: AtomicUsize,
    first_drop: Mutex<Option<String>>,
    pings: AtomicU64,
    ticks: AtomicU64,
    invokes: AtomicU64,
}

impl HoldStats {
    fn drop_one(&self, why: String) {
        self.dropped.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut f) = self.first_drop.lock() {
            f.get_or_insert(why);
        }
    }

    fn first(&self) -> Option<String> {
        self.first_drop.lock().ok().and_then(|f| f.clone())
    }
}

/// Reads a held connection until told to stop (answers pings, counts ticks); a `responder`
/// node answers `node.invoke.request` itself.
fn hold(
    mut ws: Ws,
    mut stop: watch::Receiver<bool>,
    stats: Arc<HoldStats>,
    responder: Option<String>,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut k = 0u64;
        loop {
            tokio::select! {
                m = ws.next() => match m {
                    Some(Ok(Message::Text(t))) => {
                        if t.contains("\"event\":\"tick\"") {
                            stats.ticks.fetch_add(1, Ordering::Relaxed);
                            continue;
                        }
                        let Some(node_id) = &responder else { continue };
                        let Ok(v) = serde_json::from_str::<Value>(&t) else { continue };
                        if v["event"] != "node.invoke.request" {
                            continue;
                        }
                        k += 1;
                        stats.invokes.fetch_add(1, Ordering::Relaxed);
                        let reply = json!({"type":"req","id":format!("r{k}"),"method":"node.invoke.result","params":{
                            "id": v["payload"]["id"], "nodeId": node_id, "ok": true,
                            "payloadJSON": "{\"bins\":{\"sh\":\"/usr/bin/sh\"}}"}});
                        if let Err(e) = ws.send(Message::Text(reply.to_string().into())).await {
                            stats.drop_one(format!("responder send: {e}"));
                            break;
                        }
                    }
                    Some(Ok(Message::Ping(_))) => {
                        stats.pings.fetch_add(1, Ordering::Relaxed);
                    }
                    Some(Ok(Message::Close(f))) => {
                        stats.drop_one(format!(
                            "closed by the gateway: {}",
                            f.map(|f| format!("{} {}", u16::from(f.code), f.reason)).unwrap_or_default()
                        ));
                        break;
                    }
                    Some(Ok(_)) => {}
                    Some(Err(e)) => {
                        stats.drop_one(format!("WebSocket error: {e}"));
                        break;
                    }
                    None => {
                        stats.drop_one("EOF".into());
                        break;
                    }
                },
                _ = stop.changed() => {
                    let _ = tokio::time::timeout(Duration::from_secs(5), ws.close(None)).await;
                    break;
                }
            }
        }
    })
}

/// Connections held open by this process.
struct Pool {
    stop_tx: watch::Sender<bool>,
    stop_rx: watch::Receiver<bool>,
    stats: Arc<HoldStats>,
    tasks: Vec<JoinHandle<()>>,
}

/// One growth step.
#[derive(Debug, Clone, Default)]
struct Batch {
    opened: usize,
    errors: usize,
    first_error: Option<String>,
    secs: f64,
    lat: Option<Lat>,
    gw_cpu_ms: f64,
    listen_overflows: u64,
}

impl Pool {
    fn new() -> Self {
        let (stop_tx, stop_rx) = watch::channel(false);
        Pool {
            stop_tx,
            stop_rx,
            stats: Arc::default(),
            tasks: Vec::new(),
        }
    }

    fn len(&self) -> usize {
        self.tasks.len()
    }

    fn add(&mut self, ws: Ws, responder: Option<String>) {
        let h = hold(ws, self.stop_rx.clone(), self.stats.clone(), responder);
        self.tasks.push(h);
    }

    /// Opens `count` connections with `open(i)`, `concurrency` at a time; each one is held.
    async fn grow<F, Fut>(
        &mut self,
        count: usize,
        concurrency: usize,
        gw_pid: i32,
        open: F,
    ) -> Result<Batch>
    where
        F: Fn(usize) -> Fut,
        Fut: Future<Output = Result<Ws>>,
    {
        let cpu0 = cpu_ticks(gw_pid);
        let lo0 = listen_overflows();
        let t0 = Instant::now();
        let mut b = Batch::default();
        let mut lat = Vec::with_capacity(count);
        let mut s = futures_util::stream::iter(0..count)
            .map(|i| {
                let fut = open(i);
                async move {
                    let t = Instant::now();
                    let r = tokio::time::timeout(OPEN_TIMEOUT, fut)
                        .await
                        .map_err(|_| anyhow!("connection not ready within {OPEN_TIMEOUT:?}"))
                        .and_then(|r| r);
                    (r, t.elapsed())
                }
            })
            .buffer_unordered(concurrency);
        while let Some((r, d)) = s.next().await {
            match r {
                Ok(ws) => {
                    lat.push(d);
                    b.opened += 1;
                    self.add(ws, None);
                }
                Err(e) => {
                    b.errors += 1;
                    b.first_error.get_or_insert_with(|| format!("{e:#}"));
                    if b.errors >= MAX_OPEN_ERRORS {
                        break;
                    }
                }
            }
            if STOP.load(Ordering::Relaxed) {
                break;
            }
        }
        drop(s);
        check_stop()?;
        b.secs = t0.elapsed().as_secs_f64();
        b.lat = lat_stats(&mut lat).ok();
        b.gw_cpu_ms = cpu_ticks(gw_pid).saturating_sub(cpu0) as f64 / TICKS_PER_SEC * 1e3;
        b.listen_overflows = listen_overflows().saturating_sub(lo0);
        Ok(b)
    }

    /// Closes every connection (bounded wait).
    async fn close(self) {
        let _ = self.stop_tx.send(true);
        let all = futures_util::future::join_all(self.tasks);
        let _ = tokio::time::timeout(Duration::from_secs(30), all).await;
    }
}

/// Memory at one connection count.
#[derive(Debug, Clone)]
struct Point {
    conns: usize,
    mem: Mem,
    batch: Option<Batch>,
}

fn checkpoints(n: usize) -> Vec<usize> {
    let mut v: Vec<usize> = [1000, 5000, 10_000]
        .into_iter()
        .filter(|&c| c < n)
        .collect();
    v.push(n);
    v.dedup();
    v
}

// ---------------------------------------------------------------------------------------------
// Phase 1: idle operator connections

struct IdleResult {
    target: usize,
    points: Vec<Point>,
    health_before: Lat,
    health_with: Option<Lat>,
    hold: Duration,
    after_hold: Option<Mem>,
    held_alive: usize,
    dropped: usize,
    first_drop: Option<String>,
    pings: u64,
    ticks: u64,
    after_close: Option<Mem>,
    wave2: Option<(Batch, Mem)>,
    after_close2: Option<Mem>,
    client_rss_kb: u64,
    stopped_reason: Option<String>,
}

async fn idle_phase(gw: &mut Gateway, o: &Opts) -> Result<IdleResult> {
    let pid = gw.proc.pid();
    let addr = gw.ws;
    let mut probe = Rpc::new(open_operator(addr, &["operator.read"]).await?);
    let health_before = series(
        &mut probe,
        "health",
        "",
        (WARMUP, HEALTH_N),
        Duration::from_secs(30),
    )
    .await?;
    sleep(SETTLE).await?;
    let mut points = vec![Point {
        conns: 0,
        mem: mem_of(pid)?,
        batch: None,
    }];
    eprintln!(
        "idle: gateway pid {pid}, RSS {} with 1 probe connection",
        mb(points[0].mem.rss_kb)
    );
    let mut pool = Pool::new();
    let mut stopped_reason = None;
    for target in checkpoints(o.conns) {
        let need = target - pool.len();
        let b = pool
            .grow(need, o.concurrency, pid, |_| async move {
                open_operator(addr, &["operator.read"]).await
            })
            .await?;
        gw.proc.ensure_running()?;
        sleep(SETTLE).await?;
        let mem = mem_of(pid)?;
        eprintln!(
            "idle: {} connections ({} new in {:.1} s, {} errors), gateway RSS {}, fds {}",
            pool.len(),
            b.opened,
            b.secs,
            b.errors,
            mb(mem.rss_kb),
            mem.fds
        );
        let failed = b.errors > 0;
        if let Some(e) = &b.first_error {
            eprintln!("idle: first error: {e}");
            stopped_reason = Some(format!(
                "{} of {} connection attempts failed; first: {e}",
                b.errors, need
            ));
        }
        points.push(Point {
            conns: pool.len(),
            mem,
            batch: Some(b),
        });
        if failed && pool.len() < target {
            break;
        }
    }
    let health_with = series(
        &mut probe,
        "health",
        "",
        (WARMUP, HEALTH_N),
        Duration::from_secs(30),
    )
    .await
    .ok();
    let mut after_hold = None;
    if !o.hold.is_zero() {
        eprintln!("idle: holding {} connections for {:?}", pool.len(), o.hold);
        sleep(o.hold).await?;
        after_hold = Some(mem_of(pid)?);
    }
    let dropped = pool.stats.dropped.load(Ordering::Relaxed);
    let held_alive = pool.len() - dropped;
    let first_drop = pool.stats.first();
    let pings = pool.stats.pings.load(Ordering::Relaxed);
    let ticks = pool.stats.ticks.load(Ordering::Relaxed);
    let client_rss_kb = mem_of(std::process::id() as i32)
        .map(|m| m.rss_kb)
        .unwrap_or(0);
    eprintln!("idle: closing");
    pool.close().await;
    drop(probe);
    sleep(Duration::from_secs(3)).await?;
    let after_close = mem_of(pid).ok();
    // Second wave: as many connections again; RSS that keeps growing would be a leak.
    let (mut wave2, mut after_close2) = (None, None);
    let reached = held_alive + dropped;
    if reached > 0 {
        eprintln!("idle: second wave of {reached} connections");
        let mut pool = Pool::new();
        let b = pool
            .grow(reached, o.concurrency, pid, |_| async move {
                open_operator(addr, &["operator.read"]).await
            })
            .await?;
        sleep(SETTLE).await?;
        wave2 = Some((b, mem_of(pid)?));
        pool.close().await;
        sleep(Duration::from_secs(3)).await?;
        after_close2 = mem_of(pid).ok();
    }
    Ok(IdleResult {
        target: o.conns,
        points,
        health_before,
        health_with,
        hold: o.hold,
        after_hold,
        held_alive,
        dropped,
        first_drop,
        pings,
        ticks,
        after_close,
        wave2,
        after_close2,
        client_rss_kb,
        stopped_reason,
    })
}

// ---------------------------------------------------------------------------------------------
// Phase 2: idle node connections

/// `node.invoke` / `node.list` at one (paired, attached) point.
struct Scale {
    paired: usize,
    attached: usize,
    invoke: Option<Lat>,
    list: Option<Lat>,
}

struct NodeResult {
    target: usize,
    wave: usize,
    requests_secs: f64,
    approve_first: Option<Lat>,
    approve_last: Option<Lat>,
    approve_secs: f64,
    seeded: usize,
    seed_secs: f64,
    scale: Vec<Scale>,
    points: Vec<Point>,
    listed: usize,
    dropped: usize,
    first_drop: Option<String>,
    after_close: Option<Mem>,
    stopped_reason: Option<String>,
    panics: usize,
}

fn node_name(i: usize) -> String {
    format!("bench-node-{i}")
}

/// Connects device `i` once and returns the pairing request id it is refused with.
async fn pair_request(addr: SocketAddr, id: &DeviceIdentity, i: usize) -> Result<String> {
    match open_node(addr, id, &node_name(i)).await? {
        Ok(_) => bail!("device {i} was admitted without pairing"),
        Err(e) if e["details"]["code"] == "PAIRING_REQUIRED" => e["details"]["requestId"]
            .as_str()
            .map(str::to_string)
            .ok_or_else(|| anyhow!("PAIRING_REQUIRED without requestId: {e}")),
        Err(e) => bail!("connect refused: {e}"),
    }
}

/// Connects paired device `i` as a node.
async fn attach_node(addr: SocketAddr, id: &DeviceIdentity, i: usize) -> Result<Ws> {
    match open_node(addr, id, &node_name(i)).await? {
        Ok(ws) => Ok(ws),
        Err(e) => bail!("paired node {i} was refused: {e}"),
    }
}

/// invoke + node.list series against the responder node.
async fn measure_scale(op: &mut Rpc, responder: &str, paired: usize, attached: usize) -> Scale {
    eprintln!("nodes: node.invoke / node.list with {paired} paired, {attached} attached");
    let invoke = series(
        op,
        "node.invoke",
        responder,
        (SCALE_WARMUP, NODE_INVOKE_N),
        NODE_INVOKE_BUDGET,
    )
    .await
    .map_err(|e| eprintln!("nodes: node.invoke failed: {e:#}"))
    .ok();
    let list = series(
        op,
        "node.list",
        "",
        (SCALE_WARMUP, NODE_LIST_N),
        NODE_INVOKE_BUDGET,
    )
    .await
    .map_err(|e| eprintln!("nodes: node.list failed: {e:#}"))
    .ok();
    Scale {
        paired,
        attached,
        invoke,
        list,
    }
}

async fn node_phase(bin: &Path, root: &Path, o: &Opts) -> Result<NodeResult> {
    let n = o.node_conns;
    let dir = root.join("nodes-gw");
    eprintln!("nodes: generating {n} device keys");
    let ids: Arc<Vec<DeviceIdentity>> =
        Arc::new((0..n).map(|_| DeviceIdentity::ephemeral()).collect());
    let responder = ids[0].device_id().to_string();
    let mut scale = Vec::new();

    // Gateway A: the real pairing path. Node 0 first (it answers invokes), then a wave.
    let mut gw = start_gateway(bin, &dir, &root.join("nodes-gw-a.log"), "nodes-gw")?;
    let addr = gw.ws;
    let mut admin = Rpc::new(open_operator(addr, &["operator.pairing", "operator.admin"]).await?);
    let rid = pair_request(addr, &ids[0], 0).await?;
    admin
        .call("device.pair.approve", json!({"requestId": rid}))
        .await?;
    let mut pool = Pool::new();
    pool.add(
        attach_node(addr, &ids[0], 0).await?,
        Some(responder.clone()),
    );
    let mut op = Rpc::new(open_operator(addr, &["operator.write"]).await?);
    scale.push(measure_scale(&mut op, &responder, 1, 1).await);

    let wave = PAIR_WAVE.min(n);
    eprintln!("nodes: pairing requests of nodes 1..{wave}");
    let t0 = Instant::now();
    let mut reqs = Vec::with_capacity(wave);
    {
        let mut s = futures_util::stream::iter(1..wave)
            .map(|i| {
                let ids = ids.clone();
                async move {
                    tokio::time::timeout(OPEN_TIMEOUT, pair_request(addr, &ids[i], i))
                        .await
                        .map_err(|_| anyhow!("no answer within {OPEN_TIMEOUT:?}"))
                        .and_then(|r| r)
                }
            })
            .buffer_unordered(o.concurrency);
        while let Some(r) = s.next().await {
            check_stop()?;
            reqs.push(r?);
        }
    }
    let requests_secs = t0.elapsed().as_secs_f64();
    eprintln!(
        "nodes: {} requests in {requests_secs:.1} s; approving one by one",
        reqs.len()
    );
    let t0 = Instant::now();
    let mut lat = Vec::with_capacity(reqs.len());
    for rid in &reqs {
        check_stop()?;
        let t = Instant::now();
        admin
            .call("device.pair.approve", json!({"requestId": rid}))
            .await?;
        lat.push(t.elapsed());
    }
    let approve_secs = t0.elapsed().as_secs_f64();
    let k = lat.len().min(100);
    let approve_first = lat_stats(&mut lat[..k].to_vec()).ok();
    let approve_last = lat_stats(&mut lat[lat.len() - k..].to_vec()).ok();
    eprintln!("nodes: {} approvals in {approve_secs:.1} s", lat.len());
    scale.push(measure_scale(&mut op, &responder, wave, 1).await);
    drop(op);
    drop(admin);
    pool.close().await;
    gw.proc.ensure_running()?;
    let mut panics = gw.proc.log_count("panicked");
    gw.proc.stop(Duration::from_secs(20));
    drop(gw);

    // The other devices: paired through the federation-sync path while the gateway is down.
    let t0 = Instant::now();
    if n > wave {
        eprintln!("nodes: seeding {} paired devices", n - wave);
        let meta = json!({"deviceFamily": "Linux", "clientId": "node-host", "clientMode": "node"})
            .to_string();
        support::seed_paired_nodes(&dir, &ids, (wave, n), node_name, &meta)?;
    }
    let seed_secs = t0.elapsed().as_secs_f64();

    // Gateway B: same state, fresh process; every device paired. The responder is held apart
    // from the other nodes, so that it stays attached when they close.
    let mut gw = start_gateway(bin, &dir, &root.join("nodes-gw-b.log"), "nodes-gw")?;
    let pid = gw.proc.pid();
    let addr = gw.ws;
    let mut responder_pool = Pool::new();
    responder_pool.add(
        attach_node(addr, &ids[0], 0).await?,
        Some(responder.clone()),
    );
    let mut op = Rpc::new(open_operator(addr, &["operator.write"]).await?);
    sleep(SETTLE).await?;
    let mut points = vec![Point {
        conns: 1,
        mem: mem_of(pid)?,
        batch: None,
    }];
    eprintln!(
        "nodes: 1 node attached, gateway RSS {}",
        mb(points[0].mem.rss_kb)
    );
    let mut pool = Pool::new();
    let mut stopped_reason = None;
    for target in checkpoints(n) {
        let attached = pool.len() + 1;
        if target <= attached {
            continue;
        }
        let need = target - attached;
        let ids2 = ids.clone();
        let b = pool
            .grow(need, o.concurrency, pid, move |i| {
                let ids = ids2.clone();
                let k = attached + i;
                async move { attach_node(addr, &ids[k], k).await }
            })
            .await?;
        gw.proc.ensure_running()?;
        sleep(SETTLE).await?;
        let mem = mem_of(pid)?;
        eprintln!(
            "nodes: {} attached ({} new in {:.1} s, {} errors), gateway RSS {}, fds {}",
            pool.len() + 1,
            b.opened,
            b.secs,
            b.errors,
            mb(mem.rss_kb),
            mem.fds
        );
        let failed = b.errors > 0;
        if let Some(e) = &b.first_error {
            eprintln!("nodes: first error: {e}");
            stopped_reason = Some(format!(
                "{} of {need} node connects failed; first: {e}",
                b.errors
            ));
        }
        points.push(Point {
            conns: pool.len() + 1,
            mem,
            batch: Some(b),
        });
        if failed && pool.len() + 1 < target {
            break;
        }
    }
    let attached = pool.len() + 1;
    scale.push(measure_scale(&mut op, &responder, n, attached).await);
    let listed = op
        .call("node.list", json!({}))
        .await
        .ok()
        .and_then(|v| {
            v["nodes"]
                .as_array()
                .map(|a| a.iter().filter(|n| n["connected"] == true).count())
        })
        .unwrap_or(0);
    let dropped = pool.stats.dropped.load(Ordering::Relaxed)
        + responder_pool.stats.dropped.load(Ordering::Relaxed);
    let first_drop = pool.stats.first().or_else(|| responder_pool.stats.first());
    eprintln!("nodes: closing all but the responder");
    pool.close().await;
    sleep(Duration::from_secs(3)).await?;
    let after_close = mem_of(pid).ok();
    if n > wave {
        scale.push(measure_scale(&mut op, &responder, n, 1).await);
    }
    drop(op);
    responder_pool.close().await;
    panics += gw.proc.log_count("panicked");
    gw.proc.stop(Duration::from_secs(20));
    Ok(NodeResult {
        target: n,
        wave,
        requests_secs,
        approve_first,
        approve_last,
        approve_secs,
        seeded: n - wave,
        seed_secs,
        scale,
        points,
        listed,
        dropped,
        first_drop,
        after_close,
        stopped_reason,
        panics,
    })
}

// ---------------------------------------------------------------------------------------------
// Phase 3: node.invoke to the real classic node host

/// One gateway's side of phase 3.
struct InvokeSide {
    lat: Lat,
    gw_idle: Mem,
    gw_after: Mem,
    gw_tree_after: (u64, usize),
    node_tree: (u64, usize),
    setup_secs: f64,
}

/// Starts `openclaw node run` against 127.0.0.1:`port` in `home`.
fn start_node_host(oc: &Path, home: &Path, tmpdir: &Path, port: u16, log: &Path) -> Result<Proc> {
    let cmd = classic_node_cmd(oc, home, tmpdir, port, TOKEN, NODE_NAME)?;
    Proc::spawn("openclaw node run", cmd, log)
}

/// Phase 3 on clawmesh: gateway + real node host, approved with the clawmesh CLI.
async fn invoke_clawmesh(bin: &Path, oc: &Path, o: &Opts) -> Result<InvokeSide> {
    let tmp = tempfile::Builder::new()
        .prefix("bench-bridge-invoke-")
        .tempdir()?;
    let root = tmp.path().to_path_buf();
    let t0 = Instant::now();
    let mut gw = start_gateway(bin, &root.join("gw"), &root.join("gw.log"), "invoke-gw")?;
    let mut node = start_node_host(
        oc,
        &root.join("node"),
        &root.join("tmp"),
        gw.ws.port(),
        &root.join("node.log"),
    )?;
    // The node host (Node.js) takes seconds to start and dial; 120 s covers a loaded machine.
    let node_id = approve_node_cli(
        bin,
        &gw.dir,
        &root,
        NODE_NAME,
        (Duration::from_secs(120), Duration::from_millis(250)),
        || {
            node.ensure_running()?;
            gw.proc.ensure_running()
        },
    )
    .with_context(|| format!("node host log:\n{}", node.log_tail()))?;
    let setup_secs = t0.elapsed().as_secs_f64();
    eprintln!("invoke/clawmesh: node host {node_id:.12} attached after {setup_secs:.1} s");
    sleep(SETTLE).await?;
    let gw_idle = mem_of(gw.proc.pid())?;
    let mut rpc = Rpc::new(open_operator(gw.ws, &["operator.write"]).await?);
    let lat = series(
        &mut rpc,
        "node.invoke",
        &node_id,
        (WARMUP, o.invoke_n),
        Duration::from_secs(120),
    )
    .await?;
    drop(rpc);
    let gw_after = mem_of(gw.proc.pid())?;
    let gw_tree_after = tree_rss_kb(gw.proc.pid());
    let node_tree = tree_rss_kb(node.pid());
    gw.proc.ensure_running()?;
    node.stop(Duration::from_secs(10));
    gw.proc.stop(Duration::from_secs(10));
    drop(node);
    drop(gw);
    tmp.close()?;
    Ok(InvokeSide {
        lat,
        gw_idle,
        gw_after,
        gw_tree_after,
        node_tree,
        setup_secs,
    })
}

/// Phase 3 on the classic gateway (the baseline), same node host, same client.
async fn invoke_classic(oc: &Path, o: &Opts) -> Result<InvokeSide> {
    let tmp = tempfile::Builder::new()
        .prefix("bench-bridge-classic-")
        .tempdir()?;
    let root = tmp.path().to_path_buf();
    let (gw_home, tmpdir) = (root.join("gw"), root.join("tmp"));
    let port = free_tcp_port()?;
    let cmd = classic_gateway_cmd(oc, &gw_home, &tmpdir, port, TOKEN)?;
    let t0 = Instant::now();
    let mut gw = Proc::spawn("openclaw gateway run", cmd, &root.join("gw.log"))?;
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    // Ready = an operator connect succeeds (it answers "gateway starting" before that).
    let mut admin = None;
    for _ in 0..600 {
        check_stop()?;
        gw.ensure_running()?;
        if let Ok(Ok(ws)) = tokio::time::timeout(
            Duration::from_secs(5),
            open_operator(addr, &["operator.pairing", "operator.admin"]),
        )
        .await
        {
            admin = Some(Rpc::new(ws));
            break;
        }
        if t0.elapsed() > Duration::from_secs(120) {
            break;
        }
        sleep(Duration::from_millis(250)).await?;
    }
    let mut admin = admin.ok_or_else(|| {
        anyhow!(
            "the classic gateway did not accept an operator within 120 s:\n{}",
            gw.log_tail()
        )
    })?;
    eprintln!(
        "invoke/classic: gateway pid {} ready after {:.1} s",
        gw.pid(),
        t0.elapsed().as_secs_f64()
    );
    let mut node = start_node_host(
        oc,
        &root.join("node"),
        &tmpdir,
        port,
        &root.join("node.log"),
    )?;
    // Device pairing is silent on loopback (autoApproveLocal default); approve the capability
    // surface (what `openclaw nodes approve` does).
    let mut found = None;
    let t1 = Instant::now();
    while found.is_none() {
        check_stop()?;
        node.ensure_running()?;
        gw.ensure_running()?;
        let list = admin.call("node.pair.list", json!({})).await?;
        found = classic_pending(&list["pending"], NODE_NAME);
        if found.is_none() {
            if t1.elapsed() > Duration::from_secs(120) {
                bail!(
                    "the node host never asked for capability approval; node host log:\n{}",
                    node.log_tail()
                );
            }
            sleep(Duration::from_millis(500)).await?;
        }
    }
    let (req, node_id) = found.ok_or_else(|| anyhow!("unreachable"))?;
    admin
        .call("node.pair.approve", json!({"requestId": req}))
        .await?;
    drop(admin);
    let mut rpc = Rpc::new(open_operator(addr, &["operator.write"]).await?);
    // The approval takes effect live; wait until an invoke succeeds.
    let t2 = Instant::now();
    loop {
        check_stop()?;
        match rpc.call("node.invoke", invoke_params(&node_id)).await {
            Ok(_) => break,
            Err(e) if t2.elapsed() > Duration::from_secs(60) => {
                return Err(e.context(format!(
                    "node.invoke never succeeded on the classic gateway; node host log:\n{}",
                    node.log_tail()
                )))
            }
            Err(_) => sleep(Duration::from_millis(250)).await?,
        }
    }
    let setup_secs = t0.elapsed().as_secs_f64();
    eprintln!("invoke/classic: node host {node_id:.12} approved after {setup_secs:.1} s");
    sleep(SETTLE).await?;
    let gw_idle = mem_of(gw.pid())?;
    let lat = series(
        &mut rpc,
        "node.invoke",
        &node_id,
        (WARMUP, o.invoke_n),
        Duration::from_secs(180),
    )
    .await?;
    drop(rpc);
    let gw_after = mem_of(gw.pid())?;
    let gw_tree_after = tree_rss_kb(gw.pid());
    let node_tree = tree_rss_kb(node.pid());
    node.stop(Duration::from_secs(10));
    gw.stop(Duration::from_secs(15));
    drop(node);
    drop(gw);
    tmp.close()?;
    Ok(InvokeSide {
        lat,
        gw_idle,
        gw_after,
        gw_tree_after,
        node_tree,
        setup_secs,
    })
}

// ---------------------------------------------------------------------------------------------
// Report

fn per_conn_kb(points: &[Point]) -> Option<(usize, f64)> {
    let first = points.first()?;
    let last = points.last()?;
    let n = last.conns.saturating_sub(first.conns);
    (n > 0).then(|| {
        (
            last.conns,
            (last.mem.rss_kb as f64 - first.mem.rss_kb as f64) / n as f64,
        )
    })
}

fn points_table(points: &[Point], unit: &str, one: &str) -> String {
    let mut s = format!(
        "| {unit} | gateway VmRSS | Δ RSS vs first row | per {one} (Δ/n) | VmHWM | RssAnon | fds | threads | open time (this step) | handshake p50 / p90 / p99 / max / mean ms | gateway CPU per handshake | listen-queue overflows (system-wide) |\n|---|---|---|---|---|---|---|---|---|---|---|---|\n"
    );
    let base = points.first().map(|p| (p.conns, p.mem.rss_kb));
    for p in points {
        let (delta, per) = match base {
            Some((c0, r0)) if p.conns > c0 => {
                let d = p.mem.rss_kb as f64 - r0 as f64;
                (
                    format!("{:+.1} MB", d / 1024.0),
                    format!("{:.1} KB", d / (p.conns - c0) as f64),
                )
            }
            _ => ("–".into(), "–".into()),
        };
        let (open, lat, cpu) = match &p.batch {
            Some(b) => (
                format!(
                    "{} in {:.1} s{}",
                    b.opened,
                    b.secs,
                    if b.errors > 0 {
                        format!(" ({} errors)", b.errors)
                    } else {
                        String::new()
                    }
                ),
                lat_cell(&b.lat),
                if b.opened > 0 {
                    format!("{:.0} µs", b.gw_cpu_ms * 1e3 / b.opened as f64)
                } else {
                    "–".into()
                },
            ),
            None => ("–".into(), "–".into(), "–".into()),
        };
        let overflows = p
            .batch
            .as_ref()
            .map(|b| b.listen_overflows.to_string())
            .unwrap_or_else(|| "–".into());
        s += &format!(
            "| {} | {} | {delta} | {per} | {} | {} | {} | {} | {open} | {lat} | {cpu} | {overflows} |\n",
            p.conns,
            mb(p.mem.rss_kb),
            mb(p.mem.hwm_kb),
            mb(p.mem.anon_kb),
            p.mem.fds,
            p.mem.threads
        );
    }
    s
}

fn report_idle(r: &IdleResult, classic_rss: Option<u64>) -> String {
    let mut s = format!(
        "### Idle classic operator connections held by one gateway (target {})\n\n",
        r.target
    );
    s += &points_table(&r.points, "connections", "connection");
    let last = r.points.last();
    if let (Some((n, per)), Some(last)) = (per_conn_kb(&r.points), last) {
        let rss_mb = last.mem.rss_kb as f64 / 1024.0;
        let verdict = if n < 10_000 {
            "not evaluated (fewer than 10 000 connections)"
        } else if rss_mb < GOAL_RSS_MB {
            "met"
        } else {
            "not met"
        };
        s += &format!(
            "\nPer connection: ({} − {}) / {} = **{per:.1} KB**. Goal: 10 000 connections under {GOAL_RSS_MB:.0} MB gateway RSS → **{}** ({} connections, {:.1} MB).\n",
            mb(last.mem.rss_kb),
            mb(r.points[0].mem.rss_kb),
            n,
            verdict,
            n,
            rss_mb
        );
    }
    if let Some(c) = classic_rss {
        s += &format!(
            "Baseline: the classic gateway's main process alone is {} RSS with one node and no idle clients (phase 3 of this run; classic-protocol.md §11: 597 MB median idle).\n",
            mb(c)
        );
    } else {
        s += "Baseline: the classic gateway's main process alone idles at ≈597 MB RSS (classic-protocol.md §11; not measured in this run).\n";
    }
    s += &format!(
        "\n| check | result |\n|---|---|\n| `health` round trip on a separate connection, before (p50 / p90 / p99 / max / mean ms, n={HEALTH_N}) | {} |\n| same, with the connections held | {} |\n",
        r.health_before.row(),
        lat_cell(&r.health_with)
    );
    if let Some(m) = &r.after_hold {
        s += &format!(
            "| after holding {:?} (every connection saw pings and a tick) | gateway RSS {}, VmHWM {}, fds {}; {} of {} still open; {} pings and {} ticks received |\n",
            r.hold,
            mb(m.rss_kb),
            mb(m.hwm_kb),
            m.fds,
            r.held_alive,
            r.held_alive + r.dropped,
            r.pings,
            r.ticks
        );
    }
    if r.dropped > 0 {
        s += &format!(
            "| connections the gateway dropped | {} (first: {}) |\n",
            r.dropped,
            r.first_drop.clone().unwrap_or_default()
        );
    }
    if let Some(m) = &r.after_close {
        s += &format!(
            "| 3 s after all were closed | gateway RSS {}, fds {} |\n",
            mb(m.rss_kb),
            m.fds
        );
    }
    if let Some((b, m)) = &r.wave2 {
        s += &format!(
            "| second wave: {} connections opened again ({} errors) | gateway RSS {}, VmHWM {}, fds {}; handshake {} ms |\n",
            b.opened,
            b.errors,
            mb(m.rss_kb),
            mb(m.hwm_kb),
            m.fds,
            lat_cell(&b.lat)
        );
    }
    if let Some(m) = &r.after_close2 {
        s += &format!(
            "| 3 s after the second wave closed | gateway RSS {}, fds {} |\n",
            mb(m.rss_kb),
            m.fds
        );
    }
    s += &format!(
        "| benchmark client process RSS with all connections | {} |\n",
        mb(r.client_rss_kb)
    );
    if let Some(why) = &r.stopped_reason {
        s += &format!("\nStopped early / errors: {why}\n");
    }
    s
}

fn report_nodes(r: &NodeResult) -> String {
    let mut s = format!(
        "### Idle classic node connections (target {}; one Ed25519 device each, v3-signed `connect`)\n\n",
        r.target
    );
    s += &format!(
        "Pairing: node 0 and nodes 1..{} through the real path ({} connects refused with `PAIRING_REQUIRED` in {:.1} s, then `device.pair.approve` one by one: {:.1} s in all; first 100 approvals p50 / p90 / p99 / max / mean {} ms, last 100 {} ms). ",
        r.wave,
        r.wave.saturating_sub(1),
        r.requests_secs,
        r.approve_secs,
        lat_cell(&r.approve_first),
        lat_cell(&r.approve_last),
    );
    if r.seeded > 0 {
        s += &format!(
            "The other {} devices were added as paired records with `Registry::apply` (the federation-sync path) while the gateway was stopped ({:.1} s), because approving them one by one costs O(paired devices) each (see the findings). Then the gateway was restarted on the same state and every device connected as a node.\n\n",
            r.seeded, r.seed_secs
        );
    } else {
        s += "\n\n";
    }
    s += &points_table(&r.points, "nodes", "node");
    if let Some((n, per)) = per_conn_kb(&r.points) {
        s += &format!("\nPer node connection (from the 1-node row to {n}): **{per:.1} KB**.\n");
    }
    s += "\n| paired devices | attached nodes | `node.invoke system.which` to one node (it answers in-process) p50 / p90 / p99 / max / mean ms | `node.list` p50 / p90 / p99 / max / mean ms |\n|---|---|---|---|\n";
    let mut scale: Vec<&Scale> = r.scale.iter().collect();
    scale.sort_by_key(|x| (x.paired, x.attached));
    for x in scale {
        s += &format!(
            "| {} | {} | {} (n={}) | {} (n={}) |\n",
            x.paired,
            x.attached,
            lat_cell(&x.invoke),
            x.invoke.map(|l| l.n).unwrap_or(0),
            lat_cell(&x.list),
            x.list.map(|l| l.n).unwrap_or(0),
        );
    }
    s += &format!(
        "\n`node.list` reported {} connected nodes; {} node connections were dropped by the gateway{}; {} panics in the gateway logs.\n",
        r.listed,
        r.dropped,
        r.first_drop
            .as_deref()
            .map(|e| format!(" (first: {e})"))
            .unwrap_or_default(),
        r.panics
    );
    if let Some(m) = &r.after_close {
        s += &format!(
            "3 s after all but the responder were closed: gateway RSS {}, fds {}.\n",
            mb(m.rss_kb),
            m.fds
        );
    }
    if let Some(why) = &r.stopped_reason {
        s += &format!("\nStopped early / errors: {why}\n");
    }
    s
}

/// One row of the phase-3 table: a label and how to render a side.
type Row = (&'static str, Box<dyn Fn(&InvokeSide) -> String>);

/// Section 11's recorded numbers (the classic gateway on this VM).
const SECTION11: &str = "p50 4.25 / p90 6.17 / p99 13.1 / max 52.7 / mean 4.84 ms (classic-protocol.md §11, recorded, not this run)";

fn report_invoke(
    n: usize,
    cm: &Result<InvokeSide>,
    classic: &Option<Result<InvokeSide>>,
) -> String {
    let mut s = format!(
        "### `node.invoke system.which {{\"bins\":[\"sh\"]}}` to the real classic node host, n = {n} sequential (after {WARMUP} warm-up), one operator WebSocket\n\n"
    );
    let cell = |r: &Result<InvokeSide>, f: &dyn Fn(&InvokeSide) -> String| match r {
        Ok(v) => f(v),
        Err(_) => "–".into(),
    };
    let classic_cell = |f: &dyn Fn(&InvokeSide) -> String| match classic {
        Some(Ok(v)) => f(v),
        Some(Err(_)) => "failed (see below)".into(),
        None => "skipped".into(),
    };
    let rows: Vec<Row> = vec![
        ("p50 ms", Box::new(|v| format!("{:.2}", v.lat.p50))),
        ("p90 ms", Box::new(|v| format!("{:.2}", v.lat.p90))),
        ("p99 ms", Box::new(|v| format!("{:.2}", v.lat.p99))),
        ("max ms", Box::new(|v| format!("{:.2}", v.lat.max))),
        ("mean ms", Box::new(|v| format!("{:.2}", v.lat.mean))),
        (
            "calls/s (sequential)",
            Box::new(|v| format!("{:.0}", 1e3 / v.lat.mean)),
        ),
        (
            "gateway VmRSS, node attached, before the calls",
            Box::new(|v| mb(v.gw_idle.rss_kb)),
        ),
        (
            "gateway VmRSS after the calls (VmHWM)",
            Box::new(|v| format!("{} ({})", mb(v.gw_after.rss_kb), mb(v.gw_after.hwm_kb))),
        ),
        (
            "gateway process tree RSS after the calls",
            Box::new(|v| {
                format!(
                    "{} ({} processes)",
                    mb(v.gw_tree_after.0),
                    v.gw_tree_after.1
                )
            }),
        ),
        (
            "node host process tree RSS",
            Box::new(|v| format!("{} ({} processes)", mb(v.node_tree.0), v.node_tree.1)),
        ),
        (
            "start → node invokable",
            Box::new(|v| format!("{:.1} s", v.setup_secs)),
        ),
    ];
    s += "| measure | clawmesh bridge | classic gateway (baseline, this run) |\n|---|---|---|\n";
    for (name, f) in &rows {
        s += &format!("| {name} | {} | {} |\n", cell(cm, f), classic_cell(f));
    }
    s += &format!("\nRecorded stand-in for the baseline: {SECTION11}.\n");
    if let Err(e) = cm {
        s += &format!("\nclawmesh side failed: {e:#}\n");
    }
    if let Some(Err(e)) = classic {
        s += &format!("\nClassic baseline could not be measured: {e:#}\n");
    }
    s
}

// ---------------------------------------------------------------------------------------------
// Main

fn main() -> Result<()> {
    let o = parse_opts()?;
    let (soft, hard) = raise_nofile()?;
    let need = o.conns.max(o.node_conns) as u64 + 200;
    if soft < need {
        eprintln!(
            "warning: open-files limit {soft} (hard {hard}) is below the {need} this run needs; expect EMFILE"
        );
    }
    let bin = clawmesh_bin()?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    install_ctrl_c();
    let started = Instant::now();
    let machine = machine_with_load();
    let mut out = String::new();
    out += &format!(
        "Command: `cargo run --release --example bench_bridge{}`\n\n| machine | |\n|---|---|\n",
        std::env::args()
            .skip(1)
            .map(|a| format!(" {a}"))
            .collect::<String>()
    );
    for (k, v) in &machine {
        out += &format!("| {k} | {v} |\n");
    }
    out += &format!("| open files (soft / hard) | {soft} / {hard} |\n\n");

    let scratch = tempfile::Builder::new().prefix("bench-bridge-").tempdir()?;
    let mut idle = None;
    if o.conns > 0 {
        let mut gw = start_gateway(
            &bin,
            &scratch.path().join("idle-gw"),
            &scratch.path().join("idle-gw.log"),
            "idle-gw",
        )?;
        let r = rt.block_on(idle_phase(&mut gw, &o));
        let connected_logs = gw.proc.log_count("classic client connected");
        let panics = gw.proc.log_count("panicked");
        gw.proc.stop(Duration::from_secs(20));
        drop(gw);
        eprintln!("idle: gateway logged {connected_logs} connects, {panics} panics");
        idle = Some(r);
    }
    let mut nodes = None;
    if o.node_conns > 0 {
        nodes = Some(rt.block_on(node_phase(&bin, scratch.path(), &o)));
    }
    let mut invoke = None;
    if !o.skip_invoke {
        match install_classic(scratch.path()).map(|(oc, _)| oc) {
            Ok(oc) => {
                eprintln!("invoke: classic client {}", oc.display());
                let cm = rt.block_on(invoke_clawmesh(&bin, &oc, &o));
                if let Err(e) = &cm {
                    eprintln!("invoke/clawmesh failed: {e:#}");
                }
                let classic = (!o.skip_classic).then(|| rt.block_on(invoke_classic(&oc, &o)));
                if let Some(Err(e)) = &classic {
                    eprintln!("invoke/classic failed: {e:#}");
                }
                invoke = Some(Ok((cm, classic)));
            }
            Err(e) => {
                eprintln!("invoke: skipped, the classic client is not available: {e:#}");
                invoke = Some(Err(e));
            }
        }
    }
    check_stop()?;

    let classic_rss = match &invoke {
        Some(Ok((_, Some(Ok(c))))) => Some(c.gw_idle.rss_kb),
        _ => None,
    };
    match &idle {
        Some(Ok(r)) => out += &report_idle(r, classic_rss),
        Some(Err(e)) => out += &format!("### Idle classic operator connections\n\nFailed: {e:#}\n"),
        None => {}
    }
    out += "\n";
    match &nodes {
        Some(Ok(r)) => out += &report_nodes(r),
        Some(Err(e)) => out += &format!("### Idle classic node connections\n\nFailed: {e:#}\n"),
        None => {}
    }
    out += "\n";
    match &invoke {
        Some(Ok((cm, classic))) => out += &report_invoke(o.invoke_n, cm, classic),
        Some(Err(e)) => {
            out += &format!("### node.invoke to the real classic node host\n\nSkipped: the classic client could not be installed: {e:#}\n")
        }
        None => {}
    }
    out += &format!("\nWhole run: {:.0} s.\n", started.elapsed().as_secs_f64());
    println!("{out}");
    rt.shutdown_timeout(Duration::from_secs(2));
    scratch.close()?;
    let failed = matches!(idle, Some(Err(_)))
        || matches!(nodes, Some(Err(_)))
        || matches!(invoke, Some(Ok((Err(_), _))));
    if failed {
        bail!("some phases failed (see above)");
    }
    Ok(())
}
