//! A fake tailscaled LocalAPI on a unix socket, following the contract in
//! `tests/fixtures/tailscale/CONTRACT.md` (taken from tailscale's `ipn/localapi/localapi.go`,
//! `ipn/ipnserver/server.go` and the JSON shapes of `ipnstate.Status` / `apitype.WhoIsResponse`):
//!
//! - HTTP/1.1; 403 `invalid localapi request\n` when `Referer` or `Origin` is non-empty or
//!   `Host` is anything but `local-tailscaled.sock` (or empty);
//! - 400 `invalid reason header` for an `X-Tailscale-Reason` that is not standard base64;
//! - `status`: 200, tab-indented JSON with a trailing newline; `?peers=false` drops peers;
//! - `whois?addr=`: forms `ip`, `ip:port`, `[v6]:port`, `nodekey:<hex>`; 400 for a missing or
//!   malformed addr, 404 `no match for IP:port\n` for an unknown node or without a netmap;
//!   200 tab-indented JSON without a trailing newline;
//! - unknown paths 404 `404 page not found\n`; error bodies are `text/plain; charset=utf-8`;
//! - Go's net/http framing: a body under 2048 bytes gets a `Content-Length`, a larger one is
//!   chunked.
//!
//! Only tailscaled may be faked; everything else in the tests is real. Shared by the discovery
//! crate's tests and the root crate's (`#[path]`), so it has no dependency beyond tokio and
//! serde_json.
#![allow(dead_code)]

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixListener;
use tokio::task::JoinHandle;

/// The CLI-form fixtures (2-space indent) copied from the contract's fixture directory.
pub const STATUS_RUNNING: &str = include_str!("../fixtures/tailscale/status-running.json");
/// Status when logged out.
pub const STATUS_NEEDSLOGIN: &str = include_str!("../fixtures/tailscale/status-needslogin.json");
/// whois for node-sg-1 (100.64.0.20), LocalAPI form (tabs, no trailing newline).
pub const WHOIS_NODE_SG_1: &str = include_str!("../fixtures/tailscale/whois-node-sg-1.json");
/// whois for laptop-alice (100.64.0.10).
pub const WHOIS_LAPTOP_ALICE: &str = include_str!("../fixtures/tailscale/whois-laptop-alice.json");

const VERSION: &str = "1.102.3-t53a0d659a-g1e9a07c42";
const CAP: &str = "130";

/// Go's `bufferBeforeChunkingSize`: a handler's output up to this size gets a Content-Length.
const CHUNK_THRESHOLD: usize = 2048;

/// The largest request head the fake reads; real clients send a few hundred bytes.
const MAX_HEAD: usize = 64 * 1024;

struct State {
    /// The status as served; `text` is served verbatim when set (the fixture's own key order),
    /// otherwise `value` is re-encoded.
    value: Value,
    text: Option<String>,
    /// Fixture whois answers by node key.
    whois: Vec<(String, String)>,
}

/// A running fake daemon. Dropping it stops it and removes the socket.
pub struct FakeTailscaled {
    path: PathBuf,
    state: Arc<Mutex<State>>,
    requests: Arc<AtomicUsize>,
    task: Option<JoinHandle<()>>,
}

