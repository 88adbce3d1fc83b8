//! `gateway.upstream.autoApprove`: approving, in OpenClaw, the pairing requests of the
//! proxies this gateway created, and nothing else.
//!
//! It connects as the `openclaw nodes approve` helper does (operator, the upstream token,
//! `operator.pairing` + `operator.admin`), lists OpenClaw's pending device and node
//! (capability surface) requests and approves those whose device id is one of this gateway's
//! proxy keys. Any other pending request is left for the OpenClaw operator.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};
use tracing::{debug, info, warn};

use super::client;
use super::{dial, Context, UpstreamError};

/// Sweeps after each nudge: at once, then after 1 s and 3 s (a pending request can appear a
/// moment after the proxy's connect is answered); three connections per nudge at most.
const SWEEP_DELAYS: &[Duration] = &[
    Duration::ZERO,
    Duration::from_secs(1),
    Duration::from_secs(2),
];

/// Runs until aborted: a sweep series after every nudge of [`Context::approve_soon`].
pub async fn run(ctx: Arc<Context>) {
    loop {
        ctx.nudge.notified().await;
        for d in SWEEP_DELAYS {
            tokio::time::sleep(*d).await;
            match sweep(&ctx).await {
                Ok(0) => {}
                Ok(n) => {
                    info!(approved = n, "approved this gateway's proxies in OpenClaw");
                    ctx.approved.notify_waiters();
                }
                Err(e) => warn!("auto-approve in OpenClaw failed: {e}"),
            }
        }
    }
}

/// One sweep: the number of requests approved.
async fn sweep(ctx: &Context) -> Result<usize, UpstreamError> {
    let ours: HashSet<String> = ctx.proxy_ids();
    if ours.is_empty() {
        return Ok(0);
    }
    let mut ws = dial::open(&ctx.settings.url, ctx.pin).await?;
    let token = ctx.settings.token.clone().unwrap_or_default();
    client::handshake(&mut ws, |_| {
        json!({
            "minProtocol": 4,
            "maxProtocol": 4,
            "client": {"id": "gateway-client", "displayName": "clawmesh upstream auto-approve", "version": crate::VERSION, "platform": std::env::consts::OS, "mode": "backend"},
            "caps": [],
            "auth": {"token": token},
            "role": "operator",
            "scopes": ["operator.pairing", "operator.admin"],
        })
    })
    .await?;
    let mut n = 2;
    let mut approved = 0;
    let pending = |v: &Value, id_key: &str| -> Vec<String> {
        v["pending"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter(|p| p[id_key].as_str().is_some_and(|id| ours.contains(id)))
                    .filter_map(|p| p["requestId"].as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default()
    };
    let devices = client::call(&mut ws, n, "device.pair.list", json!({})).await?;
    n += 1;
    for req in pending(&devices, "deviceId") {
        client::call(&mut ws, n, "device.pair.approve", json!({"requestId": req})).await?;
        n += 1;
        approved += 1;
        debug!(request = %req, "device pairing approved");
    }
    let nodes = match client::call(&mut ws, n, "node.pair.list", json!({})).await {
        Ok(v) => v,
        // An OpenClaw without the capability-surface layer has nothing more to approve.
        Err(UpstreamError::Refused { message, .. }) if message.starts_with("unknown method") => {
            return Ok(approved)
        }
        Err(e) => return Err(e),
    };
    n += 1;
    for req in pending(&nodes, "nodeId") {
        client::call(&mut ws, n, "node.pair.approve", json!({"requestId": req})).await?;
        n += 1;
        approved += 1;
        debug!(request = %req, "node capability surface approved");
    }
    let _ = futures_util::SinkExt::close(&mut ws).await;
    Ok(approved)
}
