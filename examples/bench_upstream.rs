//! Benchmark of the upstream mode: `node.invoke system.which` sent to a real OpenClaw gateway
//! (`openclaw@2026.9.6`), answered through a clawmesh proxy (OpenClaw -> clawmesh upstream ->
//! node), beside the same call answered by OpenClaw's own node host (`openclaw node run`)
//! attached directly: same OpenClaw gateway, same client, same run.
//!
//! Setup (all on 127.0.0.1): one `openclaw gateway run` (token auth, loopback device pairing
//! at its default, silent); `openclaw node run --display-name direct` attached to it (its
//! capability surface approved by the bench, as `openclaw nodes approve` does); two clawmesh
//! gateways, `frankfurt` (primary, `--upstream` to the OpenClaw gateway with
//! `--upstream-auto-approve`) and `singapore`; a clawmesh node `fra-box` on frankfurt and
//! `sg-box` on singapore. OpenClaw then lists `direct`, `fra-box (eu-central-1)` and
//! `sg-box (ap-southeast-1)`.
//!
//! The client is one operator WebSocket to OpenClaw (token, no device: the classic CLI's
//! connect), made with clawmesh's own upstream client code, issuing strictly sequential
//! `node.invoke` `{"command":"system.which","params":{"bins":["sh"]}}` calls (`timeoutMs`
//! 15000), as `classic-protocol.md`'s Appendix B bench client does. Per round, each of the
//! three targets gets 20 warm-up calls and then N timed calls, the targets taking turns, for
//! R rounds (so load from elsewhere falls on all three alike). Reported: p50 / p90 / p99 /
//! max per target over all rounds, and the median of the per-round p50s.
//!
//! ```text
//! cargo build --release --bin clawmesh --example bench_upstream
//! cargo run --release --example bench_upstream        # N=300 R=3; BENCH_UPSTREAM_N / _ROUNDS
//! ```
//!
//! Needs the classic stack (`scripts/install-classic-client.sh`, into `$CLASSIC_PREFIX` or
//! `~/.cache/clawmesh/classic`). Every process started is stopped, every temp dir removed,
//! also on errors and on Ctrl-C; every wait is bounded. About 2 minutes on the 2-core VM, most
//! of it the OpenClaw gateway and node host starting.

#[path = "support/mod.rs"]
#[allow(dead_code)]
mod support;

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use clawmesh::upstream::{client, dial};
use serde_json::{json, Value};
use support::*;

const BENCH: &str = "bench_upstream";
const TOKEN: &str = "bench-upstream-token";
/// Warm-up calls per target per round (the first calls pay for connection setup and JIT).
const WARMUP: usize = 20;
/// Longest wait for one process to come up: the OpenClaw gateway takes 10 to 35 s on this
/// VM, the node host about as long; 180 s covers a loaded machine.
const START_DEADLINE: Duration = Duration::from_secs(180);
/// Health interval of the clawmesh gateways (ms): the upstream follows the node list at this
/// pace, so setup is quick.
const INTERVAL_MS: &str = "1000";

fn env_num(name: &str, default: usize) -> Result<usize> {
    match std::env::var(bench_env(name)) {
        Ok(v) => v
            .parse()
            .map_err(|_| anyhow!("{} must be a number, not {v:?}", bench_env(name))),
        Err(_) => Ok(default),
    }
}

/// An operator connection to the OpenClaw gateway, and its request counter.
struct Operator {
    ws: dial::Ws,
    n: u64,
}

impl Operator {
    async fn open(url: &str) -> Result<Operator> {
        let mut ws = dial::open(url, None).await?;
        client::handshake(&mut ws, |_| {
            json!({
                "minProtocol": 4, "maxProtocol": 4,
                "client": {"id": "cli", "version": "2026.9.6", "platform": "linux", "mode": "cli"},
                "role": "operator",
                "scopes": ["operator.read", "operator.write", "operator.pairing", "operator.admin"],
                "caps": [], "auth": {"token": TOKEN},
            })
        })
        .await?;
        Ok(Operator { ws, n: 1 })
    }

    async fn call(&mut self, method: &str, params: Value) -> Result<Value> {
        self.n += 1;
        Ok(client::call(&mut self.ws, self.n, method, params).await?)
    }

    /// One timed `node.invoke system.which` on `node`.
    async fn which(&mut self, node: &str) -> Result<Duration> {
        let params = json!({"nodeId": node, "command": "system.which",
            "params": {"bins": ["sh"]}, "timeoutMs": 15000,
            "idempotencyKey": clawmesh_federation::pairing::uuid_v4()});
        let t = Instant::now();
        let r = self.call("node.invoke", params).await?;
        let d = t.elapsed();
        if !r["payload"]["bins"]["sh"].is_string() {
            bail!("unexpected node.invoke answer from {node}: {r}");
        }
        Ok(d)
    }
}

