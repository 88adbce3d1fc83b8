//! On-demand benchmark of what an idle node costs the gateway it is attached to (issue 18 item
//! 4): native QUIC nodes beside classic WebSocket nodes at the same counts, in the same run.
//!
//! What it does, all on 127.0.0.0/8:
//!
//! 1. Makes one Ed25519 device per node (the largest count) and writes them as paired node
//!    devices with `Registry::apply`, the federation-sync path, into a state dir while no
//!    gateway runs (as `bench_bridge` and `bench_metrics` do: approving 50 000 devices one by
//!    one through `devices approve` is item 2's benchmark, not this one). Every gateway below
//!    starts from a copy of that state dir.
//! 2. For each transport (classic first, then native): starts a release
//!    `clawmesh gateway run --primary --token T --port 0` (default 10 s health interval),
//!    waits 3 s, reads its memory, then attaches nodes from this process in steps up to each
//!    count of `--counts` (default 1 000, 10 000, 50 000), each node with its own device:
//!    - **classic**: a WebSocket with the real node handshake (`connect.challenge`, a
//!      v3-signed `connect` as `role:"node"`, `hello-ok`), each held by a task that reads it
//!      (pings answered, ticks consumed); source addresses spread over 127.0.0.2.. (20 000
//!      connections per source address, below the 28 232 ephemeral ports);
//!    - **native**: a QUIC connection with the node's own code (`endpoint::client`, one
//!      client UDP socket per 250 nodes, the TLS raw-key handshake, `handshake::send_hello`
//!      with a `NodeHello`), then the node host's health loop (`liveness::monitor`: pings at
//!      half the gateway's interval, vitals with the first ping and every 6th after), as
//!      `clawmesh node run` does.
//!
//!    At each count, 5 s after every node got its welcome: the gateway's VmRSS, RssAnon and
//!    VmHWM (`/proc/PID/status`), Pss (`/proc/PID/smaps_rollup`), and this bench process's
//!    own RSS (the node side); then the gateway's `clawmesh_nodes_attached{transport}` gauge
//!    (`/metrics`, read after the memory: a scrape of N nodes allocates about 1 KiB per node)
//!    must show all of them. Per node = (RSS at N − RSS before any node) / N. Then every node
//!    closes and the gateway stops. `BENCH_NODE_MEMORY_WRAP="heaptrack -o FILE"` runs the
//!    gateway under a heap profiler (what each part costs).
//! 3. **The floor: a bare quinn server** (`raw quinn (floor)` rows, `--skip-raw` leaves them out): this
//!    program started again as a server process (`BENCH_NODE_MEMORY_ROLE=raw-server`) on the
//!    gateway's runtime (`multi_thread`, 2 workers) with the product's QUIC settings and TLS
//!    (`clawmesh_federation::endpoint::bind` with `TransportOptions::default()`, ed25519 raw
//!    public keys, TLS 1.3, mutual authentication). Per connection it does only what quinn
//!    needs to hold it: accept the node's one bidirectional stream, read it to its end (a
//!    real encoded `NodeHello` frame), answer 256 bytes (a welcome's size) and finish, then
//!    one task echoing the node's datagrams. Each raw node dials with the node's own client
//!    config, sends the hello bytes, reads the answer, then sends a 16-byte datagram every
//!    half health interval (5 s; every 6th one 128 bytes, a vitals reading's size). What the
//!    gateway costs per node beyond these rows is clawmesh's own (registry, liveness, alert
//!    rows, directory, request server) plus the datagrams the gateway itself sends; what the
//!    raw rows cost is quinn's and rustls's per-connection state with those settings.
//! 4. With `BENCH_NODE_MEMORY_BASE_BIN=<another clawmesh binary>` (say, main's, copied aside),
//!    each transport's steps run twice in the same run, first against the gateway under test
//!    (`CLAWMESH_BIN`, else the `clawmesh` beside this example), then against the baseline,
//!    from copies of the same seeded state dir and with the same node devices; the table
//!    prints both, the baseline's rows labelled `(base)`. Comparing a change against main is
//!    then one command, both sides under the same machine load. The baseline must read the
//!    same state-dir format (any clawmesh that runs `gateway run --primary --token --port`).
//!
//! ```text
//! cargo build --release --bin clawmesh --example bench_node_memory
//! cargo run --release --example bench_node_memory                       # 1 000 / 10 000 / 50 000
//! cargo run --release --example bench_node_memory -- --counts 1000,5000 --skip-classic
//! BENCH_NODE_MEMORY_BASE_BIN=../main/target/release/clawmesh \
//!   target/release/examples/bench_node_memory --counts 5000,10000 --skip-classic --concurrency 16
//! ```
//!
//! `BENCH_NODE_MEMORY_HOLD_SECS=N` keeps the nodes idle N s more after each count's reading
//! and reads the memory again (does an idle node's cost grow with time?).
//!
//! Flags: `--counts A,B,C`, `--skip-classic`, `--skip-native`, `--skip-raw`, `--concurrency N` (handshakes in
//! flight, default 64). The bench raises its open-files limit (soft and, as root, hard) to
//! 4 × the largest count + 1 024 before it starts the gateway, which inherits it: 50 000
//! classic nodes take 50 000 descriptors on each side. Progress on stderr, results as Markdown
//! on stdout. Every process started is stopped and every temp dir removed, also on errors.

