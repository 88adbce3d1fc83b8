//! The node directory across real gateways (issue 18): attach and detach travel as deltas, and
//! a gateway's view converges after the rare orders of events that break a delta stream:
//!
//! - a link cut (the relay partitions a gateway off, long enough that its links close) while
//!   nodes leave and reattach there, then healed: every gateway lists what the cut gateway
//!   holds, and later changes arrive as deltas again;
//! - a gateway restarted (its directory version counts from zero again, in a new epoch)
//!   while the others still hold its old, higher version: its changes are not taken for old
//!   news.
//!
//! Nodes dial their gateway directly (not through the relay), so the partition cuts only the
//! gateways' links.

mod common;

#[path = "common/faults.rs"]
mod faults;

use std::time::Duration;

use serde_json::Value;

use faults::*;

/// The `directory` counters of `dir`'s gateway (`gateway.status`).
fn directory(dir: &std::path::Path) -> Value {
    common::status(dir)
        .map(|d| d["directory"].clone())
        .unwrap_or(Value::Null)
}

/// Every answering gateway lists `name` exactly as `want` ((gateway, connected) rows).
fn everywhere(c: &Cluster, name: &str, want: &[(&str, bool)]) -> Result<(), String> {
    let want: Vec<(String, bool)> = want.iter().map(|(g, l)| (g.to_string(), *l)).collect();
    for i in c.answering() {
        let got = listed_at(c.dir(i), name);
        if got != want {
            return Err(format!("{} lists {name} as {got:?}", c.name(i)));
        }
    }
    Ok(())
}

fn wait_everywhere(c: &Cluster, name: &str, want: &[(&str, bool)], what: &str) {
    let mut last = String::new();
    let ok = common::wait_until(Duration::from_secs(20), || {
        everywhere(c, name, want).map_err(|e| last = e).is_ok()
    });
    assert!(ok, "{what}: {last}\n{}", c.report());
}

#[test]
fn a_cut_and_healed_link_and_a_restarted_gateway_converge() {
    let mut c = Cluster::start(3, 300);
    let fra = vec![format!("quic://{}", c.direct(2))];
    // An approval's CLI call may time out under load after its write committed (then no
    // request is pending any more): the listings below are what count.
    let mut a = NodeProc::start(c.tmp.path(), "node-a", fra.clone());
    approve_anywhere(&c, "node-a");
    let mut b = NodeProc::start(c.tmp.path(), "node-b", fra);
    approve_anywhere(&c, "node-b");
    wait_everywhere(&c, "node-a", &[("frankfurt", true)], "a attached");
    wait_everywhere(&c, "node-b", &[("frankfurt", true)], "b attached");
    let d = directory(c.dir(2));
    assert!(d["deltasSent"].as_u64() > Some(0), "no deltas sent: {d}");

    // Cut frankfurt off until the others declare it offline (its links close), and change its
    // nodes meanwhile: a leaves, b restarts (a newer attachment).
    c.isolate(2, true);
    let offline = common::wait_until(Duration::from_secs(20), || {
        common::status(c.dir(0))
            .and_then(|d| common::row(&d, "frankfurt").map(|g| g["status"] == "offline"))
            .unwrap_or(false)
    });
    assert!(offline, "frankfurt never offline: {}", c.report());
    let before = listed_attach(c.dir(0), "node-b");
    a.kill9();
    b.kill9();
    b.spawn();
    let ok = common::wait_until(Duration::from_secs(20), || {
        listed_at(c.dir(2), "node-a") == vec![("?".to_string(), false)]
            && listed_at(c.dir(2), "node-b") == vec![("frankfurt".to_string(), true)]
            && listed_attach(c.dir(2), "node-b") != before
    });
    assert!(ok, "frankfurt's own view: {}", c.report());
    // The others still hold frankfurt's last announcement, from before the cut.
    assert_eq!(listed_attach(c.dir(0), "node-b"), before);

    c.isolate(2, false);
    assert!(
        common::wait_until(Duration::from_secs(20), || c.converged()),
        "not healed: {}",
        c.report()
    );
    wait_everywhere(&c, "node-a", &[("?", false)], "a gone after the heal");
    wait_everywhere(
        &c,
        "node-b",
        &[("frankfurt", true)],
        "b back after the heal",
    );
    let attach = listed_attach(c.dir(2), "node-b");
    for i in 0..2 {
        assert_eq!(listed_attach(c.dir(i), "node-b"), attach, "{}", c.name(i));
    }

    // Paging through the CLI: one node a page, the cursor leading to the other.
    let first = common::cli_json(
        c.dir(0),
        &["nodes", "status", "--all", "--json", "--limit", "1"],
    );
    let next = first["next"].as_str().expect("a next cursor").to_string();
    let second = common::cli_json(
        c.dir(0),
        &[
            "nodes", "status", "--all", "--json", "--limit", "1", "--after", &next,
        ],
    );
    let names: Vec<&str> = [&first, &second]
        .iter()
        .filter_map(|p| p["nodes"][0]["name"].as_str())
        .collect();
    let mut sorted = names.clone();
    sorted.sort();
    assert_eq!(sorted, vec!["node-a", "node-b"], "{first} {second}");
    assert_eq!(second["next"], Value::Null, "{second}");

    // A change after the heal travels as a delta, not a snapshot.
    let d = directory(c.dir(2));
    a.spawn();
    wait_everywhere(&c, "node-a", &[("frankfurt", true)], "a back");
    let d2 = directory(c.dir(2));
    assert!(
        d2["deltasSent"].as_u64() > d["deltasSent"].as_u64(),
        "{d} -> {d2}"
    );
    assert_eq!(d2["snapshotsSent"], d["snapshotsSent"], "{d} -> {d2}");

    // Restart frankfurt with no node on it (they would fail over to another gateway): its
    // version starts over in a new epoch, below what the others hold. A node attaching after
    // the restart, and then leaving, must be seen everywhere.
    a.kill9();
    b.kill9();
    wait_everywhere(&c, "node-b", &[("?", false)], "b gone before the restart");
    let old = directory(c.dir(2));
    c.kill9(2);
    c.spawn(2);
    b.spawn();
    wait_everywhere(&c, "node-b", &[("frankfurt", true)], "b after the restart");
    let new = directory(c.dir(2));
    assert_ne!(new["epoch"], old["epoch"]);
    assert!(
        new["version"].as_u64() < old["version"].as_u64(),
        "{old} -> {new}"
    );
    b.kill9();
    wait_everywhere(&c, "node-b", &[("?", false)], "b gone after the restart");
}

/// The attach order `dir`'s gateway lists for node `name` (empty if none).
fn listed_attach(dir: &std::path::Path, name: &str) -> String {
    node_rows(dir, true)
        .unwrap_or_default()
        .iter()
        .find(|r| r["name"] == name)
        .and_then(|r| r["attach"].as_str().map(str::to_string))
        .unwrap_or_default()
}
