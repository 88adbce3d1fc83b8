//! On-demand benchmark of `node.invoke` through a gateway to a node host (issue 3), beside the
//! classic OpenClaw gateway + node host measured in the same run.
//!
//! What it measures, all on 127.0.0.1:
//!
//! 1. **clawmesh**: starts a real `clawmesh gateway run --primary --port 0` and a real
//!    `clawmesh node run --gateway quic://ADDR --security full` (release binary), approves the
//!    node with `clawmesh devices approve` and waits until it is attached. Then, from this
//!    process, over one QUIC operator connection
//!    (`clawmesh::cli::client::Client::connect(&Target::Local(gateway_state_dir))`):
//!    - `node.invoke` `system.which {"bins":["sh"]}`: 10 warm-up calls, then n = 2000 strictly
//!      sequential calls (p50 / p90 / p99 / max / mean);
//!    - the same method with 100 concurrent callers for 5 s, first as 100 tasks sharing the one
//!      connection, then as 100 connections with one caller each: invokes/s, latency under load,
//!      and the CPU time each process spent per invoke (from `/proc/PID/stat`);
//!    - for comparison: `health` (operator → gateway only, no node hop), n = 2000 sequential,
//!      and `system.which` called in-process (no transport at all);
//!
//!    each with the benchmark client on a tokio `current_thread` runtime and on a
//!    `multi_thread` runtime with 2 workers (the gateway and node always run the `clawmesh`
//!    binary's own runtime: `multi_thread`, 2 workers). Per sequential call it also reports the
//!    context switches and CPU time of each process (`/proc/PID/task/*/status`, `/proc/PID/stat`),
//!    and for each load phase how busy the machine was and how much of that was other processes
//!    (a run with other load on the machine is not comparable). Memory: the node host's VmRSS
//!    after 5 s idle (attached, before any invoke), the gateway's before and after the load.
//!
//!    Experiment: the same with the gateway and node processes on other tokio runtimes. This
//!    example re-executes itself as `bench_invoke --internal-clawmesh FLAVOUR -- ARGS`, which
//!    runs exactly what `src/main.rs` runs (`clawmesh::cli::run`) on a `current_thread` or a
//!    2-worker `multi_thread` runtime: multi/multi (control), multi/current, current/current.
//! 2. **classic baseline** (unless skipped): installs `openclaw@2026.9.6` + Node 24 with
//!    `scripts/install-classic-client.sh` into `$CLASSIC_PREFIX` (default
//!    `~/.cache/clawmesh/classic`; about a minute the first time, needs the npm registry), starts
//!    `openclaw gateway run` (token auth, free port) and `openclaw node run`, each with its own
//!    `HOME` / `OPENCLAW_STATE_DIR` / `TMPDIR` under the run's temp dir, approves the node's
//!    capability surface with `openclaw nodes approve` (loopback device pairing is silent with
//!    the default `autoApproveLocal: true`), lets the stack settle for 30 s, and runs
//!    `scripts/bench-classic.mjs` (the client of `classic-protocol.md` Appendix B, plus `health`
//!    and a concurrent phase): n = 1000 sequential, then 100 callers on one WebSocket and on 100
//!    WebSockets for 5 s each. RSS of the gateway (main process and process tree) and of the
//!    node host tree.
//!
//! Results are printed as Markdown tables (baseline beside each number) and the goals are
//! checked: p50 < 0.2 ms, ≥ 20 000 invokes/s, node host idle RSS < 10 MB.
//!
//! Run it (release, or the numbers mean nothing):
//!
//! ```text
//! cargo build --release --bin clawmesh --example bench_invoke
//! cargo run --release --example bench_invoke                 # with the classic baseline
//! cargo run --release --example bench_invoke -- --skip-classic   # or BENCH_INVOKE_SKIP_CLASSIC=1
//! ```
//!
//! The `clawmesh` binary is looked up beside the example's directory (`target/release/clawmesh`,
//! honouring `CARGO_TARGET_DIR`); set `CLAWMESH_BIN` to use another one. Every process started is
//! stopped (SIGTERM to it and its descendants, SIGKILL after a grace period) and every temp dir
//! removed, also on errors and on Ctrl-C. Every wait and loop is bounded in count and time; the
//! whole run takes about 3 minutes with the classic baseline installed, about 1 minute without.
//! Other load on the machine skews everything: the run prints how busy the CPUs were before it
//! and, per load phase, how much of the CPU other processes used.

#[path = "support/mod.rs"]
#[allow(dead_code)]
mod support;

use std::fs;
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{anyhow, bail, Context, Result};
use clawmesh::cli::client::{Client, Target};
use clawmesh::node::which::{self, WhichParams};
use serde_json::{json, Value};
use support::{
    check_stop, classic_cmd, classic_gateway_cmd, classic_node_cmd, classic_pending, clawmesh_bin,
    clawmesh_cmd, clawmesh_env, cpu_ticks, free_tcp_port, install_classic, install_ctrl_c,
    lat_stats, machine, machine_jiffies, mb, mem_of, poll_blocking, reaped_children_ticks,
    run_bounded, run_ok, sleep_blocking, start_gateway_and_node, status_field, tree, tree_rss_kb,
    Flavour, Lat, Mem, Proc, STOP, TICKS_PER_SEC,
};

/// This example's name: its environment variables are `BENCH_INVOKE_*` (see `support`).
const BENCH: &str = "bench_invoke";

/// Sequential `node.invoke` calls measured on clawmesh.
const SEQ_N: usize = 2000;
/// Sequential `node.invoke` calls measured on the classic stack (as in its section 11).
const CLASSIC_N: usize = 1000;
/// Unmeasured calls before each sequential series.
const WARMUP: usize = 10;
/// Concurrent callers of the throughput phases.
const CALLERS: usize = 100;
/// Length of each throughput phase.
const LOAD: Duration = Duration::from_secs(5);
/// Idle time before the idle memory samples.
const IDLE: Duration = Duration::from_secs(5);
/// Settling time of the classic stack after pairing, before its memory samples and calls: its
/// gateway is still finishing start-up work (plugins, model catalog, cron) in the first seconds.
const CLASSIC_SETTLE: Duration = Duration::from_secs(30);
/// Deadline of one call; a loopback invoke that takes this long is a failure.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// `timeoutMs` of the invokes (the classic bench client's value).
const INVOKE_TIMEOUT_MS: u64 = 15_000;
/// Errors tolerated in one throughput phase before it stops early.
const MAX_LOAD_ERRORS: usize = 1000;
/// Gateway token of the classic stack.
const CLASSIC_TOKEN: &str = "bench-invoke-token-7f3a";
/// Node display name on both stacks.
const NODE_NAME: &str = "bench-node";

// ---------------------------------------------------------------------------------------------
// Statistics

