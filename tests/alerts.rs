//! Alerts end to end: three real gateways, `alerts.rules` and `alerts.webhooks` set through
//! the shared config, webhook receivers on loopback (a tiny HTTP server in the test).
//!
//! - a gateway killed fires once and resolves once when it is back, in both body formats;
//! - a receiver that is down when the alert fires gets the notice when it comes back;
//! - `clawmesh alerts --json` answers from any gateway (here one that is not the evaluator).

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::trio::{Trio, NAMES};
use common::*;
use serde_json::Value;

/// One request a receiver got.
#[derive(Debug, Clone)]
struct Hit {
    path: String,
    headers: Vec<(String, String)>,
    body: Value,
}

/// A minimal HTTP/1.1 receiver: answers 200 to every POST and keeps what it got.
#[derive(Clone)]
struct Receiver {
    hits: Arc<Mutex<Vec<Hit>>>,
}

impl Receiver {
    fn start(listener: TcpListener) -> Receiver {
        let hits = Arc::new(Mutex::new(Vec::new()));
        let h = hits.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { continue };
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                let mut line = String::new();
                if reader.read_line(&mut line).is_err() {
                    continue;
                }
                let path = line.split_whitespace().nth(1).unwrap_or("").to_string();
                let mut headers = Vec::new();
                let mut len = 0usize;
                loop {
                    let mut l = String::new();
                    if reader.read_line(&mut l).unwrap_or(0) == 0 || l.trim().is_empty() {
                        break;
                    }
                    if let Some((k, v)) = l.trim().split_once(':') {
                        if k.eq_ignore_ascii_case("content-length") {
                            len = v.trim().parse().unwrap_or(0);
                        }
                        headers.push((k.to_ascii_lowercase(), v.trim().to_string()));
                    }
                }
                let mut body = vec![0; len];
                let _ = reader.read_exact(&mut body);
                let body = serde_json::from_slice(&body).unwrap_or(Value::Null);
                h.lock().unwrap().push(Hit {
                    path,
                    headers,
                    body,
                });
                let _ = stream.write_all(
                    b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
                );
            }
        });
        Receiver { hits }
    }

    fn hits(&self) -> Vec<Hit> {
        self.hits.lock().unwrap().clone()
    }

    /// JSON-format notices of `status` for alert `id`.
    fn json_notices(&self, status: &str, id: &str) -> usize {
        self.hits()
            .iter()
            .filter(|h| {
                h.path == "/json" && h.body["status"] == status && h.body["alert"]["id"] == id
            })
            .count()
    }

    /// Slack-format notices whose text contains every one of `words`.
    fn slack_notices(&self, words: &[&str]) -> usize {
        self.hits()
            .iter()
            .filter(|h| h.path == "/slack")
            .filter(|h| {
                let t = h.body["text"].as_str().unwrap_or("");
                words.iter().all(|w| t.contains(w))
            })
            .count()
    }
}

