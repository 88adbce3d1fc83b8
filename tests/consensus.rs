//! The shared config and primary failover (issue 5), over real QUIC between real gateway
//! processes, most of them behind the UDP delay relay:
//!
//! - the primary SIGKILLed during a stream of writes, several rounds: every acknowledged write
//!   is on every gateway afterwards, and no two acknowledged writes share a revision;
//! - a partition isolating the primary: the minority refuses writes saying why, the majority
//!   elects and accepts, the data plane keeps answering, and after healing all converge and
//!   the preferred primary takes its role back;
//! - `gateway promote --force` when the majority is gone for good;
//! - a remote offline during 1 000 changes catches up (by deltas when it is a little behind,
//!   by a snapshot when the log it needs was compacted);
//! - `gateway.sync.*`: overrideLocal both ways, a section not synced, `config show --effective`;
//! - corrupt or truncated state files: a clear error, nothing reset.
//!
//! The tests of this file run one at a time (they each start three gateways; on a small CI
//! machine running them together would measure the machine, not the protocol).

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clawmesh::sim::relay::{PathSettings, WanRelay};
use common::*;
use serde_json::Value;

static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

const NAMES: [&str; 3] = ["tokyo", "beijing", "frankfurt"];

/// Three gateways, optionally behind the relay, each on a fixed port (so a restarted one
/// comes back where the others look for it).
struct Fed {
    tmp: tempfile::TempDir,
    dirs: Vec<PathBuf>,
    ports: Vec<u16>,
    adv: Vec<Option<String>>,
    gws: Vec<Option<Gw>>,
    interval: String,
    join: String,
}

impl Fed {
    fn start(interval_ms: u64) -> Fed {
        Self::start_with(interval_ms, [None, None, None])
    }

    /// Three gateways on loopback, each with its own `clawmesh.json` if given.
    fn start_with(interval_ms: u64, configs: [Option<&str>; 3]) -> Fed {
        let tmp = tempfile::tempdir().unwrap();
        let dirs: Vec<PathBuf> = NAMES.iter().map(|n| tmp.path().join(n)).collect();
        let ports: Vec<u16> = (0..3).map(|_| free_udp_port()).collect();
        for (i, c) in configs.iter().enumerate() {
            std::fs::create_dir_all(&dirs[i]).unwrap();
            if let Some(c) = c {
                std::fs::write(dirs[i].join("clawmesh.json"), c).unwrap();
            }
        }
        let join = format!("quic://127.0.0.1:{}", ports[0]);
        let mut fed = Fed {
            tmp,
            dirs,
            ports,
            adv: vec![None, None, None],
            gws: vec![None, None, None],
            interval: interval_ms.to_string(),
            join,
        };
        for i in 0..3 {
            fed.spawn(i);
        }
        fed.wait_formed();
        fed
    }

    fn spawn(&mut self, i: usize) {
        let port = self.ports[i].to_string();
        let mut args = vec![
            "gateway",
            "run",
            "--name",
            NAMES[i],
            "--port",
            &port,
            "--token",
            "fed-token",
            "--health-interval",
            &self.interval,
        ];
        if let Some(a) = &self.adv[i] {
            args.extend(["--advertise", a.as_str()]);
        }
        if i == 0 {
            args.push("--primary");
        } else {
            args.extend(["--join", self.join.as_str()]);
        }
        let mut g = Gw::spawn_cmd(&self.dirs[i], &args);
        g.wait_ready();
        self.gws[i] = Some(g);
    }

    fn kill9(&mut self, i: usize) {
        if let Some(mut g) = self.gws[i].take() {
            g.kill9();
        }
    }

    fn term(&mut self, i: usize) {
        if let Some(mut g) = self.gws[i].take() {
            g.term();
        }
    }

    fn dir(&self, i: usize) -> &Path {
        &self.dirs[i]
    }

    fn alive(&self) -> Vec<usize> {
        (0..3).filter(|i| self.gws[*i].is_some()).collect()
    }

    /// Waits until every running gateway sees the others healthy, all three are voters and
    /// one primary is agreed on.
    fn wait_formed(&self) {
        let ok = wait_until(Duration::from_secs(30), || {
            let mut primaries = Vec::new();
            for i in self.alive() {
                let Some(doc) = status(self.dir(i)) else {
                    return false;
                };
                if self.alive().len() == 3 && !sees_healthy(self.dir(i), &NAMES) {
                    return false;
                }
                if doc["consensus"]["voters"].as_array().map(Vec::len) != Some(3) {
                    return false;
                }
                primaries.push(doc["primary"].clone());
            }
            primaries[0].is_string() && primaries.iter().all(|p| *p == primaries[0])
        });
        assert!(ok, "federation did not form: {}", self.report());
    }

