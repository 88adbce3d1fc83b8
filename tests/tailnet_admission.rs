//! Tailnet-backed admission with real parts: a gateway, native nodes and operators in network
//! namespaces of the test's own, on 100.64.0.0/10 addresses put on their interfaces, so the
//! gateway's whois sees each connection's real source address. tailscaled is the only fake
//! (discovery/tests/support/fake_tailscaled.rs, following the LocalAPI contract); it knows the
//! namespaces' tailnet addresses as peers with tags or owners.
//!
//! Skipped loudly where namespaces cannot be made (not root), failing under CI=true.

#[path = "common/classic.rs"]
mod classic;
mod common;
#[path = "../discovery/tests/support/fake_tailscaled.rs"]
mod fake_tailscaled;
#[path = "common/netns.rs"]
mod netns;

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use common::{wait_until, Gw, BIN};
use netns::{lan_or_skip, Lan};
use serde_json::{json, Value};

/// Attaches, approvals and revocations take well under this; only a real failure reaches it.
const WAIT: Duration = Duration::from_secs(30);

const GW_IP: &str = "100.64.7.1";
const PORT: &str = "18789";

fn quic_url() -> String {
    format!("quic://{GW_IP}:{PORT}")
}

/// Runs the CLI in namespace `i` and parses its JSON output (None on failure).
fn cli_json(lan: &Lan, i: usize, dir: &Path, args: &[&str]) -> Option<Value> {
    let out = lan.cli(i, BIN, dir, args);
    if !out.status.success() {
        return None;
    }
    serde_json::from_slice(&out.stdout).ok()
}

fn node_row(lan: &Lan, gw: &Path, name: &str) -> Option<Value> {
    let v = cli_json(lan, 0, gw, &["nodes", "status", "--json"])?;
    v["nodes"]
        .as_array()?
        .iter()
        .find(|n| n["name"] == name)
        .cloned()
}

fn connected(lan: &Lan, gw: &Path, name: &str) -> bool {
    node_row(lan, gw, name).is_some_and(|n| n["connected"] == true)
}

fn devices(lan: &Lan, gw: &Path) -> Value {
    cli_json(lan, 0, gw, &["devices", "list", "--json"]).unwrap_or(Value::Null)
}

fn pending<'a>(list: &'a Value, name: &str) -> Option<&'a Value> {
    list["pending"]
        .as_array()?
        .iter()
        .find(|p| p["name"] == name)
}

/// The gateway `osaka` in namespace 0: primary of federation `fed-T`, bound to the LAN side
/// on `PORT`, no mDNS (the tailnet is the only discovery here); then `extra`. Waits until it
/// is ready.
fn osaka(lan: &Lan, dir: &Path, extra: &[&str]) -> Gw {
    let mut args = vec![
        "gateway",
        "run",
        "--name",
        "osaka",
        "--primary",
        "--token",
        "fed-T",
        "--bind",
        "lan",
        "--port",
        PORT,
        "--no-mdns",
    ];
    args.extend_from_slice(extra);
    let mut gw = Gw::spawn_wrapped(&["ip", "netns", "exec", lan.ns(0)], dir, &args, &[]);
    gw.wait_ready();
    gw
}

/// A native node host in namespace `i`, dialing the gateway's tailnet address.
fn node(lan: &Lan, i: usize, dir: &Path, name: &str) -> Gw {
    Gw::spawn_wrapped(
        &["ip", "netns", "exec", lan.ns(i)],
        dir,
        &[
            "node",
            "run",
            "--gateway",
            &quic_url(),
            "--name",
            name,
            "--security",
            "full",
        ],
        &[],
    )
}

