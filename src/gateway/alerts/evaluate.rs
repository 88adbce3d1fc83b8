//! The rules against one view of the federation: which conditions hold now
//! ([`conditions`]), and, with how long each has held, which alerts start firing and which
//! resolve ([`Pending::step`]). Pure: the view is the status and node-list documents any
//! gateway serves, so the tests feed it documents.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::alerts_config::{Rule, RuleKind};

/// A rule's condition holding for one subject now.
#[derive(Debug, Clone, PartialEq)]
pub struct Condition {
    /// `rule/subject`.
    pub id: String,
    /// The rule's name.
    pub rule: String,
    /// The rule's kind.
    pub kind: RuleKind,
    /// Gateway name, `gateway/node`, or `federation`.
    pub subject: String,
    /// One line for people.
    pub summary: String,
    /// The measured value (threshold rules).
    pub value: Option<f64>,
    /// How long it must hold before firing.
    pub hold: Duration,
}

/// A host's vitals as the status documents carry them (percent used).
fn vital(row: &Value, key: &str) -> Option<f64> {
    row.get("vitals")?.get(key)?.as_f64()
}

/// The conditions that hold in `status` (the `gateway.status` document, with `consensus`)
/// and `nodes` (the `node.list {all:true}` document).
pub fn conditions(rules: &[Rule], status: &Value, nodes: &Value) -> Vec<Condition> {
    let empty = Vec::new();
    let gateways = status["gateways"].as_array().unwrap_or(&empty);
    let node_rows = nodes["nodes"].as_array().unwrap_or(&empty);
    let offline: BTreeSet<&str> = gateways
        .iter()
        .filter(|g| g["status"] == "offline")
        .filter_map(|g| g["name"].as_str())
        .collect();
    let mut out = Vec::new();
    for rule in rules {
        let mut push = |subject: String, summary: String, value: Option<f64>| {
            out.push(Condition {
                id: format!("{}/{subject}", rule.name),
                rule: rule.name.clone(),
                kind: rule.kind,
                subject,
                summary,
                value,
                hold: rule.hold,
            });
        };
        match rule.kind {
            RuleKind::GatewayOffline => {
                for g in &offline {
                    push(g.to_string(), format!("gateway {g} is offline"), None);
                }
            }
            RuleKind::NoQuorum => {
                let c = &status["consensus"];
                if c["quorum"] == false {
                    let voters = c["voters"].as_array().map_or(0, Vec::len);
                    let reachable = c["reachableVoters"].as_u64().unwrap_or(0);
                    push(
                        "federation".into(),
                        format!("no quorum: {reachable} of {voters} voters reachable; config writes are refused"),
                        Some(reachable as f64),
                    );
                }
            }
            RuleKind::NodeDisconnected => {
                for n in node_rows {
                    let gw = n["gateway"].as_str();
                    // A node of an offline gateway is covered by that gateway's alert: one
                    // notice for the region, not one per node.
                    if n["connected"] == true || gw.is_some_and(|g| offline.contains(g)) {
                        continue;
                    }
                    let name = n["displayName"]
                        .as_str()
                        .or(n["nodeId"].as_str())
                        .unwrap_or("?");
                    push(
                        name.to_string(),
                        format!("node {name} is not connected to any gateway"),
                        None,
                    );
                }
            }
            RuleKind::Cpu | RuleKind::Memory | RuleKind::Disk => {
                let (key, what) = match rule.kind {
                    RuleKind::Cpu => ("cpuPct", "CPU"),
                    RuleKind::Memory => ("memPct", "memory"),
                    _ => ("diskPct", "disk"),
                };
                let hosts = gateways
                    .iter()
                    .filter(|g| g["status"] != "offline")
                    .map(|g| (g["name"].as_str().unwrap_or("?").to_string(), g))
                    .chain(
                        node_rows
                            .iter()
                            .filter(|n| n["connected"] == true)
                            .map(|n| {
                                let name = n["displayName"].as_str().unwrap_or("?");
                                (
                                    format!("{}/{name}", n["gateway"].as_str().unwrap_or("?")),
                                    n,
                                )
                            }),
                    );
                for (subject, row) in hosts {
                    if let Some(v) = vital(row, key).filter(|v| *v > rule.above) {
                        push(
                            subject.clone(),
                            format!(
                                "{what} of {subject} at {v:.0} % (above {:.0} %)",
                                rule.above
                            ),
                            Some(v),
                        );
                    }
                }
            }
            RuleKind::LogLag => {
                for g in gateways.iter().filter(|g| g["status"] != "offline") {
                    let lag = g["logLagSeconds"].as_f64();
                    if let Some(v) = lag.filter(|v| *v > rule.above) {
                        let name = g["name"].as_str().unwrap_or("?");
                        push(
                            name.to_string(),
                            format!(
                                "log shipping of {name} is {v:.0} s behind (above {:.0} s)",
                                rule.above
                            ),
                            Some(v),
                        );
                    }
                }
            }
        }
    }
    out
}

/// What changed in one evaluation.
#[derive(Debug, Default, PartialEq)]
pub struct Step {
    /// Conditions that held long enough: fire them.
    pub fire: Vec<Condition>,
    /// Ids of firing alerts whose condition no longer holds: resolve them.
    pub resolve: Vec<String>,
}

