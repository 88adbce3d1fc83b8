//! The operator's command line through the real binary: cancelling with Ctrl-C, exit codes,
//! `--json` errors, `--params` from a file or stdin, a closed stdout, typed config writes,
//! and the tooling (completions, man page, method list, probes).

mod common;

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;
use serde_json::Value;

/// A primary gateway with one approved node (`--security full`), in a temp dir.
struct Fed {
    _tmp: tempfile::TempDir,
    gw_dir: PathBuf,
    _gw: Gw,
    _node: Gw,
}

fn fed(node_args: &[&str]) -> Fed {
    let tmp = tempfile::tempdir().unwrap();
    let gw_dir = tmp.path().join("gw");
    let mut gw = Gw::spawn(&gw_dir, &["--name", "tokyo", "--primary"]);
    let addr = gw.wait_ready();
    let url = format!("quic://{addr}");
    let mut args = vec!["node", "run", "--gateway", url.as_str(), "--name", "box-1"];
    args.extend_from_slice(node_args);
    let node = Gw::spawn_cmd(&tmp.path().join("node"), &args);
    let mut req = None;
    assert!(
        wait_until(Duration::from_secs(15), || {
            let v = cli_json(&gw_dir, &["devices", "list", "--json"]);
            req = v["pending"]
                .as_array()
                .and_then(|p| p.iter().find(|p| p["name"] == "box-1"))
                .and_then(|p| p["requestId"].as_str().map(str::to_string));
            req.is_some()
        }),
        "{}",
        node.log_text()
    );
    let out = cli(&gw_dir, &["devices", "approve", req.as_deref().unwrap()]);
    assert!(out.status.success());
    assert!(wait_until(Duration::from_secs(15), || {
        let v = cli_json(&gw_dir, &["nodes", "status", "--json"]);
        v["nodes"][0]["connected"] == true
    }));
    Fed {
        _tmp: tmp,
        gw_dir,
        _gw: gw,
        _node: node,
    }
}

/// `nodes invoke` of `system.run` on the test node.
const INVOKE_RUN: [&str; 6] = [
    "nodes",
    "invoke",
    "--node",
    "box-1",
    "--command",
    "system.run",
];

fn signal(pid: u32, sig: &str) {
    Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status()
        .unwrap();
}