#[path = "support/mod.rs"]
#[allow(dead_code)]
mod support;

const BENCH: &str = "bench_node_memory";

/// The operator token the gateways run with (classic nodes present it too).
const TOKEN: &str = "bench-node-memory-token-7e21";

/// Simulated native nodes sharing one client UDP socket: one socket's receive buffer
/// overflowed on a loaded machine with more (pongs lost, nodes closed as unresponsive).
const NODES_PER_SOCKET: usize = 250;

/// Classic connections per source address: below the 28 232 ephemeral ports Linux gives one
/// (source address, destination) pair by default.
const CONNS_PER_SOURCE: usize = 20_000;

/// A step's nodes must all be attached within this (50 000 handshakes on a busy 2-core box).
const ATTACH_DEADLINE: Duration = Duration::from_secs(900);

/// After the gauge says all are attached: let the first pings, vitals and ticks pass.
const SETTLE: Duration = Duration::from_secs(5);

/// One handshake step (connect, hello) may take this long on a loaded machine.
const STEP_TIMEOUT: Duration = Duration::from_secs(30);

/// Retries of one node's attach (a loaded machine may let a handshake time out).
const RETRIES: usize = 5;

/// Set to `raw-server` in the bare quinn server process this program starts of itself.
const ROLE_ENV: &str = "BENCH_NODE_MEMORY_ROLE";

/// What the bare quinn server answers a hello with: about a real welcome's encoded size.
const RAW_WELCOME: usize = 256;

/// A raw node's ping datagram and its every-6th vitals-sized one (the product's are a
/// sequence number and a timestamp, and a host reading of a dozen numbers).
const RAW_PING: usize = 16;
const RAW_VITALS: usize = 128;

/// The raw node pings at half the gateway's default health interval, as a node does.
const RAW_PING_EVERY: Duration = Duration::from_secs(5);

/// Largest hello the bare server reads (a real one is a few hundred bytes).
const RAW_MAX_HELLO: usize = 64 * 1024;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use base64::Engine as _;
use clawmesh_federation::endpoint::{self, TransportOptions};
use clawmesh_federation::identity::DeviceIdentity;
use clawmesh_federation::vitals::VitalsSampler;
use futures_util::{SinkExt as _, StreamExt as _};
use serde_json::{json, Value};
use support::*;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

type Ws = WebSocketStream<TcpStream>;

struct Opts {
    counts: Vec<usize>,
    classic: bool,
    native: bool,
    /// The bare quinn server beside the native rows (the per-connection floor).
    raw: bool,
    concurrency: usize,
    /// The open-files soft limit in force (set in `run`).
    nofile: u64,
}

fn parse_opts() -> Result<Opts> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut o = Opts {
        counts: vec![1_000, 10_000, 50_000],
        classic: true,
        native: true,
        raw: true,
        concurrency: 64,
        nofile: 0,
    };
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--counts" => {
                let v = it.next().ok_or_else(|| anyhow!("--counts needs a value"))?;
                o.counts = v
                    .split(',')
                    .map(|s| s.trim().parse::<usize>())
                    .collect::<Result<_, _>>()
                    .context("--counts A,B,C")?;
            }
            "--concurrency" => {
                let v = it
                    .next()
                    .ok_or_else(|| anyhow!("--concurrency needs a value"))?;
                o.concurrency = v.parse().context("--concurrency N")?;
            }
            "--skip-classic" => o.classic = false,
            "--skip-native" => o.native = false,
            "--skip-raw" => o.raw = false,
            other => bail!("unknown argument {other}"),
        }
    }
    o.counts.retain(|&n| n > 0);
    o.counts.sort_unstable();
    o.counts.dedup();
    if o.counts.is_empty() {
        bail!("--counts needs at least one count above 0");
    }
    // Bounded: 200 000 nodes would need more descriptors and memory than this bench is for.
    if o.counts.iter().any(|&n| n > 200_000) {
        bail!("counts above 200 000 are not supported");
    }
    o.concurrency = o.concurrency.clamp(1, 1_000);
    Ok(o)
}

