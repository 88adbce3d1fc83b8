//! How a gateway finds and is found: it advertises itself with mDNS on the LAN, browses mDNS
//! and polls the tailnet for gateways of its federation, joins one when started with a token
//! and no `--join`/`--primary`, and records how each peer was found for `gateway status --all`.
//!
//! Discovery only says where to knock. The mesh's handshake decides trust: an mDNS candidate
//! whose proven key differs from its advertised one is dropped with a log line, and the join
//! token proofs apply to every join.

use std::collections::HashSet;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Result;
use clawmesh_discovery::localapi::LocalApi;
use clawmesh_discovery::mdns::{self, Advertisement, Interfaces, Mdns, Registration};
use clawmesh_discovery::tailnet::{Selector, TailnetConfig, DEFAULT_POLL};
use clawmesh_discovery::{Candidate, Discovery, DiscoveryConfig, Event, FederationId};
use clawmesh_federation::identity::PublicKey;
use clawmesh_federation::mesh::{Mesh, MeshError};
use tokio::sync::mpsc;
use tracing::{info, warn};

use crate::config::FileConfig;

use super::settings::Bind;

/// How long a gateway started with a token and no `--join`/`--primary` looks for its
/// federation before it starts one itself: an mDNS answer on a LAN comes within a few hundred
/// milliseconds of the first query, and the first tailnet poll is immediate; 3 s leaves room
/// for a lost first query (mdns-sd re-asks after 1 s).
pub const FIND_WINDOW: Duration = Duration::from_secs(3);

/// While not yet a member, candidates that failed for a reason other than a forged key are
/// retried this often: a primary that was starting, or a member that pointed us on.
const RETRY: Duration = Duration::from_secs(2);

/// Discovery settings of a gateway (`gateway.discovery.*`, `--no-mdns`, `--tailnet`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DiscoverySettings {
    /// Advertise and browse mDNS on the LAN.
    pub mdns: bool,
    /// Poll tailscaled for peers.
    pub tailnet: bool,
    /// `gateway.discovery.tailnetTags`.
    pub tailnet_tags: Vec<String>,
    /// `gateway.discovery.tailnetHosts`.
    pub tailnet_hosts: Vec<String>,
    /// `gateway.discovery.tailnetSocket` (default: tailscaled's, or `$TS_SOCKET`).
    pub tailnet_socket: Option<PathBuf>,
}

/// Whether `OPENCLAW_DISABLE_BONJOUR` asks for no mDNS (seeds/002 users carry it over).
pub fn bonjour_disabled() -> bool {
    std::env::var("OPENCLAW_DISABLE_BONJOUR")
        .map(|v| matches!(v.trim(), "1" | "true" | "yes" | "on"))
        .unwrap_or(false)
}

impl DiscoverySettings {
    /// Resolves the settings: mDNS is on by default when bound to a LAN (beyond loopback, and
    /// not to the tailnet address, which is never advertised on a LAN), tailnet by default
    /// with `--bind tailnet`; `--no-mdns` and `OPENCLAW_DISABLE_BONJOUR=1` turn mDNS off
    /// whatever the file says.
    pub fn resolve(
        bind: &Bind,
        no_mdns: bool,
        tailnet_flag: bool,
        file: &FileConfig,
    ) -> Result<DiscoverySettings> {
        let beyond_loopback = match bind {
            Bind::Loopback | Bind::Tailnet => false,
            Bind::Ip(ip) => !ip.is_loopback() && !clawmesh_discovery::tsaddr::is_tailnet(ip),
            Bind::Lan => true,
        };
        let mdns = !no_mdns
            && !bonjour_disabled()
            && file
                .bool("gateway.discovery.mdns")?
                .unwrap_or(beyond_loopback);
        let tailnet = tailnet_flag
            || file
                .bool("gateway.discovery.tailnet")?
                .unwrap_or(*bind == Bind::Tailnet);
        Ok(DiscoverySettings {
            mdns,
            tailnet,
            tailnet_tags: file
                .strings("gateway.discovery.tailnetTags")?
                .unwrap_or_default(),
            tailnet_hosts: file
                .strings("gateway.discovery.tailnetHosts")?
                .unwrap_or_default(),
            tailnet_socket: file
                .str("gateway.discovery.tailnetSocket")?
                .map(PathBuf::from),
        })
    }

    /// Whether any source is on.
    pub fn any(&self) -> bool {
        self.mdns || self.tailnet
    }

    /// The tailnet poller's settings for federation port `port`.
    pub fn tailnet_config(&self, port: u16) -> TailnetConfig {
        TailnetConfig {
            api: match &self.tailnet_socket {
                Some(p) => LocalApi::new(p),
                None => LocalApi::default_socket(),
            },
            selector: Selector {
                tags: self.tailnet_tags.clone(),
                hosts: self.tailnet_hosts.clone(),
            },
            port,
            poll: DEFAULT_POLL,
        }
    }
}

