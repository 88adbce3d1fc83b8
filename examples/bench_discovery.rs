//! On-demand benchmark of discovery (issue 13): start-to-joined of a gateway that finds its
//! federation through mDNS and through the tailnet, beside a static `--join` (the baseline)
//! in the same run.
//!
//! Setup: three network namespaces of this run's own on one bridge (veth pairs; addresses
//! 10.213.x.y and, for the tailnet, 100.64.1.x on the same interfaces). The primary `tokyo`
//! runs in the first (`--bind lan`, mDNS on); a fake tailscaled (the one of the tests, serving
//! the LocalAPI contract on a unix socket) lists tokyo with `tag:clawmesh-gateway` at its
//! 100.64 address. Each sample starts a fresh joiner (new state dir, new key) in the second
//! namespace and measures from spawn until its log says it joined:
//!
//! - `static`: `--join quic://<tokyo>:18789` (baseline);
//! - `mdns`: `--token` only, found by mDNS;
//! - `tailnet`: `--token --no-mdns`, `gateway.discovery.tailnet` with the fake socket.
//!
//! The three modes rotate their order every round; after each sample the joiner is killed,
//! tokyo forgets it, and the next sample waits `--gap-ms` (default 0; see `gap`). Needs root (namespaces). Run it (release):
//!
//! ```text
//! cargo build --release --bin clawmesh --example bench_discovery
//! cargo run --release --example bench_discovery [-- ROUNDS [--gap-ms MS]]   # 9 rounds, gap 0
//! ```

#[path = "support/mod.rs"]
#[allow(dead_code)]
mod support;

#[path = "../discovery/tests/support/fake_tailscaled.rs"]
mod fake_tailscaled;
#[path = "../tests/common/netns.rs"]
mod netns;

use std::fs::File;
use std::path::Path;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Result};

/// The example's name (support's env variables and temp dirs use it).
const BENCH: &str = "bench_discovery";

/// A join takes well under a second on a LAN; 20 s means it failed.
const JOIN_DEADLINE: Duration = Duration::from_secs(20);

/// The log is polled this often: small beside the join times measured (hundreds of ms).
const POLL: Duration = Duration::from_millis(2);

/// Pause between samples (`--gap-ms`, default 0). Every joiner bound to the LAN browses mDNS,
/// and an mDNS responder answers the same record at most once a second per interface
/// (RFC 6762 §6.2); a joiner starting within a second of the previous one's query may miss
/// the answer and wait for its own 1 s retransmit. Run once with 0 and once with 1500 to see
/// that effect apart.
fn gap() -> Duration {
    std::env::args()
        .skip_while(|a| a != "--gap-ms")
        .nth(1)
        .and_then(|v| v.parse().ok())
        .map(Duration::from_millis)
        .unwrap_or(Duration::ZERO)
}

const TOKEN: &str = "bench-discovery-token";

struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn(
    lan: &netns::Lan,
    i: usize,
    bin: &Path,
    dir: &Path,
    args: &[&str],
) -> Result<(Proc, std::path::PathBuf)> {
    std::fs::create_dir_all(dir)?;
    let log = dir.with_extension("log");
    let f = File::create(&log)?;
    let child = lan
        .command(i, &bin.to_string_lossy())
        .arg("--state-dir")
        .arg(dir)
        .args(args)
        .env("RUST_LOG", "info")
        .env_remove("CLAWMESH_TOKEN")
        .env_remove("OPENCLAW_DISABLE_BONJOUR")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::from(f))
        .spawn()?;
    Ok((Proc(child), log))
}

fn wait_log(log: &Path, needle: &str, deadline: Duration) -> Result<Duration> {
    let start = Instant::now();
    loop {
        if std::fs::read_to_string(log).is_ok_and(|t| t.contains(needle)) {
            return Ok(start.elapsed());
        }
        if start.elapsed() > deadline {
            bail!("{} has no {needle:?} after {deadline:?}", log.display());
        }
        support::check_stop()?;
        std::thread::sleep(POLL);
    }
}

