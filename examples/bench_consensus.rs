//! On-demand benchmark of the shared config and primary failover (issue 5): how long a config
//! write takes to be visible on every gateway over WAN latencies, how long the federation
//! needs to replace a dead primary, and what a change costs on the wire.
//!
//! Everything runs on 127.0.0.1 with real processes (release `clawmesh` binary):
//!
//! * three gateways `tokyo` (the configured primary), `beijing` and `frankfurt`, each with
//!   `--health-interval 1000` (raft timings derive from it: the report shows them, from
//!   [`clawmesh_federation::consensus::Timings::for_interval`]), joined
//!   through the in-process WAN relay ([`clawmesh::sim::relay::WanRelay`], on its own one-worker
//!   tokio runtime): each gateway runs with `--advertise <relay public addr of its site>`, so
//!   every gateway-to-gateway datagram (raft, health pings, mesh events) crosses the relay and
//!   is counted there. Every path starts at 45 ms round trip, set before the gateways start.
//!   Each relay site's target is set to the gateway's fixed port before the gateway is
//!   spawned, so even its first datagrams get the path's latency (the report counts datagrams
//!   the relay could not attribute to a gateway: there should be none).
//!   Each gateway keeps its UDP port (picked free up front, passed as `--port`) across
//!   restarts, so the relay site's target stays right.
//! * The benchmark client is this process: one operator connection per gateway
//!   (`clawmesh::cli::client::Client::connect(&Target::Local(state_dir))`, straight to the gateway
//!   on loopback, not through the relay) on a tokio **`current_thread`** runtime.
//!
//! 1. **Write visible on all three gateways.** Case A: 45 ms on every path. Case B: 120 ms on
//!    tokyo ↔ frankfurt, 45 ms on the two others (the largest round trip is 120 ms). Per
//!    write: `config.set {"key":"bench.visible","value":<unique>}` on the origin gateway while
//!    `config.get bench.visible` polls all three gateways every 1 ms (concurrently, one client
//!    each) until each returns the new value; recorded: the ack (`config.set` returns, i.e.
//!    committed on a majority and applied on the leader) and, per gateway, the first poll
//!    answer showing the value, all from the instant the write was sent. Two interleaved
//!    series, n = 50 each after 5 warm-up writes: writes issued on tokyo (the leader) and on
//!    frankfurt (forwarded to tokyo). Writes are spaced 20..170 ms apart (varying, so they do
//!    not lock to the heartbeat phase). Goal: visible on all within the largest round trip +
//!    50 ms. Baselines in the same run: each link's round trip measured as `gateway.call
//!    health` from one gateway to the other (one mesh request), the `latencyMs` ping median of
//!    `gateway.status` (64-ping window, so it lags a path change by ~30 s), and a UDP echo
//!    through the relay at 45 and 120 ms. Relay bytes per write are reported too (heartbeats
//!    and pings included). Extra case C (n = 10 per origin, 3 s deadline, stops after
//!    3 failures without failing the run): 250 ms on tokyo ↔ frankfurt, about a real
//!    Tokyo–Frankfurt round trip. openraft 0.9 uses the raft heartbeat as the deadline of
//!    every append-entries request, so such a path works only while the heartbeat exceeds its
//!    round trip plus a follower's fsync (at least 400 ms since commit 64ac62c; at the 1 s
//!    health interval it was 250 ms before, and every append to frankfurt timed out).
//! 2. **Failover**, 45 ms on every path. Six rounds: once tokyo leads and every gateway sees
//!    all three healthy, SIGKILL tokyo; then concurrently (a) `gateway.status` on beijing and
//!    frankfurt every 20 ms until one reports a primary other than tokyo (and until both agree),
//!    and (b) write probes on one survivor (beijing and frankfurt alternate): a new
//!    `config.set` every 100 ms, each waited for (client deadline 15 s), until one succeeds;
//!    recorded: when the first successful probe returned, how many failed, and what happened
//!    to the probe sent at the kill instant. Then tokyo is restarted (same state dir and port,
//!    no writes meanwhile) and the run measures, from its spawn, until `gateway.json` is
//!    written, until tokyo leads again in a newer term than the survivor's (the preferred
//!    primary takes the role back once caught up; a restarted tokyo first claims the
//!    leadership of its old term, which is noted and not counted) and until all three report
//!    it. Goal: a new primary within 3 s (memberlist needs several seconds on a LAN, NATS
//!    gateways 30 to 45 s). Then once more with writes going on: tokyo killed and restarted
//!    while beijing writes once every 500 ms for 12 s; does tokyo take the role back during
//!    the writes, or how long after they stop?
//! 3. **Bytes on the wire** (relay payload bytes, i.e. UDP payloads of the encrypted QUIC
//!    packets, per direction), case B latencies. A 10 000-key config (100 × 100 string leaves,
//!    `bench.cfg.gNN.kNN`) is loaded with `clawmesh config import FILE` (one revision), and
//!    waited for on all three, then until tokyo stops sending bulk data (no link over 4 KiB in
//!    a second). Then 100 sequential one-key changes on tokyo, each waited for on all three
//!    (`gateway.status` `consensus.applied`, polled every 1 ms); idle traffic (raft
//!    heartbeats, health pings) is measured over a 5 s window right before and one right after,
//!    and the smaller rate × the duration of the changes is subtracted: bytes per change =
//!    (bytes during the changes − idle bytes for the same time) / 100, per link; the bytes
//!    during the changes / 100 are the upper bound. Goal: under 1 KiB per follower. Catch-up:
//!    frankfurt is stopped (SIGTERM), 1 000 one-key changes are written on tokyo (16 in
//!    flight), frankfurt is restarted and the bytes and time until its applied revision equals
//!    tokyo's are measured; compared with the 1 000 changes as raw JSON, and with a restart
//!    without missed changes (same time window after the spawn), which measures the reconnect
//!    itself (QUIC handshakes, hellos, membership, pings).
//!
//! Before each measured phase the run waits (at most 30 s, `BENCH_CONSENSUS_QUIET_SECS` to
//! change) until the machine is quiet: 1-minute load average below 0.7, or less than 10 % of the
//! CPUs busy with processes outside this benchmark's own process tree over 2 s. The load average
//! and that foreign CPU share are reported per phase.
//!
//! Run it (release, or the numbers mean nothing):
//!
//! ```text
//! cargo build --release --bin clawmesh --example bench_consensus
//! cargo run --release --example bench_consensus
//! ```
//!
//! The `clawmesh` binary is looked up beside the example's directory (`target/release/clawmesh`,
//! honouring `CARGO_TARGET_DIR`); set `CLAWMESH_BIN` to use another one. The Markdown report
//! goes to stdout, progress to stderr. Every process started is stopped (SIGTERM, SIGKILL after
//! a grace period) and the temp dir removed, also on errors and on Ctrl-C
//! (`BENCH_CONSENSUS_KEEP=1` keeps it, with every process's log; `BENCH_CONSENSUS_LOG=FILTER`
//! sets their log filter, e.g. `debug`); every wait and loop is bounded. The run takes about
//! 4 minutes plus the waits for a quiet machine.

#[path = "support/mod.rs"]
#[allow(dead_code)]
mod support;

use std::cell::Cell;
use std::fs;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use clawmesh::cli::client::{Client, Target};
use clawmesh::sim::relay::{PathSettings, Peer, RelayStats, WanRelay};
use clawmesh_federation::consensus::Timings;
use futures_util::stream::{FuturesUnordered, StreamExt};
use futures_util::FutureExt as _;
use serde_json::{json, Value};
use support::{
    add_site, check_stop, clawmesh_cmd, end_quiet, lat_stats, ms_text, poll, quiet_text,
    relay_bench_main, relay_gateway_args, run_cli, runtime_file, sleep, status_field, stop_all,
    udp_rtt, wait_quiet, Echo, Lat, Machine, Proc, Quiet,
};

/// This example's name: its environment variables are `BENCH_CONSENSUS_*` (see `support`).
const BENCH: &str = "bench_consensus";

const NAMES: [&str; 3] = ["tokyo", "beijing", "frankfurt"];
const REGIONS: [&str; 3] = ["ap-northeast-1", "cn-north-1", "eu-central-1"];
const TOKYO: usize = 0;
const BEIJING: usize = 1;
const FRANKFURT: usize = 2;

