//! The federation status table people read (`gateway status`), and the `--check` verdict.
//!
//! The gateway builds the JSON ([`crate::gateway::status`]); the CLI renders whatever JSON it
//! received, so the table is the same whether it came from the local gateway or one reached
//! with `--url`.

use std::time::SystemTime;

use serde_json::Value;

/// Whether every gateway in a status document is healthy (for `--check`).
/// A gateway that has not joined its federation is not healthy, whatever its own row says.
pub fn all_healthy(doc: &Value) -> bool {
    if !doc["notJoined"].is_null() {
        return false;
    }
    doc["gateways"]
        .as_array()
        .map(|gs| gs.iter().all(|g| g["status"] == "healthy"))
        .unwrap_or(false)
}

fn ago(rfc: &str, now: SystemTime) -> String {
    let Ok(t) = humantime::parse_rfc3339_weak(rfc) else {
        return rfc.to_string();
    };
    let d = now.duration_since(t).unwrap_or_default().as_secs();
    if d < 1 {
        "just now".into()
    } else if d < 120 {
        format!("{d}s ago")
    } else if d < 7200 {
        format!("{}m ago", d / 60)
    } else if d < 172_800 {
        format!("{}h ago", d / 3600)
    } else {
        format!("{}d ago", d / 86400)
    }
}

fn latency_text(v: &Value) -> String {
    match v.as_f64() {
        Some(x) if x >= 10.0 => format!("{x:.0}ms"),
        Some(x) if x >= 1.0 => format!("{x:.1}ms"),
        Some(x) => format!("{x:.2}ms"),
        None => "-".into(),
    }
}

/// Columns of the table.
const COLUMNS: usize = 13;