fn main() -> Result<()> {
    support::install_ctrl_c();
    let rounds: usize = std::env::args()
        .nth(1)
        .filter(|a| !a.starts_with("--"))
        .map(|a| a.parse())
        .transpose()?
        .unwrap_or(9);
    let bin = support::clawmesh_bin()?;
    let lan = netns::Lan::new(2).map_err(|e| anyhow!("network namespaces (needs root): {e}"))?;
    lan.add_addr(0, "100.64.1.1/10");
    lan.add_addr(1, "100.64.1.2/10");
    let tmp = tempfile::tempdir()?;
    let rt = tokio::runtime::Runtime::new()?;
    let sock = tmp.path().join("tailscaled.sock");
    let fake = rt.block_on(fake_tailscaled::FakeTailscaled::start(&sock));
    fake.set_online("gw-beijing", false);
    fake.add_peer(
        "tokyo",
        "100.64.1.1".parse()?,
        &["tag:clawmesh-gateway"],
        0x51,
    );

    let tokyo_dir = tmp.path().join("tokyo");
    let (_tokyo, tokyo_log) = spawn(
        &lan,
        0,
        &bin,
        &tokyo_dir,
        &[
            "gateway",
            "run",
            "--name",
            "tokyo",
            "--primary",
            "--token",
            TOKEN,
            "--bind",
            "lan",
            "--port",
            "18789",
        ],
    )?;
    wait_log(&tokyo_log, "gateway ready", JOIN_DEADLINE)?;
    let static_url = format!("quic://{}:18789", lan.ip(0));
    let modes = ["static", "mdns", "tailnet"];
    let mut samples: Vec<Vec<Duration>> = vec![Vec::new(); modes.len()];
    let machine = support::machine_with_load();
    for round in 0..rounds {
        for k in 0..modes.len() {
            let m = (round + k) % modes.len();
            let name = format!("j-{}-{round}", modes[m]);
            let dir = tmp.path().join(&name);
            std::fs::create_dir_all(&dir)?;
            let mut args = vec![
                "gateway",
                "run",
                "--name",
                name.as_str(),
                "--token",
                TOKEN,
                "--bind",
                "lan",
                "--port",
                "18789",
            ];
            match modes[m] {
                "static" => args.extend(["--join", static_url.as_str()]),
                "mdns" => {}
                _ => {
                    args.push("--no-mdns");
                    std::fs::write(
                        dir.join("clawmesh.json"),
                        serde_json::json!({"gateway": {"discovery": {"tailnet": true,
                            "tailnetTags": ["tag:clawmesh-gateway"], "tailnetSocket": sock}}})
                        .to_string(),
                    )?;
                }
            }
            let (joiner, log) = spawn(&lan, 1, &bin, &dir, &args)?;
            let t = wait_log(&log, "joined the federation", JOIN_DEADLINE)?;
            samples[m].push(t);
            drop(joiner);
            let out = lan.cli(
                0,
                &bin.to_string_lossy(),
                &tokyo_dir,
                &["gateway", "forget", &name],
            );
            if !out.status.success() {
                eprintln!(
                    "forget {name}: {}",
                    String::from_utf8_lossy(&out.stderr).trim()
                );
            }
            std::thread::sleep(gap());
        }
        eprintln!("round {}/{rounds} done", round + 1);
    }
    println!("| machine | |\n|---|---|");
    for (k, v) in machine {
        println!("| {k} | {v} |");
    }
    println!(
        "| rounds | {rounds} (modes rotate their order each round), gap between samples {:?} |\n",
        gap()
    );
    println!("| start-to-joined | n | p50 ms | min ms | max ms | mean ms | p50 − static p50 |\n|---|---|---|---|---|---|---|");
    let base = {
        let mut v = samples[0].clone();
        support::lat_stats(&mut v)?.p50
    };
    for (m, mode) in modes.iter().enumerate() {
        let mut v = samples[m].clone();
        let min = v
            .iter()
            .min()
            .map(|d| d.as_secs_f64() * 1e3)
            .unwrap_or(f64::NAN);
        let s = support::lat_stats(&mut v)?;
        println!(
            "| {mode}{} | {} | {:.1} | {:.1} | {:.1} | {:.1} | {} |",
            if m == 0 { " (baseline)" } else { "" },
            s.n,
            s.p50,
            min,
            s.max,
            s.mean,
            if m == 0 {
                "–".to_string()
            } else {
                format!("{:+.1} ms", s.p50 - base)
            }
        );
    }
    drop(fake);
    Ok(())
}
