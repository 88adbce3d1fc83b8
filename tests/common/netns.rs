//! A LAN of the test's own: network namespaces, each with a veth to one bridge in a hub
//! namespace, addresses 10.213.<lan>.<i+1>/24 inside them only. Created by the test, removed
//! when dropped (also when the test fails: Drop runs on unwind). Needs root; where namespaces
//! cannot be made a test says so loudly and is skipped, except under CI=true where it fails.
//! Included with `#[path = "common/netns.rs"] mod netns;`.
#![allow(dead_code)]

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};

static NEXT: AtomicUsize = AtomicUsize::new(0);

/// Namespaces joined by a bridge.
pub struct Lan {
    hub: String,
    nss: Vec<String>,
    subnet: u8,
}

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("ip: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

impl Lan {
    /// `n` namespaces on one bridge.
    pub fn new(n: usize) -> Result<Lan, String> {
        let k = NEXT.fetch_add(1, Ordering::SeqCst);
        let tag = format!("cm13-{}-{k}", std::process::id());
        // A subnet per LAN of this process, so two LANs in one test binary never overlap
        // (they are separate namespaces anyway; this keeps logs unambiguous).
        let subnet = (k % 250) as u8;
        let mut lan = Lan {
            hub: format!("{tag}-hub"),
            nss: Vec::new(),
            subnet,
        };
        ip(&["netns", "add", &lan.hub])?;
        ip(&["-n", &lan.hub, "link", "set", "lo", "up"])?;
        ip(&[
            "-n",
            &lan.hub,
            "link",
            "add",
            "br0",
            "type",
            "bridge",
            "mcast_snooping",
            "0",
        ])?;
        ip(&["-n", &lan.hub, "link", "set", "br0", "up"])?;
        for i in 0..n {
            let ns = format!("{tag}-{i}");
            ip(&["netns", "add", &ns])?;
            lan.nss.push(ns.clone());
            ip(&["-n", &ns, "link", "set", "lo", "up"])?;
            let host_end = format!("h{i}");
            ip(&[
                "link", "add", "e0", "netns", &ns, "type", "veth", "peer", "name", &host_end,
                "netns", &lan.hub,
            ])?;
            ip(&["-n", &lan.hub, "link", "set", &host_end, "master", "br0"])?;
            ip(&["-n", &lan.hub, "link", "set", &host_end, "up"])?;
            ip(&[
                "-n",
                &ns,
                "addr",
                "add",
                &format!("{}/24", lan.ip(i)),
                "dev",
                "e0",
            ])?;
            ip(&["-n", &ns, "link", "set", "e0", "up"])?;
        }
        Ok(lan)
    }

    /// The namespace name of member `i`.
    pub fn ns(&self, i: usize) -> &str {
        &self.nss[i]
    }

    /// The LAN address of member `i`.
    pub fn ip(&self, i: usize) -> String {
        format!("10.213.{}.{}", self.subnet, i + 1)
    }

    /// Adds another address (e.g. a tailnet 100.64.x.y/10) on member `i`'s LAN interface.
    pub fn add_addr(&self, i: usize, cidr: &str) {
        ip(&["-n", &self.nss[i], "addr", "add", cidr, "dev", "e0"]).expect("add address");
    }

    /// A command that runs `program` inside member `i`'s namespace.
    pub fn command(&self, i: usize, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.nss[i], program]);
        c
    }

    /// Runs the clawmesh CLI with `--state-dir dir` inside member `i`'s namespace.
    pub fn cli(&self, i: usize, bin: &str, dir: &Path, args: &[&str]) -> Output {
        self.command(i, bin)
            .arg("--state-dir")
            .arg(dir)
            .args(args)
            .env_remove("CLAWMESH_TOKEN")
            .env_remove("OPENCLAW_DISABLE_BONJOUR")
            .stdin(Stdio::null())
            .output()
            .expect("run the CLI in a namespace")
    }
}

impl Drop for Lan {
    fn drop(&mut self) {
        for ns in self.nss.iter().chain(std::iter::once(&self.hub)) {
            let _ = ip(&["netns", "del", ns]);
        }
    }
}

/// A LAN of `n` namespaces, or `None` (with a loud line) where namespaces cannot be made;
/// under CI=true that is a failure.
pub fn lan_or_skip(n: usize, test: &str) -> Option<Lan> {
    match Lan::new(n) {
        Ok(l) => Some(l),
        Err(e) => {
            if std::env::var("CI").as_deref() == Ok("true") {
                panic!("{test}: cannot create network namespaces under CI: {e}");
            }
            eprintln!(
                "\n*** SKIPPED {test}: cannot create network namespaces ({e}); run as root ***\n"
            );
            None
        }
    }
}
