//! The clawmesh wire protocol: every message that crosses a QUIC connection.
//!
//! Layout of a connection (ALPN `clawmesh/2`; device keys are TLS raw public keys):
//! - the dialer opens the first bidirectional stream and sends a [`Hello`]; the acceptor answers
//!   with a [`HelloReply`]; the stream is then closed;
//! - every request (operator method, forwarded invoke, status query) is its own bidirectional
//!   stream carrying one [`Request`] and one [`Response`], so slow requests never block fast ones;
//! - each side may open one long-lived unidirectional stream of [`Event`]s (membership, shutdown
//!   notices, and later node directory and config deltas);
//! - health pings are QUIC datagrams ([`Datagram`]): a lost ping is a missed ping, never a
//!   retransmission that would blur the round-trip time.
//!
//! Enums only ever grow at the end, so an older peer decodes what it knows; the version in the
//! hello says which messages a peer understands.

use serde::{Deserialize, Serialize};

use crate::identity::PublicKey;

/// ALPN protocol id; a TLS client that does not offer it is refused during the handshake.
///
/// Version 2 presents device keys as TLS raw public keys (RFC 7250) instead of self-signed
/// X.509 certificates; the frames after the handshake are unchanged.
pub const ALPN: &[u8] = b"clawmesh/2";

/// The previous ALPN (X.509 device certificates): recognised only to tell such a peer, and
/// the operator, to upgrade ([`crate::legacy`]).
pub const OLD_ALPN: &[u8] = b"clawmesh/1";

/// Magic bytes at the start of every hello: a non-clawmesh peer that happens to speak our ALPN
/// fails loudly instead of being misparsed.
pub const MAGIC: [u8; 8] = *b"clawmesh";

/// Current wire protocol version.
pub const PROTOCOL_VERSION: u16 = 1;

/// Oldest protocol version this build still speaks.
pub const MIN_PROTOCOL_VERSION: u16 = 1;

/// First frame from the dialer.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Hello {
    /// Always [`MAGIC`].
    pub magic: [u8; 8],
    /// Highest protocol version the dialer speaks.
    pub version: u16,
    /// Lowest protocol version the dialer speaks.
    pub min_version: u16,
    /// Software version string (for `gateway status`).
    pub software: String,
    /// Random per process start: tells a restarted peer from a second link of the same process.
    pub boot_id: u64,
    /// What the dialer is.
    pub role: HelloRole,
}

/// Who is dialing.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum HelloRole {
    /// Another gateway of the federation.
    Gateway(GatewayHello),
    /// An operator client (the CLI, an agent).
    Operator(OperatorHello),
    /// A node host.
    Node(NodeHello),
}

/// A gateway's introduction.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GatewayHello {
    /// Gateway name, unique in the federation.
    pub name: String,
    /// Region label.
    pub region: Option<String>,
    /// Address other gateways should dial to reach it.
    pub advertise: String,
    /// HMAC proving knowledge of the join token, bound to both keys; only for a first join.
    pub join_proof: Option<[u8; 32]>,
    /// Whether the dialer considers itself the primary.
    pub primary: bool,
    /// Random per dial: with the dialer's key, orders two links between the same two
    /// processes so both sides keep the same one.
    pub link_nonce: u64,
}

/// An operator's introduction.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct OperatorHello {
    /// Client name, for logs (`clawmesh-cli`, an agent's name).
    pub client: String,
    /// Operator token, when not connecting with the gateway's own key.
    pub token: Option<String>,
    /// Scopes requested; empty means "what the credential allows".
    pub scopes: Vec<String>,
}

/// A node host's introduction.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NodeHello {
    /// Display name.
    pub name: String,
    /// Shared gateway token, if the node has one.
    pub token: Option<String>,
    /// Commands the node offers.
    pub commands: Vec<String>,
    /// Labels, e.g. `region=fra`.
    pub labels: Vec<(String, String)>,
    /// Platform, e.g. `linux`.
    pub platform: String,
    /// Which of the node's attachments this is: the federation lists the node where its newest
    /// attachment is.
    pub attach: crate::directory::AttachOrder,
}

/// The acceptor's answer to a hello.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum HelloReply {
    /// Accepted.
    Welcome(Welcome),
    /// Refused, with a reason the dialer shows its operator.
    Refused(Refusal),
}

/// Accepted: who the acceptor is and what the dialer needs to know.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Welcome {
    /// Protocol version chosen for this connection.
    pub version: u16,
    /// Software version of the acceptor.
    pub software: String,
    /// Acceptor's boot id.
    pub boot_id: u64,
    /// Acceptor's gateway name.
    pub name: String,
    /// Acceptor's region.
    pub region: Option<String>,
    /// HMAC proving the acceptor knows the join token too (answer to a `join_proof`).
    pub join_proof: Option<[u8; 32]>,
    /// The federation's members as the acceptor knows them.
    pub membership: Option<Membership>,
    /// Scopes granted (operators).
    pub scopes: Vec<String>,
    /// The acceptor's health interval in ms: a node pings its gateway at half of it, so it
    /// notices a dead gateway and moves on within about two intervals.
    pub health_interval_ms: u64,
}

