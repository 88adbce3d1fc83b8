//! On-demand benchmark of cross-gateway delegation (issue 6): what forwarding `node.invoke`
//! once over the QUIC mesh costs beside a local invoke, and fan-out to 100 nodes spread over
//! three gateways.
//!
//! Everything runs on 127.0.0.1 with real processes (release `clawmesh` binary):
//!
//! * three gateways `gw-a` (primary, region `ra`), `gw-b` (`rb`) and `gw-c` (`rc`), joined
//!   through the in-process WAN relay ([`clawmesh::sim::relay::WanRelay`], on its own one-worker
//!   tokio runtime): each gateway runs with `--advertise <relay public addr>`, so every
//!   gateway-to-gateway datagram crosses the relay, whose paths start at 0 ms added latency;
//! * nodes are real `clawmesh node run --gateway quic://<gateway> --label fleet=bench
//!   --label tier=a|bc --security full` processes, each with its own state dir, attached
//!   directly (not through the relay) to their gateway and approved on that gateway
//!   (`clawmesh devices approve` for the first two, the same `device.pair.approve` method over
//!   an operator connection for the fleet).
//!
//! The benchmark client is this process: one operator connection per gateway
//! (`clawmesh::cli::client::Client::connect(&Target::Local(state_dir))`) on a tokio
//! **`current_thread`** runtime.
//!
//! 1. **Cross-gateway invoke overhead.** Node `n-a` on gw-a, node `n-b` on gw-b. From the
//!    connection to gw-a, interleaved in one loop: `node.invoke system.which {"bins":["sh"]}`
//!    on `n-a` (local) and on `n-b` (forwarded gw-a → gw-b), plus the link probes `health`
//!    (local) and `gateway.call {gateway:"gw-b", method:"health"}` (one mesh round trip).
//!    n = 2000 with 0 ms on the gw-a ↔ gw-b path, n = 200 (100 probes) with 120 ms RTT set
//!    through `WanRelay::set_path`. The reference link round trip is the median of gw-a's
//!    datagram pings to gw-b (`latencyMs` of `gateway.status`, 64-sample window; gateways run
//!    with `--health-interval 500`). Goal: overhead (remote − local, p50) within one link round
//!    trip + 0.3 ms. For reference: a UDP echo's round trip direct and through a 0 ms relay
//!    site, and what `health`, `node.list {all:true}` and `device.pair.list` cost on gw-a with
//!    2 and with 100 nodes paired (the directory lookup every `node.invoke` does).
//! 2. **Fan-out to 100 nodes.** 98 more node processes (34 / 33 / 33 nodes on gw-a / gw-b /
//!    gw-c in all). From gw-a, interleaved, n = 50 each: `node.invoke {"nodeId":"fleet=bench",
//!    "all":true}` (100 nodes), `region=ra` (gw-a's 34 local nodes) and `region=rb` (gw-b's 33,
//!    all forwarded); wall time per fan-out, result count and failures checked every time.
//!    Baselines: 100 sequential single invokes (one per fleet node), and single local invokes
//!    once 100 devices are paired (per-invoke cost vs part 1). Node host and gateway RSS.
//!    Extra: with 120 ms RTT on gw-a ↔ gw-b and gw-a ↔ gw-c, the 100-node, the gw-b-only, the
//!    gw-c-only and the gw-b + gw-c (`tier=bc`, 66 nodes, all forwarded) fan-outs (n = 10 each,
//!    interleaved).
//!    Node links lost during the run ("node detached" in the gateway logs) are counted.
//!
//! Before each measured phase the run waits (at most 2 minutes, `BENCH_DELEGATION_QUIET_SECS`
//! to change) until the machine is quiet: 1-minute load average below 0.7, or less than 10 %
//! of the CPUs busy with processes outside this benchmark's own process tree over 2 s (the load
//! average also counts this run's own previous phase). The load average and that foreign CPU
//! share are reported per phase.
//!
//! Run it (release, or the numbers mean nothing):
//!
//! ```text
//! cargo build --release --bin clawmesh --example bench_delegation
//! cargo run --release --example bench_delegation
//! ```
//!
//! The `clawmesh` binary is looked up beside the example's directory (`target/release/clawmesh`,
//! honouring `CARGO_TARGET_DIR`); set `CLAWMESH_BIN` to use another one. The Markdown report
//! goes to stdout, progress to stderr. Every process started is stopped (SIGTERM, SIGKILL after
//! a grace period) and the temp dir removed, also on errors and on Ctrl-C
//! (`BENCH_DELEGATION_KEEP=1` keeps it, with every process's log; `BENCH_DELEGATION_LOG=FILTER`
//! sets their log filter, e.g. `debug`); every wait and loop is
//! bounded. The run takes about 2 minutes plus the waits for a quiet machine.

#[path = "support/mod.rs"]
#[allow(dead_code)]
mod support;

use std::collections::{HashMap, HashSet};
use std::fs;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use clawmesh::cli::client::{Client, Target};
use clawmesh::sim::relay::{PathSettings, WanRelay};
use futures_util::FutureExt as _;
use serde_json::{json, Value};
use support::{
    add_site, check_stop, clawmesh_cmd, end_quiet, lat_stats, mb, ms_text, pending_request, poll,
    quiet_text, relay_bench_main, relay_gateway_args, run_cli, runtime_file, sleep, status_field,
    stop_all, udp_rtt, wait_quiet, Echo, Lat, Machine, Proc, Quiet,
};

