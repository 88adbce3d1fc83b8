//! On-demand benchmark of log shipping (issue 15): how many records a second one remote ships
//! to the collector across a 45 ms path with nothing lost, how fast the collector takes three
//! remotes at once, what a record costs on the wire, and what one log call costs the thread
//! that logs.
//!
//! In one process, with the library's real parts (`clawmesh_federation::logs`): each remote
//! has its own spool (`logspool.db` in a temp dir), its own `Shipper` and its own QUIC endpoint
//! (device certificates, the mesh's transport settings); the collector has its store
//! (`logstore.db`, fsynced per batch) behind a QUIC endpoint that serves `logs.cursor` and
//! `logs.push` with `logs::service::answer`, the function the gateway's log service calls.
//! Every datagram between a remote and the collector crosses the in-process WAN relay
//! (`clawmesh::sim::relay::WanRelay`) at 45 ms round trip, so the relay's payload bytes are what a
//! record costs on the wire (QUIC, TLS, postcard, deflate, base64 and acks included).
//!
//! 1. **One remote, 45 ms.** A producer thread appends N = 1 000 000 records (a typical gateway
//!    line: target `clawmesh::gateway`, ~80 bytes of message with fields) to the spool in
//!    chunks of 8 192 (what the hand-off's writer thread does) as fast as it can; the shipper
//!    (batch cap 16 384 records or 2 MiB) ships meanwhile. Measured: from the first append
//!    until the collector's cursor says N and a query counts N rows: records/s. Baseline in
//!    the same run: the spool's append rate alone (no shipping) and one `logs.push` round trip
//!    of an empty batch (the path's floor). Three rounds, median.
//! 2. **Three remotes at once**, each N/3 records, same path: collector ingest records/s.
//! 3. **Bytes per record on the wire**: relay payload bytes, both directions, of round 1 / N.
//! 4. **Cost of one log call on the caller's thread**: `tracing::info!` with two fields under
//!    a subscriber with a `fmt` layer writing to a sink (the gateway's usual stderr logger,
//!    shipping off) beside the same subscriber plus the `SpoolLayer` (shipping on: format,
//!    hand-off `try_send`; the writer thread appends meanwhile). 20 rounds of 20 000 calls,
//!    median ns per call; the hand-off's overflow count is reported (records that did not
//!    make it into the spool).
//!
//! Run: `cargo run --release --example bench_logs`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use clawmesh::sim::relay::{PathSettings, WanRelay};
use clawmesh_federation::endpoint::{self, TransportOptions};
use clawmesh_federation::identity::DeviceIdentity;
use clawmesh_federation::logs::collector::{Collector, Query, StoreLimits};
use clawmesh_federation::logs::layer::{start_writer, SpoolLayer, HANDOFF_CAPACITY};
use clawmesh_federation::logs::record::{now_ms, Entry, Level};
use clawmesh_federation::logs::service::{answer, RemoteDestination};
use clawmesh_federation::logs::ship::{Destination, Router, ShipConfig, Shipper};
use clawmesh_federation::logs::spool::{Spool, SpoolLimits};
use clawmesh_federation::rpc::{self, BoxFuture, Caller, CallerKind, Handler};
use clawmesh_federation::wire::{Request, WireError};

const BENCH: &str = "bench_logs";

/// Records of round 1 (and in total across the three remotes of round 2).
const N: u64 = 1_000_000;
/// The path's round trip.
const RTT: Duration = Duration::from_millis(45);
/// Rounds per measurement.
const ROUNDS: usize = 3;
/// A round that has not delivered everything within this is a failure (an outage, not slow).
const ROUND_DEADLINE: Duration = Duration::from_secs(120);

fn line(i: u64) -> Entry {
    Entry {
        ts_ms: now_ms(),
        level: Level::Info,
        node: None,
        target: "clawmesh::gateway::methods".into(),
        message: format!(
            "node.invoke done req_id={i} peer=127.0.0.1:40{:03} node=build-{} ms=12",
            i % 1000,
            i % 17
        ),
        audit: None,
    }
}

