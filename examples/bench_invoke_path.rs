//! On-demand benchmark of the invoke path against its limit (issue 18): `node.invoke
//! system.which` through a real gateway and node host, beside a raw two-hop quinn relay with
//! the same frame sizes, measured in the same run, with the invoke's per-hop breakdown.
//!
//! All on 127.0.0.1, strictly sequential calls (n = 2000 per series after warm-up;
//! `BENCH_INVOKE_PATH_N` changes it, e.g. for a long `perf record`), the benchmark client on a
//! tokio `current_thread` runtime:
//!
//! 1. **raw one hop**: client → quinn echo. One bidirectional stream per call on one
//!    connection: the request bytes, finish, the reply bytes, finish.
//! 2. **raw two hops** (the baseline of the goal): client → quinn relay → quinn echo. What the
//!    relay does per call is what the gateway does for an invoke minus what clawmesh adds:
//!    it accepts the client's bidirectional stream on the task that accepts streams, spawns a
//!    task for it (as `rpc::serve` does), reads the request to its end (`read_to_end`: the
//!    client finishes its side with the bytes), opens a **new** bidirectional stream per call
//!    on its one connection to the echo (as the gateway does to a node), writes the bytes and
//!    finishes, reads the echo's reply to its end, writes it back and finishes. No framing,
//!    no parsing: the bytes are opaque, of the sizes of a real `node.invoke` request and its
//!    answer (measured first; the product's 4-byte length prefix and postcard envelope add a
//!    few bytes). The echo answers each stream with the reply bytes after reading the request
//!    to its end. Both use the product's QUIC settings and TLS (`clawmesh_federation::
//!    endpoint`, ed25519 raw public keys, TLS 1.3), and **the product's runtimes**: the relay a
//!    2-worker `multi_thread` runtime like `clawmesh gateway run`, the echo a `current_thread`
//!    runtime like `clawmesh node run` (`src/main.rs`). Measured twice: relay and echo on
//!    threads of this process (the client's process: cheaper thread switches, one address
//!    space) and **with relay and echo each a process of its own** (this program started again
//!    with `BENCH_INVOKE_PATH_ROLE`), as the gateway and the node are: the like-for-like
//!    baseline. For each process of the per-process relay and of the invoke, the CPU time and
//!    context switches per call (`/proc/PID/task/*`), read around the interleaved chunks.
//! 3. **`health`** on the gateway: operator → gateway only (client, operator protocol, method
//!    dispatch), no node.
//! 4. **`node.invoke` `system.which {"bins":["sh"]}`**: operator → gateway → node → back, the
//!    real `clawmesh gateway run` and `clawmesh node run` processes (release binary); with
//!    `BENCH_INVOKE_PATH_BASE_BIN=/path/to/old/clawmesh` also a second gateway and node of
//!    that binary, for a before/after in the same run.
//!    Also the same binary with its gateway on **one** worker thread (`TOKIO_WORKER_THREADS=1`):
//!    what the multi-threaded runtime's hand-offs between workers cost.
//! 5. **`node.invoke` with `"timing": true`**: the same, answered with the wall-clock stamps
//!    of the gateway and the node, which with the client's own give seven legs (operator →
//!    gateway, gateway work before the node send, gateway → node, node work, node → gateway,
//!    gateway work after the reply, gateway → operator).
//! 6. **`system.which` in-process**: the node's own work, no transport.
//!
//! The two-hop series and the invokes are interleaved in rounds, so a change of the machine's
//! load during the run hits each alike.
//!
//! ```text
//! cargo build --release --bin clawmesh --example bench_invoke_path
//! cargo run --release --example bench_invoke_path
//! # one series only, for a profiler (prints the server processes' pids first):
//! BENCH_INVOKE_PATH_ONLY=invoke|relay BENCH_INVOKE_PATH_N=20000 target/release/examples/bench_invoke_path
//! ```

#[allow(dead_code)]
mod support;

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context, Result};
use clawmesh::cli::client::{Client, Target};
use clawmesh::node::which::{self, WhichParams};
use clawmesh_federation::endpoint::{self, TransportOptions};
use clawmesh_federation::identity::DeviceIdentity;
use serde_json::{json, Value};
use support::{
    clawmesh_bin, clawmesh_cmd, install_ctrl_c, lat_stats, machine, now_utc,
    start_gateway_and_node, stop_all, Lat,
};