/// Raises RLIMIT_NOFILE to `want` (the hard limit too when allowed, i.e. as root); returns the
/// soft limit in force.
fn raise_nofile(want: u64) -> Result<u64> {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    if hard < want && setrlimit(Resource::RLIMIT_NOFILE, want, want).is_ok() {
        return Ok(want);
    }
    let target = want.min(hard).max(soft);
    setrlimit(Resource::RLIMIT_NOFILE, target, hard)?;
    Ok(getrlimit(Resource::RLIMIT_NOFILE)?.0)
}

fn node_name(i: usize) -> String {
    format!("node-{i:06}")
}

/// Copies the seeded state dir's files (no gateway has it open).
fn copy_dir(from: &Path, to: &Path) -> Result<()> {
    std::fs::create_dir_all(to)?;
    for e in std::fs::read_dir(from)? {
        let e = e?;
        if e.file_type()?.is_file() {
            std::fs::copy(e.path(), to.join(e.file_name()))?;
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The gateway

struct Gateway {
    proc: Proc,
    /// The gateway's own pid (from `gateway.json`: under a wrapper it is not `proc`'s).
    pid: i32,
    quic: SocketAddr,
    /// The gateway's HTTP/WebSocket listener (`/metrics`); none for the bare quinn server.
    ws: Option<SocketAddr>,
}

async fn start_gateway(bin: &Path, dir: &Path, log: &Path) -> Result<Gateway> {
    let mut cmd = clawmesh_cmd(
        bin,
        dir,
        &[
            "gateway",
            "run",
            "--name",
            "bench",
            "--primary",
            "--token",
            TOKEN,
            "--port",
            "0",
        ],
    );
    // `BENCH_NODE_MEMORY_WRAP="heaptrack -o /tmp/gw"`: run the gateway under a profiler.
    let wrap = std::env::var(bench_env("WRAP")).ok();
    if let Some(w) = &wrap {
        let mut words = w.split_whitespace();
        let prog = words.next().ok_or_else(|| anyhow!("empty wrapper"))?;
        let mut wrapped = std::process::Command::new(prog);
        wrapped
            .args(words)
            .arg(cmd.get_program())
            .args(cmd.get_args());
        clawmesh_env(&mut wrapped);
        cmd = wrapped;
    }
    let mut proc = Proc::spawn("gateway", cmd, log)?;
    let spawned = proc.pid();
    let rt = poll(
        "gateway.json",
        Duration::from_secs(60),
        Duration::from_millis(50),
        || {
            let v = std::fs::read_to_string(dir.join(clawmesh::state_dir::RUNTIME_FILE))
                .ok()
                .and_then(|t| serde_json::from_str::<Value>(&t).ok())
                .filter(|v| wrap.is_some() || v["pid"] == spawned);
            async move { Ok(v) }
        },
    )
    .await?;
    proc.ensure_running()?;
    let pid = rt["pid"]
        .as_i64()
        .ok_or_else(|| anyhow!("no pid in gateway.json"))? as i32;
    let quic: SocketAddr = rt["quic"]
        .as_str()
        .ok_or_else(|| anyhow!("no quic address in gateway.json"))?
        .parse()?;
    let ws: SocketAddr = rt["ws"]
        .as_str()
        .and_then(|u| u.strip_prefix("ws://"))
        .ok_or_else(|| anyhow!("no ws:// url in gateway.json"))?
        .trim_end_matches('/')
        .parse()?;
    Ok(Gateway {
        proc,
        pid,
        quic,
        ws: Some(ws),
    })
}

/// Starts this program as the bare quinn server (`raw-server` role) and waits for its
/// address.
async fn start_raw_server(dir: &Path, log: &Path) -> Result<Gateway> {
    std::fs::create_dir_all(dir)?;
    let mut cmd = std::process::Command::new(std::env::current_exe()?);
    cmd.env(ROLE_ENV, "raw-server").arg(dir);
    let mut proc = Proc::spawn("raw quinn server", cmd, log)?;
    // It binds in milliseconds; 20 s covers a loaded machine.
    let quic: SocketAddr = poll(
        "raw server address",
        Duration::from_secs(20),
        Duration::from_millis(20),
        || {
            let a = std::fs::read_to_string(dir.join("addr"))
                .ok()
                .and_then(|a| a.parse().ok());
            async move { Ok(a) }
        },
    )
    .await?;
    proc.ensure_running()?;
    let pid = proc.pid();
    Ok(Gateway {
        proc,
        pid,
        quic,
        ws: None,
    })
}

/// The bare quinn server process: the gateway's runtime, the product's QUIC settings and TLS,
/// and per connection only the hello exchange and a datagram echo (module doc, item 3).
fn raw_server() -> Result<()> {
    let dir = PathBuf::from(std::env::args().nth(1).context("state dir")?);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("raw-server")
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let id = DeviceIdentity::ephemeral();
        let ep = endpoint::bind(
            &id,
            SocketAddr::from(([127, 0, 0, 1], 0)),
            &TransportOptions::default(),
        )?;
        std::fs::write(dir.join("addr"), ep.local_addr()?.to_string())?;
        while let Some(inc) = ep.accept().await {
            tokio::spawn(async move {
                let Ok(conn) = endpoint::accept(inc).await else {
                    return;
                };
                let Ok((mut send, mut recv)) = conn.accept_bi().await else {
                    return;
                };
                if recv.read_to_end(RAW_MAX_HELLO).await.is_err() {
                    return;
                }
                if send.write_all(&[b'w'; RAW_WELCOME]).await.is_err() {
                    return;
                }
                let _ = send.finish();
                while let Ok(d) = conn.read_datagram().await {
                    let _ = conn.send_datagram(d);
                }
            });
        }
        Ok(())
    })
}

/// One raw node: dials with the node's client config, sends `hello` (the bytes of a real
/// node hello frame), reads the answer, then pings as a node does (module doc, item 3).
async fn attach_raw_node(
    ep: &quinn::Endpoint,
    server: SocketAddr,
    id: &DeviceIdentity,
    hello: &[u8],
) -> Result<quinn::Connection> {
    let (_, cc) = endpoint::configs(id, &TransportOptions::default())?;
    let conn = tokio::time::timeout(
        STEP_TIMEOUT,
        ep.connect_with(cc, server, endpoint::SERVER_NAME)?,
    )
    .await??;
    let (mut send, mut recv) = conn.open_bi().await?;
    send.write_all(hello).await?;
    send.finish()?;
    tokio::time::timeout(STEP_TIMEOUT, recv.read_to_end(RAW_WELCOME)).await??;
    let c = conn.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(RAW_PING_EVERY);
        let mut sent = 0u64;
        loop {
            tokio::select! {
                _ = tick.tick() => {
                    let size = if sent.is_multiple_of(6) { RAW_VITALS } else { RAW_PING };
                    sent += 1;
                    if c.send_datagram(vec![b'p'; size].into()).is_err() {
                        return;
                    }
                }
                echo = c.read_datagram() => {
                    if echo.is_err() {
                        return;
                    }
                }
            }
        }
    });
    Ok(conn)
}

