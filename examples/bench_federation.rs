//! On-demand benchmark of gateway links, gateway memory and gateway start-up (issue 2).
//!
//! Every figure is printed beside a baseline measured in the same run, as Markdown tables:
//!
//! 1. **Link round trips** (in-process, loopback): two QUIC endpoints built by
//!    [`clawmesh_federation::endpoint::bind`] with one connection between them, measured as
//!    - datagram `Ping`/`Pong` ([`clawmesh_federation::wire::Datagram`]), as the mesh's health
//!      pings do;
//!    - [`clawmesh_federation::rpc::call`] against [`clawmesh_federation::rpc::serve`] (a new
//!      bidirectional stream per request, as every gateway request does);
//!    - request/response frames on one long-lived bidirectional stream;
//!
//!    each N = 10 000 sequential round trips after 1 000 warm-up ones, beside a raw tokio UDP
//!    echo on 127.0.0.1 (same N, same runtime). Both tokio flavours run: `current_thread` and
//!    `multi_thread` with 2 workers (what the `clawmesh` binary uses); the measuring task is
//!    spawned on the runtime so it runs where gateway tasks run. Datagrams and UDP are also
//!    measured sparse (100 round trips 20 ms apart), where waking idle threads dominates, as
//!    for the mesh's health pings.
//!
//!    **Connection setup** (in-process, loopback): 300 sequential QUIC handshakes (mutual TLS
//!    1.3 with device keys, as every link and client connection) between two endpoints built
//!    by [`clawmesh_federation::endpoint::bind`], until the dialer's `endpoint::dial` returns
//!    and until the acceptor's connection is established, beside a loopback TCP connect +
//!    accept (same N, same runtime), both tokio flavours.
//! 2. **Idle RSS**: a primary and two remotes (real `clawmesh gateway run` processes, full
//!    mesh, health interval 1 s) left idle 5 s, then VmRSS / RssAnon / RssFile / Pss / VmHWM /
//!    threads from `/proc`. Baseline: an idle `sleep` process. Then the gateways' own
//!    health-ping round trips (from `gateway.status`) beside raw UDP between two processes
//!    (this example re-executed as a UDP echo, 25 round trips 200 ms apart).
//! 3. **Start-to-ready**: spawn `clawmesh gateway run` until it has written `gateway.json` and
//!    until it has answered `gateway.status` over QUIC (library client, local admin key),
//!    20 cold starts (fresh state dir: key, certificate, SQLite creation) and 20 warm restarts
//!    (existing state dir). Baselines: spawn and wait for `/bin/true` and for
//!    `clawmesh --version` (the binary's own exec floor). Also reported: what the client itself
//!    costs (connect, call, close) and the wall time of the CLI's `gateway status`.
//!
//! Everything runs on loopback; every process it starts is stopped (SIGTERM, then SIGKILL) and
//! every temp dir removed. The whole run takes well under two minutes.
//!
//! Run it (release, or the numbers mean nothing) after building the gateway binary:
//!
//! ```text
//! cargo build --release --bin clawmesh
//! cargo run --release --example bench_federation
//! ```
//!
//! The binary is looked up next to the example's directory (`target/release/clawmesh`); set
//! `CLAWMESH_BIN=/path/to/clawmesh` to use another one.

#[path = "support/mod.rs"]
#[allow(dead_code)]
mod support;

use std::fs;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use clawmesh::cli::client::{Client, Target};
use clawmesh_federation::endpoint::{self, TransportOptions};
use clawmesh_federation::frame::{self, MAX_FRAME};
use clawmesh_federation::identity::DeviceIdentity;
use clawmesh_federation::rpc::{self, BoxFuture, Caller, CallerKind, Handler};
use clawmesh_federation::wire::{Datagram, Request, Response, WireError};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use quinn::{Connection, Endpoint};
use serde_json::{json, Value};
use support::{clawmesh_bin, loadavg3, Flavour};
use tokio::net::UdpSocket;

/// This example's name (see `support`).
const BENCH: &str = "bench_federation";

/// Measured round trips per case.
const N: usize = 10_000;
/// Unmeasured round trips before each case.
const WARMUP: usize = 1_000;
/// Longest wait for one round trip; a loopback round trip that takes this long is lost.
const RTT_TIMEOUT: Duration = Duration::from_secs(1);
/// Gateway start-ups per kind (cold, warm).
const STARTS: usize = 20;
/// Idle time before reading memory.
const IDLE: Duration = Duration::from_secs(5);
/// Federation join secret of the benchmark gateways.
const TOKEN: &str = "bench-federation-token";
/// Params of the echo requests: a small JSON document like most operator calls.
const PARAMS: &str = r#"{"all":true}"#;

// ---------------------------------------------------------------------------------------------
// Statistics and formatting

struct Stats {
    n: usize,
    p50: Duration,
    p99: Duration,
    mean: Duration,
    max: Duration,
}

fn stats(mut v: Vec<Duration>) -> Result<Stats> {
    if v.is_empty() {
        bail!("no samples");
    }
    v.sort_unstable();
    // Nearest rank.
    let rank = |p: usize| v[((p * v.len()).div_ceil(100)).clamp(1, v.len()) - 1];
    let total: Duration = v.iter().sum();
    Ok(Stats {
        n: v.len(),
        p50: rank(50),
        p99: rank(99),
        mean: total / v.len() as u32,
        max: v[v.len() - 1],
    })
}

fn us(d: Duration) -> String {
    format!("{:.1}", d.as_secs_f64() * 1e6)
}