const BENCH: &str = "bench_invoke_path";

/// Measured calls per series (`BENCH_INVOKE_PATH_N` overrides, e.g. for a long profile).
const N_DEFAULT: usize = 2000;
/// Unmeasured calls first.
const WARMUP: usize = 50;
/// Deadline of one call.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest reply the raw client and relay read (the real replies are a few hundred bytes).
const MAX_RAW: usize = 64 * 1024;
const NODE_NAME: &str = "path-node";

fn invoke_params(node_id: &str, k: usize) -> Value {
    json!({
        "nodeId": node_id,
        "command": "system.which",
        "params": {"bins": ["sh"]},
        "timeoutMs": 10_000,
        "idempotencyKey": format!("path-{k}"),
    })
}

/// A QUIC endpoint on 127.0.0.1 with a fresh identity under `dir`.
fn quic_endpoint(dir: &Path) -> Result<quinn::Endpoint> {
    let (id, _) = DeviceIdentity::load_or_create(dir)?;
    Ok(endpoint::bind(
        &id,
        SocketAddr::from(([127, 0, 0, 1], 0)),
        &TransportOptions::default(),
    )?)
}

/// The runtime a raw server uses: the relay's is the gateway's (`multi_thread`, 2 workers,
/// as `src/main.rs` builds it for `clawmesh gateway run`), the echo's the node host's
/// (`current_thread`), so the raw path and the product differ only in what clawmesh does per
/// request. `BENCH_INVOKE_PATH_RELAY_WORKERS` changes the relay's worker count (0 =
/// `current_thread`), for experiments only.
fn runtime_for(role: &str) -> Result<tokio::runtime::Runtime> {
    let workers = match role {
        "relay" => std::env::var(support::bench_env("RELAY_WORKERS"))
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(2),
        _ => 0,
    };
    let mut b = if workers == 0 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        b.worker_threads(workers);
        b
    };
    Ok(b.thread_name(format!("raw-{role}")).enable_all().build()?)
}

/// Runs `f` on its own thread with the runtime of `role` (a server of the raw path).
fn server_thread<F>(name: &str, f: F) -> Result<()>
where
    F: std::future::Future<Output = Result<()>> + Send + 'static,
{
    let rt = runtime_for(name.trim_start_matches("raw-"))?;
    std::thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            if let Err(e) = rt.block_on(f) {
                eprintln!("raw server: {e:#}");
            }
        })?;
    Ok(())
}

/// The raw echo: answers every stream with `reply` bytes after reading the request; `ready`
/// gets its address.
async fn echo_serve(
    dir: std::path::PathBuf,
    reply: usize,
    ready: impl FnOnce(SocketAddr) -> Result<()>,
) -> Result<()> {
    let ep = quic_endpoint(&dir)?;
    ready(ep.local_addr()?)?;
    let body = vec![b'r'; reply];
    while let Some(inc) = ep.accept().await {
        let conn = endpoint::accept(inc).await?;
        let body = body.clone();
        tokio::spawn(async move {
            while let Ok((mut send, mut recv)) = conn.accept_bi().await {
                let body = body.clone();
                tokio::spawn(async move {
                    let _ = recv.read_to_end(MAX_RAW).await;
                    let _ = send.write_all(&body).await;
                    let _ = send.finish();
                });
            }
        });
    }
    Ok(())
}

/// The raw relay: every stream from a client is forwarded on one connection to `echo`.
async fn relay_serve(
    dir: std::path::PathBuf,
    echo: SocketAddr,
    ready: impl FnOnce(SocketAddr) -> Result<()>,
) -> Result<()> {
    let ep = quic_endpoint(&dir)?;
    let upstream = endpoint::dial(&ep, echo, CALL_TIMEOUT).await?;
    ready(ep.local_addr()?)?;
    while let Some(inc) = ep.accept().await {
        let conn = endpoint::accept(inc).await?;
        let upstream = upstream.clone();
        tokio::spawn(async move {
            while let Ok((mut send, mut recv)) = conn.accept_bi().await {
                let upstream = upstream.clone();
                tokio::spawn(async move {
                    let Ok(req) = recv.read_to_end(MAX_RAW).await else {
                        return;
                    };
                    let Ok((mut us, mut ur)) = upstream.open_bi().await else {
                        return;
                    };
                    let _ = us.write_all(&req).await;
                    let _ = us.finish();
                    let Ok(reply) = ur.read_to_end(MAX_RAW).await else {
                        return;
                    };
                    let _ = send.write_all(&reply).await;
                    let _ = send.finish();
                });
            }
        });
    }
    Ok(())
}

