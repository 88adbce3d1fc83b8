//! Background tasks that keep a running gateway in step with the federation: shared-config
//! keys applied live, the node directory announced, revocations made elsewhere enforced.

use std::collections::BTreeMap;
use std::time::Duration;

use clawmesh_federation::consensus::Replica;
use clawmesh_federation::health::HealthConfig;
use clawmesh_federation::mesh::Mesh;
use tracing::{debug, info, warn, Instrument};

use crate::gateway::methods::Methods;
use crate::gateway::node_changes::{Changes, FullReads};
use crate::gateway::registry::NodeInfo;

use super::settings::GatewaySettings;
use crate::gateway::otlp_export::OtlpSettings;
use crate::gateway::shared_config;
use crate::gateway::tailnet_auth::{Lookup, TailnetPolicy};

/// Applies shared-config changes that running components can take without a restart
/// ([`FOLLOWED_KEYS`]): the fallback gateway, the health settings, the log filter (unless
/// `--log` or `RUST_LOG` set one) and the nodes' default exec level. Each change is logged.
pub(super) fn spawn_config_follower(replica: &Replica, methods: &Methods, s: &GatewaySettings) {
    let mut revisions = replica.subscribe();
    let methods = methods.clone();
    let local_fallback = s.fallback.clone();
    let base_health = s.health;
    tokio::spawn(async move {
        let mut last: BTreeMap<String, serde_json::Value> = BTreeMap::new();
        loop {
            if revisions.changed().await.is_err() {
                return;
            }
            // Coalesce a burst of revisions (a catch-up) into one pass.
            tokio::time::sleep(Duration::from_millis(20)).await;
            let revision = *revisions.borrow_and_update();
            let Ok((entries, _)) = methods.effective_keys(FOLLOWED_KEYS).await else {
                continue;
            };
            let now: BTreeMap<String, serde_json::Value> = entries
                .iter()
                .map(|e| (e.key.clone(), e.value.clone()))
                .collect();
            let changed: Vec<&String> = now
                .keys()
                .filter(|k| last.get(*k) != now.get(*k))
                .chain(last.keys().filter(|k| !now.contains_key(*k)))
                .collect();
            if changed.is_empty() {
                continue;
            }
            info!(
                revision,
                changed = changed.len(),
                "shared config settings applied"
            );
            let fallback = shared_config::lookup(&entries, "gateway.failover.fallbackNode")
                .and_then(|e| e.value.as_str().map(str::to_string))
                .or_else(|| local_fallback.clone());
            methods.set_fallback(fallback);
            if let Some(health) = effective_health(&entries, base_health) {
                methods.set_health(health);
            }
            match shared_config::lookup(&entries, EXEC_DEFAULT_KEY).map(|e| &e.value) {
                None | Some(serde_json::Value::Null) => methods.set_exec_default(None),
                Some(serde_json::Value::String(level))
                    if level.parse::<crate::node_protocol::Security>().is_ok() =>
                {
                    methods.set_exec_default(Some(level.clone()));
                }
                Some(other) => {
                    warn!("{EXEC_DEFAULT_KEY} must be \"deny\", \"allowlist\" or \"full\", not {other}; nodes keep the previous default");
                }
            }
            if let Some(tailnet) = methods.tailnet() {
                let (policy, warnings) = TailnetPolicy::from_lookup(|k| {
                    shared_config::lookup(&entries, k).map(|e| e.value.clone())
                });
                for w in warnings {
                    warn!("{w}");
                }
                if tailnet.set_policy(policy.clone()) {
                    info!(
                        allow = policy.allow,
                        node_tags = ?policy.node_tags,
                        node_users = ?policy.node_users,
                        operator_users = ?policy.operator_users,
                        operator_tags = ?policy.operator_tags,
                        recheck = ?policy.recheck,
                        "tailnet admission policy applied"
                    );
                }
            }
            if changed
                .iter()
                .any(|k| k.starts_with("logging.export.otlp."))
            {
                let (otlp, warnings) = OtlpSettings::from_lookup(|k| {
                    shared_config::lookup(&entries, k).map(|e| e.value.clone())
                });
                for w in warnings {
                    warn!("{w}");
                }
                info!(endpoint = ?otlp.url, batch = otlp.batch_size, "OTLP log export settings applied");
                methods.set_otlp_export(otlp);
            }
            if let Some(level) =
                shared_config::lookup(&entries, "logging.level").and_then(|e| e.value.as_str())
            {
                if changed.iter().any(|k| *k == "logging.level") {
                    match crate::logging::set_log_filter(level) {
                        Ok(true) => info!(level, "log filter changed by the shared config"),
                        Ok(false) => {}
                        Err(e) => warn!("logging.level {level:?} not applied: {e}"),
                    }
                }
            }
            last = now;
        }
    });
}

/// The shared-config key of the federation's default exec level for nodes.
pub const EXEC_DEFAULT_KEY: &str = "security.exec.defaultLevel";

