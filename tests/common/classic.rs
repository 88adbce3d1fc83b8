//! The real, unmodified OpenClaw client (`openclaw@2026.9.6`), installed from the npm
//! registry into a cache dir (`$CLAWMESH_CLASSIC_CACHE`, default `~/.cache/clawmesh/classic`)
//! and reused when present. Under `CI=true` a failed install fails the tests; elsewhere they
//! print loudly that they were skipped and why. Included with
//! `#[path = "common/classic.rs"] mod classic;`.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use serde_json::Value;
use std::sync::OnceLock;

fn install() -> Result<PathBuf, String> {
    let cache = std::env::var_os("CLAWMESH_CLASSIC_CACHE")
        .map(PathBuf::from)
        .or_else(|| {
            std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/clawmesh/classic"))
        })
        .ok_or("neither CLAWMESH_CLASSIC_CACHE nor HOME is set")?;
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/install-classic-client.sh");
    let out = Command::new("bash")
        .arg(&script)
        .arg(&cache)
        .stderr(Stdio::piped())
        .output()
        .map_err(|e| format!("running {}: {e}", script.display()))?;
    if !out.status.success() {
        return Err(format!(
            "{} failed: {}",
            script.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    let wrapper = String::from_utf8_lossy(&out.stdout)
        .lines()
        .last()
        .map(|l| PathBuf::from(l.trim()))
        .ok_or("the install script printed no wrapper path")?;
    if !wrapper.exists() {
        return Err(format!(
            "{} does not exist after install",
            wrapper.display()
        ));
    }
    Ok(wrapper)
}

/// The `openclaw` wrapper, or None (skipped, said loudly) outside CI.
pub fn openclaw() -> Option<PathBuf> {
    static OC: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    match OC.get_or_init(install) {
        Ok(p) => Some(p.clone()),
        Err(e) if std::env::var("CI").as_deref() == Ok("true") => {
            panic!("classic interop: installing the real OpenClaw client failed under CI=true: {e}")
        }
        Err(e) => {
            eprintln!("\n*** SKIPPED classic interop test: the real OpenClaw client could not be installed: {e} ***\n");
            None
        }
    }
}

/// Runs the real CLI with its own HOME, against `url` with `token` (90 s at most: the CLI takes
/// about a second to start; a hung one is killed and its output so far returned).
pub fn oc(bin: &Path, home: &Path, url: &str, token: &str, args: &[&str]) -> Output {
    std::fs::create_dir_all(home).unwrap();
    let mut cmd = Command::new(bin);
    cmd.args(args)
        .args(["--url", url, "--token", token])
        .env("HOME", home)
        .env("OPENCLAW_STATE_DIR", home.join(".openclaw"))
        .env_remove("OPENCLAW_GATEWAY_TOKEN")
        .stdin(Stdio::null());
    let child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_output(child, Duration::from_secs(90))
}

pub fn wait_output(mut child: std::process::Child, timeout: Duration) -> Output {
    let start = std::time::Instant::now();
    loop {
        if let Ok(Some(_)) = child.try_wait() {
            return child.wait_with_output().unwrap();
        }
        if start.elapsed() > timeout {
            let _ = child.kill();
            return child.wait_with_output().unwrap();
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

pub fn oc_json(bin: &Path, home: &Path, url: &str, token: &str, args: &[&str]) -> Value {
    let out = oc(bin, home, url, token, args);
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "openclaw {args:?} failed ({:?}):\n{text}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    // The CLI may print a banner before the JSON document.
    let start = text.find(['{', '[']).unwrap_or(0);
    serde_json::from_str(&text[start..])
        .unwrap_or_else(|e| panic!("openclaw {args:?}: {e}:\n{text}"))
}

/// A real `openclaw gateway run` on 127.0.0.1:`port` (token auth, its own HOME), in its own
/// process group, which is killed on drop (the gateway starts worker processes).
pub struct OpenClawGateway {
    child: std::process::Child,
    pub log: PathBuf,
    pub url: String,
}

impl OpenClawGateway {
    /// Starts it with `extra` merged into its `gateway` config section.
    pub fn start(bin: &Path, home: &Path, port: u16, token: &str, extra: Value) -> Self {
        use std::os::unix::process::CommandExt as _;
        std::fs::create_dir_all(home.join(".openclaw")).unwrap();
        std::fs::create_dir_all(home.join("tmp")).unwrap();
        let mut gateway = serde_json::json!({
            "mode": "local", "port": port, "bind": "loopback",
            "auth": {"mode": "token", "token": token},
        });
        if let (Some(g), Some(e)) = (gateway.as_object_mut(), extra.as_object()) {
            for (k, v) in e {
                g.insert(k.clone(), v.clone());
            }
        }
        let config = serde_json::json!({"gateway": gateway, "logging": {"file": home.join("openclaw-file.log")}});
        std::fs::write(
            home.join(".openclaw/openclaw.json"),
            serde_json::to_string_pretty(&config).unwrap(),
        )
        .unwrap();
        let log = home.join("gateway.log");
        let f = std::fs::File::options()
            .create(true)
            .append(true)
            .open(&log)
            .unwrap();
        let child = Command::new(bin)
            .args([
                "gateway",
                "run",
                "--bind",
                "loopback",
                "--port",
                &port.to_string(),
            ])
            .arg("--allow-unconfigured")
            .env("HOME", home)
            .env("OPENCLAW_STATE_DIR", home.join(".openclaw"))
            .env("TMPDIR", home.join("tmp"))
            .env_remove("OPENCLAW_GATEWAY_TOKEN")
            .env_remove("OPENCLAW_GATEWAY_PASSWORD")
            .env_remove("NODE_OPTIONS")
            .stdin(Stdio::null())
            .stdout(Stdio::from(f.try_clone().unwrap()))
            .stderr(Stdio::from(f))
            .process_group(0)
            .spawn()
            .unwrap();
        OpenClawGateway {
            child,
            log,
            url: format!("ws://127.0.0.1:{port}"),
        }
    }

    /// Waits (up to 120 s: it starts in about 10 s on an idle machine) until `health`
    /// answers through the real CLI.
    pub fn wait_ready(&mut self, bin: &Path, cli_home: &Path, token: &str) {
        let start = std::time::Instant::now();
        while start.elapsed() < Duration::from_secs(120) {
            if let Ok(Some(st)) = self.child.try_wait() {
                panic!("openclaw gateway exited ({st}):\n{}", self.log_text());
            }
            let out = oc(
                bin,
                cli_home,
                &self.url,
                token,
                &["gateway", "call", "health", "--json"],
            );
            if out.status.success() {
                return;
            }
            std::thread::sleep(Duration::from_millis(500));
        }
        panic!("openclaw gateway not ready in 120 s:\n{}", self.log_text());
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Stops the whole process group (SIGKILL) and reaps the gateway.
    pub fn kill(&mut self) {
        let pgid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::killpg(pgid, nix::sys::signal::Signal::SIGKILL);
        let _ = self.child.wait();
    }
}

impl Drop for OpenClawGateway {
    fn drop(&mut self) {
        self.kill();
    }
}
