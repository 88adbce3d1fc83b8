//! The federation status document: the JSON of `status`, `gateway.status` and
//! `gateway status --json`, built from the mesh's view. The CLI's table
//! ([`crate::cli::status`]) renders it.

use std::time::{Duration, SystemTime};

use clawmesh_federation::logs::spool::Lag;
use clawmesh_federation::mesh::MeshStatus;
use serde_json::{json, Value};

fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1000.0 * 100.0).round() / 100.0
}

fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_millis(t).to_string()
}

/// The shipping lag of this gateway's logs (records spooled and not yet acknowledged by the
/// collector, and the age of the oldest), as the self row's `logShipping` shows it:
/// `{"unacked": 0, "oldestAgeMs": 0}` when everything is delivered.
pub fn shipping_lag_json(lag: &Lag, now_ms: u64) -> Value {
    json!({
        "unacked": lag.unacked,
        "oldestAgeMs": lag.oldest_age_ms(now_ms),
    })
}

/// The JSON document of `gateway status --json`.
pub fn to_json(s: &MeshStatus, all: bool) -> Value {
    let gateways: Vec<Value> = s
        .gateways
        .iter()
        .filter(|g| all || g.is_self)
        .map(|g| {
            json!({
                "name": g.name,
                "region": g.region,
                "deviceId": g.device_id.to_string(),
                "role": if g.primary { "primary" } else { "remote" },
                "status": g.status.as_str(),
                // A gateway does not ping itself: no latency, rather than a made-up 0.
                "latencyMs": if g.is_self { None } else { g.latency.map(ms) },
                "lastSeen": g.last_seen.map(rfc3339),
                "addr": g.addr,
                "version": g.version,
                "isSelf": g.is_self,
                "latencyP99Ms": g.latency_p99.map(ms),
                "missedPings": g.missed,
                "lastError": g.last_error,
                // How this gateway found the peer: static (--join), mdns, tailnet; member
                // when learned from the member list or when it joined us.
                "found": if g.is_self { None } else { Some(g.found.clone().unwrap_or_else(|| "member".into())) },
                // Host vitals (clawmesh_federation::vitals::Vitals::to_json), null if none.
                "vitals": g.vitals.map(|v| v.to_json()),
            })
        })
        .collect();
    json!({
        "self": s.self_name,
        "primary": s.primary,
        "gateways": gateways,
        // How many gateways the federation has, whether or not `all` lists them.
        "federationSize": s.gateways.len(),
        "epoch": s.epoch,
        "healthIntervalMs": s.health.interval.as_millis() as u64,
        "unhealthyThreshold": s.health.unhealthy_threshold,
        "notJoined": s.not_joined,
    })
}
