//! clawmesh-discovery: where peers may be found.
//!
//! Every source of peers (a static URL, an mDNS advertisement on the LAN, a peer in the
//! Tailscale tailnet) yields [`Candidate`]s: an address to dial, where it came from, and what
//! the source claims about it. The federation decides whom to trust; discovery only says where
//! to knock. A claim (a device key in a TXT record, a tailnet tag) is never proof: the caller
//! compares the key the handshake proves with [`Candidate::device_key`] and drops a candidate
//! whose claim the handshake does not prove.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod candidate;
pub mod fedid;
mod http1;
pub mod localapi;
pub mod mdns;
pub mod peer_url;
pub mod stream;
pub mod tailnet;
pub mod tsaddr;

pub use candidate::{static_candidates, Candidate, KeyMismatch, Source};
pub use fedid::FederationId;
pub use peer_url::{PeerUrl, PeerUrlError};
pub use stream::{Discovery, DiscoveryConfig, Event};
