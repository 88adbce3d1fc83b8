//! The classic `connect` request: protocol, role, client fields, device proof, shared or device
//! token, and the pairing gate, with the exact error codes and messages classic clients branch
//! on (classic-protocol.md sections 3 to 5).

use std::net::SocketAddr;

use clawmesh_federation::identity::{decode_base64_lenient, DeviceId, PublicKey};
use clawmesh_federation::pairing::{Admission, DeviceMeta, Registry};
use clawmesh_federation::secret::{equals_any, secrets_equal};
use clawmesh_federation::wire::WireError;
use serde_json::{json, Value};

use super::frames::err_with;

/// The protocol version this bridge speaks.
pub const PROTOCOL: u64 = 4;

/// Allowed clock skew for a device signature.
const MAX_SKEW_MS: i64 = 120_000;

/// Role of a classic connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// An operator (CLI, UI, agent).
    Operator,
    /// A node host.
    Node,
}

impl Role {
    /// The classic name.
    pub fn as_str(&self) -> &'static str {
        match self {
            Role::Operator => "operator",
            Role::Node => "node",
        }
    }
}

/// A connection that passed `connect`.
#[derive(Debug, Clone)]
pub struct Authed {
    /// Role.
    pub role: Role,
    /// Granted scopes (operators).
    pub scopes: Vec<String>,
    /// How it authenticated: `token`, `password`, `device-token`.
    pub method: &'static str,
    /// The proven device key, if a device was presented.
    pub device: Option<PublicKey>,
    /// Device token to hand back in hello-ok, with its issue time.
    pub device_token: Option<(String, u64)>,
    /// `client.id`.
    pub client_id: String,
    /// `client.mode`.
    pub client_mode: String,
    /// `client.version`.
    pub version: String,
    /// `client.platform`.
    pub platform: String,
    /// `client.deviceFamily`.
    pub device_family: String,
    /// `client.displayName`.
    pub display_name: String,
    /// Declared capabilities (nodes).
    pub caps: Vec<String>,
    /// Declared commands (nodes).
    pub commands: Vec<String>,
    /// Node `PATH`.
    pub path_env: Option<String>,
}

/// A refused `connect`: the error to answer with, then the close code and reason.
#[derive(Debug)]
pub struct Reject {
    /// The `res` error.
    pub error: WireError,
    /// WebSocket close code.
    pub close_code: u16,
    /// Close reason.
    pub close_reason: String,
}

fn reject(error: WireError, code: u16) -> Reject {
    let reason = error.message.clone();
    Reject {
        error,
        close_code: code,
        close_reason: reason,
    }
}

fn invalid(msg: impl Into<String>) -> Reject {
    reject(WireError::new("INVALID_REQUEST", msg), 1008)
}

fn strings(v: Option<&Value>) -> Vec<String> {
    v.and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(|x| x.as_str().map(str::to_string))
                .take(512)
                .collect()
        })
        .unwrap_or_default()
}

fn lower_ascii(s: &str) -> String {
    s.trim().chars().map(|c| c.to_ascii_lowercase()).collect()
}

/// What the bridge needs to decide.
pub struct Gate<'a> {
    /// Shared secrets (gateway token / password).
    pub secrets: &'a [String],
    /// This gateway's region, kept with a pairing request made here.
    pub region: Option<String>,
    /// The pairing registry.
    pub pairing: &'a Registry,
    /// Now, ms since the epoch.
    pub now_ms: i64,
}