    fn report(&self) -> String {
        let mut out = String::new();
        for (i, name) in NAMES.iter().enumerate() {
            out.push_str(&format!(
                "\n--- {name}: {:?}\n",
                status(self.dir(i)).map(|d| d["consensus"].clone())
            ));
            out.push_str(&log_tail(self.dir(i), 25));
        }
        out
    }
}

impl Drop for Fed {
    fn drop(&mut self) {
        for g in self.gws.iter_mut() {
            if let Some(mut g) = g.take() {
                g.kill9();
            }
        }
        let _ = &self.tmp;
    }
}

fn primary(dir: &Path) -> Option<String> {
    status(dir).and_then(|d| d["primary"].as_str().map(str::to_string))
}

fn consensus(dir: &Path) -> Value {
    status(dir)
        .map(|d| d["consensus"].clone())
        .unwrap_or(Value::Null)
}

fn applied(dir: &Path) -> u64 {
    consensus(dir)["applied"].as_u64().unwrap_or(0)
}

/// `config set KEY VALUE --json` on `dir`: the revision, or stderr.
fn set(dir: &Path, key: &str, value: &str) -> Result<u64, String> {
    let out = cli(dir, &["config", "set", key, value, "--json"]);
    if out.status.success() {
        let v: Value = serde_json::from_slice(&out.stdout).map_err(|e| e.to_string())?;
        v["revision"].as_u64().ok_or_else(|| v.to_string())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).to_string())
    }
}

/// The shared config applied on `dir`: key → (value, revision).
fn shared(dir: &Path) -> BTreeMap<String, (Value, u64)> {
    let v = cli_json(dir, &["config", "show", "--json"]);
    v["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["key"].as_str().unwrap().to_string(),
                (e["value"].clone(), e["revision"].as_u64().unwrap()),
            )
        })
        .collect()
}

fn relay_with(rt: &tokio::runtime::Runtime, rtts: [(usize, usize, u64); 3]) -> WanRelay {
    let relay = rt.block_on(WanRelay::start()).unwrap();
    for n in NAMES {
        rt.block_on(relay.add_site(n, None)).unwrap();
    }
    for (a, b, ms) in rtts {
        relay
            .set_path(
                NAMES[a],
                NAMES[b],
                PathSettings::with_rtt(Duration::from_millis(ms)),
            )
            .unwrap();
    }
    relay
}

/// Three gateways behind `relay` (whose sites and paths exist already): each advertises its
/// site's public address, so every gateway-to-gateway datagram crosses the relay.
fn start_behind(relay: &WanRelay, interval: u64) -> Fed {
    let tmp = tempfile::tempdir().unwrap();
    let dirs: Vec<PathBuf> = NAMES.iter().map(|n| tmp.path().join(n)).collect();
    let ports: Vec<u16> = (0..3).map(|_| free_udp_port()).collect();
    let mut adv = vec![None, None, None];
    for (i, n) in NAMES.iter().enumerate() {
        relay
            .set_target(n, format!("127.0.0.1:{}", ports[i]).parse().unwrap())
            .unwrap();
        adv[i] = Some(relay.public_addr(n).unwrap().to_string());
    }
    let join = format!("quic://{}", adv[0].clone().unwrap());
    let mut fed = Fed {
        tmp,
        dirs,
        ports,
        adv,
        gws: vec![None, None, None],
        interval: interval.to_string(),
        join,
    };
    for i in 0..3 {
        fed.spawn(i);
    }
    fed.wait_formed();
    fed
}

