//! Nodes over real QUIC with real gateway and node processes: pairing, system.run and
//! friends, exec approvals, and the errors an operator meets.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

fn nodes_status(gw: &Path) -> Value {
    cli_json(gw, &["nodes", "status", "--json"])
}

fn connected(gw: &Path, name: &str) -> bool {
    let out = cli(gw, &["nodes", "status", "--json"]);
    let Ok(v) = serde_json::from_slice::<Value>(&out.stdout) else {
        return false;
    };
    v["nodes"]
        .as_array()
        .map(|ns| {
            ns.iter()
                .any(|n| n["name"] == name && n["connected"] == true)
        })
        .unwrap_or(false)
}

fn pending_request(gw: &Path, name: &str) -> Option<String> {
    let v = cli_json(gw, &["devices", "list", "--json"]);
    v["pending"]
        .as_array()?
        .iter()
        .find(|p| p["name"] == name)
        .and_then(|p| p["requestId"].as_str().map(str::to_string))
}

fn invoke_ok(gw: &Path, node: &str, command: &str, params: &str) -> Value {
    let out = nodes_invoke(gw, node, command, params, &[]);
    let v: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    assert_eq!(
        v["ok"],
        true,
        "{command} {params}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Like ssh, the CLI exits with the remote command's status.
    assert_eq!(out.status.code(), v["exitCode"].as_i64().map(|c| c as i32));
    v["payload"].clone()
}

fn invoke_err(gw: &Path, node: &str, command: &str, params: &str, extra: &[&str]) -> String {
    let out = nodes_invoke(gw, node, command, params, extra);
    assert!(
        !out.status.success(),
        "{command} {params} should fail: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    // With --json the error is a JSON document on stdout; its exit status follows its code
    // (124 for a timeout, 126 for an exec-approvals refusal, else 2).
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["ok"], false);
    assert_eq!(
        out.status.code(),
        v["error"]["exitCode"].as_i64().map(|c| c as i32)
    );
    format!(
        "{}: {}",
        v["error"]["code"].as_str().unwrap(),
        v["error"]["message"].as_str().unwrap()
    )
}

/// A gateway on a fixed port and a node attached to it, approved.
struct Setup {
    _tmp: tempfile::TempDir,
    gw_dir: std::path::PathBuf,
    node_dir: std::path::PathBuf,
    port: u16,
    gw: Gw,
    node: Gw,
}

fn setup(node_args: &[&str]) -> Setup {
    let tmp = tempfile::tempdir().unwrap();
    let gw_dir = tmp.path().join("gw");
    let port = free_udp_port();
    let port_s = port.to_string();
    let mut gw = Gw::spawn_cmd(
        &gw_dir,
        &[
            "gateway",
            "run",
            "--name",
            "tokyo",
            "--primary",
            "--port",
            &port_s,
            "--health-interval",
            "500",
        ],
    );
    gw.wait_ready();
    let node_dir = tmp.path().join("node");
    let url = format!("quic://127.0.0.1:{port}");
    let mut args = vec!["node", "run", "--gateway", url.as_str(), "--name", "node-a"];
    args.extend_from_slice(node_args);
    let node = Gw::spawn_cmd(&node_dir, &args);
    let mut req = None;
    assert!(
        wait_until(Duration::from_secs(15), || {
            req = pending_request(&gw_dir, "node-a");
            req.is_some()
        }),
        "no pending request:\n{}",
        node.log_text()
    );
    assert!(
        !connected(&gw_dir, "node-a"),
        "an unpaired node must not be attached"
    );
    let out = cli(&gw_dir, &["devices", "approve", req.as_deref().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The node attaches by itself, without a restart.
    assert!(
        wait_until(Duration::from_secs(15), || connected(&gw_dir, "node-a")),
        "{}",
        node.log_text()
    );
    let _ = &mut gw;
    Setup {
        _tmp: tmp,
        gw_dir,
        node_dir,
        port,
        gw,
        node,
    }
}

#[test]
fn pairing_approve_reject_revoke_and_restart() {
    let mut s = setup(&[]);
    let st = nodes_status(&s.gw_dir);
    assert_eq!(
        (
            st["known"].as_u64(),
            st["paired"].as_u64(),
            st["connected"].as_u64()
        ),
        (Some(1), Some(1), Some(1))
    );
    assert_eq!(st["nodes"][0]["transport"], "quic");
    assert_eq!(st["nodes"][0]["gateway"], "tokyo");
    // The fingerprint shown matches the node's identity.
    let id = cli_json(&s.node_dir, &["identity", "show", "--json"]);
    let list = cli_json(&s.gw_dir, &["devices", "list", "--json"]);
    assert_eq!(list["paired"][0]["deviceId"], id["deviceId"]);
    assert!(list["next"].is_null(), "one device, one page: {list}");
    // Paging: the page after the only device is empty; a bad cursor is a clear error.
    let cursor = list["paired"][0]["publicKey"].as_str().unwrap();
    let rest = cli_json(
        &s.gw_dir,
        &[
            "devices", "list", "--json", "--limit", "1", "--after", cursor,
        ],
    );
    assert_eq!(rest["paired"].as_array().map(Vec::len), Some(0), "{rest}");
    let out = cli(&s.gw_dir, &["devices", "list", "--after", "bogus"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("after must be the `next` of the previous page"),
        "{err}"
    );
    let table = String::from_utf8_lossy(&cli(&s.gw_dir, &["nodes", "status"]).stdout).to_string();
    assert!(
        table.contains("Known: 1 · Paired: 1 · Connected: 1")
            && table.contains("paired · connected"),
        "{table}"
    );

    // Revoke: disconnected at once, and it has to ask again.
    let out = cli(&s.gw_dir, &["devices", "revoke", "node-a"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!connected(&s.gw_dir, "node-a"));
    assert!(wait_until(Duration::from_secs(15), || pending_request(
        &s.gw_dir, "node-a"
    )
    .is_some()));

    // Reject: the request goes away (the node may ask again later).
    let req = pending_request(&s.gw_dir, "node-a").unwrap();
    assert!(cli(&s.gw_dir, &["devices", "reject", &req])
        .status
        .success());
    let after = cli_json(&s.gw_dir, &["devices", "list", "--json"]);
    assert!(after["pending"]
        .as_array()
        .unwrap()
        .iter()
        .all(|p| p["requestId"] != req.as_str()));
    assert!(!connected(&s.gw_dir, "node-a"));

    // Approve again, then restart the gateway on the same port: the pairing is kept.
    assert!(wait_until(Duration::from_secs(15), || pending_request(
        &s.gw_dir, "node-a"
    )
    .is_some()));
    assert!(cli(&s.gw_dir, &["devices", "approve", "node-a"])
        .status
        .success());
    assert!(wait_until(Duration::from_secs(15), || connected(
        &s.gw_dir, "node-a"
    )));
    assert!(s.gw.term().success());
    let port_s = s.port.to_string();
    let mut gw = Gw::spawn_cmd(
        &s.gw_dir,
        &[
            "gateway",
            "run",
            "--name",
            "tokyo",
            "--primary",
            "--port",
            &port_s,
        ],
    );
    gw.wait_ready();
    assert!(
        wait_until(Duration::from_secs(20), || connected(&s.gw_dir, "node-a")),
        "{}",
        s.node.log_text()
    );
    assert!(pending_request(&s.gw_dir, "node-a").is_none());
}

#[test]
fn system_run_which_timeouts_truncation_and_errors() {
    let mut s = setup(&["--security", "full"]);
    let gw = s.gw_dir.clone();

    // echo, stdout, stderr, exit code.
    let p = invoke_ok(
        &gw,
        "node-a",
        "system.run",
        r#"{"command":["sh","-c","echo out; echo err >&2; exit 3"]}"#,
    );
    assert_eq!(p["stdout"], "out\n");
    assert_eq!(p["stderr"], "err\n");
    assert_eq!(p["exitCode"], 3);
    assert_eq!(p["success"], false);
    let p = invoke_ok(&gw, "node-a", "system.run", r#"{"command":["echo","hi"]}"#);
    assert_eq!(
        (p["stdout"].as_str(), p["success"].as_bool()),
        (Some("hi\n"), Some(true))
    );

    // The command's own timeout kills it and its children.
    let start = Instant::now();
    let p = invoke_ok(
        &gw,
        "node-a",
        "system.run",
        r#"{"command":["sh","-c","sleep 31.25 & sleep 31.25; wait"],"timeoutMs":500}"#,
    );
    assert_eq!(p["timedOut"], true);
    assert!(start.elapsed() < Duration::from_secs(10));
    assert!(
        wait_until(Duration::from_secs(5), || !process_running("sleep 31.25")),
        "children survived the timeout"
    );

    // The gateway's timeout: the node is told to cancel and kills the group.
    let err = invoke_err(
        &gw,
        "node-a",
        "system.run",
        r#"{"command":["sh","-c","sleep 32.5 & sleep 32.5; wait"]}"#,
        &["--timeout", "700"],
    );
    assert!(err.contains("TIMEOUT"), "{err}");
    assert!(
        wait_until(Duration::from_secs(5), || !process_running("sleep 32.5")),
        "cancel did not kill the group"
    );

    // Output truncation at 1 MiB.
    let p = invoke_ok(
        &gw,
        "node-a",
        "system.run",
        r#"{"command":["head","-c","3000000","/dev/zero"]}"#,
    );
    assert_eq!(p["stdoutTruncated"], true);
    assert!(p["stdout"].as_str().unwrap().len() <= 1024 * 1024);
    assert_eq!(p["success"], true);

    // system.which: found and missing; no process spawned.
    let p = invoke_ok(
        &gw,
        "node-a",
        "system.which",
        r#"{"bins":["sh","definitely-not-a-bin"]}"#,
    );
    assert!(p["bins"]["sh"].as_str().unwrap().ends_with("/sh"));
    assert!(p["bins"].get("definitely-not-a-bin").is_none());

    // Bad params, unknown node, unknown command.
    let err = invoke_err(&gw, "node-a", "system.run", r#"{"command":[]}"#, &[]);
    assert!(err.contains("INVALID_REQUEST"), "{err}");
    let err = invoke_err(
        &gw,
        "no-such-node",
        "system.which",
        r#"{"bins":["sh"]}"#,
        &[],
    );
    assert!(err.contains("unknown node"), "{err}");
    let err = invoke_err(&gw, "node-a", "system.reboot", "{}", &[]);
    assert!(err.contains("not declared"), "{err}");

    // The node disappears mid-invoke: a clear error, no hang.
    let gw2 = gw.clone();
    let t = std::thread::spawn(move || {
        let start = Instant::now();
        let out = nodes_invoke(
            &gw2,
            "node-a",
            "system.run",
            r#"{"command":["sleep","33.75"]}"#,
            &["--timeout", "20000"],
        );
        (out, start.elapsed())
    });
    assert!(wait_until(Duration::from_secs(10), || process_running(
        "sleep 33.75"
    )));
    s.node.kill9();
    let (out, took) = t.join().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("disconnected") || err.contains("lost"),
        "{err}"
    );
    assert!(took < Duration::from_secs(15), "took {took:?}");

    // Offline node: paired but not attached.
    assert!(wait_until(Duration::from_secs(5), || !connected(
        &gw, "node-a"
    )));
    let err = invoke_err(&gw, "node-a", "system.which", r#"{"bins":["sh"]}"#, &[]);
    assert!(err.contains("not connected"), "{err}");
}

#[test]
fn exec_approvals_deny_allowlist_path_tricks_and_full() {
    let s = setup(&[]);
    let gw = s.gw_dir.clone();
    // Default: allowlist with an empty list: nothing runs, and the refusal says how to allow.
    let err = invoke_err(
        &gw,
        "node-a",
        "system.run",
        r#"{"command":["echo","x"]}"#,
        &[],
    );
    assert!(
        err.contains("SYSTEM_RUN_DENIED") && err.contains("clawmesh approvals allow"),
        "{err}"
    );

    let echo = std::fs::canonicalize("/usr/bin/echo").unwrap();
    let echo = echo.to_str().unwrap();
    let out = cli(&gw, &["approvals", "allow", "--node", "node-a", echo]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let p = invoke_ok(
        &gw,
        "node-a",
        "system.run",
        r#"{"command":["echo","allowed"]}"#,
    );
    assert_eq!(p["stdout"], "allowed\n");

    // A copy of echo elsewhere does not pass for the allowed one, however it is named.
    let trick = s.node_dir.join("trick");
    std::fs::create_dir_all(&trick).unwrap();
    std::fs::copy(echo, trick.join("echo")).unwrap();
    let params = format!(
        r#"{{"command":["./echo","x"],"cwd":"{}"}}"#,
        trick.display()
    );
    let err = invoke_err(&gw, "node-a", "system.run", &params, &[]);
    assert!(err.contains("SYSTEM_RUN_DENIED"), "{err}");
    let params = format!(r#"{{"command":["{}/echo","x"]}}"#, trick.display());
    let err = invoke_err(&gw, "node-a", "system.run", &params, &[]);
    assert!(err.contains("SYSTEM_RUN_DENIED"), "{err}");

    // Deny: nothing runs, not even the allowed one.
    assert!(cli(
        &gw,
        &["approvals", "set", "--node", "node-a", "--security", "deny"]
    )
    .status
    .success());
    let err = invoke_err(
        &gw,
        "node-a",
        "system.run",
        r#"{"command":["echo","x"]}"#,
        &[],
    );
    assert!(
        err.contains("SYSTEM_RUN_DISABLED") || err.contains("deny"),
        "{err}"
    );
    // Full: everything runs.
    assert!(cli(
        &gw,
        &["approvals", "set", "--node", "node-a", "--security", "full"]
    )
    .status
    .success());
    let p = invoke_ok(&gw, "node-a", "system.run", r#"{"command":["true"]}"#);
    assert_eq!(p["success"], true);
    let got = cli_json(&gw, &["approvals", "get", "--node", "node-a", "--json"]);
    assert_eq!(got["exists"], true);
    // node.invoke of the approvals commands is refused: they have their own methods.
    let err = invoke_err(&gw, "node-a", "system.execApprovals.get", "{}", &[]);
    assert!(err.contains("exec.approvals.node"), "{err}");
}

#[test]
fn the_federation_default_exec_level_follows_the_shared_config_live() {
    let s = setup(&[]);
    let gw = s.gw_dir.clone();
    let run = r#"{"command":["echo","fed"]}"#;
    // No file on the node, no start flag: the built-in allowlist refuses.
    assert!(invoke_err(&gw, "node-a", "system.run", run, &[]).contains("SYSTEM_RUN_DENIED"));
    let set = |v: &str| {
        let out = cli(&gw, &["config", "set", "security.exec.defaultLevel", v]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    // The federation says full: the node runs it, without a restart.
    set("full");
    assert!(
        wait_until(Duration::from_secs(10), || nodes_invoke(
            &gw,
            "node-a",
            "system.run",
            run,
            &[]
        )
        .status
        .success()),
        "{}",
        s.node.log_text()
    );
    // deny: refused, saying so.
    set("deny");
    assert!(wait_until(Duration::from_secs(10), || {
        let out = nodes_invoke(&gw, "node-a", "system.run", run, &[]);
        String::from_utf8_lossy(&out.stderr).contains("SYSTEM_RUN_DISABLED")
    }));
    // The node's own file wins over the federation's default.
    let out = cli(
        &gw,
        &["approvals", "set", "--node", "node-a", "--security", "full"],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    invoke_ok(&gw, "node-a", "system.run", run);
    // Operators cannot send the defaults command themselves.
    let err = invoke_err(
        &gw,
        "node-a",
        "system.execApprovals.defaults",
        r#"{"security":"full"}"#,
        &[],
    );
    assert!(err.contains("does not run"), "{err}");
    // A bad value is refused before it is written (the key's type), naming the key.
    let out = cli(
        &gw,
        &["config", "set", "security.exec.defaultLevel", "sometimes"],
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("security.exec.defaultLevel must be"));
}

/// The audit trail off the invoke's path: the records of many concurrent invokes all reach
/// the spool, each caller's in the order its invokes were answered, and a gateway stopped
/// (SIGTERM) right after the last answer loses none of them (the stop flushes the audit
/// writer's queue and its linger). Also: a timed invoke answers with its hop times and an
/// untouched payload.
#[test]
fn audit_records_of_concurrent_invokes_all_stored_when_stopped_right_after() {
    use clawmesh::cli::client::{Client, Target};
    use clawmesh_federation::logs::record::Level;
    use clawmesh_federation::logs::spool::{Spool, SpoolLimits};

    let mut s = setup(&[]);
    let node_id = nodes_status(&s.gw_dir)["nodes"][0]["nodeId"]
        .as_str()
        .unwrap()
        .to_string();
    let (callers, each) = (8, 25);
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let client = std::sync::Arc::new(
            Client::connect(&Target::Local(s.gw_dir.clone()))
                .await
                .unwrap(),
        );
        // A timed invoke: the stamps in order, the payload without the node's timing key.
        let r = client
            .call(
                "node.invoke",
                serde_json::json!({"nodeId": node_id, "command": "system.which",
                    "params": {"bins": ["sh"]}, "idempotencyKey": "timed", "timing": true}),
                Duration::from_secs(20),
            )
            .await
            .unwrap();
        let t = &r["timing"];
        let stamps: Vec<u64> = [
            "gatewayReceivedNs",
            "nodeSentNs",
            "nodeReceivedNs",
            "nodeRepliedNs",
            "replyReceivedNs",
            "gatewayRepliedNs",
        ]
        .iter()
        .map(|k| t[k].as_u64().unwrap_or_else(|| panic!("{k} in {r}")))
        .collect();
        assert!(stamps.windows(2).all(|w| w[0] <= w[1]), "{r}");
        assert!(r["payload"]["bins"]["sh"].is_string(), "{r}");
        assert!(r["payload"].get("clawmeshTiming").is_none(), "{r}");
        assert!(!r["payloadJSON"].as_str().unwrap().contains("clawmeshTiming"));
        let tasks: Vec<_> = (0..callers)
            .map(|c| {
                let client = client.clone();
                let node_id = node_id.clone();
                tokio::spawn(async move {
                    for i in 0..each {
                        client
                            .call(
                                "node.invoke",
                                serde_json::json!({"nodeId": node_id, "command": "system.which",
                                    "params": {"bins": ["sh"]}, "idempotencyKey": format!("c{c}-{i}")}),
                                Duration::from_secs(20),
                            )
                            .await
                            .unwrap();
                    }
                })
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
    });
    // Every invoke above was answered; stop at once.
    assert!(s.gw.term().success(), "{}", s.gw.log_text());
    let spool = Spool::open(&s.gw_dir, SpoolLimits::default()).unwrap();
    let recs = spool
        .pending(0, &Default::default(), 1_000_000, 1 << 30)
        .unwrap()
        .records()
        .unwrap();
    let audits: Vec<_> = recs.iter().filter(|r| r.level == Level::Audit).collect();
    let keys: Vec<&str> = audits
        .iter()
        .map(|r| r.audit.as_ref().unwrap().key.as_str())
        .collect();
    assert!(keys.contains(&"timed"), "{keys:?}");
    let mut next = vec![0; callers];
    for k in keys.iter().filter_map(|k| k.strip_prefix('c')) {
        let (c, i) = k.split_once('-').unwrap();
        let (c, i): (usize, usize) = (c.parse().unwrap(), i.parse().unwrap());
        assert_eq!(i, next[c], "caller {c}'s records out of order: {keys:?}");
        next[c] += 1;
    }
    assert_eq!(next, vec![each; callers], "records lost: {keys:?}");
    // One origin, numbered without a gap or a repeat.
    assert!(audits.windows(2).all(|w| w[0].seq < w[1].seq));
    assert!(audits.iter().all(|r| r.origin == "tokyo"));
    assert_eq!(
        spool
            .drops()
            .iter()
            .map(|d| d.overflow_dropped)
            .sum::<u64>(),
        0
    );
}
