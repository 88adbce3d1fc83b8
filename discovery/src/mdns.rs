//! mDNS on the LAN (the `mdns-sd` crate): a gateway advertises `_clawmesh._udp.local.` with
//! TXT records saying who it claims to be; a browser turns advertisements into
//! [`Candidate`]s. Nothing in an advertisement is trusted: the key claim is checked against
//! the handshake, and the federation id only spares dialing other federations.

use std::collections::HashMap;
use std::net::IpAddr;

use mdns_sd::{IfKind, ServiceDaemon, ServiceEvent, ServiceInfo};
use sha2::{Digest, Sha256};

use crate::candidate::{Candidate, Source};
use crate::fedid::FederationId;
use crate::peer_url::PeerUrl;
use crate::tsaddr;

/// The DNS-SD service type every clawmesh gateway advertises.
pub const SERVICE_TYPE: &str = "_clawmesh._udp.local.";

/// TXT key: the gateway's name.
pub const TXT_NAME: &str = "name";
/// TXT key: the gateway's region.
pub const TXT_REGION: &str = "region";
/// TXT key: the role (`gateway`).
pub const TXT_ROLE: &str = "role";
/// TXT key: the clawmesh version.
pub const TXT_VERSION: &str = "version";
/// TXT key: the device key (base64url ed25519 public key), a claim the handshake must prove.
pub const TXT_KEY: &str = "key";
/// TXT key: the [`FederationId`].
pub const TXT_FED: &str = "fed";

/// Errors of the mDNS layer.
#[derive(Debug, thiserror::Error)]
pub enum MdnsError {
    /// The mDNS daemon could not start or refused a request.
    #[error("mDNS: {0}")]
    Daemon(String),
    /// Nothing to advertise: no address that may go on a LAN.
    #[error("mDNS: no address to advertise (bound to loopback or tailnet only)")]
    NoAddress,
}

impl From<mdns_sd::Error> for MdnsError {
    fn from(e: mdns_sd::Error) -> Self {
        MdnsError::Daemon(e.to_string())
    }
}

/// Which network interfaces mDNS uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Interfaces {
    /// Every interface (the default on a real machine).
    All,
    /// Only these interfaces, by name (tests use `lo`, or a veth inside their namespace).
    Only(Vec<String>),
}

/// What a gateway says about itself on the LAN.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Advertisement {
    /// Gateway name.
    pub name: String,
    /// Region (may be empty).
    pub region: String,
    /// Role, `gateway`.
    pub role: String,
    /// clawmesh version.
    pub version: String,
    /// Device key, base64url.
    pub device_key: String,
    /// Federation id derived from the join token; `None` for a gateway without a token
    /// (it admits no joiners, so it says no federation).
    pub federation_id: Option<FederationId>,
    /// The QUIC port.
    pub port: u16,
    /// The addresses to put in A/AAAA records: only those the gateway is bound to and that
    /// may go on a LAN (see [`advertised_addrs`]).
    pub addrs: Vec<IpAddr>,
}

impl Advertisement {
    /// The DNS-SD instance name: the gateway name plus a short key digest, so two gateways
    /// with one name (or one gateway restarted with a new key) never collide.
    pub fn instance_name(&self) -> String {
        format!("{}-{}", self.name, &key_digest(&self.device_key)[..8])
    }

    /// The host name for the A/AAAA records, unique per device key.
    pub fn host_name(&self) -> String {
        format!("clawmesh-{}.local.", &key_digest(&self.device_key)[..12])
    }

    /// The TXT records, in a fixed order.
    pub fn txt(&self) -> Vec<(&'static str, String)> {
        let mut txt = vec![
            (TXT_NAME, self.name.clone()),
            (TXT_REGION, self.region.clone()),
            (TXT_ROLE, self.role.clone()),
            (TXT_VERSION, self.version.clone()),
            (TXT_KEY, self.device_key.clone()),
        ];
        if let Some(f) = &self.federation_id {
            txt.push((TXT_FED, f.to_string()));
        }
        txt
    }
}

fn key_digest(key: &str) -> String {
    hex::encode(Sha256::digest(key.as_bytes()))
}

/// The addresses a gateway bound to `bound` may advertise, given the machine's interface
/// addresses: a specific address is advertised only if it is neither loopback nor a tailnet
/// address; an unspecified bind (`0.0.0.0`, `::`) advertises every interface address of that
/// family except loopback, link-local IPv6 (needs a scope) and tailnet addresses.
pub fn advertised_addrs(bound: IpAddr, interfaces: &[IpAddr]) -> Vec<IpAddr> {
    let lan_ok = |ip: &IpAddr| {
        !ip.is_loopback()
            && !ip.is_unspecified()
            && !tsaddr::is_tailnet(ip)
            && !matches!(ip, IpAddr::V6(v6) if v6.is_unicast_link_local())
    };
    if !bound.is_unspecified() {
        return if lan_ok(&bound) {
            vec![bound]
        } else {
            Vec::new()
        };
    }
    let mut out: Vec<IpAddr> = interfaces
        .iter()
        .filter(|ip| bound.is_ipv6() || ip.is_ipv4())
        .filter(|ip| lan_ok(ip))
        .copied()
        .collect();
    out.sort();
    out.dedup();
    out
}