/// OpenClaw's node id of the connected node whose display name starts with `name`.
fn node_id(list: &Value, name: &str) -> Option<String> {
    list["nodes"].as_array()?.iter().find_map(|n| {
        let hit = n["displayName"].as_str()?.starts_with(name) && n["connected"] == true;
        hit.then(|| n["nodeId"].as_str().map(str::to_string))?
    })
}

/// Starts a clawmesh gateway in `dir`; its QUIC address once it has written `gateway.json`.
async fn clawmesh_gateway(
    bin: &Path,
    dir: &Path,
    args: &[&str],
    procs: &mut Vec<Proc>,
) -> Result<String> {
    let mut full = vec![
        "gateway",
        "run",
        "--port",
        "0",
        "--health-interval",
        INTERVAL_MS,
    ];
    full.extend_from_slice(args);
    let p = Proc::spawn(
        "clawmesh gateway",
        clawmesh_cmd(bin, dir, &full),
        &dir.with_extension("log"),
    )?;
    let pid = p.pid();
    procs.push(p);
    poll(
        "clawmesh gateway up",
        START_DEADLINE,
        Duration::from_millis(100),
        || async {
            Ok(runtime_file(dir, pid).and_then(|v| v["quic"].as_str().map(str::to_string)))
        },
    )
    .await
}

/// The OpenClaw node ids of `direct`, `fra-box (...)` and `sg-box (...)` once all three are
/// listed and answer an invoke.
async fn all_answer(op: &mut Operator) -> Result<Option<[String; 3]>> {
    let list = op.call("node.list", json!({})).await?;
    let (Some(d), Some(f), Some(s)) = (
        node_id(&list, "direct"),
        node_id(&list, "fra-box ("),
        node_id(&list, "sg-box ("),
    ) else {
        return Ok(None);
    };
    for id in [&d, &f, &s] {
        if op.which(id).await.is_err() {
            return Ok(None);
        }
    }
    Ok(Some([d, f, s]))
}

struct Series {
    name: &'static str,
    node: String,
    samples: Vec<Duration>,
    round_p50: Vec<f64>,
}

