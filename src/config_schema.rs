//! The typed rules of every config key clawmesh reads: one table, used both when a gateway
//! parses its `clawmesh.json` ([`crate::config`]) and when `config set` / `config import`
//! writes the shared config ([`crate::gateway`]), so a value refused at start is refused
//! fleet-wide too. Free-form sections (`models.*`, `skills.*`, ...) have no rules here and
//! stay free-form.

use serde_json::Value;

/// What a key's value must be.
#[derive(Debug, Clone, Copy)]
pub enum Kind {
    /// Any JSON string.
    Str,
    /// `true` or `false`.
    Bool,
    /// An integer in `min..=max`; `unit` is shown in the error (e.g. "ms").
    Int {
        /// Smallest allowed value.
        min: u64,
        /// Largest allowed value.
        max: u64,
        /// Unit for messages, or "".
        unit: &'static str,
    },
    /// One of these strings.
    OneOf(&'static [&'static str]),
    /// A string, or a list of strings.
    Strings,
    /// A log filter such as `info` or `info,clawmesh_federation=debug`.
    LogFilter,
    /// A structured value checked by its own parser (`what` describes it in errors).
    Checked {
        /// What the value must be, in words.
        what: &'static str,
        /// The parser's check: the error names the field at fault.
        check: fn(&Value) -> Result<(), String>,
    },
}

/// The typed keys. The bounds are the ones the gateway enforces where it uses the value (see
/// `gateway/settings.rs` and `gateway/followers.rs`); keeping them here lets every path
/// refuse a bad value before it is stored.
const RULES: &[(&str, Kind)] = &[
    ("gateway.mode", Kind::Str),
    ("gateway.name", Kind::Str),
    ("gateway.nodeName", Kind::Str),
    ("gateway.region", Kind::Str),
    ("gateway.primaryUrl", Kind::Str),
    (
        "gateway.port",
        Kind::Int {
            min: 0,
            max: 65_535,
            unit: "",
        },
    ),
    (
        "gateway.remote.listenPort",
        Kind::Int {
            min: 0,
            max: 65_535,
            unit: "",
        },
    ),
    ("gateway.bind", Kind::Str),
    ("gateway.advertise", Kind::Str),
    ("gateway.authToken", Kind::Str),
    ("gateway.remote.authToken", Kind::Str),
    ("gateway.remote.url", Kind::Str),
    ("gateway.remote.token", Kind::Str),
    ("gateway.auth.token", Kind::Str),
    ("gateway.tls.auto", Kind::Bool),
    ("gateway.tls.cert", Kind::Str),
    ("gateway.tls.key", Kind::Str),
    ("gateway.sync.syncModels", Kind::Bool),
    ("gateway.sync.syncSkills", Kind::Bool),
    ("gateway.sync.syncSecurity", Kind::Bool),
    ("gateway.sync.overrideLocal", Kind::Bool),
    ("gateway.sync.compression", Kind::Bool),
    ("gateway.sync.deltaSync", Kind::Bool),
    (
        "gateway.sync.batchSize",
        Kind::Int {
            min: 1,
            max: 10_000,
            unit: "",
        },
    ),
    (
        "gateway.federation.maxVoters",
        Kind::Int {
            min: 1,
            max: 9,
            unit: "",
        },
    ),
    (
        "gateway.federation.heartbeat",
        Kind::Int {
            min: 100,
            max: 60_000,
            unit: "ms",
        },
    ),
    ("gateway.failover.enabled", Kind::Bool),
    (
        "gateway.failover.healthCheckInterval",
        Kind::Int {
            min: 10,
            max: 3_600_000,
            unit: "ms",
        },
    ),
    (
        "gateway.failover.unhealthyThreshold",
        Kind::Int {
            min: 1,
            max: 1000,
            unit: "",
        },
    ),
    ("gateway.failover.fallbackNode", Kind::Str),
    ("gateway.upstream.url", Kind::Str),
    ("gateway.upstream.token", Kind::Str),
    ("gateway.upstream.tlsFingerprint", Kind::Str),
    ("gateway.upstream.nodes", Kind::Strings),
    ("gateway.upstream.autoApprove", Kind::Bool),
    ("logging.level", Kind::LogFilter),
    // OTLP/HTTP log export from the collector (gateway/otlp_export.rs); `.headers` is an
    // object of strings, checked where it is applied.
    ("logging.export.otlp.endpoint", Kind::Str),
    (
        "logging.export.otlp.batchSize",
        Kind::Int {
            min: 1,
            max: 100_000,
            unit: "records",
        },
    ),
    ("node.name", Kind::Str),
    ("node.gateways", Kind::Strings),
    ("node.security", Kind::OneOf(&["deny", "allowlist", "full"])),
    (
        "security.exec.defaultLevel",
        Kind::OneOf(&["deny", "allowlist", "full"]),
    ),
    (
        "alerts.rules",
        Kind::Checked {
            what: "a list of alert rules",
            check: crate::alerts_config::check_rules,
        },
    ),
    (
        "alerts.webhooks",
        Kind::Checked {
            what: "a list of webhooks",
            check: crate::alerts_config::check_webhooks,
        },
    ),
];

