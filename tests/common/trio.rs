//! Three gateways on loopback (tokyo the primary, beijing, frankfurt), each on a fixed port
//! so a restarted one comes back where the others look for it, with an operator token.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use super::{free_udp_port, log_tail, sees_healthy, status, wait_until, Gw};

/// The gateways' names, in start order (the first is the configured primary).
pub const NAMES: [&str; 3] = ["tokyo", "beijing", "frankfurt"];

/// Their regions.
pub const REGIONS: [&str; 3] = ["ap-northeast-1", "cn-north-1", "eu-central-1"];

/// The operator token every gateway accepts.
pub const TOKEN: &str = "trio-token";

/// Three running (or killed) gateways.
pub struct Trio {
    pub tmp: tempfile::TempDir,
    dirs: Vec<PathBuf>,
    ports: Vec<u16>,
    gws: Vec<Option<Gw>>,
    interval: String,
}

impl Trio {
    /// Starts the three and waits until each sees the others healthy with one primary.
    pub fn start(interval_ms: u64) -> Trio {
        let tmp = tempfile::tempdir().unwrap();
        let dirs = NAMES.iter().map(|n| tmp.path().join(n)).collect();
        let ports = (0..3).map(|_| free_udp_port()).collect();
        let mut t = Trio {
            tmp,
            dirs,
            ports,
            gws: vec![None, None, None],
            interval: interval_ms.to_string(),
        };
        for i in 0..3 {
            t.spawn(i);
        }
        t.wait_formed();
        t
    }

    /// (Re)starts gateway `i` on its port.
    pub fn spawn(&mut self, i: usize) {
        let port = self.ports[i].to_string();
        let join = format!("quic://127.0.0.1:{}", self.ports[0]);
        let mut args = vec![
            "gateway",
            "run",
            "--name",
            NAMES[i],
            "--port",
            &port,
            "--token",
            TOKEN,
            "--health-interval",
            &self.interval,
            "--region",
            REGIONS[i],
        ];
        if i == 0 {
            args.push("--primary");
        } else {
            args.extend(["--join", join.as_str()]);
        }
        let mut g = Gw::spawn_cmd(&self.dirs[i], &args);
        g.wait_ready();
        self.gws[i] = Some(g);
    }

    /// SIGKILL gateway `i`.
    pub fn kill9(&mut self, i: usize) {
        if let Some(mut g) = self.gws[i].take() {
            g.kill9();
        }
    }

    /// Gateway `i`'s state dir.
    pub fn dir(&self, i: usize) -> &Path {
        &self.dirs[i]
    }

    /// Gateway `i`'s port (UDP for QUIC, TCP for the bridge and the status page).
    pub fn port(&self, i: usize) -> u16 {
        self.ports[i]
    }

    /// Starts `clawmesh node run` named `name` on gateway `i` with `labels` (KEY=VALUE) and
    /// approves its pairing request there.
    pub fn node(&self, i: usize, name: &str, labels: &[&str]) -> Gw {
        let gw = format!("quic://127.0.0.1:{}", self.ports[i]);
        let mut args = vec!["node", "run", "--gateway", gw.as_str(), "--name", name];
        for l in labels {
            args.extend(["--label", l]);
        }
        let node = Gw::spawn_cmd(&self.tmp.path().join(name), &args);
        let approved = wait_until(Duration::from_secs(20), || {
            let out = super::cli(self.dir(i), &["devices", "list", "--json"]);
            let Ok(v) = serde_json::from_slice::<serde_json::Value>(&out.stdout) else {
                return false;
            };
            let req = v["pending"]
                .as_array()
                .and_then(|p| p.iter().find(|p| p["name"] == name))
                .and_then(|p| p["requestId"].as_str().map(str::to_string));
            req.is_some_and(|r| {
                super::cli(self.dir(i), &["devices", "approve", &r])
                    .status
                    .success()
            })
        });
        assert!(
            approved,
            "node {name} was never pending:\n{}",
            node.log_text()
        );
        node
    }

    /// Waits until every gateway sees the three healthy, knows the three voters, and they agree
    /// on a primary.
    pub fn wait_formed(&self) {
        let ok = wait_until(Duration::from_secs(30), || {
            let mut primaries = Vec::new();
            for i in 0..3 {
                if !sees_healthy(self.dir(i), &NAMES) {
                    return false;
                }
                let Some(doc) = status(self.dir(i)) else {
                    return false;
                };
                // A member the consensus has not taken in yet refuses config writes.
                if doc["consensus"]["voters"].as_array().map(Vec::len) != Some(3) {
                    return false;
                }
                primaries.push(doc["primary"].clone());
            }
            primaries[0].is_string() && primaries.iter().all(|p| *p == primaries[0])
        });
        assert!(ok, "federation did not form:\n{}", self.report());
    }

    /// The last log lines of each gateway, for failure messages.
    pub fn report(&self) -> String {
        let mut out = String::new();
        for (i, name) in NAMES.iter().enumerate() {
            out.push_str(&format!("\n--- {name}\n{}", log_tail(self.dir(i), 30)));
        }
        out
    }
}

impl Drop for Trio {
    fn drop(&mut self) {
        for i in 0..3 {
            self.kill9(i);
        }
    }
}
