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

/// Tokyo and beijing, with the node `bj-box` attached to beijing and approved.
fn fleet() -> (Cluster, NodeProc) {
    let c = Cluster::start(2, 300);
    let node = NodeProc::start(
        c.tmp.path(),
        "bj-box",
        vec![format!("quic://{}", c.public(1))],
    );
    assert!(approve_anywhere(&c, "bj-box"), "{}", node.log_tail());
    (c, node)
}

#[test]
fn vitals_of_every_gateway_and_node_from_any_gateway() {
    let (c, node) = fleet();
    let tokyo = 0;

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

/// A Prometheus server of the test's own, killed when dropped (also when the test fails).
struct Prometheus {
    child: std::process::Child,
    port: u16,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Prometheus {
    /// Starts `prometheus` scraping `target` every second, with the bearer token `token`.
    fn start(dir: &std::path::Path, target: &str, token: &str) -> Prometheus {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let config = dir.join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
                 scrape_configs:\n  - job_name: clawmesh\n    metrics_path: /metrics\n\
                 \x20   authorization:\n      credentials: {token}\n\
                 \x20   static_configs:\n      - targets: ['{target}']\n"
            ),
        )
        .unwrap();
        let log = std::fs::File::create(dir.join("prometheus.log")).unwrap();
        let child = std::process::Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("tsdb").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(log)
            .spawn()
            .expect("prometheus (Debian package `prometheus`, installed by .ci/run)");
        Prometheus { child, port }
    }

    /// The result vector of an instant query, if Prometheus answered.
    fn query(&self, q: &str) -> Vec<Value> {
        let out = std::process::Command::new("curl")
            .args(["-s", "-G", "--max-time", "5"])
            .arg(format!("http://127.0.0.1:{}/api/v1/query", self.port))
            .arg("--data-urlencode")
            .arg(format!("query={q}"))
            .output()
            .unwrap();
        serde_json::from_slice::<Value>(&out.stdout)
            .ok()
            .and_then(|v| v["data"]["result"].as_array().cloned())
            .unwrap_or_default()
    }

    /// The value of the first series `q` returns.
    fn value(&self, q: &str) -> Option<f64> {
        self.query(q)
            .first()
            .and_then(|s| s["value"][1].as_str()?.parse().ok())
    }
}

#[test]
fn prometheus_scrapes_the_federation_from_one_gateway() {
    let (c, node) = fleet();
    let tmp = tempfile::tempdir().unwrap();
    let target = format!("127.0.0.1:{}", c.port(0));
    let prom = Prometheus::start(tmp.path(), &target, "fed-token");
    let log = || std::fs::read_to_string(tmp.path().join("prometheus.log")).unwrap_or_default();

    // The scrape works (with the bearer token), and the consensus is there.
    let up = wait_until(Duration::from_secs(30), || {
        prom.value("up{job=\"clawmesh\"}") == Some(1.0)
            && prom.value("clawmesh_raft_term").is_some_and(|t| t >= 1.0)
    });
    assert!(up, "prometheus never scraped tokyo:\n{}", log());
    assert_eq!(prom.value("clawmesh_raft_quorum"), Some(1.0));
    assert!(prom
        .value("clawmesh_raft_commit_index")
        .is_some_and(|i| i >= 1.0));
    // The link to beijing, with its round trip through the 30 ms relay.
    assert!(
        wait_until(Duration::from_secs(20), || prom
            .value("clawmesh_link_rtt_seconds{peer=\"beijing\"}")
            .is_some_and(|r| r > 0.0)),
        "no link rtt:\n{}",
        log()
    );
    assert_eq!(
        prom.value("clawmesh_link_health{peer=\"beijing\",state=\"healthy\"}"),
        Some(1.0)
    );
    // Host vitals of the whole federation: both gateways, and the node on beijing, from
    // tokyo's /metrics alone.
    let hosts = wait_until(Duration::from_secs(20), || {
        prom.query("clawmesh_host_memory_total_bytes").len() == 3
            && prom
                .value("clawmesh_host_uptime_seconds{kind=\"node\",name=\"bj-box\",gateway=\"beijing\"}")
                .is_some_and(|u| u > 0.0)
    });
    assert!(
        hosts,
        "{:#?}\n{}",
        prom.query("clawmesh_host_memory_total_bytes"),
        node.log_tail()
    );
    assert!(prom
        .value("process_resident_memory_bytes")
        .is_some_and(|m| m > 0.0));
    assert!(prom.value("process_open_fds").is_some_and(|m| m > 0.0));
    assert_eq!(
        prom.value("clawmesh_nodes_attached{transport=\"quic\"}"),
        Some(0.0),
        "bj-box is on beijing, not tokyo"
    );
    // An invoke through tokyo runs on beijing: counted there, not here.
    let args = [
        "nodes",
        "invoke",
        "--node",
        "bj-box",
        "--command",
        "system.which",
    ];
    let params = ["--params", r#"{"bins":["sh"]}"#, "--json"];
    let done = common::cli_json(c.dir(0), &[&args[..], &params[..]].concat());
    assert_eq!(done["ok"], true, "{done}");
    let scrape = std::process::Command::new("curl")
        .args(["-s", "--max-time", "5"])
        .arg(format!("http://127.0.0.1:{}/metrics", c.port(1)))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&scrape.stdout);
    assert!(
        text.contains("clawmesh_invokes_total{command=\"system.which\",outcome=\"ok\"} 1")
            && text.contains("clawmesh_invoke_duration_seconds_count{command=\"system.which\"} 1")
            && text.contains("clawmesh_nodes_attached{transport=\"quic\"} 1"),
        "{text}"
    );
}
