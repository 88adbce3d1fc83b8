//! The client side of the classic handshake and of a plain request, as `openclaw node run` and
//! the `openclaw` CLI speak them: wait for `connect.challenge`, send `connect` (signed with a
//! device key when there is one), read `hello-ok` or the refusal.

use std::time::Duration;

use base64::Engine as _;
use clawmesh_federation::identity::DeviceIdentity;
use futures_util::{SinkExt as _, StreamExt as _};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

use super::dial::Ws;
use super::UpstreamError;

/// How long to wait for the challenge, and then for `hello-ok`: the classic client's own 15 s
/// each (`OPENCLAW_CONNECT_CHALLENGE_TIMEOUT_MS`, connect timeout).
const HANDSHAKE_STEP: Duration = Duration::from_secs(15);

/// How long one operator request may take (pairing list and approve answer at once; 10 s is
/// the CLI's own `gateway call` default).
const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// Frames read while waiting for one answer before giving up: events (ticks, presence) are
/// skipped, but not without end.
const MAX_SKIPPED: usize = 10_000;

/// What the challenge gave: the nonce to sign and the server time to sign it at.
pub struct Challenge {
    /// `payload.nonce`.
    pub nonce: String,
    /// `payload.ts` (ms), used verbatim as `device.signedAt`.
    pub ts: u64,
}

/// The `device` object of a `connect`: the v3 signature over
/// `v3|id|clientId|mode|role|scopes|signedAt|token|nonce|platform|deviceFamily`
/// (platform and family lowercased), exactly what OpenClaw's clients sign.
#[allow(clippy::too_many_arguments)]
pub fn device_proof(
    key: &DeviceIdentity,
    client_id: &str,
    mode: &str,
    role: &str,
    scopes: &[&str],
    token: &str,
    ch: &Challenge,
    platform: &str,
    family: &str,
) -> Value {
    let id = key.device_id().to_string();
    let payload = format!(
        "v3|{id}|{client_id}|{mode}|{role}|{}|{}|{token}|{}|{}|{}",
        scopes.join(","),
        ch.ts,
        ch.nonce,
        platform.trim().to_ascii_lowercase(),
        family.trim().to_ascii_lowercase(),
    );
    let sig = key.sign(payload.as_bytes());
    json!({
        "id": id,
        "publicKey": key.public_key().to_base64url(),
        "signature": base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(sig),
        "signedAt": ch.ts,
        "nonce": ch.nonce,
    })
}

/// Reads the next JSON frame, answering nothing (tungstenite queues pongs itself); None when
/// the socket closed.
pub async fn next_frame(ws: &mut Ws) -> Result<Option<Value>, UpstreamError> {
    loop {
        match ws.next().await {
            None => return Ok(None),
            Some(Err(e)) => return Err(UpstreamError::Closed(e.to_string())),
            Some(Ok(Message::Text(t))) => {
                return serde_json::from_str(t.as_str())
                    .map(Some)
                    .map_err(|e| UpstreamError::Protocol(format!("frame is not JSON: {e}")))
            }
            Some(Ok(Message::Close(c))) => {
                return Err(UpstreamError::Closed(
                    c.map(|c| format!("{} {}", u16::from(c.code), c.reason))
                        .unwrap_or_else(|| "closed".into()),
                ))
            }
            Some(Ok(_)) => {}
        }
    }
}

/// Sends one JSON frame.
pub async fn send(ws: &mut Ws, v: &Value) -> Result<(), UpstreamError> {
    ws.send(Message::text(v.to_string()))
        .await
        .map_err(|e| UpstreamError::Closed(e.to_string()))
}

/// The refusal in a `res` frame's `error`.
fn refusal(e: &Value) -> UpstreamError {
    UpstreamError::Refused {
        code: e["code"].as_str().unwrap_or("UNKNOWN").to_string(),
        message: e["message"].as_str().unwrap_or("").to_string(),
        details: e["details"].clone(),
    }
}