fn lat_from_json(v: &Value) -> Option<Lat> {
    let f = |k: &str| v.get(k).and_then(Value::as_f64);
    Some(Lat {
        n: v.get("n").and_then(Value::as_u64)? as usize,
        p50: f("p50")?,
        p90: f("p90")?,
        p99: f("p99")?,
        max: f("max")?,
        mean: f("mean")?,
    })
}

/// CPU time each process spent per invoke during a throughput phase, in µs.
#[derive(Debug, Clone, Copy)]
struct CpuSplit {
    client: f64,
    gateway: f64,
    node: f64,
}

/// One throughput phase.
#[derive(Debug, Clone)]
struct Load {
    callers: usize,
    conns: usize,
    secs: f64,
    calls: usize,
    errors: usize,
    first_error: Option<String>,
    p50: f64,
    p99: f64,
    cpu: Option<CpuSplit>,
    /// Fraction of all CPUs busy during the phase (from /proc/stat), if measured.
    busy: Option<f64>,
    /// Of that, the fraction not used by the client, gateway and node host (other load).
    others: Option<f64>,
}

impl Load {
    fn rate(&self) -> f64 {
        if self.secs > 0.0 {
            self.calls as f64 / self.secs
        } else {
            0.0
        }
    }
}

// ---------------------------------------------------------------------------------------------
// /proc

/// Fraction of all CPUs that `ticks` of CPU time over `secs` of wall time make.
fn cpu_share(ticks: u64, secs: f64) -> f64 {
    let ncpu = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1) as f64;
    ticks as f64 / TICKS_PER_SEC / secs.max(1e-3) / ncpu
}

fn busy_between(a: (u64, u64), b: (u64, u64)) -> Option<f64> {
    let total = b.1.checked_sub(a.1)?;
    (total > 0).then(|| b.0.saturating_sub(a.0) as f64 / total as f64)
}

fn tree_cpu_ticks(pid: i32) -> u64 {
    tree(pid).into_iter().map(cpu_ticks).sum()
}

/// Context switches (voluntary + involuntary) of all threads of a process: each one is a
/// thread going to sleep or being preempted, so on an idle machine ≈ one wakeup each.
fn ctx_switches(pid: i32) -> u64 {
    let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0;
    };
    tasks
        .flatten()
        .take(1000)
        .filter_map(|t| fs::read_to_string(t.path().join("status")).ok())
        .map(|text| {
            text.lines()
                .filter_map(|l| {
                    l.strip_prefix("voluntary_ctxt_switches:")
                        .or_else(|| l.strip_prefix("nonvoluntary_ctxt_switches:"))
                })
                .filter_map(|v| v.trim().parse::<u64>().ok())
                .sum::<u64>()
        })
        .sum()
}

/// Context switches and CPU µs per call of client / gateway / node over a series of calls.
#[derive(Debug, Clone, Copy)]
struct Switches {
    client: f64,
    gateway: f64,
    node: f64,
    cpu: CpuSplit,
}

/// (context switches, CPU ticks) of this process, the gateway and the node.
fn switches_snapshot(pids: (i32, i32)) -> [(u64, u64); 3] {
    let me = std::process::id() as i32;
    [me, pids.0, pids.1].map(|p| (ctx_switches(p), cpu_ticks(p)))
}

fn switches_per_call(a: [(u64, u64); 3], b: [(u64, u64); 3], calls: usize) -> Switches {
    let n = calls.max(1) as f64;
    let per = |i: usize| b[i].0.saturating_sub(a[i].0) as f64 / n;
    let cpu = |i: usize| b[i].1.saturating_sub(a[i].1) as f64 / TICKS_PER_SEC * 1e6 / n;
    Switches {
        client: per(0),
        gateway: per(1),
        node: per(2),
        cpu: CpuSplit {
            client: cpu(0),
            gateway: cpu(1),
            node: cpu(2),
        },
    }
}

// ---------------------------------------------------------------------------------------------
// clawmesh

/// What runs a gateway or node process: the `clawmesh` binary, or this example re-executed
/// as `bench_invoke --internal-clawmesh FLAVOUR -- ARGS`, which runs the same
/// `clawmesh::cli::run` as `src/main.rs` on a tokio runtime of the given flavour.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Launcher {
    Product,
    SelfExec(Flavour),
}

fn server_cmd(bin: &Path, launcher: Launcher, dir: &Path, args: &[&str]) -> Result<Command> {
    Ok(match launcher {
        Launcher::Product => clawmesh_cmd(bin, dir, args),
        Launcher::SelfExec(f) => {
            let mut c = Command::new(std::env::current_exe()?);
            c.args(["--internal-clawmesh", f.tag(), "--", "--state-dir"])
                .arg(dir)
                .args(args);
            clawmesh_env(&mut c);
            c
        }
    })
}

/// The hidden `--internal-clawmesh FLAVOUR -- ARGS` mode: `src/main.rs` with another runtime.
fn internal_clawmesh(flavour: &str, args: &[String]) -> ! {
    use clap::Parser as _;
    let cli = clawmesh::cli::Cli::parse_from(
        std::iter::once("clawmesh".to_string()).chain(args.iter().cloned()),
    );
    let rt = Flavour::from_tag(flavour).runtime();
    let rt = match rt {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("clawmesh: cannot start the async runtime: {e}");
            std::process::exit(clawmesh::cli::EXIT_ERROR);
        }
    };
    let code = match rt.block_on(clawmesh::cli::run(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("clawmesh: {e:#}");
            clawmesh::cli::EXIT_ERROR
        }
    };
    rt.shutdown_timeout(Duration::from_millis(200));
    std::process::exit(code);
}

/// The `clawmesh` gateway + node of one run.
struct Mesh {
    gw: Proc,
    node: Proc,
    gw_dir: PathBuf,
    node_id: String,
}

fn start_clawmesh(bin: &Path, root: &Path, gw_l: Launcher, node_l: Launcher) -> Result<Mesh> {
    let (gw, node, gw_dir, node_id) =
        start_gateway_and_node(bin, root, ("bench-gw", NODE_NAME), |dir, args| {
            let launcher = if args.first() == Some(&"gateway") {
                gw_l
            } else {
                node_l
            };
            server_cmd(bin, launcher, dir, args)
        })?;
    Ok(Mesh {
        gw,
        node,
        gw_dir,
        node_id,
    })
}

/// Results of one client runtime flavour.
struct FlavourResult {
    flavour: Flavour,
    invoke: Lat,
    health: Lat,
    describe: Lat,
    /// Context switches per call during the sequential invoke and health series.
    switches: (Switches, Switches),
    one_conn: Load,
    many_conns: Load,
}

