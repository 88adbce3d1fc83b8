//! `clawmesh gateway run`: a gateway process.
//!
//! Resolves its settings (flags over `clawmesh.json` over defaults), takes the state-dir lock,
//! loads or creates the device key, opens the state database, binds QUIC, starts the mesh and
//! the method table, publishes `gateway.json` for the local CLI, and runs until SIGINT/SIGTERM
//! (links closed with a reason, runtime file removed) or a fatal join refusal.

pub mod methods;
pub mod registry;
pub mod scopes;
pub mod shared_config;

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use clawmesh_discovery::PeerUrl;
use clawmesh_federation::consensus::{Replica, ReplicaConfig};
use clawmesh_federation::endpoint::{self, TransportOptions};
use clawmesh_federation::handshake;
use clawmesh_federation::health::HealthConfig;
use clawmesh_federation::identity::{DeviceIdentity, PublicKey};
use clawmesh_federation::liveness;
use clawmesh_federation::mesh::{Admission, Mesh, MeshConfig};
use clawmesh_federation::pairing::{Admission as PairingDecision, DeviceMeta, Registry};
use clawmesh_federation::rpc::{self, Caller, CallerKind};
use clawmesh_federation::store::Store;
use clawmesh_federation::wire::{Hello, HelloRole, NodeHello, Refusal, RefusalCode};
use quinn::Connection;
use tracing::{info, warn};

use crate::config::FileConfig;
use crate::gateway::methods::Methods;
use crate::gateway::registry::{NodeInfo, NodeLink, NodeRegistry};

use crate::state_dir::{DirLock, Runtime};
use shared_config::SyncPolicy;

/// Where to listen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Bind {
    /// 127.0.0.1 only (the default, as for the classic gateway).
    Loopback,
    /// Every interface.
    Lan,
    /// The machine's Tailscale address (100.64.0.0/10).
    Tailnet,
    /// One address.
    Ip(IpAddr),
}

impl std::str::FromStr for Bind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "loopback" => Ok(Bind::Loopback),
            "lan" => Ok(Bind::Lan),
            "tailnet" => Ok(Bind::Tailnet),
            ip => ip.parse().map(Bind::Ip).map_err(|_| {
                format!("--bind takes loopback, lan, tailnet or an IP address, not {ip:?}")
            }),
        }
    }
}

/// Command-line flags of `gateway run` (None = not given).
#[derive(Debug, Clone, Default)]
pub struct RunFlags {
    /// `--name`.
    pub name: Option<String>,
    /// `--region`.
    pub region: Option<String>,
    /// `--bind`.
    pub bind: Option<Bind>,
    /// `--port`.
    pub port: Option<u16>,
    /// `--advertise`.
    pub advertise: Option<String>,
    /// `--primary`.
    pub primary: bool,
    /// `--join`.
    pub join: Option<String>,
    /// `--token` / `CLAWMESH_TOKEN`.
    pub token: Option<String>,
    /// `--health-interval` (ms).
    pub health_interval: Option<u64>,
    /// `--unhealthy-threshold`.
    pub unhealthy_threshold: Option<u32>,
    /// `--tls auto` or `--tls-cert` + `--tls-key`.
    pub tls: Option<crate::bridge::tls::TlsSource>,
}

/// Everything a gateway runs with, after merging flags, file and defaults.
#[derive(Debug, Clone)]
pub struct GatewaySettings {
    /// State dir.
    pub state_dir: PathBuf,
    /// Name.
    pub name: String,
    /// Region.
    pub region: Option<String>,
    /// Listen address.
    pub bind: Bind,
    /// UDP port (0 = any).
    pub port: u16,
    /// Advertised address override.
    pub advertise: Option<String>,
    /// Configured as primary.
    pub primary: bool,
    /// Primary to join.
    pub join: Option<PeerUrl>,
    /// Federation join secret.
    pub token: Option<String>,
    /// Extra operator token (`gateway.auth.token`).
    pub operator_token: Option<String>,
    /// Health settings.
    pub health: HealthConfig,
    /// TLS for the classic bridge (`wss://`), if any.
    pub tls: Option<crate::bridge::tls::TlsSource>,
    /// Gateway serving work for offline gateways (`gateway.failover.fallbackNode`).
    pub fallback: Option<String>,
    /// Which synced sections apply here and whether they override local keys
    /// (`gateway.sync.*`).
    pub sync: SyncPolicy,
    /// This gateway's own config keys (`clawmesh.json` leaves), for the effective config.
    pub local_config: BTreeMap<String, serde_json::Value>,
    /// Consensus settings (`gateway.federation.*`, `gateway.sync.compression|batchSize`);
    /// `preferred` and `health_interval` are filled in from the rest at start.
    pub consensus: ReplicaConfig,
}