/// 2-space CLI indentation to the LocalAPI's tabs (no string in the fixtures spans lines).
pub fn to_tabs(cli: &str) -> String {
    cli.lines()
        .map(|l| {
            let spaces = l.len() - l.trim_start_matches(' ').len();
            format!("{}{}", "\t".repeat(spaces / 2), &l[spaces..])
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn tab_json(v: &Value) -> String {
    let mut out = Vec::new();
    let fmt = serde_json::ser::PrettyFormatter::with_indent(b"\t");
    let mut ser = serde_json::Serializer::with_formatter(&mut out, fmt);
    serde::Serialize::serialize(v, &mut ser).expect("encode");
    String::from_utf8(out).expect("utf8")
}

impl FakeTailscaled {
    /// Serves the running fixture on a socket at `path`.
    pub async fn start(path: &Path) -> FakeTailscaled {
        let state = Arc::new(Mutex::new(State {
            value: serde_json::from_str(STATUS_RUNNING).expect("fixture"),
            text: Some(to_tabs(STATUS_RUNNING) + "\n"),
            whois: vec![
                (
                    "nodekey:6b55ed6cea5b11b2e26c68d20f8356d728ca66fa84e6febeaff4c74af1305baf"
                        .into(),
                    WHOIS_NODE_SG_1.to_string(),
                ),
                (
                    "nodekey:9d4ed023262d024a9ad8ff42a82b1f653eba6007c000086d2cbbf72bf2f9127f"
                        .into(),
                    WHOIS_LAPTOP_ALICE.to_string(),
                ),
            ],
        }));
        let mut fake = FakeTailscaled {
            path: path.to_path_buf(),
            state,
            requests: Arc::new(AtomicUsize::new(0)),
            task: None,
        };
        fake.listen();
        fake
    }

    fn listen(&mut self) {
        let _ = std::fs::remove_file(&self.path);
        let listener = UnixListener::bind(&self.path).expect("bind fake tailscaled socket");
        let state = self.state.clone();
        let requests = self.requests.clone();
        self.task = Some(tokio::spawn(async move {
            loop {
                let Ok((mut stream, _)) = listener.accept().await else {
                    return;
                };
                let state = state.clone();
                let requests = requests.clone();
                tokio::spawn(async move {
                    let mut raw = Vec::new();
                    let mut buf = [0u8; 4096];
                    let head_end = loop {
                        if let Some(p) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
                            break p;
                        }
                        match stream.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => raw.extend_from_slice(&buf[..n]),
                        }
                        if raw.len() > MAX_HEAD {
                            return;
                        }
                    };
                    requests.fetch_add(1, Ordering::SeqCst);
                    let head = String::from_utf8_lossy(&raw[..head_end]).to_string();
                    let (status, ctype, body, extra) = respond(&head, &state);
                    let _ = stream.write_all(&encode(status, ctype, &body, extra)).await;
                    let _ = stream.shutdown().await;
                });
            }
        }));
    }

    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Requests answered so far (any path, any status).
    pub fn requests(&self) -> usize {
        self.requests.load(Ordering::SeqCst)
    }

    /// Serves the NeedsLogin fixture from now on.
    pub fn needs_login(&self) {
        let mut s = self.state.lock().expect("lock");
        s.value = serde_json::from_str(STATUS_NEEDSLOGIN).expect("fixture");
        s.text = Some(to_tabs(STATUS_NEEDSLOGIN) + "\n");
    }

    /// The status currently served.
    pub fn status(&self) -> Value {
        self.state.lock().expect("lock").value.clone()
    }

    /// Serves `status` from now on (re-encoded with tabs; keys in sorted order).
    pub fn set_status(&self, status: Value) {
        let mut s = self.state.lock().expect("lock");
        s.value = status;
        s.text = None;
    }

    /// Marks the peer with host name `host` online or offline.
    pub fn set_online(&self, host: &str, online: bool) {
        let mut v = self.status();
        if let Some(peers) = v["Peer"].as_object_mut() {
            for p in peers.values_mut() {
                if p["HostName"] == host {
                    p["Online"] = json!(online);
                    p["Active"] = json!(online);
                    p["LastSeen"] = json!(if online {
                        "0001-01-01T00:00:00Z"
                    } else {
                        "2026-08-23T02:00:00Z"
                    });
                }
            }
        }
        self.set_status(v);
    }

    /// Adds (or replaces) an online peer with the fixture's PeerStatus shape.
    pub fn add_peer(&self, host: &str, ip: IpAddr, tags: &[&str], nodekey_byte: u8) {
        let key = format!("nodekey:{}", format!("{nodekey_byte:02x}").repeat(32));
        let mut v = self.status();
        if !v["Peer"].is_object() {
            v["Peer"] = json!({});
        }
        let mut peer = json!({
            "ID": format!("nTest{nodekey_byte}CNTRL"),
            "NodeID": 4638201957300000u64 + nodekey_byte as u64,
            "PublicKey": key,
            "HostName": host,
            "DNSName": format!("{host}.tail1234.ts.net."),
            "OS": "linux",
            "UserID": 28410639225127093u64,
            "TailscaleIPs": [ip.to_string()],
            "AllowedIPs": [format!("{ip}/{}", if ip.is_ipv4() { 32 } else { 128 })],
            "Addrs": null,
            "CurAddr": "",
            "Relay": "tok",
            "PeerRelay": "",
            "RxBytes": 0,
            "TxBytes": 0,
            "Created": "2026-03-02T07:45:12.334905118Z",
            "LastWrite": "0001-01-01T00:00:00Z",
            "LastSeen": "0001-01-01T00:00:00Z",
            "LastHandshake": "0001-01-01T00:00:00Z",
            "Online": true,
            "ExitNode": false,
            "ExitNodeOption": false,
            "Active": true,
            "PeerAPIURL": [],
            "TaildropTarget": 4,
            "NoFileSharingReason": "",
            "InNetworkMap": true,
            "InMagicSock": true,
            "InEngine": true
        });
        if !tags.is_empty() {
            peer["Tags"] = json!(tags);
        }
        v["Peer"][key] = peer;
        self.set_status(v);
    }

    /// Stops serving and removes the socket: "tailscaled not running".
    pub fn stop(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
        }
        let _ = std::fs::remove_file(&self.path);
    }

    /// Serves again at the same path.
    pub fn restart(&mut self) {
        self.stop();
        self.listen();
    }
}

