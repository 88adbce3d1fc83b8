//! On-demand benchmark of pairing at fleet size (issue 18, item 2): approving, rejecting,
//! revoking and admitting one device with 10 and with 100 000 paired devices, in one run.
//!
//! One real gateway (`clawmesh gateway run --primary`, the measured binary) and one simulated
//! gateway in this process: the federation's own [`Mesh`] (join with the token, a link,
//! health pings, pairing sync) over a pairing registry of its own. The paired devices reach
//! the real gateway the way another gateway's decisions do: pairing records with real Ed25519
//! device keys, published by the simulated gateway's mesh over its link and merged by the
//! gateway while it runs (`Mesh::publish_pairing`, in chunks of 5 000), never written into its
//! database behind its back. The gateway's merge is confirmed through its own `device.pair.list`
//! (a page starting just before the last record sent), and all pages of the listing are read
//! once (every device exactly once, the pages' time reported).
//!
//! Each round then measures, through the gateway's methods as the CLI calls them, `n` samples
//! (default 50) of:
//! - **admit (new device)**: a node with a fresh key dials over QUIC and says hello; the
//!   gateway makes it a pending request and refuses (`PAIRING_REQUIRED`): dial to refusal;
//! - **reject**: `device.pair.reject` (what `clawmesh devices reject` calls) of such requests;
//! - **approve**: `device.pair.approve` (`clawmesh devices approve`), by request id;
//! - **admit (paired)**: the approved node dials again with its paired key: dial to welcome
//!   (QUIC handshake, TLS, hello, the gateway's key lookup, attach);
//! - **revoke**: `device.pair.remove` (`clawmesh devices revoke`), by device id.
//!
//! Then, `BENCH_PAIRING_SELECT_N` samples each (default 20) of naming one node by selector, as
//! `clawmesh nodes describe SEL` and `clawmesh nodes invoke --node SEL` call the gateway
//! (`node.describe`, `node.invoke`, over the same client connection):
//! - **describe by name** and **by id prefix** (12 hex characters) of a node attached to the
//!   gateway (this process, over QUIC, answering its requests);
//! - **describe a paired device by name** attached nowhere (one of the seeded devices, the
//!   name in upper case: names are matched without case);
//! - **invoke by name**, **by id prefix** and, for reference, **by id** (`system.which` on the
//!   attached node: the whole round trip, node included).
//!
//! The round with 10 paired devices is the baseline; the same gateway then receives 99 990
//! more and the round is repeated. The dial cost (QUIC + TLS handshake) is the same in both
//! rounds, so a difference is the lookups'.
//!
//! ```text
//! cargo build --release --bin clawmesh --example bench_pairing
//! cargo run --release --example bench_pairing            # ≈ 2 min
//! #   BENCH_PAIRING_DEVICES=100000 BENCH_PAIRING_N=50 BENCH_PAIRING_SELECT_N=20 (0: none)
//! #   BENCH_PAIRING_NODE_ALERTS=off: the alert rules set to those that read no node
//! #     (gateway-offline, no-quorum), so the primary's alert duty reads no node rows
//! ```
//!
//! `CLAWMESH_BIN=/path/to/clawmesh` selects another binary (a baseline beside this one: the
//! same benchmark, the other gateway). The gateway's VmHWM (peak resident memory) is printed
//! at the end. Everything runs on 127.0.0.1.

#[path = "support/mod.rs"]
#[allow(dead_code)]
mod support;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{anyhow, bail, Context, Result};
use clawmesh::cli::client::{Client, Target};
use clawmesh_federation::endpoint::{self, TransportOptions, SERVER_NAME};
use clawmesh_federation::handshake::{self, HandshakeError};
use clawmesh_federation::health::HealthConfig;
use clawmesh_federation::identity::{DeviceIdentity, PublicKey};
use clawmesh_federation::mesh::{Admission, Mesh, MeshConfig};
use clawmesh_federation::pairing::Registry;
use clawmesh_federation::rpc::{BoxFuture, Caller, CallerKind, Handler};
use clawmesh_federation::store::Store;
use clawmesh_federation::wire::{
    Hello, HelloRole, NodeHello, PairingRecord, Refusal, RefusalCode, Request, WireError,
};
use quinn::Connection;
use serde_json::{json, Value};
use support::{lat_stats, Proc};