/// The keys running components follow live: each revision reads only these, not the whole
/// config (which may hold tens of thousands of keys).
const FOLLOWED_KEYS: &[&str] = &[
    "gateway.failover.fallbackNode",
    "gateway.failover.healthCheckInterval",
    "gateway.failover.unhealthyThreshold",
    "logging.level",
    EXEC_DEFAULT_KEY,
    "gateway.auth.allowTailscale",
    "gateway.auth.tailscale.nodeTags",
    "gateway.auth.tailscale.nodeUsers",
    "gateway.auth.tailscale.operatorUsers",
    "gateway.auth.tailscale.operatorTags",
    "gateway.auth.tailscale.operatorScopes",
    "gateway.auth.tailscale.recheckInterval",
    "logging.export.otlp.endpoint",
    "logging.export.otlp.headers",
    "logging.export.otlp.batchSize",
];

/// The health settings the effective config asks for (`gateway.failover.healthCheckInterval`
/// and `unhealthyThreshold`), falling back to `base` for a key that is not set; `None` (and a
/// warning) for an out-of-range value.
fn effective_health(
    entries: &[shared_config::Effective],
    base: HealthConfig,
) -> Option<HealthConfig> {
    let num = |key: &str| shared_config::lookup(entries, key).map(|e| e.value.as_u64());
    let interval = match num("gateway.failover.healthCheckInterval") {
        None => base.interval,
        Some(Some(ms)) if (10..=3_600_000).contains(&ms) => Duration::from_millis(ms),
        Some(_) => {
            warn!(
                "gateway.failover.healthCheckInterval must be 10 to 3600000 ms; keeping {:?}",
                base.interval
            );
            return None;
        }
    };
    let threshold = match num("gateway.failover.unhealthyThreshold") {
        None => base.unhealthy_threshold,
        Some(Some(t)) if (1..=1000).contains(&t) => t as u32,
        Some(_) => {
            warn!(
                "gateway.failover.unhealthyThreshold must be 1 to 1000; keeping {}",
                base.unhealthy_threshold
            );
            return None;
        }
    };
    Some(HealthConfig {
        interval,
        unhealthy_threshold: threshold,
    })
}

/// Keeps the federation in step with this gateway: announces the attached nodes whenever they
/// change, and disconnects devices revoked on other gateways.
pub(super) fn spawn_federation_tasks(mesh: &Mesh, methods: &Methods) {
    let (m, registry) = (mesh.clone(), methods.nodes().clone());
    let mut changes = registry.changes();
    let span = tracing::info_span!("directory_announcer");
    tokio::spawn(
        async move {
            // What the last announcement cost: per change normally, O(nodes) after a full diff.
            let mut cost = Duration::ZERO;
            let mut cursor = None;
            loop {
                // Coalesce bursts (hundreds of nodes reconnecting after a restart) into one
                // announcement per 50 ms, or per 10 times what the last one cost if that is
                // longer: with tens of thousands of nodes attaching, announcing every 50 ms
                // took the cores that answer the nodes' pings (missed pings closed nodes,
                // which came back: a spiral); this keeps it near 1/10 of a core at any fleet
                // size.
                tokio::time::sleep(Duration::from_millis(50).max(cost * 10)).await;
                let started = std::time::Instant::now();
                let (changed, next) = registry.changes_since(cursor);
                cursor = Some(next);
                match changed {
                    Changes::Ids(ids) => {
                        // Only the nodes that changed: read each again, announce what differs.
                        let n = ids.len();
                        let set: Vec<_> = ids
                            .into_iter()
                            .map(|id| (id, registry.info(&id).map(summary_of)))
                            .collect();
                        if n > 0 {
                            m.apply_local_changes(set);
                            debug!(changes = n, "directory changes announced");
                        }
                    }
                    Changes::Overflowed => {
                        // The first run, or more changes than the log keeps: one full diff.
                        FullReads::count(&registry.full_reads().directory);
                        let summaries: Vec<_> =
                            registry.list().into_iter().map(summary_of).collect();
                        debug!(nodes = summaries.len(), "directory fully diffed");
                        m.set_local_nodes(summaries);
                    }
                }
                cost = started.elapsed();
                if changes.changed().await.is_err() {
                    return;
                }
            }
        }
        .instrument(span),
    );
    let (m, registry) = (mesh.clone(), methods.nodes().clone());
    tokio::spawn(async move {
        // The nodes' vitals go on to the other gateways at the pace the nodes send them
        // (VITALS_EVERY health intervals), so a relayed reading is at most one period late.
        loop {
            let period = m.health().interval * clawmesh_federation::vitals::VITALS_EVERY as u32;
            tokio::time::sleep(period).await;
            let vitals: Vec<_> = registry
                .vitals()
                .into_iter()
                .map(|(node, _, r)| clawmesh_federation::vitals::NodeVitals {
                    node,
                    vitals: r.vitals,
                    age_ms: u32::try_from(r.age().as_millis()).unwrap_or(u32::MAX),
                })
                .collect();
            if !vitals.is_empty() {
                m.publish_node_vitals(vitals);
            }
        }
    });
    let mut notices = mesh.notices();
    let registry = methods.nodes().clone();
    tokio::spawn(async move {
        loop {
            match notices.recv().await {
                Ok(clawmesh_federation::mesh::MeshNotice::Revoked(id)) => {
                    if registry.disconnect(&id, "device removed") {
                        info!(device = %id.short(), "disconnected a node revoked elsewhere in the federation");
                    }
                }
                Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                    warn!("missed {n} federation notices");
                }
                Err(_) => return,
            }
        }
    });
}

