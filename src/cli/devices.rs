//! `clawmesh devices list|approve|reject|revoke`: who may join, decided by an operator.

use std::path::Path;

use anyhow::Result;
use serde_json::{json, Value};

use crate::cli::args::DevicesCmd;
use crate::cli::{call, table, target, CALL_TIMEOUT};

/// `clawmesh devices ...`
pub async fn devices(cmd: DevicesCmd, state_dir: &Path) -> Result<i32> {
    match cmd {
        DevicesCmd::List {
            json,
            limit,
            after,
            target: t,
        } => {
            let doc = call(
                &target(t, state_dir),
                "device.pair.list",
                json!({"limit": limit, "after": after}),
                CALL_TIMEOUT,
            )
            .await?;
            if json {
                let pending: Vec<Value> = doc["pending"].as_array().cloned().unwrap_or_default().iter().map(|p| json!({
                    "requestId": p["requestId"], "deviceId": p["deviceId"], "name": p["name"], "role": p["role"],
                    "addr": p["addr"], "requestedAt": p["requestedAt"], "fingerprint": p["fingerprint"],
                    "reason": p.get("reason"), "tailnet": p.get("tailnet"),
                    "gateway": p["gateway"], "region": p["region"],
                    "expiresAt": expires_at(p),
                })).collect();
                let paired: Vec<Value> = doc["paired"].as_array().cloned().unwrap_or_default().iter().map(|p| json!({
                    "deviceId": p["deviceId"], "publicKey": p["publicKey"], "name": p["name"], "role": p["role"], "approvedAt": p["approvedAt"],
                    "fingerprint": p["fingerprint"], "region": p["region"], "approvedBy": p["approvedBy"], "tailnet": p.get("tailnet"),
                })).collect();
                println!(
                    "{}",
                    serde_json::to_string_pretty(
                        &json!({"pending": pending, "paired": paired, "revoked": doc["revoked"], "unreachable": doc["unreachable"], "next": doc.get("next")})
                    )?
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
                    "Waits at",
                    "Address",
                    "Fingerprint",
                    "Requested",
                    "Expires",
                    "Waiting because",
                ]);
                for p in &pending {
                    let mut row: Vec<String> = [
                        "requestId",
                        "name",
                        "role",
                        "gateway",
                        "addr",
                        "fingerprint",
                        "requestedAt",
                    ]
                    .map(|k| match (k, p[k].as_str()) {
                        ("requestedAt", Some(t)) => crate::cli::output::relative(t),
                        (_, v) => v.unwrap_or("-").to_string(),
                    })
                    .into();
                    row.push(
                        expires_at(p)
                            .as_str()
                            .map_or("-".into(), crate::cli::output::relative),
                    );
                    row.push(p["reason"].as_str().unwrap_or("-").to_string());
                    t.add_row(row);
                }
                println!("{t}");
            }
            println!("Paired ({})", paired.len());
            if !paired.is_empty() {
                let mut t = table(&[
                    "Device",
                    "Name",
                    "Role",
                    "Fingerprint",
                    "Approved",
                    "Admitted by",
                ]);
                for p in &paired {
                    let mut row: Vec<String> =
                        ["deviceId", "name", "role", "fingerprint", "approvedAt"]
                            .map(|k| match (k, p[k].as_str()) {
                                ("approvedAt", Some(t)) => crate::cli::output::relative(t),
                                (_, v) => v.unwrap_or("-").to_string(),
                            })
                            .to_vec();
                    row[0].truncate(16);
                    row.push(admitted_by(p));
                    t.add_row(row);
                }
                println!("{t}");
            }
            let revoked = doc["revoked"].as_array().cloned().unwrap_or_default();
            if !revoked.is_empty() {
                println!("Revoked ({})", revoked.len());
                let mut t = table(&["Device", "Name", "Revoked", "By", "Reason"]);
                for r in &revoked {
                    let mut row = ["deviceId", "name", "revokedAt", "revokedBy", "reason"]
                        .map(|k| r[k].as_str().unwrap_or("-").to_string());
                    row[0].truncate(16);
                    t.add_row(row);
                }
                println!("{t}");
            }
            let unreachable: Vec<&str> = doc["unreachable"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(Value::as_str)
                .collect();
            if !unreachable.is_empty() {
                println!(
                    "Not listed: requests waiting at {} (unreachable now).",
                    unreachable.join(", ")
                );
            }
            if let Some(n) = doc["next"].as_str() {
                println!(
                    "More devices: clawmesh devices list{} --after {n}",
                    limit.map(|l| format!(" --limit {l}")).unwrap_or_default()
                );
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

/// How a device was admitted, for people: `operator`, or `tailscale: <identity>`.
pub fn admitted_by(row: &Value) -> String {
    let by = row["approvedBy"].as_str().unwrap_or("operator");
    let t = &row["tailnet"];
    if by != "tailscale" || !t.is_object() {
        return by.to_string();
    }
    let who = match t["login"].as_str() {
        Some(l) => l.to_string(),
        None => t["tags"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(Value::as_str)
                    .collect::<Vec<_>>()
                    .join(",")
            })
            .unwrap_or_default(),
    };
    format!(
        "tailscale: {who} on {} ({})",
        t["node"].as_str().unwrap_or("?"),
        t["ip"].as_str().unwrap_or("?")
    )
}

/// When a pending request expires: its device's last retry plus the pending lifetime (a node
/// that keeps retrying keeps its request alive), as RFC 3339.
fn expires_at(p: &Value) -> Value {
    p["refreshedAt"]
        .as_str()
        .or(p["requestedAt"].as_str())
        .and_then(|t| humantime::parse_rfc3339_weak(t).ok())
        .map_or(Value::Null, |t| {
            Value::String(
                humantime::format_rfc3339_millis(t + clawmesh_federation::pairing::PENDING_TTL)
                    .to_string(),
            )
        })
}
