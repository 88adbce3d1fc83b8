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
    /// Concurrent requests (bidirectional streams) a peer may have open towards us: a peer we
    /// dialed at once, one that dialed us once [`grant_streams`] says it is a gateway or an
    /// operator.
    pub max_bidi_streams: u32,
    /// Concurrent requests a peer that dialed us may have open before it is admitted as a
    /// gateway or an operator, and for good if it is a node. quinn keeps a map entry for every
    /// stream a peer may open, from the handshake on: at 256 that is about 20 KB per
    /// connection, most of an idle node's cost on its gateway (docs/BENCHMARKS.md, "Memory per
    /// idle node").
    pub accept_bidi_streams: u32,
    /// Whether connections a peer dials to us discover their path MTU and batch datagrams
    /// with segmentation offload (GSO), as dialed connections always do. Off by default: an
    /// accepted connection then keeps QUIC's minimum 1 200-byte datagrams, one per send, so
    /// quinn's per-connection send buffer stays one 1 200-byte datagram instead of growing to
    /// a discovered MTU times the GSO batch (1.17 KiB instead of 2.35 KiB; an idle node costs
    /// its gateway 35.4 KB instead of 37.1 KB at 10 000 nodes, docs/BENCHMARKS.md, "Memory per
    /// idle node", session 7). The price: bulk data this side sends to a peer that dialed it
    /// (a gateway answering a gateway that dialed it) goes in about 17 % more packets than at
    /// a 1 452-byte MTU; the dialing side's own sends still discover their MTU.
    pub accept_full_mtu: bool,
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
            max_bidi_streams: MAX_BIDI_STREAMS,
            // A node opens its hello, then one `node.logs` call at a time (the gateway's
            // invokes to it are streams the gateway opens, bounded by the node's own limit):
            // 8 leaves room for an overlap or two. A gateway or operator is raised to
            // `max_bidi_streams` right after its hello is admitted, before any request.
            accept_bidi_streams: 8,
            // Nodes dial their gateway and send little (pings, vitals, one `node.logs` batch
            // at a time): the memory of thousands of idle node connections outweighs the
            // packets saved on the few gateway links a peer dialed to us.
            accept_full_mtu: false,
        }
    }
}

/// The default [`TransportOptions::max_bidi_streams`].
pub const MAX_BIDI_STREAMS: u32 = 256;

/// Lets a peer that dialed us and was admitted as a gateway or an operator open up to
/// [`MAX_BIDI_STREAMS`] concurrent requests (it started with
/// [`TransportOptions::accept_bidi_streams`]); quinn sends the new limit at once.
pub fn grant_streams(conn: &Connection) {
    conn.set_max_concurrent_bi_streams(VarInt::from_u32(MAX_BIDI_STREAMS));
}

/// Which side of the handshake a transport configuration is for.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Side {
    /// Connections we dial.
    Dialed,
    /// Connections a peer dials to us.
    Accepted,
}