fn config_set(dir: &std::path::Path, key: &str, value: &str) {
    let out = cli(dir, &["config", "set", key, value]);
    assert!(
        out.status.success(),
        "config set {key}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn alerts_json(dir: &std::path::Path) -> (Option<i32>, Value) {
    let out = cli(dir, &["alerts", "--json"]);
    let v = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    (out.status.code(), v)
}

fn firing_ids(doc: &Value) -> Vec<String> {
    doc["firing"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|a| a["id"].as_str().map(str::to_string))
        .collect()
}

#[test]
fn killed_gateway_fires_once_resolves_once_and_a_late_receiver_gets_it() {
    let mut t = Trio::start(300);
    let up = TcpListener::bind("127.0.0.1:0").unwrap();
    let up_port = up.local_addr().unwrap().port();
    let receiver = Receiver::start(up);
    // The second receiver's port is reserved now and listened on only later: until then a
    // connection is refused, as for a receiver that is down.
    let late_port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let hooks = format!(
        r#"[{{"url": "http://127.0.0.1:{up_port}/json", "headers": {{"X-Alert-Token": "s3cret"}}}},
            {{"url": "http://127.0.0.1:{late_port}/slack", "format": "slack"}}]"#
    );
    config_set(t.dir(1), "alerts.webhooks", &hooks);
    config_set(
        t.dir(1),
        "alerts.rules",
        // `for` 1 s: a real kill lasts longer; a blip of missed pings on a loaded machine
        // does not, and would be a second, unrelated notice.
        r#"[{"kind": "gateway-offline", "for": "1s"}, {"kind": "no-quorum", "for": "30s"}]"#,
    );
    // Nothing fires while all three are up.
    let (code, doc) = alerts_json(t.dir(0));
    assert_eq!(code, Some(0), "{doc}");
    assert!(firing_ids(&doc).is_empty(), "{doc}");

    t.kill9(2);
    let id = "gateway-offline/frankfurt";
    let fired = wait_until(Duration::from_secs(20), || {
        receiver.json_notices("firing", id) >= 1
    });
    assert!(
        fired,
        "no firing notice: {:?}\n{}",
        receiver.hits(),
        t.report()
    );
    let hit = receiver
        .hits()
        .into_iter()
        .find(|h| h.body["status"] == "firing")
        .unwrap();
    assert!(
        hit.headers
            .contains(&("x-alert-token".into(), "s3cret".into())),
        "{:?}",
        hit.headers
    );
    assert_eq!(hit.body["alert"]["subject"], "frankfurt");
    assert_eq!(hit.body["gateway"], NAMES[0], "the primary sends it");

    // Any gateway lists it: beijing asks the evaluator; exit 1 while something fires.
    let listed = wait_until(Duration::from_secs(10), || {
        let (code, doc) = alerts_json(t.dir(1));
        code == Some(1) && firing_ids(&doc) == vec![id.to_string()]
    });
    assert!(listed, "{:?}", alerts_json(t.dir(1)));
    let human = cli(t.dir(1), &["alerts"]);
    let text = String::from_utf8_lossy(&human.stdout);
    assert!(
        text.contains("FIRING") && text.contains("gateway frankfurt is offline"),
        "{text}"
    );

    // The down receiver comes back and gets the notice it missed.
    let late = Receiver::start(TcpListener::bind(("127.0.0.1", late_port)).unwrap());
    let got = wait_until(Duration::from_secs(40), || {
        late.slack_notices(&["FIRING", "frankfurt is offline"]) >= 1
    });
    assert!(got, "late receiver got nothing: {:?}", late.hits());

    t.spawn(2);
    let resolved = wait_until(Duration::from_secs(30), || {
        receiver.json_notices("resolved", id) >= 1
            && late.slack_notices(&["RESOLVED", "frankfurt is offline"]) >= 1
    });
    assert!(
        resolved,
        "no resolved notices: {:?} / {:?}\n{}",
        receiver.hits(),
        late.hits(),
        t.report()
    );
    // The book shows it resolved everywhere once the evaluator has pushed it.
    let synced = wait_until(Duration::from_secs(10), || {
        [0, 1, 2].iter().all(|i| {
            let (code, doc) = alerts_json(t.dir(*i));
            code == Some(0) && doc["resolved"][0]["id"] == id
        })
    });
    assert!(synced, "{:?}", alerts_json(t.dir(2)));
    // Exactly one firing and one resolved notice per webhook, nothing else.
    assert_eq!(
        receiver.json_notices("firing", id),
        1,
        "{:?}",
        receiver.hits()
    );
    assert_eq!(
        receiver.json_notices("resolved", id),
        1,
        "{:?}",
        receiver.hits()
    );
    assert_eq!(receiver.hits().len(), 2, "{:?}", receiver.hits());
    assert_eq!(late.hits().len(), 2, "{:?}", late.hits());
}

#[test]
fn bad_rules_are_refused_with_the_field_named() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("solo");
    let mut g = Gw::spawn(&dir, &["--name", "solo", "--primary"]);
    g.wait_ready();
    let out = cli(
        &dir,
        &[
            "config",
            "set",
            "alerts.rules",
            r#"[{"kind": "cpu", "for": "5m"}]"#,
        ],
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("alerts.rules[0] (cpu) needs \"above\""),
        "{err}"
    );
    let out = cli(
        &dir,
        &[
            "config",
            "set",
            "alerts.webhooks",
            r#"[{"url": "ftp://x"}]"#,
        ],
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("must start with http:// or https://"), "{err}");
}

/// The notices `receiver` got, as (status, alert id, sender), in arrival order.
fn notices(receiver: &Receiver) -> Vec<(String, String, String)> {
    receiver
        .hits()
        .iter()
        .map(|h| {
            let s = |v: &Value| v.as_str().unwrap_or_default().to_string();
            (
                s(&h.body["status"]),
                s(&h.body["alert"]["id"]),
                s(&h.body["gateway"]),
            )
        })
        .collect()
}

fn count(receiver: &Receiver, status: &str, id: &str) -> usize {
    notices(receiver)
        .iter()
        .filter(|(s, i, _)| s == status && i == id)
        .count()
}

