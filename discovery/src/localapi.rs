//! A client for tailscaled's LocalAPI over its unix socket: `status` (who is in the tailnet)
//! and `whois` (who is behind a tailnet address). Only the fields clawmesh uses are read;
//! unknown fields are ignored, so newer and older daemons both parse.
//!
//! Facts followed (tailscale `client/local`, `ipn/localapi`): plain HTTP/1.1 on the socket;
//! the Host header must be exactly `local-tailscaled.sock`; no `Referer` or `Origin`; errors
//! are a text line; whois answers 404 for an address it does not know.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::http1::{self, HttpError};

/// The Host header tailscaled's LocalAPI accepts (`apitype.LocalAPIHost`).
pub const LOCALAPI_HOST: &str = "local-tailscaled.sock";

/// tailscaled's default socket on Linux (`paths.DefaultTailscaledSocket`); `/var/run` links
/// to `/run` on most distributions, so this is also `/run/tailscale/tailscaled.sock`.
pub const DEFAULT_SOCKET: &str = "/var/run/tailscale/tailscaled.sock";

/// A LocalAPI call gets this long for the whole exchange: the daemon is local and answers
/// from memory, so anything slower is a wedged daemon, and a poller must not hang on it.
const CALL_DEADLINE: Duration = Duration::from_secs(5);

/// The largest status we read: about 2 KB per peer, so 16 MiB covers tailnets of several
/// thousand nodes while a runaway answer cannot exhaust memory.
const MAX_RESPONSE: usize = 16 * 1024 * 1024;

/// Why a LocalAPI call failed.
#[derive(Debug, thiserror::Error)]
pub enum LocalApiError {
    /// Nothing listens on the socket (absent file, stale socket, no permission).
    #[error("tailscaled is not reachable at {path}: {source} (is tailscaled running? `sudo systemctl start tailscaled`)")]
    NotRunning {
        /// The socket path tried.
        path: PathBuf,
        /// The connect error.
        source: std::io::Error,
    },
    /// tailscaled refused the request (403): a bad Host header, a Referer or Origin, or no
    /// read permission.
    #[error("tailscaled refused access: {0}")]
    AccessDenied(String),
    /// whois: no node has that address (also the answer when logged out).
    #[error("peer not found")]
    PeerNotFound,
    /// Any other HTTP error status, with tailscaled's message.
    #[error("tailscaled answered {status}: {message}")]
    Status {
        /// HTTP status code.
        status: u16,
        /// The body's text, trimmed.
        message: String,
    },
    /// The exchange failed below HTTP or the answer was not HTTP.
    #[error("LocalAPI exchange failed: {0}")]
    Transport(String),
    /// The answer is not the JSON we expect.
    #[error("LocalAPI answer is not the expected JSON: {0}")]
    Json(String),
}

/// What tailscaled's `status` says (`ipnstate.Status`), the fields clawmesh reads.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct Status {
    /// `NoState`, `NeedsLogin`, `NeedsMachineAuth`, `Stopped`, `Starting`, `Running`, ...
    pub backend_state: String,
    /// Where to log in when `NeedsLogin` (may be empty).
    #[serde(rename = "AuthURL", default)]
    pub auth_url: String,
    /// This machine's tailnet addresses (null without a netmap).
    #[serde(rename = "TailscaleIPs", default)]
    pub tailscale_ips: Option<Vec<IpAddr>>,
    /// This machine.
    #[serde(rename = "Self", default)]
    pub self_: Option<PeerStatus>,
    /// The MagicDNS suffix (`tail1234.ts.net`), empty without a netmap.
    #[serde(rename = "MagicDNSSuffix", default)]
    pub magic_dns_suffix: String,
    /// Peers keyed by `nodekey:...`; null when logged out or alone.
    #[serde(default)]
    pub peer: Option<BTreeMap<String, PeerStatus>>,
}

/// One node in the status (`ipnstate.PeerStatus`).
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct PeerStatus {
    /// Stable node id (`n...CNTRL`).
    #[serde(rename = "ID", default)]
    pub id: String,
    /// `nodekey:<hex>`.
    #[serde(default)]
    pub public_key: String,
    /// The OS host name the node reports (self-reported, may differ from the DNS label).
    #[serde(default)]
    pub host_name: String,
    /// The MagicDNS name with a trailing dot (`gw-beijing.tail1234.ts.net.`).
    #[serde(rename = "DNSName", default)]
    pub dns_name: String,
    /// The node's tailnet addresses (bare IPs).
    #[serde(rename = "TailscaleIPs", default)]
    pub tailscale_ips: Option<Vec<IpAddr>>,
    /// Control-approved ACL tags; absent for a user-owned node.
    #[serde(default)]
    pub tags: Option<Vec<String>>,
    /// Whether control sees the node as connected.
    #[serde(default)]
    pub online: bool,
}

impl PeerStatus {
    /// The MagicDNS name without its trailing dot, if any.
    pub fn magic_dns_name(&self) -> Option<&str> {
        let n = self.dns_name.trim_end_matches('.');
        (!n.is_empty()).then_some(n)
    }

    /// The first label of the MagicDNS name (`gw-beijing`), which can differ from
    /// [`PeerStatus::host_name`] (`Alices-MacBook-Pro` vs `laptop-alice`).
    pub fn dns_label(&self) -> Option<&str> {
        self.magic_dns_name()
            .and_then(|n| n.split('.').next())
            .filter(|l| !l.is_empty())
    }

