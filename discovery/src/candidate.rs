//! A candidate peer: where to knock, where we learned it, and what the source claims.

use std::fmt;

use crate::fedid::FederationId;
use crate::peer_url::{PeerUrl, PeerUrlError};

/// Where a candidate came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Source {
    /// Given by the operator (`--join`, `gateway.primaryUrl`, `--gateway`).
    Static,
    /// An `_clawmesh._udp.local.` advertisement on the LAN.
    Mdns,
    /// A peer in tailscaled's status, selected by tag or host name.
    Tailnet,
}

impl Source {
    /// The lower-case name shown by `gateway status --all` and `clawmesh discover`.
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Static => "static",
            Source::Mdns => "mdns",
            Source::Tailnet => "tailnet",
        }
    }

    /// Parses the name [`Source::as_str`] writes.
    pub fn parse(s: &str) -> Option<Source> {
        match s {
            "static" => Some(Source::Static),
            "mdns" => Some(Source::Mdns),
            "tailnet" => Some(Source::Tailnet),
            _ => None,
        }
    }
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A peer worth dialing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    /// Where we learned it.
    pub source: Source,
    /// The preferred address to dial.
    pub url: PeerUrl,
    /// Further addresses of the same peer (an mDNS host with several), in preference order.
    pub alternates: Vec<PeerUrl>,
    /// A stable identity of the advertisement within its source (the mDNS instance name, the
    /// tailnet node key, the URL for a static one), so a later change or loss names the same one.
    pub id: String,
    /// The peer's name as its source gives it (gateway name, tailnet host name).
    pub name: Option<String>,
    /// The peer's MagicDNS name (tailnet only), without the trailing dot.
    pub dns_name: Option<String>,
    /// The federation id the peer advertises (mDNS only).
    pub federation_id: Option<FederationId>,
    /// The device key (base64url) the peer claims to hold: a claim the handshake must prove.
    pub device_key: Option<String>,
    /// The role the peer advertises (`gateway`).
    pub role: Option<String>,
    /// The region the peer advertises.
    pub region: Option<String>,
    /// The clawmesh version the peer advertises.
    pub version: Option<String>,
    /// Tags of a tailnet peer (control-approved, unlike anything in an mDNS record).
    pub tags: Vec<String>,
}

/// The handshake proved a key other than the one the candidate's source advertised.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{origin} candidate {id} at {url} advertised device key {advertised} but the handshake proved {proven}: dropped")]
pub struct KeyMismatch {
    /// Where the candidate came from.
    pub origin: Source,
    /// The candidate's id.
    pub id: String,
    /// The address dialed.
    pub url: PeerUrl,
    /// The advertised key (base64url).
    pub advertised: String,
    /// The proven key (base64url).
    pub proven: String,
}

impl Candidate {
    /// A candidate with only an address and a source; the rest is filled in by the source.
    pub fn new(source: Source, url: PeerUrl) -> Candidate {
        Candidate {
            source,
            id: url.to_string(),
            url,
            alternates: Vec::new(),
            name: None,
            dns_name: None,
            federation_id: None,
            device_key: None,
            role: None,
            region: None,
            version: None,
            tags: Vec::new(),
        }
    }

    /// Every address of the candidate, preferred first.
    pub fn urls(&self) -> impl Iterator<Item = &PeerUrl> {
        std::iter::once(&self.url).chain(self.alternates.iter())
    }

    /// Checks the key the handshake proved (base64url) against the advertised one. A candidate
    /// that advertised no key passes (a static URL or a tailnet peer makes no key claim); the
    /// handshake's own rules (pinned keys, join token) still apply to it.
    pub fn check_proven_key(&self, proven: &str) -> Result<(), KeyMismatch> {
        match &self.device_key {
            Some(advertised) if advertised != proven => Err(KeyMismatch {
                origin: self.source,
                id: self.id.clone(),
                url: self.url.clone(),
                advertised: advertised.clone(),
                proven: proven.to_string(),
            }),
            _ => Ok(()),
        }
    }

    /// Whether the candidate belongs to federation `ours`: an advertised id must equal it; a
    /// candidate without one (static, tailnet) is not excluded here.
    pub fn in_federation(&self, ours: &FederationId) -> bool {
        self.federation_id.as_ref().is_none_or(|f| f == ours)
    }
}

/// Candidates from operator-given URLs, in the order given.
pub fn static_candidates<'a>(
    urls: impl IntoIterator<Item = &'a str>,
    default_port: u16,
) -> Result<Vec<Candidate>, PeerUrlError> {
    urls.into_iter()
        .map(|u| {
            Ok(Candidate::new(
                Source::Static,
                PeerUrl::parse(u, default_port)?,
            ))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_claim_must_match_the_proven_key() {
        let mut c = Candidate::new(Source::Mdns, PeerUrl::parse("10.0.0.1:1", 1).unwrap());
        assert!(c.check_proven_key("anything").is_ok(), "no claim, no check");
        c.device_key = Some("AAAA".into());
        assert!(c.check_proven_key("AAAA").is_ok());
        let e = c.check_proven_key("BBBB").unwrap_err();
        assert!(e.to_string().contains("dropped"), "{e}");
    }

    #[test]
    fn federation_filter_keeps_unlabelled_candidates() {
        let ours = FederationId::from_token("t1");
        let mut c = Candidate::new(Source::Tailnet, PeerUrl::parse("100.64.0.2:1", 1).unwrap());
        assert!(c.in_federation(&ours));
        c.federation_id = Some(FederationId::from_token("t2"));
        assert!(!c.in_federation(&ours));
        c.federation_id = Some(FederationId::from_token("t1"));
        assert!(c.in_federation(&ours));
    }

    #[test]
    fn source_names_round_trip() {
        for s in [Source::Static, Source::Mdns, Source::Tailnet] {
            assert_eq!(Source::parse(s.as_str()), Some(s));
        }
        assert_eq!(Source::parse("bonjour"), None);
    }
}