fn invoke_params(node_id: &str, k: usize) -> Value {
    json!({
        "nodeId": node_id,
        "command": "system.which",
        "params": {"bins": ["sh"]},
        "timeoutMs": INVOKE_TIMEOUT_MS,
        "idempotencyKey": format!("bench-{k}"),
    })
}

async fn invoke(client: &Client, node_id: &str, k: usize) -> Result<Value> {
    client
        .call("node.invoke", invoke_params(node_id, k), CALL_TIMEOUT)
        .await
        .map_err(|e| anyhow!("node.invoke: {e}"))
}

/// `n` sequential calls of `method` after [`WARMUP`] unmeasured ones. `node.invoke` gets
/// fresh invoke params per call; other methods get `params` as is.
async fn sequential(
    client: &Client,
    node_id: &str,
    method: &str,
    params: Value,
    n: usize,
) -> Result<Lat> {
    let mut lat = Vec::with_capacity(n);
    for i in 0..WARMUP + n {
        check_stop()?;
        let t = Instant::now();
        if method == "node.invoke" {
            invoke(client, node_id, i).await?;
        } else {
            client
                .call(method, params.clone(), CALL_TIMEOUT)
                .await
                .map_err(|e| anyhow!("{method}: {e}"))?;
        }
        let d = t.elapsed();
        if i >= WARMUP {
            lat.push(d);
        }
    }
    lat_stats(&mut lat)
}

/// [`CALLERS`] tasks invoking for [`LOAD`], caller `k` on `clients[k % clients.len()]`.
async fn load(clients: &[Arc<Client>], node_id: &str, pids: (i32, i32)) -> Result<Load> {
    let errors = Arc::new(AtomicUsize::new(0));
    let me = std::process::id() as i32;
    let cpu0 = (cpu_ticks(me), cpu_ticks(pids.0), cpu_ticks(pids.1));
    let jiffies0 = machine_jiffies();
    let t0 = Instant::now();
    let end = tokio::time::Instant::now() + LOAD;
    let mut tasks = Vec::with_capacity(CALLERS);
    for k in 0..CALLERS {
        let client = clients[k % clients.len()].clone();
        let node_id = node_id.to_string();
        let errors = errors.clone();
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::with_capacity(8192);
            let mut first_error = None;
            let mut i = 0usize;
            while tokio::time::Instant::now() < end
                && errors.load(Ordering::Relaxed) < MAX_LOAD_ERRORS
                && !STOP.load(Ordering::Relaxed)
            {
                let t = Instant::now();
                match invoke(&client, &node_id, k * 10_000_000 + i).await {
                    Ok(_) => lat.push(t.elapsed()),
                    Err(e) => {
                        errors.fetch_add(1, Ordering::Relaxed);
                        first_error.get_or_insert_with(|| format!("{e:#}"));
                    }
                }
                i += 1;
            }
            (lat, first_error)
        }));
    }
    let mut all = Vec::new();
    let mut first_error = None;
    for t in tasks {
        let (lat, fe) = t.await?;
        all.extend(lat);
        if first_error.is_none() {
            first_error = fe;
        }
    }
    let secs = t0.elapsed().as_secs_f64();
    let cpu1 = (cpu_ticks(me), cpu_ticks(pids.0), cpu_ticks(pids.1));
    let busy = busy_between(jiffies0, machine_jiffies());
    let ours = cpu_share(
        (cpu1.0 + cpu1.1 + cpu1.2).saturating_sub(cpu0.0 + cpu0.1 + cpu0.2),
        secs,
    );
    let others = busy.map(|b| (b - ours).max(0.0));
    check_stop()?;
    let calls = all.len();
    let per = |a: u64, b: u64| {
        if calls == 0 {
            0.0
        } else {
            (b.saturating_sub(a)) as f64 / TICKS_PER_SEC * 1e6 / calls as f64
        }
    };
    let s = lat_stats(&mut all).ok();
    Ok(Load {
        callers: CALLERS,
        conns: clients.len(),
        secs,
        calls,
        errors: errors.load(Ordering::Relaxed),
        first_error,
        p50: s.map(|s| s.p50).unwrap_or(f64::NAN),
        p99: s.map(|s| s.p99).unwrap_or(f64::NAN),
        cpu: Some(CpuSplit {
            client: per(cpu0.0, cpu1.0),
            gateway: per(cpu0.1, cpu1.1),
            node: per(cpu0.2, cpu1.2),
        }),
        busy,
        others,
    })
}

fn bench_flavour(flavour: Flavour, mesh: &Mesh) -> Result<FlavourResult> {
    let rt = flavour.runtime()?;
    let target = Target::Local(mesh.gw_dir.clone());
    let node_id = mesh.node_id.clone();
    let pids = (mesh.gw.pid(), mesh.node.pid());
    // Spawned, so that with multi_thread the client runs on a worker like product code does.
    let job = rt.spawn(async move {
        let client = Arc::new(Client::connect(&target).await?);
        let first = invoke(&client, &node_id, 0).await?;
        if !first["payload"]["bins"]["sh"].is_string() {
            bail!("unexpected node.invoke result: {first}");
        }
        let sw0 = switches_snapshot(pids);
        let invoke_lat = sequential(&client, &node_id, "node.invoke", Value::Null, SEQ_N).await?;
        let sw1 = switches_snapshot(pids);
        let health = sequential(&client, &node_id, "health", json!({}), SEQ_N).await?;
        let sw2 = switches_snapshot(pids);
        let switches = (
            switches_per_call(sw0, sw1, SEQ_N + WARMUP),
            switches_per_call(sw1, sw2, SEQ_N + WARMUP),
        );
        let describe = json!({"nodeId": node_id});
        let describe = sequential(&client, &node_id, "node.describe", describe, SEQ_N).await?;
        let one_conn = load(std::slice::from_ref(&client), &node_id, pids).await?;
        let mut clients = vec![client];
        for _ in 1..CALLERS {
            check_stop()?;
            clients.push(Arc::new(Client::connect(&target).await?));
        }
        for c in &clients[1..] {
            invoke(c, &node_id, 1).await?;
        }
        let many_conns = load(&clients, &node_id, pids).await?;
        for c in clients {
            if let Ok(c) = Arc::try_unwrap(c) {
                c.close().await;
            }
        }
        Ok((invoke_lat, health, describe, switches, one_conn, many_conns))
    });
    let (invoke, health, describe, switches, one_conn, many_conns) = rt.block_on(job)??;
    rt.shutdown_timeout(Duration::from_secs(1));
    Ok(FlavourResult {
        flavour,
        invoke,
        health,
        describe,
        switches,
        one_conn,
        many_conns,
    })
}