impl Drop for FakeTailscaled {
    fn drop(&mut self) {
        self.stop();
    }
}

type Reply = (u16, &'static str, String, bool);

/// An error answered by a LocalAPI handler (after the front door: with tailscaled's headers).
fn error(status: u16, msg: &str) -> Reply {
    (
        status,
        "text/plain; charset=utf-8",
        format!("{msg}\n"),
        true,
    )
}

/// An error answered before the LocalAPI handler (no tailscaled headers).
fn front_door(status: u16, msg: &str) -> Reply {
    (
        status,
        "text/plain; charset=utf-8",
        format!("{msg}\n"),
        false,
    )
}

fn respond(head: &str, state: &Mutex<State>) -> Reply {
    let mut lines = head.split("\r\n");
    let request_line = lines.next().unwrap_or("");
    let target = request_line.split(' ').nth(1).unwrap_or("");
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let header = |n: &str| {
        headers
            .iter()
            .find(|(k, _)| k == n)
            .map(|(_, v)| v.as_str())
            .unwrap_or("")
    };
    // ipnserver checks the reason header before the LocalAPI handler runs.
    let reason = header("x-tailscale-reason");
    if !reason.is_empty() && !is_std_base64(reason) {
        return front_door(400, "invalid reason header");
    }
    let host = header("host");
    if !header("referer").is_empty()
        || !header("origin").is_empty()
        || !(host.is_empty() || host == "local-tailscaled.sock")
    {
        return front_door(403, "invalid localapi request");
    }
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let params: Vec<(String, String)> = query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (unescape(k), unescape(v))
        })
        .collect();
    let param = |n: &str| params.iter().find(|(k, _)| k == n).map(|(_, v)| v.clone());
    let s = state.lock().expect("lock");
    match path {
        "/localapi/v0/status" => {
            let body = if param("peers").as_deref() == Some("false") {
                let mut v = s.value.clone();
                v["Peer"] = Value::Null;
                tab_json(&v) + "\n"
            } else {
                s.text.clone().unwrap_or_else(|| tab_json(&s.value) + "\n")
            };
            (200, "application/json", body, true)
        }
        "/localapi/v0/whois" => whois(&s, param("addr").unwrap_or_default().as_str()),
        _ => error(404, "404 page not found"),
    }
}