/// Why a hello was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum RefusalCode {
    /// No common protocol version.
    Version,
    /// Wrong or missing join/operator token.
    BadToken,
    /// The name is pinned to another device key.
    NameTaken,
    /// The device key is unknown and no token was offered.
    UnknownPeer,
    /// The device is not paired yet (nodes): a pending request exists.
    PairingRequired,
    /// The device was rejected or revoked.
    Revoked,
    /// The acceptor cannot take this peer now (shutting down, overloaded).
    Unavailable,
    /// The hello was malformed.
    BadHello,
}

/// A refusal.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Refusal {
    /// Machine-readable reason.
    pub code: RefusalCode,
    /// What the operator should read.
    pub message: String,
    /// Whether retrying later can succeed without a change on the dialer's side.
    pub retryable: bool,
}

/// One gateway of the federation, as the primary recorded it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    /// Its device key (pinned).
    pub key: PublicKey,
    /// Unique name.
    pub name: String,
    /// Region label.
    pub region: Option<String>,
    /// Address to dial.
    pub addr: String,
    /// Whether it is the primary.
    pub primary: bool,
    /// When it first joined (ms since the epoch).
    pub joined_at_ms: u64,
}

/// The member list at one epoch; a higher epoch from the primary replaces a lower one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Membership {
    /// Monotonic version, bumped by the primary on every change.
    pub epoch: u64,
    /// Every gateway, the primary included.
    pub members: Vec<Member>,
}

/// A request on its own bidirectional stream.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Request {
    /// Correlates the reply, logs and cancellation across hops.
    pub id: u64,
    /// Operator method name (`gateway.status`, `node.invoke`, ...).
    pub method: String,
    /// Params as JSON text (postcard cannot carry self-describing JSON values).
    pub params: String,
    /// Hops already taken; a forwarded request is never forwarded again.
    pub hops: u8,
}

/// The reply to a [`Request`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Response {
    /// The request's id.
    pub id: u64,
    /// JSON text of the result, or an error.
    pub result: Result<String, WireError>,
}

/// An error in the classic protocol's shape, so both front doors report it the same way.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WireError {
    /// Classic error code (`INVALID_REQUEST`, `NOT_PAIRED`, `FORBIDDEN`, `UNAVAILABLE`, ...).
    pub code: String,
    /// Human-readable message.
    pub message: String,
    /// Optional JSON text of details.
    pub details: Option<String>,
    /// Whether the caller may retry.
    pub retryable: bool,
}

impl WireError {
    /// Builds an error without details.
    pub fn new(code: &str, message: impl Into<String>) -> Self {
        WireError {
            code: code.to_string(),
            message: message.into(),
            details: None,
            retryable: false,
        }
    }
}

impl std::fmt::Display for WireError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.code, self.message)
    }
}

/// Events on the long-lived unidirectional stream.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Event {
    /// The sender's current membership view (from the primary, authoritative).
    Membership(Membership),
    /// The sender is shutting down on purpose; the reason is logged by the receiver.
    Goodbye {
        /// Why.
        reason: String,
    },
    /// All the nodes attached to the sender (on a new link, or when asked).
    NodeDirectory(crate::directory::NodeDirectory),
    /// A change of the nodes attached to the sender.
    DirectoryDelta(crate::directory::DirectoryDelta),
    /// The sender fell behind the receiver's node directory (it holds `have`, or nothing):
    /// send a snapshot.
    DirectoryResync {
        /// The version the sender holds.
        have: Option<crate::directory::DirVersion>,
    },
    /// Pairing decisions (approvals and revocations), newest wins.
    PairingSync(Vec<PairingRecord>),
    /// The host vitals of the nodes attached to the sender (at most
    /// [`crate::vitals::MAX_RELAYED`]). Sent on a uni stream of its own, so a peer too old to
    /// know this variant drops that stream and keeps reading the others.
    NodeVitals(Vec<crate::vitals::NodeVitals>),
}

/// Health datagrams.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub enum Datagram {
    /// A ping; the receiver answers with a pong carrying the same sequence number.
    Ping {
        /// Sequence number.
        seq: u64,
    },
    /// Answer to a ping.
    Pong {
        /// The ping's sequence number.
        seq: u64,
    },
    /// The sender's host vitals, every [`crate::vitals::VITALS_EVERY`] pings; a peer too
    /// old to know it drops it as a bad datagram.
    Vitals(crate::vitals::Vitals),
    /// A gateway link's health ping: a [`Datagram::Ping`] that also says which version of its
    /// node directory the sender has announced, so a peer that lost the last change notices
    /// (see [`crate::directory`]). Answered with a [`Datagram::Pong`].
    LinkPing {
        /// Sequence number.
        seq: u64,
        /// The sender's node directory version.
        directory: crate::directory::DirVersion,
    },
}

/// One device's pairing state, as gateways exchange it so that a device approved (or revoked)
/// on any gateway is approved (or revoked) on all: the newest change wins.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct PairingRecord {
    /// The device key.
    pub key: PublicKey,
    /// Paired (true) or revoked (false).
    pub approved: bool,
    /// When this state was decided (ms since the epoch): the newest wins.
    pub changed_at_ms: u64,
    /// Name.
    pub name: String,
    /// Role.
    pub role: String,
    /// Platform.
    pub platform: String,
    /// Classic metadata (JSON text).
    pub meta: String,
    /// Device token for the role and its issue time, so the device can use it on any gateway.
    pub token: Option<(String, u64)>,
}