/// The bytes of a real node hello frame, as `handshake::send_hello` writes them.
fn node_hello_bytes() -> Result<Vec<u8>> {
    use clawmesh_federation::wire::{HelloRole, NodeHello};
    let hello = clawmesh_federation::handshake::hello(
        clawmesh::VERSION,
        0,
        HelloRole::Node(NodeHello {
            name: node_name(0),
            token: None,
            commands: vec!["system.which".into()],
            labels: Vec::new(),
            platform: "linux".into(),
            attach: clawmesh_federation::directory::AttachOrder { boot: 1, attach: 1 },
        }),
    );
    Ok(clawmesh_federation::frame::encode(&hello, RAW_MAX_HELLO)?)
}

/// How many nodes the server holds: the gateway's gauge, or for the bare quinn server (no
/// `/metrics`) the raw nodes whose connection is still open.
async fn gauge(gw: &Gateway, transport: &str, held: Option<&Held>) -> Result<usize> {
    match gw.ws {
        Some(ws) => attached_gauge(ws, transport).await,
        None => Ok(held.map_or(0, |h| h.len() - h.dropped())),
    }
}

/// `clawmesh_nodes_attached{transport="…"}` from the gateway's `/metrics`.
async fn attached_gauge(ws: SocketAddr, transport: &str) -> Result<usize> {
    let mut s = TcpStream::connect(ws).await?;
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        .await?;
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(30), s.read_to_end(&mut buf)).await??;
    let text = String::from_utf8_lossy(&buf);
    let key = format!("clawmesh_nodes_attached{{transport=\"{transport}\"}} ");
    Ok(text
        .lines()
        .find_map(|l| l.strip_prefix(key.as_str()))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0))
}

/// Proportional set size of `pid` in kB (`smaps_rollup`), if the kernel has it.
fn pss_kb(pid: i32) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("Pss:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
}

// ---------------------------------------------------------------------------------------------
// Classic nodes

fn ws_config() -> WebSocketConfig {
    // Small buffers: this process holds every node's socket.
    WebSocketConfig::default()
        .read_buffer_size(4096)
        .write_buffer_size(0)
        .max_message_size(Some(1 << 20))
        .max_frame_size(Some(1 << 20))
}