/// `system.which {"bins":["sh"]}` in-process: what the node's own work costs, no transport.
fn which_in_process() -> Result<Lat> {
    let mut lat = Vec::with_capacity(SEQ_N);
    for i in 0..WARMUP + SEQ_N {
        let t = Instant::now();
        let p = WhichParams::from_value(json!({"bins": ["sh"]}))?;
        let r = which::which(&p)?;
        let text = serde_json::to_value(r)?.to_string();
        std::hint::black_box(text);
        if i >= WARMUP {
            lat.push(t.elapsed());
        }
    }
    lat_stats(&mut lat)
}

struct MeshResult {
    flavours: Vec<FlavourResult>,
    /// The runtime-flavour experiment (gateway, node processes re-executed).
    variants: Vec<Variant>,
    which: Lat,
    node_idle: Mem,
    gw_idle: Mem,
    gw_after: Mem,
    node_after: Mem,
}

fn bench_clawmesh(bin: &Path) -> Result<MeshResult> {
    let tmp = tempfile::Builder::new().prefix("bench-invoke-").tempdir()?;
    let mut mesh = start_clawmesh(bin, tmp.path(), Launcher::Product, Launcher::Product)?;
    eprintln!(
        "clawmesh: gateway pid {}, node pid {} attached; {IDLE:?} idle",
        mesh.gw.pid(),
        mesh.node.pid()
    );
    sleep_blocking(IDLE)?;
    let node_idle = mem_of(mesh.node.pid())?;
    let gw_idle = mem_of(mesh.gw.pid())?;
    let mut flavours = Vec::new();
    for f in [Flavour::CurrentThread, Flavour::MultiThread] {
        eprintln!("clawmesh: client runtime {}", f.name());
        flavours.push(bench_flavour(f, &mesh)?);
        mesh.gw.ensure_running()?;
        mesh.node.ensure_running()?;
    }
    let gw_after = mem_of(mesh.gw.pid())?;
    let node_after = mem_of(mesh.node.pid())?;
    let which = which_in_process()?;
    mesh.node.stop(Duration::from_secs(10));
    mesh.gw.stop(Duration::from_secs(10));
    drop(mesh);
    tmp.close()?;
    let mut variants = Vec::new();
    for (g, n) in [
        (Flavour::MultiThread, Flavour::MultiThread),
        (Flavour::MultiThread, Flavour::CurrentThread),
        (Flavour::CurrentThread, Flavour::CurrentThread),
    ] {
        eprintln!(
            "clawmesh: experiment: gateway {}, node {}",
            g.tag(),
            n.tag()
        );
        variants.push(bench_variant(bin, g, n)?);
    }
    Ok(MeshResult {
        flavours,
        variants,
        which,
        node_idle,
        gw_idle,
        gw_after,
        node_after,
    })
}

/// One run of the runtime-flavour experiment: gateway and node processes on given runtimes.
struct Variant {
    gateway: Flavour,
    node: Flavour,
    invoke: Lat,
    switches: Switches,
    load: Load,
}

/// Gateway and node re-executed with the given runtimes (see [`Launcher::SelfExec`]), then,
/// with a `current_thread` client: n = 2000 sequential invokes and 100 callers on one
/// connection for [`LOAD`].
fn bench_variant(bin: &Path, gateway: Flavour, node: Flavour) -> Result<Variant> {
    let tmp = tempfile::Builder::new().prefix("bench-invoke-").tempdir()?;
    let mut mesh = start_clawmesh(
        bin,
        tmp.path(),
        Launcher::SelfExec(gateway),
        Launcher::SelfExec(node),
    )?;
    sleep_blocking(Duration::from_secs(1))?;
    let rt = Flavour::CurrentThread.runtime()?;
    let target = Target::Local(mesh.gw_dir.clone());
    let node_id = mesh.node_id.clone();
    let pids = (mesh.gw.pid(), mesh.node.pid());
    let (invoke_lat, switches, load) = rt.block_on(async move {
        let client = Arc::new(Client::connect(&target).await?);
        let sw0 = switches_snapshot(pids);
        let lat = sequential(&client, &node_id, "node.invoke", Value::Null, SEQ_N).await?;
        let switches = switches_per_call(sw0, switches_snapshot(pids), SEQ_N + WARMUP);
        let l = load(std::slice::from_ref(&client), &node_id, pids).await?;
        if let Ok(c) = Arc::try_unwrap(client) {
            c.close().await;
        }
        Ok::<_, anyhow::Error>((lat, switches, l))
    })?;
    rt.shutdown_timeout(Duration::from_secs(1));
    mesh.gw.ensure_running()?;
    mesh.node.ensure_running()?;
    mesh.node.stop(Duration::from_secs(10));
    mesh.gw.stop(Duration::from_secs(10));
    drop(mesh);
    tmp.close()?;
    Ok(Variant {
        gateway,
        node,
        invoke: invoke_lat,
        switches,
        load,
    })
}

// ---------------------------------------------------------------------------------------------
// Classic baseline

struct ClassicResult {
    version: String,
    node_version: String,
    seq: Lat,
    health: Option<Lat>,
    one_conn: Load,
    many_conns: Load,
    gw_idle: Mem,
    gw_tree_idle: (u64, usize),
    node_tree_idle: (u64, usize),
    gw_after: Mem,
    gw_tree_after: (u64, usize),
    node_tree_after: (u64, usize),
}

fn manifest_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Installs (or finds) the classic stack; returns (wrapper, node binary, prefix).
fn install_classic_with_node(scratch: &Path) -> Result<(PathBuf, PathBuf, PathBuf)> {
    let (wrapper, prefix) = install_classic(scratch)?;
    let node = prefix.join("bin/node");
    if !node.exists() {
        bail!("install finished but {} is missing", node.display());
    }
    Ok((wrapper, node, prefix))
}

/// Where openclaw keeps SQLite coordinator lock files: `/tmp/openclaw-state-locks-<uid>/` (a
/// fixed path on Linux; TMPDIR does not move it), named `<family>.<first 8 hex of
/// sha256(database path)>.lock.sqlite`, left behind when the processes exit.
fn classic_lock_dir() -> PathBuf {
    match status_field(std::process::id() as i32, "Uid") {
        Some(u) => PathBuf::from(format!("/tmp/openclaw-state-locks-{u}")),
        None => PathBuf::from("/tmp/openclaw-state-locks"),
    }
}

fn dir_names(dir: &Path) -> std::collections::HashSet<String> {
    fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .take(100_000)
                .map(|e| e.file_name().to_string_lossy().to_string())
                .collect()
        })
        .unwrap_or_default()
}

/// Whether an openclaw process that is not ours (not a descendant of this one) is running.
fn foreign_openclaw_running() -> bool {
    let mine: std::collections::HashSet<i32> =
        tree(std::process::id() as i32).into_iter().collect();
    let Ok(dir) = fs::read_dir("/proc") else {
        return false;
    };
    dir.flatten().any(|e| {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            return false;
        };
        !mine.contains(&pid)
            && fs::read(e.path().join("cmdline"))
                .map(|c| String::from_utf8_lossy(&c).contains("openclaw"))
                .unwrap_or(false)
    })
}

