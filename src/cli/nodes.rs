//! The node-facing commands: `node run` settings, `nodes ...`, `devices ...`, `approvals ...`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use clawmesh_discovery::PeerUrl;
use comfy_table::presets::UTF8_FULL;
use comfy_table::Table;
use serde_json::{json, Value};

use crate::cli::client::Target;
use crate::cli::{call, ApprovalsCmd, DevicesCmd, NodeRunArgs, NodesCmd, TargetArgs};
use crate::config::FileConfig;
use crate::node::approvals::{self, Security};
use crate::node::run::NodeSettings;

fn target(t: TargetArgs, state_dir: &Path) -> Target {
    Target::from_flags(t.url, t.token, state_dir)
}

/// Request timeout for listing and pairing calls.
const CALL_TIMEOUT: Duration = Duration::from_secs(15);

fn parse_label(l: &str) -> Result<(String, String)> {
    let (k, v) = l
        .split_once('=')
        .ok_or_else(|| anyhow!("label {l:?} must be KEY=VALUE, e.g. region=fra"))?;
    if k.trim().is_empty() {
        bail!("label {l:?} has an empty key");
    }
    Ok((k.trim().to_string(), v.trim().to_string()))
}

/// Merges `node run` flags over the config file.
pub fn node_settings(
    state_dir: PathBuf,
    a: NodeRunArgs,
    file: &FileConfig,
) -> Result<NodeSettings> {
    for k in &file.unknown {
        tracing::warn!("unknown key {k} in clawmesh.json (ignored)");
    }
    let urls = if !a.gateways.is_empty() {
        a.gateways
    } else if let Some(list) = file.strings("node.gateways")? {
        list
    } else {
        file.str("gateway.remote.url")?.into_iter().collect()
    };
    let gateways = urls
        .iter()
        .map(|u| {
            PeerUrl::parse(u, crate::DEFAULT_PORT).with_context(|| format!("gateway URL {u:?}"))
        })
        .collect::<Result<Vec<_>>>()?;
    let mut labels = Vec::new();
    if let Some(obj) = file_labels(file)? {
        labels.extend(obj);
    }
    for l in &a.labels {
        let (k, v) = parse_label(l)?;
        labels.retain(|(x, _)| *x != k);
        labels.push((k, v));
    }
    let security = match a.security.or(file.str("node.security")?) {
        Some(s) => Some(
            s.parse::<Security>()
                .map_err(|e| anyhow!("--security: {e}"))?,
        ),
        None => None,
    };
    Ok(NodeSettings {
        state_dir,
        gateways,
        name: a.name.or(file.str("node.name")?).unwrap_or_else(|| {
            nix::unistd::gethostname()
                .ok()
                .and_then(|h| h.into_string().ok())
                .unwrap_or_else(|| "node".into())
        }),
        token: a.token.or(file.str("gateway.remote.token")?),
        labels,
        security,
        mdns: !a.no_mdns && !crate::gateway::discovery::bonjour_disabled(),
    })
}

fn file_labels(file: &FileConfig) -> Result<Option<Vec<(String, String)>>> {
    // node.labels is an object of strings; read it through the typed accessors per key.
    let Some(path) = &file.path else {
        return Ok(None);
    };
    let text = std::fs::read_to_string(path)?;
    let v: Value = serde_json::from_str(&text)?;
    let Some(obj) = v.pointer("/node/labels").and_then(Value::as_object) else {
        return Ok(None);
    };
    obj.iter()
        .map(|(k, v)| match v {
            Value::String(s) => Ok((k.clone(), s.clone())),
            other => Err(anyhow!("node.labels.{k} must be a string, got {other}")),
        })
        .collect::<Result<Vec<_>>>()
        .map(Some)
}

fn table(header: &[&str]) -> Table {
    let mut t = Table::new();
    t.load_preset(UTF8_FULL);
    t.set_header(header.iter().map(|h| h.to_string()));
    t
}