/// Waits for `res` to request `id`, skipping events; `Ok(payload)` or the refusal.
async fn answer(ws: &mut Ws, id: &str) -> Result<Value, UpstreamError> {
    for _ in 0..MAX_SKIPPED {
        let Some(f) = next_frame(ws).await? else {
            return Err(UpstreamError::Closed("closed before answering".into()));
        };
        if f["type"] == "res" && f["id"] == id {
            return if f["ok"] == true {
                Ok(f["payload"].clone())
            } else {
                Err(refusal(&f["error"]))
            };
        }
    }
    Err(UpstreamError::Protocol(format!(
        "no answer to {id} in {MAX_SKIPPED} frames"
    )))
}

/// The handshake: challenge, `connect` (built by `params` from the challenge), `hello-ok`.
pub async fn handshake(
    ws: &mut Ws,
    params: impl FnOnce(&Challenge) -> Value,
) -> Result<Value, UpstreamError> {
    let ch = tokio::time::timeout(HANDSHAKE_STEP, async {
        for _ in 0..MAX_SKIPPED {
            let Some(f) = next_frame(ws).await? else {
                return Err(UpstreamError::Closed("closed before the challenge".into()));
            };
            if f["type"] == "event" && f["event"] == "connect.challenge" {
                let nonce = f["payload"]["nonce"].as_str().unwrap_or("").trim();
                let ts = f["payload"]["ts"].as_u64();
                return match (nonce.is_empty(), ts) {
                    (false, Some(ts)) => Ok(Challenge {
                        nonce: nonce.to_string(),
                        ts,
                    }),
                    _ => Err(UpstreamError::Protocol(
                        "connect.challenge without nonce or ts".into(),
                    )),
                };
            }
        }
        Err(UpstreamError::Protocol("no connect.challenge".into()))
    })
    .await
    .map_err(|_| {
        UpstreamError::Protocol(format!("no connect.challenge within {HANDSHAKE_STEP:?}"))
    })??;
    let id = format!("1:{}", clawmesh_federation::pairing::uuid_v4());
    send(
        ws,
        &json!({"type": "req", "id": id, "method": "connect", "params": params(&ch)}),
    )
    .await?;
    tokio::time::timeout(HANDSHAKE_STEP, answer(ws, &id))
        .await
        .map_err(|_| UpstreamError::Protocol(format!("no hello-ok within {HANDSHAKE_STEP:?}")))?
}

/// One request on an operator connection, waiting for its answer.
pub async fn call(
    ws: &mut Ws,
    n: u64,
    method: &str,
    params: Value,
) -> Result<Value, UpstreamError> {
    let id = format!("{n}:{}", clawmesh_federation::pairing::uuid_v4());
    send(
        ws,
        &json!({"type": "req", "id": id, "method": method, "params": params}),
    )
    .await?;
    tokio::time::timeout(CALL_TIMEOUT, answer(ws, &id))
        .await
        .map_err(|_| {
            UpstreamError::Protocol(format!("{method}: no answer within {CALL_TIMEOUT:?}"))
        })?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_proof_signs_the_v3_string_classic_gateways_check() {
        let key = DeviceIdentity::ephemeral();
        let ch = Challenge {
            nonce: "n-1".into(),
            ts: 1_795_266_984_872,
        };
        let d = device_proof(
            &key,
            "node-host",
            "node",
            "node",
            &[],
            "tok",
            &ch,
            "linux",
            "Linux",
        );
        let id = key.device_id().to_string();
        assert_eq!(d["id"], id.as_str());
        assert_eq!(d["signedAt"], 1_795_266_984_872u64);
        assert_eq!(d["nonce"], "n-1");
        let expected = format!("v3|{id}|node-host|node|node||1795266984872|tok|n-1|linux|linux");
        let sig = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(d["signature"].as_str().unwrap())
            .unwrap();
        assert!(key.public_key().verify(expected.as_bytes(), &sig));
        let pk =
            clawmesh_federation::identity::PublicKey::from_base64(d["publicKey"].as_str().unwrap())
                .unwrap();
        assert_eq!(pk.device_id().to_string(), id);
    }
}
