//! On-demand benchmark of config write throughput (issue 18, group commit): how many
//! `config.set` writes a second the federation acknowledges with 1, 16 and 64 concurrent
//! writers, on loopback and over 45 ms paths through the WAN relay.
//!
//! Everything runs on 127.0.0.1 with real processes (release `clawmesh` binary): three gateways
//! `tokyo` (the configured primary), `beijing` and `frankfurt`, `--health-interval 1000`.
//!
//! * **loopback**: the gateways talk to each other directly on 127.0.0.1.
//! * **relay 45 ms**: every gateway-to-gateway datagram crosses the in-process WAN relay
//!   ([`clawmesh::sim::relay::WanRelay`], its own one-worker runtime), 45 ms round trip on every
//!   path (set before the gateways start). A UDP echo through the relay gives the path's raw
//!   round trip in the same run.
//!
//! Per case: W writers, each with its own operator connection
//! (`clawmesh::cli::client::Client`, QUIC on loopback, straight to the gateway), each keeping
//! D writes in flight (`config.set {"key":"bench.w<writer>s<slot>","value":<counter>}`, a new
//! one as soon as one returns) for [`RUN_FOR`] after [`WARMUP`]; counted: writes acknowledged
//! (`config.set` returned: committed on a majority, applied on the leader) within the window,
//! their latency, and errors. Writes go to tokyo (the leader) and, in a second series, to
//! beijing (a follower: forwarded to tokyo over the mesh).
//!
//! The upper bound of a closed loop: W × D writes in flight, each needing at least one round
//! trip to a majority, so at most W × D / RTT acknowledged writes a second (64 / 47.5 ms ≈
//! 1 350/s over the 45 ms relay with one write in flight per writer).
//!
//! Baseline in the same run: `BENCH_WRITES_BASE_BIN=/path/to/old/clawmesh` runs every case
//! with that binary too (before the new one, same machine, same relay).
//!
//! ```text
//! cargo build --release --bin clawmesh --example bench_writes
//! BENCH_WRITES_BASE_BIN=/tmp/clawmesh-before cargo run --release --example bench_writes
//! ```
//!
//! The benchmark client is this process, on a tokio `current_thread` runtime.

#[allow(dead_code)]
mod support;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use clawmesh::cli::client::{Client, Target};
use clawmesh::sim::relay::{PathSettings, WanRelay};
use futures_util::stream::{FuturesUnordered, StreamExt};
use futures_util::FutureExt as _;
use serde_json::json;
use support::{
    add_site, check_stop, clawmesh_cmd, lat_stats, loadavg3, relay_bench_main, relay_gateway_args,
    runtime_file, stop_all, udp_rtt, Echo, Lat, Machine, Proc,
};

const BENCH: &str = "bench_writes";

const NAMES: [&str; 3] = ["tokyo", "beijing", "frankfurt"];
const REGIONS: [&str; 3] = ["ap-northeast-1", "cn-north-1", "eu-central-1"];
const TOKYO: usize = 0;
const BEIJING: usize = 1;
/// Round trip of every gateway path in the relay case.
const RTT: Duration = Duration::from_millis(45);
/// Writers × writes in flight per writer, per case.
const CASES: [(usize, usize); 4] = [(1, 1), (16, 1), (64, 1), (64, 4)];
/// Writes before the counted window (connections and raft warm up).
const WARMUP: Duration = Duration::from_millis(700);
/// Counted window of one case.
const RUN_FOR: Duration = Duration::from_secs(3);
/// Deadline of one write (the gateway's own write timeout is 5 s).
const CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// Health ping interval; raft timings derive from it.
const HEALTH_INTERVAL_MS: &str = "1000";
/// Federation join secret.
const TOKEN: &str = "bench-writes-tok";

/// A port free for both UDP (QUIC) and TCP (the classic bridge on the same port) on loopback.
fn free_port(taken: &[u16]) -> Result<u16> {
    for _ in 0..100 {
        let udp = std::net::UdpSocket::bind("127.0.0.1:0")?;
        let port = udp.local_addr()?.port();
        if taken.contains(&port) {
            continue;
        }
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return Ok(port);
        }
    }
    bail!("no free UDP+TCP port found on 127.0.0.1")
}

/// The relay site prefix of a series (its directory's name).
fn site_tag(root: &Path) -> String {
    root.file_name()
        .map_or_else(String::new, |n| n.to_string_lossy().into_owned())
}

/// The three gateway processes; stopped on drop.
struct Cluster {
    dirs: Vec<PathBuf>,
    procs: Vec<Proc>,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        stop_all(&mut self.procs, Duration::from_secs(10));
    }
}

