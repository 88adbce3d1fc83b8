//! On-demand benchmark of seeing the fleet (issue 16): what one `/metrics` scrape costs a
//! gateway with 10 000 attached nodes, and what host vitals add to the health traffic.
//!
//! 1. **Scrape cost.** Starts a release `clawmesh gateway run --primary --port 0` (default
//!    10 s health interval) whose state dir was seeded with `--nodes` (default 10 000) paired
//!    node devices (`Registry::apply`, the federation-sync path, as `bench_bridge` does). The
//!    baseline is measured first, on the same gateway with no node attached: `--scrapes`
//!    (default 30) sequential `GET /metrics` over loopback (HTTP/1.1, one connection each):
//!    latency p50 / p90 / max, response bytes, and the gateway's CPU time per scrape (from
//!    `/proc/PID/stat` across all the scrapes). Then every device attaches as a native QUIC
//!    node from this process (a client UDP socket per 250 nodes, each connection with its own device key,
//!    50 handshakes at a time, each retried up to 5 times on a loaded machine), each running
//!    the node host's own health loop (`liveness::monitor`, pings at half the gateway's
//!    interval, vitals with the first ping and every 6th after it) from one shared vitals
//!    sampler; once the gateway exports the vitals of all of them (or their count stops
//!    growing: the table says how many), the same scrapes again. The gateway's RSS beside each.
//! 2. **Vitals in the health traffic.** Two QUIC endpoints in this process on 127.0.0.1, each
//!    side running the health loop at `--interval-ms` (default 50) for `--intervals` (default
//!    400) intervals; the bytes and UDP datagrams the pinging side sent (quinn's own
//!    connection counters, so QUIC headers, AEAD tags and ACK-only packets count), per
//!    interval: without vitals (the baseline) and with vitals every 3 pings, as a gateway
//!    sends them, both pairs running at the same time. Also the postcard size of a ping and of
//!    a real vitals datagram.
//!
//! ```text
//! cargo build --release --bin clawmesh --example bench_metrics
//! cargo run --release --example bench_metrics
//! cargo run --release --example bench_metrics -- --nodes 2000 --scrapes 10
//! ```

#[path = "support/mod.rs"]
#[allow(dead_code)]
mod support;

const BENCH: &str = "bench_metrics";

/// Simulated nodes sharing one client UDP socket.
const NODES_PER_SOCKET: usize = 250;

/// One node's handshake and hello each: a loaded machine is slow, a lost one is retried.
const HELLO_TIMEOUT: Duration = Duration::from_secs(20);

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use clawmesh_federation::endpoint::{self, TransportOptions};
use clawmesh_federation::health::HealthConfig;
use clawmesh_federation::identity::DeviceIdentity;
use clawmesh_federation::liveness::{self, Liveness, SendVitals};
use clawmesh_federation::vitals::{VitalsSampler, VITALS_EVERY};
use clawmesh_federation::wire::Datagram;
use futures_util::StreamExt as _;
use support::*;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

fn arg(name: &str, default: usize) -> usize {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() -> Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(run())
}

struct Scrapes {
    lat: Lat,
    bytes: usize,
    cpu_ms_per_scrape: f64,
    node_series: usize,
    attached: usize,
}

/// One `GET /metrics` over a fresh loopback connection: the body.
async fn scrape(port: u16) -> Result<String> {
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        .await?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await?;
    let text = String::from_utf8(buf)?;
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| anyhow!("no HTTP header"))?;
    if !head.starts_with("HTTP/1.1 200") {
        bail!("scrape: {head}");
    }
    Ok(body.to_string())
}

fn node_series(body: &str) -> usize {
    body.lines()
        .filter(|l| l.starts_with("clawmesh_host_uptime_seconds{kind=\"node\""))
        .count()
}

async fn scrapes(port: u16, pid: i32, n: usize) -> Result<Scrapes> {
    scrape(port).await?; // warm-up
    let mut lat = Vec::with_capacity(n);
    let mut bytes = 0;
    let mut series = 0;
    let mut attached = 0;
    let cpu0 = cpu_ticks(pid);
    for _ in 0..n {
        let t = Instant::now();
        let body = scrape(port).await?;
        lat.push(t.elapsed());
        bytes = body.len();
        series = node_series(&body);
        attached = body
            .lines()
            .find_map(|l| l.strip_prefix("clawmesh_nodes_attached{transport=\"quic\"} "))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0);
    }
    let ticks = cpu_ticks(pid) - cpu0;
    Ok(Scrapes {
        lat: lat_stats(&mut lat)?,
        bytes,
        // Clock ticks are 10 ms on Linux (USER_HZ 100).
        cpu_ms_per_scrape: ticks as f64 * 10.0 / n as f64,
        node_series: series,
        attached,
    })
}