/// The raw echo on a thread of this process.
fn start_echo(dir: &Path, reply: usize) -> Result<SocketAddr> {
    let (tx, rx) = std::sync::mpsc::channel();
    let ready = move |a| Ok(tx.send(a)?);
    server_thread("raw-echo", echo_serve(dir.to_path_buf(), reply, ready))?;
    Ok(rx.recv_timeout(Duration::from_secs(10))?)
}

/// The raw relay on a thread of this process.
fn start_relay(dir: &Path, echo: SocketAddr) -> Result<SocketAddr> {
    let (tx, rx) = std::sync::mpsc::channel();
    let ready = move |a| Ok(tx.send(a)?);
    server_thread("raw-relay", relay_serve(dir.to_path_buf(), echo, ready))?;
    Ok(rx.recv_timeout(Duration::from_secs(10))?)
}

/// The environment variable that makes this program a raw server process (`echo` or
/// `relay`), for the raw path with a process per hop like the product's.
const ROLE_ENV: &str = "BENCH_INVOKE_PATH_ROLE";

/// This program as a raw server process: `BENCH_INVOKE_PATH_ROLE=echo|relay`, its state dir
/// as the first argument, then the reply size (echo) or the echo's address (relay); writes
/// its address to `DIR/addr` and serves until killed. The runtime of [`runtime_for`].
fn serve_role(role: &str) -> Result<()> {
    let mut args = std::env::args().skip(1);
    let dir = std::path::PathBuf::from(args.next().context("state dir")?);
    let arg = args.next().context("reply size or echo address")?;
    std::fs::create_dir_all(&dir)?;
    let addr_file = dir.join("addr");
    let ready = move |a: SocketAddr| Ok(std::fs::write(&addr_file, a.to_string())?);
    let rt = runtime_for(role)?;
    match role {
        "echo" => rt.block_on(echo_serve(dir, arg.parse()?, ready)),
        "relay" => rt.block_on(relay_serve(dir, arg.parse()?, ready)),
        other => Err(anyhow!("unknown {ROLE_ENV} {other}")),
    }
}

/// Starts this program as a raw server process and waits for its address.
fn spawn_role(role: &str, dir: &Path, arg: &str) -> Result<(support::Proc, SocketAddr)> {
    let mut cmd = std::process::Command::new(std::env::current_exe()?);
    cmd.env(ROLE_ENV, role).arg(dir).arg(arg);
    std::fs::create_dir_all(dir)?;
    let mut p = support::Proc::spawn(&format!("raw {role}"), cmd, &dir.with_extension("log"))?;
    // It binds and answers in milliseconds; 20 s covers a loaded machine.
    let addr = support::poll_blocking(
        &format!("raw {role} address"),
        Duration::from_secs(20),
        Duration::from_millis(20),
        || {
            p.ensure_running()?;
            Ok(std::fs::read_to_string(dir.join("addr"))
                .ok()
                .and_then(|a| a.parse().ok()))
        },
    )?;
    Ok((p, addr))
}

/// Calls per series.
fn n() -> usize {
    std::env::var(support::bench_env("N"))
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(N_DEFAULT)
}

/// Sequential raw calls of `request` bytes to `target` from a fresh client endpoint.
async fn raw_series(dir: &Path, target: SocketAddr, request: usize) -> Result<Lat> {
    let ep = quic_endpoint(dir)?;
    let conn = endpoint::dial(&ep, target, CALL_TIMEOUT).await?;
    let body = vec![b'q'; request];
    let n = n();
    let mut lat = Vec::with_capacity(n);
    for i in 0..WARMUP + n {
        let t = Instant::now();
        let (mut send, mut recv) = conn.open_bi().await?;
        send.write_all(&body).await?;
        send.finish()?;
        let reply = recv.read_to_end(MAX_RAW).await?;
        std::hint::black_box(reply);
        if i >= WARMUP {
            lat.push(t.elapsed());
        }
    }
    lat_stats(&mut lat)
}