/// A local node as the directory announces it: the node's own labels only (its region, when
/// it has none, is the one of the gateway where it was paired: every gateway has the pairing
/// record).
fn summary_of(
    (info, transport): (NodeInfo, &'static str),
) -> clawmesh_federation::directory::NodeSummary {
    clawmesh_federation::directory::NodeSummary {
        id: info.node_id,
        name: info.name,
        labels: info.labels,
        commands: info.commands,
        transport: transport.to_string(),
        platform: info.platform,
        ip: crate::gateway::registry::ip_of(&info.remote),
        version: info.version,
        attach: info.attach,
    }
}

/// Disconnects nodes whose revocation arrives through the replicated log (a decision made on
/// another gateway, or made while this one was away).
pub(super) fn spawn_pairing_follower(replica: &Replica, methods: &Methods) {
    let mut changes = replica.pairing_changes();
    let registry = methods.nodes().clone();
    tokio::spawn(async move {
        loop {
            match changes.recv().await {
                Ok(r) if !r.approved => {
                    let id = r.key.device_id();
                    if registry.disconnect(&id, "device removed") {
                        info!(device = %id.short(), "disconnected a node revoked in the federation's log");
                    }
                }
                Ok(r) => {
                    info!(device = %r.key.device_id().short(), name = %r.name, "pairing approved in the federation's log");
                }
                Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                    warn!("missed {n} pairing changes from the log");
                }
                Err(_) => return,
            }
        }
    });
}

/// How often the re-check loop wakes to see whether a re-check is due: fine enough for the
/// shortest `recheckInterval` tests use, cheap when nothing is due.
const RECHECK_TICK: Duration = Duration::from_millis(100);

/// Revocation follows the tailnet: every `gateway.auth.tailscale.recheckInterval`, each node
/// attached here that the tailnet admitted, connected from a tailnet address, is looked up
/// again (whois, never the cache). An identity that no longer matches the policy, or a node
/// gone from the tailnet (whois 404), is revoked federation-wide with the reason and
/// disconnected. When tailscaled cannot answer, nothing is revoked (only logged): the daemon's
/// trouble is not the device's.
pub(super) fn spawn_tailnet_recheck(methods: &Methods) {
    let methods = methods.clone();
    tokio::spawn(async move {
        let Some(tailnet) = methods.tailnet().cloned() else {
            return;
        };
        let mut last = tokio::time::Instant::now();
        loop {
            tokio::time::sleep(RECHECK_TICK).await;
            let policy = tailnet.policy();
            if !policy.allow || last.elapsed() < policy.recheck {
                continue;
            }
            last = tokio::time::Instant::now();
            for (info, _) in methods.nodes().list() {
                let Ok(remote) = info.remote.parse::<std::net::SocketAddr>() else {
                    continue;
                };
                if !tailnet.applies(&remote) {
                    continue;
                }
                let paired = match methods.pairing().paired(&info.key) {
                    Ok(Some(p)) => p,
                    _ => continue,
                };
                if paired.approved_by != clawmesh_federation::pairing::APPROVED_BY_TAILSCALE {
                    continue;
                }
                let reason = match tailnet.lookup_fresh(remote).await {
                    Lookup::Identity(id) if tailnet.policy().admits_node(&id) => continue,
                    Lookup::Identity(id) => format!(
                        "the tailnet no longer vouches: {} is not allowed by gateway.auth.tailscale.nodeTags/nodeUsers",
                        id.describe()
                    ),
                    Lookup::NotInTailnet(r) => r,
                    Lookup::Unavailable(r) => {
                        warn!(node = %info.name, "tailnet re-check skipped: {r}");
                        continue;
                    }
                };
                let (pairing, key) = (methods.pairing().clone(), info.key);
                let why = reason.clone();
                let revoked =
                    tokio::task::spawn_blocking(move || pairing.revoke_tailnet(&key, &why)).await;
                match revoked {
                    Ok(Ok(_)) => {
                        methods.publish_pairing(&info.key.to_base64url());
                        methods
                            .nodes()
                            .disconnect(&info.node_id, &format!("revoked: {reason}"));
                        warn!(node = %info.name, device = %info.node_id.short(), "tailnet admission revoked and node disconnected: {reason}");
                    }
                    Ok(Err(e)) => warn!(node = %info.name, "tailnet revocation not stored: {e}"),
                    Err(e) => warn!(node = %info.name, "tailnet revocation failed: {e}"),
                }
            }
        }
    });
}
