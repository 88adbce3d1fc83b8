//! A federation of three to five real gateways behind the UDP delay relay, for fault tests:
//! kill and restart, pause and resume (SIGSTOP/SIGCONT), partitions, and the observations the
//! invariants need (primary, term, revision, node listings).
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use clawmesh::sim::relay::{PathSettings, WanRelay};
use serde_json::Value;

use crate::common::{cli, free_udp_port, log_tail, sees_healthy, status, wait_until, Gw};

/// Gateway names, in member order: the first is the configured primary.
pub const NAMES: [&str; 5] = ["tokyo", "beijing", "frankfurt", "singapore", "virginia"];

/// Round trip between every two sites: a continent-sized WAN, small enough for a short test.
pub const RTT_MS: u64 = 30;

/// A federation of `n` gateways, each behind its relay site, on fixed ports (so a restarted
/// gateway comes back where the others look for it).
pub struct Cluster {
    pub tmp: tempfile::TempDir,
    pub n: usize,
    pub dirs: Vec<PathBuf>,
    ports: Vec<u16>,
    adv: Vec<String>,
    gws: Vec<Option<Gw>>,
    paused: Vec<bool>,
    pub interval_ms: u64,
    pub relay: WanRelay,
    pub rt: tokio::runtime::Runtime,
}

impl Cluster {
    /// Starts `n` gateways at health interval `interval_ms`, all behind the relay, and waits
    /// until they form one federation with an agreed primary.
    pub fn start(n: usize, interval_ms: u64) -> Cluster {
        let rt = tokio::runtime::Runtime::new().unwrap();
        let relay = rt.block_on(WanRelay::start()).unwrap();
        let tmp = tempfile::tempdir().unwrap();
        let names = &NAMES[..n];
        let dirs: Vec<PathBuf> = names.iter().map(|x| tmp.path().join(x)).collect();
        let ports: Vec<u16> = (0..n).map(|_| free_udp_port()).collect();
        let mut adv = Vec::new();
        for (i, name) in names.iter().enumerate() {
            rt.block_on(relay.add_site(name, None)).unwrap();
            relay
                .set_target(name, format!("127.0.0.1:{}", ports[i]).parse().unwrap())
                .unwrap();
            adv.push(relay.public_addr(name).unwrap().to_string());
        }
        for a in 0..n {
            for b in a + 1..n {
                relay
                    .set_path(
                        names[a],
                        names[b],
                        PathSettings::with_rtt(Duration::from_millis(RTT_MS)),
                    )
                    .unwrap();
            }
        }
        let mut c = Cluster {
            tmp,
            n,
            dirs,
            ports,
            adv,
            gws: (0..n).map(|_| None).collect(),
            paused: vec![false; n],
            interval_ms,
            relay,
            rt,
        };
        for i in 0..n {
            c.spawn(i);
        }
        assert!(
            c.wait_formed(Duration::from_secs(40)),
            "federation did not form: {}",
            c.report()
        );
        c
    }

