//! `alerts.list` (any gateway: the evaluator's book, asked of the evaluator when it is
//! another gateway) and `alerts.sync` (the evaluator's book, pushed to every other gateway).

use std::sync::Arc;
use std::time::Duration;

use clawmesh_federation::rpc::Caller;
use clawmesh_federation::wire::WireError;
use serde_json::{json, Value};

use super::{bad, Methods};
use crate::gateway::alerts::book::{AlertBook, Contents};

/// How long `alerts.list` waits for the evaluator before answering from this gateway's copy:
/// a round trip across continents with room to spare.
const ASK_EVALUATOR: Duration = Duration::from_secs(5);

impl Methods {
    /// The alert book, once the gateway attached it.
    pub fn alerts(&self) -> Option<&Arc<AlertBook>> {
        self.inner.alerts.get()
    }

    /// Attaches the alert book (once, at start).
    pub fn set_alerts(&self, book: Arc<AlertBook>) {
        let _ = self.inner.alerts.set(book);
    }

    /// This gateway's log shipping lag in seconds (see `GatewayLogs::shipping_lag_age`).
    pub fn log_lag_seconds(&self) -> Option<f64> {
        self.inner
            .logs
            .get()?
            .shipping_lag_age()
            .map(|d| d.as_secs_f64())
    }

    /// `alerts.list {local, book}`, `alerts.probe` (this gateway's log lag, for the evaluator)
    /// and `alerts.sync {firing, resolved, evaluator, updatedMs}`.
    pub(super) async fn alerts_method(
        &self,
        caller: &Caller,
        method: &str,
        params: Value,
    ) -> Result<Value, WireError> {
        let book = self
            .alerts()
            .ok_or_else(|| WireError::new("UNAVAILABLE", "alerts starting; retry shortly"))?
            .clone();
        let me = self.gateway_name();
        match method {
            "alerts.list" => {
                let local = params.get("local").and_then(Value::as_bool) == Some(true);
                // `book`: the raw contents, for a gateway taking the duty.
                if params.get("book").and_then(Value::as_bool) == Some(true) {
                    return serde_json::to_value(book.contents())
                        .map_err(|e| WireError::new("UNAVAILABLE", e.to_string()));
                }
                if local || book.on_duty() {
                    return Ok(book.to_json(&me));
                }
                let evaluator = book
                    .contents()
                    .evaluator
                    .or_else(|| self.mesh().ok().and_then(|m| m.status().primary));
                let why = match evaluator.filter(|e| *e != me) {
                    None => "no gateway evaluates the alerts yet".to_string(),
                    Some(e) => match self
                        .call_gateway(
                            caller,
                            &e,
                            "alerts.list",
                            json!({"local": true}),
                            ASK_EVALUATOR,
                        )
                        .await
                    {
                        Ok(v) => return Ok(v),
                        Err(f) => {
                            format!("evaluator {e} did not answer: {}", f.into_wire().message)
                        }
                    },
                };
                let mut v = book.to_json(&me);
                v["stale"] = json!(why);
                Ok(v)
            }
            "alerts.probe" => Ok(json!({"logLagSeconds": self.log_lag_seconds()})),
            "alerts.sync" => {
                let c: Contents = serde_json::from_value(params)
                    .map_err(|e| bad(format!("invalid alerts.sync: {e}")))?;
                book.adopt(c);
                Ok(json!({"ok": true}))
            }
            other => Err(bad(format!("unknown method: {other}"))),
        }
    }
}