/// Name of this benchmark in logs.
const BENCH: &str = "bench_pairing";

/// The gateways' health interval: the default's order, short enough for a quick join.
const HEALTH: Duration = Duration::from_millis(1000);

/// A call's timeout: a page of 10 000 devices is about 7 MB.
const CALL: Duration = Duration::from_secs(60);

/// Pairing records per published event: what a gateway's own link-up exchange uses.
const CHUNK: usize = 5_000;

/// Page size when reading the whole listing (the gateway's maximum).
const PAGE: usize = 10_000;

/// Longest wait for the gateway to merge what was sent: far above the seconds it takes.
const MERGE_DEADLINE: Duration = Duration::from_secs(300);

/// Name of the node this process attaches to the gateway for the selector samples.
const SEL_NODE: &str = "sel-node";

/// The attached node's answer to `system.which`: what a node host says for `sh`.
struct WhichNode;

impl Handler for WhichNode {
    fn handle(&self, _caller: Caller, req: Request) -> BoxFuture<Result<String, WireError>> {
        Box::pin(async move {
            match req.method.as_str() {
                "system.which" => Ok(json!({"bins": {"sh": "/bin/sh"}}).to_string()),
                other => Err(WireError::new(
                    "INVALID_REQUEST",
                    format!("{other} is not served by the benchmark's node"),
                )),
            }
        })
    }
}

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

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The simulated peer gateway: a real mesh and pairing registry, no consensus, no clients.
struct Peer {
    mesh: Mesh,
    registry: Registry,
}

async fn start_peer(root: &Path, hub: SocketAddr) -> Result<Peer> {
    let dir = root.join("peer");
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
            name: "peer".into(),
            region: Some("sim".into()),
            primary: false,
            join: Some(hub),
            token: Some("pairing-token".into()),
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
    mesh.attach_pairing(registry.clone());
    Ok(Peer { mesh, registry })
}

struct Hub {
    proc: Proc,
    quic: SocketAddr,
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
            "pairing-token",
            "--health-interval",
        ])
        .arg(HEALTH.as_millis().to_string())
        .env("RUST_LOG", "info");
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
    let v: Value = serde_json::from_str(&std::fs::read_to_string(dir.join("gateway.json"))?)?;
    let quic = v["quic"]
        .as_str()
        .ok_or_else(|| anyhow!("no quic address in gateway.json"))?
        .parse()
        .context("quic address")?;
    Ok(Hub { proc, quic, client })
}

impl Hub {
    async fn call(&self, method: &str, params: Value) -> Result<Value> {
        self.client
            .call(method, params, CALL)
            .await
            .map_err(|e| anyhow!("{method}: {e}"))
    }
}

/// The key just before `k` in byte order: a page starting after it starts at `k` if the
/// gateway has `k`.
fn before(k: &PublicKey) -> String {
    let mut b = k.0;
    for byte in b.iter_mut().rev() {
        let (v, borrow) = byte.overflowing_sub(1);
        *byte = v;
        if !borrow {
            break;
        }
    }
    PublicKey(b).to_base64url()
}

