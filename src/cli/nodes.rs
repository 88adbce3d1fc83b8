//! `clawmesh nodes status|describe|invoke`: the federation's nodes, listed and invoked.

use std::path::Path;
use std::time::Duration;

use anyhow::Result;
use serde_json::{json, Value};

use crate::cli::args::NodesCmd;
use crate::cli::{call, table, target, CALL_TIMEOUT};

/// Rows per `node.list` call when `nodes status` lists everything: about 5 MB of JSON, well
/// inside the 32 MiB frame limit, and few calls for 100 000 nodes.
const STATUS_PAGE: u64 = 10_000;

/// `clawmesh nodes ...`
pub async fn nodes(cmd: NodesCmd, state_dir: &Path) -> Result<i32> {
    match cmd {
        NodesCmd::Status {
            all,
            json,
            limit,
            after,
            target: t,
        } => {
            let target = target(t, state_dir);
            // Without `--limit`, every page (100 000 rows in one answer would pass the frame
            // limit); with it, the one page asked for and the cursor to the next.
            let mut nodes = Vec::new();
            let mut cursor = after;
            let next = loop {
                let doc = call(
                    &target,
                    "node.list",
                    json!({"all": all, "limit": limit.unwrap_or(STATUS_PAGE), "after": cursor}),
                    CALL_TIMEOUT,
                )
                .await?;
                nodes.extend(doc["nodes"].as_array().cloned().unwrap_or_default());
                let next = doc["next"].as_str().map(str::to_string);
                match next {
                    Some(n) if limit.is_none() => cursor = Some(n),
                    next => break next,
                }
            };
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
                            "approvedBy": n.get("approvedBy"), "tailnet": n.get("tailnet"),
                            "vitals": n.get("vitals"),
                            "attach": n.get("attach"),
                        })
                    })
                    .collect();
                println!(
                    "{}",
                    serde_json::to_string_pretty(&json!({
                        "known": nodes.len(), "paired": paired, "connected": connected, "nodes": out,
                        "next": next,
                    }))?
                );
            } else {
                print!("{}", render_status(&nodes));
                if let Some(n) = next {
                    println!(
                        "More nodes: clawmesh nodes status{} --limit {} --after {n}",
                        if all { " --all" } else { "" },
                        limit.unwrap_or(1)
                    );
                }
            }
            Ok(0)
        }
        NodesCmd::Describe {
            node,
            node_flag,
            json,
            target: t,
        } => {
            let node = node.or(node_flag).unwrap_or_default();
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
            let params: Value = crate::cli::output::read_params(&params)?;
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
            // `system.run` exits like ssh: with the remote command's own status.
            let code = if command == "system.run" {
                crate::cli::exit::for_system_run(&doc["payload"])
            } else {
                0
            };
            if json {
                println!(
                    "{}",
                    serde_json::to_string(&json!({
                        "ok": doc["ok"], "nodeId": doc["nodeId"], "command": doc["command"], "payload": doc["payload"],
                        "exitCode": code,
                    }))?
                );
            } else {
                println!("{}", serde_json::to_string_pretty(&doc["payload"])?);
            }
            Ok(code)
        }
    }
}

/// `nodes status` for people: the counts, then one row per node (the demo prints the same).
pub fn render_status(nodes: &[Value]) -> String {
    let paired = nodes.iter().filter(|n| n["paired"] == true).count();
    let connected = nodes.iter().filter(|n| n["connected"] == true).count();
    let mut out = format!(
        "Known: {} · Paired: {paired} · Connected: {connected}\n",
        nodes.len()
    );
    if nodes.is_empty() {
        return out;
    }
    let mut t = table(&[
        "Node",
        "ID",
        "IP",
        "Status",
        "Gateway",
        "Transport",
        "Labels",
        "Admitted by",
        "Load",
        "CPU",
        "Mem",
        "Disk",
        "Up",
    ]);
    for n in nodes {
        let status = [
            if n["paired"] == true {
                "paired"
            } else {
                "unpaired"
            },
            if n["connected"] == true {
                "connected"
            } else {
                "disconnected"
            },
        ];
        t.add_row(
            vec![
                n["displayName"].as_str().unwrap_or("?").to_string(),
                // 12 hex digits: unique in any real fleet, and accepted by --node as an id prefix.
                n["nodeId"]
                    .as_str()
                    .unwrap_or("?")
                    .chars()
                    .take(12)
                    .collect(),
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
                if n["paired"] == true {
                    crate::cli::devices::admitted_by(n)
                } else {
                    "-".to_string()
                },
            ]
            .into_iter()
            .chain(crate::cli::vitals::cells(
                &n["vitals"],
                n["connected"] == true,
            )),
        );
    }
    out.push_str(&format!("{t}\n"));
    out
}