/// Conditions seen but not yet held for their rule's `for`: when each was first seen.
#[derive(Debug, Default)]
pub struct Pending {
    since: BTreeMap<String, Instant>,
}

impl Pending {
    /// Forgets every pending condition (the evaluator lost the duty).
    pub fn clear(&mut self) {
        self.since.clear();
    }

    /// One evaluation at `now`: `held` are the conditions that hold, `firing` the ids that
    /// fire already (this evaluator's, or the copy a new evaluator adopted). An alert already
    /// firing never fires again; one that holds no more resolves.
    pub fn step(&mut self, held: Vec<Condition>, firing: &[String], now: Instant) -> Step {
        let firing: BTreeSet<&str> = firing.iter().map(String::as_str).collect();
        let held_ids: BTreeSet<String> = held.iter().map(|c| c.id.clone()).collect();
        self.since.retain(|id, _| held_ids.contains(id));
        let mut step = Step::default();
        for c in held {
            if firing.contains(c.id.as_str()) {
                self.since.remove(&c.id);
                continue;
            }
            let first = *self.since.entry(c.id.clone()).or_insert(now);
            if now.duration_since(first) >= c.hold {
                self.since.remove(&c.id);
                step.fire.push(c);
            }
        }
        step.resolve = firing
            .iter()
            .filter(|id| !held_ids.contains(**id))
            .map(|id| id.to_string())
            .collect();
        step
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::alerts_config::parse_rules;
    use serde_json::json;

    fn status(offline: &[&str], quorum: bool) -> Value {
        let gws: Vec<Value> = ["a", "b", "c"]
            .iter()
            .map(|n| {
                json!({"name": n, "status": if offline.contains(n) {"offline"} else {"healthy"},
                       "vitals": {"cpuPct": if *n == "b" {95.0} else {10.0}, "memPct": 50.0, "diskPct": 20.0}})
            })
            .collect();
        json!({"gateways": gws, "consensus": {"quorum": quorum, "voters": ["a","b","c"], "reachableVoters": 1}})
    }

    #[test]
    fn conditions_of_each_rule() {
        let rules = parse_rules(&json!([
            {"kind": "gateway-offline"},
            {"kind": "no-quorum"},
            {"kind": "node-disconnected"},
            {"kind": "cpu", "above": 80},
            {"kind": "memory", "above": 80},
        ]))
        .unwrap();
        let nodes = json!({"nodes": [
            {"displayName": "n1", "gateway": "a", "connected": true, "vitals": {"memPct": 99.0}},
            {"displayName": "n2", "gateway": null, "connected": false},
            {"displayName": "n3", "gateway": "c", "connected": false},
        ]});
        let c = conditions(&rules, &status(&["c"], false), &nodes);
        let ids: Vec<&str> = c.iter().map(|c| c.id.as_str()).collect();
        // n3 sits on offline c: covered by c's alert.
        assert_eq!(
            ids,
            vec![
                "gateway-offline/c",
                "no-quorum/federation",
                "node-disconnected/n2",
                "cpu/b",
                "memory/a/n1"
            ]
        );
        assert!(c[1].summary.contains("1 of 3 voters"), "{}", c[1].summary);
        assert_eq!(c[3].value, Some(95.0));
    }

    #[test]
    fn log_lag_of_online_gateways_only() {
        let rules = parse_rules(&json!([{"kind": "log-lag", "above": "2m"}])).unwrap();
        let status = json!({"gateways": [
            {"name": "a", "status": "healthy", "logLagSeconds": 30.0},
            {"name": "b", "status": "healthy", "logLagSeconds": 600.0},
            {"name": "c", "status": "offline", "logLagSeconds": 900.0},
            {"name": "d", "status": "healthy"},
        ]});
        let c = conditions(&rules, &status, &json!({}));
        assert_eq!(c.len(), 1, "{c:?}");
        assert_eq!(c[0].id, "log-lag/b");
        assert!(c[0].summary.contains("600 s behind"), "{}", c[0].summary);
    }

    #[test]
    fn hold_fire_once_and_resolve() {
        let rules = parse_rules(&json!([{"kind": "gateway-offline", "for": 1000}])).unwrap();
        let mut p = Pending::default();
        let t0 = Instant::now();
        let held = || conditions(&rules, &status(&["c"], true), &json!({}));
        assert_eq!(p.step(held(), &[], t0), Step::default());
        let s = p.step(held(), &[], t0 + Duration::from_millis(999));
        assert!(s.fire.is_empty());
        let s = p.step(held(), &[], t0 + Duration::from_millis(1000));
        assert_eq!(s.fire.len(), 1);
        let firing = vec![s.fire[0].id.clone()];
        // Already firing: nothing again.
        let s = p.step(held(), &firing, t0 + Duration::from_secs(5));
        assert_eq!(s, Step::default());
        // Condition gone: resolved.
        let none = conditions(&rules, &status(&[], true), &json!({}));
        let s = p.step(none, &firing, t0 + Duration::from_secs(6));
        assert_eq!(s.resolve, firing);
        // A flap shorter than `for` never fires.
        let s = p.step(held(), &[], t0 + Duration::from_secs(7));
        assert!(s.fire.is_empty());
        let none = conditions(&rules, &status(&[], true), &json!({}));
        p.step(none, &[], t0 + Duration::from_millis(7500));
        let s = p.step(held(), &[], t0 + Duration::from_secs(8));
        assert!(s.fire.is_empty());
    }
}
