//! The alert duty: which gateway evaluates the rules, and the loop that does it.
//!
//! The primary (the raft leader, as `gateway status` shows it) holds the duty, so each event
//! is noticed once and the duty moves with the role. While the federation has no primary (no
//! quorum), the gateway with the smallest name among those this one sees online takes it after
//! a grace longer than an election, so "no quorum" itself is reported (once per side of a
//! partition: each side sees only itself).
//!
//! After every change, and every [`SYNC_EVERY`], the evaluator pushes its book to every other
//! gateway (`alerts.sync`); a gateway taking the duty also pulls the books of the others and
//! keeps the newest (it may have just restarted). It starts from that copy: alerts firing
//! there stay firing without a new notice, those whose condition has gone resolve with one
//! notice, new ones fire. What a new evaluator cannot know: notices the old one had queued
//! but not delivered when it died (lost), and conditions pending their `for` there (their
//! clock starts again).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use clawmesh_federation::mesh::Mesh;
use clawmesh_federation::rpc::{Caller, CallerKind};
use serde_json::{json, Value};
use tracing::{info, warn};

use super::book::{Alert, AlertBook, Contents};
use super::evaluate::{conditions, Pending};
use super::webhook::{Notice, Webhooks};
use crate::alerts_config::{self, Rule, RuleKind};
use crate::gateway::methods::Methods;

/// How often the rules are evaluated: well inside any rule's useful resolution (a gateway
/// is declared offline after several health intervals), cheap (two in-memory documents).
const TICK: Duration = Duration::from_millis(500);

/// The next evaluation waits at least this many times what reading the node rows and
/// evaluating the rules cost last time: keeps the duty near 1/10 of a core at any fleet size.
/// Below ~50 ms of work (any fleet under tens of thousands of nodes) it still runs every
/// tick; with 50 000 nodes sending vitals, evaluating twice a second took the cores that
/// answer the nodes' pings (missed pings closed nodes, which came back: a spiral).
const EVAL_SPACING: u32 = 10;

/// The book is pushed to the other gateways at least this often, so a gateway that was away
/// has a recent copy before it could take the duty.
pub const SYNC_EVERY: Duration = Duration::from_secs(2);

/// One push of the book to one gateway: a few round trips; a peer slower than this gets the
/// next push.
const SYNC_TIMEOUT: Duration = Duration::from_secs(5);

/// How often the evaluator asks every gateway for its log shipping lag (only while a
/// `log-lag` rule exists): lag worth an alert is minutes; one small request per gateway.
const LOG_PROBE_EVERY: Duration = Duration::from_secs(10);

/// With no primary for this long, the smallest-named gateway online takes the duty: longer
/// than an election (about 2.5 s at a 1 s health interval), so a normal failover never
/// has two evaluators.
const NO_PRIMARY_GRACE: Duration = Duration::from_secs(10);

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn internal_caller() -> Caller {
    Caller {
        key: None,
        kind: CallerKind::Operator {
            scopes: vec![crate::gateway::scopes::READ.to_string()],
            client: "alerts".into(),
        },
        remote: std::net::SocketAddr::from(([127, 0, 0, 1], 0)),
    }
}

/// Whether this gateway holds the duty, given the status document.
fn holds_duty(status: &Value, no_primary_since: Option<Instant>) -> bool {
    let me = status["self"].as_str().unwrap_or_default();
    match status["primary"].as_str() {
        Some(p) => p == me,
        None => {
            let long = no_primary_since.is_some_and(|t| t.elapsed() >= NO_PRIMARY_GRACE);
            let smallest = status["gateways"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|g| g["status"] != "offline" || g["isSelf"] == true)
                .filter_map(|g| g["name"].as_str())
                .min();
            long && smallest == Some(me)
        }
    }
}