/// Attaches every identity as a native node; returns the connections (kept open).
async fn attach(
    ids: Arc<Vec<DeviceIdentity>>,
    addr: SocketAddr,
    sampler: VitalsSampler,
) -> Result<Vec<quinn::Connection>> {
    let opts = TransportOptions::default();
    // One client socket per 250 nodes: a single socket's receive buffer overflowed on a
    // loaded machine (pongs lost, nodes closed as unresponsive).
    let eps: Vec<quinn::Endpoint> = (0..ids.len().div_ceil(NODES_PER_SOCKET))
        .map(|_| endpoint::client(&ids[0], addr, &opts))
        .collect::<Result<_, _>>()?;
    let conns = futures_util::stream::iter(0..ids.len())
        .map(|i| {
            let ep = eps[i / NODES_PER_SOCKET].clone();
            let (ids, sampler) = (ids.clone(), sampler.clone());
            async move {
                // A loaded machine may let a handshake or hello time out: retry it.
                let mut tries = 0;
                loop {
                    let name = format!("node-{i:05}");
                    match attach_native_node(&ep, addr, &ids[i], name, &sampler, HELLO_TIMEOUT)
                        .await
                    {
                        Ok(c) => return anyhow::Ok(c),
                        Err(e) if tries >= 5 => return Err(e),
                        Err(_) => tries += 1,
                    }
                    sleep(Duration::from_millis(200)).await?;
                }
            }
        })
        .buffer_unordered(50)
        .collect::<Vec<_>>()
        .await;
    conns.into_iter().collect()
}

async fn scrape_phase(nodes: usize, n_scrapes: usize) -> Result<()> {
    let bin = clawmesh_bin()?;
    let tmp = tempfile::Builder::new().prefix(BENCH).tempdir()?;
    let gw_dir = tmp.path().join("gw");
    std::fs::create_dir_all(&gw_dir)?;
    let t = Instant::now();
    let ids: Arc<Vec<DeviceIdentity>> =
        Arc::new((0..nodes).map(|_| DeviceIdentity::ephemeral()).collect());
    seed_paired_nodes(&gw_dir, &ids, (0, nodes), |i| format!("node-{i:05}"), "{}")?;
    println!(
        "seeded {nodes} paired devices in {:.1} s",
        t.elapsed().as_secs_f64()
    );
    let cmd = clawmesh_cmd(
        &bin,
        &gw_dir,
        &[
            "gateway",
            "run",
            "--name",
            "bench",
            "--primary",
            "--port",
            "0",
        ],
    );
    let mut gw = Proc::spawn("gateway", cmd, &tmp.path().join("gw.log"))?;
    let pid = gw.pid();
    let rt = poll(
        "gateway.json",
        Duration::from_secs(20),
        Duration::from_millis(50),
        || {
            let v = runtime_file(&gw_dir, pid);
            async move { Ok(v) }
        },
    )
    .await?;
    let quic: SocketAddr = rt["quic"]
        .as_str()
        .ok_or_else(|| anyhow!("no quic address"))?
        .parse()?;
    let port = quic.port();
    // The consensus forms in a moment on a lone primary; let the start-up settle.
    sleep(Duration::from_secs(3)).await?;
    let base = scrapes(port, pid, n_scrapes).await?;
    let rss0 = status_field(pid, "VmRSS").unwrap_or(0);

    let t = Instant::now();
    let sampler = VitalsSampler::new(tmp.path());
    let conns = attach(ids.clone(), quic, sampler).await?;
    println!(
        "attached {} nodes in {:.1} s",
        conns.len(),
        t.elapsed().as_secs_f64()
    );
    // Every node's vitals, or as many as arrive: a node whose first vitals datagram was lost
    // sends the next 30 s later, and one the gateway closed for missed pings on a loaded
    // machine does not come back here. Wait until all are in or the count stops growing.
    let (mut last, mut since) = (0, Instant::now());
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(150) {
        let n = node_series(&scrape(port).await?);
        if n == nodes || (n == last && since.elapsed() > Duration::from_secs(40)) {
            break;
        }
        if n != last {
            (last, since) = (n, Instant::now());
        }
        sleep(Duration::from_secs(1)).await?;
    }
    sleep(Duration::from_secs(2)).await?;
    let full = scrapes(port, pid, n_scrapes).await?;
    let mut closed: std::collections::BTreeMap<String, usize> = Default::default();
    for c in &conns {
        if let Some(r) = c.close_reason() {
            *closed.entry(r.to_string()).or_default() += 1;
        }
    }
    println!("connections closed before the scrapes: {closed:?}");
    let rss1 = status_field(pid, "VmRSS").unwrap_or(0);
    gw.ensure_running().context("the gateway died")?;

    println!(
        "\n## /metrics scrape, one gateway ({} scrapes each)\n",
        n_scrapes
    );
    println!("| nodes attached (gauge) | node vitals series | body | p50 | p90 | max | gateway CPU per scrape | gateway RSS |");
    println!("|---|---|---|---|---|---|---|---|");
    for (s, rss) in [(&base, rss0), (&full, rss1)] {
        println!(
            "| {} | {} | {:.1} KiB | {} | {} | {} | {:.1} ms | {} |",
            s.attached,
            s.node_series,
            s.bytes as f64 / 1024.0,
            ms_text(s.lat.p50, 2),
            ms_text(s.lat.p90, 2),
            ms_text(s.lat.max, 2),
            s.cpu_ms_per_scrape,
            mb(rss),
        );
    }
    for c in &conns {
        c.close(0u32.into(), b"bench done");
    }
    gw.stop(Duration::from_secs(5));
    Ok(())
}

