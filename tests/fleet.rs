//! Seeing the fleet (issue 16): host vitals in the health traffic, shown by `gateway status`
//! and `nodes status` on any gateway; `/metrics` scraped by a real Prometheus server.

mod common;

#[path = "common/faults.rs"]
mod faults;

use std::time::Duration;

use common::{cli, status, wait_until};
use faults::*;
use serde_json::Value;

/// Whether a status document's `vitals` object looks like a real Linux host's.
fn real_vitals(v: &Value) -> bool {
    v["memTotalBytes"].as_u64().is_some_and(|m| m > 0)
        && v["diskTotalBytes"].as_u64().is_some_and(|d| d > 0)
        && v["cpus"].as_u64().is_some_and(|c| c >= 1)
        && v["load1"].is_number()
        && v["uptimeS"].as_u64().is_some_and(|u| u > 0)
        && v["memPct"]
            .as_f64()
            .is_some_and(|p| (0.0..=100.0).contains(&p))
        && v["diskPct"]
            .as_f64()
            .is_some_and(|p| (0.0..=100.0).contains(&p))
        && v["ageMs"].is_u64()
}

#[test]
fn vitals_of_every_gateway_and_node_from_any_gateway() {
    let c = Cluster::start(2, 300);
    let (tokyo, beijing) = (0, 1);
    let node = NodeProc::start(
        c.tmp.path(),
        "bj-box",
        vec![format!("quic://{}", c.public(beijing))],
    );
    assert!(approve_anywhere(&c, "bj-box"), "{}", node.log_tail());

    // Tokyo shows its own vitals and beijing's (from beijing's health datagrams).
    let mut doc = Value::Null;
    let seen = wait_until(Duration::from_secs(20), || {
        doc = status(c.dir(tokyo)).unwrap_or(Value::Null);
        ["tokyo", "beijing"]
            .iter()
            .all(|n| common::row(&doc, n).is_some_and(|g| real_vitals(&g["vitals"])))
    });
    assert!(seen, "no vitals for both gateways: {doc:#}");
    // The CPU share needs two readings: a gateway takes its first when it starts.
    assert!(
        common::row(&doc, "tokyo").unwrap()["vitals"]["cpuPct"].is_number(),
        "{doc:#}"
    );

    // The node's vitals reach beijing with its pings, and tokyo through beijing's relay.
    let mut rows = Vec::new();
    let relayed = wait_until(Duration::from_secs(20), || {
        rows = node_rows(c.dir(tokyo), true).unwrap_or_default();
        rows.iter().any(|r| {
            r["name"] == "bj-box" && r["gateway"] == "beijing" && real_vitals(&r["vitals"])
        })
    });
    assert!(
        relayed,
        "tokyo never saw bj-box's vitals: {rows:#?}\n{}",
        node.log_tail()
    );

    // And the tables show them, in compact columns.
    let table = String::from_utf8_lossy(&cli(c.dir(tokyo), &["gateway", "status", "--all"]).stdout)
        .to_string();
    for col in ["LOAD", "CPU", "MEM", "DISK", "UP"] {
        assert!(table.contains(col), "{table}");
    }
    let nodes = String::from_utf8_lossy(&cli(c.dir(tokyo), &["nodes", "status", "--all"]).stdout)
        .to_string();
    let line = nodes.lines().find(|l| l.contains("bj-box")).unwrap_or("");
    assert!(line.contains('%'), "{nodes}");
}
