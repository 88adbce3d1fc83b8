//! The shape of `alerts.rules` and `alerts.webhooks` in the shared config: parsed and checked
//! here, used by [`crate::config_schema`] (so `config set` refuses a bad rule fleet-wide) and by
//! the primary's alert evaluator ([`crate::gateway`]).
//!
//! ```json
//! "alerts": {
//!   "rules": [
//!     {"kind": "gateway-offline", "for": "30s"},
//!     {"kind": "cpu", "above": 80, "for": "5m"},
//!     {"kind": "memory", "above": 85},
//!     {"kind": "disk", "above": 90, "name": "disk-full"}
//!   ],
//!   "webhooks": [
//!     {"url": "https://hooks.slack.com/services/...", "format": "slack"},
//!     {"url": "http://10.0.0.5:9000/alerts", "headers": {"Authorization": "Bearer s3cret"}}
//!   ]
//! }
//! ```

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::Value;

/// Rules and webhooks at most: far beyond a fleet's alarm list, small enough that evaluating
/// every rule each tick stays trivial.
pub const MAX_RULES: usize = 64;
/// Webhooks at most (each has its own queue and task).
pub const MAX_WEBHOOKS: usize = 16;

/// What a rule watches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum RuleKind {
    /// A gateway of the federation is offline (missed pings or link closed).
    GatewayOffline,
    /// A paired node is attached to no live gateway.
    NodeDisconnected,
    /// Fewer than a majority of voters are reachable: config writes are refused.
    NoQuorum,
    /// A host's CPU use above `above` %.
    Cpu,
    /// A host's memory use above `above` %.
    Memory,
    /// The disk holding a host's state dir above `above` % full.
    Disk,
    /// A gateway's oldest unshipped log record is older than `above` seconds.
    LogLag,
}

impl RuleKind {
    /// Every kind, for help and errors.
    pub const ALL: [RuleKind; 7] = [
        RuleKind::GatewayOffline,
        RuleKind::NodeDisconnected,
        RuleKind::NoQuorum,
        RuleKind::Cpu,
        RuleKind::Memory,
        RuleKind::Disk,
        RuleKind::LogLag,
    ];

    /// The name in config and notices.
    pub fn as_str(self) -> &'static str {
        match self {
            RuleKind::GatewayOffline => "gateway-offline",
            RuleKind::NodeDisconnected => "node-disconnected",
            RuleKind::NoQuorum => "no-quorum",
            RuleKind::Cpu => "cpu",
            RuleKind::Memory => "memory",
            RuleKind::Disk => "disk",
            RuleKind::LogLag => "log-lag",
        }
    }

    fn parse(s: &str) -> Option<RuleKind> {
        RuleKind::ALL.into_iter().find(|k| k.as_str() == s)
    }

    /// Whether the rule needs a threshold (`above`).
    pub fn has_threshold(self) -> bool {
        matches!(
            self,
            RuleKind::Cpu | RuleKind::Memory | RuleKind::Disk | RuleKind::LogLag
        )
    }
}

/// One alert rule.
#[derive(Debug, Clone, PartialEq)]
pub struct Rule {
    /// Name shown in notices (default: the kind).
    pub name: String,
    /// What it watches.
    pub kind: RuleKind,
    /// Threshold: percent for cpu/memory/disk, seconds for log-lag.
    pub above: f64,
    /// How long the condition must hold before the alert fires.
    pub hold: Duration,
}

/// The rules when `alerts.rules` is not set: the seeds' status-check alarms (a gateway down,
/// no quorum); the host thresholds are the seeds' CloudWatch alarms (CPU > 80 % for 5 minutes,
/// memory > 85 %) plus a nearly full disk.
pub fn default_rules() -> Vec<Rule> {
    let r = |kind: RuleKind, above: f64, hold: u64| Rule {
        name: kind.as_str().into(),
        kind,
        above,
        hold: Duration::from_secs(hold),
    };
    vec![
        r(RuleKind::GatewayOffline, 0.0, 30),
        r(RuleKind::NoQuorum, 0.0, 30),
        r(RuleKind::Cpu, 80.0, 300),
        r(RuleKind::Memory, 85.0, 300),
        r(RuleKind::Disk, 90.0, 60),
    ]
}