/// The duty moves with the primary and so does the book: the new primary neither re-fires
/// what fires already nor misses what the old primary's death causes; the old primary,
/// restarted (empty book) and primary again, does not re-fire either.
#[test]
fn the_duty_fails_over_with_the_primary_without_a_second_notice() {
    let mut t = Trio::start(300);
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let receiver = Receiver::start(listener);
    config_set(
        t.dir(0),
        "alerts.webhooks",
        &format!(r#"["http://127.0.0.1:{port}/json"]"#),
    );
    // Memory above 0 % holds on every host: three alerts that keep firing.
    config_set(
        t.dir(0),
        "alerts.rules",
        r#"[{"kind": "memory", "above": 0}, {"kind": "gateway-offline", "for": "1s"}]"#,
    );
    let all_three = wait_until(Duration::from_secs(20), || {
        NAMES
            .iter()
            .all(|n| count(&receiver, "firing", &format!("memory/{n}")) == 1)
    });
    assert!(all_three, "{:?}\n{}", notices(&receiver), t.report());
    assert!(notices(&receiver).iter().all(|(_, _, by)| by == NAMES[0]));

    // The primary dies: another gateway takes the duty from its copy of the book.
    t.kill9(0);
    let taken = wait_until(Duration::from_secs(30), || {
        count(&receiver, "firing", "gateway-offline/tokyo") == 1
            && count(&receiver, "resolved", "memory/tokyo") == 1
    });
    assert!(taken, "{:?}\n{}", notices(&receiver), t.report());
    let new = notices(&receiver)
        .iter()
        .find(|(_, i, _)| i == "gateway-offline/tokyo")
        .map(|(_, _, by)| by.clone())
        .unwrap();
    assert_ne!(new, NAMES[0]);

    // Tokyo comes back with an empty book and, as the configured primary, takes the role
    // back: it pulls the book, resolves its own offline alert at most once, re-fires nothing.
    t.spawn(0);
    let back = wait_until(Duration::from_secs(40), || {
        let (_, doc) = alerts_json(t.dir(0));
        doc["evaluator"] == NAMES[0]
            && count(&receiver, "resolved", "gateway-offline/tokyo") == 1
            && count(&receiver, "firing", "memory/tokyo") == 2
    });
    assert!(
        back,
        "{:?}\n{:?}\n{}",
        notices(&receiver),
        alerts_json(t.dir(0)),
        t.report()
    );
    // A few evaluations and pushes later, still nothing twice.
    std::thread::sleep(Duration::from_secs(3));
    for n in ["memory/beijing", "memory/frankfurt"] {
        assert_eq!(count(&receiver, "firing", n), 1, "{:?}", notices(&receiver));
        assert_eq!(
            count(&receiver, "resolved", n),
            0,
            "{:?}",
            notices(&receiver)
        );
    }
    assert_eq!(count(&receiver, "firing", "gateway-offline/tokyo"), 1);
    assert_eq!(count(&receiver, "resolved", "gateway-offline/tokyo"), 1);
    assert_eq!(count(&receiver, "firing", "memory/tokyo"), 2);
}

/// `/metrics` of the gateway on `port` (loopback may read it).
fn metrics(port: u16) -> String {
    let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return String::new();
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    let _ = s.write_all(b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n");
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out
}

/// The value of a series without labels in a `/metrics` body.
fn series(body: &str, name: &str) -> Option<f64> {
    body.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

/// Node rules read the alert rows kept per change: a node attached to the evaluator and one
/// attached to another gateway (its vitals relayed) fire their memory alerts; when the local
/// node is killed, its memory alert resolves and `node-disconnected` fires for it (a paired
/// node attached nowhere). The rows were read in full once (the first evaluation), then per
/// change.
#[test]
fn node_rules_follow_attaches_detaches_and_vitals() {
    let t = Trio::start(300);
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let receiver = Receiver::start(listener);
    config_set(
        t.dir(0),
        "alerts.webhooks",
        &format!(r#"["http://127.0.0.1:{port}/json"]"#),
    );
    let mut here = t.node(0, "n-here", &[]);
    let _there = t.node(1, "n-there", &[]);
    // Memory above 0 % holds on every host that sends vitals.
    config_set(
        t.dir(0),
        "alerts.rules",
        r#"[{"kind": "memory", "above": 0}, {"kind": "node-disconnected"}]"#,
    );
    let both = wait_until(Duration::from_secs(30), || {
        count(&receiver, "firing", "memory/tokyo/n-here") == 1
            && count(&receiver, "firing", "memory/beijing/n-there") == 1
    });
    assert!(both, "{:?}\n{}", notices(&receiver), t.report());
    assert_eq!(count(&receiver, "firing", "node-disconnected/n-here"), 0);

    here.kill9();
    let gone = wait_until(Duration::from_secs(30), || {
        count(&receiver, "resolved", "memory/tokyo/n-here") == 1
            && count(&receiver, "firing", "node-disconnected/n-here") == 1
    });
    assert!(gone, "{:?}\n{}", notices(&receiver), t.report());
    assert_eq!(count(&receiver, "resolved", "memory/beijing/n-there"), 0);
    assert_eq!(count(&receiver, "firing", "node-disconnected/n-there"), 0);

    // One full read of the rows and one full diff of the directory (each consumer's first
    // read); after that, per change.
    let body = metrics(t.port(0));
    assert_eq!(
        series(&body, "clawmesh_alert_full_reads_total"),
        Some(1.0),
        "{body}"
    );
    assert_eq!(
        series(&body, "clawmesh_directory_full_diffs_total"),
        Some(1.0),
        "{body}"
    );
}
