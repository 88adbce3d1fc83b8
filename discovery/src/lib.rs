//! clawmesh-discovery: where peers may be found.
//!
//! Every source of peers (a static URL today; mDNS on a LAN and the Tailscale tailnet next)
//! yields [`Candidate`]s: an address to dial and where it came from. The federation decides
//! whom to trust; discovery only says where to knock.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod peer_url;

pub use peer_url::{PeerUrl, PeerUrlError};

/// Where a candidate came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// Given by the operator (`--join`, `gateway.primaryUrl`, `--gateway`).
    Static,
}

/// A peer worth dialing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    /// Host and port to dial.
    pub url: PeerUrl,
    /// Where we learned it.
    pub source: Source,
}

/// Candidates from operator-given URLs, in the order given.
pub fn static_candidates<'a>(
    urls: impl IntoIterator<Item = &'a str>,
    default_port: u16,
) -> Result<Vec<Candidate>, PeerUrlError> {
    urls.into_iter()
        .map(|u| {
            Ok(Candidate {
                url: PeerUrl::parse(u, default_port)?,
                source: Source::Static,
            })
        })
        .collect()
}