/// Round trip of every path in case A, and of the two short paths in case B.
const RTT_NEAR: Duration = Duration::from_millis(45);
/// Round trip of tokyo ↔ frankfurt in case B.
const RTT_FAR: Duration = Duration::from_millis(120);
/// Round trip of tokyo ↔ frankfurt in the extra case C: about a real Tokyo–Frankfurt one.
const RTT_OVER: Duration = Duration::from_millis(250);
/// Measured writes per origin in case C.
const N_OVER: usize = 10;
/// Measured writes per series (origin) and case.
const N_VISIBLE: usize = 50;
/// Unmeasured writes before them (per origin).
const VISIBLE_WARMUP: usize = 5;
/// How often each gateway is asked whether the write is visible.
const VISIBLE_POLL: Duration = Duration::from_millis(1);
/// A write not visible everywhere within this is a failure.
const VISIBLE_DEADLINE: Duration = Duration::from_secs(10);
/// Most failed writes tolerated in one case before giving up.
const MAX_FAILURES: usize = 5;
/// `gateway.call health` round trips per link for the measured RTT.
const N_LINK_PROBES: usize = 10;
/// Kill / restart rounds of the primary.
const FAILOVER_ROUNDS: usize = 6;
/// Status poll period during a failover.
const STATUS_POLL: Duration = Duration::from_millis(20);
/// A new write probe on the survivor this often after the kill.
const PROBE_EVERY: Duration = Duration::from_millis(100);
/// Client deadline of one write probe.
const PROBE_TIMEOUT: Duration = Duration::from_secs(15);
/// Write rate and duration on a survivor while the restarted tokyo should take the role back.
const LOAD_WRITE_EVERY: Duration = Duration::from_millis(500);
const LOAD_WRITE_FOR: Duration = Duration::from_secs(12);
/// Groups × keys of the big config.
const CONFIG_GROUPS: usize = 100;
const CONFIG_KEYS_PER_GROUP: usize = 100;
/// Sequential one-key changes for the bytes per change.
const N_BYTE_CHANGES: usize = 100;
/// Idle windows before and after them.
const IDLE_WINDOW: Duration = Duration::from_secs(5);
/// Changes frankfurt misses while stopped.
const N_CATCHUP: usize = 1000;
/// Writes in flight while making them.
const CATCHUP_IN_FLIGHT: usize = 16;
/// Deadline of one ordinary call.
const CALL_TIMEOUT: Duration = Duration::from_secs(20);
/// Gateway health ping interval; raft timings derive from it.
const HEALTH_INTERVAL_MS: &str = "1000";
/// Federation join secret.
const TOKEN: &str = "bench-consensus-tok";
/// Longest wait for a quiet machine before measuring anyway.
const QUIET_MAX: Duration = Duration::from_secs(30);

/// A port free for both UDP (QUIC) and TCP (the classic bridge on the same port) on loopback.
fn free_port(taken: &[u16]) -> Result<u16> {
    for _ in 0..100 {
        let udp = std::net::UdpSocket::bind("127.0.0.1:0")?;
        let port = udp.local_addr()?.port();
        if taken.contains(&port) {
            continue;
        }
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return Ok(port);
        }
    }
    bail!("no free UDP+TCP port found on 127.0.0.1")
}

// ---------------------------------------------------------------------------------------------
// The federation

/// The three gateway processes, each with a fixed port and relay site; stopped on drop.
struct Cluster {
    bin: PathBuf,
    root: PathBuf,
    ports: [u16; 3],
    publics: [SocketAddr; 3],
    procs: [Option<Proc>; 3],
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let mut procs: Vec<Proc> = self.procs.iter_mut().filter_map(Option::take).collect();
        stop_all(&mut procs, Duration::from_secs(10));
    }
}

impl Cluster {
    fn dir(&self, i: usize) -> PathBuf {
        self.root.join(NAMES[i])
    }

    fn pid(&self, i: usize) -> Option<i32> {
        self.procs[i].as_ref().map(Proc::pid)
    }

    /// Starts gateway `i` (tokyo as the primary, the others joining tokyo through the relay)
    /// and waits until it has written `gateway.json`; returns an operator connection to it and
    /// the time from spawn to `gateway.json`.
    async fn start(&mut self, i: usize, relay: &WanRelay) -> Result<(Client, Duration)> {
        if let Some(p) = self.procs[i].as_mut() {
            if !p.exited() {
                bail!("{} is still running", NAMES[i]);
            }
        }
        let dir = self.dir(i);
        let args = relay_gateway_args(
            (NAMES[i], REGIONS[i]),
            self.ports[i],
            self.publics[i],
            TOKEN,
            HEALTH_INTERVAL_MS,
            (i != TOKYO).then_some(self.publics[TOKYO]),
        );
        // Known in advance (fixed port), so the relay attributes even the first datagram.
        let expected = SocketAddr::from(([127, 0, 0, 1], self.ports[i]));
        relay.set_target(NAMES[i], expected)?;
        let t = Instant::now();
        let proc = Proc::spawn_appending(
            NAMES[i],
            clawmesh_cmd(&self.bin, &dir, &args),
            &self.root.join(format!("{}.log", NAMES[i])),
        )?;
        let pid = proc.pid();
        self.procs[i] = Some(proc);
        // A start takes well under a second; 30 s covers a loaded machine, and a gateway that
        // exits meanwhile fails at once with its log.
        let addr: SocketAddr = loop {
            check_stop()?;
            if let Some(p) = self.procs[i].as_mut() {
                p.ensure_running()?;
            }
            let quic = runtime_file(&dir, pid).and_then(|v| v["quic"].as_str()?.parse().ok());
            if let Some(a) = quic {
                break a;
            }
            if t.elapsed() > Duration::from_secs(30) {
                bail!("{} wrote no gateway.json within 30 s", NAMES[i]);
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        };
        let ready = t.elapsed();
        if addr != expected {
            bail!("{} bound {addr}, not {expected}", NAMES[i]);
        }
        let client = Client::connect(&Target::Local(dir))
            .await
            .with_context(|| format!("operator connection to {}", NAMES[i]))?;
        Ok((client, ready))
    }

    /// SIGKILL, at once.
    fn crash(&mut self, i: usize) {
        if let Some(mut p) = self.procs[i].take() {
            p.sigkill();
        }
    }

    /// SIGTERM and wait (SIGKILL after 10 s: a gateway's bounded shutdown takes far less).
    fn stop(&mut self, i: usize) {
        if let Some(mut p) = self.procs[i].take() {
            p.stop(Duration::from_secs(10));
        }
    }

    fn ensure_running(&mut self) -> Result<()> {
        for p in self.procs.iter_mut().flatten() {
            p.ensure_running()?;
        }
        Ok(())
    }
}

fn cl(clients: &[Option<Client>], i: usize) -> Result<&Client> {
    clients[i]
        .as_ref()
        .ok_or_else(|| anyhow!("no connection to {}", NAMES[i]))
}

async fn call(client: &Client, method: &str, params: Value) -> Result<Value> {
    client
        .call(method, params, CALL_TIMEOUT)
        .await
        .map_err(|e| anyhow!("{method}: {e}"))
}

/// `gateway.status` (`all`: with every gateway's row).
async fn status(client: &Client, all: bool) -> Result<Value> {
    call(client, "gateway.status", json!({"all": all})).await
}

/// The revision applied on this gateway (`consensus.applied`).
async fn applied(client: &Client) -> Result<u64> {
    let s = status(client, false).await?;
    s["consensus"]["applied"]
        .as_u64()
        .ok_or_else(|| anyhow!("gateway.status without consensus.applied: {s}"))
}

/// Steady state: every gateway reports tokyo as the primary, three voters, every link healthy,
/// and tokyo leads.
async fn wait_steady(clients: &[Option<Client>], what: &str, deadline: Duration) -> Result<()> {
    poll(what, deadline, Duration::from_millis(100), || async {
        for (i, c) in clients.iter().enumerate() {
            let Some(c) = c else { return Ok(None) };
            let s = status(c, true).await?;
            let healthy = s["gateways"].as_array().is_some_and(|gs| {
                gs.len() == 3
                    && gs
                        .iter()
                        // A gateway has no latency to itself.
                        .all(|g| {
                            g["status"] == "healthy"
                                && (g["isSelf"] == true || g["latencyMs"].is_number())
                        })
            });
            let voters = s["consensus"]["voters"].as_array().map_or(0, Vec::len);
            if s["primary"] != "tokyo" || !healthy || voters != 3 {
                return Ok(None);
            }
            if i == TOKYO && s["consensus"]["role"] != "leader" {
                return Ok(None);
            }
        }
        Ok(Some(()))
    })
    .await
}

/// Waits until every client's gateway has applied `rev`, polling each every `every`
/// (concurrently); returns the time each took from now.
async fn wait_applied_all(
    clients: &[&Client],
    rev: u64,
    every: Duration,
    deadline: Duration,
) -> Result<Vec<Duration>> {
    let t0 = Instant::now();
    futures_util::future::try_join_all(clients.iter().map(|c| async move {
        loop {
            check_stop()?;
            if applied(c).await? >= rev {
                return Ok::<_, anyhow::Error>(t0.elapsed());
            }
            if t0.elapsed() > deadline {
                bail!("revision {rev} not applied within {deadline:?}");
            }
            tokio::time::sleep(every).await;
        }
    }))
    .await
}

// ---------------------------------------------------------------------------------------------
// Relay helpers

/// Datagrams the relay forwarded between a gateway site and a source it does not know as a
/// gateway (should be none: every gateway sends from its registered QUIC socket).
fn external_datagrams(relay: &WanRelay) -> u64 {
    let s = relay.stats();
    NAMES
        .iter()
        .map(|n| {
            let site = Peer::Site((*n).to_string());
            s.direction(&Peer::External, &site).forwarded
                + s.direction(&site, &Peer::External).forwarded
        })
        .sum()
}

/// The six directions between the three sites, in report order.
const DIRECTIONS: [(usize, usize); 6] = [
    (TOKYO, BEIJING),
    (BEIJING, TOKYO),
    (TOKYO, FRANKFURT),
    (FRANKFURT, TOKYO),
    (BEIJING, FRANKFURT),
    (FRANKFURT, BEIJING),
];

/// Relay payload bytes per direction of [`DIRECTIONS`].
#[derive(Debug, Clone, Copy, Default)]
struct Bytes([f64; 6]);

impl Bytes {
    fn of(s: &RelayStats) -> Bytes {
        let mut b = [0.0; 6];
        for (k, (from, to)) in DIRECTIONS.iter().enumerate() {
            b[k] = s.between(NAMES[*from], NAMES[*to]).bytes as f64;
        }
        Bytes(b)
    }

