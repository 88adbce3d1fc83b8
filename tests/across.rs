//! What a node is and what may be done to it does not depend on the gateway asked (issue 11),
//! with real gateways behind the UDP delay relay:
//!
//! - a pairing request waiting at one gateway is listed (with where it waits) and approved on
//!   another;
//! - a node's `region` is its own label or the region of the gateway where it was paired, and
//!   failing over does not change it (the gateway it is on is a separate field);
//! - a node's exec approvals are read and changed from any gateway;
//! - `nodes status` without `--all` shows a node attached elsewhere as attached there.

mod common;

#[path = "common/faults.rs"]
mod faults;

use std::time::Duration;

use common::{cli, cli_json, nodes_invoke, wait_until};
use faults::*;
use serde_json::Value;

/// The row of node `name` in `nodes status [--all] --json` on gateway `i`.
fn node_row(c: &Cluster, i: usize, name: &str, all: bool) -> Option<Value> {
    node_rows(c.dir(i), all)?
        .into_iter()
        .find(|r| r["name"] == name)
}

#[test]
fn pairing_labels_and_approvals_work_from_any_gateway() {
    let mut c = Cluster::start(3, 300);
    let (tokyo, frankfurt) = (0, 2);
    let urls = vec![
        format!("quic://{}", c.public(frankfurt)),
        format!("quic://{}", c.public(1)),
    ];
    let node = NodeProc::start(c.tmp.path(), "fra-box", urls);

    // The request waits at frankfurt; tokyo lists it, saying where, and approves it.
    let mut req = None;
    let listed = wait_until(Duration::from_secs(20), || {
        let v = cli_json(c.dir(tokyo), &["devices", "list", "--json"]);
        req = v["pending"]
            .as_array()
            .and_then(|p| p.iter().find(|p| p["name"] == "fra-box"))
            .cloned();
        req.is_some()
    });
    assert!(
        listed,
        "tokyo never listed the request: {}",
        node.log_tail()
    );
    let req = req.unwrap();
    assert_eq!(req["gateway"], "frankfurt", "{req}");
    let id = req["requestId"].as_str().unwrap();
    let out = cli(c.dir(tokyo), &["devices", "approve", id]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Approved once, everywhere: no pending request left on any gateway.
    assert!(wait_until(Duration::from_secs(20), || {
        (0..3).all(|i| {
            let v = cli_json(c.dir(i), &["devices", "list", "--json"]);
            v["pending"].as_array().is_some_and(Vec::is_empty)
                && v["paired"]
                    .as_array()
                    .is_some_and(|p| p.iter().any(|d| d["name"] == "fra-box"))
        })
    }));

    // Listed at frankfurt, region frankfurt's, from tokyo; without --all too.
    assert!(
        wait_until(Duration::from_secs(20), || {
            node_row(&c, tokyo, "fra-box", true)
                .is_some_and(|r| r["gateway"] == "frankfurt" && r["connected"] == true)
        }),
        "{}",
        node.log_tail()
    );
    let row = node_row(&c, tokyo, "fra-box", true).unwrap();
    assert_eq!(row["labels"]["region"], "region-frankfurt", "{row}");
    let local_view = node_row(&c, tokyo, "fra-box", false).expect("listed without --all");
    assert_eq!(local_view["gateway"], "frankfurt", "{local_view}");
    assert_eq!(local_view["connected"], true, "{local_view}");

    // Exec approvals from tokyo, of a node attached to frankfurt.
    let got = cli(
        c.dir(tokyo),
        &["approvals", "get", "--node", "fra-box", "--json"],
    );
    assert!(
        got.status.success(),
        "{}",
        String::from_utf8_lossy(&got.stderr)
    );
    let set = cli(
        c.dir(tokyo),
        &["approvals", "allow", "--node", "fra-box", "/usr/bin/true"],
    );
    assert!(
        set.status.success(),
        "{}",
        String::from_utf8_lossy(&set.stderr)
    );
    let got: Value = serde_json::from_slice(
        &cli(
            c.dir(1),
            &["approvals", "get", "--node", "fra-box", "--json"],
        )
        .stdout,
    )
    .unwrap_or(Value::Null);
    assert!(
        got.to_string().contains("/usr/bin/true"),
        "the allowlist change made on tokyo is not there when read from beijing: {got}"
    );

    // Frankfurt dies: the node moves to beijing, keeps its region, and is found by it.
    c.kill9(frankfurt);
    assert!(
        wait_until(Duration::from_secs(20), || {
            node_row(&c, tokyo, "fra-box", true)
                .is_some_and(|r| r["gateway"] == "beijing" && r["connected"] == true)
        }),
        "{}",
        node.log_tail()
    );
    let row = node_row(&c, tokyo, "fra-box", true).unwrap();
    assert_eq!(row["labels"]["region"], "region-frankfurt", "{row}");
    let out = nodes_invoke(
        c.dir(tokyo),
        "region=region-frankfurt",
        "system.which",
        r#"{"bins":["sh"]}"#,
        &[],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    drop(node);
}
