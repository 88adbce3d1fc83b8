//! On-demand benchmark of the federation at fleet size (issue 18): node directory deltas,
//! `node.list` over 100 000 nodes, and device approval at 10 and 100 000 paired devices.
//!
//! One real gateway (`clawmesh gateway run --primary`, the measured binary) and three
//! simulated gateways in this process. The simulated ones are the federation's own
//! [`Mesh`] (the same code a gateway runs: join with the token, links, health pings,
//! directory announcements, pairing sync), without consensus or node connections: their
//! nodes are synthetic [`NodeSummary`] rows handed to [`Mesh::set_local_nodes`], which is what
//! a gateway does when its nodes attach and leave. So the real gateway receives and lists
//! 100 000 nodes that would take 100 000 node processes to attach for real.
//!
//! 1. **Directory deltas**: 10 000 nodes on each simulated gateway, then 100 attach/detach
//!    a second for 5 s spread over the three. Reported: bytes per change per link (from the
//!    gateways' own counters: frames written), beside the full directory every change
//!    re-sent before (the snapshot of 10 000 nodes, encoded the same way); and the time until
//!    the real gateway lists exactly the simulated gateways' nodes after the churn stops.
//! 2. **Listing**: `node.list {"all":true}` of every node, in pages of 20 000 (100 000 rows
//!    in one answer would pass the 32 MiB frame limit), n = 3, at 30 000 and 100 002 nodes:
//!    the gateway's own time to build each answer (its debug log line `node.list built`, with
//!    the part spent finding or building its listing index), per page and summed over the
//!    pages; the client's round trip (QUIC transfer and JSON parse included); a page of
//!    1 000 (`limit`); a whole listing after one node changed (the index rebuilt once); the
//!    gateway's VmRSS before, after, and 12 s later (the index is dropped after 10 s unused).
//! 3. **Approve and revoke** through the gateway's methods (`device.pair.approve`, what
//!    `clawmesh devices approve` calls, and `device.pair.remove`): 10 real `clawmesh node run`
//!    processes ask to pair, each is approved, attaches (admission by its paired key) and is
//!    revoked; first with 10 paired devices, then with 100 000. The 100 000 records reach the
//!    gateway the way another gateway's decisions do (pairing sync over a mesh link, merged
//!    while it runs), not written into its database behind its back.
//!
//! ```text
//! cargo build --release --bin clawmesh
//! cargo run --release --example bench_fleet
//! ```
//!
//! `BENCH_FLEET_PART=directory` runs only step 1, twice on the same gateways: announced as
//! the whole list each time (`Mesh::set_local_nodes`, a gateway before its registry's change
//! log), then per change (`Mesh::apply_local_changes`, a gateway now), with what one
//! announcement cost (≈ 1 min).
//!
//! `CLAWMESH_BIN=/path/to/clawmesh` selects another binary. `BENCH_FLEET_PART=listing` runs
//! only the listing at 100 002 nodes (≈ 2 min a binary), and with it
//! `BENCH_FLEET_BASE_BIN=/path/to/old/clawmesh` measures that baseline binary first, in the
//! same run, each on its own fresh gateways:
//!
//! ```text
//! BENCH_FLEET_PART=listing BENCH_FLEET_BASE_BIN=/tmp/clawmesh-before \
//!     cargo run --release --example bench_fleet
//! ```
//!
//! Everything runs on 127.0.0.1.

#[path = "support/mod.rs"]
#[allow(dead_code)]
mod support;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{anyhow, bail, Context, Result};
use clawmesh::cli::client::{Client, Target};
use clawmesh_federation::directory::{AttachOrder, LocalDirectory, NodeSummary};
use clawmesh_federation::endpoint::{self, TransportOptions};
use clawmesh_federation::frame::{self, MAX_FRAME};
use clawmesh_federation::health::HealthConfig;
use clawmesh_federation::identity::{DeviceId, DeviceIdentity, PublicKey};
use clawmesh_federation::mesh::{Admission, Mesh, MeshConfig};
use clawmesh_federation::pairing::Registry;
use clawmesh_federation::rpc::{BoxFuture, Caller, CallerKind, Handler};
use clawmesh_federation::store::Store;
use clawmesh_federation::wire::{
    Event, Hello, PairingRecord, Refusal, RefusalCode, Request, WireError,
};
use quinn::Connection;
use serde_json::{json, Value};
use support::Proc;