/// Whether any process has `path` open.
fn held_open(path: &Path) -> bool {
    let Ok(dir) = fs::read_dir("/proc") else {
        return true;
    };
    dir.flatten().any(|e| {
        fs::read_dir(e.path().join("fd"))
            .map(|fds| {
                fds.flatten()
                    .take(100_000)
                    .any(|fd| fs::read_link(fd.path()).is_ok_and(|l| l == path))
            })
            .unwrap_or(false)
    })
}

/// The lock files our classic processes leave in [`classic_lock_dir`]; removed when dropped
/// (after the processes have stopped, also on errors). A new file is ours if its hash is that
/// of a database under our temp root, or, when no other openclaw process was seen during our
/// run, if nobody holds it open (openclaw also locks short-lived databases it deletes, whose
/// paths we cannot know). Anything else is left alone and reported.
struct LockFiles {
    root: PathBuf,
    dir: PathBuf,
    before: std::collections::HashSet<String>,
    foreign_seen: std::cell::Cell<bool>,
}

impl LockFiles {
    fn new(root: &Path) -> Self {
        let dir = classic_lock_dir();
        LockFiles {
            root: root.to_path_buf(),
            before: dir_names(&dir),
            dir,
            foreign_seen: std::cell::Cell::new(foreign_openclaw_running()),
        }
    }

    /// Notes whether someone else runs openclaw now; call it now and then during the run.
    fn observe(&self) {
        if !self.foreign_seen.get() && foreign_openclaw_running() {
            self.foreign_seen.set(true);
        }
    }

    /// sha256 prefixes of the databases under our root.
    fn our_hashes(&self) -> Vec<String> {
        use sha2::{Digest, Sha256};
        let mut hashes = Vec::new();
        let mut stack = vec![self.root.clone()];
        let mut visited = 0;
        while let Some(d) = stack.pop() {
            visited += 1;
            if visited > 10_000 {
                break;
            }
            let Ok(entries) = fs::read_dir(&d) else {
                continue;
            };
            for e in entries.flatten() {
                let p = e.path();
                match e.file_type() {
                    Ok(t) if t.is_dir() => stack.push(p),
                    Ok(_) if p.extension().is_some_and(|x| x == "sqlite") => {
                        let canon = fs::canonicalize(&p).unwrap_or(p);
                        let digest = Sha256::digest(canon.to_string_lossy().as_bytes());
                        hashes.push(digest[..4].iter().map(|b| format!("{b:02x}")).collect());
                    }
                    _ => {}
                }
            }
        }
        hashes
    }
}

impl Drop for LockFiles {
    fn drop(&mut self) {
        self.observe();
        let ours = self.our_hashes();
        let (mut removed, mut left) = (0, 0);
        for name in dir_names(&self.dir) {
            if self.before.contains(&name) || !name.ends_with(".lock.sqlite") {
                continue;
            }
            let path = self.dir.join(&name);
            let hash_is_ours = ours
                .iter()
                .any(|h| name.ends_with(&format!(".{h}.lock.sqlite")));
            let unattributed_but_ours = !self.foreign_seen.get() && !held_open(&path);
            if (hash_is_ours || unattributed_but_ours) && fs::remove_file(&path).is_ok() {
                removed += 1;
            } else {
                left += 1;
            }
        }
        eprintln!(
            "classic: removed {removed} lock files of ours from {}{}",
            self.dir.display(),
            if left > 0 {
                format!(" ({left} new ones left: other openclaw processes were running)")
            } else {
                String::new()
            }
        );
    }
}