/// Runs [`probe_classic_operator`] (this test binary, re-executed) inside namespace `i`:
/// a classic WebSocket operator `connect` with no token and no device, sending `headers`.
/// Returns the gateway's answer to `connect`.
fn classic_operator_probe(lan: &Lan, i: usize, headers: &[(&str, &str)]) -> Value {
    let exe = std::env::current_exe().unwrap();
    let out = lan
        .command(i, exe.to_str().unwrap())
        .args(["probe_classic_operator", "--exact", "--nocapture"])
        .env("CLAWMESH_PROBE_URL", format!("ws://{GW_IP}:{PORT}"))
        .env("CLAWMESH_PROBE_HEADERS", json!(headers).to_string())
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let line = text
        .lines()
        .find_map(|l| l.strip_prefix("PROBE_RESULT "))
        .unwrap_or_else(|| panic!("probe printed no result:\n{text}"));
    serde_json::from_str(line).unwrap()
}

/// Helper, not a test of its own: run by [`classic_operator_probe`] inside a namespace (with
/// `CLAWMESH_PROBE_URL` set); does nothing otherwise.
#[test]
fn probe_classic_operator() {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    use tokio_tungstenite::tungstenite::Message;
    let Ok(url) = std::env::var("CLAWMESH_PROBE_URL") else {
        return;
    };
    let headers: Vec<(String, String)> =
        serde_json::from_str(&std::env::var("CLAWMESH_PROBE_HEADERS").unwrap()).unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let result = rt.block_on(async move {
        let mut req = url.into_client_request().unwrap();
        for (k, v) in &headers {
            req.headers_mut().insert(
                tokio_tungstenite::tungstenite::http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        let (mut ws, _) = tokio_tungstenite::connect_async(req).await.unwrap();
        let _challenge = ws.next().await.unwrap().unwrap();
        let connect = json!({"type":"req","id":"1","method":"connect","params":{
            "minProtocol":4,"maxProtocol":4,
            "client":{"id":"cli","mode":"cli","version":"probe","platform":"linux"},
            "role":"operator","scopes":[],"auth":{}}});
        ws.send(Message::Text(connect.to_string().into()))
            .await
            .unwrap();
        loop {
            match ws.next().await {
                Some(Ok(Message::Text(t))) => {
                    let v: Value = serde_json::from_str(&t).unwrap();
                    if v["type"] == "res" {
                        return v;
                    }
                }
                Some(Ok(_)) => continue,
                other => return json!({"closed": format!("{other:?}")}),
            }
        }
    });
    println!("PROBE_RESULT {result}");
}

/// The whole path of a tailnet-vouched federation:
/// - a node tagged `tag:clawmesh-node` is admitted without approval (`approvedBy: tailscale`
///   with its tailnet identity) and serves commands;
/// - a node owned by a user the policy does not list waits pending, with the reason;
/// - a second key from the tagged node's tailnet address waits pending (one node, one key);
/// - an operator from an allowed user reaches the gateway with `--url` and no token, with the
///   policy's scopes only; a disallowed user does not;
/// - a classic operator with a forged `tailscale-user-login` header from a disallowed address
///   gets nothing; from the allowed user's address it gets in without a token;
/// - tailscaled down: a new node waits pending with the reason; back up, it is admitted;
/// - the tag removed: the node is disconnected within the re-check interval and shown revoked
///   with the reason.
#[test]
fn tailnet_vouches_for_nodes_and_operators() {
    let Some(lan) = lan_or_skip(6, "tailnet_vouches_for_nodes_and_operators") else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let d = |n: &str| tmp.path().join(n);
    let ips = [
        GW_IP,
        "100.64.7.2",
        "100.64.7.3",
        "100.64.7.4",
        "100.64.7.5",
        "100.64.7.6",
    ];
    for (i, ip) in ips.iter().enumerate() {
        lan.add_addr(i, &format!("{ip}/10"));
    }
    let rt = tokio::runtime::Runtime::new().unwrap();
    let sock = tmp.path().join("tailscaled.sock");
    let mut fake = rt.block_on(fake_tailscaled::FakeTailscaled::start(&sock));
    let ip = |i: usize| ips[i].parse().unwrap();
    fake.add_peer("gw-osaka", ip(0), &["tag:clawmesh-gateway"], 0x70);
    fake.add_peer("node-tag", ip(1), &["tag:clawmesh-node"], 0x71);
    fake.add_peer("node-bob", ip(2), &[], 0x72);
    fake.set_login("node-bob", "bob@example.com");
    fake.add_peer("laptop-alice", ip(3), &[], 0x73);
    fake.set_login("laptop-alice", "alice@example.com");
    fake.add_peer("node-late", ip(4), &["tag:clawmesh-node"], 0x74);

    std::fs::create_dir_all(d("gw")).unwrap();
    std::fs::write(
        d("gw").join("clawmesh.json"),
        json!({"gateway": {
            "auth": {"allowTailscale": true, "tailscale": {
                "nodeTags": ["tag:clawmesh-node"],
                "nodeUsers": ["alice@example.com"],
                "operatorUsers": ["alice@example.com"],
                "operatorScopes": ["operator.read"],
                "recheckInterval": 500,
            }},
            "discovery": {"tailnetSocket": sock},
        }})
        .to_string(),
    )
    .unwrap();
    let advertise = format!("{GW_IP}:{PORT}");
    // Nodes learn this address from the member list and reconnect to it.
    let gw = osaka(&lan, &d("gw"), &["--advertise", &advertise]);

    // An allowed tag: in at once, and it serves commands.
    let _tagged = node(&lan, 1, &d("node-tag"), "node-tag");
    assert!(
        wait_until(WAIT, || connected(&lan, &d("gw"), "node-tag")),
        "the tagged node was not admitted:\n{}",
        gw.log_text()
    );
    let row = node_row(&lan, &d("gw"), "node-tag").unwrap();
    assert_eq!(row["approvedBy"], "tailscale", "{row}");
    assert_eq!(
        row["tailnet"]["tags"],
        json!(["tag:clawmesh-node"]),
        "{row}"
    );
    assert_eq!(row["tailnet"]["ip"], ips[1], "{row}");
    assert!(
        row["tailnet"].get("login").is_none(),
        "tagged-devices is no user: {row}"
    );
    let run = cli_json(
        &lan,
        0,
        &d("gw"),
        &[
            "nodes",
            "invoke",
            "--node",
            "node-tag",
            "--command",
            "system.run",
            "--params",
            r#"{"command":["echo","vouched"]}"#,
            "--json",
        ],
    )
    .expect("invoke on the tailnet-admitted node");
    assert_eq!(run["payload"]["stdout"], "vouched\n", "{run}");
    let list = devices(&lan, &d("gw"));
    let paired = list["paired"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "node-tag")
        .unwrap_or_else(|| panic!("{list}"));
    assert_eq!(paired["approvedBy"], "tailscale");
    assert!(paired["tailnet"]["node"]
        .as_str()
        .unwrap()
        .starts_with("node-tag."));

    // A user the policy does not list: pending, with the reason.
    let _bob = node(&lan, 2, &d("node-bob"), "node-bob");
    let mut list = Value::Null;
    assert!(
        wait_until(WAIT, || {
            list = devices(&lan, &d("gw"));
            pending(&list, "node-bob").is_some()
        }),
        "bob's node never asked:\n{}",
        gw.log_text()
    );
    let reason = pending(&list, "node-bob").unwrap()["reason"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(
        reason.contains("bob@example.com") && reason.contains("not allowed"),
        "{list}"
    );
    assert!(!connected(&lan, &d("gw"), "node-bob"));

    // The same tailnet node with another key: pending, the first binding stands.
    let _twin = node(&lan, 1, &d("node-tag-twin"), "node-tag-twin");
    assert!(
        wait_until(WAIT, || pending(&devices(&lan, &d("gw")), "node-tag-twin")
            .is_some_and(|p| p["reason"]
                .as_str()
                .unwrap_or("")
                .contains("bound to device"))),
        "{}",
        devices(&lan, &d("gw"))
    );
    assert!(gw
        .log_text()
        .contains("tailnet node already bound to another device key"));

    // Operators: alice with --url and no token gets the policy's scopes; bob gets nothing.
    let st = cli_json(
        &lan,
        3,
        &d("alice"),
        &["nodes", "status", "--url", &quic_url(), "--json"],
    )
    .expect("alice's nodes status without a token");
    assert!(
        st["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .any(|n| n["name"] == "node-tag" && n["approvedBy"] == "tailscale"),
        "{st}"
    );
    let out = lan.cli(
        3,
        BIN,
        &d("alice"),
        &[
            "nodes",
            "invoke",
            "--url",
            &quic_url(),
            "--node",
            "node-tag",
            "--command",
            "system.run",
            "--params",
            r#"{"command":["true"]}"#,
        ],
    );
    assert!(!out.status.success(), "operator.read cannot invoke");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("operator.write"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = lan.cli(
        2,
        BIN,
        &d("bob"),
        &["nodes", "status", "--url", &quic_url()],
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("bob@example.com"), "{err}");

    // A forged identity header from bob's address changes nothing; alice's address (no
    // header at all) is enough for a classic operator.
    let forged = classic_operator_probe(
        &lan,
        2,
        &[
            ("tailscale-user-login", "alice@example.com"),
            ("tailscale-user-name", "Alice"),
        ],
    );
    assert_eq!(forged["ok"], false, "{forged}");
    let real = classic_operator_probe(&lan, 3, &[]);
    assert_eq!(real["ok"], true, "{real}");
    assert_eq!(real["payload"]["auth"]["method"], "tailscale", "{real}");
    assert_eq!(real["payload"]["auth"]["scopes"], json!(["operator.read"]));

    // tailscaled down: a new node waits pending with the reason; back up, it is admitted.
    fake.stop();
    let _late = node(&lan, 4, &d("node-late"), "node-late");
    assert!(
        wait_until(WAIT, || pending(&devices(&lan, &d("gw")), "node-late")
            .is_some_and(|p| p["reason"]
                .as_str()
                .unwrap_or("")
                .contains("tailscaled unreachable"))),
        "{}",
        devices(&lan, &d("gw"))
    );
    assert!(!connected(&lan, &d("gw"), "node-late"));
    // The tagged node admitted earlier stays: the daemon's trouble is not the device's.
    assert!(connected(&lan, &d("gw"), "node-tag"));
    {
        // The fake serves on this test's runtime.
        let _rt = rt.enter();
        fake.restart();
    }
    assert!(
        wait_until(WAIT, || connected(&lan, &d("gw"), "node-late")),
        "node-late not admitted once tailscaled is back:\n{}",
        gw.log_text()
    );

    // The tag removed: disconnected within the re-check interval, revoked with the reason.
    fake.add_peer("node-tag", ip(1), &[], 0x71);
    let mut list = Value::Null;
    assert!(
        wait_until(WAIT, || {
            list = devices(&lan, &d("gw"));
            !connected(&lan, &d("gw"), "node-tag")
                && list["revoked"].as_array().is_some_and(|r| {
                    r.iter().any(|x| {
                        x["name"] == "node-tag"
                            && x["revokedBy"] == "tailscale"
                            && x["reason"]
                                .as_str()
                                .unwrap_or("")
                                .contains("no longer vouches")
                    })
                })
        }),
        "{list}\n{}",
        gw.log_text()
    );
    // It reconnects and waits pending, with the tailnet's reason.
    assert!(
        wait_until(WAIT, || pending(&devices(&lan, &d("gw")), "node-tag")
            .is_some_and(|p| p["reason"]
                .as_str()
                .unwrap_or("")
                .contains("not allowed"))),
        "{}",
        devices(&lan, &d("gw"))
    );

    // A device removed from the tailnet (whois 404): revoked the same way.
    fake.remove_peer("node-late");
    assert!(
        wait_until(WAIT, || !connected(&lan, &d("gw"), "node-late")
            && devices(&lan, &d("gw"))["revoked"]
                .as_array()
                .is_some_and(|r| r.iter().any(|x| x["name"] == "node-late"
                    && x["reason"]
                        .as_str()
                        .unwrap_or("")
                        .contains("not a node of the tailnet")))),
        "{}",
        devices(&lan, &d("gw"))
    );
    assert!(!gw.log_text().contains("panicked"));
    drop(fake);
}

/// The real classic node host (`openclaw node run`, no token) from a tagged tailnet address is
/// admitted the same way, without approval, and serves a command.
#[test]
fn classic_node_host_admitted_by_the_tailnet() {
    let Some(oc) = classic::openclaw() else {
        return;
    };
    let Some(lan) = lan_or_skip(2, "classic_node_host_admitted_by_the_tailnet") else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let d = |n: &str| tmp.path().join(n);
    let ips = [GW_IP, "100.64.7.12"];
    for (i, ip) in ips.iter().enumerate() {
        lan.add_addr(i, &format!("{ip}/10"));
    }
    let rt = tokio::runtime::Runtime::new().unwrap();
    let sock = tmp.path().join("tailscaled.sock");
    let fake = rt.block_on(fake_tailscaled::FakeTailscaled::start(&sock));
    let ip = |i: usize| ips[i].parse().unwrap();
    fake.add_peer("gw-osaka", ip(0), &["tag:clawmesh-gateway"], 0x80);
    fake.add_peer("classic-box", ip(1), &["tag:clawmesh-node"], 0x81);
    std::fs::create_dir_all(d("gw")).unwrap();
    std::fs::write(
        d("gw").join("clawmesh.json"),
        json!({"gateway": {
            "auth": {"allowTailscale": true, "tailscale": {
                "nodeTags": ["tag:clawmesh-node"],
            }},
            "discovery": {"tailnetSocket": sock},
        }})
        .to_string(),
    )
    .unwrap();
    let gw = osaka(&lan, &d("gw"), &[]);

    let home = d("classic");
    std::fs::create_dir_all(&home).unwrap();
    let log = home.join("node.log");
    let f = std::fs::File::create(&log).unwrap();
    let mut classic = lan
        .command(1, oc.to_str().unwrap())
        .args([
            "node",
            "run",
            "--host",
            GW_IP,
            "--port",
            PORT,
            "--display-name",
            "classic-box",
            "--no-tls",
        ])
        .env("HOME", &home)
        .env("OPENCLAW_STATE_DIR", home.join(".openclaw"))
        // 100.64/10 is a private range to a tailnet, not the public internet.
        .env("OPENCLAW_ALLOW_INSECURE_PRIVATE_WS", "1")
        .env_remove("OPENCLAW_GATEWAY_TOKEN")
        .stdin(Stdio::null())
        .stdout(Stdio::from(f.try_clone().unwrap()))
        .stderr(Stdio::from(f))
        .spawn()
        .unwrap();
    let up = wait_until(Duration::from_secs(90), || {
        connected(&lan, &d("gw"), "classic-box")
    });
    let node_log = std::fs::read_to_string(&log).unwrap_or_default();
    if !up {
        let _ = classic.kill();
        let _ = classic.wait();
        panic!(
            "classic node host not admitted by the tailnet:\n{node_log}\n{}",
            gw.log_text()
        );
    }
    let row = node_row(&lan, &d("gw"), "classic-box").unwrap();
    assert_eq!(row["transport"], "ws", "{row}");
    assert_eq!(row["approvedBy"], "tailscale", "{row}");
    assert_eq!(
        row["tailnet"]["tags"],
        json!(["tag:clawmesh-node"]),
        "{row}"
    );
    let run = cli_json(
        &lan,
        0,
        &d("gw"),
        &[
            "nodes",
            "invoke",
            "--node",
            "classic-box",
            "--command",
            "system.run",
            "--params",
            r#"{"command":["echo","classic"]}"#,
            "--json",
        ],
    );

    let _ = classic.kill();
    let _ = classic.wait();
    let run = run.expect("invoke on the classic node");
    assert_eq!(run["payload"]["stdout"], "classic\n", "{run}");
    assert!(!node_log.contains("pairing required"), "{node_log}");
    drop(fake);
}