/// This example's name: its environment variables are `BENCH_DELEGATION_*` (see `support`).
const BENCH: &str = "bench_delegation";

/// Sequential invokes per series with 0 ms added latency.
const N_LAN: usize = 2000;
/// Sequential invokes per series with [`WAN_RTT`].
const N_WAN: usize = 200;
/// Link probes (`health` / `gateway.call health`) every this many iterations at [`WAN_RTT`].
const WAN_PROBE_EVERY: usize = 2;
/// Unmeasured iterations before each series.
const WARMUP: usize = 20;
/// Round trip set on the relay path for the WAN series.
const WAN_RTT: Duration = Duration::from_millis(120);
/// Nodes of the fan-out, per gateway (gw-a, gw-b, gw-c); the first of gw-a and of gw-b are
/// the nodes of part 1.
const SPLIT: [usize; 3] = [34, 33, 33];
/// Measured fan-outs per selector.
const FANOUT_N: usize = 50;
/// Unmeasured fan-outs before them.
const FANOUT_WARMUP: usize = 3;
/// Fan-outs at [`WAN_RTT`].
const FANOUT_WAN_N: usize = 10;
/// Repetitions of the 100 sequential single invokes.
const SEQ100_REPS: usize = 5;
/// Single local invokes once the fleet is paired.
const N_PAIRED: usize = 500;
/// Deadline of one call; a loopback invoke that takes this long is a failure.
const CALL_TIMEOUT: Duration = Duration::from_secs(20);
/// `timeoutMs` of each invoke.
const INVOKE_TIMEOUT_MS: u64 = 10_000;
/// Gateway health ping interval (the default is 10 s), so that the ping median (64-sample
/// window) follows a latency change within ~20 s. Nodes ping their gateway at half of it and
/// give up after two misses, so a gateway stalled for ~0.5 s loses its nodes.
const HEALTH_INTERVAL_MS: &str = "500";
/// Federation join secret.
const TOKEN: &str = "bench-delegation-tok";
/// Longest wait for a quiet machine before measuring anyway.
const QUIET_MAX: Duration = Duration::from_secs(120);

const GATEWAYS: [(&str, &str); 3] = [("gw-a", "ra"), ("gw-b", "rb"), ("gw-c", "rc")];

// ---------------------------------------------------------------------------------------------
// The federation

struct Gateway {
    name: &'static str,
    dir: PathBuf,
    proc: Proc,
}

/// Everything started; dropped in order: nodes (all at once), then gateways.
struct Cluster {
    nodes: Vec<Proc>,
    gateways: Vec<Gateway>,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        stop_all(&mut self.nodes, Duration::from_secs(10));
        let mut gws: Vec<Proc> = Vec::new();
        for g in self.gateways.drain(..) {
            gws.push(g.proc);
        }
        stop_all(&mut gws, Duration::from_secs(10));
    }
}

async fn start_gateway(
    bin: &Path,
    root: &Path,
    (name, region): (&'static str, &'static str),
    public: SocketAddr,
    join: Option<SocketAddr>,
) -> Result<(Gateway, SocketAddr)> {
    let dir = root.join(name);
    let args = relay_gateway_args((name, region), 0, public, TOKEN, HEALTH_INTERVAL_MS, join);
    let mut proc = Proc::spawn(
        name,
        clawmesh_cmd(bin, &dir, &args),
        &root.join(format!("{name}.log")),
    )?;
    let pid = proc.pid();
    // A start takes well under a second; 20 s covers a loaded machine, and a gateway that
    // exits meanwhile fails at once with its log.
    let addr = poll(
        &format!("{name} gateway.json"),
        Duration::from_secs(20),
        Duration::from_millis(20),
        || {
            let r = proc.ensure_running();
            let quic = runtime_file(&dir, pid).and_then(|v| v["quic"].as_str()?.parse().ok());
            async move { r.map(|()| quic) }
        },
    )
    .await?;
    Ok((Gateway { name, dir, proc }, addr))
}

/// A node host attached to `gateway`, labelled `fleet=bench` and `tier=TIER` (`a` on gw-a,
/// `bc` on the others).
fn spawn_node(
    bin: &Path,
    root: &Path,
    name: &str,
    gateway: SocketAddr,
    tier: &str,
) -> Result<Proc> {
    let url = format!("quic://{gateway}");
    let tier = format!("tier={tier}");
    fs::create_dir_all(root.join("nodes"))?;
    Proc::spawn(
        name,
        clawmesh_cmd(
            bin,
            &root.join("nodes").join(name),
            &[
                "node",
                "run",
                "--gateway",
                &url,
                "--name",
                name,
                "--label",
                "fleet=bench",
                "--label",
                &tier,
                "--security",
                "full",
            ],
        ),
        &root.join("nodes").join(format!("{name}.log")),
    )
}

async fn call(client: &Client, method: &str, params: Value) -> Result<Value> {
    client
        .call(method, params, CALL_TIMEOUT)
        .await
        .map_err(|e| anyhow!("{method}: {e}"))
}

/// Status rows of `gateway.status` by gateway name.
async fn status_rows(client: &Client) -> Result<HashMap<String, Value>> {
    let doc = call(client, "gateway.status", json!({"all": true})).await?;
    Ok(doc["gateways"]
        .as_array()
        .map(|gs| {
            gs.iter()
                .filter_map(|g| Some((g["name"].as_str()?.to_string(), g.clone())))
                .collect()
        })
        .unwrap_or_default())
}

