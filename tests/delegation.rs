//! Cross-gateway delegation over real QUIC through the UDP delay relay: three gateways with
//! simulated WAN latency, nodes on each, invokes from any gateway (native and classic
//! operators), label selection and fan-out, revocation across gateways, node failover when
//! a gateway dies, and routes to a dead gateway that error instead of hanging.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use clawmesh::sim::relay::{PathSettings, WanRelay};
use common::*;
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

const INTERVAL_MS: u64 = 500;

fn node_at(gw: &Path, name: &str) -> Option<String> {
    let out = cli(gw, &["nodes", "status", "--all", "--json"]);
    let v: Value = serde_json::from_slice(&out.stdout).ok()?;
    v["nodes"]
        .as_array()?
        .iter()
        .find(|n| n["name"] == name && n["connected"] == true)
        .and_then(|n| n["gateway"].as_str().map(str::to_string))
}

fn invoke(
    gw: &Path,
    node: &str,
    command: &str,
    params: &str,
    extra: &[&str],
) -> (bool, Value, String) {
    let out = nodes_invoke(gw, node, command, params, extra);
    let v = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    (
        out.status.success(),
        v,
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

async fn classic_invoke(ws_url: &str, token: &str, node: &str) -> Value {
    let (mut ws, _) = tokio_tungstenite::connect_async(ws_url).await.unwrap();
    let _challenge = ws.next().await.unwrap().unwrap();
    let connect = json!({"type":"req","id":"1","method":"connect","params":{
        "minProtocol":4,"maxProtocol":4,"client":{"id":"cli","mode":"cli","version":"2026.9.6","platform":"linux"},
        "role":"operator","scopes":["operator.write"],"auth":{"token":token}}});
    ws.send(Message::Text(connect.to_string().into()))
        .await
        .unwrap();
    let hello: Value = match ws.next().await.unwrap().unwrap() {
        Message::Text(t) => serde_json::from_str(&t).unwrap(),
        other => panic!("{other:?}"),
    };
    assert_eq!(hello["ok"], true, "{hello}");
    let req = json!({"type":"req","id":"2","method":"node.invoke","params":{
        "nodeId":node,"command":"system.which","params":{"bins":["sh"]},"idempotencyKey":"k-classic","timeoutMs":10000}});
    ws.send(Message::Text(req.to_string().into()))
        .await
        .unwrap();
    loop {
        if let Message::Text(t) = ws.next().await.unwrap().unwrap() {
            let v: Value = serde_json::from_str(&t).unwrap();
            if v["type"] == "res" && v["id"] == "2" {
                return v;
            }
        }
    }
}

#[test]
fn delegation_across_three_gateways_over_the_wan_relay() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let relay = rt.block_on(WanRelay::start()).unwrap();
    let names = ["tokyo", "beijing", "frankfurt"];
    let mut public = Vec::new();
    for n in names {
        public.push(rt.block_on(relay.add_site(n, None)).unwrap());
    }
    for (a, b, rtt) in [
        ("tokyo", "beijing", 20),
        ("tokyo", "frankfurt", 40),
        ("beijing", "frankfurt", 50),
    ] {
        relay
            .set_path(
                a,
                b,
                PathSettings {
                    rtt: Duration::from_millis(rtt),
                    ..Default::default()
                },
            )
            .unwrap();
    }
    let tmp = tempfile::tempdir().unwrap();
    let dirs: Vec<PathBuf> = names.iter().map(|n| tmp.path().join(n)).collect();
    // Tokyo serves work for offline gateways (gateway.failover.fallbackNode).
    std::fs::create_dir_all(&dirs[0]).unwrap();
    std::fs::write(
        dirs[0].join("clawmesh.json"),
        r#"{"gateway":{"failover":{"fallbackNode":"primary"}}}"#,
    )
    .unwrap();
    let interval = INTERVAL_MS.to_string();
    let mut gws = Vec::new();
    for (i, n) in names.iter().enumerate() {
        let adv = public[i].to_string();
        let join = format!("quic://{}", public[0]);
        let region = ["tyo", "bj", "fra"][i];
        let mut args = vec![
            "--name",
            n,
            "--region",
            region,
            "--advertise",
            &adv,
            "--token",
            "tok",
            "--health-interval",
            &interval,
        ];
        if i == 0 {
            args.push("--primary");
        } else {
            args.extend(["--join", join.as_str()]);
        }
        let mut g = Gw::spawn(&dirs[i], &args);
        let addr = g.wait_ready();
        relay.set_target(n, addr.parse().unwrap()).unwrap();
        gws.push(g);
    }
    for d in &dirs {
        assert!(
            wait_until(Duration::from_secs(20), || sees_healthy(d, &names)),
            "{}: {:?}",
            d.display(),
            status(d)
        );
    }
    let addr = |i: usize| gws[i].addr();
    // Nodes: web on tokyo and beijing, db on frankfurt (which can fail over to beijing).
    let (a0, a1, a2) = (
        format!("quic://{}", addr(0)),
        format!("quic://{}", addr(1)),
        format!("quic://{}", addr(2)),
    );
    let node = |name: &str, gateways: &[&str], role: &str| {
        let mut args = vec!["node", "run"];
        for g in gateways {
            args.extend(["--gateway", g]);
        }
        let label = format!("role={role}");
        args.extend(["--name", name, "--label", &label, "--security", "full"]);
        Gw::spawn_cmd(&tmp.path().join(name), &args)
    };
    let n_tyo = node("n-tyo", &[&a0], "web");
    let n_bj = node("n-bj", &[&a1], "web");
    let n_fra = node("n-fra", &[&a2, &a1], "db");
    approve_device(&dirs[0], "n-tyo");
    approve_device(&dirs[1], "n-bj");
    approve_device(&dirs[2], "n-fra");
    for (node, gw) in [
        ("n-tyo", "tokyo"),
        ("n-bj", "beijing"),
        ("n-fra", "frankfurt"),
    ] {
        assert!(
            wait_until(Duration::from_secs(20), || node_at(&dirs[0], node)
                .as_deref()
                == Some(gw)),
            "{node} not listed at {gw} from tokyo: {}",
            String::from_utf8_lossy(&cli(&dirs[0], &["nodes", "status", "--all", "--json"]).stdout)
        );
    }
    // Pairing is federation state: every gateway knows all three devices.
    let paired = cli_json(&dirs[1], &["devices", "list", "--json"]);
    assert_eq!(paired["paired"].as_array().unwrap().len(), 3, "{paired}");
    // Region labels default to the gateway's.
    let all = cli_json(&dirs[0], &["nodes", "status", "--all", "--json"]);
    let fra = all["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["name"] == "n-fra")
        .unwrap();
    assert_eq!(fra["labels"]["region"], "fra", "{fra}");

    // Native operator on tokyo reaches frankfurt's node; beijing's operator reaches tokyo/n-tyo.
    let (ok, v, err) = invoke(&dirs[0], "n-fra", "system.which", r#"{"bins":["sh"]}"#, &[]);
    assert!(ok, "{err}");
    assert!(v["payload"]["bins"]["sh"].is_string());
    let (ok, v, err) = invoke(
        &dirs[1],
        "tokyo/n-tyo",
        "system.run",
        r#"{"command":["echo","from-beijing"]}"#,
        &[],
    );
    assert!(ok, "{err}");
    assert_eq!(v["payload"]["stdout"], "from-beijing\n");

    // A classic operator on beijing's bridge reaches frankfurt's node.
    let ws = format!("ws://{}/", addr(1));
    let fra_id = fra["nodeId"].as_str().unwrap().to_string();
    let r = rt.block_on(classic_invoke(&ws, "tok", &fra_id));
    assert_eq!(r["ok"], true, "{r}");
    assert!(r["payload"]["payload"]["bins"]["sh"].is_string(), "{r}");

    // Label selection picks one healthy match; --all fans out, one result per node.
    let (ok, v, err) = invoke(
        &dirs[0],
        "role=db",
        "system.which",
        r#"{"bins":["sh"]}"#,
        &[],
    );
    assert!(ok, "{err}");
    assert_eq!(v["nodeId"], fra_id);
    let (ok, v, err) = invoke(
        &dirs[2],
        "role=web",
        "system.run",
        r#"{"command":["true"]}"#,
        &["--all"],
    );
    assert!(ok, "{err}");
    assert_eq!(v["count"], 2, "{v}");
    let (ok, v, _) = invoke(
        &dirs[2],
        "*",
        "system.which",
        r#"{"bins":["sh"]}"#,
        &["--all"],
    );
    assert!(ok);
    assert_eq!(v["count"], 3, "{v}");
    assert_eq!(v["failed"], 0, "{v}");

    // Any operator method on a named gateway.
    let h = cli_json(
        &dirs[0],
        &[
            "gateway",
            "call",
            "health",
            "--gateway",
            "frankfurt",
            "--json",
        ],
    );
    assert_eq!(h["name"], "frankfurt");

    // Revoke on tokyo cuts n-bj, attached to beijing, within about a second.
    let start = Instant::now();
    assert!(cli(&dirs[0], &["devices", "revoke", "n-bj"])
        .status
        .success());
    assert!(
        wait_until(Duration::from_secs(5), || {
            let out = cli(&dirs[1], &["nodes", "status", "--json"]);
            let v: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
            !v["nodes"]
                .as_array()
                .map(|n| {
                    n.iter()
                        .any(|n| n["name"] == "n-bj" && n["connected"] == true)
                })
                .unwrap_or(true)
        }),
        "revocation did not reach beijing"
    );
    let took = start.elapsed();
    assert!(took < Duration::from_secs(3), "revocation took {took:?}");
    drop(n_bj);

    // Kill frankfurt: n-fra reattaches to beijing and is reachable again.
    gws[2].kill9();
    let killed = Instant::now();
    assert!(
        wait_until(Duration::from_secs(20), || node_at(&dirs[0], "n-fra")
            .as_deref()
            == Some("beijing")),
        "n-fra did not fail over:\n{}",
        n_fra.log_text()
    );
    eprintln!(
        "n-fra reachable via beijing {:?} after frankfurt died",
        killed.elapsed()
    );
    let (ok, _, err) = invoke(&dirs[0], "n-fra", "system.which", r#"{"bins":["sh"]}"#, &[]);
    assert!(ok, "{err}");

    // Routes to the dead gateway: tokyo has a fallback (itself), beijing has none.
    assert!(wait_until(Duration::from_secs(10), || {
        status(&dirs[1])
            .and_then(|d| row(&d, "frankfurt").map(|g| g["status"] == "offline"))
            .unwrap_or(false)
    }));
    let h = cli_json(
        &dirs[0],
        &[
            "gateway",
            "call",
            "health",
            "--gateway",
            "frankfurt",
            "--json",
        ],
    );
    assert_eq!(h["servedBy"], "tokyo", "{h}");
    let start = Instant::now();
    let out = cli(
        &dirs[1],
        &[
            "gateway",
            "call",
            "health",
            "--gateway",
            "frankfurt",
            "--json",
        ],
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("frankfurt is offline") && err.contains("last seen"),
        "{err}"
    );
    assert!(start.elapsed() < Duration::from_secs(10));
    let (ok, _, err) = invoke(&dirs[1], "frankfurt/n-fra", "system.which", "{}", &[]);
    assert!(!ok && err.contains("frankfurt"), "{err}");

    drop(n_tyo);
    drop(n_fra);
    rt.block_on(relay.shutdown());
}