fn bench_classic(scratch: &Path) -> Result<ClassicResult> {
    let (oc, node_bin, prefix) = install_classic_with_node(scratch)?;
    let version = Command::new(&oc)
        .arg("--version")
        .env("TMPDIR", scratch)
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    let node_version = Command::new(&node_bin)
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    let tmp = tempfile::Builder::new()
        .prefix("bench-invoke-classic-")
        .tempdir()?;
    let root = tmp.path();
    // Declared after `tmp` and before the processes: dropped after they stop, before the dir goes.
    let locks = LockFiles::new(root);
    let (gw_home, node_home, cli_home, tmpdir) = (
        root.join("gw"),
        root.join("node"),
        root.join("cli"),
        root.join("tmp"),
    );
    fs::create_dir_all(cli_home.join(".openclaw"))?;
    let port = free_tcp_port()?;
    let gw_cmd = classic_gateway_cmd(&oc, &gw_home, &tmpdir, port, CLASSIC_TOKEN)?;
    let mut gw = Proc::spawn("openclaw gateway", gw_cmd, &root.join("gw.log"))?;
    let t_start = Instant::now();
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    poll_blocking(
        "classic gateway listening",
        Duration::from_secs(120),
        Duration::from_millis(200),
        || {
            gw.ensure_running()?;
            locks.observe();
            Ok(
                TcpStream::connect_timeout(&addr, Duration::from_millis(200))
                    .ok()
                    .map(|_| ()),
            )
        },
    )?;
    eprintln!(
        "classic: gateway pid {} listening on {port} after {:.1} s",
        gw.pid(),
        t_start.elapsed().as_secs_f64()
    );
    let node_cmd = classic_node_cmd(&oc, &node_home, &tmpdir, port, CLASSIC_TOKEN, NODE_NAME)?;
    let mut node = Proc::spawn("openclaw node host", node_cmd, &root.join("node.log"))?;

    let url = format!("ws://127.0.0.1:{port}");
    let cli = |args: &[&str]| {
        let mut c = classic_cmd(&oc, &cli_home, &tmpdir);
        c.args(args)
            .args(["--url", &url, "--token", CLASSIC_TOKEN, "--json"]);
        c
    };
    let cli_timeout = Duration::from_secs(60);
    let (req, node_id) = poll_blocking(
        "pending node capability request (openclaw nodes pending)",
        Duration::from_secs(120),
        Duration::from_millis(500),
        || {
            gw.ensure_running()?;
            node.ensure_running()?;
            locks.observe();
            let out = run_ok(cli(&["nodes", "pending"]), scratch, cli_timeout)?;
            let v: Value = serde_json::from_str(out.trim()).unwrap_or(Value::Null);
            Ok(classic_pending(&v, NODE_NAME))
        },
    )
    .with_context(|| {
        format!(
            "the node host did not ask for approval; node host log:\n{}",
            node.log_tail()
        )
    })?;
    run_ok(cli(&["nodes", "approve", &req]), scratch, cli_timeout)?;
    poll_blocking(
        "classic node connected and approved",
        Duration::from_secs(60),
        Duration::from_millis(500),
        || {
            let out = run_ok(cli(&["nodes", "status"]), scratch, cli_timeout)?;
            let v: Value = serde_json::from_str(out.trim()).unwrap_or(Value::Null);
            Ok(v["nodes"]
                .as_array()
                .and_then(|ns| {
                    ns.iter().find(|n| {
                        n["nodeId"] == node_id.as_str()
                            && n["connected"] == true
                            && n["approvalState"] == "approved"
                    })
                })
                .map(|_| ()))
        },
    )?;
    eprintln!(
        "classic: node host pid {} approved; {CLASSIC_SETTLE:?} idle",
        node.pid()
    );
    sleep_blocking(CLASSIC_SETTLE)?;
    locks.observe();
    let gw_idle = mem_of(gw.pid())?;
    let gw_tree_idle = tree_rss_kb(gw.pid());
    let node_tree_idle = tree_rss_kb(node.pid());

    let script = manifest_dir().join("scripts/bench-classic.mjs");
    type MjsOut = (Value, Option<CpuSplit>, Option<f64>, Option<f64>);
    let mjs = |n: usize, callers: usize, conns: usize| -> Result<MjsOut> {
        let mut c = Command::new(&node_bin);
        c.arg(&script)
            .args([&url, CLASSIC_TOKEN, &node_id])
            .arg(n.to_string())
            .arg(callers.to_string())
            .arg(conns.to_string())
            .arg(LOAD.as_secs().to_string())
            .env("CLASSIC_PREFIX", &prefix)
            .env("TMPDIR", &tmpdir)
            .env_remove("NODE_OPTIONS");
        locks.observe();
        let jiffies0 = machine_jiffies();
        let t0 = Instant::now();
        let before = (
            reaped_children_ticks(),
            tree_cpu_ticks(gw.pid()),
            tree_cpu_ticks(node.pid()),
        );
        let (status, out, err) = run_bounded(c, scratch, Duration::from_secs(300))?;
        let after = (
            reaped_children_ticks(),
            tree_cpu_ticks(gw.pid()),
            tree_cpu_ticks(node.pid()),
        );
        let busy = busy_between(jiffies0, machine_jiffies());
        let ours = cpu_share(
            (after.0 + after.1 + after.2).saturating_sub(before.0 + before.1 + before.2),
            t0.elapsed().as_secs_f64(),
        );
        let others = busy.map(|b| (b - ours).max(0.0));
        locks.observe();
        eprint!("{err}");
        if !status.success() {
            bail!("bench-classic.mjs failed ({status}): {}", err.trim());
        }
        let v: Value = out
            .lines()
            .last()
            .and_then(|l| serde_json::from_str(l).ok())
            .ok_or_else(|| anyhow!("bench-classic.mjs printed no JSON: {out}"))?;
        let calls = v["conc"]["calls"].as_u64().unwrap_or(0) as f64;
        let cpu = (calls > 0.0).then(|| {
            let per = |a: u64, b: u64| b.saturating_sub(a) as f64 / TICKS_PER_SEC * 1e6 / calls;
            CpuSplit {
                client: per(before.0, after.0),
                gateway: per(before.1, after.1),
                node: per(before.2, after.2),
            }
        });
        Ok((v, cpu, busy, others))
    };
    let to_load = |(v, cpu, busy, others): MjsOut| -> Result<Load> {
        let c = &v["conc"];
        let f = |k: &str| c[k].as_f64().unwrap_or(f64::NAN);
        Ok(Load {
            callers: c["callers"].as_u64().unwrap_or(0) as usize,
            conns: c["conns"].as_u64().unwrap_or(0) as usize,
            secs: f("secs"),
            calls: c["calls"]
                .as_u64()
                .ok_or_else(|| anyhow!("no conc in {v}"))? as usize,
            errors: c["errors"].as_u64().unwrap_or(0) as usize,
            first_error: c["firstError"].as_str().map(str::to_string),
            p50: f("p50"),
            p99: f("p99"),
            cpu,
            busy,
            others,
        })
    };
    eprintln!("classic: bench-classic.mjs n={CLASSIC_N}");
    let (v, _, _, _) = mjs(CLASSIC_N, 0, 1)?;
    let seq = lat_from_json(&v["seq"]).ok_or_else(|| anyhow!("no seq in {v}"))?;
    let health = lat_from_json(&v["health"]);
    eprintln!("classic: {CALLERS} callers, 1 connection, {LOAD:?}");
    let one_conn = to_load(mjs(0, CALLERS, 1)?)?;
    eprintln!("classic: {CALLERS} callers, {CALLERS} connections, {LOAD:?}");
    let many_conns = to_load(mjs(0, CALLERS, CALLERS)?)?;
    let gw_after = mem_of(gw.pid())?;
    let gw_tree_after = tree_rss_kb(gw.pid());
    let node_tree_after = tree_rss_kb(node.pid());
    node.stop(Duration::from_secs(20));
    gw.stop(Duration::from_secs(30));
    drop((node, gw));
    drop(locks);
    tmp.close()?;
    Ok(ClassicResult {
        version,
        node_version,
        seq,
        health,
        one_conn,
        many_conns,
        gw_idle,
        gw_tree_idle,
        node_tree_idle,
        gw_after,
        gw_tree_after,
        node_tree_after,
    })
}

// ---------------------------------------------------------------------------------------------
// Report

fn ms(x: f64) -> String {
    if x.is_nan() {
        "-".into()
    } else if x < 1.0 {
        format!("{:.3} ms", x)
    } else {
        format!("{:.2} ms", x)
    }
}

fn ratio(classic: f64, ours: f64) -> String {
    if ours > 0.0 && classic.is_finite() {
        format!("{:.0}×", classic / ours)
    } else {
        "-".into()
    }
}

fn rate(l: &Load) -> String {
    let mut s = format!("{:.0} /s", l.rate());
    if l.errors > 0 {
        s.push_str(&format!(
            " ({} errors: {})",
            l.errors,
            l.first_error.as_deref().unwrap_or("?")
        ));
    }
    s
}

fn cpu(l: &Load) -> String {
    match l.cpu {
        Some(c) => format!("{:.0} / {:.0} / {:.0} µs", c.client, c.gateway, c.node),
        None => "-".into(),
    }
}

fn busy(l: &Load) -> String {
    match (l.busy, l.others) {
        (Some(b), Some(o)) => format!("{:.0} % (other processes {:.0} %)", b * 100.0, o * 100.0),
        (Some(b), None) => format!("{:.0} %", b * 100.0),
        _ => "-".into(),
    }
}