/// `clawmesh nodes ...`
pub async fn nodes(cmd: NodesCmd, state_dir: &Path) -> Result<i32> {
    match cmd {
        NodesCmd::Status {
            all,
            json,
            target: t,
        } => {
            let doc = call(
                &target(t, state_dir),
                "node.list",
                json!({"all": all}),
                CALL_TIMEOUT,
            )
            .await?;
            let nodes = doc["nodes"].as_array().cloned().unwrap_or_default();
            let paired = nodes.iter().filter(|n| n["paired"] == true).count();
            let connected = nodes.iter().filter(|n| n["connected"] == true).count();
            if json {
                let out: Vec<Value> = nodes
                    .iter()
                    .map(|n| {
                        json!({
                            "nodeId": n["nodeId"], "name": n["displayName"], "ip": n["remoteIp"],
                            "gateway": n["gateway"], "paired": n["paired"], "connected": n["connected"],
                            "transport": n["transport"], "labels": n["labels"],
                        })
                    })
                    .collect();
                println!(
                    "{}",
                    serde_json::to_string_pretty(&json!({
                        "known": nodes.len(), "paired": paired, "connected": connected, "nodes": out
                    }))?
                );
            } else {
                println!(
                    "Known: {} · Paired: {paired} · Connected: {connected}",
                    nodes.len()
                );
                if !nodes.is_empty() {
                    let mut t = table(&["Node", "IP", "Status", "Gateway", "Transport", "Labels"]);
                    for n in &nodes {
                        let mut status = Vec::new();
                        status.push(if n["paired"] == true {
                            "paired"
                        } else {
                            "unpaired"
                        });
                        status.push(if n["connected"] == true {
                            "connected"
                        } else {
                            "disconnected"
                        });
                        t.add_row(vec![
                            n["displayName"].as_str().unwrap_or("?").to_string(),
                            n["remoteIp"].as_str().unwrap_or("-").to_string(),
                            status.join(" · "),
                            n["gateway"].as_str().unwrap_or("-").to_string(),
                            n["transport"].as_str().unwrap_or("-").to_string(),
                            n["labels"]
                                .as_object()
                                .map(|m| {
                                    m.iter()
                                        .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or("")))
                                        .collect::<Vec<_>>()
                                        .join(",")
                                })
                                .unwrap_or_default(),
                        ]);
                    }
                    println!("{t}");
                }
            }
            Ok(0)
        }
        NodesCmd::Describe {
            node,
            json,
            target: t,
        } => {
            let doc = call(
                &target(t, state_dir),
                "node.describe",
                json!({"nodeId": node}),
                CALL_TIMEOUT,
            )
            .await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&doc)?);
            } else {
                let mut t = table(&["Field", "Value"]);
                for k in [
                    "displayName",
                    "nodeId",
                    "remoteIp",
                    "gateway",
                    "transport",
                    "platform",
                    "version",
                    "paired",
                    "connected",
                    "commands",
                    "labels",
                ] {
                    let v = &doc[k];
                    let text = match v {
                        Value::String(s) => s.clone(),
                        Value::Null => "-".into(),
                        other => other.to_string(),
                    };
                    t.add_row(vec![k.to_string(), text]);
                }
                println!("{t}");
            }
            Ok(0)
        }
        NodesCmd::Invoke {
            node,
            all,
            command,
            params,
            timeout,
            json,
            target: t,
        } => {
            let params: Value = serde_json::from_str(&params)
                .with_context(|| format!("--params is not valid JSON: {params}"))?;
            let req = json!({
                "nodeId": node,
                "command": command,
                "params": params,
                "timeoutMs": timeout,
                "idempotencyKey": format!("{:032x}", rand::random::<u128>()),
                "all": all,
            });
            // The gateway enforces `timeout`; wait a little longer for its answer.
            let doc = call(
                &target(t, state_dir),
                "node.invoke",
                req,
                Duration::from_millis(timeout) + Duration::from_secs(5),
            )
            .await?;
            if all {
                if json {
                    println!("{}", serde_json::to_string(&doc)?);
                } else {
                    for r in doc["results"].as_array().into_iter().flatten() {
                        let who = format!(
                            "{}/{}",
                            r["gateway"].as_str().unwrap_or("?"),
                            r["displayName"].as_str().unwrap_or("?")
                        );
                        if r["ok"] == true {
                            println!("{who}: {}", serde_json::to_string(&r["payload"])?);
                        } else {
                            println!(
                                "{who}: error: {}",
                                r["error"]["message"].as_str().unwrap_or("?")
                            );
                        }
                    }
                }
                return Ok(if doc["failed"].as_u64().unwrap_or(0) > 0 {
                    crate::cli::EXIT_ERROR
                } else {
                    0
                });
            }
            if json {
                println!(
                    "{}",
                    serde_json::to_string(&json!({
                        "ok": doc["ok"], "nodeId": doc["nodeId"], "command": doc["command"], "payload": doc["payload"]
                    }))?
                );
            } else {
                println!("{}", serde_json::to_string_pretty(&doc["payload"])?);
            }
            Ok(0)
        }
    }
}