/// Body format of a webhook.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Format {
    /// clawmesh's own JSON document (status, alert, federation, sender).
    Json,
    /// `{"text": "..."}`: what Slack (and Mattermost, Rocket.Chat, ...) incoming webhooks take.
    Slack,
}

/// One webhook.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Webhook {
    /// `http://` or `https://` URL.
    pub url: String,
    /// Extra request headers (e.g. `Authorization`).
    pub headers: BTreeMap<String, String>,
    /// Body format.
    pub format: Format,
}

fn duration(v: &Value, what: &str) -> Result<Duration, String> {
    match v {
        Value::Number(n) => n
            .as_u64()
            .map(Duration::from_millis)
            .ok_or_else(|| format!("{what} must be milliseconds or a duration such as \"5m\"")),
        Value::String(s) => humantime::parse_duration(s)
            .map_err(|e| format!("{what} {s:?}: {e} (e.g. \"30s\", \"5m\")")),
        _ => Err(format!(
            "{what} must be milliseconds or a duration such as \"5m\""
        )),
    }
}

/// Parses `alerts.rules` (a list of rule objects).
pub fn parse_rules(v: &Value) -> Result<Vec<Rule>, String> {
    let Value::Array(items) = v else {
        return Err("alerts.rules must be a list of rules such as [{\"kind\": \"cpu\", \"above\": 80, \"for\": \"5m\"}]".into());
    };
    if items.len() > MAX_RULES {
        return Err(format!(
            "alerts.rules: {} rules; at most {MAX_RULES}",
            items.len()
        ));
    }
    let kinds = RuleKind::ALL.map(RuleKind::as_str).join(", ");
    let mut out = Vec::with_capacity(items.len());
    for (i, item) in items.iter().enumerate() {
        let Value::Object(o) = item else {
            return Err(format!("alerts.rules[{i}] must be an object"));
        };
        for k in o.keys() {
            if !matches!(k.as_str(), "kind" | "name" | "above" | "for") {
                return Err(format!(
                    "alerts.rules[{i}]: unknown field {k:?} (kind, name, above, for)"
                ));
            }
        }
        let kind = o
            .get("kind")
            .and_then(Value::as_str)
            .and_then(RuleKind::parse)
            .ok_or_else(|| format!("alerts.rules[{i}].kind must be one of {kinds}"))?;
        let above = match o.get("above") {
            None if kind.has_threshold() => {
                return Err(format!(
                    "alerts.rules[{i}] ({}) needs \"above\"",
                    kind.as_str()
                ))
            }
            None => 0.0,
            Some(a) if kind == RuleKind::LogLag => duration(a, "log-lag \"above\"")
                .map(|d| d.as_secs_f64())
                .or_else(|e| a.as_f64().ok_or(e))?,
            Some(a) => a
                .as_f64()
                .filter(|p| (0.0..=100.0).contains(p))
                .ok_or_else(|| format!("alerts.rules[{i}].above must be a percent 0 to 100"))?,
        };
        let hold = match o.get("for") {
            Some(f) => duration(f, &format!("alerts.rules[{i}].for"))?,
            None => Duration::ZERO,
        };
        let name = match o.get("name") {
            Some(Value::String(s)) if !s.trim().is_empty() => s.clone(),
            Some(_) => return Err(format!("alerts.rules[{i}].name must be a string")),
            None => kind.as_str().to_string(),
        };
        out.push(Rule {
            name,
            kind,
            above,
            hold,
        });
    }
    Ok(out)
}