    fn now(relay: &WanRelay) -> Bytes {
        Bytes::of(&relay.stats())
    }

    fn minus(&self, o: &Bytes) -> Bytes {
        let mut b = self.0;
        for (x, y) in b.iter_mut().zip(o.0) {
            *x -= y;
        }
        Bytes(b)
    }

    fn scale(&self, f: f64) -> Bytes {
        Bytes(self.0.map(|x| x * f))
    }

    /// Bytes `from` → `to`.
    fn dir(&self, from: usize, to: usize) -> f64 {
        DIRECTIONS
            .iter()
            .position(|d| *d == (from, to))
            .map_or(f64::NAN, |k| self.0[k])
    }

    /// Both directions between `a` and `b`.
    fn pair(&self, a: usize, b: usize) -> f64 {
        self.dir(a, b) + self.dir(b, a)
    }
}

// ---------------------------------------------------------------------------------------------
// Part 1: write visible on all three gateways

struct LinkRtt {
    a: usize,
    b: usize,
    set: Duration,
    /// `gateway.call health` from a to b.
    call: Lat,
    /// a's ping median to b (`latencyMs`).
    ping_median: f64,
}

/// What one latency case runs.
struct CaseSpec {
    label: &'static str,
    /// Measured writes per origin, after `warmup` unmeasured ones.
    n: usize,
    warmup: usize,
    /// A write not visible everywhere within this is a failure.
    deadline: Duration,
    /// Failures before the case stops; `fatal`: the whole run stops then.
    max_failures: usize,
    fatal: bool,
}

struct VisSeries {
    origin: usize,
    ack: Option<Lat>,
    seen: [Option<Lat>; 3],
    all: Option<Lat>,
}

struct VisCase {
    label: &'static str,
    links: Vec<LinkRtt>,
    /// Largest RTT set on a path (ms).
    largest_set: f64,
    series: Vec<VisSeries>,
    failures: usize,
    first_failure: Option<String>,
    /// The case stopped early after too many failures.
    gave_up: bool,
    /// Writes sent (warm-up and failed ones included) and relay bytes meanwhile.
    writes: usize,
    bytes: Bytes,
    elapsed: Duration,
    quiet: Quiet,
}

/// One write on `origin` while every gateway polls for it; returns (ack, seen per gateway).
async fn one_write(
    clients: &[&Client; 3],
    origin: usize,
    key: &str,
    value: &Value,
    deadline: Duration,
) -> Result<(Duration, [Duration; 3])> {
    let t0 = Instant::now();
    let set = async {
        clients[origin]
            .call(
                "config.set",
                json!({"key": key, "value": value}),
                deadline + Duration::from_secs(5),
            )
            .await
            .map_err(|e| anyhow!("config.set on {}: {e}", NAMES[origin]))?;
        Ok::<_, anyhow::Error>(t0.elapsed())
    };
    let seen = |i: usize| async move {
        loop {
            check_stop()?;
            let doc = call(clients[i], "config.get", json!({"key": key})).await?;
            if doc["synced"]["value"] == *value {
                return Ok::<_, anyhow::Error>(t0.elapsed());
            }
            if t0.elapsed() > deadline {
                bail!(
                    "{key} = {value} not visible on {} within {deadline:?}",
                    NAMES[i]
                );
            }
            tokio::time::sleep(VISIBLE_POLL).await;
        }
    };
    let (ack, a, b, c) = tokio::try_join!(set, seen(0), seen(1), seen(2))?;
    Ok((ack, [a, b, c]))
}

/// Round trips of the three links as the gateways see them.
async fn link_rtts(clients: &[&Client; 3], relay: &WanRelay) -> Result<Vec<LinkRtt>> {
    let mut out = Vec::new();
    for (a, b) in [(TOKYO, BEIJING), (TOKYO, FRANKFURT), (BEIJING, FRANKFURT)] {
        let mut v = Vec::new();
        let probe = json!({"gateway": NAMES[b], "method": "health", "params": {}});
        for i in 0..N_LINK_PROBES + 2 {
            let t = Instant::now();
            let h = call(clients[a], "gateway.call", probe.clone()).await?;
            if h["name"] != NAMES[b] {
                bail!("gateway.call health answered by {}", h["name"]);
            }
            if i >= 2 {
                v.push(t.elapsed());
            }
        }
        let s = status(clients[a], true).await?;
        let ping = s["gateways"]
            .as_array()
            .and_then(|gs| gs.iter().find(|g| g["name"] == NAMES[b]))
            .and_then(|g| g["latencyMs"].as_f64())
            .unwrap_or(f64::NAN);
        out.push(LinkRtt {
            a,
            b,
            set: relay.path(NAMES[a], NAMES[b])?.rtt,
            call: lat_stats(&mut v)?,
            ping_median: ping,
        });
    }
    Ok(out)
}

async fn visibility(
    clients: &[Option<Client>],
    relay: &WanRelay,
    spec: &CaseSpec,
) -> Result<VisCase> {
    let cs = [
        cl(clients, TOKYO)?,
        cl(clients, BEIJING)?,
        cl(clients, FRANKFURT)?,
    ];
    let label = spec.label;
    let (quiet, mark) = wait_quiet(label, QUIET_MAX).await?;
    let links = link_rtts(&cs, relay).await?;
    let largest_set = links
        .iter()
        .map(|l| l.set.as_secs_f64() * 1e3)
        .fold(0.0, f64::max);
    eprintln!(
        "  {label}: {} writes per origin (tokyo, frankfurt), interleaved",
        spec.n
    );
    let origins = [TOKYO, FRANKFURT];
    // Per origin: ack, seen per gateway, seen on all.
    let mut acks: Vec<Vec<Duration>> = vec![Vec::new(); 2];
    let mut seen: Vec<[Vec<Duration>; 3]> = vec![Default::default(), Default::default()];
    let mut all: Vec<Vec<Duration>> = vec![Vec::new(); 2];
    let mut failures = 0;
    let mut first_failure = None;
    let mut gave_up = false;
    let mut writes = 0;
    let tag = label.split(':').next().unwrap_or("case");
    let b0 = Bytes::now(relay);
    let t = Instant::now();
    'writes: for i in 0..spec.warmup + spec.n {
        let order = if i % 2 == 0 { [0, 1] } else { [1, 0] };
        for o in order {
            check_stop()?;
            let origin = origins[o];
            let value = json!({"case": tag, "i": i, "from": NAMES[origin]});
            writes += 1;
            match one_write(&cs, origin, "bench.visible", &value, spec.deadline).await {
                Ok((ack, s)) => {
                    if i >= spec.warmup {
                        acks[o].push(ack);
                        for g in 0..3 {
                            seen[o][g].push(s[g]);
                        }
                        all[o].push(s.into_iter().max().unwrap_or_default());
                    }
                }
                Err(e) => {
                    check_stop()?;
                    failures += 1;
                    let at = format!("write {i} on {}: {e:#}", NAMES[origin]);
                    eprintln!("  write failed ({at})");
                    first_failure.get_or_insert(at);
                    if failures >= spec.max_failures {
                        if spec.fatal {
                            bail!("{failures} failed writes: {e:#}");
                        }
                        gave_up = true;
                        break 'writes;
                    }
                    sleep(Duration::from_secs(1)).await?;
                }
            }
            // 20..170 ms apart, varying so the writes do not lock to the heartbeat phase.
            let gap = 20 + (i as u64 * 37 + o as u64 * 53) % 150;
            sleep(Duration::from_millis(gap)).await?;
        }
    }
    let elapsed = t.elapsed();
    let bytes = Bytes::now(relay).minus(&b0);
    let quiet = end_quiet(quiet, &mark);
    let mut series = Vec::new();
    for (o, &origin) in origins.iter().enumerate() {
        let [s0, s1, s2] = &mut seen[o];
        series.push(VisSeries {
            origin,
            ack: lat_stats(&mut acks[o]).ok(),
            seen: [lat_stats(s0).ok(), lat_stats(s1).ok(), lat_stats(s2).ok()],
            all: lat_stats(&mut all[o]).ok(),
        });
    }
    Ok(VisCase {
        label,
        links,
        largest_set,
        series,
        failures,
        first_failure,
        gave_up,
        writes,
        bytes,
        elapsed,
        quiet,
    })
}

// ---------------------------------------------------------------------------------------------
// Part 2: failover