fn hostname() -> String {
    nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "gateway".into())
}

impl GatewaySettings {
    /// Merges flags over the config file over defaults; reports unknown config keys.
    pub fn resolve(state_dir: PathBuf, flags: RunFlags, file: &FileConfig) -> Result<Self> {
        for k in &file.unknown {
            warn!(
                "unknown key {k} in {} (ignored)",
                file.path
                    .as_ref()
                    .map(|p| p.display().to_string())
                    .unwrap_or_default()
            );
        }
        let mode = file.str("gateway.mode")?;
        if let Some(m) = &mode {
            if !["remote", "primary", "local"].contains(&m.as_str()) {
                bail!("gateway.mode must be \"primary\" or \"remote\", not {m:?}");
            }
        }
        let join = match flags.join.clone() {
            Some(j) => Some(j),
            None => file.first_str(&["gateway.primaryUrl"])?,
        };
        if flags.primary && flags.join.is_some() {
            bail!("--primary and --join exclude each other: a primary is joined, it does not join");
        }
        let primary = flags.primary || (join.is_none() && mode.as_deref() != Some("remote"));
        if mode.as_deref() == Some("remote") && !flags.primary && join.is_none() {
            bail!("gateway.mode is \"remote\" but no primary is given: set gateway.primaryUrl or pass --join quic://host:port");
        }
        let join = match (primary, join) {
            (false, Some(j)) => Some(PeerUrl::parse(&j, crate::DEFAULT_PORT)?),
            _ => None,
        };
        let token = flags
            .token
            .clone()
            .or(file.first_str(&["gateway.authToken", "gateway.remote.authToken"])?);
        let interval = flags
            .health_interval
            .or(file.first_u64(&["gateway.failover.healthCheckInterval"])?)
            .unwrap_or(10_000);
        if interval < 10 {
            bail!("health interval must be at least 10 ms, not {interval}");
        }
        let threshold = match flags.unhealthy_threshold {
            Some(t) => u64::from(t),
            None => file
                .first_u64(&["gateway.failover.unhealthyThreshold"])?
                .unwrap_or(3),
        };
        if threshold == 0 || threshold > 1000 {
            bail!("unhealthy threshold must be between 1 and 1000, not {threshold}");
        }
        let port = match flags.port {
            Some(p) => p,
            None => match file.first_u64(&["gateway.port", "gateway.remote.listenPort"])? {
                Some(p) => {
                    u16::try_from(p).map_err(|_| anyhow!("gateway.port {p} is not a port"))?
                }
                None => crate::DEFAULT_PORT,
            },
        };
        let bind = match flags.bind.clone() {
            Some(b) => b,
            None => match file.str("gateway.bind")? {
                Some(b) => b.parse().map_err(|e: String| anyhow!(e))?,
                None => Bind::Loopback,
            },
        };
        Ok(GatewaySettings {
            state_dir,
            name: flags
                .name
                .clone()
                .or(file.first_str(&["gateway.nodeName", "gateway.name"])?)
                .unwrap_or_else(hostname),
            region: flags.region.clone().or(file.str("gateway.region")?),
            bind,
            port,
            advertise: flags.advertise.clone().or(file.str("gateway.advertise")?),
            primary,
            join,
            token,
            operator_token: file.str("gateway.auth.token")?,
            health: HealthConfig {
                interval: Duration::from_millis(interval),
                unhealthy_threshold: threshold as u32,
            },
            fallback: file.str("gateway.failover.fallbackNode")?,
            sync: SyncPolicy::from_file(file)?,
            local_config: {
                // Flags are this gateway's own settings too: they show (and win) as local keys.
                let mut local = file.leaves();
                if let Some(ms) = flags.health_interval {
                    local.insert("gateway.failover.healthCheckInterval".into(), ms.into());
                }
                if let Some(t) = flags.unhealthy_threshold {
                    local.insert("gateway.failover.unhealthyThreshold".into(), t.into());
                }
                local
            },
            consensus: consensus_settings(file)?,
            tls: match flags.tls.clone() {
                Some(t) => Some(t),
                None => tls_from_file(file)?,
            },
        })
    }
}