/// This machine's interface addresses (IPv4 and IPv6), for [`advertised_addrs`].
pub fn interface_addrs() -> Vec<IpAddr> {
    let Ok(addrs) = nix::ifaddrs::getifaddrs() else {
        return Vec::new();
    };
    addrs
        .filter_map(|a| a.address)
        .filter_map(|s| {
            s.as_sockaddr_in()
                .map(|v4| IpAddr::V4(v4.ip()))
                .or_else(|| s.as_sockaddr_in6().map(|v6| IpAddr::V6(v6.ip())))
        })
        .collect()
}

/// One mDNS responder and querier (a thread owned by `mdns-sd`). Clones share it; call
/// [`Mdns::shutdown`] once when the process is done with it.
#[derive(Clone)]
pub struct Mdns {
    daemon: ServiceDaemon,
}

impl std::fmt::Debug for Mdns {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Mdns")
    }
}

impl Mdns {
    /// Starts the daemon on `interfaces`.
    pub fn new(interfaces: &Interfaces) -> Result<Mdns, MdnsError> {
        let daemon = ServiceDaemon::new()?;
        if let Interfaces::Only(names) = interfaces {
            daemon.disable_interface(IfKind::All)?;
            let kinds: Vec<IfKind> = names.iter().map(|n| IfKind::Name(n.clone())).collect();
            daemon.enable_interface(kinds)?;
        }
        Ok(Mdns { daemon })
    }

    /// Publishes `ad` until the returned [`Registration`] is dropped or withdrawn.
    pub fn advertise(&self, ad: &Advertisement) -> Result<Registration, MdnsError> {
        if ad.addrs.is_empty() {
            return Err(MdnsError::NoAddress);
        }
        let addrs = ad
            .addrs
            .iter()
            .map(|a| a.to_string())
            .collect::<Vec<_>>()
            .join(",");
        let txt = ad.txt();
        let mut info = ServiceInfo::new(
            SERVICE_TYPE,
            &ad.instance_name(),
            &ad.host_name(),
            addrs,
            ad.port,
            &txt[..],
        )?;
        // The instance and host names embed a digest of the device key, so no other
        // responder can own them unless it copies our key; probing (three queries 250 ms
        // apart) would only delay the first announcement by ~750 ms.
        info.set_requires_probe(false);
        let fullname = info.get_fullname().to_string();
        self.daemon.register(info)?;
        tracing::info!(instance = %fullname, addrs = ?ad.addrs, "mDNS: advertising");
        Ok(Registration {
            daemon: self.daemon.clone(),
            fullname,
        })
    }

    /// Starts browsing for `_clawmesh._udp.local.`; candidates arrive on the returned browser.
    pub fn browse(&self) -> Result<Browser, MdnsError> {
        let rx = self.daemon.browse(SERVICE_TYPE)?;
        Ok(Browser {
            rx,
            seen: HashMap::new(),
        })
    }

    /// Stops the daemon thread (sends goodbyes for registered services first).
    pub fn shutdown(&self) {
        if let Err(e) = self.daemon.shutdown() {
            tracing::debug!(error = %e, "mDNS: shutdown");
        }
    }
}

/// A published advertisement; dropping it withdraws it (a goodbye packet).
pub struct Registration {
    daemon: ServiceDaemon,
    fullname: String,
}

impl std::fmt::Debug for Registration {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Registration({})", self.fullname)
    }
}

impl Registration {
    /// The DNS-SD full name (`osaka-1a2b3c4d._clawmesh._udp.local.`).
    pub fn fullname(&self) -> &str {
        &self.fullname
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        // The daemon may already be shut down; a failed goodbye costs only a stale cache
        // entry on peers until its TTL.
        let _ = self.daemon.unregister(&self.fullname);
    }
}

/// What the browser saw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BrowseEvent {
    /// A gateway advertisement, new or changed.
    Found(Box<Candidate>),
    /// An advertisement was withdrawn or expired; `id` is the candidate id it had.
    Lost(String),
}

/// Turns `mdns-sd` service events into candidates, reporting each advertisement once until
/// it changes.
pub struct Browser {
    rx: mdns_sd::Receiver<ServiceEvent>,
    seen: HashMap<String, Candidate>,
}

