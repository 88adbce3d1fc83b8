//! Gateways federate over real QUIC on 127.0.0.1: full mesh, health, failure detection,
//! rejoin without the token, refusals, and the status view.

mod common;

use std::time::{Duration, Instant};

use common::*;

const INTERVAL_MS: u64 = 200;
const THRESHOLD: u64 = 3;

fn health_args() -> Vec<String> {
    vec![
        "--health-interval".into(),
        INTERVAL_MS.to_string(),
        "--unhealthy-threshold".into(),
        THRESHOLD.to_string(),
    ]
}

fn spawn(dir: &std::path::Path, extra: &[&str]) -> Gw {
    let h = health_args();
    let mut args: Vec<&str> = extra.to_vec();
    args.extend(h.iter().map(|s| s.as_str()));
    Gw::spawn(dir, &args)
}

#[test]
fn three_gateways_form_a_full_mesh_detect_a_kill_and_rejoin_without_the_token() {
    let tmp = tempfile::tempdir().unwrap();
    let (t, b, f) = (
        tmp.path().join("tokyo"),
        tmp.path().join("beijing"),
        tmp.path().join("frankfurt"),
    );
    let mut tokyo = spawn(
        &t,
        &[
            "--name",
            "tokyo",
            "--region",
            "ap-northeast-1",
            "--primary",
            "--token",
            "s3cret",
        ],
    );
    let addr = tokyo.wait_ready();
    let join = format!("quic://{addr}");
    let mut beijing = spawn(
        &b,
        &["--name", "beijing", "--join", &join, "--token", "s3cret"],
    );
    let mut frankfurt = spawn(
        &f,
        &["--name", "frankfurt", "--join", &join, "--token", "s3cret"],
    );
    beijing.wait_ready();
    frankfurt.wait_ready();

    let all = ["tokyo", "beijing", "frankfurt"];
    for dir in [&t, &b, &f] {
        assert!(
            wait_until(Duration::from_secs(15), || sees_healthy(dir, &all)),
            "{} never saw a healthy full mesh: {:?}\n{}",
            dir.display(),
            status(dir),
            tokyo.log_text()
        );
    }
    // The status document has the promised shape, and ids match `identity show`.
    let doc = status(&b).unwrap();
    assert_eq!(doc["self"], "beijing");
    assert_eq!(doc["primary"], "tokyo");
    for (name, dir) in [("tokyo", &t), ("beijing", &b), ("frankfurt", &f)] {
        let g = row(&doc, name).unwrap();
        let id: serde_json::Value =
            serde_json::from_slice(&cli(dir, &["identity", "show", "--json"]).stdout).unwrap();
        assert_eq!(g["deviceId"], id["deviceId"], "{name}");
        assert_eq!(
            g["role"],
            if name == "tokyo" { "primary" } else { "remote" }
        );
        for key in [
            "name",
            "region",
            "deviceId",
            "role",
            "status",
            "latencyMs",
            "lastSeen",
            "addr",
            "version",
        ] {
            assert!(g.get(key).is_some(), "{key} missing in {g}");
        }
    }
    assert_eq!(row(&doc, "tokyo").unwrap()["region"], "ap-northeast-1");
    assert!(cli(&t, &["gateway", "status", "--all", "--check"])
        .status
        .success());

    // SIGKILL frankfurt: no goodbye; tokyo must notice the missed pings.
    frankfurt.kill9();
    let killed = Instant::now();
    let offline = wait_until(Duration::from_secs(10), || {
        status(&t)
            .and_then(|d| row(&d, "frankfurt").map(|g| g["status"] == "offline"))
            .unwrap_or(false)
    });
    let took = killed.elapsed();
    assert!(offline, "frankfurt never went offline");
    // interval x threshold plus one interval, plus slack for polling with a CLI process.
    let bound = Duration::from_millis(INTERVAL_MS * (THRESHOLD + 1) + 1500);
    assert!(took <= bound, "offline after {took:?}, bound {bound:?}");
    let doc = status(&t).unwrap();
    let fr = row(&doc, "frankfurt").unwrap();
    assert!(fr["lastSeen"].is_string(), "offline keeps lastSeen: {fr}");
    let check = cli(&t, &["gateway", "status", "--all", "--check"]);
    assert_eq!(
        check.status.code(),
        Some(1),
        "--check must fail while frankfurt is offline"
    );
    let table =
        String::from_utf8_lossy(&cli(&t, &["gateway", "status", "--all"]).stdout).to_string();
    assert!(
        table.contains("offline") && table.contains("frankfurt"),
        "{table}"
    );

    // Restart with the same state dir and NO token: it is pinned, so it rejoins.
    let mut frankfurt = spawn(&f, &["--name", "frankfurt", "--join", &join]);
    frankfurt.wait_ready();
    for dir in [&t, &b, &f] {
        assert!(
            wait_until(Duration::from_secs(15), || sees_healthy(dir, &all)),
            "{} did not see frankfurt back: {:?}\n{}",
            dir.display(),
            status(dir),
            frankfurt.log_text()
        );
    }
    assert!(cli(&t, &["gateway", "status", "--all", "--check"])
        .status
        .success());

    // A clean stop removes the runtime file and exits 0; peers see it offline at once.
    assert!(beijing.term().success());
    assert!(!b.join("gateway.json").exists());
    assert!(wait_until(Duration::from_secs(5), || {
        status(&t)
            .and_then(|d| row(&d, "beijing").map(|g| g["status"] == "offline"))
            .unwrap_or(false)
    }));
    let out = cli(&b, &["gateway", "status"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains(&b.display().to_string()));
}

#[test]
fn wrong_token_changed_key_and_missing_token_are_refused_and_the_mesh_is_undisturbed() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path().join("tokyo");
    let mut tokyo = spawn(&t, &["--name", "tokyo", "--primary", "--token", "right"]);
    let join = format!("quic://{}", tokyo.wait_ready());
    let f = tmp.path().join("frankfurt");
    let mut frankfurt = spawn(
        &f,
        &["--name", "frankfurt", "--join", &join, "--token", "right"],
    );
    frankfurt.wait_ready();
    assert!(wait_until(Duration::from_secs(15), || sees_healthy(
        &t,
        &["tokyo", "frankfurt"]
    )));

    // Wrong token: the joiner exits with a clear error; the primary logs the refusal.
    let mut bad = spawn(
        &tmp.path().join("bad"),
        &["--name", "bad", "--join", &join, "--token", "wrong"],
    );
    let st = bad
        .wait_exit(Duration::from_secs(15))
        .expect("wrong-token gateway kept running");
    assert!(!st.success());
    assert!(
        bad.log_text().contains("join token mismatch"),
        "{}",
        bad.log_text()
    );
    assert!(wait_until(Duration::from_secs(5), || tokyo
        .log_text()
        .contains("refused gateway")));

    // No token at all on a fresh state dir.
    let mut none = spawn(
        &tmp.path().join("none"),
        &["--name", "none", "--join", &join],
    );
    assert!(!none
        .wait_exit(Duration::from_secs(15))
        .expect("kept running")
        .success());
    assert!(
        none.log_text().contains("join token is required"),
        "{}",
        none.log_text()
    );

    // A known name with a different key is refused even with the right token.
    let b1 = tmp.path().join("beijing1");
    let mut beijing = spawn(
        &b1,
        &["--name", "beijing", "--join", &join, "--token", "right"],
    );
    beijing.wait_ready();
    assert!(wait_until(Duration::from_secs(15), || sees_healthy(
        &t,
        &["tokyo", "frankfurt", "beijing"]
    )));
    beijing.term();
    let mut impostor = spawn(
        &tmp.path().join("beijing2"),
        &["--name", "beijing", "--join", &join, "--token", "right"],
    );
    assert!(!impostor
        .wait_exit(Duration::from_secs(15))
        .expect("kept running")
        .success());
    assert!(
        impostor.log_text().contains("pinned to device"),
        "{}",
        impostor.log_text()
    );

    // After `gateway forget` on the primary, the rebuilt gateway can join under that name.
    let out = cli(&t, &["gateway", "forget", "beijing"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let b3 = tmp.path().join("beijing3");
    let mut rebuilt = spawn(
        &b3,
        &["--name", "beijing", "--join", &join, "--token", "right"],
    );
    rebuilt.wait_ready();
    assert!(wait_until(Duration::from_secs(15), || sees_healthy(
        &b3,
        &["tokyo", "frankfurt", "beijing"]
    )));

    // The mesh is undisturbed.
    assert!(
        sees_healthy(&f, &["tokyo", "frankfurt"]) || {
            let d = status(&f).unwrap();
            row(&d, "tokyo").unwrap()["status"] == "healthy"
        }
    );
    let d = status(&t).unwrap();
    assert_eq!(row(&d, "frankfurt").unwrap()["status"], "healthy");
    assert!(row(&d, "bad").is_none() && row(&d, "none").is_none());
    drop(rebuilt);
    drop(frankfurt);
    drop(tokyo);
}

#[test]
fn config_file_keys_are_read_flags_win_and_unknown_keys_are_reported() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path().join("tokyo");
    let mut tokyo = spawn(
        &t,
        &["--name", "tokyo", "--primary", "--token", "filetoken"],
    );
    let addr = tokyo.wait_ready();
    let r = tmp.path().join("remote");
    std::fs::create_dir_all(&r).unwrap();
    std::fs::write(
        r.join("clawmesh.json"),
        format!(
            r#"{{"gateway":{{"mode":"remote","primaryUrl":"https://{addr}","nodeName":"remote-beijing",
                "remote":{{"authToken":"filetoken"}},
                "failover":{{"enabled":true,"healthCheckInterval":300,"unhealthyThreshold":4,"fallbackNode":"primary"}},
                "sync":{{"overrideLocal":false}}, "bogusKey": 1}}}}"#
        ),
    )
    .unwrap();
    // Flags win over the file: --health-interval 250 beats healthCheckInterval 300.
    let mut remote = Gw::spawn(&r, &["--health-interval", "250"]);
    remote.wait_ready();
    assert!(wait_until(Duration::from_secs(15), || sees_healthy(
        &t,
        &["tokyo", "remote-beijing"]
    )));
    let d = status(&r).unwrap();
    assert_eq!(d["self"], "remote-beijing");
    assert_eq!(d["healthIntervalMs"], 250);
    assert_eq!(d["unhealthyThreshold"], 4);
    assert!(
        remote.log_text().contains("unknown key gateway.bogusKey"),
        "{}",
        remote.log_text()
    );
}