/// Renders the status document as the table of seeds/003: name (region), role, status,
/// latency, last seen, then how it was found, its address and version, and its host vitals.
pub fn render_table(doc: &Value) -> String {
    let now = SystemTime::now();
    let mut header: Vec<String> = [
        "GATEWAY",
        "ROLE",
        "STATUS",
        "LATENCY",
        "LAST SEEN",
        "FOUND",
        "ADDRESS",
        "VERSION",
    ]
    .into_iter()
    .chain(crate::cli::vitals::HEADERS)
    .map(String::from)
    .collect();
    header.truncate(COLUMNS);
    let mut rows: Vec<Vec<String>> = vec![header];
    for g in doc["gateways"].as_array().into_iter().flatten() {
        let name = g["name"].as_str().unwrap_or("?");
        let label = match g["region"].as_str() {
            Some(r) => format!("{name} ({r})"),
            None => name.to_string(),
        };
        let label = if g["isSelf"] == true {
            format!("{label} *")
        } else {
            label
        };
        let status = g["status"].as_str().unwrap_or("?");
        let mark = match status {
            "healthy" => "✓",
            "degraded" => "!",
            _ => "✗",
        };
        let last_seen = match g["lastSeen"].as_str() {
            _ if g["isSelf"] == true => "-".to_string(),
            Some(t) => ago(t, now),
            None => "never".into(),
        };
        let mut row = vec![
            label,
            g["role"].as_str().unwrap_or("?").to_string(),
            format!("{mark} {status}"),
            if status == "offline" {
                "-".into()
            } else {
                latency_text(&g["latencyMs"])
            },
            last_seen,
            g["found"].as_str().unwrap_or("-").to_string(),
            g["addr"].as_str().unwrap_or("").to_string(),
            g["version"].as_str().unwrap_or("-").to_string(),
        ];
        row.extend(crate::cli::vitals::cells(&g["vitals"], status != "offline"));
        rows.push(row);
    }
    let widths: Vec<usize> = (0..COLUMNS)
        .map(|c| rows.iter().map(|r| r[c].chars().count()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    out.push_str(&format!(
        "Federation: {} gateways, primary {}, seen from {}\n",
        doc["federationSize"]
            .as_u64()
            .unwrap_or(doc["gateways"].as_array().map_or(0, |g| g.len() as u64)),
        doc["primary"].as_str().unwrap_or("(unknown)"),
        doc["self"].as_str().unwrap_or("?"),
    ));
    for r in &rows {
        let mut line = String::from("  ");
        for (c, cell) in r.iter().enumerate() {
            line.push_str(cell);
            if c + 1 < r.len() {
                let pad = widths[c].saturating_sub(cell.chars().count()) + 2;
                line.push_str(&" ".repeat(pad));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    if let Some(why) = doc["notJoined"].as_str() {
        out.push_str(&format!("Not joined: {why}\n"));
    }
    if let Some(c) = doc.get("consensus").filter(|c| c.is_object()) {
        out.push_str(&consensus_line(c));
    }
    out
}

/// One line on the shared config's consensus, as this gateway sees it: term, revision, voters
/// reachable, and why there is no primary when there is none.
fn consensus_line(c: &Value) -> String {
    let voters = c["voters"].as_array().map_or(0, Vec::len);
    let reachable = c["reachableVoters"].as_u64().unwrap_or(0);
    let mut line = format!(
        "Shared config: revision {}, term {}, {reachable} of {voters} voters reachable",
        c["applied"], c["term"]
    );
    if let Some(learners) = c["learners"].as_array().filter(|l| !l.is_empty()) {
        line.push_str(&format!(", {} learners", learners.len()));
    }
    if c["quorum"] == false && voters > 0 {
        line.push_str(" (no majority: config writes refused, nodes and invokes keep working)");
    } else if c["leader"].is_null() && voters > 0 {
        line.push_str(" (electing a primary)");
    }
    if let Some(e) = c["error"].as_str() {
        line.push_str(&format!(" (consensus stopped: {e})"));
    }
    line.push('\n');
    line
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn consensus_line_says_why_there_is_no_primary() {
        let c = json!({"applied": 812, "term": 3, "voters": ["a","b","c"], "reachableVoters": 1,
                       "learners": [], "quorum": false, "leader": null, "error": null});
        let line = consensus_line(&c);
        assert!(
            line.contains("revision 812, term 3, 1 of 3 voters reachable"),
            "{line}"
        );
        assert!(line.contains("no majority"), "{line}");
        let c = json!({"applied": 9, "term": 1, "voters": ["a"], "reachableVoters": 1,
                       "learners": ["d"], "quorum": true, "leader": "a", "error": null});
        assert_eq!(
            consensus_line(&c),
            "Shared config: revision 9, term 1, 1 of 1 voters reachable, 1 learners\n"
        );
    }

    #[test]
    fn table_has_the_seed_columns() {
        let doc = json!({"self":"tokyo","primary":"tokyo","gateways":[
            {"name":"tokyo","region":"ap-northeast-1","role":"primary","status":"healthy","latencyMs":0.0,"lastSeen":"2026-01-01T00:00:00Z","addr":"127.0.0.1:1","isSelf":true},
            {"name":"frankfurt","region":null,"role":"remote","status":"offline","latencyMs":null,"lastSeen":"2020-01-01T00:00:00Z","addr":"127.0.0.1:2","isSelf":false},
            {"name":"beijing","region":"cn-north-1","role":"remote","status":"healthy","latencyMs":45.3,"lastSeen":null,"addr":"127.0.0.1:3","isSelf":false,"found":"mdns"}
        ]});
        let t = render_table(&doc);
        assert!(t.contains("FOUND") && t.contains("mdns"), "{t}");
        assert!(t.contains("tokyo (ap-northeast-1) *"), "{t}");
        assert!(t.contains("✗ offline"), "{t}");
        assert!(t.contains("45ms"), "{t}");
        assert!(t.contains("d ago"), "{t}");
        assert!(!all_healthy(&doc));
    }

    #[test]
    fn a_gateway_that_has_not_joined_is_not_healthy() {
        let doc = json!({"self":"osaka","primary":null,"notJoined":"join through 127.0.0.1:9 unanswered: timed out","gateways":[
            {"name":"osaka","region":null,"role":"remote","status":"healthy","latencyMs":null,"lastSeen":null,"addr":"127.0.0.1:1","isSelf":true}
        ]});
        let t = render_table(&doc);
        assert!(
            t.contains("Not joined: join through 127.0.0.1:9 unanswered"),
            "{t}"
        );
        assert!(!all_healthy(&doc));
    }
}