/// Authenticates a `connect` request's params against the challenge nonce.
pub fn authenticate(
    gate: &Gate<'_>,
    params: &Value,
    nonce: &str,
    remote: SocketAddr,
) -> Result<Authed, Reject> {
    if !params.is_object() {
        return Err(invalid("invalid connect params: must be object"));
    }
    // 1. Protocol.
    let min = params.get("minProtocol").and_then(Value::as_u64);
    let max = params.get("maxProtocol").and_then(Value::as_u64);
    let (Some(min), Some(max)) = (min, max) else {
        return Err(invalid(
            "invalid connect params: must have required property 'minProtocol' and 'maxProtocol'",
        ));
    };
    if !(min <= PROTOCOL && PROTOCOL <= max) {
        return Err(reject(
            err_with(
                "INVALID_REQUEST",
                "protocol mismatch",
                json!({"code":"PROTOCOL_MISMATCH","clientMinProtocol":min,"clientMaxProtocol":max,"expectedProtocol":PROTOCOL,"minimumProbeProtocol":3}),
            ),
            1002,
        ));
    }
    // 2. Role.
    let role = match params.get("role").and_then(Value::as_str) {
        None | Some("operator") => Role::Operator,
        Some("node") => Role::Node,
        Some(_) => return Err(invalid("invalid role")),
    };
    // Client fields.
    let client = params.get("client").cloned().unwrap_or(Value::Null);
    let field = |k: &str| client.get(k).and_then(Value::as_str).map(str::to_string);
    let (Some(client_id), Some(client_mode), Some(version), Some(platform)) = (
        field("id"),
        field("mode"),
        field("version"),
        field("platform"),
    ) else {
        return Err(invalid(
            "invalid connect params: client must have required properties 'id', 'mode', 'version', 'platform'",
        ));
    };
    let device_family = field("deviceFamily").unwrap_or_default();
    let display_name = field("displayName").unwrap_or_else(|| client_id.clone());
    let scopes = strings(params.get("scopes"));
    let auth = params.get("auth").cloned().unwrap_or(Value::Null);
    let auth_str = |k: &str| auth.get(k).and_then(Value::as_str).map(str::to_string);
    let token = auth_str("token");
    let password = auth_str("password");
    let device_token = auth_str("deviceToken");
    let bootstrap = auth_str("bootstrapToken");

    // 3. Shared secret (token or password field; the configured secret decides).
    let offered = token.clone().or(password.clone());
    let shared_ok = match &offered {
        Some(t) => equals_any(gate.secrets, t),
        None => false,
    };

    // 4. Device proof.
    let device = match params.get("device") {
        None | Some(Value::Null) => None,
        Some(d) => Some(verify_device(
            d,
            &client_id,
            &client_mode,
            role,
            &scopes,
            token
                .as_deref()
                .or(device_token.as_deref())
                .or(bootstrap.as_deref())
                .unwrap_or(""),
            nonce,
            &platform,
            &device_family,
            gate.now_ms,
        )?),
    };

    let mut method = "token";
    match (&device, shared_ok) {
        (None, _) if role == Role::Node => {
            return Err(reject(
                err_with(
                    "NOT_PAIRED",
                    "device identity required",
                    json!({"code":"DEVICE_IDENTITY_REQUIRED"}),
                ),
                1008,
            ))
        }
        (None, true) => {}
        (None, false) => {
            return Err(match &offered {
                Some(_) => token_mismatch(),
                None => reject(
                    err_with(
                        "NOT_PAIRED",
                        "device identity required",
                        json!({"code":"DEVICE_IDENTITY_REQUIRED"}),
                    ),
                    1008,
                ),
            })
        }
        (Some(key), _) => {
            let id = key.device_id();
            let stored = gate
                .pairing
                .device_token(&id, role.as_str())
                .map_err(|e| reject(WireError::new("UNAVAILABLE", e.to_string()), 1013))?;
            if !shared_ok {
                // Device-token auth: the token must be this device's for this role. A device
                // token sent in auth.token is accepted too (classic fallback).
                let presented = device_token.clone().or(offered.clone());
                match (&presented, &stored) {
                    (Some(p), Some((t, _))) if secrets_equal(p, t) => method = "device-token",
                    (Some(_), _) if device_token.is_some() => {
                        return Err(reject(
                            err_with(
                                "INVALID_REQUEST",
                                "unauthorized: device token mismatch (rotate/reissue device token)",
                                json!({"code":"AUTH_DEVICE_TOKEN_MISMATCH","authReason":"device_token_mismatch","canRetryWithDeviceToken":false,"recommendedNextStep":"update_auth_credentials"}),
                            ),
                            1008,
                        ))
                    }
                    (Some(_), _) => return Err(token_mismatch()),
                    (None, _) if gate.secrets.is_empty() => {}
                    (None, _) => {
                        return Err(reject(
                            err_with(
                                "INVALID_REQUEST",
                                "unauthorized: gateway token missing (set OPENCLAW_GATEWAY_TOKEN or pair the device)",
                                json!({"code":"AUTH_TOKEN_MISSING","authReason":"token_missing","canRetryWithDeviceToken":false,"recommendedNextStep":"update_auth_configuration"}),
                            ),
                            1008,
                        ))
                    }
                }
            } else if password.is_some() && token.is_none() {
                method = "password";
            }
            // 5. Pairing gate: nodes always; operators with a device but no shared secret.
            if role == Role::Node || !shared_ok {
                let meta = DeviceMeta {
                    name: display_name.clone(),
                    role: role.as_str().into(),
                    addr: remote.to_string(),
                    platform: platform.clone(),
                    device_family: device_family.clone(),
                    client_id: client_id.clone(),
                    client_mode: client_mode.clone(),
                    region: gate.region.clone(),
                };
                match gate.pairing.admit(key, &meta) {
                    Ok(Admission::Paired(_)) => {}
                    Ok(Admission::Pending(p)) => {
                        let msg = "pairing required: device is not approved yet";
                        return Err(Reject {
                            error: err_with(
                                "NOT_PAIRED",
                                msg,
                                json!({
                                    "code": "PAIRING_REQUIRED",
                                    "reason": "not-paired",
                                    "requestId": p.request_id,
                                    "remediationHint": format!("Approve this device from the pending pairing requests: clawmesh devices approve {}", p.request_id),
                                    "deviceId": p.device_id,
                                    "requestedRole": role.as_str(),
                                    "recommendedNextStep": "wait_then_retry",
                                    "pauseReconnect": false,
                                }),
                            ),
                            close_code: 1008,
                            close_reason: format!("{msg} (requestId: {})", p.request_id),
                        });
                    }
                    Err(e) => {
                        return Err(reject(WireError::new("UNAVAILABLE", e.to_string()), 1013))
                    }
                }
            }
        }
    }
    let device_token = match &device {
        Some(key) => gate
            .pairing
            .device_token(&key.device_id(), role.as_str())
            .ok()
            .flatten(),
        None => None,
    };
    let granted = match role {
        Role::Node => Vec::new(),
        Role::Operator => {
            let known: Vec<String> = scopes
                .iter()
                .filter(|s| s.starts_with("operator."))
                .cloned()
                .collect();
            if known.is_empty() && shared_ok {
                vec!["operator.read".to_string()]
            } else {
                known
            }
        }
    };
    Ok(Authed {
        role,
        scopes: granted,
        method,
        device,
        device_token,
        client_id,
        client_mode,
        version,
        platform,
        device_family,
        display_name,
        caps: strings(params.get("caps")),
        commands: strings(params.get("commands")),
        path_env: params
            .get("pathEnv")
            .and_then(Value::as_str)
            .map(str::to_string),
    })
}

