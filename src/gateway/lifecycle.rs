//! A gateway process from start to stop: lock the state dir, load the key, open the state
//! database, bind, start the mesh, the consensus, the method table and the bridge, publish
//! `gateway.json`, then run until SIGINT/SIGTERM or a fatal join refusal.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, Context, Result};
use clawmesh_federation::consensus::{Replica, ReplicaConfig};
use clawmesh_federation::endpoint::{self, TransportOptions};
use clawmesh_federation::identity::DeviceIdentity;
use clawmesh_federation::mesh::{Mesh, MeshConfig};
use clawmesh_federation::pairing::Registry;
use clawmesh_federation::store::Store;
use tracing::{info, warn};

use crate::gateway::methods::Methods;
use crate::gateway::registry::NodeRegistry;

use super::admission::GatewayAdmission;
use super::discovery::{AdvertiseArgs, GatewayDiscovery, FIND_WINDOW};
use super::followers::{
    spawn_config_follower, spawn_federation_tasks, spawn_pairing_follower, spawn_tailnet_recheck,
};
use super::listen::{bind_both, bind_ip, default_advertise};
use super::settings::GatewaySettings;
use super::tailnet_auth::TailnetAuth;
use crate::state_dir::{DirLock, Runtime};

/// Raises the open-files soft limit to the hard limit: a gateway holds one socket per classic
/// node, and the common default of 1024 would cap it far below the tens of thousands it is
/// built for.
fn raise_nofile_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        if soft < hard {
            match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
                Ok(()) => tracing::debug!(from = soft, to = hard, "raised the open-files limit"),
                Err(e) => warn!("cannot raise the open-files limit from {soft}: {e}"),
            }
        }
    }
}