/// A gateway's running discovery: the mDNS responder (and its advertisement) and the merged
/// candidate stream. Dropping it withdraws the advertisement.
pub struct GatewayDiscovery {
    mdns: Option<Mdns>,
    registration: Option<Registration>,
    discovery: Option<Discovery>,
    events: Option<mpsc::Receiver<Event>>,
    federation: Option<FederationId>,
    /// Candidates seen before the mesh started (the find window), replayed to the joiner.
    early: Vec<Candidate>,
}

impl GatewayDiscovery {
    /// Starts browsing mDNS and polling the tailnet, as the settings say.
    pub fn start(
        settings: &DiscoverySettings,
        token: Option<&str>,
        own_key: &PublicKey,
        port: u16,
    ) -> Result<GatewayDiscovery> {
        let federation = token.map(FederationId::from_token);
        let mdns = if settings.mdns {
            match Mdns::new(&Interfaces::All) {
                Ok(m) => Some(m),
                Err(e) => {
                    warn!("mDNS is off: {e}");
                    None
                }
            }
        } else {
            None
        };
        let (discovery, events) = if mdns.is_some() || settings.tailnet {
            let (d, rx) = Discovery::start(DiscoveryConfig {
                statics: Vec::new(),
                mdns: mdns.clone(),
                tailnet: settings.tailnet.then(|| settings.tailnet_config(port)),
                federation: federation.clone(),
                own_key: Some(own_key.to_base64url()),
            })?;
            (Some(d), Some(rx))
        } else {
            (None, None)
        };
        Ok(GatewayDiscovery {
            mdns,
            registration: None,
            discovery,
            events,
            federation,
            early: Vec::new(),
        })
    }

    /// Waits up to `window` for a candidate of our federation; true when one showed.
    pub async fn find(&mut self, window: Duration) -> bool {
        let Some(rx) = self.events.as_mut() else {
            return false;
        };
        let deadline = tokio::time::Instant::now() + window;
        loop {
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some(Event::Found(c))) => {
                    info!(source = %c.source, name = ?c.name, addr = %c.url, "found a gateway of this federation");
                    self.early.push(*c);
                    return true;
                }
                Ok(Some(Event::Lost { .. })) => continue,
                Ok(None) | Err(_) => return false,
            }
        }
    }

    /// Advertises this gateway on the LAN: only the addresses it is bound to, never loopback
    /// or tailnet ones.
    pub fn advertise(&mut self, ad: AdvertiseArgs<'_>) {
        let Some(m) = &self.mdns else { return };
        let addrs = mdns::advertised_addrs(ad.bound.ip(), &mdns::interface_addrs());
        if addrs.is_empty() {
            info!(bound = %ad.bound, "mDNS: nothing to advertise (bound to loopback or tailnet only)");
            return;
        }
        let advert = Advertisement {
            name: ad.name.to_string(),
            region: ad.region.unwrap_or_default().to_string(),
            role: "gateway".into(),
            version: crate::VERSION.to_string(),
            device_key: ad.key.to_base64url(),
            federation_id: self.federation.clone(),
            port: ad.bound.port(),
            addrs,
        };
        match m.advertise(&advert) {
            Ok(r) => self.registration = Some(r),
            Err(e) => warn!("mDNS: cannot advertise: {e}"),
        }
    }

    /// Follows the candidate stream for the gateway's life: joins through candidates while
    /// not a member (when `join` is set), and records how each member was found.
    pub fn spawn_follower(&mut self, mesh: Mesh, join: bool) {
        let Some(mut rx) = self.events.take() else {
            return;
        };
        let early = std::mem::take(&mut self.early);
        tokio::spawn(async move {
            let mut pending: Vec<Candidate> = early;
            let mut dropped: HashSet<String> = HashSet::new();
            let mut tick = tokio::time::interval(RETRY);
            loop {
                let joining = join && !mesh.is_member();
                if joining {
                    let now = std::mem::take(&mut pending);
                    for c in now {
                        if mesh.is_member() {
                            note(&mesh, &c);
                            continue;
                        }
                        match try_join(&mesh, &c).await {
                            Outcome::Joined => {}
                            Outcome::Dropped => {
                                dropped.insert(c.id.clone());
                            }
                            Outcome::Retry => pending.push(c),
                        }
                    }
                }
                tokio::select! {
                    ev = rx.recv() => match ev {
                        Some(Event::Found(c)) => {
                            note(&mesh, &c);
                            if join && !mesh.is_member() && !dropped.contains(&c.id) {
                                pending.retain(|p| p.id != c.id);
                                pending.push(*c);
                            }
                        }
                        Some(Event::Lost { id, .. }) => pending.retain(|p| p.id != id),
                        None => return,
                    },
                    _ = tick.tick(), if joining && !pending.is_empty() => {}
                }
            }
        });
    }

    /// Withdraws the advertisement and stops the responder.
    pub fn shutdown(&mut self) {
        self.registration = None;
        self.discovery = None;
        if let Some(m) = self.mdns.take() {
            m.shutdown();
        }
    }
}