async fn call_series(
    client: &Client,
    method: &str,
    params: impl Fn(usize) -> Value,
) -> Result<Lat> {
    let n = n();
    let mut lat = Vec::with_capacity(n);
    for i in 0..WARMUP + n {
        let t = Instant::now();
        client
            .call(method, params(i), CALL_TIMEOUT)
            .await
            .map_err(|e| anyhow!("{method}: {e}"))?;
        if i >= WARMUP {
            lat.push(t.elapsed());
        }
    }
    lat_stats(&mut lat)
}

/// CPU time (ns) and context switches (voluntary and involuntary) of process `pid` so far,
/// summed over its threads (`/proc/PID/task/*/{schedstat,status}`; a thread that exits between
/// two reads takes its share with it, which the gateway's and node's long-lived workers do
/// not).
fn proc_cost(pid: i32) -> (u64, u64) {
    let (mut cpu, mut switches) = (0, 0);
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return (0, 0);
    };
    for t in tasks.flatten() {
        let p = t.path();
        if let Ok(s) = std::fs::read_to_string(p.join("schedstat")) {
            cpu += s
                .split_whitespace()
                .next()
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0);
        }
        if let Ok(s) = std::fs::read_to_string(p.join("status")) {
            for l in s.lines() {
                if let Some(v) = l
                    .strip_prefix("voluntary_ctxt_switches:")
                    .or_else(|| l.strip_prefix("nonvoluntary_ctxt_switches:"))
                {
                    switches += v.trim().parse::<u64>().unwrap_or(0);
                }
            }
        }
    }
    (cpu, switches)
}

/// What the two server processes of a series (relay and echo, or gateway and node) spent per
/// call: CPU time and context switches, summed over the series' chunks.
#[derive(Debug, Default, Clone, Copy)]
struct Cost {
    calls: u64,
    cpu_ns: [u64; 2],
    switches: [u64; 2],
}

impl Cost {
    /// Runs `calls` calls (`f`) and adds what `pids` spent meanwhile.
    async fn during<Fut>(&mut self, pids: [i32; 2], calls: usize, f: Fut) -> Result<()>
    where
        Fut: std::future::Future<Output = Result<()>>,
    {
        let before = pids.map(proc_cost);
        f.await?;
        let after = pids.map(proc_cost);
        for i in 0..2 {
            self.cpu_ns[i] += after[i].0.saturating_sub(before[i].0);
            self.switches[i] += after[i].1.saturating_sub(before[i].1);
        }
        self.calls += calls as u64;
        Ok(())
    }

    /// `(CPU µs, context switches)` per call of process `i`.
    fn per_call(&self, i: usize) -> (f64, f64) {
        let n = self.calls.max(1) as f64;
        (self.cpu_ns[i] as f64 / 1e3 / n, self.switches[i] as f64 / n)
    }
}

/// Rounds the compared series are interleaved in (raw two hops, invoke, the old binary's
/// invoke), so a change of the machine's load during the run hits each the same.
const ROUNDS: usize = 5;

/// One interleaved chunk: `per` calls after a few unmeasured ones, appended to `out`.
async fn chunk<F, Fut>(per: usize, out: &mut Vec<Duration>, mut call: F) -> Result<()>
where
    F: FnMut(usize) -> Fut,
    Fut: std::future::Future<Output = Result<()>>,
{
    for i in 0..10 + per {
        let t = Instant::now();
        call(i).await?;
        if i >= 10 {
            out.push(t.elapsed());
        }
    }
    Ok(())
}

async fn raw_call(conn: &quinn::Connection, body: &[u8]) -> Result<()> {
    let (mut send, mut recv) = conn.open_bi().await?;
    send.write_all(body).await?;
    send.finish()?;
    std::hint::black_box(recv.read_to_end(MAX_RAW).await?);
    Ok(())
}

async fn invoke_call(client: &Client, node_id: &str, k: usize) -> Result<()> {
    client
        .call("node.invoke", invoke_params(node_id, k), CALL_TIMEOUT)
        .await
        .map_err(|e| anyhow!("node.invoke: {e}"))?;
    Ok(())
}

