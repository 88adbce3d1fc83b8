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

/// A device that is not one of clawmesh's proxies asks OpenClaw to pair as a node host (the
/// node host's connect, signed with a throwaway key); its device id. The auto-approver must
/// leave this request to the OpenClaw operator.
async fn stranger_asks_to_pair(url: &str) -> String {
    use base64::Engine as _;
    use futures_util::{SinkExt as _, StreamExt as _};
    use tokio_tungstenite::tungstenite::Message;
    let key = clawmesh_federation::identity::DeviceIdentity::ephemeral();
    let id = key.device_id().to_string();
    let (mut ws, _) = tokio_tungstenite::connect_async(url).await.unwrap();
    let ch: Value = loop {
        if let Some(Ok(Message::Text(t))) = ws.next().await {
            let v: Value = serde_json::from_str(t.as_str()).unwrap();
            if v["event"] == "connect.challenge" {
                break v["payload"].clone();
            }
        }
    };
    let (nonce, ts) = (ch["nonce"].as_str().unwrap(), ch["ts"].as_u64().unwrap());
    let signed = format!("v3|{id}|node-host|node|node||{ts}|{TOKEN}|{nonce}|linux|linux");
    let sig = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(key.sign(signed.as_bytes()));
    let connect = json!({"type": "req", "id": "1:stranger", "method": "connect", "params": {
        "minProtocol": 4, "maxProtocol": 4,
        "client": {"id": "node-host", "displayName": "stranger", "version": "2026.9.6",
                   "platform": "linux", "deviceFamily": "Linux", "mode": "node"},
        "caps": ["system"], "commands": ["system.run"], "role": "node", "scopes": [],
        "auth": {"token": TOKEN},
        "device": {"id": id, "publicKey": key.public_key().to_base64url(), "signature": sig,
                   "signedAt": ts, "nonce": nonce}}});
    ws.send(Message::text(connect.to_string())).await.unwrap();
    loop {
        match ws.next().await {
            Some(Ok(Message::Text(t))) => {
                let v: Value = serde_json::from_str(t.as_str()).unwrap();
                if v["id"] == "1:stranger" {
                    assert_eq!(v["error"]["details"]["code"], "PAIRING_REQUIRED", "{v}");
                    return id;
                }
            }
            other => panic!("no answer to the stranger's connect: {other:?}"),
        }
    }
}

/// OpenClaw's pending and paired device ids (`device.pair.list`).
fn oc_devices(bin: &Path, home: &Path, url: &str) -> (Vec<String>, Vec<String>) {
    let out = oc(
        bin,
        home,
        url,
        TOKEN,
        &["gateway", "call", "device.pair.list", "--json"],
    );
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let v: Value = text
        .find('{')
        .and_then(|i| serde_json::from_str(&text[i..]).ok())
        .unwrap_or(Value::Null);
    let ids = |k: &str| -> Vec<String> {
        v[k].as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|d| d["deviceId"].as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default()
    };
    (ids("pending"), ids("paired"))
}

#[test]
fn openclaw_agents_use_a_node_behind_the_remote_clawmesh_gateway() {
    let Some(bin) = openclaw() else { return };
    let t0 = std::time::Instant::now();
    let step = |what: &str| eprintln!("[{:6.1}s] {what}", t0.elapsed().as_secs_f64());
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
    let mut node = Gw::spawn_cmd(
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
    let rt = tokio::runtime::Runtime::new().unwrap();
    let stranger = rt.block_on(stranger_asks_to_pair(&url));
    step("openclaw ready");

    // `openclaw nodes status` lists it, paired and connected, with where it is. OpenClaw may
    // list the row a moment before it records the node's declared commands (seen once:
    // `"commands":[]` right after approval), so wait for those too; asserted below.
    let mut row = None;
    let listed = wait_until(Duration::from_secs(90), || {
        row = oc_node(&bin, &cli_home, &url, "sg-box");
        row.as_ref().is_some_and(|r| {
            r["connected"] == true && r["paired"] == true && r.to_string().contains("system.run")
        })
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
    // Auto-approval took clawmesh's own proxy and nothing else.
    let (pending, paired) = oc_devices(&bin, &cli_home, &url);
    assert!(paired.contains(&proxy_id), "{paired:?}");
    assert!(
        pending.contains(&stranger) && !paired.contains(&stranger),
        "{pending:?} {paired:?}"
    );
    step("listed");
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

    step("nodes invoke ok");
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

    step("system.run ok");
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

    step("timeout ok");
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
    step("failover ok");

    // The OpenClaw gateway restarts: the proxy reconnects by itself (backoff), same identity.
    ocgw.kill();
    let mut ocgw = OpenClawGateway::start(
        &bin,
        &tmp.path().join("openclaw"),
        oc_port,
        TOKEN,
        json!({"nodes": {"pairing": {"autoApproveLocal": false}}}),
    );
    ocgw.wait_ready(&bin, &cli_home, TOKEN);
    let ok = wait_until(Duration::from_secs(60), || {
        let (ok, v, err) = oc_invoke(
            &bin,
            &cli_home,
            &url,
            &json!({"nodeId": proxy_id, "command": "system.which",
                    "params": {"bins": ["sh"]}, "idempotencyKey": "up-4"}),
        );
        last = err;
        ok && v["payload"]["bins"]["sh"].is_string()
    });
    assert!(
        ok,
        "not reachable after OpenClaw restarted:\n{last}\n{}",
        log_tail(&fra, 30)
    );
    step("openclaw restart ok");

    // The node leaves the federation: its proxy leaves OpenClaw, and an invoke gets
    // OpenClaw's own answer for a node that is not connected.
    node.kill9();
    assert!(
        wait_until(Duration::from_secs(30), || oc_node(
            &bin, &cli_home, &url, "sg-box"
        )
        .is_none_or(|r| r["connected"] != true)),
        "sg-box still connected in OpenClaw after it left"
    );
    let (ok, _, err) = oc_invoke(
        &bin,
        &cli_home,
        &url,
        &json!({"nodeId": proxy_id, "command": "system.which",
                "params": {"bins": ["sh"]}, "idempotencyKey": "up-5"}),
    );
    assert!(!ok, "invoke of a gone node succeeded");
    assert!(
        err.contains("not connected") || err.contains("NOT_CONNECTED"),
        "{err}"
    );
    step("node left ok");

    assert!(!g_fra.log_text().contains("panicked"));
}
