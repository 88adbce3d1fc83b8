//! Upstream mode against the real OpenClaw gateway (`openclaw@2026.9.6`, installed by the
//! suite like tests/classic_interop.rs): two clawmesh gateways, a node attached to the remote
//! one, an OpenClaw gateway beside the primary, which lends it the federation's nodes. One
//! OpenClaw gateway serves every step (its CLI takes about a second per call).

#[path = "common/classic.rs"]
mod classic;
mod common;

use std::path::Path;
use std::time::Duration;

use classic::{oc, openclaw, OpenClawGateway};
use common::*;
use serde_json::{json, Value};

const TOKEN: &str = "oc-token";
/// Health interval of the clawmesh gateways (ms): short, so failover takes seconds.
const INTERVAL_MS: u64 = 500;

fn free_tcp_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// OpenClaw's row of the node whose display name starts with `name`, if listed.
fn oc_node(bin: &Path, home: &Path, url: &str, name: &str) -> Option<Value> {
    let out = oc(bin, home, url, TOKEN, &["nodes", "status", "--json"]);
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let v: Value = serde_json::from_str(&text[text.find('{')?..]).ok()?;
    v["nodes"].as_array()?.iter().find_map(|n| {
        n["displayName"]
            .as_str()
            .is_some_and(|d| d.starts_with(name))
            .then(|| n.clone())
    })
}

/// `openclaw gateway call node.invoke` with `params`; (succeeded, parsed stdout, stderr).
fn oc_invoke(bin: &Path, home: &Path, url: &str, params: &Value) -> (bool, Value, String) {
    let p = params.to_string();
    let out = oc(
        bin,
        home,
        url,
        TOKEN,
        &["gateway", "call", "node.invoke", "--params", &p, "--json"],
    );
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let v = text
        .find('{')
        .and_then(|i| serde_json::from_str(&text[i..]).ok())
        .unwrap_or(Value::Null);
    (
        out.status.success(),
        v,
        format!("{text}\n{}", String::from_utf8_lossy(&out.stderr)),
    )
}