#[test]
fn status_without_a_gateway_names_what_it_tried() {
    let tmp = tempfile::tempdir().unwrap();
    let out = cli(tmp.path(), &["gateway", "status", "--all"]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("no gateway is running") && err.contains(&tmp.path().display().to_string()),
        "{err}"
    );

    // A URL where nothing listens: a clear error naming it, not a hang.
    let sock = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let url = format!("quic://{}", sock.local_addr().unwrap());
    drop(sock);
    let start = Instant::now();
    let out = cli(
        tmp.path(),
        &["gateway", "status", "--url", &url, "--token", "x"],
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains(&url));
    assert!(start.elapsed() < Duration::from_secs(15));
}

#[test]
fn identity_is_created_0600_and_refused_when_readable_or_corrupt() {
    use std::os::unix::fs::PermissionsExt;
    let tmp = tempfile::tempdir().unwrap();
    let out = cli(tmp.path(), &["identity", "show", "--json"]);
    assert!(out.status.success());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let id = v["deviceId"].as_str().unwrap();
    let pk = v["publicKey"].as_str().unwrap();
    assert_eq!(id.len(), 64);
    assert_eq!(pk.len(), 43);
    let again: serde_json::Value =
        serde_json::from_slice(&cli(tmp.path(), &["identity", "show", "--json"]).stdout).unwrap();
    assert_eq!(again, v);
    let key = tmp.path().join("device.key");
    assert_eq!(
        std::fs::metadata(&key).unwrap().permissions().mode() & 0o777,
        0o600
    );
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let out = cli(tmp.path(), &["identity", "show"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("chmod 600"));
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    std::fs::write(&key, "not a key").unwrap();
    let out = cli(tmp.path(), &["identity", "show"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("corrupt"));
}

#[test]
fn the_demo_runs_and_leaves_nothing_behind() {
    let out = std::process::Command::new(BIN)
        .args(["demo", "--health-interval", "200"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for name in [
        "tokyo",
        "beijing",
        "frankfurt",
        "offline",
        "healthy",
        "fra-node",
        "Linux",
        "failed over",
    ] {
        assert!(stdout.contains(name), "{name} missing:\n{stdout}");
    }
    // Nothing left running: no process of ours with the demo's state dirs.
    let ps = std::process::Command::new("ps")
        .args(["-eo", "args"])
        .output()
        .unwrap();
    assert!(!String::from_utf8_lossy(&ps.stdout).contains("clawmesh-demo-"));
}