fn ms(d: Duration) -> String {
    format!("{:.2}", d.as_secs_f64() * 1e3)
}

fn ratio(a: Duration, b: Duration) -> String {
    if b.is_zero() {
        return "-".into();
    }
    format!("{:.2}x", a.as_secs_f64() / b.as_secs_f64())
}

// ---------------------------------------------------------------------------------------------
// 1. Link round trips (in-process)

/// How many round trips, and how far apart.
#[derive(Clone, Copy)]
struct Plan {
    n: usize,
    warmup: usize,
    /// Pause before each round trip: zero for back-to-back, else it lets every thread go idle
    /// in between, as the mesh's health pings (one a second) do.
    gap: Duration,
}

/// Back-to-back round trips.
const HOT: Plan = Plan {
    n: N,
    warmup: WARMUP,
    gap: Duration::ZERO,
};

/// Round trips 20 ms apart.
const SPARSE: Plan = Plan {
    n: 100,
    warmup: 5,
    gap: Duration::from_millis(20),
};

impl Plan {
    async fn pause(&self) {
        if !self.gap.is_zero() {
            tokio::time::sleep(self.gap).await;
        }
    }
}

/// Samples of one case, plus round trips that never came back.
struct Case {
    name: &'static str,
    rtts: Vec<Duration>,
    lost: usize,
    /// UDP datagrams sent by both sides per measured round trip.
    packets: f64,
}

/// UDP datagrams both ends of a QUIC connection have sent so far.
fn packets_sent(pair: &QuicPair) -> u64 {
    pair.conn.stats().udp_tx.datagrams + pair.server_conn.stats().udp_tx.datagrams
}

/// Raw UDP echo on loopback: the floor every QUIC figure is compared with.
async fn udp_echo(plan: Plan) -> Result<Case> {
    let server = UdpSocket::bind("127.0.0.1:0").await?;
    let server_addr = server.local_addr()?;
    let echo = tokio::spawn(async move {
        let mut buf = [0u8; 2048];
        while let Ok((len, from)) = server.recv_from(&mut buf).await {
            if server.send_to(&buf[..len], from).await.is_err() {
                return;
            }
        }
    });
    let client = UdpSocket::bind("127.0.0.1:0").await?;
    client.connect(server_addr).await?;
    let mut buf = [0u8; 2048];
    let mut rtts = Vec::with_capacity(plan.n);
    let mut lost = 0;
    for i in 0..(plan.warmup + plan.n) as u64 {
        plan.pause().await;
        let msg = i.to_be_bytes();
        let t = Instant::now();
        client.send(&msg).await?;
        let got = tokio::time::timeout(RTT_TIMEOUT, async {
            loop {
                let len = client.recv(&mut buf).await?;
                if buf[..len] == msg {
                    return Ok::<_, std::io::Error>(());
                }
            }
        })
        .await;
        let rtt = t.elapsed();
        match got {
            Ok(r) => r?,
            Err(_) => {
                lost += 1;
                continue;
            }
        }
        if i >= plan.warmup as u64 {
            rtts.push(rtt);
        }
    }
    echo.abort();
    Ok(Case {
        name: "raw UDP echo (baseline)",
        rtts,
        lost,
        packets: 2.0,
    })
}

/// The server side of the echo requests: returns the params unchanged.
struct Echo;

impl Handler for Echo {
    fn handle(&self, _caller: Caller, req: Request) -> BoxFuture<Result<String, WireError>> {
        Box::pin(async move { Ok(req.params) })
    }
}

/// Two endpoints as gateways bind them, and a connection from `client` to `server`.
struct QuicPair {
    client: Endpoint,
    server: Endpoint,
    conn: Connection,
    server_conn: Connection,
}

async fn quic_pair() -> Result<QuicPair> {
    let opts = TransportOptions::default();
    let loopback: SocketAddr = "127.0.0.1:0".parse()?;
    let server = endpoint::bind(&DeviceIdentity::ephemeral(), loopback, &opts)?;
    let client = endpoint::bind(&DeviceIdentity::ephemeral(), loopback, &opts)?;
    let server_addr = server.local_addr()?;
    let accepting = server.clone();
    let accept = tokio::spawn(async move {
        let incoming = accepting
            .accept()
            .await
            .ok_or_else(|| anyhow!("endpoint closed"))?;
        Ok::<_, anyhow::Error>(incoming.await?)
    });
    let conn = endpoint::dial(&client, server_addr, Duration::from_secs(5)).await?;
    let server_conn = accept.await??;
    Ok(QuicPair {
        client,
        server,
        conn,
        server_conn,
    })
}

impl QuicPair {
    async fn close(self) {
        self.conn.close(0u32.into(), b"done");
        self.server_conn.close(0u32.into(), b"done");
        let _ = tokio::time::timeout(Duration::from_millis(500), async {
            self.client.wait_idle().await;
            self.server.wait_idle().await;
        })
        .await;
    }
}