/// Name of this benchmark in logs.
const BENCH: &str = "bench_fleet";

/// The health interval of every gateway here: the convergence goal is one interval.
const HEALTH: Duration = Duration::from_millis(1000);

/// Simulated gateways.
const SIMS: usize = 3;

/// A call's timeout: listing 100 000 nodes moves tens of MB.
const CALL: Duration = Duration::from_secs(60);

struct NoMethods;

impl Handler for NoMethods {
    fn handle(&self, _caller: Caller, req: Request) -> BoxFuture<Result<String, WireError>> {
        Box::pin(async move {
            Err(WireError::new(
                "UNAVAILABLE",
                format!("{} is not served by a simulated gateway", req.method),
            ))
        })
    }
}

struct NoClients;

impl Admission for NoClients {
    fn admit(&self, _: &PublicKey, _: SocketAddr, _: &Hello) -> Result<CallerKind, Refusal> {
        Err(Refusal {
            code: RefusalCode::UnknownPeer,
            message: "a simulated gateway takes no clients".into(),
            retryable: false,
        })
    }

    fn connected(&self, conn: Connection, _: Caller, _: Hello) {
        conn.close(0u32.into(), b"no clients");
    }
}

/// A simulated gateway: a real mesh with synthetic nodes.
struct Sim {
    mesh: Mesh,
    nodes: Vec<NodeSummary>,
}

fn key_of(i: u64) -> PublicKey {
    // Synthetic device keys: distinct, spread over the id space like real ones.
    let mut b = [0u8; 32];
    let h = i.wrapping_mul(0x9E37_79B9_7F4A_7C15).to_be_bytes();
    b[..8].copy_from_slice(&h);
    b[8..16].copy_from_slice(&i.to_be_bytes());
    PublicKey(b)
}

fn summary(i: u64) -> NodeSummary {
    NodeSummary {
        id: key_of(i).device_id(),
        name: format!("sim-node-{i}"),
        labels: vec![("rack".into(), format!("r{}", i % 40))],
        commands: vec![
            "system.run".into(),
            "system.which".into(),
            "system.execApprovals.get".into(),
        ],
        transport: "quic".into(),
        platform: "linux".into(),
        ip: format!("10.{}.{}.{}", (i >> 16) & 255, (i >> 8) & 255, i & 255),
        version: "2026.12.1".into(),
        attach: AttachOrder { boot: 1, attach: 1 },
    }
}

async fn start_sim(name: &str, root: &Path, hub: SocketAddr) -> Result<Sim> {
    let dir = root.join(name);
    std::fs::create_dir_all(&dir)?;
    let identity = DeviceIdentity::ephemeral();
    let ep = endpoint::bind(
        &identity,
        "127.0.0.1:0".parse()?,
        &TransportOptions::default(),
    )?;
    let advertise = ep.local_addr()?.to_string();
    let store = Store::open(&dir)?;
    let registry = Registry::open(store.clone())?;
    let mesh = Mesh::start(
        MeshConfig {
            name: name.into(),
            region: Some("sim".into()),
            primary: false,
            join: Some(hub),
            token: Some("fleet-token".into()),
            advertise,
            health: HealthConfig {
                interval: HEALTH,
                unhealthy_threshold: 3,
            },
            software: BENCH.into(),
        },
        &identity,
        ep,
        store,
        Arc::new(NoMethods),
        Arc::new(NoClients),
    )?;
    mesh.attach_pairing(registry);
    Ok(Sim {
        mesh,
        nodes: Vec::new(),
    })
}

fn rss_kb(pid: i32) -> u64 {
    support::status_field(pid, "VmRSS").unwrap_or(0)
}

/// One `node.list built` line of the gateway's log.
#[derive(Debug, Clone, Copy)]
struct Built {
    /// The whole answer, at the gateway.
    micros: u64,
    /// Of which finding or building the index (`None`: a binary without one).
    index_micros: Option<u64>,
    /// The index's size (its rows' text and entries).
    index_bytes: Option<u64>,
    bytes: u64,
}

