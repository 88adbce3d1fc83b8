//! The status page in a real browser, and its JSON feed without one.
//!
//! Headless Chromium (Debian `chromium`, installed by `.ci/run`) is driven over the DevTools
//! protocol (a WebSocket): it loads `/` from a three-gateway federation, the page's own
//! script polls `/status.json`, the test waits for three healthy gateway cards, kills one
//! gateway and watches the same page (never reloaded) turn its card offline and show the
//! alert. Screenshots (laptop and phone widths) go into the test's temporary directory and
//! their paths are printed.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine as _;
use common::trio::{Trio, NAMES, TOKEN};
use common::*;
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

/// A plain HTTP/1.1 GET on loopback: (status code, body). The body is read by its
/// Content-Length (Chromium's DevTools server keeps the connection open), else to the end.
fn http_get(port: u16, path: &str, headers: &[(&str, &str)]) -> (u16, String) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut req = format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).unwrap();
    let mut r = BufReader::new(s);
    let mut status = String::new();
    r.read_line(&mut status).unwrap();
    let code = status
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let mut len = None;
    loop {
        let mut l = String::new();
        if r.read_line(&mut l).unwrap_or(0) == 0 || l.trim().is_empty() {
            break;
        }
        if let Some((k, v)) = l.split_once(':') {
            if k.trim().eq_ignore_ascii_case("content-length") {
                len = v.trim().parse::<usize>().ok();
            }
        }
    }
    let body = match len {
        Some(n) => {
            let mut b = vec![0; n];
            r.read_exact(&mut b).unwrap();
            b
        }
        None => {
            let mut b = Vec::new();
            r.read_to_end(&mut b).unwrap();
            b
        }
    };
    (code, String::from_utf8_lossy(&body).into_owned())
}

#[test]
fn feed_answers_loopback_with_the_whole_federation() {
    let t = Trio::start(300);
    let port = t.port(1);
    let (code, body) = http_get(port, "/status.json", &[]);
    assert_eq!(code, 200, "{body}");
    let doc: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(doc["self"], "beijing");
    assert_eq!(doc["primary"], NAMES[0]);
    let gws = doc["gateways"].as_array().unwrap();
    assert_eq!(gws.len(), 3, "{doc}");
    for g in gws {
        assert_eq!(g["status"], "healthy", "{g}");
        assert!(g["version"].is_string(), "{g}");
    }
    assert_eq!(doc["consensus"]["voters"].as_array().map(Vec::len), Some(3));
    assert_eq!(doc["consensus"]["quorum"], true);
    assert!(doc["alerts"]["firing"].is_array(), "{doc}");
    assert!(doc["nodes"].is_array(), "{doc}");
    // Vitals arrive with the health traffic within a few intervals.
    let vitals = wait_until(Duration::from_secs(10), || {
        let (_, body) = http_get(port, "/status.json", &[]);
        let doc: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
        doc["gateways"]
            .as_array()
            .is_some_and(|g| g.iter().all(|g| g["vitals"]["memPct"].is_number()))
    });
    assert!(vitals, "no vitals in the feed");
    // A token is accepted as a Bearer header (loopback needs none; a wrong one from
    // loopback is not refused either: loopback is trusted like the local CLI).
    let (code, _) = http_get(
        port,
        "/status.json",
        &[("Authorization", &format!("Bearer {TOKEN}"))],
    );
    assert_eq!(code, 200);
    // The page embeds the feed for loopback and carries its script and styles.
    let (code, page) = http_get(port, "/", &[]);
    assert_eq!(code, 200);
    assert!(page.contains("<title>beijing · clawmesh</title>"), "{page}");
    assert!(page.contains("\"self\":\"beijing\""));
    assert!(page.contains("prefers-color-scheme: dark"));
    // The classic protocol still answers a WebSocket at `/`.
    let (code, _) = http_get(port, "/healthz", &[]);
    assert_eq!(code, 200);
}

/// Headless Chromium with the DevTools protocol on an ephemeral port.
struct Browser {
    child: Child,
    ws_url: String,
}