async fn run(root: &Path) -> Result<String> {
    let bin = clawmesh_bin()?;
    let (oc, _) = install_classic(root)?;
    let mut procs: Vec<Proc> = Vec::new();
    let port = free_tcp_port()?;
    let url = format!("ws://127.0.0.1:{port}");
    let tmpdir = root.join("tmp");
    let t0 = Instant::now();
    procs.push(Proc::spawn(
        "openclaw gateway run",
        classic_gateway_cmd(&oc, &root.join("oc-gw"), &tmpdir, port, TOKEN)?,
        &root.join("oc-gw.log"),
    )?);
    // The clawmesh side starts while OpenClaw boots.
    let fra = root.join("frankfurt");
    let sg = root.join("singapore");
    let fra_addr = clawmesh_gateway(
        &bin,
        &fra,
        &[
            "--name",
            "frankfurt",
            "--region",
            "eu-central-1",
            "--primary",
            "--token",
            "fed",
            "--upstream",
            &url,
            "--upstream-token",
            TOKEN,
            "--upstream-auto-approve",
        ],
        &mut procs,
    )
    .await?;
    let join = format!("quic://{fra_addr}");
    let sg_addr = clawmesh_gateway(
        &bin,
        &sg,
        &[
            "--name",
            "singapore",
            "--region",
            "ap-southeast-1",
            "--join",
            &join,
            "--token",
            "fed",
        ],
        &mut procs,
    )
    .await?;
    for (name, gw, addr) in [("fra-box", &fra, &fra_addr), ("sg-box", &sg, &sg_addr)] {
        let dir = root.join(name);
        let gw_url = format!("quic://{addr}");
        procs.push(Proc::spawn(
            name,
            clawmesh_cmd(
                &bin,
                &dir,
                &[
                    "node",
                    "run",
                    "--gateway",
                    &gw_url,
                    "--name",
                    name,
                    "--security",
                    "full",
                ],
            ),
            &root.join(format!("{name}.log")),
        )?);
        let scratch = root.join("scratch");
        std::fs::create_dir_all(&scratch)?;
        approve_node_cli(
            &bin,
            gw,
            &scratch,
            name,
            (START_DEADLINE, Duration::from_millis(200)),
            || Ok(()),
        )?;
    }
    let mut op = poll(
        "OpenClaw gateway accepting operators",
        START_DEADLINE,
        Duration::from_millis(500),
        || async {
            Ok(
                tokio::time::timeout(Duration::from_secs(5), Operator::open(&url))
                    .await
                    .ok()
                    .and_then(|r| r.ok()),
            )
        },
    )
    .await?;
    eprintln!(
        "{BENCH}: OpenClaw gateway ready after {:.1} s",
        t0.elapsed().as_secs_f64()
    );
    procs.push(Proc::spawn(
        "openclaw node run",
        classic_node_cmd(&oc, &root.join("oc-node"), &tmpdir, port, TOKEN, "direct")?,
        &root.join("oc-node.log"),
    )?);
    // Approve the direct node host's capability surface (what `openclaw nodes approve` does).
    let (req, _) = {
        let mut found = None;
        let t = Instant::now();
        while found.is_none() {
            check_stop()?;
            let list = op.call("node.pair.list", json!({})).await?;
            found = classic_pending(&list["pending"], "direct");
            if found.is_none() {
                if t.elapsed() > START_DEADLINE {
                    bail!("the OpenClaw node host never asked for approval");
                }
                sleep(Duration::from_millis(500)).await?;
            }
        }
        found.ok_or_else(|| anyhow!("unreachable"))?
    };
    op.call("node.pair.approve", json!({"requestId": req}))
        .await?;
    // All three nodes listed and answering.
    let t = Instant::now();
    let ids = loop {
        check_stop()?;
        if let Some(ids) = all_answer(&mut op).await? {
            break ids;
        }
        if t.elapsed() > START_DEADLINE {
            bail!("direct, fra-box and sg-box not all invokable through OpenClaw within {START_DEADLINE:?}");
        }
        sleep(Duration::from_millis(500)).await?;
    };
    eprintln!(
        "{BENCH}: all three nodes answer after {:.1} s",
        t0.elapsed().as_secs_f64()
    );
    let n = env_num("N", 300)?;
    let rounds = env_num("ROUNDS", 3)?;
    let [d, f, s] = ids;
    let mut series = [
        Series {
            name: "OpenClaw node host, attached directly (baseline)",
            node: d,
            samples: vec![],
            round_p50: vec![],
        },
        Series {
            name: "clawmesh upstream -> node on the same clawmesh gateway",
            node: f,
            samples: vec![],
            round_p50: vec![],
        },
        Series {
            name: "clawmesh upstream -> remote clawmesh gateway -> node",
            node: s,
            samples: vec![],
            round_p50: vec![],
        },
    ];
    let load = loadavg3();
    for r in 0..rounds {
        for sr in series.iter_mut() {
            for _ in 0..WARMUP {
                op.which(&sr.node).await?;
            }
            let mut round = Vec::with_capacity(n);
            for _ in 0..n {
                check_stop()?;
                round.push(op.which(&sr.node).await?);
            }
            sr.round_p50.push(lat_stats(&mut round.clone())?.p50);
            sr.samples.extend(round);
        }
        eprintln!("{BENCH}: round {} of {rounds} done", r + 1);
    }
    for p in procs.iter_mut() {
        p.ensure_running()
            .with_context(|| format!("{} died during the run", p.name))?;
    }
    let mut out = String::new();
    out.push_str(&format!(
        "`node.invoke system.which` through the OpenClaw gateway, one operator WebSocket, sequential; \
         {rounds} rounds x {n} calls per target (after {WARMUP} warm-up calls each round), targets taking turns; \
         load average at start {load}\n\n"
    ));
    out.push_str("| path | n | p50 | p90 | p99 | max | median of round p50s |\n|---|---|---|---|---|---|---|\n");
    for sr in series.iter_mut() {
        let l = lat_stats(&mut sr.samples)?;
        sr.round_p50.sort_by(f64::total_cmp);
        let med = sr.round_p50[sr.round_p50.len() / 2];
        out.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {} |\n",
            sr.name,
            l.n,
            ms_text(l.p50, 2),
            ms_text(l.p90, 2),
            ms_text(l.p99, 2),
            ms_text(l.max, 1),
            ms_text(med, 2)
        ));
    }
    out.push_str("\nMachine:\n\n");
    for (k, v) in machine() {
        out.push_str(&format!("- {k}: {v}\n"));
    }
    stop_all(&mut procs, Duration::from_secs(10));
    Ok(out)
}

fn main() -> Result<()> {
    install_ctrl_c();
    let tmp = tempfile::Builder::new()
        .prefix("bench-upstream-")
        .tempdir()?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let r = rt.block_on(run(tmp.path()));
    match r {
        Ok(report) => {
            println!("{report}");
            Ok(())
        }
        Err(e) => {
            for log in ["oc-gw.log", "frankfurt.log", "oc-node.log"] {
                let text = std::fs::read_to_string(tmp.path().join(log)).unwrap_or_default();
                let tail: Vec<&str> = text.lines().rev().take(15).collect();
                eprintln!("--- {log} (last lines) ---");
                for l in tail.iter().rev() {
                    eprintln!("{l}");
                }
            }
            Err(e)
        }
    }
}