/// Whether a `node.list built` line is one of this benchmark's pages (of `PAGE` or 1 000
/// rows), not the gateway's own alert duty reading its nodes twice a second. A binary that
/// does not log `limit` (the baseline) reads every node in one answer, over 30 MB at 100 000
/// nodes, where a page of 20 000 is under 20 MB.
fn ours(l: &str, bytes: u64) -> bool {
    match l.find(" limit=") {
        Some(at) => {
            let v: String = l[at + 7..]
                .chars()
                .take_while(char::is_ascii_digit)
                .collect();
            v == PAGE.to_string() || v == "1000"
        }
        None => bytes < 30_000_000,
    }
}

/// The `node.list built` lines of the gateway's log, in order.
fn built_lines(log: &Path) -> Vec<Built> {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    text.lines()
        .filter(|l| l.contains("node.list built"))
        .filter_map(|l| {
            let field = |k: &str| -> Option<u64> {
                let at = l.find(&format!(" {k}="))? + k.len() + 2;
                l[at..]
                    .split(|c: char| !c.is_ascii_digit())
                    .next()?
                    .parse()
                    .ok()
            };
            Some(Built {
                micros: field("micros")?,
                index_micros: field("index_micros"),
                index_bytes: field("index_bytes"),
                bytes: field("bytes").filter(|b| ours(l, *b))?,
            })
        })
        .collect()
}

fn ms(d: Duration) -> String {
    format!("{:.2}", d.as_secs_f64() * 1000.0)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() {
        return f64::NAN;
    }
    v[v.len() / 2]
}

struct Hub {
    proc: Proc,
    dir: PathBuf,
    client: Client,
}