    pub fn name(&self, i: usize) -> &'static str {
        NAMES[i]
    }

    pub fn dir(&self, i: usize) -> &Path {
        &self.dirs[i]
    }

    /// Gateway `i`'s own port on 127.0.0.1 (QUIC on UDP; the HTTP bridge, `/metrics`, on TCP).
    pub fn port(&self, i: usize) -> u16 {
        self.ports[i]
    }

    /// The address other gateways and nodes dial for gateway `i` (its relay site).
    pub fn public(&self, i: usize) -> &str {
        &self.adv[i]
    }

    /// Gateway `i`'s own address, not through the relay: nodes dialing it stay attached when
    /// the relay cuts the gateway off from the others.
    pub fn direct(&self, i: usize) -> String {
        format!("127.0.0.1:{}", self.ports[i])
    }

    /// Starts (or restarts) gateway `i` and waits until it serves.
    pub fn spawn(&mut self, i: usize) {
        let port = self.ports[i].to_string();
        let interval = self.interval_ms.to_string();
        let join = format!("quic://{}", self.adv[0]);
        let region = format!("region-{}", NAMES[i]);
        let mut args = vec![
            "gateway",
            "run",
            "--name",
            NAMES[i],
            "--region",
            region.as_str(),
            "--port",
            &port,
            "--token",
            "fed-token",
            "--health-interval",
            &interval,
            "--advertise",
            &self.adv[i],
        ];
        if i == 0 {
            args.push("--primary");
        } else {
            args.extend(["--join", join.as_str()]);
        }
        let mut g = Gw::spawn_cmd(&self.dirs[i], &args);
        g.wait_ready();
        self.gws[i] = Some(g);
        self.paused[i] = false;
    }

    pub fn is_up(&self, i: usize) -> bool {
        self.gws[i].is_some()
    }

    pub fn is_paused(&self, i: usize) -> bool {
        self.paused[i]
    }

    /// Gateways running and not paused: the ones that answer.
    pub fn answering(&self) -> Vec<usize> {
        (0..self.n)
            .filter(|i| self.gws[*i].is_some() && !self.paused[*i])
            .collect()
    }

    /// SIGKILL: no goodbye.
    pub fn kill9(&mut self, i: usize) {
        if self.paused[i] {
            self.resume(i);
        }
        if let Some(mut g) = self.gws[i].take() {
            g.kill9();
        }
    }

    /// SIGSTOP: the process freezes (a stalled VM or disk), its sockets stay open.
    pub fn pause(&mut self, i: usize) {
        if let Some(g) = &self.gws[i] {
            signal(g.pid(), "STOP");
            self.paused[i] = true;
        }
    }

    /// SIGCONT.
    pub fn resume(&mut self, i: usize) {
        if let Some(g) = &self.gws[i] {
            signal(g.pid(), "CONT");
            self.paused[i] = false;
        }
    }

    /// Cuts gateway `i` off from every other gateway (both directions), or heals the cut.
    pub fn isolate(&self, i: usize, cut: bool) {
        self.relay.partition(&[NAMES[i]], cut).unwrap();
    }

    /// Whether every answering gateway sees every other answering gateway healthy and the
    /// full member list, and they agree on one primary.
    pub fn converged(&self) -> bool {
        let up = self.answering();
        let names: Vec<&str> = up.iter().map(|i| NAMES[*i]).collect();
        let mut primaries = Vec::new();
        for i in &up {
            let Some(doc) = status(self.dir(*i)) else {
                return false;
            };
            let rows = doc["gateways"].as_array().map(Vec::len).unwrap_or(0);
            if rows != self.n {
                return false;
            }
            for n in &names {
                let healthy = doc["gateways"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .any(|g| g["name"] == *n && g["status"] == "healthy");
                if !healthy {
                    return false;
                }
            }
            primaries.push(doc["primary"].clone());
        }
        !primaries.is_empty()
            && primaries[0].is_string()
            && primaries.iter().all(|p| *p == primaries[0])
    }

    /// Waits until all gateways are voters or learners of one group with one primary.
    pub fn wait_formed(&self, timeout: Duration) -> bool {
        let names: Vec<&str> = NAMES[..self.n].to_vec();
        wait_until(timeout, || {
            self.answering()
                .iter()
                .all(|i| sees_healthy(self.dir(*i), &names))
                && self.converged()
                && self.answering().iter().all(|i| {
                    consensus(self.dir(*i))["voters"]
                        .as_array()
                        .map(Vec::len)
                        .unwrap_or(0)
                        == self.n.min(5)
                })
        })
    }

    /// Consensus status and the tail of the log of every gateway, for failure messages.
    pub fn report(&self) -> String {
        let mut out = String::new();
        for (i, name) in NAMES.iter().enumerate().take(self.n) {
            let state = if !self.is_up(i) {
                "down"
            } else if self.paused[i] {
                "paused"
            } else {
                "up"
            };
            out.push_str(&format!("\n--- {name} ({state})"));
            if state == "up" {
                out.push_str(&format!(": {}", consensus(self.dir(i))));
            }
            out.push('\n');
            out.push_str(&log_tail(self.dir(i), 20));
        }
        out
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for i in 0..self.n {
            if self.paused[i] {
                self.resume(i);
            }
            if let Some(mut g) = self.gws[i].take() {
                g.kill9();
            }
        }
        self.rt.block_on(self.relay.shutdown());
    }
}