impl Browser {
    /// The next change, or `None` when the daemon has stopped.
    pub async fn next(&mut self) -> Option<BrowseEvent> {
        loop {
            let ev = self.rx.recv_async().await.ok()?;
            match ev {
                ServiceEvent::ServiceResolved(r) => {
                    let addrs: Vec<IpAddr> = r.addresses.iter().map(|a| a.to_ip_addr()).collect();
                    let txt: HashMap<String, String> = r
                        .txt_properties
                        .iter()
                        .map(|p| (p.key().to_string(), p.val_str().to_string()))
                        .collect();
                    let Some(c) = candidate_from_parts(&r.fullname, r.port, &addrs, &txt) else {
                        tracing::debug!(instance = %r.fullname, "mDNS: advertisement without a usable address or key, ignored");
                        continue;
                    };
                    if self.seen.get(&c.id) != Some(&c) {
                        self.seen.insert(c.id.clone(), c.clone());
                        return Some(BrowseEvent::Found(Box::new(c)));
                    }
                }
                ServiceEvent::ServiceRemoved(_, fullname)
                    if self.seen.remove(&fullname).is_some() =>
                {
                    return Some(BrowseEvent::Lost(fullname));
                }
                _ => {}
            }
        }
    }
}

/// A candidate from a resolved advertisement: `None` without a dialable address or a key
/// claim. IPv4 addresses come first; link-local IPv6 (which needs a scope) and unspecified
/// addresses are skipped.
pub fn candidate_from_parts(
    fullname: &str,
    port: u16,
    addrs: &[IpAddr],
    txt: &HashMap<String, String>,
) -> Option<Candidate> {
    let mut usable: Vec<IpAddr> = addrs
        .iter()
        .filter(|ip| !ip.is_unspecified())
        .filter(|ip| !matches!(ip, IpAddr::V6(v6) if v6.is_unicast_link_local()))
        .copied()
        .collect();
    usable.sort_by_key(|ip| (ip.is_ipv6(), *ip));
    usable.dedup();
    if port == 0 {
        return None;
    }
    let mut urls = usable.iter().map(|ip| PeerUrl {
        host: ip.to_string(),
        port,
    });
    let url = urls.next()?;
    let get = |k: &str| txt.get(k).filter(|v| !v.is_empty()).cloned();
    let device_key = get(TXT_KEY)?;
    let mut c = Candidate::new(Source::Mdns, url);
    c.alternates = urls.collect();
    c.id = fullname.to_string();
    c.name = get(TXT_NAME);
    c.region = get(TXT_REGION);
    c.role = get(TXT_ROLE);
    c.version = get(TXT_VERSION);
    c.device_key = Some(device_key);
    c.federation_id = get(TXT_FED).and_then(|f| FederationId::parse(&f).ok());
    Some(c)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ips(v: &[&str]) -> Vec<IpAddr> {
        v.iter().map(|s| s.parse().unwrap()).collect()
    }

    #[test]
    fn only_lan_addresses_are_advertised() {
        let ifs = ips(&[
            "127.0.0.1",
            "10.1.0.2",
            "100.64.0.1",
            "192.168.1.5",
            "::1",
            "fe80::1",
            "fd7a:115c:a1e0::1",
            "2001:db8::5",
        ]);
        assert_eq!(
            advertised_addrs("0.0.0.0".parse().unwrap(), &ifs),
            ips(&["10.1.0.2", "192.168.1.5"])
        );
        assert_eq!(
            advertised_addrs("::".parse().unwrap(), &ifs),
            ips(&["10.1.0.2", "192.168.1.5", "2001:db8::5"])
        );
        assert_eq!(
            advertised_addrs("10.1.0.2".parse().unwrap(), &ifs),
            ips(&["10.1.0.2"])
        );
        assert!(advertised_addrs("127.0.0.1".parse().unwrap(), &ifs).is_empty());
        assert!(advertised_addrs("100.64.0.1".parse().unwrap(), &ifs).is_empty());
    }

    #[test]
    fn txt_records_round_trip_into_a_candidate() {
        let ad = Advertisement {
            name: "osaka".into(),
            region: "jp".into(),
            role: "gateway".into(),
            version: "0.1.0".into(),
            device_key: "k3y".into(),
            federation_id: Some(FederationId::from_token("T")),
            port: 4000,
            addrs: ips(&["10.1.0.2"]),
        };
        let txt: HashMap<String, String> = ad
            .txt()
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect();
        let c = candidate_from_parts(
            "osaka-x._clawmesh._udp.local.",
            4000,
            &ips(&["fe80::1", "2001:db8::5", "10.1.0.2"]),
            &txt,
        )
        .unwrap();
        assert_eq!(c.url.authority(), "10.1.0.2:4000");
        assert_eq!(c.alternates.len(), 1, "link-local dropped, v6 kept");
        assert_eq!(c.name.as_deref(), Some("osaka"));
        assert_eq!(c.region.as_deref(), Some("jp"));
        assert_eq!(c.device_key.as_deref(), Some("k3y"));
        assert_eq!(c.federation_id, Some(FederationId::from_token("T")));
        assert!(ad.instance_name().starts_with("osaka-"));
        assert!(ad.host_name().ends_with(".local."));

        let mut no_key = txt.clone();
        no_key.remove(TXT_KEY);
        assert!(candidate_from_parts("x", 4000, &ips(&["10.1.0.2"]), &no_key).is_none());
        assert!(candidate_from_parts("x", 4000, &ips(&["fe80::1"]), &txt).is_none());
        assert!(candidate_from_parts("x", 0, &ips(&["10.1.0.2"]), &txt).is_none());
    }
}