/// Datagram Ping/Pong, answered the way `Mesh::run_link` answers them.
async fn quic_datagrams(plan: Plan) -> Result<Case> {
    let pair = quic_pair().await?;
    let server_conn = pair.server_conn.clone();
    let pong = tokio::spawn(async move {
        while let Ok(bytes) = server_conn.read_datagram().await {
            if let Ok(Datagram::Ping { seq }) = frame::decode_datagram::<Datagram>(&bytes) {
                if let Ok(b) = frame::encode_datagram(&Datagram::Pong { seq }) {
                    let _ = server_conn.send_datagram(b.into());
                }
            }
        }
    });
    let conn = &pair.conn;
    let mut rtts = Vec::with_capacity(plan.n);
    let mut lost = 0;
    let mut sent_before = 0;
    for seq in 0..(plan.warmup + plan.n) as u64 {
        plan.pause().await;
        if seq == plan.warmup as u64 {
            sent_before = packets_sent(&pair);
        }
        let t = Instant::now();
        let ping = frame::encode_datagram(&Datagram::Ping { seq })?;
        conn.send_datagram(ping.into())?;
        let got = tokio::time::timeout(RTT_TIMEOUT, async {
            loop {
                let bytes = conn.read_datagram().await?;
                if let Datagram::Pong { seq: s } = frame::decode_datagram::<Datagram>(&bytes)? {
                    if s == seq {
                        return Ok::<_, anyhow::Error>(());
                    }
                }
            }
        })
        .await;
        let rtt = t.elapsed();
        match got {
            Ok(r) => r?,
            Err(_) => {
                lost += 1;
                continue;
            }
        }
        if seq >= plan.warmup as u64 {
            rtts.push(rtt);
        }
    }
    let packets = (packets_sent(&pair) - sent_before) as f64 / plan.n as f64;
    pong.abort();
    pair.close().await;
    Ok(Case {
        name: "QUIC datagram Ping/Pong",
        rtts,
        lost,
        packets,
    })
}

/// `rpc::call` against `rpc::serve`: one new bidirectional stream per request.
async fn quic_rpc() -> Result<Case> {
    let pair = quic_pair().await?;
    let caller = Caller {
        key: Some(DeviceIdentity::ephemeral().public_key()),
        kind: CallerKind::Gateway {
            name: "bench".into(),
        },
        remote: pair.server_conn.remote_address(),
    };
    let serve = tokio::spawn(rpc::serve(pair.server_conn.clone(), caller, Arc::new(Echo)));
    let mut rtts = Vec::with_capacity(N);
    let mut sent_before = 0;
    for i in 0..WARMUP + N {
        if i == WARMUP {
            sent_before = packets_sent(&pair);
        }
        let t = Instant::now();
        let reply = rpc::call(&pair.conn, "bench.echo", PARAMS.to_string(), 0, RTT_TIMEOUT).await?;
        let rtt = t.elapsed();
        if reply != PARAMS {
            bail!("echo returned {reply:?}");
        }
        if i >= WARMUP {
            rtts.push(rtt);
        }
    }
    let packets = (packets_sent(&pair) - sent_before) as f64 / N as f64;
    serve.abort();
    pair.close().await;
    Ok(Case {
        name: "QUIC rpc::call (stream per request)",
        rtts,
        lost: 0,
        packets,
    })
}

/// Request/Response frames back and forth on one long-lived bidirectional stream.
async fn quic_stream() -> Result<Case> {
    let pair = quic_pair().await?;
    let server_conn = pair.server_conn.clone();
    let echo = tokio::spawn(async move {
        let (mut send, mut recv) = server_conn.accept_bi().await?;
        while let Some(req) = frame::read_frame::<_, Request>(&mut recv, MAX_FRAME).await? {
            let resp = Response {
                id: req.id,
                result: Ok(req.params),
            };
            frame::write_frame(&mut send, &resp, MAX_FRAME).await?;
        }
        Ok::<_, anyhow::Error>(())
    });
    let (mut send, mut recv) = pair.conn.open_bi().await?;
    let mut rtts = Vec::with_capacity(N);
    let mut sent_before = 0;
    for i in 0..(WARMUP + N) as u64 {
        if i == WARMUP as u64 {
            sent_before = packets_sent(&pair);
        }
        let req = Request {
            id: i,
            method: "bench.echo".into(),
            params: PARAMS.into(),
            hops: 0,
        };
        let t = Instant::now();
        frame::write_frame(&mut send, &req, MAX_FRAME).await?;
        let resp: Option<Response> =
            tokio::time::timeout(RTT_TIMEOUT, frame::read_frame(&mut recv, MAX_FRAME))
                .await
                .context("no reply on the long-lived stream")??;
        let rtt = t.elapsed();
        match resp {
            Some(Response { id, result: Ok(_) }) if id == i => {}
            other => bail!("unexpected reply {other:?}"),
        }
        if i >= WARMUP as u64 {
            rtts.push(rtt);
        }
    }
    let packets = (packets_sent(&pair) - sent_before) as f64 / N as f64;
    let _ = send.finish();
    echo.abort();
    pair.close().await;
    Ok(Case {
        name: "QUIC frames on one long-lived stream",
        rtts,
        lost: 0,
        packets,
    })
}

/// Back-to-back cases, then sparse ones.
fn bench_links(flavour: Flavour) -> Result<(Vec<Case>, Vec<Case>)> {
    let rt = flavour.runtime()?;
    rt.block_on(async {
        // Spawned, so that on multi_thread the measuring task runs on a worker like gateway
        // tasks do, not on the thread inside block_on.
        tokio::spawn(async {
            let hot = vec![
                udp_echo(HOT).await?,
                quic_datagrams(HOT).await?,
                quic_rpc().await?,
                quic_stream().await?,
            ];
            let sparse = vec![udp_echo(SPARSE).await?, quic_datagrams(SPARSE).await?];
            Ok::<_, anyhow::Error>((hot, sparse))
        })
        .await?
    })
}