#[derive(Debug, Default)]
struct Round {
    new_primary: String,
    term_before: u64,
    term_after: u64,
    /// Kill → first survivor shows a new primary.
    shown: Duration,
    /// Kill → both survivors show the same new primary.
    agreed: Duration,
    writer: usize,
    /// Kill → the first successful write probe returned.
    write_ok: Duration,
    /// When that probe was sent (since the kill).
    write_ok_sent: Duration,
    probes: usize,
    probe_errors: usize,
    first_probe_error: Option<String>,
    /// The probe sent at the kill instant: how long it took, and its error if it failed.
    first_probe: (Duration, Option<String>),
    /// Spawn of the restarted tokyo → `gateway.json` written.
    restart_ready: Duration,
    /// Spawn → tokyo leads again (in a newer term than the survivor's).
    regain: Duration,
    /// Spawn → all three report tokyo as the primary.
    regain_agreed: Duration,
    /// The restarted tokyo reported itself leader of its old term (before it heard of the newer
    /// one): the last time it was seen doing so, since the spawn.
    stale_until: Option<Duration>,
    /// Meanwhile its `gateway.status` `primary` named itself.
    stale_primary_shown: bool,
}

/// The hand-back while a survivor keeps writing.
#[derive(Debug, Default)]
struct UnderLoad {
    write_every: Duration,
    write_for: Duration,
    writes: usize,
    write_errors: usize,
    write_max: Duration,
    /// Spawn → tokyo leads again, if that happened while the writes went on.
    regained_during: Option<Duration>,
    /// Writes stopped → tokyo leads again, if it only happened then.
    regained_after_stop: Option<Duration>,
}

struct FailoverResult {
    rounds: Vec<Round>,
    under_load: UnderLoad,
    quiet: Quiet,
}

/// Polls the survivors' `gateway.status` every [`STATUS_POLL`] until one reports a primary
/// other than tokyo, and until both report the same one: (name, first shown, agreed, term).
async fn watch_new_primary(
    survivors: [&Client; 2],
    t0: Instant,
) -> Result<(String, Duration, Duration, u64)> {
    let mut first: Option<(String, Duration)> = None;
    loop {
        check_stop()?;
        let mut seen = Vec::new();
        let mut term = 0;
        for c in survivors {
            let s = status(c, false).await?;
            let p = s["primary"].as_str().unwrap_or("").to_string();
            term = term.max(s["consensus"]["term"].as_u64().unwrap_or(0));
            seen.push(p);
        }
        let at = t0.elapsed();
        for p in &seen {
            if !p.is_empty() && p != "tokyo" && first.is_none() {
                first = Some((p.clone(), at));
            }
        }
        if let Some((name, shown)) = &first {
            if seen.iter().all(|p| p == name) {
                return Ok((name.clone(), *shown, at, term));
            }
        }
        if at > Duration::from_secs(30) {
            bail!("no new primary reported within 30 s of the kill (seen: {seen:?})");
        }
        tokio::time::sleep(STATUS_POLL).await;
    }
}

/// Write probes on `client` from `t0`: a new `config.set` every [`PROBE_EVERY`] until one
/// succeeds, then waits for those still in flight.
async fn write_probes(client: &Client, t0: Instant, round: usize, r: &mut Round) -> Result<()> {
    type Done = (usize, Duration, Duration, Result<Value, String>);
    let mut inflight = FuturesUnordered::new();
    let mut next = t0;
    let mut k = 0usize;
    let mut ok: Option<(Duration, Duration)> = None;
    loop {
        check_stop()?;
        let now = Instant::now();
        if ok.is_none() && now >= next {
            let sent = t0.elapsed();
            let params = json!({"key": "bench.failover", "value": {"round": round, "probe": k}});
            let i = k;
            inflight.push(async move {
                let res = client
                    .call("config.set", params, PROBE_TIMEOUT)
                    .await
                    .map_err(|e| e.to_string());
                let done: Done = (i, sent, t0.elapsed(), res);
                done
            });
            k += 1;
            next += PROBE_EVERY;
        }
        if ok.is_some() && inflight.is_empty() {
            break;
        }
        if t0.elapsed() > Duration::from_secs(40) {
            bail!("failover round {round}: no write succeeded within 40 s");
        }
        let wake = if ok.is_none() {
            next
        } else {
            Instant::now() + Duration::from_millis(200)
        };
        tokio::select! {
            Some((i, sent, done, res)) = inflight.next(), if !inflight.is_empty() => {
                if i == 0 {
                    r.first_probe = (done - sent, res.as_ref().err().cloned());
                }
                match res {
                    Ok(_) => {
                        if ok.is_none_or(|(d, _)| done < d) {
                            ok = Some((done, sent));
                        }
                    }
                    Err(e) => {
                        r.probe_errors += 1;
                        r.first_probe_error.get_or_insert(format!(
                            "sent {:.2} s after the kill: {e}",
                            sent.as_secs_f64()
                        ));
                    }
                }
            }
            _ = tokio::time::sleep_until(wake.into()) => {}
        }
    }
    let (done, sent) = ok.unwrap_or_default();
    r.write_ok = done;
    r.write_ok_sent = sent;
    r.probes = k;
    Ok(())
}

/// A restarted tokyo claiming the leadership of its old term.
#[derive(Default)]
struct Stale {
    /// When it was last seen doing so.
    last: Cell<Option<Instant>>,
    /// Whether its `gateway.status` named itself the primary meanwhile.
    primary_shown: Cell<bool>,
}

/// Whether tokyo leads in a term newer than `term`; notes a stale claim (leader of an older
/// term, restored from its own committed vote before it hears of the newer term).
async fn tokyo_leads(tokyo: &Client, term: u64, stale: &Stale) -> Result<bool> {
    let s = status(tokyo, false).await?;
    if s["consensus"]["role"] != "leader" {
        return Ok(false);
    }
    if s["consensus"]["term"].as_u64().unwrap_or(0) <= term {
        stale.last.set(Some(Instant::now()));
        if s["primary"] == "tokyo" {
            stale.primary_shown.set(true);
        }
        return Ok(false);
    }
    Ok(true)
}

/// SIGKILL tokyo and wait until a survivor leads: (new primary, term, kill instant).
async fn kill_tokyo(
    cluster: &mut Cluster,
    clients: &mut [Option<Client>],
) -> Result<(String, u64, Instant)> {
    let t0 = Instant::now();
    cluster.crash(TOKYO);
    clients[TOKYO] = None;
    let (name, _, _, term) =
        watch_new_primary([cl(clients, BEIJING)?, cl(clients, FRANKFURT)?], t0).await?;
    Ok((name, term, t0))
}

async fn failover(
    cluster: &mut Cluster,
    clients: &mut [Option<Client>],
    relay: &WanRelay,
) -> Result<FailoverResult> {
    let (quiet, mark) = wait_quiet("failover", QUIET_MAX).await?;
    let mut rounds = Vec::new();
    for round in 0..FAILOVER_ROUNDS {
        wait_steady(
            clients,
            "steady state before the kill",
            Duration::from_secs(60),
        )
        .await?;
        // A varying pause, so the kill falls at a different point of the heartbeat cycle.
        sleep(Duration::from_millis(700 + (round as u64 * 373) % 600)).await?;
        let mut r = Round {
            writer: if round % 2 == 0 { BEIJING } else { FRANKFURT },
            term_before: status(cl(clients, TOKYO)?, false).await?["consensus"]["term"]
                .as_u64()
                .unwrap_or(0),
            ..Round::default()
        };
        eprintln!(
            "  round {}: SIGKILL tokyo; probes on {}",
            round + 1,
            NAMES[r.writer]
        );
        let t0 = Instant::now();
        cluster.crash(TOKYO);
        clients[TOKYO] = None;
        {
            let survivors = [cl(clients, BEIJING)?, cl(clients, FRANKFURT)?];
            let writer = cl(clients, r.writer)?;
            let (w, p) = tokio::join!(
                watch_new_primary(survivors, t0),
                write_probes(writer, t0, round, &mut r)
            );
            let (name, shown, agreed, term) = w?;
            p?;
            r.new_primary = name;
            r.shown = shown;
            r.agreed = agreed;
            r.term_after = term;
        }
        eprintln!(
            "    new primary {} shown after {:.0} ms; write ok after {:.0} ms",
            r.new_primary,
            r.shown.as_secs_f64() * 1e3,
            r.write_ok.as_secs_f64() * 1e3
        );
        // Restart tokyo (no writes meanwhile: see the under-load experiment below).
        let t = Instant::now();
        let (c, ready) = cluster.start(TOKYO, relay).await?;
        let stale = Stale::default();
        poll(
            "tokyo leads again",
            Duration::from_secs(60),
            STATUS_POLL,
            || async { Ok(tokyo_leads(&c, r.term_after, &stale).await?.then_some(())) },
        )
        .await?;
        let regain = t.elapsed();
        clients[TOKYO] = Some(c);
        poll(
            "every gateway reports tokyo as the primary",
            Duration::from_secs(30),
            STATUS_POLL,
            || async {
                for i in 0..3 {
                    if status(cl(clients, i)?, false).await?["primary"] != "tokyo" {
                        return Ok(None);
                    }
                }
                Ok(Some(()))
            },
        )
        .await?;
        r.restart_ready = ready;
        r.regain = regain;
        r.regain_agreed = t.elapsed();
        r.stale_until = stale.last.get().map(|s| s - t);
        r.stale_primary_shown = stale.primary_shown.get();
        eprintln!(
            "    tokyo restarted: ready {:.0} ms, leads again after {:.2} s",
            ready.as_secs_f64() * 1e3,
            regain.as_secs_f64()
        );
        cluster.ensure_running()?;
        rounds.push(r);
    }
    let under_load = handback_under_load(cluster, clients, relay).await?;
    let quiet = end_quiet(quiet, &mark);
    Ok(FailoverResult {
        rounds,
        under_load,
        quiet,
    })
}

