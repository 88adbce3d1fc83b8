//! The state dir: where a peer keeps its key, config, database and runtime file.
//!
//! Resolution: `--state-dir`, else `CLAWMESH_STATE_DIR`, else `~/.clawmesh`. A running gateway
//! writes `gateway.json` (its pid and addresses) so the CLI on the same machine can find it,
//! and holds an exclusive lock on `gateway.lock` so two gateways never share one state dir.

use std::fs;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, Context, Result};
use serde::{Deserialize, Serialize};

/// Environment variable naming the state dir.
pub const ENV_STATE_DIR: &str = "CLAWMESH_STATE_DIR";
/// Runtime file of a running gateway.
pub const RUNTIME_FILE: &str = "gateway.json";
/// Lock file of a running gateway.
pub const LOCK_FILE: &str = "gateway.lock";
/// User config file.
pub const CONFIG_FILE: &str = "clawmesh.json";

/// Resolves the state dir from the flag, the environment, or the home directory.
pub fn resolve(flag: Option<&Path>) -> Result<PathBuf> {
    if let Some(p) = flag {
        return Ok(p.to_path_buf());
    }
    if let Some(p) = std::env::var_os(ENV_STATE_DIR).filter(|v| !v.is_empty()) {
        return Ok(PathBuf::from(p));
    }
    let home = std::env::var_os("HOME")
        .filter(|v| !v.is_empty())
        .ok_or_else(|| anyhow!("cannot find the state dir: HOME is not set; pass --state-dir or set {ENV_STATE_DIR}"))?;
    Ok(PathBuf::from(home).join(".clawmesh"))
}

/// What a running gateway publishes about itself in its state dir.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Runtime {
    /// Process id.
    pub pid: u32,
    /// Gateway name.
    pub name: String,
    /// Address the local CLI should dial (QUIC).
    pub quic: String,
    /// Address the gateway advertises to peers.
    pub advertise: String,
    /// Classic WebSocket bridge URL.
    #[serde(default)]
    pub ws: String,
    /// SHA-256 of the bridge's TLS certificate, when it serves wss://.
    #[serde(default)]
    pub tls_fingerprint: Option<String>,
    /// Start time, RFC 3339.
    pub started_at: String,
    /// Software version.
    pub version: String,
}

impl Runtime {
    /// Writes the runtime file atomically (temp file + rename), mode 0600.
    pub fn write(&self, dir: &Path) -> Result<()> {
        let path = dir.join(RUNTIME_FILE);
        let tmp = dir.join(format!(".{RUNTIME_FILE}.{}", std::process::id()));
        let body = serde_json::to_vec_pretty(self)?;
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .with_context(|| format!("writing {}", tmp.display()))?;
        f.write_all(&body)?;
        f.sync_all()?;
        fs::rename(&tmp, &path).with_context(|| format!("writing {}", path.display()))?;
        Ok(())
    }

    /// Reads the runtime file of the gateway using `dir`, checking that its process lives.
    pub fn read(dir: &Path) -> Result<Runtime> {
        let path = dir.join(RUNTIME_FILE);
        let text = fs::read_to_string(&path).map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                anyhow!(
                    "no gateway is running with state dir {} (no {}); start one with `clawmesh gateway run`, or pass --url and --token to reach another",
                    dir.display(),
                    path.display()
                )
            } else {
                anyhow!("cannot read {}: {e}", path.display())
            }
        })?;
        let rt: Runtime = serde_json::from_str(&text)
            .with_context(|| format!("{} is not a clawmesh runtime file", path.display()))?;
        if !pid_alive(rt.pid) {
            return Err(anyhow!(
                "the gateway that wrote {} (pid {}) is not running any more; start it with `clawmesh gateway run --state-dir {}`",
                path.display(),
                rt.pid,
                dir.display()
            ));
        }
        Ok(rt)
    }

    /// Removes the runtime file (clean shutdown).
    pub fn remove(dir: &Path) {
        let _ = fs::remove_file(dir.join(RUNTIME_FILE));
    }
}

fn pid_alive(pid: u32) -> bool {
    let Ok(pid) = i32::try_from(pid) else {
        return false;
    };
    match nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None) {
        Ok(()) => true,
        Err(nix::errno::Errno::EPERM) => true,
        Err(_) => false,
    }
}

/// An exclusive lock on the state dir, held for the gateway's lifetime.
pub struct DirLock {
    _flock: nix::fcntl::Flock<fs::File>,
}

impl DirLock {
    /// Takes the gateway lock, or explains who holds it.
    pub fn acquire(dir: &Path) -> Result<DirLock> {
        Self::acquire_named(dir, LOCK_FILE, "gateway")
    }

    /// Takes the lock file `name` for a `what` (gateway, node host).
    pub fn acquire_named(dir: &Path, name: &str, what: &str) -> Result<DirLock> {
        let path = dir.join(name);
        let file = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(&path)
            .with_context(|| format!("opening {}", path.display()))?;
        match nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock) {
            Ok(flock) => Ok(DirLock { _flock: flock }),
            Err((_, _)) => {
                let who = if name == LOCK_FILE {
                    Runtime::read(dir)
                        .map(|r| format!(" (gateway {} pid {})", r.name, r.pid))
                        .unwrap_or_default()
                } else {
                    String::new()
                };
                Err(anyhow!(
                    "another {what} is already running with state dir {}{who}; use another --state-dir",
                    dir.display()
                ))
            }
        }
    }
}