/// Serves `logs.*` from the collector's store (what the gateway's log service does once it
/// has checked it is the primary).
struct Serve(Collector);

impl Handler for Serve {
    fn handle(&self, _caller: Caller, req: Request) -> BoxFuture<Result<String, WireError>> {
        let c = self.0.clone();
        Box::pin(async move { answer(&c, &req).await })
    }
}

struct Fixed(Arc<dyn Destination>);

impl Router for Fixed {
    fn route(&self) -> Option<(String, Arc<dyn Destination>)> {
        Some(("collector".into(), self.0.clone()))
    }
}

struct CollectorSide {
    collector: Collector,
    ep: quinn::Endpoint,
    public: SocketAddr,
    _dir: tempfile::TempDir,
}

async fn start_collector(relay: &WanRelay) -> Result<CollectorSide> {
    let dir = tempfile::tempdir()?;
    let collector = Collector::open(dir.path(), StoreLimits::default())?;
    let id = DeviceIdentity::ephemeral();
    let ep = endpoint::bind(&id, "127.0.0.1:0".parse()?, &TransportOptions::default())?;
    let real = ep.local_addr()?;
    let public = relay.add_site("collector", Some(real)).await?;
    let handler: Arc<dyn Handler> = Arc::new(Serve(collector.clone()));
    let ep2 = ep.clone();
    tokio::spawn(async move {
        while let Some(inc) = ep2.accept().await {
            let handler = handler.clone();
            tokio::spawn(async move {
                let Ok(conn) = inc.await else { return };
                let caller = Caller {
                    key: endpoint::peer_key(&conn),
                    kind: CallerKind::Gateway {
                        name: "remote".into(),
                    },
                    remote: conn.remote_address(),
                };
                rpc::serve(conn, caller, handler).await;
            });
        }
    });
    Ok(CollectorSide {
        collector,
        ep,
        public,
        _dir: dir,
    })
}

struct Remote {
    spool: Spool,
    shipper: Shipper,
    conn: quinn::Connection,
    _ep: quinn::Endpoint,
    _dir: tempfile::TempDir,
}

async fn start_remote(relay: &WanRelay, name: &str, to: SocketAddr) -> Result<Remote> {
    let dir = tempfile::tempdir()?;
    let spool = Spool::open(dir.path(), SpoolLimits::default())?;
    let id = DeviceIdentity::ephemeral();
    let ep = endpoint::bind(&id, "127.0.0.1:0".parse()?, &TransportOptions::default())?;
    relay.add_site(name, Some(ep.local_addr()?)).await?;
    relay.set_path(name, "collector", PathSettings::with_rtt(RTT))?;
    let conn = endpoint::dial(&ep, to, Duration::from_secs(5)).await?;
    let c2 = conn.clone();
    let dest: Arc<dyn Destination> = Arc::new(RemoteDestination::new(
        "collector",
        Arc::new(move || Some(c2.clone())),
    ));
    let cfg = ShipConfig {
        // Batches leave when full (the spool wakes the shipper); the interval only matters
        // for the tail, which the bench flushes itself.
        interval: Duration::from_millis(200),
        ..ShipConfig::new(name)
    };
    let shipper = Shipper::spawn(spool.clone(), Arc::new(Fixed(dest)), cfg);
    Ok(Remote {
        spool,
        shipper,
        conn,
        _ep: ep,
        _dir: dir,
    })
}

/// Appends `n` records to `spool` in chunks of 8 192, from a thread of its own.
fn produce(spool: Spool, gateway: String, n: u64) -> std::thread::JoinHandle<Result<()>> {
    std::thread::spawn(move || {
        let mut i = 0;
        while i < n {
            let k = (n - i).min(8192);
            spool.append(&gateway, (i..i + k).map(line).collect())?;
            i += k;
        }
        Ok(())
    })
}

fn held(c: &Collector, origin: &str) -> Result<u64> {
    Ok(c.cursor()?
        .held
        .into_iter()
        .find(|(o, _)| o == origin)
        .map(|(_, h)| h)
        .unwrap_or(0))
}