fn report(m: &MeshResult, classic: &Result<ClassicResult>) {
    let c = classic.as_ref().ok();
    let na = || "not measured".to_string();
    let cl = |f: &dyn Fn(&ClassicResult) -> String| c.map(f).unwrap_or_else(na);
    let (ct, mt) = (&m.flavours[0], &m.flavours[1]);
    let best_p50 = m
        .flavours
        .iter()
        .map(|f| f.invoke.p50)
        .fold(f64::INFINITY, f64::min);

    println!("\n### Sequential `node.invoke` `system.which {{\"bins\":[\"sh\"]}}`\n");
    println!(
        "clawmesh n = {}, classic n = {}, {WARMUP} warm-up calls each, one connection, one call \
         at a time. Client runtime = the benchmark client's tokio flavour; the gateway and node \
         processes always run the `clawmesh` binary's multi_thread runtime (2 workers).\n",
        ct.invoke.n,
        cl(&|c| c.seq.n.to_string())
    );
    println!(
        "| | clawmesh, client `{}` | clawmesh, client `{}` | classic {} | classic ÷ clawmesh (best) |",
        ct.flavour.name(),
        mt.flavour.name(),
        c.map(|c| format!("(openclaw {}, Node {})", short_version(&c.version), c.node_version))
            .unwrap_or_else(|| "(not measured)".into())
    );
    println!("|---|---|---|---|---|");
    type Pick = fn(&Lat) -> f64;
    let rows: [(&str, Pick); 5] = [
        ("p50", |l| l.p50),
        ("p90", |l| l.p90),
        ("p99", |l| l.p99),
        ("max", |l| l.max),
        ("mean", |l| l.mean),
    ];
    for (name, pick) in rows {
        let best = pick(&ct.invoke).min(pick(&mt.invoke));
        println!(
            "| {name} | {} | {} | {} | {} |",
            ms(pick(&ct.invoke)),
            ms(pick(&mt.invoke)),
            cl(&|c| ms(pick(&c.seq))),
            cl(&|c| ratio(pick(&c.seq), best))
        );
    }
    println!(
        "| sequential calls/s (1 / mean) | {:.0} | {:.0} | {} | |",
        1e3 / ct.invoke.mean,
        1e3 / mt.invoke.mean,
        cl(&|c| format!("{:.0}", 1e3 / c.seq.mean))
    );
    println!(
        "| `health` p50 / p99 (gateway only, no node hop) | {} / {} | {} / {} | {} | |",
        ms(ct.health.p50),
        ms(ct.health.p99),
        ms(mt.health.p50),
        ms(mt.health.p99),
        cl(&|c| c
            .health
            .map(|h| format!("{} / {}", ms(h.p50), ms(h.p99)))
            .unwrap_or_else(na))
    );
    println!(
        "| `node.describe` p50 / p99 (gateway only, with the node-entry listing invoke does) | {} / {} | {} / {} | | |",
        ms(ct.describe.p50),
        ms(ct.describe.p99),
        ms(mt.describe.p50),
        ms(mt.describe.p99),
    );
    println!(
        "| `system.which` in-process p50 (no transport) | {} | | | |",
        ms(m.which.p50)
    );
    let sw = |s: &Switches| format!("{:.1} / {:.1} / {:.1}", s.client, s.gateway, s.node);
    println!(
        "| context switches per sequential invoke, client / gateway / node | {} | {} | | |",
        sw(&ct.switches.0),
        sw(&mt.switches.0)
    );
    println!(
        "| context switches per sequential `health`, client / gateway / node | {} | {} | | |",
        sw(&ct.switches.1),
        sw(&mt.switches.1)
    );
    let swcpu = |s: &Switches| {
        format!(
            "{:.0} / {:.0} / {:.0} µs",
            s.cpu.client, s.cpu.gateway, s.cpu.node
        )
    };
    println!(
        "| CPU per sequential invoke, client / gateway / node | {} | {} | | |",
        swcpu(&ct.switches.0),
        swcpu(&mt.switches.0)
    );
    println!(
        "| CPU per sequential `health`, client / gateway / node | {} | {} | | |",
        swcpu(&ct.switches.1),
        swcpu(&mt.switches.1)
    );

    println!(
        "\n### Throughput: {CALLERS} concurrent callers for {} s\n",
        LOAD.as_secs()
    );
    println!(
        "CPU per invoke = CPU time (user + system, from /proc) the benchmark client / gateway / \
         node host spent during the phase, divided by the invokes completed; for the classic \
         stack the gateway and node host figures sum their process trees.\n"
    );
    println!(
        "| | clawmesh, client `{}` | clawmesh, client `{}` | classic | clawmesh (best) ÷ classic |",
        ct.flavour.name(),
        mt.flavour.name()
    );
    println!("|---|---|---|---|---|");
    type PickLoad = fn(&FlavourResult) -> &Load;
    type PickClassicLoad = fn(&ClassicResult) -> &Load;
    let loads: [(&str, PickLoad, PickClassicLoad); 2] = [
        (
            "100 callers, 1 connection",
            |f| &f.one_conn,
            |c| &c.one_conn,
        ),
        (
            "100 callers, 100 connections",
            |f| &f.many_conns,
            |c| &c.many_conns,
        ),
    ];
    for (name, pick, pick_c) in loads {
        let shape = |l: &Load| format!("{} callers, {} conns", l.callers, l.conns);
        if shape(pick(ct)) != shape(pick(mt))
            || c.is_some_and(|c| shape(pick_c(c)) != shape(pick(ct)))
        {
            println!(
                "| {name}: actual shape differs | {} | {} | {} | |",
                shape(pick(ct)),
                shape(pick(mt)),
                cl(&|c| shape(pick_c(c)))
            );
        }
        let best = pick(ct).rate().max(pick(mt).rate());
        println!(
            "| {name}: invokes/s | {} | {} | {} | {} |",
            rate(pick(ct)),
            rate(pick(mt)),
            cl(&|c| rate(pick_c(c))),
            cl(&|c| {
                if pick_c(c).rate() > 0.0 {
                    format!("{:.0}×", best / pick_c(c).rate())
                } else {
                    "-".into()
                }
            })
        );
        println!(
            "| {name}: latency p50 / p99 | {} / {} | {} / {} | {} | |",
            ms(pick(ct).p50),
            ms(pick(ct).p99),
            ms(pick(mt).p50),
            ms(pick(mt).p99),
            cl(&|c| format!("{} / {}", ms(pick_c(c).p50), ms(pick_c(c).p99)))
        );
        println!(
            "| {name}: CPU per invoke, client / gateway / node | {} | {} | {} | |",
            cpu(pick(ct)),
            cpu(pick(mt)),
            cl(&|c| cpu(pick_c(c)))
        );
        println!(
            "| {name}: CPU busy, all cores | {} | {} | {} | |",
            busy(pick(ct)),
            busy(pick(mt)),
            cl(&|c| busy(pick_c(c)))
        );
    }

    println!("\n### Experiment: runtime flavour of the gateway and node processes\n");
    println!(
        "The gateway and node are this example re-executed as `--internal-clawmesh FLAVOUR`: the \
         same `clawmesh::cli::run` as `src/main.rs`, on a `current_thread` runtime or on \
         `multi_thread` with 2 workers (the binary's). The first row is the control (same \
         runtimes as the binary). Client: `current_thread`, one connection; sequential \
         n = {SEQ_N}; load = {CALLERS} callers for {} s.\n",
        LOAD.as_secs()
    );
    println!(
        "| gateway / node runtime | invoke p50 / p99 | switches per invoke, client / gateway / node | CPU per sequential invoke, client / gateway / node | invokes/s (100 callers) | CPU per invoke under load | CPU busy |"
    );
    println!("|---|---|---|---|---|---|---|");
    for v in &m.variants {
        println!(
            "| {} / {} | {} / {} | {} | {} | {} | {} | {} |",
            v.gateway.tag(),
            v.node.tag(),
            ms(v.invoke.p50),
            ms(v.invoke.p99),
            sw(&v.switches),
            swcpu(&v.switches),
            rate(&v.load),
            cpu(&v.load),
            busy(&v.load)
        );
    }

    println!("\n### Memory (VmRSS from /proc/PID/status)\n");
    println!(
        "The classic node host is a launcher process plus an `openclaw-node` child, and the \
         classic gateway has two worker processes: their rows sum each process tree.\n"
    );
    println!("| | clawmesh | classic |");
    println!("|---|---|---|");
    println!(
        "| node host, idle (clawmesh {} s after attach, classic {} s after approval) | {} (RssAnon {}, {} threads) | {} |",
        IDLE.as_secs(),
        CLASSIC_SETTLE.as_secs(),
        mb(m.node_idle.rss_kb),
        mb(m.node_idle.anon_kb),
        m.node_idle.threads,
        cl(&|c| format!(
            "{} (tree of {} processes)",
            mb(c.node_tree_idle.0),
            c.node_tree_idle.1
        ))
    );
    println!(
        "| node host after the load (clawmesh peak VmHWM) | {} (peak {}) | {} |",
        mb(m.node_after.rss_kb),
        mb(m.node_after.hwm_kb),
        cl(&|c| format!("{} (tree)", mb(c.node_tree_after.0)))
    );
    println!(
        "| gateway, idle with the node attached | {} (RssAnon {}, {} threads) | {} |",
        mb(m.gw_idle.rss_kb),
        mb(m.gw_idle.anon_kb),
        m.gw_idle.threads,
        cl(&|c| format!(
            "main {}, tree {} ({} processes)",
            mb(c.gw_idle.rss_kb),
            mb(c.gw_tree_idle.0),
            c.gw_tree_idle.1
        ))
    );
    println!(
        "| gateway after the load (peak VmHWM) | {} (peak {}) | {} |",
        mb(m.gw_after.rss_kb),
        mb(m.gw_after.hwm_kb),
        cl(&|c| format!(
            "main {} (peak {}), tree {}",
            mb(c.gw_after.rss_kb),
            mb(c.gw_after.hwm_kb),
            mb(c.gw_tree_after.0)
        ))
    );

    println!("\n### Goals\n");
    let best_rate = m
        .flavours
        .iter()
        .flat_map(|f| [f.one_conn.rate(), f.many_conns.rate()])
        .fold(0.0, f64::max);
    let met = |ok: bool| if ok { "met" } else { "NOT met" };
    println!("| goal | result | |");
    println!("|---|---|---|");
    println!(
        "| node.invoke p50 < 0.2 ms | {} (best client flavour) | {} |",
        ms(best_p50),
        met(best_p50 < 0.2)
    );
    println!(
        "| ≥ 20 000 invokes/s on {} cores | {:.0} /s (best phase) | {} |",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0),
        best_rate,
        met(best_rate >= 20_000.0)
    );
    println!(
        "| node host idle RSS < 10 MB | {} | {} |",
        mb(m.node_idle.rss_kb),
        met(m.node_idle.rss_kb < 10 * 1024)
    );
    if let Err(e) = classic {
        println!("\nClassic baseline not measured: {e:#}");
    }
}