/// Approves `keys` at the peer gateway as a gateway does (its own registry first, so a link
/// that comes up later gets them in the link-up exchange; then published over its links) and
/// waits until the gateway's own listing shows the last one. Returns the time from the first
/// decision.
/// The devices are named `seed-N`, N counted from `first`.
async fn seed(hub: &mut Hub, peer: &Peer, keys: &[PublicKey], first: usize) -> Result<Duration> {
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)?
        .as_millis() as u64;
    let t = Instant::now();
    for (c, chunk) in keys.chunks(CHUNK).enumerate() {
        let records: Vec<PairingRecord> = chunk
            .iter()
            .enumerate()
            .map(|(i, k)| PairingRecord {
                key: *k,
                approved: true,
                changed_at_ms: now,
                name: format!("seed-{}", first + c * CHUNK + i),
                role: "node".into(),
                platform: "linux".into(),
                meta: json!({"deviceFamily": "", "clientId": "clawmesh-node", "clientMode": "node", "region": "sim"})
                    .to_string(),
                token: Some((format!("{:0>43}", c * CHUNK + i), now)),
            })
            .collect();
        peer.registry.apply(&records)?;
        peer.mesh.publish_pairing(records);
        // The link's event queue holds 64 events: a short pause keeps it from filling.
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let Some(last) = keys.last() else {
        return Ok(t.elapsed());
    };
    let want = last.to_base64url();
    let cursor = before(last);
    loop {
        let page = hub
            .call("device.pair.list", json!({"limit": 1, "after": cursor}))
            .await?;
        if page["paired"][0]["publicKey"].as_str() == Some(want.as_str()) {
            return Ok(t.elapsed());
        }
        if t.elapsed() > MERGE_DEADLINE {
            let st = hub.call("gateway.status", json!({})).await?;
            bail!(
                "the gateway has not merged the pairing records; its gateways: {}\n{}",
                st["gateways"],
                hub.proc.log_tail()
            );
        }
        hub.proc.ensure_running()?;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Reads every page of `device.pair.list`: (paired, revoked, pages, time).
async fn list_all(hub: &Hub) -> Result<(usize, usize, usize, Duration)> {
    let t = Instant::now();
    let (mut paired, mut revoked, mut pages) = (0, 0, 0);
    let mut after: Option<String> = None;
    let mut seen = std::collections::HashSet::new();
    loop {
        let page = hub
            .call("device.pair.list", json!({"limit": PAGE, "after": after}))
            .await?;
        pages += 1;
        for d in page["paired"].as_array().into_iter().flatten() {
            paired += 1;
            if !seen.insert(d["deviceId"].as_str().unwrap_or_default().to_string()) {
                bail!("device {} listed twice", d["deviceId"]);
            }
        }
        revoked += page["revoked"].as_array().map_or(0, Vec::len);
        match page["next"].as_str() {
            Some(n) => after = Some(n.to_string()),
            None => return Ok((paired, revoked, pages, t.elapsed())),
        }
    }
}

/// Dials the gateway as node `name` with `id` and says hello: the welcome or the refusal.
async fn dial(
    ep: &quinn::Endpoint,
    hub: SocketAddr,
    id: &DeviceIdentity,
    name: &str,
) -> Result<std::result::Result<Connection, Refusal>> {
    let (_, cc) = endpoint::configs(id, &TransportOptions::default())?;
    let conn = tokio::time::timeout(
        Duration::from_secs(20),
        ep.connect_with(cc, hub, SERVER_NAME)?,
    )
    .await??;
    let hello = handshake::hello(
        clawmesh::VERSION,
        0,
        HelloRole::Node(NodeHello {
            name: name.into(),
            token: None,
            commands: vec!["system.which".into()],
            labels: Vec::new(),
            platform: "linux".into(),
            attach: clawmesh_federation::directory::AttachOrder { boot: 1, attach: 1 },
        }),
    );
    match handshake::send_hello(&conn, &hello).await {
        Ok(_) => Ok(Ok(conn)),
        Err(HandshakeError::Refused { refusal, .. }) => Ok(Err(refusal)),
        Err(e) => Err(e.into()),
    }
}

/// The request id in a `PAIRING_REQUIRED` refusal's message.
fn request_id(r: &Refusal) -> Result<String> {
    if r.code != RefusalCode::PairingRequired {
        bail!("refused: {}", r.message);
    }
    let at = r
        .message
        .rfind("(requestId: ")
        .ok_or_else(|| anyhow!("no request id in {:?}", r.message))?;
    Ok(r.message[at + 12..]
        .chars()
        .take_while(|c| *c != ')')
        .collect())
}

/// Pairs a node named [`SEL_NODE`] (ask, approve) and keeps it attached: it answers the
/// gateway's requests and pings it, as a node host does. Returns its device id and connection.
async fn attach_node(
    hub: &Hub,
    ep: &quinn::Endpoint,
) -> Result<(String, Connection, tokio::task::JoinHandle<()>)> {
    let id = DeviceIdentity::ephemeral();
    let refusal = match dial(ep, hub.quic, &id, SEL_NODE).await? {
        Ok(_) => bail!("{SEL_NODE} was admitted unpaired"),
        Err(r) => r,
    };
    hub.call(
        "device.pair.approve",
        json!({"requestId": request_id(&refusal)?}),
    )
    .await?;
    let conn = match dial(ep, hub.quic, &id, SEL_NODE).await? {
        Ok(c) => c,
        Err(r) => bail!("{SEL_NODE} refused after approval: {}", r.message),
    };
    let caller = Caller {
        key: None,
        kind: CallerKind::Gateway { name: "hub".into() },
        remote: hub.quic,
    };
    let serve = tokio::spawn({
        let conn = conn.clone();
        async move {
            // Pings at half the gateway's interval, as `clawmesh node run` does.
            let health = HealthConfig {
                interval: HEALTH / 2,
                unhealthy_threshold: 3,
            };
            tokio::join!(
                clawmesh_federation::rpc::serve(conn.clone(), caller, Arc::new(WhichNode)),
                clawmesh_federation::liveness::monitor(conn, health, Default::default(), None),
            );
        }
    });
    Ok((id.public_key().device_id().to_string(), conn, serve))
}

/// `k` samples of each selector call (see the module doc): one table row.
async fn selectors(hub: &Hub, node_id: &str, paired: usize, k: usize, seeded: &str) -> Result<()> {
    let prefix = &node_id[..12];
    let describe = |sel: String| {
        let hub = &hub;
        async move {
            let t = Instant::now();
            let d = hub.call("node.describe", json!({"nodeId": sel})).await?;
            let took = t.elapsed();
            if d["nodeId"].as_str().is_none() {
                bail!("node.describe {sel}: {d}");
            }
            Ok::<_, anyhow::Error>((took, d))
        }
    };
    let invoke = |sel: String| {
        let hub = &hub;
        async move {
            let t = Instant::now();
            let r = hub
                .call(
                    "node.invoke",
                    json!({"nodeId": sel, "command": "system.which",
                           "params": {"bins": ["sh"]},
                           "idempotencyKey": clawmesh_federation::pairing::uuid_v4()}),
                )
                .await?;
            let took = t.elapsed();
            if r["payload"]["bins"]["sh"] != "/bin/sh" {
                bail!("node.invoke {sel}: {r}");
            }
            Ok::<_, anyhow::Error>(took)
        }
    };
    let (mut by_name, mut by_prefix, mut seeded_name) = (Vec::new(), Vec::new(), Vec::new());
    let (mut inv_name, mut inv_prefix, mut inv_id) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..k {
        let (t, d) = describe(SEL_NODE.to_string()).await?;
        if d["nodeId"] != node_id {
            bail!("{SEL_NODE} described as {}", d["nodeId"]);
        }
        by_name.push(t);
        by_prefix.push(describe(prefix.to_string()).await?.0);
        let (t, d) = describe(seeded.to_uppercase()).await?;
        if d["connected"] != false || d["displayName"] != seeded {
            bail!("{seeded} described as {d}");
        }
        seeded_name.push(t);
        inv_name.push(invoke(SEL_NODE.to_string()).await?);
        inv_prefix.push(invoke(prefix.to_string()).await?);
        inv_id.push(invoke(node_id.to_string()).await?);
    }
    println!(
        "| {paired} | {} | {} | {} | {} | {} | {} |",
        p50_90(&mut by_name)?,
        p50_90(&mut by_prefix)?,
        p50_90(&mut seeded_name)?,
        p50_90(&mut inv_name)?,
        p50_90(&mut inv_prefix)?,
        p50_90(&mut inv_id)?,
    );
    Ok(())
}

/// Sets the alert rules to those that read no node row (`BENCH_PAIRING_NODE_ALERTS=off`), as
/// an operator would (`clawmesh config set alerts.rules ...`); retried while the consensus
/// starts.
async fn node_alerts_off(hub: &Hub) -> Result<()> {
    let rules =
        json!([{"kind": "gateway-offline", "for": "30s"}, {"kind": "no-quorum", "for": "30s"}]);
    let t = Instant::now();
    loop {
        match hub
            .call("config.set", json!({"key": "alerts.rules", "value": rules}))
            .await
        {
            Ok(_) => return Ok(()),
            // The consensus elects its first leader within seconds of the start.
            Err(_) if t.elapsed() < Duration::from_secs(30) => {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => return Err(e),
        }
    }
}

/// Milliseconds with two decimals.
fn ms(v: f64) -> String {
    format!("{v:.2}")
}

/// p50 / p90 of `v`, in ms.
fn p50_90(v: &mut [Duration]) -> Result<String> {
    let l = lat_stats(v)?;
    Ok(format!("{} / {}", ms(l.p50), ms(l.p90)))
}

/// One round: `n` new devices ask (admit → pending), `n` more are rejected, the first `n` are
/// approved, admitted with their paired keys, and revoked.
async fn round(
    hub: &Hub,
    ep: &quinn::Endpoint,
    label: &str,
    paired: usize,
    n: usize,
) -> Result<()> {
    let ids: Vec<DeviceIdentity> = (0..2 * n).map(|_| DeviceIdentity::ephemeral()).collect();
    let mut ask = Vec::new();
    let mut requests = Vec::new();
    for (i, id) in ids.iter().enumerate() {
        let t = Instant::now();
        match dial(ep, hub.quic, id, &format!("{label}-{i}")).await? {
            Ok(c) => bail!(
                "{label}-{i} was admitted unpaired ({:?})",
                c.remote_address()
            ),
            Err(r) => {
                ask.push(t.elapsed());
                requests.push(request_id(&r)?);
            }
        }
    }
    let mut reject = Vec::new();
    for req in &requests[n..] {
        let t = Instant::now();
        hub.call("device.pair.reject", json!({"requestId": req}))
            .await?;
        reject.push(t.elapsed());
    }
    let mut approve = Vec::new();
    for req in &requests[..n] {
        let t = Instant::now();
        hub.call("device.pair.approve", json!({"requestId": req}))
            .await?;
        approve.push(t.elapsed());
    }
    let mut admit = Vec::new();
    for (i, id) in ids[..n].iter().enumerate() {
        let t = Instant::now();
        match dial(ep, hub.quic, id, &format!("{label}-{i}")).await? {
            Ok(conn) => {
                admit.push(t.elapsed());
                conn.close(0u32.into(), b"measured");
            }
            Err(r) => bail!("{label}-{i} was refused after approval: {}", r.message),
        }
    }
    let mut revoke = Vec::new();
    for id in &ids[..n] {
        let t = Instant::now();
        hub.call(
            "device.pair.remove",
            json!({"deviceId": id.public_key().device_id().to_string()}),
        )
        .await?;
        revoke.push(t.elapsed());
    }
    println!(
        "| {paired} | {} | {} | {} | {} | {} |",
        p50_90(&mut approve)?,
        p50_90(&mut revoke)?,
        p50_90(&mut admit)?,
        p50_90(&mut ask)?,
        p50_90(&mut reject)?,
    );
    Ok(())
}

async fn run() -> Result<()> {
    let bin = std::env::var_os("CLAWMESH_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/release/clawmesh")
        });
    let fleet = env_usize("BENCH_PAIRING_DEVICES", 100_000).max(20);
    let n = env_usize("BENCH_PAIRING_N", 50).max(1);
    // 0 skips the selector samples (and the node they use).
    let k = env_usize("BENCH_PAIRING_SELECT_N", 20);
    let alerts_off = std::env::var("BENCH_PAIRING_NODE_ALERTS").is_ok_and(|v| v == "off");
    let tmp = tempfile::tempdir()?;
    let root = tmp.path();
    println!(
        "{BENCH}: {}, {fleet} paired devices, n = {n} per operation, {k} per selector call, node alerts {}, load average {} at the start",
        bin.display(),
        if alerts_off { "off" } else { "on (default rules)" },
        support::loadavg3()
    );
    let mut hub = start_hub(&bin, root).await?;
    if alerts_off {
        node_alerts_off(&hub).await?;
    }
    let peer = start_peer(root, hub.quic).await?;
    let t = Instant::now();
    loop {
        let st = hub.call("gateway.status", json!({})).await?;
        let linked = st["gateways"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|g| g["name"] == "peer" && g["status"] == "healthy");
        if linked {
            break;
        }
        if t.elapsed() > Duration::from_secs(60) {
            bail!("the simulated gateway did not join: {st}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let client_id = DeviceIdentity::ephemeral();
    let ep = endpoint::bind(
        &client_id,
        "127.0.0.1:0".parse()?,
        &TransportOptions::default(),
    )?;

    let t = Instant::now();
    let keys: Vec<PublicKey> = (0..fleet)
        .map(|_| DeviceIdentity::ephemeral().public_key())
        .collect();
    println!(
        "{fleet} Ed25519 device keys made in {:.1} s",
        t.elapsed().as_secs_f64()
    );

    let select_header = || {
        println!("\n| paired devices | describe by name p50 / p90 (ms) | describe by id prefix | describe a paired device attached nowhere, by name | invoke by name | invoke by id prefix | invoke by id (reference) |");
        println!("|---|---|---|---|---|---|---|");
    };
    let round_header = || {
        println!("\n| paired devices | approve p50 / p90 (ms) | revoke p50 / p90 | admit, paired key: dial to welcome p50 / p90 | admit, new key: dial to pending p50 / p90 | reject p50 / p90 |");
        println!("|---|---|---|---|---|---|");
    };
    round_header();
    seed(&mut hub, &peer, &keys[..10], 0).await?;
    round(&hub, &ep, "at-10", 10, n).await?;
    let node = match k {
        0 => None,
        _ => Some(attach_node(&hub, &ep).await?),
    };
    if let Some((node_id, _, _)) = &node {
        select_header();
        selectors(&hub, node_id, 10, k, "seed-7").await?;
    }

    let rss = |hub: &Hub| {
        let f = |k: &str| support::mb(support::status_field(hub.proc.pid(), k).unwrap_or(0));
        format!(
            "{} (anonymous {}, file {})",
            f("VmRSS"),
            f("RssAnon"),
            f("RssFile")
        )
    };
    let before_seed = rss(&hub);
    let took = seed(&mut hub, &peer, &keys[10..], 10).await?;
    let after_seed = rss(&hub);
    round_header();
    round(&hub, &ep, &format!("at-{fleet}"), fleet, n).await?;
    if let Some((node_id, _, _)) = &node {
        select_header();
        selectors(&hub, node_id, fleet, k, &format!("seed-{}", fleet - 7)).await?;
    }
    let after_selectors = rss(&hub);
    println!(
        "\n{} pairing records sent by the peer gateway and merged by the gateway in {:.1} s ({:.0} records/s)",
        fleet - 10,
        took.as_secs_f64(),
        (fleet - 10) as f64 / took.as_secs_f64()
    );
    let (paired, revoked, pages, t) = list_all(&hub).await?;
    println!(
        "`device.pair.list` read whole: {paired} paired + {revoked} revoked in {pages} pages of at most {PAGE}, {:.0} ms (each device once)",
        t.as_secs_f64() * 1000.0
    );
    // The bench's own node is paired too.
    let want = fleet + usize::from(node.is_some());
    if paired != want {
        bail!("the gateway lists {paired} paired devices, not {}", want);
    }
    println!(
        "gateway VmRSS: {before_seed} before the seeding, {after_seed} after it, {after_selectors} after the selector samples, {} after the listing; VmHWM (peak) {}",
        rss(&hub),
        support::mb(support::status_field(hub.proc.pid(), "VmHWM").unwrap_or(0))
    );
    if let Some((_, conn, task)) = node {
        conn.close(0u32.into(), b"benchmark done");
        task.abort();
    }
    hub.client.close().await;
    let mut proc = hub.proc;
    proc.stop(Duration::from_secs(10));
    peer.mesh.shutdown("benchmark done").await;
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