async fn next_json(ws: &mut Ws) -> Result<Value> {
    loop {
        match tokio::time::timeout(STEP_TIMEOUT, ws.next()).await {
            Err(_) => bail!("no frame within {STEP_TIMEOUT:?}"),
            Ok(Some(Ok(Message::Text(t)))) => return Ok(serde_json::from_str(&t)?),
            Ok(Some(Ok(Message::Close(f)))) => bail!("closed by the gateway: {f:?}"),
            Ok(Some(Ok(_))) => continue,
            Ok(Some(Err(e))) => bail!("WebSocket error: {e}"),
            Ok(None) => bail!("connection closed"),
        }
    }
}

/// One classic node: the real handshake from `source`, with a v3 device signature
/// (classic-protocol.md section 4).
async fn classic_node(gw: SocketAddr, source: IpAddr, id: &DeviceIdentity, i: usize) -> Result<Ws> {
    let sock = tokio::net::TcpSocket::new_v4()?;
    sock.bind(SocketAddr::new(source, 0))?;
    let tcp = tokio::time::timeout(STEP_TIMEOUT, sock.connect(gw)).await??;
    tcp.set_nodelay(true)?;
    let (mut ws, _) = tokio::time::timeout(
        STEP_TIMEOUT,
        tokio_tungstenite::client_async_with_config(format!("ws://{gw}/"), tcp, Some(ws_config())),
    )
    .await??;
    let c = next_json(&mut ws).await?;
    let (Some(nonce), Some(ts)) = (c["payload"]["nonce"].as_str(), c["payload"]["ts"].as_u64())
    else {
        bail!("expected connect.challenge, got {c}");
    };
    let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
    let did = id.device_id().to_string();
    let payload = format!("v3|{did}|node-host|node|node||{ts}|{TOKEN}|{nonce}|linux|linux");
    let params = json!({
        "minProtocol": 4, "maxProtocol": 4,
        "client": {"id": "node-host", "mode": "node", "version": "2026.9.6", "platform": "linux",
                   "deviceFamily": "Linux", "displayName": node_name(i)},
        "role": "node", "scopes": [], "caps": ["system"], "commands": ["system.which"],
        "auth": {"token": TOKEN},
        "device": {"id": did, "publicKey": b64(&id.public_key().0),
                   "signature": b64(&id.sign(payload.as_bytes())), "signedAt": ts, "nonce": nonce},
    });
    let req = json!({"type":"req","id":"1:connect","method":"connect","params":params});
    ws.send(Message::Text(req.to_string().into())).await?;
    loop {
        let f = next_json(&mut ws).await?;
        if f["type"] == "res" && f["id"] == "1:connect" {
            if f["ok"] == true && f["payload"]["type"] == "hello-ok" {
                return Ok(ws);
            }
            bail!("connect refused: {}", f["error"]);
        }
    }
}

/// Reads a held classic connection until it ends (pings are answered by the read).
fn hold_classic(mut ws: Ws, dropped: Arc<AtomicUsize>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        while let Some(Ok(m)) = ws.next().await {
            if matches!(m, Message::Close(_)) {
                break;
            }
        }
        dropped.fetch_add(1, Ordering::Relaxed);
    })
}

// ---------------------------------------------------------------------------------------------
// Native nodes

// ---------------------------------------------------------------------------------------------
// The run

/// What this process holds open for one transport.
enum Held {
    Classic {
        tasks: Vec<tokio::task::JoinHandle<()>>,
        dropped: Arc<AtomicUsize>,
    },
    /// QUIC nodes, of the gateway or of the bare quinn server.
    Quic {
        eps: Vec<quinn::Endpoint>,
        conns: Vec<quinn::Connection>,
        node: QuicNode,
    },
}

/// How one QUIC node attaches (`Held::Quic`).
#[derive(Clone)]
enum QuicNode {
    /// A clawmesh node: hello, welcome, the node host's health loop.
    Native(VitalsSampler),
    /// A node of the bare quinn server: these hello bytes, then pings.
    Raw(Arc<Vec<u8>>),
}

impl Held {
    fn len(&self) -> usize {
        match self {
            Held::Classic { tasks, .. } => tasks.len(),
            Held::Quic { conns, .. } => conns.len(),
        }
    }

    fn dropped(&self) -> usize {
        match self {
            Held::Classic { dropped, .. } => dropped.load(Ordering::Relaxed),
            Held::Quic { conns, .. } => conns.iter().filter(|c| c.close_reason().is_some()).count(),
        }
    }

    fn close(self) {
        match self {
            Held::Classic { tasks, .. } => tasks.iter().for_each(|t| t.abort()),
            Held::Quic { conns, eps, .. } => {
                for c in &conns {
                    c.close(0u32.into(), b"bench done");
                }
                drop(eps);
            }
        }
    }