fn short_version(v: &str) -> String {
    v.split_whitespace().nth(1).unwrap_or(v).to_string()
}

// ---------------------------------------------------------------------------------------------

fn main() {
    let argv: Vec<String> = std::env::args().collect();
    if argv.get(1).map(String::as_str) == Some("--internal-clawmesh") && argv.len() >= 4 {
        internal_clawmesh(&argv[2], &argv[4..]);
    }
    // Every process and temp dir is released by the time run() returns, error or not.
    if let Err(e) = run() {
        eprintln!("bench_invoke: {e:#}");
        std::process::exit(1);
    }
}

fn run() -> Result<()> {
    let skip_classic = std::env::args().any(|a| a == "--skip-classic")
        || std::env::var("BENCH_INVOKE_SKIP_CLASSIC")
            .map(|v| !v.is_empty() && v != "0")
            .unwrap_or(false);
    if let Some(a) = std::env::args()
        .skip(1)
        .find(|a| a != "--skip-classic" && a != "--bench")
    {
        bail!("unknown argument {a:?} (the only flag is --skip-classic)");
    }
    // Ctrl-C: stop at the next check, then stop the processes and remove the temp dirs.
    install_ctrl_c();
    let bin = clawmesh_bin()?;
    // Other work on the machine skews everything: say how busy it was before we started.
    let j0 = machine_jiffies();
    sleep_blocking(Duration::from_secs(1))?;
    let busy_before = busy_between(j0, machine_jiffies()).unwrap_or(0.0);
    if busy_before > 0.15 {
        eprintln!(
            "warning: the machine was {:.0} % busy before the run; the numbers will be noisy",
            busy_before * 100.0
        );
    }
    let scratch = tempfile::Builder::new()
        .prefix("bench-invoke-scratch-")
        .tempdir()?;

    println!(
        "## Node invoke (issue 3): run of {}\n",
        humantime::format_rfc3339_seconds(SystemTime::now())
    );
    println!("| machine | |");
    println!("|---|---|");
    for (k, v) in machine() {
        println!("| {k} | {v} |");
    }
    println!(
        "| CPU busy in the 1 s before the run (other load) | {:.0} % |",
        busy_before * 100.0
    );

    let mesh = bench_clawmesh(&bin)?;
    let classic = if skip_classic {
        Err(anyhow!(
            "skipped (--skip-classic / BENCH_INVOKE_SKIP_CLASSIC)"
        ))
    } else {
        let r = bench_classic(scratch.path());
        if let Err(e) = &r {
            check_stop()?;
            eprintln!("classic baseline failed: {e:#}");
        }
        r
    };
    report(&mesh, &classic);
    scratch.close()?;
    Ok(())
}
