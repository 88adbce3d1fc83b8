//! The QUIC endpoint every peer runs: one UDP socket that both accepts and dials.
//!
//! Both directions use TLS 1.3 with the device key as a raw public key ([`crate::raw_key`])
//! and mutual authentication; the ALPN is [`crate::wire::ALPN`]. After the handshake
//! [`peer_key`] gives the key the peer proved it holds. A peer that still speaks `clawmesh/1`
//! gets [`EndpointError::OldPeer`] on either side ([`crate::legacy`]).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use quinn::{ClientConfig, Connection, Endpoint, ServerConfig, TransportConfig, VarInt};

use crate::identity::{DeviceIdentity, PublicKey};
use crate::legacy;
use crate::raw_key::{self, RawKeyError};
use crate::wire::ALPN;

/// Server name used in every dial; identity comes from the key, never from names.
pub const SERVER_NAME: &str = "clawmesh";

/// Errors creating the endpoint or connecting.
#[derive(Debug, thiserror::Error)]
pub enum EndpointError {
    /// The device key could not be loaded for TLS.
    #[error(transparent)]
    Key(#[from] RawKeyError),
    /// TLS configuration failed.
    #[error("TLS configuration: {0}")]
    Tls(String),
    /// Binding the UDP socket failed.
    #[error("cannot bind UDP {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// The dial could not start.
    #[error("cannot dial {addr}: {reason}")]
    Connect {
        /// Target.
        addr: SocketAddr,
        /// Why.
        reason: String,
    },
    /// The peer speaks the previous wire version (X.509 device certificates).
    #[error("peer {addr} {}", legacy::OLD_PEER_ADVICE)]
    OldPeer {
        /// The peer.
        addr: SocketAddr,
    },
    /// An incoming connection failed its handshake.
    #[error("TLS/QUIC handshake with {addr} failed: {reason}")]
    Handshake {
        /// The peer.
        addr: SocketAddr,
        /// Why.
        reason: String,
    },
    /// The dial did not complete in time.
    #[error(
        "no answer from {addr} within {timeout:?} (is a clawmesh peer listening on UDP there?)"
    )]
    Timeout {
        /// Target.
        addr: SocketAddr,
        /// How long we waited.
        timeout: Duration,
    },
}

/// Tuning for the QUIC transport.
#[derive(Debug, Clone)]
pub struct TransportOptions {
    /// Connection closes after this long without any packet from the peer.
    pub idle_timeout: Duration,
    /// Keep-alive so NATs and the idle timer stay open on quiet links.
    pub keep_alive: Duration,
    /// Concurrent requests (bidirectional streams) a peer may have open towards us.
    pub max_bidi_streams: u32,
}

impl Default for TransportOptions {
    fn default() -> Self {
        TransportOptions {
            // Long enough to ride out a few lost keep-alives on a lossy WAN path, short enough
            // that a vanished peer's resources are freed within a minute.
            idle_timeout: Duration::from_secs(30),
            keep_alive: Duration::from_secs(5),
            // Bounds in-flight requests per connection (each is a stream): fan-out and bursts
            // of invokes fit, a misbehaving peer cannot make us hold thousands.
            max_bidi_streams: 256,
        }
    }
}