/// `node.list {all:true}` as seen from `client`'s gateway: connected nodes by display name.
async fn connected_nodes(client: &Client) -> Result<HashMap<String, Value>> {
    let v = call(client, "node.list", json!({"all": true})).await?;
    Ok(v["nodes"]
        .as_array()
        .map(|ns| {
            ns.iter()
                .filter(|n| n["connected"] == true)
                .filter_map(|n| Some((n["displayName"].as_str()?.to_string(), n.clone())))
                .collect()
        })
        .unwrap_or_default())
}

/// Approves, on each node's own gateway, the pending requests of `names[g]` with
/// `device.pair.approve` (what `clawmesh devices approve` calls).
async fn approve_fleet(clients: &[Client], names: &[Vec<String>]) -> Result<()> {
    let mut left: Vec<HashSet<String>> = names
        .iter()
        .map(|ns| ns.iter().cloned().collect())
        .collect();
    let total: usize = left.iter().map(HashSet::len).sum();
    let t = Instant::now();
    while left.iter().any(|l| !l.is_empty()) {
        check_stop()?;
        if t.elapsed() > Duration::from_secs(90) {
            bail!(
                "pairing requests missing after 90 s: {:?}",
                left.iter().flatten().take(10).collect::<Vec<_>>()
            );
        }
        for (client, left) in clients.iter().zip(left.iter_mut()) {
            if left.is_empty() {
                continue;
            }
            let listing = call(client, "device.pair.list", json!({})).await?;
            for p in listing["pending"].as_array().into_iter().flatten() {
                let (Some(name), Some(req)) = (p["name"].as_str(), p["requestId"].as_str()) else {
                    continue;
                };
                if left.contains(name) {
                    call(client, "device.pair.approve", json!({"requestId": req})).await?;
                    left.remove(name);
                }
            }
        }
        sleep(Duration::from_millis(200)).await?;
    }
    eprintln!(
        "  approved {total} nodes in {:.1} s",
        t.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Approves one node with `clawmesh --state-dir <gw> devices approve <requestId>`.
async fn approve_cli(bin: &Path, gw_dir: &Path, name: &str) -> Result<()> {
    let req = poll(
        &format!("pairing request of {name}"),
        Duration::from_secs(30),
        Duration::from_millis(100),
        || async move {
            let out = run_cli(
                clawmesh_cmd(bin, gw_dir, &["devices", "list", "--json"]),
                Duration::from_secs(20),
            )
            .await?;
            pending_request(&out, name)
        },
    )
    .await?;
    run_cli(
        clawmesh_cmd(bin, gw_dir, &["devices", "approve", &req]),
        Duration::from_secs(20),
    )
    .await?;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Part 1: one invoke, local vs forwarded

fn invoke_params(node: &str, k: &str) -> Value {
    json!({
        "nodeId": node,
        "command": "system.which",
        "params": {"bins": ["sh"]},
        "timeoutMs": INVOKE_TIMEOUT_MS,
        "idempotencyKey": k,
    })
}

async fn invoke_one(client: &Client, node: &str, k: &str) -> Result<()> {
    let v = call(client, "node.invoke", invoke_params(node, k)).await?;
    if !v["payload"]["bins"]["sh"].is_string() {
        bail!("unexpected node.invoke result from {node}: {v}");
    }
    Ok(())
}

/// `n` sequential calls of one method (after [`WARMUP`] unmeasured ones).
async fn method_series(client: &Client, method: &str, params: Value, n: usize) -> Result<Lat> {
    let mut lat = Vec::with_capacity(n);
    for i in 0..WARMUP + n {
        check_stop()?;
        let t = Instant::now();
        call(client, method, params.clone()).await?;
        if i >= WARMUP {
            lat.push(t.elapsed());
        }
    }
    lat_stats(&mut lat)
}

struct PairResult {
    rtt_set: Duration,
    local: Lat,
    remote: Lat,
    health_local: Lat,
    health_remote: Lat,
    /// Median and p99 of gw-a's pings to gw-b (`latencyMs`, `latencyP99Ms`) after the series.
    ping_median: f64,
    ping_p99: f64,
    quiet: Quiet,
    failures: Failures,
}

impl PairResult {
    fn overhead(&self) -> f64 {
        self.remote.p50 - self.local.p50
    }
    fn gateway_call_rtt(&self) -> f64 {
        self.health_remote.p50 - self.health_local.p50
    }
}

/// Interleaved series: local invoke, forwarded invoke, and every `probe_every` iterations the
/// link probes; the order of local/forwarded alternates.
/// Failed calls in a series: how many, the first error, and the longest wait until the
/// forwarded path answered again.
#[derive(Debug, Clone, Default)]
struct Failures {
    count: usize,
    first: Option<String>,
    longest_outage: Duration,
}

/// Most failed iterations tolerated in one series before giving up.
const MAX_FAILURES: usize = 20;

/// Interleaved series: local invoke, forwarded invoke, and every `probe_every` iterations the
/// link probes; the order of local/forwarded alternates. A failed call is counted (its
/// iteration is dropped), then the run waits (up to 20 s) until gw-b answers through gw-a again.
async fn pair_series(
    client: &Client,
    local: &str,
    remote: &str,
    n: usize,
    probe_every: usize,
    tag: &str,
) -> Result<([Lat; 4], Failures)> {
    let mut lat: [Vec<Duration>; 4] = Default::default();
    let mut failures = Failures::default();
    let probe = json!({"gateway": "gw-b", "method": "health", "params": {}});
    for i in 0..WARMUP + n {
        check_stop()?;
        let iteration = async {
            let mut d: [Option<Duration>; 4] = [None; 4];
            let order = if i % 2 == 0 { [0, 1] } else { [1, 0] };
            for which in order {
                let node = if which == 0 { local } else { remote };
                let t = Instant::now();
                invoke_one(client, node, &format!("{tag}-{which}-{i}")).await?;
                d[which] = Some(t.elapsed());
            }
            if i % probe_every == 0 {
                let t = Instant::now();
                call(client, "health", json!({})).await?;
                d[2] = Some(t.elapsed());
                let t = Instant::now();
                let h = call(client, "gateway.call", probe.clone()).await?;
                d[3] = Some(t.elapsed());
                if h["name"] != "gw-b" {
                    bail!("gateway.call health answered by {}", h["name"]);
                }
            }
            Ok(d)
        };
        match iteration.await {
            Ok(d) if i >= WARMUP => {
                for (v, x) in lat.iter_mut().zip(d) {
                    v.extend(x);
                }
            }
            Ok(_) => {}
            Err(e) => {
                check_stop()?;
                failures.count += 1;
                let at = format!("iteration {i}: {e:#}");
                eprintln!("  call failed ({at}); waiting for gw-b to answer again");
                failures.first.get_or_insert(at);
                if failures.count > MAX_FAILURES {
                    bail!("more than {MAX_FAILURES} failed iterations: {e:#}");
                }
                let t = Instant::now();
                poll(
                    "gw-b answering through gw-a again",
                    Duration::from_secs(20),
                    Duration::from_millis(100),
                    || async {
                        let mut p = invoke_params(remote, &format!("{tag}-recover-{i}"));
                        p["timeoutMs"] = json!(2000);
                        Ok(client
                            .call("node.invoke", p, Duration::from_secs(3))
                            .await
                            .ok()
                            .map(|_| ()))
                    },
                )
                .await?;
                failures.longest_outage = failures.longest_outage.max(t.elapsed());
            }
        }
    }
    let [mut a, mut b, mut c, mut d] = lat;
    Ok((
        [
            lat_stats(&mut a)?,
            lat_stats(&mut b)?,
            lat_stats(&mut c)?,
            lat_stats(&mut d)?,
        ],
        failures,
    ))
}

async fn part1(
    client: &Client,
    relay: &WanRelay,
    rtt: Duration,
    local: &str,
    remote: &str,
) -> Result<PairResult> {
    relay.set_path("gw-a", "gw-b", PathSettings::with_rtt(rtt))?;
    let (n, probe_every) = if rtt.is_zero() {
        (N_LAN, 1)
    } else {
        (N_WAN, WAN_PROBE_EVERY)
    };
    let what = format!("part 1, {} ms RTT", rtt.as_millis());
    let (quiet, mark) = wait_quiet(&what, QUIET_MAX).await?;
    eprintln!("  {what}: n = {n}");
    let tag = format!("p1-{}", rtt.as_millis());
    let ([l, r, hl, hr], failures) =
        pair_series(client, local, remote, n, probe_every, &tag).await?;
    let quiet = end_quiet(quiet, &mark);
    let rows = status_rows(client).await?;
    let b = rows.get("gw-b").cloned().unwrap_or(Value::Null);
    Ok(PairResult {
        rtt_set: rtt,
        local: l,
        remote: r,
        health_local: hl,
        health_remote: hr,
        ping_median: b["latencyMs"].as_f64().unwrap_or(f64::NAN),
        ping_p99: b["latencyP99Ms"].as_f64().unwrap_or(f64::NAN),
        quiet,
        failures,
    })
}

// ---------------------------------------------------------------------------------------------
// Part 2: fan-out

struct FanSeries {
    selector: &'static str,
    expect: usize,
    lat: Lat,
    bad: usize,
    first_bad: Option<String>,
}

struct FanResult {
    series: Vec<FanSeries>,
    quiet: Quiet,
    seq100: Lat,
    seq100_per_invoke: Lat,
    paired_local: Lat,
    wan: Vec<FanSeries>,
    wan_quiet: Option<Quiet>,
    node_rss: (u64, u64, u64),
    gw_rss: Vec<(String, u64)>,
    attach_secs: f64,
}

/// One fan-out; returns (wall time, problem if count or failures are off).
async fn fanout(
    client: &Client,
    selector: &str,
    expect: usize,
    k: &str,
) -> Result<(Duration, Option<String>)> {
    let mut p = invoke_params(selector, k);
    p["all"] = json!(true);
    let t = Instant::now();
    let v = call(client, "node.invoke", p).await;
    let d = t.elapsed();
    let v = match v {
        Ok(v) => v,
        Err(e) => return Ok((d, Some(format!("{e:#}")))),
    };
    let count = v["count"].as_u64().unwrap_or(0) as usize;
    let failed = v["failed"].as_u64().unwrap_or(u64::MAX);
    let bad_payload = v["results"]
        .as_array()
        .map(|rs| {
            rs.iter()
                .filter(|r| !r["payload"]["bins"]["sh"].is_string())
                .count()
        })
        .unwrap_or(usize::MAX);
    if count != expect || failed != 0 || bad_payload != 0 {
        let first = v["results"]
            .as_array()
            .and_then(|rs| rs.iter().find(|r| r["ok"] != true).cloned());
        return Ok((
            d,
            Some(format!(
                "{selector}: count {count} (want {expect}), failed {failed}, first failure {}",
                first.unwrap_or(Value::Null)
            )),
        ));
    }
    Ok((d, None))
}

async fn fan_series(
    client: &Client,
    sels: &[(&'static str, usize)],
    warmup: usize,
    n: usize,
    tag: &str,
) -> Result<Vec<FanSeries>> {
    let mut lat: Vec<Vec<Duration>> = vec![Vec::with_capacity(n); sels.len()];
    let mut bad = vec![0usize; sels.len()];
    let mut first_bad: Vec<Option<String>> = vec![None; sels.len()];
    for i in 0..warmup + n {
        check_stop()?;
        for (j, (sel, expect)) in sels.iter().enumerate() {
            let (d, problem) = fanout(client, sel, *expect, &format!("{tag}-{j}-{i}")).await?;
            if i >= warmup {
                lat[j].push(d);
                if let Some(p) = problem {
                    bad[j] += 1;
                    first_bad[j].get_or_insert(p);
                }
            }
        }
    }
    let mut out = Vec::new();
    for (j, (sel, expect)) in sels.iter().enumerate() {
        out.push(FanSeries {
            selector: sel,
            expect: *expect,
            lat: lat_stats(&mut lat[j])?,
            bad: bad[j],
            first_bad: first_bad[j].take(),
        });
    }
    Ok(out)
}

#[allow(clippy::too_many_arguments)]
async fn part2(
    bin: &Path,
    root: &Path,
    cluster: &mut Cluster,
    addrs: &[SocketAddr],
    clients: &[Client],
    relay: &WanRelay,
    local_node: &str,
) -> Result<FanResult> {
    relay.set_path("gw-a", "gw-b", PathSettings::default())?;
    relay.set_path("gw-a", "gw-c", PathSettings::default())?;
    // 98 more nodes: the two of part 1 are the first of gw-a and gw-b.
    let prefixes = ["fa", "fb", "fc"];
    let mut names: Vec<Vec<String>> = vec![Vec::new(); 3];
    let t = Instant::now();
    for (g, &count) in SPLIT.iter().enumerate() {
        let skip = usize::from(g < 2);
        for i in skip..count {
            let name = format!("{}-{i:02}", prefixes[g]);
            cluster.nodes.push(spawn_node(
                bin,
                root,
                &name,
                addrs[g],
                if g == 0 { "a" } else { "bc" },
            )?);
            names[g].push(name);
        }
    }
    eprintln!(
        "part 2: started {} more node hosts",
        names.iter().map(Vec::len).sum::<usize>()
    );
    approve_fleet(clients, &names).await?;
    let total: usize = SPLIT.iter().sum();
    let a = &clients[0];
    let fleet = poll(
        "all fleet nodes attached and visible from gw-a",
        Duration::from_secs(90),
        Duration::from_millis(250),
        || async move {
            let ns = connected_nodes(a).await?;
            let fleet: Vec<Value> = ns
                .into_values()
                .filter(|n| n["labels"]["fleet"] == "bench")
                .collect();
            Ok((fleet.len() == total).then_some(fleet))
        },
    )
    .await?;
    let attach_secs = t.elapsed().as_secs_f64();
    for p in cluster.nodes.iter_mut() {
        p.ensure_running()?;
    }
    let per_gw: HashMap<String, usize> = fleet.iter().fold(HashMap::new(), |mut m, n| {
        *m.entry(n["gateway"].as_str().unwrap_or("?").to_string())
            .or_default() += 1;
        m
    });
    eprintln!("  {total} nodes attached after {attach_secs:.1} s: {per_gw:?}");
    for (g, &count) in SPLIT.iter().enumerate() {
        let got = per_gw.get(GATEWAYS[g].0).copied().unwrap_or(0);
        if got != count {
            bail!(
                "{} holds {got} fleet nodes, expected {count}",
                GATEWAYS[g].0
            );
        }
    }
    // Idle a moment, then memory.
    sleep(Duration::from_secs(3)).await?;
    let rss: Vec<u64> = cluster
        .nodes
        .iter()
        .filter_map(|p| status_field(p.pid(), "VmRSS"))
        .collect();
    let node_rss = (
        rss.iter().sum::<u64>(),
        rss.iter().sum::<u64>() / rss.len().max(1) as u64,
        rss.iter().copied().max().unwrap_or(0),
    );

    let (quiet, mark) = wait_quiet("part 2, fan-out", QUIET_MAX).await?;
    eprintln!("  part 2: {FANOUT_N} fan-outs per selector, interleaved");
    let sels = [
        ("fleet=bench", total),
        ("region=ra", SPLIT[0]),
        ("region=rb", SPLIT[1]),
    ];
    let series = fan_series(a, &sels, FANOUT_WARMUP, FANOUT_N, "fan").await?;
    // 100 sequential single invokes, one per fleet node (local ones first, as listed).
    let mut ids: Vec<(bool, String)> = fleet
        .iter()
        .filter_map(|n| Some((n["local"] != true, n["nodeId"].as_str()?.to_string())))
        .collect();
    ids.sort();
    let mut totals = Vec::with_capacity(SEQ100_REPS);
    let mut each = Vec::with_capacity(SEQ100_REPS * ids.len());
    for r in 0..SEQ100_REPS {
        let t = Instant::now();
        for (i, (_, id)) in ids.iter().enumerate() {
            let t1 = Instant::now();
            invoke_one(a, id, &format!("seq-{r}-{i}")).await?;
            each.push(t1.elapsed());
        }
        totals.push(t.elapsed());
    }
    // Single local invokes now that 100 devices are paired (part 1 had 2).
    let mut paired = Vec::with_capacity(N_PAIRED);
    for i in 0..WARMUP + N_PAIRED {
        check_stop()?;
        let t = Instant::now();
        invoke_one(a, local_node, &format!("paired-{i}")).await?;
        if i >= WARMUP {
            paired.push(t.elapsed());
        }
    }
    let quiet = end_quiet(quiet, &mark);
    let gw_rss = cluster
        .gateways
        .iter()
        .map(|g| {
            (
                g.name.to_string(),
                status_field(g.proc.pid(), "VmRSS").unwrap_or(0),
            )
        })
        .collect();

    // Extra: the 100-node and gw-b-only fan-outs with 120 ms to gw-b and gw-c.
    relay.set_path("gw-a", "gw-b", PathSettings::with_rtt(WAN_RTT))?;
    relay.set_path("gw-a", "gw-c", PathSettings::with_rtt(WAN_RTT))?;
    let (wq, wmark) = wait_quiet("part 2, fan-out at 120 ms", QUIET_MAX).await?;
    let wan_sels = [
        sels[0],
        sels[2],
        ("region=rc", SPLIT[2]),
        ("tier=bc", SPLIT[1] + SPLIT[2]),
    ];
    let wan = fan_series(a, &wan_sels, 2, FANOUT_WAN_N, "fan-wan").await?;
    let wq = end_quiet(wq, &wmark);
    relay.set_path("gw-a", "gw-b", PathSettings::default())?;
    relay.set_path("gw-a", "gw-c", PathSettings::default())?;
    Ok(FanResult {
        series,
        quiet,
        seq100: lat_stats(&mut totals)?,
        seq100_per_invoke: lat_stats(&mut each)?,
        paired_local: lat_stats(&mut paired)?,
        wan,
        wan_quiet: Some(wq),
        node_rss,
        gw_rss,
        attach_secs,
    })
}

// ---------------------------------------------------------------------------------------------
// The run

struct Report {
    part1: Vec<PairResult>,
    part2: FanResult,
    /// Reference round trips and per-call costs: (what, latency).
    diag: Vec<(String, Lat)>,
    /// Per gateway, the "node detached" log lines written during the run.
    detaches: Vec<(String, Vec<String>)>,
}

async fn run_with_relay(bin: &Path, root: &Path, relay: &WanRelay) -> Result<Report> {
    let mut publics = Vec::new();
    for (name, _) in GATEWAYS {
        publics.push(add_site(relay, name, None).await?);
    }
    let mut cluster = Cluster {
        nodes: Vec::new(),
        gateways: Vec::new(),
    };
    let mut addrs = Vec::new();
    eprintln!("starting 3 gateways behind the WAN relay");
    for (i, gw) in GATEWAYS.into_iter().enumerate() {
        let join = (i > 0).then_some(publics[0]);
        let (g, addr) = start_gateway(bin, root, gw, publics[i], join).await?;
        relay.set_target(gw.0, addr)?;
        cluster.gateways.push(g);
        addrs.push(addr);
    }
    let mut clients = Vec::new();
    for g in &cluster.gateways {
        clients.push(
            Client::connect(&Target::Local(g.dir.clone()))
                .await
                .with_context(|| format!("operator connection to {}", g.name))?,
        );
    }
    for (g, client) in cluster.gateways.iter().zip(&clients) {
        poll(
            &format!("{} sees all gateways healthy", g.name),
            Duration::from_secs(30),
            Duration::from_millis(100),
            || async move {
                let rows = status_rows(client).await?;
                Ok((rows.len() == GATEWAYS.len()
                    && rows
                        .values()
                        // A gateway has no latency to itself.
                        .all(|r| {
                            r["status"] == "healthy"
                                && (r["isSelf"] == true || r["latencyMs"].is_number())
                        }))
                .then_some(()))
            },
        )
        .await?;
    }

    let ca = &clients[0];
    // Part 1 nodes: n-a on gw-a, n-b on gw-b, approved with the CLI.
    eprintln!("part 1: nodes n-a (gw-a) and n-b (gw-b)");
    cluster
        .nodes
        .push(spawn_node(bin, root, "n-a", addrs[0], "a")?);
    cluster
        .nodes
        .push(spawn_node(bin, root, "n-b", addrs[1], "bc")?);
    approve_cli(bin, &cluster.gateways[0].dir, "n-a").await?;
    approve_cli(bin, &cluster.gateways[1].dir, "n-b").await?;
    let (na, nb) = poll(
        "n-a and n-b visible from gw-a",
        Duration::from_secs(30),
        Duration::from_millis(100),
        || async move {
            let ns = connected_nodes(ca).await?;
            let id = |name: &str, gw: &str| {
                ns.get(name)
                    .filter(|n| n["gateway"] == gw)
                    .and_then(|n| n["nodeId"].as_str().map(str::to_string))
            };
            Ok(id("n-a", "gw-a").zip(id("n-b", "gw-b")))
        },
    )
    .await?;
    let mut part1_results = Vec::new();
    let mut diag = Vec::new();
    for rtt in [Duration::ZERO, WAN_RTT] {
        if !rtt.is_zero() {
            relay.set_path("gw-a", "gw-b", PathSettings::with_rtt(rtt))?;
            // Let the 64-ping window of gw-a's latency median follow the new path.
            poll(
                "gw-a's ping median to gw-b follows the new RTT",
                Duration::from_secs(60),
                Duration::from_millis(500),
                || async move {
                    let rows = status_rows(ca).await?;
                    let m = rows.get("gw-b").and_then(|r| r["latencyMs"].as_f64());
                    Ok(m.filter(|m| *m >= rtt.as_secs_f64() * 1e3 * 0.9)
                        .map(|_| ()))
                },
            )
            .await?;
        }
        part1_results.push(part1(ca, relay, rtt, &na, &nb).await?);
        if rtt.is_zero() {
            diag.extend(costs(ca, 2, 500).await?);
            // The relay alone: a UDP echo behind a relay site (0 ms) beside the direct echo.
            let echo = Echo::start()?;
            let relayed = add_site(relay, "echo", Some(echo.addr)).await?;
            diag.push((
                "UDP echo round trip, direct (100 B)".into(),
                udp_rtt(echo.addr, 1000, WARMUP).await?,
            ));
            diag.push((
                "UDP echo round trip through the relay, 0 ms path (100 B)".into(),
                udp_rtt(relayed, 1000, WARMUP).await?,
            ));
        }
    }
    relay.set_path("gw-a", "gw-b", PathSettings::default())?;

    let part2 = part2(bin, root, &mut cluster, &addrs, &clients, relay, &na).await?;
    diag.extend(costs(ca, SPLIT.iter().sum(), 200).await?);
    for c in clients {
        c.close().await;
    }
    // Node links lost while the run was going (before anything is stopped on purpose).
    let mut detaches = Vec::new();
    for g in &cluster.gateways {
        let text = fs::read_to_string(&g.proc.log).unwrap_or_default();
        let lines: Vec<String> = text
            .lines()
            .filter(|l| l.contains("node detached"))
            .map(str::to_string)
            .collect();
        detaches.push((g.name.to_string(), lines));
    }
    eprintln!("stopping {} processes", cluster.nodes.len() + 3);
    drop(cluster);
    Ok(Report {
        part1: part1_results,
        part2,
        diag,
        detaches,
    })
}

/// What the directory lookups inside every `node.invoke` cost with `paired` devices paired:
/// `node.list {all:true}` (the entries `node.invoke` builds) and `device.pair.list` (the
/// pairing listing those entries read), beside `health`.
async fn costs(client: &Client, paired: usize, n: usize) -> Result<Vec<(String, Lat)>> {
    Ok(vec![
        (
            format!("`health` on gw-a ({paired} nodes paired)"),
            method_series(client, "health", json!({}), n).await?,
        ),
        (
            format!("`node.list {{all:true}}` on gw-a ({paired} nodes paired)"),
            method_series(client, "node.list", json!({"all": true}), n).await?,
        ),
        (
            format!("`device.pair.list` on gw-a ({paired} nodes paired)"),
            method_series(client, "device.pair.list", json!({}), n).await?,
        ),
    ])
}

// ---------------------------------------------------------------------------------------------
// Report

fn ms(v: f64) -> String {
    ms_text(v, 3)
}

fn lat_row(label: &str, l: &Lat) -> String {
    format!(
        "| {label} | {} | {} | {} | {} | {} | {} |",
        l.n,
        ms(l.p50),
        ms(l.p90),
        ms(l.p99),
        ms(l.max),
        ms(l.mean)
    )
}

fn print_report(r: &Report, machine: &Machine, started: &str, secs: f64) {
    let met = |ok: bool| if ok { "**met**" } else { "**NOT met**" };
    println!("## Cross-gateway delegation (issue 6)\n");
    println!("Run of {started} ({secs:.0} s).\n");
    println!("| machine | |");
    println!("|---|---|");
    for (k, v) in machine {
        println!("| {k} | {v} |");
    }
    println!(
        "| benchmark client | this process, tokio `current_thread` runtime, one QUIC operator \
         connection per gateway; relay on its own 1-worker runtime in the same process |"
    );
    println!("\n### 1. One invoke: local vs forwarded gw-a → gw-b\n");
    for p in &r.part1 {
        println!(
            "**{} ms RTT added on gw-a ↔ gw-b** ({})\n",
            p.rtt_set.as_millis(),
            quiet_text(&p.quiet)
        );
        println!("| series (from gw-a) | n | p50 | p90 | p99 | max | mean |");
        println!("|---|---|---|---|---|---|---|");
        println!("{}", lat_row("`node.invoke` n-a (local node)", &p.local));
        println!(
            "{}",
            lat_row("`node.invoke` n-b (on gw-b, forwarded)", &p.remote)
        );
        println!("{}", lat_row("`health` on gw-a", &p.health_local));
        println!(
            "{}",
            lat_row("`gateway.call` `health` on gw-b", &p.health_remote)
        );
        println!(
            "| overhead remote − local | | {} | {} | {} | | {} |",
            ms(p.remote.p50 - p.local.p50),
            ms(p.remote.p90 - p.local.p90),
            ms(p.remote.p99 - p.local.p99),
            ms(p.remote.mean - p.local.mean)
        );
        println!(
            "\nLink round trip gw-a → gw-b: ping median **{}** (p99 {}; `latencyMs` of \
             `gateway.status`, datagram pings); `gateway.call health` − `health` p50 {}.\n",
            ms(p.ping_median),
            ms(p.ping_p99),
            ms(p.gateway_call_rtt())
        );
        if let Some(first) = &p.failures.first {
            println!(
                "**{} failed iteration(s)** (dropped from the samples; longest wait until gw-b \
                 answered again {:.1} s). First: `{first}`\n",
                p.failures.count,
                p.failures.longest_outage.as_secs_f64()
            );
        }
    }
    let p2 = &r.part2;
    println!("### 2. Fan-out to 100 nodes on three gateways (0 ms relay paths)\n");
    println!("({})\n", quiet_text(&p2.quiet));
    println!(
        "| `node.invoke` `all:true` from gw-a | nodes | n | p50 | p90 | p99 | max | mean | bad \
         results |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    let fan_row = |label: &str, s: &FanSeries| {
        println!(
            "| {label} `{}` | {} | {} | {} | {} | {} | {} | {} | {} |",
            s.selector,
            s.expect,
            s.lat.n,
            ms(s.lat.p50),
            ms(s.lat.p90),
            ms(s.lat.p99),
            ms(s.lat.max),
            ms(s.lat.mean),
            s.bad
        );
    };
    for s in &p2.series {
        let label = match s.selector {
            "fleet=bench" => "all three gateways",
            "region=ra" => "baseline: gw-a's local nodes",
            _ => "gw-b's nodes only (all forwarded)",
        };
        fan_row(label, s);
    }
    for w in &p2.wan {
        fan_row("120 ms RTT to gw-b and gw-c:", w);
    }
    println!(
        "| baseline: 100 sequential single invokes (total) | 100 | {} | {} | {} | {} | {} | {} | \
         0 |",
        p2.seq100.n,
        ms(p2.seq100.p50),
        ms(p2.seq100.p90),
        ms(p2.seq100.p99),
        ms(p2.seq100.max),
        ms(p2.seq100.mean)
    );
    println!();
    println!("| single invokes with 100 nodes paired | n | p50 | p90 | p99 | max | mean |");
    println!("|---|---|---|---|---|---|---|");
    println!(
        "{}",
        lat_row(
            "each of the 100 sequential invokes (34 local, 66 forwarded)",
            &p2.seq100_per_invoke
        )
    );
    println!(
        "{}",
        lat_row("`node.invoke` n-a (local), 100 paired", &p2.paired_local)
    );
    if let Some(p) = r.part1.first() {
        println!(
            "{}",
            lat_row("`node.invoke` n-a (local), 2 paired (part 1)", &p.local)
        );
    }
    if let Some(q) = &p2.wan_quiet {
        println!("\n120 ms fan-out: {}.", quiet_text(q));
    }
    println!(
        "\nMemory: 100 node hosts {} in all, {} on average, {} at most (VmRSS, idle after \
         attaching); gateways {}. All 100 attached and visible from gw-a {:.1} s after the \
         first of the 98 fleet processes started.",
        mb(p2.node_rss.0),
        mb(p2.node_rss.1),
        mb(p2.node_rss.2),
        p2.gw_rss
            .iter()
            .map(|(n, kb)| format!("{n} {}", mb(*kb)))
            .collect::<Vec<_>>()
            .join(", "),
        p2.attach_secs
    );
    for s in p2.series.iter().chain(p2.wan.iter()) {
        if let Some(b) = &s.first_bad {
            println!("\nFirst bad fan-out for `{}`: {b}", s.selector);
        }
    }
    let lost: usize = r.detaches.iter().map(|(_, l)| l.len()).sum();
    println!(
        "\nNode links lost during the run (\"node detached\" in the gateway logs, before the \
         shutdown): {lost} ({}).",
        r.detaches
            .iter()
            .map(|(g, l)| format!("{g} {}", l.len()))
            .collect::<Vec<_>>()
            .join(", ")
    );
    if let Some(first) = r.detaches.iter().flat_map(|(_, l)| l.first()).next() {
        println!("First: `{}`", first.trim());
    }
    println!("\n### Reference round trips and per-call costs (gw-a, sequential)\n");
    println!("| what | n | p50 | p90 | p99 | max | mean |");
    println!("|---|---|---|---|---|---|---|");
    for (what, l) in &r.diag {
        println!("{}", lat_row(what, l));
    }
    println!("\n### Goals\n");
    println!("| goal | result | |");
    println!("|---|---|---|");
    for p in &r.part1 {
        let budget = p.ping_median + 0.3;
        println!(
            "| {} ms: forwarded − local (p50) ≤ link RTT (ping median) + 0.3 ms | {:.3} ms vs \
             {:.3} + 0.3 ms: {:+.3} ms over the link RTT (over the `gateway.call health` round \
             trip {:.3} ms: {:+.3} ms) | {} |",
            p.rtt_set.as_millis(),
            p.overhead(),
            p.ping_median,
            p.overhead() - p.ping_median,
            p.gateway_call_rtt(),
            p.overhead() - p.gateway_call_rtt(),
            met(p.overhead() <= budget)
        );
    }
    if let Some(s) = p2.series.first() {
        println!(
            "| fan-out to 100 nodes: count 100, failures 0 in all {} | {} bad | {} |",
            s.lat.n,
            s.bad,
            met(s.bad == 0)
        );
    }
}

// ---------------------------------------------------------------------------------------------

fn main() -> Result<()> {
    relay_bench_main(
        |bin, root, relay| run_with_relay(bin, root, relay).boxed_local(),
        print_report,
    )
}
