//! `clawmesh demo`: a Tokyo / Beijing / Frankfurt federation on this machine, in under a
//! minute, with nothing to set up and nothing left behind.
//!
//! Three real gateway processes (this same binary) run on 127.0.0.1 with their own temporary
//! state dirs. A [`WanRelay`] sits in front of each one and delays every datagram by the pair's
//! simulated latency (Tokyo-Beijing 45 ms, Tokyo-Frankfurt 120 ms, Beijing-Frankfurt 165 ms
//! round trip), since this kernel has no netem. The demo prints `gateway status --all` as
//! Tokyo sees it, kills Frankfurt (SIGKILL: no goodbye, so Tokyo must notice the missed pings),
//! shows it go offline with its last-seen time, then stops everything.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use serde_json::{json, Value};
use tokio::process::{Child, Command};

use crate::cli::client::{self, Target};
use crate::sim::relay::{PathSettings, WanRelay};
use crate::state_dir::Runtime;

struct Site {
    name: &'static str,
    region: &'static str,
}

const SITES: [Site; 3] = [
    Site {
        name: "tokyo",
        region: "ap-northeast-1",
    },
    Site {
        name: "beijing",
        region: "cn-north-1",
    },
    Site {
        name: "frankfurt",
        region: "eu-central-1",
    },
];

/// Simulated round trips between the sites.
const PATHS: [(&str, &str, u64); 3] = [
    ("tokyo", "beijing", 45),
    ("tokyo", "frankfurt", 120),
    ("beijing", "frankfurt", 165),
];

struct Gateway {
    name: &'static str,
    dir: PathBuf,
    child: Child,
}

async fn status(dir: &Path) -> Result<Value> {
    client::call_once(
        &Target::Local(dir.to_path_buf()),
        "gateway.status",
        json!({"all": true}),
        Duration::from_secs(5),
    )
    .await
    .map_err(|e| anyhow!("{e}"))
}