/// The legs of one timed invoke, in ns, from the wall-clock stamps of the benchmark client,
/// the gateway and the node (one host, one clock).
const LEGS: [&str; 7] = [
    "operator → gateway (client encode, QUIC, stream accept, frame read)",
    "gateway before the node send (params, dispatch, scope check, target lookup, audit start)",
    "gateway → node (request encode, stream open, QUIC, node accept, frame read)",
    "node (params, `which`, result JSON)",
    "node → gateway (reply encode, QUIC, gateway read)",
    "gateway after the node reply (payload parse, audit hand-off, metrics, reply JSON)",
    "gateway → operator (reply text, frame, QUIC, client read and JSON parse)",
];

/// `per` invokes with `"timing": true` (after 10 unmeasured): the total and each leg of
/// every call appended to `total` and `legs`.
async fn timed_chunk(
    client: &Client,
    node_id: &str,
    per: usize,
    total: &mut Vec<Duration>,
    legs: &mut [Vec<Duration>],
) -> Result<()> {
    for i in 0..10 + per {
        let mut params = invoke_params(node_id, i);
        params["timing"] = json!(true);
        let t = Instant::now();
        let sent = clawmesh::node_protocol::wall_ns();
        let r = client
            .call("node.invoke", params, CALL_TIMEOUT)
            .await
            .map_err(|e| anyhow!("node.invoke (timed): {e}"))?;
        let got = clawmesh::node_protocol::wall_ns();
        let el = t.elapsed();
        if i < 10 {
            continue;
        }
        let tm = &r["timing"];
        let stamp = |k: &str| {
            tm[k]
                .as_u64()
                .ok_or_else(|| anyhow!("no {k} in the reply's timing: {tm}"))
        };
        let stamps = [
            sent,
            stamp("gatewayReceivedNs")?,
            stamp("nodeSentNs")?,
            stamp("nodeReceivedNs")?,
            stamp("nodeRepliedNs")?,
            stamp("replyReceivedNs")?,
            stamp("gatewayRepliedNs")?,
            got,
        ];
        for (l, w) in legs.iter_mut().zip(stamps.windows(2)) {
            l.push(Duration::from_nanos(w[1].saturating_sub(w[0])));
        }
        total.push(el);
    }
    Ok(())
}

fn which_in_process() -> Result<Lat> {
    let n = n();
    let mut lat = Vec::with_capacity(n);
    for i in 0..WARMUP + n {
        let t = Instant::now();
        let p = WhichParams::from_value(json!({"bins": ["sh"]}))?;
        let r = which::which(&p)?;
        std::hint::black_box(serde_json::to_value(r)?.to_string());
        if i >= WARMUP {
            lat.push(t.elapsed());
        }
    }
    lat_stats(&mut lat)
}

struct Report {
    sizes: (usize, usize),
    one_hop: Lat,
    two_hops: Lat,
    two_procs: Lat,
    health: Lat,
    invoke: Lat,
    base: Option<Lat>,
    one_worker: Lat,
    timed: Lat,
    legs: Vec<Lat>,
    which: Lat,
    /// Per call: relay and echo processes; gateway and node; the old binary's.
    costs: Vec<(&'static str, [&'static str; 2], Cost)>,
    load: String,
    load_end: String,
}

/// A gateway and node of `bin` under `root`: (processes, gateway dir, node id). With
/// `workers`, the processes get `TOKIO_WORKER_THREADS` (only the gateway's runtime reads it:
/// the node host's is `current_thread`).
fn pair(
    bin: &Path,
    root: &Path,
    workers: Option<usize>,
) -> Result<(Vec<support::Proc>, std::path::PathBuf, String)> {
    std::fs::create_dir_all(root)?;
    let (gw, node, gw_dir, node_id) =
        start_gateway_and_node(bin, root, ("path-gw", NODE_NAME), |dir, args| {
            let mut c = clawmesh_cmd(bin, dir, args);
            if let Some(w) = workers {
                c.env("TOKIO_WORKER_THREADS", w.to_string());
            }
            Ok(c)
        })?;
    Ok((vec![gw, node], gw_dir, node_id))
}