/// Consensus settings from `gateway.federation.*` and `gateway.sync.*`.
fn consensus_settings(file: &FileConfig) -> Result<ReplicaConfig> {
    let d = ReplicaConfig::default();
    let max_voters = file
        .u64("gateway.federation.maxVoters")?
        .unwrap_or(d.max_voters as u64);
    if !(1..=9).contains(&max_voters) {
        bail!("gateway.federation.maxVoters must be 1 to 9, not {max_voters}");
    }
    let batch = file.u64("gateway.sync.batchSize")?.unwrap_or(d.batch_size);
    if !(1..=10_000).contains(&batch) {
        bail!("gateway.sync.batchSize must be 1 to 10000, not {batch}");
    }
    let write_timeout = file
        .u64("gateway.federation.writeTimeout")?
        .map(Duration::from_millis)
        .unwrap_or(d.write_timeout);
    if write_timeout < Duration::from_millis(100) {
        bail!("gateway.federation.writeTimeout must be at least 100 ms");
    }
    if file.bool("gateway.sync.deltaSync")? == Some(false) {
        warn!("gateway.sync.deltaSync is false, but clawmesh always syncs by deltas (the replicated log); a remote far behind receives a compressed snapshot");
    }
    let snapshot_every = file
        .u64("gateway.federation.snapshotEvery")?
        .unwrap_or(d.snapshot_every);
    if snapshot_every < 10 {
        bail!("gateway.federation.snapshotEvery must be at least 10 entries");
    }
    let heartbeat = file.u64("gateway.federation.heartbeat")?;
    if let Some(ms) = heartbeat {
        if !(100..=60_000).contains(&ms) {
            bail!("gateway.federation.heartbeat must be 100 to 60000 ms, not {ms}");
        }
    }
    Ok(ReplicaConfig {
        heartbeat: heartbeat.map(Duration::from_millis),
        voters: file
            .strings("gateway.federation.voters")?
            .unwrap_or_default(),
        max_voters: max_voters as usize,
        write_timeout,
        compression: file
            .bool("gateway.sync.compression")?
            .unwrap_or(d.compression),
        batch_size: batch,
        snapshot_every,
        keep_log: file
            .u64("gateway.federation.keepLog")?
            .unwrap_or(d.keep_log),
        ..d
    })
}

fn tls_from_file(file: &FileConfig) -> Result<Option<crate::bridge::tls::TlsSource>> {
    use crate::bridge::tls::TlsSource;
    for prefix in ["gateway.tls", "gateway.remote.tls"] {
        let enabled = file.bool(&format!("{prefix}.enabled"))?;
        if enabled == Some(false) {
            continue;
        }
        let cert = file.str(&format!("{prefix}.cert"))?;
        let key = file.str(&format!("{prefix}.key"))?;
        match (cert, key) {
            (Some(c), Some(k)) => {
                return Ok(Some(TlsSource::Files {
                    cert: c.into(),
                    key: k.into(),
                }))
            }
            (None, None) if enabled == Some(true) => return Ok(Some(TlsSource::Auto)),
            (None, None) => {}
            _ => bail!("{prefix}: give both cert and key, or neither"),
        }
    }
    if file.bool("gateway.tls.auto")? == Some(true) {
        return Ok(Some(TlsSource::Auto));
    }
    Ok(None)
}

/// Pending TCP connections the kernel queues for the bridge: a fleet of nodes reconnecting
/// after a gateway restart arrives in bursts of thousands; the default 128 drops SYNs and
/// costs each dropped client a 1 s retransmit.
const TCP_BACKLOG: u32 = 4096;