fn transport(opts: &TransportOptions) -> Result<Arc<TransportConfig>, EndpointError> {
    let mut t = TransportConfig::default();
    t.max_idle_timeout(Some(
        opts.idle_timeout
            .try_into()
            .map_err(|_| EndpointError::Tls("idle timeout out of range".into()))?,
    ));
    t.keep_alive_interval(Some(opts.keep_alive));
    t.max_concurrent_bidi_streams(VarInt::from_u32(opts.max_bidi_streams));
    // One event stream per direction is all the protocol uses.
    t.max_concurrent_uni_streams(VarInt::from_u32(4));
    // Loopback and LAN peers answer fast; don't wait the default 333 ms before the first
    // retransmit of a lost handshake packet.
    t.initial_rtt(Duration::from_millis(100));
    Ok(Arc::new(t))
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Builds the server and client configurations for `identity`.
pub fn configs(
    identity: &DeviceIdentity,
    opts: &TransportOptions,
) -> Result<(ServerConfig, ClientConfig), EndpointError> {
    let tls_err = |e: rustls::Error| EndpointError::Tls(e.to_string());
    let key = raw_key::certified_key(identity)?;
    let mut server = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(tls_err)?
        .with_client_cert_verifier(raw_key::verifier())
        .with_cert_resolver(Arc::new(raw_key::DeviceKeyResolver::new(key.clone())));
    server.alpn_protocols = vec![ALPN.to_vec()];
    let mut client = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(tls_err)?
        .dangerous()
        .with_custom_certificate_verifier(raw_key::verifier())
        .with_client_cert_resolver(Arc::new(
            rustls::client::AlwaysResolvesClientRawPublicKeys::new(key),
        ));
    client.alpn_protocols = vec![ALPN.to_vec()];
    let transport = transport(opts)?;
    let mut server_config = ServerConfig::with_crypto(Arc::new(
        QuicServerConfig::try_from(server).map_err(|e| EndpointError::Tls(e.to_string()))?,
    ));
    server_config.transport_config(transport.clone());
    let mut client_config = ClientConfig::new(Arc::new(
        QuicClientConfig::try_from(client).map_err(|e| EndpointError::Tls(e.to_string()))?,
    ));
    client_config.transport_config(transport);
    Ok((server_config, client_config))
}

/// Binds a QUIC endpoint that accepts connections on `addr` and dials from the same socket.
pub fn bind(
    identity: &DeviceIdentity,
    addr: SocketAddr,
    opts: &TransportOptions,
) -> Result<Endpoint, EndpointError> {
    let (server, client) = configs(identity, opts)?;
    let mut ep =
        Endpoint::server(server, addr).map_err(|source| EndpointError::Bind { addr, source })?;
    ep.set_default_client_config(client);
    Ok(ep)
}

/// A QUIC endpoint over an already bound UDP socket (so the caller can pick a port that is
/// free for TCP too).
pub fn from_socket(
    identity: &DeviceIdentity,
    socket: std::net::UdpSocket,
    opts: &TransportOptions,
) -> Result<Endpoint, EndpointError> {
    let addr = socket.local_addr().map_err(|source| EndpointError::Bind {
        addr: SocketAddr::from(([0, 0, 0, 0], 0)),
        source,
    })?;
    let (server, client) = configs(identity, opts)?;
    let runtime = quinn::default_runtime()
        .ok_or_else(|| EndpointError::Tls("no async runtime for QUIC".into()))?;
    let mut ep = Endpoint::new(
        quinn::EndpointConfig::default(),
        Some(server),
        socket,
        runtime,
    )
    .map_err(|source| EndpointError::Bind { addr, source })?;
    ep.set_default_client_config(client);
    Ok(ep)
}

/// Binds a client-only endpoint on an ephemeral loopback or wildcard port.
pub fn client(
    identity: &DeviceIdentity,
    target: SocketAddr,
    opts: &TransportOptions,
) -> Result<Endpoint, EndpointError> {
    let (_, client) = configs(identity, opts)?;
    let local: SocketAddr = if target.is_ipv6() {
        "[::]:0"
            .parse()
            .map_err(|_| EndpointError::Tls("addr".into()))?
    } else {
        "0.0.0.0:0"
            .parse()
            .map_err(|_| EndpointError::Tls("addr".into()))?
    };
    let mut ep = Endpoint::client(local).map_err(|source| EndpointError::Bind {
        addr: local,
        source,
    })?;
    ep.set_default_client_config(client);
    Ok(ep)
}

/// Dials `addr`, waiting at most `timeout` for the handshake.
///
/// When the peer refuses our ALPN, one `clawmesh/1` probe (same timeout) tells an old clawmesh
/// ([`EndpointError::OldPeer`]) from anything else.
pub async fn dial(
    ep: &Endpoint,
    addr: SocketAddr,
    timeout: Duration,
) -> Result<Connection, EndpointError> {
    let connecting = ep
        .connect(addr, SERVER_NAME)
        .map_err(|e| EndpointError::Connect {
            addr,
            reason: e.to_string(),
        })?;
    match tokio::time::timeout(timeout, connecting).await {
        Ok(Ok(conn)) => Ok(conn),
        Ok(Err(e)) => {
            if legacy::is_alpn_refusal(&e) {
                match legacy::probe(ep, addr, SERVER_NAME, timeout).await {
                    Ok(true) => return Err(EndpointError::OldPeer { addr }),
                    Ok(false) => {}
                    Err(probe) => tracing::debug!(%addr, "{probe}"),
                }
            }
            Err(EndpointError::Connect {
                addr,
                reason: e.to_string(),
            })
        }
        Err(_) => Err(EndpointError::Timeout { addr, timeout }),
    }
}

/// Completes an incoming connection's handshake; a `clawmesh/1` dialer gets
/// [`EndpointError::OldPeer`], so the log names the cause.
pub async fn accept(incoming: quinn::Incoming) -> Result<Connection, EndpointError> {
    let addr = incoming.remote_address();
    incoming.await.map_err(|e| {
        if legacy::is_refused_old_peer(&e) {
            EndpointError::OldPeer { addr }
        } else {
            EndpointError::Handshake {
                addr,
                reason: e.to_string(),
            }
        }
    })
}

/// The device key the peer proved during the handshake.
pub fn peer_key(conn: &Connection) -> Option<PublicKey> {
    let identity = conn.peer_identity()?;
    let certs = identity
        .downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>()
        .ok()?;
    let first = certs.first()?;
    raw_key::public_key_of(first.as_ref()).ok()
}