#[test]
fn acknowledged_writes_survive_primary_kills() {
    let _serial = serial();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let relay = relay_with(&rt, [(0, 1, 20), (0, 2, 40), (1, 2, 50)]);
    let fed = Arc::new(Mutex::new(start_behind(&relay, 400)));
    let dirs: Vec<PathBuf> = fed.lock().unwrap().dirs.clone();
    let alive: Arc<Mutex<[bool; 3]>> = Arc::new(Mutex::new([true; 3]));
    let acked: Arc<Mutex<Vec<(String, u64, u64)>>> = Arc::new(Mutex::new(Vec::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let errors: Arc<Mutex<Vec<String>>> = Arc::new(Mutex::new(Vec::new()));
    let writer = {
        let (alive, acked, stop, dirs) = (alive.clone(), acked.clone(), stop.clone(), dirs.clone());
        let errors = errors.clone();
        std::thread::spawn(move || {
            let mut n: u64 = 0;
            let mut failures = 0u64;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                let up: Vec<usize> = {
                    let a = alive.lock().unwrap();
                    (0..3).filter(|i| a[*i]).collect()
                };
                let target = up[(n as usize) % up.len()];
                let key = format!("stream.k{n}");
                match set(&dirs[target], &key, &n.to_string()) {
                    Ok(rev) => acked.lock().unwrap().push((key, n, rev)),
                    Err(e) => {
                        failures += 1;
                        errors.lock().unwrap().push(format!(
                            "{:?} {}: {e}",
                            Instant::now(),
                            NAMES[target]
                        ));
                    }
                }
            }
            failures
        })
    };
    let mut failovers = Vec::new();
    for round in 0..3 {
        std::thread::sleep(Duration::from_millis(1200));
        let before = acked.lock().unwrap().len();
        let (victim, survivor) = {
            let f = fed.lock().unwrap();
            let p = primary(f.dir(1))
                .or_else(|| primary(f.dir(0)))
                .expect("a primary");
            let v = NAMES.iter().position(|n| *n == p).unwrap();
            (v, (v + 1) % 3)
        };
        alive.lock().unwrap()[victim] = false;
        let killed = Instant::now();
        fed.lock().unwrap().kill9(victim);
        let ok = wait_until(Duration::from_secs(10), || {
            primary(&dirs[survivor]).is_some_and(|p| p != NAMES[victim])
        });
        assert!(
            ok,
            "round {round}: no new primary after {} was killed: {}",
            NAMES[victim],
            fed.lock().unwrap().report()
        );
        failovers.push(killed.elapsed());
        assert!(
            wait_until(Duration::from_secs(20), || acked.lock().unwrap().len()
                > before + 3),
            "round {round}: writes not acknowledged after the failover: {:#?}\n{}",
            errors
                .lock()
                .unwrap()
                .iter()
                .rev()
                .take(8)
                .collect::<Vec<_>>(),
            fed.lock().unwrap().report()
        );
        fed.lock().unwrap().spawn(victim);
        alive.lock().unwrap()[victim] = true;
        fed.lock().unwrap().wait_formed();
    }
    stop.store(true, Ordering::Relaxed);
    let failures = writer.join().unwrap();
    let acked = acked.lock().unwrap().clone();
    eprintln!(
        "{} writes acknowledged, {failures} refused or lost in flight; failovers: {failovers:?}",
        acked.len()
    );
    assert!(
        acked.len() >= 20,
        "too few writes acknowledged: {}",
        acked.len()
    );
    // Two leaders never committed different writes at the same index.
    let mut revs: Vec<u64> = acked.iter().map(|a| a.2).collect();
    revs.sort_unstable();
    revs.dedup();
    assert_eq!(
        revs.len(),
        acked.len(),
        "two acknowledged writes share a revision"
    );
    let last = *revs.last().unwrap();
    for d in &dirs {
        assert!(
            wait_until(Duration::from_secs(15), || applied(d) >= last),
            "{} did not apply revision {last}",
            d.display()
        );
        let state = shared(d);
        for (key, n, rev) in &acked {
            let got = state.get(key);
            assert!(
                got.is_some_and(|(v, r)| v.as_u64() == Some(*n) && r == rev),
                "{}: acknowledged {key}={n} (r{rev}) is {got:?}",
                d.display()
            );
        }
    }
    rt.block_on(relay.shutdown());
}

#[test]
fn partition_isolating_the_primary() {
    let _serial = serial();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let relay = relay_with(&rt, [(0, 1, 20), (0, 2, 30), (1, 2, 30)]);
    let fed = start_behind(&relay, 400);
    let (tyo, bj, fra) = (fed.dir(0), fed.dir(1), fed.dir(2));
    assert_eq!(primary(bj).as_deref(), Some("tokyo"));
    set(bj, "before", "1").unwrap();

    relay.partition(&["tokyo"], true).unwrap();
    let cut = Instant::now();
    assert!(
        wait_until(Duration::from_secs(10), || {
            primary(bj).is_some_and(|p| p != "tokyo") && primary(fra) == primary(bj)
        }),
        "the majority did not elect: {}",
        fed.report()
    );
    eprintln!(
        "majority elected {:?} {:?} after the cut",
        primary(bj),
        cut.elapsed()
    );
    // The minority knows it has no majority, and says so.
    assert!(
        wait_until(Duration::from_secs(10), || consensus(tyo)["quorum"]
            == false),
        "tokyo still believes it has a majority: {}",
        fed.report()
    );
    let refused = set(tyo, "minority", "1").unwrap_err();
    assert!(refused.contains("no majority"), "{refused}");
    assert!(refused.contains("keep working"), "{refused}");
    // Tokyo does not call itself primary while cut off; its data plane still answers.
    let doc = status(tyo).expect("tokyo answers status while cut off");
    assert_ne!(doc["primary"], "tokyo", "{doc}");
    let health = cli(tyo, &["gateway", "call", "health"]);
    assert!(health.status.success());
    // The majority accepts writes.
    let rev = set(fra, "majority", "2").expect("majority accepts");

    relay.partition(&["tokyo"], false).unwrap();
    assert!(
        wait_until(Duration::from_secs(15), || applied(tyo) >= rev),
        "tokyo did not catch up: {}",
        fed.report()
    );
    for d in [tyo, bj, fra] {
        let s = shared(d);
        assert!(
            s.contains_key("before") && s.contains_key("majority"),
            "{s:?}"
        );
        assert!(
            !s.contains_key("minority"),
            "the refused write appeared: {s:?}"
        );
    }
    // One history: every gateway holds the same config.
    assert!(wait_until(Duration::from_secs(10), || {
        let a = shared(tyo);
        a == shared(bj) && a == shared(fra)
    }));
    // The preferred primary takes its role back once healthy and caught up.
    assert!(
        wait_until(Duration::from_secs(15), || {
            NAMES
                .iter()
                .zip([tyo, bj, fra])
                .all(|(_, d)| primary(d).as_deref() == Some("tokyo"))
        }),
        "tokyo did not take the primary role back: {}",
        fed.report()
    );
    set(bj, "after", "3").unwrap();
    rt.block_on(relay.shutdown());
}

#[test]
fn promote_force_when_the_majority_is_gone() {
    let _serial = serial();
    let mut fed = Fed::start(300);
    let tyo = fed.dir(0).to_path_buf();
    set(&tyo, "a", "1").unwrap();
    fed.kill9(1);
    fed.kill9(2);
    assert!(wait_until(Duration::from_secs(10), || consensus(&tyo)
        ["quorum"]
        == false));
    let refused = set(&tyo, "b", "2").unwrap_err();
    assert!(refused.contains("no majority"), "{refused}");
    let no_force = cli(&tyo, &["gateway", "promote"]);
    assert!(!no_force.status.success());
    assert!(String::from_utf8_lossy(&no_force.stderr).contains("--force"));
    let forced = cli(&tyo, &["gateway", "promote", "--force"]);
    assert!(
        forced.status.success(),
        "{}",
        String::from_utf8_lossy(&forced.stderr)
    );
    assert!(
        wait_until(Duration::from_secs(10), || set(&tyo, "b", "2").is_ok()),
        "writes still refused after promote --force: {}",
        fed.report()
    );
    assert_eq!(consensus(&tyo)["voters"], serde_json::json!(["tokyo"]));
    // The others rejoin, follow the forced history, and become voters again.
    fed.spawn(1);
    fed.spawn(2);
    fed.wait_formed();
    let rev = set(fed.dir(2), "c", "3").unwrap();
    for i in 0..3 {
        let d = fed.dir(i).to_path_buf();
        assert!(wait_until(Duration::from_secs(10), || applied(&d) >= rev));
        let s = shared(&d);
        assert!(["a", "b", "c"].iter().all(|k| s.contains_key(*k)), "{s:?}");
    }
}

#[test]
fn offline_remote_catches_up_and_a_newcomer_gets_a_snapshot() {
    let _serial = serial();
    // Snapshots every 100 entries, 1 200 entries kept behind them: a remote up to 1 200
    // changes behind gets the entries, one further behind gets a snapshot.
    let cfg = r#"{"gateway":{"federation":{"snapshotEvery":100,"keepLog":1200}}}"#;
    let mut fed = Fed::start_with(300, [Some(cfg), Some(cfg), Some(cfg)]);
    let tyo = fed.dir(0).to_path_buf();
    let fra = fed.dir(2).to_path_buf();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let write_many = |from: u64, to: u64| -> u64 {
        rt.block_on(async {
            use futures_util::StreamExt as _;
            let target = clawmesh::cli::client::Target::Local(tyo.clone());
            let client = clawmesh::cli::client::Client::connect(&target)
                .await
                .unwrap();
            let client = &client;
            let revisions: Vec<u64> = futures_util::stream::iter(from..to)
                .map(|i| async move {
                    let v = client
                        .call(
                            "config.set",
                            serde_json::json!({"key": format!("bulk.k{i}"), "value": i}),
                            Duration::from_secs(20),
                        )
                        .await
                        .unwrap_or_else(|e| panic!("write {i}: {e:?}"));
                    v["revision"].as_u64().unwrap()
                })
                .buffer_unordered(16)
                .collect()
                .await;
            revisions.into_iter().max().unwrap()
        })
    };
    // Frankfurt stops, misses writes `from..to` and, 200 more at a time, as many as it takes
    // to put `entries` log entries behind it (the primary commits concurrent writes together,
    // so a write is not an entry), restarts and catches up; returns the last write's revision
    // and what frankfurt logged since the restart.
    let away_during = |fed: &mut Fed, from: u64, to: u64, entries: u64| -> (u64, String) {
        fed.term(2);
        let start = applied(&tyo);
        let mut last = write_many(from, to);
        let mut next = to;
        while last < start + entries {
            assert!(
                next < to + 20_000,
                "the log does not grow: {}",
                fed.report()
            );
            last = write_many(next, next + 200);
            next += 200;
        }
        let log_len = std::fs::metadata(fra.with_extension("log")).unwrap().len() as usize;
        fed.spawn(2);
        assert!(
            wait_until(Duration::from_secs(30), || applied(&fra) >= last),
            "{}",
            fed.report()
        );
        let log = std::fs::read_to_string(fra.with_extension("log")).unwrap();
        (last, log[log_len..].to_string())
    };
    // Frankfurt is away during 1 000 changes, then catches up: by the missing entries, as the
    // primary keeps the log a lagging voter still needs.
    let (_, log) = away_during(&mut fed, 0, 1000, 0);
    assert!(
        !log.contains("installed a snapshot"),
        "frankfurt got a snapshot instead of the missing entries"
    );
    let s = shared(&fra);
    assert_eq!(s, shared(&tyo));
    for i in 0..1000u64 {
        let key = format!("bulk.k{i}");
        assert_eq!(
            s.get(&key).map(|v| v.0.clone()),
            Some(Value::from(i)),
            "{key}"
        );
    }
    // Away again, for 1 600 entries: beyond the kept log, so a compressed snapshot.
    let (last, log) = away_during(&mut fed, 1000, 2600, 1600);
    assert!(
        log.contains("installed a snapshot"),
        "frankfurt was 1 600 changes behind a compacted log but got no snapshot: {}",
        consensus(&tyo)
    );
    assert_eq!(shared(&fra), shared(&tyo));
    // A gateway joining now starts from the snapshot too, and becomes a fourth voter.
    let oslo_dir = fed.tmp.path().join("oslo");
    std::fs::create_dir_all(&oslo_dir).unwrap();
    std::fs::write(oslo_dir.join("clawmesh.json"), cfg).unwrap();
    let mut oslo = Gw::spawn(
        &oslo_dir,
        &[
            "--name",
            "oslo",
            "--join",
            &fed.join,
            "--token",
            "fed-token",
            "--health-interval",
            "300",
        ],
    );
    oslo.wait_ready();
    assert!(
        wait_until(Duration::from_secs(30), || applied(&oslo_dir) >= last),
        "oslo did not catch up: {:?}\n{}",
        consensus(&oslo_dir),
        oslo.log_text()
    );
    assert!(
        oslo.log_text().contains("installed a snapshot"),
        "tokyo: {}\noslo: {}",
        consensus(&tyo),
        oslo.log_text()
    );
    assert_eq!(shared(&oslo_dir), shared(&tyo));
    assert!(wait_until(Duration::from_secs(10), || {
        consensus(&tyo)["voters"].as_array().map(Vec::len) == Some(4)
    }));
}

#[test]
fn sync_policy_override_local_both_ways() {
    let _serial = serial();
    let local = r#"{"models":{"default":"ernie-4.0"},"channels":{"wechat":{"model":"ernie-4.0"}}}"#;
    let beijing =
        r#"{"models":{"default":"ernie-4.0"},"gateway":{"sync":{"overrideLocal":false}}}"#;
    let frankfurt = r#"{"models":{"default":"mistral"},"gateway":{"sync":{"overrideLocal":true,"syncSkills":false}}}"#;
    let fed = Fed::start_with(300, [Some(local), Some(beijing), Some(frankfurt)]);
    let (tyo, bj, fra) = (fed.dir(0), fed.dir(1), fed.dir(2));
    let rev = set(tyo, "models.default", "\"gpt-5\"").unwrap();
    let skills = set(bj, "skills.web.enabled", "true").unwrap();
    for d in [tyo, bj, fra] {
        assert!(wait_until(Duration::from_secs(10), || applied(d) >= skills));
    }
    let get = |d: &Path, k: &str| cli_json(d, &["config", "get", k, "--json"]);
    // beijing: overrideLocal false, its own value wins; the synced one is shown as shadowed.
    let b = get(bj, "models.default");
    assert_eq!(b["effective"]["value"], "ernie-4.0", "{b}");
    assert_eq!(b["effective"]["source"], "file");
    assert_eq!(b["effective"]["shadowed"]["value"], "gpt-5");
    // frankfurt: overrideLocal true, the synced value wins, with its revision.
    let f = get(fra, "models.default");
    assert_eq!(f["effective"]["value"], "gpt-5", "{f}");
    assert_eq!(f["effective"]["source"], format!("synced r{rev}"));
    assert_eq!(f["effective"]["shadowed"]["value"], "mistral");
    // frankfurt does not sync skills.
    let f = get(fra, "skills.web.enabled");
    assert_eq!(f["found"], false, "{f}");
    assert!(f["notApplied"].as_str().unwrap().contains("syncSkills"));
    let b = get(bj, "skills.web.enabled");
    assert_eq!(b["effective"]["value"], true);
    // The effective view lists local-only keys too.
    let show = cli_json(tyo, &["config", "show", "--effective", "--json"]);
    let keys: Vec<&str> = show["entries"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e["key"].as_str())
        .collect();
    assert!(keys.contains(&"channels.wechat.model"), "{keys:?}");
    let table = cli(fra, &["config", "show", "--effective"]);
    let table = String::from_utf8_lossy(&table.stdout);
    assert!(table.contains("overrides file: mistral"), "{table}");
    assert!(
        table.contains("gateway.sync.syncSkills is false"),
        "{table}"
    );
    // Per-gateway keys cannot be shared; bad values are refused before they are proposed.
    let e = set(tyo, "gateway.port", "1").unwrap_err();
    assert!(e.contains("per-gateway"), "{e}");
    // Running components follow: the health interval changes live where the synced value
    // applies (frankfurt overrides local keys, its --health-interval included), not where
    // the local one wins (beijing).
    let rev = set(tyo, "gateway.failover.healthCheckInterval", "450").unwrap();
    assert!(wait_until(Duration::from_secs(10), || applied(fra) >= rev
        && applied(bj) >= rev));
    assert!(
        wait_until(Duration::from_secs(5), || status(fra)
            .is_some_and(|d| d["healthIntervalMs"] == 450)),
        "{:?}",
        status(fra)
    );
    assert_eq!(status(bj).unwrap()["healthIntervalMs"], 300);
    assert!(sees_healthy(fra, &NAMES));
    // Unset removes the key everywhere.
    let rev = cli_json(tyo, &["config", "unset", "skills.web.enabled", "--json"])["revision"]
        .as_u64()
        .unwrap();
    assert!(wait_until(Duration::from_secs(10), || applied(bj) >= rev));
    assert_eq!(get(bj, "skills.web.enabled")["found"], false);
}

#[test]
fn corrupt_or_truncated_state_is_refused_with_a_clear_error() {
    let _serial = serial();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("solo");
    let start = |dir: &Path| {
        let mut g = Gw::spawn(
            dir,
            &["--name", "solo", "--primary", "--health-interval", "300"],
        );
        g.wait_ready();
        g
    };
    let mut g = start(&dir);
    assert!(wait_until(Duration::from_secs(10), || set(&dir, "k", "1").is_ok()));
    set(&dir, "k2", "2").unwrap();
    g.term();
    let db = dir.join("state.db");
    let wal = dir.join("state.db-wal");
    // Fold the write-ahead log into the file, so truncating the file cuts real data.
    rusqlite::Connection::open(&db)
        .unwrap()
        .execute_batch("PRAGMA wal_checkpoint(TRUNCATE);")
        .unwrap();
    let pristine = std::fs::read(&db).unwrap();
    let pristine_wal = std::fs::read(&wal).ok();

    // A damaged log entry: the gateway refuses to start and names the table and row.
    {
        let c = rusqlite::Connection::open(&db).unwrap();
        c.execute(
            "UPDATE raft_log SET entry = x'deadbeef' WHERE idx = (SELECT MAX(idx) FROM raft_log)",
            [],
        )
        .unwrap();
    }
    let mut g = Gw::spawn(&dir, &["--name", "solo", "--primary"]);
    let exit = g.wait_exit(Duration::from_secs(10)).expect("gateway exits");
    assert!(!exit.success());
    let log = g.log_text();
    assert!(
        log.contains("corrupt raft storage") && log.contains("raft_log"),
        "{log}"
    );
    // Nothing was reset: the damaged row is still there for the operator to inspect.
    let c = rusqlite::Connection::open(&db).unwrap();
    let n: i64 = c
        .query_row(
            "SELECT COUNT(*) FROM raft_log WHERE entry = x'deadbeef'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(n, 1);
    drop(c);

    // A truncated database file.
    std::fs::write(&db, &pristine[..pristine.len() / 3]).unwrap();
    let _ = std::fs::remove_file(dir.join("state.db-wal"));
    let _ = std::fs::remove_file(dir.join("state.db-shm"));
    let mut g = Gw::spawn(&dir, &["--name", "solo", "--primary"]);
    let exit = g.wait_exit(Duration::from_secs(10)).expect("gateway exits");
    assert!(!exit.success());
    let log = g.log_text();
    assert!(
        log.contains("state.db") || log.contains("malformed") || log.contains("corrupt"),
        "{log}"
    );

    // Restored from the copy, it starts and still has the config.
    std::fs::write(&db, &pristine).unwrap();
    if let Some(w) = &pristine_wal {
        std::fs::write(&wal, w).unwrap();
    }
    let _g = start(&dir);
    assert_eq!(
        shared(&dir).get("k2").map(|v| v.0.clone()),
        Some(Value::from(2))
    );
}

#[test]
fn pairing_reaches_a_gateway_that_was_away_through_the_log() {
    let _serial = serial();
    let mut fed = Fed::start(300);
    let bj = fed.dir(1).to_path_buf();
    let fra = fed.dir(2).to_path_buf();
    fed.term(2);
    let gw = format!("quic://127.0.0.1:{}", fed.ports[1]);
    let node_dir = fed.tmp.path().join("node");
    let _node = Gw::spawn_cmd(
        &node_dir,
        &["node", "run", "--gateway", &gw, "--name", "n-log"],
    );
    let mut req = None;
    assert!(wait_until(Duration::from_secs(15), || {
        let v = cli_json(&bj, &["devices", "list", "--json"]);
        req = v["pending"]
            .as_array()
            .and_then(|p| p.iter().find(|p| p["name"] == "n-log"))
            .and_then(|p| p["requestId"].as_str().map(str::to_string));
        req.is_some()
    }));
    let tyo = fed.dir(0).to_path_buf();
    let before = applied(&tyo);
    let out = cli(&bj, &["devices", "approve", req.as_deref().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The decision becomes a log entry once a majority (tokyo, beijing) has it.
    assert!(
        wait_until(Duration::from_secs(10), || applied(&tyo) > before),
        "no pairing entry in the log: {}",
        fed.report()
    );
    let paired = |d: &Path| {
        cli_json(d, &["devices", "list", "--json"])["paired"]
            .as_array()
            .is_some_and(|p| p.iter().any(|p| p["name"] == "n-log"))
    };
    assert!(paired(&tyo));
    fed.spawn(2);
    assert!(
        wait_until(Duration::from_secs(15), || paired(&fra)),
        "frankfurt never learned of the approval: {}",
        fed.report()
    );
}

#[test]
fn a_gateway_joins_through_the_new_primary_while_the_configured_one_is_down() {
    let _serial = serial();
    let mut fed = Fed::start(300);
    let tyo = fed.dir(0).to_path_buf();
    fed.kill9(0);
    let mut acting = None;
    assert!(
        wait_until(Duration::from_secs(10), || {
            acting = primary(fed.dir(1)).filter(|p| p != "tokyo");
            acting.is_some()
        }),
        "{}",
        fed.report()
    );
    let acting = acting.unwrap();
    let i = NAMES.iter().position(|n| *n == acting).unwrap();
    let other = 3 - i; // the survivor that is not acting (1 + 2 = 3)
    let join = format!("quic://127.0.0.1:{}", fed.ports[i]);
    let oslo_dir = fed.tmp.path().join("oslo");
    let mut oslo = Gw::spawn(
        &oslo_dir,
        &[
            "--name",
            "oslo",
            "--join",
            &join,
            "--token",
            "fed-token",
            "--health-interval",
            "300",
        ],
    );
    oslo.wait_ready();
    let sees_oslo = |d: &Path| {
        status(d).is_some_and(|doc| row(&doc, "oslo").is_some_and(|g| g["status"] == "healthy"))
    };
    assert!(
        wait_until(Duration::from_secs(15), || sees_oslo(fed.dir(i))
            && sees_oslo(fed.dir(other))),
        "oslo was not admitted by {acting}: {}\n{}",
        oslo.log_text(),
        fed.report()
    );
    // The configured primary comes back, learns of oslo from the log, and links to it.
    fed.spawn(0);
    assert!(
        wait_until(Duration::from_secs(20), || sees_oslo(&tyo)),
        "tokyo never linked to oslo: {:?}\n{}",
        status(&tyo),
        fed.report()
    );
    let rev = set(&oslo_dir, "joined.oslo", "true").expect("oslo writes through the primary");
    assert!(wait_until(Duration::from_secs(10), || applied(&tyo) >= rev));
}

/// Fires `writes` (key, value) as concurrent `config.set` calls on `dir` (one operator
/// connection per `conns` writers); returns each write's revision, or its error.
fn concurrent_sets(
    rt: &tokio::runtime::Runtime,
    dir: &Path,
    writes: Vec<(String, u64)>,
) -> Vec<(String, u64, Result<u64, String>)> {
    rt.block_on(async {
        let target = clawmesh::cli::client::Target::Local(dir.to_path_buf());
        let client = clawmesh::cli::client::Client::connect(&target)
            .await
            .unwrap();
        let client = &client;
        let calls = writes.into_iter().map(|(key, n)| async move {
            let r = client
                .call(
                    "config.set",
                    serde_json::json!({"key": key, "value": n}),
                    Duration::from_secs(20),
                )
                .await
                .map_err(|e| e.to_string())
                .and_then(|v| v["revision"].as_u64().ok_or_else(|| v.to_string()));
            (key, n, r)
        });
        futures_util::future::join_all(calls).await
    })
}

#[test]
fn concurrent_writes_share_entries_and_each_gets_its_own_result() {
    let _serial = serial();
    let fed = Fed::start(400);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mut acked: Vec<(String, u64, u64)> = Vec::new();
    let mut same: Vec<(u64, u64)> = Vec::new();
    for round in 0..3u64 {
        // 48 writes of distinct keys and 8 of one key, all at once: on the primary (tokyo) in
        // even rounds, forwarded from beijing in odd ones.
        let mut writes: Vec<(String, u64)> = (0..48)
            .map(|i| (format!("group.r{round}k{i}"), round * 100 + i))
            .collect();
        writes.extend((0..8).map(|i| ("group.same".to_string(), round * 100 + 50 + i)));
        for (key, n, r) in concurrent_sets(&rt, fed.dir((round % 2) as usize), writes) {
            let rev = r.unwrap_or_else(|e| panic!("round {round}: {key}={n} failed: {e}"));
            if key == "group.same" {
                same.push((rev, n));
            } else {
                acked.push((key, n, rev));
            }
        }
    }
    // Grouped: fewer entries than writes.
    let mut revs: Vec<u64> = acked.iter().map(|a| a.2).collect();
    revs.sort_unstable();
    revs.dedup();
    assert!(
        revs.len() < acked.len(),
        "{} writes in {} entries: nothing was grouped",
        acked.len(),
        revs.len()
    );
    // Writes of one key never share an entry: each got a revision of its own, and the value
    // left is the one with the highest revision.
    same.sort_unstable();
    let mut same_revs: Vec<u64> = same.iter().map(|s| s.0).collect();
    same_revs.dedup();
    assert_eq!(
        same_revs.len(),
        same.len(),
        "one key twice in an entry: {same:?}"
    );
    let last = *revs.last().unwrap().max(same_revs.last().unwrap());
    for i in 0..3 {
        let d = fed.dir(i);
        assert!(
            wait_until(Duration::from_secs(15), || applied(d) >= last),
            "{} did not apply revision {last}",
            d.display()
        );
        let state = shared(d);
        for (key, n, rev) in &acked {
            let got = state.get(key);
            assert!(
                got.is_some_and(|(v, r)| v.as_u64() == Some(*n) && r == rev),
                "{}: acknowledged {key}={n} (r{rev}) is {got:?}",
                d.display()
            );
        }
        let (rev, n) = same.last().unwrap();
        let got = state.get("group.same");
        assert!(
            got.is_some_and(|(v, r)| v.as_u64() == Some(*n) && r == rev),
            "{}: group.same should be {n} (r{rev}), is {got:?}",
            d.display()
        );
    }
}

#[test]
fn a_primary_killed_mid_group_acknowledges_no_lost_write() {
    let _serial = serial();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let relay = relay_with(&rt, [(0, 1, 40), (0, 2, 40), (1, 2, 40)]);
    let mut fed = start_behind(&relay, 400);
    let victim = NAMES
        .iter()
        .position(|n| primary(fed.dir(1)).as_deref() == Some(*n))
        .expect("a primary");
    let survivors: Vec<usize> = (0..3).filter(|i| *i != victim).collect();
    // 32 writers, 16 on each survivor (forwarded to the primary), each writing new keys as
    // fast as they are acknowledged; the primary is SIGKILLed while groups are in flight.
    let stop = Arc::new(AtomicBool::new(false));
    let writers: Vec<_> = (0..32usize)
        .map(|w| {
            let dir = fed.dir(survivors[w % 2]).to_path_buf();
            let stop = stop.clone();
            let handle = rt.handle().clone();
            std::thread::spawn(move || {
                handle.block_on(async {
                    let target = clawmesh::cli::client::Target::Local(dir);
                    let client = clawmesh::cli::client::Client::connect(&target)
                        .await
                        .unwrap();
                    let mut acked = Vec::new();
                    let mut failed = 0u64;
                    let mut n = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        n += 1;
                        let key = format!("kill.w{w}n{n}");
                        let r = client
                            .call(
                                "config.set",
                                serde_json::json!({"key": key, "value": n}),
                                Duration::from_secs(20),
                            )
                            .await;
                        match r.map(|v| v["revision"].as_u64()) {
                            Ok(Some(rev)) => acked.push((key, n, rev)),
                            Ok(None) => panic!("a reply without a revision"),
                            Err(_) => failed += 1,
                        }
                    }
                    (acked, failed)
                })
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(1500));
    fed.kill9(victim);
    let ok = wait_until(Duration::from_secs(10), || {
        primary(fed.dir(survivors[0])).is_some_and(|p| p != NAMES[victim])
    });
    assert!(ok, "no new primary: {}", fed.report());
    std::thread::sleep(Duration::from_millis(1500));
    stop.store(true, Ordering::Relaxed);
    let mut acked = Vec::new();
    let mut failed = 0;
    for w in writers {
        let (a, f) = w.join().unwrap();
        acked.extend(a);
        failed += f;
    }
    eprintln!("{} writes acknowledged, {failed} failed", acked.len());
    let last = acked
        .iter()
        .map(|a| a.2)
        .max()
        .expect("writes acknowledged");
    for &i in &survivors {
        let d = fed.dir(i);
        assert!(
            wait_until(Duration::from_secs(15), || applied(d) >= last),
            "{} did not apply revision {last}",
            d.display()
        );
        let state = shared(d);
        for (key, n, rev) in &acked {
            let got = state.get(key);
            assert!(
                got.is_some_and(|(v, r)| v.as_u64() == Some(*n) && r == rev),
                "{}: acknowledged {key}={n} (r{rev}) is {got:?}",
                d.display()
            );
        }
    }
    drop(fed);
    rt.block_on(relay.shutdown());
}