/// The rule of `key`, if clawmesh types it.
pub fn rule(key: &str) -> Option<Kind> {
    RULES.iter().find(|(k, _)| *k == key).map(|(_, r)| *r)
}

/// The typed keys and their rules, for help and documentation.
pub fn rules() -> impl Iterator<Item = (&'static str, Kind)> {
    RULES.iter().copied()
}

/// Checks `value` for `key`; `Ok` for keys without a rule (free-form). `null` is "not set"
/// and always allowed. The error names the key, what it must be and what it got.
pub fn check(key: &str, value: &Value) -> Result<(), String> {
    let Some(kind) = rule(key) else {
        return Ok(());
    };
    if value.is_null() {
        return Ok(());
    }
    if let Kind::Checked { check, .. } = kind {
        return check(value);
    }
    let ok = match (kind, value) {
        (Kind::Str, Value::String(_)) | (Kind::Bool, Value::Bool(_)) => true,
        (Kind::Int { min, max, .. }, Value::Number(n)) => {
            n.as_u64().is_some_and(|v| (min..=max).contains(&v))
        }
        (Kind::OneOf(allowed), Value::String(s)) => allowed.contains(&s.as_str()),
        (Kind::Strings, Value::String(_)) => true,
        (Kind::Strings, Value::Array(items)) => items.iter().all(Value::is_string),
        (Kind::LogFilter, Value::String(s)) => tracing_subscriber::EnvFilter::try_new(s).is_ok(),
        _ => false,
    };
    if ok {
        Ok(())
    } else {
        Err(format!("{key} must be {}, not {value}", describe(kind)))
    }
}

/// What a rule asks for, in words.
pub fn describe(kind: Kind) -> String {
    match kind {
        Kind::Str => "a string".into(),
        Kind::Bool => "true or false".into(),
        Kind::Int { min, max, unit: "" } => format!("an integer {min} to {max}"),
        Kind::Int { min, max, unit } => format!("an integer {min} to {max} ({unit})"),
        Kind::OneOf(allowed) => allowed
            .iter()
            .map(|a| format!("{a:?}"))
            .collect::<Vec<_>>()
            .join(", ")
            .replacen(", ", " or ", usize::from(allowed.len() == 2)),
        Kind::Strings => "a string or a list of strings".into(),
        Kind::LogFilter => "a log filter such as \"info\" or \"info,clawmesh=debug\"".into(),
        Kind::Checked { what, .. } => what.into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn typed_keys_refuse_bad_values_and_free_form_stays_free() {
        let e = check("gateway.failover.healthCheckInterval", &json!("fast")).unwrap_err();
        assert!(
            e.contains("healthCheckInterval must be an integer 10 to 3600000"),
            "{e}"
        );
        assert!(check("gateway.failover.healthCheckInterval", &json!(5)).is_err());
        assert!(check("gateway.failover.healthCheckInterval", &json!(500)).is_ok());
        let e = check("security.exec.defaultLevel", &json!("yolo")).unwrap_err();
        assert!(e.contains("\"deny\", \"allowlist\", \"full\""), "{e}");
        assert!(check("security.exec.defaultLevel", &json!("full")).is_ok());
        assert!(check("logging.level", &json!("info,clawmesh=debug")).is_ok());
        assert!(check("logging.level", &json!(3)).is_err());
        assert!(check("models.default", &json!({"any": [1, "thing"]})).is_ok());
        assert!(check("security.other", &json!(1)).is_ok());
        assert!(check("gateway.failover.unhealthyThreshold", &Value::Null).is_ok());
    }
}
