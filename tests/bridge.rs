//! The classic WebSocket bridge against hostile and broken clients: every bad input gets the
//! classic error or close code, the connection is closed, nothing else is disturbed.

mod common;

use std::time::Duration;

use base64::Engine as _;
use clawmesh_federation::identity::DeviceIdentity;
use common::*;
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

fn b64(b: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b)
}

async fn open(url: &str) -> (Ws, Value) {
    let (mut ws, _) = tokio_tungstenite::connect_async(url).await.unwrap();
    let challenge = next_json(&mut ws).await.expect("challenge");
    assert_eq!(challenge["event"], "connect.challenge");
    assert!(challenge["payload"]["ts"].is_u64());
    (ws, challenge)
}

async fn next_json(ws: &mut Ws) -> Option<Value> {
    loop {
        match tokio::time::timeout(Duration::from_secs(10), ws.next())
            .await
            .ok()??
        {
            Ok(Message::Text(t)) => return serde_json::from_str(&t).ok(),
            Ok(Message::Ping(_)) | Ok(Message::Pong(_)) => continue,
            _ => return None,
        }
    }
}

/// Reads until the server closes; returns the close code.
async fn close_code(ws: &mut Ws) -> Option<u16> {
    loop {
        match tokio::time::timeout(Duration::from_secs(10), ws.next())
            .await
            .ok()?
        {
            Some(Ok(Message::Close(Some(f)))) => return Some(f.code.into()),
            Some(Ok(Message::Close(None))) | None => return None,
            Some(Err(_)) => return None,
            Some(Ok(_)) => continue,
        }
    }
}

fn operator_connect(token: &str) -> Value {
    json!({"type":"req","id":"1:a","method":"connect","params":{
        "minProtocol":4,"maxProtocol":4,
        "client":{"id":"cli","mode":"cli","version":"2026.9.6","platform":"linux"},
        "role":"operator","scopes":["operator.read"],"auth":{"token":token}}})
}

fn node_connect(id: &DeviceIdentity, nonce: &str, ts: u64, token: &str) -> Value {
    let did = id.device_id().to_string();
    let payload = format!("v3|{did}|node-host|node|node||{ts}|{token}|{nonce}|linux|linux");
    json!({"type":"req","id":"1:n","method":"connect","params":{
        "minProtocol":4,"maxProtocol":4,
        "client":{"id":"node-host","mode":"node","version":"2026.9.6","platform":"linux","deviceFamily":"Linux","displayName":"fake"},
        "role":"node","scopes":[],"auth":{"token":token},"futureField":{"x":1},
        "device":{"id":did,"publicKey":b64(&id.public_key().0),"signature":b64(&id.sign(payload.as_bytes())),"signedAt":ts,"nonce":nonce}}})
}

