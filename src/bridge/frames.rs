//! Classic OpenClaw frames: `req`, `res` and `event` envelopes as JSON text.

use clawmesh_federation::wire::WireError;
use serde::Deserialize;
use serde_json::{json, Map, Value};

/// An inbound frame (clients only send requests).
#[derive(Debug, Deserialize)]
pub struct Inbound {
    /// Frame kind: `req` for every client frame.
    #[serde(rename = "type")]
    pub kind: Option<String>,
    /// Request id, echoed in the response (any JSON value is echoed as is).
    pub id: Option<Value>,
    /// Method name.
    pub method: Option<String>,
    /// Params.
    pub params: Option<Value>,
}

/// The error object of a `res` frame: `code` and `message` always non-empty.
pub fn error_object(e: &WireError) -> Value {
    let mut obj = Map::new();
    let code = if e.code.is_empty() {
        "UNAVAILABLE"
    } else {
        &e.code
    };
    let message = if e.message.is_empty() {
        "error"
    } else {
        &e.message
    };
    obj.insert("code".into(), json!(code));
    obj.insert("message".into(), json!(message));
    if let Some(d) = &e.details {
        let v: Value = serde_json::from_str(d).unwrap_or_else(|_| json!(d));
        if let Some(ms) = v.get("retryAfterMs").cloned() {
            obj.insert("retryAfterMs".into(), ms);
        }
        obj.insert("details".into(), v);
    }
    if e.retryable {
        obj.insert("retryable".into(), json!(true));
    }
    Value::Object(obj)
}

/// A successful response.
pub fn res_ok(id: &Value, payload: Value) -> String {
    json!({"type": "res", "id": id, "ok": true, "payload": payload}).to_string()
}

/// A failed response.
pub fn res_err(id: &Value, e: &WireError) -> String {
    json!({"type": "res", "id": id, "ok": false, "error": error_object(e)}).to_string()
}

/// An event; `seq` only on broadcast-style events.
pub fn event(name: &str, payload: Value, seq: Option<u64>) -> String {
    match seq {
        Some(s) => {
            json!({"type": "event", "event": name, "payload": payload, "seq": s}).to_string()
        }
        None => json!({"type": "event", "event": name, "payload": payload}).to_string(),
    }
}

/// A classic error with JSON details.
pub fn err_with(code: &str, message: impl Into<String>, details: Value) -> WireError {
    let mut e = WireError::new(code, message);
    e.details = Some(details.to_string());
    e
}

/// Truncates a close reason to what WebSocket allows (123 bytes; the classic gateway uses 120),
/// on a character boundary.
pub fn close_reason(reason: &str) -> String {
    let mut end = reason.len().min(120);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    reason[..end].to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes() {
        let e = err_with("NOT_PAIRED", "x", json!({"code": "PAIRING_REQUIRED"}));
        let v: Value = serde_json::from_str(&res_err(&json!("1:a"), &e)).unwrap();
        assert_eq!(v["error"]["details"]["code"], "PAIRING_REQUIRED");
        assert_eq!(v["id"], "1:a");
        let v: Value = serde_json::from_str(&event("tick", json!({"ts": 1}), Some(3))).unwrap();
        assert_eq!(v["seq"], 3);
        assert!(close_reason(&"é".repeat(100)).len() <= 120);
    }
}