    /// Attaches nodes `from..to` (device `i` is `ids[i]`).
    async fn grow(
        &mut self,
        gw: &Gateway,
        ids: &Arc<Vec<DeviceIdentity>>,
        to: usize,
        conc: usize,
    ) -> Result<()> {
        let from = self.len();
        match self {
            Held::Classic { tasks, dropped } => {
                let addr = gw.ws.ok_or_else(|| anyhow!("no WebSocket listener"))?;
                let opened = futures_util::stream::iter(from..to)
                    .map(|i| {
                        let ids = ids.clone();
                        // 127.0.0.2, .3, ...: a fresh source address every CONNS_PER_SOURCE.
                        let source =
                            IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2 + (i / CONNS_PER_SOURCE) as u8));
                        async move { retry(|| classic_node(addr, source, &ids[i], i)).await }
                    })
                    .buffer_unordered(conc)
                    .collect::<Vec<_>>()
                    .await;
                for ws in opened {
                    tasks.push(hold_classic(ws?, dropped.clone()));
                }
            }
            Held::Quic { eps, conns, node } => {
                let addr = gw.quic;
                while eps.len() < to.div_ceil(NODES_PER_SOCKET) {
                    eps.push(endpoint::client(
                        &ids[0],
                        addr,
                        &TransportOptions::default(),
                    )?);
                }
                let eps = eps.clone();
                let opened = futures_util::stream::iter(from..to)
                    .map(|i| {
                        let (ids, node) = (ids.clone(), node.clone());
                        let ep = eps[i / NODES_PER_SOCKET].clone();
                        async move {
                            retry(|| async {
                                match &node {
                                    QuicNode::Native(sampler) => {
                                        attach_native_node(
                                            &ep,
                                            addr,
                                            &ids[i],
                                            node_name(i),
                                            sampler,
                                            STEP_TIMEOUT,
                                        )
                                        .await
                                    }
                                    QuicNode::Raw(hello) => {
                                        attach_raw_node(&ep, addr, &ids[i], hello).await
                                    }
                                }
                            })
                            .await
                        }
                    })
                    .buffer_unordered(conc)
                    .collect::<Vec<_>>()
                    .await;
                for c in opened {
                    conns.push(c?);
                }
            }
        }
        Ok(())
    }
}

async fn retry<T, F, Fut>(mut f: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T>>,
{
    let mut tries = 0;
    loop {
        check_stop()?;
        match f().await {
            Ok(v) => return Ok(v),
            Err(e) if tries >= RETRIES => return Err(e),
            Err(_) => tries += 1,
        }
        sleep(Duration::from_millis(200)).await?;
    }
}

/// The gateway's memory at one count.
struct Point {
    nodes: usize,
    gauge: usize,
    rss_kb: u64,
    anon_kb: u64,
    hwm_kb: u64,
    pss_kb: u64,
    fds: usize,
    open_secs: f64,
    bench_rss_kb: u64,
    dropped: usize,
}

struct Side {
    /// The transport, plus ` (base)` for the baseline binary's rows.
    label: String,
    base: Point,
    points: Vec<Point>,
}

fn point(pid: i32, nodes: usize, gauge: usize, open_secs: f64, dropped: usize) -> Result<Point> {
    let m = mem_of(pid)?;
    Ok(Point {
        nodes,
        gauge,
        rss_kb: m.rss_kb,
        anon_kb: m.anon_kb,
        hwm_kb: m.hwm_kb,
        pss_kb: pss_kb(pid).unwrap_or(0),
        fds: m.fds,
        open_secs,
        bench_rss_kb: status_field(std::process::id() as i32, "VmRSS").unwrap_or(0),
        dropped,
    })
}

/// Which gateway binary a side runs.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Build {
    /// The binary under test.
    Tested,
    /// `BENCH_NODE_MEMORY_BASE_BIN`.
    Base,
}