/// A TCP listener for the classic bridge: `TCP_NODELAY` (inherited by accepted sockets, so a
/// small reply never waits behind a delayed ACK) and a deep accept backlog.
fn tcp_listener(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    let sock = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    sock.set_reuseaddr(true)?;
    sock.set_nodelay(true)?;
    sock.bind(addr)?;
    sock.listen(TCP_BACKLOG)
}

/// Binds UDP (QUIC) and TCP (classic bridge) on the same port; with port 0, finds one that is
/// free for both.
fn bind_both(ip: IpAddr, port: u16) -> Result<(std::net::UdpSocket, tokio::net::TcpListener)> {
    let attempts = if port == 0 { 20 } else { 1 };
    let mut last = None;
    for _ in 0..attempts {
        let udp = std::net::UdpSocket::bind(SocketAddr::new(ip, port))
            .with_context(|| format!("cannot bind UDP {ip}:{port} (QUIC)"))?;
        let p = udp.local_addr()?.port();
        match tcp_listener(SocketAddr::new(ip, p)) {
            Ok(tcp) => return Ok((udp, tcp)),
            Err(e) => last = Some(e),
        }
    }
    Err(anyhow!(
        "cannot bind TCP {ip}:{port} for the classic WebSocket bridge: {}",
        last.map(|e| e.to_string()).unwrap_or_default()
    ))
}

fn interface_addrs() -> Vec<IpAddr> {
    let Ok(addrs) = nix::ifaddrs::getifaddrs() else {
        return Vec::new();
    };
    addrs
        .filter_map(|a| a.address)
        .filter_map(|s| s.as_sockaddr_in().map(|v4| IpAddr::V4(v4.ip())))
        .collect()
}

fn is_tailnet(ip: &IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            o[0] == 100 && (64..128).contains(&o[1])
        }
        IpAddr::V6(_) => false,
    }
}

fn bind_ip(bind: &Bind) -> Result<IpAddr> {
    Ok(match bind {
        Bind::Loopback => IpAddr::V4(Ipv4Addr::LOCALHOST),
        Bind::Lan => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        Bind::Ip(ip) => *ip,
        Bind::Tailnet => interface_addrs()
            .into_iter()
            .find(is_tailnet)
            .ok_or_else(|| anyhow!("--bind tailnet: this machine has no Tailscale address (100.64.0.0/10); is tailscale up?"))?,
    })
}

fn default_advertise(bound: SocketAddr) -> String {
    if !bound.ip().is_unspecified() {
        return bound.to_string();
    }
    let ip = interface_addrs()
        .into_iter()
        .find(|ip| !ip.is_loopback())
        .unwrap_or(IpAddr::V4(Ipv4Addr::LOCALHOST));
    SocketAddr::new(ip, bound.port()).to_string()
}

/// Decides on operators and nodes that dial this gateway.
struct GatewayAdmission {
    own_key: PublicKey,
    tokens: Vec<String>,
    methods: Methods,
    health: HealthConfig,
}

impl GatewayAdmission {
    fn admit_node(
        &self,
        key: &PublicKey,
        remote: SocketAddr,
        hello: &NodeHello,
    ) -> Result<CallerKind, Refusal> {
        if let Some(t) = &hello.token {
            if !self.tokens.is_empty()
                && !self.tokens.iter().any(|x| handshake::secrets_equal(x, t))
            {
                return Err(Refusal {
                    code: RefusalCode::BadToken,
                    message: "unauthorized: gateway token mismatch".into(),
                    retryable: false,
                });
            }
        }
        let decision = self
            .methods
            .pairing()
            .admit(
                key,
                &DeviceMeta {
                    name: hello.name.clone(),
                    role: "node".into(),
                    addr: remote.to_string(),
                    platform: hello.platform.clone(),
                    client_id: "clawmesh-node".into(),
                    client_mode: "node".into(),
                    ..Default::default()
                },
            )
            .map_err(|e| Refusal {
                code: RefusalCode::Unavailable,
                message: format!("pairing registry unavailable: {e}"),
                retryable: true,
            })?;
        match decision {
            PairingDecision::Paired(_) => Ok(CallerKind::Node {
                name: hello.name.clone(),
            }),
            PairingDecision::Pending(p) => {
                info!(
                    device = %p.device_id,
                    name = %p.name,
                    request = %p.request_id,
                    "pairing request pending; approve with `clawmesh devices approve {}`",
                    p.request_id
                );
                Err(Refusal {
                    code: RefusalCode::PairingRequired,
                    message: format!(
                        "pairing required: device is not approved yet; on the gateway run `clawmesh devices approve {}` (fingerprint {}) (requestId: {})",
                        p.request_id, p.fingerprint, p.request_id
                    ),
                    retryable: true,
                })
            }
        }
    }
}