/// Bytes and datagrams the pinging side sends per interval, with or without vitals.
async fn health_bytes(interval: Duration, intervals: u32, vitals: bool) -> Result<(f64, f64)> {
    let (a_id, b_id) = (DeviceIdentity::ephemeral(), DeviceIdentity::ephemeral());
    let opts = TransportOptions::default();
    let a = endpoint::bind(&a_id, "127.0.0.1:0".parse()?, &opts)?;
    let b = endpoint::bind(&b_id, "127.0.0.1:0".parse()?, &opts)?;
    let b_addr = b.local_addr()?;
    let accept = tokio::spawn(async move {
        let inc = b.accept().await.ok_or_else(|| anyhow!("no incoming"))?;
        anyhow::Ok((endpoint::accept(inc).await?, b))
    });
    let ca = endpoint::dial(&a, b_addr, Duration::from_secs(5)).await?;
    let (cb, _b) = accept.await??;
    let cfg = HealthConfig {
        interval,
        unhealthy_threshold: 1000,
    };
    let send = vitals.then(|| SendVitals {
        sampler: VitalsSampler::new(Path::new("/")),
        every: VITALS_EVERY,
    });
    let ta = tokio::spawn(liveness::monitor(
        ca.clone(),
        cfg,
        Liveness::default(),
        send,
    ));
    let tb = tokio::spawn(liveness::monitor(
        cb.clone(),
        cfg,
        Liveness::default(),
        None,
    ));
    // Let the handshake's packets and the first ACKs pass before counting.
    sleep(interval * 5).await?;
    let s0 = ca.stats().udp_tx;
    sleep(interval * intervals).await?;
    let s1 = ca.stats().udp_tx;
    ta.abort();
    tb.abort();
    ca.close(0u32.into(), b"done");
    let n = f64::from(intervals);
    Ok((
        (s1.bytes - s0.bytes) as f64 / n,
        (s1.datagrams - s0.datagrams) as f64 / n,
    ))
}

async fn run() -> Result<()> {
    install_ctrl_c();
    let nodes = arg("--nodes", 10_000);
    let n_scrapes = arg("--scrapes", 30);
    let interval = Duration::from_millis(arg("--interval-ms", 50) as u64);
    let intervals = arg("--intervals", 400) as u32;
    println!("# {BENCH}\n");
    for (k, v) in machine_with_load() {
        println!("- {k}: {v}");
    }
    let ping = clawmesh_federation::frame::encode_datagram(&Datagram::Ping { seq: 1_000_000 })?;
    let here = VitalsSampler::new(Path::new("/")).current();
    let vit = clawmesh_federation::frame::encode_datagram(&Datagram::Vitals(here))?;
    println!(
        "\npostcard sizes: ping {} B, vitals {} B (at most {} B of vitals)",
        ping.len(),
        vit.len(),
        clawmesh_federation::vitals::MAX_ENCODED + 1
    );

    println!(
        "\n## Health traffic, pinging side, {intervals} intervals of {} ms\n",
        interval.as_millis()
    );
    println!("| run | bytes per interval | datagrams per interval |");
    println!("|---|---|---|");
    // Both at once, so the machine's load falls on both alike.
    let (without, with) = tokio::join!(
        health_bytes(interval, intervals, false),
        health_bytes(interval, intervals, true)
    );
    for (what, r) in [
        ("baseline: pings only", without?),
        ("with vitals every 3 pings", with?),
    ] {
        println!("| {what} | {:.1} | {:.2} |", r.0, r.1);
    }
    if nodes > 0 {
        scrape_phase(nodes, n_scrapes).await?;
    }
    Ok(())
}