/// Ctrl-C / SIGTERM while `nodes invoke` or `gateway call node.invoke` waits: the CLI exits
/// 130 / 143 at once and the node kills the command's process group, long before the
/// request's own timeout (60 s here) would have.
#[test]
fn ctrl_c_and_sigterm_cancel_the_remote_command() {
    let f = fed(&["--security", "full"]);
    for (sig, code, secs, via_call) in [("INT", 130, "41.25", false), ("TERM", 143, "42.5", true)] {
        // The CLI's own argv must not contain the marker the test looks for.
        let marker = format!("sleep {secs}");
        let marker = marker.as_str();
        let params = format!(r#"{{"command":["sh","-c","s={secs}; sleep $s & sleep $s; wait"]}}"#);
        let mut cmd = Command::new(BIN);
        cmd.arg("--state-dir").arg(&f.gw_dir);
        if via_call {
            let p = format!(
                r#"{{"nodeId":"box-1","command":"system.run","params":{params},"timeoutMs":60000,"idempotencyKey":"k-{sig}"}}"#
            );
            cmd.args([
                "gateway",
                "call",
                "node.invoke",
                "--timeout",
                "60000",
                "--params",
            ])
            .arg(p);
        } else {
            cmd.args(INVOKE_RUN)
                .args(["--timeout", "60000", "--params", &params]);
        }
        let child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        assert!(
            wait_until(Duration::from_secs(10), || process_running(marker)),
            "{marker} never started"
        );
        signal(child.id(), sig);
        let out = child.wait_with_output().unwrap();
        assert_eq!(out.status.code(), Some(code), "{out:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("CANCELLED"), "{err}");
        // The node killed the group: gone well before the 60 s timeout could fire.
        assert!(
            wait_until(Duration::from_secs(10), || !process_running(marker)),
            "{marker} survived the cancel"
        );
    }
}

/// `system.run` exits like ssh; `--json` errors are a JSON document on stdout with a
/// non-zero exit; `--params` reads `@file` and `-`; a closed stdout ends the CLI quietly.
#[test]
fn exit_codes_json_errors_params_from_file_and_stdin() {
    let f = fed(&["--security", "allowlist"]);
    let gw = &f.gw_dir;
    let out = cli(gw, &["approvals", "allow", "--node", "box-1", "/usr/bin/*"]);
    assert!(out.status.success(), "{out:?}");
    let out = cli(gw, &["approvals", "allow", "--node", "box-1", "/bin/*"]);
    assert!(out.status.success(), "{out:?}");

    // The remote exit status.
    let out = nodes_invoke(
        gw,
        "box-1",
        "system.run",
        r#"{"command":["sh","-c","exit 3"]}"#,
        &[],
    );
    assert_eq!(out.status.code(), Some(3), "{out:?}");
    // The command's own timeout: 124, as timeout(1).
    let out = nodes_invoke(
        gw,
        "box-1",
        "system.run",
        r#"{"command":["sleep","5"],"timeoutMs":200}"#,
        &[],
    );
    assert_eq!(out.status.code(), Some(124), "{out:?}");
    // Not startable: 127, as the shell.
    let out = nodes_invoke(
        gw,
        "box-1",
        "system.run",
        r#"{"command":["/opt/nope"]}"#,
        &[],
    );
    assert_eq!(out.status.code(), Some(127), "{out:?}");
    // Refused by the exec approvals: 126, and the --json error on stdout.
    let script = gw.with_extension("x.sh");
    std::fs::write(&script, "#!/bin/sh\nexit 0\n").unwrap();
    Command::new("chmod")
        .arg("755")
        .arg(&script)
        .status()
        .unwrap();
    let params = format!(r#"{{"command":["{}"]}}"#, script.display());
    let out = nodes_invoke(gw, "box-1", "system.run", &params, &[]);
    assert_eq!(out.status.code(), Some(126), "{out:?}");
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["ok"], false);
    assert!(v["error"]["code"].is_string());
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .starts_with("SYSTEM_RUN_DENIED"),
        "{v}"
    );
    // An unknown node: 2, JSON on stdout.
    let out = nodes_invoke(gw, "nobody", "system.which", r#"{"bins":["sh"]}"#, &[]);
    assert_eq!(out.status.code(), Some(2));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["ok"], false);
    assert!(v["error"]["message"]
        .as_str()
        .unwrap()
        .contains("unknown node"));
    // A usage error under --json is JSON too.
    let out = cli(gw, &["nodes", "status", "--json", "--bogus"]);
    assert_eq!(out.status.code(), Some(2));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["error"]["code"], "USAGE");

    // --params @file and --params - (stdin), each larger than one argument could be.
    let big = "x".repeat(200 * 1024);
    // (`rawCommand` is accepted and ignored by the node: a big field that exec never sees.)
    let params = format!(
        r#"{{"command":["echo","{}"],"rawCommand":"{big}"}}"#,
        big.len()
    );
    let file = gw.with_extension("params.json");
    std::fs::write(&file, &params).unwrap();
    let at = format!("@{}", file.display());
    let out = nodes_invoke(gw, "box-1", "system.run", &at, &[]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["payload"]["stdout"], format!("{}\n", big.len()));
    let mut child = Command::new(BIN)
        .arg("--state-dir")
        .arg(gw)
        .args(INVOKE_RUN)
        .args(["--params", "-", "--json"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(params.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let out = nodes_invoke(gw, "box-1", "system.run", "@/nonexistent/params.json", &[]);
    assert_eq!(out.status.code(), Some(2));

    // stdout closed before the CLI writes: no panic, no backtrace, 141.
    for args in [
        &["nodes", "status"][..],
        &["identity", "show"][..],
        &["completions", "bash"][..],
    ] {
        let mut child = Command::new(BIN)
            .arg("--state-dir")
            .arg(gw)
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        drop(child.stdout.take());
        let out = child.wait_with_output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!err.contains("panicked"), "{args:?}: {err}");
        assert!(
            out.status.code() == Some(141) || out.status.code() == Some(0),
            "{args:?}: {out:?}"
        );
    }
}

fn config(gw: &Path, args: &[&str]) -> std::process::Output {
    let mut full = vec!["config"];
    full.extend_from_slice(args);
    cli(gw, &full)
}

/// `config set` and `config import` check every known key by type and range before
/// anything is written (the rules `clawmesh.json` is parsed with); free-form sections stay
/// free; `unset` of an absent key spends no revision.
#[test]
fn config_writes_are_typed_and_unset_of_nothing_writes_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let gw_dir = tmp.path().join("gw");
    let mut gw = Gw::spawn(&gw_dir, &["--name", "tokyo", "--primary"]);
    gw.wait_ready();
    let rev = |gw: &Path| cli_json(gw, &["config", "show", "--json"])["revision"].clone();
    let out = config(&gw_dir, &["set", "models.default", "gpt-5"]);
    assert!(out.status.success(), "{out:?}");
    let r0 = rev(&gw_dir);
    for (key, value) in [
        ("gateway.failover.healthCheckInterval", "fast"),
        ("gateway.failover.healthCheckInterval", "5"),
        ("gateway.failover.unhealthyThreshold", "0"),
        ("security.exec.defaultLevel", "yolo"),
        ("logging.level", "42"),
    ] {
        let out = config(&gw_dir, &["set", key, value]);
        assert_eq!(out.status.code(), Some(2), "{key}={value}: {out:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(key) && err.contains("must be"), "{err}");
    }
    let file = tmp.path().join("import.json");
    std::fs::write(
        &file,
        r#"{"skills":{"web":true},"security":{"exec":{"defaultLevel":"sometimes"}}}"#,
    )
    .unwrap();
    let out = config(&gw_dir, &["import", file.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert_eq!(rev(&gw_dir), r0, "a refused write spent a revision");
    // Good values and free-form sections pass.
    let out = config(&gw_dir, &["set", "security.exec.defaultLevel", "allowlist"]);
    assert!(out.status.success(), "{out:?}");
    let out = config(
        &gw_dir,
        &["set", "models.providers.x", r#"{"any":[1,"shape"]}"#],
    );
    assert!(out.status.success(), "{out:?}");
    // unset of an absent key: says so, no revision spent.
    let r1 = rev(&gw_dir);
    let out = config(&gw_dir, &["unset", "models.never"]);
    assert!(out.status.success(), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("not set; nothing written"),
        "{out:?}"
    );
    assert_eq!(rev(&gw_dir), r1);
    // The same bad value in clawmesh.json is refused at start, with the same words.
    let bad_dir = tmp.path().join("bad");
    std::fs::create_dir_all(&bad_dir).unwrap();
    std::fs::write(
        bad_dir.join("clawmesh.json"),
        r#"{"gateway":{"failover":{"healthCheckInterval":"fast"}}}"#,
    )
    .unwrap();
    let out = cli(&bad_dir, &["gateway", "run", "--port", "0"]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("gateway.failover.healthCheckInterval must be an integer 10 to 3600000"),
        "{err}"
    );
}

/// `GET path` on the gateway's classic HTTP port: (status code, body).
fn http_get(gw: &Path, path: &str) -> (u16, String) {
    use std::io::Read as _;
    let rt: Value =
        serde_json::from_str(&std::fs::read_to_string(gw.join("gateway.json")).unwrap()).unwrap();
    let ws = rt["ws"].as_str().unwrap();
    let hostport = ws
        .trim_start_matches("ws://")
        .trim_start_matches("wss://")
        .trim_end_matches('/');
    let mut s = std::net::TcpStream::connect(hostport).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    let code = text[9..12].parse().unwrap();
    let body = text.split("\r\n\r\n").nth(1).unwrap_or("").to_string();
    (code, body)
}

/// `/healthz` is liveness (200 while serving); `/readyz` is readiness: 503 with the reason
/// while not joined or, with `?all=1`, while a gateway is offline.
#[test]
fn healthz_is_liveness_and_readyz_readiness() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path().join("tokyo");
    let mut tokyo = Gw::spawn(
        &t,
        &[
            "--name",
            "tokyo",
            "--primary",
            "--token",
            "s3cret",
            "--health-interval",
            "200",
        ],
    );
    let addr = tokyo.wait_ready();
    assert_eq!(http_get(&t, "/healthz").0, 200);
    assert!(wait_until(Duration::from_secs(15), || http_get(
        &t, "/readyz"
    )
    .0 == 200));

    let o = tmp.path().join("osaka");
    let join = format!("quic://{addr}");
    let mut osaka = Gw::spawn(
        &o,
        &[
            "--name",
            "osaka",
            "--join",
            &join,
            "--token",
            "s3cret",
            "--health-interval",
            "200",
        ],
    );
    osaka.wait_ready();
    assert!(wait_until(Duration::from_secs(20), || sees_healthy(
        &t,
        &["tokyo", "osaka"]
    )));
    assert!(wait_until(Duration::from_secs(15), || http_get(
        &t,
        "/readyz?all=1"
    )
    .0 == 200));
    osaka.kill9();
    assert!(wait_until(Duration::from_secs(15), || {
        let (code, body) = http_get(&t, "/readyz?all=1");
        code == 503 && body.contains("gateway osaka is offline")
    }));
    assert_eq!(http_get(&t, "/healthz").0, 200);

    // A gateway whose join goes unanswered: alive, not ready, and says why.
    let dead = free_udp_port();
    let k = tmp.path().join("kyoto");
    let mut kyoto = Gw::spawn(
        &k,
        &[
            "--name",
            "kyoto",
            "--join",
            &format!("quic://127.0.0.1:{dead}"),
        ],
    );
    kyoto.wait_ready();
    assert_eq!(http_get(&k, "/healthz").0, 200);
    let (code, body) = http_get(&k, "/readyz");
    assert_eq!(code, 503, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["ready"], false);
    assert!(!v["reasons"].as_array().unwrap().is_empty(), "{v}");
    drop(tokyo);
}

/// Completions, the man page, `gateway call --list` with scopes, unknown methods answered
/// with the closest name, help with examples and selector forms, and status lines that
/// carry the truth.
#[test]
fn tooling_help_and_status_lines() {
    let tmp = tempfile::tempdir().unwrap();
    for shell in ["bash", "zsh", "fish"] {
        let out = cli(tmp.path(), &["completions", shell]);
        assert!(out.status.success());
        assert!(
            String::from_utf8_lossy(&out.stdout).contains("clawmesh"),
            "{shell}"
        );
    }
    let out = cli(tmp.path(), &["man"]);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains(".TH clawmesh"));
    let out = cli(tmp.path(), &["gateway", "call", "--list"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.lines()
            .any(|l| l.starts_with("node.invoke") && l.ends_with("operator.write")),
        "{text}"
    );
    for args in [
        &["nodes", "invoke", "--help"][..],
        &["nodes", "describe", "--help"][..],
        &["approvals", "get", "--help"][..],
    ] {
        let text = String::from_utf8_lossy(&cli(tmp.path(), args).stdout).to_string();
        assert!(
            text.contains("gateway/name") && text.contains("label=value"),
            "{args:?}: {text}"
        );
    }
    let help =
        String::from_utf8_lossy(&cli(tmp.path(), &["gateway", "run", "--help"]).stdout).to_string();
    assert!(
        help.contains("Examples:") && help.contains("[default: 10000]"),
        "{help}"
    );
    assert!(help.contains("Global options:"), "{help}");

    let g = tmp.path().join("gw");
    let mut gw = Gw::spawn(&g, &["--name", "tokyo", "--primary"]);
    gw.wait_ready();
    let out = cli(&g, &["gateway", "call", "nodes.list"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("did you mean node.list?"),
        "{out:?}"
    );
    // The gateway does not ping itself: `-`, not 0.00ms.
    let text = String::from_utf8_lossy(&cli(&g, &["gateway", "status"]).stdout).to_string();
    assert!(text.contains("Federation: 1 gateways"), "{text}");
    assert!(!text.contains("0.00ms"), "{text}");
    assert!(text.contains("VERSION"), "{text}");
    let v = cli_json(&g, &["gateway", "status", "--json"]);
    assert!(v["gateways"][0]["latencyMs"].is_null());
    assert_eq!(v["federationSize"], 1);
}

/// Duplicate node names are refused at approval (with how to fix it); tables carry an ID
/// column; `config get` and `--effective` say where a value comes from (`flag`, `file`,
/// `synced rN`), also for a flag-set key; a write a flag pins here says so; `identity show`
/// prints the fingerprint the way `devices list` shows it.
#[test]
fn duplicate_names_sources_and_fingerprints() {
    let tmp = tempfile::tempdir().unwrap();
    let g = tmp.path().join("gw");
    std::fs::create_dir_all(&g).unwrap();
    std::fs::write(
        g.join("clawmesh.json"),
        r#"{"models":{"default":"local-model"}}"#,
    )
    .unwrap();
    let mut gw = Gw::spawn(
        &g,
        &["--name", "tokyo", "--primary", "--health-interval", "700"],
    );
    let addr = gw.wait_ready();
    let url = format!("quic://{addr}");
    let pending = |name: &str| -> Vec<Value> {
        cli_json(&g, &["devices", "list", "--json"])["pending"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|p| p["name"] == name)
            .cloned()
            .collect()
    };
    // Two node hosts named web-1, one after the other: the first is approved.
    let web1 = |dir: &str| {
        let n = Gw::spawn_cmd(
            &tmp.path().join(dir),
            &["node", "run", "--gateway", &url, "--name", "web-1"],
        );
        assert!(wait_until(Duration::from_secs(15), || pending("web-1")
            .len()
            == 1));
        (n, pending("web-1")[0].clone())
    };
    let (a, first) = web1("a");
    let req = first["requestId"].as_str().unwrap();
    assert!(cli(&g, &["devices", "approve", req]).status.success());
    let (b, p) = web1("b");
    let out = cli(
        &g,
        &["devices", "approve", p["requestId"].as_str().unwrap()],
    );
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("another device named web-1 is already paired"),
        "{err}"
    );
    // The fingerprint `devices list` shows is the one `identity show` prints on the device.
    let shown = String::from_utf8_lossy(&cli(&tmp.path().join("b"), &["identity", "show"]).stdout)
        .to_string();
    assert!(
        shown.contains(&format!(
            "fingerprint: {}",
            p["fingerprint"].as_str().unwrap()
        )),
        "{shown} vs {p}"
    );
    // The ID column.
    assert!(wait_until(Duration::from_secs(15), || {
        let text = String::from_utf8_lossy(&cli(&g, &["nodes", "status"]).stdout).to_string();
        text.contains("ID") && text.contains("web-1")
    }));
    drop((a, b));

    // Sources: flag, file, synced.
    let v = cli_json(&g, &["config", "get", "gateway.nodeName", "--json"]);
    assert_eq!(v["effective"]["value"], "tokyo");
    assert_eq!(v["effective"]["source"], "flag");
    let v = cli_json(&g, &["config", "get", "models.default", "--json"]);
    assert_eq!(v["effective"]["source"], "file");
    let out = cli(
        &g,
        &[
            "config",
            "set",
            "gateway.failover.healthCheckInterval",
            "900",
        ],
    );
    assert!(out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("pinned on tokyo by its flag"), "{err}");
    let v = cli_json(
        &g,
        &[
            "config",
            "get",
            "gateway.failover.healthCheckInterval",
            "--json",
        ],
    );
    assert_eq!(v["effective"]["value"], 700);
    assert_eq!(v["effective"]["source"], "flag");
    assert!(
        v["effective"]["shadowed"]["source"]
            .as_str()
            .unwrap()
            .starts_with("synced r"),
        "{v}"
    );
    let text =
        String::from_utf8_lossy(&cli(&g, &["config", "show", "--effective"]).stdout).to_string();
    assert!(text.contains("[flag] (overrides synced r"), "{text}");
}

/// Logs: no colour codes when stderr is a file, `--log-format json` gives one JSON object per
/// line, a clean stop logs no warning, and the consensus group is named by gateway name.
#[test]
fn logs_plain_in_files_json_on_request_and_quiet_on_a_clean_stop() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path().join("text");
    let mut text = Gw::spawn(&t, &["--name", "tokyo", "--primary"]);
    text.wait_ready();
    assert!(wait_until(Duration::from_secs(15), || text
        .log_text()
        .contains("forming the federation's consensus group")));
    assert!(text.term().success());
    let log = text.log_text();
    assert!(!log.contains('\u{1b}'), "ANSI codes in a file:\n{log}");
    assert!(!log.contains("WARN"), "a clean stop warned:\n{log}");
    assert!(log.contains("gateway=tokyo"), "{log}");

    let j = tmp.path().join("json");
    let mut json = Gw::spawn(
        &j,
        &["--name", "osaka", "--primary", "--log-format", "json"],
    );
    json.wait_ready();
    assert!(json.term().success());
    let log = json.log_text();
    assert!(!log.trim().is_empty());
    for line in log.lines() {
        let v: Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
        assert!(v["level"].is_string() && v["fields"].is_object(), "{line}");
    }
}