impl Browser {
    fn start(profile: &Path, url: &str) -> Browser {
        let mut child = Command::new("chromium")
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--hide-scrollbars",
                "--remote-debugging-port=0",
                "--remote-allow-origins=*",
                "--window-size=1366,900",
            ])
            .arg(format!("--user-data-dir={}", profile.display()))
            .arg(url)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .process_group(0)
            .spawn()
            .expect("chromium is not installed (apt-get install chromium; .ci/run does it)");
        // Chromium prints where DevTools listens; read stderr until then (bounded by the
        // process: a failed start closes stderr).
        let stderr = child.stderr.take().unwrap();
        let mut lines = BufReader::new(stderr).lines();
        let mut port = None;
        let mut seen = String::new();
        for line in lines.by_ref() {
            let Ok(line) = line else { break };
            seen.push_str(&line);
            seen.push('\n');
            if let Some(rest) = line.split("ws://127.0.0.1:").nth(1) {
                port = rest.split('/').next().and_then(|p| p.parse::<u16>().ok());
                break;
            }
        }
        let port = port.unwrap_or_else(|| panic!("chromium gave no DevTools port:\n{seen}"));
        // Keep draining stderr so chromium never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines {});
        let mut ws_url = None;
        let found = wait_until(Duration::from_secs(20), || {
            let (_, body) = http_get(port, "/json/list", &[]);
            let list: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
            ws_url = list
                .as_array()
                .into_iter()
                .flatten()
                .find(|t| t["type"] == "page")
                .and_then(|t| t["webSocketDebuggerUrl"].as_str().map(str::to_string));
            ws_url.is_some()
        });
        assert!(found, "no page target in chromium");
        Browser {
            child,
            ws_url: ws_url.unwrap(),
        }
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        // The whole process group: the browser and its renderer and utility processes.
        let pgid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::killpg(pgid, nix::sys::signal::Signal::SIGKILL);
        let _ = self.child.wait();
    }
}

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// One DevTools session on the page.
struct Page {
    ws: Ws,
    next: u64,
}

