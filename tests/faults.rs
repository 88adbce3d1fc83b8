//! Faults in the rare orders of events (issue 11), with real gateway processes behind the UDP
//! delay relay:
//!
//! - a voter frozen (SIGSTOP) for 3.5 s and resumed does not start a new term while the
//!   primary is healthy: no flapping;
//! - the failover race: a node notices its gateway's death before the other gateways do
//!   (the gateway is frozen, so the node's own pings miss first) and moves; every gateway lists
//!   it once, at its new gateway, and invokes reach it from everywhere, while the old gateway
//!   is frozen, after it is declared offline, and after it comes back;
//! - a Jepsen-style fault schedule: a seeded random sequence of SIGKILL and restart,
//!   SIGSTOP/SIGCONT, partitions (one gateway cut off, or one direction between two cut),
//!   node restarts, with config writes and invokes in between;
//!   after each step heals, the invariants of the federation are checked (see
//!   [`check_invariants`]). A failure prints the seed and the schedule; replay with
//!   `CLAWMESH_FAULT_SEED=<seed> CLAWMESH_FAULT_STEPS=<n> cargo test --test faults schedule`.
//!   The short schedule runs in the suite; `fault_schedule_long` (500 steps) runs on demand
//!   (`cargo test --release --test faults fault_schedule_long -- --ignored --nocapture`).
//!
//! The tests of this file run one at a time (each starts several gateways).

mod common;

#[path = "common/faults.rs"]
mod faults;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde_json::Value;

use faults::*;

static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

/// The term `dir`'s gateway is in.
fn term(dir: &std::path::Path) -> Option<u64> {
    consensus(dir)["term"].as_u64()
}

#[test]
fn a_stalled_voter_does_not_depose_a_healthy_primary() {
    let _serial = serial();
    let mut c = Cluster::start(3, 300);
    let tokyo = c.dir(0).to_path_buf();
    assert_eq!(primary(&tokyo).as_deref(), Some("tokyo"), "{}", c.report());
    let before = term(&tokyo).expect("tokyo answers");
    let mut samples = Vec::new();
    for round in 0..3 {
        // Beijing twice, then Frankfurt: either follower may be the one that stalls.
        let victim = if round < 2 { 1 } else { 2 };
        c.pause(victim);
        let paused = Instant::now();
        while paused.elapsed() < Duration::from_millis(3500) {
            samples.push(primary(&tokyo));
            std::thread::sleep(Duration::from_millis(300));
        }
        c.resume(victim);
        let back = common::wait_until(Duration::from_secs(20), || {
            samples.push(primary(&tokyo));
            c.converged()
        });
        assert!(back, "round {round}: no convergence: {}", c.report());
        for i in 0..3 {
            assert_eq!(
                term(c.dir(i)),
                Some(before),
                "round {round}: {} moved to another term after {} stalled: {}",
                c.name(i),
                c.name(victim),
                c.report()
            );
        }
    }
    let answered: Vec<&String> = samples.iter().flatten().collect();
    assert!(!answered.is_empty());
    let others: Vec<&&String> = answered.iter().filter(|p| p.as_str() != "tokyo").collect();
    assert!(
        others.is_empty(),
        "tokyo was not the primary in {} of {} samples: {others:?}",
        others.len(),
        answered.len()
    );
}