fn print_links(flavour: Flavour, plan: Plan, cases: Vec<Case>) -> Result<()> {
    if plan.gap.is_zero() {
        println!("\n### Link round trips, tokio {}\n", flavour.name());
        println!(
            "N = {} back-to-back round trips per row after {} warm-up, 127.0.0.1, µs.\n",
            plan.n, plan.warmup
        );
    } else {
        println!(
            "\nSparse: N = {} round trips {} ms apart (threads idle in between, as with health \
             pings), tokio {}, µs.\n",
            plan.n,
            plan.gap.as_millis(),
            flavour.name()
        );
    }
    println!(
        "| case | p50 µs | p99 µs | mean µs | max µs | lost | packets/RT | p50 vs UDP | p99 vs UDP |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|");
    let mut base: Option<(Duration, Duration)> = None;
    for c in cases {
        let s = stats(c.rtts)?;
        let (b50, b99) = *base.get_or_insert((s.p50, s.p99));
        println!(
            "| {} | {} | {} | {} | {} | {} | {:.2} | {} | {} |",
            c.name,
            us(s.p50),
            us(s.p99),
            us(s.mean),
            us(s.max),
            c.lost,
            c.packets,
            ratio(s.p50, b50),
            ratio(s.p99, b99),
        );
        if s.n != plan.n {
            println!("| (only {} samples) | | | | | | | | |", s.n);
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// 1b. Connection setup (in-process)

/// Measured connection setups per case.
const SETUPS: usize = 300;
/// Unmeasured setups before each case.
const SETUP_WARMUP: usize = 20;

/// Connection setup times: (dialer sees the connection up, acceptor sees it up).
struct Setups {
    dialer: Vec<Duration>,
    acceptor: Vec<Duration>,
}

/// Loopback TCP connect + accept: the floor for one round trip of connection setup.
async fn tcp_setups() -> Result<Setups> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let (mut dialer, mut acceptor) = (Vec::new(), Vec::new());
    for i in 0..SETUP_WARMUP + SETUPS {
        let t = Instant::now();
        let (conn, accepted) = tokio::join!(tokio::net::TcpStream::connect(addr), async {
            let r = listener.accept().await;
            (r, t.elapsed())
        });
        let d = t.elapsed();
        let (accepted, a) = accepted;
        drop((conn?, accepted?));
        if i >= SETUP_WARMUP {
            dialer.push(d);
            acceptor.push(a);
        }
    }
    Ok(Setups { dialer, acceptor })
}

/// QUIC connection setup between two gateway endpoints (mutual TLS 1.3 with device keys, as
/// every gateway link and client connection does): dial until the dialer's handshake is done,
/// and until the acceptor's side is established (it has checked the dialer's key).
async fn quic_setups() -> Result<Setups> {
    let opts = TransportOptions::default();
    let loopback: SocketAddr = "127.0.0.1:0".parse()?;
    let server = endpoint::bind(&DeviceIdentity::ephemeral(), loopback, &opts)?;
    let client = endpoint::bind(&DeviceIdentity::ephemeral(), loopback, &opts)?;
    let server_addr = server.local_addr()?;
    let (mut dialer, mut acceptor) = (Vec::new(), Vec::new());
    for i in 0..SETUP_WARMUP + SETUPS {
        let t = Instant::now();
        let (conn, accepted) = tokio::join!(
            endpoint::dial(&client, server_addr, Duration::from_secs(5)),
            async {
                let incoming = server.accept().await.ok_or_else(|| anyhow!("closed"))?;
                let conn = incoming.await?;
                Ok::<_, anyhow::Error>((conn, t.elapsed()))
            }
        );
        let d = t.elapsed();
        let conn = conn?;
        let (server_conn, a) = accepted?;
        if endpoint::peer_key(&server_conn).is_none() || endpoint::peer_key(&conn).is_none() {
            bail!("handshake completed without a peer key");
        }
        conn.close(0u32.into(), b"done");
        server_conn.close(0u32.into(), b"done");
        if i >= SETUP_WARMUP {
            dialer.push(d);
            acceptor.push(a);
        }
    }
    client.close(0u32.into(), b"done");
    server.close(0u32.into(), b"done");
    let _ = tokio::time::timeout(Duration::from_millis(500), async {
        client.wait_idle().await;
        server.wait_idle().await;
    })
    .await;
    Ok(Setups { dialer, acceptor })
}

/// Connection setups on one runtime flavour: TCP baseline, then QUIC.
fn bench_setups(flavour: Flavour) -> Result<(Setups, Setups)> {
    let rt = flavour.runtime()?;
    rt.block_on(async {
        tokio::spawn(async { Ok::<_, anyhow::Error>((tcp_setups().await?, quic_setups().await?)) })
            .await?
    })
}

fn print_setups(flavour: Flavour, tcp: Setups, quic: Setups) -> Result<()> {
    println!("\n### Connection setup, tokio {}\n", flavour.name());
    println!(
        "N = {SETUPS} sequential setups per row after {SETUP_WARMUP} warm-up, 127.0.0.1, two \
         endpoints in this process, µs. Dialer: `endpoint::dial` returns; acceptor: the \
         accepted connection is established.\n"
    );
    println!("| case | side | p50 µs | p99 µs | mean µs | max µs | p50 vs TCP |");
    println!("|---|---|---:|---:|---:|---:|---:|");
    let tcp_d = stats(tcp.dialer)?;
    let tcp_a = stats(tcp.acceptor)?;
    let quic_d = stats(quic.dialer)?;
    let quic_a = stats(quic.acceptor)?;
    for (name, side, s, base) in [
        (
            "TCP connect + accept (baseline)",
            "dialer",
            &tcp_d,
            tcp_d.p50,
        ),
        (
            "TCP connect + accept (baseline)",
            "acceptor",
            &tcp_a,
            tcp_a.p50,
        ),
        (
            "QUIC mutual TLS 1.3 (device keys)",
            "dialer",
            &quic_d,
            tcp_d.p50,
        ),
        (
            "QUIC mutual TLS 1.3 (device keys)",
            "acceptor",
            &quic_a,
            tcp_a.p50,
        ),
    ] {
        println!(
            "| {name} | {side} | {} | {} | {} | {} | {} |",
            us(s.p50),
            us(s.p99),
            us(s.mean),
            us(s.max),
            ratio(s.p50, base)
        );
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Gateway processes

/// A child process that is stopped (SIGTERM, then SIGKILL) and reaped when dropped.
struct Proc {
    child: Child,
    log: Option<PathBuf>,
}

impl Proc {
    fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    fn exited(&mut self) -> Result<bool> {
        Ok(self.child.try_wait()?.is_some())
    }

    /// SIGTERM, wait up to `grace`, then SIGKILL; returns how long the exit took.
    fn stop(&mut self, grace: Duration) -> Result<Duration> {
        let t = Instant::now();
        if self.child.try_wait()?.is_some() {
            return Ok(Duration::ZERO);
        }
        let _ = kill(Pid::from_raw(self.pid()), Signal::SIGTERM);
        while t.elapsed() < grace {
            if self.child.try_wait()?.is_some() {
                return Ok(t.elapsed());
            }
            std::thread::sleep(Duration::from_micros(500));
        }
        self.child.kill()?;
        self.child.wait()?;
        bail!("pid {} ignored SIGTERM for {grace:?}; killed", self.pid())
    }

    fn log_tail(&self) -> String {
        let Some(path) = &self.log else {
            return String::new();
        };
        let text = fs::read_to_string(path).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(15)..].join("\n")
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.stop(Duration::from_secs(3));
    }
}

/// Starts `clawmesh gateway run` with state dir `root/<name>`, logging to `root/<name>.log`.
fn spawn_gateway(bin: &Path, root: &Path, name: &str, extra: &[&str]) -> Result<Proc> {
    let dir = root.join(name);
    let log = root.join(format!("{name}.log"));
    let stderr = fs::File::create(&log)?;
    let child = Command::new(bin)
        .args(["gateway", "run", "--state-dir"])
        .arg(&dir)
        .args(["--name", name, "--token", TOKEN, "--port", "0"])
        .args(["--health-interval", "1000"])
        .args(extra)
        .env_remove("CLAWMESH_TOKEN")
        .env_remove("CLAWMESH_STATE_DIR")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(stderr)
        .spawn()
        .with_context(|| format!("spawning {}", bin.display()))?;
    Ok(Proc {
        child,
        log: Some(log),
    })
}

/// Waits (polling every 100 µs) until `dir/gateway.json` exists; returns its contents.
fn wait_runtime_file(gw: &mut Proc, dir: &Path, deadline: Duration) -> Result<Value> {
    let path = dir.join(clawmesh::state_dir::RUNTIME_FILE);
    let t = Instant::now();
    loop {
        if let Ok(text) = fs::read_to_string(&path) {
            if let Ok(v) = serde_json::from_str::<Value>(&text) {
                return Ok(v);
            }
        }
        if gw.exited()? {
            bail!("gateway exited before it was ready:\n{}", gw.log_tail());
        }
        if t.elapsed() > deadline {
            bail!(
                "no {} within {deadline:?}:\n{}",
                path.display(),
                gw.log_tail()
            );
        }
        std::thread::sleep(Duration::from_micros(100));
    }
}

/// Connects as local admin and calls `gateway.status` until it answers; returns the client.
async fn first_status(dir: &Path, deadline: Duration) -> Result<(Client, Value)> {
    let target = Target::Local(dir.to_path_buf());
    let t = Instant::now();
    loop {
        let attempt = async {
            let client = Client::connect(&target).await?;
            match client
                .call("gateway.status", json!({}), Duration::from_secs(2))
                .await
            {
                Ok(v) => Ok((client, v)),
                Err(e) => {
                    client.close().await;
                    Err(anyhow!("{e}"))
                }
            }
        };
        match attempt.await {
            Ok(r) => return Ok(r),
            Err(e) if t.elapsed() > deadline => {
                return Err(e.context(format!("no gateway.status within {deadline:?}")))
            }
            Err(_) => tokio::time::sleep(Duration::from_micros(200)).await,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// 2. Idle RSS

/// Memory figures of one process, in kB.
struct Mem {
    rss: u64,
    anon: u64,
    file: u64,
    pss: u64,
    hwm: u64,
    threads: u64,
}

fn proc_field(text: &str, key: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

fn mem_of(pid: i32) -> Result<Mem> {
    let status = fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status"))?;
    let rollup = fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).unwrap_or_default();
    Ok(Mem {
        rss: proc_field(&status, "VmRSS:"),
        anon: proc_field(&status, "RssAnon:"),
        file: proc_field(&status, "RssFile:"),
        pss: proc_field(&rollup, "Pss:"),
        hwm: proc_field(&status, "VmHWM:"),
        threads: proc_field(&status, "Threads:"),
    })
}

fn mb(kb: u64) -> String {
    format!("{:.1}", kb as f64 / 1024.0)
}

/// Whether the status document lists `n` gateways, all healthy.
fn mesh_complete(doc: &Value, n: usize) -> bool {
    doc["gateways"]
        .as_array()
        .is_some_and(|g| g.len() == n && g.iter().all(|g| g["status"] == "healthy"))
}

async fn bench_idle_rss(bin: &Path) -> Result<()> {
    let root = tempfile::tempdir()?;
    let mut primary = spawn_gateway(bin, root.path(), "a", &["--primary"])?;
    let rt = wait_runtime_file(
        &mut primary,
        &root.path().join("a"),
        Duration::from_secs(10),
    )?;
    let quic = rt["quic"]
        .as_str()
        .ok_or_else(|| anyhow!("gateway.json has no quic address: {rt}"))?;
    let join = format!("quic://{quic}");
    let t_join = Instant::now();
    let mut remotes = Vec::new();
    for name in ["b", "c"] {
        remotes.push(spawn_gateway(
            bin,
            root.path(),
            name,
            &["--join", join.as_str()],
        )?);
    }
    for (gw, name) in remotes.iter_mut().zip(["b", "c"]) {
        wait_runtime_file(gw, &root.path().join(name), Duration::from_secs(10))?;
    }
    // Full mesh: every gateway sees three, all healthy.
    let mut formed = None;
    while formed.is_none() {
        let mut all = true;
        for name in ["a", "b", "c"] {
            let (client, doc) =
                first_status(&root.path().join(name), Duration::from_secs(5)).await?;
            client.close().await;
            all &= mesh_complete(&doc, 3);
        }
        if all {
            formed = Some(t_join.elapsed());
        } else if t_join.elapsed() > Duration::from_secs(20) {
            bail!(
                "the three gateways did not form a healthy mesh within 20 s:\n{}",
                primary.log_tail()
            );
        } else {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let formed = formed.unwrap_or_default();
    // A baseline process that does nothing, measured at the same moment.
    let mut sleeper = Proc {
        child: Command::new("sleep")
            .arg("30")
            .stdin(Stdio::null())
            .spawn()
            .context("spawning sleep")?,
        log: None,
    };
    eprintln!("  mesh formed; idling {IDLE:?}");
    tokio::time::sleep(IDLE).await;
    let mut rows = vec![("a (primary)", mem_of(primary.pid())?)];
    rows.push(("b (remote)", mem_of(remotes[0].pid())?));
    rows.push(("c (remote)", mem_of(remotes[1].pid())?));
    let sleep_mem = mem_of(sleeper.pid())?;
    // Baseline for the gateways' own ping figures: raw UDP between two idle processes, spaced
    // out like health pings; it also gives the gateways a few more pings to report on.
    eprintln!("  cross-process UDP echo, {XPROC_N} round trips {XPROC_GAP:?} apart");
    let xproc = stats(cross_process_udp().await?)?;
    // What the gateways' own health pings measured meanwhile (multi_thread, 2 workers).
    let (client, doc) = first_status(&root.path().join("a"), Duration::from_secs(5)).await?;
    client.close().await;

    println!("\n### Gateway idle memory\n");
    println!(
        "Primary + 2 remotes joined to it (full mesh formed {} ms after the remotes were \
         spawned), health interval 1 s, then idle {} s. MB = MiB.\n",
        ms(formed),
        IDLE.as_secs()
    );
    println!("| process | VmRSS MB | RssAnon MB | RssFile MB | Pss MB | VmHWM MB | threads |");
    println!("|---|---:|---:|---:|---:|---:|---:|");
    for (name, m) in rows
        .iter()
        .chain([("`sleep 30` (baseline)", sleep_mem)].iter())
    {
        println!(
            "| {name} | {} | {} | {} | {} | {} | {} |",
            mb(m.rss),
            mb(m.anon),
            mb(m.file),
            mb(m.pss),
            mb(m.hwm),
            m.threads
        );
    }
    println!(
        "| classic OpenClaw gateway, idle main process (not measured here: median of \
         shared/docs/classic-protocol.md §11) | 597 | | | | | |"
    );
    let max_rss = rows.iter().map(|(_, m)| m.rss).max().unwrap_or(0);
    println!(
        "\nLargest gateway VmRSS: {} MB (goal < 15 MB: {}).",
        mb(max_rss),
        if max_rss < 15 * 1024 {
            "met"
        } else {
            "NOT met"
        }
    );
    println!(
        "\nIdle-link round trips between processes. Gateways: the health pings (QUIC datagram \
         Ping/Pong, one a second, tokio multi_thread with 2 workers in each gateway) as the \
         primary's `gateway.status` reports them (median and p99 over the pings so far, ~12). \
         Baseline: raw UDP echo between this process (tokio current_thread) and a second \
         process (blocking echo loop), {XPROC_N} round trips {} ms apart.\n",
        XPROC_GAP.as_millis()
    );
    println!("| link | p50 ms | p99 ms | p50 vs UDP |");
    println!("|---|---:|---:|---:|");
    println!(
        "| raw UDP echo, two processes (baseline) | {} | {} | 1.00x |",
        ms(xproc.p50),
        ms(xproc.p99)
    );
    for g in doc["gateways"].as_array().into_iter().flatten() {
        if g["isSelf"] == true {
            continue;
        }
        let p50 = g["latencyMs"].as_f64();
        println!(
            "| gateway a -> {} (QUIC datagram health ping) | {} | {} | {} |",
            g["name"].as_str().unwrap_or("?"),
            g["latencyMs"],
            g["latencyP99Ms"],
            p50.map_or("-".into(), |v| ratio(
                Duration::from_secs_f64(v / 1e3),
                xproc.p50
            ))
        );
    }
    sleeper.stop(Duration::from_secs(1))?;
    for mut gw in remotes.into_iter().chain([primary]) {
        gw.stop(Duration::from_secs(5))?;
    }
    root.close()?;
    Ok(())
}

/// Round trips of the cross-process UDP baseline.
const XPROC_N: usize = 25;
/// Pause between them.
const XPROC_GAP: Duration = Duration::from_millis(200);
/// Argument that turns this example into the UDP echo process of the baseline.
const ECHO_ARG: &str = "--udp-echo";

/// The echo process: prints its address, then echoes until killed.
fn udp_echo_process() -> Result<()> {
    use std::io::Write as _;
    let sock = std::net::UdpSocket::bind("127.0.0.1:0")?;
    let mut out = std::io::stdout();
    writeln!(out, "{}", sock.local_addr()?)?;
    out.flush()?;
    let mut buf = [0u8; 2048];
    loop {
        let (len, from) = sock.recv_from(&mut buf)?;
        sock.send_to(&buf[..len], from)?;
    }
}

/// Sparse UDP round trips to an echo in a second process (this example, re-executed).
async fn cross_process_udp() -> Result<Vec<Duration>> {
    use std::io::BufRead as _;
    let mut echo = Proc {
        child: Command::new(std::env::current_exe()?)
            .arg(ECHO_ARG)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .context("spawning the echo process")?,
        log: None,
    };
    let stdout = echo
        .child
        .stdout
        .take()
        .ok_or_else(|| anyhow!("echo process has no stdout"))?;
    let mut line = String::new();
    std::io::BufReader::new(stdout).read_line(&mut line)?;
    let addr: SocketAddr = line
        .trim()
        .parse()
        .with_context(|| format!("echo process said {line:?}"))?;
    let sock = UdpSocket::bind("127.0.0.1:0").await?;
    sock.connect(addr).await?;
    let mut buf = [0u8; 64];
    let mut rtts = Vec::with_capacity(XPROC_N);
    // One unmeasured round trip first.
    for i in 0..=XPROC_N as u64 {
        tokio::time::sleep(XPROC_GAP).await;
        let msg = i.to_be_bytes();
        let t = Instant::now();
        sock.send(&msg).await?;
        let got = tokio::time::timeout(RTT_TIMEOUT, async {
            loop {
                let len = sock.recv(&mut buf).await?;
                if buf[..len] == msg {
                    return Ok::<_, std::io::Error>(());
                }
            }
        })
        .await;
        let rtt = t.elapsed();
        if let Ok(r) = got {
            r?;
            if i > 0 {
                rtts.push(rtt);
            }
        }
    }
    echo.stop(Duration::from_secs(1))?;
    Ok(rtts)
}

// ---------------------------------------------------------------------------------------------
// 3. Start-to-ready

/// One start: (spawn to gateway.json, spawn to first gateway.status answer, SIGTERM to exit).
async fn one_start(bin: &Path, root: &Path, name: &str) -> Result<[Duration; 3]> {
    let dir = root.join(name);
    let _ = fs::remove_file(dir.join(clawmesh::state_dir::RUNTIME_FILE));
    let t0 = Instant::now();
    let mut gw = spawn_gateway(bin, root, name, &["--primary"])?;
    wait_runtime_file(&mut gw, &dir, Duration::from_secs(10))?;
    let t_file = t0.elapsed();
    let (client, _) = first_status(&dir, Duration::from_secs(10)).await?;
    let t_status = t0.elapsed();
    client.close().await;
    let t_stop = gw.stop(Duration::from_secs(5))?;
    Ok([t_file, t_status, t_stop])
}

fn spawn_floor(program: &Path, args: &[&str]) -> Result<Vec<Duration>> {
    let mut v = Vec::with_capacity(STARTS);
    for _ in 0..STARTS {
        let t = Instant::now();
        let status = Command::new(program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()?;
        v.push(t.elapsed());
        if !status.success() {
            bail!("{} {args:?} failed: {status}", program.display());
        }
    }
    Ok(v)
}

fn row(name: &str, v: Vec<Duration>) -> Result<String> {
    let s = stats(v)?;
    Ok(format!(
        "| {name} | {} | {} | {} | {} |",
        s.n,
        ms(s.p50),
        ms(s.mean),
        ms(s.max)
    ))
}

async fn bench_start(bin: &Path) -> Result<()> {
    let root = tempfile::tempdir()?;
    let true_floor = spawn_floor(Path::new("/bin/true"), &[])?;
    let version_floor = spawn_floor(bin, &["--version"])?;

    let (mut cold_file, mut cold_status, mut cold_stop) = (vec![], vec![], vec![]);
    for i in 0..STARTS {
        let [f, s, t] = one_start(bin, root.path(), &format!("cold{i}")).await?;
        cold_file.push(f);
        cold_status.push(s);
        cold_stop.push(t);
    }
    // The first start of "warm" creates its state; the timed ones reuse it.
    one_start(bin, root.path(), "warm").await?;
    let (mut warm_file, mut warm_status, mut warm_stop) = (vec![], vec![], vec![]);
    for _ in 0..STARTS {
        let [f, s, t] = one_start(bin, root.path(), "warm").await?;
        warm_file.push(f);
        warm_status.push(s);
        warm_stop.push(t);
    }

    // What the client costs against a gateway that is already up.
    let dir = root.path().join("warm");
    let mut gw = spawn_gateway(bin, root.path(), "warm", &["--primary"])?;
    wait_runtime_file(&mut gw, &dir, Duration::from_secs(10))?;
    first_status(&dir, Duration::from_secs(10))
        .await?
        .0
        .close()
        .await;
    let target = Target::Local(dir.clone());
    let (mut connect, mut call, mut close) = (vec![], vec![], vec![]);
    for _ in 0..STARTS {
        let t = Instant::now();
        let client = Client::connect(&target).await?;
        connect.push(t.elapsed());
        let t = Instant::now();
        client
            .call("gateway.status", json!({}), Duration::from_secs(2))
            .await
            .map_err(|e| anyhow!("{e}"))?;
        call.push(t.elapsed());
        let t = Instant::now();
        client.close().await;
        close.push(t.elapsed());
    }
    let dir_arg = dir.to_string_lossy().into_owned();
    let cli = spawn_floor(
        bin,
        &["gateway", "status", "--json", "--state-dir", &dir_arg],
    )?;
    gw.stop(Duration::from_secs(5))?;

    let p50_cold = stats(cold_status.clone())?.p50;
    let p50_warm = stats(warm_status.clone())?.p50;
    let max_cold = stats(cold_status.clone())?.max;
    let max_warm = stats(warm_status.clone())?.max;
    println!("\n### Gateway start-to-ready\n");
    println!(
        "Spawn of `clawmesh gateway run --primary --port 0` until `gateway.json` exists, and \
         until the first `gateway.status` over QUIC has been answered (library client: \
         `Client::connect` with the gateway's key + `call`; its close is not counted). \
         Polling every 0.1 ms (file) / 0.2 ms (status). ms.\n"
    );
    println!("| what | n | p50 ms | mean ms | max ms |");
    println!("|---|---:|---:|---:|---:|");
    println!(
        "{}",
        row("spawn + wait `/bin/true` (baseline)", true_floor)?
    );
    println!(
        "{}",
        row(
            "spawn + wait `clawmesh --version` (baseline)",
            version_floor
        )?
    );
    println!(
        "{}",
        row(
            "cold start (fresh state dir): gateway.json written",
            cold_file
        )?
    );
    println!(
        "{}",
        row("cold start: first gateway.status answered", cold_status)?
    );
    println!("{}", row("warm restart: gateway.json written", warm_file)?);
    println!(
        "{}",
        row("warm restart: first gateway.status answered", warm_status)?
    );
    println!(
        "{}",
        row("SIGTERM to exit (after one client, cold)", cold_stop)?
    );
    println!(
        "{}",
        row("SIGTERM to exit (after one client, warm)", warm_stop)?
    );
    println!(
        "| classic OpenClaw gateway, start to listening (not measured here: \
         shared/docs/classic-protocol.md §11) | | ~10 000 | | |"
    );
    println!("\nClient cost against a running gateway:\n");
    println!("| what | n | p50 ms | mean ms | max ms |");
    println!("|---|---:|---:|---:|---:|");
    println!(
        "{}",
        row("`Client::connect` (QUIC handshake + hello)", connect)?
    );
    println!("{}", row("`call(\"gateway.status\")`", call)?);
    println!("{}", row("`Client::close` (close + wait_idle)", close)?);
    println!(
        "{}",
        row("CLI `clawmesh gateway status --json` wall time", cli)?
    );
    let verdict = |d: Duration| {
        if d < Duration::from_millis(50) {
            "met"
        } else {
            "NOT met"
        }
    };
    println!(
        "\nStart-to-ready goal < 50 ms: cold p50 {} ms / max {} ms: {}; warm p50 {} ms / max {} ms: {}.",
        ms(p50_cold),
        ms(max_cold),
        verdict(max_cold),
        ms(p50_warm),
        ms(max_warm),
        verdict(max_warm)
    );
    root.close()?;
    Ok(())
}

// ---------------------------------------------------------------------------------------------

fn main() -> Result<()> {
    if std::env::args().nth(1).as_deref() == Some(ECHO_ARG) {
        return udp_echo_process();
    }
    let started = Instant::now();
    let bin = clawmesh_bin()?;
    println!("# bench_federation\n");
    println!(
        "binary: {}; logical CPUs: {}; load average at start: {}",
        bin.display(),
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        loadavg3()
    );

    for flavour in [Flavour::CurrentThread, Flavour::MultiThread] {
        eprintln!("link round trips, {} ...", flavour.name());
        let (hot, sparse) = bench_links(flavour)?;
        print_links(flavour, HOT, hot)?;
        print_links(flavour, SPARSE, sparse)?;
    }
    for flavour in [Flavour::CurrentThread, Flavour::MultiThread] {
        eprintln!("connection setup, {} ...", flavour.name());
        let (tcp, quic) = bench_setups(flavour)?;
        print_setups(flavour, tcp, quic)?;
    }

    // Driver for the process benchmarks: one thread; the gateways run their own runtimes.
    let rt = Flavour::CurrentThread.runtime()?;
    eprintln!("idle RSS of three gateways ...");
    rt.block_on(bench_idle_rss(&bin))?;
    eprintln!("start-to-ready ...");
    rt.block_on(bench_start(&bin))?;
    println!(
        "\nTotal benchmark time: {:.1} s; load average at end: {} (other work on this machine \
         skews every figure above)",
        started.elapsed().as_secs_f64(),
        loadavg3()
    );
    Ok(())
}
