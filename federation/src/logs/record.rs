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

/// Encoded records back to back, each behind its length (4 bytes, little endian): how the
/// spool hands a batch to the shipper and how a batch crosses the mesh, so the stored
/// encodings travel as one byte string (one allocation per batch, not one per record) and
/// the collector decodes each record in place.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Frames {
    bytes: Vec<u8>,
    count: usize,
}

impl Frames {
    /// Appends one record's encoding.
    pub fn push(&mut self, body: &[u8]) {
        self.bytes
            .extend_from_slice(&(body.len() as u32).to_le_bytes());
        self.bytes.extend_from_slice(body);
        self.count += 1;
    }

    /// How many records.
    pub fn len(&self) -> usize {
        self.count
    }

    /// Whether there is none.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// The encodings in order; a truncated frame ends the walk with an error.
    pub fn iter(&self) -> impl Iterator<Item = Result<&[u8], String>> + '_ {
        let mut rest = &self.bytes[..];
        std::iter::from_fn(move || {
            if rest.is_empty() {
                return None;
            }
            let Some((len, tail)) = rest.split_first_chunk::<4>() else {
                rest = &[];
                return Some(Err("truncated frame length".to_string()));
            };
            let len = u32::from_le_bytes(*len) as usize;
            if tail.len() < len {
                rest = &[];
                return Some(Err(format!("frame of {len} bytes, {} left", tail.len())));
            }
            let (body, tail) = tail.split_at(len);
            rest = tail;
            Some(Ok(body))
        })
    }

    /// Every record, decoded.
    pub fn records(&self) -> Result<Vec<Record>, String> {
        self.iter()
            .map(|b| b.and_then(|b| postcard::from_bytes(b).map_err(|e| e.to_string())))
            .collect()
    }
}

impl Serialize for Frames {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(&self.bytes)
    }
}

impl<'de> Deserialize<'de> for Frames {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Frames, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = Vec<u8>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("record frames")
            }
            fn visit_bytes<E: serde::de::Error>(self, v: &[u8]) -> Result<Vec<u8>, E> {
                Ok(v.to_vec())
            }
            fn visit_byte_buf<E: serde::de::Error>(self, v: Vec<u8>) -> Result<Vec<u8>, E> {
                Ok(v)
            }
        }
        let bytes = d.deserialize_byte_buf(V)?;
        let mut f = Frames { bytes, count: 0 };
        let mut count = 0;
        for r in f.iter() {
            r.map_err(serde::de::Error::custom)?;
            count += 1;
        }
        f.count = count;
        Ok(f)
    }
}

/// A stored record read in place (the collector's insert path): the same encoding as
/// [`Record`], its text borrowed from the batch instead of copied.
#[derive(Debug, Deserialize)]
pub struct RecordRef<'a> {
    /// See [`Record::origin`].
    pub origin: &'a str,
    /// See [`Record::seq`].
    pub seq: u64,
    /// See [`Record::ts_ms`].
    pub ts_ms: u64,
    /// See [`Record::level`].
    pub level: Level,
    /// See [`Record::gateway`].
    pub gateway: &'a str,
    /// See [`Record::node`].
    pub node: Option<&'a str>,
    /// See [`Record::target`].
    pub target: &'a str,
    /// See [`Record::message`].
    pub message: &'a str,
    /// See [`Record::audit`].
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