fn rows(c: &Collector, origin: &str) -> Result<u64> {
    // One answer holds at most 100 000 records: page through by store position.
    let mut n = 0u64;
    let mut after = 0i64;
    loop {
        let r = c.query_now(&Query {
            gateway: Some(origin.into()),
            after_id: Some(after),
            limit: 100_000,
            ..Query::default()
        })?;
        if r.records.is_empty() {
            return Ok(n);
        }
        n += r.records.len() as u64;
        after = r.records.last().map(|s| s.id).unwrap_or(after);
    }
}

async fn wait_held(c: &Collector, origins: &[(String, u64)], remotes: &[&Remote]) -> Result<()> {
    let start = Instant::now();
    loop {
        let mut done = true;
        for (o, n) in origins {
            if held(c, o)? < *n {
                done = false;
            }
        }
        if done {
            return Ok(());
        }
        if start.elapsed() > ROUND_DEADLINE {
            bail!("not delivered within {ROUND_DEADLINE:?}");
        }
        for r in remotes {
            r.shipper.flush();
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    if v.is_empty() {
        return f64::NAN;
    }
    v[v.len() / 2]
}

fn spool_append_rate() -> Result<f64> {
    let dir = tempfile::tempdir()?;
    let spool = Spool::open(dir.path(), SpoolLimits::default())?;
    let t = Instant::now();
    produce(spool, "baseline".into(), N / 2)
        .join()
        .map_err(|_| anyhow!("producer panicked"))??;
    Ok((N / 2) as f64 / t.elapsed().as_secs_f64())
}

async fn push_floor(conn: &quinn::Connection) -> Result<f64> {
    let dest = RemoteDestination::new("collector", {
        let c = conn.clone();
        Arc::new(move || Some(c.clone()))
    });
    let mut v = Vec::new();
    for _ in 0..20 {
        let t = Instant::now();
        dest.cursor().await?;
        v.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    Ok(median(&mut v))
}

fn call_cost() -> Result<(f64, f64, u64, u64)> {
    use tracing_subscriber::layer::SubscriberExt;
    const CALLS: usize = 20_000;
    const REPS: usize = 20;
    let bench = |dispatch: &tracing::Dispatch| -> f64 {
        let mut v = Vec::new();
        tracing::dispatcher::with_default(dispatch, || {
            for _ in 0..REPS {
                let t = Instant::now();
                for i in 0..CALLS {
                    tracing::info!(req_id = i, peer = "127.0.0.1:4000", "node.invoke done");
                }
                v.push(t.elapsed().as_nanos() as f64 / CALLS as f64);
                // Let the writer drain between rounds, as between bursts in a gateway.
                std::thread::sleep(Duration::from_millis(20));
            }
        });
        median(&mut v)
    };
    let off = tracing::Dispatch::new(
        tracing_subscriber::registry().with(
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::sink)
                .with_ansi(false),
        ),
    );
    let dir = tempfile::tempdir()?;
    let spool = Spool::open(dir.path(), SpoolLimits::default())?;
    let handoff = start_writer(spool.clone(), "bench", HANDOFF_CAPACITY)?;
    let on = tracing::Dispatch::new(
        tracing_subscriber::registry()
            .with(
                tracing_subscriber::fmt::layer()
                    .with_writer(std::io::sink)
                    .with_ansi(false),
            )
            .with(SpoolLayer::new(handoff.clone(), Level::Info)),
    );
    let a = bench(&off);
    let b = bench(&on);
    std::thread::sleep(Duration::from_secs(2));
    let over: u64 = spool.drops().iter().map(|d| d.overflow_dropped).sum();
    Ok((a, b, handoff.offered(), over))
}

async fn run() -> Result<()> {
    println!("# {BENCH}: log shipping (issue 15)\n");
    println!(
        "machine: {} CPUs, {}",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0),
        std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .trim()
    );
    let relay = WanRelay::start().await?;
    let col = start_collector(&relay).await?;

    // Baselines.
    let append = tokio::task::spawn_blocking(spool_append_rate).await??;
    println!("baseline: spool append alone {:.0} records/s", append);

    // 1. One remote.
    let mut rates = Vec::new();
    let mut bytes_per = Vec::new();
    for round in 0..ROUNDS {
        let name = format!("remote{round}");
        let r = start_remote(&relay, &name, col.public).await?;
        if round == 0 {
            let floor = push_floor(&r.conn).await?;
            println!("baseline: logs.cursor round trip across the path, median {floor:.1} ms");
        }
        let before = relay.stats().pair(&name, "collector");
        let t = Instant::now();
        let p = produce(r.spool.clone(), name.clone(), N);
        wait_held(&col.collector, &[(name.clone(), N)], &[&r]).await?;
        let secs = t.elapsed().as_secs_f64();
        p.join().map_err(|_| anyhow!("producer panicked"))??;
        let after = relay.stats().pair(&name, "collector");
        let n_rows = rows(&col.collector, &name)?;
        if n_rows != N {
            bail!("{name}: {n_rows} rows stored, {N} sent");
        }
        let dup = r
            .shipper
            .stats()
            .duplicates
            .load(std::sync::atomic::Ordering::Relaxed);
        let batches = r
            .shipper
            .stats()
            .batches
            .load(std::sync::atomic::Ordering::Relaxed);
        let wire = after.bytes.saturating_sub(before.bytes);
        println!(
            "round {round}: {N} records in {secs:.2} s = {:.0}/s, {batches} batches, {dup} duplicates, 0 lost ({n_rows} rows), {:.1} wire bytes/record, relay drops {}",
            N as f64 / secs,
            wire as f64 / N as f64,
            after.dropped() - before.dropped()
        );
        rates.push(N as f64 / secs);
        bytes_per.push(wire as f64 / N as f64);
        r.conn.close(0u32.into(), b"done");
    }
    println!(
        "\none remote across {} ms: median {:.0} records/s (rounds: {:?}); wire bytes/record median {:.1}",
        RTT.as_millis(),
        median(&mut rates.clone()),
        rates.iter().map(|r| *r as u64).collect::<Vec<_>>(),
        median(&mut bytes_per)
    );

    // 2. Three remotes.
    let mut three = Vec::new();
    for round in 0..ROUNDS {
        let mut rs = Vec::new();
        for k in 0..3 {
            rs.push(start_remote(&relay, &format!("r{round}-{k}"), col.public).await?);
        }
        let per = N / 3;
        let t = Instant::now();
        let ps: Vec<_> = (0..3)
            .map(|k| produce(rs[k].spool.clone(), format!("r{round}-{k}"), per))
            .collect();
        let origins: Vec<(String, u64)> = (0..3).map(|k| (format!("r{round}-{k}"), per)).collect();
        let refs: Vec<&Remote> = rs.iter().collect();
        wait_held(&col.collector, &origins, &refs).await?;
        let secs = t.elapsed().as_secs_f64();
        for p in ps {
            p.join().map_err(|_| anyhow!("producer panicked"))??;
        }
        for (o, n) in &origins {
            let got = rows(&col.collector, o)?;
            if got != *n {
                bail!("{o}: {got} rows stored, {n} sent");
            }
        }
        println!(
            "three remotes round {round}: {} records in {secs:.2} s = {:.0}/s, 0 lost",
            per * 3,
            (per * 3) as f64 / secs
        );
        three.push((per * 3) as f64 / secs);
        for r in &rs {
            r.conn.close(0u32.into(), b"done");
        }
    }
    println!(
        "collector ingest, three remotes: median {:.0} records/s",
        median(&mut three)
    );

    // 4. Call cost.
    let (off, on, offered, over) = tokio::task::spawn_blocking(call_cost).await??;
    println!(
        "\none tracing::info! with two fields: shipping off {off:.0} ns, shipping on {on:.0} ns (median of 20 × 20 000 calls); {offered} offered, {over} overflowed the hand-off"
    );
    col.ep.close(0u32.into(), b"done");
    relay.shutdown().await;
    Ok(())
}

fn main() -> Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("runtime")?;
    rt.block_on(run())
}
