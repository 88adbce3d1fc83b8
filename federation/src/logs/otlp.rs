//! OTLP/HTTP log export encoding: stored records as an OpenTelemetry
//! `ExportLogsServiceRequest` (protobuf), the body of `POST /v1/logs`.
//!
//! The messages are the subset of the OpenTelemetry protocol's `.proto` definitions
//! (opentelemetry-proto v1: `collector/logs/v1`, `logs/v1`, `common/v1`, `resource/v1`) that a
//! log export writes, declared with prost's derive exactly as prost-build generates them from
//! those files (same field numbers and wire types), so the build needs no `protoc`. Fields we
//! never write are left out: protobuf readers treat them as absent.
//!
//! Mapping: one `ResourceLogs` per origin (`service.name` = the origin, plus
//! `clawmesh.gateway` and `clawmesh.node`), one scope `clawmesh`, one `LogRecord` per record
//! with the message as its string body, the severity mapped to OTLP's numbers, and the
//! attributes `clawmesh.origin` and `clawmesh.seq` (receivers dedupe by them: a batch may
//! arrive twice after a crash), `clawmesh.target`, and for audit records `clawmesh.audit.*`.

use std::collections::BTreeMap;

use prost::Message;

use super::collector::Stored;
use super::record::Level;

/// `opentelemetry.proto.collector.logs.v1.ExportLogsServiceRequest`.
#[derive(Clone, PartialEq, Message)]
pub struct ExportLogsServiceRequest {
    /// Field 1.
    #[prost(message, repeated, tag = "1")]
    pub resource_logs: Vec<ResourceLogs>,
}

/// `opentelemetry.proto.logs.v1.ResourceLogs`.
#[derive(Clone, PartialEq, Message)]
pub struct ResourceLogs {
    /// Field 1.
    #[prost(message, optional, tag = "1")]
    pub resource: Option<Resource>,
    /// Field 2.
    #[prost(message, repeated, tag = "2")]
    pub scope_logs: Vec<ScopeLogs>,
    /// Field 3.
    #[prost(string, tag = "3")]
    pub schema_url: String,
}

/// `opentelemetry.proto.resource.v1.Resource`.
#[derive(Clone, PartialEq, Message)]
pub struct Resource {
    /// Field 1.
    #[prost(message, repeated, tag = "1")]
    pub attributes: Vec<KeyValue>,
    /// Field 2.
    #[prost(uint32, tag = "2")]
    pub dropped_attributes_count: u32,
}

/// `opentelemetry.proto.logs.v1.ScopeLogs`.
#[derive(Clone, PartialEq, Message)]
pub struct ScopeLogs {
    /// Field 1.
    #[prost(message, optional, tag = "1")]
    pub scope: Option<InstrumentationScope>,
    /// Field 2.
    #[prost(message, repeated, tag = "2")]
    pub log_records: Vec<LogRecord>,
    /// Field 3.
    #[prost(string, tag = "3")]
    pub schema_url: String,
}

/// `opentelemetry.proto.common.v1.InstrumentationScope`.
#[derive(Clone, PartialEq, Message)]
pub struct InstrumentationScope {
    /// Field 1.
    #[prost(string, tag = "1")]
    pub name: String,
    /// Field 2.
    #[prost(string, tag = "2")]
    pub version: String,
}

/// `opentelemetry.proto.logs.v1.LogRecord`.
#[derive(Clone, PartialEq, Message)]
pub struct LogRecord {
    /// Field 1.
    #[prost(fixed64, tag = "1")]
    pub time_unix_nano: u64,
    /// Field 11.
    #[prost(fixed64, tag = "11")]
    pub observed_time_unix_nano: u64,
    /// Field 2 (`SeverityNumber`).
    #[prost(int32, tag = "2")]
    pub severity_number: i32,
    /// Field 3.
    #[prost(string, tag = "3")]
    pub severity_text: String,
    /// Field 5.
    #[prost(message, optional, tag = "5")]
    pub body: Option<AnyValue>,
    /// Field 6.
    #[prost(message, repeated, tag = "6")]
    pub attributes: Vec<KeyValue>,
    /// Field 12.
    #[prost(string, tag = "12")]
    pub event_name: String,
}

/// `opentelemetry.proto.common.v1.KeyValue`.
#[derive(Clone, PartialEq, Message)]
pub struct KeyValue {
    /// Field 1.
    #[prost(string, tag = "1")]
    pub key: String,
    /// Field 2.
    #[prost(message, optional, tag = "2")]
    pub value: Option<AnyValue>,
}

/// `opentelemetry.proto.common.v1.AnyValue` (the kinds we write).
#[derive(Clone, PartialEq, Message)]
pub struct AnyValue {
    /// The `value` oneof.
    #[prost(oneof = "Value", tags = "1, 3")]
    pub value: Option<Value>,
}

/// `AnyValue.value`.
#[derive(Clone, PartialEq, prost::Oneof)]
pub enum Value {
    /// Field 1.
    #[prost(string, tag = "1")]
    StringValue(String),
    /// Field 3.
    #[prost(int64, tag = "3")]
    IntValue(i64),
}