/// Sends `sig` (`STOP`, `CONT`, ...) to `pid`.
pub fn signal(pid: u32, sig: &str) {
    let ok = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    assert!(ok, "kill -{sig} {pid} failed");
}

/// The `consensus` object of `gateway status` on `dir` (`null` if it does not answer).
pub fn consensus(dir: &Path) -> Value {
    status(dir)
        .map(|d| d["consensus"].clone())
        .unwrap_or(Value::Null)
}

/// The primary `dir`'s gateway shows, if any.
pub fn primary(dir: &Path) -> Option<String> {
    status(dir).and_then(|d| d["primary"].as_str().map(str::to_string))
}

/// `config set KEY VALUE --json` on `dir`: the revision, or stderr.
pub fn config_set(dir: &Path, key: &str, value: &str) -> Result<u64, String> {
    let out = cli(dir, &["config", "set", key, value, "--json"]);
    if out.status.success() {
        let v: Value = serde_json::from_slice(&out.stdout).map_err(|e| e.to_string())?;
        v["revision"].as_u64().ok_or_else(|| v.to_string())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).to_string())
    }
}

/// A native node host process, restartable with the same key (state dir).
pub struct NodeProc {
    pub name: String,
    pub dir: PathBuf,
    gateways: Vec<String>,
    proc: Option<Gw>,
}

impl NodeProc {
    /// Starts `clawmesh node run` with `gateways` (quic:// URLs) in order of preference.
    pub fn start(root: &Path, name: &str, gateways: Vec<String>) -> NodeProc {
        let mut n = NodeProc {
            name: name.into(),
            dir: root.join(name),
            gateways,
            proc: None,
        };
        n.spawn();
        n
    }

    pub fn spawn(&mut self) {
        let mut args = vec!["node", "run"];
        for g in &self.gateways {
            args.extend(["--gateway", g.as_str()]);
        }
        args.extend(["--name", self.name.as_str()]);
        self.proc = Some(Gw::spawn_cmd(&self.dir, &args));
    }

    /// SIGKILL.
    pub fn kill9(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.kill9();
        }
    }

    pub fn log_tail(&self) -> String {
        log_tail(&self.dir, 15)
    }
}

/// `nodes status [--all] --json` on `dir`: the node rows, if it answers.
pub fn node_rows(dir: &Path, all: bool) -> Option<Vec<Value>> {
    let mut args = vec!["nodes", "status", "--json"];
    if all {
        args.push("--all");
    }
    let out = cli(dir, &args);
    if !out.status.success() {
        return None;
    }
    let v: Value = serde_json::from_slice(&out.stdout).ok()?;
    v["nodes"].as_array().cloned()
}

/// How `dir`'s gateway lists the node `name` (`nodes status --all`): (gateway, connected) per
/// row; a node attached nowhere has gateway `?`.
pub fn listed_at(dir: &Path, name: &str) -> Vec<(String, bool)> {
    node_rows(dir, true)
        .unwrap_or_default()
        .iter()
        .filter(|r| r["name"] == name)
        .map(|r| {
            (
                r["gateway"].as_str().unwrap_or("?").to_string(),
                r["connected"] == true,
            )
        })
        .collect()
}

/// Approves the pending request of the device named `name` on whichever gateway of `c` it
/// waits at; true once one approval succeeded.
pub fn approve_anywhere(c: &Cluster, name: &str) -> bool {
    wait_until(Duration::from_secs(20), || {
        for i in c.answering() {
            let out = cli(c.dir(i), &["devices", "list", "--json"]);
            let Ok(v) = serde_json::from_slice::<Value>(&out.stdout) else {
                continue;
            };
            let req = v["pending"]
                .as_array()
                .and_then(|p| p.iter().find(|p| p["name"] == name))
                .and_then(|p| p["requestId"].as_str().map(str::to_string));
            if let Some(r) = req {
                if cli(c.dir(i), &["devices", "approve", &r]).status.success() {
                    return true;
                }
            }
        }
        false
    })
}
