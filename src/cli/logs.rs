//! `clawmesh logs`: records of every region from the primary's collector, merged in time
//! order with the origin on each line, the drop counters of every limit, and `--follow`.

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use anyhow::{anyhow, Result};
use serde_json::{json, Value};

use crate::cli::args::LogsArgs;
use crate::cli::{call, target};

/// How long one follow poll waits at the collector for new records (its bound is 30 s).
const FOLLOW_WAIT_MS: u64 = 10_000;

/// The request deadline of one poll: the wait plus two intercontinental hops.
const POLL_TIMEOUT: Duration = Duration::from_millis(FOLLOW_WAIT_MS + 15_000);

/// After a failed poll (the primary changing, a gateway restarting), wait this long before
/// asking again: short beside a failover's seconds, long enough not to spin.
const RETRY_AFTER: Duration = Duration::from_millis(500);

/// `clawmesh logs ...`
pub async fn logs(a: LogsArgs, state_dir: &Path) -> Result<i32> {
    let since_ms = match &a.since {
        Some(s) => {
            let d = humantime::parse_duration(s)
                .map_err(|e| anyhow!("--since {s:?}: {e} (e.g. 10m, 2h, 1d)"))?;
            Some(now_ms().saturating_sub(d.as_millis() as u64))
        }
        None => None,
    };
    let mut params = json!({
        "limit": a.lines,
        "audit": a.audit,
        "local": !a.all && a.gateway.is_none() && a.node.is_none(),
    });
    for (k, v) in [
        ("gateway", &a.gateway),
        ("node", &a.node),
        ("level", &a.level),
        ("grep", &a.grep),
    ] {
        if let Some(v) = v {
            params[k] = json!(v);
        }
    }
    if let Some(s) = since_ms {
        params["sinceMs"] = json!(s);
    }
    let t = target(a.target, state_dir);
    let first = call(&t, "logs.query", params.clone(), POLL_TIMEOUT).await?;
    let mut shown: HashMap<String, u64> = HashMap::new();
    print_records(&first, a.json, &mut shown);
    print_drops(&first, a.json);
    if !a.follow {
        return Ok(0);
    }
    let mut store = first["store_id"].as_u64();
    let mut after = first["last_id"].as_i64().unwrap_or(0);
    let mut last_ts = now_ms();
    loop {
        let mut p = params.clone();
        p["afterId"] = json!(after);
        p["waitMs"] = json!(FOLLOW_WAIT_MS);
        p["limit"] = json!(10_000);
        let reply = match call(&t, "logs.query", p, POLL_TIMEOUT).await {
            Ok(r) => r,
            Err(e) => {
                tracing::debug!("logs poll failed, retrying: {e}");
                tokio::time::sleep(RETRY_AFTER).await;
                continue;
            }
        };
        if reply["store_id"].as_u64() != store {
            // Another collector (failover): its positions mean nothing here. Read it from a
            // little before the last record shown; what was shown already is skipped by
            // (origin, seq).
            store = reply["store_id"].as_u64();
            after = 0;
            params["sinceMs"] = json!(last_ts.saturating_sub(60_000));
            continue;
        }
        if let Some(ts) = reply["records"]
            .as_array()
            .and_then(|r| r.last())
            .and_then(|r| r["record"]["ts_ms"].as_u64())
        {
            last_ts = ts;
        }
        after = reply["records"]
            .as_array()
            .and_then(|r| r.last())
            .and_then(|r| r["id"].as_i64())
            .unwrap_or(after);
        print_records(&reply, a.json, &mut shown);
    }
}

fn now_ms() -> u64 {
    clawmesh_federation::logs::record::now_ms()
}

/// Prints records not shown yet (each origin's sequence only moves forward).
fn print_records(reply: &Value, json_out: bool, shown: &mut HashMap<String, u64>) {
    let empty = Vec::new();
    for s in reply["records"].as_array().unwrap_or(&empty) {
        let r = &s["record"];
        let origin = r["origin"].as_str().unwrap_or("?").to_string();
        let seq = r["seq"].as_u64().unwrap_or(0);
        let last = shown.entry(origin.clone()).or_default();
        if seq <= *last {
            continue;
        }
        *last = seq;
        if json_out {
            let mut o = json!({
                "ts": humantime::format_rfc3339_millis(std::time::UNIX_EPOCH + Duration::from_millis(r["ts_ms"].as_u64().unwrap_or(0))).to_string(),
                "origin": origin,
                "seq": seq,
                "gateway": r["gateway"],
                "node": r["node"],
                "level": r["level"].as_str().unwrap_or("?").to_lowercase(),
                "target": r["target"],
                "message": r["message"],
            });
            if !r["audit"].is_null() {
                o["audit"] = r["audit"].clone();
            }
            println!("{o}");
        } else {
            println!("{}", line(r, &origin));
        }
    }
}

/// One record as a line: time, level, origin, target, message.
pub fn line(r: &Value, origin: &str) -> String {
    let ts = humantime::format_rfc3339_millis(
        std::time::UNIX_EPOCH + Duration::from_millis(r["ts_ms"].as_u64().unwrap_or(0)),
    );
    let level = r["level"].as_str().unwrap_or("?").to_uppercase();
    if level == "AUDIT" {
        format!(
            "{ts} {level:<5} {origin}  {}",
            r["message"].as_str().unwrap_or("")
        )
    } else {
        format!(
            "{ts} {level:<5} {origin}  {}: {}",
            r["target"].as_str().unwrap_or(""),
            r["message"].as_str().unwrap_or("")
        )
    }
}

/// Prints what limits dropped, per origin (`1 204 records from beijing dropped by the spool
/// limit`); to stderr with `--json`, so stdout stays one object per line.
fn print_drops(reply: &Value, json_out: bool) {
    let empty = Vec::new();
    for d in reply["drops"].as_array().unwrap_or(&empty) {
        let origin = d["origin"].as_str().unwrap_or("?");
        for (k, why) in [
            ("spool_dropped", "the spool limit"),
            ("overflow_dropped", "a full hand-off queue"),
            ("store_dropped", "the collector's store limit"),
        ] {
            let n = d[k].as_u64().unwrap_or(0);
            if n > 0 {
                let text = format!("{} records from {origin} dropped by {why}", grouped(n));
                if json_out {
                    eprintln!("{text}");
                } else {
                    println!("{text}");
                }
            }
        }
    }
}

/// 1204 -> "1 204".
fn grouped(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(' ');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn groups_thousands() {
        assert_eq!(grouped(1204), "1 204");
        assert_eq!(grouped(12), "12");
        assert_eq!(grouped(1_000_000), "1 000 000");
    }
}
