//! Interop with the real, unmodified OpenClaw client (`openclaw@2026.9.6`, CLI and node host)
//! against a clawmesh gateway: classic nodes are nodes, classic operators are operators, over
//! ws:// and wss://.
//!
//! The suite installs the classic client itself from the npm registry into a cache dir
//! (`$CLAWMESH_CLASSIC_CACHE`, default `~/.cache/clawmesh/classic`), reused when present. Under
//! `CI=true` a failed install fails the tests; elsewhere they print loudly that they were
//! skipped and why.

#[path = "common/classic.rs"]
mod classic;
mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use classic::{oc, oc_json, openclaw};
use common::*;
use serde_json::Value;

/// A real `openclaw node run` process, killed on drop.
struct ClassicNode {
    child: std::process::Child,
    log: PathBuf,
}

impl ClassicNode {
    fn start(
        bin: &Path,
        home: &Path,
        port: u16,
        name: &str,
        token: Option<&str>,
        tls_fingerprint: Option<&str>,
    ) -> Self {
        std::fs::create_dir_all(home).unwrap();
        let log = home.join("node.log");
        let f = std::fs::File::create(&log).unwrap();
        let port_s = port.to_string();
        let mut cmd = Command::new(bin);
        cmd.args([
            "node",
            "run",
            "--host",
            "127.0.0.1",
            "--port",
            &port_s,
            "--display-name",
            name,
        ])
        .env("HOME", home)
        .env("OPENCLAW_STATE_DIR", home.join(".openclaw"))
        .stdin(Stdio::null())
        .stdout(Stdio::from(f.try_clone().unwrap()))
        .stderr(Stdio::from(f));
        match tls_fingerprint {
            Some(fp) => {
                cmd.args(["--tls", "--tls-fingerprint", fp]);
            }
            None => {
                cmd.arg("--no-tls");
            }
        }
        match token {
            Some(t) => cmd.env("OPENCLAW_GATEWAY_TOKEN", t),
            None => cmd.env_remove("OPENCLAW_GATEWAY_TOKEN"),
        };
        ClassicNode {
            child: cmd.spawn().unwrap(),
            log,
        }
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for ClassicNode {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn node_row(gw: &Path, name: &str) -> Option<Value> {
    let out = cli(gw, &["nodes", "status", "--json"]);
    let v: Value = serde_json::from_slice(&out.stdout).ok()?;
    v["nodes"]
        .as_array()?
        .iter()
        .find(|n| n["name"] == name)
        .cloned()
}

fn pending_id(gw: &Path, name: &str) -> Option<String> {
    let v = cli_json(gw, &["devices", "list", "--json"]);
    v["pending"]
        .as_array()?
        .iter()
        .find(|p| p["name"] == name)?["requestId"]
        .as_str()
        .map(str::to_string)
}

fn port_of(addr: &str) -> u16 {
    addr.rsplit(':').next().unwrap().parse().unwrap()
}

#[test]
fn real_openclaw_node_and_cli_against_a_clawmesh_gateway() {
    let Some(bin) = openclaw() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let gw = tmp.path().join("gw");
    let mut g = Gw::spawn(&gw, &["--name", "tokyo", "--primary", "--token", "tok"]);
    let addr = g.wait_ready();
    let port = port_of(&addr);
    let url = format!("ws://127.0.0.1:{port}");
    let cli_home = tmp.path().join("cli");

    // A classic node host: pending in `clawmesh devices list`, approved there, then it
    // connects by itself (the pairing error tells it to wait and retry).
    let classic = ClassicNode::start(
        &bin,
        &tmp.path().join("classic"),
        port,
        "classic-a",
        Some("tok"),
        None,
    );
    let mut req = None;
    assert!(
        wait_until(Duration::from_secs(90), || {
            req = pending_id(&gw, "classic-a");
            req.is_some()
        }),
        "classic node never asked to pair:\n{}",
        classic.log_text()
    );
    let out = cli(&gw, &["devices", "approve", req.as_deref().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        wait_until(Duration::from_secs(90), || node_row(&gw, "classic-a")
            .map(|n| n["connected"] == true)
            .unwrap_or(false)),
        "classic node did not connect after approval:\n{}",
        classic.log_text()
    );
    assert_eq!(node_row(&gw, "classic-a").unwrap()["transport"], "ws");

    // A native node, approved with the classic CLI.
    let native_dir = tmp.path().join("native");
    let native = Gw::spawn_cmd(
        &native_dir,
        &[
            "node",
            "run",
            "--gateway",
            &format!("quic://{addr}"),
            "--name",
            "native-a",
            "--security",
            "full",
        ],
    );
    assert!(
        wait_until(Duration::from_secs(20), || pending_id(&gw, "native-a")
            .is_some()),
        "{}",
        native.log_text()
    );
    let list = oc_json(&bin, &cli_home, &url, "tok", &["devices", "list", "--json"]);
    let pending = list["pending"].as_array().expect("pending list");
    let native_req = pending
        .iter()
        .find(|p| p["displayName"] == "native-a")
        .expect("native node pending in openclaw devices list");
    let rid = native_req["requestId"].as_str().unwrap().to_string();
    let out = oc(&bin, &cli_home, &url, "tok", &["devices", "approve", &rid]);
    assert!(
        out.status.success(),
        "openclaw devices approve: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(wait_until(Duration::from_secs(20), || node_row(
        &gw, "native-a"
    )
    .map(|n| n["connected"] == true)
    .unwrap_or(false)));

    // One registry for both transports.
    let st = cli_json(&gw, &["nodes", "status", "--json"]);
    assert_eq!(st["connected"], 2, "{st}");
    let classic_id = node_row(&gw, "classic-a").unwrap()["nodeId"]
        .as_str()
        .unwrap()
        .to_string();
    let native_id = node_row(&gw, "native-a").unwrap()["nodeId"]
        .as_str()
        .unwrap()
        .to_string();

    // clawmesh operators reach the classic node.
    let out = cli(
        &gw,
        &[
            "nodes",
            "invoke",
            "--node",
            "classic-a",
            "--command",
            "system.which",
            "--params",
            r#"{"bins":["sh"]}"#,
            "--json",
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(v["payload"]["bins"]["sh"]
        .as_str()
        .unwrap()
        .ends_with("/sh"));
    let out = cli(
        &gw,
        &[
            "nodes",
            "invoke",
            "--node",
            "classic-a",
            "--command",
            "system.run",
            "--params",
            r#"{"command":["echo","hi"]}"#,
            "--json",
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["payload"]["stdout"], "hi\n", "{v}");

    // Classic operators: gateway call health / status / node.list / node.describe.
    let h = oc_json(
        &bin,
        &cli_home,
        &url,
        "tok",
        &["gateway", "call", "health", "--json"],
    );
    assert_eq!(h["ok"], true);
    let s = oc_json(
        &bin,
        &cli_home,
        &url,
        "tok",
        &["gateway", "call", "status", "--json"],
    );
    assert_eq!(s["self"], "tokyo");
    let l = oc_json(
        &bin,
        &cli_home,
        &url,
        "tok",
        &["gateway", "call", "node.list", "--json"],
    );
    assert_eq!(l["nodes"].as_array().unwrap().len(), 2);
    let params = format!(r#"{{"nodeId":"{classic_id}"}}"#);
    let d = oc_json(
        &bin,
        &cli_home,
        &url,
        "tok",
        &[
            "gateway",
            "call",
            "node.describe",
            "--params",
            &params,
            "--json",
        ],
    );
    assert_eq!(d["displayName"], "classic-a");

    // node.invoke through the classic CLI, against the native AND the classic node.
    let params = format!(
        r#"{{"nodeId":"{native_id}","command":"system.which","params":{{"bins":["sh"]}},"idempotencyKey":"k-native"}}"#
    );
    let r = oc_json(
        &bin,
        &cli_home,
        &url,
        "tok",
        &[
            "gateway",
            "call",
            "node.invoke",
            "--params",
            &params,
            "--json",
        ],
    );
    assert!(r["payload"]["bins"]["sh"].is_string(), "{r}");
    let params = format!(
        r#"{{"nodeId":"{classic_id}","command":"system.run","params":{{"command":["echo","hi"]}},"idempotencyKey":"k-classic"}}"#
    );
    let r = oc_json(
        &bin,
        &cli_home,
        &url,
        "tok",
        &[
            "gateway",
            "call",
            "node.invoke",
            "--params",
            &params,
            "--json",
        ],
    );
    assert_eq!(r["payload"]["stdout"], "hi\n", "{r}");

    // openclaw nodes status / nodes invoke.
    let ns = oc_json(&bin, &cli_home, &url, "tok", &["nodes", "status", "--json"]);
    let text = ns.to_string();
    assert!(
        text.contains("classic-a") && text.contains("native-a"),
        "{text}"
    );
    let r = oc_json(
        &bin,
        &cli_home,
        &url,
        "tok",
        &[
            "nodes",
            "invoke",
            "--node",
            "classic-a",
            "--command",
            "system.which",
            "--params",
            r#"{"bins":["sh"]}"#,
            "--json",
        ],
    );
    assert!(r.to_string().contains("/sh"), "{r}");

    assert!(!g.log_text().contains("panicked"));
    drop(native);
    drop(classic);
    let _ = &mut g;
}

#[test]
fn real_openclaw_node_over_wss_with_a_pinned_fingerprint() {
    let Some(bin) = openclaw() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let gw = tmp.path().join("gw");
    let mut g = Gw::spawn(
        &gw,
        &[
            "--name",
            "tokyo",
            "--primary",
            "--token",
            "tok",
            "--tls",
            "auto",
        ],
    );
    let addr = g.wait_ready();
    let port = port_of(&addr);
    let doc = cli_json(&gw, &["gateway", "status", "--json"]);
    let fp = doc["gateways"][0]["tlsFingerprint"]
        .as_str()
        .expect("status shows the TLS fingerprint")
        .to_string();
    assert_eq!(fp.len(), 64);
    assert!(doc["gateways"][0]["wsUrl"]
        .as_str()
        .unwrap()
        .starts_with("wss://"));

    let classic = ClassicNode::start(
        &bin,
        &tmp.path().join("classic"),
        port,
        "classic-tls",
        Some("tok"),
        Some(&fp),
    );
    let mut req = None;
    assert!(
        wait_until(Duration::from_secs(90), || {
            req = pending_id(&gw, "classic-tls");
            req.is_some()
        }),
        "classic node over wss never asked to pair:\n{}",
        classic.log_text()
    );
    assert!(cli(&gw, &["devices", "approve", req.as_deref().unwrap()])
        .status
        .success());
    assert!(
        wait_until(Duration::from_secs(90), || node_row(&gw, "classic-tls")
            .map(|n| n["connected"] == true)
            .unwrap_or(false)),
        "{}",
        classic.log_text()
    );
    let out = cli(
        &gw,
        &[
            "nodes",
            "invoke",
            "--node",
            "classic-tls",
            "--command",
            "system.which",
            "--params",
            r#"{"bins":["sh"]}"#,
            "--json",
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let _ = &mut g;
}