/// Starts the alert duty loop of this gateway.
pub fn spawn(methods: Methods, mesh: Mesh, book: Arc<AlertBook>) {
    tokio::spawn(async move {
        let mut webhooks = match Webhooks::new(book.clone()) {
            Ok(w) => w,
            Err(e) => {
                warn!("alerts disabled: cannot build the webhook client: {e}");
                return;
            }
        };
        let started = Instant::now();
        let mut pending = Pending::default();
        let mut no_primary_since: Option<Instant> = None;
        let mut last_sync = Instant::now();
        let mut dirty = false;
        let syncing = Arc::new(AtomicBool::new(false));
        let mut rules_error: Option<String> = None;
        let mut rules: Vec<Rule> = alerts_config::default_rules();
        let mut lags: Vec<(String, Option<f64>)> = Vec::new();
        let mut last_probe: Option<Instant> = None;
        // What reading the node rows and evaluating the rules cost last time (see
        // EVAL_SPACING): O(changes since the last time + nodes that can fire).
        let mut cost = Duration::ZERO;
        loop {
            tokio::time::sleep(TICK.max(cost * EVAL_SPACING)).await;
            let caller = internal_caller();
            let Ok(status) = methods
                .dispatch(&caller, "gateway.status", json!({"all": true}))
                .await
            else {
                continue;
            };
            if status["primary"].is_null() {
                no_primary_since.get_or_insert_with(Instant::now);
            } else {
                no_primary_since = None;
            }
            let me = status["self"].as_str().unwrap_or_default().to_string();
            let duty = holds_duty(&status, no_primary_since);
            if duty != book.on_duty() {
                book.set_on_duty(duty);
                pending.clear();
                if duty {
                    pull_books(&mesh, &status, &book).await;
                    info!(
                        adopted = book.firing_ids().len(),
                        "alert duty taken: evaluating the rules (alerts already firing stay firing, no new notice)"
                    );
                    dirty = true;
                } else {
                    info!("alert duty handed over");
                }
            }
            if !duty {
                continue;
            }
            // A gateway that just started has no health verdicts yet: every peer would look
            // offline. Wait until a peer could have been declared offline for real.
            let health = methods.health_settings().unwrap_or_default();
            let warmup = health.interval * (health.unhealthy_threshold + 2);
            if started.elapsed() < warmup.max(SYNC_EVERY) {
                continue;
            }
            if let Ok((entries, _)) = methods
                .effective_keys(&["alerts.rules", "alerts.webhooks"])
                .await
            {
                let get = |k: &str| {
                    crate::gateway::shared_config::lookup(&entries, k).map(|e| e.value.clone())
                };
                let parsed = match get("alerts.rules") {
                    None | Some(Value::Null) => Ok(alerts_config::default_rules()),
                    Some(v) => alerts_config::parse_rules(&v),
                };
                match parsed {
                    Ok(r) => {
                        rules = r;
                        rules_error = None;
                    }
                    Err(e) => {
                        if rules_error.as_ref() != Some(&e) {
                            warn!("alerts.rules not applied, keeping the previous rules: {e}");
                            rules_error = Some(e);
                        }
                    }
                }
                match get("alerts.webhooks") {
                    None | Some(Value::Null) => webhooks.set(&[]),
                    Some(v) => match alerts_config::parse_webhooks(&v) {
                        Ok(h) => webhooks.set(&h),
                        Err(e) => warn!("alerts.webhooks not applied: {e}"),
                    },
                }
            }
            let needs_nodes = rules.iter().any(|r| {
                matches!(
                    r.kind,
                    RuleKind::NodeDisconnected | RuleKind::Cpu | RuleKind::Memory | RuleKind::Disk
                )
            });
            let started = Instant::now();
            let nodes = if needs_nodes {
                // Only the rows a rule can fire on, kept per change (at 100 000 nodes the
                // whole listing, twice a second, would be hundreds of MB of JSON each time).
                methods.alerting_rows(&rules).unwrap_or_default()
            } else {
                Value::Null
            };
            let read = started.elapsed();
            let mut status = status;
            if rules.iter().any(|r| r.kind == RuleKind::LogLag) {
                if last_probe.is_none_or(|t| t.elapsed() >= LOG_PROBE_EVERY) {
                    last_probe = Some(Instant::now());
                    lags = probe_log_lag(&mesh, &status).await;
                    lags.push((me.clone(), methods.log_lag_seconds()));
                }
                if let Some(rows) = status["gateways"].as_array_mut() {
                    for g in rows {
                        let lag = lags.iter().find(|(n, _)| g["name"] == n.as_str());
                        if let Some((_, Some(s))) = lag {
                            g["logLagSeconds"] = json!(s);
                        }
                    }
                }
            }
            let started = Instant::now();
            let held = conditions(&rules, &status, &nodes);
            cost = read + started.elapsed();
            let step = pending.step(held, &book.firing_ids(), Instant::now());
            let now = now_ms();
            for c in step.fire {
                let alert = Alert {
                    id: c.id,
                    rule: c.rule,
                    kind: c.kind.as_str().into(),
                    subject: c.subject,
                    summary: c.summary,
                    value: c.value,
                    since_ms: now,
                    resolved_ms: None,
                };
                if book.fire(alert.clone(), &me, now) {
                    info!(alert = %alert.id, "alert firing: {}", alert.summary);
                    webhooks.send(&Notice::new("firing", alert, &me));
                    dirty = true;
                }
            }
            for id in step.resolve {
                if let Some(alert) = book.resolve(&id, &me, now) {
                    info!(alert = %alert.id, "alert resolved: {}", alert.summary);
                    webhooks.send(&Notice::new("resolved", alert, &me));
                    dirty = true;
                }
            }
            book.touch(&me, now);
            if (dirty || last_sync.elapsed() >= SYNC_EVERY) && !syncing.load(Ordering::Relaxed) {
                dirty = false;
                last_sync = Instant::now();
                push_book(&mesh, &status, &book, syncing.clone());
            }
        }
    });
}