async fn start_hub(bin: &Path, root: &Path) -> Result<Hub> {
    let dir = root.join("hub");
    std::fs::create_dir_all(&dir)?;
    let mut cmd = Command::new(bin);
    cmd.arg("--state-dir")
        .arg(&dir)
        .args([
            "gateway",
            "run",
            "--primary",
            "--name",
            "hub",
            "--port",
            "0",
            "--token",
            "fleet-token",
            "--health-interval",
        ])
        .arg(HEALTH.as_millis().to_string())
        .env("RUST_LOG", "info,clawmesh::gateway::methods::listing=debug");
    let mut proc = Proc::spawn("hub", cmd, &root.join("hub.log"))?;
    let target = Target::Local(dir.clone());
    let t = Instant::now();
    let client = loop {
        proc.ensure_running()?;
        if let Ok(c) = Client::connect(&target).await {
            if c.call("gateway.status", json!({}), CALL).await.is_ok() {
                break c;
            }
        }
        if t.elapsed() > Duration::from_secs(30) {
            bail!("the gateway did not start:\n{}", proc.log_tail());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    Ok(Hub { proc, dir, client })
}

fn hub_addr(dir: &Path) -> Result<SocketAddr> {
    let v: Value = serde_json::from_str(&std::fs::read_to_string(dir.join("gateway.json"))?)?;
    v["quic"]
        .as_str()
        .ok_or_else(|| anyhow!("no quic address in gateway.json"))?
        .parse()
        .context("quic address")
}

/// Every row of `node.list {"all":true}`, a page of `PAGE` at a time (100 000 rows in one
/// answer would exceed the 32 MiB frame limit); also the pages' count.
async fn list_all(hub: &Hub) -> Result<(Vec<Value>, usize)> {
    let mut rows = Vec::new();
    let mut after: Option<String> = None;
    let mut pages = 0;
    loop {
        let doc = hub
            .client
            .call(
                "node.list",
                json!({"all": true, "limit": PAGE, "after": after}),
                CALL,
            )
            .await
            .map_err(|e| anyhow!("{e}"))?;
        pages += 1;
        rows.extend(doc["nodes"].as_array().cloned().unwrap_or_default());
        match doc["next"].as_str() {
            Some(n) => after = Some(n.to_string()),
            None => return Ok((rows, pages)),
        }
    }
}

/// Rows per page when listing everything.
const PAGE: usize = 20_000;

/// The node ids the hub lists at each simulated gateway.
async fn listed(hub: &Hub) -> Result<BTreeSet<String>> {
    Ok(list_all(hub)
        .await?
        .0
        .iter()
        .filter(|r| r["gateway"].as_str().is_some_and(|g| g.starts_with("sim-")))
        .filter_map(|r| r["nodeId"].as_str().map(str::to_string))
        .collect())
}

fn expected(sims: &[Sim]) -> BTreeSet<String> {
    sims.iter()
        .flat_map(|s| s.nodes.iter().map(|n| n.id.to_string()))
        .collect()
}

async fn wait_listed(hub: &Hub, sims: &[Sim], deadline: Duration) -> Result<Duration> {
    let want = expected(sims);
    let t = Instant::now();
    loop {
        if listed(hub).await? == want {
            return Ok(t.elapsed());
        }
        if t.elapsed() > deadline {
            bail!(
                "the hub does not list the simulated gateways' {} nodes",
                want.len()
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// How long the listing measurements wait for the gateway to give back a listing's memory:
/// the gateway drops its listing index after 10 s unused.
const SETTLE: Duration = Duration::from_secs(12);

/// The header of [`bench_listing`]'s table.
fn listing_header() {
    println!("| binary, federation | rows (pages of 20 000) | built at the gateway: per page / all pages (ms) | of which the index, first page (ms) | client round trip, all pages (ms) | answer | page of 1 000: built / round trip (ms) | all pages after one node changed: built (ms) | hub VmRSS before / after / {} s later |", SETTLE.as_secs());
    println!("|---|---|---|---|---|---|---|---|---|");
}

async fn bench_listing(hub: &Hub, sims: &mut [Sim], label: &str) -> Result<()> {
    let pid = hub.proc.pid();
    let before = rss_kb(pid);
    let log = hub.proc.log.clone();
    let skip = built_lines(&log).len();
    let mut rtt = Vec::new();
    let mut rows = 0;
    let mut pages = 0;
    for _ in 0..3 {
        let t = Instant::now();
        let (all, n) = list_all(hub).await?;
        rtt.push(t.elapsed().as_secs_f64() * 1000.0);
        rows = all.len();
        pages = n;
    }
    let after = rss_kb(pid);
    let skip_pages = built_lines(&log).len();
    let mut page = Vec::new();
    for _ in 0..5 {
        let t = Instant::now();
        hub.client
            .call("node.list", json!({"all": true, "limit": 1000}), CALL)
            .await
            .map_err(|e| anyhow!("{e}"))?;
        page.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    // One node of one simulated gateway changes (a newer attachment): the next listing
    // rebuilds its index once, then pages as before.
    let mut changed = Vec::new();
    for round in 0..3u64 {
        let s = &mut sims[(round as usize) % sims.len()];
        if let Some(n) = s.nodes.first_mut() {
            n.attach.attach += 1;
        }
        s.mesh.set_local_nodes(s.nodes.clone());
        // The delta goes out within the 50 ms coalescing window.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let from = built_lines(&log).len();
        list_all(hub).await?;
        let lines = built_lines(&log);
        changed.push(
            lines[from..]
                .iter()
                .map(|b| b.micros as f64 / 1000.0)
                .sum::<f64>(),
        );
    }
    tokio::time::sleep(SETTLE).await;
    let later = rss_kb(pid);
    let lines = built_lines(&log);
    let listings = &lines[skip..skip_pages];
    // One listing = `pages` answers; its build time is their sum.
    let full: Vec<f64> = listings
        .chunks(pages.max(1))
        .map(|c| c.iter().map(|b| b.micros as f64 / 1000.0).sum())
        .collect();
    let per_page: Vec<f64> = listings.iter().map(|b| b.micros as f64 / 1000.0).collect();
    let index_first: Vec<f64> = listings
        .chunks(pages.max(1))
        .filter_map(|c| c.first()?.index_micros)
        .map(|us| us as f64 / 1000.0)
        .collect();
    let bytes: u64 = listings.iter().take(pages).map(|b| b.bytes).sum();
    let paged: Vec<f64> = lines[skip_pages..skip_pages + 5]
        .iter()
        .map(|b| b.micros as f64 / 1000.0)
        .collect();
    let index_text = match listings.first().and_then(|b| b.index_bytes) {
        None => "– (no index)".to_string(),
        // The first listing builds the index (unless a listing before found it); the others
        // find it.
        Some(size) => format!(
            "{:.2} first listing, {:.2} median; index {:.1} MB",
            index_first.first().copied().unwrap_or(f64::NAN),
            median(index_first.clone()),
            size as f64 / 1e6
        ),
    };
    println!(
        "| {label} | {rows} in {pages} pages | {:.2} / {:.2} | {index_text} | {:.2} | {:.1} MB | {:.2} / {:.2} | {:.2} | {} / {} / {} |",
        median(per_page),
        median(full),
        median(rtt),
        bytes as f64 / 1e6,
        median(paged),
        median(page),
        median(changed),
        support::mb(before),
        support::mb(after),
        support::mb(later),
    );
    Ok(())
}

/// 10 real node processes: each asks to pair, is approved, attaches, and is revoked.
async fn bench_approvals(
    bin: &Path,
    root: &Path,
    hub: &Hub,
    round: &str,
    paired: u64,
) -> Result<()> {
    let addr = hub_addr(&hub.dir)?;
    let mut procs = Vec::new();
    for i in 0..10 {
        let dir = root.join(format!("{round}-node-{i}"));
        std::fs::create_dir_all(&dir)?;
        let mut cmd = Command::new(bin);
        cmd.arg("--state-dir")
            .arg(&dir)
            .args(["node", "run", "--gateway"])
            .arg(format!("quic://{addr}"))
            .args(["--name", &format!("{round}-node-{i}")])
            .env("RUST_LOG", "info");
        procs.push(Proc::spawn(
            &format!("{round}-node-{i}"),
            cmd,
            &root.join(format!("{round}-node-{i}.log")),
        )?);
    }
    // The request ids, from the nodes' own logs (`device.pair.list` at 100 000 paired devices
    // is an answer over the frame limit: it is not paged yet).
    let t = Instant::now();
    let pending: Vec<(String, String)> = loop {
        let mut mine = Vec::new();
        for (i, p) in procs.iter().enumerate() {
            let text = std::fs::read_to_string(&p.log).unwrap_or_default();
            if let Some(at) = text.rfind("(requestId: ") {
                let id: String = text[at + 12..].chars().take_while(|c| *c != ')').collect();
                mine.push((id, format!("{round}-node-{i}")));
            }
        }
        if mine.len() == 10 {
            break mine;
        }
        if t.elapsed() > Duration::from_secs(60) {
            bail!("only {} of 10 pairing requests arrived", mine.len());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let mut approve = Vec::new();
    for (req, _) in &pending {
        let t = Instant::now();
        hub.client
            .call("device.pair.approve", json!({"requestId": req}), CALL)
            .await
            .map_err(|e| anyhow!("approve: {e}"))?;
        approve.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    // Admission: the approved nodes reconnect with their paired keys and attach.
    let t = Instant::now();
    loop {
        let st = hub
            .client
            .call("gateway.status", json!({}), CALL)
            .await
            .map_err(|e| anyhow!("{e}"))?;
        if st["nodes"].as_u64() == Some(10) {
            break;
        }
        if t.elapsed() > Duration::from_secs(60) {
            bail!("the approved nodes did not attach");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let attached = t.elapsed();
    let mut revoke = Vec::new();
    for (_, id) in &pending {
        let t = Instant::now();
        hub.client
            .call("device.pair.remove", json!({"deviceId": id}), CALL)
            .await
            .map_err(|e| anyhow!("revoke: {e}"))?;
        revoke.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    println!(
        "| {round} | {paired} | {:.2} | {:.2} | {} |",
        median(approve.clone()),
        median(revoke.clone()),
        ms(attached),
    );
    support::stop_all(&mut procs, Duration::from_secs(5));
    Ok(())
}

/// Sends pairing records for nodes `from..to` through a simulated gateway's mesh link, in
/// chunks, and waits until the hub has them.
async fn seed_pairing(hub: &Hub, sim: &Sim, from: u64, to: u64) -> Result<Duration> {
    let t = Instant::now();
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)?
        .as_millis() as u64;
    let mut i = from;
    while i < to {
        let end = (i + 10_000).min(to);
        let records: Vec<PairingRecord> = (i..end)
            .map(|k| PairingRecord {
                key: key_of(SEEDED + k),
                approved: true,
                changed_at_ms: now,
                name: format!("paired-{k}"),
                role: "node".into(),
                platform: "linux".into(),
                meta: "{}".into(),
                token: None,
            })
            .collect();
        sim.mesh.publish_pairing(records);
        i = end;
        // The event queue is bounded: let the link drain between chunks.
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Merged once the last one is listed (a paired node attached nowhere).
    let last = key_of(SEEDED + to - 1).device_id().to_string();
    loop {
        let doc = hub
            .client
            .call(
                "node.list",
                json!({"all": true, "limit": 1, "after": &last[..63]}),
                CALL,
            )
            .await
            .map_err(|e| anyhow!("{e}"))?;
        if doc["nodes"][0]["nodeId"].as_str() == Some(last.as_str()) {
            return Ok(t.elapsed());
        }
        if t.elapsed() > Duration::from_secs(300) {
            bail!("the hub has not merged the pairing records");
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Seeded pairing records use keys from here on (no simulated node has them).
const SEEDED: u64 = 1 << 40;

/// The measured gateway and the simulated gateways, joined in a full mesh.
async fn start_fleet(bin: &Path, root: &Path) -> Result<(Hub, Vec<Sim>)> {
    let hub = start_hub(bin, root).await?;
    let addr = hub_addr(&hub.dir)?;
    let mut sims = Vec::new();
    for i in 0..SIMS {
        sims.push(start_sim(&format!("sim-{}", i + 1), root, addr).await?);
    }
    // Wait for the full mesh (every simulated gateway linked to every other gateway).
    let t = Instant::now();
    loop {
        let st = hub
            .client
            .call("gateway.status", json!({}), CALL)
            .await
            .map_err(|e| anyhow!("{e}"))?;
        let healthy = st["gateways"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|g| g["status"] == "healthy" || g["isSelf"] == true)
            .count();
        if healthy == SIMS + 1 {
            break;
        }
        if t.elapsed() > Duration::from_secs(60) {
            bail!("the simulated gateways did not join: {st}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Ok((hub, sims))
}

/// `BENCH_FLEET_PART=listing`: only the listing at 100 002 nodes, for the binary measured and,
/// with `BENCH_FLEET_BASE_BIN`, for that baseline binary first (each with its own gateways).
async fn run_listing(bin: &Path) -> Result<()> {
    let mut bins = Vec::new();
    if let Some(base) = std::env::var_os(support::bench_env("BASE_BIN")) {
        bins.push(("baseline", PathBuf::from(base)));
    }
    bins.push(("this build", bin.to_path_buf()));
    println!("\n### `node.list {{\"all\":true}}` at 100 002 nodes (all pages n = 3, one page n = 5, after a change n = 3; medians)\n");
    listing_header();
    for (label, bin) in bins {
        let tmp = tempfile::tempdir()?;
        let (hub, mut sims) = start_fleet(&bin, tmp.path()).await?;
        let mut next = 0u64;
        for s in sims.iter_mut() {
            s.nodes = (next..next + 33_334).map(summary).collect();
            next += 33_334;
            s.mesh.set_local_nodes(s.nodes.clone());
        }
        wait_listed(&hub, &sims, Duration::from_secs(180)).await?;
        bench_listing(
            &hub,
            &mut sims,
            &format!("{label}: {}, 100 002 simulated", bin.display()),
        )
        .await?;
        hub.client.close().await;
        let mut hub_proc = hub.proc;
        hub_proc.stop(Duration::from_secs(10));
        for s in &sims {
            s.mesh.shutdown("benchmark done").await;
        }
    }
    Ok(())
}

/// How a simulated gateway announces its nodes during the churn.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Announce {
    /// The whole list, diffed against the last announcement (`Mesh::set_local_nodes`): what a
    /// gateway did before its registry kept a change log.
    FullList,
    /// Only the nodes that changed since the last announcement
    /// (`Mesh::apply_local_changes`): what a gateway does now.
    Changes,
}

/// Step 1: 100 attach/detach a second for 5 s spread over the simulated gateways, announced
/// every 50 ms as `how` says; prints bytes per change and what one announcement cost.
async fn churn(hub: &Hub, sims: &mut [Sim], how: Announce, snapshot_bytes: usize) -> Result<()> {
    let before: Vec<_> = sims.iter().map(|s| s.mesh.directory_stats()).collect();
    let churn = Duration::from_secs(5);
    let t0 = Instant::now();
    let mut changes = 0u64;
    let mut parked: Vec<Vec<NodeSummary>> = vec![Vec::new(); SIMS];
    let mut announce_us: Vec<f64> = Vec::new();
    // 100 changes a second, announced every 50 ms as a gateway does (it coalesces its
    // registry's changes over 50 ms): 5 changes a tick, spread over the three.
    let mut tick = tokio::time::interval(Duration::from_millis(50));
    let mut k = 0usize;
    while t0.elapsed() < churn {
        tick.tick().await;
        let mut changed: Vec<Vec<(DeviceId, Option<NodeSummary>)>> = vec![Vec::new(); SIMS];
        for _ in 0..5 {
            let i = k % SIMS;
            k += 1;
            let s = &mut sims[i];
            // Alternate: a node leaves, then it (a newer attachment) comes back.
            if let Some(mut n) = parked[i].pop() {
                n.attach.attach += 1;
                changed[i].push((n.id, Some(n.clone())));
                s.nodes.push(n);
            } else {
                let at = (k * 7919) % s.nodes.len();
                let n = s.nodes.swap_remove(at);
                changed[i].push((n.id, None));
                parked[i].push(n);
            }
            changes += 1;
        }
        for (s, c) in sims.iter().zip(changed) {
            let t = Instant::now();
            match how {
                Announce::FullList => s.mesh.set_local_nodes(s.nodes.clone()),
                Announce::Changes => s.mesh.apply_local_changes(c),
            }
            announce_us.push(t.elapsed().as_secs_f64() * 1e6);
        }
    }
    let took = t0.elapsed();
    let t = wait_listed(hub, sims, Duration::from_secs(30)).await?;
    let mut delta_bytes = 0;
    let mut deltas = 0;
    let mut snapshots = 0;
    let mut resyncs = 0;
    for (s, b) in sims.iter().zip(&before) {
        let a = s.mesh.directory_stats();
        delta_bytes += a.delta_bytes - b.delta_bytes;
        deltas += a.deltas_sent - b.deltas_sent;
        snapshots += a.snapshots_sent - b.snapshots_sent;
        resyncs += a.resyncs_asked - b.resyncs_asked;
    }
    println!("\n### Directory ({how:?}): 3 simulated gateways x 10 000 nodes, {changes} attach/detach in {:.1} s\n", took.as_secs_f64());
    println!("| measure | value |");
    println!("|---|---|");
    // Each simulated gateway has SIMS links (the hub and the other two).
    println!(
        "| bytes per change per link (delta bytes written / (changes x {SIMS} links)) | {:.0} B ({delta_bytes} B in {deltas} delta frames) |",
        delta_bytes as f64 / (changes * SIMS as u64).max(1) as f64
    );
    println!(
        "| baseline: the whole directory, what every change re-sent before (10 000 nodes) | {snapshot_bytes} B |"
    );
    println!(
        "| one announcement by a simulated gateway (its directory's diff and queueing), median / max | {:.0} µs / {:.0} µs (n = {}) |",
        median(announce_us.clone()),
        announce_us.iter().cloned().fold(0.0, f64::max),
        announce_us.len()
    );
    println!("| snapshots sent during the churn | {snapshots} |");
    println!("| resyncs asked during the churn | {resyncs} |");
    println!(
        "| hub lists exactly the simulated nodes, after the last change (upper bound: includes one full paged listing) | {} ms (health interval {} ms) |",
        ms(t),
        HEALTH.as_millis()
    );
    Ok(())
}

/// `BENCH_FLEET_PART=directory`: only step 1, announced both ways in the same run (the whole
/// list first, then per change), on the same gateways.
async fn run_directory(bin: &Path) -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let (hub, mut sims) = start_fleet(bin, tmp.path()).await?;
    let mut next = 0u64;
    for s in sims.iter_mut() {
        s.nodes = (next..next + 10_000).map(summary).collect();
        next += 10_000;
        s.mesh.set_local_nodes(s.nodes.clone());
    }
    let t = wait_listed(&hub, &sims, Duration::from_secs(60)).await?;
    println!(
        "\n30 000 simulated nodes listed at the hub {} ms after they were announced",
        ms(t)
    );
    let snapshot_bytes = {
        let mut d = LocalDirectory::new(1);
        d.update(sims[0].nodes.clone());
        frame::encode(&Event::NodeDirectory(d.snapshot()), MAX_FRAME)?.len()
    };
    churn(&hub, &mut sims, Announce::FullList, snapshot_bytes).await?;
    churn(&hub, &mut sims, Announce::Changes, snapshot_bytes).await?;
    hub.client.close().await;
    let mut hub_proc = hub.proc;
    hub_proc.stop(Duration::from_secs(10));
    for s in &sims {
        s.mesh.shutdown("benchmark done").await;
    }
    Ok(())
}

async fn run() -> Result<()> {
    let bin = std::env::var_os("CLAWMESH_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/release/clawmesh")
        });
    let tmp = tempfile::tempdir()?;
    let root = tmp.path();
    println!(
        "{BENCH}: {} , load average {} at the start",
        bin.display(),
        support::loadavg3()
    );
    if std::env::var(support::bench_env("PART")).as_deref() == Ok("listing") {
        return run_listing(&bin).await;
    }
    if std::env::var(support::bench_env("PART")).as_deref() == Ok("directory") {
        return run_directory(&bin).await;
    }
    let (hub, mut sims) = start_fleet(&bin, root).await?;

    // 2 (baseline first): listing 10 nodes; approvals at 10 paired devices.
    let mut next = 0u64;
    for (i, s) in sims.iter_mut().enumerate() {
        let n = if i == 0 { 4 } else { 3 };
        s.nodes = (next..next + n).map(summary).collect();
        next += n;
        s.mesh.set_local_nodes(s.nodes.clone());
    }
    wait_listed(&hub, &sims, Duration::from_secs(30)).await?;
    seed_pairing(&hub, &sims[0], 0, 10).await?;
    println!("\n### Approve and revoke (10 real nodes each round; medians in ms)\n");
    println!("| round | paired devices | `device.pair.approve` p50 | `device.pair.remove` p50 | 10 approved nodes attached after (ms) |");
    println!("|---|---|---|---|---|");
    bench_approvals(&bin, root, &hub, "at-10", 10).await?;

    // 1: directory deltas at 10 000 nodes per simulated gateway.
    for s in sims.iter_mut() {
        s.nodes = (next..next + 10_000).map(summary).collect();
        next += 10_000;
        s.mesh.set_local_nodes(s.nodes.clone());
    }
    let t = wait_listed(&hub, &sims, Duration::from_secs(60)).await?;
    println!(
        "\n30 000 simulated nodes listed at the hub {} ms after they were announced",
        ms(t)
    );
    let snapshot_bytes = {
        let mut d = LocalDirectory::new(1);
        d.update(sims[0].nodes.clone());
        frame::encode(&Event::NodeDirectory(d.snapshot()), MAX_FRAME)?.len()
    };
    churn(&hub, &mut sims, Announce::Changes, snapshot_bytes).await?;
    // 2: listing at 100 002 nodes.
    println!("\n### `node.list {{\"all\":true}}` (all pages n = 3, one page n = 5, after a change n = 3; medians)\n");
    listing_header();
    // (The 30 000-node state is measured too, as a midpoint.)
    bench_listing(&hub, &mut sims, "30 000 simulated + 0 local").await?;
    for s in sims.iter_mut() {
        let more = 33_334 - s.nodes.len() as u64;
        s.nodes.extend((next..next + more).map(summary));
        next += more;
        s.mesh.set_local_nodes(s.nodes.clone());
    }
    wait_listed(&hub, &sims, Duration::from_secs(120)).await?;
    bench_listing(&hub, &mut sims, "100 002 simulated").await?;

    // 3: approvals at 100 000 paired devices.
    let t = seed_pairing(&hub, &sims[0], 10, 100_000).await?;
    println!(
        "\n100 000 pairing records merged by the hub through pairing sync in {:.1} s\n",
        t.as_secs_f64()
    );
    println!("| round | paired devices | `device.pair.approve` p50 | `device.pair.remove` p50 | 10 approved nodes attached after (ms) |");
    println!("|---|---|---|---|---|");
    bench_approvals(&bin, root, &hub, "at-100k", 100_000).await?;
    bench_listing(&hub, &mut sims, "100 002 simulated, 100 000 paired").await?;

    hub.client.close().await;
    let mut hub_proc = hub.proc;
    hub_proc.stop(Duration::from_secs(10));
    Ok(())
}

fn main() -> Result<()> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(run())
}