fn whois(s: &State, addr: &str) -> Reply {
    if addr.is_empty() {
        return error(400, "missing 'addr' parameter");
    }
    let by_key = |k: &str| -> Option<Value> {
        let peers = s.value["Peer"].as_object()?;
        peers.get(k).cloned()
    };
    let node: Option<Value> = if let Some(hex) = addr.strip_prefix("nodekey:") {
        if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return error(400, "invalid nodekey in 'addr' parameter");
        }
        by_key(addr)
    } else {
        let ip: IpAddr = match addr.parse::<IpAddr>() {
            Ok(ip) => ip,
            Err(_) => match addr.parse::<std::net::SocketAddr>() {
                Ok(sa) => sa.ip(),
                Err(_) => return error(400, "invalid 'addr' parameter"),
            },
        };
        let has = |p: &Value| {
            p["TailscaleIPs"].as_array().is_some_and(|ips| {
                ips.iter()
                    .any(|i| i.as_str().and_then(|t| t.parse::<IpAddr>().ok()) == Some(ip))
            })
        };
        let mut found = s.value["Peer"]
            .as_object()
            .and_then(|peers| peers.values().find(|p| has(p)).cloned());
        if found.is_none() && has(&s.value["Self"]) {
            found = Some(s.value["Self"].clone());
        }
        found
    };
    // Without a netmap (logged out, stopped) nothing matches.
    let node = match node {
        Some(n) if s.value["BackendState"] == "Running" => n,
        _ => return error(404, "no match for IP:port"),
    };
    let key = node["PublicKey"].as_str().unwrap_or("");
    if let Some((_, text)) = s.whois.iter().find(|(k, _)| k == key) {
        return (200, "application/json", text.clone(), true);
    }
    let tagged = node["Tags"].as_array().is_some_and(|t| !t.is_empty());
    let user_id = node["UserID"].clone();
    let mut resp = json!({
        "Node": {
            "ID": node["NodeID"],
            "StableID": node["ID"],
            "Name": node["DNSName"],
            "User": user_id,
            "Key": key,
            "Addresses": node["AllowedIPs"],
            "AllowedIPs": node["AllowedIPs"],
            "Hostinfo": {"OS": node["OS"], "Hostname": node["HostName"]},
            "Created": node["Created"],
            "Online": node["Online"],
            "MachineAuthorized": true,
            "ComputedName": node["DNSName"].as_str().unwrap_or("").split('.').next().unwrap_or(""),
        },
        "UserProfile": {
            "ID": user_id,
            "LoginName": if tagged { "tagged-devices" } else { "user@example.com" },
            "DisplayName": if tagged { "Tagged Devices" } else { "Example User" },
        },
        "CapMap": null
    });
    if tagged {
        resp["Node"]["Tags"] = node["Tags"].clone();
    }
    (200, "application/json", tab_json(&resp), true)
}

fn is_std_base64(s: &str) -> bool {
    s.len().is_multiple_of(4)
        && s.trim_end_matches('=')
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'+' || b == b'/')
        && s.len() - s.trim_end_matches('=').len() <= 2
}

fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' if i + 2 < b.len() => {
                match std::str::from_utf8(&b[i + 1..i + 3])
                    .ok()
                    .and_then(|h| u8::from_str_radix(h, 16).ok())
                {
                    Some(v) => {
                        out.push(v);
                        i += 3;
                        continue;
                    }
                    None => out.push(b'%'),
                }
            }
            b'+' => out.push(b' '),
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).to_string()
}

fn encode(status: u16, ctype: &str, body: &str, front_door_passed: bool) -> Vec<u8> {
    let reason = match status {
        200 => "OK",
        400 => "Bad Request",
        403 => "Forbidden",
        404 => "Not Found",
        _ => "Error",
    };
    let mut head = format!("HTTP/1.1 {status} {reason}\r\nContent-Type: {ctype}\r\n");
    if front_door_passed {
        head.push_str(&format!(
            "Tailscale-Version: {VERSION}\r\nTailscale-Cap: {CAP}\r\nContent-Security-Policy: default-src 'none'; frame-ancestors 'none'; script-src 'none'; script-src-elem 'none'; script-src-attr 'none'\r\nX-Frame-Options: DENY\r\n"
        ));
    }
    head.push_str("X-Content-Type-Options: nosniff\r\nConnection: close\r\n");
    let mut out;
    if body.len() < CHUNK_THRESHOLD {
        head.push_str(&format!("Content-Length: {}\r\n\r\n", body.len()));
        out = head.into_bytes();
        out.extend_from_slice(body.as_bytes());
    } else {
        head.push_str("Transfer-Encoding: chunked\r\n\r\n");
        out = head.into_bytes();
        for chunk in body.as_bytes().chunks(CHUNK_THRESHOLD) {
            out.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
            out.extend_from_slice(chunk);
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(b"0\r\n\r\n");
    }
    out
}