/// Parses `alerts.webhooks` (a list of webhook objects, or one URL string).
pub fn parse_webhooks(v: &Value) -> Result<Vec<Webhook>, String> {
    let items = match v {
        Value::String(_) => std::slice::from_ref(v),
        Value::Array(items) => items.as_slice(),
        _ => return Err("alerts.webhooks must be a list such as [{\"url\": \"https://...\", \"format\": \"slack\"}]".into()),
    };
    if items.len() > MAX_WEBHOOKS {
        return Err(format!(
            "alerts.webhooks: {} webhooks; at most {MAX_WEBHOOKS}",
            items.len()
        ));
    }
    let mut out = Vec::with_capacity(items.len());
    for (i, item) in items.iter().enumerate() {
        let (url, headers, format) = match item {
            Value::String(u) => (u.clone(), BTreeMap::new(), Format::Json),
            Value::Object(o) => {
                for k in o.keys() {
                    if !matches!(k.as_str(), "url" | "headers" | "format") {
                        return Err(format!(
                            "alerts.webhooks[{i}]: unknown field {k:?} (url, headers, format)"
                        ));
                    }
                }
                let url = o
                    .get("url")
                    .and_then(Value::as_str)
                    .ok_or_else(|| format!("alerts.webhooks[{i}] needs \"url\""))?
                    .to_string();
                let mut headers = BTreeMap::new();
                match o.get("headers") {
                    None => {}
                    Some(Value::Object(h)) => {
                        for (k, v) in h {
                            let v = v.as_str().ok_or_else(|| {
                                format!("alerts.webhooks[{i}].headers.{k} must be a string")
                            })?;
                            headers.insert(k.clone(), v.to_string());
                        }
                    }
                    Some(_) => {
                        return Err(format!(
                            "alerts.webhooks[{i}].headers must be an object of strings"
                        ))
                    }
                }
                let format = match o.get("format").and_then(Value::as_str) {
                    None | Some("json") => Format::Json,
                    Some("slack") => Format::Slack,
                    Some(f) => {
                        return Err(format!(
                            "alerts.webhooks[{i}].format must be \"json\" or \"slack\", not {f:?}"
                        ))
                    }
                };
                (url, headers, format)
            }
            _ => return Err(format!("alerts.webhooks[{i}] must be an object or a URL")),
        };
        if !(url.starts_with("http://") || url.starts_with("https://")) {
            return Err(format!(
                "alerts.webhooks[{i}].url must start with http:// or https://, not {url:?}"
            ));
        }
        out.push(Webhook {
            url,
            headers,
            format,
        });
    }
    Ok(out)
}

/// `config_schema` check for `alerts.rules`.
pub fn check_rules(v: &Value) -> Result<(), String> {
    parse_rules(v).map(|_| ())
}

/// `config_schema` check for `alerts.webhooks`.
pub fn check_webhooks(v: &Value) -> Result<(), String> {
    parse_webhooks(v).map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn rules_parse_and_refuse_with_the_field_named() {
        let r = parse_rules(&json!([
            {"kind": "gateway-offline"},
            {"kind": "cpu", "above": 80, "for": "5m"},
            {"kind": "log-lag", "above": "2m", "name": "slow logs"},
        ]))
        .unwrap();
        assert_eq!(r[0].kind, RuleKind::GatewayOffline);
        assert_eq!(r[0].hold, Duration::ZERO);
        assert_eq!(r[1].hold, Duration::from_secs(300));
        assert_eq!(r[1].above, 80.0);
        assert_eq!(r[2].above, 120.0);
        assert_eq!(r[2].name, "slow logs");
        let e = parse_rules(&json!([{"kind": "cpu"}])).unwrap_err();
        assert!(e.contains("needs \"above\""), "{e}");
        let e = parse_rules(&json!([{"kind": "fire"}])).unwrap_err();
        assert!(e.contains("gateway-offline, node-disconnected"), "{e}");
        let e = parse_rules(&json!([{"kind": "memory", "above": 150}])).unwrap_err();
        assert!(e.contains("percent"), "{e}");
        let e = parse_rules(&json!([{"kind": "disk", "above": 9, "for": "soon"}])).unwrap_err();
        assert!(e.contains("alerts.rules[0].for"), "{e}");
        assert!(parse_rules(&json!({"kind": "cpu"})).is_err());
    }

    #[test]
    fn webhooks_parse_and_refuse() {
        let w = parse_webhooks(&json!([
            "http://127.0.0.1:9/a",
            {"url": "https://x/y", "format": "slack", "headers": {"Authorization": "Bearer t"}},
        ]))
        .unwrap();
        assert_eq!(w[0].format, Format::Json);
        assert_eq!(w[1].format, Format::Slack);
        assert_eq!(w[1].headers["Authorization"], "Bearer t");
        assert!(parse_webhooks(&json!(["ftp://x"])).is_err());
        assert!(parse_webhooks(&json!([{"url": "http://x", "format": "xml"}])).is_err());
        assert!(parse_webhooks(&json!([{"url": "http://x", "headers": {"a": 1}}])).is_err());
    }
}