async fn run_side(
    transport: &'static str,
    build: Build,
    bin: &Path,
    seed_dir: &Path,
    root: &Path,
    ids: &Arc<Vec<DeviceIdentity>>,
    o: &Opts,
) -> Result<Side> {
    let (label, dir_name) = match build {
        Build::Tested if transport == "raw" => ("raw quinn (floor)".into(), transport.to_string()),
        Build::Tested => (transport.to_string(), transport.to_string()),
        Build::Base => (format!("{transport} (base)"), format!("{transport}-base")),
    };
    let dir = root.join(&dir_name);
    copy_dir(seed_dir, &dir)?;
    let log = root.join(format!("{dir_name}.log"));
    let mut gw = match transport {
        "raw" => start_raw_server(&dir, &log).await?,
        _ => start_gateway(bin, &dir, &log).await?,
    };
    let pid = gw.pid;
    // The consensus forms in a moment on a lone primary; let the start-up settle.
    sleep(Duration::from_secs(3)).await?;
    let base = point(pid, 0, gauge(&gw, transport, None).await?, 0.0, 0)?;
    let server = match gw.ws {
        Some(_) => format!("gateway {}", bin.display()),
        None => "bare quinn server".to_string(),
    };
    eprintln!(
        "{label}: {server} at {} before any node (load average {})",
        mb(base.rss_kb),
        loadavg3()
    );
    let mut held = match transport {
        "ws" => Held::Classic {
            tasks: Vec::new(),
            dropped: Arc::default(),
        },
        "raw" => Held::Quic {
            eps: Vec::new(),
            conns: Vec::new(),
            node: QuicNode::Raw(Arc::new(node_hello_bytes()?)),
        },
        _ => Held::Quic {
            eps: Vec::new(),
            conns: Vec::new(),
            node: QuicNode::Native(VitalsSampler::new(root)),
        },
    };
    let mut points = Vec::new();
    let mut counts = o.counts.clone();
    if transport == "ws" {
        // A classic node is a TCP socket on each side: both processes need a descriptor per
        // node, and the open-files limit (20 000 hard where the bench is not allowed to raise
        // it) caps the count. The largest count that fits stands in for the rest.
        let fits = (o.nofile.saturating_sub(1_000) / 1_000 * 1_000) as usize;
        if counts.iter().any(|&n| n > fits) {
            eprintln!(
                "ws: counts above {fits} do not fit the open-files limit {}: measuring {fits}",
                o.nofile
            );
            counts.retain(|&n| n < fits);
            counts.push(fits);
        }
    }
    for &n in &counts {
        let t = Instant::now();
        held.grow(&gw, ids, n, o.concurrency).await?;
        let open_secs = t.elapsed().as_secs_f64();
        // Every node has its welcome (hello-ok) here; the gateway registers it right after
        // sending that. Memory is read before any scrape: a `/metrics` body for N nodes is
        // about 1 KiB per node, and the allocator may keep that memory after the scrape.
        sleep(SETTLE).await?;
        gw.proc.ensure_running().context("the gateway died")?;
        let mut p = point(pid, n, 0, open_secs, held.dropped())?;
        let deadline = Instant::now() + ATTACH_DEADLINE;
        p.gauge = gauge(&gw, transport, Some(&held)).await?;
        while p.gauge < n && Instant::now() < deadline {
            gw.proc.ensure_running().context("the gateway died")?;
            sleep(Duration::from_millis(500)).await?;
            p.gauge = gauge(&gw, transport, Some(&held)).await?;
        }
        eprintln!(
            "{label}: {n} nodes opened in {open_secs:.1} s, gauge {}, gateway {} ({:.1} KB/node)",
            p.gauge,
            mb(p.rss_kb),
            per_node(&base, &p)
        );
        if let Some(hold) = hold() {
            // `BENCH_NODE_MEMORY_HOLD_SECS`: does an idle node keep costing the same, or does
            // something grow with time (histories, in-flight state)?
            sleep(hold).await?;
            gw.proc.ensure_running().context("the gateway died")?;
            let later = point(pid, n, p.gauge, open_secs, held.dropped())?;
            println!(
                "- {label}, {n} nodes, {} s later: gateway VmRSS {} ({:.1} KB per node, was {:.1}), {} closed",
                hold.as_secs(),
                mb(later.rss_kb),
                per_node(&base, &later),
                per_node(&base, &p),
                later.dropped
            );
        }
        points.push(p);
    }
    held.close();
    if std::env::var_os(bench_env("WRAP")).is_some() {
        // Let the gateway exit on its own so the profiler writes its data out.
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGTERM,
        );
        let t = Instant::now();
        while !gw.proc.exited() && t.elapsed() < Duration::from_secs(300) {
            sleep(Duration::from_millis(200)).await?;
        }
    }
    gw.proc.stop(Duration::from_secs(10));
    Ok(Side {
        label,
        base,
        points,
    })
}

/// `BENCH_NODE_MEMORY_HOLD_SECS=N`: after each count's reading, keep the nodes idle N s more
/// and read the memory again.
fn hold() -> Option<Duration> {
    std::env::var(bench_env("HOLD_SECS"))
        .ok()
        .and_then(|v| v.parse().ok())
        .map(Duration::from_secs)
}

/// (RSS at the point − RSS before any node) / nodes, in KB (1 000 bytes, as `mb` prints MB).
fn per_node(base: &Point, p: &Point) -> f64 {
    (p.rss_kb as f64 - base.rss_kb as f64) * 1.024 / p.nodes.max(1) as f64
}