async fn send(ws: &mut Ws, v: &Value) {
    ws.send(Message::Text(v.to_string().into())).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_classic_clients_get_classic_errors_and_nothing_else_is_disturbed() {
    let tmp = tempfile::tempdir().unwrap();
    let gw = tmp.path().join("gw");
    let mut g = Gw::spawn(&gw, &["--name", "tokyo", "--primary", "--token", "tok"]);
    let addr = g.wait_ready();
    let url = format!("ws://{addr}/");
    let http = format!("http://{addr}/healthz");

    // A good operator that stays connected throughout.
    let (mut good, _) = open(&url).await;
    send(&mut good, &operator_connect("tok")).await;
    let hello = next_json(&mut good).await.unwrap();
    assert_eq!(hello["ok"], true, "{hello}");
    assert_eq!(hello["payload"]["type"], "hello-ok");
    assert_eq!(hello["payload"]["protocol"], 4);
    assert_eq!(hello["payload"]["policy"]["tickIntervalMs"], 30000);
    assert!(hello["payload"]["features"]["methods"]
        .as_array()
        .unwrap()
        .iter()
        .any(|m| m == "node.invoke"));

    // 1. Pre-auth frame over 64 KiB: 1009.
    let (mut ws, _) = open(&url).await;
    ws.send(Message::Text("x".repeat(70_000).into()))
        .await
        .unwrap();
    assert_eq!(close_code(&mut ws).await, Some(1009));

    // 2. Invalid JSON first: 1008.
    let (mut ws, _) = open(&url).await;
    ws.send(Message::Text("{nope".into())).await.unwrap();
    assert_eq!(close_code(&mut ws).await, Some(1008));

    // 3. First request not connect: INVALID_REQUEST then 1008.
    let (mut ws, _) = open(&url).await;
    send(
        &mut ws,
        &json!({"type":"req","id":"1:x","method":"health","params":{}}),
    )
    .await;
    let r = next_json(&mut ws).await.unwrap();
    assert_eq!(r["error"]["code"], "INVALID_REQUEST");
    assert_eq!(
        r["error"]["message"],
        "invalid handshake: first request must be connect"
    );
    assert_eq!(close_code(&mut ws).await, Some(1008));

    // 4. Wrong token: AUTH_TOKEN_MISMATCH then 1008.
    let (mut ws, _) = open(&url).await;
    send(&mut ws, &operator_connect("wrong")).await;
    let r = next_json(&mut ws).await.unwrap();
    assert_eq!(r["error"]["details"]["code"], "AUTH_TOKEN_MISMATCH");
    assert!(r["error"]["message"]
        .as_str()
        .unwrap()
        .starts_with("unauthorized: gateway token mismatch"));
    assert_eq!(close_code(&mut ws).await, Some(1008));

    // 5. Protocol mismatch: 1002.
    let (mut ws, _) = open(&url).await;
    let mut c = operator_connect("tok");
    c["params"]["minProtocol"] = json!(5);
    c["params"]["maxProtocol"] = json!(5);
    send(&mut ws, &c).await;
    let r = next_json(&mut ws).await.unwrap();
    assert_eq!(r["error"]["details"]["code"], "PROTOCOL_MISMATCH");
    assert_eq!(close_code(&mut ws).await, Some(1002));

    // 6. A node without a device: DEVICE_IDENTITY_REQUIRED.
    let (mut ws, _) = open(&url).await;
    let mut c = operator_connect("tok");
    c["params"]["role"] = json!("node");
    send(&mut ws, &c).await;
    let r = next_json(&mut ws).await.unwrap();
    assert_eq!(r["error"]["details"]["code"], "DEVICE_IDENTITY_REQUIRED");

    // 7. Device proofs: bad signature, replayed nonce, expired ts.
    let id = DeviceIdentity::ephemeral();
    let now = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64
    };
    let (mut ws, ch) = open(&url).await;
    let nonce = ch["payload"]["nonce"].as_str().unwrap().to_string();
    let mut c = node_connect(&id, &nonce, now(), "tok");
    c["params"]["device"]["signature"] = json!(b64(&[7u8; 64]));
    send(&mut ws, &c).await;
    assert_eq!(
        next_json(&mut ws).await.unwrap()["error"]["details"]["code"],
        "DEVICE_AUTH_SIGNATURE_INVALID"
    );
    let (mut ws, _) = open(&url).await;
    send(&mut ws, &node_connect(&id, &nonce, now(), "tok")).await; // the previous socket's nonce
    assert_eq!(
        next_json(&mut ws).await.unwrap()["error"]["details"]["code"],
        "DEVICE_AUTH_NONCE_MISMATCH"
    );
    let (mut ws, ch) = open(&url).await;
    let nonce = ch["payload"]["nonce"].as_str().unwrap().to_string();
    send(&mut ws, &node_connect(&id, &nonce, now() - 600_000, "tok")).await;
    assert_eq!(
        next_json(&mut ws).await.unwrap()["error"]["details"]["code"],
        "DEVICE_AUTH_SIGNATURE_EXPIRED"
    );

    // 8. A valid unknown node: pairing required, with the hints that keep it retrying.
    let (mut ws, ch) = open(&url).await;
    let nonce = ch["payload"]["nonce"].as_str().unwrap().to_string();
    send(&mut ws, &node_connect(&id, &nonce, now(), "tok")).await;
    let r = next_json(&mut ws).await.unwrap();
    assert_eq!(r["error"]["code"], "NOT_PAIRED");
    assert_eq!(r["error"]["details"]["code"], "PAIRING_REQUIRED");
    assert_eq!(
        r["error"]["details"]["recommendedNextStep"],
        "wait_then_retry"
    );
    assert_eq!(r["error"]["details"]["pauseReconnect"], false);
    assert_eq!(close_code(&mut ws).await, Some(1008));
    let list = cli_json(&gw, &["devices", "list", "--json"]);
    assert_eq!(list["pending"][0]["deviceId"], id.device_id().to_string());

    // 9. After hello: roles, scopes, unknown methods, bad frames.
    send(
        &mut good,
        &json!({"type":"req","id":"2","method":"node.invoke.result","params":{}}),
    )
    .await;
    assert_eq!(
        next_json(&mut good).await.unwrap()["error"]["message"],
        "unauthorized role: operator"
    );
    send(&mut good, &json!({"type":"req","id":"3","method":"node.invoke","params":{"nodeId":"x","command":"y","idempotencyKey":"k"}})).await;
    let r = next_json(&mut good).await.unwrap();
    assert_eq!(r["error"]["code"], "FORBIDDEN");
    assert_eq!(r["error"]["details"]["missingScope"], "operator.write");
    send(
        &mut good,
        &json!({"type":"req","id":"4","method":"no.such.method"}),
    )
    .await;
    assert_eq!(
        next_json(&mut good).await.unwrap()["error"]["message"],
        "unknown method: no.such.method"
    );
    send(&mut good, &json!({"type":"req","id":"5","method":"health"})).await;
    let r = next_json(&mut good).await.unwrap();
    assert_eq!(
        (r["id"].as_str(), r["ok"].as_bool()),
        (Some("5"), Some(true))
    );

    // 10. After hello, a frame over maxPayload (25 MiB) closes that socket with 1009.
    let (mut big, _) = open(&url).await;
    send(&mut big, &operator_connect("tok")).await;
    assert_eq!(next_json(&mut big).await.unwrap()["ok"], true);
    let _ = big
        .send(Message::Text("y".repeat(26 * 1024 * 1024).into()))
        .await;
    assert_eq!(close_code(&mut big).await, Some(1009));
    // ...and the good operator is undisturbed.
    send(&mut good, &json!({"type":"req","id":"6","method":"health"})).await;
    assert_eq!(next_json(&mut good).await.unwrap()["ok"], true);

    // /healthz on the same port.
    let body = tokio::task::spawn_blocking(move || {
        std::process::Command::new("curl")
            .args(["-s", &http])
            .output()
            .map(|o| o.stdout)
    })
    .await
    .unwrap();
    if let Ok(body) = body {
        if !body.is_empty() {
            let v: Value = serde_json::from_slice(&body).unwrap();
            assert_eq!(v["ok"], true);
        }
    }

    // The gateway carries on: no panic, QUIC side still answers.
    assert!(!g.log_text().contains("panicked"));
    let gw2 = gw.clone();
    assert!(tokio::task::spawn_blocking(move || status(&gw2).is_some())
        .await
        .unwrap());
    let _ = &mut g;
}