    /// The address to dial: the first IPv4 tailnet address, else the first one.
    pub fn dial_ip(&self) -> Option<IpAddr> {
        let ips = self.tailscale_ips.as_deref().unwrap_or_default();
        ips.iter()
            .find(|ip| ip.is_ipv4())
            .or_else(|| ips.first())
            .copied()
    }
}

/// What `whois` says about an address (`apitype.WhoIsResponse`).
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct WhoIs {
    /// The node behind the address.
    pub node: WhoIsNode,
    /// Its owner; `tagged-devices` for a tagged node (decide taggedness from `Node.Tags`).
    pub user_profile: UserProfile,
    /// Capabilities the packet filter grants from that node to this one; null when none.
    #[serde(default)]
    pub cap_map: Option<BTreeMap<String, Option<Vec<serde_json::Value>>>>,
}

/// The node part of a whois answer (`tailcfg.Node`), the fields clawmesh reads.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct WhoIsNode {
    /// Numeric node id (may exceed 2^53: parsed as an integer, never a float).
    #[serde(rename = "ID")]
    pub id: i64,
    /// Stable node id.
    #[serde(rename = "StableID", default)]
    pub stable_id: String,
    /// MagicDNS name with a trailing dot.
    #[serde(default)]
    pub name: String,
    /// `nodekey:<hex>`.
    #[serde(default)]
    pub key: String,
    /// Tailnet prefixes (`100.64.0.20/32`).
    #[serde(default)]
    pub addresses: Vec<String>,
    /// Control-approved tags; absent for a user-owned node.
    #[serde(default)]
    pub tags: Option<Vec<String>>,
    /// The short name control computed (`node-sg-1`).
    #[serde(default)]
    pub computed_name: String,
}

impl WhoIsNode {
    /// Whether the node is tagged (non-empty `Tags`), as `tailcfg.Node.IsTagged` decides.
    pub fn is_tagged(&self) -> bool {
        self.tags.as_ref().is_some_and(|t| !t.is_empty())
    }
}

/// The owner of a node (`tailcfg.UserProfile`).
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct UserProfile {
    /// User id (may exceed 2^53). Never key on it for tagged nodes.
    #[serde(rename = "ID")]
    pub id: i64,
    /// `alice@example.com`, or `tagged-devices`.
    #[serde(default)]
    pub login_name: String,
    /// Display name.
    #[serde(default)]
    pub display_name: String,
}

/// A LocalAPI client bound to one socket path. Cheap to clone; each call opens a connection.
#[derive(Debug, Clone)]
pub struct LocalApi {
    socket: PathBuf,
}

impl LocalApi {
    /// A client for the socket at `socket`.
    pub fn new(socket: impl Into<PathBuf>) -> LocalApi {
        LocalApi {
            socket: socket.into(),
        }
    }

    /// A client for tailscaled's default socket on this system, or `$TS_SOCKET` when set
    /// (the official container's variable).
    pub fn default_socket() -> LocalApi {
        match std::env::var_os("TS_SOCKET") {
            Some(p) if !p.is_empty() => LocalApi::new(p),
            _ => LocalApi::new(DEFAULT_SOCKET),
        }
    }

    /// The socket path this client uses.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// `GET /localapi/v0/status`: the backend state, this node and its peers.
    pub async fn status(&self) -> Result<Status, LocalApiError> {
        let body = self.get("/localapi/v0/status").await?;
        serde_json::from_slice(&body).map_err(|e| LocalApiError::Json(e.to_string()))
    }

    /// `GET /localapi/v0/whois?addr=ip:port`: who is behind `addr`. Pass the full remote
    /// address of an accepted connection (tailscaled's proxy mapper needs the port in
    /// userspace-networking mode). An IPv4-mapped IPv6 address is unmapped first, as daemons
    /// before v1.102 do not.
    pub async fn whois(&self, addr: SocketAddr) -> Result<WhoIs, LocalApiError> {
        let addr = match addr.ip() {
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => SocketAddr::new(IpAddr::V4(v4), addr.port()),
                None => addr,
            },
            IpAddr::V4(_) => addr,
        };
        let query = format!(
            "/localapi/v0/whois?proto=&addr={}",
            escape_query(&addr.to_string())
        );
        let body = self.get(&query).await?;
        serde_json::from_slice(&body).map_err(|e| LocalApiError::Json(e.to_string()))
    }

    async fn get(&self, path: &str) -> Result<Vec<u8>, LocalApiError> {
        let resp = http1::get(
            &self.socket,
            LOCALAPI_HOST,
            path,
            CALL_DEADLINE,
            MAX_RESPONSE,
        )
        .await
        .map_err(|e| match e {
            HttpError::Connect(source) => LocalApiError::NotRunning {
                path: self.socket.clone(),
                source,
            },
            other => LocalApiError::Transport(other.to_string()),
        })?;
        if resp.status == 200 {
            return Ok(resp.body);
        }
        let message = String::from_utf8_lossy(&resp.body).trim().to_string();
        Err(match resp.status {
            403 => LocalApiError::AccessDenied(message),
            404 if path.starts_with("/localapi/v0/whois") => LocalApiError::PeerNotFound,
            status => LocalApiError::Status { status, message },
        })
    }
}

/// Percent-encodes the few characters of an address that a query needs escaped.
fn escape_query(s: &str) -> String {
    s.chars()
        .map(|c| match c {
            '[' => "%5B".to_string(),
            ']' => "%5D".to_string(),
            ':' => "%3A".to_string(),
            c => c.to_string(),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_escaping() {
        assert_eq!(escape_query("100.64.0.20:41234"), "100.64.0.20%3A41234");
        assert_eq!(escape_query("[fd7a::1]:5"), "%5Bfd7a%3A%3A1%5D%3A5");
    }
}