/// Asks every linked gateway for its book and keeps the newest: a gateway that takes the
/// duty right after a restart has none of its own, and the pushes may not have reached it.
async fn pull_books(mesh: &Mesh, status: &Value, book: &AlertBook) {
    let calls = linked(mesh, status)
        .into_iter()
        .map(|(name, conn)| async move {
            let r = clawmesh_federation::rpc::call(
                &conn,
                "alerts.list",
                json!({"book": true}).to_string(),
                1,
                SYNC_TIMEOUT,
            )
            .await;
            match r.map(|t| serde_json::from_str::<Contents>(&t)) {
                Ok(Ok(c)) => Some(c),
                Ok(Err(e)) => {
                    tracing::debug!(gateway = %name, "alert book unreadable: {e}");
                    None
                }
                Err(e) => {
                    tracing::debug!(gateway = %name, "alert book not pulled: {e}");
                    None
                }
            }
        });
    let books = futures_util::future::join_all(calls).await;
    if let Some(c) = books.into_iter().flatten().max_by_key(|c| c.updated_ms) {
        book.adopt_newer(c);
    }
}

/// Every linked gateway's log shipping lag in seconds (`alerts.probe`); `None` for one that
/// does not ship or did not answer.
async fn probe_log_lag(mesh: &Mesh, status: &Value) -> Vec<(String, Option<f64>)> {
    let calls = linked(mesh, status)
        .into_iter()
        .map(|(name, conn)| async move {
            let r =
                clawmesh_federation::rpc::call(&conn, "alerts.probe", "{}".into(), 1, SYNC_TIMEOUT)
                    .await;
            let lag = r
                .ok()
                .and_then(|t| serde_json::from_str::<Value>(&t).ok())
                .and_then(|v| v["logLagSeconds"].as_f64());
            (name, lag)
        });
    futures_util::future::join_all(calls).await
}

/// The other gateways this one has a link to, with the link.
fn linked(mesh: &Mesh, status: &Value) -> Vec<(String, quinn::Connection)> {
    status["gateways"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|g| g["isSelf"] != true)
        .filter_map(|g| g["name"].as_str())
        .filter_map(|n| Some((n.to_string(), mesh.connection_to(n)?)))
        .collect()
}

/// Pushes the book to every gateway this one is linked to, in the background; one push at
/// a time (`syncing`).
fn push_book(mesh: &Mesh, status: &Value, book: &AlertBook, syncing: Arc<AtomicBool>) {
    let Ok(params) = serde_json::to_string(&book.contents()) else {
        return;
    };
    let conns = linked(mesh, status);
    if conns.is_empty() {
        return;
    }
    syncing.store(true, Ordering::Relaxed);
    tokio::spawn(async move {
        let calls = conns.iter().map(|(name, conn)| {
            let params = params.clone();
            async move {
                let r =
                    clawmesh_federation::rpc::call(conn, "alerts.sync", params, 1, SYNC_TIMEOUT)
                        .await;
                if let Err(e) = r {
                    tracing::debug!(gateway = %name, "alert book not pushed: {e}");
                }
            }
        });
        futures_util::future::join_all(calls).await;
        syncing.store(false, Ordering::Relaxed);
    });
}
