//! Peer URLs as operators write them: `quic://host:port`, `host:port`, `[::1]:18789`, or the
//! `https://primary.example.com:3100` of OpenClaw's remote-gateway config.

use std::fmt;

/// Errors parsing a peer URL.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PeerUrlError {
    /// Scheme not understood.
    #[error("unsupported scheme in {url:?}: use quic://host:port (https:// and clawmesh:// are accepted as aliases)")]
    Scheme {
        /// The URL.
        url: String,
    },
    /// No host.
    #[error("no host in {url:?}")]
    NoHost {
        /// The URL.
        url: String,
    },
    /// Bad port.
    #[error("bad port in {url:?}")]
    Port {
        /// The URL.
        url: String,
    },
}

/// A parsed peer address: host (DNS name or IP literal) and port.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PeerUrl {
    /// Host name or IP (IPv6 without brackets).
    pub host: String,
    /// UDP port.
    pub port: u16,
}

impl PeerUrl {
    /// Parses `url`, using `default_port` when none is given.
    pub fn parse(url: &str, default_port: u16) -> Result<PeerUrl, PeerUrlError> {
        let trimmed = url.trim();
        let rest = match trimmed.split_once("://") {
            Some((scheme, rest)) => match scheme.to_ascii_lowercase().as_str() {
                "quic" | "clawmesh" | "https" | "http" | "wss" | "ws" => rest,
                _ => {
                    return Err(PeerUrlError::Scheme {
                        url: url.to_string(),
                    })
                }
            },
            None => trimmed,
        };
        let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
        if authority.is_empty() {
            return Err(PeerUrlError::NoHost {
                url: url.to_string(),
            });
        }
        let port_err = || PeerUrlError::Port {
            url: url.to_string(),
        };
        let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
            let (h, after) = v6.split_once(']').ok_or_else(|| PeerUrlError::NoHost {
                url: url.to_string(),
            })?;
            let port = match after.strip_prefix(':') {
                Some(p) => p.parse().map_err(|_| port_err())?,
                None if after.is_empty() => default_port,
                None => return Err(port_err()),
            };
            (h.to_string(), port)
        } else if authority.matches(':').count() > 1 {
            // A bare IPv6 literal without brackets and without a port.
            (authority.to_string(), default_port)
        } else {
            match authority.split_once(':') {
                Some((h, p)) => (h.to_string(), p.parse().map_err(|_| port_err())?),
                None => (authority.to_string(), default_port),
            }
        };
        if host.is_empty() {
            return Err(PeerUrlError::NoHost {
                url: url.to_string(),
            });
        }
        if port == 0 {
            return Err(port_err());
        }
        Ok(PeerUrl { host, port })
    }

    /// `host:port`, bracketing IPv6 literals, ready for resolution.
    pub fn authority(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

impl fmt::Display for PeerUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "quic://{}", self.authority())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_forms_operators_write() {
        let p = |s| PeerUrl::parse(s, 18789);
        assert_eq!(
            p("quic://127.0.0.1:4000").unwrap().authority(),
            "127.0.0.1:4000"
        );
        assert_eq!(p("127.0.0.1").unwrap().authority(), "127.0.0.1:18789");
        assert_eq!(
            p("https://primary.example.com:3100").unwrap().authority(),
            "primary.example.com:3100"
        );
        assert_eq!(p("quic://[::1]:5").unwrap().authority(), "[::1]:5");
        assert_eq!(p("[::1]").unwrap().authority(), "[::1]:18789");
        assert!(p("ftp://x").is_err());
        assert!(p("quic://").is_err());
        assert!(p("quic://h:notaport").is_err());
        assert!(p("quic://h:0").is_err());
        assert_eq!(p("quic://h:1/path").unwrap().to_string(), "quic://h:1");
    }
}