/// Starts three gateways under `root`; `relay`: behind the relay's sites, else direct.
async fn start_cluster(bin: &Path, root: &Path, relay: Option<&WanRelay>) -> Result<Cluster> {
    let mut ports = [0u16; 3];
    for i in 0..3 {
        ports[i] = free_port(&ports[..i])?;
    }
    let mut publics = Vec::new();
    for (i, name) in NAMES.iter().enumerate() {
        let direct = SocketAddr::from(([127, 0, 0, 1], ports[i]));
        match relay {
            Some(r) => {
                let p = add_site(r, &format!("{}-{name}", site_tag(root)), None).await?;
                publics.push(p);
            }
            None => publics.push(direct),
        }
    }
    if let Some(r) = relay {
        for a in 0..3 {
            for other in NAMES.iter().skip(a + 1) {
                r.set_path(
                    &format!("{}-{}", site_tag(root), NAMES[a]),
                    &format!("{}-{}", site_tag(root), other),
                    PathSettings::with_rtt(RTT),
                )?;
            }
            r.set_target(
                &format!("{}-{}", site_tag(root), NAMES[a]),
                SocketAddr::from(([127, 0, 0, 1], ports[a])),
            )?;
        }
    }
    let mut cluster = Cluster {
        dirs: NAMES.iter().map(|n| root.join(n)).collect(),
        procs: Vec::new(),
    };
    for i in 0..3 {
        let args = relay_gateway_args(
            (NAMES[i], REGIONS[i]),
            ports[i],
            publics[i],
            TOKEN,
            HEALTH_INTERVAL_MS,
            (i != TOKYO).then_some(publics[TOKYO]),
        );
        let proc = Proc::spawn(
            NAMES[i],
            clawmesh_cmd(bin, &cluster.dirs[i], &args),
            &root.join(format!("{}.log", NAMES[i])),
        )?;
        let pid = proc.pid();
        cluster.procs.push(proc);
        let t = Instant::now();
        // A start takes well under a second; 30 s covers a loaded machine.
        while runtime_file(&cluster.dirs[i], pid).is_none() {
            check_stop()?;
            cluster.procs[i].ensure_running()?;
            if t.elapsed() > Duration::from_secs(30) {
                bail!("{} wrote no gateway.json within 30 s", NAMES[i]);
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    Ok(cluster)
}

async fn connect(dir: &Path) -> Result<Client> {
    Client::connect(&Target::Local(dir.to_path_buf()))
        .await
        .with_context(|| format!("operator connection to {}", dir.display()))
}

/// Waits until every gateway sees tokyo as the primary of three voters.
async fn wait_steady(cluster: &Cluster) -> Result<()> {
    let mut clients = Vec::new();
    for d in &cluster.dirs {
        clients.push(connect(d).await?);
    }
    let t = Instant::now();
    loop {
        check_stop()?;
        let mut ok = true;
        for c in &clients {
            let s = c
                .call("gateway.status", json!({}), CALL_TIMEOUT)
                .await
                .map_err(|e| anyhow!("gateway.status: {e}"))?;
            let cons = &s["consensus"];
            ok &= cons["leader"] == "tokyo"
                && cons["voters"].as_array().is_some_and(|v| v.len() == 3)
                && cons["quorum"] == true;
        }
        if ok {
            return Ok(());
        }
        if t.elapsed() > Duration::from_secs(60) {
            bail!("no steady federation (tokyo primary, three voters) within 60 s");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// One case's result.
struct CaseResult {
    writers: usize,
    depth: usize,
    origin: &'static str,
    acked: usize,
    per_sec: f64,
    lat: Option<Lat>,
    errors: usize,
    first_error: Option<String>,
}

/// W writers × D in flight on gateway `origin` for the window; see the module doc.
async fn run_case(
    cluster: &Cluster,
    origin: usize,
    writers: usize,
    depth: usize,
) -> Result<CaseResult> {
    let mut clients = Vec::new();
    for _ in 0..writers {
        clients.push(connect(&cluster.dirs[origin]).await?);
    }
    let start = Instant::now();
    let window = (start + WARMUP, start + WARMUP + RUN_FOR);
    let mut tasks = FuturesUnordered::new();
    for (w, client) in clients.iter().enumerate() {
        tasks.push(async move {
            let mut lat = Vec::new();
            let mut errors = 0usize;
            let mut first_error = None;
            let mut inflight = FuturesUnordered::new();
            let mut counter = 0u64;
            let issue = |slot: usize, counter: u64| async move {
                let t = Instant::now();
                let r = client
                    .call(
                        "config.set",
                        json!({"key": format!("bench.w{w}s{slot}"), "value": counter}),
                        CALL_TIMEOUT,
                    )
                    .await;
                (slot, t, Instant::now(), r)
            };
            for slot in 0..depth {
                counter += 1;
                inflight.push(issue(slot, counter));
            }
            while let Some((slot, t, done, r)) = inflight.next().await {
                let counted = t >= window.0 && done <= window.1;
                match r {
                    Ok(_) if counted => lat.push(done - t),
                    Ok(_) => {}
                    Err(e) => {
                        errors += 1;
                        first_error.get_or_insert_with(|| e.to_string());
                    }
                }
                if Instant::now() < window.1 && check_stop().is_ok() {
                    counter += 1;
                    inflight.push(issue(slot, counter));
                }
            }
            (lat, errors, first_error)
        });
    }
    let mut lat = Vec::new();
    let mut errors = 0;
    let mut first_error = None;
    while let Some((l, e, f)) = tasks.next().await {
        lat.extend(l);
        errors += e;
        if first_error.is_none() {
            first_error = f;
        }
    }
    check_stop()?;
    let acked = lat.len();
    Ok(CaseResult {
        writers,
        depth,
        origin: NAMES[origin],
        acked,
        per_sec: acked as f64 / RUN_FOR.as_secs_f64(),
        lat: lat_stats(&mut lat).ok(),
        errors,
        first_error,
    })
}

/// Results of one binary in one network setting.
struct Series {
    binary: String,
    network: String,
    load: String,
    cases: Vec<CaseResult>,
}

struct Report {
    relay_echo: Lat,
    series: Vec<Series>,
}

async fn run_series(
    bin: &Path,
    label: &str,
    root: &Path,
    relay: Option<&WanRelay>,
) -> Result<Series> {
    let network = if relay.is_some() {
        "relay 45 ms"
    } else {
        "loopback"
    };
    eprintln!("{label}, {network}: starting three gateways");
    std::fs::create_dir_all(root)?;
    let cluster = start_cluster(bin, root, relay).await?;
    wait_steady(&cluster).await?;
    let load = loadavg3();
    let mut cases = Vec::new();
    for origin in [TOKYO, BEIJING] {
        for (w, d) in CASES {
            eprintln!("  {w} writers × {d} in flight on {}", NAMES[origin]);
            let r = run_case(&cluster, origin, w, d).await?;
            eprintln!(
                "    {:.0} writes/s, p50 {:.1} ms, errors {}",
                r.per_sec,
                r.lat.map_or(f64::NAN, |l| l.p50),
                r.errors
            );
            cases.push(r);
        }
    }
    drop(cluster);
    Ok(Series {
        binary: label.into(),
        network: network.into(),
        load,
        cases,
    })
}

async fn run(bin: &Path, root: &Path, relay: &WanRelay) -> Result<Report> {
    let echo = Echo::start()?;
    let echo_public = add_site(relay, "echo", Some(echo.addr)).await?;
    relay.set_default("echo", PathSettings::with_rtt(RTT))?;
    let relay_echo = udp_rtt(echo_public, 20, 2).await?;
    drop(echo);
    let mut bins: Vec<(String, PathBuf)> = Vec::new();
    if let Some(base) = std::env::var_os(support::bench_env("BASE_BIN")) {
        bins.push(("baseline".into(), PathBuf::from(base)));
    }
    bins.push(("this build".into(), bin.to_path_buf()));
    let mut series = Vec::new();
    for (n, (label, b)) in bins.iter().enumerate() {
        for (m, r) in [None, Some(relay)].into_iter().enumerate() {
            let dir = root.join(format!("b{n}n{m}"));
            series.push(run_series(b, label, &dir, r).boxed_local().await?);
        }
    }
    Ok(Report { relay_echo, series })
}

fn print(r: &Report, machine: &Machine, started: &str, secs: f64) {
    println!("## bench_writes, {started}, {secs:.0} s");
    println!();
    for (k, v) in machine {
        println!("- {k}: {v}");
    }
    println!(
        "- relay alone (UDP echo, 100 B, n = {}): p50 {:.1} ms",
        r.relay_echo.n, r.relay_echo.p50
    );
    println!();
    println!("| binary | network | load (1/5/15) | writes on | writers × in flight | acked writes/s | p50 | p99 | errors |");
    println!("|---|---|---|---|---|---|---|---|---|");
    for s in &r.series {
        for c in &s.cases {
            let (p50, p99) = c.lat.map_or(("–".into(), "–".into()), |l| {
                (format!("{:.1} ms", l.p50), format!("{:.1} ms", l.p99))
            });
            println!(
                "| {} | {} | {} | {} | {} × {} | {:.0} | {} | {} | {}{} |",
                s.binary,
                s.network,
                s.load,
                c.origin,
                c.writers,
                c.depth,
                c.per_sec,
                p50,
                p99,
                c.errors,
                c.first_error
                    .as_ref()
                    .map(|e| format!(" ({e})"))
                    .unwrap_or_default()
            );
            let _ = c.acked;
        }
    }
}

fn main() -> Result<()> {
    relay_bench_main(
        |bin, root, relay| run(bin, root, relay).boxed_local(),
        print,
    )
}