#[test]
fn openclaw_agents_use_a_node_behind_the_remote_clawmesh_gateway() {
    let Some(bin) = openclaw() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let cli_home = tmp.path().join("cli");
    // The OpenClaw gateway, with loopback device pairing NOT silent: both pairing layers go
    // through clawmesh's auto-approval.
    let oc_port = free_tcp_port();
    let mut ocgw = OpenClawGateway::start(
        &bin,
        &tmp.path().join("openclaw"),
        oc_port,
        TOKEN,
        json!({"nodes": {"pairing": {"autoApproveLocal": false}}}),
    );
    let url = ocgw.url.clone();

    // Two clawmesh gateways (started while OpenClaw boots): frankfurt (primary, lending the
    // federation's nodes to OpenClaw) and singapore.
    let (fra, sg) = (tmp.path().join("frankfurt"), tmp.path().join("singapore"));
    let interval = INTERVAL_MS.to_string();
    let mut g_fra = Gw::spawn(
        &fra,
        &[
            "--name",
            "frankfurt",
            "--region",
            "eu-central-1",
            "--primary",
            "--token",
            "fed",
            "--health-interval",
            &interval,
            "--upstream",
            &url,
            "--upstream-token",
            TOKEN,
            "--upstream-auto-approve",
        ],
    );
    let fra_addr = g_fra.wait_ready();
    let join = format!("quic://{fra_addr}");
    let mut g_sg = Gw::spawn(
        &sg,
        &[
            "--name",
            "singapore",
            "--region",
            "ap-southeast-1",
            "--join",
            &join,
            "--token",
            "fed",
            "--health-interval",
            &interval,
        ],
    );
    let sg_addr = g_sg.wait_ready();
    assert!(
        wait_until(Duration::from_secs(20), || sees_healthy(
            &fra,
            &["frankfurt", "singapore"]
        )),
        "{:?}",
        status(&fra)
    );
    // The node: attached to singapore, failing over to frankfurt.
    let node_dir = tmp.path().join("sg-box");
    let _node = Gw::spawn_cmd(
        &node_dir,
        &[
            "node",
            "run",
            "--gateway",
            &format!("quic://{sg_addr}"),
            "--gateway",
            &join,
            "--name",
            "sg-box",
            "--label",
            "city=singapore",
            "--security",
            "full",
        ],
    );
    approve_device(&sg, "sg-box");

    ocgw.wait_ready(&bin, &cli_home, TOKEN);

    // `openclaw nodes status` lists it, paired and connected, with where it is.
    let mut row = None;
    let listed = wait_until(Duration::from_secs(90), || {
        row = oc_node(&bin, &cli_home, &url, "sg-box");
        row.as_ref()
            .is_some_and(|r| r["connected"] == true && r["paired"] == true)
    });
    assert!(
        listed,
        "sg-box not listed in OpenClaw: {row:?}\n{}\nfrankfurt:\n{}",
        String::from_utf8_lossy(
            &oc(&bin, &cli_home, &url, TOKEN, &["nodes", "status", "--json"]).stdout
        ),
        log_tail(&fra, 40)
    );
    let row = row.unwrap();
    assert_eq!(
        row["displayName"], "sg-box (singapore, ap-southeast-1)",
        "{row}"
    );
    let proxy_id = row["nodeId"].as_str().unwrap().to_string();
    assert!(row.to_string().contains("system.run"), "{row}");

    // `openclaw nodes invoke` (what the agent's nodes tool sends) runs on the real node: the
    // capability surface may still be settling right after approval, so retry a little.
    let mut last = String::new();
    let ok = wait_until(Duration::from_secs(30), || {
        let out = oc(
            &bin,
            &cli_home,
            &url,
            TOKEN,
            &[
                "nodes",
                "invoke",
                "--node",
                "sg-box (singapore, ap-southeast-1)",
                "--command",
                "system.which",
                "--params",
                r#"{"bins":["sh"]}"#,
                "--json",
            ],
        );
        last = format!(
            "{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        out.status.success() && last.contains("/sh")
    });
    assert!(
        ok,
        "nodes invoke through OpenClaw failed:\n{last}\n{}",
        log_tail(&fra, 30)
    );

    // system.run through OpenClaw's node.invoke: the node's own exec policy runs it.
    let (ok, v, err) = oc_invoke(
        &bin,
        &cli_home,
        &url,
        &json!({"nodeId": proxy_id, "command": "system.run",
                "params": {"command": ["echo", "from-singapore"]}, "idempotencyKey": "up-1"}),
    );
    assert!(ok, "{err}");
    assert_eq!(v["payload"]["stdout"], "from-singapore\n", "{v}");

    // A timed-out invoke: OpenClaw cancels it, and the command is killed on the node.
    let marker = "upstream-timeout-marker";
    let (ok, _, err) = oc_invoke(
        &bin,
        &cli_home,
        &url,
        &json!({"nodeId": proxy_id, "command": "system.run", "timeoutMs": 2000,
                "params": {"command": ["sh", "-c", format!("sleep 317; echo {marker}")]},
                "idempotencyKey": "up-2"}),
    );
    assert!(!ok, "a 317 s command finished within 2 s?");
    assert!(
        err.contains("TIMEOUT") || err.contains("timed out"),
        "{err}"
    );
    assert!(
        wait_until(Duration::from_secs(10), || !process_running(marker)
            && !process_running("sleep 317")),
        "the timed-out command still runs on the node"
    );

    // Failover: singapore dies, the node moves to frankfurt, OpenClaw keeps the same node.
    g_sg.kill9();
    let mut last = String::new();
    let ok = wait_until(Duration::from_secs(60), || {
        let (ok, v, err) = oc_invoke(
            &bin,
            &cli_home,
            &url,
            &json!({"nodeId": proxy_id, "command": "system.run",
                    "params": {"command": ["echo", "after-failover"]}, "idempotencyKey": "up-3"}),
        );
        last = err;
        ok && v["payload"]["stdout"] == "after-failover\n"
    });
    assert!(
        ok,
        "not reachable after failover:\n{last}\n{}",
        log_tail(&fra, 30)
    );
    let row = oc_node(&bin, &cli_home, &url, "sg-box").unwrap();
    assert_eq!(row["nodeId"], proxy_id.as_str(), "{row}");
    assert_eq!(row["connected"], true, "{row}");

    assert!(!g_fra.log_text().contains("panicked"));
}