/// Every answering gateway lists `name` once, connected, at `at`, and reaches it.
fn listed_once_at(c: &Cluster, name: &str, at: &str) -> Result<(), String> {
    for i in c.answering() {
        let rows = listed_at(c.dir(i), name);
        if rows != vec![(at.to_string(), true)] {
            return Err(format!("{} lists {name} as {rows:?}", c.name(i)));
        }
        let out = common::nodes_invoke(c.dir(i), name, "system.which", r#"{"bins":["sh"]}"#, &[]);
        if !out.status.success() {
            return Err(format!(
                "invoke {name} from {}: {}",
                c.name(i),
                String::from_utf8_lossy(&out.stderr)
            ));
        }
    }
    Ok(())
}

#[test]
fn a_node_that_moves_first_is_listed_at_its_new_gateway_everywhere() {
    let _serial = serial();
    let mut c = Cluster::start(3, 300);
    // The node prefers beijing (second in member order), then frankfurt (third): a resolver
    // taking the first claim in member order keeps beijing's.
    let urls = vec![
        format!("quic://{}", c.public(1)),
        format!("quic://{}", c.public(2)),
    ];
    let mut node = NodeProc::start(c.tmp.path(), "fra-box", urls);
    assert!(approve_anywhere(&c, "fra-box"), "{}", node.log_tail());
    let mut last = String::new();
    let ok = common::wait_until(Duration::from_secs(20), || {
        listed_once_at(&c, "fra-box", "beijing")
            .map_err(|e| last = e)
            .is_ok()
    });
    assert!(ok, "not attached to beijing: {last}\n{}", node.log_tail());

    for round in 0..2 {
        // Freeze beijing: the node's pings (every half interval, two misses) notice before
        // the gateways' (threshold 3); beijing's last announcement still claims the node.
        c.pause(1);
        let ok = common::wait_until(Duration::from_secs(20), || {
            listed_once_at(&c, "fra-box", "frankfurt")
                .map_err(|e| last = e)
                .is_ok()
        });
        assert!(
            ok,
            "round {round}, beijing frozen: {last}\n{}\n{}",
            c.report(),
            node.log_tail()
        );
        // Still right once beijing is declared offline (its claim is the stale one).
        let offline = common::wait_until(Duration::from_secs(20), || {
            common::status(c.dir(0))
                .and_then(|d| common::row(&d, "beijing").map(|g| g["status"] == "offline"))
                .unwrap_or(false)
        });
        assert!(offline, "beijing never offline: {}", c.report());
        if let Err(e) = listed_once_at(&c, "fra-box", "frankfurt") {
            panic!("round {round}, beijing offline: {e}\n{}", c.report());
        }
        // And after beijing comes back (its own stale session must not win there either).
        c.resume(1);
        let ok = common::wait_until(Duration::from_secs(20), || {
            c.converged()
                && listed_once_at(&c, "fra-box", "frankfurt")
                    .map_err(|e| last = e)
                    .is_ok()
        });
        assert!(ok, "round {round}, beijing back: {last}\n{}", c.report());
        // Move the node back to beijing for the next round: restart it (it prefers beijing).
        node.kill9();
        node.spawn();
        let ok = common::wait_until(Duration::from_secs(20), || {
            listed_once_at(&c, "fra-box", "beijing")
                .map_err(|e| last = e)
                .is_ok()
        });
        assert!(
            ok,
            "round {round}: not back on beijing: {last}\n{}",
            node.log_tail()
        );
    }
    // SIGKILL this time: beijing never says goodbye, and never comes back.
    c.kill9(1);
    let ok = common::wait_until(Duration::from_secs(20), || {
        listed_once_at(&c, "fra-box", "frankfurt")
            .map_err(|e| last = e)
            .is_ok()
    });
    assert!(ok, "beijing killed: {last}\n{}", c.report());
}

/// splitmix64: a seeded, replayable sequence (the schedule must not depend on a crate's
/// generator changing between versions).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// One fault of a schedule; every fault heals before the step ends.
#[derive(Debug, Clone)]
enum Fault {
    /// SIGKILL gateway `gw`, wait `down_ms`, start it again (same state dir and port).
    KillRestart { gw: usize, down_ms: u64 },
    /// SIGSTOP gateway `gw` for `ms`, then SIGCONT.
    Pause { gw: usize, ms: u64 },
    /// Cut gateway `gw` off from the others (both directions) for `ms`.
    Isolate { gw: usize, ms: u64 },
    /// SIGKILL node `node`, start it again after `down_ms`.
    NodeRestart { node: usize, down_ms: u64 },
    /// Drop everything gateway `from` sends to gateway `to` for `ms`; the other way flows.
    OneWay { from: usize, to: usize, ms: u64 },
}

/// A step: a fault, and `writes` config writes issued while it lasts.
#[derive(Debug, Clone)]
struct Step {
    fault: Fault,
    writes: u64,
}

fn schedule(seed: u64, steps: usize, gateways: usize, nodes: usize) -> Vec<Step> {
    let mut r = Rng(seed);
    (0..steps)
        .map(|_| {
            let gw = r.below(gateways as u64) as usize;
            let fault = match r.below(5) {
                0 => Fault::KillRestart {
                    gw,
                    down_ms: 500 + r.below(2500),
                },
                1 => Fault::Pause {
                    gw,
                    ms: 500 + r.below(3500),
                },
                2 => Fault::Isolate {
                    gw,
                    ms: 1000 + r.below(3000),
                },
                3 => Fault::OneWay {
                    from: gw,
                    to: (gw + 1 + r.below(gateways as u64 - 1) as usize) % gateways,
                    ms: 1000 + r.below(3000),
                },
                _ => Fault::NodeRestart {
                    node: r.below(nodes as u64) as usize,
                    down_ms: r.below(1500),
                },
            };
            Step {
                fault,
                writes: 1 + r.below(3),
            }
        })
        .collect()
}

/// What the run observed, for the invariants.
#[derive(Default)]
struct Observed {
    /// Acknowledged writes: key → (value, revision).
    acked: BTreeMap<String, (String, u64)>,
    /// Every (term → primary) any gateway reported.
    primaries: BTreeMap<u64, BTreeSet<String>>,
    writes_refused: u64,
}

impl Observed {
    fn sample_terms(&mut self, c: &Cluster) {
        for i in c.answering() {
            if let Some(doc) = common::status(c.dir(i)) {
                if let (Some(t), Some(p)) =
                    (doc["consensus"]["term"].as_u64(), doc["primary"].as_str())
                {
                    self.primaries.entry(t).or_default().insert(p.to_string());
                }
            }
        }
    }

    fn write(&mut self, c: &Cluster, r: &mut Rng, n: u64) {
        let up = c.answering();
        if up.is_empty() {
            return;
        }
        let at = up[r.below(up.len() as u64) as usize];
        let key = format!("fault.k{n}");
        let value = format!("{}", r.next() % 1_000_000);
        match config_set(c.dir(at), &key, &value) {
            Ok(rev) => {
                self.acked.insert(key, (value, rev));
            }
            Err(_) => self.writes_refused += 1,
        }
    }
}

/// The shared config applied on `dir`: key → (JSON value, revision).
fn shared(dir: &std::path::Path) -> Option<BTreeMap<String, (Value, u64)>> {
    let out = common::cli(dir, &["config", "show", "--json"]);
    let v: Value = serde_json::from_slice(&out.stdout).ok()?;
    Some(
        v["entries"]
            .as_array()?
            .iter()
            .filter_map(|e| {
                Some((
                    e["key"].as_str()?.to_string(),
                    (e["value"].clone(), e["revision"].as_u64()?),
                ))
            })
            .collect(),
    )
}

/// The paired device ids `dir` knows.
fn paired(dir: &std::path::Path) -> Option<BTreeSet<String>> {
    let out = common::cli(dir, &["devices", "list", "--json"]);
    let v: Value = serde_json::from_slice(&out.stdout).ok()?;
    Some(
        v["paired"]
            .as_array()?
            .iter()
            .filter_map(|p| p["deviceId"].as_str().map(str::to_string))
            .collect(),
    )
}

/// The gateway each node is attached to, by the gateways' own (local) registries: `None` for
/// a node no gateway or more than one gateway holds.
fn real_gateways(c: &Cluster, nodes: &[NodeProc]) -> Vec<Option<String>> {
    let mut holders: Vec<Vec<String>> = vec![Vec::new(); nodes.len()];
    for i in c.answering() {
        for row in node_rows(c.dir(i), false).unwrap_or_default() {
            // Held here: connected, and at this gateway (a listing may show nodes held
            // elsewhere too).
            if row["connected"] != true || row["gateway"] != c.name(i) {
                continue;
            }
            if let Some(k) = nodes.iter().position(|n| row["name"] == n.name.as_str()) {
                holders[k].push(c.name(i).to_string());
            }
        }
    }
    holders
        .into_iter()
        .map(|h| {
            if h.len() == 1 {
                h.into_iter().next()
            } else {
                None
            }
        })
        .collect()
}

/// Invariant 1, also checked while a gateway is down or frozen (the nodes it held must move and
/// be found at their new gateway by every gateway that answers): every live node is listed
/// once, at its real gateway, connected, on every answering gateway, and invokable from each.
fn check_nodes(c: &Cluster, nodes: &[NodeProc], within: Duration) -> Result<(), String> {
    let mut last = String::new();
    let ok = common::wait_until(within, || {
        let real = real_gateways(c, nodes);
        for (k, n) in nodes.iter().enumerate() {
            let Some(at) = &real[k] else {
                let rows: Vec<_> = c
                    .answering()
                    .iter()
                    .map(|i| (c.name(*i), node_rows(c.dir(*i), false)))
                    .collect();
                last = format!("{} is held by no gateway or by several: {rows:?}", n.name);
                return false;
            };
            for i in c.answering() {
                let rows = node_rows(c.dir(i), true).unwrap_or_default();
                let mine: Vec<&Value> = rows
                    .iter()
                    .filter(|r| r["name"] == n.name.as_str())
                    .collect();
                if mine.len() != 1
                    || mine[0]["gateway"] != at.as_str()
                    || mine[0]["connected"] != true
                {
                    last = format!(
                        "{} lists {} as {mine:?}; it is attached to {at}",
                        c.name(i),
                        n.name
                    );
                    return false;
                }
            }
        }
        true
    });
    if !ok {
        return Err(format!("node listing: {last}"));
    }
    for n in nodes {
        for i in c.answering() {
            let ok = common::wait_until(within, || {
                let out = common::nodes_invoke(
                    c.dir(i),
                    &n.name,
                    "system.which",
                    r#"{"bins":["sh"]}"#,
                    &[],
                );
                last = String::from_utf8_lossy(&out.stderr).to_string();
                out.status.success()
            });
            if !ok {
                return Err(format!("invoke {} from {}: {last}", n.name, c.name(i)));
            }
        }
    }
    Ok(())
}

/// The invariants after a step heals, each waited for up to `within` (convergence takes a
/// few health intervals; a bound, not a timing assertion):
///
/// 1. every live node is listed once, at its real gateway, connected, on every gateway, and
///    invokable from every gateway;
/// 2. every acknowledged config write is on every gateway with its value, and all gateways
///    reach the same revision;
/// 3. no term ever had two primaries, and no two acknowledged writes share a revision;
/// 4. every gateway has the same paired devices.
fn check_invariants(
    c: &Cluster,
    nodes: &[NodeProc],
    obs: &Observed,
    within: Duration,
) -> Result<(), String> {
    let mut last = String::new();
    if !common::wait_until(within, || c.converged()) {
        return Err("the gateways did not converge (health, one primary)".into());
    }
    // 1. Nodes.
    check_nodes(c, nodes, within)?;
    // 2. Config.
    let ok = common::wait_until(within, || {
        let views: Vec<_> = c.answering().iter().map(|i| shared(c.dir(*i))).collect();
        let Some(Some(first)) = views.first().cloned() else {
            return false;
        };
        for (k, (v, rev)) in &obs.acked {
            match first.get(k) {
                // `config set` parses the value as JSON when it can.
                Some((got, r))
                    if *got == serde_json::from_str(v).unwrap_or(Value::String(v.clone())) =>
                {
                    if r != rev {
                        last = format!("{k} acknowledged at revision {rev}, applied at {r}");
                        return false;
                    }
                }
                other => {
                    last = format!("acknowledged {k}={v} (revision {rev}) is {other:?}");
                    return false;
                }
            }
        }
        let revisions: BTreeSet<u64> = c
            .answering()
            .iter()
            .filter_map(|i| consensus(c.dir(*i))["applied"].as_u64())
            .collect();
        if revisions.len() != 1 {
            last = format!("revisions differ: {revisions:?}");
            return false;
        }
        views.iter().all(|v| v.as_ref() == Some(&first))
    });
    if !ok {
        return Err(format!("config: {last}"));
    }
    // 3. One primary per term, one write per revision.
    for (t, p) in &obs.primaries {
        if p.len() > 1 {
            return Err(format!("term {t} had several primaries: {p:?}"));
        }
    }
    let mut by_rev: BTreeMap<u64, &String> = BTreeMap::new();
    for (k, (_, rev)) in &obs.acked {
        if let Some(other) = by_rev.insert(*rev, k) {
            return Err(format!(
                "{k} and {other} were both acknowledged at revision {rev}"
            ));
        }
    }
    // 4. Pairing.
    let ok = common::wait_until(within, || {
        let sets: BTreeSet<_> = c.answering().iter().map(|i| paired(c.dir(*i))).collect();
        last = format!("{sets:?}");
        sets.len() == 1 && !sets.contains(&None)
    });
    if !ok {
        return Err(format!("pairing differs: {last}"));
    }
    Ok(())
}

/// Runs a schedule of `steps` steps from `seed` on `gateways` gateways and two nodes.
fn run_schedule(seed: u64, steps: usize, gateways: usize) {
    let plan = schedule(seed, steps, gateways, 2);
    let replay = format!(
        "replay: CLAWMESH_FAULT_SEED={seed} CLAWMESH_FAULT_STEPS={steps} (gateways {gateways})\nschedule:\n{}",
        plan.iter()
            .enumerate()
            .map(|(i, s)| format!("  {i:3}: {s:?}"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    eprintln!("fault schedule, seed {seed}, {steps} steps");
    let mut c = Cluster::start(gateways, 300);
    let urls: Vec<String> = (0..gateways)
        .map(|i| format!("quic://{}", c.public(i)))
        .collect();
    // Node A prefers the first gateway, node B the last; both know every gateway.
    let mut rev = urls.clone();
    rev.reverse();
    let mut nodes = vec![
        NodeProc::start(c.tmp.path(), "node-a", urls.clone()),
        NodeProc::start(c.tmp.path(), "node-b", rev),
    ];
    for n in &nodes {
        assert!(
            approve_anywhere(&c, &n.name),
            "{} never asked to pair: {}",
            n.name,
            n.log_tail()
        );
    }
    let within = Duration::from_secs(30);
    let mut obs = Observed::default();
    let mut r = Rng(seed ^ 0x5eed);
    let mut n_write = 0;
    let node_logs = |nodes: &[NodeProc]| -> String {
        nodes
            .iter()
            .map(|n| format!("\n--- {}\n{}", n.name, n.log_tail()))
            .collect()
    };
    if let Err(e) = check_invariants(&c, &nodes, &obs, within) {
        panic!(
            "before any fault: {e}\n{replay}\n{}{}",
            c.report(),
            node_logs(&nodes)
        );
    }
    let started = Instant::now();
    for (i, step) in plan.iter().enumerate() {
        eprintln!("step {i}: {step:?}");
        let mut writes = |c: &Cluster, obs: &mut Observed| {
            for _ in 0..step.writes {
                n_write += 1;
                obs.write(c, &mut r, n_write);
            }
        };
        let mut during = Ok(());
        match step.fault {
            Fault::KillRestart { gw, down_ms } => {
                c.kill9(gw);
                writes(&c, &mut obs);
                during = check_nodes(&c, &nodes, within);
                std::thread::sleep(Duration::from_millis(down_ms));
                c.spawn(gw);
            }
            Fault::Pause { gw, ms } => {
                c.pause(gw);
                let t = Instant::now();
                writes(&c, &mut obs);
                during = check_nodes(&c, &nodes, within);
                std::thread::sleep(Duration::from_millis(ms).saturating_sub(t.elapsed()));
                c.resume(gw);
            }
            Fault::Isolate { gw, ms } => {
                c.isolate(gw, true);
                let t = Instant::now();
                writes(&c, &mut obs);
                obs.sample_terms(&c);
                std::thread::sleep(Duration::from_millis(ms).saturating_sub(t.elapsed()));
                c.isolate(gw, false);
            }
            Fault::OneWay { from, to, ms } => {
                c.relay.cut_one_way(c.name(from), c.name(to), true).unwrap();
                let t = Instant::now();
                writes(&c, &mut obs);
                obs.sample_terms(&c);
                std::thread::sleep(Duration::from_millis(ms).saturating_sub(t.elapsed()));
                c.relay
                    .cut_one_way(c.name(from), c.name(to), false)
                    .unwrap();
            }
            Fault::NodeRestart { node, down_ms } => {
                nodes[node].kill9();
                writes(&c, &mut obs);
                std::thread::sleep(Duration::from_millis(down_ms));
                nodes[node].spawn();
            }
        }
        obs.sample_terms(&c);
        if let Err(e) = during {
            panic!(
                "during step {i} ({step:?}): {e}\n{replay}\n{}{}",
                c.report(),
                node_logs(&nodes)
            );
        }
        if let Err(e) = check_invariants(&c, &nodes, &obs, within) {
            panic!(
                "after step {i} ({step:?}): {e}\n{replay}\n{}{}",
                c.report(),
                node_logs(&nodes)
            );
        }
        obs.sample_terms(&c);
    }
    eprintln!(
        "fault schedule passed: seed {seed}, {steps} steps in {:.0?}, {} writes acknowledged, {} refused, terms seen: {}",
        started.elapsed(),
        obs.acked.len(),
        obs.writes_refused,
        obs.primaries.len()
    );
}

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.trim().parse().ok())
}

/// The short schedule of the suite: a new seed each run (printed), or the replayed one.
#[test]
fn fault_schedule_short() {
    let _serial = serial();
    let seed = env_u64("CLAWMESH_FAULT_SEED").unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1)
    });
    let steps = env_u64("CLAWMESH_FAULT_STEPS").unwrap_or(4) as usize;
    run_schedule(seed, steps, 3);
}

/// The long schedule, on demand: 500 steps on five gateways.
#[test]
#[ignore]
fn fault_schedule_long() {
    let _serial = serial();
    let seed = env_u64("CLAWMESH_FAULT_SEED").unwrap_or(11);
    let steps = env_u64("CLAWMESH_FAULT_STEPS").unwrap_or(500) as usize;
    let gateways = env_u64("CLAWMESH_FAULT_GATEWAYS").unwrap_or(5) as usize;
    run_schedule(seed, steps, gateways);
}
