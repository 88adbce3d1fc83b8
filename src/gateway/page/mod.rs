//! The status page at `/` on the gateway's HTTP port, and its JSON feed `/status.json`: the
//! federation at a glance (gateways with role, health, latency, last seen, version and vitals;
//! nodes per gateway with labels and vitals; the consensus; alerts; recent log lines).
//!
//! Server-rendered HTML (`index.html`) with the CSS (`page.css`) and one hand-written script
//! (`page.js`) kept in the repository and compiled in; no build step, no library. The script
//! polls the feed every second. Read-only. The feed needs the operator token as a Bearer
//! header unless the request comes from loopback (like the local CLI); the page itself holds
//! no data for other callers, only a login form (the token stays in the tab's
//! sessionStorage; `#token=...` in the URL fills it).
//!
//! The routes, and the check of who may read (`Bridge::operator_allowed`, shared with
//! `/metrics`), are in [`crate::bridge`] (the HTTP front door); this module builds what they
//! serve.

use std::net::SocketAddr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use clawmesh_federation::rpc::{Caller, CallerKind};
use serde_json::{json, Value};

use crate::gateway::methods::Methods;

const HTML: &str = include_str!("index.html");
const CSS: &str = include_str!("page.css");
const JS: &str = include_str!("page.js");

/// Log lines shown: a glance, not a log viewer (`clawmesh logs -f` is that).
const LOG_LINES: usize = 14;

/// Node rows in the feed at most: a page polled every second stays small on a phone with a
/// 10 000-node fleet; disconnected nodes come first, the total is given (`nodesTotal`).
const MAX_NODE_ROWS: usize = 500;

/// How long the feed waits for the log lines (the primary's collector answers them, maybe
/// across a continent); without them the page still renders, with the reason.
const LOGS_TIMEOUT: Duration = Duration::from_millis(1500);

fn page_caller(peer: SocketAddr) -> Caller {
    Caller {
        key: None,
        kind: CallerKind::Operator {
            scopes: vec![crate::gateway::scopes::READ.to_string()],
            client: "status-page".into(),
        },
        remote: peer,
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The feed: one JSON document with everything the page shows.
pub async fn feed(methods: &Methods, peer: SocketAddr) -> Value {
    let caller = page_caller(peer);
    let status = methods
        .dispatch(&caller, "gateway.status", json!({"all": true}))
        .await
        .unwrap_or_else(|e| json!({"error": e.message}));
    let mut nodes: Vec<Value> = methods
        .dispatch(&caller, "node.list", json!({"all": true}))
        .await
        .ok()
        .and_then(|mut v| v.get_mut("nodes").map(Value::take))
        .and_then(|v| serde_json::from_value(v).ok())
        .unwrap_or_default();
    let nodes_total = nodes.len();
    let nodes_connected = nodes.iter().filter(|n| n["connected"] == true).count();
    if nodes_total > MAX_NODE_ROWS {
        // Stable: disconnected first, each group in the order node.list gave.
        nodes.sort_by_key(|n| n["connected"] == true);
        nodes.truncate(MAX_NODE_ROWS);
    }
    let me = status["self"].as_str().unwrap_or_default().to_string();
    let alerts = methods
        .alerts()
        .map(|b| b.to_json(&me))
        .unwrap_or(Value::Null);
    let query = methods.dispatch(
        &caller,
        "logs.query",
        json!({"limit": LOG_LINES, "level": "info"}),
    );
    let (logs, logs_error) = match tokio::time::timeout(LOGS_TIMEOUT, query).await {
        Ok(Ok(reply)) => (log_lines(&reply), None),
        Ok(Err(e)) => (Vec::new(), Some(format!("logs unavailable: {}", e.message))),
        Err(_) => (
            Vec::new(),
            Some("logs: the collector did not answer in time".into()),
        ),
    };
    json!({
        "ts": now_ms(),
        "self": me,
        "primary": status["primary"],
        "version": crate::VERSION,
        "gateways": status["gateways"],
        "consensus": status["consensus"],
        "healthIntervalMs": status["healthIntervalMs"],
        "nodes": nodes,
        "nodesTotal": nodes_total,
        "nodesConnected": nodes_connected,
        "alerts": alerts,
        "logs": logs,
        "logsError": logs_error,
    })
}

/// The collector's records as page lines: time, level, origin, message.
fn log_lines(reply: &Value) -> Vec<Value> {
    reply["records"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|s| {
            let r = &s["record"];
            json!({
                "tsMs": r["ts_ms"],
                "level": r["level"].as_str().unwrap_or("info").to_ascii_lowercase(),
                "origin": r["origin"],
                "message": r["message"],
            })
        })
        .collect()
}

fn escape_html(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// The page for gateway `name`; `initial` (the feed, for a caller allowed to read it) is
/// embedded so the first paint needs no round trip.
pub fn html(name: &str, initial: Option<&Value>) -> String {
    // `<` escaped inside the JSON (still valid JSON), so no `</script>` can close the block.
    let initial = initial
        .map(|v| v.to_string().replace('<', "\\u003c"))
        .unwrap_or_else(|| "null".into());
    HTML.replace("{{TITLE}}", &format!("{} · clawmesh", escape_html(name)))
        .replace("{{GATEWAY}}", &escape_html(name))
        .replace("{{CSS}}", CSS)
        .replace("{{JS}}", JS)
        .replace("{{INITIAL}}", &initial)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn html_embeds_assets_and_cannot_be_closed_by_data() {
        let doc = json!({"self": "x</script><script>alert(1)</script>"});
        let page = html("a<b", Some(&doc));
        assert!(page.contains("a&lt;b · clawmesh"));
        assert!(!page.contains("</script><script>alert"));
        assert!(page.contains("prefers-color-scheme"));
        assert!(page.contains("status.json"));
        assert!(!page.contains("{{"));
    }
}