/// What a gateway advertises about itself.
pub struct AdvertiseArgs<'a> {
    /// Its name.
    pub name: &'a str,
    /// Its region.
    pub region: Option<&'a str>,
    /// Its device key.
    pub key: &'a PublicKey,
    /// The QUIC address it is bound to.
    pub bound: SocketAddr,
}

enum Outcome {
    Joined,
    Dropped,
    Retry,
}

/// Records the source of a candidate that points at a member: one of its addresses is the
/// member's advertised address and, if it claims a key, the claim is the member's pinned key.
/// (Recording is display only; the member's key is proven on every link regardless.)
fn note(mesh: &Mesh, c: &Candidate) {
    let claimed = c
        .device_key
        .as_deref()
        .and_then(|k| PublicKey::from_base64(k).ok());
    let member = mesh.members().into_iter().find(|m| {
        claimed.is_none_or(|k| k == m.key)
            && m.addr.parse::<SocketAddr>().is_ok_and(|a| {
                c.urls()
                    .any(|u| u.port == a.port() && u.host.parse::<IpAddr>().ok() == Some(a.ip()))
            })
    });
    if let Some(m) = member {
        mesh.note_found(m.key, c.source.as_str());
    }
}

/// One join attempt through `c`.
async fn try_join(mesh: &Mesh, c: &Candidate) -> Outcome {
    let claimed = match c.device_key.as_deref().map(PublicKey::from_base64) {
        None => None,
        Some(Ok(k)) => Some(k),
        Some(Err(e)) => {
            warn!(source = %c.source, candidate = %c.id, "advertised device key is not a key ({e}): candidate dropped");
            return Outcome::Dropped;
        }
    };
    for url in c.urls() {
        let addr = match url.host.parse::<IpAddr>() {
            Ok(ip) => SocketAddr::new(ip, url.port),
            Err(_) => match clawmesh_federation::mesh::resolve(&url.authority()).await {
                Ok(a) => a,
                Err(e) => {
                    warn!(source = %c.source, %url, "cannot resolve: {e}");
                    continue;
                }
            },
        };
        match mesh.join_via(addr, claimed).await {
            Ok(key) => {
                info!(source = %c.source, name = ?c.name, %addr, "joined the federation through a discovered gateway");
                mesh.note_found(key, c.source.as_str());
                return Outcome::Joined;
            }
            Err(e @ MeshError::AdvertisedKeyMismatch { .. }) => {
                warn!(source = %c.source, candidate = %c.id, "{e}");
                return Outcome::Dropped;
            }
            Err(e) => {
                warn!(source = %c.source, name = ?c.name, %addr, "joining through a discovered gateway: {e}")
            }
        }
    }
    Outcome::Retry
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(text: &str) -> FileConfig {
        FileConfig::parse(text, None).unwrap()
    }

    #[test]
    fn defaults_follow_the_bind() {
        let none = file("{}");
        let s = DiscoverySettings::resolve(&Bind::Loopback, false, false, &none).unwrap();
        assert!(!s.any(), "a loopback gateway neither advertises nor looks");
        let s = DiscoverySettings::resolve(&Bind::Lan, false, false, &none).unwrap();
        assert!(s.mdns && !s.tailnet);
        let s = DiscoverySettings::resolve(&Bind::Tailnet, false, false, &none).unwrap();
        assert!(
            !s.mdns && s.tailnet,
            "--bind tailnet polls the tailnet by default, and has nothing to say on a LAN"
        );
        let s = DiscoverySettings::resolve(
            &Bind::Ip("127.0.0.2".parse().unwrap()),
            false,
            false,
            &none,
        )
        .unwrap();
        assert!(!s.mdns);
    }

    #[test]
    fn config_keys_and_flags() {
        let f = file(
            r#"{"gateway": {"discovery": {"mdns": false, "tailnet": true,
                "tailnetTags": ["tag:clawmesh"], "tailnetHosts": ["mac-cn"],
                "tailnetSocket": "/tmp/ts.sock"}}}"#,
        );
        let s = DiscoverySettings::resolve(&Bind::Lan, false, false, &f).unwrap();
        assert!(!s.mdns && s.tailnet);
        assert_eq!(s.tailnet_tags, ["tag:clawmesh"]);
        assert_eq!(s.tailnet_hosts, ["mac-cn"]);
        assert_eq!(s.tailnet_socket, Some(PathBuf::from("/tmp/ts.sock")));
        assert!(f.unknown.is_empty(), "{:?}", f.unknown);
        let s = DiscoverySettings::resolve(&Bind::Lan, true, false, &file("{}")).unwrap();
        assert!(!s.mdns, "--no-mdns wins");
        let s = DiscoverySettings::resolve(&Bind::Loopback, false, true, &file("{}")).unwrap();
        assert!(s.tailnet, "--tailnet");
        assert!(
            DiscoverySettings::resolve(
                &Bind::Lan,
                false,
                false,
                &file(r#"{"gateway":{"discovery":{"mdns":"yes"}}}"#)
            )
            .is_err(),
            "a wrong type names the key"
        );
    }
}