fn kv_str(key: &str, v: &str) -> KeyValue {
    KeyValue {
        key: key.to_string(),
        value: Some(AnyValue {
            value: Some(Value::StringValue(v.to_string())),
        }),
    }
}

fn kv_int(key: &str, v: i64) -> KeyValue {
    KeyValue {
        key: key.to_string(),
        value: Some(AnyValue {
            value: Some(Value::IntValue(v)),
        }),
    }
}

/// OTLP's `SeverityNumber` for a level (audit records are INFO with event name
/// `clawmesh.audit`).
pub fn severity(level: Level) -> (i32, &'static str) {
    match level {
        Level::Trace => (1, "TRACE"),
        Level::Debug => (5, "DEBUG"),
        Level::Info => (9, "INFO"),
        Level::Warn => (13, "WARN"),
        Level::Error => (17, "ERROR"),
        Level::Audit => (9, "AUDIT"),
    }
}

/// The request for `records`, grouped by origin (each origin's records in store order).
pub fn request(records: &[Stored]) -> ExportLogsServiceRequest {
    let mut by_origin: BTreeMap<&str, Vec<&Stored>> = BTreeMap::new();
    for s in records {
        by_origin.entry(&s.record.origin).or_default().push(s);
    }
    let resource_logs = by_origin
        .into_iter()
        .map(|(origin, recs)| {
            let first = &recs[0].record;
            let mut attributes = vec![
                kv_str("service.name", origin),
                kv_str("clawmesh.gateway", &first.gateway),
            ];
            if let Some(n) = &first.node {
                attributes.push(kv_str("clawmesh.node", n));
            }
            ResourceLogs {
                resource: Some(Resource {
                    attributes,
                    dropped_attributes_count: 0,
                }),
                scope_logs: vec![ScopeLogs {
                    scope: Some(InstrumentationScope {
                        name: "clawmesh".into(),
                        version: env!("CARGO_PKG_VERSION").into(),
                    }),
                    log_records: recs.iter().map(|s| log_record(s)).collect(),
                    schema_url: String::new(),
                }],
                schema_url: String::new(),
            }
        })
        .collect();
    ExportLogsServiceRequest { resource_logs }
}

fn log_record(s: &Stored) -> LogRecord {
    let r = &s.record;
    let (number, text) = severity(r.level);
    let mut attributes = vec![
        kv_str("clawmesh.origin", &r.origin),
        kv_int("clawmesh.seq", r.seq.min(i64::MAX as u64) as i64),
        kv_str("clawmesh.target", &r.target),
    ];
    if let Some(a) = &r.audit {
        attributes.extend([
            kv_str("clawmesh.audit.caller", &a.caller),
            kv_str("clawmesh.audit.entry_gateway", &a.entry_gateway),
            kv_str("clawmesh.audit.node", &a.node),
            kv_str("clawmesh.audit.command", &a.command),
            kv_str("clawmesh.audit.outcome", a.outcome.as_str()),
            kv_int("clawmesh.audit.duration_ms", a.duration_ms as i64),
        ]);
        if let Some(c) = a.exit_code {
            attributes.push(kv_int("clawmesh.audit.exit_code", c.into()));
        }
        if !a.argv.is_empty() {
            attributes.push(kv_str(
                "clawmesh.audit.argv",
                &serde_json::to_string(&a.argv).unwrap_or_default(),
            ));
        }
    }
    let nanos = r.ts_ms.saturating_mul(1_000_000);
    LogRecord {
        time_unix_nano: nanos,
        observed_time_unix_nano: nanos,
        severity_number: number,
        severity_text: text.into(),
        body: Some(AnyValue {
            value: Some(Value::StringValue(r.message.clone())),
        }),
        attributes,
        event_name: if r.audit.is_some() {
            "clawmesh.audit".into()
        } else {
            String::new()
        },
    }
}

/// The protobuf body of `POST /v1/logs` for `records`.
pub fn encode(records: &[Stored]) -> Vec<u8> {
    request(records).encode_to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::logs::record::Record;

    #[test]
    fn round_trips_through_prost_and_keeps_origin_and_seq() {
        let rec = |origin: &str, seq| Stored {
            id: seq as i64,
            record: Record {
                origin: origin.into(),
                seq,
                ts_ms: 1_700_000_000_000,
                level: Level::Warn,
                gateway: "tokyo".into(),
                node: None,
                target: "t".into(),
                message: format!("m{seq}"),
                audit: None,
            },
        };
        let body = encode(&[rec("tokyo", 1), rec("tokyo/n1", 1), rec("tokyo", 2)]);
        let back = ExportLogsServiceRequest::decode(&body[..]).unwrap();
        assert_eq!(back.resource_logs.len(), 2);
        let tokyo = &back.resource_logs[0].scope_logs[0].log_records;
        assert_eq!(tokyo.len(), 2);
        assert_eq!(tokyo[1].severity_number, 13);
        assert_eq!(tokyo[1].time_unix_nano, 1_700_000_000_000_000_000);
        assert_eq!(
            tokyo[1].attributes[1].value,
            Some(AnyValue {
                value: Some(Value::IntValue(2))
            })
        );
    }
}