/// Runs a gateway until a signal or a fatal error.
pub async fn run(s: GatewaySettings) -> Result<()> {
    raise_nofile_limit();
    std::fs::create_dir_all(&s.state_dir)
        .with_context(|| format!("creating state dir {}", s.state_dir.display()))?;
    let _lock = DirLock::acquire(&s.state_dir)?;
    let (identity, created) = DeviceIdentity::load_or_create(&s.state_dir)?;
    if created {
        info!(device = %identity.device_id(), "created device key in {}", s.state_dir.display());
    }
    let store = Store::open(&s.state_dir)?;
    let pairing = Registry::open(store.clone())?;
    let ip = bind_ip(&s.bind)?;
    let (udp, tcp) = bind_both(ip, s.port)?;
    let ep = endpoint::from_socket(&identity, udp, &TransportOptions::default())?;
    let bound = ep.local_addr().context("reading the bound address")?;
    let mut disc = GatewayDiscovery::start(
        &s.discovery,
        s.token.as_deref(),
        &identity.public_key(),
        if s.port != 0 {
            s.port
        } else {
            crate::DEFAULT_PORT
        },
    )?;
    let primary = if s.find_federation {
        let me = identity.public_key();
        match store.membership()?.members.iter().find(|m| m.key == me) {
            // Already a member: the mesh knows its federation; nothing to look for.
            Some(m) => m.primary,
            None => {
                info!("looking for a gateway of this federation (mDNS/tailnet, up to {FIND_WINDOW:?})");
                if disc.find(FIND_WINDOW).await {
                    false
                } else {
                    if s.primary {
                        info!("no gateway of this federation found: starting it, as its primary");
                    } else {
                        info!("no gateway of this federation found yet: still looking");
                    }
                    s.primary
                }
            }
        }
    } else {
        s.primary
    };
    let tls = match &s.tls {
        Some(src) => Some(crate::bridge::tls::load(src, &s.state_dir)?),
        None => None,
    };
    let advertise = s
        .advertise
        .clone()
        .unwrap_or_else(|| default_advertise(bound));
    let join = match &s.join {
        Some(u) => Some(
            clawmesh_federation::mesh::resolve(&u.authority())
                .await
                .map_err(|e| anyhow!("--join {u}: {e}"))?,
        ),
        None => None,
    };
    let methods = Methods::new(pairing, Arc::new(NodeRegistry::default()));
    methods.set_tailnet(Arc::new(TailnetAuth::new(
        s.discovery.local_api(),
        s.tailnet_policy.clone(),
    )));
    let mut tokens: Vec<String> = s.token.iter().cloned().collect();
    tokens.extend(s.operator_token.iter().cloned());
    let admission = Arc::new(GatewayAdmission {
        own_key: identity.public_key(),
        tokens,
        methods: methods.clone(),
        health: s.health,
    });
    let cfg = MeshConfig {
        name: s.name.clone(),
        region: s.region.clone(),
        primary,
        join,
        token: s.token.clone(),
        advertise: advertise.clone(),
        health: s.health,
        software: crate::VERSION.to_string(),
    };
    let mesh = Mesh::start(
        cfg,
        &identity,
        ep,
        store.clone(),
        Arc::new(methods.clone()),
        admission,
    )?;
    methods.set_mesh(mesh.clone());
    mesh.attach_vitals(clawmesh_federation::vitals::VitalsSampler::new(
        &s.state_dir,
    ));
    mesh.attach_pairing(methods.pairing().clone());
    methods.set_fallback(s.fallback.clone());
    let replica = Replica::start(
        mesh.clone(),
        store,
        ReplicaConfig {
            preferred: primary,
            health_interval: s.health.interval,
            ..s.consensus.clone()
        },
    )
    .await
    .map_err(|e| anyhow!("cannot start the federation's consensus: {e}"))?;
    methods.set_consensus(
        replica.clone(),
        s.sync,
        s.local_config.clone(),
        s.flag_keys.clone(),
    );
    methods.set_logs(super::logs::GatewayLogs::start(
        &s.state_dir,
        &mesh,
        &s.remote_logs,
    )?);
    spawn_federation_tasks(&mesh, &methods);
    spawn_config_follower(&replica, &methods, &s);
    spawn_pairing_follower(&replica, &methods);
    spawn_tailnet_recheck(&methods);
    let alert_book = Arc::new(super::alerts::book::AlertBook::default());
    methods.set_alerts(alert_book.clone());
    super::alerts::spawn(methods.clone(), mesh.clone(), alert_book);
    // The classic WebSocket bridge on the same port, TCP.
    let (bridge_stop, bridge_rx) = tokio::sync::watch::channel(None);
    let mut secrets: Vec<String> = s.token.iter().cloned().collect();
    secrets.extend(s.operator_token.iter().cloned());
    let bridge = crate::bridge::Bridge::new(methods.clone(), secrets, bridge_rx);
    let metrics =
        crate::gateway::metrics::GatewayMetrics::new(methods.clone(), bridge.connection_count());
    let bridge = Arc::new(bridge.with_metrics(metrics));
    let ws_scheme = if tls.is_some() { "wss" } else { "ws" };
    let ws_host = if bound.ip().is_unspecified() {
        IpAddr::V4(Ipv4Addr::LOCALHOST)
    } else {
        bound.ip()
    };
    let ws_url = format!("{ws_scheme}://{}", SocketAddr::new(ws_host, bound.port()));
    let fingerprint = tls.as_ref().map(|t| t.fingerprint.clone());
    methods.set_front_doors(serde_json::json!({"wsUrl": ws_url, "tlsFingerprint": fingerprint}));
    let bridge_task = match tls {
        Some(t) => {
            info!(fingerprint = %t.fingerprint, "classic bridge on wss://{bound} (pin it with --tls-fingerprint {})", t.fingerprint);
            tokio::spawn(crate::bridge::serve_tls(tcp, t.config, bridge))
        }
        None => {
            if !ip.is_loopback() {
                warn!("classic bridge on plain ws://{bound}: classic clients refuse ws:// to public hosts; use --tls auto or --tls-cert/--tls-key");
            }
            tokio::spawn(crate::bridge::serve_plain(tcp, bridge))
        }
    };
    let local = if bound.ip().is_unspecified() {
        SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), bound.port())
    } else {
        bound
    };
    Runtime {
        pid: std::process::id(),
        name: s.name.clone(),
        quic: local.to_string(),
        advertise: advertise.clone(),
        ws: ws_url.clone(),
        tls_fingerprint: fingerprint.clone(),
        started_at: humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string(),
        version: crate::VERSION.to_string(),
    }
    .write(&s.state_dir)?;
    disc.advertise(AdvertiseArgs {
        name: &s.name,
        region: s.region.as_deref(),
        key: &identity.public_key(),
        bound,
    });
    disc.spawn_follower(mesh.clone(), !primary && s.join.is_none());
    // Upstream mode: the federation's nodes lent to an OpenClaw gateway, as node hosts there.
    let upstream = match &s.upstream {
        Some(u) => Some(
            crate::upstream::start(
                methods.clone(),
                u.clone(),
                s.state_dir.clone(),
                s.health.interval,
            )
            .map_err(|e| anyhow!("--upstream: {e}"))?,
        ),
        None => None,
    };
    info!(
        name = %s.name,
        role = if primary { "primary" } else { "remote" },
        quic = %bound,
        advertise = %advertise,
        device = %identity.device_id(),
        "gateway ready"
    );
    let mut fatal = mesh.fatal();
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing the SIGTERM handler")?;
    let outcome: Result<&str> = tokio::select! {
        _ = tokio::signal::ctrl_c() => Ok("SIGINT"),
        _ = sigterm.recv() => Ok("SIGTERM"),
        // `wait_for` sees a fatal error raised before this point too (a join refused while
        // the consensus was starting).
        r = fatal.wait_for(Option::is_some) => match r.map(|v| v.clone()) {
            Ok(Some(msg)) => Err(anyhow!(msg)),
            _ => Ok("mesh stopped"),
        },
    };
    let reason = match &outcome {
        Ok(sig) => format!("gateway {} shutting down ({sig})", s.name),
        Err(e) => format!("gateway {} stopping: {e}", s.name),
    };
    info!("{reason}");
    if let Some(u) = upstream {
        u.abort();
    }
    let _ = bridge_stop.send(Some(reason.clone()));
    let _ = tokio::time::timeout(Duration::from_secs(2), bridge_task).await;
    // Bounded: raft stops at its next step; a wedged storage call must not hold the exit.
    if tokio::time::timeout(Duration::from_secs(2), replica.shutdown())
        .await
        .is_err()
    {
        warn!("consensus did not stop within 2 s");
    }
    disc.shutdown();
    mesh.shutdown(&reason).await;
    // Every invoke answered so far has its audit record in the spool before the exit; the
    // writer stores a queue in milliseconds, 5 s covers a slow disk without holding the stop.
    if let Some(logs) = methods.logs_view() {
        if !logs.flush_audit(Duration::from_secs(5)).await {
            warn!("audit records not all stored within 5 s of the stop");
        }
    }
    Runtime::remove(&s.state_dir);
    outcome.map(|_| ())
}