impl Admission for GatewayAdmission {
    fn admit(
        &self,
        key: &PublicKey,
        remote: SocketAddr,
        hello: &Hello,
    ) -> Result<CallerKind, Refusal> {
        match &hello.role {
            HelloRole::Operator(op) => {
                let all = || {
                    scopes::ALL
                        .iter()
                        .map(|s| s.to_string())
                        .collect::<Vec<_>>()
                };
                if *key == self.own_key {
                    return Ok(CallerKind::Operator {
                        scopes: all(),
                        client: op.client.clone(),
                    });
                }
                let Some(token) = &op.token else {
                    return Err(Refusal {
                        code: RefusalCode::BadToken,
                        message: "operator token required: pass --token (or CLAWMESH_TOKEN), or run the CLI on the gateway's machine with its state dir".into(),
                        retryable: false,
                    });
                };
                if !self
                    .tokens
                    .iter()
                    .any(|t| handshake::secrets_equal(t, token))
                {
                    return Err(Refusal {
                        code: RefusalCode::BadToken,
                        message: "unauthorized: gateway token mismatch".into(),
                        retryable: false,
                    });
                }
                let scopes = if op.scopes.is_empty() {
                    all()
                } else {
                    op.scopes
                        .iter()
                        .filter(|s| scopes::ALL.contains(&s.as_str()))
                        .cloned()
                        .collect()
                };
                Ok(CallerKind::Operator {
                    scopes,
                    client: op.client.clone(),
                })
            }
            HelloRole::Node(n) => self.admit_node(key, remote, n),
            HelloRole::Gateway(_) => Err(Refusal {
                code: RefusalCode::BadHello,
                message: "gateway hellos are handled by the mesh".into(),
                retryable: false,
            }),
        }
    }

    fn connected(&self, conn: Connection, caller: Caller, hello: Hello) {
        let methods = Arc::new(self.methods.clone());
        match (&caller.kind, hello.role, caller.key) {
            (CallerKind::Node { .. }, HelloRole::Node(n), Some(key)) => {
                let info = NodeInfo {
                    node_id: key.device_id(),
                    key,
                    name: n.name.clone(),
                    remote: caller.remote.to_string(),
                    platform: n.platform,
                    version: hello.software,
                    // Bounded: a node declares a handful of commands and labels.
                    commands: n.commands.into_iter().take(256).collect(),
                    labels: n.labels.into_iter().take(64).collect(),
                    connected_at: std::time::SystemTime::now(),
                    client_id: "clawmesh-node".into(),
                    client_mode: "node".into(),
                    device_family: String::new(),
                    caps: Vec::new(),
                    path_env: None,
                };
                let node_id = info.node_id;
                let registry = self.methods.nodes().clone();
                let node_name = info.name.clone();
                let session = registry.attach(info, NodeLink::Quic(conn.clone()));
                if let Some(level) = self.methods.exec_default() {
                    crate::gateway::methods::push_exec_default(
                        NodeLink::Quic(conn.clone()),
                        Some(level),
                        node_name,
                    );
                }
                info!(node = %n.name, device = %node_id.short(), remote = %caller.remote, "node attached");
                let health = self.methods.health_settings().unwrap_or(self.health);
                tokio::spawn(async move {
                    // Serve the node's own requests while pinging it: a node that stops
                    // answering is closed, which fails its pending invokes at once.
                    let live = liveness::Liveness::default();
                    tokio::join!(
                        rpc::serve(conn.clone(), caller, methods),
                        liveness::monitor(conn.clone(), health, live),
                    );
                    registry.detach(&node_id, session);
                    let reason = conn
                        .close_reason()
                        .map(|r| r.to_string())
                        .unwrap_or_default();
                    info!(node = %n.name, "node detached: {reason}");
                });
            }
            _ => {
                tokio::spawn(rpc::serve(conn, caller, methods));
            }
        }
    }
}

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