/// `clawmesh devices ...`
pub async fn devices(cmd: DevicesCmd, state_dir: &Path) -> Result<i32> {
    match cmd {
        DevicesCmd::List { json, target: t } => {
            let doc = call(
                &target(t, state_dir),
                "device.pair.list",
                json!({}),
                CALL_TIMEOUT,
            )
            .await?;
            if json {
                let pending: Vec<Value> = doc["pending"].as_array().cloned().unwrap_or_default().iter().map(|p| json!({
                    "requestId": p["requestId"], "deviceId": p["deviceId"], "name": p["name"], "role": p["role"],
                    "addr": p["addr"], "requestedAt": p["requestedAt"], "fingerprint": p["fingerprint"],
                })).collect();
                let paired: Vec<Value> = doc["paired"].as_array().cloned().unwrap_or_default().iter().map(|p| json!({
                    "deviceId": p["deviceId"], "name": p["name"], "role": p["role"], "approvedAt": p["approvedAt"],
                    "fingerprint": p["fingerprint"],
                })).collect();
                println!(
                    "{}",
                    serde_json::to_string_pretty(&json!({"pending": pending, "paired": paired}))?
                );
                return Ok(0);
            }
            let pending = doc["pending"].as_array().cloned().unwrap_or_default();
            let paired = doc["paired"].as_array().cloned().unwrap_or_default();
            println!("Pending ({})", pending.len());
            if !pending.is_empty() {
                let mut t = table(&[
                    "Request",
                    "Name",
                    "Role",
                    "Address",
                    "Fingerprint",
                    "Requested",
                ]);
                for p in &pending {
                    t.add_row(
                        [
                            "requestId",
                            "name",
                            "role",
                            "addr",
                            "fingerprint",
                            "requestedAt",
                        ]
                        .map(|k| p[k].as_str().unwrap_or("-").to_string()),
                    );
                }
                println!("{t}");
            }
            println!("Paired ({})", paired.len());
            if !paired.is_empty() {
                let mut t = table(&["Device", "Name", "Role", "Fingerprint", "Approved"]);
                for p in &paired {
                    let mut row = ["deviceId", "name", "role", "fingerprint", "approvedAt"]
                        .map(|k| p[k].as_str().unwrap_or("-").to_string());
                    row[0].truncate(16);
                    t.add_row(row);
                }
                println!("{t}");
            }
            println!("Compare fingerprints with `clawmesh identity show` on the device before approving.");
            Ok(0)
        }
        DevicesCmd::Approve {
            selector,
            target: t,
        } => {
            let doc = call(
                &target(t, state_dir),
                "device.pair.approve",
                json!({"requestId": selector}),
                CALL_TIMEOUT,
            )
            .await?;
            let d = &doc["device"];
            println!(
                "approved {} ({}) as {}; it attaches by itself on its next retry",
                d["name"].as_str().unwrap_or("?"),
                d["deviceId"].as_str().unwrap_or("?"),
                d["role"].as_str().unwrap_or("?")
            );
            Ok(0)
        }
        DevicesCmd::Reject {
            selector,
            target: t,
        } => {
            let doc = call(
                &target(t, state_dir),
                "device.pair.reject",
                json!({"requestId": selector}),
                CALL_TIMEOUT,
            )
            .await?;
            println!(
                "rejected pairing request {} (device {})",
                doc["requestId"].as_str().unwrap_or("?"),
                doc["deviceId"].as_str().unwrap_or("?")
            );
            Ok(0)
        }
        DevicesCmd::Revoke {
            selector,
            target: t,
        } => {
            let doc = call(
                &target(t, state_dir),
                "device.pair.remove",
                json!({"deviceId": selector}),
                CALL_TIMEOUT,
            )
            .await?;
            println!(
                "revoked {} ({}){}",
                doc["name"].as_str().unwrap_or("?"),
                doc["deviceId"].as_str().unwrap_or("?"),
                if doc["disconnected"] == true {
                    "; disconnected it"
                } else {
                    ""
                }
            );
            Ok(0)
        }
    }
}