/// Kill tokyo once more, restart it, and keep writing on beijing (one write per
/// [`LOAD_WRITE_EVERY`] for [`LOAD_WRITE_FOR`]): does tokyo take the role back meanwhile, and
/// if not, how long after the writes stop?
async fn handback_under_load(
    cluster: &mut Cluster,
    clients: &mut [Option<Client>],
    relay: &WanRelay,
) -> Result<UnderLoad> {
    wait_steady(
        clients,
        "steady state before the kill",
        Duration::from_secs(60),
    )
    .await?;
    eprintln!(
        "  hand-back under load: SIGKILL tokyo, restart it, one write per {} ms on beijing for \
         {} s",
        LOAD_WRITE_EVERY.as_millis(),
        LOAD_WRITE_FOR.as_secs()
    );
    let (_, term, _) = kill_tokyo(cluster, clients).await?;
    let t = Instant::now();
    let (c, _) = cluster.start(TOKYO, relay).await?;
    let stale = Stale::default();
    let writes_done: Cell<Option<Instant>> = Cell::new(None);
    let beijing = cl(clients, BEIJING)?;
    let writer = async {
        let mut lat = Vec::new();
        let mut errors = 0;
        let start = Instant::now();
        let mut k = 0u64;
        while start.elapsed() < LOAD_WRITE_FOR {
            check_stop()?;
            let t1 = Instant::now();
            let res = beijing
                .call(
                    "config.set",
                    json!({"key": "bench.load", "value": k}),
                    PROBE_TIMEOUT,
                )
                .await;
            lat.push(t1.elapsed());
            if res.is_err() {
                errors += 1;
            }
            k += 1;
            let next = start + LOAD_WRITE_EVERY * k as u32;
            tokio::time::sleep_until(next.into()).await;
        }
        writes_done.set(Some(Instant::now()));
        Ok::<_, anyhow::Error>((lat, errors))
    };
    let watcher = async {
        loop {
            check_stop()?;
            if tokyo_leads(&c, term, &stale).await? {
                return Ok::<_, anyhow::Error>(Instant::now());
            }
            if writes_done
                .get()
                .is_some_and(|d| d.elapsed() > Duration::from_secs(30))
            {
                bail!("tokyo did not lead again within 30 s after the writes stopped");
            }
            tokio::time::sleep(STATUS_POLL).await;
        }
    };
    let (w, regained) = tokio::join!(writer, watcher);
    let (lat, errors) = w?;
    let regained = regained?;
    let done = writes_done.get().unwrap_or_else(Instant::now);
    clients[TOKYO] = Some(c);
    let mut out = UnderLoad {
        write_every: LOAD_WRITE_EVERY,
        write_for: LOAD_WRITE_FOR,
        writes: lat.len(),
        write_errors: errors,
        write_max: lat.iter().copied().max().unwrap_or_default(),
        ..UnderLoad::default()
    };
    if regained <= done {
        out.regained_during = Some(regained - t);
    } else {
        out.regained_after_stop = Some(regained - done);
    }
    eprintln!("    {out:?}");
    wait_steady(
        clients,
        "steady state after the under-load hand-back",
        Duration::from_secs(60),
    )
    .await?;
    Ok(out)
}

// ---------------------------------------------------------------------------------------------
// Part 3: bytes on the wire

struct BytesResult {
    quiet: Quiet,
    keys: usize,
    /// Size of the imported JSON file, and of its leaves as a flat `{"key": value}` object.
    import_file_bytes: usize,
    import_flat_bytes: usize,
    import_time: Duration,
    import_bytes: Bytes,
    /// From the import until the leader stopped sending bulk data (re-sends of the entry whose
    /// acknowledgements timed out): time and bytes.
    import_quiet_time: Duration,
    import_quiet_bytes: Bytes,
    idle_rate: Bytes,
    idle_windows: (Bytes, Bytes),
    changes_time: Duration,
    changes_raw: Bytes,
    per_change: Bytes,
    /// One-key change as raw JSON `{"key":..,"value":..}`.
    change_json: usize,
    catchup_write_time: Duration,
    catchup_during_writes: Bytes,
    catchup_raw_json: usize,
    catchup_keys: usize,
    catchup_revisions: (u64, u64),
    catchup_ready: Duration,
    catchup_time: Duration,
    catchup_bytes: Bytes,
    baseline_ready: Duration,
    baseline_bytes: Bytes,
    gw_rss: Vec<(String, u64)>,
}

fn config_key(j: usize) -> String {
    format!(
        "bench.cfg.g{:02}.k{:02}",
        j / CONFIG_KEYS_PER_GROUP,
        j % CONFIG_KEYS_PER_GROUP
    )
}

/// A config-like string leaf of 40 characters; `gen` changes it.
fn config_value(j: usize, gen: usize) -> String {
    format!("value-{gen:04}-{j:05}-abcdefghijklmnopqrstu")
}