impl Page {
    async fn call(&mut self, method: &str, params: Value) -> Value {
        self.next += 1;
        let id = self.next;
        let msg = json!({"id": id, "method": method, "params": params});
        self.ws.send(Message::text(msg.to_string())).await.unwrap();
        // Events arrive in between; the answer is the message with our id.
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let m = tokio::time::timeout(left, self.ws.next())
                .await
                .unwrap_or_else(|_| panic!("no answer to {method}"))
                .expect("devtools closed")
                .unwrap();
            let Message::Text(t) = m else { continue };
            let v: Value = serde_json::from_str(&t).unwrap();
            if v["id"] == id {
                assert!(v["error"].is_null(), "{method}: {v}");
                return v["result"].clone();
            }
        }
    }

    /// Evaluates `expr` in the page and returns its value.
    async fn eval(&mut self, expr: &str) -> Value {
        let r = self
            .call(
                "Runtime.evaluate",
                json!({"expression": expr, "returnByValue": true}),
            )
            .await;
        r["result"]["value"].clone()
    }

    /// Polls `expr` every 100 ms until it is `true`.
    async fn wait_for(&mut self, expr: &str, timeout: Duration) -> bool {
        let start = Instant::now();
        while start.elapsed() < timeout {
            if self.eval(expr).await == Value::Bool(true) {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        false
    }

    /// A full-page PNG at the current width, saved to `path`.
    async fn screenshot(&mut self, path: &Path) {
        let m = self.call("Page.getLayoutMetrics", json!({})).await;
        let size = &m["cssContentSize"];
        let (w, h) = (
            size["width"].as_f64().unwrap_or(1366.0),
            size["height"].as_f64().unwrap_or(900.0),
        );
        let shot = self
            .call(
                "Page.captureScreenshot",
                json!({"format": "png", "captureBeyondViewport": true,
                       "clip": {"x": 0, "y": 0, "width": w, "height": h, "scale": 1}}),
            )
            .await;
        let png = base64::engine::general_purpose::STANDARD
            .decode(shot["data"].as_str().unwrap())
            .unwrap();
        assert!(png.starts_with(b"\x89PNG"), "not a PNG");
        std::fs::write(path, png).unwrap();
        eprintln!("screenshot: {}", path.display());
    }
}

#[test]
fn chromium_sees_three_gateways_then_one_offline() {
    let mut t = Trio::start(300);
    let out = cli(
        t.dir(0),
        &[
            "config",
            "set",
            "alerts.rules",
            r#"[{"kind": "gateway-offline"}]"#,
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let _node = t.node(1, "bj-box", &["role=gpu", "rack=b7"]);
    let shots: PathBuf = t.tmp.path().join("screenshots");
    std::fs::create_dir_all(&shots).unwrap();
    // The token in the fragment takes the page's token path (Bearer header), as from afar.
    let url = format!("http://127.0.0.1:{}/#token={TOKEN}", t.port(0));
    let browser = Browser::start(&t.tmp.path().join("chromium-profile"), &url);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let (ws, _) = tokio_tungstenite::connect_async(browser.ws_url.as_str())
            .await
            .unwrap();
        let mut page = Page { ws, next: 0 };
        let three = page
            .wait_for(
                "document.querySelectorAll('[data-gateway][data-status=healthy]').length === 3",
                Duration::from_secs(30),
            )
            .await;
        assert!(
            three,
            "page never showed three healthy gateways: {}",
            page.eval("document.body.innerText").await
        );
        // The fragment's token moved to sessionStorage and out of the address bar.
        assert_eq!(
            page.eval("sessionStorage.getItem('clawmesh.token')").await,
            TOKEN
        );
        assert_eq!(page.eval("location.hash").await, "");
        // Marks this page instance: a reload would lose it, so what follows is a live update.
        page.eval("window.__sameDocument = 42").await;
        // Vitals reach the cards with the health traffic.
        let meters = page
            .wait_for(
                "document.querySelectorAll('[data-gateway] .meter').length >= 9",
                Duration::from_secs(10),
            )
            .await;
        assert!(meters, "{}", page.eval("document.body.innerText").await);
        // The node, under its gateway, with its labels.
        let node = page
            .wait_for(
                "!!document.querySelector('[data-node=\"bj-box\"]') && document.body.innerText.includes('role=gpu')",
                Duration::from_secs(20),
            )
            .await;
        assert!(node, "{}", page.eval("document.body.innerText").await);
        page.screenshot(&shots.join("laptop-healthy.png")).await;

        t.kill9(2);
        let offline = page
            .wait_for(
                "document.querySelector('[data-gateway=frankfurt]').dataset.status === 'offline'",
                Duration::from_secs(30),
            )
            .await;
        assert!(
            offline,
            "frankfurt never turned offline: {}",
            page.eval("document.body.innerText").await
        );
        assert_eq!(
            page.eval("window.__sameDocument").await,
            42,
            "the page was reloaded"
        );
        let alert = page
            .wait_for(
                "!!document.querySelector('[data-alert=\"gateway-offline/frankfurt\"]')",
                Duration::from_secs(15),
            )
            .await;
        assert!(
            alert,
            "no alert shown: {}",
            page.eval("document.body.innerText").await
        );
        page.screenshot(&shots.join("laptop-offline.png")).await;
        page.call(
            "Emulation.setDeviceMetricsOverride",
            json!({"width": 390, "height": 844, "deviceScaleFactor": 1, "mobile": true}),
        )
        .await;
        // One more poll at the new width, then the phone screenshot.
        tokio::time::sleep(Duration::from_millis(1200)).await;
        page.screenshot(&shots.join("phone-offline.png")).await;
        // Dark, as a system set to dark shows it.
        page.call(
            "Emulation.setEmulatedMedia",
            json!({"features": [{"name": "prefers-color-scheme", "value": "dark"}]}),
        )
        .await;
        let dark = page
            .wait_for(
                "getComputedStyle(document.body).backgroundColor === 'rgb(13, 17, 23)'",
                Duration::from_secs(5),
            )
            .await;
        assert!(dark, "dark colours not applied");
        page.screenshot(&shots.join("phone-dark.png")).await;
        page.call("Emulation.clearDeviceMetricsOverride", json!({}))
            .await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        page.screenshot(&shots.join("laptop-dark.png")).await;
    });
    drop(browser);
    let all = [
        "laptop-healthy.png",
        "laptop-offline.png",
        "phone-offline.png",
        "phone-dark.png",
        "laptop-dark.png",
    ];
    for f in all {
        assert!(
            shots.join(f).metadata().unwrap().len() > 10_000,
            "{f} is empty"
        );
    }
    // Keep the screenshots for a person to look at when asked to.
    if let Ok(keep) = std::env::var("CLAWMESH_KEEP_SCREENSHOTS") {
        for f in all {
            std::fs::copy(shots.join(f), Path::new(&keep).join(f)).unwrap();
        }
    }
}
