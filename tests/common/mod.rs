//! Test harness: real `clawmesh` processes on 127.0.0.1, each with its own state dir.
#![allow(dead_code)]

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// The binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_clawmesh");

/// A gateway process; killed when dropped.
pub struct Gw {
    pub dir: PathBuf,
    pub log: PathBuf,
    child: Option<Child>,
}

impl Gw {
    /// Starts `clawmesh --state-dir DIR gateway run ARGS...`, logging to DIR.log.
    pub fn spawn(dir: &Path, args: &[&str]) -> Gw {
        let mut full = vec!["gateway", "run", "--port", "0"];
        full.extend_from_slice(args);
        Self::spawn_cmd(dir, &full)
    }

    /// Starts `clawmesh --state-dir DIR ARGS...` (any subcommand), logging to DIR.log.
    pub fn spawn_cmd(dir: &Path, args: &[&str]) -> Gw {
        Self::spawn_wrapped(&[], dir, args, &[])
    }

    /// Starts `WRAPPER... clawmesh --state-dir DIR ARGS...` with extra environment `env`
    /// (e.g. wrapper `ip netns exec NS`, which execs, so the pid stays the gateway's).
    pub fn spawn_wrapped(wrapper: &[&str], dir: &Path, args: &[&str], env: &[(&str, &str)]) -> Gw {
        std::fs::create_dir_all(dir).unwrap();
        let log = dir.with_extension("log");
        let f = File::options()
            .create(true)
            .append(true)
            .open(&log)
            .unwrap();
        let mut cmd = match wrapper.split_first() {
            Some((program, rest)) => {
                let mut c = Command::new(program);
                c.args(rest).arg(BIN);
                c
            }
            None => Command::new(BIN),
        };
        let child = cmd
            .envs(env.iter().copied())
            .arg("--state-dir")
            .arg(dir)
            .args(args)
            .env("RUST_LOG", "info")
            .env_remove("CLAWMESH_TOKEN")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(f))
            .spawn()
            .unwrap();
        Gw {
            dir: dir.to_path_buf(),
            log,
            child: Some(child),
        }
    }

    /// Waits for `gateway.json` of this process; returns the QUIC address.
    pub fn wait_ready(&mut self) -> String {
        let pid = self.child.as_ref().unwrap().id();
        let ok = wait_until(Duration::from_secs(15), || {
            std::fs::read_to_string(self.dir.join("gateway.json"))
                .ok()
                .and_then(|t| serde_json::from_str::<Value>(&t).ok())
                .map(|v| v["pid"] == pid)
                .unwrap_or(false)
        });
        assert!(
            ok,
            "gateway in {} did not start:\n{}",
            self.dir.display(),
            self.log_text()
        );
        self.addr()
    }

    /// The QUIC address from `gateway.json`.
    pub fn addr(&self) -> String {
        let t = std::fs::read_to_string(self.dir.join("gateway.json")).unwrap();
        let v: Value = serde_json::from_str(&t).unwrap();
        v["quic"].as_str().unwrap().to_string()
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    /// SIGKILL: no goodbye.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait for the exit.
    pub fn term(&mut self) -> ExitStatus {
        let mut c = self.child.take().unwrap();
        nix_kill(c.id(), "TERM");
        wait_child(&mut c, Duration::from_secs(10))
    }

    /// Waits for the process to exit by itself.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let c = self.child.as_mut().unwrap();
        let start = Instant::now();
        loop {
            if let Ok(Some(s)) = c.try_wait() {
                self.child = None;
                return Some(s);
            }
            if start.elapsed() > timeout {
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Gw {
    fn drop(&mut self) {
        self.kill9();
    }
}

fn nix_kill(pid: u32, sig: &str) {
    let _ = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status();
}

fn wait_child(c: &mut Child, timeout: Duration) -> ExitStatus {
    let start = Instant::now();
    loop {
        if let Ok(Some(s)) = c.try_wait() {
            return s;
        }
        if start.elapsed() > timeout {
            let _ = c.kill();
            return c.wait().unwrap();
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Polls `f` every 50 ms until it is true or `timeout` passes.
pub fn wait_until(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    loop {
        if f() {
            return true;
        }
        if start.elapsed() > timeout {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The last `lines` lines of the log of the process whose state dir is `dir`.
pub fn log_tail(dir: &Path, lines: usize) -> String {
    let log = std::fs::read_to_string(dir.with_extension("log")).unwrap_or_default();
    let tail: Vec<&str> = log.lines().rev().take(lines).collect();
    let mut out = String::new();
    for l in tail.iter().rev() {
        out.push_str(l);
        out.push('\n');
    }
    out
}

/// Runs the CLI with a state dir.
pub fn cli(dir: &Path, args: &[&str]) -> Output {
    Command::new(BIN)
        .arg("--state-dir")
        .arg(dir)
        .args(args)
        .env_remove("CLAWMESH_TOKEN")
        .output()
        .unwrap()
}

/// `nodes invoke --node NODE --command COMMAND --params PARAMS --json EXTRA...` on `dir`.
pub fn nodes_invoke(dir: &Path, node: &str, command: &str, params: &str, extra: &[&str]) -> Output {
    let mut args = vec![
        "nodes",
        "invoke",
        "--node",
        node,
        "--command",
        command,
        "--params",
        params,
        "--json",
    ];
    args.extend_from_slice(extra);
    cli(dir, &args)
}

/// `gateway status --all --json` of the gateway in `dir`, if it answers.
pub fn status(dir: &Path) -> Option<Value> {
    let out = cli(dir, &["gateway", "status", "--all", "--json"]);
    if !out.status.success() {
        return None;
    }
    serde_json::from_slice(&out.stdout).ok()
}

/// The status row of gateway `name` in a status document.
pub fn row<'a>(doc: &'a Value, name: &str) -> Option<&'a Value> {
    doc["gateways"]
        .as_array()?
        .iter()
        .find(|g| g["name"] == name)
}

/// Whether `dir`'s gateway sees every one of `names` healthy with a measured latency.
pub fn sees_healthy(dir: &Path, names: &[&str]) -> bool {
    let Some(doc) = status(dir) else { return false };
    names.iter().all(|n| {
        row(&doc, n)
            .map(|g| {
                // A gateway has no latency to itself.
                g["status"] == "healthy" && (g["isSelf"] == true || g["latencyMs"].is_number())
            })
            .unwrap_or(false)
    }) && doc["gateways"].as_array().map(|g| g.len()) == Some(names.len())
}

/// A port on 127.0.0.1 free for both UDP and TCP (for gateways that must come back on the
/// same port: a gateway binds QUIC and its WebSocket bridge on the same number, so a port
/// only free for UDP can fail its TCP bind).
///
/// The port is released before the gateway binds it, so it is picked outside the kernel's
/// ephemeral range (`net.ipv4.ip_local_port_range`): every socket bound to port 0 meanwhile
/// (QUIC clients, outgoing TCP, other tests' listeners) gets an ephemeral port, so none of
/// them can take the number in between. Within this process, numbers are handed out in
/// turn from a pid-derived start, so two tests never get the same one.
pub fn free_udp_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let (lo, hi) = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| {
            let mut it = s.split_whitespace().map(|n| n.parse::<u32>().ok());
            Some((it.next()??, it.next()??))
        })
        .unwrap_or((32768, 60999));
    // The window outside the ephemeral range: below it if there is room (ports under
    // 10 000 are left to well-known services), else above it.
    let window = if lo > 12_000 {
        Some((10_000, lo))
    } else if hi < 63_000 {
        Some((hi + 1, 65_535))
    } else {
        None
    };
    if let Some((start, end)) = window {
        let span = end - start;
        let base = std::process::id().wrapping_mul(7919) % span;
        for _ in 0..span {
            let n = NEXT.fetch_add(1, Ordering::Relaxed);
            let port = (start + (base + n) % span) as u16;
            let udp = std::net::UdpSocket::bind(("127.0.0.1", port));
            if udp.is_ok() && std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
                return port;
            }
        }
    }
    // No room outside the ephemeral range: ask the kernel, as before.
    loop {
        let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let port = udp.local_addr().unwrap().port();
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

/// Runs the CLI and parses its stdout as JSON (panics with stderr on failure).
pub fn cli_json(dir: &Path, args: &[&str]) -> Value {
    let out = cli(dir, args);
    assert!(
        out.status.success(),
        "{args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{args:?}: {e}: {}", String::from_utf8_lossy(&out.stdout)))
}

/// Whether any process command line contains `marker`.
pub fn process_running(marker: &str) -> bool {
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .chars()
                .all(|c| c.is_ascii_digit())
        })
        .any(|e| {
            let cmd = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
            let stat = std::fs::read_to_string(e.path().join("stat")).unwrap_or_default();
            // Zombies are dead already.
            let zombie = stat
                .rsplit(')')
                .next()
                .map(|r| r.trim_start().starts_with('Z'))
                .unwrap_or(false);
            !zombie
                && String::from_utf8_lossy(&cmd)
                    .replace('\0', " ")
                    .contains(marker)
        })
}

/// Approves the pending pairing request of device `name` on the gateway in `gw` (waiting up to
/// 20 s for the request to show).
pub fn approve_device(gw: &Path, name: &str) {
    let mut req = None;
    assert!(
        wait_until(Duration::from_secs(20), || {
            let v = cli_json(gw, &["devices", "list", "--json"]);
            req = v["pending"]
                .as_array()
                .and_then(|p| p.iter().find(|p| p["name"] == name))
                .and_then(|p| p["requestId"].as_str().map(str::to_string));
            req.is_some()
        }),
        "{name} never asked to pair at {}",
        gw.display()
    );
    let out = cli(gw, &["devices", "approve", req.as_deref().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

pub mod trio;