async fn bytes_part(
    cluster: &mut Cluster,
    clients: &mut [Option<Client>],
    relay: &WanRelay,
) -> Result<BytesResult> {
    let (quiet, mark) = wait_quiet("bytes", QUIET_MAX).await?;
    let bin = cluster.bin.clone();
    let tokyo_dir = cluster.dir(TOKYO);
    // The 10 000-key config as a nested JSON file.
    let mut doc = serde_json::Map::new();
    let mut flat = serde_json::Map::new();
    for g in 0..CONFIG_GROUPS {
        let mut group = serde_json::Map::new();
        for k in 0..CONFIG_KEYS_PER_GROUP {
            let j = g * CONFIG_KEYS_PER_GROUP + k;
            group.insert(format!("k{k:02}"), json!(config_value(j, 0)));
            flat.insert(config_key(j), json!(config_value(j, 0)));
        }
        doc.insert(format!("g{g:02}"), Value::Object(group));
    }
    let file_text = serde_json::to_string(&json!({"bench": {"cfg": doc}}))?;
    let file = cluster.root.join("config-10k.json");
    fs::write(&file, &file_text)?;
    let keys = flat.len();
    eprintln!(
        "  importing {keys} keys ({} bytes of JSON)",
        file_text.len()
    );
    let before = Bytes::now(relay);
    let t = Instant::now();
    let out = run_cli(
        clawmesh_cmd(
            &bin,
            &tokyo_dir,
            &[
                "config",
                "import",
                file.to_str().unwrap_or_default(),
                "--json",
            ],
        ),
        Duration::from_secs(60),
    )
    .await?;
    let v: Value = serde_json::from_str(out.trim())
        .with_context(|| format!("config import printed {out:?}"))?;
    let rev = v["revision"]
        .as_u64()
        .ok_or_else(|| anyhow!("config import printed {out:?}"))?;
    if v["keys"].as_u64() != Some(keys as u64) {
        bail!("config import wrote {} keys, not {keys}", v["keys"]);
    }
    {
        let cs: Vec<&Client> = (0..3).map(|i| cl(clients, i)).collect::<Result<_>>()?;
        wait_applied_all(&cs, rev, Duration::from_millis(5), Duration::from_secs(60)).await?;
    }
    let import_time = t.elapsed();
    let import_bytes = Bytes::now(relay).minus(&before);
    // The leader may go on re-sending the entry to a follower (an append whose answer takes
    // longer than the raft heartbeat times out in openraft 0.9 and is sent again): wait until
    // no link from tokyo carries more than 4 KiB in a second (idle is under 1 KiB/s).
    let (import_quiet_time, import_quiet_bytes) = loop {
        let a = Bytes::now(relay);
        let at = t.elapsed();
        sleep(Duration::from_secs(1)).await?;
        let d = Bytes::now(relay).minus(&a);
        if d.dir(TOKYO, BEIJING) < 4096.0 && d.dir(TOKYO, FRANKFURT) < 4096.0 {
            break (at, a.minus(&before));
        }
        if t.elapsed() > Duration::from_secs(90) {
            bail!("tokyo still sending bulk data 90 s after the import: {d:?}");
        }
    };
    // Then: idle window, 100 sequential changes, idle window.
    sleep(Duration::from_secs(1)).await?;
    let s0 = Bytes::now(relay);
    sleep(IDLE_WINDOW).await?;
    let s1 = Bytes::now(relay);
    eprintln!("  {N_BYTE_CHANGES} sequential one-key changes on tokyo");
    let cs: Vec<&Client> = (0..3).map(|i| cl(clients, i)).collect::<Result<_>>()?;
    let tokyo = cs[TOKYO];
    let t = Instant::now();
    let mut change_json = 0;
    for i in 0..N_BYTE_CHANGES {
        check_stop()?;
        let j = (i * 97) % keys;
        let params = json!({"key": config_key(j), "value": config_value(j, 1)});
        change_json = params.to_string().len();
        let r = call(tokyo, "config.set", params).await?;
        let rev = r["revision"]
            .as_u64()
            .ok_or_else(|| anyhow!("config.set returned {r}"))?;
        wait_applied_all(&cs, rev, VISIBLE_POLL, VISIBLE_DEADLINE).await?;
    }
    let changes_time = t.elapsed();
    let s2 = Bytes::now(relay);
    sleep(IDLE_WINDOW).await?;
    let s3 = Bytes::now(relay);
    let idle_windows = (s1.minus(&s0), s3.minus(&s2));
    // Idle traffic is a floor (anything else only adds to it): the smaller of the two windows.
    let mut idle_rate = Bytes::default();
    for (k, x) in idle_rate.0.iter_mut().enumerate() {
        *x = idle_windows.0 .0[k].min(idle_windows.1 .0[k]) / IDLE_WINDOW.as_secs_f64();
    }
    let changes_raw = s2.minus(&s1);
    let per_change = changes_raw
        .minus(&idle_rate.scale(changes_time.as_secs_f64()))
        .scale(1.0 / N_BYTE_CHANGES as f64);
    let gw_rss = (0..3)
        .map(|i| {
            (
                NAMES[i].to_string(),
                cluster
                    .pid(i)
                    .and_then(|p| status_field(p, "VmRSS"))
                    .unwrap_or(0),
            )
        })
        .collect();
    drop(cs);

    // Catch-up: frankfurt misses 1 000 changes.
    eprintln!("  stopping frankfurt; {N_CATCHUP} changes on tokyo");
    clients[FRANKFURT] = None;
    cluster.stop(FRANKFURT);
    sleep(Duration::from_millis(500)).await?;
    let tokyo = cl(clients, TOKYO)?;
    let rev_before = applied(tokyo).await?;
    let mut missed = serde_json::Map::new();
    let w0 = Bytes::now(relay);
    let t = Instant::now();
    let results: Vec<Result<u64>> = futures_util::stream::iter(0..N_CATCHUP)
        .map(|i| {
            let j = (i * 7919) % keys;
            let key = config_key(j);
            let value = json!(config_value(j, 2));
            missed.insert(key.clone(), value.clone());
            async move {
                let r = call(tokyo, "config.set", json!({"key": key, "value": value})).await?;
                r["revision"]
                    .as_u64()
                    .ok_or_else(|| anyhow!("config.set returned {r}"))
            }
        })
        .buffer_unordered(CATCHUP_IN_FLIGHT)
        .collect()
        .await;
    let catchup_write_time = t.elapsed();
    let catchup_during_writes = Bytes::now(relay).minus(&w0);
    let mut last = 0;
    for r in results {
        last = last.max(r?);
    }
    let target = applied(tokyo).await?.max(last);
    let catchup_raw_json = serde_json::to_string(&missed)?.len();
    sleep(Duration::from_millis(500)).await?;
    eprintln!(
        "  restarting frankfurt ({} revisions behind)",
        target - rev_before
    );
    let c0 = Bytes::now(relay);
    let t = Instant::now();
    let (c, catchup_ready) = cluster.start(FRANKFURT, relay).await?;
    poll(
        "frankfurt caught up",
        Duration::from_secs(60),
        Duration::from_millis(2),
        || async { Ok((applied(&c).await? >= target).then_some(())) },
    )
    .await?;
    let catchup_time = t.elapsed();
    let catchup_bytes = Bytes::now(relay).minus(&c0);
    clients[FRANKFURT] = Some(c);

    // Baseline: the same restart without missed changes, same window from the spawn.
    sleep(Duration::from_secs(2)).await?;
    eprintln!("  baseline: restarting frankfurt with nothing to catch up");
    clients[FRANKFURT] = None;
    cluster.stop(FRANKFURT);
    sleep(Duration::from_millis(500)).await?;
    let b0 = Bytes::now(relay);
    let t = Instant::now();
    let (c, baseline_ready) = cluster.start(FRANKFURT, relay).await?;
    let rest = catchup_time.saturating_sub(t.elapsed());
    sleep(rest).await?;
    let baseline_bytes = Bytes::now(relay).minus(&b0);
    let now_applied = applied(&c).await?;
    if now_applied < target {
        eprintln!(
            "  note: frankfurt's applied revision after the baseline window is {now_applied} \
             (tokyo {target})"
        );
    }
    clients[FRANKFURT] = Some(c);
    let quiet = end_quiet(quiet, &mark);
    Ok(BytesResult {
        quiet,
        keys,
        import_file_bytes: file_text.len(),
        import_flat_bytes: serde_json::to_string(&flat)?.len(),
        import_time,
        import_bytes,
        import_quiet_time,
        import_quiet_bytes,
        idle_rate,
        idle_windows,
        changes_time,
        changes_raw,
        per_change,
        change_json,
        catchup_write_time,
        catchup_during_writes,
        catchup_raw_json,
        catchup_keys: missed.len(),
        catchup_revisions: (rev_before, target),
        catchup_ready,
        catchup_time,
        catchup_bytes,
        baseline_ready,
        baseline_bytes,
        gw_rss,
    })
}

// ---------------------------------------------------------------------------------------------
// The run

struct Report {
    relay_echo: Vec<(Duration, Lat)>,
    /// Relay datagrams between a gateway site and a source that is no registered gateway
    /// address (so the path settings did not apply): after the start, and at the end.
    external_at_start: u64,
    external_at_end: u64,
    cases: Vec<VisCase>,
    failover: FailoverResult,
    bytes: BytesResult,
}

async fn run_with_relay(bin: &Path, root: &Path, relay: &WanRelay) -> Result<Report> {
    // The relay itself at the two RTTs: a UDP echo behind a site.
    let echo = Echo::start()?;
    let echo_public = add_site(relay, "echo", Some(echo.addr)).await?;
    let mut relay_echo = Vec::new();
    for rtt in [RTT_NEAR, RTT_FAR] {
        relay.set_default("echo", PathSettings::with_rtt(rtt))?;
        relay_echo.push((rtt, udp_rtt(echo_public, 20, 2).await?));
    }
    drop(echo);

    let mut publics = Vec::new();
    for name in NAMES {
        publics.push(add_site(relay, name, None).await?);
    }
    for (a, b) in [(TOKYO, BEIJING), (TOKYO, FRANKFURT), (BEIJING, FRANKFURT)] {
        relay.set_path(NAMES[a], NAMES[b], PathSettings::with_rtt(RTT_NEAR))?;
    }
    let mut ports = [0u16; 3];
    for i in 0..3 {
        ports[i] = free_port(&ports[..i])?;
    }
    let mut cluster = Cluster {
        bin: bin.to_path_buf(),
        root: root.to_path_buf(),
        ports,
        publics: [publics[0], publics[1], publics[2]],
        procs: [None, None, None],
    };
    let mut clients: Vec<Option<Client>> = vec![None, None, None];
    eprintln!("starting 3 gateways behind the WAN relay (45 ms on every path)");
    for (i, slot) in clients.iter_mut().enumerate() {
        let (c, _) = cluster.start(i, relay).await?;
        *slot = Some(c);
    }
    wait_steady(
        &clients,
        "three gateways, three voters, tokyo primary",
        Duration::from_secs(60),
    )
    .await?;
    let external_at_start = external_datagrams(relay);

    eprintln!("part 1, case A: 45 ms on every path");
    let mut cases = vec![
        visibility(
            &clients,
            relay,
            &CaseSpec {
                label: "A: 45 ms on every path",
                n: N_VISIBLE,
                warmup: VISIBLE_WARMUP,
                deadline: VISIBLE_DEADLINE,
                max_failures: MAX_FAILURES,
                fatal: true,
            },
        )
        .await?,
    ];

    eprintln!("part 2: failover ({FAILOVER_ROUNDS} rounds, 45 ms on every path)");
    let failover = failover(&mut cluster, &mut clients, relay).await?;

    relay.set_path(
        NAMES[TOKYO],
        NAMES[FRANKFURT],
        PathSettings::with_rtt(RTT_FAR),
    )?;
    wait_steady(
        &clients,
        "steady after the failover",
        Duration::from_secs(60),
    )
    .await?;
    eprintln!("part 1, case B: 120 ms tokyo ↔ frankfurt, 45 ms on the others");
    cases.push(
        visibility(
            &clients,
            relay,
            &CaseSpec {
                label: "B: 120 ms tokyo ↔ frankfurt, 45 ms on the others",
                n: N_VISIBLE,
                warmup: VISIBLE_WARMUP,
                deadline: VISIBLE_DEADLINE,
                max_failures: MAX_FAILURES,
                fatal: true,
            },
        )
        .await?,
    );
    // Extra: a real Tokyo–Frankfurt round trip (about 230–250 ms). openraft 0.9 uses the raft
    // heartbeat (400 ms here) as the deadline of every append-entries request: the round trip
    // plus a follower's fsync must fit in it.
    relay.set_path(
        NAMES[TOKYO],
        NAMES[FRANKFURT],
        PathSettings::with_rtt(RTT_OVER),
    )?;
    eprintln!("extra case C: 250 ms tokyo ↔ frankfurt, 45 ms on the others");
    cases.push(
        visibility(
            &clients,
            relay,
            &CaseSpec {
                label: "C (extra): 250 ms tokyo ↔ frankfurt, 45 ms on the others",
                n: N_OVER,
                warmup: 2,
                deadline: Duration::from_secs(3),
                max_failures: 3,
                fatal: false,
            },
        )
        .await?,
    );
    relay.set_path(
        NAMES[TOKYO],
        NAMES[FRANKFURT],
        PathSettings::with_rtt(RTT_FAR),
    )?;
    wait_steady(&clients, "steady after case C", Duration::from_secs(60)).await?;

    eprintln!("part 3: bytes on the wire (case B latencies)");
    let bytes = bytes_part(&mut cluster, &mut clients, relay).await?;
    cluster.ensure_running()?;
    for c in clients.iter_mut().filter_map(Option::take) {
        c.close().await;
    }
    let external_at_end = external_datagrams(relay);
    eprintln!("stopping the gateways");
    drop(cluster);
    Ok(Report {
        relay_echo,
        external_at_start,
        external_at_end,
        cases,
        failover,
        bytes,
    })
}

