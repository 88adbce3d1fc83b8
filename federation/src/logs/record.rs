//! The log record: one tracing event or one audit entry, as spooled, shipped and stored.
//!
//! Records are postcard on the wire and in the spool (compact, no field names), and JSON
//! only at the operator's edge (`clawmesh logs --json`).

use serde::{Deserialize, Serialize};

/// Severity of a record; audit records are a kind of their own, never filtered by level.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Level {
    /// Something failed.
    Error = 1,
    /// Something looks wrong.
    Warn = 2,
    /// Normal operation.
    Info = 3,
    /// Detail for developers.
    Debug = 4,
    /// Very fine detail.
    Trace = 5,
    /// An audit entry (`node.invoke`): always kept, whatever the level filter says.
    Audit = 6,
}

impl Level {
    /// The lowercase name (`error`, ..., `audit`).
    pub fn as_str(self) -> &'static str {
        match self {
            Level::Error => "error",
            Level::Warn => "warn",
            Level::Info => "info",
            Level::Debug => "debug",
            Level::Trace => "trace",
            Level::Audit => "audit",
        }
    }

    /// The stored number (1 = error ... 5 = trace, 6 = audit).
    pub fn as_u8(self) -> u8 {
        self as u8
    }

    /// Parses the stored number.
    pub fn from_u8(n: u8) -> Option<Level> {
        Some(match n {
            1 => Level::Error,
            2 => Level::Warn,
            3 => Level::Info,
            4 => Level::Debug,
            5 => Level::Trace,
            6 => Level::Audit,
            _ => return None,
        })
    }

    /// Parses a name as operators type it (`warn`, `WARNING`, `audit`).
    pub fn parse(s: &str) -> Option<Level> {
        Some(match s.to_ascii_lowercase().as_str() {
            "error" => Level::Error,
            "warn" | "warning" => Level::Warn,
            "info" => Level::Info,
            "debug" => Level::Debug,
            "trace" => Level::Trace,
            "audit" => Level::Audit,
            _ => return None,
        })
    }

    /// The level of a tracing event.
    pub fn from_tracing(l: &tracing::Level) -> Level {
        match *l {
            tracing::Level::ERROR => Level::Error,
            tracing::Level::WARN => Level::Warn,
            tracing::Level::INFO => Level::Info,
            tracing::Level::DEBUG => Level::Debug,
            _ => Level::Trace,
        }
    }
}

/// How a `node.invoke` ended, as the audit trail records it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Outcome {
    /// The command ran (whatever its exit code).
    Ok,
    /// The node's exec approvals refused it.
    Refused,
    /// It ran past its deadline.
    Timeout,
    /// The caller went away or cancelled.
    Cancelled,
    /// Any other failure (node gone, bad request).
    Error,
}

impl Outcome {
    /// The lowercase name.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::Refused => "refused",
            Outcome::Timeout => "timeout",
            Outcome::Cancelled => "cancelled",
            Outcome::Error => "error",
        }
    }
}

/// Who ran what, where: one `node.invoke` at the gateway that ran it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Audit {
    /// The caller: operator device id, or the token identity (`token:<client>`).
    pub caller: String,
    /// The gateway the request entered the federation at.
    pub entry_gateway: String,
    /// The node that ran it (name).
    pub node: String,
    /// The command (`system.run`, `system.which`, ...).
    pub command: String,
    /// argv for `system.run` (empty otherwise).
    pub argv: Vec<String>,
    /// Exit code, if the command ran to an exit.
    pub exit_code: Option<i32>,
    /// Wall time from dispatch to result.
    pub duration_ms: u64,
    /// How it ended.
    pub outcome: Outcome,
    /// The invoke's idempotency key (the same at the entry gateway, the holder and the node).
    pub key: String,
}

/// One record: what a gateway or node logged, or an audit entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    /// Sequence origin: the gateway's name, or `gateway/node` for a node's records.
    pub origin: String,
    /// Position in the origin's sequence, from 1, without gaps except what a counted limit
    /// dropped.
    pub seq: u64,
    /// Wall clock at the source, ms since the Unix epoch.
    pub ts_ms: u64,
    /// Severity (or [`Level::Audit`]).
    pub level: Level,
    /// The gateway that spooled it.
    pub gateway: String,
    /// The node that logged it (`None`: the gateway itself).
    pub node: Option<String>,
    /// The tracing target (module path).
    pub target: String,
    /// The message with its fields (`message key=value ...`).
    pub message: String,
    /// The audit entry, for [`Level::Audit`].
    pub audit: Option<Audit>,
}

/// A record before the spool numbers it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// Wall clock at the source, ms since the Unix epoch.
    pub ts_ms: u64,
    /// Severity (or [`Level::Audit`]).
    pub level: Level,
    /// The node that logged it (`None`: the gateway itself).
    pub node: Option<String>,
    /// The tracing target.
    pub target: String,
    /// The message with its fields.
    pub message: String,
    /// The audit entry, for [`Level::Audit`].
    pub audit: Option<Audit>,
}

impl Entry {
    /// An audit entry stamped now.
    pub fn audit(audit: Audit) -> Entry {
        let message = audit_line(&audit);
        Entry {
            ts_ms: now_ms(),
            level: Level::Audit,
            node: None,
            target: "audit".into(),
            message,
            audit: Some(audit),
        }
    }
}

/// The one-line text of an audit entry (also what `--grep` searches).
pub fn audit_line(a: &Audit) -> String {
    let argv = if a.argv.is_empty() {
        String::new()
    } else {
        format!(" argv={:?}", a.argv)
    };
    let exit = a
        .exit_code
        .map(|c| format!(" exit={c}"))
        .unwrap_or_default();
    format!(
        "{} {} on {} by {} via {}{argv}{exit} {}ms key={}",
        a.outcome.as_str(),
        a.command,
        a.node,
        a.caller,
        a.entry_gateway,
        a.duration_ms,
        a.key
    )
}

/// Wall clock in ms since the Unix epoch (0 if the clock is before 1970).
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_round_trip() {
        for n in 1..=6u8 {
            let l = Level::from_u8(n).unwrap();
            assert_eq!(l.as_u8(), n);
            assert_eq!(Level::parse(l.as_str()), Some(l));
        }
        assert_eq!(Level::from_u8(0), None);
        assert_eq!(Level::parse("loud"), None);
    }

    #[test]
    fn audit_line_names_everything() {
        let a = Audit {
            caller: "device:ab12".into(),
            entry_gateway: "frankfurt".into(),
            node: "build-1".into(),
            command: "system.run".into(),
            argv: vec!["echo".into(), "hi".into()],
            exit_code: Some(0),
            duration_ms: 12,
            outcome: Outcome::Ok,
            key: "k7".into(),
        };
        let line = audit_line(&a);
        for part in [
            "ok",
            "system.run",
            "build-1",
            "device:ab12",
            "frankfurt",
            "\"echo\"",
            "exit=0",
        ] {
            assert!(line.contains(part), "{line} lacks {part}");
        }
    }
}