fn report(sides: &[Side]) {
    println!("\n## Gateway memory per idle node\n");
    println!("| transport | nodes | attached (gauge) | gateway VmRSS | Δ vs 0 | **per node** | step per node | RssAnon | Pss | VmHWM | fds | open time | closed before the reading | bench process RSS |");
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    for s in sides {
        let b = &s.base;
        println!(
            "| {} | 0 | {} | {} | – | – | – | {} | {} | {} | {} | – | – | {} |",
            s.label,
            b.gauge,
            mb(b.rss_kb),
            mb(b.anon_kb),
            mb(b.pss_kb),
            mb(b.hwm_kb),
            b.fds,
            mb(b.bench_rss_kb)
        );
        let mut prev = b;
        for p in &s.points {
            let step = (p.rss_kb as f64 - prev.rss_kb as f64) * 1.024
                / (p.nodes - prev.nodes).max(1) as f64;
            println!(
                "| {} | {} | {} | {} | +{} | **{:.1} KB** | {:.1} KB | {} | {} | {} | {} | {:.1} s | {} | {} |",
                s.label,
                p.nodes,
                p.gauge,
                mb(p.rss_kb),
                mb(p.rss_kb.saturating_sub(b.rss_kb)),
                per_node(b, p),
                step,
                mb(p.anon_kb),
                mb(p.pss_kb),
                mb(p.hwm_kb),
                p.fds,
                p.open_secs,
                p.dropped,
                mb(p.bench_rss_kb)
            );
            prev = p;
        }
    }
}

/// Per count: the native gateway's cost per node beside the bare quinn server's, and the
/// difference (what clawmesh itself adds per node).
fn floor_summary(sides: &[Side]) {
    let find = |label: &str| sides.iter().find(|s| s.label == label);
    let (Some(native), Some(raw)) = (find("quic"), find("raw quinn (floor)")) else {
        return;
    };
    println!();
    for p in &native.points {
        if let Some(r) = raw.points.iter().find(|r| r.nodes == p.nodes) {
            let (n, f) = (per_node(&native.base, p), per_node(&raw.base, r));
            println!(
                "- {} nodes: gateway {n:.1} KB per node, bare quinn server {f:.1} KB per connection: clawmesh's own {:.1} KB per node ({:.0} % of the gateway's)",
                p.nodes,
                n - f,
                100.0 * (n - f) / n
            );
        }
    }
}

async fn run(mut o: Opts) -> Result<()> {
    install_ctrl_c();
    let max = *o.counts.last().ok_or_else(|| anyhow!("no counts"))?;
    let nofile = raise_nofile(4 * max as u64 + 1024)?;
    o.nofile = nofile;
    println!("# {BENCH}\n");
    for (k, v) in machine_with_load() {
        println!("- {k}: {v}");
    }
    println!("- open-files limit (bench and gateway): {nofile}");
    println!("- counts: {:?}", o.counts);
    let bin = clawmesh_bin()?;
    println!("- gateway under test: {}", bin.display());
    let base_bin = std::env::var_os(bench_env("BASE_BIN")).map(PathBuf::from);
    if let Some(b) = &base_bin {
        if !b.is_file() {
            bail!("{}={}: no such file", bench_env("BASE_BIN"), b.display());
        }
        println!("- baseline gateway (rows `(base)`): {}", b.display());
    }
    let tmp = tempfile::Builder::new().prefix(BENCH).tempdir()?;
    let root: PathBuf = tmp.path().to_path_buf();
    let t = Instant::now();
    let ids: Arc<Vec<DeviceIdentity>> =
        Arc::new((0..max).map(|_| DeviceIdentity::ephemeral()).collect());
    let seed_dir = root.join("seed");
    std::fs::create_dir_all(&seed_dir)?;
    let meta =
        json!({"deviceFamily": "Linux", "clientId": "node-host", "clientMode": "node"}).to_string();
    seed_paired_nodes(&seed_dir, &ids, (0, max), node_name, &meta)?;
    eprintln!(
        "seeded {max} paired node devices in {:.1} s",
        t.elapsed().as_secs_f64()
    );
    let mut sides = Vec::new();
    let transports = [("ws", o.classic), ("quic", o.native), ("raw", o.raw)];
    for transport in transports.iter().filter(|t| t.1).map(|t| t.0) {
        sides.push(run_side(transport, Build::Tested, &bin, &seed_dir, &root, &ids, &o).await?);
        if let (Some(b), false) = (&base_bin, transport == "raw") {
            sides.push(run_side(transport, Build::Base, b, &seed_dir, &root, &ids, &o).await?);
        }
    }
    report(&sides);
    floor_summary(&sides);
    println!("\n- load average at the end: {}", loadavg3());
    Ok(())
}

fn main() -> Result<()> {
    if std::env::var(ROLE_ENV).as_deref() == Ok("raw-server") {
        return raw_server();
    }
    let o = parse_opts()?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(run(o))
}