/// `clawmesh approvals ...`
pub async fn approvals(cmd: ApprovalsCmd, state_dir: &Path) -> Result<i32> {
    let (node, t) = match &cmd {
        ApprovalsCmd::Get {
            node, target: ta, ..
        }
        | ApprovalsCmd::Set {
            node, target: ta, ..
        }
        | ApprovalsCmd::Allow {
            node, target: ta, ..
        }
        | ApprovalsCmd::Deny {
            node, target: ta, ..
        } => (
            node.clone(),
            Target::from_flags(ta.url.clone(), ta.token.clone(), state_dir),
        ),
    };
    let snap = call(
        &t,
        "exec.approvals.node.get",
        json!({"nodeId": node}),
        CALL_TIMEOUT,
    )
    .await?;
    let mut file = snap["file"].clone();
    if file.is_null() {
        file = json!({"version": 1});
    }
    let edit = |f: &mut Value| -> Result<String> {
        match &cmd {
            ApprovalsCmd::Set { security, .. } => {
                let level: Security = security.parse().map_err(|e| anyhow!("--security: {e}"))?;
                approvals::set_security(f, level)?;
                Ok(format!("exec security on {node} is now {level}"))
            }
            ApprovalsCmd::Allow { pattern, .. } => {
                let added = approvals::allow_pattern(f, pattern)?;
                Ok(if added {
                    format!("allowed {pattern} on {node}")
                } else {
                    format!("{pattern} was already allowed on {node}")
                })
            }
            ApprovalsCmd::Deny { pattern, .. } => {
                let n = approvals::remove_pattern(f, pattern)?;
                if n == 0 {
                    bail!("{pattern} is not in the allowlist of {node}");
                }
                Ok(format!("removed {pattern} from the allowlist of {node}"))
            }
            ApprovalsCmd::Get { .. } => Ok(String::new()),
        }
    };
    if let ApprovalsCmd::Get { json, .. } = &cmd {
        if *json {
            println!("{}", serde_json::to_string_pretty(&snap)?);
        } else {
            println!("{}: {}", node, snap["path"].as_str().unwrap_or("?"));
            println!("{}", serde_json::to_string_pretty(&file)?);
        }
        return Ok(0);
    }
    let msg = edit(&mut file)?;
    let mut params = json!({"nodeId": node, "file": file});
    if let Some(h) = snap["hash"].as_str() {
        params["baseHash"] = json!(h);
    }
    call(&t, "exec.approvals.node.set", params, CALL_TIMEOUT).await?;
    println!("{msg}");
    Ok(0)
}