/// Applies shared-config changes that running components can take without a restart
/// ([`FOLLOWED_KEYS`]): the fallback gateway, the health settings, the log filter (unless
/// `--log` or `RUST_LOG` set one) and the nodes' default exec level. Each change is logged.
fn spawn_config_follower(replica: &Replica, methods: &Methods, s: &GatewaySettings) {
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
                    if level.parse::<crate::node::approvals::Security>().is_ok() =>
                {
                    methods.set_exec_default(Some(level.clone()));
                }
                Some(other) => {
                    warn!("{EXEC_DEFAULT_KEY} must be \"deny\", \"allowlist\" or \"full\", not {other}; nodes keep the previous default");
                }
            }
            if let Some(level) =
                shared_config::lookup(&entries, "logging.level").and_then(|e| e.value.as_str())
            {
                if changed.iter().any(|k| *k == "logging.level") {
                    match crate::cli::set_log_filter(level) {
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
fn spawn_federation_tasks(mesh: &Mesh, methods: &Methods, region: Option<String>) {
    let (m, registry) = (mesh.clone(), methods.nodes().clone());
    let mut changes = registry.changes();
    tokio::spawn(async move {
        loop {
            // Coalesce bursts (hundreds of nodes reconnecting after a restart) into one
            // announcement per 50 ms.
            tokio::time::sleep(Duration::from_millis(50)).await;
            let summaries = registry
                .list()
                .into_iter()
                .map(|(info, transport)| {
                    let mut labels = info.labels.clone();
                    if let Some(r) = &region {
                        if !labels.iter().any(|(k, _)| k == "region") {
                            labels.push(("region".into(), r.clone()));
                        }
                    }
                    clawmesh_federation::directory::NodeSummary {
                        id: info.node_id,
                        name: info.name,
                        labels,
                        commands: info.commands,
                        transport: transport.to_string(),
                        platform: info.platform,
                        ip: crate::gateway::registry::ip_of(&info.remote),
                        version: info.version,
                    }
                })
                .collect();
            m.set_local_nodes(summaries);
            if changes.changed().await.is_err() {
                return;
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

/// Disconnects nodes whose revocation arrives through the replicated log (a decision made on
/// another gateway, or made while this one was away).
fn spawn_pairing_follower(replica: &Replica, methods: &Methods) {
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
        primary: s.primary,
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
    mesh.attach_pairing(methods.pairing().clone());
    methods.set_fallback(s.fallback.clone());
    let replica = Replica::start(
        mesh.clone(),
        store,
        ReplicaConfig {
            preferred: s.primary,
            health_interval: s.health.interval,
            ..s.consensus.clone()
        },
    )
    .await
    .map_err(|e| anyhow!("cannot start the federation's consensus: {e}"))?;
    methods.set_consensus(replica.clone(), s.sync, s.local_config.clone());
    spawn_federation_tasks(&mesh, &methods, s.region.clone());
    spawn_config_follower(&replica, &methods, &s);
    spawn_pairing_follower(&replica, &methods);
    // The classic WebSocket bridge on the same port, TCP.
    let (bridge_stop, bridge_rx) = tokio::sync::watch::channel(None);
    let mut secrets: Vec<String> = s.token.iter().cloned().collect();
    secrets.extend(s.operator_token.iter().cloned());
    let bridge = Arc::new(crate::bridge::Bridge::new(
        methods.clone(),
        secrets,
        bridge_rx,
    ));
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
    info!(
        name = %s.name,
        role = if s.primary { "primary" } else { "remote" },
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
    let _ = bridge_stop.send(Some(reason.clone()));
    let _ = tokio::time::timeout(Duration::from_secs(2), bridge_task).await;
    // Bounded: raft stops at its next step; a wedged storage call must not hold the exit.
    if tokio::time::timeout(Duration::from_secs(2), replica.shutdown())
        .await
        .is_err()
    {
        warn!("consensus did not stop within 2 s");
    }
    mesh.shutdown(&reason).await;
    Runtime::remove(&s.state_dir);
    outcome.map(|_| ())
}
