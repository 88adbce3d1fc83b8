//! What the upstream mode runs with: `--upstream*` flags over `gateway.upstream.*` in
//! `clawmesh.json`. Kept apart from the running parts so the gateway's settings can hold it
//! without importing them.

/// Where the OpenClaw gateway is and how clawmesh lends it the federation's nodes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamSettings {
    /// `ws://host:port` or `wss://host:port` of the OpenClaw gateway (`gateway.upstream.url`).
    pub url: String,
    /// The OpenClaw gateway's shared token (`gateway.upstream.token`): the proxies sign it into
    /// their connects, as `openclaw node run` does with `OPENCLAW_GATEWAY_TOKEN`.
    pub token: Option<String>,
    /// SHA-256 of the OpenClaw gateway's leaf certificate (hex, colons allowed), required for
    /// `wss://` (`gateway.upstream.tlsFingerprint`): pinned, as OpenClaw's own
    /// `--tls-fingerprint`, with no CA check.
    pub tls_fingerprint: Option<String>,
    /// Which federation nodes to lend (`gateway.upstream.nodes`): selectors, any of which
    /// matches (`*`, a node name or id, `key=value` on the node's labels, `gateway/NAME` or
    /// `gateway/*`). Default: every node of the federation.
    pub nodes: Vec<String>,
    /// Approve, with the upstream token, the pairing requests of the proxies clawmesh itself
    /// created, and nothing else (`gateway.upstream.autoApprove`; default false: they wait for
    /// the OpenClaw operator like any node host).
    pub auto_approve: bool,
}

impl UpstreamSettings {
    /// Whether `url` is one the upstream mode can dial: `ws://` or `wss://` with a host.
    pub fn check_url(url: &str) -> Result<(), String> {
        let rest = url
            .strip_prefix("ws://")
            .or_else(|| url.strip_prefix("wss://"))
            .ok_or_else(|| format!("upstream URL {url:?} must start with ws:// or wss://"))?;
        if rest.trim_matches('/').is_empty() {
            return Err(format!("upstream URL {url:?} has no host"));
        }
        Ok(())
    }

    /// The pinned fingerprint as 32 bytes, from hex with or without colons (and an optional
    /// `sha256:` prefix, as some tools print it).
    pub fn pin(&self) -> Result<Option<[u8; 32]>, String> {
        let Some(fp) = &self.tls_fingerprint else {
            return Ok(None);
        };
        let t = fp.trim();
        let t = t
            .strip_prefix("sha256:")
            .or_else(|| t.strip_prefix("SHA256:"))
            .unwrap_or(t);
        let hex_only: String = t.chars().filter(|c| *c != ':').collect();
        let bytes = hex::decode(&hex_only)
            .map_err(|_| format!("upstream TLS fingerprint {fp:?} is not hex"))?;
        <[u8; 32]>::try_from(bytes.as_slice())
            .map(Some)
            .map_err(|_| format!("upstream TLS fingerprint {fp:?} is not a SHA-256 (32 bytes)"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(fp: &str) -> UpstreamSettings {
        UpstreamSettings {
            url: "wss://127.0.0.1:1".into(),
            token: None,
            tls_fingerprint: Some(fp.into()),
            nodes: vec![],
            auto_approve: false,
        }
    }

    #[test]
    fn fingerprints_in_every_usual_form() {
        let hex = "ab".repeat(32);
        let colon = vec!["AB"; 32].join(":");
        assert_eq!(s(&hex).pin().unwrap(), Some([0xab; 32]));
        assert_eq!(s(&colon).pin().unwrap(), Some([0xab; 32]));
        assert_eq!(s(&format!("sha256:{hex}")).pin().unwrap(), Some([0xab; 32]));
        assert!(s("abcd").pin().is_err());
        assert!(s("zz").pin().is_err());
    }

    #[test]
    fn urls() {
        assert!(UpstreamSettings::check_url("ws://127.0.0.1:18789").is_ok());
        assert!(UpstreamSettings::check_url("wss://gw.example:443/").is_ok());
        assert!(UpstreamSettings::check_url("http://x").is_err());
        assert!(UpstreamSettings::check_url("ws://").is_err());
    }
}