// ---------------------------------------------------------------------------------------------
// Report

fn ms(v: f64) -> String {
    ms_text(v, 2)
}

fn dms(d: Duration) -> String {
    ms(d.as_secs_f64() * 1e3)
}

fn secs(d: Duration) -> String {
    format!("{:.2} s", d.as_secs_f64())
}

fn bytes(v: f64) -> String {
    if v.is_nan() {
        "–".into()
    } else if v.abs() < 10_240.0 {
        // `+ 0.0` turns a rounded -0 into 0.
        format!("{:.0} B", v.round() + 0.0)
    } else {
        format!("{:.1} KiB", v / 1024.0)
    }
}

fn lat_row(label: &str, l: &Lat) -> String {
    format!(
        "| {label} | {} | {} | {} | {} | {} |",
        l.n,
        ms(l.p50),
        ms(l.p90),
        ms(l.max),
        ms(l.mean)
    )
}

fn dur_stats(v: impl Iterator<Item = Duration>) -> Option<Lat> {
    let mut v: Vec<Duration> = v.collect();
    lat_stats(&mut v).ok()
}

fn print_report(r: &Report, machine: &Machine, started: &str, secs_total: f64) {
    let met = |ok: bool| if ok { "**met**" } else { "**NOT met**" };
    println!("## Issue 5 — shared config and primary failover\n");
    println!(
        "Command: `cargo build --release --bin clawmesh --example bench_consensus && cargo run \
         --release --example bench_consensus` (source and method: the doc comment of \
         `examples/bench_consensus.rs`). Run of {started} ({secs_total:.0} s).\n"
    );
    println!("| machine | |");
    println!("|---|---|");
    for (k, v) in machine {
        println!("| {k} | {v} |");
    }
    let t = Timings::for_interval(Duration::from_millis(
        HEALTH_INTERVAL_MS.parse().unwrap_or(1000),
    ));
    println!(
        "| setup | gateways tokyo (configured primary), beijing, frankfurt as real processes, \
         `--health-interval {HEALTH_INTERVAL_MS}` (raft heartbeat, also openraft's \
         append-entries deadline: {} ms; election timeout {}–{} ms, per \
         `Timings::for_interval`); every gateway-to-gateway datagram through the in-process WAN \
         relay (own 1-worker runtime); benchmark client: this process, tokio `current_thread`, \
         one operator connection per gateway on loopback |",
        t.heartbeat.as_millis(),
        t.election_min.as_millis(),
        t.election_max.as_millis()
    );
    println!(
        "| gateway datagrams through the relay from or to an address that is no gateway's \
         registered socket (path settings not applied) | {} after the start, {} in all |",
        r.external_at_start, r.external_at_end
    );
    println!(
        "| relay alone (UDP echo, 100 B, n = 20) | {} |",
        r.relay_echo
            .iter()
            .map(|(rtt, l)| format!("{} ms set: p50 {}", rtt.as_millis(), ms(l.p50)))
            .collect::<Vec<_>>()
            .join("; ")
    );

    println!("\n### 1. Write visible on all three gateways\n");
    println!(
        "`config.set bench.visible` on the origin; `config.get` polled every 1 ms on each \
         gateway until it shows the value. Times from sending the write. Ack = `config.set` \
         returned (committed on a majority, applied on the leader).\n"
    );
    for c in &r.cases {
        println!("**Case {}** ({})\n", c.label, quiet_text(&c.quiet));
        println!(
            "| link | RTT set | `gateway.call health` p50 (n = {N_LINK_PROBES}) | ping median \
             (`latencyMs`, 64-ping window) |"
        );
        println!("|---|---|---|---|");
        for l in &c.links {
            println!(
                "| {} → {} | {} ms | {} | {} |",
                NAMES[l.a],
                NAMES[l.b],
                l.set.as_millis(),
                ms(l.call.p50),
                ms(l.ping_median)
            );
        }
        println!();
        println!("| write issued on | measure | n | p50 | p90 | max | mean |");
        println!("|---|---|---|---|---|---|---|");
        for s in &c.series {
            let o = NAMES[s.origin];
            let row = |what: String, l: &Option<Lat>| match l {
                Some(l) => println!("{}", lat_row(&format!("{o} | {what}"), l)),
                None => println!("| {o} | {what} | 0 | – | – | – | – |"),
            };
            row("ack".into(), &s.ack);
            for (name, l) in NAMES.iter().zip(&s.seen) {
                row(format!("visible on {name}"), l);
            }
            row("**visible on all three**".into(), &s.all);
        }
        println!(
            "\nRelay bytes during the series ({} writes in {}, heartbeats and pings included): \
             per write tokyo → beijing {}, tokyo → frankfurt {}, frankfurt → tokyo {}.",
            c.writes,
            secs(c.elapsed),
            bytes(c.bytes.dir(TOKYO, BEIJING) / c.writes.max(1) as f64),
            bytes(c.bytes.dir(TOKYO, FRANKFURT) / c.writes.max(1) as f64),
            bytes(c.bytes.dir(FRANKFURT, TOKYO) / c.writes.max(1) as f64),
        );
        if let Some(f) = &c.first_failure {
            println!(
                "\n**{} failed write(s)**{} (dropped from the samples). First: `{f}`",
                c.failures,
                if c.gave_up {
                    ", the case stopped there"
                } else {
                    ""
                }
            );
        }
        println!();
    }

    let f = &r.failover;
    println!(
        "### 2. Failover: SIGKILL of the primary (tokyo), health interval 1 s, 45 ms on every \
         path\n"
    );
    println!("({})\n", quiet_text(&f.quiet));
    println!(
        "| round | new primary (term) | shown by a survivor | both survivors agree | write \
         probes on | first successful write returned (sent at) | probe sent at the kill | \
         failed probes / sent | tokyo restart: `gateway.json` | tokyo leads again | all report \
         tokyo |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
    for (i, x) in f.rounds.iter().enumerate() {
        println!(
            "| {} | {} ({} → {}) | {} | {} | {} | {} ({}) | {} {} | {} / {} | {} | {}{} | {} |",
            i + 1,
            x.new_primary,
            x.term_before,
            x.term_after,
            secs(x.shown),
            secs(x.agreed),
            NAMES[x.writer],
            secs(x.write_ok),
            secs(x.write_ok_sent),
            secs(x.first_probe.0),
            if x.first_probe.1.is_some() {
                "failed"
            } else {
                "ok"
            },
            x.probe_errors,
            x.probes,
            secs(x.restart_ready),
            secs(x.regain),
            x.stale_until
                .map(|d| format!(" ¹ (stale until {})", secs(d)))
                .unwrap_or_default(),
            secs(x.regain_agreed),
        );
    }
    let stale = f.rounds.iter().filter(|x| x.stale_until.is_some()).count();
    let shown = f.rounds.iter().filter(|x| x.stale_primary_shown).count();
    if stale > 0 {
        println!(
            "\n¹ In {stale} of {} rounds the restarted tokyo first reported itself leader of its \
             old term (`consensus.role` \"leader\" with the term it had before the kill) until it \
             heard of the newer term; in {shown} of them its `gateway status` also named itself \
             the primary meanwhile. \"stale until\": the last status poll (every 20 ms after its \
             operator connection was up) that still showed it, from the spawn. Not counted as \
             leading again.",
            f.rounds.len()
        );
    }
    println!();
    println!(
        "| over {} rounds | n | p50 | p90 | max | mean |",
        f.rounds.len()
    );
    println!("|---|---|---|---|---|---|");
    type Get = fn(&Round) -> Duration;
    let rows: [(&str, Get); 5] = [
        ("kill → new primary shown by a survivor", |x| x.shown),
        ("kill → both survivors agree", |x| x.agreed),
        (
            "kill → first successful `config.set` on a survivor",
            |x| x.write_ok,
        ),
        ("tokyo restart → tokyo leads again", |x| x.regain),
        ("tokyo restart → all three report tokyo", |x| {
            x.regain_agreed
        }),
    ];
    for (label, get) in rows {
        if let Some(l) = dur_stats(f.rounds.iter().map(get)) {
            println!("{}", lat_row(label, &l));
        }
    }
    for (i, x) in f.rounds.iter().enumerate() {
        if let Some(e) = &x.first_probe_error {
            println!("\nRound {}: first failed probe: `{e}`", i + 1);
        }
    }
    let u = &f.under_load;
    println!(
        "\n**Hand-back under write load.** tokyo killed once more and restarted while beijing \
         writes once every {} ms for {} s ({} writes, {} failed, slowest {}): {}.\n",
        u.write_every.as_millis(),
        u.write_for.as_secs(),
        u.writes,
        u.write_errors,
        dms(u.write_max),
        match (u.regained_during, u.regained_after_stop) {
            (Some(d), _) => format!(
                "tokyo led again {} after its restart, during the writes",
                secs(d)
            ),
            (None, Some(d)) => format!(
                "tokyo did **not** take the role back while the writes went on; it led again {} \
                 after they stopped",
                secs(d)
            ),
            _ => "–".into(),
        }
    );

    let b = &r.bytes;
    println!(
        "\n### 3. Bytes on the wire (relay payload bytes; 120 ms tokyo ↔ frankfurt, 45 ms \
         on the others)\n"
    );
    println!("({})\n", quiet_text(&b.quiet));
    println!(
        "Config: {} keys (`config import`, one revision): file {}, flat `{{key: value}}` JSON {}; \
         applied on all three {} after the import started; relay bytes until then: tokyo → \
         beijing {}, tokyo → frankfurt {}; until tokyo stopped sending bulk data ({} after the \
         import started; first second under 4 KiB on both links): tokyo → beijing {}, tokyo → \
         frankfurt {}. Gateway RSS afterwards: {}.\n",
        b.keys,
        bytes(b.import_file_bytes as f64),
        bytes(b.import_flat_bytes as f64),
        secs(b.import_time),
        bytes(b.import_bytes.dir(TOKYO, BEIJING)),
        bytes(b.import_bytes.dir(TOKYO, FRANKFURT)),
        secs(b.import_quiet_time),
        bytes(b.import_quiet_bytes.dir(TOKYO, BEIJING)),
        bytes(b.import_quiet_bytes.dir(TOKYO, FRANKFURT)),
        b.gw_rss
            .iter()
            .map(|(n, kb)| format!("{n} {:.1} MB", *kb as f64 / 1024.0))
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!(
        "One-key change in that config: {N_BYTE_CHANGES} sequential `config.set` on tokyo, each \
         waited for on all three ({} in all); idle windows of {} s before and after (idle rate: the \
         smaller of the two).\n",
        secs(b.changes_time),
        IDLE_WINDOW.as_secs()
    );
    println!(
        "| direction | idle before | idle after | idle rate | during the changes | during the \
         changes / {N_BYTE_CHANGES} (upper bound: idle traffic included) | per change (minus \
         idle) |"
    );
    println!("|---|---|---|---|---|---|---|");
    let n = N_BYTE_CHANGES as f64;
    for (k, (from, to)) in DIRECTIONS.iter().enumerate() {
        println!(
            "| {} → {} | {} | {} | {}/s | {} | {} | **{}** |",
            NAMES[*from],
            NAMES[*to],
            bytes(b.idle_windows.0 .0[k]),
            bytes(b.idle_windows.1 .0[k]),
            bytes(b.idle_rate.0[k]),
            bytes(b.changes_raw.0[k]),
            bytes(b.changes_raw.0[k] / n),
            bytes(b.per_change.0[k])
        );
    }
    println!(
        "\nPer change and follower link, both directions: tokyo ↔ beijing **{}** (upper bound {}), \
         tokyo ↔ frankfurt **{}** (upper bound {}), beijing ↔ frankfurt {}. The change itself as \
         JSON (`{{\"key\":…,\"value\":…}}`): {}.\n",
        bytes(b.per_change.pair(TOKYO, BEIJING)),
        bytes(b.changes_raw.pair(TOKYO, BEIJING) / n),
        bytes(b.per_change.pair(TOKYO, FRANKFURT)),
        bytes(b.changes_raw.pair(TOKYO, FRANKFURT) / n),
        bytes(b.per_change.pair(BEIJING, FRANKFURT)),
        bytes(b.change_json as f64)
    );
    let (r0, r1) = b.catchup_revisions;
    println!(
        "Catch-up: frankfurt stopped (SIGTERM); {N_CATCHUP} one-key changes on tokyo \
         ({CATCHUP_IN_FLIGHT} in flight: {}; relay bytes meanwhile tokyo → beijing {} = {} per \
         change, tokyo → frankfurt {} while frankfurt was down); raw JSON of the changes \
         (`{{key: value}}`, {} distinct keys) {}. Frankfurt restarted {} revisions behind \
         (revision {r0} → {r1}).\n",
        secs(b.catchup_write_time),
        bytes(b.catchup_during_writes.dir(TOKYO, BEIJING)),
        bytes(b.catchup_during_writes.dir(TOKYO, BEIJING) / N_CATCHUP as f64),
        bytes(b.catchup_during_writes.dir(TOKYO, FRANKFURT)),
        b.catchup_keys,
        bytes(b.catchup_raw_json as f64),
        r1 - r0
    );
    println!(
        "| restart of frankfurt | `gateway.json` after | window | tokyo → frankfurt | frankfurt → \
         tokyo | beijing ↔ frankfurt | all six directions |"
    );
    println!("|---|---|---|---|---|---|---|");
    let row = |label: &str, ready: Duration, window: String, x: &Bytes| {
        println!(
            "| {label} | {} | {window} | {} | {} | {} | {} |",
            secs(ready),
            bytes(x.dir(TOKYO, FRANKFURT)),
            bytes(x.dir(FRANKFURT, TOKYO)),
            bytes(x.pair(BEIJING, FRANKFURT)),
            bytes(x.0.iter().sum())
        );
    };
    row(
        "after missing 1 000 changes, until caught up",
        b.catchup_ready,
        format!("spawn → caught up: **{}**", secs(b.catchup_time)),
        &b.catchup_bytes,
    );
    row(
        "baseline: nothing missed",
        b.baseline_ready,
        format!("same {} from the spawn", secs(b.catchup_time)),
        &b.baseline_bytes,
    );
    let extra = b.catchup_bytes.minus(&b.baseline_bytes);
    println!(
        "| difference (the catch-up itself) | | | {} | {} | {} | {} |",
        bytes(extra.dir(TOKYO, FRANKFURT)),
        bytes(extra.dir(FRANKFURT, TOKYO)),
        bytes(extra.pair(BEIJING, FRANKFURT)),
        bytes(extra.0.iter().sum())
    );

    println!("\n### Goals\n");
    println!("| goal | result | |");
    println!("|---|---|---|");
    for c in &r.cases {
        let budget = c.largest_set + 50.0;
        let measured = c.links.iter().map(|l| l.call.p50).fold(0.0, f64::max);
        for s in &c.series {
            let Some(all) = &s.all else {
                println!(
                    "| case {}: write on {} visible on all ≤ largest RTT + 50 ms = {budget:.0} ms \
                     | no write visible everywhere | **NOT met** |",
                    c.label.split(':').next().unwrap_or("?"),
                    NAMES[s.origin]
                );
                continue;
            };
            println!(
                "| case {}: write on {} visible on all ≤ largest RTT ({:.0} ms set, {} measured) \
                 + 50 ms = {budget:.0} ms | p50 {}, p90 {}, max {} | p50 {}, p90 {} |",
                c.label.split(':').next().unwrap_or("?"),
                NAMES[s.origin],
                c.largest_set,
                ms(measured),
                ms(all.p50),
                ms(all.p90),
                ms(all.max),
                met(all.p50 <= budget),
                met(all.p90 <= budget)
            );
        }
    }
    let max_shown = f.rounds.iter().map(|x| x.shown).max().unwrap_or_default();
    let max_write = f
        .rounds
        .iter()
        .map(|x| x.write_ok)
        .max()
        .unwrap_or_default();
    println!(
        "| failover (1 s health interval): new primary < 3 s | max {} over {} rounds | {} |",
        secs(max_shown),
        f.rounds.len(),
        met(max_shown < Duration::from_secs(3))
    );
    println!(
        "| failover: a `config.set` on a survivor succeeds < 3 s after the kill | max {} | {} |",
        secs(max_write),
        met(max_write < Duration::from_secs(3))
    );
    for fo in [BEIJING, FRANKFURT] {
        let v = b.per_change.pair(TOKYO, fo);
        println!(
            "| one-key change in a {}-key config < 1 KiB per follower (tokyo ↔ {}, both \
             directions) | {} (tokyo → {} {}) | {} |",
            b.keys,
            NAMES[fo],
            bytes(v),
            NAMES[fo],
            bytes(b.per_change.dir(TOKYO, fo)),
            met(v < 1024.0)
        );
    }
    println!(
        "| catch-up after 1 000 changes (no goal set) | {} and {} tokyo → frankfurt ({} beyond \
         the plain reconnect) for {} of raw JSON | |",
        secs(b.catchup_time),
        bytes(b.catchup_bytes.dir(TOKYO, FRANKFURT)),
        bytes(extra.dir(TOKYO, FRANKFURT)),
        bytes(b.catchup_raw_json as f64)
    );
}

// ---------------------------------------------------------------------------------------------

fn main() -> Result<()> {
    relay_bench_main(
        |bin, root, relay| run_with_relay(bin, root, relay).boxed_local(),
        print_report,
    )
}