fn main() -> Result<()> {
    if let Ok(role) = std::env::var(ROLE_ENV) {
        return serve_role(&role);
    }
    install_ctrl_c();
    let bin = clawmesh_bin()?;
    let base_bin = std::env::var_os(support::bench_env("BASE_BIN")).map(std::path::PathBuf::from);
    let tmp = tempfile::Builder::new()
        .prefix("bench-invoke-path-")
        .tempdir()?;
    let root = tmp.path();
    let started = now_utc();
    let (mut procs, gw_dir, node_id) = pair(&bin, root, None)?;
    // The same binary with its gateway on one worker thread: what the multi-threaded
    // runtime's hand-offs between workers cost the invoke.
    let (one_procs, one_dir, one_id) = match pair(&bin, &root.join("one-worker"), Some(1)) {
        Ok(p) => p,
        Err(e) => {
            stop_all(&mut procs, Duration::from_secs(10));
            return Err(e.context("starting the one-worker gateway and node"));
        }
    };
    let one_pids: Vec<i32> = one_procs.iter().map(support::Proc::pid).collect();
    procs.extend(one_procs);
    let base = match &base_bin {
        Some(b) => match pair(b, &root.join("base"), None) {
            Ok((p, d, id)) => {
                procs.extend(p);
                Some((d, id))
            }
            Err(e) => {
                stop_all(&mut procs, Duration::from_secs(10));
                return Err(e.context("starting the old binary's gateway and node"));
            }
        },
        None => None,
    };
    let mut procs_raw = Vec::new();
    // gateway, node, the one-worker gateway and node, then the old binary's gateway and node.
    let pids: Vec<i32> = procs.iter().map(support::Proc::pid).collect();
    let result = (|| {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        rt.block_on(async {
            let client = Client::connect(&Target::Local(gw_dir.clone()))
                .await
                .context("operator connection")?;
            let base_client = match &base {
                Some((d, id)) => Some((
                    Client::connect(&Target::Local(d.clone()))
                        .await
                        .context("operator connection to the old binary's gateway")?,
                    id.clone(),
                )),
                None => None,
            };
            let one_client = Client::connect(&Target::Local(one_dir.clone()))
                .await
                .context("operator connection to the one-worker gateway")?;
            // Frame sizes of a real invoke: the request as sent and the answer.
            let sample = client
                .call("node.invoke", invoke_params(&node_id, 0), CALL_TIMEOUT)
                .await
                .map_err(|e| anyhow!("node.invoke: {e}"))?;
            let request = json!({"method": "node.invoke", "params": invoke_params(&node_id, 0)})
                .to_string()
                .len();
            let reply = sample.to_string().len();
            let echo = start_echo(&root.join("echo"), reply)?;
            let relay = start_relay(&root.join("relay"), echo)?;
            // The same two hops with relay and echo each a process of its own, as the
            // gateway and the node are.
            let (p_echo, echo_p) = spawn_role("echo", &root.join("echo-proc"), &reply.to_string())?;
            procs_raw.push(p_echo);
            let (p_relay, relay_p) =
                spawn_role("relay", &root.join("relay-proc"), &echo_p.to_string())?;
            procs_raw.push(p_relay);
            let raw_pids: Vec<i32> = procs_raw.iter().map(support::Proc::pid).collect();
            let load = support::loadavg3();
            eprintln!("raw one hop");
            let one_hop = raw_series(&root.join("c1"), echo, request).await?;
            eprintln!("health");
            let health = call_series(&client, "health", |_| json!({})).await?;
            eprintln!(
                "raw two hops, node.invoke{} interleaved",
                if base_client.is_some() {
                    ", old binary's node.invoke"
                } else {
                    ""
                }
            );
            let ep = quic_endpoint(&root.join("c2"))?;
            let relay_conn = endpoint::dial(&ep, relay, CALL_TIMEOUT).await?;
            let relay_proc_conn = endpoint::dial(&ep, relay_p, CALL_TIMEOUT).await?;
            let mut two_proc = Vec::new();
            let body = vec![b'q'; request];
            let per = n().div_ceil(ROUNDS);
            let (mut two, mut inv, mut old) = (Vec::new(), Vec::new(), Vec::new());
            let mut timed = Vec::new();
            let mut legs: Vec<Vec<Duration>> = vec![Vec::new(); LEGS.len()];
            for _ in 0..WARMUP {
                raw_call(&relay_conn, &body).await?;
                raw_call(&relay_proc_conn, &body).await?;
            }
            if let Ok(only) = std::env::var(support::bench_env("ONLY")) {
                // For a profiler: one series for n calls, the processes' pids first.
                eprintln!(
                    "pids: gateway {} node {} relay {} echo {}",
                    pids[0], pids[1], raw_pids[1], raw_pids[0]
                );
                let mut sink = Vec::new();
                match only.as_str() {
                    "invoke" => {
                        chunk(n(), &mut sink, |k| invoke_call(&client, &node_id, k)).await?
                    }
                    "relay" => chunk(n(), &mut sink, |_| raw_call(&relay_proc_conn, &body)).await?,
                    other => return Err(anyhow!("{BENCH}: ONLY={other}: invoke or relay")),
                }
                let l = lat_stats(&mut sink)?;
                eprintln!("{only}: p50 {:.3} ms p90 {:.3} ms", l.p50, l.p90);
                std::process::exit(0);
            }
            let (mut relay_cost, mut inv_cost, mut old_cost, mut one_cost) = (
                Cost::default(),
                Cost::default(),
                Cost::default(),
                Cost::default(),
            );
            let mut one = Vec::new();
            let calls = 10 + per;
            for round in 0..ROUNDS {
                chunk(per, &mut two, |_| raw_call(&relay_conn, &body)).await?;
                relay_cost
                    .during([raw_pids[1], raw_pids[0]], calls, async {
                        chunk(per, &mut two_proc, |_| raw_call(&relay_proc_conn, &body)).await
                    })
                    .await?;
                inv_cost
                    .during([pids[0], pids[1]], calls, async {
                        chunk(per, &mut inv, |k| {
                            invoke_call(&client, &node_id, round * per + k)
                        })
                        .await
                    })
                    .await?;
                one_cost
                    .during([one_pids[0], one_pids[1]], calls, async {
                        chunk(per, &mut one, |k| {
                            invoke_call(&one_client, &one_id, round * per + k)
                        })
                        .await
                    })
                    .await?;
                if let Some((c, id)) = &base_client {
                    old_cost
                        .during([pids[4], pids[5]], calls, async {
                            chunk(per, &mut old, |k| invoke_call(c, id, round * per + k)).await
                        })
                        .await?;
                }
                timed_chunk(&client, &node_id, per, &mut timed, &mut legs).await?;
            }
            let mut costs = vec![
                (
                    "raw two hops, a process per hop",
                    ["relay", "echo"],
                    relay_cost,
                ),
                ("`node.invoke`", ["gateway", "node"], inv_cost),
                (
                    "`node.invoke`, gateway on one worker",
                    ["gateway", "node"],
                    one_cost,
                ),
            ];
            if base_client.is_some() {
                costs.push(("`node.invoke`, old binary", ["gateway", "node"], old_cost));
            }
            let legs = legs
                .iter_mut()
                .map(|l| lat_stats(l))
                .collect::<Result<Vec<_>>>()?;
            let which = which_in_process()?;
            Ok::<_, anyhow::Error>(Report {
                sizes: (request, reply),
                one_hop,
                two_hops: lat_stats(&mut two)?,
                two_procs: lat_stats(&mut two_proc)?,
                health,
                invoke: lat_stats(&mut inv)?,
                base: if old.is_empty() {
                    None
                } else {
                    Some(lat_stats(&mut old)?)
                },
                one_worker: lat_stats(&mut one)?,
                timed: lat_stats(&mut timed)?,
                legs,
                which,
                costs,
                load,
                load_end: support::loadavg3(),
            })
        })
    })();
    stop_all(&mut procs, Duration::from_secs(10));
    stop_all(&mut procs_raw, Duration::from_secs(10));
    let r = result?;
    println!("## bench_invoke_path, {started}");
    println!();
    for (k, v) in machine() {
        println!("- {k}: {v}");
    }
    println!(
        "- load average at the start / end of the series: {} / {}",
        r.load, r.load_end
    );
    if let Some(b) = &base_bin {
        println!("- old binary (BENCH_INVOKE_PATH_BASE_BIN): {}", b.display());
    }
    println!(
        "- frame sizes of the raw path: request {} B, reply {} B (a real node.invoke and its answer)",
        r.sizes.0, r.sizes.1
    );
    println!();
    println!(
        "| series (sequential, n = {}) | p50 | p90 | p99 | mean |",
        n()
    );
    println!("|---|---|---|---|---|");
    let row = |label: &str, l: &Lat| {
        println!(
            "| {label} | {:.3} ms | {:.3} ms | {:.3} ms | {:.3} ms |",
            l.p50, l.p90, l.p99, l.mean
        )
    };
    row("raw quinn, one hop (client → echo)", &r.one_hop);
    row(
        "**raw quinn, two hops (client → relay → echo)** ¹",
        &r.two_hops,
    );
    row(
        "raw quinn, two hops, relay and echo each a process ¹",
        &r.two_procs,
    );
    row("`health` (operator → gateway)", &r.health);
    row(
        "**`node.invoke system.which`** (operator → gateway → node) ¹",
        &r.invoke,
    );
    if let Some(b) = &r.base {
        row("`node.invoke system.which`, old binary ¹", b);
    }
    row(
        "`node.invoke system.which`, gateway on one worker thread ¹",
        &r.one_worker,
    );
    row("`node.invoke` with `\"timing\": true` ¹", &r.timed);
    row("`system.which` in-process", &r.which);
    println!();
    println!(
        "¹ interleaved in {ROUNDS} rounds of {} calls each (after 10 unmeasured)",
        n().div_ceil(ROUNDS)
    );
    println!();
    println!(
        "invoke p50 / raw two-hop p50 = {:.2} (goal ≤ 1.3); p99 ratio {:.2}",
        r.invoke.p50 / r.two_hops.p50,
        r.invoke.p99 / r.two_hops.p99
    );
    println!(
        "invoke p50 / raw two-hop p50 with a process per hop = {:.2}",
        r.invoke.p50 / r.two_procs.p50
    );
    println!(
        "gateway on one worker: invoke p50 / raw two-hop p50 = {:.2}, with a process per hop {:.2}",
        r.one_worker.p50 / r.two_hops.p50,
        r.one_worker.p50 / r.two_procs.p50
    );
    if let Some(b) = &r.base {
        println!(
            "old binary: invoke p50 / raw two-hop p50 = {:.2}; p99 ratio {:.2}",
            b.p50 / r.two_hops.p50,
            b.p99 / r.two_hops.p99
        );
    }
    println!();
    println!(
        "What the server processes spent per call (CPU of all their threads, context switches; \
         /proc, measured around the interleaved chunks, warm-up calls included):"
    );
    println!();
    println!("| series | process | CPU per call | context switches per call |");
    println!("|---|---|---|---|");
    for (series, names, c) in &r.costs {
        for (i, name) in names.iter().enumerate() {
            let (cpu, sw) = c.per_call(i);
            println!("| {series} | {name} | {cpu:.1} µs | {sw:.2} |");
        }
    }
    println!();
    println!(
        "Per-hop breakdown of the timed invokes (wall-clock stamps of client, gateway and node):"
    );
    println!();
    println!("| leg | p50 | p90 | mean |");
    println!("|---|---|---|---|");
    for (name, l) in LEGS.iter().zip(&r.legs) {
        println!(
            "| {name} | {:.3} ms | {:.3} ms | {:.3} ms |",
            l.p50, l.p90, l.mean
        );
    }
    let sum: f64 = r.legs.iter().map(|l| l.p50).sum();
    println!("| sum of the leg p50s | {sum:.3} ms | | |");
    println!();
    println!(
        "by difference of p50s: gateway operator path beyond a bare QUIC round trip \
         (health − raw one hop) {:.3} ms; gateway → node hop with lookup, node work and back \
         (invoke − health) {:.3} ms, of which the node's `which` itself {:.3} ms; a bare second \
         QUIC hop (raw two − one) {:.3} ms",
        r.health.p50 - r.one_hop.p50,
        r.invoke.p50 - r.health.p50,
        r.which.p50,
        r.two_hops.p50 - r.one_hop.p50
    );
    Ok(())
}
