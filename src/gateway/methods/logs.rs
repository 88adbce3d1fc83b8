//! `logs.query` (any gateway; the primary's collector answers) and `node.logs` (a node's
//! records into this gateway's spool).

use clawmesh_federation::logs::collector::Query;
use clawmesh_federation::logs::record::{Entry, Level};
use clawmesh_federation::rpc::{Caller, CallerKind};
use clawmesh_federation::wire::WireError;
use serde_json::{json, Value};

use super::{bad, Methods};
use crate::gateway::logs::{GatewayLogs, MAX_NODE_BATCH};

impl Methods {
    fn logs(&self) -> Result<&GatewayLogs, WireError> {
        self.inner.logs.get().ok_or_else(|| {
            let mut e = WireError::new("UNAVAILABLE", "logs starting; retry shortly");
            e.retryable = true;
            e
        })
    }

    /// Hands `logging.export.otlp.*` to the log export (nothing until the logs started).
    pub(crate) fn set_otlp_export(&self, s: crate::gateway::otlp_export::OtlpSettings) {
        if let Some(l) = self.inner.logs.get() {
            l.set_otlp(s);
        }
    }

    /// `logs.query {since, gateway, node, level, grep, audit, afterId, limit, waitMs}` and
    /// `node.logs {entries, lost}`.
    pub(super) async fn logs_method(
        &self,
        caller: &Caller,
        method: &str,
        params: Value,
    ) -> Result<Value, WireError> {
        match method {
            "logs.query" => {
                let s = |k: &str| params.get(k).and_then(Value::as_str).map(str::to_string);
                let u = |k: &str| params.get(k).and_then(Value::as_u64);
                let level = match s("level") {
                    Some(l) => Some(Level::parse(&l).ok_or_else(|| {
                        bad(format!(
                            "unknown level {l:?} (error, warn, info, debug, trace)"
                        ))
                    })?),
                    None => None,
                };
                let local = params
                    .get("local")
                    .and_then(Value::as_bool)
                    .unwrap_or(false);
                let q = Query {
                    since_ms: u("sinceMs"),
                    // `local`: this gateway's own records (the CLI without --all).
                    gateway: s("gateway").or_else(|| local.then(|| self.gateway_name())),
                    node: s("node"),
                    level,
                    grep: s("grep"),
                    audit: params
                        .get("audit")
                        .and_then(Value::as_bool)
                        .unwrap_or(false),
                    after_id: params.get("afterId").and_then(Value::as_i64),
                    limit: u("limit").unwrap_or(1000) as usize,
                    wait_ms: u("waitMs").unwrap_or(0),
                };
                let (collector, reply) = self.logs()?.query(&q).await?;
                let mut v = serde_json::to_value(&reply)
                    .map_err(|e| WireError::new("UNAVAILABLE", e.to_string()))?;
                v["collector"] = json!(collector);
                Ok(v)
            }
            "node.logs" => {
                let CallerKind::Node { name } = &caller.kind else {
                    return Err(bad("node.logs is sent by nodes only"));
                };
                let entries: Vec<Entry> =
                    serde_json::from_value(params.get("entries").cloned().unwrap_or(json!([])))
                        .map_err(|e| bad(format!("invalid node.logs entries: {e}")))?;
                if entries.len() > MAX_NODE_BATCH {
                    return Err(bad(format!(
                        "{} records in one node.logs; at most {MAX_NODE_BATCH}",
                        entries.len()
                    )));
                }
                let lost = params.get("lost").and_then(Value::as_u64).unwrap_or(0);
                let n = entries.len();
                self.logs()?.from_node(name, entries, lost);
                Ok(json!({"ok": true, "accepted": n}))
            }
            other => Err(bad(format!("unknown method: {other}"))),
        }
    }
}
