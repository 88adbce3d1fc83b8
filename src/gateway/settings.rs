//! What a gateway runs with: `gateway run` flags over `clawmesh.json` over defaults, resolved
//! once at start ([`GatewaySettings::resolve`]).

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{anyhow, bail, Result};
use clawmesh_discovery::PeerUrl;
use clawmesh_federation::consensus::ReplicaConfig;
use clawmesh_federation::health::HealthConfig;
use clawmesh_federation::logs::collector::StoreLimits;
use clawmesh_federation::logs::spool::SpoolLimits;
use tracing::warn;

use crate::config::FileConfig;

use super::discovery::DiscoverySettings;
use super::tailnet_auth::TailnetPolicy;

use crate::gateway::shared_config::SyncPolicy;

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
    /// `--no-mdns` (also `OPENCLAW_DISABLE_BONJOUR=1`).
    pub no_mdns: bool,
    /// `--tailnet`: find peers in tailscaled's status.
    pub tailnet: bool,
    /// `--upstream`: the OpenClaw gateway to lend the federation's nodes to.
    pub upstream: Option<String>,
    /// `--upstream-token` / `CLAWMESH_UPSTREAM_TOKEN`.
    pub upstream_token: Option<String>,
    /// `--upstream-tls-fingerprint`.
    pub upstream_tls_fingerprint: Option<String>,
    /// `--upstream-node` (repeatable selectors).
    pub upstream_nodes: Vec<String>,
    /// `--upstream-auto-approve`.
    pub upstream_auto_approve: bool,
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
    /// The keys of `local_config` set by a command-line flag (shown as source `flag`).
    pub flag_keys: std::collections::BTreeSet<String>,
    /// Consensus settings (`gateway.federation.*`, `gateway.sync.compression|batchSize`);
    /// `preferred` and `health_interval` are filled in from the rest at start.
    pub consensus: ReplicaConfig,
    /// Log shipping to the primary (`logging.remote.*`).
    pub remote_logs: RemoteLogs,
    /// mDNS and tailnet discovery (`gateway.discovery.*`).
    pub discovery: DiscoverySettings,
    /// Tailnet admission from this gateway's own `clawmesh.json` (`gateway.auth.allowTailscale`,
    /// `gateway.auth.tailscale.*`), in force until the shared config's effective view arrives.
    pub tailnet_policy: TailnetPolicy,
    /// Started with a token and neither `--primary` nor `--join`: look for a gateway of the
    /// federation and join it; start the federation only if none shows (and the mode allows).
    pub find_federation: bool,
    /// The OpenClaw gateway this gateway lends its federation's nodes to
    /// (`gateway.upstream.*`), if any.
    pub upstream: Option<crate::upstream::UpstreamSettings>,
}

/// `logging.remote.*`: whether this gateway spools and ships its logs, and how often.
#[derive(Debug, Clone)]
pub struct RemoteLogs {
    /// `logging.remote.enabled` (default true: logs from every region in one place).
    pub enabled: bool,
    /// `logging.remote.endpoint`: accepted and shown; the mesh already knows the primary,
    /// which is where records go.
    pub endpoint: Option<String>,
    /// `logging.remote.batchInterval` (default 5000 ms).
    pub batch_interval: Duration,
    /// `logging.spool.maxBytes|maxAge|retainAcked` (ages in ms).
    pub spool: SpoolLimits,
    /// `logging.store.maxBytes|maxAge` (age in ms): the collector's store on the primary.
    pub store: StoreLimits,
}