fn token_mismatch() -> Reject {
    reject(
        err_with(
            "INVALID_REQUEST",
            "unauthorized: gateway token mismatch (use this gateway's token or pair the device)",
            json!({"code":"AUTH_TOKEN_MISMATCH","authReason":"token_mismatch","canRetryWithDeviceToken":false,"recommendedNextStep":"update_auth_credentials"}),
        ),
        1008,
    )
}

fn device_error(message: &str, code: &str, reason: &str) -> Reject {
    reject(
        err_with(
            "INVALID_REQUEST",
            message,
            json!({"code": code, "reason": reason}),
        ),
        1008,
    )
}

#[allow(clippy::too_many_arguments)]
fn verify_device(
    d: &Value,
    client_id: &str,
    client_mode: &str,
    role: Role,
    scopes: &[String],
    token: &str,
    nonce: &str,
    platform: &str,
    device_family: &str,
    now_ms: i64,
) -> Result<PublicKey, Reject> {
    let s = |k: &str| {
        d.get(k)
            .and_then(Value::as_str)
            .unwrap_or("")
            .trim()
            .to_string()
    };
    let pk_text = s("publicKey");
    let key = decode_base64_lenient(&pk_text)
        .and_then(|b| PublicKey::from_bytes(&b).ok())
        .ok_or_else(|| {
            device_error(
                "device public key invalid",
                "DEVICE_AUTH_PUBLIC_KEY_INVALID",
                "device-public-key",
            )
        })?;
    let claimed = DeviceId::parse(&s("id"));
    if claimed != Some(key.device_id()) {
        return Err(device_error(
            "device identity mismatch",
            "DEVICE_AUTH_DEVICE_ID_MISMATCH",
            "device-id-mismatch",
        ));
    }
    let signed_at = d.get("signedAt").and_then(Value::as_i64).unwrap_or(-1);
    if signed_at < 0 || (now_ms - signed_at).abs() > MAX_SKEW_MS {
        return Err(device_error(
            "device signature expired",
            "DEVICE_AUTH_SIGNATURE_EXPIRED",
            "device-signature-stale",
        ));
    }
    let dn = s("nonce");
    if dn.is_empty() {
        return Err(device_error(
            "device nonce required",
            "DEVICE_AUTH_NONCE_REQUIRED",
            "device-nonce-missing",
        ));
    }
    if dn != nonce {
        return Err(device_error(
            "device nonce mismatch",
            "DEVICE_AUTH_NONCE_MISMATCH",
            "device-nonce-mismatch",
        ));
    }
    let sig = decode_base64_lenient(&s("signature")).unwrap_or_default();
    let id = key.device_id().to_string();
    let joined = scopes.join(",");
    let v3 = format!(
        "v3|{id}|{client_id}|{client_mode}|{}|{joined}|{signed_at}|{token}|{nonce}|{}|{}",
        role.as_str(),
        lower_ascii(platform),
        lower_ascii(device_family)
    );
    if key.verify(v3.as_bytes(), &sig) {
        return Ok(key);
    }
    let v2 = format!(
        "v2|{id}|{client_id}|{client_mode}|{}|{joined}|{signed_at}|{token}|{nonce}",
        role.as_str()
    );
    if key.verify(v2.as_bytes(), &sig) {
        return Ok(key);
    }
    Err(device_error(
        "device signature invalid",
        "DEVICE_AUTH_SIGNATURE_INVALID",
        "device-signature",
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine as _;
    use clawmesh_federation::identity::DeviceIdentity;
    use clawmesh_federation::store::Store;

    fn b64(b: &[u8]) -> String {
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b)
    }

    fn node_connect(id: &DeviceIdentity, nonce: &str, ts: i64, token: &str) -> Value {
        let did = id.device_id().to_string();
        let payload = format!("v3|{did}|node-host|node|node||{ts}|{token}|{nonce}|linux|linux");
        json!({
            "minProtocol": 4, "maxProtocol": 4,
            "client": {"id":"node-host","mode":"node","version":"2026.9.6","platform":"linux","deviceFamily":"Linux","displayName":"n1"},
            "role": "node", "scopes": [], "auth": {"token": token}, "unknownField": 1,
            "device": {"id": did, "publicKey": b64(&id.public_key().0), "signature": b64(&id.sign(payload.as_bytes())), "signedAt": ts, "nonce": nonce},
        })
    }

    #[test]
    fn node_connect_pairs_then_passes() {
        let dir = tempfile::tempdir().unwrap();
        let reg = Registry::open(Store::open(dir.path()).unwrap()).unwrap();
        let secrets = vec!["tok".to_string()];
        let now = 1_800_000_000_000;
        let gate = Gate {
            secrets: &secrets,
            region: None,
            pairing: &reg,
            now_ms: now,
        };
        let id = DeviceIdentity::ephemeral();
        let remote: SocketAddr = "127.0.0.1:9".parse().unwrap();
        let r =
            authenticate(&gate, &node_connect(&id, "n-1", now, "tok"), "n-1", remote).unwrap_err();
        assert_eq!(r.error.code, "NOT_PAIRED");
        assert!(r.close_reason.contains("requestId"));
        reg.approve(&id.device_id().to_string()).unwrap();
        let ok = authenticate(&gate, &node_connect(&id, "n-2", now, "tok"), "n-2", remote).unwrap();
        assert_eq!(ok.role, Role::Node);
        assert!(ok.device_token.is_some());
        // Device token instead of the shared one.
        let (dt, _) = ok.device_token.clone().unwrap();
        let mut p = node_connect(&id, "n-3", now, &dt);
        p["auth"] = json!({"deviceToken": dt});
        let ok = authenticate(&gate, &p, "n-3", remote).unwrap();
        assert_eq!(ok.method, "device-token");
        // Replayed nonce, stale time, bad signature, wrong token.
        let e =
            authenticate(&gate, &node_connect(&id, "n-4", now, "tok"), "n-5", remote).unwrap_err();
        assert!(e.error.message.contains("nonce mismatch"));
        let e = authenticate(
            &gate,
            &node_connect(&id, "n-6", now - 200_000, "tok"),
            "n-6",
            remote,
        )
        .unwrap_err();
        assert!(e.error.message.contains("expired"));
        let mut p = node_connect(&id, "n-7", now, "tok");
        p["device"]["signature"] = json!(b64(&[0u8; 64]));
        assert!(authenticate(&gate, &p, "n-7", remote)
            .unwrap_err()
            .error
            .message
            .contains("signature invalid"));
        let e =
            authenticate(&gate, &node_connect(&id, "n-8", now, "nope"), "n-8", remote).unwrap_err();
        assert!(
            e.error.message.contains("token mismatch"),
            "{}",
            e.error.message
        );
        // Protocol mismatch closes 1002.
        let mut p = node_connect(&id, "n-9", now, "tok");
        p["minProtocol"] = json!(5);
        p["maxProtocol"] = json!(5);
        assert_eq!(
            authenticate(&gate, &p, "n-9", remote)
                .unwrap_err()
                .close_code,
            1002
        );
    }

    #[test]
    fn operators_with_token_and_without_device() {
        let dir = tempfile::tempdir().unwrap();
        let reg = Registry::open(Store::open(dir.path()).unwrap()).unwrap();
        let secrets = vec!["tok".to_string()];
        let gate = Gate {
            secrets: &secrets,
            region: None,
            pairing: &reg,
            now_ms: 0,
        };
        let remote: SocketAddr = "127.0.0.1:9".parse().unwrap();
        let p = json!({"minProtocol":4,"maxProtocol":4,"client":{"id":"cli","mode":"cli","version":"x","platform":"linux"},
            "role":"operator","scopes":["operator.read","operator.write"],"auth":{"token":"tok"}});
        let ok = authenticate(&gate, &p, "n", remote).unwrap();
        assert_eq!(ok.scopes, vec!["operator.read", "operator.write"]);
        let mut bad = p.clone();
        bad["auth"]["token"] = json!("no");
        assert!(authenticate(&gate, &bad, "n", remote)
            .unwrap_err()
            .error
            .message
            .starts_with("unauthorized: gateway token mismatch"));
        let mut none = p.clone();
        none["auth"] = json!({});
        assert_eq!(
            authenticate(&gate, &none, "n", remote)
                .unwrap_err()
                .error
                .message,
            "device identity required"
        );
        let mut role = p.clone();
        role["role"] = json!("worker");
        assert_eq!(
            authenticate(&gate, &role, "n", remote)
                .unwrap_err()
                .error
                .message,
            "invalid role"
        );
    }
}