fn transport(
    opts: &TransportOptions,
    bidi: u32,
    side: Side,
) -> Result<Arc<TransportConfig>, EndpointError> {
    let mut t = TransportConfig::default();
    if side == Side::Accepted && !opts.accept_full_mtu {
        // Most accepted connections are idle nodes (see `TransportOptions::accept_full_mtu`):
        // stay at the 1 200-byte minimum every QUIC path carries (quinn's default
        // `initial_mtu`), never probe for more, and send one datagram at a time, so the
        // connection's send buffer is one minimum datagram. The peer's own MTU discovery is
        // unaffected: what it may send us is bounded by our endpoint's `max_udp_payload_size`,
        // not by this.
        t.mtu_discovery_config(None);
        t.enable_segmentation_offload(false);
    }
    t.max_idle_timeout(Some(
        opts.idle_timeout
            .try_into()
            .map_err(|_| EndpointError::Tls("idle timeout out of range".into()))?,
    ));
    t.keep_alive_interval(Some(opts.keep_alive));
    t.max_concurrent_bidi_streams(VarInt::from_u32(bidi));
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
    // No session tickets: every dial is a full handshake that proves the device key (nothing
    // resumes a session), so tickets would only cost each handshake two more messages, their
    // encryption and a slot in rustls's session cache.
    server.send_tls13_tickets = 0;
    let mut client = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(tls_err)?
        .dangerous()
        .with_custom_certificate_verifier(raw_key::verifier())
        .with_client_cert_resolver(Arc::new(
            rustls::client::AlwaysResolvesClientRawPublicKeys::new(key),
        ));
    client.alpn_protocols = vec![ALPN.to_vec()];
    let mut server_config = ServerConfig::with_crypto(Arc::new(
        QuicServerConfig::try_from(server).map_err(|e| EndpointError::Tls(e.to_string()))?,
    ));
    // Who dialed us is known only after the hello: start every accepted connection at the
    // small limit ([`grant_streams`] raises gateways and operators) and, unless
    // `accept_full_mtu`, at the minimum MTU. quinn gives every connection this endpoint
    // accepts the server config's transport, and every connection it dials the client
    // config's, so the two sides are tuned apart with no per-connection `accept_with`.
    server_config.transport_config(transport(
        opts,
        opts.accept_bidi_streams.min(opts.max_bidi_streams),
        Side::Accepted,
    )?);
    let transport = transport(opts, opts.max_bidi_streams, Side::Dialed)?;
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::future::Future;
    use std::task::{Context, Poll, Waker};

    /// Polls `f` once: its output if it is ready now.
    fn now_or_never<F: Future>(f: F) -> Option<F::Output> {
        let mut f = std::pin::pin!(f);
        match f.as_mut().poll(&mut Context::from_waker(Waker::noop())) {
            Poll::Ready(v) => Some(v),
            Poll::Pending => None,
        }
    }

    /// Opens bidirectional streams until one would wait for the peer's stream limit.
    async fn open_until_blocked(conn: &Connection, most: u32) -> (u32, Vec<quinn::SendStream>) {
        let mut held = Vec::new();
        for n in 0..most {
            match now_or_never(conn.open_bi()) {
                Some(Ok((send, _recv))) => held.push(send),
                Some(Err(e)) => panic!("open_bi failed: {e}"),
                None => return (n, held),
            }
        }
        (most, held)
    }

    #[tokio::test]
    async fn an_accepted_peer_opens_few_requests_until_granted_the_full_limit() {
        let opts = TransportOptions::default();
        let (a, b) = (DeviceIdentity::ephemeral(), DeviceIdentity::ephemeral());
        let server = bind(&a, "127.0.0.1:0".parse().unwrap(), &opts).unwrap();
        let client = bind(&b, "127.0.0.1:0".parse().unwrap(), &opts).unwrap();
        let addr = server.local_addr().unwrap();
        let accepting = tokio::spawn(async move {
            let inc = server.accept().await.unwrap();
            (accept(inc).await.unwrap(), server)
        });
        let dialed = dial(&client, addr, Duration::from_secs(10)).await.unwrap();
        let (accepted, _server) = accepting.await.unwrap();

        // The dialer (a node, until it says otherwise) may open the small number only.
        let (opened, held) = open_until_blocked(&dialed, 300).await;
        assert_eq!(opened, opts.accept_bidi_streams);
        // The acceptor may open the full number towards the dialer at once.
        let (back, _back_held) = open_until_blocked(&accepted, 300).await;
        assert_eq!(back, opts.max_bidi_streams);

        // Admitted as a gateway or operator: the waiting open completes once the new limit
        // arrives, and the dialer can hold the full number.
        let waiting = tokio::spawn({
            let dialed = dialed.clone();
            async move { dialed.open_bi().await.map(|(send, _)| send) }
        });
        grant_streams(&accepted);
        let extra = tokio::time::timeout(Duration::from_secs(10), waiting)
            .await
            .expect("the stream limit was never raised")
            .unwrap()
            .unwrap();
        let (more, _more_held) = open_until_blocked(&dialed, 300).await;
        assert_eq!(
            opened + 1 + more,
            MAX_BIDI_STREAMS,
            "held {} + 1 + {more}",
            held.len()
        );
        drop((held, extra));
    }

    /// Dials `server` from `client`; returns (the dialed connection, the accepted one).
    async fn pair(server: &Endpoint, client: &Endpoint) -> (Connection, Connection) {
        let addr = server.local_addr().unwrap();
        let accepting = {
            let server = server.clone();
            tokio::spawn(async move { accept(server.accept().await.unwrap()).await.unwrap() })
        };
        let dialed = dial(client, addr, Duration::from_secs(10)).await.unwrap();
        (dialed, accepting.await.unwrap())
    }

    /// Waits until `conn`'s path MTU rises above QUIC's minimum; the MTU it reached.
    async fn discovered_mtu(conn: &Connection) -> Option<u16> {
        // Generous for a loaded CI machine: on loopback the probes take a few round trips.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while tokio::time::Instant::now() < deadline {
            let mtu = conn.stats().path.current_mtu;
            if mtu > MIN_MTU {
                return Some(mtu);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        None
    }

    /// QUIC's minimum datagram size (RFC 9000 section 14), quinn's default initial MTU.
    const MIN_MTU: u16 = 1200;

    #[tokio::test]
    async fn accepted_connections_keep_the_minimum_mtu_while_dialed_ones_discover_theirs() {
        let opts = TransportOptions::default();
        assert!(!opts.accept_full_mtu);
        let (a, b) = (DeviceIdentity::ephemeral(), DeviceIdentity::ephemeral());
        let server = bind(&a, "127.0.0.1:0".parse().unwrap(), &opts).unwrap();
        let client = bind(&b, "127.0.0.1:0".parse().unwrap(), &opts).unwrap();
        let (dialed, accepted) = pair(&server, &client).await;

        // The dialing side (a gateway dialing a gateway, a node dialing its gateway) probes
        // its way up from the minimum: loopback carries quinn's upper bound, 1 452 bytes.
        let mtu = discovered_mtu(&dialed)
            .await
            .expect("the dialed connection never discovered a larger MTU");
        assert!(mtu > MIN_MTU, "{mtu}");
        // Some round trips later, the accepting side still sends minimum-size datagrams.
        let (mut send, mut recv) = accepted.open_bi().await.unwrap();
        send.write_all(&[7u8; 16 * 1024]).await.unwrap();
        send.finish().unwrap();
        let (mut back_send, mut back_recv) = dialed.accept_bi().await.unwrap();
        let got = back_recv.read_to_end(64 * 1024).await.unwrap();
        assert_eq!(got.len(), 16 * 1024);
        back_send.write_all(b"ok").await.unwrap();
        back_send.finish().unwrap();
        assert_eq!(recv.read_to_end(16).await.unwrap(), b"ok");
        assert_eq!(accepted.stats().path.current_mtu, MIN_MTU);
        assert_eq!(dialed.stats().path.current_mtu, mtu);

        // With `accept_full_mtu` an accepted connection discovers its MTU too.
        let full = TransportOptions {
            accept_full_mtu: true,
            ..TransportOptions::default()
        };
        let server = bind(&a, "127.0.0.1:0".parse().unwrap(), &full).unwrap();
        let (_dialed, accepted) = pair(&server, &client).await;
        let mtu = discovered_mtu(&accepted)
            .await
            .expect("accept_full_mtu: the accepted connection never discovered a larger MTU");
        assert!(mtu > MIN_MTU, "{mtu}");
    }
}