impl RemoteLogs {
    fn from_file(file: &FileConfig) -> Result<RemoteLogs> {
        let ms = file.u64("logging.remote.batchInterval")?.unwrap_or(5000);
        // 10 ms at least: below that a batch is a request per record; 10 minutes at most, so
        // a typo cannot leave records unshipped for days.
        if !(10..=600_000).contains(&ms) {
            bail!("logging.remote.batchInterval must be between 10 and 600000 ms, not {ms}");
        }
        let (sd, cd) = (SpoolLimits::default(), StoreLimits::default());
        let ms_or = |key: &str, d: Duration| -> Result<Duration> {
            Ok(file.u64(key)?.map(Duration::from_millis).unwrap_or(d))
        };
        Ok(RemoteLogs {
            enabled: file.bool("logging.remote.enabled")?.unwrap_or(true),
            endpoint: file.str("logging.remote.endpoint")?,
            batch_interval: Duration::from_millis(ms),
            spool: SpoolLimits {
                max_bytes: file.u64("logging.spool.maxBytes")?.unwrap_or(sd.max_bytes),
                max_age: ms_or("logging.spool.maxAge", sd.max_age)?,
                retain_acked: ms_or("logging.spool.retainAcked", sd.retain_acked)?,
            },
            store: StoreLimits {
                max_bytes: file.u64("logging.store.maxBytes")?.unwrap_or(cd.max_bytes),
                max_age: ms_or("logging.store.maxAge", cd.max_age)?,
            },
        })
    }
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
        let bind = match flags.bind.clone() {
            Some(b) => b,
            None => match file.str("gateway.bind")? {
                Some(b) => b.parse().map_err(|e: String| anyhow!(e))?,
                None => Bind::Loopback,
            },
        };
        let token = flags
            .token
            .clone()
            .or(file.first_str(&["gateway.authToken", "gateway.remote.authToken"])?);
        let discovery = DiscoverySettings::resolve(&bind, flags.no_mdns, flags.tailnet, file)?;
        let find_federation = token.is_some()
            && !flags.primary
            && join.is_none()
            && mode.as_deref() != Some("primary")
            && discovery.any();
        if mode.as_deref() == Some("remote") && !flags.primary && join.is_none() && !find_federation
        {
            bail!("gateway.mode is \"remote\" but no primary is given: set gateway.primaryUrl or pass --join quic://host:port");
        }
        let join = match (primary, join) {
            (false, Some(j)) => Some(PeerUrl::parse(&j, crate::DEFAULT_PORT)?),
            _ => None,
        };
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
        Ok(GatewaySettings {
            discovery,
            find_federation,
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
                for (key, value) in flag_values(&flags) {
                    local.insert(key.into(), value);
                }
                local
            },
            flag_keys: flag_values(&flags)
                .into_iter()
                .map(|(k, _)| k.to_string())
                .collect(),
            consensus: consensus_settings(file)?,
            tailnet_policy: {
                let leaves = file.leaves();
                let (policy, warnings) = TailnetPolicy::from_lookup(|k| leaves.get(k).cloned());
                for w in warnings {
                    warn!("{w}");
                }
                policy
            },
            remote_logs: RemoteLogs::from_file(file)?,
            tls: match flags.tls.clone() {
                Some(t) => Some(t),
                None => tls_from_file(file)?,
            },
            upstream: upstream_settings(&flags, file)?,
        })
    }
}

/// The config keys the command-line flags set, with their values: they show in `config get`
/// and `config show --effective` with the source `flag`.
fn flag_values(flags: &RunFlags) -> Vec<(&'static str, serde_json::Value)> {
    let mut out = Vec::new();
    if let Some(n) = &flags.name {
        out.push(("gateway.nodeName", n.clone().into()));
    }
    if let Some(r) = &flags.region {
        out.push(("gateway.region", r.clone().into()));
    }
    if let Some(p) = flags.port {
        out.push(("gateway.port", p.into()));
    }
    if let Some(a) = &flags.advertise {
        out.push(("gateway.advertise", a.clone().into()));
    }
    if let Some(ms) = flags.health_interval {
        out.push(("gateway.failover.healthCheckInterval", ms.into()));
    }
    if let Some(t) = flags.unhealthy_threshold {
        out.push(("gateway.failover.unhealthyThreshold", t.into()));
    }
    out
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

/// `--upstream*` flags over `gateway.upstream.*`; None when no URL is given either way.
fn upstream_settings(
    flags: &RunFlags,
    file: &FileConfig,
) -> Result<Option<crate::upstream::UpstreamSettings>> {
    let Some(url) = flags.upstream.clone().or(file.str("gateway.upstream.url")?) else {
        return Ok(None);
    };
    crate::upstream::UpstreamSettings::check_url(&url).map_err(|e| anyhow!(e))?;
    let nodes = if flags.upstream_nodes.is_empty() {
        file.strings("gateway.upstream.nodes")?.unwrap_or_default()
    } else {
        flags.upstream_nodes.clone()
    };
    let s = crate::upstream::UpstreamSettings {
        url,
        token: flags
            .upstream_token
            .clone()
            .or(file.str("gateway.upstream.token")?),
        tls_fingerprint: flags
            .upstream_tls_fingerprint
            .clone()
            .or(file.str("gateway.upstream.tlsFingerprint")?),
        nodes,
        auto_approve: flags.upstream_auto_approve
            || file.bool("gateway.upstream.autoApprove")?.unwrap_or(false),
    };
    s.pin().map_err(|e| anyhow!(e))?;
    if s.url.starts_with("wss://") && s.tls_fingerprint.is_none() {
        bail!("a wss:// upstream needs gateway.upstream.tlsFingerprint (or --upstream-tls-fingerprint): the leaf certificate's SHA-256, as OpenClaw's --tls-fingerprint");
    }
    Ok(Some(s))
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