async fn wait_for<F: Fn(&Value) -> bool>(dir: &Path, deadline: Duration, pred: F) -> Result<Value> {
    let start = Instant::now();
    loop {
        if let Ok(doc) = status(dir).await {
            if pred(&doc) {
                return Ok(doc);
            }
        }
        if start.elapsed() > deadline {
            bail!("timed out after {deadline:?} waiting for the federation");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn wait_call<F: Fn(&Value) -> bool>(
    dir: &Path,
    method: &str,
    params: Value,
    deadline: Duration,
    pred: F,
) -> Result<Value> {
    let start = Instant::now();
    loop {
        if let Ok(doc) = client::call_once(
            &Target::Local(dir.to_path_buf()),
            method,
            params.clone(),
            Duration::from_secs(5),
        )
        .await
        {
            if pred(&doc) {
                return Ok(doc);
            }
        }
        if start.elapsed() > deadline {
            bail!("timed out after {deadline:?} waiting for {method}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Approves `name`'s pending pairing request on the gateway in `dir`, once it has asked.
async fn approve(dir: &Path, name: &str) -> Result<()> {
    let list = wait_call(
        dir,
        "device.pair.list",
        json!({}),
        Duration::from_secs(20),
        |d| {
            d["pending"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|p| p["name"] == name)
        },
    )
    .await?;
    let req = list["pending"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|p| p["name"] == name)
        .and_then(|p| p["requestId"].as_str())
        .ok_or_else(|| anyhow!("no pairing request from {name}"))?
        .to_string();
    client::call_once(
        &Target::Local(dir.to_path_buf()),
        "device.pair.approve",
        json!({"requestId": req}),
        Duration::from_secs(5),
    )
    .await
    .map_err(|e| anyhow!("{e}"))?;
    Ok(())
}

fn gateway_status<'a>(doc: &'a Value, name: &str) -> Option<&'a str> {
    doc["gateways"]
        .as_array()?
        .iter()
        .find(|g| g["name"] == name)?["status"]
        .as_str()
}

/// Runs the demo.
pub async fn run(health_interval_ms: u64) -> Result<()> {
    let exe = std::env::current_exe().context("finding the clawmesh binary")?;
    let tmp = tempfile::Builder::new()
        .prefix("clawmesh-demo-")
        .tempdir()
        .context("creating a temporary dir")?;
    let relay = WanRelay::start().await?;
    let mut public = Vec::new();
    for s in &SITES {
        public.push(relay.add_site(s.name, None).await?);
    }
    for (a, b, rtt) in PATHS {
        relay.set_path(
            a,
            b,
            PathSettings {
                rtt: Duration::from_millis(rtt),
                ..Default::default()
            },
        )?;
    }
    let token = format!("demo-{:016x}", rand::random::<u64>());
    println!(
        "Starting a federation on 127.0.0.1 (state in {}):",
        tmp.path().display()
    );
    for (a, b, rtt) in PATHS {
        println!("  simulated WAN round trip {a} <-> {b}: {rtt} ms");
    }
    let mut gateways: Vec<Gateway> = Vec::new();
    let result = async {
        for (i, s) in SITES.iter().enumerate() {
            let dir = tmp.path().join(s.name);
            std::fs::create_dir_all(&dir)?;
            let log = std::fs::File::create(tmp.path().join(format!("{}.log", s.name)))?;
            let mut cmd = Command::new(&exe);
            cmd.arg("--state-dir")
                .arg(&dir)
                .args(["gateway", "run", "--name", s.name, "--region", s.region])
                .args(["--port", "0", "--advertise", &public[i].to_string()])
                .args(["--token", &token])
                .args(["--health-interval", &health_interval_ms.to_string()])
                .args(["--unhealthy-threshold", "3"])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::from(log))
                .kill_on_drop(true);
            if i == 0 {
                cmd.arg("--primary");
            } else {
                cmd.args(["--join", &format!("quic://{}", public[0])]);
            }
            let child = cmd.spawn().context("starting a gateway process")?;
            gateways.push(Gateway {
                name: s.name,
                dir: dir.clone(),
                child,
            });
            // Point the relay at the gateway's real port once it has published it.
            let start = Instant::now();
            let rt = loop {
                if let Ok(rt) = Runtime::read(&dir) {
                    break rt;
                }
                if start.elapsed() > Duration::from_secs(10) {
                    bail!(
                        "gateway {} did not start; see {}.log",
                        s.name,
                        tmp.path().join(s.name).display()
                    );
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            };
            relay.set_target(s.name, rt.quic.parse()?)?;
        }
        let tokyo = gateways[0].dir.clone();
        let dir_of = |name: &str| tmp.path().join(name);
        let doc = wait_for(&tokyo, Duration::from_secs(30), |d| {
            SITES
                .iter()
                .all(|s| gateway_status(d, s.name) == Some("healthy"))
                && d["gateways"]
                    .as_array()
                    // Every other gateway measured (a gateway has no latency to itself).
                    .map(|g| {
                        g.iter()
                            .all(|g| g["isSelf"] == true || !g["latencyMs"].is_null())
                    })
                    .unwrap_or(false)
        })
        .await?;
        // Let a few pings through the relay so the medians reflect the simulated WAN.
        tokio::time::sleep(Duration::from_millis(health_interval_ms * 4)).await;
        let doc = status(&tokyo).await.unwrap_or(doc);
        println!("\n$ clawmesh gateway status --all   (on tokyo)");
        print!("{}", crate::cli::status::render_table(&doc));

        // One node per region, attached to its own gateway; pairing approved on that gateway.
        println!("\nStarting a node in each region and approving its pairing on its gateway...");
        for (i, s) in SITES.iter().enumerate() {
            let name = format!("{}-node", &s.name[..3]);
            let dir = tmp.path().join(&name);
            std::fs::create_dir_all(&dir)?;
            let log = std::fs::File::create(tmp.path().join(format!("{name}.log")))?;
            let gw_addr = Runtime::read(&gateways[i].dir)?.quic;
            let child = Command::new(&exe)
                .arg("--state-dir")
                .arg(&dir)
                .args(["node", "run", "--gateway", &format!("quic://{gw_addr}"), "--name", &name])
                .args(["--label", "role=demo", "--security", "full"])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::from(log))
                .kill_on_drop(true)
                .spawn()
                .context("starting a node process")?;
            gateways.push(Gateway { name: "node", dir: dir.clone(), child });
            approve(&gateways[i].dir, &name).await?;
        }
        let all_attached = |d: &Value| -> bool {
            d["nodes"].as_array().map(|n| n.iter().filter(|n| n["connected"] == true).count() == SITES.len()).unwrap_or(false)
        };
        let nodes = wait_call(&tokyo, "node.list", json!({"all": true}), Duration::from_secs(30), all_attached).await?;
        println!("\n$ clawmesh nodes status --all   (on tokyo)");
        print!(
            "{}",
            crate::cli::nodes::render_status(nodes["nodes"].as_array().map_or(&[][..], |v| v))
        );
        // A cross-gateway invoke: asked at tokyo, run by frankfurt's node, over the mesh.
        let started = Instant::now();
        let r = client::call_once(
            &Target::Local(tokyo.clone()),
            "node.invoke",
            json!({"nodeId": "frankfurt/fra-node", "command": "system.run",
                   "params": {"command": ["uname", "-sr"]}, "idempotencyKey": "demo-1", "timeoutMs": 10000}),
            Duration::from_secs(15),
        )
        .await
        .map_err(|e| anyhow!("{e}"))?;
        println!(
            "\n$ clawmesh nodes invoke --node frankfurt/fra-node --command system.run --params '{{\"command\":[\"uname\",\"-sr\"]}}'   (on tokyo)\n  {}  ({} ms, including the simulated 120 ms tokyo <-> frankfurt round trip and the CLI's own connection)",
            r["payload"]["stdout"].as_str().unwrap_or("").trim(),
            started.elapsed().as_millis()
        );

        // The shared config: written on frankfurt, forwarded to the primary, committed on a
        // majority, then visible on beijing.
        let frankfurt = dir_of("frankfurt");
        let beijing = dir_of("beijing");
        let started = Instant::now();
        let ack = client::call_once(
            &Target::Local(frankfurt.clone()),
            "config.set",
            json!({"key": "models.default", "value": "gpt-5"}),
            Duration::from_secs(15),
        )
        .await
        .map_err(|e| anyhow!("{e}"))?;
        let acked = started.elapsed();
        let revision = ack["revision"].as_u64().unwrap_or(0);
        wait_call(&beijing, "config.get", json!({"key": "models.default"}), Duration::from_secs(15), |d| {
            d["synced"]["revision"].as_u64() >= Some(revision)
        })
        .await?;
        println!(
            "\n$ clawmesh config set models.default gpt-5   (on frankfurt)\n  set models.default at revision {revision} (primary {}): acknowledged by a majority after {} ms, visible on beijing after {} ms",
            ack["primary"].as_str().unwrap_or("?"),
            acked.as_millis(),
            started.elapsed().as_millis()
        );

        // Logs of the three regions, collected on the primary; the invoke above left an audit
        // record at frankfurt, the gateway that ran it. Shipping is every 5 s (the default
        // batch interval), so this waits for a batch from each gateway.
        let logs = wait_call(&tokyo, "logs.query", json!({"limit": 2000}), Duration::from_secs(30), |d| {
            let recs = d["records"].as_array().cloned().unwrap_or_default();
            let has = |g: &str| recs.iter().any(|r| r["record"]["gateway"] == g);
            has("tokyo") && has("beijing") && has("frankfurt")
                && recs.iter().any(|r| r["record"]["level"] == "Audit")
        })
        .await?;
        println!("\n$ clawmesh logs --all   (on tokyo; the last lines of each region and the audit trail)");
        let recs = logs["records"].as_array().cloned().unwrap_or_default();
        let mut shown: Vec<&Value> = Vec::new();
        for g in ["tokyo", "beijing", "frankfurt"] {
            let mine: Vec<&Value> = recs
                .iter()
                .filter(|r| r["record"]["origin"] == g && r["record"]["level"] != "Audit")
                .collect();
            shown.extend(mine.iter().rev().take(2));
        }
        shown.extend(recs.iter().filter(|r| r["record"]["level"] == "Audit"));
        shown.sort_by_key(|r| r["record"]["ts_ms"].as_u64());
        for r in shown {
            let origin = r["record"]["origin"].as_str().unwrap_or("?");
            println!("  {}", crate::cli::logs::line(&r["record"], origin));
        }

        println!(
            "\nKilling frankfurt with SIGKILL (no goodbye: tokyo must notice the missed pings)..."
        );
        let killed = Instant::now();
        if let Some(g) = gateways.iter_mut().find(|g| g.name == "frankfurt") {
            g.child.start_kill()?;
            let _ = g.child.wait().await;
        }
        let doc = wait_for(&tokyo, Duration::from_secs(30), |d| {
            gateway_status(d, "frankfurt") == Some("offline")
        })
        .await?;
        println!(
            "frankfurt went offline after {:.1} s (3 missed pings at {} ms)\n",
            killed.elapsed().as_secs_f64(),
            health_interval_ms
        );
        println!("$ clawmesh gateway status --all   (on tokyo)");
        print!("{}", crate::cli::status::render_table(&doc));
        // frankfurt's node learned the other gateways when it attached: it moves on by itself.
        let moved = wait_call(&tokyo, "node.list", json!({"all": true}), Duration::from_secs(30), |d| {
            d["nodes"].as_array().into_iter().flatten().any(|n| {
                n["displayName"] == "fra-node" && n["connected"] == true && n["gateway"] != "frankfurt"
            })
        })
        .await?;
        let at = moved["nodes"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|n| n["displayName"] == "fra-node")
            .and_then(|n| n["gateway"].as_str().map(str::to_string))
            .unwrap_or_default();
        println!(
            "\nfra-node failed over to {at} {:.1} s after frankfurt died, without re-pairing.",
            killed.elapsed().as_secs_f64()
        );
        // Two of three voters are still up: the shared config still takes writes.
        let ack = client::call_once(
            &Target::Local(beijing.clone()),
            "config.set",
            json!({"key": "models.default", "value": "claude"}),
            Duration::from_secs(15),
        )
        .await
        .map_err(|e| anyhow!("{e}"))?;
        println!(
            "\n$ clawmesh config set models.default claude   (on beijing, frankfurt still dead)\n  set models.default at revision {} (primary {}): 2 of 3 voters are a majority",
            ack["revision"],
            ack["primary"].as_str().unwrap_or("?")
        );
        Ok::<(), anyhow::Error>(())
    }
    .await;
    // Stop whatever still runs, politely first.
    for g in gateways.iter_mut() {
        if let Some(pid) = g.child.id() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
        }
    }
    for g in gateways.iter_mut() {
        if tokio::time::timeout(Duration::from_secs(5), g.child.wait())
            .await
            .is_err()
        {
            let _ = g.child.start_kill();
            let _ = g.child.wait().await;
        }
    }
    relay.shutdown().await;
    if let Err(e) = &result {
        let logs = tmp.keep();
        eprintln!(
            "demo failed: {e:#}\ngateway logs kept in {}",
            logs.display()
        );
    } else {
        println!(
            "\nStopped every gateway and node; removed {}.",
            tmp.path().display()
        );
    }
    result
}
